//! Restore and verify of a tampered backup store: any bytes as a backup manifest must give
//! an error or a restore confined to the target directory — never a write outside it, a
//! panic, or a hang.
use std::fs;
use std::path::Path;

use stead_drivers::backup::store::BackupStore;

const ID: &str = "Volume/x/2025-01-01T00:00:00Z";

fn entries_below(dir: &Path) -> usize {
    fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// One fuzz input; panics on a broken property. Returns whether the restore succeeded.
pub fn run(data: &[u8]) -> bool {
    let Ok(tmp) = tempfile::tempdir() else {
        return false;
    };
    let pool = tmp.path().join("pool");
    let manifest_dir = pool.join("backups/Volume/x");
    let outside = tmp.path().join("outside");
    let to = tmp.path().join("restore");
    if fs::create_dir_all(&manifest_dir).is_err()
        || fs::create_dir_all(&outside).is_err()
        || fs::create_dir_all(&to).is_err()
    {
        return false;
    }
    if fs::write(manifest_dir.join("2025-01-01T00:00:00Z.json"), data).is_err() {
        return false;
    }
    let store = BackupStore::for_pool(&pool);
    let _ = store.verify(ID);
    let restored = store.restore(ID, &to, None).is_ok();
    // Whatever the manifest says, nothing may appear beside the restore target.
    assert_eq!(
        entries_below(&outside),
        0,
        "restore wrote into a sibling directory"
    );
    let top: Vec<_> = fs::read_dir(tmp.path())
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(top.len() <= 3, "restore created {top:?} beside its target");
    restored
}
