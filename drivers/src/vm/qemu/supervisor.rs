//! `stead qemu`: the per-VM supervisor of a qemu-engine VM.
//!
//! The VM driver starts `<self_exe> qemu --run-dir DIR --name NAME --config FILE`; like
//! `stead vmm` it detaches (double fork, new session, [`crate::supervise::run`]) so the
//! VM survives the CLI and the controller, and the launcher exits 0 once QEMU answers QMP
//! with the guest running.
//!
//! The supervisor (single-threaded, the shared [`crate::supervise::serve`] loop):
//! - holds the VM's lock, joins the cgroup `<cgroup-parent>/vm-<name>` (killing what a
//!   dead predecessor left there) with a CPU quota of the vCPUs plus [`EMULATOR_CPUS`]
//!   and a memory limit of
//!   guest RAM + [`memory_overhead`], and enters the configured network namespace (where
//!   the taps live); QEMU is born in both;
//! - runs one `qemu-system-x86_64` per boot ([`super::argv::argv`]) with
//!   `PR_SET_PDEATHSIG = SIGKILL` (a QEMU never outlives its supervisor), the serial port
//!   on a socket pair ([`super::argv::SERIAL_FD`]) and its own QMP channel on another
//!   ([`super::argv::SUPERVISOR_QMP_FD`]); QEMU's stderr goes to the supervisor's log;
//! - relays serial output to the size-capped `console.log` and to the clients of
//!   `console.sock` (`stead console`; a new client first gets the log's last 64 KiB), and
//!   their input to the serial port;
//! - applies the restart policy when QEMU ends: exit code 0 without a stop request is the
//!   guest powering off (restarted by `always` only), anything else is a failure
//!   (restarted by `always` and `on-failure`); a guest reboot stays inside QEMU. Restarts
//!   wait the shared exponential backoff and are counted in `supervisor.json`;
//! - on `SIGTERM`: graceful stop — QMP `system_powerdown` (ACPI), after
//!   `shutdownTimeout` the guest agent's `guest-shutdown` (when the VM has the agent)
//!   with [`AGENT_GRACE`] more, then QMP `quit`, then `SIGKILL` after [`QUIT_GRACE`];
//! - as a live migration target (`incoming` in the config): accepts QEMU waiting in
//!   `inmigrate` as booted and never restarts it until a reload clears `incoming` (once
//!   the migration completed); a stop of a QEMU whose guest migrated away (`postmigrate`)
//!   goes straight to `quit`;
//! - on `SIGHUP`: re-reads the restart policy and `incoming`.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::accel::Accel;
use super::argv::{SERIAL_FD, SUPERVISOR_QMP_FD, TAP_FD_BASE, TCG_TB_SIZE_MIB, argv};

// `spawn_qemu` places serial, QMP and the taps at consecutive descriptors.
const _: () = assert!(SUPERVISOR_QMP_FD == SERIAL_FD + 1 && TAP_FD_BASE == SERIAL_FD + 2);
use super::config::QemuConfig;
use super::qmp::{Qmp, Quit, RunState as QmpRunState, SystemPowerdown};
use crate::container::config::read_json;
use crate::supervise::console::{Clients, ConsoleLog};
use crate::supervise::workload::{Exit, RestartTimer, Workload, restart_wanted};
use crate::vm::config::{Paths, Phase, cgroup_name};
use stead_host::cgroup::{Cgroup, Limits};

/// Arguments of `stead qemu` (`--run-dir D --name N --config F`, the config a
/// [`QemuConfig`]).
pub type QemuArgs = crate::supervise::SupervisorArgs;

/// How long a boot may take until QEMU answers QMP.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Time the guest agent's `guest-shutdown` gets before `quit`.
pub const AGENT_GRACE: Duration = Duration::from_secs(10);
/// Time `quit` gets before `SIGKILL`.
pub const QUIT_GRACE: Duration = Duration::from_secs(5);
/// Timeout of one QMP exchange of the supervisor.
const QMP_TIMEOUT: Duration = Duration::from_secs(3);
/// How much console output a new console client gets replayed.
const REPLAY: u64 = 64 << 10;
/// How often the supervisor wakes up without an event.
const TICK: Duration = Duration::from_millis(500);

