//! qcow2 volumes, image import (file, http URL, sha256), templates and clones, with the
//! real qemu-img / qemu-io in temp dirs (btrfs on a loop file).

mod storage_util;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use stead_drivers::storage::{self, PoolDriver, VolumeDriver, qemu_img};
use stead_reconciler::driver::{Driver, DriverError, PruneAction};
use stead_schema::{DeletionPolicy, PoolType, Resource, VolumeFormat};
use storage_util::*;

fn apply(d: &dyn Driver, r: &Resource, w: &World) -> Result<(), DriverError> {
    let o = d.observe(&[r], w)?;
    d.apply(r, &o[&r.id], w)
}

fn delete(d: &dyn Driver, r: &Resource, w: &World) -> Result<(), DriverError> {
    let o = d.observe(&[r], w)?;
    d.delete(r, &o[&r.id], w)
}

macro_rules! need_qemu {
    ($name:literal) => {
        if let Some(why) = qemu_tools_missing() {
            eprintln!("SKIP {}: {why}", $name);
            return;
        }
    };
}

fn info(p: &Path) -> qemu_img::ImageInfo {
    qemu_img::info(p, None).expect("qemu-img info")
}

fn qemu_io(p: &Path, fmt: &str, cmd: &str) -> String {
    let ps = p.to_string_lossy();
    run_cmd("qemu-io", &["-f", fmt, "-c", cmd, &ps]).expect("qemu-io")
}

/// Whether `p` (read as `fmt`) holds byte `pat` over [off, off+len).
fn holds(p: &Path, fmt: &str, pat: u8, off: u64, len: u64) -> bool {
    let ps = p.to_string_lossy();
    let cmd = format!("read -P 0x{pat:02x} {off} {len}");
    run_cmd("qemu-io", &["-f", fmt, "-c", &cmd, &ps])
        .map(|out| !out.contains("Pattern verification failed"))
        .unwrap_or(false)
}

/// A dir pool `local` at `<tmp>/pool`, applied.
fn dir_pool(tmp: &Path) -> (PoolDriver, VolumeDriver, Resource) {
    let env = env(tmp);
    let pd = PoolDriver::new(&env);
    let vd = VolumeDriver::new(&env);
    let p = pool("local", PoolType::Dir, &tmp.join("pool"));
    apply(&pd, &p, &world(&[&p])).expect("pool");
    (pd, vd, p)
}

fn images(tmp: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(tmp.join("pool/images"))
        .expect("read images")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A raw image with 0xab in its first MiB and 0x11 in its fourth, `size` bytes.
fn raw_image(p: &Path, size: u64) {
    use std::os::unix::fs::FileExt;
    let f = fs::File::create(p).expect("create");
    f.set_len(size).expect("len");
    f.write_all_at(&vec![0xab; MI as usize], 0).expect("w");
    f.write_all_at(&vec![0x11; MI as usize], 3 * MI).expect("w");
}

#[test]
fn storage_qcow2_create_observe_grow_refuse_shrink_and_snapshot() {
    need_qemu!("storage_qcow2_create_observe_grow_refuse_shrink_and_snapshot");
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_pd, vd, p) = dir_pool(tmp.path());
    let v = with_format(volume("q", "local", 64 * MI), VolumeFormat::Qcow2);
    let w = world(&[&p, &v]);
    apply(&vd, &v, &w).expect("create");
    let file = tmp.path().join("pool/images/q.qcow2");
    assert_eq!(storage::volume_path(&w, "q").expect("path"), file);
    assert_eq!(
        storage::volume_image(&w, "q").expect("image"),
        (file.clone(), VolumeFormat::Qcow2)
    );
    let i = info(&file);
    assert_eq!((i.format.as_str(), i.virtual_size), ("qcow2", 64 * MI));
    assert!(allocated(&file) < 2 * MI, "a new qcow2 is small");
    let o = vd.observe(&[&v], &w).expect("observe");
    assert!(o[&v.id].owned, "{:?}", o[&v.id]);
    assert_eq!(o[&v.id].state, vd.desired_state(&v, &w));
    assert_eq!(images(tmp.path()), ["q.qcow2"], "no temp left");

    // Grow in place, keeping the data.
    qemu_io(&file, "qcow2", "write -P 0x5a 0 1M");
    let v128 = with_format(volume("q", "local", 128 * MI), VolumeFormat::Qcow2);
    let w128 = world(&[&p, &v128]);
    apply(&vd, &v128, &w128).expect("grow");
    assert_eq!(info(&file).virtual_size, 128 * MI);
    assert!(holds(&file, "qcow2", 0x5a, 0, MI));

    // Shrink refused at plan (check) and at apply.
    let v32 = with_format(volume("q", "local", 32 * MI), VolumeFormat::Qcow2);
    let w32 = world(&[&p, &v32]);
    let o = vd.observe(&[&v32], &w32).expect("observe");
    let e = vd
        .check(&v32, &o[&v32.id], &[])
        .expect_err("shrink refused");
    assert!(e.contains("shrinking Volume/q"), "{e}");
    assert!(matches!(
        vd.apply(&v32, &o[&v32.id], &w32),
        Err(DriverError::Refused(_))
    ));
    assert_eq!(info(&file).virtual_size, 128 * MI);

    // A format change is refused, nothing made.
    let vraw = volume("q", "local", 128 * MI);
    let wraw = world(&[&p, &vraw]);
    let o = vd.observe(&[&vraw], &wraw).expect("observe");
    let e = vd
        .check(&vraw, &o[&vraw.id], &[])
        .expect_err("format change");
    assert!(e.contains("exists as qcow2"), "{e}");
    assert!(apply(&vd, &vraw, &wraw).is_err());
    assert_eq!(images(tmp.path()), ["q.qcow2"]);

    // Snapshot (a copy of the qcow2 file), change, roll back.
    let env = env(tmp.path());
    storage::snapshot_create(&env, &w128, "q", "s1").expect("snapshot");
    qemu_io(&file, "qcow2", "write -P 0x77 0 1M");
    storage::snapshot_rollback(&env, &w128, "q", "s1").expect("rollback");
    assert!(holds(&file, "qcow2", 0x5a, 0, MI), "rolled back");
    assert_eq!(info(&file).format, "qcow2");

    // Delete.
    let vdel = with_policy(v128.clone(), DeletionPolicy::Delete);
    let wdel = world(&[&p, &vdel]);
    storage::snapshot_delete(&env, &wdel, "q", "s1").expect("snapshot delete");
    delete(&vd, &vdel, &wdel).expect("delete");
    assert!(!file.exists());
}

