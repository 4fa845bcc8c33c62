//! btrfs pools on a loop-mounted btrfs made by the test (root needed).

mod storage_util;

use std::fs;
use std::os::unix::fs::FileExt;

use stead_drivers::storage::{self, PoolDriver, VolumeDriver};
use stead_reconciler::driver::{Driver, DriverError};
use stead_schema::{DeletionPolicy, PoolType, Resource, Spec};
use storage_util::*;

fn apply(d: &dyn Driver, r: &Resource, w: &World) -> Result<(), DriverError> {
    let o = d.observe(&[r], w)?;
    d.apply(r, &o[&r.id], w)
}

fn is_subvolume(p: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(p).map(|m| m.ino() == 256).unwrap_or(false)
}

#[test]
fn storage_btrfs_pool_volumes_and_snapshots() {
    let lb = match LoopBtrfs::new() {
        Ok(l) => l,
        Err(why) => {
            eprintln!("SKIP storage_btrfs_pool_volumes_and_snapshots: {why}");
            return;
        }
    };
    let image = lb.image.clone();
    let root = lb.mnt.join("pool");
    let env = env(lb.dir.path());
    let p = pool("fast", PoolType::Btrfs, &root);
    // Source image on the same btrfs: created by reflink.
    let src = lb.mnt.join("base.img");
    {
        let f = fs::File::create(&src).expect("create");
        f.set_len(4 * MI).expect("len");
        f.write_all_at(b"base-content", 0).expect("w");
        f.sync_all().expect("sync");
    }
    let v = with_policy(
        with_source(volume("vm1", "fast", 16 * MI), &src),
        DeletionPolicy::Delete,
    );
    let w = world(&[&p, &v]);
    let pd = PoolDriver::new(&env);
    let vd = VolumeDriver::new(&env);
    apply(&pd, &p, &w).expect("pool");
    apply(&vd, &v, &w).expect("volume");

    let sub = root.join("images/vm1");
    assert!(is_subvolume(&sub), "volume is a subvolume");
    let disk = storage::volume_path(&w, "vm1").expect("path");
    assert_eq!(disk, sub.join("disk.raw"));
    assert_eq!(fs::metadata(&disk).expect("stat").len(), 16 * MI);
    let o = vd.observe(&[&v], &w).expect("observe");
    assert!(o[&v.id].owned, "{:?}", o[&v.id]);
    assert_eq!(o[&v.id].state, vd.desired_state(&v, &w));

    // Grow in place.
    let v32 = with_policy(
        with_source(volume("vm1", "fast", 32 * MI), &src),
        DeletionPolicy::Delete,
    );
    let w32 = world(&[&p, &v32]);
    apply(&vd, &v32, &w32).expect("grow");
    assert_eq!(fs::metadata(&disk).expect("stat").len(), 32 * MI);

    // Snapshot (read-only btrfs snapshot), change, roll back.
    let Spec::StoragePool(ps) = &p.spec else {
        panic!("pool")
    };
    assert!(storage::supports_cheap_snapshots(ps));
    let info = storage::snapshot_create(&env, &w32, "vm1", "s1").expect("snapshot");
    assert_eq!(info.method, "btrfs");
    let snap = root.join("snapshots/vm1/s1");
    assert!(is_subvolume(&snap));
    assert!(
        fs::OpenOptions::new()
            .write(true)
            .open(snap.join("disk.raw"))
            .is_err(),
        "snapshot is read-only"
    );
    fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .and_then(|f| f.write_all_at(b"CHANGED-DATA", 0))
        .expect("write");
    storage::snapshot_rollback(&env, &w32, "vm1", "s1").expect("rollback");
    let mut b = [0u8; 12];
    fs::File::open(&disk)
        .and_then(|f| f.read_exact_at(&mut b, 0))
        .expect("read");
    assert_eq!(&b, b"base-content");
    assert!(
        !root.join("images/.vm1.tmp").exists(),
        "old content destroyed"
    );
    assert!(is_subvolume(&sub));
    let o = vd.observe(&[&v32], &w32).expect("observe");
    assert!(o[&v32.id].owned);
    let list = storage::snapshot_list(&env, &w32, "vm1").expect("list");
    assert_eq!(list.len(), 1);

    // Crash leftover of a create: a temp subvolume is removed by the next apply.
    let v2 = volume("vm2", "fast", MI);
    let w2 = world(&[&p, &v2]);
    stead_drivers::storage::btrfs::subvol_create(&root.join("images"), ".vm2.tmp")
        .expect("leftover");
    apply(&vd, &v2, &w2).expect("vm2");
    assert!(!root.join("images/.vm2.tmp").exists());
    assert!(is_subvolume(&root.join("images/vm2")));

    // Pool delete keeps volumes.
    let o = pd.observe(&[&p], &w).expect("observe pool");
    pd.delete(&p, &o[&p.id], &w)
        .expect("pool delete keeps data");
    assert!(root.join("images/vm2/disk.raw").exists());

    // A stale copy replication kept (stale-<time>, read-only) is the operator's data.
    let stale = format!(
        "{}1796620000",
        stead_drivers::storage::replicate::STALE_PREFIX
    );
    stead_drivers::storage::btrfs::snapshot(&sub, &root.join("snapshots/vm1"), &stale, true)
        .expect("stale copy");

    // Volume delete takes the subvolume and its snapshots, but not a kept stale copy.
    let o = vd.observe(&[&v32], &w32).expect("observe");
    vd.delete(&v32, &o[&v32.id], &w32).expect("delete");
    assert!(!sub.exists());
    assert!(!snap.exists());
    let stale_path = root.join("snapshots/vm1").join(&stale);
    assert!(
        is_subvolume(&stale_path),
        "the stale copy outlives the volume"
    );
    assert!(stale_path.join("disk.raw").exists());
    stead_drivers::storage::btrfs::subvol_destroy(&root.join("snapshots/vm1"), &stale)
        .expect("remove the stale copy");

    drop(lb);
    assert!(
        !LoopBtrfs::image_attached(&image),
        "loop device detached after the guard"
    );
}

