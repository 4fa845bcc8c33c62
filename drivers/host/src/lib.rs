//! stead's host layer: file-system primitives that must be right once, for every crate.
//!
//! Everything here is careful about crashes (fsync of file and directory), about the
//! caller's umask (modes are set explicitly), and about symlinks planted by someone else.
//! Higher crates (reconciler, drivers, the CLI) call these instead of writing their own.
//!
//! It is also the only code that names host paths under `/proc`, `/sys` and `/run`:
//! [`procfs::ProcFs`], [`sysfs::SysFs`] and [`netns::NetnsDir`] take their root as a
//! parameter (`::host()` for the real one, `::at(dir)` in tests);
//! `scripts/lint-host-paths.sh` checks that no other crate spells such a path. Extended
//! attributes are read and written only through [`xattr`].

pub mod cgroup;
pub mod confine;
pub mod fence;
pub mod fs;
pub mod mounts;
pub mod netns;
pub mod paths;
pub mod process;
pub mod procfs;
pub mod progress;
pub mod sysfs;
pub mod tree;
pub mod xattr;

pub use fs::{HostError, is_atomic_temp_name, write_atomic, write_atomic_mode};
pub use netns::NetnsDir;
pub use procfs::ProcFs;
pub use progress::{NoProgress, Progress};
pub use sysfs::SysFs;
pub use tree::{TreeError, remove_tree_beneath};
