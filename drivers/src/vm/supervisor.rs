//! `stead vmm`: the per-VM supervisor.
//!
//! The VM driver starts `<self_exe> vmm --run-dir DIR --name NAME --config FILE`. Like
//! `stead shim`, [`main`] forks twice (the middle process calls `setsid`) so the
//! supervisor survives the CLI and the controller; the launching process exits 0 once the
//! VM runs (its control socket reports `running`), or 1 with the error on stderr.
//!
//! The supervisor (single-threaded):
//! - holds an exclusive `flock` on `supervisor.lock` (never two supervisors for one VM);
//! - creates the cgroup `<cgroup-parent>/vm-<name>` (v1 or v2, through
//!   [`stead_host::cgroup`]), kills whatever a dead predecessor left there, sets the
//!   limits (CPU quota = vCPUs, memory = guest RAM + [`MEMORY_OVERHEAD`]) and joins it;
//! - enters the configured network namespace (where the taps live);
//! - opens the VM's taps for each boot (each must exist, be persistent and carry the VM's
//!   owner alias) and hands the VMM their descriptors: nothing here or in the VMM ever
//!   creates a tap, which a restart after apply's undo deleted it would otherwise do;
//! - forks one **VMM child per boot**, which calls [`stead_vmm::run_vmm_process`]. The VMM
//!   confines every thread of that process with seccomp (only KVM_RUN-style ioctls, no
//!   fork or exec), so a confined process can never build the next VM: the supervisor
//!   stays unconfined and re-forks a fresh child for every boot. The child gets
//!   `PR_SET_PDEATHSIG = SIGKILL`, so a VM never outlives its supervisor;
//! - applies the restart policy when the child ends: a guest reset (reboot) always boots
//!   again; otherwise `always` restarts, `on-failure` restarts after an error or a signal
//!   (e.g. the VMM process was killed), `never` does not. Restarts wait an exponential
//!   backoff (100 ms doubling to 10 s, reset after 10 s of uptime) and are counted in
//!   `supervisor.json` (kept across supervisors of the same VM);
//! - caps `console.log` (serial output, appended by the VMM) at [`LOG_CAP`], keeping the
//!   newest half in place (a few bytes written during the trim may be lost);
//! - on `SIGHUP`: re-reads the restart policy and the stop timeout from `config.json`
//!   (hot changes);
//! - on `SIGTERM`/`SIGINT`: graceful stop — `shutdown` on the control socket (Ctrl-Alt-Del);
//!   after the stop timeout `kill` on the control socket (the VM is forced off), `SIGKILL`
//!   to the child if it is still there 5 s later, phase `stopped`, exit. The VMM's own
//!   force-off timer is only a backstop past the longest stop timeout, so a timeout
//!   changed while the VM runs counts.
//!
//! The process around it (lock, signals, readiness report, event loop) is the shared
//! supervisor ([`crate::supervise::serve`]); this file is the VM's
//! [`crate::supervise::Workload`].

