//! Replication between two btrfs pools on loop devices, as two "nodes" joined by a socket
//! pair (root needed): full send, incremental send of 10 MiB changed on a 1 GiB volume,
//! pruning, a transfer cut short, promotion of the replica. Prints the figures.

mod storage_util;

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use stead_drivers::storage::replicate::{
    self, BtrfsReplication, ReplicationBackend, SendReport, ZfsReplication,
};
use stead_drivers::storage::{self, btrfs, replicate_tls};
use stead_reconciler::driver::DriverError;
use storage_util::*;

const VOLUME: &str = "vm1";
const GIB: u64 = 1 << 30;
/// The sender's fencing token in these tests.
const TOKEN: i64 = 5;

/// Fills `len` bytes at `offset` with a pattern seeded by `seed` (not compressible, not zero).
fn write_pattern(path: &Path, offset: u64, len: u64, seed: u64) {
    let f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open disk");
    let mut x = seed | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < len {
        for b in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        let n = (len - done).min(buf.len() as u64) as usize;
        f.write_all_at(&buf[..n], offset + done)
            .expect("write disk");
        done += n as u64;
    }
    f.sync_all().expect("sync disk");
}

fn sha(path: &Path) -> String {
    let out = run_cmd("sha256sum", &[&path.to_string_lossy()]).expect("sha256sum");
    out.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Runs one transfer from `from` to `to` over a socket pair (the receiver on a thread).
fn transfer(
    from: &BtrfsReplication,
    to: &BtrfsReplication,
    token: i64,
    cut_after: Option<u64>,
) -> (
    Result<SendReport, DriverError>,
    Result<(String, replicate::ReplicaInfo), DriverError>,
) {
    let (a, b) = UnixStream::pair().expect("socket pair");
    let to = to.clone();
    let receiver = std::thread::spawn(move || {
        let mut b = b;
        replicate::receive_volume(&resolver(to), &mut b)
    });
    let sent = {
        let mut a = Cut {
            inner: a,
            left: cut_after.unwrap_or(u64::MAX),
        };
        let sent = replicate::send_volume(from, VOLUME, token, &mut a);
        // Closing the sender's end is what a broken link looks like to the receiver.
        let _ = a.inner.shutdown(std::net::Shutdown::Both);
        sent
    };
    let received = receiver.join().expect("receiver thread");
    (sent, received)
}

/// Both ends of a transfer that must succeed; a failure names both sides (a send cut short
/// by the receiver only says SIGPIPE: the receiver's error says why).
fn both_ok(
    (sent, received): (
        Result<SendReport, DriverError>,
        Result<(String, replicate::ReplicaInfo), DriverError>,
    ),
    what: &str,
) -> (SendReport, (String, replicate::ReplicaInfo)) {
    match (sent, received) {
        (Ok(s), Ok(r)) => (s, r),
        (s, r) => panic!("{what}: send {s:?}; receive {r:?}"),
    }
}

/// Replicas of [`VOLUME`] only, into `to`.
fn resolver(to: BtrfsReplication) -> impl Fn(&str) -> Option<Box<dyn ReplicationBackend>> {
    move |v: &str| (v == VOLUME).then(|| Box::new(to.clone()) as Box<dyn ReplicationBackend>)
}

/// A transport that breaks after `left` bytes written.
struct Cut {
    inner: UnixStream,
    left: u64,
}

impl Write for Cut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let n = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.write(&buf[..n])?;
        self.left -= n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl Read for Cut {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

struct Node {
    _fs: LoopBtrfs,
    pool: PathBuf,
    repl: BtrfsReplication,
}

fn node() -> Result<Node, String> {
    let fs = LoopBtrfs::with_size(3 * GIB)?;
    let pool = fs.mnt.join("pool");
    fs::create_dir_all(pool.join("images")).map_err(|e| e.to_string())?;
    let repl = BtrfsReplication::new(&pool);
    Ok(Node {
        _fs: fs,
        pool,
        repl,
    })
}

fn subvolumes(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| btrfs::is_subvolume(&e.path()).unwrap_or(false))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The two nodes of `test`, or `None` (printed as a skip) without btrfs-progs or a loop
/// file system.
fn two_nodes(test: &str) -> Option<(Node, Node)> {
    if run_cmd("btrfs", &["--version"]).is_err() {
        eprintln!("SKIP {test}: btrfs-progs missing");
        return None;
    }
    match (node(), node()) {
        (Ok(a), Ok(b)) => Some((a, b)),
        (Err(why), _) | (_, Err(why)) => {
            eprintln!("SKIP {test}: {why}");
            None
        }
    }
}

/// Creates [`VOLUME`] on `n`: a sparse disk of `size` bytes whose first `data` bytes hold
/// pattern `seed`. Returns the disk's path.
fn source_disk(n: &Node, size: u64, data: u64, seed: u64) -> PathBuf {
    let images = n.pool.join("images");
    btrfs::subvol_create(&images, VOLUME).expect("subvolume");
    let disk = images.join(VOLUME).join("disk.raw");
    fs::File::create(&disk)
        .and_then(|f| f.set_len(size))
        .expect("disk");
    write_pattern(&disk, 0, data, seed);
    disk
}

/// The disk of replica `seq` of [`VOLUME`] on `n`.
fn replica_disk(n: &Node, seq: u64) -> PathBuf {
    n.pool
        .join("replicas")
        .join(VOLUME)
        .join(replicate::snapshot_name(seq))
        .join("disk.raw")
}

/// The newest complete replica of [`VOLUME`] on `n`.
fn latest_replica(n: &Node) -> Option<u64> {
    n.repl
        .replicas(VOLUME)
        .expect("replicas")
        .last()
        .map(|r| r.seq)
}

#[test]
fn storage_replicate_btrfs_incremental_cut_and_promote() {
    let Some((a, b)) = two_nodes("storage_replicate_btrfs_incremental_cut_and_promote") else {
        return;
    };
    // A 1 GiB volume (sparse) with 256 MiB of data.
    let disk = source_disk(&a, GIB, 256 << 20, 1);
    let owner = fs::File::open(&disk).expect("open disk");
    stead_host::xattr::set_on(&owner, storage::OWNER_XATTR, b"Volume/vm1").expect("mark");

    // Full send.
    let (full, _) = both_ok(transfer(&a.repl, &b.repl, TOKEN, None), "full");
    assert_eq!(full.parent, None);
    assert_eq!(full.point.seq, 1);
    let replica = |seq: u64| replica_disk(&b, seq);
    assert_eq!(sha(&replica(1)), sha(&disk));

    // 10 MiB more, incremental send.
    write_pattern(&disk, 600 << 20, 10 << 20, 2);
    let (inc, _) = both_ok(transfer(&a.repl, &b.repl, TOKEN, None), "incremental");
    assert_eq!(inc.parent, Some(1));
    assert_eq!(inc.point.seq, 2);
    let point2 = sha(&disk);
    assert_eq!(sha(&replica(2)), point2);
    assert!(
        (10 << 20..12 << 20).contains(&inc.bytes),
        "incremental of 10 MiB sent {} bytes",
        inc.bytes
    );
    // Exactly the last common point on both sides.
    assert_eq!(
        subvolumes(&a.pool.join("replication").join(VOLUME)),
        ["stead-repl-2"]
    );
    assert_eq!(
        subvolumes(&b.pool.join("replicas").join(VOLUME)),
        ["stead-repl-2"]
    );
    println!(
        "FIGURE replication full send: 256 MiB written on a 1 GiB volume: {} bytes in {} ms",
        full.bytes,
        full.duration.as_millis()
    );
    println!(
        "FIGURE replication incremental send: 10 MiB changed on a 1 GiB volume: {} bytes in {} ms",
        inc.bytes,
        inc.duration.as_millis()
    );

    // A transfer cut short after 4 MiB keeps the previous replica.
    write_pattern(&disk, 700 << 20, 10 << 20, 3);
    let (sent, received) = transfer(&a.repl, &b.repl, TOKEN, Some(4 << 20));
    assert!(sent.is_err(), "cut-short send reported success");
    assert!(received.is_err(), "cut-short receive reported success");
    assert_eq!(latest_replica(&b), Some(2));
    assert_eq!(
        subvolumes(&b.pool.join("replicas").join(VOLUME)),
        ["stead-repl-2"],
        "no partial replica left"
    );
    assert_eq!(sha(&replica(2)), point2);
    assert_eq!(a.repl.source_snapshots(VOLUME).expect("snaps"), [2]);

    // The next transfer works again, incrementally from the common point.
    let (again, _) = both_ok(transfer(&a.repl, &b.repl, TOKEN, None), "after a cut");
    assert_eq!(again.parent, Some(2));
    let point3 = sha(&disk);
    assert_eq!(sha(&replica(again.point.seq)), point3);

    // A sender with an older fencing token (a deposed owner) is refused before it snapshots.
    write_pattern(&disk, 800 << 20, 1 << 20, 6);
    let (sent, received) = transfer(&a.repl, &b.repl, TOKEN - 2, None);
    assert!(
        matches!(sent, Err(DriverError::Refused(_))),
        "stale owner: {sent:?}"
    );
    assert!(received.is_err());
    assert_eq!(
        a.repl.source_snapshots(VOLUME).expect("snaps"),
        [again.point.seq]
    );
    assert_eq!(sha(&replica(again.point.seq)), point3);

    // Failover: the replica becomes the volume on the other node, writable.
    assert_eq!(
        replicate::promote_if_absent(&a.repl, VOLUME).expect("nothing on the source"),
        None
    );
    let promoted = replicate::promote_if_absent(&b.repl, VOLUME)
        .expect("promote")
        .expect("a replica to promote");
    assert_eq!(promoted.point.seq, again.point.seq);
    assert!(promoted.window.as_secs() < 120, "{:?}", promoted.window);
    let live = b.pool.join("images").join(VOLUME).join("disk.raw");
    assert_eq!(sha(&live), point3);
    assert_eq!(
        stead_host::xattr::get(&live, storage::OWNER_XATTR).expect("xattr"),
        Some(b"Volume/vm1".to_vec()),
        "the ownership mark travels with the replica"
    );
    write_pattern(&live, 0, 1 << 20, 4);
    assert!(
        b.repl.promote(VOLUME).is_err(),
        "promoting over a live volume"
    );
    assert_eq!(
        replicate::promote_if_absent(&b.repl, VOLUME).expect("live"),
        None,
        "the live volume stays"
    );
    println!(
        "FIGURE replication promote: data-loss window {} s",
        promoted.window.as_secs()
    );
}

/// The clone operations in the stream of read-only snapshot `snap` incremental from
/// `parent` (`btrfs send -p … | btrfs receive --dump`).
fn clone_ops(parent: &Path, snap: &Path) -> usize {
    let script = format!(
        "btrfs send -q -p '{}' '{}' | btrfs receive --dump",
        parent.display(),
        snap.display()
    );
    let out = run_cmd("sh", &["-c", &script]).expect("send | receive --dump");
    out.lines().filter(|l| l.starts_with("clone")).count()
}

/// Bytes of a full send of `n`'s snapshot `seq`.
fn full_send_bytes(n: &Node, seq: u64) -> u64 {
    let mut counter = io::sink();
    let mut counted = CountingWriter {
        inner: &mut counter,
        bytes: 0,
    };
    n.repl
        .send(VOLUME, seq, None, &mut counted)
        .expect("full send");
    counted.bytes
}

struct CountingWriter<'a> {
    inner: &'a mut dyn Write,
    bytes: u64,
}

impl Write for CountingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A volume holding an ext4 image and a reflinked copy of it (shared extents).
fn volume_with_ext4_image(n: &Node) -> PathBuf {
    let disk = source_disk(n, 64 << 20, 0, 1);
    run_cmd(
        "mkfs.ext4",
        &["-q", "-F", "-E", "nodiscard", &disk.to_string_lossy()],
    )
    .expect("mkfs.ext4");
    write_pattern(&disk, 8 << 20, 8 << 20, 11);
    let copy = disk.with_file_name("copy.raw");
    run_cmd(
        "cp",
        &[
            "--reflink=always",
            &disk.to_string_lossy(),
            &copy.to_string_lossy(),
        ],
    )
    .expect("reflink copy");
    disk
}

/// After a failover a → b, b sends the volume back to a: the first transfer is incremental
/// from a's own last sent snapshot even though the stream clones extents of that parent
/// (what `btrfs receive` used to refuse), a's divergent live copy is kept read-only and the
/// volume becomes a replica there, which a can promote again later.
#[test]
fn storage_replicate_btrfs_send_back_is_incremental_and_keeps_the_stale_copy() {
    let test = "storage_replicate_btrfs_send_back_is_incremental_and_keeps_the_stale_copy";
    let Some((a, b)) = two_nodes(test) else {
        return;
    };
    if run_cmd("mkfs.ext4", &["-V"]).is_err() {
        eprintln!("SKIP {test}: mkfs.ext4 missing");
        return;
    }
    let disk_a = volume_with_ext4_image(&a);
    let (first, _) = both_ok(transfer(&a.repl, &b.repl, TOKEN, None), "a -> b");
    let common = sha(&disk_a);

    // Failover to b: the replica becomes b's volume; a keeps writing (a partition), which
    // the failover gives up.
    let promoted = replicate::promote_if_absent(&b.repl, VOLUME)
        .expect("promote")
        .expect("a replica");
    assert_eq!(promoted.point.seq, first.point.seq);
    write_pattern(&disk_a, 20 << 20, 1 << 20, 12);
    let diverged = sha(&disk_a);
    assert_ne!(diverged, common);

    // b writes: a reflinked copy of the image (clones extents of the parent) and new data.
    let live_b = b.pool.join("images").join(VOLUME);
    run_cmd(
        "cp",
        &[
            "--reflink=always",
            &live_b.join("disk.raw").to_string_lossy(),
            &live_b.join("copy2.raw").to_string_lossy(),
        ],
    )
    .expect("reflink on b");
    write_pattern(&live_b.join("disk.raw"), 30 << 20, 1 << 20, 13);
    let on_b = sha(&live_b.join("disk.raw"));
    // What b will send holds clone operations (of extents of the parent): a read-only
    // snapshot of b's volume now, streamed from b's parent, dumped.
    btrfs::snapshot(&live_b, &b.pool, "dump", true).expect("snapshot for the dump");
    let clones = clone_ops(
        &b.pool
            .join("replication")
            .join(VOLUME)
            .join(replicate::snapshot_name(first.point.seq)),
        &b.pool.join("dump"),
    );
    btrfs::subvol_destroy(&b.pool, "dump").expect("drop the dump snapshot");
    assert!(clones > 0, "the stream back holds no clone operation");

    // The first transfer back, b -> a (b's token is newer).
    let (back, _) = both_ok(transfer(&b.repl, &a.repl, TOKEN + 1, None), "b -> a");
    assert_eq!(
        back.parent,
        Some(first.point.seq),
        "the first send back is incremental from a's own snapshot"
    );
    let full = full_send_bytes(&b, back.point.seq);
    assert!(
        back.bytes * 4 < full,
        "incremental {} bytes vs full {full}",
        back.bytes
    );
    println!(
        "FIGURE first send back after a failover (64 MiB volume, ext4 image + reflinked copies): \
         incremental {} bytes in {} ms ({clones} clone operations) instead of a full send of \
         {full} bytes",
        back.bytes,
        back.duration.as_millis()
    );
    assert_eq!(sha(&replica_disk(&a, back.point.seq)), on_b);
    assert_eq!(
        sha(&replica_disk(&a, back.point.seq).with_file_name("copy2.raw")),
        common
    );

    // a's divergent live copy: kept read-only under snapshots/, the live one gone.
    let kept = back.kept.clone().expect("the stale copy is reported");
    let kept = PathBuf::from(kept);
    assert_eq!(
        kept.parent(),
        Some(a.pool.join("snapshots").join(VOLUME).as_path())
    );
    assert!(
        kept.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(replicate::STALE_PREFIX)),
        "{kept:?}"
    );
    assert_eq!(sha(&kept.join("disk.raw")), diverged, "nothing is lost");
    assert!(
        btrfs::subvol_info(&kept).expect("info").readonly,
        "the kept copy is read-only"
    );
    assert!(!a.pool.join("images").join(VOLUME).exists());
    assert!(
        a.repl.source_snapshots(VOLUME).expect("snaps").is_empty(),
        "a's own snapshots are dropped once it holds a replica"
    );

    // The next transfer is a plain incremental one between replicas.
    write_pattern(&live_b.join("disk.raw"), 40 << 20, 1 << 20, 14);
    let on_b = sha(&live_b.join("disk.raw"));
    let (next, _) = both_ok(transfer(&b.repl, &a.repl, TOKEN + 1, None), "b -> a again");
    assert_eq!(next.parent, Some(back.point.seq));
    assert_eq!(next.kept, None);
    assert_eq!(sha(&replica_disk(&a, next.point.seq)), on_b);

    // b fails in turn: a promotes its replica (the stale copy no longer blocks it).
    let again = replicate::promote_if_absent(&a.repl, VOLUME)
        .expect("promote on a")
        .expect("a replica on a");
    assert_eq!(again.point.seq, next.point.seq);
    assert_eq!(
        sha(&a.pool.join("images").join(VOLUME).join("disk.raw")),
        on_b
    );
    assert_eq!(sha(&kept.join("disk.raw")), diverged);
}

