//! A recursive delete that stays beneath its root and on its root's mount.
//!
//! The walk is fd-relative: every directory is opened from its parent's fd with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV)` and `O_NOFOLLOW`,
//! entries are removed with `unlinkat`. A symlink inside the tree is removed, never
//! followed; a directory on another mount (compared by mount id, and the kernel's
//! `RESOLVE_NO_XDEV`) stops the delete with [`TreeError::MountBelow`] naming it, before
//! anything of the tree is removed when the mount table shows it.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use crate::fs::HostError;
use crate::mounts::{MountTable, canonical, mount_id_of};

/// Why a tree was not (fully) removed.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// A file system is mounted at or below the tree: removing it would delete (or fail
    /// half-way into) someone else's data. Nothing is unmounted.
    #[error("refusing to remove {}: {} is a mount point inside it; unmount it first", tree.display(), mount.display())]
    MountBelow {
        /// The tree asked to be removed.
        tree: PathBuf,
        /// The mount found at or below it.
        mount: PathBuf,
    },
    /// An OS error on the way.
    #[error(transparent)]
    Io(#[from] HostError),
}

fn io_err(op: &'static str, path: &Path, e: Errno) -> TreeError {
    TreeError::Io(HostError::new(op, path, io::Error::from(e)))
}

fn mount_below(tree: &Path, mount: PathBuf) -> TreeError {
    TreeError::MountBelow {
        tree: tree.to_path_buf(),
        mount,
    }
}

/// Removes the directory tree at `path` (or the file or symlink at `path`) without
/// following symlinks and without crossing into another mount. Absent is success
/// (`Ok(false)`). Symlinks in the directories leading to `path` are resolved (those
/// belong to the caller); nothing below `path` is ever followed.
pub fn remove_tree_beneath(path: &Path) -> Result<bool, TreeError> {
    let _span = tracing::debug_span!("remove_tree", path = %path.display()).entered();
    let (parent_path, name) = split(path)?;
    let parent = match rustix::fs::open(
        parent_path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(false),
        Err(e) => return Err(io_err("open", parent_path, e)),
    };
    let root = match open_dir_beneath(&parent, name) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(false),
        Err(Errno::NOTDIR | Errno::LOOP) => {
            unlink(&parent, name, false, path)?;
            return Ok(true);
        }
        Err(Errno::XDEV) => return Err(mount_below(path, canonical(path))),
        Err(e) => return Err(io_err("open", path, e)),
    };
    let mnt = mount_id_of(&root).map_err(|e| TreeError::Io(HostError::new("statx", path, e)))?;
    let parent_mnt =
        mount_id_of(&parent).map_err(|e| TreeError::Io(HostError::new("statx", path, e)))?;
    if mnt != parent_mnt {
        return Err(mount_below(path, canonical(path)));
    }
    refuse_listed_mounts(path)?;
    let dev = rustix::fs::fstat(&root)
        .map_err(|e| io_err("stat", path, e))?
        .st_dev;
    let walk = Walk { mnt, dev };
    walk.remove_contents(&root, path)?;
    drop(root);
    unlink(&parent, name, true, path)?;
    Ok(true)
}

/// Refuses when the mount table lists a mount at or below `path` (compared canonically).
fn refuse_listed_mounts(path: &Path) -> Result<(), TreeError> {
    let table = MountTable::read()?;
    if let Some(m) = table.at(path) {
        return Err(mount_below(path, m.mount_point.clone()));
    }
    if let Some(m) = table.below(path).first() {
        return Err(mount_below(path, m.mount_point.clone()));
    }
    Ok(())
}

fn split(path: &Path) -> Result<(&Path, &std::ffi::OsStr), TreeError> {
    let name = path.file_name().ok_or_else(|| {
        TreeError::Io(HostError::new(
            "remove tree",
            path,
            io::Error::new(io::ErrorKind::InvalidInput, "path has no final name"),
        ))
    })?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Ok((parent, name))
}

/// Opens directory `name` in `dir`: no symlink anywhere, no `..`, no mount crossing.
fn open_dir_beneath(dir: &impl AsFd, name: &std::ffi::OsStr) -> Result<OwnedFd, Errno> {
    rustix::fs::openat2(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_XDEV,
    )
}

fn unlink(
    dir: &impl AsFd,
    name: &std::ffi::OsStr,
    is_dir: bool,
    shown: &Path,
) -> Result<(), TreeError> {
    let flags = if is_dir {
        AtFlags::REMOVEDIR
    } else {
        AtFlags::empty()
    };
    match rustix::fs::unlinkat(dir, name, flags) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        // A bind mount on a file (or a busy mount point) cannot be unlinked.
        Err(Errno::BUSY) => Err(mount_below(shown, canonical(shown))),
        Err(e) => Err(io_err("remove", shown, e)),
    }
}

struct Walk {
    mnt: Option<u64>,
    dev: u64,
}