#[test]
fn storage_qcow2_import_from_files_converts_both_ways() {
    need_qemu!("storage_qcow2_import_from_files_converts_both_ways");
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_pd, vd, p) = dir_pool(tmp.path());
    let src_raw = tmp.path().join("base.raw");
    raw_image(&src_raw, 8 * MI);
    let src_qcow2 = tmp.path().join("base.qcow2");
    let (a, b) = (
        src_raw.to_string_lossy().into_owned(),
        src_qcow2.to_string_lossy().into_owned(),
    );
    run_cmd("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", &a, &b]).expect("convert");

    // raw file → qcow2 volume, grown to its size; sha256 given and right.
    let v1 = with_format(
        with_sha256(
            with_source(volume("a", "local", 32 * MI), &src_raw),
            &sha256_hex(&src_raw),
        ),
        VolumeFormat::Qcow2,
    );
    // qcow2 file → raw volume.
    let v2 = with_source(volume("b", "local", 16 * MI), &src_qcow2);
    let w = world(&[&p, &v1, &v2]);
    apply(&vd, &v1, &w).expect("import raw → qcow2");
    apply(&vd, &v2, &w).expect("import qcow2 → raw");
    let fa = tmp.path().join("pool/images/a.qcow2");
    let fb = tmp.path().join("pool/images/b.raw");
    let (ia, ib) = (info(&fa), info(&fb));
    assert_eq!((ia.format.as_str(), ia.virtual_size), ("qcow2", 32 * MI));
    assert_eq!((ib.format.as_str(), ib.virtual_size), ("raw", 16 * MI));
    for (f, fmt) in [(&fa, "qcow2"), (&fb, "raw")] {
        assert!(holds(f, fmt, 0xab, 0, MI), "{} first MiB", f.display());
        assert!(
            holds(f, fmt, 0x11, 3 * MI, MI),
            "{} fourth MiB",
            f.display()
        );
        assert!(
            holds(f, fmt, 0, 8 * MI, 8 * MI),
            "{} grown part is zero",
            f.display()
        );
    }
    let o = vd.observe(&[&v1, &v2], &w).expect("observe");
    assert_eq!(o[&v1.id].state, vd.desired_state(&v1, &w));
    assert_eq!(o[&v2.id].state, vd.desired_state(&v2, &w));

    // An image larger than the volume is refused, nothing left.
    let small = with_source(volume("small", "local", 4 * MI), &src_qcow2);
    let ws = world(&[&p, &small]);
    let e = apply(&vd, &small, &ws).expect_err("too large");
    assert!(e.to_string().contains("is larger than Volume/small"), "{e}");

    // A file with a wrong sha256 is refused, nothing left.
    let bad = with_sha256(
        with_source(volume("bad", "local", 16 * MI), &src_raw),
        &"0".repeat(64),
    );
    let wb = world(&[&p, &bad]);
    let e = apply(&vd, &bad, &wb).expect_err("sha mismatch");
    assert!(e.to_string().contains("sha256 mismatch"), "{e}");

    // An image with a backing file is not imported.
    let overlay = tmp.path().join("overlay.qcow2");
    let ov = overlay.to_string_lossy().into_owned();
    run_cmd(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-b", &b, "-F", "qcow2", &ov],
    )
    .expect("overlay");
    let chained = with_source(volume("chained", "local", 16 * MI), &overlay);
    let wc = world(&[&p, &chained]);
    let e = apply(&vd, &chained, &wc).expect_err("backing file");
    assert!(e.to_string().contains("has a backing file"), "{e}");
    assert_eq!(
        images(tmp.path()),
        ["a.qcow2", "b.raw"],
        "nothing half made"
    );
}