/// A cold move a → b (the final transfer, no write on a after it) and back: a's live copy is
/// unchanged since the common point, so it is removed with nothing kept.
#[test]
fn storage_replicate_btrfs_move_back_without_divergence_keeps_nothing() {
    let test = "storage_replicate_btrfs_move_back_without_divergence_keeps_nothing";
    let Some((a, b)) = two_nodes(test) else {
        return;
    };
    source_disk(&a, 64 << 20, 4 << 20, 21);
    let (first, _) = both_ok(transfer(&a.repl, &b.repl, TOKEN, None), "a -> b");
    replicate::promote_if_absent(&b.repl, VOLUME)
        .expect("promote")
        .expect("a replica");
    let live_b = b.pool.join("images").join(VOLUME).join("disk.raw");
    write_pattern(&live_b, 8 << 20, 1 << 20, 22);
    let (back, _) = both_ok(transfer(&b.repl, &a.repl, TOKEN + 1, None), "b -> a");
    assert_eq!(back.parent, Some(first.point.seq));
    assert_eq!(back.kept, None, "nothing diverged on a");
    assert!(!a.pool.join("images").join(VOLUME).exists());
    assert!(subvolumes(&a.pool.join("snapshots").join(VOLUME)).is_empty());
    assert_eq!(sha(&replica_disk(&a, back.point.seq)), sha(&live_b));
}

