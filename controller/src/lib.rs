//! The GitOps controller: follows a source (a git branch or a local directory), applies
//! every new revision, re-checks the host on an interval to heal (or report) drift, and
//! exports status and metrics.
//!
//! Shape (after kube-runtime): one reconcile at a time, driven by triggers — the git poll
//! timer, `POST /hooks/git`, debounced file-system events, the jittered resync timer and
//! per-resource backoff requeues. Triggers that arrive while a reconcile runs collapse
//! into one more run. A reconcile is blocking work (git, disk, drivers) and runs on
//! `spawn_blocking`, as does each housekeeping round ([`housekeeping`]); the runtime's one
//! thread only serves HTTP and the status socket, debounces file-system events and keeps
//! the timers. The blocking start (controller lock, state DB) runs before the runtime.
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
//!    backoff are left out together with everything that depends on them (`gate.rs`);
//! 4. executes the rest, records per-resource results (backoff on failure) and updates
//!    the status document ([`status`]) and metrics.

pub mod api;
pub mod auth;
pub mod backoff;
pub mod env;
pub mod events;
mod gate;
pub mod housekeeping;
pub mod metrics;
pub mod server;
pub mod source;
pub mod status;
pub mod ui;
pub mod view;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use stead_reconciler::driver::{HostEnv, Observed};
use stead_schema::{Desired, ResourceId};
use tokio::sync::Notify;
use tracing::{Instrument, debug, error, info, info_span, warn};

use stead_reconciler::exec::{ExecOptions, Report, execute};
use stead_reconciler::plan::{Action, PlanOptions};
use stead_reconciler::state::{ApplyLock, StateDb, StateError, now_secs};
use stead_reconciler::{Drivers, PlannedRun, plan_run};

use backoff::Backoff;
use metrics::Metrics;
use source::{GitAuth, GitSource, Head, SourceSpec, short};
use status::{ResourceStatus, Status};

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
    /// Manual sync: a new head is planned and shown, and applied only when an operator
    /// asks (`POST /api/v1/actions/sync`). Drift is still healed against the applied
    /// revision. The first revision on a fresh state dir is applied at once.
    pub manual_sync: bool,
    /// A plan-only branch of the git source (`--plan-branch`): its head is planned
    /// against the host after each reconcile and shown beside the pending change, never
    /// applied.
    pub plan_branch: Option<String>,
    /// The web UI and `/api/v1` (`--ui`); `None`: both are absent.
    pub ui: Option<auth::UiConfig>,
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
            manual_sync: false,
            plan_branch: None,
            ui: None,
        }
    }
}

/// A trigger within this time of the one before it, while that one still waits for its
/// run, is part of a burst: the run waits for this much quiet first, so that the burst
/// collapses. Any other trigger runs at once.
const BURST_SETTLE: Duration = Duration::from_millis(100);
/// Longest a steady stream of triggers can hold a run back.
const BURST_MAX: Duration = Duration::from_secs(1);

/// Wakes the loop; `fetch` asks for a source fetch.
pub(crate) struct Trigger {
    notify: Notify,
    fetch: AtomicBool,
    fires: Mutex<Fires>,
}

/// When the last two triggers came, and when the last run started.
#[derive(Debug, Default, Clone, Copy)]
struct Fires {
    previous: Option<Instant>,
    last: Option<Instant>,
    run_started: Option<Instant>,
}

impl Fires {
    fn record(&mut self, now: Instant) {
        self.previous = self.last.replace(now);
    }

    /// Whether the last trigger is part of a burst: it came within `BURST_SETTLE` of the
    /// one before it, and that one has not been served by a run yet (it came after the
    /// last run started).
    fn in_burst(&self) -> bool {
        let (Some(p), Some(l)) = (self.previous, self.last) else {
            return false;
        };
        l.saturating_duration_since(p) < BURST_SETTLE && self.run_started.is_none_or(|s| p > s)
    }
}

impl Trigger {
    fn new() -> Self {
        Trigger {
            notify: Notify::new(),
            fetch: AtomicBool::new(false),
            fires: Mutex::new(Fires::default()),
        }
    }

    pub(crate) fn fire(&self, fetch: bool) {
        if fetch {
            self.fetch.store(true, Ordering::SeqCst);
        }
        self.fires
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(Instant::now());
        self.notify.notify_one();
    }

    /// Whether the latest trigger is part of a burst (see [`BURST_SETTLE`]).
    fn in_burst(&self) -> bool {
        self.fires
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .in_burst()
    }

    /// A run starts now: it serves every trigger so far.
    fn run_starting(&self) {
        self.fires
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .run_started = Some(Instant::now());
    }

