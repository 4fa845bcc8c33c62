//! Issue 16's figures: the tree page of 1,000 resources in headless Chromium (navigation
//! timing, and when the script has wired the page and drawn the edges), and the
//! controller's resident memory with the UI on. Printed; the bounds are loose.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod controller_util;
mod ui_util;

use std::time::Duration;

use controller_util::*;
use stead_e2e::Sandbox;
use stead_e2e::browser::Browser;
use ui_util::*;

const TEST: &str = "ui_tree_of_1000_resources_loads_fast";

#[test]
fn ui_tree_of_1000_resources_loads_fast() {
    let Some(b) = Browser::start(TEST) else {
        return;
    };
    let sb = Sandbox::new();
    let names: Vec<String> = (0..999).map(|i| format!("v{i:03}")).collect();
    let vols: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "64Ki")).collect();
    sb.write("m/all.yaml", &storage_yaml(&sb, &vols));
    let m = sb.path("m").display().to_string();
    let mut args: Vec<String> = vec!["--source".into(), m, "--resync".into(), "1h".into()];
    args.extend(ui_flags(&sb));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let ctl = Controller::start(&sb, &args);
    within!(ctl, 600, ctl.status()["lastResult"] == "success");
    let port = ctl.port;
    browser_login(&b, port, "ann");

    let mut runs = Vec::new();
    for _ in 0..3 {
        b.goto(&format!("http://127.0.0.1:{port}/resources"));
        b.wait(Duration::from_secs(30), |b| {
            b.js(
                "return document.documentElement.getAttribute('data-ui-ready') !== null;",
                vec![],
            ) == serde_json::json!(true)
        })
        .expect("the page never became ready");
        let t = b.js(
            "var n = performance.getEntriesByType('navigation')[0];
             return [n.responseEnd - n.startTime, n.domContentLoadedEventEnd - n.startTime,
                     n.loadEventEnd - n.startTime,
                     Number(document.documentElement.getAttribute('data-ui-ready')),
                     document.querySelectorAll('.node').length,
                     document.querySelectorAll('svg.edges path').length,
                     n.transferSize || n.encodedBodySize];",
            vec![],
        );
        runs.push(t);
    }
    b.screenshot("tree-1000");
    let rss = stead_host::process::Proc::host()
        .status_kib(ctl.child.id() as i32, "VmRSS")
        .unwrap_or(0);
    for t in &runs {
        eprintln!(
            "tree of 1000: response {:.0} ms, DOMContentLoaded {:.0} ms, load {:.0} ms, ready (script done, edges drawn) {} ms; {} nodes, {} edges, {} bytes",
            t[0].as_f64().unwrap_or(0.0),
            t[1].as_f64().unwrap_or(0.0),
            t[2].as_f64().unwrap_or(0.0),
            t[3],
            t[4],
            t[5],
            t[6]
        );
    }
    eprintln!("controller RSS with the UI on, 1000 resources, after the page loads: {rss} KiB");
    let last = runs.last().unwrap();
    assert_eq!(last[4], serde_json::json!(1000), "every node shown");
    assert_eq!(last[5], serde_json::json!(999), "every edge drawn");
    assert!(
        last[3].as_f64().unwrap_or(f64::MAX) < 10_000.0,
        "ready after {}",
        last[3]
    );
}