/// What the agent's converge does to a volume no longer placed on its node (issue #15):
/// a read-only safety snapshot `pre-…` under snapshots/<volume>/, then the live subvolume
/// destroyed.
fn delete_with_safety_snapshot(n: &Node, name: &str) -> PathBuf {
    let dir = n.pool.join("snapshots").join(VOLUME);
    fs::create_dir_all(&dir).expect("snapshots dir");
    btrfs::snapshot(&n.pool.join("images").join(VOLUME), &dir, name, true)
        .expect("safety snapshot");
    btrfs::subvol_destroy(&n.pool.join("images"), VOLUME).expect("delete the volume");
    dir.join(name)
}

/// Issue #15: after a failover a → b, a's divergent live copy is deleted by a's converge
/// (keeping a safety snapshot) before b sends the volume back. The transfer back reports
/// that safety snapshot as the kept stale copy, and it stays, read-only, with the write.
/// A safety snapshot of an unchanged copy is not reported (and not deleted either).
#[test]
fn storage_replicate_btrfs_send_back_reports_the_safety_snapshot_of_a_deleted_copy() {
    let test = "storage_replicate_btrfs_send_back_reports_the_safety_snapshot_of_a_deleted_copy";
    let Some((a, b)) = two_nodes(test) else {
        return;
    };
    let disk_a = source_disk(&a, 32 << 20, 4 << 20, 31);
    let (first, _) = both_ok(transfer(&a.repl, &b.repl, TOKEN, None), "a -> b");
    replicate::promote_if_absent(&b.repl, VOLUME)
        .expect("promote")
        .expect("a replica");
    // The write a's copy gets after the failover, then a's converge deletes the volume.
    fs::write(disk_a.with_file_name("diverged"), b"given up").expect("write on a");
    let safety = delete_with_safety_snapshot(&a, "pre-delete-20261207T000000_000Z");
    let live_b = b.pool.join("images").join(VOLUME).join("disk.raw");
    write_pattern(&live_b, 8 << 20, 1 << 20, 32);
    let (back, _) = both_ok(transfer(&b.repl, &a.repl, TOKEN + 1, None), "b -> a");
    assert_eq!(back.parent, Some(first.point.seq));
    assert_eq!(
        back.kept.as_deref().map(PathBuf::from),
        Some(safety.clone()),
        "the safety snapshot holding the divergent write is reported"
    );
    assert_eq!(
        fs::read(safety.join("diverged")).expect("the write is kept"),
        b"given up"
    );
    assert!(btrfs::subvol_info(&safety).expect("info").readonly);
    assert_eq!(sha(&replica_disk(&a, back.point.seq)), sha(&live_b));

    // The same without a write: the safety snapshot is not reported, and still there.
    let Some((c, d)) = two_nodes(test) else {
        return;
    };
    source_disk(&c, 32 << 20, 4 << 20, 33);
    let (first, _) = both_ok(transfer(&c.repl, &d.repl, TOKEN, None), "c -> d");
    replicate::promote_if_absent(&d.repl, VOLUME)
        .expect("promote")
        .expect("a replica");
    let safety = delete_with_safety_snapshot(&c, "pre-delete-20261207T000001_000Z");
    let (back, _) = both_ok(transfer(&d.repl, &c.repl, TOKEN + 1, None), "d -> c");
    assert_eq!(back.parent, Some(first.point.seq));
    assert_eq!(back.kept, None, "nothing diverged on c");
    assert!(btrfs::is_subvolume(&safety).expect("stat"), "never deleted");

    // No common point (e's own snapshot of the first send is gone, so the send back is a
    // full one): nothing can be proven unchanged, and the safety snapshot is reported.
    let Some((e, f)) = two_nodes(test) else {
        return;
    };
    source_disk(&e, 32 << 20, 4 << 20, 34);
    let (first, _) = both_ok(transfer(&e.repl, &f.repl, TOKEN, None), "e -> f");
    replicate::promote_if_absent(&f.repl, VOLUME)
        .expect("promote")
        .expect("a replica");
    let safety = delete_with_safety_snapshot(&e, "pre-delete-20261207T000002_000Z");
    e.repl
        .delete_snapshot(VOLUME, first.point.seq)
        .expect("drop e's snapshot of the first send");
    let (back, _) = both_ok(transfer(&f.repl, &e.repl, TOKEN + 1, None), "f -> e");
    assert_eq!(back.parent, None, "a full send back");
    assert_eq!(
        back.kept.as_deref().map(PathBuf::from),
        Some(safety.clone()),
        "without a common point the safety snapshot is reported"
    );
    assert!(btrfs::is_subvolume(&safety).expect("stat"), "never deleted");
}

