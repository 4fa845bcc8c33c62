//! A blocking client for the QEMU guest agent (`qemu-ga`) over its virtio-serial unix socket.
//!
//! The socket is QEMU's end of a virtio-serial port: it accepts a connection whether or not
//! the agent runs in the guest, and bytes of an earlier client (or answers to commands that
//! timed out) may still be in flight. So every connection starts with
//! `guest-sync-delimited`: a 0xFF byte (the agent drops any half-read input), then the
//! command with a random id; the agent answers with a 0xFF sentinel and that id, and
//! everything before it is stale. [`Qga::connect`] retries that until its deadline (the
//! agent may still be starting), and any later timeout re-syncs before the next command.
//!
//! `guest-shutdown` gives no reply when it works; `guest-exec` output and file contents
//! travel base64-encoded and are decoded here.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use stead_reconciler::driver::DriverError;

use super::jsonline::{JsonLines, LineError};

/// Per-command timeout unless the connection was given another.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The first wait for a sync answer; later attempts double it (up to the deadline).
const FIRST_SYNC_WAIT: Duration = Duration::from_millis(500);

/// The sentinel byte of `guest-sync-delimited`.
const SENTINEL: u8 = 0xff;

/// A guest agent failure.
#[derive(Debug, thiserror::Error)]
pub enum QgaError {
    /// The socket could not be connected (QEMU not running).
    #[error("connect to guest agent socket {}: {source}", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The agent did not answer `guest-sync-delimited` in time: not running in the guest
    /// (not installed, not started yet, or the guest is down).
    #[error("guest agent did not answer within {0:?} (not running in the guest?)")]
    NotResponding(Duration),
    /// A socket read or write failed.
    #[error("guest agent {context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The agent did not answer a command in time.
    #[error("guest agent: no answer to {what} within {after:?}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The time waited.
        after: Duration,
    },
    /// QEMU closed the socket (QEMU quit).
    #[error("guest agent: the socket closed while waiting for {0}")]
    Closed(String),
    /// Something that is not the agent's protocol.
    #[error("guest agent protocol: {0}")]
    Protocol(String),
    /// The agent refused a command; `class` and `desc` are its own words.
    #[error("guest agent {command}: {class}: {desc}")]
    Command {
        /// The command name.
        command: String,
        /// The error class (`GenericError`, `CommandNotFound`, …).
        class: String,
        /// The description.
        desc: String,
    },
}

impl QgaError {
    fn from_line(e: LineError, what: &str, after: Duration) -> Self {
        match e {
            LineError::Timeout => QgaError::Timeout {
                what: what.to_string(),
                after,
            },
            LineError::Closed => QgaError::Closed(what.to_string()),
            LineError::TooLong => {
                QgaError::Protocol(format!("over-long line while reading {what}"))
            }
            LineError::Io(source) => QgaError::Io {
                context: what.to_string(),
                source,
            },
        }
    }
}

impl From<QgaError> for DriverError {
    fn from(e: QgaError) -> Self {
        match e {
            QgaError::Connect { ref source, .. }
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                DriverError::NotReady(e.to_string())
            }
            QgaError::Connect { path, source } => DriverError::io(
                format!("connect to guest agent socket {}", path.display()),
                source,
            ),
            QgaError::Io { context, source } => {
                DriverError::io(format!("guest agent {context}"), source)
            }
            QgaError::NotResponding(_) | QgaError::Timeout { .. } => {
                DriverError::NotReady(e.to_string())
            }
            QgaError::Command { ref class, .. } if class == "CommandNotFound" => {
                DriverError::Unsupported(e.to_string())
            }
            other => DriverError::Other(other.to_string()),
        }
    }
}

/// A fresh id for `guest-sync-delimited` (random per process, then counted).
fn sync_id() -> i64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    // Positive and exact in a double, whatever reads it.
    (h.finish() & ((1 << 52) - 1)) as i64
}

/// What a line from the agent says.
#[derive(Debug, PartialEq)]
enum Reply {
    Return(Value),
    Error { class: String, desc: String },
}

