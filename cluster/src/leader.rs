//! The elected controller's loop: campaign; while leading, place the workloads of the
//! manifests on the registered nodes and write the assignments that change, again on every
//! manifest change and every node change; step down cleanly.
//!
//! Every assignment write is guarded by the leader token ([`crate::election`]), so a
//! deposed leader cannot write. The candidate's leadership is bound to a lease of its own,
//! kept alive here; when the lease is lost the term ends and the loop campaigns again.
//!
//! Right after an election, assignments on nodes this leader has not seen yet are held
//! for a settle period (one lease TTL by default): at a cold start of the cluster the
//! agents register one by one, and a leader that moved HA workloads off every node not
//! registered yet would shuffle the whole cluster. A node that registered and then
//! disappeared is dead at once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use stead_schema::{Desired, ResourceId};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::election::{self, Election, LeaderToken};
use crate::etcd::{Store, StoreError};
use crate::events::{self, ClusterEvent, EventKind};
use crate::keys::ResourceRef;
use crate::migrate::{self, Method, MigrationRecord, MigrationState};
use crate::model::{Assignment, NodeInfo};
use crate::placement::{self, NodeState, PlacementInput, PlacementResult, Unplaceable};
use crate::registry::{self, NodeEvent, NodeWatch};
use crate::replication;
use crate::watch::PrefixWatch;

/// How the controller campaigns and leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderConfig {
    /// Candidate name (the controller's host name), stored in the leader key.
    pub name: String,
    /// TTL of the candidate's lease: how long a dead leader keeps the leadership.
    pub lease_ttl: Duration,
    /// After an election, how long assignments on nodes not seen yet are held.
    pub settle: Duration,
    /// Pause before campaigning again after a retryable error.
    pub retry: Duration,
}

impl LeaderConfig {
    /// A candidate `name` with a lease of `ttl`, settling for one TTL.
    pub fn new(name: &str, ttl: Duration) -> Self {
        LeaderConfig {
            name: name.to_string(),
            lease_ttl: ttl,
            settle: ttl,
            retry: Duration::from_millis(500),
        }
    }
}

/// A manifest set to place, and its revision (a git commit, a content hash).
#[derive(Debug, Clone)]
pub struct Manifests {
    /// The validated desired set.
    pub desired: Desired,
    /// Written into new assignments.
    pub revision: String,
}

/// What the loop publishes after every placement (for status, metrics and logs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaderStatus {
    /// Whether this candidate leads now.
    pub leading: bool,
    /// The leader token of the current term.
    pub token: Option<i64>,
    /// Revision of the manifests last placed.
    pub revision: String,
    /// Nodes alive at the last placement.
    pub nodes: Vec<String>,
    /// Workloads no node can take, with the reasons.
    pub unplaceable: Vec<Unplaceable>,
    /// Workloads assigned to a dead node that stay there.
    pub unavailable: Vec<ResourceId>,
    /// Assignments written (put or deleted) since this candidate started.
    pub writes: u64,
    /// Workloads assigned to each node at the last placement.
    pub placements: BTreeMap<String, u64>,
    /// Workloads this candidate moved off a dead node since it started (failovers).
    pub failovers: u64,
}

/// Why the loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// etcd refused us, or the configuration cannot work: campaigning again would not help.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How a term ended.
enum TermEnd {
    /// Shutdown asked: resign.
    Shutdown,
    /// Leadership lost (lease gone, fenced write, etcd unreachable for too long).
    Lost(String),
}

