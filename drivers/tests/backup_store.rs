//! Backup store: round trip, corruption detection, deduplication, prune + gc.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Duration, TimeZone, Utc};
use sha2::{Digest, Sha256};
use stead_drivers::backup::store::{BackupOptions, BackupStore, ProblemKind};
use stead_drivers::backup::xattrs;
use stead_schema::kinds::Retention;

/// Deterministic pseudo-random bytes (xorshift64*).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Mixed content: random, text-like and zero regions, `mib` MiB in total.
fn mixed_data(seed: u64, mib: usize) -> Vec<u8> {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let words = [
        "lorem ", "ipsum ", "stead ", "backup ", "chunk ", "zstd ", "volume ", "\n",
    ];
    let mut out = Vec::with_capacity(mib << 20);
    while out.len() < mib << 20 {
        let kind = rng.next() % 3;
        let len = (256 << 10) + (rng.next() % (2 << 20)) as usize;
        match kind {
            0 => {
                let mut b = vec![0u8; len];
                rng.fill(&mut b);
                out.extend_from_slice(&b);
            }
            1 => {
                let end = out.len() + len;
                while out.len() < end {
                    out.extend_from_slice(
                        words[(rng.next() % words.len() as u64) as usize].as_bytes(),
                    );
                }
            }
            _ => out.resize(out.len() + len, 0),
        }
    }
    out.truncate(mib << 20);
    out
}

fn sha(p: &Path) -> String {
    hex::encode(Sha256::digest(fs::read(p).expect("read")))
}

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .expect("time")
        .with_timezone(&Utc)
}

fn opts_at(time: DateTime<Utc>) -> BackupOptions {
    BackupOptions {
        time: Some(time),
        ..BackupOptions::default()
    }
}

