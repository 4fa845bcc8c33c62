//! System containers (like LXC), supervised by `stead shim`.

pub mod cgroup;
