//! The pages served on loopback from the read model's test fixture: the login redirect,
//! every page for a session and for the bearer token, no secret on any page, the logout
//! form's CSRF check, 404s.

use crate::testserve::{SECRETS, TOKEN, request, serve, ui_shared};

/// Logs `user` in with the form, as a browser does: the session cookie.
fn form_login(port: u16, user: &str) -> String {
    let r = request(
        port,
        "POST",
        "/api/v1/login",
        &[("content-type", "application/x-www-form-urlencoded")],
        &format!("username={user}&password=pw-{user}&next=%2Fpending"),
    );
    assert_eq!(r.code, 303, "{}", r.body);
    assert_eq!(r.header("location"), Some("/pending"));
    let set = r.header("set-cookie").expect("set-cookie");
    set.split(';').next().expect("cookie").to_string()
}

const PAGES: [&str; 9] = [
    "/",
    "/resources",
    "/resources?kind=container&status=Failed&name=w",
    "/resources/Container/web",
    "/pending",
    "/events",
    "/console/Container/web",
    "/screen/VirtualMachine/vm1",
    "/cluster",
];

#[test]
fn pages_need_a_session_and_redirect_to_the_login() {
    let s = serve(ui_shared());
    for p in PAGES {
        let r = request(s.port, "GET", p, &[], "");
        assert_eq!(r.code, 303, "{p}");
        let to = r.header("location").unwrap_or("");
        assert!(to.starts_with("/login?next=%2F"), "{p}: {to}");
    }
    let r = request(s.port, "GET", "/login?next=%2Fpending", &[], "");
    assert_eq!(r.code, 200);
    assert!(
        r.body.contains("name=\"next\" value=\"/pending\""),
        "{}",
        r.body
    );
    assert!(r.header("content-security-policy").is_some());
    // A foreign `next` is not carried into the form.
    let r = request(
        s.port,
        "GET",
        "/login?next=https%3A%2F%2Fevil.example",
        &[],
        "",
    );
    assert!(r.body.contains("name=\"next\" value=\"/\""), "{}", r.body);
}

#[test]
fn every_page_renders_for_a_session_and_the_token_without_secrets() {
    let s = serve(ui_shared());
    let cookie = form_login(s.port, "ann");
    let auth = format!("Bearer {TOKEN}");
    for p in PAGES {
        for h in [
            ("cookie", cookie.as_str()),
            ("authorization", auth.as_str()),
        ] {
            let r = request(s.port, "GET", p, &[h], "");
            assert_eq!(r.code, 200, "{p} with {}: {}", h.0, r.body);
            assert!(r.body.starts_with("<!doctype html>"), "{p}");
            assert_eq!(
                r.header("content-type"),
                Some("text/html; charset=utf-8"),
                "{p}"
            );
            for secret in SECRETS {
                assert!(!r.body.contains(secret), "{p} shows {secret}: {}", r.body);
            }
        }
    }
    let d = request(
        s.port,
        "GET",
        "/resources/Container/web",
        &[("cookie", &cookie)],
        "",
    );
    assert!(d.body.contains("DB_PASSWORD"), "the name is shown");
    assert!(d.body.contains("&lt;redacted&gt;"), "{}", d.body);
    assert!(d.body.contains("data-action=\"/api/v1/actions/restart\""));
}

#[test]
fn a_viewer_sees_no_actions() {
    let s = serve(ui_shared());
    let cookie = form_login(s.port, "vic");
    for p in ["/", "/resources/Container/web"] {
        let r = request(s.port, "GET", p, &[("cookie", &cookie)], "");
        assert_eq!(r.code, 200);
        assert!(!r.body.contains("data-action"), "{p}: {}", r.body);
    }
}

#[test]
fn unknown_resources_and_consoles_are_404() {
    let s = serve(ui_shared());
    let cookie = form_login(s.port, "ann");
    for p in [
        "/resources/Container/nope",
        "/resources/Nokind/x",
        "/console/Volume/data",
        "/assets/other.txt",
        "/assets/novnc.0123456789ab/core/nope.js",
        "/assets/vendor.0123456789ab/core/rfb.js",
    ] {
        let r = request(s.port, "GET", p, &[("cookie", &cookie)], "");
        assert_eq!(r.code, 404, "{p}");
    }
}

#[test]
fn the_logout_form_needs_the_csrf_token() {
    let s = serve(ui_shared());
    let cookie = form_login(s.port, "ann");
    let page = request(s.port, "GET", "/", &[("cookie", &cookie)], "");
    let csrf = page
        .body
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("csrf field")
        .to_string();
    let form = [
        ("cookie", cookie.as_str()),
        ("content-type", "application/x-www-form-urlencoded"),
    ];
    let r = request(s.port, "POST", "/logout", &form, "csrf=wrong");
    assert_eq!(r.code, 403);
    assert_eq!(
        request(s.port, "GET", "/", &[("cookie", &cookie)], "").code,
        200
    );
    let r = request(s.port, "POST", "/logout", &form, &format!("csrf={csrf}"));
    assert_eq!(r.code, 303);
    assert!(r.header("set-cookie").unwrap_or("").contains("Max-Age=0"));
    assert_eq!(
        request(s.port, "GET", "/", &[("cookie", &cookie)], "").code,
        303
    );
}

