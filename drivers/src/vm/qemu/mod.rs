//! Full VMs through QEMU: the QMP and guest agent clients, and (with the engine) the
//! command line, supervisor wiring, cloud-init seed and backups.

pub mod backup;
mod jsonline;
pub mod qga;
pub mod qmp;
#[cfg(test)]
mod test_qemu;
