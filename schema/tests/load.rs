//! Loader and validation tests: every rule, every error with its location.

use std::path::{Path, PathBuf};

use stead_schema::{Diagnostic, Kind, ResourceId, load_and_validate};

fn load(text: &str) -> Result<stead_schema::Desired, Vec<Diagnostic>> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.yaml");
    std::fs::write(&p, text).unwrap();
    let r = load_and_validate(&[p]);
    // Normalise file names so assertions can ignore the temp dir.
    r.map_err(|errs| {
        errs.into_iter()
            .map(|mut d| {
                d.file = PathBuf::from("m.yaml");
                d
            })
            .collect()
    })
}

fn errors(text: &str) -> Vec<String> {
    match load(text) {
        Ok(_) => panic!("expected errors"),
        Err(e) => e.iter().map(|d| d.to_string()).collect(),
    }
}

const POOL: &str = "apiVersion: stead.dev/v1alpha1
kind: StoragePool
metadata: {name: local}
spec: {type: dir, path: /var/lib/stead/pools/local, content: [images, rootdir, backup]}
";

#[test]
fn loads_a_valid_set() {
    let text = format!(
        "{POOL}---
apiVersion: stead.dev/v1alpha1
kind: Volume
metadata: {{name: data}}
spec: {{pool: local, size: 16Mi, deletionPolicy: Delete}}
"
    );
    let d = load(&text).unwrap();
    assert_eq!(d.len(), 2);
    let v = d.get(&ResourceId::new(Kind::Volume, "data")).unwrap();
    assert_eq!(v.origin.pos.line, 6);
}

#[test]
fn reports_every_error_with_position() {
    let text = "apiVersion: stead.dev/v1alpha1
kind: Volume
metadata: {name: data}
spec:
  pool: local
  size: 12Q
  colour: blue
---
apiVersion: stead.dev/v1alpha1
kind: Netwrk
metadata: {name: lan0}
spec: {}
---
apiVersion: stead.dev/v1
kind: Network
metadata: {name: Bad_Name}
spec: {mtu: 1500, adresses: [10.0.0.1/24]}
";
    let e = errors(text);
    let joined = e.join("\n");
    assert!(
        joined.contains("m.yaml:6:9: spec.size: invalid size suffix"),
        "{joined}"
    );
    assert!(
        joined.contains("m.yaml:7:3: spec.colour: unknown field `colour`"),
        "{joined}"
    );
    assert!(
        joined.contains("m.yaml:10:7: kind: unknown kind \"Netwrk\""),
        "{joined}"
    );
    assert!(
        joined.contains("m.yaml:14:13: apiVersion: unsupported apiVersion"),
        "{joined}"
    );
    assert!(
        joined.contains("m.yaml:16:18: metadata.name: invalid name"),
        "{joined}"
    );
    assert!(
        joined.contains("spec.adresses: unknown field `adresses`"),
        "{joined}"
    );
    assert!(joined.contains("did you mean `addresses`?"), "{joined}");
    // The volume failed to load, and is still checked: its pool is not defined.
    assert!(
        joined.contains(
            "m.yaml:5:9: Volume/data spec.pool: Volume/data references StoragePool/local which is not defined"
        ),
        "{joined}"
    );
    assert_eq!(e.len(), 7, "{joined}");
}

#[test]
fn syntax_error_has_position() {
    let e = errors("apiVersion: stead.dev/v1alpha1\nkind: [unclosed\n");
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with("m.yaml:3:") || e[0].starts_with("m.yaml:2:"),
        "{e:?}"
    );
    assert!(e[0].contains("YAML syntax error"));
}

#[test]
fn dangling_reference_points_at_the_referencing_line() {
    let text = "apiVersion: stead.dev/v1alpha1
kind: Volume
metadata: {name: data}
spec:
  size: 1Gi
  pool: locl
";
    let e = errors(&format!("{POOL}---\n{text}"));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].contains("m.yaml:11:9"), "{e:?}");
    assert!(
        e[0].contains("references StoragePool/locl which is not defined"),
        "{e:?}"
    );
    assert!(e[0].contains("did you mean StoragePool/local?"), "{e:?}");
}

