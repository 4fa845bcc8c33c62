//! Planner and executor tests with an in-memory fake driver (pure logic only: the
//! real drivers have their own sandboxed tests).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use serde_json::{Value, json};
use stead_reconciler::driver::{
    Driver, DriverError, FieldChange, Health, Impact, Lookup, Observed, PruneAction,
};
use stead_reconciler::{
    Action, Drivers, ExecOptions, Outcome, PlanOptions, PlannedRun, StateDb, execute, plan_run,
};
use stead_schema::{Desired, Kind, Resource, ResourceId, Spec};

/// A host that lives in a shared map: id -> (state, owned).
#[derive(Default)]
struct FakeHost {
    objects: Mutex<BTreeMap<ResourceId, (Value, bool)>>,
    fail: Mutex<BTreeSet<String>>,
    /// Names whose apply is refused (a terminal error).
    refuse: Mutex<BTreeSet<String>>,
    /// Names whose `check` refuses (any change, creates included).
    refuse_check: Mutex<BTreeSet<String>>,
    /// Kinds whose observe panics.
    panic_observe: Mutex<BTreeSet<Kind>>,
    log: Mutex<Vec<String>>,
}

impl FakeHost {
    /// What the drivers did, in order.
    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Appends to the log.
    fn record(&self, what: String) {
        self.log.lock().unwrap().push(what);
    }

    /// Puts an object on the host, owned (marked) or not.
    fn put(&self, id: ResourceId, state: Value, owned: bool) {
        self.objects.lock().unwrap().insert(id, (state, owned));
    }
}

struct FakeDriver {
    kind: Kind,
    host: std::sync::Arc<FakeHost>,
}

impl Driver for FakeDriver {
    fn kind(&self) -> Kind {
        self.kind
    }
    fn observe(
        &self,
        targets: &[&Resource],
        _w: &dyn Lookup,
    ) -> Result<BTreeMap<ResourceId, Observed>, DriverError> {
        if self.host.panic_observe.lock().unwrap().contains(&self.kind) {
            panic!("fake observe of {} blew up", self.kind);
        }
        let objs = self.host.objects.lock().unwrap();
        Ok(targets
            .iter()
            .map(|r| {
                let o = match objs.get(&r.id) {
                    Some((state, owned)) => Observed {
                        exists: true,
                        owned: *owned,
                        state: state.clone(),
                        status: Value::Null,
                        health: Health::Ready,
                    },
                    None => Observed::absent(),
                };
                (r.id.clone(), o)
            })
            .collect())
    }
    fn desired_state(&self, r: &Resource, _w: &dyn Lookup) -> Value {
        match &r.spec {
            Spec::Volume(v) => json!({"pool": v.pool.as_str(), "size": v.size.to_string()}),
            Spec::StoragePool(p) => json!({"path": p.path}),
            Spec::Network(n) => json!({"mtu": n.mtu}),
            _ => Value::Null,
        }
    }
    fn impact(&self, path: &str) -> Impact {
        match path {
            "/pool" => Impact::DataLoss,
            _ => Impact::Hot,
        }
    }
    fn check(&self, d: &Resource, o: &Observed, changes: &[FieldChange]) -> Result<(), String> {
        if self.host.refuse_check.lock().unwrap().contains(&d.id.name) {
            return Err(format!("check refuses {}", d.id));
        }
        for c in changes {
            if c.path == "/size" {
                let old: stead_schema::ByteSize = o.state["size"]
                    .as_str()
                    .unwrap_or("0")
                    .parse()
                    .map_err(|_| "bad")?;
                let new: stead_schema::ByteSize = c
                    .new
                    .as_ref()
                    .and_then(|v| v.as_str())
                    .unwrap_or("0")
                    .parse()
                    .map_err(|_| "bad")?;
                if new < old {
                    return Err(format!("shrinking from {old} to {new} is refused"));
                }
            }
        }
        Ok(())
    }
    fn apply(&self, r: &Resource, _o: &Observed, w: &dyn Lookup) -> Result<(), DriverError> {
        if self.host.fail.lock().unwrap().contains(&r.id.name) {
            return Err(DriverError::Other("injected failure".into()));
        }
        if self.host.refuse.lock().unwrap().contains(&r.id.name) {
            return Err(DriverError::Refused("injected refusal".into()));
        }
        if r.id.name.starts_with("taken") {
            return Err(DriverError::Conflict(
                "an unowned object is in the way".into(),
            ));
        }
        self.host.record(format!("apply {}", r.id));
        let state = self.desired_state(r, w);
        self.host
            .objects
            .lock()
            .unwrap()
            .insert(r.id.clone(), (state, true));
        Ok(())
    }
    fn marked_on_host(&self) -> Result<Vec<String>, DriverError> {
        Ok(self
            .host
            .objects
            .lock()
            .unwrap()
            .iter()
            .filter(|(id, (_, owned))| id.kind == self.kind && *owned)
            .map(|(id, _)| id.name.clone())
            .collect())
    }
    fn prune_action(&self, r: &Resource) -> PruneAction {
        match &r.spec {
            Spec::Volume(v) if v.deletion_policy == stead_schema::DeletionPolicy::Retain => {
                PruneAction::Retain
            }
            _ => PruneAction::Delete,
        }
    }
    fn delete_impact(&self, r: &Resource) -> Impact {
        if r.id.kind == Kind::Volume {
            Impact::DataLoss
        } else {
            Impact::Recreate
        }
    }
    fn supports_safety_snapshot(&self, r: &Resource, _w: &dyn Lookup) -> bool {
        r.id.kind == Kind::Volume
    }
    fn safety_snapshot(
        &self,
        r: &Resource,
        _w: &dyn Lookup,
        name: &str,
    ) -> Result<(), DriverError> {
        self.host
            .record(format!("snapshot {} {}", r.id, &name[..11]));
        Ok(())
    }
    fn delete(&self, r: &Resource, _o: &Observed, _w: &dyn Lookup) -> Result<(), DriverError> {
        self.host.record(format!("delete {}", r.id));
        self.host.objects.lock().unwrap().remove(&r.id);
        Ok(())
    }
}

