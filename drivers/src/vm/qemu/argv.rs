//! The QEMU command line of a VM: [`argv`], a pure function of its [`QemuConfig`].
//!
//! Layout:
//! - no defaults, no user config, no local display (a standard VGA adapter, the last
//!   device, for the VNC screen); `-sandbox on` with obsolete system calls,
//!   privilege elevation, spawning and resource control denied;
//! - the serial port on an inherited socket ([`SERIAL_FD`]) the supervisor relays to the
//!   console log and `stead console`; the supervisor's own QMP channel on another
//!   ([`SUPERVISOR_QMP_FD`]); a QMP unix socket for short-lived clients; VNC on a unix
//!   socket; the guest agent's virtio-serial port on a unix socket;
//! - every disk as a `-blockdev` pair (file node `<id>-file`, format node `<id>`) and a
//!   device `<id>-dev` on its bus (virtio-blk, a virtio-scsi controller only when a disk
//!   needs one, AHCI ports for SATA disks and cdroms, the cloud-init seed on virtio-blk);
//! - taps on inherited descriptors ([`TAP_FD_BASE`] + the interface's index) that the
//!   supervisor opened: persistent taps the driver made on the bridge, never made by QEMU
//!   (`ifname=` would create a tap that apply had deleted).

use std::path::Path;

use stead_schema::{DiskBus, DiskCache};

use super::accel::Accel;
use super::config::{FirmwareRun, QemuCdrom, QemuConfig, QemuDisk, QemuNic};

