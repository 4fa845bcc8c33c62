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

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use stead_reconciler::driver::DriverError;

use super::config::Paths;
use super::supervisor::lock_held;

/// Detach key: Ctrl-].
pub const CONSOLE_DETACH: u8 = 0x1d;
/// How long output is still shown after a non-terminal stdin ends.
pub const LINGER: Duration = Duration::from_secs(1);

/// Attaches stdin/stdout to VM `name`'s serial console until Ctrl-], end of input (plus
/// [`LINGER`]), or the VM going away.
pub fn console(run_dir: &Path, name: &str) -> Result<(), DriverError> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use nix::sys::termios;
    let paths = Paths::new(run_dir, name);
    let sock = paths.console_socket();
    let conn = UnixStream::connect(&sock).map_err(|e| {
        if lock_held(&paths) {
            DriverError::io(format!("connect {}", sock.display()), e)
        } else {
            DriverError::NotReady(format!("VirtualMachine/{name} is not running"))
        }
    })?;
    let stdin = io::stdin();
    let saved = termios::tcgetattr(&stdin).ok();
    if let Some(t) = &saved {
        eprint!("Connected to VirtualMachine/{name}; Ctrl-] detaches.\r\n");
        let mut raw = t.clone();
        termios::cfmakeraw(&mut raw);
        let _ = termios::tcsetattr(&stdin, termios::SetArg::TCSANOW, &raw);
    }
    let mut out = io::stdout();
    let mut buf = [0u8; 4096];
    let mut stdin_open = true;
    let mut linger_until: Option<Instant> = None;
    let result = (|| -> Result<(), DriverError> {
        loop {
            let timeout = match linger_until {
                Some(t) => {
                    let left = t.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(());
                    }
                    PollTimeout::try_from(left.as_millis().min(60_000) as i32)
                        .unwrap_or(PollTimeout::ZERO)
                }
                None => PollTimeout::NONE,
            };
            let mut fds = vec![PollFd::new(conn.as_fd(), PollFlags::POLLIN)];
            if stdin_open {
                fds.push(PollFd::new(stdin.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(DriverError::io("poll", e.into())),
            }
            let conn_ready = fds[0].revents().is_some_and(|r| !r.is_empty());
            let stdin_ready = stdin_open && fds[1].revents().is_some_and(|r| !r.is_empty());
            if conn_ready {
                let n = (&conn)
                    .read(&mut buf)
                    .map_err(|e| DriverError::io("console read", e))?;
                if n == 0 {
                    return Ok(());
                }
                out.write_all(&buf[..n])
                    .map_err(|e| DriverError::io("stdout", e))?;
                out.flush().map_err(|e| DriverError::io("stdout", e))?;
            }
            if stdin_ready {
                let n = io::stdin()
                    .lock()
                    .read(&mut buf)
                    .map_err(|e| DriverError::io("stdin", e))?;
                if n == 0 {
                    stdin_open = false;
                    linger_until = Some(Instant::now() + LINGER);
                    continue;
                }
                if let Some(i) = buf[..n].iter().position(|b| *b == CONSOLE_DETACH) {
                    let _ = (&conn).write_all(&buf[..i]);
                    return Ok(());
                }
                (&conn)
                    .write_all(&buf[..n])
                    .map_err(|e| DriverError::io("console write", e))?;
            }
        }
    })();
    if let Some(t) = &saved {
        let _ = termios::tcsetattr(&stdin, termios::SetArg::TCSANOW, t);
        eprint!("\r\nDetached from VirtualMachine/{name}.\r\n");
    }
    result
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
