//! Issue 7 acceptance: the controller heals (or reports) drift within one resync.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod controller_util;

use std::process::Command;
use std::time::Duration;

use controller_util::*;
use stead_e2e::{Sandbox, is_root, skip_unless};

const MI: u64 = 1 << 20;

fn bridge_yaml() -> &'static str {
    "---\napiVersion: stead.dev/v1alpha1\nkind: Network\nmetadata: {name: ctlbr0}\nspec: {type: bridge, mtu: 1400, addresses: [10.77.0.1/24]}\n"
}

fn link_exists(ns: &str, name: &str) -> bool {
    Command::new("ip")
        .args(["-n", ns, "link", "show", name])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn drift_heal_restores_volume_and_bridge() {
    if skip_unless(
        is_root(),
        "drift_heal_restores_volume_and_bridge",
        "needs root for a network namespace",
    ) {
        return;
    }
    let sb = Sandbox::with_netns();
    let ns = sb.netns.clone().unwrap();
    let mut text = storage_yaml(&sb, &[("a", "1Mi"), ("b", "1Mi")]);
    text.push_str(bridge_yaml());
    sb.write("m/all.yaml", &text);
    let m = sb.path("m");
    let ctl = Controller::start(&sb, &["--source", m.to_str().unwrap(), "--resync", "1s"]);
    ctl.expect(20, "not converged", || {
        size(&image(&sb, "b")) == MI && link_exists(&ns, "ctlbr0")
    });
    within!(ctl, 5, ctl.status()["lastResult"] == "success");

    // Delete a managed volume file by hand: restored within one resync (1 s ± 10 %).
    std::fs::remove_file(image(&sb, "a")).unwrap();
    let took = wait_until(Duration::from_secs(10), || size(&image(&sb, "a")) == MI)
        .unwrap_or_else(|| panic!("volume not restored\n{}", ctl.logs()));
    assert!(took < Duration::from_millis(2500), "took {took:?}");
    assert!(
        wait_until(Duration::from_secs(5), || ctl
            .metric("stead_drift_detected_total{kind=\"Volume\"}")
            == 1.0)
        .is_some(),
        "{}",
        ctl.scrape()
    );

    // Delete the managed bridge in the sandbox's netns: restored, counted.
    let st = Command::new("ip")
        .args(["-n", &ns, "link", "del", "ctlbr0"])
        .status()
        .unwrap();
    assert!(st.success());
    let took = wait_until(Duration::from_secs(10), || link_exists(&ns, "ctlbr0"))
        .unwrap_or_else(|| panic!("bridge not restored\n{}", ctl.logs()));
    assert!(took < Duration::from_millis(2500), "took {took:?}");
    let out = Command::new("ip")
        .args(["-n", &ns, "addr", "show", "ctlbr0"])
        .output()
        .unwrap();
    let addrs = String::from_utf8_lossy(&out.stdout);
    assert!(
        addrs.contains("10.77.0.1/24") && addrs.contains("mtu 1400"),
        "{addrs}"
    );
    assert!(
        wait_until(Duration::from_secs(5), || ctl
            .metric("stead_drift_detected_total{kind=\"Network\"}")
            == 1.0)
        .is_some(),
        "{}",
        ctl.scrape()
    );
    // A changed field (MTU) is drift too.
    let st = Command::new("ip")
        .args(["-n", &ns, "link", "set", "ctlbr0", "mtu", "1300"])
        .status()
        .unwrap();
    assert!(st.success());
    assert!(
        wait_until(Duration::from_secs(10), || {
            let o = Command::new("ip")
                .args(["-n", &ns, "link", "show", "ctlbr0"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).contains("mtu 1400")
        })
        .is_some(),
        "mtu not healed\n{}",
        ctl.logs()
    );
    assert!(ctl.metric("stead_drift_detected_total{kind=\"Network\"}") >= 2.0);
}

#[test]
fn drift_report_mode_only_reports() {
    let sb = Sandbox::new();
    let ctl = Controller::on_volume_a(&sb, "1s", &["--drift", "report"]);
    within!(ctl, 20, size(&image(&sb, "a")) == MI);
    std::fs::remove_file(image(&sb, "a")).unwrap();
    within!(
        ctl,
        10,
        ctl.metric("stead_drift_detected_total{kind=\"Volume\"}") == 1.0,
    );
    // Several resyncs later: still missing, counted once, reported as Drifted.
    assert!(ctl.wait_reconciles(3, Duration::from_secs(10)));
    assert!(!image(&sb, "a").exists(), "report mode must not heal");
    assert_eq!(
        ctl.metric("stead_drift_detected_total{kind=\"Volume\"}"),
        1.0
    );
    assert_eq!(
        ctl.metric("stead_resources{kind=\"Volume\",status=\"Drifted\"}"),
        1.0
    );
    let st = ctl.status();
    let vol = st["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "a")
        .cloned()
        .unwrap();
    assert_eq!(vol["status"], "Drifted", "{st}");
    assert!(
        vol["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("missing"),
        "{vol}"
    );
}
