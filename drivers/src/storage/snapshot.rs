//! Volume snapshots.
//!
//! - `dir`/`nfs` pools: `<pool>/snapshots/<volume>/<snap>.raw`, a reflink (FICLONE)
//!   copy where the file system supports it (instant, CoW), else a full sparse copy with
//!   a progress bar. A sparse copy of a volume in use is not crash-consistent; a reflink
//!   is atomic. A qcow2 volume's snapshot is the same byte copy of its qcow2 file (still
//!   named `.raw`); a linked clone's copy names its backing file relative to `images/`, so
//!   it is only meant to be rolled back, not opened where it lies.
//! - Templates are read-only: a rollback of one is refused.
//! - `btrfs` pools: read-only btrfs snapshots `<pool>/snapshots/<volume>/<snap>`.
//! - `lvmthin`: thin snapshot LVs `<volume>--snap--<snap>`; `zfs`: `<zvol>@<snap>`.
//!
//! Rollback replaces the volume atomically: the snapshot is cloned to a temp name next to
//! the volume and renamed over it (btrfs: exchanged with `renameat2(RENAME_EXCHANGE)`);
//! a crash leaves only the temp, which the next apply or rollback removes.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
use serde::Serialize;
use stead_reconciler::driver::{DriverError, HostEnv, Lookup};
use stead_schema::{PoolType, StoragePoolSpec, VolumeFormat};
use tracing::{info, info_span};

use super::fsutil::{self, CopyMethod, check_component, confined, nix_err};
use super::volume::{btrfs_disk_in, owner_of, remove_btrfs_tmp, tmp_name};
use super::{btrfs, lvm, pool, zfs};

/// One snapshot of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotInfo {
    /// Volume name.
    pub volume: String,
    /// Snapshot name.
    pub name: String,
    /// Where it lives (file, subvolume, LV or dataset).
    pub location: String,
    /// Size in bytes (the volume's size when taken), if known.
    pub size: Option<u64>,
    /// Creation time, RFC 3339 UTC, if known.
    pub created: Option<String>,
    /// How it was made / stored: `reflink`, `sparse-copy`, `btrfs`, `lvm`, `zfs`, `file`.
    pub method: String,
}

/// Checks a snapshot name: `[A-Za-z0-9][A-Za-z0-9._-]*`, at most 64 bytes.
pub fn check_snapshot_name(snap: &str) -> Result<(), DriverError> {
    let b = snap.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        && !snap.ends_with(".tmp")
        && !snap.ends_with(".stead");
    if ok {
        Ok(())
    } else {
        Err(DriverError::Refused(format!(
            "invalid snapshot name {snap:?}: use letters, digits, '.', '_' and '-', starting with a letter or digit, at most 64 characters"
        )))
    }
}

/// Prefix of safety snapshots: they are kept when their volume is deleted (that is their
/// point) and removed only with `stead snapshot delete`.
pub const SAFETY_PREFIX: &str = "pre-";

/// Whether snapshots of volumes in `pool` are cheap (no full copy): btrfs, lvmthin and
/// zfs always; dir/nfs only when the file system supports reflinks (probed with two
/// unnamed temp files in the pool).
pub fn supports_cheap_snapshots(pool: &StoragePoolSpec) -> bool {
    match pool.pool_type {
        PoolType::Btrfs | PoolType::Lvmthin | PoolType::Zfs => true,
        PoolType::Dir | PoolType::Nfs => {
            let images = pool.path.join("images");
            let dir = if images.is_dir() {
                images
            } else {
                pool.path.clone()
            };
            dir.is_dir() && fsutil::reflink_supported(&dir)
        }
    }
}

/// Takes a safety snapshot of `volume` before a data-loss change, if its pool makes
/// snapshots cheap (see [`supports_cheap_snapshots`]); `Ok(None)` otherwise or when the
/// volume does not exist. Named `pre-<UTC time>`; kept when the volume is deleted.
pub fn safety_snapshot(
    env: &HostEnv,
    world: &dyn Lookup,
    volume: &str,
) -> Result<Option<SnapshotInfo>, DriverError> {
    let v = super::volume_spec(world, volume)?;
    let pool = super::pool_spec(world, v.pool.as_str())?;
    let disk = super::volume::existing_disk_path(v.pool.as_str(), pool, volume, v.format)?;
    let exists = match pool.pool_type {
        PoolType::Lvmthin | PoolType::Zfs => true,
        _ => disk.exists(),
    };
    if !exists || !supports_cheap_snapshots(pool) {
        return Ok(None);
    }
    let mut name = format!(
        "{SAFETY_PREFIX}{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ")
    );
    name = name.replace('.', "_");
    snapshot_create(env, world, volume, &name).map(Some)
}

