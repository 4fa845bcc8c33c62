//! Root file systems: a directory in place, or a template (`.tar` / `.tar.zst`) unpacked
//! once, and the subordinate id ranges of unprivileged containers.
//!
//! Layout under the base dir (the named pool's path, or the state dir):
//! - `templates/<key>/` (`templates/` 0700) — a template unpacked once (key = hash of its
//!   path, size, mtime), shared read-only as the overlay `lowerdir` of privileged
//!   containers;
//! - `rootfs/` (0711) and `rootfs/<name>/` (0700, owned by the container's root) — no host
//!   user reaches a container's trees;
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
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};
use stead_host::progress::{self, Meter, Progress};
use stead_reconciler::driver::DriverError;
use stead_schema::RootfsSpec;

use super::config::{IdMap, Paths, RootfsMount};

/// Size of each container's id range.
pub const ID_RANGE: u32 = 65536;
/// First host id handed out when no subordinate id range is declared for [`STEAD_USER`].
pub const ID_BASE: u32 = 100_000;

fn io(ctx: impl Into<String>) -> impl FnOnce(io::Error) -> DriverError {
    let c = ctx.into();
    move |e| DriverError::io(c, e)
}

/// Whether the kernel has overlayfs.
pub fn overlay_supported() -> bool {
    stead_host::ProcFs::host().has_filesystem("overlay")
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
    let own = own_dir(base, name, idmap.map_or(0, |m| m.base))?;
    match idmap {
        Some(m) => {
            let root = own.join("root");
            let key = template_key(tpl)?;
            let marker = own.join("template");
            if !root.is_dir() {
                unpack(tpl, &root, Some(m))?;
                let line = format!("{key} {}\n", tpl.display());
                crate::storage::fsutil::write_atomic(&marker, line.as_bytes())?;
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
            let templates = base.join("templates");
            private_dir(&templates, PRIVATE_DIR_MODE, 0)?;
            let lower = templates.join(template_key(tpl)?);
            if !lower.is_dir() {
                unpack(tpl, &lower, None)?;
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
                unpack(tpl, &root, None)?;
            }
            Ok(RootfsMount::Dir { path: root })
        }
    }
}

/// Removes what [`prepare`] created for `name` (never the shared template cache nor a
/// `path` rootfs). Safety snapshots (`pre-*`, taken before a data-loss delete) are kept,
/// with the container's private dir that holds them.
pub fn remove(name: &str, base: &Path) -> Result<(), DriverError> {
    use crate::storage::fsutil::remove_tree_if_exists;
    let own = base.join("rootfs").join(name);
    let snaps = crate::storage::rootfs_snapshot::snapshots_dir(name, base);
    let entries = match fs::read_dir(&own) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(DriverError::io(format!("read {}", own.display()), e)),
    };
    let mut kept = false;
    for e in entries {
        let p = e.map_err(io(format!("read {}", own.display())))?.path();
        if p == snaps {
            kept |= remove_all_but_safety_snapshots(&snaps)?;
        } else if p.is_dir() && !p.is_symlink() {
            remove_tree_if_exists(&p)?;
        } else {
            fs::remove_file(&p).map_err(io(format!("remove {}", p.display())))?;
        }
    }
    if kept {
        tracing::info!(dir = %snaps.display(), "safety snapshots kept");
        Ok(())
    } else {
        remove_tree_if_exists(&own)
    }
}

/// Removes the snapshots in `snaps` but the safety ones; says whether any was kept.
fn remove_all_but_safety_snapshots(snaps: &Path) -> Result<bool, DriverError> {
    let mut kept = false;
    for e in fs::read_dir(snaps).map_err(io(format!("read {}", snaps.display())))? {
        let e = e.map_err(io(format!("read {}", snaps.display())))?;
        if e.file_name()
            .to_string_lossy()
            .starts_with(crate::storage::SAFETY_PREFIX)
        {
            kept = true;
        } else {
            crate::storage::fsutil::remove_tree_if_exists(&e.path())?;
        }
    }
    Ok(kept)
}

