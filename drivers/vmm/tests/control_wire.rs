//! The control socket's wire format is frozen: a VM supervisor of an older binary talks to a
//! newer VMM and vice versa. These tests feed the exact lines older binaries send and
//! receive, and every input of the control fuzz corpus, and check they parse to the same
//! values and that `to_line` emits the same bytes as the recorded golden file
//! (`tests/data/control_wire.golden`, written by the protocol before it was typed with serde
//! enums; regenerate only on a deliberate protocol change, with `STEAD_BLESS=1`).

#![allow(clippy::unwrap_used)] // unwrap is fine in tests

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use stead_vmm::{Reply, Request, RunState, StatusReply, parse_request};

fn status(state: RunState, vcpus: u8, uptime_ms: u64, pid: u32, exit: Option<&str>) -> Reply {
    Reply::Ok(StatusReply {
        state,
        vcpus,
        uptime_ms,
        pid,
        exit_reason: exit.map(str::to_string),
    })
}

#[test]
fn request_lines_of_older_clients_parse_to_the_same_requests() {
    let cases = [
        // What `Request::to_line` sent (the VM supervisor and driver).
        ("{\"command\":\"status\"}", Request::Status),
        ("{\"command\":\"pause\"}", Request::Pause),
        ("{\"command\":\"resume\"}", Request::Resume),
        ("{\"command\":\"shutdown\"}", Request::Shutdown),
        ("{\"command\":\"kill\"}", Request::Kill),
        // Bare words (the first protocol; `stead vmm` users typing at the socket).
        ("status", Request::Status),
        ("status\n", Request::Status),
        ("  PAUSE ", Request::Pause),
        ("Resume\r\n", Request::Resume),
        ("shutdown", Request::Shutdown),
        ("KILL", Request::Kill),
        // Hand-written JSON with spaces.
        ("{\"command\": \"resume\"}", Request::Resume),
        (" { \"command\" : \"kill\" } \n", Request::Kill),
    ];
    for (line, want) in cases {
        assert_eq!(parse_request(line).ok(), Some(want), "{line:?}");
    }
    for (req, line) in [
        (Request::Status, "{\"command\":\"status\"}"),
        (Request::Pause, "{\"command\":\"pause\"}"),
        (Request::Resume, "{\"command\":\"resume\"}"),
        (Request::Shutdown, "{\"command\":\"shutdown\"}"),
        (Request::Kill, "{\"command\":\"kill\"}"),
    ] {
        assert_eq!(req.to_line(), line);
    }
    for bad in [
        "{\"cmd\":\"x\"}",
        "{\"command\":\"status\",\"x\":1}",
        "{\"x\":\"\\\"command\\\": \\\"kill\\\"\"}",
        "{\"command\":\"reboot\"}",
        "{\"command\":\"STATUS\"}",
        "{\"command\":",
        "",
        "stat us",
        "[\"status\"]",
    ] {
        assert!(parse_request(bad).is_err(), "{bad:?} parsed");
    }
}

