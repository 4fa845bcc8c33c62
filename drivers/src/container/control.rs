//! The shim's control protocol and its clients: `status`, `stop`, `signal`, `update`,
//! and the CLI helpers [`exec`], [`logs`], [`console`].
//!
//! Protocol: a client connects to `<run_dir>/containers/<name>/control.sock` and sends one
//! JSON [`Request`] terminated by `\n` (for `exec`, with its stdin/stdout/stderr attached
//! as `SCM_RIGHTS` to the same message); the shim answers one JSON line
//! `{"ok":bool,"error"?,"state"?,"exitCode"?}`. `console` turns the connection into a raw
//! byte stream after the reply.

use std::collections::BTreeMap;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};
use stead_host::cgroup::Limits;
use stead_reconciler::driver::DriverError;
use stead_schema::RestartPolicy;

use super::config::{Paths, ShimState};

/// A control request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum Request {
    /// The shim's state.
    Status,
    /// Graceful stop; the reply comes when the container is down and cleaned up.
    Stop {
        /// Seconds before SIGKILL (default: the config's).
        #[serde(default, rename = "timeoutSecs")]
        timeout_secs: Option<u64>,
    },
    /// Sends a signal to init.
    Signal {
        /// Signal number.
        signal: i32,
    },
    /// Hot update of limits and restart policy.
    Update {
        /// New limits.
        limits: Limits,
        /// New restart policy.
        #[serde(rename = "restartPolicy")]
        restart_policy: RestartPolicy,
        /// New desired-state record.
        #[serde(default)]
        desired: Option<serde_json::Value>,
    },
    /// Runs a command in the container (stdio passed as fds).
    Exec {
        /// Command and arguments.
        args: Vec<String>,
        /// Extra environment.
        #[serde(default)]
        env: BTreeMap<String, String>,
    },
    /// Attaches to the console.
    Console,
}

/// A reply.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reply {
    /// Success.
    pub ok: bool,
    /// Error message.
    #[serde(default)]
    pub error: Option<String>,
    /// Shim state (`status`, `stop`).
    #[serde(default)]
    pub state: Option<ShimState>,
    /// Exit code (`exec`).
    #[serde(default, alias = "exit_code")]
    pub exit_code: Option<i32>,
}

/// Server side: reads one request line and the fds attached to it.
pub(crate) fn recv_request(conn: &UnixStream) -> Result<(Request, Vec<OwnedFd>), String> {
    let mut data = Vec::new();
    let mut fds = Vec::new();
    let mut buf = [0u8; 4096];
    while !data.contains(&b'\n') {
        if data.len() > 1 << 20 {
            return Err("request too large".into());
        }
        let mut cmsg = nix::cmsg_space!([RawFd; 3]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| format!("read request: {e}"))?;
        let n = msg.bytes;
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(r) = c {
                    // SAFETY: the kernel just installed these descriptors for us (close-on-exec)
                    // and nothing else owns them; each becomes one OwnedFd. nix hands
                    // SCM_RIGHTS out as raw fds, and rustix's owned-fd variant needs its
                    // `net` feature, which the workspace does not build.
                    fds.extend(r.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                }
            }
        }
        if n == 0 {
            break;
        }
        data.extend_from_slice(&buf[..n]);
    }
    let line = data.split(|b| *b == b'\n').next().unwrap_or_default();
    let req = serde_json::from_slice(line).map_err(|e| format!("bad request: {e}"))?;
    Ok((req, fds))
}

fn connect(run_dir: &Path, name: &str) -> Result<UnixStream, DriverError> {
    let sock = Paths::new(run_dir, name).socket();
    UnixStream::connect(&sock).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            DriverError::NotReady(format!("container {name} is not running (no supervisor)"))
        }
        _ => DriverError::io(format!("connect {}", sock.display()), e),
    })
}