fn drivers(host: &std::sync::Arc<FakeHost>) -> Drivers {
    let mut d: Drivers = BTreeMap::new();
    for k in [Kind::StoragePool, Kind::Volume, Kind::Network] {
        d.insert(
            k,
            Box::new(FakeDriver {
                kind: k,
                host: host.clone(),
            }),
        );
    }
    d
}

fn desired(yaml: &str) -> Desired {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.yaml");
    std::fs::write(&p, yaml).unwrap();
    stead_schema::load_and_validate(&[p]).unwrap_or_else(|e| panic!("{e:?}"))
}

fn doc(kind: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: stead.dev/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}}}\nspec: {spec}\n"
    )
}

fn pool() -> String {
    doc("StoragePool", "local", "{type: dir, path: /p}")
}

fn vol(name: &str, size: &str, policy: &str) -> String {
    doc(
        "Volume",
        name,
        &format!("{{pool: local, size: {size}, deletionPolicy: {policy}}}"),
    )
}

struct Env {
    _dir: tempfile::TempDir,
    db: Mutex<StateDb>,
    host: std::sync::Arc<FakeHost>,
    drivers: Drivers,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let db = StateDb::open(dir.path()).unwrap();
    let host = std::sync::Arc::new(FakeHost::default());
    let drivers = drivers(&host);
    Env {
        _dir: dir,
        db: Mutex::new(db),
        host,
        drivers,
    }
}

impl Env {
    /// The planned run of `d` against this host and state.
    fn plan(&self, d: &Desired, opts: PlanOptions) -> PlannedRun {
        plan_run(&self.drivers, d, &self.db.lock().unwrap(), opts).unwrap()
    }

    /// Executes a planned run of `d` with the default options.
    fn execute(&self, d: &Desired, run: &PlannedRun) -> stead_reconciler::Report {
        execute(
            &run.plan,
            d,
            &run.inventory,
            &run.observed,
            &self.drivers,
            &self.db,
            &ExecOptions::default(),
            &|_| {},
        )
    }
}

/// An env where the pool `local` and the volume `a` (1 MiB) were applied, its log
/// cleared.
fn env_with_volume_a() -> Env {
    let e = env();
    apply(
        &e,
        &desired(&(pool() + &vol("a", "1Mi", "Delete"))),
        PlanOptions::default(),
    );
    e.host.log.lock().unwrap().clear();
    e
}

