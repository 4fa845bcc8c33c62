//! `stead import proxmox` end to end: the fixture tree imports, validates and plans
//! against an empty sandbox; bad inputs exit 1 with `FILE:LINE` errors and write
//! nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

use stead_e2e::{Run, Sandbox, is_root, skip_unless, stead_bin};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../import/tests/fixtures/pve1")
}

fn import(root: &Path, out: &Path, extra: &[&str]) -> Run {
    let out = Command::new(stead_bin())
        .args(["import", "proxmox", "--root"])
        .arg(root)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .expect("spawn stead");
    Run(out)
}

/// Names in `dir` (empty when it does not exist).
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn import_proxmox_fixture_validates_and_plans() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("imported");
    let run = import(&fixture(), &out, &[]).expect_code(0);
    assert!(
        run.stdout().contains("wrote 80 manifests"),
        "{}",
        run.stdout()
    );
    let report = std::fs::read_to_string(out.join("IMPORT-REPORT.md")).expect("report");
    assert_eq!(
        run.stderr(),
        report,
        "the report is printed to stderr as written"
    );
    assert!(report.contains("hostpci0: PCI passthrough: not carried over"));
    assert!(report.contains("[PENDING]: pending changes"));
    assert!(report.contains("rbd: ceph: storage type `rbd` is not supported"));
    // Guests are read once, from etc/pve/nodes/* (not through the local/qemu-server/lxc links).
    assert_eq!(entries(&out.join("vms")).len(), 21);
    assert_eq!(entries(&out.join("containers")).len(), 8);
    let v = Sandbox::new()
        .run(&["validate", out.to_str().expect("utf-8")])
        .expect_code(0);
    assert!(v.stdout().contains("valid: 80 resources"), "{}", v.stdout());

    // A second import into the same directory replaces the earlier one.
    import(&fixture(), &out, &[]).expect_code(0);
    assert_eq!(
        entries(tmp.path()),
        ["imported"],
        "no temporary directory left beside --out"
    );

    // Anything else that is not empty is refused, and left as it was.
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).expect("mkdir");
    std::fs::write(other.join("notes.txt"), "mine").expect("write");
    let r = import(&fixture(), &other, &[]).expect_code(1);
    assert!(
        r.stderr().contains("not empty and not an earlier import"),
        "{}",
        r.stderr()
    );
    assert_eq!(entries(&other), ["notes.txt"]);

    // The plan against an empty sandbox creates every resource. A host whose kernel
    // lacks bridge VLAN filtering refuses the one container interface with a VLAN tag
    // (a host capability, not an import fault).
    if skip_unless(
        is_root(),
        "import_proxmox_fixture_validates_and_plans (diff)",
        "needs root for a network namespace",
    ) {
        return;
    }
    let sb = Sandbox::with_netns();
    let d = sb.run(&["diff", out.to_str().expect("utf-8")]);
    let text = d.stdout() + &d.stderr();
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("error: ")).collect();
    let vlan_refusals = errors
        .iter()
        .filter(|l| l.contains("bridge VLAN filtering is not available on this kernel"))
        .count();
    assert_eq!(
        errors.len(),
        vlan_refusals,
        "only host-capability refusals expected:\n{text}"
    );
    assert_eq!(d.code(), if vlan_refusals == 0 { 2 } else { 1 }, "{text}");
    let creates = 80 - vlan_refusals;
    assert!(
        text.contains(&format!(
            "Plan: {creates} to create, 0 to update, 0 to replace, 0 to delete"
        )),
        "{text}"
    );
    if vlan_refusals > 0 {
        println!(
            "note: {vlan_refusals} VLAN-tagged container interface(s) refused by this kernel (no bridge VLAN filtering)"
        );
    }
}

/// A small valid tree: one storage, one bridge, one VM.
fn small_tree(root: &Path) {
    let w = |rel: &str, text: &str| {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, text).expect("write");
    };
    w(
        "etc/pve/storage.cfg",
        "lvmthin: local-lvm\n\tthinpool data\n\tvgname pve\n\tcontent images,rootdir\n",
    );
    w(
        "etc/network/interfaces",
        "iface vmbr0 inet manual\n\tbridge-ports none\n",
    );
    w(
        "etc/pve/nodes/pve1/qemu-server/100.conf",
        "name: good\nmemory: 512\nonboot: 1\nscsi0: local-lvm:vm-100-disk-0,size=4G\nnet0: virtio=BC:24:11:00:00:01,bridge=vmbr0\n",
    );
}

