//! The `Volume` driver.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use stead_reconciler::driver::{
    DriverError, FieldChange, Health, HostEnv, Impact, Lookup, Observed, PruneAction, Typed,
};
use stead_schema::{
    ByteSize, Content, DeletionPolicy, PoolType, Resource, ResourceId, StoragePoolSpec,
    VolumeFormat, VolumeSpec,
};
use tracing::{info, info_span};

use super::fsutil::{self, check_component, confined};
use super::{btrfs, lvm, pool, snapshot, zfs};

/// File name of the disk image inside a btrfs volume subvolume.
pub const BTRFS_DISK: &str = "disk.raw";

/// The ownership mark text of a volume: `Volume/<name>`, or
/// `env/<env>/Volume/<name>` inside an environment (see [`super::set_owner_scope`]).
pub(crate) fn owner_of(volume: &str) -> String {
    format!("{}Volume/{volume}", super::owner_prefix())
}

/// Temp name of a file volume being built.
pub(crate) fn tmp_name(volume: &str) -> String {
    format!(".{volume}.raw.tmp")
}

/// Whether `file_name` is a temp name stead gives a file volume it builds
/// (`.NAME.raw.tmp` with NAME a valid volume name).
pub(crate) fn is_volume_tmp_name(file_name: &str) -> bool {
    file_name
        .strip_prefix('.')
        .and_then(|n| n.strip_suffix(".raw.tmp"))
        .is_some_and(|v| check_component("volume name", v).is_ok())
}

/// Serialises, within this process, a sweep with the creation + locking of a temp file:
/// between `create_new` and `lock` a parallel worker's sweep would see the new temp file
/// unlocked and remove it (seen in the SIGKILL-matrix test). Other processes can still hit
/// that window; they would need another state dir applying to the same pool at once.
static TMP_GUARD: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Creates the temp file of a volume being built, locked (flock) for as long as it is
/// open, so that [`sweep_stale_temps`] leaves it alone.
pub(crate) fn create_locked_tmp(tmp: &Path) -> Result<File, DriverError> {
    let _g = TMP_GUARD.lock().unwrap_or_else(|p| p.into_inner());
    let f = fsutil::create_new(tmp)?;
    f.lock()
        .map_err(|e| DriverError::io(format!("lock {}", tmp.display()), e))?;
    Ok(f)
}

/// Removes stale volume temp files (`.NAME.raw.tmp`, regular files only) from the
/// `images` dir of a stead-owned pool: what a failed or killed copy left, also for
/// volumes no longer in the manifests, so a pool that filled up gets its space back.
/// A temp file whose builder still holds its lock is in use and kept. Returns how many
/// were removed.
pub(crate) fn sweep_stale_temps(images: &Path) -> Result<usize, DriverError> {
    let _g = TMP_GUARD.lock().unwrap_or_else(|p| p.into_inner());
    let rd = fs::read_dir(images)
        .map_err(|e| DriverError::io(format!("read {}", images.display()), e))?;
    let mut removed = 0;
    for e in rd.flatten() {
        let name = e.file_name();
        if !name.to_str().is_some_and(is_volume_tmp_name)
            || !e.file_type().is_ok_and(|t| t.is_file())
        {
            continue;
        }
        let p = e.path();
        let Ok(f) = fsutil::open_rw_nofollow(&p) else {
            continue;
        };
        if f.try_lock().is_err() {
            continue; // being built right now
        }
        if fsutil::remove_file_if_exists(&p)? {
            info!(path = %p.display(), "removed stale volume temp file");
            removed += 1;
        }
    }
    if removed > 0 {
        fsutil::fsync_dir(images)?;
    }
    Ok(removed)
}

