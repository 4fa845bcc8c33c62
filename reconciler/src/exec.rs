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

use serde::Serialize;
use stead_schema::graph::edges;
use stead_schema::{Desired, Driver, Kind, Observed, ResourceId};
use tracing::{info, info_span, warn};

use crate::plan::{Action, Plan, World};
use crate::state::{InventoryEntry, StateDb};

/// How one change ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", content = "message", rename_all = "lowercase")]
pub enum Outcome {
    /// Created.
    Created,
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

/// The result of one change.
#[derive(Debug, Clone, Serialize)]
pub struct StepResult {
    /// The resource.
    pub id: ResourceId,
    /// The planned action.
    pub action: Action,
    /// How it ended.
    pub outcome: Outcome,
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

struct Sched {
    waiting_on: Vec<usize>,
    ready: VecDeque<usize>,
    running: usize,
    finished: usize,
    failed: BTreeMap<usize, ResourceId>,
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
    let index: BTreeMap<&ResourceId, usize> = changes
        .iter()
        .enumerate()
        .map(|(i, c)| (&c.id, i))
        .collect();

    // prerequisites[i] = changes that must finish before change i starts.
    let mut prereq: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); n];
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
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, ps) in prereq.iter().enumerate() {
        for &p in ps {
            dependents[p].push(i);
        }
    }
    let sched = Mutex::new(Sched {
        waiting_on: prereq.iter().map(|p| p.len()).collect(),
        ready: (0..n).filter(|&i| prereq[i].is_empty()).collect(),
        running: 0,
        finished: 0,
        failed: BTreeMap::new(),
    });
    let cv = Condvar::new();
    let results = Mutex::new(Vec::with_capacity(n));
    let steps = AtomicUsize::new(0);
    let world = World {
        desired,
        applied: inventory,
    };
    let absent = Observed::absent();

    let worker = || {
        loop {
            let (i, blocked_by) = {
                let mut s = sched.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if let Some(i) = s.ready.pop_front() {
                        s.running += 1;
                        let blocked = prereq[i].iter().find_map(|p| s.failed.get(p).cloned());
                        break (i, blocked);
                    }
                    if s.finished == n || (s.running == 0 && s.ready.is_empty()) {
                        return;
                    }
                    s = cv.wait(s).unwrap_or_else(|p| p.into_inner());
                }
            };
            let c = &changes[i];
            let start = Instant::now();
            let outcome = match blocked_by {
                Some(dep) => Outcome::Skipped(format!("dependency {dep} did not converge")),
                None => {
                    let obs = observed.get(&c.id).unwrap_or(&absent);
                    let snap = c.safety_snapshot.as_deref();
                    run_one(
                        c.action, &c.id, snap, desired, inventory, obs, drivers, db, &world,
                        &steps, opts,
                    )
                }
            };
            let result = StepResult {
                id: c.id.clone(),
                action: c.action,
                outcome,
                seconds: start.elapsed().as_secs_f64(),
            };
            on_step(&result);
            let bad = result.outcome.is_error();
            results
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(result);
            let mut s = sched.lock().unwrap_or_else(|p| p.into_inner());
            s.running -= 1;
            s.finished += 1;
            if bad {
                s.failed.insert(i, c.id.clone());
            }
            for &d in &dependents[i] {
                s.waiting_on[d] -= 1;
                if s.waiting_on[d] == 0 {
                    s.ready.push_back(d);
                }
            }
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
    desired: &Desired,
    inventory: &BTreeMap<ResourceId, InventoryEntry>,
    obs: &Observed,
    drivers: &BTreeMap<Kind, Box<dyn Driver>>,
    db: &Mutex<StateDb>,
    world: &World<'_>,
    steps: &AtomicUsize,
    opts: &ExecOptions,
) -> Outcome {
    let span = info_span!("change", resource = %id, action = action.verb());
    let _g = span.enter();
    let Some(driver) = drivers.get(&id.kind) else {
        return Outcome::Failed(format!("no driver for kind {}", id.kind));
    };
    let with_db =
        |f: &dyn Fn(&StateDb) -> Result<(), crate::state::StateError>| -> Result<(), String> {
            let g = db.lock().unwrap_or_else(|p| p.into_inner());
            f(&g).map_err(|e| error_chain(&e))
        };
    let absent = Observed::absent();
    let result: Result<Outcome, String> = (|| match action {
        Action::Noop => {
            if let Some(r) = desired.get(id) {
                let stale = inventory
                    .get(id)
                    .is_none_or(|i| i.spec_hash != r.spec_hash());
                if stale {
                    with_db(&|d| d.upsert(r))?;
                }
                with_db(&|d| d.journal_close(id, None))?;
            }
            Ok(Outcome::Unchanged)
        }
        Action::Create | Action::Update | Action::Replace => {
            let r = desired
                .get(id)
                .ok_or("resource vanished from the desired set")?;
            with_db(&|d| d.journal_begin(id, action.verb()).map(|_| ()))?;
            if action == Action::Replace {
                let old = inventory.get(id).map(|i| &i.resource).unwrap_or(r);
                take_safety_snapshot(driver.as_ref(), old, world, safety_snapshot)?;
                driver
                    .delete(old, obs, world)
                    .map_err(|e| format!("delete before re-create: {}", error_chain(&e)))?;
                driver
                    .apply(r, &absent, world)
                    .map_err(|e| error_chain(&e))?;
            } else {
                driver.apply(r, obs, world).map_err(|e| error_chain(&e))?;
            }
            with_db(&|d| {
                d.upsert(r)?;
                d.journal_close(id, None)?;
                d.event(&id.to_string(), "Normal", action_reason(action), "applied")
            })?;
            Ok(match action {
                Action::Create => Outcome::Created,
                Action::Update => Outcome::Configured,
                _ => Outcome::Replaced,
            })
        }
        Action::Delete => {
            let last = inventory
                .get(id)
                .map(|i| &i.resource)
                .ok_or("not in the inventory")?;
            with_db(&|d| d.journal_begin(id, "delete").map(|_| ()))?;
            take_safety_snapshot(driver.as_ref(), last, world, safety_snapshot)?;
            driver
                .delete(last, obs, world)
                .map_err(|e| error_chain(&e))?;
            with_db(&|d| {
                d.remove(id)?;
                d.journal_close(id, None)?;
                d.event(&id.to_string(), "Normal", "Deleted", "deleted")
            })?;
            Ok(Outcome::Deleted)
        }
        Action::Retain => {
            with_db(&|d| {
                d.remove(id)?;
                d.event(
                    &id.to_string(),
                    "Normal",
                    "Retained",
                    "left the manifests; data kept, no longer managed",
                )
            })?;
            Ok(Outcome::Retained)
        }
    })();
    let outcome = match result {
        Ok(o) => {
            info!(outcome = o.word(), "done");
            o
        }
        Err(msg) => {
            warn!(error = %msg, "failed");
            let g = db.lock().unwrap_or_else(|p| p.into_inner());
            // The journal entry stays open only if the side effect may have happened;
            // record the failure as an event either way.
            let _ = g.event(&id.to_string(), "Warning", "Failed", &msg);
            Outcome::Failed(msg)
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

fn take_safety_snapshot(
    driver: &dyn Driver,
    r: &stead_schema::Resource,
    world: &World<'_>,
    name: Option<&str>,
) -> Result<(), String> {
    let Some(name) = name else { return Ok(()) };
    driver.safety_snapshot(r, world, name).map_err(|e| {
        format!(
            "safety snapshot {name} failed, so nothing was changed: {}",
            error_chain(&e)
        )
    })?;
    info!(snapshot = name, "safety snapshot taken");
    Ok(())
}

fn action_reason(a: Action) -> &'static str {
    match a {
        Action::Create => "Created",
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
