//! Cgroups, v1 and v2 behind one interface: the [`CgroupManager`] trait, with a backend per
//! version ([`v1::V1`], [`v2::V2`]), and the handles callers use ([`Hierarchy`], [`Cgroup`]).
//!
//! Every backend works below a cgroupfs root it is given ([`crate::SysFs::cgroup_root`] on a real host,
//! a temp dir in tests). The hierarchy is detected at run time ([`Hierarchy::detect_at`]):
//! - **v2** when the root is a cgroup2 mount with a `cgroup.controllers` file; the
//!   controllers `cpu memory pids` are enabled in `cgroup.subtree_control` of every
//!   ancestor stead creates;
//! - **v1** otherwise: each controller stead uses (`cpu`, `cpuacct`, `memory`, `pids`,
//!   `freezer`, `devices`) is found in the mount table below the root (so both split `cpu` /
//!   `cpuacct` mounts and the combined `cpu,cpuacct` mount work). A v1 hybrid host's empty
//!   cgroup2 mount is ignored.
//!
//! A container's cgroup is `<parent>/<name>` in every hierarchy (the parent may be nested,
//! e.g. `stead-test-123/x`). Removing a cgroup also removes the parents when they are empty
//! (`rmdir` fails with `EBUSY` while another container lives there, which stops the walk).

pub mod v1;
pub mod v2;

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::mounts::MountTable;

/// CFS period used for CPU quotas (µs).
const CFS_PERIOD_US: u64 = 100_000;

/// An error of the cgroup layer.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A cgroupfs read or write failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The host lacks what is needed (a controller not mounted or not enabled, no cgroup BPF).
    #[error("{0}")]
    Unsupported(String),
    /// Processes are still in a cgroup that is to be removed.
    #[error("processes {} in {}", join_pids(.pids), .dir.display())]
    Populated {
        /// The cgroup directory.
        dir: PathBuf,
        /// The processes in it.
        pids: Vec<i32>,
    },
    /// Anything else (a cgroup that stays busy, a freeze that does not complete).
    #[error("{0}")]
    Other(String),
}

fn join_pids(pids: &[i32]) -> String {
    pids.iter()
        .map(i32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

impl CgroupError {
    /// Builds an [`CgroupError::Io`] with context.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        CgroupError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Loads a device filter into a cgroup2 directory: cgroup v2 has no `devices.allow`; the
/// filter is a BPF program, which the caller provides (the container room builds it).
pub trait DeviceProgram {
    /// Attaches a program allowing `allow` (v1 `devices.allow` lines) to the cgroup2
    /// directory `dir`, replacing one attached before.
    fn attach(&self, dir: &Path, allow: &[&str]) -> Result<(), CgroupError>;
}

/// Limits applied to a cgroup. `None` = unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Limits {
    /// CPU quota in cores.
    pub cpus: Option<f64>,
    /// Memory limit in bytes.
    pub memory: Option<u64>,
    /// Maximum number of tasks.
    pub pids: Option<u64>,
}

/// Usage counters of a cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Usage {
    /// CPU time consumed, in seconds.
    pub cpu_seconds: f64,
    /// Memory in use, in bytes.
    pub memory_bytes: u64,
    /// Number of tasks.
    pub pids: u64,
    /// OOM kills in this cgroup since creation (when the kernel reports it).
    pub oom_kills: u64,
}

/// The files of a cgroup's freezer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Freezer {
    /// The file written to freeze or thaw.
    pub control: PathBuf,
    /// The value that freezes.
    pub on: &'static str,
    /// The value that thaws.
    pub off: &'static str,
    /// The file that reports the state.
    pub state: PathBuf,
    /// The line of `state` that says "frozen".
    pub frozen: &'static str,
}

impl Freezer {
    fn reports_frozen(&self, state: &str) -> bool {
        state.lines().any(|l| l.trim() == self.frozen)
    }
}

