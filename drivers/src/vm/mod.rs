//! Virtual machines on stead's own KVM VMM ([`stead_vmm`]).
//!
//! - [`VmDriver`]: the `VirtualMachine` driver (observe / apply / delete);
//! - [`supervisor`]: `stead vmm`, one supervising process per VM that forks a fresh
//!   seccomp-confined VMM child per boot and applies the restart policy;
//! - [`console`]: `stead console` / `stead logs` clients;
//! - [`config`]: the run-directory layout (`<run_dir>/vms/<name>/`) and its JSON files.
//!
//! The demo guest (stead-vmm's tiny guest, embedded as [`stead_vmm::TINY_GUEST_BYTES`]) is
//! written out by [`write_demo_guest`] (`stead vmm --write-demo-guest PATH`).

pub mod config;
pub mod console;
mod driver;
pub mod supervisor;

use std::path::Path;

use stead_schema::DriverError;

pub use console::{console, logs};
pub use driver::{DEFAULT_SHUTDOWN_TIMEOUT_SECS, VmDriver};
pub use supervisor::VmmArgs;

/// Kernel command line that makes the demo guest idle with a serial echo.
pub const DEMO_GUEST_CMDLINE: &str = "mode=idle";

/// Writes the embedded tiny demo guest (a flat 64-bit image the VMM boots on any KVM,
/// including nested/PVM hosts) to `path`. Boot it with [`DEMO_GUEST_CMDLINE`]; it prints
/// a banner, echoes serial input upper-cased and reboots on Ctrl-Alt-Del.
pub fn write_demo_guest(path: &Path) -> Result<(), DriverError> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)
            .map_err(|e| DriverError::io(format!("create {}", dir.display()), e))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, stead_vmm::TINY_GUEST_BYTES)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| DriverError::io(format!("write {}", path.display()), e))
}

/// Size of the embedded demo guest in bytes.
pub fn demo_guest_len() -> usize {
    stead_vmm::TINY_GUEST_BYTES.len()
}
