//! Real-file tests of the dir StoragePool and Volume drivers (temp dirs only).

mod storage_util;

use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;

use stead_drivers::storage::{self, PoolDriver, VolumeDriver};
use stead_reconciler::driver::{Driver, DriverError, FieldChange, Impact, Observed, PruneAction};
use stead_schema::{DeletionPolicy, Kind, Name, PoolType, ResourceId};
use storage_util::*;

fn observe_one(d: &dyn Driver, r: &stead_schema::Resource, w: &World) -> Observed {
    let m = d.observe(&[r], w).expect("observe");
    m.get(&r.id).cloned().expect("observed entry")
}

#[test]
fn storage_pool_create_adopt_and_unowned() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let env = env(tmp.path());
    let pd = PoolDriver::new(&env);

    // Absent → created with parents, marker and layout.
    let p = pool("local", PoolType::Dir, &tmp.path().join("a/b/pool"));
    let w = world(&[&p]);
    let o = observe_one(&pd, &p, &w);
    assert!(!o.exists);
    pd.apply(&p, &o, &w).expect("apply");
    let root = tmp.path().join("a/b/pool");
    assert!(root.join(storage::MARKER_FILE).is_file());
    assert!(root.join("images").is_dir());
    assert!(root.join("rootfs").is_dir());
    let o = observe_one(&pd, &p, &w);
    assert!(o.exists && o.owned);
    assert_eq!(o.state, pd.desired_state(&p, &w));
    // Idempotent.
    pd.apply(&p, &o, &w).expect("apply again");

    // An empty existing directory is adopted.
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).expect("mkdir");
    let p2 = pool("adopt", PoolType::Dir, &empty);
    let o = observe_one(&pd, &p2, &world(&[&p2]));
    assert!(o.exists && o.owned, "{o:?}");
    pd.apply(&p2, &o, &world(&[&p2])).expect("adopt");
    assert!(empty.join(storage::MARKER_FILE).is_file());

    // A non-empty directory without marker is not ours.
    let full = tmp.path().join("full");
    fs::create_dir(&full).expect("mkdir");
    fs::write(full.join("user-data.txt"), b"precious").expect("write");
    let p3 = pool("full", PoolType::Dir, &full);
    let w3 = world(&[&p3]);
    let o = observe_one(&pd, &p3, &w3);
    assert!(o.exists && !o.owned, "{o:?}");
    assert!(pd.check(&p3, &o, &[]).is_err());
    assert!(matches!(
        pd.apply(&p3, &o, &w3),
        Err(DriverError::Conflict(_))
    ));
    assert!(!full.join(storage::MARKER_FILE).exists());

    // A marker naming another pool is not ours either.
    let p4 = pool("other", PoolType::Dir, &root);
    let w4 = world(&[&p4]);
    let o = observe_one(&pd, &p4, &w4);
    assert!(o.exists && !o.owned, "{o:?}");
    assert!(matches!(
        pd.apply(&p4, &o, &w4),
        Err(DriverError::Conflict(_))
    ));

    // A pool path that is a symlink is refused.
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&empty, &link).expect("symlink");
    let p5 = pool("link", PoolType::Dir, &link);
    let w5 = world(&[&p5]);
    let o = observe_one(&pd, &p5, &w5);
    assert!(o.exists && !o.owned);
    assert!(matches!(
        pd.apply(&p5, &o, &w5),
        Err(DriverError::Refused(_))
    ));
}

