//! The fixture tree imports, validates as stead manifests, and its report names every
//! setting that was not carried over.

use std::path::{Path, PathBuf};

use stead_import::proxmox::{Options, REPORT_FILE, import};
use stead_schema::{Kind, ResourceId};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pve1")
}

fn run(node: Option<&str>) -> stead_import::proxmox::Output {
    let opts = Options {
        root: fixture(),
        node: node.map(str::to_string),
        skip_invalid: false,
    };
    match import(&opts) {
        Ok(o) => o,
        Err(e) => panic!(
            "{}",
            e.iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        ),
    }
}

fn desired(files: &std::collections::BTreeMap<String, String>) -> stead_schema::Desired {
    let (mut out, mut errors) = (Vec::new(), Vec::new());
    for (name, text) in files.iter().filter(|(n, _)| n.ends_with(".yaml")) {
        stead_schema::load::load_str(Path::new(name), text, &mut out, &mut errors);
    }
    let d = stead_schema::load::into_desired(out, &mut errors);
    errors.extend(stead_schema::validate::validate(&d));
    assert!(
        errors.is_empty(),
        "{}",
        errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    d
}

fn spec(d: &stead_schema::Desired, kind: Kind, name: &str) -> serde_json::Value {
    d.get(&ResourceId::new(kind, name))
        .unwrap_or_else(|| panic!("{kind}/{name} missing"))
        .spec_json()
}

#[test]
fn fixture_imports_and_validates() {
    let out = run(None);
    let d = desired(&out.files);
    let count = |k: Kind| d.resources.keys().filter(|id| id.kind == k).count();
    assert_eq!(count(Kind::VirtualMachine), 21, "20 on pve1, 1 on pve2");
    assert_eq!(count(Kind::Container), 8);
    assert_eq!(count(Kind::StoragePool), 6);
    assert_eq!(count(Kind::Bond), 1);
    assert_eq!(count(Kind::Network), 4);
    assert_eq!(count(Kind::BackupSchedule), 3);
    // Names.
    for (kind, name, vmid) in [
        (Kind::VirtualMachine, "web-01", "100"),
        (Kind::VirtualMachine, "db-primary", "101"),
        (Kind::VirtualMachine, "mail-corp-example", "102"),
        (Kind::VirtualMachine, "vm-103", "103"),
        (Kind::VirtualMachine, "vm-104", "104"),
        (Kind::VirtualMachine, "vm-113", "113"),
        (Kind::VirtualMachine, "nicode-server", "115"),
        (Kind::Container, "db-primary", "200"),
        (Kind::Container, "ct-203", "203"),
        (Kind::Container, "files-server", "205"),
    ] {
        let r = d
            .get(&ResourceId::new(kind, name))
            .unwrap_or_else(|| panic!("{kind}/{name}"));
        assert_eq!(r.metadata.labels["pve-vmid"], vmid);
        assert_eq!(r.metadata.annotations["stead.dev/adopt"], "true");
    }
    for id in d.resources.keys() {
        assert_eq!(
            d.resources[id].metadata.annotations["stead.dev/adopt"], "true",
            "{id}"
        );
    }
    let web = spec(&d, Kind::VirtualMachine, "web-01");
    assert_eq!(web["memory"], "2Gi");
    assert_eq!(web["disks"][0]["boot"], 1);
    assert_eq!(web["cdroms"][0]["volume"], "debian-12-4-0-amd64-netinst");
    let db = spec(&d, Kind::VirtualMachine, "db-primary");
    assert_eq!(db["cpus"], 4);
    assert_eq!(db["firmware"], "uefi");
    assert_eq!(db["interfaces"][0]["vlan"], 20);
    assert_eq!(
        spec(&d, Kind::Volume, "vm-106-disk-0")["clone"],
        serde_json::json!({"from": "base-9000-disk-0", "linked": false})
    );
    assert_eq!(
        spec(&d, Kind::Volume, "vm-107-disk-0")["clone"],
        serde_json::json!({"from": "base-9001-disk-0", "linked": true})
    );
    assert_eq!(spec(&d, Kind::Volume, "vm-107-disk-0")["format"], "qcow2");
    assert_eq!(spec(&d, Kind::Volume, "base-9001-disk-0")["template"], true);
    assert_eq!(
        spec(&d, Kind::Volume, "local-lvm-vm-112-disk-0")["pool"],
        "local-lvm"
    );
    assert_eq!(spec(&d, Kind::Volume, "tank-vm-112-disk-0")["pool"], "tank");
    assert_eq!(spec(&d, Kind::Volume, "netinst")["size"], "57");
    assert_eq!(spec(&d, Kind::Network, "vnet100")["type"], "vxlan");
    // `startup: order=2,up=30,down=120`: the shutdown wait is kept.
    assert_eq!(spec(&d, Kind::VirtualMachine, "busy")["stopTimeout"], "2m");
    let weekly = spec(&d, Kind::BackupSchedule, "backup-weekly");
    let names = weekly["targets"]["names"].as_array().unwrap();
    assert!(
        !names.iter().any(|n| n == "VirtualMachine/gpu-box"),
        "108 is excluded"
    );
    assert!(
        !names.iter().any(|n| n == "VirtualMachine/remote"),
        "node pve1 only"
    );
    assert!(names.iter().any(|n| n == "Container/db-primary"));
    // The report is written and holds a line per rule that leaves something out.
    let report = &out.files[REPORT_FILE];
    let root = fixture();
    let node = root.join("etc/pve/nodes/pve1");
    for (file, line) in [
        (
            node.join("qemu-server/108.conf"),
            "hostpci0: PCI passthrough",
        ),
        (node.join("qemu-server/108.conf"), "usb0: USB passthrough"),
        (
            node.join("qemu-server/108.conf"),
            "args: raw QEMU arguments",
        ),
        (
            node.join("qemu-server/108.conf"),
            "hookscript: hook scripts",
        ),
        (node.join("qemu-server/101.conf"), "tpmstate0: TPM state"),
        (
            node.join("qemu-server/108.conf"),
            "scsi1: storage `ceph` is not imported",
        ),
        (
            node.join("qemu-server/109.conf"),
            "[PENDING]: pending changes",
        ),
        (
            node.join("qemu-server/109.conf"),
            "[before-upgrade]: a snapshot section",
        ),
        (
            root.join("etc/pve/storage.cfg"),
            "rbd: ceph: storage type `rbd`",
        ),
        (
            root.join("etc/pve/storage.cfg"),
            "pbs: pbs: storage type `pbs`",
        ),
        (
            root.join("etc/pve/storage.cfg"),
            "cephfs: cephfs: storage type `cephfs`",
        ),
        (
            root.join("etc/network/interfaces"),
            "gateway: `gateway 192.168.1.1`",
        ),
        (
            root.join("etc/pve/jobs.cfg"),
            "enabled: job `backup-disabled` is disabled",
        ),
        (
            root.join("etc/pve/jobs.cfg"),
            "schedule: `2027-01-01 00:00` cannot be expressed",
        ),
        (
            root.join("etc/pve/jobs.cfg"),
            "realm-sync: ldap-sync: job type",
        ),
    ] {
        let want = format!("{}:", file.display());
        assert!(
            report
                .lines()
                .any(|l| l.contains(&want) && l.contains(line)),
            "{want} … {line} in\n{report}"
        );
    }
    assert!(!report.contains("special:cloudinit"));
    assert!(out.files.keys().all(|f| !f.contains("..")));
}

#[test]
fn node_limits_the_guests() {
    let out = run(Some("pve2"));
    let d = desired(&out.files);
    let guests: Vec<String> = d
        .resources
        .keys()
        .filter(|id| id.kind.is_workload())
        .map(|id| id.to_string())
        .collect();
    assert_eq!(guests, ["Container/remote-ct", "VirtualMachine/remote"]);
}

#[test]
fn a_wrong_root_or_node_is_an_error() {
    let opts = Options {
        root: fixture().join("etc"),
        node: None,
        skip_invalid: false,
    };
    let e = import(&opts).unwrap_err();
    assert!(
        e[0].to_string()
            .ends_with("etc/etc/pve:0: no Proxmox VE configuration here (is --root right?)"),
        "{e:?}"
    );
    let opts = Options {
        root: fixture(),
        node: Some("pve9".into()),
        skip_invalid: false,
    };
    let e = import(&opts).unwrap_err();
    assert!(
        e[0].to_string()
            .ends_with("nodes/pve9:0: no node `pve9` (is --node right?)"),
        "{e:?}"
    );
}
