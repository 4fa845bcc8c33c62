//! `stead console` and `stead logs` for VMs.
//!
//! `console` connects to the VMM's serial console socket (`console.sock`): the VMM first
//! replays the last 64 KiB of serial output, then streams live output; what the client
//! sends goes to the guest's COM1. On a terminal, stdin is put in raw mode and Ctrl-]
//! detaches (the VM keeps running). When stdin is not a terminal (scripts, tests), its
//! bytes are sent until end of file and output is shown for [`LINGER`] more.
//!
//! `logs` prints `console.log` (size-capped serial output of every boot), optionally
//! following it while the supervisor lives.

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use stead_reconciler::driver::DriverError;

use super::config::Paths;
use super::supervisor::lock_held;
use crate::supervise::console::AttachOptions;

pub use crate::supervise::console::CONSOLE_DETACH;
/// How long output is still shown after a non-terminal stdin ends.
pub const LINGER: Duration = Duration::from_secs(1);

/// Attaches stdin/stdout to VM `name`'s serial console until Ctrl-], end of input (plus
/// [`LINGER`]), or the VM going away.
pub fn console(run_dir: &Path, name: &str) -> Result<(), DriverError> {
    let paths = Paths::new(run_dir, name);
    let sock = paths.console_socket();
    let conn = UnixStream::connect(&sock).map_err(|e| {
        if lock_held(&paths) {
            DriverError::io(format!("connect {}", sock.display()), e)
        } else {
            DriverError::NotReady(format!("VirtualMachine/{name} is not running"))
        }
    })?;
    let opts = AttachOptions {
        banner: Some(format!("VirtualMachine/{name}")),
        linger: Some(LINGER),
    };
    crate::supervise::console::attach(&conn, &opts)
}

/// VM `name`'s serial console as a stream for a relay of one's own (the web UI's): the
/// last 64 KiB of output first, then live output; what is written goes to COM1.
pub fn console_stream(run_dir: &Path, name: &str) -> Result<UnixStream, DriverError> {
    let paths = Paths::new(run_dir, name);
    UnixStream::connect(paths.console_socket()).map_err(|e| {
        if lock_held(&paths) {
            DriverError::io(format!("connect {}", paths.console_socket().display()), e)
        } else {
            DriverError::NotReady(format!("VirtualMachine/{name} is not running"))
        }
    })
}

/// Writes VM `name`'s serial log to `out`; with `follow`, keeps printing new output while
/// its supervisor lives.
pub fn logs(
    run_dir: &Path,
    name: &str,
    follow: bool,
    out: &mut dyn Write,
) -> Result<(), DriverError> {
    let paths = Paths::new(run_dir, name);
    let p = paths.console_log();
    let open = || {
        std::fs::File::open(&p).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound && !paths.dir.exists() {
                DriverError::NotReady(format!("VirtualMachine/{name} does not exist"))
            } else {
                DriverError::io(format!("open {}", p.display()), e)
            }
        })
    };
    crate::supervise::copy_log(&p, open, follow, || lock_held(&paths), out)
}
