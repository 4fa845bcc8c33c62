//! The guest image from `scripts/guest-image.sh` boots under plain QEMU (TCG) with both
//! firmwares: SeaBIOS from the GPT disk's BIOS boot partition and OVMF from its ESP (also
//! with secure boot: Debian's signed shim, grub and kernel), with
//! the root disk on virtio-blk and on virtio-scsi. cloud-init (NoCloud seed ISO) sets the
//! hostname and writes a file, and the guest agent answers on its virtio-serial port.
//! SKIPs when the image is not built or QEMU, genisoimage or the firmware are missing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stead_drivers::vm::qemu::qga::Qga;
use stead_e2e::{GuestDisk, skip_unless};

const SEABIOS: &str = "/usr/share/seabios/bios-256k.bin";
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// OVMF with secure boot (needs SMM) and vars with Microsoft's keys enrolled, which
/// Debian's shim is signed with.
const OVMF_CODE_SB: &str = "/usr/share/OVMF/OVMF_CODE_4M.ms.fd";
const OVMF_VARS_SB: &str = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd";
/// Boot to the agent takes 30-70 s under TCG on an idle 2-core machine; leave room for a
/// loaded one.
const BOOT_TIMEOUT: Duration = Duration::from_secs(420);

/// A QEMU process killed (and reaped) on drop, even when the test fails.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

enum Firmware {
    Bios,
    Uefi,
    UefiSecureBoot,
}

enum Bus {
    VirtioBlk,
    VirtioScsi,
}

/// Writes a NoCloud seed ISO (volume `cidata`) into `dir`.
fn seed_iso(dir: &Path, hostname: &str) -> PathBuf {
    let seed = dir.join("seed");
    std::fs::create_dir_all(&seed).expect("mkdir seed");
    std::fs::write(
        seed.join("meta-data"),
        format!("instance-id: {hostname}-1\nlocal-hostname: {hostname}\n"),
    )
    .expect("write meta-data");
    std::fs::write(
        seed.join("user-data"),
        "#cloud-config\nwrite_files:\n  - path: /root/seeded.txt\n    content: \"written by cloud-init\\n\"\n",
    )
    .expect("write user-data");
    let iso = dir.join("seed.iso");
    let st = Command::new("genisoimage")
        .args(["-quiet", "-V", "cidata", "-J", "-r", "-o"])
        .arg(&iso)
        .arg(seed.join("meta-data"))
        .arg(seed.join("user-data"))
        .status()
        .expect("genisoimage");
    assert!(st.success(), "genisoimage failed");
    iso
}

