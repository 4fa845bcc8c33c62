//! Full virtual machines on QEMU (`qemu-system-x86_64`), the `qemu` engine of
//! `VirtualMachine`:
//! - [`config`]: the typed VM configuration ([`config::QemuConfig`]) resolved from a spec;
//! - [`argv`]: the QEMU command line, a pure function of that configuration;
//! - [`firmware`]: SeaBIOS / OVMF through the firmware descriptors QEMU packages ship, and
//!   the per-VM UEFI NVRAM;
//! - [`accel`]: KVM or TCG;
//! - [`supervisor`]: `stead qemu`, one supervising process per VM running one QEMU;
//! - [`driver`]: observe / apply / delete of a qemu-engine VM (called by the VM driver).

pub mod accel;
pub mod argv;
pub mod config;

pub mod firmware;