/// A volume file with a hole and a container-like rootfs.
fn make_inputs(dir: &Path) -> (PathBuf, PathBuf) {
    let vol = dir.join("disk.raw");
    let mut f = fs::File::create(&vol).expect("create");
    f.write_all(&mixed_data(7, 12)).expect("write");
    f.set_len(40 << 20).expect("grow sparse"); // 28 MiB hole at the end
    drop(f);

    let root = dir.join("rootfs");
    fs::create_dir_all(root.join("etc/sub")).expect("mkdir");
    fs::create_dir_all(root.join("empty")).expect("mkdir");
    fs::write(root.join("etc/hostname"), b"web\n").expect("write");
    let mut big = vec![0u8; 1 << 20];
    Rng(5).fill(&mut big);
    big.extend(mixed_data(9, 2));
    fs::write(root.join("etc/sub/big.bin"), big).expect("write");
    fs::write(root.join("empty-file"), b"").expect("write");
    fs::set_permissions(root.join("etc/hostname"), fs::Permissions::from_mode(0o640))
        .expect("chmod");
    fs::set_permissions(root.join("empty"), fs::Permissions::from_mode(0o1777)).expect("chmod");
    std::os::unix::fs::symlink("../etc/hostname", root.join("empty/link")).expect("symlink");
    std::os::unix::fs::lchown(root.join("etc/hostname"), Some(1234), Some(5678)).expect("chown");
    nix::unistd::mkfifo(
        &root.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .expect("mkfifo");
    // A second name of etc/hostname, and xattrs in the user and trusted namespaces (an
    // overlay upper layer marks opaque directories with trusted.overlay.opaque).
    fs::hard_link(root.join("etc/hostname"), root.join("hostname-again")).expect("link");
    let mut x = std::collections::BTreeMap::new();
    x.insert("user.note".to_string(), hex::encode(b"kept"));
    xattrs::restore(&root.join("etc/sub/big.bin"), &x).expect("user xattr");
    let mut x = std::collections::BTreeMap::new();
    x.insert("trusted.overlay.opaque".to_string(), hex::encode(b"y"));
    xattrs::restore(&root.join("empty"), &x).expect("trusted xattr");
    (vol, root)
}

fn assert_same_tree(a: &Path, b: &Path) {
    let ma = fs::symlink_metadata(a).expect("stat a");
    let mb = fs::symlink_metadata(b).expect("stat b");
    assert_eq!(ma.file_type(), mb.file_type(), "{}", a.display());
    assert_eq!(ma.mode(), mb.mode(), "mode of {}", a.display());
    assert_eq!(
        (ma.uid(), ma.gid()),
        (mb.uid(), mb.gid()),
        "owner of {}",
        a.display()
    );
    assert_eq!(ma.mtime(), mb.mtime(), "mtime of {}", a.display());
    assert_eq!(
        xattrs::read(a).expect("xattrs a"),
        xattrs::read(b).expect("xattrs b"),
        "xattrs of {}",
        a.display()
    );
    assert_eq!(ma.nlink(), mb.nlink(), "link count of {}", a.display());
    if ma.is_file() {
        assert_eq!(sha(a), sha(b), "content of {}", a.display());
    } else if ma.file_type().is_symlink() {
        assert_eq!(
            fs::read_link(a).expect("readlink"),
            fs::read_link(b).expect("readlink")
        );
    } else if ma.is_dir() {
        let names = |p: &Path| {
            let mut v: Vec<_> = fs::read_dir(p)
                .expect("readdir")
                .map(|e| e.expect("entry").file_name())
                .collect();
            v.sort();
            v
        };
        let (na, nb) = (names(a), names(b));
        assert_eq!(na, nb, "entries of {}", a.display());
        for n in na {
            assert_same_tree(&a.join(&n), &b.join(&n));
        }
    }
}

#[test]
fn backup_restore_round_trip_is_bit_identical() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (vol, root) = make_inputs(tmp.path());
    let store = BackupStore::for_pool(&tmp.path().join("pool"));
    let spec = serde_json::json!({"rootfs": {"path": root.display().to_string()}});
    let info = store
        .backup_paths(
            "Container/web",
            &spec,
            &[
                ("disk0".into(), vol.clone()),
                ("rootfs".into(), root.clone()),
            ],
            &opts_at(t("2025-01-01T02:00:00Z")),
        )
        .expect("backup");
    assert_eq!(info.id, "Container/web/2025-01-01T02:00:00Z");
    assert_eq!(info.stats.bytes, (40 << 20) + (3 << 20) + 4);
    assert!(
        info.stats.zero_bytes >= 28 << 20,
        "hole must be zero chunks: {:?}",
        info.stats
    );

    let m = store.manifest(&info.id).expect("manifest");
    assert_eq!(m.spec, spec);
    assert!(
        m.files
            .iter()
            .any(|f| f.path == "empty/link" && f.target.as_deref() == Some("../etc/hostname"))
    );

    let report = store.verify(&info.id).expect("verify");
    assert!(report.ok(), "{:?}", report.problems);

    let dest = tmp.path().join("restore");
    let r = store.restore(&info.id, &dest, None).expect("restore");
    assert_eq!(r.restored.len(), 2);
    assert_eq!(sha(&dest.join("disk0")), sha(&vol));
    // holes stay holes
    let restored = fs::metadata(dest.join("disk0")).expect("stat");
    assert_eq!(restored.len(), 40 << 20);
    assert!(
        restored.blocks() * 512 < 20 << 20,
        "restored volume should be sparse: {} blocks",
        restored.blocks()
    );
    assert_same_tree(&root, &dest.join("rootfs"));
    let ino = |p: &Path| fs::metadata(p).expect("stat").ino();
    assert_eq!(
        ino(&dest.join("rootfs/etc/hostname")),
        ino(&dest.join("rootfs/hostname-again")),
        "the hard link is restored as one"
    );
    let opaque = xattrs::read(&dest.join("rootfs/empty")).expect("xattrs");
    assert_eq!(
        opaque.get("trusted.overlay.opaque").map(String::as_str),
        Some("79")
    );
    assert!(
        m.files
            .iter()
            .any(|f| f.path == "hostname-again" && f.link.as_deref() == Some("etc/hostname"))
    );

    // restoring over an existing destination is refused
    assert!(store.restore(&info.id, &dest, None).is_err());
}

#[test]
fn restore_single_input_under_new_name() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let vol = tmp.path().join("v.raw");
    fs::write(&vol, mixed_data(3, 5)).expect("write");
    let store = BackupStore::for_pool(&tmp.path().join("pool"));
    let info = store
        .backup_paths(
            "Volume/data",
            &serde_json::json!({}),
            &[("data.raw".into(), vol.clone())],
            &BackupOptions::default(),
        )
        .expect("backup");
    let r = store
        .restore(&info.id, tmp.path(), Some("data-copy.raw"))
        .expect("restore");
    assert_eq!(r.restored[0].1, tmp.path().join("data-copy.raw"));
    assert_eq!(sha(&tmp.path().join("data-copy.raw")), sha(&vol));
}