fn apply(
    e: &Env,
    d: &Desired,
    opts: PlanOptions,
) -> (stead_reconciler::Plan, stead_reconciler::Report) {
    let run = e.plan(d, opts);
    assert!(run.plan.errors.is_empty(), "{:?}", run.plan.errors);
    let report = e.execute(d, &run);
    (run.plan, report)
}

#[test]
fn create_then_noop_then_grow() {
    let e = env();
    let d = desired(&(pool() + &vol("a", "16Mi", "Delete")));
    let (p, r) = apply(&e, &d, PlanOptions::default());
    assert_eq!(p.summary().get(&Action::Create), Some(&2));
    assert!(r.success());
    // Pool before volume.
    let log = e.host.log();
    assert_eq!(log, ["apply StoragePool/local", "apply Volume/a"]);

    let run = e.plan(&d, PlanOptions::default());
    assert!(!run.plan.has_changes(), "{:?}", run.plan.changes);

    let d2 = desired(&(pool() + &vol("a", "32Mi", "Delete")));
    let run = e.plan(&d2, PlanOptions::default());
    let c = run
        .plan
        .changes
        .iter()
        .find(|c| c.action == Action::Update)
        .unwrap();
    assert_eq!(c.fields.len(), 1);
    assert_eq!(c.fields[0].path, "/size");
    assert_eq!(c.impact, Some(Impact::Hot));
    let text = stead_reconciler::render::plan_text(&run.plan, Default::default());
    assert!(text.contains("size: 16Mi -> 32Mi"), "{text}");
    assert!(text.contains("  ~ Volume/a"), "{text}");
}

#[test]
fn check_runs_on_creates_and_its_refusal_is_a_plan_error() {
    let e = env();
    e.host.refuse_check.lock().unwrap().insert("bad".into());
    let d = desired(&(doc("Network", "bad", "{mtu: 9000}") + &pool()));
    let run = e.plan(&d, PlanOptions::default());
    assert_eq!(run.plan.errors.len(), 1, "{:?}", run.plan.errors);
    assert_eq!(run.plan.errors[0].id.to_string(), "Network/bad");
    assert!(
        run.plan.errors[0]
            .message
            .contains("check refuses Network/bad"),
        "{}",
        run.plan.errors[0].message
    );
    assert!(
        run.plan.changes.iter().all(|c| c.id.name != "bad"),
        "a refused create is not planned: {:?}",
        run.plan.changes
    );
    let report = e.execute(&d, &run);
    assert!(report.success());
    let log = e.host.log();
    assert_eq!(
        log,
        ["apply StoragePool/local"],
        "nothing of Network/bad ran"
    );
}

#[test]
fn shrink_is_a_plan_error() {
    let e = env();
    apply(
        &e,
        &desired(&(pool() + &vol("a", "32Mi", "Delete"))),
        PlanOptions::default(),
    );
    let run = e.plan(
        &desired(&(pool() + &vol("a", "16Mi", "Delete"))),
        PlanOptions::default(),
    );
    assert_eq!(run.plan.errors.len(), 1);
    assert!(
        run.plan.errors[0]
            .message
            .contains("shrinking from 32Mi to 16Mi is refused")
    );
}

#[test]
fn prune_deletes_and_retains_by_policy() {
    let e = env();
    apply(
        &e,
        &desired(&(pool() + &vol("gone", "1Mi", "Delete") + &vol("kept", "1Mi", "Retain"))),
        PlanOptions::default(),
    );
    let d = desired(&pool());
    let run = e.plan(
        &d,
        PlanOptions {
            no_prune: true,
            ..Default::default()
        },
    );
    assert!(!run.plan.has_changes(), "--no-prune plans no deletes");
    let (p, r) = apply(&e, &d, PlanOptions::default());
    let by_id: BTreeMap<String, Action> = p
        .changes
        .iter()
        .map(|c| (c.id.to_string(), c.action))
        .collect();
    assert_eq!(by_id["Volume/gone"], Action::Delete);
    assert_eq!(by_id["Volume/kept"], Action::Retain);
    assert!(r.success());
    let objs = e.host.objects.lock().unwrap();
    assert!(!objs.contains_key(&ResourceId::new(Kind::Volume, "gone")));
    assert!(
        objs.contains_key(&ResourceId::new(Kind::Volume, "kept")),
        "retained data stays on the host"
    );
    drop(objs);
    // Retained volume is no longer in the inventory: the next plan is clean.
    let run = e.plan(&d, PlanOptions::default());
    assert!(!run.plan.has_changes());
}

