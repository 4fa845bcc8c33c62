//! `/api/v1` served on loopback: authentication, roles, CSRF, headers, redaction, SSE.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::auth::UiConfig;
use crate::events::{EventKind, NewEvent};
use crate::testserve::{Reply, SECRETS, TOKEN, request, serve, ui_shared};
use crate::view;

use super::*;

fn get(port: u16, path: &str, headers: &[(&str, &str)]) -> Reply {
    request(port, "GET", path, headers, "")
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

/// Logs `user` in with JSON: (cookie header value, CSRF token).
fn login(port: u16, user: &str) -> (String, String) {
    let body = format!(r#"{{"username":"{user}","password":"pw-{user}"}}"#);
    let r = request(
        port,
        "POST",
        "/api/v1/login",
        &[("content-type", "application/json")],
        &body,
    );
    assert_eq!(r.code, 200, "{}", r.body);
    let set = r.header("set-cookie").expect("set-cookie").to_string();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    let cookie = set.split(';').next().expect("cookie").to_string();
    let csrf = r.json()["csrf"].as_str().expect("csrf").to_string();
    (cookie, csrf)
}

const READS: [&str; 7] = [
    "/api/v1/overview",
    "/api/v1/resources",
    "/api/v1/resources/Container/web",
    "/api/v1/pending",
    "/api/v1/events",
    "/api/v1/stream",
    "/api/v1/session",
];

const ACTIONS: [&str; 4] = [
    "/api/v1/actions/sync",
    "/api/v1/actions/restart",
    "/api/v1/actions/backup",
    "/api/v1/actions/verify",
];

#[test]
fn without_ui_the_api_is_absent() {
    let s = serve(crate::tests::shared());
    for p in READS.iter().chain(&ACTIONS) {
        assert_eq!(
            get(s.port, p, &[("authorization", &bearer())]).code,
            404,
            "{p}"
        );
    }
    assert_eq!(get(s.port, "/healthz", &[]).code, 200);
}

#[test]
fn unauthenticated_requests_are_refused_with_401_and_security_headers() {
    let s = serve(ui_shared());
    for p in READS {
        let r = get(s.port, p, &[]);
        assert_eq!(r.code, 401, "{p}");
        assert!(r.header("www-authenticate").is_some(), "{p}");
        let csp = r.header("content-security-policy").unwrap_or("");
        assert!(csp.contains("frame-ancestors 'none'"), "{p}: {csp}");
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(r.header("referrer-policy"), Some("same-origin"));
    }
    for p in ACTIONS {
        assert_eq!(request(s.port, "POST", p, &[], "").code, 401, "{p}");
    }
    let wrong = get(
        s.port,
        "/api/v1/overview",
        &[("authorization", "Bearer nope-nope-nope-nope")],
    );
    assert_eq!(wrong.code, 401);
    let forged = get(
        s.port,
        "/api/v1/overview",
        &[("cookie", "stead_session=0000")],
    );
    assert_eq!(forged.code, 401);
    assert_eq!(
        get(s.port, "/api/v1/openapi.json", &[]).code,
        200,
        "the document is public"
    );
}

#[test]
fn a_viewer_reads_everything_but_cannot_act() {
    let s = serve(ui_shared());
    let (cookie, csrf) = login(s.port, "vic");
    for p in READS.iter().filter(|p| !p.ends_with("stream")) {
        let r = get(s.port, p, &[("cookie", &cookie)]);
        assert_eq!(r.code, 200, "{p}: {}", r.body);
        assert_eq!(r.header("cache-control"), Some("no-store"), "{p}");
    }
    let who = get(s.port, "/api/v1/session", &[("cookie", &cookie)]).json();
    assert_eq!(who["role"], "viewer");
    let r = request(
        s.port,
        "POST",
        "/api/v1/actions/sync",
        &[("cookie", &cookie), ("x-csrf-token", &csrf)],
        "",
    );
    assert_eq!(r.code, 403, "{}", r.body);
    assert!(!s.shared.sync_requested.load(Ordering::SeqCst));
}

#[test]
fn an_operator_action_needs_the_csrf_token_and_is_logged() {
    let s = serve(ui_shared());
    let (cookie, csrf) = login(s.port, "ann");
    let sync =
        |headers: &[(&str, &str)]| request(s.port, "POST", "/api/v1/actions/sync", headers, "");
    assert_eq!(sync(&[("cookie", &cookie)]).code, 403, "no CSRF token");
    assert_eq!(
        sync(&[("cookie", &cookie), ("x-csrf-token", "0000")]).code,
        403
    );
    let cross = sync(&[
        ("cookie", &cookie),
        ("x-csrf-token", &csrf),
        ("origin", "http://evil.example"),
    ]);
    assert_eq!(cross.code, 403, "another origin");
    assert!(
        !s.shared.sync_requested.load(Ordering::SeqCst),
        "nothing happened yet"
    );
    let ok = sync(&[("cookie", &cookie), ("x-csrf-token", &csrf)]);
    assert_eq!(ok.code, 202, "{}", ok.body);
    assert_eq!(ok.json()["event"]["reason"], "SyncNow");
    assert_eq!(ok.json()["event"]["user"], "ann");
    assert!(s.shared.sync_requested.load(Ordering::SeqCst));
    assert!(
        s.shared.trigger.take_fetch(),
        "the loop was woken with a fetch"
    );
    let events = get(s.port, "/api/v1/events", &[("cookie", &cookie)]).json();
    assert_eq!(events[0]["kind"], "action");
    assert_eq!(events[0]["reason"], "SyncNow");
    // The bearer token needs no CSRF token.
    let tok = sync(&[("authorization", &bearer())]);
    assert_eq!(tok.code, 202);
}

#[test]
fn workload_actions_check_their_target_and_report_through_events() {
    let s = serve(ui_shared());
    let auth = bearer();
    let h = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let post = |p: &str, body: &str| request(s.port, "POST", p, &h, body);
    assert_eq!(
        post("/api/v1/actions/restart", r#"{"resource":"Volume/disk"}"#).code,
        400
    );
    assert_eq!(
        post(
            "/api/v1/actions/restart",
            r#"{"resource":"Container/nope"}"#
        )
        .code,
        404
    );
    assert_eq!(
        post("/api/v1/actions/backup", r#"{"resource":"Container/web"}"#).code,
        400
    );
    // No housekeeping in this test controller.
    assert_eq!(
        post("/api/v1/actions/restart", r#"{"resource":"Container/web"}"#).code,
        503
    );
}

#[test]
fn no_api_response_contains_a_secret() {
    let s = serve(ui_shared());
    let auth = bearer();
    for p in READS.iter().filter(|p| !p.ends_with("stream")).chain(&[
        "/api/v1/resources?kind=container",
        "/api/v1/events?resource=Container/web",
    ]) {
        let r = get(s.port, p, &[("authorization", &auth)]);
        assert_eq!(r.code, 200, "{p}");
        for secret in SECRETS {
            assert!(!r.body.contains(secret), "{p} leaks {secret}: {}", r.body);
        }
    }
    let d = get(
        s.port,
        "/api/v1/resources/container/web",
        &[("authorization", &auth)],
    )
    .json();
    assert_eq!(d["desired"]["env"]["DB_PASSWORD"], view::redact::REDACTED);
    assert_eq!(
        get(
            s.port,
            "/api/v1/resources/Container/nope",
            &[("authorization", &auth)]
        )
        .code,
        404
    );
    assert_eq!(
        get(
            s.port,
            "/api/v1/resources/Nokind/x",
            &[("authorization", &auth)]
        )
        .code,
        404
    );
}

#[test]
fn a_form_login_redirects_to_a_local_page_only() {
    let s = serve(ui_shared());
    let form = [("content-type", "application/x-www-form-urlencoded")];
    let r = request(
        s.port,
        "POST",
        "/api/v1/login",
        &form,
        "username=ann&password=pw-ann&next=%2Fresources",
    );
    assert_eq!(r.code, 303);
    assert_eq!(r.header("location"), Some("/resources"));
    assert!(
        r.header("set-cookie")
            .is_some_and(|c| c.starts_with("stead_session="))
    );
    let r = request(
        s.port,
        "POST",
        "/api/v1/login",
        &form,
        "username=ann&password=pw-ann&next=%2F%2Fevil.example",
    );
    assert_eq!(r.header("location"), Some("/"));
    let r = request(
        s.port,
        "POST",
        "/api/v1/login",
        &form,
        "username=ann&password=wrong",
    );
    assert_eq!(r.code, 303);
    assert_eq!(r.header("location"), Some("/login?failed=1"));
    assert!(r.header("set-cookie").is_none());
    let json = [("content-type", "application/json")];
    let r = request(
        s.port,
        "POST",
        "/api/v1/login",
        &json,
        r#"{"username":"ann","password":"x"}"#,
    );
    assert_eq!(r.code, 401);
}

#[test]
fn logout_ends_the_session() {
    let s = serve(ui_shared());
    let (cookie, csrf) = login(s.port, "vic");
    let out = request(s.port, "POST", "/api/v1/logout", &[("cookie", &cookie)], "");
    assert_eq!(out.code, 403, "logout needs the CSRF token too");
    let out = request(
        s.port,
        "POST",
        "/api/v1/logout",
        &[("cookie", &cookie), ("x-csrf-token", &csrf)],
        "",
    );
    assert_eq!(out.code, 204);
    assert_eq!(
        get(s.port, "/api/v1/overview", &[("cookie", &cookie)]).code,
        401
    );
}

#[test]
fn the_stream_pushes_events_and_status_updates() {
    let s = serve(ui_shared());
    let mut c = TcpStream::connect(("127.0.0.1", s.port)).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let req = format!(
        "GET /api/v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {}\r\n\r\n",
        bearer()
    );
    c.write_all(req.as_bytes()).expect("write");
    let mut r = BufReader::new(c);
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen.contains("event: hello") && Instant::now() < deadline {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        seen.push_str(&line);
    }
    assert!(seen.contains("text/event-stream"), "{seen}");
    let t0 = Instant::now();
    s.shared.events.record(
        NewEvent::new(EventKind::Drift, "Drift", "changed on the host: /mtu").on("Network/lan0"),
    );
    s.shared.events.publish_status(crate::events::StatusUpdate {
        reconciles: 4,
        ..Default::default()
    });
    let mut got = String::new();
    while !(got.contains("\"kind\":\"drift\"") && got.contains("\"reconciles\":4"))
        && Instant::now() < deadline
    {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        got.push_str(&line);
    }
    assert!(got.contains("\"kind\":\"drift\""), "{got}");
    assert!(got.contains("\"reconciles\":4"), "{got}");
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "pushed at once: {:?}",
        t0.elapsed()
    );
}

/// Housekeeping that records what it was asked.
#[derive(Default)]
struct FakeHk {
    asked: std::sync::Mutex<Vec<String>>,
}

impl crate::Housekeeping for FakeHk {
    fn environments(&self) -> Vec<crate::env::EnvRecord> {
        Vec::new()
    }
    fn collect_expired(&self) -> Result<(), crate::HousekeepingError> {
        Ok(())
    }
    fn run_backup_schedules(&self, _: &crate::StopSignal) -> Result<(), crate::HousekeepingError> {
        Ok(())
    }
    fn restart_workload(&self, id: &ResourceId) -> Result<String, crate::HousekeepingError> {
        self.asked
            .lock()
            .expect("lock")
            .push(format!("restart {id}"));
        Ok(format!("{id} stopped"))
    }
    fn backup_now(&self, schedule: &str) -> Result<String, crate::HousekeepingError> {
        self.asked
            .lock()
            .expect("lock")
            .push(format!("backup {schedule}"));
        Err(crate::HousekeepingError("disk full".into()))
    }
}

#[test]
fn actions_run_through_housekeeping_and_log_their_outcome() {
    let hk = Arc::new(FakeHk::default());
    let cfg = UiConfig::new(Some(TOKEN.into()), vec![]).expect("cfg");
    let shared = crate::tests::shared_with(None, Some(cfg), Some(hk.clone()));
    let mut st = view::tests::status();
    st.resources.push(crate::status::ResourceStatus {
        kind: "BackupSchedule".into(),
        name: "nightly".into(),
        status: "Ready".into(),
        conditions: vec![],
    });
    *shared.status.write().expect("status") = st;
    let s = serve(shared);
    let auth = bearer();
    let h = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let r = request(
        s.port,
        "POST",
        "/api/v1/actions/restart",
        &h,
        r#"{"resource":"Container/web"}"#,
    );
    assert_eq!(r.code, 202, "{}", r.body);
    let r = request(
        s.port,
        "POST",
        "/api/v1/actions/backup",
        &h,
        r#"{"resource":"BackupSchedule/nightly"}"#,
    );
    assert_eq!(r.code, 202, "{}", r.body);
    let done = wait(|| {
        let e = s.shared.events.recent(None, None, 10);
        e.iter().any(|e| e.reason == "RestartDone")
            && e.iter().any(|e| e.reason == "BackupNowFailed")
    });
    assert!(done, "{:?}", s.shared.events.recent(None, None, 10));
    let failed = s
        .shared
        .events
        .recent(None, None, 10)
        .into_iter()
        .find(|e| e.reason == "BackupNowFailed");
    assert_eq!(failed.and_then(|e| e.class).as_deref(), Some("action"));
    assert_eq!(
        *hk.asked.lock().expect("lock"),
        vec![
            "restart Container/web".to_string(),
            "backup nightly".to_string()
        ]
    );
    // Under --drift=report a restart would leave the workload stopped.
    s.shared.status.write().expect("status").drift_mode = "report".into();
    let r = request(
        s.port,
        "POST",
        "/api/v1/actions/restart",
        &h,
        r#"{"resource":"Container/web"}"#,
    );
    assert_eq!(r.code, 409);
}

fn wait(mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn a_reconnecting_stream_gets_the_events_it_missed() {
    let s = serve(ui_shared());
    for i in 0..2 {
        s.shared.events.record(
            NewEvent::new(EventKind::Apply, "Updated", format!("missed {i}")).on("Volume/disk"),
        );
    }
    let mut c = TcpStream::connect(("127.0.0.1", s.port)).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let req = format!(
        "GET /api/v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {}\r\nLast-Event-ID: 1\r\n\r\n",
        bearer()
    );
    c.write_all(req.as_bytes()).expect("write");
    let mut r = BufReader::new(c);
    let mut got = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !got.contains("missed 1") && Instant::now() < deadline {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        got.push_str(&line);
    }
    assert!(got.contains("id: 2") && got.contains("missed 0"), "{got}");
    assert!(got.contains("id: 3") && got.contains("missed 1"), "{got}");
    assert!(!got.contains("id: 1\n"), "event 1 was seen: {got}");
}

#[test]
fn only_local_paths_are_followed_after_a_login() {
    assert_eq!(safe_next(Some("/resources?kind=vm")), "/resources?kind=vm");
    for bad in [
        "//evil.example/x",
        "https://evil.example",
        "/\\evil.example",
        "javascript:alert(1)",
        "/a\nSet-Cookie: x",
        "",
    ] {
        assert_eq!(safe_next(Some(bad)), "/", "{bad:?}");
    }
    assert_eq!(safe_next(None), "/");
}