#[test]
fn storage_qcow2_import_from_an_http_url_checks_sha256_first() {
    need_qemu!("storage_qcow2_import_from_an_http_url_checks_sha256_first");
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_pd, vd, p) = dir_pool(tmp.path());
    let src_raw = tmp.path().join("base.raw");
    raw_image(&src_raw, 8 * MI);
    let src = tmp.path().join("base.qcow2");
    let (a, b) = (
        src_raw.to_string_lossy().into_owned(),
        src.to_string_lossy().into_owned(),
    );
    run_cmd("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", &a, &b]).expect("convert");
    let body = fs::read(&src).expect("read image");
    let sha = sha256_hex(&src);

    // A wrong digest: fetched, refused before use, nothing left in the pool.
    let (url, server) = serve_http(body.clone(), 1);
    let bad = with_url(volume("web", "local", 16 * MI), &url, &"ab".repeat(32));
    let wb = world(&[&p, &bad]);
    let e = apply(&vd, &bad, &wb).expect_err("wrong sha256");
    let msg = e.to_string();
    assert!(msg.contains("sha256 mismatch"), "{msg}");
    assert!(
        msg.contains(&"ab".repeat(32)) && msg.contains(&sha),
        "both digests: {msg}"
    );
    assert_eq!(server.join().expect("server"), 1);
    assert!(images(tmp.path()).is_empty(), "{:?}", images(tmp.path()));

    // The right digest: fetched, converted to raw, grown.
    let (url, server) = serve_http(body, 1);
    let good = with_url(volume("web", "local", 16 * MI), &url, &sha);
    let wg = world(&[&p, &good]);
    apply(&vd, &good, &wg).expect("url import");
    assert_eq!(server.join().expect("server"), 1);
    let f = tmp.path().join("pool/images/web.raw");
    assert_eq!(info(&f).virtual_size, 16 * MI);
    assert!(holds(&f, "raw", 0xab, 0, MI));
    assert!(holds(&f, "raw", 0x11, 3 * MI, MI));
    assert_eq!(images(tmp.path()), ["web.raw"], "no fetch temp left");

    // A url without sha256 never reaches the network: refused at check.
    let mut nosha = with_url(volume("nosha", "local", 16 * MI), &url, &sha);
    if let stead_schema::Spec::Volume(v) = &mut nosha.spec
        && let Some(s) = &mut v.source
    {
        s.sha256 = None;
    }
    let wn = world(&[&p, &nosha]);
    let o = vd.observe(&[&nosha], &wn).expect("observe");
    let e = vd.check(&nosha, &o[&nosha.id], &[]).expect_err("no sha");
    assert!(e.contains("needs source.sha256"), "{e}");
}

fn mtime_ns(p: &Path) -> (i64, i64) {
    let m = fs::metadata(p).expect("stat");
    (m.mtime(), m.mtime_nsec())
}

