//! The plan: a pure function of desired state, observed state and inventory.
//!
//! Pairing and diff are generic (argo gitops-engine style): each driver projects its
//! desired spec onto the observable shape ([`Driver::desired_state`]) and the plan
//! compares that with [`Observed::state`] leaf by leaf. Fields the host cannot show are
//! compared with the last-applied spec from the inventory. Every change carries its
//! impact; `data-loss` needs an explicit opt-in.

use std::collections::{BTreeMap, BTreeSet};

use crate::driver::{Driver, FieldChange, Impact, Lookup, Observed, PruneAction};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use stead_schema::graph::{DepGraph, Edge, edges};
use stead_schema::{Desired, Kind, Resource, ResourceId};

use crate::state::InventoryEntry;

/// What happens to one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// `+ create`
    Create,
    /// `& adopt`: an existing object stead did not make becomes owned, nothing is
    /// recreated; its remaining differences are converged as an update would.
    Adopt,
    /// `~ update in place`
    Update,
    /// `-/+ replace`
    Replace,
    /// `- delete`
    Delete,
    /// `= retain` (left the manifests, data kept)
    Retain,
    /// Nothing to do.
    Noop,
}

impl Action {
    /// The plan symbol.
    pub fn symbol(self) -> &'static str {
        match self {
            Action::Create => "+",
            Action::Adopt => "&",
            Action::Update => "~",
            Action::Replace => "-/+",
            Action::Delete => "-",
            Action::Retain => "=",
            Action::Noop => " ",
        }
    }

    /// The verb shown after the symbol.
    pub fn verb(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Adopt => "adopt",
            Action::Update => "update in place",
            Action::Replace => "replace",
            Action::Delete => "delete",
            Action::Retain => "retain",
            Action::Noop => "no changes",
        }
    }
}

/// One resource's change.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    /// The resource.
    pub id: ResourceId,
    /// What happens.
    pub action: Action,
    /// The highest impact of the fields (absent for create/retain/noop).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub impact: Option<Impact>,
    /// Changed fields, `old -> new`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldChange>,
    /// The host drifted from the last apply although the manifest did not change.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub drift: bool,
    /// Why (e.g. "deletionPolicy: Delete", "recovering an interrupted apply").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Name of the safety snapshot taken before this data-loss change, when the pool
    /// supports cheap snapshots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub safety_snapshot: Option<String>,
    /// The change stops the running object: the longest its graceful stop may take
    /// before it is killed, in seconds.
    #[serde(rename = "stopTimeoutSecs", skip_serializing_if = "Option::is_none")]
    pub stop_timeout_secs: Option<u64>,
}

impl Change {
    /// Whether carrying out this change stops the object when it runs: a delete, a
    /// replace, an update with a restart impact or one that sets `state: stopped`.
    pub fn stops(&self) -> bool {
        match self.action {
            Action::Delete | Action::Replace => true,
            Action::Update | Action::Adopt => {
                self.impact.is_some_and(|i| i >= Impact::Restart)
                    || self.fields.iter().any(|f| {
                        f.path == "/state"
                            && f.new.as_ref().and_then(Value::as_str) == Some("stopped")
                    })
            }
            Action::Create | Action::Retain | Action::Noop => false,
        }
    }

    /// Records the stop timeout `driver` gives `r` (observed as `obs`) when this change
    /// stops it.
    fn with_stop(mut self, driver: &dyn Driver, r: &Resource, obs: &Observed) -> Self {
        if self.stops() {
            self.stop_timeout_secs = driver.stop_timeout_secs(r, obs);
        }
        self
    }
}

/// The name of a safety snapshot for `action` taken at `now`: `pre-delete-20261126T150000Z`.
pub fn safety_snapshot_name(action: Action, now: DateTime<Utc>) -> String {
    let stamp = now.format("%Y%m%dT%H%M%SZ");
    let verb = match action {
        Action::Replace => "replace",
        _ => "delete",
    };
    format!("pre-{verb}-{stamp}")
}

/// An error that stops the plan from being applied.
#[derive(Debug, Clone, Serialize)]
pub struct PlanError {
    /// The resource.
    pub id: ResourceId,
    /// What is wrong.
    pub message: String,
}

/// Options that shape the plan: everything it depends on besides the desired, observed
/// and recorded state. Every filter lives here, so [`plan`] returns the final plan, the
/// one that is shown and executed; nobody edits a plan afterwards.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// Do not delete owned resources missing from the manifests.
    pub no_prune: bool,
    /// Allow `data-loss` changes that are not opted in by `deletionPolicy: Delete`.
    pub allow_data_loss: bool,
    /// Environment teardown: owned resources that left the manifests are deleted even
    /// when their policy is to retain them.
    pub purge_retained: bool,
    /// Leave out the changes that only repair drift (the host changed, the manifest did
    /// not): the controller's `--drift=report`.
    pub skip_drift: bool,
    /// Plan only these ids (destroy): the others get neither a change nor an error.
    pub only: Option<BTreeSet<ResourceId>>,
    /// Ids left out of the plan, each with why (a resource held back by the controller,
    /// or one of its dependents): they get neither a change nor an error.
    pub exclude: BTreeMap<ResourceId, String>,
    /// When the plan is made: names the safety snapshots. The planner never reads the
    /// clock.
    pub now: DateTime<Utc>,
    /// Adopt existing objects stead does not own (`--adopt`) instead of refusing them;
    /// a resource can ask for it alone with the annotation [`ADOPT_ANNOTATION`].
    pub adopt: bool,
}

/// The annotation `stead.dev/adopt: "true"`: adopt this resource's existing object
/// (as `--adopt` does for all of them).
pub const ADOPT_ANNOTATION: &str = "stead.dev/adopt";

impl PlanOptions {
    /// Default options at `now`: prune, no data loss, nothing left out.
    pub fn at(now: DateTime<Utc>) -> Self {
        PlanOptions {
            no_prune: false,
            allow_data_loss: false,
            purge_retained: false,
            skip_drift: false,
            only: None,
            exclude: BTreeMap::new(),
            now,
            adopt: false,
        }
    }

    /// Whether the existing unowned object of `r` is to be adopted: `--adopt`, or the
    /// resource's annotation [`ADOPT_ANNOTATION`] is `"true"`.
    pub fn adopts(&self, r: &Resource) -> bool {
        self.adopt
            || r.metadata
                .annotations
                .get(ADOPT_ANNOTATION)
                .is_some_and(|v| v == "true")
    }

    /// Whether the plan covers `id` (it is in `only`, when set, and not excluded).
    pub fn selects(&self, id: &ResourceId) -> bool {
        self.only.as_ref().is_none_or(|only| only.contains(id)) && !self.exclude.contains_key(id)
    }
}

