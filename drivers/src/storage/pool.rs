//! The `StoragePool` driver.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use stead_reconciler::driver::{
    DriverError, FieldChange, Health, HostEnv, Impact, Lookup, Observed, PruneAction, Typed,
};
use stead_schema::{Content, PoolType, ResourceId, StoragePoolSpec};
use tracing::{info, info_span, warn};

use super::fsutil::{self, check_pool_root};
use super::mounts::{self, MountEntry};
use super::{btrfs, lvm, zfs};

/// Name of the ownership marker file at the root of a pool.
pub const MARKER_FILE: &str = ".stead-pool";
/// Temp name used while the marker is written atomically.
/// Directories stead creates inside a pool.
const LAYOUT_DIRS: [&str; 6] = [
    "images",
    "rootfs",
    "backups",
    "iso",
    "templates",
    "snapshots",
];

/// Contents of the marker file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Marker {
    /// The owning pool's name.
    pub pool: String,
    /// The pool type stead laid out.
    #[serde(rename = "type")]
    pub pool_type: PoolType,
    /// Allowed content.
    #[serde(default)]
    pub content: Vec<Content>,
}

/// Subdirectory that holds a content type.
pub(crate) fn content_dir(c: Content) -> &'static str {
    match c {
        Content::Images => "images",
        Content::Rootdir => "rootfs",
        Content::Backup => "backups",
        Content::Iso => "iso",
        Content::Templates => "templates",
    }
}

/// What a plan compares a foreign directory with when it is to be adopted as a pool of
/// `spec`: the type it can be (a btrfs pool only on btrfs), its path, no content dirs of
/// stead's yet.
fn foreign_dir_state(spec: &StoragePoolSpec) -> Value {
    let ty = match spec.pool_type {
        PoolType::Btrfs if btrfs::is_btrfs(&spec.path).unwrap_or(false) => PoolType::Btrfs,
        PoolType::Btrfs | PoolType::Dir => PoolType::Dir,
        other => other,
    };
    json!({"type": ty.as_str(), "path": spec.path, "content": []})
}

/// Refuses to adopt the directory of `spec` as pool `name` unless the pool is of type
/// dir or btrfs (on btrfs), its path is a directory, and no other pool's marker is there.
fn check_adoptable(name: &str, spec: &StoragePoolSpec) -> Result<(), String> {
    let path = &spec.path;
    if !matches!(spec.pool_type, PoolType::Dir | PoolType::Btrfs) {
        return Err(format!(
            "stead adopts dir and btrfs pools, not {} pools",
            spec.pool_type.as_str()
        ));
    }
    let meta = fs::symlink_metadata(path).map_err(|e| format!("stat {}: {e}", path.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", path.display()));
    }
    match read_marker(path)? {
        Some(m) if m.pool != name => {
            return Err(format!(
                "{} belongs to StoragePool/{}",
                path.display(),
                m.pool
            ));
        }
        _ => {}
    }
    if spec.pool_type == PoolType::Btrfs && !btrfs::is_btrfs(path).map_err(|e| e.to_string())? {
        return Err(format!(
            "{} is not on a btrfs file system: adopt it as type dir",
            path.display()
        ));
    }
    Ok(())
}

fn normalized_content(c: &[Content]) -> Vec<Content> {
    let mut v = c.to_vec();
    v.sort();
    v.dedup();
    v
}

/// Reads the marker of the pool at `path`. `Ok(None)` if absent; an unreadable or
/// foreign file (symlink, garbage) is reported as `Err(reason)`.
pub(crate) fn read_marker(path: &Path) -> Result<Option<Marker>, String> {
    let p = path.join(MARKER_FILE);
    match fs::symlink_metadata(&p) {
        Ok(m) if !m.is_file() => return Err(format!("{} is not a regular file", p.display())),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("stat {}: {e}", p.display())),
    }
    let text = fs::read_to_string(&p).map_err(|e| format!("read {}: {e}", p.display()))?;
    // Accept a bare JSON string too (the pool name alone).
    if let Ok(name) = serde_json::from_str::<String>(&text) {
        return Ok(Some(Marker {
            pool: name,
            pool_type: PoolType::Dir,
            content: Vec::new(),
        }));
    }
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| format!("{} is not a stead pool marker: {e}", p.display()))
}

