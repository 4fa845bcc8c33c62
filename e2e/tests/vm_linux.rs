//! Issue 5 acceptance (VM part, hardware virtualization only): a Debian cloud kernel with
//! the busybox initramfs of `examples/guest-assets/build-linux-guest.sh` boots in stead's
//! VMM, mounts an ext4 file system from its virtio-blk disk (a stead Volume) and pings a
//! container on the same bridge over virtio-net.
//!
//! Runs only when /proc/cpuinfo has `vmx` or `svm` (Linux does not boot on PVM-based
//! nested KVM); otherwise prints `SKIP linux_boot_e2e: no hardware virtualization (PVM)`.
//! Assets: `$STEAD_LINUX_GUEST_DIR/{vmlinuz,initrd.img}`, else the script is run once
//! into `/var/cache/stead/linux-guest` (needs apt and network access).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use stead_e2e::{Sandbox, is_root, skip_unless};

const TEST: &str = "linux_boot_e2e";

fn has_hw_virt() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}

fn guest_assets() -> PathBuf {
    if let Some(d) = std::env::var_os("STEAD_LINUX_GUEST_DIR") {
        return PathBuf::from(d);
    }
    let dir = PathBuf::from("/var/cache/stead/linux-guest");
    if !dir.join("vmlinuz").exists() || !dir.join("initrd.img").exists() {
        let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf());
        let script = manifest_dir.join("../examples/guest-assets/build-linux-guest.sh");
        let st = Command::new("sh")
            .arg(&script)
            .arg(&dir)
            .status()
            .expect("run build-linux-guest.sh");
        assert!(st.success(), "build-linux-guest.sh failed");
    }
    dir
}

/// A busybox root file system for the container.
fn busybox_rootfs(sb: &Sandbox) -> PathBuf {
    let root = sb.path("ct-root");
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir rootfs");
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static");
    for a in ["sh", "sleep", "ip", "ping"] {
        let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(a));
    }
    root
}

fn manifest(sb: &Sandbox, with_workloads: bool, assets: &Path, ct_root: &Path) -> PathBuf {
    let mut text = format!(
        "apiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: local}}\nspec: {{type: dir, path: {}}}\n\
         ---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: linux-root}}\nspec: {{pool: local, size: 64Mi, deletionPolicy: Delete}}\n\
         ---\napiVersion: stead.dev/v1alpha1\nkind: Network\nmetadata: {{name: lan0}}\nspec: {{type: bridge, addresses: [10.232.0.1/24]}}\n",
        sb.path("pools/local").display()
    );
    if with_workloads {
        text.push_str(&format!(
            "---\napiVersion: stead.dev/v1alpha1\nkind: Container\nmetadata: {{name: peer}}\nspec:\n  rootfs: {{path: {}}}\n  unprivileged: false\n  command: [/bin/sh, -c, \"sleep 100000\"]\n  interfaces: [{{name: eth0, network: lan0, address: 10.232.0.3/24}}]\n\
             ---\napiVersion: stead.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: linux}}\nspec:\n  cpus: 1\n  memory: 256Mi\n  boot:\n    kernel: {}\n    initrd: {}\n    cmdline: \"console=ttyS0 reboot=k panic=-1 stead.ip=10.232.0.10/24 stead.ping=10.232.0.3 stead.test=1\"\n  disks: [{{volume: linux-root}}]\n  interfaces: [{{network: lan0}}]\n  restartPolicy: never\n",
            ct_root.display(),
            assets.join("vmlinuz").display(),
            assets.join("initrd.img").display(),
        ));
    }
    sb.write("m/all.yaml", &text);
    sb.path("m")
}

#[test]
fn linux_boot_e2e() {
    if skip_unless(is_root(), TEST, "needs root")
        || skip_unless(Path::new("/dev/kvm").exists(), TEST, "/dev/kvm absent")
        || skip_unless(has_hw_virt(), TEST, "no hardware virtualization (PVM)")
    {
        return;
    }
    let assets = guest_assets();
    let sb = Sandbox::with_netns();
    let ct_root = busybox_rootfs(&sb);

    // Storage and network first, then an ext4 file system with a marker on the volume.
    let m = manifest(&sb, false, &assets, &ct_root);
    sb.run(&["apply", "--yes", m.to_str().unwrap()])
        .expect_code(0);
    let content = sb.path("fs-content");
    std::fs::create_dir_all(&content).expect("mkdir");
    std::fs::write(content.join("stead-marker"), "marker-5e7a\n").expect("marker");
    let image = sb.path("pools/local/images/linux-root.raw");
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&content)
        .arg(&image)
        .status()
        .expect("mkfs.ext4");
    assert!(st.success(), "mkfs.ext4 failed");

    let m = manifest(&sb, true, &assets, &ct_root);
    let m = m.to_str().unwrap();
    sb.run(&["apply", "--yes", m]).expect_code(0);
    let t = Instant::now();
    let mut log = String::new();
    while t.elapsed() < Duration::from_secs(120) {
        log = sb.run(&["logs", "vm/linux"]).stdout();
        if log.contains("stead: test done") {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        log.contains("stead: test done"),
        "guest did not finish:\n{log}"
    );
    assert!(log.contains("stead: guest up"), "{log}");
    assert!(log.contains("stead: vda marker marker-5e7a"), "{log}");
    assert!(log.contains("stead: ping 10.232.0.3 ok"), "{log}");

    sb.run(&["destroy", "--yes", "--allow-data-loss", m])
        .expect_code(0);
    assert!(!sb.path("run/vms/linux").exists());
}