/// Runs the controller: campaigns, leads while elected, campaigns again after losing, and
/// resigns when `shutdown` turns true. `manifests` gives the desired set (`None`: nothing
/// loaded yet, nothing is written); `status` receives what every placement decided.
pub async fn run(
    store: &Store,
    config: &LeaderConfig,
    manifests: watch::Receiver<Option<Arc<Manifests>>>,
    status: watch::Sender<LeaderStatus>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), LeaderError> {
    let span = info_span!("leader", candidate = %config.name);
    async move {
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            match campaign_and_lead(store, config, &manifests, &status, &mut shutdown).await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) if e.is_retryable() => {
                    debug!(error = %e, "campaign failed; trying again");
                    sleep(config.retry).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    .instrument(span)
    .await
}

/// One campaign and, when elected, one term. True when the loop should stop (shutdown).
async fn campaign_and_lead(
    store: &Store,
    config: &LeaderConfig,
    manifests: &watch::Receiver<Option<Arc<Manifests>>>,
    status: &watch::Sender<LeaderStatus>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<bool, StoreError> {
    let lease = CandidateLease::grant(store, config.lease_ttl).await?;
    let election = Election::new(store, &config.name, lease.id);
    let mut lost = lease.lost.clone();
    let token = tokio::select! {
        t = election.campaign() => t?,
        _ = turned_true(&mut lost) => return Ok(false),
        _ = turned_true(shutdown) => {
            lease.revoke(store).await;
            return Ok(true);
        }
    };
    info!(token = token.revision(), "leading");
    let mut term = Term::new(store, config, token, status);
    let end = term.lead(manifests, &mut lost, shutdown).await;
    status.send_modify(|s| {
        s.leading = false;
        s.token = None;
    });
    match end {
        TermEnd::Shutdown => {
            if let Err(e) = election.resign(token).await {
                warn!(error = %e, "resign failed; the lease ends the term");
            }
            lease.revoke(store).await;
            info!("stepped down");
            Ok(true)
        }
        TermEnd::Lost(why) => {
            warn!(reason = %why, "leadership lost");
            lease.revoke(store).await;
            Ok(false)
        }
    }
}

/// Resolves once `flag` is true (or its sender is gone), holding no borrow of it.
async fn turned_true(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|v| *v).await.map(|_| ());
}

/// The candidate's lease, kept alive by a task until dropped; `lost` turns true once it
/// cannot be kept (expired, or no keepalive acknowledged for a whole TTL).
struct CandidateLease {
    id: i64,
    lost: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl Drop for CandidateLease {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CandidateLease {
    async fn grant(store: &Store, ttl: Duration) -> Result<Self, StoreError> {
        let sent = Instant::now();
        let (id, granted) = store.grant_lease(ttl).await?;
        let (tx, lost) = watch::channel(false);
        let span = info_span!("candidate-lease", lease = format!("{id:x}"));
        let task = tokio::spawn(keep_lease(store.clone(), id, granted, sent, tx).instrument(span));
        Ok(CandidateLease { id, lost, task })
    }

    /// Ends the keepalive and revokes the lease (the leader key goes with it).
    async fn revoke(self, store: &Store) {
        self.task.abort();
        if let Err(e) = store.revoke_lease(self.id).await {
            debug!(error = %e, "revoking the candidate lease failed; it expires");
        }
    }
}

/// Keeps lease `id` alive every third of its TTL; sets `lost` when the lease expired or
/// the last acknowledged keepalive was sent a whole TTL ago. An answer is awaited at most
/// [`registry::ANSWER_WAIT`] and a failed stream is retried on the next member soon (100 ms
/// doubling to 300 ms), like a node's keepalives: waiting a whole interval for an answer and
/// again before the retry let one member cut off from the others (its link down) end the
/// term on every partition in the lab (lease 4 s: 1.3 s + 1.3 s + 1.3 s).
async fn keep_lease(
    store: Store,
    id: i64,
    ttl: Duration,
    granted_at: Instant,
    lost: watch::Sender<bool>,
) {
    let interval = (ttl / 3).max(Duration::from_millis(200));
    let wait = registry::ANSWER_WAIT.min(interval);
    let mut acked = granted_at;
    let mut backoff = registry::RETRY_MIN;
    let mut members = registry::MemberRotation::new(&store);
    loop {
        let before = acked;
        let client = members.client().await;
        let kept = registry::keep_lease_stream(client, id, interval, wait, |(sent, _)| {
            acked = sent;
        });
        match kept.await {
            Err(StoreError::LeaseExpired(_)) => break,
            Err(e) => {
                debug!(error = %e, "keepalive stream failed");
                members.advance();
            }
            Ok(()) => {}
        }
        if acked.elapsed() >= ttl {
            break;
        }
        if acked != before {
            backoff = registry::RETRY_MIN;
        }
        sleep(backoff).await;
        backoff = (backoff * 2).min(registry::RETRY_MAX);
    }
    lost.send_replace(true);
}

/// One term of leadership: the nodes and assignments as this leader knows them.
struct Term<'a> {
    store: &'a Store,
    config: &'a LeaderConfig,
    token: LeaderToken,
    status: &'a watch::Sender<LeaderStatus>,
    nodes: BTreeMap<String, NodeState>,
    current: BTreeMap<ResourceId, Assignment>,
    settle_until: Instant,
    unplaceable_seen: BTreeSet<String>,
    /// Operators' migration overrides (`stead migrate`).
    migrations: BTreeMap<ResourceId, MigrationRecord>,
    /// The volumes' replication statuses as last read: which node holds a replica besides
    /// the manifests' `to` (read at each placement round).
    replicas: placement::ReplicaStatuses,
}

impl<'a> Term<'a> {
    fn new(
        store: &'a Store,
        config: &'a LeaderConfig,
        token: LeaderToken,
        status: &'a watch::Sender<LeaderStatus>,
    ) -> Self {
        Term {
            store,
            config,
            token,
            status,
            nodes: BTreeMap::new(),
            current: BTreeMap::new(),
            settle_until: Instant::now() + config.settle,
            unplaceable_seen: BTreeSet::new(),
            migrations: BTreeMap::new(),
            replicas: placement::ReplicaStatuses::new(),
        }
    }

    /// Leads until shutdown or until leadership is lost.
    async fn lead(
        &mut self,
        manifests: &watch::Receiver<Option<Arc<Manifests>>>,
        lost: &mut watch::Receiver<bool>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> TermEnd {
        let mut manifests = manifests.clone();
        let (mut nodes, mut overrides) = match self.load().await {
            Ok(w) => w,
            Err(e) => return TermEnd::Lost(format!("cannot read the cluster: {e}")),
        };
        loop {
            let desired = manifests.borrow_and_update().clone();
            if let Err(e) = self.reconcile(desired.as_deref()).await {
                if *lost.borrow() {
                    return TermEnd::Lost("candidate lease lost".into());
                }
                if !e.is_retryable() {
                    return TermEnd::Lost(e.to_string());
                }
                warn!(error = %e, "writing assignments failed; retrying");
                sleep(self.config.retry).await;
                continue;
            }
            let settling = Instant::now() < self.settle_until;
            tokio::select! {
                events = nodes.next() => self.on_node_events(events).await,
                changes = overrides.next_batch() => self.on_migrations(changes).await,
                changed = manifests.changed() => {
                    if changed.is_err() {
                        return TermEnd::Shutdown;
                    }
                }
                _ = sleep_until(self.settle_until), if settling => debug!("settled"),
                _ = turned_true(lost) => return TermEnd::Lost("candidate lease lost".into()),
                _ = turned_true(shutdown) => return TermEnd::Shutdown,
            }
        }
    }

    /// Reads the migration overrides again after a change under their prefix.
    async fn on_migrations(&mut self, changes: Result<Vec<crate::watch::Change>, StoreError>) {
        if let Err(e) = changes {
            debug!(error = %e, "migration watch failed; resuming");
            sleep(self.config.retry).await;
            return;
        }
        match migrate::list(self.store).await {
            Ok((m, _)) => self.migrations = m,
            Err(e) => debug!(error = %e, "reading migrations failed"),
        }
    }

    /// Reads the nodes, the assignments and the migration overrides; returns the node and
    /// migration watches from there on.
    async fn load(&mut self) -> Result<(NodeWatch, PrefixWatch), StoreError> {
        let (migrations, at) = migrate::list(self.store).await?;
        self.migrations = migrations;
        let overrides = PrefixWatch::new(self.store, self.store.keys().migrations(), at + 1);
        let (infos, revision) = registry::list_nodes(self.store).await?;
        for info in infos {
            self.node_up(info);
        }
        let (assignments, _) = election::list_assignments(self.store).await?;
        for a in assignments {
            match a.resource.parse::<ResourceId>() {
                Ok(id) => {
                    self.current.insert(id, a);
                }
                Err(e) => warn!(resource = %a.resource, error = %e, "ignoring an assignment"),
            }
        }
        info!(
            nodes = self.nodes.len(),
            assignments = self.current.len(),
            migrations = self.migrations.len(),
            "cluster read"
        );
        Ok((NodeWatch::new(self.store, revision), overrides))
    }

    fn node_up(&mut self, info: NodeInfo) {
        let name = info.name.clone();
        let was = self
            .nodes
            .insert(name.clone(), NodeState { info, alive: true });
        if was.is_none_or(|n| !n.alive) {
            info!(node = %name, "node up");
        }
    }

    async fn on_node_events(&mut self, events: Result<Vec<NodeEvent>, StoreError>) {
        let events = match events {
            Ok(e) => e,
            Err(e) => {
                debug!(error = %e, "node watch failed; resuming");
                sleep(self.config.retry).await;
                return;
            }
        };
        for e in events {
            match e {
                NodeEvent::Up(info) => self.node_up(info),
                NodeEvent::Down(name) => self.node_down(&name),
                NodeEvent::Resync(infos) => {
                    let alive: BTreeSet<String> = infos.iter().map(|i| i.name.clone()).collect();
                    let gone: Vec<String> = self
                        .nodes
                        .keys()
                        .filter(|n| !alive.contains(*n))
                        .cloned()
                        .collect();
                    gone.iter().for_each(|n| self.node_down(n));
                    infos.into_iter().for_each(|i| self.node_up(i));
                }
            }
        }
    }

    fn node_down(&mut self, name: &str) {
        if let Some(n) = self.nodes.get_mut(name)
            && n.alive
        {
            n.alive = false;
            warn!(node = %name, "node down");
        }
    }

    /// Places the workloads of `manifests` and writes what changed.
    async fn reconcile(&mut self, manifests: Option<&Manifests>) -> Result<(), StoreError> {
        let Some(m) = manifests else {
            debug!("no manifests yet: nothing to place");
            return Ok(());
        };
        match replication::list_status(self.store).await {
            Ok(r) => self.replicas = r,
            Err(e) if e.is_retryable() => return Err(e),
            Err(e) => {
                warn!(error = %e, "replication statuses not read: placement uses the last ones")
            }
        }
        self.choose_methods(m).await;
        let (result, refused) = self.place_with_overrides(m);
        let (puts, deletes) = result.diff(&self.current);
        // Before the assignments: the source's agent reads the record (and so hands the
        // workload off) as soon as it sees the workload leave.
        self.record_migrations(&result, refused).await;
        self.record_handovers(m, &result).await?;
        let mut failovers = Vec::new();
        if !puts.is_empty() {
            election::put_assignments(self.store, &self.token, &puts).await?;
            for a in &puts {
                info!(resource = %a.resource, node = %a.node, "assigned");
                if let Some(from) = self.moved_off_dead_node(a) {
                    failovers.push(ClusterEvent::now(
                        EventKind::Failover,
                        &self.config.name,
                        Some(a.resource.clone()),
                        format!("{} moved from dead node {from} to {}", a.resource, a.node),
                    ));
                }
            }
        }
        for id in &deletes {
            let r = ResourceRef::new(id.kind.as_str(), &id.name)
                .map_err(|e| StoreError::Protocol(e.to_string()))?;
            election::delete_assignment(self.store, &self.token, &r).await?;
            info!(resource = %id, "unassigned");
        }
        let writes = (puts.len() + deletes.len()) as u64;
        self.current = result.assignments.clone();
        self.forget_idle_dead_nodes();
        let moved = failovers.len() as u64;
        let fresh = self.publish(m, result, writes, moved);
        events::spawn_records(self.store, failovers.into_iter().chain(fresh).collect());
        Ok(())
    }

    /// The dead node `a`'s workload was assigned to before, if it is moving off one.
    fn moved_off_dead_node(&self, a: &Assignment) -> Option<String> {
        let id = a.resource.parse::<ResourceId>().ok()?;
        let old = self.current.get(&id)?;
        let dead = self.nodes.get(&old.node).is_none_or(|n| !n.alive);
        (old.node != a.node && dead).then(|| old.node.clone())
    }

    /// Decides how each new override moves its workload ([`migrate::choose_method`] on what
    /// the manifests and the current assignment say): live ones go `preparing` (the
    /// workload stays where it runs until the guest runs on the target), cold ones stay
    /// `requested` with the method noted (placement pins them), impossible ones are
    /// refused. A failed write is retried at the next placement.
    async fn choose_methods(&mut self, m: &Manifests) {
        let mut updates = Vec::new();
        for (id, record) in &self.migrations {
            if record.state != MigrationState::Requested || record.method.is_some() {
                continue;
            }
            let next = self.method_of(m, id, record);
            updates.push((id.clone(), next));
        }
        for (id, next) in updates {
            let Ok(r) = ResourceRef::new(id.kind.as_str(), &id.name) else {
                continue;
            };
            info!(resource = %id, to = %next.to, state = ?next.state, method = ?next.method, "migration method");
            match migrate::put(self.store, &r, &next).await {
                Ok(()) => {
                    self.migrations.insert(id, next);
                }
                Err(e) => debug!(resource = %id, error = %e, "migration method not written"),
            }
        }
    }

    /// `record` with the method the leader chose for it (pure apart from reading the term).
    fn method_of(
        &self,
        m: &Manifests,
        id: &ResourceId,
        record: &MigrationRecord,
    ) -> MigrationRecord {
        let current = self
            .current
            .get(id)
            .filter(|a| self.nodes.get(&a.node).is_some_and(|n| n.alive));
        let on = current.map(|a| a.node.clone());
        let ha = current.is_none_or(|a| a.ha);
        let facts =
            placement::vm_live_facts(&m.desired, id, on.is_some()).map(|f| f.toward(&record.to));
        let mut next = record.clone();
        let refuse = |next: &mut MigrationRecord, why: String| {
            next.state = MigrationState::Refused;
            next.message = Some(why);
        };
        match (migrate::choose_method(record.mode, facts.as_ref()), on) {
            (Err(why), _) => refuse(&mut next, why),
            (Ok(Method::Live), Some(from)) if from != record.to => {
                let single = BTreeMap::from([(id.clone(), record.clone())]);
                let mut ws: Vec<_> = self
                    .workloads(m)
                    .into_iter()
                    .filter(|w| &w.id == id)
                    .collect();
                if let Some(why) = migrate::apply_overrides(&mut ws, &single).remove(id) {
                    refuse(&mut next, why);
                } else if let Some(why) =
                    migrate::refused_by_placement(&self.place(m, &single), &single).remove(id)
                {
                    // Checked before any QEMU starts: once the guest has moved it stays.
                    refuse(&mut next, why);
                } else if let Ok(live) = record.preparing(&from, ha) {
                    next = live;
                }
            }
            (Ok(Method::Live), _) => next.method = Some("cold (it is already there)".into()),
            (Ok(Method::Cold(why)), _) => next.method = Some(format!("cold ({why})")),
        }
        next
    }

    /// The placement of `m` with the migration overrides; the overrides refused, with why
    /// (placed again without them).
    fn place_with_overrides(
        &self,
        m: &Manifests,
    ) -> (PlacementResult, BTreeMap<ResourceId, String>) {
        let live: BTreeMap<ResourceId, MigrationRecord> = self
            .migrations
            .iter()
            // A request whose method is not written yet pins nothing: a live move must not
            // become a cold one because a write failed.
            .filter(|(_, r)| {
                r.state.pins()
                    && !r.placement_change
                    && !(r.state == MigrationState::Requested && r.method.is_none())
            })
            .map(|(id, r)| (id.clone(), r.clone()))
            .collect();
        let result = self.place(m, &live);
        let refused = migrate::refused_by_placement(&result, &live);
        let pre = self.pre_refused(m, &live);
        if refused.is_empty() && pre.is_empty() {
            return (result, refused);
        }
        let kept: BTreeMap<ResourceId, MigrationRecord> = live
            .into_iter()
            .filter(|(id, _)| !refused.contains_key(id) && !pre.contains_key(id))
            .collect();
        let mut all = refused;
        all.extend(pre);
        let mut result = self.place(m, &kept);
        self.keep_completed_on_target(&mut result, &mut all);
        (result, all)
    }

    /// A completed live migration is never refused: its guest already runs on the target,
    /// so it is assigned there whatever placement says now (capacity, a constraint that
    /// changed); the reason is logged and recorded as an event instead.
    fn keep_completed_on_target(
        &self,
        result: &mut PlacementResult,
        refused: &mut BTreeMap<ResourceId, String>,
    ) {
        for (id, record) in &self.migrations {
            let completed = record.state == MigrationState::Completed;
            let moved_live = record.state == MigrationState::Assigned
                && record.method.as_deref() == Some("live");
            if !completed && !moved_live {
                continue;
            }
            let Some(why) = refused.remove(id) else {
                continue;
            };
            let Some(mut a) = result
                .assignments
                .get(id)
                .or_else(|| self.current.get(id))
                .cloned()
            else {
                continue;
            };
            warn!(resource = %id, to = %record.to, reason = %why, "the guest of a completed live migration runs there: assigned there anyway");
            a.node.clone_from(&record.to);
            result.assignments.insert(id.clone(), a);
            result.unplaceable.retain(|u| &u.id != id);
            if !completed {
                continue;
            }
            events::spawn_records(
                self.store,
                vec![ClusterEvent::now(
                    EventKind::Overcommitted,
                    &self.config.name,
                    Some(id.to_string()),
                    format!(
                        "{id} stays on node {} where its live migration completed, although {why}",
                        record.to
                    ),
                )],
            );
        }
    }

    /// The workloads of `m`, their data also on the replica holders the statuses name.
    fn workloads(&self, m: &Manifests) -> Vec<placement::Workload> {
        placement::workloads_with_replicas(&m.desired, &self.replicas)
    }

    /// Overrides the manifests forbid before any node is looked at.
    fn pre_refused(
        &self,
        m: &Manifests,
        live: &BTreeMap<ResourceId, MigrationRecord>,
    ) -> BTreeMap<ResourceId, String> {
        let mut all = self.workloads(m);
        migrate::apply_overrides(&mut all, live)
    }

    /// Marks honoured overrides `assigned` (with the node they left) and refused ones
    /// `refused` with the reason; a failed write is retried at the next placement.
    async fn record_migrations(
        &mut self,
        result: &PlacementResult,
        refused: BTreeMap<ResourceId, String>,
    ) {
        let mut updates = Vec::new();
        for (id, record) in &self.migrations {
            let mut next = record.clone();
            if let Some(why) = refused.get(id) {
                if record.state == MigrationState::Refused {
                    continue;
                }
                warn!(resource = %id, to = %record.to, reason = %why, "migration refused");
                next.state = MigrationState::Refused;
                next.message = Some(why.clone());
            } else if matches!(
                record.state,
                MigrationState::Requested | MigrationState::Completed
            ) && result
                .assignments
                .get(id)
                .is_some_and(|a| a.node == record.to)
            {
                next.state = MigrationState::Assigned;
                if record.state == MigrationState::Requested {
                    next.from = self.current.get(id).map(|a| a.node.clone());
                }
                info!(resource = %id, to = %record.to, from = ?next.from, "migration assigned");
            } else {
                continue;
            }
            updates.push((id.clone(), next));
        }
        for (id, next) in updates {
            let Ok(r) = ResourceRef::new(id.kind.as_str(), &id.name) else {
                continue;
            };
            match migrate::put(self.store, &r, &next).await {
                Ok(()) => {
                    self.migrations.insert(id, next);
                }
                Err(e) => debug!(resource = %id, error = %e, "migration state not written"),
            }
        }
    }

    /// Marks each move of a manifest placement change whose data must follow (volumes
    /// replicated to the new node) with a hand-over record ([`migrate::handovers`]) before
    /// the assignment changes: the source's agent reads it when it releases the workload and
    /// sends a final replication first. A failed write fails the round: no such assignment
    /// moves without its record.
    async fn record_handovers(
        &mut self,
        m: &Manifests,
        result: &PlacementResult,
    ) -> Result<(), StoreError> {
        let workloads = self.workloads(m);
        let nodes = &self.nodes;
        let alive = |n: &str| nodes.get(n).is_some_and(|s| s.alive);
        let moves = migrate::handovers(
            &workloads,
            &self.current,
            &result.assignments,
            alive,
            &self.migrations,
        );
        let stale = self.stale_handovers(result, &moves);
        for (id, record) in moves {
            let r = ResourceRef::new(id.kind.as_str(), &id.name)
                .map_err(|e| StoreError::Protocol(e.to_string()))?;
            migrate::put(self.store, &r, &record).await?;
            info!(resource = %id, from = ?record.from, to = %record.to, "placement change: hand-over with a final replication");
            self.migrations.insert(id, record);
        }
        for id in stale {
            let Ok(r) = ResourceRef::new(id.kind.as_str(), &id.name) else {
                continue;
            };
            match migrate::clear(self.store, &r).await {
                Ok(_) => {
                    self.migrations.remove(&id);
                }
                Err(e) => debug!(resource = %id, error = %e, "old hand-over record not cleared"),
            }
        }
        Ok(())
    }

    /// Workloads that move now without a hand-over but still have the record of an earlier
    /// one: it is cleared, so their old node never hands them to that node again.
    fn stale_handovers(
        &self,
        result: &PlacementResult,
        moves: &[(ResourceId, MigrationRecord)],
    ) -> Vec<ResourceId> {
        self.migrations
            .iter()
            .filter(|(id, r)| r.placement_change && !moves.iter().any(|(m, _)| m == *id))
            .filter(|(id, _)| {
                let now = self.current.get(*id).map(|a| a.node.as_str());
                let next = result.assignments.get(*id).map(|a| a.node.as_str());
                now.is_some() && now != next
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The placement of `m` now, with `overrides` pinned; while settling, assignments on
    /// nodes not seen yet are held as they are.
    fn place(
        &self,
        m: &Manifests,
        overrides: &BTreeMap<ResourceId, MigrationRecord>,
    ) -> PlacementResult {
        let settling = Instant::now() < self.settle_until;
        let held: BTreeMap<ResourceId, Assignment> = self
            .current
            .iter()
            .filter(|(_, a)| settling && !self.nodes.contains_key(&a.node))
            .map(|(id, a)| (id.clone(), a.clone()))
            .collect();
        let all = self.workloads(m);
        let wanted: BTreeSet<ResourceId> = all.iter().map(|w| w.id.clone()).collect();
        let mut workloads: Vec<placement::Workload> = all
            .into_iter()
            .filter(|w| !held.contains_key(&w.id))
            .collect();
        migrate::apply_overrides(&mut workloads, overrides);
        let current: BTreeMap<ResourceId, Assignment> = self
            .current
            .iter()
            .filter(|(id, _)| !held.contains_key(*id))
            .map(|(id, a)| (id.clone(), a.clone()))
            .collect();
        let nodes: Vec<NodeState> = self.nodes.values().cloned().collect();
        let groups = placement::ha_groups(&m.desired);
        let mut result = placement::place(&PlacementInput {
            nodes: &nodes,
            workloads: &workloads,
            groups: &groups,
            current: &current,
            revision: &m.revision,
        });
        for (id, a) in held.into_iter().filter(|(id, _)| wanted.contains(id)) {
            result.assignments.insert(id, a);
        }
        result
    }

    /// Drops dead nodes that no assignment names any more.
    fn forget_idle_dead_nodes(&mut self) {
        let used: BTreeSet<&str> = self.current.values().map(|a| a.node.as_str()).collect();
        self.nodes
            .retain(|name, n| n.alive || used.contains(name.as_str()));
    }

    /// Logs newly unplaceable workloads and publishes the status; the events of the newly
    /// unplaceable.
    fn publish(
        &mut self,
        m: &Manifests,
        result: PlacementResult,
        writes: u64,
        failovers: u64,
    ) -> Vec<ClusterEvent> {
        let now: BTreeSet<String> = result.unplaceable.iter().map(ToString::to_string).collect();
        let mut fresh = Vec::new();
        for u in result
            .unplaceable
            .iter()
            .filter(|u| !self.unplaceable_seen.contains(&u.to_string()))
        {
            warn!("{u}");
            fresh.push(ClusterEvent::now(
                EventKind::Unplaceable,
                &self.config.name,
                Some(u.id.to_string()),
                u.to_string(),
            ));
        }
        self.unplaceable_seen = now;
        let mut placements: BTreeMap<String, u64> = BTreeMap::new();
        for a in result.assignments.values() {
            *placements.entry(a.node.clone()).or_default() += 1;
        }
        let nodes = self
            .nodes
            .values()
            .filter(|n| n.alive)
            .map(|n| n.info.name.clone())
            .collect();
        let token = self.token.revision();
        self.status.send_modify(|s| {
            s.leading = true;
            s.token = Some(token);
            s.revision = m.revision.clone();
            s.nodes = nodes;
            s.unplaceable = result.unplaceable;
            s.unavailable = result.unavailable;
            s.writes += writes;
            s.placements = placements;
            s.failovers += failovers;
        });
        fresh
    }
}