/// One cgroup version's way of doing things, below its cgroupfs root. Paths `rel` are
/// relative to the root of every hierarchy (`parent/name`).
pub trait CgroupManager: fmt::Debug + Send + Sync {
    /// Whether this is the unified (v2) hierarchy.
    fn is_v2(&self) -> bool;
    /// The directory of `rel` in each hierarchy, with its controller (`""` on v2).
    fn dirs(&self, rel: &Path) -> Vec<(String, PathBuf)>;
    /// Creates `rel` and its parents (idempotent).
    fn create(&self, rel: &Path) -> Result<(), CgroupError>;
    /// Writes the limits (hot: no restart needed).
    fn set_limits(&self, rel: &Path, limits: &Limits) -> Result<(), CgroupError>;
    /// Reads the limits in force.
    fn limits(&self, rel: &Path) -> Result<Limits, CgroupError>;
    /// Reads the usage counters.
    fn usage(&self, rel: &Path) -> Result<Usage, CgroupError>;
    /// Denies every device, then allows `allow` (v1 `devices.allow` lines); v2 loads
    /// `program` for that.
    fn restrict_devices(
        &self,
        rel: &Path,
        allow: &[&str],
        program: &dyn DeviceProgram,
    ) -> Result<(), CgroupError>;
    /// The v1 `devices.list` (None on v2 or without the controller).
    fn devices_list(&self, rel: &Path) -> Option<String>;
    /// The freezer files of `rel`.
    fn freezer(&self, rel: &Path) -> Result<Freezer, CgroupError>;
    /// One round of killing every process in `rel` (`first`: the first round).
    fn kill_round(&self, rel: &Path, first: bool) -> Result<(), CgroupError>;

    /// The directory of `rel` in the hierarchy of `controller` (v2: the only one).
    fn dir(&self, rel: &Path, controller: &str) -> Option<PathBuf> {
        self.dirs(rel)
            .into_iter()
            .find(|(c, _)| c.is_empty() || c == controller)
            .map(|(_, d)| d)
    }

    /// The directory that lists `rel`'s processes (memory hierarchy on v1).
    fn procs_dir(&self, rel: &Path) -> Option<PathBuf> {
        self.dir(rel, "memory")
    }
}

/// The cgroup hierarchy of a host: a shared handle on its [`CgroupManager`].
#[derive(Debug, Clone)]
pub struct Hierarchy {
    manager: Arc<dyn CgroupManager>,
}

impl Hierarchy {
    /// Detects the hierarchy of this host, below the host's `SysFs::cgroup_root`.
    pub fn detect() -> Result<Self, CgroupError> {
        Self::detect_at(&crate::SysFs::host().cgroup_root())
    }

    /// Detects the hierarchy mounted below `root`, reading this thread's mount table.
    pub fn detect_at(root: &Path) -> Result<Self, CgroupError> {
        if v2::is_unified_root(root) {
            return Ok(Self::v2(root));
        }
        let table = MountTable::read()
            .map_err(|e| CgroupError::io(format!("{} {}", e.op, e.path.display()), e.source))?;
        Self::detect_in(root, &table)
    }

    /// Detects the hierarchy below `root` from the mount table `table` (v2 still needs
    /// `root` to hold `cgroup.controllers`).
    pub fn detect_in(root: &Path, table: &MountTable) -> Result<Self, CgroupError> {
        if v2::is_unified_root(root) {
            return Ok(Self::v2(root));
        }
        Ok(Self::with(v1::V1::from_mounts(root, table)?))
    }

    /// The unified hierarchy mounted at `root`.
    pub fn v2(root: impl Into<PathBuf>) -> Self {
        Self::with(v2::V2::new(root))
    }

    /// Legacy hierarchies: `(controller, mount point)` for each controller used.
    pub fn v1(mounts: Vec<(String, PathBuf)>) -> Self {
        Self::with(v1::V1::new(mounts))
    }

    /// A hierarchy handled by `manager`.
    pub fn with(manager: impl CgroupManager + 'static) -> Self {
        Self {
            manager: Arc::new(manager),
        }
    }

    /// The backend.
    pub fn manager(&self) -> &dyn CgroupManager {
        &*self.manager
    }

    /// Whether this is the unified hierarchy.
    pub fn is_v2(&self) -> bool {
        self.manager.is_v2()
    }

    /// The cgroup `<parent>/<name>` in this hierarchy (not created).
    pub fn cgroup(&self, parent: &str, name: &str) -> Cgroup {
        let parent = parent.trim_matches('/');
        Cgroup {
            manager: self.manager.clone(),
            parent: PathBuf::from(parent),
            rel: Path::new(parent).join(name),
        }
    }