use std::fs;
use std::io::{self, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use stead_vmm::{Reply, Request, RunState, StatusReply};

use super::config::{Paths, Phase, SupervisorState, VmRunConfig, cgroup_name};
use crate::container::config::read_json;
use crate::supervise::console::trim_log;
use crate::supervise::workload::{Exit, RestartTimer, Workload, restart_wanted};
use stead_host::cgroup::{Cgroup, Limits};

pub use crate::supervise::console::LOG_CAP;
/// Memory allowed to the VM's cgroup on top of guest RAM (VMM code, stacks, queues).
pub const MEMORY_OVERHEAD: u64 = 64 << 20;
/// How long the first boot may take to report `running`.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Exit codes of a VMM child, by [`stead_vmm::ExitReason`].
mod code {
    pub const SHUTDOWN: i32 = 0;
    pub const SETUP_FAILED: i32 = 1;
    pub const RESET: i32 = 3;
    pub const KILLED: i32 = 4;
    pub const GUEST_ERROR: i32 = 5;
}

/// Arguments of `stead vmm` (`--run-dir D --name N --config F`, the config a
/// [`VmRunConfig`]).
pub type VmmArgs = crate::supervise::SupervisorArgs;

/// Entry point of `stead vmm`. Must be called from a single-threaded process before any
/// thread or async runtime exists. Returns the exit code of the launching process; the
/// supervisor itself never returns (it exits the process).
pub fn main(args: &VmmArgs) -> i32 {
    let paths = Paths::new(&args.run_dir, &args.name);
    crate::supervise::run::<VmRunConfig>(
        "stead vmm",
        "supervisor exited before the VM started",
        args,
        &paths.dir.clone(),
        |c| &c.name,
        |cfg, ready_w| daemon(cfg, paths, ready_w),
    )
}

/// Whether a live supervisor holds the lock of `paths`.
pub fn lock_held(paths: &Paths) -> bool {
    paths.instance().lock_held()
}

/// Sends one request to the VMM's control socket and returns its reply.
pub fn control_request(socket: &Path, req: Request) -> io::Result<Reply> {
    let s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.set_write_timeout(Some(Duration::from_secs(3)))?;
    (&s).write_all(format!("{}\n", req.to_line()).as_bytes())?;
    let bad = |e: stead_vmm::VmmError| io::Error::new(io::ErrorKind::InvalidData, e.to_string());
    // Bounded: the VMM runs jailed and is not trusted with the supervisor's memory.
    let line = stead_vmm::read_reply_line(&mut BufReader::new(&s)).map_err(bad)?;
    Reply::parse(&line).map_err(bad)
}

/// The VM's status from its control socket; `None` when nothing answers.
pub fn control_status(socket: &Path) -> Option<StatusReply> {
    match control_request(socket, Request::Status) {
        Ok(Reply::Ok(s)) => Some(s),
        _ => None,
    }
}

/// The last `n` lines of a file (for error messages).
fn tail(p: &Path, n: usize) -> String {
    let text = fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("; ")
}

fn daemon(cfg: VmRunConfig, paths: Paths, ready: OwnedFd) -> i32 {
    let instance = paths.instance();
    crate::supervise::serve(&instance, ready, || {
        log(&format!("supervising VM {}", cfg.name));
        Supervisor::new(cfg, paths).inspect_err(|e| log(e))
    })
}

/// A line of the supervisor's own log (`vmm.log`).
fn log(msg: &str) {
    eprintln!("{} stead vmm: {msg}", crate::supervise::now_rfc3339());
}

struct Supervisor {
    cfg: VmRunConfig,
    paths: Paths,
    _cgroup: Cgroup,
    state: SupervisorState,
    child: Option<Pid>,
    boot_at: Instant,
    restart: RestartTimer,
    stop_deadline: Option<Instant>,
    /// The VM was forced off (`kill` on the control socket) at the stop deadline.
    forced_off: bool,
}

/// Creates the VM's cgroup (killing what a dead predecessor left there), sets its limits
/// and moves the supervisor into it (its VMM children are born there).
fn join_cgroup(cfg: &VmRunConfig) -> Result<Cgroup, String> {
    crate::supervise::join_cgroup(
        &cfg.cgroup_parent,
        &cgroup_name(&cfg.name),
        &Limits {
            cpus: Some(f64::from(cfg.cpus)),
            memory: Some(cfg.memory + MEMORY_OVERHEAD),
            pids: None,
        },
    )
}

/// The state a new supervisor starts from: restarts and the last exit carry over from a
/// predecessor's `supervisor.json`.
fn initial_state(paths: &Paths) -> SupervisorState {
    let prev: Option<SupervisorState> = paths.instance().read_state().ok().flatten();
    // A predecessor that did not stop on request died or gave up: this start counts.
    let restarts = match &prev {
        Some(p) if p.phase == Phase::Stopped => p.restarts,
        Some(p) => p.restarts + 1,
        None => 0,
    };
    SupervisorState {
        supervisor_pid: std::process::id() as i32,
        vmm_pid: None,
        phase: Phase::Starting,
        restarts,
        started_at: None,
        last_exit: prev.and_then(|p| p.last_exit),
        last_error: None,
    }
}

/// The VMM child of one boot, after the fork: never returns. It unblocks the signals,
/// drops inherited descriptors, dies with its supervisor (`supervisor` is its pid), runs
/// the VM and exits with the [`code`] of how the VM ended.
fn vmm_child(vm_cfg: stead_vmm::VmConfig, taps: &[OwnedFd], supervisor: Pid) -> ! {
    let _ = SigSet::empty().thread_set_mask();
    // Drop inherited descriptors (the supervisor's lock and signalfd, the launcher's ready
    // pipe): stdio and the taps stay, the VMM opens what else it needs.
    let keep: Vec<RawFd> = taps.iter().map(AsRawFd::as_raw_fd).collect();
    // A VMM that kept the supervisor's lock would look like a live supervisor.
    if !close_fds_except(&keep)
        || nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err()
        || nix::unistd::getppid() != supervisor
    {
        // SAFETY: _exit ends this forked child without running atexit handlers.
        unsafe { libc::_exit(code::SETUP_FAILED) };
    }
    let c = match stead_vmm::run_vmm_process(vm_cfg) {
        Ok(stead_vmm::ExitReason::Shutdown) => code::SHUTDOWN,
        Ok(stead_vmm::ExitReason::Reset) => code::RESET,
        Ok(stead_vmm::ExitReason::Killed) => code::KILLED,
        Ok(stead_vmm::ExitReason::Error(e)) => {
            eprintln!("stead vmm: guest error: {e}");
            code::GUEST_ERROR
        }
        Err(e) => {
            eprintln!("stead vmm: {e}");
            code::SETUP_FAILED
        }
    };
    // SAFETY: the process may be confined by seccomp now; _exit is allowed and skips the
    // atexit handlers.
    unsafe { libc::_exit(c) }
}

/// Closes every descriptor from 3 up except those in `keep`; false if a close failed.
/// For the forked child of the single-threaded supervisor (allocating is safe there).
fn close_fds_except(keep: &[RawFd]) -> bool {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter_map(|&fd| u32::try_from(fd).ok())
        .collect();
    keep.sort_unstable();
    let mut from: u32 = 3;
    for fd in keep {
        if fd > from && !close_range(from, fd - 1) {
            return false;
        }
        from = from.max(fd.saturating_add(1));
    }
    close_range(from, u32::MAX)
}

/// `close_range(first, last, 0)`; false if it failed.
fn close_range(first: u32, last: u32) -> bool {
    // SAFETY: close_range on descriptors the caller (a fresh child) does not use.
    unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) == 0 }
}

