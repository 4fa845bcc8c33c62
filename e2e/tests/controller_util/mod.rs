//! Helpers for the controller e2e tests: a running `stead controller`, raw HTTP, git.

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stead_e2e::Sandbox;

/// A free loopback port (bound once, then released).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// One HTTP/1.1 request; returns (status, body). Status 0 if the connection failed.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Polls `f` every 25 ms until it is true or `timeout` passes; returns the time taken.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if f() {
            return Some(start.elapsed());
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A value from a Prometheus text scrape: `series` is the name with labels exactly as
/// printed (e.g. `stead_reconcile_total{result="invalid"}`).
pub fn metric(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?;
        let rest = rest.strip_prefix(' ')?;
        rest.trim().parse().ok()
    })
}

/// A running `stead controller` in a sandbox; SIGTERM + wait on drop.
pub struct Controller {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
    pub run_dir: PathBuf,
}

impl Controller {
    /// Starts `stead -v controller --listen 127.0.0.1:<free> <args>`.
    pub fn start(sb: &Sandbox, args: &[&str]) -> Controller {
        let port = free_port();
        let log = sb.path(&format!("controller-{port}.log"));
        let f = std::fs::File::create(&log).expect("log file");
        let listen = format!("127.0.0.1:{port}");
        let child = sb
            .cmd()
            .args(["-vv", "controller", "--listen", &listen])
            .args(args)
            .env_remove("STEAD_WEBHOOK_TOKEN")
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("spawn stead controller");
        let c = Controller {
            child,
            port,
            log,
            run_dir: sb.path("run"),
        };
        let up = wait_until(Duration::from_secs(20), || c.get("/healthz").0 == 200);
        assert!(up.is_some(), "controller did not come up\n{}", c.logs());
        c
    }

    /// Starts a controller that fetches `source` only when its webhook is called (or
    /// at start): `--interval 1h --resync 1h --webhook-token-file <token>`, then `extra`.
    pub fn on_webhook(sb: &Sandbox, source: &str, token: &Path, extra: &[&str]) -> Controller {
        let token = token.to_str().expect("utf-8 token path");
        let mut args = vec![
            "--source",
            source,
            "--interval",
            "1h",
            "--resync",
            "1h",
            "--webhook-token-file",
            token,
        ];
        args.extend_from_slice(extra);
        Controller::start(sb, &args)
    }

    /// Starts a controller on the folder source `m` holding the 1 MiB volume `a` (see
    /// [`storage_yaml`]): `--resync <resync>`, then `extra`.
    pub fn on_volume_a(sb: &Sandbox, resync: &str, extra: &[&str]) -> Controller {
        sb.write("m/all.yaml", &storage_yaml(sb, &[("a", "1Mi")]));
        let m = sb.path("m");
        let mut args = vec![
            "--source",
            m.to_str().expect("utf-8 path"),
            "--resync",
            resync,
        ];
        args.extend_from_slice(extra);
        Controller::start(sb, &args)
    }

    /// Waits up to `secs` for `cond`; panics with `what` and the controller's log if it
    /// does not hold by then. [`within!`] names the condition for you.
    pub fn expect(&self, secs: u64, what: &str, cond: impl FnMut() -> bool) {
        if wait_until(Duration::from_secs(secs), cond).is_none() {
            panic!("{what} (waited {secs} s)\n{}", self.logs());
        }
    }

    /// Waits up to `secs` for the applied revision to be `rev`.
    pub fn expect_revision(&self, secs: u64, rev: &str) {
        self.expect(secs, &format!("revision {rev} not applied"), || {
            self.status()["revision"] == rev
        });
    }

    /// Waits up to `secs` for the counter of refused (invalid) revisions to reach `n`.
    pub fn expect_invalid(&self, secs: u64, n: f64) {
        self.expect(secs, &format!("{n} invalid revisions not counted"), || {
            self.metric("stead_reconcile_total{result=\"invalid\"}") == n
        });
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http(self.port, "GET", path, &[], "")
    }

    pub fn scrape(&self) -> String {
        self.get("/metrics").1
    }

    pub fn metric(&self, series: &str) -> f64 {
        metric(&self.scrape(), series).unwrap_or(0.0)
    }

    /// Calls the webhook with a bearer token; returns the HTTP status.
    pub fn hook(&self, token: &str) -> u16 {
        http(
            self.port,
            "POST",
            "/hooks/git",
            &[("Authorization", &format!("Bearer {token}"))],
            "{}",
        )
        .0
    }

