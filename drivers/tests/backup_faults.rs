//! Backup store under faults: a full store, torn chunks, a tampered store, a caller's umask.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use stead_drivers::backup::store::{BackupOptions, BackupStore};

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
    let info = store
        .backup_paths(
            "Volume/v",
            &serde_json::json!({}),
            &[("disk".to_string(), vol)],
            &BackupOptions::default(),
        )
        .expect("backup");
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
