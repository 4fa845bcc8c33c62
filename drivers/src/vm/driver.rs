//! `VmDriver` (kind `VirtualMachine`).
//!
//! State shape (desired and observed):
//! `{"state": "running"|"paused"|"stopped", "cpus", "memory" (bytes), "kernel",
//! "initrd"?, "cmdline"?, "disks": [{"volume","readOnly"}], "interfaces":
//! [{"network","mac"}], "restartPolicy", "cloudInit"?}` (`cloudInit`: the seed's
//! instance-id; the seed ISO is the VM's last disk, read-only). A missing MAC is
//! generated from the VM name ([`generated_mac`]). Impact: `state` and `restartPolicy` are hot; everything else
//! restarts the VM.
//!
//! Observe lists `<run_dir>/vms/` once and, per VM, reads `config.json` (what the
//! supervisor runs), `supervisor.json`, probes the supervisor's lock, asks the VMM's
//! control socket for `status`, and reads cgroup usage. A dead supervisor shows as
//! `stopped` (drift from `running`); apply starts a new one, never a duplicate.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stead_host::cgroup::{Cgroup, Hierarchy};
use stead_reconciler::driver::{
    DriverError, FieldChange, Health, HostEnv, Impact, Lookup, Observed, Typed,
};
use stead_schema::{
    Kind, Resource, ResourceId, RestartPolicy, RunState, VirtualMachineSpec, VmEngine,
};

use super::config::{
    DiskRun, InterfaceRun, Paths, Phase, SupervisorState, VmRunConfig, cgroup_name, generated_mac,
    tap_name, vms_dir,
};
use super::qemu::cloudinit::{seed_files, write_seed_iso};
use super::qemu::driver as qemu;
use super::qemu::quiesce::{self as qemu_quiesce, Quiesced};
use super::supervisor::{VmmArgs, control_request, control_status, lock_held};
use crate::container::config::{read_json, write_json};
use crate::net::attach::{TapSpec, delete_link, ensure_tap, link_aliases, owned_links};
use crate::net::owner_alias;
use stead_vmm::{Reply, Request};

/// Default graceful shutdown time before a VM is forced off.
pub const DEFAULT_SHUTDOWN_TIMEOUT_SECS: u64 = 10;

/// `volume` prefix of the cloud-init seed disk in a run config (no Volume name has a `:`).
const SEED_DISK: &str = "cidata:";

/// The VirtualMachine driver.
#[derive(Debug, Clone)]
pub struct VmDriver {
    env: HostEnv,
    hier: Hierarchy,
    /// Seconds a graceful shutdown may take before the VM is forced off, for a VM whose
    /// spec has no `stopTimeout`.
    pub shutdown_timeout_secs: u64,
}

/// Why [`VmDriver::apply_config`] failed: the supervisor did not start, or anything else.
#[derive(Debug)]
enum ApplyError {
    /// The supervisor or the VM failed to start.
    Start(DriverError),
    /// Any other step.
    Other(DriverError),
}

impl ApplyError {
    fn into_inner(self) -> DriverError {
        match self {
            ApplyError::Start(e) | ApplyError::Other(e) => e,
        }
    }
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApplyError::Start(e) | ApplyError::Other(e) => e.fmt(f),
        }
    }
}

impl From<DriverError> for ApplyError {
    fn from(e: DriverError) -> Self {
        ApplyError::Other(e)
    }
}

/// `state` with its `stopTimeout` (seconds), as desired and as observed (both engines).
pub(crate) fn with_stop_timeout(mut state: Value, secs: u64) -> Value {
    if let Some(o) = state.as_object_mut() {
        o.insert("stopTimeout".into(), json!(secs));
    }
    state
}

fn policy_str(p: RestartPolicy) -> &'static str {
    match p {
        RestartPolicy::Always => "always",
        RestartPolicy::OnFailure => "on-failure",
        RestartPolicy::Never => "never",
    }
}

impl VmDriver {
    /// A driver for `env` (detects the cgroup hierarchy).
    pub fn new(env: &HostEnv) -> Result<Self, DriverError> {
        Ok(VmDriver {
            env: env.clone(),
            hier: Hierarchy::detect()?,
            shutdown_timeout_secs: DEFAULT_SHUTDOWN_TIMEOUT_SECS,
        })
    }

    /// The shutdown timeout of `spec`: its `stopTimeout`, else the driver's default.
    pub(crate) fn stop_timeout_of(&self, spec: &VirtualMachineSpec) -> u64 {
        spec.stop_timeout_secs_or(self.shutdown_timeout_secs)
    }

    pub(crate) fn paths(&self, name: &str) -> Paths {
        Paths::new(&self.env.run_dir, name)
    }

    /// The host environment.
    pub(crate) fn env(&self) -> &HostEnv {
        &self.env
    }

    pub(crate) fn cgroup(&self, name: &str) -> Cgroup {
        self.hier
            .cgroup(&self.env.cgroup_parent, &cgroup_name(name))
    }