    pub(crate) fn take_fetch(&self) -> bool {
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
    /// The event log (file-backed with `--ui`).
    pub(crate) events: events::EventLog,
    /// What the last reconcile saw and planned (kept with `--ui` only).
    pub(crate) snapshot: RwLock<Option<Arc<view::Snapshot>>>,
    /// The source head's commit details (kept with `--ui` only).
    pub(crate) head_info: RwLock<Option<view::RevisionInfo>>,
    /// The UI's authentication state; `None` without `--ui`.
    pub(crate) ui: Option<auth::UiAuth>,
    /// An operator asked to apply the head (manual sync).
    pub(crate) sync_requested: AtomicBool,
    /// `auto` or `manual`.
    pub(crate) sync_mode: &'static str,
    /// Operator actions on workloads and backups (set when the controller runs).
    pub(crate) housekeeping: Option<Arc<dyn Housekeeping>>,
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
    desired: Arc<Desired>,
    /// Commit details and signature status, for the UI.
    info: view::RevisionInfo,
}

/// What a run's gate and execution decided, for its status.
struct Ran {
    /// Drift found by the plan.
    drift: BTreeMap<ResourceId, String>,
    /// Left out of the run (or skipped for a dependency).
    blocked: gate::Blocked,
    /// Failed and applied changes.
    results: gate::RunResults,
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
    good: Option<Arc<Loaded>>,
    rejected: Option<Rejected>,
    backoff: Backoff,
    drifted: BTreeSet<ResourceId>,
    conditions: BTreeMap<ResourceId, ResourceStatus>,
    shared: Arc<Shared>,
    runs: u64,
    restored: bool,
    /// A head waiting for an operator's sync (manual sync).
    proposed: Option<Arc<Loaded>>,
    /// The plan-only branch's head, loaded (`--plan-branch`).
    branch_head: Option<Arc<Loaded>>,
    /// The resources' live statuses last sent to subscribers.
    last_nodes: Vec<view::NodeStatus>,
}

const KV_REVISION: &str = "controller.revision";

/// A head waiting for a sync, with its plan.
type ProposedPlan = (view::RevisionInfo, stead_reconciler::plan::Plan);
/// The plan-only branch's name, head and plan.
type BranchPlanned = (String, view::RevisionInfo, stead_reconciler::plan::Plan);

/// A reconcile's result label, if decided before the apply (a rejected revision, a
/// failed fetch), and the messages for the status.
#[derive(Debug, Default)]
struct RunLog {
    result: Option<&'static str>,
    messages: Vec<String>,
}

impl RunLog {
    /// The result decided early, else `otherwise`.
    fn result_or(&self, otherwise: &'static str) -> &'static str {
        self.result.unwrap_or(otherwise)
    }
}

impl Engine {
    fn new(
        cfg: Config,
        env: HostEnv,
        drivers: Drivers,
        db: StateDb,
        source: Source,
        shared: Arc<Shared>,
    ) -> Self {
        Engine {
            backoff: Backoff::new(cfg.backoff_base, cfg.backoff_cap),
            cfg,
            env,
            drivers,
            db: Mutex::new(db),
            source,
            head: None,
            good: None,
            rejected: None,
            drifted: BTreeSet::new(),
            conditions: BTreeMap::new(),
            shared,
            runs: 0,
            restored: false,
            proposed: None,
            branch_head: None,
            last_nodes: Vec::new(),
        }
    }

    fn is_git(&self) -> bool {
        matches!(self.source, Source::Git(_))
    }

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
    fn load(&self, rev: &str) -> Result<Loaded, (&'static str, String)> {
        self.load_revision(rev, true)
    }