impl Supervisor {
    fn new(cfg: VmRunConfig, paths: Paths) -> Result<Self, String> {
        let state = initial_state(&paths);
        let cg = join_cgroup(&cfg)?;
        crate::supervise::enter_netns(cfg.netns.as_deref())?;
        Ok(Supervisor {
            cfg,
            paths,
            _cgroup: cg,
            state,
            child: None,
            boot_at: Instant::now(),
            restart: RestartTimer::default(),
            stop_deadline: None,
            forced_off: false,
        })
    }

    fn save(&self) {
        if let Err(e) = self.paths.instance().write_state(&self.state) {
            log(&e.to_string());
        }
    }

    /// Forks a VMM child for one boot.
    fn boot(&mut self) -> Result<(), String> {
        // Opened here, checked as this VM's, and closed in the supervisor after the fork:
        // a restarted VMM never makes a tap that apply or delete removed meanwhile.
        let taps = open_owned_taps(&self.cfg)?;
        let vm_cfg = vm_config(&self.cfg, &self.paths, &taps)?;
        let me = nix::unistd::getpid();
        // SAFETY: the supervisor is single-threaded; the child only calls async-signal-
        // safe functions before `run_vmm_process`, which builds its own threads.
        match unsafe { nix::unistd::fork() } {
            Err(e) => Err(format!("fork: {e}")),
            Ok(nix::unistd::ForkResult::Child) => vmm_child(vm_cfg, &taps, me),
            Ok(nix::unistd::ForkResult::Parent { child }) => {
                log(&format!("boot, VMM pid {child}"));
                self.child = Some(child);
                self.boot_at = Instant::now();
                self.restart.cancel();
                self.state.vmm_pid = Some(child.as_raw());
                self.state.phase = Phase::Running;
                self.state.started_at = Some(crate::supervise::now_rfc3339());
                self.save();
                Ok(())
            }
        }
    }

