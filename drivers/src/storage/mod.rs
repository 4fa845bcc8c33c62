//! Storage: `StoragePool` and `Volume` drivers, and volume snapshots.
//!
//! Pool types:
//! - `dir`: a directory. Volumes are sparse raw files `<pool>/images/<name>.raw`, or
//!   qcow2 files `<pool>/images/<name>.qcow2` (made with `qemu-img`, see [`qemu_img`]).
//! - `nfs`: the declared export mounted at `path` (mount(2)), then laid out as `dir`.
//! - `btrfs`: a directory on a btrfs file system. Each volume is a subvolume
//!   `<pool>/images/<name>/` holding `disk.raw` or `disk.qcow2`; snapshots are read-only
//!   btrfs snapshots `<pool>/snapshots/<volume>/<snap>` made with the btrfs ioctls (no
//!   `btrfs` CLI).
//! - `lvmthin`, `zfs`: thin LVs / zvols through the LVM and ZFS command-line tools.
//!
//! Ownership: a pool carries a marker file `<path>/.stead-pool` (JSON naming the pool); a
//! volume file carries the xattr `user.stead.owner=Volume/<name>`, or, on a file system
//! without user xattrs, a sidecar file `<file>.stead` with the same text. LVs carry the
//! tag `stead-owner=Volume/<name>`; zvols the user property `stead:owner`.
//!
//! Nothing under a pool is reached through a symlink; names that would escape the pool
//! are refused. Writes are crash-safe: new volume files are built as
//! `.<name>.raw.tmp` / `.<name>.qcow2.tmp` (a fetched image in `.<name>.fetch.tmp`),
//! fsynced and renamed; leftovers are removed by the next apply.
//!
//! Images from outside (`source.file`, `source.url` with its SHA-256, see [`import`]) are
//! converted to the volume's format. A template (`template: true`) is a file of mode
//! 0444; its linked clones are qcow2 overlays (dir/nfs) or reflinks (btrfs), and a
//! template that linked clones read is not deleted.

pub(crate) mod fsutil;
pub mod lvm;
pub(crate) mod mounts;
mod pool;
pub mod rootfs_snapshot;
pub mod snapshot;
mod volume;
pub mod workload_snapshot;
pub mod zfs;

pub mod btrfs;
pub mod import;
pub mod qemu_img;
pub mod replicate;
pub mod replicate_tls;

use std::path::PathBuf;

use stead_reconciler::driver::{DriverError, Lookup};
use stead_schema::{Kind, ResourceId, Spec, StoragePoolSpec, VolumeFormat, VolumeSpec};

pub use fsutil::{CopyMethod, MarkKind, OWNER_XATTR};
pub use pool::{MARKER_FILE, PoolDriver};
pub use snapshot::{
    CopyMethodOrNative, SAFETY_PREFIX, SnapshotInfo, check_snapshot_name, safety_snapshot,
    snapshot_create, snapshot_delete, snapshot_list, snapshot_rollback, supports_cheap_snapshots,
};
pub use volume::VolumeDriver;

/// The environment whose ownership scope this process acts in (`None`: the host's own).
static OWNER_SCOPE: std::sync::RwLock<Option<String>> = std::sync::RwLock::new(None);

/// Scopes every ownership mark this process writes or honours to environment `env`
/// (`stead env`): marks then read `env/<env>/Volume/<name>`, so an environment never
/// adopts, changes or deletes a volume marked for the host or for another environment.
/// `None` returns to the host's own scope (`Volume/<name>`).
pub fn set_owner_scope(env: Option<&str>) {
    let mut g = OWNER_SCOPE.write().unwrap_or_else(|p| p.into_inner());
    *g = env.map(str::to_string);
}

/// The prefix of ownership marks in environment `env`.
pub fn env_owner_prefix(env: &str) -> String {
    format!("env/{env}/")
}

/// The prefix of ownership marks in this process's scope (empty for the host's own).
pub(crate) fn owner_prefix() -> String {
    let g = OWNER_SCOPE.read().unwrap_or_else(|p| p.into_inner());
    g.as_deref().map(env_owner_prefix).unwrap_or_default()
}

/// The LV name prefix of this process's scope: `env-<env>-` inside an environment (its
/// LVs share the volume group with the host's), empty for the host's own.
pub(crate) fn lv_prefix() -> String {
    let g = OWNER_SCOPE.read().unwrap_or_else(|p| p.into_inner());
    g.as_deref()
        .map(|e| format!("env-{e}-"))
        .unwrap_or_default()
}

/// The ownership mark of a file (xattr `user.stead.owner`, else its sidecar), if any.
pub fn owner_mark(path: &std::path::Path) -> Result<Option<String>, DriverError> {
    Ok(fsutil::get_owner(path)?.map(|(m, _)| m))
}

