//! Seccomp: a forbidden syscall in a VMM thread kills the VMM process with SIGSYS.

#![allow(clippy::unwrap_used)] // unwrap is fine in tests

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use common::{kvm_or_skip, serial, tiny};
use stead_vmm::{ExitReason, Vm};

const CHILD_ENV: &str = "STEAD_VMM_SECCOMP_CHILD";

#[test]
fn seccomp_kills_forbidden_syscall() {
    if !kvm_or_skip("seccomp_kills_forbidden_syscall") {
        return;
    }
    if std::env::var_os(CHILD_ENV).is_some() {
        // Child: run the VMM with the filter and the test-only port enabled.
        let mut cfg = tiny("seccomp");
        cfg.seccomp = true;
        cfg.test_forbidden_syscall_port = true;
        let r = Vm::new(cfg).unwrap().run();
        println!("child survived the forbidden syscall: {r:?}");
        std::process::exit(3);
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args([
            "--exact",
            "seccomp_kills_forbidden_syscall",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "child status {:?}, stdout: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn forbidden_port_without_seccomp_is_harmless() {
    if !kvm_or_skip("forbidden_port_without_seccomp_is_harmless") {
        return;
    }
    // Same guest and port, filter off: the syscall succeeds and the guest goes on.
    let mut cfg = tiny("seccomp");
    cfg.seccomp = false;
    cfg.test_forbidden_syscall_port = true;
    let vm = Vm::new(cfg).unwrap();
    let h = vm.handle();
    assert_eq!(vm.run().unwrap(), ExitReason::Shutdown);
    assert!(serial(&h).contains("seccomp: still alive"));
}

#[test]
fn seccomp_allows_normal_operation_without_the_test_port() {
    if !kvm_or_skip("seccomp_allows_normal_operation_without_the_test_port") {
        return;
    }
    // Filter on, test port off: the port write is an ordinary ignored PIO write.
    let mut cfg = tiny("seccomp");
    cfg.seccomp = true;
    let vm = Vm::new(cfg).unwrap();
    let h = vm.handle();
    assert_eq!(vm.run().unwrap(), ExitReason::Shutdown);
    assert!(serial(&h).contains("seccomp: still alive"));
}