/// Parses one line of the agent; a 0xFF sentinel inside it (the delimiter of a late sync
/// answer) starts the message afresh.
fn parse_reply(line: &[u8]) -> Result<Reply, QgaError> {
    let line = match line.iter().rposition(|b| *b == SENTINEL) {
        Some(p) => &line[p + 1..],
        None => line,
    };
    let v: Value = serde_json::from_slice(line).map_err(|e| {
        QgaError::Protocol(format!("not JSON ({e}): {}", String::from_utf8_lossy(line)))
    })?;
    let Value::Object(mut m) = v else {
        return Err(QgaError::Protocol(format!("not an object: {v}")));
    };
    if let Some(r) = m.remove("return") {
        return Ok(Reply::Return(r));
    }
    if let Some(err) = m.remove("error") {
        let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        return Ok(Reply::Error {
            class: field("class"),
            desc: field("desc"),
        });
    }
    Err(QgaError::Protocol(format!(
        "unexpected message: {}",
        Value::Object(m)
    )))
}

/// One guest agent connection.
#[derive(Debug)]
pub struct Qga {
    conn: JsonLines,
    timeout: Duration,
    /// A command timed out: its late answer may still come, so sync before the next one.
    needs_sync: bool,
}

impl Qga {
    /// Connects to the agent socket at `path` and syncs with the agent, retrying until
    /// `timeout` (the agent may still be starting in the guest). `timeout` also becomes the
    /// per-command timeout.
    #[tracing::instrument(level = "debug", skip_all, fields(path = %path.display()))]
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QgaError> {
        let stream = UnixStream::connect(path).map_err(|source| QgaError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        Self::over(stream, timeout)
    }

    /// Syncs with the agent over an already connected stream.
    pub fn over(stream: UnixStream, timeout: Duration) -> Result<Self, QgaError> {
        let mut qga = Qga {
            conn: JsonLines::new(stream),
            timeout,
            needs_sync: true,
        };
        qga.sync(timeout)?;
        Ok(qga)
    }

    /// The per-command timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sets the per-command timeout.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// `guest-sync-delimited` until the agent answers with our id, within `timeout`; drops
    /// everything stale before that answer.
    pub fn sync(&mut self, timeout: Duration) -> Result<(), QgaError> {
        let deadline = Instant::now() + timeout;
        let mut wait = FIRST_SYNC_WAIT;
        loop {
            let attempt = (Instant::now() + wait).min(deadline);
            match self.sync_once(attempt) {
                Ok(()) => {
                    self.needs_sync = false;
                    return Ok(());
                }
                Err(LineError::Timeout) if Instant::now() < deadline => wait *= 2,
                Err(LineError::Timeout) => return Err(QgaError::NotResponding(timeout)),
                Err(e) => return Err(QgaError::from_line(e, "guest-sync-delimited", timeout)),
            }
        }
    }

    fn sync_once(&mut self, deadline: Instant) -> Result<(), LineError> {
        let id = sync_id();
        let mut msg = vec![SENTINEL];
        msg.extend_from_slice(
            json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})
                .to_string()
                .as_bytes(),
        );
        msg.push(b'\n');
        self.conn.write(&msg, &[], deadline)?;
        self.conn.discard_through(SENTINEL, deadline)?;
        loop {
            let line = self.conn.read_line(deadline)?;
            match parse_reply(&line) {
                Ok(Reply::Return(v)) if v == json!(id) => return Ok(()),
                stale => tracing::debug!(?stale, "guest agent: skipping a stale line"),
            }
        }
    }

    /// Executes a typed command with the connection's timeout.
    pub fn execute<C: QgaCommand>(&mut self, cmd: &C) -> Result<C::Ret, QgaError> {
        self.execute_timeout(cmd, self.timeout)
    }

    /// Executes a typed command within `timeout` (re-syncing first after an earlier timeout).
    #[tracing::instrument(level = "debug", skip(self, cmd), fields(command = C::NAME))]
    pub fn execute_timeout<C: QgaCommand>(
        &mut self,
        cmd: &C,
        timeout: Duration,
    ) -> Result<C::Ret, QgaError> {
        let args = serde_json::to_value(cmd)
            .map_err(|e| QgaError::Protocol(format!("encode {} arguments: {e}", C::NAME)))?;
        let value = self.execute_raw(C::NAME, args, timeout)?;
        serde_json::from_value(value)
            .map_err(|e| QgaError::Protocol(format!("decode {} reply: {e}", C::NAME)))
    }

    fn send(&mut self, name: &str, args: Value, deadline: Instant) -> Result<(), QgaError> {
        if self.needs_sync {
            let left = deadline.saturating_duration_since(Instant::now());
            self.sync(left)?;
        }
        let mut msg = Map::new();
        msg.insert("execute".into(), Value::String(name.into()));
        if !args.is_null() {
            msg.insert("arguments".into(), args);
        }
        self.conn
            .send_json(&Value::Object(msg), &[], deadline)
            .map_err(|e| {
                self.needs_sync = true;
                QgaError::from_line(e, name, Duration::ZERO)
            })
    }

    /// Executes a command by name with untyped arguments (`null` for none).
    pub fn execute_raw(
        &mut self,
        name: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<Value, QgaError> {
        let deadline = Instant::now() + timeout;
        self.send(name, args, deadline)?;
        let line = self.conn.read_line(deadline).map_err(|e| {
            self.needs_sync = true;
            QgaError::from_line(e, name, timeout)
        })?;
        match parse_reply(&line) {
            Ok(Reply::Return(v)) => Ok(v),
            Ok(Reply::Error { class, desc }) => Err(QgaError::Command {
                command: name.into(),
                class,
                desc,
            }),
            Err(e) => {
                self.needs_sync = true;
                Err(e)
            }
        }
    }

    // ----- conveniences -----

    /// `guest-ping`.
    pub fn ping(&mut self) -> Result<(), QgaError> {
        self.execute(&GuestPing).map(|_| ())
    }

    /// `guest-info`.
    pub fn info(&mut self) -> Result<GuestInfo, QgaError> {
        self.execute(&GuestInfoCmd)
    }

    /// `guest-network-get-interfaces`.
    pub fn network_interfaces(&mut self) -> Result<Vec<GuestInterface>, QgaError> {
        self.execute(&GuestNetworkGetInterfaces)
    }

    /// `guest-fsfreeze-freeze`: returns how many file systems were frozen. Freezing waits
    /// for the guest to flush, hence its own `timeout`.
    pub fn fsfreeze_freeze(&mut self, timeout: Duration) -> Result<u64, QgaError> {
        self.execute_timeout(&GuestFsfreezeFreeze, timeout)
    }

    /// `guest-fsfreeze-thaw`: returns how many file systems were thawed.
    pub fn fsfreeze_thaw(&mut self) -> Result<u64, QgaError> {
        self.execute(&GuestFsfreezeThaw)
    }

    /// `guest-fsfreeze-status`.
    pub fn fsfreeze_status(&mut self) -> Result<FsfreezeStatus, QgaError> {
        self.execute(&GuestFsfreezeStatus)
    }

    /// `guest-shutdown`. The agent answers only when it refuses; silence (or the socket
    /// closing as QEMU quits) within `grace` means the guest is going down.
    pub fn shutdown(&mut self, mode: ShutdownMode, grace: Duration) -> Result<(), QgaError> {
        let deadline = Instant::now() + grace;
        let args = json!({"mode": mode});
        self.send("guest-shutdown", args, deadline)?;
        // Whatever comes later belongs to a guest on its way down: never read it as a reply.
        self.needs_sync = true;
        match self.conn.read_line(deadline) {
            Ok(line) => match parse_reply(&line)? {
                Reply::Error { class, desc } => Err(QgaError::Command {
                    command: "guest-shutdown".into(),
                    class,
                    desc,
                }),
                Reply::Return(_) => Ok(()),
            },
            Err(LineError::Timeout | LineError::Closed) => Ok(()),
            Err(e) => Err(QgaError::from_line(e, "guest-shutdown", grace)),
        }
    }

    /// `guest-exec` with captured output, then `guest-exec-status` until the process exits
    /// (or `timeout`). `input` is fed to its stdin.
    pub fn exec(
        &mut self,
        path: &str,
        args: &[&str],
        input: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<ExecOutput, QgaError> {
        let started = self.execute(&GuestExec {
            path: path.into(),
            arg: args.iter().map(|a| a.to_string()).collect(),
            env: Vec::new(),
            input_data: input.map(base64_encode),
            capture_output: true,
        })?;
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.execute(&GuestExecStatus { pid: started.pid })?;
            if st.exited {
                return st.into_output();
            }
            if Instant::now() >= deadline {
                return Err(QgaError::Timeout {
                    what: format!("{path} (pid {}) to exit", started.pid),
                    after: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Reads a small file of the guest whole (`guest-file-open/read/close`), refusing one
    /// larger than `max` bytes.
    pub fn read_file(&mut self, path: &str, max: usize) -> Result<Vec<u8>, QgaError> {
        let handle = self.execute(&GuestFileOpen {
            path: path.into(),
            mode: Some("r".into()),
        })?;
        let read = self.read_handle(handle, max);
        let closed = self.execute(&GuestFileClose { handle });
        let data = read?;
        closed?;
        Ok(data)
    }

    fn read_handle(&mut self, handle: i64, max: usize) -> Result<Vec<u8>, QgaError> {
        let mut data = Vec::new();
        loop {
            let chunk = self.execute(&GuestFileRead {
                handle,
                count: Some(64 << 10),
            })?;
            data.extend(base64_decode(&chunk.buf_b64)?);
            if data.len() > max {
                return Err(QgaError::Protocol(format!("file larger than {max} bytes")));
            }
            if chunk.eof || chunk.count == 0 {
                return Ok(data);
            }
        }
    }

    /// Writes `data` to a guest file (created or truncated), through
    /// `guest-file-open/write/close`.
    pub fn write_file(&mut self, path: &str, data: &[u8]) -> Result<(), QgaError> {
        let handle = self.execute(&GuestFileOpen {
            path: path.into(),
            mode: Some("w".into()),
        })?;
        let mut written = Ok(());
        for chunk in data.chunks(48 << 10) {
            if let Err(e) = self.execute(&GuestFileWrite {
                handle,
                buf_b64: base64_encode(chunk),
            }) {
                written = Err(e);
                break;
            }
        }
        let closed = self.execute(&GuestFileClose { handle });
        written?;
        closed.map(|_| ())
    }
}

// ----- typed commands -----

/// A guest agent command with typed arguments and reply (a unit struct sends none).
pub trait QgaCommand: Serialize {
    /// The command name.
    const NAME: &'static str;
    /// The type of its `return` value.
    type Ret: DeserializeOwned;
}

macro_rules! unit_command {
    ($(#[$doc:meta])* $ty:ident, $name:literal, $ret:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Default, Serialize)]
        pub struct $ty;
        impl QgaCommand for $ty {
            const NAME: &'static str = $name;
            type Ret = $ret;
        }
    };
}

macro_rules! command {
    ($ty:ident, $name:literal, $ret:ty) => {
        impl QgaCommand for $ty {
            const NAME: &'static str = $name;
            type Ret = $ret;
        }
    };
}

/// The reply of commands that return `{}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Empty {}

unit_command!(
    /// `guest-ping`.
    GuestPing,
    "guest-ping",
    Empty
);
unit_command!(
    /// `guest-info`.
    GuestInfoCmd,
    "guest-info",
    GuestInfo
);
unit_command!(
    /// `guest-network-get-interfaces`.
    GuestNetworkGetInterfaces,
    "guest-network-get-interfaces",
    Vec<GuestInterface>
);
unit_command!(
    /// `guest-fsfreeze-freeze`.
    GuestFsfreezeFreeze,
    "guest-fsfreeze-freeze",
    u64
);
unit_command!(
    /// `guest-fsfreeze-thaw`.
    GuestFsfreezeThaw,
    "guest-fsfreeze-thaw",
    u64
);
unit_command!(
    /// `guest-fsfreeze-status`.
    GuestFsfreezeStatus,
    "guest-fsfreeze-status",
    FsfreezeStatus
);

/// `guest-info` reply.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct GuestInfo {
    /// The agent's version.
    pub version: String,
    /// The commands it knows.
    #[serde(default)]
    pub supported_commands: Vec<GuestCommandInfo>,
}

impl GuestInfo {
    /// Whether the agent has `name` and it is enabled.
    pub fn supports(&self, name: &str) -> bool {
        self.supported_commands
            .iter()
            .any(|c| c.name == name && c.enabled)
    }
}

/// One command of `guest-info`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct GuestCommandInfo {
    /// Its name.
    pub name: String,
    /// Whether it may be used.
    pub enabled: bool,
}

/// A guest network interface.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestInterface {
    /// Its name in the guest (`eth0`, `enp0s3`, `lo`).
    pub name: String,
    /// Its MAC address.
    pub hardware_address: Option<String>,
    /// Its addresses.
    #[serde(default)]
    pub ip_addresses: Vec<GuestIpAddress>,
}

/// An address of a guest interface.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestIpAddress {
    /// The address.
    pub ip_address: String,
    /// IPv4 or IPv6.
    pub ip_address_type: IpFamily,
    /// Prefix length.
    pub prefix: u8,
}

impl GuestIpAddress {
    /// The address parsed, if it parses.
    pub fn addr(&self) -> Option<std::net::IpAddr> {
        self.ip_address.parse().ok()
    }
}

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IpFamily {
    /// IPv4.
    Ipv4,
    /// IPv6.
    Ipv6,
}

/// `guest-fsfreeze-status` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsfreezeStatus {
    /// Not frozen.
    Thawed,
    /// Frozen.
    Frozen,
}

/// `guest-shutdown` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ShutdownMode {
    /// Power off.
    Powerdown,
    /// Halt.
    Halt,
    /// Reboot.
    Reboot,
}