#[test]
fn storage_pool_delete_keeps_data() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let env = env(tmp.path());
    let pd = PoolDriver::new(&env);
    let vd = VolumeDriver::new(&env);
    let root = tmp.path().join("pool");
    let p = pool("local", PoolType::Dir, &root);
    let v = volume("keep", "local", 4 * MI);
    let w = world(&[&p, &v]);
    pd.apply(&p, &observe_one(&pd, &p, &w), &w).expect("pool");
    vd.apply(&v, &observe_one(&vd, &v, &w), &w).expect("volume");

    // Holds a volume: left in place, Ok.
    pd.delete(&p, &observe_one(&pd, &p, &w), &w)
        .expect("delete keeps");
    assert!(root.join("images/keep.raw").is_file());
    assert!(root.join(storage::MARKER_FILE).is_file());

    // Empty layout: removed, and deleting again is fine.
    fs::remove_file(root.join("images/keep.raw")).expect("rm");
    pd.delete(&p, &observe_one(&pd, &p, &w), &w)
        .expect("delete");
    assert!(!root.exists());
    pd.delete(&p, &observe_one(&pd, &p, &w), &w)
        .expect("delete again");
    assert_eq!(pd.prune_action(&p), PruneAction::Delete);
}

fn setup(tmp: &std::path::Path) -> (PoolDriver, VolumeDriver, stead_schema::Resource) {
    let env = env(tmp);
    let pd = PoolDriver::new(&env);
    let vd = VolumeDriver::new(&env);
    let p = pool("local", PoolType::Dir, &tmp.join("pool"));
    let w = world(&[&p]);
    pd.apply(&p, &observe_one(&pd, &p, &w), &w).expect("pool");
    (pd, vd, p)
}

#[test]
fn storage_volume_create_observe_grow_refuse_shrink() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_pd, vd, p) = setup(tmp.path());
    let v = volume("data", "local", 32 * MI);
    let w = world(&[&p, &v]);
    let o = observe_one(&vd, &v, &w);
    assert!(!o.exists);
    vd.apply(&v, &o, &w).expect("create");
    let file = tmp.path().join("pool/images/data.raw");
    assert_eq!(fs::metadata(&file).expect("stat").len(), 32 * MI);
    assert!(allocated(&file) < MI, "new volume must be sparse");
    assert_eq!(storage::volume_path(&w, "data").expect("volume_path"), file);
    assert_eq!(
        storage::pool_path(&w, "local").expect("pool_path"),
        tmp.path().join("pool")
    );

    let o = observe_one(&vd, &v, &w);
    assert!(o.exists && o.owned, "{o:?}");
    assert_eq!(o.state, vd.desired_state(&v, &w));
    assert_eq!(o.state["size"], 32 * MI);
    assert_eq!(o.status["ownerMark"], "xattr", "ext4 has user xattrs");

    // Content survives a grow.
    fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .and_then(|f| f.write_all_at(b"hello", 4096))
        .expect("write");
    let v64 = volume("data", "local", 64 * MI);
    let w64 = world(&[&p, &v64]);
    assert_eq!(vd.impact("/size"), Impact::Hot);
    assert_eq!(vd.impact("/pool"), Impact::DataLoss);
    vd.check(&v64, &o, &[]).expect("grow is fine");
    vd.apply(&v64, &o, &w64).expect("grow");
    assert_eq!(fs::metadata(&file).expect("stat").len(), 64 * MI);
    let mut buf = [0u8; 5];
    fs::File::open(&file)
        .and_then(|f| f.read_exact_at(&mut buf, 4096))
        .expect("read");
    assert_eq!(&buf, b"hello");

    // Shrink refused at plan time and at apply time.
    let o = observe_one(&vd, &v64, &w64);
    let v16 = volume("data", "local", 16 * MI);
    let w16 = world(&[&p, &v16]);
    let change = FieldChange {
        path: "/size".into(),
        old: Some((64 * MI).into()),
        new: Some((16 * MI).into()),
        impact: Impact::Hot,
    };
    let err = vd.check(&v16, &o, &[change]).expect_err("shrink refused");
    assert!(
        err.starts_with("shrinking Volume/data from 64Mi to 16Mi is refused: "),
        "{err}"
    );
    assert!(
        vd.check(&v16, &o, &[]).is_err(),
        "refused from observed size too"
    );
    assert!(matches!(
        vd.apply(&v16, &o, &w16),
        Err(DriverError::Refused(_))
    ));
    assert_eq!(fs::metadata(&file).expect("stat").len(), 64 * MI);
}

