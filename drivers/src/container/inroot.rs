//! Mount targets resolved inside a container's root, never by host path.
//!
//! Before `pivot_root` the container's init still sees the host's file system, and a
//! rootfs is data the container controls: a link `data -> /etc` planted in it would, with
//! path-based setup (`root.join("data/sub")`, `create_dir_all`), make stead create
//! directories on the host and mount volumes there (the runc CVE-2021-30465 class).
//!
//! Every target is therefore looked up with `openat2(root, path, O_PATH,
//! RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`: symlinks (absolute or with `..`) resolve as
//! they would inside the container, clamped at its root. What is missing is created one
//! component at a time with `mkdirat`/`openat(O_CREAT|O_EXCL|O_NOFOLLOW)` relative to a
//! parent fd that was itself resolved in the root, and mounts go onto the resolved fd
//! (`/proc/self/fd/N`), so nothing is resolved again by path between check and use.

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{
    CWD, FileType, Mode, OFlags, ResolveFlags, fstat, mkdirat, openat, openat2, readlinkat,
};
use rustix::io::Errno;

/// Resolution rules for every lookup below the root.
/// Links followed while creating a path (the kernel's own limit).
const MAX_LINKS: u32 = 40;

fn in_root() -> ResolveFlags {
    ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS
}

/// An `O_PATH` fd of the container's root directory (the top mount at that path).
pub(crate) struct Root {
    fd: OwnedFd,
}

/// The magic-link path through which a mount lands on exactly the object `fd` refers to.
pub(crate) fn fd_path(fd: &OwnedFd) -> PathBuf {
    stead_host::ProcFs::host().self_fd(fd.as_raw_fd())
}

/// `rel` as a path relative to the root (`"."` for the root itself).
fn relative(rel: &Path) -> PathBuf {
    let r: PathBuf = rel
        .components()
        .filter(|c| !matches!(c, Component::RootDir | Component::CurDir))
        .collect();
    if r.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        r
    }
}

fn file_type(fd: &OwnedFd) -> Result<FileType, Errno> {
    fstat(fd).map(|st| FileType::from_raw_mode(st.st_mode))
}

/// `statfs` magic numbers of the kernel file systems stead mounts in a container.
const PROC_SUPER_MAGIC: i64 = 0x9fa0;
const SYSFS_MAGIC: i64 = 0x6265_6572;

/// Refuses a mount target on the container's `/proc` or `/sys` (a link in the rootfs can
/// point there; a volume over kernel files could hide what stead masks or makes
/// read-only, as runc refuses too).
pub(crate) fn refuse_kernel_fs(fd: &OwnedFd, rel: &str) -> Result<(), String> {
    let st = rustix::fs::fstatfs(fd).map_err(|e| format!("statfs {rel}: {e}"))?;
    // `f_type` is i64 on x86_64/aarch64, narrower on some other architectures.
    #[allow(clippy::unnecessary_cast)]
    let kind = st.f_type as i64;
    if kind == PROC_SUPER_MAGIC || kind == SYSFS_MAGIC {
        return Err(format!(
            "mount target {rel} resolves into the container's /proc or /sys: refused"
        ));
    }
    Ok(())
}

impl Root {
    /// Opens the host directory `path` as the root of later lookups.
    pub(crate) fn open(path: &Path) -> Result<Root, String> {
        let fd = openat2(
            CWD,
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::empty(),
        )
        .map_err(|e| format!("open rootfs {}: {e}", path.display()))?;
        Ok(Root { fd })
    }

    /// The root's fd (for `fchdir` before `pivot_root`).
    pub(crate) fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Looks `rel` up inside the root (symlinks resolved as the container would).
    pub(crate) fn lookup(&self, rel: &Path) -> Result<OwnedFd, Errno> {
        openat2(
            &self.fd,
            relative(rel),
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            in_root(),
        )
    }

