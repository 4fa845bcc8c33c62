//! The backup store: a content-addressed chunk store plus one JSON manifest per backup, inside
//! a pool's `backups/` directory. See `docs/backup-format.md` for the on-disk format.
//!
//! Backups stream: files are read sequentially, cut into content-defined chunks (FastCDC), and
//! the chunks are hashed, deduplicated and compressed on a small thread pool. Memory stays
//! bounded by the read buffer plus the bounded chunk queue, whatever the input size.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, channel, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::{DateTime, SecondsFormat, Utc};
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use stead_host::progress::{NoProgress, Progress};
use stead_schema::kinds::Retention;
use tracing::{debug, info, info_span, warn};

use super::BackupError;
use super::retention::{self, Mark};

/// Minimum chunk size (FastCDC).
pub const CHUNK_MIN: usize = 256 * 1024;
/// Average chunk size (FastCDC).
pub const CHUNK_AVG: usize = 1024 * 1024;
/// Maximum chunk size (FastCDC).
pub const CHUNK_MAX: usize = 4 * 1024 * 1024;
/// Read buffer: several maximum chunks, so the remainder moved per refill stays small.
const READ_BUF: usize = 4 * CHUNK_MAX;
/// Manifest format tag.
pub const FORMAT: &str = "stead-backup/1";
/// Default zstd level for chunks (the level Proxmox Backup Server uses for its chunks).
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;
const CHUNK_DIR: &str = ".chunks";
/// Default of [`BackupOptions::racy_secs`].
pub const RACY_SECS: i64 = 2;
const LOCK_FILE: &str = ".lock";
const TIME_FMT: &str = "%Y-%m-%dT%H:%M:%SZ";

/// Options of one backup run.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// Backup time (default: now). Second precision; bumped by a second if taken.
    pub time: Option<DateTime<Utc>>,
    /// Compress chunks with zstd at this level; `None` stores chunks uncompressed.
    pub zstd_level: Option<i32>,
    /// Worker threads hashing and compressing chunks (default: available cores).
    pub threads: Option<usize>,
    /// Progress to advance by bytes read (none shown by default).
    pub progress: Arc<dyn Progress>,
    /// Read every file even when the previous backup of the resource recorded the same
    /// change stamp (see [`Stamp`]); `false` reuses those files' chunk lists.
    pub reread: bool,
    /// Input name → metadata to record for that (file) input instead of the read path's:
    /// set when the path read is a point-in-time clone of the input (a consistency
    /// snapshot), with the original's metadata taken at the moment of the clone.
    pub stat_of: HashMap<String, fs::Metadata>,
    /// Input name → the path it stands for, when the path read is a clone of it (recorded
    /// as the input's `source`).
    pub origins: HashMap<String, PathBuf>,
    /// Files whose ctime is less than this many seconds before the backup starts are
    /// recorded without a stamp (read again next time). Default 2; tests use 0.
    pub racy_secs: i64,
    /// How consistency was obtained (recorded in the manifest).
    pub consistency: Option<String>,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            time: None,
            zstd_level: Some(DEFAULT_ZSTD_LEVEL),
            threads: None,
            progress: Arc::new(NoProgress),
            reread: false,
            stat_of: HashMap::new(),
            origins: HashMap::new(),
            racy_secs: RACY_SECS,
            consistency: None,
        }
    }
}

/// FastCDC parameters recorded in every manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Chunking {
    /// Always `fastcdc-v2020`.
    pub algorithm: String,
    /// Minimum chunk size.
    pub min: usize,
    /// Average chunk size.
    pub avg: usize,
    /// Maximum chunk size.
    pub max: usize,
}

/// One input of a backup (a volume file or a directory tree).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InputEntry {
    /// Logical name, e.g. `disk0` or `rootfs`.
    pub name: String,
    /// `file` or `dir`.
    #[serde(rename = "type")]
    pub kind: EntryKind,
    /// Where it was read from.
    pub source: String,
}

/// Type of a file-system entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Character device.
    Char,
    /// Block device.
    Block,
    /// Named pipe.
    Fifo,
}

/// A reference to one chunk of a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChunkRef {
    /// sha256 (hex) of the plaintext; absent for zero chunks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Plaintext length.
    pub size: u64,
    /// All bytes are zero: nothing stored, restored as a hole.
    #[serde(default, skip_serializing_if = "is_false")]
    pub zero: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// One file-system entry of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileEntry {
    /// The input it belongs to.
    pub input: String,
    /// Path relative to the input (`""` is the input itself).
    pub path: String,
    /// Entry type.
    #[serde(rename = "type")]
    pub kind: EntryKind,
    /// Permission and mode bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Nanoseconds part of the modification time.
    pub mtime_nsec: u32,
    /// Length of the content (regular files).
    pub size: u64,
    /// sha256 (hex) of the whole content (regular files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Link target (symlinks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Device number (char/block devices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdev: Option<u64>,
    /// Content, in order (regular files).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<ChunkRef>,
    /// Change stamp of the source (regular files, not block devices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stamp: Option<Stamp>,
    /// A hard link to this earlier entry (path in the same input): no content of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// Extended attributes (name → hex value), see [`super::xattrs`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
    /// A disk image cut into fixed blocks of this size (one chunk per block, the last one
    /// shorter) instead of content-defined chunks, so an incremental backup can take over
    /// the previous backup's chunks of clean blocks (see [`super::blocks`]). Such an entry
    /// may lack the whole-file `sha256`: its chunk digests alone check it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u64>,
}

/// What tells that a file is unchanged since the previous backup, together with its size
/// and mtime (as restic and borg do): the inode number and the ctime. The ctime cannot be
/// set from user space and moves on every write and metadata change, so a file whose
/// size, mtime, inode and ctime are all the same has not been written since.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stamp {
    /// Inode number.
    pub ino: u64,
    /// Status change time, seconds.
    pub ctime: i64,
    /// Nanoseconds part of the ctime.
    pub ctime_nsec: u32,
}

impl Stamp {
    fn of(md: &fs::Metadata) -> Self {
        Stamp {
            ino: md.ino(),
            ctime: md.ctime(),
            ctime_nsec: md.ctime_nsec().clamp(0, 999_999_999) as u32,
        }
    }
}

/// Counters of one backup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    /// Bytes of file content backed up (read, or reused unchanged from the previous backup).
    pub bytes: u64,
    /// Of `bytes`, those of files that were not read because the previous backup of the
    /// resource recorded the same change stamp.
    #[serde(default)]
    pub reused_bytes: u64,
    /// Bytes in all-zero chunks (not stored).
    pub zero_bytes: u64,
    /// Chunks referenced (non-zero).
    pub chunks: u64,
    /// Chunks that were new to the store.
    pub new_chunks: u64,
    /// Plaintext bytes of new chunks.
    pub new_bytes: u64,
    /// Bytes written to the chunk store (compressed new chunks).
    pub stored_bytes: u64,
    /// Wall time of the backup in milliseconds.
    pub duration_ms: u64,
    /// Bytes read from the sources, when that differs from `bytes - reused_bytes` (disk
    /// images backed up block-wise: only allocated and dirty blocks are read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_bytes: Option<u64>,
}

/// A backup manifest (`<store>/<Kind>/<name>/<time>.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// `Kind/name/time`.
    pub id: String,
    /// `Kind/name` of the backed-up resource.
    pub resource: String,
    /// Backup time, RFC 3339 UTC.
    pub time: String,
    /// Version of stead that wrote it.
    pub stead_version: String,
    /// The resource spec as applied.
    pub spec: serde_json::Value,
    /// Chunker parameters.
    pub chunking: Chunking,
    /// `zstd` or `none`.
    pub compression: String,
    /// The inputs.
    pub inputs: Vec<InputEntry>,
    /// How the data was made consistent: `live`, `stopped`, `frozen 3 ms (reflink clones)`…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<String>,
    /// All entries of all inputs.
    pub files: Vec<FileEntry>,
    /// Counters.
    pub stats: Stats,
}

/// Summary of one stored backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupInfo {
    /// `Kind/name/time`.
    pub id: String,
    /// `Kind/name`.
    pub resource: String,
    /// Backup time.
    #[serde(serialize_with = "ser_time")]
    pub time: DateTime<Utc>,
    /// Manifest file.
    pub manifest: PathBuf,
    /// Input names.
    pub inputs: Vec<String>,
    /// Counters recorded at backup time.
    pub stats: Stats,
    /// How the data was made consistent (see [`Manifest::consistency`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consistency: Option<String>,
}

/// What is wrong with a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ProblemKind {
    /// The chunk file is absent.
    MissingChunk,
    /// The chunk decompresses but its sha256 does not match.
    CorruptChunk,
    /// The chunk cannot be read or decompressed.
    UnreadableChunk(String),
    /// All chunks are fine but the whole-file sha256 differs.
    FileDigestMismatch,
}

/// One problem found by [`BackupStore::verify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    /// Input name.
    pub input: String,
    /// Path inside the input (`""` for the input itself).
    pub path: String,
    /// Index of the chunk in the file.
    pub chunk_index: Option<usize>,
    /// Offset of that chunk in the file.
    pub offset: Option<u64>,
    /// Digest of that chunk.
    pub digest: Option<String>,
    /// What is wrong.
    pub kind: ProblemKind,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = if self.path.is_empty() {
            self.input.clone()
        } else {
            format!("{}:{}", self.input, self.path)
        };
        write!(f, "{file}")?;
        if let (Some(i), Some(off)) = (self.chunk_index, self.offset) {
            write!(f, ": chunk {i} at offset {off}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, " ({d})")?;
        }
        match &self.kind {
            ProblemKind::MissingChunk => write!(f, " is missing"),
            ProblemKind::CorruptChunk => write!(f, " is corrupt (sha256 mismatch)"),
            ProblemKind::UnreadableChunk(e) => write!(f, " is unreadable: {e}"),
            ProblemKind::FileDigestMismatch => write!(f, ": file sha256 mismatch"),
        }
    }
}

/// Result of [`BackupStore::verify`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyReport {
    /// Backup id.
    pub id: String,
    /// Regular files checked.
    pub files: u64,
    /// Chunk references checked.
    pub chunks: u64,
    /// Plaintext bytes checked.
    pub bytes: u64,
    /// Problems found (empty = the backup is intact).
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    /// No problem found.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Result of a garbage collection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GcReport {
    /// Chunks referenced by at least one manifest.
    pub referenced: u64,
    /// Chunk files kept.
    pub kept: u64,
    /// Chunk files removed.
    pub removed: u64,
    /// Bytes removed.
    pub removed_bytes: u64,
    /// Stale temporary files removed.
    pub temp_removed: u64,
}