impl Walk {
    /// Removes everything inside the open directory `dir` (shown as `shown` in errors).
    fn remove_contents(&self, dir: &OwnedFd, shown: &Path) -> Result<(), TreeError> {
        for (name, ftype) in list(dir, shown)? {
            let child = shown.join(&name);
            if ftype == FileType::Directory {
                let fd = match open_dir_beneath(dir, &name) {
                    Ok(fd) => fd,
                    Err(Errno::NOENT) => continue,
                    Err(Errno::XDEV) => return Err(mount_below(shown, canonical(&child))),
                    // Replaced by a symlink or a file meanwhile: unlink that instead.
                    Err(Errno::NOTDIR | Errno::LOOP) => {
                        unlink(dir, &name, false, &child)?;
                        continue;
                    }
                    Err(e) => return Err(io_err("open", &child, e)),
                };
                self.check_same_mount(&fd, shown, &child)?;
                self.remove_contents(&fd, &child)?;
                drop(fd);
                unlink(dir, &name, true, &child)?;
            } else {
                unlink(dir, &name, false, &child)?;
            }
        }
        Ok(())
    }

    /// A directory on another mount than the root stops the walk. btrfs subvolumes have
    /// their own st_dev on the same mount, so the mount id decides where the kernel has
    /// it; st_dev only where it does not.
    fn check_same_mount(&self, fd: &OwnedFd, tree: &Path, child: &Path) -> Result<(), TreeError> {
        let other = match self.mnt {
            Some(m) => mount_id_of(fd)
                .map_err(|e| TreeError::Io(HostError::new("statx", child, e)))?
                .is_some_and(|id| id != m),
            None => {
                rustix::fs::fstat(fd)
                    .map_err(|e| io_err("stat", child, e))?
                    .st_dev
                    != self.dev
            }
        };
        if other {
            return Err(mount_below(tree, canonical(child)));
        }
        Ok(())
    }
}