/// `guest-exec`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestExec {
    /// The program.
    pub path: String,
    /// Its arguments.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub arg: Vec<String>,
    /// Its environment (`NAME=value`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// Its stdin, base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_data: Option<String>,
    /// Keep its stdout/stderr for `guest-exec-status`.
    pub capture_output: bool,
}
command!(GuestExec, "guest-exec", GuestExecStarted);

/// `guest-exec` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct GuestExecStarted {
    /// The guest pid.
    pub pid: i64,
}

/// `guest-exec-status`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct GuestExecStatus {
    /// The pid from `guest-exec`.
    pub pid: i64,
}
command!(GuestExecStatus, "guest-exec-status", ExecStatus);

/// `guest-exec-status` reply (output still base64).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ExecStatus {
    /// Whether it exited.
    pub exited: bool,
    /// Its exit code.
    pub exitcode: Option<i32>,
    /// The signal that killed it.
    pub signal: Option<i32>,
    /// Its stdout, base64.
    pub out_data: Option<String>,
    /// Its stderr, base64.
    pub err_data: Option<String>,
    /// Stdout was cut at the agent's limit.
    #[serde(default)]
    pub out_truncated: bool,
    /// Stderr was cut at the agent's limit.
    #[serde(default)]
    pub err_truncated: bool,
}