    /// [`Self::load`], with the fast-forward check only when `to_apply`.
    fn load_revision(&self, rev: &str, to_apply: bool) -> Result<Loaded, (&'static str, String)> {
        let mut info = view::RevisionInfo::bare(rev);
        let dir = match &self.source {
            Source::Git(g) => {
                if to_apply
                    && !self.cfg.allow_rewind
                    && let Some(last) = self.last_applied()
                {
                    g.check_fast_forward(&last, rev)
                        .map_err(|m| ("invalid", m))?;
                }
                if let Some(keyring) = &self.cfg.verify_commits {
                    let who = g.verify(rev, keyring).map_err(|m| ("unsigned", m))?;
                    info!(revision = short(rev), signer = %who, "signature verified");
                    info.signature = "verified".into();
                    info.signer = Some(who.to_string());
                }
                if let Some(c) = g.commit_info(rev) {
                    info.author = Some(c.author);
                    info.message = Some(c.summary);
                    info.time = Some(c.time);
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
        Ok(Loaded {
            revision: rev.to_string(),
            desired: Arc::new(desired),
            info,
        })
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
            Ok(loaded) => {
                info!(
                    revision = short(&rev),
                    "keeping the last good revision applied"
                );
                self.good = Some(Arc::new(loaded));
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
        let mut log = RunLog::default();

        // 1. Source.
        self.sync_source(fetch, &mut log);
        let Some(good) = self.good.clone() else {
            return self.no_revision(log, start);
        };
        span.record("revision", short(&good.revision));

        // 2. Lock, observe, plan.
        let (lock, mut run) = match self.lock_and_plan(&good.desired) {
            Ok(planned) => planned,
            Err(message) => {
                self.finish(log.result_or("error"), start, message, false, |_| {});
                return Some(Duration::from_secs(5));
            }
        };

        // Drift.
        let first_plan = self.shared.ui.as_ref().map(|_| run.plan.clone());
        let drift = gate::drift_of(&run.plan);
        self.report_new_drift(&drift);
        let skip_drift = self.cfg.drift == DriftMode::Report;

        // Leave out drift repairs when only reporting, plan errors, resources in backoff
        // and their dependents: one re-plan for all of it.
        let mut blocked = gate::waiting(
            (&run).into(),
            skip_drift,
            &good.desired,
            &mut self.backoff,
            Instant::now(),
        );
        if !blocked.is_empty() {
            gate::block_dependents(&mut blocked, &good.desired);
        }
        if skip_drift || !blocked.is_empty() {
            let held = blocked
                .iter()
                .map(|(id, (why, _))| (id.clone(), why.clone()));
            run.replan(&self.drivers, &good.desired, |o| {
                o.skip_drift |= skip_drift;
                o.exclude.extend(held);
            });
        }

        // 3. Execute.
        let report = self.execute(&run, &good.desired);
        drop(lock);
        let results = gate::record_results(
            &report,
            &mut self.backoff,
            &mut blocked,
            &self.shared.metrics,
            |id| gate::hold_key(id, &good.desired, &run.inventory, &run.observed),
        );
        self.drifted = gate::still_drifted(self.cfg.drift, &drift, &results.applied);
        let proposed = self.plan_proposed();
        let branch = self.plan_branch();

        // 4. Status and metrics.
        let ran = Ran {
            drift,
            blocked,
            results,
        };
        let next = self.conclude(&good, &run.observed, &ran, log, start);
        if let Some(plan) = first_plan {
            self.publish_snapshot(&good, run, plan, &ran, (proposed, branch));
        }
        // After the snapshot: whoever sees these events reads a model that has them.
        self.record_run_events(&good.revision, &ran.drift, &ran.results);
        next
    }

    /// Events for what a run did: changes applied (drift repairs apart) and failures
    /// with their class.
    fn record_run_events(
        &self,
        revision: &str,
        drift: &BTreeMap<ResourceId, String>,
        results: &gate::RunResults,
    ) {
        let ev = &self.shared.events;
        for (id, action) in &results.applied {
            let e = if drift.contains_key(id) {
                events::NewEvent::new(
                    events::EventKind::DriftRepaired,
                    "DriftRepaired",
                    format!("{} to repair drift: {}", action.verb(), drift[id]),
                )
            } else {
                events::NewEvent::new(
                    events::EventKind::Apply,
                    apply_reason(*action),
                    format!("{} at {}", action.verb(), short(revision)),
                )
            };
            ev.record(e.on(id).at(Some(revision)));
        }
        for (id, (reason, msg)) in &results.failed {
            let class = if reason == "ApplyFailed" {
                "transient"
            } else {
                "terminal"
            };
            ev.record(
                events::NewEvent::new(events::EventKind::Failure, reason, msg.clone())
                    .on(id)
                    .class(class)
                    .at(Some(revision)),
            );
        }
    }

    /// In manual sync, the plan of the head waiting for a sync (observes again).
    fn plan_proposed(&self) -> Option<(view::RevisionInfo, stead_reconciler::plan::Plan)> {
        let p = self.proposed.clone()?;
        let lock = ApplyLock::acquire(&self.env.state_dir, Duration::from_secs(10)).ok()?;
        let run = self.plan(&p.desired).ok()?;
        drop(lock);
        Some((p.info.clone(), run.plan))
    }

    /// With `--plan-branch`: fetches the branch, loads its head when it moved (no
    /// fast-forward check: it is never applied) and plans it against the host.
    fn plan_branch(&mut self) -> Option<BranchPlanned> {
        let name = self.cfg.plan_branch.clone()?;
        let Source::Git(g) = &self.source else {
            return None;
        };
        let head = match g.fetch_branch(&name, "refs/stead/plan") {
            Ok(h) => h,
            Err(e) => {
                warn!(branch = %name, error = %e, "plan-only branch: fetch failed");
                return None;
            }
        };
        if self.branch_head.as_ref().map(|l| l.revision.as_str()) != Some(&head.revision) {
            match self.load_revision(&head.revision, false) {
                Ok(l) => self.branch_head = Some(Arc::new(l)),
                Err((_, msg)) => {
                    warn!(branch = %name, revision = short(&head.revision), error = %msg, "plan-only branch: head refused");
                    self.branch_head = None;
                    return None;
                }
            }
        }
        let loaded = self.branch_head.clone()?;
        let lock = ApplyLock::acquire(&self.env.state_dir, Duration::from_secs(10)).ok()?;
        let run = self.plan(&loaded.desired).ok()?;
        drop(lock);
        Some((name, loaded.info.clone(), run.plan))
    }

    /// Publishes what the run saw and planned for the UI, and sends the status changes
    /// to live subscribers.
    fn publish_snapshot(
        &mut self,
        good: &Loaded,
        run: PlannedRun,
        plan: stead_reconciler::plan::Plan,
        ran: &Ran,
        (proposed, branch): (Option<ProposedPlan>, Option<BranchPlanned>),
    ) {
        // What was just changed is observed again, so the pages show the new state (a
        // started container's pid) without waiting for the next resync.
        let mut observed = run.observed;
        let applied = &ran.results.applied;
        if !applied.is_empty() {
            let (fresh, _) = stead_reconciler::observe_where(
                &self.drivers,
                &good.desired,
                &run.inventory,
                &|id| applied.contains_key(id),
            );
            observed.extend(fresh);
        }
        let snap = Arc::new(view::Snapshot {
            revision: good.info.clone(),
            desired: good.desired.clone(),
            observed,
            plan,
            applied: ran.results.applied.clone(),
            drift: ran.drift.clone(),
            drifted: self.drifted.clone(),
            proposed,
            branch,
        });
        let status = self
            .shared
            .status
            .read()
            .map(|s| s.clone())
            .unwrap_or_default();
        let nodes = view::node_statuses(&status, Some(&snap));
        let changed = view::changed_nodes(&self.last_nodes, &nodes);
        self.last_nodes = nodes;
        *self
            .shared
            .snapshot
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(snap);
        self.shared.events.publish_status(events::StatusUpdate {
            reconciles: status.reconciles,
            last_result: status.last_result.clone(),
            revision: status.revision.clone(),
            changed,
        });
    }

    /// Fetches the source when asked (a directory source always: it is cheap) and loads
    /// a new head.
    fn sync_source(&mut self, fetch: bool, log: &mut RunLog) {
        if fetch || self.head.is_none() || matches!(self.source, Source::Dir(_)) {
            self.fetch_source(log);
        }
        self.load_head(log);
        self.publish_head();
    }

    /// Ends a run that has no revision to apply (none could be loaded yet).
    fn no_revision(&self, mut log: RunLog, start: Instant) -> Option<Duration> {
        if log.messages.is_empty() {
            log.messages.push("no revision could be loaded yet".into());
        }
        self.finish(
            log.result_or("error"),
            start,
            log.messages.join("; "),
            false,
            |_| {},
        );
        None
    }

    /// Takes the apply lock and plans `desired` under it; the error's message otherwise.
    fn lock_and_plan(&self, desired: &Desired) -> Result<(ApplyLock, PlannedRun), String> {
        let lock =
            ApplyLock::acquire(&self.env.state_dir, Duration::from_secs(10)).map_err(|e| {
                warn!(error = %e, "apply lock busy; retrying in 5s");
                e.to_string()
            })?;
        let run = self.plan(desired).map_err(|e| {
            error!(error = %stead_reconciler::exec::error_chain(&e), "cannot plan");
            e.to_string()
        })?;
        Ok((lock, run))
    }

    /// Publishes a run's outcome: resource statuses and metrics, the revision applied, the
    /// result. Returns the requeue delay of the next due retry.
    fn conclude(
        &mut self,
        good: &Loaded,
        observed: &BTreeMap<ResourceId, Observed>,
        ran: &Ran,
        mut log: RunLog,
        start: Instant,
    ) -> Option<Duration> {
        let revision = good.revision.as_str();
        let t = now_secs();
        let no_drift = BTreeMap::new();
        let verdicts = status::RunVerdicts {
            blocked: &ran.blocked,
            failed: &ran.results.failed,
            reported_drift: match self.cfg.drift {
                DriftMode::Report => &ran.drift,
                DriftMode::Heal => &no_drift,
            },
            applied: &ran.results.applied,
            revision,
        };
        let report =
            status::resource_report(&good.desired, observed, &verdicts, &self.conditions, t);
        self.publish_resources(report);

        let not_converged = ran.blocked.len() + ran.results.failed.len();
        let apply_ok = not_converged == 0;
        if !apply_ok {
            log.messages
                .push(format!("{not_converged} resource(s) not converged"));
        }
        let res = log.result_or(if apply_ok { "success" } else { "failed" });
        if self.record_revision(revision) {
            self.clean_source(revision);
        }
        self.shared.metrics.set_revision(revision);
        let resources: Vec<ResourceStatus> = self.conditions.values().cloned().collect();
        self.shared.metrics.ready.set(1.0);
        // One status update, so readers never see the new revision with the old result.
        self.finish(res, start, log.messages.join("; "), apply_ok, |s| {
            s.revision = Some(revision.to_string());
            s.last_apply_time = Some(t);
            s.ready = true;
            s.resources = resources;
        });
        let now = Instant::now();
        self.backoff
            .next_due(now)
            .map(|d| d.saturating_duration_since(now))
    }

    /// Fetches the source head; on failure keeps healing against the last good revision.
    fn fetch_source(&mut self, log: &mut RunLog) {
        let shared = self.shared.clone();
        let m = &shared.metrics;
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
                log.messages.push(format!("fetch: {msg}"));
                // After a restart with the remote unreachable: keep healing against
                // the revision applied last.
                self.restore_last_good();
                if self.good.is_none() {
                    log.result = Some("error");
                }
            }
        }
    }

    /// Loads the head if it is new: it becomes the good revision, or is rejected (the
    /// last good revision stays).
    fn load_head(&mut self, log: &mut RunLog) {
        let Some(head) = self.head.clone() else {
            return;
        };
        let sync_asked = self.shared.sync_requested.swap(false, Ordering::SeqCst);
        if self
            .proposed
            .as_ref()
            .is_some_and(|p| p.revision == head.revision)
        {
            if sync_asked || !self.cfg.manual_sync {
                info!(revision = short(&head.revision), "sync: applying the head");
                self.good = self.proposed.take();
                self.backoff.reset();
            }
            return;
        }
        let known = self
            .good
            .as_ref()
            .is_some_and(|g| g.revision == head.revision)
            || self
                .rejected
                .as_ref()
                .is_some_and(|r| r.revision == head.revision);
        if known {
            return;
        }
        match self.load(&head.revision) {
            Ok(loaded) => {
                info!(
                    revision = short(&head.revision),
                    resources = loaded.desired.len(),
                    "new revision loaded"
                );
                self.rejected = None;
                if self.cfg.manual_sync && !sync_asked {
                    self.restore_last_good();
                    if self.good.is_some() {
                        info!(
                            revision = short(&head.revision),
                            "manual sync: the head waits for a sync"
                        );
                        self.proposed = Some(Arc::new(loaded));
                        return;
                    }
                }
                self.good = Some(Arc::new(loaded));
                self.proposed = None;
                self.backoff.reset();
            }
            Err((res, msg)) => {
                warn!(revision = short(&head.revision), result = res, error = %msg, "revision rejected; the last good revision stays applied");
                let reason = if res == "unsigned" {
                    "Unsigned"
                } else {
                    "Invalid"
                };
                let text = format!("revision {}: {msg}", short(&head.revision));
                self.event("", "Warning", reason, &text);
                self.shared.events.record(
                    events::NewEvent::new(events::EventKind::Rejected, reason, text)
                        .at(Some(&head.revision)),
                );
                self.rejected = Some(Rejected {
                    revision: head.revision.clone(),
                    result: res,
                    message: msg,
                });
                // A head waiting for a sync is no longer the head: nothing to sync.
                self.proposed = None;
                log.result = Some(res);
                self.restore_last_good();
            }
        }
    }

    /// Puts the head and why it was rejected (if it was) into the status.
    fn publish_head(&self) {
        let rejected = self
            .rejected
            .as_ref()
            .filter(|r| Some(&r.revision) == self.head.as_ref().map(|h| &h.revision));
        let (head_rev, head_error) = (
            self.head.as_ref().map(|h| h.revision.clone()),
            rejected.map(|r| format!("{}: {}", r.result, r.message)),
        );
        self.publish_head_info(head_rev.as_deref());
        self.set_status(|s| {
            s.head_revision = head_rev;
            s.head_error = head_error;
        });
    }

    /// With the UI: the head's commit details (author, summary, time), read once per
    /// new head, so the overview names a rejected or waiting commit too.
    fn publish_head_info(&self, head: Option<&str>) {
        if self.shared.ui.is_none() {
            return;
        }
        let mut slot = self
            .shared
            .head_info
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().map(|i| i.id.as_str()) == head {
            return;
        }
        *slot = head.map(|rev| {
            let mut info = view::RevisionInfo::bare(rev);
            if let Source::Git(g) = &self.source
                && let Some(c) = g.commit_info(rev)
            {
                info.author = Some(c.author);
                info.message = Some(c.summary);
                info.time = Some(c.time);
            }
            info
        });
    }

    /// Observes and plans `desired` (the apply lock is held).
    fn plan(&self, desired: &Desired) -> Result<PlannedRun, StateError> {
        let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        plan_run(
            &self.drivers,
            desired,
            &db,
            PlanOptions {
                no_prune: self.cfg.no_prune,
                allow_data_loss: false,
                ..Default::default()
            },
        )
    }

    /// Counts, logs and records an event for drift not seen in the previous run.
    fn report_new_drift(&self, drift: &BTreeMap<ResourceId, String>) {
        for (id, what) in drift {
            if !self.drifted.contains(id) {
                self.shared
                    .metrics
                    .drift_detected
                    .with_label_values(&[id.kind.as_str()])
                    .inc();
                warn!(resource = %id, drift = %what, mode = ?self.cfg.drift, "drift detected");
                self.event(&id.to_string(), "Warning", "Drift", what);
                self.shared.events.record(
                    events::NewEvent::new(events::EventKind::Drift, "Drift", what.clone()).on(id),
                );
            }
        }
    }

    /// Executes what is left of the plan (nothing to do: an empty report).
    fn execute(&self, run: &PlannedRun, desired: &Desired) -> Report {
        if !run.plan.has_changes() {
            return Report::default();
        }
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
            desired,
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
    }

    /// Keeps the resources' statuses and sets the resource metrics.
    fn publish_resources(&mut self, report: status::ResourceReport) {
        let m = &self.shared.metrics;
        m.set_resources(&report.counts);
        m.set_failed(&report.failed);
        m.set_workloads(&report.usage);
        self.conditions = report.statuses;
    }

    /// Records `revision` as the one applied last; whether it is applied for the first
    /// time (then an event says so).
    fn record_revision(&self, revision: &str) -> bool {
        let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        let prev = db.get_kv(KV_REVISION).ok().flatten();
        if prev.as_deref() == Some(revision) {
            return false;
        }
        let _ = db.set_kv(KV_REVISION, revision);
        let text = format!("applied revision {}", short(revision));
        let _ = db.event("", "Normal", "Revision", &text);
        self.shared.events.record(
            events::NewEvent::new(events::EventKind::Revision, "Revision", text).at(Some(revision)),
        );
        true
    }

    /// Removes the git checkouts other than `revision`'s and the head's.
    fn clean_source(&self, revision: &str) {
        if let Source::Git(g) = &self.source {
            let head = self
                .head
                .as_ref()
                .map(|h| h.revision.clone())
                .unwrap_or_default();
            let branch = self
                .branch_head
                .as_ref()
                .map(|l| l.revision.clone())
                .unwrap_or_default();
            g.clean(&[revision, head.as_str(), branch.as_str()]);
        }
    }

    /// Records an event in the state DB (best effort).
    fn event(&self, resource: &str, type_: &str, reason: &str, message: &str) {
        let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        let _ = db.event(resource, type_, reason, message);
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

/// Runs the controller until SIGTERM/SIGINT. Workloads are left running on exit; a
/// restart picks up from the state DB. `housekeeping` runs the backup schedules and
/// collects expired environments.
///
/// Threads: the blocking start (controller lock, state DB, source directory) runs on
/// the calling thread before the runtime turns. The runtime has one thread: it serves
/// HTTP and the status socket, debounces file-system events and keeps the timers. Each
/// reconcile and each housekeeping round runs on its blocking pool (git, state DB,
/// drivers, file reads); the backup schedule runner has a thread of its own.
pub fn run(
    cfg: Config,
    env: HostEnv,
    drivers: Drivers,
    housekeeping: Arc<dyn Housekeeping>,
) -> Result<(), ControllerError> {
    check_config(&cfg)?;
    let Prepared { lock, db, source } = prepare(&cfg, &env)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(4)
        .thread_name("stead-controller")
        .build()
        .map_err(|e| ControllerError::io("cannot start the async runtime".into(), e))?;
    let sock_path = rt.block_on(run_async(cfg, env, drivers, housekeeping, db, source))?;
    // Still under the controller lock: the socket is ours to remove.
    let _ = std::fs::remove_file(&sock_path);
    drop(lock);
    Ok(())
}

/// Refuses settings that cannot work together.
fn check_config(cfg: &Config) -> Result<(), ControllerError> {
    if cfg.verify_commits.is_some() && matches!(cfg.source, SourceSpec::Dir(_)) {
        return Err(ControllerError::Config(
            "--verify-commits needs a git source".into(),
        ));
    }
    Ok(())
}

/// What the blocking start makes: the controller lock (held while this lives), the
/// state DB and the source.
struct Prepared {
    lock: File,
    db: StateDb,
    source: Source,
}

/// Takes the controller lock, opens the state DB and resolves the source. Blocking: runs
/// before the runtime.
fn prepare(cfg: &Config, env: &HostEnv) -> Result<Prepared, ControllerError> {
    let lock = controller_lock(&env.state_dir)?;
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
    Ok(Prepared { lock, db, source })
}

/// The context the loop, the HTTP server and the status socket share.
fn new_shared(
    cfg: &Config,
    run_dir: &Path,
    hk: Option<Arc<dyn Housekeeping>>,
) -> Result<Arc<Shared>, ControllerError> {
    let events = match &cfg.ui {
        Some(_) => events::EventLog::open(run_dir, events::RING_CAPACITY),
        None => events::EventLog::in_memory(events::RING_CAPACITY),
    };
    Ok(Arc::new(Shared {
        metrics: Metrics::new()?,
        status: RwLock::new(Status {
            source: cfg.source.to_string(),
            drift_mode: match cfg.drift {
                DriftMode::Heal => "heal".into(),
                DriftMode::Report => "report".into(),
            },
            ..Status::default()
        }),
        trigger: Trigger::new(),
        webhook_token: cfg.webhook_token.clone(),
        busy_since: Mutex::new(None),
        work: Mutex::new(()),
        events,
        snapshot: RwLock::new(None),
        head_info: RwLock::new(None),
        ui: cfg.ui.clone().map(auth::UiAuth::new),
        sync_requested: AtomicBool::new(false),
        sync_mode: if cfg.manual_sync { "manual" } else { "auto" },
        housekeeping: hk,
    }))
}

/// The reason of an `apply` event for `action`.
fn apply_reason(action: Action) -> &'static str {
    match action {
        Action::Create => "Created",
        Action::Adopt => "Adopted",
        Action::Update => "Updated",
        Action::Replace => "Replaced",
        Action::Delete => "Deleted",
        Action::Retain => "Retained",
        Action::Noop => "Unchanged",
    }
}

/// Serves the controller until a signal; the path of the status socket to remove.
async fn run_async(
    cfg: Config,
    env: HostEnv,
    drivers: Drivers,
    hk: Arc<dyn Housekeeping>,
    db: StateDb,
    source: Source,
) -> Result<PathBuf, ControllerError> {
    let shared = new_shared(&cfg, &env.run_dir, Some(hk.clone()))?;
    if cfg.ui.is_some() && !cfg.listen.ip().is_loopback() {
        warn!(listen = %cfg.listen, "the web UI listens beyond loopback: put it behind TLS");
    }
    let (stop_tx, http) = serve_http(cfg.listen, shared.clone()).await?;
    // Start-up only, before any other task runs: create the run dir, bind, chmod.
    let (sock, sock_path) = server::bind_status_socket(&env.run_dir)?;
    info!(socket = %sock_path.display(), "serving status");
    let status_task = tokio::spawn(server::serve_status(sock, shared.clone()));
    let _watcher = match &source {
        Source::Dir(d) => Some(watch_dir(d, cfg.debounce, shared.clone())?),
        Source::Git(_) => None,
    };
    let mut signals = Signals::new()?;
    let housekeeping = tokio::spawn(
        housekeeping::housekeeping_task(
            shared.clone(),
            hk,
            housekeeping::Paths::new(&env.state_dir),
            cfg.resync.min(Duration::from_secs(30)),
        )
        .instrument(info_span!("housekeeping")),
    );
    let engine = Engine::new(cfg.clone(), env, drivers, db, source, shared.clone());
    if let Err(e) = drive(engine, &cfg, &shared, &mut signals).await {
        let _ = stop_tx.send(true);
        return Err(e);
    }
    info!("shutting down; workloads keep running");
    let _ = stop_tx.send(true);
    let _ = http.await;
    status_task.abort();
    housekeeping.abort();
    Ok(sock_path)
}

/// Binds `listen` and serves `/metrics`, `/healthz`, `/readyz` and `/hooks/git` until
/// the returned sender says `true`.
async fn serve_http(
    listen: SocketAddr,
    shared: Arc<Shared>,
) -> Result<
    (
        tokio::sync::watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    ),
    ControllerError,
> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| ControllerError::io(format!("listen on {listen}"), e))?;
    let local = listener
        .local_addr()
        .map_err(|e| ControllerError::io("local address".into(), e))?;
    info!(addr = %local, "serving /metrics /healthz /readyz /hooks/git");
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let limits = if shared.ui.is_some() {
        server::HttpLimits::with_ui()
    } else {
        server::HttpLimits::default()
    };
    let app = server::router(shared);
    let http = tokio::spawn(async move {
        let r = axum::serve(server::limited(listener, limits), app)
            .with_graceful_shutdown(async move {
                let _ = stop_rx.wait_for(|v| *v).await;
            })
            .await;
        if let Err(e) = r {
            error!(error = %e, "http server");
        }
    });
    Ok((stop_tx, http))
}

/// Watches a directory source: file-system events, debounced, trigger a fetch.
fn watch_dir(
    dir: &Path,
    debounce: Duration,
    shared: Arc<Shared>,
) -> Result<notify::RecommendedWatcher, ControllerError> {
    use notify::Watcher;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev
            && !matches!(ev.kind, notify::EventKind::Access(_))
        {
            let _ = tx.send(());
        }
    })
    .map_err(|e| ControllerError::Config(format!("cannot watch {}: {e}", dir.display())))?;
    w.watch(dir, notify::RecursiveMode::Recursive)
        .map_err(|e| ControllerError::Config(format!("cannot watch {}: {e}", dir.display())))?;
    tokio::spawn(
        async move {
            while rx.recv().await.is_some() {
                // Wait for a quiet period so an editor's or a sync's burst is one run.
                while let Ok(Some(())) = tokio::time::timeout(debounce, rx.recv()).await {}
                debug!("source directory changed");
                shared.trigger.fire(true);
            }
        }
        .instrument(info_span!("watch")),
    );
    Ok(w)
}

/// SIGTERM and SIGINT.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self, ControllerError> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())
                .map_err(|e| ControllerError::io("SIGTERM handler".into(), e))?,
            int: signal(SignalKind::interrupt())
                .map_err(|e| ControllerError::io("SIGINT handler".into(), e))?,
        })
    }

    /// Waits for either; its name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// The loop's timers: the resync (jittered, restarted by every run), the git poll and
