//! nfs, lvmthin and zfs pools. Each runs for real only where the host has the feature
//! and prints `SKIP <test>: <reason>` otherwise; where the feature is missing, the
//! drivers must say so with `DriverError::Unsupported`.

mod storage_util;

use stead_drivers::storage::{PoolDriver, VolumeDriver, lvm, zfs};
use stead_reconciler::driver::{Driver, DriverError};
use stead_schema::{LvmSpec, NfsSpec, PoolType, Resource, Spec, ZfsSpec};
use storage_util::*;

fn apply(d: &dyn Driver, r: &Resource, w: &World) -> Result<(), DriverError> {
    let o = d.observe(&[r], w)?;
    d.apply(r, &o[&r.id], w)
}

fn kernel_has_nfs() -> bool {
    std::fs::read_to_string("/proc/filesystems")
        .map(|t| {
            t.lines()
                .any(|l| l.split_whitespace().last() == Some("nfs"))
        })
        .unwrap_or(false)
}

#[test]
fn storage_nfs_pool() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let env = env(tmp.path());
    let mut p = pool("shared", PoolType::Nfs, &tmp.path().join("mnt"));
    let export = std::env::var("STEAD_TEST_NFS").ok();
    let (server, path) = export
        .as_deref()
        .and_then(|e| e.split_once(":/"))
        .map(|(s, x)| (s.to_string(), format!("/{x}")))
        .unwrap_or_else(|| ("192.0.2.1".into(), "/export".into()));
    if let Spec::StoragePool(s) = &mut p.spec {
        s.nfs = Some(NfsSpec {
            server,
            export: path,
            options: Some("soft,timeo=20,retrans=1".into()),
        });
    }
    let w = world(&[&p]);
    let pd = PoolDriver::new(&env);
    if !kernel_has_nfs() {
        let e = apply(&pd, &p, &w).expect_err("no NFS client");
        assert!(matches!(e, DriverError::Unsupported(_)), "{e}");
        eprintln!("SKIP storage_nfs_pool: kernel lacks an NFS client");
        return;
    }
    if export.is_none() {
        eprintln!("SKIP storage_nfs_pool: no NFS server (set STEAD_TEST_NFS=server:/export)");
        return;
    }
    apply(&pd, &p, &w).expect("mount and lay out");
    let o = pd.observe(&[&p], &w).expect("observe");
    assert!(o[&p.id].owned);
    assert_eq!(o[&p.id].state, pd.desired_state(&p, &w));
    let v = volume("nfsvol", "shared", 4 * MI);
    let wv = world(&[&p, &v]);
    let vd = VolumeDriver::new(&env);
    apply(&vd, &v, &wv).expect("volume on nfs");
    let o = vd.observe(&[&v], &wv).expect("observe");
    vd.delete(&v, &o[&v.id], &wv).expect("delete volume");
    let o = pd.observe(&[&p], &w).expect("observe");
    pd.delete(&p, &o[&p.id], &w).expect("unmount");
    assert!(!tmp.path().join("mnt").exists());
}

#[test]
fn storage_lvmthin_pool() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let env = env(tmp.path());
    let mut p = pool("thin", PoolType::Lvmthin, &tmp.path().join("thin"));
    let vg = format!("steadtest{}", std::process::id());
    if let Spec::StoragePool(s) = &mut p.spec {
        s.lvm = Some(LvmSpec {
            volume_group: vg.clone(),
            thin_pool: "pool".into(),
        });
    }
    let w = world(&[&p]);
    let pd = PoolDriver::new(&env);
    let e = apply(&pd, &p, &w).expect_err("the VG does not exist");
    if !lvm::have_device_mapper() {
        assert!(
            matches!(&e, DriverError::Unsupported(m) if m == "kernel lacks device-mapper"),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "unsupported on this host: kernel lacks device-mapper"
        );
        eprintln!("SKIP storage_lvmthin_pool: kernel lacks device-mapper");
        return;
    }
    // With device-mapper: a VG that does not exist is lvs's failure, never a panic.
    match &e {
        DriverError::Command {
            command, stderr, ..
        } => {
            assert!(
                command.starts_with("lvs ") && command.ends_with(&format!(" -- {vg}")),
                "{command}"
            );
            assert!(
                stderr.contains(&format!("Volume group \"{vg}\" not found")),
                "{stderr}"
            );
        }
        DriverError::Unsupported(m) => assert_eq!(m, "lvs not found (install lvm2)"),
        other => panic!("expected lvs to fail on the missing VG, got {other:?}"),
    }
    eprintln!(
        "SKIP storage_lvmthin_pool (volume part): needs a scratch VG {vg}; run on a CI host with lvm2"
    );
}

