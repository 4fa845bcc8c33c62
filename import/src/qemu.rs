//! `qm.conf(5)` → a VirtualMachine and its Volumes.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use stead_schema::{
    CdromSpec, CloudInitSpec, CloudInitUser, DiskBus, DiskCache, DiskSpec, Firmware, Kind, MacAddr,
    Name, Placement, RestartPolicy, VirtualMachineSpec, VmAccel, VmEngine, VmInterface,
};

use crate::guest::{
    DiskSource, VolRef, VolumeUse, parse_size, parse_source, percent_decode, run_state,
    volume_format,
};
use crate::model::{Manifest, VMID_LABEL};
use crate::network::NetInfo;
use crate::reader::{Entry, GuestConf, ParseError, Section, property_string};
use crate::reasons;
use crate::report::Report;
use crate::storage::Pool;

/// What a guest import needs from the rest of the import.
pub struct Ctx<'a> {
    /// Imported pools by Proxmox storage id.
    pub pools: &'a BTreeMap<String, Pool>,
    /// Network names and whether they are VLAN-aware, by Proxmox bridge (or vnet) name.
    pub networks: &'a BTreeMap<String, NetInfo>,
    /// Volume names by `(storage, stem)`.
    pub volume_names: &'a BTreeMap<(String, String), String>,
    /// The root the files are read under (to size ISO files).
    pub root: &'a Path,
}

/// A guest config file that parsed.
#[derive(Debug, Clone)]
pub struct GuestFile {
    /// VMID (the file name).
    pub vmid: u32,
    /// The node directory it was read from.
    pub node: String,
    /// The file.
    pub path: std::path::PathBuf,
    /// Its parsed content.
    pub conf: GuestConf,
}

/// The result of importing one guest.
#[derive(Debug)]
pub struct Imported {
    /// The VirtualMachine or Container (`None`: not imported, reported).
    pub manifest: Option<Manifest>,
    /// Volumes it uses, by registry key.
    pub volumes: Vec<((String, String), VolumeUse)>,
    /// What was not carried over.
    pub report: Report,
}

/// Whether `key` is a disk slot of a VM (`scsi0`, `virtio1`, `sata2`, `ide3`).
pub fn disk_bus(key: &str) -> Option<(&'static str, DiskBus)> {
    for (prefix, bus) in [
        ("scsi", DiskBus::Scsi),
        ("virtio", DiskBus::Virtio),
        ("sata", DiskBus::Sata),
        ("ide", DiskBus::Sata),
    ] {
        if let Some(n) = key.strip_prefix(prefix)
            && !n.is_empty()
            && n.chars().all(|c| c.is_ascii_digit())
        {
            return Some((prefix, bus));
        }
    }
    None
}

/// Whether `key` is `PREFIX` followed by digits.
pub fn numbered(key: &str, prefix: &str) -> bool {
    key.strip_prefix(prefix)
        .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
}

/// The volumes a VM config names (for naming them all before any is written).
pub fn volume_refs(conf: &GuestConf) -> Vec<VolRef> {
    let mut out = Vec::new();
    for e in &conf.main.entries {
        if disk_bus(&e.key).is_some() || e.key == "efidisk0" {
            let (first, _) = property_string(&e.value);
            if let Ok(DiskSource::Volume(v)) = parse_source(first) {
                if let Some(b) = &v.base {
                    let mut base = v.clone();
                    base.stem = b.clone();
                    base.base = None;
                    out.push(base);
                }
                out.push(v);
            }
        }
    }
    out
}

/// Keys the VM mapping reads; every other key is reported.
const HANDLED: &[&str] = &[
    "name",
    "memory",
    "cores",
    "sockets",
    "bios",
    "agent",
    "boot",
    "bootdisk",
    "template",
    "onboot",
    "startup",
    "ciuser",
    "cipassword",
    "sshkeys",
    "nameserver",
    "searchdomain",
    "efidisk0",
    "scsihw",
];

/// Why a VM key is not carried over.
fn unmapped_reason(key: &str) -> String {
    let why = match key {
        "args" => "raw QEMU arguments",
        "hookscript" => "hook scripts",
        "tpmstate0" => "TPM state",
        "cpu" => "CPU model and flags (stead's QEMU uses its own)",
        "balloon" | "shares" => "memory ballooning",
        "vga" => "display adapter settings",
        "machine" => "the machine type (stead picks pc or q35 from the firmware)",
        "ostype" => "the guest OS type (stead does not tune for it)",
        "tags" => "Proxmox tags",
        "lock" => "a Proxmox lock (the guest was in a backup, migration or snapshot)",
        "parent" => "the current snapshot (snapshots are not imported)",
        "smbios1" | "vmgenid" | "meta" | "digest" => "Proxmox bookkeeping",
        "protection" => "deletion protection",
        "numa" | "vcpus" | "cpulimit" | "cpuunits" | "affinity" => "CPU placement and limits",
        _ if numbered(key, "hostpci") => "PCI passthrough",
        _ if numbered(key, "usb") => "USB passthrough",
        _ if numbered(key, "serial") || numbered(key, "parallel") => "serial and parallel ports",
        _ if numbered(key, "unused") => "an unused (detached) disk",
        "cicustom" => {
            "custom cloud-init files from a snippets storage (stead takes user-data inline in \
             `cloudInit.userData`)"
        }
        "citype" => "the cloud-init drive format (stead always writes a NoCloud seed)",
        "ciupgrade" => "a package upgrade on first boot (add it to `cloudInit.userData`)",
        _ if key.starts_with("ci") => "a cloud-init setting that `cloudInit` has no field for",
        "description" => "the VM's notes (a manifest's comments can keep them)",
        "hotplug" => "hotplug settings (stead's QEMU uses its own)",
        "keyboard" | "tablet" => "console input settings",
        "localtime" => "the RTC time base (stead's QEMU keeps UTC)",
        "kvm" | "acpi" => "switches of QEMU features (stead sets `accel` and keeps ACPI on)",
        "rng0" => "a virtio RNG device",
        "watchdog" => "a watchdog device",
        "audio0" => "an audio device",
        _ => "a setting the VirtualMachine kind has no field for",
    };
    format!("{why}: not carried over")
}

