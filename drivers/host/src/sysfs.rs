//! Paths into sysfs, with the root injected ([`SysFs::host`] for `/sys`, [`SysFs::at`] for
//! a test's temp dir).

use std::path::{Path, PathBuf};

/// Where sysfs is mounted on the host.
pub const HOST_ROOT: &str = "/sys";

/// A sysfs tree rooted at some directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysFs {
    root: PathBuf,
}

impl SysFs {
    /// The host's sysfs (`/sys`).
    pub fn host() -> Self {
        Self::at(HOST_ROOT)
    }

    /// A sysfs tree at `root` (a test's temp dir).
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/fs/cgroup`: where the cgroup file systems are mounted.
    pub fn cgroup_root(&self) -> PathBuf {
        self.root.join("fs/cgroup")
    }

    /// `<root>/module/<name>`: present while the kernel module `name` is loaded (or built in
    /// with parameters).
    pub fn module(&self, name: &str) -> PathBuf {
        self.root.join("module").join(name)
    }

    /// Whether [`SysFs::module`] of `name` exists.
    pub fn has_module(&self, name: &str) -> bool {
        self.module(name).exists()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_paths_are_the_usual_ones() {
        let s = SysFs::host();
        assert_eq!(s.cgroup_root(), Path::new("/sys/fs/cgroup"));
        assert_eq!(s.module("zfs"), Path::new("/sys/module/zfs"));
    }

    #[test]
    fn module_presence_is_read_under_the_injected_root() {
        let d = tempfile::tempdir().expect("tempdir");
        let s = SysFs::at(d.path());
        assert!(!s.has_module("zfs"));
        std::fs::create_dir_all(d.path().join("module/zfs")).expect("mkdir");
        assert!(s.has_module("zfs"));
    }
}
