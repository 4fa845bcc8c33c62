//! Issue 14 acceptance (full guests through the QEMU engine, TCG): the Debian guest image
//! of `scripts/guest-image.sh`, imported into a qcow2 Volume (`source.file`), configured
//! by stead's cloud-init seed.
//!
//! - [`qemu_bios_vm_cloud_init_bridge_restart_delete`]: SeaBIOS; cloud-init sets the
//!   hostname and writes a file named in the manifest (read back on the serial console);
//!   the guest pings a busybox container on the same bridge; `stead get` shows the
//!   guest's IP (from the guest agent); a memory change is planned `restart`, applied,
//!   and the guest comes back with the new size; stopping it powers it off gracefully
//!   (the kernel's "reboot: Power down" on the console; delete takes the same path), and
//!   deleting it keeps its disk Volume.
//! - [`qemu_uefi_vm_nvram_survives_a_restart`]: OVMF; the guest writes an EFI variable,
//!   the VM is stopped and started: same NVRAM file, holding the variable, which the
//!   second boot reads back.
//! - [`qemu_bad_input_is_refused_with_nothing_made`]: a cloud-init user without key or
//!   password, a disk bus QEMU lacks: refused by `validate` and by `apply`, nothing made.
//!
//! Each test runs in its own sandbox (netns, cgroup parent, state/run dirs, pool in a temp
//! dir) and tears down on failure. Needs root, QEMU, genisoimage and the built guest
//! image; otherwise prints `SKIP`. A missing firmware file and a wrong image digest are
//! in `qemu_import.rs` (no guest needed).

mod qemu_util;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use qemu_util::{BOOT_TIMEOUT, QemuSandbox, SSH_KEY, guest_image, pool, tail, wait_for_text};
use serde_json::Value;
use stead_e2e::{Sandbox, busybox_ok, is_root, skip_unless};

/// Guest MAC and address on the sandbox bridge (10.234.0.0/24).
const GUEST_MAC: &str = "52:54:00:e2:34:10";
const GUEST_IP: &str = "10.234.0.10";
const PEER_IP: &str = "10.234.0.3";

/// Whether the full-guest tests can run (root, QEMU, the built guest image); `None`
/// after a SKIP line.
fn ready(test: &str) -> Option<PathBuf> {
    if skip_unless(is_root(), test, "needs root") {
        return None;
    }
    guest_image(test)
}

fn pool_and_volume(sb: &Sandbox, image: &Path, volume: &str) -> String {
    format!(
        "{}---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: {volume}}}\n\
         spec: {{pool: vms, size: 2Gi, format: qcow2, source: {{file: {}}}}}\n",
        pool(sb),
        image.display()
    )
}

/// The pool, a template Volume made from `image` (`policy`: its deletionPolicy) and, when
/// `clone` is set, a linked clone of it named `clone`.
fn pool_template_and_clone(
    sb: &Sandbox,
    image: &Path,
    policy: &str,
    clone: Option<&str>,
) -> String {
    let mut text = format!(
        "apiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: vms}}\n\
         spec: {{type: dir, path: {}, content: [images, rootdir]}}\n\
         ---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: tpl}}\n\
         spec: {{pool: vms, size: 2Gi, format: qcow2, template: true, deletionPolicy: {policy}, \
         source: {{file: {}}}}}\n",
        sb.path("pools/vms").display(),
        image.display()
    );
    if let Some(c) = clone {
        text.push_str(&format!(
            "---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: {c}}}\n\
             spec: {{pool: vms, size: 2Gi, format: qcow2, clone: {{from: tpl}}}}\n"
        ));
    }
    text
}

