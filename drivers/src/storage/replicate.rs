//! Storage replication for cluster failover: periodic incremental copies of a volume to a
//! peer node (btrfs send/receive, zfs send/receive), so its workload can restart there.
//!
//! The sending node takes a read-only snapshot `stead-repl-<seq>` of the volume and streams
//! it (incrementally from the previous one when the peer holds it) over any duplex byte
//! stream ([`send_volume`]); the receiving node ([`receive_volume`]) writes it into its pool
//! as the volume's replica: a read-only copy, not a live volume until [`ReplicationBackend::promote`]
//! at failover.
//!
//! Wire format (one transfer per connection): the sender writes a `Hello` JSON line, the
//! receiver answers `Have` (its last complete replica), the sender writes `Offer` and then
//! the send stream in chunks (`u32` big-endian length + bytes; length 0 ends it, `u32::MAX`
//! aborts it), and the receiver answers `Done` or `Failed`. A transfer that is cut short or
//! aborted never replaces the previous replica: a replica counts only once its commit record
//! (`stead-repl-<seq>.json`, written by rename) exists, and a partial one is deleted.
//!
//! After a successful transfer both sides keep exactly the last common snapshot (the parent
//! of the next incremental send) and delete the older ones.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use stead_reconciler::driver::DriverError;
use tracing::{debug, info, instrument, warn};

use super::{btrfs, fsutil};

/// Name prefix of replication snapshots (`stead-repl-<seq>`).
pub const SNAPSHOT_PREFIX: &str = "stead-repl-";
/// Directory under a btrfs pool holding the sending side's snapshots, per volume.
pub const SOURCE_DIR: &str = "replication";
/// Directory under a btrfs pool holding received replicas, per volume.
pub const REPLICA_DIR: &str = "replicas";
/// Largest chunk of the send stream on the wire.
const MAX_CHUNK: u32 = 1 << 20;
/// Chunk length that aborts a transfer.
const ABORT: u32 = u32::MAX;
/// Longest control line.
const MAX_LINE: u64 = 64 * 1024;

/// The name of replication snapshot `seq`.
pub fn snapshot_name(seq: u64) -> String {
    format!("{SNAPSHOT_PREFIX}{seq}")
}

/// The sequence number of a replication snapshot's name.
pub fn parse_snapshot_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(SNAPSHOT_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Seconds since the Unix epoch now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One replication point as the receiving side records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaInfo {
    /// Sequence number (the snapshot's name).
    pub seq: u64,
    /// When the sending side took the snapshot (Unix seconds): the point the replica holds.
    pub taken_at: u64,
    /// The sender's fencing token (its ownership of the volume's workload; 0: none). A
    /// receiver refuses a sender whose token is older than its last replica's.
    #[serde(default)]
    pub token: i64,
}

/// What one successful transfer did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendReport {
    /// The replication point now on both sides.
    pub point: ReplicaInfo,
    /// The parent the stream was incremental from (`None`: a full send).
    pub parent: Option<u64>,
    /// Bytes of the send stream (without framing).
    pub bytes: u64,
    /// Wall time from snapshot to the receiver's acknowledgement.
    pub duration: Duration,
    /// Where the receiver kept its stale live copy of the volume (a read-only snapshot), if
    /// it had one that changed since the common point.
    pub kept: Option<String>,
}

/// A replica made the live volume at failover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promoted {
    /// The replica the volume now starts from.
    pub point: ReplicaInfo,
    /// Data-loss window: time between the replica's snapshot and the promotion (writes to the
    /// old volume after the snapshot are lost).
    pub window: Duration,
}

/// The storage side of replication, one implementation per pool type.
pub trait ReplicationBackend {
    /// Sequence numbers of the sending side's replication snapshots of `volume`, ascending.
    fn source_snapshots(&self, volume: &str) -> Result<Vec<u64>, DriverError>;
    /// Takes the read-only replication snapshot `seq` of `volume`.
    fn take_snapshot(&self, volume: &str, seq: u64) -> Result<(), DriverError>;
    /// Writes the send stream of snapshot `seq` (incremental from `parent`) to `out`.
    fn send(
        &self,
        volume: &str,
        seq: u64,
        parent: Option<u64>,
        out: &mut dyn Write,
    ) -> Result<(), DriverError>;
    /// Deletes the sending side's snapshot `seq` (absent is success).
    fn delete_snapshot(&self, volume: &str, seq: u64) -> Result<(), DriverError>;
    /// The complete replicas of `volume` held here, ascending.
    fn replicas(&self, volume: &str) -> Result<Vec<ReplicaInfo>, DriverError>;
    /// Receives `point` from `input` (which ends at the end of the stream, or fails). On
    /// success the replica is complete; on failure nothing of it is left and the previous
    /// replicas are untouched.
    fn receive(
        &self,
        volume: &str,
        point: &ReplicaInfo,
        input: &mut dyn Read,
    ) -> Result<(), DriverError>;
    /// Deletes replica `seq` (absent is success).
    fn delete_replica(&self, volume: &str, seq: u64) -> Result<(), DriverError>;
    /// Makes the last complete replica the live volume (a writable copy); refuses if the
    /// volume exists here.
    fn promote(&self, volume: &str) -> Result<Promoted, DriverError>;
    /// On the receiving side, when it holds no replica newer than `newer_than`: the newest
    /// of its own replication snapshots of `volume` (left from when it owned and sent the
    /// volume), made usable as the parent of an incremental stream sent back to it, so the
    /// first transfer after a move or failover is incremental. `None` (the default): a full
    /// send.
    fn offer_own_snapshot(
        &self,
        _volume: &str,
        _newer_than: Option<u64>,
    ) -> Result<Option<u64>, DriverError> {
        Ok(None)
    }
    /// On the receiving side, before a stream incremental from `parent` (`None`: full) is
    /// received: this node does not own the volume, so a live copy of it here is stale.
    /// It is moved out of the live path and made read-only first; it is removed only when
    /// provably unchanged since `parent`, else kept and its path returned. When the live
    /// copy is already gone (deleted by a converge, which keeps a safety snapshot), a
    /// safety snapshot holding changes since `parent` is returned. The default keeps
    /// everything (returns `None`).
    fn retire_live_copy(
        &self,
        _volume: &str,
        _parent: Option<u64>,
    ) -> Result<Option<String>, DriverError> {
        Ok(None)
    }
}