/// a requeue for a due retry.
struct Clocks {
    next_resync: tokio::time::Instant,
    next_poll: tokio::time::Instant,
    requeue: Option<tokio::time::Instant>,
}

impl Clocks {
    fn new(cfg: &Config, is_git: bool, now: tokio::time::Instant) -> Self {
        let far = Duration::from_secs(86400 * 365);
        Clocks {
            next_resync: now + jittered(cfg.resync),
            next_poll: now + if is_git { cfg.interval } else { far },
            requeue: None,
        }
    }

    /// When the loop wakes without a trigger.
    fn wake(&self) -> tokio::time::Instant {
        self.requeue
            .into_iter()
            .chain([self.next_resync, self.next_poll])
            .min()
            .unwrap_or(self.next_resync)
    }

    /// Whether a run at `now` fetches: a trigger asked, or the poll is due. A git
    /// source's poll restarts with each fetch.
    fn fetch(
        &mut self,
        asked: bool,
        now: tokio::time::Instant,
        cfg: &Config,
        is_git: bool,
    ) -> bool {
        let fetch = asked || now >= self.next_poll;
        if fetch && is_git {
            self.next_poll = now + cfg.interval;
        }
        fetch
    }

    /// After a run at `now`: every reconcile observes everything, so the resync clock
    /// restarts; `next` is the run's requeue delay (at least 100 ms).
    fn reconciled(&mut self, next: Option<Duration>, resync: Duration, now: tokio::time::Instant) {
        self.next_resync = now + jittered(resync);
        self.requeue = next.map(|d| now + d.max(Duration::from_millis(100)));
    }
}

