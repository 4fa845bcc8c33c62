//! The pages served on loopback from the read model's test fixture: the login redirect,
//! every page for a session and for the bearer token, no secret on any page, the logout
//! form's CSRF check, 404s.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use crate::Shared;
use crate::auth::tests::quick_hash;
use crate::auth::{Role, UiConfig, User};
use crate::events::{EventKind, NewEvent};
use crate::server::{HttpLimits, limited};
use crate::view;

const TOKEN: &str = "0123456789abcdef-token";
const SECRETS: [&str; 2] = ["hunter2", "old-secret"];

/// A served router; stops the server when dropped.
struct Served {
    port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(shared: Arc<Shared>) -> Served {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.set_nonblocking(true).expect("nonblocking");
    let port = l.local_addr().expect("addr").port();
    let app = crate::server::router(shared);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).expect("listener");
            let _ = axum::serve(limited(l, HttpLimits::default()), app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
    });
    Served {
        port,
        stop: Some(tx),
        thread: Some(thread),
    }
}

fn ui_shared() -> Arc<Shared> {
    let users = vec![
        User {
            name: "vic".into(),
            role: Role::Viewer,
            hash: quick_hash("pw-vic"),
        },
        User {
            name: "ann".into(),
            role: Role::Operator,
            hash: quick_hash("pw-ann"),
        },
    ];
    let cfg = UiConfig::new(Some(TOKEN.into()), users).expect("cfg");
    let shared = crate::tests::shared_with(None, Some(cfg), None);
    *shared.status.write().expect("status") = view::tests::status();
    *shared.snapshot.write().expect("snapshot") = Some(Arc::new(view::tests::snapshot()));
    shared.events.record(
        NewEvent::new(
            EventKind::Failure,
            "ApplyFailed",
            "exec DB_PASSWORD=hunter2",
        )
        .on("Container/web")
        .class("transient"),
    );
    shared
}

struct Reply {
    code: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn request(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).expect("write");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let code = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Reply {
        code,
        headers,
        body: body.to_string(),
    }
}

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
