//! `stead import proxmox`: reads a Proxmox VE host's configuration (guest configs,
//! storage.cfg, network interfaces, backup jobs, SDN) and turns it into stead manifests
//! plus a report of every setting that was not carried over. Pure logic over files
//! under a root directory; nothing here touches the host beyond reading them.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod guest;
pub mod jobs;
pub mod lxc;
pub mod model;
pub mod names;
pub mod network;
pub mod proxmox;
pub mod qemu;
pub mod reader;
pub mod reasons;
pub mod report;
pub mod storage;
