//! `stead-vmm`: stead's small KVM virtual machine monitor.
//!
//! One VM per process in production (`run_vmm_process`), or in-process through
//! [`Vm::new`] / [`Vm::run`] (tests, benchmarks). The VMM uses the in-kernel irqchip
//! and PIT, a 16550 serial port on 0x3f8 (IRQ 4), a minimal i8042 (reset and
//! Ctrl-Alt-Del injection), and virtio-mmio (v2) block and net devices. Each vCPU
//! runs on its own thread; virtio queues are served by one device thread driven by
//! ioeventfds, interrupts go through irqfds. No async runtime.
//!
//! Guest-visible layout and the tiny-guest ABI are documented in `README.md`.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod acpi;
mod arch;
mod control;
mod devices;
mod jail;
mod mptable;
mod protocol;
mod seccomp;
mod state_file;
mod tap;
mod vcpu;
mod virtio;

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::os::fd::{BorrowedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_mp_state, kvm_pit_config};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use state_file::{StateFile, StateSockets};

pub use arch::{MAX_VCPUS, TINY_LOAD_ADDR, VIRTIO_GSI_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
pub use control::{
    CLIENT_IDLE_TIMEOUT, ControlClient, MAX_CLIENTS, execute, handle_command, run_vmm_process,
    serve_console, serve_control,
};
pub use devices::{FORBIDDEN_SYSCALL_PORT, POWER_PORT};
pub use jail::{VMM_ID_BASE, vmm_id};
pub use protocol::{
    LineBuffer, LineTooLong, MAX_REPLY_LINE, MAX_REQUEST_LINE, Reply, Request, StatusReply,
    parse_request, read_reply_line,
};
pub use tap::Tap;
#[doc(hidden)]
pub use virtio::fuzzing as virtio_fuzzing;

/// Path of the tiny test guest built from `guests/` by this crate's build script.
pub const TINY_GUEST_IMAGE: &str = env!("STEAD_TINY_GUEST");

/// The same tiny guest as an ELF with a PVH entry note (boots on the ELF/PVH path,
/// and in QEMU with `-kernel`).
pub const TINY_GUEST_PVH_IMAGE: &str = env!("STEAD_TINY_GUEST_PVH");

/// The tiny guest (flat image, as at [`TINY_GUEST_IMAGE`]) embedded in the binary, so
/// `stead vmm --write-demo-guest PATH` can hand it out as a demo kernel. Boot it with the
/// command line `mode=idle` (banner, serial echo, Ctrl-Alt-Del reboots, no CPU while idle).
pub static TINY_GUEST_BYTES: &[u8] = include_bytes!(env!("STEAD_TINY_GUEST"));

/// A virtio-blk disk backed by a raw file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Raw image file.
    pub path: PathBuf,
    /// Read-only: advertises `VIRTIO_BLK_F_RO`, writes fail with `VIRTIO_BLK_S_IOERR`.
    pub read_only: bool,
}

/// Where a virtio-net device gets its tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapSource {
    /// Attach to the existing persistent tap interface with this name ([`Tap::attach`]:
    /// the VMM never creates one).
    Name(String),
    /// Use an already open tap file descriptor (duplicated; the caller keeps its copy).
    /// It must have been opened with `IFF_TAP | IFF_NO_PI` and no `IFF_VNET_HDR`.
    Fd(RawFd),
}

/// A virtio-net device on a tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The tap.
    pub tap: TapSource,
    /// Guest MAC address.
    pub mac: [u8; 6],
}

