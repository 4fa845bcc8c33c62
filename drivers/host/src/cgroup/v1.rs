//! Legacy (v1) hierarchies: one mount per controller (or per controller group, like
//! `cpu,cpuacct`), each holding its own copy of every cgroup.

use std::fs;
use std::path::{Path, PathBuf};

use super::{
    CFS_PERIOD_US, CgroupError, CgroupManager, DeviceProgram, Freezer, Limits, Usage, kill_pids,
    kv, quota_us, read_pids, read_trim, round_cpus, write_file,
};
use crate::mounts::MountTable;

/// v1 controllers stead uses. `freezer` makes kill-all atomic against forking processes.
const CONTROLLERS: [&str; 6] = ["cpu", "cpuacct", "memory", "pids", "freezer", "devices"];
/// Controllers without which stead does not run.
const REQUIRED: [&str; 3] = ["cpu", "memory", "pids"];

/// The v1 backend: controller name → mount point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V1 {
    mounts: Vec<(String, PathBuf)>,
}

impl V1 {
    /// A backend over these `(controller, mount point)` pairs.
    pub fn new(mounts: Vec<(String, PathBuf)>) -> Self {
        Self { mounts }
    }

    /// The controllers stead uses, as mounted below `root` in `table`; an error when a
    /// required one (`cpu`, `memory`, `pids`) is missing.
    pub fn from_mounts(root: &Path, table: &MountTable) -> Result<Self, CgroupError> {
        let mounts = controller_mounts(root, table);
        for c in REQUIRED {
            if !mounts.iter().any(|(n, _)| n == c) {
                return Err(CgroupError::Unsupported(format!(
                    "cgroup v1 controller {c} is not mounted and {} is not cgroup2",
                    root.display()
                )));
            }
        }
        Ok(Self { mounts })
    }

    /// `(controller, mount point)` of each controller found.
    pub fn mounts(&self) -> &[(String, PathBuf)] {
        &self.mounts
    }
}

/// The mount points of the v1 controllers stead uses, below `root`.
fn controller_mounts(root: &Path, table: &MountTable) -> Vec<(String, PathBuf)> {
    let mut out: Vec<(String, PathBuf)> = Vec::new();
    // Only mounts of a hierarchy's root (a bind of a sub-cgroup has another root).
    for m in table.entries().iter().filter(|m| {
        m.fstype == "cgroup" && m.root == Path::new("/") && m.mount_point.starts_with(root)
    }) {
        for opt in m.super_options.split(',') {
            if CONTROLLERS.contains(&opt) && !out.iter().any(|(c, _)| c == opt) {
                out.push((opt.to_string(), m.mount_point.clone()));
            }
        }
    }
    out
}

impl CgroupManager for V1 {
    fn is_v2(&self) -> bool {
        false
    }

    fn dirs(&self, rel: &Path) -> Vec<(String, PathBuf)> {
        self.mounts
            .iter()
            .map(|(c, m)| (c.clone(), m.join(rel)))
            .collect()
    }

    fn create(&self, rel: &Path) -> Result<(), CgroupError> {
        for (ctrl, dir) in self.dirs(rel) {
            create_all(&dir)?;
            if ctrl == "cpuset" {
                copy_cpuset(&dir)?;
            }
            if ctrl == "memory" {
                // Children account into their parent (default on new kernels).
                let _ = fs::write(dir.join("memory.use_hierarchy"), "1");
            }
        }
        Ok(())
    }

    fn set_limits(&self, rel: &Path, l: &Limits) -> Result<(), CgroupError> {
        if let Some(d) = self.dir(rel, "cpu") {
            write_file(&d.join("cpu.cfs_period_us"), &CFS_PERIOD_US.to_string())?;
            let q = l.cpus.map_or("-1".to_string(), |c| quota_us(c).to_string());
            write_file(&d.join("cpu.cfs_quota_us"), &q)?;
        }
        if let Some(d) = self.dir(rel, "memory") {
            set_memory(&d, l.memory)?;
        }
        if let Some(d) = self.dir(rel, "pids") {
            let p = l.pids.map_or("max".to_string(), |p| p.to_string());
            write_file(&d.join("pids.max"), &p)?;
        }
        Ok(())
    }