/// Result of a prune.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PruneReport {
    /// Every backup considered with its decision (`keep-…` rule or `remove`), newest first
    /// per resource.
    pub decisions: Vec<(String, String)>,
    /// Manifests removed.
    pub removed: Vec<String>,
    /// The garbage collection that followed (none in dry runs).
    pub gc: Option<GcReport>,
}

/// Result of a restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreReport {
    /// Backup id.
    pub id: String,
    /// Input name → where it was restored.
    pub restored: Vec<(String, PathBuf)>,
    /// Content bytes written.
    pub bytes: u64,
}

/// A backup store at `<pool>/backups`.
#[derive(Debug, Clone)]
pub struct BackupStore {
    root: PathBuf,
}

/// Parsed backup id.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BackupId {
    kind: String,
    name: String,
    time: DateTime<Utc>,
}

impl BackupId {
    fn parse(s: &str) -> Result<Self, BackupError> {
        let bad = || {
            BackupError::Invalid(format!(
                "invalid backup id {s:?}: expected Kind/name/YYYY-MM-DDTHH:MM:SSZ"
            ))
        };
        let mut it = s.splitn(3, '/');
        let (Some(kind), Some(name), Some(t)) = (it.next(), it.next(), it.next()) else {
            return Err(bad());
        };
        validate_resource(&format!("{kind}/{name}"))?;
        let time = DateTime::parse_from_rfc3339(t)
            .map_err(|_| bad())?
            .with_timezone(&Utc);
        Ok(BackupId {
            kind: kind.into(),
            name: name.into(),
            time,
        })
    }

    fn to_id(&self) -> String {
        format!("{}/{}/{}", self.kind, self.name, self.time.format(TIME_FMT))
    }
}

/// Checks `Kind/name`: a kind of ASCII letters and a name of `[a-z0-9-]`, so both are safe
/// path components.
pub(super) fn validate_resource(r: &str) -> Result<(&str, &str), BackupError> {
    let bad = || BackupError::Invalid(format!("invalid resource {r:?}: expected Kind/name"));
    let (k, n) = r.split_once('/').ok_or_else(bad)?;
    let k_ok = !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphabetic());
    let n_ok = !n.is_empty()
        && n.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.' || b == b'_'
        })
        && !n.starts_with('.');
    if k_ok && n_ok { Ok((k, n)) } else { Err(bad()) }
}

pub(super) fn validate_input_name(n: &str) -> Result<(), BackupError> {
    let ok = !n.is_empty()
        && !n.starts_with('.')
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(BackupError::Invalid(format!(
            "invalid input name {n:?}: use [A-Za-z0-9._-], not starting with a dot"
        )))
    }
}

fn hex32(d: &[u8]) -> String {
    hex::encode(d)
}

pub(super) fn is_zero(data: &[u8]) -> bool {
    data.chunks(4096)
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

/// The chunk of one read, handed to the workers.
/// What the whole-file hasher thread is fed, in file order.
enum Feed {
    Data(Arc<Vec<u8>>),
    Zeros(u64),
    End(usize),
}

pub(super) struct Job {
    pub(super) file: usize,
    pub(super) index: usize,
    pub(super) data: Arc<Vec<u8>>,
    /// Non-zero: an all-zero chunk of this length (`data` is empty).
    pub(super) zero_len: usize,
}

/// Zero runs are detected in blocks of this size, aligned to the file offset.
const ZERO_BLOCK: usize = 4096;
/// A zero run at least this long is cut out as its own (free) zero chunk.
const ZERO_RUN: usize = 64 * 1024;

/// Number of leading all-zero whole blocks of `b`, in bytes.
fn zero_prefix(b: &[u8]) -> usize {
    b.chunks_exact(ZERO_BLOCK)
        .take_while(|c| is_zero(c))
        .count()
        * ZERO_BLOCK
}

/// The end of the chunk starting at `buf[start]` (file offset `pos`) and whether it is an
/// all-zero chunk. Zero runs of at least [`ZERO_RUN`] bytes (block-aligned in the file) become
/// their own chunks, so sparse regions cost nothing and do not glue onto data chunks; the rest
/// is cut by FastCDC. `buf` always holds at least `CHUNK_MAX + ZERO_RUN` bytes after `start`
/// unless `eof`, which keeps the cut points a function of the content alone.
fn next_cut(
    cdc: &fastcdc::v2020::FastCDC<'_>,
    buf: &[u8],
    start: usize,
    pos: u64,
    eof: bool,
) -> (usize, bool) {
    let len = buf.len();
    let window = &buf[start..len.min(start + CHUNK_MAX)];
    if pos.is_multiple_of(ZERO_BLOCK as u64) {
        let z = zero_prefix(window);
        if z >= ZERO_RUN {
            return (start + z, true);
        }
        if eof && is_zero(&buf[start..]) && len.min(start + CHUNK_MAX) == len {
            return (len, true);
        }
    }
    let (_, mut end) = cdc.cut(start, len - start);
    let mis = (pos % ZERO_BLOCK as u64) as usize;
    let mut q = start
        + if mis == 0 {
            ZERO_BLOCK
        } else {
            ZERO_BLOCK - mis
        };
    while q < end {
        if zero_prefix(&buf[q..len.min(q + ZERO_RUN)]) >= ZERO_RUN {
            end = q;
            break;
        }
        q += ZERO_BLOCK;
    }
    (end, false)
}

pub(super) struct Done {
    pub(super) file: usize,
    pub(super) index: usize,
    pub(super) chunk: ChunkRef,
    pub(super) new: bool,
    pub(super) stored: u64,
}

/// The metadata of a backup's inputs, before their contents are read.
struct Scan {
    /// One entry per input.
    inputs: Vec<InputEntry>,
    /// Every file, directory and link of every input, in order.
    files: Vec<FileEntry>,
    /// Per entry of `files`: the path to read its contents from (regular files only).
    sources: Vec<Option<PathBuf>>,
}

/// Refuses bad input names and a name given twice.
fn check_input_names(inputs: &[(String, PathBuf)]) -> Result<(), BackupError> {
    let mut seen = HashSet::new();
    for (n, _) in inputs {
        validate_input_name(n)?;
        if !seen.insert(n.as_str()) {
            return Err(BackupError::Invalid(format!(
                "input name {n:?} given twice"
            )));
        }
    }
    Ok(())
}

/// Walks every input and records its entries' metadata.
fn scan_inputs(inputs: &[(String, PathBuf)], opts: &BackupOptions) -> Result<Scan, BackupError> {
    let mut scan = Scan {
        inputs: Vec::new(),
        files: Vec::new(),
        sources: Vec::new(),
    };
    for (n, p) in inputs {
        let md = fs::metadata(p).map_err(BackupError::io("stat", p))?;
        scan.inputs.push(InputEntry {
            name: n.clone(),
            kind: input_kind(n, p, &md)?,
            source: opts.origins.get(n).unwrap_or(p).display().to_string(),
        });
        let first = scan.files.len();
        let mut ctx = WalkCtx {
            input: n,
            dev: md.dev(),
            links: HashMap::new(),
        };
        walk(&mut ctx, p, "", &mut scan.files, &mut scan.sources)?;
        if let Some(orig) = opts.stat_of.get(n)
            && let Some(top) = scan.files.get_mut(first)
            && top.kind == EntryKind::File
        {
            record_original(top, orig);
        }
    }
    Ok(scan)
}

/// A directory input is a tree; a regular file or a block device is one file.
fn input_kind(name: &str, path: &Path, md: &fs::Metadata) -> Result<EntryKind, BackupError> {
    if md.is_dir() {
        Ok(EntryKind::Dir)
    } else if md.is_file() || md.file_type().is_block_device() {
        Ok(EntryKind::File)
    } else {
        Err(BackupError::Invalid(format!(
            "input {name}: {} is neither a regular file, a block device nor a directory",
            path.display()
        )))
    }
}

/// The file read is a clone taken at the moment `orig` was: record the original's metadata.
fn record_original(top: &mut FileEntry, orig: &fs::Metadata) {
    top.mode = orig.permissions().mode() & 0o7777;
    top.uid = orig.uid();
    top.gid = orig.gid();
    top.mtime = orig.mtime();
    top.mtime_nsec = orig.mtime_nsec().clamp(0, 999_999_999) as u32;
    top.stamp = (orig.len() == top.size).then(|| Stamp::of(orig));
}

/// "Racy" stamps: a file changed in the last `racy_secs` before `now` may change again
/// within the same coarse ctime tick after it was read, unseen by the stamp. Such files get
/// no stamp and are read again next time (git's racy-clean rule).
fn clear_racy_stamps(files: &mut [FileEntry], now: DateTime<Utc>, racy_secs: i64) {
    let racy_from = i128::from(now.timestamp()) * 1_000_000_000
        + i128::from(now.timestamp_subsec_nanos())
        - i128::from(racy_secs) * 1_000_000_000;
    for f in files.iter_mut() {
        if f.stamp.is_some_and(|st| {
            i128::from(st.ctime) * 1_000_000_000 + i128::from(st.ctime_nsec) >= racy_from
        }) {
            f.stamp = None;
        }
    }
}

/// Bytes of content to back up: regular files, each hard-linked file once.
fn content_bytes(files: &[FileEntry]) -> u64 {
    files
        .iter()
        .filter(|f| f.kind == EntryKind::File && f.link.is_none())
        .map(|f| f.size)
        .sum()
}

/// Chunk workers: `threads` or all cores, between 1 and 16.
pub(super) fn worker_count(threads: Option<usize>) -> usize {
    threads
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        })
        .clamp(1, 16)
}

/// Counts the chunks of the files that were not read (their chunk lists were reused).
/// The next job of a worker pool sharing one receiver; `None` once the sender is gone (or
/// the lock is poisoned): the worker then returns.
fn next_job<T>(rx: &Mutex<Receiver<T>>) -> Option<T> {
    rx.lock().ok()?.recv().ok()
}

fn count_reused_chunks(files: &[FileEntry], sources: &[Option<PathBuf>], stats: &mut Stats) {
    for (f, src) in files.iter().zip(sources) {
        if src.is_none() && f.kind == EntryKind::File && f.link.is_none() {
            for c in &f.chunks {
                if c.zero {
                    stats.zero_bytes += c.size;
                } else {
                    stats.chunks += 1;
                }
            }
        }
    }
}