fn send(conn: &UnixStream, req: &Request, fds: &[RawFd]) -> Result<(), DriverError> {
    let mut line =
        serde_json::to_vec(req).map_err(|e| DriverError::Other(format!("encode request: {e}")))?;
    line.push(b'\n');
    let iov = [IoSlice::new(&line)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    let n = sendmsg::<()>(conn.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)
        .map_err(|e| DriverError::io("send request", e.into()))?;
    if n < line.len() {
        (&*conn)
            .write_all(&line[n..])
            .map_err(|e| DriverError::io("send request", e))?;
    }
    Ok(())
}

/// Reads the reply line byte by byte: after a `console` reply the stream goes on, and
/// nothing past the newline may be consumed.
fn read_reply(conn: &UnixStream) -> Result<Reply, DriverError> {
    read_reply_in(conn, 1)
}

/// Reads the reply line `chunk` bytes at a time (more than 1 only when the reply is the
/// last thing on the connection) and parses it.
fn read_reply_in(conn: &UnixStream, chunk: usize) -> Result<Reply, DriverError> {
    let mut data = Vec::new();
    let mut b = vec![0u8; chunk];
    loop {
        match (&*conn).read(&mut b) {
            Ok(0) => break,
            Ok(n) => {
                let got = &b[..n];
                if let Some(end) = got.iter().position(|c| *c == b'\n') {
                    data.extend_from_slice(&got[..end]);
                    break;
                }
                data.extend_from_slice(got);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(DriverError::io("read reply", e)),
        }
    }
    if data.is_empty() {
        return Err(DriverError::Other(
            "supervisor closed the connection".into(),
        ));
    }
    serde_json::from_slice(&data).map_err(|e| DriverError::Other(format!("bad reply: {e}")))
}

/// Sends `req` and waits up to `timeout` for the reply.
pub fn request(
    run_dir: &Path,
    name: &str,
    req: &Request,
    timeout: Duration,
) -> Result<Reply, DriverError> {
    let conn = connect(run_dir, name)?;
    conn.set_read_timeout(Some(timeout))
        .map_err(|e| DriverError::io("socket timeout", e))?;
    send(&conn, req, &[])?;
    // The reply is the last thing on this connection: read it in one go, not a syscall
    // per byte.
    let r = read_reply_in(&conn, 4096)?;
    if !r.ok {
        return Err(DriverError::Other(
            r.error.unwrap_or_else(|| "request failed".into()),
        ));
    }
    Ok(r)
}

/// `stead exec Container/name -- cmd...`: runs `args` inside the container with the given
/// stdin/stdout/stderr and returns its exit code (128+signal when killed).
pub fn exec_with(
    run_dir: &Path,
    name: &str,
    args: &[String],
    env: &BTreeMap<String, String>,
    stdio: [&dyn AsFd; 3],
) -> Result<i32, DriverError> {
    let conn = connect(run_dir, name)?;
    let fds = stdio.map(|f| f.as_fd().as_raw_fd());
    send(
        &conn,
        &Request::Exec {
            args: args.to_vec(),
            env: env.clone(),
        },
        &fds,
    )?;
    let r = read_reply(&conn)?;
    if !r.ok {
        return Err(DriverError::Other(
            r.error.unwrap_or_else(|| "exec failed".into()),
        ));
    }
    r.exit_code
        .ok_or_else(|| DriverError::Other("exec reply without exit code".into()))
}

/// `stead exec` with the caller's own stdin/stdout/stderr.
pub fn exec(run_dir: &Path, name: &str, args: &[String]) -> Result<i32, DriverError> {
    exec_with(
        run_dir,
        name,
        args,
        &BTreeMap::new(),
        [&io::stdin(), &io::stdout(), &io::stderr()],
    )
}

/// `stead logs`: copies the console log to `out`; with `follow`, keeps copying new output
/// until the container's supervisor is gone.
pub fn logs(
    run_dir: &Path,
    name: &str,
    follow: bool,
    out: &mut dyn Write,
) -> Result<(), DriverError> {
    let paths = Paths::new(run_dir, name);
    let p = paths.console_log();
    let open =
        || std::fs::File::open(&p).map_err(|e| DriverError::io(format!("open {}", p.display()), e));
    crate::supervise::copy_log(&p, open, follow, || super::shim::lock_held(&paths), out)
}

/// Detach key for [`console`]: Ctrl-].
pub use crate::supervise::console::CONSOLE_DETACH;

/// `stead console`: attaches the terminal to the container's console (raw mode) until
/// Ctrl-] or the container goes away.
pub fn console(run_dir: &Path, name: &str) -> Result<(), DriverError> {
    let conn = connect(run_dir, name)?;
    send(&conn, &Request::Console, &[])?;
    let r = read_reply(&conn)?;
    if !r.ok {
        return Err(DriverError::Other(r.error.unwrap_or_default()));
    }
    crate::supervise::console::attach(&conn, &Default::default())
}

/// Container `name`'s console as a stream for a relay of one's own (the web UI's):
/// the supervisor's socket once it accepted the console request.
pub fn console_stream(run_dir: &Path, name: &str) -> Result<UnixStream, DriverError> {
    let conn = connect(run_dir, name)?;
    send(&conn, &Request::Console, &[])?;
    let r = read_reply(&conn)?;
    if !r.ok {
        return Err(DriverError::Other(r.error.unwrap_or_default()));
    }
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_json_shape() {
        let r = Request::Stop {
            timeout_secs: Some(3),
        };
        let s = serde_json::to_string(&r).expect("json");
        assert_eq!(s, r#"{"op":"stop","timeoutSecs":3}"#);
        let back: Request = serde_json::from_str(r#"{"op":"exec","args":["ps"]}"#).expect("parse");
        assert_eq!(
            back,
            Request::Exec {
                args: vec!["ps".into()],
                env: BTreeMap::new()
            }
        );
    }
}