    fn limits(&self, rel: &Path) -> Result<Limits, CgroupError> {
        let mut l = Limits::default();
        if let Some(d) = self.dir(rel, "cpu") {
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
        if let Some(d) = self.dir(rel, "memory") {
            let m: u64 = read_trim(&d.join("memory.limit_in_bytes"))?
                .parse()
                .unwrap_or(u64::MAX);
            // "Unlimited" reads as a huge page-aligned number.
            l.memory = (m < (1u64 << 62)).then_some(m);
        }
        if let Some(d) = self.dir(rel, "pids") {
            l.pids = read_trim(&d.join("pids.max"))?.parse().ok();
        }
        Ok(l)
    }

    fn usage(&self, rel: &Path) -> Result<Usage, CgroupError> {
        let mut u = Usage::default();
        if let Some(d) = self.dir(rel, "cpuacct") {
            let ns: u64 = read_trim(&d.join("cpuacct.usage"))?.parse().unwrap_or(0);
            u.cpu_seconds = ns as f64 / 1e9;
        }
        if let Some(d) = self.dir(rel, "memory") {
            u.memory_bytes = read_trim(&d.join("memory.usage_in_bytes"))?
                .parse()
                .unwrap_or(0);
            u.oom_kills = kv(
                &fs::read_to_string(d.join("memory.oom_control")).unwrap_or_default(),
                "oom_kill",
            );
        }
        if let Some(d) = self.dir(rel, "pids") {
            u.pids = read_trim(&d.join("pids.current"))?.parse().unwrap_or(0);
        }
        Ok(u)
    }

    fn restrict_devices(
        &self,
        rel: &Path,
        allow: &[&str],
        _program: &dyn DeviceProgram,
    ) -> Result<(), CgroupError> {
        let Some(d) = self.dir(rel, "devices") else {
            return Err(CgroupError::Unsupported(
                "the cgroup v1 devices controller is not mounted: containers are not started \
                 without a device filter (mount it at /sys/fs/cgroup/devices)"
                    .into(),
            ));
        };
        let filter_err =
            |e: CgroupError| CgroupError::Other(format!("device filter of {}: {e}", rel.display()));
        write_file(&d.join("devices.deny"), "a").map_err(filter_err)?;
        for a in allow {
            write_file(&d.join("devices.allow"), a).map_err(filter_err)?;
        }
        Ok(())
    }

    fn devices_list(&self, rel: &Path) -> Option<String> {
        fs::read_to_string(self.dir(rel, "devices")?.join("devices.list")).ok()
    }

    fn freezer(&self, rel: &Path) -> Result<Freezer, CgroupError> {
        let d = self.dir(rel, "freezer").ok_or_else(|| {
            CgroupError::Unsupported("the cgroup v1 freezer controller is not mounted".into())
        })?;
        Ok(Freezer {
            control: d.join("freezer.state"),
            on: "FROZEN",
            off: "THAWED",
            state: d.join("freezer.state"),
            frozen: "FROZEN",
        })
    }

    /// Freezes the cgroup (when the freezer is mounted) so nothing forks between reading
    /// the pids and killing them, kills, thaws.
    fn kill_round(&self, rel: &Path, _first: bool) -> Result<(), CgroupError> {
        let freezer = self.dir(rel, "freezer").map(|f| f.join("freezer.state"));
        let frozen = freezer
            .as_ref()
            .is_some_and(|f| fs::write(f, "FROZEN").is_ok());
        if let Some(d) = self.procs_dir(rel) {
            kill_pids(&read_pids(&d));
        }
        if frozen && let Some(f) = &freezer {
            let _ = fs::write(f, "THAWED");
        }
        Ok(())
    }
}

fn set_memory(d: &Path, memory: Option<u64>) -> Result<(), CgroupError> {
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

/// `create_dir_all` that tolerates a concurrent `destroy` removing an empty parent.
fn create_all(d: &Path) -> Result<(), CgroupError> {
    let mut last = None;
    for _ in 0..5 {
        match fs::create_dir_all(d) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => last = Some(e),
            Err(e) => return Err(CgroupError::io(format!("mkdir {}", d.display()), e)),
        }
    }
    Err(CgroupError::io(
        format!("mkdir {}", d.display()),
        last.unwrap_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound)),
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