#[test]
fn storage_qcow2_template_and_linked_clones_on_a_dir_pool() {
    need_qemu!("storage_qcow2_template_and_linked_clones_on_a_dir_pool");
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_pd, vd, p) = dir_pool(tmp.path());
    let src = tmp.path().join("base.raw");
    raw_image(&src, 8 * MI);
    let tmpl = as_template(with_policy(
        with_format(
            with_source(volume("tmpl", "local", 16 * MI), &src),
            VolumeFormat::Qcow2,
        ),
        DeletionPolicy::Delete,
    ));
    let c1 = with_format(
        with_clone(volume("c1", "local", 32 * MI), "tmpl", true),
        VolumeFormat::Qcow2,
    );
    let c2 = with_policy(
        with_format(
            with_clone(volume("c2", "local", 16 * MI), "tmpl", true),
            VolumeFormat::Qcow2,
        ),
        DeletionPolicy::Delete,
    );
    let full = with_clone(volume("full", "local", 16 * MI), "tmpl", false);
    let w = world(&[&p, &tmpl, &c1, &c2, &full]);
    apply(&vd, &tmpl, &w).expect("template");
    let tf = tmp.path().join("pool/images/tmpl.qcow2");
    assert_eq!(
        fs::metadata(&tf).expect("stat").permissions().mode() & 0o777,
        0o444
    );
    let o = vd.observe(&[&tmpl], &w).expect("observe");
    assert_eq!(o[&tmpl.id].state, vd.desired_state(&tmpl, &w));
    let (sha_before, mtime_before) = (sha256_hex(&tf), mtime_ns(&tf));

    for c in [&c1, &c2, &full] {
        apply(&vd, c, &w).expect("clone");
    }
    let f1 = tmp.path().join("pool/images/c1.qcow2");
    let i1 = info(&f1);
    assert_eq!(
        i1.backing_filename.as_deref(),
        Some("tmpl.qcow2"),
        "relative backing file"
    );
    assert_eq!(i1.virtual_size, 32 * MI);
    assert!(
        allocated(&f1) < 2 * MI,
        "a linked clone shares its template's blocks"
    );
    let ff = tmp.path().join("pool/images/full.raw");
    assert_eq!(info(&ff).backing_filename, None);
    assert!(holds(&ff, "raw", 0xab, 0, MI), "full copy has the data");

    // Writing into a clone leaves the template's bytes and mtime alone.
    assert!(holds(&f1, "qcow2", 0xab, 0, MI), "clone sees template data");
    qemu_io(&f1, "qcow2", "write -P 0xcd 0 1M");
    assert!(holds(&f1, "qcow2", 0xcd, 0, MI));
    assert!(holds(&f1, "qcow2", 0x11, 3 * MI, MI));
    assert_eq!(sha256_hex(&tf), sha_before);
    assert_eq!(mtime_ns(&tf), mtime_before);
    assert!(holds(&tf, "qcow2", 0xab, 0, MI));

    // A template is not resized.
    let big = as_template(with_format(
        with_source(volume("tmpl", "local", 64 * MI), &src),
        VolumeFormat::Qcow2,
    ));
    let wbig = world(&[&p, &big]);
    let o = vd.observe(&[&big], &wbig).expect("observe");
    let e = vd
        .check(&big, &o[&big.id], &[])
        .expect_err("template resize");
    assert!(e.contains("is a template and read-only"), "{e}");
    assert!(matches!(
        vd.apply(&big, &o[&big.id], &wbig),
        Err(DriverError::Refused(_))
    ));

    // A linked clone of a volume that is not a template is refused.
    let plain = with_format(volume("plain", "local", 16 * MI), VolumeFormat::Qcow2);
    let bad = with_format(
        with_clone(volume("bad", "local", 16 * MI), "plain", true),
        VolumeFormat::Qcow2,
    );
    let wp = world(&[&p, &plain, &bad]);
    apply(&vd, &plain, &wp).expect("plain");
    let e = apply(&vd, &bad, &wp).expect_err("not a template");
    assert!(e.to_string().contains("is not a template"), "{e}");

    // Deleting the template is refused while clones stand on it; nothing deleted.
    let e = delete(&vd, &tmpl, &w).expect_err("template with clones");
    let msg = e.to_string();
    assert!(
        msg.contains("Volume/c1") && msg.contains("Volume/c2"),
        "{msg}"
    );
    assert!(
        !msg.contains("Volume/full"),
        "a full copy needs nothing: {msg}"
    );
    assert!(tf.exists() && f1.exists());
    // Nor does it stop being read-only.
    let unt = with_format(
        with_source(volume("tmpl", "local", 16 * MI), &src),
        VolumeFormat::Qcow2,
    );
    let e = apply(&vd, &unt, &world(&[&p, &unt])).expect_err("un-template");
    assert!(e.to_string().contains("has linked clones"), "{e}");
    // With deletionPolicy: Retain the prune keeps the data anyway.
    assert_eq!(vd.prune_action(&c1), PruneAction::Retain);
    assert_eq!(vd.prune_action(&tmpl), PruneAction::Delete);

    // The pool can move: the backing file is relative.
    let moved = tmp.path().join("moved");
    fs::rename(tmp.path().join("pool"), &moved).expect("move pool");
    let m1 = moved.join("images/c1.qcow2");
    assert!(
        holds(&m1, "qcow2", 0x11, 3 * MI, MI),
        "clone reads its template after a move"
    );
    fs::rename(&moved, tmp.path().join("pool")).expect("move back");

    // Once the clones are gone, the template goes.
    delete(&vd, &c2, &w).expect("delete c2");
    let c1d = with_policy(c1.clone(), DeletionPolicy::Delete);
    delete(&vd, &c1d, &world(&[&p, &tmpl, &c1d])).expect("delete c1");
    delete(&vd, &tmpl, &w).expect("delete template");
    assert!(!tf.exists());
}

