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
use super::{btrfs, import, lvm, pool, qemu_img, snapshot, zfs};

/// File name of a raw disk image inside a btrfs volume subvolume.
pub const BTRFS_DISK: &str = "disk.raw";

/// File name of a qcow2 disk image inside a btrfs volume subvolume.
pub const BTRFS_DISK_QCOW2: &str = "disk.qcow2";

/// The file name extension of a volume format (`raw`, `qcow2`).
pub(crate) fn ext(format: VolumeFormat) -> &'static str {
    qemu_img::format_name(format)
}

/// File name of the disk image inside a btrfs volume subvolume of `format`.
pub(crate) fn btrfs_disk(format: VolumeFormat) -> &'static str {
    match format {
        VolumeFormat::Raw => BTRFS_DISK,
        VolumeFormat::Qcow2 => BTRFS_DISK_QCOW2,
    }
}

/// The disk file inside a btrfs volume (or snapshot) subvolume `dir`, whatever its
/// format: `disk.qcow2` when present, else `disk.raw`.
pub(crate) fn btrfs_disk_in(dir: &Path) -> PathBuf {
    let q = dir.join(BTRFS_DISK_QCOW2);
    if fs::symlink_metadata(&q).is_ok() {
        q
    } else {
        dir.join(BTRFS_DISK)
    }
}

/// The ownership mark text of a volume: `Volume/<name>`, or
/// `env/<env>/Volume/<name>` inside an environment (see [`super::set_owner_scope`]).
pub(crate) fn owner_of(volume: &str) -> String {
    format!("{}Volume/{volume}", super::owner_prefix())
}

/// Temp name of a file volume of `format` being built (`.NAME.raw.tmp`,
/// `.NAME.qcow2.tmp`).
pub(crate) fn tmp_name(volume: &str, format: VolumeFormat) -> String {
    format!(".{volume}.{}.tmp", ext(format))
}

/// Temp name of an image being fetched for a file volume (`.NAME.fetch.tmp`).
pub(crate) fn fetch_tmp_name(volume: &str) -> String {
    format!(".{volume}.fetch.tmp")
}