fn chunk_files(store: &BackupStore) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for sub in fs::read_dir(store.root().join(".chunks")).expect("chunks") {
        let sub = sub.expect("entry").path();
        for f in fs::read_dir(&sub).expect("sub") {
            v.push(f.expect("entry").path());
        }
    }
    v.sort();
    v
}

#[test]
fn verify_names_the_file_and_chunk_with_a_corrupt_byte() {
    for level in [None, Some(1)] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (vol, root) = make_inputs(tmp.path());
        let store = BackupStore::for_pool(&tmp.path().join("pool"));
        let opts = BackupOptions {
            zstd_level: level,
            ..BackupOptions::default()
        };
        let info = store
            .backup_paths(
                "Container/web",
                &serde_json::json!({}),
                &[("disk0".into(), vol), ("rootfs".into(), root)],
                &opts,
            )
            .expect("backup");
        let m = store.manifest(&info.id).expect("manifest");
        let big = m
            .files
            .iter()
            .find(|f| f.path == "etc/sub/big.bin")
            .expect("big.bin in manifest");
        let (idx, victim) = big
            .chunks
            .iter()
            .enumerate()
            .find(|(_, c)| !c.zero)
            .map(|(i, c)| (i, c.digest.clone().expect("digest")))
            .expect("a data chunk");
        let path = store.chunk_path(&victim, level.is_some());
        let mut bytes = fs::read(&path).expect("chunk");
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x01;
        fs::write(&path, &bytes).expect("corrupt");

        let report = store.verify(&info.id).expect("verify");
        assert!(!report.ok());
        let p = report
            .problems
            .iter()
            .find(|p| p.path == "etc/sub/big.bin")
            .unwrap_or_else(|| {
                panic!(
                    "corrupt chunk must be reported for big.bin: {:?}",
                    report.problems
                )
            });
        assert_eq!(p.input, "rootfs");
        assert_eq!(p.chunk_index, Some(idx));
        assert_eq!(p.digest.as_deref(), Some(victim.as_str()));
        match (&p.kind, level) {
            (ProblemKind::CorruptChunk, None) => {}
            (ProblemKind::CorruptChunk | ProblemKind::UnreadableChunk(_), Some(_)) => {}
            (k, _) => panic!("unexpected problem kind {k:?}"),
        }
        assert!(p.to_string().contains("rootfs:etc/sub/big.bin"), "{p}");
        // Only the file(s) using that chunk are reported.
        assert!(
            report
                .problems
                .iter()
                .all(|p| p.digest.as_deref() == Some(victim.as_str()))
        );
        // Restore refuses to produce corrupt data.
        assert!(
            store
                .restore(&info.id, &tmp.path().join("r"), None)
                .is_err()
        );

        // Restore of a many-chunk file (parallel path) names the corrupt chunk too.
        let disk = m.files.iter().find(|f| f.input == "disk0").expect("disk0");
        assert!(disk.chunks.iter().filter(|c| !c.zero).count() >= 4);
        let (di, dc) = disk
            .chunks
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.zero)
            .nth(2)
            .map(|(i, c)| (i, c.digest.clone().expect("digest")))
            .expect("third data chunk");
        let dpath = store.chunk_path(&dc, level.is_some());
        let mut db = fs::read(&dpath).expect("chunk");
        let dmid = db.len() / 2;
        db[dmid] ^= 0x80;
        fs::write(&dpath, &db).expect("corrupt");
        let err = store
            .restore(&info.id, &tmp.path().join("r2"), None)
            .expect_err("restore must fail")
            .to_string();
        assert!(err.contains(&format!("disk0: chunk {di} ")), "{err}");
        assert!(!tmp.path().join("r2/disk0").exists());

        // A missing chunk is reported as missing.
        fs::remove_file(&path).expect("remove chunk");
        let report = store.verify(&info.id).expect("verify");
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.path == "etc/sub/big.bin" && p.kind == ProblemKind::MissingChunk)
        );
    }
}

