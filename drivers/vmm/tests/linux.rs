//! Boots a real Linux kernel. Needs hardware virtualization: under PVM (software
//! virtualization) stock Linux cannot boot, so the test is skipped there.

#![allow(clippy::unwrap_used)] // unwrap is fine in tests

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{kvm_or_skip, serial, wait_serial};
use stead_vmm::{Vm, VmConfig};

/// `STEAD_TEST_KERNEL`, else the running kernel's image under /boot.
fn find_kernel() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("STEAD_TEST_KERNEL") {
        return Some(PathBuf::from(p));
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let p = PathBuf::from(format!("/boot/vmlinuz-{}", release.trim()));
    p.exists().then_some(p)
}

#[test]
fn linux_boot() {
    if !kvm_or_skip("linux_boot") {
        return;
    }
    if !stead_vmm::has_hardware_virtualization() {
        println!("SKIP linux_boot: no hardware virtualization (PVM)");
        return;
    }
    let Some(kernel) = find_kernel() else {
        println!("SKIP linux_boot: no kernel image (set STEAD_TEST_KERNEL)");
        return;
    };
    let mut cfg = VmConfig::new(kernel);
    cfg.vcpus = 1;
    cfg.mem_bytes = 256 << 20;
    cfg.cmdline = "console=ttyS0 reboot=k panic=-1 noapic nomodule".into();
    let vm = Vm::new(cfg).unwrap();
    let h = vm.handle();
    let t = std::thread::spawn(move || vm.run().unwrap());
    let booted = wait_serial(&h, "Linux version", Duration::from_secs(60));
    h.kill();
    let _ = t.join();
    assert!(booted, "no Linux banner on serial: {}", serial(&h));
}
