//! Root file systems: a directory in place, or a template (`.tar` / `.tar.zst`) unpacked
//! once, and the subordinate id ranges of unprivileged containers.
//!
//! Layout under the base dir (the named pool's path, or the state dir):
//! - `templates/<key>/` — a template unpacked once (key = hash of its path, size, mtime),
//!   shared read-only as the overlay `lowerdir` of privileged containers;
//! - `rootfs/<name>/{upper,work}` — a privileged container's overlay layers;
//! - `rootfs/<name>/root` — an unprivileged container's own copy, unpacked with every
//!   uid/gid shifted into its id range (a shared lower dir owned by host root would
//!   appear as `nobody` inside a user namespace).
//!
//! Unpacking goes to a `.tmp-*` sibling and is renamed into place, so a crash never leaves
//! a half-unpacked tree that a later apply would trust. A TTY gets a progress bar.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use stead_schema::{DriverError, RootfsSpec};

use super::config::{IdMap, Paths, RootfsMount};

/// Size of each container's id range.
pub const ID_RANGE: u32 = 65536;
/// First host id handed out.
pub const ID_BASE: u32 = 100_000;

fn io(ctx: impl Into<String>) -> impl FnOnce(io::Error) -> DriverError {
    let c = ctx.into();
    move |e| DriverError::io(c, e)
}

/// Whether the kernel has overlayfs.
pub fn overlay_supported() -> bool {
    fs::read_to_string("/proc/filesystems")
        .is_ok_and(|s| s.lines().any(|l| l.ends_with("\toverlay")))
}

/// Prepares the root file system of container `name` and says how to mount it.
pub fn prepare(
    spec: &RootfsSpec,
    name: &str,
    base: &Path,
    idmap: Option<IdMap>,
    paths: &Paths,
    volume: Option<PathBuf>,
) -> Result<RootfsMount, DriverError> {
    if let Some(p) = &spec.path {
        if !p.is_dir() {
            return Err(DriverError::NotReady(format!(
                "rootfs path {} is not a directory",
                p.display()
            )));
        }
        return Ok(RootfsMount::Dir { path: p.clone() });
    }
    if let Some(v) = &spec.volume {
        let source = volume
            .ok_or_else(|| DriverError::NotReady(format!("Volume/{v} has no disk path yet")))?;
        return Ok(RootfsMount::Image {
            source,
            target: paths.dir.join("volumes").join("rootfs"),
        });
    }
    let Some(tpl) = &spec.template else {
        return Err(DriverError::Refused(
            "rootfs needs one of template, path, volume".into(),
        ));
    };
    let own = base.join("rootfs").join(name);
    match idmap {
        Some(m) => {
            let root = own.join("root");
            let key = template_key(tpl)?;
            let marker = own.join("template");
            if !root.is_dir() {
                unpack(tpl, &root, m.base)?;
                fs::write(&marker, format!("{key} {}\n", tpl.display()))
                    .map_err(io(format!("write {}", marker.display())))?;
            } else if let Ok(old) = fs::read_to_string(&marker)
                && old.split_whitespace().next() != Some(key.as_str())
            {
                // The container's own copy holds its data: never re-unpack over it.
                return Err(DriverError::Refused(format!(
                    "{name}: its root file system was unpacked from another template ({}); \
                     delete and recreate the container to change it (its data is lost)",
                    old.trim()
                )));
            }
            Ok(RootfsMount::Dir { path: root })
        }
        None if overlay_supported() => {
            let lower = base.join("templates").join(template_key(tpl)?);
            if !lower.is_dir() {
                unpack(tpl, &lower, 0)?;
            }
            let upper = own.join("upper");
            let work = own.join("work");
            for d in [&upper, &work] {
                fs::create_dir_all(d).map_err(io(format!("mkdir {}", d.display())))?;
            }
            Ok(RootfsMount::Overlay {
                lower,
                upper,
                work,
                target: paths.rootfs_mount(),
            })
        }
        None => {
            let root = own.join("root");
            if !root.is_dir() {
                unpack(tpl, &root, 0)?;
            }
            Ok(RootfsMount::Dir { path: root })
        }
    }
}

/// Removes what [`prepare`] created for `name` (never the shared template cache nor a
/// `path` rootfs).
pub fn remove(name: &str, base: &Path) -> Result<(), DriverError> {
    crate::storage::fsutil::remove_tree_if_exists(&base.join("rootfs").join(name))
}

fn template_key(tpl: &Path) -> Result<String, DriverError> {
    let m = fs::metadata(tpl).map_err(io(format!("template {}", tpl.display())))?;
    let mut h = Sha256::new();
    h.update(tpl.as_os_str().as_encoded_bytes());
    h.update(m.len().to_le_bytes());
    h.update(m.mtime().to_le_bytes());
    h.update(m.mtime_nsec().to_le_bytes());
    Ok(hex::encode(&h.finalize()[..12]))
}

struct Counting<R> {
    inner: R,
    bar: Option<indicatif::ProgressBar>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(b) = &self.bar {
            b.inc(n as u64);
        }
        Ok(n)
    }
}

