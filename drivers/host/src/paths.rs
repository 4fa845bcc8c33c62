//! Default host locations of stead's own files.

/// The default run directory: control sockets, state files and locks of running
/// workloads (a tmpfs, so it starts empty at boot).
pub const RUN_DIR: &str = "/run/stead";
