//! VirtualMachine rules: size, engine and the fields only QEMU has, boot sources and
//! boot order, disks and cdroms, cloud-init.

use std::collections::{BTreeMap, BTreeSet};

use super::{at, check_abs_path, check_vlan, volume_spec};
use crate::cloudinit;
use crate::kinds::*;
use crate::load::Diagnostic;
use crate::resource::{Desired, Resource};

/// The hint of every QEMU-only field on a vmm VM.
const USE_QEMU: &str = "set engine: qemu";

/// A VirtualMachine: CPUs, memory, engine, boot, devices, cloud-init.
pub(super) fn check_vm(
    r: &Resource,
    vm: &VirtualMachineSpec,
    desired: &Desired,
    out: &mut Vec<Diagnostic>,
) {
    check_vm_size(r, vm, out);
    super::check_stop_timeout(r, vm.stop_timeout, out);
    check_vm_engine(r, vm, out);
    check_vm_boot_files(r, vm, out);
    check_vm_drives(r, vm, desired, out);
    check_vm_boot_order(r, vm, out);
    if let Some(ci) = &vm.cloud_init {
        check_cloud_init(r, ci, out);
    }
    for (i, ifc) in vm.interfaces.iter().enumerate() {
        check_vlan(
            r,
            desired,
            &format!("/spec/interfaces/{i}"),
            ifc.network.as_str(),
            ifc.vlan,
            out,
        );
    }
}

/// vCPUs and memory in range.
fn check_vm_size(r: &Resource, vm: &VirtualMachineSpec, out: &mut Vec<Diagnostic>) {
    if vm.cpus == 0 || vm.cpus > 254 {
        out.push(at(
            r,
            "/spec/cpus",
            format!("cpus {} must be in 1..254", vm.cpus),
            None,
        ));
    }
    if vm.memory.0 < (2 << 20) {
        out.push(at(r, "/spec/memory", "memory must be at least 2Mi", None));
    }
}

/// vmm needs a kernel and takes no QEMU-only field; qemu takes no kernel and needs a
/// disk, cdrom or network boot index; secure boot needs UEFI.
fn check_vm_engine(r: &Resource, vm: &VirtualMachineSpec, out: &mut Vec<Diagnostic>) {
    match vm.engine() {
        VmEngine::Vmm => {
            if vm.boot.is_none() {
                out.push(at(
                    r,
                    "/spec/boot",
                    "the vmm engine needs a direct kernel boot (spec.boot.kernel)",
                    Some("set boot.kernel, or use engine: qemu to boot from firmware"),
                ));
            }
            check_no_qemu_fields(r, vm, out);
        }
        VmEngine::Qemu => {
            if vm.boot.is_some() {
                out.push(at(
                    r,
                    "/spec/boot",
                    "the qemu engine boots from firmware; a direct kernel boot (spec.boot) is the vmm engine's",
                    Some("remove boot and boot a disk, or set engine: vmm"),
                ));
            }
            let net_boot = vm.interfaces.iter().any(|i| i.boot.is_some());
            if vm.boot.is_none() && vm.disks.is_empty() && vm.cdroms.is_empty() && !net_boot {
                out.push(at(
                    r,
                    "/spec/disks",
                    "a qemu VM starts its firmware, which needs a disk, a cdrom or a network boot index to boot from",
                    Some("add disks: [{volume: NAME, boot: 1}], or a cdrom"),
                ));
            }
        }
    }
    if vm.secure_boot && vm.firmware != Firmware::Uefi {
        out.push(at(
            r,
            "/spec/secureBoot",
            "secureBoot needs firmware: uefi (SeaBIOS has no secure boot)",
            Some("set firmware: uefi"),
        ));
    }
}

