//! A QEMU driven over QMP, killed on drop: shared by the QEMU backup tests and the backup
//! benchmark (examples/qemu_backup_bench.rs, which includes this file by path). Mostly
//! guestless (`-machine none`, disks attached by `blockdev-add`, written by `qemu-io`).
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stead_drivers::vm::qemu::qmp::Qmp;

/// A QEMU process and its QMP client, killed (and reaped) on drop.
pub struct Qemu {
    pub child: Child,
    pub qmp: Qmp,
}

impl Qemu {
    /// A guestless QEMU (`-machine none`) with its QMP socket in `dir`.
    pub fn start(dir: &Path) -> Result<Qemu, String> {
        Self::spawn(&dir.join("qmp.sock"), &["-machine", "none"])
    }

    /// `qemu-system-x86_64 -nodefaults -display none` with `args` and a QMP server on
    /// `sock` (a stale socket is removed first), connected.
    pub fn spawn<S: AsRef<OsStr>>(sock: &Path, args: &[S]) -> Result<Qemu, String> {
        let _ = std::fs::remove_file(sock);
        let mut child = Command::new("qemu-system-x86_64")
            .args(["-nodefaults", "-display", "none", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("qemu-system-x86_64: {e}"))?;
        match Qmp::connect_retry(sock, Duration::from_secs(20)) {
            Ok(qmp) => Ok(Qemu { child, qmp }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!("qmp: {e}"))
            }
        }
    }

    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        self.qmp
            .execute_raw(command, arguments)
            .map_err(|e| e.to_string())
    }

    /// Attaches the qcow2 `image` as format node `node`.
    pub fn attach(&mut self, node: &str, image: &Path) {
        self.execute(
            "blockdev-add",
            json!({"node-name": node, "driver": "qcow2",
                   "file": {"driver": "file", "filename": image}}),
        )
        .expect("blockdev-add");
    }

    /// Runs `qemu-io` command `cmd` (e.g. `write -P 0xab 0 10M`) on `node`.
    pub fn io(&mut self, node: &str, cmd: &str) {
        self.qmp
            .hmp(&format!("qemu-io {node} \"{cmd}\""))
            .expect("qemu-io");
    }

    /// The dirty count of bitmap `name` on `node`, if it exists.
    pub fn bitmap_count(&mut self, node: &str, name: &str) -> Option<u64> {
        let nodes = self
            .execute("query-named-block-nodes", json!({"flat": true}))
            .expect("nodes");
        nodes.as_array()?.iter().find(|n| n["node-name"] == node)?["dirty-bitmaps"]
            .as_array()?
            .iter()
            .find(|b| b["name"] == name)?["count"]
            .as_u64()
    }

    /// Quits cleanly (persistent bitmaps are written into the qcow2).
    pub fn quit(mut self) {
        let _ = self.execute("quit", Value::Null);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
