//! The plan: a pure function of desired state, observed state and inventory.
//!
//! Pairing and diff are generic (argo gitops-engine style): each driver projects its
//! desired spec onto the observable shape ([`Driver::desired_state`]) and the plan
//! compares that with [`Observed::state`] leaf by leaf. Fields the host cannot show are
//! compared with the last-applied spec from the inventory. Every change carries its
//! impact; `data-loss` needs an explicit opt-in.

use std::collections::{BTreeMap, BTreeSet};

use crate::driver::{Driver, FieldChange, Impact, Lookup, Observed, PruneAction};
use serde::Serialize;
use serde_json::Value;
use stead_schema::graph::{DepGraph, edges};
use stead_schema::{Desired, Kind, Resource, ResourceId};

use crate::state::InventoryEntry;

/// What happens to one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// `+ create`
    Create,
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
}

/// The name of a safety snapshot for `action` taken now: `pre-delete-20261126T150000Z`.
pub fn safety_snapshot_name(action: Action) -> String {
    let now = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
    let verb = match action {
        Action::Replace => "replace",
        _ => "delete",
    };
    format!("pre-{verb}-{now}")
}

/// An error that stops the plan from being applied.
#[derive(Debug, Clone, Serialize)]
pub struct PlanError {
    /// The resource.
    pub id: ResourceId,
    /// What is wrong.
    pub message: String,
}

/// Options that change the plan.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlanOptions {
    /// Do not delete owned resources missing from the manifests.
    pub no_prune: bool,
    /// Allow `data-loss` changes that are not opted in by `deletionPolicy: Delete`.
    pub allow_data_loss: bool,
}

/// The plan, computed once and executed as shown.
#[derive(Debug, Clone, Serialize, Default)]
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

/// Computes the plan.
///
/// - `observed` holds an entry for every desired and inventory id (absent ones too);
/// - `pending` are ids with open journal entries from an interrupted run: objects found
///   for them are stead's own even if their mark was not yet written.
pub fn plan(
    desired: &Desired,
    observed: &BTreeMap<ResourceId, Observed>,
    inventory: &BTreeMap<ResourceId, InventoryEntry>,
    pending: &BTreeSet<ResourceId>,
    drivers: &BTreeMap<Kind, Box<dyn Driver>>,
    opts: PlanOptions,
) -> Plan {
    let world = World {
        desired,
        applied: inventory,
    };
    let mut plan = Plan::default();
    let absent = Observed::absent();

    // Creates / updates in dependency waves.
    let desired_edges = edges(desired.resources.values());
    let graph = DepGraph::new(desired.resources.keys().cloned(), &desired_edges);
    for wave in graph.waves() {
        for id in wave {
            let Some(r) = desired.get(&id) else { continue };
            let Some(driver) = drivers.get(&id.kind) else {
                plan.errors.push(PlanError {
                    id: id.clone(),
                    message: format!("no driver for kind {}", id.kind),
                });
                continue;
            };
            let obs = observed.get(&id).unwrap_or(&absent);
            match plan_one(
                r,
                obs,
                inventory.get(&id),
                pending.contains(&id),
                driver.as_ref(),
                &world,
                opts,
            ) {
                Ok(c) => plan.changes.push(c),
                Err(msg) => plan.errors.push(PlanError {
                    id: id.clone(),
                    message: msg,
                }),
            }
        }
    }

    // Prune: owned and no longer desired, in reverse dependency order.
    let gone: Vec<&InventoryEntry> = inventory
        .iter()
        .filter(|(id, _)| desired.get(id).is_none())
        .map(|(_, e)| e)
        .collect();
    if !gone.is_empty() {
        let gone_edges = edges(gone.iter().map(|e| &e.resource));
        let g = DepGraph::new(gone.iter().map(|e| e.resource.id.clone()), &gone_edges);
        let mut waves = g.waves();
        waves.reverse();
        for id in waves.into_iter().flatten() {
            let Some(entry) = inventory.get(&id) else {
                continue;
            };
            let Some(driver) = drivers.get(&id.kind) else {
                plan.errors.push(PlanError {
                    id: id.clone(),
                    message: format!("no driver for kind {}", id.kind),
                });
                continue;
            };
            if opts.no_prune {
                continue;
            }
            // A desired resource that still references this one blocks the delete.
            if let Some(user) = desired_edges.iter().find(|e| e.to == id) {
                plan.errors.push(PlanError {
                    id: id.clone(),
                    message: format!("cannot delete: {} still references it", user.from),
                });
                continue;
            }
            let obs = observed.get(&id).unwrap_or(&absent);
            let unrecorded = !entry.recorded;
            if unrecorded && obs.exists && !obs.owned {
                // An interrupted step's intent, but the object found does not carry
                // stead's mark: it may be someone else's. Never touched.
                continue;
            }
            let change = match driver.prune_action(&entry.resource) {
                PruneAction::Retain => Change {
                    id: id.clone(),
                    action: Action::Retain,
                    impact: None,
                    fields: Vec::new(),
                    drift: false,
                    note: Some(
                        "deletionPolicy: Retain: data kept on the host, no longer managed".into(),
                    ),
                    safety_snapshot: None,
                },
                PruneAction::Delete => {
                    let impact = driver.delete_impact(&entry.resource);
                    // `deletionPolicy: Delete` in the last-applied spec is the opt-in.
                    let opted_in = entry.resource.spec_json().get("deletionPolicy")
                        == Some(&Value::from("Delete"));
                    if impact == Impact::DataLoss && !opted_in && !opts.allow_data_loss {
                        plan.errors.push(PlanError {
                            id: id.clone(),
                            message: "deleting it destroys data: re-run with --allow-data-loss to confirm".into(),
                        });
                        continue;
                    }
                    let safety_snapshot = (impact == Impact::DataLoss
                        && obs.exists
                        && driver.supports_safety_snapshot(&entry.resource, &world))
                    .then(|| safety_snapshot_name(Action::Delete));
                    Change {
                        id: id.clone(),
                        action: Action::Delete,
                        impact: Some(impact),
                        fields: Vec::new(),
                        drift: false,
                        safety_snapshot,
                        note: if !obs.exists {
                            Some("already absent from the host; forgetting it".into())
                        } else if unrecorded {
                            Some(
                                "made by an interrupted apply that the state never recorded".into(),
                            )
                        } else if opted_in && impact == Impact::DataLoss {
                            Some("deletionPolicy: Delete".into())
                        } else {
                            None
                        },
                    }
                }
            };
            plan.changes.push(change);
        }
    }
    plan
}

