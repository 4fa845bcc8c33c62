//! A blocking client for the QEMU Machine Protocol (QMP) over a unix socket.
//!
//! One [`Qmp`] is one connection: [`Qmp::connect`] reads QEMU's greeting and leaves
//! capabilities negotiation; [`Qmp::execute`] sends a typed [`QmpCommand`] and waits for the
//! reply carrying its `id`. Events that arrive meanwhile are queued (bounded, oldest dropped
//! first), never lost to the caller: [`Qmp::events`] drains them and [`Qmp::wait_event`]
//! waits for one that matches.
//!
//! A QMP socket serves one client at a time; a second client is accepted by the kernel but
//! gets no greeting until the first disconnects, which [`Qmp::connect`] reports as a
//! timeout that says so.

use std::collections::VecDeque;
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use stead_reconciler::driver::DriverError;

use super::jsonline::{JsonLines, LineError};

/// Per-command timeout used by [`Qmp::execute`] unless the connection was given another.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Events kept for the caller at most; older ones are dropped (with a warning) beyond it.
pub const MAX_QUEUED_EVENTS: usize = 1024;

/// A QMP failure.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be connected (QEMU not running, or not yet listening).
    #[error("connect to QMP socket {}: {source}", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A socket read or write failed.
    #[error("QMP {context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The deadline passed before QEMU answered.
    #[error("QMP: no answer to {what} within {after:?}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The time waited.
        after: Duration,
    },
    /// QEMU closed the connection (it quit, or crashed).
    #[error("QMP: QEMU closed the connection while waiting for {0}")]
    Closed(String),
    /// QEMU sent something that is not QMP as we know it.
    #[error("QMP protocol: {0}")]
    Protocol(String),
    /// QEMU refused a command; `class` and `desc` are QEMU's own words.
    #[error("QMP {command}: {class}: {desc}")]
    Command {
        /// The command name.
        command: String,
        /// QEMU's error class (`GenericError`, `DeviceNotFound`, `CommandNotFound`, …).
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },
    /// A job ran to its end with an error.
    #[error("QMP job {id}: {error}")]
    Job {
        /// The job id.
        id: String,
        /// QEMU's error text.
        error: String,
    },
}

impl QmpError {
    /// QEMU's error class, for command errors.
    pub fn class(&self) -> Option<&str> {
        match self {
            QmpError::Command { class, .. } => Some(class),
            _ => None,
        }
    }

    fn from_line(e: LineError, what: &str, after: Duration) -> Self {
        match e {
            LineError::Timeout => QmpError::Timeout {
                what: what.to_string(),
                after,
            },
            LineError::Closed => QmpError::Closed(what.to_string()),
            LineError::TooLong => {
                QmpError::Protocol(format!("over-long line while reading {what}"))
            }
            LineError::Io(source) => QmpError::Io {
                context: what.to_string(),
                source,
            },
        }
    }
}

impl From<QmpError> for DriverError {
    fn from(e: QmpError) -> Self {
        match e {
            QmpError::Connect { ref source, .. }
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                DriverError::NotReady(e.to_string())
            }
            QmpError::Connect { path, source } => {
                DriverError::io(format!("connect to QMP socket {}", path.display()), source)
            }
            QmpError::Io { context, source } => DriverError::io(format!("QMP {context}"), source),
            QmpError::Timeout { .. } => DriverError::NotReady(e.to_string()),
            QmpError::Command { ref class, .. } if class == "CommandNotFound" => {
                DriverError::Unsupported(e.to_string())
            }
            other => DriverError::Other(other.to_string()),
        }
    }
}

/// A QMP command with typed arguments and reply. The implementing value serializes to the
/// command's `arguments` (a unit struct, serializing to `null`, sends none).
pub trait QmpCommand: Serialize {
    /// The command name (`query-status`, `blockdev-add`, …).
    const NAME: &'static str;
    /// The type of its `return` value.
    type Ret: DeserializeOwned;
}

/// The reply of commands that return `{}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Empty {}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct QmpEvent {
    /// Its name (`STOP`, `RESUME`, `SHUTDOWN`, `DEVICE_DELETED`, `JOB_STATUS_CHANGE`, …).
    pub event: String,
    /// Its data (`null` when it has none).
    #[serde(default)]
    pub data: Value,
    /// When QEMU emitted it.
    #[serde(default)]
    pub timestamp: Timestamp,
}

impl QmpEvent {
    /// The data as a typed value (e.g. [`JobStatusChange`], [`DeviceDeleted`], [`Shutdown`]).
    pub fn data_as<T: DeserializeOwned>(&self) -> Result<T, QmpError> {
        serde_json::from_value(self.data.clone())
            .map_err(|e| QmpError::Protocol(format!("{} event data: {e}", self.event)))
    }
}

/// An event's time stamp.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Timestamp {
    /// Seconds since the epoch.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

/// `JOB_STATUS_CHANGE` data.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct JobStatusChange {
    /// The job id.
    pub id: String,
    /// Its new status.
    pub status: JobStatus,
}

/// `DEVICE_DELETED` data.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DeviceDeleted {
    /// The device id (absent for devices that had none).
    pub device: Option<String>,
    /// The device's QOM path.
    pub path: String,
}

/// `SHUTDOWN` data.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Shutdown {
    /// Whether the guest asked for it.
    pub guest: bool,
    /// Why (`host-qmp-quit`, `guest-shutdown`, `host-signal`, …).
    pub reason: String,
}

/// QEMU's version, from the greeting or `query-version`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VersionInfo {
    /// Major/minor/micro.
    pub qemu: VersionTriple,
    /// The distribution's package string (e.g. `Debian 1:7.2+dfsg-7+deb12u6`).
    #[serde(default)]
    pub package: String,
}

/// A QEMU version number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
pub struct VersionTriple {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Micro.
    pub micro: u32,
}

impl std::fmt::Display for VersionInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = self.qemu;
        write!(f, "{}.{}.{}", v.major, v.minor, v.micro)
    }
}

#[derive(Deserialize)]
struct Greeting {
    #[serde(rename = "QMP")]
    qmp: GreetingBody,
}

#[derive(Deserialize)]
struct GreetingBody {
    version: VersionInfo,
    #[serde(default)]
    capabilities: Vec<String>,
}

/// A message read from QMP.
#[derive(Debug)]
enum Message {
    Return {
        id: Option<Value>,
        value: Value,
    },
    Error {
        id: Option<Value>,
        class: String,
        desc: String,
    },
    Event(QmpEvent),
}