/// Unpacks `tpl` (tar, or zstd-compressed tar by magic) into `dest`, adding `shift` to
/// every uid and gid. Atomic: unpacks next to `dest` and renames.
pub fn unpack(tpl: &Path, dest: &Path, shift: u32) -> Result<(), DriverError> {
    let _span =
        tracing::info_span!("unpack_template", template = %tpl.display(), dest = %dest.display())
            .entered();
    let parent = dest
        .parent()
        .ok_or_else(|| DriverError::Other(format!("bad destination {}", dest.display())))?;
    fs::create_dir_all(parent).map_err(io(format!("mkdir {}", parent.display())))?;
    let dest_name = dest
        .file_name()
        .and_then(|s| s.to_str())
        .unwrap_or("rootfs")
        .to_string();
    // One unpacker per destination (containers sharing a template cache may be applied in
    // parallel); the lock also makes the fixed temp name safe to clear after a crash.
    let lock = File::create(parent.join(format!(".{dest_name}.lock")))
        .map_err(io(format!("lock {}", dest.display())))?;
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on an open fd; released when `lock` is dropped.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } < 0 {
            return Err(DriverError::io("flock", io::Error::last_os_error()));
        }
    }
    if dest.is_dir() {
        return Ok(()); // unpacked by whoever held the lock before us
    }
    let file = File::open(tpl).map_err(io(format!("open template {}", tpl.display())))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = std::io::IsTerminal::is_terminal(&io::stderr()).then(|| {
        let b = indicatif::ProgressBar::new(len);
        if let Ok(s) =
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {eta}")
        {
            b.set_style(s);
        }
        b.set_message(format!("unpacking {}", tpl.display()));
        b
    });
    let mut reader = BufReader::new(Counting {
        inner: file,
        bar: bar.clone(),
    });
    let mut magic = [0u8; 4];
    let is_zstd = {
        use std::io::BufRead;
        let buf = reader.fill_buf().map_err(io("read template"))?;
        if buf.len() >= 4 {
            magic.copy_from_slice(&buf[..4]);
        }
        magic == [0x28, 0xb5, 0x2f, 0xfd]
    };
    let tmp = parent.join(format!(".tmp-{dest_name}"));
    let _ = crate::storage::fsutil::remove_tree_if_exists(&tmp);
    fs::create_dir_all(&tmp).map_err(io(format!("mkdir {}", tmp.display())))?;
    let result = if is_zstd {
        let dec = zstd::Decoder::with_buffer(reader).map_err(io("zstd decoder"))?;
        extract(dec, &tmp, shift)
    } else {
        extract(reader, &tmp, shift)
    };
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if let Err(e) = result {
        let _ = crate::storage::fsutil::remove_tree_if_exists(&tmp);
        return Err(e);
    }
    if shift != 0 {
        // The root directory itself belongs to the container's root.
        std::os::unix::fs::lchown(&tmp, Some(shift), Some(shift))
            .map_err(io(format!("chown {}", tmp.display())))?;
    }
    fs::rename(&tmp, dest).map_err(io(format!("rename into {}", dest.display())))?;
    drop(lock);
    let _ = fs::remove_file(parent.join(format!(".{dest_name}.lock")));
    Ok(())
}

fn extract<R: Read>(r: R, dest: &Path, shift: u32) -> Result<(), DriverError> {
    let mut ar = tar::Archive::new(r);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_preserve_mtime(true);
    ar.set_unpack_xattrs(false);
    ar.set_overwrite(true);
    let mut dirs: BTreeMap<PathBuf, (u32, u32)> = BTreeMap::new();
    for entry in ar.entries().map_err(io("read tar"))? {
        let mut entry = entry.map_err(io("read tar entry"))?;
        let uid = entry.header().uid().unwrap_or(0) as u32;
        let gid = entry.header().gid().unwrap_or(0) as u32;
        let path = entry.path().map_err(io("tar path"))?.into_owned();
        let is_dir = entry.header().entry_type().is_dir();
        if !entry
            .unpack_in(dest)
            .map_err(io(format!("unpack {}", path.display())))?
        {
            continue; // outside dest (refused by the tar crate)
        }
        if shift != 0 {
            let p = dest.join(&path);
            if is_dir {
                dirs.insert(p, (uid + shift, gid + shift));
            } else {
                std::os::unix::fs::lchown(&p, Some(uid + shift), Some(gid + shift))
                    .map_err(io(format!("chown {}", p.display())))?;
            }
        }
    }
    for (p, (u, g)) in dirs {
        std::os::unix::fs::lchown(&p, Some(u), Some(g))
            .map_err(io(format!("chown {}", p.display())))?;
    }
    Ok(())
}

