//! The Debian guest disk image for QEMU-engine tests, built once by
//! `scripts/guest-image.sh` and cached outside the clone, and per-test copy-on-write
//! overlays of it so that no test ever writes the cached image.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::skip_unless;

/// Environment variable naming a guest image to use instead of the cached one.
pub const GUEST_IMAGE_ENV: &str = "STEAD_GUEST_IMAGE";

/// `scripts/guest-image.sh` in this checkout.
pub fn guest_image_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("scripts")
        .join("guest-image.sh")
}

/// Where the cached image for this checkout's script is (built or not): `$STEAD_GUEST_IMAGE`,
/// else what `scripts/guest-image.sh --print-path` says (it hashes the script and its
/// inputs; `STEAD_ASSETS` moves the cache). `None` when the script can't be run.
pub fn guest_image_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(GUEST_IMAGE_ENV) {
        return Some(PathBuf::from(p));
    }
    let out = Command::new("bash")
        .arg(guest_image_script())
        .arg("--print-path")
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!path.is_empty()).then(|| PathBuf::from(path))
}

/// The cached guest image (qcow2) when `scripts/guest-image.sh` has built it; otherwise
/// prints `SKIP <test>: guest image not built (scripts/guest-image.sh)` and returns `None`.
pub fn guest_image(test: &str) -> Option<PathBuf> {
    let path = guest_image_path().filter(|p| p.is_file());
    if skip_unless(
        path.is_some(),
        test,
        "guest image not built (scripts/guest-image.sh)",
    ) {
        return None;
    }
    path
}

/// Whether `qemu-system-x86_64` and `qemu-img` can be run; prints the SKIP line when not.
pub fn qemu_ok(test: &str) -> bool {
    let runs = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    !(skip_unless(
        runs("qemu-system-x86_64"),
        test,
        "qemu-system-x86 not installed",
    ) || skip_unless(runs("qemu-img"), test, "qemu-utils not installed"))
}

/// Creates `dir/name` as a qcow2 overlay backed by `image` (`qemu-img create -f qcow2 -b
/// IMAGE -F qcow2`): writes land in the overlay, the image stays as it is.
pub fn create_overlay(image: &Path, dir: &Path, name: &str) -> std::io::Result<PathBuf> {
    let path = dir.join(name);
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(image)
        .arg(&path)
        .output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "qemu-img create {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(path)
}

/// A per-test overlay of the guest image in its own temp dir, removed on drop.
pub struct GuestDisk {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl GuestDisk {
    /// An overlay of `image` in a new temp dir.
    pub fn overlay(image: &Path) -> std::io::Result<GuestDisk> {
        let dir = tempfile::Builder::new().prefix("stead-guest-").tempdir()?;
        let path = create_overlay(image, dir.path(), "disk.qcow2")?;
        Ok(GuestDisk { dir, path })
    }

    /// For test `test`: an overlay of the cached guest image, or `None` after a SKIP line
    /// when the image or QEMU's tools are missing.
    pub fn for_test(test: &str) -> Option<GuestDisk> {
        if !qemu_ok(test) {
            return None;
        }
        let image = guest_image(test)?;
        Some(GuestDisk::overlay(&image).expect("qemu-img create overlay"))
    }