#[test]
fn storage_volume_escape_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_pd, vd, p) = setup(tmp.path());
    // A name with '..' (cannot come from a manifest, but may from elsewhere).
    let mut bad = volume("x", "local", MI);
    bad.id = ResourceId::new(Kind::Volume, "../escape");
    bad.metadata.name = Name("../escape".into());
    let w = world(&[&p, &bad]);
    assert!(matches!(
        vd.apply(&bad, &observe_one(&vd, &bad, &w), &w),
        Err(DriverError::Refused(_))
    ));
    assert!(!tmp.path().join("pool/escape.raw").exists());
    assert!(matches!(
        storage::volume_path(&w, "../escape"),
        Err(DriverError::Refused(_))
    ));

    // A symlinked volume file inside the pool.
    let outside = tmp.path().join("outside.raw");
    fs::write(&outside, b"not yours").expect("write");
    std::os::unix::fs::symlink(&outside, tmp.path().join("pool/images/link.raw")).expect("ln");
    let v = volume("link", "local", MI);
    let w = world(&[&p, &v]);
    let o = observe_one(&vd, &v, &w);
    assert!(o.exists && !o.owned, "{o:?}");
    assert!(vd.check(&v, &o, &[]).is_err());
    assert!(vd.apply(&v, &o, &w).is_err());
    assert_eq!(fs::read(&outside).expect("read"), b"not yours");

    // images/ itself a symlink to elsewhere.
    let tmp2 = tempfile::tempdir().expect("tempdir");
    let (_pd2, vd2, p2) = setup(tmp2.path());
    let elsewhere = tmp2.path().join("elsewhere");
    fs::create_dir(&elsewhere).expect("mkdir");
    fs::remove_dir(tmp2.path().join("pool/images")).expect("rmdir");
    std::os::unix::fs::symlink(&elsewhere, tmp2.path().join("pool/images")).expect("ln");
    let v2 = volume("v", "local", MI);
    let w2 = world(&[&p2, &v2]);
    assert!(matches!(
        vd2.apply(&v2, &observe_one(&vd2, &v2, &w2), &w2),
        Err(DriverError::Refused(_))
    ));
    assert_eq!(fs::read_dir(&elsewhere).expect("ls").count(), 0);

    // The pool path itself a symlink to elsewhere.
    let link_pool = pool("lp", PoolType::Dir, &tmp2.path().join("lp"));
    std::os::unix::fs::symlink(tmp2.path().join("pool"), tmp2.path().join("lp")).expect("ln");
    let v3 = volume("v3", "lp", MI);
    let w3 = world(&[&link_pool, &v3]);
    assert!(matches!(
        vd2.apply(&v3, &observe_one(&vd2, &v3, &w3), &w3),
        Err(DriverError::Refused(_))
    ));
    assert!(matches!(
        storage::volume_path(&w3, "v3"),
        Err(DriverError::Refused(_))
    ));
}

#[test]
fn storage_volume_retain_vs_delete() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_pd, vd, p) = setup(tmp.path());
    let keep = volume("keep", "local", MI);
    let gone = with_policy(volume("gone", "local", MI), DeletionPolicy::Delete);
    let w = world(&[&p, &keep, &gone]);
    for v in [&keep, &gone] {
        vd.apply(v, &observe_one(&vd, v, &w), &w).expect("create");
    }
    assert_eq!(vd.prune_action(&keep), PruneAction::Retain);
    assert_eq!(vd.prune_action(&gone), PruneAction::Delete);
    let f = tmp.path().join("pool/images/gone.raw");
    assert!(f.exists());
    vd.delete(&gone, &observe_one(&vd, &gone, &w), &w)
        .expect("delete");
    assert!(!f.exists());
    // Idempotent: absent is success.
    vd.delete(&gone, &observe_one(&vd, &gone, &w), &w)
        .expect("delete again");
    assert!(tmp.path().join("pool/images/keep.raw").exists());
}

