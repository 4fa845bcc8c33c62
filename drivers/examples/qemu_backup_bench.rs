//! First vs incremental backup of a running QEMU VM's disk (`benches/qemu/backup.sh`).
//!
//! `qemu_backup_bench IMAGE WORKDIR [CHANGE_MIB]`: attaches the qcow2 `IMAGE` to a
//! guestless QEMU (`-machine none`, disk by `blockdev-add`), backs it up into a store in
//! `WORKDIR`, writes `CHANGE_MIB` MiB (default 10) through `qemu-io`, backs up again, and
//! prints both backups' wall time and bytes read, one `key value` pair per line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use serde_json::json;
use stead_drivers::backup::BackupStore;
use stead_drivers::backup::store::{BackupInfo, BackupOptions};
use stead_drivers::vm::qemu::backup::{self, Disk, VmBackupOptions};

#[path = "../tests/qemu_util/mod.rs"]
mod qemu_util;

use qemu_util::Qemu;

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
    let mut q = Qemu::start(&work)?;
    let r = measure(&mut q, image, work, change_mib);
    q.quit();
    r
}

fn measure(q: &mut Qemu, image: PathBuf, work: PathBuf, change_mib: u64) -> Result<(), String> {
    q.attach("disk0", &image);
    let store = BackupStore::for_pool(&work.join("pool"));
    let disks = [Disk {
        input: "disk0".into(),
        node: "disk0".into(),
        image,
    }];
    let opts = VmBackupOptions {
        work_dir: work,
        speed: None,
        nvram: None,
    };
    let (first, t1) = timed_backup(q, &store, &disks, &opts)?;
    q.io("disk0", &format!("write -P 0x5a 1G {change_mib}M"));
    let (second, t2) = timed_backup(q, &store, &disks, &opts)?;
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
    // The job targets are made in WORKDIR and opened by QEMU: an absolute path.
    let work = match std::path::absolute(work) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("qemu_backup_bench: WORKDIR: {e}");
            return ExitCode::FAILURE;
        }
    };
    match run(image.into(), work, change) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qemu_backup_bench: {e}");
            ExitCode::FAILURE
        }
    }
}