/// The disk path of `volume` in `pool` (see [`super::volume_path`]).
pub(crate) fn disk_path(
    pool_name: &str,
    pool: &StoragePoolSpec,
    volume: &str,
) -> Result<PathBuf, DriverError> {
    check_component("volume name", volume)?;
    match pool.pool_type {
        PoolType::Dir | PoolType::Nfs => {
            confined(&pool.path, &["images", &format!("{volume}.raw")])
        }
        PoolType::Btrfs => confined(&pool.path, &["images", volume, BTRFS_DISK]),
        PoolType::Lvmthin => pool
            .lvm
            .as_ref()
            .map(|l| lvm::lv_path(l, volume))
            .ok_or_else(|| {
                DriverError::Refused(format!("StoragePool/{pool_name} has no spec.lvm"))
            }),
        PoolType::Zfs => pool
            .zfs
            .as_ref()
            .map(|z| zfs::zvol_path(z, volume))
            .ok_or_else(|| {
                DriverError::Refused(format!("StoragePool/{pool_name} has no spec.zfs"))
            }),
    }
}

fn format_str(f: VolumeFormat) -> &'static str {
    match f {
        VolumeFormat::Raw => "raw",
        VolumeFormat::Qcow2 => "qcow2",
    }
}

/// The `Volume` driver.
#[derive(Debug, Clone)]
pub struct VolumeDriver {
    env: HostEnv,
}

/// An entry of a pool's `images/` directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntryType {
    File,
    Dir,
    Symlink,
    Other,
}

fn list_dir(dir: &Path) -> Result<HashMap<String, EntryType>, DriverError> {
    let mut out = HashMap::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(DriverError::io(format!("read {}", dir.display()), e)),
    };
    for e in rd {
        let e = e.map_err(|e| DriverError::io(format!("read {}", dir.display()), e))?;
        let t = e
            .file_type()
            .map_err(|e| DriverError::io(format!("stat in {}", dir.display()), e))?;
        let kind = if t.is_symlink() {
            EntryType::Symlink
        } else if t.is_file() {
            EntryType::File
        } else if t.is_dir() {
            EntryType::Dir
        } else {
            EntryType::Other
        };
        out.insert(e.file_name().to_string_lossy().into_owned(), kind);
    }
    Ok(out)
}

fn failed(exists: bool, why: String) -> Observed {
    Observed {
        exists,
        owned: false,
        state: Value::Null,
        status: json!({"reason": why}),
        health: Health::Failed(why),
    }
}

