//! [`WorkloadHooks`]: consistent backups of running containers and VMs.
//!
//! The workloads a target touches are the target itself (a Container or VirtualMachine) or,
//! for a Volume, the containers and VMs that use it (as rootfs, mount or disk).
//!
//! `mode: snapshot`:
//! 1. Quiesce each running workload: a container's cgroup is frozen (v1 freezer / v2
//!    `cgroup.freeze`), a VM is paused through its VMM's control socket (every vCPU parked).
//! 2. Clone each file input (a volume image) with FICLONE into
//!    `.<file>.stead-backup-<pid>` next to it: instant and copy-on-write on btrfs and xfs.
//!    The original's metadata, taken at that moment, is recorded in the manifest. A
//!    directory tree (a container rootfs) on such a file system is copied the same way
//!    with `cp -a --reflink=always` (one clone per file).
//! 3. If every input was cloned, the workloads run again at once: the pause lasts
//!    milliseconds. Otherwise (a block device, or a file system without reflinks) they
//!    stay quiesced until the backup has read everything: still consistent, but the pause
//!    is as long as the backup.
//! 4. Cleanup thaws/resumes what is still quiesced and removes the clones. A backup holds
//!    an exclusive `flock` on each clone while it uses it; clones nobody has locked (left
//!    by a killed backup) are removed by the next backup of that input.
//!
//! `mode: stop`: each running workload is stopped (graceful, as `state: stopped` would),
//! the inputs are read, and cleanup starts the workloads again from their manifests.
//!
//! Workloads that are not running are read as they are: nothing writes to them. A VM that
//! an operator paused stays paused. The result is recorded as the manifest's
//! `consistency`, e.g. `frozen Container/web 4 ms; reflink clones`.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use stead_reconciler::driver::{Driver, HostEnv, Observed};
use stead_schema::kinds::{BackupMode, VmEngine};
use stead_schema::{Kind, Resource, ResourceId, Spec};
use tracing::{info, info_span, warn};

use super::BackupError;
use super::hooks::{BackupHooks, Prepared, Target};
use crate::container::ContainerDriver;
use crate::storage::fsutil::{
    create_new, reflink_supported, remove_file_if_exists, remove_tree_if_exists, try_reflink,
};
use crate::storage::rootfs_snapshot::{Reflink, copy_tree};
use crate::supervise::hold;
use crate::vm::VmDriver;
use crate::vm::qemu::backup as qemu_backup;
use crate::vm::qemu::qmp::{Qmp, QmpError};
use crate::vm::qemu::quiesce::Quiesced;

/// Longest wait for QEMU's QMP greeting and each command's answer.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a cgroup to report frozen.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);
/// Marker in the name of consistency clones.
const CLONE_MARK: &str = ".stead-backup-";

fn err(e: stead_reconciler::driver::DriverError) -> BackupError {
    BackupError::Invalid(e.to_string())
}

/// Loads the resources as applied (e.g. the state DB inventory); `None` keeps the last.
pub type WorldLoader = Arc<dyn Fn() -> Option<BTreeMap<ResourceId, Resource>> + Send + Sync>;

/// Consistency hooks backed by the container and VM drivers. Clones share the world.
#[derive(Clone)]
pub struct WorkloadHooks {
    containers: ContainerDriver,
    vms: VmDriver,
    world: Arc<RwLock<Arc<BTreeMap<ResourceId, Resource>>>>,
    loader: Option<WorldLoader>,
    run_dir: PathBuf,
}

/// A workload quiesced (or stopped) for a backup, with the hold that keeps `apply` (and
/// the controller's drift repair) from thawing, resuming or starting it meanwhile.
#[derive(Debug)]
enum Held {
    Frozen(String, hold::Guard),
    Paused(String, Quiesced, hold::Guard),
    Stopped(ResourceId, hold::Guard),
}

