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

use qemu_util::{QemuSandbox, pool, wait_until};
use serde_json::Value;
use stead_e2e::{Sandbox, is_root, skip_unless};

const OWNER: &str = "stead:VirtualMachine/n1";

fn manifest(qs: &QemuSandbox) -> String {
    let text = format!(
        "{}---\napiVersion: stead.dev/v1alpha1\nkind: Network\nmetadata: {{name: lan0}}\n\
         spec: {{type: bridge, addresses: [10.236.0.1/24]}}\n\
         ---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: n1-disk}}\n\
         spec: {{pool: vms, size: 16Mi, format: qcow2, deletionPolicy: Delete}}\n\
         ---\napiVersion: stead.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: n1}}\n\
         spec:\n  engine: qemu\n  accel: tcg\n  firmware: bios\n  cpus: 1\n  memory: 64Mi\n  \
         disks: [{{volume: n1-disk}}]\n  interfaces: [{{network: lan0}}]\n  restartPolicy: always\n",
        pool(&qs.sb)
    );
    qs.set_manifest(&text)
}

fn status(qs: &QemuSandbox) -> Value {
    qs.runtime("n1")
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

/// Waits until QEMU runs with a pid other than `old`; returns it.
fn runs_again(qs: &QemuSandbox, old: i64) -> i64 {
    let mut pid = 0;
    wait_until("QEMU running again", Duration::from_secs(60), || {
        let st = status(qs);
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
    let qs = QemuSandbox::new();
    let sb = &qs.sb;
    let m = manifest(&qs);
    sb.run(&["apply", "--yes", &m]).expect_code(0);
    let st = status(&qs);
    let tap = st["taps"][0].as_str().expect("tap").to_string();
    let p1 = st["pid"].as_i64().expect("pid");
    assert!(link(sb, &tap).is_some_and(|l| l.contains(OWNER) && l.contains("master lan0")));
    let cmdline = std::fs::read(format!("/proc/{p1}/cmdline")).expect("cmdline");
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.contains("tap,id=net0,fd=5") && !cmdline.contains("ifname="),
        "{cmdline}"
    );

    // Deleted under a running QEMU: drift; apply makes it again and boots afresh.
    delete_link(sb, &tap);
    assert_eq!(status(&qs)["lostTaps"][0], tap.as_str());
    sb.run(&["diff", &m]).expect_code(2);
    sb.run(&["apply", "--yes", &m]).expect_code(0);
    let p2 = runs_again(&qs, p1);
    assert!(link(sb, &tap).is_some_and(|l| l.contains(OWNER)));
    sb.run(&["diff", &m]).expect_code(0);

    // Deleted, then QEMU killed: the supervisor's restarts never make the tap.
    delete_link(sb, &tap);
    stead_e2e::signal(p2 as i32, rustix::process::Signal::KILL);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        assert_eq!(link(sb, &tap), None, "a restarted QEMU made {tap}");
        std::thread::sleep(Duration::from_millis(50));
    }
    sb.run(&["apply", "--yes", &m]).expect_code(0);
    runs_again(&qs, p2);
    assert!(link(sb, &tap).is_some_and(|l| l.contains(OWNER)));

    sb.run(&["destroy", "--yes", "--allow-data-loss", &m])
        .expect_code(0);
    assert_eq!(link(sb, &tap), None, "destroy removes the tap");
}
