//! The GitOps controller: follows a source (a git branch or a local directory), applies
//! every new revision, re-checks the host on an interval to heal (or report) drift, and
//! exports status and metrics.
//!
//! Shape (after kube-runtime): one reconcile at a time, driven by triggers — the git poll
//! timer, `POST /hooks/git`, debounced file-system events, the jittered resync timer and
//! per-resource backoff requeues. Triggers that arrive while a reconcile runs collapse
//! into one more run. A reconcile is blocking work (git, disk, drivers) and runs on
//! `spawn_blocking`; the runtime threads only serve HTTP and the status socket.
//!
//! A reconcile:
//! 1. fetches the source (on a fetch trigger) and, for a new head, verifies its
//!    signature (`--verify-commits`), checks it out and loads + validates it. A head that
//!    fails is *rejected* (result `invalid` / `unsigned`): the last good revision stays
//!    the desired state — an invalid set is never half-applied;
//! 2. takes the apply lock (`<state-dir>/lock`) for the duration of this reconcile only,
//!    so `stead apply`/`destroy` by hand can run in between (the controller lock
//!    `<state-dir>/controller.lock`, held for the controller's lifetime, keeps a second
//!    controller out);
//! 3. observes and plans (the reconciler API); changes marked `drift` are counted and,
//!    with `--drift=report`, dropped from the plan; resources with plan errors or in
//!    backoff are left out together with everything that depends on them;
//! 4. executes the rest, records per-resource results (backoff on failure) and updates
//!    the status document and metrics.

pub mod backoff;
pub mod env;
pub mod housekeeping;
pub mod metrics;
pub mod server;
pub mod source;
pub mod status;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use stead_reconciler::driver::{Health, HostEnv};
use stead_schema::graph::edges;
use stead_schema::{Desired, ResourceId};
use tokio::sync::Notify;
use tracing::{Instrument, debug, error, info, info_span, warn};

use stead_reconciler::exec::{ExecOptions, Outcome, Report, execute};
use stead_reconciler::plan::{Action, PlanOptions};
use stead_reconciler::state::{ApplyLock, StateDb, StateError, now_secs};
use stead_reconciler::{Drivers, plan_run};

use backoff::{Backoff, Hold, Wait};
use metrics::Metrics;
use source::{GitAuth, GitSource, Head, SourceSpec, short};
use status::{Condition, ResourceStatus, Status};

pub use housekeeping::{Housekeeping, HousekeepingError, StopSignal};

/// Controller errors (startup and fatal ones; reconcile errors go to status/metrics).
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// A file-system or socket error.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A git operation failed.
    #[error("git: {0}")]
    Git(String),
    /// The state database failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// Metrics registration failed.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// Another controller holds the controller lock.
    #[error("another stead controller is running on this state dir (lock {0} is held)")]
    AlreadyRunning(PathBuf),
    /// Bad settings.
    #[error("{0}")]
    Config(String),
}

impl ControllerError {
    pub(crate) fn io(context: String, source: std::io::Error) -> Self {
        ControllerError::Io { context, source }
    }
}

/// What to do with drift.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriftMode {
    /// Apply the manifests again (default).
    Heal,
    /// Only count and report it.
    Report,
}

/// Controller settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The source.
    pub source: SourceSpec,
    /// Git poll interval.
    pub interval: Duration,
    /// Resync (drift check) interval; jittered by ±10 %.
    pub resync: Duration,
    /// Quiet time before file-system events trigger a reconcile.
    pub debounce: Duration,
    /// Heal or report drift.
    pub drift: DriftMode,
    /// HTTP address for `/metrics`, `/healthz`, `/readyz`, `/hooks/git`.
    pub listen: SocketAddr,
    /// Webhook token; `None` disables `/hooks/git`.
    pub webhook_token: Option<String>,
    /// Keyring (SSH allowed-signers file or OpenPGP keyring): apply signed heads only.
    pub verify_commits: Option<PathBuf>,
    /// Git credentials.
    pub auth: GitAuth,
    /// Do not prune.
    pub no_prune: bool,
    /// Accept a revision with no manifests (prunes everything it owned).
    pub allow_empty: bool,
    /// Accept a git head that does not descend from the revision applied last.
    pub allow_rewind: bool,
    /// Changes run at once.
    pub parallelism: usize,
    /// First retry delay after a failed change (doubles up to `backoff_cap`).
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_cap: Duration,
}

