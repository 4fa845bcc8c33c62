//! The agent: what each node runs. It registers the node, watches what is assigned to it,
//! owns each assigned workload before running it, and hands the owned set to a [`Converge`]
//! implementation (the single-host engine, wired in by the binary). A workload is never
//! started without a current [`FencingToken`]; when etcd is lost the [`FenceGuard`] stops the
//! HA workloads before the lease can expire, and every token is acquired again afterwards.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};
use tracing::{debug, info, instrument, warn};

use crate::election::{AssignmentEvent, AssignmentWatch};
use crate::etcd::{Store, StoreError};
use crate::events::{self, ClusterEvent, EventKind};
use crate::fence::{DeadlineFile, FenceCallback, FenceGuard, FencePolicy, FenceState};
use crate::keys::ResourceRef;
use crate::live::LiveHandOver;
use crate::metrics::AgentMetrics;
use crate::migrate::{self, LiveProgress, MigrationState};
use crate::model::{Assignment, NodeInfo};
use crate::owner::{self, FencingToken, Holder};
use crate::quorum::{QuorumProbe, QuorumView};
use crate::registry::{LeaseConfig, Liveness, Registration};
use crate::watch::PrefixWatch;

/// A failure of the local engine to converge (reported, retried on the next round).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConvergeError(pub String);

/// A workload the agent may run, with the token that proves it owns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owned {
    /// The workload.
    pub resource: ResourceRef,
    /// Its ownership.
    pub token: FencingToken,
    /// Whether it is highly available (stopped when the node fences).
    pub ha: bool,
}

/// The node's engine, as the agent sees it. Calls run on a blocking thread.
pub trait Converge: Send + Sync + 'static {
    /// Make the node run exactly `owned` (start what is missing, stop what is not listed).
    /// Side effects that matter carry the tokens.
    fn converge(&self, owned: &[Owned]) -> Result<(), ConvergeError>;

    /// Stop these HA workloads now: the node is fencing itself.
    fn stop_ha(&self, resources: &[ResourceRef]);

    /// [`Converge::converge`], keeping the data of `keep` (workloads being handed off to
    /// another node: they stop, their volumes stay until [`Converge::hand_off`] is done).
    fn converge_keeping(&self, owned: &[Owned], keep: &[Owned]) -> Result<(), ConvergeError> {
        let _ = keep;
        self.converge(owned)
    }

    /// A workload this node stopped is being migrated to node `to` (`stead migrate`): copy
    /// what must follow it (a final replication of its volumes) before its ownership is
    /// released. Called after [`Converge::converge_keeping`] stopped it and kept its data,
    /// while `owned.token` is still current; an error keeps the ownership (the target cannot
    /// start it yet) and is retried.
    fn hand_off(&self, owned: &Owned, to: &str) -> Result<(), ConvergeError> {
        let _ = (owned, to);
        Ok(())
    }

    /// Live migration, target side: start `resource` (a VM this node does not own yet)
    /// waiting for its guest, and keep it through converges until
    /// [`Converge::finish_incoming`] or [`Converge::abort_incoming`]; the `tcp:HOST:PORT`
    /// it listens on.
    fn start_incoming(&self, resource: &ResourceRef) -> Result<String, ConvergeError> {
        Err(ConvergeError(format!(
            "this node cannot receive {resource} live"
        )))
    }

    /// Live migration, source side: send the running guest of `owned` to `uri`, calling
    /// `progress` on the way (it returns false to cancel). On success the guest runs on the
    /// target and this node's VM is stopped for good (it must not start again); on an error
    /// the guest keeps running here. The last progress.
    fn migrate_out(
        &self,
        owned: &Owned,
        uri: &str,
        progress: &mut dyn FnMut(LiveProgress) -> bool,
    ) -> Result<LiveProgress, ConvergeError> {
        let _ = (uri, progress);
        Err(ConvergeError(format!(
            "this node cannot send {} live",
            owned.resource
        )))
    }

    /// Live migration, source side, when this node's agent finds a send under way that it
    /// did not start (it was restarted while sending: QEMU goes on by itself): asks the
    /// VM's QEMU how its outgoing migration stands and follows it, calling `progress` like
    /// [`Converge::migrate_out`]. Completed (already or while followed): the last progress,
    /// this node's VM stopped for good. Failed, cancelled or no migration at all: an error
    /// with the reason, the guest keeps running here.
    fn resume_out(
        &self,
        owned: &Owned,
        progress: &mut dyn FnMut(LiveProgress) -> bool,
    ) -> Result<LiveProgress, ConvergeError> {
        let _ = progress;
        Err(ConvergeError(format!(
            "this node cannot follow the migration of {}",
            owned.resource
        )))
    }

    /// Live migration, target side: whether this node's VM waiting for `resource` runs the
    /// guest now (the incoming migration finished: it holds the only running copy).
    fn incoming_runs(&self, resource: &ResourceRef) -> bool {
        let _ = resource;
        false
    }

    /// Live migration, target side: the guest runs here now; the waiting VM becomes an
    /// ordinary one (converged as usual once this node owns it).
    fn finish_incoming(&self, resource: &ResourceRef) -> Result<(), ConvergeError> {
        let _ = resource;
        Ok(())
    }

    /// Live migration, target side: kill the waiting VM (the move failed or was cleared).
    fn abort_incoming(&self, resource: &ResourceRef) {
        let _ = resource;
    }
}

