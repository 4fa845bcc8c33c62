//! Snapshots of a container's own root file system directory: the unpacked copy
//! (`rootfs/<name>/root`) or a privileged overlay's upper layer (`rootfs/<name>/upper`).
//!
//! They live in `<base>/rootfs/<name>/snapshots/<snap>/` and are copies made by
//! `cp -a --reflink=auto`. That keeps owners, modes, times, hardlinks, xattrs (an
//! overlay's `trusted.overlay.*` opaque markers), device nodes (whiteouts) and holes, and
//! shares blocks where the file system has reflinks (btrfs, xfs). A copy goes to a
//! uniquely named `.<snap>.XXXXXX.tmp` sibling and is renamed into place (never over an
//! existing snapshot), so a crash never leaves a half snapshot under its final name.
//!
//! Rollback copies the snapshot next to the data, swaps the two directories atomically
//! (`renameat2(RENAME_EXCHANGE)`) and then removes the old data. A crash at any point
//! leaves either the old or the new tree in place, plus a temp directory that the next
//! rollback removes. Snapshots are deleted with the container.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
use stead_reconciler::driver::DriverError;
use tracing::info;

use crate::storage::check_snapshot_name;
use crate::storage::fsutil::remove_tree_if_exists;

/// The directory of container `name`'s own rootfs data under `base`, with the input
/// name backups give it: `("rootfs", …/root)` or `("rootfs-upper", …/upper)`. `None`
/// when the container has no own rootfs data (a `path` or `volume` rootfs, or not yet
/// applied).
pub fn own_data(name: &str, base: &Path) -> Option<(&'static str, PathBuf)> {
    let own = base.join("rootfs").join(name);
    if own.join("root").is_dir() {
        Some(("rootfs", own.join("root")))
    } else if own.join("upper").is_dir() {
        Some(("rootfs-upper", own.join("upper")))
    } else {
        None
    }
}

/// Where the rootfs snapshots of container `name` live.
pub fn snapshots_dir(name: &str, base: &Path) -> PathBuf {
    base.join("rootfs").join(name).join("snapshots")
}

fn io(ctx: String) -> impl FnOnce(std::io::Error) -> DriverError {
    move |e| DriverError::io(ctx, e)
}

/// How [`copy_tree`] may share blocks: `cp --reflink=auto` or `--reflink=always`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reflink {
    /// Clone where possible, else copy.
    Auto,
    /// Clone every file or fail.
    Always,
}