#[test]
fn data_loss_needs_opt_in() {
    let e = env();
    let two_pools = pool() + &doc("StoragePool", "other", "{type: dir, path: /q}");
    apply(
        &e,
        &desired(&(two_pools.clone() + &vol("a", "1Mi", "Retain"))),
        PlanOptions::default(),
    );
    let moved = two_pools + &doc("Volume", "a", "{pool: other, size: 1Mi}");
    let run = e.plan(&desired(&moved), PlanOptions::default());
    assert!(
        run.plan.errors[0].message.contains("--allow-data-loss"),
        "{:?}",
        run.plan.errors
    );
    let opts = PlanOptions {
        allow_data_loss: true,
        ..Default::default()
    };
    let run = e.plan(&desired(&moved), opts);
    let c = run.plan.changes.iter().find(|c| c.id.name == "a").unwrap();
    assert_eq!(c.action, Action::Replace);
    assert_eq!(c.impact, Some(Impact::DataLoss));
}

#[test]
fn unowned_object_is_a_conflict_and_drift_is_flagged() {
    let e = env();
    e.host.put(
        ResourceId::new(Kind::Network, "br0"),
        json!({"mtu": 1500}),
        false,
    );
    let d = desired(&doc("Network", "br0", "{mtu: 9000}"));
    let run = e.plan(&d, PlanOptions::default());
    assert!(
        run.plan.errors[0].message.contains("not owned by stead"),
        "{:?}",
        run.plan.errors
    );

    let d = desired(&doc("Network", "lan0", "{mtu: 9000}"));
    apply(&e, &d, PlanOptions::default());
    e.host.put(
        ResourceId::new(Kind::Network, "lan0"),
        json!({"mtu": 1400}),
        true,
    );
    let run = e.plan(&d, PlanOptions::default());
    let c = &run.plan.changes[0];
    assert_eq!(c.action, Action::Update);
    assert!(c.drift, "host changed while the manifest did not");
    // Deleted by hand: re-created, flagged as drift.
    e.host.objects.lock().unwrap().clear();
    let run = e.plan(&d, PlanOptions::default());
    assert_eq!(run.plan.changes[0].action, Action::Create);
    assert!(run.plan.changes[0].drift);
}

#[test]
fn failure_skips_dependents_and_the_rest_continues() {
    let e = env();
    e.host.fail.lock().unwrap().insert("local".into());
    let d = desired(&(pool() + &vol("a", "1Mi", "Delete") + &doc("Network", "lan0", "{}")));
    let (_, r) = apply(&e, &d, PlanOptions::default());
    assert!(!r.success());
    let by: BTreeMap<String, Outcome> = r
        .results
        .iter()
        .map(|s| (s.id.to_string(), s.outcome.clone()))
        .collect();
    assert!(matches!(by["StoragePool/local"], Outcome::Failed(_)));
    assert!(matches!(&by["Volume/a"], Outcome::Skipped(m) if m.contains("StoragePool/local")));
    assert_eq!(by["Network/lan0"], Outcome::Created);
}

#[test]
fn deletes_run_in_reverse_dependency_order() {
    let e = env_with_volume_a();
    let (p, r) = apply(&e, &desired(""), PlanOptions::default());
    assert!(r.success());
    assert_eq!(
        p.changes[0].id.kind,
        Kind::Volume,
        "volume first in the plan"
    );
    assert_eq!(
        e.host.log(),
        [
            "snapshot Volume/a pre-delete-",
            "delete Volume/a",
            "delete StoragePool/local"
        ]
    );
}

#[test]
fn interrupted_create_is_adopted() {
    let e = env();
    // A crash after the side effect but before the inventory write: the object exists
    // without a mark, and the journal still has the open intent.
    e.db.lock()
        .unwrap()
        .journal_begin(&ResourceId::new(Kind::Network, "lan0"), "create")
        .unwrap();
    e.host.put(
        ResourceId::new(Kind::Network, "lan0"),
        json!({"mtu": 9000}),
        false,
    );
    let d = desired(&doc("Network", "lan0", "{mtu: 9000}"));
    let (p, r) = apply(&e, &d, PlanOptions::default());
    assert!(r.success());
    assert_eq!(p.changes[0].action, Action::Noop);
    assert!(e.db.lock().unwrap().journal_open().unwrap().is_empty());
    assert!(
        e.db.lock()
            .unwrap()
            .inventory()
            .unwrap()
            .contains_key(&ResourceId::new(Kind::Network, "lan0"))
    );
}

