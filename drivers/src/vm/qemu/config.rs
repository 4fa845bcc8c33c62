//! The typed configuration of one QEMU VM ([`QemuConfig`]): everything its QEMU command
//! line ([`super::argv::argv`]) and its supervisor need, resolved from a
//! `VirtualMachineSpec` and the Volumes it names ([`resolve`]). The driver writes it as
//! the VM's `config.json`; `stead qemu` runs it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use stead_reconciler::driver::{DriverError, HostEnv, Lookup};
use stead_schema::{
    DiskBus, DiskCache, Firmware, MacAddr, RestartPolicy, RunState, VirtualMachineSpec, VmAccel,
    VolumeFormat,
};

use super::accel::{Accel, HostCaps};
use super::firmware;
use crate::vm::config::{Paths, generated_mac};

/// The QEMU binary.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";
/// Marker of a qemu-engine `config.json` (a vmm-engine config has no `engine` field).
pub const ENGINE: &str = "qemu";

/// The emulated machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Machine {
    /// i440FX + PIIX (BIOS VMs).
    Pc,
    /// Q35 + ICH9 (UEFI VMs).
    Q35,
}

impl Machine {
    /// QEMU's machine name.
    pub fn as_str(self) -> &'static str {
        match self {
            Machine::Pc => "pc",
            Machine::Q35 => "q35",
        }
    }
}

/// Firmware as QEMU loads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum FirmwareRun {
    /// QEMU's built-in SeaBIOS.
    Bios,
    /// OVMF: read-only code, the VM's own NVRAM.
    Uefi {
        /// Code image.
        code: PathBuf,
        /// The VM's NVRAM (copied from the template once).
        vars: PathBuf,
        /// The NVRAM template it was copied from.
        vars_template: PathBuf,
        /// Secure boot (SMM, secure pflash).
        secure_boot: bool,
    },
}

/// Image format of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// Raw file or block device.
    Raw,
    /// qcow2.
    Qcow2,
}

impl DiskFormat {
    /// QEMU's block driver name.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// A disk of a QEMU VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QemuDisk {
    /// Its id: the format node is `<id>`, the file node `<id>-file`, the device
    /// `<id>-dev`. `disk<i>` at creation; kept by a disk across hot-plugs of others.
    pub id: String,
    /// Volume name.
    pub volume: String,
    /// Image file or block device.
    pub path: PathBuf,
    /// Image format (from the Volume's spec).
    pub format: DiskFormat,
    /// Bus.
    pub bus: DiskBus,
    /// Host cache mode.
    pub cache: DiskCache,
    /// Discard requests passed down.
    pub discard: bool,
    /// Read-only.
    pub read_only: bool,
    /// Boot index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<u32>,
}

impl QemuDisk {
    /// The format node name (`disk0`): what QMP block commands and backups name.
    pub fn node(&self) -> String {
        self.id.clone()
    }
    /// The protocol (file) node name (`disk0-file`).
    pub fn file_node(&self) -> String {
        format!("{}-file", self.id)
    }
    /// The guest device id (`disk0-dev`).
    pub fn device_id(&self) -> String {
        format!("{}-dev", self.id)
    }
}

/// A cdrom drive holding an ISO (read-only raw).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QemuCdrom {
    /// Id (`cd<i>`; the node is `<id>`, the device `<id>-dev`).
    pub id: String,
    /// Volume name (`None` for the cloud-init seed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// ISO image.
    pub path: PathBuf,
    /// Boot index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<u32>,
}

/// A network interface: virtio-net on a persistent tap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QemuNic {
    /// Id (`net<i>`; the netdev is `<id>`, the device `<id>-dev`).
    pub id: String,
    /// Network (bridge) name.
    pub network: String,
    /// Tap device (created by the driver on the bridge).
    pub tap: String,
    /// Guest MAC.
    pub mac: String,
    /// Boot index (network boot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<u32>,
}

/// The sockets QEMU listens on (in the VM's run dir).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sockets {
    /// QMP for short-lived clients (the driver, backups): one at a time. The supervisor
    /// has its own QMP channel on an inherited descriptor.
    pub qmp: PathBuf,
    /// Guest agent (virtio-serial port `org.qemu.guest_agent.0`).
    pub qga: PathBuf,
    /// VNC display.
    pub vnc: PathBuf,
}

