//! `stead shim`: the per-container supervisor.
//!
//! One single-threaded process per running container. It is started by the driver as
//! `<self_exe> shim --run-dir DIR --name NAME --config FILE`; [`main`] forks twice (the
//! middle process calls `setsid`) so the supervisor survives the CLI and the controller,
//! and the first process exits with 0 once init has been exec'd (or 1 with the error on
//! stderr). The supervisor then:
//! - holds an exclusive `flock` on `shim.lock` (never two shims for one container);
//! - kills whatever a dead predecessor left in the cgroup, creates the cgroup, sets limits;
//! - starts init ([`super::process::start_init`]) on a pty, appends the pty's output to a
//!   size-capped `console.log` (when it passes [`LOG_CAP`] the oldest half is dropped);
//! - reaps init and applies the restart policy with exponential backoff (100 ms doubling
//!   up to 10 s, reset after 10 s of uptime); a reboot request from inside (init killed by
//!   SIGHUP in its pid namespace) restarts whatever the policy;
//! - serves `control.sock` (one JSON request per line, one JSON reply): `status`, `stop`,
//!   `signal`, `update` (hot limits / restart policy), `exec` (stdio passed as
//!   `SCM_RIGHTS`, reply carries the exit code), `console` (raw byte stream both ways);
//! - writes `state.json` atomically on every change;
//! - on stop: the stop signal to init (see [`ContainerConfig::stop_signal`]), SIGKILL after
//!   the timeout, cgroup emptied and removed, state `stopped`, exit. SIGTERM to the shim
//!   means the same.
//!
//! The process around it (lock, signals, readiness report, event loop) is the shared
//! supervisor ([`crate::supervise::serve`]); this file is the container's
//! [`crate::supervise::Workload`].

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use stead_host::cgroup::{Cgroup, Hierarchy, Limits};
use stead_reconciler::driver::DriverError;
use stead_schema::RestartPolicy;

use super::config::{ContainerConfig, ExitInfo, Paths, Phase, ShimState, write_json};
use super::control::{Request, recv_request};
use super::{network, process};
use crate::supervise::console::{Clients, ConsoleLog};
use crate::supervise::workload::{Exit, RestartTimer, Workload, restart_wanted};

pub use crate::supervise::console::LOG_CAP;

/// Arguments of `stead shim` (`--run-dir D --name N --config F`).
pub type ShimArgs = crate::supervise::SupervisorArgs;

/// Entry point of `stead shim`. Must be called from a single-threaded process before any
/// thread or async runtime exists. Returns the exit code of the launching process; the
/// supervisor itself never returns (it exits the process).
pub fn main(args: &ShimArgs) -> i32 {
    let paths = Paths::new(&args.run_dir, &args.name);
    crate::supervise::run::<ContainerConfig>(
        "stead shim",
        "supervisor exited before starting the container",
        args,
        &paths.dir.clone(),
        |c| &c.name,
        |cfg, ready_w| daemon(cfg, args.config.clone(), paths, ready_w),
    )
}

/// Whether a live shim holds the lock of `paths` (used by observe).
pub fn lock_held(paths: &Paths) -> bool {
    paths.instance().lock_held()
}

fn daemon(cfg: ContainerConfig, cfg_path: PathBuf, paths: Paths, ready: OwnedFd) -> i32 {
    let instance = paths.instance();
    crate::supervise::serve(&instance, ready, || {
        let dir = paths.dir.clone();
        Shim::new(cfg, cfg_path, paths).map_err(|e| {
            let _ = super::volume::unmount_all(&dir);
            e.to_string()
        })
    })
}

