//! The accelerator of a QEMU VM: KVM when the host can run a full guest under it, else
//! QEMU's TCG (software emulation, correct but many times slower).
//!
//! A full guest (firmware, a stock kernel) needs hardware virtualization: `/dev/kvm`
//! alone is not enough (a paravirtualized KVM such as PVM runs stead-vmm's microVMs but
//! not a stock kernel), so `auto` also asks for the CPU's `vmx`/`svm` flag.

use serde::{Deserialize, Serialize};
use stead_schema::VmAccel;

/// Where the KVM device lives.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// The accelerator a VM runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization through KVM.
    Kvm,
    /// QEMU's tiny code generator (emulation).
    Tcg,
}

impl Accel {
    /// `kvm` or `tcg`.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// What the host offers for running full guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCaps {
    /// `/dev/kvm` exists.
    pub kvm_device: bool,
    /// The CPU flags show hardware virtualization (`vmx` or `svm`).
    pub hardware_virt: bool,
}

impl HostCaps {
    /// This host's capabilities.
    pub fn detect() -> Self {
        HostCaps {
            kvm_device: std::path::Path::new(KVM_DEVICE).exists(),
            hardware_virt: stead_host::ProcFs::host().cpu_has_any_flag(&["vmx", "svm"]),
        }
    }

    /// Why KVM cannot run a full guest here; `None` when it can.
    pub fn kvm_unusable(self) -> Option<&'static str> {
        match (self.kvm_device, self.hardware_virt) {
            (false, _) => Some("no /dev/kvm"),
            (true, false) => Some("the CPU shows no hardware virtualization (vmx/svm)"),
            (true, true) => None,
        }
    }
}

/// The accelerator a VM gets, and the warning to show when `auto` fell back to TCG.
/// `kvm` on a host that cannot run a full guest is an error.
pub fn choose(want: VmAccel, caps: HostCaps) -> Result<(Accel, Option<String>), String> {
    match (want, caps.kvm_unusable()) {
        (VmAccel::Tcg, _) => Ok((Accel::Tcg, None)),
        (VmAccel::Kvm | VmAccel::Auto, None) => Ok((Accel::Kvm, None)),
        (VmAccel::Kvm, Some(why)) => Err(format!(
            "accel kvm: this host cannot run a full guest under KVM ({why}); use accel tcg or auto"
        )),
        (VmAccel::Auto, Some(why)) => Ok((
            Accel::Tcg,
            Some(format!(
                "running under TCG emulation (slow): KVM cannot run a full guest here ({why})"
            )),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: HostCaps = HostCaps {
        kvm_device: true,
        hardware_virt: true,
    };
    const PVM: HostCaps = HostCaps {
        kvm_device: true,
        hardware_virt: false,
    };
    const NONE: HostCaps = HostCaps {
        kvm_device: false,
        hardware_virt: true,
    };

    #[test]
    fn auto_picks_kvm_only_with_hardware_virtualization() {
        assert_eq!(choose(VmAccel::Auto, FULL), Ok((Accel::Kvm, None)));
        let (a, warn) = choose(VmAccel::Auto, PVM).expect("auto");
        assert_eq!(a, Accel::Tcg);
        assert!(warn.expect("warning").contains("vmx/svm"));
        let (a, warn) = choose(VmAccel::Auto, NONE).expect("auto");
        assert_eq!(a, Accel::Tcg);
        assert!(warn.expect("warning").contains("/dev/kvm"));
    }

    #[test]
    fn explicit_choices() {
        assert_eq!(choose(VmAccel::Tcg, FULL), Ok((Accel::Tcg, None)));
        assert_eq!(choose(VmAccel::Kvm, FULL), Ok((Accel::Kvm, None)));
        let e = choose(VmAccel::Kvm, PVM).expect_err("kvm on PVM");
        assert!(e.contains("cannot run a full guest"), "{e}");
    }
}
