//! First vs incremental backup of a running QEMU VM's disk (`benches/qemu/backup.sh`).
//!
//! `qemu_backup_bench IMAGE WORKDIR [CHANGE_MIB]`: attaches the qcow2 `IMAGE` to a
//! guestless QEMU (`-machine none`, disk by `blockdev-add`), backs it up into a store in
//! `WORKDIR`, writes `CHANGE_MIB` MiB (default 10) through `qemu-io`, backs up again, and
//! prints both backups' wall time and bytes read, one `key value` pair per line.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stead_drivers::backup::BackupStore;
use stead_drivers::backup::store::{BackupInfo, BackupOptions};
use stead_drivers::vm::qemu::backup::{self, Disk, VmBackupOptions};
use stead_drivers::vm::qemu::qmp::Qmp;

/// A guestless QEMU and its QMP client; quit on drop.
struct Qemu {
    child: Child,
    qmp: Qmp,
}

impl Qemu {
    fn start(sock: &Path) -> Result<Qemu, String> {
        let _ = std::fs::remove_file(sock);
        let mut child = Command::new("qemu-system-x86_64")
            .args([
                "-machine",
                "none",
                "-nodefaults",
                "-display",
                "none",
                "-qmp",
            ])
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("qemu-system-x86_64: {e}"))?;
        match Qmp::connect_retry(sock, Duration::from_secs(20)) {
            Ok(qmp) => Ok(Qemu { child, qmp }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e.to_string())
            }
        }
    }

    fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        self.qmp
            .execute_raw(command, arguments)
            .map_err(|e| e.to_string())
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.execute("quit", Value::Null);
        let _ = self.child.wait();
    }
}

fn timed_backup(
    q: &mut Qemu,
    store: &BackupStore,
    disks: &[Disk],
    opts: &VmBackupOptions,
) -> Result<(BackupInfo, f64), String> {
    let t = Instant::now();
    let info = backup::backup_vm(
        &mut q.qmp,
        None,
        store,
        "VirtualMachine/bench",
        &json!({}),
        disks,
        opts,
        BackupOptions::default(),
    )
    .map_err(|e| e.to_string())?;
    Ok((info, t.elapsed().as_secs_f64()))
}

fn run(image: PathBuf, work: PathBuf, change_mib: u64) -> Result<(), String> {
    let mut q = Qemu::start(&work.join("qmp.sock"))?;
    q.execute(
        "blockdev-add",
        json!({"node-name": "disk0", "driver": "qcow2",
               "file": {"driver": "file", "filename": image}}),
    )?;
    let store = BackupStore::for_pool(&work.join("pool"));
    let disks = [Disk {
        input: "disk0".into(),
        node: "disk0".into(),
        image: image.clone(),
    }];
    let opts = VmBackupOptions {
        work_dir: work.clone(),
        speed: None,
        nvram: None,
    };
    let (first, t1) = timed_backup(&mut q, &store, &disks, &opts)?;
    q.execute(
        "human-monitor-command",
        json!({"command-line": format!("qemu-io disk0 \"write -P 0x5a 1G {change_mib}M\"")}),
    )?;
    let (second, t2) = timed_backup(&mut q, &store, &disks, &opts)?;
    let read = |i: &BackupInfo| i.stats.read_bytes.unwrap_or(0);
    println!("disk_bytes {}", first.stats.bytes);
    println!("first_seconds {t1:.3}");
    println!("first_read_bytes {}", read(&first));
    println!("first_stored_bytes {}", first.stats.stored_bytes);
    println!("second_seconds {t2:.3}");
    println!("second_read_bytes {}", read(&second));
    println!("second_stored_bytes {}", second.stats.stored_bytes);
    println!("speedup {:.1}", t1 / t2.max(1e-6));
    println!(
        "second_consistency {}",
        second.consistency.unwrap_or_default()
    );
    Ok(())
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(image), Some(work)) = (args.next(), args.next()) else {
        eprintln!("usage: qemu_backup_bench IMAGE WORKDIR [CHANGE_MIB]");
        return ExitCode::from(2);
    };
    let change = args.next().and_then(|c| c.parse().ok()).unwrap_or(10);
    match run(image.into(), work.into(), change) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qemu_backup_bench: {e}");
            ExitCode::FAILURE
        }
    }
}
