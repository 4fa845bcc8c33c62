//! Issue 7 acceptance: the scrape passes `promtool check metrics`, and a real Prometheus
//! server scrapes the controller; a directory source is followed through file-system
//! events; health endpoints.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod controller_util;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use controller_util::*;
use stead_e2e::{Sandbox, skip_unless};

const MI: u64 = 1 << 20;

#[test]
fn scrape_passes_promtool_check_metrics() {
    let have = Command::new("promtool").arg("--version").output().is_ok();
    if skip_unless(
        have,
        "scrape_passes_promtool_check_metrics",
        "promtool not installed (apt install prometheus)",
    ) {
        return;
    }
    let sb = Sandbox::new();
    let ctl = Controller::on_volume_a(&sb, "1s", &[]);
    within!(ctl, 20, size(&image(&sb, "a")) == MI);
    // Some activity: drift, an invalid revision.
    std::fs::remove_file(image(&sb, "a")).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || ctl
            .metric("stead_drift_detected_total{kind=\"Volume\"}")
            == 1.0)
        .is_some()
    );
    sb.write("m/bad.yaml", "apiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {name: x}\nspec: {pool: nowhere, size: 1Mi}\n");
    ctl.expect_invalid(10, 1.0);

    let (code, scrape) = ctl.get("/metrics");
    assert_eq!(code, 200);
    for name in [
        "stead_reconcile_duration_seconds_bucket",
        "stead_reconcile_total",
        "stead_resources",
        "stead_drift_detected_total",
        "stead_apply_changes_total",
        "stead_source_revision_info",
        "stead_source_fetch_errors_total",
        "stead_last_successful_reconcile_timestamp_seconds",
    ] {
        assert!(scrape.contains(name), "{name} missing:\n{scrape}");
    }
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- scrape\n{scrape}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().is_empty()
            && String::from_utf8_lossy(&out.stderr).trim().is_empty(),
        "promtool lint findings: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Issue 7 acceptance, the full form: a real Prometheus server (Debian package) scrapes
/// the controller on loopback, and `promtool query instant` returns the reconcile metric.
/// The chart's alert rules pass `promtool check rules` and load into that server.
#[test]
fn prometheus_scrapes_the_controller() {
    let name = "prometheus_scrapes_the_controller";
    let have = Command::new("prometheus").arg("--version").output().is_ok()
        && Command::new("promtool").arg("--version").output().is_ok();
    if skip_unless(
        have,
        name,
        "prometheus not installed (apt install prometheus)",
    ) {
        return;
    }
    let sb = Sandbox::new();
    let ctl = Controller::on_volume_a(&sb, "1s", &[]);
    within!(ctl, 20, size(&image(&sb, "a")) == MI);
    let rules = std::path::Path::new(
        &std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("../charts/stead/rules/alerts.yaml");
    let out = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let port = free_port();
    let cfg = sb.write(
        "prometheus.yml",
        &format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             rule_files: ['{}']\n\
             scrape_configs:\n  - job_name: stead\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
            rules.display(),
            ctl.port
        ),
    );
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let log = std::fs::File::create(sb.path("prometheus.log")).unwrap();
    let _prom = Kill(
        Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                sb.path("prometheus-data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let server = format!("http://127.0.0.1:{port}");
    let mut last = String::new();
    let found = wait_until(Duration::from_secs(60), || {
        let out = Command::new("promtool")
            .args([
                "query",
                "instant",
                &server,
                "stead_reconcile_total{job=\"stead\",result=\"success\"}",
            ])
            .output()
            .unwrap();
        last = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // e.g. `stead_reconcile_total{instance="127.0.0.1:…", job="stead", result="success"} => 3 @[…]`
        out.status.success()
            && last
                .split("=> ")
                .nth(1)
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(|v| v >= 1.0)
    });
    assert!(
        found.is_some(),
        "promtool query instant never returned the reconcile metric: {last}\n--- prometheus log\n{}",
        std::fs::read_to_string(sb.path("prometheus.log")).unwrap_or_default()
    );
    eprintln!("promtool query instant: {}", last.trim());
    let (code, body) = http(port, "GET", "/api/v1/rules", &[], "");
    assert_eq!(code, 200, "{body}");
    for alert in [
        "SteadBackupStale",
        "SteadBackupFailed",
        "SteadReconcileStale",
    ] {
        assert!(body.contains(alert), "{alert} not loaded: {body}");
    }
}

#[test]
fn directory_source_follows_file_changes() {
    let sb = Sandbox::new();
    let ctl = Controller::on_volume_a(&sb, "1h", &[]);
    within!(ctl, 20, size(&image(&sb, "a")) == MI);
    within!(ctl, 5, ctl.get("/readyz").0 == 200);
    let n = ctl.status()["reconciles"].as_u64().unwrap();

    // A burst of writes collapses into few runs and is applied about a second later.
    let t = Instant::now();
    for size in ["2Mi", "3Mi", "4Mi", "5Mi", "6Mi"] {
        sb.write(
            "m/all.yaml",
            &storage_yaml(&sb, &[("a", size), ("b", "1Mi")]),
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = wait_until(Duration::from_secs(10), || {
        size(&image(&sb, "a")) == 6 * MI && size(&image(&sb, "b")) == MI
    })
    .unwrap_or_else(|| panic!("change not applied\n{}", ctl.logs()));
    eprintln!("directory change to converged: {:?}", t.elapsed());
    assert!(took < Duration::from_secs(2), "took {took:?}");
    std::thread::sleep(Duration::from_millis(500));
    let runs = ctl.status()["reconciles"].as_u64().unwrap() - n;
    assert!(runs <= 2, "a burst of 5 writes ran {runs} reconciles");
    assert_eq!(
        ctl.metric("stead_apply_changes_total{action=\"update\",kind=\"Volume\"}"),
        1.0
    );

    // The status socket also takes a reconcile request.
    let mut s = std::os::unix::net::UnixStream::connect(sb.path("run/controller.sock")).unwrap();
    let n1 = ctl.status()["reconciles"].as_u64().unwrap();
    s.write_all(b"reconcile\n").unwrap();
    within!(ctl, 5, ctl.status()["reconciles"].as_u64().unwrap() > n1);

    // `stead get` text output names the controller and the resources.
    let out = sb.run(&["get"]).expect_code(0);
    assert!(
        out.stdout().contains("Controller:") && out.stdout().contains("Volume"),
        "{}",
        out.stdout()
    );
}