#[test]
fn unchanged_second_backup_adds_under_one_percent() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let vol = tmp.path().join("v.raw");
    fs::write(&vol, mixed_data(11, 32)).expect("write");
    let store = BackupStore::for_pool(&tmp.path().join("pool"));
    let inputs = [("disk0".to_string(), vol.clone())];
    let first = store
        .backup_paths(
            "VirtualMachine/vm1",
            &serde_json::json!({}),
            &inputs,
            &opts_at(t("2025-01-01T00:00:00Z")),
        )
        .expect("first");
    assert!(first.stats.new_chunks > 0);
    let chunks_before = chunk_files(&store).len();
    let second = store
        .backup_paths(
            "VirtualMachine/vm1",
            &serde_json::json!({}),
            &inputs,
            &opts_at(t("2025-01-02T00:00:00Z")),
        )
        .expect("second");
    let manifest_len = fs::metadata(&second.manifest).expect("manifest").len();
    let added = second.stats.stored_bytes + manifest_len;
    assert!(
        (added as f64) < 0.01 * second.stats.bytes as f64,
        "second backup added {added} bytes of {}",
        second.stats.bytes
    );
    assert_eq!(second.stats.new_chunks, 0);
    assert_eq!(chunk_files(&store).len(), chunks_before);

    // Change 4 KiB in the middle: only the chunk(s) around it are new.
    let mut data = fs::read(&vol).expect("read");
    let mid = data.len() / 2;
    let mut rng = Rng(99);
    rng.fill(&mut data[mid..mid + 4096]);
    fs::write(&vol, &data).expect("write");
    let third = store
        .backup_paths(
            "VirtualMachine/vm1",
            &serde_json::json!({}),
            &inputs,
            &opts_at(t("2025-01-03T00:00:00Z")),
        )
        .expect("third");
    assert!(third.stats.new_chunks <= 2, "{:?}", third.stats);
    assert!(third.stats.new_bytes <= 2 * 4 * 1024 * 1024);
    let out = tmp.path().join("out");
    store.restore(&third.id, &out, None).expect("restore");
    assert_eq!(sha(&out.join("disk0")), sha(&vol));
}

/// Options that stamp even files written a moment ago (the racy window is 0; ctime ticks
/// are still seen because every change below also changes the ctime second or the size).
fn opts_stamping(time: DateTime<Utc>, reread: bool) -> BackupOptions {
    BackupOptions {
        time: Some(time),
        reread,
        racy_secs: -1,
        ..BackupOptions::default()
    }
}