/// The entries of `dir` (without `.` and `..`), read fully before anything is removed.
fn list(dir: &OwnedFd, shown: &Path) -> Result<Vec<(std::ffi::OsString, FileType)>, TreeError> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = Vec::new();
    let rd = Dir::read_from(dir).map_err(|e| io_err("read directory", shown, e))?;
    for entry in rd {
        let entry = entry.map_err(|e| io_err("read directory", shown, e))?;
        let bytes = entry.file_name().to_bytes();
        if bytes == b"." || bytes == b".." {
            continue;
        }
        let name = std::ffi::OsStr::from_bytes(bytes).to_os_string();
        let ftype = match entry.file_type() {
            FileType::Unknown => rustix::fs::statat(dir, &name, AtFlags::SYMLINK_NOFOLLOW)
                .map(|st| FileType::from_raw_mode(st.st_mode))
                .map_err(|e| io_err("stat", &shown.join(&name), e))?,
            t => t,
        };
        out.push((name, ftype));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// Runs `f` on a thread with its own private mount namespace, so mounts made there
    /// never reach the host and vanish with the thread (even if `f` panics).
    fn in_private_mount_ns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare mount ns");
            rustix::mount::mount_change(
                "/",
                rustix::mount::MountPropagationFlags::PRIVATE
                    | rustix::mount::MountPropagationFlags::REC,
            )
            .expect("make mounts private");
            f()
        })
        .join()
        .expect("test thread")
    }

    fn mount_tmpfs(at: &Path) {
        rustix::mount::mount(
            "stead-test",
            at,
            "tmpfs",
            rustix::mount::MountFlags::empty(),
            None,
        )
        .expect("mount tmpfs");
    }

    #[test]
    fn removes_a_plain_tree_and_reports_absent() {
        let d = tempfile::tempdir().expect("tempdir");
        let t = d.path().join("t");
        fs::create_dir_all(t.join("a/b/c")).expect("mkdir");
        fs::write(t.join("a/b/c/f"), b"x").expect("write");
        fs::write(t.join("g"), b"y").expect("write");
        assert!(remove_tree_beneath(&t).expect("remove"));
        assert!(!t.exists());
        assert!(!remove_tree_beneath(&t).expect("absent is fine"));
    }

    #[test]
    fn a_symlink_inside_is_removed_not_followed() {
        let d = tempfile::tempdir().expect("tempdir");
        let outside = d.path().join("outside");
        fs::create_dir(&outside).expect("mkdir");
        fs::write(outside.join("keep"), b"precious").expect("write");
        let t = d.path().join("t");
        fs::create_dir(&t).expect("mkdir");
        std::os::unix::fs::symlink(&outside, t.join("link")).expect("symlink");
        std::os::unix::fs::symlink(outside.join("keep"), t.join("filelink")).expect("symlink");
        assert!(remove_tree_beneath(&t).expect("remove"));
        assert!(!t.exists());
        assert_eq!(
            fs::read(outside.join("keep")).expect("target survives"),
            b"precious"
        );
    }

    #[test]
    fn a_symlink_as_the_tree_itself_is_unlinked_not_followed() {
        let d = tempfile::tempdir().expect("tempdir");
        let outside = d.path().join("outside");
        fs::create_dir(&outside).expect("mkdir");
        fs::write(outside.join("keep"), b"precious").expect("write");
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&outside, &link).expect("symlink");
        assert!(remove_tree_beneath(&link).expect("remove"));
        assert!(fs::symlink_metadata(&link).is_err());
        assert!(outside.join("keep").exists());
    }

    #[test]
    fn a_tmpfs_inside_the_tree_stops_the_delete_and_its_files_survive() {
        let d = tempfile::tempdir().expect("tempdir");
        let base = d.path().to_path_buf();
        let (err, survived, tree_kept) = in_private_mount_ns(move || {
            let t = base.join("t");
            let m = t.join("vols/data");
            fs::create_dir_all(&m).expect("mkdir");
            fs::write(t.join("vols/before"), b"x").expect("write");
            mount_tmpfs(&m);
            fs::write(m.join("file"), b"mounted data").expect("write into tmpfs");
            let err = remove_tree_beneath(&t).expect_err("must refuse");
            let survived = fs::read(m.join("file")).ok();
            let kept = t.join("vols/before").exists();
            rustix::mount::unmount(&m, rustix::mount::UnmountFlags::empty()).expect("umount");
            (err.to_string(), survived, kept)
        });
        assert!(err.contains("/vols/data is a mount point"), "{err}");
        assert_eq!(survived.as_deref(), Some(&b"mounted data"[..]));
        assert!(
            tree_kept,
            "nothing is removed once the mount table shows a mount"
        );
    }

    #[test]
    fn a_mount_point_as_the_tree_itself_is_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        let base = d.path().to_path_buf();
        let (res, survived) = in_private_mount_ns(move || {
            let m = base.join("m");
            fs::create_dir(&m).expect("mkdir");
            mount_tmpfs(&m);
            fs::write(m.join("file"), b"x").expect("write");
            let res = remove_tree_beneath(&m).map_err(|e| e.to_string());
            let survived = m.join("file").exists();
            rustix::mount::unmount(&m, rustix::mount::UnmountFlags::empty()).expect("umount");
            (res, survived)
        });
        let err = res.expect_err("must refuse");
        assert!(err.contains("is a mount point"), "{err}");
        assert!(survived);
    }

    #[test]
    fn a_bind_mount_reached_through_a_non_canonical_path_is_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        let base = d.path().to_path_buf();
        let (r1, r2, survived) = in_private_mount_ns(move || {
            let src = base.join("src");
            fs::create_dir(&src).expect("mkdir");
            fs::write(src.join("keep"), b"x").expect("write");
            let real = base.join("real");
            let m = real.join("run/vol");
            fs::create_dir_all(&m).expect("mkdir");
            fs::create_dir(base.join("other")).expect("mkdir");
            // A bind mount of the same file system: same st_dev, another mount.
            rustix::mount::mount_bind(&src, &m).expect("bind");
            std::os::unix::fs::symlink(&real, base.join("link")).expect("symlink");
            let r1 =
                remove_tree_beneath(&base.join("other/../real/run")).map_err(|e| e.to_string());
            let r2 = remove_tree_beneath(&base.join("link/run")).map_err(|e| e.to_string());
            let survived = m.join("keep").exists() && src.join("keep").exists();
            rustix::mount::unmount(&m, rustix::mount::UnmountFlags::empty()).expect("umount");
            (r1, r2, survived)
        });
        for r in [r1, r2] {
            let err = r.expect_err("must refuse");
            assert!(err.contains("real/run/vol is a mount point"), "{err}");
        }
        assert!(survived);
    }

    #[test]
    fn the_walk_itself_stops_at_a_mount_the_table_does_not_show() {
        // The walk checks mount ids on its own, whatever the table says: a table read
        // from the parent's view (empty of our mounts) must not make it cross.
        let d = tempfile::tempdir().expect("tempdir");
        let base = d.path().to_path_buf();
        let (res, survived) = in_private_mount_ns(move || {
            let t = base.join("t");
            let m = t.join("sub");
            fs::create_dir_all(&m).expect("mkdir");
            mount_tmpfs(&m);
            fs::write(m.join("file"), b"x").expect("write");
            let root = rustix::fs::open(&t, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
                .expect("open");
            let walk = Walk {
                mnt: mount_id_of(&root).expect("statx"),
                dev: rustix::fs::fstat(&root).expect("stat").st_dev,
            };
            let res = walk.remove_contents(&root, &t).map_err(|e| e.to_string());
            let survived = m.join("file").exists();
            rustix::mount::unmount(&m, rustix::mount::UnmountFlags::empty()).expect("umount");
            (res, survived)
        });
        let err = res.expect_err("must refuse");
        assert!(err.contains("sub is a mount point"), "{err}");
        assert!(survived);
    }
}
