//! File-system helpers shared by the storage drivers: path confinement under a pool,
//! ownership marks (xattr with a sidecar fallback), reflink and sparse-aware copies,
//! fsync of files and directories.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::unistd::{Whence, lseek};
use stead_host::progress::{self, Meter, Progress};
use stead_host::xattr;
use stead_reconciler::driver::DriverError;

/// Name of the xattr holding a volume's ownership mark.
pub const OWNER_XATTR: &str = "user.stead.owner";
/// Suffix of the sidecar file used when the file system has no user xattrs.
pub const SIDECAR_SUFFIX: &str = ".stead";

/// Builds a [`DriverError::Io`] from a nix errno.
pub fn nix_err(context: impl Into<String>, e: Errno) -> DriverError {
    DriverError::io(context, io::Error::from(e))
}

/// Checks one path component that stead will create or open under a pool: no
/// separators, not `.`/`..`, not empty, no NUL, not hidden (stead's temp files are).
pub fn check_component(what: &str, name: &str) -> Result<(), DriverError> {
    let bad = name.is_empty()
        || name == "."
        || name == ".."
        || name.starts_with('.')
        || name.contains('/')
        || name.contains('\0')
        || name.len() > 200;
    if bad {
        return Err(DriverError::Refused(format!(
            "{what} {name:?} would escape its pool or is not a plain file name"
        )));
    }
    Ok(())
}

/// Checks a pool root path: absolute, normalized (no `.`/`..`), and, if it exists, a
/// directory that is not itself a symlink.
pub fn check_pool_root(path: &Path) -> Result<(), DriverError> {
    if !path.is_absolute() {
        return Err(DriverError::Refused(format!(
            "pool path {} is not absolute",
            path.display()
        )));
    }
    if path
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(DriverError::Refused(format!(
            "pool path {} contains '.' or '..'",
            path.display()
        )));
    }
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(DriverError::Refused(format!(
            "pool path {} is a symlink; stead does not follow symlinks out of a pool",
            path.display()
        ))),
        Ok(m) if !m.is_dir() => Err(DriverError::Conflict(format!(
            "pool path {} exists and is not a directory",
            path.display()
        ))),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DriverError::io(format!("stat {}", path.display()), e)),
    }
}

/// Joins `parts` under `root`, refusing any component that would escape it and any
/// existing component (below the root) that is a symlink. The last component may be
/// absent.
pub fn confined(root: &Path, parts: &[&str]) -> Result<PathBuf, DriverError> {
    check_pool_root(root)?;
    let mut p = root.to_path_buf();
    for part in parts {
        check_component("path component", part)?;
        p.push(part);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(DriverError::Refused(format!(
                    "{} is a symlink; stead does not follow symlinks inside a pool",
                    p.display()
                )));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(DriverError::io(format!("stat {}", p.display()), e)),
        }
    }
    Ok(p)
}

/// Creates directory `root/parts...` step by step (never through a symlink).
pub fn ensure_dir(root: &Path, parts: &[&str]) -> Result<PathBuf, DriverError> {
    let mut done: Vec<&str> = Vec::new();
    let mut p = root.to_path_buf();
    for part in parts {
        done.push(part);
        p = confined(root, &done)?;
        match fs::create_dir(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let m = fs::symlink_metadata(&p)
                    .map_err(|e| DriverError::io(format!("stat {}", p.display()), e))?;
                if !m.is_dir() {
                    return Err(DriverError::Conflict(format!(
                        "{} exists and is not a directory",
                        p.display()
                    )));
                }
            }
            Err(e) => return Err(DriverError::io(format!("mkdir {}", p.display()), e)),
        }
    }
    Ok(p)
}

/// Removes a file; absent is success.
pub fn remove_file_if_exists(path: &Path) -> Result<bool, DriverError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(DriverError::io(format!("remove {}", path.display()), e)),
    }
}

/// Removes a directory tree (or a file or symlink); absent is success. Never follows a
/// symlink inside the tree and never crosses into a mount: a mount at or below `path`
/// is a [`DriverError::Conflict`] naming it, and nothing below a mount is touched.
pub fn remove_tree_if_exists(path: &Path) -> Result<(), DriverError> {
    stead_host::remove_tree_beneath(path)
        .map(|_| ())
        .map_err(tree_err)
}