/// Allocates (or returns the existing) id range of container `name`: ranges of
/// [`ID_RANGE`] ids starting at [`ID_BASE`], never overlapping, recorded in
/// `<state_dir>/containers/idmap.json` under an exclusive lock.
pub fn allocate_ids(state_dir: &Path, name: &str) -> Result<IdMap, DriverError> {
    with_idmap(state_dir, |map| {
        if let Some(b) = map.get(name) {
            return Ok((
                IdMap {
                    base: *b,
                    size: ID_RANGE,
                },
                false,
            ));
        }
        let used: std::collections::BTreeSet<u32> = map.values().copied().collect();
        let base = (0u32..)
            .map(|n| ID_BASE + n * ID_RANGE)
            .find(|b| !used.contains(b))
            .ok_or_else(|| DriverError::Other("id ranges exhausted".into()))?;
        map.insert(name.to_string(), base);
        Ok((
            IdMap {
                base,
                size: ID_RANGE,
            },
            true,
        ))
    })
}

/// Releases the id range of `name`.
pub fn release_ids(state_dir: &Path, name: &str) -> Result<(), DriverError> {
    with_idmap(state_dir, |map| Ok(((), map.remove(name).is_some())))
}

fn with_idmap<T>(
    state_dir: &Path,
    f: impl FnOnce(&mut BTreeMap<String, u32>) -> Result<(T, bool), DriverError>,
) -> Result<T, DriverError> {
    use std::os::fd::AsRawFd;
    let dir = state_dir.join("containers");
    fs::create_dir_all(&dir).map_err(io(format!("mkdir {}", dir.display())))?;
    let lock = File::create(dir.join("idmap.lock")).map_err(io("open idmap.lock"))?;
    // SAFETY: flock on an open fd; released when `lock` is dropped.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } < 0 {
        return Err(DriverError::io("lock idmap", io::Error::last_os_error()));
    }
    let path = dir.join("idmap.json");
    let mut map: BTreeMap<String, u32> = super::config::read_json(&path)?.unwrap_or_default();
    let (out, changed) = f(&mut map)?;
    if changed {
        super::config::write_json_durable(&path, &map)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_ranges_do_not_overlap_and_are_reused() {
        let d = tempfile::tempdir().expect("tmp");
        let a = allocate_ids(d.path(), "a").expect("a");
        let b = allocate_ids(d.path(), "b").expect("b");
        assert_eq!(a.base, ID_BASE);
        assert_eq!(b.base, ID_BASE + ID_RANGE);
        assert_eq!(allocate_ids(d.path(), "a").expect("a again"), a);
        release_ids(d.path(), "a").expect("release");
        let c = allocate_ids(d.path(), "c").expect("c");
        assert_eq!(c.base, ID_BASE, "freed range reused");
    }

    fn tiny_template(path: &Path, content: &[u8]) {
        let f = File::create(path).expect("create");
        let mut b = tar::Builder::new(f);
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(content.len() as u64);
        b.append_data(&mut h, "etc/os-release", content)
            .expect("file");
        b.finish().expect("finish");
    }

    #[test]
    fn own_copy_refuses_another_template() {
        let d = tempfile::tempdir().expect("tmp");
        let tpl = d.path().join("t.tar");
        tiny_template(&tpl, b"ID=one\n");
        let paths = Paths::new(&d.path().join("run"), "c");
        let spec = RootfsSpec {
            template: Some(tpl.clone()),
            ..Default::default()
        };
        let m = IdMap {
            base: 200_000,
            size: ID_RANGE,
        };
        let r = prepare(&spec, "c", d.path(), Some(m), &paths, None).expect("first");
        assert_eq!(r.root(), d.path().join("rootfs/c/root"));
        // Same template again: reused.
        prepare(&spec, "c", d.path(), Some(m), &paths, None).expect("again");
        tiny_template(&tpl, b"ID=two, longer\n");
        let e = prepare(&spec, "c", d.path(), Some(m), &paths, None).expect_err("changed");
        assert!(matches!(e, DriverError::Refused(_)), "{e}");
        remove("c", d.path()).expect("remove");
        assert!(!d.path().join("rootfs/c").exists());
    }

    #[test]
    fn unpack_tar_zst_with_shift() {
        let d = tempfile::tempdir().expect("tmp");
        let tpl = d.path().join("t.tar.zst");
        {
            let f = File::create(&tpl).expect("create");
            let enc = zstd::Encoder::new(f, 3).expect("zstd").auto_finish();
            let mut b = tar::Builder::new(enc);
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_uid(0);
            h.set_gid(0);
            h.set_size(0);
            b.append_data(&mut h, "etc", io::empty()).expect("dir");
            let data = b"root:x:0:0::/root:/bin/sh\n";
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_uid(5);
            h.set_gid(6);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, "etc/passwd", &data[..])
                .expect("file");
            b.finish().expect("finish");
        }
        let dest = d.path().join("out/root");
        unpack(&tpl, &dest, 100_000).expect("unpack");
        let m = fs::metadata(dest.join("etc/passwd")).expect("passwd");
        assert_eq!((m.uid(), m.gid()), (100_005, 100_006));
        assert_eq!(fs::metadata(dest.join("etc")).expect("etc").uid(), 100_000);
        assert_eq!(
            fs::read_dir(d.path().join("out")).expect("ls").count(),
            1,
            "no tmp or lock left"
        );
    }
}
