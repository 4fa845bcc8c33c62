//! The agents' side of a live migration (`stead migrate --live`), driven by the migration
//! record ([`crate::migrate::MigrationState`]):
//!
//! 1. The leader writes `preparing` (from the source, to the target). The workload stays
//!    assigned to and owned by the source.
//! 2. The target's agent starts the VM waiting for the guest ([`Converge::start_incoming`])
//!    and writes `incoming` with the address it listens on.
//! 3. The source's agent, while its ownership is current, sends the guest
//!    ([`Converge::migrate_out`]) and writes `transferring` with the progress; every write
//!    compares its owner key's create revision (its fencing token), so a fenced source
//!    cannot report anything. While it sends, the source converges nothing.
//! 4. On completion the source's QEMU is stopped for good and the source writes
//!    `completed`; its agent never starts the workload again while it still owns it. The
//!    leader then assigns the workload to the target; the source releases its owner key
//!    with a delete guarded by its token; the target acquires a new key (a new token) and
//!    converges a VM that already runs ([`Converge::finish_incoming`] made it an ordinary
//!    one).
//! 5. On a failure (the engine's, a cancel — the record cleared or replaced —, or a stall
//!    the target notices) the record says why, the source keeps running and owning the
//!    guest, and the target kills its waiting QEMU ([`Converge::abort_incoming`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::agent::{Converge, ConvergeError, Owned, Running};
use crate::etcd::{Store, StoreError};
use crate::fence::FenceState;
use crate::keys::{Key, ResourceRef};
use crate::migrate::{self, LiveProgress, MigrationRecord, MigrationState};
use crate::owner::FencingToken;
use crate::watch::{Change, decode_or_skip, list_prefix};

/// What this node does about one migration record (see [`live_action`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveAction {
    /// Target: start the VM waiting for the guest.
    StartIncoming,
    /// Source: send the guest to this `tcp:` address.
    Send(String),
    /// Source: a send this agent did not start is under way (the agent was restarted
    /// while sending): ask the VM's QEMU how it stands and follow it to its end.
    Resume,
    /// Target: the guest runs here; the waiting VM becomes an ordinary one.
    FinishIncoming,
    /// Target: kill the waiting VM (the move failed, was refused or cleared).
    AbortIncoming,
    /// Target: a move to here this agent is not waiting for (it was restarted): take the
    /// VM that runs the guest as an incoming one, or end the move if it does not run it.
    Adopt,
    /// Nothing.
    Nothing,
}

/// Decides this node's part in a live migration (pure): `record` is the migration of the
/// workload (`None`: cleared), `owns` whether this node holds its ownership now,
/// `waiting` whether this node has a VM waiting for it, `sending` whether it is sending it,
/// `known` whether this agent saw the move `preparing` (else it joined it later: a restart).
pub fn live_action(
    node: &str,
    record: Option<&MigrationRecord>,
    owns: bool,
    waiting: bool,
    sending: bool,
    known: bool,
) -> LiveAction {
    let Some(r) = record else {
        return if waiting {
            LiveAction::AbortIncoming
        } else {
            LiveAction::Nothing
        };
    };
    if r.to == node {
        return match r.state {
            MigrationState::Preparing if !waiting => LiveAction::StartIncoming,
            MigrationState::Completed | MigrationState::Assigned if waiting => {
                LiveAction::FinishIncoming
            }
            MigrationState::Incoming | MigrationState::Transferring if !waiting => {
                LiveAction::Adopt
            }
            MigrationState::Completed | MigrationState::Assigned
                if !owns && r.method.as_deref() == Some("live") =>
            {
                LiveAction::Adopt
            }
            MigrationState::Preparing | MigrationState::Incoming | MigrationState::Transferring => {
                LiveAction::Nothing
            }
            _ if waiting => LiveAction::AbortIncoming,
            _ => LiveAction::Nothing,
        };
    }
    if r.from.as_deref() != Some(node) || !owns || sending {
        return LiveAction::Nothing;
    }
    match (&r.state, &r.listen) {
        (MigrationState::Incoming, Some(uri)) if known => LiveAction::Send(uri.clone()),
        (MigrationState::Incoming | MigrationState::Transferring, _) => LiveAction::Resume,
        _ => LiveAction::Nothing,
    }
}

/// Whether this node is the source of `record` in flight but does not hold the workload's
/// ownership yet (pure): a restarted agent, before its first round; nothing may be
/// converged until it has taken the send up again ([`LiveAction::Resume`]).
pub fn awaits_token(node: &str, record: &MigrationRecord, owns: bool, sending: bool) -> bool {
    record.from.as_deref() == Some(node)
        && record.to != node
        && !owns
        && !sending
        && matches!(
            record.state,
            MigrationState::Incoming | MigrationState::Transferring
        )
}