impl Default for PlanOptions {
    /// [`PlanOptions::at`] the current time: the caller's clock read, not the planner's.
    fn default() -> Self {
        PlanOptions::at(Utc::now())
    }
}

/// The plan, computed once by [`plan`] and executed as shown. It cannot be built
/// outside this crate; no caller edits one (every filter is a [`PlanOptions`] field).
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct Plan {
    /// Changes in execution order: creates/updates/replaces by dependency waves, then
    /// deletes in reverse dependency order. No-ops are included (action `noop`).
    pub changes: Vec<Change>,
    /// Errors; a plan with errors is not applied.
    pub errors: Vec<PlanError>,
    /// Things the plan leaves alone but the user should know (objects carrying stead's
    /// mark that neither the state nor the manifests know). They do not stop an apply.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<PlanError>,
}

impl Plan {
    /// Whether anything would change.
    pub fn has_changes(&self) -> bool {
        self.changes.iter().any(|c| c.action != Action::Noop)
    }

    /// Counts per action.
    pub fn summary(&self) -> BTreeMap<Action, usize> {
        let mut m = BTreeMap::new();
        for c in &self.changes {
            *m.entry(c.action).or_insert(0) += 1;
        }
        m
    }
}

/// Resolves ids against desired first, then last-applied inventory copies.
pub struct World<'a> {
    /// Desired resources.
    pub desired: &'a Desired,
    /// Last-applied resources.
    pub applied: &'a BTreeMap<ResourceId, InventoryEntry>,
}

impl Lookup for World<'_> {
    fn resource(&self, id: &ResourceId) -> Option<&Resource> {
        self.desired
            .get(id)
            .or_else(|| self.applied.get(id).map(|e| &e.resource))
    }
}

/// Diffs two JSON values leaf by leaf. Arrays are compared whole (they are sets or
/// ordered lists whose change reads best as one line).
pub fn diff_values(
    path: &str,
    old: Option<&Value>,
    new: Option<&Value>,
    out: &mut Vec<(String, Option<Value>, Option<Value>)>,
) {
    let empty = Value::Object(serde_json::Map::new());
    let (old, new) = match (old, new) {
        (None, Some(n @ Value::Object(_))) => (Some(&empty), Some(n)),
        (Some(o @ Value::Object(_)), None) => (Some(o), Some(&empty)),
        other => other,
    };
    match (old, new) {
        (Some(Value::Object(a)), Some(Value::Object(b))) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                diff_values(&format!("{path}/{k}"), a.get(k), b.get(k), out);
            }
        }
        (a, b) => {
            let a = a.filter(|v| !v.is_null());
            let b = b.filter(|v| !v.is_null());
            if a != b {
                out.push((path.to_string(), a.cloned(), b.cloned()));
            }
        }
    }
}

/// What a plan is computed from: the desired set and what observing the host and
/// reading the state database found.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    /// The desired set.
    pub desired: &'a Desired,
    /// An entry for every desired and inventory id that was observed (absent ones too).
    pub observed: &'a BTreeMap<ResourceId, Observed>,
    /// Owned resources as last applied.
    pub inventory: &'a BTreeMap<ResourceId, InventoryEntry>,
    /// Ids with open journal entries from an interrupted run: objects found for them are
    /// stead's own even if their mark was not yet written.
    pub pending: &'a BTreeSet<ResourceId>,
    /// Resources whose observation failed: they are not planned (absent would read as
    /// "create"), and each is reported as its error.
    pub observe_errors: &'a [PlanError],
    /// Things to report beside the plan (objects carrying stead's mark that nobody
    /// knows): never acted on.
    pub warnings: &'a [PlanError],
}

/// The registered drivers, one per kind.
type DriverMap = BTreeMap<Kind, Box<dyn Driver>>;

/// Computes the plan: creates and updates in dependency waves, then the prune of owned
/// resources that left the manifests, in reverse dependency order. The result is final.
pub fn plan(input: &PlanInput<'_>, drivers: &DriverMap, opts: &PlanOptions) -> Plan {
    let mut planner = Planner::new(input, drivers, opts);
    let desired_edges = edges(input.desired.resources.values());
    planner.plan_desired(&desired_edges);
    planner.plan_prune(&desired_edges);
    planner.finish()
}

/// The planner's working state: the inputs and the plan built so far.
struct Planner<'a> {
    input: PlanInput<'a>,
    drivers: &'a DriverMap,
    opts: &'a PlanOptions,
    world: World<'a>,
    unobserved: BTreeSet<&'a ResourceId>,
    absent: Observed,
    changes: Vec<Change>,
    errors: Vec<PlanError>,
}