/// Mode of `<base>/rootfs`: others may traverse it (an unprivileged container's root
/// reaches its own tree through it) but not list it.
const ROOTFS_DIR_MODE: u32 = 0o711;
/// Mode of each container's own dir and of the template cache: no host user but their
/// owner reaches the trees below (setuid binaries of privileged containers).
const PRIVATE_DIR_MODE: u32 = 0o700;

fn private_dir(dir: &Path, mode: u32, owner: u32) -> Result<(), DriverError> {
    stead_host::fs::create_dir_mode(dir, mode)
        .map_err(|e| DriverError::io(format!("mkdir {}", dir.display()), io::Error::other(e)))?;
    std::os::unix::fs::lchown(dir, Some(owner), Some(owner))
        .map_err(io(format!("chown {}", dir.display())))
}

/// Creates (or fixes the mode and owner of) the private dir of container `name`'s own
/// trees, `<base>/rootfs/<name>`: mode 0700, owned by `owner` (the host uid of an
/// unprivileged container's root, which must reach its tree; 0 otherwise).
pub fn own_dir(base: &Path, name: &str, owner: u32) -> Result<PathBuf, DriverError> {
    let parent = base.join("rootfs");
    private_dir(&parent, ROOTFS_DIR_MODE, 0)?;
    let own = parent.join(name);
    private_dir(&own, PRIVATE_DIR_MODE, owner)?;
    Ok(own)
}

/// Tightens the modes of the rootfs dirs that already exist under `base` (made by an
/// older version with the umask's mode): `rootfs/` 0711, each `rootfs/<name>/` and
/// `templates/` 0700, owners kept.
pub fn tighten_modes(base: &Path) -> Result<(), DriverError> {
    use std::os::unix::fs::PermissionsExt;
    let set = |p: &Path, mode: u32| match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() && m.permissions().mode() & 0o7777 != mode => {
            fs::set_permissions(p, fs::Permissions::from_mode(mode))
                .map_err(io(format!("chmod {}", p.display())))
        }
        _ => Ok(()),
    };
    let rootfs = base.join("rootfs");
    set(&rootfs, ROOTFS_DIR_MODE)?;
    set(&base.join("templates"), PRIVATE_DIR_MODE)?;
    if let Ok(rd) = fs::read_dir(&rootfs) {
        for e in rd.flatten() {
            set(&e.path(), PRIVATE_DIR_MODE)?;
        }
    }
    Ok(())
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

struct Counting<'p, R> {
    inner: R,
    progress: &'p dyn Progress,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.inc(n as u64);
        Ok(n)
    }
}

/// Unpacks `tpl` (tar, or zstd-compressed tar by magic) into `dest`. With `idmap`, every
/// uid and gid is shifted into it (a member owned by an id outside the map is refused).
/// Atomic: unpacks next to `dest` and renames.
pub fn unpack(tpl: &Path, dest: &Path, idmap: Option<IdMap>) -> Result<(), DriverError> {
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
    // Released when `lock` is closed.
    lock.lock()
        .map_err(io(format!("lock {}", dest.display())))?;
    if dest.is_dir() {
        return Ok(()); // unpacked by whoever held the lock before us
    }
    let file = File::open(tpl).map_err(io(format!("open template {}", tpl.display())))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let progress = progress::start(&format!("unpacking {}", tpl.display()), Meter::Unpack);
    progress.set_length(len);
    let mut reader = BufReader::new(Counting {
        inner: file,
        progress: &*progress,
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
        extract(dec, &tmp, idmap)
    } else {
        extract(reader, &tmp, idmap)
    };
    progress.finish();
    if let Err(e) = result {
        let _ = crate::storage::fsutil::remove_tree_if_exists(&tmp);
        return Err(e);
    }
    if let Some(m) = idmap {
        // The root directory itself belongs to the container's root.
        std::os::unix::fs::lchown(&tmp, Some(m.base), Some(m.base))
            .map_err(io(format!("chown {}", tmp.display())))?;
    }
    fs::rename(&tmp, dest).map_err(io(format!("rename into {}", dest.display())))?;
    drop(lock);
    let _ = fs::remove_file(parent.join(format!(".{dest_name}.lock")));
    Ok(())
}

/// The path of tar member `path` relative to the unpack root: its normal components only
/// (a leading `/` or `./` is dropped, as the tar crate does when unpacking); a member with
/// a `..` component is refused.
fn member_rel_path(path: &Path) -> Result<PathBuf, DriverError> {
    let mut rel = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => rel.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(DriverError::Refused(format!(
                    "template member {} has a `..` component",
                    path.display()
                )));
            }
        }
    }
    Ok(rel)
}