/// The descriptor QEMU inherits for the serial port (a stream socket).
pub const SERIAL_FD: i32 = 3;
/// The descriptor QEMU inherits for the supervisor's QMP channel (a stream socket).
pub const SUPERVISOR_QMP_FD: i32 = 4;
/// The descriptor QEMU inherits for the tap of interface 0 (interface `i` at
/// `TAP_FD_BASE + i`).
pub const TAP_FD_BASE: i32 = 5;
/// TCG translation cache size in MiB (QEMU's default of 1 GiB would be charged to the
/// VM's memory cgroup).
pub const TCG_TB_SIZE_MIB: u64 = 256;
/// What a TCG guest's RAM is made smaller by, in KiB, when its size is a multiple of
/// [`TCG_DIRTY_SYNC_ALIGN`] (see [`ram_size_arg`]).
pub const TCG_RAM_TRIM_KIB: u64 = 8;
/// The RAM sizes whose TCG guests QEMU before 9.0 may corrupt in a live migration: a
/// multiple of 64 pages, where its dirty-bitmap sync takes a word-at-a-time fast path.
pub const TCG_DIRTY_SYNC_ALIGN: u64 = 64 * 4096;
/// Ports of the AHCI controller (SATA disks and cdroms share them).
pub const AHCI_PORTS: usize = 6;
/// The `-sandbox` option.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// A value for QEMU's `key=value,…` option syntax: commas doubled.
fn esc(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

fn on_off(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

/// `(cache.direct, cache.no-flush, write-cache)` of a cache mode.
fn cache_flags(c: DiskCache) -> (bool, bool, bool) {
    match c {
        DiskCache::None => (true, false, true),
        DiskCache::Writeback => (false, false, true),
        DiskCache::Writethrough => (false, false, false),
        DiskCache::Directsync => (true, false, false),
        DiskCache::Unsafe => (false, true, true),
    }
}

/// The two `-blockdev` values of a disk: its file node, then its format node.
pub fn disk_blockdevs(d: &QemuDisk) -> [String; 2] {
    let (direct, no_flush, _) = cache_flags(d.cache);
    let cache = format!(
        "cache.direct={},cache.no-flush={}",
        on_off(direct),
        on_off(no_flush)
    );
    let discard = if d.discard { "unmap" } else { "ignore" };
    let ro = on_off(d.read_only);
    [
        format!(
            "driver=file,filename={},node-name={},{cache},discard={discard},read-only={ro},auto-read-only=off",
            esc(&d.path),
            d.file_node()
        ),
        format!(
            "driver={},file={},node-name={},{cache},discard={discard},read-only={ro}",
            d.format.as_str(),
            d.file_node(),
            d.node()
        ),
    ]
}

fn bootindex(b: Option<u32>) -> String {
    b.map(|i| format!(",bootindex={i}")).unwrap_or_default()
}

/// The `-device` value of a disk (`sata_port`: its AHCI port when on SATA).
pub fn disk_device(d: &QemuDisk, sata_port: Option<usize>) -> String {
    let (_, _, wc) = cache_flags(d.cache);
    let common = format!(
        "drive={},id={},write-cache={}{}",
        d.node(),
        d.device_id(),
        on_off(wc),
        bootindex(d.boot)
    );
    match d.bus {
        DiskBus::Virtio => {
            let discard = if d.discard { ",discard=on" } else { "" };
            format!("virtio-blk-pci,{common}{discard}")
        }
        DiskBus::Scsi => format!("scsi-hd,bus=scsi0.0,{common}"),
        DiskBus::Sata => format!("ide-hd,bus=sata0.{},{common}", sata_port.unwrap_or(0)),
    }
}

/// The `-blockdev` value of a cdrom (a read-only raw image, node `<id>`).
pub fn cdrom_blockdev(c: &QemuCdrom) -> String {
    format!(
        "driver=raw,node-name={},read-only=on,file.driver=file,file.filename={},file.read-only=on",
        c.id,
        esc(&c.path)
    )
}

/// The `-device` value of the cloud-init seed: a read-only virtio disk (guest kernels
/// built for clouds may lack AHCI and cdrom drivers; cloud-init finds it by its label).
pub fn seed_device(c: &QemuCdrom) -> String {
    format!("virtio-blk-pci,drive={},id={}-dev", c.id, c.id)
}

/// The `-device` value of a cdrom on AHCI port `port`.
pub fn cdrom_device(c: &QemuCdrom, port: usize) -> String {
    format!(
        "ide-cd,bus=sata0.{port},drive={},id={}-dev{}",
        c.id,
        c.id,
        bootindex(c.boot)
    )
}

/// The `-netdev` value of an interface whose tap QEMU inherits as descriptor `fd`.
pub fn nic_netdev(n: &QemuNic, fd: i32) -> String {
    format!("tap,id={},fd={fd}", n.id)
}

/// The `-device` value of an interface.
pub fn nic_device(n: &QemuNic) -> String {
    format!(
        "virtio-net-pci,netdev={},id={}-dev,mac={}{}",
        n.id,
        n.id,
        n.mac,
        bootindex(n.boot)
    )
}

fn push(out: &mut Vec<String>, opt: &str, val: impl Into<String>) {
    out.push(opt.to_string());
    out.push(val.into());
}

fn machine_and_firmware(c: &QemuConfig, out: &mut Vec<String>) {
    let mut machine = c.machine.as_str().to_string();
    if let FirmwareRun::Uefi {
        code,
        vars,
        secure_boot,
        ..
    } = &c.firmware
    {
        push(
            out,
            "-blockdev",
            format!(
                "driver=file,filename={},node-name=fw-code,read-only=on",
                esc(code)
            ),
        );
        push(
            out,
            "-blockdev",
            format!("driver=file,filename={},node-name=fw-vars", esc(vars)),
        );
        machine.push_str(",pflash0=fw-code,pflash1=fw-vars");
        if *secure_boot {
            machine.push_str(",smm=on");
            push(
                out,
                "-global",
                "driver=cfi.pflash01,property=secure,value=on",
            );
        }
    }
    push(out, "-machine", machine);
    match c.accel {
        Accel::Tcg => {
            push(out, "-accel", format!("tcg,tb-size={TCG_TB_SIZE_MIB}"));
            push(out, "-cpu", "max");
        }
        Accel::Kvm => {
            push(out, "-accel", "kvm");
            push(out, "-cpu", "host");
        }
    }
}

/// The `-m` value of a guest of `memory` bytes.
///
/// Under KVM it is the size asked for. Under TCG a size that is a multiple of 256 KiB is
/// made [`TCG_RAM_TRIM_KIB`] smaller: QEMU before 9.0 (Debian 12 ships 7.2) syncs the
/// migration dirty bitmap of such a RAM block a word at a time without marking the TCG
/// TLB's entries clean again, so a guest store through a cached entry after a sync is
/// not recorded and is lost on the target ("physmem: Fix migration dirty bitmap
/// coherency with TCG memory access", QEMU 9.0). Any other size takes the page-at-a-time
/// path, which resets the TLB. The guest sees 8 KiB less RAM; both ends of a migration
/// compute the same size.
pub fn ram_size_arg(memory: u64, accel: Accel) -> String {
    let kib = memory >> 10;
    match accel {
        Accel::Tcg if memory.is_multiple_of(TCG_DIRTY_SYNC_ALIGN) && kib > TCG_RAM_TRIM_KIB => {
            format!("{}k", kib - TCG_RAM_TRIM_KIB)
        }
        _ if memory.is_multiple_of(1 << 20) => format!("{}M", memory >> 20),
        _ => format!("{kib}k"),
    }
}

fn channels(c: &QemuConfig, out: &mut Vec<String>) {
    push(out, "-chardev", format!("socket,id=serial0,fd={SERIAL_FD}"));
    push(out, "-serial", "chardev:serial0");
    push(
        out,
        "-chardev",
        format!("socket,id=qmp-sup,fd={SUPERVISOR_QMP_FD}"),
    );
    push(out, "-mon", "chardev=qmp-sup,mode=control");
    push(
        out,
        "-qmp",
        format!("unix:{},server=on,wait=off", esc(&c.sockets.qmp)),
    );
    push(out, "-vnc", format!("unix:{}", esc(&c.sockets.vnc)));
    if c.agent {
        push(
            out,
            "-chardev",
            format!(
                "socket,id=qga0,path={},server=on,wait=off",
                esc(&c.sockets.qga)
            ),
        );
        push(out, "-device", "virtio-serial-pci,id=vser0");
        push(
            out,
            "-device",
            "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
        );
    }
}

fn storage(c: &QemuConfig, out: &mut Vec<String>) {
    if c.uses_bus(DiskBus::Scsi) {
        push(out, "-device", "virtio-scsi-pci,id=scsi0");
    }
    let needs_ahci = c.uses_bus(DiskBus::Sata) || c.cdroms.iter().any(|cd| cd.volume.is_some());
    if needs_ahci {
        push(out, "-device", "ahci,id=sata0");
    }
    let mut port = 0usize;
    for d in &c.disks {
        for b in disk_blockdevs(d) {
            push(out, "-blockdev", b);
        }
        let sata = (d.bus == DiskBus::Sata).then(|| {
            port += 1;
            port - 1
        });
        push(out, "-device", disk_device(d, sata));
    }
    for cd in &c.cdroms {
        push(out, "-blockdev", cdrom_blockdev(cd));
        if cd.volume.is_none() {
            push(out, "-device", seed_device(cd));
        } else {
            push(out, "-device", cdrom_device(cd, port));
            port += 1;
        }
    }
}

/// Checks what [`argv`] cannot express: more SATA disks and cdroms than AHCI ports.
pub fn check(c: &QemuConfig) -> Result<(), String> {
    let ports = c.disks.iter().filter(|d| d.bus == DiskBus::Sata).count()
        + c.cdroms.iter().filter(|cd| cd.volume.is_some()).count();
    if ports > AHCI_PORTS {
        return Err(format!(
            "{ports} SATA disks and cdroms: at most {AHCI_PORTS}"
        ));
    }
    Ok(())
}

/// The full command line (program first) of VM `c`.
pub fn argv(c: &QemuConfig) -> Vec<String> {
    let mut out = vec![c.binary.display().to_string()];
    push(
        &mut out,
        "-name",
        format!("guest={},debug-threads=on", c.name),
    );
    out.extend(["-nodefaults", "-no-user-config"].map(String::from));
    push(&mut out, "-display", "none");
    if c.sandbox {
        push(&mut out, "-sandbox", SANDBOX);
    }
    push(&mut out, "-msg", "timestamp=on");
    machine_and_firmware(c, &mut out);
    push(&mut out, "-smp", c.cpus.to_string());
    push(&mut out, "-m", ram_size_arg(c.memory, c.accel));
    channels(c, &mut out);
    storage(c, &mut out);
    for (n, fd) in c.nics.iter().zip(TAP_FD_BASE..) {
        push(&mut out, "-netdev", nic_netdev(n, fd));
        push(&mut out, "-device", nic_device(n));
    }
    push(&mut out, "-device", "virtio-rng-pci,id=rng0");
    // The screen VNC shows (the firmware's, then the guest's): added last so the other
    // devices keep the PCI slots they had without it.
    push(&mut out, "-device", "VGA,id=video0");
    if c.incoming {
        // Paused once the guest has arrived (`-S`): the target starts it with `cont` after
        // closing the disk copy's exports, never on its own.
        out.push("-S".into());
        push(&mut out, "-incoming", "defer");
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use stead_schema::RestartPolicy;

    use super::*;
    use crate::vm::qemu::config::{DiskFormat, Machine, Sockets};

    fn base() -> QemuConfig {
        QemuConfig {
            engine: "qemu".into(),
            name: "vm1".into(),
            binary: "qemu-system-x86_64".into(),
            cpus: 2,
            memory: 512 << 20,
            requested_accel: stead_schema::VmAccel::Auto,
            accel: Accel::Tcg,
            accel_warning: None,
            run_as: None,
            user_warning: None,
            incoming: false,
            machine: Machine::Pc,
            firmware: FirmwareRun::Bios,
            disks: vec![],
            cdroms: vec![],
            nics: vec![],
            agent: false,
            cloud_init: None,
            sockets: Sockets {
                qmp: "/r/vms/vm1/qmp.sock".into(),
                qga: "/r/vms/vm1/qga.sock".into(),
                vnc: "/r/vms/vm1/vnc.sock".into(),
            },
            sandbox: true,
            restart_policy: RestartPolicy::Always,
            running: true,
            cgroup_parent: "stead".into(),
            netns: None,
            shutdown_timeout_secs: 10,
            fence_file: None,
        }
    }

    fn disk(i: usize, bus: DiskBus) -> QemuDisk {
        QemuDisk {
            id: format!("disk{i}"),
            volume: format!("v{i}"),
            path: PathBuf::from(format!("/p/images/v{i}.qcow2")),
            format: DiskFormat::Qcow2,
            bus,
            cache: DiskCache::None,
            discard: false,
            read_only: false,
            boot: None,
        }
    }

    fn joined(c: &QemuConfig) -> String {
        argv(c).join(" ")
    }

    #[test]
    fn bios_vm_whole_command_line() {
        let mut c = base();
        c.disks.push(QemuDisk {
            boot: Some(1),
            ..disk(0, DiskBus::Virtio)
        });
        c.cdroms.push(QemuCdrom {
            id: "seed".into(),
            volume: None,
            path: "/r/vms/vm1/seed.iso".into(),
            boot: None,
        });
        c.nics.push(QemuNic {
            id: "net0".into(),
            network: "lan0".into(),
            tap: "tv12345678i0".into(),
            mac: "52:54:00:12:34:56".into(),
            boot: None,
        });
        c.agent = true;
        let want = [
            "qemu-system-x86_64",
            "-name guest=vm1,debug-threads=on",
            "-nodefaults -no-user-config -display none",
            "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-msg timestamp=on",
            "-machine pc -accel tcg,tb-size=256 -cpu max",
            "-smp 2 -m 524280k",
            "-chardev socket,id=serial0,fd=3 -serial chardev:serial0",
            "-chardev socket,id=qmp-sup,fd=4 -mon chardev=qmp-sup,mode=control",
            "-qmp unix:/r/vms/vm1/qmp.sock,server=on,wait=off",
            "-vnc unix:/r/vms/vm1/vnc.sock",
            "-chardev socket,id=qga0,path=/r/vms/vm1/qga.sock,server=on,wait=off",
            "-device virtio-serial-pci,id=vser0",
            "-device virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
            "-blockdev driver=file,filename=/p/images/v0.qcow2,node-name=disk0-file,cache.direct=on,cache.no-flush=off,discard=ignore,read-only=off,auto-read-only=off",
            "-blockdev driver=qcow2,file=disk0-file,node-name=disk0,cache.direct=on,cache.no-flush=off,discard=ignore,read-only=off",
            "-device virtio-blk-pci,drive=disk0,id=disk0-dev,write-cache=on,bootindex=1",
            "-blockdev driver=raw,node-name=seed,read-only=on,file.driver=file,file.filename=/r/vms/vm1/seed.iso,file.read-only=on",
            "-device virtio-blk-pci,drive=seed,id=seed-dev",
            "-netdev tap,id=net0,fd=5",
            "-device virtio-net-pci,netdev=net0,id=net0-dev,mac=52:54:00:12:34:56",
            "-device virtio-rng-pci,id=rng0",
            "-device VGA,id=video0",
        ]
        .join(" ");
        assert_eq!(joined(&c), want);
    }

    #[test]
    fn an_incoming_vm_waits_for_a_migration_last() {
        let mut c = base();
        assert!(!argv(&c).iter().any(|a| a == "-incoming"));
        c.incoming = true;
        let args = argv(&c);
        assert_eq!(args[args.len() - 3..], ["-S", "-incoming", "defer"]);
        c.incoming = false;
        assert!(!argv(&c).iter().any(|a| a == "-S"));
    }

    #[test]
    fn uefi_vm_whole_command_line() {
        let mut c = base();
        c.machine = Machine::Q35;
        c.accel = Accel::Kvm;
        c.cpus = 1;
        c.memory = 1 << 30;
        c.firmware = FirmwareRun::Uefi {
            code: "/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
            vars: "/var/lib/stead/vms/vm1/nvram.fd".into(),
            vars_template: "/usr/share/OVMF/OVMF_VARS_4M.fd".into(),
            secure_boot: false,
        };
        c.disks.push(QemuDisk {
            boot: Some(1),
            ..disk(0, DiskBus::Virtio)
        });
        let want = [
            "qemu-system-x86_64",
            "-name guest=vm1,debug-threads=on",
            "-nodefaults -no-user-config -display none",
            "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-msg timestamp=on",
            "-blockdev driver=file,filename=/usr/share/OVMF/OVMF_CODE_4M.fd,node-name=fw-code,read-only=on",
            "-blockdev driver=file,filename=/var/lib/stead/vms/vm1/nvram.fd,node-name=fw-vars",
            "-machine q35,pflash0=fw-code,pflash1=fw-vars -accel kvm -cpu host",
            "-smp 1 -m 1024M",
            "-chardev socket,id=serial0,fd=3 -serial chardev:serial0",
            "-chardev socket,id=qmp-sup,fd=4 -mon chardev=qmp-sup,mode=control",
            "-qmp unix:/r/vms/vm1/qmp.sock,server=on,wait=off",
            "-vnc unix:/r/vms/vm1/vnc.sock",
            "-blockdev driver=file,filename=/p/images/v0.qcow2,node-name=disk0-file,cache.direct=on,cache.no-flush=off,discard=ignore,read-only=off,auto-read-only=off",
            "-blockdev driver=qcow2,file=disk0-file,node-name=disk0,cache.direct=on,cache.no-flush=off,discard=ignore,read-only=off",
            "-device virtio-blk-pci,drive=disk0,id=disk0-dev,write-cache=on,bootindex=1",
            "-device virtio-rng-pci,id=rng0",
            "-device VGA,id=video0",
        ]
        .join(" ");
        assert_eq!(joined(&c), want);
    }

    #[test]
    fn secure_boot_turns_on_smm_and_secure_flash() {
        let mut c = base();
        c.machine = Machine::Q35;
        c.firmware = FirmwareRun::Uefi {
            code: "/c.fd".into(),
            vars: "/v.fd".into(),
            vars_template: "/t.fd".into(),
            secure_boot: true,
        };
        let s = joined(&c);
        assert!(
            s.contains("-machine q35,pflash0=fw-code,pflash1=fw-vars,smm=on"),
            "{s}"
        );
        assert!(
            s.contains("-global driver=cfi.pflash01,property=secure,value=on"),
            "{s}"
        );
    }

    #[test]
    fn scsi_controller_only_when_a_disk_needs_it() {
        let mut c = base();
        c.disks.push(disk(0, DiskBus::Virtio));
        assert!(!joined(&c).contains("virtio-scsi-pci"));
        assert!(!joined(&c).contains("ahci"), "no SATA disk, no cdrom");
        c.disks.push(disk(1, DiskBus::Scsi));
        let s = joined(&c);
        assert_eq!(s.matches("virtio-scsi-pci,id=scsi0").count(), 1);
        assert!(
            s.contains("-device scsi-hd,bus=scsi0.0,drive=disk1,id=disk1-dev,write-cache=on"),
            "{s}"
        );
    }

    #[test]
    fn sata_disks_and_cdroms_share_ahci_ports() {
        let mut c = base();
        c.disks.push(disk(0, DiskBus::Sata));
        c.disks.push(disk(1, DiskBus::Sata));
        c.cdroms.push(QemuCdrom {
            id: "cd0".into(),
            volume: Some("iso".into()),
            path: "/p/images/iso.raw".into(),
            boot: Some(2),
        });
        let s = joined(&c);
        assert!(s.contains("ide-hd,bus=sata0.0,drive=disk0"), "{s}");
        assert!(s.contains("ide-hd,bus=sata0.1,drive=disk1"), "{s}");
        assert!(
            s.contains("-device ide-cd,bus=sata0.2,drive=cd0,id=cd0-dev,bootindex=2"),
            "{s}"
        );
        assert!(check(&c).is_ok());
        for i in 0..5 {
            c.cdroms.push(QemuCdrom {
                id: format!("x{i}"),
                volume: Some("x".into()),
                path: "/x".into(),
                boot: None,
            });
        }
        assert!(check(&c).expect_err("too many").contains("at most 6"));
    }

    #[test]
    fn cache_discard_read_only_and_commas() {
        let mut c = base();
        c.disks.push(QemuDisk {
            cache: DiskCache::Unsafe,
            discard: true,
            read_only: true,
            format: DiskFormat::Raw,
            path: "/p/a,b.raw".into(),
            ..disk(0, DiskBus::Virtio)
        });
        let [file, fmt] = disk_blockdevs(&c.disks[0]);
        assert_eq!(
            file,
            "driver=file,filename=/p/a,,b.raw,node-name=disk0-file,cache.direct=off,cache.no-flush=on,discard=unmap,read-only=on,auto-read-only=off"
        );
        assert_eq!(
            fmt,
            "driver=raw,file=disk0-file,node-name=disk0,cache.direct=off,cache.no-flush=on,discard=unmap,read-only=on"
        );
        assert_eq!(
            disk_device(&c.disks[0], None),
            "virtio-blk-pci,drive=disk0,id=disk0-dev,write-cache=on,discard=on"
        );
        for (mode, want) in [
            (DiskCache::None, (true, false, true)),
            (DiskCache::Writeback, (false, false, true)),
            (DiskCache::Writethrough, (false, false, false)),
            (DiskCache::Directsync, (true, false, false)),
        ] {
            assert_eq!(cache_flags(mode), want, "{mode:?}");
        }
    }

    #[test]
    fn boot_order_across_disks_cdroms_and_nics() {
        let mut c = base();
        c.disks.push(QemuDisk {
            boot: Some(3),
            ..disk(0, DiskBus::Virtio)
        });
        c.cdroms.push(QemuCdrom {
            id: "cd0".into(),
            volume: Some("iso".into()),
            path: "/i".into(),
            boot: Some(1),
        });
        c.nics.push(QemuNic {
            id: "net0".into(),
            network: "lan0".into(),
            tap: "t0".into(),
            mac: "52:54:00:00:00:01".into(),
            boot: Some(2),
        });
        let s = joined(&c);
        assert!(s.contains("id=disk0-dev,write-cache=on,bootindex=3"), "{s}");
        assert!(s.contains("id=cd0-dev,bootindex=1"), "{s}");
        assert!(
            s.contains("id=net0-dev,mac=52:54:00:00:00:01,bootindex=2"),
            "{s}"
        );
    }

    #[test]
    fn no_sandbox_when_off() {
        let mut c = base();
        c.sandbox = false;
        assert!(!joined(&c).contains("-sandbox"));
    }

    #[test]
    fn tcg_ram_sizes_leave_the_word_aligned_dirty_sync() {
        // 512 MiB under TCG: 8 KiB less, no longer a multiple of 64 pages.
        assert_eq!(ram_size_arg(512 << 20, Accel::Tcg), "524280k");
        assert_ne!((524280u64 << 10) % TCG_DIRTY_SYNC_ALIGN, 0);
        // KVM keeps the size asked for.
        assert_eq!(ram_size_arg(512 << 20, Accel::Kvm), "512M");
        // A TCG size that already is off the 64-page grid is kept.
        assert_eq!(
            ram_size_arg((512 << 20) + (128 << 10), Accel::Tcg),
            "524416k"
        );
        assert_eq!(ram_size_arg(3 << 20, Accel::Kvm), "3M");
        assert_eq!(ram_size_arg(3 << 19, Accel::Kvm), "1536k");
    }
}
