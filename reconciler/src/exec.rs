//! The executor: runs a plan with bounded parallelism, in dependency order.
//!
//! A change starts when every change it depends on has finished: creates and updates
//! after the resources they reference, deletes after every resource that referenced
//! them in the last apply. A failed change skips its dependents; the rest goes on.
//! Each side effect is wrapped in a journal entry (intent before, done after), so a
//! crash at any point is repaired by the next apply.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::driver::{Driver, DriverError, Observed};
use serde::Serialize;
use stead_schema::graph::edges;
use stead_schema::{Desired, Kind, Resource, ResourceId};
use tracing::{info, info_span, warn};

use crate::plan::{Action, Change, Plan, World};
use crate::state::{InventoryEntry, StateDb, StateError};

/// How one change ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", content = "message", rename_all = "lowercase")]
pub enum Outcome {
    /// Created.
    Created,
    /// An existing object became owned (and its differences were converged).
    Adopted,
    /// Updated in place.
    Configured,
    /// Deleted and created again.
    Replaced,
    /// Deleted.
    Deleted,
    /// Forgotten, data kept.
    Retained,
    /// Nothing to do.
    Unchanged,
    /// The driver failed.
    Failed(String),
    /// Not attempted because a dependency failed.
    Skipped(String),
}

impl Outcome {
    /// Whether this is a failure or skip.
    pub fn is_error(&self) -> bool {
        matches!(self, Outcome::Failed(_) | Outcome::Skipped(_))
    }

    /// Short word for logs and metrics.
    pub fn word(&self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Adopted => "adopted",
            Outcome::Configured => "configured",
            Outcome::Replaced => "replaced",
            Outcome::Deleted => "deleted",
            Outcome::Retained => "retained",
            Outcome::Unchanged => "unchanged",
            Outcome::Failed(_) => "failed",
            Outcome::Skipped(_) => "skipped",
        }
    }
}

/// Why a change failed, with the class of the error kept from the driver up to the
/// controller: a terminal error is not retried until the manifest or the host changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepError {
    /// Short CamelCase class: a [`DriverError::reason`], `StateError` (the state
    /// database could not be written) or `Internal`.
    pub reason: &'static str,
    /// Whether retrying the same change cannot help.
    pub terminal: bool,
    /// What went wrong (the error and its causes).
    pub message: String,
}

impl StepError {
    /// A driver error, its class kept.
    pub fn driver(context: Option<&str>, e: &DriverError) -> Self {
        let chain = error_chain(e);
        StepError {
            reason: e.reason(),
            terminal: e.is_terminal(),
            message: match context {
                Some(c) => format!("{c}: {chain}"),
                None => chain,
            },
        }
    }

    /// The state database failed (e.g. its disk is full): retryable, the step stopped.
    fn state(e: &StateError) -> Self {
        StepError {
            reason: "StateError",
            terminal: false,
            message: error_chain(e),
        }
    }

    /// A fault of stead itself (no driver, inconsistent inputs): not retried.
    fn internal(message: impl Into<String>) -> Self {
        StepError {
            reason: "Internal",
            terminal: true,
            message: message.into(),
        }
    }
}

/// The result of one change.
#[derive(Debug, Clone, Serialize)]
pub struct StepResult {
    /// The resource.
    pub id: ResourceId,
    /// The planned action.
    pub action: Action,
    /// How it ended.
    pub outcome: Outcome,
    /// For a failed change: its error class.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<StepError>,
    /// Wall time.
    pub seconds: f64,
}

/// The executor's report.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    /// One entry per change, in completion order.
    pub results: Vec<StepResult>,
}

impl Report {
    /// Whether every change succeeded.
    pub fn success(&self) -> bool {
        !self.results.iter().any(|r| r.outcome.is_error())
    }

    /// Counts per outcome word.
    pub fn summary(&self) -> BTreeMap<&'static str, usize> {
        let mut m = BTreeMap::new();
        for r in &self.results {
            *m.entry(r.outcome.word()).or_insert(0) += 1;
        }
        m
    }
}

