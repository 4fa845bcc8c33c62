//! Control socket and the whole-process entry point.
//!
//! Protocol: unix stream socket, JSON lines (the wire format is in `protocol.rs`: one
//! [`Request`] per line, one [`Reply`] line back).
//!
//! Up to [`MAX_CLIENTS`] clients are served at once by one poll loop. A request line
//! longer than [`MAX_REQUEST_LINE`] bytes gets an error reply and the connection is
//! closed; so is a client idle for [`CLIENT_IDLE_TIMEOUT`].

use std::io::{BufReader, ErrorKind, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags};

use crate::protocol::{
    LineBuffer, LineTooLong, MAX_REQUEST_LINE, Reply, Request, StatusReply, parse_request,
    read_reply_line,
};
use crate::state_file::StateSockets;
use crate::{ExitReason, Vm, VmConfig, VmHandle, VmmError, seccomp};

/// A control client that sends nothing for this long is disconnected.
pub const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Control clients served at once; more are answered with an error and closed.
pub const MAX_CLIENTS: usize = 16;

fn status_of(h: &VmHandle) -> Reply {
    Reply::Ok(StatusReply {
        state: h.state(),
        vcpus: h.vcpus(),
        uptime_ms: u64::try_from(h.uptime().as_millis()).unwrap_or(u64::MAX),
        pid: std::process::id(),
        exit_reason: h.exit_reason().map(|e| e.to_string()),
    })
}

/// Carries out `req` on the VM behind `h`.
pub fn execute(h: &VmHandle, req: Request) -> Reply {
    let done = |r: Result<(), VmmError>| match r {
        Ok(()) => status_of(h),
        Err(e) => Reply::error(&e),
    };
    match req {
        Request::Status => status_of(h),
        Request::Pause => done(h.pause()),
        Request::Resume => done(h.resume()),
        Request::Shutdown => done(h.shutdown()),
        Request::Kill => {
            h.kill();
            status_of(h)
        }
    }
}

/// Executes one request line and returns the JSON reply line (without newline).
pub fn handle_command(h: &VmHandle, line: &str) -> String {
    match parse_request(line) {
        Ok(req) => execute(h, req),
        Err(e) => Reply::error(&e),
    }
    .to_line()
}

/// One connected control client of [`serve_control`].
struct Client {
    stream: UnixStream,
    lines: LineBuffer,
    last: Instant,
}

impl Client {
    /// Writes one reply line; false when the client cannot take it (gone or not
    /// reading).
    fn reply(&mut self, line: &str) -> bool {
        self.stream
            .write_all(format!("{line}\n").as_bytes())
            .is_ok()
    }

    /// Reads what the client sent (at most [`READ_BUDGET`] bytes per call, so one busy
    /// client cannot starve the others) and answers every complete line. Returns false
    /// when the connection is to be closed (end of stream, error, or an over-long line).
    fn serve(&mut self, h: &VmHandle) -> bool {
        let mut chunk = [0u8; 4096];
        let mut budget = READ_BUDGET;
        while budget > 0 {
            let n = match self.stream.read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return false,
            };
            budget = budget.saturating_sub(n);
            self.lines.push(&chunk[..n]);
            if !self.answer_lines(h) {
                return false;
            }
        }
        true
    }

    /// Answers every complete buffered line; false when the connection is to be closed.
    fn answer_lines(&mut self, h: &VmHandle) -> bool {
        loop {
            let line = match self.lines.next_line() {
                Ok(Some(line)) => line,
                Ok(None) => return true,
                Err(LineTooLong) => {
                    let e = format!("request line longer than {MAX_REQUEST_LINE} bytes");
                    self.reply(&Reply::Error(e).to_line());
                    return false;
                }
            };
            // Idle = no complete request: a client trickling bytes is idle too.
            self.last = Instant::now();
            let reply = match std::str::from_utf8(&line) {
                Ok(text) => handle_command(h, text),
                Err(_) => Reply::Error("request is not UTF-8".into()).to_line(),
            };
            if !self.reply(&reply) {
                return false;
            }
        }
    }
}

/// Bytes read from one client per poll round.
const READ_BUDGET: usize = 64 * 1024;

/// Accepts every pending connection; beyond [`MAX_CLIENTS`], answers with an error.
fn accept_clients(listener: &UnixListener, clients: &mut Vec<Client>) -> Result<(), VmmError> {
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(VmmError::io("accept control connection")(e)),
        };
        if stream.set_nonblocking(true).is_err() {
            continue;
        }
        let mut c = Client {
            stream,
            lines: LineBuffer::default(),
            last: Instant::now(),
        };
        if clients.len() >= MAX_CLIENTS {
            c.reply(&Reply::Error(format!("more than {MAX_CLIENTS} control clients")).to_line());
            continue;
        }
        clients.push(c);
    }
}