/// How an agent runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// What the node registers.
    pub node: NodeInfo,
    /// The node's lease.
    pub lease: LeaseConfig,
    /// When to fence.
    pub fence: FencePolicy,
    /// How often to retry acquiring a workload whose old owner's key still exists, and a
    /// converge that failed.
    pub retry: Duration,
    /// Where to publish the fence deadline for a watchdog below the agent (see
    /// [`DeadlineFile`]); `0` is written there at shutdown too.
    pub deadline_file: Option<PathBuf>,
}

impl AgentConfig {
    /// Defaults for `node`: 10 s lease, the default fence policy, retry every 500 ms.
    pub fn new(node: NodeInfo) -> Self {
        Self {
            node,
            lease: LeaseConfig::default(),
            fence: FencePolicy::default(),
            retry: Duration::from_millis(500),
            deadline_file: None,
        }
    }
}

/// What one round of the agent does (pure decision, see [`decide`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Step {
    /// Workloads to acquire first.
    pub acquire: Vec<ResourceRef>,
    /// The set to converge to (owned and assigned).
    pub run: Vec<Owned>,
    /// Tokens to release once the converge has stopped their workloads.
    pub release: Vec<FencingToken>,
}

/// Decides a round: acquire what is assigned but not owned, run what is assigned and owned,
/// release what is owned but no longer assigned. Fenced: do nothing at all.
pub fn decide(
    assigned: &BTreeMap<ResourceRef, Assignment>,
    held: &BTreeMap<ResourceRef, FencingToken>,
    fenced: bool,
) -> Step {
    if fenced {
        return Step::default();
    }
    let mut step = Step::default();
    for (resource, a) in assigned {
        match held.get(resource) {
            Some(token) => step.run.push(Owned {
                resource: resource.clone(),
                token: token.clone(),
                ha: a.ha,
            }),
            None => step.acquire.push(resource.clone()),
        }
    }
    step.release = held
        .iter()
        .filter(|(r, _)| !assigned.contains_key(*r))
        .map(|(_, t)| t.clone())
        .collect();
    step
}

/// What the fence callback stops, shared with it.
#[derive(Debug, Default)]
pub(crate) struct FenceSet {
    /// The HA workloads the node runs now, and the HA guests that arrived here live before
    /// the node owns them ([`LiveHandOver`]).
    pub(crate) ha: Vec<ResourceRef>,
    /// How many times the callback fired. Counted under the same lock as `ha` is read, and
    /// before the guard publishes the fence: more fences than the guard's epoch says the
    /// node is fencing or fenced now (every re-arm adds one to the epoch).
    pub(crate) fences: u64,
}

