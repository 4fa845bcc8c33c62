//! Helpers for the QEMU-engine tests (TCG): a sandbox torn down on drop, the cached guest
//! image, a serial console log to wait on, QEMU processes killed on drop.

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;
use stead_drivers::vm::config::Paths;
use stead_e2e::{Sandbox, skip_unless};

/// How long one TCG boot to cloud-init's final stage may take here (≈30 s on an idle
/// machine; CI shares two cores between many jobs).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// An SSH key the schema accepts (the public half of a throwaway key).
pub const SSH_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPigcUEKHRZOtbOlOIhStPbDat1nOYfki95ife3CbA05 e2e@stead";

/// A SHA-512 crypt hash (of "stead-e2e").
pub const PASSWORD_HASH: &str = "$6$e2esalt$gWr4UN9LQWNNjqsM53X0SlefX8eGsEOWGEdnDRNnqFDpFKEMUew4yMyMU8I0hoT8o1BGwLr5p7mhHqO5MzM4C0";

/// A sandbox (own netns, cgroup parent, state/run dirs) for one QEMU-engine test, torn
/// down on drop even when the test fails: `stead destroy` of its manifests (`m/`), then a
/// kill of every process naming its temp dir, then the sandbox itself.
pub struct QemuSandbox {
    kill: KillNaming,
    pub sb: Sandbox,
}

impl QemuSandbox {
    pub fn new() -> Self {
        let sb = Sandbox::with_netns();
        QemuSandbox {
            kill: KillNaming(sb.dir.path().to_string_lossy().into_owned()),
            sb,
        }
    }

    /// The manifest dir.
    pub fn manifests(&self) -> PathBuf {
        self.sb.path("m")
    }

    /// Writes `text` as the only manifest file and returns the manifest dir.
    pub fn set_manifest(&self, text: &str) -> String {
        self.sb.write("m/all.yaml", text);
        self.manifests().to_string_lossy().into_owned()
    }

    /// The run-dir paths of VM `vm` (sockets, console log).
    pub fn paths(&self, vm: &str) -> Paths {
        Paths::new(&self.sb.path("run"), vm)
    }

    /// `stead get vm/NAME -o json`'s item.
    pub fn get_vm(&self, name: &str) -> Value {
        let out = self
            .sb
            .run(&["get", &format!("vm/{name}"), "-o", "json"])
            .expect_code(0);
        let v: Value = serde_json::from_str(&out.stdout()).expect("get json");
        v["items"][0].clone()
    }

    /// The runtime status of VM `name` (`stead get`).
    pub fn runtime(&self, name: &str) -> Value {
        self.get_vm(name)["status"]["runtime"].clone()
    }

    /// The serial console of VM `name`: `stead logs`, else its console log file.
    pub fn console(&self, name: &str) -> String {
        let out = self.sb.run(&["logs", &format!("vm/{name}")]);
        if out.code() == 0 && !out.stdout().is_empty() {
            return out.stdout();
        }
        read_text(&self.paths(name).console_log())
    }
}

impl Drop for QemuSandbox {
    fn drop(&mut self) {
        let m = self.manifests();
        if m.exists() {
            let out = self.sb.run(&[
                "destroy",
                "--yes",
                "--allow-data-loss",
                m.to_str().unwrap_or_default(),
            ]);
            if out.code() != 0 {
                eprintln!("teardown: stead destroy failed: {}", out.stderr());
            }
        }
        let left = self.kill.pids();
        if !left.is_empty() {
            eprintln!("teardown: killing leftover processes {left:?}");
        }
        // `kill` drops next (kills what is left), then `sb`.
    }
}

/// A `dir` StoragePool `vms` in the sandbox (`pools/vms`), the pool the tests' volumes use.
pub fn pool(sb: &Sandbox) -> String {
    format!(
        "apiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: vms}}\n\
         spec: {{type: dir, path: {}, content: [images, rootdir]}}\n",
        sb.path("pools/vms").display()
    )
}

/// Polls `f` every 200 ms until it holds (or fails the test after `timeout`).
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether `prog` runs (`prog --version` exits 0).
pub fn have(prog: &str) -> bool {
    Command::new(prog)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The guest disk image of `scripts/guest-image.sh` (`$STEAD_GUEST_IMAGE` first; see
/// [`stead_e2e::guest_image`]), or `None` after a SKIP line when it is not built or
/// QEMU/genisoimage are missing.
pub fn guest_image(test: &str) -> Option<PathBuf> {
    if !stead_e2e::qemu_ok(test)
        || skip_unless(
            have("genisoimage"),
            test,
            "genisoimage missing (apt package genisoimage)",
        )
    {
        return None;
    }
    stead_e2e::guest_image(test)
}

/// Waits until `read()` holds every one of `needles` (or fails the test with the text).
pub fn wait_for_text(
    what: &str,
    timeout: Duration,
    needles: &[&str],
    mut read: impl FnMut() -> String,
) -> String {
    let t = Instant::now();
    loop {
        let text = read();
        if needles.iter().all(|n| text.contains(n)) {
            return text;
        }
        assert!(
            t.elapsed() < timeout,
            "timed out after {:?} waiting for {what} ({needles:?}); last text:\n{}",
            t.elapsed(),
            tail(&text, 6000)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The last `n` bytes of `s` (on a char boundary).
pub fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// A file read as (lossy) text; empty when absent.
pub fn read_text(p: &Path) -> String {
    std::fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// A child process killed and reaped on drop.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Kills, on drop, every process whose command line names `needle` (this test's
/// sandbox dir): QEMU and supervisors a failed test left running. Only processes that
/// name the test's own temp dir, never by program name.
pub struct KillNaming(pub String);

impl KillNaming {
    /// Pids of the processes naming the needle (not this one).
    pub fn pids(&self) -> Vec<i32> {
        let me = std::process::id() as i32;
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            if pid == me {
                continue;
            }
            if let Ok(c) = std::fs::read(e.path().join("cmdline"))
                && String::from_utf8_lossy(&c).contains(&self.0)
            {
                out.push(pid);
            }
        }
        out
    }
}

impl Drop for KillNaming {
    fn drop(&mut self) {
        for pid in self.pids() {
            stead_e2e::signal(pid, rustix::process::Signal::KILL);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
