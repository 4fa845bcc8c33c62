//! Disk images backed up block by block, so a re-backup reads only what changed.
//!
//! A VM disk is cut into fixed [`IMAGE_BLOCK`]s (4 MiB, one chunk each, the last one
//! shorter) rather than content-defined chunks. What to read is described by
//! [`Extent`]s, as `qemu-img map --output=json` prints them for the image QEMU's backup
//! job wrote: `present` extents hold the point-in-time content (data at `offset` in that
//! file, or zeros); absent ones are
//! - for a full backup: zeros (never written, so never read);
//! - for an incremental one: clean blocks, whose chunks are taken over from the previous
//!   backup ([`ImageInput::base`]) without reading anything.
//!
//! A block partly present (a dirty-bitmap granularity finer than the block) is the previous
//! backup's block with the present parts laid over it. The result is an ordinary manifest:
//! dedup, verify, retention and restore work as for any file. Such entries carry
//! `blockSize` and no whole-file sha256 (it would need the whole disk read); their chunk
//! digests check them.

use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Sender, SyncSender, channel, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::Utc;
use serde::{Deserialize, Serialize};
use tracing::{info, info_span};

use super::BackupError;
use super::store::{
    BackupInfo, BackupOptions, BackupStore, ChunkRef, Done, EntryKind, FileEntry, InputEntry, Job,
    RunShared, Stats, create_private_dir, is_zero, place_done_chunk, read_manifest,
    validate_input_name, validate_resource, worker_count, write_atomic,
};

/// Block size of disk images in the store (the chunk size of clean-block reuse).
pub const IMAGE_BLOCK: u64 = 4 << 20;

/// One extent of an image, as `qemu-img map --output=json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Written in this image (else it reads from nowhere: unallocated).
    #[serde(default = "yes")]
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Holds data at `offset` in the image file.
    pub data: bool,
    /// Host offset of the data in the image file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

fn yes() -> bool {
    true
}

/// Parses `qemu-img map --output=json` output.
pub fn parse_map(json: &[u8]) -> Result<Vec<Extent>, BackupError> {
    let mut v: Vec<Extent> = serde_json::from_slice(json)
        .map_err(|e| BackupError::Invalid(format!("qemu-img map output: {e}")))?;
    v.sort_by_key(|e| e.start);
    Ok(v)
}

/// One disk image to back up.
#[derive(Debug, Clone)]
pub struct ImageInput {
    /// Input name (the volume name).
    pub name: String,
    /// The image it stands for (recorded as the input's source).
    pub source: PathBuf,
    /// Virtual size in bytes.
    pub size: u64,
    /// The file `extents` describe (e.g. the backup job's temporary qcow2 target).
    pub read_from: PathBuf,
    /// What `read_from` holds, sorted by `start`.
    pub extents: Vec<Extent>,
    /// The previous backup's chunks of this image, one per block: absent extents take
    /// them over. `None`: absent extents are zeros (a full backup).
    pub base: Option<Vec<ChunkRef>>,
    /// The image's metadata (mode, owner, mtime recorded); `None` records 0600 root.
    pub meta: Option<fs::Metadata>,
}

impl ImageInput {
    /// A raw file read whole (e.g. a UEFI NVRAM vars file).
    pub fn raw_file(name: &str, path: &Path) -> Result<Self, BackupError> {
        let md = fs::metadata(path).map_err(BackupError::io("stat", path))?;
        Ok(ImageInput {
            name: name.into(),
            source: path.into(),
            size: md.len(),
            read_from: path.into(),
            extents: vec![Extent {
                start: 0,
                length: md.len(),
                present: true,
                zero: false,
                data: true,
                offset: Some(0),
            }],
            base: None,
            meta: Some(md),
        })
    }
}

/// The previous backup's blocks of one image, for an incremental backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    /// Its backup id.
    pub id: String,
    /// One chunk per block.
    pub chunks: Vec<ChunkRef>,
}