#[test]
fn apply_lock_is_exclusive() {
    let dir = tempfile::tempdir().unwrap();
    let _a = stead_reconciler::ApplyLock::acquire(dir.path(), std::time::Duration::ZERO).unwrap();
    let b = stead_reconciler::ApplyLock::acquire(dir.path(), std::time::Duration::from_millis(200));
    assert!(
        matches!(b, Err(stead_reconciler::StateError::Locked(..))),
        "a second apply waits, then reports the lock"
    );
    drop(_a);
    assert!(stead_reconciler::ApplyLock::acquire(dir.path(), std::time::Duration::ZERO).is_ok());
}

#[test]
fn data_loss_takes_a_safety_snapshot_first() {
    let e = env_with_volume_a();
    let (p, r) = apply(&e, &desired(&pool()), PlanOptions::default());
    assert!(r.success());
    let c = p.changes.iter().find(|c| c.id.name == "a").unwrap();
    assert!(
        c.safety_snapshot
            .as_deref()
            .is_some_and(|s| s.starts_with("pre-delete-"))
    );
    let text = stead_reconciler::render::plan_text(&p, Default::default());
    assert!(text.contains("safety snapshot pre-delete-"), "{text}");
    assert_eq!(
        e.host.log(),
        ["snapshot Volume/a pre-delete-", "delete Volume/a"]
    );
}

#[test]
fn exec_keeps_the_error_class_of_the_driver() {
    let e = env();
    e.host.fail.lock().unwrap().insert("lan0".into());
    e.host.refuse.lock().unwrap().insert("lan1".into());
    let d = desired(&(doc("Network", "lan0", "{}") + &doc("Network", "lan1", "{}")));
    let (_, r) = apply(&e, &d, PlanOptions::default());
    let by: BTreeMap<String, &stead_reconciler::StepResult> =
        r.results.iter().map(|s| (s.id.name.clone(), s)).collect();
    let transient = by["lan0"].error.as_ref().expect("lan0 failed");
    assert_eq!((transient.reason, transient.terminal), ("Failed", false));
    let terminal = by["lan1"].error.as_ref().expect("lan1 failed");
    assert_eq!((terminal.reason, terminal.terminal), ("Refused", true));
    assert!(
        terminal.message.contains("injected refusal"),
        "{terminal:?}"
    );
    // The class reaches the events too.
    let events =
        e.db.lock()
            .unwrap()
            .events(Some("Network/lan1"), 10)
            .unwrap();
    assert!(
        events
            .iter()
            .any(|ev| ev.reason == "Refused" && ev.message.contains("not retried")),
        "{events:?}"
    );
    let json = serde_json::to_value(by["lan1"]).unwrap();
    assert_eq!(json["error"]["terminal"], true, "{json}");
    // And the journal: the entry stays open (the step may have half happened) with it.
    let (state, error) =
        e.db.lock()
            .unwrap()
            .journal_last(&by["lan1"].id)
            .unwrap()
            .unwrap();
    assert_eq!(state, "open");
    assert!(
        error
            .unwrap()
            .starts_with("Refused (terminal): refused: injected refusal")
    );
}

#[test]
fn panicking_observe_is_an_error_not_an_absent_object() {
    let e = env();
    apply(
        &e,
        &desired(&(pool() + &doc("Network", "lan0", "{}"))),
        PlanOptions::default(),
    );
    e.host.panic_observe.lock().unwrap().insert(Kind::Network);
    e.host.log.lock().unwrap().clear();
    // Still desired: no create (it would read as absent).
    let d = desired(&(pool() + &doc("Network", "lan0", "{}") + &doc("Network", "lan1", "{}")));
    let run = e.plan(&d, PlanOptions::default());
    assert!(
        run.plan.changes.iter().all(|c| c.id.kind != Kind::Network),
        "{:?}",
        run.plan.changes
    );
    for name in ["lan0", "lan1"] {
        assert!(
            run.plan
                .errors
                .iter()
                .any(|er| er.id.name == name && er.message.contains("observe panicked")),
            "{name}: {:?}",
            run.plan.errors
        );
    }
    // Left the manifests: no delete either.
    let run = e.plan(&desired(&pool()), PlanOptions::default());
    assert!(run.plan.changes.iter().all(|c| c.id.kind != Kind::Network));
    assert!(run.plan.errors.iter().any(|er| er.id.name == "lan0"));
    // The other kinds are observed and planned as usual.
    assert!(
        run.plan
            .changes
            .iter()
            .any(|c| c.id.name == "local" && c.action == Action::Noop)
    );
}

