//! Backups: content-defined, deduplicated archives in a chunk store, cron schedules and
//! Proxmox-style retention.
//!
//! - [`retention`]: pure prune decisions (Proxmox VE / PBS semantics).
//! - [`schedule`]: cron next-fire times in a time zone, catch-up after downtime.
//! - [`schedule_driver`]: the BackupSchedule driver (registers schedules for the runner).
//! - [`store`]: the chunk store, manifests, backup / verify / restore / prune / gc.
//! - [`blocks`]: disk images backed up block by block (incremental from dirty extents).
//! - [`runner`]: runs schedules on an injectable clock, then prunes.
//! - [`hooks`]: consistency hooks (snapshot / stop) the workload drivers implement.
//! - [`targets`]: `Kind/name` and schedule selectors → files and directories to read.
//! - [`ops`]: the backup commands (run, prune, name and storage resolution) as calls.
//! - [`report`]: their results as text lines.

use std::path::PathBuf;

pub mod blocks;
pub mod consistency;
pub mod hooks;
pub mod ops;
pub mod report;
pub mod retention;
pub mod runner;
pub mod schedule;
pub mod schedule_driver;
pub mod store;
pub mod targets;
pub mod xattrs;

pub use store::{BackupInfo, BackupOptions, BackupStore, Manifest, VerifyReport};

// Container root file systems: reflink clones and their own data (the one place the backup
// room reaches into another room's files).

/// Errors of the backup module.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// A cron pattern or time zone is invalid.
    #[error("invalid schedule: {0}")]
    Schedule(String),
    /// A file system operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A manifest or state file cannot be parsed.
    #[error("cannot parse {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// No backup with this id.
    #[error("backup {0} not found")]
    NotFound(String),
    /// Bad input (arguments, names).
    #[error("{0}")]
    Invalid(String),
    /// Restored data does not match the manifest.
    #[error("integrity check failed: {0}")]
    Integrity(String),
}

impl BackupError {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| BackupError::Io { op, path, source }
    }
}
