//! The qemu engine's side of the VirtualMachine driver ([`crate::vm::VmDriver`] dispatches
//! here by `spec.engine()`).
//!
//! State shape (desired and observed): `{"engine": "qemu", "state", "cpus", "memory",
//! "accel", "firmware", "secureBoot", "agent", "cloudInit"? (the seed's instance-id),
//! "restartPolicy", "disks": {VOLUME: {"bus","cache","discard","readOnly","boot"?}},
//! "cdroms": {VOLUME: {"boot"?}}, "interfaces": {MAC: {"network","boot"?}}}`. Disks,
//! cdroms and interfaces are maps, so adding or removing one is a change of one key:
//! adding or removing a disk or an interface is `hot` (hot-plugged over QMP), changing one
//! restarts the VM, as do cpus, memory, accel, firmware, cdroms and cloud-init
//! ([`impact`]).
//!
//! Apply writes the cloud-init seed ISO, resolves the [`QemuConfig`], creates the UEFI
//! NVRAM once, the taps, writes `config.json` and starts `stead qemu` (or hot-plugs, or
//! restarts it). Delete stops the VM gracefully (the supervisor's ACPI → agent → quit
//! sequence) and removes the run dir, the taps, the cgroup and the NVRAM — never the
//! disks, which belong to their Volumes.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::time::Duration;

use serde_json::{Map, Value, json};
use stead_reconciler::driver::{DriverError, Health, Impact, Lookup, Observed};
use stead_schema::{Kind, RestartPolicy, RunState, VirtualMachineSpec};

use super::accel::HostCaps;
use super::argv;
use super::cloudinit::{seed_files, write_seed_iso};
use super::config::{QemuConfig, QemuDisk, QemuNic, ResolveEnv, resolve, tap_name};
use super::firmware;
use super::qga::Qga;
use super::qmp::{self, DeviceAdd, NetdevAdd, NetdevDel, Qmp};
use super::supervisor::QemuState;
use crate::container::config::{read_json, write_json};
use crate::net::attach::{TapSpec, delete_link, ensure_tap, owned_links};
use crate::net::netns::{NetnsRef, run_in};
use crate::net::owner_alias;
use crate::vm::config::{Paths, Phase, generated_mac};
use crate::vm::driver::{LinkAliases, VmDriver};

/// Timeout of the driver's QMP and guest agent exchanges while observing.
const OBSERVE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a hot-unplug waits for the guest to release the device.
const UNPLUG_TIMEOUT: Duration = Duration::from_secs(15);

fn policy_str(p: RestartPolicy) -> &'static str {
    match p {
        RestartPolicy::Always => "always",
        RestartPolicy::OnFailure => "on-failure",
        RestartPolicy::Never => "never",
    }
}

fn lower<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn with_boot(mut o: Value, boot: Option<u32>) -> Value {
    if let Some(b) = boot {
        o["boot"] = json!(b);
    }
    o
}

/// Whether a config.json value is the qemu engine's.
pub fn is_qemu_config(v: &Value) -> bool {
    v.get("engine").and_then(Value::as_str) == Some(super::config::ENGINE)
}

/// The desired state of a qemu-engine VM (see the module docs).
pub fn project(name: &str, spec: &VirtualMachineSpec) -> Value {
    let disks: Map<String, Value> = spec
        .disks
        .iter()
        .map(|d| {
            let o = json!({
                "bus": lower(&d.bus.unwrap_or_default()),
                "cache": lower(&d.cache.unwrap_or_default()),
                "discard": d.discard,
                "readOnly": d.read_only,
            });
            (d.volume.as_str().to_string(), with_boot(o, d.boot))
        })
        .collect();
    let cdroms: Map<String, Value> = spec
        .cdroms
        .iter()
        .map(|c| (c.volume.as_str().to_string(), with_boot(json!({}), c.boot)))
        .collect();
    let interfaces: Map<String, Value> = spec
        .interfaces
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let mac = n.mac.unwrap_or_else(|| generated_mac(name, i));
            let o = json!({"network": n.network.as_str()});
            (mac.to_string(), with_boot(o, n.boot))
        })
        .collect();
    let mut v = json!({
        "engine": "qemu",
        "state": match spec.state { RunState::Running => "running", RunState::Stopped => "stopped" },
        "cpus": spec.cpus,
        "memory": spec.memory.bytes().div_ceil(1 << 20) << 20,
        "accel": lower(&spec.accel),
        "firmware": lower(&spec.firmware),
        "secureBoot": spec.secure_boot,
        "agent": spec.agent,
        "restartPolicy": policy_str(spec.restart_policy),
        "disks": disks,
        "cdroms": cdroms,
        "interfaces": interfaces,
    });
    if let Some(ci) = &spec.cloud_init {
        v["cloudInit"] = json!(seed_files(name, ci).instance_id);
    }
    v
}