struct Ctx<'a> {
    pool_name: &'a str,
    pool: &'a StoragePoolSpec,
    format: VolumeFormat,
    template: bool,
}

fn resolve<'a>(world: &'a dyn Lookup, volume: &'a str) -> Result<Ctx<'a>, DriverError> {
    check_component("volume name", volume)?;
    let v = super::volume_spec(world, volume)?;
    let pool = super::pool_spec(world, v.pool.as_str())?;
    fsutil::check_pool_root(&pool.path)?;
    pool::require_owned(v.pool.as_str(), &pool.path)?;
    Ok(Ctx {
        pool_name: v.pool.as_str(),
        pool,
        format: v.format,
        template: v.template,
    })
}

fn rfc3339(m: &fs::Metadata) -> Option<String> {
    let t = m.created().or_else(|_| m.modified()).ok()?;
    Some(
        chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    )
}

fn not_found(volume: &str, snap: &str) -> DriverError {
    DriverError::Refused(format!("Volume/{volume} has no snapshot {snap:?}"))
}

fn lvm_spec<'a>(c: &Ctx<'a>) -> Result<&'a stead_schema::LvmSpec, DriverError> {
    c.pool
        .lvm
        .as_ref()
        .ok_or_else(|| DriverError::Refused(format!("StoragePool/{} has no spec.lvm", c.pool_name)))
}

fn zfs_spec<'a>(c: &Ctx<'a>) -> Result<&'a stead_schema::ZfsSpec, DriverError> {
    c.pool
        .zfs
        .as_ref()
        .ok_or_else(|| DriverError::Refused(format!("StoragePool/{} has no spec.zfs", c.pool_name)))
}

/// Copies the volume `src` into the new file `tmp`, marks it and renames it to `target`.
fn copy_snapshot_file(
    src: &File,
    tmp: &Path,
    target: &Path,
    volume: &str,
    snap: &str,
) -> Result<fsutil::CopyMethod, DriverError> {
    let dst = fsutil::create_new(tmp)?;
    fsutil::set_owner(&dst, target, &owner_of(volume))?;
    let how = fsutil::clone_or_copy(src, &dst, &format!("snapshot Volume/{volume}@{snap}"))?;
    dst.sync_all()
        .map_err(|e| DriverError::io(format!("fsync {}", tmp.display()), e))?;
    drop(dst);
    fs::rename(tmp, target)
        .map_err(|e| DriverError::io(format!("rename to {}", target.display()), e))?;
    Ok(how)
}