/// Whether a directory has no entries other than temp files of interrupted marker writes.
fn is_empty_dir(path: &Path) -> Result<bool, DriverError> {
    let rd =
        fs::read_dir(path).map_err(|e| DriverError::io(format!("read {}", path.display()), e))?;
    for e in rd {
        let e = e.map_err(|e| DriverError::io(format!("read {}", path.display()), e))?;
        if !stead_host::is_atomic_temp_name(&e.file_name()) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Removes the temp files of interrupted marker writes from the pool root `path`
/// (regular files named by [`stead_host::is_atomic_temp_name`] only).
fn remove_atomic_temps(path: &Path) -> Result<(), DriverError> {
    let rd =
        fs::read_dir(path).map_err(|e| DriverError::io(format!("read {}", path.display()), e))?;
    for e in rd {
        let e = e.map_err(|e| DriverError::io(format!("read {}", path.display()), e))?;
        let is_file = e.file_type().is_ok_and(|t| t.is_file());
        if is_file && stead_host::is_atomic_temp_name(&e.file_name()) {
            fsutil::remove_file_if_exists(&e.path())?;
        }
    }
    Ok(())
}

/// Checks that the pool at `path` exists and carries this pool's marker.
pub(crate) fn require_owned(pool_name: &str, path: &Path) -> Result<(), DriverError> {
    check_pool_root(path)?;
    match read_marker(path) {
        Ok(Some(m)) if m.pool == pool_name => Ok(()),
        Ok(Some(m)) => Err(DriverError::Conflict(format!(
            "{} belongs to StoragePool/{}, not StoragePool/{pool_name}",
            path.display(),
            m.pool
        ))),
        Ok(None) => Err(DriverError::NotReady(format!(
            "StoragePool/{pool_name} is not applied yet ({} has no {MARKER_FILE})",
            path.display()
        ))),
        Err(e) => Err(DriverError::Conflict(e)),
    }
}

/// The `StoragePool` driver.
#[derive(Debug, Clone)]
pub struct PoolDriver {
    env: HostEnv,
}

impl PoolDriver {
    /// Builds the driver.
    pub fn new(env: &HostEnv) -> Self {
        PoolDriver { env: env.clone() }
    }

    /// The host environment.
    pub fn env(&self) -> &HostEnv {
        &self.env
    }

    fn observe_one(&self, name: &str, spec: &StoragePoolSpec, mounts: &[MountEntry]) -> Observed {
        let path = &spec.path;
        let meta = match fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Observed::absent(),
            Err(e) => {
                return Observed {
                    exists: true,
                    owned: false,
                    state: Value::Null,
                    status: json!({"path": path}),
                    health: Health::Failed(format!("stat {}: {e}", path.display())),
                };
            }
        };
        let unowned = |why: String| Observed {
            exists: true,
            owned: false,
            state: json!({"path": path}),
            status: json!({"path": path, "reason": why}),
            health: Health::Failed(why),
        };
        if meta.file_type().is_symlink() {
            return unowned(format!("{} is a symlink", path.display()));
        }
        if !meta.is_dir() {
            return unowned(format!("{} exists and is not a directory", path.display()));
        }
        let mount = mounts::mount_at(mounts, path);
        let mut state = serde_json::Map::new();
        let owned;
        let mut health = Health::Ready;
        match read_marker(path) {
            Ok(Some(m)) if m.pool == name => {
                owned = true;
                state.insert("type".into(), json!(m.pool_type));
                state.insert("path".into(), json!(path));
                state.insert("content".into(), json!(normalized_content(&m.content)));
            }
            Ok(Some(m)) => {
                return unowned(format!(
                    "{} belongs to StoragePool/{}",
                    path.display(),
                    m.pool
                ));
            }
            Ok(None) => match is_empty_dir(path) {
                Ok(true) => {
                    // Adoptable: an empty directory (or an empty NFS mount point).
                    owned = true;
                    health = Health::Progressing;
                    state.insert("type".into(), json!(spec.pool_type));
                    state.insert("path".into(), json!(path));
                }
                Ok(false) => {
                    let why = format!(
                        "{} is not empty and has no {MARKER_FILE} marker",
                        path.display()
                    );
                    return Observed {
                        state: foreign_dir_state(spec),
                        ..unowned(why)
                    };
                }
                Err(e) => return unowned(e.to_string()),
            },
            Err(e) => return unowned(e),
        }
        if spec.pool_type == PoolType::Nfs {
            let nfs = mount
                .filter(|m| m.fstype.starts_with("nfs"))
                .and_then(|m| mounts::split_nfs_source(&m.source))
                .map(|(server, export)| json!({"server": server, "export": export}))
                .unwrap_or(Value::Null);
            if nfs.is_null() {
                health = Health::Degraded("NFS export not mounted".into());
            }
            state.insert("nfs".into(), nfs);
        }
        let fs_type = nix::sys::statfs::statfs(path.as_path()).ok().map(|s| {
            if s.filesystem_type() == nix::sys::statfs::BTRFS_SUPER_MAGIC {
                "btrfs".to_string()
            } else {
                format!("{:#x}", s.filesystem_type().0)
            }
        });
        Observed {
            exists: true,
            owned,
            state: Value::Object(state),
            status: json!({
                "path": path,
                "mounted": mount.map(|m| m.source.clone()),
                "fsType": fs_type,
            }),
            health,
        }
    }

    fn apply_spec(&self, name: &str, spec: &StoragePoolSpec) -> Result<(), DriverError> {
        let path = &spec.path;
        check_pool_root(path)?;
        // A pool that holds data keeps its type (checked before touching anything).
        if let Ok(Some(m)) = read_marker(path)
            && m.pool == name
            && m.pool_type != spec.pool_type
        {
            let held = retained_entries(path)?;
            if !held.is_empty() {
                return Err(DriverError::Refused(format!(
                    "changing StoragePool/{name} from {} to {} is refused: it holds {}; \
                     create a new pool at another path",
                    m.pool_type.as_str(),
                    spec.pool_type.as_str(),
                    held.join(", ")
                )));
            }
        }
        match spec.pool_type {
            PoolType::Lvmthin => {
                let l = spec.lvm.as_ref().ok_or_else(|| {
                    DriverError::Refused(
                        "type lvmthin needs spec.lvm {volumeGroup, thinPool}".into(),
                    )
                })?;
                lvm::check_thin_pool(l)?;
            }
            PoolType::Zfs => {
                let z = spec.zfs.as_ref().ok_or_else(|| {
                    DriverError::Refused("type zfs needs spec.zfs {dataset}".into())
                })?;
                zfs::check_dataset(z)?;
            }
            _ => {}
        }
        // 0711 for what stead creates: unprivileged containers' roots must traverse the
        // pool to reach their rootfs trees, QEMU's user its images; images are 0600 and
        // other subdirs 0700.
        stead_host::fs::create_missing_dirs(path, 0o711)
            .map_err(|e| DriverError::io(format!("create {}", path.display()), e.source))?;
        check_pool_root(path)?;
        if spec.pool_type == PoolType::Nfs {
            let nfs = spec.nfs.as_ref().ok_or_else(|| {
                DriverError::Refused("type nfs needs spec.nfs {server, export}".into())
            })?;
            let mounts = mounts::read_mounts();
            match mounts::mount_at(&mounts, path) {
                Some(m) if m.fstype.starts_with("nfs") => {
                    if mounts::split_nfs_source(&m.source)
                        != Some((nfs.server.clone(), nfs.export.clone()))
                    {
                        info!(path = %path.display(), old = %m.source, "remounting NFS pool");
                        mounts::unmount(path)?;
                        mounts::mount_nfs(nfs, path)?;
                    }
                }
                Some(m) => {
                    return Err(DriverError::Conflict(format!(
                        "{} is already a {} mount of {}",
                        path.display(),
                        m.fstype,
                        m.source
                    )));
                }
                None => {
                    // Only mount over an empty mount point.
                    if !is_empty_dir(path)? && read_marker(path).ok().flatten().is_none() {
                        return Err(DriverError::Conflict(format!(
                            "mount point {} is not empty",
                            path.display()
                        )));
                    }
                    mounts::mount_nfs(nfs, path)?;
                }
            }
        }
        if spec.pool_type == PoolType::Btrfs && !btrfs::is_btrfs(path)? {
            return Err(DriverError::Unsupported(format!(
                "{} is not on a btrfs file system",
                path.display()
            )));
        }
        match read_marker(path) {
            Ok(Some(m)) if m.pool != name => {
                return Err(DriverError::Conflict(format!(
                    "{} belongs to StoragePool/{}",
                    path.display(),
                    m.pool
                )));
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                if !is_empty_dir(path)? {
                    return Err(DriverError::Conflict(format!(
                        "{} is not empty and has no {MARKER_FILE} marker; stead will not adopt it",
                        path.display()
                    )));
                }
            }
            Err(e) => return Err(DriverError::Conflict(e)),
        }
        let marker = Marker {
            pool: name.to_string(),
            pool_type: spec.pool_type,
            content: normalized_content(&spec.content),
        };
        let text = serde_json::to_vec_pretty(&marker)
            .map_err(|e| DriverError::Other(format!("encode marker: {e}")))?;
        if read_marker(path).ok().flatten().as_ref() != Some(&marker) {
            fsutil::write_atomic(&path.join(MARKER_FILE), &text)?;
        }
        remove_atomic_temps(path)?;
        for c in &marker.content {
            let dir = fsutil::ensure_dir(path, &[content_dir(*c)])?;
            if matches!(c, Content::Images | Content::Iso) {
                // Searchable, not listable: QEMU runs as an unprivileged user and opens
                // the disk images and ISOs it was handed by path (docs/security.md).
                set_dir_mode(&dir, 0o711)?;
            }
        }
        if marker.content.contains(&Content::Images) || marker.content.contains(&Content::Rootdir) {
            fsutil::ensure_dir(path, &["snapshots"])?;
        }
        Ok(())
    }

    fn delete_spec(&self, name: &str, spec: &StoragePoolSpec) -> Result<(), DriverError> {
        let path = &spec.path;
        check_pool_root(path)?;
        if !path.exists() {
            return Ok(());
        }
        let nfs_mounted = spec.pool_type == PoolType::Nfs
            && mounts::mount_at(&mounts::read_mounts(), path)
                .is_some_and(|m| m.fstype.starts_with("nfs"));
        match read_marker(path) {
            Ok(Some(m)) if m.pool == name => {}
            Ok(Some(m)) => {
                return Err(DriverError::Conflict(format!(
                    "{} belongs to StoragePool/{}; not deleting",
                    path.display(),
                    m.pool
                )));
            }
            Ok(None) => {
                if is_empty_dir(path)? && !nfs_mounted {
                    remove_atomic_temps(path)?;
                    remove_dir_if_exists(path)?;
                    return Ok(());
                }
                warn!(pool = name, path = %path.display(), "pool directory has no stead marker; leaving it untouched");
                return Ok(());
            }
            Err(e) => return Err(DriverError::Conflict(e)),
        }
        let retained = retained_entries(path)?;
        if retained.is_empty() {
            for d in LAYOUT_DIRS {
                remove_empty_tree(&path.join(d))?;
            }
            fsutil::remove_file_if_exists(&path.join(MARKER_FILE))?;
            remove_atomic_temps(path)?;
        } else {
            warn!(
                pool = name,
                path = %path.display(),
                retained = ?retained,
                "StoragePool/{name} holds retained data; leaving {} in place",
                path.display()
            );
        }
        if nfs_mounted {
            // The data lives on the server; the mount goes with the pool.
            mounts::unmount(path)?;
        }
        if retained.is_empty() || nfs_mounted {
            match fs::remove_dir(path) {
                Ok(()) => info!(pool = name, path = %path.display(), "pool removed"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => {}
                Err(e) => return Err(DriverError::io(format!("rmdir {}", path.display()), e)),
            }
        }
        Ok(())
    }
}

fn remove_dir_if_exists(p: &Path) -> Result<(), DriverError> {
    match fs::remove_dir(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DriverError::io(format!("rmdir {}", p.display()), e)),
    }
}

/// Whether `p` is a tree of directories only (no files, no subvolumes' data).
fn only_empty_dirs(p: &Path) -> Result<bool, DriverError> {
    let m = match fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(DriverError::io(format!("stat {}", p.display()), e)),
    };
    if !m.is_dir() {
        return Ok(false);
    }
    for e in fs::read_dir(p).map_err(|e| DriverError::io(format!("read {}", p.display()), e))? {
        let e = e.map_err(|e| DriverError::io(format!("read {}", p.display()), e))?;
        if !only_empty_dirs(&e.path())? {
            return Ok(false);
        }
    }
    Ok(true)
}