    /// The cgroup parent `parent` itself, as a cgroup (for its usage; not created).
    pub fn parent(&self, parent: &str) -> Cgroup {
        let rel = PathBuf::from(parent.trim_matches('/'));
        Cgroup {
            manager: self.manager.clone(),
            parent: rel.parent().map(Path::to_path_buf).unwrap_or_default(),
            rel,
        }
    }

    /// Removes the cgroup parent `parent` with everything below it, children first, in
    /// every hierarchy. Processes are not killed: a hierarchy whose parent still holds
    /// processes is left alone and reported. Returns what could not be removed (one error
    /// per hierarchy directory; empty when all is gone).
    #[tracing::instrument(level = "debug", skip(self))]
    pub fn remove_parent(&self, parent: &str) -> Vec<CgroupError> {
        let rel = Path::new(parent.trim_matches('/'));
        let mut seen = Vec::new();
        let mut problems = Vec::new();
        for (_, dir) in self.manager.dirs(rel) {
            if seen.contains(&dir) || !dir.is_dir() {
                continue;
            }
            seen.push(dir.clone());
            let pids = read_pids(&dir);
            if !pids.is_empty() {
                problems.push(CgroupError::Populated { dir, pids });
                continue;
            }
            if let Err(e) = remove_tree(&dir) {
                problems.push(CgroupError::io(format!("cgroup {}", dir.display()), e));
            }
        }
        problems
    }
}

/// Removes the cgroup directory `dir` and the cgroups below it, children first (a cgroup
/// directory holds only control files, which `rmdir` takes along).
fn remove_tree(dir: &Path) -> io::Result<()> {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path())?;
            }
        }
    }
    fs::remove_dir(dir)
}

/// One cgroup (`<parent>/<name>`) in every hierarchy stead uses.
#[derive(Debug, Clone)]
pub struct Cgroup {
    manager: Arc<dyn CgroupManager>,
    parent: PathBuf,
    rel: PathBuf,
}

impl Cgroup {
    /// Path relative to the hierarchy root(s).
    pub fn relative(&self) -> &Path {
        &self.rel
    }

    /// The cgroup's directory in every hierarchy (each holds a `cgroup.procs` that `exec`
    /// joins).
    pub fn procs_dirs(&self) -> Vec<PathBuf> {
        self.manager
            .dirs(&self.rel)
            .into_iter()
            .map(|(_, d)| d)
            .collect()
    }

    /// The `cgroup.procs` file of every hierarchy: writing a pid there moves it in.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.procs_dirs()
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// The files a single-threaded process writes `0` to so as to move itself into the
    /// cgroup without the kernel's global threadgroup lock: each v1 hierarchy's `tasks`.
    ///
    /// Moving a whole process (`cgroup.procs`) write-locks `cgroup_threadgroup_rwsem`,
    /// and the first writer after a quiet spell waits a full RCU grace period (5–15 ms
    /// here). Moving one thread that is the caller itself (`0` written to `tasks`) takes
    /// no such lock; for a single-threaded process that thread is the whole process.
    /// `None` on v2, where every write to `cgroup.procs` takes the lock (a v2 process is
    /// best started inside its cgroup, `CLONE_INTO_CGROUP`).
    pub fn self_join_files(&self) -> Option<Vec<PathBuf>> {
        (!self.manager.is_v2()).then(|| {
            self.procs_dirs()
                .into_iter()
                .map(|d| d.join("tasks"))
                .collect()
        })
    }

    /// Whether the cgroup exists (in the memory or unified hierarchy).
    pub fn exists(&self) -> bool {
        self.manager
            .procs_dir(&self.rel)
            .is_some_and(|d| d.is_dir())
    }

    /// Creates the cgroup and its parents (idempotent). On v2 enables the controllers in
    /// every ancestor's `cgroup.subtree_control` below the root.
    #[tracing::instrument(level = "debug", skip_all, fields(cgroup = %self.rel.display()))]
    pub fn create(&self) -> Result<(), CgroupError> {
        self.manager.create(&self.rel)
    }

