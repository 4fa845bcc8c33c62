//! Issue 16, the API half: `stead controller --ui` on a git source with manual sync.
//! A pushed commit is fetched (webhook) and shown as the pending plan without being
//! applied; `POST /api/v1/actions/sync` applies it; every step is in the event log (and
//! its JSONL file); nothing under /api/v1 answers without credentials.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod controller_util;

use std::time::{Duration, Instant};

use controller_util::*;
use stead_e2e::Sandbox;

const MI: u64 = 1 << 20;
const HOOK: &str = "e2e-webhook-token";
const UI: &str = "e2e-ui-token-0123456789";

fn api(c: &Controller, method: &str, path: &str) -> (u16, serde_json::Value) {
    let auth = format!("Bearer {UI}");
    let (code, body) = http(c.port, method, path, &[("Authorization", &auth)], "");
    let json = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
    (code, json)
}

#[test]
fn manual_sync_shows_the_pending_plan_until_sync_now() {
    let sb = Sandbox::new();
    let repo = Repo::new(&sb);
    let c1 = repo.commit(
        "one volume",
        &[("storage.yaml", &storage_yaml(&sb, &[("a", "1Mi")]))],
    );
    let hook = sb.write("hook-token", &format!("{HOOK}\n"));
    let ui = sb.write("ui-token", &format!("{UI}\n"));
    let ctl = Controller::on_webhook(
        &sb,
        &repo.source(),
        &hook,
        &[
            "--sync",
            "manual",
            "--ui",
            "--ui-token-file",
            ui.to_str().unwrap(),
        ],
    );
    // The first revision on a fresh state dir is applied at once.
    ctl.expect_revision(20, &c1);
    ctl.expect(10, "overview not synced", || {
        let (code, o) = api(&ctl, "GET", "/api/v1/overview");
        code == 200 && o["sync"]["state"] == "Synced"
    });
    let (_, o) = api(&ctl, "GET", "/api/v1/overview");
    assert_eq!(o["total"], 2, "{o}");
    assert_eq!(o["applied"]["id"], c1.as_str(), "{o}");
    assert_eq!(o["applied"]["message"], "one volume", "{o}");
    assert_eq!(o["sync"]["syncMode"], "manual", "{o}");

    // Without credentials: 401 everywhere.
    for p in ["/api/v1/overview", "/api/v1/resources", "/api/v1/pending"] {
        assert_eq!(http(ctl.port, "GET", p, &[], "").0, 401, "{p}");
    }
    assert_eq!(
        http(ctl.port, "POST", "/api/v1/actions/sync", &[], "").0,
        401
    );

    // A new commit is fetched and planned, not applied.
    let c2 = repo.commit(
        "grow a",
        &[("storage.yaml", &storage_yaml(&sb, &[("a", "2Mi")]))],
    );
    assert_eq!(ctl.hook(HOOK), 202);
    ctl.expect(20, "the head is not pending", || {
        let (_, p) = api(&ctl, "GET", "/api/v1/pending");
        p["target"]["id"] == c2.as_str()
    });
    let (_, p) = api(&ctl, "GET", "/api/v1/pending");
    let ch = &p["changes"][0];
    assert_eq!(ch["id"], "Volume/a", "{p}");
    assert_eq!(ch["state"], "waiting-for-sync", "{p}");
    assert!(ch["impact"].is_string(), "{p}");
    assert!(
        p["text"].as_str().unwrap().contains("Volume/a"),
        "plan text: {p}"
    );
    assert_eq!(size(&image(&sb, "a")), MI, "not applied before the sync");
    assert_eq!(ctl.status()["revision"], c1.as_str());
    let (_, o) = api(&ctl, "GET", "/api/v1/overview");
    assert_eq!(o["sync"]["state"], "OutOfSync", "{o}");
    assert_eq!(o["head"]["id"], c2.as_str(), "{o}");
    assert_eq!(o["head"]["message"], "grow a", "{o}");
    assert!(
        o["head"]["author"].as_str().is_some_and(|a| !a.is_empty()),
        "{o}"
    );
    assert_eq!(o["applied"]["id"], c1.as_str(), "{o}");

    // Sync now applies it, and says so in the events.
    let t0 = Instant::now();
    let (code, a) = api(&ctl, "POST", "/api/v1/actions/sync");
    assert_eq!(code, 202, "{a}");
    ctl.expect_revision(20, &c2);
    let took = t0.elapsed();
    assert_eq!(size(&image(&sb, "a")), 2 * MI);
    ctl.expect(10, "pending plan not emptied", || {
        let (_, p) = api(&ctl, "GET", "/api/v1/pending");
        p["changes"].as_array().is_some_and(|c| c.is_empty()) && p["target"]["id"] == c2.as_str()
    });
    let (_, ev) = api(&ctl, "GET", "/api/v1/events");
    let reasons: Vec<&str> = ev
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["reason"].as_str())
        .collect();
    assert!(reasons.contains(&"SyncNow"), "{reasons:?}");
    assert!(reasons.contains(&"Updated"), "{reasons:?}");
    assert!(reasons.contains(&"Revision"), "{reasons:?}");
    let file = std::fs::read_to_string(ctl.run_dir.join("controller-events.jsonl")).unwrap();
    assert!(file.contains("\"SyncNow\""), "{file}");
    let (_, d) = api(&ctl, "GET", "/api/v1/resources/Volume/a");
    assert_eq!(d["resource"]["status"], "Ready", "{d}");
    assert!(d["events"].as_array().is_some_and(|e| !e.is_empty()), "{d}");
    eprintln!("sync now to applied: {} ms", took.as_millis());
    assert!(took < Duration::from_secs(20));
}