/// Observes a disk file at `path` already known to exist as a regular file.
fn observe_file(pool_name: &str, volume: &str, path: &Path) -> Observed {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => m,
        Ok(_) => return failed(true, format!("{} is not a regular file", path.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Observed::absent(),
        Err(e) => return failed(true, format!("stat {}: {e}", path.display())),
    };
    let (owned, mark, owner) = match fsutil::get_owner(path) {
        Ok(Some((o, k))) => (o == owner_of(volume), Some(k.as_str()), Some(o)),
        Ok(None) => (false, None, None),
        Err(e) => return failed(true, e.to_string()),
    };
    let health = if owned {
        Health::Ready
    } else {
        Health::Failed(format!(
            "{} exists and is not owned by stead{}",
            path.display(),
            owner
                .as_deref()
                .map(|o| format!(" (marked {o})"))
                .unwrap_or_default()
        ))
    };
    Observed {
        exists: true,
        owned,
        state: json!({"pool": pool_name, "size": meta.len(), "format": "raw"}),
        status: json!({
            "path": path,
            "size": ByteSize(meta.len()).to_string(),
            "allocated": fsutil::allocated(&meta),
            "ownerMark": mark,
        }),
        health,
    }
}

impl VolumeDriver {
    /// Builds the driver.
    pub fn new(env: &HostEnv) -> Self {
        VolumeDriver { env: env.clone() }
    }

    /// The host environment.
    pub fn env(&self) -> &HostEnv {
        &self.env
    }

    fn observe_pool(
        &self,
        pool_name: &str,
        pool: Option<&StoragePoolSpec>,
        vols: &[&Resource],
        out: &mut BTreeMap<ResourceId, Observed>,
    ) {
        let Some(pool) = pool else {
            for r in vols {
                let mut o = Observed::absent();
                o.health = Health::Failed(format!("StoragePool/{pool_name} is not known"));
                out.insert(r.id.clone(), o);
            }
            return;
        };
        let images = match confined(&pool.path, &["images"]) {
            Ok(p) => p,
            Err(e) => {
                for r in vols {
                    out.insert(r.id.clone(), failed(false, e.to_string()));
                }
                return;
            }
        };
        match pool.pool_type {
            PoolType::Dir | PoolType::Nfs | PoolType::Btrfs => {
                // One directory read per pool.
                let listing = match list_dir(&images) {
                    Ok(l) => l,
                    Err(e) => {
                        for r in vols {
                            out.insert(r.id.clone(), failed(false, e.to_string()));
                        }
                        return;
                    }
                };
                for r in vols {
                    let name = &r.id.name;
                    if let Err(e) = check_component("volume name", name) {
                        out.insert(r.id.clone(), failed(false, e.to_string()));
                        continue;
                    }
                    let (entry, expect) = if pool.pool_type == PoolType::Btrfs {
                        (name.clone(), EntryType::Dir)
                    } else {
                        (format!("{name}.raw"), EntryType::File)
                    };
                    let o = match listing.get(&entry) {
                        None => Observed::absent(),
                        Some(t) if *t != expect => failed(
                            true,
                            format!(
                                "{} exists and is not a {}",
                                images.join(&entry).display(),
                                if expect == EntryType::Dir {
                                    "btrfs subvolume"
                                } else {
                                    "regular file"
                                }
                            ),
                        ),
                        Some(_) => match disk_path(pool_name, pool, name) {
                            Ok(p) => observe_file(pool_name, name, &p),
                            Err(e) => failed(true, e.to_string()),
                        },
                    };
                    out.insert(r.id.clone(), o);
                }
            }
            PoolType::Lvmthin | PoolType::Zfs => {
                let listed: Result<HashMap<String, (u64, Option<String>)>, DriverError> =
                    match (pool.pool_type, &pool.lvm, &pool.zfs) {
                        (PoolType::Lvmthin, Some(l), _) => lvm::run(&lvm::cmd_list(l))
                            .and_then(|t| lvm::parse_lvs(&t))
                            .map(|lvs| {
                                lvs.into_iter()
                                    .filter_map(|lv| {
                                        let owner = lv.owner().map(str::to_string);
                                        let volume = lvm::volume_of_lv(&lv.lv_name)?.to_string();
                                        Some((volume, (lv.lv_size, owner)))
                                    })
                                    .collect()
                            }),
                        (PoolType::Zfs, _, Some(z)) => zfs::run(&zfs::cmd_list(z)).map(|t| {
                            zfs::parse_list(&t)
                                .into_iter()
                                .filter_map(|v| {
                                    let short = v.name.strip_prefix(&format!("{}/", z.dataset))?;
                                    Some((short.to_string(), (v.volsize, v.owner)))
                                })
                                .collect()
                        }),
                        _ => Err(DriverError::Refused(format!(
                            "StoragePool/{pool_name} lacks its lvm/zfs section"
                        ))),
                    };
                for r in vols {
                    let name = &r.id.name;
                    let o = match &listed {
                        Err(e) => failed(false, e.to_string()),
                        Ok(m) => match m.get(name.as_str()) {
                            None => Observed::absent(),
                            Some((size, owner)) => {
                                let owned = owner.as_deref() == Some(owner_of(name).as_str());
                                Observed {
                                    exists: true,
                                    owned,
                                    state: json!({"pool": pool_name, "size": size, "format": "raw"}),
                                    status: json!({"path": disk_path(pool_name, pool, name).ok()}),
                                    health: if owned {
                                        Health::Ready
                                    } else {
                                        Health::Failed("exists and is not owned by stead".into())
                                    },
                                }
                            }
                        },
                    };
                    out.insert(r.id.clone(), o);
                }
            }
        }
    }
}

/// Everything needed to act on one volume.
struct Target<'a> {
    name: &'a str,
    spec: &'a VolumeSpec,
    pool_name: &'a str,
    pool: &'a StoragePoolSpec,
}