/// Control messages of the wire format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "camelCase")]
enum Message {
    Hello {
        volume: String,
        #[serde(default)]
        token: i64,
    },
    Have {
        latest: Option<u64>,
    },
    Offer {
        point: ReplicaInfo,
        parent: Option<u64>,
    },
    Done {
        seq: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kept: Option<String>,
    },
    Failed {
        error: String,
    },
}

fn proto_err(what: impl Into<String>) -> DriverError {
    DriverError::Other(format!("replication protocol: {}", what.into()))
}

fn write_message(w: &mut dyn Write, m: &Message) -> Result<(), DriverError> {
    let mut line = serde_json::to_vec(m).map_err(|e| proto_err(e.to_string()))?;
    line.push(b'\n');
    w.write_all(&line)
        .and_then(|()| w.flush())
        .map_err(|e| DriverError::io("replication: write", e))
}

fn read_message(r: &mut dyn Read) -> Result<Message, DriverError> {
    // Byte by byte: nothing after the line may be consumed (the stream follows).
    let mut line = Vec::new();
    let mut limited = r.take(MAX_LINE);
    let mut byte = [0u8; 1];
    loop {
        match limited.read(&mut byte) {
            Ok(0) => return Err(proto_err("connection closed")),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(DriverError::io("replication: read", e)),
        }
    }
    serde_json::from_slice(&line).map_err(|e| proto_err(format!("bad message: {e}")))
}

/// A writer framing everything as chunks; counts payload bytes.
struct ChunkWriter<'a> {
    inner: &'a mut dyn Write,
    bytes: u64,
}

impl Write for ChunkWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(MAX_CHUNK as usize);
        if n == 0 {
            return Ok(0);
        }
        let len = u32::try_from(n).map_err(io::Error::other)?;
        self.inner.write_all(&len.to_be_bytes())?;
        self.inner.write_all(&buf[..n])?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl ChunkWriter<'_> {
    fn finish(self, len: u32) -> io::Result<u64> {
        self.inner.write_all(&len.to_be_bytes())?;
        self.inner.flush()?;
        Ok(self.bytes)
    }
}

/// A reader of the chunks: EOF at the end marker, an error on abort or a cut-short stream.
struct ChunkReader<'a> {
    inner: &'a mut dyn Read,
    left: u32,
    ended: bool,
}

impl Read for ChunkReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.ended || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut len = [0u8; 4];
            self.inner.read_exact(&mut len)?;
            match u32::from_be_bytes(len) {
                0 => {
                    self.ended = true;
                    return Ok(0);
                }
                ABORT => return Err(io::Error::other("the sender aborted the transfer")),
                n if n > MAX_CHUNK => return Err(io::Error::other("chunk too large")),
                n => self.left = n,
            }
        }
        let want = buf.len().min(self.left as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.left -= u32::try_from(n).map_err(io::Error::other)?;
        Ok(n)
    }
}

/// The transfer plan on the sending side: the next sequence number, and the parent to send
/// incrementally from (the peer's latest replica, if this side still holds that snapshot).
pub fn plan(local: &[u64], peer_latest: Option<u64>) -> (u64, Option<u64>) {
    let highest = local.iter().copied().chain(peer_latest).max().unwrap_or(0);
    let parent = peer_latest.filter(|p| local.contains(p));
    (highest + 1, parent)
}

/// Sends one replication point of `volume` over `stream` to a peer running
/// [`receive_volume`], as the owner holding fencing token `token` (the owner key's revision,
/// 0 without a cluster). On success both sides keep only the new point.
#[instrument(skip(backend, stream))]
pub fn send_volume<S: Read + Write>(
    backend: &dyn ReplicationBackend,
    volume: &str,
    token: i64,
    stream: &mut S,
) -> Result<SendReport, DriverError> {
    let started = Instant::now();
    write_message(
        stream,
        &Message::Hello {
            volume: volume.to_string(),
            token,
        },
    )?;
    let latest = match read_message(stream)? {
        Message::Have { latest } => latest,
        Message::Failed { error } => {
            return Err(DriverError::Refused(format!(
                "the receiver refused: {error}"
            )));
        }
        other => return Err(proto_err(format!("expected Have, got {other:?}"))),
    };
    let (seq, parent) = plan(&backend.source_snapshots(volume)?, latest);
    backend.take_snapshot(volume, seq)?;
    let point = ReplicaInfo {
        seq,
        taken_at: unix_now(),
        token,
    };
    let result = stream_point(backend, volume, &point, parent, stream);
    match result {
        Ok((bytes, kept)) => {
            prune_snapshots(backend, volume, seq)?;
            let report = SendReport {
                point,
                parent,
                bytes,
                duration: started.elapsed(),
                kept,
            };
            info!(
                seq,
                ?parent,
                bytes,
                ms = report.duration.as_millis(),
                kept = ?report.kept,
                "replicated"
            );
            Ok(report)
        }
        Err(e) => {
            // The parent stays the common point; the new snapshot is dropped.
            if let Err(d) = backend.delete_snapshot(volume, seq) {
                warn!(seq, error = %d, "cannot delete the failed replication snapshot");
            }
            Err(e)
        }
    }
}

