//! `ContainerDriver` (kind `Container`).
//!
//! State shape (desired and observed):
//! `{"state": "running"|"stopped"|"orphaned", "rootfs", "hostname", "command", "env",
//! "unprivileged", "resources": {"cpus","memory","pids"}, "interfaces", "mounts",
//! "restartPolicy"}`. Impact: `state`, `resources`, `restartPolicy` are hot (control
//! request / cgroup write); everything else restarts the container.
//!
//! Observe reads `<run_dir>/containers/*/{config.json,state.json}`, probes the shim's lock
//! and reads live cgroup limits and usage. A supervisor that died leaves state `orphaned`
//! (processes still in the cgroup) or `stopped`, with health `Degraded`; apply then kills
//! the leftovers and starts a new supervisor — never a duplicate.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stead_host::cgroup::{Cgroup, Hierarchy, Limits};
use stead_reconciler::driver::{
    DriverError, FieldChange, Health, HostEnv, Impact, Lookup, Observed, Typed,
};
use stead_schema::{ContainerSpec, DeletionPolicy, Resource, ResourceId, RunState};

use super::config::{
    ContainerConfig, DEFAULT_COMMAND, DEFAULT_STOP_TIMEOUT_SECS, InterfaceConfig, MountConfig,
    Paths, Phase, ShimState, host_veth_name, read_json, write_json,
};
use super::control::{Request, request};
use super::shim::{ShimArgs, lock_held};
use super::{network, rootfs};
use crate::storage::rootfs_snapshot;
use crate::vm::config::generated_container_mac;

/// Fields whose change only needs a hot update.
const HOT_FIELDS: [&str; 4] = ["state", "resources", "restartPolicy", "stopTimeout"];

/// The Container driver.
#[derive(Debug, Clone)]
pub struct ContainerDriver {
    env: HostEnv,
    hier: Hierarchy,
    /// Seconds between the stop signal and SIGKILL for every container, overriding
    /// each one's `stopTimeout` (environment teardown uses 0).
    pub stop_timeout_secs: Option<u64>,
}

impl ContainerDriver {
    /// A driver for `env` (detects the cgroup hierarchy).
    pub fn new(env: &HostEnv) -> Result<Self, DriverError> {
        // Trees made by an older version may sit under world-traversable dirs.
        if let Err(e) = rootfs::tighten_modes(&env.state_dir) {
            tracing::warn!(error = %e, "cannot tighten the modes of the rootfs dirs");
        }
        Ok(ContainerDriver {
            env: env.clone(),
            hier: Hierarchy::detect()?,
            stop_timeout_secs: None,
        })
    }

    fn paths(&self, name: &str) -> Paths {
        Paths::new(&self.env.run_dir, name)
    }

    fn cgroup(&self, name: &str) -> Cgroup {
        self.hier.cgroup(&self.env.cgroup_parent, name)
    }

    fn base_dir(&self, spec: &ContainerSpec, world: &dyn Lookup) -> Result<PathBuf, DriverError> {
        match &spec.rootfs.pool {
            Some(p) => crate::storage::pool_path(world, p.as_str()),
            None => Ok(self.env.state_dir.clone()),
        }
    }

    /// The base dir and the own rootfs data (unpacked copy or overlay upper layer) of
    /// container `r`, when stead made one for it.
    fn own_rootfs(
        &self,
        r: Typed<'_, ContainerSpec>,
        world: &dyn Lookup,
    ) -> Option<(PathBuf, PathBuf)> {
        r.spec.rootfs.template.as_ref()?;
        let base = self.base_dir(r.spec, world).ok()?;
        let (_, data) = rootfs_snapshot::own_data(r.name(), &base)?;
        Some((base, data))
    }

