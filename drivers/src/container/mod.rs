//! System containers (like Proxmox VE's LXC containers, without LXC): namespaces, cgroups
//! v1/v2, rootfs templates, veth networking, and a per-container supervisor (`stead shim`).

pub mod cgroup;
pub mod config;
pub mod control;
mod driver;
pub mod network;
mod process;
pub mod rootfs;
pub mod security;
pub mod shim;

pub use control::{console, exec, exec_with, logs};
pub use driver::ContainerDriver;