fn stream_point<S: Read + Write>(
    backend: &dyn ReplicationBackend,
    volume: &str,
    point: &ReplicaInfo,
    parent: Option<u64>,
    stream: &mut S,
) -> Result<(u64, Option<String>), DriverError> {
    write_message(
        stream,
        &Message::Offer {
            point: point.clone(),
            parent,
        },
    )?;
    let mut chunks = ChunkWriter {
        inner: stream,
        bytes: 0,
    };
    let sent = backend.send(volume, point.seq, parent, &mut chunks);
    let bytes = match sent {
        Ok(()) => chunks.finish(0),
        Err(e) => {
            let _ = chunks.finish(ABORT);
            return Err(e);
        }
    }
    .map_err(|e| DriverError::io("replication: write", e))?;
    match read_message(stream)? {
        Message::Done { seq, kept } if seq == point.seq => Ok((bytes, kept)),
        Message::Failed { error } => Err(DriverError::Other(format!(
            "the receiver refused replication point {}: {error}",
            point.seq
        ))),
        other => Err(proto_err(format!("expected Done, got {other:?}"))),
    }
}

fn prune_snapshots(
    backend: &dyn ReplicationBackend,
    volume: &str,
    keep: u64,
) -> Result<(), DriverError> {
    for old in backend.source_snapshots(volume)? {
        if old != keep {
            debug!(old, "prune replication snapshot");
            backend.delete_snapshot(volume, old)?;
        }
    }
    Ok(())
}

/// Chooses where a volume's replicas go on the receiving node: `None` refuses the volume
/// (it is not replicated to this node).
pub type Resolve<'a> = &'a dyn Fn(&str) -> Option<Box<dyn ReplicationBackend>>;

/// Receives one replication point over `stream` from a peer running [`send_volume`], into
/// the backend `resolve` gives for its volume. Returns the volume and the new point.
#[instrument(skip_all)]
pub fn receive_volume<S: Read + Write>(
    resolve: Resolve<'_>,
    stream: &mut S,
) -> Result<(String, ReplicaInfo), DriverError> {
    let Message::Hello { volume, token } = read_message(stream)? else {
        return Err(proto_err("expected Hello"));
    };
    let backend = resolve(&volume);
    let Some(backend) = backend.as_deref() else {
        return refuse(
            stream,
            format!("volume {volume:?} is not replicated to this node"),
        );
    };
    let last = backend.replicas(&volume)?.pop();
    if let Some(held) = last.as_ref().filter(|r| r.token > token) {
        return refuse(
            stream,
            format!(
                "fencing token {token} is older than {} of the replica held: not the owner",
                held.token
            ),
        );
    }
    let mut latest = last.map(|r| r.seq);
    // Sent back after a move or failover: this node's own last sent snapshot is the common
    // point when it holds no newer replica.
    let own = backend.offer_own_snapshot(&volume, latest)?;
    if let Some(own) = own {
        info!(%volume, seq = own, "offering this node's own snapshot as the parent");
        latest = Some(own);
    }
    write_message(stream, &Message::Have { latest })?;
    let Message::Offer { point, parent } = read_message(stream)? else {
        return Err(proto_err("expected Offer"));
    };
    if point.token != token {
        return refuse(
            stream,
            "the offer's token differs from the greeting's".into(),
        );
    }
    let outcome = receive_point(backend, &volume, &point, parent, latest, stream);
    if let Err(e) = &outcome
        && own.is_some()
        && parent == own
        && lineage_differs(e)
    {
        // Same number, another lineage: without it the next transfer is a full one.
        warn!(%volume, error = %e, "own snapshot is not the sender's parent: dropped");
        for seq in backend.source_snapshots(&volume)? {
            backend.delete_snapshot(&volume, seq)?;
        }
    }
    match outcome {
        Ok(kept) => {
            write_message(
                stream,
                &Message::Done {
                    seq: point.seq,
                    kept: kept.clone(),
                },
            )?;
            info!(%volume, seq = point.seq, ?kept, "replica received");
            Ok((volume, point))
        }
        Err(e) => {
            let _ = write_message(
                stream,
                &Message::Failed {
                    error: e.to_string(),
                },
            );
            Err(e)
        }
    }
}

/// Whether `btrfs receive` failed because the parent (or a clone source) the stream names
/// is not here: the offered snapshot is not the sender's parent.
fn lineage_differs(e: &DriverError) -> bool {
    matches!(e, DriverError::Command { stderr, .. }
        if stderr.contains("cannot find parent subvolume")
            || stderr.contains("did not find source subvol"))
}

fn refuse<T>(stream: &mut dyn Write, error: String) -> Result<T, DriverError> {
    write_message(
        stream,
        &Message::Failed {
            error: error.clone(),
        },
    )?;
    Err(DriverError::Refused(error))
}

fn receive_point(
    backend: &dyn ReplicationBackend,
    volume: &str,
    point: &ReplicaInfo,
    parent: Option<u64>,
    latest: Option<u64>,
    stream: &mut dyn Read,
) -> Result<Option<String>, DriverError> {
    if parent.is_some() && parent != latest {
        return Err(proto_err(format!(
            "incremental from {parent:?} but the last replica here is {latest:?}"
        )));
    }
    if latest.is_some_and(|l| point.seq <= l) {
        return Err(proto_err(format!(
            "point {} is not newer than replica {latest:?}",
            point.seq
        )));
    }
    let kept = backend.retire_live_copy(volume, parent)?;
    let mut chunks = ChunkReader {
        inner: stream,
        left: 0,
        ended: false,
    };
    backend.receive(volume, point, &mut chunks)?;
    for old in backend.replicas(volume)? {
        if old.seq != point.seq {
            backend.delete_replica(volume, old.seq)?;
        }
    }
    // This node receives the volume now: its own snapshots from when it sent it are no
    // longer a parent of anything.
    for own in backend.source_snapshots(volume)? {
        if let Err(e) = backend.delete_snapshot(volume, own) {
            warn!(volume, seq = own, error = %e, "cannot delete an old own replication snapshot");
        }
    }
    Ok(kept)
}