impl<'a> Planner<'a> {
    fn new(input: &PlanInput<'a>, drivers: &'a DriverMap, opts: &'a PlanOptions) -> Self {
        Planner {
            input: *input,
            drivers,
            opts,
            world: World {
                desired: input.desired,
                applied: input.inventory,
            },
            unobserved: input.observe_errors.iter().map(|e| &e.id).collect(),
            absent: Observed::absent(),
            changes: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// Whether `id` is planned at all: observed, and selected by the options.
    fn covers(&self, id: &ResourceId) -> bool {
        !self.unobserved.contains(id) && self.opts.selects(id)
    }

    fn error(&mut self, id: &ResourceId, message: String) {
        self.errors.push(PlanError {
            id: id.clone(),
            message,
        });
    }

    /// The driver of `id`'s kind, or a plan error saying there is none.
    fn driver(&mut self, id: &ResourceId) -> Option<&'a dyn Driver> {
        let drivers: &'a DriverMap = self.drivers;
        let driver = drivers.get(&id.kind).map(|d| d.as_ref());
        if driver.is_none() {
            self.error(id, format!("no driver for kind {}", id.kind));
        }
        driver
    }

    fn observed(&self, id: &ResourceId) -> &Observed {
        self.input.observed.get(id).unwrap_or(&self.absent)
    }

    /// Creates and updates of the desired resources, in dependency waves.
    fn plan_desired(&mut self, desired_edges: &[Edge]) {
        let desired = self.input.desired;
        let graph = DepGraph::new(desired.resources.keys().cloned(), desired_edges);
        for id in graph.waves().into_iter().flatten() {
            let Some(r) = desired.get(&id) else { continue };
            if !id.kind.is_host_object() || !self.covers(&id) {
                continue;
            }
            let Some(driver) = self.driver(&id) else {
                continue;
            };
            let planned = plan_one(
                r,
                self.observed(&id),
                self.input.inventory.get(&id),
                self.input.pending.contains(&id),
                driver,
                &self.world,
                self.opts,
            );
            match planned {
                Ok(c) if c.drift && self.opts.skip_drift => {}
                Ok(c) => self
                    .changes
                    .push(c.with_stop(driver, r, self.observed(&id))),
                Err(msg) => self.error(&id, msg),
            }
        }
    }

    /// Deletes (or retains) owned resources that left the manifests, in reverse
    /// dependency order.
    fn plan_prune(&mut self, desired_edges: &[Edge]) {
        let inventory = self.input.inventory;
        let gone: Vec<&InventoryEntry> = inventory
            .iter()
            .filter(|(id, _)| self.input.desired.get(id).is_none())
            .map(|(_, e)| e)
            .collect();
        if gone.is_empty() {
            return;
        }
        let gone_edges = edges(gone.iter().map(|e| &e.resource));
        let g = DepGraph::new(gone.iter().map(|e| e.resource.id.clone()), &gone_edges);
        let mut waves = g.waves();
        waves.reverse();
        for id in waves.into_iter().flatten() {
            let Some(entry) = inventory.get(&id) else {
                continue;
            };
            if self.covers(&id) {
                self.prune_one(entry, desired_edges);
            }
        }
    }

    /// The prune of one owned resource that left the manifests.
    fn prune_one(&mut self, entry: &InventoryEntry, desired_edges: &[Edge]) {
        let id = &entry.resource.id;
        let Some(driver) = self.driver(id) else {
            return;
        };
        if self.opts.no_prune {
            return;
        }
        // A desired resource that still references this one blocks the delete.
        if let Some(user) = desired_edges.iter().find(|e| &e.to == id) {
            let message = format!("cannot delete: {} still references it", user.from);
            self.error(id, message);
            return;
        }
        let obs = self.observed(id);
        if !entry.recorded && obs.exists && !obs.owned {
            // An interrupted step's intent, but the object found does not carry
            // stead's mark: it may be someone else's. Never touched.
            return;
        }
        let planned = match prune_action(entry, driver) {
            // What stead did not make, an environment teardown does not destroy either.
            PruneAction::Retain if self.opts.purge_retained && !entry.adopted => {
                Ok(purge_change(entry, driver))
            }
            PruneAction::Retain => Ok(retain_change(id, entry.adopted)),
            PruneAction::Delete => delete_change(entry, obs, driver, &self.world, self.opts),
        };
        let planned = planned.and_then(|c| {
            if c.action == Action::Delete && obs.exists {
                self.check_delete_blockers(entry, obs, driver)?;
            }
            Ok(c.with_stop(driver, &entry.resource, obs))
        });
        match planned {
            Ok(c) => self.changes.push(c),
            Err(msg) => self.error(id, msg),
        }
    }

    /// Refuses the delete of `entry` while objects on the host need it (the driver's
    /// [`Driver::delete_blockers`]) and this plan does not delete them first.
    fn check_delete_blockers(
        &self,
        entry: &InventoryEntry,
        obs: &Observed,
        driver: &dyn Driver,
    ) -> Result<(), String> {
        let blockers = driver.delete_blockers(&entry.resource, obs, &self.world)?;
        let left: Vec<String> = blockers
            .iter()
            .filter(|b| {
                !self
                    .changes
                    .iter()
                    .any(|c| &c.id == *b && c.action == Action::Delete)
            })
            .map(ToString::to_string)
            .collect();
        if left.is_empty() {
            return Ok(());
        }
        Err(format!(
            "cannot delete: {} on the host still need{} it (delete {} first)",
            left.join(", "),
            if left.len() == 1 { "s" } else { "" },
            if left.len() == 1 { "it" } else { "them" }
        ))
    }

    /// The plan: the planner's errors first, then the observe errors it covers.
    fn finish(mut self) -> Plan {
        let observe_errors = self.input.observe_errors;
        let covered = observe_errors
            .iter()
            .filter(|e| self.opts.selects(&e.id))
            .cloned();
        self.errors.extend(covered);
        Plan {
            changes: self.changes,
            errors: self.errors,
            warnings: self.input.warnings.to_vec(),
        }
    }
}

/// What pruning `entry` means: an adopted object is retained unless its last-applied
/// spec says `deletionPolicy: Delete`; any other follows its driver.
fn prune_action(entry: &InventoryEntry, driver: &dyn Driver) -> PruneAction {
    let explicit_delete =
        entry.resource.spec_json().get("deletionPolicy") == Some(&Value::from("Delete"));
    match (entry.adopted, explicit_delete) {
        (true, false) => PruneAction::Retain,
        _ => driver.prune_action(&entry.resource),
    }
}

/// `= retain`: the resource leaves management, its data stays on the host.
fn retain_change(id: &ResourceId, adopted: bool) -> Change {
    let note = if adopted {
        "adopted, so deletionPolicy defaults to Retain: kept on the host, no longer managed"
    } else {
        "deletionPolicy: Retain: data kept on the host, no longer managed"
    };
    Change {
        id: id.clone(),
        action: Action::Retain,
        impact: None,
        fields: Vec::new(),
        drift: false,
        note: Some(note.into()),
        safety_snapshot: None,
        stop_timeout_secs: None,
    }
}

/// Environment teardown of a resource whose policy is to retain it: deleted, data too.
fn purge_change(entry: &InventoryEntry, driver: &dyn Driver) -> Change {
    Change {
        id: entry.resource.id.clone(),
        action: Action::Delete,
        impact: Some(driver.delete_impact(&entry.resource)),
        fields: Vec::new(),
        drift: false,
        note: Some("environment teardown deletes retained data too".into()),
        safety_snapshot: None,
        stop_timeout_secs: None,
    }
}

/// `- delete` of an owned resource that left the manifests, or the error refusing it
/// (data loss without an opt-in).
fn delete_change(
    entry: &InventoryEntry,
    obs: &Observed,
    driver: &dyn Driver,
    world: &World<'_>,
    opts: &PlanOptions,
) -> Result<Change, String> {
    let impact = driver.delete_impact(&entry.resource);
    // `deletionPolicy: Delete` in the last-applied spec is the opt-in.
    let opted_in = entry.resource.spec_json().get("deletionPolicy") == Some(&Value::from("Delete"));
    if impact == Impact::DataLoss && !opted_in && !opts.allow_data_loss {
        return Err("deleting it destroys data: re-run with --allow-data-loss to confirm".into());
    }
    let safety_snapshot = (impact == Impact::DataLoss
        && obs.exists
        && driver.supports_safety_snapshot(&entry.resource, world))
    .then(|| safety_snapshot_name(Action::Delete, opts.now));
    let note = if !obs.exists {
        Some("already absent from the host; forgetting it".into())
    } else if !entry.recorded {
        Some("made by an interrupted apply that the state never recorded".into())
    } else if opted_in && impact == Impact::DataLoss {
        Some("deletionPolicy: Delete".into())
    } else {
        None
    };
    Ok(Change {
        id: entry.resource.id.clone(),
        action: Action::Delete,
        impact: Some(impact),
        fields: Vec::new(),
        drift: false,
        safety_snapshot,
        note,
        stop_timeout_secs: None,
    })
}

/// The change of one desired resource, or the error refusing it.
fn plan_one(
    r: &Resource,
    obs: &Observed,
    inv: Option<&InventoryEntry>,
    pending: bool,
    driver: &dyn Driver,
    world: &World<'_>,
    opts: &PlanOptions,
) -> Result<Change, String> {
    let change = Change {
        id: r.id.clone(),
        action: Action::Noop,
        impact: None,
        fields: Vec::new(),
        drift: false,
        note: pending.then(|| "recovering an interrupted apply".to_string()),
        safety_snapshot: None,
        stop_timeout_secs: None,
    };
    let want = driver.desired_state(r, world);
    if !obs.exists {
        if opts.adopts(r) && inv.is_none() {
            // Nothing stead sees, but another manager may run it under this identity.
            driver
                .adopt_check(r, obs, world)
                .map_err(|m| format!("cannot adopt the existing object: {m}"))?;
        }
        return create_change(change, r, obs, inv, driver, &want);
    }
    if !obs.owned && inv.is_none() && opts.adopts(r) {
        return adopt_change(change, r, obs, driver, &want, world);
    }
    if !obs.owned && inv.is_none() && !pending {
        return Err(format!(
            "an object named {:?} already exists on the host and is not owned by stead; stead will not adopt or change it (rename the resource, remove the object, or adopt it with --adopt or the annotation {ADOPT_ANNOTATION}: \"true\")",
            r.id.name
        ));
    }
    let mut fields = observed_field_changes(driver, obs, &want);
    if let Some(inv) = inv {
        fields.extend(unobservable_field_changes(r, inv, &want, &fields));
    }
    if fields.is_empty() {
        return Ok(change);
    }
    update_change(change, r, obs, inv, fields, driver, world, opts)
}

/// `& adopt`: the driver's [`Driver::adopt_check`] says the existing object can be taken
/// over; the line carries the differences left to converge after ownership is recorded,
/// each with its impact. A difference that would recreate the object or destroy data is
/// refused: adoption never recreates.
fn adopt_change(
    mut change: Change,
    r: &Resource,
    obs: &Observed,
    driver: &dyn Driver,
    want: &Value,
    world: &World<'_>,
) -> Result<Change, String> {
    driver
        .adopt_check(r, obs, world)
        .map_err(|m| format!("cannot adopt the existing object: {m}"))?;
    let owned = Observed {
        owned: true,
        ..obs.clone()
    };
    let fields = observed_field_changes(driver, obs, want);
    driver.check(r, &owned, &fields)?;
    let severe: Vec<&str> = fields
        .iter()
        .filter(|f| f.impact >= Impact::Recreate)
        .map(|f| f.path.as_str())
        .collect();
    if !severe.is_empty() {
        return Err(format!(
            "cannot adopt the existing object: {} differ{} from the manifest and changing {} would recreate it (make the manifest match the host, or remove the object and let stead create it)",
            severe.join(", "),
            if severe.len() == 1 { "s" } else { "" },
            if severe.len() == 1 { "it" } else { "them" },
        ));
    }
    change.action = Action::Adopt;
    change.impact = fields.iter().map(|f| f.impact).max();
    change.fields = fields;
    change.note = Some(
        "exists on the host: ownership is recorded, nothing is recreated; deletionPolicy defaults to Retain".into(),
    );
    Ok(change)
}

/// `+ create`: every desired leaf is new. Checked like an update, so a refusal is a
/// plan error, not an apply one.
fn create_change(
    mut change: Change,
    r: &Resource,
    obs: &Observed,
    inv: Option<&InventoryEntry>,
    driver: &dyn Driver,
    want: &Value,
) -> Result<Change, String> {
    change.action = Action::Create;
    let mut leaves = Vec::new();
    diff_values("", None, Some(want), &mut leaves);
    change.fields = leaves
        .into_iter()
        .map(|(path, _, new)| FieldChange {
            path,
            old: None,
            new,
            impact: Impact::Hot,
        })
        .collect();
    if inv.is_some() {
        change.drift = true;
        change.note =
            Some("owned object is missing from the host; it will be created again".into());
    }
    driver.check(r, obs, &change.fields)?;
    Ok(change)
}

/// The fields where the host differs from the desired state, each with its impact.
fn observed_field_changes(driver: &dyn Driver, obs: &Observed, want: &Value) -> Vec<FieldChange> {
    let mut leaves = Vec::new();
    diff_values("", Some(&obs.state), Some(want), &mut leaves);
    leaves
        .into_iter()
        .map(|(path, old, new)| {
            let impact = driver.impact(&path);
            FieldChange {
                path,
                old,
                new,
                impact,
            }
        })
        .collect()
}

/// Changes the host cannot show (fields outside the desired state, labels): the spec
/// against the last-applied spec. Hot: nothing on the host changes for them.
fn unobservable_field_changes(
    r: &Resource,
    inv: &InventoryEntry,
    want: &Value,
    observed: &[FieldChange],
) -> Vec<FieldChange> {
    let spec_now = serde_json::to_value(&r.spec).unwrap_or(Value::Null);
    let spec_then = serde_json::to_value(&inv.resource.spec).unwrap_or(Value::Null);
    let mut spec_leaves = Vec::new();
    diff_values("", Some(&spec_then), Some(&spec_now), &mut spec_leaves);
    let mut out: Vec<FieldChange> = Vec::new();
    for (path, old, new) in spec_leaves {
        let shown = want.pointer(&path).is_some()
            || observed
                .iter()
                .chain(&out)
                .any(|f| path.starts_with(&f.path))
            || is_observable_prefix(want, &path);
        if !shown {
            out.push(FieldChange {
                path,
                old,
                new,
                impact: Impact::Hot,
            });
        }
    }
    if inv.resource.metadata.labels != r.metadata.labels {
        out.push(FieldChange {
            path: "/metadata/labels".into(),
            old: serde_json::to_value(&inv.resource.metadata.labels).ok(),
            new: serde_json::to_value(&r.metadata.labels).ok(),
            impact: Impact::Hot,
        });
    }
    out
}

/// `~ update` or `-/+ replace` by the highest field impact; `data-loss` needs the
/// opt-in and gets a safety snapshot when the driver can take one.
#[allow(clippy::too_many_arguments)]
fn update_change(
    mut change: Change,
    r: &Resource,
    obs: &Observed,
    inv: Option<&InventoryEntry>,
    fields: Vec<FieldChange>,
    driver: &dyn Driver,
    world: &World<'_>,
    opts: &PlanOptions,
) -> Result<Change, String> {
    driver.check(r, obs, &fields)?;
    let impact = fields.iter().map(|f| f.impact).max().unwrap_or(Impact::Hot);
    if impact == Impact::DataLoss && !opts.allow_data_loss {
        let which: Vec<&str> = fields
            .iter()
            .filter(|f| f.impact == Impact::DataLoss)
            .map(|f| f.path.as_str())
            .collect();
        return Err(format!(
            "changing {} destroys data: re-run with --allow-data-loss to confirm",
            which.join(", ")
        ));
    }
    change.action = if impact >= Impact::Recreate {
        Action::Replace
    } else {
        Action::Update
    };
    if impact == Impact::DataLoss {
        let subject = inv.map(|i| &i.resource).unwrap_or(r);
        if driver.supports_safety_snapshot(subject, world) {
            change.safety_snapshot = Some(safety_snapshot_name(Action::Replace, opts.now));
        }
    }
    change.impact = Some(impact);
    change.drift = inv.is_some_and(|i| i.spec_hash == r.spec_hash());
    change.fields = fields;
    Ok(change)
}

/// Whether `path` lies under an array the desired state shows (arrays compare whole).
fn is_observable_prefix(want: &Value, path: &str) -> bool {
    let mut p = path;
    while let Some(i) = p.rfind('/') {
        p = &p[..i];
        if p.is_empty() {
            break;
        }
        if want.pointer(p).is_some() {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::TimeZone;
    use serde_json::json;

    use super::*;
    use crate::testkit::*;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 26, 15, 0, 0).unwrap()
    }

    /// A planning problem: what is desired, what was applied, what the host shows.
    struct Case {
        desired: Desired,
        inventory: BTreeMap<ResourceId, InventoryEntry>,
        observed: BTreeMap<ResourceId, Observed>,
        pending: BTreeSet<ResourceId>,
        observe_errors: Vec<PlanError>,
        script: Arc<Script>,
    }

    impl Case {
        /// `desired` against a host where `applied` was applied and is still in sync.
        fn new(desired_yaml: &str, applied_yaml: &str) -> Case {
            let applied = desired(applied_yaml);
            Case {
                desired: desired(desired_yaml),
                inventory: inventory(&applied),
                observed: in_sync(&applied),
                pending: BTreeSet::new(),
                observe_errors: Vec::new(),
                script: Arc::new(Script::default()),
            }
        }

        fn script(mut self, edit: impl FnOnce(&mut Script)) -> Case {
            let mut script = Script::default();
            edit(&mut script);
            self.script = Arc::new(script);
            self
        }

        fn plan(&self, opts: &PlanOptions) -> Plan {
            let input = PlanInput {
                desired: &self.desired,
                observed: &self.observed,
                inventory: &self.inventory,
                pending: &self.pending,
                observe_errors: &self.observe_errors,
                warnings: &[],
            };
            plan(&input, &drivers(&self.script), opts)
        }
    }

    fn opts() -> PlanOptions {
        PlanOptions::at(t0())
    }

    /// `(id, action)` of every change, in plan order.
    fn actions(p: &Plan) -> Vec<(String, Action)> {
        p.changes
            .iter()
            .map(|c| (c.id.to_string(), c.action))
            .collect()
    }

    fn errors(p: &Plan) -> Vec<(String, String)> {
        p.errors
            .iter()
            .map(|e| (e.id.to_string(), e.message.clone()))
            .collect()
    }

    fn change<'p>(p: &'p Plan, id: &str) -> &'p Change {
        p.changes
            .iter()
            .find(|c| c.id.to_string() == id)
            .unwrap_or_else(|| panic!("no change for {id} in {p:?}"))
    }

    #[test]
    fn safety_snapshot_names_come_from_the_given_time() {
        assert_eq!(
            safety_snapshot_name(Action::Delete, t0()),
            "pre-delete-20261126T150000Z"
        );
        assert_eq!(
            safety_snapshot_name(Action::Replace, t0()),
            "pre-replace-20261126T150000Z"
        );
    }

    #[test]
    fn creates_come_in_dependency_order() {
        let yaml = vol("a", "1G", "Retain") + &pool("local") + &net("lan0", 1500);
        let p = Case::new(&yaml, "").plan(&opts());
        assert_eq!(
            actions(&p),
            [
                ("StoragePool/local".to_string(), Action::Create),
                ("Network/lan0".to_string(), Action::Create),
                ("Volume/a".to_string(), Action::Create),
            ]
        );
        let c = change(&p, "Volume/a");
        assert_eq!(c.impact, None);
        assert!(
            c.fields.iter().any(|f| f.path == "/size"
                && f.old.is_none()
                && f.new == Some(json!("1000000000")))
        );
        assert!(p.errors.is_empty(), "{:?}", p.errors);
    }

    #[test]
    fn in_sync_resources_are_noops() {
        let yaml = pool("local") + &vol("a", "1G", "Retain");
        let p = Case::new(&yaml, &yaml).plan(&opts());
        assert!(!p.has_changes(), "{p:?}");
        assert_eq!(p.changes.len(), 2);
    }

    #[test]
    fn the_impact_of_a_change_is_its_highest_field_impact() {
        let before = pool("local") + &net("lan0", 1500) + &vol("a", "1Gi", "Retain");
        let after = pool("local") + &net("lan0", 9000) + &vol("a", "2Gi", "Retain");
        let labelled = |impact| {
            Case::new(&after, &before)
                .script(|s| {
                    s.impacts.insert("/size".into(), impact);
                })
                .plan(&opts())
        };

        let p = labelled(Impact::Restart);
        let net = change(&p, "Network/lan0");
        assert_eq!(
            (net.action, net.impact),
            (Action::Update, Some(Impact::Hot))
        );
        let v = change(&p, "Volume/a");
        assert_eq!(
            (v.action, v.impact),
            (Action::Update, Some(Impact::Restart))
        );
        assert_eq!(v.fields.len(), 1);
        assert_eq!(v.fields[0].path, "/size");
        assert_eq!(v.fields[0].old, Some(json!("1Gi")));
        assert_eq!(v.fields[0].new, Some(json!("2Gi")));
        assert!(!v.drift);

        let p = labelled(Impact::Recreate);
        let v = change(&p, "Volume/a");
        assert_eq!(
            (v.action, v.impact),
            (Action::Replace, Some(Impact::Recreate))
        );
        assert_eq!(v.safety_snapshot, None);
    }

    #[test]
    fn fields_the_host_cannot_show_are_diffed_against_the_last_apply() {
        let before = pool("local") + &vol("a", "1Gi", "Retain");
        let after = pool("local")
            + &doc(
                "Volume",
                "a",
                "{pool: local, size: 1Gi, deletionPolicy: Delete}",
            )
            .replace("{name: a}", "{name: a, labels: {tier: db}}");
        let p = Case::new(&after, &before).plan(&opts());
        let v = change(&p, "Volume/a");
        assert_eq!((v.action, v.impact), (Action::Update, Some(Impact::Hot)));
        assert!(!v.drift, "the manifest changed");
        let fields: Vec<(&str, Option<&Value>, Option<&Value>)> = v
            .fields
            .iter()
            .map(|f| (f.path.as_str(), f.old.as_ref(), f.new.as_ref()))
            .collect();
        assert_eq!(
            fields,
            [
                (
                    "/deletionPolicy",
                    Some(&json!("Retain")),
                    Some(&json!("Delete"))
                ),
                (
                    "/metadata/labels",
                    Some(&json!({})),
                    Some(&json!({"tier": "db"}))
                ),
            ]
        );
    }

    #[test]
    fn a_data_loss_change_needs_the_opt_in() {
        let before = pool("local") + &vol("a", "1G", "Retain");
        let after = pool("local") + &vol("a", "2G", "Retain");
        let case = Case::new(&after, &before).script(|s| {
            s.impacts.insert("/size".into(), Impact::DataLoss);
            s.snapshots.insert(Kind::Volume);
        });

        let p = case.plan(&opts());
        assert_eq!(
            errors(&p),
            [(
                "Volume/a".to_string(),
                "changing /size destroys data: re-run with --allow-data-loss to confirm"
                    .to_string()
            )]
        );
        assert!(p.changes.iter().all(|c| c.id.name != "a"));

        let allowed = PlanOptions {
            allow_data_loss: true,
            ..opts()
        };
        let p = case.plan(&allowed);
        let v = change(&p, "Volume/a");
        assert_eq!(v.action, Action::Replace);
        assert_eq!(v.impact, Some(Impact::DataLoss));
        assert_eq!(
            v.safety_snapshot.as_deref(),
            Some("pre-replace-20261126T150000Z")
        );
    }

    #[test]
    fn host_drift_is_marked_and_a_missing_owned_object_is_created_again() {
        let yaml = net("lan0", 9000) + &net("lan1", 9000);
        let mut case = Case::new(&yaml, &yaml);
        let lan0 = id(Kind::Network, "lan0");
        let mut changed = FakeDriver::project(&case.desired.resources[&lan0]);
        changed["mtu"] = json!(1400);
        case.observed.insert(lan0, present(changed));
        case.observed
            .insert(id(Kind::Network, "lan1"), Observed::absent());

        let p = case.plan(&opts());
        let c = change(&p, "Network/lan0");
        assert_eq!(c.action, Action::Update);
        assert!(c.drift);
        let c = change(&p, "Network/lan1");
        assert_eq!(c.action, Action::Create);
        assert!(c.drift);
        assert_eq!(
            c.note.as_deref(),
            Some("owned object is missing from the host; it will be created again")
        );
    }

    #[test]
    fn an_unowned_object_in_the_way_is_not_adopted() {
        let yaml = net("lan0", 9000);
        let mut case = Case::new(&yaml, "");
        let lan0 = id(Kind::Network, "lan0");
        let state = FakeDriver::project(&case.desired.resources[&lan0]);
        let found = Observed {
            owned: false,
            ..present(state)
        };
        case.observed.insert(lan0.clone(), found);
        let p = case.plan(&opts());
        assert!(p.changes.is_empty(), "{p:?}");
        assert_eq!(p.errors.len(), 1);
        assert!(p.errors[0].message.starts_with(
            "an object named \"lan0\" already exists on the host and is not owned by stead"
        ));

        // The same object left by an interrupted apply of ours is taken over.
        case.pending.insert(lan0);
        let p = case.plan(&opts());
        assert_eq!(actions(&p), [("Network/lan0".to_string(), Action::Noop)]);
        assert_eq!(
            p.changes[0].note.as_deref(),
            Some("recovering an interrupted apply")
        );
    }

    /// `case` with the objects of `names` (Networks) found on the host but not owned,
    /// showing the desired state with `mtu` instead.
    fn unowned_networks(case: &mut Case, names: &[&str], mtu: u32) {
        for name in names {
            let nid = id(Kind::Network, name);
            let mut state = FakeDriver::project(&case.desired.resources[&nid]);
            state["mtu"] = json!(mtu);
            let found = Observed {
                owned: false,
                ..present(state)
            };
            case.observed.insert(nid, found);
        }
    }

    #[test]
    fn adopt_takes_over_an_unowned_object_and_shows_what_is_left_to_change() {
        let mut case = Case::new(&(net("lan0", 9000) + &net("lan1", 9000)), "");
        unowned_networks(&mut case, &["lan0", "lan1"], 1500);
        let p = case.plan(&PlanOptions {
            adopt: true,
            ..opts()
        });
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let c = change(&p, "Network/lan0");
        assert_eq!((c.action, c.impact), (Action::Adopt, Some(Impact::Hot)));
        let fields: Vec<_> = c
            .fields
            .iter()
            .map(|f| (f.path.as_str(), f.old.clone(), f.new.clone(), f.impact))
            .collect();
        assert_eq!(
            fields,
            [("/mtu", Some(json!(1500)), Some(json!(9000)), Impact::Hot)]
        );
        assert!(
            c.note
                .as_deref()
                .is_some_and(|n| n.contains("nothing is recreated"))
        );
        assert!(!c.drift);
        assert!(p.has_changes());
        assert_eq!(p.summary().get(&Action::Adopt), Some(&2));
    }

    #[test]
    fn the_annotation_adopts_one_resource_and_the_others_stay_errors() {
        let annotated = net("lan0", 1500).replace(
            "{name: lan0}",
            "{name: lan0, annotations: {stead.dev/adopt: \"true\"}}",
        );
        assert_ne!(annotated, net("lan0", 1500), "the annotation is in");
        let mut case = Case::new(&(annotated + &net("lan1", 1500)), "");
        unowned_networks(&mut case, &["lan0", "lan1"], 1500);
        let p = case.plan(&opts());
        assert_eq!(actions(&p), [("Network/lan0".to_string(), Action::Adopt)]);
        assert_eq!(change(&p, "Network/lan0").impact, None, "nothing differs");
        assert_eq!(p.errors.len(), 1);
        assert_eq!(p.errors[0].id.to_string(), "Network/lan1");
        assert!(p.errors[0].message.contains("--adopt"), "{:?}", p.errors);
    }

    #[test]
    fn a_refused_adoption_is_a_plan_error_and_nothing_is_planned() {
        let mut case = Case::new(&net("lan0", 1500), "").script(|s| {
            s.adopt_refusals
                .insert("lan0".into(), "its ports [eth9] differ: add them".into());
        });
        unowned_networks(&mut case, &["lan0"], 1500);
        let p = case.plan(&PlanOptions {
            adopt: true,
            ..opts()
        });
        assert!(p.changes.is_empty(), "{p:?}");
        assert_eq!(
            errors(&p),
            [(
                "Network/lan0".to_string(),
                "cannot adopt the existing object: its ports [eth9] differ: add them".to_string()
            )]
        );
    }

    #[test]
    fn with_adoption_asked_an_absent_object_is_created_unless_another_manager_runs_it() {
        let yaml = net("lan0", 1500) + &net("lan1", 1500);
        let case = Case::new(&yaml, "").script(|s| {
            s.adopt_refusals.insert(
                "lan1".into(),
                "a process not started by stead runs it".into(),
            );
        });
        let adopt = PlanOptions {
            adopt: true,
            ..opts()
        };
        let p = case.plan(&adopt);
        assert_eq!(actions(&p), [("Network/lan0".to_string(), Action::Create)]);
        assert_eq!(
            errors(&p),
            [(
                "Network/lan1".to_string(),
                "cannot adopt the existing object: a process not started by stead runs it"
                    .to_string()
            )]
        );
        // Without adoption asked, nothing is checked.
        assert!(case.plan(&opts()).errors.is_empty());
    }

    #[test]
    fn an_adoption_that_would_recreate_the_object_is_refused() {
        let mut case = Case::new(&net("lan0", 9000), "").script(|s| {
            s.impacts.insert("/mtu".into(), Impact::Recreate);
        });
        unowned_networks(&mut case, &["lan0"], 1500);
        let p = case.plan(&PlanOptions {
            adopt: true,
            ..opts()
        });
        assert!(p.changes.is_empty(), "{p:?}");
        assert_eq!(p.errors.len(), 1);
        assert!(
            p.errors[0]
                .message
                .starts_with("cannot adopt the existing object: /mtu differs"),
            "{:?}",
            p.errors
        );
    }

    #[test]
    fn an_adopted_object_is_retained_on_prune_unless_its_manifest_said_delete() {
        let applied =
            net("lan0", 1500) + &vol("kept", "1G", "Retain") + &vol("gone", "1G", "Delete");
        let mut case = Case::new(&pool("local"), &(pool("local") + &applied));
        for e in case.inventory.values_mut() {
            e.adopted = e.resource.id.kind != Kind::StoragePool;
        }
        let p = case.plan(&opts());
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let lan0 = change(&p, "Network/lan0");
        assert_eq!(lan0.action, Action::Retain, "the driver would delete it");
        assert_eq!(
            lan0.note.as_deref(),
            Some(
                "adopted, so deletionPolicy defaults to Retain: kept on the host, no longer managed"
            )
        );
        assert_eq!(change(&p, "Volume/kept").action, Action::Retain);
        assert_eq!(change(&p, "Volume/gone").action, Action::Delete);
        // An environment teardown purges what stead made, not what it adopted.
        let p = case.plan(&PlanOptions {
            purge_retained: true,
            ..opts()
        });
        assert_eq!(change(&p, "Network/lan0").action, Action::Retain);
        assert_eq!(change(&p, "Volume/kept").action, Action::Retain);
        // Not adopted: the driver's policy (delete) as before.
        for e in case.inventory.values_mut() {
            e.adopted = false;
        }
        let p = case.plan(&opts());
        assert_eq!(change(&p, "Network/lan0").action, Action::Delete);
    }

    #[test]
    fn prune_deletes_users_before_what_they_use() {
        let applied = pool("local") + &vol("a", "1G", "Delete") + &net("lan0", 1500);
        let p = Case::new("", &applied).plan(&opts());
        let order = actions(&p);
        assert_eq!(order.len(), 3, "{order:?}");
        assert!(order.iter().all(|(_, a)| *a == Action::Delete));
        let at = |id: &str| order.iter().position(|(i, _)| i == id).unwrap();
        assert!(at("Volume/a") < at("StoragePool/local"), "{order:?}");
        assert_eq!(change(&p, "Volume/a").impact, Some(Impact::Recreate));
    }

    #[test]
    fn changes_that_stop_a_running_object_carry_its_stop_timeout() {
        let applied = pool("local") + &vol("a", "1G", "Delete");
        let case = Case::new(&pool("local"), &applied).script(|s| {
            s.stop_secs.insert(Kind::Volume, 7);
            s.stop_secs.insert(Kind::Network, 3);
        });
        let p = case.plan(&opts());
        assert_eq!(change(&p, "Volume/a").action, Action::Delete);
        assert_eq!(change(&p, "Volume/a").stop_timeout_secs, Some(7));
        // A create stops nothing.
        let p = Case::new(&net("lan0", 1500), "")
            .script(|s| {
                s.stop_secs.insert(Kind::Network, 3);
            })
            .plan(&opts());
        assert_eq!(change(&p, "Network/lan0").action, Action::Create);
        assert_eq!(change(&p, "Network/lan0").stop_timeout_secs, None);
    }

    #[test]
    fn prune_follows_the_deletion_policy() {
        let applied = pool("local") + &vol("keep", "1G", "Retain") + &vol("drop", "1G", "Delete");
        let case = Case::new(&pool("local"), &applied).script(|s| {
            s.data_loss_delete.insert(Kind::Volume);
            s.snapshots.insert(Kind::Volume);
        });
        let p = case.plan(&opts());
        let keep = change(&p, "Volume/keep");
        assert_eq!((keep.action, keep.impact), (Action::Retain, None));
        assert_eq!(
            keep.note.as_deref(),
            Some("deletionPolicy: Retain: data kept on the host, no longer managed")
        );
        let drop = change(&p, "Volume/drop");
        assert_eq!(
            (drop.action, drop.impact),
            (Action::Delete, Some(Impact::DataLoss))
        );
        assert_eq!(drop.note.as_deref(), Some("deletionPolicy: Delete"));
        assert_eq!(
            drop.safety_snapshot.as_deref(),
            Some("pre-delete-20261126T150000Z")
        );
    }

    #[test]
    fn a_data_loss_prune_without_the_policy_needs_the_opt_in() {
        let case = Case::new("", &pool("local")).script(|s| {
            s.data_loss_delete.insert(Kind::StoragePool);
        });
        let p = case.plan(&opts());
        assert_eq!(
            errors(&p),
            [(
                "StoragePool/local".to_string(),
                "deleting it destroys data: re-run with --allow-data-loss to confirm".to_string()
            )]
        );
        let p = case.plan(&PlanOptions {
            allow_data_loss: true,
            ..opts()
        });
        let c = change(&p, "StoragePool/local");
        assert_eq!((c.action, c.note.as_deref()), (Action::Delete, None));
        assert_eq!(c.safety_snapshot, None, "the driver cannot snapshot");
    }

    #[test]
    fn a_prune_that_objects_on_the_host_need_is_a_plan_error_unless_they_go_first() {
        let applied = pool("local")
            + &vol("tmpl", "1G", "Delete")
            + &vol("keep", "1G", "Retain")
            + &vol("c1", "1G", "Delete");
        let clones = vec![id(Kind::Volume, "c1"), id(Kind::Volume, "c2")];
        let case = Case::new(&(pool("local") + &vol("c1", "1G", "Delete")), &applied).script(|s| {
            s.blockers.insert("tmpl".into(), clones.clone());
            s.blockers.insert("keep".into(), clones.clone());
        });
        let p = case.plan(&opts());
        assert_eq!(
            errors(&p),
            [(
                "Volume/tmpl".to_string(),
                "cannot delete: Volume/c1, Volume/c2 on the host still need it (delete them first)"
                    .to_string()
            )]
        );
        assert!(p.changes.iter().all(|c| c.id.name != "tmpl"), "{p:?}");
        // A retained volume is not deleted at all: no refusal, the plan says it is kept.
        assert_eq!(change(&p, "Volume/keep").action, Action::Retain);

        // A blocker deleted earlier in the same plan does not count.
        let case = Case::new(&pool("local"), &applied).script(|s| {
            s.blockers
                .insert("tmpl".into(), vec![id(Kind::Volume, "c1")]);
        });
        let p = case.plan(&opts());
        assert!(errors(&p).is_empty(), "{:?}", errors(&p));
        assert_eq!(change(&p, "Volume/tmpl").action, Action::Delete);
    }

    #[test]
    fn prune_is_refused_while_a_desired_resource_references_it() {
        let applied = pool("local") + &vol("a", "1G", "Delete");
        let p = Case::new(&vol("a", "1G", "Delete"), &applied).plan(&opts());
        assert_eq!(
            errors(&p),
            [(
                "StoragePool/local".to_string(),
                "cannot delete: Volume/a still references it".to_string()
            )]
        );
    }

    #[test]
    fn no_prune_keeps_owned_resources_that_left() {
        let applied = pool("local") + &net("lan0", 1500);
        let p = Case::new(&pool("local"), &applied).plan(&PlanOptions {
            no_prune: true,
            ..opts()
        });
        assert_eq!(
            actions(&p),
            [("StoragePool/local".to_string(), Action::Noop)]
        );
        assert!(p.errors.is_empty());
    }

    #[test]
    fn an_unrecorded_intent_prunes_only_a_marked_object() {
        let mut case = Case::new("", &(net("lan0", 1500) + &net("lan1", 1500)));
        for (name, owned) in [("lan0", false), ("lan1", true)] {
            let id = id(Kind::Network, name);
            if let Some(e) = case.inventory.get_mut(&id) {
                e.recorded = false;
            }
            if let Some(o) = case.observed.get_mut(&id) {
                o.owned = owned;
            }
        }
        let p = case.plan(&opts());
        assert_eq!(actions(&p), [("Network/lan1".to_string(), Action::Delete)]);
        assert_eq!(
            p.changes[0].note.as_deref(),
            Some("made by an interrupted apply that the state never recorded")
        );
    }

    #[test]
    fn a_kind_without_driver_is_a_plan_error() {
        let yaml = doc(
            "BackupSchedule",
            "nightly",
            "{schedule: '0 3 * * *', targets: {selector: {matchLabels: {a: b}}}, storage: lab}",
        );
        let case = Case::new("", "");
        let mut case = case;
        case.desired = desired(&yaml);
        let p = case.plan(&opts());
        assert_eq!(
            errors(&p),
            [(
                "BackupSchedule/nightly".to_string(),
                "no driver for kind BackupSchedule".to_string()
            )]
        );
    }

    #[test]
    fn observe_failures_are_left_out_and_reported_as_their_error() {
        let yaml = pool("local") + &net("lan0", 1500);
        let mut case = Case::new(&yaml, "");
        let lan0 = id(Kind::Network, "lan0");
        case.observe_errors.push(PlanError {
            id: lan0,
            message: "cannot observe Network: boom".into(),
        });
        let p = case.plan(&opts());
        // Not a "create" of what could not be seen.
        assert_eq!(
            actions(&p),
            [("StoragePool/local".to_string(), Action::Create)]
        );
        assert_eq!(
            errors(&p),
            [(
                "Network/lan0".to_string(),
                "cannot observe Network: boom".to_string()
            )]
        );
    }

    #[test]
    fn skip_drift_leaves_out_drift_repairs_only() {
        let before = net("lan0", 1500) + &net("lan1", 1500);
        let after = net("lan0", 1500) + &net("lan1", 9000);
        let mut case = Case::new(&after, &before);
        case.observed
            .insert(id(Kind::Network, "lan0"), Observed::absent());
        let all = case.plan(&opts());
        assert!(change(&all, "Network/lan0").drift);
        let p = case.plan(&PlanOptions {
            skip_drift: true,
            ..opts()
        });
        assert_eq!(actions(&p), [("Network/lan1".to_string(), Action::Update)]);
    }

    #[test]
    fn only_restricts_changes_and_errors() {
        let applied = pool("local") + &net("lan0", 1500) + &net("lan1", 1500);
        let case = Case::new("", &applied).script(|s| {
            s.data_loss_delete.insert(Kind::StoragePool);
        });
        let lan0 = id(Kind::Network, "lan0");
        let p = case.plan(&PlanOptions {
            only: Some([lan0].into()),
            ..opts()
        });
        assert_eq!(actions(&p), [("Network/lan0".to_string(), Action::Delete)]);
        assert!(p.errors.is_empty(), "the pool's refusal is outside: {p:?}");
    }

    #[test]
    fn excluded_resources_get_neither_change_nor_error() {
        let yaml = pool("local") + &net("lan0", 1500) + &net("lan1", 1500);
        let mut case = Case::new(&yaml, "");
        case.observe_errors.push(PlanError {
            id: id(Kind::Network, "lan1"),
            message: "cannot observe".into(),
        });
        let mut o = opts();
        for name in ["lan0", "lan1"] {
            o.exclude
                .insert(id(Kind::Network, name), "held back".into());
        }
        let p = case.plan(&o);
        assert_eq!(
            actions(&p),
            [("StoragePool/local".to_string(), Action::Create)]
        );
        assert!(p.errors.is_empty(), "{p:?}");
    }

    #[test]
    fn purge_deletes_what_retain_would_keep() {
        let applied = pool("local") + &vol("keep", "1G", "Retain");
        let case = Case::new(&pool("local"), &applied).script(|s| {
            s.data_loss_delete.insert(Kind::Volume);
            s.snapshots.insert(Kind::Volume);
        });
        let p = case.plan(&PlanOptions {
            purge_retained: true,
            ..opts()
        });
        let c = change(&p, "Volume/keep");
        assert_eq!(
            (c.action, c.impact),
            (Action::Delete, Some(Impact::DataLoss))
        );
        assert_eq!(
            c.note.as_deref(),
            Some("environment teardown deletes retained data too")
        );
        assert_eq!(c.safety_snapshot, None);
    }
}
