//! Issue 8 acceptance: isolated environments from one manifest set, TTL collection and a
//! teardown that leaves nothing behind.

use std::process::Command;

use stead_e2e::{Sandbox, is_root, skip_unless};

fn manifests(sb: &Sandbox) -> String {
    let text = format!(
        "apiVersion: stead.dev/v1alpha1
kind: StoragePool
metadata: {{name: p}}
spec: {{type: dir, path: {pool}}}
---
apiVersion: stead.dev/v1alpha1
kind: Volume
metadata: {{name: data}}
spec: {{pool: p, size: 8Mi}}
---
apiVersion: stead.dev/v1alpha1
kind: Network
metadata: {{name: lan0}}
spec:
  addresses: [10.99.0.1/24]
  forwards: [{{protocol: tcp, hostPort: 8080, to: \"10.99.0.10:80\"}}]
  nat: {{enabled: true}}
",
        pool = sb.path("pools/p").display()
    );
    sb.write("m/env.yaml", &text);
    sb.path("m").to_string_lossy().into_owned()
}

fn netns_has_addr(ns: &str, dev: &str, addr: &str) -> bool {
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "addr", "show", "dev", dev])
        .output()
        .expect("ip");
    String::from_utf8_lossy(&out.stdout).contains(addr)
}

fn netns_exists(ns: &str) -> bool {
    std::path::Path::new("/run/netns").join(ns).exists()
}

#[test]
fn two_environments_from_one_manifest_set_are_isolated() {
    if skip_unless(
        is_root(),
        "two_environments_from_one_manifest_set_are_isolated",
        "needs root",
    ) {
        return;
    }
    let sb = Sandbox::new();
    let m = manifests(&sb);
    let (a, b) = (
        format!("t{}a", std::process::id()),
        format!("t{}b", std::process::id()),
    );
    let out = sb.run(&["env", "up", &a, &m, "-o", "json"]).expect_code(0);
    let json_start = out.stdout().find("{\n").expect("json document");
    let v: serde_json::Value = serde_json::from_str(&out.stdout()[json_start..]).expect("json");
    assert_eq!(v["netns"], format!("stead-env-{a}"));
    assert_eq!(v["forwards"][0]["hostPort"], 8080);
    sb.run(&["env", "up", &b, &m]).expect_code(0);

    // Same bridge name and address in both, each in its own namespace.
    let (na, nb) = (format!("stead-env-{a}"), format!("stead-env-{b}"));
    assert!(netns_has_addr(&na, "lan0", "10.99.0.1/24"));
    assert!(netns_has_addr(&nb, "lan0", "10.99.0.1/24"));
    // Volumes in each environment's area of the pool.
    assert!(
        sb.path(&format!("pools/p/envs/{a}/images/data.raw"))
            .exists()
    );
    assert!(
        sb.path(&format!("pools/p/envs/{b}/images/data.raw"))
            .exists()
    );
    // a cannot reach b: give b's bridge a second address by hand; b reaches it, a
    // (same subnet, its own namespace) does not.
    let add = Command::new("ip")
        .args(["-n", &nb, "addr", "add", "10.99.0.2/24", "dev", "lan0"])
        .status()
        .expect("ip");
    assert!(add.success());
    let ping = |ns: &str| {
        Command::new("ip")
            .args(["netns", "exec", ns, "ping", "-c1", "-W1", "10.99.0.2"])
            .output()
            .expect("ping")
            .status
            .success()
    };
    assert!(ping(&nb), "the address answers inside its own environment");
    assert!(!ping(&na), "another environment cannot reach it");

    let list = sb.run(&["env", "list", "-o", "json"]).expect_code(0);
    let v: serde_json::Value = serde_json::from_str(&list.stdout()).expect("json");
    assert_eq!(v["items"].as_array().map(Vec::len), Some(2));
    assert!(v["items"][0]["resources"].as_u64().unwrap_or(0) >= 3);

    // Down a leaves b intact.
    let out = sb.run(&["env", "down", &a]).expect_code(0);
    assert!(
        out.stdout().contains("nothing left behind"),
        "{}",
        out.stdout()
    );
    assert!(!netns_exists(&na));
    assert!(!sb.path(&format!("pools/p/envs/{a}")).exists());
    assert!(netns_has_addr(&nb, "lan0", "10.99.0.1/24"));
    assert!(
        sb.path(&format!("pools/p/envs/{b}/images/data.raw"))
            .exists()
    );

    sb.run(&["env", "down", &b]).expect_code(0);
    assert!(!netns_exists(&nb));
    assert!(!sb.path("pools/p/envs").exists(), "pool areas removed");
    assert!(
        !sb.path("state/envs")
            .read_dir()
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
    );
    let nft = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .expect("nft");
    assert!(
        !String::from_utf8_lossy(&nft.stdout).contains(&a),
        "no nft leftovers in the host namespace"
    );
    // Down of an unknown environment is a clear error.
    let out = sb.run(&["env", "down", &a]).expect_code(1);
    assert!(
        out.stderr().contains("no environment named"),
        "{}",
        out.stderr()
    );
}

#[test]
fn expired_environment_is_collected_by_gc() {
    if skip_unless(
        is_root(),
        "expired_environment_is_collected_by_gc",
        "needs root",
    ) {
        return;
    }
    let sb = Sandbox::new();
    let m = manifests(&sb);
    let (c, d) = (
        format!("t{}c", std::process::id()),
        format!("t{}d", std::process::id()),
    );
    sb.run(&["env", "up", &c, &m, "--ttl", "1s"]).expect_code(0);
    sb.run(&["env", "up", &d, &m, "--ttl", "1h"]).expect_code(0);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    sb.run(&["env", "gc"]).expect_code(0);
    assert!(
        !netns_exists(&format!("stead-env-{c}")),
        "expired environment collected"
    );
    assert!(
        netns_exists(&format!("stead-env-{d}")),
        "live environment kept"
    );
    sb.run(&["env", "down", &d]).expect_code(0);
}

/// A tmpfs mounted at a path for the test, lazily unmounted on drop (even on failure).
struct TmpfsMount(std::path::PathBuf);

impl TmpfsMount {
    fn new(at: &std::path::Path) -> Self {
        std::fs::create_dir_all(at).expect("mkdir mount point");
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "stead-e2e"])
            .arg(at)
            .status()
            .expect("mount");
        assert!(st.success(), "mount tmpfs at {}", at.display());
        TmpfsMount(at.to_path_buf())
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn env_down_stops_at_a_mount_left_in_its_pool_area_and_keeps_its_files() {
    if skip_unless(
        is_root(),
        "env_down_stops_at_a_mount_left_in_its_pool_area_and_keeps_its_files",
        "needs root",
    ) {
        return;
    }
    let sb = Sandbox::new();
    let m = manifests(&sb);
    let e = format!("t{}m", std::process::id());
    sb.run(&["env", "up", &e, &m]).expect_code(0);
    let area = sb.path(&format!("pools/p/envs/{e}"));
    let mounted = TmpfsMount::new(&area.join("images/still-mounted"));
    std::fs::write(mounted.0.join("precious"), b"data").expect("write into tmpfs");

    let out = sb.run(&["env", "down", &e]).expect_code(1);
    assert!(
        out.stderr()
            .contains("still-mounted is a mount point inside it"),
        "{}",
        out.stderr()
    );
    assert!(
        out.stderr().contains("teardown incomplete"),
        "{}",
        out.stderr()
    );
    assert_eq!(
        std::fs::read(mounted.0.join("precious")).expect("the mounted files survive"),
        b"data"
    );
    assert!(
        sb.path(&format!("state/envs/{e}/env.json")).exists(),
        "record kept"
    );

    // Once unmounted, the next down finishes.
    drop(mounted);
    let out = sb.run(&["env", "down", &e]).expect_code(0);
    assert!(
        out.stdout().contains("nothing left behind"),
        "{}",
        out.stdout()
    );
    assert!(!area.exists());
}

fn owner_mark(p: &std::path::Path) -> Option<String> {
    let v = stead_host::xattr::get(p, "user.stead.owner").ok()??;
    Some(String::from_utf8_lossy(&v).into_owned())
}

fn set_owner_mark(p: &std::path::Path, mark: &str) {
    stead_host::xattr::set(p, "user.stead.owner", mark.as_bytes())
        .unwrap_or_else(|e| panic!("setxattr on {}: {e}", p.display()));
}

#[test]
fn env_marks_name_the_environment_and_down_keeps_a_volume_marked_for_the_host() {
    if skip_unless(
        is_root(),
        "env_marks_name_the_environment_and_down_keeps_a_volume_marked_for_the_host",
        "needs root",
    ) {
        return;
    }
    let sb = Sandbox::new();
    let m = manifests(&sb);
    let e = format!("t{}k", std::process::id());
    sb.run(&["env", "up", &e, &m]).expect_code(0);
    let disk = sb.path(&format!("pools/p/envs/{e}/images/data.raw"));
    assert_eq!(
        owner_mark(&disk).as_deref(),
        Some(format!("env/{e}/Volume/data").as_str()),
        "the mark names the environment"
    );

    // A volume carrying the host's own mark (as if adopted from production) is not the
    // environment's: down must neither delete it nor remove the area holding it.
    set_owner_mark(&disk, "Volume/data");
    let out = sb.run(&["env", "down", &e]).expect_code(1);
    assert!(
        out.stderr().contains("teardown incomplete"),
        "{}",
        out.stderr()
    );
    assert!(
        disk.exists(),
        "the host-marked volume survives\n{}",
        out.stderr()
    );
    assert_eq!(owner_mark(&disk).as_deref(), Some("Volume/data"));

    // Marked back as the environment's, the purge succeeds; a file stead does not
    // manage but marked for the host (a production image copied into the area) still
    // keeps the area: only what the environment's mark names is removed.
    set_owner_mark(&disk, &format!("env/{e}/Volume/data"));
    let prod = sb.path(&format!("pools/p/envs/{e}/images/prod.raw"));
    std::fs::write(&prod, b"production").expect("write");
    set_owner_mark(&prod, "Volume/prod");
    let out = sb.run(&["env", "down", &e]).expect_code(1);
    assert!(
        out.stderr()
            .contains("prod.raw is marked Volume/prod, not by environment"),
        "{}",
        out.stderr()
    );
    assert_eq!(std::fs::read(&prod).expect("survives"), b"production");

    std::fs::remove_file(&prod).expect("rm");
    let out = sb.run(&["env", "down", &e]).expect_code(0);
    assert!(
        out.stdout().contains("nothing left behind"),
        "{}",
        out.stdout()
    );
    assert!(!disk.exists());
}
