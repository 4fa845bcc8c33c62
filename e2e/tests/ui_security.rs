//! Issue 16: the web UI refuses what it must (no session, no CSRF token, the wrong role)
//! and shows each resource's status in the tree; screenshots of the login, overview and
//! tree pages; axe-core on each page.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod controller_util;
mod ui_util;

use std::time::Duration;

use controller_util::*;
use serde_json::json;
use stead_e2e::Sandbox;
use stead_e2e::browser::Browser;
use ui_util::*;

const TEST: &str = "ui_refuses_without_session_or_csrf_and_shows_the_tree";

fn start(sb: &Sandbox) -> Controller {
    sb.write(
        "m/all.yaml",
        &storage_yaml(sb, &[("a", "1Mi"), ("b", "2Mi")]),
    );
    let m = sb.path("m").display().to_string();
    let mut args: Vec<String> = vec!["--source".into(), m, "--resync".into(), "1s".into()];
    args.extend(ui_flags(sb));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Controller::start(sb, &args)
}

#[test]
fn ui_refuses_without_session_or_csrf_and_shows_the_tree() {
    let sb = Sandbox::new();
    let ctl = start(&sb);
    within!(ctl, 20, ctl.status()["lastResult"] == "success");
    let port = ctl.port;

    // No credentials: the API says 401, a page sends the browser to the login.
    let a = request(port, "GET", "/api/v1/overview", &[], "");
    assert_eq!(a.status, 401, "{a:?}");
    let a = request(port, "GET", "/resources?kind=Volume", &[], "");
    assert_eq!(a.status, 303, "{a:?}");
    assert_eq!(
        a.header("location"),
        Some("/login?next=%2Fresources%3Fkind%3DVolume")
    );
    let a = request(port, "GET", "/login", &[], "");
    assert_eq!(a.status, 200);
    let csp = a.header("content-security-policy").unwrap_or("");
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert!(
        !a.body.contains("<script>") && !a.body.contains("style="),
        "{}",
        a.body
    );
    // A wrong bearer token is nobody.
    let a = request(
        port,
        "GET",
        "/api/v1/overview",
        &[("Authorization", "Bearer wrong-token-0123456789")],
        "",
    );
    assert_eq!(a.status, 401);

    // Actions from a session need its CSRF token; from a viewer, the operator role.
    let (cookie, csrf) = api_login(port, "ann");
    let post = |headers: &[(&str, &str)]| {
        request(port, "POST", "/api/v1/actions/sync", headers, "{}").status
    };
    assert_eq!(post(&[("Cookie", &cookie)]), 403, "no CSRF token");
    assert_eq!(
        post(&[("Cookie", &cookie), ("X-CSRF-Token", "not-the-token")]),
        403,
        "wrong CSRF token"
    );
    assert_eq!(
        post(&[
            ("Cookie", &cookie),
            ("X-CSRF-Token", &csrf),
            ("Origin", "http://evil.example")
        ]),
        403,
        "cross-origin"
    );
    assert_eq!(post(&[("Cookie", &cookie), ("X-CSRF-Token", &csrf)]), 202);
    let (vcookie, vcsrf) = api_login(port, "vic");
    assert_eq!(
        post(&[("Cookie", &vcookie), ("X-CSRF-Token", &vcsrf)]),
        403,
        "viewer"
    );
    // The page's logout form needs the token too.
    let a = request(
        port,
        "POST",
        "/logout",
        &[
            ("Cookie", &cookie),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        "csrf=nope",
    );
    assert_eq!(a.status, 403, "{a:?}");
    let page = request(port, "GET", "/", &[("Cookie", &cookie)], "");
    assert_eq!(page.status, 200, "still logged in: {page:?}");
    // The stylesheet and the script: from the page's links, cached for good.
    for ext in ["css", "js"] {
        let href = page
            .body
            .split('"')
            .find(|p| p.starts_with("/assets/ui.") && p.ends_with(ext))
            .unwrap_or_else(|| panic!("no {ext} link in {}", page.body))
            .to_string();
        let a = request(port, "GET", &href, &[("Cookie", &cookie)], "");
        assert_eq!(a.status, 200, "{href}");
        assert_eq!(
            a.header("cache-control"),
            Some("public, max-age=31536000, immutable")
        );
        assert!(
            a.header("content-type").unwrap_or("").starts_with("text/"),
            "{a:?}"
        );
    }
    // A viewer gets no action buttons.
    let vpage = request(port, "GET", "/", &[("Cookie", &vcookie)], "");
    assert_eq!(vpage.status, 200);
    assert!(!vpage.body.contains("data-action"), "{}", vpage.body);
    assert!(page.body.contains("data-action=\"/api/v1/actions/sync\""));
    // The console's websocket: operators only, and only from this server's pages.
    let ws = |extra: &[(&str, &str)]| {
        let mut h = vec![
            ("Connection", "Upgrade, close"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ];
        h.extend_from_slice(extra);
        request(port, "GET", "/console/vm/vm1/ws", &h, "").status
    };
    let origin = format!("http://127.0.0.1:{port}");
    assert_eq!(ws(&[("Origin", &origin)]), 401);
    assert_eq!(
        ws(&[("Cookie", &vcookie), ("Origin", &origin)]),
        403,
        "viewer"
    );
    assert_eq!(ws(&[("Cookie", &cookie)]), 403, "no Origin");
    assert_eq!(
        ws(&[("Cookie", &cookie), ("Origin", "http://evil.example")]),
        403,
        "other origin"
    );

    // In the browser.
    let Some(b) = Browser::start(TEST) else {
        return;
    };
    b.goto(&format!("http://127.0.0.1:{port}/resources"));
    b.wait_css("form.login", Duration::from_secs(10));
    b.screenshot("login");
    axe_check(&b, TEST, "login");
    browser_login(&b, port, "ann");
    b.wait_text("#sync-state", "Synced", Duration::from_secs(15));
    b.screenshot("overview");
    axe_check(&b, TEST, "overview");
    // Sync now: a confirmation, then the answer next to the button.
    b.click("form[data-action='/api/v1/actions/sync'] button");
    b.accept_alert();
    b.wait_text(".action-result", "accepted", Duration::from_secs(10));

    b.goto(&format!("http://127.0.0.1:{port}/resources"));
    for id in ["StoragePool/local", "Volume/a", "Volume/b"] {
        let sel = format!(".node[data-id=\"{id}\"] .st");
        b.wait_text(&sel, "Ready", Duration::from_secs(10));
    }
    assert_eq!(b.texts(".node").len(), 3, "{}", b.source());
    // Volumes depend on the pool: one level to its right.
    let level = |id: &str| {
        b.js(
            "return arguments[0] ? document.querySelector('.node[data-id=\"' + arguments[0] + '\"]').closest('.level').querySelector('h2').textContent : '';",
            vec![json!(id)],
        )
    };
    assert_eq!(level("StoragePool/local"), json!("Level 0"));
    assert_eq!(level("Volume/a"), json!("Level 1"));
    assert!(
        b.js(
            "return document.querySelectorAll('svg.edges path').length;",
            vec![]
        ) == json!(2),
        "two edges drawn"
    );
    b.screenshot("tree");
    axe_check(&b, TEST, "tree");
    // Filters: by name in place, and by the form (no script needed) on the server.
    b.type_into("form.filters input[name=name]", "b");
    b.wait(Duration::from_secs(5), |b| {
        b.js(
            "return document.querySelectorAll('.node:not(.hidden)').length;",
            vec![],
        ) == json!(1)
    })
    .expect("name filter hides the others");
    b.goto(&format!(
        "http://127.0.0.1:{port}/resources?kind=StoragePool"
    ));
    assert_eq!(b.texts(".node").len(), 1);

    b.goto(&format!("http://127.0.0.1:{port}/resources/Volume/a"));
    b.wait_text("h1", "Volume / a", Duration::from_secs(10));
    b.screenshot("detail-volume");
    axe_check(&b, TEST, "detail");
    b.goto(&format!("http://127.0.0.1:{port}/events"));
    b.wait_text("h1", "Events", Duration::from_secs(10));
    axe_check(&b, TEST, "events");
    b.goto(&format!("http://127.0.0.1:{port}/pending"));
    b.wait_text("h1", "Pending change", Duration::from_secs(10));
    axe_check(&b, TEST, "pending");

    // From the page: an action without the CSRF header is refused, with it accepted.
    let status = |with_token: bool| {
        b.js(
            "var x = new XMLHttpRequest();
             x.open('POST', '/api/v1/actions/sync', false);
             x.setRequestHeader('Content-Type', 'application/json');
             if (arguments[0]) { x.setRequestHeader('X-CSRF-Token', document.querySelector('meta[name=csrf-token]').content); }
             x.send('{}');
             return x.status;",
            vec![json!(with_token)],
        )
    };
    assert_eq!(status(false), json!(403));
    assert_eq!(status(true), json!(202));

    // Logging out ends the session: the next page is the login again.
    b.click("form.logout button");
    b.wait_css("form.login", Duration::from_secs(10));
    b.goto(&format!("http://127.0.0.1:{port}/pending"));
    b.wait_css("form.login", Duration::from_secs(10));
}
