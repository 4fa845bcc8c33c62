//! Consistency hooks: what happens to a workload around its backup (`mode: snapshot | stop`).
//!
//! The backup store only reads paths. [`BackupHooks::prepare`] runs before a target is read:
//! it may quiesce the workload, swap the inputs for point-in-time clones, and returns the
//! cleanup to run afterwards. [`backup_target`] is the one place that runs prepare → backup
//! → cleanup, for `stead backup run` and the schedule runner alike.
//!
//! The real implementation is [`super::consistency::WorkloadHooks`]; [`NoHooks`] reads live.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;

use stead_schema::kinds::BackupMode;
use tracing::warn;

use super::BackupError;
use super::store::{BackupInfo, BackupOptions, BackupStore};

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
    /// For inputs read from a clone: the original's metadata, taken when the clone was.
    pub stat_of: HashMap<String, fs::Metadata>,
    /// How consistency was obtained, for the manifest and the operator (e.g. "frozen 3 ms
    /// for reflink clones").
    pub consistency: String,
    /// Run after the backup, whether it succeeded or not.
    pub cleanup: Cleanup,
    /// A backup the hook makes itself instead of the store reading `inputs` (a running
    /// QEMU VM: its disks through QEMU's backup jobs and dirty bitmaps); it records its
    /// own consistency.
    pub run: Option<RunBackup>,
}

/// See [`Prepared::run`].
pub type RunBackup =
    Box<dyn FnOnce(&BackupStore, BackupOptions) -> Result<BackupInfo, BackupError> + Send>;

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
            stat_of: HashMap::new(),
            consistency: "live".into(),
            cleanup: Box::new(|| Ok(())),
            run: None,
        })
    }
}

/// Backs up `target` into `store`: prepare (quiesce, clone), read, then cleanup — which
/// runs whether the backup succeeded or not. A cleanup failure (e.g. a workload that did
/// not start again) is an error even when the backup itself was written.
pub fn backup_target(
    store: &BackupStore,
    target: &Target,
    mode: BackupMode,
    hooks: &dyn BackupHooks,
    mut opts: BackupOptions,
) -> Result<BackupInfo, BackupError> {
    let prepared = hooks.prepare(target, mode)?;
    opts.stat_of = prepared.stat_of;
    opts.origins = target
        .inputs
        .iter()
        .filter(|(n, p)| prepared.inputs.iter().any(|(m, q)| m == n && q != p))
        .map(|(n, p)| (n.clone(), p.clone()))
        .collect();
    opts.consistency = Some(prepared.consistency);
    let r = match prepared.run {
        Some(run) => run(store, opts),
        None => store.backup_paths(&target.resource, &target.spec, &prepared.inputs, &opts),
    };
    let c = (prepared.cleanup)();
    let info = r?;
    c?;
    Ok(info)
}