/// SHA-256 (hex) of a file, through `sha256sum`.
fn sha256_of(p: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(p)
        .output()
        .expect("sha256sum");
    assert!(out.status.success(), "sha256sum {}", p.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// A TCG VirtualMachine booting `volume` with `firmware`; `extra` is more spec lines
/// (indented two spaces), `cloud_init` the `cloudInit` block's lines (indented four).
fn vm_yaml(
    name: &str,
    volume: &str,
    memory: &str,
    firmware: &str,
    extra: &str,
    cloud_init: &str,
) -> String {
    format!(
        "apiVersion: stead.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {name}}}\nspec:\n  \
         engine: qemu\n  accel: tcg\n  firmware: {firmware}\n  cpus: 1\n  memory: {memory}\n  \
         disks: [{{volume: {volume}, boot: 1}}]\n  agent: true\n  restartPolicy: never\n{extra}  \
         cloudInit:\n    users: [{{name: ops, sshAuthorizedKeys: [\"{SSH_KEY}\"], sudo: true}}]\n{cloud_init}"
    )
}

/// Indents every line of `text` by `n` spaces.
fn indent(text: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    text.lines().map(|l| format!("{pad}{l}\n")).collect()
}

/// The raw user-data of the BIOS test: a marker file, a report once (hostname, marker,
/// ping of the container), and a line with the memory size on every boot. Lines go
/// through the kernel log at level 2 (printed on the serial console despite `quiet`):
/// writes to `/dev/ttyS0` fail when the serial getty hangs the port up meanwhile.
const BIOS_USER_DATA: &str = r#"#cloud-config
write_files:
  - path: /etc/stead-e2e/marker
    content: "marker-b105\n"
  - path: /var/lib/cloud/scripts/per-boot/stead-e2e-up.sh
    permissions: "0755"
    content: |
      #!/bin/sh
      echo "<2>stead-e2e: up mem=$(awk '/MemTotal/ {print $2}' /proc/meminfo)" > /dev/kmsg
runcmd:
  - - sh
    - -c
    - |
      {
        echo "<2>stead-e2e: hostname=$(hostname)"
        echo "<2>stead-e2e: marker=$(cat /etc/stead-e2e/marker)"
        ok=no
        for i in 1 2 3 4 5 6 7 8 9 10; do
          if ping -c 1 -W 2 10.234.0.3 >/dev/null 2>&1; then ok=yes; break; fi
          sleep 1
        done
        echo "<2>stead-e2e: ping=$ok"
        echo "<2>stead-e2e: report done"
      } > /dev/kmsg 2>&1
"#;

fn bios_manifest(gs: &QemuSandbox, image: &Path, memory: &str, with_vm: bool) -> String {
    let sb = &gs.sb;
    // Made once: the running container's busybox cannot be copied over.
    let mut root = sb.path("ct-root");
    if !root.join("bin/busybox").exists() {
        root = sb.busybox_rootfs();
        for a in ["ping", "ip"] {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(a));
        }
    }
    let mut text = format!(
        "{}---\napiVersion: stead.dev/v1alpha1\nkind: Network\nmetadata: {{name: lan0}}\n\
         spec: {{type: bridge, addresses: [10.234.0.1/24]}}\n\
         ---\napiVersion: stead.dev/v1alpha1\nkind: Container\nmetadata: {{name: peer}}\nspec:\n  \
         rootfs: {{path: {}}}\n  unprivileged: false\n  command: [/bin/sh, -c, \"sleep 100000\"]\n  \
         interfaces: [{{name: eth0, network: lan0, address: {PEER_IP}/24}}]\n",
        pool_template_and_clone(sb, image, "Retain", Some("guest-root")),
        root.display()
    );
    if with_vm {
        let cloud_init = format!(
            "    hostname: ci-guest\n    network:\n      version: 2\n      ethernets:\n        lan:\n          \
             match: {{macaddress: \"{GUEST_MAC}\"}}\n          addresses: [{GUEST_IP}/24]\n    userData: |\n{}",
            indent(BIOS_USER_DATA, 6)
        );
        text.push_str("---\n");
        text.push_str(&vm_yaml(
            "guest",
            "guest-root",
            memory,
            "bios",
            &format!("  interfaces: [{{network: lan0, mac: \"{GUEST_MAC}\"}}]\n"),
            &cloud_init,
        ));
    }
    gs.set_manifest(&text)
}

/// `MemTotal` (KiB) of every "up" line on the console, in order.
fn boots_mem(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.split("stead-e2e: up mem=").nth(1))
        .filter_map(|m| m.trim().parse().ok())
        .collect()
}