/// Serves control requests on `listener` until the VM behind `handle` has exited.
pub fn serve_control(listener: UnixListener, handle: VmHandle) -> Result<(), VmmError> {
    listener
        .set_nonblocking(true)
        .map_err(VmmError::io("control socket nonblocking"))?;
    let mut clients: Vec<Client> = Vec::new();
    loop {
        if handle.has_exited() {
            return Ok(());
        }
        let mut fds = vec![
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(handle.exited_fd(), PollFlags::POLLIN),
        ];
        fds.extend(
            clients
                .iter()
                .map(|c| PollFd::new(c.stream.as_fd(), PollFlags::POLLIN)),
        );
        poll(&mut fds, 1000)?;
        let listener_ready = is_ready(&fds[0]);
        let ready: Vec<bool> = fds[2..].iter().map(is_ready).collect();
        drop(fds);
        let mut ready = ready.into_iter();
        let now = Instant::now();
        clients.retain_mut(|c| {
            let keep = if ready.next() == Some(true) {
                c.serve(&handle)
            } else {
                true
            };
            keep && now.duration_since(c.last) < CLIENT_IDLE_TIMEOUT
        });
        if listener_ready {
            accept_clients(&listener, &mut clients)?;
        }
    }
}

/// poll(2) on `fds`; EINTR counts as a timeout.
fn poll(fds: &mut [PollFd<'_>], timeout_ms: u16) -> Result<(), VmmError> {
    match nix::poll::poll(fds, timeout_ms) {
        Ok(_) | Err(Errno::EINTR) => Ok(()),
        Err(e) => Err(VmmError::io("poll")(e.into())),
    }
}

/// Whether poll(2) reported anything for `fd` (readable, hung up, error, or a flag nix
/// does not know).
fn is_ready(fd: &PollFd<'_>) -> bool {
    fd.any().unwrap_or(true)
}

/// Polls `fd` and the VM's exit eventfd; returns true when `fd` is readable.
fn wait_readable(fd: BorrowedFd<'_>, handle: &VmHandle, timeout_ms: u16) -> Result<bool, VmmError> {
    let mut fds = [
        PollFd::new(fd, PollFlags::POLLIN),
        PollFd::new(handle.exited_fd(), PollFlags::POLLIN),
    ];
    poll(&mut fds, timeout_ms)?;
    Ok(is_ready(&fds[0]))
}

/// Serves the serial console on `listener` until the VM behind `handle` has exited.
/// One client at a time: it receives the buffered serial output (last 64 KiB), then
/// live output; bytes it sends are fed to the guest's COM1 receive FIFO.
pub fn serve_console(listener: UnixListener, handle: VmHandle) -> Result<(), VmmError> {
    listener
        .set_nonblocking(true)
        .map_err(VmmError::io("console socket nonblocking"))?;
    loop {
        if handle.has_exited() {
            return Ok(());
        }
        wait_readable(listener.as_fd(), &handle, 1000)?;
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                continue;
            }
            Err(e) => return Err(VmmError::io("accept console connection")(e)),
        };
        let Ok(out) = stream.try_clone() else {
            continue;
        };
        handle.attach_console(out);
        let mut input = stream;
        let mut buf = [0u8; 256];
        'client: loop {
            if handle.has_exited() {
                break;
            }
            if !wait_readable(input.as_fd(), &handle, 100)? {
                continue;
            }
            let n = match std::io::Read::read(&mut input, &mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                    continue;
                }
                Err(_) => break,
            };
            let mut rest = &buf[..n];
            while !rest.is_empty() {
                if handle.has_exited() {
                    break 'client;
                }
                let k = handle.serial_input(rest);
                rest = &rest[k..];
                if k == 0 {
                    // The guest has not drained the 16550 FIFO yet.
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        handle.detach_console();
    }
}

/// A client for the control socket (used by `stead` and by tests).
#[derive(Debug)]
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ControlClient {
    /// Connects to the control socket at `path`.
    pub fn connect(path: &Path) -> Result<ControlClient, VmmError> {
        let s = UnixStream::connect(path)
            .map_err(VmmError::io(format!("connect {}", path.display())))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(VmmError::io("control socket timeout"))?;
        let writer = s.try_clone().map_err(VmmError::io("control socket"))?;
        Ok(ControlClient {
            reader: BufReader::new(s),
            writer,
        })
    }

    /// Sends `req` and returns the parsed reply.
    pub fn call(&mut self, req: Request) -> Result<Reply, VmmError> {
        Reply::parse(&self.request(&req.to_line())?)
    }

    /// Sends one request line (e.g. `"status"`) and returns the JSON reply line.
    pub fn request(&mut self, command: &str) -> Result<String, VmmError> {
        self.writer
            .write_all(format!("{}\n", command.trim()).as_bytes())
            .map_err(VmmError::io("control socket write"))?;
        read_reply_line(&mut self.reader)
    }
}

