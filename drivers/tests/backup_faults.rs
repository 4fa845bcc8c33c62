//! Backup store under faults: a full store, torn chunks, a tampered store, a caller's umask.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use stead_drivers::backup::store::{BackupInfo, BackupOptions, BackupStore};

/// A small tmpfs mounted in the test's temp dir, unmounted on drop.
struct SmallFs {
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallFs {
    fn new(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().expect("tempdir");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).expect("mkdir");
        let r = nix::mount::mount(
            Some("tmpfs"),
            &mnt,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size},mode=0700").as_str()),
        );
        match r {
            Ok(()) => Some(SmallFs { mnt, _dir: dir }),
            Err(e) => {
                eprintln!("SKIP small tmpfs: cannot mount ({e})");
                None
            }
        }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        if nix::mount::umount2(&self.mnt, nix::mount::MntFlags::empty()).is_err() {
            let _ = nix::mount::umount2(&self.mnt, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Incompressible pseudo-random bytes (xorshift64*).
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Runs `f` on a thread and fails the test if it does not finish within `secs`.
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => v,
        Err(_) => panic!("{what} did not finish within {secs} s (hang)"),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Every file below `dir` whose name contains `.tmp`.
fn temp_files(dir: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .map(|e| e.path().to_path_buf())
        .collect()
}

#[test]
fn a_full_store_ends_the_backup_with_enospc_and_releases_the_lock() {
    let src = tempfile::tempdir().expect("tempdir");
    let vol = src.path().join("vol.raw");
    fs::write(&vol, random_bytes(7, 30 << 20)).expect("write volume");
    for threads in [1usize, 2, 4] {
        let Some(small) = SmallFs::new("20m") else {
            return;
        };
        let store = BackupStore::for_pool(&small.mnt);
        let (st, v) = (store.clone(), vol.clone());
        let r = within(
            60,
            &format!("backup into a full store ({threads} threads)"),
            move || {
                let opts = BackupOptions {
                    threads: Some(threads),
                    ..BackupOptions::default()
                };
                st.backup_paths(
                    "Volume/full",
                    &serde_json::json!({}),
                    &[("disk".to_string(), v)],
                    &opts,
                )
            },
        );
        let e = r.expect_err("the store is too small");
        let chain = error_chain(&e);
        assert!(
            chain.contains("No space left on device"),
            "{threads} threads: {chain}"
        );
        assert_eq!(
            temp_files(store.root()),
            Vec::<PathBuf>::new(),
            "{threads} threads"
        );
        // The lock is free: gc (exclusive) runs at once and removes the orphan chunks.
        let st = store.clone();
        let gc = within(20, "gc after a failed backup", move || st.gc()).expect("gc");
        assert_eq!(gc.referenced, 0);
        assert!(store.list(None).expect("list").is_empty(), "no manifest");
        drop(small);
    }
}

/// Every chunk file of the store.
/// Backs up `path` as the one input `input` of `resource`, with the default options.
fn backup_one(store: &BackupStore, resource: &str, input: &str, path: PathBuf) -> BackupInfo {
    store
        .backup_paths(
            resource,
            &serde_json::json!({}),
            &[(input.to_string(), path)],
            &BackupOptions::default(),
        )
        .expect("backup")
}

fn chunk_files(store: &BackupStore) -> Vec<PathBuf> {
    walkdir::WalkDir::new(store.root().join(".chunks"))
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| e.path().to_path_buf())
        .collect()
}

fn stamping_opts(level: Option<i32>) -> BackupOptions {
    BackupOptions {
        zstd_level: level,
        racy_secs: 0,
        ..BackupOptions::default()
    }
}

#[test]
fn a_truncated_chunk_is_rewritten_by_the_next_backup() {
    for level in [Some(1), None] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = BackupStore::for_pool(&tmp.path().join("pool"));
        let vol = tmp.path().join("vol.raw");
        fs::write(&vol, random_bytes(11, 3 << 20)).expect("write");
        let inputs = [("disk".to_string(), vol.clone())];
        let first = store
            .backup_paths(
                "Volume/v",
                &serde_json::json!({}),
                &inputs,
                &stamping_opts(level),
            )
            .expect("first backup");
        let chunks = chunk_files(&store);
        assert!(!chunks.is_empty());
        let victim = &chunks[0];
        let good_len = fs::metadata(victim).expect("stat").len();
        let f = fs::OpenOptions::new()
            .write(true)
            .open(victim)
            .expect("open");
        f.set_len(good_len / 2).expect("truncate");
        drop(f);
        assert!(
            !store.verify(&first.id).expect("verify").ok(),
            "torn chunk seen"
        );
        // The file is unchanged (same stamp): the torn chunk must still be written again.
        let second = store
            .backup_paths(
                "Volume/v",
                &serde_json::json!({}),
                &inputs,
                &stamping_opts(level),
            )
            .expect("second backup");
        assert_eq!(
            fs::metadata(victim).expect("stat").len(),
            good_len,
            "{level:?}: chunk rewritten whole"
        );
        assert!(store.verify(&second.id).expect("verify").ok(), "{level:?}");
        assert!(store.verify(&first.id).expect("verify").ok(), "{level:?}");
    }
}

#[test]
fn store_files_are_private_whatever_the_umask() {
    use nix::sys::stat::{Mode, umask};
    let old = umask(Mode::from_bits_truncate(0o022));
    let tmp = tempfile::tempdir().expect("tempdir");
    let pool = tmp.path().join("pool");
    fs::create_dir(&pool).expect("pool");
    let store = BackupStore::for_pool(&pool);
    let vol = tmp.path().join("vol.raw");
    fs::write(&vol, random_bytes(3, 1 << 20)).expect("write");
    let info = backup_one(&store, "Volume/v", "disk", vol);
    umask(old);
    let mut seen_files = 0;
    for e in walkdir::WalkDir::new(store.root()) {
        let e = e.expect("walk");
        let mode = e.metadata().expect("stat").permissions().mode() & 0o777;
        let want = if e.file_type().is_dir() { 0o700 } else { 0o600 };
        if !e.file_type().is_dir() {
            seen_files += 1;
        }
        assert_eq!(mode, want, "{}: {mode:o}", e.path().display());
    }
    assert!(seen_files >= 3, "lock, chunk and manifest checked");
    assert!(info.manifest.exists());
}

/// A small rootfs backed up as `Container/web` (input `rootfs`); returns the backup id and
/// its manifest path.
fn small_backup(store: &BackupStore, dir: &Path) -> (String, PathBuf) {
    let src = dir.join("src");
    fs::create_dir_all(src.join("etc")).expect("mkdir");
    fs::write(src.join("etc/hostname"), b"web\n").expect("write");
    let info = backup_one(store, "Container/web", "rootfs", src);
    (info.id, info.manifest)
}

/// Rewrites the manifest at `path` with `edit` (the JSON the format uses).
fn tamper(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_slice(&fs::read(path).expect("read")).expect("json");
    edit(&mut v);
    fs::write(path, serde_json::to_vec_pretty(&v).expect("ser")).expect("write");
}

/// The manifest entry of `etc/hostname`, as a template for hand-made entries.
fn hostname_entry(v: &serde_json::Value) -> serde_json::Value {
    v["files"]
        .as_array()
        .expect("files")
        .iter()
        .find(|f| f["path"] == "etc/hostname")
        .expect("entry")
        .clone()
}

fn push_file(v: &mut serde_json::Value, entry: serde_json::Value) {
    v["files"].as_array_mut().expect("files").push(entry);
}

/// Appends a copy of the `etc/hostname` entry under another `path`.
fn push_hostname_copy_at(v: &mut serde_json::Value, path: impl Into<serde_json::Value>) {
    let mut e = hostname_entry(v);
    e["path"] = path.into();
    push_file(v, e);
}

#[test]
fn a_tampered_store_cannot_make_restore_write_outside_its_target() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let outside = tmp.path().join("OUTSIDE");
    fs::create_dir(&outside).expect("mkdir");
    fs::write(outside.join("victim"), b"precious").expect("write");
    let to = tmp.path().join("a/b/to");
    fs::create_dir_all(&to).expect("mkdir");
    let up = "../../..";
    let outside_abs = outside.display().to_string();
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, &str, Edit)> = vec![
        (
            "input name with ..",
            "input",
            Box::new(move |v| {
                let name = format!("/{up}/OUTSIDE/x");
                v["inputs"][0]["name"] = name.clone().into();
                for f in v["files"].as_array_mut().expect("files") {
                    f["input"] = name.clone().into();
                }
            }),
        ),
        (
            "entry path with ..",
            "OUTSIDE/x",
            Box::new(move |v| {
                push_hostname_copy_at(v, format!("{up}/OUTSIDE/x"));
            }),
        ),
        (
            "absolute entry path",
            "/etc/x",
            Box::new(|v| {
                push_hostname_copy_at(v, "/etc/x");
            }),
        ),
        (
            "NUL in a name",
            "etc/a",
            Box::new(|v| {
                push_hostname_copy_at(v, "etc/a\u{0}b");
            }),
        ),
        (
            "file below a symlink",
            "a/victim",
            Box::new(move |v| {
                let mut link = hostname_entry(v);
                link["path"] = "a".into();
                link["type"] = "symlink".into();
                link["target"] = outside_abs.clone().into();
                link["size"] = 0.into();
                link.as_object_mut().expect("obj").remove("chunks");
                link.as_object_mut().expect("obj").remove("sha256");
                push_file(v, link);
                push_hostname_copy_at(v, "a/victim");
            }),
        ),
        (
            "digest with a path",
            "etc/hostname",
            Box::new(|v| {
                for f in v["files"].as_array_mut().expect("files") {
                    if f["path"] == "etc/hostname" {
                        f["chunks"][0]["digest"] = "../../../../../OUTSIDE/victim".into();
                    }
                }
            }),
        ),
    ];
    for (what, names, edit) in cases {
        let pool = tempfile::tempdir().expect("pool");
        let store = BackupStore::for_pool(pool.path());
        let (id, manifest) = small_backup(&store, tmp.path().join(what).as_path());
        tamper(&manifest, edit);
        let e = store.verify(&id).expect_err(what).to_string();
        assert!(
            e.contains("corrupt backup") && e.contains(names),
            "{what}: verify: {e}"
        );
        let e = store.restore(&id, &to, None).expect_err(what).to_string();
        assert!(e.contains(names), "{what}: restore: {e}");
        assert_eq!(
            fs::read(outside.join("victim")).expect("victim"),
            b"precious",
            "{what}"
        );
        let mut left: Vec<_> = fs::read_dir(&outside)
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        left.sort();
        assert_eq!(left, ["victim"], "{what}: nothing written outside");
        assert_eq!(
            fs::read_dir(&to).expect("ls").count(),
            0,
            "{what}: nothing restored"
        );
    }
}

