//! stead's reconciler: observe the host, plan against the desired set, execute the plan,
//! and keep the inventory, journal and events in the state database.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod driver;
pub mod exec;
mod host_errors;
pub mod plan;
pub mod render;
pub mod state;
#[cfg(test)]
mod testkit;

use std::collections::{BTreeMap, BTreeSet};

use crate::driver::{Driver, Observed};
use stead_schema::{Desired, Kind, Resource, ResourceId};
use tracing::info_span;

pub use exec::{ExecOptions, Outcome, Report, StepResult, execute};
pub use plan::{Action, Change, Plan, PlanError, PlanInput, PlanOptions, World, plan};
pub use state::{ApplyLock, InventoryEntry, StateDb, StateError};

/// The registered drivers, one per kind.
pub type Drivers = BTreeMap<Kind, Box<dyn Driver>>;

/// One kind's observation: the kind, the ids asked for, and the result.
type KindObservation = (
    Kind,
    Vec<ResourceId>,
    Result<BTreeMap<ResourceId, Observed>, String>,
);

/// Observes every desired and inventory resource, one `observe` call per kind, kinds in
/// parallel. A kind whose observe fails yields a plan error for each of its resources.
pub fn observe_all(
    drivers: &Drivers,
    desired: &Desired,
    inventory: &BTreeMap<ResourceId, InventoryEntry>,
) -> (BTreeMap<ResourceId, Observed>, Vec<PlanError>) {
    observe_where(drivers, desired, inventory, &|_| true)
}

/// [`observe_all`] restricted to the resources `wanted` selects: all of `desired` and
/// `inventory` stay the world drivers resolve references in (a volume needs its pool),
/// but only the selected ones are observed.
pub fn observe_where(
    drivers: &Drivers,
    desired: &Desired,
    inventory: &BTreeMap<ResourceId, InventoryEntry>,
    wanted: &dyn Fn(&ResourceId) -> bool,
) -> (BTreeMap<ResourceId, Observed>, Vec<PlanError>) {
    let world = World {
        desired,
        applied: inventory,
    };
    let mut by_kind: BTreeMap<Kind, Vec<&Resource>> = BTreeMap::new();
    let on_host = |r: &&Resource| r.id.kind.is_host_object() && wanted(&r.id);
    for r in desired.resources.values().filter(on_host) {
        by_kind.entry(r.id.kind).or_default().push(r);
    }
    for (id, e) in inventory {
        if desired.get(id).is_none() && wanted(id) {
            by_kind.entry(id.kind).or_default().push(&e.resource);
        }
    }
    let results: Vec<KindObservation> = std::thread::scope(|s| {
        let handles: Vec<_> = by_kind
            .iter()
            .map(|(kind, targets)| {
                let world = &world;
                s.spawn(move || {
                    let _span = info_span!("observe", kind = %kind).entered();
                    let ids: Vec<ResourceId> = targets.iter().map(|r| r.id.clone()).collect();
                    let res = match drivers.get(kind) {
                        Some(d) => observe_guarded(d.as_ref(), targets, world),
                        None => Err(format!("no driver for kind {kind} on this build")),
                    };
                    (*kind, ids, res)
                })
            })
            .collect();
        handles
            .into_iter()
            .zip(by_kind.iter())
            .map(|(h, (kind, targets))| {
                h.join().unwrap_or_else(|_| {
                    let ids = targets.iter().map(|r| r.id.clone()).collect();
                    (*kind, ids, Err("observe thread died".into()))
                })
            })
            .collect()
    });
    let mut observed = BTreeMap::new();
    let mut errors = Vec::new();
    for (kind, ids, res) in results {
        match res {
            Ok(map) => observed.extend(map),
            Err(msg) => {
                for id in ids {
                    errors.push(PlanError {
                        id,
                        message: format!("cannot observe {kind}: {msg}"),
                    });
                }
            }
        }
    }
    (observed, errors)
}