/// [`FenceSet`], shared.
pub(crate) type Running = Arc<Mutex<FenceSet>>;

/// Runs the agent until `shutdown` turns true: then its HA workloads are stopped, its
/// ownerships released and its lease revoked. Metrics go to a registry nobody serves; see
/// [`run_with_metrics`].
pub async fn run(
    store: &Store,
    config: &AgentConfig,
    engine: Arc<dyn Converge>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), StoreError> {
    let metrics = AgentMetrics::new().map_err(|e| StoreError::Protocol(e.to_string()))?;
    run_with_metrics(store, config, engine, shutdown, Arc::new(metrics)).await
}

/// [`run`], recording into `metrics`.
///
/// An etcd failure never ends the loop by itself (only a refusal of who we are or a
/// configuration that cannot work does): registering is retried until it succeeds, a step
/// of a round that fails (acquire, release) is retried later with the ownerships kept, and a
/// broken assignment watch is reopened. While the lease lives, what runs keeps running;
/// only a fence (the deadline passed) or an ownership lost with the lease stops a workload.
#[instrument(skip_all, fields(node = %config.node.name))]
pub async fn run_with_metrics(
    store: &Store,
    config: &AgentConfig,
    engine: Arc<dyn Converge>,
    mut shutdown: watch::Receiver<bool>,
    metrics: Arc<AgentMetrics>,
) -> Result<(), StoreError> {
    let Some(registration) = register(store, config, &mut shutdown, &metrics).await? else {
        return Ok(());
    };
    metrics.registered.set(1);
    metrics.up.set(1);
    let running: Running = Arc::default();
    let deadline_file = config.deadline_file.clone().map(DeadlineFile::new);
    let probe = QuorumProbe::spawn(store, registration.liveness(), config.lease.interval);
    let guard = FenceGuard::spawn_with_quorum(
        registration.liveness(),
        Some(probe.subscribe()),
        config.fence,
        fence_callback(&engine, &running),
        deadline_file.clone(),
    );
    let observer = tokio::spawn(observe(
        store.clone(),
        config.node.name.clone(),
        registration.liveness(),
        guard.subscribe(),
        probe.subscribe(),
        metrics.clone(),
    ));
    let (live, live_wake) = LiveHandOver::new(
        store,
        &config.node.name,
        engine.clone(),
        running.clone(),
        guard.subscribe(),
    );
    let mut agent = AgentLoop {
        store: store.clone(),
        node: config.node.name.clone(),
        retry: config.retry,
        live,
        live_wake,
        engine,
        running,
        assigned: BTreeMap::new(),
        held: BTreeMap::new(),
        epoch: 0,
        generation: 0,
        quorum: probe.subscribe(),
        metrics: metrics.clone(),
    };
    let result = agent.run(&registration, &guard, &mut shutdown).await;
    if let Err(e) = &result {
        warn!(error = %e, "agent loop stopped");
    }
    agent.stop_all().await;
    observer.abort();
    drop(guard);
    drop(probe);
    if let Some(file) = &deadline_file {
        file.publish_fenced().await;
    }
    let left = registration.leave().await;
    metrics.registered.set(0);
    metrics.up.set(0);
    result.and(left)
}

/// Registers the node, retrying every failure that is not terminal (100 ms doubling up to
/// 2 s); `None` when shutdown came first.
async fn register(
    store: &Store,
    config: &AgentConfig,
    shutdown: &mut watch::Receiver<bool>,
    metrics: &AgentMetrics,
) -> Result<Option<Registration>, StoreError> {
    let mut backoff = Backoff::default();
    loop {
        match Registration::register(store, &config.node, config.lease).await {
            Ok(r) => return Ok(Some(r)),
            Err(e) if e.is_terminal() => return Err(e),
            Err(e) => {
                metrics.errors.with_label_values(&["register"]).inc();
                let wait = backoff.failed();
                warn!(error = %e, ?wait, "registering failed; retrying");
                tokio::select! {
                    () = backoff.wait() => backoff.resume(),
                    changed = shutdown.changed() => {
                        if changed.is_err() || *shutdown.borrow() { return Ok(None); }
                    }
                }
            }
        }
        if *shutdown.borrow() {
            return Ok(None);
        }
    }
}

