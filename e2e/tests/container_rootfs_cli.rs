//! Container templates and root file systems through `stead apply`: a template cannot
//! touch host files or hand out host ids outside the container's range (issue 20, items
//! 1–2), rootfs trees are not reachable by host users (issue 12, item 12), and deleting a
//! container's rootfs is a data-loss change (issue 12, item 2).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use stead_e2e::{Sandbox, busybox_ok};

/// Size of a container's id range.
const RANGE: u32 = 65536;

/// A sandbox whose dir an unprivileged container's root may traverse.
fn sandbox() -> Sandbox {
    let sb = Sandbox::new();
    std::fs::set_permissions(sb.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    sb
}

/// `tar -P -cf <out> -C <root> . <extra…>`: absolute `extra` names stay absolute.
fn pack(root: &Path, out: &Path, extra: &[&Path]) {
    let st = Command::new("tar")
        .arg("-P")
        .arg("-cf")
        .arg(out)
        .arg("-C")
        .arg(root)
        .arg(".")
        .args(extra)
        .status()
        .expect("tar");
    assert!(st.success(), "tar failed");
}

fn manifest(sb: &Sandbox, name: &str, template: &Path, extra: &str) -> PathBuf {
    sb.write(
        &format!("m/{name}.yaml"),
        &format!(
            "apiVersion: stead.dev/v1alpha1\nkind: Container\nmetadata: {{name: {name}}}\nspec:\n  rootfs: {{template: {}}}\n  command: [/bin/sh, -c, \"sleep 100000\"]\n{extra}",
            template.display()
        ),
    );
    sb.path("m")
}

/// Destroys what the manifests own when the test ends.
struct Destroy<'a>(&'a Sandbox, PathBuf);

impl Drop for Destroy<'_> {
    fn drop(&mut self) {
        let _ = self
            .0
            .cmd()
            .args(["destroy", "--yes", "--allow-data-loss"])
            .arg(&self.1)
            .output();
    }
}

/// Every (path, uid, gid) under `root`, symlinks not followed.
fn owners(root: &Path) -> Vec<(PathBuf, u32, u32)> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                todo.push(e.unwrap().path());
            }
        }
        out.push((p, m.uid(), m.gid()));
    }
    out
}

#[test]
fn template_member_with_absolute_path_leaves_host_file_alone() {
    const TEST: &str = "template_member_with_absolute_path_leaves_host_file_alone";
    if !busybox_ok(TEST) {
        return;
    }
    let sb = sandbox();
    let root = sb.busybox_rootfs();
    // A host file outside the rootfs, named by an absolute member of the template.
    let victim = sb.path("outside/victim");
    sb.write("outside/victim", "host data\n");
    std::os::unix::fs::chown(&victim, Some(1234), Some(1234)).unwrap();
    let tpl = sb.path("t.tar");
    pack(&root, &tpl, &[&victim]);
    let m = manifest(&sb, "abs", &tpl, "");
    let _destroy = Destroy(&sb, m.clone());
    sb.run(&["apply", "--yes", m.to_str().unwrap()])
        .expect_code(0);
    let meta = std::fs::metadata(&victim).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (1234, 1234),
        "the host file named by an absolute template member kept its owner"
    );
    // The member was unpacked (and shifted) inside the container's own tree.
    let inside = sb
        .path("state/rootfs/abs/root")
        .join(victim.strip_prefix("/").unwrap());
    let base = std::fs::metadata(sb.path("state/rootfs/abs/root"))
        .unwrap()
        .uid();
    assert_eq!(std::fs::metadata(&inside).unwrap().uid(), base + 1234);
}