    /// The state projection of a spec (see the module docs).
    pub fn project(name: &str, spec: &VirtualMachineSpec) -> Value {
        let disks: Vec<Value> = spec
            .disks
            .iter()
            .map(|d| json!({"volume": d.volume.as_str(), "readOnly": d.read_only}))
            .collect();
        let interfaces: Vec<Value> = spec
            .interfaces
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let mac = n.mac.unwrap_or_else(|| generated_mac(name, i));
                let mut o = json!({"network": n.network.as_str(), "mac": mac.to_string()});
                if let Some(v) = n.vlan {
                    o["vlan"] = json!(v);
                }
                o
            })
            .collect();
        let mut v = json!({
            "state": match spec.state { RunState::Running => "running", RunState::Stopped => "stopped" },
            "cpus": spec.cpus,
            "memory": spec.memory.bytes(),
            "disks": disks,
            "interfaces": interfaces,
            "restartPolicy": policy_str(spec.restart_policy),
        });
        if let Some(boot) = &spec.boot {
            v["kernel"] = json!(boot.kernel);
            if let Some(i) = &boot.initrd {
                v["initrd"] = json!(i);
            }
            if let Some(c) = &boot.cmdline {
                v["cmdline"] = json!(c);
            }
        }
        if let Some(ci) = &spec.cloud_init {
            v["cloudInit"] = json!(seed_files(name, ci).instance_id);
        }
        v
    }

    /// The state projection of a recorded run config (what observe reports).
    fn project_run(cfg: &VmRunConfig, run: &str) -> Value {
        let (seed, disks): (Vec<&DiskRun>, Vec<&DiskRun>) = cfg
            .disks
            .iter()
            .partition(|d| d.volume.starts_with(SEED_DISK));
        let disks: Vec<Value> = disks
            .iter()
            .map(|d| json!({"volume": d.volume, "readOnly": d.read_only}))
            .collect();
        let interfaces: Vec<Value> = cfg
            .interfaces
            .iter()
            .map(|n| json!({"network": n.network, "mac": n.mac}))
            .collect();
        let mut v = json!({
            "state": run,
            "cpus": cfg.cpus,
            "memory": cfg.memory,
            "kernel": cfg.kernel,
            "disks": disks,
            "interfaces": interfaces,
            "restartPolicy": policy_str(cfg.restart_policy),
        });
        if let Some(i) = &cfg.initrd {
            v["initrd"] = json!(i);
        }
        if let Some(c) = &cfg.cmdline {
            v["cmdline"] = json!(c);
        }
        if let Some(d) = seed.first() {
            v["cloudInit"] = json!(&d.volume[SEED_DISK.len()..]);
        }
        v
    }

    /// Resolves a spec into the config a supervisor runs.
    fn resolve(
        &self,
        name: &str,
        spec: &VirtualMachineSpec,
        world: &dyn Lookup,
    ) -> Result<VmRunConfig, DriverError> {
        let boot = spec.boot.as_ref().ok_or_else(|| {
            DriverError::Unsupported(
                "the vmm engine needs a direct kernel boot (spec.boot.kernel)".into(),
            )
        })?;
        for (what, p) in [
            ("kernel", Some(&boot.kernel)),
            ("initrd", boot.initrd.as_ref()),
        ] {
            if let Some(p) = p
                && !p.is_file()
            {
                return Err(DriverError::NotReady(format!(
                    "{what} {} does not exist",
                    p.display()
                )));
            }
        }
        let mut disks = Vec::new();
        for d in &spec.disks {
            let path = crate::storage::volume_path(world, d.volume.as_str())?;
            if !path.exists() {
                return Err(DriverError::NotReady(format!(
                    "disk of Volume/{} ({}) does not exist yet",
                    d.volume,
                    path.display()
                )));
            }
            disks.push(DiskRun {
                volume: d.volume.as_str().to_string(),
                path,
                read_only: d.read_only,
            });
        }
        let mut interfaces = Vec::new();
        for (i, n) in spec.interfaces.iter().enumerate() {
            if n.vlan.is_some() {
                return Err(DriverError::Unsupported(
                    "VLAN tags on VM interfaces need bridge VLAN filtering (missing on this kernel)"
                        .into(),
                ));
            }
            interfaces.push(InterfaceRun {
                network: n.network.as_str().to_string(),
                tap: tap_name(name, i),
                mac: n.mac.unwrap_or_else(|| generated_mac(name, i)).to_string(),
            });
        }
        disks.extend(self.seed_disk(name, spec)?);
        Ok(VmRunConfig {
            name: name.to_string(),
            cpus: spec.cpus,
            memory: spec.memory.bytes(),
            kernel: boot.kernel.clone(),
            initrd: boot.initrd.clone(),
            cmdline: boot.cmdline.clone(),
            disks,
            interfaces,
            restart_policy: spec.restart_policy,
            running: spec.state == RunState::Running,
            cgroup_parent: self.env.cgroup_parent.clone(),
            netns: self.env.netns.clone(),
            shutdown_timeout_secs: self.stop_timeout_of(spec),
            fence_file: self
                .env
                .fence_file
                .clone()
                .filter(|_| spec.placement.is_ha()),
        })
    }

    /// The cloud-init seed of `spec` (if any) as the VM's last disk: a read-only `cidata`
    /// ISO written to the run dir. Its `volume` is [`SEED_DISK`] + the instance-id, so a
    /// seed change is a config change (restart) and observe reports it as `cloudInit`.
    fn seed_disk(
        &self,
        name: &str,
        spec: &VirtualMachineSpec,
    ) -> Result<Option<DiskRun>, DriverError> {
        let Some(ci) = &spec.cloud_init else {
            return Ok(None);
        };
        let seed = seed_files(name, ci);
        let paths = self.paths(name);
        let fresh = !paths.dir.exists();
        fs::create_dir_all(&paths.dir)
            .map_err(|e| DriverError::io(format!("create {}", paths.dir.display()), e))?;
        if let Err(e) = write_seed_iso(&seed, &paths.seed_iso()) {
            if fresh {
                // Nothing half made: the (empty) run dir would read as a crashed create.
                let _ = fs::remove_dir(&paths.dir);
            }
            return Err(e);
        }
        Ok(Some(DiskRun {
            volume: format!("{SEED_DISK}{}", seed.instance_id),
            path: paths.seed_iso(),
            read_only: true,
        }))
    }

    /// Creates the taps of `cfg` and removes taps of this VM that are no longer wanted.
    fn sync_taps(&self, cfg: &VmRunConfig) -> Result<(), DriverError> {
        let owner = owner_alias(Kind::VirtualMachine, &cfg.name);
        let netns = self.env.netns.as_deref();
        let wanted: BTreeSet<&str> = cfg.interfaces.iter().map(|i| i.tap.as_str()).collect();
        for l in owned_links(netns, &owner)? {
            if !wanted.contains(l.as_str()) {
                delete_link(netns, &l, &owner)?;
            }
        }
        for i in &cfg.interfaces {
            ensure_tap(
                netns,
                &TapSpec {
                    name: i.tap.clone(),
                    bridge: i.network.clone(),
                    owner: owner.clone(),
                    persistent: true,
                    ..TapSpec::default()
                },
            )?;
        }
        Ok(())
    }

    /// Those of `taps` (VM `name`'s) that are gone from the host or no longer carry the
    /// VM's alias (deleted by hand, or by a failed apply's undo while a supervisor lived
    /// on): drift, which apply repairs by making them again and restarting the VM (a
    /// running VMM or QEMU keeps a dead queue of a deleted tap). `links` holds the links'
    /// aliases once read (one dump per observe, however many VMs).
    pub(crate) fn lost_taps<'a>(
        &self,
        name: &str,
        taps: impl IntoIterator<Item = &'a str>,
        links: &LinkAliases,
    ) -> Result<Vec<String>, DriverError> {
        let taps: Vec<&str> = taps.into_iter().collect();
        if taps.is_empty() {
            return Ok(Vec::new());
        }
        let owner = owner_alias(Kind::VirtualMachine, name);
        let aliases = links.get(self.env.netns.as_deref())?;
        Ok(taps
            .into_iter()
            .filter(|t| aliases.get(*t) != Some(&owner))
            .map(str::to_string)
            .collect())
    }

    /// `state` (a [`Self::project_run`]) with no network on the interfaces whose tap is
    /// `lost`, so the plan shows them as changes.
    fn without_networks(mut state: Value, cfg: &VmRunConfig, lost: &[String]) -> Value {
        for (i, n) in cfg.interfaces.iter().enumerate() {
            if lost.contains(&n.tap) {
                state["interfaces"][i]["network"] = Value::Null;
            }
        }
        state
    }

    fn spawn(&self, cfg: &VmRunConfig) -> Result<(), DriverError> {
        let args = VmmArgs {
            run_dir: self.env.run_dir.clone(),
            name: cfg.name.clone(),
            config: self.paths(&cfg.name).config(),
        };
        let _span = tracing::info_span!("vm_start", vm = %cfg.name).entered();
        crate::supervise::refuse_fenced(cfg.fence_file.as_deref())?;
        crate::supervise::launch(&self.env.self_exe, "vmm", &args)?;
        tracing::info!("VM started");
        Ok(())
    }

    /// The config of VM `name` when the qemu engine runs it.
    fn qemu_config(&self, name: &str) -> Option<super::qemu::config::QemuConfig> {
        let raw: Value = read_json(&self.paths(name).config()).ok()??;
        if !qemu::is_qemu_config(&raw) {
            return None;
        }
        serde_json::from_value(raw).ok()
    }

    /// The run state of VM `name` (`running`, `paused`, …) from its VMM's control socket
    /// or QEMU's QMP; `None` when nothing answers.
    pub fn run_state(&self, name: &str) -> Option<String> {
        let paths = self.paths(name);
        if !lock_held(&paths) {
            return None;
        }
        if let Some(cfg) = self.qemu_config(name) {
            return qemu_quiesce::run_state(&cfg, qemu_quiesce::QMP_TIMEOUT);
        }
        control_status(&paths.control_socket()).map(|s| s.state.as_str().to_string())
    }

    /// Pauses VM `name`: returns once every vCPU is parked (device I/O the guest queued
    /// before completes in the VMM, or QEMU drains and flushes its block devices; nothing
    /// new is issued).
    pub fn pause(&self, name: &str) -> Result<(), DriverError> {
        if let Some(cfg) = self.qemu_config(name) {
            return qemu_quiesce::pause(&cfg);
        }
        let r = control_request(&self.paths(name).control_socket(), Request::Pause)
            .map_err(|e| DriverError::io(format!("pause VM {name}"), e))?;
        match r {
            Reply::Ok(s) if s.state == stead_vmm::RunState::Paused => Ok(()),
            r => Err(DriverError::Other(format!(
                "pause VM {name}: VMM answered {}",
                r.to_line()
            ))),
        }
    }

    /// Resumes a paused VM `name`.
    pub fn resume(&self, name: &str) -> Result<(), DriverError> {
        if let Some(cfg) = self.qemu_config(name) {
            return qemu_quiesce::resume(&cfg);
        }
        match control_request(&self.paths(name).control_socket(), Request::Resume) {
            Ok(Reply::Ok(_)) => Ok(()),
            Ok(Reply::Error(e)) => Err(DriverError::Other(format!("resume VM {name}: {e}"))),
            Err(e) => Err(DriverError::io(format!("resume VM {name}"), e)),
        }
    }

    /// Quiesces running VM `name` for a copy of its disks: a pause, preceded on the qemu
    /// engine by a guest agent freeze when the VM has an agent and it answers.
    pub fn quiesce(&self, name: &str) -> Result<Quiesced, DriverError> {
        match self.qemu_config(name) {
            Some(cfg) => qemu_quiesce::quiesce(&cfg),
            None => self.pause(name).map(|()| Quiesced {
                frozen: None,
                agent_note: None,
            }),
        }
    }

    /// Undoes [`Self::quiesce`]: resume, then thaw.
    pub fn release(&self, name: &str, held: &Quiesced) -> Result<(), DriverError> {
        match self.qemu_config(name) {
            Some(cfg) => qemu_quiesce::release(&cfg, held),
            None => self.resume(name),
        }
    }

    /// Stops VM `name` (graceful shutdown, then forced) and waits for its supervisor to
    /// exit; kills leftovers and removes the cgroup. Idempotent.
    pub fn stop(&self, name: &str) -> Result<(), DriverError> {
        let paths = self.paths(name);
        let _span = tracing::info_span!("vm_stop", vm = name).entered();
        if lock_held(&paths) {
            let st: Option<SupervisorState> = read_json(&paths.supervisor_state())?;
            // The QEMU engine's stop may add the guest agent's and quit's grace periods.
            let timeout = Duration::from_secs(self.recorded_stop_timeout(&paths) + 25);
            if let Some(st) = &st {
                let _ = paths
                    .instance()
                    .signal_supervisor(st.supervisor_pid, libc::SIGTERM);
            }
            let t = Instant::now();
            while lock_held(&paths) {
                if t.elapsed() > timeout {
                    tracing::warn!("supervisor did not stop in time, killing it");
                    if let Some(st) = &st {
                        let _ = paths
                            .instance()
                            .signal_supervisor(st.supervisor_pid, libc::SIGKILL);
                    }
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // Leftovers of a dead supervisor (its VMM child dies with it; the cgroup may
        // still hold a process being torn down).
        self.cgroup(name).destroy()?;
        for s in [
            paths.control_socket(),
            paths.console_socket(),
            paths.qmp_socket(),
            paths.qga_socket(),
            paths.vnc_socket(),
        ] {
            match fs::remove_file(&s) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(DriverError::io(format!("remove {}", s.display()), e)),
            }
        }
        Ok(())
    }

    /// Creates or updates VM `cfg.name` from its resolved config: run dir, taps,
    /// `config.json`, supervisor. A failed supervisor start is [`ApplyError::Start`].
    fn apply_config(&self, cfg: &VmRunConfig) -> Result<(), ApplyError> {
        let name = cfg.name.as_str();
        let paths = self.paths(name);
        fs::create_dir_all(&paths.dir)
            .map_err(|e| DriverError::io(format!("create {}", paths.dir.display()), e))?;
        let current: Option<VmRunConfig> = read_json(&paths.config())?;
        // Taps the running VMM has (a new interface restarts it anyway).
        let lost = match &current {
            Some(c) => self.lost_taps(
                name,
                c.interfaces.iter().map(|i| i.tap.as_str()),
                &LinkAliases::default(),
            )?,
            None => Vec::new(),
        };
        self.sync_taps(cfg)?;
        let alive = lock_held(&paths);
        if alive && !lost.is_empty() {
            // Its VMM holds a dead queue of the old tap, or waits for one: boot afresh.
            tracing::info!(taps = ?lost, "taps made again: restarting the VM");
            self.stop(name)?;
        }
        let alive = alive && lost.is_empty();
        // Same VM apart from the hot fields (run state, restart policy, stop timeout)?
        let same = current.as_ref().is_some_and(|c| {
            let mut c = c.clone();
            c.running = cfg.running;
            c.restart_policy = cfg.restart_policy;
            c.shutdown_timeout_secs = cfg.shutdown_timeout_secs;
            c == *cfg
        });
        // The supervisor re-reads these on SIGHUP.
        let policy_changed = current.as_ref().is_some_and(|c| {
            c.restart_policy != cfg.restart_policy
                || c.shutdown_timeout_secs != cfg.shutdown_timeout_secs
        });
        if alive && (!cfg.running || !same) {
            self.stop(name)?;
        }
        write_json(&paths.config(), cfg)?;
        if !cfg.running {
            return Ok(());
        }
        if alive && same {
            if policy_changed
                && let Some(st) = read_json::<SupervisorState>(&paths.supervisor_state())?
            {
                paths
                    .instance()
                    .signal_supervisor(st.supervisor_pid, libc::SIGHUP)?;
            }
            // Running with this config: resume a paused VM.
            if control_status(&paths.control_socket())
                .is_some_and(|s| s.state == stead_vmm::RunState::Paused)
            {
                self.resume(name)?;
            }
            return Ok(());
        }
        self.spawn(cfg).map_err(ApplyError::Start)
    }

    /// A VM that the qemu engine ran and the vmm engine takes over: stop it, drop its
    /// config.
    fn leave_qemu(&self, name: &str) -> Result<(), DriverError> {
        let paths = self.paths(name);
        let raw: Option<Value> = read_json(&paths.config())?;
        if raw.as_ref().is_some_and(qemu::is_qemu_config) {
            self.stop(name)?;
            match fs::remove_file(paths.config()) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(DriverError::io("remove the qemu config", e)),
            }
        }
        Ok(())
    }

    /// Applies a qemu-engine VM ([`qemu::apply`]); a failed create leaves nothing.
    fn apply_qemu(
        &self,
        name: &str,
        spec: &VirtualMachineSpec,
        world: &dyn Lookup,
    ) -> Result<(), DriverError> {
        let fresh = read_json::<Value>(&self.paths(name).config())?.is_none();
        let result = qemu::apply(self, name, spec, world);
        if let Err((start, e)) = &result {
            tracing::warn!(error = %e, fresh, "VM apply failed, undoing what it made");
            let undo = if fresh {
                self.remove_all(name)
            } else if *start {
                self.stop(name)
            } else {
                Ok(())
            };
            if let Err(u) = undo {
                tracing::warn!(error = %u, "cleanup after a failed VM apply");
            }
        }
        result.map_err(|(_, e)| e)
    }

    /// Removes everything VM `name` has on the host: supervisor and VMM, cgroups in
    /// every controller, sockets, owned taps, run dir. Idempotent.
    pub(crate) fn remove_all(&self, name: &str) -> Result<(), DriverError> {
        self.stop(name)?;
        let owner = owner_alias(Kind::VirtualMachine, name);
        let netns = self.env.netns.as_deref();
        for l in owned_links(netns, &owner)? {
            delete_link(netns, &l, &owner)?;
        }
        crate::storage::fsutil::remove_tree_if_exists(&self.paths(name).dir)
    }

    /// The shutdown timeout the running VM's supervisor has (its `config.json`, either
    /// engine), else the driver's default.
    fn recorded_stop_timeout(&self, paths: &Paths) -> u64 {
        read_json::<Value>(&paths.config())
            .ok()
            .flatten()
            .and_then(|v| v.get("shutdown_timeout_secs").and_then(Value::as_u64))
            .unwrap_or(self.shutdown_timeout_secs)
    }

    fn observe_one(&self, name: &str, links: &LinkAliases) -> Result<Observed, DriverError> {
        let paths = self.paths(name);
        let raw: Option<Value> = read_json(&paths.config())?;
        if let Some(v) = raw.as_ref().filter(|v| qemu::is_qemu_config(v)) {
            let cfg = serde_json::from_value(v.clone())
                .map_err(|e| DriverError::Other(format!("{}: {e}", paths.config().display())))?;
            return qemu::observe_one(self, name, &cfg, links);
        }
        let Some(cfg) = raw
            .map(serde_json::from_value::<VmRunConfig>)
            .transpose()
            .map_err(|e| DriverError::Other(format!("{}: {e}", paths.config().display())))?
        else {
            if paths.dir.exists() {
                // Crashed before writing the config: ours, converge by apply.
                return Ok(Observed {
                    exists: true,
                    owned: true,
                    state: Value::Null,
                    status: Value::Null,
                    health: Health::Progressing,
                });
            }
            return Ok(Observed::absent());
        };
        let sup: Option<SupervisorState> = read_json(&paths.supervisor_state())?;
        let alive = lock_held(&paths);
        let phase = sup.as_ref().map(|s| s.phase);
        let vm_status = if alive {
            control_status(&paths.control_socket())
        } else {
            None
        };
        let vm_state = vm_status.as_ref().map(|s| s.state.as_str().to_string());
        let run = match (alive, phase, vm_state.as_deref()) {
            (true, _, Some("paused")) => "paused",
            (true, Some(Phase::Running | Phase::Restarting | Phase::Starting), _) => "running",
            _ => "stopped",
        };
        let cg = self.cgroup(name);
        let usage = if cg.exists() { cg.usage().ok() } else { None };
        let lost = self.lost_taps(name, cfg.interfaces.iter().map(|i| i.tap.as_str()), links)?;
        let status = json!({
            "lostTaps": lost,
            "phase": phase,
            "vmState": vm_state,
            "pid": sup.as_ref().and_then(|s| s.vmm_pid).filter(|_| alive),
            "supervisorPid": sup.as_ref().map(|s| s.supervisor_pid).filter(|_| alive),
            "restarts": sup.as_ref().map_or(0, |s| s.restarts),
            "startedAt": sup.as_ref().and_then(|s| s.started_at.clone()),
            "lastExit": sup.as_ref().and_then(|s| s.last_exit.clone()),
            "lastError": sup.as_ref().and_then(|s| s.last_error.clone()),
            "uptimeMs": vm_status.as_ref().map(|s| s.uptime_ms),
            "cpuSeconds": usage.map(|u| u.cpu_seconds),
            "memoryBytes": usage.map(|u| u.memory_bytes),
            "consoleLog": paths.console_log(),
            "consoleSocket": paths.console_socket(),
            "controlSocket": paths.control_socket(),
            "taps": cfg.interfaces.iter().map(|i| i.tap.clone()).collect::<Vec<_>>(),
            "cgroup": cg.relative(),
        });
        let health = match (alive, phase, run) {
            (true, _, "paused") => Health::Degraded("paused".into()),
            (true, Some(Phase::Running), _) => Health::Ready,
            (true, Some(Phase::Restarting), _) => Health::Degraded(format!(
                "restarting after {}",
                sup.as_ref()
                    .and_then(|s| s.last_exit.clone())
                    .unwrap_or_default()
            )),
            (true, _, _) => Health::Progressing,
            (false, _, _) if !cfg.running => Health::Ready,
            (false, Some(Phase::Fenced), _) => {
                Health::Failed("fenced: the node's fence deadline passed".into())
            }
            (false, Some(Phase::Exited), _)
                if sup.as_ref().and_then(|s| s.last_exit.as_deref()) == Some("shutdown") =>
            {
                Health::Degraded("the guest powered off".into())
            }
            (false, Some(Phase::Exited), _) => Health::Failed(format!(
                "VM exited ({}) and its restart policy does not restart it{}",
                sup.as_ref()
                    .and_then(|s| s.last_exit.clone())
                    .unwrap_or_default(),
                sup.as_ref()
                    .and_then(|s| s.last_error.clone())
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            )),
            (false, _, _) => Health::Degraded("supervisor not running".into()),
        };
        Ok(Observed {
            exists: true,
            owned: true,
            state: with_stop_timeout(
                Self::without_networks(Self::project_run(&cfg, run), &cfg, &lost),
                cfg.shutdown_timeout_secs,
            ),
            status,
            health,
        })
    }
}