/// Keeps the metrics of the lease, the fence guard and the quorum probe, and writes a
/// fence event once the node is back after a fence (it could not reach etcd while fenced).
async fn observe(
    store: Store,
    node: String,
    mut liveness: watch::Receiver<Liveness>,
    mut fence: watch::Receiver<FenceState>,
    mut quorum: watch::Receiver<QuorumView>,
    metrics: Arc<AgentMetrics>,
) {
    let mut last = *liveness.borrow_and_update();
    let mut state = *fence.borrow_and_update();
    loop {
        tokio::select! {
            changed = liveness.changed() => {
                if changed.is_err() { return; }
                let now = *liveness.borrow_and_update();
                metrics.observe_liveness(&last, &now);
                last = now;
            }
            changed = fence.changed() => {
                if changed.is_err() { return; }
                let next = *fence.borrow_and_update();
                on_fence_change(&store, &node, &metrics, state, next);
                state = next;
            }
            changed = quorum.changed() => {
                if changed.is_err() { return; }
                metrics.observe_quorum(&quorum.borrow_and_update());
            }
        }
    }
}

fn on_fence_change(
    store: &Store,
    node: &str,
    metrics: &AgentMetrics,
    from: FenceState,
    to: FenceState,
) {
    match (from, to) {
        (FenceState::Armed { .. }, FenceState::Fenced { .. }) => {
            metrics.fences.inc();
            metrics.up.set(0);
        }
        (FenceState::Fenced { since, .. }, FenceState::Armed { .. }) => {
            metrics.up.set(1);
            let message = format!(
                "{node} fenced itself (no keepalive acknowledged in time) and was back {:.1} s later",
                since.elapsed().as_secs_f64()
            );
            let event = ClusterEvent::now(EventKind::Fence, node, None, message);
            events::spawn_records(store, vec![event]);
        }
        _ => {}
    }
}

fn fence_callback(engine: &Arc<dyn Converge>, running: &Running) -> FenceCallback {
    let engine = engine.clone();
    let running = running.clone();
    Arc::new(move || {
        let ha = {
            let mut set = running.lock().unwrap_or_else(PoisonError::into_inner);
            set.fences += 1;
            set.ha.clone()
        };
        engine.stop_ha(&ha);
    })
}

struct AgentLoop {
    store: Store,
    node: String,
    retry: Duration,
    /// Live migrations this node takes part in.
    live: LiveHandOver,
    /// Woken when a live hand-over task ended (a round follows).
    live_wake: tokio::sync::mpsc::UnboundedReceiver<()>,
    engine: Arc<dyn Converge>,
    running: Running,
    assigned: BTreeMap<ResourceRef, Assignment>,
    held: BTreeMap<ResourceRef, FencingToken>,
    epoch: u64,
    generation: u64,
    /// While it says quorum is lost, nothing is acquired, started or restarted.
    quorum: watch::Receiver<QuorumView>,
    metrics: Arc<AgentMetrics>,
}

/// Refusals of the assignment watch in a row (each after a backoff) before the running agent
/// takes them for a refused identity and ends.
const REFUSALS_BEFORE_GIVING_UP: u32 = 10;