/// Imports a VM config as the VirtualMachine `name`.
pub fn import_vm(g: &GuestFile, name: &str, ctx: &Ctx) -> Result<Imported, Vec<ParseError>> {
    let file = g.path.as_path();
    let main = &g.conf.main;
    let mut report = Report::default();
    let mut errors = Vec::new();
    report_sections(file, &g.conf.sections, &mut report);
    let (mut cpus, memory) = cpus_memory(file, main, &mut errors);
    if cpus > 254 {
        let line = main.get("cores").map_or(0, |e| e.line);
        report.note(
            file,
            line,
            "cores",
            format!("{cpus} vCPUs: stead's limit of 254 is used"),
        );
        cpus = 254;
    }
    let template = main.value("template") == Some("1");
    let mut vm = VmParts::default();
    for e in &main.entries {
        if let Some((_, bus)) = disk_bus(&e.key) {
            if let Err(m) = vm.disk(ctx, file, e, bus, template, &mut report) {
                errors.push(ParseError::new(file, e.line, format!("{}: {m}", e.key)));
            }
        } else if numbered(&e.key, "net") {
            if let Err(m) = vm.net(ctx, file, e, &mut report) {
                errors.push(ParseError::new(file, e.line, format!("{}: {m}", e.key)));
            }
        } else if numbered(&e.key, "ipconfig") {
            vm.ipconfig.push(e.clone());
        } else if e.key == "efidisk0" {
            if let Err(m) = vm.efidisk(ctx, file, e, template, &mut report) {
                errors.push(ParseError::new(file, e.line, format!("{}: {m}", e.key)));
            }
        } else if !HANDLED.contains(&e.key.as_str()) {
            report.note(file, e.line, &e.key, unmapped_reason(&e.key));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    vm.boot_order(file, main, &mut report);
    let firmware = firmware(file, main, &mut report);
    let agent = agent(file, main.get("agent"), &mut report);
    scsihw(file, main.get("scsihw"), &mut report);
    let mut cloud_init = cloud_init(file, main, &vm, &mut report);
    if let (Some(ci), Some(n)) = (cloud_init.as_mut(), main.value("name"))
        && n != name
        && stead_schema::cloudinit::check_host_name(n).is_ok()
    {
        // Proxmox hands the VM's name to cloud-init as its host name.
        ci.hostname = Some(n.to_string());
    }
    let mut state = run_state(file, main.get("onboot"), &mut report);
    if template {
        state = stead_schema::RunState::Stopped;
        vm.disks.iter_mut().for_each(|d| d.read_only = true);
        report.note(file, main.get("template").map_or(0, |e| e.line), "template", "a template: its volumes are `template: true`, the VM is imported stopped with its disks read-only");
    }
    if !boot_source(file, &mut vm, &mut report) {
        return Ok(Imported {
            manifest: None,
            volumes: vm.volumes,
            report,
        });
    }
    let spec = VirtualMachineSpec {
        cpus,
        memory: stead_schema::ByteSize(memory),
        engine: Some(VmEngine::Qemu),
        accel: VmAccel::Auto,
        boot: None,
        firmware,
        secure_boot: false,
        disks: vm.disks,
        cdroms: vm.cdroms,
        cloud_init,
        agent,
        interfaces: vm.interfaces,
        state,
        restart_policy: RestartPolicy::Always,
        stop_timeout: crate::guest::stop_timeout(file, main.get("startup"), &mut report),
        placement: Placement::default(),
        depends_on: vec![],
    };
    let mut imported = imported_guest(g, Kind::VirtualMachine, name, &spec, vm.volumes, report);
    if let (Some(n), Some(m)) = (main.value("name"), imported.manifest.as_mut()) {
        m.annotations.insert("pve-name".into(), n.to_string());
    }
    Ok(imported)
}

/// The import of guest `g` as a `kind` manifest named `name` in `vms/` or `containers/`:
/// labelled with its VMID, its Proxmox notes kept as the `pve-description` annotation, and
/// its volumes declared in the same file.
pub(crate) fn imported_guest(
    g: &GuestFile,
    kind: Kind,
    name: &str,
    spec: &impl serde::Serialize,
    volumes: Vec<((String, String), VolumeUse)>,
    report: Report,
) -> Imported {
    let dir = if kind == Kind::Container {
        "containers"
    } else {
        "vms"
    };
    let out_file = format!("{dir}/{name}.yaml");
    let mut manifest =
        Manifest::new(kind, name, spec, &out_file).label(VMID_LABEL, &g.vmid.to_string());
    if let Some((_, d)) = &g.conf.description {
        manifest
            .annotations
            .insert("pve-description".into(), d.clone());
    }
    let volumes = volumes
        .into_iter()
        .map(|(k, mut u)| {
            u.file = out_file.clone();
            (k, u)
        })
        .collect();
    Imported {
        manifest: Some(manifest),
        volumes,
        report,
    }
}

/// Makes sure a VM has something to boot, as stead requires: with no disk or cdrom left,
/// the first interface boots from the network (reported); with no interface either, the
/// VM is not imported (reported; false).
fn boot_source(file: &Path, vm: &mut VmParts, report: &mut Report) -> bool {
    if !vm.disks.is_empty() || !vm.cdroms.is_empty() {
        return true;
    }
    match vm.interfaces.first_mut() {
        Some(i) => {
            i.boot = Some(1);
            report.note(
                file,
                0,
                "boot",
                "no disk or cdrom was carried over: the first interface boots from the network",
            );
            true
        }
        None => {
            report.note(file, 0, "file", "no disk, cdrom or interface was carried over, so the VM has nothing to boot from: not imported (its volumes are)");
            false
        }
    }
}

/// Reports snapshot and pending sections; `[special:cloudinit]` is Proxmox's own record
/// of the cloud-init drive and is ignored.
pub fn report_sections(file: &Path, sections: &[Section], report: &mut Report) {
    for s in sections {
        let key = format!("[{}]", s.kind);
        match s.kind.as_str() {
            "special:cloudinit" => {}
            "PENDING" | "pve:pending" => report.note(file, s.line, &key, "pending changes Proxmox has not applied yet: not merged (the main section is imported)"),
            _ => report.note(file, s.line, &key, "a snapshot section: snapshots are not imported"),
        }
    }
}

/// `cores` × `sockets` and `memory` (MiB, or `current=N`) in bytes.
fn cpus_memory(file: &Path, main: &Section, errors: &mut Vec<ParseError>) -> (u32, u64) {
    let mut num = |key: &str, default: u64| -> u64 {
        let Some(e) = main.get(key) else {
            return default;
        };
        let v = e.value.strip_prefix("current=").unwrap_or(&e.value);
        let v = v.split(',').next().unwrap_or(v);
        match v.parse::<u64>() {
            Ok(n) if n > 0 => n,
            _ => {
                errors.push(ParseError::new(
                    file,
                    e.line,
                    format!("{key}: `{}` is not a positive number", e.value),
                ));
                default
            }
        }
    };
    let cores = num("cores", 1);
    let sockets = num("sockets", 1);
    let memory = num("memory", 512);
    (
        u32::try_from(cores.saturating_mul(sockets)).unwrap_or(u32::MAX),
        memory.saturating_mul(1 << 20),
    )
}

/// Disks, cdroms, interfaces and volumes being assembled.
#[derive(Default)]
struct VmParts {
    disks: Vec<DiskSpec>,
    disk_keys: Vec<String>,
    cdrom_keys: Vec<String>,
    cdroms: Vec<CdromSpec>,
    interfaces: Vec<VmInterface>,
    net_keys: Vec<(String, Option<MacAddr>)>,
    ipconfig: Vec<Entry>,
    has_cloudinit_drive: bool,
    volumes: Vec<((String, String), VolumeUse)>,
}

/// Disk options that are carried over.
const DISK_OPTIONS: &[&str] = &["size", "media", "cache", "discard", "format"];

impl VmParts {
    /// One `scsiN`/`virtioN`/`sataN`/`ideN` entry.
    fn disk(
        &mut self,
        ctx: &Ctx,
        file: &Path,
        e: &Entry,
        bus: DiskBus,
        template: bool,
        report: &mut Report,
    ) -> Result<(), String> {
        let (first, opts) = property_string(&e.value);
        let opt = |k: &str| opts.iter().find(|(o, _)| *o == k).map(|(_, v)| *v);
        let cdrom = opt("media") == Some("cdrom");
        let src = parse_source(first)?;
        let size = opt("size").map(parse_size).transpose()?;
        let r = match src {
            DiskSource::None => return Ok(()),
            DiskSource::Physical => {
                report.note(
                    file,
                    e.line,
                    &e.key,
                    "the host's physical cdrom drive: not carried over",
                );
                return Ok(());
            }
            DiskSource::HostPath(p) => {
                report.note(
                    file,
                    e.line,
                    &e.key,
                    format!("host device or path `{p}`: not carried over (stead attaches Volumes)"),
                );
                return Ok(());
            }
            DiskSource::Volume(r) => r,
        };
        if cdrom && r.stem.ends_with("-cloudinit") {
            self.has_cloudinit_drive = true;
            report.note(
                file,
                e.line,
                &e.key,
                "the cloud-init drive: ignored, stead generates its own seed from `cloudInit`",
            );
            return Ok(());
        }
        let Some(pool) = ctx.pools.get(&r.storage) else {
            report.note(
                file,
                e.line,
                &e.key,
                format!(
                    "storage `{}` is not imported: disk not carried over",
                    r.storage
                ),
            );
            return Ok(());
        };
        let size = match size.or_else(|| cdrom.then(|| iso_size(ctx, pool, &r)).flatten()) {
            Some(s) => s,
            None => {
                report.note(file, e.line, &e.key, "no `size`: disk not carried over");
                return Ok(());
            }
        };
        let format = match volume_format(&r, pool) {
            Ok(f) => f,
            Err(m) => {
                report.note(file, e.line, &e.key, m);
                return Ok(());
            }
        };
        let volume = Name(
            ctx.volume_names
                .get(&r.key())
                .cloned()
                .unwrap_or_else(|| crate::names::sanitize(&r.stem)),
        );
        let attached = self.disks.iter().map(|d| &d.volume);
        if attached
            .chain(self.cdroms.iter().map(|c| &c.volume))
            .any(|v| *v == volume)
        {
            report.note(
                file,
                e.line,
                &e.key,
                format!(
                    "volume `{}` is already attached to this VM: not attached twice",
                    r.volume
                ),
            );
            return Ok(());
        }
        self.volumes.push((
            r.key(),
            VolumeUse {
                pool: pool.name.clone(),
                size,
                format,
                template: template && !cdrom,
                clone_of: r.base_key(),
                file: String::new(),
                origin: (file.to_path_buf(), e.line, e.key.clone()),
            },
        ));
        if cdrom {
            self.cdroms.push(CdromSpec { volume, boot: None });
            self.cdrom_keys.push(e.key.clone());
            return Ok(());
        }
        if e.key.starts_with("ide") {
            report.note(file, e.line, &e.key, "IDE bus: attached as `sata`");
        }
        let mut disk = DiskSpec {
            volume,
            read_only: false,
            bus: Some(bus),
            cache: None,
            discard: false,
            boot: None,
        };
        for (k, v) in &opts {
            match *k {
                "cache" => disk.cache = disk_cache(v),
                "discard" => disk.discard = *v == "on",
                "ro" if *v == "1" => disk.read_only = true,
                k if DISK_OPTIONS.contains(&k) => {}
                k => report.note(
                    file,
                    e.line,
                    &format!("{}.{k}", e.key),
                    reasons::disk_option(k, v),
                ),
            }
        }
        if opt("cache").is_some() && disk.cache.is_none() {
            report.note(
                file,
                e.line,
                &format!("{}.cache", e.key),
                "unknown cache mode: stead's default (none) applies",
            );
        }
        self.disks.push(disk);
        self.disk_keys.push(e.key.clone());
        Ok(())
    }

    /// `efidisk0`: imported as a Volume (its data is kept); stead keeps each UEFI VM's
    /// NVRAM in its own state directory, so it is not attached.
    fn efidisk(
        &mut self,
        ctx: &Ctx,
        file: &Path,
        e: &Entry,
        template: bool,
        report: &mut Report,
    ) -> Result<(), String> {
        let (first, opts) = property_string(&e.value);
        let DiskSource::Volume(r) = parse_source(first)? else {
            report.note(file, e.line, &e.key, "a host path, not a Proxmox volume: the EFI vars disk is not carried over (stead keeps a UEFI VM's NVRAM in its state directory)");
            return Ok(());
        };
        let size = opts
            .iter()
            .find(|(k, _)| *k == "size")
            .map(|(_, v)| parse_size(v))
            .transpose()?;
        match (ctx.pools.get(&r.storage), size) {
            (Some(pool), Some(size)) => {
                let format = volume_format(&r, pool).unwrap_or_default();
                self.volumes.push((
                    r.key(),
                    VolumeUse {
                        pool: pool.name.clone(),
                        size,
                        format,
                        template,
                        clone_of: r.base_key(),
                        file: String::new(),
                        origin: (file.to_path_buf(), e.line, e.key.clone()),
                    },
                ));
                report.note(file, e.line, &e.key, "the EFI vars disk is imported as a Volume but not attached: the VirtualMachine kind has no NVRAM volume (stead keeps a UEFI VM's NVRAM in its state directory), so boot entries and EFI variables start from OVMF's template");
            }
            (None, _) => report.note(
                file,
                e.line,
                &e.key,
                format!(
                    "storage `{}` is not imported: EFI vars disk not carried over",
                    r.storage
                ),
            ),
            (Some(_), None) => report.note(
                file,
                e.line,
                &e.key,
                "no `size`: EFI vars disk not carried over",
            ),
        }
        Ok(())
    }

    /// One `netN: MODEL=MAC,bridge=BR,tag=T,…`.
    fn net(
        &mut self,
        ctx: &Ctx,
        file: &Path,
        e: &Entry,
        report: &mut Report,
    ) -> Result<(), String> {
        let (_, opts) = property_string(&e.value);
        let mut iface_mac = None;
        let (mut bridge, mut vlan) = (None, None);
        for (k, v) in &opts {
            match *k {
                "virtio" | "e1000" | "e1000e" | "rtl8139" | "vmxnet3" | "ne2k_pci" | "i82551"
                | "i82557b" | "i82559er" | "pcnet" | "ne2k_isa" => {
                    if !v.is_empty() {
                        iface_mac = Some(
                            v.parse::<MacAddr>()
                                .map_err(|_| format!("`{v}` is not a MAC address"))?,
                        );
                    }
                    if *k != "virtio" {
                        report.note(
                            file,
                            e.line,
                            &format!("{}.model", e.key),
                            format!("NIC model `{k}`: stead's VMs use virtio-net"),
                        );
                    }
                }
                "macaddr" => {
                    iface_mac = Some(
                        v.parse::<MacAddr>()
                            .map_err(|_| format!("`{v}` is not a MAC address"))?,
                    )
                }
                "bridge" => bridge = Some(*v),
                "tag" => {
                    vlan = Some(
                        v.parse::<u16>()
                            .map_err(|_| format!("tag `{v}` is not a VLAN id"))?,
                    )
                }
                "model" => {}
                k => report.note(
                    file,
                    e.line,
                    &format!("{}.{k}", e.key),
                    reasons::nic_option(k, v),
                ),
            }
        }
        self.net_keys.push((e.key.clone(), iface_mac));
        let Some(bridge) = bridge else {
            report.note(
                file,
                e.line,
                &e.key,
                "no bridge: interface not carried over",
            );
            return Ok(());
        };
        let Some(network) = network_for(ctx, file, e, bridge, &mut vlan, report) else {
            return Ok(());
        };
        self.interfaces.push(VmInterface {
            network: Name(network.name),
            mac: iface_mac,
            vlan,
            boot: None,
        });
        Ok(())
    }

    /// `boot: order=a;b;c` (or the legacy `bootdisk`): boot indexes for the disks in that
    /// order; cdrom and network positions are reported.
    fn boot_order(&mut self, file: &Path, main: &Section, report: &mut Report) {
        let mut order: Vec<(String, usize)> = Vec::new();
        if let Some(e) = main.get("boot") {
            match e.value.strip_prefix("order=") {
                Some(list) => order.extend(list.split(';').map(|k| (k.trim().to_string(), e.line))),
                None => report.note(
                    file,
                    e.line,
                    "boot",
                    format!(
                        "legacy boot devices `{}`: only `bootdisk` is carried over",
                        e.value
                    ),
                ),
            }
        }
        if order.is_empty()
            && let Some(e) = main.get("bootdisk")
        {
            order.push((e.value.clone(), e.line));
        }
        let mut index = 1;
        for (key, line) in order {
            let why = if let Some(i) = self.disk_keys.iter().position(|k| *k == key) {
                if let Some(d) = self.disks.get_mut(i) {
                    d.boot = Some(index);
                    index += 1;
                }
                continue;
            } else if self.cdrom_keys.contains(&key) {
                format!("cdrom `{key}` in the boot order: not carried over (the disks boot first)")
            } else if numbered(&key, "net") {
                format!("network boot from `{key}`: not carried over (the disks boot first)")
            } else {
                format!("`{key}` in the boot order is not imported: not carried over")
            };
            report.note(file, line, "boot", why);
        }
    }
}

/// The Network a guest interface on `bridge` plugs into; a VLAN tag on a bridge that is
/// not VLAN-aware is dropped (reported). `None` (reported) when the bridge is not
/// imported.
pub fn network_for(
    ctx: &Ctx,
    file: &Path,
    e: &Entry,
    bridge: &str,
    vlan: &mut Option<u16>,
    report: &mut Report,
) -> Option<NetInfo> {
    let Some(net) = ctx.networks.get(bridge) else {
        report.note(
            file,
            e.line,
            &e.key,
            format!("bridge `{bridge}` is not imported: interface not carried over"),
        );
        return None;
    };
    if let Some(tag) = *vlan
        && !net.vlan_aware
    {
        report.note(
            file,
            e.line,
            &format!("{}.tag", e.key),
            format!(
                "VLAN tag {tag} on `{bridge}`, which is not VLAN-aware in stead: not carried over"
            ),
        );
        *vlan = None;
    }
    Some(net.clone())
}

/// The size of an ISO file under the root, when the disk line has no `size`.
fn iso_size(ctx: &Ctx, pool: &Pool, r: &VolRef) -> Option<u64> {
    let rel = r.volume.strip_prefix("iso/")?;
    let path = pool.path.join("template/iso").join(rel);
    let under_root = ctx.root.join(path.strip_prefix("/").unwrap_or(&path));
    std::fs::metadata(under_root).ok().map(|m| m.len())
}

/// A Proxmox cache mode.
fn disk_cache(v: &str) -> Option<DiskCache> {
    Some(match v {
        "none" => DiskCache::None,
        "writeback" => DiskCache::Writeback,
        "writethrough" => DiskCache::Writethrough,
        "directsync" => DiskCache::Directsync,
        "unsafe" => DiskCache::Unsafe,
        _ => return None,
    })
}

/// `bios: ovmf` → uefi, else bios.
fn firmware(file: &Path, main: &Section, report: &mut Report) -> Firmware {
    match main.get("bios") {
        Some(e) if e.value == "ovmf" => Firmware::Uefi,
        Some(e) if e.value != "seabios" => {
            report.note(
                file,
                e.line,
                "bios",
                format!("`{}`: SeaBIOS is used", e.value),
            );
            Firmware::Bios
        }
        _ => Firmware::Bios,
    }
}

/// `agent: 1` / `agent: enabled=1,…`.
fn agent(file: &Path, e: Option<&Entry>, report: &mut Report) -> bool {
    let Some(e) = e else { return false };
    let (first, opts) = property_string(&e.value);
    let mut on = first == Some("1");
    for (k, v) in opts {
        match k {
            "enabled" => on = v == "1",
            _ => report.note(
                file,
                e.line,
                &format!("agent.{k}"),
                reasons::agent_option(k, v),
            ),
        }
    }
    on
}

/// `scsihw`: stead's SCSI controller is virtio-scsi.
fn scsihw(file: &Path, e: Option<&Entry>, report: &mut Report) {
    if let Some(e) = e
        && !e.value.starts_with("virtio-scsi")
    {
        report.note(
            file,
            e.line,
            "scsihw",
            format!("`{}`: stead's SCSI disks use virtio-scsi", e.value),
        );
    }
}

/// Cloud-init: `ciuser`, `cipassword` (a hash), `sshkeys`, `ipconfigN`, `nameserver`,
/// `searchdomain` → `cloudInit` (network config version 1, as Proxmox writes it).
fn cloud_init(
    file: &Path,
    main: &Section,
    vm: &VmParts,
    report: &mut Report,
) -> Option<CloudInitSpec> {
    let keys = [
        "ciuser",
        "cipassword",
        "sshkeys",
        "nameserver",
        "searchdomain",
    ];
    if !vm.has_cloudinit_drive
        && vm.ipconfig.is_empty()
        && keys.iter().all(|k| main.get(k).is_none())
    {
        return None;
    }
    let mut spec = CloudInitSpec::default();
    let keys_list = ssh_keys(file, main.get("sshkeys"), report);
    let password = match main.get("cipassword") {
        Some(e) if e.value.starts_with('$') => Some(e.value.clone()),
        Some(e) => {
            report.note(
                file,
                e.line,
                "cipassword",
                "not a crypt(3) hash: not carried over (stead takes only password hashes)",
            );
            None
        }
        None => None,
    };
    match main.get("ciuser") {
        Some(e) if keys_list.is_empty() && password.is_none() => report.note(
            file,
            e.line,
            "ciuser",
            "no SSH key and no password hash: nobody could log in as this user, so it is not created (the image's default user is)",
        ),
        Some(e) if is_login(&e.value) => spec.users.push(CloudInitUser {
            name: e.value.clone(),
            ssh_authorized_keys: keys_list,
            password_hash: password,
            sudo: true,
            groups: vec![],
            shell: None,
        }),
        Some(e) => report.note(
            file,
            e.line,
            "ciuser",
            format!(
                "`{}` is not a login name stead accepts: not carried over",
                e.value
            ),
        ),
        None if !keys_list.is_empty() || password.is_some() => {
            let line = main
                .get("sshkeys")
                .or(main.get("cipassword"))
                .map_or(0, |e| e.line);
            report.note(
                file,
                line,
                "sshkeys",
                "keys and password are given to a user named `root` (no `ciuser`)",
            );
            spec.users.push(CloudInitUser {
                name: "root".into(),
                ssh_authorized_keys: keys_list,
                password_hash: password,
                sudo: false,
                groups: vec![],
                shell: None,
            });
        }
        None => {}
    }
    let network = network_config(file, main, vm, report);
    spec.network = network;
    Some(spec)
}

/// `sshkeys` (percent-encoded, one key per line); a key stead would refuse is reported.
fn ssh_keys(file: &Path, e: Option<&Entry>, report: &mut Report) -> Vec<String> {
    let Some(e) = e else { return vec![] };
    let mut out = Vec::new();
    for key in percent_decode(&e.value)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
    {
        match stead_schema::cloudinit::check_ssh_key(key) {
            Ok(()) => out.push(key.to_string()),
            Err(why) => report.note(
                file,
                e.line,
                "sshkeys",
                format!("a key {why}: not carried over"),
            ),
        }
    }
    out
}

/// Whether `s` is a login name cloud-init users may have.
fn is_login(s: &str) -> bool {
    let mut c = s.chars();
    s.len() <= 32
        && c.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && c.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// The cloud-init network config (version 1) from `ipconfigN`, `nameserver` and
/// `searchdomain`.
fn network_config(
    file: &Path,
    main: &Section,
    vm: &VmParts,
    report: &mut Report,
) -> Option<serde_json::Value> {
    let mut config = Vec::new();
    for e in &vm.ipconfig {
        let n = e.key.trim_start_matches("ipconfig");
        let net_key = format!("net{n}");
        let Some((_, mac)) = vm.net_keys.iter().find(|(k, _)| *k == net_key) else {
            report.note(
                file,
                e.line,
                &e.key,
                format!("no `{net_key}`: not carried over"),
            );
            continue;
        };
        let mut subnets = Vec::new();
        let (_, opts) = property_string(&e.value);
        let mut gw = None;
        for (k, v) in &opts {
            match *k {
                "ip" if *v == "dhcp" => subnets.push(serde_json::json!({"type": "dhcp"})),
                "ip" => subnets.push(serde_json::json!({"type": "static", "address": v})),
                "gw" => gw = v.parse::<IpAddr>().ok(),
                "ip6" if *v == "dhcp" => subnets.push(serde_json::json!({"type": "dhcp6"})),
                "ip6" if *v == "auto" => subnets.push(serde_json::json!({"type": "ipv6_slaac"})),
                "ip6" => subnets.push(serde_json::json!({"type": "static6", "address": v})),
                k => report.note(
                    file,
                    e.line,
                    &format!("{}.{k}", e.key),
                    reasons::ipconfig_option(k, v),
                ),
            }
        }
        if let (Some(gw), Some(s)) = (gw, subnets.iter_mut().find(|s| s["type"] == "static")) {
            s["gateway"] = gw.to_string().into();
        }
        let mut iface =
            serde_json::json!({"type": "physical", "name": format!("eth{n}"), "subnets": subnets});
        if let Some(mac) = mac {
            iface["mac_address"] = mac.to_string().into();
        }
        config.push(iface);
    }
    let ns: Vec<&str> = main
        .value("nameserver")
        .map(|v| v.split_whitespace().collect())
        .unwrap_or_default();
    let search: Vec<&str> = main
        .value("searchdomain")
        .map(|v| v.split_whitespace().collect())
        .unwrap_or_default();
    if !ns.is_empty() || !search.is_empty() {
        config.push(serde_json::json!({"type": "nameserver", "address": ns, "search": search}));
    }
    (!config.is_empty()).then(|| serde_json::json!({"version": 1, "config": config}))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::reader::parse_guest;
    use stead_schema::{Content, PoolType, RunState};

    pub(crate) fn pools() -> BTreeMap<String, Pool> {
        let mut m = BTreeMap::new();
        for (id, t, path, content) in [
            (
                "local",
                PoolType::Dir,
                "/var/lib/vz",
                vec![Content::Iso, Content::Images, Content::Rootdir],
            ),
            (
                "local-lvm",
                PoolType::Lvmthin,
                "/dev/pve/data",
                vec![Content::Images, Content::Rootdir],
            ),
        ] {
            m.insert(
                id.to_string(),
                Pool {
                    id: id.into(),
                    name: id.into(),
                    pool_type: t,
                    path: path.into(),
                    content,
                },
            );
        }
        m
    }

    pub(crate) fn networks() -> BTreeMap<String, NetInfo> {
        [("vmbr0", true, "10.0.0.1/24"), ("vmbr1", false, "")]
            .into_iter()
            .map(|(a, vlan_aware, addr)| {
                let info = NetInfo {
                    name: a.into(),
                    vlan_aware,
                    addresses: addr.parse().into_iter().collect(),
                };
                (a.to_string(), info)
            })
            .collect()
    }

    /// The pools, networks and (empty) volume names the guest tests import against.
    pub(crate) struct Fixture {
        pools: BTreeMap<String, Pool>,
        networks: BTreeMap<String, NetInfo>,
        names: BTreeMap<(String, String), String>,
    }

    impl Fixture {
        pub(crate) fn new() -> Self {
            Fixture {
                pools: pools(),
                networks: networks(),
                names: BTreeMap::new(),
            }
        }

        pub(crate) fn ctx(&self) -> Ctx<'_> {
            Ctx {
                pools: &self.pools,
                networks: &self.networks,
                volume_names: &self.names,
                root: Path::new("/nonexistent"),
            }
        }
    }

    /// `text` parsed as the config of guest `vmid` on pve1 (file `VMID.conf`).
    pub(crate) fn guest(vmid: u32, text: &str) -> GuestFile {
        let path = std::path::PathBuf::from(format!("{vmid}.conf"));
        let conf = parse_guest(&path, text).unwrap();
        GuestFile {
            vmid,
            node: "pve1".into(),
            path,
            conf,
        }
    }

    pub(crate) type Vm = (
        serde_json::Value,
        Vec<String>,
        Vec<((String, String), VolumeUse)>,
    );

    /// Imports `text` as VM 100; returns the spec JSON and the report lines.
    pub(crate) fn vm(text: &str) -> Vm {
        // Something to boot, so that the VM is imported (see `something_to_boot`).
        let has_drive = text
            .lines()
            .any(|l| disk_bus(l.split(':').next().unwrap_or("")).is_some());
        let text = if has_drive {
            text.to_string()
        } else {
            format!("{text}ide9: local:iso/boot.iso,media=cdrom,size=1M\n")
        };
        let f = Fixture::new();
        let g = guest(100, &text);
        let ctx = f.ctx();
        let i = import_vm(&g, "web", &ctx).unwrap();
        let notes = i.report.notes().iter().map(|n| n.render()).collect();
        (i.manifest.expect("imported").spec, notes, i.volumes)
    }

    #[test]
    fn options_left_out_say_why() {
        let (_, notes, _) = vm(
            "scsi0: local-lvm:vm-100-disk-0,size=8G,iothread=1,mbps_rd=50\n\
             net0: virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1,rate=12.5\n\
             ipconfig0: ip=10.0.0.5/24,gw=10.0.0.1,gw6=fd00::1\n\
             cicustom: user=local:snippets/u.yaml\nhotplug: disk,network\nfoo: bar\n",
        );
        for line in [
            "100.conf:1: scsi0.iothread: `iothread=1`: stead's QEMU picks its own I/O threads and AIO mode: not carried over",
            "100.conf:1: scsi0.mbps_rd: `mbps_rd=50`: the VirtualMachine kind has no disk I/O limits: not carried over",
            "100.conf:2: net0.firewall: `firewall=1`: stead has no per-interface guest firewall: not carried over",
            "100.conf:2: net0.rate: `rate=12.5`: interfaces have no bandwidth limit in stead: not carried over",
            "100.conf:3: ipconfig0.gw6: `gw6=fd00::1`: the generated network config carries only the IPv4 gateway `gw`: not carried over",
            "100.conf:4: cicustom: custom cloud-init files from a snippets storage",
            "100.conf:5: hotplug: hotplug settings (stead's QEMU uses its own): not carried over",
            "100.conf:6: foo: a setting the VirtualMachine kind has no field for: not carried over",
        ] {
            assert!(has(&notes, line), "{line}\n{notes:#?}");
        }
        assert!(
            !notes.iter().any(|n| n.contains("this setting")),
            "{notes:#?}"
        );
    }

    fn has(notes: &[String], prefix: &str) -> bool {
        notes.iter().any(|n| n.starts_with(prefix))
    }

    #[test]
    fn memory_and_cpus() {
        let (s, _, _) = vm("memory: 2048\ncores: 2\nsockets: 2\nonboot: 1\n");
        assert_eq!(s["memory"], "2Gi");
        assert_eq!(s["cpus"], 4);
        assert_eq!(s["state"], "running");
        let (s, notes, _) = vm("memory: current=1024\n");
        assert_eq!(s["memory"], "1Gi");
        assert_eq!(s["cpus"], 1);
        assert_eq!(s["state"], "stopped");
        assert!(has(&notes, "100.conf:0: onboot: not set"));
    }

    #[test]
    fn disks_buses_sizes_and_options() {
        let (s, notes, vols) = vm(
            "scsi0: local-lvm:vm-100-disk-0,size=32G,cache=writeback,discard=on,ssd=1\nvirtio1: local:100/vm-100-disk-1.qcow2,size=1T\nide0: local-lvm:vm-100-disk-2,size=512M\nsata1: /dev/disk/by-id/ata-X,size=1T\nscsi3: rbd:vm-100-disk-3,size=1G\n",
        );
        let d = &s["disks"];
        assert_eq!(d[0]["volume"], "vm-100-disk-0");
        assert_eq!(d[0]["bus"], "scsi");
        assert_eq!(d[0]["cache"], "writeback");
        assert_eq!(d[0]["discard"], true);
        assert_eq!(d[1]["bus"], "virtio");
        assert_eq!(d[2]["bus"], "sata");
        assert_eq!(d.as_array().unwrap().len(), 3);
        assert_eq!(vols[0].1.size, 32 << 30);
        assert_eq!(vols[1].1.format, stead_schema::VolumeFormat::Qcow2);
        assert_eq!(vols[1].1.size, 1 << 40);
        assert!(has(&notes, "100.conf:1: scsi0.ssd:"));
        assert!(has(&notes, "100.conf:3: ide0: IDE bus: attached as `sata`"));
        assert!(has(&notes, "100.conf:4: sata1: host device or path"));
        assert!(has(
            &notes,
            "100.conf:5: scsi3: storage `rbd` is not imported"
        ));
    }

    #[test]
    fn empty_disk_spec_is_an_error() {
        let f = Fixture::new();
        let ctx = f.ctx();
        let g = guest(100, "name: a\nscsi0: ,size=8G\n");
        let e = import_vm(&g, "a", &ctx).unwrap_err();
        assert_eq!(
            e[0].to_string(),
            "100.conf:2: scsi0: empty disk spec: expected STORAGE:VOLUME"
        );
        let conf = parse_guest(&g.path, "scsi0: local:vm-1-disk-0,size=8X\n").unwrap();
        let g = GuestFile { conf, ..g };
        assert!(
            import_vm(&g, "a", &ctx).unwrap_err()[0]
                .message
                .contains("size `8X`")
        );
    }

    #[test]
    fn cdroms_and_cloudinit_drive() {
        let (s, notes, vols) = vm(
            "ide2: local:iso/debian-12.iso,media=cdrom,size=600M\nide0: none,media=cdrom\nide3: local-lvm:vm-100-cloudinit,media=cdrom\nsata0: cdrom,media=cdrom\nide1: local:iso/missing.iso,media=cdrom\n",
        );
        assert_eq!(s["cdroms"][0]["volume"], "debian-12");
        assert_eq!(s["cdroms"].as_array().unwrap().len(), 1);
        assert!(s.get("disks").is_none());
        assert_eq!(vols.len(), 1);
        assert!(has(
            &notes,
            "100.conf:3: ide3: the cloud-init drive: ignored"
        ));
        assert!(has(&notes, "100.conf:4: sata0: the host's physical cdrom"));
        assert!(has(&notes, "100.conf:5: ide1: no `size`"));
        // A cloud-init drive alone makes an (empty) cloudInit block.
        assert!(s["cloudInit"].is_object());
    }

    #[test]
    fn boot_order() {
        let (s, notes, _) = vm(
            "boot: order=virtio1;ide2;scsi0;net0\nscsi0: local-lvm:vm-100-disk-0,size=8G\nvirtio1: local-lvm:vm-100-disk-1,size=8G\nide2: local:iso/d.iso,media=cdrom,size=1M\nnet0: virtio=BC:24:11:00:00:01,bridge=vmbr0\n",
        );
        assert_eq!(s["disks"][0]["boot"], 2);
        assert_eq!(s["disks"][1]["boot"], 1);
        assert!(s["cdroms"][0].get("boot").is_none());
        assert!(has(
            &notes,
            "100.conf:1: boot: cdrom `ide2` in the boot order"
        ));
        assert!(has(&notes, "100.conf:1: boot: network boot from `net0`"));
        let (s, notes, _) =
            vm("boot: cdn\nbootdisk: virtio0\nvirtio0: local-lvm:vm-100-disk-0,size=8G\n");
        assert_eq!(s["disks"][0]["boot"], 1);
        assert!(has(&notes, "100.conf:1: boot: legacy boot devices `cdn`"));
    }

    #[test]
    fn linked_clones_and_templates() {
        let (_, _, vols) = vm(
            "scsi0: local-lvm:base-9000-disk-0/vm-100-disk-0,size=8G\nvirtio0: local:9000/base-9000-disk-1.qcow2/100/vm-100-disk-1.qcow2,size=8G\n",
        );
        assert_eq!(
            vols[0].1.clone_of,
            Some(("local-lvm".into(), "base-9000-disk-0".into()))
        );
        assert_eq!(
            vols[1].1.clone_of,
            Some(("local".into(), "base-9000-disk-1".into()))
        );
        let (s, notes, vols) =
            vm("template: 1\nonboot: 1\nscsi0: local-lvm:base-100-disk-0,size=8G\n");
        assert!(vols[0].1.template);
        assert_eq!(s["disks"][0]["readOnly"], true);
        assert_eq!(s["state"], "stopped");
        assert!(has(&notes, "100.conf:1: template: a template"));
    }

    #[test]
    fn firmware_efidisk_agent() {
        let (s, notes, vols) = vm(
            "bios: ovmf\nefidisk0: local-lvm:vm-100-disk-9,efitype=4m,pre-enrolled-keys=1,size=4M\nagent: enabled=1,fstrim_cloned_disks=1\n",
        );
        assert_eq!(s["firmware"], "uefi");
        assert_eq!(s["agent"], true);
        assert_eq!(vols[0].1.size, 4 << 20);
        assert!(s.get("disks").is_none());
        assert!(has(
            &notes,
            "100.conf:2: efidisk0: the EFI vars disk is imported"
        ));
        assert!(has(&notes, "100.conf:3: agent.fstrim_cloned_disks:"));
        assert!(has(
            &notes,
            "100.conf:2: efidisk0: the EFI vars disk is imported as a Volume but not attached: the VirtualMachine kind has no NVRAM volume"
        ));
        let (_, notes, vols) = vm("bios: ovmf\nefidisk0: /dev/disk/by-id/nvme-efi,size=4M\n");
        assert!(
            vols.iter().all(|(_, u)| u.origin.2 != "efidisk0"),
            "{vols:?}"
        );
        assert!(has(
            &notes,
            "100.conf:2: efidisk0: a host path, not a Proxmox volume: the EFI vars disk is not carried over"
        ));
        let (_, notes, _) = vm("bios: ovmf\nefidisk0: nowhere:vm-100-disk-9,size=4M\n");
        assert!(has(
            &notes,
            "100.conf:2: efidisk0: storage `nowhere` is not imported: EFI vars disk not carried over"
        ));
        let (_, notes, _) = vm("bios: ovmf\nefidisk0: local-lvm:vm-100-disk-9\n");
        assert!(has(
            &notes,
            "100.conf:2: efidisk0: no `size`: EFI vars disk not carried over"
        ));
        let (s, _, _) = vm("bios: seabios\nagent: 1\n");
        assert_eq!(s["firmware"], "bios");
        assert_eq!(s["agent"], true);
        let (s, _, _) = vm("agent: 0\n");
        assert!(s.get("agent").is_none());
    }

    #[test]
    fn interfaces() {
        let (s, notes, _) = vm(
            "net0: virtio=BC:24:11:AA:BB:CC,bridge=vmbr0,tag=20,firewall=1\nnet1: e1000=BC:24:11:AA:BB:CD,bridge=vmbr1,rate=10,queues=4\nnet2: virtio=BC:24:11:AA:BB:CE,bridge=vnetx\n",
        );
        let i = &s["interfaces"];
        assert_eq!(
            i[0],
            serde_json::json!({"network": "vmbr0", "mac": "bc:24:11:aa:bb:cc", "vlan": 20})
        );
        assert_eq!(i[1]["network"], "vmbr1");
        assert_eq!(i.as_array().unwrap().len(), 2);
        assert!(has(&notes, "100.conf:1: net0.firewall:"));
        assert!(has(&notes, "100.conf:2: net1.model: NIC model `e1000`"));
        assert!(has(&notes, "100.conf:2: net1.rate:"));
        assert!(has(&notes, "100.conf:2: net1.queues:"));
        assert!(has(
            &notes,
            "100.conf:3: net2: bridge `vnetx` is not imported"
        ));
    }

    #[test]
    fn cloud_init_fields() {
        let (s, notes, _) = vm(
            "ciuser: debian\ncipassword: $6$salt$hash\nsshkeys: ssh-ed25519%20AAAAC3NzaC1lZDI1NTE5AAAAIBUxREmTihB%2FR6rWF0Q%2B6Tp7sMH7P3o89pqfoIWlBOMe%20me%40x%0Assh-rsa%20BBBB%0A\nipconfig0: ip=10.0.0.5/24,gw=10.0.0.1\nipconfig1: ip=dhcp,ip6=auto\nnameserver: 10.0.0.53 1.1.1.1\nsearchdomain: corp.example\nnet0: virtio=BC:24:11:00:00:01,bridge=vmbr0\nnet1: virtio=BC:24:11:00:00:02,bridge=vmbr1\ncitype: nocloud\n",
        );
        let ci = &s["cloudInit"];
        let u = &ci["users"][0];
        assert_eq!(u["name"], "debian");
        assert_eq!(u["passwordHash"], "$6$salt$hash");
        assert_eq!(
            u["sshAuthorizedKeys"],
            serde_json::json!([
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBUxREmTihB/R6rWF0Q+6Tp7sMH7P3o89pqfoIWlBOMe me@x"
            ])
        );
        assert_eq!(u["sudo"], true);
        let cfg = &ci["network"]["config"];
        assert_eq!(ci["network"]["version"], 1);
        assert_eq!(
            cfg[0]["subnets"][0],
            serde_json::json!({"type": "static", "address": "10.0.0.5/24", "gateway": "10.0.0.1"})
        );
        assert_eq!(cfg[0]["mac_address"], "bc:24:11:00:00:01");
        assert_eq!(cfg[1]["subnets"][0]["type"], "dhcp");
        assert_eq!(cfg[1]["subnets"][1]["type"], "ipv6_slaac");
        assert_eq!(
            cfg[2],
            serde_json::json!({"type": "nameserver", "address": ["10.0.0.53", "1.1.1.1"], "search": ["corp.example"]})
        );
        assert!(has(&notes, "100.conf:10: citype:"));
        assert!(ci.get("hostname").is_none(), "no name: stead's default");
        assert!(has(&notes, "100.conf:3: sshkeys: a key"));
        assert!(stead_schema::cloudinit::check_network_config(&ci["network"]).is_empty());
        let (s, notes, _) = vm("ciuser: debian\nipconfig0: ip=dhcp\n");
        assert!(s["cloudInit"].get("users").is_none());
        assert!(has(
            &notes,
            "100.conf:1: ciuser: no SSH key and no password hash"
        ));
        let (s, notes, _) = vm("ciuser: Bad.User\ncipassword: $6$x$y\n");
        assert!(s["cloudInit"].get("users").is_none());
        assert!(has(&notes, "100.conf:1: ciuser:"));
        let (_, notes, _) = vm("ciuser: root\ncipassword: plain\n");
        assert!(has(&notes, "100.conf:2: cipassword: not a crypt(3) hash"));
    }

    #[test]
    fn sections_and_unmapped_keys() {
        let (s, notes, _) = vm(
            "virtio0: local-lvm:vm-100-disk-0,size=1G\nhostpci0: 0000:01:00.0\nusb0: host=1-2\nargs: -device foo\nhookscript: local:snippets/h.pl\ntpmstate0: local-lvm:vm-100-disk-5,size=4M\nparent: snap1\n[snap1]\nmemory: 512\n[PENDING]\nmemory: 4096\n[special:cloudinit]\nname: x\n",
        );
        assert_eq!(s["memory"], "512Mi");
        for p in [
            "100.conf:2: hostpci0: PCI passthrough",
            "100.conf:3: usb0: USB passthrough",
            "100.conf:4: args: raw QEMU",
            "100.conf:5: hookscript: hook",
            "100.conf:6: tpmstate0: TPM state",
            "100.conf:7: parent:",
            "100.conf:8: [snap1]: a snapshot section",
            "100.conf:10: [PENDING]: pending changes",
        ] {
            assert!(has(&notes, p), "{p} in {notes:?}");
        }
        assert!(!notes.iter().any(|n| n.contains("special:cloudinit")));
        let (_, notes, _) =
            vm("virtio0: local-lvm:vm-100-disk-0,size=1G\n[pve:pending]\nmemory: 2048\n");
        assert!(
            has(&notes, "100.conf:2: [pve:pending]: pending changes"),
            "{notes:?}"
        );
    }

    #[test]
    fn cloud_init_host_name_is_the_vm_name() {
        let (s, _, _) = vm(
            "name: mail.corp.example\nipconfig0: ip=dhcp\nnet0: virtio=BC:24:11:00:00:01,bridge=vmbr0\n",
        );
        assert_eq!(s["cloudInit"]["hostname"], "mail.corp.example");
    }

    #[test]
    fn something_to_boot() {
        let (s, notes, _) =
            vm("scsi0: ceph:vm-100-disk-0,size=8G\nnet0: virtio=BC:24:11:00:00:01,bridge=vmbr0\n");
        assert_eq!(s["interfaces"][0]["boot"], 1);
        assert!(has(&notes, "100.conf:0: boot: no disk or cdrom"));
        let f = Fixture::new();
        let ctx = f.ctx();
        let g = guest(
            100,
            "scsi0: ceph:vm-100-disk-0,size=8G\nefidisk0: local-lvm:vm-100-disk-1,size=4M\n",
        );
        let i = import_vm(&g, "a", &ctx).unwrap();
        assert!(i.manifest.is_none());
        assert_eq!(i.volumes.len(), 1, "the efidisk volume is still imported");
        assert!(i.report.notes().iter().any(|n| {
            n.render()
                .starts_with("100.conf:0: file: no disk, cdrom or interface")
        }));
    }

    #[test]
    fn a_volume_is_attached_once_and_cpus_are_capped() {
        let (s, notes, _) = vm(
            "cores: 64\nsockets: 8\nide2: local:iso/d.iso,media=cdrom,size=1M\nide3: local:iso/d.iso,media=cdrom,size=1M\n",
        );
        assert_eq!(s["cdroms"].as_array().unwrap().len(), 1);
        assert!(has(
            &notes,
            "100.conf:4: ide3: volume `iso/d.iso` is already attached"
        ));
        assert_eq!(s["cpus"], 254);
        assert!(has(&notes, "100.conf:1: cores: 512 vCPUs"));
    }

    #[test]
    fn running_state_only_with_onboot() {
        let (s, notes, _) = vm("onboot: 0\n");
        assert_eq!(s["state"], RunState::Stopped.into_json());
        assert!(has(&notes, "100.conf:1: onboot: not 1"));
    }

    trait IntoJson {
        fn into_json(self) -> serde_json::Value;
    }
    impl IntoJson for RunState {
        fn into_json(self) -> serde_json::Value {
            serde_json::to_value(self).unwrap()
        }
    }
}
