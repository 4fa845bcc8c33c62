//! Full virtual machines through QEMU, and what both engines share with it.
//!
//! - [`cloudinit`]: the cloud-init NoCloud seed (`cidata` ISO) generated from a manifest
//!   (both engines attach it).

pub mod cloudinit;