/// Puts a chunk a worker stored at its place in its file's chunk list, and counts it.
pub(super) fn place_done_chunk(files: &mut [FileEntry], d: Done, stats: &mut Stats) {
    let f = &mut files[d.file];
    if f.chunks.len() <= d.index {
        f.chunks.resize(
            d.index + 1,
            ChunkRef {
                digest: None,
                size: 0,
                zero: false,
            },
        );
    }
    if d.chunk.zero {
        stats.zero_bytes += d.chunk.size;
    } else {
        stats.chunks += 1;
    }
    if d.new {
        stats.new_chunks += 1;
        stats.new_bytes += d.chunk.size;
        stats.stored_bytes += d.stored;
    }
    f.chunks[d.index] = d.chunk;
}

impl BackupStore {
    /// The store of the pool at `pool_path` (`<pool_path>/backups`); nothing is created yet.
    pub fn for_pool(pool_path: &Path) -> Self {
        BackupStore {
            root: pool_path.join("backups"),
        }
    }

    /// The store directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn chunk_dir(&self) -> PathBuf {
        self.root.join(CHUNK_DIR)
    }

    /// Path of a chunk file (`.zst` compressed or `.raw`).
    pub fn chunk_path(&self, digest: &str, compressed: bool) -> PathBuf {
        let prefix = digest.get(..2).unwrap_or("xx");
        self.chunk_dir().join(prefix).join(format!(
            "{digest}.{}",
            if compressed { "zst" } else { "raw" }
        ))
    }

    fn existing_chunk(&self, digest: &str) -> Option<(PathBuf, bool)> {
        let z = self.chunk_path(digest, true);
        if z.exists() {
            return Some((z, true));
        }
        let r = self.chunk_path(digest, false);
        r.exists().then_some((r, false))
    }

    /// The stored chunk `digest` if it is whole: a `.raw` file of exactly `size` bytes, or a
    /// `.zst` file holding exactly one complete zstd frame that declares `size` bytes. A
    /// torn or truncated chunk is not whole, so the next backup writes it again.
    pub(super) fn valid_chunk(&self, digest: &str, size: u64) -> Option<(PathBuf, bool)> {
        [true, false].into_iter().find_map(|compressed| {
            let p = self.chunk_path(digest, compressed);
            let f = File::open(&p).ok()?;
            let len = f.metadata().ok()?.len();
            let whole = if compressed {
                zstd_frame_is_whole(&f, len, size)
            } else {
                len == size
            };
            if !whole {
                warn!(chunk = %p.display(), "torn chunk: it is written again");
            }
            whole.then_some((p, compressed))
        })
    }

    /// Fsyncs every chunk directory this run renamed a chunk into, then `.chunks` (which
    /// may have gained a prefix directory).
    pub(super) fn sync_dirty_dirs(&self, shared: RunShared) -> Result<(), BackupError> {
        let dirs = shared.dirty.into_inner().unwrap_or_else(|p| p.into_inner());
        if dirs.is_empty() {
            return Ok(());
        }
        for d in dirs.iter().chain(std::iter::once(&self.chunk_dir())) {
            stead_host::fs::fsync_dir(d).map_err(host_err)?;
        }
        Ok(())
    }

    fn manifest_path(&self, id: &BackupId) -> PathBuf {
        self.root
            .join(&id.kind)
            .join(&id.name)
            .join(format!("{}.json", id.time.format(TIME_FMT)))
    }

    fn init(&self) -> Result<(), BackupError> {
        create_private_dir(&self.chunk_dir())?;
        for d in [&self.root, &self.chunk_dir()] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o700))
                .map_err(BackupError::io("chmod", d))?;
        }
        Ok(())
    }

    /// Takes the store's lock (`shared` for readers, else exclusive), waiting for it.
    /// The guard is the open file: the `flock` is released when it is closed.
    pub(super) fn lock(&self, shared: bool) -> Result<File, BackupError> {
        self.init()?;
        let p = self.root.join(LOCK_FILE);
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&p)
            .map_err(BackupError::io("open", &p))?;
        let locked = if shared { f.lock_shared() } else { f.lock() };
        locked.map_err(BackupError::io("lock", &p))?;
        Ok(f)
    }

    /// Backs up `inputs` (logical name, volume file or directory) of `resource` (`Kind/name`)
    /// with `spec` recorded as applied. Chunks already in the store are neither compressed nor
    /// written again; the manifest is written last, atomically, after the chunks are synced.
    pub fn backup_paths(
        &self,
        resource: &str,
        spec: &serde_json::Value,
        inputs: &[(String, PathBuf)],
        opts: &BackupOptions,
    ) -> Result<BackupInfo, BackupError> {
        validate_resource(resource)?;
        let span = info_span!("backup", resource = resource);
        let _g = span.enter();
        let started = Instant::now();
        check_input_names(inputs)?;
        let _lock = self.lock(true)?;

        // Phase 1: walk the inputs and record metadata.
        let mut scan = scan_inputs(inputs, opts)?;
        clear_racy_stamps(&mut scan.files, Utc::now(), opts.racy_secs);
        opts.progress.set_length(content_bytes(&scan.files));

        // Files unchanged since the previous backup keep its chunk lists without being read.
        let reused = if opts.reread {
            0
        } else {
            self.reuse_unchanged(resource, &mut scan.files, &mut scan.sources)
        };
        opts.progress.inc(reused);

        // Phase 2: stream the contents through the chunk pipeline.
        let mut stats = self.chunk_files(&mut scan.files, &scan.sources, opts)?;
        stats.bytes += reused;
        stats.reused_bytes = reused;

        self.commit_snapshot(
            resource,
            spec,
            opts,
            started,
            scan.inputs,
            scan.files,
            stats,
        )
    }

    /// The last step of every backup: a free id for `resource`, the manifest of what was
    /// stored (`inputs`, `files` with their chunk lists, `stats` with the time since
    /// `started`), written durably. The caller holds the store's lock.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn commit_snapshot(
        &self,
        resource: &str,
        spec: &serde_json::Value,
        opts: &BackupOptions,
        started: Instant,
        inputs: Vec<InputEntry>,
        files: Vec<FileEntry>,
        mut stats: Stats,
    ) -> Result<BackupInfo, BackupError> {
        let (kind, name) = validate_resource(resource)?;
        let id = self.free_id(kind, name, opts.time.unwrap_or_else(Utc::now));
        stats.duration_ms = started.elapsed().as_millis() as u64;
        let manifest = Manifest {
            format: FORMAT.into(),
            id: id.to_id(),
            resource: resource.into(),
            time: id.time.to_rfc3339_opts(SecondsFormat::Secs, true),
            stead_version: env!("CARGO_PKG_VERSION").into(),
            spec: spec.clone(),
            chunking: Chunking {
                algorithm: "fastcdc-v2020".into(),
                min: CHUNK_MIN,
                avg: CHUNK_AVG,
                max: CHUNK_MAX,
            },
            compression: if opts.zstd_level.is_some() {
                "zstd".into()
            } else {
                "none".into()
            },
            inputs,
            consistency: opts.consistency.clone(),
            files,
            stats,
        };
        let path = self.write_manifest(&id, &manifest)?;
        Ok(info_of(&manifest, path, id.time))
    }

    /// Reads the files of `sources` (those not reused) through the chunk pipeline: one
    /// reader cuts chunks, `threads` workers hash, compress and store them. Fills in each
    /// file's chunk list and sha256, makes the new chunks durable, and returns the counts
    /// (bytes read, chunks of all files, new chunks and bytes).
    fn chunk_files(
        &self,
        files: &mut [FileEntry],
        sources: &[Option<PathBuf>],
        opts: &BackupOptions,
    ) -> Result<Stats, BackupError> {
        let threads = worker_count(opts.threads);
        let (job_tx, job_rx) = sync_channel::<Job>(threads * 2);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (done_tx, done_rx) = channel::<Result<Done, BackupError>>();
        let shared = RunShared::default();
        let abort = Arc::new(AtomicBool::new(false));
        let bytes_read = Arc::new(AtomicU64::new(0));

        let result = std::thread::scope(|s| {
            for t in 0..threads {
                let job_rx = Arc::clone(&job_rx);
                let done_tx = done_tx.clone();
                let shared = &shared;
                let abort = Arc::clone(&abort);
                let level = opts.zstd_level;
                s.spawn(move || self.worker(t, level, &job_rx, &done_tx, shared, &abort));
            }
            drop(done_tx);
            // Only the workers may hold the queue's receiver: when they have all exited
            // (on an error), the reader's blocked send fails instead of waiting forever.
            drop(job_rx);
            let r = self.read_all(
                files,
                sources,
                &job_tx,
                &abort,
                &bytes_read,
                &*opts.progress,
            );
            drop(job_tx);
            r
        });
        result?;
        let mut stats = Stats {
            bytes: bytes_read.load(Ordering::Relaxed),
            ..Stats::default()
        };
        count_reused_chunks(files, sources, &mut stats);
        for d in done_rx.iter() {
            place_done_chunk(files, d?, &mut stats);
        }
        opts.progress.finish();
        // Make the chunks durable before the manifest that references them: each chunk
        // file was fsynced before its rename; the renames are made durable here, one
        // fsync per directory written to.
        self.sync_dirty_dirs(shared)?;
        Ok(stats)
    }

    /// The id of a new backup of `kind/name` at `time` (to the second), a second later
    /// for each backup that already has that time.
    fn free_id(&self, kind: &str, name: &str, time: DateTime<Utc>) -> BackupId {
        let mut id = BackupId {
            kind: kind.into(),
            name: name.into(),
            time: time.with_nanosecond_zero(),
        };
        while self.manifest_path(&id).exists() {
            id.time += chrono::Duration::seconds(1);
        }
        id
    }

    /// Writes `manifest` as backup `id`, atomically; returns its path.
    fn write_manifest(&self, id: &BackupId, manifest: &Manifest) -> Result<PathBuf, BackupError> {
        let path = self.manifest_path(id);
        let json = serde_json::to_vec_pretty(manifest).map_err(|e| BackupError::Parse {
            path: path.clone(),
            source: e,
        })?;
        write_atomic(&path, &json)?;
        let stats = &manifest.stats;
        info!(
            id = %manifest.id,
            bytes = stats.bytes,
            new_bytes = stats.new_bytes,
            stored_bytes = stats.stored_bytes,
            ms = stats.duration_ms,
            "backup written"
        );
        Ok(path)
    }

    /// For each regular file whose size, mtime and [`Stamp`] equal those recorded for the
    /// same input and path in the newest backup of `resource` (same chunking), takes over
    /// that entry's chunk list and sha256 and clears its source, so it is not read. Entries
    /// that reference a chunk no longer in the store are read again. Returns the bytes
    /// reused. Any problem with the previous manifest just means nothing is reused.
    fn reuse_unchanged(
        &self,
        resource: &str,
        files: &mut [FileEntry],
        sources: &mut [Option<PathBuf>],
    ) -> u64 {
        let prev = match self.manifest_paths(Some(resource)) {
            Ok(paths) => match paths.last() {
                Some(p) => match read_manifest(p) {
                    Ok(m) => m,
                    Err(e) => {
                        warn!(error = %e, "previous backup unreadable: reading every file");
                        return 0;
                    }
                },
                None => return 0,
            },
            Err(_) => return 0,
        };
        if prev.chunking.min != CHUNK_MIN
            || prev.chunking.avg != CHUNK_AVG
            || prev.chunking.max != CHUNK_MAX
        {
            return 0;
        }
        let by_path: HashMap<(&str, &str), &FileEntry> = prev
            .files
            .iter()
            .filter(|f| f.kind == EntryKind::File && f.stamp.is_some() && f.sha256.is_some())
            .map(|f| ((f.input.as_str(), f.path.as_str()), f))
            .collect();
        let mut present: HashSet<&str> = HashSet::new();
        let mut reused = 0u64;
        let mut count = 0usize;
        for (f, src) in files.iter_mut().zip(sources.iter_mut()) {
            if src.is_none() || f.stamp.is_none() {
                continue;
            }
            let Some(p) = by_path.get(&(f.input.as_str(), f.path.as_str())) else {
                continue;
            };
            let same = p.size == f.size
                && p.mtime == f.mtime
                && p.mtime_nsec == f.mtime_nsec
                && p.stamp == f.stamp
                && p.chunks.iter().map(|c| c.size).sum::<u64>() == f.size;
            if !same {
                continue;
            }
            let all_there = p.chunks.iter().all(|c| match &c.digest {
                None => c.zero,
                Some(d) => {
                    present.contains(d.as_str()) || {
                        let there = self.valid_chunk(d, c.size).is_some();
                        if there {
                            present.insert(d.as_str());
                        }
                        there
                    }
                }
            });
            if !all_there {
                continue;
            }
            f.chunks = p.chunks.clone();
            f.sha256 = p.sha256.clone();
            *src = None;
            reused += f.size;
            count += 1;
        }
        if count > 0 {
            info!(
                files = count,
                bytes = reused,
                previous = %prev.id,
                "unchanged since the previous backup: not read"
            );
        }
        reused
    }

    #[allow(clippy::too_many_arguments)]
    /// Reads every regular file in order, cuts chunks and feeds the workers. The whole-file
    /// sha256 is computed on a separate hasher thread (fed the same chunks, in order), so the
    /// reader only reads and cuts.
    #[allow(clippy::too_many_arguments)]
    fn read_all(
        &self,
        files: &mut [FileEntry],
        sources: &[Option<PathBuf>],
        job_tx: &SyncSender<Job>,
        abort: &AtomicBool,
        bytes_read: &AtomicU64,
        progress: &dyn Progress,
    ) -> Result<(), BackupError> {
        let (hash_tx, hash_rx) = sync_channel::<Feed>(8);
        let (digest_tx, digest_rx) = channel::<(usize, String)>();
        let read = std::thread::scope(|s| {
            s.spawn(move || {
                let mut h = Sha256::new();
                for m in hash_rx {
                    match m {
                        Feed::Data(d) => h.update(&d[..]),
                        Feed::Zeros(n) => feed_zeros(&mut h, n),
                        Feed::End(fi) => {
                            let d = std::mem::take(&mut h).finalize();
                            if digest_tx.send((fi, hex32(&d))).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
            let r = self.read_files(
                files, sources, job_tx, &hash_tx, abort, bytes_read, progress,
            );
            drop(hash_tx);
            r
        });
        for (fi, d) in digest_rx.try_iter() {
            files[fi].sha256 = Some(d);
        }
        read
    }

    #[allow(clippy::too_many_arguments)]
    fn read_files(
        &self,
        files: &mut [FileEntry],
        sources: &[Option<PathBuf>],
        job_tx: &SyncSender<Job>,
        hash_tx: &SyncSender<Feed>,
        abort: &AtomicBool,
        bytes_read: &AtomicU64,
        progress: &dyn Progress,
    ) -> Result<(), BackupError> {
        let mut buf = vec![0u8; READ_BUF];
        for (fi, src) in sources.iter().enumerate() {
            let Some(src) = src else { continue };
            if abort.load(Ordering::Relaxed) {
                break;
            }
            let mut f = File::open(src).map_err(BackupError::io("open", src))?;
            let mut len = 0usize;
            let mut eof = false;
            let mut index = 0usize;
            let mut size = 0u64;
            loop {
                while !eof && len < buf.len() {
                    let n = match f.read(&mut buf[len..]) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            return Err(BackupError::Io {
                                op: "read",
                                path: src.clone(),
                                source: e,
                            });
                        }
                    };
                    if n == 0 {
                        eof = true;
                    }
                    len += n;
                }
                let cdc =
                    fastcdc::v2020::FastCDC::new(&buf[..len], CHUNK_MIN, CHUNK_AVG, CHUNK_MAX);
                let mut start = 0usize;
                while start < len && (eof || len - start >= CHUNK_MAX + ZERO_RUN) {
                    if abort.load(Ordering::Relaxed) {
                        // A worker failed: its error ends the run.
                        return Ok(());
                    }
                    let (end, zero) = next_cut(&cdc, &buf[..len], start, size, eof);
                    let piece_len = end - start;
                    size += piece_len as u64;
                    progress.inc(piece_len as u64);
                    let (job, feed) = if zero {
                        (
                            Job {
                                file: fi,
                                index,
                                data: Arc::default(),
                                zero_len: piece_len,
                            },
                            Feed::Zeros(piece_len as u64),
                        )
                    } else {
                        let data = Arc::new(buf[start..end].to_vec());
                        let feed = Feed::Data(Arc::clone(&data));
                        (
                            Job {
                                file: fi,
                                index,
                                data,
                                zero_len: 0,
                            },
                            feed,
                        )
                    };
                    if hash_tx.send(feed).is_err() || job_tx.send(job).is_err() {
                        // workers are gone: they reported an error
                        abort.store(true, Ordering::Relaxed);
                        return Ok(());
                    }
                    index += 1;
                    start = end;
                }
                buf.copy_within(start..len, 0);
                len -= start;
                if eof && len == 0 {
                    break;
                }
            }
            if hash_tx.send(Feed::End(fi)).is_err() {
                abort.store(true, Ordering::Relaxed);
                return Ok(());
            }
            bytes_read.fetch_add(size, Ordering::Relaxed);
            let fe = &mut files[fi];
            if fe.size != size {
                warn!(file = %src.display(), expected = fe.size, read = size, "file changed size while reading");
            }
            fe.size = size;
            fe.chunks = vec![
                ChunkRef {
                    digest: None,
                    size: 0,
                    zero: false
                };
                index
            ];
        }
        Ok(())
    }

    pub(super) fn worker(
        &self,
        t: usize,
        level: Option<i32>,
        job_rx: &Mutex<Receiver<Job>>,
        done_tx: &std::sync::mpsc::Sender<Result<Done, BackupError>>,
        shared: &RunShared,
        abort: &AtomicBool,
    ) {
        let mut comp = match level.map(zstd::bulk::Compressor::new).transpose() {
            Ok(c) => c,
            Err(e) => {
                abort.store(true, Ordering::Relaxed);
                let _ = done_tx.send(Err(BackupError::Io {
                    op: "zstd init",
                    path: self.root.clone(),
                    source: e,
                }));
                return;
            }
        };
        loop {
            let Some(job) = next_job(job_rx) else { return };
            let r = self.store_chunk(t, &job, comp.as_mut(), shared);
            let failed = r.is_err();
            if failed {
                abort.store(true, Ordering::Relaxed);
            }
            if done_tx.send(r).is_err() || failed {
                return;
            }
        }
    }

    fn store_chunk(
        &self,
        t: usize,
        job: &Job,
        comp: Option<&mut zstd::bulk::Compressor<'static>>,
        shared: &RunShared,
    ) -> Result<Done, BackupError> {
        let size = (job.data.len() + job.zero_len) as u64;
        if job.zero_len > 0 || is_zero(&job.data) {
            return Ok(Done {
                file: job.file,
                index: job.index,
                chunk: ChunkRef {
                    digest: None,
                    size,
                    zero: true,
                },
                new: false,
                stored: 0,
            });
        }
        let digest: [u8; 32] = Sha256::digest(&job.data[..]).into();
        let hex = hex32(&digest);
        let first_claim = shared
            .claimed
            .lock()
            .map(|mut c| c.insert(digest))
            .unwrap_or(true);
        let mut new = false;
        let mut stored = 0;
        if first_claim && self.valid_chunk(&hex, size).is_none() {
            let path = self.chunk_path(&hex, comp.is_some());
            let bytes: std::borrow::Cow<[u8]> = match comp {
                Some(c) => c
                    .compress(&job.data)
                    .map_err(|e| BackupError::Io {
                        op: "compress chunk",
                        path: path.clone(),
                        source: e,
                    })?
                    .into(),
                None => (&job.data[..]).into(),
            };
            let dir = path.parent().unwrap_or(&self.root).to_path_buf();
            create_private_dir(&dir)?;
            // A torn copy under the other extension would shadow the one written now.
            let _ = fs::remove_file(self.chunk_path(&hex, comp_other(&path)));
            let tmp = path.with_extension(format!("tmp.{}.{t}", std::process::id()));
            write_chunk_file(&tmp, &path, &bytes)?;
            if let Ok(mut d) = shared.dirty.lock() {
                d.insert(dir);
            }
            new = true;
            stored = bytes.len() as u64;
        }
        Ok(Done {
            file: job.file,
            index: job.index,
            chunk: ChunkRef {
                digest: Some(hex),
                size,
                zero: false,
            },
            new,
            stored,
        })
    }

    /// All backups in the store, oldest first; optionally only those of `resource`.
    pub fn list(&self, resource: Option<&str>) -> Result<Vec<BackupInfo>, BackupError> {
        let mut out = Vec::new();
        for path in self.manifest_paths(resource)? {
            let m = read_manifest(&path)?;
            let time = DateTime::parse_from_rfc3339(&m.time)
                .map_err(|e| {
                    BackupError::Invalid(format!("{}: bad time {:?}: {e}", path.display(), m.time))
                })?
                .with_timezone(&Utc);
            out.push(info_of(&m, path, time));
        }
        out.sort_by(|a, b| (a.time, &a.id).cmp(&(b.time, &b.id)));
        Ok(out)
    }

    pub(super) fn manifest_paths(
        &self,
        resource: Option<&str>,
    ) -> Result<Vec<PathBuf>, BackupError> {
        let mut dirs = Vec::new();
        if let Some(r) = resource {
            let (k, n) = validate_resource(r)?;
            dirs.push(self.root.join(k).join(n));
        } else {
            for k in read_dir_sorted(&self.root)? {
                let kname = k.file_name().and_then(|s| s.to_str()).unwrap_or(".");
                if kname.starts_with('.') || !k.is_dir() {
                    continue;
                }
                dirs.extend(read_dir_sorted(&k)?.into_iter().filter(|p| p.is_dir()));
            }
        }
        let mut out = Vec::new();
        for d in dirs {
            out.extend(
                read_dir_sorted(&d)?
                    .into_iter()
                    .filter(|p| p.extension().is_some_and(|e| e == "json")),
            );
        }
        Ok(out)
    }

    /// The id of the newest backup of `resource` (`Kind/name`), reading only its manifest.
    pub fn newest(&self, resource: &str) -> Result<Option<String>, BackupError> {
        match self.manifest_paths(Some(resource))?.last() {
            Some(p) => Ok(Some(read_manifest(p)?.id)),
            None => Ok(None),
        }
    }

    /// The manifest of backup `id` (`Kind/name/time`).
    pub fn manifest(&self, id: &str) -> Result<Manifest, BackupError> {
        let bid = BackupId::parse(id)?;
        let p = self.manifest_path(&bid);
        if !p.exists() {
            return Err(BackupError::NotFound(id.to_string()));
        }
        let m = read_manifest(&p)?;
        check_manifest(&m)
            .map_err(|why| BackupError::Integrity(format!("corrupt backup {id}: {why}")))?;
        Ok(m)
    }

    /// Re-reads every chunk of backup `id`, checks its sha256 and each file's sha256, and
    /// reports exactly which file and chunk is missing or corrupt.
    pub fn verify(&self, id: &str) -> Result<VerifyReport, BackupError> {
        let m = self.manifest(id)?;
        let _span = info_span!("verify", id = id).entered();
        let mut report = VerifyReport {
            id: m.id.clone(),
            ..VerifyReport::default()
        };
        for f in m
            .files
            .iter()
            .filter(|f| f.kind == EntryKind::File && f.link.is_none())
        {
            report.files += 1;
            let mut hasher = Sha256::new();
            // A block image without a whole-file digest is checked by its chunks alone.
            let whole = f.sha256.is_some();
            let mut offset = 0u64;
            let mut file_ok = true;
            self.chunks_in_order(f, |i, c, data| {
                report.chunks += 1;
                if c.zero {
                    if whole {
                        feed_zeros(&mut hasher, c.size);
                    }
                } else {
                    match data {
                        Ok(d) if whole => hasher.update(&d),
                        Ok(_) => {}
                        Err(kind) => {
                            file_ok = false;
                            report.problems.push(Problem {
                                input: f.input.clone(),
                                path: f.path.clone(),
                                chunk_index: Some(i),
                                offset: Some(offset),
                                digest: c.digest.clone(),
                                kind,
                            });
                        }
                    }
                }
                offset += c.size;
                report.bytes += c.size;
                Ok(())
            })?;
            let got = hex32(&hasher.finalize());
            if file_ok && !whole_digest_matches(f, &got) {
                report.problems.push(Problem {
                    input: f.input.clone(),
                    path: f.path.clone(),
                    chunk_index: None,
                    offset: None,
                    digest: None,
                    kind: ProblemKind::FileDigestMismatch,
                });
            }
        }
        for p in &report.problems {
            warn!(problem = %p, "verify");
        }
        Ok(report)
    }

    /// Reads, decompresses and checks one chunk.
    pub(super) fn read_chunk(
        &self,
        digest: &str,
        size: u64,
        dec: &mut zstd::bulk::Decompressor<'static>,
    ) -> Result<Vec<u8>, ProblemKind> {
        let Some((path, compressed)) = self.existing_chunk(digest) else {
            return Err(ProblemKind::MissingChunk);
        };
        let raw = fs::read(&path)
            .map_err(|e| ProblemKind::UnreadableChunk(format!("{}: {e}", path.display())))?;
        let data = if compressed {
            dec.decompress(&raw, size as usize)
                .map_err(|e| ProblemKind::UnreadableChunk(format!("zstd: {e}")))?
        } else {
            raw
        };
        if data.len() as u64 != size || hex32(&Sha256::digest(&data)) != digest {
            return Err(ProblemKind::CorruptChunk);
        }
        Ok(data)
    }

    /// Restores backup `id`: each input to `dest_dir/<input name>`, or, with `as_name` and a
    /// single input, to `dest_dir/<as_name>`. Existing destinations are refused. Files are
    /// written to a temporary name, checked against their sha256, then renamed into place;
    /// zero chunks become holes.
    pub fn restore(
        &self,
        id: &str,
        dest_dir: &Path,
        as_name: Option<&str>,
    ) -> Result<RestoreReport, BackupError> {
        let m = self.manifest(id)?;
        let _span = info_span!("restore", id = id).entered();
        if as_name.is_some() && m.inputs.len() != 1 {
            return Err(BackupError::Invalid(format!(
                "backup {id} has {} inputs; a new name needs exactly one",
                m.inputs.len()
            )));
        }
        if let Some(n) = as_name {
            validate_input_name(n)?;
        }
        fs::create_dir_all(dest_dir).map_err(BackupError::io("create", dest_dir))?;
        let base = rustix::fs::open(
            dest_dir,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| BackupError::io("open", dest_dir)(e.into()))?;
        let mut report = RestoreReport {
            id: m.id.clone(),
            restored: Vec::new(),
            bytes: 0,
        };
        for input in &m.inputs {
            let final_path = dest_dir.join(as_name.unwrap_or(&input.name));
            if fs::symlink_metadata(&final_path).is_ok() {
                return Err(BackupError::Invalid(format!(
                    "{} exists; refusing to overwrite",
                    final_path.display()
                )));
            }
            let tmp_name = format!(
                ".{}.restore-{}",
                as_name.unwrap_or(&input.name),
                std::process::id()
            );
            let tmp = dest_dir.join(&tmp_name);
            stead_host::remove_tree_beneath(&tmp).map_err(tree_err)?;
            let entries: Vec<&FileEntry> =
                m.files.iter().filter(|f| f.input == input.name).collect();
            let root = RestoreRoot {
                base: &base,
                top: &tmp_name,
                shown: &tmp,
            };
            let r = self.restore_entries(&entries, &root, &mut report.bytes);
            if let Err(e) = r {
                if let Err(re) = stead_host::remove_tree_beneath(&tmp) {
                    warn!(path = %tmp.display(), error = %re, "cannot remove a partial restore");
                }
                return Err(e);
            }
            fs::rename(&tmp, &final_path).map_err(BackupError::io("rename", &tmp))?;
            debug!(input = %input.name, to = %final_path.display(), "restored");
            report.restored.push((input.name.clone(), final_path));
        }
        Ok(report)
    }

    /// Creates every entry beneath `root` (each one's parent opened without following any
    /// symlink, so a restored symlink is never followed), then sets metadata, deepest first.
    fn restore_entries(
        &self,
        entries: &[&FileEntry],
        root: &RestoreRoot<'_>,
        bytes: &mut u64,
    ) -> Result<(), BackupError> {
        for e in entries {
            let at = root.place(e, &e.path)?;
            let p = &at.shown;
            let mode = Mode::from_bits_truncate(0o700);
            match e.kind {
                EntryKind::Dir => rustix::fs::mkdirat(&at.dir, &at.name, mode)
                    .map_err(|err| BackupError::io("mkdir", p)(err.into()))?,
                EntryKind::File => match &e.link {
                    Some(first) => {
                        let from = root.place(e, first)?;
                        rustix::fs::linkat(
                            &from.dir,
                            &from.name,
                            &at.dir,
                            &at.name,
                            AtFlags::empty(),
                        )
                        .map_err(|err| BackupError::io("link", p)(err.into()))?;
                    }
                    None => {
                        let fd = rustix::fs::openat(
                            &at.dir,
                            &at.name,
                            OFlags::CREATE
                                | OFlags::EXCL
                                | OFlags::WRONLY
                                | OFlags::NOFOLLOW
                                | OFlags::CLOEXEC,
                            Mode::from_bits_truncate(0o600),
                        )
                        .map_err(|err| BackupError::io("create", p)(err.into()))?;
                        *bytes += self.restore_file(e, File::from(fd), p)?;
                    }
                },
                EntryKind::Symlink => {
                    let t = e.target.as_deref().unwrap_or_default();
                    rustix::fs::symlinkat(t, &at.dir, &at.name)
                        .map_err(|err| BackupError::io("symlink", p)(err.into()))?;
                }
                EntryKind::Char | EntryKind::Block | EntryKind::Fifo => {
                    let kind = match e.kind {
                        EntryKind::Char => rustix::fs::FileType::CharacterDevice,
                        EntryKind::Block => rustix::fs::FileType::BlockDevice,
                        _ => rustix::fs::FileType::Fifo,
                    };
                    rustix::fs::mknodat(
                        &at.dir,
                        &at.name,
                        kind,
                        Mode::from_bits_truncate(e.mode),
                        e.rdev.unwrap_or(0),
                    )
                    .map_err(|err| BackupError::io("mknod", p)(err.into()))?;
                }
            }
        }
        // Metadata last, deepest first, so creating children does not disturb directory mtimes.
        for e in entries.iter().rev() {
            apply_metadata(e, &root.place(e, &e.path)?)?;
        }
        Ok(())
    }

    /// Restores one regular file: written in order, holes for zero chunks, its sha256
    /// checked at the end.
    pub(super) fn restore_file(
        &self,
        e: &FileEntry,
        mut out: File,
        p: &Path,
    ) -> Result<u64, BackupError> {
        let mut hasher = Sha256::new();
        let whole = e.sha256.is_some();
        let mut offset = 0u64;
        self.chunks_in_order(e, |i, c, data| {
            if c.zero {
                if whole {
                    feed_zeros(&mut hasher, c.size);
                }
                out.seek(SeekFrom::Current(c.size as i64))
                    .map_err(BackupError::io("seek", p))?;
            } else {
                let data = data.map_err(|k| {
                    BackupError::Integrity(
                        Problem {
                            input: e.input.clone(),
                            path: e.path.clone(),
                            chunk_index: Some(i),
                            offset: Some(offset),
                            digest: c.digest.clone(),
                            kind: k,
                        }
                        .to_string(),
                    )
                })?;
                if whole {
                    hasher.update(&data);
                }
                out.write_all(&data).map_err(BackupError::io("write", p))?;
            }
            offset += c.size;
            Ok(())
        })?;
        out.set_len(offset)
            .map_err(BackupError::io("truncate", p))?;
        out.sync_all().map_err(BackupError::io("fsync", p))?;
        let got = hex32(&hasher.finalize());
        if !whole_digest_matches(e, &got) {
            return Err(BackupError::Integrity(format!(
                "{}:{}: restored sha256 {got} differs from the manifest",
                e.input, e.path
            )));
        }
        Ok(offset)
    }

    /// Calls `visit(index, chunk, plaintext)` for every chunk of `e`, in order (zero
    /// chunks get an empty `Ok`). Files of more than a few chunks are read, decompressed
    /// and checked on a small thread pool with bounded read-ahead; `visit` runs on the
    /// calling thread. An error from `visit` stops the walk.
    fn chunks_in_order(
        &self,
        e: &FileEntry,
        mut visit: impl FnMut(usize, &ChunkRef, Result<Vec<u8>, ProblemKind>) -> Result<(), BackupError>,
    ) -> Result<(), BackupError> {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .clamp(1, 8);
        let data_chunks = e.chunks.iter().filter(|c| !c.zero).count();
        if threads < 2 || data_chunks < 4 {
            let mut dec = zstd::bulk::Decompressor::new()
                .map_err(BackupError::io("zstd init", &self.root))?;
            for (i, c) in e.chunks.iter().enumerate() {
                let data = if c.zero {
                    Ok(Vec::new())
                } else {
                    self.read_chunk(c.digest.as_deref().unwrap_or_default(), c.size, &mut dec)
                };
                visit(i, c, data)?;
            }
            return Ok(());
        }
        let limit = threads * 2;
        std::thread::scope(|s| {
            let (job_tx, job_rx) = sync_channel::<usize>(limit);
            let job_rx = Arc::new(Mutex::new(job_rx));
            let (res_tx, res_rx) = channel::<(usize, Result<Vec<u8>, ProblemKind>)>();
            for _ in 0..threads {
                let job_rx = Arc::clone(&job_rx);
                let res_tx = res_tx.clone();
                s.spawn(move || {
                    let mut dec = match zstd::bulk::Decompressor::new() {
                        Ok(d) => d,
                        Err(err) => {
                            // Report on the first job this worker gets.
                            if let Some(i) = next_job(&job_rx) {
                                let _ = res_tx
                                    .send((i, Err(ProblemKind::UnreadableChunk(err.to_string()))));
                            }
                            return;
                        }
                    };
                    loop {
                        let Some(i) = next_job(&job_rx) else { return };
                        let c = &e.chunks[i];
                        let r = self.read_chunk(
                            c.digest.as_deref().unwrap_or_default(),
                            c.size,
                            &mut dec,
                        );
                        if res_tx.send((i, r)).is_err() {
                            return;
                        }
                    }
                });
            }
            drop(res_tx);
            let order: Vec<usize> = (0..e.chunks.len()).filter(|&i| !e.chunks[i].zero).collect();
            let mut submitted = 0usize;
            let mut pending: BTreeMap<usize, Result<Vec<u8>, ProblemKind>> = BTreeMap::new();
            let mut in_flight = 0usize;
            let stopped = || ProblemKind::UnreadableChunk("chunk readers stopped".into());
            let r = (|| {
                for (i, c) in e.chunks.iter().enumerate() {
                    if c.zero {
                        visit(i, c, Ok(Vec::new()))?;
                        continue;
                    }
                    let data = loop {
                        while in_flight + pending.len() < limit && submitted < order.len() {
                            if job_tx.send(order[submitted]).is_err() {
                                break;
                            }
                            submitted += 1;
                            in_flight += 1;
                        }
                        if let Some(r) = pending.remove(&i) {
                            break r;
                        }
                        match res_rx.recv() {
                            Ok((j, r)) => {
                                in_flight -= 1;
                                pending.insert(j, r);
                            }
                            Err(_) => break Err(stopped()),
                        }
                    };
                    visit(i, c, data)?;
                }
                Ok(())
            })();
            drop(job_tx);
            r
        })
    }

    /// Deletes backup `id` (its manifest only; run [`BackupStore::gc`] to free chunks).
    pub fn remove(&self, id: &str) -> Result<(), BackupError> {
        let bid = BackupId::parse(id)?;
        let p = self.manifest_path(&bid);
        fs::remove_file(&p).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                BackupError::NotFound(id.to_string())
            } else {
                BackupError::Io {
                    op: "remove",
                    path: p.clone(),
                    source: e,
                }
            }
        })
    }

    /// Applies `retention` (periods in `tz`) to the backups of each resource (or only of
    /// `resource`), removes the manifests it marks, then garbage-collects unreferenced chunks.
    /// With `dry_run` nothing is deleted.
    pub fn prune<Z: chrono::TimeZone>(
        &self,
        resource: Option<&str>,
        retention: &Retention,
        tz: &Z,
        dry_run: bool,
    ) -> Result<PruneReport, BackupError> {
        let mut report = self.prune_manifests(resource, retention, tz, dry_run)?;
        if !dry_run {
            report.gc = Some(self.gc()?);
        }
        Ok(report)
    }

    /// [`BackupStore::prune`] without the garbage collection: deletes the manifests that
    /// retention removes. Callers pruning several resources in a row run [`BackupStore::gc`]
    /// once at the end (it reads every manifest and walks every chunk directory).
    pub fn prune_manifests<Z: chrono::TimeZone>(
        &self,
        resource: Option<&str>,
        retention: &Retention,
        tz: &Z,
        dry_run: bool,
    ) -> Result<PruneReport, BackupError> {
        let all = self.list(resource)?;
        let mut groups: BTreeMap<&str, Vec<&BackupInfo>> = BTreeMap::new();
        for b in &all {
            groups.entry(b.resource.as_str()).or_default().push(b);
        }
        let mut report = PruneReport::default();
        for (_, backups) in groups {
            let times: Vec<DateTime<Utc>> = backups.iter().map(|b| b.time).collect();
            for d in retention::compute(&times, retention, tz) {
                let b = backups[d.index];
                let what = match d.mark {
                    Mark::Keep(rule) => rule.name().to_string(),
                    Mark::Remove => "remove".to_string(),
                };
                report.decisions.push((b.id.clone(), what));
                if d.mark == Mark::Remove {
                    if !dry_run {
                        self.remove(&b.id)?;
                        info!(id = %b.id, "pruned");
                    }
                    report.removed.push(b.id.clone());
                }
            }
        }
        Ok(report)
    }

    /// Mark & sweep: deletes chunk files no manifest references, and stale temporary files.
    /// Holds the store lock exclusively, so no backup writes chunks meanwhile.
    pub fn gc(&self) -> Result<GcReport, BackupError> {
        let _lock = self.lock(false)?;
        let _span = info_span!("gc", store = %self.root.display()).entered();
        let mut referenced: HashSet<String> = HashSet::new();
        // Mark. A manifest that cannot be read aborts the sweep: never delete what it might
        // reference.
        for p in self.manifest_paths(None)? {
            let m = read_manifest(&p)?;
            for f in &m.files {
                referenced.extend(f.chunks.iter().filter_map(|c| c.digest.clone()));
            }
        }
        let mut r = GcReport {
            referenced: referenced.len() as u64,
            ..GcReport::default()
        };
        // Sweep.
        for sub in read_dir_sorted(&self.chunk_dir())? {
            if !sub.is_dir() {
                continue;
            }
            for f in read_dir_sorted(&sub)? {
                let name = f
                    .file_name()
                    .and_then(|s| s.to_str())
                    .unwrap_or_default()
                    .to_string();
                let (stem, ext) = name.split_once('.').unwrap_or((name.as_str(), ""));
                let is_chunk = (ext == "zst" || ext == "raw") && stem.len() == 64;
                if is_chunk && referenced.contains(stem) {
                    r.kept += 1;
                    continue;
                }
                let len = fs::symlink_metadata(&f).map(|m| m.len()).unwrap_or(0);
                fs::remove_file(&f).map_err(BackupError::io("remove", &f))?;
                if is_chunk {
                    r.removed += 1;
                    r.removed_bytes += len;
                } else {
                    r.temp_removed += 1;
                }
            }
        }
        info!(
            kept = r.kept,
            removed = r.removed,
            removed_bytes = r.removed_bytes,
            "gc done"
        );
        Ok(r)
    }
}

