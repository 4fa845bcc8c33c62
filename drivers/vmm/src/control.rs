//! Control socket and the whole-process entry point.
//!
//! Protocol: unix stream socket, one request per line, one JSON object per line in
//! reply. Requests are `status`, `pause`, `resume`, `shutdown` (graceful, forced after
//! the configured timeout) and `kill`; `{"command":"status"}` is accepted too.
//! Replies: `{"ok":true,"state":"running","vcpus":2,"uptime_ms":12,"pid":42}` or
//! `{"ok":false,"error":"..."}`. One client is served at a time.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{ExitReason, Vm, VmConfig, VmHandle, VmmError, json_str, seccomp};

fn status_json(h: &VmHandle) -> String {
    let exit = h
        .exit_reason()
        .map(|e| format!(",\"exit_reason\":{}", json_str(&e.to_string())))
        .unwrap_or_default();
    format!(
        "{{\"ok\":true,\"state\":\"{}\",\"vcpus\":{},\"uptime_ms\":{},\"pid\":{}{}}}",
        h.state().as_str(),
        h.vcpus(),
        h.uptime().as_millis(),
        std::process::id(),
        exit
    )
}

fn command_of(line: &str) -> String {
    let line = line.trim();
    if line.starts_with('{') {
        // {"command":"pause"}: take the string after the "command" key.
        if let Some(i) = line.find("\"command\"") {
            let rest = &line[i + 9..];
            if let Some(start) = rest.find('"') {
                let rest = &rest[start + 1..];
                if let Some(end) = rest.find('"') {
                    return rest[..end].to_string();
                }
            }
        }
        return String::new();
    }
    line.to_ascii_lowercase()
}

/// Executes one control command and returns the JSON reply line (without newline).
pub fn handle_command(h: &VmHandle, line: &str) -> String {
    let err = |e: VmmError| format!("{{\"ok\":false,\"error\":{}}}", json_str(&e.to_string()));
    match command_of(line).as_str() {
        "status" => status_json(h),
        "pause" => h.pause().map(|_| status_json(h)).unwrap_or_else(err),
        "resume" => h.resume().map(|_| status_json(h)).unwrap_or_else(err),
        "shutdown" => h.shutdown().map(|_| status_json(h)).unwrap_or_else(err),
        "kill" => {
            h.kill();
            status_json(h)
        }
        other => err(VmmError::Control(format!("unknown command {other:?}"))),
    }
}

fn serve_client(stream: UnixStream, h: &VmHandle) {
    if stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .is_err()
    {
        return;
    }
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if line.ends_with('\n') {
                    let reply = handle_command(h, &line);
                    line.clear();
                    if out.write_all(format!("{reply}\n").as_bytes()).is_err() {
                        return;
                    }
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if h.has_exited() {
                    return;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Serves control requests on `listener` until the VM behind `handle` has exited.
pub fn serve_control(listener: UnixListener, handle: VmHandle) -> Result<(), VmmError> {
    listener
        .set_nonblocking(true)
        .map_err(VmmError::io("control socket nonblocking"))?;
    loop {
        if handle.has_exited() {
            return Ok(());
        }
        wait_readable(listener.as_raw_fd(), &handle, 1000)?;
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                serve_client(stream, &handle);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(VmmError::io("accept control connection")(e)),
        }
    }
}

/// Polls `fd` and the VM's exit eventfd; returns true when `fd` is readable.
fn wait_readable(fd: i32, handle: &VmHandle, timeout_ms: i32) -> Result<bool, VmmError> {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: handle.exited_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(VmmError::io("poll")(e));
    }
    Ok(fds[0].revents != 0)
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
        wait_readable(listener.as_raw_fd(), &handle, 1000)?;
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
            if !wait_readable(input.as_raw_fd(), &handle, 100)? {
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

    /// Sends one command (e.g. `"status"`) and returns the JSON reply line.
    pub fn request(&mut self, command: &str) -> Result<String, VmmError> {
        self.writer
            .write_all(format!("{}\n", command.trim()).as_bytes())
            .map_err(VmmError::io("control socket write"))?;
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .map_err(VmmError::io("control socket read"))?;
        if line.is_empty() {
            return Err(VmmError::Control("connection closed".into()));
        }
        Ok(line.trim_end().to_string())
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
    let mut extra = String::new();
    for (key, p) in [
        ("control_socket", &socket_path),
        ("console_socket", &console_path),
    ] {
        if let Some(p) = p {
            extra.push_str(&format!(",\"{key}\":{}", json_str(&p.to_string_lossy())));
        }
    }
    let result = run_with_sockets(cfg, listener, console_listener, extra);
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
    UnixListener::bind(p).map_err(VmmError::io(format!("bind {}", p.display())))
}

fn run_with_sockets(
    cfg: VmConfig,
    listener: Option<UnixListener>,
    console_listener: Option<UnixListener>,
    extra: String,
) -> Result<ExitReason, VmmError> {
    let seccomp_on = cfg.seccomp;
    let run_dir = cfg.run_dir.clone();
    let mut vm = Vm::new(cfg)?;
    let handle = vm.handle();
    if let Some(dir) = run_dir {
        handle.set_state_file(dir.join("state.json"), extra);
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
    fn commands_parse_as_text_or_json() {
        assert_eq!(command_of("status\n"), "status");
        assert_eq!(command_of("  PAUSE "), "pause");
        assert_eq!(command_of("{\"command\": \"resume\"}"), "resume");
        assert_eq!(command_of("{\"cmd\":\"x\"}"), "");
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_str("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
    }

    #[test]
    fn stale_socket_is_replaced_live_one_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("s.sock");
        let live = bind_socket(&p).expect("bind");
        assert!(matches!(bind_socket(&p), Err(VmmError::Control(_))));
        drop(live);
        // The file stays behind after the listener is gone: a stale socket.
        assert!(p.exists());
        bind_socket(&p).expect("rebind over stale socket");
    }
}