fn plan_one(
    r: &Resource,
    obs: &Observed,
    inv: Option<&InventoryEntry>,
    pending: bool,
    driver: &dyn Driver,
    world: &World<'_>,
    opts: PlanOptions,
) -> Result<Change, String> {
    let mut change = Change {
        id: r.id.clone(),
        action: Action::Noop,
        impact: None,
        fields: Vec::new(),
        drift: false,
        note: pending.then(|| "recovering an interrupted apply".to_string()),
        safety_snapshot: None,
    };
    let want = driver.desired_state(r, world);
    if !obs.exists {
        change.action = Action::Create;
        let mut leaves = Vec::new();
        diff_values("", None, Some(&want), &mut leaves);
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
        // A create is checked like an update: its refusal is a plan error, not an apply one.
        driver.check(r, obs, &change.fields)?;
        return Ok(change);
    }
    if !obs.owned && inv.is_none() && !pending {
        return Err(format!(
            "an object named {:?} already exists on the host and is not owned by stead; stead will not adopt or change it (rename the resource or remove the object)",
            r.id.name
        ));
    }
    let mut leaves = Vec::new();
    diff_values("", Some(&obs.state), Some(&want), &mut leaves);
    let mut fields: Vec<FieldChange> = leaves
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
        .collect();
    // Fields the host cannot show: compare the spec with the last-applied spec.
    if let Some(inv) = inv {
        let spec_now = serde_json::to_value(&r.spec).unwrap_or(Value::Null);
        let spec_then = serde_json::to_value(&inv.resource.spec).unwrap_or(Value::Null);
        let mut spec_leaves = Vec::new();
        diff_values("", Some(&spec_then), Some(&spec_now), &mut spec_leaves);
        for (path, old, new) in spec_leaves {
            if want.pointer(&path).is_none()
                && !fields.iter().any(|f| path.starts_with(&f.path))
                && !is_observable_prefix(&want, &path)
            {
                fields.push(FieldChange {
                    path,
                    old,
                    new,
                    impact: Impact::Hot,
                });
            }
        }
        if inv.resource.metadata.labels != r.metadata.labels {
            fields.push(FieldChange {
                path: "/metadata/labels".into(),
                old: serde_json::to_value(&inv.resource.metadata.labels).ok(),
                new: serde_json::to_value(&r.metadata.labels).ok(),
                impact: Impact::Hot,
            });
        }
    }
    if fields.is_empty() {
        return Ok(change);
    }
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
            change.safety_snapshot = Some(safety_snapshot_name(Action::Replace));
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