/// Executor settings.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// Changes run at once (at least 1).
    pub parallelism: usize,
    /// Test hook: after this many side-effect steps, pause (sleep) so a test can SIGKILL
    /// the process mid-apply. Read from `STEAD_TEST_PAUSE_AFTER_STEPS` by the CLI.
    pub pause_after_steps: Option<usize>,
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            parallelism: 4,
            pause_after_steps: None,
        }
    }
}

/// The executor's schedule: which changes wait, which are ready, which failed.
struct Sched {
    /// prerequisites[i]: the changes that must finish before change i starts.
    prereq: Vec<BTreeSet<usize>>,
    /// dependents[i]: the changes waiting for change i.
    dependents: Vec<Vec<usize>>,
    waiting_on: Vec<usize>,
    ready: VecDeque<usize>,
    running: usize,
    finished: usize,
    failed: BTreeMap<usize, ResourceId>,
}

impl Sched {
    fn new(prereq: Vec<BTreeSet<usize>>) -> Self {
        let n = prereq.len();
        let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (i, ps) in prereq.iter().enumerate() {
            for &p in ps {
                dependents[p].push(i);
            }
        }
        Sched {
            waiting_on: prereq.iter().map(|p| p.len()).collect(),
            ready: (0..n).filter(|&i| prereq[i].is_empty()).collect(),
            prereq,
            dependents,
            running: 0,
            finished: 0,
            failed: BTreeMap::new(),
        }
    }

    /// The next ready change and the failed prerequisite that blocks it, if any; `None`
    /// when nothing is left to start (waits while running changes may free more).
    fn take(sched: &Mutex<Sched>, cv: &Condvar) -> Option<(usize, Option<ResourceId>)> {
        let mut s = sched.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(i) = s.ready.pop_front() {
                s.running += 1;
                let blocked = s.prereq[i].iter().find_map(|p| s.failed.get(p).cloned());
                return Some((i, blocked));
            }
            if s.finished == s.prereq.len() || (s.running == 0 && s.ready.is_empty()) {
                return None;
            }
            s = cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Change `i` ended (`bad`: failed or skipped): its dependents may become ready.
    fn finish(&mut self, i: usize, id: &ResourceId, bad: bool) {
        self.running -= 1;
        self.finished += 1;
        if bad {
            self.failed.insert(i, id.clone());
        }
        for &d in &self.dependents[i] {
            self.waiting_on[d] -= 1;
            if self.waiting_on[d] == 0 {
                self.ready.push_back(d);
            }
        }
    }
}

/// prerequisites[i]: the changes that must finish before change i starts. Creates and
/// updates wait for what they reference now; deletes and retains wait for whatever
/// referenced them in the last apply.
fn prerequisites(
    changes: &[Change],
    desired: &Desired,
    inventory: &BTreeMap<ResourceId, InventoryEntry>,
) -> Vec<BTreeSet<usize>> {
    let index: BTreeMap<&ResourceId, usize> = changes
        .iter()
        .enumerate()
        .map(|(i, c)| (&c.id, i))
        .collect();
    let mut prereq: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); changes.len()];
    for e in edges(desired.resources.values()) {
        if let (Some(&from), Some(&to)) = (index.get(&e.from), index.get(&e.to))
            && changes[from].action != Action::Delete
            && changes[from].action != Action::Retain
        {
            prereq[from].insert(to);
        }
    }
    for e in edges(inventory.values().map(|i| &i.resource)) {
        if let (Some(&user), Some(&used)) = (index.get(&e.from), index.get(&e.to))
            && matches!(changes[used].action, Action::Delete | Action::Retain)
            && user != used
        {
            prereq[used].insert(user);
        }
    }
    prereq
}

