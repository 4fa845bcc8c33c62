//! Image import and QEMU firmware through the CLI, with a loopback HTTP server that counts
//! its requests (nothing leaves the machine):
//!
//! - [`import_with_a_wrong_sha256_fails_the_apply_and_makes_nothing`]: `stead apply` exits
//!   1 naming both digests; no volume file, no cache entry, no inventory row for the Volume
//!   or the VM that uses it, no VM run dir.
//! - [`a_missing_firmware_file_fails_the_apply_and_makes_no_vm`]: a UEFI VM whose firmware
//!   descriptor (`STEAD_QEMU_FIRMWARE_DIR`) names files that are not there: exit 1 with the
//!   package to install; no VM in the inventory, no run dir, no NVRAM.
//! - [`the_same_url_and_sha256_are_fetched_once`]: two volumes from one `url` + `sha256`,
//!   then a third in a later apply, read the download once; a damaged cache entry is
//!   fetched again; an entry idle past the prune age is removed and fetched again.
//!
//! Needs root and qemu-img; otherwise `SKIP`. Build the binary first:
//! `cargo build --bin stead`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod qemu_util;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use qemu_util::pool;
use serde_json::Value;
use stead_e2e::{Run, Sandbox, is_root, skip_unless};

/// An HTTP server on 127.0.0.1 that answers every GET with `body` and counts requests;
/// stops on drop.
struct Server {
    url: String,
    served: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(body: Vec<u8>) -> Server {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.set_nonblocking(true).expect("nonblocking");
        let port = l.local_addr().expect("addr").port();
        let served = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (n, halt) = (Arc::clone(&served), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !halt.load(Ordering::SeqCst) {
                let Ok((s, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = s.set_nonblocking(false);
                let mut r = BufReader::new(s.try_clone().expect("clone stream"));
                let mut line = String::new();
                while r.read_line(&mut line).is_ok_and(|k| k > 0) {
                    if line == "\r\n" || line == "\n" {
                        break;
                    }
                    line.clear();
                }
                let mut s = s;
                let head = format!(
                    "HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes());
                let _ = s.write_all(&body);
                n.fetch_add(1, Ordering::SeqCst);
            }
        });
        Server {
            url: format!("http://127.0.0.1:{port}/images/base.raw"),
            served,
            stop,
            thread: Some(thread),
        }
    }

    fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A 1 MiB raw image with recognizable content.
fn image_body() -> Vec<u8> {
    (0..1usize << 20).map(|i| (i / 4096) as u8 ^ 0x5a).collect()
}

fn sha256_hex(b: &[u8]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("body");
    std::fs::write(&p, b).expect("write");
    let out = Command::new("sha256sum")
        .arg(&p)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("digest")
        .to_string()
}

fn ready(test: &str) -> bool {
    !(skip_unless(is_root(), test, "needs root")
        || skip_unless(
            qemu_util::have("qemu-img"),
            test,
            "qemu-img missing (apt package qemu-utils)",
        ))
}

fn url_volume(name: &str, url: &str, sha: &str) -> String {
    format!(
        "---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: {name}}}\n\
         spec: {{pool: vms, size: 4Mi, source: {{url: \"{url}\", sha256: \"{sha}\"}}}}\n"
    )
}

fn vm(name: &str, volume: &str, firmware: &str) -> String {
    format!(
        "---\napiVersion: stead.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {name}}}\n\
         spec:\n  engine: qemu\n  accel: tcg\n  firmware: {firmware}\n  cpus: 1\n  memory: 64Mi\n  \
         disks: [{{volume: {volume}}}]\n  state: stopped\n"
    )
}

fn manifest(sb: &Sandbox, text: &str) -> String {
    sb.write("m/all.yaml", text);
    sb.path("m").to_string_lossy().into_owned()
}

/// `Kind/name` of every resource in the inventory.
fn inventory(sb: &Sandbox) -> Vec<String> {
    let out = sb.run(&["get", "-o", "json"]).expect_code(0).stdout();
    let v: Value = serde_json::from_str(&out).expect("json");
    v["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| {
            format!(
                "{}/{}",
                i["kind"].as_str().unwrap_or("?"),
                i["metadata"]["name"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

fn files_in(dir: PathBuf) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn cache_dir(sb: &Sandbox) -> PathBuf {
    sb.path("state/cache/images/sha256")
}

fn destroy(sb: &Sandbox, m: &str) {
    sb.run(&["destroy", "--yes", "--allow-data-loss", m])
        .expect_code(0);
}

#[test]
fn import_with_a_wrong_sha256_fails_the_apply_and_makes_nothing() {
    const TEST: &str = "import_with_a_wrong_sha256_fails_the_apply_and_makes_nothing";
    if !ready(TEST) {
        return;
    }
    let sb = Sandbox::new();
    let body = image_body();
    let server = Server::start(body.clone());
    let wrong = "ab".repeat(32);
    let m = manifest(
        &sb,
        &format!(
            "{}{}{}",
            pool(&sb),
            url_volume("web-root", &server.url, &wrong),
            vm("web", "web-root", "bios")
        ),
    );
    let out = sb.run(&["apply", "--yes", &m]).expect_code(1);
    let text = format!("{}{}", out.stdout(), out.stderr());
    assert!(text.contains("sha256 mismatch"), "{text}");
    assert!(
        text.contains(&wrong) && text.contains(&sha256_hex(&body)),
        "both digests: {text}"
    );
    assert_eq!(server.served(), 1);
    assert_eq!(files_in(sb.path("pools/vms/images")), Vec::<String>::new());
    let cached = files_in(cache_dir(&sb));
    assert!(
        cached.iter().all(|f| f == ".lock"),
        "nothing cached: {cached:?}"
    );
    let inv = inventory(&sb);
    assert!(
        !inv.iter().any(|r| r.contains("web")),
        "no Volume or VM recorded: {inv:?}"
    );
    assert!(!sb.path("run/vms/web").exists());
    destroy(&sb, &m);
}

#[test]
fn a_missing_firmware_file_fails_the_apply_and_makes_no_vm() {
    const TEST: &str = "a_missing_firmware_file_fails_the_apply_and_makes_no_vm";
    if !ready(TEST) {
        return;
    }
    let sb = Sandbox::new();
    // A descriptor like the ovmf package's, naming files that are not installed.
    let fw = sb.path("firmware");
    let code = sb.path("ovmf/OVMF_CODE_4M.fd");
    sb.write(
        "firmware/60-edk2-x86_64.json",
        &format!(
            r#"{{"description": "UEFI firmware for x86_64", "interface-types": ["uefi"],
  "mapping": {{"device": "flash", "executable": {{"filename": "{}", "format": "raw"}},
              "nvram-template": {{"filename": "{}", "format": "raw"}}}},
  "targets": [{{"architecture": "x86_64", "machines": ["pc-q35-*"]}}],
  "features": ["acpi-s3", "verbose-dynamic"], "tags": []}}"#,
            code.display(),
            sb.path("ovmf/OVMF_VARS_4M.fd").display()
        ),
    );
    let disk = "---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {name: efi-root}\n\
                spec: {pool: vms, size: 4Mi}\n";
    let m = manifest(
        &sb,
        &format!("{}{disk}{}", pool(&sb), vm("efi", "efi-root", "uefi")),
    );
    let out = Run(sb
        .cmd()
        .env("STEAD_QEMU_FIRMWARE_DIR", &fw)
        .args(["apply", "--yes", &m])
        .output()
        .expect("spawn stead"))
    .expect_code(1);
    let text = format!("{}{}", out.stdout(), out.stderr());
    assert!(
        text.contains("firmware uefi needs OVMF: install the ovmf package"),
        "{text}"
    );
    assert!(
        text.contains(&format!("{} is missing", code.display())),
        "{text}"
    );
    let inv = inventory(&sb);
    assert!(
        !inv.iter().any(|r| r.starts_with("VirtualMachine/")),
        "{inv:?}"
    );
    assert!(!sb.path("run/vms/efi").exists(), "run dir left");
    assert!(!sb.path("state/vms/efi").exists(), "NVRAM left");
    destroy(&sb, &m);
}

#[test]
fn the_same_url_and_sha256_are_fetched_once() {
    const TEST: &str = "the_same_url_and_sha256_are_fetched_once";
    if !ready(TEST) {
        return;
    }
    let sb = Sandbox::new();
    let body = image_body();
    let sha = sha256_hex(&body);
    let server = Server::start(body.clone());
    let mut text = format!(
        "{}{}{}",
        pool(&sb),
        url_volume("a", &server.url, &sha),
        url_volume("b", &server.url, &sha)
    );
    let m = manifest(&sb, &text);
    sb.run(&["apply", "--yes", &m]).expect_code(0);
    assert_eq!(server.served(), 1, "two volumes, one download");
    let entry = cache_dir(&sb).join(&sha);
    assert_eq!(std::fs::read(&entry).expect("cache entry"), body);
    let holds_image = |v: &str| {
        let got = std::fs::read(sb.path(&format!("pools/vms/images/{v}.raw"))).expect("volume");
        got.len() == 4 << 20 && got[..body.len()] == body[..]
    };
    assert!(holds_image("a") && holds_image("b"));

    // A later apply: read from the cache.
    text.push_str(&url_volume("c", &server.url, &sha));
    let m = manifest(&sb, &text);
    sb.run(&["apply", "--yes", &m]).expect_code(0);
    assert_eq!(server.served(), 1, "taken from the cache");
    assert!(holds_image("c"));

    // A damaged entry is found out (its digest is checked on use) and fetched again.
    std::fs::write(&entry, b"not the image").expect("damage");
    text.push_str(&url_volume("d", &server.url, &sha));
    let m = manifest(&sb, &text);
    sb.run(&["apply", "--yes", &m]).expect_code(0);
    assert_eq!(server.served(), 2, "fetched again");
    assert!(holds_image("d"));
    assert_eq!(std::fs::read(&entry).expect("entry"), body);

    // Idle past the prune age: removed at the next import, which fetches it again.
    let st = Command::new("touch")
        .args(["-m", "-d", "15 days ago"])
        .arg(&entry)
        .status()
        .expect("touch");
    assert!(st.success());
    text.push_str(&url_volume("e", &server.url, &sha));
    let m = manifest(&sb, &text);
    sb.run(&["apply", "--yes", &m]).expect_code(0);
    assert_eq!(server.served(), 3, "pruned, then fetched again");
    assert!(holds_image("e"));
    let left: Vec<String> = files_in(cache_dir(&sb))
        .into_iter()
        .filter(|f| f != ".lock")
        .collect();
    assert_eq!(left, vec![sha.clone()], "no temp left");
    destroy(&sb, &m);
}