/// Memory allowed to the VM's cgroup on top of guest RAM: QEMU itself, plus the TCG
/// translation cache when emulating.
pub fn memory_overhead(accel: Accel) -> u64 {
    let base: u64 = 192 << 20;
    match accel {
        Accel::Kvm => base,
        Accel::Tcg => base + (TCG_TB_SIZE_MIB << 20),
    }
}

/// `supervisor.json` of a qemu-engine VM, written atomically on every change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QemuState {
    /// Supervisor pid.
    pub supervisor_pid: i32,
    /// Pid of the current QEMU process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_pid: Option<i32>,
    /// Phase.
    pub phase: Phase,
    /// Accelerator QEMU runs with.
    pub accel: Accel,
    /// Restarts since the VM was first started (kept across supervisors).
    pub restarts: u64,
    /// When the current boot started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// How the previous QEMU ended (`shutdown`, `exit code 1`, `signal 9`, `stopped`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
    /// Last error of a failed start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Entry point of `stead qemu`. Must be called from a single-threaded process before any
/// thread exists. Returns the launcher's exit code; the supervisor exits the process.
pub fn main(args: &QemuArgs) -> i32 {
    let paths = Paths::new(&args.run_dir, &args.name);
    crate::supervise::run::<QemuConfig>(
        "stead qemu",
        "supervisor exited before the VM started",
        args,
        &paths.dir.clone(),
        |c| &c.name,
        |cfg, ready_w| daemon(cfg, paths, ready_w),
    )
}

fn daemon(cfg: QemuConfig, paths: Paths, ready: OwnedFd) -> i32 {
    let instance = paths.instance();
    crate::supervise::serve(&instance, ready, || {
        log(&format!(
            "supervising VM {} (QEMU, {})",
            cfg.name,
            cfg.accel.as_str()
        ));
        Supervisor::new(cfg, paths).inspect_err(|e| log(e))
    })
}

/// A line of the supervisor's own log.
fn log(msg: &str) {
    eprintln!("{} stead qemu: {msg}", crate::supervise::now_rfc3339());
}

/// The last `n` lines of a file (for error messages).
fn tail(p: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("; ")
}

/// The graceful stop's current step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopStep {
    /// ACPI power button pressed.
    Powerdown,
    /// The guest agent was asked to shut down.
    Agent,
    /// QEMU was told to quit.
    Quit,
    /// QEMU was killed.
    Killed,
}

/// One running QEMU.
struct Run {
    pid: Pid,
    serial: Option<UnixStream>,
    qmp: Option<Qmp>,
}

struct Supervisor {
    cfg: QemuConfig,
    paths: Paths,
    _cgroup: Cgroup,
    state: QemuState,
    run: Option<Run>,
    console: UnixListener,
    clients: Clients,
    log: ConsoleLog,
    boot_at: Instant,
    restart: RestartTimer,
    stop: Option<(StopStep, Instant)>,
}

/// CPU time QEMU's own threads get on top of the vCPUs (main loop, device emulation and
/// I/O; under TCG also code translation). A quota of only the vCPUs made a TCG guest boot
/// about 20% slower than the same QEMU without a quota.
pub const EMULATOR_CPUS: f64 = 1.0;

/// Creates the VM's cgroup (killing what a dead predecessor left there), sets its limits
/// and moves the supervisor into it.
fn join_cgroup(cfg: &QemuConfig) -> Result<Cgroup, String> {
    crate::supervise::join_cgroup(
        &cfg.cgroup_parent,
        &cgroup_name(&cfg.name),
        &Limits {
            cpus: Some(f64::from(cfg.cpus) + EMULATOR_CPUS),
            memory: Some(cfg.memory + memory_overhead(cfg.accel)),
            pids: None,
        },
    )
}