/// How the source takes part in the transfer.
#[derive(Debug, Clone)]
enum Out {
    /// Starts it to this address.
    Send(String),
    /// Follows the one QEMU has under way.
    Resume,
}

/// How often the source writes its progress into the record at most.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// What the agent loop and the hand-over tasks share.
#[derive(Debug, Default)]
struct Shared {
    /// Workloads this node is sending (the agent converges nothing meanwhile).
    sending: BTreeSet<ResourceRef>,
    /// Workloads this node sent away and still owns (never started again here).
    handed_over: BTreeSet<ResourceRef>,
    /// Workloads this node has a VM waiting for (or starting).
    waiting: BTreeSet<ResourceRef>,
    /// Moves away from here this agent saw `preparing`, by workload: their request time.
    known: BTreeMap<ResourceRef, u64>,
    /// Workloads sent from here by a previous agent whose send waits for this one's token.
    pending: BTreeSet<ResourceRef>,
    /// Moves to here a previous agent was receiving, being taken up (nothing converges).
    adopting: BTreeSet<ResourceRef>,
    /// Moves to here taken up already, by workload: their request time.
    adopted: BTreeMap<ResourceRef, u64>,
    /// Highly available guests that arrived here (or were about to) before this node owns
    /// them: the fence stops them too.
    arrived: BTreeSet<ResourceRef>,
}

/// The live migrations this node takes part in.
pub struct LiveHandOver {
    store: Store,
    node: String,
    engine: Arc<dyn Converge>,
    shared: Arc<Mutex<Shared>>,
    wake: mpsc::UnboundedSender<()>,
    /// What the fence stops, and how often it fired.
    fence_set: Running,
    /// The fence guard's state.
    fence: watch::Receiver<FenceState>,
    /// How long a record may stay in flight without changing before the target fails it.
    pub stall: Duration,
}

impl LiveHandOver {
    /// The hand-over of `node`; the receiver wakes the agent loop when a task ended.
    /// `fence_set` is what the fence callback stops, `fence` the guard's state.
    pub(crate) fn new(
        store: &Store,
        node: &str,
        engine: Arc<dyn Converge>,
        fence_set: Running,
        fence: watch::Receiver<FenceState>,
    ) -> (Self, mpsc::UnboundedReceiver<()>) {
        let (wake, rx) = mpsc::unbounded_channel();
        let me = Self {
            store: store.clone(),
            node: node.to_string(),
            engine,
            shared: Arc::default(),
            wake,
            fence_set,
            fence,
            stall: Duration::from_secs(60),
        };
        (me, rx)
    }

    /// The highly available guests that arrived here live and that this node does not hold
    /// yet (the fence stops them too); forgets those it holds now.
    pub fn arrived(&self, held: &BTreeMap<ResourceRef, FencingToken>) -> Vec<ResourceRef> {
        let mut s = self.lock();
        s.arrived.retain(|r| !held.contains_key(r));
        s.arrived.iter().cloned().collect()
    }