/// Whether `file_name` is a temp name stead gives a file volume it builds
/// (`.NAME.raw.tmp`, `.NAME.qcow2.tmp`, `.NAME.fetch.tmp` with NAME a valid volume name).
pub(crate) fn is_volume_tmp_name(file_name: &str) -> bool {
    let Some(n) = file_name
        .strip_prefix('.')
        .and_then(|n| n.strip_suffix(".tmp"))
    else {
        return false;
    };
    [".raw", ".qcow2", ".fetch"]
        .iter()
        .filter_map(|s| n.strip_suffix(s))
        .any(|v| check_component("volume name", v).is_ok())
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

/// The disk path of `volume` of `format` in `pool` (see [`super::volume_path`]).
pub(crate) fn disk_path(
    pool_name: &str,
    pool: &StoragePoolSpec,
    volume: &str,
    format: VolumeFormat,
) -> Result<PathBuf, DriverError> {
    check_component("volume name", volume)?;
    match pool.pool_type {
        PoolType::Dir | PoolType::Nfs => confined(
            &pool.path,
            &["images", &format!("{volume}.{}", ext(format))],
        ),
        PoolType::Btrfs => confined(&pool.path, &["images", volume, btrfs_disk(format)]),
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

/// The disk path of `volume` as it is on the host: in `format`, or, when only the other
/// format's file exists (a format change not yet carried out), that one.
pub(crate) fn existing_disk_path(
    pool_name: &str,
    pool: &StoragePoolSpec,
    volume: &str,
    format: VolumeFormat,
) -> Result<PathBuf, DriverError> {
    let p = disk_path(pool_name, pool, volume, format)?;
    if fs::symlink_metadata(&p).is_err() && matches!(pool.pool_type, PoolType::Dir | PoolType::Nfs)
    {
        let other = disk_path(pool_name, pool, volume, other_format(format))?;
        if fs::symlink_metadata(&other).is_ok() {
            return Ok(other);
        }
    }
    Ok(p)
}

fn format_str(f: VolumeFormat) -> &'static str {
    qemu_img::format_name(f)
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

/// Whether a volume file's mode says it is a template (no write bit at all).
fn is_read_only(meta: &fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o222 == 0
}

/// Observes a disk file of `format` at `path` already known to exist as a regular file.
fn observe_file(pool_name: &str, volume: &str, path: &Path, format: VolumeFormat) -> Observed {
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
    let (size, backing) = match format {
        VolumeFormat::Raw => (meta.len(), None),
        VolumeFormat::Qcow2 => match qemu_img::info(path, Some("qcow2")) {
            Ok(i) => (i.virtual_size, i.backing_filename),
            Err(e) => return failed(true, format!("{}: {e}", path.display())),
        },
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
    let mut state = json!({"pool": pool_name, "size": size, "format": format_str(format)});
    if is_read_only(&meta) {
        state["template"] = json!(true);
    }
    Observed {
        exists: true,
        owned,
        state,
        status: json!({
            "path": path,
            "size": ByteSize(size).to_string(),
            "allocated": fsutil::allocated(&meta),
            "ownerMark": mark,
            "backingFile": backing,
        }),
        health,
    }
}

/// The format a volume's spec asks for.
fn spec_format(r: &Resource) -> VolumeFormat {
    match &r.spec {
        stead_schema::Spec::Volume(v) => v.format,
        _ => VolumeFormat::Raw,
    }
}

/// The other file format (what a volume may exist as when its spec changed format).
fn other_format(f: VolumeFormat) -> VolumeFormat {
    match f {
        VolumeFormat::Raw => VolumeFormat::Qcow2,
        VolumeFormat::Qcow2 => VolumeFormat::Raw,
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
                    let want = spec_format(r);
                    let o = if pool.pool_type == PoolType::Btrfs {
                        observe_btrfs_entry(&images, &listing, pool_name, pool, name, want)
                    } else {
                        observe_file_entry(&images, &listing, pool_name, pool, name, want)
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
                                    status: json!({"path": disk_path(pool_name, pool, name, VolumeFormat::Raw).ok()}),
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

/// Observes a dir/nfs volume file in the `images` listing: `NAME.<ext of want>`, or the
/// other format's file (reported as such, so the plan sees a format change).
fn observe_file_entry(
    images: &Path,
    listing: &HashMap<String, EntryType>,
    pool_name: &str,
    pool: &StoragePoolSpec,
    name: &str,
    want: VolumeFormat,
) -> Observed {
    for f in [want, other_format(want)] {
        let entry = format!("{name}.{}", ext(f));
        match listing.get(&entry) {
            None => continue,
            Some(EntryType::File) => {}
            Some(_) => {
                return failed(
                    true,
                    format!(
                        "{} exists and is not a regular file",
                        images.join(&entry).display()
                    ),
                );
            }
        }
        return match disk_path(pool_name, pool, name, f) {
            Ok(p) => observe_file(pool_name, name, &p, f),
            Err(e) => failed(true, e.to_string()),
        };
    }
    Observed::absent()
}

/// Observes a btrfs volume subvolume `images/NAME` and the disk file in it.
fn observe_btrfs_entry(
    images: &Path,
    listing: &HashMap<String, EntryType>,
    pool_name: &str,
    pool: &StoragePoolSpec,
    name: &str,
    want: VolumeFormat,
) -> Observed {
    match listing.get(name) {
        None => return Observed::absent(),
        Some(EntryType::Dir) => {}
        Some(_) => {
            return failed(
                true,
                format!(
                    "{} exists and is not a btrfs subvolume",
                    images.join(name).display()
                ),
            );
        }
    }
    for f in [want, other_format(want)] {
        match disk_path(pool_name, pool, name, f) {
            Ok(p) if fs::symlink_metadata(&p).is_ok() => {
                return observe_file(pool_name, name, &p, f);
            }
            Ok(_) => {}
            Err(e) => return failed(true, e.to_string()),
        }
    }
    Observed::absent()
}

/// Everything needed to act on one volume.
struct Target<'a> {
    name: &'a str,
    spec: &'a VolumeSpec,
    pool_name: &'a str,
    pool: &'a StoragePoolSpec,
    world: &'a dyn Lookup,
    /// Where fetched images are kept by digest (set by apply; without it a URL is fetched
    /// into the pool's scratch file each time).
    image_cache: Option<import::ImageCache>,
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
            world,
            image_cache: None,
        })
    }

    fn size(&self) -> u64 {
        self.spec.size.bytes()
    }
}

/// The size the guest sees of the image at `path` read as `format`.
fn image_size(path: &Path, format: VolumeFormat) -> Result<u64, DriverError> {
    match format {
        VolumeFormat::Raw => fs::symlink_metadata(path)
            .map(|m| m.len())
            .map_err(|e| DriverError::io(format!("stat {}", path.display()), e)),
        VolumeFormat::Qcow2 => qemu_img::info(path, Some("qcow2")).map(|i| i.virtual_size),
    }
}

/// Grows the image in the open file `f` at `path` to `size` bytes if it is smaller.
fn grow_to(f: &File, path: &Path, format: VolumeFormat, size: u64) -> Result<(), DriverError> {
    match format {
        VolumeFormat::Raw => {
            let cur = f
                .metadata()
                .map_err(|e| DriverError::io(format!("stat {}", path.display()), e))?
                .len();
            if size > cur {
                f.set_len(size)
                    .map_err(|e| DriverError::io(format!("grow {}", path.display()), e))?;
            }
        }
        VolumeFormat::Qcow2 => {
            if qemu_img::info(path, Some("qcow2"))?.virtual_size < size {
                qemu_img::grow(path, format, size)?;
            }
        }
    }
    f.sync_all()
        .map_err(|e| DriverError::io(format!("fsync {}", path.display()), e))
}

/// The refusal of a change to a template's content or size.
pub(crate) fn template_message(name: &str, what: &str) -> String {
    format!(
        "Volume/{name} is a template and read-only: {what} is refused; \
         clone it (clone: {{from: {name}}}) and change the clone"
    )
}

/// The refusal of a format change.
fn format_change_message(name: &str, from: VolumeFormat, to: VolumeFormat) -> String {
    format!(
        "Volume/{name} exists as {}; changing its format to {} is refused: make a new \
         volume as a clone of it (clone: {{from: {name}, linked: false}}, format: {})",
        format_str(from),
        format_str(to),
        format_str(to)
    )
}

fn set_mode(path: &Path, mode: u32) -> Result<(), DriverError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| DriverError::io(format!("chmod {}", path.display()), e))
}

/// Updates an existing, owned volume file at `path`: grows it (never shrinks), and makes
/// it a template (mode 0444) or a plain volume again (0600, refused while linked clones
/// stand on it). A template is never resized.
fn update_existing(t: &Target<'_>, path: &Path) -> Result<(), DriverError> {
    check_owned(path, t.name)?;
    let format = t.spec.format;
    let cur = image_size(path, format)?;
    let size = t.size();
    if size < cur {
        return Err(DriverError::Refused(shrink_message(t.name, cur, size)));
    }
    let meta = fs::symlink_metadata(path)
        .map_err(|e| DriverError::io(format!("stat {}", path.display()), e))?;
    if t.spec.template {
        if size > cur {
            return Err(DriverError::Refused(template_message(t.name, "growing it")));
        }
        if !is_read_only(&meta) {
            set_mode(path, TEMPLATE_MODE)?;
            info!(volume = t.name, "volume is now a read-only template");
        }
        return Ok(());
    }
    if is_read_only(&meta) {
        let clones = linked_clones(t.pool, path)?;
        if !clones.is_empty() {
            return Err(DriverError::Refused(format!(
                "Volume/{} has linked clones ({}): it stays a read-only template while they exist",
                t.name,
                clones.join(", ")
            )));
        }
        set_mode(path, VOLUME_MODE)?;
        info!(volume = t.name, "volume is no longer a template");
    }
    if size > cur {
        info!(volume = t.name, from = cur, to = size, "growing volume");
        let f = fsutil::open_rw_nofollow(path)?;
        grow_to(&f, path, format, size)?;
    }
    Ok(())
}

/// Mode of a template's disk file.
pub(crate) const TEMPLATE_MODE: u32 = 0o444;
/// Mode of a volume's disk file.
pub(crate) const VOLUME_MODE: u32 = 0o600;

/// Removes a file when dropped (the scratch file of a fetch).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Fills the new, empty, marked file `f` at `tmp` with the volume's content, in its
/// format and size: a clone of another volume, an imported image, or an empty image.
/// A fetched image goes to `scratch` first (removed before returning). A template ends
/// read-only.
fn build_image(t: &Target<'_>, f: &File, tmp: &Path, scratch: &Path) -> Result<(), DriverError> {
    let format = t.spec.format;
    let source = t.spec.source.as_ref();
    if let Some(c) = &t.spec.clone {
        if source.is_some() {
            return Err(DriverError::Refused(format!(
                "Volume/{}: source and clone exclude each other",
                t.name
            )));
        }
        build_clone(t, &c.from, c.linked, f, tmp)?;
    } else if let Some(url) = source.and_then(|s| s.url.as_deref()) {
        let sha = source.and_then(|s| s.sha256.as_deref()).ok_or_else(|| {
            DriverError::Refused(format!(
                "Volume/{}: source.url needs source.sha256 (an image is never fetched unchecked)",
                t.name
            ))
        })?;
        let limit = import::fetch_limit(t.size());
        if let Some(cache) = &t.image_cache {
            let entry = cache.get(url, sha, limit)?;
            import_image(t, &entry, f, tmp)?;
        } else {
            let _cleanup = RemoveOnDrop(scratch.to_path_buf());
            let mut sf = create_locked_tmp(scratch)?;
            import::fetch(url, sha, limit, &mut sf, scratch)?;
            import_image(t, scratch, f, tmp)?;
        }
    } else if let Some(file) = source.and_then(|s| s.file.as_deref()) {
        let meta = fs::metadata(file)
            .map_err(|e| DriverError::io(format!("stat source {}", file.display()), e))?;
        if !meta.is_file() {
            return Err(DriverError::Refused(format!(
                "source {} is not a regular file",
                file.display()
            )));
        }
        if let Some(sha) = source.and_then(|s| s.sha256.as_deref()) {
            let want = import::normalize_sha256(sha)?;
            let got = import::sha256_file(file)?;
            if got != want {
                return Err(import::mismatch(&file.display().to_string(), &want, &got));
            }
        }
        import_image(t, file, f, tmp)?;
    } else if format == VolumeFormat::Qcow2 {
        qemu_img::create(tmp, format, t.size(), None)?;
    }
    grow_to(f, tmp, format, t.size())?;
    if t.spec.template {
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(TEMPLATE_MODE))
            .map_err(|e| DriverError::io(format!("chmod {}", tmp.display()), e))?;
    }
    Ok(())
}

