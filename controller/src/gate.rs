//! The gate of a reconcile: which planned changes run now and which wait (plan errors,
//! transient failures in backoff, terminal failures held until the manifest or the host
//! changes, and everything that depends on them), and what a run's report does to the
//! backoff. Pure, except for the metrics counters it moves.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use stead_reconciler::driver::Observed;
use stead_reconciler::exec::{Outcome, Report};
use stead_reconciler::plan::{Action, Change, Plan, PlanError};
use stead_reconciler::{InventoryEntry, PlannedRun};
use stead_schema::graph::edges;
use stead_schema::{Desired, ResourceId};
use tracing::warn;

use crate::DriftMode;
use crate::backoff::{self, Backoff, Hold, Wait};
use crate::metrics::Metrics;

/// Resources left out of a run, with the condition (reason, message) they get.
pub(crate) type Blocked = BTreeMap<ResourceId, (String, String)>;

/// What a terminal hold of `id` is checked against: its spec hash (desired, or last
/// applied for a delete) and a fingerprint of what observe saw of it and of the resources
/// it references (existence, ownership and state; not runtime status, which moves on its
/// own). A fix on the host — of the object or of what it depends on — releases the hold.
pub(crate) fn hold_key(
    id: &ResourceId,
    desired: &Desired,
    inventory: &BTreeMap<ResourceId, InventoryEntry>,
    observed: &BTreeMap<ResourceId, Observed>,
) -> Hold {
    use std::hash::{Hash, Hasher};
    let resource = desired
        .get(id)
        .or_else(|| inventory.get(id).map(|e| &e.resource));
    let spec_hash = resource.map(|r| r.spec_hash()).unwrap_or_default();
    let mut h = std::hash::DefaultHasher::new();
    let deps = resource.map(|r| r.spec.references()).unwrap_or_default();
    for seen in std::iter::once(id).chain(deps.iter().map(|(to, _)| to)) {
        if let Some(o) = observed.get(seen) {
            (seen, o.exists, o.owned, o.state.to_string()).hash(&mut h);
        }
    }
    Hold {
        spec_hash,
        observed: h.finish(),
    }
}

/// The status condition (reason, message) of a change that waits.
pub(crate) fn waiting_condition(wait: &Wait, b: &backoff::Entry) -> (String, String) {
    match wait {
        Wait::Held => (
            b.reason.clone(),
            format!(
                "not retried until the manifest or the host changes: {}",
                b.message
            ),
        ),
        Wait::Backoff(d) => (
            "Backoff".into(),
            format!(
                "retrying in {}s after {} failure(s): {}",
                d.as_secs().max(1),
                b.failures,
                b.message
            ),
        ),
    }
}

/// What drifted on the host, by resource: missing, or the fields that changed.
pub(crate) fn drift_of(plan: &Plan) -> BTreeMap<ResourceId, String> {
    plan.changes
        .iter()
        .filter(|c| c.drift)
        .map(|c| {
            let what = if c.action == Action::Create {
                "missing from the host".to_string()
            } else {
                let paths: Vec<&str> = c.fields.iter().map(|f| f.path.as_str()).collect();
                format!("changed on the host: {}", paths.join(", "))
            };
            (c.id.clone(), what)
        })
        .collect()
}

/// The resources still drifted after a run: all of `drift` when only reporting, else
/// those the run did not apply.
pub(crate) fn still_drifted(
    mode: DriftMode,
    drift: &BTreeMap<ResourceId, String>,
    applied: &BTreeMap<ResourceId, Action>,
) -> BTreeSet<ResourceId> {
    drift
        .keys()
        .filter(|id| mode == DriftMode::Report || !applied.contains_key(*id))
        .cloned()
        .collect()
}

/// What the gate reads of a planned run: the plan's errors and changes, and the
/// inventory and observation the plan was computed from.
pub(crate) struct PlanView<'a> {
    pub(crate) errors: &'a [PlanError],
    pub(crate) changes: &'a [Change],
    pub(crate) inventory: &'a BTreeMap<ResourceId, InventoryEntry>,
    pub(crate) observed: &'a BTreeMap<ResourceId, Observed>,
}

impl<'a> From<&'a PlannedRun> for PlanView<'a> {
    fn from(run: &'a PlannedRun) -> Self {
        PlanView {
            errors: &run.plan.errors,
            changes: &run.plan.changes,
            inventory: &run.inventory,
            observed: &run.observed,
        }
    }
}

