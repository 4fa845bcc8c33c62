//! Helpers of the web UI tests: a controller with `--ui`, users and a token; raw HTTP with
//! headers; a browser login; the axe-core check.

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use stead_e2e::Sandbox;
use stead_e2e::browser::Browser;

/// The bearer token of the test controllers (operator role).
pub const TOKEN: &str = "ui-test-token-0123456789abcdef";
/// The operator's and the viewer's password.
pub const PASSWORD: &str = "correct horse battery staple";

/// Where `npm install axe-core` put the script (scripts/install-deps.sh).
pub const AXE: &str = "/var/cache/stead/axe/node_modules/axe-core/axe.min.js";

/// Writes the users file (`ann` operator, `vic` viewer) and the token file; returns the
/// controller flags that turn the UI on with them.
pub fn ui_flags(sb: &Sandbox) -> Vec<String> {
    let hash = stead_controller::auth::hash_password(PASSWORD).expect("argon2 hash");
    let users = sb.write(
        "ui/users",
        &format!("ann:operator:{hash}\nvic:viewer:{hash}\n"),
    );
    let token = sb.write("ui/token", TOKEN);
    vec![
        "--ui".into(),
        "--ui-users".into(),
        users.display().to_string(),
        "--ui-token-file".into(),
        token.display().to_string(),
    ]
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    /// The first header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request to 127.0.0.1:`port`, with headers.
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("connection"))
    {
        req.push_str("Connection: close\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).expect("write request");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_string(),
    }
}

/// Logs `user` in over JSON; returns (the `Cookie` header value, the CSRF token).
pub fn api_login(port: u16, user: &str) -> (String, String) {
    let body = serde_json::json!({ "username": user, "password": PASSWORD }).to_string();
    let a = request(
        port,
        "POST",
        "/api/v1/login",
        &[("Content-Type", "application/json")],
        &body,
    );
    assert_eq!(a.status, 200, "login of {user}: {a:?}");
    let cookie = a
        .header("set-cookie")
        .and_then(|c| c.split(';').next())
        .expect("session cookie")
        .to_string();
    let v: serde_json::Value = serde_json::from_str(&a.body).expect("login json");
    let csrf = v["csrf"].as_str().expect("csrf token").to_string();
    (cookie, csrf)
}

/// Logs the browser in through the login form as `user`; ends on the overview.
pub fn browser_login(b: &Browser, port: u16, user: &str) {
    b.goto(&format!("http://127.0.0.1:{port}/"));
    b.wait_css("form.login input[name=username]", Duration::from_secs(10));
    b.type_into("input[name=username]", user);
    b.type_into("input[name=password]", PASSWORD);
    b.click("form.login button[type=submit]");
    b.wait_text("h1", "Overview", Duration::from_secs(15));
}

/// Runs axe-core on the current page and asserts no serious or critical violation;
/// prints a SKIP line when axe-core is not installed.
pub fn axe_check(b: &Browser, test: &str, page: &str) {
    let Ok(axe) = std::fs::read_to_string(AXE) else {
        eprintln!(
            "SKIP {test} (axe on {page}): {AXE} absent (scripts/install-deps.sh installs it)"
        );
        println!("SKIP {test} (axe on {page}): {AXE} absent");
        return;
    };
    b.js(&format!("{axe}\n;return true;"), vec![]);
    let v = b.js_async(
        "var done = arguments[arguments.length - 1];
         axe.run(document, { resultTypes: ['violations'] }).then(function (r) {
           done(r.violations.filter(function (v) { return v.impact === 'serious' || v.impact === 'critical'; })
             .map(function (v) { return v.id + ' (' + v.impact + '): ' + v.help + ' at ' +
               v.nodes.slice(0, 3).map(function (n) { return n.target.join(' '); }).join(', '); }));
         }).catch(function (e) { done(['axe failed: ' + e]); });",
        vec![],
    );
    let found: Vec<String> = serde_json::from_value(v).unwrap_or_default();
    assert!(found.is_empty(), "axe on {page}: {found:#?}");
}

/// Copies `shot` to `docs/img/<name>` when `STEAD_UPDATE_DOC_IMAGES` is set (how the
/// README's screenshots are refreshed).
pub fn maybe_update_doc_image(shot: &Path, name: &str) {
    if std::env::var_os("STEAD_UPDATE_DOC_IMAGES").is_none() {
        return;
    }
    let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/img");
    std::fs::create_dir_all(&docs).expect("docs/img");
    std::fs::copy(shot, docs.join(name)).expect("copy screenshot");
}

/// The text xterm.js shows on the console page (its rows, non-breaking spaces as
/// spaces); empty before the terminal is there.
pub fn terminal_text(b: &Browser) -> String {
    b.js(
        "var r = document.querySelector('#console-term .xterm-rows');
         return r ? r.textContent.replace(/\\u00a0/g, ' ') : '';",
        vec![],
    )
    .as_str()
    .unwrap_or_default()
    .to_string()
}

/// Waits until the console's terminal shows `text`; panics with what it shows.
pub fn wait_terminal(b: &Browser, text: &str, timeout: Duration) {
    if b.wait(timeout, |b| terminal_text(b).contains(text))
        .is_none()
    {
        panic!(
            "the terminal never showed {text:?} after {timeout:?}; it shows {:?}",
            terminal_text(b)
        );
    }
}