/// The state of a recorded config (what observe reports), `run` the run state.
pub fn project_config(cfg: &QemuConfig, run: &str) -> Value {
    let disks: Map<String, Value> = cfg
        .disks
        .iter()
        .map(|d| {
            let o = json!({
                "bus": lower(&d.bus),
                "cache": lower(&d.cache),
                "discard": d.discard,
                "readOnly": d.read_only,
            });
            (d.volume.clone(), with_boot(o, d.boot))
        })
        .collect();
    let cdroms: Map<String, Value> = cfg
        .cdroms
        .iter()
        .filter_map(|c| Some((c.volume.clone()?, with_boot(json!({}), c.boot))))
        .collect();
    let interfaces: Map<String, Value> = cfg
        .nics
        .iter()
        .map(|n| {
            (
                n.mac.clone(),
                with_boot(json!({"network": n.network}), n.boot),
            )
        })
        .collect();
    let (firmware, secure_boot) = match &cfg.firmware {
        super::config::FirmwareRun::Bios => ("bios", false),
        super::config::FirmwareRun::Uefi { secure_boot, .. } => ("uefi", *secure_boot),
    };
    let mut v = json!({
        "engine": "qemu",
        "state": run,
        "cpus": cfg.cpus,
        "memory": cfg.memory,
        "accel": lower(&cfg.requested_accel),
        "firmware": firmware,
        "secureBoot": secure_boot,
        "agent": cfg.agent,
        "restartPolicy": policy_str(cfg.restart_policy),
        "disks": disks,
        "cdroms": cdroms,
        "interfaces": interfaces,
    });
    if let Some(id) = &cfg.cloud_init {
        v["cloudInit"] = json!(id);
    }
    v
}

/// The impact of a change at `path` of a VM's state, both engines: `state` and
/// `restartPolicy` are hot; so is adding or removing one disk or interface of a
/// qemu-engine VM (`/disks/VOLUME`, `/interfaces/MAC`: its state keeps them in maps; the
/// vmm engine's lists change as a whole, `/disks`); everything else restarts the VM.
pub fn impact(path: &str) -> Impact {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["state" | "restartPolicy" | "stopTimeout", ..] => Impact::Hot,
        ["disks" | "interfaces", _] => Impact::Hot,
        _ => Impact::Restart,
    }
}

/// Plan-time checks of a qemu-engine VM: the accelerator the host can give it.
pub fn check(spec: &VirtualMachineSpec) -> Result<(), String> {
    if spec.state == RunState::Running {
        super::accel::choose(spec.accel, HostCaps::detect())?;
    }
    Ok(())
}

/// The guest's addresses from the agent (loopback left out).
fn guest_ips(cfg: &QemuConfig) -> (Value, Value) {
    let r =
        Qga::connect(&cfg.sockets.qga, OBSERVE_TIMEOUT).and_then(|mut a| a.network_interfaces());
    match r {
        Ok(ifs) => {
            let ips: Vec<String> = ifs
                .iter()
                .flat_map(|i| i.ip_addresses.iter())
                .filter_map(|a| a.addr())
                .filter(|a| !a.is_loopback())
                .map(|a| a.to_string())
                .collect();
            (json!(ips), json!("ok"))
        }
        Err(e) => (Value::Null, json!(format!("not answering: {e}"))),
    }
}

/// The guest's run state from QMP (`running`, `paused`, …).
fn qmp_state(cfg: &QemuConfig) -> Option<String> {
    super::quiesce::run_state(cfg, OBSERVE_TIMEOUT)
}