/// Writes the outside image `src` into `f` at `tmp` in the volume's format: checked
/// ([`qemu_img::check_importable`]), no larger than the volume, reflinked or copied when
/// both are raw, else converted.
fn import_image(t: &Target<'_>, src: &Path, f: &File, tmp: &Path) -> Result<(), DriverError> {
    let info = qemu_img::info(src, None)?;
    qemu_img::check_importable(src, &info)?;
    if info.virtual_size > t.size() {
        return Err(DriverError::Refused(format!(
            "source {} ({}) is larger than Volume/{} ({})",
            src.display(),
            ByteSize(info.virtual_size),
            t.name,
            ByteSize(t.size())
        )));
    }
    let label = format!("Volume/{} <- {}", t.name, src.display());
    if info.format == "raw" && t.spec.format == VolumeFormat::Raw {
        let sf = File::open(src)
            .map_err(|e| DriverError::io(format!("open source {}", src.display()), e))?;
        let how = fsutil::clone_or_copy(&sf, f, &label)?;
        info!(volume = t.name, source = %src.display(), method = how.as_str(), "copied initial content");
    } else {
        qemu_img::convert(
            src,
            &info.format,
            tmp,
            t.spec.format,
            info.virtual_size,
            &label,
        )?;
        info!(volume = t.name, source = %src.display(), from = %info.format, to = format_str(t.spec.format), "converted initial content");
    }
    Ok(())
}