#[test]
fn storage_zfs_pool() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let env = env(tmp.path());
    let mut p = pool("z", PoolType::Zfs, &tmp.path().join("z"));
    if let Spec::StoragePool(s) = &mut p.spec {
        s.zfs = Some(ZfsSpec {
            dataset: format!("steadtest{}/data", std::process::id()),
        });
    }
    let w = world(&[&p]);
    let pd = PoolDriver::new(&env);
    let dataset = format!("steadtest{}/data", std::process::id());
    let e = apply(&pd, &p, &w).expect_err("the dataset does not exist");
    if !zfs::have_zfs() {
        assert!(
            matches!(&e, DriverError::Unsupported(m) if m == "kernel lacks ZFS"),
            "{e:?}"
        );
        assert_eq!(e.to_string(), "unsupported on this host: kernel lacks ZFS");
        eprintln!("SKIP storage_zfs_pool: kernel lacks ZFS");
        return;
    }
    // With ZFS: a missing dataset is zfs's failure, never a panic.
    match &e {
        DriverError::Command {
            command, stderr, ..
        } => {
            assert_eq!(command, &format!("zfs list -Hp -o name -- {dataset}"));
            assert!(
                stderr.contains(&format!("cannot open '{dataset}': dataset does not exist")),
                "{stderr}"
            );
        }
        DriverError::Unsupported(m) => assert_eq!(m, "zfs not found (install zfsutils-linux)"),
        other => panic!("expected zfs to fail on the missing dataset, got {other:?}"),
    }
    eprintln!(
        "SKIP storage_zfs_pool (volume part): needs a scratch zpool; run on a CI host with zfsutils-linux"
    );
}

#[test]
fn storage_pool_type_change_refused_when_holding_data() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let env = env(tmp.path());
    let root = tmp.path().join("pool");
    let p = pool("local", PoolType::Dir, &root);
    let v = volume("v", "local", MI);
    let w = world(&[&p, &v]);
    let pd = PoolDriver::new(&env);
    apply(&pd, &p, &w).expect("pool");
    apply(&VolumeDriver::new(&env), &v, &w).expect("volume");
    let mut p2 = p.clone();
    if let Spec::StoragePool(s) = &mut p2.spec {
        s.pool_type = PoolType::Btrfs;
    }
    let w2 = world(&[&p2, &v]);
    let e = apply(&pd, &p2, &w2).expect_err("type change");
    assert!(
        matches!(&e, DriverError::Refused(m) if m.contains("from dir to btrfs is refused")),
        "{e}"
    );
    assert!(root.join("images/v.raw").exists());
    let o = pd.observe(&[&p], &w).expect("observe");
    assert_eq!(o[&p.id].state["type"], "dir");
}

#[test]
fn storage_volume_needs_images_content() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let env = env(tmp.path());
    let mut p = pool("bk", PoolType::Dir, &tmp.path().join("bk"));
    if let Spec::StoragePool(s) = &mut p.spec {
        s.content = vec![stead_schema::Content::Backup];
    }
    let v = volume("v", "bk", MI);
    let w = world(&[&p, &v]);
    apply(&PoolDriver::new(&env), &p, &w).expect("pool");
    assert!(tmp.path().join("bk/backups").is_dir());
    let e = apply(&VolumeDriver::new(&env), &v, &w).expect_err("no images content");
    assert!(
        matches!(&e, DriverError::Refused(m)
            if m == "StoragePool/bk does not allow volumes (content needs images or rootdir)"),
        "{e:?}"
    );
}