    /// Denies every device to the cgroup's processes, then allows `allow` (lines as in
    /// v1 `devices.allow`): v1 through the `devices` controller, v2 through the eBPF
    /// device program that `program` loads (cgroup2 has no `devices.allow`). A container
    /// never runs unfiltered: a host with no way to filter (v1 without the `devices`
    /// controller mounted, v2 without cgroup BPF) is an `Unsupported` error, any other
    /// failure an error too.
    pub fn restrict_devices(
        &self,
        allow: &[&str],
        program: &dyn DeviceProgram,
    ) -> Result<(), CgroupError> {
        self.manager.restrict_devices(&self.rel, allow, program)
    }

    /// The v1 `devices.list` of the cgroup (None on v2 or without the controller).
    pub fn devices_list(&self) -> Option<String> {
        self.manager.devices_list(&self.rel)
    }

    /// Writes the limits (hot: no restart needed).
    pub fn set_limits(&self, l: &Limits) -> Result<(), CgroupError> {
        self.manager.set_limits(&self.rel, l)
    }

    /// [`Cgroup::limits`], or `None` when the cgroup is gone (also when it goes while
    /// being read: a supervisor removes it as its container exits). On v1 the
    /// hierarchies are removed one after another, so a file is missing as soon as the
    /// directory of *any* hierarchy is gone, while [`Cgroup::exists`] (the memory
    /// hierarchy) may still say yes.
    pub fn limits_if_present(&self) -> Result<Option<Limits>, CgroupError> {
        match self.limits() {
            Ok(l) => Ok(Some(l)),
            Err(CgroupError::Io { source, .. }) if self.removed_while_read(&source) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether reading one of the cgroup's files failed because the cgroup is being
    /// removed: `ENODEV` (kernfs deactivated the file between its open and the read) comes
    /// only from that; a missing file (`ENOENT`) only when a hierarchy's directory is gone
    /// too (a file missing from a complete cgroup is an error).
    fn removed_while_read(&self, e: &io::Error) -> bool {
        e.raw_os_error() == Some(libc::ENODEV)
            || (e.kind() == io::ErrorKind::NotFound && !self.complete())
    }

    /// Whether the cgroup's directory exists in every hierarchy.
    fn complete(&self) -> bool {
        self.procs_dirs().iter().all(|d| d.is_dir())
    }

    /// Reads the limits currently in force.
    pub fn limits(&self) -> Result<Limits, CgroupError> {
        self.manager.limits(&self.rel)
    }

    /// Moves `pid` into the cgroup (every hierarchy).
    pub fn add_pid(&self, pid: i32) -> Result<(), CgroupError> {
        for f in self.procs_files() {
            write_file(&f, &pid.to_string())?;
        }
        Ok(())
    }

    /// Moves the calling process into the cgroup. A single-threaded caller on v1 moves its
    /// one thread (`0` into each `tasks`, no RCU grace period: see
    /// [`Cgroup::self_join_files`]); any other caller moves by pid.
    pub fn add_self(&self) -> Result<(), CgroupError> {
        if let Some(files) = self.self_join_files()
            && single_threaded()
        {
            for f in files {
                write_file(&f, "0")?;
            }
            return Ok(());
        }
        self.add_pid(std::process::id() as i32)
    }

    /// Process ids in the cgroup (memory or unified hierarchy); empty when absent.
    pub fn pids(&self) -> Vec<i32> {
        self.manager
            .procs_dir(&self.rel)
            .map(|d| read_pids(&d))
            .unwrap_or_default()
    }

    /// Usage counters.
    pub fn usage(&self) -> Result<Usage, CgroupError> {
        self.manager.usage(&self.rel)
    }

    /// Freezes every process of the cgroup (v1 `freezer.state = FROZEN`, v2
    /// `cgroup.freeze = 1`) and waits until the kernel reports the cgroup frozen: then no
    /// process of it runs or writes until [`Cgroup::thaw`]. If the freeze does not complete
    /// within `timeout` (e.g. a task stuck in an uninterruptible wait), the cgroup is thawed
    /// again and an error returned.
    pub fn freeze(&self, timeout: Duration) -> Result<(), CgroupError> {
        let f = self.manager.freezer(&self.rel)?;
        write_file(&f.control, f.on)?;
        let t = Instant::now();
        loop {
            let st = fs::read_to_string(&f.state)
                .map_err(io_err(format!("read {}", f.state.display())))?;
            if f.reports_frozen(&st) {
                return Ok(());
            }
            if t.elapsed() > timeout {
                let _ = self.thaw();
                return Err(CgroupError::Other(format!(
                    "cgroup {} did not freeze within {timeout:?}",
                    self.rel.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Lets the processes of a frozen cgroup run again. Idempotent.
    pub fn thaw(&self) -> Result<(), CgroupError> {
        let f = self.manager.freezer(&self.rel)?;
        write_file(&f.control, f.off)
    }

    /// Whether the cgroup is frozen (or freezing).
    pub fn is_frozen(&self) -> bool {
        match self.manager.freezer(&self.rel) {
            Ok(f) => fs::read_to_string(&f.control).is_ok_and(|s| {
                let s = s.trim();
                s == f.on || s == "FREEZING"
            }),
            Err(_) => false,
        }
    }

    /// Kills every process in the cgroup and waits (up to 5 s) until it is empty.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        if !self.exists() {
            return Ok(());
        }
        for round in 0..500 {
            if self.pids().is_empty() {
                return Ok(());
            }
            self.manager.kill_round(&self.rel, round == 0)?;
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(CgroupError::Other(format!(
            "cgroup {} still has processes after SIGKILL",
            self.rel.display()
        )))
    }

    /// Kills everything, removes the cgroup, then the parents that are empty. Idempotent.
    #[tracing::instrument(level = "debug", skip_all, fields(cgroup = %self.rel.display()))]
    pub fn destroy(&self) -> Result<(), CgroupError> {
        self.kill_all()?;
        for dir in self.procs_dirs() {
            rmdir_retry(&dir)?;
            // Parents stead created: remove while empty (EBUSY = still used, stop there).
            let mut p = dir.parent().map(Path::to_path_buf);
            for _ in self.parent.components() {
                let Some(cur) = p else { break };
                match fs::remove_dir(&cur) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(_) => break,
                }
                p = cur.parent().map(Path::to_path_buf);
            }
        }
        Ok(())
    }
}

/// The CPU limit as the kernel will report it back (quota granularity, 3 decimals).
pub fn normalize_cpus(cpus: f64) -> f64 {
    round_cpus(quota_us(cpus) as f64 / CFS_PERIOD_US as f64)
}

/// The memory limit as the kernel will report it back (rounded down to whole pages).
pub fn normalize_memory(bytes: u64) -> u64 {
    let page = 4096;
    (bytes / page * page).max(page)
}

fn quota_us(cpus: f64) -> u64 {
    // The kernel refuses quotas under 1 ms.
    ((cpus * CFS_PERIOD_US as f64).round() as u64).max(1000)
}

fn round_cpus(c: f64) -> f64 {
    (c * 1000.0).round() / 1000.0
}

/// The value of `key` in a `key value` per line text (`cpu.stat`, `memory.events`).
fn kv(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> CgroupError {
    let context = context.into();
    move |e| CgroupError::io(context, e)
}

/// Whether the calling process has one thread (`/proc/self/task` has one entry); false
/// when that cannot be read.
fn single_threaded() -> bool {
    fs::read_dir("/proc/self/task").is_ok_and(|d| d.take(2).count() == 1)
}

fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(io_err(format!("write {value:?} to {}", path.display())))
}

fn read_trim(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(io_err(format!("read {}", path.display())))
}

/// Contents of a file, trimmed; empty when unreadable.
fn read_opt(path: &Path) -> String {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The pids listed in `dir`'s `cgroup.procs`; empty when unreadable.
fn read_pids(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// SIGKILL to every pid (a pid gone meanwhile is fine).
fn kill_pids(pids: &[i32]) {
    for p in pids {
        let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
    }
}

fn rmdir_retry(d: &Path) -> Result<(), CgroupError> {
    for _ in 0..100 {
        match fs::remove_dir(d) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            // Tasks that were just killed can keep the cgroup busy for a moment.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(CgroupError::io(format!("rmdir {}", d.display()), e)),
        }
    }
    Err(CgroupError::Other(format!(
        "cgroup {} stays busy",
        d.display()
    )))
}

#[cfg(test)]
mod tests;
