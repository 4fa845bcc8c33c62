//! Snapshots of volumes in a dir pool on the temp dir's file system (ext4 here: full
//! sparse copies; a reflink-capable file system makes reflinks).

mod storage_util;

use std::fs;
use std::os::unix::fs::FileExt;

use stead_drivers::storage::{self, PoolDriver, VolumeDriver};
use stead_schema::{DeletionPolicy, Driver, DriverError, PoolType, Resource, Spec};
use storage_util::*;

fn apply(d: &dyn Driver, r: &Resource, w: &World) {
    let o = d.observe(&[r], w).expect("observe");
    d.apply(r, &o[&r.id], w).expect("apply");
}

#[test]
fn storage_snapshot_dir_create_list_rollback_delete() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let env = env(tmp.path());
    let p = pool("local", PoolType::Dir, &tmp.path().join("pool"));
    let v = with_policy(volume("db", "local", 8 * MI), DeletionPolicy::Delete);
    let w = world(&[&p, &v]);
    apply(&PoolDriver::new(&env), &p, &w);
    let vd = VolumeDriver::new(&env);
    apply(&vd, &v, &w);
    let file = storage::volume_path(&w, "db").expect("path");
    let write = |data: &[u8], off: u64| {
        fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .and_then(|f| f.write_all_at(data, off))
            .expect("write");
    };
    let read = |len: usize, off: u64| {
        let mut b = vec![0u8; len];
        fs::File::open(&file)
            .and_then(|f| f.read_exact_at(&mut b, off))
            .expect("read");
        b
    };
    write(b"version-1", 0);
    write(b"far", 6 * MI);

    let Spec::StoragePool(ps) = &p.spec else {
        panic!("pool spec")
    };
    let cheap = storage::supports_cheap_snapshots(ps);
    assert_eq!(
        storage::safety_snapshot(&env, &w, "db")
            .expect("safety")
            .is_some(),
        cheap,
        "a safety snapshot is taken exactly when snapshots are cheap"
    );
    if cheap {
        for s in storage::snapshot_list(&env, &w, "db").expect("list") {
            storage::snapshot_delete(&env, &w, "db", &s.name).expect("delete");
        }
    }
    let info = storage::snapshot_create(&env, &w, "db", "before").expect("create");
    assert_eq!(info.name, "before");
    assert_eq!(info.size, Some(8 * MI));
    assert_eq!(info.method, if cheap { "reflink" } else { "sparse-copy" });
    let snap_file = tmp.path().join("pool/snapshots/db/before.raw");
    assert!(snap_file.is_file());
    assert!(allocated(&snap_file) < 2 * MI, "snapshot copy stays sparse");
    assert!(matches!(
        storage::snapshot_create(&env, &w, "db", "before"),
        Err(DriverError::Conflict(_))
    ));
    assert!(storage::snapshot_create(&env, &w, "db", "../x").is_err());

    write(b"version-2", 0);
    storage::snapshot_create(&env, &w, "db", "after").expect("create 2");
    let names: Vec<String> = storage::snapshot_list(&env, &w, "db")
        .expect("list")
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["after", "before"]);

    // Roll back: content restored, volume still owned and observed the same.
    storage::snapshot_rollback(&env, &w, "db", "before").expect("rollback");
    assert_eq!(read(9, 0), b"version-1");
    assert_eq!(read(3, 6 * MI), b"far");
    let o = vd.observe(&[&v], &w).expect("observe");
    assert!(o[&v.id].owned);
    assert_eq!(o[&v.id].state, vd.desired_state(&v, &w));
    assert!(!tmp.path().join("pool/images/.db.raw.tmp").exists());
    assert!(storage::snapshot_rollback(&env, &w, "db", "missing").is_err());

    storage::snapshot_delete(&env, &w, "db", "after").expect("delete");
    storage::snapshot_delete(&env, &w, "db", "after").expect("delete again");
    assert_eq!(
        storage::snapshot_list(&env, &w, "db").expect("list").len(),
        1
    );

    // Deleting the volume (policy Delete) takes its snapshots along.
    let o = vd.observe(&[&v], &w).expect("observe");
    vd.delete(&v, &o[&v.id], &w).expect("delete volume");
    assert!(!file.exists());
    assert!(!tmp.path().join("pool/snapshots/db").exists());
}