impl ExecStatus {
    fn into_output(self) -> Result<ExecOutput, QgaError> {
        let decode = |d: Option<String>| d.as_deref().map(base64_decode).unwrap_or(Ok(Vec::new()));
        Ok(ExecOutput {
            exit_code: self.exitcode,
            signal: self.signal,
            stdout: decode(self.out_data)?,
            stderr: decode(self.err_data)?,
            truncated: self.out_truncated || self.err_truncated,
        })
    }
}

/// A finished `guest-exec`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Its exit code (absent when a signal killed it).
    pub exit_code: Option<i32>,
    /// The signal that killed it.
    pub signal: Option<i32>,
    /// Its stdout.
    pub stdout: Vec<u8>,
    /// Its stderr.
    pub stderr: Vec<u8>,
    /// Output was cut at the agent's limit.
    pub truncated: bool,
}

impl ExecOutput {
    /// Exited with code 0.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
}

/// `guest-file-open` (returns a handle).
#[derive(Debug, Clone, Serialize)]
pub struct GuestFileOpen {
    /// The guest path.
    pub path: String,
    /// fopen(3) mode (`r` if absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}
command!(GuestFileOpen, "guest-file-open", i64);

/// `guest-file-read`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct GuestFileRead {
    /// The handle.
    pub handle: i64,
    /// Bytes to read at most.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}
command!(GuestFileRead, "guest-file-read", FileRead);

/// `guest-file-read` reply.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct FileRead {
    /// Bytes read.
    pub count: u64,
    /// The data, base64.
    pub buf_b64: String,
    /// End of file reached.
    pub eof: bool,
}