    /// What a task needs to let a guest run here before this node owns it.
    fn arrival(&self) -> Arrival {
        Arrival {
            engine: self.engine.clone(),
            shared: self.shared.clone(),
            fence_set: self.fence_set.clone(),
            fence: self.fence.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a guest is being sent from here now (the agent converges nothing).
    pub fn sending(&self) -> bool {
        !self.lock().sending.is_empty()
    }

    /// Whether a send that a previous agent of this node started waits for this agent's
    /// ownership of one of `assigned` (the agent acquires, converges nothing, reads the
    /// migrations again).
    pub fn pending<'a>(&self, mut assigned: impl Iterator<Item = &'a ResourceRef>) -> bool {
        let s = self.lock();
        !s.adopting.is_empty() || (!s.pending.is_empty() && assigned.any(|r| s.pending.contains(r)))
    }

    /// Workloads sent away from here that must not run here again; forgets those this node
    /// no longer holds.
    pub fn handed_over(&self, held: &BTreeMap<ResourceRef, FencingToken>) -> BTreeSet<ResourceRef> {
        let mut s = self.lock();
        s.handed_over.retain(|r| held.contains_key(r));
        s.handed_over.clone()
    }

    /// Reads every migration record and acts on each (after a start or a resync).
    pub async fn resync(
        &self,
        held: &BTreeMap<ResourceRef, FencingToken>,
    ) -> Result<(), StoreError> {
        let (entries, _) = list_prefix(&self.store, &self.store.keys().migrations()).await?;
        let mut seen = BTreeSet::new();
        for e in entries {
            let Some(Key::Migration(r)) = self.store.keys().parse(&e.key) else {
                continue;
            };
            if let Some((record, rev)) = migrate::read_versioned(&self.store, &r).await? {
                self.act(&r, Some((record, rev)), held);
            }
            seen.insert(r);
        }
        let gone: Vec<ResourceRef> = self
            .lock()
            .waiting
            .iter()
            .filter(|r| !seen.contains(*r))
            .cloned()
            .collect();
        for r in gone {
            self.act(&r, None, held);
        }
        Ok(())
    }

    /// Acts on changes of the migration records.
    pub async fn on_changes(
        &self,
        changes: Vec<Change>,
        held: &BTreeMap<ResourceRef, FencingToken>,
    ) -> Result<(), StoreError> {
        for c in changes {
            match c {
                Change::Put {
                    key,
                    value,
                    mod_revision,
                    ..
                } => {
                    let Some(Key::Migration(r)) = self.store.keys().parse(&key) else {
                        continue;
                    };
                    let record = decode_or_skip::<MigrationRecord>(&key, &value);
                    if let Some(record) = record {
                        self.act(&r, Some((record, mod_revision)), held);
                    }
                }
                Change::Delete { key, .. } => {
                    if let Some(Key::Migration(r)) = self.store.keys().parse(&key) {
                        self.act(&r, None, held);
                    }
                }
                Change::Resync => self.resync(held).await?,
            }
        }
        Ok(())
    }

    fn act(
        &self,
        resource: &ResourceRef,
        record: Option<(MigrationRecord, i64)>,
        held: &BTreeMap<ResourceRef, FencingToken>,
    ) {
        let token = held.get(resource);
        let (waiting, sending, known) = {
            let mut s = self.lock();
            let (waiting, sending) = (s.waiting.contains(resource), s.sending.contains(resource));
            let known = self.note_source(
                &mut s,
                resource,
                record.as_ref().map(|(r, _)| r),
                token.is_some(),
            );
            (waiting, sending, known)
        };
        let action = live_action(
            &self.node,
            record.as_ref().map(|(r, _)| r),
            token.is_some(),
            waiting,
            sending,
            known,
        );
        let handed_over = {
            let mut s = self.lock();
            if record.as_ref().is_none_or(|(r, _)| r.to != self.node) {
                s.adopted.remove(resource);
            }
            s.handed_over.contains(resource)
        };
        match (action, record, token) {
            (LiveAction::StartIncoming, Some((r, rev)), _) => self.start_incoming(resource, r, rev),
            (LiveAction::Send(uri), Some((r, rev)), Some(t)) => {
                self.send(t, r, rev, Out::Send(uri));
            }
            // Sent by this agent already: only its end is missing from the record, and the
            // target records it once its VM runs the guest.
            (LiveAction::Resume, _, _) if handed_over => {}
            (LiveAction::Resume, Some((r, rev)), Some(t)) => {
                warn!(resource = %resource, state = ?r.state, "live migration under way from a previous agent: asking QEMU how it stands");
                self.send(t, r, rev, Out::Resume);
            }
            (LiveAction::FinishIncoming, record, _) => {
                let ha = record.as_ref().is_none_or(|(r, _)| r.stops_on_fence());
                if let Some((r, _)) = record {
                    // Taken up: the `assigned` that follows is nothing to adopt.
                    self.lock()
                        .adopted
                        .insert(resource.clone(), r.requested_at_ms);
                }
                self.finish_incoming(resource, ha);
            }
            (LiveAction::Adopt, Some((r, rev)), _) => self.adopt(resource, r, rev),
            (LiveAction::AbortIncoming, _, _) => self.abort_incoming(resource),
            _ => {}
        }
    }

    /// Source bookkeeping for `record` of `resource`: remembers a move seen `preparing` from
    /// here, and the sends waiting for a token. Whether this agent knew the move.
    fn note_source(
        &self,
        s: &mut Shared,
        resource: &ResourceRef,
        record: Option<&MigrationRecord>,
        owns: bool,
    ) -> bool {
        let Some(r) = record.filter(|r| r.from.as_deref() == Some(self.node.as_str())) else {
            s.known.remove(resource);
            s.pending.remove(resource);
            return false;
        };
        if r.state == MigrationState::Preparing {
            s.known.insert(resource.clone(), r.requested_at_ms);
        }
        let sending = s.sending.contains(resource);
        if awaits_token(&self.node, r, owns, sending) {
            s.pending.insert(resource.clone());
        } else {
            s.pending.remove(resource);
        }
        s.known.get(resource) == Some(&r.requested_at_ms)
    }

    /// Target: starts the waiting VM, publishes its address; a stall watch fails it later.
    fn start_incoming(&self, resource: &ResourceRef, record: MigrationRecord, rev: i64) {
        self.lock().waiting.insert(resource.clone());
        let (store, engine, res) = (self.store.clone(), self.engine.clone(), resource.clone());
        let (shared, wake, stall) = (self.shared.clone(), self.wake.clone(), self.stall);
        info!(resource = %res, from = ?record.from, "live migration: starting the VM waiting for the guest");
        tokio::spawn(async move {
            let e2 = engine.clone();
            let r2 = res.clone();
            let started = tokio::task::spawn_blocking(move || e2.start_incoming(&r2))
                .await
                .unwrap_or_else(|e| Err(ConvergeError(format!("start panicked: {e}"))));
            let written = match started {
                Ok(uri) => match record.incoming(&uri) {
                    Ok(next) => write(&store, &res, &next, rev, None).await,
                    Err(e) => Err(e.to_string()),
                },
                Err(e) => Err(format!("the target could not start the VM: {e}")),
            };
            match written {
                Ok(_) => stall_watch(&store, &engine, &res, stall).await,
                Err(why) => {
                    warn!(resource = %res, reason = %why, "live migration: target side failed");
                    if let Ok(failed) = record.failed(&why) {
                        let _ = write(&store, &res, &failed, rev, None).await;
                    }
                    shared
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .waiting
                        .remove(&res);
                    let e3 = engine.clone();
                    let _ = tokio::task::spawn_blocking(move || e3.abort_incoming(&res)).await;
                }
            }
            let _ = wake.send(());
        });
    }

    /// Target, after a restart: takes up the move of `record` (once per move). A VM that
    /// runs the guest becomes this node's (the move is recorded `completed` if it was still
    /// in flight); a VM still waiting is killed and the move recorded `failed`. Nothing is
    /// converged meanwhile (a converge would stop the VM this node does not own yet).
    fn adopt(&self, resource: &ResourceRef, record: MigrationRecord, rev: i64) {
        {
            let mut s = self.lock();
            if s.adopted.get(resource) == Some(&record.requested_at_ms)
                || s.adopting.contains(resource)
            {
                return;
            }
            s.adopting.insert(resource.clone());
        }
        warn!(resource = %resource, state = ?record.state, "live migration to here from a previous agent: taking it up");
        let (store, engine, res) = (self.store.clone(), self.engine.clone(), resource.clone());
        let (shared, wake, arrival) = (self.shared.clone(), self.wake.clone(), self.arrival());
        tokio::spawn(async move {
            let (e2, r2) = (engine.clone(), res.clone());
            let runs = tokio::task::spawn_blocking(move || e2.incoming_runs(&r2))
                .await
                .unwrap_or(false);
            let in_flight = record.state.is_live_in_flight();
            let next = if runs || !in_flight {
                let done = arrival.run(res.clone(), record.stops_on_fence()).await;
                if let Err(e) = done {
                    warn!(resource = %res, error = %e, "live migration: taking the guest up failed");
                }
                in_flight.then(|| record.completed(None))
            } else {
                let (e2, r2) = (engine.clone(), res.clone());
                let _ = tokio::task::spawn_blocking(move || e2.abort_incoming(&r2)).await;
                Some(record.failed("the target's agent restarted before the guest arrived"))
            };
            if let Some(Ok(next)) = next
                && let Err(why) = write(&store, &res, &next, rev, None).await
            {
                warn!(resource = %res, reason = %why, "live migration: the end was not recorded");
            }
            let mut s = shared.lock().unwrap_or_else(PoisonError::into_inner);
            s.adopting.remove(&res);
            s.adopted.insert(res, record.requested_at_ms);
            drop(s);
            let _ = wake.send(());
        });
    }

    /// Target: the guest runs here now (`ha`: a fence stops it, see [`Arrival::run`]).
    fn finish_incoming(&self, resource: &ResourceRef, ha: bool) {
        if !self.lock().waiting.remove(resource) {
            return;
        }
        let (arrival, res, wake) = (self.arrival(), resource.clone(), self.wake.clone());
        tokio::spawn(async move {
            let done = arrival.run(res.clone(), ha).await;
            match done {
                Ok(()) => info!(resource = %res, "live migration: the guest runs here"),
                Err(e) => warn!(resource = %res, error = %e, "live migration: finishing failed"),
            }
            let _ = wake.send(());
        });
    }

    /// Target: kills the waiting VM.
    fn abort_incoming(&self, resource: &ResourceRef) {
        if !self.lock().waiting.remove(resource) {
            return;
        }
        warn!(resource = %resource, "live migration failed or cleared: killing the waiting VM");
        let (engine, res, wake) = (self.engine.clone(), resource.clone(), self.wake.clone());
        tokio::spawn(async move {
            let _ = tokio::task::spawn_blocking(move || engine.abort_incoming(&res)).await;
            let _ = wake.send(());
        });
    }

    /// Source: sends the guest (or follows the send under way) while `token` is current,
    /// writing progress, then the end.
    fn send(&self, token: &FencingToken, record: MigrationRecord, rev: i64, how: Out) {
        let res = token.resource().clone();
        {
            let mut s = self.lock();
            s.sending.insert(res.clone());
            s.pending.remove(&res);
        }
        info!(resource = %res, ?how, to = %record.to, "live migration: sending the guest");
        let owned = Owned {
            resource: res.clone(),
            token: token.clone(),
            ha: false,
        };
        let (store, engine) = (self.store.clone(), self.engine.clone());
        let (shared, wake) = (self.shared.clone(), self.wake.clone());
        tokio::spawn(async move {
            let cancel = Arc::new(AtomicBool::new(false));
            let (tx, rx) = mpsc::unbounded_channel::<LiveProgress>();
            let original = record.clone();
            let writer = tokio::spawn(write_progress(
                store.clone(),
                owned.token.clone(),
                record,
                rev,
                rx,
                cancel.clone(),
            ));
            let c2 = cancel.clone();
            let o2 = owned.clone();
            let h2 = how.clone();
            let sent = tokio::task::spawn_blocking(move || {
                let mut report = |p| {
                    let _ = tx.send(p);
                    !c2.load(Ordering::SeqCst)
                };
                match h2 {
                    Out::Send(uri) => engine.migrate_out(&o2, &uri, &mut report),
                    Out::Resume => engine.resume_out(&o2, &mut report),
                }
            })
            .await
            .unwrap_or_else(|e| Err(ConvergeError(format!("send panicked: {e}"))));
            if sent.is_ok() {
                // Before the agent may converge again: never start it here again.
                let mut s = shared.lock().unwrap_or_else(PoisonError::into_inner);
                s.handed_over.insert(owned.resource.clone());
            }
            let written = writer.await.unwrap_or((None, 0));
            finish_send(&store, &owned, written, original, sent, &how).await;
            // Only once its end is recorded: until then no resume may start for it.
            shared
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .sending
                .remove(&owned.resource);
            let _ = wake.send(());
        });
    }
}

/// Writes the source's progress (at most every [`PROGRESS_EVERY`]) until the engine is done;
/// a write refused (the record changed or the token is no longer current) cancels the
/// send. The last record written and its revision.
async fn write_progress(
    store: Store,
    token: FencingToken,
    mut record: MigrationRecord,
    mut rev: i64,
    mut rx: mpsc::UnboundedReceiver<LiveProgress>,
    cancel: Arc<AtomicBool>,
) -> (Option<MigrationRecord>, i64) {
    let mut last: Option<Instant> = None;
    let mut pending: Option<LiveProgress> = None;
    while let Some(p) = rx.recv().await {
        pending = Some(p);
        if last.is_some_and(|t| t.elapsed() < PROGRESS_EVERY) || cancel.load(Ordering::SeqCst) {
            continue;
        }
        let Some(p) = pending.take() else { continue };
        let Ok(next) = record.transferring(p) else {
            cancel.store(true, Ordering::SeqCst);
            continue;
        };
        match write(&store, token.resource(), &next, rev, Some(&token)).await {
            Ok(r) => {
                record = next;
                rev = r;
                last = Some(Instant::now());
            }
            Err(why) => {
                warn!(resource = %token.resource(), reason = %why, "live migration: cancelling");
                cancel.store(true, Ordering::SeqCst);
            }
        }
    }
    if let Some(p) = pending {
        record.progress = Some(p);
    }
    if cancel.load(Ordering::SeqCst) {
        return (None, rev);
    }
    (Some(record), rev)
}

/// Writes how the send ended: `completed` or `failed` with why. A cancelled send leaves the
/// record to whoever changed it, unless the guest left anyway (QEMU completed as it was
/// being cancelled): then a cleared record is written again as `completed` (from
/// `original`, only if nobody wrote a new one, with the token), so that the target takes
/// the guest over.
async fn finish_send(
    store: &Store,
    owned: &Owned,
    (record, rev): (Option<MigrationRecord>, i64),
    original: MigrationRecord,
    sent: Result<LiveProgress, ConvergeError>,
    how: &Out,
) {
    let res = &owned.resource;
    let (record, rev) = match (record, &sent) {
        (Some(r), _) => (r, rev),
        (None, Ok(_)) => {
            warn!(resource = %res, "the guest left although the migration was cancelled");
            (original.clone(), 0)
        }
        (None, Err(e)) => {
            warn!(resource = %res, outcome = %e, "live migration cancelled; the guest stays here");
            return;
        }
    };
    let next = match &sent {
        Ok(last) => record.completed(Some(last.clone())),
        Err(e) => record.failed(&match how {
            Out::Send(_) => format!("the source could not send the guest: {e}"),
            Out::Resume => format!("the source's agent restarted during the send: {e}"),
        }),
    };
    let Ok(next) = next else { return };
    let mut written = write(store, res, &next, rev, Some(&owned.token)).await;
    if written.is_err() && sent.is_ok() && rev != 0 {
        // Cleared as the guest left: the guest runs on the target all the same, and the
        // record must say so (only if nobody wrote a new one).
        warn!(resource = %res, "the guest left as the migration was being cleared");
        if let Ok(again) = original.completed(sent.as_ref().ok().cloned()) {
            written = write(store, res, &again, 0, Some(&owned.token)).await;
        }
    }
    match written {
        Ok(_) if sent.is_ok() => info!(resource = %res, to = %next.to, "live migration completed"),
        Ok(_) => {
            warn!(resource = %res, reason = ?next.message, "live migration failed; the guest stays here")
        }
        Err(why) => {
            warn!(resource = %res, reason = %why, "live migration: the end was not recorded")
        }
    }
}

/// A guest about to run on this node (the target of a live move) before the node owns it.
struct Arrival {
    engine: Arc<dyn Converge>,
    shared: Arc<Mutex<Shared>>,
    fence_set: Running,
    fence: watch::Receiver<FenceState>,
}

impl Arrival {
    /// Whether the node is fenced now, or its fence callback fired (`fences` times in all)
    /// and the guard has not published the fence yet.
    fn fencing(&self, fences: u64) -> bool {
        let state = *self.fence.borrow();
        state.is_fenced() || fences > state.epoch()
    }

