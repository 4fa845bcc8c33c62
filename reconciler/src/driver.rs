//! The contract between the reconciler and the host drivers.
//!
//! A driver handles one kind. It is split the way DESIGN.md asks:
//! - [`Driver::observe`] reads the host (read-only, one dump per object type);
//! - [`Driver::desired_state`] projects a spec onto the shape `observe` reports, so the
//!   reconciler can diff the two generically, field by field (a per-kind normalizer);
//! - [`Driver::impact`] labels a changed field (hot / restart / recreate / data-loss);
//! - [`Driver::check`] refuses changes that must never happen (shrink a volume, …);
//! - [`Driver::apply`] and [`Driver::delete`] converge, idempotently.
//!
//! Host access goes through the [`HostEnv`] handed to the driver's constructor, so tests
//! can point a driver at a sandbox (temp dirs, a network namespace, a cgroup parent).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;
use serde_json::Value;

use stead_schema::{Kind, Resource, ResourceId};

/// How disruptive a change is. Ordered: a change's impact is the max of its fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Impact {
    /// No disruption (e.g. cgroup write, MTU change).
    Hot,
    /// The guest or process restarts.
    Restart,
    /// The object is deleted and created again, data preserved elsewhere.
    Recreate,
    /// Data is destroyed.
    DataLoss,
}

impl Impact {
    /// Label as printed in plans.
    pub fn as_str(self) -> &'static str {
        match self {
            Impact::Hot => "hot",
            Impact::Restart => "restart",
            Impact::Recreate => "recreate",
            Impact::DataLoss => "data-loss",
        }
    }
}

/// One changed field: JSON pointer into the spec, old (observed) and new (desired).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldChange {
    /// JSON pointer relative to the spec, e.g. `/size` or `/addresses`.
    pub path: String,
    /// Observed (or last applied) value; `None` when absent.
    pub old: Option<Value>,
    /// Desired value; `None` when removed.
    pub new: Option<Value>,
    /// Impact of this field's change.
    pub impact: Impact,
}

/// Readiness of an observed object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
#[serde(tag = "status", content = "message")]
pub enum Health {
    /// Exists and works.
    Ready,
    /// Converging (starting, copying).
    #[default]
    Progressing,
    /// Exists but something is wrong.
    Degraded(String),
    /// Broken.
    Failed(String),
}

/// What a driver saw on the host for one resource.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct Observed {
    /// Whether an object with this identity exists on the host.
    pub exists: bool,
    /// Whether the object carries stead's ownership mark (alias, marker file, cgroup
    /// parent, nft table, …). An existing unowned object is never touched.
    pub owned: bool,
    /// Observed state in the same shape as [`Driver::desired_state`].
    pub state: Value,
    /// Runtime status for `stead get` (pid, restarts, usage, paths, …).
    pub status: Value,
    /// Health.
    pub health: Health,
}

impl Observed {
    /// An object that does not exist.
    pub fn absent() -> Self {
        Observed {
            exists: false,
            owned: false,
            state: Value::Null,
            status: Value::Null,
            health: Health::Failed("absent".into()),
        }
    }
}

/// What to do with an owned resource that left the manifests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PruneAction {
    /// Delete it from the host.
    Delete,
    /// Keep the data, forget ownership (e.g. `deletionPolicy: Retain`).
    Retain,
}

/// Host handles shared by all drivers. Tests point these at a sandbox.
#[derive(Debug, Clone, Serialize)]
pub struct HostEnv {
    /// State dir (`--state-dir`), holds the state DB.
    pub state_dir: PathBuf,
    /// Run dir (`--run-dir`), holds sockets, pid and state files of supervisors.
    pub run_dir: PathBuf,
    /// Cgroup parent name (`--cgroup-parent`).
    pub cgroup_parent: String,
    /// Network namespace to manage networking in (`--netns`), as a path.
    pub netns: Option<PathBuf>,
    /// Path of the stead binary, for spawning `stead shim` / `stead vmm`.
    pub self_exe: PathBuf,
}

/// Resolves references while planning and applying: desired resources first, then the
/// last-applied copies from the inventory (for things being deleted).
pub trait Lookup: Sync {
    /// The resource with this id, if known.
    fn resource(&self, id: &ResourceId) -> Option<&Resource>;
}

impl Lookup for BTreeMap<ResourceId, Resource> {
    fn resource(&self, id: &ResourceId) -> Option<&Resource> {
        self.get(id)
    }
}

