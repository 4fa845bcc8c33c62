//! Consistency hooks: what happens to a workload around its backup (`mode: snapshot | stop`).
//!
//! The backup module does not know how to pause a container or a VM; the workload drivers do.
//! They implement [`BackupHooks`]; the runner and `stead backup run` call
//! [`BackupHooks::prepare`] before reading a target and the returned cleanup afterwards.
//!
//! Intended implementations (not written yet, see docs/backup-format.md "Missing"):
//! - Container, `snapshot`: freeze the cgroup (v1 `freezer.state = FROZEN`, v2
//!   `cgroup.freeze = 1`), take a btrfs snapshot (or reflink copy) of the rootfs and volumes,
//!   thaw (a pause of milliseconds), back up the snapshot paths, delete the snapshot in cleanup.
//!   Without snapshot-capable storage, fall back to freeze → back up → thaw (pause = backup).
//! - Container / VM, `stop`: stop the workload, back up, start it again in cleanup.
//! - VM, `snapshot`: pause vCPUs and flush the virtio-blk backend via the VMM control socket,
//!   snapshot the volume files, resume.

use std::path::PathBuf;

use stead_schema::kinds::BackupMode;
use tracing::warn;

use super::BackupError;

/// One resource to back up.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// `Kind/name`.
    pub resource: String,
    /// The spec as applied (recorded in the manifest).
    pub spec: serde_json::Value,
    /// Logical name → volume file or directory.
    pub inputs: Vec<(String, PathBuf)>,
}

/// Cleanup run after the backup of a target (thaw, delete snapshot, restart…).
pub type Cleanup = Box<dyn FnOnce() -> Result<(), BackupError> + Send>;

/// The outcome of [`BackupHooks::prepare`].
pub struct Prepared {
    /// What to read: the target's inputs, or e.g. snapshot paths standing in for them.
    pub inputs: Vec<(String, PathBuf)>,
    /// Run after the backup, whether it succeeded or not.
    pub cleanup: Cleanup,
}

/// Makes a target consistent for the duration of its backup.
pub trait BackupHooks: Send + Sync {
    /// Prepares `target` for a backup in `mode`.
    fn prepare(&self, target: &Target, mode: BackupMode) -> Result<Prepared, BackupError>;
}

/// Reads the inputs live: correct for stopped workloads and plain files, only crash-consistent
/// (at best) for running ones. Used until the workload drivers provide real hooks.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHooks;

impl BackupHooks for NoHooks {
    fn prepare(&self, target: &Target, mode: BackupMode) -> Result<Prepared, BackupError> {
        if target.resource.starts_with("Container/")
            || target.resource.starts_with("VirtualMachine/")
        {
            warn!(
                resource = %target.resource,
                ?mode,
                "no consistency hook for this workload yet: reading its data live"
            );
        }
        Ok(Prepared {
            inputs: target.inputs.clone(),
            cleanup: Box::new(|| Ok(())),
        })
    }
}