#[test]
fn storage_volume_unowned_file_untouched() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_pd, vd, p) = setup(tmp.path());
    let f = tmp.path().join("pool/images/user.raw");
    fs::write(&f, b"user data").expect("write");
    let v = with_policy(volume("user", "local", MI), DeletionPolicy::Delete);
    let w = world(&[&p, &v]);
    let o = observe_one(&vd, &v, &w);
    assert!(o.exists && !o.owned);
    assert!(vd.check(&v, &o, &[]).is_err());
    assert!(matches!(
        vd.apply(&v, &o, &w),
        Err(DriverError::Conflict(_))
    ));
    assert!(matches!(
        vd.delete(&v, &o, &w),
        Err(DriverError::Conflict(_))
    ));
    assert_eq!(fs::read(&f).expect("read"), b"user data");
}

#[test]
fn storage_volume_sidecar_mark_is_honoured() {
    // File systems without user xattrs get a sidecar `<file>.stead`; reading it back
    // must count as ownership.
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_pd, vd, p) = setup(tmp.path());
    let f = tmp.path().join("pool/images/side.raw");
    fs::File::create(&f)
        .and_then(|h| h.set_len(MI))
        .expect("create");
    fs::write(
        tmp.path().join("pool/images/side.raw.stead"),
        b"Volume/side",
    )
    .expect("sidecar");
    let v = volume("side", "local", 2 * MI);
    let w = world(&[&p, &v]);
    let o = observe_one(&vd, &v, &w);
    assert!(o.exists && o.owned, "{o:?}");
    assert_eq!(o.status["ownerMark"], "sidecar");
    vd.apply(&v, &o, &w).expect("grow");
    assert_eq!(fs::metadata(&f).expect("stat").len(), 2 * MI);
}

#[test]
fn storage_volume_crash_leftover_temp_cleanup() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_pd, vd, p) = setup(tmp.path());
    // As if a previous apply was SIGKILLed while copying.
    let leftover = tmp.path().join("pool/images/.data.raw.tmp");
    fs::write(&leftover, vec![7u8; 8192]).expect("write");
    let v = volume("data", "local", 4 * MI);
    let w = world(&[&p, &v]);
    let o = observe_one(&vd, &v, &w);
    assert!(!o.exists, "a temp file is not the volume");
    vd.apply(&v, &o, &w).expect("apply");
    assert!(!leftover.exists());
    let f = tmp.path().join("pool/images/data.raw");
    assert_eq!(fs::metadata(&f).expect("stat").len(), 4 * MI);
    let mut b = [1u8; 16];
    fs::File::open(&f)
        .and_then(|h| h.read_exact_at(&mut b, 0))
        .expect("read");
    assert_eq!(b, [0u8; 16], "fresh volume, not the partial temp content");
    // Leftover next to an existing volume is removed too.
    fs::write(&leftover, b"x").expect("write");
    vd.apply(&v, &observe_one(&vd, &v, &w), &w).expect("apply");
    assert!(!leftover.exists());
}