/// The state a new supervisor starts from (restarts and the last exit carry over).
fn initial_state(paths: &Paths, accel: Accel) -> QemuState {
    let prev: Option<QemuState> = paths.instance().read_state().ok().flatten();
    let restarts = match &prev {
        Some(p) if p.phase == Phase::Stopped => p.restarts,
        Some(p) => p.restarts + 1,
        None => 0,
    };
    QemuState {
        supervisor_pid: std::process::id() as i32,
        qemu_pid: None,
        phase: Phase::Starting,
        accel,
        restarts,
        started_at: None,
        last_exit: prev.and_then(|p| p.last_exit),
        last_error: None,
    }
}

/// Binds the console socket (replacing a stale one).
fn bind_console(p: &Path) -> Result<UnixListener, String> {
    let _ = std::fs::remove_file(p);
    let l = UnixListener::bind(p).map_err(|e| format!("bind {}: {e}", p.display()))?;
    l.set_nonblocking(true)
        .map_err(|e| format!("console socket: {e}"))?;
    Ok(l)
}

/// Puts each of `fds` at descriptor `first + i` in a forked child (close-on-exec cleared):
/// all are first copied above every target, so no move overwrites a source. Only
/// async-signal-safe calls, no allocation.
fn place_fds(fds: &[i32], first: i32) -> io::Result<()> {
    const HIGH: i32 = 64;
    if fds.len() > (HIGH - first) as usize {
        return Err(io::Error::other("too many descriptors for QEMU"));
    }
    let mut high = [0i32; 64];
    for (i, &fd) in fds.iter().enumerate() {
        // SAFETY: fcntl on a descriptor the child owns.
        high[i] = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, HIGH) };
        if high[i] < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    for (i, &h) in high[..fds.len()].iter().enumerate() {
        // SAFETY: dup2 onto a target below HIGH; the new descriptor has no close-on-exec.
        if unsafe { libc::dup2(h, first + i as i32) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Starts QEMU with `args`; its serial port and QMP channel are the other ends of
/// `serial` and `qmp`, and `taps` are its interfaces' taps (at [`TAP_FD_BASE`] on). With
/// `creds`, QEMU runs as that user.
fn spawn_qemu(
    args: &[String],
    serial: OwnedFd,
    qmp: OwnedFd,
    taps: Vec<OwnedFd>,
    creds: Option<super::runas::RunAs>,
) -> io::Result<Pid> {
    let mut fds: Vec<i32> = vec![serial.as_raw_fd(), qmp.as_raw_fd()];
    fds.extend(taps.iter().map(AsRawFd::as_raw_fd));
    let keep_below = (SERIAL_FD + fds.len() as i32) as u32;
    let mut cmd = Command::new(&args[0]);
    cmd.args(&args[1..]).stdin(Stdio::null());
    let parent = std::process::id() as i32;
    // SAFETY: runs in the forked child before exec; only async-signal-safe calls
    // (sigprocmask, setgroups, setgid, setuid, prctl, getppid, fcntl, dup2, close_range).
    unsafe {
        cmd.pre_exec(move || {
            SigSet::empty().thread_set_mask().map_err(io::Error::from)?;
            if let Some(c) = &creds {
                super::runas::drop_to(c)?;
            }
            // After the credentials change, which clears the parent-death signal.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(io::Error::other("the supervisor died"));
            }
            // Serial, QMP, then the taps: SERIAL_FD, SUPERVISOR_QMP_FD, TAP_FD_BASE…
            place_fds(&fds, SERIAL_FD)?;
            // Everything else the supervisor holds (lock, signalfd, sockets) stays out.
            libc::syscall(
                libc::SYS_close_range,
                keep_below,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop((serial, qmp, taps));
    Ok(Pid::from_raw(child.id() as i32))
}

impl Supervisor {
    fn new(cfg: QemuConfig, paths: Paths) -> Result<Self, String> {
        let state = initial_state(&paths, cfg.accel);
        let cg = join_cgroup(&cfg)?;
        crate::supervise::enter_netns(cfg.netns.as_deref())?;
        let console = bind_console(&paths.console_socket())?;
        let log = ConsoleLog::open(paths.console_log());
        Ok(Supervisor {
            cfg,
            paths,
            _cgroup: cg,
            state,
            run: None,
            console,
            clients: Clients::default(),
            log,
            boot_at: Instant::now(),
            restart: RestartTimer::default(),
            stop: None,
        })
    }

    fn save(&self) {
        if let Err(e) = self.paths.instance().write_state(&self.state) {
            log(&e.to_string());
        }
    }

    /// The socket directory, and with an unprivileged user the files QEMU opens by path,
    /// handed to that user (again at every boot: a restore may have replaced a file).
    fn hand_files_to_qemu(&self) -> Result<(), String> {
        let creds = self.cfg.run_as.as_ref();
        if let Some(dir) = self.cfg.sockets.qmp.parent() {
            super::runas::prepare_socket_dir(dir, creds)?;
        }
        let Some(creds) = creds else {
            return Ok(());
        };
        let files = self
            .cfg
            .disks
            .iter()
            .map(|d| d.path.as_path())
            .chain(self.cfg.cdroms.iter().map(|c| c.path.as_path()))
            .chain(self.cfg.nvram());
        super::runas::prepare_files(files, creds)?;
        log(&format!("QEMU runs as {} (uid {})", creds.user, creds.uid));
        Ok(())
    }

    /// Starts one QEMU and waits until its QMP channel says the guest runs.
    fn boot(&mut self) -> Result<(), String> {
        for s in [
            &self.cfg.sockets.qmp,
            &self.cfg.sockets.qga,
            &self.cfg.sockets.vnc,
        ] {
            let _ = std::fs::remove_file(s);
        }
        self.hand_files_to_qemu()?;
        let (serial, qemu_serial) =
            UnixStream::pair().map_err(|e| format!("serial socket pair: {e}"))?;
        let (qmp, qemu_qmp) = UnixStream::pair().map_err(|e| format!("QMP socket pair: {e}"))?;
        // Opened here, checked as this VM's: QEMU never makes a tap (see `crate::vm::tap`).
        let owner = crate::net::owner_alias(stead_schema::Kind::VirtualMachine, &self.cfg.name);
        let names: Vec<&str> = self.cfg.nics.iter().map(|n| n.tap.as_str()).collect();
        let taps = crate::vm::tap::open_all_owned(&names, &owner, true)?;
        let args = argv(&self.cfg);
        let creds = self.cfg.run_as.clone();
        let pid = spawn_qemu(&args, qemu_serial.into(), qemu_qmp.into(), taps, creds)
            .map_err(|e| format!("start {}: {e}", args[0]))?;
        log(&format!("boot, QEMU pid {pid}"));
        let _ = serial.set_nonblocking(true);
        self.run = Some(Run {
            pid,
            serial: Some(serial),
            qmp: None,
        });
        self.boot_at = Instant::now();
        self.restart.cancel();
        self.state.qemu_pid = Some(pid.as_raw());
        self.state.phase = Phase::Starting;
        self.save();
        let mut q = Qmp::handshake(qmp, START_TIMEOUT).map_err(|e| {
            format!(
                "QEMU did not answer QMP ({e}): {}",
                tail(&self.paths.vmm_log(), 3)
            )
        })?;
        q.set_timeout(QMP_TIMEOUT);
        let st = q.query_status().map_err(|e| format!("query-status: {e}"))?;
        if !boot_state_ok(st.status, self.cfg.incoming) {
            return Err(format!("QEMU reports {:?}, not running", st.status));
        }
        if let Some(r) = &mut self.run {
            r.qmp = Some(q);
        }
        self.state.phase = Phase::Running;
        self.state.started_at = Some(crate::supervise::now_rfc3339());
        self.save();
        Ok(())
    }

    /// Kills the current QEMU (after a failed boot) and reaps it.
    fn kill_run(&mut self) {
        if let Some(r) = self.run.take() {
            let _ = kill(r.pid, Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(r.pid, None);
        }
        self.state.qemu_pid = None;
    }

    /// Re-reads `config.json` for the restart policy and the shutdown timeout.
    fn reload_config(&mut self) {
        match read_json::<QemuConfig>(&self.paths.config()) {
            Ok(Some(c)) if c.name == self.cfg.name => {
                log(&format!(
                    "reload, restart policy {:?}, incoming {}",
                    c.restart_policy, c.incoming
                ));
                self.cfg.restart_policy = c.restart_policy;
                self.cfg.shutdown_timeout_secs = c.shutdown_timeout_secs;
                self.cfg.incoming = c.incoming;
            }
            Ok(_) => log("reload: no usable config"),
            Err(e) => log(&format!("reload: {e}")),
        }
    }

    /// Runs one QMP command on the supervisor's channel, logging a failure.
    fn qmp<C: super::qmp::QmpCommand>(&mut self, cmd: &C) -> bool {
        let Some(q) = self.run.as_mut().and_then(|r| r.qmp.as_mut()) else {
            return false;
        };
        match q.execute(cmd) {
            Ok(_) => true,
            Err(e) => {
                log(&format!("QMP {}: {e}", C::NAME));
                false
            }
        }
    }

    /// Asks the guest agent to power the guest off (synced first; no reply comes on
    /// success). Bounded by [`QMP_TIMEOUT`] for the sync and one second for a refusal.
    fn agent_shutdown(&self) -> bool {
        let r = super::qga::Qga::connect(&self.cfg.sockets.qga, QMP_TIMEOUT).and_then(|mut a| {
            a.shutdown(super::qga::ShutdownMode::Powerdown, Duration::from_secs(1))
        });
        if let Err(e) = &r {
            log(&format!("guest agent shutdown: {e}"));
        }
        r.is_ok()
    }

    /// Begins a graceful stop: the ACPI power button.
    fn begin_stop(&mut self) {
        if self.stop.is_some() {
            return;
        }
        self.restart.cancel();
        if self.migrated_away() {
            log("stop requested: the guest migrated away, quit");
            self.qmp(&Quit);
            self.stop = Some((StopStep::Quit, Instant::now() + QUIT_GRACE));
            return;
        }
        log("stop requested: ACPI power button");
        let deadline = Instant::now() + Duration::from_secs(self.cfg.shutdown_timeout_secs);
        self.stop = Some((StopStep::Powerdown, deadline));
        if !self.qmp(&SystemPowerdown) {
            self.stop = Some((StopStep::Powerdown, Instant::now()));
        }
    }

    /// Whether this QEMU handed its guest to a migration target (run state
    /// `postmigrate`): nothing is left to shut down gracefully.
    fn migrated_away(&mut self) -> bool {
        let Some(q) = self.run.as_mut().and_then(|r| r.qmp.as_mut()) else {
            return false;
        };
        matches!(q.query_status(), Ok(st) if st.status == QmpRunState::Postmigrate)
    }

    /// The next step of a stop whose deadline passed.
    fn escalate_stop(&mut self) {
        let Some((step, deadline)) = self.stop else {
            return;
        };
        if self.run.is_none() || Instant::now() < deadline {
            return;
        }
        let now = Instant::now();
        let next = match step {
            StopStep::Powerdown if self.cfg.agent && self.agent_shutdown() => {
                log("ACPI shutdown timed out: guest agent shutdown");
                (StopStep::Agent, now + AGENT_GRACE)
            }
            StopStep::Powerdown | StopStep::Agent => {
                log("shutdown timed out: quit");
                self.qmp(&Quit);
                (StopStep::Quit, now + QUIT_GRACE)
            }
            StopStep::Quit | StopStep::Killed => {
                log("quit timed out: SIGKILL");
                if let Some(r) = &self.run {
                    let _ = kill(r.pid, Signal::SIGKILL);
                }
                (StopStep::Killed, now + QUIT_GRACE)
            }
        };
        self.stop = Some(next);
    }

    fn stopped(&mut self) -> i32 {
        self.state.phase = Phase::Stopped;
        self.state.qemu_pid = None;
        self.save();
        log("stopped");
        0
    }

    /// QEMU ended: record it, then stop, end or schedule a restart.
    fn qemu_ended(&mut self, exit: Exit) -> Option<i32> {
        if let Some(mut r) = self.run.take()
            && let Some(s) = r.serial.take()
        {
            self.drain_serial(&s);
        }
        self.state.qemu_pid = None;
        let how = describe(exit);
        log(&format!("QEMU ended: {how}"));
        self.state.last_exit = Some(how);
        if self.stop.is_some() {
            return Some(self.stopped());
        }
        let failed = exit != Exit::Code(0);
        if !may_restart(self.cfg.incoming)
            || !restart_wanted(self.cfg.restart_policy, failed, false)
        {
            self.state.phase = Phase::Exited;
            self.save();
            return Some(0);
        }
        self.restart.after_run(self.boot_at);
        self.note_restart();
        None
    }

    fn note_restart(&mut self) {
        self.state.restarts += 1;
        self.state.phase = Phase::Restarting;
        self.save();
    }

    /// Boots again once the restart backoff passed.
    fn restart_when_due(&mut self) {
        if self.restart.take_due(Instant::now())
            && let Err(e) = self.boot()
        {
            log(&format!("restart failed: {e}"));
            self.kill_run();
            self.state.last_error = Some(e);
            self.restart.retry();
            self.note_restart();
        }
    }

    /// Copies what the serial port has to the log and the console clients.
    fn drain_serial(&mut self, mut s: &UnixStream) -> bool {
        let mut buf = [0u8; 8192];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return false,
                Ok(n) => {
                    self.log.write(&buf[..n]);
                    self.clients.broadcast(&buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }

    /// Accepts console clients, replaying the end of the log to each.
    fn accept_clients(&mut self) {
        while let Ok((mut c, _)) = self.console.accept() {
            if let Ok(mut f) = File::open(self.paths.console_log()) {
                let len = f.metadata().map_or(0, |m| m.len());
                let mut old = Vec::new();
                if f.seek(SeekFrom::Start(len.saturating_sub(REPLAY))).is_ok()
                    && f.read_to_end(&mut old).is_ok()
                {
                    let _ = c.write_all(&old);
                }
            }
            self.clients.add(c);
        }
    }

    /// Drains queued QMP events of the supervisor's channel (logging the notable ones).
    fn pump_events(&mut self) {
        let Some(q) = self.run.as_mut().and_then(|r| r.qmp.as_mut()) else {
            return;
        };
        match q.events() {
            Ok(evs) => {
                for ev in evs {
                    if matches!(
                        ev.event.as_str(),
                        "SHUTDOWN" | "RESET" | "POWERDOWN" | "GUEST_PANICKED"
                    ) {
                        log(&format!("event {} {}", ev.event, ev.data));
                    }
                }
            }
            Err(e) => {
                log(&format!("QMP channel: {e}"));
                if let Some(r) = &mut self.run {
                    r.qmp = None;
                }
            }
        }
    }
}

impl Workload for Supervisor {
    type State = QemuState;

    fn start(&mut self) -> Result<(), String> {
        self.boot()?;
        crate::supervise::release_free_heap();
        Ok(())
    }

    fn start_failed(&mut self, error: &str) {
        log(error);
        self.kill_run();
        self.state.last_error = Some(error.to_string());
        self.state.phase = Phase::Exited;
    }

    fn state(&self) -> &QemuState {
        &self.state
    }

    fn pid(&self) -> Option<Pid> {
        self.run.as_ref().map(|r| r.pid)
    }

    fn run_ended(&mut self, exit: Exit) -> Option<i32> {
        self.qemu_ended(exit)
    }

    fn fence_file(&self) -> Option<&std::path::Path> {
        self.cfg.fence_file.as_deref()
    }

    /// QEMU is the whole VM: it was SIGKILLed; reap it and end as `fenced`.
    fn fenced(&mut self, _killed_at: Duration) -> Option<i32> {
        log("fence deadline passed: QEMU killed");
        self.kill_run();
        self.restart.cancel();
        self.state.phase = Phase::Fenced;
        self.save();
        Some(0)
    }

    fn request_stop(&mut self) {
        if self.run.is_none() {
            self.stop = Some((StopStep::Quit, Instant::now()));
            return;
        }
        self.begin_stop();
    }

    fn reload(&mut self) {
        self.reload_config();
    }

    fn fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut v = vec![self.console.as_fd()];
        if let Some(s) = self.run.as_ref().and_then(|r| r.serial.as_ref()) {
            v.push(s.as_fd());
        }
        v.extend(self.clients.fds());
        v
    }

    fn on_ready(&mut self, ready: &[bool]) {
        if ready.first().copied().unwrap_or(false) {
            self.accept_clients();
        }
        let has_serial = self.run.as_ref().is_some_and(|r| r.serial.is_some());
        let mut rest = &ready[1.min(ready.len())..];
        if has_serial {
            if rest.first().copied().unwrap_or(false)
                && let Some(s) = self.run.as_mut().and_then(|r| r.serial.take())
                && self.drain_serial(&s)
                && let Some(r) = &mut self.run
            {
                r.serial = Some(s);
            }
            rest = &rest[1.min(rest.len())..];
        }
        if let Some(mut s) = self.run.as_ref().and_then(|r| r.serial.as_ref()) {
            self.clients.relay_input(rest, &mut s);
        } else {
            self.clients.relay_input(rest, &mut io::sink());
        }
    }

    fn next_wakeup(&self) -> Option<Instant> {
        let mut at = Instant::now() + TICK;
        if let Some(t) = self.restart.at() {
            at = at.min(t);
        }
        if let Some((_, t)) = self.stop {
            at = at.min(t);
        }
        Some(at)
    }

    fn on_timers(&mut self) -> Option<i32> {
        self.pump_events();
        if self.stop.is_some() {
            if self.run.is_none() {
                return Some(self.stopped());
            }
            self.escalate_stop();
            return None;
        }
        self.restart_when_due();
        None
    }
}

/// How QEMU ended, in words.
/// Whether QEMU's run state right after its start is the expected one: running, or
/// waiting for a migration when started as a migration target.
fn boot_state_ok(state: QmpRunState, incoming: bool) -> bool {
    state == QmpRunState::Running || (incoming && state == QmpRunState::Inmigrate)
}

/// Whether an ended QEMU may be restarted: never a migration target (a fresh boot would
/// run a second copy of the guest the source still runs, or ran until it was handed over).
fn may_restart(incoming: bool) -> bool {
    !incoming
}

fn describe(exit: Exit) -> String {
    match exit {
        Exit::Code(0) => "shutdown".into(),
        Exit::Code(c) => format!("exit code {c}"),
        Exit::Signal(s) => format!("signal {s}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_migration_target_waits_in_inmigrate_and_is_never_restarted() {
        assert!(boot_state_ok(QmpRunState::Running, false));
        assert!(!boot_state_ok(QmpRunState::Inmigrate, false));
        assert!(boot_state_ok(QmpRunState::Inmigrate, true));
        assert!(!boot_state_ok(QmpRunState::Paused, true));
        assert!(may_restart(false) && !may_restart(true));
    }

    #[test]
    fn exit_descriptions_and_overhead() {
        assert_eq!(describe(Exit::Code(0)), "shutdown");
        assert_eq!(describe(Exit::Code(1)), "exit code 1");
        assert_eq!(describe(Exit::Signal(9)), "signal 9");
        assert!(memory_overhead(Accel::Tcg) > memory_overhead(Accel::Kvm));
    }

    #[test]
    fn state_round_trips() {
        let s = QemuState {
            supervisor_pid: 1,
            qemu_pid: Some(2),
            phase: Phase::Running,
            accel: Accel::Tcg,
            restarts: 3,
            started_at: None,
            last_exit: Some("signal 9".into()),
            last_error: None,
        };
        let j = serde_json::to_string(&s).expect("json");
        assert!(
            j.contains("\"qemuPid\":2") && j.contains("\"accel\":\"tcg\""),
            "{j}"
        );
        assert_eq!(serde_json::from_str::<QemuState>(&j).expect("parse"), s);
    }
}
