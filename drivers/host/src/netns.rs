//! The directory of named network namespaces (`/run/netns/NAME`, as `ip netns` keeps
//! them), with the root injected.

use std::path::{Path, PathBuf};

/// Where named network namespaces live on the host.
pub const HOST_DIR: &str = "/run/netns";

/// A directory of named network namespaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetnsDir {
    root: PathBuf,
}

impl NetnsDir {
    /// The host's directory (`/run/netns`).
    pub fn host() -> Self {
        Self::at(HOST_DIR)
    }

    /// A directory at `root` (a test's temp dir).
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file of the named namespace `name`.
    pub fn path_of(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_below_the_root() {
        assert_eq!(NetnsDir::host().path_of("e1"), Path::new("/run/netns/e1"));
        assert_eq!(NetnsDir::at("/tmp/x").path_of("e1"), Path::new("/tmp/x/e1"));
        assert_eq!(NetnsDir::host().root(), Path::new("/run/netns"));
    }
}