fn remove_empty_tree(p: &Path) -> Result<(), DriverError> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(DriverError::io(format!("stat {}", p.display()), e)),
    }
    for e in fs::read_dir(p).map_err(|e| DriverError::io(format!("read {}", p.display()), e))? {
        let e = e.map_err(|e| DriverError::io(format!("read {}", p.display()), e))?;
        remove_empty_tree(&e.path())?;
    }
    remove_dir_if_exists(p)
}

/// Entries of a pool that are not stead's empty layout (i.e. data to retain).
fn retained_entries(path: &Path) -> Result<Vec<String>, DriverError> {
    let mut out = Vec::new();
    for e in
        fs::read_dir(path).map_err(|e| DriverError::io(format!("read {}", path.display()), e))?
    {
        let e = e.map_err(|e| DriverError::io(format!("read {}", path.display()), e))?;
        let n = e.file_name().to_string_lossy().into_owned();
        if n == MARKER_FILE || stead_host::is_atomic_temp_name(&e.file_name()) {
            continue;
        }
        if LAYOUT_DIRS.contains(&n.as_str()) && only_empty_dirs(&e.path())? {
            continue;
        }
        out.push(n);
    }
    Ok(out)
}

impl stead_reconciler::driver::KindDriver for PoolDriver {
    type Spec = StoragePoolSpec;