/// Which backup a disk's dirty bitmap counts changes since (kept in the store, beside the
/// manifests): a bitmap only drives an incremental backup when this names the newest
/// backup of the resource and the image is the same file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BitmapRecord {
    /// The backup id the bitmap was cleared for.
    pub backup: String,
    /// The image path.
    pub image: PathBuf,
    /// Its device number.
    pub dev: u64,
    /// Its inode number.
    pub ino: u64,
}

/// Number of blocks of an image of `size` bytes.
pub fn block_count(size: u64) -> usize {
    size.div_ceil(IMAGE_BLOCK) as usize
}

/// `chunks` is one chunk per block of an image of `size` bytes.
fn fits_blocks(chunks: &[ChunkRef], size: u64) -> bool {
    chunks.len() == block_count(size)
        && chunks.iter().enumerate().all(|(i, c)| {
            let start = i as u64 * IMAGE_BLOCK;
            c.size == IMAGE_BLOCK.min(size - start)
        })
}

/// A part of a block with content in the image read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
    /// `len` bytes at `at` in the block come from `offset` in the file.
    Data { at: usize, len: usize, offset: u64 },
    /// `len` bytes at `at` are zeros.
    Zero { at: usize, len: usize },
}

/// The present parts of block `[start, end)` and how many bytes they cover.
fn block_pieces(extents: &[Extent], start: u64, end: u64) -> (Vec<Piece>, u64) {
    let first = extents.partition_point(|e| e.start + e.length <= start);
    let mut pieces = Vec::new();
    let mut covered = 0;
    for e in extents[first..].iter().take_while(|e| e.start < end) {
        if !e.present {
            continue;
        }
        let s = e.start.max(start);
        let t = (e.start + e.length).min(end);
        if s >= t {
            continue;
        }
        let at = (s - start) as usize;
        let len = (t - s) as usize;
        covered += t - s;
        match (e.data, e.offset) {
            (true, Some(o)) => pieces.push(Piece::Data {
                at,
                len,
                offset: o + (s - e.start),
            }),
            _ => pieces.push(Piece::Zero { at, len }),
        }
    }
    (pieces, covered)
}

/// What one block of the new backup is.
enum BlockOut {
    /// The previous backup's chunk (a clean block).
    Reuse(ChunkRef),
    /// All zeros, nothing read.
    Zero(u64),
    /// Content to store.
    Data(Vec<u8>),
}

impl BackupStore {
    /// The previous backup of `resource`'s image `input` if it can be the base of an
    /// incremental backup of an image of `size` bytes (its newest backup, block-wise, same
    /// size, every chunk still in the store); otherwise why not.
    pub fn image_base(&self, resource: &str, input: &str, size: u64) -> Result<Base, String> {
        let newest = self
            .manifest_paths(Some(resource))
            .ok()
            .and_then(|p| p.last().cloned())
            .ok_or("no previous backup")?;
        let m = read_manifest(&newest).map_err(|e| format!("previous backup unreadable: {e}"))?;
        let f = m
            .files
            .iter()
            .find(|f| f.input == input && f.path.is_empty() && f.kind == EntryKind::File)
            .ok_or_else(|| format!("{input} is not in the previous backup"))?;
        if f.block_size != Some(IMAGE_BLOCK) || !fits_blocks(&f.chunks, f.size) {
            return Err(format!("{input} was not backed up block-wise last time"));
        }
        if f.size != size {
            return Err(format!("{input} changed size ({} → {size})", f.size));
        }
        let missing = f.chunks.iter().any(|c| match &c.digest {
            Some(d) => self.valid_chunk(d, c.size).is_none(),
            None => !c.zero,
        });
        if missing {
            return Err("a chunk of the previous backup is gone".into());
        }
        Ok(Base {
            id: m.id,
            chunks: f.chunks.clone(),
        })
    }

    fn bitmap_record_path(&self, resource: &str, input: &str) -> Result<PathBuf, BackupError> {
        let (k, n) = validate_resource(resource)?;
        validate_input_name(input)?;
        Ok(self
            .root()
            .join(".bitmaps")
            .join(k)
            .join(n)
            .join(format!("{input}.json")))
    }