impl<'a> Target<'a> {
    fn resolve(r: Typed<'a, VolumeSpec>, world: &'a dyn Lookup) -> Result<Self, DriverError> {
        let spec = r.spec;
        check_component("volume name", r.name())?;
        let pool = super::pool_spec(world, spec.pool.as_str())?;
        fsutil::check_pool_root(&pool.path)?;
        Ok(Target {
            name: r.name(),
            spec,
            pool_name: spec.pool.as_str(),
            pool,
        })
    }
}

fn grow_file(path: &Path, name: &str, size: u64) -> Result<(), DriverError> {
    let f = fsutil::open_rw_nofollow(path)?;
    let cur = f
        .metadata()
        .map_err(|e| DriverError::io(format!("stat {}", path.display()), e))?
        .len();
    if size < cur {
        return Err(DriverError::Refused(shrink_message(name, cur, size)));
    }
    if size > cur {
        info!(volume = name, from = cur, to = size, "growing volume");
        f.set_len(size)
            .map_err(|e| DriverError::io(format!("grow {}", path.display()), e))?;
        f.sync_all()
            .map_err(|e| DriverError::io(format!("fsync {}", path.display()), e))?;
    }
    Ok(())
}

fn check_owned(path: &Path, name: &str) -> Result<(), DriverError> {
    match fsutil::get_owner(path)? {
        Some((o, _)) if o == owner_of(name) => Ok(()),
        Some((o, _)) => Err(DriverError::Conflict(format!(
            "{} is marked {o}, not {}",
            path.display(),
            owner_of(name)
        ))),
        None => Err(DriverError::Conflict(format!(
            "{} exists and is not owned by stead",
            path.display()
        ))),
    }
}

/// Fills the new file `f` (at temp path `tmp`) with `source` (if any) and sizes it.
fn fill_new(
    f: &File,
    tmp: &Path,
    name: &str,
    size: u64,
    source: Option<&Path>,
) -> Result<(), DriverError> {
    if let Some(src) = source {
        let sf = File::open(src)
            .map_err(|e| DriverError::io(format!("open source {}", src.display()), e))?;
        let sm = sf
            .metadata()
            .map_err(|e| DriverError::io(format!("stat source {}", src.display()), e))?;
        if !sm.is_file() {
            return Err(DriverError::Refused(format!(
                "source {} is not a regular file",
                src.display()
            )));
        }
        if sm.len() > size {
            return Err(DriverError::Refused(format!(
                "source {} ({}) is larger than Volume/{name} ({})",
                src.display(),
                ByteSize(sm.len()),
                ByteSize(size)
            )));
        }
        let how = fsutil::clone_or_copy(&sf, f, &format!("Volume/{name} <- {}", src.display()))?;
        info!(volume = name, source = %src.display(), method = how.as_str(), "copied initial content");
    }
    f.set_len(size)
        .map_err(|e| DriverError::io(format!("size {}", tmp.display()), e))?;
    f.sync_all()
        .map_err(|e| DriverError::io(format!("fsync {}", tmp.display()), e))
}

fn apply_file(t: &Target<'_>) -> Result<(), DriverError> {
    let size = t.spec.size.bytes();
    let images = fsutil::ensure_dir(&t.pool.path, &["images"])?;
    let tmp = images.join(tmp_name(t.name));
    sweep_stale_temps(&images)?;
    let path = disk_path(t.pool_name, t.pool, t.name)?;
    match fs::symlink_metadata(&path) {
        Ok(m) if !m.is_file() => Err(DriverError::Conflict(format!(
            "{} exists and is not a regular file",
            path.display()
        ))),
        Ok(_) => {
            check_owned(&path, t.name)?;
            grow_file(&path, t.name, size)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let made = create_file_volume(t, &tmp, &path, size);
            if made.is_err() {
                // A failed copy (a full pool) must not keep its space, nor its mark.
                let _ = fsutil::remove_file_if_exists(&tmp);
                let _ = fsutil::remove_file_if_exists(&fsutil::sidecar_of(&path));
            }
            made?;
            fsutil::fsync_dir(&images)?;
            Ok(())
        }
        Err(e) => Err(DriverError::io(format!("stat {}", path.display()), e)),
    }
}