#[test]
fn unchanged_files_are_not_read_again_and_changes_are_seen() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (vol, root) = make_inputs(tmp.path());
    let store = BackupStore::for_pool(&tmp.path().join("pool"));
    let inputs = [
        ("disk0".to_string(), vol.clone()),
        ("rootfs".to_string(), root.clone()),
    ];
    let spec = serde_json::json!({});
    let first = store
        .backup_paths(
            "Container/c",
            &spec,
            &inputs,
            &opts_stamping(t("2025-01-01T00:00:00Z"), false),
        )
        .expect("first");
    assert_eq!(first.stats.reused_bytes, 0);
    let second = store
        .backup_paths(
            "Container/c",
            &spec,
            &inputs,
            &opts_stamping(t("2025-01-02T00:00:00Z"), false),
        )
        .expect("second");
    assert_eq!(second.stats.bytes, first.stats.bytes);
    assert_eq!(
        second.stats.reused_bytes, second.stats.bytes,
        "{:?}",
        second.stats
    );
    assert_eq!(second.stats.chunks, first.stats.chunks);
    assert_eq!(second.stats.zero_bytes, first.stats.zero_bytes);
    assert_eq!(second.stats.new_bytes, 0);
    let m1 = store.manifest(&first.id).expect("m1");
    let m2 = store.manifest(&second.id).expect("m2");
    for (a, b) in m1.files.iter().zip(&m2.files) {
        assert_eq!(
            (&a.path, &a.chunks, &a.sha256),
            (&b.path, &b.chunks, &b.sha256)
        );
    }
    assert!(store.verify(&second.id).expect("verify").ok());

    // Same size, mtime put back: only the ctime (and the content) tell. Wait for the next
    // ctime second so that the change is visible whatever the file system's granularity.
    let before = fs::metadata(&vol).expect("stat");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let mut data = fs::read(&vol).expect("read");
    data[100] ^= 0xff;
    fs::write(&vol, &data).expect("write");
    let tv = nix::sys::time::TimeSpec::new(before.mtime(), before.mtime_nsec());
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        &vol,
        &tv,
        &tv,
        nix::sys::stat::UtimensatFlags::FollowSymlink,
    )
    .expect("utimensat");
    let after = fs::metadata(&vol).expect("stat");
    assert_eq!(
        (before.len(), before.mtime(), before.mtime_nsec()),
        (after.len(), after.mtime(), after.mtime_nsec())
    );
    let third = store
        .backup_paths(
            "Container/c",
            &spec,
            &inputs,
            &opts_stamping(t("2025-01-03T00:00:00Z"), false),
        )
        .expect("third");
    assert_eq!(
        third.stats.reused_bytes,
        second.stats.bytes - before.len(),
        "{:?}",
        third.stats
    );
    let out = tmp.path().join("out");
    store.restore(&third.id, &out, None).expect("restore");
    assert_eq!(sha(&out.join("disk0")), sha(&vol));

    // A chunk gone from the store: the file that needs it is read (and the chunk
    // written) again rather than referenced.
    let m3 = store.manifest(&third.id).expect("m3");
    let big = m3
        .files
        .iter()
        .find(|f| f.input == "rootfs" && f.chunks.iter().any(|c| c.digest.is_some()))
        .expect("a rootfs file with data");
    let d = big
        .chunks
        .iter()
        .find_map(|c| c.digest.clone())
        .expect("digest");
    let cp = store.chunk_path(&d, true);
    fs::remove_file(&cp).expect("remove chunk");
    let fourth = store
        .backup_paths(
            "Container/c",
            &spec,
            &inputs,
            &opts_stamping(t("2025-01-04T00:00:00Z"), false),
        )
        .expect("fourth");
    assert!(cp.exists(), "missing chunk written again");
    assert!(fourth.stats.new_chunks >= 1, "{:?}", fourth.stats);
    assert!(fourth.stats.reused_bytes < fourth.stats.bytes);

    // --reread reads everything.
    let fifth = store
        .backup_paths(
            "Container/c",
            &spec,
            &inputs,
            &opts_stamping(t("2025-01-05T00:00:00Z"), true),
        )
        .expect("fifth");
    assert_eq!(fifth.stats.reused_bytes, 0);
    assert_eq!(fifth.stats.new_bytes, 0);
    let out = tmp.path().join("out5");
    store.restore(&fifth.id, &out, None).expect("restore");
    assert_eq!(sha(&out.join("disk0")), sha(&vol));
}

#[test]
fn files_changed_just_before_a_backup_get_no_stamp() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (vol, _) = make_inputs(tmp.path());
    let store = BackupStore::for_pool(&tmp.path().join("pool"));
    let inputs = [("disk0".to_string(), vol.clone())];
    let opts = |at| BackupOptions {
        time: Some(t(at)),
        ..BackupOptions::default()
    };
    let first = store
        .backup_paths(
            "Volume/v",
            &serde_json::json!({}),
            &inputs,
            &opts("2025-01-01T00:00:00Z"),
        )
        .expect("first");
    assert!(
        store.manifest(&first.id).expect("m").files[0]
            .stamp
            .is_none()
    );
    let second = store
        .backup_paths(
            "Volume/v",
            &serde_json::json!({}),
            &inputs,
            &opts("2025-01-02T00:00:00Z"),
        )
        .expect("second");
    assert_eq!(second.stats.reused_bytes, 0, "a racy file is read again");
}