/// The resources with plan errors and the changes that must wait at `now` (a backoff
/// delay or a terminal hold; a hold whose spec or observation changed is released).
/// A change with nothing to do never waits, nor does a drift repair when `skip_drift`
/// (drift is only reported: the run leaves it out anyway).
pub(crate) fn waiting(
    run: PlanView<'_>,
    skip_drift: bool,
    desired: &Desired,
    backoff: &mut Backoff,
    now: Instant,
) -> Blocked {
    let mut blocked = Blocked::new();
    for e in run.errors {
        blocked.insert(e.id.clone(), ("PlanError".into(), e.message.clone()));
    }
    for c in run.changes {
        if c.action == Action::Noop || (skip_drift && c.drift) {
            continue;
        }
        let current = hold_key(&c.id, desired, run.inventory, run.observed);
        if let Some((wait, b)) = backoff.waiting(&c.id, now, &current) {
            blocked
                .entry(c.id.clone())
                .or_insert_with(|| waiting_condition(&wait, b));
        }
    }
    blocked
}

/// Adds everything that depends, directly or not, on a blocked resource: it waits for
/// its dependency (`DependencyNotReady`).
pub(crate) fn block_dependents(blocked: &mut Blocked, desired: &Desired) {
    let es = edges(desired.resources.values());
    loop {
        let mut grew = false;
        for e in &es {
            if blocked.contains_key(&e.to) && !blocked.contains_key(&e.from) {
                blocked.insert(
                    e.from.clone(),
                    ("DependencyNotReady".into(), format!("waiting for {}", e.to)),
                );
                grew = true;
            }
        }
        if !grew {
            break;
        }
    }
}

/// What a run's report says of each resource.
#[derive(Debug, Default)]
pub(crate) struct RunResults {
    /// Failed changes: (reason, message).
    pub(crate) failed: Blocked,
    /// Applied changes (not noops).
    pub(crate) applied: BTreeMap<ResourceId, Action>,
}

/// Records `report` in `backoff` and the metrics: a terminal failure is held (against
/// `hold`), a transient one backs off, a success clears; a change skipped for its
/// dependency joins `blocked`.
pub(crate) fn record_results(
    report: &Report,
    backoff: &mut Backoff,
    blocked: &mut Blocked,
    m: &Metrics,
    hold: impl Fn(&ResourceId) -> Hold,
) -> RunResults {
    let mut out = RunResults::default();
    for r in &report.results {
        match &r.outcome {
            Outcome::Skipped(msg) => {
                // Not tried: it waits for its dependency, which carries the backoff.
                m.apply_failures
                    .with_label_values(&[r.id.kind.as_str()])
                    .inc();
                blocked.insert(r.id.clone(), ("DependencyNotReady".into(), msg.clone()));
            }
            Outcome::Failed(msg) => {
                m.apply_failures
                    .with_label_values(&[r.id.kind.as_str()])
                    .inc();
                let (reason, terminal) = r
                    .error
                    .as_ref()
                    .map_or(("Failed", false), |e| (e.reason, e.terminal));
                if terminal {
                    backoff.failed_terminal(&r.id, reason, msg, hold(&r.id));
                    warn!(resource = %r.id, error = %msg, reason, "change failed; not retried until the manifest or the host changes");
                    out.failed
                        .insert(r.id.clone(), (reason.to_string(), msg.clone()));
                } else {
                    let delay = backoff.failed(&r.id, reason, msg, Instant::now());
                    warn!(resource = %r.id, error = %msg, reason, retry_in = ?delay, "change failed");
                    out.failed
                        .insert(r.id.clone(), ("ApplyFailed".into(), msg.clone()));
                }
            }
            _ => {
                backoff.succeeded(&r.id);
                if r.action != Action::Noop {
                    m.apply_changes
                        .with_label_values(&[r.id.kind.as_str(), action_label(r.action)])
                        .inc();
                    out.applied.insert(r.id.clone(), r.action);
                }
            }
        }
    }
    out
}