fn check_name(what: &str, name: &str) -> Result<(), DriverError> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(DriverError::Refused(format!(
            "invalid {what} name {name:?}"
        )))
    }
}

fn tool_err(command: &str, status: &str, stderr: &[u8]) -> DriverError {
    DriverError::Command {
        command: command.to_string(),
        status: status.to_string(),
        stderr: String::from_utf8_lossy(stderr).trim().to_string(),
    }
}

/// The stream a tool run by [`pipe`] reads or writes.
enum Pipe<'a> {
    /// The tool's stdout is copied here.
    Out(&'a mut dyn Write),
    /// This is copied to the tool's stdin.
    In(&'a mut dyn Read),
}

/// Runs `argv` with its stdout or stdin joined to `pipe`.
fn pipe(argv: &[String], pipe: Pipe<'_>) -> Result<(), DriverError> {
    let line = argv.join(" ");
    let (stdin, stdout) = match pipe {
        Pipe::Out(_) => (Stdio::null(), Stdio::piped()),
        Pipe::In(_) => (Stdio::piped(), Stdio::null()),
    };
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(stdin)
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| DriverError::io(format!("spawn {line}"), e))?;
    let copied = match pipe {
        Pipe::Out(out) => child
            .stdout
            .take()
            .map_or(Ok(0), |mut stdout| io::copy(&mut stdout, out)),
        // The child's stdin is closed when `stdin` drops here: the tool sees the end.
        Pipe::In(input) => child
            .stdin
            .take()
            .map_or(Ok(0), |mut stdin| io::copy(input, &mut stdin)),
    };
    if copied.is_err() {
        let _ = child.kill();
    }
    let output = child
        .wait_with_output()
        .map_err(|e| DriverError::io(format!("wait {line}"), e))?;
    // The tool's own error first: a stream broken by the tool exiting says less.
    if !output.status.success() {
        return Err(tool_err(&line, &output.status.to_string(), &output.stderr));
    }
    copied
        .map(|_| ())
        .map_err(|e| DriverError::io(format!("{line}: stream"), e))
}

fn s(v: &str) -> String {
    v.to_string()
}

fn path_arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Replication of the volumes of one btrfs pool (the same pool path on both nodes):
/// snapshots in `<pool>/replication/<volume>/stead-repl-<seq>`, replicas received in
/// `<pool>/replicas/<volume>/stead-repl-<seq>` with the commit record
/// `<pool>/replicas/<volume>/stead-repl-<seq>.json`; promotion makes
/// `<pool>/images/<volume>` (where the volume driver keeps it).
#[derive(Debug, Clone)]
pub struct BtrfsReplication {
    pool: PathBuf,
    btrfs: String,
}

impl BtrfsReplication {
    /// Replication of the volumes of the btrfs pool at `pool`.
    pub fn new(pool: &Path) -> Self {
        Self {
            pool: pool.to_path_buf(),
            btrfs: s("btrfs"),
        }
    }

    fn volume_dir(&self, volume: &str) -> Result<PathBuf, DriverError> {
        check_name("volume", volume)?;
        Ok(self.pool.join("images").join(volume))
    }

    fn source_dir(&self, volume: &str) -> Result<PathBuf, DriverError> {
        check_name("volume", volume)?;
        Ok(self.pool.join(SOURCE_DIR).join(volume))
    }

    fn replica_dir(&self, volume: &str) -> Result<PathBuf, DriverError> {
        check_name("volume", volume)?;
        Ok(self.pool.join(REPLICA_DIR).join(volume))
    }

    fn record_path(dir: &Path, seq: u64) -> PathBuf {
        dir.join(format!("{}.json", snapshot_name(seq)))
    }

    fn read_record(path: &Path) -> Option<ReplicaInfo> {
        let text = std::fs::read(path).ok()?;
        serde_json::from_slice(&text).ok()
    }

    fn write_record(dir: &Path, point: &ReplicaInfo) -> Result<(), DriverError> {
        let body = serde_json::to_vec(point).map_err(|e| DriverError::Other(e.to_string()))?;
        fsutil::write_atomic(&Self::record_path(dir, point.seq), &body)
    }

    /// Subvolumes named `stead-repl-<seq>` in `dir`, ascending.
    fn listed(dir: &Path) -> Result<Vec<u64>, DriverError> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(DriverError::io(format!("list {}", dir.display()), e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| DriverError::io(format!("list {}", dir.display()), e))?;
            let name = entry.file_name();
            let Some(seq) = name.to_str().and_then(parse_snapshot_name) else {
                continue;
            };
            if btrfs::is_subvolume(&entry.path())? {
                out.push(seq);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Deletes received subvolumes without a commit record (left by a cut-short transfer).
    fn remove_partial(&self, dir: &Path) -> Result<(), DriverError> {
        for seq in Self::listed(dir)? {
            if !Self::record_path(dir, seq).exists() {
                warn!(seq, dir = %dir.display(), "removing a partial replica");
                btrfs::subvol_destroy(dir, &snapshot_name(seq))?;
            }
        }
        Ok(())
    }

    fn mkdirs(dir: &Path) -> Result<(), DriverError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| DriverError::io(format!("mkdir {}", dir.display()), e))
    }
}

