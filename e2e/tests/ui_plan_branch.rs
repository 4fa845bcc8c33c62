//! `--plan-branch`: the head of a second branch of the git source is planned against the
//! host and shown beside the pending change (API and page), impact-labelled, and never
//! applied; a new commit on the branch is planned again. (And the cluster page of a
//! host that joined no cluster says so.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod controller_util;
mod ui_util;

use std::time::Duration;

use controller_util::*;
use stead_e2e::browser::Browser;
use stead_e2e::{Sandbox, is_root};
use ui_util::*;

const TEST: &str = "ui_plan_branch_is_planned_and_never_applied";

fn pending(port: u16) -> serde_json::Value {
    let auth = format!("Bearer {TOKEN}");
    let a = request(
        port,
        "GET",
        "/api/v1/pending",
        &[("Authorization", &auth)],
        "",
    );
    assert_eq!(a.status, 200, "{a:?}");
    serde_json::from_str(&a.body).unwrap()
}

#[test]
fn ui_plan_branch_is_planned_and_never_applied() {
    if !is_root() {
        eprintln!("SKIP {TEST}: needs root");
        println!("SKIP {TEST}: needs root");
        return;
    }
    let sb = Sandbox::new();
    let repo = Repo::new(&sb);
    let c1 = repo.commit(
        "one volume",
        &[("all.yaml", &storage_yaml(&sb, &[("a", "16Mi")]))],
    );
    // The branch: grows `a`, adds `b`.
    git(&repo.work, &["checkout", "-q", "-b", "preview"]);
    std::fs::write(
        repo.work.join("all.yaml"),
        storage_yaml(&sb, &[("a", "32Mi"), ("b", "16Mi")]),
    )
    .unwrap();
    git(&repo.work, &["commit", "-q", "-am", "grow a, add b"]);
    git(&repo.work, &["push", "-q", "origin", "preview"]);
    let b1 = git_out(&repo.work, &["rev-parse", "HEAD"])
        .trim()
        .to_string();

    let mut args: Vec<String> = [
        "--source",
        &repo.source(),
        "--interval",
        "1s",
        "--resync",
        "1s",
        "--plan-branch",
        "preview",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(ui_flags(&sb));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let ctl = Controller::start(&sb, &args);
    ctl.expect_revision(30, &c1);
    within!(
        ctl,
        30,
        pending(ctl.port)["branch"]["target"]["id"] == b1.as_str()
    );
    let p = pending(ctl.port);
    let branch = &p["branch"];
    assert_eq!(branch["branch"], "preview");
    let changes = branch["changes"].as_array().unwrap();
    let find = |id: &str| {
        changes
            .iter()
            .find(|c| c["id"] == id)
            .unwrap_or_else(|| panic!("no {id} in {branch:#}"))
    };
    assert_eq!(find("Volume/b")["action"], "create", "{branch:#}");
    assert_eq!(find("Volume/b")["state"], "plan-only");
    let grow = find("Volume/a");
    assert!(grow["impact"].is_string(), "impact-labelled: {grow:#}");
    assert!(
        grow["fields"].to_string().contains("size"),
        "the size changes: {grow:#}"
    );
    assert!(branch["maxImpact"].is_string(), "{branch:#}");
    assert!(branch["text"].as_str().unwrap().contains("Volume/b"));
    // The main plan has nothing pending and the branch is not applied.
    assert_eq!(p["changes"].as_array().map(Vec::len), Some(0), "{p:#}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(ctl.status()["revision"], c1.as_str());
    assert!(
        !image(&sb, "b").exists(),
        "Volume/b was created from the plan-only branch"
    );
    assert_eq!(size(&image(&sb, "a")), 16 << 20, "Volume/a was grown");

    // The page shows it beside the pending change.
    let auth = format!("Bearer {TOKEN}");
    let page = request(ctl.port, "GET", "/pending", &[("Authorization", &auth)], "");
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains("Plan-only branch preview"),
        "{}",
        page.body
    );
    assert!(page.body.contains("id=\"branch-plan\""));
    // Volume/a exists and has a page; Volume/b is only on the branch: plain text.
    assert!(
        page.body
            .contains("<a href=\"/resources/Volume/a\">Volume/a</a>"),
        "{}",
        page.body
    );
    assert!(
        !page.body.contains("href=\"/resources/Volume/b\""),
        "{}",
        page.body
    );
    let b_page = request(
        ctl.port,
        "GET",
        "/resources/Volume/b",
        &[("Authorization", &auth)],
        "",
    );
    assert_eq!(b_page.status, 404, "the branch-only volume has no page");
    // Not a node of a cluster: no Cluster entry in the navigation.
    assert!(!page.body.contains("href=\"/cluster\""), "{}", page.body);

    // This host joined no cluster: the cluster page and API say so.
    let c = request(
        ctl.port,
        "GET",
        "/api/v1/cluster",
        &[("Authorization", &auth)],
        "",
    );
    assert_eq!(c.status, 200, "{c:?}");
    let c: serde_json::Value = serde_json::from_str(&c.body).unwrap();
    assert_eq!(c["cluster"], false, "{c:#}");
    assert!(
        c["notice"]
            .as_str()
            .unwrap()
            .contains("not a node of a cluster")
    );
    let page = request(ctl.port, "GET", "/cluster", &[("Authorization", &auth)], "");
    assert!(page.body.contains("id=\"cluster-notice\""), "{}", page.body);

    // In a browser: the branch's section and the cluster page pass axe-core.
    if let Some(b) = Browser::start(TEST) {
        browser_login(&b, ctl.port, "ann");
        b.goto(&format!("http://127.0.0.1:{}/pending", ctl.port));
        b.wait_css("#branch-plan", Duration::from_secs(10));
        assert_eq!(
            b.text("#branch-max-impact .badge").as_deref(),
            branch["maxImpact"].as_str()
        );
        b.screenshot("pending-branch");
        axe_check(&b, TEST, "pending with a plan-only branch");
        b.goto(&format!("http://127.0.0.1:{}/cluster", ctl.port));
        b.wait_css("#cluster-notice", Duration::from_secs(10));
        b.screenshot("cluster");
        axe_check(&b, TEST, "cluster");
    }

    // A new commit on the branch is planned again.
    std::fs::write(
        repo.work.join("all.yaml"),
        storage_yaml(&sb, &[("a", "16Mi"), ("c", "16Mi")]),
    )
    .unwrap();
    git(&repo.work, &["commit", "-q", "-am", "add c instead"]);
    git(&repo.work, &["push", "-q", "origin", "preview"]);
    let b2 = git_out(&repo.work, &["rev-parse", "HEAD"])
        .trim()
        .to_string();
    within!(
        ctl,
        30,
        pending(ctl.port)["branch"]["target"]["id"] == b2.as_str()
    );
    let text = pending(ctl.port)["branch"]["text"].to_string();
    assert!(
        text.contains("Volume/c") && !text.contains("Volume/b"),
        "{text}"
    );
    assert_eq!(ctl.status()["revision"], c1.as_str());
}
