//! The controller's event log: what it did and saw (revisions applied or rejected,
//! changes applied, drift found and repaired, failures with their class, operator
//! actions). A bounded ring in memory serves `/api/v1/events` and the detail pages; every
//! event is also appended to `<run-dir>/controller-events.jsonl` (one JSON object a line,
//! rotated to `.1` past [`FILE_LIMIT`]) and the ring is refilled from it at start.
//! Subscribers (the SSE stream) get each event and each status change as it happens.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use stead_reconciler::state::now_secs;
use tokio::sync::broadcast;
use tracing::warn;
use utoipa::ToSchema;

use crate::view::redact::redact_text;

/// Events kept in memory.
pub const RING_CAPACITY: usize = 2000;
/// Size past which the JSONL file is rotated to `.1`.
pub const FILE_LIMIT: u64 = 8 << 20;
/// The event file's name in the run dir.
pub const FILE_NAME: &str = "controller-events.jsonl";

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// A revision was applied for the first time.
    Revision,
    /// A revision was refused (invalid manifests, unsigned, a rewind).
    Rejected,
    /// A change was applied (create, update, replace, delete).
    Apply,
    /// Drift was found on the host.
    Drift,
    /// Drift was repaired (the change that put the host back was applied).
    DriftRepaired,
    /// A change failed; `class` says how (`transient` or the terminal reason).
    Failure,
    /// An operator action from the UI or the API.
    Action,
}

/// One event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// Sequence number, increasing (restarts from the file's last at start).
    pub seq: u64,
    /// Unix seconds.
    pub ts: f64,
    /// What it is about.
    pub kind: EventKind,
    /// `Normal` or `Warning`.
    pub level: String,
    /// `Kind/name`, if it is about one resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// Short CamelCase reason (`Created`, `Drift`, `ApplyFailed`, `SyncNow`, …).
    pub reason: String,
    /// Human-readable message (secret `KEY=value` pairs cut).
    pub message: String,
    /// For failures: `transient` (retried with backoff) or `terminal` (held until the
    /// manifest or the host changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// For actions: who asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The revision applied when it happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
}

/// A new event before it gets its number and time.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// What it is about.
    pub kind: EventKind,
    /// `Kind/name` or none.
    pub resource: Option<String>,
    /// Reason.
    pub reason: String,
    /// Message.
    pub message: String,
    /// Failure class.
    pub class: Option<String>,
    /// Who asked (actions).
    pub user: Option<String>,
    /// Revision.
    pub revision: Option<String>,
}

impl NewEvent {
    /// An event of `kind` with `reason` and `message`.
    pub fn new(kind: EventKind, reason: &str, message: impl Into<String>) -> Self {
        NewEvent {
            kind,
            resource: None,
            reason: reason.into(),
            message: message.into(),
            class: None,
            user: None,
            revision: None,
        }
    }

    /// About `resource`.
    pub fn on(mut self, resource: impl ToString) -> Self {
        self.resource = Some(resource.to_string());
        self
    }

    /// With a failure class.
    pub fn class(mut self, class: &str) -> Self {
        self.class = Some(class.into());
        self
    }

    /// Asked by `user`.
    pub fn by(mut self, user: &str) -> Self {
        self.user = Some(user.into());
        self
    }

    /// At `revision`.
    pub fn at(mut self, revision: Option<&str>) -> Self {
        self.revision = revision.map(str::to_string);
        self
    }
}

/// The level an event of `kind` gets.
fn level_of(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Rejected | EventKind::Drift | EventKind::Failure => "Warning",
        _ => "Normal",
    }
}

/// A live update for subscribers.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Update {
    /// A new event.
    Event(Event),
    /// A reconcile ended: the status changed.
    Status(StatusUpdate),
}

/// What changed in a reconcile, for live pages.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatusUpdate {
    /// Reconciles so far.
    pub reconciles: u64,
    /// Result of the last reconcile.
    pub last_result: Option<String>,
    /// Revision applied.
    pub revision: Option<String>,
    /// Resources whose status, reason or drift changed since the previous update.
    pub changed: Vec<crate::view::NodeStatus>,
}

struct Ring {
    events: VecDeque<Event>,
    next_seq: u64,
}

/// The event log (see the module docs).
pub struct EventLog {
    ring: Mutex<Ring>,
    capacity: usize,
    file: Option<Mutex<File>>,
    path: Option<PathBuf>,
    tx: broadcast::Sender<Update>,
}

impl EventLog {
    /// A log kept in memory only.
    pub fn in_memory(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(256);
        EventLog {
            ring: Mutex::new(Ring {
                events: VecDeque::new(),
                next_seq: 1,
            }),
            capacity: capacity.max(1),
            file: None,
            path: None,
            tx,
        }
    }