struct Shim {
    cfg: ContainerConfig,
    cfg_path: PathBuf,
    paths: Paths,
    cgroup: Cgroup,
    /// Volume mounts as the container sees them (disk images via their staging mounts).
    mounts: Vec<super::config::MountConfig>,
    state: ShimState,
    init: Option<Pid>,
    master: File,
    slave: OwnedFd,
    slave_path: PathBuf,
    log: ConsoleLog,
    listener: UnixListener,
    consoles: Clients,
    execs: HashMap<Pid, UnixStream>,
    stop_waiters: Vec<UnixStream>,
    stop_deadline: Option<Instant>,
    stop_requested: bool,
    /// The fence deadline passed: ends as [`Phase::Fenced`].
    fenced: bool,
    restart: RestartTimer,
    started: Instant,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Reply {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<ShimState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exit_code: Option<i32>,
}

impl Reply {
    fn ok() -> Self {
        Reply {
            ok: true,
            error: None,
            state: None,
            exit_code: None,
        }
    }
    fn err(e: impl ToString) -> Self {
        Reply {
            ok: false,
            error: Some(e.to_string()),
            state: None,
            exit_code: None,
        }
    }
}

fn send_reply(s: &mut UnixStream, r: &Reply) {
    let mut line = serde_json::to_vec(r).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    line.push(b'\n');
    let _ = s.set_nonblocking(false);
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    let _ = s.write_all(&line);
}

fn set_cloexec_nonblock(fd: &impl AsFd, nonblock: bool) -> Result<(), DriverError> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(|e| DriverError::io("fcntl cloexec", e.into()))?;
    if nonblock {
        let fl = OFlag::from_bits_truncate(
            fcntl(fd, FcntlArg::F_GETFL).map_err(|e| DriverError::io("fcntl", e.into()))?,
        );
        fcntl(fd, FcntlArg::F_SETFL(fl | OFlag::O_NONBLOCK))
            .map_err(|e| DriverError::io("fcntl nonblock", e.into()))?;
    }
    Ok(())
}

/// The host side of a container start: its cgroup (created, limited, device-restricted),
/// the rootfs image and volume images mounted. Returns the volume mounts as the container
/// sees them.
fn prepare_host(
    cfg: &ContainerConfig,
    paths: &Paths,
    cgroup: &Cgroup,
) -> Result<Vec<super::config::MountConfig>, DriverError> {
    cgroup.create()?;
    cgroup.set_limits(&cfg.limits)?;
    cgroup.restrict_devices(&super::CONTAINER_DEVICES, &super::BpfDeviceProgram)?;
    if let super::config::RootfsMount::Image { source, target } = &cfg.rootfs {
        super::volume::mount_image(source, target, false, cfg.idmap, false)?;
    }
    super::volume::mount_images(&paths.dir, &cfg.mounts, cfg.idmap)
}

/// The console pty (master non-blocking) and the path of its slave.
fn open_console_pty() -> Result<(nix::pty::OpenptyResult, PathBuf), DriverError> {
    let pty = nix::pty::openpty(None, None).map_err(|e| DriverError::io("openpty", e.into()))?;
    set_cloexec_nonblock(&pty.master, true)?;
    set_cloexec_nonblock(&pty.slave, false)?;
    let slave_path = nix::unistd::ttyname(pty.slave.as_fd())
        .map_err(|e| DriverError::io("ttyname", e.into()))?;
    Ok((pty, slave_path))
}

/// Binds the control socket (replacing a dead predecessor's), non-blocking.
fn bind_control(paths: &Paths) -> Result<UnixListener, DriverError> {
    let sock = paths.socket();
    let _ = fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock)
        .map_err(|e| DriverError::io(format!("bind {}", sock.display()), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| DriverError::io("nonblocking listener", e))?;
    Ok(listener)
}

impl Shim {
    fn new(cfg: ContainerConfig, cfg_path: PathBuf, paths: Paths) -> Result<Self, DriverError> {
        let hier = Hierarchy::detect()?;
        let cgroup = hier.cgroup(&cfg.cgroup_parent, &cfg.name);
        // Leftovers of a supervisor that died: kill them first (no duplicate container).
        cgroup.kill_all()?;
        let made = Self::with_cgroup(cfg, cfg_path, paths, cgroup.clone());
        if made.is_err()
            && let Err(e) = cgroup.destroy()
        {
            tracing::warn!(error = %e, "cgroup cleanup after a failed start");
        }
        made
    }

    /// The rest of [`Shim::new`], once the cgroup is known: what fails here leaves the
    /// cgroup to the caller to remove.
    fn with_cgroup(
        cfg: ContainerConfig,
        cfg_path: PathBuf,
        paths: Paths,
        cgroup: Cgroup,
    ) -> Result<Self, DriverError> {
        let mounts = prepare_host(&cfg, &paths, &cgroup)?;
        let (pty, slave_path) = open_console_pty()?;
        let listener = bind_control(&paths)?;
        let log = ConsoleLog::open(paths.console_log());
        Ok(Shim {
            state: ShimState {
                phase: Phase::Running,
                shim_pid: std::process::id() as i32,
                init_pid: None,
                restarts: 0,
                started_at: None,
                last_exit: None,
                last_error: None,
                start_micros: None,
                fenced_at_boot_ns: None,
            },
            cfg,
            cfg_path,
            paths,
            cgroup,
            mounts,
            init: None,
            master: File::from(pty.master),
            slave: pty.slave,
            slave_path,
            log,
            listener,
            consoles: Clients::default(),
            execs: HashMap::new(),
            stop_waiters: Vec::new(),
            stop_deadline: None,
            stop_requested: false,
            fenced: false,
            restart: RestartTimer::default(),
            started: Instant::now(),
        })
    }