/// Everything needed to build a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Number of vCPUs, 1..=[`MAX_VCPUS`].
    pub vcpus: u8,
    /// Guest RAM in bytes (at least 16 MiB).
    pub mem_bytes: u64,
    /// ELF (entered through PVH when it has a XEN_ELFNOTE_PHYS32_ENTRY note, else
    /// through the Linux 64-bit boot protocol), bzImage (64-bit boot protocol), or
    /// (anything else) a flat 64-bit tiny-guest image loaded at [`TINY_LOAD_ADDR`] and
    /// entered on every vCPU.
    pub kernel: PathBuf,
    /// Optional initrd (Linux only).
    pub initrd: Option<PathBuf>,
    /// Kernel command line. For Linux, `virtio_mmio.device=` entries for each virtio
    /// device are appended.
    pub cmdline: String,
    /// virtio-blk disks, in order (first disk at [`VIRTIO_MMIO_BASE`]).
    pub disks: Vec<DiskConfig>,
    /// virtio-net devices, after the disks.
    pub nets: Vec<NetConfig>,
    /// Append serial output to this file.
    pub serial_log: Option<PathBuf>,
    /// Unix stream control socket (used by [`run_vmm_process`]; default
    /// `<run_dir>/control.sock`).
    pub control_socket: Option<PathBuf>,
    /// Unix stream serial console socket (used by [`run_vmm_process`]; default
    /// `<run_dir>/console.sock`): a client gets the buffered and then live serial
    /// output, and what it sends becomes serial input.
    pub console_socket: Option<PathBuf>,
    /// Directory for `state.json` (used by [`run_vmm_process`]).
    pub run_dir: Option<PathBuf>,
    /// Install seccomp filters on the VMM threads once the VM is set up.
    pub seccomp: bool,
    /// How long a graceful shutdown waits for the guest before forcing it off.
    pub shutdown_timeout: Duration,
    /// Test only: a guest write to [`FORBIDDEN_SYSCALL_PORT`] makes the vCPU thread
    /// call a syscall the seccomp filter forbids.
    pub test_forbidden_syscall_port: bool,
    /// Write ACPI tables (RSDP at 0xE0000, XSDT, FADT, MADT, DSDT with the
    /// virtio-mmio devices) for ELF/bzImage kernels. Default true; flat tiny-guest
    /// images never get them.
    pub acpi: bool,
    /// With [`run_vmm_process`] in a dedicated single-threaded process: once the VM is
    /// set up, confine the process (empty root in its own mount namespace under
    /// `<run_dir>/jail`, no capabilities, uid/gid [`vmm_id`]; see the `jail` module).
    /// Needs `run_dir` and root. Default false.
    pub jail: bool,
}

impl VmConfig {
    /// A configuration with defaults: 1 vCPU, 128 MiB, seccomp on, 10 s shutdown timeout.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            vcpus: 1,
            mem_bytes: 128 << 20,
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            disks: Vec::new(),
            nets: Vec::new(),
            serial_log: None,
            control_socket: None,
            console_socket: None,
            run_dir: None,
            seccomp: true,
            shutdown_timeout: Duration::from_secs(10),
            test_forbidden_syscall_port: false,
            acpi: true,
            jail: false,
        }
    }
}

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest asked for a reset (i8042 0xFE, triple fault, or a KVM reset event).
    Reset,
    /// The guest powered off, or a graceful shutdown was requested and completed
    /// (or timed out and was forced).
    Shutdown,
    /// Stopped at once by [`VmHandle::kill`].
    Killed,
    /// The guest could not continue (KVM internal error, failed entry, bad exit).
    Error(String),
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::Reset => f.write_str("reset"),
            ExitReason::Shutdown => f.write_str("shutdown"),
            ExitReason::Killed => f.write_str("killed"),
            ExitReason::Error(e) => write!(f, "error: {e}"),
        }
    }
}

/// VMM errors.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The configuration is invalid.
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// A KVM ioctl failed.
    #[error("{what} failed")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A host I/O operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Guest memory could not be set up or accessed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The kernel image could not be loaded.
    #[error("kernel load: {0}")]
    Loader(String),
    /// Seccomp filter construction or installation failed.
    #[error("seccomp: {0}")]
    Seccomp(String),
    /// A control-socket request failed.
    #[error("control: {0}")]
    Control(String),
}

impl VmmError {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmmError {
        let what = what.into();
        move |source| VmmError::Io { what, source }
    }
}

/// Called with every chunk of serial output.
pub type SerialCallback = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// Run state of a VM as reported by [`VmHandle::state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Created, [`Vm::run`] not called yet.
    Created,
    /// vCPUs running.
    Running,
    /// vCPUs parked by [`VmHandle::pause`].
    Paused,
    /// Stopping or stopped.
    Exited,
}

impl RunState {
    /// Lower-case name used on the control socket and in the state file.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Created => "created",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Exited => "exited",
        }
    }
}

const SERIAL_RING_BYTES: usize = 64 * 1024;

struct Ctl {
    state: RunState,
    parked: usize,
    running_vcpus: usize,
    exit: Option<ExitReason>,
    shutdown_deadline: Option<Instant>,
}

