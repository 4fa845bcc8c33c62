//! Issue 7: workload usage metrics, and SIGTERM leaves workloads running; a restarted
//! controller finds them and changes nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod controller_util;

use std::path::{Path, PathBuf};
use std::time::Duration;

use controller_util::*;
use stead_e2e::{Sandbox, busybox_ok};

const TEST: &str = "workload_metrics_and_sigterm_leaves_container_running";

/// Destroys what the manifests own when the test ends (stops the container).
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

#[test]
fn workload_metrics_and_sigterm_leaves_container_running() {
    if !busybox_ok(TEST) {
        return;
    }
    let sb = Sandbox::new();
    let root = sb.busybox_rootfs();
    let text = format!(
        "apiVersion: stead.dev/v1alpha1\nkind: Container\nmetadata: {{name: busy}}\nspec:\n  rootfs: {{path: {}}}\n  unprivileged: false\n  command: [/bin/sh, -c, \"i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done; sleep 100000\"]\n",
        root.display()
    );
    sb.write("m/ct.yaml", &text);
    let m = sb.path("m");
    let _destroy = Destroy(&sb, m.clone());
    let mut ctl = Controller::start(&sb, &["--source", m.to_str().unwrap(), "--resync", "1s"]);
    let series = "stead_workload_cpu_seconds_total{kind=\"Container\",name=\"busy\"}";
    let mem = "stead_workload_memory_bytes{kind=\"Container\",name=\"busy\"}";
    assert!(
        wait_until(Duration::from_secs(30), || ctl.metric(series) > 0.05
            && ctl.metric(mem) > 0.0)
        .is_some(),
        "no workload usage\n{}\n{}",
        ctl.scrape(),
        ctl.logs()
    );
    let out = sb
        .run(&["get", "container/busy", "-o", "json"])
        .expect_code(0);
    let v: serde_json::Value = serde_json::from_str(&out.stdout()).unwrap();
    let pid = v["items"][0]["status"]["runtime"]["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no pid: {v}"));
    assert_eq!(ctl.stop(), Some(0), "{}", ctl.logs());
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the container must survive the controller"
    );

    let ctl = Controller::start(&sb, &["--source", m.to_str().unwrap(), "--resync", "1s"]);
    within!(ctl, 20, ctl.status()["lastResult"] == "success");
    assert!(
        !ctl.scrape()
            .lines()
            .any(|l| l.starts_with("stead_apply_changes_total")),
        "a restarted controller changes nothing\n{}",
        ctl.logs()
    );
    let out = sb
        .run(&["get", "container/busy", "-o", "json"])
        .expect_code(0);
    let v: serde_json::Value = serde_json::from_str(&out.stdout()).unwrap();
    assert_eq!(
        v["items"][0]["status"]["runtime"]["pid"].as_u64(),
        Some(pid),
        "{v}"
    );
}