fn parse_message(line: &[u8]) -> Result<Message, QmpError> {
    let v: Value = serde_json::from_slice(line).map_err(|e| {
        QmpError::Protocol(format!("not JSON ({e}): {}", String::from_utf8_lossy(line)))
    })?;
    let Value::Object(mut m) = v else {
        return Err(QmpError::Protocol(format!(
            "not an object: {}",
            String::from_utf8_lossy(line)
        )));
    };
    let id = m.remove("id");
    if let Some(value) = m.remove("return") {
        return Ok(Message::Return { id, value });
    }
    if let Some(err) = m.remove("error") {
        let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        return Ok(Message::Error {
            id,
            class: field("class"),
            desc: field("desc"),
        });
    }
    if m.contains_key("event") {
        let ev = serde_json::from_value(Value::Object(m))
            .map_err(|e| QmpError::Protocol(format!("bad event: {e}")))?;
        return Ok(Message::Event(ev));
    }
    Err(QmpError::Protocol(format!(
        "unexpected message: {}",
        String::from_utf8_lossy(line)
    )))
}

/// One QMP connection.
#[derive(Debug)]
pub struct Qmp {
    conn: JsonLines,
    version: VersionInfo,
    capabilities: Vec<String>,
    timeout: Duration,
    next_id: u64,
    events: VecDeque<QmpEvent>,
}

