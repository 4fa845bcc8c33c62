//! What a supervised workload is to its supervisor ([`Workload`]), and the supervisor
//! itself: [`serve`] (the detached process's life: stdio, lock, signals, first start,
//! readiness report, then the event loop) and the event loop [`supervise`] (signals,
//! reaping, the workload's own descriptors, timers). Shared building blocks of the
//! restart policy: [`Backoff`], [`restart_wanted`].
//!
//! The container shim and the VM supervisor implement [`Workload`]; a further engine
//! (e.g. a QEMU process) plugs in the same way.
//!
//! A workload with a fence deadline file ([`Workload::fence_file`], set for the HA
//! workloads of a cluster node) is watched by a [`Watchdog`] thread: once the deadline
//! passes, the workload is killed at once and not restarted, even if the node's agent is
//! stopped and cannot fence it itself.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use serde::Serialize;
use stead_schema::RestartPolicy;

use super::Instance;

/// How a child process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// A signal (this number) killed it.
    Signal(i32),
}

impl Exit {
    /// The end a wait status reports; `None` for a status that is not an end.
    pub fn of(st: &WaitStatus) -> Option<(Pid, Exit)> {
        match *st {
            WaitStatus::Exited(p, c) => Some((p, Exit::Code(c))),
            WaitStatus::Signaled(p, s, _) => Some((p, Exit::Signal(s as i32))),
            _ => None,
        }
    }

    /// The exit code a shell would report (128 + signal when killed).
    pub fn shell_code(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
        }
    }
}

/// A workload under a supervisor: one run at a time of something with a main process
/// (a container's init, a VMM child, a QEMU process), started again by its restart policy.
pub trait Workload {
    /// What the state file says.
    type State: Serialize;

    /// Starts the first run and returns once it is up: the launcher's exit code waits for
    /// this. Later runs are the workload's own business (its timers).
    fn start(&mut self) -> Result<(), String>;
    /// The first start failed with `error`: record it in the state and release what the
    /// start set up. The state is written afterwards.
    fn start_failed(&mut self, error: &str);
    /// The state file's record.
    fn state(&self) -> &Self::State;
    /// The main process of the current run, if one runs.
    fn pid(&self) -> Option<Pid>;
    /// The current run's main process ended. `Some(code)`: the supervisor is done and
    /// exits with `code`.
    fn run_ended(&mut self, exit: Exit) -> Option<i32>;
    /// Another child of the supervisor ended (e.g. a command run inside the workload).
    fn child_ended(&mut self, _pid: Pid, _exit: Exit) {}
    /// Graceful stop asked for (SIGTERM or SIGINT to the supervisor).
    fn request_stop(&mut self);
    /// SIGHUP to the supervisor: re-read what may change while running.
    fn reload(&mut self) {}
    /// Descriptors to watch besides the signals (control socket, console).
    fn fds(&self) -> Vec<BorrowedFd<'_>> {
        Vec::new()
    }
    /// Handles the readiness of [`Workload::fds`], in their order.
    fn on_ready(&mut self, _ready: &[bool]) {}
    /// When the loop must wake up next (stop deadline, restart backoff, housekeeping);
    /// `None`: only on an event.
    fn next_wakeup(&self) -> Option<Instant>;
    /// Timers due (kill after the stop timeout, restart after the backoff, housekeeping).
    /// `Some(code)`: the supervisor is done.
    fn on_timers(&mut self) -> Option<i32>;
    /// The fence deadline file this workload must not outlive (see `stead_host::fence`);
    /// `None`: not watched.
    fn fence_file(&self) -> Option<&Path> {
        None
    }
    /// The fence deadline passed: the watchdog already sent SIGKILL to the main process,
    /// at `killed_at` on `CLOCK_BOOTTIME`. Kill the rest at once (no graceful stop),
    /// record `fenced` in the state, never restart. `Some(code)`: the supervisor is done
    /// now; else it ends when the main process is reaped ([`Workload::run_ended`]). The
    /// default stops as on SIGTERM.
    fn fenced(&mut self, killed_at: Duration) -> Option<i32> {
        let _ = killed_at;
        self.request_stop();
        None
    }
}