/// Every field only the QEMU engine implements, each refused at its own line.
fn check_no_qemu_fields(r: &Resource, vm: &VirtualMachineSpec, out: &mut Vec<Diagnostic>) {
    let mut refuse = |ptr: &str, what: &str| {
        out.push(at(
            r,
            ptr,
            format!("{what} needs the qemu engine; this VM runs on vmm (direct kernel boot, virtio disks and NICs only)"),
            Some(USE_QEMU),
        ));
    };
    if vm.accel != VmAccel::Auto {
        refuse("/spec/accel", "accel");
    }
    if vm.firmware == Firmware::Uefi {
        refuse("/spec/firmware", "firmware: uefi");
    }
    if vm.secure_boot {
        refuse("/spec/secureBoot", "secureBoot");
    }
    if !vm.cdroms.is_empty() {
        refuse("/spec/cdroms", "a cdrom");
    }
    if vm.agent {
        refuse("/spec/agent", "the guest agent");
    }
    for (i, d) in vm.disks.iter().enumerate() {
        if d.bus.is_some_and(|b| b != DiskBus::Virtio) {
            refuse(
                &format!("/spec/disks/{i}/bus"),
                "a disk bus other than virtio",
            );
        }
        if d.cache.is_some() {
            refuse(&format!("/spec/disks/{i}/cache"), "a disk cache mode");
        }
        if d.discard {
            refuse(&format!("/spec/disks/{i}/discard"), "discard");
        }
        if d.boot.is_some() {
            refuse(&format!("/spec/disks/{i}/boot"), "a boot index");
        }
    }
    for (i, n) in vm.interfaces.iter().enumerate() {
        if n.boot.is_some() {
            refuse(&format!("/spec/interfaces/{i}/boot"), "a boot index");
        }
    }
}

/// Kernel and initrd paths absolute.
fn check_vm_boot_files(r: &Resource, vm: &VirtualMachineSpec, out: &mut Vec<Diagnostic>) {
    if let Some(boot) = &vm.boot {
        check_abs_path(r, "/spec/boot/kernel", &boot.kernel, "kernel", out);
        if let Some(i) = &boot.initrd {
            check_abs_path(r, "/spec/boot/initrd", i, "initrd", out);
        }
    }
}

/// Each volume attached once (as a disk or as a cdrom, never both); raw images only on
/// vmm.
fn check_vm_drives(
    r: &Resource,
    vm: &VirtualMachineSpec,
    desired: &Desired,
    out: &mut Vec<Diagnostic>,
) {
    let mut disks = BTreeMap::new();
    for (i, d) in vm.disks.iter().enumerate() {
        if disks.insert(&d.volume, i).is_some() {
            out.push(at(
                r,
                &format!("/spec/disks/{i}/volume"),
                format!("volume {} attached twice", d.volume),
                None,
            ));
        }
        let qcow2 = volume_spec(desired, d.volume.as_str())
            .is_some_and(|v| v.format == VolumeFormat::Qcow2);
        if qcow2 && vm.engine() == VmEngine::Vmm {
            out.push(at(
                r,
                &format!("/spec/disks/{i}/volume"),
                format!(
                    "volume {} is qcow2; the vmm engine reads raw images only",
                    d.volume
                ),
                Some("set engine: qemu, or format: raw on the volume"),
            ));
        }
    }
    let mut cdroms = BTreeSet::new();
    for (i, c) in vm.cdroms.iter().enumerate() {
        let ptr = format!("/spec/cdroms/{i}/volume");
        if let Some(d) = disks.get(&c.volume) {
            out.push(at(
                r,
                &ptr,
                format!(
                    "volume {} is already attached as disks[{d}]; a volume is a disk or a cdrom, not both",
                    c.volume
                ),
                None,
            ));
        } else if !cdroms.insert(&c.volume) {
            out.push(at(
                r,
                &ptr,
                format!("volume {} is in two cdrom drives", c.volume),
                None,
            ));
        }
    }
}

/// Boot indexes unique across disks, cdroms and interfaces.
fn check_vm_boot_order(r: &Resource, vm: &VirtualMachineSpec, out: &mut Vec<Diagnostic>) {
    let disks = vm
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| (d.boot, format!("disks/{i}")));
    let cdroms = vm
        .cdroms
        .iter()
        .enumerate()
        .map(|(i, c)| (c.boot, format!("cdroms/{i}")));
    let nics = vm
        .interfaces
        .iter()
        .enumerate()
        .map(|(i, n)| (n.boot, format!("interfaces/{i}")));
    let mut first: BTreeMap<u32, String> = BTreeMap::new();
    for (boot, dev) in disks.chain(cdroms).chain(nics) {
        let Some(b) = boot else { continue };
        match first.get(&b) {
            Some(other) => out.push(at(
                r,
                &format!("/spec/{dev}/boot"),
                format!(
                    "boot index {b} is also given to {}",
                    crate::load::pointer_to_field(&format!("/{other}"))
                ),
                Some("give each disk, cdrom and interface its own boot index"),
            )),
            None => {
                first.insert(b, dev);
            }
        }
    }
}