/// Runs `plan`. `observed` is what the plan was computed from.
#[allow(clippy::too_many_arguments)]
pub fn execute(
    plan: &Plan,
    desired: &Desired,
    inventory: &BTreeMap<ResourceId, InventoryEntry>,
    observed: &BTreeMap<ResourceId, Observed>,
    drivers: &BTreeMap<Kind, Box<dyn Driver>>,
    db: &Mutex<StateDb>,
    opts: &ExecOptions,
    on_step: &(dyn Fn(&StepResult) + Sync),
) -> Report {
    let changes = &plan.changes;
    let n = changes.len();
    let sched = Mutex::new(Sched::new(prerequisites(changes, desired, inventory)));
    let cv = Condvar::new();
    let results = Mutex::new(Vec::with_capacity(n));
    let steps = AtomicUsize::new(0);
    let mid = MidStepHook {
        at: mid_step_pause_from_env(),
        effects: AtomicUsize::new(0),
    };
    let world = World {
        desired,
        applied: inventory,
    };
    let absent = Observed::absent();

    let worker = || {
        while let Some((i, blocked_by)) = Sched::take(&sched, &cv) {
            let c = &changes[i];
            let start = Instant::now();
            let (outcome, error) = match blocked_by {
                Some(dep) => (
                    Outcome::Skipped(format!("dependency {dep} did not converge")),
                    None,
                ),
                None => {
                    let obs = observed.get(&c.id).unwrap_or(&absent);
                    let snap = c.safety_snapshot.as_deref();
                    let converge = !c.fields.is_empty();
                    run_one(
                        c.action, &c.id, snap, converge, desired, inventory, obs, drivers, db,
                        &world, &steps, &mid, opts,
                    )
                }
            };
            let result = StepResult {
                id: c.id.clone(),
                action: c.action,
                outcome,
                error,
                seconds: start.elapsed().as_secs_f64(),
            };
            on_step(&result);
            let bad = result.outcome.is_error();
            results
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(result);
            let mut s = sched.lock().unwrap_or_else(|p| p.into_inner());
            s.finish(i, &c.id, bad);
            cv.notify_all();
        }
    };
    std::thread::scope(|scope| {
        for _ in 0..opts.parallelism.max(1).min(n.max(1)) {
            scope.spawn(worker);
        }
    });
    Report {
        results: results.into_inner().unwrap_or_else(|p| p.into_inner()),
    }
}

#[allow(clippy::too_many_arguments)]
fn run_one(
    action: Action,
    id: &ResourceId,
    safety_snapshot: Option<&str>,
    converge: bool,
    desired: &Desired,
    inventory: &BTreeMap<ResourceId, InventoryEntry>,
    obs: &Observed,
    drivers: &BTreeMap<Kind, Box<dyn Driver>>,
    db: &Mutex<StateDb>,
    world: &World<'_>,
    steps: &AtomicUsize,
    mid: &MidStepHook,
    opts: &ExecOptions,
) -> (Outcome, Option<StepError>) {
    let span = info_span!("change", resource = %id, action = action.verb());
    let _g = span.enter();
    let result = match drivers.get(&id.kind) {
        Some(driver) => {
            let step = Step {
                id,
                driver: driver.as_ref(),
                db,
                world,
                obs,
                mid,
                converge,
            };
            step.run(action, safety_snapshot, desired, inventory)
        }
        None => Err(StepError::internal(format!(
            "no driver for kind {}",
            id.kind
        ))),
    };
    let outcome = match result {
        Ok(o) => {
            info!(outcome = o.word(), "done");
            (o, None)
        }
        Err(e) => {
            warn!(error = %e.message, reason = e.reason, terminal = e.terminal, "failed");
            record_failure(db, id, &e);
            (Outcome::Failed(e.message.clone()), Some(e))
        }
    };
    if action != Action::Noop {
        let done = steps.fetch_add(1, Ordering::SeqCst) + 1;
        if opts.pause_after_steps == Some(done) {
            eprintln!(
                "stead: test hook: pausing after {done} steps (STEAD_TEST_PAUSE_AFTER_STEPS)"
            );
            std::thread::sleep(Duration::from_secs(600));
        }
    }
    outcome
}