pub(crate) struct Shared {
    ctl: Mutex<Ctl>,
    cond: Condvar,
    vcpu_threads: Mutex<Vec<libc::pthread_t>>,
    serial_ring: Mutex<VecDeque<u8>>,
    serial_callback: Mutex<Option<SerialCallback>>,
    i8042: Arc<Mutex<devices::I8042>>,
    vcpus: u8,
    mem_bytes: u64,
    shutdown_timeout: Duration,
    started: Instant,
    started_unix: u64,
    state_file: Mutex<Option<(PathBuf, StateSockets)>>,
    /// The state file opened for in-place rewrites (after a jail hides its path).
    state_fd: Mutex<Option<File>>,
    console: Mutex<Option<std::os::unix::net::UnixStream>>,
    exited_evt: EventFd,
    has_exited: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking VMM thread must not wedge the others: keep using the data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// The shared state of a VM built from `cfg`, in [`RunState::Created`].
    fn new(cfg: &VmConfig, i8042: Arc<Mutex<devices::I8042>>) -> Result<Shared, VmmError> {
        Ok(Shared {
            ctl: Mutex::new(Ctl {
                state: RunState::Created,
                parked: 0,
                running_vcpus: 0,
                exit: None,
                shutdown_deadline: None,
            }),
            cond: Condvar::new(),
            vcpu_threads: Mutex::new(Vec::new()),
            serial_ring: Mutex::new(VecDeque::with_capacity(4096)),
            serial_callback: Mutex::new(None),
            i8042,
            vcpus: cfg.vcpus,
            mem_bytes: cfg.mem_bytes,
            shutdown_timeout: cfg.shutdown_timeout,
            started: Instant::now(),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            state_file: Mutex::new(None),
            state_fd: Mutex::new(None),
            console: Mutex::new(None),
            exited_evt: EventFd::new(EFD_NONBLOCK).map_err(VmmError::io("eventfd"))?,
            has_exited: AtomicBool::new(false),
        })
    }

    fn ctl(&self) -> MutexGuard<'_, Ctl> {
        lock(&self.ctl)
    }

    /// Records the first exit reason and asks every thread to stop.
    pub(crate) fn request_exit(&self, reason: ExitReason) {
        let mut c = self.ctl();
        if c.exit.is_none() {
            let reason = match reason {
                // A reset while a graceful shutdown is pending is the guest's answer to
                // Ctrl-Alt-Del: report it as the shutdown it was.
                ExitReason::Reset if c.shutdown_deadline.is_some() => ExitReason::Shutdown,
                r => r,
            };
            c.exit = Some(reason);
        }
        c.state = RunState::Exited;
        self.cond.notify_all();
        drop(c);
        self.kick_vcpus();
    }

    /// Enters [`RunState::Running`] with `vcpus` vCPU threads about to start, unless
    /// the VM was stopped before it ran (a kill on the control socket can come first):
    /// then it stays [`RunState::Exited`] and the vCPU threads end at once.
    fn mark_running(&self, vcpus: usize) {
        {
            let mut c = self.ctl();
            if c.state == RunState::Created {
                c.state = RunState::Running;
            }
            c.running_vcpus = vcpus;
        }
        self.write_state_file();
    }

    /// Blocks until an exit is requested, forcing it once a graceful shutdown's
    /// deadline has passed.
    fn wait_for_exit(&self) {
        let mut c = self.ctl();
        loop {
            if c.exit.is_some() {
                return;
            }
            let wait = match c.shutdown_deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        drop(c);
                        self.request_exit(ExitReason::Shutdown);
                        c = self.ctl();
                        continue;
                    }
                    d - now
                }
                None => Duration::from_secs(3600),
            };
            c = match self.cond.wait_timeout(c, wait) {
                Ok((c, _)) => c,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Kicks the vCPU `threads` until each has left KVM_RUN, then joins them.
    fn stop_vcpus(&self, threads: Vec<JoinHandle<()>>) {
        while threads.iter().any(|t| !t.is_finished()) {
            self.kick_vcpus();
            std::thread::sleep(Duration::from_micros(100));
        }
        lock(&self.vcpu_threads).clear();
        for t in threads {
            let _ = t.join();
        }
    }

    fn kick_vcpus(&self) {
        let sig = vcpu::kick_signal();
        for t in lock(&self.vcpu_threads).iter() {
            // libc, not nix: nix's pthread_kill takes a `Signal`, which cannot name the
            // real-time kick signal.
            // SAFETY: the pthread_t values belong to vCPU threads that are joined only
            // after this list is cleared, so they are valid thread handles.
            unsafe {
                libc::pthread_kill(*t, sig);
            }
        }
    }

    /// The state file's content now.
    fn state_file_content(&self, sockets: &StateSockets) -> StateFile {
        let c = self.ctl();
        StateFile {
            pid: std::process::id(),
            state: c.state,
            vcpus: self.vcpus,
            mem_bytes: self.mem_bytes,
            started_unix: self.started_unix,
            control_socket: sockets.control.clone(),
            console_socket: sockets.console.clone(),
            exit_reason: c.exit.as_ref().map(ExitReason::to_string),
        }
    }

    fn write_state_file(&self) {
        let file = lock(&self.state_file).clone();
        if let Some((path, sockets)) = file {
            let body = self.state_file_content(&sockets).render();
            if let Some(f) = lock(&self.state_fd).as_ref() {
                use std::os::unix::fs::FileExt;
                if f.write_all_at(body.as_bytes(), 0).is_ok() {
                    let _ = f.set_len(body.len() as u64);
                }
                return;
            }
            let tmp = path.with_extension("json.tmp");
            if std::fs::write(&tmp, body).is_ok() {
                let _ = std::fs::rename(&tmp, &path);
            }
        }
    }
}