    /// Lets the guest of `res` run here ([`Converge::finish_incoming`]). A highly available
    /// guest (`ha`) joins what the fence stops before it runs, until this node owns it: another
    /// node may be given the workload once this one stops answering etcd, so a guest here
    /// must stop with the node's fence whoever holds its owner key. It is stopped instead of
    /// started when the node is fencing, and stopped after it started when a fence came
    /// meanwhile. An error: why it does not run (or did not start cleanly).
    async fn run(self, res: ResourceRef, ha: bool) -> Result<(), ConvergeError> {
        let before = ha.then(|| {
            self.shared
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .arrived
                .insert(res.clone());
            let mut set = self
                .fence_set
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !set.ha.contains(&res) {
                set.ha.push(res.clone());
                set.ha.sort();
            }
            set.fences
        });
        if let Some(fences) = before
            && self.fencing(fences)
        {
            warn!(resource = %res, "live migration: the node is fenced; stopping the guest that arrived instead of starting it");
            self.stop(&res).await;
            return Err(ConvergeError(
                "the node is fenced: the guest that arrived was stopped".into(),
            ));
        }
        let (engine, r2) = (self.engine.clone(), res.clone());
        let done = tokio::task::spawn_blocking(move || engine.finish_incoming(&r2))
            .await
            .unwrap_or_else(|e| Err(ConvergeError(format!("panicked: {e}"))));
        if let Some(fences) = before {
            let now = self
                .fence_set
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .fences;
            if now != fences || self.fencing(now) {
                warn!(resource = %res, "live migration: fenced while the guest started here; stopping it");
                self.stop(&res).await;
                return Err(ConvergeError(
                    "fenced while the guest started: it was stopped".into(),
                ));
            }
        }
        done
    }