impl AgentLoop {
    async fn run(
        &mut self,
        registration: &Registration,
        guard: &FenceGuard,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), StoreError> {
        let mut assignments = AssignmentWatch::new(&self.store, &self.node);
        let mut fence = guard.subscribe();
        let mut liveness = registration.liveness();
        let mut retry_at: Option<Instant> = None;
        let mut watch_backoff = Backoff::default();
        let mut refused_in_a_row = 0u32;
        let mut migrations = PrefixWatch::new(&self.store, self.store.keys().migrations(), 0);
        let mut live_synced = false;
        // No round runs before the first snapshot of the assignments and the first read of
        // the migrations: a converge of what is assigned *so far* (nothing, for an agent
        // that just started) would stop every workload the node runs, and a guest a
        // previous agent was sending or receiving could be stopped mid-move.
        let mut listed = false;
        let mut live_known = false;
        loop {
            let mut dirty = false;
            if !live_synced {
                live_synced = self.live_resync(&mut migrations).await;
                if live_synced && !live_known {
                    live_known = true;
                    retry_at = Some(Instant::now());
                }
            }
            tokio::select! {
                changes = migrations.next_batch(), if live_synced => match changes {
                    Ok(changes) => {
                        if let Err(e) = self.live.on_changes(changes, &self.held).await {
                            debug!(error = %e, "live migrations: reading again");
                            live_synced = false;
                        }
                    }
                    Err(e) => {
                        debug!(error = %e, "migration watch interrupted");
                        live_synced = false;
                        tokio::time::sleep(self.retry).await;
                    }
                },
                Some(()) = self.live_wake.recv() => dirty = true,
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() { return Ok(()); }
                }
                events = assignments.next(), if watch_backoff.ready() => match events {
                    Ok(events) => {
                        watch_backoff.reset();
                        refused_in_a_row = 0;
                        listed |= events.iter().any(|e| matches!(e, AssignmentEvent::Snapshot(_)));
                        self.apply(events);
                        dirty = true;
                    }
                    // A member killed in the middle of a TLS handshake looks like a refused
                    // certificate: once the agent has worked, only a refusal that persists
                    // ends it (its lease, and so its workloads, are safe either way).
                    Err(e) if e.is_terminal() && refused_in_a_row >= REFUSALS_BEFORE_GIVING_UP => {
                        return Err(e);
                    }
                    Err(e) => {
                        if e.is_terminal() {
                            refused_in_a_row += 1;
                        }
                        self.metrics.errors.with_label_values(&["watch"]).inc();
                        let wait = watch_backoff.failed();
                        if e.is_retryable() {
                            debug!(error = %e, ?wait, "assignment watch interrupted");
                        } else {
                            // Not an outage (a cancelled watch, an answer it cannot read):
                            // start over with a fresh snapshot of the assignments.
                            warn!(error = %e, ?wait, "assignment watch failed; opening it again");
                            assignments = AssignmentWatch::new(&self.store, &self.node);
                        }
                    }
                },
                () = watch_backoff.wait(), if !watch_backoff.ready() => watch_backoff.resume(),
                changed = fence.changed() => {
                    changed.map_err(|_| stopped("fence guard"))?;
                    dirty = true;
                }
                changed = liveness.changed() => {
                    changed.map_err(|_| stopped("keepalive"))?;
                    dirty = self.lease_replaced(&liveness.borrow_and_update());
                }
                changed = self.quorum.changed() => {
                    changed.map_err(|_| stopped("quorum probe"))?;
                    dirty = !self.quorum.borrow_and_update().lost;
                }
                () = sleep_until(retry_at.unwrap_or_else(far_future)) => { retry_at = None; dirty = true; }
            }
            if *shutdown.borrow() {
                return Ok(());
            }
            if dirty && listed && live_known && self.round(&mut fence, registration.lease()).await {
                retry_at.get_or_insert(Instant::now() + self.retry);
            }
            if self.live.pending(self.assigned.keys()) {
                // A previous agent's send waits for the token this round may have acquired.
                live_synced = false;
            }
        }
    }

    /// Lists the migration records, restarting `watch` after them, and acts on each;
    /// whether it worked (else it is tried again on the next turn of the loop).
    async fn live_resync(&mut self, watch: &mut PrefixWatch) -> bool {
        let listed = watch.list().await;
        match listed {
            Ok(_) => match self.live.resync(&self.held).await {
                Ok(()) => true,
                Err(e) => {
                    debug!(error = %e, "reading live migrations failed");
                    false
                }
            },
            Err(e) => {
                debug!(error = %e, "listing migrations failed");
                false
            }
        }
    }

    fn apply(&mut self, events: Vec<AssignmentEvent>) {
        for event in events {
            match event {
                AssignmentEvent::Snapshot(all) => {
                    self.assigned = all.into_iter().filter_map(keyed).collect();
                }
                AssignmentEvent::Assigned(a) => {
                    if let Some((r, a)) = keyed(a) {
                        self.assigned.insert(r, a);
                    }
                }
                AssignmentEvent::Unassigned(r) => {
                    self.assigned.remove(&r);
                }
            }
        }
    }

    /// A new lease (the old one expired): every token bound to the old one is gone.
    fn lease_replaced(&mut self, liveness: &Liveness) -> bool {
        if liveness.generation == self.generation {
            return false;
        }
        self.generation = liveness.generation;
        self.drop_tokens();
        true
    }

    /// Forgets every token (a fence, a new epoch, a new lease): counted as lost.
    fn drop_tokens(&mut self) {
        self.metrics.losses.inc_by(self.held.len() as u64);
        self.held.clear();
        self.metrics.owned.set(0);
    }

    /// One round; returns whether to retry later.
    async fn round(&mut self, fence_rx: &mut watch::Receiver<FenceState>, lease: i64) -> bool {
        let fence = *fence_rx.borrow_and_update();
        if fence.epoch() != self.epoch {
            info!(
                epoch = fence.epoch(),
                "re-armed after a fence: acquiring ownership again"
            );
            self.epoch = fence.epoch();
            self.drop_tokens();
        }
        if fence.is_fenced() {
            self.drop_tokens();
            return false;
        }
        if fence.stale_or_fenced(Instant::now()) {
            // The deadline passed and the guard has not fenced yet (the agent was paused,
            // or its guard starved): nothing starts on a state that old; the guard's fence
            // (or a new deadline) comes next and the round runs again.
            warn!(
                "the fence deadline passed before the guard acted: converging nothing until it has"
            );
            return true;
        }
        if self.quorum.borrow().lost {
            // Holding through a quorum loss: what runs keeps running, nothing else starts
            // (not even a workload that stopped); the round runs again when quorum returns.
            debug!("etcd has no leader anywhere: holding, converging nothing");
            return false;
        }
        let step = decide(&self.assigned, &self.held, false);
        let holder = Holder {
            node: self.node.clone(),
            lease,
        };
        let mut retry = false;
        for resource in &step.acquire {
            match owner::acquire(&self.store, resource, &holder).await {
                Ok(Some(token)) => {
                    self.metrics.acquisitions.inc();
                    self.held.insert(resource.clone(), token);
                }
                Ok(None) => retry = true,
                Err(e) => {
                    self.metrics.errors.with_label_values(&["acquire"]).inc();
                    warn!(%resource, error = %e, "acquiring ownership failed; retrying");
                    retry = true;
                }
            }
        }
        let now = *fence_rx.borrow();
        if now.is_fenced() || now.epoch() != self.epoch {
            // Fenced while acquiring: start nothing; the next round acquires again.
            self.drop_tokens();
            return false;
        }

        if self.live.sending() || self.live.pending(self.assigned.keys()) {
            // A guest is on its way out (or a previous agent's send waits for this one's
            // token): nothing is converged until it has left (or not).
            debug!("sending a guest live: converging after it");
            self.metrics.owned.set(self.held.len() as i64);
            return true;
        }
        let mut step = decide(&self.assigned, &self.held, false);
        let handed_over = self.live.handed_over(&self.held);
        // Sent away live: it runs on the target now, never here again.
        step.run.retain(|o| !handed_over.contains(&o.resource));
        let draining = self.draining(&step.release).await;
        let keep: Vec<Owned> = draining
            .keys()
            .cloned()
            .chain(handed_over.iter().filter_map(|r| self.held.get(r).cloned()))
            .map(|t| Owned {
                resource: t.resource().clone(),
                token: t,
                ha: false,
            })
            .collect();
        if fence_rx.borrow().stale_or_fenced(Instant::now()) {
            // The deadline passed during the round (acquisitions, reads): as at its start.
            return true;
        }
        if let Err(e) = self.converge(step.run, keep).await {
            warn!(error = %e, "converge failed");
            return true;
        }
        if self.fenced_meanwhile(fence_rx).await {
            return false;
        }
        for token in &step.release {
            match draining.get(token) {
                Some(Some(to)) if self.hand_off(token, to).await => {}
                Some(_) => {
                    retry = true;
                    continue;
                }
                None => {}
            }
            match owner::release(&self.store, token).await {
                Ok(_) => {
                    self.metrics.releases.inc();
                    self.held.remove(token.resource());
                }
                Err(e) => {
                    self.metrics.errors.with_label_values(&["release"]).inc();
                    warn!(resource = %token.resource(), error = %e, "release failed; retrying");
                    retry = true;
                }
            }
        }
        self.metrics.owned.set(self.held.len() as i64);
        retry
    }

    /// The workloads about to be released that are being migrated away from this node, with
    /// their target (`None`: the migration could not be read; their data is kept and the
    /// release waits).
    async fn draining(&self, release: &[FencingToken]) -> BTreeMap<FencingToken, Option<String>> {
        let mut out = BTreeMap::new();
        for token in release {
            match migrate::read(&self.store, token.resource()).await {
                Ok(Some(m))
                    if m.state == MigrationState::Assigned
                        && m.from.as_deref() == Some(self.node.as_str())
                        && m.to != self.node =>
                {
                    out.insert(token.clone(), Some(m.to));
                }
                Ok(_) => {}
                Err(e) => {
                    self.metrics.errors.with_label_values(&["handoff"]).inc();
                    warn!(resource = %token.resource(), error = %e, "reading the migration failed");
                    out.insert(token.clone(), None);
                }
            }
        }
        out
    }

    /// The engine's hand-off of `token`'s workload to `to` (a final replication); false:
    /// keep the token and try again later.
    async fn hand_off(&self, token: &FencingToken, to: &str) -> bool {
        let owned = Owned {
            resource: token.resource().clone(),
            token: token.clone(),
            ha: false,
        };
        let engine = self.engine.clone();
        let target = to.to_string();
        info!(resource = %owned.resource, %to, "migration: handing off before releasing");
        let result = tokio::task::spawn_blocking(move || engine.hand_off(&owned, &target))
            .await
            .unwrap_or_else(|e| Err(ConvergeError(format!("hand-off panicked: {e}"))));
        match result {
            Ok(()) => true,
            Err(e) => {
                warn!(resource = %token.resource(), %to, error = %e, "migration hand-off failed; keeping ownership, retrying");
                false
            }
        }
    }

    async fn converge(&self, run: Vec<Owned>, keep: Vec<Owned>) -> Result<(), ConvergeError> {
        let ha: Vec<ResourceRef> = run
            .iter()
            .filter(|o| o.ha)
            .map(|o| o.resource.clone())
            .collect();
        {
            // Recorded before starting, so a fence during the converge stops them too.
            let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
            running.ha.extend(ha.iter().cloned());
            running.ha.sort();
            running.ha.dedup();
        }
        let engine = self.engine.clone();
        let result = tokio::task::spawn_blocking(move || {
            if keep.is_empty() {
                engine.converge(&run)
            } else {
                engine.converge_keeping(&run, &keep)
            }
        })
        .await
        .unwrap_or_else(|e| Err(ConvergeError(format!("converge panicked: {e}"))));
        if result.is_ok() {
            let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
            // Read under the lock: a guest arriving now joins after this, not before.
            let mut now = ha;
            now.extend(self.live.arrived(&self.held));
            now.sort();
            now.dedup();
            running.ha = now;
        }
        result
    }

    /// A fence that fired while the engine was converging may have run before the engine
    /// started something: stop the HA workloads again and forget the tokens.
    async fn fenced_meanwhile(&mut self, fence_rx: &watch::Receiver<FenceState>) -> bool {
        let now = *fence_rx.borrow();
        if !now.is_fenced() && now.epoch() == self.epoch {
            return false;
        }
        warn!("fenced during converge: stopping HA workloads again");
        let ha = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .ha
            .clone();
        let engine = self.engine.clone();
        let _ = tokio::task::spawn_blocking(move || engine.stop_ha(&ha)).await;
        self.drop_tokens();
        true
    }

    /// Shutdown: stop the HA workloads (their ownership goes with the lease), release tokens.
    async fn stop_all(&mut self) {
        let ha = std::mem::take(
            &mut self
                .running
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .ha,
        );
        if !ha.is_empty() {
            let engine = self.engine.clone();
            let _ = tokio::task::spawn_blocking(move || engine.stop_ha(&ha)).await;
        }
        self.held.clear();
    }
}