/// A driver error. Terminal errors are not retried by the controller.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// A file-system or syscall error.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An external command failed.
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Exit status.
        status: String,
        /// Its stderr (trimmed).
        stderr: String,
    },
    /// The kernel or host lacks a feature (bonding, 802.1q, device-mapper, ZFS …).
    #[error("unsupported on this host: {0}")]
    Unsupported(String),
    /// An unowned object is in the way, or ownership marks disagree.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The request can never succeed as written (e.g. shrink).
    #[error("refused: {0}")]
    Refused(String),
    /// A dependency is missing or not ready yet (retryable).
    #[error("not ready: {0}")]
    NotReady(String),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl DriverError {
    /// Builds an [`DriverError::Io`] with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        DriverError::Io {
            context: context.into(),
            source,
        }
    }

    /// Whether the error can never go away by retrying the same change: the request is
    /// refused as written, an unowned object is in the way, or the host lacks a feature.
    /// Only a new spec (manifest) or a change on the host can fix it, so the controller
    /// holds such a resource (status `Failed`) instead of retrying it.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            DriverError::Unsupported(_) | DriverError::Conflict(_) | DriverError::Refused(_)
        )
    }

    /// Whether retrying later could help: everything that is not [`Self::is_terminal`].
    /// I/O errors are retryable whatever their errno (a full disk gets room, a busy
    /// device gets free, a missing source file gets written).
    pub fn retryable(&self) -> bool {
        !self.is_terminal()
    }

    /// Short CamelCase name of the error class, used as a status reason, an event reason
    /// and a metric label: `Refused`, `Conflict`, `Unsupported`, `NotReady`, `IoError`,
    /// `CommandFailed` or `Failed`.
    pub fn reason(&self) -> &'static str {
        match self {
            DriverError::Io { .. } => "IoError",
            DriverError::Command { .. } => "CommandFailed",
            DriverError::Unsupported(_) => "Unsupported",
            DriverError::Conflict(_) => "Conflict",
            DriverError::Refused(_) => "Refused",
            DriverError::NotReady(_) => "NotReady",
            DriverError::Other(_) => "Failed",
        }
    }
}

/// A host driver for one kind.
pub trait Driver: Send + Sync {
    /// The kind handled.
    fn kind(&self) -> Kind;

    /// Reads the host state of `targets` (desired or last-applied resources of this kind).
    /// Read-only. Returns one entry per target; an object that does not exist is
    /// [`Observed::absent`]. Implementations should dump once per object type rather
    /// than query per object.
    fn observe(
        &self,
        targets: &[&Resource],
        world: &dyn Lookup,
    ) -> Result<BTreeMap<ResourceId, Observed>, DriverError>;

    /// The desired state in the shape `observe` reports in [`Observed::state`]. Fields the
    /// host cannot show (e.g. a volume's `source`, `deletionPolicy`) are left out; the
    /// reconciler diffs those against the last-applied spec instead.
    fn desired_state(&self, desired: &Resource, world: &dyn Lookup) -> Value;

    /// Impact of a change of the field at `path` (JSON pointer relative to the state).
    fn impact(&self, path: &str) -> Impact;

    /// Refuses changes that must not happen; the message becomes a plan error.
    fn check(
        &self,
        _desired: &Resource,
        _observed: &Observed,
        _changes: &[FieldChange],
    ) -> Result<(), String> {
        Ok(())
    }

    /// Converges the host to `desired`. Idempotent: safe to re-run after a crash at any point.
    fn apply(
        &self,
        desired: &Resource,
        observed: &Observed,
        world: &dyn Lookup,
    ) -> Result<(), DriverError>;

    /// What pruning this resource means.
    fn prune_action(&self, _last_applied: &Resource) -> PruneAction {
        PruneAction::Delete
    }

    /// How disruptive deleting this object is (shown on `- delete` lines). A change with
    /// impact `data-loss` needs an explicit opt-in: `deletionPolicy: Delete` for a prune,
    /// `--allow-data-loss` for anything else.
    fn delete_impact(&self, _last_applied: &Resource) -> Impact {
        Impact::Recreate
    }

    /// Whether a cheap (copy-on-write) snapshot of this object can be taken before a
    /// `data-loss` change. The plan says so when it can.
    fn supports_safety_snapshot(&self, _r: &Resource, _world: &dyn Lookup) -> bool {
        false
    }

    /// Takes the safety snapshot `name` (e.g. `pre-delete-20261126T150000Z`) before a
    /// `data-loss` change is carried out. It must survive the change that follows.
    fn safety_snapshot(
        &self,
        _r: &Resource,
        _world: &dyn Lookup,
        _name: &str,
    ) -> Result<(), DriverError> {
        Ok(())
    }

    /// Names of the objects of this kind on the host that carry stead's ownership mark
    /// for themselves (e.g. a link whose alias is `stead:Network/<its name>`). The planner
    /// reports those that neither the state nor the manifests know (a lost record, or
    /// another state dir's) and never changes them. Default: none (the driver cannot list
    /// its objects).
    fn marked_on_host(&self) -> Result<Vec<String>, DriverError> {
        Ok(Vec::new())
    }

    /// Removes the object. Idempotent: an absent object is success.
    fn delete(
        &self,
        last_applied: &Resource,
        observed: &Observed,
        world: &dyn Lookup,
    ) -> Result<(), DriverError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_classes() {
        let io = |code| DriverError::io("x", std::io::Error::from_raw_os_error(code));
        // ENOSPC and ENOENT go away when the host changes: transient, like NotReady.
        for e in [
            io(28),
            io(2),
            DriverError::NotReady("x".into()),
            DriverError::Other("x".into()),
        ] {
            assert!(!e.is_terminal() && e.retryable(), "{e}");
        }
        for (e, reason) in [
            (DriverError::Refused("x".into()), "Refused"),
            (DriverError::Conflict("x".into()), "Conflict"),
            (DriverError::Unsupported("x".into()), "Unsupported"),
        ] {
            assert!(e.is_terminal() && !e.retryable(), "{e}");
            assert_eq!(e.reason(), reason);
        }
        assert_eq!(io(28).reason(), "IoError");
    }
}