/// A [`DriverError`] from a failed [`stead_host::remove_tree_beneath`].
pub fn tree_err(e: stead_host::TreeError) -> DriverError {
    match e {
        stead_host::TreeError::MountBelow { .. } => DriverError::Conflict(e.to_string()),
        stead_host::TreeError::Io(h) => host_err(h),
    }
}

/// A [`DriverError`] from a failed [`stead_host`] file operation (op, path, OS error).
pub fn host_err(h: stead_host::HostError) -> DriverError {
    DriverError::io(format!("{} {}", h.op, h.path.display()), h.source)
}

/// fsyncs a directory (after a rename or unlink in it).
pub fn fsync_dir(path: &Path) -> Result<(), DriverError> {
    let d = File::open(path).map_err(|e| DriverError::io(format!("open {}", path.display()), e))?;
    d.sync_all()
        .map_err(|e| DriverError::io(format!("fsync {}", path.display()), e))
}

/// Opens an existing regular file for reading and writing without following symlinks.
pub fn open_rw_nofollow(path: &Path) -> Result<File, DriverError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| DriverError::io(format!("open {}", path.display()), e))
}

/// Creates a new file (must not exist), mode 0600, without following symlinks.
pub fn create_new(path: &Path) -> Result<File, DriverError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| DriverError::io(format!("create {}", path.display()), e))
}

/// How an ownership mark is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkKind {
    /// The `user.stead.owner` xattr on the file itself.
    Xattr,
    /// A sidecar file `<file>.stead` next to it (file system without user xattrs).
    Sidecar,
}

impl MarkKind {
    /// Label for status output.
    pub fn as_str(self) -> &'static str {
        match self {
            MarkKind::Xattr => "xattr",
            MarkKind::Sidecar => "sidecar",
        }
    }
}

/// Path of the sidecar mark of `path`.
pub fn sidecar_of(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(SIDECAR_SUFFIX);
    PathBuf::from(s)
}

/// Sets the ownership mark on an open file: the xattr, or the sidecar next to `path` if
/// the file system does not support user xattrs.
pub fn set_owner(file: &File, path: &Path, owner: &str) -> Result<MarkKind, DriverError> {
    match xattr::set_on(file, OWNER_XATTR, owner.as_bytes()) {
        Ok(()) => return Ok(MarkKind::Xattr),
        Err(e) if !xattr::is_unsupported(&e) => {
            return Err(DriverError::io(
                format!("set xattr on {}", path.display()),
                e,
            ));
        }
        Err(_) => {}
    }
    let side = sidecar_of(path);
    write_atomic(&side, owner.as_bytes())?;
    Ok(MarkKind::Sidecar)
}

/// Reads the ownership mark of `path` (xattr first, then the sidecar), whatever its
/// length. Does not follow a symlink at `path`.
pub fn get_owner(path: &Path) -> Result<Option<(String, MarkKind)>, DriverError> {
    match xattr::get(path, OWNER_XATTR) {
        Ok(Some(v)) => {
            return Ok(Some((
                String::from_utf8_lossy(&v).into_owned(),
                MarkKind::Xattr,
            )));
        }
        Ok(None) => {}
        Err(e) if xattr::is_unsupported(&e) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(DriverError::io(
                format!("get xattr of {}", path.display()),
                e,
            ));
        }
    }
    let side = sidecar_of(path);
    match fs::read_to_string(&side) {
        Ok(s) => Ok(Some((s.trim().to_string(), MarkKind::Sidecar))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(DriverError::io(format!("read {}", side.display()), e)),
    }
}

/// Writes `data` to `path` atomically and durably with mode 0600:
/// [`stead_host::write_atomic`] with its error as a [`DriverError`].
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), DriverError> {
    stead_host::write_atomic(path, data).map_err(host_err)
}

/// Clones `src` into `dst` (whole file) with the FICLONE ioctl. `Ok(false)` when the file
/// system (or the pair of file systems) does not support reflinks.
pub fn try_reflink(src: &File, dst: &File) -> Result<bool, DriverError> {
    use rustix::io::Errno as E;
    match rustix::fs::ioctl_ficlone(dst, src) {
        Ok(()) => Ok(true),
        Err(E::OPNOTSUPP | E::XDEV | E::INVAL | E::NOTTY | E::NOSYS) => Ok(false),
        Err(e) => Err(DriverError::io("FICLONE", e.into())),
    }
}