impl Qmp {
    /// Connects to the QMP socket at `path`, reads the greeting and negotiates capabilities.
    /// `timeout` bounds that handshake and becomes the per-command timeout.
    #[tracing::instrument(level = "debug", skip_all, fields(path = %path.display()))]
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        Self::handshake(stream, timeout)
    }

    /// Like [`Qmp::connect`], retrying while the socket is missing or refuses (QEMU still
    /// starting) until `timeout` has passed.
    pub fn connect_retry(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            match UnixStream::connect(path) {
                Ok(stream) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    return Self::handshake(stream, left.max(Duration::from_secs(1)));
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(source) => {
                    return Err(QmpError::Connect {
                        path: path.to_path_buf(),
                        source,
                    });
                }
            }
        }
    }

    /// Runs the greeting and `qmp_capabilities` on an already connected stream.
    pub fn handshake(stream: UnixStream, timeout: Duration) -> Result<Self, QmpError> {
        let mut conn = JsonLines::new(stream);
        let deadline = Instant::now() + timeout;
        let line = conn.read_line(deadline).map_err(|e| match e {
            LineError::Timeout => QmpError::Timeout {
                what: "the QMP greeting (is another client connected?)".into(),
                after: timeout,
            },
            e => QmpError::from_line(e, "the QMP greeting", timeout),
        })?;
        let greeting: Greeting = serde_json::from_slice(&line).map_err(|e| {
            QmpError::Protocol(format!(
                "bad greeting ({e}): {}",
                String::from_utf8_lossy(&line)
            ))
        })?;
        let mut qmp = Qmp {
            conn,
            version: greeting.qmp.version,
            capabilities: greeting.qmp.capabilities,
            timeout,
            next_id: 1,
            events: VecDeque::new(),
        };
        qmp.execute(&QmpCapabilities)?;
        tracing::debug!(version = %qmp.version, "QMP connected");
        Ok(qmp)
    }

    /// QEMU's version, from the greeting.
    pub fn version(&self) -> &VersionInfo {
        &self.version
    }

    /// The capabilities QEMU offered in its greeting (none are enabled).
    pub fn capabilities(&self) -> &[String] {
        &self.capabilities
    }

    /// The per-command timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sets the per-command timeout.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Executes a typed command with the connection's timeout.
    pub fn execute<C: QmpCommand>(&mut self, cmd: &C) -> Result<C::Ret, QmpError> {
        self.execute_with(cmd, &[], self.timeout)
    }

    /// Executes a typed command, passing `fds` (SCM_RIGHTS) with it, within `timeout`.
    #[tracing::instrument(level = "debug", skip(self, cmd, fds), fields(command = C::NAME))]
    pub fn execute_with<C: QmpCommand>(
        &mut self,
        cmd: &C,
        fds: &[BorrowedFd<'_>],
        timeout: Duration,
    ) -> Result<C::Ret, QmpError> {
        let args = serde_json::to_value(cmd)
            .map_err(|e| QmpError::Protocol(format!("encode {} arguments: {e}", C::NAME)))?;
        let value = self.execute_raw_with(C::NAME, args, fds, timeout)?;
        serde_json::from_value(value)
            .map_err(|e| QmpError::Protocol(format!("decode {} reply: {e}", C::NAME)))
    }

    /// Executes a command by name with untyped arguments (`null` for none).
    pub fn execute_raw(&mut self, name: &str, args: Value) -> Result<Value, QmpError> {
        self.execute_raw_with(name, args, &[], self.timeout)
    }

    fn execute_raw_with(
        &mut self,
        name: &str,
        args: Value,
        fds: &[BorrowedFd<'_>],
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = Map::new();
        msg.insert("execute".into(), Value::String(name.into()));
        if !args.is_null() {
            msg.insert("arguments".into(), args);
        }
        msg.insert("id".into(), json!(id));
        let deadline = Instant::now() + timeout;
        self.conn
            .send_json(&Value::Object(msg), fds, deadline)
            .map_err(|e| QmpError::from_line(e, name, timeout))?;
        loop {
            let line = self
                .conn
                .read_line(deadline)
                .map_err(|e| QmpError::from_line(e, name, timeout))?;
            match parse_message(&line)? {
                Message::Event(ev) => self.queue(ev),
                Message::Return {
                    id: Some(got),
                    value,
                } if got == json!(id) => return Ok(value),
                Message::Error {
                    id: Some(got),
                    class,
                    desc,
                } if got == json!(id) => {
                    return Err(QmpError::Command {
                        command: name.to_string(),
                        class,
                        desc,
                    });
                }
                Message::Error {
                    id: None,
                    class,
                    desc,
                } => {
                    // QEMU answers a message it could not parse without an id.
                    return Err(QmpError::Command {
                        command: name.to_string(),
                        class,
                        desc,
                    });
                }
                stale => tracing::warn!(?stale, "QMP: dropping a reply to an earlier command"),
            }
        }
    }

    fn queue(&mut self, ev: QmpEvent) {
        tracing::debug!(event = %ev.event, "QMP event");
        if self.events.len() >= MAX_QUEUED_EVENTS
            && let Some(old) = self.events.pop_front()
        {
            tracing::warn!(event = %old.event, "QMP: event queue full, dropping the oldest");
        }
        self.events.push_back(ev);
    }

    /// Reads the events that already arrived (without waiting) and drains the queue.
    pub fn events(&mut self) -> Result<Vec<QmpEvent>, QmpError> {
        self.pump(Instant::now() + Duration::from_millis(1))?;
        Ok(self.events.drain(..).collect())
    }

    /// Reads messages until `deadline`, queueing events; a timeout is not an error.
    fn pump(&mut self, deadline: Instant) -> Result<(), QmpError> {
        loop {
            match self.conn.read_line(deadline) {
                Ok(line) => match parse_message(&line)? {
                    Message::Event(ev) => self.queue(ev),
                    other => tracing::warn!(?other, "QMP: dropping an unexpected reply"),
                },
                Err(LineError::Timeout) => return Ok(()),
                Err(e) => return Err(QmpError::from_line(e, "events", Duration::ZERO)),
            }
        }
    }

    /// Waits up to `timeout` for an event named `name` for which `pred` holds, and returns
    /// it (taken from the queue if it already arrived). Other events stay queued.
    pub fn wait_event(
        &mut self,
        name: &str,
        timeout: Duration,
        pred: impl Fn(&QmpEvent) -> bool,
    ) -> Result<QmpEvent, QmpError> {
        let matches = |ev: &QmpEvent| ev.event == name && pred(ev);
        if let Some(pos) = self.events.iter().position(matches) {
            return Ok(self.events.remove(pos).expect("position is in range"));
        }
        let deadline = Instant::now() + timeout;
        let what = format!("event {name}");
        loop {
            let line = self
                .conn
                .read_line(deadline)
                .map_err(|e| QmpError::from_line(e, &what, timeout))?;
            match parse_message(&line)? {
                Message::Event(ev) if matches(&ev) => return Ok(ev),
                Message::Event(ev) => self.queue(ev),
                other => tracing::warn!(?other, "QMP: dropping an unexpected reply"),
            }
        }
    }

    // ----- conveniences over the typed commands -----

    /// `query-status`.
    pub fn query_status(&mut self) -> Result<StatusInfo, QmpError> {
        self.execute(&QueryStatus)
    }

    /// `device_del`, then waits for its `DEVICE_DELETED` (the guest must release the
    /// device: ACPI hot-unplug needs a cooperating guest).
    pub fn device_del_wait(&mut self, id: &str, timeout: Duration) -> Result<(), QmpError> {
        self.execute(&DeviceDel { id: id.into() })?;
        self.wait_event("DEVICE_DELETED", timeout, |ev| {
            ev.data.get("device").and_then(Value::as_str) == Some(id)
        })?;
        Ok(())
    }

    /// `getfd`: hands `fd` to QEMU under `name` (then usable as e.g. a tap netdev's `fd`).
    pub fn getfd(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        let timeout = self.timeout;
        self.execute_with(
            &GetFd {
                fdname: name.into(),
            },
            &[fd],
            timeout,
        )?;
        Ok(())
    }

    /// `add-fd`: adds `fd` to an fd set (a new one unless `fdset_id`); QEMU then opens it as
    /// `/dev/fdset/<fdset-id>` (e.g. a `file` block node's `filename`).
    pub fn add_fd(
        &mut self,
        fd: BorrowedFd<'_>,
        fdset_id: Option<u64>,
        opaque: Option<&str>,
    ) -> Result<AddFdInfo, QmpError> {
        let timeout = self.timeout;
        self.execute_with(
            &AddFd {
                fdset_id,
                opaque: opaque.map(str::to_string),
            },
            &[fd],
            timeout,
        )
    }

    /// `human-monitor-command`: runs an HMP command line and returns its output.
    pub fn hmp(&mut self, command_line: &str) -> Result<String, QmpError> {
        self.execute(&HumanMonitorCommand {
            command_line: command_line.into(),
            cpu_index: None,
        })
    }

    /// Waits for job `id` to conclude, then dismisses it; its error becomes
    /// [`QmpError::Job`]. The job must have been started with `auto-dismiss: false` (the
    /// default of `snapshot-save`/`-load`/`-delete`; pass it to `blockdev-backup`), or it
    /// would vanish before its outcome can be read.
    pub fn wait_job(&mut self, id: &str, timeout: Duration) -> Result<(), QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            let jobs = self.execute(&QueryJobs)?;
            let Some(job) = jobs.into_iter().find(|j| j.id == id) else {
                return Err(QmpError::Protocol(format!(
                    "job {id} is gone (started with auto-dismiss?)"
                )));
            };
            if job.status == JobStatus::Concluded {
                self.execute(&JobDismiss { id: id.into() })?;
                return match job.error {
                    Some(error) => Err(QmpError::Job {
                        id: id.into(),
                        error,
                    }),
                    None => Ok(()),
                };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::Timeout {
                    what: format!("job {id} (status {:?})", job.status),
                    after: timeout,
                });
            }
            // A status change wakes us early; otherwise poll again.
            match self.wait_event(
                "JOB_STATUS_CHANGE",
                left.min(Duration::from_millis(500)),
                |ev| ev.data.get("id").and_then(Value::as_str) == Some(id),
            ) {
                Ok(_) | Err(QmpError::Timeout { .. }) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

// ----- typed commands -----

macro_rules! unit_command {
    ($(#[$doc:meta])* $ty:ident, $name:literal, $ret:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Default, Serialize)]
        pub struct $ty;
        impl QmpCommand for $ty {
            const NAME: &'static str = $name;
            type Ret = $ret;
        }
    };
}

macro_rules! command {
    ($ty:ident, $name:literal, $ret:ty) => {
        impl QmpCommand for $ty {
            const NAME: &'static str = $name;
            type Ret = $ret;
        }
    };
}

unit_command!(
    /// `qmp_capabilities` (sent by [`Qmp::connect`]).
    QmpCapabilities,
    "qmp_capabilities",
    Empty
);
unit_command!(
    /// `query-status`.
    QueryStatus,
    "query-status",
    StatusInfo
);
unit_command!(
    /// `query-version`.
    QueryVersion,
    "query-version",
    VersionInfo
);
unit_command!(
    /// `stop`: pauses the guest's CPUs (event `STOP`).
    Stop,
    "stop",
    Empty
);
unit_command!(
    /// `cont`: resumes the guest (event `RESUME`).
    Cont,
    "cont",
    Empty
);
unit_command!(
    /// `system_powerdown`: presses the ACPI power button (event `POWERDOWN`).
    SystemPowerdown,
    "system_powerdown",
    Empty
);
unit_command!(
    /// `system_reset` (event `RESET`).
    SystemReset,
    "system_reset",
    Empty
);
unit_command!(
    /// `quit`: QEMU exits (event `SHUTDOWN`, then the connection closes).
    Quit,
    "quit",
    Empty
);
unit_command!(
    /// `query-block`: the block backends (drives attached to devices or `-drive`).
    QueryBlock,
    "query-block",
    Vec<BlockInfo>
);
unit_command!(
    /// `query-jobs`.
    QueryJobs,
    "query-jobs",
    Vec<JobInfo>
);

/// The guest's run state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// Running.
    Running,
    /// Paused by `stop`.
    Paused,
    /// Not started yet (`-S`).
    Prelaunch,
    /// Stopped after a guest shutdown (with `-no-shutdown`).
    Shutdown,
    /// Stopped on a disk I/O error.
    IoError,
    /// Stopped on an internal error.
    InternalError,
    /// The guest panicked.
    GuestPanicked,
    /// Suspended to RAM.
    Suspended,
    /// Waiting for an incoming migration.
    Inmigrate,
    /// After an outgoing migration.
    Postmigrate,
    /// Finishing a migration.
    FinishMigrate,
    /// Restoring a snapshot.
    RestoreVm,
    /// Saving a snapshot.
    SaveVm,
    /// Stopped by the watchdog.
    Watchdog,
    /// Stopped by a debugger.
    Debug,
    /// A state this client does not know.
    #[serde(other)]
    Other,
}

/// `query-status` reply.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusInfo {
    /// Whether the CPUs run.
    pub running: bool,
    /// The run state.
    pub status: RunState,
}

/// `query-named-block-nodes`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryNamedBlockNodes {
    /// Only the named nodes, without their children inline (the flat list).
    pub flat: bool,
}
command!(
    QueryNamedBlockNodes,
    "query-named-block-nodes",
    Vec<BlockDeviceInfo>
);