/// Takes snapshot `snap` of `volume`. Refuses an existing snapshot name.
pub fn snapshot_create(
    _env: &HostEnv,
    world: &dyn Lookup,
    volume: &str,
    snap: &str,
) -> Result<SnapshotInfo, DriverError> {
    check_snapshot_name(snap)?;
    let c = resolve(world, volume)?;
    let _span = info_span!("snapshot_create", volume, snap).entered();
    match c.pool.pool_type {
        PoolType::Dir | PoolType::Nfs => {
            let vol = super::volume::existing_disk_path(c.pool_name, c.pool, volume, c.format)?;
            owned_file(&vol, volume)?;
            let dir = fsutil::ensure_dir(&c.pool.path, &["snapshots", volume])?;
            let target = dir.join(format!("{snap}.raw"));
            if fs::symlink_metadata(&target).is_ok() {
                return Err(DriverError::Conflict(format!(
                    "snapshot {snap:?} of Volume/{volume} already exists"
                )));
            }
            let tmp = dir.join(format!(".{snap}.raw.tmp"));
            fsutil::remove_file_if_exists(&tmp)?;
            let src = File::open(&vol)
                .map_err(|e| DriverError::io(format!("open {}", vol.display()), e))?;
            let copied = copy_snapshot_file(&src, &tmp, &target, volume, snap);
            if copied.is_err() {
                // A failed copy (a full pool) must not keep its space, nor its mark.
                let _ = fsutil::remove_file_if_exists(&tmp);
                let _ = fsutil::remove_file_if_exists(&fsutil::sidecar_of(&target));
            }
            let how = copied?;
            fsutil::fsync_dir(&dir)?;
            info!(method = how.as_str(), path = %target.display(), "snapshot created");
            let m = fs::symlink_metadata(&target)
                .map_err(|e| DriverError::io(format!("stat {}", target.display()), e))?;
            Ok(SnapshotInfo {
                volume: volume.into(),
                name: snap.into(),
                location: target.display().to_string(),
                size: Some(m.len()),
                created: rfc3339(&m),
                method: how.as_str().into(),
            })
        }
        PoolType::Btrfs => {
            let sub = confined(&c.pool.path, &["images", volume])?;
            if !btrfs::is_subvolume(&sub)? {
                return Err(DriverError::NotReady(format!(
                    "Volume/{volume} does not exist ({} is not a subvolume)",
                    sub.display()
                )));
            }
            owned_file(&btrfs_disk_in(&sub), volume)?;
            let dir = fsutil::ensure_dir(&c.pool.path, &["snapshots", volume])?;
            if fs::symlink_metadata(dir.join(snap)).is_ok() {
                return Err(DriverError::Conflict(format!(
                    "snapshot {snap:?} of Volume/{volume} already exists"
                )));
            }
            btrfs::snapshot(&sub, &dir, snap, true)?;
            info!(path = %dir.join(snap).display(), "btrfs snapshot created");
            let list = snapshot_list(_env, world, volume)?;
            list.into_iter()
                .find(|s| s.name == snap)
                .ok_or_else(|| not_found(volume, snap))
        }
        PoolType::Lvmthin => {
            let l = lvm_spec(&c)?;
            lvm::run(&lvm::cmd_snapshot(l, volume, snap))?;
            Ok(SnapshotInfo {
                volume: volume.into(),
                name: snap.into(),
                location: format!("{}/{}", l.volume_group, lvm::snapshot_lv(volume, snap)),
                size: None,
                created: None,
                method: "lvm".into(),
            })
        }
        PoolType::Zfs => {
            let z = zfs_spec(&c)?;
            zfs::run(&zfs::cmd_snapshot(z, volume, snap))?;
            Ok(SnapshotInfo {
                volume: volume.into(),
                name: snap.into(),
                location: format!("{}@{snap}", zfs::zvol_name(z, volume)),
                size: None,
                created: None,
                method: "zfs".into(),
            })
        }
    }
}

fn owned_file(path: &Path, volume: &str) -> Result<(), DriverError> {
    match fsutil::get_owner(path)? {
        Some((o, _)) if o == owner_of(volume) => Ok(()),
        Some(_) | None if path.exists() => Err(DriverError::Conflict(format!(
            "{} is not owned by Volume/{volume}",
            path.display()
        ))),
        _ => Err(DriverError::NotReady(format!(
            "Volume/{volume} does not exist ({} is absent)",
            path.display()
        ))),
    }
}

