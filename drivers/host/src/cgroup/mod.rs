//! Cgroups for containers, v1 and v2 behind one interface.
//!
//! The hierarchy is detected at run time ([`Hierarchy::detect`]):
//! - **v2** when `/sys/fs/cgroup` is a cgroup2 mount with a `cgroup.controllers` file; the
//!   controllers `cpu memory pids` are enabled in `cgroup.subtree_control` of every
//!   ancestor stead creates;
//! - **v1** otherwise: each controller stead uses (`cpu`, `cpuacct`, `memory`, `pids`,
//!   `freezer`) is found in `/proc/self/mountinfo` (so both split `cpu` / `cpuacct` mounts and
//!   the combined `cpu,cpuacct` mount work). A v1 hybrid host's empty cgroup2 mount is ignored.
//!
//! A container's cgroup is `<parent>/<name>` in every hierarchy (the parent may be nested,
//! e.g. `stead-test-123/x`). Removing a cgroup also removes the parents when they are empty
//! (`rmdir` fails with `EBUSY` while another container lives there, which stops the walk).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

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
    /// Anything else (a cgroup that stays busy or populated, a freeze that does not complete).
    #[error("{0}")]
    Other(String),
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

/// v1 controllers stead uses. `freezer` makes kill-all atomic against forking processes.
const V1_CONTROLLERS: [&str; 6] = ["cpu", "cpuacct", "memory", "pids", "freezer", "devices"];

/// v2 controllers enabled in the parents' `cgroup.subtree_control`.
const V2_CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];
/// CFS period used for CPU quotas (µs).
const CFS_PERIOD_US: u64 = 100_000;

/// Limits applied to a container cgroup. `None` = unlimited.
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

/// The cgroup hierarchy of this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// Unified hierarchy mounted at `root`.
    V2 {
        /// Mount point (normally `/sys/fs/cgroup`).
        root: PathBuf,
    },
    /// Legacy hierarchies: controller name → mount point.
    V1 {
        /// `(controller, mount point)` for each controller stead uses.
        mounts: Vec<(String, PathBuf)>,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> CgroupError {
    let context = context.into();
    move |e| CgroupError::io(context, e)
}

impl Hierarchy {
    /// Detects the hierarchy of this host.
    pub fn detect() -> Result<Self, CgroupError> {
        let root = Path::new("/sys/fs/cgroup");
        if root.join("cgroup.controllers").exists() {
            return Ok(Hierarchy::V2 {
                root: root.to_path_buf(),
            });
        }
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .map_err(io_err("read /proc/self/mountinfo"))?;
        let mounts = parse_v1_mounts(&mountinfo);
        for c in ["cpu", "memory", "pids"] {
            if !mounts.iter().any(|(n, _)| n == c) {
                return Err(CgroupError::Unsupported(format!(
                    "cgroup v1 controller {c} is not mounted and /sys/fs/cgroup is not cgroup2"
                )));
            }
        }
        Ok(Hierarchy::V1 { mounts })
    }

    /// Whether this is the unified hierarchy.
    pub fn is_v2(&self) -> bool {
        matches!(self, Hierarchy::V2 { .. })
    }

    /// The cgroup `<parent>/<name>` in this hierarchy (not created).
    pub fn cgroup(&self, parent: &str, name: &str) -> Cgroup {
        let parent = parent.trim_matches('/');
        Cgroup {
            hier: self.clone(),
            parent: PathBuf::from(parent),
            rel: Path::new(parent).join(name),
        }
    }

    fn dirs(&self, rel: &Path) -> Vec<(String, PathBuf)> {
        match self {
            Hierarchy::V2 { root } => vec![(String::new(), root.join(rel))],
            Hierarchy::V1 { mounts } => mounts
                .iter()
                .map(|(c, m)| (c.clone(), m.join(rel)))
                .collect(),
        }
    }
}

/// Extracts the mount points of the v1 controllers stead uses from a mountinfo text.
fn parse_v1_mounts(mountinfo: &str) -> Vec<(String, PathBuf)> {
    let mut out: Vec<(String, PathBuf)> = Vec::new();
    // Only mounts of a hierarchy's root (a bind of a sub-cgroup has another root).
    for m in crate::mounts::parse_mountinfo(mountinfo)
        .into_iter()
        .filter(|m| m.fstype == "cgroup" && m.root == Path::new("/"))
    {
        for opt in m.super_options.split(',') {
            if V1_CONTROLLERS.contains(&opt) && !out.iter().any(|(c, _)| c == opt) {
                out.push((opt.to_string(), m.mount_point.clone()));
            }
        }
    }
    out
}

/// One container cgroup (`<parent>/<name>`) in every hierarchy stead uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    hier: Hierarchy,
    parent: PathBuf,
    rel: PathBuf,
}

fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(io_err(format!("write {value:?} to {}", path.display())))
}

fn read_trim(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(io_err(format!("read {}", path.display())))
}

impl Cgroup {
    /// Path relative to the hierarchy root(s).
    pub fn relative(&self) -> &Path {
        &self.rel
    }

    /// Directory in the memory (v1) or unified (v2) hierarchy — the one holding `cgroup.procs`
    /// that `exec` joins.
    pub fn procs_dirs(&self) -> Vec<PathBuf> {
        self.hier
            .dirs(&self.rel)
            .into_iter()
            .map(|(_, d)| d)
            .collect()
    }

    fn dir(&self, controller: &str) -> Option<PathBuf> {
        self.hier
            .dirs(&self.rel)
            .into_iter()
            .find(|(c, _)| c.is_empty() || c == controller)
            .map(|(_, d)| d)
    }

    /// Whether the cgroup exists (in the memory or unified hierarchy).
    pub fn exists(&self) -> bool {
        self.dir("memory").is_some_and(|d| d.is_dir())
    }

    /// Creates the cgroup and its parents (idempotent). On v2 enables the controllers in
    /// every ancestor's `cgroup.subtree_control` below the root.
    pub fn create(&self) -> Result<(), CgroupError> {
        match &self.hier {
            Hierarchy::V2 { root } => {
                let mut cur = root.clone();
                for comp in self.rel.components() {
                    enable_v2_controllers(&cur)?;
                    cur.push(comp);
                    mkdir(&cur)?;
                }
            }
            Hierarchy::V1 { .. } => {
                for (ctrl, dir) in self.hier.dirs(&self.rel) {
                    create_all(&dir)?;
                    if ctrl == "cpuset" {
                        copy_cpuset(&dir)?;
                    }
                    if ctrl == "memory" {
                        // Children account into their parent (default on new kernels).
                        let _ = fs::write(dir.join("memory.use_hierarchy"), "1");
                    }
                }
            }
        }
        Ok(())
    }

    /// Denies every device to the cgroup's processes, then allows `allow` (lines as in
    /// v1 `devices.allow`): v1 through the `devices` controller, v2 through an eBPF
    /// device program that `program` loads (cgroup2 has no `devices.allow`). A container
    /// never runs unfiltered: a host with no way to filter (v1 without the `devices`
    /// controller mounted, v2 without cgroup BPF) is an `Unsupported` error, any other
    /// failure an error too.
    pub fn restrict_devices(
        &self,
        allow: &[&str],
        program: &dyn DeviceProgram,
    ) -> Result<(), CgroupError> {
        if let Hierarchy::V2 { root } = &self.hier {
            return match program.attach(&root.join(&self.rel), allow) {
                Ok(()) => Ok(()),
                // No BPF here (kernel without CONFIG_CGROUP_BPF, or a sandbox that forbids
                // bpf(2)): nothing can filter device access.
                Err(CgroupError::Io { source, .. })
                    if matches!(
                        source.raw_os_error(),
                        Some(libc::ENOSYS | libc::EPERM | libc::EOPNOTSUPP)
                    ) =>
                {
                    Err(CgroupError::Unsupported(format!(
                        "cgroup v2 device filter: the kernel refused a cgroup BPF program \
                         ({source}); containers are not started without a device filter"
                    )))
                }
                Err(e) => Err(e),
            };
        }
        let Some(d) = self.dir("devices") else {
            return Err(CgroupError::Unsupported(
                "the cgroup v1 devices controller is not mounted: containers are not started \
                 without a device filter (mount it at /sys/fs/cgroup/devices)"
                    .into(),
            ));
        };
        let filter_err = |e: CgroupError| {
            CgroupError::Other(format!("device filter of {}: {e}", self.rel.display()))
        };
        write_file(&d.join("devices.deny"), "a").map_err(filter_err)?;
        for a in allow {
            write_file(&d.join("devices.allow"), a).map_err(filter_err)?;
        }
        Ok(())
    }