impl Held {
    fn label(&self) -> String {
        match self {
            Held::Frozen(n, _) => format!("Container/{n}"),
            Held::Paused(n, q, _) => match q.agent_report() {
                Some(r) => format!("VirtualMachine/{n} ({r})"),
                None => format!("VirtualMachine/{n}"),
            },
            Held::Stopped(id, _) => id.to_string(),
        }
    }
}

impl WorkloadHooks {
    /// Hooks for `env`; `world` holds the resources as applied (a stopped workload is
    /// started again from its entry there).
    pub fn new(
        env: &HostEnv,
        world: Arc<BTreeMap<ResourceId, Resource>>,
    ) -> Result<Self, BackupError> {
        Ok(WorkloadHooks {
            containers: ContainerDriver::new(env).map_err(err)?,
            vms: VmDriver::new(env).map_err(err)?,
            world: Arc::new(RwLock::new(world)),
            loader: None,
            run_dir: env.run_dir.clone(),
        })
    }

    /// Reloads the world with `loader` before each backup (a long-running daemon sees
    /// workloads applied after it started, and restarts them with their current spec).
    pub fn with_loader(mut self, loader: WorldLoader) -> Self {
        self.loader = Some(loader);
        self
    }

    fn world(&self) -> Arc<BTreeMap<ResourceId, Resource>> {
        match self.world.read() {
            Ok(w) => Arc::clone(&w),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    fn refresh(&self) {
        if let Some(w) = self.loader.as_ref().and_then(|l| l()) {
            match self.world.write() {
                Ok(mut g) => *g = Arc::new(w),
                Err(p) => *p.into_inner() = Arc::new(w),
            }
        }
    }

    /// The workloads whose data `resource` (`Kind/name`) is: itself, or a Volume's users.
    pub fn workloads_of(&self, resource: &str) -> Vec<ResourceId> {
        let Some((kind, name)) = resource.split_once('/') else {
            return Vec::new();
        };
        match kind {
            "Container" => vec![ResourceId::new(Kind::Container, name)],
            "VirtualMachine" => vec![ResourceId::new(Kind::VirtualMachine, name)],
            "Volume" => self
                .world()
                .values()
                .filter(|r| uses_volume(r, name))
                .map(|r| r.id.clone())
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Whether workload `id` is running.
    pub fn running(&self, id: &ResourceId) -> bool {
        match id.kind {
            Kind::Container => self.containers.is_running(&id.name),
            Kind::VirtualMachine => self.vms.run_state(&id.name).as_deref() == Some("running"),
            _ => false,
        }
    }

    /// Freezes or pauses each running workload of `ids`, all or none.
    pub fn quiesce_running(&self, ids: &[ResourceId]) -> Result<Hold, BackupError> {
        let running: Vec<&ResourceId> = ids.iter().filter(|id| self.running(id)).collect();
        self.hold_each(&running, Self::quiesce)
    }

    /// Stops each running workload of `ids` (holding it against other applies), all or
    /// none; [`Hold::release`] starts them again from their manifests. Refused for a
    /// running workload that is not in the manifests.
    pub fn stop_running(&self, ids: &[ResourceId]) -> Result<Hold, BackupError> {
        let running: Vec<&ResourceId> = ids.iter().filter(|id| self.running(id)).collect();
        let world = self.world();
        if let Some(id) = running.iter().find(|id| !world.contains_key(**id)) {
            return Err(BackupError::Invalid(format!(
                "{id} is running but not in the manifests, so it could not be started again"
            )));
        }
        self.hold_each(&running, Self::stop)
    }

    /// Applies `take` to each of `ids`; on a failure, releases those already taken.
    fn hold_each(
        &self,
        ids: &[&ResourceId],
        take: fn(&Self, &ResourceId) -> Result<Held, BackupError>,
    ) -> Result<Hold, BackupError> {
        let mut held = Vec::new();
        for id in ids {
            match take(self, id) {
                Ok(h) => held.push(h),
                Err(e) => {
                    let _ = self.release_all(&mut held);
                    return Err(e);
                }
            }
        }
        Ok(Hold {
            hooks: self.clone(),
            held,
        })
    }

    fn quiesce(&self, id: &ResourceId) -> Result<Held, BackupError> {
        // Taken first: a controller must not resume or thaw it while the backup reads.
        let guard = hold::take(&self.run_dir, &id.kind.to_string(), &id.name).map_err(err)?;
        let r = match id.kind {
            Kind::Container => self
                .containers
                .freeze(&id.name, FREEZE_TIMEOUT)
                .map(|()| Held::Frozen(id.name.clone(), guard)),
            _ => self
                .vms
                .quiesce(&id.name)
                .map(|q| Held::Paused(id.name.clone(), q, guard)),
        };
        r.map_err(|e| {
            BackupError::Invalid(format!(
                "cannot quiesce {id} for a consistent copy: {e} (mode stop stops it instead)"
            ))
        })
    }

    fn stop(&self, id: &ResourceId) -> Result<Held, BackupError> {
        let kind = id.kind.to_string();
        // Keeps a controller (or another apply) from starting it during the backup.
        let guard = hold::take(&self.run_dir, &kind, &id.name).map_err(err)?;
        let r = match id.kind {
            Kind::Container => self.containers.stop(&id.name),
            _ => self.vms.stop(&id.name),
        };
        r.map_err(err)?;
        Ok(Held::Stopped(id.clone(), guard))
    }

    /// Undoes one [`Held`]: thaw, resume, or start from the manifest; then drops its hold.
    fn release(&self, h: Held) -> Result<(), BackupError> {
        match h {
            Held::Frozen(n, _guard) => self.containers.thaw(&n).map_err(err),
            Held::Paused(n, q, _guard) => self.vms.release(&n, &q).map_err(err),
            Held::Stopped(id, _guard) => {
                let world = self.world();
                let r = world.get(&id).ok_or_else(|| {
                    BackupError::Invalid(format!("{id}: no manifest to start it again from"))
                })?;
                let world: &BTreeMap<ResourceId, Resource> = &world;
                let res = match id.kind {
                    Kind::Container => self.containers.apply(r, &Observed::absent(), world),
                    _ => self.vms.apply(r, &Observed::absent(), world),
                };
                res.map_err(|e| BackupError::Invalid(format!("start {id} again: {e}")))
            }
        }
    }

    /// Releases all of `held` (in reverse order), returning the first error.
    fn release_all(&self, held: &mut Vec<Held>) -> Result<(), BackupError> {
        let mut first = None;
        while let Some(h) = held.pop() {
            let label = h.label();
            if let Err(e) = self.release(h) {
                warn!(workload = %label, error = %e, "could not release after the backup");
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

fn uses_volume(r: &Resource, volume: &str) -> bool {
    match &r.spec {
        Spec::Container(c) => {
            c.rootfs
                .volume
                .as_ref()
                .is_some_and(|v| v.as_str() == volume)
                || c.mounts.iter().any(|m| m.volume.as_str() == volume)
        }
        Spec::VirtualMachine(v) => v.disks.iter().any(|d| d.volume.as_str() == volume),
        _ => false,
    }
}

/// `.<file name>.stead-backup-<pid>` next to `p`.
fn clone_path(p: &Path, pid: u32) -> Option<PathBuf> {
    let name = p.file_name()?.to_str()?;
    Some(p.with_file_name(format!(".{name}{CLONE_MARK}{pid}")))
}

/// Removes a clone (file or tree) that stead made, never following a symlink and never
/// crossing into a mount below it; a failure is logged (the clone stays, nothing else goes).
fn remove_clone(clone: &Path) {
    if let Err(e) = stead_host::remove_tree_beneath(clone) {
        warn!(path = %clone.display(), error = %e, "cannot remove a backup clone");
    }
}

/// Removes clones of `p` left by backups whose process is gone. A live backup holds an
/// exclusive `flock` on each of its clones for as long as it uses it, so a clone nobody
/// has locked is stale, whatever process now has the pid in its name.
fn remove_stale_clones(p: &Path) {
    let (Some(dir), Some(name)) = (p.parent(), p.file_name().and_then(|n| n.to_str())) else {
        return;
    };
    let prefix = format!(".{name}{CLONE_MARK}");
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let f = e.file_name();
        let ours = f
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .is_some_and(|p| p.parse::<u32>().is_ok());
        if !ours {
            continue;
        }
        let Ok(clone) = File::open(e.path()) else {
            continue;
        };
        if clone.try_lock_shared().is_ok() {
            drop(clone);
            info!(path = %e.path().display(), "removing a clone left by an interrupted backup");
            remove_clone(&e.path());
        }
    }
}

/// Clones directory tree `p` with `cp -a --reflink=always` (every file a FICLONE, all
/// metadata kept) where the file system has reflinks; `None` otherwise or when the copy
/// fails (the caller then reads `p` with the workload quiesced).
fn clone_tree(p: &Path) -> Option<(PathBuf, File)> {
    if !reflink_supported(p) {
        return None;
    }
    let dst = clone_path(p, std::process::id())?;
    remove_clone(&dst);
    // Locked before anything is copied into it: see `remove_stale_clones`.
    let lock = fs::create_dir(&dst)
        .and_then(|()| File::open(&dst))
        .and_then(|f| f.try_lock().map(|()| f).map_err(std::io::Error::other));
    let lock = match lock {
        Ok(l) => l,
        Err(e) => {
            warn!(dir = %dst.display(), error = %e, "cannot make the clone directory; reading the tree in place");
            let _ = fs::remove_dir(&dst);
            return None;
        }
    };
    match copy_tree(p, &dst, Reflink::Always) {
        Ok(()) => Some((dst, lock)),
        Err(e) => {
            warn!(dir = %p.display(), error = %e, "reflink copy of the tree failed; reading it in place");
            None
        }
    }
}

/// Clones regular file `p` with FICLONE; `Ok(None)` when the file system cannot.
/// Returns the clone, `p`'s metadata from just before the clone, and the clone open with
/// an exclusive lock (held while it is in use: see `remove_stale_clones`).
fn clone_file(p: &Path) -> Result<Option<(PathBuf, fs::Metadata, File)>, BackupError> {
    let Some(dst) = clone_path(p, std::process::id()) else {
        return Ok(None);
    };
    let src = File::open(p).map_err(BackupError::io("open", p))?;
    let md = src.metadata().map_err(BackupError::io("stat", p))?;
    let _ = fs::remove_file(&dst);
    let out = create_new(&dst).map_err(err)?;
    if let Err(e) = out.try_lock() {
        warn!(clone = %dst.display(), error = %e, "cannot lock the clone");
    }
    match try_reflink(&src, &out) {
        Ok(true) => Ok(Some((dst, md, out))),
        Ok(false) => {
            let _ = fs::remove_file(&dst);
            Ok(None)
        }
        Err(e) => {
            let _ = fs::remove_file(&dst);
            Err(BackupError::Invalid(format!("clone {}: {e}", p.display())))
        }
    }
}

impl WorkloadHooks {
    /// A running VM of the QEMU engine: backed up through QEMU's own backup jobs (one point
    /// in time, guest agent freeze, dirty bitmaps; see `vm::qemu::backup`) over its QMP
    /// socket, held against other applies meanwhile. `None` when `target` is not such a VM
    /// or its QEMU does not answer (not running: its files are read as they are).
    fn prepare_qemu(&self, target: &Target) -> Result<Option<Prepared>, BackupError> {
        let Some(name) = target.resource.strip_prefix("VirtualMachine/") else {
            return Ok(None);
        };
        let world = self.world();
        let id = ResourceId::new(Kind::VirtualMachine, name);
        let Some(Spec::VirtualMachine(vm)) = world.get(&id).map(|r| &r.spec) else {
            return Ok(None);
        };
        if vm.engine() != VmEngine::Qemu {
            return Ok(None);
        }
        let paths = crate::vm::config::Paths::new(&self.run_dir, name);
        let mut qmp = match Qmp::connect(&paths.qmp_socket(), QMP_TIMEOUT) {
            Ok(q) => q,
            Err(QmpError::Connect { .. }) => return Ok(None),
            Err(e) => {
                return Err(BackupError::Invalid(format!(
                    "{id}: QEMU's QMP socket does not answer: {e}"
                )));
            }
        };
        let guard = hold::take(&self.run_dir, "VirtualMachine", name).map_err(err)?;
        let agent = vm.agent.then(|| paths.qga_socket());
        let (resource, spec, images) = (
            target.resource.clone(),
            target.spec.clone(),
            target.inputs.clone(),
        );
        // The UEFI NVRAM file of the running configuration (what QEMU has open).
        let nvram = std::fs::read(paths.config())
            .ok()
            .and_then(|b| serde_json::from_slice::<crate::vm::qemu::config::QemuConfig>(&b).ok())
            .and_then(|c| c.nvram().map(std::path::Path::to_path_buf));
        Ok(Some(Prepared {
            inputs: target.inputs.clone(),
            stat_of: HashMap::new(),
            consistency: "QEMU backup job".into(),
            cleanup: Box::new(|| Ok(())),
            run: Some(Box::new(move |store, opts| {
                let _held = guard;
                qemu_backup::backup_running_vm(
                    &mut qmp,
                    agent.as_deref(),
                    store,
                    &resource,
                    &spec,
                    &images,
                    nvram,
                    opts,
                )
            })),
        }))
    }
}

impl BackupHooks for WorkloadHooks {
    fn prepare(&self, target: &Target, mode: BackupMode) -> Result<Prepared, BackupError> {
        let _span = info_span!("consistency", resource = %target.resource, ?mode).entered();
        self.refresh();
        let workloads = self.workloads_of(&target.resource);
        if mode == BackupMode::Stop {
            let hold = self.stop_running(&workloads)?;
            let consistency = if hold.is_empty() {
                "not running".to_string()
            } else {
                format!("stopped {}", hold.labels().join(", "))
            };
            info!(%consistency, "inputs read with the workloads stopped");
            return Ok(Prepared {
                inputs: target.inputs.clone(),
                stat_of: HashMap::new(),
                consistency,
                cleanup: Box::new(move || hold.release()),
                run: None,
            });
        }

        // snapshot
        if let Some(p) = self.prepare_qemu(target)? {
            return Ok(p);
        }
        for (_, p) in &target.inputs {
            remove_stale_clones(p);
        }
        let t = Instant::now();
        let hold = self.quiesce_running(&workloads)?;
        let mut inputs = Vec::new();
        let mut clones: Vec<PathBuf> = Vec::new();
        // Open and locked until the cleanup removed the clones.
        let mut locks: Vec<File> = Vec::new();
        let mut stat_of = HashMap::new();
        let mut all_cloned = true;
        for (n, p) in &target.inputs {
            let md = fs::metadata(p).ok();
            let is_file = md.as_ref().is_some_and(|m| m.is_file());
            // A directory tree is only worth cloning when something would otherwise have
            // to stay quiesced while it is read.
            if !hold.is_empty()
                && md.as_ref().is_some_and(|m| m.is_dir())
                && let Some((c, lock)) = clone_tree(p)
            {
                inputs.push((n.clone(), c.clone()));
                clones.push(c);
                locks.push(lock);
                continue;
            }
            let cloned = if is_file {
                match clone_file(p) {
                    Ok(c) => c,
                    Err(e) => {
                        drop(hold);
                        remove_all(&clones);
                        return Err(e);
                    }
                }
            } else {
                None
            };
            match cloned {
                Some((c, md, lock)) => {
                    inputs.push((n.clone(), c.clone()));
                    stat_of.insert(n.clone(), md);
                    clones.push(c);
                    locks.push(lock);
                }
                None => {
                    all_cloned = false;
                    inputs.push((n.clone(), p.clone()));
                }
            }
        }
        let names = hold.labels().join(", ");
        let verb = hold.verb();
        let (consistency, hold) = if hold.is_empty() {
            let c = if clones.is_empty() {
                "not running"
            } else {
                "not running; reflink clones"
            };
            (c.to_string(), None)
        } else if all_cloned {
            if let Err(e) = hold.release() {
                remove_all(&clones);
                return Err(e);
            }
            let ms = t.elapsed().as_millis();
            info!(workloads = %names, ms, "quiesced for reflink clones, running again");
            (format!("{verb} {names} {ms} ms; reflink clones"), None)
        } else {
            warn!(
                workloads = %names,
                "not every input can be cloned (directory tree, block device or no reflink support): the workloads stay quiesced while the backup reads"
            );
            (format!("{verb} {names} while read"), Some(hold))
        };
        Ok(Prepared {
            inputs,
            stat_of,
            consistency,
            cleanup: Box::new(move || {
                let r = hold.map_or(Ok(()), Hold::release);
                remove_all(&clones);
                drop(locks);
                r
            }),
            run: None,
        })
    }
}

/// Workloads quiesced or stopped until [`Hold::release`] (or drop, which releases too and
/// only logs failures).
pub struct Hold {
    hooks: WorkloadHooks,
    held: Vec<Held>,
}

impl Hold {
    /// `Kind/name` of each workload held.
    pub fn labels(&self) -> Vec<String> {
        self.held.iter().map(Held::label).collect()
    }

    /// Nothing was running, so nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// "paused" if a VM is among the held, else "frozen" (or "stopped").
    pub fn verb(&self) -> &'static str {
        if self.held.iter().any(|h| matches!(h, Held::Stopped(..))) {
            "stopped"
        } else if self.held.iter().any(|h| matches!(h, Held::Paused(..))) {
            "paused"
        } else {
            "frozen"
        }
    }

    /// Thaws, resumes or starts again everything held; the first error is returned after
    /// all were tried.
    pub fn release(mut self) -> Result<(), BackupError> {
        self.hooks.release_all(&mut self.held)
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let _ = self.hooks.release_all(&mut self.held);
    }
}

fn remove_all(paths: &[PathBuf]) {
    for p in paths {
        let r = if p.is_dir() {
            remove_tree_if_exists(p)
        } else {
            remove_file_if_exists(p).map(|_| ())
        };
        if let Err(e) = r {
            warn!(path = %p.display(), error = %e, "could not remove a consistency clone");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_clone_with_a_mount_inside_is_left_and_the_mounted_files_survive() {
        let t = tempfile::tempdir().expect("tmp");
        let data = t.path().join("data");
        fs::create_dir(&data).expect("data");
        let clone = clone_path(&data, 999_999).expect("clone path");
        let mnt = clone.join("mnt");
        fs::create_dir_all(&mnt).expect("clone dir");
        std::thread::spawn(move || {
            // This thread alone: the mounts made below vanish with it, never reach the host.
            let unshared = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS);
            if let Err(e) = unshared {
                eprintln!("SKIP a_stale_clone_with_a_mount_inside: unshare: {e}");
                return;
            }
            rustix::mount::mount_change(
                "/",
                rustix::mount::MountPropagationFlags::PRIVATE
                    | rustix::mount::MountPropagationFlags::REC,
            )
            .expect("make mounts private");
            rustix::mount::mount(
                "stead-test",
                &mnt,
                "tmpfs",
                rustix::mount::MountFlags::empty(),
                None,
            )
            .expect("mount tmpfs");
            fs::write(mnt.join("file"), b"not ours").expect("write into tmpfs");
            remove_stale_clones(&data);
            assert_eq!(
                fs::read(mnt.join("file")).expect("the mounted file survives"),
                b"not ours"
            );
            rustix::mount::unmount(&mnt, rustix::mount::UnmountFlags::empty()).expect("umount");
        })
        .join()
        .expect("test thread");
    }

    #[test]
    fn a_loader_refreshes_the_users_of_a_volume() {
        use stead_schema::{Metadata, Origin};
        let t = tempfile::tempdir().expect("tmp");
        let env = HostEnv {
            state_dir: t.path().join("state"),
            run_dir: t.path().join("run"),
            cgroup_parent: "stead-unit".into(),
            netns: None,
            self_exe: PathBuf::from("/bin/true"),
            fence_file: None,
        };
        let Ok(h) = WorkloadHooks::new(&env, Arc::new(BTreeMap::new())) else {
            eprintln!("SKIP a_loader_refreshes_the_users_of_a_volume: no cgroup hierarchy");
            return;
        };
        let web = Resource {
            id: ResourceId::new(Kind::Container, "web"),
            metadata: Metadata {
                name: "web".parse().expect("name"),
                ..Default::default()
            },
            spec: Spec::from_value(
                Kind::Container,
                serde_json::json!({"rootfs": {"template": "/t.tar"}, "mounts": [{"volume": "data", "path": "/data"}]}),
            )
            .expect("spec"),
            origin: Origin::default(),
        };
        let h = h.with_loader(Arc::new(move || {
            Some(BTreeMap::from([(web.id.clone(), web.clone())]))
        }));
        assert!(h.workloads_of("Volume/data").is_empty(), "not loaded yet");
        h.refresh();
        assert_eq!(
            h.workloads_of("Volume/data"),
            [ResourceId::new(Kind::Container, "web")]
        );
        assert!(h.workloads_of("Volume/other").is_empty());
    }

    #[test]
    fn clone_names_carry_the_pid() {
        assert_eq!(
            clone_path(Path::new("/p/images/a.raw"), 42),
            Some(PathBuf::from("/p/images/.a.raw.stead-backup-42"))
        );
    }

    #[test]
    fn stale_clones_of_dead_processes_are_removed() {
        let tmp = tempfile::tempdir().expect("tmp");
        let f = tmp.path().join("disk.raw");
        fs::write(&f, b"x").expect("write");
        // pid 0x7ffffffe cannot exist (above pid_max); a live backup holds its clone's lock.
        let dead = clone_path(&f, 0x7fff_fffe).expect("path");
        let live = clone_path(&f, std::process::id()).expect("path");
        fs::write(&dead, b"x").expect("write");
        fs::write(&live, b"x").expect("write");
        let held = File::open(&live).expect("open");
        held.try_lock().expect("lock");
        remove_stale_clones(&f);
        assert!(!dead.exists());
        assert!(live.exists());
        assert!(f.exists());
    }

    #[test]
    fn a_clone_whose_pid_was_reused_by_a_live_process_is_stale() {
        let tmp = tempfile::tempdir().expect("tmp");
        let f = tmp.path().join("disk.raw");
        fs::write(&f, b"x").expect("write");
        // A killed backup's clone; its pid now belongs to an unrelated live process.
        let mut unrelated = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let file_clone = clone_path(&f, unrelated.id()).expect("path");
        fs::write(&file_clone, b"x").expect("write");
        let d = tmp.path().join("rootfs");
        fs::create_dir(&d).expect("mkdir");
        let dir_clone = clone_path(&d, unrelated.id()).expect("path");
        fs::create_dir(&dir_clone).expect("mkdir");
        fs::write(dir_clone.join("etc"), b"x").expect("write");
        remove_stale_clones(&f);
        remove_stale_clones(&d);
        let _ = unrelated.kill();
        let _ = unrelated.wait();
        assert!(!file_clone.exists(), "file clone removed");
        assert!(!dir_clone.exists(), "dir clone removed");
    }
}
