//! `stead snapshot create VirtualMachine/x` on a running qemu-engine VM quiesces it: the
//! guest agent freezes the guest's file systems when it answers, QMP `stop` pauses it
//! while its disks are snapshotted, then `cont` (and the thaw) — the contract the vmm
//! engine meets through its pause.
//!
//! - [`qemu_snapshot_of_a_running_guestless_vm_pauses_and_resumes_it`]: a guestless QEMU
//!   (SeaBIOS on a blank disk, TCG): the snapshot reports the pause, the VM runs again
//!   with the same QEMU; a VM the operator paused stays paused; a VM with `agent: true`
//!   whose agent does not answer is paused alone, and the report says why; rollback
//!   restarts it on the snapshot's bytes.
//! - [`qemu_snapshot_freezes_the_guest_through_its_agent`]: the Debian guest image with its
//!   agent: the report names the frozen file systems, and the guest's file systems are
//!   thawed after.
//!
//! Needs root and QEMU (and the guest image for the second); otherwise `SKIP`. Build the
//! binary first: `cargo build --bin stead`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod qemu_util;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use qemu_util::{BOOT_TIMEOUT, QemuSandbox, guest_image, pool, wait_until};
use serde_json::Value;
use stead_drivers::vm::qemu::qga::Qga;
use stead_drivers::vm::qemu::qmp::{self, Qmp};
use stead_e2e::{Sandbox, is_root, skip_unless};

/// QEMU's run state, asked over QMP directly.
fn qmp_status(qs: &QemuSandbox, vm: &str) -> qmp::RunState {
    let mut q =
        Qmp::connect(&qs.paths(vm).qmp_socket(), Duration::from_secs(5)).expect("QMP connect");
    q.query_status().expect("query-status").status
}

fn qmp(qs: &QemuSandbox, vm: &str, cmd: &str) {
    let mut q =
        Qmp::connect(&qs.paths(vm).qmp_socket(), Duration::from_secs(5)).expect("QMP connect");
    q.execute_raw(cmd, Value::Null).expect(cmd);
}

/// A guestless VM: SeaBIOS finds nothing to boot on the blank qcow2 disk and waits.
fn guestless(name: &str, agent: bool) -> String {
    format!(
        "---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: {name}-disk}}\n\
         spec: {{pool: vms, size: 16Mi, format: qcow2}}\n\
         ---\napiVersion: stead.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {name}}}\n\
         spec:\n  engine: qemu\n  accel: tcg\n  firmware: bios\n  cpus: 1\n  memory: 64Mi\n  \
         disks: [{{volume: {name}-disk}}]\n  agent: {agent}\n  restartPolicy: never\n"
    )
}

/// `stead snapshot create VirtualMachine/vm snap`: its stdout, after exit 0.
fn snapshot(sb: &Sandbox, vm: &str, snap: &str) -> String {
    let out = sb
        .run(&["snapshot", "create", &format!("VirtualMachine/{vm}"), snap])
        .expect_code(0);
    out.stdout()
}