#[test]
fn storage_qcow2_btrfs_volumes_and_reflink_clones() {
    need_qemu!("storage_qcow2_btrfs_volumes_and_reflink_clones");
    let lb = match LoopBtrfs::new() {
        Ok(l) => l,
        Err(why) => {
            eprintln!("SKIP storage_qcow2_btrfs_volumes_and_reflink_clones: {why}");
            return;
        }
    };
    let root = lb.mnt.join("pool");
    let env = env(lb.dir.path());
    let pd = PoolDriver::new(&env);
    let vd = VolumeDriver::new(&env);
    let p = pool("fast", PoolType::Btrfs, &root);
    apply(&pd, &p, &world(&[&p])).expect("pool");
    let src = lb.mnt.join("base.raw");
    raw_image(&src, 8 * MI);

    // A qcow2 volume in its subvolume, grown in place.
    let q = with_format(volume("q", "fast", 16 * MI), VolumeFormat::Qcow2);
    let w = world(&[&p, &q]);
    apply(&vd, &q, &w).expect("qcow2 on btrfs");
    let qf = root.join("images/q/disk.qcow2");
    assert_eq!(storage::volume_path(&w, "q").expect("path"), qf);
    let q32 = with_format(volume("q", "fast", 32 * MI), VolumeFormat::Qcow2);
    let w32 = world(&[&p, &q32]);
    apply(&vd, &q32, &w32).expect("grow");
    assert_eq!(info(&qf).virtual_size, 32 * MI);
    storage::snapshot_create(&env, &w32, "q", "s1").expect("btrfs snapshot of qcow2");

    // A raw template and a linked (reflink) clone of it.
    let tmpl = as_template(with_source(volume("tmpl", "fast", 16 * MI), &src));
    let c = with_clone(volume("c", "fast", 32 * MI), "tmpl", true);
    let wc = world(&[&p, &tmpl, &c]);
    apply(&vd, &tmpl, &wc).expect("template");
    let tf = root.join("images/tmpl/disk.raw");
    assert_eq!(
        fs::metadata(&tf).expect("stat").permissions().mode() & 0o777,
        0o444
    );
    let (sha_before, mtime_before) = (sha256_hex(&tf), mtime_ns(&tf));
    apply(&vd, &c, &wc).expect("reflink clone");
    let cf = root.join("images/c/disk.raw");
    assert_eq!(info(&cf).virtual_size, 32 * MI);
    qemu_io(&cf, "raw", "write -P 0xcd 0 1M");
    assert!(holds(&cf, "raw", 0xcd, 0, MI));
    assert!(holds(&cf, "raw", 0x11, 3 * MI, MI));
    assert_eq!(sha256_hex(&tf), sha_before);
    assert_eq!(mtime_ns(&tf), mtime_before);

    // A linked clone in another format than its base is refused on btrfs.
    let cq = with_format(
        with_clone(volume("cq", "fast", 32 * MI), "tmpl", true),
        VolumeFormat::Qcow2,
    );
    let e = apply(&vd, &cq, &world(&[&p, &tmpl, &cq])).expect_err("format differs");
    assert!(e.to_string().contains("reflink copy"), "{e}");
    assert!(!root.join("images/cq").exists() && !root.join("images/.cq.tmp").exists());

    // Reflink clones need nothing of their template: it can be deleted.
    let td = with_policy(tmpl.clone(), DeletionPolicy::Delete);
    delete(&vd, &td, &world(&[&p, &td, &c])).expect("delete btrfs template");
    assert!(holds(&cf, "raw", 0x11, 3 * MI, MI));
}