impl ReplicationBackend for BtrfsReplication {
    fn source_snapshots(&self, volume: &str) -> Result<Vec<u64>, DriverError> {
        Self::listed(&self.source_dir(volume)?)
    }

    fn take_snapshot(&self, volume: &str, seq: u64) -> Result<(), DriverError> {
        let dir = self.source_dir(volume)?;
        Self::mkdirs(&dir)?;
        btrfs::snapshot(&self.volume_dir(volume)?, &dir, &snapshot_name(seq), true)
    }

    fn send(
        &self,
        volume: &str,
        seq: u64,
        parent: Option<u64>,
        out: &mut dyn Write,
    ) -> Result<(), DriverError> {
        let dir = self.source_dir(volume)?;
        let mut argv = vec![self.btrfs.clone(), s("send"), s("-q")];
        if let Some(p) = parent {
            argv.extend([s("-p"), path_arg(&dir.join(snapshot_name(p)))]);
        }
        argv.push(path_arg(&dir.join(snapshot_name(seq))));
        pipe(&argv, Pipe::Out(out))
    }

    fn delete_snapshot(&self, volume: &str, seq: u64) -> Result<(), DriverError> {
        btrfs::subvol_destroy(&self.source_dir(volume)?, &snapshot_name(seq))
    }

    fn replicas(&self, volume: &str) -> Result<Vec<ReplicaInfo>, DriverError> {
        let dir = self.replica_dir(volume)?;
        Ok(Self::listed(&dir)?
            .into_iter()
            .filter_map(|seq| Self::read_record(&Self::record_path(&dir, seq)))
            .collect())
    }

    fn receive(
        &self,
        volume: &str,
        point: &ReplicaInfo,
        input: &mut dyn Read,
    ) -> Result<(), DriverError> {
        let dir = self.replica_dir(volume)?;
        Self::mkdirs(&dir)?;
        self.remove_partial(&dir)?;
        let argv = vec![self.btrfs.clone(), s("receive"), s("-q"), path_arg(&dir)];
        let received = pipe(&argv, Pipe::In(input)).and_then(|()| {
            if btrfs::is_subvolume(&dir.join(snapshot_name(point.seq)))? {
                Ok(())
            } else {
                Err(proto_err(format!(
                    "the stream did not hold {}",
                    snapshot_name(point.seq)
                )))
            }
        });
        if let Err(e) = received {
            self.remove_partial(&dir)?;
            return Err(e);
        }
        Self::write_record(&dir, point)
    }

    fn delete_replica(&self, volume: &str, seq: u64) -> Result<(), DriverError> {
        let dir = self.replica_dir(volume)?;
        let record = Self::record_path(&dir, seq);
        // The record first: a replica without one is partial, never used.
        match std::fs::remove_file(&record) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(DriverError::io(format!("remove {}", record.display()), e)),
        }
        btrfs::subvol_destroy(&dir, &snapshot_name(seq))
    }

    fn promote(&self, volume: &str) -> Result<Promoted, DriverError> {
        let target = self.volume_dir(volume)?;
        if target.exists() {
            return Err(DriverError::Conflict(format!(
                "{} exists: the volume is live on this node",
                target.display()
            )));
        }
        let Some(point) = self.replicas(volume)?.pop() else {
            return Err(DriverError::NotReady(format!(
                "no complete replica of volume {volume} on this node"
            )));
        };
        let images = self.pool.join("images");
        Self::mkdirs(&images)?;
        let replica = self.replica_dir(volume)?.join(snapshot_name(point.seq));
        // The replica as this node's own replication snapshot: the parent of the first
        // incremental stream back to the previous owner. A read-only snapshot keeps the
        // replica's received UUID, which names the previous owner's snapshot in the stream.
        let source = self.source_dir(volume)?;
        if !btrfs::is_subvolume(&source.join(snapshot_name(point.seq)))? {
            Self::mkdirs(&source)?;
            btrfs::snapshot(&replica, &source, &snapshot_name(point.seq), true)?;
        }
        btrfs::snapshot(&replica, &images, volume, false)?;
        let window = Duration::from_secs(unix_now().saturating_sub(point.taken_at));
        info!(
            volume,
            seq = point.seq,
            window_s = window.as_secs(),
            "replica promoted"
        );
        Ok(Promoted { point, window })
    }

    fn offer_own_snapshot(
        &self,
        volume: &str,
        newer_than: Option<u64>,
    ) -> Result<Option<u64>, DriverError> {
        let Some(own) = self.source_snapshots(volume)?.pop() else {
            return Ok(None);
        };
        if newer_than.is_some_and(|r| r >= own) {
            return Ok(None);
        }
        let path = self.source_dir(volume)?.join(snapshot_name(own));
        if btrfs::mark_received_as_itself(&path)? {
            info!(
                volume,
                seq = own,
                "own snapshot marked with its received UUID"
            );
        }
        Ok(Some(own))
    }

    fn retire_live_copy(
        &self,
        volume: &str,
        parent: Option<u64>,
    ) -> Result<Option<String>, DriverError> {
        let live = self.volume_dir(volume)?;
        // The common point: this node's own snapshot `parent`, taken of its live copy.
        let common = match parent {
            Some(p) => {
                let snap = self.source_dir(volume)?.join(snapshot_name(p));
                if btrfs::is_subvolume(&snap)? {
                    Some(btrfs::subvol_info(&snap)?)
                } else {
                    None
                }
            }
            None => None,
        };
        if !btrfs::is_subvolume(&live)? {
            // The live copy may already be gone: the agent's converge deletes a volume no
            // longer placed here, keeping a safety snapshot first. A safety snapshot of the
            // same live copy made after the common point holds what the failover gave up:
            // reported as the kept copy (it is never deleted here).
            return self.safety_snapshot_since(volume, common.as_ref());
        }
        // First out of the live path and read-only (no byte of it is deleted yet), then
        // compared frozen: removed only when provably unchanged since the common point.
        let dir = fsutil::ensure_dir(&self.pool, &["snapshots", volume])?;
        let name = format!("{STALE_PREFIX}{}", unix_now());
        let kept = dir.join(&name);
        if kept.exists() {
            return Err(DriverError::Conflict(format!(
                "{} exists; not retiring the live copy of {volume}",
                kept.display()
            )));
        }
        std::fs::rename(&live, &kept).map_err(|e| {
            DriverError::io(format!("move {} to {}", live.display(), kept.display()), e)
        })?;
        fsutil::fsync_dir(&self.pool.join("images"))?;
        fsutil::fsync_dir(&dir)?;
        btrfs::set_readonly(&kept)?;
        btrfs::sync_fs(&kept)?;
        let info = btrfs::subvol_info(&kept)?;
        // The subvolume's ctransid moves on any change of its content; the common snapshot
        // keeps the ctransid of the live copy when it was taken.
        let unchanged =
            common.is_some_and(|c| c.parent_uuid == info.uuid && c.ctransid == info.ctransid);
        if unchanged {
            info!(
                volume,
                ?parent,
                "the live copy here is unchanged since the common point: removed"
            );
            btrfs::subvol_destroy(&dir, &name)?;
            remove_dir_if_empty(&dir);
            return Ok(None);
        }
        let kept = path_arg(&kept);
        warn!(
            volume,
            kept = %kept,
            "this node does not own the volume: its live copy here, not provably unchanged \
             since the last common point, is kept read-only and the volume becomes a replica"
        );
        Ok(Some(kept))
    }
}