/// Observes qemu-engine VM `name` whose `config.json` is `cfg`.
pub(crate) fn observe_one(
    vm: &VmDriver,
    name: &str,
    cfg: &QemuConfig,
    links: &LinkAliases,
) -> Result<Observed, DriverError> {
    let paths = vm.paths(name);
    let sup: Option<QemuState> = read_json(&paths.supervisor_state())?;
    let alive = paths.instance().lock_held();
    let phase = sup.as_ref().map(|s| s.phase);
    let vm_state = if alive { qmp_state(cfg) } else { None };
    let run = match (alive, phase, vm_state.as_deref()) {
        (true, _, Some("paused")) => "paused",
        (true, Some(Phase::Running | Phase::Restarting | Phase::Starting), _) => "running",
        _ => "stopped",
    };
    let (ips, agent) = if alive && cfg.agent && vm_state.as_deref() == Some("running") {
        guest_ips(cfg)
    } else {
        (Value::Null, Value::Null)
    };
    let cg = vm.cgroup(name);
    let usage = if cg.exists() { cg.usage().ok() } else { None };
    let s = sup.as_ref();
    let lost = vm.lost_taps(name, cfg.nics.iter().map(|n| n.tap.as_str()), links)?;
    let status = json!({
        "engine": "qemu",
        "lostTaps": lost,
        "phase": phase,
        "vmState": vm_state,
        "accel": cfg.accel.as_str(),
        "warning": cfg.warning(),
        "pid": s.and_then(|s| s.qemu_pid).filter(|_| alive),
        "supervisorPid": s.map(|s| s.supervisor_pid).filter(|_| alive),
        "restarts": s.map_or(0, |s| s.restarts),
        "startedAt": s.and_then(|s| s.started_at.clone()),
        "lastExit": s.and_then(|s| s.last_exit.clone()),
        "lastError": s.and_then(|s| s.last_error.clone()),
        "guestIps": ips,
        "agent": agent,
        "cpuSeconds": usage.map(|u| u.cpu_seconds),
        "memoryBytes": usage.map(|u| u.memory_bytes),
        "consoleLog": paths.console_log(),
        "consoleSocket": paths.console_socket(),
        "qmpSocket": cfg.sockets.qmp,
        "vncSocket": cfg.sockets.vnc,
        "nvram": cfg.nvram(),
        "disks": cfg.disks.iter().map(|d| json!({"volume": d.volume, "node": d.node(), "path": d.path, "format": d.format})).collect::<Vec<_>>(),
        "taps": cfg.nics.iter().map(|n| n.tap.clone()).collect::<Vec<_>>(),
        "cgroup": cg.relative(),
    });
    let last_exit = s.and_then(|s| s.last_exit.clone()).unwrap_or_default();
    let health = match (alive, phase, run) {
        (true, _, "paused") => Health::Degraded("paused".into()),
        (true, Some(Phase::Running), _) => Health::Ready,
        (true, Some(Phase::Restarting), _) => {
            Health::Degraded(format!("restarting after {last_exit}"))
        }
        (true, _, _) => Health::Progressing,
        (false, _, _) if !cfg.running => Health::Ready,
        (false, Some(Phase::Fenced), _) => {
            Health::Failed("fenced: the node's fence deadline passed".into())
        }
        (false, Some(Phase::Exited), _) if last_exit == "shutdown" => {
            Health::Degraded("the guest powered off".into())
        }
        (false, Some(Phase::Exited), _) => Health::Failed(format!(
            "QEMU exited ({last_exit}) and its restart policy does not restart it{}",
            s.and_then(|s| s.last_error.clone())
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        )),
        (false, _, _) => Health::Degraded("supervisor not running".into()),
    };
    let mut state =
        crate::vm::driver::with_stop_timeout(project_config(cfg, run), cfg.shutdown_timeout_secs);
    for n in cfg.nics.iter().filter(|n| lost.contains(&n.tap)) {
        // Drift the plan shows; apply makes the tap again and restarts the VM.
        state["interfaces"][&n.mac]["network"] = Value::Null;
    }
    Ok(Observed {
        exists: true,
        owned: true,
        state,
        status,
        health,
    })
}

/// Writes the cloud-init seed ISO of `spec` into the run dir; its path and instance-id.
fn write_seed(
    paths: &Paths,
    name: &str,
    spec: &VirtualMachineSpec,
) -> Result<Option<(std::path::PathBuf, String)>, DriverError> {
    let Some(ci) = &spec.cloud_init else {
        return Ok(None);
    };
    let seed = seed_files(name, ci);
    write_seed_iso(&seed, &paths.seed_iso())?;
    Ok(Some((paths.seed_iso(), seed.instance_id)))
}

/// Creates the taps of `cfg` and removes this VM's taps that are no longer wanted.
fn sync_taps(vm: &VmDriver, cfg: &QemuConfig) -> Result<(), DriverError> {
    let owner = owner_alias(Kind::VirtualMachine, &cfg.name);
    let netns = vm.env().netns.as_deref();
    let wanted: BTreeSet<&str> = cfg.nics.iter().map(|n| n.tap.as_str()).collect();
    for l in owned_links(netns, &owner)? {
        if !wanted.contains(l.as_str()) {
            delete_link(netns, &l, &owner)?;
        }
    }
    for n in &cfg.nics {
        ensure_tap(
            netns,
            &TapSpec {
                name: n.tap.clone(),
                bridge: n.network.clone(),
                owner: owner.clone(),
                persistent: true,
                ..TapSpec::default()
            },
        )?;
    }
    Ok(())
}