/// Runs reconciles on triggers and timers until a signal.
async fn drive(
    mut engine: Engine,
    cfg: &Config,
    shared: &Shared,
    signals: &mut Signals,
) -> Result<(), ControllerError> {
    let is_git = engine.is_git();
    shared.trigger.fire(true);
    let mut clocks = Clocks::new(cfg, is_git, tokio::time::Instant::now());
    loop {
        if !wait_for_work(shared, signals, clocks.wake()).await {
            return Ok(());
        }
        shared.trigger.run_starting();
        let asked = shared.trigger.take_fetch();
        let fetch = clocks.fetch(asked, tokio::time::Instant::now(), cfg, is_git);
        let (e, next, stopping) = reconcile_blocking(engine, fetch, shared, signals).await?;
        engine = e;
        clocks.reconciled(next, cfg.resync, tokio::time::Instant::now());
        if stopping {
            return Ok(());
        }
    }
}

/// Waits for a trigger or the wake time. A trigger after a quiet period runs at once; one
/// within a burst waits for the burst to settle. `false`: a signal came.
async fn wait_for_work(shared: &Shared, signals: &mut Signals, wake: tokio::time::Instant) -> bool {
    let triggered = tokio::select! {
        _ = signals.recv() => return false,
        _ = shared.trigger.notify.notified() => true,
        _ = tokio::time::sleep_until(wake) => false,
    };
    if !triggered || !shared.trigger.in_burst() {
        return true;
    }
    settle_burst(shared, signals).await
}