    fn observe(
        &self,
        targets: &[Typed<'_, StoragePoolSpec>],
        _world: &dyn Lookup,
    ) -> Result<BTreeMap<ResourceId, Observed>, DriverError> {
        let mounts = mounts::read_mounts();
        let mut out = BTreeMap::new();
        for t in targets {
            out.insert(t.id().clone(), self.observe_one(t.name(), t.spec, &mounts));
        }
        Ok(out)
    }

    fn desired_state(&self, desired: Typed<'_, StoragePoolSpec>, _world: &dyn Lookup) -> Value {
        let spec = desired.spec;
        let mut m = serde_json::Map::new();
        m.insert("type".into(), json!(spec.pool_type.as_str()));
        m.insert("path".into(), json!(spec.path));
        m.insert("content".into(), json!(normalized_content(&spec.content)));
        if let (PoolType::Nfs, Some(n)) = (spec.pool_type, &spec.nfs) {
            m.insert(
                "nfs".into(),
                json!({"server": n.server, "export": n.export}),
            );
        }
        Value::Object(m)
    }

    fn impact(&self, path: &str) -> Impact {
        if path == "/content" || path.starts_with("/content/") {
            Impact::Hot
        } else if path.starts_with("/nfs") {
            Impact::Restart
        } else {
            // A new type or path is a new pool: volumes in the old one are retained
            // there, not moved.
            Impact::DataLoss
        }
    }

    fn check(
        &self,
        desired: Typed<'_, StoragePoolSpec>,
        observed: &Observed,
        _changes: &[FieldChange],
    ) -> Result<(), String> {
        let (desired, spec) = (desired.resource, desired.spec);
        check_pool_root(&spec.path).map_err(|e| format!("{}: {e}", desired.id))?;
        let need = match spec.pool_type {
            PoolType::Nfs if spec.nfs.is_none() => Some("nfs: {server, export}"),
            PoolType::Lvmthin if spec.lvm.is_none() => Some("lvm: {volumeGroup, thinPool}"),
            PoolType::Zfs if spec.zfs.is_none() => Some("zfs: {dataset}"),
            _ => None,
        };
        if let Some(n) = need {
            return Err(format!(
                "{} of type {} needs spec.{n}",
                desired.id,
                spec.pool_type.as_str()
            ));
        }
        if observed.exists && !observed.owned {
            let why = match &observed.health {
                Health::Failed(s) | Health::Degraded(s) => s.clone(),
                _ => "not owned by stead".into(),
            };
            return Err(format!("{}: {why}", desired.id));
        }
        Ok(())
    }

    fn adopt_check(
        &self,
        desired: Typed<'_, StoragePoolSpec>,
        observed: &Observed,
        _world: &dyn Lookup,
    ) -> Result<(), String> {
        if !observed.exists {
            return Ok(());
        }
        check_pool_root(&desired.spec.path).map_err(|e| e.to_string())?;
        check_adoptable(desired.name(), desired.spec)
    }

    fn adopt(
        &self,
        desired: Typed<'_, StoragePoolSpec>,
        _observed: &Observed,
        _world: &dyn Lookup,
    ) -> Result<(), DriverError> {
        let (name, spec) = (desired.name(), desired.spec);
        let _span = info_span!("pool_adopt", pool = %name, path = %spec.path.display()).entered();
        check_pool_root(&spec.path)?;
        check_adoptable(name, spec).map_err(DriverError::Conflict)?;
        if read_marker(&spec.path).ok().flatten().is_some() {
            return Ok(());
        }
        // Ownership only: the content dirs come with the update that follows, if the
        // plan showed them.
        let marker = Marker {
            pool: name.to_string(),
            pool_type: spec.pool_type,
            content: Vec::new(),
        };
        let text = serde_json::to_vec_pretty(&marker)
            .map_err(|e| DriverError::Other(format!("encode marker: {e}")))?;
        info!(pool = name, "adopting: writing the pool marker");
        fsutil::write_atomic(&spec.path.join(MARKER_FILE), &text)
    }

    fn apply(
        &self,
        desired: Typed<'_, StoragePoolSpec>,
        _observed: &Observed,
        _world: &dyn Lookup,
    ) -> Result<(), DriverError> {
        let spec = desired.spec;
        let _span =
            info_span!("pool_apply", pool = %desired.name(), path = %spec.path.display()).entered();
        self.apply_spec(desired.name(), spec)
    }

    fn prune_action(&self, _last_applied: Typed<'_, StoragePoolSpec>) -> PruneAction {
        // Safe: delete only removes an empty layout, never data.
        PruneAction::Delete
    }

    fn delete(
        &self,
        last_applied: Typed<'_, StoragePoolSpec>,
        _observed: &Observed,
        _world: &dyn Lookup,
    ) -> Result<(), DriverError> {
        let _span = info_span!("pool_delete", pool = %last_applied.name()).entered();
        self.delete_spec(last_applied.name(), last_applied.spec)
    }
}

/// Sets `dir`'s permission bits to `mode` unless they are that already.
fn set_dir_mode(dir: &Path, mode: u32) -> Result<(), DriverError> {
    use std::os::unix::fs::PermissionsExt;
    let m = std::fs::metadata(dir)
        .map_err(|e| DriverError::io(format!("stat {}", dir.display()), e))?;
    if m.permissions().mode() & 0o7777 != mode {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
            .map_err(|e| DriverError::io(format!("chmod {}", dir.display()), e))?;
    }
    Ok(())
}