#[test]
fn storage_replicate_refuses_unknown_volumes() {
    let Some((a, b)) = two_nodes("storage_replicate_refuses_unknown_volumes") else {
        return;
    };
    btrfs::subvol_create(&a.pool.join("images"), "other").expect("subvolume");
    let (x, y) = UnixStream::pair().expect("pair");
    let to = b.repl.clone();
    let receiver = std::thread::spawn(move || {
        let mut y = y;
        replicate::receive_volume(&resolver(to), &mut y)
    });
    let mut x = x;
    // Refused by the receiver (not any error, such as a volume this side cannot snapshot).
    let sent = replicate::send_volume(&a.repl, "other", TOKEN, &mut x);
    assert!(matches!(sent, Err(DriverError::Refused(_))), "{sent:?}");
    let received = receiver.join().expect("join");
    assert!(
        matches!(&received, Err(DriverError::Refused(e)) if e.contains("not replicated to this node")),
        "{received:?}"
    );
    assert!(a.repl.source_snapshots("other").expect("snaps").is_empty());
}

#[test]
fn storage_replicate_zfs() {
    if run_cmd("zfs", &["list"]).is_err() {
        eprintln!("SKIP storage_replicate_zfs: ZFS is absent from this kernel");
        return;
    }
    // With ZFS present: an empty dataset has no replicas, promotion has nothing to use.
    let z = ZfsReplication::new("stead-test-absent/volumes");
    assert!(z.promote(VOLUME).is_err());
}