fn launch(disk: &GuestDisk, firmware: Firmware, bus: Bus, seed: &Path, qga: &Path) -> Qemu {
    let dir = disk.dir();
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-m", "1024", "-smp", "1", "-nodefaults"])
        .args(["-display", "none", "-no-user-config"])
        .arg("-serial")
        .arg(format!("file:{}", dir.join("serial.log").display()));
    match firmware {
        Firmware::Bios => {
            cmd.args(["-machine", "pc", "-bios", SEABIOS]);
        }
        Firmware::Uefi => {
            cmd.args(["-machine", "q35"]);
            pflash(&mut cmd, dir, OVMF_CODE, OVMF_VARS);
        }
        Firmware::UefiSecureBoot => {
            cmd.args(["-machine", "q35,smm=on"])
                .args(["-global", "driver=cfi.pflash01,property=secure,value=on"]);
            pflash(&mut cmd, dir, OVMF_CODE_SB, OVMF_VARS_SB);
        }
    }
    cmd.arg("-drive").arg(format!(
        "file={},format=qcow2,if=none,id=root",
        disk.path().display()
    ));
    match bus {
        Bus::VirtioBlk => cmd.args(["-device", "virtio-blk-pci,drive=root,bootindex=0"]),
        Bus::VirtioScsi => cmd.args([
            "-device",
            "virtio-scsi-pci,id=scsi0",
            "-device",
            "scsi-hd,drive=root,bus=scsi0.0,bootindex=0",
        ]),
    };
    cmd.arg("-drive")
        .arg(format!(
            "file={},format=raw,if=none,id=seed,readonly=on",
            seed.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=seed"])
        .arg("-chardev")
        .arg(format!(
            "socket,path={},server=on,wait=off,id=qga0",
            qga.display()
        ))
        .args(["-device", "virtio-serial-pci"])
        .args([
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    Qemu(cmd.spawn().expect("spawn qemu-system-x86_64"))
}

/// OVMF's code (read-only) and a per-VM copy of its vars as the two pflash drives.
fn pflash(cmd: &mut Command, dir: &Path, code: &str, vars_template: &str) {
    let vars = dir.join("OVMF_VARS.fd");
    std::fs::copy(vars_template, &vars).expect("copy OVMF vars");
    cmd.arg("-drive")
        .arg(format!("if=pflash,format=raw,readonly=on,file={code}"))
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,file={}", vars.display()));
}

fn wait_for_socket(path: &Path, qemu: &mut Qemu) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(
            qemu.0.try_wait().ok().flatten().is_none(),
            "qemu exited before creating {}",
            path.display()
        );
        assert!(Instant::now() < deadline, "no {}", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tools_ok(test: &str, firmware: &Firmware) -> bool {
    let has = |p: &str| Path::new(p).exists();
    let genisoimage = Command::new("genisoimage")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let fw_ok = match firmware {
        Firmware::Bios => has(SEABIOS),
        Firmware::Uefi => has(OVMF_CODE) && has(OVMF_VARS),
        Firmware::UefiSecureBoot => has(OVMF_CODE_SB) && has(OVMF_VARS_SB),
    };
    !(skip_unless(genisoimage, test, "genisoimage not installed")
        || skip_unless(fw_ok, test, "firmware not installed (seabios / ovmf)"))
}

fn boots_with_cloud_init_and_agent(test: &str, firmware: Firmware, bus: Bus) {
    if !tools_ok(test, &firmware) {
        return;
    }
    let secure_boot = matches!(firmware, Firmware::UefiSecureBoot);
    let Some(disk) = GuestDisk::for_test(test) else {
        return;
    };
    let hostname = "seeded-guest";
    let seed = seed_iso(disk.dir(), hostname);
    let qga = disk.dir().join("qga.sock");
    let started = Instant::now();
    let mut qemu = launch(&disk, firmware, bus, &seed, &qga);
    wait_for_socket(&qga, &mut qemu);

    // stead's own agent client: it syncs with the agent, retrying until BOOT_TIMEOUT.
    let serial = || std::fs::read_to_string(disk.dir().join("serial.log")).unwrap_or_default();
    let mut agent = Qga::connect(&qga, BOOT_TIMEOUT).unwrap_or_else(|e| {
        panic!(
            "{test}: no guest agent after {:?} ({e}); serial log:\n{}",
            started.elapsed(),
            serial()
        )
    });
    let t = Duration::from_secs(30);
    let ping = agent.execute_raw("guest-ping", Value::Null, t);
    assert!(ping.is_ok(), "{test}: guest-ping: {ping:?}");
    eprintln!("{test}: guest agent answered after {:?}", started.elapsed());

    // The agent starts after cloud-init's init stage, which sets the hostname and
    // writes files.
    let name = agent.execute_raw("guest-get-host-name", Value::Null, t);
    assert_eq!(
        name.as_ref().ok().and_then(|r| r["host-name"].as_str()),
        Some(hostname),
        "hostname from the seed: {name:?}"
    );
    let open = agent.execute_raw("guest-file-open", json!({"path": "/root/seeded.txt"}), t);
    let handle = open.as_ref().ok().and_then(Value::as_i64);
    assert!(handle.is_some(), "file written by cloud-init: {open:?}");
    let read = agent.execute_raw("guest-file-read", json!({"handle": handle}), t);
    assert_eq!(
        read.as_ref().ok().and_then(|r| r["count"].as_u64()),
        Some("written by cloud-init\n".len() as u64),
        "{read:?}"
    );
    if secure_boot {
        let on = agent.exec(
            "/bin/sh",
            &["-c", "dmesg | grep -q 'Secure boot enabled'"],
            None,
            Duration::from_secs(60),
        );
        assert_eq!(
            on.as_ref().ok().and_then(|o| o.exit_code),
            Some(0),
            "the kernel reports secure boot on: {on:?}"
        );
    }
}

#[test]
fn guest_image_boots_bios_virtio_blk() {
    boots_with_cloud_init_and_agent(
        "guest_image_boots_bios_virtio_blk",
        Firmware::Bios,
        Bus::VirtioBlk,
    );
}

#[test]
fn guest_image_boots_uefi_virtio_scsi() {
    boots_with_cloud_init_and_agent(
        "guest_image_boots_uefi_virtio_scsi",
        Firmware::Uefi,
        Bus::VirtioScsi,
    );
}

#[test]
fn guest_image_boots_uefi_secure_boot() {
    boots_with_cloud_init_and_agent(
        "guest_image_boots_uefi_secure_boot",
        Firmware::UefiSecureBoot,
        Bus::VirtioBlk,
    );
}