    /// The projection of a spec onto the observed shape.
    pub fn project(name: &str, spec: &ContainerSpec) -> Value {
        let mut res = serde_json::Map::new();
        // Normalized to what the kernel reports back, so a converged container shows no diff.
        if let Some(c) = spec.resources.cpus {
            res.insert("cpus".into(), json!(stead_host::cgroup::normalize_cpus(c)));
        }
        if let Some(m) = spec.resources.memory {
            res.insert(
                "memory".into(),
                json!(stead_host::cgroup::normalize_memory(m.bytes())),
            );
        }
        if let Some(p) = spec.resources.pids {
            res.insert("pids".into(), json!(p));
        }
        let mut v = json!({
            "state": match spec.state { RunState::Running => "running", RunState::Stopped => "stopped" },
            "rootfs": spec.rootfs,
            "hostname": spec.hostname.clone().unwrap_or_else(|| name.to_string()),
            "command": spec.command.clone().unwrap_or_else(|| vec![DEFAULT_COMMAND.to_string()]),
            "env": spec.env,
            "unprivileged": spec.unprivileged,
            "resources": res,
            "interfaces": spec.interfaces,
            "mounts": spec.mounts,
            "restartPolicy": spec.restart_policy,
        });
        // Only when set, so a container applied before the field existed shows no diff.
        if let (Some(t), Some(o)) = (spec.stop_timeout, v.as_object_mut()) {
            o.insert("stopTimeout".into(), json!(t.to_string()));
        }
        v
    }

    /// Seconds `spec`'s container gets between its stop signal and SIGKILL.
    fn stop_timeout_of(&self, spec: &ContainerSpec) -> u64 {
        self.stop_timeout_secs
            .unwrap_or_else(|| spec.stop_timeout_secs())
    }

    fn limits(spec: &ContainerSpec) -> Limits {
        Limits {
            cpus: spec.resources.cpus,
            memory: spec.resources.memory.map(|m| m.bytes()),
            pids: spec.resources.pids,
        }
    }

    /// Resolves a spec into the config a shim runs (prepares the rootfs, allocates ids).
    fn resolve(
        &self,
        r: &Resource,
        spec: &ContainerSpec,
        desired: Value,
        world: &dyn Lookup,
    ) -> Result<ContainerConfig, DriverError> {
        let name = r.id.name.as_str();
        let paths = self.paths(name);
        let idmap = if spec.unprivileged {
            Some(rootfs::allocate_ids(&self.env.state_dir, name)?)
        } else {
            None
        };
        let base = self.base_dir(spec, world)?;
        let volume = match &spec.rootfs.volume {
            Some(v) => Some(crate::storage::volume_path(world, v.as_str())?),
            None => None,
        };
        let root = rootfs::prepare(&spec.rootfs, name, &base, idmap, &paths, volume)?;
        if let Some(m) = idmap
            && let crate::container::config::RootfsMount::Dir { path } = &root
        {
            check_traversable(path, m.base)?;
        }
        let mut mounts = Vec::new();
        for m in &spec.mounts {
            let src = crate::storage::volume_path(world, m.volume.as_str())?;
            if !src.exists() {
                return Err(DriverError::NotReady(format!(
                    "Volume/{} has no data at {} yet",
                    m.volume,
                    src.display()
                )));
            }
            mounts.push(MountConfig {
                source: src,
                target: m.path.clone(),
                read_only: m.read_only,
            });
        }
        let mut interfaces = Vec::new();
        for (i, ifc) in spec.interfaces.iter().enumerate() {
            if ifc.vlan.is_some() {
                return Err(DriverError::Unsupported(
                    "VLAN tags on container interfaces need bridge VLAN filtering (missing on this kernel)".into(),
                ));
            }
            interfaces.push(InterfaceConfig {
                name: ifc.name.as_str().to_string(),
                bridge: ifc.network.as_str().to_string(),
                host_name: host_veth_name(name, i),
                address: ifc.address,
                gateway: ifc.gateway,
                mac: Some(ifc.mac.unwrap_or_else(|| generated_container_mac(name, i))),
            });
        }
        Ok(ContainerConfig {
            name: name.to_string(),
            rootfs: root,
            hostname: spec.hostname.clone().unwrap_or_else(|| name.to_string()),
            command: spec
                .command
                .clone()
                .unwrap_or_else(|| vec![DEFAULT_COMMAND.to_string()]),
            env: spec.env.clone(),
            idmap,
            limits: Self::limits(spec),
            interfaces,
            mounts,
            restart_policy: spec.restart_policy,
            cgroup_parent: self.env.cgroup_parent.clone(),
            host_netns: self.env.netns.clone(),
            stop_timeout_secs: self.stop_timeout_of(spec),
            desired,
            fence_file: self
                .env
                .fence_file
                .clone()
                .filter(|_| spec.placement.is_ha()),
        })
    }

    fn spawn_shim(&self, cfg: &ContainerConfig) -> Result<(), DriverError> {
        let args = ShimArgs {
            run_dir: self.env.run_dir.clone(),
            name: cfg.name.clone(),
            config: self.paths(&cfg.name).config(),
        };
        let exe = crate::supervise::supervisor_exe(&self.env.self_exe);
        crate::supervise::launch(&exe, "shim", &args)
    }