    /// The [`BitmapRecord`] of `resource`'s image `input`, if any.
    pub fn bitmap_record(&self, resource: &str, input: &str) -> Option<BitmapRecord> {
        let p = self.bitmap_record_path(resource, input).ok()?;
        serde_json::from_slice(&fs::read(p).ok()?).ok()
    }

    /// Records which backup `resource`'s image `input`'s bitmap now counts from.
    pub fn save_bitmap_record(
        &self,
        resource: &str,
        input: &str,
        rec: &BitmapRecord,
    ) -> Result<(), BackupError> {
        let p = self.bitmap_record_path(resource, input)?;
        let json = serde_json::to_vec_pretty(rec).map_err(|e| BackupError::Parse {
            path: p.clone(),
            source: e,
        })?;
        write_atomic(&p, &json)
    }

    /// Backs up disk images block-wise (see the module documentation) as one backup of
    /// `resource`.
    pub fn backup_images(
        &self,
        resource: &str,
        spec: &serde_json::Value,
        inputs: &[ImageInput],
        opts: &BackupOptions,
    ) -> Result<BackupInfo, BackupError> {
        validate_resource(resource)?;
        let _span = info_span!("backup_images", resource = resource).entered();
        let started = Instant::now();
        check_images(inputs)?;
        let _lock = self.lock(true)?;
        let mut files: Vec<FileEntry> = inputs.iter().map(entry_of).collect();
        let stats = self.chunk_images(&mut files, inputs, opts)?;
        let inputs = inputs
            .iter()
            .map(|i| InputEntry {
                name: i.name.clone(),
                kind: EntryKind::File,
                source: i.source.display().to_string(),
            })
            .collect();
        self.commit_snapshot(resource, spec, opts, started, inputs, files, stats)
    }

    /// Reads the blocks of every image on this thread while workers hash, compress and
    /// store them; fills in the chunk lists and returns the counts.
    fn chunk_images(
        &self,
        files: &mut [FileEntry],
        inputs: &[ImageInput],
        opts: &BackupOptions,
    ) -> Result<Stats, BackupError> {
        let threads = worker_count(opts.threads);
        let (job_tx, job_rx) = sync_channel::<Job>(threads * 2);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (done_tx, done_rx) = channel::<Result<Done, BackupError>>();
        let shared = RunShared::default();
        let abort = AtomicBool::new(false);
        let mut stats = Stats {
            read_bytes: Some(0),
            ..Stats::default()
        };
        opts.progress
            .set_length(inputs.iter().map(|i| i.size).sum::<u64>());
        let read = std::thread::scope(|s| {
            for t in 0..threads {
                let job_rx = Arc::clone(&job_rx);
                let done_tx: Sender<_> = done_tx.clone();
                let (shared, abort) = (&shared, &abort);
                let level = opts.zstd_level;
                s.spawn(move || self.worker(t, level, &job_rx, &done_tx, shared, abort));
            }
            drop(done_tx);
            drop(job_rx);
            let r = self.read_images(files, inputs, &job_tx, &abort, &mut stats, opts);
            drop(job_tx);
            r
        });
        read?;
        for d in done_rx.iter() {
            place_done_chunk(files, d?, &mut stats);
        }
        opts.progress.finish();
        self.sync_dirty_dirs(shared)?;
        Ok(stats)
    }

