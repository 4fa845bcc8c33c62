//! Issue 7: a failing resource backs off per resource; the rest converges; fixing the
//! cause converges it (on the next retry or at once on a new revision).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod controller_util;

use std::time::Duration;

use controller_util::*;
use stead_e2e::Sandbox;

const MI: u64 = 1 << 20;

#[test]
fn failing_resource_backs_off_and_blocks_only_its_dependents() {
    let sb = Sandbox::new();
    let seed = sb.path("seed.img");
    let mut text = storage_yaml(&sb, &[("a", "1Mi")]);
    text.push_str(&format!(
        "---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: bad}}\nspec: {{pool: local, size: 1Mi, deletionPolicy: Delete, source: {{file: {}}}}}\n",
        seed.display()
    ));
    text.push_str("---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {name: after}\nspec: {pool: local, size: 1Mi, deletionPolicy: Delete, dependsOn: [Volume/bad]}\n");
    sb.write("m/all.yaml", &text);
    let m = sb.path("m");
    let ctl = Controller::start(&sb, &["--source", m.to_str().unwrap(), "--resync", "500ms"]);
    within!(ctl, 20, size(&image(&sb, "a")) == MI);
    within!(
        ctl,
        10,
        ctl.metric("stead_reconcile_total{result=\"failed\"}") >= 1.0,
    );
    // Backoff: over ~3 s of 500 ms resyncs the driver is tried two or three times: the
    // n-th retry waits a random time in [d/2, d] for d = 2 s·2^(n-1), so the tries come at
    // 0 s, 1–2 s and 3–6 s (both draws at their minimum put the third at 3.0 s: seen once).
    std::thread::sleep(Duration::from_secs(3));
    let tries = ctl.metric("stead_apply_failures_total{kind=\"Volume\"}");
    let runs = ctl.status()["reconciles"].as_u64().unwrap();
    assert!(runs >= 5, "resyncs ran: {runs}");
    // `bad` fails and `after` is skipped with it: without backoff that would be two
    // failures per reconcile; with it, two per try.
    assert!(
        (2.0..=6.0).contains(&tries) && tries < 2.0 * runs as f64,
        "{tries} tries in {runs} reconciles\n{}",
        ctl.logs()
    );
    let st = ctl.status();
    let find = |n: &str| {
        st["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == n)
            .cloned()
            .unwrap()
    };
    assert_eq!(find("a")["status"], "Ready", "{st}");
    let bad = find("bad");
    assert_eq!(bad["status"], "Failed", "{st}");
    let reason = bad["conditions"][0]["reason"].as_str().unwrap();
    assert!(reason == "Backoff" || reason == "ApplyFailed", "{bad}");
    assert!(
        bad["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("seed.img"),
        "{bad}"
    );
    let after = find("after");
    assert_eq!(after["status"], "Failed", "{st}");
    assert_eq!(
        after["conditions"][0]["reason"], "DependencyNotReady",
        "{after}"
    );
    assert!(!image(&sb, "after").exists());
    assert_eq!(
        ctl.metric("stead_resources{kind=\"Volume\",status=\"Failed\"}"),
        2.0
    );
    // `stead get` lists the resources the controller could not create yet.
    let out = sb.run(&["get"]).expect_code(0);
    assert!(
        out.stdout().contains("bad") && out.stdout().contains("Failed"),
        "{}",
        out.stdout()
    );

    // Fix the cause: the next retry creates it, then its dependent.
    std::fs::write(&seed, vec![7u8; 4096]).unwrap();
    within!(
        ctl,
        15,
        image(&sb, "after").exists() && image(&sb, "bad").exists(),
    );
    within!(ctl, 5, ctl.status()["lastResult"] == "success");
}

/// A terminal error (here `Unsupported`: this host has no device-mapper, so an lvmthin
/// pool cannot work) is not retried while the manifest and the host stay the same: the
/// resource is `Failed` with the class as its reason, in the status, in `stead get` and
/// in `stead_resource_failed`. A new spec releases the hold at once.
#[test]
fn terminal_error_is_held_until_the_manifest_changes() {
    let sb = Sandbox::new();
    let pool = sb.path("p");
    let lvm = format!(
        "apiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: thin}}\nspec: {{type: lvmthin, path: {}, lvm: {{volumeGroup: steadtestvg, thinPool: tp}}}}\n",
        pool.display()
    );
    sb.write("m/p.yaml", &lvm);
    let m = sb.path("m");
    let ctl = Controller::start(&sb, &["--source", m.to_str().unwrap(), "--resync", "300ms"]);
    let series = "stead_apply_failures_total{kind=\"StoragePool\"}";
    within!(ctl, 20, ctl.metric(series) >= 1.0);
    // Held: many resyncs, no second try (a transient error would retry after 1–2 s).
    assert!(
        ctl.wait_reconciles(8, Duration::from_secs(20)),
        "{}",
        ctl.logs()
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(ctl.metric(series), 1.0, "tried once\n{}", ctl.logs());
    let st = ctl.status();
    let r = &st["resources"][0];
    assert_eq!(r["status"], "Failed", "{st}");
    assert_eq!(r["conditions"][0]["reason"], "Unsupported", "{st}");
    assert!(
        r["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("not retried until the manifest or the host changes"),
        "{st}"
    );
    assert_eq!(
        ctl.metric(
            "stead_resource_failed{kind=\"StoragePool\",name=\"thin\",reason=\"Unsupported\"}"
        ),
        1.0
    );
    let out = sb.run(&["get"]).expect_code(0);
    assert!(
        out.stdout().contains("Failed") && out.stdout().contains("Unsupported"),
        "{}",
        out.stdout()
    );

    // A new spec releases the hold: the pool converges.
    sb.write(
        "m/p.yaml",
        &format!(
            "apiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: thin}}\nspec: {{type: dir, path: {}}}\n",
            pool.display()
        ),
    );
    within!(ctl, 20, ctl.status()["lastResult"] == "success");
    assert!(
        !ctl.scrape().contains("stead_resource_failed{"),
        "{}",
        ctl.scrape()
    );
}