/// Reads SSE lines from `r` until `want` holds for the text so far or `secs` pass.
fn read_sse_until(
    r: &mut impl std::io::BufRead,
    secs: u64,
    mut want: impl FnMut(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut got = String::new();
    while !want(&got) && Instant::now() < deadline {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => got.push_str(&line),
            Err(_) => continue,
        }
    }
    got
}

/// The resident set of process `pid` in KiB (`VmRSS` of its status file).
fn rss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(stead_host::ProcFs::host().pid_file(pid, "status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

#[test]
fn drift_is_pushed_on_the_stream_and_repaired() {
    use std::io::Write;
    let sb = Sandbox::new();
    sb.write("m/all.yaml", &storage_yaml(&sb, &[("a", "1Mi")]));
    let ui = sb.write("ui-token", &format!("{UI}\n"));
    let m = sb.path("m");
    let ctl = Controller::start(
        &sb,
        &[
            "--source",
            m.to_str().unwrap(),
            "--resync",
            "1s",
            "--ui",
            "--ui-token-file",
            ui.to_str().unwrap(),
        ],
    );
    ctl.expect(20, "not converged", || size(&image(&sb, "a")) == MI);
    ctl.expect(10, "no tree yet", || {
        let (_, t) = api(&ctl, "GET", "/api/v1/resources");
        t["total"] == 2
    });

    let mut c = std::net::TcpStream::connect(("127.0.0.1", ctl.port)).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    write!(
        c,
        "GET /api/v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {UI}\r\n\r\n"
    )
    .unwrap();
    let mut r = std::io::BufReader::new(c);
    let hello = read_sse_until(&mut r, 10, |t| t.contains("event: hello"));
    assert!(hello.contains("event: hello"), "{hello}");

    // Delete the volume's file behind stead's back.
    let t0 = Instant::now();
    std::fs::remove_file(image(&sb, "a")).unwrap();
    let got = read_sse_until(&mut r, 15, |t| t.contains("\"kind\":\"drift\""));
    let drift_at = t0.elapsed();
    assert!(
        got.contains("\"resource\":\"Volume/a\""),
        "{got}\n{}",
        ctl.logs()
    );
    let got = read_sse_until(&mut r, 15, |t| t.contains("drift-repaired"));
    assert!(got.contains("drift-repaired"), "{got}");
    assert_eq!(size(&image(&sb, "a")), MI);
    let (_, d) = api(&ctl, "GET", "/api/v1/resources/Volume/a");
    // The drift of the last reconcile is gone once the next resync runs; the events stay.
    assert_eq!(d["resource"]["drifted"], false, "{d}");
    let kinds: Vec<&str> = d["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert!(
        kinds.contains(&"drift") && kinds.contains(&"drift-repaired"),
        "{d}"
    );
    let rss = rss_kib(ctl.child.id()).unwrap_or(0);
    eprintln!(
        "drift to SSE event: {} ms (resync 1 s); controller RSS with the UI on: {} KiB",
        drift_at.as_millis(),
        rss
    );
    assert!(drift_at < Duration::from_secs(5), "{drift_at:?}");
}

/// Waits for an event with `reason` (newest 50) and returns it.
fn wait_event(c: &Controller, secs: u64, reason: &str) -> serde_json::Value {
    let mut found = serde_json::Value::Null;
    c.expect(secs, &format!("no {reason} event"), || {
        let (_, ev) = api(c, "GET", "/api/v1/events?limit=50");
        if let Some(e) = ev
            .as_array()
            .and_then(|a| a.iter().find(|e| e["reason"] == reason))
        {
            found = e.clone();
            return true;
        }
        false
    });
    found
}

#[test]
fn backup_now_and_verify_show_in_the_volume_detail() {
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
metadata: {{name: nightly}}
spec:
  schedule: \"0 3 * * *\"
  timezone: UTC
  targets: {{selector: {{matchLabels: {{backup: \"yes\"}}}}}}
  storage: p
  retention: {{keepLast: 3}}
",
        pool.display()
    );
    sb.write("m/all.yaml", &text);
    let ui = sb.write("ui-token", &format!("{UI}\n"));
    let m = sb.path("m");
    let ctl = Controller::start(
        &sb,
        &[
            "--source",
            m.to_str().unwrap(),
            "--ui",
            "--ui-token-file",
            ui.to_str().unwrap(),
        ],
    );
    ctl.expect(20, "not converged", || {
        let (_, o) = api(&ctl, "GET", "/api/v1/overview");
        o["total"] == 3 && o["sync"]["state"] == "Synced"
    });
    let auth = format!("Bearer {UI}");
    let post = |path: &str, body: &str| {
        http(
            ctl.port,
            "POST",
            path,
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            body,
        )
    };
    let target = r#"{"resource":"BackupSchedule/nightly"}"#;
    assert_eq!(post("/api/v1/actions/backup", target).0, 202);
    let done = wait_event(&ctl, 60, "BackupNowDone");
    assert_eq!(done["user"], "token", "{done}");
    let (_, d) = api(&ctl, "GET", "/api/v1/resources/Volume/v");
    let b = &d["backups"][0];
    assert!(b["id"].as_str().unwrap().starts_with("Volume/v/"), "{d}");
    assert_eq!(b["storage"], "p", "{d}");
    assert_eq!(b["bytes"], 4 * MI, "{d}");
    assert!(b["verified"].is_null(), "{d}");

    assert_eq!(post("/api/v1/actions/verify", target).0, 202);
    wait_event(&ctl, 60, "VerifyBackupDone");
    let (_, d) = api(&ctl, "GET", "/api/v1/resources/Volume/v");
    assert_eq!(d["backups"][0]["verified"]["ok"], true, "{d}");
    // A volume is not a workload, a schedule is not restarted.
    assert_eq!(post("/api/v1/actions/restart", target).0, 400);
}

/// Destroys what the manifests own when the test ends (stops the container).
struct Destroy<'a>(&'a Sandbox, std::path::PathBuf);

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
fn restart_action_stops_the_container_and_the_reconcile_starts_it() {
    const TEST: &str = "restart_action_stops_the_container_and_the_reconcile_starts_it";
    if !stead_e2e::busybox_ok(TEST) {
        return;
    }
    let sb = Sandbox::new();
    let root = sb.busybox_rootfs();
    let text = format!(
        "apiVersion: stead.dev/v1alpha1\nkind: Container\nmetadata: {{name: busy}}\nspec:\n  rootfs: {{path: {}}}\n  unprivileged: false\n  env: {{API_TOKEN: hunter2}}\n  command: [/bin/sh, -c, \"sleep 100000\"]\n",
        root.display()
    );
    sb.write("m/ct.yaml", &text);
    let m = sb.path("m");
    let _destroy = Destroy(&sb, m.clone());
    let ui = sb.write("ui-token", &format!("{UI}\n"));
    // A long resync: only the action's own reconcile can start the container again.
    let ctl = Controller::start(
        &sb,
        &[
            "--source",
            m.to_str().unwrap(),
            "--resync",
            "1h",
            "--ui",
            "--ui-token-file",
            ui.to_str().unwrap(),
        ],
    );
    let pid = |c: &Controller| {
        let (_, d) = api(c, "GET", "/api/v1/resources/Container/busy");
        d["observed"]["status"]["pid"].as_u64()
    };
    ctl.expect(30, "container not running", || pid(&ctl).is_some());
    let first = pid(&ctl).unwrap();
    let (_, d) = api(&ctl, "GET", "/api/v1/resources/Container/busy");
    assert!(!d.to_string().contains("hunter2"), "{d}");
    assert_eq!(d["desired"]["env"]["API_TOKEN"], "<redacted>", "{d}");

    let auth = format!("Bearer {UI}");
    let (code, body) = http(
        ctl.port,
        "POST",
        "/api/v1/actions/restart",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        r#"{"resource":"Container/busy"}"#,
    );
    assert_eq!(code, 202, "{body}");
    let done = wait_event(&ctl, 60, "RestartDone");
    assert_eq!(done["resource"], "Container/busy", "{done}");
    ctl.expect(30, "container not started again", || {
        pid(&ctl).is_some_and(|p| p != first)
    });
    let (_, ev) = api(&ctl, "GET", "/api/v1/events?resource=Container/busy");
    assert!(ev.to_string().contains("\"Restart\""), "{ev}");
}