impl Config {
    /// Defaults for `source`: poll 60 s, resync 60 s, heal, 127.0.0.1:9464.
    pub fn new(source: SourceSpec) -> Self {
        Config {
            source,
            interval: Duration::from_secs(60),
            resync: Duration::from_secs(60),
            debounce: Duration::from_millis(200),
            drift: DriftMode::Heal,
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            webhook_token: None,
            verify_commits: None,
            auth: GitAuth::default(),
            no_prune: false,
            allow_empty: false,
            allow_rewind: false,
            parallelism: 4,
            backoff_base: Duration::from_secs(2),
            backoff_cap: Duration::from_secs(300),
        }
    }
}

/// Quiet time after a trigger before the run starts, so that a burst collapses.
const BURST_SETTLE: Duration = Duration::from_millis(100);
/// Longest a steady stream of triggers can hold a run back.
const BURST_MAX: Duration = Duration::from_secs(1);

/// Wakes the loop; `fetch` asks for a source fetch.
pub(crate) struct Trigger {
    notify: Notify,
    fetch: AtomicBool,
}

impl Trigger {
    pub(crate) fn fire(&self, fetch: bool) {
        if fetch {
            self.fetch.store(true, Ordering::SeqCst);
        }
        self.notify.notify_one();
    }

    fn take_fetch(&self) -> bool {
        self.fetch.swap(false, Ordering::SeqCst)
    }
}

/// The context shared by the loop, the HTTP server and the status socket.
pub(crate) struct Shared {
    pub(crate) metrics: Metrics,
    pub(crate) status: RwLock<Status>,
    pub(crate) trigger: Trigger,
    pub(crate) webhook_token: Option<String>,
    pub(crate) busy_since: Mutex<Option<Instant>>,
    /// Held by a reconcile and by an environment teardown: one at a time, since both
    /// drive the drivers (whose ownership scope is process-wide).
    pub(crate) work: Mutex<()>,
}

/// A seed for jitter and temp names (time and pid; not for cryptography).
pub(crate) fn jitter_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut x = t ^ (u64::from(std::process::id()) << 32) ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x
}

/// `d` ± 10 %.
fn jittered(d: Duration) -> Duration {
    let frac = (jitter_seed() % 1000) as f64 / 1000.0; // 0..1
    d.mul_f64(0.9 + 0.2 * frac)
}

enum Source {
    Git(GitSource),
    Dir(PathBuf),
}

struct Loaded {
    revision: String,
    desired: Desired,
}

struct Rejected {
    revision: String,
    result: &'static str,
    message: String,
}

/// The reconcile state, moved into `spawn_blocking` for each run.
struct Engine {
    cfg: Config,
    env: HostEnv,
    drivers: Drivers,
    db: Mutex<StateDb>,
    source: Source,
    head: Option<Head>,
    good: Option<Loaded>,
    rejected: Option<Rejected>,
    backoff: Backoff,
    drifted: BTreeSet<ResourceId>,
    conditions: BTreeMap<ResourceId, ResourceStatus>,
    shared: Arc<Shared>,
    runs: u64,
    restored: bool,
}

const KV_REVISION: &str = "controller.revision";