/// cloud-init: host name, users, network config, raw user- and vendor-data.
fn check_cloud_init(r: &Resource, ci: &CloudInitSpec, out: &mut Vec<Diagnostic>) {
    if let Some(h) = &ci.hostname
        && let Err(why) = cloudinit::check_host_name(h)
    {
        out.push(at(
            r,
            "/spec/cloudInit/hostname",
            format!("hostname {h:?}: {why}"),
            None,
        ));
    }
    let mut names = BTreeSet::new();
    for (i, u) in ci.users.iter().enumerate() {
        if !names.insert(&u.name) {
            out.push(at(
                r,
                &format!("/spec/cloudInit/users/{i}/name"),
                format!("user {} is listed twice", u.name),
                None,
            ));
        }
        check_cloud_init_user(r, &format!("/spec/cloudInit/users/{i}"), u, out);
    }
    if let Some(n) = &ci.network {
        for (ptr, why) in cloudinit::check_network_config(n) {
            out.push(at(r, &format!("/spec/cloudInit/network{ptr}"), why, None));
        }
    }
    for (ptr, what, text) in [
        ("/spec/cloudInit/userData", "userData", &ci.user_data),
        ("/spec/cloudInit/vendorData", "vendorData", &ci.vendor_data),
    ] {
        if let Some(t) = text
            && let Err(why) = cloudinit::check_cloud_config(t)
        {
            out.push(at(r, ptr, format!("{what} {why}"), None));
        }
    }
}