impl BtrfsReplication {
    /// The newest safety snapshot (`pre-…`) of `volume` taken of the live copy the common
    /// snapshot `common` was taken of, after a change since it; `None` when there is none.
    /// Without a common snapshot nothing can be proven unchanged: the newest safety
    /// snapshot of the volume is the copy reported, as a live copy would be.
    fn safety_snapshot_since(
        &self,
        volume: &str,
        common: Option<&btrfs::SubvolInfo>,
    ) -> Result<Option<String>, DriverError> {
        let dir = self.pool.join("snapshots").join(volume);
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(DriverError::io(format!("list {}", dir.display()), e)),
        };
        let mut found: Option<(u64, PathBuf)> = None;
        for entry in rd {
            let entry = entry.map_err(|e| DriverError::io(format!("list {}", dir.display()), e))?;
            let is_safety = entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(crate::storage::SAFETY_PREFIX));
            let path = entry.path();
            if !is_safety || !btrfs::is_subvolume(&path)? {
                continue;
            }
            let s = btrfs::subvol_info(&path)?;
            let since_common =
                common.is_none_or(|c| s.parent_uuid == c.parent_uuid && s.ctransid > c.ctransid);
            if since_common && found.as_ref().is_none_or(|(t, _)| s.ctransid > *t) {
                found = Some((s.ctransid, path));
            }
        }
        Ok(found.map(|(_, path)| {
            let kept = path_arg(&path);
            if common.is_some() {
                warn!(
                    volume,
                    kept = %kept,
                    "this node's live copy was deleted after it changed since the last \
                     common point: its safety snapshot keeps what the failover gave up"
                );
            } else {
                warn!(
                    volume,
                    kept = %kept,
                    "this node's live copy was deleted and there is no common point to prove \
                     it unchanged: its newest safety snapshot is kept as the stale copy"
                );
            }
            kept
        }))
    }
}

/// Removes `dir` when it is empty (best effort).
fn remove_dir_if_empty(dir: &Path) {
    let _ = std::fs::remove_dir(dir);
}

/// Name prefix of the read-only snapshot keeping a stale live copy of a volume
/// (`<pool>/snapshots/<volume>/stale-<unix time>`, listed by `stead snapshot list`).
pub const STALE_PREFIX: &str = "stale-";

/// Replication of the zvols of one ZFS dataset (the same dataset name on both nodes):
/// snapshots `<dataset>/<volume>@stead-repl-<seq>`, replicas received as
/// `<dataset>/stead-replicas/<volume>@stead-repl-<seq>` (`zfs receive` is atomic: a cut-short
/// stream leaves the previous snapshot), promotion clones the last one as
/// `<dataset>/<volume>`. The snapshot's `creation` travels with the stream and gives the
/// replica's point in time.
#[derive(Debug, Clone)]
pub struct ZfsReplication {
    dataset: String,
}

impl ZfsReplication {
    /// Replication of the zvols under `dataset`.
    pub fn new(dataset: &str) -> Self {
        Self {
            dataset: dataset.to_string(),
        }
    }

    fn source(&self, volume: &str) -> Result<String, DriverError> {
        check_name("volume", volume)?;
        Ok(format!("{}/{volume}", self.dataset))
    }

    fn replica(&self, volume: &str) -> Result<String, DriverError> {
        check_name("volume", volume)?;
        Ok(format!("{}/stead-replicas/{volume}", self.dataset))
    }

    /// `(seq, creation)` of the replication snapshots of `dataset`, ascending.
    fn snapshots_of(dataset: &str) -> Result<Vec<(u64, u64)>, DriverError> {
        let argv = [
            "zfs",
            "list",
            "-Hp",
            "-t",
            "snapshot",
            "-o",
            "name,creation",
            "-d",
            "1",
            "--",
        ]
        .map(s);
        let mut argv = argv.to_vec();
        argv.push(dataset.to_string());
        let Some(out) = super::zfs::run_if_exists(&argv)? else {
            return Ok(Vec::new());
        };
        Ok(parse_zfs_snapshots(&out))
    }
}