/// `cp -a --reflink=… -T src dst` (dst absent or an empty directory): owners, modes, times, hardlinks,
/// xattrs, device nodes and holes kept. A failed copy is removed.
pub(crate) fn copy_tree(src: &Path, dst: &Path, reflink: Reflink) -> Result<(), DriverError> {
    let flag = match reflink {
        Reflink::Auto => "--reflink=auto",
        Reflink::Always => "--reflink=always",
    };
    let out = Command::new("cp")
        .args(["-a", flag, "-T"])
        .arg(src)
        .arg(dst)
        .output()
        .map_err(io("run cp (coreutils)".into()))?;
    if out.status.success() {
        Ok(())
    } else {
        let _ = remove_tree_if_exists(dst);
        Err(DriverError::Command {
            command: format!("cp -a {flag} -T {} {}", src.display(), dst.display()),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Snapshots `data` as `snap` in `snaps`. Refuses an existing name.
pub fn create(data: &Path, snaps: &Path, snap: &str) -> Result<PathBuf, DriverError> {
    check_snapshot_name(snap)?;
    let target = snaps.join(snap);
    if fs::symlink_metadata(&target).is_ok() {
        return Err(DriverError::Conflict(format!(
            "rootfs snapshot {snap:?} already exists ({})",
            target.display()
        )));
    }
    fs::create_dir_all(snaps).map_err(io(format!("mkdir {}", snaps.display())))?;
    // A temp dir of its own: a concurrent create of the same name never shares it.
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{snap}."))
        .suffix(".tmp")
        .tempdir_in(snaps)
        .map_err(io(format!("create a temp dir in {}", snaps.display())))?
        .keep();
    let made = copy_tree(data, &tmp, Reflink::Auto).and_then(|()| publish(&tmp, &target, snap));
    if made.is_err() {
        let _ = remove_tree_if_exists(&tmp);
    }
    made?;
    crate::storage::fsutil::fsync_dir(snaps)?;
    info!(path = %target.display(), "rootfs snapshot created");
    Ok(target)
}

/// Renames the finished copy `tmp` to `target`, never over an existing snapshot.
fn publish(tmp: &Path, target: &Path, snap: &str) -> Result<(), DriverError> {
    match renameat2(
        AT_FDCWD,
        tmp,
        AT_FDCWD,
        target,
        RenameFlags::RENAME_NOREPLACE,
    ) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EEXIST | nix::errno::Errno::ENOTEMPTY) => {
            Err(DriverError::Conflict(format!(
                "rootfs snapshot {snap:?} already exists ({})",
                target.display()
            )))
        }
        Err(e) => Err(DriverError::io(
            format!("rename to {}", target.display()),
            e.into(),
        )),
    }
}

/// The snapshots in `snaps`: (name, modification time as RFC 3339), sorted by name.
pub fn list(snaps: &Path) -> Result<Vec<(String, Option<String>)>, DriverError> {
    let rd = match fs::read_dir(snaps) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(DriverError::io(format!("read {}", snaps.display()), e)),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(io(format!("read {}", snaps.display())))?;
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if name.starts_with('.') || !e.path().is_dir() {
            continue;
        }
        let created = e.metadata().ok().and_then(|m| m.modified().ok()).map(|t| {
            chrono::DateTime::<chrono::Utc>::from(t)
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        });
        out.push((name, created));
    }
    out.sort();
    Ok(out)
}

/// Replaces `data` with a copy of snapshot `snap`. The container must not be running.
pub fn rollback(data: &Path, snaps: &Path, snap: &str) -> Result<(), DriverError> {
    check_snapshot_name(snap)?;
    let src = snaps.join(snap);
    if !src.is_dir() {
        return Err(DriverError::Refused(format!(
            "rootfs snapshot {snap:?} ({} is absent)",
            src.display()
        )));
    }
    let tmp = data.with_file_name(format!(
        ".{}.rollback",
        data.file_name().and_then(|n| n.to_str()).unwrap_or("root")
    ));
    remove_tree_if_exists(&tmp)?;
    copy_tree(&src, &tmp, Reflink::Auto)?;
    renameat2(AT_FDCWD, &tmp, AT_FDCWD, data, RenameFlags::RENAME_EXCHANGE).map_err(|e| {
        DriverError::io(
            format!("exchange {} and {}", tmp.display(), data.display()),
            e.into(),
        )
    })?;
    remove_tree_if_exists(&tmp)?;
    info!(data = %data.display(), snap, "rootfs rolled back");
    Ok(())
}

/// Deletes snapshot `snap` (absent is success).
pub fn delete(snaps: &Path, snap: &str) -> Result<(), DriverError> {
    check_snapshot_name(snap)?;
    remove_tree_if_exists(&snaps.join(snap))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    #[test]
    fn concurrent_creates_of_one_snapshot_name_leave_one_whole_snapshot() {
        // Both used to copy into the one `.<snap>.tmp`, each removing the other's copy.
        let t = tempfile::tempdir().expect("tmp");
        let data = t.path().join("rootfs/c/root");
        fs::create_dir_all(&data).expect("mkdir");
        for i in 0..200 {
            fs::write(data.join(format!("f{i}")), vec![b'x'; 4096]).expect("write");
        }
        let snaps = snapshots_dir("c", t.path());
        for round in 0..5 {
            let snap = format!("s{round}");
            let barrier = std::sync::Barrier::new(2);
            let results = std::thread::scope(|s| {
                let make = || {
                    barrier.wait();
                    create(&data, &snaps, &snap)
                };
                let a = s.spawn(make);
                let b = s.spawn(make);
                [a.join().expect("a"), b.join().expect("b")]
            });
            let ok = results.iter().filter(|r| r.is_ok()).count();
            assert_eq!(ok, 1, "exactly one create wins: {results:?}");
            assert!(
                results
                    .iter()
                    .any(|r| matches!(r, Err(DriverError::Conflict(_)))),
                "the other is told the name is taken: {results:?}"
            );
            assert_eq!(
                fs::read_dir(snaps.join(&snap)).expect("snapshot").count(),
                200
            );
        }
        let left: Vec<_> = fs::read_dir(&snaps)
            .expect("snaps")
            .map(|e| e.expect("entry").file_name())
            .filter(|n| n.to_string_lossy().starts_with('.'))
            .collect();
        assert!(left.is_empty(), "no temp dirs left: {left:?}");
    }

    #[test]
    fn create_list_rollback_delete_keep_metadata() {
        let t = tempfile::tempdir().expect("tmp");
        let data = t.path().join("rootfs/c/root");
        fs::create_dir_all(data.join("etc")).expect("mkdir");
        fs::write(data.join("etc/hostname"), "one\n").expect("write");
        fs::set_permissions(data.join("etc/hostname"), fs::Permissions::from_mode(0o640))
            .expect("chmod");
        std::os::unix::fs::symlink("etc/hostname", data.join("link")).expect("symlink");
        let snaps = snapshots_dir("c", t.path());
        create(&data, &snaps, "s1").expect("create");
        assert!(matches!(
            create(&data, &snaps, "s1"),
            Err(DriverError::Conflict(_))
        ));
        assert_eq!(
            list(&snaps)
                .expect("list")
                .into_iter()
                .map(|(n, _)| n)
                .collect::<Vec<_>>(),
            ["s1"]
        );
        fs::write(data.join("etc/hostname"), "two\n").expect("write");
        fs::write(data.join("new-file"), "x").expect("write");
        rollback(&data, &snaps, "s1").expect("rollback");
        assert_eq!(
            fs::read_to_string(data.join("etc/hostname")).expect("read"),
            "one\n"
        );
        assert_eq!(
            fs::metadata(data.join("etc/hostname"))
                .expect("stat")
                .mode()
                & 0o7777,
            0o640
        );
        assert!(!data.join("new-file").exists());
        assert_eq!(
            fs::read_link(data.join("link")).expect("link"),
            Path::new("etc/hostname")
        );
        assert!(!t.path().join("rootfs/c/.root.rollback").exists());
        assert_eq!(own_data("c", t.path()).map(|(n, _)| n), Some("rootfs"));
        delete(&snaps, "s1").expect("delete");
        delete(&snaps, "s1").expect("absent is fine");
        assert!(list(&snaps).expect("list").is_empty());
        assert!(rollback(&data, &snaps, "s1").is_err());
    }
}