    /// Whether container `name` has a live supervisor and a cgroup.
    pub fn is_running(&self, name: &str) -> bool {
        lock_held(&self.paths(name)) && self.cgroup(name).exists()
    }

    /// Freezes every process of container `name` (cgroup freezer) and waits until they
    /// are all frozen, at most `timeout`.
    pub fn freeze(&self, name: &str, timeout: Duration) -> Result<(), DriverError> {
        Ok(self.cgroup(name).freeze(timeout)?)
    }

    /// Thaws container `name` (idempotent; a cgroup that is gone is not an error).
    pub fn thaw(&self, name: &str) -> Result<(), DriverError> {
        let cg = self.cgroup(name);
        if !cg.exists() {
            return Ok(());
        }
        Ok(cg.thaw()?)
    }

    /// Whether container `name`'s cgroup is frozen.
    pub fn is_frozen(&self, name: &str) -> bool {
        self.cgroup(name).is_frozen()
    }

    /// Stops a running container gracefully within the stop timeout it runs with and
    /// waits for its supervisor to exit.
    pub fn stop(&self, name: &str) -> Result<(), DriverError> {
        let running: Option<u64> = read_json::<ContainerConfig>(&self.paths(name).config())
            .ok()
            .flatten()
            .map(|c| c.stop_timeout_secs);
        let secs = self
            .stop_timeout_secs
            .or(running)
            .unwrap_or(DEFAULT_STOP_TIMEOUT_SECS);
        self.stop_within(name, secs)
    }

