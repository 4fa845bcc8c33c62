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
