//! The control socket under hostile clients: over-long lines, silent clients, many
//! clients (real KVM, tiny guest, seccomp on as in production).

#![allow(clippy::unwrap_used)] // unwrap is fine in tests

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{kvm_or_skip, tiny};
use stead_vmm::{
    CLIENT_IDLE_TIMEOUT, ControlClient, ExitReason, MAX_REQUEST_LINE, Reply, Request, RunState,
};

/// Starts `run_vmm_process` for an idle tiny guest; returns its thread and socket.
fn start_vmm(dir: &Path) -> (JoinHandle<ExitReason>, PathBuf) {
    let run_dir = dir.join("run");
    let mut cfg = tiny("idle");
    cfg.run_dir = Some(run_dir.clone());
    cfg.serial_log = Some(dir.join("serial.log"));
    cfg.seccomp = true;
    let t = std::thread::spawn(move || stead_vmm::run_vmm_process(cfg).unwrap());
    let sock = run_dir.join("control.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "no control socket");
        std::thread::sleep(Duration::from_millis(5));
    }
    (t, sock)
}

/// One `status` on a fresh connection, answered within `within`.
fn status_within(sock: &Path, within: Duration) -> Reply {
    let s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(within)).unwrap();
    (&s).write_all(b"{\"command\":\"status\"}\n").unwrap();
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .expect("status answered in time");
    Reply::parse(&line).unwrap()
}

fn is_running(r: &Reply) -> bool {
    matches!(r, Reply::Ok(s) if s.state == RunState::Running || s.state == RunState::Created)
}

fn shutdown(sock: &Path, t: JoinHandle<ExitReason>) {
    let mut c = ControlClient::connect(sock).unwrap();
    assert!(matches!(c.call(Request::Kill).unwrap(), Reply::Ok(_)));
    drop(c);
    assert_eq!(t.join().unwrap(), ExitReason::Killed);
}

#[test]
fn control_long_line_gets_an_error_and_the_vmm_lives() {
    if !kvm_or_skip("control_long_line_gets_an_error_and_the_vmm_lives") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (t, sock) = start_vmm(dir.path());
    let s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // 1 MiB without a newline; the VMM may close the connection before it is all sent.
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'a'; 64 * 1024];
        for _ in 0..16 {
            if w.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .expect("an error reply before the read timeout");
    match Reply::parse(&line).unwrap() {
        Reply::Error(e) => assert!(e.contains(&MAX_REQUEST_LINE.to_string()), "{e}"),
        r => panic!("expected an error, got {r:?}"),
    }
    let mut rest = Vec::new();
    let _ = (&s).read_to_end(&mut rest);
    assert!(rest.is_empty(), "the connection is closed after the error");
    writer.join().unwrap();
    assert!(is_running(&status_within(&sock, Duration::from_secs(2))));
    shutdown(&sock, t);
}

#[test]
fn control_silent_client_does_not_block_status_and_is_dropped() {
    if !kvm_or_skip("control_silent_client_does_not_block_status_and_is_dropped") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (t, sock) = start_vmm(dir.path());
    let silent = UnixStream::connect(&sock).unwrap();
    // A half-sent request counts as silence too, even when its bytes trickle in.
    let half = UnixStream::connect(&sock).unwrap();
    (&half).write_all(b"{\"command\":").unwrap();
    let trickle = half.try_clone().unwrap();
    let trickler = std::thread::spawn(move || {
        for _ in 0..40 {
            if (&trickle).write_all(b" ").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..3 {
        assert!(is_running(&status_within(&sock, Duration::from_secs(2))));
    }
    // Idle clients are disconnected after the idle timeout.
    let started = Instant::now();
    for c in [&silent, &half] {
        c.set_read_timeout(Some(CLIENT_IDLE_TIMEOUT + Duration::from_secs(3)))
            .unwrap();
        let mut buf = [0u8; 16];
        let n = (&*c)
            .read(&mut buf)
            .expect("closed by the VMM, not timed out");
        assert_eq!(n, 0, "{:?}", &buf[..n]);
    }
    assert!(started.elapsed() < CLIENT_IDLE_TIMEOUT + Duration::from_secs(2));
    trickler.join().unwrap();
    assert!(is_running(&status_within(&sock, Duration::from_secs(2))));
    shutdown(&sock, t);
}
