//! Issue 7: a git source over HTTP with credentials from a file (smart HTTP served by
//! `git http-backend` behind basic auth; libgit2 uses the same transport for https).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod controller_util;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use controller_util::*;
use stead_e2e::{Sandbox, skip_unless};

const MI: u64 = 1 << 20;

const SERVER: &str = r#"
import base64, http.server, os, subprocess, sys
root, port = sys.argv[1], int(sys.argv[2])
want = "Basic " + base64.b64encode(b"deploy:s3cret").decode()
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def handle_one(self, method):
        if self.headers.get("Authorization") != want:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path, _, query = self.path.partition("?")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        env = dict(os.environ, GIT_PROJECT_ROOT=root, GIT_HTTP_EXPORT_ALL="1",
                   PATH_INFO=path, QUERY_STRING=query, REQUEST_METHOD=method,
                   CONTENT_TYPE=self.headers.get("Content-Type", ""),
                   CONTENT_LENGTH=str(len(body)), REMOTE_USER="deploy")
        out = subprocess.run(["git", "http-backend"], input=body, env=env,
                             stdout=subprocess.PIPE).stdout
        head, _, rest = out.partition(b"\r\n\r\n")
        status = 200
        headers = []
        for line in head.decode().split("\r\n"):
            k, _, v = line.partition(":")
            if k.lower() == "status":
                status = int(v.strip().split()[0])
            elif k:
                headers.append((k, v.strip()))
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(rest)))
        self.end_headers()
        self.wfile.write(rest)
    def do_GET(self):
        self.handle_one("GET")
    def do_POST(self):
        self.handle_one("POST")
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"#;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn http_source_with_credentials_file() {
    let have = Command::new("python3").arg("--version").output().is_ok();
    if skip_unless(
        have,
        "http_source_with_credentials_file",
        "python3 not installed",
    ) {
        return;
    }
    let sb = Sandbox::new();
    let repo = Repo::new(&sb);
    repo.commit(
        "one",
        &[("storage.yaml", &storage_yaml(&sb, &[("a", "1Mi")]))],
    );
    let script = sb.write("server.py", SERVER);
    let port = free_port();
    let _server = Server(
        Command::new("python3")
            .arg(&script)
            .arg(sb.dir.path())
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(
        wait_until(Duration::from_secs(10), || http(port, "GET", "/", &[], "")
            .0
            == 401)
        .is_some()
    );
    let source = format!("git+http://127.0.0.1:{port}/repo.git#main");

    // Without credentials: fetch errors, nothing applied.
    let mut ctl = Controller::start(&sb, &["--source", &source, "--interval", "1s"]);
    within!(
        ctl,
        10,
        ctl.metric("stead_source_fetch_errors_total") >= 1.0,
    );
    let err = ctl.status()["fetchError"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        err.contains("credentials") || err.contains("authentication"),
        "{err}"
    );
    assert!(!image(&sb, "a").exists());
    assert_eq!(ctl.stop(), Some(0));

    // With a credentials file: converges.
    let creds = sb.write("git-credentials", "deploy:s3cret\n");
    let ctl = Controller::start(
        &sb,
        &[
            "--source",
            &source,
            "--interval",
            "1s",
            "--git-credentials-file",
            creds.to_str().unwrap(),
        ],
    );
    within!(ctl, 20, size(&image(&sb, "a")) == MI);
    repo.commit(
        "grow",
        &[("storage.yaml", &storage_yaml(&sb, &[("a", "2Mi")]))],
    );
    within!(ctl, 10, size(&image(&sb, "a")) == 2 * MI);
    assert!(ctl.status()["fetchError"].is_null());
}

/// Sends a webhook request whose headers announce `len` body bytes and then sends
/// `body_sent` of them; returns the status line's code (0 if none came back).
fn hook_with_length(port: u16, token: &str, len: usize, body_sent: usize) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "POST /hooks/git HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nContent-Length: {len}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(&vec![b' '; body_sent]);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// The webhook takes bodies up to 1 MiB; a larger one gets 413 and triggers nothing.
#[test]
fn webhook_body_over_one_mib_is_refused_with_413() {
    let sb = Sandbox::new();
    let tok = sb.write("token", "body-limit-token");
    let ctl = Controller::on_volume_a(&sb, "1h", &["--webhook-token-file", tok.to_str().unwrap()]);
    assert_eq!(
        hook_with_length(ctl.port, "body-limit-token", 2 << 20, 0),
        413
    );
    assert_eq!(
        hook_with_length(ctl.port, "body-limit-token", 1 << 20, 1 << 20),
        202
    );
    assert_eq!(ctl.get("/healthz").0, 200);
}