/// `cfg` with the ids of the disks and interfaces `running` has kept (by volume / MAC)
/// and fresh ids (lowest free) for the new ones: a hot-plug leaves running devices alone.
fn keep_ids(mut cfg: QemuConfig, running: &QemuConfig) -> QemuConfig {
    let disk_ids: BTreeMap<&str, &str> = running
        .disks
        .iter()
        .map(|d| (d.volume.as_str(), d.id.as_str()))
        .collect();
    let nic_ids: BTreeMap<&str, &str> = running
        .nics
        .iter()
        .map(|n| (n.mac.as_str(), n.id.as_str()))
        .collect();
    let mut used: BTreeSet<String> = BTreeSet::new();
    for d in &mut cfg.disks {
        if let Some(id) = disk_ids.get(d.volume.as_str()) {
            d.id = (*id).to_string();
            used.insert(d.id.clone());
        }
    }
    for d in &mut cfg.disks {
        if !disk_ids.contains_key(d.volume.as_str()) {
            d.id = (0..)
                .map(|i| format!("disk{i}"))
                .find(|c| !used.contains(c))
                .unwrap_or_default();
            used.insert(d.id.clone());
        }
    }
    for n in &mut cfg.nics {
        if let Some(id) = nic_ids.get(n.mac.as_str()) {
            n.id = (*id).to_string();
            used.insert(n.id.clone());
        }
    }
    for n in &mut cfg.nics {
        if !nic_ids.contains_key(n.mac.as_str()) {
            n.id = (0..)
                .map(|i| format!("net{i}"))
                .find(|c| !used.contains(c))
                .unwrap_or_default();
            used.insert(n.id.clone());
        }
    }
    cfg
}

/// What a hot-plug changes: disks and interfaces to remove and to add.
#[derive(Debug, Default, PartialEq)]
pub struct HotPlug {
    /// Disks to unplug.
    pub remove_disks: Vec<QemuDisk>,
    /// Disks to plug.
    pub add_disks: Vec<QemuDisk>,
    /// Interfaces to unplug.
    pub remove_nics: Vec<QemuNic>,
    /// Interfaces to plug.
    pub add_nics: Vec<QemuNic>,
}

/// The hot-plug that turns the running `old` into `new`, or `None` when anything else
/// differs too (or a disk to plug is not on virtio): that needs a restart.
pub fn hot_plug(old: &QemuConfig, new: &QemuConfig) -> Option<HotPlug> {
    let mut a = old.clone();
    let mut b = new.clone();
    for c in [&mut a, &mut b] {
        c.disks.clear();
        c.nics.clear();
        c.running = true;
        c.restart_policy = RestartPolicy::Always;
        c.shutdown_timeout_secs = 0;
    }
    if a != b {
        return None;
    }
    let old_disks: BTreeMap<&str, &QemuDisk> =
        old.disks.iter().map(|d| (d.volume.as_str(), d)).collect();
    let new_disks: BTreeMap<&str, &QemuDisk> =
        new.disks.iter().map(|d| (d.volume.as_str(), d)).collect();
    let mut hp = HotPlug::default();
    for (v, d) in &old_disks {
        match new_disks.get(v) {
            None => hp.remove_disks.push((*d).clone()),
            Some(n) if n != d => return None,
            Some(_) => {}
        }
    }
    for (v, d) in &new_disks {
        if !old_disks.contains_key(v) {
            if d.bus != stead_schema::DiskBus::Virtio {
                return None;
            }
            hp.add_disks.push((*d).clone());
        }
    }
    let old_nics: BTreeMap<&str, &QemuNic> = old.nics.iter().map(|n| (n.mac.as_str(), n)).collect();
    let new_nics: BTreeMap<&str, &QemuNic> = new.nics.iter().map(|n| (n.mac.as_str(), n)).collect();
    for (m, n) in &old_nics {
        match new_nics.get(m) {
            None => hp.remove_nics.push((*n).clone()),
            Some(x) if x != n => return None,
            Some(_) => {}
        }
    }
    for (m, n) in &new_nics {
        if !old_nics.contains_key(m) {
            hp.add_nics.push((*n).clone());
        }
    }
    Some(hp)
}