/// One block backend (`query-block`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BlockInfo {
    /// The backend's name (the `-drive` id; empty for anonymous backends of `-device`).
    pub device: String,
    /// The device's qdev id or QOM path.
    pub qdev: Option<String>,
    /// Whether the media can be removed.
    #[serde(default)]
    pub removable: bool,
    /// Whether the tray is locked.
    #[serde(default)]
    pub locked: bool,
    /// The inserted medium, if any.
    pub inserted: Option<BlockDeviceInfo>,
}

/// A block node (`query-block` `inserted`, `query-named-block-nodes`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BlockDeviceInfo {
    /// The node's file name (or a JSON description).
    pub file: String,
    /// The node name.
    #[serde(rename = "node-name")]
    pub node_name: Option<String>,
    /// Read-only.
    pub ro: bool,
    /// The driver (`qcow2`, `raw`, `file`, …).
    pub drv: String,
    /// The backing file, if any.
    pub backing_file: Option<String>,
    /// Depth of the backing chain.
    #[serde(default)]
    pub backing_file_depth: u32,
    /// Image details.
    pub image: Option<ImageInfo>,
    /// Dirty bitmaps on this node.
    #[serde(rename = "dirty-bitmaps", default)]
    pub dirty_bitmaps: Vec<BlockDirtyInfo>,
}

/// Image details of a block node.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// The file name.
    pub filename: String,
    /// The format.
    pub format: String,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Bytes used on the host, if known.
    pub actual_size: Option<u64>,
    /// The backing file name, if any.
    pub backing_filename: Option<String>,
}

/// A dirty bitmap.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockDirtyInfo {
    /// Its name.
    pub name: Option<String>,
    /// Dirty bytes.
    pub count: u64,
    /// Bytes per bit.
    pub granularity: u64,
    /// Whether writes are being recorded.
    #[serde(default)]
    pub recording: bool,
    /// In use by an operation (a backup).
    #[serde(default)]
    pub busy: bool,
    /// Stored in the qcow2 image.
    #[serde(default)]
    pub persistent: bool,
    /// Found inconsistent (QEMU was killed while it was in use): must be removed.
    #[serde(default)]
    pub inconsistent: bool,
}

/// `blockdev-add`: the node tree as JSON (`{"driver": "qcow2", "node-name": …, "file": …}`);
/// see [`file_node`] and [`format_node`].
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct BlockdevAdd(pub Value);
command!(BlockdevAdd, "blockdev-add", Empty);

/// A `file` protocol node for `blockdev-add`.
pub fn file_node(node_name: &str, filename: &Path, read_only: bool) -> Value {
    json!({
        "driver": "file",
        "node-name": node_name,
        "filename": filename.to_string_lossy(),
        "read-only": read_only,
    })
}

/// A format node (`qcow2`, `raw`) over the node named `file` for `blockdev-add`.
pub fn format_node(driver: &str, node_name: &str, file: &str, read_only: bool) -> Value {
    json!({
        "driver": driver,
        "node-name": node_name,
        "file": file,
        "read-only": read_only,
    })
}

/// `blockdev-del`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevDel {
    /// The node to delete.
    pub node_name: String,
}
command!(BlockdevDel, "blockdev-del", Empty);

/// `device_add`.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceAdd {
    /// The device model (`virtio-blk-pci`, `virtio-net-pci`, …).
    pub driver: String,
    /// Its id (for `device_del`).
    pub id: String,
    /// Its properties (`drive`, `netdev`, `bus`, `addr`, `mac`, `bootindex`, …).
    #[serde(flatten)]
    pub props: Map<String, Value>,
}
command!(DeviceAdd, "device_add", Empty);

/// `device_del` (completion is the `DEVICE_DELETED` event: [`Qmp::device_del_wait`]).
#[derive(Debug, Clone, Serialize)]
pub struct DeviceDel {
    /// The device id.
    pub id: String,
}
command!(DeviceDel, "device_del", Empty);

/// `netdev_add`.
#[derive(Debug, Clone, Serialize)]
pub struct NetdevAdd {
    /// The backend type (`tap`, `user`, …).
    #[serde(rename = "type")]
    pub kind: String,
    /// Its id.
    pub id: String,
    /// Its options (for a tap passed by [`Qmp::getfd`]: `"fd": "<fdname>"`).
    #[serde(flatten)]
    pub props: Map<String, Value>,
}
command!(NetdevAdd, "netdev_add", Empty);

/// `netdev_del`.
#[derive(Debug, Clone, Serialize)]
pub struct NetdevDel {
    /// The netdev id.
    pub id: String,
}
command!(NetdevDel, "netdev_del", Empty);

/// `getfd` (send with the fd: [`Qmp::getfd`]).
#[derive(Debug, Clone, Serialize)]
pub struct GetFd {
    /// The name QEMU keeps it under.
    pub fdname: String,
}
command!(GetFd, "getfd", Empty);

/// `closefd`.
#[derive(Debug, Clone, Serialize)]
pub struct CloseFd {
    /// The name given to `getfd`.
    pub fdname: String,
}
command!(CloseFd, "closefd", Empty);

/// `add-fd` (send with the fd: [`Qmp::add_fd`]).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AddFd {
    /// The fd set to add to (a new one if absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fdset_id: Option<u64>,
    /// A free-form note kept with the fd.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opaque: Option<String>,
}
command!(AddFd, "add-fd", AddFdInfo);

/// `add-fd` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct AddFdInfo {
    /// The fd set (`/dev/fdset/<fdset-id>`).
    pub fdset_id: u64,
    /// The fd number inside QEMU.
    pub fd: i64,
}

/// `remove-fd`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RemoveFd {
    /// The fd set.
    pub fdset_id: u64,
    /// One fd of it (all if absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fd: Option<i64>,
}
command!(RemoveFd, "remove-fd", Empty);

/// `block-dirty-bitmap-add`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BlockDirtyBitmapAdd {
    /// The node (a format node: `persistent` needs qcow2).
    pub node: String,
    /// The bitmap name.
    pub name: String,
    /// Bytes per bit (QEMU picks one if absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub granularity: Option<u64>,
    /// Stored in the qcow2 image when the node closes, so it survives QEMU restarts.
    pub persistent: bool,
    /// Created not recording.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
}
command!(BlockDirtyBitmapAdd, "block-dirty-bitmap-add", Empty);

/// A node and bitmap name (`block-dirty-bitmap-remove/-clear/-enable/-disable`).
#[derive(Debug, Clone, Serialize)]
pub struct BlockDirtyBitmap {
    /// The node.
    pub node: String,
    /// The bitmap name.
    pub name: String,
}