/// A burst of webhook calls (a forge sends one per pushed ref) or of pushes collapses
/// into one or two runs (its first trigger's, at once, and one for the triggers that came
/// during that run): waits until triggers stop for `BURST_SETTLE`, but never longer than
/// `BURST_MAX` in all. `false`: a signal came.
async fn settle_burst(shared: &Shared, signals: &mut Signals) -> bool {
    let cap = tokio::time::Instant::now() + BURST_MAX;
    loop {
        let quiet = (tokio::time::Instant::now() + BURST_SETTLE).min(cap);
        tokio::select! {
            _ = signals.recv() => return false,
            _ = shared.trigger.notify.notified() => {}
            _ = tokio::time::sleep_until(quiet) => return true,
        }
        if tokio::time::Instant::now() >= cap {
            return true;
        }
    }
}

/// Runs one reconcile on a blocking thread, under the work lock. A signal meanwhile
/// lets it finish and asks to stop (the third value). A panic is fatal.
async fn reconcile_blocking(
    mut engine: Engine,
    fetch: bool,
    shared: &Shared,
    signals: &mut Signals,
) -> Result<(Engine, Option<Duration>, bool), ControllerError> {
    *shared.busy_since.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    let mut task = tokio::task::spawn_blocking(move || {
        let shared = engine.shared.clone();
        let _work = shared.work.lock().unwrap_or_else(|p| p.into_inner());
        let next = engine.reconcile(fetch);
        (engine, next)
    });
    let mut stopping = false;
    let joined = tokio::select! {
        r = &mut task => r,
        name = signals.recv() => {
            stopping = true;
            info!("{name}: finishing the running reconcile");
            task.await
        }
    };
    *shared.busy_since.lock().unwrap_or_else(|p| p.into_inner()) = None;
    match joined {
        Ok((engine, next)) => Ok((engine, next, stopping)),
        Err(err) => {
            error!(error = %err, "reconcile panicked");
            Err(ControllerError::Config(format!(
                "reconcile panicked: {err}"
            )))
        }
    }
}