fn props(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Plugs a virtio disk into a running QEMU.
fn plug_disk(q: &mut Qmp, d: &QemuDisk) -> Result<(), DriverError> {
    let (direct, no_flush) = match d.cache {
        stead_schema::DiskCache::None => (true, false),
        stead_schema::DiskCache::Directsync => (true, false),
        stead_schema::DiskCache::Unsafe => (false, true),
        _ => (false, false),
    };
    let cache = json!({"direct": direct, "no-flush": no_flush});
    let discard = if d.discard { "unmap" } else { "ignore" };
    let mut file = qmp::file_node(&d.file_node(), &d.path, d.read_only);
    file["cache"] = cache.clone();
    file["discard"] = json!(discard);
    let mut fmt = qmp::format_node(d.format.as_str(), &d.node(), &d.file_node(), d.read_only);
    fmt["cache"] = cache;
    fmt["discard"] = json!(discard);
    q.execute(&qmp::BlockdevAdd(file))?;
    q.execute(&qmp::BlockdevAdd(fmt))?;
    let mut p = json!({"drive": d.node()});
    if let Some(b) = d.boot {
        p["bootindex"] = json!(b);
    }
    q.execute(&DeviceAdd {
        driver: "virtio-blk-pci".into(),
        id: d.device_id(),
        props: props(p),
    })?;
    Ok(())
}

/// Unplugs a disk (the guest must release it) and deletes its nodes.
fn unplug_disk(q: &mut Qmp, d: &QemuDisk) -> Result<(), DriverError> {
    q.device_del_wait(&d.device_id(), UNPLUG_TIMEOUT)?;
    q.execute(&qmp::BlockdevDel {
        node_name: d.node(),
    })?;
    q.execute(&qmp::BlockdevDel {
        node_name: d.file_node(),
    })?;
    Ok(())
}

fn plug_nic(q: &mut Qmp, cfg: &QemuConfig, n: &QemuNic) -> Result<(), DriverError> {
    // The tap is opened here (in the VM's namespace) and handed over: QEMU never makes a
    // tap by name (see `crate::vm::tap`).
    let owner = owner_alias(Kind::VirtualMachine, &cfg.name);
    let ns = cfg.netns.as_deref().map(NetnsRef::from);
    let fd = run_in(ns.as_ref(), || {
        crate::vm::tap::open_owned(&n.tap, &owner, true).map_err(DriverError::Other)
    })?;
    q.getfd(&n.id, std::os::fd::AsFd::as_fd(&fd))?;
    q.execute(&NetdevAdd {
        kind: "tap".into(),
        id: n.id.clone(),
        props: props(json!({"fd": n.id})),
    })?;
    let mut p = json!({"netdev": n.id, "mac": n.mac});
    if let Some(b) = n.boot {
        p["bootindex"] = json!(b);
    }
    q.execute(&DeviceAdd {
        driver: "virtio-net-pci".into(),
        id: format!("{}-dev", n.id),
        props: props(p),
    })?;
    Ok(())
}

fn unplug_nic(q: &mut Qmp, n: &QemuNic) -> Result<(), DriverError> {
    q.device_del_wait(&format!("{}-dev", n.id), UNPLUG_TIMEOUT)?;
    q.execute(&NetdevDel { id: n.id.clone() })?;
    Ok(())
}

/// Applies `hp` to the running QEMU of `cfg` over its QMP socket.
fn apply_hot_plug(cfg: &QemuConfig, hp: &HotPlug) -> Result<(), DriverError> {
    let _span = tracing::info_span!("vm_hot_plug", vm = %cfg.name).entered();
    let mut q = Qmp::connect(&cfg.sockets.qmp, Duration::from_secs(5))?;
    for d in &hp.remove_disks {
        unplug_disk(&mut q, d)?;
    }
    for n in &hp.remove_nics {
        unplug_nic(&mut q, n)?;
    }
    for d in &hp.add_disks {
        if let Some(creds) = &cfg.run_as {
            super::runas::prepare_files([d.path.as_path()], creds).map_err(DriverError::Other)?;
        }
        plug_disk(&mut q, d)?;
    }
    for n in &hp.add_nics {
        plug_nic(&mut q, cfg, n)?;
    }
    tracing::info!(
        disks_added = hp.add_disks.len(),
        disks_removed = hp.remove_disks.len(),
        nics_added = hp.add_nics.len(),
        nics_removed = hp.remove_nics.len(),
        "hot-plugged"
    );
    Ok(())
}

/// Resolves the config of VM `name` (writing its seed ISO first).
fn resolve_config(
    vm: &VmDriver,
    name: &str,
    spec: &VirtualMachineSpec,
    world: &dyn Lookup,
) -> Result<QemuConfig, DriverError> {
    let paths = vm.paths(name);
    fs::create_dir_all(&paths.dir)
        .map_err(|e| DriverError::io(format!("create {}", paths.dir.display()), e))?;
    if super::runas::Setting::from_env() != super::runas::Setting::Root {
        // QEMU's user must reach its socket dir and NVRAM through stead's own directories.
        let env = vm.env();
        let vms_state = env.state_dir.join("vms");
        super::runas::open_for_search([
            env.run_dir.as_path(),
            paths.dir.parent().unwrap_or(&paths.dir),
            paths.dir.as_path(),
            env.state_dir.as_path(),
            vms_state.as_path(),
            vms_state.join(name).as_path(),
        ])
        .map_err(DriverError::Other)?;
    }
    let seed = write_seed(&paths, name, spec)?;
    let firmware_dir = firmware::descriptor_dir();
    let env = ResolveEnv {
        host: vm.env(),
        firmware_dir: &firmware_dir,
        caps: HostCaps::detect(),
        shutdown_timeout_secs: vm.shutdown_timeout_secs,
        seed,
    };
    let cfg = resolve(name, spec, world, &env)?;
    argv::check(&cfg).map_err(DriverError::Unsupported)?;
    Ok(cfg)
}

/// Converges qemu-engine VM `name` to `spec`. Errors are split like the vmm engine's:
/// `Err(Ok(e))` a failed start, `Err(Err(e))` anything else.
pub fn apply(
    vm: &VmDriver,
    name: &str,
    spec: &VirtualMachineSpec,
    world: &dyn Lookup,
) -> Result<(), (bool, DriverError)> {
    let other = |e| (false, e);
    let paths = vm.paths(name);
    let current_raw: Option<Value> = read_json(&paths.config()).map_err(other)?;
    let alive = paths.instance().lock_held();
    if alive && current_raw.as_ref().is_some_and(|v| !is_qemu_config(v)) {
        // The vmm engine runs it: stop that first.
        vm.stop(name).map_err(other)?;
    }
    let current: Option<QemuConfig> = current_raw
        .filter(is_qemu_config)
        .and_then(|v| serde_json::from_value(v).ok());
    let mut cfg = resolve_config(vm, name, spec, world).map_err(other)?;
    // A cluster node about to receive the guest live starts it waiting for it.
    cfg.incoming = super::migrate::starts_incoming(&paths, current.as_ref().filter(|_| alive));
    if let Some(w) = cfg.warning() {
        tracing::warn!(vm = name, "{w}");
    }
    if let Some(t) = cfg.nvram().map(|p| p.to_path_buf())
        && let super::config::FirmwareRun::Uefi { vars_template, .. } = &cfg.firmware
    {
        firmware::ensure_nvram(&t, vars_template).map_err(other)?;
    }
    // Taps the running QEMU has (not new interfaces, which hot-plug makes).
    let lost = match &current {
        Some(cur) => vm
            .lost_taps(
                name,
                cur.nics.iter().map(|n| n.tap.as_str()),
                &LinkAliases::default(),
            )
            .map_err(other)?,
        None => Vec::new(),
    };
    sync_taps(vm, &cfg).map_err(other)?;
    let alive = paths.instance().lock_held();
    if let Some(cur) = current.as_ref().filter(|_| alive) {
        cfg = keep_ids(cfg, cur);
        // A tap made again: QEMU holds a dead queue of the old one (or waits for it), so
        // the VM boots afresh rather than being hot-plugged.
        if cfg.running
            && lost.is_empty()
            && let Some(hp) = hot_plug(cur, &cfg)
        {
            // The supervisor re-reads these on SIGHUP.
            let policy_changed = cur.restart_policy != cfg.restart_policy
                || cur.shutdown_timeout_secs != cfg.shutdown_timeout_secs;
            let live = apply_hot_plug(&cfg, &hp);
            match live {
                Ok(()) => {
                    write_json(&paths.config(), &cfg).map_err(other)?;
                    if policy_changed
                        && let Some(st) =
                            read_json::<QemuState>(&paths.supervisor_state()).map_err(other)?
                    {
                        paths
                            .instance()
                            .signal_supervisor(st.supervisor_pid, libc::SIGHUP)
                            .map_err(other)?;
                    }
                    // A target waits paused for its migration's end to `cont` it.
                    if !cfg.incoming {
                        resume_if_paused(&cfg);
                    }
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "hot-plug failed: restarting the VM instead");
                }
            }
        }
        vm.stop(name).map_err(other)?;
    }
    write_json(&paths.config(), &cfg).map_err(other)?;
    if !cfg.running {
        if alive {
            vm.stop(name).map_err(other)?;
        }
        return Ok(());
    }
    spawn(vm, &cfg).map_err(|e| (true, e))
}

