//! Issue 7 acceptance: `stead controller` following a git repository.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod controller_util;

use std::time::{Duration, Instant};

use controller_util::*;
use stead_e2e::Sandbox;

const MI: u64 = 1 << 20;
const TOKEN: &str = "e2e-webhook-token";

#[test]
fn git_commits_converge_webhook_invalid_and_revert() {
    let sb = Sandbox::new();
    let repo = Repo::new(&sb);
    let c1 = repo.commit(
        "one",
        &[(
            "hosts/h1/storage.yaml",
            &storage_yaml(&sb, &[("a", "1Mi"), ("b", "1Mi")]),
        )],
    );
    let tok = sb.write("token", &format!("{TOKEN}\n"));
    let source = format!("{}:hosts/h1", repo.source());
    let ctl = Controller::on_webhook(&sb, &source, &tok, &[]);
    // Commit 1 converges.
    ctl.expect(20, "commit 1 not applied", || size(&image(&sb, "b")) == MI);
    within!(ctl, 5, ctl.get("/readyz").0 == 200);
    let st = ctl.status();
    assert_eq!(st["revision"], c1.as_str(), "{st}");
    assert_eq!(st["lastResult"], "success", "{st}");
    assert_eq!(ctl.metric("stead_reconcile_total{result=\"success\"}"), 1.0);
    assert_eq!(
        ctl.metric("stead_resources{kind=\"Volume\",status=\"Ready\"}"),
        2.0
    );
    assert_eq!(
        ctl.metric(&format!("stead_source_revision_info{{revision=\"{c1}\"}}")),
        1.0
    );

    // The webhook needs the token.
    assert_eq!(ctl.hook("wrong"), 401);
    assert_eq!(
        http(ctl.port, "POST", "/hooks/git", &[], "{}").0,
        401,
        "no token"
    );

    // A burst of webhook calls collapses into few runs.
    let n0 = ctl.status()["reconciles"].as_u64().unwrap();
    for _ in 0..10 {
        assert_eq!(ctl.hook(TOKEN), 202);
    }
    within!(ctl, 5, ctl.status()["reconciles"].as_u64().unwrap() > n0);
    std::thread::sleep(Duration::from_millis(500));
    let runs = ctl.status()["reconciles"].as_u64().unwrap() - n0;
    eprintln!("10 webhook calls ran {runs} reconcile(s)");
    assert!(runs <= 3, "10 webhook calls ran {runs} reconciles");

    // A change is applied within 2 s of the webhook call.
    let c2 = repo.commit(
        "grow a, add c",
        &[(
            "hosts/h1/storage.yaml",
            &storage_yaml(&sb, &[("a", "2Mi"), ("b", "1Mi"), ("c", "1Mi")]),
        )],
    );
    let t = Instant::now();
    assert_eq!(ctl.hook(TOKEN), 202);
    let took = wait_until(Duration::from_secs(10), || {
        size(&image(&sb, "a")) == 2 * MI && size(&image(&sb, "c")) == MI
    });
    let took = took.unwrap_or_else(|| panic!("commit 2 not applied\n{}", ctl.logs()));
    eprintln!(
        "webhook to converged: {:?} (since webhook call {:?})",
        took,
        t.elapsed()
    );
    assert!(took < Duration::from_secs(2), "took {took:?}");
    ctl.expect_revision(5, &c2);
    assert_eq!(
        ctl.metric("stead_apply_changes_total{action=\"update\",kind=\"Volume\"}"),
        1.0
    );
    assert_eq!(
        ctl.metric("stead_apply_changes_total{action=\"create\",kind=\"Volume\"}"),
        3.0
    );

    // An invalid manifest: nothing of that revision is applied (b would grow), the
    // previous state stays and result="invalid" is counted.
    let mut bad = storage_yaml(&sb, &[("a", "2Mi"), ("b", "3Mi"), ("c", "1Mi")]);
    bad.push_str("---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {name: d}\nspec: {pool: local, size: 1Mi, colour: red}\n");
    let c3 = repo.commit("broken", &[("hosts/h1/storage.yaml", &bad)]);
    assert_eq!(ctl.hook(TOKEN), 202);
    ctl.expect(10, "invalid revision not reported", || {
        ctl.metric("stead_reconcile_total{result=\"invalid\"}") == 1.0
    });
    let st = ctl.status();
    assert_eq!(st["revision"], c2.as_str(), "last good stays applied: {st}");
    assert_eq!(st["headRevision"], c3.as_str(), "{st}");
    let err = st["headError"].as_str().unwrap_or_default();
    assert!(
        err.contains("invalid") && err.contains("storage.yaml") && err.contains("colour"),
        "{err}"
    );
    assert_eq!(
        size(&image(&sb, "b")),
        MI,
        "nothing of the invalid revision applied"
    );
    assert!(!image(&sb, "d").exists());
    assert_eq!(
        ctl.metric(&format!("stead_source_revision_info{{revision=\"{c2}\"}}")),
        1.0
    );
    // `stead get` asks the running controller.
    let out = sb.run(&["get", "volume", "-o", "json"]).expect_code(0);
    let v: serde_json::Value = serde_json::from_str(&out.stdout()).unwrap();
    assert_eq!(v["controller"]["revision"], c2.as_str(), "{v}");
    assert_eq!(
        v["items"][0]["status"]["conditions"][0]["type"], "Ready",
        "{v}"
    );
    let out = sb.run(&["get"]).expect_code(0);
    assert!(out.stdout().contains("invalid"), "{}", out.stdout());

    // Reverting the broken commit converges back (same content as commit 2: no changes).
    let c4 = repo.git_then_push(&["revert", "--no-edit", "HEAD"]);
    assert_eq!(ctl.hook(TOKEN), 202);
    ctl.expect(10, "revert not applied", || {
        ctl.status()["revision"] == c4.as_str()
    });
    let st = ctl.status();
    assert_eq!(st["lastResult"], "success", "{st}");
    assert!(st["headError"].is_null(), "{st}");
    assert_eq!(size(&image(&sb, "b")), MI);
    // Reverting commit 2's new volume removes it (deletionPolicy: Delete).
    let c5 = repo.commit(
        "drop c",
        &[(
            "hosts/h1/storage.yaml",
            &storage_yaml(&sb, &[("a", "2Mi"), ("b", "1Mi")]),
        )],
    );
    assert_eq!(ctl.hook(TOKEN), 202);
    ctl.expect(10, "prune not applied", || {
        !image(&sb, "c").exists() && ctl.status()["revision"] == c5.as_str()
    });
    assert_eq!(
        ctl.metric("stead_apply_changes_total{action=\"delete\",kind=\"Volume\"}"),
        1.0
    );
    // Old checkouts are cleaned: only the applied one (and the mirror) remain.
    let left: Vec<String> = std::fs::read_dir(sb.path("state/source"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.contains(&c5), "{left:?}");
    assert!(!left.contains(&c1) && !left.contains(&c3), "{left:?}");
}

#[test]
fn git_poll_applies_without_webhook() {
    let sb = Sandbox::new();
    let repo = Repo::new(&sb);
    repo.commit(
        "one",
        &[("storage.yaml", &storage_yaml(&sb, &[("a", "1Mi")]))],
    );
    let source = repo.source();
    let ctl = Controller::start(
        &sb,
        &["--source", &source, "--interval", "1s", "--resync", "1h"],
    );
    ctl.expect(20, "commit 1 not applied", || size(&image(&sb, "a")) == MI);
    // The webhook is disabled without a token.
    assert_eq!(ctl.hook("anything"), 404);
    repo.commit(
        "grow",
        &[("storage.yaml", &storage_yaml(&sb, &[("a", "4Mi")]))],
    );
    let took = wait_until(Duration::from_secs(10), || size(&image(&sb, "a")) == 4 * MI)
        .unwrap_or_else(|| panic!("not applied by polling\n{}", ctl.logs()));
    assert!(
        took < Duration::from_millis(3500),
        "poll interval 1s, took {took:?}"
    );
}

#[test]
fn restart_changes_nothing_and_sigterm_leaves_objects() {
    let sb = Sandbox::new();
    let repo = Repo::new(&sb);
    repo.commit(
        "one",
        &[(
            "storage.yaml",
            &storage_yaml(&sb, &[("a", "1Mi"), ("b", "1Mi")]),
        )],
    );
    let source = repo.source();
    let mut ctl = Controller::start(&sb, &["--source", &source, "--resync", "1h"]);
    within!(ctl, 20, size(&image(&sb, "b")) == MI);
    within!(ctl, 5, ctl.status()["lastResult"] == "success");
    // A second controller on the same state dir is refused.
    let out = sb
        .run(&[
            "controller",
            "--source",
            &source,
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .expect_code(1);
    assert!(
        out.stderr().contains("another stead controller"),
        "{}",
        out.stderr()
    );
    let mtime = std::fs::metadata(image(&sb, "a"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(ctl.stop(), Some(0), "clean exit on SIGTERM\n{}", ctl.logs());
    assert!(image(&sb, "a").exists() && image(&sb, "b").exists());
    assert!(!sb.path("run/controller.sock").exists(), "socket removed");

    let ctl = Controller::start(&sb, &["--source", &source, "--resync", "1h"]);
    within!(ctl, 20, ctl.status()["lastResult"] == "success");
    let scrape = ctl.scrape();
    assert!(
        !scrape
            .lines()
            .any(|l| l.starts_with("stead_apply_changes_total")),
        "no changes after a restart:\n{scrape}"
    );
    assert_eq!(
        std::fs::metadata(image(&sb, "a"))
            .unwrap()
            .modified()
            .unwrap(),
        mtime
    );
}

#[test]
fn restart_keeps_last_good_when_head_invalid_or_remote_gone() {
    let sb = Sandbox::new();
    let repo = Repo::new(&sb);
    let c1 = repo.commit(
        "one",
        &[("storage.yaml", &storage_yaml(&sb, &[("a", "1Mi")]))],
    );
    let source = repo.source();
    let mut ctl = Controller::start(&sb, &["--source", &source, "--resync", "1s"]);
    within!(ctl, 20, size(&image(&sb, "a")) == MI);
    assert_eq!(ctl.stop(), Some(0));

    // Restart with an invalid head: the last good revision is reloaded and still healed.
    repo.commit(
        "broken",
        &[(
            "storage.yaml",
            "apiVersion: stead.dev/v1alpha1\nkind: Volume\n",
        )],
    );
    let mut ctl = Controller::start(&sb, &["--source", &source, "--resync", "1s"]);
    ctl.expect_invalid(10, 1.0);
    ctl.expect_revision(10, &c1);
    std::fs::remove_file(image(&sb, "a")).unwrap();
    ctl.expect(
        10,
        "drift not healed against the last good revision",
        || size(&image(&sb, "a")) == MI,
    );
    assert_eq!(ctl.stop(), Some(0));

    // Restart with the remote gone: fetch errors are counted, drift is still healed.
    std::fs::rename(&repo.bare, sb.path("moved.git")).unwrap();
    let ctl = Controller::start(&sb, &["--source", &source, "--resync", "1s"]);
    ctl.expect_revision(10, &c1);
    assert!(ctl.metric("stead_source_fetch_errors_total") >= 1.0);
    assert!(ctl.status()["fetchError"].is_string());
    std::fs::remove_file(image(&sb, "a")).unwrap();
    ctl.expect(10, "drift not healed without the remote", || {
        size(&image(&sb, "a")) == MI
    });
}

/// `--allow-rewind`: a force-push back to an older commit is applied.
#[test]
fn allow_rewind_takes_a_force_pushed_older_commit() {
    let sb = Sandbox::new();
    let repo = Repo::new(&sb);
    let c1 = repo.commit(
        "one",
        &[("storage.yaml", &storage_yaml(&sb, &[("a", "1Mi")]))],
    );
    let c2 = repo.commit(
        "two",
        &[(
            "storage.yaml",
            &storage_yaml(&sb, &[("a", "1Mi"), ("b", "1Mi")]),
        )],
    );
    let tok = sb.write("token", TOKEN);
    let source = repo.source();
    let ctl = Controller::on_webhook(&sb, &source, &tok, &["--allow-rewind"]);
    ctl.expect_revision(20, &c2);
    assert_eq!(size(&image(&sb, "b")), MI);
    repo.force_push(&c1);
    assert_eq!(ctl.hook(TOKEN), 202);
    ctl.expect(10, "rewind not applied", || {
        ctl.status()["revision"] == c1.as_str() && !image(&sb, "b").exists()
    });
    assert_eq!(ctl.metric("stead_reconcile_total{result=\"invalid\"}"), 0.0);
}

/// A tree entry named `../x.yaml`, `a/b.yaml` or with a non-UTF-8 name refuses the whole
/// revision, naming the entry; the last good revision stays applied.
#[test]
fn tree_with_a_bad_entry_name_is_refused() {
    let sb = Sandbox::new();
    let repo = Repo::new(&sb);
    let yaml = storage_yaml(&sb, &[("a", "1Mi")]);
    let c1 = repo.commit("one", &[("storage.yaml", &yaml)]);
    let tok = sb.write("token", TOKEN);
    let source = repo.source();
    let ctl = Controller::on_webhook(&sb, &source, &tok, &[]);
    ctl.expect_revision(20, &c1);
    let grown = storage_yaml(&sb, &[("a", "1Mi"), ("b", "1Mi")]);
    let bad: [&[u8]; 3] = [b"../x.yaml", b"a/b.yaml", b"\xffx.yaml"];
    for (i, name) in bad.iter().enumerate() {
        let rev = repo.push_raw_tree(&[(name, &grown), (b"storage.yaml", &grown)]);
        assert_eq!(ctl.hook(TOKEN), 202);
        let want = (i + 1) as f64;
        ctl.expect_invalid(10, want);
        let st = ctl.status();
        assert_eq!(st["headRevision"], rev.as_str(), "{st}");
        assert_eq!(st["revision"], c1.as_str(), "{st}");
        let shown = format!("{:?}", String::from_utf8_lossy(name));
        let err = st["headError"].as_str().unwrap();
        assert!(
            err.contains(&shown) && err.contains("refused"),
            "{shown}: {st}"
        );
        assert!(
            !image(&sb, "b").exists(),
            "part of a refused revision applied"
        );
        assert!(!sb.path("state/source/x.yaml").exists());
        assert!(!sb.path("state/x.yaml").exists());
    }
}
