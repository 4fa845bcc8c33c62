//! The QEMU engine for full VMs (firmware boot of disk images).