/// One cloud-init user: a valid name, a way to log in, well-formed keys and hash.
fn check_cloud_init_user(r: &Resource, base: &str, u: &CloudInitUser, out: &mut Vec<Diagnostic>) {
    if let Err(why) = cloudinit::check_user_name(&u.name) {
        out.push(at(
            r,
            &format!("{base}/name"),
            format!("user name {:?}: {why}", u.name),
            None,
        ));
    }
    // `default` is the image's own default user, kept as it is (cloud-init's rule).
    if u.name != "default" && u.ssh_authorized_keys.is_empty() && u.password_hash.is_none() {
        out.push(at(
            r,
            base,
            format!(
                "user {} has neither sshAuthorizedKeys nor passwordHash: nobody could log in as it",
                u.name
            ),
            Some("add sshAuthorizedKeys: [\"ssh-ed25519 AAAA…\"], or a passwordHash from `mkpasswd -m sha-512`"),
        ));
    }
    for (k, key) in u.ssh_authorized_keys.iter().enumerate() {
        if let Err(why) = cloudinit::check_ssh_key(key) {
            out.push(at(
                r,
                &format!("{base}/sshAuthorizedKeys/{k}"),
                format!("SSH key {why}"),
                Some("paste the whole line of the .pub file: `type base64 [comment]`"),
            ));
        }
    }
    if let Some(h) = &u.password_hash
        && let Err(why) = cloudinit::check_password_hash(h)
    {
        out.push(at(
            r,
            &format!("{base}/passwordHash"),
            format!("passwordHash {why}"),
            Some("generate one with `mkpasswd -m sha-512` and paste its output"),
        ));
    }
    for (g, group) in u.groups.iter().enumerate() {
        if let Err(why) = cloudinit::check_user_name(group) {
            out.push(at(
                r,
                &format!("{base}/groups/{g}"),
                format!("group name {group:?}: {why}"),
                None,
            ));
        }
    }
    if let Some(shell) = &u.shell
        && !shell.starts_with('/')
    {
        out.push(at(
            r,
            &format!("{base}/shell"),
            format!("shell {shell:?} must be an absolute path"),
            Some("e.g. /bin/bash"),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{POOL, diagnostics, doc};

    /// A pool, two raw volumes, a qcow2 volume, an ISO volume, a template and a network.
    fn world() -> String {
        doc("StoragePool", "local", POOL)
            + &doc("Volume", "a", &["pool: local", "size: 1Gi"])
            + &doc("Volume", "b", &["pool: local", "size: 1Gi"])
            + &doc(
                "Volume",
                "q",
                &["pool: local", "size: 1Gi", "format: qcow2"],
            )
            + &doc("Volume", "iso", &["pool: local", "size: 1Gi"])
            + &doc(
                "Volume",
                "tpl",
                &["pool: local", "size: 1Gi", "template: true"],
            )
            + &doc("Network", "lan0", &["addresses: [10.0.0.1/24]"])
    }

    /// `world()` is 6 documents of 5 header lines plus 3+2+2+3+2+3+1 spec lines.
    const WORLD_LINES: usize = 6 * 5 + 16 + 5;

    /// The diagnostics of `world()` plus `vms`, with their line numbers made relative to
    /// the end of `world()`: `+6` is the first spec line of the first document of `vms`.
    fn vm_diagnostics(vms: &str) -> Vec<String> {
        diagnostics(&(world() + vms))
            .into_iter()
            .map(|d| {
                let rest = d.strip_prefix("m.yaml:").unwrap_or(&d);
                let (line, tail) = rest.split_once(':').unwrap_or(("0", rest));
                let line: usize = line.parse().unwrap_or(0);
                format!("+{}:{tail}", line.saturating_sub(WORLD_LINES))
            })
            .collect()
    }

    #[test]
    fn the_world_is_valid() {
        assert_eq!(vm_diagnostics(""), Vec::<String>::new());
        assert!(
            diagnostics(&(world() + &doc("Network", "zz", &["mtu: 1"])))[0]
                .starts_with("m.yaml:57:"),
            "WORLD_LINES is off"
        );
    }

    #[test]
    fn vmm_refuses_every_qemu_field() {
        let text = doc(
            "VirtualMachine",
            "micro",
            &[
                "boot: {kernel: /k}",
                "accel: tcg",
                "firmware: uefi",
                "secureBoot: true",
                "cdroms: [{volume: iso}]",
                "agent: true",
                "disks: [{volume: a, bus: scsi, cache: writeback, discard: true, boot: 1}, {volume: q, bus: virtio}]",
                "interfaces: [{network: lan0, boot: 2}]",
            ],
        );
        assert_eq!(
            vm_diagnostics(&text),
            [
                "+7:10: VirtualMachine/micro spec.accel: accel needs the qemu engine; this VM runs on vmm (direct kernel boot, virtio disks and NICs only) (hint: set engine: qemu)",
                "+8:13: VirtualMachine/micro spec.firmware: firmware: uefi needs the qemu engine; this VM runs on vmm (direct kernel boot, virtio disks and NICs only) (hint: set engine: qemu)",
                "+9:15: VirtualMachine/micro spec.secureBoot: secureBoot needs the qemu engine; this VM runs on vmm (direct kernel boot, virtio disks and NICs only) (hint: set engine: qemu)",
                "+10:3: VirtualMachine/micro spec.cdroms: a cdrom needs the qemu engine; this VM runs on vmm (direct kernel boot, virtio disks and NICs only) (hint: set engine: qemu)",
                "+11:10: VirtualMachine/micro spec.agent: the guest agent needs the qemu engine; this VM runs on vmm (direct kernel boot, virtio disks and NICs only) (hint: set engine: qemu)",
                "+12:28: VirtualMachine/micro spec.disks[0].bus: a disk bus other than virtio needs the qemu engine; this VM runs on vmm (direct kernel boot, virtio disks and NICs only) (hint: set engine: qemu)",
                "+12:41: VirtualMachine/micro spec.disks[0].cache: a disk cache mode needs the qemu engine; this VM runs on vmm (direct kernel boot, virtio disks and NICs only) (hint: set engine: qemu)",
                "+12:61: VirtualMachine/micro spec.disks[0].discard: discard needs the qemu engine; this VM runs on vmm (direct kernel boot, virtio disks and NICs only) (hint: set engine: qemu)",
                "+12:73: VirtualMachine/micro spec.disks[0].boot: a boot index needs the qemu engine; this VM runs on vmm (direct kernel boot, virtio disks and NICs only) (hint: set engine: qemu)",
                "+12:86: VirtualMachine/micro spec.disks[1].volume: volume q is qcow2; the vmm engine reads raw images only (hint: set engine: qemu, or format: raw on the volume)",
                "+13:38: VirtualMachine/micro spec.interfaces[0].boot: a boot index needs the qemu engine; this VM runs on vmm (direct kernel boot, virtio disks and NICs only) (hint: set engine: qemu)",
            ]
        );
    }

    #[test]
    fn engine_defaults_and_boot_sources() {
        let text = doc("VirtualMachine", "empty", &["cpus: 1"])
            + &doc(
                "VirtualMachine",
                "nokernel",
                &["engine: vmm", "disks: [{volume: a}]"],
            )
            + &doc(
                "VirtualMachine",
                "direct",
                &["engine: qemu", "boot: {kernel: /k}"],
            )
            + &doc(
                "VirtualMachine",
                "pxe",
                &["interfaces: [{network: lan0, boot: 1}]"],
            )
            + &doc(
                "VirtualMachine",
                "sb",
                &["secureBoot: true", "disks: [{volume: b}]"],
            )
            + &doc(
                "VirtualMachine",
                "efi",
                &[
                    "firmware: uefi",
                    "secureBoot: true",
                    "cdroms: [{volume: iso}]",
                    "agent: true",
                    "accel: kvm",
                ],
            );
        assert_eq!(
            vm_diagnostics(&text),
            [
                "+5:1: VirtualMachine/empty spec.disks: a qemu VM starts its firmware, which needs a disk, a cdrom or a network boot index to boot from (hint: add disks: [{volume: NAME, boot: 1}], or a cdrom)",
                "+11:1: VirtualMachine/nokernel spec.boot: the vmm engine needs a direct kernel boot (spec.boot.kernel) (hint: set boot.kernel, or use engine: qemu to boot from firmware)",
                "+20:3: VirtualMachine/direct spec.boot: the qemu engine boots from firmware; a direct kernel boot (spec.boot) is the vmm engine's (hint: remove boot and boot a disk, or set engine: vmm)",
                "+32:15: VirtualMachine/sb spec.secureBoot: secureBoot needs firmware: uefi (SeaBIOS has no secure boot) (hint: set firmware: uefi)",
            ]
        );
    }

    #[test]
    fn boot_indexes_are_unique_and_a_volume_is_a_disk_or_a_cdrom() {
        let text = doc(
            "VirtualMachine",
            "vm1",
            &[
                "disks: [{volume: a, boot: 1}, {volume: b, boot: 2, bus: sata, cache: none}]",
                "cdroms: [{volume: a}, {volume: iso, boot: 2}, {volume: iso}]",
                "interfaces: [{network: lan0, boot: 1}]",
            ],
        );
        assert_eq!(
            vm_diagnostics(&text),
            [
                "+7:21: VirtualMachine/vm1 spec.cdroms[0].volume: volume a is already attached as disks[0]; a volume is a disk or a cdrom, not both",
                "+7:45: VirtualMachine/vm1 spec.cdroms[1].boot: boot index 2 is also given to disks[1] (hint: give each disk, cdrom and interface its own boot index)",
                "+7:58: VirtualMachine/vm1 spec.cdroms[2].volume: volume iso is in two cdrom drives",
                "+8:38: VirtualMachine/vm1 spec.interfaces[0].boot: boot index 1 is also given to disks[0] (hint: give each disk, cdrom and interface its own boot index)",
            ]
        );
    }

    #[test]
    fn a_template_is_attached_read_only_or_as_a_cdrom() {
        let text = doc("VirtualMachine", "vm1", &["disks: [{volume: tpl}]"])
            + &doc(
                "VirtualMachine",
                "vm2",
                &[
                    "disks: [{volume: tpl, readOnly: true}]",
                    "cdroms: [{volume: iso}]",
                ],
            )
            + &doc("VirtualMachine", "vm3", &["cdroms: [{volume: tpl}]"]);
        assert_eq!(
            vm_diagnostics(&text),
            [
                "+6:20: VirtualMachine/vm1 spec.disks[0].volume: volume tpl is a template: it is attached read-only or cloned, never written (hint: attach it with readOnly: true, or attach a Volume with clone: {from: tpl})",
            ]
        );
    }

    #[test]
    fn cloud_init_rules() {
        let text = doc(
            "VirtualMachine",
            "vm1",
            &[
                "disks: [{volume: a}]",
                "cloudInit:",
                "  hostname: web_1",
                "  users:",
                "    - {name: ops}",
                "    - {name: default}",
                "    - {name: Admin, passwordHash: hunter2, groups: [sudo, 'Wheel'], shell: bash}",
                "    - {name: ops, sshAuthorizedKeys: ['ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPigcUEKHRZOtbOlOIhStPbDat1nOYfki95ife3CbA05 ok', 'ssh-ed25519 AAAAC3Nza']}",
                "  network: {ethernets: {eth0: {dhcp4: true}}}",
                "  userData: |",
                "    #cloud-config",
                "    packages: [htop",
                "  vendorData: \"#cloud-config\\n- a\\n\"",
            ],
        );
        assert_eq!(
            vm_diagnostics(&text),
            [
                "+8:15: VirtualMachine/vm1 spec.cloudInit.hostname: hostname \"web_1\": contains '_': host names use only a-z A-Z 0-9 - .",
                "+10:9: VirtualMachine/vm1 spec.cloudInit.users[0]: user ops has neither sshAuthorizedKeys nor passwordHash: nobody could log in as it (hint: add sshAuthorizedKeys: [\"ssh-ed25519 AAAA…\"], or a passwordHash from `mkpasswd -m sha-512`)",
                "+12:16: VirtualMachine/vm1 spec.cloudInit.users[2].name: user name \"Admin\": must start with a lowercase letter or `_`",
                "+12:37: VirtualMachine/vm1 spec.cloudInit.users[2].passwordHash: passwordHash is not a crypt(3) hash (`$id$salt$hash`); a plain-text password is never accepted (hint: generate one with `mkpasswd -m sha-512` and paste its output)",
                "+12:61: VirtualMachine/vm1 spec.cloudInit.users[2].groups[1]: group name \"Wheel\": must start with a lowercase letter or `_`",
                "+12:78: VirtualMachine/vm1 spec.cloudInit.users[2].shell: shell \"bash\" must be an absolute path (hint: e.g. /bin/bash)",
                "+13:16: VirtualMachine/vm1 spec.cloudInit.users[3].name: user ops is listed twice",
                "+13:128: VirtualMachine/vm1 spec.cloudInit.users[3].sshAuthorizedKeys[1]: SSH key has key data that is not valid base64 (a truncated copy?) (hint: paste the whole line of the .pub file: `type base64 [comment]`)",
                "+14:5: VirtualMachine/vm1 spec.cloudInit.network.version: network config needs `version: 2` (netplan syntax) or `version: 1`",
                "+16:7: VirtualMachine/vm1 spec.cloudInit.userData: userData is not valid YAML: line 3: while parsing a flow sequence, expected ',' or ']'",
                "+18:17: VirtualMachine/vm1 spec.cloudInit.vendorData: vendorData is a YAML list (line 2); #cloud-config must be a mapping of modules",
            ]
        );
    }

    #[test]
    fn a_complete_cloud_init_is_valid() {
        let text = doc(
            "VirtualMachine",
            "vm1",
            &[
                "disks: [{volume: a, boot: 1}]",
                "agent: true",
                "cloudInit:",
                "  hostname: vm1.example.org",
                "  users:",
                "    - name: ops",
                "      sshAuthorizedKeys: ['ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPigcUEKHRZOtbOlOIhStPbDat1nOYfki95ife3CbA05 ops@laptop']",
                "      passwordHash: '$6$rounds=4096$saltsalt$J0bLsmMKy1AdP2z7iS1tIVzBFPyAGp4HHBfDXRb1RZp'",
                "      sudo: true",
                "      groups: [adm]",
                "      shell: /bin/bash",
                "  network: {version: 2, ethernets: {eth0: {addresses: [10.0.0.20/24], gateway4: 10.0.0.1}}}",
                "  userData: |",
                "    #cloud-config",
                "    write_files: [{path: /etc/motd, content: hello}]",
                "  vendorData: \"#!/bin/sh\\necho hi\\n\"",
            ],
        );
        assert_eq!(vm_diagnostics(&text), Vec::<String>::new());
    }
}