/// How a copy was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMethod {
    /// Copy-on-write clone (FICLONE): instant, no extra space.
    Reflink,
    /// Sparse-aware byte copy (holes and zero blocks are skipped).
    Sparse,
}

impl CopyMethod {
    /// Label for logs and CLI output.
    pub fn as_str(self) -> &'static str {
        match self {
            CopyMethod::Reflink => "reflink",
            CopyMethod::Sparse => "sparse-copy",
        }
    }
}

const CHUNK: usize = 1 << 20;

/// Copies `src` into `dst` (which must be empty), skipping holes (SEEK_DATA/SEEK_HOLE)
/// and all-zero blocks, so sparse files stay sparse. Sets `dst`'s length to `src`'s.
/// Returns the number of bytes actually written. `progress` follows the bytes copied.
pub fn sparse_copy(src: &File, dst: &File, progress: &dyn Progress) -> Result<u64, DriverError> {
    let len = src
        .metadata()
        .map_err(|e| DriverError::io("stat copy source", e))?
        .len();
    progress.set_length(len);
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    let mut pos: u64 = 0;
    let to_off = |v: u64| libc::off_t::try_from(v).unwrap_or(libc::off_t::MAX);
    while pos < len {
        // Next data extent at or after pos.
        let data = match lseek(src, to_off(pos), Whence::SeekData) {
            Ok(o) => u64::try_from(o).unwrap_or(len),
            Err(Errno::ENXIO) => break, // only a hole remains
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) => pos, // no SEEK_DATA: treat all as data
            Err(e) => return Err(nix_err("lseek SEEK_DATA", e)),
        };
        let hole = match lseek(src, to_off(data), Whence::SeekHole) {
            Ok(o) => u64::try_from(o).unwrap_or(len).min(len),
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) => len,
            Err(e) => return Err(nix_err("lseek SEEK_HOLE", e)),
        };
        let mut off = data;
        while off < hole {
            let want = usize::try_from((hole - off).min(CHUNK as u64)).unwrap_or(CHUNK);
            let n = src
                .read_at(&mut buf[..want], off)
                .map_err(|e| DriverError::io("read copy source", e))?;
            if n == 0 {
                break;
            }
            let chunk = &buf[..n];
            if chunk.iter().any(|&b| b != 0) {
                dst.write_all_at(chunk, off)
                    .map_err(|e| DriverError::io("write copy target", e))?;
                written += n as u64;
            }
            off += n as u64;
            progress.set_position(off);
        }
        pos = hole.max(data + 1);
    }
    dst.set_len(len)
        .map_err(|e| DriverError::io("set length of copy target", e))?;
    progress.finish();
    Ok(written)
}

/// Copies all of `src` into the empty file `dst`: a reflink when possible, else a
/// sparse-aware copy, whose progress is shown under `label` (see [`progress::start`]).
pub fn clone_or_copy(src: &File, dst: &File, label: &str) -> Result<CopyMethod, DriverError> {
    if try_reflink(src, dst)? {
        return Ok(CopyMethod::Reflink);
    }
    sparse_copy(src, dst, &*progress::start(label, Meter::Transfer))?;
    Ok(CopyMethod::Sparse)
}

/// Whether `dir` (an existing directory) supports FICLONE between two files in it.
/// Probes with two unnamed `O_TMPFILE` files, so nothing is left behind even after a
/// crash; file systems without `O_TMPFILE` report no reflink support.
pub fn reflink_supported(dir: &Path) -> bool {
    let tmpfile = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE)
            .open(dir)
    };
    let (Ok(a), Ok(b)) = (tmpfile(), tmpfile()) else {
        return false;
    };
    if a.write_all_at(&[1u8; 4096], 0).is_err() || a.sync_all().is_err() {
        return false;
    }
    try_reflink(&a, &b).unwrap_or(false)
}