/// `zfs destroy` of replication snapshot `seq` of `dataset` (absent is success).
fn destroy_snapshot(dataset: &str, seq: u64) -> Result<(), DriverError> {
    let snap = format!("{dataset}@{}", snapshot_name(seq));
    match super::zfs::run(&[s("zfs"), s("destroy"), s("--"), snap]) {
        Err(DriverError::Command { stderr, .. }) if stderr.contains("could not find") => Ok(()),
        other => other.map(|_| ()),
    }
}

/// Parses `zfs list -Hp -o name,creation` of snapshots into `(seq, creation)`, ascending.
pub fn parse_zfs_snapshots(out: &str) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = out
        .lines()
        .filter_map(|l| {
            let (name, creation) = l.split_once('\t')?;
            let seq = parse_snapshot_name(name.rsplit_once('@')?.1)?;
            Some((seq, creation.trim().parse().ok()?))
        })
        .collect();
    v.sort_unstable();
    v
}

impl ReplicationBackend for ZfsReplication {
    fn source_snapshots(&self, volume: &str) -> Result<Vec<u64>, DriverError> {
        Ok(Self::snapshots_of(&self.source(volume)?)?
            .into_iter()
            .map(|(seq, _)| seq)
            .collect())
    }

    fn take_snapshot(&self, volume: &str, seq: u64) -> Result<(), DriverError> {
        let snap = format!("{}@{}", self.source(volume)?, snapshot_name(seq));
        super::zfs::run(&[s("zfs"), s("snapshot"), s("--"), snap]).map(|_| ())
    }

    fn send(
        &self,
        volume: &str,
        seq: u64,
        parent: Option<u64>,
        out: &mut dyn Write,
    ) -> Result<(), DriverError> {
        let source = self.source(volume)?;
        let mut argv = vec![s("zfs"), s("send")];
        if let Some(p) = parent {
            argv.extend([s("-i"), format!("@{}", snapshot_name(p))]);
        }
        argv.extend([s("--"), format!("{source}@{}", snapshot_name(seq))]);
        super::check_operands(&argv)?;
        pipe(&argv, Pipe::Out(out))
    }

    fn delete_snapshot(&self, volume: &str, seq: u64) -> Result<(), DriverError> {
        destroy_snapshot(&self.source(volume)?, seq)
    }

    fn replicas(&self, volume: &str) -> Result<Vec<ReplicaInfo>, DriverError> {
        Ok(Self::snapshots_of(&self.replica(volume)?)?
            .into_iter()
            .map(|(seq, taken_at)| ReplicaInfo {
                seq,
                taken_at,
                token: 0,
            })
            .collect())
    }

    fn receive(
        &self,
        volume: &str,
        point: &ReplicaInfo,
        input: &mut dyn Read,
    ) -> Result<(), DriverError> {
        let target = format!("{}@{}", self.replica(volume)?, snapshot_name(point.seq));
        let parent = format!("{}/stead-replicas", self.dataset);
        super::zfs::run(&[s("zfs"), s("create"), s("-p"), s("--"), parent])?;
        let argv = vec![s("zfs"), s("receive"), s("-u"), s("-F"), s("--"), target];
        super::check_operands(&argv)?;
        pipe(&argv, Pipe::In(input))
    }

    fn delete_replica(&self, volume: &str, seq: u64) -> Result<(), DriverError> {
        destroy_snapshot(&self.replica(volume)?, seq)
    }

    fn promote(&self, volume: &str) -> Result<Promoted, DriverError> {
        let target = self.source(volume)?;
        // The zvol itself, not its snapshots: a live zvol without any is live all the same.
        if super::zfs::exists(&target)? {
            return Err(DriverError::Conflict(format!(
                "{target} exists: the volume is live on this node"
            )));
        }
        let Some(point) = self.replicas(volume)?.pop() else {
            return Err(DriverError::NotReady(format!(
                "no complete replica of volume {volume} on this node"
            )));
        };
        let snap = format!("{}@{}", self.replica(volume)?, snapshot_name(point.seq));
        super::zfs::run(&[s("zfs"), s("clone"), s("--"), snap, target])?;
        let window = Duration::from_secs(unix_now().saturating_sub(point.taken_at));
        Ok(Promoted { point, window })
    }

    fn retire_live_copy(
        &self,
        volume: &str,
        _parent: Option<u64>,
    ) -> Result<Option<String>, DriverError> {
        let live = self.source(volume)?;
        if !super::zfs::exists(&live)? {
            return Ok(None);
        }
        // Nothing proves a zvol unchanged since a common point here (no own snapshot is
        // offered back on zfs), so it is always kept, whole, out of the live path: a
        // failover back to this node then promotes the replica instead of running on it.
        let (kept, cmds) = self.cmds_retire(volume, unix_now())?;
        for argv in &cmds {
            super::zfs::run(argv)?;
        }
        warn!(
            volume,
            kept = %kept,
            "this node does not own the volume: its live zvol here is kept read-only out of \
             the live path and the volume becomes a replica"
        );
        Ok(Some(kept))
    }
}

/// Where a stale live zvol goes when its node receives the volume as a replica:
/// `<dataset>/stead-stale/<volume>-<unix seconds>`.
pub const ZFS_STALE_PARENT: &str = "stead-stale";

