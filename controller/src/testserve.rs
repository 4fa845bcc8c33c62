//! The test harness the API's and the pages' tests share: a controller with the UI on,
//! its router served on loopback, and a raw HTTP/1.1 client.

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

pub(crate) const TOKEN: &str = "0123456789abcdef-token";
pub(crate) const SECRETS: [&str; 2] = ["hunter2", "old-secret"];

/// A served router; stops the server when dropped.
pub(crate) struct Served {
    pub(crate) port: u16,
    pub(crate) shared: Arc<Shared>,
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

pub(crate) fn serve(shared: Arc<Shared>) -> Served {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.set_nonblocking(true).expect("nonblocking");
    let port = l.local_addr().expect("addr").port();
    let app = crate::server::router(shared.clone());
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
        shared,
        stop: Some(tx),
        thread: Some(thread),
    }
}

/// A controller with the UI on: the bearer token, a viewer `vic` and an operator `ann`
/// (password `pw-<name>`), the test status and snapshot.
pub(crate) fn ui_shared() -> Arc<Shared> {
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

pub(crate) struct Reply {
    pub(crate) code: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: String,
}

impl Reply {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// One HTTP/1.1 request with `Connection: close`.
pub(crate) fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
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