#[test]
fn storage_volume_source_copy_sparse() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_pd, vd, p) = setup(tmp.path());
    // 8 MiB source: data at 0 and at 5 MiB, a hole between, an explicit zero block.
    let src = tmp.path().join("base.img");
    {
        let f = fs::File::create(&src).expect("create");
        f.set_len(8 * MI).expect("len");
        f.write_all_at(&[0xabu8; 65536], 0).expect("w");
        f.write_all_at(&[0u8; 1 << 20], 2 * MI).expect("zeros");
        f.write_all_at(b"tail-marker", 5 * MI).expect("w");
        f.sync_all().expect("sync");
    }
    let v = with_source(volume("fromsrc", "local", 16 * MI), &src);
    let w = world(&[&p, &v]);
    vd.apply(&v, &observe_one(&vd, &v, &w), &w).expect("create");
    let f = tmp.path().join("pool/images/fromsrc.raw");
    assert_eq!(fs::metadata(&f).expect("stat").len(), 16 * MI);
    let h = fs::File::open(&f).expect("open");
    let mut a = vec![0u8; 65536];
    h.read_exact_at(&mut a, 0).expect("read");
    assert!(a.iter().all(|&b| b == 0xab));
    let mut t = [0u8; 11];
    h.read_exact_at(&mut t, 5 * MI).expect("read");
    assert_eq!(&t, b"tail-marker");
    assert!(
        allocated(&f) < 2 * MI,
        "holes and zero blocks must stay sparse: {} bytes allocated",
        allocated(&f)
    );
    // Copied once: changing the source later does not touch the volume.
    fs::OpenOptions::new()
        .write(true)
        .open(&src)
        .and_then(|mut s| s.write_all(b"changed"))
        .expect("write");
    vd.apply(&v, &observe_one(&vd, &v, &w), &w)
        .expect("reapply");
    h.read_exact_at(&mut a[..7], 0).expect("read");
    assert_eq!(&a[..7], &[0xab; 7]);

    // A source bigger than the volume is refused.
    let small = with_source(volume("small", "local", MI), &src);
    let w2 = world(&[&p, &small]);
    assert!(matches!(
        vd.apply(&small, &observe_one(&vd, &small, &w2), &w2),
        Err(DriverError::Refused(_))
    ));
    assert!(!tmp.path().join("pool/images/small.raw").exists());
}

#[test]
fn storage_volume_pool_not_ready() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let env = env(tmp.path());
    let vd = VolumeDriver::new(&env);
    let p = pool("later", PoolType::Dir, &tmp.path().join("later"));
    let v = volume("v", "later", MI);
    let w = world(&[&p, &v]);
    let o = observe_one(&vd, &v, &w);
    assert!(!o.exists);
    let e = vd.apply(&v, &o, &w).expect_err("pool not applied");
    assert!(e.retryable(), "{e}");
    // Unknown pool.
    let v2 = volume("v2", "nope", MI);
    let w2 = world(&[&v2]);
    assert!(vd.apply(&v2, &observe_one(&vd, &v2, &w2), &w2).is_err());
}

/// The child half of the SIGKILL test: applies a big volume from a source.
fn crash_child(dir: &std::path::Path) {
    let env = env(dir);
    let p = pool("local", PoolType::Dir, &dir.join("pool"));
    let v = with_source(volume("big", "local", 512 * MI), &dir.join("src.img"));
    let w = world(&[&p, &v]);
    let vd = VolumeDriver::new(&env);
    let o = observe_one(&vd, &v, &w);
    vd.apply(&v, &o, &w).expect("child apply");
}