/// How often the watchdog reads the fence deadline file.
pub const FENCE_CHECK: Duration = Duration::from_millis(250);

/// A thread that reads a workload's fence deadline file every [`FENCE_CHECK`] and, once the
/// deadline has passed, sends SIGKILL to the workload's main process and wakes the
/// supervisor's loop (its [`Watchdog::fd`] becomes readable). Its loop allocates nothing,
/// so the supervisor's thread may fork meanwhile; it needs nothing from the node's agent.
#[derive(Debug)]
pub struct Watchdog {
    pid: Arc<AtomicI32>,
    killed_at: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    fired: OwnedFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    /// Starts watching `file` for the main process `pid` (updated with
    /// [`Watchdog::set_pid`]).
    pub fn spawn(file: &Path, pid: Option<Pid>) -> Result<Self, String> {
        let (fired, notify) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| format!("watchdog pipe: {e}"))?;
        let shared = Arc::new(AtomicI32::new(pid.map_or(0, Pid::as_raw)));
        let stop = Arc::new(AtomicBool::new(false));
        let killed_at = Arc::new(AtomicU64::new(0));
        let fence = stead_host::fence::FenceFile::new(file);
        let (p, s, k) = (shared.clone(), stop.clone(), killed_at.clone());
        let thread = std::thread::Builder::new()
            .name("fence-watchdog".into())
            .stack_size(64 * 1024)
            .spawn(move || watch_deadline(&fence, &p, &s, &k, notify))
            .map_err(|e| format!("watchdog thread: {e}"))?;
        Ok(Watchdog {
            pid: shared,
            killed_at,
            stop,
            fired,
            thread: Some(thread),
        })
    }

    /// The main process to kill now (`None` between runs).
    pub fn set_pid(&self, pid: Option<Pid>) {
        self.pid.store(pid.map_or(0, Pid::as_raw), Ordering::SeqCst);
    }

    /// When the thread sent its SIGKILL, on `CLOCK_BOOTTIME` (zero before).
    pub fn killed_at(&self) -> Duration {
        Duration::from_nanos(self.killed_at.load(Ordering::SeqCst))
    }

    /// Readable once the deadline has passed.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fired.as_fd()
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The watchdog thread's loop: no allocation, no lock.
fn watch_deadline(
    fence: &stead_host::fence::FenceFile,
    pid: &AtomicI32,
    stop: &AtomicBool,
    killed_at: &AtomicU64,
    notify: OwnedFd,
) {
    while !stop.load(Ordering::SeqCst) {
        if fence.expired() {
            let p = pid.load(Ordering::SeqCst);
            if p > 0 {
                let _ = nix::sys::signal::kill(Pid::from_raw(p), Signal::SIGKILL);
            }
            let now = stead_host::fence::boottime_now().as_nanos();
            killed_at.store(u64::try_from(now).unwrap_or(u64::MAX), Ordering::SeqCst);
            let _ = nix::unistd::write(&notify, b"f");
            return;
        }
        std::thread::sleep(FENCE_CHECK);
    }
}

/// The signals a supervisor handles, blocked and read from a signalfd: SIGCHLD (a child
/// ended), SIGTERM and SIGINT (stop), SIGHUP (reload).
#[derive(Debug)]
pub struct Signals {
    fd: SignalFd,
}

impl Signals {
    fn set() -> SigSet {
        let mut set = SigSet::empty();
        for s in [
            Signal::SIGCHLD,
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGHUP,
        ] {
            set.add(s);
        }
        set
    }

    /// Blocks the signals in this (single-threaded) process and opens their signalfd.
    /// Children forked later inherit the mask: they unblock what they need.
    pub fn block() -> Result<Self, String> {
        let set = Signals::set();
        set.thread_block()
            .map_err(|e| format!("block signals: {e}"))?;
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
            .map_err(|e| format!("signalfd: {e}"))?;
        Ok(Signals { fd })
    }