    /// A log appended to `<run_dir>/controller-events.jsonl`, its ring refilled from the
    /// file's tail. An unwritable file leaves the log in memory only (logged).
    pub fn open(run_dir: &Path, capacity: usize) -> Self {
        let mut log = EventLog::in_memory(capacity);
        let path = run_dir.join(FILE_NAME);
        let old = read_tail(&path, capacity);
        {
            let mut ring = log.lock();
            ring.next_seq = old.last().map_or(1, |e| e.seq + 1);
            ring.events = old.into();
        }
        let opened = std::fs::create_dir_all(run_dir).and_then(|_| open_append(&path));
        match opened {
            Ok(f) => {
                log.file = Some(Mutex::new(f));
                log.path = Some(path);
            }
            Err(e) => warn!(file = %path.display(), error = %e, "event log kept in memory only"),
        }
        log
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an event: numbered, kept, appended to the file and sent to subscribers.
    pub fn record(&self, new: NewEvent) -> Event {
        let ev = {
            let mut ring = self.lock();
            let ev = Event {
                seq: ring.next_seq,
                ts: now_secs(),
                kind: new.kind,
                level: level_of(new.kind).into(),
                resource: new.resource,
                reason: new.reason,
                message: redact_text(&new.message),
                class: new.class,
                user: new.user,
                revision: new.revision,
            };
            ring.next_seq += 1;
            ring.events.push_back(ev.clone());
            while ring.events.len() > self.capacity {
                ring.events.pop_front();
            }
            ev
        };
        self.append(&ev);
        let _ = self.tx.send(Update::Event(ev.clone()));
        ev
    }

    /// Appends to the file, rotating it past [`FILE_LIMIT`] (best effort).
    fn append(&self, ev: &Event) {
        let (Some(file), Some(path)) = (&self.file, &self.path) else {
            return;
        };
        let Ok(mut line) = serde_json::to_string(ev) else {
            return;
        };
        line.push('\n');
        let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
        if f.metadata().is_ok_and(|m| m.len() > FILE_LIMIT) {
            let _ = std::fs::rename(path, path.with_extension("jsonl.1"));
            if let Ok(new) = open_append(path) {
                *f = new;
            }
        }
        if let Err(e) = f.write_all(line.as_bytes()) {
            warn!(error = %e, "cannot append to the event log file");
        }
    }

    /// Sends a status update to subscribers.
    pub fn publish_status(&self, update: StatusUpdate) {
        let _ = self.tx.send(Update::Status(update));
    }

    /// A receiver of live updates.
    pub fn subscribe(&self) -> broadcast::Receiver<Update> {
        self.tx.subscribe()
    }

    /// The newest events first, at most `limit`, those about `resource` only when given,
    /// and only those after `after` (a sequence number) when given.
    pub fn recent(&self, resource: Option<&str>, after: Option<u64>, limit: usize) -> Vec<Event> {
        let ring = self.lock();
        ring.events
            .iter()
            .rev()
            .filter(|e| resource.is_none_or(|r| e.resource.as_deref() == Some(r)))
            .filter(|e| after.is_none_or(|a| e.seq > a))
            .take(limit)
            .cloned()
            .collect()
    }
}

/// Opens `path` for appending, creating it readable by its owner only.
fn open_append(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    File::options()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// The last `n` events of a JSONL file (unparsable lines skipped).
fn read_tail(path: &Path, n: usize) -> Vec<Event> {
    let Ok(f) = File::open(path) else {
        return Vec::new();
    };
    let mut out: VecDeque<Event> = VecDeque::new();
    for line in BufReader::new(f).lines().map_while(Result::ok) {
        if let Ok(e) = serde_json::from_str::<Event>(&line) {
            out.push_back(e);
            if out.len() > n {
                out.pop_front();
            }
        }
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_is_bounded_and_numbers_events_in_order() {
        let log = EventLog::in_memory(3);
        for i in 0..5 {
            log.record(NewEvent::new(EventKind::Apply, "Created", format!("e{i}")).on("Volume/v"));
        }
        let got = log.recent(None, None, 10);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].seq, 5, "newest first");
        assert_eq!(got[2].message, "e2");
        assert_eq!(log.recent(None, Some(4), 10).len(), 1);
        assert_eq!(log.recent(Some("Volume/w"), None, 10).len(), 0);
    }

    #[test]
    fn events_survive_a_restart_through_the_jsonl_file() {
        let t = tempfile::tempdir().expect("tmp");
        {
            let log = EventLog::open(t.path(), 10);
            log.record(
                NewEvent::new(EventKind::Failure, "ApplyFailed", "boom")
                    .on("Container/c")
                    .class("transient"),
            );
            log.record(NewEvent::new(EventKind::Action, "SyncNow", "sync requested").by("ann"));
        }
        let text = std::fs::read_to_string(t.path().join(FILE_NAME)).expect("file");
        assert_eq!(text.lines().count(), 2);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(t.path().join(FILE_NAME))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let log = EventLog::open(t.path(), 10);
        let got = log.recent(None, None, 10);
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].class.as_deref(), Some("transient"));
        assert_eq!(got[1].level, "Warning");
        let next = log.record(NewEvent::new(EventKind::Apply, "Created", "x"));
        assert_eq!(next.seq, 3, "numbering goes on after a restart");
    }

    #[test]
    fn subscribers_get_events_and_secret_pairs_are_cut() {
        let log = EventLog::in_memory(10);
        let mut rx = log.subscribe();
        log.record(NewEvent::new(
            EventKind::Failure,
            "ApplyFailed",
            "exec: DB_PASSWORD=hunter2 failed",
        ));
        match rx.try_recv() {
            Ok(Update::Event(e)) => assert!(!e.message.contains("hunter2"), "{}", e.message),
            other => panic!("expected an event, got {other:?}"),
        }
    }
}