#[cfg(test)]
mod testserve;
#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh shared context for tests.
    pub(crate) fn shared() -> Arc<Shared> {
        shared_with(None, None, None)
    }

    /// A fresh shared context with a webhook token, UI settings and housekeeping.
    pub(crate) fn shared_with(
        webhook_token: Option<String>,
        ui: Option<auth::UiConfig>,
        housekeeping: Option<Arc<dyn Housekeeping>>,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            metrics: Metrics::new().expect("metrics"),
            status: RwLock::new(Status::default()),
            trigger: Trigger::new(),
            webhook_token,
            busy_since: Mutex::new(None),
            work: Mutex::new(()),
            events: events::EventLog::in_memory(100),
            snapshot: RwLock::new(None),
            head_info: RwLock::new(None),
            ui: ui.map(auth::UiAuth::new),
            sync_requested: AtomicBool::new(false),
            sync_mode: "auto",
            housekeeping,
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

    fn cfg(interval: u64, resync: u64) -> Config {
        let mut c = Config::new(SourceSpec::Dir(PathBuf::from("/m")));
        c.interval = Duration::from_secs(interval);
        c.resync = Duration::from_secs(resync);
        c
    }

    #[test]
    fn a_git_source_polls_on_its_interval_and_a_fetch_restarts_the_poll() {
        let c = cfg(60, 3600);
        let t0 = tokio::time::Instant::now();
        let mut clocks = Clocks::new(&c, true, t0);
        assert_eq!(
            clocks.wake(),
            t0 + Duration::from_secs(60),
            "the poll comes first"
        );
        assert!(!clocks.fetch(false, t0 + Duration::from_secs(10), &c, true));
        // A triggered fetch restarts the poll.
        assert!(clocks.fetch(true, t0 + Duration::from_secs(10), &c, true));
        assert_eq!(clocks.next_poll, t0 + Duration::from_secs(70));
        assert!(clocks.fetch(false, t0 + Duration::from_secs(70), &c, true));
    }

    #[test]
    fn a_directory_source_never_polls_and_a_requeue_wakes_the_loop_first() {
        let c = cfg(60, 60);
        let t0 = tokio::time::Instant::now();
        let mut clocks = Clocks::new(&c, false, t0);
        assert!(!clocks.fetch(false, t0 + Duration::from_secs(3600), &c, false));
        let resync = clocks.wake() - t0;
        assert!(resync >= Duration::from_secs(54) && resync <= Duration::from_secs(66));
        clocks.reconciled(Some(Duration::from_millis(1)), c.resync, t0);
        assert_eq!(
            clocks.wake(),
            t0 + Duration::from_millis(100),
            "at least 100 ms"
        );
        clocks.reconciled(None, c.resync, t0);
        assert!(clocks.requeue.is_none());
    }

    #[test]
    fn a_trigger_after_quiet_runs_at_once_and_one_right_after_another_settles() {
        let t0 = Instant::now();
        let mut f = Fires::default();
        f.record(t0);
        assert!(!f.in_burst(), "the first trigger runs at once");
        f.record(t0 + Duration::from_millis(10));
        assert!(f.in_burst());
        f.record(t0 + Duration::from_millis(10) + BURST_SETTLE);
        assert!(!f.in_burst(), "after a quiet period");
        // A trigger right after one that its run already served is a new event.
        let t1 = t0 + Duration::from_secs(1);
        f.record(t1);
        f.run_started = Some(t1 + Duration::from_millis(1));
        f.record(t1 + Duration::from_millis(50));
        assert!(!f.in_burst(), "the one before was served");
        // Triggers during that run are a burst.
        f.record(t1 + Duration::from_millis(52));
        assert!(f.in_burst());
    }

    #[test]
    fn verify_commits_needs_a_git_source() {
        let mut c = cfg(60, 60);
        c.verify_commits = Some(PathBuf::from("/keys"));
        assert!(matches!(check_config(&c), Err(ControllerError::Config(_))));
        c.source = SourceSpec::parse("git+file:///srv/r.git").expect("git source");
        assert!(check_config(&c).is_ok());
    }

    #[test]
    fn the_run_log_keeps_a_result_decided_early() {
        let mut log = RunLog::default();
        assert_eq!(log.result_or("success"), "success");
        log.result = Some("invalid");
        assert_eq!(log.result_or("success"), "invalid");
    }
}