/// The host id of a member's container id `id` under `map`: refused (naming the member)
/// when `id` is outside the map, so a template cannot hand out ids of another container's
/// range or wrap around.
fn shift_id(map: IdMap, id: u64, what: &str, member: &Path) -> Result<u32, DriverError> {
    u32::try_from(id)
        .ok()
        .filter(|i| *i < map.size)
        .and_then(|i| map.base.checked_add(i))
        .ok_or_else(|| {
            DriverError::Refused(format!(
                "template member {} is owned by {what} {id}, outside the container's id \
                 range 0..{} (an unprivileged container's ids map to host {}..{})",
                member.display(),
                map.size,
                map.base,
                u64::from(map.base) + u64::from(map.size),
            ))
        })
}

/// Sets the owner of `rel` (a member unpacked under `root`) without leaving `root`: its
/// parent is opened beneath `root` with no symlink followed, and the member itself is
/// changed with `AT_SYMLINK_NOFOLLOW`.
fn chown_beneath(root: &OwnedFd, rel: &Path, uid: u32, gid: u32) -> Result<(), DriverError> {
    use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};
    let err = |e: rustix::io::Errno| {
        DriverError::io(format!("chown {}", rel.display()), io::Error::from(e))
    };
    let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
        return Ok(()); // the root itself: owned by the container's root after unpacking
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let dir = rustix::fs::openat2(
        root,
        parent,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
    )
    .map_err(err)?;
    rustix::fs::chownat(
        &dir,
        name,
        Some(rustix::process::Uid::from_raw(uid)),
        Some(rustix::process::Gid::from_raw(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(err)
}

fn extract<R: Read>(r: R, dest: &Path, idmap: Option<IdMap>) -> Result<(), DriverError> {
    let mut ar = tar::Archive::new(r);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_preserve_mtime(true);
    ar.set_unpack_xattrs(false);
    ar.set_overwrite(true);
    let root: OwnedFd = File::open(dest)
        .map_err(io(format!("open {}", dest.display())))?
        .into();
    let mut dirs: BTreeMap<PathBuf, (u32, u32)> = BTreeMap::new();
    for entry in ar.entries().map_err(io("read tar"))? {
        let mut entry = entry.map_err(io("read tar entry"))?;
        let path = entry.path().map_err(io("tar path"))?.into_owned();
        let rel = member_rel_path(&path)?;
        let owner = match idmap {
            Some(m) => {
                let h = entry.header();
                let uid = h.uid().map_err(io(format!("uid of {}", path.display())))?;
                let gid = h.gid().map_err(io(format!("gid of {}", path.display())))?;
                Some((
                    shift_id(m, uid, "uid", &path)?,
                    shift_id(m, gid, "gid", &path)?,
                ))
            }
            None => None,
        };
        let is_dir = entry.header().entry_type().is_dir();
        if !entry
            .unpack_in(dest)
            .map_err(io(format!("unpack {}", path.display())))?
        {
            continue; // outside dest (refused by the tar crate)
        }
        if let Some((u, g)) = owner {
            if is_dir {
                // Chowned last: a later member may still be unpacked into it.
                dirs.insert(rel, (u, g));
            } else {
                chown_beneath(&root, &rel, u, g)?;
            }
        }
    }
    for (rel, (u, g)) in dirs {
        chown_beneath(&root, &rel, u, g)?;
    }
    Ok(())
}

/// The user whose subordinate id ranges (`/etc/subuid`, `/etc/subgid`) stead hands out to
/// unprivileged containers (`scripts/install-deps.sh` creates it).
pub const STEAD_USER: &str = "stead";

/// Where subordinate id ranges are declared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubIdFiles {
    /// Subordinate uid ranges (`/etc/subuid`).
    pub subuid: PathBuf,
    /// Subordinate gid ranges (`/etc/subgid`).
    pub subgid: PathBuf,
}

impl Default for SubIdFiles {
    fn default() -> Self {
        SubIdFiles {
            subuid: PathBuf::from("/etc/subuid"),
            subgid: PathBuf::from("/etc/subgid"),
        }
    }
}

/// One `owner:start:count` line of a subid file, as a half-open range.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SubRange {
    owner: String,
    start: u64,
    end: u64,
}