#[test]
fn qemu_snapshot_of_a_running_guestless_vm_pauses_and_resumes_it() {
    const TEST: &str = "qemu_snapshot_of_a_running_guestless_vm_pauses_and_resumes_it";
    if skip_unless(is_root(), TEST, "needs root") || !stead_e2e::qemu_ok(TEST) {
        return;
    }
    let qs = QemuSandbox::new();
    let sb = &qs.sb;
    let m = qs.set_manifest(&format!(
        "{}{}{}",
        pool(sb),
        guestless("g1", false),
        guestless("g2", true)
    ));
    sb.run(&["apply", "--yes", &m]).expect_code(0);
    let pid = qs.runtime("g1")["pid"].as_i64().expect("QEMU pid");
    assert_eq!(qmp_status(&qs, "g1"), qmp::RunState::Running);

    // Running: paused for the snapshot, then running again in the same QEMU.
    let out = snapshot(sb, "g1", "s1");
    assert!(
        out.contains("consistency: paused VirtualMachine/g1 "),
        "{out}"
    );
    assert_eq!(qmp_status(&qs, "g1"), qmp::RunState::Running, "resumed");
    assert_eq!(qs.runtime("g1")["pid"].as_i64(), Some(pid));
    let snap = sb.path("pools/vms/snapshots/g1-disk/s1.raw");
    assert!(snap.is_file(), "{}", snap.display());

    // Paused by the operator: not running, so nothing is quiesced, and it stays paused.
    qmp(&qs, "g1", "stop");
    let out = snapshot(sb, "g1", "s2");
    assert!(out.contains("consistency: not running"), "{out}");
    assert_eq!(
        qmp_status(&qs, "g1"),
        qmp::RunState::Paused,
        "an operator's pause is kept"
    );
    qmp(&qs, "g1", "cont");

    // An agent that does not answer (no guest): paused alone, and the report says so.
    let t = Instant::now();
    let out = snapshot(sb, "g2", "s1");
    assert!(
        out.contains(
            "consistency: paused VirtualMachine/g2 (crash-consistent: guest agent not answering"
        ),
        "{out}"
    );
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    assert_eq!(qmp_status(&qs, "g2"), qmp::RunState::Running, "resumed");

    // Rollback: the VM restarts (a new QEMU) on the snapshot.
    let out = sb
        .run(&["snapshot", "rollback", "VirtualMachine/g1", "s1", "--yes"])
        .expect_code(0);
    wait_until("g1 running again", Duration::from_secs(60), || {
        qs.runtime("g1")["vmState"] == "running"
    });
    assert_ne!(
        qs.runtime("g1")["pid"].as_i64(),
        Some(pid),
        "restarted: {}",
        out.stdout()
    );
    sb.run(&["snapshot", "delete", "VirtualMachine/g1", "s1"])
        .expect_code(0);
    assert!(!snap.exists());
}

#[test]
fn qemu_snapshot_freezes_the_guest_through_its_agent() {
    const TEST: &str = "qemu_snapshot_freezes_the_guest_through_its_agent";
    if skip_unless(is_root(), TEST, "needs root") {
        return;
    }
    let Some(image) = guest_image(TEST) else {
        return;
    };
    let qs = QemuSandbox::new();
    let sb = &qs.sb;
    let vm = format!(
        "---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: fz-root}}\n\
         spec: {{pool: vms, size: 2Gi, format: qcow2, source: {{file: {}}}}}\n\
         ---\napiVersion: stead.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: fz}}\n\
         spec:\n  engine: qemu\n  accel: tcg\n  firmware: bios\n  cpus: 1\n  memory: 512Mi\n  \
         disks: [{{volume: fz-root, boot: 1}}]\n  agent: true\n  restartPolicy: never\n",
        image.display()
    );
    let m = qs.set_manifest(&format!("{}{vm}", pool(sb)));
    sb.run(&["apply", "--yes", &m]).expect_code(0);
    let qga: PathBuf = qs.paths("fz").qga_socket();
    wait_until("the guest agent", BOOT_TIMEOUT, || {
        Qga::connect(&qga, Duration::from_secs(3)).is_ok_and(|mut a| a.ping().is_ok())
    });

    let out = snapshot(sb, "fz", "s1");
    eprintln!("{}", out.trim());
    assert!(
        out.contains("consistency: paused VirtualMachine/fz (guest agent froze "),
        "{out}"
    );
    assert_eq!(qmp_status(&qs, "fz"), qmp::RunState::Running, "resumed");
    let mut a = Qga::connect(&qga, Duration::from_secs(10)).expect("agent");
    let st = a.fsfreeze_status().expect("fsfreeze-status");
    assert_eq!(format!("{st:?}").to_lowercase(), "thawed", "{st:?}");
}
