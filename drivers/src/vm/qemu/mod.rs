//! Full virtual machines on QEMU (`qemu-system-x86_64`), the `qemu` engine of
//! `VirtualMachine`, and what both engines share with it:
//! - [`config`]: the typed VM configuration ([`config::QemuConfig`]) resolved from a spec;
//! - [`argv`]: the QEMU command line, a pure function of that configuration;
//! - [`firmware`]: SeaBIOS / OVMF through the firmware descriptors QEMU packages ship, and
//!   the per-VM UEFI NVRAM;
//! - [`accel`]: KVM or TCG;
//! - [`qmp`], [`qga`]: the QMP and guest agent clients;
//! - [`runas`]: the unprivileged user QEMU runs as;
//! - [`supervisor`]: `stead qemu`, one supervising process per VM running one QEMU;
//! - [`driver`]: the qemu engine's observe / apply / delete (the VM driver dispatches);
//! - [`cloudinit`]: the cloud-init NoCloud seed (`cidata` ISO) generated from a manifest
//!   (both engines attach it);
//! - [`backup`]: consistent, incremental backups of a running QEMU VM's disks;
//! - [`migrate`]: live migration of a running VM to a QEMU waiting in incoming mode;
//! - [`mirror`]: the disk copy of a live migration whose disks are not shared.

pub mod accel;
pub mod argv;
pub mod backup;
pub mod cloudinit;
pub mod config;
pub mod driver;
pub mod firmware;
mod jsonline;
pub mod migrate;
pub mod mirror;
pub mod qga;
pub mod qmp;
pub mod quiesce;
pub mod runas;
pub mod supervisor;
#[cfg(test)]
mod test_qemu;