impl SubRange {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        start < self.end && self.start < end
    }
    fn contains(&self, start: u64, end: u64) -> bool {
        self.start <= start && end <= self.end
    }
}

/// The ranges of a subid file; a missing file declares none. Malformed lines are skipped
/// with a warning (as `newuidmap` does).
fn read_subids(path: &Path) -> Result<Vec<SubRange>, DriverError> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(DriverError::io(format!("read {}", path.display()), e)),
    };
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut f = line.split(':');
        let parsed = match (f.next(), f.next(), f.next(), f.next()) {
            (Some(owner), Some(start), Some(count), None) => {
                match (start.parse::<u64>(), count.parse::<u64>()) {
                    (Ok(s), Ok(c)) => s.checked_add(c).map(|end| SubRange {
                        owner: owner.to_string(),
                        start: s,
                        end,
                    }),
                    _ => None,
                }
            }
            _ => None,
        };
        match parsed {
            Some(r) => out.push(r),
            None => {
                tracing::warn!(file = %path.display(), line = n + 1, "malformed subordinate id line skipped")
            }
        }
    }
    Ok(out)
}

/// The host ids stead may hand out: whole [`ID_RANGE`] slots inside a range declared for
/// [`STEAD_USER`] in both files, or (no such entry) the legacy slots from [`ID_BASE`]; in
/// both cases never overlapping another user's declared range.
struct IdPool {
    uid: Vec<SubRange>,
    gid: Vec<SubRange>,
    /// Whether the files declare ranges for stead.
    declared: bool,
}

impl IdPool {
    fn load(files: &SubIdFiles) -> Result<Self, DriverError> {
        let uid = read_subids(&files.subuid)?;
        let gid = read_subids(&files.subgid)?;
        let declared =
            uid.iter().any(|r| r.owner == STEAD_USER) && gid.iter().any(|r| r.owner == STEAD_USER);
        if !declared {
            tracing::warn!(
                subuid = %files.subuid.display(),
                subgid = %files.subgid.display(),
                "no subordinate id range for user {STEAD_USER}: unprivileged containers get \
                 ids from {ID_BASE} up, outside other users' ranges; declare one with \
                 `useradd --system --no-create-home {STEAD_USER}; usermod --add-subuids \
                 1000000000-1999999999 --add-subgids 1000000000-1999999999 {STEAD_USER}`"
            );
        }
        Ok(IdPool { uid, gid, declared })
    }

    /// Whether `[start, end)` overlaps a range declared for another user.
    fn foreign(&self, start: u64, end: u64) -> Option<&SubRange> {
        self.uid
            .iter()
            .chain(&self.gid)
            .find(|r| r.owner != STEAD_USER && r.overlaps(start, end))
    }

    /// Whether `[start, end)` may be handed out (ignoring what is allocated already).
    fn usable(&self, start: u64, end: u64) -> bool {
        // The last id, u32::MAX, is (uid_t)-1 and never valid.
        let own = |v: &[SubRange]| {
            v.iter()
                .any(|r| r.owner == STEAD_USER && r.contains(start, end))
        };
        end <= u64::from(u32::MAX)
            && (!self.declared || (own(&self.uid) && own(&self.gid)))
            && self.foreign(start, end).is_none()
    }