/// A cheap, clonable handle to control a VM from other threads.
#[derive(Clone)]
pub struct VmHandle {
    shared: Arc<Shared>,
    bus: std::sync::Weak<devices::Bus>,
}

impl fmt::Debug for VmHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VmHandle")
            .field("state", &self.state())
            .finish()
    }
}

impl VmHandle {
    /// Current run state.
    pub fn state(&self) -> RunState {
        self.shared.ctl().state
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> u8 {
        self.shared.vcpus
    }

    /// Time since the VM was created.
    pub fn uptime(&self) -> Duration {
        self.shared.started.elapsed()
    }

    /// The exit reason, once the VM has stopped.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.shared.ctl().exit.clone()
    }

    /// The last 64 KiB of serial output.
    pub fn serial_output(&self) -> Vec<u8> {
        lock(&self.shared.serial_ring).iter().copied().collect()
    }

    /// Moves the run state from `from` to `to` (what `verb`, `pause` or `resume`, does) and
    /// returns the still-held control lock; `None` when the VM is in state `to` already, an
    /// error in any other state.
    fn switch_state(
        &self,
        verb: &str,
        from: RunState,
        to: RunState,
    ) -> Result<Option<MutexGuard<'_, Ctl>>, VmmError> {
        let mut c = self.shared.ctl();
        if c.state == from {
            c.state = to;
            Ok(Some(c))
        } else if c.state == to {
            Ok(None)
        } else {
            Err(VmmError::Control(format!(
                "cannot {verb}: VM is {}",
                c.state.as_str()
            )))
        }
    }

    /// Parks all vCPUs; returns once they are all parked (or the VM exited).
    pub fn pause(&self) -> Result<(), VmmError> {
        let moved = self
            .switch_state("pause", RunState::Running, RunState::Paused)?
            .is_some();
        if !moved {
            return Ok(());
        }
        loop {
            self.shared.kick_vcpus();
            let c = self.shared.ctl();
            if c.state != RunState::Paused || c.parked >= c.running_vcpus {
                break;
            }
            let _ = self
                .shared
                .cond
                .wait_timeout(c, Duration::from_millis(5))
                .map_err(|_| VmmError::Control("lock poisoned".into()))?;
            let c = self.shared.ctl();
            if c.state != RunState::Paused || c.parked >= c.running_vcpus {
                break;
            }
        }
        self.shared.write_state_file();
        Ok(())
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) -> Result<(), VmmError> {
        {
            let Some(_ctl) = self.switch_state("resume", RunState::Paused, RunState::Running)?
            else {
                return Ok(());
            };
            self.shared.cond.notify_all();
        }
        self.shared.write_state_file();
        Ok(())
    }

    /// Graceful shutdown: resumes the VM if paused, injects Ctrl-Alt-Del through the
    /// i8042, and forces the VM off after the configured shutdown timeout. A guest
    /// reset or power-off in the meantime ends the VM with [`ExitReason::Shutdown`].
    pub fn shutdown(&self) -> Result<(), VmmError> {
        {
            let mut c = self.shared.ctl();
            if c.state == RunState::Exited {
                return Ok(());
            }
            if c.shutdown_deadline.is_none() {
                c.shutdown_deadline = Some(Instant::now() + self.shared.shutdown_timeout);
            }
            if c.state == RunState::Paused {
                c.state = RunState::Running;
            }
            self.shared.cond.notify_all();
        }
        lock(&self.shared.i8042).inject_ctrl_alt_del();
        Ok(())
    }

    /// Stops the VM at once.
    pub fn kill(&self) {
        self.shared.request_exit(ExitReason::Killed);
    }

    /// Blocks until the VM has exited or `timeout` passed; returns the exit reason.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitReason> {
        let deadline = Instant::now() + timeout;
        let mut c = self.shared.ctl();
        loop {
            if c.exit.is_some() {
                return c.exit.clone();
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            c = match self.shared.cond.wait_timeout(c, deadline - now) {
                Ok((c, _)) => c,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// The eventfd that becomes readable once the VM has exited.
    pub(crate) fn exited_fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsRawFd;
        // SAFETY: the eventfd is owned by `Shared`, which this handle keeps alive (Arc)
        // for at least the borrow's lifetime, and it is never closed before `Shared` drops.
        unsafe { BorrowedFd::borrow_raw(self.shared.exited_evt.as_raw_fd()) }
    }

    pub(crate) fn has_exited(&self) -> bool {
        self.shared.has_exited.load(Ordering::SeqCst)
    }

    /// Keeps `path` up to date with the VM state, naming `sockets` in it.
    pub(crate) fn set_state_file(&self, path: PathBuf, sockets: StateSockets) {
        *lock(&self.shared.state_file) = Some((path, sockets));
        self.shared.write_state_file();
    }

    /// From now on, rewrites the state file in place through a descriptor opened
    /// here (its path is unreachable once the process is jailed).
    pub(crate) fn hold_state_file(&self) -> Result<(), VmmError> {
        let path = lock(&self.shared.state_file)
            .as_ref()
            .map(|(p, _)| p.clone());
        if let Some(p) = path {
            let f = File::options()
                .write(true)
                .open(&p)
                .map_err(VmmError::io(format!("open {}", p.display())))?;
            *lock(&self.shared.state_fd) = Some(f);
        }
        Ok(())
    }

    /// Queues `data` as serial (COM1) input; returns how many bytes fit in the
    /// 16550's receive FIFO (0 once the VM is gone).
    pub fn serial_input(&self, data: &[u8]) -> usize {
        match self.bus.upgrade() {
            Some(bus) => bus.serial_input(data),
            None => 0,
        }
    }

    /// Attaches a console client: it first gets the buffered serial output (last
    /// 64 KiB), then all new output, without gaps or repeats. Replaces any previous
    /// client. The stream is switched to non-blocking; output a slow client cannot
    /// take is dropped.
    pub(crate) fn attach_console(&self, stream: std::os::unix::net::UnixStream) {
        use std::io::Write;
        let ring = lock(&self.shared.serial_ring);
        let (a, b) = ring.as_slices();
        let mut s = stream;
        let ok =
            s.write_all(a).and_then(|_| s.write_all(b)).is_ok() && s.set_nonblocking(true).is_ok();
        *lock(&self.shared.console) = if ok { Some(s) } else { None };
        drop(ring);
    }

    /// Marks the VM as gone for the socket servers (also after a failed `run`).
    pub(crate) fn mark_exited(&self) {
        if self.shared.ctl().exit.is_none() {
            self.shared
                .request_exit(ExitReason::Error("VM did not start".into()));
        }
        self.shared.has_exited.store(true, Ordering::SeqCst);
        let _ = self.shared.exited_evt.write(1);
    }

    /// Detaches the console client.
    pub(crate) fn detach_console(&self) {
        *lock(&self.shared.console) = None;
    }
}

/// A configured VM, ready to [`run`](Vm::run).
pub struct Vm {
    cfg: VmConfig,
    _kvm: Kvm,
    vm_fd: Arc<VmFd>,
    mem: Arc<GuestMemoryMmap>,
    vcpu_fds: Vec<VcpuFd>,
    bus: Arc<devices::Bus>,
    worker: virtio::Worker,
    shared: Arc<Shared>,
    confine_caller: bool,
}

impl fmt::Debug for Vm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vm").field("cfg", &self.cfg).finish()
    }
}