/// Builds a new file volume in `tmp` (locked while open) and renames it to `path`.
fn create_file_volume(
    t: &Target<'_>,
    tmp: &Path,
    path: &Path,
    size: u64,
) -> Result<(), DriverError> {
    let f = create_locked_tmp(tmp)?;
    let mark = fsutil::set_owner(&f, path, &owner_of(t.name))?;
    let src = t.spec.source.as_ref().and_then(|s| s.file.as_deref());
    fill_new(&f, tmp, t.name, size, src)?;
    fs::rename(tmp, path).map_err(|e| {
        DriverError::io(format!("rename {} -> {}", tmp.display(), path.display()), e)
    })?;
    drop(f);
    info!(volume = t.name, path = %path.display(), size, mark = mark.as_str(), "volume created");
    Ok(())
}

fn apply_btrfs(t: &Target<'_>) -> Result<(), DriverError> {
    let size = t.spec.size.bytes();
    if !btrfs::is_btrfs(&t.pool.path)? {
        return Err(DriverError::Unsupported(format!(
            "{} is not on btrfs",
            t.pool.path.display()
        )));
    }
    let images = fsutil::ensure_dir(&t.pool.path, &["images"])?;
    let tmp_sub = format!(".{}.tmp", t.name);
    remove_btrfs_tmp(&images, &tmp_sub)?;
    let dir = confined(&t.pool.path, &["images", t.name])?;
    let path = disk_path(t.pool_name, t.pool, t.name)?;
    if dir.exists() {
        if !btrfs::is_subvolume(&dir)? {
            return Err(DriverError::Conflict(format!(
                "{} exists and is not a btrfs subvolume",
                dir.display()
            )));
        }
        check_owned(&path, t.name)?;
        return grow_file(&path, t.name, size);
    }
    btrfs::subvol_create(&images, &tmp_sub)?;
    let tmp_disk = images.join(&tmp_sub).join(BTRFS_DISK);
    let filled = fsutil::create_new(&tmp_disk).and_then(|f| {
        fsutil::set_owner(&f, &tmp_disk, &owner_of(t.name))?;
        let src = t.spec.source.as_ref().and_then(|s| s.file.as_deref());
        fill_new(&f, &tmp_disk, t.name, size, src)
    });
    if let Err(e) = filled {
        // A failed copy (a full pool) must not keep its space.
        let _ = remove_btrfs_tmp(&images, &tmp_sub);
        return Err(e);
    }
    fs::rename(images.join(&tmp_sub), &dir)
        .map_err(|e| DriverError::io(format!("rename subvolume to {}", dir.display()), e))?;
    fsutil::fsync_dir(&images)?;
    info!(volume = t.name, path = %path.display(), size, "btrfs volume created");
    Ok(())
}

/// Removes a leftover temp subvolume (or plain dir) named `name` in `dir`.
pub(crate) fn remove_btrfs_tmp(dir: &Path, name: &str) -> Result<(), DriverError> {
    let p = dir.join(name);
    if fs::symlink_metadata(&p).is_err() {
        return Ok(());
    }
    info!("removing leftover {}", p.display());
    if btrfs::is_subvolume(&p)? {
        btrfs::subvol_destroy(dir, name)
    } else {
        fsutil::remove_tree_if_exists(&p)
    }
}

fn apply_lvm(t: &Target<'_>, observed: &Observed) -> Result<(), DriverError> {
    let l = t.pool.lvm.as_ref().ok_or_else(|| {
        DriverError::Refused(format!("StoragePool/{} has no spec.lvm", t.pool_name))
    })?;
    apply_block(
        t,
        observed,
        "lvmthin",
        |size| lvm::run(&lvm::cmd_create(l, t.name, size)).map(drop),
        |size| lvm::run(&lvm::cmd_extend(l, t.name, size)).map(drop),
    )
}

