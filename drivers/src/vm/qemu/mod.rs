//! Full VMs on QEMU.

pub mod backup;