    /// Candidate slot starts, in order.
    fn candidates(&self) -> Vec<u64> {
        let size = u64::from(ID_RANGE);
        let starts: Vec<(u64, u64)> = if self.declared {
            self.uid
                .iter()
                .filter(|r| r.owner == STEAD_USER)
                .map(|r| (r.start, r.end))
                .collect()
        } else {
            vec![(u64::from(ID_BASE), u64::from(u32::MAX))]
        };
        let mut out = Vec::new();
        for (start, end) in starts {
            let mut b = start;
            while b.checked_add(size).is_some_and(|e| e <= end) {
                out.push(b);
                b += size;
            }
        }
        out
    }

    /// The first free slot given the bases allocated already.
    fn first_free(&self, used: &BTreeMap<String, u32>) -> Option<u32> {
        let size = u64::from(ID_RANGE);
        self.candidates().into_iter().find_map(|b| {
            let taken = used.values().any(|u| {
                let u = u64::from(*u);
                b < u + size && u < b + size
            });
            if taken || !self.usable(b, b + size) {
                None
            } else {
                u32::try_from(b).ok()
            }
        })
    }
}

/// Allocates (or returns the existing) id range of container `name`: [`ID_RANGE`] ids
/// from the subordinate ranges declared for [`STEAD_USER`] in `/etc/subuid` and
/// `/etc/subgid` (see [`allocate_ids_from`]), recorded in
/// `<state_dir>/containers/idmap.json` under an exclusive lock.
pub fn allocate_ids(state_dir: &Path, name: &str) -> Result<IdMap, DriverError> {
    allocate_ids_from(state_dir, name, &SubIdFiles::default())
}