    fn read_images(
        &self,
        files: &mut [FileEntry],
        inputs: &[ImageInput],
        job_tx: &SyncSender<Job>,
        abort: &AtomicBool,
        stats: &mut Stats,
        opts: &BackupOptions,
    ) -> Result<(), BackupError> {
        let mut dec =
            zstd::bulk::Decompressor::new().map_err(BackupError::io("zstd init", self.root()))?;
        for (fi, input) in inputs.iter().enumerate() {
            let f =
                File::open(&input.read_from).map_err(BackupError::io("open", &input.read_from))?;
            let n = block_count(input.size);
            files[fi].chunks = vec![
                ChunkRef {
                    digest: None,
                    size: 0,
                    zero: true,
                };
                n
            ];
            for b in 0..n {
                if abort.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let out = self.read_block(input, &f, b, &mut dec, stats)?;
                let len = IMAGE_BLOCK.min(input.size - b as u64 * IMAGE_BLOCK);
                stats.bytes += len;
                opts.progress.inc(len);
                let data = match out {
                    BlockOut::Reuse(c) => {
                        stats.reused_bytes += len;
                        if c.zero {
                            stats.zero_bytes += len;
                        } else {
                            stats.chunks += 1;
                        }
                        files[fi].chunks[b] = c;
                        continue;
                    }
                    BlockOut::Zero(len) => {
                        stats.zero_bytes += len;
                        files[fi].chunks[b] = ChunkRef {
                            digest: None,
                            size: len,
                            zero: true,
                        };
                        continue;
                    }
                    BlockOut::Data(d) => d,
                };
                let job = Job {
                    file: fi,
                    index: b,
                    data: Arc::new(data),
                    zero_len: 0,
                };
                if job_tx.send(job).is_err() {
                    // The workers are gone: one reported an error.
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Block `b` of `input`: taken over, zeros, or read (over the base's block when the
    /// image read covers it only in part).
    fn read_block(
        &self,
        input: &ImageInput,
        f: &File,
        b: usize,
        dec: &mut zstd::bulk::Decompressor<'static>,
        stats: &mut Stats,
    ) -> Result<BlockOut, BackupError> {
        let start = b as u64 * IMAGE_BLOCK;
        let end = (start + IMAGE_BLOCK).min(input.size);
        let len = end - start;
        let (pieces, covered) = block_pieces(&input.extents, start, end);
        let base = input.base.as_ref().and_then(|c| c.get(b));
        let no_data = pieces.iter().all(|p| matches!(p, Piece::Zero { .. }));
        let rest_zero = covered == len || base.is_none_or(|c| c.zero);
        if !pieces.is_empty() && no_data && rest_zero {
            return Ok(BlockOut::Zero(len));
        }
        if pieces.is_empty() {
            return Ok(match base {
                Some(c) => BlockOut::Reuse(c.clone()),
                None => BlockOut::Zero(len),
            });
        }
        let mut buf = match base {
            Some(c) if covered < len && !c.zero => {
                let digest = c.digest.as_deref().unwrap_or_default();
                self.read_chunk(digest, c.size, dec).map_err(|k| {
                    BackupError::Integrity(format!(
                        "{}: block {b} of the previous backup ({digest}): {k:?}",
                        input.name
                    ))
                })?
            }
            _ => vec![0u8; len as usize],
        };
        let mut read = 0u64;
        for p in pieces {
            match p {
                Piece::Data { at, len, offset } => {
                    f.read_exact_at(&mut buf[at..at + len], offset)
                        .map_err(BackupError::io("read", &input.read_from))?;
                    read += len as u64;
                }
                Piece::Zero { at, len } => buf[at..at + len].fill(0),
            }
        }
        if let Some(r) = stats.read_bytes.as_mut() {
            *r += read;
        }
        Ok(if is_zero(&buf) {
            BlockOut::Zero(len)
        } else {
            BlockOut::Data(buf)
        })
    }

    /// Restores image `input` of backup `id` to the new file `dest` (raw; holes for zero
    /// chunks), checked chunk by chunk; returns the bytes written.
    pub fn restore_image(&self, id: &str, input: &str, dest: &Path) -> Result<u64, BackupError> {
        let m = self.manifest(id)?;
        let _span = info_span!("restore_image", id = id, input = input).entered();
        let e = m
            .files
            .iter()
            .find(|f| f.input == input && f.path.is_empty() && f.kind == EntryKind::File)
            .ok_or_else(|| BackupError::Invalid(format!("backup {id} has no image {input}")))?;
        if fs::symlink_metadata(dest).is_ok() {
            return Err(BackupError::Invalid(format!(
                "{} exists; refusing to overwrite",
                dest.display()
            )));
        }
        let dir = dest.parent().unwrap_or(Path::new("."));
        create_private_dir(dir)?;
        let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("image");
        let tmp = dir.join(format!(".{name}.restore-{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        let out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(BackupError::io("create", &tmp))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))
            .map_err(BackupError::io("chmod", &tmp))?;
        let r = self.restore_file(e, out, &tmp).and_then(|n| {
            fs::rename(&tmp, dest)
                .map(|()| n)
                .map_err(BackupError::io("rename", &tmp))
        });
        if r.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        let n = r?;
        info!(to = %dest.display(), bytes = n, "image restored");
        Ok(n)
    }
}

/// Refuses bad or repeated input names and extents that do not fit the image.
fn check_images(inputs: &[ImageInput]) -> Result<(), BackupError> {
    let mut seen = std::collections::HashSet::new();
    for i in inputs {
        validate_input_name(&i.name)?;
        if !seen.insert(i.name.as_str()) {
            return Err(BackupError::Invalid(format!(
                "input name {:?} given twice",
                i.name
            )));
        }
        if let Some(b) = &i.base
            && !fits_blocks(b, i.size)
        {
            return Err(BackupError::Invalid(format!(
                "{}: the base backup's blocks do not fit an image of {} bytes",
                i.name, i.size
            )));
        }
        if i.extents.iter().any(|e| e.start + e.length > i.size) {
            return Err(BackupError::Invalid(format!(
                "{}: an extent ends past the image's {} bytes",
                i.name, i.size
            )));
        }
    }
    Ok(())
}

/// The manifest entry of an image (chunks filled in as read).
fn entry_of(i: &ImageInput) -> FileEntry {
    let (mode, uid, gid, mtime, mtime_nsec) = match &i.meta {
        Some(md) => (
            md.permissions().mode() & 0o7777,
            md.uid(),
            md.gid(),
            md.mtime(),
            md.mtime_nsec().clamp(0, 999_999_999) as u32,
        ),
        None => (0o600, 0, 0, Utc::now().timestamp(), 0),
    };
    FileEntry {
        input: i.name.clone(),
        path: String::new(),
        kind: EntryKind::File,
        mode,
        uid,
        gid,
        mtime,
        mtime_nsec,
        size: i.size,
        sha256: None,
        target: None,
        rdev: None,
        chunks: Vec::new(),
        stamp: None,
        link: None,
        xattrs: Default::default(),
        block_size: Some(IMAGE_BLOCK),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(start: u64, length: u64, present: bool, data: bool, offset: Option<u64>) -> Extent {
        Extent {
            start,
            length,
            present,
            zero: !data,
            data,
            offset,
        }
    }

    #[test]
    fn qemu_img_map_output_parses_sorted() {
        let json = br#"[{ "start": 4194304, "length": 16777216, "depth": 0, "present": false, "zero": true, "data": false},
            { "start": 0, "length": 1048576, "depth": 0, "present": true, "zero": false, "data": true, "offset": 327680}]"#;
        let v = parse_map(json).expect("parse");
        assert_eq!(v[0], ext(0, 1 << 20, true, true, Some(327_680)));
        assert!(!v[1].present);
    }

    #[test]
    fn a_block_takes_the_present_parts_of_the_extents_it_overlaps() {
        const M: u64 = 1 << 20;
        let extents = vec![
            ext(0, M, true, false, None),
            ext(M, 5 * M, true, true, Some(100)),
            ext(6 * M, 2 * M, false, false, None),
        ];
        let (p, covered) = block_pieces(&extents, 0, 4 * M);
        assert_eq!(covered, 4 * M);
        assert_eq!(
            p,
            vec![
                Piece::Zero {
                    at: 0,
                    len: M as usize
                },
                Piece::Data {
                    at: M as usize,
                    len: 3 * M as usize,
                    offset: 100
                }
            ]
        );
        let (p, covered) = block_pieces(&extents, 4 * M, 8 * M);
        assert_eq!(covered, 2 * M);
        assert_eq!(
            p,
            vec![Piece::Data {
                at: 0,
                len: 2 * M as usize,
                offset: 100 + 3 * M
            }]
        );
        assert_eq!(block_pieces(&extents, 8 * M, 9 * M), (Vec::new(), 0));
    }

    #[test]
    fn base_chunks_must_be_one_per_block() {
        let c = |size| ChunkRef {
            digest: None,
            size,
            zero: true,
        };
        let size = 2 * IMAGE_BLOCK + 512;
        assert_eq!(block_count(size), 3);
        assert!(fits_blocks(&[c(IMAGE_BLOCK), c(IMAGE_BLOCK), c(512)], size));
        assert!(!fits_blocks(&[c(IMAGE_BLOCK), c(IMAGE_BLOCK + 512)], size));
        assert!(!fits_blocks(&vec![c(IMAGE_BLOCK); 3], size));
    }

    fn image(dir: &Path, name: &str, bytes: &[(u64, u8, u64)], size: u64) -> PathBuf {
        let p = dir.join(name);
        let f = File::create(&p).expect("create");
        f.set_len(size).expect("size");
        for &(at, v, len) in bytes {
            f.write_all_at(&vec![v; len as usize], at).expect("write");
        }
        p
    }

    #[test]
    fn an_incremental_image_backup_reads_only_present_extents_and_restores_whole() {
        let t = tempfile::tempdir().expect("tmp");
        let store = BackupStore::for_pool(&t.path().join("pool"));
        let opts = BackupOptions {
            racy_secs: 0,
            ..BackupOptions::default()
        };
        let size = 3 * IMAGE_BLOCK + 4096;
        let live = image(t.path(), "live", &[(0, 0xab, 5 << 20)], size);
        let full = ImageInput::raw_file("disk0", &live).expect("raw");
        let first = store
            .backup_images("VirtualMachine/vm", &serde_json::json!({}), &[full], &opts)
            .expect("full backup");
        assert_eq!(first.stats.read_bytes, Some(size));
        // 1 MiB changed at 9 MiB; the "job target" holds just it, in a file of its own.
        let delta = image(t.path(), "delta", &[(0, 0xcd, 1 << 20)], 1 << 20);
        let base = store
            .image_base("VirtualMachine/vm", "disk0", size)
            .expect("base");
        assert_eq!(base.id, first.id);
        let inc = ImageInput {
            name: "disk0".into(),
            source: live.clone(),
            size,
            read_from: delta,
            extents: vec![ext(9 << 20, 1 << 20, true, true, Some(0))],
            base: Some(base.chunks),
            meta: None,
        };
        let second = store
            .backup_images("VirtualMachine/vm", &serde_json::json!({}), &[inc], &opts)
            .expect("incremental");
        assert_eq!(second.stats.read_bytes, Some(1 << 20));
        assert_eq!(second.stats.reused_bytes, size - IMAGE_BLOCK);
        File::options()
            .write(true)
            .open(&live)
            .expect("open")
            .write_all_at(&[0xcd; 1 << 20], 9 << 20)
            .expect("write live");
        let out = t.path().join("restored");
        store
            .restore_image(&second.id, "disk0", &out)
            .expect("restore");
        assert_eq!(
            fs::read(&out).expect("read"),
            fs::read(&live).expect("read")
        );
        assert!(store.verify(&second.id).expect("verify").ok());
    }

    #[test]
    fn a_bitmap_record_round_trips() {
        let t = tempfile::tempdir().expect("tmp");
        let store = BackupStore::for_pool(t.path());
        let rec = BitmapRecord {
            backup: "VirtualMachine/vm/2026-01-01T00:00:00Z".into(),
            image: "/p/vm.qcow2".into(),
            dev: 1,
            ino: 2,
        };
        assert_eq!(store.bitmap_record("VirtualMachine/vm", "disk0"), None);
        store
            .save_bitmap_record("VirtualMachine/vm", "disk0", &rec)
            .expect("save");
        assert_eq!(store.bitmap_record("VirtualMachine/vm", "disk0"), Some(rec));
        assert!(store.list(None).expect("list").is_empty());
    }
}
