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
pub mod qemu;
pub mod supervisor;
mod tap;

use std::path::Path;

use stead_reconciler::driver::DriverError;

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
    // 0644: a guest image is no secret, and the VMM reads it after dropping privileges.
    stead_host::write_atomic_mode(path, stead_vmm::TINY_GUEST_BYTES, 0o644)
        .map_err(crate::storage::fsutil::host_err)
}

/// Size of the embedded demo guest in bytes.
pub fn demo_guest_len() -> usize {
    stead_vmm::TINY_GUEST_BYTES.len()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn demo_guest_is_written_whole_and_readable_whatever_sits_at_its_old_temp_name() {
        // The old fixed temp name (`guest.tmp` for `guest.bin`) was shared by every file
        // with the same stem; a directory there made the write fail.
        let t = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(t.path().join("guest.tmp")).expect("mkdir");
        let p = t.path().join("guest.bin");
        write_demo_guest(&p).expect("write");
        assert_eq!(
            std::fs::read(&p).expect("read"),
            stead_vmm::TINY_GUEST_BYTES
        );
        assert_eq!(std::fs::metadata(&p).expect("stat").mode() & 0o777, 0o644);
    }
}