/// Records a failed step as a Warning event whose reason is the error class. The
/// journal entry stays open (the side effect may have happened), so the next plan
/// treats what it finds as stead's own. Best effort: the database may be what failed.
fn record_failure(db: &Mutex<StateDb>, id: &ResourceId, e: &StepError) {
    let g = db.lock().unwrap_or_else(|p| p.into_inner());
    let message = if e.terminal {
        format!(
            "{} (not retried until the manifest or the host changes)",
            e.message
        )
    } else {
        e.message.clone()
    };
    if let Err(err) = g.event(&id.to_string(), "Warning", e.reason, &message) {
        warn!(error = %error_chain(&err), "cannot record the failure event");
    }
    // A conflict means an unowned object was in the way and left alone: the intent did
    // not happen, and an open entry would make the next plan adopt that object. Other
    // failures keep the entry open (the side effect may have happened) with the error.
    let class = format!(
        "{} ({}): {}",
        e.reason,
        if e.terminal { "terminal" } else { "transient" },
        e.message
    );
    let journaled = if e.reason == "Conflict" {
        g.journal_close(id, Some(&class))
    } else {
        g.journal_note_error(id, &class)
    };
    if let Err(err) = journaled {
        warn!(error = %error_chain(&err), "cannot record the failure in the journal");
    }
}

/// Test hook `STEAD_TEST_PAUSE_MID_STEP=N`: after the N-th side effect of a run, before
/// its inventory write and journal close, pause (sleep) so a test can SIGKILL the process
/// between the host change and the state update.
struct MidStepHook {
    at: Option<usize>,
    effects: AtomicUsize,
}

impl MidStepHook {
    fn side_effect_done(&self) {
        let n = self.effects.fetch_add(1, Ordering::SeqCst) + 1;
        if self.at == Some(n) {
            eprintln!(
                "stead: test hook: pausing mid-step after {n} side effects (STEAD_TEST_PAUSE_MID_STEP)"
            );
            std::thread::sleep(Duration::from_secs(600));
        }
    }
}

fn mid_step_pause_from_env() -> Option<usize> {
    std::env::var("STEAD_TEST_PAUSE_MID_STEP")
        .ok()
        .and_then(|v| v.parse().ok())
}

/// One change of one resource, with what it needs to run.
struct Step<'a> {
    id: &'a ResourceId,
    driver: &'a dyn Driver,
    db: &'a Mutex<StateDb>,
    world: &'a World<'a>,
    obs: &'a Observed,
    mid: &'a MidStepHook,
    /// The change carries field differences: an adoption converges them after
    /// recording ownership.
    converge: bool,
}

