//! The unified (v2) hierarchy: one tree, controllers enabled per subtree through
//! `cgroup.subtree_control`, devices filtered by a BPF program.

use std::fs;
use std::path::{Path, PathBuf};

use super::{
    CFS_PERIOD_US, CgroupError, CgroupManager, DeviceProgram, Freezer, Limits, Usage, kill_pids,
    kv, quota_us, read_opt, read_pids, read_trim, round_cpus, write_file,
};

/// v2 controllers enabled in the parents' `cgroup.subtree_control`.
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// Whether `root` is a cgroup2 mount (it lists its `cgroup.controllers`).
pub fn is_unified_root(root: &Path) -> bool {
    root.join("cgroup.controllers").exists()
}

/// The v2 backend: the unified hierarchy mounted at `root`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V2 {
    root: PathBuf,
}

impl V2 {
    /// A backend for the cgroup2 mount at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The mount point.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl CgroupManager for V2 {
    fn is_v2(&self) -> bool {
        true
    }

    fn dirs(&self, rel: &Path) -> Vec<(String, PathBuf)> {
        vec![(String::new(), self.root.join(rel))]
    }

    /// Creates each level, enabling stead's controllers in its parent first.
    fn create(&self, rel: &Path) -> Result<(), CgroupError> {
        let mut cur = self.root.clone();
        for comp in rel.components() {
            enable_controllers(&cur)?;
            cur.push(comp);
            mkdir(&cur)?;
        }
        Ok(())
    }

    fn set_limits(&self, rel: &Path, l: &Limits) -> Result<(), CgroupError> {
        let d = self.root.join(rel);
        let cpu = l.cpus.map(|c| format!("{} {CFS_PERIOD_US}", quota_us(c)));
        write_limit(&d, "cpu.max", cpu, &format!("max {CFS_PERIOD_US}"))?;
        write_limit(&d, "memory.max", l.memory.map(|m| m.to_string()), "max")?;
        if d.join("memory.swap.max").exists() {
            // Like the v1 memsw limit: the memory limit is not bypassed by swap.
            let swap = if l.memory.is_some() { "0" } else { "max" };
            write_file(&d.join("memory.swap.max"), swap)?;
        }
        write_limit(&d, "pids.max", l.pids.map(|p| p.to_string()), "max")
    }

    fn limits(&self, rel: &Path) -> Result<Limits, CgroupError> {
        let d = self.root.join(rel);
        let mut l = Limits::default();
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
        Ok(l)
    }

    fn usage(&self, rel: &Path) -> Result<Usage, CgroupError> {
        let d = self.root.join(rel);
        let stat = read_trim(&d.join("cpu.stat"))?;
        Ok(Usage {
            cpu_seconds: kv(&stat, "usage_usec") as f64 / 1e6,
            memory_bytes: read_opt(&d.join("memory.current")).parse().unwrap_or(0),
            pids: read_opt(&d.join("pids.current")).parse().unwrap_or(0),
            oom_kills: kv(
                &fs::read_to_string(d.join("memory.events")).unwrap_or_default(),
                "oom_kill",
            ),
        })
    }

    fn restrict_devices(
        &self,
        rel: &Path,
        allow: &[&str],
        program: &dyn DeviceProgram,
    ) -> Result<(), CgroupError> {
        match program.attach(&self.root.join(rel), allow) {
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
        }
    }

    fn devices_list(&self, _rel: &Path) -> Option<String> {
        None
    }

    fn freezer(&self, rel: &Path) -> Result<Freezer, CgroupError> {
        let d = self.root.join(rel);
        Ok(Freezer {
            control: d.join("cgroup.freeze"),
            on: "1",
            off: "0",
            state: d.join("cgroup.events"),
            frozen: "frozen 1",
        })
    }

    /// `cgroup.kill` first (atomic against forks, when the kernel has it), then SIGKILL
    /// to whatever is listed.
    fn kill_round(&self, rel: &Path, first: bool) -> Result<(), CgroupError> {
        let d = self.root.join(rel);
        let kill_file = d.join("cgroup.kill");
        if first && kill_file.exists() {
            return write_file(&kill_file, "1");
        }
        kill_pids(&read_pids(&d));
        Ok(())
    }
}

/// Enables stead's controllers in `dir`'s `cgroup.subtree_control`, as far as `dir`
/// offers them (`cgroup.controllers`); a missing one surfaces when a limit needs it.
fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let available = read_opt(&dir.join("cgroup.controllers"));
    let enabled = read_opt(&dir.join("cgroup.subtree_control"));
    let missing: Vec<String> = CONTROLLERS
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

/// Writes a limit file. Unlimited and absent (controller not enabled) is fine; a limit
/// whose controller is missing is an error.
fn write_limit(
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

fn mkdir(d: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(d) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(CgroupError::io(format!("mkdir {}", d.display()), e)),
    }
}