/// Adds to `inventory` the resources of open journal entries that neither the inventory
/// nor `desired` knows: a step that changed the host but never recorded it (a crash, a
/// full state disk). They are observed and planned like owned resources that left the
/// manifests, so what such a step made is pruned instead of leaking.
fn add_unrecorded(
    inventory: &mut BTreeMap<ResourceId, InventoryEntry>,
    journaled: BTreeMap<ResourceId, Resource>,
    adopted: &BTreeSet<ResourceId>,
    desired: &Desired,
) {
    for (id, resource) in journaled {
        if inventory.contains_key(&id) || desired.get(&id).is_some() {
            continue;
        }
        let adopted = adopted.contains(&id);
        inventory.insert(
            id,
            InventoryEntry {
                spec_hash: resource.spec_hash(),
                resource,
                applied_at: 0.0,
                recorded: false,
                adopted,
            },
        );
    }
}

/// Objects on the host carrying stead's mark for a kind in use that neither `inventory`
/// nor `desired` knows: reported, never touched (they may belong to another state dir).
fn unknown_marked(
    drivers: &Drivers,
    desired: &Desired,
    inventory: &BTreeMap<ResourceId, InventoryEntry>,
) -> Vec<PlanError> {
    let kinds: BTreeSet<Kind> = desired
        .resources
        .keys()
        .chain(inventory.keys())
        .map(|id| id.kind)
        .collect();
    let mut out = Vec::new();
    for kind in kinds {
        let Some(driver) = drivers.get(&kind) else {
            continue;
        };
        let names = match driver.marked_on_host() {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(%kind, error = %exec::error_chain(&e), "cannot list marked objects");
                continue;
            }
        };
        for name in names {
            let id = ResourceId::new(kind, name);
            if desired.get(&id).is_none() && !inventory.contains_key(&id) {
                out.push(PlanError {
                    id,
                    message: "carries stead's ownership mark but neither the state nor the manifests know it (a lost record, or another state dir's); left alone: declare it to adopt it, or remove it by hand".into(),
                });
            }
        }
    }
    out
}

/// Calls `driver.observe`, turning an error or a panic into a message. A panicking
/// observe must not read as "absent" (which would plan a create or report drift): its
/// resources get an observe error and the plan leaves them alone.
fn observe_guarded(
    driver: &dyn Driver,
    targets: &[&Resource],
    world: &World<'_>,
) -> Result<BTreeMap<ResourceId, Observed>, String> {
    let call = std::panic::AssertUnwindSafe(|| {
        panic_if_test_hook_asks(driver.kind());
        driver.observe(targets, world)
    });
    match std::panic::catch_unwind(call) {
        Ok(res) => res.map_err(|e| exec::error_chain(&e)),
        Err(payload) => Err(format!("observe panicked: {}", panic_message(&*payload))),
    }
}

/// Test hook `STEAD_TEST_PANIC_OBSERVE=KIND`: the observe of that kind panics, so a
/// black-box test can check what a driver bug does to a plan.
fn panic_if_test_hook_asks(kind: Kind) {
    if std::env::var("STEAD_TEST_PANIC_OBSERVE").is_ok_and(|k| k == kind.as_str()) {
        panic!("test hook: observe of {kind} panics (STEAD_TEST_PANIC_OBSERVE)");
    }
}

/// The message of a panic payload (`&str` or `String`), or a placeholder.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Everything a run needs: the plan and the inputs it was computed from.
pub struct PlannedRun {
    /// The plan, as [`plan::plan`] returned it.
    pub plan: Plan,
    /// Observed state it was computed from.
    pub observed: BTreeMap<ResourceId, Observed>,
    /// The inventory it was computed from.
    pub inventory: BTreeMap<ResourceId, InventoryEntry>,
    /// Ids with open journal entries.
    pending: BTreeSet<ResourceId>,
    /// Resources whose observation failed.
    observe_errors: Vec<PlanError>,
    /// Marked objects nobody knows.
    warnings: Vec<PlanError>,
    /// The options the plan was computed with.
    opts: PlanOptions,
}

impl PlannedRun {
    /// The options the plan was computed with.
    pub fn options(&self) -> &PlanOptions {
        &self.opts
    }