    fn save(&self) {
        if let Err(e) = self.paths.instance().write_state(&self.state) {
            tracing::warn!(error = %e, "write state");
        }
    }

    /// Starts init (one run of the container).
    fn start_init(&mut self) -> Result<(), DriverError> {
        let t = Instant::now();
        let mut run_cfg = self.cfg.clone();
        run_cfg.mounts = self.mounts.clone();
        let pid =
            process::start_init(&run_cfg, &self.cgroup, self.slave.as_fd(), &self.slave_path)?;
        tracing::info!(pid = pid.as_raw(), container = %self.cfg.name, "init started");
        self.init = Some(pid);
        self.started = Instant::now();
        self.state.phase = Phase::Running;
        self.state.init_pid = Some(pid.as_raw());
        self.state.started_at = Some(crate::supervise::now_rfc3339());
        self.state.last_error = None;
        self.state.start_micros = Some(t.elapsed().as_micros() as u64);
        self.save();
        Ok(())
    }

    fn on_init_exit(&mut self, code: Option<i32>, signal: Option<i32>) -> Option<i32> {
        let exit = ExitInfo {
            code,
            signal,
            at: crate::supervise::now_rfc3339(),
        };
        tracing::info!(?code, ?signal, container = %self.cfg.name, "init exited");
        self.init = None;
        self.state.init_pid = None;
        let reboot = signal == Some(Signal::SIGHUP as i32);
        let restart =
            !self.stop_requested && restart_wanted(self.cfg.restart_policy, exit.failed(), reboot);
        self.state.last_exit = Some(exit);
        if self.fenced {
            return Some(self.finish(Phase::Fenced));
        }
        if self.stop_requested {
            return Some(self.finish(Phase::Stopped));
        }
        if !restart {
            return Some(self.finish(Phase::Exited));
        }
        // Leftovers (e.g. processes that escaped into the cgroup) go before the restart.
        let _ = self.cgroup.kill_all();
        self.restart.after_run(self.started);
        self.state.phase = Phase::Restarting;
        self.save();
        None
    }

    /// Kills init after the stop timeout; restarts it after the backoff.
    fn fire_timers(&mut self) -> Option<i32> {
        let now = Instant::now();
        if let Some(t) = self.stop_deadline
            && now >= t
        {
            tracing::warn!(container = %self.cfg.name, "stop timeout: SIGKILL");
            self.stop_deadline = None;
            match self.init {
                Some(p) => {
                    let _ = kill(p, Signal::SIGKILL);
                    let _ = self.cgroup.kill_all();
                }
                // Stop requested between restarts: nothing to wait for.
                None if self.stop_requested => return Some(self.finish(Phase::Stopped)),
                None => {}
            }
        }
        if self.restart.take_due(now) {
            self.state.restarts += 1;
            if let Err(e) = self.start_init() {
                tracing::error!(error = %e, container = %self.cfg.name, "restart failed");
                self.state.last_error = Some(e.to_string());
                self.restart.retry();
                self.state.phase = Phase::Restarting;
                self.save();
            }
        }
        None
    }

    /// Stops init gracefully: its stop signal, SIGKILL after `timeout` seconds (default:
    /// the config's).
    fn stop_within(&mut self, timeout: Option<u64>) {
        self.stop_requested = true;
        self.restart.cancel();
        match self.init {
            None => {
                // Between restarts: nothing to signal; finish on the next timer tick.
                self.stop_deadline = Some(Instant::now());
            }
            Some(p) => {
                if self.state.phase != Phase::Stopping {
                    let signal = self.cfg.stop_signal();
                    if acts_on(p, signal) {
                        let _ = kill(p, signal);
                    } else {
                        tracing::debug!(
                            container = %self.cfg.name,
                            %signal,
                            "init has no handler for the stop signal (dropped for a PID 1): SIGKILL now"
                        );
                        let _ = kill(p, Signal::SIGKILL);
                        let _ = self.cgroup.kill_all();
                    }
                    // Also the bound of an immediate kill that somehow did not end init.
                    let secs = timeout.unwrap_or(self.cfg.stop_timeout_secs);
                    self.stop_deadline = Some(Instant::now() + Duration::from_secs(secs));
                    self.state.phase = Phase::Stopping;
                    self.save();
                }
            }
        }
    }