/// `guest-file-write`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestFileWrite {
    /// The handle.
    pub handle: i64,
    /// The data, base64.
    pub buf_b64: String,
}
command!(GuestFileWrite, "guest-file-write", FileWrite);

/// `guest-file-write` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct FileWrite {
    /// Bytes written.
    pub count: u64,
    /// End of file reached.
    pub eof: bool,
}

/// `guest-file-close`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct GuestFileClose {
    /// The handle.
    pub handle: i64,
}
command!(GuestFileClose, "guest-file-close", Empty);

// ----- base64 (standard alphabet, padded), as the agent speaks it -----

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(B64[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(text: &str) -> Result<Vec<u8>, QgaError> {
    let bad = || QgaError::Protocol(format!("bad base64: {:.40}", text));
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    let mut padding = 0;
    for c in text.bytes().filter(|c| !c.is_ascii_whitespace()) {
        if c == b'=' {
            padding += 1;
            continue;
        }
        if padding > 0 {
            return Err(bad());
        }
        let v = B64.iter().position(|x| *x == c).ok_or_else(bad)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    if padding > 2 {
        return Err(bad());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::thread::JoinHandle;

    use super::*;

    #[test]
    fn base64_round_trips_every_padding_length() {
        for (plain, enc) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"hello\n\xff\x00", "aGVsbG8K/wA="),
        ] {
            assert_eq!(base64_encode(plain), enc);
            assert_eq!(base64_decode(enc).expect("decode"), plain);
        }
        assert!(base64_decode("Zm9v!").is_err());
        assert!(base64_decode("Zg==Zg").is_err());
    }

    #[test]
    fn replies_and_errors_are_parsed_and_a_sentinel_inside_a_line_restarts_it() {
        assert_eq!(
            parse_reply(b"{\"return\": {}}").expect("ret"),
            Reply::Return(json!({}))
        );
        let mut late = b"{\"retu".to_vec();
        late.push(SENTINEL);
        late.extend_from_slice(b"{\"return\": 42}");
        assert_eq!(parse_reply(&late).expect("late"), Reply::Return(json!(42)));
        assert_eq!(
            parse_reply(br#"{"error": {"class": "GenericError", "desc": "no"}}"#).expect("e"),
            Reply::Error {
                class: "GenericError".into(),
                desc: "no".into()
            }
        );
        assert!(parse_reply(b"{\"x\": 1}").is_err());
    }

    #[test]
    fn sync_ids_differ() {
        let a: Vec<i64> = (0..100).map(|_| sync_id()).collect();
        let mut b = a.clone();
        b.sort_unstable();
        b.dedup();
        assert_eq!(a.len(), b.len());
        assert!(a.iter().all(|i| *i >= 0));
    }

    /// A fake agent: answers each request with `answer(request)`; `None` stays silent.
    struct FakeAgent {
        peer: JsonLines,
        raw: UnixStream,
    }

    impl FakeAgent {
        fn pair() -> (UnixStream, FakeAgent) {
            let (a, b) = UnixStream::pair().expect("pair");
            let raw = b.try_clone().expect("clone");
            (
                a,
                FakeAgent {
                    peer: JsonLines::new(b),
                    raw,
                },
            )
        }

        /// Reads one request (skipping 0xFF bytes before it).
        fn request(&mut self) -> Value {
            let d = Instant::now() + Duration::from_secs(5);
            let line = self.peer.read_line(d).expect("request");
            let start = line
                .iter()
                .rposition(|b| *b == SENTINEL)
                .map_or(0, |p| p + 1);
            serde_json::from_slice(&line[start..]).expect("json")
        }

        fn send_raw(&mut self, bytes: &[u8]) {
            self.raw.write_all(bytes).expect("write");
        }

        fn answer_sync(&mut self, stale: &[u8]) -> Value {
            let req = self.request();
            assert_eq!(req["execute"], "guest-sync-delimited");
            self.send_raw(stale);
            self.send_raw(&[SENTINEL]);
            self.send_raw(format!("{{\"return\": {}}}\n", req["arguments"]["id"]).as_bytes());
            req
        }

        fn serve(mut self, f: impl FnOnce(&mut FakeAgent) + Send + 'static) -> JoinHandle<Self> {
            std::thread::spawn(move || {
                f(&mut self);
                self
            })
        }
    }

    #[test]
    fn connect_syncs_past_stale_output_and_commands_decode_typed_replies() {
        let (a, agent) = FakeAgent::pair();
        let t = agent.serve(|ag| {
            ag.answer_sync(b"{\"return\": \"stale\"}\ngarbage");
            let r = ag.request();
            assert_eq!(r["execute"], "guest-network-get-interfaces");
            assert!(r.get("arguments").is_none());
            ag.send_raw(
                br#"{"return": [{"name": "lo", "hardware-address": "00:00:00:00:00:00", "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8}]}, {"name": "eth0", "hardware-address": "52:54:00:12:34:56", "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "10.0.0.5", "prefix": 24}, {"ip-address-type": "ipv6", "ip-address": "fe80::5054:ff:fe12:3456", "prefix": 64}], "statistics": {"rx-bytes": 1}}]}"#,
            );
            ag.send_raw(b"\n");
            let r = ag.request();
            assert_eq!(r["execute"], "guest-fsfreeze-status");
            ag.send_raw(b"{\"return\": \"frozen\"}\n");
        });
        let mut q = Qga::over(a, Duration::from_secs(5)).expect("sync");
        let ifs = q.network_interfaces().expect("ifs");
        assert_eq!(ifs[1].name, "eth0");
        assert_eq!(
            ifs[1].hardware_address.as_deref(),
            Some("52:54:00:12:34:56")
        );
        let v6 = &ifs[1].ip_addresses[1];
        assert_eq!((v6.ip_address_type, v6.prefix), (IpFamily::Ipv6, 64));
        assert_eq!(ifs[1].ip_addresses[0].addr(), "10.0.0.5".parse().ok());
        assert_eq!(q.fsfreeze_status().expect("status"), FsfreezeStatus::Frozen);
        t.join().expect("agent");
    }

    #[test]
    fn a_late_agent_is_synced_by_a_retry_and_an_absent_one_is_not_responding() {
        let (a, agent) = FakeAgent::pair();
        let t = agent.serve(|ag| {
            // The first sync is "lost" (the agent was not up yet); answer the second only,
            // after the late answer to the first.
            let first = ag.request();
            let second = ag.request();
            ag.send_raw(&[SENTINEL]);
            ag.send_raw(format!("{{\"return\": {}}}\n", first["arguments"]["id"]).as_bytes());
            ag.send_raw(&[SENTINEL]);
            ag.send_raw(format!("{{\"return\": {}}}\n", second["arguments"]["id"]).as_bytes());
        });
        Qga::over(a, Duration::from_secs(5)).expect("synced on retry");
        t.join().expect("agent");

        let (a, _silent) = FakeAgent::pair();
        let started = Instant::now();
        let e = Qga::over(a, Duration::from_millis(700)).expect_err("silent");
        assert!(matches!(e, QgaError::NotResponding(_)), "{e}");
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(matches!(DriverError::from(e), DriverError::NotReady(_)));
    }

    #[test]
    fn after_a_timeout_the_late_answer_is_dropped_by_a_resync() {
        let (a, agent) = FakeAgent::pair();
        let t = agent.serve(|ag| {
            ag.answer_sync(b"");
            let slow = ag.request();
            assert_eq!(slow["execute"], "guest-ping");
            // Answer late: after the client gave up and sent a new sync.
            let sync = ag.request();
            ag.send_raw(b"{\"return\": {}}\n");
            ag.send_raw(&[SENTINEL]);
            ag.send_raw(format!("{{\"return\": {}}}\n", sync["arguments"]["id"]).as_bytes());
            let info = ag.request();
            assert_eq!(info["execute"], "guest-info");
            ag.send_raw(
                br#"{"return": {"version": "7.2.0", "supported_commands": [{"enabled": true, "name": "guest-ping", "success-response": true}, {"enabled": false, "name": "guest-exec", "success-response": true}]}}
"#,
            );
        });
        let mut q = Qga::over(a, Duration::from_secs(5)).expect("sync");
        let e = q
            .execute_timeout(&GuestPing, Duration::from_millis(100))
            .expect_err("slow");
        assert!(matches!(e, QgaError::Timeout { .. }), "{e}");
        let info = q.info().expect("info after resync");
        assert_eq!(info.version, "7.2.0");
        assert!(info.supports("guest-ping"));
        assert!(!info.supports("guest-exec"));
        t.join().expect("agent");
    }

    #[test]
    fn exec_decodes_output_and_errors_keep_class_and_desc() {
        let (a, agent) = FakeAgent::pair();
        let t = agent.serve(|ag| {
            ag.answer_sync(b"");
            let r = ag.request();
            assert_eq!(r["execute"], "guest-exec");
            assert_eq!(r["arguments"]["path"], "/bin/sh");
            assert_eq!(r["arguments"]["arg"], json!(["-c", "cat"]));
            assert_eq!(r["arguments"]["input-data"], "aGk=");
            assert_eq!(r["arguments"]["capture-output"], true);
            ag.send_raw(b"{\"return\": {\"pid\": 77}}\n");
            let r = ag.request();
            assert_eq!(r["arguments"]["pid"], 77);
            ag.send_raw(b"{\"return\": {\"exited\": false}}\n");
            ag.request();
            ag.send_raw(
                b"{\"return\": {\"exited\": true, \"exitcode\": 0, \"out-data\": \"aGk=\"}}\n",
            );
            let r = ag.request();
            assert_eq!(r["execute"], "guest-file-open");
            ag.send_raw(
                br#"{"error": {"class": "GenericError", "desc": "failed to open file '/nope' (mode: 'r'): No such file or directory"}}
"#,
            );
        });
        let mut q = Qga::over(a, Duration::from_secs(5)).expect("sync");
        let out = q
            .exec(
                "/bin/sh",
                &["-c", "cat"],
                Some(b"hi"),
                Duration::from_secs(5),
            )
            .expect("exec");
        assert!(out.success());
        assert_eq!(out.stdout, b"hi");
        assert!(out.stderr.is_empty());
        let e = q.read_file("/nope", 1024).expect_err("missing");
        match e {
            QgaError::Command {
                ref command,
                ref class,
                ref desc,
            } => {
                assert_eq!(command, "guest-file-open");
                assert_eq!(class, "GenericError");
                assert!(desc.contains("No such file"), "{desc}");
            }
            other => panic!("{other}"),
        }
        t.join().expect("agent");
    }

    #[test]
    fn shutdown_treats_silence_as_success_and_an_error_as_refusal() {
        let (a, agent) = FakeAgent::pair();
        let t = agent.serve(|ag| {
            ag.answer_sync(b"");
            let r = ag.request();
            assert_eq!(r["execute"], "guest-shutdown");
            assert_eq!(r["arguments"]["mode"], "powerdown");
            ag.answer_sync(b"");
            let r = ag.request();
            assert_eq!(r["arguments"]["mode"], "reboot");
            ag.send_raw(
                b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"command disabled\"}}\n",
            );
        });
        let mut q = Qga::over(a, Duration::from_secs(5)).expect("sync");
        q.shutdown(ShutdownMode::Powerdown, Duration::from_millis(100))
            .expect("silence is success");
        let e = q
            .shutdown(ShutdownMode::Reboot, Duration::from_secs(5))
            .expect_err("refused");
        assert!(e.to_string().contains("command disabled"), "{e}");
        t.join().expect("agent");
    }

    #[test]
    fn files_are_read_in_chunks_and_written_base64() {
        let (a, agent) = FakeAgent::pair();
        let t = agent.serve(|ag| {
            ag.answer_sync(b"");
            assert_eq!(ag.request()["arguments"]["mode"], "r");
            ag.send_raw(b"{\"return\": 5}\n");
            ag.request();
            ag.send_raw(b"{\"return\": {\"count\": 3, \"buf-b64\": \"Zm9v\", \"eof\": false}}\n");
            ag.request();
            ag.send_raw(b"{\"return\": {\"count\": 3, \"buf-b64\": \"YmFy\", \"eof\": true}}\n");
            let close = ag.request();
            assert_eq!(close["execute"], "guest-file-close");
            assert_eq!(close["arguments"]["handle"], 5);
            ag.send_raw(b"{\"return\": {}}\n");
            assert_eq!(ag.request()["arguments"]["mode"], "w");
            ag.send_raw(b"{\"return\": 6}\n");
            let w = ag.request();
            assert_eq!(w["arguments"]["buf-b64"], "eHl6");
            ag.send_raw(b"{\"return\": {\"count\": 3, \"eof\": false}}\n");
            assert_eq!(ag.request()["execute"], "guest-file-close");
            ag.send_raw(b"{\"return\": {}}\n");
        });
        let mut q = Qga::over(a, Duration::from_secs(5)).expect("sync");
        assert_eq!(q.read_file("/etc/hostname", 1024).expect("read"), b"foobar");
        q.write_file("/tmp/x", b"xyz").expect("write");
        t.join().expect("agent");
    }
}
