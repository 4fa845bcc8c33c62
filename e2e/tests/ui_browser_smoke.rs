//! The browser harness itself: a headless Chromium against a page from a tiny local server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use stead_e2e::browser::Browser;

const PAGE: &str = r#"<!doctype html><html lang="en"><head><title>smoke</title></head>
<body><main><h1 id="title">harness</h1>
<label for="name">Name</label><input id="name">
<button id="go" onclick="document.getElementById('out').textContent='hello '+document.getElementById('name').value">go</button>
<p id="out">nothing yet</p></main></body></html>"#;

/// Serves `PAGE` to every request on a loopback port until the process ends.
fn serve_page() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{PAGE}",
                PAGE.len()
            );
            let _ = s.write_all(resp.as_bytes());
        }
    });
    port
}

#[test]
fn ui_browser_harness_drives_a_page() {
    let Some(b) = Browser::start("ui_browser_harness_drives_a_page") else {
        return;
    };
    let port = serve_page();
    b.goto(&format!("http://127.0.0.1:{port}/"));
    b.wait_text("#title", "harness", Duration::from_secs(5));
    b.type_into("#name", "stead");
    b.click("#go");
    b.wait_text("#out", "hello stead", Duration::from_secs(5));
    assert_eq!(b.js("return 6 * 7;", vec![]), serde_json::json!(42));
    let shot = b.screenshot("smoke");
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "{}", shot.display());
}