    /// Cleans up and returns the exit code of the supervisor.
    fn finish(&mut self, phase: Phase) -> i32 {
        if let Err(e) = self.cgroup.destroy() {
            tracing::warn!(error = %e, "cgroup cleanup");
        }
        if let Err(e) = network::detach(&self.cfg) {
            tracing::warn!(error = %e, "veth cleanup");
        }
        if let Err(e) = super::volume::unmount_all(&self.paths.dir) {
            tracing::warn!(error = %e, "volume cleanup");
        }
        self.state.phase = phase;
        self.state.init_pid = None;
        self.save();
        let _ = fs::remove_file(self.paths.socket());
        for mut w in std::mem::take(&mut self.stop_waiters) {
            let mut r = Reply::ok();
            r.state = Some(self.state.clone());
            send_reply(&mut w, &r);
        }
        0
    }

    fn on_accept(&mut self) {
        while let Ok((conn, _)) = self.listener.accept() {
            let _ = conn.set_nonblocking(false);
            let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
            self.handle(conn);
        }
    }

    fn handle(&mut self, mut conn: UnixStream) {
        let (req, fds) = match recv_request(&conn) {
            Ok(r) => r,
            Err(e) => {
                send_reply(&mut conn, &Reply::err(e));
                return;
            }
        };
        match req {
            Request::Status => {
                let mut r = Reply::ok();
                r.state = Some(self.state.clone());
                send_reply(&mut conn, &r);
            }
            Request::Stop { timeout_secs } => {
                self.stop_waiters.push(conn);
                self.stop_within(timeout_secs);
            }
            Request::Signal { signal } => {
                let r = self.signal_init(signal);
                send_reply(&mut conn, &r);
            }
            Request::Update {
                limits,
                restart_policy,
                desired,
            } => {
                let r = match self.update(limits, restart_policy, desired) {
                    Ok(()) => Reply::ok(),
                    Err(e) => Reply::err(e),
                };
                send_reply(&mut conn, &r);
            }
            Request::Exec { args, env } => self.start_exec(conn, &args, &env, fds),
            Request::Console => {
                send_reply(&mut conn, &Reply::ok());
                self.consoles.add(conn);
            }
        }
    }

    /// `signal`: sends signal number `signal` to init.
    fn signal_init(&self, signal: i32) -> Reply {
        match (self.init, Signal::try_from(signal)) {
            (Some(p), Ok(s)) => match kill(p, s) {
                Ok(()) => Reply::ok(),
                Err(e) => Reply::err(e),
            },
            (None, _) => Reply::err("container is not running"),
            (_, Err(e)) => Reply::err(e),
        }
    }

    /// `exec`: runs `args` in the container with the client's stdio `fds`; the client
    /// gets its reply (the exit code) when the command ends ([`Workload::child_ended`]).
    fn start_exec(
        &mut self,
        mut conn: UnixStream,
        args: &[String],
        env: &std::collections::BTreeMap<String, String>,
        fds: Vec<OwnedFd>,
    ) {
        let Some(init) = self.init else {
            send_reply(&mut conn, &Reply::err("container is not running"));
            return;
        };
        if fds.len() != 3 {
            let e = format!(
                "exec needs 3 fds (stdin, stdout, stderr), got {}",
                fds.len()
            );
            send_reply(&mut conn, &Reply::err(e));
            return;
        }
        match process::spawn_exec(&self.cfg, &self.cgroup, init, args, env, &fds) {
            Ok(pid) => {
                drop(fds);
                self.execs.insert(pid, conn);
            }
            Err(e) => send_reply(&mut conn, &Reply::err(e)),
        }
    }