#[test]
fn prune_removes_manifests_then_collects_only_unreferenced_chunks() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let vol = tmp.path().join("v.raw");
    let store = BackupStore::for_pool(&tmp.path().join("pool"));
    let inputs = [("disk0".to_string(), vol.clone())];
    let start = Utc
        .with_ymd_and_hms(2025, 3, 1, 10, 0, 0)
        .single()
        .expect("time");
    let mut ids = Vec::new();
    for day in 0..5 {
        // Each day shares a common part and has a unique part.
        let mut data = mixed_data(1, 4);
        let mut unique = vec![0u8; 2 << 20];
        Rng(1000 + day).fill(&mut unique);
        data.extend(unique);
        fs::write(&vol, &data).expect("write");
        let info = store
            .backup_paths(
                "Volume/data",
                &serde_json::json!({}),
                &inputs,
                &opts_at(start + Duration::days(day as i64)),
            )
            .expect("backup");
        ids.push(info.id);
    }
    // Another resource shares the common chunks.
    fs::write(&vol, mixed_data(1, 4)).expect("write");
    let other = store
        .backup_paths(
            "Volume/other",
            &serde_json::json!({}),
            &inputs,
            &opts_at(start),
        )
        .expect("backup other");

    let retention = Retention {
        keep_last: Some(2),
        ..Retention::default()
    };
    let dry = store
        .prune(Some("Volume/data"), &retention, &chrono_tz::Tz::UTC, true)
        .expect("dry run");
    assert_eq!(dry.removed.len(), 3);
    assert_eq!(
        store.list(None).expect("list").len(),
        6,
        "dry run deletes nothing"
    );

    let before = chunk_files(&store).len();
    let r = store
        .prune(None, &retention, &chrono_tz::Tz::UTC, false)
        .expect("prune");
    let mut removed = r.removed.clone();
    removed.sort();
    assert_eq!(removed, ids[..3].to_vec());
    let gc = r.gc.expect("gc ran");
    assert!(gc.removed >= 3, "{gc:?}");
    assert_eq!(chunk_files(&store).len() as u64, before as u64 - gc.removed);
    let left: Vec<String> = store
        .list(None)
        .expect("list")
        .into_iter()
        .map(|b| b.id)
        .collect();
    assert_eq!(left, vec![other.id.clone(), ids[3].clone(), ids[4].clone()]);
    for id in &left {
        let v = store.verify(id).expect("verify");
        assert!(v.ok(), "{id}: {:?}", v.problems);
    }
    // gc again: nothing to do.
    let gc2 = store.gc().expect("gc");
    assert_eq!(gc2.removed, 0);
}

#[test]
fn same_second_backups_get_distinct_ids_and_list_is_sorted() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let vol = tmp.path().join("v.raw");
    fs::write(&vol, b"hello").expect("write");
    let store = BackupStore::for_pool(&tmp.path().join("pool"));
    let inputs = [("disk0".to_string(), vol)];
    let at = t("2025-05-05T05:05:05Z");
    let a = store
        .backup_paths("Volume/x", &serde_json::json!({}), &inputs, &opts_at(at))
        .expect("a");
    let b = store
        .backup_paths("Volume/x", &serde_json::json!({}), &inputs, &opts_at(at))
        .expect("b");
    assert_ne!(a.id, b.id);
    let list = store.list(Some("Volume/x")).expect("list");
    assert_eq!(
        list.iter().map(|i| i.id.clone()).collect::<Vec<_>>(),
        vec![a.id, b.id]
    );
    assert!(
        store
            .backup_paths("bad", &serde_json::json!({}), &inputs, &opts_at(at))
            .is_err()
    );
    assert!(store.verify("Volume/x/2000-01-01T00:00:00Z").is_err());
}

/// Detaches a loop device on drop.
struct Loop(String);
impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

#[test]
fn block_device_input_is_backed_up_as_content() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("img.raw");
    fs::write(&img, mixed_data(21, 6)).expect("write");
    let out = std::process::Command::new("losetup")
        .args(["--find", "--show", "--read-only"])
        .arg(&img)
        .output();
    let dev = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        Ok(o) => {
            eprintln!(
                "SKIP block_device_input_is_backed_up_as_content: losetup failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return;
        }
        Err(e) => {
            eprintln!("SKIP block_device_input_is_backed_up_as_content: no losetup: {e}");
            return;
        }
    };
    let _guard = Loop(dev.clone());
    let store = BackupStore::for_pool(&tmp.path().join("pool"));
    let info = store
        .backup_paths(
            "Volume/blk",
            &serde_json::json!({}),
            &[("blk".into(), PathBuf::from(&dev))],
            &BackupOptions::default(),
        )
        .expect("backup of a block device");
    assert_eq!(info.stats.bytes, 6 << 20);
    let dest = tmp.path().join("r");
    store.restore(&info.id, &dest, None).expect("restore");
    assert_eq!(sha(&dest.join("blk")), sha(&img));
}
