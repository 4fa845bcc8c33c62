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
//! A driver for one kind implements [`KindDriver`] on its own spec type instead: the
//! blanket `impl<T: KindDriver> Driver for T` takes the spec out of each resource once
//! (through [`KindSpec`]) and reports a resource of another kind as an error, so no
//! driver matches on [`stead_schema::Spec`] itself.
//!
//! Host access goes through the [`HostEnv`] handed to the driver's constructor, so tests
//! can point a driver at a sandbox (temp dirs, a network namespace, a cgroup parent).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;
use serde_json::Value;

use stead_schema::{Kind, KindSpec, Resource, ResourceId};

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
    /// The cluster agent's fence deadline file (see `stead_host::fence`): when set, the
    /// supervisors of HA workloads kill them once its deadline passes. `None` on a single
    /// host.
    pub fence_file: Option<PathBuf>,
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

/// The refusal of a kind whose driver cannot adopt existing objects.
pub fn cannot_adopt(kind: Kind) -> String {
    format!("stead cannot adopt a {kind}: remove the object or rename the resource")
}

/// The default adoption check: an existing object is refused ([`cannot_adopt`]), an
/// absent one is fine (it is created).
fn refuse_existing(kind: Kind, observed: &Observed) -> Result<(), String> {
    if observed.exists {
        Err(cannot_adopt(kind))
    } else {
        Ok(())
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

    /// Whether the existing object `observed`, which stead does not own, can be taken
    /// over safely as `desired` (adoption): nothing on the host changes, and the message
    /// of a refusal (what is in the way, what to do) becomes a plan error. Called at plan
    /// time when adoption is asked for, also for an object the driver does not see
    /// (`observed` absent), where it refuses only what another manager runs or holds
    /// under that identity (e.g. a QEMU process it did not start). Default: an existing
    /// object is refused (the driver cannot adopt), an absent one is created as usual.
    fn adopt_check(
        &self,
        desired: &Resource,
        observed: &Observed,
        _world: &dyn Lookup,
    ) -> Result<(), String> {
        refuse_existing(desired.id.kind, observed)
    }

    /// Records stead's ownership of the existing object `observed` without recreating or
    /// changing anything else (the ownership mark the driver uses for the objects it
    /// creates). The ordinary [`Driver::apply`] follows for the remaining differences.
    /// Idempotent. Default: refused.
    fn adopt(
        &self,
        desired: &Resource,
        _observed: &Observed,
        _world: &dyn Lookup,
    ) -> Result<(), DriverError> {
        Err(DriverError::Refused(cannot_adopt(desired.id.kind)))
    }

    /// Gives an adopted object that leaves the manifests back as it was found: removes
    /// the ownership mark [`Driver::adopt`] wrote where a mark left behind would make it
    /// look like a lost object of stead's (e.g. a link alias). Called when such an
    /// object is retained; the object itself is kept. Default: nothing to do.
    fn release(&self, _last_applied: &Resource, _observed: &Observed) -> Result<(), DriverError> {
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

    /// The longest a stop of `r` (observed as `observed`) waits for it to end gracefully
    /// before it is killed, in seconds; `None` when it is not running or has no graceful
    /// stop (default). The plan shows it on changes that stop the object.
    fn stop_timeout_secs(&self, _r: &Resource, _observed: &Observed) -> Option<u64> {
        None
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

    /// The objects on the host that still need this one, so that it must not be deleted
    /// (e.g. the linked clones of a template volume); `Err` when the driver cannot tell.
    /// Checked when a delete is planned: those not deleted earlier in the same plan make
    /// it a plan error, and nothing is deleted. Default: none.
    fn delete_blockers(
        &self,
        _last_applied: &Resource,
        _observed: &Observed,
        _world: &dyn Lookup,
    ) -> Result<Vec<ResourceId>, String> {
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

/// A resource whose spec is of the type `S` its driver handles.
#[derive(Debug)]
pub struct Typed<'a, S> {
    /// The whole resource (id, metadata, origin, spec).
    pub resource: &'a Resource,
    /// Its spec.
    pub spec: &'a S,
}

impl<S> Clone for Typed<'_, S> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<S> Copy for Typed<'_, S> {}

impl<'a, S: KindSpec> Typed<'a, S> {
    /// `resource` with its spec as `S`; an error when the spec is of another kind.
    pub fn new(resource: &'a Resource) -> Result<Self, KindMismatch> {
        match S::from_spec(&resource.spec) {
            Some(spec) => Ok(Typed { resource, spec }),
            None => Err(KindMismatch {
                driver: S::KIND,
                id: resource.id.clone(),
            }),
        }
    }
}

impl<'a, S> Typed<'a, S> {
    /// The resource's id.
    pub fn id(&self) -> &'a ResourceId {
        &self.resource.id
    }

    /// The resource's name.
    pub fn name(&self) -> &'a str {
        &self.resource.id.name
    }
}

/// A driver was handed a resource of another kind (a wiring fault, never a manifest's).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the {driver} driver got {id}, a resource of another kind")]
pub struct KindMismatch {
    /// The kind of the driver.
    pub driver: Kind,
    /// The resource it got.
    pub id: ResourceId,
}

impl From<KindMismatch> for DriverError {
    fn from(e: KindMismatch) -> Self {
        DriverError::Other(e.to_string())
    }
}

/// A host driver for one kind, written against its spec type. Every type implementing it
/// is a [`Driver`]; the methods mean what the [`Driver`] methods of the same name mean,
/// with each resource handed over as a [`Typed`].
pub trait KindDriver: Send + Sync {
    /// The spec type of the kind handled; its [`KindSpec::KIND`] is the driver's kind.
    type Spec: KindSpec;

    /// See [`Driver::observe`].
    fn observe(
        &self,
        targets: &[Typed<'_, Self::Spec>],
        world: &dyn Lookup,
    ) -> Result<BTreeMap<ResourceId, Observed>, DriverError>;

    /// See [`Driver::desired_state`].
    fn desired_state(&self, desired: Typed<'_, Self::Spec>, world: &dyn Lookup) -> Value;

    /// See [`Driver::impact`].
    fn impact(&self, path: &str) -> Impact;

    /// See [`Driver::check`].
    fn check(
        &self,
        _desired: Typed<'_, Self::Spec>,
        _observed: &Observed,
        _changes: &[FieldChange],
    ) -> Result<(), String> {
        Ok(())
    }

    /// See [`Driver::adopt_check`].
    fn adopt_check(
        &self,
        _desired: Typed<'_, Self::Spec>,
        observed: &Observed,
        _world: &dyn Lookup,
    ) -> Result<(), String> {
        refuse_existing(Self::Spec::KIND, observed)
    }

    /// See [`Driver::adopt`].
    fn adopt(
        &self,
        _desired: Typed<'_, Self::Spec>,
        _observed: &Observed,
        _world: &dyn Lookup,
    ) -> Result<(), DriverError> {
        Err(DriverError::Refused(cannot_adopt(Self::Spec::KIND)))
    }

    /// See [`Driver::release`].
    fn release(
        &self,
        _last_applied: Typed<'_, Self::Spec>,
        _observed: &Observed,
    ) -> Result<(), DriverError> {
        Ok(())
    }

    /// See [`Driver::apply`].
    fn apply(
        &self,
        desired: Typed<'_, Self::Spec>,
        observed: &Observed,
        world: &dyn Lookup,
    ) -> Result<(), DriverError>;

    /// See [`Driver::prune_action`].
    fn prune_action(&self, _last_applied: Typed<'_, Self::Spec>) -> PruneAction {
        PruneAction::Delete
    }

    /// See [`Driver::delete_impact`].
    fn delete_impact(&self, _last_applied: Typed<'_, Self::Spec>) -> Impact {
        Impact::Recreate
    }

    /// See [`Driver::stop_timeout_secs`].
    fn stop_timeout_secs(&self, _r: Typed<'_, Self::Spec>, _observed: &Observed) -> Option<u64> {
        None
    }

    /// See [`Driver::supports_safety_snapshot`].
    fn supports_safety_snapshot(&self, _r: Typed<'_, Self::Spec>, _world: &dyn Lookup) -> bool {
        false
    }

    /// See [`Driver::safety_snapshot`].
    fn safety_snapshot(
        &self,
        _r: Typed<'_, Self::Spec>,
        _world: &dyn Lookup,
        _name: &str,
    ) -> Result<(), DriverError> {
        Ok(())
    }

    /// See [`Driver::marked_on_host`].
    fn marked_on_host(&self) -> Result<Vec<String>, DriverError> {
        Ok(Vec::new())
    }

    /// See [`Driver::delete_blockers`].
    fn delete_blockers(
        &self,
        _last_applied: Typed<'_, Self::Spec>,
        _observed: &Observed,
        _world: &dyn Lookup,
    ) -> Result<Vec<ResourceId>, String> {
        Ok(Vec::new())
    }

    /// See [`Driver::delete`].
    fn delete(
        &self,
        last_applied: Typed<'_, Self::Spec>,
        observed: &Observed,
        world: &dyn Lookup,
    ) -> Result<(), DriverError>;
}

/// The adapter: a resource of another kind is an error for the calls that can fail, no
/// state for [`Driver::desired_state`], no safety snapshot, [`Impact::Recreate`] to
/// delete and [`PruneAction::Retain`] (what a driver cannot read, it does not remove).
impl<T: KindDriver> Driver for T {
    fn kind(&self) -> Kind {
        T::Spec::KIND
    }

    fn observe(
        &self,
        targets: &[&Resource],
        world: &dyn Lookup,
    ) -> Result<BTreeMap<ResourceId, Observed>, DriverError> {
        let typed = targets
            .iter()
            .map(|r| Typed::new(r))
            .collect::<Result<Vec<_>, _>>()?;
        KindDriver::observe(self, &typed, world)
    }

    fn desired_state(&self, desired: &Resource, world: &dyn Lookup) -> Value {
        Typed::new(desired).map_or(Value::Null, |d| KindDriver::desired_state(self, d, world))
    }

    fn impact(&self, path: &str) -> Impact {
        KindDriver::impact(self, path)
    }

    fn check(
        &self,
        desired: &Resource,
        observed: &Observed,
        changes: &[FieldChange],
    ) -> Result<(), String> {
        let desired = Typed::new(desired).map_err(|e| e.to_string())?;
        KindDriver::check(self, desired, observed, changes)
    }

    fn adopt_check(
        &self,
        desired: &Resource,
        observed: &Observed,
        world: &dyn Lookup,
    ) -> Result<(), String> {
        let desired = Typed::new(desired).map_err(|e| e.to_string())?;
        KindDriver::adopt_check(self, desired, observed, world)
    }

    fn adopt(
        &self,
        desired: &Resource,
        observed: &Observed,
        world: &dyn Lookup,
    ) -> Result<(), DriverError> {
        KindDriver::adopt(self, Typed::new(desired)?, observed, world)
    }

    fn release(&self, last_applied: &Resource, observed: &Observed) -> Result<(), DriverError> {
        KindDriver::release(self, Typed::new(last_applied)?, observed)
    }

    fn apply(
        &self,
        desired: &Resource,
        observed: &Observed,
        world: &dyn Lookup,
    ) -> Result<(), DriverError> {
        KindDriver::apply(self, Typed::new(desired)?, observed, world)
    }

    fn prune_action(&self, last_applied: &Resource) -> PruneAction {
        Typed::new(last_applied).map_or(PruneAction::Retain, |l| KindDriver::prune_action(self, l))
    }

    fn delete_impact(&self, last_applied: &Resource) -> Impact {
        Typed::new(last_applied).map_or(Impact::Recreate, |l| KindDriver::delete_impact(self, l))
    }

    fn stop_timeout_secs(&self, r: &Resource, observed: &Observed) -> Option<u64> {
        Typed::new(r)
            .ok()
            .and_then(|r| KindDriver::stop_timeout_secs(self, r, observed))
    }

    fn supports_safety_snapshot(&self, r: &Resource, world: &dyn Lookup) -> bool {
        Typed::new(r).is_ok_and(|r| KindDriver::supports_safety_snapshot(self, r, world))
    }

    fn safety_snapshot(
        &self,
        r: &Resource,
        world: &dyn Lookup,
        name: &str,
    ) -> Result<(), DriverError> {
        KindDriver::safety_snapshot(self, Typed::new(r)?, world, name)
    }

    fn marked_on_host(&self) -> Result<Vec<String>, DriverError> {
        KindDriver::marked_on_host(self)
    }

    fn delete_blockers(
        &self,
        last_applied: &Resource,
        observed: &Observed,
        world: &dyn Lookup,
    ) -> Result<Vec<ResourceId>, String> {
        match Typed::new(last_applied) {
            Ok(l) => KindDriver::delete_blockers(self, l, observed, world),
            Err(_) => Ok(Vec::new()),
        }
    }

    fn delete(
        &self,
        last_applied: &Resource,
        observed: &Observed,
        world: &dyn Lookup,
    ) -> Result<(), DriverError> {
        KindDriver::delete(self, Typed::new(last_applied)?, observed, world)
    }
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

    use std::sync::Mutex;
    use stead_schema::{BondMode, BondSpec, NetworkSpec, Spec};

    /// A Network driver that records what the adapter hands it.
    #[derive(Default)]
    struct Networks {
        seen: Mutex<Vec<(String, Option<u32>)>>,
    }

    impl Networks {
        fn saw(&self, n: Typed<'_, NetworkSpec>) {
            let mut seen = self.seen.lock().expect("lock");
            seen.push((n.name().to_string(), n.spec.mtu));
        }
    }

    impl KindDriver for Networks {
        type Spec = NetworkSpec;

        fn observe(
            &self,
            targets: &[Typed<'_, NetworkSpec>],
            _world: &dyn Lookup,
        ) -> Result<BTreeMap<ResourceId, Observed>, DriverError> {
            targets.iter().for_each(|t| self.saw(*t));
            Ok(targets
                .iter()
                .map(|t| (t.id().clone(), Observed::absent()))
                .collect())
        }

        fn desired_state(&self, desired: Typed<'_, NetworkSpec>, _world: &dyn Lookup) -> Value {
            serde_json::json!({ "mtu": desired.spec.mtu })
        }

        fn impact(&self, _path: &str) -> Impact {
            Impact::Hot
        }

        fn check(
            &self,
            desired: Typed<'_, NetworkSpec>,
            _observed: &Observed,
            _changes: &[FieldChange],
        ) -> Result<(), String> {
            self.saw(desired);
            Ok(())
        }

        fn apply(
            &self,
            desired: Typed<'_, NetworkSpec>,
            _observed: &Observed,
            _world: &dyn Lookup,
        ) -> Result<(), DriverError> {
            self.saw(desired);
            Ok(())
        }

        fn prune_action(&self, _last_applied: Typed<'_, NetworkSpec>) -> PruneAction {
            PruneAction::Delete
        }

        fn delete_impact(&self, _last_applied: Typed<'_, NetworkSpec>) -> Impact {
            Impact::DataLoss
        }

        fn supports_safety_snapshot(
            &self,
            _r: Typed<'_, NetworkSpec>,
            _world: &dyn Lookup,
        ) -> bool {
            true
        }

        fn safety_snapshot(
            &self,
            r: Typed<'_, NetworkSpec>,
            _world: &dyn Lookup,
            _name: &str,
        ) -> Result<(), DriverError> {
            self.saw(r);
            Ok(())
        }

        fn delete(
            &self,
            last_applied: Typed<'_, NetworkSpec>,
            _observed: &Observed,
            _world: &dyn Lookup,
        ) -> Result<(), DriverError> {
            self.saw(last_applied);
            Ok(())
        }
    }

    fn resource(kind: Kind, name: &str, spec: Spec) -> Resource {
        Resource {
            id: ResourceId::new(kind, name),
            metadata: Default::default(),
            spec,
            origin: Default::default(),
        }
    }

    fn network(name: &str, mtu: u32) -> Resource {
        let spec = NetworkSpec {
            mtu: Some(mtu),
            ..NetworkSpec::default()
        };
        resource(Kind::Network, name, Spec::Network(spec))
    }

    fn bond(name: &str) -> Resource {
        let spec = BondSpec {
            mode: BondMode::ActiveBackup,
            slaves: Vec::new(),
            miimon: None,
            mtu: None,
            depends_on: Vec::new(),
        };
        resource(Kind::Bond, name, Spec::Bond(spec))
    }

    const MISMATCH: &str = "the Network driver got Bond/b0, a resource of another kind";

    #[test]
    fn typed_takes_the_spec_of_its_kind_out_of_a_resource() {
        let r = network("lan0", 1400);
        let t = Typed::<NetworkSpec>::new(&r).expect("a Network");
        assert_eq!((t.id(), t.name(), t.spec.mtu), (&r.id, "lan0", Some(1400)));
        let b = bond("b0");
        let e = Typed::<NetworkSpec>::new(&b).expect_err("a Bond is no Network");
        assert_eq!(
            e,
            KindMismatch {
                driver: Kind::Network,
                id: b.id.clone(),
            }
        );
        assert_eq!(e.to_string(), MISMATCH);
        let e = DriverError::from(e);
        assert!(
            matches!(&e, DriverError::Other(m) if m == MISMATCH),
            "{e:?}"
        );
        assert_eq!(e.reason(), "Failed");
    }

    #[test]
    fn every_spec_type_takes_its_own_kind_only() {
        fn takes<S: KindSpec>(specs: &[Spec]) {
            let taken: Vec<Kind> = specs
                .iter()
                .filter(|s| S::from_spec(s).is_some())
                .map(Spec::kind)
                .collect();
            assert_eq!(taken, [S::KIND]);
        }
        use serde_json::json;
        use stead_schema::*;
        let specs: Vec<Spec> = [
            (Kind::StoragePool, json!({"type": "dir", "path": "/srv/p"})),
            (Kind::Network, json!({})),
            (Kind::Bond, json!({"mode": "active-backup", "slaves": []})),
            (Kind::Volume, json!({"pool": "p", "size": "1Gi"})),
            (Kind::Container, json!({"rootfs": {"template": "/t.tar"}})),
            (
                Kind::VirtualMachine,
                json!({"cpus": 1, "memory": "32Mi", "boot": {"kernel": "/k"}}),
            ),
            (
                Kind::BackupSchedule,
                json!({"schedule": "0 2 * * *", "targets": {"names": ["Volume/v"]}, "storage": "p"}),
            ),
            (Kind::HaGroup, json!({"nodes": {"pve1": 1}})),
        ]
        .into_iter()
        .map(|(kind, v)| Spec::from_value(kind, v).expect("spec"))
        .collect();
        assert_eq!(specs.iter().map(Spec::kind).collect::<Vec<_>>(), Kind::ALL);
        takes::<StoragePoolSpec>(&specs);
        takes::<NetworkSpec>(&specs);
        takes::<BondSpec>(&specs);
        takes::<VolumeSpec>(&specs);
        takes::<ContainerSpec>(&specs);
        takes::<VirtualMachineSpec>(&specs);
        takes::<BackupScheduleSpec>(&specs);
        takes::<HaGroupSpec>(&specs);
    }

    #[test]
    fn the_adapter_hands_each_call_the_typed_spec() {
        let d = Networks::default();
        let world: BTreeMap<ResourceId, Resource> = BTreeMap::new();
        let (a, b) = (network("a", 1400), network("b", 9000));
        assert_eq!(Driver::kind(&d), Kind::Network);
        let seen = Driver::observe(&d, &[&a, &b], &world).expect("observe");
        assert_eq!(seen.keys().collect::<Vec<_>>(), [&a.id, &b.id]);
        let obs = Observed::absent();
        assert_eq!(
            Driver::desired_state(&d, &a, &world),
            serde_json::json!({"mtu": 1400})
        );
        Driver::check(&d, &a, &obs, &[]).expect("check");
        Driver::apply(&d, &b, &obs, &world).expect("apply");
        Driver::safety_snapshot(&d, &a, &world, "pre-x").expect("snapshot");
        Driver::delete(&d, &b, &obs, &world).expect("delete");
        assert_eq!(Driver::impact(&d, "/mtu"), Impact::Hot);
        assert_eq!(Driver::prune_action(&d, &a), PruneAction::Delete);
        assert_eq!(Driver::delete_impact(&d, &a), Impact::DataLoss);
        assert!(Driver::supports_safety_snapshot(&d, &a, &world));
        assert_eq!(
            Driver::marked_on_host(&d).expect("marked"),
            Vec::<String>::new()
        );
        let seen = d.seen.lock().expect("lock").clone();
        let want: Vec<(String, Option<u32>)> = [
            ("a", 1400),
            ("b", 9000),
            ("a", 1400),
            ("b", 9000),
            ("a", 1400),
            ("b", 9000),
        ]
        .iter()
        .map(|(n, m)| (n.to_string(), Some(*m)))
        .collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn the_adapter_reports_a_resource_of_another_kind_and_touches_nothing() {
        let d = Networks::default();
        let world: BTreeMap<ResourceId, Resource> = BTreeMap::new();
        let (ok, wrong) = (network("a", 1400), bond("b0"));
        let obs = Observed::absent();
        let other = |e: DriverError| matches!(&e, DriverError::Other(m) if m == MISMATCH);
        let e = Driver::observe(&d, &[&ok, &wrong], &world).expect_err("observe");
        assert!(other(e));
        assert!(other(
            Driver::apply(&d, &wrong, &obs, &world).expect_err("apply")
        ));
        assert!(other(
            Driver::delete(&d, &wrong, &obs, &world).expect_err("delete")
        ));
        let e = Driver::safety_snapshot(&d, &wrong, &world, "pre-x").expect_err("snapshot");
        assert!(other(e));
        assert_eq!(
            Driver::check(&d, &wrong, &obs, &[]),
            Err(MISMATCH.to_string())
        );
        assert_eq!(Driver::desired_state(&d, &wrong, &world), Value::Null);
        assert_eq!(Driver::prune_action(&d, &wrong), PruneAction::Retain);
        assert_eq!(Driver::delete_impact(&d, &wrong), Impact::Recreate);
        assert!(!Driver::supports_safety_snapshot(&d, &wrong, &world));
        assert!(
            d.seen.lock().expect("lock").is_empty(),
            "nothing reached the driver"
        );
    }
}
