//! A qemu-engine VM's taps (guestless QEMU, TCG, in a sandbox netns): QEMU gets them as
//! descriptors its supervisor opened, never by name, so a deleted tap is never made again
//! unmarked; a deleted tap is drift that apply repairs (the tap made again, the VM booted
//! afresh).
//!
//! Needs root and QEMU; otherwise `SKIP`. Build the binary first: `cargo build --bin stead`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod qemu_util;

use std::process::Command;
use std::time::{Duration, Instant};

use qemu_util::KillNaming;
use serde_json::Value;
use stead_e2e::{Sandbox, is_root, skip_unless};

const OWNER: &str = "stead:VirtualMachine/n1";

fn manifest(sb: &Sandbox) -> String {
    let text = format!(
        "apiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: vms}}\n\
         spec: {{type: dir, path: {}, content: [images, rootdir]}}\n\
         ---\napiVersion: stead.dev/v1alpha1\nkind: Network\nmetadata: {{name: lan0}}\n\
         spec: {{type: bridge, addresses: [10.236.0.1/24]}}\n\
         ---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: n1-disk}}\n\
         spec: {{pool: vms, size: 16Mi, format: qcow2, deletionPolicy: Delete}}\n\
         ---\napiVersion: stead.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: n1}}\n\
         spec:\n  engine: qemu\n  accel: tcg\n  firmware: bios\n  cpus: 1\n  memory: 64Mi\n  \
         disks: [{{volume: n1-disk}}]\n  interfaces: [{{network: lan0}}]\n  restartPolicy: always\n",
        sb.path("pools/vms").display()
    );
    sb.write("m/all.yaml", &text);
    sb.path("m").to_string_lossy().into_owned()
}

fn status(sb: &Sandbox) -> Value {
    let out = sb.run(&["get", "vm/n1", "-o", "json"]).expect_code(0);
    let v: Value = serde_json::from_str(&out.stdout()).expect("json");
    v["items"][0]["status"]["runtime"].clone()
}

/// The `ip -o link` line of `name` in the sandbox netns, if the link exists.
fn link(sb: &Sandbox, name: &str) -> Option<String> {
    sb.links()
        .lines()
        .find(|l| l.split(':').nth(1).map(str::trim) == Some(name))
        .map(str::to_string)
}

fn delete_link(sb: &Sandbox, name: &str) {
    let ns = sb.netns.as_deref().expect("netns");
    let st = Command::new("ip")
        .args(["-n", ns, "link", "del", name])
        .status()
        .expect("ip");
    assert!(st.success(), "ip link del {name}");
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until QEMU runs with a pid other than `old`; returns it.
fn runs_again(sb: &Sandbox, old: i64) -> i64 {
    let mut pid = 0;
    wait_until("QEMU running again", Duration::from_secs(60), || {
        let st = status(sb);
        pid = st["pid"].as_i64().unwrap_or(0);
        st["vmState"] == "running" && pid != old && pid != 0
    });
    pid
}

#[test]
fn qemu_gets_its_taps_as_descriptors_and_a_deleted_tap_is_drift_apply_repairs() {
    const TEST: &str = "qemu_gets_its_taps_as_descriptors_and_a_deleted_tap_is_drift_apply_repairs";
    if skip_unless(is_root(), TEST, "needs root") || !stead_e2e::qemu_ok(TEST) {
        return;
    }
    let sb = Sandbox::with_netns();
    let _kill = KillNaming(sb.dir.path().to_string_lossy().into_owned());
    let m = manifest(&sb);
    sb.run(&["apply", "--yes", &m]).expect_code(0);
    let st = status(&sb);
    let tap = st["taps"][0].as_str().expect("tap").to_string();
    let p1 = st["pid"].as_i64().expect("pid");
    assert!(link(&sb, &tap).is_some_and(|l| l.contains(OWNER) && l.contains("master lan0")));
    let cmdline = std::fs::read(format!("/proc/{p1}/cmdline")).expect("cmdline");
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.contains("tap,id=net0,fd=5") && !cmdline.contains("ifname="),
        "{cmdline}"
    );

    // Deleted under a running QEMU: drift; apply makes it again and boots afresh.
    delete_link(&sb, &tap);
    assert_eq!(status(&sb)["lostTaps"][0], tap.as_str());
    sb.run(&["diff", &m]).expect_code(2);
    sb.run(&["apply", "--yes", &m]).expect_code(0);
    let p2 = runs_again(&sb, p1);
    assert!(link(&sb, &tap).is_some_and(|l| l.contains(OWNER)));
    sb.run(&["diff", &m]).expect_code(0);

    // Deleted, then QEMU killed: the supervisor's restarts never make the tap.
    delete_link(&sb, &tap);
    stead_e2e::signal(p2 as i32, rustix::process::Signal::KILL);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        assert_eq!(link(&sb, &tap), None, "a restarted QEMU made {tap}");
        std::thread::sleep(Duration::from_millis(50));
    }
    sb.run(&["apply", "--yes", &m]).expect_code(0);
    runs_again(&sb, p2);
    assert!(link(&sb, &tap).is_some_and(|l| l.contains(OWNER)));

    sb.run(&["destroy", "--yes", "--allow-data-loss", &m])
        .expect_code(0);
    assert_eq!(link(&sb, &tap), None, "destroy removes the tap");
}
