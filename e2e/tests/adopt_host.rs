//! Issue 19, part 2: adoption of objects that exist on the host before stead. A bridge
//! with an address and a guest's veth port, a directory with files and a raw image are
//! made by hand in a sandbox (own network namespace, temp dir); `apply --adopt` takes
//! them over without changing them, a later MTU change is a `hot` update, and a prune
//! after their manifests are removed retains them. A bridge whose physical port differs
//! from the manifest is refused at plan time, nothing changed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use stead_e2e::{LoopBtrfs, Run, Sandbox, is_root, skip_unless};

/// `ip -n NS ARGS`; panics on failure.
fn ip(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .arg("-n")
        .arg(ns)
        .args(args)
        .output()
        .expect("spawn ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip -j -d link show NAME` in `ns`, parsed.
fn link(ns: &str, name: &str) -> Value {
    let v: Value = serde_json::from_str(&ip(ns, &["-j", "-d", "link", "show", name])).unwrap();
    v[0].clone()
}

/// The IPv4 addresses of `name` as `addr/prefix`, sorted.
fn addresses(ns: &str, name: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(&ip(ns, &["-j", "-4", "addr", "show", name])).unwrap();
    let mut out: Vec<String> = v[0]["addr_info"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| format!("{}/{}", i["local"].as_str().unwrap_or(""), i["prefixlen"]))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Every regular file under `root` (relative path → bytes).
fn files(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                walk(root, &p, out);
            } else if meta.is_file() {
                let rel = p.strip_prefix(root).unwrap().to_path_buf();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// A known, non-trivial 4 MiB pattern.
fn image_bytes() -> Vec<u8> {
    (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

fn show(r: &Run) -> String {
    format!("stdout:\n{}\nstderr:\n{}", r.stdout(), r.stderr())
}

/// The manifests of the adopted objects (`mtu` on the bridge when given).
fn manifests(sb: &Sandbox, pool: &Path, mtu: Option<u32>) -> String {
    let mtu = mtu.map(|m| format!(", mtu: {m}")).unwrap_or_default();
    let text = format!(
        "apiVersion: stead.dev/v1alpha1\nkind: Network\nmetadata: {{name: br0}}\nspec: {{type: bridge, addresses: [10.77.0.1/24]{mtu}}}\n\
         ---\napiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: legacy}}\nspec: {{type: dir, path: {}, content: [images]}}\n\
         ---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: disk0}}\nspec: {{pool: legacy, size: 4Mi, format: raw}}\n",
        pool.display()
    );
    sb.write("m/adopt.yaml", &text);
    sb.path("m").to_string_lossy().into_owned()
}

#[test]
fn adopt_takes_over_a_bridge_a_dir_pool_and_an_image_without_changing_them() {
    let test = "adopt_takes_over_a_bridge_a_dir_pool_and_an_image_without_changing_them";
    if skip_unless(is_root(), test, "needs root for a network namespace") {
        return;
    }
    let sb = Sandbox::with_netns();
    let ns = sb.netns.clone().unwrap();

    // By hand: a bridge with an address and a guest's veth port, a directory with files
    // and a raw image with known bytes.
    ip(&ns, &["link", "add", "br0", "type", "bridge"]);
    ip(&ns, &["addr", "add", "10.77.0.1/24", "dev", "br0"]);
    ip(&ns, &["link", "set", "br0", "up"]);
    ip(
        &ns,
        &[
            "link", "add", "vm1p", "type", "veth", "peer", "name", "vm1c",
        ],
    );
    ip(&ns, &["link", "set", "vm1p", "master", "br0", "up"]);
    let pool = sb.path("legacy-pool");
    sb.write("legacy-pool/notes.txt", "kept as it is\n");
    sb.write("legacy-pool/dump/vzdump-qemu-100.log", "backup log\n");
    std::fs::create_dir_all(pool.join("images")).unwrap();
    std::fs::write(pool.join("images/disk0.raw"), image_bytes()).unwrap();

    let ifindex = link(&ns, "br0")["ifindex"].clone();
    let files_before = files(&pool);
    assert_eq!(addresses(&ns, "br0"), ["10.77.0.1/24"]);

    let m = manifests(&sb, &pool, None);
    // Without adoption: refused, as before.
    let out = sb.run(&["diff", &m]);
    assert_eq!(out.code(), 1, "{}", show(&out));
    assert!(
        out.stdout().contains("not owned by stead"),
        "{}",
        show(&out)
    );
    assert!(out.stdout().contains("--adopt"), "{}", show(&out));

    // The plan: one adopt line per object, the pool's missing content dirs as the one
    // difference left.
    let out = sb.run(&["diff", "--adopt", &m]);
    assert_eq!(out.code(), 2, "{}", show(&out));
    let plan = out.stdout();
    for line in [
        "  & Network/br0  (adopt)",
        "  & StoragePool/legacy  (adopt, impact: hot)",
        "  & Volume/disk0  (adopt)",
        "content: [] -> [images]",
        "Plan: 3 to adopt, 0 to create, 0 to update",
    ] {
        assert!(plan.contains(line), "{line:?} not in\n{plan}");
    }
    let json = sb.run(&["diff", "--adopt", "-o", "json", &m]);
    let v: Value = serde_json::from_str(&json.stdout()).unwrap();
    assert_eq!(v["summary"]["adopt"], 3, "{v}");
    assert!(
        v["changes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["action"] == "adopt"),
        "{v}"
    );

    let out = sb.run(&["apply", "--adopt", "--yes", &m]);
    assert_eq!(out.code(), 0, "{}", show(&out));

    // Nothing changed: the same bridge, address and port; every file with its bytes.
    let br = link(&ns, "br0");
    assert_eq!(br["ifindex"], ifindex, "the bridge was not recreated");
    assert_eq!(br["ifalias"], "stead:Network/br0", "ownership recorded");
    assert_eq!(addresses(&ns, "br0"), ["10.77.0.1/24"]);
    assert_eq!(link(&ns, "vm1p")["master"], "br0", "the guest port stays");
    let files_after = files(&pool);
    for (path, bytes) in &files_before {
        assert!(
            files_after.get(path) == Some(bytes),
            "{} changed or vanished",
            path.display()
        );
    }
    let added: Vec<&PathBuf> = files_after
        .keys()
        .filter(|p| !files_before.contains_key(*p))
        .collect();
    assert_eq!(
        added,
        [&PathBuf::from(".stead-pool")],
        "only the pool marker is new"
    );

    // `stead get` shows them owned and adopted.
    let out = sb.run(&["get", "-o", "json"]);
    assert_eq!(out.code(), 0, "{}", show(&out));
    let v: Value = serde_json::from_str(&out.stdout()).unwrap();
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 3, "{v}");
    for item in items {
        assert_eq!(item["status"]["owned"], true, "{item}");
        assert_eq!(item["status"]["adopted"], true, "{item}");
    }
    // Owned now: the same manifests plan nothing, without --adopt.
    let out = sb.run(&["diff", &m]);
    assert_eq!(out.code(), 0, "{}", show(&out));

    // A later MTU change is an ordinary hot update of the same bridge.
    let m = manifests(&sb, &pool, Some(1400));
    let out = sb.run(&["diff", &m]);
    assert_eq!(out.code(), 2, "{}", show(&out));
    assert!(
        out.stdout()
            .contains("  ~ Network/br0  (update in place, impact: hot)"),
        "{}",
        show(&out)
    );
    let out = sb.run(&["apply", "--yes", &m]);
    assert_eq!(out.code(), 0, "{}", show(&out));
    let br = link(&ns, "br0");
    assert_eq!(
        (br["mtu"].clone(), br["ifindex"].clone()),
        (1400.into(), ifindex.clone())
    );

    // Their manifests removed: the prune retains all three.
    sb.write(
        "m/adopt.yaml",
        "apiVersion: stead.dev/v1alpha1\nkind: Network\nmetadata: {name: other0}\nspec: {type: bridge}\n",
    );
    let m = sb.path("m").to_string_lossy().into_owned();
    let out = sb.run(&["apply", "--yes", &m]);
    assert_eq!(out.code(), 0, "{}", show(&out));
    for line in [
        "  = Network/br0",
        "  = StoragePool/legacy",
        "  = Volume/disk0",
    ] {
        assert!(
            out.stdout().contains(line),
            "{line:?} not in {}",
            show(&out)
        );
    }
    assert!(
        out.stdout()
            .contains("adopted, so deletionPolicy defaults to Retain"),
        "{}",
        show(&out)
    );
    let br = link(&ns, "br0");
    assert_eq!(br["ifindex"], ifindex, "the bridge is kept");
    assert!(
        br.get("ifalias").is_none_or(|a| a == ""),
        "the mark is given back: {br}"
    );
    assert_eq!(addresses(&ns, "br0"), ["10.77.0.1/24"]);
    assert_eq!(link(&ns, "vm1p")["master"], "br0");
    // Released, it is nobody's lost object: no warning about it.
    let out = sb.run(&["diff", &m]);
    assert!(!out.stdout().contains("br0"), "{}", show(&out));
    let files_kept = files(&pool);
    for (path, bytes) in &files_before {
        assert!(
            files_kept.get(path) == Some(bytes),
            "{} changed or vanished by the prune",
            path.display()
        );
    }
}

#[test]
fn adopt_refuses_a_bridge_whose_physical_port_differs_and_changes_nothing() {
    let test = "adopt_refuses_a_bridge_whose_physical_port_differs_and_changes_nothing";
    if skip_unless(is_root(), test, "needs root for a network namespace") {
        return;
    }
    let sb = Sandbox::with_netns();
    let ns = sb.netns.clone().unwrap();
    ip(&ns, &["link", "add", "br1", "type", "bridge"]);
    // A port that is not a guest's: a VXLAN link (this kernel has no dummy links, and
    // there is no NIC to spare).
    let port = Command::new("ip")
        .args(["-n", &ns, "link", "add", "eth9", "type", "vxlan"])
        .args(["id", "9", "dstport", "4789"])
        .output()
        .expect("spawn ip");
    if skip_unless(port.status.success(), test, "no vxlan links on this kernel") {
        return;
    }
    ip(&ns, &["link", "set", "eth9", "master", "br1", "up"]);
    let before = link(&ns, "br1");
    sb.write(
        "m/br1.yaml",
        "apiVersion: stead.dev/v1alpha1\nkind: Network\nmetadata:\n  name: br1\n  annotations: {stead.dev/adopt: \"true\"}\nspec: {type: bridge, ports: [eth1]}\n",
    );
    let m = sb.path("m").to_string_lossy().into_owned();
    // The annotation asks for adoption; the plan refuses it, naming the bridge and what
    // to do.
    for args in [vec!["diff", m.as_str()], vec!["apply", "--yes", m.as_str()]] {
        let out = sb.run(&args);
        assert_eq!(out.code(), 1, "{args:?}: {}", show(&out));
        let text = out.stdout() + &out.stderr();
        assert!(
            text.contains(
                "Network/br1: cannot adopt the existing object: the physical ports of bridge br1 [eth9] differ from the manifest's ports [eth1]"
            ),
            "{}",
            show(&out)
        );
        assert!(text.contains("set ports to [eth9]"), "{}", show(&out));
    }
    let after = link(&ns, "br1");
    assert_eq!(after["ifindex"], before["ifindex"]);
    assert!(after.get("ifalias").is_none(), "no mark written: {after}");
    assert_eq!(link(&ns, "eth9")["master"], "br1", "the port stays");
    let inventory = sb.run(&["get", "-o", "json"]);
    let v: Value = serde_json::from_str(&inventory.stdout()).unwrap();
    assert_eq!(v["items"], Value::Array(vec![]), "nothing recorded: {v}");
}

/// A process whose command line looks like another manager's guest (`argv0 ARGS…`),
/// killed on drop.
struct FakeGuest(std::process::Child);

impl FakeGuest {
    fn start(argv0: &str, args: &[&str]) -> FakeGuest {
        let script = format!("exec -a {argv0} /usr/bin/perl -e 'sleep 120' -- \"$@\"");
        let child = Command::new("bash")
            .args(["-c", &script, "fake-guest"])
            .args(args)
            .spawn()
            .expect("spawn a fake guest");
        // Until exec has happened, the command line is bash's.
        let pid = child.id().to_string();
        for _ in 0..100 {
            let ps = Command::new("ps")
                .args(["-o", "args=", "-p", &pid])
                .output();
            if ps.is_ok_and(|o| o.stdout.starts_with(argv0.as_bytes())) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        FakeGuest(child)
    }
}

impl Drop for FakeGuest {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn adopt_refuses_a_vm_and_a_container_that_another_manager_runs() {
    let test = "adopt_refuses_a_vm_and_a_container_that_another_manager_runs";
    if skip_unless(is_root(), test, "needs root (cgroups of the guest drivers)") {
        return;
    }
    if skip_unless(
        Path::new("/usr/bin/perl").exists(),
        test,
        "no /usr/bin/perl",
    ) {
        return;
    }
    let sb = Sandbox::new();
    // A name of its own per run, so parallel runs do not see each other's fake guests.
    let tag = sb
        .cgroup_parent
        .rsplit('-')
        .next()
        .unwrap_or("x")
        .to_string();
    let (vm, ct, vmid) = (format!("web-{tag}"), format!("mail-{tag}"), "4242");
    let _qemu = FakeGuest::start(
        "/usr/bin/kvm",
        &["-id", "7", "-name", &format!("{vm},debug-threads=on")],
    );
    let _lxc = FakeGuest::start("/usr/bin/lxc-start", &["-F", "-n", vmid]);
    sb.write(
        "m/guests.yaml",
        &format!(
            "apiVersion: stead.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {vm}}}\nspec: {{cpus: 1, memory: 64Mi, boot: {{kernel: {}}}, state: stopped}}\n\
             ---\napiVersion: stead.dev/v1alpha1\nkind: Container\nmetadata: {{name: {ct}, labels: {{pve-vmid: \"{vmid}\"}}}}\nspec: {{rootfs: {{path: {}}}, state: stopped}}\n",
            sb.path("vmlinux").display(),
            sb.path("ct-root").display()
        ),
    );
    let m = sb.path("m").to_string_lossy().into_owned();
    // Adoption asked: stead looks for another manager's processes running them.
    let out = sb.run(&["diff", "--adopt", &m]);
    assert_eq!(out.code(), 1, "{}", show(&out));
    let text = out.stdout();
    assert!(
        text.contains(&format!(
            "VirtualMachine/{vm}: cannot adopt the existing object: a QEMU process that stead did not start runs VirtualMachine/{vm}"
        )),
        "{}",
        show(&out)
    );
    assert!(text.contains("qm stop VMID"), "{}", show(&out));
    assert!(
        text.contains(&format!(
            "Container/{ct}: cannot adopt the existing object: an LXC process that stead did not start runs Container/{ct}"
        )),
        "{}",
        show(&out)
    );
    assert!(!text.contains("+ VirtualMachine"), "{}", show(&out));
}

#[test]
fn adopt_grows_a_smaller_image_and_refuses_a_larger_one() {
    let sb = Sandbox::new();
    let pool = sb.path("legacy-pool");
    std::fs::create_dir_all(pool.join("images")).unwrap();
    let bytes = image_bytes();
    std::fs::write(pool.join("images/small.raw"), &bytes[..2 << 20]).unwrap();
    std::fs::write(pool.join("images/big.raw"), &bytes).unwrap();
    let write = |big: &str| {
        sb.write(
            "m/vols.yaml",
            &format!(
                "apiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: legacy}}\nspec: {{type: dir, path: {}, content: [images]}}\n\
                 ---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: small}}\nspec: {{pool: legacy, size: 4Mi}}\n\
                 ---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: big}}\nspec: {{pool: legacy, size: {big}}}\n",
                pool.display()
            ),
        );
        sb.path("m").to_string_lossy().into_owned()
    };

    // Larger on the host than in the manifest: refused, stead never shrinks.
    let m = write("2Mi");
    let out = sb.run(&["apply", "--adopt", "--yes", &m]);
    assert_eq!(out.code(), 1, "{}", show(&out));
    assert!(
        out.stdout().contains(
            "Volume/big: cannot adopt the existing object: the image of Volume/big holds 4Mi and the manifest asks for 2Mi: stead never shrinks a volume; set size to at least 4Mi"
        ),
        "{}",
        show(&out)
    );
    assert!(!pool.join(".stead-pool").exists(), "nothing adopted");
    assert_eq!(std::fs::read(pool.join("images/big.raw")).unwrap(), bytes);

    // Smaller: adopted, then grown by the ordinary update the line shows.
    let m = write("4Mi");
    let out = sb.run(&["diff", "--adopt", &m]);
    assert_eq!(out.code(), 2, "{}", show(&out));
    assert!(
        out.stdout()
            .contains("  & Volume/small  (adopt, impact: hot)\n      # exists on the host: ownership is recorded, nothing is recreated; deletionPolicy defaults to Retain\n      size: 2Mi -> 4Mi\n"),
        "{}",
        show(&out)
    );
    let out = sb.run(&["apply", "--adopt", "--yes", &m]);
    assert_eq!(out.code(), 0, "{}", show(&out));
    let small = std::fs::read(pool.join("images/small.raw")).unwrap();
    assert_eq!(small.len(), 4 << 20);
    assert_eq!(&small[..2 << 20], &bytes[..2 << 20], "the data is kept");
    assert!(small[2 << 20..].iter().all(|b| *b == 0), "grown with zeros");
    assert_eq!(std::fs::read(pool.join("images/big.raw")).unwrap(), bytes);
    let out = sb.run(&["diff", &m]);
    assert_eq!(out.code(), 0, "{}", show(&out));
}

#[test]
fn adopt_refuses_a_bridge_another_manager_nats() {
    let test = "adopt_refuses_a_bridge_another_manager_nats";
    if skip_unless(is_root(), test, "needs root for a network namespace") {
        return;
    }
    let have_nft = Command::new("nft").arg("--version").output();
    if skip_unless(
        have_nft.is_ok_and(|o| o.status.success()),
        test,
        "nft missing",
    ) {
        return;
    }
    let sb = Sandbox::with_netns();
    let ns = sb.netns.clone().unwrap();
    ip(&ns, &["link", "add", "br2", "type", "bridge"]);
    ip(&ns, &["addr", "add", "10.78.0.1/24", "dev", "br2"]);
    let nft = |rules: &str| {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(rules.as_bytes())?;
                c.wait_with_output()
            })
            .expect("nft");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    nft(
        "table ip pve {\n chain post {\n  type nat hook postrouting priority 100;\n  iifname \"br2\" masquerade\n }\n}\n",
    );
    sb.write(
        "m/br2.yaml",
        "apiVersion: stead.dev/v1alpha1\nkind: Network\nmetadata: {name: br2}\nspec: {type: bridge, addresses: [10.78.0.1/24], nat: {}}\n",
    );
    let m = sb.path("m").to_string_lossy().into_owned();
    let out = sb.run(&["diff", "--adopt", &m]);
    assert_eq!(out.code(), 1, "{}", show(&out));
    assert!(
        out.stdout().contains(
            "Network/br2: cannot adopt the existing object: nftables table(s) ip pve of another manager have rules for br2"
        ),
        "{}",
        show(&out)
    );
    // Without NAT in the manifest, the other manager's rules are no business of stead's.
    sb.write(
        "m/br2.yaml",
        "apiVersion: stead.dev/v1alpha1\nkind: Network\nmetadata: {name: br2}\nspec: {type: bridge, addresses: [10.78.0.1/24]}\n",
    );
    let out = sb.run(&["diff", "--adopt", &m]);
    assert_eq!(out.code(), 2, "{}", show(&out));
    assert!(
        out.stdout().contains("  & Network/br2  (adopt"),
        "{}",
        show(&out)
    );
}

#[test]
fn adopt_takes_over_a_btrfs_directory_and_refuses_btrfs_elsewhere() {
    let test = "adopt_takes_over_a_btrfs_directory_and_refuses_btrfs_elsewhere";
    let sb = Sandbox::new();
    let Some(fs) = LoopBtrfs::for_test(&sb, test) else {
        return;
    };
    let pool = fs.mnt.join("pve");
    std::fs::create_dir_all(pool.join("images/100/vm-100-disk-0")).unwrap();
    std::fs::write(
        pool.join("images/100/vm-100-disk-0/disk.raw"),
        image_bytes(),
    )
    .unwrap();
    std::fs::write(pool.join("notes.txt"), "kept\n").unwrap();
    let plain = sb.path("plain");
    std::fs::create_dir_all(&plain).unwrap();
    std::fs::write(plain.join("x"), "x").unwrap();
    let before = files(&pool);
    let write = |path: &Path| {
        sb.write(
            "m/pool.yaml",
            &format!(
                "apiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: pve}}\nspec: {{type: btrfs, path: {}, content: [images]}}\n",
                path.display()
            ),
        );
        sb.path("m").to_string_lossy().into_owned()
    };

    // Not on btrfs: refused, nothing written.
    let m = write(&plain);
    let out = sb.run(&["apply", "--adopt", "--yes", &m]);
    assert_eq!(out.code(), 1, "{}", show(&out));
    assert!(
        out.stdout().contains(&format!(
            "StoragePool/pve: cannot adopt the existing object: {} is not on a btrfs file system: adopt it as type dir",
            plain.display()
        )),
        "{}",
        show(&out)
    );
    assert!(!plain.join(".stead-pool").exists());

    let m = write(&pool);
    let out = sb.run(&["apply", "--adopt", "--yes", &m]);
    assert_eq!(out.code(), 0, "{}", show(&out));
    assert!(
        out.stdout().contains("  & StoragePool/pve  (adopt"),
        "{}",
        show(&out)
    );
    let after = files(&pool);
    for (path, bytes) in &before {
        assert!(after.get(path) == Some(bytes), "{} changed", path.display());
    }
    assert_eq!(after.len(), before.len() + 1, "only the marker is new");
    let out = sb.run(&["diff", &m]);
    assert_eq!(out.code(), 0, "{}", show(&out));
}

#[test]
fn adopt_refuses_to_create_a_volume_whose_image_lies_in_another_layout() {
    let sb = Sandbox::new();
    let pool = sb.path("var-lib-vz");
    std::fs::create_dir_all(pool.join("images/100")).unwrap();
    std::fs::write(pool.join("images/100/vm-100-disk-0.raw"), image_bytes()).unwrap();
    sb.write(
        "m/vz.yaml",
        &format!(
            "apiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: local}}\nspec: {{type: dir, path: {}, content: [images]}}\n\
             ---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: vm-100-disk-0}}\nspec: {{pool: local, size: 4Mi}}\n",
            pool.display()
        ),
    );
    let m = sb.path("m").to_string_lossy().into_owned();
    let out = sb.run(&["diff", "--adopt", &m]);
    assert_eq!(out.code(), 1, "{}", show(&out));
    assert!(
        out.stdout().contains(&format!(
            "Volume/vm-100-disk-0: cannot adopt the existing object: no image at stead's path for Volume/vm-100-disk-0, but {} exists: move it to {}",
            pool.join("images/100/vm-100-disk-0.raw").display(),
            pool.join("images/vm-100-disk-0.raw").display()
        )),
        "{}",
        show(&out)
    );
    // Moved where stead keeps volumes, it is adopted.
    std::fs::rename(
        pool.join("images/100/vm-100-disk-0.raw"),
        pool.join("images/vm-100-disk-0.raw"),
    )
    .unwrap();
    let out = sb.run(&["apply", "--adopt", "--yes", &m]);
    assert_eq!(out.code(), 0, "{}", show(&out));
    assert!(
        out.stdout().contains("  & Volume/vm-100-disk-0  (adopt)"),
        "{}",
        show(&out)
    );
    assert_eq!(
        std::fs::read(pool.join("images/vm-100-disk-0.raw")).unwrap(),
        image_bytes()
    );
}