trait NanoZero {
    fn with_nanosecond_zero(self) -> Self;
}

impl NanoZero for DateTime<Utc> {
    fn with_nanosecond_zero(self) -> Self {
        use chrono::Timelike;
        self.with_nanosecond(0).unwrap_or(self)
    }
}

fn info_of(m: &Manifest, manifest: PathBuf, time: DateTime<Utc>) -> BackupInfo {
    BackupInfo {
        id: m.id.clone(),
        resource: m.resource.clone(),
        time,
        manifest,
        inputs: m.inputs.iter().map(|i| i.name.clone()).collect(),
        stats: m.stats.clone(),
        consistency: m.consistency.clone(),
    }
}

fn ser_time<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Secs, true))
}

/// Whether `got` is `e`'s whole-content sha256; a block image may have none recorded (its
/// chunk digests, each checked as read, are the check).
fn whole_digest_matches(e: &FileEntry, got: &str) -> bool {
    match e.sha256.as_deref() {
        Some(want) => want == got,
        None => e.block_size.is_some(),
    }
}

fn feed_zeros(h: &mut Sha256, mut n: u64) {
    static ZEROS: [u8; 65536] = [0; 65536];
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        h.update(&ZEROS[..k]);
        n -= k as u64;
    }
}

pub(super) fn read_manifest(p: &Path) -> Result<Manifest, BackupError> {
    let data = fs::read(p).map_err(BackupError::io("read", p))?;
    let m: Manifest = serde_json::from_slice(&data).map_err(|e| BackupError::Parse {
        path: p.to_path_buf(),
        source: e,
    })?;
    if m.format != FORMAT {
        return Err(BackupError::Invalid(format!(
            "{}: unknown format {:?}",
            p.display(),
            m.format
        )));
    }
    Ok(m)
}