/// Waiting before reconnecting a watch that failed: 100 ms, doubling up to 2 s.
#[derive(Debug, Default)]
struct Backoff {
    next: Option<Duration>,
    until: Option<Instant>,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(2);

    fn ready(&self) -> bool {
        self.until.is_none()
    }

    /// Records a failure; returns how long to wait.
    fn failed(&mut self) -> Duration {
        let wait = self.next.unwrap_or(Self::FIRST);
        self.next = Some((wait * 2).min(Self::MAX));
        self.until = Some(Instant::now() + wait);
        wait
    }

    async fn wait(&self) {
        sleep_until(self.until.unwrap_or_else(Instant::now)).await;
    }

    fn resume(&mut self) {
        self.until = None;
    }

    fn reset(&mut self) {
        self.next = None;
        self.until = None;
    }
}

fn stopped(what: &str) -> StoreError {
    StoreError::Protocol(format!("the {what} task stopped"))
}

fn keyed(a: Assignment) -> Option<(ResourceRef, Assignment)> {
    a.resource.parse().ok().map(|r| (r, a))
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86400 * 365)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assign(r: &str, ha: bool) -> (ResourceRef, Assignment) {
        let a = Assignment {
            resource: r.into(),
            node: "n1".into(),
            ha,
            revision: String::new(),
        };
        (r.parse().expect("ref"), a)
    }

    fn token(r: &str, rev: i64) -> (ResourceRef, FencingToken) {
        let res: ResourceRef = r.parse().expect("ref");
        (res.clone(), FencingToken::new(res, rev))
    }

    #[test]
    fn acquires_the_unowned_runs_the_owned_releases_the_unassigned() {
        let assigned = BTreeMap::from([assign("Container/a", true), assign("Container/b", false)]);
        let held = BTreeMap::from([token("Container/a", 7), token("Container/old", 3)]);
        let step = decide(&assigned, &held, false);
        assert_eq!(
            step.acquire,
            vec!["Container/b".parse::<ResourceRef>().expect("ref")]
        );
        assert_eq!(step.run.len(), 1);
        assert_eq!(step.run[0].token.revision(), 7);
        assert!(step.run[0].ha);
        assert_eq!(step.release, vec![token("Container/old", 3).1]);
    }

    #[test]
    fn never_runs_without_a_token() {
        let assigned = BTreeMap::from([assign("Container/a", true)]);
        let step = decide(&assigned, &BTreeMap::new(), false);
        assert!(step.run.is_empty());
        assert_eq!(step.acquire.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn watch_backoff_doubles_up_to_two_seconds_and_resets() {
        let mut b = Backoff::default();
        assert!(b.ready());
        let waits: Vec<_> = (0..7).map(|_| b.failed()).collect();
        let ms: Vec<u128> = waits.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 2000, 2000]);
        assert!(!b.ready());
        b.wait().await;
        b.resume();
        assert!(b.ready());
        b.reset();
        assert_eq!(b.failed(), Duration::from_millis(100));
    }

    #[test]
    fn fenced_does_nothing() {
        let assigned = BTreeMap::from([assign("Container/a", true)]);
        let held = BTreeMap::from([token("Container/a", 7)]);
        assert_eq!(decide(&assigned, &held, true), Step::default());
    }
}