#[test]
fn vendored_scripts_are_served_under_their_hash() {
    let s = serve(ui_shared());
    let rfb = super::assets::novnc_rfb_url();
    let inflate = rfb.replace("core/rfb.js", "vendor/pako/lib/zlib/inflate.js");
    for url in [
        super::assets::xterm_js_url(),
        super::assets::xterm_css_url(),
        &rfb,
        &inflate,
    ] {
        let r = request(s.port, "GET", url, &[], "");
        assert_eq!(r.code, 200, "{url}");
        assert!(
            r.header("cache-control")
                .unwrap_or("")
                .contains("immutable"),
            "{url}"
        );
    }
    let stale = request(
        s.port,
        "GET",
        "/assets/novnc.000000000000/core/rfb.js",
        &[],
        "",
    );
    assert_eq!(stale.code, 200);
    assert_eq!(stale.header("cache-control"), Some("no-cache"));
    let cookie = form_login(s.port, "ann");
    let console = request(
        s.port,
        "GET",
        "/console/Container/web",
        &[("cookie", &cookie)],
        "",
    );
    assert!(
        console.body.contains(super::assets::xterm_js_url()),
        "{}",
        console.body
    );
    assert!(console.body.contains("<noscript>"));
    let screen = request(
        s.port,
        "GET",
        "/screen/VirtualMachine/vm1",
        &[("cookie", &cookie)],
        "",
    );
    assert!(
        screen.body.contains(&format!("data-rfb=\"{rfb}\"")),
        "{}",
        screen.body
    );
    assert!(
        screen
            .body
            .contains("data-ws=\"/screen/VirtualMachine/vm1/ws\"")
    );
}

/// Housekeeping of a node of a cluster (nothing else).
struct ClusterNodeHk;

impl crate::Housekeeping for ClusterNodeHk {
    fn environments(&self) -> Vec<crate::env::EnvRecord> {
        Vec::new()
    }
    fn collect_expired(&self) -> Result<(), crate::HousekeepingError> {
        Ok(())
    }
    fn run_backup_schedules(&self, _: &crate::StopSignal) -> Result<(), crate::HousekeepingError> {
        Ok(())
    }
    fn is_cluster_node(&self) -> bool {
        true
    }
}

#[test]
fn the_cluster_entry_is_offered_on_a_cluster_node_only() {
    let auth = format!("Bearer {TOKEN}");
    let single = serve(ui_shared());
    for p in PAGES {
        let r = request(single.port, "GET", p, &[("authorization", &auth)], "");
        assert_eq!(r.code, 200, "{p}");
        assert!(!r.body.contains("href=\"/cluster\""), "{p}: {}", r.body);
    }
    // The page itself still answers, with its notice.
    let r = request(
        single.port,
        "GET",
        "/cluster",
        &[("authorization", &auth)],
        "",
    );
    assert!(r.body.contains("not a node of a cluster"), "{}", r.body);
    let cfg = crate::auth::UiConfig::new(Some(TOKEN.into()), vec![]).expect("cfg");
    let node = serve(crate::tests::shared_with(
        None,
        Some(cfg),
        Some(std::sync::Arc::new(ClusterNodeHk)),
    ));
    let r = request(node.port, "GET", "/", &[("authorization", &auth)], "");
    assert!(
        r.body.contains("<a href=\"/cluster\">Cluster</a>"),
        "{}",
        r.body
    );
}

#[test]
fn branch_only_resources_are_plain_text_on_the_pending_page() {
    use crate::view::tests::{change, plan_with, snapshot};
    use stead_reconciler::plan::Action;
    let shared = ui_shared();
    let mut snap = snapshot();
    snap.branch = Some((
        "preview".into(),
        crate::view::RevisionInfo::bare(&"c".repeat(40)),
        plan_with(vec![
            change("Volume/fresh", Action::Create, vec![], false),
            change("Container/web", Action::Delete, vec![], false),
        ]),
    ));
    *shared.snapshot.write().expect("snapshot") = Some(std::sync::Arc::new(snap));
    let s = serve(shared);
    let auth = format!("Bearer {TOKEN}");
    let r = request(s.port, "GET", "/pending", &[("authorization", &auth)], "");
    assert_eq!(r.code, 200, "{}", r.body);
    let branch = r
        .body
        .split("id=\"branch-plan\"")
        .nth(1)
        .expect("branch section");
    assert!(
        !branch.contains("href=\"/resources/Volume/fresh\""),
        "{branch}"
    );
    assert!(branch.contains(">Volume/fresh</span>"), "{branch}");
    assert!(
        branch.contains("<a href=\"/resources/Container/web\">Container/web</a>"),
        "{branch}"
    );
    let gone = request(
        s.port,
        "GET",
        "/resources/Volume/fresh",
        &[("authorization", &auth)],
        "",
    );
    assert_eq!(gone.code, 404, "a branch-only resource has no page");
}