fn read_dir_sorted(d: &Path) -> Result<Vec<PathBuf>, BackupError> {
    let rd = match fs::read_dir(d) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(BackupError::Io {
                op: "read dir",
                path: d.to_path_buf(),
                source: e,
            });
        }
    };
    let mut v = Vec::new();
    for e in rd {
        v.push(e.map_err(BackupError::io("read dir", d))?.path());
    }
    v.sort();
    Ok(v)
}

/// Writes `data` to `path` atomically and durably, mode 0600, creating missing parent
/// directories 0700 (whatever the umask).
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<(), BackupError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    create_private_dir(dir)?;
    stead_host::write_atomic(path, data).map_err(host_err)
}

fn host_err(e: stead_host::HostError) -> BackupError {
    BackupError::Io {
        op: e.op,
        path: e.path,
        source: e.source,
    }
}

fn tree_err(e: stead_host::TreeError) -> BackupError {
    match e {
        stead_host::TreeError::Io(h) => host_err(h),
        mount @ stead_host::TreeError::MountBelow { .. } => BackupError::Invalid(mount.to_string()),
    }
}

/// Creates `dir` and its missing parents with mode 0700.
pub(super) fn create_private_dir(dir: &Path) -> Result<(), BackupError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(BackupError::io("create", dir))
}