#[test]
fn qemu_bios_vm_cloud_init_bridge_restart_delete() {
    const TEST: &str = "qemu_bios_vm_cloud_init_bridge_restart_delete";
    if !busybox_ok(TEST) {
        return;
    }
    let Some(image) = ready(TEST) else {
        return;
    };
    let gs = QemuSandbox::new();
    let sb = &gs.sb;
    let m = bios_manifest(&gs, &image, "512Mi", true);
    sb.run(&["apply", "--yes", &m]).expect_code(0);
    // The guest boots from a linked clone of a template; the template never changes.
    let tpl = sb.path("pools/vms/images/tpl.qcow2");
    let tpl_sum = sha256_of(&tpl);

    // cloud-init: host name, the manifest's file, the container reached over the bridge.
    let console = wait_for_text(
        "cloud-init's report on the serial console",
        BOOT_TIMEOUT,
        &["stead-e2e: report done", "stead-e2e: up mem="],
        || gs.console("guest"),
    );
    for want in [
        "stead-e2e: hostname=ci-guest",
        "stead-e2e: marker=marker-b105",
        "stead-e2e: ping=yes",
    ] {
        assert!(console.contains(want), "{want}:\n{}", tail(&console, 6000));
    }
    let first = boots_mem(&console);
    assert_eq!(first.len(), 1, "one boot so far: {first:?}");

    // The guest agent's view: `stead get` shows the guest's address.
    wait_for_text(
        "the guest IP in `stead get -o json`",
        Duration::from_secs(120),
        &[GUEST_IP],
        || gs.get_vm("guest")["status"]["runtime"]["guestIps"].to_string(),
    );
    assert_unprivileged(&gs.get_vm("guest")["status"]["runtime"]);

    // memory 512Mi -> 640Mi: planned as a restart, applied, the guest boots with it.
    let m2 = bios_manifest(&gs, &image, "640Mi", true);
    let diff = sb.run(&["diff", &m2]).expect_code(2).stdout();
    assert!(
        diff.contains("memory") && diff.contains("impact: restart"),
        "{diff}"
    );
    sb.run(&["apply", "--yes", &m2]).expect_code(0);
    assert_eq!(
        gs.get_vm("guest")["status"]["observed"]["memory"],
        640u64 << 20,
        "observed memory after the apply"
    );
    wait_until("a second boot with more memory", BOOT_TIMEOUT, || {
        boots_mem(&gs.console("guest"))
            .iter()
            .any(|&kib| kib > first[0] + 100 * 1024)
    });
    // Fully up again before the power button is pressed (ACPI is handled by logind).
    std::thread::sleep(Duration::from_secs(5));

    // Stop (the path delete takes too): ACPI, then the guest agent; the guest powers
    // itself off, which the kernel prints on the console.
    let m_stop = bios_manifest(&gs, &image, "640Mi", true);
    let text = std::fs::read_to_string(sb.path("m/all.yaml")).expect("manifest");
    gs.set_manifest(&text.replace(
        "  restartPolicy: never\n",
        "  restartPolicy: never\n  state: stopped\n",
    ));
    sb.run(&["apply", "--yes", &m_stop]).expect_code(0);
    let console = gs.console("guest");
    assert!(
        console.contains("reboot: Power down"),
        "no graceful power-off on the console (lastExit {}):\n{}",
        gs.get_vm("guest")["status"]["runtime"]["lastExit"],
        tail(&console, 4000)
    );
    // Delete: the VM leaves the manifests; its disk Volume stays.
    let m3 = bios_manifest(&gs, &image, "640Mi", false);
    sb.run(&["apply", "--yes", &m3]).expect_code(0);
    assert!(
        !sb.path("run/vms/guest").exists(),
        "the VM's run dir is removed"
    );
    let list = sb.run(&["get", "vm", "-o", "json"]).expect_code(0).stdout();
    assert!(!list.contains("\"guest\""), "{list}");
    // The disk Volume (deletionPolicy Retain) is still there.
    sb.run(&["get", "volume/guest-root"]).expect_code(0);
    let files: Vec<String> = walk(&sb.path("pools/vms"))
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|n| n.starts_with("guest-root"))
        .collect();
    assert!(!files.is_empty(), "disk of Volume/guest-root kept");

    // The template is unchanged by everything its clone's guest did.
    assert_eq!(sha256_of(&tpl), tpl_sum, "the template's bytes changed");
    // A template that a clone on the host still needs cannot be deleted: the clone leaves
    // the manifests (kept on disk, Retain), the template is set to Delete, then leaves too.
    let rest = m3_rest(&std::fs::read_to_string(sb.path("m/all.yaml")).expect("manifest"));
    let with_tpl = format!(
        "{}{rest}",
        pool_template_and_clone(sb, &image, "Delete", None)
    );
    let m4 = gs.set_manifest(&with_tpl);
    sb.run(&["apply", "--yes", &m4]).expect_code(0);
    let without_tpl = with_tpl.replace(
        &pool_template_and_clone(sb, &image, "Delete", None),
        &format!(
            "apiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: vms}}\n\
             spec: {{type: dir, path: {}, content: [images, rootdir]}}\n",
            sb.path("pools/vms").display()
        ),
    );
    let m5 = gs.set_manifest(&without_tpl);
    let refused = sb.run(&["apply", "--yes", &m5]);
    let text = format!("{}{}", refused.stdout(), refused.stderr());
    assert_ne!(
        refused.code(),
        0,
        "deleting a template with a clone: {text}"
    );
    assert!(
        text.contains("Volume/guest-root") && text.contains("still needs it"),
        "{text}"
    );
    assert!(tpl.exists(), "the refused delete left the template");
    // The operator deletes the clone first; then the template goes.
    for f in files {
        let _ = std::fs::remove_file(sb.path("pools/vms/images").join(f));
    }
    sb.run(&["apply", "--yes", &m5]).expect_code(0);
    assert!(
        !tpl.exists(),
        "the template is deleted once no clone needs it"
    );
}