    /// The signals pending now (each once).
    pub fn drain(&self) -> Vec<Signal> {
        let mut out = Vec::new();
        while let Ok(Some(si)) = self.fd.read_signal() {
            if let Ok(s) = Signal::try_from(si.ssi_signo as i32)
                && !out.contains(&s)
            {
                out.push(s);
            }
        }
        out
    }
}

impl AsFd for Signals {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Restart delays: [`Backoff::MIN`] doubling up to [`Backoff::MAX`], back to the minimum
/// after a run that lasted [`Backoff::MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: Backoff::MIN }
    }
}

impl Backoff {
    /// The first delay.
    pub const MIN: Duration = Duration::from_millis(100);
    /// The longest delay, and the uptime after which a run counts as healthy.
    pub const MAX: Duration = Duration::from_secs(10);

    /// The delay before the next restart of a run that started at `started`.
    pub fn after_run(&mut self, started: Instant) -> Duration {
        if started.elapsed() >= Backoff::MAX {
            self.next = Backoff::MIN;
        }
        self.next_delay()
    }

    /// The delay before the next retry (doubling each time).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Backoff::MAX);
        d
    }
}

/// When the next run of a workload starts: the pending restart time and its [`Backoff`].
#[derive(Debug, Default)]
pub struct RestartTimer {
    at: Option<Instant>,
    backoff: Backoff,
}

impl RestartTimer {
    /// Schedules the restart after a run that started at `started` ended.
    pub fn after_run(&mut self, started: Instant) {
        self.at = Some(Instant::now() + self.backoff.after_run(started));
    }

    /// Schedules another try after a restart failed.
    pub fn retry(&mut self) {
        self.at = Some(Instant::now() + self.backoff.next_delay());
    }

    /// No restart pending any more (a stop, or the run started).
    pub fn cancel(&mut self) {
        self.at = None;
    }

    /// When the pending restart is due.
    pub fn at(&self) -> Option<Instant> {
        self.at
    }

    /// Whether a restart is due at `now`; it is then no longer pending.
    pub fn take_due(&mut self, now: Instant) -> bool {
        let due = self.at.is_some_and(|t| now >= t);
        if due {
            self.at = None;
        }
        due
    }
}

/// Whether a run that ended is started again: a reboot from inside always is, otherwise
/// the restart policy decides on whether it `failed`.
pub fn restart_wanted(policy: RestartPolicy, failed: bool, reboot: bool) -> bool {
    reboot
        || match policy {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => failed,
            RestartPolicy::Never => false,
        }
}

/// The life of a detached supervisor of `instance`: stdio to its log, working dir `/`,
/// its exclusive lock, the signals, the workload built by `make`, its first start
/// reported on the readiness pipe `ready` (`ok`, or the error), then [`supervise`].
/// Returns the supervisor's exit code.
pub fn serve<W: Workload>(
    instance: &Instance,
    ready: OwnedFd,
    make: impl FnOnce() -> Result<W, String>,
) -> i32 {
    let mut ready = Some(File::from(ready));
    let mut report = |msg: &str| {
        if let Some(mut r) = ready.take() {
            let _ = r.write_all(msg.as_bytes());
        }
    };
    if let Err(e) = instance.redirect_stdio() {
        report(&e);
        return 1;
    }
    let _ = std::env::set_current_dir("/");
    let lock = match instance.lock() {
        Ok(l) => l,
        Err(e) => {
            report(&e);
            return 1;
        }
    };
    let started = Signals::block().and_then(|signals| {
        let mut w = make()?;
        match refuse_if_fenced(&w).and_then(|()| w.start()) {
            Ok(()) => Ok((w, signals)),
            Err(e) => {
                w.start_failed(&e);
                if let Err(we) = instance.write_state(w.state()) {
                    tracing::warn!(error = %we, "write state");
                }
                Err(e)
            }
        }
    });
    let code = match started {
        Ok((mut w, signals)) => match w.fence_file().map(|f| Watchdog::spawn(f, w.pid())) {
            Some(Err(e)) => {
                // Not watched would be unsafe: stop it at once.
                report(&e);
                let now = stead_host::fence::boottime_now();
                w.fenced(now).unwrap_or_else(|| supervise(&mut w, &signals))
            }
            watchdog => {
                report("ok");
                let watchdog = watchdog.and_then(Result::ok);
                supervise_watched(&mut w, &signals, watchdog.as_ref())
            }
        },
        Err(e) => {
            report(&e);
            1
        }
    };
    drop(lock);
    code
}