/// `block-dirty-bitmap-remove`.
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct BlockDirtyBitmapRemove(pub BlockDirtyBitmap);
command!(BlockDirtyBitmapRemove, "block-dirty-bitmap-remove", Empty);

/// `block-dirty-bitmap-clear`.
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct BlockDirtyBitmapClear(pub BlockDirtyBitmap);
command!(BlockDirtyBitmapClear, "block-dirty-bitmap-clear", Empty);

/// `block-dirty-bitmap-enable`.
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct BlockDirtyBitmapEnable(pub BlockDirtyBitmap);
command!(BlockDirtyBitmapEnable, "block-dirty-bitmap-enable", Empty);

/// `block-dirty-bitmap-disable`.
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct BlockDirtyBitmapDisable(pub BlockDirtyBitmap);
command!(BlockDirtyBitmapDisable, "block-dirty-bitmap-disable", Empty);

/// `block-dirty-bitmap-merge`: ORs the `bitmaps` (names on `node`) into `target`.
#[derive(Debug, Clone, Serialize)]
pub struct BlockDirtyBitmapMerge {
    /// The node.
    pub node: String,
    /// The bitmap merged into.
    pub target: String,
    /// The bitmaps merged from.
    pub bitmaps: Vec<String>,
}
command!(BlockDirtyBitmapMerge, "block-dirty-bitmap-merge", Empty);

/// A backup's `sync` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupSync {
    /// Every allocated block.
    Full,
    /// The blocks dirty in `bitmap` (which `bitmap-mode` then updates).
    Incremental,
    /// The blocks dirty in `bitmap`, with an explicit `bitmap-mode`.
    Bitmap,
    /// Only the top image's allocated blocks.
    Top,
    /// Only blocks the guest overwrites during the job (copy-before-write).
    None,
}

/// What a bitmap sync backup does with its bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BitmapSyncMode {
    /// Cleared if the job succeeds (the blocks it copied); kept whole on failure.
    OnSuccess,
    /// Never cleared.
    Never,
    /// Cleared of what was copied, even on failure.
    Always,
}

/// `blockdev-backup`: copies `device` into the already added node `target`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevBackup {
    /// The job id.
    pub job_id: String,
    /// The source node.
    pub device: String,
    /// The target node.
    pub target: String,
    /// What to copy.
    pub sync: BackupSync,
    /// The dirty bitmap for `incremental`/`bitmap` sync.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<String>,
    /// What to do with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmap_mode: Option<BitmapSyncMode>,
    /// Dismiss the job on its own when it ends (`false` lets [`Qmp::wait_job`] read its
    /// outcome).
    pub auto_dismiss: bool,
    /// Bytes per second, 0 for unlimited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speed: Option<u64>,
}
command!(BlockdevBackup, "blockdev-backup", Empty);

/// How `drive-backup` treats its target file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NewImageMode {
    /// The file exists and is used as is.
    Existing,
    /// QEMU creates it.
    AbsolutePaths,
}

/// `drive-backup`: copies `device` into the file `target`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DriveBackup {
    /// The job id.
    pub job_id: String,
    /// The source node or backend.
    pub device: String,
    /// The target file.
    pub target: String,
    /// The target's format.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Whether QEMU creates the target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<NewImageMode>,
    /// What to copy.
    pub sync: BackupSync,
    /// The dirty bitmap for `incremental`/`bitmap` sync.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<String>,
    /// What to do with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmap_mode: Option<BitmapSyncMode>,
    /// Dismiss the job on its own when it ends.
    pub auto_dismiss: bool,
}
command!(DriveBackup, "drive-backup", Empty);

/// A job's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Never seen.
    Undefined,
    /// Created, not started.
    Created,
    /// Running.
    Running,
    /// Paused.
    Paused,
    /// Ready to complete (mirror jobs).
    Ready,
    /// Paused while ready.
    Standby,
    /// Waiting for its transaction.
    Waiting,
    /// Waiting for `job-finalize`.
    Pending,
    /// Being cancelled or failing.
    Aborting,
    /// Done; its outcome waits to be read and dismissed.
    Concluded,
    /// Gone.
    Null,
    /// A status this client does not know.
    #[serde(other)]
    Other,
}

/// One job (`query-jobs`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobInfo {
    /// Its id.
    pub id: String,
    /// Its type (`backup`, `snapshot-save`, …).
    #[serde(rename = "type")]
    pub kind: String,
    /// Its status.
    pub status: JobStatus,
    /// Progress so far (in units of `total-progress`).
    pub current_progress: u64,
    /// Total work (bytes for backups).
    pub total_progress: u64,
    /// Its error, once concluded after a failure.
    pub error: Option<String>,
}

/// `job-dismiss`.
#[derive(Debug, Clone, Serialize)]
pub struct JobDismiss {
    /// The job.
    pub id: String,
}
command!(JobDismiss, "job-dismiss", Empty);

/// `job-cancel`.
#[derive(Debug, Clone, Serialize)]
pub struct JobCancel {
    /// The job.
    pub id: String,
}
command!(JobCancel, "job-cancel", Empty);

/// `block-job-cancel`.
#[derive(Debug, Clone, Serialize)]
pub struct BlockJobCancel {
    /// The job id (named `device` for history's sake).
    pub device: String,
    /// Cancel even a paused job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub force: Option<bool>,
}
command!(BlockJobCancel, "block-job-cancel", Empty);

/// `human-monitor-command` (returns HMP's output).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct HumanMonitorCommand {
    /// The HMP command line.
    pub command_line: String,
    /// The CPU it runs on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_index: Option<u32>,
}
command!(HumanMonitorCommand, "human-monitor-command", String);

/// `snapshot-save` (a job: [`Qmp::wait_job`]).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotSave {
    /// The job id.
    pub job_id: String,
    /// The snapshot's name.
    pub tag: String,
    /// The node that receives the VM state (RAM, devices).
    pub vmstate: String,
    /// The nodes snapshotted (all qcow2).
    pub devices: Vec<String>,
}
command!(SnapshotSave, "snapshot-save", Empty);

/// `snapshot-load` (a job: [`Qmp::wait_job`]).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotLoad {
    /// The job id.
    pub job_id: String,
    /// The snapshot's name.
    pub tag: String,
    /// The node holding the VM state.
    pub vmstate: String,
    /// The nodes reverted.
    pub devices: Vec<String>,
}
command!(SnapshotLoad, "snapshot-load", Empty);