/// What a terminal hold of `id` is checked against: its spec hash (desired, or last
/// applied for a delete) and a fingerprint of what observe saw of it and of the resources
/// it references (existence, ownership and state; not runtime status, which moves on its
/// own). A fix on the host — of the object or of what it depends on — releases the hold.
fn hold_key(
    id: &ResourceId,
    desired: &Desired,
    inventory: &BTreeMap<ResourceId, stead_reconciler::InventoryEntry>,
    observed: &BTreeMap<ResourceId, stead_reconciler::driver::Observed>,
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
fn waiting_condition(wait: &Wait, b: &backoff::Entry) -> (String, String) {
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

impl Engine {
    fn fetch_head(&mut self) -> Result<Head, ControllerError> {
        match &self.source {
            Source::Git(g) => g.fetch(),
            Source::Dir(d) => {
                let rev = source::dir_revision(d)?;
                Ok(Head {
                    revision: rev[..40].to_string(),
                    message: String::new(),
                })
            }
        }
    }

    /// Verifies, checks out and loads `rev`. Errors carry the result label.
    fn load(&self, rev: &str) -> Result<Desired, (&'static str, String)> {
        let dir = match &self.source {
            Source::Git(g) => {
                if !self.cfg.allow_rewind
                    && let Some(last) = self.last_applied()
                {
                    g.check_fast_forward(&last, rev)
                        .map_err(|m| ("invalid", m))?;
                }
                if let Some(keyring) = &self.cfg.verify_commits {
                    let who = g.verify(rev, keyring).map_err(|m| ("unsigned", m))?;
                    info!(revision = short(rev), signer = %who, "signature verified");
                }
                g.checkout(rev).map_err(|e| ("invalid", e.to_string()))?
            }
            Source::Dir(d) => d.clone(),
        };
        let desired =
            stead_schema::load_and_validate(std::slice::from_ref(&dir)).map_err(|diags| {
                let n = diags.len();
                let mut lines: Vec<String> = diags
                    .iter()
                    .take(20)
                    .map(|d| {
                        let mut d = d.clone();
                        if let Ok(rel) = d.file.strip_prefix(&dir) {
                            d.file = rel.to_path_buf();
                        }
                        d.to_string()
                    })
                    .collect();
                if n > 20 {
                    lines.push(format!("… and {} more", n - 20));
                }
                (
                    "invalid",
                    format!("{n} error(s) in the manifests:\n{}", lines.join("\n")),
                )
            })?;
        if desired.is_empty() && !self.cfg.allow_empty {
            return Err((
                "invalid",
                "no manifests found (an empty revision would prune everything; pass --allow-empty to accept it)".into(),
            ));
        }
        Ok(desired)
    }

    /// The revision loaded last (in memory), else the one applied last (state DB).
    fn last_applied(&self) -> Option<String> {
        if let Some(g) = &self.good {
            return Some(g.revision.clone());
        }
        let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        db.get_kv(KV_REVISION).ok().flatten()
    }

    /// After a restart with an invalid head: the last good revision from the state DB.
    fn restore_last_good(&mut self) {
        if self.restored || self.good.is_some() {
            return;
        }
        self.restored = true;
        let Source::Git(_) = &self.source else { return };
        let rev = {
            let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
            db.get_kv(KV_REVISION).ok().flatten()
        };
        let Some(rev) = rev else { return };
        match self.load(&rev) {
            Ok(desired) => {
                info!(
                    revision = short(&rev),
                    "keeping the last good revision applied"
                );
                self.good = Some(Loaded {
                    revision: rev,
                    desired,
                });
            }
            Err((_, msg)) => {
                warn!(revision = short(&rev), error = %msg, "cannot reload the last good revision")
            }
        }
    }

    /// One reconcile. Returns a requeue delay sooner than the resync, if one is due.
    fn reconcile(&mut self, fetch: bool) -> Option<Duration> {
        self.runs += 1;
        let span = info_span!(
            "reconcile",
            n = self.runs,
            fetch,
            revision = tracing::field::Empty
        );
        let _g = span.enter();
        let start = Instant::now();
        let shared = self.shared.clone();
        let m = &shared.metrics;
        let mut result: Option<&'static str> = None;
        let mut messages: Vec<String> = Vec::new();

        // 1. Source.
        if fetch || self.head.is_none() || matches!(self.source, Source::Dir(_)) {
            let t = Instant::now();
            match self.fetch_head() {
                Ok(h) => {
                    m.fetch_duration
                        .with_label_values(&["success"])
                        .observe(t.elapsed().as_secs_f64());
                    if self.head.as_ref().map(|x| &x.revision) != Some(&h.revision) {
                        info!(revision = short(&h.revision), message = %h.message, "source head");
                    }
                    self.set_status(|s| s.fetch_error = None);
                    self.head = Some(h);
                }
                Err(e) => {
                    m.fetch_duration
                        .with_label_values(&["error"])
                        .observe(t.elapsed().as_secs_f64());
                    m.fetch_errors.inc();
                    let msg = e.to_string();
                    warn!(error = %msg, "fetch failed");
                    self.set_status(|s| s.fetch_error = Some(msg.clone()));
                    messages.push(format!("fetch: {msg}"));
                    // After a restart with the remote unreachable: keep healing against
                    // the revision applied last.
                    self.restore_last_good();
                    if self.good.is_none() {
                        result = Some("error");
                    }
                }
            }
        }
        if let Some(head) = self.head.clone() {
            let known = self
                .good
                .as_ref()
                .is_some_and(|g| g.revision == head.revision)
                || self
                    .rejected
                    .as_ref()
                    .is_some_and(|r| r.revision == head.revision);
            if !known {
                match self.load(&head.revision) {
                    Ok(desired) => {
                        info!(
                            revision = short(&head.revision),
                            resources = desired.len(),
                            "new revision loaded"
                        );
                        self.good = Some(Loaded {
                            revision: head.revision.clone(),
                            desired,
                        });
                        self.rejected = None;
                        self.backoff.reset();
                    }
                    Err((res, msg)) => {
                        warn!(revision = short(&head.revision), result = res, error = %msg, "revision rejected; the last good revision stays applied");
                        {
                            let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
                            let _ = db.event(
                                "",
                                "Warning",
                                if res == "unsigned" {
                                    "Unsigned"
                                } else {
                                    "Invalid"
                                },
                                &format!("revision {}: {msg}", short(&head.revision)),
                            );
                        }
                        self.rejected = Some(Rejected {
                            revision: head.revision.clone(),
                            result: res,
                            message: msg,
                        });
                        result = Some(res);
                        self.restore_last_good();
                    }
                }
            }
        }
        let rejected = self
            .rejected
            .as_ref()
            .filter(|r| Some(&r.revision) == self.head.as_ref().map(|h| &h.revision));
        let (head_rev, head_error) = (
            self.head.as_ref().map(|h| h.revision.clone()),
            rejected.map(|r| format!("{}: {}", r.result, r.message)),
        );
        self.set_status(|s| {
            s.head_revision = head_rev;
            s.head_error = head_error;
        });

        let Some(good) = self.good.as_ref() else {
            let res = result.unwrap_or("error");
            if messages.is_empty() {
                messages.push("no revision could be loaded yet".into());
            }
            self.finish(res, start, messages.join("; "), false, |_| {});
            return None;
        };
        span.record("revision", short(&good.revision));
        let revision = good.revision.clone();

        // 2. Lock, observe, plan.
        let lock = match ApplyLock::acquire(&self.env.state_dir, Duration::from_secs(10)) {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "apply lock busy; retrying in 5s");
                self.finish(
                    result.unwrap_or("error"),
                    start,
                    e.to_string(),
                    false,
                    |_| {},
                );
                return Some(Duration::from_secs(5));
            }
        };
        let planned = {
            let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
            plan_run(
                &self.drivers,
                &good.desired,
                &db,
                PlanOptions {
                    no_prune: self.cfg.no_prune,
                    allow_data_loss: false,
                },
            )
        };
        let mut run = match planned {
            Ok(r) => r,
            Err(e) => {
                error!(error = %stead_reconciler::exec::error_chain(&e), "cannot plan");
                self.finish(
                    result.unwrap_or("error"),
                    start,
                    e.to_string(),
                    false,
                    |_| {},
                );
                return Some(Duration::from_secs(5));
            }
        };

        // Drift.
        let drift: BTreeMap<ResourceId, String> = run
            .plan
            .changes
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
            .collect();
        for (id, what) in &drift {
            if !self.drifted.contains(id) {
                m.drift_detected
                    .with_label_values(&[id.kind.as_str()])
                    .inc();
                warn!(resource = %id, drift = %what, mode = ?self.cfg.drift, "drift detected");
                let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
                let _ = db.event(&id.to_string(), "Warning", "Drift", what);
            }
        }
        if self.cfg.drift == DriftMode::Report {
            run.plan.changes.retain(|c| !c.drift);
        }

        // Leave out plan errors, resources in backoff and their dependents.
        let now = Instant::now();
        let mut blocked: BTreeMap<ResourceId, (String, String)> = BTreeMap::new();
        for e in &run.plan.errors {
            blocked.insert(e.id.clone(), ("PlanError".into(), e.message.clone()));
        }
        for c in &run.plan.changes {
            if c.action == Action::Noop {
                continue;
            }
            let current = hold_key(&c.id, &good.desired, &run.inventory, &run.observed);
            if let Some((wait, b)) = self.backoff.waiting(&c.id, now, &current) {
                blocked
                    .entry(c.id.clone())
                    .or_insert_with(|| waiting_condition(&wait, b));
            }
        }
        if !blocked.is_empty() {
            let es = edges(good.desired.resources.values());
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
            run.plan.changes.retain(|c| !blocked.contains_key(&c.id));
        }

        // 3. Execute.
        let report = if run.plan.has_changes() {
            let summary: Vec<String> = run
                .plan
                .summary()
                .iter()
                .filter(|(a, _)| **a != Action::Noop)
                .map(|(a, n)| format!("{n} {}", a.verb()))
                .collect();
            info!(changes = %summary.join(", "), "applying");
            execute(
                &run.plan,
                &good.desired,
                &run.inventory,
                &run.observed,
                &self.drivers,
                &self.db,
                &ExecOptions {
                    parallelism: self.cfg.parallelism,
                    pause_after_steps: None,
                },
                &|_| {},
            )
        } else {
            Report::default()
        };
        drop(lock);

        let mut failed: BTreeMap<ResourceId, (String, String)> = BTreeMap::new();
        let mut applied: BTreeMap<ResourceId, Action> = BTreeMap::new();
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
                        let hold = hold_key(&r.id, &good.desired, &run.inventory, &run.observed);
                        self.backoff.failed_terminal(&r.id, reason, msg, hold);
                        warn!(resource = %r.id, error = %msg, reason, "change failed; not retried until the manifest or the host changes");
                        failed.insert(r.id.clone(), (reason.to_string(), msg.clone()));
                    } else {
                        let delay = self.backoff.failed(&r.id, reason, msg, Instant::now());
                        warn!(resource = %r.id, error = %msg, reason, retry_in = ?delay, "change failed");
                        failed.insert(r.id.clone(), ("ApplyFailed".into(), msg.clone()));
                    }
                }
                _ => {
                    self.backoff.succeeded(&r.id);
                    if r.action != Action::Noop {
                        let action = match r.action {
                            Action::Create => "create",
                            Action::Update => "update",
                            Action::Replace => "replace",
                            Action::Delete => "delete",
                            Action::Retain => "retain",
                            Action::Noop => "noop",
                        };
                        m.apply_changes
                            .with_label_values(&[r.id.kind.as_str(), action])
                            .inc();
                        applied.insert(r.id.clone(), r.action);
                    }
                }
            }
        }
        self.drifted = match self.cfg.drift {
            DriftMode::Report => drift.keys().cloned().collect(),
            DriftMode::Heal => drift
                .keys()
                .filter(|id| !applied.contains_key(*id))
                .cloned()
                .collect(),
        };

        // 4. Status and metrics.
        let t = now_secs();
        let mut new_conditions = BTreeMap::new();
        let mut counts: BTreeMap<(stead_schema::Kind, &'static str), usize> = BTreeMap::new();
        let mut usage = Vec::new();
        let mut failed_metric = Vec::new();
        for id in good.desired.resources.keys() {
            let obs = run.observed.get(id);
            let (word, reason, message): (&'static str, String, String) =
                if let Some((reason, msg)) = blocked.get(id) {
                    ("Failed", reason.clone(), msg.clone())
                } else if let Some((reason, msg)) = failed.get(id) {
                    ("Failed", reason.clone(), msg.clone())
                } else if self.cfg.drift == DriftMode::Report && drift.contains_key(id) {
                    ("Drifted", "Drifted".into(), drift[id].clone())
                } else if let Some(a) = applied.get(id) {
                    (
                        "Ready",
                        "Applied".into(),
                        format!("{} at {}", a.verb(), short(&revision)),
                    )
                } else {
                    match obs.map(|o| &o.health) {
                        Some(Health::Ready) | None => ("Ready", "Converged".into(), String::new()),
                        Some(Health::Progressing) => {
                            ("Progressing", "Progressing".into(), String::new())
                        }
                        Some(Health::Degraded(m)) => ("Failed", "Degraded".into(), m.clone()),
                        Some(Health::Failed(m)) => ("Failed", "Unhealthy".into(), m.clone()),
                    }
                };
            *counts.entry((id.kind, word)).or_insert(0) += 1;
            if word == "Failed" {
                failed_metric.push((id.kind, id.name.clone(), reason.clone()));
            }
            let prev = self.conditions.get(id);
            let cond = |type_: &str, status: &str| {
                let since = prev
                    .and_then(|p| {
                        p.conditions
                            .iter()
                            .find(|c| c.type_ == type_ && c.status == status && c.reason == reason)
                    })
                    .map(|c| c.last_transition_time)
                    .unwrap_or(t);
                Condition {
                    type_: type_.into(),
                    status: status.into(),
                    reason: reason.clone(),
                    message: message.clone(),
                    last_transition_time: since,
                }
            };
            let mut conditions = vec![cond(
                "Ready",
                if word == "Ready" { "True" } else { "False" },
            )];
            match word {
                "Progressing" => conditions.push(cond("Progressing", "True")),
                "Failed" => conditions.push(cond("Failed", "True")),
                _ => {}
            }
            new_conditions.insert(
                id.clone(),
                ResourceStatus {
                    kind: id.kind.as_str().into(),
                    name: id.name.clone(),
                    status: word.into(),
                    conditions,
                },
            );
            if let Some(o) = obs {
                let num = |k: &str| o.status.get(k).and_then(Value::as_f64);
                // Drivers write camelCase (`cpuSeconds`); snake_case is accepted too.
                let cpu = num("cpuSeconds").or_else(|| num("cpu_seconds"));
                let mem = num("memoryBytes").or_else(|| num("memory_bytes"));
                if cpu.is_some() || mem.is_some() {
                    usage.push((id.kind, id.name.clone(), cpu, mem));
                }
            }
        }
        self.conditions = new_conditions;
        m.set_resources(&counts);
        m.set_failed(&failed_metric);
        m.set_workloads(&usage);

        let apply_ok = blocked.is_empty() && failed.is_empty();
        if !apply_ok {
            let n = blocked.len() + failed.len();
            messages.push(format!("{n} resource(s) not converged"));
        }
        let res = result.unwrap_or(if apply_ok { "success" } else { "failed" });
        let first_apply_of_rev = {
            let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
            let prev = db.get_kv(KV_REVISION).ok().flatten();
            if prev.as_deref() != Some(revision.as_str()) {
                let _ = db.set_kv(KV_REVISION, &revision);
                let _ = db.event(
                    "",
                    "Normal",
                    "Revision",
                    &format!("applied revision {}", short(&revision)),
                );
                true
            } else {
                false
            }
        };
        if first_apply_of_rev && let Source::Git(g) = &self.source {
            let head = self
                .head
                .as_ref()
                .map(|h| h.revision.clone())
                .unwrap_or_default();
            g.clean(&[revision.as_str(), head.as_str()]);
        }
        m.set_revision(&revision);
        let resources: Vec<ResourceStatus> = self.conditions.values().cloned().collect();
        m.ready.set(1.0);
        // One status update, so readers never see the new revision with the old result.
        self.finish(res, start, messages.join("; "), apply_ok, |s| {
            s.revision = Some(revision.clone());
            s.last_apply_time = Some(t);
            s.ready = true;
            s.resources = resources;
        });
        let now = Instant::now();
        self.backoff
            .next_due(now)
            .map(|d| d.saturating_duration_since(now))
    }

    fn finish(
        &self,
        result: &'static str,
        start: Instant,
        message: String,
        success: bool,
        extra: impl FnOnce(&mut Status),
    ) {
        let secs = start.elapsed().as_secs_f64();
        info!(result, seconds = secs, "reconciled");
        let runs = self.runs;
        // Status first, then metrics: whoever sees the counter move sees the status too.
        self.set_status(|s| {
            extra(s);
            s.last_result = Some(result.into());
            s.message = message;
            s.last_reconcile_time = Some(now_secs());
            s.reconciles = runs;
        });
        if success {
            self.shared.metrics.last_success.set(now_secs());
        }
        self.shared.metrics.reconciled(result, secs);
    }

    fn set_status(&self, f: impl FnOnce(&mut Status)) {
        let mut s = self
            .shared
            .status
            .write()
            .unwrap_or_else(|p| p.into_inner());
        f(&mut s);
    }
}