/// Everything `stead qemu` needs to run (and re-run) one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QemuConfig {
    /// Always [`ENGINE`] (tells a qemu config from a vmm one).
    pub engine: String,
    /// VM name.
    pub name: String,
    /// QEMU binary (looked up in `PATH` when bare).
    pub binary: PathBuf,
    /// vCPUs.
    pub cpus: u32,
    /// Guest RAM in bytes (a whole number of MiB).
    pub memory: u64,
    /// Accelerator as declared.
    pub requested_accel: VmAccel,
    /// Accelerator chosen.
    pub accel: Accel,
    /// Why `auto` fell back to TCG (shown by apply and `stead get`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel_warning: Option<String>,
    /// Machine type.
    pub machine: Machine,
    /// Firmware.
    pub firmware: FirmwareRun,
    /// Disks in order.
    #[serde(default)]
    pub disks: Vec<QemuDisk>,
    /// Cdroms in order, the cloud-init seed last.
    #[serde(default)]
    pub cdroms: Vec<QemuCdrom>,
    /// Network interfaces in order.
    #[serde(default)]
    pub nics: Vec<QemuNic>,
    /// Guest agent channel.
    pub agent: bool,
    /// The cloud-init seed's instance-id (the seed is the cdrom `seed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<String>,
    /// Sockets.
    pub sockets: Sockets,
    /// `-sandbox on` with obsolete/elevateprivileges/spawn/resourcecontrol denied.
    pub sandbox: bool,
    /// Restart policy applied by the supervisor.
    pub restart_policy: RestartPolicy,
    /// Whether the VM should run.
    pub running: bool,
    /// Cgroup parent; the VM's cgroup is `<parent>/vm-<name>`.
    pub cgroup_parent: String,
    /// Network namespace holding the taps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// Graceful shutdown time (ACPI, then the guest agent) before `quit`, in seconds.
    pub shutdown_timeout_secs: u64,
    /// The node's fence deadline file, for an HA VM on a cluster node: the supervisor
    /// kills QEMU once its deadline passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence_file: Option<PathBuf>,
    /// The unprivileged user QEMU runs as (`None`: root; see [`super::runas`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as: Option<super::runas::RunAs>,
    /// Why QEMU runs as root although an unprivileged user was wanted (shown by apply and
    /// `stead get`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_warning: Option<String>,
    /// Start as the target of a live migration: QEMU waits in `inmigrate` (`-incoming
    /// defer`) for [`super::migrate::listen_incoming`] instead of booting the guest, stays
    /// paused (`-S`) once the guest arrived until [`super::migrate::resume_incoming`], and
    /// the supervisor never restarts it (a restart would boot a second copy of a guest
    /// that still runs on the source).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub incoming: bool,
}

impl QemuConfig {
    /// What apply and `stead get` warn about: the TCG fallback, QEMU running as root.
    pub fn warning(&self) -> Option<String> {
        let all: Vec<&str> = [&self.accel_warning, &self.user_warning]
            .into_iter()
            .flatten()
            .map(String::as_str)
            .collect();
        (!all.is_empty()).then(|| all.join("; "))
    }

    /// Whether any disk sits on `bus`.
    pub fn uses_bus(&self, bus: DiskBus) -> bool {
        self.disks.iter().any(|d| d.bus == bus)
    }

    /// The UEFI NVRAM file, if any (backups include it).
    pub fn nvram(&self) -> Option<&Path> {
        match &self.firmware {
            FirmwareRun::Uefi { vars, .. } => Some(vars),
            FirmwareRun::Bios => None,
        }
    }
}

/// Where the host-side inputs of [`resolve`] come from (parameters for tests).
#[derive(Debug, Clone)]
pub struct ResolveEnv<'a> {
    /// The host environment (run dir, state dir, cgroup parent, netns).
    pub host: &'a HostEnv,
    /// Firmware descriptor dir ([`firmware::DESCRIPTOR_DIR`]).
    pub firmware_dir: &'a Path,
    /// KVM capabilities.
    pub caps: HostCaps,
    /// Graceful shutdown time of a VM whose spec has no `stopTimeout`.
    pub shutdown_timeout_secs: u64,
    /// The cloud-init seed ISO and its instance-id, when the VM has `cloudInit` (written
    /// by the driver).
    pub seed: Option<(PathBuf, String)>,
}

/// Guest RAM rounded up to a whole MiB.
fn whole_mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20) << 20
}