    /// Stops a running container gracefully (its stop signal, SIGKILL after `secs`) and
    /// waits for its supervisor to exit.
    fn stop_within(&self, name: &str, secs: u64) -> Result<(), DriverError> {
        let paths = self.paths(name);
        if lock_held(&paths) {
            let timeout = Duration::from_secs(secs + 10);
            match request(
                &self.env.run_dir,
                name,
                &Request::Stop {
                    timeout_secs: Some(secs),
                },
                timeout,
            ) {
                Ok(_) | Err(DriverError::NotReady(_)) => {}
                // A supervisor that is exiting on its own (its init ended under
                // `restartPolicy: never`) can drop the connection before it answers: wait
                // for its lock below, which fails if it does not go.
                Err(e) if supervisor_went_away(&e) => {
                    tracing::debug!(container = name, error = %e, "supervisor went away during stop");
                }
                Err(e) => return Err(e),
            }
            let t = Instant::now();
            while lock_held(&paths) {
                if t.elapsed() > Duration::from_secs(10) {
                    return Err(DriverError::Other(format!(
                        "supervisor of {name} did not exit after stop"
                    )));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        // Leftovers of a dead supervisor.
        self.cgroup(name).destroy()?;
        super::volume::unmount_all(&paths.dir)
    }

    fn observe_one(&self, r: &Resource) -> Result<Observed, DriverError> {
        let name = r.id.name.as_str();
        let paths = self.paths(name);
        let Some(cfg) = read_json::<ContainerConfig>(&paths.config())? else {
            return Ok(Observed::absent());
        };
        let alive = lock_held(&paths);
        // The state file is written without fsync: after a host crash it may be torn,
        // and it means nothing without a live supervisor anyway.
        let st: Option<ShimState> = match read_json(&paths.state()) {
            Err(e) if !alive => {
                tracing::debug!(container = name, error = %e, "state of a dead supervisor unreadable");
                None
            }
            r => r?,
        };
        let cg = self.cgroup(name);
        let leftovers = !alive && !cg.pids().is_empty();
        let mut state = cfg.desired.clone();
        let phase = st.as_ref().map(|s| s.phase);
        let run = match (alive, phase) {
            (true, Some(Phase::Running | Phase::Restarting)) => "running",
            (false, _) if leftovers => "orphaned",
            _ => "stopped",
        };
        let cg_exists = cg.exists();
        if let Some(o) = state.as_object_mut() {
            o.insert("state".into(), json!(run));
            if alive && let Some(l) = cg.limits_if_present()? {
                let mut res = serde_json::Map::new();
                if let Some(c) = l.cpus {
                    res.insert("cpus".into(), json!(c));
                }
                if let Some(m) = l.memory {
                    res.insert("memory".into(), json!(m));
                }
                if let Some(p) = l.pids {
                    res.insert("pids".into(), json!(p));
                }
                o.insert("resources".into(), Value::Object(res));
            }
        }
        let usage = if cg_exists { cg.usage().ok() } else { None };
        let ips: Vec<String> = cfg
            .interfaces
            .iter()
            .filter_map(|i| i.address.map(|a| a.to_string()))
            .collect();
        let status = json!({
            "phase": phase,
            "pid": st.as_ref().and_then(|s| s.init_pid).filter(|_| alive),
            "shimPid": st.as_ref().map(|s| s.shim_pid).filter(|_| alive),
            "restarts": st.as_ref().map_or(0, |s| s.restarts),
            "startedAt": st.as_ref().and_then(|s| s.started_at.clone()),
            "lastExit": st.as_ref().and_then(|s| s.last_exit.clone()),
            "lastError": st.as_ref().and_then(|s| s.last_error.clone()),
            "startMicros": st.as_ref().and_then(|s| s.start_micros),
            "cpuSeconds": usage.map(|u| u.cpu_seconds),
            "memoryBytes": usage.map(|u| u.memory_bytes),
            "oomKills": usage.map(|u| u.oom_kills),
            "ips": ips,
            "cgroup": cg.relative(),
        });
        let health = match (alive, phase) {
            (true, Some(Phase::Running)) => Health::Ready,
            (true, _) => Health::Progressing,
            (false, Some(Phase::Running | Phase::Restarting | Phase::Stopping)) => {
                Health::Degraded("supervisor died".into())
            }
            (false, Some(Phase::Fenced)) => {
                Health::Failed("fenced: the node's fence deadline passed".into())
            }
            (false, Some(Phase::Exited)) => Health::Failed(format!(
                "exited: {}",
                st.as_ref()
                    .and_then(|s| s.last_exit.as_ref())
                    .map(|e| format!("code {:?} signal {:?}", e.code, e.signal))
                    .unwrap_or_default()
            )),
            _ => Health::Ready,
        };
        Ok(Observed {
            exists: true,
            owned: true,
            state,
            status,
            health,
        })
    }
}

/// Whether a control request failed because the supervisor closed or reset the
/// connection (or its socket is gone): it is exiting, not refusing.
fn supervisor_went_away(e: &DriverError) -> bool {
    match e {
        DriverError::Io { source, .. } => matches!(
            source.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionRefused
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::NotFound
                | std::io::ErrorKind::UnexpectedEof
        ),
        DriverError::Other(m) => m == "supervisor closed the connection",
        _ => false,
    }
}

fn restart_fields(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        for f in HOT_FIELDS {
            o.remove(f);
        }
    }
    v
}

/// An unprivileged container's root is an unprivileged host uid: it must be able to
/// traverse every directory above its rootfs, or the shim's bind mount fails with EACCES
/// (a 0700 state dir made by `mktemp -d` is the usual cause). Say so before starting.
/// A dir owned by the container's root (`root_uid`, its private rootfs dir) needs `u+x`.
fn check_traversable(rootfs: &std::path::Path, root_uid: u32) -> Result<(), DriverError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    for dir in rootfs.ancestors().skip(1) {
        if let Ok(meta) = std::fs::metadata(dir) {
            let mode = meta.permissions().mode();
            let bit = if meta.uid() == root_uid { 0o100 } else { 0o001 };
            if mode & bit == 0 {
                return Err(DriverError::Refused(format!(
                    "{} (mode {:o}) cannot be traversed by the unprivileged container's root, so its rootfs {} is unreachable: `chmod o+x {}` or use a state dir that others may traverse",
                    dir.display(),
                    mode & 0o7777,
                    rootfs.display(),
                    dir.display()
                )));
            }
        }
    }
    Ok(())
}

impl stead_reconciler::driver::KindDriver for ContainerDriver {
    type Spec = ContainerSpec;