impl ZfsReplication {
    /// The commands that move the live zvol of `volume` out of the live path, read-only and
    /// without its owner property (so no volume driver takes it for its own), and where.
    fn cmds_retire(
        &self,
        volume: &str,
        now: u64,
    ) -> Result<(String, Vec<Vec<String>>), DriverError> {
        let live = self.source(volume)?;
        let parent = format!("{}/{ZFS_STALE_PARENT}", self.dataset);
        let kept = format!("{parent}/{volume}-{now}");
        let mut cmds = super::zfs::cmds_move_aside(&live, &parent, &kept);
        // Read-only as soon as it is out of the live path, before its owner property goes.
        let readonly = vec![s("zfs"), s("set"), s("--"), s("readonly=on"), kept.clone()];
        cmds.insert(2, readonly);
        Ok((kept, cmds))
    }
}

/// The replication backend of a pool, if its type supports replication (btrfs, zfs).
pub fn backend_for(pool: &stead_schema::StoragePoolSpec) -> Option<Box<dyn ReplicationBackend>> {
    match pool.pool_type {
        stead_schema::PoolType::Btrfs => Some(Box::new(BtrfsReplication::new(&pool.path))),
        stead_schema::PoolType::Zfs => pool
            .zfs
            .as_ref()
            .map(|z| Box::new(ZfsReplication::new(&z.dataset)) as Box<dyn ReplicationBackend>),
        _ => None,
    }
}

/// At failover, before the volume driver runs: promotes the last replica of `volume` when
/// the volume is absent here and a replica exists. `None`: nothing to promote (the volume
/// is live here, or there is no replica and the volume driver creates it empty).
pub fn promote_if_absent(
    backend: &dyn ReplicationBackend,
    volume: &str,
) -> Result<Option<Promoted>, DriverError> {
    if backend.replicas(volume)?.is_empty() {
        return Ok(None);
    }
    match backend.promote(volume) {
        Ok(p) => Ok(Some(p)),
        Err(DriverError::Conflict(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_names_round_trip() {
        assert_eq!(snapshot_name(7), "stead-repl-7");
        assert_eq!(parse_snapshot_name("stead-repl-7"), Some(7));
        assert_eq!(parse_snapshot_name("stead-repl-"), None);
        assert_eq!(parse_snapshot_name("stead-repl-7.json"), None);
        assert_eq!(parse_snapshot_name("other-7"), None);
    }

    #[test]
    fn plan_is_incremental_only_from_a_common_point() {
        assert_eq!(plan(&[], None), (1, None));
        assert_eq!(plan(&[3], Some(3)), (4, Some(3)));
        // The peer lost its replica: a full send.
        assert_eq!(plan(&[3], None), (4, None));
        // This side lost the peer's point: a full send, numbered past both.
        assert_eq!(plan(&[2], Some(5)), (6, None));
    }

    #[test]
    fn chunks_round_trip_and_a_cut_stream_fails() {
        let mut wire = Vec::new();
        let mut w = ChunkWriter {
            inner: &mut wire,
            bytes: 0,
        };
        w.write_all(b"hello ").expect("write");
        w.write_all(b"world").expect("write");
        assert_eq!(w.finish(0).expect("finish"), 11);
        let mut out = Vec::new();
        let mut src: &[u8] = &wire;
        let mut r = ChunkReader {
            inner: &mut src,
            left: 0,
            ended: false,
        };
        r.read_to_end(&mut out).expect("read");
        assert_eq!(out, b"hello world");

        let mut cut: &[u8] = &wire[..wire.len() - 4];
        let mut r = ChunkReader {
            inner: &mut cut,
            left: 0,
            ended: false,
        };
        assert!(r.read_to_end(&mut Vec::new()).is_err());

        let mut aborted = wire[..wire.len() - 4].to_vec();
        aborted.extend(ABORT.to_be_bytes());
        let mut src: &[u8] = &aborted;
        let mut r = ChunkReader {
            inner: &mut src,
            left: 0,
            ended: false,
        };
        assert!(r.read_to_end(&mut Vec::new()).is_err());
    }

    #[test]
    fn messages_are_single_lines() {
        let mut wire = Vec::new();
        let m = Message::Offer {
            point: ReplicaInfo {
                seq: 2,
                taken_at: 10,
                token: 4,
            },
            parent: Some(1),
        };
        write_message(&mut wire, &m).expect("write");
        wire.extend(b"rest");
        let mut src: &[u8] = &wire;
        assert_eq!(read_message(&mut src).expect("read"), m);
        assert_eq!(src, b"rest");
    }

    #[test]
    fn a_stale_zvol_is_moved_out_of_the_live_path_never_destroyed() {
        let z = ZfsReplication::new("tank/vms");
        let (kept, cmds) = z.cmds_retire("web", 42).expect("commands");
        assert_eq!(kept, "tank/vms/stead-stale/web-42");
        let joined: Vec<String> = cmds.iter().map(|c| c.join(" ")).collect();
        assert_eq!(
            joined,
            [
                "zfs create -p -- tank/vms/stead-stale",
                "zfs rename -- tank/vms/web tank/vms/stead-stale/web-42",
                "zfs set -- readonly=on tank/vms/stead-stale/web-42",
                "zfs inherit -- stead:owner tank/vms/stead-stale/web-42",
            ]
        );
        assert!(
            z.cmds_retire("../x", 1).is_err(),
            "names stay inside the dataset"
        );
    }

    #[test]
    fn zfs_listing_is_parsed() {
        let out = "tank/v/vm1@stead-repl-3\t1700000300\ntank/v/vm1@other\t1\ntank/v/vm1@stead-repl-2\t1700000200\n";
        assert_eq!(
            parse_zfs_snapshots(out),
            vec![(2, 1_700_000_200), (3, 1_700_000_300)]
        );
    }

    #[test]
    fn volume_names_cannot_escape_the_pool() {
        let b = BtrfsReplication::new(Path::new("/nonexistent"));
        assert!(b.replica_dir("../x").is_err());
        assert!(b.replica_dir(".hidden").is_err());
        assert!(b.replica_dir("vm1").is_ok());
    }
}