    async fn stop(&self, res: &ResourceRef) {
        let (engine, r2) = (self.engine.clone(), res.clone());
        let _ =
            tokio::task::spawn_blocking(move || engine.stop_ha(std::slice::from_ref(&r2))).await;
    }
}

/// Target: fails a record that stays in flight without a change for `stall` (the source
/// never sent, or stopped reporting); ends once the record is no longer in flight.
async fn stall_watch(
    store: &Store,
    engine: &Arc<dyn Converge>,
    resource: &ResourceRef,
    stall: Duration,
) {
    let mut seen: Option<(i64, Instant)> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Ok(current) = migrate::read_versioned(store, resource).await else {
            continue;
        };
        let Some((record, rev)) = current else { return };
        if !record.state.is_live_in_flight() {
            return;
        }
        match seen {
            Some((r, since)) if r == rev && since.elapsed() >= stall => {
                let (e2, r2) = (engine.clone(), resource.clone());
                let runs = tokio::task::spawn_blocking(move || e2.incoming_runs(&r2))
                    .await
                    .unwrap_or(false);
                let next = if runs {
                    // The guest arrived and the source never said so: it runs here now.
                    warn!(resource = %resource, "live migration: the source went silent but the guest runs here: completed");
                    record.completed(None)
                } else {
                    record.failed(&format!(
                        "no progress from node {} for {} s",
                        record.from.as_deref().unwrap_or("?"),
                        stall.as_secs()
                    ))
                };
                if let Ok(next) = next {
                    let _ = write(store, resource, &next, rev, None).await;
                }
                return;
            }
            Some((r, _)) if r == rev => {}
            _ => seen = Some((rev, Instant::now())),
        }
    }
}