impl Vm {
    /// Validates `cfg` and builds the VM: memory, KVM VM with irqchip and PIT, devices,
    /// kernel, vCPUs. Nothing runs until [`Vm::run`].
    pub fn new(cfg: VmConfig) -> Result<Vm, VmmError> {
        validate(&cfg)?;
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let mem = Arc::new(create_guest_memory(&vm_fd, cfg.mem_bytes)?);
        create_irqchip_and_pit(&vm_fd)?;
        let vm_fd = Arc::new(vm_fd);

        let legacy = LegacyIrqs::register(&vm_fd)?;
        let i8042 = Arc::new(Mutex::new(devices::I8042::new(legacy.i8042)));
        let shared = Arc::new(Shared::new(&cfg, i8042.clone())?);
        let serial = devices::new_serial(legacy.serial, open_serial_log(&cfg)?, shared.clone());
        let virtio = VirtioDevices::attach(&vm_fd, &cfg)?;
        let bus = Arc::new(devices::Bus::new(
            serial,
            i8042,
            virtio.transports.clone(),
            cfg.test_forbidden_syscall_port,
        ));
        let worker = virtio::Worker::new(virtio.transports.clone(), mem.clone())?;

        let boot = load_kernel(&mem, &cfg, &virtio)?;
        let vcpu_fds = create_vcpus(&kvm, &vm_fd, cfg.vcpus, boot)?;
        Ok(Vm {
            cfg,
            _kvm: kvm,
            vm_fd,
            mem,
            vcpu_fds,
            bus,
            worker,
            shared,
            confine_caller: false,
        })
    }