/// `cont` on a paused VM.
fn resume_if_paused(cfg: &QemuConfig) {
    if let Ok(mut q) = Qmp::connect(&cfg.sockets.qmp, OBSERVE_TIMEOUT)
        && q.query_status()
            .is_ok_and(|s| s.status == qmp::RunState::Paused)
        && let Err(e) = q.execute(&qmp::Cont)
    {
        tracing::warn!(error = %e, "resume");
    }
}

/// Starts `stead qemu` for `cfg` (already written as the VM's config.json).
fn spawn(vm: &VmDriver, cfg: &QemuConfig) -> Result<(), DriverError> {
    crate::supervise::refuse_fenced(cfg.fence_file.as_deref())?;
    let args = super::supervisor::QemuArgs {
        run_dir: vm.env().run_dir.clone(),
        name: cfg.name.clone(),
        config: vm.paths(&cfg.name).config(),
    };
    let _span = tracing::info_span!("vm_start", vm = %cfg.name, engine = "qemu").entered();
    let exe = crate::supervise::supervisor_exe(&vm.env().self_exe);
    crate::supervise::launch(&exe, "qemu", &args)?;
    tracing::info!(accel = cfg.accel.as_str(), "VM started");
    Ok(())
}

/// What deleting a qemu-engine VM removes beyond the vmm engine's files: its NVRAM.
pub fn remove_state(vm: &VmDriver, name: &str) -> Result<(), DriverError> {
    let nvram = firmware::nvram_path(&vm.env().state_dir, name);
    if let Some(dir) = nvram.parent() {
        crate::storage::fsutil::remove_tree_if_exists(dir)?;
    }
    Ok(())
}

