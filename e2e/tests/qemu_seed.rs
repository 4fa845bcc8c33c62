//! The cloud-init NoCloud seed stead generates, read by the real cloud-init of the guest
//! image (`scripts/guest-image.sh`): plain `qemu-system-x86_64` under TCG, the image as
//! a qcow2 overlay and the seed ISO as a read-only virtio disk, as the vmm engine
//! attaches it. Independent of the QEMU engine: this checks the seed itself.
//!
//! Skips (with a `SKIP` line) without QEMU, genisoimage or the built guest image.

mod qemu_util;

use std::process::Command;

use qemu_util::{BOOT_TIMEOUT, KillOnDrop, PASSWORD_HASH, SSH_KEY, guest_image, read_text};
use stead_drivers::vm::qemu::cloudinit::{seed_files, write_seed_iso};
use stead_schema::{CloudInitSpec, CloudInitUser};

const TEST: &str = "seed_is_applied_by_the_guests_cloud_init";

/// The manifest's raw user-data: a second user (appended to stead's list), a marker
/// file, and a report of what cloud-init did, written to the serial console.
const USER_DATA: &str = r#"#cloud-config
users:
  - name: extra
    shell: /bin/sh
write_files:
  - path: /etc/stead-e2e/marker
    content: "marker-7f3a\n"
  - path: /usr/local/sbin/stead-e2e-report
    permissions: "0755"
    content: |
      #!/bin/sh
      {
        echo "stead-e2e: hostname=$(hostname)"
        echo "stead-e2e: marker=$(cat /etc/stead-e2e/marker)"
        echo "stead-e2e: ops-groups=$(id -nG ops | tr ' ' ,)"
        echo "stead-e2e: ops-shell=$(getent passwd ops | cut -d: -f7)"
        echo "stead-e2e: ops-hash=$(getent shadow ops | cut -d: -f2)"
        echo "stead-e2e: ops-keys=$(cat /home/ops/.ssh/authorized_keys)"
        echo "stead-e2e: ops-sudo=$(grep -c '^ops ALL=(ALL) NOPASSWD:ALL' /etc/sudoers.d/90-cloud-init-users)"
        echo "stead-e2e: extra=$(id -un extra)"
        echo "stead-e2e: default-user=$(id -un debian 2>/dev/null || echo none)"
        echo "stead-e2e: instance=$(cat /run/cloud-init/.instance-id)"
        echo "stead-e2e: report done"
      } > /dev/ttyS0 2>&1
runcmd:
  - [/usr/local/sbin/stead-e2e-report]
"#;

#[test]
fn seed_is_applied_by_the_guests_cloud_init() {
    let Some(image) = guest_image(TEST) else {
        return;
    };
    let t = tempfile::tempdir().expect("tmp");
    let overlay = t.path().join("root.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&image)
        .arg(&overlay)
        .status()
        .expect("qemu-img");
    assert!(st.success(), "qemu-img create overlay");

    let spec = CloudInitSpec {
        hostname: Some("seed-guest".into()),
        users: vec![CloudInitUser {
            name: "ops".into(),
            ssh_authorized_keys: vec![SSH_KEY.into()],
            password_hash: Some(PASSWORD_HASH.into()),
            sudo: true,
            groups: vec!["adm".into()],
            shell: Some("/bin/bash".into()),
        }],
        network: None,
        user_data: Some(USER_DATA.into()),
        vendor_data: None,
    };
    let seed = seed_files("seedvm", &spec);
    let iso = t.path().join("seed.iso");
    write_seed_iso(&seed, &iso).expect("seed ISO");

    let console = t.path().join("console.log");
    let qemu = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-machine",
            "pc",
            "-m",
            "512",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
        ])
        .arg(format!("file:{}", console.display()))
        .arg("-drive")
        .arg(format!("if=virtio,format=qcow2,file={}", overlay.display()))
        .arg("-drive")
        .arg(format!(
            "if=virtio,format=raw,readonly=on,file={}",
            iso.display()
        ))
        .spawn()
        .expect("spawn qemu");
    let _qemu = KillOnDrop(qemu);

    let log = qemu_util::wait_for_text(
        "the guest's cloud-init report on the serial console",
        BOOT_TIMEOUT,
        &["stead-e2e: report done"],
        || read_text(&console),
    );
    // The report's lines may share a console line with getty's login prompt, which is
    // written to the same serial port at the same time ("seed-guest login: stead-e2e: …").
    const MARK: &str = "stead-e2e: ";
    let report: Vec<&str> = log
        .lines()
        .filter_map(|l| {
            let l = l.trim_end_matches('\r');
            l.find(MARK).map(|i| &l[i + MARK.len()..])
        })
        .collect();
    let want = [
        "hostname=seed-guest".to_string(),
        "marker=marker-7f3a".into(),
        "ops-groups=ops,adm".into(),
        "ops-shell=/bin/bash".into(),
        format!("ops-hash={PASSWORD_HASH}"),
        format!("ops-keys={SSH_KEY}"),
        "ops-sudo=1".into(),
        "extra=extra".into(),
        "default-user=none".into(),
        format!("instance={}", seed.instance_id),
        "report done".into(),
    ];
    assert_eq!(report, want, "console:\n{}", qemu_util::tail(&log, 6000));
}