/// PEM files of a CA and node certificates signed by it (client and server use, SAN = name).
struct Pki {
    dir: tempfile::TempDir,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};
        let dir = tempfile::tempdir().expect("tempdir");
        let key = KeyPair::generate().expect("CA key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = p.self_signed(&key).expect("CA");
        fs::write(dir.path().join("ca.crt"), cert.pem()).expect("write CA");
        Pki {
            dir,
            issuer: rcgen::Issuer::new(p, key),
        }
    }

    fn node(&self, name: &str) -> replicate_tls::TlsFiles {
        use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair};
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(vec![name.to_string()]).expect("params");
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &self.issuer).expect("sign");
        let files = replicate_tls::TlsFiles {
            ca: self.dir.path().join("ca.crt"),
            cert: self.dir.path().join(format!("{name}.crt")),
            key: self.dir.path().join(format!("{name}.key")),
        };
        fs::write(&files.cert, cert.pem()).expect("write cert");
        fs::write(&files.key, key.serialize_pem()).expect("write key");
        files
    }
}

/// One transfer over TCP + mutual TLS on 127.0.0.1 from `sender` (calling the peer `peer`).
fn tls_transfer(
    a: &Node,
    b: &Node,
    sender: &replicate_tls::TlsFiles,
    receiver: &replicate_tls::TlsFiles,
    peer: &str,
) -> (
    Result<SendReport, DriverError>,
    Result<(String, replicate::ReplicaInfo), DriverError>,
) {
    let server_tls = replicate_tls::ReplicationTls::load(receiver).expect("receiver TLS");
    let server =
        replicate_tls::ReplicationServer::bind("127.0.0.1:0".parse().expect("addr"), server_tls)
            .expect("bind");
    let addr = server.local_addr().expect("addr");
    let to = b.repl.clone();
    let receiving = std::thread::spawn(move || server.serve_one(&resolver(to)));
    let client_tls = replicate_tls::ReplicationTls::load(sender).expect("sender TLS");
    let sent = replicate_tls::send_to(&client_tls, &a.repl, VOLUME, TOKEN, peer, addr);
    (sent, receiving.join().expect("receiver thread"))
}