/// The aliases of the links in the VMs' network namespace (by link name), dumped on first
/// use and then shared: an observe of many VMs checks all their taps against one dump.
#[derive(Debug, Default)]
pub(crate) struct LinkAliases(std::cell::OnceCell<BTreeMap<String, String>>);

impl LinkAliases {
    fn get(
        &self,
        netns: Option<&std::path::Path>,
    ) -> Result<&BTreeMap<String, String>, DriverError> {
        if let Some(m) = self.0.get() {
            return Ok(m);
        }
        let m = link_aliases(netns)?;
        Ok(self.0.get_or_init(|| m))
    }
}

impl stead_reconciler::driver::KindDriver for VmDriver {
    type Spec = VirtualMachineSpec;

    fn observe(
        &self,
        targets: &[Typed<'_, VirtualMachineSpec>],
        _world: &dyn Lookup,
    ) -> Result<BTreeMap<ResourceId, Observed>, DriverError> {
        let _span = tracing::debug_span!("vm_observe").entered();
        let targets: Vec<&Resource> = targets.iter().map(|t| t.resource).collect();
        let links = LinkAliases::default();
        crate::supervise::observe_instances(&vms_dir(&self.env.run_dir), &targets, |r| {
            self.observe_one(&r.id.name, &links)
        })
    }

    fn desired_state(&self, desired: Typed<'_, VirtualMachineSpec>, _world: &dyn Lookup) -> Value {
        let v = match desired.spec.engine() {
            VmEngine::Vmm => Self::project(desired.name(), desired.spec),
            VmEngine::Qemu => qemu::project(desired.name(), desired.spec),
        };
        with_stop_timeout(v, self.stop_timeout_of(desired.spec))
    }

    fn stop_timeout_secs(
        &self,
        desired: Typed<'_, VirtualMachineSpec>,
        observed: &Observed,
    ) -> Option<u64> {
        let running = observed.state.get("state").and_then(Value::as_str) == Some("running");
        running.then(|| self.stop_timeout_of(desired.spec))
    }

    fn adopt_check(
        &self,
        desired: Typed<'_, VirtualMachineSpec>,
        _observed: &Observed,
        world: &dyn Lookup,
    ) -> Result<(), String> {
        let disks = desired.spec.disks.iter();
        let disks =
            disks.filter_map(|d| crate::storage::volume_path(world, d.volume.as_str()).ok());
        let who = crate::foreign::GuestIdentity::of(desired.resource, disks.collect());
        let runner = crate::foreign::Runner::Qemu;
        crate::foreign::refuse_if_running(runner, &who, &self.env.run_dir, desired.id())
    }

    fn impact(&self, path: &str) -> Impact {
        // Both engines: the qemu engine's state keeps disks and interfaces in maps (one
        // key added or removed is a hot-plug); the vmm engine's lists change whole.
        qemu::impact(path)
    }

    fn check(
        &self,
        desired: Typed<'_, VirtualMachineSpec>,
        _observed: &Observed,
        _changes: &[FieldChange],
    ) -> Result<(), String> {
        let spec = desired.spec;
        if spec.engine() == VmEngine::Qemu {
            return qemu::check(spec);
        }
        if spec.cpus > u32::from(stead_vmm::MAX_VCPUS) {
            return Err(format!(
                "cpus {} exceeds the VMM's maximum of {}",
                spec.cpus,
                stead_vmm::MAX_VCPUS
            ));
        }
        if spec.interfaces.iter().any(|i| i.vlan.is_some()) {
            return Err(
                "VLAN tags on VM interfaces need bridge VLAN filtering (missing on this kernel)"
                    .into(),
            );
        }
        if spec.state == RunState::Running
            && let Some(why) = stead_vmm::kvm_unavailable()
        {
            return Err(format!("cannot run VMs on this host: {why}"));
        }
        Ok(())
    }

    fn apply(
        &self,
        desired: Typed<'_, VirtualMachineSpec>,
        _observed: &Observed,
        world: &dyn Lookup,
    ) -> Result<(), DriverError> {
        let (spec, name) = (desired.spec, desired.name());
        let _span = tracing::info_span!("vm_apply", vm = name).entered();
        crate::supervise::hold::check(&self.env.run_dir, "VirtualMachine", name)?;
        if spec.engine() == VmEngine::Qemu {
            return self.apply_qemu(name, spec, world);
        }
        self.leave_qemu(name)?;
        let cfg = self.resolve(name, spec, world)?;
        // Without a config this apply creates the VM: the resource is recorded only
        // when it succeeds, so a failure must leave nothing behind.
        let fresh = read_json::<VmRunConfig>(&self.paths(name).config())?.is_none();
        let result = self.apply_config(&cfg);
        if let Err(e) = &result {
            tracing::warn!(error = %e, fresh, "VM apply failed, undoing what it made");
            let undo = if fresh {
                self.remove_all(name)
            } else if matches!(e, ApplyError::Start(_)) {
                // The VM was down already: remove the failed start's cgroup and sockets.
                self.stop(name)
            } else {
                Ok(())
            };
            if let Err(u) = undo {
                tracing::warn!(error = %u, "cleanup after a failed VM apply");
            }
        }
        result.map_err(ApplyError::into_inner)
    }

    fn delete(
        &self,
        last_applied: Typed<'_, VirtualMachineSpec>,
        _observed: &Observed,
        _world: &dyn Lookup,
    ) -> Result<(), DriverError> {
        let name = last_applied.name();
        let _span = tracing::info_span!("vm_delete", vm = name).entered();
        // A backup that stopped it would start it again when done.
        crate::supervise::hold::check(&self.env.run_dir, "VirtualMachine", name)?;
        self.remove_all(name)?;
        if last_applied.spec.engine() == VmEngine::Qemu {
            qemu::remove_state(self, name)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stead_reconciler::driver::Driver;
    use stead_schema::Spec;

    fn vm(yaml_spec: &str) -> Resource {
        let v: serde_json::Value = serde_json::from_str(yaml_spec).expect("json");
        Resource {
            id: ResourceId::new(Kind::VirtualMachine, "vm1"),
            metadata: Default::default(),
            spec: Spec::from_value(Kind::VirtualMachine, v).expect("spec"),
            origin: Default::default(),
        }
    }

    #[test]
    fn projection_generates_macs_and_bytes() {
        let r = vm(
            r#"{"cpus":2,"memory":"64Mi","boot":{"kernel":"/k","cmdline":"mode=idle"},
                "disks":[{"volume":"d1"}],"interfaces":[{"network":"lan0"}]}"#,
        );
        let Spec::VirtualMachine(s) = &r.spec else {
            panic!("not a VM")
        };
        let v = VmDriver::project("vm1", s);
        assert_eq!(v["memory"], 64 << 20);
        assert_eq!(v["state"], "running");
        assert_eq!(v["disks"][0], json!({"volume":"d1","readOnly":false}));
        assert_eq!(
            v["interfaces"][0]["mac"],
            generated_mac("vm1", 0).to_string()
        );
        assert_eq!(v["cmdline"], "mode=idle");
        assert!(v.get("initrd").is_none());
    }

    #[test]
    fn impacts() {
        let d = sandbox_driver(std::path::Path::new("/nonexistent"));
        assert_eq!(d.impact("/state"), Impact::Hot);
        assert_eq!(d.impact("/restartPolicy"), Impact::Hot);
        assert_eq!(d.impact("/stopTimeout"), Impact::Hot);
        assert_eq!(d.impact("/cpus"), Impact::Restart);
        assert_eq!(d.impact("/memory"), Impact::Restart);
        assert_eq!(d.impact("/disks/0/readOnly"), Impact::Restart);
        assert_eq!(d.impact("/interfaces/1/mac"), Impact::Restart);
        assert_eq!(d.impact("/kernel"), Impact::Restart);
    }

    fn sandbox_driver(run_dir: &std::path::Path) -> VmDriver {
        VmDriver {
            env: HostEnv {
                state_dir: run_dir.join("state"),
                run_dir: run_dir.to_path_buf(),
                cgroup_parent: format!("stead-unit-{}", std::process::id()),
                netns: None,
                self_exe: "/bin/false".into(),
                fence_file: None,
            },
            hier: Hierarchy::v2(run_dir.join("no-cgroups")),
            shutdown_timeout_secs: 1,
        }
    }

    /// The run config of a running VM `vm1` (1 vCPU, 32 MiB, kernel `/k`, no disks or
    /// interfaces, restart policy `always`).
    fn run_config(cgroup_parent: &str) -> VmRunConfig {
        VmRunConfig {
            name: "vm1".into(),
            cpus: 1,
            memory: 32 << 20,
            kernel: "/k".into(),
            initrd: None,
            cmdline: None,
            disks: vec![],
            interfaces: vec![],
            restart_policy: RestartPolicy::Always,
            running: true,
            cgroup_parent: cgroup_parent.into(),
            netns: None,
            shutdown_timeout_secs: 1,
            fence_file: None,
        }
    }

    #[test]
    fn observe_absent_half_created_and_dead_supervisor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = sandbox_driver(dir.path());
        let r = vm(r#"{"cpus":1,"memory":"32Mi","boot":{"kernel":"/k"}}"#);
        let world: BTreeMap<ResourceId, Resource> = BTreeMap::new();
        let o = d.observe(&[&r], &world).expect("observe");
        assert!(!o[&r.id].exists, "no run dir at all");

        // A directory without config.json: a create that crashed early, ours.
        let paths = d.paths("vm1");
        fs::create_dir_all(&paths.dir).expect("mkdir");
        let o = d.observe(&[&r], &world).expect("observe");
        assert!(o[&r.id].exists && o[&r.id].owned);
        assert_eq!(o[&r.id].state, Value::Null);

        // A config whose supervisor is gone: stopped, i.e. drift from running.
        let Spec::VirtualMachine(spec) = &r.spec else {
            panic!("not a VM")
        };
        let mut cfg = run_config(&d.env.cgroup_parent);
        cfg.shutdown_timeout_secs = d.stop_timeout_of(spec);
        write_json(&paths.config(), &cfg).expect("config");
        let o = &d.observe(&[&r], &world).expect("observe")[&r.id];
        assert_eq!(o.state["state"], "stopped");
        assert!(matches!(o.health, Health::Degraded(_)), "{:?}", o.health);
        let mut want = with_stop_timeout(VmDriver::project("vm1", spec), d.stop_timeout_of(spec));
        want["state"] = json!("stopped");
        assert_eq!(o.state, want, "only the run state differs");

        // Declared stopped and not running: healthy.
        cfg.running = false;
        write_json(&paths.config(), &cfg).expect("config");
        let o = &d.observe(&[&r], &world).expect("observe")[&r.id];
        assert_eq!(o.health, Health::Ready);
    }

    #[test]
    fn run_projection_matches_spec_projection() {
        let r = vm(r#"{"cpus":1,"memory":"32Mi","boot":{"kernel":"/k"},
                "disks":[{"volume":"d1","readOnly":true}],"interfaces":[{"network":"lan0","mac":"52:54:00:00:00:01"}],
                "restartPolicy":"on-failure"}"#);
        let Spec::VirtualMachine(s) = &r.spec else {
            panic!("not a VM")
        };
        let cfg = VmRunConfig {
            disks: vec![DiskRun {
                volume: "d1".into(),
                path: "/p".into(),
                read_only: true,
            }],
            interfaces: vec![InterfaceRun {
                network: "lan0".into(),
                tap: tap_name("vm1", 0),
                mac: "52:54:00:00:00:01".into(),
            }],
            restart_policy: RestartPolicy::OnFailure,
            ..run_config("x")
        };
        assert_eq!(
            VmDriver::project_run(&cfg, "running"),
            VmDriver::project("vm1", s)
        );
    }

    #[test]
    fn a_cloud_init_seed_is_a_last_read_only_disk_named_by_its_instance_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = sandbox_driver(dir.path());
        let r = vm(r#"{"cpus":1,"memory":"32Mi","boot":{"kernel":"/k"},
                "cloudInit":{"users":[{"name":"ops","sshAuthorizedKeys":["k"]}]}}"#);
        let Spec::VirtualMachine(s) = &r.spec else {
            panic!("not a VM")
        };
        let want = VmDriver::project("vm1", s);
        let id = want["cloudInit"].as_str().expect("instance-id").to_string();
        assert!(id.starts_with("stead-vm1-"), "{id}");
        let seed = match d.seed_disk("vm1", s) {
            Err(DriverError::Unsupported(why)) => {
                println!(
                    "SKIP a_cloud_init_seed_is_a_last_read_only_disk_named_by_its_instance_id: {why}"
                );
                return;
            }
            r => r.expect("seed disk").expect("a seed"),
        };
        assert!(seed.read_only);
        assert_eq!(seed.path, d.paths("vm1").seed_iso());
        assert!(seed.path.is_file());
        let cfg = VmRunConfig {
            disks: vec![seed],
            ..run_config("x")
        };
        let got = VmDriver::project_run(&cfg, "running");
        assert_eq!(
            got, want,
            "the seed disk reads back as cloudInit, not as a disk"
        );
        assert_eq!(d.impact("/cloudInit"), Impact::Restart);

        // Without cloudInit: no seed, nothing written.
        let plain = vm(r#"{"boot":{"kernel":"/k"}}"#);
        let Spec::VirtualMachine(p) = &plain.spec else {
            panic!("not a VM")
        };
        assert!(d.seed_disk("vm2", p).expect("no seed").is_none());
        assert!(!d.paths("vm2").dir.exists());
        assert!(VmDriver::project("vm2", p).get("cloudInit").is_none());
    }
}