    /// Plans again from the same observation, with the options `adjust` changes (the
    /// controller leaves out drift repairs and held resources once it has seen the
    /// first plan). The new plan replaces the old one whole.
    pub fn replan(
        &mut self,
        drivers: &Drivers,
        desired: &Desired,
        adjust: impl FnOnce(&mut PlanOptions),
    ) {
        adjust(&mut self.opts);
        self.plan = self.compute(drivers, desired);
    }

    fn compute(&self, drivers: &Drivers, desired: &Desired) -> Plan {
        let input = plan::PlanInput {
            desired,
            observed: &self.observed,
            inventory: &self.inventory,
            pending: &self.pending,
            observe_errors: &self.observe_errors,
            warnings: &self.warnings,
        };
        plan::plan(&input, drivers, &self.opts)
    }
}

/// Observes and plans `desired` against the host and `db`.
pub fn plan_run(
    drivers: &Drivers,
    desired: &Desired,
    db: &StateDb,
    opts: PlanOptions,
) -> Result<PlannedRun, StateError> {
    let mut inventory = db.inventory()?;
    let pending: BTreeSet<ResourceId> = state::pending_ids(db)?;
    let adopted = db.adopted()?;
    add_unrecorded(
        &mut inventory,
        db.journal_open_resources()?,
        &adopted,
        desired,
    );
    let (observed, observe_errors) = observe_all(drivers, desired, &inventory);
    let warnings = unknown_marked(drivers, desired, &inventory);
    let input = plan::PlanInput {
        desired,
        observed: &observed,
        inventory: &inventory,
        pending: &pending,
        observe_errors: &observe_errors,
        warnings: &warnings,
    };
    let plan = plan::plan(&input, drivers, &opts);
    let run = PlannedRun {
        plan,
        observed,
        inventory,
        pending,
        observe_errors,
        warnings,
        opts,
    };
    Ok(run)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::testkit::*;

    #[test]
    fn a_single_host_skips_cluster_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path()).unwrap();
        let d = desired(&(net("lan0", 1500) + &doc("HaGroup", "prod", "{nodes: {pve1: 2}}")));
        let script = Arc::new(Script::default());
        let drivers = drivers(&script);
        assert!(!drivers.contains_key(&Kind::HaGroup));

        let run = plan_run(&drivers, &d, &db, PlanOptions::default()).unwrap();
        assert!(run.plan.errors.is_empty(), "{:?}", run.plan.errors);
        assert!(run.observe_errors.is_empty(), "{:?}", run.observe_errors);
        let ids: Vec<String> = run.plan.changes.iter().map(|c| c.id.to_string()).collect();
        assert_eq!(ids, ["Network/lan0"], "the HaGroup is no host object");
    }

    #[test]
    fn replan_plans_the_same_observation_with_new_options() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path()).unwrap();
        let d = desired(&(net("lan0", 1500) + &net("lan1", 1500)));
        // lan0 was applied before; the fake host shows nothing, so it drifted away.
        db.upsert(&d.resources[&id(Kind::Network, "lan0")]).unwrap();
        let drivers = drivers(&Arc::new(Script::default()));

        let mut run = plan_run(&drivers, &d, &db, PlanOptions::default()).unwrap();
        let ids = |run: &PlannedRun| -> Vec<String> {
            run.plan.changes.iter().map(|c| c.id.to_string()).collect()
        };
        assert_eq!(ids(&run), ["Network/lan0", "Network/lan1"]);
        assert!(run.plan.changes[0].drift);
        let now = run.options().now;

        run.replan(&drivers, &d, |o| o.skip_drift = true);
        assert_eq!(ids(&run), ["Network/lan1"]);
        run.replan(&drivers, &d, |o| {
            o.exclude.insert(id(Kind::Network, "lan1"), "held".into());
        });
        assert!(run.plan.changes.is_empty(), "{:?}", run.plan);
        assert!(run.options().skip_drift, "options accumulate");
        assert_eq!(run.options().now, now, "the time of the first plan is kept");
        assert_eq!(run.inventory.len(), 1);
    }
}