/// Resolves VM `name`'s spec into the configuration its supervisor runs. Volumes must be
/// known (their paths and formats come from their specs); a missing disk file is
/// `NotReady`. Does not touch the host apart from reading (the NVRAM file is created by
/// the driver).
pub fn resolve(
    name: &str,
    spec: &VirtualMachineSpec,
    world: &dyn Lookup,
    env: &ResolveEnv<'_>,
) -> Result<QemuConfig, DriverError> {
    let (accel, accel_warning) =
        super::accel::choose(spec.accel, env.caps).map_err(DriverError::Unsupported)?;
    if spec.boot.is_some() {
        return Err(DriverError::Unsupported(
            "the qemu engine boots from firmware: direct kernel boot (spec.boot) is the vmm engine's"
                .into(),
        ));
    }
    let (machine, fw) = match spec.firmware {
        Firmware::Bios if spec.secure_boot => {
            return Err(DriverError::Unsupported(
                "secureBoot needs firmware uefi".into(),
            ));
        }
        Firmware::Bios => (Machine::Pc, FirmwareRun::Bios),
        Firmware::Uefi => {
            let u = firmware::find_uefi(env.firmware_dir, spec.secure_boot)?;
            (
                Machine::Q35,
                FirmwareRun::Uefi {
                    code: u.code,
                    vars: firmware::nvram_path(&env.host.state_dir, name),
                    vars_template: u.vars_template,
                    secure_boot: spec.secure_boot,
                },
            )
        }
    };
    let mut disks = Vec::new();
    for (i, d) in spec.disks.iter().enumerate() {
        let (path, format) = crate::storage::volume_image(world, d.volume.as_str())?;
        check_exists(d.volume.as_str(), &path)?;
        disks.push(QemuDisk {
            id: format!("disk{i}"),
            volume: d.volume.as_str().to_string(),
            path,
            format: match format {
                VolumeFormat::Raw => DiskFormat::Raw,
                VolumeFormat::Qcow2 => DiskFormat::Qcow2,
            },
            bus: d.bus.unwrap_or_default(),
            cache: d.cache.unwrap_or_default(),
            discard: d.discard,
            read_only: d.read_only,
            boot: d.boot,
        });
    }
    let mut cdroms = Vec::new();
    for (i, c) in spec.cdroms.iter().enumerate() {
        cdroms.push(QemuCdrom {
            id: format!("cd{i}"),
            volume: Some(c.volume.as_str().to_string()),
            path: existing_volume_path(world, c.volume.as_str())?,
            boot: c.boot,
        });
    }
    if let Some((seed, _)) = &env.seed {
        cdroms.push(QemuCdrom {
            id: "seed".into(),
            volume: None,
            path: seed.clone(),
            boot: None,
        });
    }
    let mut nics = Vec::new();
    for (i, n) in spec.interfaces.iter().enumerate() {
        if n.vlan.is_some() {
            return Err(DriverError::Unsupported(
                "VLAN tags on VM interfaces need bridge VLAN filtering (missing on this kernel)"
                    .into(),
            ));
        }
        let mac = n.mac.unwrap_or_else(|| generated_mac(name, i));
        let tap = tap_name(name, &mac);
        if nics.iter().any(|o: &QemuNic| o.tap == tap) {
            return Err(DriverError::Unsupported(format!(
                "interfaces {i} and another have MACs ending alike ({mac}): give one another MAC"
            )));
        }
        nics.push(QemuNic {
            id: format!("net{i}"),
            network: n.network.as_str().to_string(),
            tap,
            mac: mac.to_string(),
            boot: n.boot,
        });
    }
    let paths = Paths::new(&env.host.run_dir, name);
    let nvram = match &fw {
        FirmwareRun::Uefi { vars, .. } => Some(vars.clone()),
        FirmwareRun::Bios => None,
    };
    let opened: Vec<PathBuf> = disks
        .iter()
        .map(|d| d.path.clone())
        .chain(cdroms.iter().map(|c| c.path.clone()))
        .chain(nvram)
        .chain([paths.qemu_dir()])
        .collect();
    let user = super::runas::decide(
        &super::runas::Setting::from_env(),
        super::runas::lookup,
        super::runas::blocker,
        &opened,
    )
    .map_err(DriverError::Unsupported)?;
    Ok(QemuConfig {
        engine: ENGINE.into(),
        name: name.to_string(),
        binary: PathBuf::from(QEMU_BINARY),
        cpus: spec.cpus,
        memory: whole_mib(spec.memory.bytes()),
        requested_accel: spec.accel,
        accel,
        accel_warning,
        machine,
        firmware: fw,
        disks,
        cdroms,
        nics,
        agent: spec.agent,
        cloud_init: env.seed.as_ref().map(|(_, id)| id.clone()),
        sockets: Sockets {
            qmp: paths.qmp_socket(),
            qga: paths.qga_socket(),
            vnc: paths.vnc_socket(),
        },
        sandbox: true,
        restart_policy: spec.restart_policy,
        running: spec.state == RunState::Running,
        cgroup_parent: env.host.cgroup_parent.clone(),
        netns: env.host.netns.clone(),
        shutdown_timeout_secs: spec.stop_timeout_secs_or(env.shutdown_timeout_secs),
        fence_file: env
            .host
            .fence_file
            .clone()
            .filter(|_| spec.placement.is_ha()),
        run_as: user.run_as,
        user_warning: user.warning,
        incoming: false,
    })
}