    /// Resolves directory `rel` inside the root, creating missing components (0755)
    /// beneath it; the missing target of a dangling link is created where the link
    /// points inside the root.
    pub(crate) fn mkdir_all(&self, rel: &Path) -> Result<OwnedFd, String> {
        let ctx = |e: Errno| format!("mkdir {} in the rootfs: {e}", rel.display());
        let fd = match self.lookup(rel) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => {
                self.create_dirs(rel, MAX_LINKS).map_err(ctx)?;
                self.lookup(rel).map_err(ctx)?
            }
            Err(e) => return Err(ctx(e)),
        };
        if file_type(&fd).map_err(ctx)? != FileType::Directory {
            return Err(ctx(Errno::NOTDIR));
        }
        Ok(fd)
    }

    /// Creates the missing components of `rel`, one `mkdirat` at a time under a parent
    /// resolved in the root; follows dangling links (at most `links` of them).
    fn create_dirs(&self, rel: &Path, links: u32) -> Result<(), Errno> {
        let mut prefix = PathBuf::new();
        for comp in relative(rel).components() {
            let Component::Normal(name) = comp else {
                prefix.push(comp);
                continue;
            };
            let parent = self.lookup(&prefix)?;
            match mkdirat(&parent, name, Mode::from_raw_mode(0o755)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(e),
            }
            let next = prefix.join(name);
            if matches!(self.lookup(&next), Err(Errno::NOENT)) {
                // A dangling link: create its target (as seen inside the root).
                let links = links.checked_sub(1).ok_or(Errno::LOOP)?;
                let target = readlinkat(&parent, name, Vec::new())?;
                let target = Path::new(OsStr::from_bytes(target.as_bytes()));
                self.create_dirs(&prefix.join(target), links)?;
            }
            prefix = next;
        }
        Ok(())
    }

    /// Resolves a mount target for a file (`rel` inside the root), creating an empty
    /// file (0644) when nothing is there; the parent directories as [`Root::mkdir_all`].
    pub(crate) fn touch(&self, rel: &Path) -> Result<OwnedFd, String> {
        let ctx = |e: Errno| format!("create {} in the rootfs: {e}", rel.display());
        match self.lookup(rel) {
            Ok(fd) => return Ok(fd),
            Err(Errno::NOENT) => {}
            Err(e) => return Err(ctx(e)),
        }
        let name = rel.file_name().ok_or_else(|| ctx(Errno::INVAL))?;
        let parent = self.mkdir_all(rel.parent().unwrap_or(Path::new("/")))?;
        let flags = OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::WRONLY;
        match openat(
            &parent,
            name,
            flags | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        ) {
            Ok(_) | Err(Errno::EXIST) => {}
            Err(e) => return Err(ctx(e)),
        }
        self.lookup(rel).map_err(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn links_resolve_inside_the_root() {
        let host = tempfile::tempdir().expect("tmp");
        let root = tempfile::tempdir().expect("tmp");
        let outside = host.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        symlink(&outside, root.path().join("abs")).expect("link");
        symlink("../../../..", root.path().join("up")).expect("link");
        symlink(host.path().join("gone"), root.path().join("dangling")).expect("link");
        symlink("loop", root.path().join("loop")).expect("link");
        let r = Root::open(root.path()).expect("open");
        r.mkdir_all(Path::new("/abs/sub")).expect("mkdir");
        r.mkdir_all(Path::new("/dangling/sub"))
            .expect("mkdir through a dangling link");
        assert!(
            !host.path().join("gone").exists(),
            "link target made on the host"
        );
        let gone = root
            .path()
            .join(host.path().strip_prefix("/").expect("abs"));
        assert!(gone.join("gone/sub").is_dir(), "made inside the root");
        assert!(
            r.mkdir_all(Path::new("/loop/x")).is_err(),
            "a link loop ends"
        );
        r.mkdir_all(Path::new("/up/x/y")).expect("mkdir");
        r.touch(Path::new("/abs/file")).expect("touch");
        assert!(
            std::fs::read_dir(&outside).expect("read").next().is_none(),
            "nothing created outside the root"
        );
        let inner = root.path().join(outside.strip_prefix("/").expect("abs"));
        assert!(inner.join("sub").is_dir());
        assert!(inner.join("file").is_file());
        assert!(root.path().join("x/y").is_dir());
    }

    #[test]
    fn a_file_is_not_a_directory_target() {
        let root = tempfile::tempdir().expect("tmp");
        std::fs::write(root.path().join("f"), "").expect("write");
        let r = Root::open(root.path()).expect("open");
        let e = r.mkdir_all(Path::new("/f")).expect_err("refused");
        assert!(
            e.contains("Not a directory") || e.contains("not a directory"),
            "{e}"
        );
    }
}