fn apply_zfs(t: &Target<'_>, observed: &Observed) -> Result<(), DriverError> {
    let z = t.pool.zfs.as_ref().ok_or_else(|| {
        DriverError::Refused(format!("StoragePool/{} has no spec.zfs", t.pool_name))
    })?;
    apply_block(
        t,
        observed,
        "zfs",
        |size| zfs::run(&zfs::cmd_create(z, t.name, size)).map(drop),
        |size| zfs::run(&zfs::cmd_grow(z, t.name, size)).map(drop),
    )
}

/// Creates or grows a block-device volume (LV, zvol) through its tool; shrink is refused.
fn apply_block(
    t: &Target<'_>,
    observed: &Observed,
    backend: &str,
    create: impl FnOnce(u64) -> Result<(), DriverError>,
    grow: impl FnOnce(u64) -> Result<(), DriverError>,
) -> Result<(), DriverError> {
    let size = t.spec.size.bytes();
    if t.spec.source.is_some() {
        return Err(DriverError::Unsupported(format!(
            "source.file on {backend} pools is not implemented"
        )));
    }
    if !observed.exists {
        return create(size);
    }
    let cur = observed
        .state
        .get("size")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    if size > cur {
        grow(size)
    } else if size < cur {
        Err(DriverError::Refused(shrink_message(t.name, cur, size)))
    } else {
        Ok(())
    }
}

/// The plan error for a shrink.
pub(crate) fn shrink_message(name: &str, from: u64, to: u64) -> String {
    format!(
        "shrinking Volume/{name} from {} to {} is refused: a volume cannot shrink without \
         cutting off data; create a new, smaller volume and copy the data instead",
        ByteSize(from),
        ByteSize(to)
    )
}

impl stead_reconciler::driver::KindDriver for VolumeDriver {
    type Spec = VolumeSpec;