/// The tap of interface `i` of VM `name` (for callers that know the spec).
pub fn tap_of(name: &str, spec: &VirtualMachineSpec, i: usize) -> Option<String> {
    let n = spec.interfaces.get(i)?;
    Some(tap_name(
        name,
        &n.mac.unwrap_or_else(|| generated_mac(name, i)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::qemu::config::tests::resource;
    use stead_schema::Spec;

    fn spec(v: Value) -> VirtualMachineSpec {
        match resource(Kind::VirtualMachine, "vm1", v).spec {
            Spec::VirtualMachine(s) => s,
            _ => panic!("not a VM"),
        }
    }

    #[test]
    fn impacts() {
        assert_eq!(impact("/state"), Impact::Hot);
        assert_eq!(impact("/restartPolicy"), Impact::Hot);
        assert_eq!(impact("/disks/data"), Impact::Hot, "add or remove a disk");
        assert_eq!(impact("/interfaces/52:54:00:00:00:01"), Impact::Hot);
        assert_eq!(impact("/disks/data/readOnly"), Impact::Restart);
        assert_eq!(
            impact("/interfaces/52:54:00:00:00:01/network"),
            Impact::Restart
        );
        assert_eq!(impact("/disks"), Impact::Restart, "the vmm engine's list");
        for p in [
            "/cpus",
            "/memory",
            "/firmware",
            "/accel",
            "/cloudInit",
            "/cdroms/iso",
            "/secureBoot",
            "/engine",
        ] {
            assert_eq!(impact(p), Impact::Restart, "{p}");
        }
    }

    #[test]
    fn projection_keys_disks_and_interfaces() {
        let s = spec(json!({
            "memory": "100000000",
            "disks": [{"volume":"root","boot":1},{"volume":"data","bus":"scsi","readOnly":true}],
            "cdroms": [{"volume":"iso"}],
            "interfaces": [{"network":"lan0"}],
            "firmware": "uefi", "agent": true,
            "cloudInit": {"hostname": "h"}
        }));
        let v = project("vm1", &s);
        assert_eq!(v["engine"], "qemu");
        assert_eq!(v["memory"], 96 << 20, "rounded up to whole MiB");
        assert_eq!(
            v["disks"]["root"],
            json!({"bus":"virtio","cache":"none","discard":false,"readOnly":false,"boot":1})
        );
        assert_eq!(v["disks"]["data"]["bus"], "scsi");
        assert_eq!(v["cdroms"]["iso"], json!({}));
        let mac = generated_mac("vm1", 0).to_string();
        assert_eq!(v["interfaces"][&mac], json!({"network":"lan0"}));
        assert_eq!(v["firmware"], "uefi");
        assert_eq!(v["accel"], "auto");
        assert!(v["cloudInit"].as_str().is_some());
    }

    fn disk(vol: &str, id: &str) -> QemuDisk {
        QemuDisk {
            id: id.into(),
            volume: vol.into(),
            path: format!("/p/{vol}").into(),
            format: super::super::config::DiskFormat::Raw,
            bus: stead_schema::DiskBus::Virtio,
            cache: stead_schema::DiskCache::None,
            discard: false,
            read_only: false,
            boot: None,
        }
    }

    fn nic(mac: &str, id: &str) -> QemuNic {
        QemuNic {
            id: id.into(),
            network: "lan0".into(),
            tap: format!("t{id}"),
            mac: mac.into(),
            boot: None,
        }
    }

    fn cfg(disks: Vec<QemuDisk>, nics: Vec<QemuNic>) -> QemuConfig {
        let dir = std::path::Path::new("/r");
        QemuConfig {
            engine: "qemu".into(),
            name: "vm1".into(),
            binary: "qemu-system-x86_64".into(),
            cpus: 1,
            memory: 64 << 20,
            requested_accel: stead_schema::VmAccel::Auto,
            accel: super::super::accel::Accel::Tcg,
            accel_warning: None,
            run_as: None,
            user_warning: None,
            incoming: false,
            machine: super::super::config::Machine::Pc,
            firmware: super::super::config::FirmwareRun::Bios,
            disks,
            cdroms: vec![],
            nics,
            agent: false,
            cloud_init: None,
            sockets: super::super::config::Sockets {
                qmp: dir.join("q"),
                qga: dir.join("g"),
                vnc: dir.join("v"),
            },
            sandbox: true,
            restart_policy: RestartPolicy::Always,
            running: true,
            cgroup_parent: "p".into(),
            netns: None,
            shutdown_timeout_secs: 1,
            fence_file: None,
        }
    }

    #[test]
    fn hot_plug_keeps_running_ids_and_finds_the_difference() {
        let old = cfg(
            vec![disk("a", "disk0"), disk("b", "disk1")],
            vec![nic("m1", "net0")],
        );
        // Spec order after removing `a` and adding `c` and an interface: ids by position.
        let new = cfg(
            vec![disk("b", "disk0"), disk("c", "disk1")],
            vec![nic("m1", "net0"), nic("m2", "net1")],
        );
        let new = keep_ids(new, &old);
        assert_eq!(new.disks[0].id, "disk1", "b keeps its id");
        assert_eq!(new.disks[1].id, "disk0", "c takes the lowest free id");
        let hp = hot_plug(&old, &new).expect("hot");
        assert_eq!(
            hp.remove_disks
                .iter()
                .map(|d| d.volume.as_str())
                .collect::<Vec<_>>(),
            ["a"]
        );
        assert_eq!(
            hp.add_disks
                .iter()
                .map(|d| d.volume.as_str())
                .collect::<Vec<_>>(),
            ["c"]
        );
        assert!(hp.remove_nics.is_empty());
        assert_eq!(hp.add_nics[0].mac, "m2");

        // The restart policy and the stop timeout are re-read by the supervisor.
        let mut hot = old.clone();
        hot.shutdown_timeout_secs = 120;
        hot.restart_policy = RestartPolicy::Never;
        assert_eq!(hot_plug(&old, &hot), Some(HotPlug::default()));

        // Anything else changed: a restart.
        let mut other = new.clone();
        other.cpus = 2;
        assert!(hot_plug(&old, &other).is_none());
        let mut ro = old.clone();
        ro.disks[0].read_only = true;
        assert!(hot_plug(&old, &ro).is_none());
        // Only virtio disks are hot-plugged.
        let mut scsi = new.clone();
        scsi.disks[1].bus = stead_schema::DiskBus::Scsi;
        assert!(hot_plug(&old, &scsi).is_none());
        // Nothing at all: an empty hot-plug.
        assert_eq!(hot_plug(&old, &old), Some(HotPlug::default()));
    }

    #[test]
    fn config_projection_matches_spec_projection() {
        let t = tempfile::tempdir().expect("tmp");
        let pool = t.path().join("pool");
        let mut w: BTreeMap<stead_schema::ResourceId, stead_schema::Resource> = BTreeMap::new();
        for r in [
            resource(Kind::StoragePool, "p", json!({"type":"dir","path": pool})),
            resource(Kind::Volume, "root", json!({"pool":"p","size":"1Gi"})),
        ] {
            w.insert(r.id.clone(), r);
        }
        let p = crate::storage::volume_path(&w, "root").expect("path");
        fs::create_dir_all(p.parent().expect("dir")).expect("mkdir");
        fs::write(&p, b"").expect("touch");
        let s = spec(
            json!({"disks":[{"volume":"root","boot":1,"cache":"writeback"}],
                            "interfaces":[{"network":"lan0","boot":2}],"restartPolicy":"never"}),
        );
        let host = stead_reconciler::driver::HostEnv {
            state_dir: t.path().join("s"),
            run_dir: t.path().join("r"),
            cgroup_parent: "x".into(),
            netns: None,
            self_exe: "/bin/false".into(),
            fence_file: None,
        };
        let env = ResolveEnv {
            host: &host,
            firmware_dir: std::path::Path::new("/nonexistent"),
            caps: HostCaps {
                kvm_device: false,
                hardware_virt: false,
            },
            shutdown_timeout_secs: 1,
            seed: None,
        };
        let c = resolve("vm1", &s, &w, &env).expect("resolve");
        assert_eq!(project_config(&c, "running"), project("vm1", &s));
        assert!(is_qemu_config(&serde_json::to_value(&c).expect("json")));
        assert_eq!(
            tap_of("vm1", &s, 0).as_deref(),
            Some(c.nics[0].tap.as_str())
        );
    }
}