/// The other extension's compression flag of chunk file `path` (`.zst` ↔ `.raw`).
fn comp_other(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "raw")
}

/// Chunk-dedup state shared by the workers of one run.
#[derive(Default)]
pub(super) struct RunShared {
    /// Digests a worker has taken on in this run (written once even if seen twice).
    claimed: Mutex<HashSet<[u8; 32]>>,
    /// Directories a chunk was renamed into (fsynced before the manifest is written).
    dirty: Mutex<std::collections::BTreeSet<PathBuf>>,
}

/// Whether `f` (`len` bytes) is exactly one complete zstd frame whose declared content
/// size (when present) is `size`: the frame header and every block header are read, not
/// the data, so the check costs a few small reads.
fn zstd_frame_is_whole(f: &File, len: u64, size: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let read = |at: u64, n: usize| -> Option<Vec<u8>> {
        let mut b = vec![0u8; n];
        f.read_exact_at(&mut b, at).ok().map(|()| b)
    };
    let le = |b: &[u8]| b.iter().rev().fold(0u64, |a, &x| (a << 8) | u64::from(x));
    let Some(h) = read(0, 5) else { return false };
    if le(&h[..4]) != 0xFD2F_B528 {
        return false;
    }
    let fhd = h[4];
    let single = fhd & 0x20 != 0;
    let mut pos = 5 + u64::from(!single) + [0u64, 1, 2, 4][usize::from(fhd & 3)];
    let fcs_len = match fhd >> 6 {
        0 => usize::from(single),
        1 => 2,
        2 => 4,
        _ => 8,
    };
    if fcs_len > 0 {
        let Some(b) = read(pos, fcs_len) else {
            return false;
        };
        let declared = le(&b) + if fcs_len == 2 { 256 } else { 0 };
        if declared != size {
            return false;
        }
        pos += fcs_len as u64;
    }
    // A chunk is at most CHUNK_MAX bytes: 128 KiB blocks, so a few dozen headers.
    for _ in 0..4096 {
        let Some(b) = read(pos, 3) else { return false };
        let bh = le(&b);
        pos += 3 + match (bh >> 1) & 3 {
            0 | 2 => bh >> 3,
            1 => 1,
            _ => return false,
        };
        if pos > len {
            return false;
        }
        if bh & 1 == 1 {
            let checksum = if fhd & 0x04 != 0 { 4 } else { 0 };
            return pos + checksum == len;
        }
    }
    false
}