/// The `action` label of `stead_apply_changes_total`.
fn action_label(a: Action) -> &'static str {
    match a {
        Action::Create => "create",
        Action::Adopt => "adopt",
        Action::Update => "update",
        Action::Replace => "replace",
        Action::Delete => "delete",
        Action::Retain => "retain",
        Action::Noop => "noop",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;
    use stead_reconciler::exec::{StepError, StepResult};
    use stead_schema::Kind;

    fn desired(size: &str) -> Desired {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.yaml");
        std::fs::write(
            &p,
            format!(
                "apiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: p}}\nspec: {{type: dir, path: /p}}\n---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: v}}\nspec: {{pool: p, size: {size}}}\n---\napiVersion: stead.dev/v1alpha1\nkind: Network\nmetadata: {{name: n}}\nspec: {{}}\n"
            ),
        )
        .unwrap();
        stead_schema::load_and_validate(&[p]).unwrap()
    }

    fn seen(state: serde_json::Value) -> Observed {
        Observed {
            exists: true,
            owned: true,
            state,
            ..Observed::absent()
        }
    }

    fn ids() -> (ResourceId, ResourceId, ResourceId) {
        (
            ResourceId::new(Kind::StoragePool, "p"),
            ResourceId::new(Kind::Volume, "v"),
            ResourceId::new(Kind::Network, "n"),
        )
    }

    fn step(id: &ResourceId, action: Action, outcome: Outcome) -> StepResult {
        StepResult {
            id: id.clone(),
            action,
            outcome,
            error: None,
            seconds: 0.0,
        }
    }

    fn failed(id: &ResourceId, reason: &'static str, terminal: bool) -> StepResult {
        StepResult {
            error: Some(StepError {
                reason,
                terminal,
                message: "boom".into(),
            }),
            ..step(id, Action::Create, Outcome::Failed("boom".into()))
        }
    }

    fn backoff() -> Backoff {
        Backoff::new(Duration::from_secs(2), Duration::from_secs(300))
    }

    fn no_hold(_: &ResourceId) -> Hold {
        Hold {
            spec_hash: String::new(),
            observed: 0,
        }
    }

    #[test]
    fn terminal_hold_key_follows_spec_the_object_and_its_dependencies() {
        let (pool, v, net) = ids();
        let inv = BTreeMap::new();
        let d = desired("1Mi");
        let mut obs = BTreeMap::from([
            (v.clone(), Observed::absent()),
            (pool.clone(), seen(json!({"path": "/p"}))),
            (net.clone(), seen(json!({"mtu": 1500}))),
        ]);
        let k0 = hold_key(&v, &d, &inv, &obs);
        // Runtime status and unrelated resources do not release the hold.
        obs.get_mut(&pool).unwrap().status = json!({"free": 1});
        obs.insert(net.clone(), seen(json!({"mtu": 9000})));
        assert_eq!(hold_key(&v, &d, &inv, &obs), k0);
        // The manifest changed.
        assert_ne!(
            hold_key(&v, &desired("2Mi"), &inv, &obs).spec_hash,
            k0.spec_hash
        );
        // The pool it uses changed on the host.
        obs.insert(pool.clone(), seen(json!({"path": "/q"})));
        assert_ne!(hold_key(&v, &d, &inv, &obs).observed, k0.observed);
        // The volume itself appeared.
        obs.insert(pool, seen(json!({"path": "/p"})));
        obs.insert(v.clone(), seen(json!({})));
        assert_ne!(hold_key(&v, &d, &inv, &obs).observed, k0.observed);
    }

    #[test]
    fn a_blocked_pool_blocks_its_volume_but_not_an_unrelated_network() {
        let (pool, v, net) = ids();
        let mut blocked = Blocked::from([(pool.clone(), ("PlanError".into(), "bad".into()))]);
        block_dependents(&mut blocked, &desired("1Mi"));
        assert_eq!(
            blocked.get(&v),
            Some(&(
                "DependencyNotReady".to_string(),
                format!("waiting for {pool}")
            ))
        );
        assert!(!blocked.contains_key(&net));
    }

    #[test]
    fn a_transient_failure_backs_off_and_a_terminal_one_is_held() {
        let (pool, v, net) = ids();
        let m = Metrics::new().expect("metrics");
        let mut b = backoff();
        let mut blocked = Blocked::new();
        let report = Report {
            results: vec![
                failed(&pool, "Busy", false),
                failed(&net, "InvalidSpec", true),
                step(&v, Action::Create, Outcome::Skipped("waiting for p".into())),
            ],
        };
        let res = record_results(&report, &mut b, &mut blocked, &m, no_hold);
        assert_eq!(res.failed[&pool].0, "ApplyFailed");
        assert_eq!(res.failed[&net].0, "InvalidSpec");
        assert_eq!(blocked[&v].0, "DependencyNotReady");
        assert!(res.applied.is_empty());
        let now = Instant::now();
        assert!(matches!(
            b.waiting(&pool, now, &no_hold(&pool)),
            Some((Wait::Backoff(_), _))
        ));
        assert!(matches!(
            b.waiting(&net, now + Duration::from_secs(3600), &no_hold(&net)),
            Some((Wait::Held, _))
        ));
        // The terminal hold is released by a different key (a fix); the backoff by time.
        let fixed = Hold {
            spec_hash: "new".into(),
            observed: 0,
        };
        assert!(b.waiting(&net, now, &fixed).is_none());
        assert!(
            b.waiting(&pool, now + Duration::from_secs(3600), &no_hold(&pool))
                .is_none()
        );
        assert_eq!(
            m.apply_failures.with_label_values(&["StoragePool"]).get(),
            1
        );
    }

    #[test]
    fn a_success_clears_the_backoff_and_counts_as_applied() {
        let (pool, _, net) = ids();
        let m = Metrics::new().expect("metrics");
        let mut b = backoff();
        b.failed(&pool, "Busy", "boom", Instant::now());
        let report = Report {
            results: vec![
                step(&pool, Action::Create, Outcome::Created),
                step(&net, Action::Noop, Outcome::Unchanged),
            ],
        };
        let res = record_results(&report, &mut b, &mut Blocked::new(), &m, no_hold);
        assert!(b.get(&pool).is_none());
        assert_eq!(res.applied.get(&pool), Some(&Action::Create));
        assert!(!res.applied.contains_key(&net), "noops are not applied");
        assert_eq!(
            m.apply_changes
                .with_label_values(&["StoragePool", "create"])
                .get(),
            1
        );
    }

    #[test]
    fn a_drift_repair_only_reported_never_waits() {
        let (pool, _, _) = ids();
        let d = desired("1Mi");
        let mut b = backoff();
        let now = Instant::now();
        let changes = vec![Change {
            id: pool.clone(),
            action: Action::Create,
            impact: None,
            fields: vec![],
            drift: true,
            note: None,
            safety_snapshot: None,
            stop_timeout_secs: None,
        }];
        let (inventory, observed) = (BTreeMap::new(), BTreeMap::new());
        let run = || PlanView {
            errors: &[],
            changes: &changes,
            inventory: &inventory,
            observed: &observed,
        };
        b.failed(&pool, "Busy", "boom", now);
        assert_eq!(waiting(run(), false, &d, &mut b, now)[&pool].0, "Backoff");
        assert!(waiting(run(), true, &d, &mut b, now).is_empty());
    }

    #[test]
    fn waiting_changes_and_plan_errors_are_blocked_with_their_condition() {
        let (pool, v, net) = ids();
        let d = desired("1Mi");
        let mut b = backoff();
        let now = Instant::now();
        let errors = vec![PlanError {
            id: net.clone(),
            message: "no such bridge".into(),
        }];
        let changes: Vec<Change> = [&pool, &v]
            .into_iter()
            .map(|id| Change {
                id: id.clone(),
                action: Action::Create,
                impact: None,
                fields: vec![],
                drift: false,
                note: None,
                safety_snapshot: None,
                stop_timeout_secs: None,
            })
            .collect();
        let (inventory, observed) = (BTreeMap::new(), BTreeMap::new());
        let run = || PlanView {
            errors: &errors,
            changes: &changes,
            inventory: &inventory,
            observed: &observed,
        };
        b.failed(&pool, "Busy", "boom", now);
        let blocked = waiting(run(), false, &d, &mut b, now);
        assert_eq!(blocked[&net], ("PlanError".into(), "no such bridge".into()));
        assert_eq!(blocked[&pool].0, "Backoff");
        assert!(blocked[&pool].1.contains("after 1 failure(s): boom"));
        assert!(!blocked.contains_key(&v), "dependents are added separately");
        // A terminal hold on the same key waits; on a changed spec it is released.
        let key = hold_key(&v, &d, &inventory, &observed);
        b.failed_terminal(&v, "InvalidSpec", "bad size", key);
        let blocked = waiting(run(), false, &d, &mut b, now);
        assert!(blocked[&v].1.starts_with("not retried until"));
        let blocked = waiting(run(), false, &desired("2Mi"), &mut b, now);
        assert!(!blocked.contains_key(&v));
    }

    #[test]
    fn drift_is_still_reported_until_healed() {
        let (pool, v, _) = ids();
        let drift = BTreeMap::from([
            (pool.clone(), "missing from the host".to_string()),
            (v.clone(), "changed on the host: size".to_string()),
        ]);
        let applied = BTreeMap::from([(pool.clone(), Action::Create)]);
        assert_eq!(
            still_drifted(DriftMode::Heal, &drift, &applied),
            BTreeSet::from([v.clone()])
        );
        assert_eq!(
            still_drifted(DriftMode::Report, &drift, &applied),
            BTreeSet::from([pool, v])
        );
    }
}