#[test]
fn storage_btrfs_dir_pool_uses_reflink() {
    let lb = match LoopBtrfs::new() {
        Ok(l) => l,
        Err(why) => {
            eprintln!("SKIP storage_btrfs_dir_pool_uses_reflink: {why}");
            return;
        }
    };
    let env = env(lb.dir.path());
    let p = pool("d", PoolType::Dir, &lb.mnt.join("dpool"));
    let v = volume("big", "d", 64 * MI);
    let w = world(&[&p, &v]);
    apply(&PoolDriver::new(&env), &p, &w).expect("pool");
    apply(&VolumeDriver::new(&env), &v, &w).expect("volume");
    let disk = storage::volume_path(&w, "big").expect("path");
    fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .and_then(|f| f.write_all_at(&vec![0x5au8; 8 << 20], 0))
        .expect("write");
    let Spec::StoragePool(ps) = &p.spec else {
        panic!("pool")
    };
    assert!(
        storage::supports_cheap_snapshots(ps),
        "btrfs supports FICLONE"
    );
    let t = std::time::Instant::now();
    let info = storage::snapshot_create(&env, &w, "big", "s").expect("snapshot");
    eprintln!("reflink snapshot of a 64Mi volume took {:?}", t.elapsed());
    assert_eq!(info.method, "reflink");
    // Rollback goes through a reflink too.
    fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .and_then(|f| f.write_all_at(b"zzz", 0))
        .expect("write");
    storage::snapshot_rollback(&env, &w, "big", "s").expect("rollback");
    let mut b = [0u8; 3];
    fs::File::open(&disk)
        .and_then(|f| f.read_exact_at(&mut b, 0))
        .expect("read");
    assert_eq!(b, [0x5a; 3]);

    // A safety snapshot (cheap here) outlives the volume's deletion; others do not.
    let safety = storage::safety_snapshot(&env, &w, "big")
        .expect("safety snapshot")
        .expect("cheap snapshots on btrfs");
    assert!(
        safety.name.starts_with(storage::SAFETY_PREFIX),
        "{}",
        safety.name
    );
    let vd = VolumeDriver::new(&env);
    let o = vd.observe(&[&v], &w).expect("observe");
    vd.delete(&v, &o[&v.id], &w).expect("delete volume");
    assert!(!disk.exists());
    let left: Vec<String> = storage::snapshot_list(&env, &w, "big")
        .expect("list")
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0], safety.name);
    // Restoring from it brings the volume back.
    storage::snapshot_rollback(&env, &w, "big", &safety.name).expect("restore");
    fs::File::open(&disk)
        .and_then(|f| f.read_exact_at(&mut b, 0))
        .expect("read");
    assert_eq!(b, [0x5a; 3]);
}

#[test]
fn storage_btrfs_pool_on_other_fs_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let env = env(tmp.path());
    let path = tmp.path().join("notbtrfs");
    let p = pool("nb", PoolType::Btrfs, &path);
    let w = world(&[&p]);
    if stead_drivers::storage::btrfs::is_btrfs(tmp.path()).unwrap_or(false) {
        eprintln!("SKIP storage_btrfs_pool_on_other_fs_refused: temp dir is on btrfs");
        return;
    }
    let e = apply(&PoolDriver::new(&env), &p, &w).expect_err("not btrfs");
    assert!(matches!(e, DriverError::Unsupported(_)), "{e}");
}