/// Writes a chunk to `tmp` (mode 0600, fsynced) and renames it to `path`; on any error the
/// temp file is removed, so a full store keeps no partial chunk.
fn write_chunk_file(tmp: &Path, path: &Path, bytes: &[u8]) -> Result<(), BackupError> {
    let r = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(tmp)
            .map_err(BackupError::io("create", tmp))?;
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(BackupError::io("chmod", tmp))?;
        f.write_all(bytes).map_err(BackupError::io("write", tmp))?;
        f.sync_all().map_err(BackupError::io("fsync", tmp))?;
        fs::rename(tmp, path).map_err(BackupError::io("rename", tmp))
    })();
    if r.is_err() {
        let _ = fs::remove_file(tmp);
    }
    r
}

/// Checks what restore and verify trust in a manifest, so a tampered store cannot make them
/// write outside their target or loop: input names are plain names; entry paths are
/// relative, of plain components (no `..`, `.`, empty component, leading `/` or NUL), listed
/// once, each below an earlier directory entry of its input; hard links name an earlier
/// file; digests are 64 hex digits; chunk sizes are within the chunking limits and add up
/// to the file size. The error names the entry.
fn check_manifest(m: &Manifest) -> Result<(), String> {
    let mut inputs = HashSet::new();
    for i in &m.inputs {
        validate_input_name(&i.name).map_err(|e| format!("input {:?}: {e}", i.name))?;
        if !inputs.insert(i.name.as_str()) {
            return Err(format!("input {:?} listed twice", i.name));
        }
    }
    let mut seen: HashMap<(&str, &str), EntryKind> = HashMap::new();
    for f in &m.files {
        let entry = || format!("entry {:?}:{:?}", f.input, f.path);
        if !inputs.contains(f.input.as_str()) {
            return Err(format!("{}: no such input", entry()));
        }
        check_rel_path(&f.path).map_err(|why| format!("{}: {why}", entry()))?;
        if !f.path.is_empty() {
            let parent = f.path.rsplit_once('/').map_or("", |(d, _)| d);
            if seen.get(&(f.input.as_str(), parent)) != Some(&EntryKind::Dir) {
                return Err(format!("{}: not below a directory entry", entry()));
            }
        }
        if seen.insert((&f.input, &f.path), f.kind).is_some() {
            return Err(format!("{}: listed twice", entry()));
        }
        if f.target.as_deref().is_some_and(|t| t.contains('\0')) {
            return Err(format!("{}: symlink target contains NUL", entry()));
        }
        if let Some(first) = &f.link {
            if f.kind != EntryKind::File
                || seen.get(&(f.input.as_str(), first.as_str())) != Some(&EntryKind::File)
            {
                return Err(format!(
                    "{}: hard link to {first:?}, not an earlier file",
                    entry()
                ));
            }
            continue;
        }
        check_chunks(f).map_err(|why| format!("{}: {why}", entry()))?;
    }
    Ok(())
}

/// A manifest path: `""` (the input itself) or plain components joined by `/`.
fn check_rel_path(rel: &str) -> Result<(), String> {
    if rel.contains('\0') {
        return Err("path contains NUL".into());
    }
    if rel.is_empty() {
        return Ok(());
    }
    if rel
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err("path is not relative to its input (leading /, . or .. component)".into());
    }
    Ok(())
}

/// A file's chunk list: sizes in `1..=CHUNK_MAX` adding up to its size, hex digests.
fn check_chunks(f: &FileEntry) -> Result<(), String> {
    let mut total = 0u64;
    for (i, c) in f.chunks.iter().enumerate() {
        if c.size == 0 || c.size > CHUNK_MAX as u64 {
            return Err(format!(
                "chunk {i} has size {} (limits 1..={CHUNK_MAX})",
                c.size
            ));
        }
        let hex_ok = |d: &str| {
            d.len() == 64
                && d.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !c.zero && !c.digest.as_deref().is_some_and(hex_ok) {
            return Err(format!("chunk {i} has no valid digest"));
        }
        total += c.size;
    }
    if f.kind == EntryKind::File && total != f.size {
        return Err(format!(
            "chunks add up to {total} bytes, not its size {}",
            f.size
        ));
    }
    Ok(())
}

fn join_rel(root: &Path, rel: &str) -> Result<PathBuf, BackupError> {
    if rel.is_empty() {
        return Ok(root.to_path_buf());
    }
    let p = Path::new(rel);
    if p.components()
        .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(BackupError::Invalid(format!(
            "unsafe path {rel:?} in manifest"
        )));
    }
    Ok(root.join(p))
}

/// Walks `path` (not following symlinks, not crossing into other file systems), appending
/// entries; `sources[i]` is the file to read for entry `i` (regular files only).
/// What [`walk`] carries through one input: its device, and the first path of each
/// multiply-linked file seen.
struct WalkCtx<'a> {
    input: &'a str,
    dev: u64,
    links: HashMap<(u64, u64), String>,
}

fn walk(
    ctx: &mut WalkCtx<'_>,
    path: &Path,
    rel: &str,
    files: &mut Vec<FileEntry>,
    sources: &mut Vec<Option<PathBuf>>,
) -> Result<(), BackupError> {
    let input = ctx.input;
    // The input itself is followed if it is a symlink (e.g. /dev/vg/lv); entries below are not.
    let top = rel.is_empty();
    let md = if top {
        fs::metadata(path)
    } else {
        fs::symlink_metadata(path)
    }
    .map_err(BackupError::io("stat", path))?;
    let ft = md.file_type();
    // A block device given as an input is a volume: its content is backed up like a file.
    let device_content = top && ft.is_block_device();
    let kind = if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_file() || device_content {
        EntryKind::File
    } else if ft.is_symlink() {
        EntryKind::Symlink
    } else if ft.is_char_device() {
        EntryKind::Char
    } else if ft.is_block_device() {
        EntryKind::Block
    } else if ft.is_fifo() {
        EntryKind::Fifo
    } else {
        debug!(path = %path.display(), "skipping socket");
        return Ok(());
    };
    let target = if kind == EntryKind::Symlink {
        let t = fs::read_link(path).map_err(BackupError::io("readlink", path))?;
        Some(
            t.to_str()
                .ok_or_else(|| {
                    BackupError::Invalid(format!("{}: non-UTF-8 symlink target", path.display()))
                })?
                .to_string(),
        )
    } else {
        None
    };
    // A second name of a multiply-linked regular file is recorded as a link to the first.
    let link = if kind == EntryKind::File && !device_content && md.nlink() > 1 {
        match ctx.links.get(&(md.dev(), md.ino())) {
            Some(first) => Some(first.clone()),
            None => {
                ctx.links.insert((md.dev(), md.ino()), rel.to_string());
                None
            }
        }
    } else {
        None
    };
    let xattrs = if device_content {
        BTreeMap::new()
    } else {
        super::xattrs::read(path)?
    };
    files.push(FileEntry {
        input: input.to_string(),
        path: rel.to_string(),
        kind,
        mode: md.permissions().mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime: md.mtime(),
        mtime_nsec: md.mtime_nsec().clamp(0, 999_999_999) as u32,
        size: if device_content {
            File::open(path)
                .and_then(|mut f| f.seek(SeekFrom::End(0)))
                .map_err(BackupError::io("size of", path))?
        } else if kind == EntryKind::File {
            md.len()
        } else {
            0
        },
        sha256: None,
        target,
        rdev: matches!(kind, EntryKind::Char | EntryKind::Block).then(|| md.rdev()),
        chunks: Vec::new(),
        stamp: (kind == EntryKind::File && !device_content && link.is_none())
            .then(|| Stamp::of(&md)),
        link: link.clone(),
        xattrs,
        block_size: None,
    });
    sources.push((kind == EntryKind::File && link.is_none()).then(|| path.to_path_buf()));
    if kind == EntryKind::Dir {
        if md.dev() != ctx.dev {
            debug!(path = %path.display(), "not crossing into another file system");
            return Ok(());
        }
        for child in read_dir_sorted(path)? {
            let name = child.file_name().and_then(|s| s.to_str()).ok_or_else(|| {
                BackupError::Invalid(format!("{}: non-UTF-8 file name", child.display()))
            })?;
            let crel = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            walk(ctx, &child, &crel, files, sources)?;
        }
    }
    Ok(())
}