/// Makes `f` at `tmp` a clone of Volume/`from` (same pool): linked on dir/nfs is a
/// qcow2 overlay on the read-only template (backing file named relative to the
/// `images` dir, so the pool can move); linked on btrfs is a reflink; unlinked is a full
/// copy (converted when the formats differ).
fn build_clone(
    t: &Target<'_>,
    from: &stead_schema::Name,
    linked: bool,
    f: &File,
    tmp: &Path,
) -> Result<(), DriverError> {
    let from = from.as_str();
    let base_spec = super::volume_spec(t.world, from)?;
    if base_spec.pool != t.spec.pool {
        return Err(DriverError::Refused(format!(
            "Volume/{}: clone.from Volume/{from} is in StoragePool/{}, not {}: a clone lives in its base's pool",
            t.name,
            base_spec.pool.as_str(),
            t.pool_name
        )));
    }
    let base_format = base_spec.format;
    let base = disk_path(t.pool_name, t.pool, from, base_format)?;
    if fs::symlink_metadata(&base).is_err() {
        return Err(DriverError::NotReady(format!(
            "Volume/{}: clone base Volume/{from} does not exist yet",
            t.name
        )));
    }
    check_owned(&base, from)?;
    let base_size = image_size(&base, base_format)?;
    if base_size > t.size() {
        return Err(DriverError::Refused(format!(
            "Volume/{} ({}) is smaller than its clone base Volume/{from} ({})",
            t.name,
            ByteSize(t.size()),
            ByteSize(base_size)
        )));
    }
    let format = t.spec.format;
    let label = format!("Volume/{} <- Volume/{from}", t.name);
    if !linked {
        if base_format == VolumeFormat::Raw && format == VolumeFormat::Raw {
            let sf = File::open(&base)
                .map_err(|e| DriverError::io(format!("open {}", base.display()), e))?;
            fsutil::clone_or_copy(&sf, f, &label)?;
        } else {
            qemu_img::convert(
                &base,
                format_str(base_format),
                tmp,
                format,
                base_size,
                &label,
            )?;
        }
        info!(volume = t.name, base = from, "full clone made");
        return Ok(());
    }
    match t.pool.pool_type {
        PoolType::Btrfs => {
            if format != base_format {
                return Err(DriverError::Refused(format!(
                    "Volume/{}: a linked clone on btrfs is a reflink copy: use format {} like Volume/{from}, or linked: false",
                    t.name,
                    format_str(base_format)
                )));
            }
            let sf = File::open(&base)
                .map_err(|e| DriverError::io(format!("open {}", base.display()), e))?;
            if !fsutil::try_reflink(&sf, f)? {
                return Err(DriverError::Unsupported(format!(
                    "reflink of {} refused by the file system",
                    base.display()
                )));
            }
        }
        _ => {
            if format != VolumeFormat::Qcow2 {
                return Err(DriverError::Refused(format!(
                    "Volume/{}: a linked clone on a {} pool is a qcow2 overlay: set format: qcow2, or linked: false for a full copy",
                    t.name,
                    if t.pool.pool_type == PoolType::Nfs {
                        "nfs"
                    } else {
                        "dir"
                    }
                )));
            }
            if !base_spec.template {
                return Err(DriverError::Refused(format!(
                    "Volume/{}: Volume/{from} is not a template: a linked clone needs a read-only base (set template: true on it), or use linked: false",
                    t.name
                )));
            }
            let base_meta = fs::symlink_metadata(&base)
                .map_err(|e| DriverError::io(format!("stat {}", base.display()), e))?;
            if !is_read_only(&base_meta) {
                return Err(DriverError::NotReady(format!(
                    "Volume/{}: template Volume/{from} is not read-only yet",
                    t.name
                )));
            }
            let file_name = base
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| DriverError::Other(format!("{} has no name", base.display())))?;
            qemu_img::create(tmp, format, t.size(), Some((file_name, base_format)))?;
        }
    }
    info!(volume = t.name, base = from, "linked clone made");
    Ok(())
}