    fn observe(
        &self,
        targets: &[Typed<'_, VolumeSpec>],
        world: &dyn Lookup,
    ) -> Result<BTreeMap<ResourceId, Observed>, DriverError> {
        let mut by_pool: BTreeMap<&str, Vec<&Resource>> = BTreeMap::new();
        for t in targets {
            by_pool
                .entry(t.spec.pool.as_str())
                .or_default()
                .push(t.resource);
        }
        let mut out = BTreeMap::new();
        for (pool_name, vols) in by_pool {
            let pool = super::pool_spec(world, pool_name).ok();
            self.observe_pool(pool_name, pool, &vols, &mut out);
        }
        Ok(out)
    }

    fn desired_state(&self, desired: Typed<'_, VolumeSpec>, _world: &dyn Lookup) -> Value {
        let v = desired.spec;
        json!({
            "pool": v.pool.as_str(),
            "size": v.size.bytes(),
            "format": format_str(v.format),
        })
    }

    fn impact(&self, path: &str) -> Impact {
        match path {
            "/size" => Impact::Hot,
            _ => Impact::DataLoss,
        }
    }

    fn check(
        &self,
        desired: Typed<'_, VolumeSpec>,
        observed: &Observed,
        changes: &[FieldChange],
    ) -> Result<(), String> {
        let (desired, v) = (desired.resource, desired.spec);
        check_component("volume name", &desired.id.name)
            .map_err(|e| format!("{}: {e}", desired.id))?;
        if v.format != VolumeFormat::Raw {
            return Err(format!(
                "{}: format {} is not supported yet (use raw)",
                desired.id,
                format_str(v.format)
            ));
        }
        let want = v.size.bytes();
        for c in changes.iter().filter(|c| c.path == "/size") {
            if let (Some(old), Some(new)) = (
                c.old.as_ref().and_then(Value::as_u64),
                c.new.as_ref().and_then(Value::as_u64),
            ) && new < old
            {
                return Err(shrink_message(&desired.id.name, old, new));
            }
        }
        if observed.exists
            && observed.owned
            && let Some(cur) = observed.state.get("size").and_then(Value::as_u64)
            && want < cur
        {
            return Err(shrink_message(&desired.id.name, cur, want));
        }
        if observed.exists && !observed.owned {
            let why = match &observed.health {
                Health::Failed(s) | Health::Degraded(s) => s.clone(),
                _ => "exists and is not owned by stead".into(),
            };
            return Err(format!("{}: {why}", desired.id));
        }
        Ok(())
    }

    fn apply(
        &self,
        desired: Typed<'_, VolumeSpec>,
        observed: &Observed,
        world: &dyn Lookup,
    ) -> Result<(), DriverError> {
        let t = Target::resolve(desired, world)?;
        let _span = info_span!("volume_apply", volume = t.name, pool = t.pool_name).entered();
        if t.spec.format != VolumeFormat::Raw {
            return Err(DriverError::Unsupported(format!(
                "Volume/{}: format {} is not supported yet",
                t.name,
                format_str(t.spec.format)
            )));
        }
        pool::require_owned(t.pool_name, &t.pool.path)?;
        if !t
            .pool
            .content
            .iter()
            .any(|c| matches!(c, Content::Images | Content::Rootdir))
        {
            return Err(DriverError::Refused(format!(
                "StoragePool/{} does not allow volumes (content needs images or rootdir)",
                t.pool_name
            )));
        }
        match t.pool.pool_type {
            PoolType::Dir | PoolType::Nfs => apply_file(&t),
            PoolType::Btrfs => apply_btrfs(&t),
            PoolType::Lvmthin => apply_lvm(&t, observed),
            PoolType::Zfs => apply_zfs(&t, observed),
        }
    }

    fn delete_impact(&self, _last_applied: Typed<'_, VolumeSpec>) -> Impact {
        Impact::DataLoss
    }

    fn supports_safety_snapshot(&self, r: Typed<'_, VolumeSpec>, world: &dyn Lookup) -> bool {
        super::pool_spec(world, r.spec.pool.as_str())
            .ok()
            .is_some_and(snapshot::supports_cheap_snapshots)
    }

    fn safety_snapshot(
        &self,
        r: Typed<'_, VolumeSpec>,
        world: &dyn Lookup,
        name: &str,
    ) -> Result<(), DriverError> {
        // Names start with `pre-` (snapshot::SAFETY_PREFIX), so they outlive the volume.
        snapshot::snapshot_create(&self.env, world, r.name(), name).map(|_| ())
    }

    fn prune_action(&self, last_applied: Typed<'_, VolumeSpec>) -> PruneAction {
        match last_applied.spec.deletion_policy {
            DeletionPolicy::Delete => PruneAction::Delete,
            _ => PruneAction::Retain,
        }
    }

    fn delete(
        &self,
        last_applied: Typed<'_, VolumeSpec>,
        observed: &Observed,
        world: &dyn Lookup,
    ) -> Result<(), DriverError> {
        let t = Target::resolve(last_applied, world)?;
        let _span = info_span!("volume_delete", volume = t.name, pool = t.pool_name).entered();
        if !t.pool.path.exists() {
            return Ok(());
        }
        match t.pool.pool_type {
            PoolType::Dir | PoolType::Nfs => {
                let path = disk_path(t.pool_name, t.pool, t.name)?;
                let images = path.parent().map(Path::to_path_buf).unwrap_or_default();
                fsutil::remove_file_if_exists(&images.join(tmp_name(t.name)))?;
                match fs::symlink_metadata(&path) {
                    Ok(m) if !m.is_file() => {
                        return Err(DriverError::Conflict(format!(
                            "{} is not a regular file; not deleting",
                            path.display()
                        )));
                    }
                    Ok(_) => {
                        check_owned(&path, t.name)?;
                        snapshot::delete_all(t.pool_name, t.pool, t.name)?;
                        fsutil::remove_file_if_exists(&path)?;
                        fsutil::remove_file_if_exists(&fsutil::sidecar_of(&path))?;
                        fsutil::fsync_dir(&images)?;
                        info!(path = %path.display(), "volume deleted");
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        fsutil::remove_file_if_exists(&fsutil::sidecar_of(&path))?;
                    }
                    Err(e) => return Err(DriverError::io(format!("stat {}", path.display()), e)),
                }
                Ok(())
            }
            PoolType::Btrfs => {
                let images = confined(&t.pool.path, &["images"])?;
                remove_btrfs_tmp(&images, &format!(".{}.tmp", t.name))?;
                let dir = confined(&t.pool.path, &["images", t.name])?;
                if !dir.exists() {
                    return Ok(());
                }
                if !btrfs::is_subvolume(&dir)? {
                    return Err(DriverError::Conflict(format!(
                        "{} is not a btrfs subvolume; not deleting",
                        dir.display()
                    )));
                }
                let disk = disk_path(t.pool_name, t.pool, t.name)?;
                check_owned(&disk, t.name)?;
                snapshot::delete_all(t.pool_name, t.pool, t.name)?;
                btrfs::subvol_destroy(&images, t.name)?;
                info!(path = %dir.display(), "btrfs volume deleted");
                Ok(())
            }
            PoolType::Lvmthin => {
                if !observed.exists {
                    return Ok(());
                }
                if !observed.owned {
                    return Err(DriverError::Conflict(format!(
                        "LV for Volume/{} is not owned by stead",
                        t.name
                    )));
                }
                let l = t
                    .pool
                    .lvm
                    .as_ref()
                    .ok_or_else(|| DriverError::Refused("no spec.lvm".into()))?;
                lvm::run(&lvm::cmd_remove(l, &lvm::lv_name(t.name))).map(|_| ())
            }
            PoolType::Zfs => {
                if !observed.exists {
                    return Ok(());
                }
                if !observed.owned {
                    return Err(DriverError::Conflict(format!(
                        "zvol for Volume/{} is not owned by stead",
                        t.name
                    )));
                }
                let z = t
                    .pool
                    .zfs
                    .as_ref()
                    .ok_or_else(|| DriverError::Refused("no spec.zfs".into()))?;
                zfs::run(&zfs::cmd_destroy(z, t.name)).map(|_| ())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stead_reconciler::driver::Driver;

    #[test]
    fn a_sweep_never_removes_a_temp_file_being_created_in_parallel() {
        let d = tempfile::tempdir().expect("tempdir");
        let images = d.path().to_path_buf();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sweeper = {
            let (images, stop) = (images.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    sweep_stale_temps(&images).expect("sweep");
                }
            })
        };
        let builders: Vec<_> = (0..3)
            .map(|k| {
                let images = images.clone();
                std::thread::spawn(move || {
                    for i in 0..300 {
                        let tmp = images.join(format!(".v{k}x{i}.raw.tmp"));
                        let f = create_locked_tmp(&tmp).expect("create");
                        assert!(tmp.exists(), "{} swept while being built", tmp.display());
                        drop(f);
                        let _ = fs::remove_file(&tmp);
                    }
                })
            })
            .collect();
        for b in builders {
            b.join().expect("builder");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        sweeper.join().expect("sweeper");
    }

    #[test]
    fn shrink_message_reads_well() {
        assert!(
            shrink_message("x", 32 << 20, 16 << 20)
                .starts_with("shrinking Volume/x from 32Mi to 16Mi is refused: ")
        );
    }

    #[test]
    fn impacts() {
        let d = VolumeDriver::new(&HostEnv {
            state_dir: PathBuf::from("/nonexistent"),
            run_dir: PathBuf::from("/nonexistent"),
            cgroup_parent: "stead".into(),
            netns: None,
            self_exe: PathBuf::from("/nonexistent"),
        });
        assert_eq!(d.impact("/size"), Impact::Hot);
        assert_eq!(d.impact("/pool"), Impact::DataLoss);
        assert_eq!(d.impact("/format"), Impact::DataLoss);
    }
}