/// The BIOS manifest after the pool and volumes (network and container).
/// QEMU runs as `stead-qemu` when the host has that user (scripts/install-deps.sh makes
/// it; the sandbox is searchable by it), and `stead get` warns of nothing but TCG.
fn assert_unprivileged(runtime: &serde_json::Value) {
    use stead_drivers::vm::qemu::runas;
    let warning = runtime["warning"].as_str().unwrap_or_default();
    let Some(creds) = runas::lookup(runas::DEFAULT_USER) else {
        println!(
            "SKIP unprivileged QEMU check: no user {}",
            runas::DEFAULT_USER
        );
        assert!(warning.contains("QEMU runs as root"), "{runtime}");
        return;
    };
    assert!(!warning.contains("runs as root"), "{warning}");
    let pid = runtime["pid"].as_i64().expect("QEMU pid") as i32;
    let status = stead_host::process::Proc::host()
        .read(pid, "status")
        .expect("QEMU status");
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u32>().ok());
    assert_eq!(uid, Some(creds.uid), "QEMU's uid");
}

fn m3_rest(text: &str) -> String {
    let at = text
        .find("kind: Network")
        .and_then(|i| text[..i].rfind("---\n"))
        .expect("network in the manifest");
    text[at..].to_string()
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = std::time::Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The EFI variable the UEFI guest writes (efivarfs: name-GUID, 4 attribute bytes first).
const EFI_VAR: &str = "SteadE2e-5b2c7e1a-3f4d-4c8e-9a61-0d2f7b3c9e45";

fn uefi_user_data() -> String {
    format!(
        r#"#cloud-config
write_files:
  - path: /var/lib/cloud/scripts/per-boot/stead-e2e-up.sh
    permissions: "0755"
    content: |
      #!/bin/sh
      # efivarfs files cannot seek: read through a pipe, skip the 4 attribute bytes.
      f=/sys/firmware/efi/efivars/{EFI_VAR}
      v=none
      [ -e "$f" ] && v=$(cat "$f" | tail -c +5)
      sb=off
      dmesg | grep -q 'Secure boot enabled' && sb=on
      echo "<2>stead-e2e: up efi=$([ -d /sys/firmware/efi ] && echo yes || echo no) sb=$sb nvram=$v" > /dev/kmsg
runcmd:
  - [sh, -c, "printf '\\007\\000\\000\\000stead-nvram-ok' > /sys/firmware/efi/efivars/{EFI_VAR} && echo '<2>stead-e2e: var written' > /dev/kmsg"]
"#
    )
}

fn uefi_manifest(gs: &QemuSandbox, image: &Path, state: &str) -> String {
    let cloud_init = format!("    userData: |\n{}", indent(&uefi_user_data(), 6));
    let text = format!(
        "{}---\n{}",
        pool_and_volume(&gs.sb, image, "uefi-root"),
        vm_yaml(
            "uefi",
            "uefi-root",
            "512Mi",
            "uefi",
            // Secure boot through stead: OVMF with Microsoft's keys, the image's signed
            // shim, grub and kernel.
            &format!("  state: {state}\n  secureBoot: true\n"),
            &cloud_init
        )
    );
    gs.set_manifest(&text)
}

/// `s` as UTF-16LE bytes (how OVMF stores variable names).
fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

#[test]
fn qemu_uefi_vm_nvram_survives_a_restart() {
    const TEST: &str = "qemu_uefi_vm_nvram_survives_a_restart";
    let Some(image) = ready(TEST) else {
        return;
    };
    let gs = QemuSandbox::new();
    let sb = &gs.sb;
    let m = uefi_manifest(&gs, &image, "running");
    sb.run(&["apply", "--yes", &m]).expect_code(0);
    let console = wait_for_text(
        "the first UEFI boot and the variable write",
        BOOT_TIMEOUT,
        &["stead-e2e: up efi=yes", "stead-e2e: var written"],
        || gs.console("uefi"),
    );
    assert!(
        console.contains("stead-e2e: up efi=yes sb=on nvram=none"),
        "secure boot on, no variable yet:\n{}",
        tail(&console, 6000)
    );
    assert_unprivileged(&gs.get_vm("uefi")["status"]["runtime"]);
    assert!(!console.contains("nvram=stead-nvram-ok"), "{console}");

    // Stop (graceful), then the NVRAM file holds the variable.
    let m = uefi_manifest(&gs, &image, "stopped");
    sb.run(&["apply", "--yes", &m]).expect_code(0);
    let nvram = nvram_file(sb, "uefi");
    let before = std::fs::metadata(&nvram).expect("NVRAM file");
    let bytes = std::fs::read(&nvram).expect("read NVRAM");
    let name = utf16le("SteadE2e");
    assert!(
        bytes.windows(name.len()).any(|w| w == name.as_slice()),
        "the guest's variable is in {}",
        nvram.display()
    );

    // Start again: the same file, and the second boot reads the variable back.
    let m = uefi_manifest(&gs, &image, "running");
    sb.run(&["apply", "--yes", &m]).expect_code(0);
    let after = std::fs::metadata(&nvram).expect("NVRAM file");
    assert_eq!(
        (before.dev(), before.ino()),
        (after.dev(), after.ino()),
        "the NVRAM file is kept, not made again"
    );
    wait_for_text(
        "the second UEFI boot",
        BOOT_TIMEOUT,
        &["stead-e2e: up efi=yes sb=on nvram=stead-nvram-ok"],
        || gs.console("uefi"),
    );
}

/// The NVRAM vars file of VM `name`: `nvram` in its runtime status when the engine
/// reports it, else the engine's place for it (`<state>/vms/<name>/nvram.fd`).
fn nvram_file(sb: &Sandbox, name: &str) -> PathBuf {
    let out = sb
        .run(&["get", &format!("vm/{name}"), "-o", "json"])
        .expect_code(0)
        .stdout();
    let v: Value = serde_json::from_str(&out).expect("json");
    if let Some(p) = v["items"][0]["status"]["runtime"]["nvram"].as_str() {
        return PathBuf::from(p);
    }
    sb.path("state").join("vms").join(name).join("nvram.fd")
}

#[test]
fn qemu_bad_input_is_refused_with_nothing_made() {
    const TEST: &str = "qemu_bad_input_is_refused_with_nothing_made";
    let Some(image) = ready(TEST) else {
        return;
    };
    let gs = QemuSandbox::new();
    let sb = &gs.sb;
    let cases = [
        (
            "a cloud-init user without key or password",
            vm_yaml("bad", "bad-root", "512Mi", "bios", "", "").replace(
                &format!("sshAuthorizedKeys: [\"{SSH_KEY}\"], sudo: true"),
                "sudo: true",
            ),
            "neither sshAuthorizedKeys nor passwordHash",
        ),
        (
            "a disk bus QEMU lacks",
            vm_yaml("bad", "bad-root", "512Mi", "bios", "", "")
                .replace("boot: 1}", "boot: 1, bus: ide}"),
            "ide",
        ),
    ];
    for (what, vm, why) in cases {
        assert_ne!(vm, vm_yaml("bad", "bad-root", "512Mi", "bios", "", ""));
        let m = gs.set_manifest(&format!(
            "{}---\n{vm}",
            pool_and_volume(sb, &image, "bad-root")
        ));
        let out = sb.run(&["validate", &m]).expect_code(1);
        let text = format!("{}{}", out.stdout(), out.stderr());
        assert!(text.contains(why), "{what}: {text}");
        assert!(
            text.contains("all.yaml:"),
            "{what}: errors name the file: {text}"
        );
        let out = sb.run(&["apply", "--yes", &m]).expect_code(1);
        let text = format!("{}{}", out.stdout(), out.stderr());
        assert!(text.contains(why), "{what}: apply: {text}");
        // Nothing made: no resource known, no pool dir, no VM run dir.
        let got = sb.run(&["get", "-o", "json"]).expect_code(0).stdout();
        let v: Value = serde_json::from_str(&got).expect("json");
        assert_eq!(v["items"], Value::Array(vec![]), "{what}: {got}");
        assert!(!sb.path("pools/vms").exists(), "{what}: pool made");
        assert!(!sb.path("run/vms/bad").exists(), "{what}: VM made");
    }
}