#[test]
fn reply_lines_of_older_vmms_parse_to_the_same_replies_and_back() {
    let cases = [
        (
            "{\"ok\":true,\"state\":\"running\",\"vcpus\":2,\"uptime_ms\":12,\"pid\":42}",
            status(RunState::Running, 2, 12, 42, None),
        ),
        (
            "{\"ok\":true,\"state\":\"paused\",\"vcpus\":2,\"uptime_ms\":12,\"pid\":42}",
            status(RunState::Paused, 2, 12, 42, None),
        ),
        (
            "{\"ok\":true,\"state\":\"created\",\"vcpus\":1,\"uptime_ms\":0,\"pid\":1}",
            status(RunState::Created, 1, 0, 1, None),
        ),
        (
            "{\"ok\":true,\"state\":\"exited\",\"vcpus\":4,\"uptime_ms\":18446744073709551615,\"pid\":4294967295,\"exit_reason\":\"guest shut down\"}",
            status(
                RunState::Exited,
                4,
                u64::MAX,
                u32::MAX,
                Some("guest shut down"),
            ),
        ),
        (
            "{\"ok\":false,\"error\":\"request line longer than 65536 bytes\"}",
            Reply::Error("request line longer than 65536 bytes".into()),
        ),
        (
            "{\"ok\":false,\"error\":\"more than 16 control clients\"}",
            Reply::Error("more than 16 control clients".into()),
        ),
        (
            "{\"ok\":false,\"error\":\"request is not UTF-8\"}",
            Reply::Error("request is not UTF-8".into()),
        ),
        (
            "{\"ok\":false,\"error\":\"no \\\"such\\\"\\n\"}",
            Reply::Error("no \"such\"\n".into()),
        ),
    ];
    for (line, want) in cases {
        assert_eq!(Reply::parse(line).ok(), Some(want.clone()), "{line:?}");
        assert_eq!(want.to_line(), line);
    }
    // Readers were lenient in what they accepted: field order, spaces, unknown fields.
    let lenient = [
        (
            "{\"pid\":42,\"uptime_ms\":12,\"vcpus\":2,\"state\":\"running\",\"ok\":true}",
            status(RunState::Running, 2, 12, 42, None),
        ),
        (
            " {\"ok\": true, \"state\": \"running\", \"vcpus\": 2, \"uptime_ms\": 12, \"pid\": 42, \"future\": [1]}\n",
            status(RunState::Running, 2, 12, 42, None),
        ),
        (
            "{\"ok\":false,\"error\":\"x\",\"state\":\"running\"}",
            Reply::Error("x".into()),
        ),
    ];
    for (line, want) in lenient {
        assert_eq!(Reply::parse(line).ok(), Some(want), "{line:?}");
    }
    for bad in [
        "{\"ok\":true}",
        "{\"ok\":false}",
        "{\"ok\":true,\"error\":\"x\"}",
        "{\"ok\":true,\"state\":\"running\",\"vcpus\":2,\"uptime_ms\":12}",
        "{\"ok\":true,\"state\":\"rebooting\",\"vcpus\":2,\"uptime_ms\":12,\"pid\":42}",
        "{\"ok\":true,\"state\":\"running\",\"vcpus\":256,\"uptime_ms\":12,\"pid\":42}",
        "{\"state\":\"running\",\"vcpus\":2,\"uptime_ms\":12,\"pid\":42}",
        "status",
        "",
    ] {
        assert!(Reply::parse(bad).is_err(), "{bad:?} parsed");
    }
}

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(
        &std::env::var_os("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("../../fuzz/corpus/control");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&f).unwrap())
        })
        .collect()
}

/// The request and the reply `bytes` parse to, each as its line (`null` where refused).
fn parsed(bytes: &[u8]) -> (Option<String>, Option<String>) {
    let text = std::str::from_utf8(bytes).ok();
    let request = text
        .and_then(|t| parse_request(t).ok())
        .map(Request::to_line);
    let reply = text.and_then(|t| Reply::parse(t).ok()).map(|r| r.to_line());
    (request, reply)
}

/// What the protocol makes of one corpus input: as a whole, and each of its lines that
/// parses as a request or a reply (numbered from 0).
fn outcome(name: &str, data: &[u8]) -> Value {
    let (request, reply) = parsed(data);
    let lines: Vec<Value> = data
        .split(|b| *b == b'\n')
        .enumerate()
        .filter_map(|(i, line)| match parsed(line) {
            (None, None) => None,
            (q, r) => Some(json!([i, q, r])),
        })
        .collect();
    json!({"file": name, "request": request, "reply": reply, "lines": lines})
}

#[test]
fn control_corpus_parses_as_the_golden_file_recorded() {
    let golden = Path::new(
        &std::env::var_os("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("tests/data/control_wire.golden");
    let got: Vec<String> = corpus()
        .iter()
        .map(|(name, data)| outcome(name, data).to_string())
        .collect();
    if std::env::var_os("STEAD_BLESS").is_some() {
        std::fs::write(&golden, got.join("\n") + "\n").unwrap();
    }
    let want = std::fs::read_to_string(&golden).unwrap();
    let want: Vec<&str> = want.lines().collect();
    // New corpus inputs (the fuzzer grows the corpus) are not in the golden file; every
    // recorded one must still give the recorded outcome.
    let by_file: std::collections::HashMap<String, &String> = corpus()
        .iter()
        .map(|(n, _)| n.clone())
        .zip(got.iter())
        .collect();
    let mut checked = 0;
    for w in &want {
        let v: Value = serde_json::from_str(w).unwrap();
        let file = v["file"].as_str().unwrap();
        if let Some(g) = by_file.get(file) {
            assert_eq!(*g, w, "corpus input {file}");
            checked += 1;
        }
    }
    assert!(
        checked >= 1000,
        "only {checked} golden inputs still in the corpus"
    );
    let requests = want
        .iter()
        .filter(|w| !w.contains("\"request\":null"))
        .count();
    let replies = want
        .iter()
        .filter(|w| !w.contains("\"reply\":null"))
        .count();
    let lines = want.iter().filter(|w| !w.contains("\"lines\":[]")).count();
    assert!(
        requests > 0 && replies > 0 && lines > 0,
        "{requests} requests, {replies} replies, {lines} with parsed lines"
    );
}