impl Step<'_> {
    /// Runs `f` on the state database in one transaction; a failure stops the step.
    fn db(&self, f: &dyn Fn(&StateDb) -> Result<(), StateError>) -> Result<(), StepError> {
        let g = self.db.lock().unwrap_or_else(|p| p.into_inner());
        g.atomically(f).map_err(|e| StepError::state(&e))
    }

    fn run(
        &self,
        action: Action,
        safety_snapshot: Option<&str>,
        desired: &Desired,
        inventory: &BTreeMap<ResourceId, InventoryEntry>,
    ) -> Result<Outcome, StepError> {
        let id = self.id;
        match action {
            Action::Noop => {
                if let Some(r) = desired.get(id) {
                    let stale = inventory
                        .get(id)
                        .is_none_or(|i| i.spec_hash != r.spec_hash());
                    if stale {
                        self.db(&|d| d.upsert(r))?;
                    }
                    self.db(&|d| d.journal_close(id, None))?;
                }
                Ok(Outcome::Unchanged)
            }
            Action::Create | Action::Update | Action::Replace => {
                let r = desired
                    .get(id)
                    .ok_or_else(|| StepError::internal("resource vanished from the desired set"))?;
                self.apply(action, r, inventory, safety_snapshot)?;
                Ok(match action {
                    Action::Create => Outcome::Created,
                    Action::Update => Outcome::Configured,
                    _ => Outcome::Replaced,
                })
            }
            Action::Adopt => {
                let r = desired
                    .get(id)
                    .ok_or_else(|| StepError::internal("resource vanished from the desired set"))?;
                self.adopt(r)?;
                Ok(Outcome::Adopted)
            }
            Action::Delete => {
                let last = inventory
                    .get(id)
                    .map(|i| &i.resource)
                    .ok_or_else(|| StepError::internal("not in the inventory"))?;
                self.db(&|d| d.journal_intent(last, "delete").map(|_| ()))?;
                self.snapshot(last, safety_snapshot)?;
                self.driver
                    .delete(last, self.obs, self.world)
                    .map_err(|e| StepError::driver(None, &e))?;
                self.mid.side_effect_done();
                self.db(&|d| {
                    d.remove(id)?;
                    d.journal_close(id, None)?;
                    d.event(&id.to_string(), "Normal", "Deleted", "deleted")
                })?;
                Ok(Outcome::Deleted)
            }
            Action::Retain => {
                if let Some(entry) = inventory.get(id).filter(|e| e.adopted) {
                    self.driver
                        .release(&entry.resource, self.obs)
                        .map_err(|e| StepError::driver(Some("release the adopted object"), &e))?;
                }
                self.db(&|d| {
                    d.remove(id)?;
                    d.journal_close(id, None)?;
                    d.event(
                        &id.to_string(),
                        "Normal",
                        "Retained",
                        "left the manifests; data kept, no longer managed",
                    )
                })?;
                Ok(Outcome::Retained)
            }
        }
    }

    /// Create, update or replace `r`: the intent (with the resource, so that a leak can
    /// be pruned) is durable before the side effect; the inventory row after it.
    fn apply(
        &self,
        action: Action,
        r: &Resource,
        inventory: &BTreeMap<ResourceId, InventoryEntry>,
        safety_snapshot: Option<&str>,
    ) -> Result<(), StepError> {
        let id = self.id;
        self.db(&|d| d.journal_intent(r, action.verb()).map(|_| ()))?;
        if action == Action::Replace {
            let old = inventory.get(id).map(|i| &i.resource).unwrap_or(r);
            self.snapshot(old, safety_snapshot)?;
            self.driver
                .delete(old, self.obs, self.world)
                .map_err(|e| StepError::driver(Some("delete before re-create"), &e))?;
            self.driver
                .apply(r, &Observed::absent(), self.world)
                .map_err(|e| StepError::driver(None, &e))?;
        } else {
            self.driver
                .apply(r, self.obs, self.world)
                .map_err(|e| StepError::driver(None, &e))?;
        }
        self.mid.side_effect_done();
        self.db(&|d| {
            d.upsert(r)?;
            d.journal_close(id, None)?;
            d.event(&id.to_string(), "Normal", action_reason(action), "applied")
        })
    }

    /// Adopts the existing object of `r`: the intent and the adoption record are durable
    /// first, then the driver writes its ownership mark (nothing is recreated), the
    /// ordinary apply converges the remaining differences, and the inventory row follows.
    fn adopt(&self, r: &Resource) -> Result<(), StepError> {
        let id = self.id;
        self.db(&|d| {
            d.journal_intent(r, Action::Adopt.verb())?;
            d.mark_adopted(id)
        })?;
        self.driver
            .adopt(r, self.obs, self.world)
            .map_err(|e| StepError::driver(Some("adopt"), &e))?;
        if self.converge {
            let owned = Observed {
                owned: true,
                ..self.obs.clone()
            };
            self.driver
                .apply(r, &owned, self.world)
                .map_err(|e| StepError::driver(Some("converge after adopting"), &e))?;
        }
        self.mid.side_effect_done();
        self.db(&|d| {
            d.upsert(r)?;
            d.journal_close(id, None)?;
            d.event(
                &id.to_string(),
                "Normal",
                action_reason(Action::Adopt),
                "existing object adopted: ownership recorded, nothing recreated",
            )
        })
    }

    fn snapshot(&self, r: &Resource, name: Option<&str>) -> Result<(), StepError> {
        take_safety_snapshot(self.driver, r, self.world, name)
    }
}