#[test]
fn duplicate_names_and_cycles() {
    let a = "apiVersion: stead.dev/v1alpha1
kind: Network
metadata: {name: a}
spec: {dependsOn: [Network/b]}
---
apiVersion: stead.dev/v1alpha1
kind: Network
metadata: {name: b}
spec: {dependsOn: [Network/a]}
---
apiVersion: stead.dev/v1alpha1
kind: Network
metadata: {name: b}
spec: {}
";
    let e = errors(a).join("\n");
    assert!(e.contains("duplicate Network/b: also defined at"), "{e}");
    assert!(
        e.contains("dependency cycle: Network/a -> Network/b -> Network/a"),
        "{e}"
    );
}

#[test]
fn conflicts_ip_mac_and_rw_volume() {
    let text = format!(
        "{POOL}---
apiVersion: stead.dev/v1alpha1
kind: Network
metadata: {{name: lan0}}
spec: {{addresses: [10.10.0.1/24]}}
---
apiVersion: stead.dev/v1alpha1
kind: Volume
metadata: {{name: shared}}
spec: {{pool: local, size: 1Gi}}
---
apiVersion: stead.dev/v1alpha1
kind: Container
metadata: {{name: a}}
spec:
  rootfs: {{path: /srv/a}}
  interfaces: [{{name: eth0, network: lan0, address: 10.10.0.1/24, mac: \"52:54:00:00:00:01\"}}]
  mounts: [{{volume: shared, path: /data}}]
---
apiVersion: stead.dev/v1alpha1
kind: VirtualMachine
metadata: {{name: vm}}
spec:
  cpus: 1
  memory: 64Mi
  boot: {{kernel: /k}}
  disks: [{{volume: shared}}]
  interfaces: [{{network: lan0, mac: \"52:54:00:00:00:01\"}}]
"
    );
    let e = errors(&text).join("\n");
    assert!(
        e.contains("address 10.10.0.1 on network lan0 is already used by Network/lan0"),
        "{e}"
    );
    assert!(
        e.contains("MAC 52:54:00:00:00:01 is already used by Container/a"),
        "{e}"
    );
    assert!(
        e.contains("volume shared is attached read-write twice"),
        "{e}"
    );
}

#[test]
fn rules_per_kind() {
    let text = "apiVersion: stead.dev/v1alpha1
kind: Network
metadata: {name: averyveryverylongbridge}
spec: {type: vxlan, mtu: 20, nat: {enabled: true}}
---
apiVersion: stead.dev/v1alpha1
kind: Container
metadata: {name: c}
spec:
  rootfs: {path: relative/dir, template: /t.tar}
  interfaces: [{name: eth0, network: averyveryverylongbridge, vlan: 10}]
---
apiVersion: stead.dev/v1alpha1
kind: BackupSchedule
metadata: {name: nightly}
spec: {schedule: \"0 2 * *\", targets: {}, storage: x}
";
    let e = errors(text).join("\n");
    for want in [
        "at most 15 bytes",
        "type vxlan needs a `vxlan` block",
        "mtu 20 is out of range",
        "NAT needs at least one host address",
        "rootfs needs exactly one of template, path, volume (2 given)",
        "must be an absolute path",
        "is not vlanAware",
        "invalid cron schedule",
    ] {
        assert!(e.contains(want), "missing {want:?} in\n{e}");
    }
}

#[test]
fn directory_is_walked_sorted() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(
        dir.path().join("sub/b.yml"),
        POOL.replace("local", "b").replace("/pools/b", "/pools/bb"),
    )
    .unwrap();
    std::fs::write(dir.path().join("a.yaml"), POOL).unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not yaml").unwrap();
    let files = stead_schema::load::collect_files(&[dir.path().to_path_buf()]).unwrap();
    let names: Vec<&Path> = files
        .iter()
        .map(|f| f.strip_prefix(dir.path()).unwrap())
        .collect();
    assert_eq!(names, [Path::new("a.yaml"), Path::new("sub/b.yml")]);
    assert_eq!(
        load_and_validate(&[dir.path().to_path_buf()])
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn checked_in_schema_is_current() {
    // The runtime value: a test binary reused from a shared target dir may have been
    // compiled in another checkout (the compile-time path would point there).
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf());
    let path = dir.join("stead.schema.json");
    let current = stead_schema::schema::json_schema_text();
    if std::env::var_os("STEAD_UPDATE_SCHEMA").is_some() {
        std::fs::write(&path, &current).unwrap();
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == current,
        "schema/stead.schema.json is stale: run `STEAD_UPDATE_SCHEMA=1 cargo test -p stead-schema --test load checked_in_schema_is_current`"
    );
}

#[test]
fn pool_tool_names_that_would_become_options_are_refused() {
    let text = "apiVersion: stead.dev/v1alpha1
kind: StoragePool
metadata: {name: thin}
spec:
  type: lvmthin
  path: /var/lib/stead/pools/thin
  lvm: {volumeGroup: -ay, thinPool: snapshot0}
---
apiVersion: stead.dev/v1alpha1
kind: StoragePool
metadata: {name: z}
spec:
  type: zfs
  path: /var/lib/stead/pools/z
  zfs: {dataset: -o}
---
apiVersion: stead.dev/v1alpha1
kind: StoragePool
metadata: {name: n}
spec:
  type: nfs
  path: /var/lib/stead/pools/n
  nfs:
    server: -oremount
    export: srv/x
    options: vers=4.2,-x
---
apiVersion: stead.dev/v1alpha1
kind: StoragePool
metadata: {name: fine}
spec:
  type: nfs
  path: /var/lib/stead/pools/fine
  nfs: {server: nas.example.com, export: /srv/x, options: \"vers=4.2,hard\"}
";
    let e = errors(text);
    let joined = e.join("\n");
    for want in [
        "m.yaml:7:22: StoragePool/thin spec.lvm.volumeGroup: volume group \"-ay\": must not start with '-'",
        "m.yaml:7:37: StoragePool/thin spec.lvm.thinPool: thin pool \"snapshot0\": the prefix `snapshot` is reserved",
        "m.yaml:15:18: StoragePool/z spec.zfs.dataset: dataset \"-o\": pool name \"-o\" must start with a letter",
        "m.yaml:24:13: StoragePool/n spec.nfs.server: NFS server \"-oremount\"",
        "m.yaml:25:13: StoragePool/n spec.nfs.export: NFS export \"srv/x\": must be an absolute path",
        "m.yaml:26:14: StoragePool/n spec.nfs.options: NFS options \"vers=4.2,-x\": option \"-x\" must not start with '-'",
    ] {
        assert!(joined.contains(want), "missing {want:?} in\n{joined}");
    }
    assert_eq!(e.len(), 6, "{joined}");
}

fn load_dir_errors(dir: &Path) -> Vec<String> {
    match load_and_validate(&[dir.to_path_buf()]) {
        Ok(_) => panic!("expected errors"),
        Err(e) => e
            .iter()
            .map(|d| d.to_string().replace(&dir.display().to_string(), "D"))
            .collect(),
    }
}

#[test]
fn non_regular_manifests_are_skipped_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.yaml");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    std::os::unix::fs::symlink("/dev/zero", dir.path().join("x.yaml")).unwrap();
    std::fs::write(dir.path().join("ok.yaml"), POOL).unwrap();
    let e = load_dir_errors(dir.path());
    assert_eq!(
        e,
        [
            "D/fifo.yaml:0:0: skipped: not a regular file (FIFO) (hint: a manifest must be a regular file (or a link to one))",
            "D/x.yaml:0:0: skipped: not a regular file (character device) (hint: a manifest must be a regular file (or a link to one))",
        ]
    );
    // Named directly, the FIFO is refused too (opening it would block).
    let direct = load_and_validate(&[fifo]).unwrap_err();
    assert_eq!(direct.len(), 1);
    assert!(
        direct[0].message.contains("not a regular file (FIFO)"),
        "{direct:?}"
    );
}

#[test]
fn a_file_over_the_size_cap_is_refused_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.yaml");
    let line = "# padding padding padding padding padding padding padding padding\n";
    let lines = stead_schema::files::MAX_FILE_BYTES as usize / line.len() + 10;
    std::fs::write(&p, format!("{POOL}{}", line.repeat(lines))).unwrap();
    let e = load_dir_errors(dir.path());
    // The line holding the first byte past the cap: POOL's 4 lines, then whole
    // padding lines.
    let cap = stead_schema::files::MAX_FILE_BYTES as usize;
    let want_line = 1 + 4 + (cap - POOL.len()) / line.len();
    assert_eq!(
        e,
        [format!(
            "D/big.yaml:{want_line}:1: file is larger than the manifest size limit of 4 MiB (hint: split the manifests into several files)"
        )]
    );
}

#[test]
fn nesting_deeper_than_the_cap_is_refused_at_its_line() {
    let depth = stead_schema::load::MAX_DEPTH;
    // Within the cap: only the usual errors (an unknown field), no depth error.
    let ok = format!(
        "{POOL}---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: v}}\nspec: {{pool: local, size: 1Mi, extra: {}1{}}}\n",
        "[".repeat(depth - 2),
        "]".repeat(depth - 2)
    );
    let e = errors(&ok).join("\n");
    assert!(!e.contains("nesting"), "{e}");
    assert!(e.contains("unknown field `extra`"), "{e}");
    // One level more, on line 10: refused at the 65th opening (the document and spec
    // mappings are levels 1 and 2), nothing else reported for the file.
    let deep = format!(
        "{POOL}---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: v}}\nspec:\n  extra: {}1{}\n",
        "[".repeat(depth - 1),
        "]".repeat(depth - 1)
    );
    let e = errors(&deep);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with(&format!(
            "m.yaml:10:{}: YAML nesting is deeper than 64 levels",
            9 + depth - 1
        )),
        "{e:?}"
    );
    // Far deeper (a stack-overflow attempt) ends the same way, quickly: block style
    // is stopped by the cap, flow style by the YAML scanner's own limit.
    let bomb = format!("{}1\n", "- ".repeat(1_000_000));
    let e = errors(&bomb);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].contains("YAML nesting is deeper than 64 levels"),
        "{e:?}"
    );
    let bomb = format!("a: {}", "[".repeat(1_000_000));
    let e = errors(&bomb);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].contains("recursion limit exceeded"), "{e:?}");
}

#[test]
fn aliases_are_refused_at_their_position() {
    let text = "apiVersion: stead.dev/v1alpha1
kind: Volume
metadata: {name: a}
spec: &s {pool: local, size: 1Mi}
---
apiVersion: stead.dev/v1alpha1
kind: Volume
metadata: {name: b}
spec: *s
";
    let e = errors(&format!("{POOL}---\n{text}"));
    assert_eq!(
        e,
        [
            "m.yaml:14:7: YAML aliases (`*name`) are not supported in manifests (hint: write the value out in full)"
        ]
    );
}

#[test]
fn a_huge_unknown_key_gets_no_hint_and_a_short_message() {
    let key = "k".repeat(1 << 20);
    let text = format!(
        "apiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: v}}\nspec: {{pool: local, size: 1Mi, {key}: 1}}\n"
    );
    let e = errors(&format!("{POOL}---\n{text}"));
    assert_eq!(e.len(), 1, "{}", e.len());
    assert!(e[0].starts_with("m.yaml:9:32: "), "{}", &e[0][..60]);
    assert!(e[0].len() < 1000, "message is {} bytes", e[0].len());
    assert!(e[0].contains("unknown field `kkk"), "{}", &e[0][..200]);
    assert!(!e[0].contains("hint"), "{}", &e[0][..200]);
    // A typo in a short key still gets its hint.
    let typo = errors(&format!(
        "{POOL}---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: v}}\nspec: {{pool: local, sise: 1Mi}}\n"
    ))
    .join("\n");
    assert!(typo.contains("did you mean `size`?"), "{typo}");
}

#[test]
fn a_resource_that_fails_to_parse_still_gets_its_semantic_errors() {
    let text = "apiVersion: stead.dev/v1alpha1
kind: VirtualMachine
metadata: {name: a}
spec:
  boot: {kernel: /k}
  interfaces: [{network: lan0, mac: \"52:54:00:00:00:01\"}]
---
apiVersion: stead.dev/v1alpha1
kind: VirtualMachine
metadata: {name: b}
spec:
  memory: 0
  boot: {kernel: /k}
  colour: red
  interfaces: [{network: lan0, mac: \"52:54:00:00:00:01\"}]
---
apiVersion: stead.dev/v1alpha1
kind: Volume
metadata: {name: v}
spec: {size: 0}
";
    let net = "apiVersion: stead.dev/v1alpha1
kind: Network
metadata: {name: lan0}
spec: {type: bridge}
---
";
    let e = errors(&format!("{net}{text}"));
    let joined = e.join("\n");
    for want in [
        // b: an unknown field, and its semantic errors too.
        "m.yaml:17:11: VirtualMachine/b spec.memory: memory must be at least 2Mi",
        "m.yaml:19:3: spec.colour: unknown field `colour`",
        "m.yaml:20:37: VirtualMachine/b spec.interfaces[0].mac: MAC 52:54:00:00:00:01 is already used by VirtualMachine/a",
        // v: the missing pool is reported once, not again as a dangling reference.
        "m.yaml:25:1: spec: missing field `pool`",
        "m.yaml:25:14: Volume/v spec.size: size must be greater than zero",
    ] {
        assert!(joined.contains(want), "missing {want:?} in\n{joined}");
    }
    assert_eq!(e.len(), 5, "{joined}");
}

#[test]
fn vm_cpus_and_memory_have_defaults() {
    let text = "apiVersion: stead.dev/v1alpha1
kind: VirtualMachine
metadata: {name: a}
spec: {boot: {kernel: /k}}
";
    let d = load(text).unwrap();
    let vm = d.get(&ResourceId::new(Kind::VirtualMachine, "a")).unwrap();
    let stead_schema::Spec::VirtualMachine(spec) = &vm.spec else {
        panic!("not a VM")
    };
    assert_eq!(spec.cpus, 1);
    assert_eq!(spec.memory.bytes(), 512 << 20);
}

#[test]
fn nested_required_fields_are_stood_in_for_and_the_rest_is_checked() {
    let text = "apiVersion: stead.dev/v1alpha1
kind: Container
metadata: {name: c1}
spec:
  rootfs: {path: /srv/c1}
  interfaces: [{network: lan0}, {name: eth1, network: lan0, mac: zz}, 7]
  mounts: [{path: rel}]
";
    let e = errors(text);
    let joined = e.join("\n");
    for want in [
        "m.yaml:6:16: spec.interfaces[0]: missing field `name`",
        "m.yaml:6:26: Container/c1 spec.interfaces[0].network: Container/c1 references Network/lan0 which is not defined",
        "m.yaml:6:55: Container/c1 spec.interfaces[1].network: Container/c1 references Network/lan0 which is not defined",
        "m.yaml:6:66: spec.interfaces[1].mac: invalid MAC address \"zz\"",
        "m.yaml:6:71: spec.interfaces[2]: invalid type: integer `7`",
        "m.yaml:7:12: spec.mounts[0]: missing field `volume`",
        "m.yaml:7:19: Container/c1 spec.mounts[0].path: mount path rel must be an absolute path",
    ] {
        assert!(joined.contains(want), "missing {want:?} in\n{joined}");
    }
    assert_eq!(e.len(), 7, "{joined}");
}

#[test]
fn the_cluster_example_validates() {
    // The runtime value (see checked_in_schema_is_current).
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf())
        .join("../examples/cluster");
    let desired = match load_and_validate(&[dir]) {
        Ok(d) => d,
        Err(errs) => {
            let lines: Vec<String> = errs.iter().map(|d| d.to_string()).collect();
            panic!("examples/cluster must validate:\n{}", lines.join("\n"));
        }
    };
    let groups = desired
        .resources
        .keys()
        .filter(|id| id.kind == stead_schema::Kind::HaGroup)
        .count();
    assert_eq!(groups, 2);
}

#[test]
fn the_qemu_examples_validate() {
    let dir = Path::new(
        &std::env::var_os("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("../examples/qemu");
    let desired = match load_and_validate(&[dir]) {
        Ok(d) => d,
        Err(errs) => {
            let lines: Vec<String> = errs.iter().map(|d| d.to_string()).collect();
            panic!("examples/qemu must validate:\n{}", lines.join("\n"));
        }
    };
    // The three examples: a cloud-init VM, a UEFI VM, a template with two
    // linked clones; every VM on the QEMU engine.
    let vms: Vec<_> = desired
        .resources
        .values()
        .filter_map(|r| match &r.spec {
            stead_schema::Spec::VirtualMachine(vm) => Some((r.id.name.as_str(), vm)),
            _ => None,
        })
        .collect();
    let names: Vec<&str> = vms.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["debian", "uefi", "web-1", "web-2"]);
    assert!(
        vms.iter()
            .all(|(_, vm)| vm.engine() == stead_schema::VmEngine::Qemu)
    );
    assert!(
        vms.iter()
            .any(|(_, vm)| vm.firmware == stead_schema::Firmware::Uefi)
    );
    let clones = desired
        .resources
        .values()
        .filter(|r| {
            matches!(&r.spec, stead_schema::Spec::Volume(v)
                if v.clone.as_ref().is_some_and(|c| c.linked && c.from.as_str() == "debian-tpl"))
        })
        .count();
    assert_eq!(clones, 2);
}

#[test]
fn cluster_values_are_refused_at_their_node() {
    let text = "apiVersion: stead.dev/v1alpha1
kind: HaGroup
metadata: {name: prod}
spec:
  nodes: {pve_1: 2, pve2: x}
---
apiVersion: stead.dev/v1alpha1
kind: StoragePool
metadata: {name: fast}
spec: {type: btrfs, path: /f}
---
apiVersion: stead.dev/v1alpha1
kind: Volume
metadata: {name: v}
spec: {pool: fast, size: 1Gi, replication: {to: \"bad node\", every: 5 minutes}}
---
apiVersion: stead.dev/v1alpha1
kind: Container
metadata: {name: c}
spec: {rootfs: {path: /r}, placement: {node: \"-x\", antiAffinity: [Gadget/x], hagroup: prod}}
";
    let host = "a host name (letters, digits and '-' in labels joined by '.')";
    assert_eq!(
        errors(text),
        [
            format!("m.yaml:5:18: spec.nodes.pve_1: invalid node name \"pve_1\": {host}"),
            "m.yaml:5:27: spec.nodes.pve2: invalid type: string \"x\", expected u32".into(),
            format!("m.yaml:15:49: spec.replication.to: invalid node name \"bad node\": {host}"),
            "m.yaml:15:68: spec.replication.every: invalid duration \"5 minutes\": expected e.g. 500ms, 30s, 5m, 2h, 1d".into(),
            format!("m.yaml:20:46: spec.placement.node: invalid node name \"-x\": {host}"),
            "m.yaml:20:67: spec.placement.antiAffinity[0]: unknown kind \"Gadget\": expected one of StoragePool, Network, Bond, Volume, Container, VirtualMachine, BackupSchedule, HaGroup".into(),
            "m.yaml:20:78: spec.placement.hagroup: unknown field `hagroup`, expected one of `node`, `nodeSelector`, `affinity`, `antiAffinity`, `preferredAffinity`, `preferredAntiAffinity`, `haGroup`, `ha` (hint: did you mean `haGroup`?)".into(),
        ]
    );
}

#[test]
fn many_files_load_on_several_threads_in_file_order() {
    let dir = tempfile::tempdir().unwrap();
    // Names and paths differ: `local` is both.
    let pool = |i: usize| POOL.replace("local", &format!("p{i:03}"));
    for i in 0..100 {
        std::fs::write(dir.path().join(format!("p{i:03}.yaml")), pool(i)).unwrap();
    }
    let d = load_and_validate(&[dir.path().to_path_buf()]).unwrap();
    assert_eq!(d.len(), 100);
    // Every third file is broken: the diagnostics come in file order.
    for i in (0..100).step_by(3) {
        let text = pool(i).replace("spec: {", "spec: {bogus: 1, ");
        std::fs::write(dir.path().join(format!("p{i:03}.yaml")), text).unwrap();
    }
    let files: Vec<String> = load_dir_errors(dir.path())
        .iter()
        .map(|e| e.split(':').next().unwrap().to_string())
        .collect();
    let want: Vec<String> = (0..100)
        .step_by(3)
        .map(|i| format!("D/p{i:03}.yaml"))
        .collect();
    assert_eq!(files, want);
}