/// Lists the snapshots of `volume`, sorted by name.
pub fn snapshot_list(
    _env: &HostEnv,
    world: &dyn Lookup,
    volume: &str,
) -> Result<Vec<SnapshotInfo>, DriverError> {
    let c = resolve(world, volume)?;
    let mut out = Vec::new();
    match c.pool.pool_type {
        PoolType::Dir | PoolType::Nfs | PoolType::Btrfs => {
            let dir = confined(&c.pool.path, &["snapshots", volume])?;
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
                Err(e) => return Err(DriverError::io(format!("read {}", dir.display()), e)),
            };
            let btrfs_pool = c.pool.pool_type == PoolType::Btrfs;
            for e in rd {
                let e = e.map_err(|e| DriverError::io(format!("read {}", dir.display()), e))?;
                let fname = e.file_name().to_string_lossy().into_owned();
                if fname.starts_with('.') {
                    continue;
                }
                let (name, file) = if btrfs_pool {
                    (fname.clone(), btrfs_disk_in(&e.path()))
                } else {
                    match fname.strip_suffix(".raw") {
                        Some(n) => (n.to_string(), e.path()),
                        None => continue,
                    }
                };
                let m = fs::symlink_metadata(e.path())
                    .map_err(|err| DriverError::io(format!("stat {}", e.path().display()), err))?;
                let size = fs::symlink_metadata(&file).ok().map(|m| m.len());
                out.push(SnapshotInfo {
                    volume: volume.into(),
                    name,
                    location: e.path().display().to_string(),
                    size,
                    created: rfc3339(&m),
                    method: if btrfs_pool { "btrfs" } else { "file" }.into(),
                });
            }
        }
        PoolType::Lvmthin => {
            let l = lvm_spec(&c)?;
            let origin = lvm::lv_name(volume);
            let prefix = format!("{origin}--snap--");
            for lv in lvm::parse_lvs(&lvm::run(&lvm::cmd_list(l))?)? {
                if let Some(n) = lv.lv_name.strip_prefix(&prefix)
                    && lv.origin == origin
                {
                    out.push(SnapshotInfo {
                        volume: volume.into(),
                        name: n.into(),
                        location: format!("{}/{}", l.volume_group, lv.lv_name),
                        size: Some(lv.lv_size),
                        created: Some(lv.lv_time.clone()).filter(|t| !t.is_empty()),
                        method: "lvm".into(),
                    });
                }
            }
        }
        PoolType::Zfs => {
            let z = zfs_spec(&c)?;
            // The live zvol's snapshots (none when it does not exist), then those its
            // deleted predecessors kept (`zfs::delete_volume`).
            let text = zfs_listing(&zfs::cmd_snapshot_list(z, volume))?;
            let deleted = zfs_listing(&zfs::cmd_deleted_snapshot_list(z))?;
            for (zvol, snap, created) in zfs::deleted_snapshots(z, volume, &deleted) {
                out.push(SnapshotInfo {
                    volume: volume.into(),
                    name: snap.into(),
                    location: format!("{zvol}@{snap}"),
                    size: None,
                    created: zfs_created(created),
                    method: "zfs (deleted volume)".into(),
                });
            }
            let prefix = format!("{}@", zfs::zvol_name(z, volume));
            for line in text.lines() {
                let mut f = line.split('\t');
                let (Some(full), created) = (f.next(), f.next()) else {
                    continue;
                };
                let Some(n) = full.strip_prefix(&prefix) else {
                    continue;
                };
                out.push(SnapshotInfo {
                    volume: volume.into(),
                    name: n.into(),
                    location: full.into(),
                    size: None,
                    created: zfs_created(created),
                    method: "zfs".into(),
                });
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// `zfs list` output of `argv`; a dataset that does not exist lists nothing.
fn zfs_listing(argv: &[String]) -> Result<String, DriverError> {
    Ok(zfs::run_if_exists(argv)?.unwrap_or_default())
}

/// A `creation` field of `zfs list -Hp` (Unix seconds) as RFC 3339.
fn zfs_created(field: Option<&str>) -> Option<String> {
    field
        .and_then(|c| c.trim().parse::<i64>().ok())
        .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

/// Replaces the content of `volume` with snapshot `snap`, atomically. The volume must
/// not be in use (stop its container or VM first).
pub fn snapshot_rollback(
    _env: &HostEnv,
    world: &dyn Lookup,
    volume: &str,
    snap: &str,
) -> Result<CopyMethodOrNative, DriverError> {
    check_snapshot_name(snap)?;
    let c = resolve(world, volume)?;
    let _span = info_span!("snapshot_rollback", volume, snap).entered();
    if c.template {
        return Err(DriverError::Refused(super::volume::template_message(
            volume,
            "rolling it back",
        )));
    }
    match c.pool.pool_type {
        PoolType::Dir | PoolType::Nfs => {
            let src_path = confined(&c.pool.path, &["snapshots", volume, &format!("{snap}.raw")])?;
            let src = match File::open(&src_path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(not_found(volume, snap));
                }
                Err(e) => return Err(DriverError::io(format!("open {}", src_path.display()), e)),
            };
            let vol = super::volume::disk_path(c.pool_name, c.pool, volume, c.format)?;
            if vol.exists() {
                owned_file(&vol, volume)?;
            }
            let images = fsutil::ensure_dir(&c.pool.path, &["images"])?;
            let tmp = images.join(tmp_name(volume, c.format));
            fsutil::remove_file_if_exists(&tmp)?;
            let dst = super::volume::create_locked_tmp(&tmp)?;
            fsutil::set_owner(&dst, &vol, &owner_of(volume))?;
            let how =
                fsutil::clone_or_copy(&src, &dst, &format!("rollback Volume/{volume}@{snap}"))?;
            dst.sync_all()
                .map_err(|e| DriverError::io(format!("fsync {}", tmp.display()), e))?;
            drop(dst);
            fs::rename(&tmp, &vol)
                .map_err(|e| DriverError::io(format!("rename to {}", vol.display()), e))?;
            fsutil::fsync_dir(&images)?;
            info!(method = how.as_str(), "volume rolled back");
            Ok(CopyMethodOrNative::Copy(how))
        }
        PoolType::Btrfs => {
            let snap_dir = confined(&c.pool.path, &["snapshots", volume, snap])?;
            if !btrfs::is_subvolume(&snap_dir)? {
                return Err(not_found(volume, snap));
            }
            let images = fsutil::ensure_dir(&c.pool.path, &["images"])?;
            let tmp = format!(".{volume}.tmp");
            remove_btrfs_tmp(&images, &tmp)?;
            btrfs::snapshot(&snap_dir, &images, &tmp, false)?;
            let cur = confined(&c.pool.path, &["images", volume])?;
            if cur.exists() {
                owned_file(&btrfs_disk_in(&cur), volume)?;
                renameat2(
                    AT_FDCWD,
                    &images.join(&tmp),
                    AT_FDCWD,
                    &cur,
                    RenameFlags::RENAME_EXCHANGE,
                )
                .map_err(|e| nix_err(format!("exchange {} with its snapshot", cur.display()), e))?;
                fsutil::fsync_dir(&images)?;
                // The temp name now holds the old content.
                btrfs::subvol_destroy(&images, &tmp)?;
            } else {
                fs::rename(images.join(&tmp), &cur)
                    .map_err(|e| DriverError::io(format!("rename to {}", cur.display()), e))?;
                fsutil::fsync_dir(&images)?;
            }
            info!("btrfs volume rolled back");
            Ok(CopyMethodOrNative::Native("btrfs"))
        }
        PoolType::Lvmthin => {
            let l = lvm_spec(&c)?;
            lvm::run(&lvm::cmd_rollback(l, volume, snap))?;
            Ok(CopyMethodOrNative::Native("lvm"))
        }
        PoolType::Zfs => {
            let z = zfs_spec(&c)?;
            zfs::run(&zfs::cmd_rollback(z, volume, snap))?;
            Ok(CopyMethodOrNative::Native("zfs"))
        }
    }
}

/// How a rollback was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMethodOrNative {
    /// A file copy (reflink or sparse).
    Copy(CopyMethod),
    /// The pool's native mechanism (`btrfs`, `lvm`, `zfs`).
    Native(&'static str),
}

/// Deletes snapshot `snap` of `volume`; absent is success.
pub fn snapshot_delete(
    _env: &HostEnv,
    world: &dyn Lookup,
    volume: &str,
    snap: &str,
) -> Result<(), DriverError> {
    check_snapshot_name(snap)?;
    let c = resolve(world, volume)?;
    let _span = info_span!("snapshot_delete", volume, snap).entered();
    delete_one(c.pool_name, c.pool, volume, snap)
}

fn delete_one(
    pool_name: &str,
    pool: &StoragePoolSpec,
    volume: &str,
    snap: &str,
) -> Result<(), DriverError> {
    match pool.pool_type {
        PoolType::Dir | PoolType::Nfs => {
            let dir = confined(&pool.path, &["snapshots", volume])?;
            let f = confined(&pool.path, &["snapshots", volume, &format!("{snap}.raw")])?;
            fsutil::remove_file_if_exists(&f)?;
            fsutil::remove_file_if_exists(&fsutil::sidecar_of(&f))?;
            remove_dir_if_empty(&dir)
        }
        PoolType::Btrfs => {
            let dir = confined(&pool.path, &["snapshots", volume])?;
            let p = confined(&pool.path, &["snapshots", volume, snap])?;
            if p.exists() {
                if !btrfs::is_subvolume(&p)? {
                    return Err(DriverError::Conflict(format!(
                        "{} is not a btrfs snapshot",
                        p.display()
                    )));
                }
                btrfs::subvol_destroy(&dir, snap)?;
            }
            remove_dir_if_empty(&dir)
        }
        PoolType::Lvmthin => {
            let l = pool.lvm.as_ref().ok_or_else(|| {
                DriverError::Refused(format!("StoragePool/{pool_name} has no spec.lvm"))
            })?;
            lvm::run(&lvm::cmd_remove(l, &lvm::snapshot_lv(volume, snap))).map(|_| ())
        }
        PoolType::Zfs => {
            let z = pool.zfs.as_ref().ok_or_else(|| {
                DriverError::Refused(format!("StoragePool/{pool_name} has no spec.zfs"))
            })?;
            // A snapshot a deleted zvol of this volume kept: it goes, and that zvol with
            // its last one (nothing of the deleted volume is wanted any more).
            let deleted = zfs_listing(&zfs::cmd_deleted_snapshot_list(z))?;
            let found = zfs::deleted_snapshots(z, volume, &deleted);
            if let Some((zvol, _, _)) = found.iter().find(|(_, n, _)| *n == snap) {
                zfs::run(&[
                    "zfs".into(),
                    "destroy".into(),
                    "--".into(),
                    format!("{zvol}@{snap}"),
                ])?;
                if !found.iter().any(|(v, n, _)| v == zvol && *n != snap) {
                    zfs::run(&["zfs".into(), "destroy".into(), "--".into(), (*zvol).into()])?;
                }
                return Ok(());
            }
            zfs::run(&zfs::cmd_snapshot_destroy(z, volume, snap)).map(|_| ())
        }
    }
}

/// Whether the snapshot file a sidecar `<snap>.raw.stead` belongs to still exists.
fn names_has_raw(dir: &Path, sidecar: &str) -> bool {
    sidecar
        .strip_suffix(".stead")
        .is_some_and(|f| dir.join(f).exists())
}

fn remove_dir_if_empty(dir: &Path) -> Result<(), DriverError> {
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::DirectoryNotEmpty
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(DriverError::io(format!("rmdir {}", dir.display()), e)),
    }
}

/// Deletes every snapshot of `volume` in a file or btrfs pool (used when the volume
/// itself is deleted). lvmthin/zfs snapshots go with their volume (`zfs destroy -r`,
/// thin snapshot LVs are independent and removed here too).
pub(crate) fn delete_all(
    pool_name: &str,
    pool: &StoragePoolSpec,
    volume: &str,
) -> Result<(), DriverError> {
    let dir: PathBuf = confined(&pool.path, &["snapshots", volume])?;
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(DriverError::io(format!("read {}", dir.display()), e)),
    };
    let mut names = Vec::new();
    for e in rd {
        let e = e.map_err(|e| DriverError::io(format!("read {}", dir.display()), e))?;
        names.push(e.file_name().to_string_lossy().into_owned());
    }
    for n in names {
        if n.ends_with(".raw.stead") {
            // Sidecar ownership mark of a snapshot (file systems without xattrs).
            if !names_has_raw(&dir, &n) {
                fsutil::remove_file_if_exists(&dir.join(&n))?;
            }
            continue;
        }
        if n.starts_with('.') {
            // An interrupted snapshot copy (file) or nothing of ours.
            if n.ends_with(".raw.tmp") {
                fsutil::remove_file_if_exists(&dir.join(&n))?;
            }
            continue;
        }
        let snap = match pool.pool_type {
            PoolType::Btrfs => n.as_str(),
            _ => match n.strip_suffix(".raw") {
                Some(s) => s,
                None => continue,
            },
        };
        if snap.starts_with(SAFETY_PREFIX) {
            info!(volume, snapshot = snap, "keeping safety snapshot");
            continue;
        }
        if snap.starts_with(super::replicate::STALE_PREFIX) {
            // A stale live copy replication kept (writes a failover gave up): the
            // operator's to remove.
            info!(volume, snapshot = snap, "keeping stale copy");
            continue;
        }
        delete_one(pool_name, pool, volume, snap)?;
    }
    remove_dir_if_empty(&dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_names() {
        for ok in ["s1", "before-upgrade", "2026-01-01T00.00", "a_b"] {
            assert!(check_snapshot_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".hidden", "../x", "a/b", "x.tmp", "-x", &"a".repeat(65)] {
            assert!(check_snapshot_name(bad).is_err(), "{bad}");
        }
    }
}