    /// The v1 `devices.list` of the cgroup (None on v2 or without the controller).
    pub fn devices_list(&self) -> Option<String> {
        if self.hier.is_v2() {
            return None;
        }
        fs::read_to_string(self.dir("devices")?.join("devices.list")).ok()
    }

    /// Writes the limits (hot: no restart needed).
    pub fn set_limits(&self, l: &Limits) -> Result<(), CgroupError> {
        match &self.hier {
            Hierarchy::V2 { root } => {
                let d = root.join(&self.rel);
                let cpu = l.cpus.map(|c| format!("{} {CFS_PERIOD_US}", quota_us(c)));
                write_v2(&d, "cpu.max", cpu, &format!("max {CFS_PERIOD_US}"))?;
                write_v2(&d, "memory.max", l.memory.map(|m| m.to_string()), "max")?;
                if d.join("memory.swap.max").exists() {
                    // Like the v1 memsw limit: the memory limit is not bypassed by swap.
                    let swap = if l.memory.is_some() { "0" } else { "max" };
                    write_file(&d.join("memory.swap.max"), swap)?;
                }
                write_v2(&d, "pids.max", l.pids.map(|p| p.to_string()), "max")?;
            }
            Hierarchy::V1 { .. } => {
                if let Some(d) = self.dir("cpu") {
                    write_file(&d.join("cpu.cfs_period_us"), &CFS_PERIOD_US.to_string())?;
                    let q = l.cpus.map_or("-1".to_string(), |c| quota_us(c).to_string());
                    write_file(&d.join("cpu.cfs_quota_us"), &q)?;
                }
                if let Some(d) = self.dir("memory") {
                    set_v1_memory(&d, l.memory)?;
                }
                if let Some(d) = self.dir("pids") {
                    let p = l.pids.map_or("max".to_string(), |p| p.to_string());
                    write_file(&d.join("pids.max"), &p)?;
                }
            }
        }
        Ok(())
    }