/// The tap of the interface with `mac` of VM `name` (≤ 15 bytes): stable while the
/// interface exists, whatever is hot-plugged around it.
pub fn tap_name(name: &str, mac: &MacAddr) -> String {
    let h = crate::vm::config::tap_name(name, 0);
    format!("{}m{:02x}{:02x}", &h[..10], mac.0[4], mac.0[5])
}

/// Refuses a Volume whose image is not on the host yet.
fn check_exists(name: &str, path: &Path) -> Result<(), DriverError> {
    if !path.exists() {
        return Err(DriverError::NotReady(format!(
            "disk of Volume/{name} ({}) does not exist yet",
            path.display()
        )));
    }
    Ok(())
}

/// The path of Volume `name`, which must exist on the host.
fn existing_volume_path(world: &dyn Lookup, name: &str) -> Result<PathBuf, DriverError> {
    let path = crate::storage::volume_path(world, name)?;
    check_exists(name, &path)?;
    Ok(path)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use stead_schema::{Kind, Resource, ResourceId, Spec};

    use super::*;

    pub(crate) fn resource(kind: Kind, name: &str, spec: serde_json::Value) -> Resource {
        Resource {
            id: ResourceId::new(kind, name),
            metadata: Default::default(),
            spec: Spec::from_value(kind, spec).expect("spec"),
            origin: Default::default(),
        }
    }

    fn vm_spec(v: serde_json::Value) -> VirtualMachineSpec {
        match resource(Kind::VirtualMachine, "vm1", v).spec {
            Spec::VirtualMachine(s) => s,
            _ => panic!("not a VM"),
        }
    }

    /// A world with a dir pool at `root` and volumes `root` (qcow2) and `iso` (raw), their
    /// files created.
    fn world(root: &Path) -> BTreeMap<ResourceId, Resource> {
        let mut w = BTreeMap::new();
        for r in [
            resource(
                Kind::StoragePool,
                "p",
                serde_json::json!({"type":"dir","path": root}),
            ),
            resource(
                Kind::Volume,
                "root",
                serde_json::json!({"pool":"p","size":"1Gi","format":"qcow2"}),
            ),
            resource(
                Kind::Volume,
                "iso",
                serde_json::json!({"pool":"p","size":"1Mi"}),
            ),
        ] {
            w.insert(r.id.clone(), r);
        }
        for v in ["root", "iso"] {
            let p = crate::storage::volume_path(&w, v).expect("path");
            std::fs::create_dir_all(p.parent().expect("dir")).expect("mkdir");
            std::fs::write(&p, b"").expect("touch");
        }
        w
    }

    fn host(dir: &Path) -> HostEnv {
        HostEnv {
            state_dir: dir.join("state"),
            run_dir: dir.join("run"),
            cgroup_parent: "stead-test".into(),
            netns: None,
            self_exe: "/bin/false".into(),
            fence_file: None,
        }
    }

    const PVM: HostCaps = HostCaps {
        kvm_device: true,
        hardware_virt: false,
    };

    #[test]
    fn resolves_disks_cdroms_nics_and_the_seed() {
        let t = tempfile::tempdir().expect("tmp");
        let w = world(&t.path().join("pool"));
        let h = host(t.path());
        let env = ResolveEnv {
            host: &h,
            firmware_dir: Path::new("/nonexistent"),
            caps: PVM,
            shutdown_timeout_secs: 7,
            seed: Some((t.path().join("seed.iso"), "iid-1".into())),
        };
        let s = vm_spec(serde_json::json!({
            "cpus": 2, "memory": "1000000000",
            "disks": [{"volume":"root","bus":"scsi","cache":"writeback","discard":true,"boot":1}],
            "cdroms": [{"volume":"iso","boot":2}],
            "interfaces": [{"network":"lan0"}],
            "agent": true
        }));
        let c = resolve("vm1", &s, &w, &env).expect("resolve");
        assert_eq!(c.engine, "qemu");
        assert_eq!(c.memory % (1 << 20), 0);
        assert!(c.memory >= 1_000_000_000);
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.accel_warning.is_some());
        assert_eq!(c.machine, Machine::Pc);
        assert_eq!(c.firmware, FirmwareRun::Bios);
        let d = &c.disks[0];
        assert_eq!(
            (d.id.as_str(), d.format, d.bus, d.cache, d.discard, d.boot),
            (
                "disk0",
                DiskFormat::Qcow2,
                DiskBus::Scsi,
                DiskCache::Writeback,
                true,
                Some(1)
            )
        );
        assert_eq!(
            (d.node(), d.file_node()),
            ("disk0".into(), "disk0-file".into())
        );
        assert_eq!(c.cdroms.len(), 2);
        assert_eq!(c.cdroms[0].volume.as_deref(), Some("iso"));
        assert_eq!(c.cdroms[1].id, "seed");
        assert_eq!(c.nics[0].tap, tap_name("vm1", &generated_mac("vm1", 0)));
        assert!(c.nics[0].tap.len() <= 15, "{}", c.nics[0].tap);
        assert_eq!(c.cloud_init.as_deref(), Some("iid-1"));
        assert_eq!(c.nics[0].mac, generated_mac("vm1", 0).to_string());
        assert_eq!(c.sockets.qmp, Paths::new(&h.run_dir, "vm1").qmp_socket());
        assert_eq!(c.shutdown_timeout_secs, 7, "the driver's default");
        assert!(c.nvram().is_none());
        let back: QemuConfig =
            serde_json::from_str(&serde_json::to_string(&c).expect("json")).expect("parse");
        assert_eq!(back, c);
        let mut s = s;
        s.stop_timeout = Some(stead_schema::DurationSpec(std::time::Duration::from_secs(
            90,
        )));
        let c = resolve("vm1", &s, &w, &env).expect("resolve");
        assert_eq!(c.shutdown_timeout_secs, 90, "the spec's stopTimeout");
    }

    #[test]
    fn refusals_and_not_ready() {
        let t = tempfile::tempdir().expect("tmp");
        let w = world(&t.path().join("pool"));
        let h = host(t.path());
        let env = ResolveEnv {
            host: &h,
            firmware_dir: &t.path().join("no-firmware"),
            caps: PVM,
            shutdown_timeout_secs: 1,
            seed: None,
        };
        let err = |v| {
            resolve("vm1", &vm_spec(v), &w, &env)
                .expect_err("refused")
                .to_string()
        };
        assert!(err(serde_json::json!({"accel":"kvm"})).contains("cannot run a full guest"));
        assert!(err(serde_json::json!({"firmware":"uefi"})).contains("install the ovmf package"));
        assert!(err(serde_json::json!({"secureBoot":true})).contains("needs firmware uefi"));
        assert!(err(serde_json::json!({"disks":[{"volume":"nope"}]})).contains("not known"));
        std::fs::remove_file(crate::storage::volume_path(&w, "root").expect("p")).expect("rm");
        assert!(err(serde_json::json!({"disks":[{"volume":"root"}]})).contains("does not exist"));
    }

    #[test]
    fn uefi_nvram_lives_in_the_state_dir() {
        let t = tempfile::tempdir().expect("tmp");
        let w = world(&t.path().join("pool"));
        let h = host(t.path());
        let fw = t.path().join("fw");
        std::fs::create_dir_all(&fw).expect("mkdir");
        for f in ["code.fd", "vars.fd"] {
            std::fs::write(fw.join(f), b"x").expect("w");
        }
        std::fs::write(
            fw.join("60-plain.json"),
            format!(
                r#"{{"interface-types":["uefi"],"mapping":{{"device":"flash",
                  "executable":{{"filename":"{0}/code.fd"}},"nvram-template":{{"filename":"{0}/vars.fd"}}}},
                  "targets":[{{"architecture":"x86_64","machines":["pc-q35-*"]}}],"features":[]}}"#,
                fw.display()
            ),
        )
        .expect("w");
        let env = ResolveEnv {
            host: &h,
            firmware_dir: &fw,
            caps: PVM,
            shutdown_timeout_secs: 1,
            seed: None,
        };
        let c = resolve(
            "vm1",
            &vm_spec(serde_json::json!({"firmware":"uefi"})),
            &w,
            &env,
        )
        .expect("resolve");
        assert_eq!(c.machine, Machine::Q35);
        assert_eq!(
            c.nvram(),
            Some(h.state_dir.join("vms/vm1/nvram.fd").as_path())
        );
    }
}
