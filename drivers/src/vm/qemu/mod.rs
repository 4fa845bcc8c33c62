//! Full VMs through QEMU (`qemu-system-x86_64`): firmware boot of disk images,
//! cloud-init, the guest agent, QMP. One QEMU process per VM under the shared
//! supervisor ([`crate::supervise`]).