    /// A handle to pause, resume, shut down or kill the VM from another thread.
    pub fn handle(&self) -> VmHandle {
        VmHandle {
            shared: self.shared.clone(),
            bus: Arc::downgrade(&self.bus),
        }
    }

    /// Sets a callback that receives all serial output.
    pub fn set_serial_callback(&self, cb: SerialCallback) {
        *lock(&self.shared.serial_callback) = Some(cb);
    }

    /// Runs the VM until it stops, on one thread per vCPU plus a device thread.
    pub fn run(self) -> Result<ExitReason, VmmError> {
        let Vm {
            cfg,
            _kvm,
            vm_fd,
            mem,
            vcpu_fds,
            bus,
            worker,
            shared,
            confine_caller,
        } = self;
        vcpu::install_kick_handler()?;
        let filter = if cfg.seccomp {
            Some(Arc::new(seccomp::filter()?))
        } else {
            None
        };
        shared.mark_running(vcpu_fds.len());
        let device_thread = DeviceThread::spawn(worker, shared.clone(), filter.clone())?;
        let (threads, mut setup_err) = spawn_vcpus(vcpu_fds, &bus, &shared, &filter);
        if setup_err.is_none()
            && confine_caller
            && let Some(f) = &filter
            && let Err(e) = seccomp::apply(f)
        {
            setup_err = Some(e);
        }
        if let Some(e) = &setup_err {
            shared.request_exit(ExitReason::Error(e.to_string()));
        }

        shared.wait_for_exit();
        shared.stop_vcpus(threads);
        device_thread.stop();
        shared.has_exited.store(true, Ordering::SeqCst);
        let _ = shared.exited_evt.write(1);
        shared.write_state_file();
        // Closing the VM fd makes KVM tear the VM down (irqfd shutdown, SRCU/RCU grace
        // periods); on a busy host this takes 1-20 ms, after the exit is reported.
        drop(bus);
        drop(vm_fd);
        drop(mem);
        if let Some(e) = setup_err {
            return Err(e);
        }
        Ok(shared
            .ctl()
            .exit
            .clone()
            .unwrap_or(ExitReason::Error("no exit reason".into())))
    }

    pub(crate) fn confine_caller(&mut self) {
        self.confine_caller = true;
    }
}

/// The virtio device thread ("vmm-dev") and the eventfd that stops it.
struct DeviceThread {
    stop: EventFd,
    thread: JoinHandle<()>,
}

impl DeviceThread {
    /// Starts serving the virtio queues (confined by `filter` first, when given); a failure
    /// stops the VM.
    fn spawn(
        worker: virtio::Worker,
        shared: Arc<Shared>,
        filter: Option<Arc<seccompiler::BpfProgram>>,
    ) -> Result<DeviceThread, VmmError> {
        let stop = EventFd::new(EFD_NONBLOCK).map_err(VmmError::io("eventfd"))?;
        let stop2 = stop.try_clone().map_err(VmmError::io("eventfd clone"))?;
        let thread = std::thread::Builder::new()
            .name("vmm-dev".into())
            .spawn(move || {
                if let Some(f) = filter
                    && let Err(e) = seccomp::apply(&f)
                {
                    shared.request_exit(ExitReason::Error(e.to_string()));
                    return;
                }
                if let Err(e) = worker.run(&stop2) {
                    shared.request_exit(ExitReason::Error(format!("device thread: {e}")));
                }
            })
            .map_err(VmmError::io("spawn device thread"))?;
        Ok(DeviceThread { stop, thread })
    }

    /// Tells the thread to stop and waits for it.
    fn stop(self) {
        let _ = self.stop.write(1);
        let _ = self.thread.join();
    }
}