#[test]
fn template_ids_stay_in_the_container_range() {
    const TEST: &str = "template_ids_stay_in_the_container_range";
    if !busybox_ok(TEST) {
        return;
    }
    let sb = sandbox();
    let root = sb.busybox_rootfs();
    sb.write("ct-root/etc/last", "x\n");
    std::os::unix::fs::chown(root.join("etc/last"), Some(RANGE - 1), Some(RANGE - 1)).unwrap();
    let tpl = sb.path("ok.tar");
    pack(&root, &tpl, &[]);
    let m = manifest(&sb, "inrange", &tpl, "");
    let _destroy = Destroy(&sb, m.clone());
    sb.run(&["apply", "--yes", m.to_str().unwrap()])
        .expect_code(0);
    let tree = sb.path("state/rootfs/inrange/root");
    let base = std::fs::metadata(&tree).unwrap().uid();
    assert!(base >= 100_000, "container root is unprivileged: {base}");
    for (p, u, g) in owners(&tree) {
        for id in [u, g] {
            assert!(
                (base..base + RANGE).contains(&id),
                "{} owned by {id}, outside {base}..{}",
                p.display(),
                base + RANGE
            );
        }
    }

    // A member owned by an id outside the 65536-id map is refused, by name.
    std::os::unix::fs::chown(root.join("etc/last"), Some(70_000), Some(0)).unwrap();
    let bad = sb.path("bad.tar");
    pack(&root, &bad, &[]);
    let m2 = manifest(&sb, "outofrange", &bad, "");
    let _destroy2 = Destroy(&sb, m2.clone());
    let out = sb.run(&["apply", "--yes", m2.to_str().unwrap()]);
    assert_ne!(out.code(), 0, "{}", out.stdout());
    let all = format!("{}{}", out.stdout(), out.stderr());
    assert!(
        all.contains("etc/last") && all.contains("70000"),
        "the error names the member and its uid: {all}"
    );
    assert!(
        !sb.path("state/rootfs/outofrange/root").exists(),
        "nothing half-unpacked is left"
    );
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn rootfs_trees_sit_in_private_dirs() {
    const TEST: &str = "rootfs_trees_sit_in_private_dirs";
    if !busybox_ok(TEST) {
        return;
    }
    let sb = sandbox();
    let root = sb.busybox_rootfs();
    std::fs::set_permissions(
        root.join("bin/busybox"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    let tpl = sb.path("t.tar");
    pack(&root, &tpl, &[]);
    // Dirs left world-readable by an older version are tightened on the next apply.
    for d in ["state/rootfs/priv", "state/rootfs/old", "state/templates"] {
        std::fs::create_dir_all(sb.path(d)).unwrap();
        std::fs::set_permissions(sb.path(d), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    manifest(&sb, "priv", &tpl, "  unprivileged: false\n");
    let m = manifest(&sb, "unpriv", &tpl, "");
    let _destroy = Destroy(&sb, m.clone());
    sb.run(&["apply", "--yes", m.to_str().unwrap()])
        .expect_code(0);
    let rootfs = sb.path("state/rootfs");
    assert_eq!(mode(&rootfs), 0o711, "rootfs/ can be traversed, not listed");
    let unpriv = rootfs.join("unpriv");
    assert!(unpriv.join("root/bin/busybox").exists());
    let mut trees = vec![unpriv.join("root"), rootfs.join("old").join("x")];
    let templates = sb.path("state/templates");
    if rootfs.join("priv/upper").exists() {
        trees.push(rootfs.join("priv/upper"));
        for e in std::fs::read_dir(&templates).unwrap() {
            trees.push(e.unwrap().path());
        }
    } else {
        trees.push(rootfs.join("priv/root")); // no overlayfs: an own copy
    }
    for t in &trees {
        let parent = t.parent().unwrap();
        assert_eq!(mode(parent), 0o700, "{} holds a tree", parent.display());
    }
    let up_root = std::fs::metadata(unpriv.join("root")).unwrap().uid();
    assert_eq!(
        std::fs::metadata(&unpriv).unwrap().uid(),
        up_root,
        "the unprivileged container's root owns its private dir"
    );
    assert_eq!(std::fs::metadata(rootfs.join("priv")).unwrap().uid(), 0);
}

#[test]
fn container_rootfs_delete_is_gated_snapshotted_or_retained() {
    const TEST: &str = "container_rootfs_delete_is_gated_snapshotted_or_retained";
    if !busybox_ok(TEST) {
        return;
    }
    let sb = sandbox();
    let Some(btrfs) = stead_e2e::LoopBtrfs::for_test(&sb, TEST) else {
        return;
    };
    let root = sb.busybox_rootfs();
    let tpl = sb.path("t.tar");
    pack(&root, &tpl, &[]);
    let pool = btrfs.mnt.join("pool");
    sb.write(
        "m/pool.yaml",
        &format!(
            "apiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: fast}}\nspec: {{type: dir, path: {}}}\n",
            pool.display()
        ),
    );
    manifest(&sb, "gone", &tpl, "");
    sb.write(
        "m/gone.yaml",
        &std::fs::read_to_string(sb.path("m/gone.yaml"))
            .unwrap()
            .replace("{template:", "{pool: fast, template:"),
    );
    let m = manifest(&sb, "kept", &tpl, "  deletionPolicy: Retain\n");
    let ms = m.to_str().unwrap();
    let _destroy = Destroy(&sb, m.clone());
    sb.run(&["apply", "--yes", ms]).expect_code(0);
    let gone = pool.join("rootfs/gone/root");
    let kept = sb.path("state/rootfs/kept/root");
    std::fs::write(gone.join("data.txt"), "precious\n").unwrap();
    assert!(kept.join("bin/busybox").exists());
    std::fs::remove_file(sb.path("m/gone.yaml")).unwrap();
    std::fs::remove_file(sb.path("m/kept.yaml")).unwrap();

    let diff = sb.run(&["diff", ms]);
    assert!(
        diff.stdout().contains("data-loss") || diff.stderr().contains("--allow-data-loss"),
        "the plan says deleting the rootfs loses data\n{}{}",
        diff.stdout(),
        diff.stderr()
    );
    let out = sb.run(&["apply", "--yes", ms]);
    assert_ne!(out.code(), 0, "prune without --allow-data-loss is refused");
    assert!(
        format!("{}{}", out.stdout(), out.stderr()).contains("--allow-data-loss"),
        "{}{}",
        out.stdout(),
        out.stderr()
    );
    assert!(gone.join("data.txt").exists(), "the rootfs survived");

    sb.run(&["apply", "--yes", "--allow-data-loss", ms])
        .expect_code(0);
    assert!(!gone.exists(), "the rootfs is deleted once confirmed");
    let snaps: Vec<PathBuf> = std::fs::read_dir(pool.join("rootfs/gone/snapshots"))
        .expect("safety snapshots kept")
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert!(
        snaps[0]
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("pre-"),
        "{snaps:?}"
    );
    assert_eq!(
        std::fs::read_to_string(snaps[0].join("data.txt")).unwrap(),
        "precious\n"
    );
    assert!(
        kept.join("bin/busybox").exists(),
        "deletionPolicy: Retain keeps the rootfs"
    );

    // `deletionPolicy: Delete` is the opt-in: pruned without --allow-data-loss.
    manifest(&sb, "optin", &tpl, "  deletionPolicy: Delete\n");
    sb.run(&["apply", "--yes", ms]).expect_code(0);
    let optin = sb.path("state/rootfs/optin/root");
    assert!(optin.join("bin/busybox").exists());
    std::fs::remove_file(sb.path("m/optin.yaml")).unwrap();
    sb.run(&["apply", "--yes", ms]).expect_code(0);
    assert!(!optin.exists(), "deletionPolicy: Delete deletes the rootfs");
}