/// Files under `area` (symlinks not followed) whose ownership mark does not start with
/// `prefix`, with their mark; an unreadable mark is reported as the error text.
pub fn marks_outside(area: &std::path::Path, prefix: &str) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for e in walkdir::WalkDir::new(area)
        .follow_links(false)
        .into_iter()
        .flatten()
    {
        if !e.file_type().is_file() {
            continue;
        }
        match owner_mark(e.path()) {
            Ok(Some(m)) if !m.starts_with(prefix) => out.push((e.path().to_path_buf(), m)),
            Ok(_) => {}
            Err(err) => out.push((e.path().to_path_buf(), err.to_string())),
        }
    }
    out
}

/// Looks up a StoragePool spec by name.
pub fn pool_spec<'a>(
    world: &'a dyn Lookup,
    pool_name: &str,
) -> Result<&'a StoragePoolSpec, DriverError> {
    match world
        .resource(&ResourceId::new(Kind::StoragePool, pool_name))
        .map(|r| &r.spec)
    {
        Some(Spec::StoragePool(p)) => Ok(p),
        _ => Err(DriverError::NotReady(format!(
            "StoragePool/{pool_name} is not known"
        ))),
    }
}

/// Looks up a Volume spec by name.
pub fn volume_spec<'a>(
    world: &'a dyn Lookup,
    volume_name: &str,
) -> Result<&'a VolumeSpec, DriverError> {
    match world
        .resource(&ResourceId::new(Kind::Volume, volume_name))
        .map(|r| &r.spec)
    {
        Some(Spec::Volume(v)) => Ok(v),
        _ => Err(DriverError::NotReady(format!(
            "Volume/{volume_name} is not known"
        ))),
    }
}

/// The host path of a StoragePool (its directory / mount point).
pub fn pool_path(world: &dyn Lookup, pool_name: &str) -> Result<PathBuf, DriverError> {
    let spec = pool_spec(world, pool_name)?;
    fsutil::check_pool_root(&spec.path)?;
    Ok(spec.path.clone())
}

/// The host path of a Volume's disk image, for container and VM drivers to attach:
/// `<pool>/images/<name>.raw|.qcow2` (dir, nfs), `<pool>/images/<name>/disk.raw|.qcow2`
/// (btrfs), `/dev/<vg>/<name>` (lvmthin), `/dev/zvol/<dataset>/<name>` (zfs).
/// Refuses names and paths that escape the pool. See [`volume_image`] for the format.
pub fn volume_path(world: &dyn Lookup, volume_name: &str) -> Result<PathBuf, DriverError> {
    volume_image(world, volume_name).map(|(p, _)| p)
}

/// The host path of a Volume's disk image and the format to open it as (`raw` on
/// lvmthin and zfs pools, which only hold raw volumes).
pub fn volume_image(
    world: &dyn Lookup,
    volume_name: &str,
) -> Result<(PathBuf, VolumeFormat), DriverError> {
    let vol = volume_spec(world, volume_name)?;
    let pool = pool_spec(world, vol.pool.as_str())?;
    let path = volume::disk_path(vol.pool.as_str(), pool, volume_name, vol.format)?;
    Ok((path, vol.format))
}

/// Refuses a manifest value that a tool would read as an option (it starts with `-`).
/// `stead validate` checks the tools' naming rules; this is the driver's own guard.
pub(crate) fn check_not_option(field: &str, value: &str) -> Result<(), DriverError> {
    if value.starts_with('-') {
        return Err(DriverError::Refused(format!(
            "{field} {value:?} starts with '-' and would be read as an option"
        )));
    }
    Ok(())
}

/// Checks that every operand after `--` in `argv` (the manifest's values) is not an
/// option, so that even past the `--` no tool gets a `-x` from a manifest.
pub(crate) fn check_operands(argv: &[String]) -> Result<(), DriverError> {
    let operands = argv.iter().skip_while(|a| *a != "--").skip(1);
    for a in operands {
        check_not_option("argument", a)?;
    }
    Ok(())
}

/// Runs an external storage tool, mapping a missing binary to `Unsupported`.
pub(crate) fn run_tool(argv: &[String], package: &str) -> Result<String, DriverError> {
    let Some((first, rest)) = argv.split_first() else {
        return Err(DriverError::Other("empty command".into()));
    };
    check_operands(argv)?;
    let line = argv.join(" ");
    tracing::debug!(command = %line, "running");
    let out = std::process::Command::new(first)
        .args(rest)
        .output()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                DriverError::Unsupported(format!("{first} not found (install {package})"))
            } else {
                DriverError::io(format!("run {line}"), e)
            }
        })?;
    if !out.status.success() {
        return Err(DriverError::Command {
            command: line,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