/// Runs one VM in this process: builds it, binds the control socket
/// (`cfg.control_socket`, default `<run_dir>/control.sock`) and the serial console
/// socket (`cfg.console_socket`, default `<run_dir>/console.sock`), keeps
/// `<run_dir>/state.json` up to date, confines all VMM threads with seccomp (when
/// `cfg.seccomp`), and returns when the VM has stopped. The socket files are
/// removed on return; the state file stays with `"state":"exited"` and the reason.
///
/// With `cfg.seccomp`, the calling thread stays confined after this returns: it can
/// still write, close files and exit, but cannot build another VM. Call it as the last
/// thing a dedicated process does (restart policies restart the process).
pub fn run_vmm_process(cfg: VmConfig) -> Result<ExitReason, VmmError> {
    let socket_path: Option<PathBuf> = cfg
        .control_socket
        .clone()
        .or_else(|| cfg.run_dir.as_ref().map(|d| d.join("control.sock")));
    let console_path: Option<PathBuf> = cfg
        .console_socket
        .clone()
        .or_else(|| cfg.run_dir.as_ref().map(|d| d.join("console.sock")));
    if let Some(dir) = &cfg.run_dir {
        std::fs::create_dir_all(dir)
            .map_err(VmmError::io(format!("create run dir {}", dir.display())))?;
    }
    let listener = socket_path.as_deref().map(bind_socket).transpose()?;
    let console_listener = match console_path.as_deref().map(bind_socket).transpose() {
        Ok(l) => l,
        Err(e) => {
            remove_sockets(&[&socket_path]);
            return Err(e);
        }
    };
    let sockets = StateSockets {
        control: socket_path
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned()),
        console: console_path
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned()),
    };
    let result = run_with_sockets(cfg, listener, console_listener, sockets);
    remove_sockets(&[&socket_path, &console_path]);
    result
}

fn remove_sockets(paths: &[&Option<PathBuf>]) {
    for p in paths.iter().copied().flatten() {
        let _ = std::fs::remove_file(p);
    }
}

/// Binds a unix listener at `p`, replacing a stale socket file (a live one is an error).
fn bind_socket(p: &Path) -> Result<UnixListener, VmmError> {
    if p.exists() {
        if UnixStream::connect(p).is_ok() {
            return Err(VmmError::Control(format!(
                "socket {} is in use",
                p.display()
            )));
        }
        std::fs::remove_file(p).map_err(VmmError::io(format!("remove stale {}", p.display())))?;
    }
    let l = UnixListener::bind(p).map_err(VmmError::io(format!("bind {}", p.display())))?;
    // Connecting needs write permission: root only, whatever the umask was.
    std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(VmmError::io(format!("chmod {}", p.display())))?;
    Ok(l)
}

fn run_with_sockets(
    cfg: VmConfig,
    listener: Option<UnixListener>,
    console_listener: Option<UnixListener>,
    sockets: StateSockets,
) -> Result<ExitReason, VmmError> {
    let seccomp_on = cfg.seccomp;
    let jail = cfg.jail;
    let run_dir = cfg.run_dir.clone();
    if jail && run_dir.is_none() {
        return Err(VmmError::Config("the VMM jail needs a run dir".into()));
    }
    let mut vm = Vm::new(cfg)?;
    let handle = vm.handle();
    if let Some(dir) = &run_dir {
        handle.set_state_file(dir.join("state.json"), sockets);
        if jail {
            handle.hold_state_file()?;
            let id = crate::jail::enter(dir)?;
            eprintln!("stead vmm: jailed as uid/gid {id}");
        }
    }
    let filter = if seccomp_on {
        Some(std::sync::Arc::new(seccomp::filter()?))
    } else {
        None
    };
    type Server = fn(UnixListener, VmHandle) -> Result<(), VmmError>;
    let mut threads = Vec::new();
    for (name, l, serve) in [
        ("vmm-ctl", listener, serve_control as Server),
        ("vmm-console", console_listener, serve_console as Server),
    ] {
        let Some(l) = l else { continue };
        let h = handle.clone();
        let f = filter.clone();
        let t =
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || -> Result<(), VmmError> {
                    if let Some(f) = &f {
                        seccomp::apply(f)?;
                    }
                    serve(l, h)
                });
        match t {
            Ok(t) => threads.push(t),
            Err(e) => {
                handle.kill();
                return Err(VmmError::io("spawn control thread")(e));
            }
        }
    }
    vm.confine_caller();
    let result = vm.run();
    handle.mark_exited();
    let mut first_err = None;
    for t in threads {
        if let Ok(Err(e)) = t.join() {
            first_err.get_or_insert(e);
        }
    }
    match (result, first_err) {
        (Ok(_), Some(e)) => Err(e),
        (r, _) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_socket_is_replaced_live_one_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("s.sock");
        let live = bind_socket(&p).expect("bind");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&p).expect("socket").permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        assert!(matches!(bind_socket(&p), Err(VmmError::Control(_))));
        drop(live);
        // The file stays behind after the listener is gone: a stale socket.
        assert!(p.exists());
        bind_socket(&p).expect("rebind over stale socket");
    }
}