/// `snapshot-delete` (a job: [`Qmp::wait_job`]).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotDelete {
    /// The job id.
    pub job_id: String,
    /// The snapshot's name.
    pub tag: String,
    /// The nodes it is deleted from.
    pub devices: Vec<String>,
}
command!(SnapshotDelete, "snapshot-delete", Empty);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_told_apart() {
        let m = parse_message(br#"{"return": {}, "id": 3}"#).expect("ret");
        assert!(matches!(m, Message::Return { id: Some(ref i), .. } if *i == json!(3)));
        let m = parse_message(
            br#"{"id": 4, "error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}}"#,
        )
        .expect("err");
        assert!(
            matches!(m, Message::Error { ref class, ref desc, .. } if class == "DeviceNotFound" && desc.contains("'x'"))
        );
        let m =
            parse_message(br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#)
                .expect("ev");
        assert!(matches!(m, Message::Event(ref e) if e.event == "STOP" && e.data.is_null()));
        assert!(parse_message(b"[1]").is_err());
        assert!(parse_message(b"{\"what\": 1}").is_err());
        assert!(parse_message(b"nope").is_err());
    }

    #[test]
    fn unit_commands_send_no_arguments_and_others_use_qemu_names() {
        assert_eq!(serde_json::to_value(QueryStatus).expect("v"), Value::Null);
        let b = BlockdevBackup {
            job_id: "j".into(),
            device: "d".into(),
            target: "t".into(),
            sync: BackupSync::Incremental,
            bitmap: Some("b".into()),
            bitmap_mode: Some(BitmapSyncMode::OnSuccess),
            auto_dismiss: false,
            speed: None,
        };
        assert_eq!(
            serde_json::to_value(&b).expect("v"),
            json!({"job-id": "j", "device": "d", "target": "t", "sync": "incremental",
                   "bitmap": "b", "bitmap-mode": "on-success", "auto-dismiss": false})
        );
        let mut props = Map::new();
        props.insert("fd".into(), json!("tap0"));
        let n = NetdevAdd {
            kind: "tap".into(),
            id: "net0".into(),
            props,
        };
        assert_eq!(
            serde_json::to_value(&n).expect("v"),
            json!({"type": "tap", "id": "net0", "fd": "tap0"})
        );
        let r = BlockDirtyBitmapRemove(BlockDirtyBitmap {
            node: "n".into(),
            name: "b".into(),
        });
        assert_eq!(
            serde_json::to_value(&r).expect("v"),
            json!({"node": "n", "name": "b"})
        );
    }

    #[test]
    fn unknown_run_states_and_job_statuses_do_not_fail_decoding() {
        let s: StatusInfo = serde_json::from_value(
            json!({"running": false, "status": "colo", "singlestep": false}),
        )
        .expect("status");
        assert_eq!(s.status, RunState::Other);
        let s: StatusInfo =
            serde_json::from_value(json!({"running": true, "status": "running"})).expect("s");
        assert_eq!(s.status, RunState::Running);
        let j: JobInfo = serde_json::from_value(json!({"id": "j", "type": "backup",
            "status": "concluded", "current-progress": 5, "total-progress": 5, "error": "boom"}))
        .expect("job");
        assert_eq!(j.status, JobStatus::Concluded);
        assert_eq!(j.error.as_deref(), Some("boom"));
    }

    #[test]
    fn command_errors_keep_qemus_class_and_desc_and_map_to_driver_errors() {
        let e = QmpError::Command {
            command: "device_del".into(),
            class: "DeviceNotFound".into(),
            desc: "Device 'nope' not found".into(),
        };
        assert_eq!(e.class(), Some("DeviceNotFound"));
        assert_eq!(
            e.to_string(),
            "QMP device_del: DeviceNotFound: Device 'nope' not found"
        );
        assert!(matches!(DriverError::from(e), DriverError::Other(_)));
        let missing = QmpError::Connect {
            path: "x".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert!(matches!(
            DriverError::from(missing),
            DriverError::NotReady(_)
        ));
        let nf = QmpError::Command {
            command: "x".into(),
            class: "CommandNotFound".into(),
            desc: "The command x has not been found".into(),
        };
        assert!(matches!(DriverError::from(nf), DriverError::Unsupported(_)));
    }

    /// A fake QEMU on the other end of a socket pair: greets, accepts capabilities.
    fn fake_pair() -> (Qmp, JsonLines) {
        let (a, b) = UnixStream::pair().expect("pair");
        let mut peer = JsonLines::new(b);
        let t = std::thread::spawn(move || {
            let d = Instant::now() + Duration::from_secs(5);
            peer.write(
                b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}, \"package\": \"x\"}, \"capabilities\": [\"oob\"]}}\r\n",
                &[],
                d,
            )
            .expect("greet");
            let l = peer.read_line(d).expect("caps");
            let v: Value = serde_json::from_slice(&l).expect("json");
            assert_eq!(v["execute"], "qmp_capabilities");
            let reply = json!({"return": {}, "id": v["id"]});
            peer.send_json(&reply, &[], d).expect("reply");
            peer
        });
        let q = Qmp::handshake(a, Duration::from_secs(5)).expect("handshake");
        (q, t.join().expect("peer"))
    }

    #[test]
    fn events_before_a_reply_are_queued_and_stale_replies_skipped() {
        let (mut q, mut peer) = fake_pair();
        assert_eq!(q.version().to_string(), "7.2.0");
        assert_eq!(q.capabilities(), ["oob"]);
        let t = std::thread::spawn(move || {
            let d = Instant::now() + Duration::from_secs(5);
            let l = peer.read_line(d).expect("cmd");
            let v: Value = serde_json::from_slice(&l).expect("json");
            assert_eq!(v["execute"], "query-status");
            assert!(v.get("arguments").is_none());
            for m in [
                json!({"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 0}}),
                json!({"return": {"running": true, "status": "running"}, "id": 999}),
                json!({"event": "RESUME", "timestamp": {"seconds": 2, "microseconds": 0}}),
                json!({"return": {"running": false, "status": "paused"}, "id": v["id"]}),
                json!({"event": "RESET", "data": {"guest": false, "reason": "host-qmp-system-reset"},
                       "timestamp": {"seconds": 3, "microseconds": 0}}),
            ] {
                peer.send_json(&m, &[], d).expect("send");
            }
            peer
        });
        let s = q.query_status().expect("status");
        assert_eq!(s.status, RunState::Paused);
        let _peer = t.join().expect("peer");
        let ev = q
            .wait_event("RESET", Duration::from_secs(5), |_| true)
            .expect("reset");
        assert_eq!(ev.data["reason"], "host-qmp-system-reset");
        let names: Vec<String> = q
            .events()
            .expect("events")
            .into_iter()
            .map(|e| e.event)
            .collect();
        assert_eq!(names, ["STOP", "RESUME"]);
    }

    #[test]
    fn a_silent_peer_times_out_and_a_closed_one_is_reported() {
        let (mut q, peer) = fake_pair();
        q.set_timeout(Duration::from_millis(100));
        let e = q.execute(&Stop).expect_err("timeout");
        assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
        drop(peer);
        let e = q.execute(&Cont).expect_err("closed");
        assert!(
            matches!(e, QmpError::Closed(_) | QmpError::Io { .. }),
            "{e}"
        );
    }

    #[test]
    fn a_client_without_a_greeting_is_told_another_may_hold_the_socket() {
        let (a, _b) = UnixStream::pair().expect("pair");
        let e = Qmp::handshake(a, Duration::from_millis(100)).expect_err("timeout");
        assert!(e.to_string().contains("another client"), "{e}");
    }
}

/// Tests against a real `qemu-system-x86_64` without a guest (`-machine none`).
#[cfg(test)]
mod qemu_tests {
    use std::os::fd::AsFd;
    use std::process::{Child, Command, Stdio};

    use super::*;

    const QEMU: &str = "qemu-system-x86_64";

    /// A QEMU process killed (and reaped) when dropped.
    struct TestQemu {
        child: Child,
        sock: PathBuf,
        dir: tempfile::TempDir,
    }

    impl TestQemu {
        /// Starts QEMU with a QMP socket and `extra` arguments; `None` (after printing
        /// SKIP) when QEMU is not installed.
        fn start(test: &str, extra: &[&str]) -> Option<Self> {
            let dir = tempfile::tempdir().expect("tempdir");
            Self::start_in(test, dir, extra)
        }

        fn start_in(test: &str, dir: tempfile::TempDir, extra: &[&str]) -> Option<Self> {
            let sock = dir.path().join("qmp.sock");
            let spawned = Command::new(QEMU)
                .args(["-machine", "none", "-nodefaults", "-display", "none"])
                .arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", sock.display()))
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn();
            match spawned {
                Ok(child) => Some(TestQemu { child, sock, dir }),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    println!("SKIP {test}: {QEMU} is not installed");
                    None
                }
                Err(e) => panic!("spawn {QEMU}: {e}"),
            }
        }

        fn qmp(&self) -> Qmp {
            Qmp::connect_retry(&self.sock, Duration::from_secs(10)).expect("QMP connect")
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        /// Waits for QEMU to exit on its own.
        fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
            let deadline = Instant::now() + timeout;
            loop {
                if let Some(st) = self.child.try_wait().expect("try_wait") {
                    return st;
                }
                assert!(Instant::now() < deadline, "QEMU did not exit");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    impl Drop for TestQemu {
        fn drop(&mut self) {
            if let Ok(None) = self.child.try_wait() {
                let _ = self.child.kill();
            }
            let _ = self.child.wait();
        }
    }

    fn qemu_img(args: &[&str]) -> String {
        let out = Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img");
        assert!(
            out.status.success(),
            "qemu-img {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn make_qcow2(path: &Path, size: &str) {
        qemu_img(&["create", "-q", "-f", "qcow2", &path.to_string_lossy(), size]);
    }

    fn add_qcow2(q: &mut Qmp, node: &str, path: &Path) {
        let file = format!("{node}-file");
        q.execute(&BlockdevAdd(file_node(&file, path, false)))
            .expect("add file node");
        q.execute(&BlockdevAdd(format_node("qcow2", node, &file, false)))
            .expect("add qcow2 node");
    }

    fn node<'a>(nodes: &'a [BlockDeviceInfo], name: &str) -> &'a BlockDeviceInfo {
        nodes
            .iter()
            .find(|n| n.node_name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("node {name} not in {nodes:?}"))
    }

    fn flat_nodes(q: &mut Qmp) -> Vec<BlockDeviceInfo> {
        q.execute(&QueryNamedBlockNodes { flat: true })
            .expect("query-named-block-nodes")
    }

    #[test]
    fn qemu_status_stop_cont_with_events_and_quit_ends_the_process() {
        let Some(mut vm) = TestQemu::start("qemu_status_stop_cont", &[]) else {
            return;
        };
        let mut q = vm.qmp();
        assert!(q.version().qemu.major >= 7, "{}", q.version());
        let v = q.execute(&QueryVersion).expect("query-version");
        assert_eq!(&v, q.version());
        assert!(q.query_status().expect("status").running);

        q.execute(&Stop).expect("stop");
        q.wait_event("STOP", Duration::from_secs(5), |_| true)
            .expect("STOP event");
        let s = q.query_status().expect("status");
        assert_eq!((s.running, s.status), (false, RunState::Paused));

        q.execute(&Cont).expect("cont");
        q.wait_event("RESUME", Duration::from_secs(5), |_| true)
            .expect("RESUME event");
        assert_eq!(q.query_status().expect("status").status, RunState::Running);

        q.execute(&Quit).expect("quit");
        let st = vm.wait_exit(Duration::from_secs(10));
        assert!(st.success(), "{st}");
        let ev = q
            .wait_event("SHUTDOWN", Duration::from_secs(5), |_| true)
            .expect("SHUTDOWN before the close");
        let sd: Shutdown = ev.data_as().expect("shutdown data");
        assert_eq!((sd.guest, sd.reason.as_str()), (false, "host-qmp-quit"));
        let e = q.query_status().expect_err("closed");
        assert!(
            matches!(e, QmpError::Closed(_) | QmpError::Io { .. }),
            "{e}"
        );
    }

    #[test]
    fn qemu_persistent_bitmap_counts_writes_and_is_stored_in_the_image() {
        let dir = tempfile::tempdir().expect("tmp");
        let drive = dir.path().join("drive.qcow2");
        make_qcow2(&drive, "32M");
        let drive_arg = format!(
            "if=none,id=drive0,node-name=drive0-fmt,format=qcow2,file={}",
            drive.display()
        );
        let Some(mut vm) =
            TestQemu::start_in("qemu_persistent_bitmap", dir, &["-drive", &drive_arg])
        else {
            return;
        };
        let mut q = vm.qmp();
        let disk = vm.path("disk.qcow2");
        make_qcow2(&disk, "64M");
        add_qcow2(&mut q, "disk0", &disk);
        for node in ["disk0", "drive0-fmt"] {
            q.execute(&BlockDirtyBitmapAdd {
                node: node.into(),
                name: "b0".into(),
                granularity: Some(65536),
                persistent: true,
                disabled: None,
            })
            .expect("bitmap add");
        }
        // qemu-io prints to QEMU's stdout, not to the monitor: the bitmaps show the writes.
        q.hmp(r#"qemu-io disk0 "write -P 0xab 0 1M""#)
            .expect("qemu-io");
        q.hmp(r#"qemu-io drive0 "write -P 0xcd 1M 128k""#)
            .expect("qemu-io");

        let nodes = flat_nodes(&mut q);
        let n = node(&nodes, "disk0");
        assert_eq!(n.drv, "qcow2");
        assert_eq!(n.image.as_ref().map(|i| i.virtual_size), Some(64 << 20));
        let b = &n.dirty_bitmaps[0];
        assert_eq!(
            (b.name.as_deref(), b.count, b.persistent, b.recording),
            (Some("b0"), 1 << 20, true, true)
        );

        let block = q.execute(&QueryBlock).expect("query-block");
        let d = block.iter().find(|b| b.device == "drive0").expect("drive0");
        let ins = d.inserted.as_ref().expect("inserted");
        assert_eq!(ins.node_name.as_deref(), Some("drive0-fmt"));
        assert_eq!(ins.dirty_bitmaps[0].count, 128 << 10);

        q.execute(&BlockDirtyBitmapClear(BlockDirtyBitmap {
            node: "disk0".into(),
            name: "b0".into(),
        }))
        .expect("clear");
        assert_eq!(node(&flat_nodes(&mut q), "disk0").dirty_bitmaps[0].count, 0);
        q.hmp(r#"qemu-io disk0 "write -P 0xef 8M 64k""#)
            .expect("qemu-io");
        assert_eq!(
            node(&flat_nodes(&mut q), "disk0").dirty_bitmaps[0].count,
            64 << 10
        );

        // Closing the nodes stores the persistent bitmap in the image.
        q.execute(&BlockdevDel {
            node_name: "disk0".into(),
        })
        .expect("del fmt");
        q.execute(&BlockdevDel {
            node_name: "disk0-file".into(),
        })
        .expect("del file");
        let info = qemu_img(&["info", "--output=json", "-U", &disk.to_string_lossy()]);
        let info: Value = serde_json::from_str(&info).expect("json");
        assert_eq!(
            info["format-specific"]["data"]["bitmaps"][0]["name"], "b0",
            "{info}"
        );

        q.execute(&Quit).expect("quit");
        assert!(vm.wait_exit(Duration::from_secs(10)).success());
    }

    #[test]
    fn qemu_errors_keep_class_and_desc_and_the_connection_stays_usable() {
        let Some(vm) = TestQemu::start("qemu_errors", &[]) else {
            return;
        };
        let mut q = vm.qmp();
        let e = q
            .execute(&DeviceDel { id: "nope".into() })
            .expect_err("unknown device");
        match &e {
            QmpError::Command {
                command,
                class,
                desc,
            } => {
                assert_eq!(command, "device_del");
                assert_eq!(class, "DeviceNotFound");
                assert!(desc.contains("nope"), "{desc}");
            }
            other => panic!("{other}"),
        }
        let missing = vm.path("missing.qcow2");
        let e = q
            .execute(&BlockdevAdd(file_node("f", &missing, false)))
            .expect_err("missing file");
        assert_eq!(e.class(), Some("GenericError"), "{e}");
        assert!(e.to_string().contains("missing.qcow2"), "{e}");
        let e = q
            .execute_raw("no-such-command", Value::Null)
            .expect_err("unknown command");
        assert_eq!(e.class(), Some("CommandNotFound"));
        assert!(matches!(DriverError::from(e), DriverError::Unsupported(_)));
        assert!(q.query_status().expect("still usable").running);
    }

    #[test]
    fn qemu_opens_a_disk_passed_as_an_fd_and_keeps_named_fds() {
        let Some(vm) = TestQemu::start("qemu_fd_passing", &[]) else {
            return;
        };
        let mut q = vm.qmp();
        let disk = vm.path("fd.qcow2");
        make_qcow2(&disk, "16M");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk)
            .expect("open disk");
        let set = q.add_fd(f.as_fd(), None, Some("disk fd")).expect("add-fd");
        drop(f);
        let fdset = PathBuf::from(format!("/dev/fdset/{}", set.fdset_id));
        q.execute(&BlockdevAdd(file_node("fdf", &fdset, false)))
            .expect("file node over the fd set");
        q.execute(&BlockdevAdd(format_node("qcow2", "fdq", "fdf", false)))
            .expect("qcow2 node");
        q.execute(&BlockDirtyBitmapAdd {
            node: "fdq".into(),
            name: "w".into(),
            granularity: Some(65536),
            persistent: false,
            disabled: None,
        })
        .expect("bitmap");
        q.hmp(r#"qemu-io fdq "write -P 0x11 0 64k""#)
            .expect("write");
        assert_eq!(
            node(&flat_nodes(&mut q), "fdq").dirty_bitmaps[0].count,
            64 << 10
        );

        let tap_like = tempfile::tempfile().expect("tmp");
        q.getfd("fd0", tap_like.as_fd()).expect("getfd");
        q.execute(&CloseFd {
            fdname: "fd0".into(),
        })
        .expect("closefd");
        let e = q
            .execute(&CloseFd {
                fdname: "fd0".into(),
            })
            .expect_err("closed twice");
        assert_eq!(e.class(), Some("GenericError"));
    }

    #[test]
    fn qemu_full_then_incremental_backup_jobs_follow_the_bitmap() {
        let Some(vm) = TestQemu::start("qemu_backup_jobs", &[]) else {
            return;
        };
        let mut q = vm.qmp();
        let (src, full, inc) = (
            vm.path("src.qcow2"),
            vm.path("full.qcow2"),
            vm.path("inc.qcow2"),
        );
        make_qcow2(&src, "64M");
        make_qcow2(&full, "64M");
        make_qcow2(&inc, "64M");
        add_qcow2(&mut q, "src", &src);
        add_qcow2(&mut q, "full", &full);
        add_qcow2(&mut q, "inc", &inc);
        q.hmp(r#"qemu-io src "write -P 0x01 0 4M""#).expect("write");
        q.execute(&BlockDirtyBitmapAdd {
            node: "src".into(),
            name: "inc0".into(),
            granularity: None,
            persistent: true,
            disabled: None,
        })
        .expect("bitmap");
        let backup = |job: &str, target: &str, sync, bitmap: Option<&str>| BlockdevBackup {
            job_id: job.into(),
            device: "src".into(),
            target: target.into(),
            sync,
            bitmap: bitmap.map(str::to_string),
            bitmap_mode: None,
            auto_dismiss: false,
            speed: None,
        };
        q.execute(&backup("j-full", "full", BackupSync::Full, None))
            .expect("full");
        q.wait_job("j-full", Duration::from_secs(30))
            .expect("full job");

        q.hmp(r#"qemu-io src "write -P 0x02 32M 1M""#)
            .expect("write");
        q.execute(&backup(
            "j-inc",
            "inc",
            BackupSync::Incremental,
            Some("inc0"),
        ))
        .expect("incremental");
        q.wait_job("j-inc", Duration::from_secs(30))
            .expect("inc job");
        assert!(q.execute(&QueryJobs).expect("jobs").is_empty(), "dismissed");
        // The incremental job cleared the bitmap; the target holds only the 1M written.
        assert_eq!(node(&flat_nodes(&mut q), "src").dirty_bitmaps[0].count, 0);
        q.execute(&BlockdevDel {
            node_name: "inc".into(),
        })
        .expect("close target");
        let m = qemu_img(&["map", "--output=json", "-U", &inc.to_string_lossy()]);
        let m: Vec<Value> = serde_json::from_str(&m).expect("map");
        let data: u64 = m
            .iter()
            .filter(|e| e["data"] == true)
            .map(|e| e["length"].as_u64().unwrap_or(0))
            .sum();
        assert_eq!(data, 1 << 20, "{m:?}");

        // A job that fails reports QEMU's error through wait_job.
        let e = q
            .execute(&backup(
                "j-bad",
                "inc",
                BackupSync::Incremental,
                Some("nope"),
            ))
            .expect_err("no such bitmap");
        assert_eq!(e.class(), Some("GenericError"), "{e}");
    }
}