/// Refuses to start a workload whose fence deadline has already passed.
fn refuse_if_fenced<W: Workload>(w: &W) -> Result<(), String> {
    super::refuse_fenced(w.fence_file()).map_err(|e| e.to_string())
}

/// The poll timeout until `at` (at least 1 ms, at most a minute); none without a time.
fn timeout_until(at: Option<Instant>) -> PollTimeout {
    match at {
        None => PollTimeout::NONE,
        Some(t) => {
            let ms = t
                .saturating_duration_since(Instant::now())
                .as_millis()
                .min(60_000) as u16;
            PollTimeout::from(ms.max(1))
        }
    }
}

/// Waits for the signals or the workload's descriptors, until the next wakeup; returns
/// which were ready (the signals first), or `None` when polling failed.
fn wait_ready<W: Workload>(
    w: &W,
    signals: &Signals,
    watchdog: Option<&Watchdog>,
) -> Option<(bool, Vec<bool>)> {
    loop {
        let mut fds = vec![PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
        if let Some(wd) = watchdog {
            fds.push(PollFd::new(wd.fd(), PollFlags::POLLIN));
        }
        fds.extend(
            w.fds()
                .into_iter()
                .map(|f| PollFd::new(f, PollFlags::POLLIN)),
        );
        match poll(&mut fds, timeout_until(w.next_wakeup())) {
            Ok(_) => {
                let mut ready: Vec<bool> = fds
                    .iter()
                    .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                    .collect();
                let fired = watchdog.is_some() && ready.remove(1);
                return Some((fired, ready));
            }
            Err(nix::Error::EINTR) => continue,
            Err(e) => {
                tracing::error!(error = %e, "poll");
                return None;
            }
        }
    }
}

/// Handles pending signals; `Some(code)` when the workload ended for good.
fn on_signals<W: Workload>(
    w: &mut W,
    signals: &Signals,
    watchdog: Option<&Watchdog>,
) -> Option<i32> {
    let mut child = false;
    for s in signals.drain() {
        match s {
            Signal::SIGCHLD => child = true,
            Signal::SIGTERM | Signal::SIGINT => w.request_stop(),
            Signal::SIGHUP => w.reload(),
            _ => {}
        }
    }
    if child { reap(w, watchdog) } else { None }
}

/// Reaps every ended child and tells the workload; `Some(code)` when it ended for good.
fn reap<W: Workload>(w: &mut W, watchdog: Option<&Watchdog>) -> Option<i32> {
    loop {
        let st = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return None,
            Ok(st) => st,
        };
        let Some((pid, exit)) = Exit::of(&st) else {
            continue;
        };
        if Some(pid) == w.pid() {
            // Reaped: the watchdog must not kill whatever gets this pid next.
            if let Some(wd) = watchdog {
                wd.set_pid(None);
            }
            if let Some(code) = w.run_ended(exit) {
                return Some(code);
            }
        } else {
            w.child_ended(pid, exit);
        }
    }
}

/// The supervisor's event loop: signals (children ending, stop, reload), the workload's
/// descriptors, its timers; until the workload ends for good. Returns the exit code.
pub fn supervise<W: Workload>(w: &mut W, signals: &Signals) -> i32 {
    supervise_watched(w, signals, None)
}

