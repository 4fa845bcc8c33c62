//! vCPU threads: the KVM_RUN loop, exit dispatch, pause/resume parking.

use std::sync::{Arc, Once};

use kvm_ioctls::{VcpuExit, VcpuFd};
use seccompiler::BpfProgram;

use crate::devices::{Bus, IoAction};
use crate::{ExitReason, RunState, Shared, VmmError, seccomp};

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

/// Signal used to kick a vCPU thread out of KVM_RUN.
pub(crate) fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 2
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

static KICK_HANDLER: Once = Once::new();

/// Installs the (empty) kick signal handler once per process. Without SA_RESTART,
/// the signal makes a blocked KVM_RUN return EINTR.
pub(crate) fn install_kick_handler() -> Result<(), VmmError> {
    let mut result = Ok(());
    KICK_HANDLER.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
            .map_err(|e| VmmError::Io {
                what: "register vCPU kick signal handler".into(),
                source: std::io::Error::from_raw_os_error(e.errno()),
            });
    });
    result
}

pub(crate) struct Vcpu {
    pub(crate) id: u8,
    pub(crate) fd: VcpuFd,
    pub(crate) bus: Arc<Bus>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) filter: Option<Arc<BpfProgram>>,
}

impl Vcpu {
    /// The vCPU thread: confines itself, then runs the guest until the VM stops.
    pub(crate) fn run(mut self) {
        if let Some(f) = &self.filter
            && let Err(e) = seccomp::apply(f)
        {
            self.shared
                .request_exit(ExitReason::Error(format!("vcpu{}: {e}", self.id)));
            return;
        }
        while self.park() {
            let stop = match self.run_once() {
                Ok(action) => self.carry_out(action),
                Err(reason) => Some(reason),
            };
            if let Some(reason) = stop {
                self.shared.request_exit(reason);
                return;
            }
        }
    }

    /// One KVM_RUN and the handling of its exit; an error is why the VM must stop.
    fn run_once(&mut self) -> Result<IoAction, ExitReason> {
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Ok(IoAction::None);
            }
            Err(e) => return Err(ExitReason::Error(format!("vcpu{}: KVM_RUN: {e}", self.id))),
        };
        Ok(match exit {
            VcpuExit::IoOut(port, data) => self.bus.pio_write(port, data),
            VcpuExit::IoIn(port, data) => {
                self.bus.pio_read(port, data);
                IoAction::None
            }
            VcpuExit::MmioRead(addr, data) => {
                self.bus.mmio_read(addr, data);
                IoAction::None
            }
            VcpuExit::MmioWrite(addr, data) => {
                self.bus.mmio_write(addr, data);
                IoAction::None
            }
            VcpuExit::Shutdown => IoAction::Reset, // triple fault
            VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => IoAction::Reset,
            VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => IoAction::PowerOff,
            VcpuExit::Hlt | VcpuExit::IrqWindowOpen | VcpuExit::Intr => IoAction::None,
            other => {
                let msg = format!("vcpu{}: unhandled exit {other:?}", self.id);
                return Err(ExitReason::Error(msg));
            }
        })
    }

    /// Carries out what a device asked for; `Some` is why the VM stops.
    fn carry_out(&self, action: IoAction) -> Option<ExitReason> {
        match action {
            IoAction::None => None,
            IoAction::Reset => Some(ExitReason::Reset),
            IoAction::PowerOff => Some(ExitReason::Shutdown),
            IoAction::ForbiddenSyscall => {
                // Test hook: a syscall no VMM thread needs after setup. Under the
                // seccomp filter this kills the process with SIGSYS. The socket, if the
                // process survives, is closed right away.
                let _ = nix::sys::socket::socket(
                    nix::sys::socket::AddressFamily::Inet,
                    nix::sys::socket::SockType::Datagram,
                    nix::sys::socket::SockFlag::empty(),
                    None,
                );
                None
            }
        }
    }

    /// Waits while the VM is paused. Returns false when the thread must exit.
    fn park(&self) -> bool {
        let mut c = self.shared.ctl();
        loop {
            match c.state {
                RunState::Exited => return false,
                RunState::Paused => {
                    c.parked += 1;
                    self.shared.cond.notify_all();
                    c = match self.shared.cond.wait(c) {
                        Ok(c) => c,
                        Err(p) => p.into_inner(),
                    };
                    c.parked -= 1;
                }
                _ => return true,
            }
        }
    }
}