#[test]
fn storage_replicate_over_mutual_tls() {
    let Some((a, b)) = two_nodes("storage_replicate_over_mutual_tls") else {
        return;
    };
    let disk = source_disk(&a, 64 << 20, 8 << 20, 5);
    let pki = Pki::new();
    let (na, nb) = (pki.node("node-a"), pki.node("node-b"));

    let (sent, received) = tls_transfer(&a, &b, &na, &nb, "node-b");
    let report = sent.expect("send over TLS");
    assert_eq!(received.expect("receive over TLS").1, report.point);
    assert_eq!(sha(&replica_disk(&b, report.point.seq)), sha(&disk));

    // The receiver's certificate does not name the node the sender means to reach.
    let (sent, received) = tls_transfer(&a, &b, &na, &nb, "node-c");
    assert!(sent.is_err(), "sent to the wrong node");
    assert!(received.is_err());

    // A sender whose certificate another CA signed is refused.
    let other = Pki::new();
    let impostor = other.node("node-a");
    let impostor = replicate_tls::TlsFiles {
        ca: na.ca.clone(),
        ..impostor
    };
    let (sent, received) = tls_transfer(&a, &b, &impostor, &nb, "node-b");
    assert!(sent.is_err(), "an impostor replicated");
    assert!(received.is_err());
    assert_eq!(
        latest_replica(&b),
        Some(report.point.seq),
        "refused transfers leave the replica"
    );
    assert_eq!(
        a.repl.source_snapshots(VOLUME).expect("snaps"),
        [report.point.seq]
    );
}