/// [`supervise`] with a fence [`Watchdog`]: once it fires, the workload is told
/// ([`Workload::fenced`]) before anything else of that round (a reaped run is then not
/// restarted), and the watchdog is dropped.
pub fn supervise_watched<W: Workload>(
    w: &mut W,
    signals: &Signals,
    watchdog: Option<&Watchdog>,
) -> i32 {
    let mut watchdog = watchdog;
    loop {
        let Some((fired, ready)) = wait_ready(w, signals, watchdog) else {
            return 1;
        };
        if fired {
            tracing::warn!("fence deadline passed: workload killed, not restarted");
            let killed_at =
                watchdog.map_or_else(stead_host::fence::boottime_now, Watchdog::killed_at);
            watchdog = None;
            if let Some(code) = w.fenced(killed_at) {
                return code;
            }
        }
        if ready[0]
            && let Some(code) = on_signals(w, signals, watchdog)
        {
            return code;
        }
        w.on_ready(&ready[1..]);
        if let Some(code) = w.on_timers() {
            return code;
        }
        if let Some(wd) = watchdog {
            wd.set_pid(w.pid());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A workload whose main process is a child the test spawns; it records what the
    /// loop told it and ends as the test arranges.
    struct Fake {
        main: Option<Pid>,
        ended: Option<Exit>,
        stops: u32,
        reloads: u32,
        reads: u32,
        pipe: Option<OwnedFd>,
        state: (),
    }

    impl Fake {
        fn new(main: Option<Pid>) -> Self {
            Fake {
                main,
                ended: None,
                stops: 0,
                reloads: 0,
                reads: 0,
                pipe: None,
                state: (),
            }
        }
    }

    impl Workload for Fake {
        type State = ();
        fn start(&mut self) -> Result<(), String> {
            Ok(())
        }
        fn start_failed(&mut self, _error: &str) {}
        fn state(&self) -> &() {
            &self.state
        }
        fn pid(&self) -> Option<Pid> {
            self.main
        }
        fn run_ended(&mut self, exit: Exit) -> Option<i32> {
            self.ended = Some(exit);
            self.main = None;
            Some(exit.shell_code())
        }
        fn request_stop(&mut self) {
            self.stops += 1;
        }
        fn reload(&mut self) {
            self.reloads += 1;
        }
        fn fds(&self) -> Vec<BorrowedFd<'_>> {
            self.pipe.iter().map(|p| p.as_fd()).collect()
        }
        fn on_ready(&mut self, ready: &[bool]) {
            if ready.first() == Some(&true)
                && let Some(p) = &self.pipe
            {
                let mut b = [0u8; 16];
                let _ = nix::unistd::read(p, &mut b);
                self.reads += 1;
            }
        }
        fn next_wakeup(&self) -> Option<Instant> {
            Some(Instant::now() + Duration::from_millis(5))
        }
        fn on_timers(&mut self) -> Option<i32> {
            (self.main.is_none() && self.stops > 0 && self.reloads > 0 && self.reads > 0)
                .then_some(42)
        }
    }

    /// Sends `s` to this thread (which blocks it, so the signalfd reads it). A child's
    /// own SIGCHLD may go to another thread of the test process, so the test raises it.
    fn raise(s: Signal) {
        // SAFETY: raise(3) sends a signal to the calling thread; no memory is involved.
        assert_eq!(unsafe { libc::raise(s as i32) }, 0, "raise {s}");
    }

    #[test]
    fn the_loop_dispatches_signals_descriptors_and_timers() {
        let signals = Signals::block().expect("signals");
        let (r, w) = nix::unistd::pipe().expect("pipe");
        let mut f = Fake::new(None);
        f.pipe = Some(r);
        nix::unistd::write(&w, b"x").expect("write");
        raise(Signal::SIGHUP);
        raise(Signal::SIGTERM);
        assert_eq!(supervise(&mut f, &signals), 42);
        assert_eq!((f.stops, f.reloads, f.reads), (1, 1, 1));
    }

    #[test]
    #[allow(
        clippy::zombie_processes,
        reason = "the loop under test reaps the child"
    )]
    fn the_main_process_ending_ends_the_loop() {
        let signals = Signals::block().expect("signals");
        let child = std::process::Command::new("sh")
            .args(["-c", "exit 3"])
            .spawn()
            .expect("sh");
        let mut f = Fake::new(Some(Pid::from_raw(child.id() as i32)));
        // Wait until it is a zombie, then deliver the SIGCHLD to the loop's thread.
        let proc = stead_host::process::Proc::host();
        while proc
            .read(child.id() as i32, "stat")
            .is_ok_and(|s| !s.contains(") Z"))
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        raise(Signal::SIGCHLD);
        assert_eq!(supervise(&mut f, &signals), 3);
        assert_eq!(f.ended, Some(Exit::Code(3)));
    }

    #[test]
    fn the_watchdog_kills_the_main_process_once_the_deadline_passes() {
        use std::os::unix::process::ExitStatusExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("deadline");
        let deadline = stead_host::fence::boottime_now() + Duration::from_millis(300);
        std::fs::write(&file, stead_host::fence::deadline_content(deadline)).expect("write");
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .expect("sleep");
        let wd = Watchdog::spawn(&file, Some(Pid::from_raw(child.id() as i32))).expect("spawn");
        let status = child.wait().expect("wait");
        assert_eq!(status.signal(), Some(9), "SIGKILL");
        wd.set_pid(None);
        let mut fds = [PollFd::new(wd.fd(), PollFlags::POLLIN)];
        assert_eq!(poll(&mut fds, PollTimeout::from(1000u16)).expect("poll"), 1);
        let late = wd.killed_at().saturating_sub(deadline);
        assert!(wd.killed_at() >= deadline, "not before the deadline");
        assert!(late < FENCE_CHECK + Duration::from_millis(200), "{late:?}");
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_resets_after_a_healthy_run() {
        let mut b = Backoff::default();
        let now = Instant::now();
        let delays: Vec<u64> = (0..9)
            .map(|_| b.after_run(now).as_millis() as u64)
            .collect();
        assert_eq!(
            delays,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]
        );
        let Some(long_ago) = now.checked_sub(Backoff::MAX) else {
            return; // the clock is too close to its origin to test the reset
        };
        assert_eq!(b.after_run(long_ago), Backoff::MIN);
        assert_eq!(b.next_delay(), Duration::from_millis(200));
    }

    #[test]
    fn restart_timer_is_due_once() {
        let mut t = RestartTimer::default();
        assert_eq!(t.at(), None);
        assert!(!t.take_due(Instant::now()));
        t.after_run(Instant::now());
        let at = t.at().expect("pending");
        assert!(!t.take_due(at - Duration::from_millis(1)), "not yet");
        assert!(t.take_due(at));
        assert!(!t.take_due(at), "taken");
        let before = Instant::now();
        t.retry();
        let second = t.at().expect("retry pending");
        assert!(
            second >= before + Duration::from_millis(200),
            "the backoff doubled"
        );
        t.cancel();
        assert_eq!(t.at(), None);
    }

    #[test]
    fn restart_policy() {
        use RestartPolicy::*;
        assert!(restart_wanted(Always, false, false));
        assert!(restart_wanted(OnFailure, true, false));
        assert!(!restart_wanted(OnFailure, false, false));
        assert!(!restart_wanted(Never, true, false));
        assert!(
            restart_wanted(Never, false, true),
            "a reboot always restarts"
        );
    }

    #[test]
    fn exits_from_wait_statuses() {
        let p = Pid::from_raw(7);
        assert_eq!(
            Exit::of(&WaitStatus::Exited(p, 3)),
            Some((p, Exit::Code(3)))
        );
        let killed = Exit::of(&WaitStatus::Signaled(p, Signal::SIGKILL, false));
        assert_eq!(killed, Some((p, Exit::Signal(9))));
        assert_eq!(Exit::Signal(9).shell_code(), 137);
        assert_eq!(Exit::of(&WaitStatus::StillAlive), None);
    }

    #[test]
    fn timeouts_are_clamped() {
        assert_eq!(timeout_until(None), PollTimeout::NONE);
        assert_eq!(timeout_until(Some(Instant::now())), PollTimeout::from(1u16));
        let far = Instant::now() + Duration::from_secs(3600);
        assert_eq!(timeout_until(Some(far)), PollTimeout::from(60_000u16));
    }
}
