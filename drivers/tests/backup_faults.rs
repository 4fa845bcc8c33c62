//! Backup store under faults: a full store, torn chunks, a tampered store, a caller's umask.

use std::fs;
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
