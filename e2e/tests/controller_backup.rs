//! Issues 6 and 7: BackupSchedules applied by the controller run at their cron times (on
//! the controller's own schedule runner thread, the runner `stead backup daemon` builds)
//! and are pruned by retention.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod controller_util;

use std::time::Duration;

use controller_util::*;
use stead_e2e::Sandbox;

#[test]
fn controller_runs_backup_schedules() {
    let sb = Sandbox::new();
    let pool = sb.path("pools/p");
    let text = format!(
        "apiVersion: stead.dev/v1alpha1
kind: StoragePool
metadata: {{name: p}}
spec: {{type: dir, path: {}, content: [images, backup]}}
---
apiVersion: stead.dev/v1alpha1
kind: Volume
metadata: {{name: v, labels: {{backup: \"yes\"}}}}
spec: {{pool: p, size: 4Mi}}
---
apiVersion: stead.dev/v1alpha1
kind: BackupSchedule
metadata: {{name: every-minute}}
spec:
  schedule: \"* * * * *\"
  timezone: UTC
  targets: {{selector: {{matchLabels: {{backup: \"yes\"}}}}}}
  storage: p
  retention: {{keepLast: 1}}
",
        pool.display()
    );
    sb.write("m/all.yaml", &text);
    let m = sb.path("m");
    let ctl = Controller::start(&sb, &["--source", m.to_str().unwrap(), "--resync", "1s"]);
    // The first run happens at the next minute boundary.
    let listed = || {
        let out = sb.run(&[
            "backup",
            "list",
            "Volume/v",
            "--storage",
            pool.to_str().unwrap(),
            "-o",
            "json",
        ]);
        serde_json::from_str::<serde_json::Value>(&out.stdout())
            .ok()
            .and_then(|v| {
                v.as_array()
                    .map(Vec::len)
                    .or_else(|| v["backups"].as_array().map(Vec::len))
            })
            .unwrap_or(0)
    };
    assert!(
        wait_until(Duration::from_secs(90), || listed() >= 1).is_some(),
        "no scheduled backup within 90 s\n{}",
        ctl.logs()
    );
    let out = sb.run(&[
        "backup",
        "verify",
        "Volume/v",
        "--storage",
        pool.to_str().unwrap(),
    ]);
    assert_eq!(out.code(), 0, "{}{}", out.stdout(), out.stderr());
    // The schedule's state is exported (the housekeeping tick follows --resync 1s).
    let series = "stead_backup_last_success_timestamp_seconds{schedule=\"every-minute\"}";
    assert!(
        wait_until(Duration::from_secs(10), || ctl.metric(series) > 0.0).is_some(),
        "{}",
        ctl.scrape()
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(now - ctl.metric(series) < 120.0, "{}", ctl.scrape());
    assert!(
        ctl.scrape()
            .contains("stead_backup_last_run_failed{schedule=\"every-minute\"} 0")
    );
    // The schedules run inside the controller: no child process.
    assert!(
        ctl.logs().contains("backup schedules: runner started"),
        "{}",
        ctl.logs()
    );
    let daemon = std::process::Command::new("pgrep")
        .args(["-f", &format!("{} backup daemon", sb.cgroup_parent)])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&daemon.stdout).trim().is_empty(),
        "no backup daemon child process"
    );
    drop(ctl);
}