    /// [`Cgroup::limits`], or `None` when the cgroup is gone (also when it goes while
    /// being read: a supervisor removes it as its container exits).
    pub fn limits_if_present(&self) -> Result<Option<Limits>, CgroupError> {
        match self.limits() {
            Ok(l) => Ok(Some(l)),
            Err(CgroupError::Io { source, .. })
                if source.kind() == io::ErrorKind::NotFound && !self.exists() =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Reads the limits currently in force.
    pub fn limits(&self) -> Result<Limits, CgroupError> {
        let mut l = Limits::default();
        match &self.hier {
            Hierarchy::V2 { root } => {
                let d = root.join(&self.rel);
                let cpu = read_opt(&d.join("cpu.max"));
                let mut it = cpu.split_whitespace();
                if let (Some(q), Some(p)) = (it.next(), it.next())
                    && let (Ok(q), Ok(p)) = (q.parse::<u64>(), p.parse::<u64>())
                    && p > 0
                {
                    l.cpus = Some(round_cpus(q as f64 / p as f64));
                }
                l.memory = read_opt(&d.join("memory.max")).parse().ok();
                l.pids = read_opt(&d.join("pids.max")).parse().ok();
            }
            Hierarchy::V1 { .. } => {
                if let Some(d) = self.dir("cpu") {
                    let q: i64 = read_trim(&d.join("cpu.cfs_quota_us"))?
                        .parse()
                        .unwrap_or(-1);
                    let p: i64 = read_trim(&d.join("cpu.cfs_period_us"))?
                        .parse()
                        .unwrap_or(0);
                    if q > 0 && p > 0 {
                        l.cpus = Some(round_cpus(q as f64 / p as f64));
                    }
                }
                if let Some(d) = self.dir("memory") {
                    let m: u64 = read_trim(&d.join("memory.limit_in_bytes"))?
                        .parse()
                        .unwrap_or(u64::MAX);
                    // "Unlimited" reads as a huge page-aligned number.
                    l.memory = (m < (1u64 << 62)).then_some(m);
                }
                if let Some(d) = self.dir("pids") {
                    l.pids = read_trim(&d.join("pids.max"))?.parse().ok();
                }
            }
        }
        Ok(l)
    }

    /// Moves `pid` into the cgroup (every hierarchy).
    pub fn add_pid(&self, pid: i32) -> Result<(), CgroupError> {
        for d in self.procs_dirs() {
            write_file(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Process ids in the cgroup (memory or unified hierarchy); empty when absent.
    pub fn pids(&self) -> Vec<i32> {
        let Some(d) = self.dir("memory") else {
            return Vec::new();
        };
        fs::read_to_string(d.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Usage counters.
    pub fn usage(&self) -> Result<Usage, CgroupError> {
        let mut u = Usage::default();
        match &self.hier {
            Hierarchy::V2 { root } => {
                let d = root.join(&self.rel);
                let stat = read_trim(&d.join("cpu.stat"))?;
                u.cpu_seconds = kv(&stat, "usage_usec") as f64 / 1e6;
                u.memory_bytes = read_opt(&d.join("memory.current")).parse().unwrap_or(0);
                u.pids = read_opt(&d.join("pids.current")).parse().unwrap_or(0);
                u.oom_kills = kv(
                    &fs::read_to_string(d.join("memory.events")).unwrap_or_default(),
                    "oom_kill",
                );
            }
            Hierarchy::V1 { .. } => {
                if let Some(d) = self.dir("cpuacct") {
                    let ns: u64 = read_trim(&d.join("cpuacct.usage"))?.parse().unwrap_or(0);
                    u.cpu_seconds = ns as f64 / 1e9;
                }
                if let Some(d) = self.dir("memory") {
                    u.memory_bytes = read_trim(&d.join("memory.usage_in_bytes"))?
                        .parse()
                        .unwrap_or(0);
                    u.oom_kills = kv(
                        &fs::read_to_string(d.join("memory.oom_control")).unwrap_or_default(),
                        "oom_kill",
                    );
                }
                if let Some(d) = self.dir("pids") {
                    u.pids = read_trim(&d.join("pids.current"))?.parse().unwrap_or(0);
                }
            }
        }
        Ok(u)
    }

    /// Freezes every process of the cgroup (v1 `freezer.state = FROZEN`, v2
    /// `cgroup.freeze = 1`) and waits until the kernel reports the cgroup frozen: then no
    /// process of it runs or writes until [`Cgroup::thaw`]. If the freeze does not complete
    /// within `timeout` (e.g. a task stuck in an uninterruptible wait), the cgroup is thawed
    /// again and an error returned.
    pub fn freeze(&self, timeout: Duration) -> Result<(), CgroupError> {
        let (file, on, state_file, frozen) = self.freezer_files()?;
        write_file(&file, on)?;
        let t = Instant::now();
        loop {
            let st = fs::read_to_string(&state_file)
                .map_err(io_err(format!("read {}", state_file.display())))?;
            if frozen(&st) {
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
        let (file, _, _, _) = self.freezer_files()?;
        let off = if self.hier.is_v2() { "0" } else { "THAWED" };
        write_file(&file, off)
    }

    /// Whether the cgroup is frozen (or freezing).
    pub fn is_frozen(&self) -> bool {
        match self.freezer_files() {
            Ok((file, on, _, _)) => fs::read_to_string(file).is_ok_and(|s| {
                let s = s.trim();
                s == on || s == "FREEZING"
            }),
            Err(_) => false,
        }
    }

    /// (control file, value that freezes, file that reports the state, "is frozen" test).
    #[allow(clippy::type_complexity)]
    fn freezer_files(
        &self,
    ) -> Result<(PathBuf, &'static str, PathBuf, fn(&str) -> bool), CgroupError> {
        if self.hier.is_v2() {
            let d = self
                .dir("")
                .ok_or_else(|| CgroupError::Unsupported("no cgroup2 directory".into()))?;
            Ok(
                (d.join("cgroup.freeze"), "1", d.join("cgroup.events"), |s| {
                    s.lines().any(|l| l.trim() == "frozen 1")
                }),
            )
        } else {
            let d = self.dir("freezer").ok_or_else(|| {
                CgroupError::Unsupported("the cgroup v1 freezer controller is not mounted".into())
            })?;
            Ok((
                d.join("freezer.state"),
                "FROZEN",
                d.join("freezer.state"),
                |s| s.trim() == "FROZEN",
            ))
        }
    }

    /// Kills every process in the cgroup and waits (up to 5 s) until it is empty.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        if !self.exists() {
            return Ok(());
        }
        let kill_file = self.dir("").map(|d| d.join("cgroup.kill"));
        let freezer = self.dir("freezer").filter(|_| !self.hier.is_v2());
        for round in 0..500 {
            let pids = self.pids();
            if pids.is_empty() {
                return Ok(());
            }
            if round == 0
                && let Some(k) = kill_file.as_ref().filter(|_| self.hier.is_v2())
                && k.exists()
            {
                write_file(k, "1")?;
            } else {
                // v1: freeze so nothing forks between the read and the kills.
                let frozen = freezer
                    .as_ref()
                    .is_some_and(|f| fs::write(f.join("freezer.state"), "FROZEN").is_ok());
                for p in self.pids() {
                    let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                }
                if frozen && let Some(f) = &freezer {
                    let _ = fs::write(f.join("freezer.state"), "THAWED");
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(CgroupError::Other(format!(
            "cgroup {} still has processes after SIGKILL",
            self.rel.display()
        )))
    }

    /// Kills everything, removes the cgroup, then the parents that are empty. Idempotent.
    pub fn destroy(&self) -> Result<(), CgroupError> {
        self.kill_all()?;
        for (_, dir) in self.hier.dirs(&self.rel) {
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

fn kv(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

fn quota_us(cpus: f64) -> u64 {
    // The kernel refuses quotas under 1 ms.
    ((cpus * CFS_PERIOD_US as f64).round() as u64).max(1000)
}

fn round_cpus(c: f64) -> f64 {
    (c * 1000.0).round() / 1000.0
}

fn set_v1_memory(d: &Path, memory: Option<u64>) -> Result<(), CgroupError> {
    let limit = memory.map_or("-1".to_string(), |m| m.to_string());
    let memsw = d.join("memory.memsw.limit_in_bytes");
    let mem = d.join("memory.limit_in_bytes");
    if !memsw.exists() {
        return write_file(&mem, &limit);
    }
    // memsw must stay >= memory: raise memsw first when growing, memory first when shrinking.
    if fs::write(&mem, &limit).is_ok() {
        write_file(&memsw, &limit)
    } else {
        write_file(&memsw, &limit)?;
        write_file(&mem, &limit)
    }
}

/// Enables stead's controllers in `dir`'s `cgroup.subtree_control`, as far as `dir`
/// offers them (`cgroup.controllers`); a missing one surfaces when a limit needs it.
fn enable_v2_controllers(dir: &Path) -> Result<(), CgroupError> {
    let available = read_opt(&dir.join("cgroup.controllers"));
    let enabled = read_opt(&dir.join("cgroup.subtree_control"));
    let missing: Vec<String> = V2_CONTROLLERS
        .iter()
        .filter(|c| available.split_whitespace().any(|x| x == **c))
        .filter(|c| !enabled.split_whitespace().any(|x| x == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    write_file(&dir.join("cgroup.subtree_control"), &missing.join(" "))
}

/// Writes a v2 limit file. Unlimited and absent (controller not enabled) is fine; a limit
/// whose controller is missing is an error.
fn write_v2(
    dir: &Path,
    file: &str,
    value: Option<String>,
    unlimited: &str,
) -> Result<(), CgroupError> {
    let p = dir.join(file);
    if !p.exists() {
        return match value {
            None => Ok(()),
            Some(_) => Err(CgroupError::Unsupported(format!(
                "cgroup v2 controller for {file} is not enabled in {}",
                dir.display()
            ))),
        };
    }
    write_file(&p, value.as_deref().unwrap_or(unlimited))
}

/// Contents of a file, trimmed; empty when unreadable.
fn read_opt(path: &Path) -> String {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn mkdir(d: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(d) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(CgroupError::io(format!("mkdir {}", d.display()), e)),
    }
}

/// `create_dir_all` that tolerates a concurrent `destroy` removing an empty parent.
fn create_all(d: &Path) -> Result<(), CgroupError> {
    let mut last = None;
    for _ in 0..5 {
        match fs::create_dir_all(d) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => last = Some(e),
            Err(e) => return Err(CgroupError::io(format!("mkdir {}", d.display()), e)),
        }
    }
    Err(CgroupError::io(
        format!("mkdir {}", d.display()),
        last.unwrap_or_else(|| io::Error::from(io::ErrorKind::NotFound)),
    ))
}

/// A new v1 cpuset cgroup is unusable until cpus/mems are copied from its parent.
fn copy_cpuset(dir: &Path) -> Result<(), CgroupError> {
    for f in ["cpuset.cpus", "cpuset.mems"] {
        let mine = read_trim(&dir.join(f))?;
        if mine.is_empty()
            && let Some(p) = dir.parent()
        {
            if read_trim(&p.join(f))?.is_empty() {
                copy_cpuset(p)?;
            }
            write_file(&dir.join(f), &read_trim(&p.join(f))?)?;
        }
    }
    Ok(())
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
mod tests {
    use super::*;

    #[test]
    fn parses_split_and_combined_v1_mounts() {
        let mi = "\
30 25 0:26 / /sys/fs/cgroup/cpu rw,relatime shared:8 - cgroup cgroup rw,cpu
31 25 0:27 / /sys/fs/cgroup/cpuacct rw - cgroup cgroup rw,cpuacct
32 25 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
33 25 0:29 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
34 25 0:30 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
35 25 0:28 /sub /mnt/x rw - cgroup cgroup rw,memory
";
        let m = parse_v1_mounts(mi);
        assert_eq!(
            m,
            vec![
                ("cpu".into(), PathBuf::from("/sys/fs/cgroup/cpu")),
                ("cpuacct".into(), PathBuf::from("/sys/fs/cgroup/cpuacct")),
                ("memory".into(), PathBuf::from("/sys/fs/cgroup/memory")),
                ("pids".into(), PathBuf::from("/sys/fs/cgroup/pids")),
            ]
        );
        let combined =
            "30 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n";
        let m = parse_v1_mounts(combined);
        assert_eq!(m.len(), 2);
        assert!(
            m.iter()
                .all(|(_, p)| p == Path::new("/sys/fs/cgroup/cpu,cpuacct"))
        );
    }

    #[test]
    fn quota_math() {
        assert_eq!(quota_us(1.5), 150_000);
        assert_eq!(quota_us(0.001), 1000);
        assert_eq!(round_cpus(150_000.0 / 100_000.0), 1.5);
        assert_eq!(normalize_cpus(0.33333), 0.333);
        assert_eq!(normalize_cpus(2.0), 2.0);
        assert_eq!(normalize_memory(100_000_000), 99_999_744);
        assert_eq!(normalize_memory(64 << 20), 64 << 20);
        assert_eq!(kv("usage_usec 1234\nuser_usec 1", "usage_usec"), 1234);
        assert_eq!(
            kv("oom_kill_disable 0\nunder_oom 0\noom_kill 3", "oom_kill"),
            3
        );
    }

    #[test]
    fn no_device_filter_is_an_error() {
        let hier = Hierarchy::V1 {
            mounts: vec![("memory".into(), PathBuf::from("/nonexistent"))],
        };
        struct Unused;
        impl DeviceProgram for Unused {
            fn attach(&self, _: &Path, _: &[&str]) -> Result<(), CgroupError> {
                unreachable!("v1 has no device program")
            }
        }
        let err = hier
            .cgroup("p", "c")
            .restrict_devices(&["c 1:3 rwm"], &Unused)
            .expect_err("no devices controller: refused");
        assert!(matches!(err, CgroupError::Unsupported(_)), "{err}");
        assert!(err.to_string().contains("devices controller"), "{err}");
    }

    /// Freezes `cg` (holding `pid`), checks the kernel reports the task frozen, thaws.
    fn freeze_thaw(cg: &Cgroup, pid: i32) {
        cg.freeze(Duration::from_secs(5)).expect("freeze");
        assert!(cg.is_frozen());
        // v1 reports the frozen task in the refrigerator (state D); v2 keeps it in S, so
        // the cgroup's own report (checked by `freeze`) is the witness there.
        if !cg.hier.is_v2() {
            let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
            let state = st
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            assert_eq!(state, Some("D"), "{st}");
        }
        cg.freeze(Duration::from_secs(5))
            .expect("freezing twice is fine");
        cg.thaw().expect("thaw");
        assert!(!cg.is_frozen());
        cg.thaw().expect("thawing twice is fine");
    }

    /// The v2 code paths on a real cgroup2 mount: the unified hierarchy of a v1-hybrid
    /// host (no controllers there: limits are refused, unlimited is accepted), or the host's
    /// own when it is v2.
    #[test]
    fn v2_create_attach_kill_destroy() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP v2_create_attach_kill_destroy: needs root");
            return;
        }
        let root = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .map(PathBuf::from)
            .find(|r| r.join("cgroup.controllers").exists());
        let Some(root) = root else {
            eprintln!("SKIP v2_create_attach_kill_destroy: no cgroup2 mount");
            return;
        };
        let hier = Hierarchy::V2 { root: root.clone() };
        let parent = format!("stead-test-{}-v2/nested", std::process::id());
        let cg = hier.cgroup(&parent, "c1");
        struct Guard(Cgroup);
        impl Drop for Guard {
            fn drop(&mut self) {
                let _ = self.0.destroy();
            }
        }
        let _guard = Guard(cg.clone());
        cg.create().expect("create");
        assert!(cg.exists());
        cg.set_limits(&Limits::default())
            .expect("unlimited always works");
        let has_pids = root.join("cgroup.controllers").exists()
            && read_opt(&root.join("cgroup.controllers")).contains("pids");
        let r = cg.set_limits(&Limits {
            pids: Some(10),
            ..Default::default()
        });
        assert_eq!(r.is_ok(), has_pids, "{r:?}");
        let mut child = std::process::Command::new("/bin/sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id() as i32;
        cg.add_pid(pid).expect("attach");
        assert_eq!(cg.pids(), vec![pid]);
        assert!(cg.usage().is_ok());
        freeze_thaw(&cg, pid);
        cg.destroy().expect("destroy");
        assert!(!child.wait().expect("wait").success());
        assert!(
            !root
                .join(format!("stead-test-{}-v2", std::process::id()))
                .exists()
        );
    }

    /// Real test against the host's hierarchy, inside a private test parent.
    #[test]
    fn create_limit_attach_destroy() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP create_limit_attach_destroy: needs root");
            return;
        }
        let hier = match Hierarchy::detect() {
            Ok(h) => h,
            Err(e) => {
                eprintln!("SKIP create_limit_attach_destroy: {e}");
                return;
            }
        };
        let parent = format!("stead-test-{}-unit/nested", std::process::id());
        let cg = hier.cgroup(&parent, "c1");
        struct Guard(Cgroup);
        impl Drop for Guard {
            fn drop(&mut self) {
                let _ = self.0.destroy();
            }
        }
        let _guard = Guard(cg.clone());
        cg.create().expect("create");
        assert!(cg.exists());
        let l = Limits {
            cpus: Some(0.5),
            memory: Some(64 << 20),
            pids: Some(20),
        };
        cg.set_limits(&l).expect("limits");
        assert_eq!(cg.limits().expect("read"), l);
        cg.set_limits(&Limits::default()).expect("unlimit");
        assert_eq!(cg.limits().expect("read"), Limits::default());
        cg.set_limits(&l).expect("limits again");

        let mut child = std::process::Command::new("/bin/sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id() as i32;
        cg.add_pid(pid).expect("attach");
        assert_eq!(cg.pids(), vec![pid]);
        let u = cg.usage().expect("usage");
        assert_eq!(u.pids, 1);
        if hier.is_v2() || cg.dir("freezer").is_some() {
            freeze_thaw(&cg, pid);
        } else {
            eprintln!("SKIP create_limit_attach_destroy (freeze part): no v1 freezer mounted");
        }
        cg.destroy().expect("destroy");
        let status = child.wait().expect("wait");
        assert!(!status.success(), "sleep was killed");
        assert!(!cg.exists());
        for d in hier.cgroup(&parent, "c1").procs_dirs() {
            let top = d.parent().and_then(Path::parent).expect("top");
            assert!(!top.exists(), "{} left behind", top.display());
        }
    }
}