    fn observe(
        &self,
        targets: &[Typed<'_, ContainerSpec>],
        _world: &dyn Lookup,
    ) -> Result<BTreeMap<ResourceId, Observed>, DriverError> {
        let _span = tracing::info_span!("observe", kind = "Container").entered();
        let targets: Vec<&Resource> = targets.iter().map(|t| t.resource).collect();
        crate::supervise::observe_instances(&self.env.run_dir.join("containers"), &targets, |r| {
            self.observe_one(r)
        })
    }

    fn desired_state(&self, desired: Typed<'_, ContainerSpec>, _world: &dyn Lookup) -> Value {
        Self::project(desired.name(), desired.spec)
    }

    fn adopt_check(
        &self,
        desired: Typed<'_, ContainerSpec>,
        _observed: &Observed,
        _world: &dyn Lookup,
    ) -> Result<(), String> {
        let who = crate::foreign::GuestIdentity::of(desired.resource, Vec::new());
        let runner = crate::foreign::Runner::Lxc;
        crate::foreign::refuse_if_running(runner, &who, &self.env.run_dir, desired.id())
    }

    fn impact(&self, path: &str) -> Impact {
        crate::supervise::hot_or_restart(path, &HOT_FIELDS)
    }

    fn check(
        &self,
        desired: Typed<'_, ContainerSpec>,
        _observed: &Observed,
        _changes: &[FieldChange],
    ) -> Result<(), String> {
        let spec = desired.spec;
        if spec.interfaces.iter().any(|i| i.vlan.is_some()) {
            return Err(
                "container interface vlan: bridge VLAN filtering is not available on this kernel"
                    .into(),
            );
        }
        Ok(())
    }

    fn apply(
        &self,
        desired: Typed<'_, ContainerSpec>,
        _observed: &Observed,
        world: &dyn Lookup,
    ) -> Result<(), DriverError> {
        let (desired, spec) = (desired.resource, desired.spec);
        let name = desired.id.name.as_str();
        let _span = tracing::info_span!("apply", resource = %format!("Container/{name}")).entered();
        crate::supervise::hold::check(&self.env.run_dir, "Container", name)?;
        let want = Self::project(name, spec);
        let paths = self.paths(name);
        fs::create_dir_all(&paths.dir)
            .map_err(|e| DriverError::io(format!("mkdir {}", paths.dir.display()), e))?;
        let old: Option<ContainerConfig> = read_json(&paths.config())?;
        let mut alive = lock_held(&paths);
        if alive
            && old
                .as_ref()
                .is_none_or(|o| restart_fields(&o.desired) != restart_fields(&want))
        {
            tracing::info!("restart-impact change: stopping the running instance");
            self.stop_within(name, self.stop_timeout_of(spec))?;
            alive = false;
        }
        match spec.state {
            RunState::Running if alive => {
                let r = request(
                    &self.env.run_dir,
                    name,
                    &Request::Update {
                        limits: Self::limits(spec),
                        restart_policy: spec.restart_policy,
                        desired: Some(want),
                    },
                    Duration::from_secs(10),
                );
                // NotReady (the supervisor went away since the probe) is retried.
                r.map(|_| ())
            }
            RunState::Running => {
                let cfg = self.resolve(desired, spec, want, world)?;
                crate::supervise::refuse_fenced(cfg.fence_file.as_deref())?;
                write_json(&paths.config(), &cfg)?;
                self.spawn_shim(&cfg)
            }
            RunState::Stopped => {
                self.stop_within(name, self.stop_timeout_of(spec))?;
                // Record the config so observe shows the stopped container's fields.
                let cfg = self.resolve(desired, spec, want, world)?;
                write_json(&paths.config(), &cfg)
            }
        }
    }

    fn delete_impact(&self, last_applied: Typed<'_, ContainerSpec>) -> Impact {
        let s = last_applied.spec;
        // The tree stead unpacked from the template holds the container's data.
        if s.rootfs.template.is_some() && s.deletion_policy != Some(DeletionPolicy::Retain) {
            Impact::DataLoss
        } else {
            Impact::Recreate
        }
    }

    fn stop_timeout_secs(&self, r: Typed<'_, ContainerSpec>, observed: &Observed) -> Option<u64> {
        let running = observed.state.get("state").and_then(Value::as_str) == Some("running");
        running.then(|| self.stop_timeout_of(r.spec))
    }

    fn supports_safety_snapshot(&self, r: Typed<'_, ContainerSpec>, world: &dyn Lookup) -> bool {
        // Probed in the container's private dir (where snapshots go), not in its tree.
        self.own_rootfs(r, world).is_some_and(|(_, data)| {
            data.parent()
                .is_some_and(crate::storage::fsutil::reflink_supported)
        })
    }

    fn safety_snapshot(
        &self,
        r: Typed<'_, ContainerSpec>,
        world: &dyn Lookup,
        name: &str,
    ) -> Result<(), DriverError> {
        // `pre-` snapshots are kept when the container's rootfs is removed.
        match self.own_rootfs(r, world) {
            Some((base, data)) => rootfs_snapshot::create(
                &data,
                &rootfs_snapshot::snapshots_dir(r.name(), &base),
                name,
            )
            .map(|_| ()),
            None => Ok(()),
        }
    }

    fn delete(
        &self,
        last_applied: Typed<'_, ContainerSpec>,
        _observed: &Observed,
        world: &dyn Lookup,
    ) -> Result<(), DriverError> {
        let name = last_applied.name();
        let _span =
            tracing::info_span!("delete", resource = %format!("Container/{name}")).entered();
        // A backup that stopped it would start it again when done.
        crate::supervise::hold::check(&self.env.run_dir, "Container", name)?;
        self.stop_within(name, self.stop_timeout_of(last_applied.spec))?;
        let paths = self.paths(name);
        if let Some(cfg) = read_json::<ContainerConfig>(&paths.config())? {
            network::detach(&cfg)?;
        }
        let spec = last_applied.spec;
        if spec.deletion_policy == Some(DeletionPolicy::Retain) {
            // The rootfs stays, and so does its id range: a container of the same name
            // created again finds its tree owned by the ids it gets back.
            tracing::info!("deletionPolicy: Retain: root file system kept");
        } else {
            let base = self
                .base_dir(spec, world)
                .unwrap_or_else(|_| self.env.state_dir.clone());
            rootfs::remove(name, &base)?;
            rootfs::remove(name, &self.env.state_dir)?;
            rootfs::release_ids(&self.env.state_dir, name)?;
        }
        crate::storage::fsutil::remove_tree_if_exists(&paths.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stead_reconciler::driver::Driver;

    #[test]
    fn a_dropped_connection_during_stop_means_the_supervisor_is_exiting() {
        let io = |k| DriverError::io("read reply", std::io::Error::from(k));
        assert!(supervisor_went_away(&io(
            std::io::ErrorKind::ConnectionReset
        )));
        assert!(supervisor_went_away(&io(std::io::ErrorKind::NotFound)));
        assert!(supervisor_went_away(&DriverError::Other(
            "supervisor closed the connection".into()
        )));
        assert!(!supervisor_went_away(&io(
            std::io::ErrorKind::PermissionDenied
        )));
        assert!(!supervisor_went_away(&DriverError::Other(
            "stop refused".into()
        )));
    }

    #[test]
    fn impacts() {
        let env = HostEnv {
            state_dir: "/nonexistent".into(),
            run_dir: "/nonexistent".into(),
            cgroup_parent: "stead".into(),
            netns: None,
            self_exe: "/bin/false".into(),
            fence_file: None,
        };
        let d = ContainerDriver {
            env,
            hier: Hierarchy::v2("/nonexistent"),
            stop_timeout_secs: None,
        };
        assert_eq!(d.impact("/resources/memory"), Impact::Hot);
        assert_eq!(d.impact("/state"), Impact::Hot);
        assert_eq!(d.impact("/restartPolicy"), Impact::Hot);
        assert_eq!(d.impact("/rootfs/template"), Impact::Restart);
        assert_eq!(d.impact("/interfaces/0/address"), Impact::Restart);
        assert_eq!(d.impact("/unprivileged"), Impact::Restart);
        {
            use std::os::unix::fs::PermissionsExt;
            let t = tempfile::tempdir().expect("tempdir");
            let deep = t.path().join("state/rootfs/c");
            std::fs::create_dir_all(&deep).expect("mkdir");
            std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o700))
                .expect("chmod");
            let e = check_traversable(&deep, 100_000).expect_err("0700 ancestor refused");
            assert!(e.to_string().contains("chmod o+x"), "{e}");
            std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
            check_traversable(&deep, 100_000).expect("traversable");
        }
    }

    #[test]
    fn projection_defaults() {
        let spec: ContainerSpec = serde_json::from_value(
            json!({"rootfs": {"path": "/srv/r"}, "resources": {"memory": "64Mi"}}),
        )
        .expect("spec");
        let v = ContainerDriver::project("web", &spec);
        assert_eq!(v["hostname"], "web");
        assert_eq!(v["command"], json!(["/sbin/init"]));
        assert_eq!(v["state"], "running");
        assert_eq!(v["unprivileged"], true);
        assert_eq!(v["resources"], json!({"memory": 67108864}));
        assert_eq!(v["restartPolicy"], "always");
    }
}