    fn update(
        &mut self,
        limits: Limits,
        restart_policy: RestartPolicy,
        desired: Option<serde_json::Value>,
    ) -> Result<(), DriverError> {
        self.cgroup.set_limits(&limits)?;
        self.cfg.limits = limits;
        self.cfg.restart_policy = restart_policy;
        if let Some(d) = desired {
            self.cfg.stop_timeout_secs = stop_timeout_in(&d);
            self.cfg.desired = d;
        }
        write_json(&self.cfg_path, &self.cfg)
    }

    fn on_console_output(&mut self) {
        let mut buf = [0u8; 8192];
        loop {
            match self.master.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    self.log.write(&buf[..n]);
                    self.consoles.broadcast(&buf[..n]);
                }
                Err(_) => break,
            }
        }
    }
}

impl Workload for Shim {
    type State = ShimState;

    fn start(&mut self) -> Result<(), String> {
        self.start_init().map_err(|e| e.to_string())
    }

    fn start_failed(&mut self, error: &str) {
        self.state.last_error = Some(error.to_string());
        self.finish(Phase::Exited);
    }

    fn state(&self) -> &ShimState {
        &self.state
    }

    fn pid(&self) -> Option<Pid> {
        self.init
    }

    fn run_ended(&mut self, exit: Exit) -> Option<i32> {
        match exit {
            Exit::Code(c) => self.on_init_exit(Some(c), None),
            Exit::Signal(s) => self.on_init_exit(None, Some(s)),
        }
    }

    /// A command run by `exec` ended: its client gets the exit code.
    fn child_ended(&mut self, pid: Pid, exit: Exit) {
        if let Some(mut conn) = self.execs.remove(&pid) {
            let mut r = Reply::ok();
            r.exit_code = Some(exit.shell_code());
            send_reply(&mut conn, &r);
        }
    }

    fn request_stop(&mut self) {
        self.stop_within(None);
    }

    /// The control socket, the console pty, the attached console clients.
    fn fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds = vec![self.listener.as_fd(), self.master.as_fd()];
        fds.extend(self.consoles.fds());
        fds
    }

    fn on_ready(&mut self, ready: &[bool]) {
        if ready.first() == Some(&true) {
            self.on_accept();
        }
        if ready.get(1) == Some(&true) {
            self.on_console_output();
        }
        self.consoles
            .relay_input(ready.get(2..).unwrap_or_default(), &mut self.master);
    }

    fn next_wakeup(&self) -> Option<Instant> {
        [self.restart.at(), self.stop_deadline]
            .into_iter()
            .flatten()
            .min()
    }

    fn on_timers(&mut self) -> Option<i32> {
        self.fire_timers()
    }

    fn fence_file(&self) -> Option<&std::path::Path> {
        self.cfg.fence_file.as_deref()
    }

    /// SIGKILL to everything in the cgroup; the shim ends as `fenced` once init is reaped.
    fn fenced(&mut self, killed_at: Duration) -> Option<i32> {
        self.stop_requested = true;
        self.fenced = true;
        self.state.fenced_at_boot_ns = u64::try_from(killed_at.as_nanos()).ok();
        self.restart.cancel();
        self.stop_deadline = None;
        if let Some(p) = self.init {
            let _ = kill(p, Signal::SIGKILL);
        }
        let _ = self.cgroup.kill_all();
        match self.init {
            Some(_) => {
                self.state.phase = Phase::Stopping;
                self.save();
                None
            }
            None => Some(self.finish(Phase::Fenced)),
        }
    }
}

/// The `stopTimeout` of a desired-state projection in seconds (default when unset).
fn stop_timeout_in(desired: &serde_json::Value) -> u64 {
    desired
        .get("stopTimeout")
        .and_then(serde_json::Value::as_str)
        .and_then(|t| t.parse::<stead_schema::DurationSpec>().ok())
        .map_or(super::config::DEFAULT_STOP_TIMEOUT_SECS, |d| d.0.as_secs())
}

/// Whether init `pid` (PID 1 of its own pid namespace) would act on `signal`. The kernel
/// drops a signal sent from outside to such an init unless it has a handler for it, so
/// only a caught signal counts. When the masks cannot be read, the signal is sent and the
/// timeout waited, as before.
fn acts_on(pid: Pid, signal: Signal) -> bool {
    match stead_host::procfs::ProcFs::host().signal_masks(pid) {
        Ok(m) => m.catches(signal as i32),
        Err(e) => {
            tracing::debug!(%pid, error = %e, "cannot read the signal masks of init");
            true
        }
    }
}