/// The volumes of a dir/nfs pool whose qcow2 file has `template` (a path in its
/// `images` dir) as backing file: the linked clones that need it. None on other pools
/// (btrfs clones are reflinks, which need nothing of their base).
pub(crate) fn linked_clones(
    pool: &StoragePoolSpec,
    template: &Path,
) -> Result<Vec<String>, DriverError> {
    if !matches!(pool.pool_type, PoolType::Dir | PoolType::Nfs) {
        return Ok(Vec::new());
    }
    let images = confined(&pool.path, &["images"])?;
    let want = fs::canonicalize(template).unwrap_or_else(|_| template.to_path_buf());
    let mut out = Vec::new();
    for (name, kind) in list_dir(&images)? {
        let Some(vol) = name.strip_suffix(".qcow2") else {
            continue;
        };
        if kind != EntryType::File || name.starts_with('.') {
            continue;
        }
        let p = images.join(&name);
        let info = qemu_img::info(&p, Some("qcow2"))?;
        let Some(b) = info.backing_filename.as_deref() else {
            continue;
        };
        let bp = images.join(b);
        if fs::canonicalize(&bp).unwrap_or(bp) == want {
            out.push(vol.to_string());
        }
    }
    out.sort();
    Ok(out)
}

/// The refusal to delete a template that linked clones need.
pub(crate) fn has_clones_message(name: &str, clones: &[String]) -> String {
    format!(
        "Volume/{name} is the template of linked clones ({}): deleting it would break them; \
         delete the clones first (or recreate them with linked: false)",
        clones
            .iter()
            .map(|c| format!("Volume/{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Refuses to adopt the existing image `observed` as the volume `t` unless it is a file
/// image of the manifest's format in a dir, nfs or btrfs pool, carries no other mark, and
/// is no larger than the manifest's size (a smaller one is grown by the update that
/// follows; nothing is ever shrunk).
fn check_adoptable(t: &Target<'_>, observed: &Observed) -> Result<(), String> {
    let name = t.name;
    if matches!(t.pool.pool_type, PoolType::Lvmthin | PoolType::Zfs) {
        return Err(format!(
            "stead adopts image files in dir, nfs and btrfs pools, not volumes of a {} pool",
            t.pool.pool_type.as_str()
        ));
    }
    if t.spec.clone.is_some() {
        return Err(format!(
            "Volume/{name} is declared as a clone: an existing image cannot become one; drop spec.clone"
        ));
    }
    let path = disk_path(t.pool_name, t.pool, name, t.spec.format).map_err(|e| e.to_string())?;
    if let Some((o, _)) = fsutil::get_owner(&path).map_err(|e| e.to_string())?
        && o != owner_of(name)
    {
        return Err(format!(
            "{} carries the mark {o:?} of another owner",
            path.display()
        ));
    }
    let found = observed.state.get("format").and_then(Value::as_str);
    let want = format_str(t.spec.format);
    if found != Some(want) {
        return Err(format!(
            "the image of Volume/{name} is {}, the manifest says format {want}: set format to {}",
            found.unwrap_or("unreadable"),
            found.unwrap_or("its format")
        ));
    }
    let size = observed.state.get("size").and_then(Value::as_u64);
    match size {
        Some(cur) if cur > t.size() => Err(format!(
            "the image of Volume/{name} holds {} and the manifest asks for {}: stead never shrinks a volume; set size to at least {}",
            ByteSize(cur),
            ByteSize(t.size()),
            ByteSize(cur)
        )),
        Some(_) => Ok(()),
        None => Err(format!(
            "the size of the image of Volume/{name} cannot be read"
        )),
    }
}

/// With adoption asked for a volume stead does not find, refuses when its image lies one
/// directory deeper under the pool's `images/` (another manager's layout, e.g. Proxmox
/// VE's `images/<vmid>/<name>.raw` or `images/<vmid>/<name>/disk.raw`): creating an empty
/// volume next to it would hide the data the guest expects.
fn check_not_elsewhere(desired: Typed<'_, VolumeSpec>, world: &dyn Lookup) -> Result<(), String> {
    let Ok(pool) = super::pool_spec(world, desired.spec.pool.as_str()) else {
        return Ok(());
    };
    if matches!(pool.pool_type, PoolType::Lvmthin | PoolType::Zfs) {
        return Ok(());
    }
    let Ok(images) = confined(&pool.path, &["images"]) else {
        return Ok(());
    };
    let name = desired.name();
    match image_in_subdir(&images, name) {
        Some(found) => Err(format!(
            "no image at stead's path for Volume/{name}, but {} exists: move it to {} (or {}/{name}/{BTRFS_DISK} on btrfs), then adopt it",
            found.display(),
            images.join(format!("{name}.raw")).display(),
            images.display()
        )),
        None => Ok(()),
    }
}

/// The image of volume `name` in a subdirectory of `images`, if any.
fn image_in_subdir(images: &Path, name: &str) -> Option<PathBuf> {
    let dirs = fs::read_dir(images).ok()?;
    dirs.filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .flat_map(|e| {
            let d = e.path();
            [
                d.join(format!("{name}.raw")),
                d.join(format!("{name}.qcow2")),
                d.join(name).join(BTRFS_DISK),
                d.join(name).join(BTRFS_DISK_QCOW2),
            ]
        })
        .find(|p| fs::symlink_metadata(p).is_ok_and(|m| m.is_file()))
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

/// Refuses to go on when the volume exists in the other format than its spec asks.
fn check_no_other_format(t: &Target<'_>) -> Result<(), DriverError> {
    let other = other_format(t.spec.format);
    let p = disk_path(t.pool_name, t.pool, t.name, other)?;
    if fs::symlink_metadata(&p).is_ok() {
        return Err(DriverError::Conflict(format_change_message(
            t.name,
            other,
            t.spec.format,
        )));
    }
    Ok(())
}

fn apply_file(t: &Target<'_>) -> Result<(), DriverError> {
    let images = fsutil::ensure_dir(&t.pool.path, &["images"])?;
    sweep_stale_temps(&images)?;
    check_no_other_format(t)?;
    let path = disk_path(t.pool_name, t.pool, t.name, t.spec.format)?;
    match fs::symlink_metadata(&path) {
        Ok(m) if !m.is_file() => Err(DriverError::Conflict(format!(
            "{} exists and is not a regular file",
            path.display()
        ))),
        Ok(_) => update_existing(t, &path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let tmp = images.join(tmp_name(t.name, t.spec.format));
            let scratch = images.join(fetch_tmp_name(t.name));
            let made = create_file_volume(t, &tmp, &scratch, &path);
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
    scratch: &Path,
    path: &Path,
) -> Result<(), DriverError> {
    let f = create_locked_tmp(tmp)?;
    let mark = fsutil::set_owner(&f, path, &owner_of(t.name))?;
    build_image(t, &f, tmp, scratch)?;
    fs::rename(tmp, path).map_err(|e| {
        DriverError::io(format!("rename {} -> {}", tmp.display(), path.display()), e)
    })?;
    drop(f);
    info!(volume = t.name, path = %path.display(), size = t.size(), format = format_str(t.spec.format), mark = mark.as_str(), "volume created");
    Ok(())
}

fn apply_btrfs(t: &Target<'_>) -> Result<(), DriverError> {
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
    let path = disk_path(t.pool_name, t.pool, t.name, t.spec.format)?;
    if dir.exists() {
        if !btrfs::is_subvolume(&dir)? {
            return Err(DriverError::Conflict(format!(
                "{} exists and is not a btrfs subvolume",
                dir.display()
            )));
        }
        check_no_other_format(t)?;
        return update_existing(t, &path);
    }
    btrfs::subvol_create(&images, &tmp_sub)?;
    let tmp_disk = images.join(&tmp_sub).join(btrfs_disk(t.spec.format));
    let scratch = images.join(&tmp_sub).join("fetch.tmp");
    let filled = fsutil::create_new(&tmp_disk).and_then(|f| {
        fsutil::set_owner(&f, &tmp_disk, &owner_of(t.name))?;
        build_image(t, &f, &tmp_disk, &scratch)?;
        f.sync_all()
            .map_err(|e| DriverError::io(format!("fsync {}", tmp_disk.display()), e))
    });
    if let Err(e) = filled {
        // A failed copy (a full pool) must not keep its space.
        let _ = remove_btrfs_tmp(&images, &tmp_sub);
        return Err(e);
    }
    fs::rename(images.join(&tmp_sub), &dir)
        .map_err(|e| DriverError::io(format!("rename subvolume to {}", dir.display()), e))?;
    fsutil::fsync_dir(&images)?;
    info!(volume = t.name, path = %path.display(), size = t.size(), format = format_str(t.spec.format), "btrfs volume created");
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
            "source on {backend} pools is not implemented"
        )));
    }
    if t.spec.format != VolumeFormat::Raw || t.spec.template || t.spec.clone.is_some() {
        return Err(DriverError::Unsupported(format!(
            "Volume/{}: qcow2, templates and clones need a dir, nfs or btrfs pool ({backend} volumes are raw block devices)",
            t.name
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

/// Checks the parts of a volume spec the driver relies on (validation checks them too):
/// `source` has exactly one of `file`/`url`, a `url` comes with a well-formed `sha256`,
/// and `source` and `clone` exclude each other.
fn check_spec(name: &str, v: &VolumeSpec) -> Result<(), String> {
    if let Some(s) = &v.source {
        if s.file.is_some() == s.url.is_some() {
            return Err(format!(
                "Volume/{name}: source needs exactly one of file and url"
            ));
        }
        if let Some(u) = &s.url {
            import::check_url(u).map_err(|e| format!("Volume/{name}: {e}"))?;
            if s.sha256.is_none() {
                return Err(format!(
                    "Volume/{name}: source.url needs source.sha256 (an image is never fetched unchecked)"
                ));
            }
        }
        if let Some(d) = &s.sha256 {
            import::normalize_sha256(d).map_err(|e| format!("Volume/{name}: {e}"))?;
        }
        if v.clone.is_some() {
            return Err(format!(
                "Volume/{name}: source and clone exclude each other"
            ));
        }
    }
    if let Some(c) = &v.clone
        && c.from.as_str() == name
    {
        return Err(format!(
            "Volume/{name}: a volume cannot be a clone of itself"
        ));
    }
    Ok(())
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
        let mut state = json!({
            "pool": v.pool.as_str(),
            "size": v.size.bytes(),
            "format": format_str(v.format),
        });
        if v.template {
            state["template"] = json!(true);
        }
        state
    }

    fn impact(&self, path: &str) -> Impact {
        match path {
            "/size" | "/template" => Impact::Hot,
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
        check_spec(&desired.id.name, v)?;
        let want = v.size.bytes();
        // A format change is `data-loss` (impact of `/format`): the plan replaces the volume
        // only with --allow-data-loss, deleting the old file first.
        let was_template = observed.state.get("template") == Some(&json!(true));
        if v.template
            && was_template
            && let Some(cur) = observed.state.get("size").and_then(Value::as_u64)
            && want > cur
        {
            return Err(template_message(&desired.id.name, "growing it"));
        }
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

    fn adopt_check(
        &self,
        desired: Typed<'_, VolumeSpec>,
        observed: &Observed,
        world: &dyn Lookup,
    ) -> Result<(), String> {
        if !observed.exists {
            return check_not_elsewhere(desired, world);
        }
        let t = Target::resolve(desired, world).map_err(|e| e.to_string())?;
        check_adoptable(&t, observed)
    }

    fn adopt(
        &self,
        desired: Typed<'_, VolumeSpec>,
        _observed: &Observed,
        world: &dyn Lookup,
    ) -> Result<(), DriverError> {
        let t = Target::resolve(desired, world)?;
        let _span = info_span!("volume_adopt", volume = t.name, pool = t.pool_name).entered();
        let path = disk_path(t.pool_name, t.pool, t.name, t.spec.format)?;
        let owner = owner_of(t.name);
        match fsutil::get_owner(&path)? {
            Some((o, _)) if o == owner => return Ok(()),
            Some((o, _)) => {
                return Err(DriverError::Conflict(format!(
                    "{} is marked {o}, not {owner}",
                    path.display()
                )));
            }
            None => {}
        }
        let f = File::open(&path)
            .map_err(|e| DriverError::io(format!("open {}", path.display()), e))?;
        info!(path = %path.display(), "adopting: writing the ownership mark");
        fsutil::set_owner(&f, &path, &owner)?;
        Ok(())
    }

    fn apply(
        &self,
        desired: Typed<'_, VolumeSpec>,
        observed: &Observed,
        world: &dyn Lookup,
    ) -> Result<(), DriverError> {
        let mut t = Target::resolve(desired, world)?;
        t.image_cache = Some(import::ImageCache::in_state_dir(&self.env.state_dir));
        let _span = info_span!("volume_apply", volume = t.name, pool = t.pool_name).entered();
        check_spec(t.name, t.spec).map_err(DriverError::Refused)?;
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

    fn delete_blockers(
        &self,
        last_applied: Typed<'_, VolumeSpec>,
        _observed: &Observed,
        world: &dyn Lookup,
    ) -> Result<Vec<ResourceId>, String> {
        let Ok(t) = Target::resolve(last_applied, world) else {
            return Ok(Vec::new());
        };
        if !matches!(t.pool.pool_type, PoolType::Dir | PoolType::Nfs) {
            return Ok(Vec::new());
        }
        let path =
            disk_path(t.pool_name, t.pool, t.name, t.spec.format).map_err(|e| e.to_string())?;
        if !fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) {
            return Ok(Vec::new());
        }
        let clones = linked_clones(t.pool, &path).map_err(|e| {
            format!(
                "Volume/{}: cannot tell whether linked clones use it: {e}",
                t.name
            )
        })?;
        Ok(clones
            .iter()
            .map(|c| ResourceId::new(stead_schema::Kind::Volume, c))
            .collect())
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
                let path = disk_path(t.pool_name, t.pool, t.name, t.spec.format)?;
                let images = path.parent().map(Path::to_path_buf).unwrap_or_default();
                for f in [VolumeFormat::Raw, VolumeFormat::Qcow2] {
                    fsutil::remove_file_if_exists(&images.join(tmp_name(t.name, f)))?;
                }
                fsutil::remove_file_if_exists(&images.join(fetch_tmp_name(t.name)))?;
                match fs::symlink_metadata(&path) {
                    Ok(m) if !m.is_file() => {
                        return Err(DriverError::Conflict(format!(
                            "{} is not a regular file; not deleting",
                            path.display()
                        )));
                    }
                    Ok(_) => {
                        check_owned(&path, t.name)?;
                        let clones = linked_clones(t.pool, &path)?;
                        if !clones.is_empty() {
                            return Err(DriverError::Refused(has_clones_message(t.name, &clones)));
                        }
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
                let disk = btrfs_disk_in(&dir);
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
                // Its safety snapshots stay: with one, the zvol leaves the live path
                // instead of being destroyed (`zfs::delete_volume`).
                zfs::delete_volume(z, t.name, super::replicate::unix_now()).map(|_| ())
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
    fn temp_names_of_each_format_and_of_a_fetch_are_swept_and_nothing_else() {
        for f in [VolumeFormat::Raw, VolumeFormat::Qcow2] {
            assert!(is_volume_tmp_name(&tmp_name("vm1", f)));
        }
        assert!(is_volume_tmp_name(&fetch_tmp_name("vm1")));
        for other in [
            ".vm1.img.tmp",
            "vm1.raw.tmp",
            ".vm1.qcow2",
            "..raw.tmp",
            ".cache",
        ] {
            assert!(!is_volume_tmp_name(other), "{other}");
        }
    }

    #[test]
    fn an_image_in_another_manager_s_layout_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        fs::create_dir_all(images.join("100/vm-100-disk-1")).unwrap();
        assert_eq!(image_in_subdir(&images, "vm-100-disk-0"), None);
        fs::write(images.join("100/vm-100-disk-0.raw"), b"x").unwrap();
        fs::write(images.join("100/vm-100-disk-1/disk.raw"), b"x").unwrap();
        assert_eq!(
            image_in_subdir(&images, "vm-100-disk-0"),
            Some(images.join("100/vm-100-disk-0.raw"))
        );
        assert_eq!(
            image_in_subdir(&images, "vm-100-disk-1"),
            Some(images.join("100/vm-100-disk-1/disk.raw"))
        );
        assert_eq!(image_in_subdir(&dir.path().join("none"), "x"), None);
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
            fence_file: None,
        });
        assert_eq!(d.impact("/size"), Impact::Hot);
        assert_eq!(d.impact("/pool"), Impact::DataLoss);
        assert_eq!(d.impact("/format"), Impact::DataLoss);
    }
}