#[test]
fn a_zero_chunk_beyond_the_chunking_limit_is_corruption_not_a_spin() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = BackupStore::for_pool(&tmp.path().join("pool"));
    let (id, manifest) = small_backup(&store, tmp.path());
    tamper(&manifest, |v| {
        let mut e = hostname_entry(v);
        e["path"] = "etc/huge".into();
        e["size"] = 1_000_000_000_000u64.into();
        e["chunks"] = serde_json::json!([{"zero": true, "size": 1_000_000_000_000u64}]);
        push_file(v, e);
    });
    let st = store.clone();
    let i = id.clone();
    let e = within(30, "verify of a huge zero chunk", move || st.verify(&i))
        .expect_err("corrupt")
        .to_string();
    assert!(e.contains("etc/huge") && e.contains("size"), "{e}");
    let to = tmp.path().join("to");
    let e = store
        .restore(&id, &to, None)
        .expect_err("corrupt")
        .to_string();
    assert!(e.contains("etc/huge"), "{e}");
}

/// Stand-in for EIO: a chunk that cannot be read (a directory in its place).
#[test]
fn an_unreadable_chunk_is_named_by_verify_and_fails_restore() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = BackupStore::for_pool(&tmp.path().join("pool"));
    let vol = tmp.path().join("vol.raw");
    fs::write(&vol, random_bytes(5, 6 << 20)).expect("write");
    let info = backup_one(&store, "Volume/v", "disk", vol);
    let chunks = chunk_files(&store);
    assert!(chunks.len() >= 4, "several chunks: {}", chunks.len());
    let victim = &chunks[chunks.len() / 2];
    fs::remove_file(victim).expect("rm");
    fs::create_dir(victim).expect("a directory in its place");
    let name = victim.display().to_string();
    let report = store.verify(&info.id).expect("verify runs");
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    let shown = report.problems[0].to_string();
    assert!(
        shown.contains("unreadable") && shown.contains(&name),
        "{shown}"
    );
    let e = store
        .restore(&info.id, &tmp.path().join("to"), None)
        .expect_err("restore fails")
        .to_string();
    assert!(e.contains(&name), "{e}");
    assert!(
        !tmp.path().join("to/disk").exists(),
        "nothing half restored"
    );
}