fn apply_metadata(e: &FileEntry, at: &Placed) -> Result<(), BackupError> {
    let p = &at.shown;
    // Ownership first (chown clears set-id bits), then mode, then times; never following
    // a symlink at the entry itself.
    let owner = (
        Some(rustix::fs::Uid::from_raw(e.uid)),
        Some(rustix::fs::Gid::from_raw(e.gid)),
    );
    match rustix::fs::chownat(
        &at.dir,
        &at.name,
        owner.0,
        owner.1,
        AtFlags::SYMLINK_NOFOLLOW,
    ) {
        Ok(()) => {}
        Err(rustix::io::Errno::PERM) => {
            debug!(path = %p.display(), "not restoring ownership: not permitted");
        }
        Err(err) => return Err(BackupError::io("chown", p)(err.into())),
    }
    let st = rustix::fs::statat(&at.dir, &at.name, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|err| BackupError::io("stat", p)(err.into()))?;
    let is_link = rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Symlink;
    if !is_link {
        rustix::fs::chmodat(
            &at.dir,
            &at.name,
            Mode::from_bits_truncate(e.mode),
            AtFlags::empty(),
        )
        .map_err(|err| BackupError::io("chmod", p)(err.into()))?;
    }
    // After chown, which clears security.capability; l*xattr calls do not follow the
    // entry, and the parent is reached through its fd.
    let via_fd = stead_host::ProcFs::host()
        .self_fd(at.dir.as_raw_fd())
        .join(&at.name);
    super::xattrs::restore(&via_fd, &e.xattrs)?;
    let t = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: e.mtime,
            tv_nsec: e.mtime_nsec.into(),
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: e.mtime,
            tv_nsec: e.mtime_nsec.into(),
        },
    };
    rustix::fs::utimensat(&at.dir, &at.name, &t, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|err| BackupError::io("utimensat", p)(err.into()))
}

/// Where one input is restored: the directory fd it is created in (`base`), its temp
/// name there (`top`), and that path for messages (`shown`).
struct RestoreRoot<'a> {
    base: &'a OwnedFd,
    top: &'a str,
    shown: &'a Path,
}

/// An entry's place: its parent directory (an fd) and its own name there.
struct Placed {
    dir: OwnedFd,
    name: String,
    shown: PathBuf,
}

impl RestoreRoot<'_> {
    /// Opens the parent of `rel` (a path of entry `e`'s input) beneath the restore root,
    /// following no symlink and never leaving the root. A parent that is a symlink, or a
    /// path that would leave the root, is a corrupt backup.
    fn place(&self, e: &FileEntry, rel: &str) -> Result<Placed, BackupError> {
        let shown = join_rel(self.shown, rel)?;
        let (parent, name) = match rel.rsplit_once('/') {
            _ if rel.is_empty() => (".".to_string(), self.top),
            Some((dir, name)) => (format!("{}/{dir}", self.top), name),
            None => (self.top.to_string(), rel),
        };
        let dir = rustix::fs::openat2(
            self.base,
            parent.as_str(),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )
        .map_err(|err| match err {
            rustix::io::Errno::LOOP | rustix::io::Errno::XDEV | rustix::io::Errno::NOTDIR => {
                BackupError::Integrity(format!(
                    "corrupt backup: entry {}:{rel}: its parent is not a directory of the \
                     backup (a symlink, or outside the target)",
                    e.input
                ))
            }
            other => BackupError::io("open", shown.clone())(other.into()),
        })?;
        Ok(Placed {
            dir,
            name: name.to_string(),
            shown,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_lock_is_shared_for_readers_and_exclusive_for_writers() {
        let t = tempfile::tempdir().expect("tmp");
        let store = BackupStore::for_pool(t.path());
        let other = || File::open(store.root().join(LOCK_FILE)).expect("open lock file");
        let reader = store.lock(true).expect("shared");
        assert!(store.lock(true).is_ok(), "readers share the lock");
        assert!(matches!(
            other().try_lock(),
            Err(fs::TryLockError::WouldBlock)
        ));
        drop(reader);
        let writer = store.lock(false).expect("exclusive");
        assert!(matches!(
            other().try_lock_shared(),
            Err(fs::TryLockError::WouldBlock)
        ));
        drop(writer);
        assert!(
            other().try_lock().is_ok(),
            "released when the guard is closed"
        );
    }

    fn entry(path: &str, kind: EntryKind) -> FileEntry {
        FileEntry {
            input: "rootfs".into(),
            path: path.into(),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            size: 0,
            sha256: Some(hex32(&Sha256::digest(b""))),
            target: None,
            rdev: None,
            chunks: Vec::new(),
            stamp: None,
            link: None,
            xattrs: BTreeMap::new(),
            block_size: None,
        }
    }

    fn stamped(ctime: i64) -> FileEntry {
        let mut f = entry("f", EntryKind::File);
        f.stamp = Some(Stamp {
            ino: 1,
            ctime,
            ctime_nsec: 0,
        });
        f
    }

    #[test]
    fn stamps_younger_than_the_racy_window_are_dropped() {
        let now = DateTime::from_timestamp(1_000, 0).expect("time");
        let mut files = vec![stamped(997), stamped(998), stamped(1_000)];
        clear_racy_stamps(&mut files, now, 2);
        let kept: Vec<bool> = files.iter().map(|f| f.stamp.is_some()).collect();
        assert_eq!(kept, [true, false, false]);
        let mut files = vec![stamped(1_000)];
        clear_racy_stamps(&mut files, now, -1);
        assert!(
            files[0].stamp.is_some(),
            "a window in the past keeps every stamp"
        );
    }

    #[test]
    fn content_counts_each_hard_linked_file_once() {
        let mut a = entry("a", EntryKind::File);
        a.size = 10;
        let mut b = entry("b", EntryKind::File);
        b.size = 10;
        b.link = Some("a".into());
        let mut d = entry("d", EntryKind::Dir);
        d.size = 4096;
        assert_eq!(content_bytes(&[a, b, d]), 10);
    }

    #[test]
    fn input_names_are_checked_and_unique() {
        let i = |n: &str| (n.to_string(), PathBuf::from("/x"));
        assert!(check_input_names(&[i("disk"), i("rootfs")]).is_ok());
        let e = check_input_names(&[i("disk"), i("disk")]);
        assert!(
            matches!(&e, Err(BackupError::Invalid(m)) if m.contains("given twice")),
            "{e:?}"
        );
        assert!(check_input_names(&[i("../x")]).is_err());
    }

    #[test]
    fn workers_are_between_one_and_sixteen() {
        assert_eq!(worker_count(Some(0)), 1);
        assert_eq!(worker_count(Some(4)), 4);
        assert_eq!(worker_count(Some(64)), 16);
        assert!((1..=16).contains(&worker_count(None)));
    }

    #[test]
    fn stored_chunks_land_at_their_index_and_are_counted() {
        let mut files = vec![entry("f", EntryKind::File)];
        let mut stats = Stats::default();
        let chunk = |size: u64, zero: bool| ChunkRef {
            digest: (!zero).then(|| "ab".repeat(32)),
            size,
            zero,
        };
        let done = |index: usize, c: ChunkRef, new: bool| Done {
            file: 0,
            index,
            chunk: c,
            new,
            stored: if new { 5 } else { 0 },
        };
        place_done_chunk(&mut files, done(1, chunk(8, false), true), &mut stats);
        place_done_chunk(&mut files, done(0, chunk(4, true), false), &mut stats);
        assert_eq!(files[0].chunks, vec![chunk(4, true), chunk(8, false)]);
        assert_eq!(
            (
                stats.chunks,
                stats.zero_bytes,
                stats.new_chunks,
                stats.new_bytes
            ),
            (1, 4, 1, 8)
        );
        assert_eq!(stats.stored_bytes, 5);
    }

    #[test]
    fn restore_never_follows_a_restored_symlink_even_past_the_manifest_check() {
        let tmp = tempfile::tempdir().expect("tmp");
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).expect("mkdir");
        let to = tmp.path().join("to");
        fs::create_dir(&to).expect("mkdir");
        let mut link = entry("a", EntryKind::Symlink);
        link.target = Some(outside.display().to_string());
        let entries = [
            entry("", EntryKind::Dir),
            link,
            entry("a/victim", EntryKind::File),
        ];
        let refs: Vec<&FileEntry> = entries.iter().collect();
        let base =
            rustix::fs::open(&to, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).expect("open");
        let root = RestoreRoot {
            base: &base,
            top: "t",
            shown: &to.join("t"),
        };
        let store = BackupStore::for_pool(tmp.path());
        let e = store
            .restore_entries(&refs, &root, &mut 0)
            .expect_err("must not follow a");
        assert!(e.to_string().contains("a/victim"), "{e}");
        assert_eq!(fs::read_dir(&outside).expect("ls").count(), 0);
    }
}