/// Holds `<state-dir>/controller.lock` for the controller's lifetime.
/// The guard is the open file: the `flock` is released when it is closed.
fn controller_lock(state_dir: &Path) -> Result<File, ControllerError> {
    stead_reconciler::state::ensure_state_dir(state_dir)?;
    let path = state_dir.join("controller.lock");
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| ControllerError::io(format!("open {}", path.display()), e))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(ControllerError::AlreadyRunning(path)),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(ControllerError::io(format!("lock {}", path.display()), e))
        }
    }
}

/// Runs the controller until SIGTERM/SIGINT, on a private current-thread runtime.
/// Workloads are left running on exit; a restart picks up from the state DB.
/// `housekeeping` runs the backup schedules and collects expired environments.
pub fn run(
    cfg: Config,
    env: HostEnv,
    drivers: Drivers,
    housekeeping: Arc<dyn Housekeeping>,
) -> Result<(), ControllerError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(4)
        .thread_name("stead-controller")
        .build()
        .map_err(|e| ControllerError::io("cannot start the async runtime".into(), e))?;
    rt.block_on(run_async(cfg, env, drivers, housekeeping))
}

async fn run_async(
    cfg: Config,
    env: HostEnv,
    drivers: Drivers,
    hk: Arc<dyn Housekeeping>,
) -> Result<(), ControllerError> {
    use tokio::signal::unix::{SignalKind, signal};

    if cfg.verify_commits.is_some() && matches!(cfg.source, SourceSpec::Dir(_)) {
        return Err(ControllerError::Config(
            "--verify-commits needs a git source".into(),
        ));
    }
    let _controller_lock = controller_lock(&env.state_dir)?;
    let db = StateDb::open(&env.state_dir)?;
    let source = match &cfg.source {
        SourceSpec::Git {
            url,
            branch,
            subdir,
        } => Source::Git(GitSource::new(
            url.clone(),
            branch.clone(),
            subdir.clone(),
            &env.state_dir,
            cfg.auth.clone(),
        )),
        SourceSpec::Dir(d) => {
            let d = std::fs::canonicalize(d)
                .map_err(|e| ControllerError::io(format!("source directory {}", d.display()), e))?;
            Source::Dir(d)
        }
    };
    source::describe(&cfg.source);
    let shared = Arc::new(Shared {
        metrics: Metrics::new()?,
        status: RwLock::new(Status {
            source: cfg.source.to_string(),
            drift_mode: match cfg.drift {
                DriftMode::Heal => "heal".into(),
                DriftMode::Report => "report".into(),
            },
            ..Status::default()
        }),
        trigger: Trigger {
            notify: Notify::new(),
            fetch: AtomicBool::new(false),
        },
        webhook_token: cfg.webhook_token.clone(),
        busy_since: Mutex::new(None),
        work: Mutex::new(()),
    });

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| ControllerError::io(format!("listen on {}", cfg.listen), e))?;
    let local = listener
        .local_addr()
        .map_err(|e| ControllerError::io("local address".into(), e))?;
    info!(addr = %local, "serving /metrics /healthz /readyz /hooks/git");
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let http = {
        let app = server::router(shared.clone());
        tokio::spawn(async move {
            let r = axum::serve(
                server::limited(listener, server::HttpLimits::default()),
                app,
            )
            .with_graceful_shutdown(async move {
                let _ = stop_rx.wait_for(|v| *v).await;
            })
            .await;
            if let Err(e) = r {
                error!(error = %e, "http server");
            }
        })
    };
    let (sock, sock_path) = server::bind_status_socket(&env.run_dir)?;
    info!(socket = %sock_path.display(), "serving status");
    let status_task = tokio::spawn(server::serve_status(sock, shared.clone()));

    // File-system events of a directory source, debounced.
    let _watcher = if let Source::Dir(d) = &source {
        use notify::Watcher;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if let Ok(ev) = ev
                && !matches!(ev.kind, notify::EventKind::Access(_))
            {
                let _ = tx.send(());
            }
        })
        .map_err(|e| ControllerError::Config(format!("cannot watch {}: {e}", d.display())))?;
        w.watch(d, notify::RecursiveMode::Recursive)
            .map_err(|e| ControllerError::Config(format!("cannot watch {}: {e}", d.display())))?;
        let debounce = cfg.debounce;
        let sh = shared.clone();
        tokio::spawn(
            async move {
                while rx.recv().await.is_some() {
                    // Wait for a quiet period so an editor's or a sync's burst is one run.
                    while let Ok(Some(())) = tokio::time::timeout(debounce, rx.recv()).await {}
                    debug!("source directory changed");
                    sh.trigger.fire(true);
                }
            }
            .instrument(info_span!("watch")),
        );
        Some(w)
    } else {
        None
    };

    let mut sigterm = signal(SignalKind::terminate())
        .map_err(|e| ControllerError::io("SIGTERM handler".into(), e))?;
    let mut sigint = signal(SignalKind::interrupt())
        .map_err(|e| ControllerError::io("SIGINT handler".into(), e))?;

    let housekeeping = tokio::spawn(
        housekeeping::housekeeping_task(
            shared.clone(),
            hk,
            housekeeping::Paths::new(&env.state_dir),
            cfg.resync.min(Duration::from_secs(30)),
        )
        .instrument(info_span!("housekeeping")),
    );
    let is_git = matches!(source, Source::Git(_));
    let mut engine = Some(Engine {
        backoff: Backoff::new(cfg.backoff_base, cfg.backoff_cap),
        cfg: cfg.clone(),
        env,
        drivers,
        db: Mutex::new(db),
        source,
        head: None,
        good: None,
        rejected: None,
        drifted: BTreeSet::new(),
        conditions: BTreeMap::new(),
        shared: shared.clone(),
        runs: 0,
        restored: false,
    });

    shared.trigger.fire(true);
    let far = Duration::from_secs(86400 * 365);
    let mut next_resync = tokio::time::Instant::now() + jittered(cfg.resync);
    let mut next_poll = tokio::time::Instant::now() + if is_git { cfg.interval } else { far };
    let mut requeue: Option<tokio::time::Instant> = None;
    let mut stopping = false;
    while !stopping {
        let wake = requeue
            .into_iter()
            .chain([next_resync, next_poll])
            .min()
            .unwrap_or(next_resync);
        let triggered = tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = shared.trigger.notify.notified() => true,
            _ = tokio::time::sleep_until(wake) => false,
        };
        if triggered {
            // A burst of webhook calls (a forge sends one per pushed ref) or of pushes
            // collapses into one run: wait until triggers stop for `BURST_SETTLE`, but
            // never longer than `BURST_MAX` in all.
            let cap = tokio::time::Instant::now() + BURST_MAX;
            loop {
                let quiet = (tokio::time::Instant::now() + BURST_SETTLE).min(cap);
                tokio::select! {
                    _ = sigterm.recv() => { stopping = true; break }
                    _ = sigint.recv() => { stopping = true; break }
                    _ = shared.trigger.notify.notified() => {}
                    _ = tokio::time::sleep_until(quiet) => break,
                }
                if tokio::time::Instant::now() >= cap {
                    break;
                }
            }
            if stopping {
                break;
            }
        }
        let now = tokio::time::Instant::now();
        let mut fetch = shared.trigger.take_fetch();
        if now >= next_poll {
            fetch = true;
        }
        if fetch && is_git {
            next_poll = now + cfg.interval;
        }
        let Some(mut e) = engine.take() else { break };
        *shared.busy_since.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        let mut task = tokio::task::spawn_blocking(move || {
            let shared = e.shared.clone();
            let _work = shared.work.lock().unwrap_or_else(|p| p.into_inner());
            let next = e.reconcile(fetch);
            (e, next)
        });
        let joined = tokio::select! {
            r = &mut task => r,
            _ = sigterm.recv() => { stopping = true; info!("SIGTERM: finishing the running reconcile"); task.await }
            _ = sigint.recv() => { stopping = true; info!("SIGINT: finishing the running reconcile"); task.await }
        };
        *shared.busy_since.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let (e, next) = match joined {
            Ok(x) => x,
            Err(err) => {
                error!(error = %err, "reconcile panicked");
                let _ = stop_tx.send(true);
                return Err(ControllerError::Config(format!(
                    "reconcile panicked: {err}"
                )));
            }
        };
        engine = Some(e);
        // Every reconcile observes everything: the resync clock restarts.
        next_resync = tokio::time::Instant::now() + jittered(cfg.resync);
        requeue = next.map(|d| tokio::time::Instant::now() + d.max(Duration::from_millis(100)));
    }
    info!("shutting down; workloads keep running");
    let _ = stop_tx.send(true);
    let _ = http.await;
    status_task.abort();
    housekeeping.abort();
    let _ = std::fs::remove_file(&sock_path);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh shared context for tests.
    pub(crate) fn shared() -> Arc<Shared> {
        Arc::new(Shared {
            metrics: Metrics::new().expect("metrics"),
            status: RwLock::new(Status::default()),
            trigger: Trigger {
                notify: Notify::new(),
                fetch: AtomicBool::new(false),
            },
            webhook_token: None,
            busy_since: Mutex::new(None),
            work: Mutex::new(()),
        })
    }

    #[test]
    fn a_second_controller_is_refused_until_the_first_lock_is_closed() {
        let t = tempfile::tempdir().expect("tmp");
        let first = controller_lock(t.path()).expect("first");
        assert!(matches!(
            controller_lock(t.path()),
            Err(ControllerError::AlreadyRunning(_))
        ));
        drop(first);
        assert!(controller_lock(t.path()).is_ok());
    }
    use serde_json::json;
    use stead_reconciler::driver::Observed;
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

    #[test]
    fn terminal_hold_key_follows_spec_the_object_and_its_dependencies() {
        let v = ResourceId::new(Kind::Volume, "v");
        let (pool, net) = (
            ResourceId::new(Kind::StoragePool, "p"),
            ResourceId::new(Kind::Network, "n"),
        );
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
}