#[test]
fn storage_volume_sigkill_during_copy_then_reapply() {
    if let Some(dir) = std::env::var_os("STEAD_STORAGE_CRASH_CHILD") {
        crash_child(std::path::Path::new(&dir));
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_pd, vd, p) = setup(tmp.path());
    let src = tmp.path().join("src.img");
    {
        let f = fs::File::create(&src).expect("create");
        let chunk = vec![0x11u8; MI as usize];
        for i in 0..256u64 {
            f.write_all_at(&chunk, i * MI).expect("write");
        }
        f.sync_all().expect("sync");
    }
    let exe = std::env::current_exe().expect("exe");
    let mut child = std::process::Command::new(exe)
        .args([
            "storage_volume_sigkill_during_copy_then_reapply",
            "--exact",
            "--test-threads=1",
        ])
        .env("STEAD_STORAGE_CRASH_CHILD", tmp.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn child");
    let tmpfile = tmp.path().join("pool/images/.big.raw.tmp");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut killed_mid_copy = false;
    let mut exited = None;
    while std::time::Instant::now() < deadline {
        if allocated(&tmpfile) != u64::MAX && allocated(&tmpfile) > 16 * MI {
            child.kill().expect("SIGKILL");
            killed_mid_copy = true;
            break;
        }
        if let Some(st) = child.try_wait().expect("wait") {
            exited = Some(st);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let _ = child.kill();
    let _ = child.wait();
    let final_path = tmp.path().join("pool/images/big.raw");
    if killed_mid_copy {
        assert!(
            tmpfile.exists(),
            "killed while the temp file was being filled"
        );
        assert!(
            !final_path.exists(),
            "no half-copied volume under its real name"
        );
    } else {
        // Too fast to catch: then the child's apply must at least have succeeded, not
        // died or timed out (which would skip the crash check without saying why).
        assert!(
            exited.is_some_and(|st| st.success()),
            "child neither killed mid-copy nor finished cleanly: {exited:?}"
        );
        eprintln!("note: child finished before it could be killed mid-copy");
    }
    // The next apply converges: full content, right size, no leftover.
    let v = with_source(volume("big", "local", 512 * MI), &src);
    let w = world(&[&p, &v]);
    vd.apply(&v, &observe_one(&vd, &v, &w), &w)
        .expect("reapply");
    assert!(!tmpfile.exists());
    assert_eq!(fs::metadata(&final_path).expect("stat").len(), 512 * MI);
    let h = fs::File::open(&final_path).expect("open");
    let mut b = [0u8; 4];
    for off in [0, 100 * MI, 256 * MI - 4] {
        h.read_exact_at(&mut b, off).expect("read");
        assert_eq!(b, [0x11; 4], "at {off}");
    }
    h.read_exact_at(&mut b, 300 * MI).expect("read");
    assert_eq!(b, [0; 4]);
    let o = observe_one(&vd, &v, &w);
    assert!(o.owned && o.state == vd.desired_state(&v, &w));
}

/// ramfs mounted on a temp dir (no xattr support at all); unmounted on drop.
struct Ramfs(std::path::PathBuf, bool);

impl Drop for Ramfs {
    fn drop(&mut self) {
        if self.1 && nix::mount::umount2(&self.0, nix::mount::MntFlags::empty()).is_err() {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

#[test]
fn storage_volume_sidecar_on_fs_without_xattrs() {
    let has_ramfs = fs::read_to_string("/proc/filesystems")
        .map(|t| {
            t.lines()
                .any(|l| l.split_whitespace().last() == Some("ramfs"))
        })
        .unwrap_or(false);
    if !has_ramfs {
        eprintln!("SKIP storage_volume_sidecar_on_fs_without_xattrs: kernel lacks ramfs");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let mnt = tmp.path().join("ram");
    fs::create_dir(&mnt).expect("mkdir");
    let mut guard = Ramfs(mnt.clone(), false);
    if let Err(e) = nix::mount::mount(
        Some("stead-test"),
        &mnt,
        Some("ramfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    ) {
        eprintln!("SKIP storage_volume_sidecar_on_fs_without_xattrs: mount ramfs: {e}");
        return;
    }
    guard.1 = true;
    let env = env(tmp.path());
    let p = pool("ram", PoolType::Dir, &mnt.join("pool"));
    let v = with_policy(volume("v", "ram", MI), DeletionPolicy::Delete);
    let w = world(&[&p, &v]);
    let pd = PoolDriver::new(&env);
    pd.apply(&p, &observe_one(&pd, &p, &w), &w).expect("pool");
    let vd = VolumeDriver::new(&env);
    vd.apply(&v, &observe_one(&vd, &v, &w), &w).expect("volume");
    let side = mnt.join("pool/images/v.raw.stead");
    assert_eq!(fs::read_to_string(&side).expect("sidecar"), "Volume/v");
    let o = observe_one(&vd, &v, &w);
    assert!(o.owned, "{o:?}");
    assert_eq!(o.status["ownerMark"], "sidecar");
    vd.delete(&v, &o, &w).expect("delete");
    assert!(!side.exists() && !mnt.join("pool/images/v.raw").exists());
    drop(guard);
}

fn images_names(pool: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(pool.join("images"))
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn storage_volume_copy_into_full_pool_leaves_no_temp_and_next_apply_sweeps_stale_ones() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = tmp.path().to_path_buf();
    in_private_mount_ns(move || {
        let pool_dir = base.join("pool");
        mount_tmpfs(&pool_dir, 20 * MI);
        let (_pd, vd, p) = setup(&base);
        // 24 MiB of non-zero data (a sparse copy cannot skip it) into a 20 MiB pool.
        let src = base.join("big.img");
        fs::write(&src, vec![0x5au8; 24 * MI as usize]).expect("write source");
        let big = with_source(volume("big", "local", 24 * MI), &src);
        let w = world(&[&p, &big]);
        let err = vd
            .apply(&big, &observe_one(&vd, &big, &w), &w)
            .expect_err("the pool is full");
        match &err {
            DriverError::Io { source, .. } => {
                assert_eq!(source.kind(), std::io::ErrorKind::StorageFull, "{err}")
            }
            other => panic!("expected ENOSPC, got {other:?}"),
        }
        assert!(
            !images_names(&pool_dir).iter().any(|n| n.ends_with(".tmp")),
            "{:?}",
            images_names(&pool_dir)
        );

        // Stale temps of stead (a killed copy of a volume since dropped), an in-use one,
        // and files that are not stead's temp names.
        fs::write(
            pool_dir.join("images/.gone.raw.tmp"),
            vec![1u8; 14 * MI as usize],
        )
        .expect("plant stale temp");
        let busy = pool_dir.join("images/.busy.raw.tmp");
        let held = fs::File::create(&busy).expect("create busy temp");
        held.lock().expect("hold its lock");
        for keep in [
            "notours.tmp",
            ".x.tmp",
            "y.raw.tmp",
            ".bad..name.raw.tmp.keep",
        ] {
            fs::write(pool_dir.join("images").join(keep), b"k").expect("plant");
        }
        fs::create_dir(pool_dir.join("images/.dir.raw.tmp")).expect("a dir is not a temp file");

        // The next apply of any volume in the pool reclaims the stale temp: a 8 MiB
        // volume fits again.
        let small = with_source(volume("small", "local", 8 * MI), &base.join("small.img"));
        fs::write(base.join("small.img"), vec![0x11u8; 8 * MI as usize]).expect("write");
        let w = world(&[&p, &small]);
        vd.apply(&small, &observe_one(&vd, &small, &w), &w)
            .expect("fits once the stale temp is gone");
        let names = images_names(&pool_dir);
        assert!(!names.contains(&".gone.raw.tmp".to_string()), "{names:?}");
        for keep in [
            ".busy.raw.tmp",
            "notours.tmp",
            ".x.tmp",
            "y.raw.tmp",
            ".dir.raw.tmp",
            "small.raw",
        ] {
            assert!(names.contains(&keep.to_string()), "{keep} kept: {names:?}");
        }
        drop(held);
    });
}

#[test]
fn storage_marks_outside_finds_files_not_marked_for_the_scope_without_following_links() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let area = tmp.path().join("area");
    fs::create_dir_all(area.join("images/sub")).expect("mkdir");
    let mark = |p: &std::path::Path, m: &str| {
        fs::write(p, b"x").expect("write");
        stead_host::xattr::set(p, storage::OWNER_XATTR, m.as_bytes()).expect("set mark");
    };
    mark(&area.join("images/mine.raw"), "env/a/Volume/mine");
    mark(&area.join("images/sub/prod.raw"), "Volume/prod");
    mark(&area.join("images/other.raw"), "env/ab/Volume/x");
    fs::write(area.join("images/unmarked"), b"x").expect("write");
    let outside = tmp.path().join("outside.raw");
    mark(&outside, "Volume/outside");
    std::os::unix::fs::symlink(&outside, area.join("images/link.raw")).expect("symlink");
    let mut found = storage::marks_outside(&area, &storage::env_owner_prefix("a"));
    found.sort();
    assert_eq!(
        found,
        vec![
            (area.join("images/other.raw"), "env/ab/Volume/x".to_string()),
            (area.join("images/sub/prod.raw"), "Volume/prod".to_string()),
        ]
    );
}