/// Starts one thread per vCPU ("vcpuN"), each recorded in `shared` so it can be kicked.
/// A failed spawn stops there: the threads started so far and the error are returned.
fn spawn_vcpus(
    vcpu_fds: Vec<VcpuFd>,
    bus: &Arc<devices::Bus>,
    shared: &Arc<Shared>,
    filter: &Option<Arc<seccompiler::BpfProgram>>,
) -> (Vec<JoinHandle<()>>, Option<VmmError>) {
    let mut threads = Vec::with_capacity(vcpu_fds.len());
    for (id, fd) in vcpu_fds.into_iter().enumerate() {
        let v = vcpu::Vcpu {
            id: id as u8,
            fd,
            bus: bus.clone(),
            shared: shared.clone(),
            filter: filter.clone(),
        };
        let t = match std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || v.run())
        {
            Ok(t) => t,
            // Stop what already runs, then report the error after cleanup.
            Err(e) => return (threads, Some(VmmError::io("spawn vcpu thread")(e))),
        };
        {
            use std::os::unix::thread::JoinHandleExt;
            lock(&shared.vcpu_threads).push(t.as_pthread_t());
        }
        threads.push(t);
    }
    (threads, None)
}

/// Maps a failed KVM ioctl to [`VmmError::Kvm`].
fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

/// Checks the limits of `cfg` that KVM and the guest layout impose.
fn validate(cfg: &VmConfig) -> Result<(), VmmError> {
    if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
        return Err(VmmError::Config(format!(
            "vcpus must be 1..={MAX_VCPUS}, got {}",
            cfg.vcpus
        )));
    }
    if cfg.mem_bytes < (16 << 20) || !cfg.mem_bytes.is_multiple_of(4096) {
        return Err(VmmError::Config(
            "mem_bytes must be at least 16 MiB and a multiple of 4 KiB".into(),
        ));
    }
    if cfg.disks.len() + cfg.nets.len() > 16 {
        return Err(VmmError::Config("at most 16 virtio devices".into()));
    }
    Ok(())
}

/// Maps `mem_bytes` of guest RAM (around the 32-bit hole) and registers each region
/// with KVM as a memory slot.
fn create_guest_memory(vm_fd: &VmFd, mem_bytes: u64) -> Result<GuestMemoryMmap, VmmError> {
    let mem = GuestMemoryMmap::from_ranges(&arch::ram_regions(mem_bytes))
        .map_err(|e| VmmError::Memory(e.to_string()))?;
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| VmmError::Memory(e.to_string()))?;
        let r = kvm_bindings::kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which the Vm keeps
        // alive (in an Arc) for as long as the VM fd exists.
        unsafe { vm_fd.set_user_memory_region(r) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(mem)
}

/// The in-kernel interrupt controllers (PIC, IOAPIC, LAPICs) and PIT.
fn create_irqchip_and_pit(vm_fd: &VmFd) -> Result<(), VmmError> {
    // Needed on Intel; other KVM flavours may not implement it.
    let _ = vm_fd.set_tss_address(0xfffb_d000);
    vm_fd
        .create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm_fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))
}

/// The irqfds of the legacy devices: COM1 on IRQ 4, the i8042 on IRQ 1.
struct LegacyIrqs {
    serial: EventFd,
    i8042: EventFd,
}

impl LegacyIrqs {
    fn register(vm_fd: &VmFd) -> Result<LegacyIrqs, VmmError> {
        let serial = EventFd::new(EFD_NONBLOCK).map_err(VmmError::io("eventfd"))?;
        vm_fd
            .register_irqfd(&serial, 4)
            .map_err(kvm_err("KVM_IRQFD serial"))?;
        let i8042 = EventFd::new(EFD_NONBLOCK).map_err(VmmError::io("eventfd"))?;
        vm_fd
            .register_irqfd(&i8042, 1)
            .map_err(kvm_err("KVM_IRQFD i8042"))?;
        Ok(LegacyIrqs { serial, i8042 })
    }
}

/// Opens `cfg.serial_log` for appending, if set.
fn open_serial_log(cfg: &VmConfig) -> Result<Option<File>, VmmError> {
    let Some(p) = &cfg.serial_log else {
        return Ok(None);
    };
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .map(Some)
        .map_err(VmmError::io(format!("open serial log {}", p.display())))
}

/// The virtio-mmio devices of a VM, wired to KVM (irqfd, ioeventfds), and what the
/// guest needs to find them.
struct VirtioDevices {
    transports: Vec<Arc<Mutex<virtio::MmioTransport>>>,
    /// `virtio_mmio.device=` entries for a Linux command line.
    cmdline: String,
    /// The devices for the ACPI DSDT.
    mmio: Vec<acpi::MmioDevice>,
}

