//! Snapshots of volumes in a dir pool on the temp dir's file system (ext4 here: full
//! sparse copies; a reflink-capable file system makes reflinks).

mod storage_util;

use std::fs;
use std::os::unix::fs::FileExt;

use stead_drivers::storage::{self, PoolDriver, VolumeDriver};
use stead_reconciler::driver::{Driver, DriverError};
use stead_schema::{DeletionPolicy, PoolType, Resource, Spec};
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

/// Workload snapshots of a stopped VM with two disks in a dir pool: one snapshot name
/// across both disks; a rollback is refused while one disk lacks it, and rolls both back
/// otherwise (nothing running: no restart). A Volume target works the same way.
#[test]
fn workload_snapshot_covers_every_disk_and_refuses_an_incomplete_one() {
    use stead_drivers::storage::workload_snapshot as ws;
    use stead_schema::{Kind, ResourceId};

    let tmp = tempfile::tempdir().expect("tempdir");
    let env = env(tmp.path());
    let p = pool("local", PoolType::Dir, &tmp.path().join("pool"));
    let a = volume("a", "local", 4 * MI);
    let b = volume("b", "local", 4 * MI);
    let vm = res(
        Kind::VirtualMachine,
        "vm1",
        Spec::from_value(
            Kind::VirtualMachine,
            serde_json::json!({"cpus": 1, "memory": "32Mi", "boot": {"kernel": "/k"},
                               "disks": [{"volume": "a"}, {"volume": "b"}], "state": "stopped"}),
        )
        .expect("vm spec"),
    );
    let w = world(&[&p, &a, &b, &vm]);
    apply(&PoolDriver::new(&env), &p, &w);
    let vd = VolumeDriver::new(&env);
    apply(&vd, &a, &w);
    apply(&vd, &b, &w);
    let file = |v: &str| storage::volume_path(&w, v).expect("path");
    let put = |v: &str, byte: u8| {
        fs::OpenOptions::new()
            .write(true)
            .open(file(v))
            .and_then(|f| f.write_all_at(&[byte; 512], 0))
            .expect("write");
    };
    let get = |v: &str| {
        let mut x = [0u8; 1];
        fs::File::open(file(v))
            .and_then(|f| f.read_exact_at(&mut x, 0))
            .expect("read");
        x[0]
    };
    put("a", 1);
    put("b", 2);
    let id = ResourceId::new(Kind::VirtualMachine, "vm1");
    let c = ws::create(&env, &w, &id, "s1").expect("create");
    assert_eq!(
        c.parts.iter().map(|(l, _)| l.as_str()).collect::<Vec<_>>(),
        ["Volume/a", "Volume/b"]
    );
    assert_eq!(c.consistency, "not running");
    assert!(matches!(
        ws::create(&env, &w, &id, "s1"),
        Err(DriverError::Conflict(_))
    ));
    put("a", 9);
    put("b", 9);
    let plan = ws::rollback_plan(&env, &w, &id, "s1").expect("plan");
    assert_eq!(plan.parts(), ["Volume/a", "Volume/b"]);
    assert!(plan.running.is_empty());
    ws::rollback(&env, &w, &plan).expect("rollback");
    assert_eq!((get("a"), get("b")), (1, 2), "both disks rolled back");

    // One disk loses the snapshot: listed as incomplete, rollback refused by name.
    storage::snapshot_delete(&env, &w, "b", "s1").expect("delete one");
    let l = ws::list(&env, &w, &id).expect("list");
    assert_eq!(l.len(), 1);
    assert!(!l[0].complete);
    assert_eq!(l[0].parts, ["Volume/a"]);
    let e = ws::rollback_plan(&env, &w, &id, "s1")
        .err()
        .expect("incomplete");
    assert!(e.to_string().contains("Volume/b"), "{e}");

    // A Volume target, then delete from every part.
    let vid = ResourceId::new(Kind::Volume, "b");
    ws::create(&env, &w, &vid, "s2").expect("volume snapshot");
    assert_eq!(ws::list(&env, &w, &vid).expect("list")[0].name, "s2");
    assert_eq!(
        ws::delete(&env, &w, &id, "s1").expect("delete"),
        ["Volume/a", "Volume/b"]
    );
    assert!(
        ws::list(&env, &w, &id)
            .expect("list")
            .iter()
            .all(|s| s.name != "s1")
    );
}

#[test]
fn storage_snapshot_copy_into_full_pool_leaves_no_temp() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = tmp.path().to_path_buf();
    in_private_mount_ns(move || {
        let pool_dir = base.join("pool");
        // tmpfs has no reflinks: a snapshot is a full copy.
        mount_tmpfs(&pool_dir, 20 * MI);
        let env = env(&base);
        let p = pool("local", PoolType::Dir, &pool_dir);
        let src = base.join("content.img");
        fs::write(&src, vec![0x77u8; 12 * MI as usize]).expect("write source");
        let v = with_source(volume("db", "local", 12 * MI), &src);
        let w = world(&[&p, &v]);
        apply(&PoolDriver::new(&env), &p, &w);
        apply(&VolumeDriver::new(&env), &v, &w);
        let err = storage::snapshot_create(&env, &w, "db", "s1").expect_err("the pool is full");
        match &err {
            DriverError::Io { source, .. } => {
                assert_eq!(source.kind(), std::io::ErrorKind::StorageFull, "{err}")
            }
            other => panic!("expected ENOSPC, got {other:?}"),
        }
        let left: Vec<_> = fs::read_dir(pool_dir.join("snapshots/db"))
            .expect("readdir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert!(left.is_empty(), "{left:?}");
    });
}