    /// The overlay (qcow2).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The temp dir holding the overlay, for a test's other files (seed ISO, sockets).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Asks the QEMU guest agent on chardev socket `sock` to run `command` (one JSON object)
/// and returns its reply, retrying until `timeout`: a guest-sync with a fresh id every
/// 200 ms until one is answered (a guest whose agent is not up yet drops them), then the
/// command. `None` when no reply came in time.
pub fn guest_agent(
    sock: &Path,
    command: &serde_json::Value,
    timeout: Duration,
) -> Option<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    let mut id = SYNC_IDS.start + u64::from(std::process::id()) * 4099 % (1 << 30);
    while Instant::now() < deadline {
        if let Some(reply) = agent_exchange(sock, command, deadline, &mut id) {
            return Some(reply);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// Runs `sh -c SHELL` in the guest through the agent (`guest-exec`, then
/// `guest-exec-status` until it exits) and returns its exit code; `None` when the agent
/// does not answer or the command outlives `timeout`.
pub fn guest_exec_status(sock: &Path, shell: &str, timeout: Duration) -> Option<i64> {
    let deadline = Instant::now() + timeout;
    let exec = serde_json::json!({"execute": "guest-exec",
        "arguments": {"path": "/bin/sh", "arg": ["-c", shell]}});
    let pid = guest_agent(sock, &exec, timeout)?["return"]["pid"].as_i64()?;
    while Instant::now() < deadline {
        let status = serde_json::json!({"execute": "guest-exec-status", "arguments": {"pid": pid}});
        let reply = guest_agent(sock, &status, Duration::from_secs(30))?;
        if reply["return"]["exited"].as_bool() == Some(true) {
            return reply["return"]["exitcode"].as_i64();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

/// guest-sync ids come from this range: an integer reply in it is a (possibly stale)
/// sync reply, never a command's answer (file handles are small, times far larger).
const SYNC_IDS: std::ops::Range<u64> = (1 << 24)..(1 << 31);

fn is_sync_reply(reply: &serde_json::Value) -> bool {
    reply["return"]
        .as_u64()
        .is_some_and(|r| SYNC_IDS.contains(&r))
}

fn agent_exchange(
    sock: &Path,
    command: &serde_json::Value,
    deadline: Instant,
    id: &mut u64,
) -> Option<serde_json::Value> {
    let mut stream = UnixStream::connect(sock).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut sent = Vec::new();
    let mut synced = false;
    while !synced && Instant::now() < deadline {
        *id = if *id + 1 < SYNC_IDS.end {
            *id + 1
        } else {
            SYNC_IDS.start
        };
        sent.push(*id);
        let sync = serde_json::json!({"execute": "guest-sync", "arguments": {"id": *id}});
        writeln!(stream, "{sync}").ok()?;
        while let Some(reply) = read_reply(&mut reader) {
            if reply["return"].as_u64().is_some_and(|r| sent.contains(&r)) {
                synced = true;
                break;
            }
        }
    }
    if !synced {
        return None;
    }
    stream
        .set_read_timeout(Some(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_secs(5)),
        ))
        .ok()?;
    writeln!(stream, "{command}").ok()?;
    loop {
        let reply = read_reply(&mut reader)?;
        if !is_sync_reply(&reply) {
            return Some(reply);
        }
    }
}

/// One JSON line from the agent (skipping the 0xff delimiter bytes it may send); `None` on
/// timeout, EOF or garbage.
fn read_reply(reader: &mut impl BufRead) -> Option<serde_json::Value> {
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).ok()? == 0 {
            return None;
        }
        let text: Vec<u8> = line.iter().copied().filter(|b| *b != 0xff).collect();
        let text = String::from_utf8_lossy(&text);
        if !text.trim().is_empty() {
            return serde_json::from_str(text.trim()).ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_reply_skips_delimiters_and_blank_lines() {
        let mut input: &[u8] = b"\xff\n\n{\"return\": 7}\n";
        let reply = read_reply(&mut input).expect("a reply");
        assert_eq!(reply["return"], 7);
        assert!(read_reply(&mut input).is_none());
    }

    #[test]
    fn sync_replies_are_told_from_answers() {
        assert!(is_sync_reply(
            &serde_json::json!({"return": SYNC_IDS.start + 5})
        ));
        assert!(!is_sync_reply(&serde_json::json!({"return": 1000})));
        assert!(!is_sync_reply(&serde_json::json!({"return": {}})));
        assert!(!is_sync_reply(
            &serde_json::json!({"return": 1_733_000_000_000_000_000_u64})
        ));
    }

    #[test]
    fn script_path_points_into_the_checkout() {
        assert!(guest_image_script().is_file());
    }
}