    /// The status document from `<run-dir>/controller.sock`.
    pub fn status(&self) -> serde_json::Value {
        let mut s =
            UnixStream::connect(self.run_dir.join("controller.sock")).expect("status socket");
        s.write_all(b"status\n").expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        serde_json::from_str(&out).expect("status json")
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until a reconcile has finished after this call (the reconcile counter moves).
    pub fn wait_reconciles(&self, more: u64, timeout: Duration) -> bool {
        let n0 = self.status()["reconciles"].as_u64().unwrap_or(0);
        wait_until(timeout, || {
            self.status()["reconciles"].as_u64().unwrap_or(0) >= n0 + more
        })
        .is_some()
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        stead_e2e::signal(self.child.id() as i32, rustix::process::Signal::TERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
        if std::thread::panicking() {
            eprintln!("--- controller log\n{}", self.logs());
        }
    }
}

/// Storage manifests: a dir pool under the sandbox and raw volumes `(name, size)`.
pub fn storage_yaml(sb: &Sandbox, volumes: &[(&str, &str)]) -> String {
    let mut text = format!(
        "apiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: local}}\nspec: {{type: dir, path: {}}}\n",
        sb.path("pools/local").display()
    );
    for (name, size) in volumes {
        text.push_str(&format!(
            "---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: {name}}}\nspec: {{pool: local, size: {size}, deletionPolicy: Delete}}\n"
        ));
    }
    text
}

/// A volume's image file.
pub fn image(sb: &Sandbox, name: &str) -> PathBuf {
    sb.path(&format!("pools/local/images/{name}.raw"))
}

/// Size of a file, 0 if absent.
pub fn size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// A bare repository and a working clone inside the sandbox.
pub struct Repo {
    pub bare: PathBuf,
    pub work: PathBuf,
}

impl Repo {
    pub fn new(sb: &Sandbox) -> Repo {
        let bare = sb.path("repo.git");
        let work = sb.path("work");
        git(
            sb.dir.path(),
            &["init", "-q", "--bare", "-b", "main", bare.to_str().unwrap()],
        );
        git(
            sb.dir.path(),
            &["init", "-q", "-b", "main", work.to_str().unwrap()],
        );
        git(&work, &["remote", "add", "origin", bare.to_str().unwrap()]);
        Repo { bare, work }
    }

    /// `git+file://<bare>#main`.
    pub fn source(&self) -> String {
        format!("git+file://{}#main", self.bare.display())
    }

    /// Writes `files` (relative path, content), commits everything and pushes; returns the commit id.
    pub fn commit(&self, msg: &str, files: &[(&str, &str)]) -> String {
        for (rel, text) in files {
            let p = self.work.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        git(&self.work, &["add", "-A"]);
        git(&self.work, &["commit", "-q", "--allow-empty", "-m", msg]);
        self.push()
    }

    /// Runs a git command in the work tree, then pushes; returns the new head.
    pub fn git_then_push(&self, args: &[&str]) -> String {
        git(&self.work, args);
        self.push()
    }

    pub fn push(&self) -> String {
        git(
            &self.work,
            &["push", "-q", "origin", "HEAD:refs/heads/main"],
        );
        git_out(&self.work, &["rev-parse", "HEAD"])
            .trim()
            .to_string()
    }
}

impl Repo {
    /// Moves `main` of the remote to `rev` (a force-push); returns `rev`.
    pub fn force_push(&self, rev: &str) -> String {
        git(
            &self.work,
            &[
                "push",
                "-q",
                "-f",
                "origin",
                &format!("{rev}:refs/heads/main"),
            ],
        );
        rev.to_string()
    }

    /// Pushes a commit on top of the work tree's HEAD whose root tree holds
    /// `(name, content)` files with raw names, written past git's own checks (a name
    /// may hold `/` or `..` or be invalid UTF-8); returns the commit id.
    pub fn push_raw_tree(&self, files: &[(&[u8], &str)]) -> String {
        let mut raw = Vec::new();
        for (name, text) in files {
            let blob = git_stdin(
                &self.work,
                &["hash-object", "-w", "--stdin"],
                text.as_bytes(),
            );
            raw.extend_from_slice(b"100644 ");
            raw.extend_from_slice(name);
            raw.push(0);
            raw.extend_from_slice(&unhex(blob.trim()));
        }
        let tree = git_stdin(
            &self.work,
            &["hash-object", "-w", "-t", "tree", "--literally", "--stdin"],
            &raw,
        );
        let head = git_out(&self.work, &["rev-parse", "HEAD"]);
        let commit = git_out(
            &self.work,
            &[
                "commit-tree",
                tree.trim(),
                "-p",
                head.trim(),
                "-m",
                "raw tree",
            ],
        );
        self.force_push(commit.trim())
    }
}

/// Bytes of a hex string.
fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Runs git in `dir` with `input` on stdin and returns stdout.
fn git_stdin(dir: &Path, args: &[&str], input: &[u8]) -> String {
    let mut child = git_cmd(dir)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("git");
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "git {args:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn git_cmd(dir: &Path) -> Command {
    let mut c = Command::new("git");
    c.current_dir(dir)
        .env("GIT_AUTHOR_NAME", "stead test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "stead test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir);
    c
}

/// Runs git in `dir`, asserting success.
pub fn git(dir: &Path, args: &[&str]) {
    let out = git_cmd(dir).args(args).output().expect("git");
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs git in `dir` and returns stdout.
pub fn git_out(dir: &Path, args: &[&str]) -> String {
    let out = git_cmd(dir).args(args).output().expect("git");
    assert!(out.status.success(), "git {args:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `within!(ctl, secs, cond)`: waits up to `secs` seconds for `cond`; if it never holds,
/// panics naming the condition, with the controller's log.
#[allow(unused_macros)]
macro_rules! within {
    ($ctl:expr, $secs:expr, $cond:expr $(,)?) => {
        $ctl.expect($secs, concat!("never true: ", stringify!($cond)), || $cond)
    };
}
#[allow(unused_imports)]
pub(crate) use within;
