//! Real-KVM tests with the tiny guest built from `guests/`.

mod common;

use std::time::Duration;

use common::{kvm_or_skip, serial, tiny};
use stead_vmm::{ExitReason, Vm};

#[test]
fn serial_hello() {
    if !kvm_or_skip("serial_hello") {
        return;
    }
    let vm = Vm::new(tiny("hello")).unwrap();
    let h = vm.handle();
    let exit = vm.run().unwrap();
    let out = serial(&h);
    assert!(out.contains("hello from stead tiny guest"), "serial: {out:?}");
    assert_eq!(exit, ExitReason::Shutdown);
    let _ = Duration::ZERO;
}
