//! Helpers shared by the KVM integration tests.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use stead_vmm::{TINY_GUEST_IMAGE, VmConfig, VmHandle};

/// Returns false (after printing the SKIP line) when /dev/kvm is unusable.
pub fn kvm_or_skip(name: &str) -> bool {
    match stead_vmm::kvm_unavailable() {
        None => true,
        Some(_) => {
            println!("SKIP {name}: /dev/kvm absent");
            false
        }
    }
}

/// A tiny-guest config running `mode`.
pub fn tiny(mode: &str) -> VmConfig {
    let mut cfg = VmConfig::new(PathBuf::from(TINY_GUEST_IMAGE));
    cfg.mem_bytes = 32 << 20;
    cfg.cmdline = format!("mode={mode}");
    cfg
}

/// Serial output as text.
pub fn serial(h: &VmHandle) -> String {
    String::from_utf8_lossy(&h.serial_output()).into_owned()
}

/// Waits until the serial output contains `needle`.
pub fn wait_serial(h: &VmHandle, needle: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if serial(h).contains(needle) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}