fn take_safety_snapshot(
    driver: &dyn Driver,
    r: &Resource,
    world: &World<'_>,
    name: Option<&str>,
) -> Result<(), StepError> {
    let Some(name) = name else { return Ok(()) };
    driver.safety_snapshot(r, world, name).map_err(|e| {
        let context = format!("safety snapshot {name} failed, so nothing was changed");
        StepError::driver(Some(&context), &e)
    })?;
    info!(snapshot = name, "safety snapshot taken");
    Ok(())
}

fn action_reason(a: Action) -> &'static str {
    match a {
        Action::Create => "Created",
        Action::Adopt => "Adopted",
        Action::Update => "Updated",
        Action::Replace => "Replaced",
        Action::Delete => "Deleted",
        Action::Retain => "Retained",
        Action::Noop => "Unchanged",
    }
}

/// An error and its sources, joined with ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::TimeZone;

    use super::*;
    use crate::plan::{PlanError, PlanInput, PlanOptions, plan};
    use crate::testkit::*;

    /// A host (the fake drivers' script) and a state database in a temp dir.
    struct Host {
        _dir: tempfile::TempDir,
        db: Mutex<StateDb>,
        script: Arc<Script>,
    }

    fn host(script: Script) -> Host {
        let dir = tempfile::tempdir().unwrap();
        let db = Mutex::new(StateDb::open(dir.path()).unwrap());
        Host {
            _dir: dir,
            db,
            script: Arc::new(script),
        }
    }

    impl Host {
        /// Plans `desired` against what the database holds, with every recorded resource
        /// observed in sync and every other absent, then executes the plan.
        fn apply(&self, desired: &Desired, opts: &PlanOptions) -> Report {
            let inventory = self.db.lock().unwrap().inventory().unwrap();
            let observed: BTreeMap<ResourceId, Observed> = inventory
                .values()
                .map(|e| {
                    let state = FakeDriver::project(&e.resource);
                    (e.resource.id.clone(), present(state))
                })
                .collect();
            self.plan_and_execute(desired, &inventory, &observed, &BTreeSet::new(), opts)
                .1
        }

        /// Plans `desired` against `observed` (no plan errors allowed), then executes it.
        fn plan_and_execute(
            &self,
            desired: &Desired,
            inventory: &BTreeMap<ResourceId, InventoryEntry>,
            observed: &BTreeMap<ResourceId, Observed>,
            pending: &BTreeSet<ResourceId>,
            opts: &PlanOptions,
        ) -> (Plan, Report) {
            let drivers = drivers(&self.script);
            let no_errors: [PlanError; 0] = [];
            let input = PlanInput {
                desired,
                observed,
                inventory,
                pending,
                observe_errors: &no_errors,
                warnings: &no_errors,
            };
            let p = plan(&input, &drivers, opts);
            assert!(p.errors.is_empty(), "{:?}", p.errors);
            let exec = ExecOptions {
                parallelism: 4,
                pause_after_steps: None,
            };
            let report = execute(
                &p,
                desired,
                inventory,
                observed,
                &drivers,
                &self.db,
                &exec,
                &|_| {},
            );
            (p, report)
        }

        fn inventory_ids(&self) -> Vec<String> {
            let inv = self.db.lock().unwrap().inventory().unwrap();
            inv.keys().map(|id| id.to_string()).collect()
        }

        fn journal_last(&self, kind: Kind, name: &str) -> Option<(String, Option<String>)> {
            let db = self.db.lock().unwrap();
            db.journal_last(&id(kind, name)).unwrap()
        }
    }

    fn opts() -> PlanOptions {
        PlanOptions::at(
            chrono::Utc
                .with_ymd_and_hms(2026, 11, 26, 15, 0, 0)
                .unwrap(),
        )
    }

    fn outcome<'r>(report: &'r Report, id: &str) -> &'r StepResult {
        report
            .results
            .iter()
            .find(|r| r.id.to_string() == id)
            .unwrap_or_else(|| panic!("no result for {id}: {report:?}"))
    }

    /// Position of `entry` in `log`.
    fn at(log: &[String], entry: &str) -> usize {
        log.iter()
            .position(|l| l == entry)
            .unwrap_or_else(|| panic!("{entry} not in {log:?}"))
    }

    #[test]
    fn a_change_starts_after_the_changes_it_depends_on() {
        let h = host(Script::default());
        let d = desired(&(vol("a", "1Mi", "Delete") + &vol("b", "1Mi", "Delete") + &pool("local")));
        let report = h.apply(&d, &opts());
        assert!(report.success(), "{report:?}");
        assert_eq!(report.summary(), [("created", 3)].into());
        let log = h.script.log();
        let pool = at(&log, "apply StoragePool/local");
        assert!(pool < at(&log, "apply Volume/a"), "{log:?}");
        assert!(pool < at(&log, "apply Volume/b"), "{log:?}");
        assert_eq!(
            h.inventory_ids(),
            ["StoragePool/local", "Volume/a", "Volume/b"]
        );
        assert_eq!(
            h.journal_last(Kind::Volume, "a"),
            Some(("done".to_string(), None))
        );
    }

    #[test]
    fn a_delete_starts_after_the_deletes_of_its_users() {
        let h = host(Script::default());
        let d = desired(&(pool("local") + &vol("a", "1Mi", "Delete")));
        assert!(h.apply(&d, &opts()).success());
        let report = h.apply(&Desired::default(), &opts());
        assert!(report.success(), "{report:?}");
        assert_eq!(report.summary(), [("deleted", 2)].into());
        let log = h.script.log();
        assert!(at(&log, "delete Volume/a") < at(&log, "delete StoragePool/local"));
        assert!(h.inventory_ids().is_empty());
        let events = h.db.lock().unwrap().events(Some("Volume/a"), 10).unwrap();
        assert!(events.iter().any(|e| e.reason == "Deleted"), "{events:?}");
    }

    #[test]
    fn a_failed_change_skips_its_dependents_and_the_rest_goes_on() {
        let h = host(Script {
            fail: ["local".to_string()].into(),
            ..Script::default()
        });
        let d = desired(&(pool("local") + &vol("a", "1Mi", "Delete") + &net("lan0", 1500)));
        let report = h.apply(&d, &opts());
        assert!(!report.success());

        let pool = outcome(&report, "StoragePool/local");
        assert_eq!(pool.outcome, Outcome::Failed("injected failure".into()));
        let error = pool.error.as_ref().unwrap();
        assert_eq!((error.reason, error.terminal), ("Failed", false));
        assert_eq!(
            outcome(&report, "Volume/a").outcome,
            Outcome::Skipped("dependency StoragePool/local did not converge".into())
        );
        assert_eq!(outcome(&report, "Network/lan0").outcome, Outcome::Created);

        assert_eq!(h.script.log(), ["apply Network/lan0"]);
        assert_eq!(h.inventory_ids(), ["Network/lan0"]);
        // The failed step's intent stays open with its error; the skipped one has none.
        assert_eq!(
            h.journal_last(Kind::StoragePool, "local"),
            Some((
                "open".to_string(),
                Some("Failed (transient): injected failure".to_string())
            ))
        );
        assert_eq!(h.journal_last(Kind::Volume, "a"), None);
    }

    #[test]
    fn a_data_loss_delete_takes_its_safety_snapshot_first() {
        let mut script = Script::default();
        script.data_loss_delete.insert(Kind::Volume);
        script.snapshots.insert(Kind::Volume);
        let h = host(script);
        let d = desired(&(pool("local") + &vol("a", "1Mi", "Delete")));
        assert!(h.apply(&d, &opts()).success());
        let report = h.apply(&desired(&pool("local")), &opts());
        assert!(report.success(), "{report:?}");
        let log = h.script.log();
        let snap = at(&log, "snapshot pre-delete-20261126T150000Z Volume/a");
        assert!(snap < at(&log, "delete Volume/a"), "{log:?}");
    }

    #[test]
    fn an_adoption_records_ownership_then_converges_only_what_differs() {
        let h = host(Script::default());
        let d = desired(&(net("lan0", 1500) + &net("lan1", 9000)));
        let unowned = |mtu: u32, name: &str| {
            let mut state = FakeDriver::project(&d.resources[&id(Kind::Network, name)]);
            state["mtu"] = serde_json::json!(mtu);
            Observed {
                owned: false,
                ..present(state)
            }
        };
        let observed: BTreeMap<ResourceId, Observed> = [
            (id(Kind::Network, "lan0"), unowned(1500, "lan0")),
            (id(Kind::Network, "lan1"), unowned(1500, "lan1")),
        ]
        .into();
        let adopt = PlanOptions {
            adopt: true,
            ..opts()
        };
        let (_, report) =
            h.plan_and_execute(&d, &BTreeMap::new(), &observed, &BTreeSet::new(), &adopt);
        assert!(report.success(), "{report:?}");
        assert_eq!(report.summary(), [("adopted", 2)].into());
        let mut log = h.script.log();
        log.sort();
        // lan0 matches the host: ownership only; lan1's MTU is then converged.
        assert_eq!(
            log,
            [
                "adopt Network/lan0",
                "adopt Network/lan1",
                "apply Network/lan1"
            ]
        );
        let inv = h.db.lock().unwrap().inventory().unwrap();
        assert!(inv.values().all(|e| e.adopted && e.recorded), "{inv:?}");
        let events =
            h.db.lock()
                .unwrap()
                .events(Some("Network/lan0"), 10)
                .unwrap();
        assert!(events.iter().any(|e| e.reason == "Adopted"), "{events:?}");
        // Leaving the manifests retains them (the fake driver would delete a Network).
        let report = h.apply(&Desired::default(), &opts());
        assert_eq!(report.summary(), [("retained", 2)].into());
        assert!(h.script.log().iter().all(|l| !l.starts_with("delete")));
        let released: Vec<String> = h
            .script
            .log()
            .into_iter()
            .filter(|l| l.starts_with("release"))
            .collect();
        assert_eq!(released.len(), 2, "the marks go: {released:?}");
        assert!(h.db.lock().unwrap().adopted().unwrap().is_empty());
    }

    #[test]
    fn an_adoption_interrupted_after_its_mark_is_recorded_as_adopted_by_the_next_run() {
        let h = host(Script::default());
        let d = desired(&net("lan0", 1500));
        let lan0 = id(Kind::Network, "lan0");
        // The killed run got as far as the intent, the adoption record and the mark.
        {
            let db = h.db.lock().unwrap();
            db.journal_intent(&d.resources[&lan0], "adopt").unwrap();
            db.mark_adopted(&lan0).unwrap();
        }
        let pending = crate::state::pending_ids(&h.db.lock().unwrap()).unwrap();
        let observed: BTreeMap<ResourceId, Observed> = [(
            lan0.clone(),
            present(FakeDriver::project(&d.resources[&lan0])),
        )]
        .into();
        let (p, report) = h.plan_and_execute(&d, &BTreeMap::new(), &observed, &pending, &opts());
        assert_eq!(p.changes[0].action, Action::Noop);
        assert!(report.success(), "{report:?}");
        let inv = h.db.lock().unwrap().inventory().unwrap();
        assert!(inv[&lan0].adopted, "{inv:?}");
        assert_eq!(
            h.journal_last(Kind::Network, "lan0"),
            Some(("done".to_string(), None))
        );
    }

    #[test]
    fn a_retained_resource_is_forgotten_not_deleted() {
        let h = host(Script::default());
        let d = desired(&(pool("local") + &vol("keep", "1Mi", "Retain")));
        assert!(h.apply(&d, &opts()).success());
        let report = h.apply(&desired(&pool("local")), &opts());
        assert_eq!(outcome(&report, "Volume/keep").outcome, Outcome::Retained);
        assert!(h.script.log().iter().all(|l| !l.starts_with("delete")));
        assert!(
            h.script.log().iter().all(|l| !l.starts_with("release")),
            "not adopted: its mark stays"
        );
        assert_eq!(h.inventory_ids(), ["StoragePool/local"]);
    }
}