impl VirtioDevices {
    /// The disks, then the nets of `cfg`, one 4 KiB window and GSI each from
    /// [`VIRTIO_MMIO_BASE`] and [`VIRTIO_GSI_BASE`].
    fn attach(vm_fd: &VmFd, cfg: &VmConfig) -> Result<VirtioDevices, VmmError> {
        let mut devs = VirtioDevices {
            transports: Vec::new(),
            cmdline: String::new(),
            mmio: Vec::new(),
        };
        for d in &cfg.disks {
            devs.add(vm_fd, virtio::DeviceKind::Blk(virtio::Blk::open(d)?))?;
        }
        for n in &cfg.nets {
            let tap = tap::Tap::open(&n.tap)?;
            devs.add(vm_fd, virtio::DeviceKind::Net(virtio::Net::new(tap, n.mac)))?;
        }
        Ok(devs)
    }

    fn add(&mut self, vm_fd: &VmFd, dev: virtio::DeviceKind) -> Result<(), VmmError> {
        let idx = self.transports.len() as u64;
        let base = VIRTIO_MMIO_BASE + idx * VIRTIO_MMIO_SIZE;
        let gsi = VIRTIO_GSI_BASE + idx as u32;
        let irq = EventFd::new(EFD_NONBLOCK).map_err(VmmError::io("eventfd"))?;
        vm_fd
            .register_irqfd(&irq, gsi)
            .map_err(kvm_err("KVM_IRQFD virtio"))?;
        let t = virtio::MmioTransport::new(dev, irq)?;
        for (q, evt) in t.queue_evts.iter().enumerate() {
            vm_fd
                .register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(base + virtio::QUEUE_NOTIFY_OFFSET),
                    q as u32,
                )
                .map_err(kvm_err("KVM_IOEVENTFD"))?;
        }
        self.cmdline
            .push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{gsi}"));
        self.mmio.push(acpi::MmioDevice {
            base,
            size: VIRTIO_MMIO_SIZE,
            gsi,
        });
        self.transports.push(Arc::new(Mutex::new(t)));
        Ok(())
    }
}

/// Writes the boot tables (and, for a Linux kernel, the MP table, ACPI and the virtio
/// command-line entries) and loads the kernel and initrd; returns where to enter.
fn load_kernel(
    mem: &GuestMemoryMmap,
    cfg: &VmConfig,
    virtio: &VirtioDevices,
) -> Result<arch::BootEntry, VmmError> {
    arch::write_tables(mem)?;
    let mut cmdline = cfg.cmdline.clone();
    let mut rsdp = None;
    if arch::is_linux_image(&cfg.kernel)? {
        cmdline.push_str(&virtio.cmdline);
        mptable::write(mem, cfg.vcpus)?;
        if cfg.acpi {
            rsdp = Some(acpi::write(mem, cfg.vcpus, &virtio.mmio)?);
        }
    }
    arch::load_guest(
        mem,
        cfg.mem_bytes,
        &cfg.kernel,
        cfg.initrd.as_deref(),
        cmdline.trim(),
        rsdp,
    )
}

/// Creates `vcpus` vCPUs with their registers set for `boot`.
fn create_vcpus(
    kvm: &Kvm,
    vm_fd: &VmFd,
    vcpus: u8,
    boot: arch::BootEntry,
) -> Result<Vec<VcpuFd>, VmmError> {
    let mut fds = Vec::with_capacity(usize::from(vcpus));
    for id in 0..vcpus {
        let vcpu = vm_fd
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        arch::setup_vcpu(kvm, &vcpu, id, vcpus, boot)?;
        if id > 0 && matches!(boot, arch::BootEntry::Tiny { .. }) {
            // Tiny guests start every vCPU at the entry point (no INIT/SIPI).
            vcpu.set_mp_state(kvm_mp_state {
                mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
            })
            .map_err(kvm_err("KVM_SET_MP_STATE"))?;
        }
        fds.push(vcpu);
    }
    Ok(fds)
}

/// Returns `Some(reason)` when KVM cannot be used here (no /dev/kvm).
pub fn kvm_unavailable() -> Option<String> {
    match File::options().read(true).write(true).open("/dev/kvm") {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm absent ({e})")),
    }
}

/// Whether the CPU advertises hardware virtualization (vmx or svm) in /proc/cpuinfo.
pub fn has_hardware_virtualization() -> bool {
    stead_host::ProcFs::host().cpu_has_any_flag(&["vmx", "svm"])
}