#[test]
fn unrecorded_object_of_an_interrupted_step_is_pruned() {
    let e = env();
    // A step wrote its intent and made the object (with stead's mark), then the
    // inventory write failed (a full state disk): the state does not know it.
    let d = desired(&(doc("Network", "br0", "{}") + &doc("Network", "br1", "{mtu: 9000}")));
    let br1 = d.get(&ResourceId::new(Kind::Network, "br1")).unwrap();
    e.db.lock().unwrap().journal_intent(br1, "create").unwrap();
    e.host.put(br1.id.clone(), json!({"mtu": 9000}), true);
    // An unmarked object under an open intent is not ours to delete.
    let br2 = ResourceId::new(Kind::Network, "br2");
    let d2 = desired(&doc("Network", "br2", "{}"));
    e.db.lock()
        .unwrap()
        .journal_intent(d2.get(&br2).unwrap(), "create")
        .unwrap();
    e.host.put(br2.clone(), json!({}), false);

    let only_br0 = desired(&doc("Network", "br0", "{}"));
    let (p, r) = apply(&e, &only_br0, PlanOptions::default());
    assert!(r.success(), "{:?}", r.results);
    let del = p
        .changes
        .iter()
        .find(|c| c.id == br1.id)
        .expect("br1 planned");
    assert_eq!(del.action, Action::Delete);
    assert!(p.changes.iter().all(|c| c.id != br2), "{:?}", p.changes);
    let objs = e.host.objects.lock().unwrap();
    assert!(!objs.contains_key(&br1.id), "the leaked object is pruned");
    assert!(objs.contains_key(&br2), "the unmarked object is left alone");
    drop(objs);
    // Converged: the next plan has nothing to do.
    let run = e.plan(&only_br0, PlanOptions::default());
    assert!(!run.plan.has_changes(), "{:?}", run.plan.changes);
}

#[test]
fn marked_object_unknown_to_the_state_is_a_warning_and_left_alone() {
    let e = env();
    let lost = ResourceId::new(Kind::Network, "lost0");
    e.host.put(lost.clone(), json!({}), true);
    let d = desired(&doc("Network", "lan0", "{}"));
    let (p, r) = apply(&e, &d, PlanOptions::default());
    assert!(r.success());
    assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
    assert_eq!(p.warnings[0].id, lost);
    assert!(p.changes.iter().all(|c| c.id != lost));
    assert!(e.host.objects.lock().unwrap().contains_key(&lost));
    let text = stead_reconciler::render::plan_text(&p, Default::default());
    assert!(
        text.contains("warning: Network/lost0: carries stead's ownership mark"),
        "{text}"
    );
}

#[test]
fn a_conflict_closes_its_intent_so_the_object_is_never_adopted() {
    let e = env();
    let d = desired(&doc("Network", "taken0", "{}"));
    let (_, r) = apply(&e, &d, PlanOptions::default());
    assert_eq!(r.results[0].error.as_ref().unwrap().reason, "Conflict");
    let id = ResourceId::new(Kind::Network, "taken0");
    let (state, _) = e.db.lock().unwrap().journal_last(&id).unwrap().unwrap();
    assert_eq!(state, "failed");
    assert!(e.db.lock().unwrap().journal_open().unwrap().is_empty());
    // The unowned object in the way stays a plan error, not an adoption.
    e.host.put(id.clone(), json!({}), false);
    let run = e.plan(&d, PlanOptions::default());
    assert!(
        run.plan
            .errors
            .iter()
            .any(|er| er.id == id && er.message.contains("not owned")),
        "{:?}",
        run.plan
    );
}