/// Allocated bytes of a file (blocks * 512).
pub fn allocated(meta: &fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    meta.blocks().saturating_mul(512)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records what a copy reports.
    #[derive(Default)]
    struct Recorded(Mutex<(u64, u64, bool)>);

    impl Progress for Recorded {
        fn set_length(&self, len: u64) {
            if let Ok(mut r) = self.0.lock() {
                r.0 = len;
            }
        }
        fn inc(&self, delta: u64) {
            if let Ok(mut r) = self.0.lock() {
                r.1 += delta;
            }
        }
        fn set_position(&self, pos: u64) {
            if let Ok(mut r) = self.0.lock() {
                r.1 = pos;
            }
        }
        fn set_message(&self, _msg: &str) {}
        fn finish(&self) {
            if let Ok(mut r) = self.0.lock() {
                r.2 = true;
            }
        }
    }

    #[test]
    fn a_sparse_copy_reports_its_progress_and_keeps_holes() {
        let d = tempfile::tempdir().expect("tmp");
        let src = File::create(d.path().join("src")).expect("src");
        src.write_all_at(b"data", 1 << 20).expect("write");
        src.set_len(3 << 20).expect("len");
        let dst = File::create(d.path().join("dst")).expect("dst");
        let src = File::open(d.path().join("src")).expect("open");
        let rec = Recorded::default();
        let written = sparse_copy(&src, &dst, &rec).expect("copy");
        assert!(written < 1 << 20, "holes are not written: {written}");
        assert_eq!(dst.metadata().expect("stat").len(), 3 << 20);
        let r = *rec.0.lock().expect("lock");
        assert_eq!(r.0, 3 << 20, "length set");
        assert!(
            r.1 > 1 << 20 && r.1 <= 3 << 20,
            "position follows the data: {}",
            r.1
        );
        assert!(r.2, "finished");
    }

    #[test]
    fn components_are_confined() {
        for bad in ["", ".", "..", "../x", "a/b", ".hidden", "x\0y"] {
            assert!(check_component("volume", bad).is_err(), "{bad:?}");
        }
        assert!(check_component("volume", "web-data").is_ok());
    }

    #[test]
    fn pool_root_must_be_absolute_and_normal() {
        assert!(check_pool_root(Path::new("rel/pool")).is_err());
        assert!(check_pool_root(Path::new("/tmp/../etc")).is_err());
        assert!(check_pool_root(Path::new("/nonexistent-stead-pool-xyz")).is_ok());
    }

    #[test]
    fn remove_tree_refuses_a_mount_below_and_leaves_its_files() {
        let d = tempfile::tempdir().expect("tempdir");
        let tree = d.path().join("vol");
        let (res, survived) = std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare");
            rustix::mount::mount_change(
                "/",
                rustix::mount::MountPropagationFlags::PRIVATE
                    | rustix::mount::MountPropagationFlags::REC,
            )
            .expect("private");
            let m = tree.join("staging");
            fs::create_dir_all(&m).expect("mkdir");
            rustix::mount::mount("t", &m, "tmpfs", rustix::mount::MountFlags::empty(), None)
                .expect("mount tmpfs");
            fs::write(m.join("f"), b"x").expect("write");
            let res = remove_tree_if_exists(&tree);
            let survived = m.join("f").exists();
            rustix::mount::unmount(&m, rustix::mount::UnmountFlags::empty()).expect("umount");
            (res, survived)
        })
        .join()
        .expect("thread");
        match res {
            Err(DriverError::Conflict(m)) => assert!(m.contains("staging is a mount point"), "{m}"),
            other => panic!("expected a conflict, got {other:?}"),
        }
        assert!(survived, "files on the mount survive");
    }

    #[test]
    fn a_long_owner_mark_round_trips_whole() {
        // Marks used to be read into a fixed 256-byte buffer (ERANGE past it).
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("v.raw");
        let f = create_new(&p).expect("create");
        let mark = format!("env/{}/Volume/web", "e".repeat(285));
        assert_eq!(mark.len(), 300);
        let kind = set_owner(&f, &p, &mark).expect("set");
        let (got, got_kind) = get_owner(&p).expect("get").expect("a mark");
        assert_eq!(got, mark);
        assert_eq!(got_kind, kind);
    }

    #[test]
    fn sidecar_name() {
        assert_eq!(
            sidecar_of(Path::new("/p/images/a.raw")),
            PathBuf::from("/p/images/a.raw.stead")
        );
    }
}