/// [`migrate::put_if_unchanged`] with its refusal as an error message.
async fn write(
    store: &Store,
    resource: &ResourceRef,
    record: &MigrationRecord,
    rev: i64,
    token: Option<&FencingToken>,
) -> Result<i64, String> {
    match migrate::put_if_unchanged(store, resource, record, rev, token).await {
        Ok(Some(r)) => Ok(r),
        Ok(None) => Err("the migration record changed or the ownership is gone".into()),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(state: MigrationState) -> MigrationRecord {
        let mut r = MigrationRecord::request("n2");
        r.from = Some("n1".into());
        r.state = state;
        r.listen = Some("tcp:h:1".into());
        r
    }

    #[test]
    fn the_target_starts_waits_finishes_or_aborts() {
        use MigrationState::*;
        let act = |s, waiting| live_action("n2", Some(&rec(s)), false, waiting, false, false);
        assert_eq!(act(Preparing, false), LiveAction::StartIncoming);
        assert_eq!(act(Preparing, true), LiveAction::Nothing, "already started");
        assert_eq!(act(Incoming, true), LiveAction::Nothing);
        assert_eq!(act(Transferring, true), LiveAction::Nothing);
        assert_eq!(act(Completed, true), LiveAction::FinishIncoming);
        assert_eq!(act(Assigned, true), LiveAction::FinishIncoming);
        assert_eq!(act(Completed, false), LiveAction::Nothing);
        assert_eq!(act(Failed, true), LiveAction::AbortIncoming);
        assert_eq!(act(Refused, true), LiveAction::AbortIncoming);
        assert_eq!(act(Failed, false), LiveAction::Nothing);
        assert_eq!(
            live_action("n2", None, false, true, false, false),
            LiveAction::AbortIncoming,
            "cleared"
        );
    }

    #[test]
    fn only_the_owning_source_sends_and_only_once() {
        use MigrationState::*;
        let r = rec(Incoming);
        assert_eq!(
            live_action("n1", Some(&r), true, false, false, true),
            LiveAction::Send("tcp:h:1".into())
        );
        assert_eq!(
            live_action("n1", Some(&r), false, false, false, true),
            LiveAction::Nothing,
            "no token, no send"
        );
        assert_eq!(
            live_action("n1", Some(&r), true, false, true, true),
            LiveAction::Nothing
        );
        assert_eq!(
            live_action("n3", Some(&r), true, false, false, true),
            LiveAction::Nothing
        );
        for s in [Preparing, Completed, Failed, Assigned] {
            assert_eq!(
                live_action("n1", Some(&rec(s)), true, false, false, true),
                LiveAction::Nothing,
                "{s:?}"
            );
        }
    }

    #[test]
    fn a_restarted_target_takes_up_a_move_it_is_not_waiting_for() {
        use MigrationState::*;
        let act = |s, owns, waiting| live_action("n2", Some(&rec(s)), owns, waiting, false, false);
        assert_eq!(act(Incoming, false, false), LiveAction::Adopt);
        assert_eq!(act(Transferring, false, false), LiveAction::Adopt);
        let mut done = rec(Completed);
        done.method = Some("live".into());
        assert_eq!(
            live_action("n2", Some(&done), false, false, false, false),
            LiveAction::Adopt
        );
        assert_eq!(
            live_action("n2", Some(&done), true, false, false, false),
            LiveAction::Nothing,
            "owned: an ordinary VM"
        );
        done.method = Some("cold (--cold)".into());
        done.state = Assigned;
        assert_eq!(
            live_action("n2", Some(&done), false, false, false, false),
            LiveAction::Nothing,
            "a cold move has nothing to take up"
        );
        assert_eq!(act(Failed, false, false), LiveAction::Nothing);
    }

    #[test]
    fn a_send_this_agent_did_not_start_is_resumed_once_it_owns_the_guest() {
        use MigrationState::*;
        for s in [Incoming, Transferring] {
            assert_eq!(
                live_action("n1", Some(&rec(s)), true, false, false, false),
                LiveAction::Resume,
                "{s:?} found by a restarted agent"
            );
            assert_eq!(
                live_action("n1", Some(&rec(s)), false, false, false, false),
                LiveAction::Nothing,
                "no token yet"
            );
            assert!(awaits_token("n1", &rec(s), false, false));
            assert!(!awaits_token("n1", &rec(s), true, false), "owned: resumed");
            assert!(!awaits_token("n1", &rec(s), false, true), "sending");
            assert!(!awaits_token("n2", &rec(s), false, false), "the target");
        }
        assert_eq!(
            live_action("n1", Some(&rec(Transferring)), true, false, false, true),
            LiveAction::Resume,
            "a send whose end was not recorded"
        );
        assert_eq!(
            live_action("n1", Some(&rec(Transferring)), true, false, true, true),
            LiveAction::Nothing,
            "being sent"
        );
        for s in [Preparing, Completed, Failed, Assigned] {
            assert!(!awaits_token("n1", &rec(s), false, false), "{s:?}");
        }
    }
}

#[cfg(test)]
mod arrival_tests {
    use super::*;
    use crate::agent::FenceSet;

    /// Records `finish`/`stop`; a fence callback may fire while it finishes.
    #[derive(Default)]
    struct Engine {
        calls: Mutex<Vec<&'static str>>,
        /// The fence set a callback fires on while the guest starts.
        fence_during_finish: Option<Running>,
    }

    impl Converge for Engine {
        fn converge(&self, _: &[Owned]) -> Result<(), ConvergeError> {
            Ok(())
        }
        fn stop_ha(&self, r: &[ResourceRef]) {
            assert_eq!(r.len(), 1);
            self.calls.lock().expect("lock").push("stop");
        }
        fn finish_incoming(&self, _: &ResourceRef) -> Result<(), ConvergeError> {
            if let Some(set) = &self.fence_during_finish {
                set.lock().expect("lock").fences += 1;
            }
            self.calls.lock().expect("lock").push("finish");
            Ok(())
        }
    }

    fn armed(epoch: u64) -> FenceState {
        FenceState::Armed {
            epoch,
            generation: 0,
            deadline: tokio::time::Instant::now() + Duration::from_secs(60),
        }
    }

    /// Runs an arrival of `web` (`ha`) with `fences` fired so far and the guard in `state`;
    /// what the engine was asked, whether it ran, and whether the fence now stops `web`.
    async fn arrive(
        ha: bool,
        fences: u64,
        state: FenceState,
        fence_during_finish: bool,
    ) -> (Vec<&'static str>, bool, bool) {
        let set: Running = Arc::new(Mutex::new(FenceSet {
            ha: Vec::new(),
            fences,
        }));
        let engine = Arc::new(Engine {
            calls: Mutex::default(),
            fence_during_finish: fence_during_finish.then(|| set.clone()),
        });
        let (_tx, rx) = watch::channel(state);
        let web: ResourceRef = "VirtualMachine/web".parse().expect("ref");
        let arrival = Arrival {
            engine: engine.clone(),
            shared: Arc::default(),
            fence_set: set.clone(),
            fence: rx,
        };
        let ran = arrival.run(web.clone(), ha).await.is_ok();
        let listed = set.lock().expect("lock").ha.contains(&web);
        let calls = engine.calls.lock().expect("lock").clone();
        (calls, ran, listed)
    }

    #[tokio::test]
    async fn an_ha_guest_joins_what_the_fence_stops_before_it_runs() {
        assert_eq!(
            arrive(true, 0, armed(0), false).await,
            (vec!["finish"], true, true)
        );
        // Fenced once and re-armed since: an ordinary start.
        assert_eq!(
            arrive(true, 1, armed(1), false).await,
            (vec!["finish"], true, true)
        );
    }

    #[tokio::test]
    async fn a_fencing_node_stops_the_guest_instead_of_starting_it() {
        let fenced = FenceState::Fenced {
            epoch: 0,
            since: tokio::time::Instant::now(),
        };
        assert_eq!(
            arrive(true, 1, fenced, false).await,
            (vec!["stop"], false, true)
        );
        // The callback fired, the guard has not published the fence yet.
        assert_eq!(
            arrive(true, 1, armed(0), false).await,
            (vec!["stop"], false, true)
        );
    }

    #[tokio::test]
    async fn a_fence_while_the_guest_starts_stops_it_after() {
        assert_eq!(
            arrive(true, 0, armed(0), true).await,
            (vec!["finish", "stop"], false, true)
        );
    }

    #[tokio::test]
    async fn a_guest_that_is_not_ha_runs_whatever_the_fence() {
        let fenced = FenceState::Fenced {
            epoch: 0,
            since: tokio::time::Instant::now(),
        };
        assert_eq!(
            arrive(false, 1, fenced, true).await,
            (vec!["finish"], true, false)
        );
    }
}