#[test]
fn import_proxmox_bad_inputs_write_nothing() {
    let bad: [(&str, &[u8], &str); 5] = [
        (
            "101.conf",
            b"name: dup\nmemory: 512\nmemory: 1024\n",
            "101.conf:3: duplicate key `memory`",
        ),
        (
            "102.conf",
            b"name: trunc\nmemory\n",
            "102.conf:2: truncated line `memory`",
        ),
        (
            "103.conf",
            b"name: empty\nscsi0: ,size=8G\n",
            "103.conf:2: scsi0: empty disk spec",
        ),
        (
            "104.conf",
            b"name: bin\nmem\x00ory: \xff\xfe\n",
            "104.conf:2: binary data",
        ),
        (
            "105.conf",
            b"name: hdr\n[snap1\nmemory: 1\n",
            "105.conf:2: unterminated section header",
        ),
    ];
    let tmp = tempfile::tempdir().expect("tempdir");
    for (file, text, want) in &bad {
        let root = tmp.path().join(format!("root-{file}"));
        small_tree(&root);
        std::fs::write(root.join("etc/pve/nodes/pve1/qemu-server").join(file), text)
            .expect("write");
        let out = tmp.path().join(format!("out-{file}"));
        let r = import(&root, &out, &[]).expect_code(1);
        let path = root.join("etc/pve/nodes/pve1/qemu-server").join(file);
        let want = want.replacen(file, &path.display().to_string(), 1);
        assert!(
            r.stderr().lines().any(|l| l.starts_with(&want)),
            "{want} in\n{}",
            r.stderr()
        );
        assert!(!out.exists(), "nothing is written on error");
    }
    // All at once: every error is reported, and nothing beside --out either.
    let root = tmp.path().join("root-all");
    small_tree(&root);
    for (file, text, _) in &bad {
        std::fs::write(root.join("etc/pve/nodes/pve1/qemu-server").join(file), text)
            .expect("write");
    }
    let parent = tmp.path().join("all");
    std::fs::create_dir(&parent).expect("mkdir");
    let r = import(&root, &parent.join("out"), &[]).expect_code(1);
    for (file, _, _) in &bad {
        assert!(
            r.stderr().contains(&format!("{file}:")),
            "{file} in\n{}",
            r.stderr()
        );
    }
    assert!(entries(&parent).is_empty());
    // --skip-invalid imports the rest and lists the bad files in the report.
    let out = parent.join("out");
    let r = import(&root, &out, &["--skip-invalid"]).expect_code(0);
    assert!(
        entries(&out.join("vms")) == ["good.yaml"],
        "{:?}",
        entries(&out.join("vms"))
    );
    let report = std::fs::read_to_string(out.join("IMPORT-REPORT.md")).expect("report");
    assert!(
        report.contains("## Invalid files skipped (--skip-invalid)"),
        "{report}"
    );
    for (file, _, _) in &bad {
        assert!(report.contains(&format!("{file}:")), "{file} in\n{report}");
    }
    assert!(r.stderr().contains("Invalid files skipped"));
}

/// The bridge and the pool of an import already exist on the host: the plan adopts them
/// (the importer marks every manifest `stead.dev/adopt: "true"`) instead of creating
/// them. Runs once the binary has adoption (`diff --adopt`); SKIPs before.
#[test]
fn import_proxmox_plan_adopts_existing_bridge_and_pool() {
    let test = "import_proxmox_plan_adopts_existing_bridge_and_pool";
    if skip_unless(is_root(), test, "needs root for a network namespace") {
        return;
    }
    let sb = Sandbox::with_netns();
    let ns = sb.netns.clone().expect("netns");
    let ip = |args: &[&str]| {
        let st = Command::new("ip")
            .arg("-n")
            .arg(&ns)
            .args(args)
            .status()
            .expect("ip");
        assert!(st.success(), "ip {args:?}");
    };
    ip(&["link", "add", "vmbr7", "type", "bridge"]);
    ip(&[
        "link", "add", "eth7", "type", "veth", "peer", "name", "eth7p",
    ]);
    ip(&["link", "set", "eth7", "master", "vmbr7"]);
    ip(&["addr", "add", "10.77.0.1/24", "dev", "vmbr7"]);
    let pool = sb.path("pool");
    std::fs::create_dir_all(&pool).expect("mkdir");
    std::fs::write(pool.join("existing.raw"), b"data").expect("write");

    let root = sb.path("pve");
    let w = |rel: &str, text: String| {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, text).expect("write");
    };
    w(
        "etc/pve/storage.cfg",
        format!("dir: pool7\n\tpath {}\n\tcontent images\n", pool.display()),
    );
    // The veth stands for a guest's port: adoption compares physical ports only.
    w(
        "etc/network/interfaces",
        "auto vmbr7\niface vmbr7 inet static\n\taddress 10.77.0.1/24\n\tbridge-ports none\n".into(),
    );
    let out = sb.path("imported");
    import(&root, &out, &[]).expect_code(0);
    let d = sb.run(&["diff", out.to_str().expect("utf-8")]);
    let text = d.stdout() + &d.stderr();
    for id in ["Network/vmbr7", "StoragePool/pool7"] {
        let line = text
            .lines()
            .find(|l| l.contains(id))
            .unwrap_or_else(|| panic!("{id} in\n{text}"));
        assert!(
            line.contains("adopt") && !line.contains("(create)"),
            "{id} is adopted:\n{text}"
        );
    }
    assert!(!text.lines().any(|l| l.starts_with("error: ")), "{text}");
    assert!(text.contains("Plan: 2 to adopt, 0 to create"), "{text}");
}