/// [`allocate_ids`] with the subid files given. A new range lies inside a range declared
/// for [`STEAD_USER`] in both files, or, when neither declares one, from [`ID_BASE`] up
/// (with a warning saying how to declare one); never overlapping another user's declared
/// range nor another container's. An existing allocation is kept.
pub fn allocate_ids_from(
    state_dir: &Path,
    name: &str,
    files: &SubIdFiles,
) -> Result<IdMap, DriverError> {
    let _span = tracing::info_span!("allocate_ids", container = name).entered();
    with_idmap(state_dir, |map| {
        if let Some(b) = map.get(name) {
            warn_if_foreign(files, name, *b);
            return Ok((
                IdMap {
                    base: *b,
                    size: ID_RANGE,
                },
                false,
            ));
        }
        let pool = IdPool::load(files)?;
        let base = pool.first_free(map).ok_or_else(|| {
            let why = if pool.declared {
                format!("the ranges declared for user {STEAD_USER} are used up")
            } else {
                format!("no range is declared for user {STEAD_USER}")
            };
            DriverError::Refused(format!(
                "no free range of {ID_RANGE} ids for container {name}: {why}; add one with \
                 `usermod --add-subuids FIRST-LAST --add-subgids FIRST-LAST {STEAD_USER}`"
            ))
        })?;
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

/// Warns when a range allocated earlier (by an older version, or before the subid files
/// changed) overlaps another user's declared range: it is kept, so as not to re-shift a
/// rootfs that holds data.
fn warn_if_foreign(files: &SubIdFiles, name: &str, base: u32) {
    let (start, end) = (u64::from(base), u64::from(base) + u64::from(ID_RANGE));
    for path in [&files.subuid, &files.subgid] {
        let Ok(ranges) = read_subids(path) else {
            continue;
        };
        if let Some(r) = ranges
            .iter()
            .find(|r| r.owner != STEAD_USER && r.overlaps(start, end))
        {
            tracing::warn!(
                container = name,
                "its id range {start}..{end} overlaps the subordinate range of user {} in {}:                  that user's processes may own its files; delete and recreate the container                  to get a free range",
                r.owner,
                path.display()
            );
        }
    }
}

/// Releases the id range of `name`.
pub fn release_ids(state_dir: &Path, name: &str) -> Result<(), DriverError> {
    with_idmap(state_dir, |map| Ok(((), map.remove(name).is_some())))
}

fn with_idmap<T>(
    state_dir: &Path,
    f: impl FnOnce(&mut BTreeMap<String, u32>) -> Result<(T, bool), DriverError>,
) -> Result<T, DriverError> {
    let dir = state_dir.join("containers");
    fs::create_dir_all(&dir).map_err(io(format!("mkdir {}", dir.display())))?;
    let lock = File::create(dir.join("idmap.lock")).map_err(io("open idmap.lock"))?;
    // Released when `lock` is closed.
    lock.lock().map_err(io("lock idmap.lock"))?;
    let path = dir.join("idmap.json");
    let mut map: BTreeMap<String, u32> = super::config::read_json(&path)?.unwrap_or_default();
    let (out, changed) = f(&mut map)?;
    if changed {
        super::config::write_json(&path, &map)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Subid files with these contents in `d`.
    fn subids(d: &Path, subuid: &str, subgid: &str) -> SubIdFiles {
        let f = SubIdFiles {
            subuid: d.join("subuid"),
            subgid: d.join("subgid"),
        };
        fs::write(&f.subuid, subuid).expect("subuid");
        fs::write(&f.subgid, subgid).expect("subgid");
        f
    }

    #[test]
    fn id_ranges_do_not_overlap_and_are_reused() {
        let d = tempfile::tempdir().expect("tmp");
        let f = subids(d.path(), "", "");
        let alloc = |n: &str| allocate_ids_from(d.path(), n, &f).expect(n);
        let a = alloc("a");
        let b = alloc("b");
        assert_eq!(a.base, ID_BASE);
        assert_eq!(b.base, ID_BASE + ID_RANGE);
        assert_eq!(alloc("a"), a);
        release_ids(d.path(), "a").expect("release");
        let c = alloc("c");
        assert_eq!(c.base, ID_BASE, "freed range reused");
    }

    #[test]
    fn ids_come_from_the_range_declared_for_stead() {
        let d = tempfile::tempdir().expect("tmp");
        let f = subids(
            d.path(),
            "alice:100000:65536\nstead:1000000000:200000\n",
            "alice:100000:65536\nstead:1000000000:200000\n",
        );
        let alloc = |n: &str| allocate_ids_from(d.path(), n, &f);
        assert_eq!(alloc("a").expect("a").base, 1_000_000_000);
        assert_eq!(alloc("b").expect("b").base, 1_000_065_536);
        assert_eq!(alloc("c").expect("c").base, 1_000_131_072);
        let e = alloc("d").expect_err("200000 ids hold three ranges");
        assert!(matches!(e, DriverError::Refused(_)), "{e}");
        assert!(e.to_string().contains("usermod --add-subuids"), "{e}");
        let recorded: BTreeMap<String, u32> =
            super::super::config::read_json(&d.path().join("containers/idmap.json"))
                .expect("read")
                .expect("recorded in state");
        assert_eq!(recorded.get("b"), Some(&1_000_065_536));
    }

    #[test]
    fn ids_never_overlap_other_users_ranges() {
        let d = tempfile::tempdir().expect("tmp");
        // No range for stead: the legacy slots, but not alice's (uids) nor bob's (gids).
        let f = subids(d.path(), "alice:100000:65536\n", "bob:165536:65536\n");
        let a = allocate_ids_from(d.path(), "a", &f).expect("a");
        assert_eq!(a.base, ID_BASE + 2 * ID_RANGE);
        // stead's range overlapping carol's: the overlapping slot is skipped.
        let d = tempfile::tempdir().expect("tmp");
        let both = "carol:1000000000:10\nstead:1000000000:1000000\n";
        let f = subids(d.path(), both, both);
        let a = allocate_ids_from(d.path(), "a", &f).expect("a");
        assert_eq!(a.base, 1_000_065_536);
        // stead's uids without gids of its own: the map needs both.
        let d = tempfile::tempdir().expect("tmp");
        let f = subids(d.path(), "stead:1000000000:65536\n", "");
        let a = allocate_ids_from(d.path(), "a", &f).expect("legacy slots");
        assert_eq!(a.base, ID_BASE);
    }

    #[test]
    fn ids_near_the_top_do_not_wrap() {
        let d = tempfile::tempdir().expect("tmp");
        let top = "stead:4294967000:100000\n";
        let f = subids(d.path(), top, top);
        let e = allocate_ids_from(d.path(), "a", &f).expect_err("past u32::MAX");
        assert!(matches!(e, DriverError::Refused(_)), "{e}");
        let d = tempfile::tempdir().expect("tmp");
        let fits = "stead:4294800000:100000\nx:bad\n";
        let f = subids(d.path(), fits, fits);
        let a = allocate_ids_from(d.path(), "a", &f).expect("fits");
        assert_eq!(a.base, 4_294_800_000);
        assert!(a.base.checked_add(a.size).is_some());
    }

    #[test]
    fn member_paths_stay_beneath_the_root_and_ids_in_the_map() {
        assert_eq!(
            member_rel_path(Path::new("/etc/shadow")).expect("abs"),
            PathBuf::from("etc/shadow")
        );
        assert_eq!(
            member_rel_path(Path::new("./a/./b")).expect("rel"),
            PathBuf::from("a/b")
        );
        let e = member_rel_path(Path::new("a/../../etc")).expect_err("dotdot");
        assert!(matches!(e, DriverError::Refused(_)), "{e}");
        let m = IdMap {
            base: 100_000,
            size: ID_RANGE,
        };
        let p = Path::new("etc/x");
        assert_eq!(shift_id(m, 65_535, "uid", p).expect("last"), 165_535);
        let e = shift_id(m, 70_000, "uid", p).expect_err("outside");
        assert!(e.to_string().contains("etc/x") && e.to_string().contains("70000"));
        let top = IdMap {
            base: u32::MAX - 10,
            size: ID_RANGE,
        };
        shift_id(top, 100, "gid", p).expect_err("wraps");
        shift_id(m, u64::from(u32::MAX) + 1, "uid", p).expect_err("beyond u32");
    }

    /// A template whose link members point outside the tree: a hard link to a host file
    /// (`hard`), or a symlinked dir followed by a member below it.
    fn hostile_template(path: &Path, outside: &Path, hard: bool) {
        let mut b = tar::Builder::new(File::create(path).expect("create"));
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_uid(7);
        h.set_gid(7);
        if hard {
            h.set_entry_type(tar::EntryType::Link);
            b.append_link(&mut h, "hard", outside.join("victim"))
                .expect("hard link");
        } else {
            h.set_entry_type(tar::EntryType::Symlink);
            b.append_link(&mut h, "dir", outside).expect("symlink");
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(2);
            h.set_uid(7);
            h.set_gid(7);
            b.append_data(&mut h, "dir/victim", &b"x\n"[..])
                .expect("file");
        }
        b.finish().expect("finish");
    }

    #[test]
    fn link_members_do_not_reach_outside_the_tree() {
        for hard in [true, false] {
            let d = tempfile::tempdir().expect("tmp");
            let outside = d.path().join("outside");
            fs::create_dir(&outside).expect("mkdir");
            fs::write(outside.join("victim"), "host\n").expect("victim");
            std::os::unix::fs::chown(outside.join("victim"), Some(1234), Some(1234))
                .expect("chown");
            let tpl = d.path().join("t.tar");
            hostile_template(&tpl, &outside, hard);
            let m = IdMap {
                base: 300_000,
                size: ID_RANGE,
            };
            let r = unpack(&tpl, &d.path().join("out/root"), Some(m));
            assert!(r.is_err(), "hostile template refused (hard link: {hard})");
            let v = fs::metadata(outside.join("victim")).expect("victim");
            assert_eq!((v.uid(), v.gid()), (1234, 1234), "host file untouched");
            assert_eq!(fs::read(outside.join("victim")).expect("read"), b"host\n");
            assert!(!d.path().join("out/root").exists());
        }
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
        let m = IdMap {
            base: 100_000,
            size: ID_RANGE,
        };
        unpack(&tpl, &dest, Some(m)).expect("unpack");
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