    /// Boots and waits until the control socket says `running`.
    fn first_boot(&mut self) -> Result<(), String> {
        self.boot()?;
        let deadline = Instant::now() + START_TIMEOUT;
        let child = self.child.ok_or("no VMM child")?;
        loop {
            match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => {}
                Ok(st) => {
                    self.child = None;
                    return Err(format!(
                        "the VMM exited during start ({}): {}",
                        describe_status(&st),
                        tail(&self.paths.vmm_log(), 3)
                    ));
                }
                Err(e) => return Err(format!("waitpid: {e}")),
            }
            if self.vm_is_up() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = kill(child, Signal::SIGKILL);
                let _ = waitpid(child, None);
                self.child = None;
                return Err(format!(
                    "the VM did not start within {}s: {}",
                    START_TIMEOUT.as_secs(),
                    tail(&self.paths.vmm_log(), 3)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the VMM's control socket reports the VM as set up (running, paused or
    /// already ended).
    fn vm_is_up(&self) -> bool {
        control_status(&self.paths.control_socket()).is_some_and(|st| {
            matches!(
                st.state,
                RunState::Running | RunState::Paused | RunState::Exited
            )
        })
    }

    /// Re-reads `config.json` for the hot fields (the restart policy).
    fn reload_config(&mut self) {
        match read_json::<VmRunConfig>(&self.paths.config()) {
            Ok(Some(c)) if c.name == self.cfg.name => {
                log(&format!(
                    "reload, restart policy {:?}, stop timeout {} s",
                    c.restart_policy, c.shutdown_timeout_secs
                ));
                self.cfg.restart_policy = c.restart_policy;
                self.cfg.shutdown_timeout_secs = c.shutdown_timeout_secs;
            }
            Ok(_) => log("reload: no usable config"),
            Err(e) => log(&format!("reload: {e}")),
        }
    }

    /// Begins a graceful stop: `shutdown` on the control socket, a deadline for the kill.
    fn begin_stop(&mut self) {
        if self.stop_deadline.is_some() {
            return;
        }
        log("stop requested");
        self.restart.cancel();
        self.stop_deadline =
            Some(Instant::now() + Duration::from_secs(self.cfg.shutdown_timeout_secs));
        if self.child.is_some()
            && let Err(e) = control_request(&self.paths.control_socket(), Request::Shutdown)
        {
            log(&format!("shutdown request: {e}"));
        }
    }

    fn stopped(&mut self) -> i32 {
        self.state.phase = Phase::Stopped;
        self.state.vmm_pid = None;
        self.save();
        log("stopped");
        0
    }

    /// The VMM child ended: record it, then stop, end or schedule a restart.
    /// `Some(code)` = the supervisor is done.
    fn vmm_ended(&mut self, exit: Exit) -> Option<i32> {
        self.child = None;
        self.state.vmm_pid = None;
        let how = describe(exit);
        log(&format!("VMM ended: {how}"));
        self.state.last_exit = Some(how);
        if self.stop_deadline.is_some() {
            return Some(self.stopped());
        }
        let (reset, failed) = match exit {
            Exit::Code(c) => (
                c == code::RESET,
                !matches!(c, code::SHUTDOWN | code::KILLED),
            ),
            Exit::Signal(_) => (false, true),
        };
        if !restart_wanted(self.cfg.restart_policy, failed, reset) {
            self.state.phase = Phase::Exited;
            self.save();
            return Some(0);
        }
        self.restart.after_run(self.boot_at);
        self.note_restart();
        None
    }

    /// Records a scheduled restart in the state file.
    fn note_restart(&mut self) {
        self.state.restarts += 1;
        self.state.phase = Phase::Restarting;
        self.save();
    }

    /// Kills the VMM once the stop deadline passed; `Some(code)` once it is gone.
    fn enforce_stop(&mut self) -> Option<i32> {
        let deadline = self.stop_deadline?;
        if let Some(child) = self.child
            && Instant::now() > deadline
        {
            if self.forced_off {
                log("the VMM did not exit after being forced off, killing it");
                let _ = kill(child, Signal::SIGKILL);
            } else {
                log("shutdown timed out, forcing the VM off");
                if let Err(e) = control_request(&self.paths.control_socket(), Request::Kill) {
                    log(&format!("kill request: {e}"));
                }
                self.forced_off = true;
                self.stop_deadline = Some(Instant::now() + Duration::from_secs(5));
            }
        }
        self.child.is_none().then(|| self.stopped())
    }

    /// Boots again once the restart backoff passed.
    fn restart_when_due(&mut self) {
        if self.restart.take_due(Instant::now())
            && let Err(e) = self.boot()
        {
            log(&format!("restart failed: {e}"));
            self.state.last_error = Some(e);
            self.restart.retry();
            self.note_restart();
        }
    }
}

/// How often the supervisor wakes up without an event (to trim the console log and check
/// the stop deadline).
const TICK: Duration = Duration::from_millis(500);

impl Workload for Supervisor {
    type State = SupervisorState;

    fn start(&mut self) -> Result<(), String> {
        self.first_boot()?;
        crate::supervise::release_free_heap();
        Ok(())
    }

    fn start_failed(&mut self, error: &str) {
        log(error);
        self.state.last_error = Some(error.to_string());
        self.state.phase = Phase::Exited;
        self.state.vmm_pid = None;
    }

    fn state(&self) -> &SupervisorState {
        &self.state
    }

    fn pid(&self) -> Option<Pid> {
        self.child
    }

    fn run_ended(&mut self, exit: Exit) -> Option<i32> {
        self.vmm_ended(exit)
    }

    fn request_stop(&mut self) {
        self.begin_stop();
    }

    fn fence_file(&self) -> Option<&std::path::Path> {
        self.cfg.fence_file.as_deref()
    }

    /// The VMM is the whole VM: it was SIGKILLed; reap it and end as `fenced`.
    fn fenced(&mut self, _killed_at: Duration) -> Option<i32> {
        log("fence deadline passed: VMM killed");
        if let Some(child) = self.child.take() {
            let _ = kill(child, Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(child, None);
        }
        self.restart.cancel();
        self.state.vmm_pid = None;
        self.state.phase = Phase::Fenced;
        self.save();
        Some(0)
    }

    fn reload(&mut self) {
        self.reload_config();
    }

    fn next_wakeup(&self) -> Option<Instant> {
        let tick = Instant::now() + TICK;
        let next = self.restart.at().map_or(tick, |at| at.min(tick));
        Some(self.stop_deadline.map_or(next, |d| d.min(next)))
    }

    fn on_timers(&mut self) -> Option<i32> {
        trim_log(&self.paths.console_log(), LOG_CAP);
        if let Some(code) = self.enforce_stop() {
            return Some(code);
        }
        self.restart_when_due();
        None
    }
}

/// Opens the queue of each tap of `cfg` (in the supervisor's network namespace, the VM's):
/// only taps the driver made for this VM ([`crate::vm::tap::open_owned`]).
fn open_owned_taps(cfg: &VmRunConfig) -> Result<Vec<OwnedFd>, String> {
    let owner = crate::net::owner_alias(stead_schema::Kind::VirtualMachine, &cfg.name);
    let names: Vec<&str> = cfg.interfaces.iter().map(|i| i.tap.as_str()).collect();
    crate::vm::tap::open_all_owned(&names, &owner, false)
}

/// Builds the VMM configuration of one boot, on the open `taps` (one per interface).
fn vm_config(
    cfg: &VmRunConfig,
    paths: &Paths,
    taps: &[OwnedFd],
) -> Result<stead_vmm::VmConfig, String> {
    let mut v = stead_vmm::VmConfig::new(&cfg.kernel);
    v.vcpus = u8::try_from(cfg.cpus).map_err(|_| format!("{} vCPUs is too many", cfg.cpus))?;
    v.mem_bytes = cfg.memory;
    v.initrd = cfg.initrd.clone();
    v.cmdline = cfg
        .cmdline
        .clone()
        .unwrap_or_else(|| "console=ttyS0 reboot=k panic=1".into());
    v.disks = cfg
        .disks
        .iter()
        .map(|d| stead_vmm::DiskConfig {
            path: d.path.clone(),
            read_only: d.read_only,
        })
        .collect();
    for (i, tap) in cfg.interfaces.iter().zip(taps) {
        let mac: stead_schema::MacAddr = i
            .mac
            .parse()
            .map_err(|e| format!("interface {}: {e}", i.tap))?;
        v.nets.push(stead_vmm::NetConfig {
            tap: stead_vmm::TapSource::Fd(tap.as_raw_fd()),
            mac: mac.0,
        });
    }
    v.serial_log = Some(paths.console_log());
    v.run_dir = Some(paths.dir.clone());
    v.control_socket = Some(paths.control_socket());
    v.console_socket = Some(paths.console_socket());
    // The supervisor forces the VM off at the (reloadable) stop timeout; the VMM's own timer
    // is a backstop past the longest one.
    v.shutdown_timeout = stead_schema::MAX_STOP_TIMEOUT + Duration::from_secs(10);
    v.jail = true;
    Ok(v)
}

/// How a VMM child ended, in words.
fn describe(exit: Exit) -> String {
    match exit {
        Exit::Code(code::SHUTDOWN) => "shutdown".into(),
        Exit::Code(code::RESET) => "reset".into(),
        Exit::Code(code::KILLED) => "killed".into(),
        Exit::Code(code::GUEST_ERROR) => "guest error".into(),
        Exit::Code(c) => format!("exit code {c}"),
        Exit::Signal(s) => format!("signal {s}"),
    }
}

/// [`describe`] for any wait status.
fn describe_status(st: &WaitStatus) -> String {
    match Exit::of(st) {
        Some((_, exit)) => describe(exit),
        None => format!("{st:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_reply_from_a_hostile_vmm_is_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("control.sock");
        let l = std::os::unix::net::UnixListener::bind(&p).expect("bind");
        // A VMM that answers with an endless line.
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            let chunk = vec![b'a'; 64 << 10];
            let mut sent = 0usize;
            while sent < (256 << 20) && s.write_all(&chunk).is_ok() {
                sent += chunk.len();
            }
            sent
        });
        let r = control_request(&p, Request::Status);
        assert!(r.is_err(), "{r:?}");
        let sent = server.join().expect("server");
        assert!(
            sent < (16 << 20),
            "the client read {sent} bytes of one reply"
        );
    }

    #[test]
    fn exit_descriptions() {
        let p = Pid::from_raw(1);
        assert_eq!(
            describe_status(&WaitStatus::Exited(p, code::RESET)),
            "reset"
        );
        assert_eq!(
            describe_status(&WaitStatus::Signaled(p, Signal::SIGKILL, false)),
            "signal 9"
        );
        assert_eq!(describe(Exit::Code(7)), "exit code 7");
    }
}
