//! stead's host layer: file-system primitives that must be right once, for every crate.
//!
//! Everything here is careful about crashes (fsync of file and directory), about the
//! caller's umask (modes are set explicitly), and about symlinks planted by someone else.
//! Higher crates (reconciler, drivers, the CLI) call these instead of writing their own.

pub mod fs;
pub mod mounts;
pub mod process;
pub mod tree;

pub use fs::{HostError, is_atomic_temp_name, write_atomic, write_atomic_mode};
pub use tree::{TreeError, remove_tree_beneath};
