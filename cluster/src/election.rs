//! Electing the controller, and the assignments only the elected controller may write.
//!
//! The leader key is created, if absent, bound to the candidate's lease; the leader's
//! [`LeaderToken`] is that key's create revision. Every assignment write compares the leader
//! key's create revision with the token in the same transaction, so a deposed leader (its lease
//! expired, someone else elected) cannot write.

use std::collections::{BTreeMap, BTreeSet};

use etcd_client::{Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, WatchOptions};
use tracing::{debug, info, instrument};

use crate::etcd::{Store, StoreError};
use crate::keys::ResourceRef;
use crate::model::Assignment;
use crate::watch::{Change, PrefixWatch, decode_or_skip, list_prefix};

/// Proof of leadership: the create revision of the leader key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LeaderToken(i64);

impl LeaderToken {
    /// The leader key's create revision.
    pub fn revision(&self) -> i64 {
        self.0
    }
}

/// Who leads now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    /// The elected candidate's name.
    pub name: String,
    /// Its token.
    pub token: LeaderToken,
    /// Its lease.
    pub lease: i64,
}

/// Assignments written per transaction (etcd allows 128 operations per transaction).
const TXN_CHUNK: usize = 100;

/// A candidate for the controller's leadership, campaigning with its own lease.
#[derive(Debug, Clone)]
pub struct Election {
    store: Store,
    name: String,
    lease: i64,
}

impl Election {
    /// A candidate named `name` whose leadership is bound to `lease`.
    pub fn new(store: &Store, name: &str, lease: i64) -> Self {
        Self {
            store: store.clone(),
            name: name.to_string(),
            lease,
        }
    }

    /// Becomes the leader if nobody is; returns the token, or `None` when another candidate
    /// leads. Leading already with the same lease returns the same token.
    #[instrument(skip(self), fields(candidate = %self.name))]
    pub async fn try_campaign(&self) -> Result<Option<LeaderToken>, StoreError> {
        let key = self.store.keys().leader();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                self.name.clone(),
                Some(PutOptions::new().with_lease(self.lease)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let mut client = self.store.client();
        let response = self.store.timed(client.txn(txn)).await?;
        if response.succeeded() {
            let revision = response.header().map(|h| h.revision()).unwrap_or_default();
            info!(token = revision, "elected");
            return Ok(Some(LeaderToken(revision)));
        }
        let holder = current_leader(&self.store).await?;
        Ok(holder.filter(|l| l.lease == self.lease).map(|l| l.token))
    }

    /// Campaigns until elected: waits for the leader key to disappear, then tries again.
    pub async fn campaign(&self) -> Result<LeaderToken, StoreError> {
        loop {
            if let Some(token) = self.try_campaign().await? {
                return Ok(token);
            }
            wait_for_vacancy(&self.store).await?;
        }
    }

    /// Gives up the leadership held with `token` (nothing happens if it is already lost).
    pub async fn resign(&self, token: LeaderToken) -> Result<(), StoreError> {
        let key = self.store.keys().leader();
        let txn = Txn::new()
            .when([Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                token.0,
            )])
            .and_then([TxnOp::delete(key, None)]);
        let mut client = self.store.client();
        let r = self.store.timed(client.txn(txn)).await?;
        debug!(resigned = r.succeeded(), "resign");
        Ok(())
    }
}

/// The current leader, if any.
pub async fn current_leader(store: &Store) -> Result<Option<Leader>, StoreError> {
    let key = store.keys().leader();
    let mut client = store.client();
    let response = store.timed(client.get(key.clone(), None)).await?;
    let Some(kv) = response.kvs().first() else {
        return Ok(None);
    };
    let name = kv
        .value_str()
        .map_err(|e| StoreError::decode(&key, e))?
        .to_string();
    Ok(Some(Leader {
        name,
        token: LeaderToken(kv.create_revision()),
        lease: kv.lease(),
    }))
}

/// Waits until the leader key is deleted (resigned or its lease expired).
async fn wait_for_vacancy(store: &Store) -> Result<(), StoreError> {
    let key = store.keys().leader();
    let mut client = store.client();
    let response = store.timed(client.get(key.clone(), None)).await?;
    if response.kvs().is_empty() {
        return Ok(());
    }
    let from = response
        .header()
        .map(|h| h.revision() + 1)
        .unwrap_or_default();
    let options = WatchOptions::new().with_start_revision(from);
    let mut stream = store.timed(client.watch(key, Some(options))).await?;
    loop {
        let Some(message) = stream.message().await? else {
            return Err(StoreError::Unreachable("leader watch closed".into()));
        };
        if message.canceled() || message.compact_revision() > 0 {
            return Ok(());
        }
        if message
            .events()
            .iter()
            .any(|e| e.event_type() == EventType::Delete)
        {
            return Ok(());
        }
    }
}

/// Watches who leads: the first [`LeaderWatch::next`] gives the current leader, every later one
/// the leader after the next change (`None`: vacant).
#[derive(Debug)]
pub struct LeaderWatch {
    store: Store,
    inner: PrefixWatch,
    listed: bool,
}

impl LeaderWatch {
    /// A watch of the leader key.
    pub fn new(store: &Store) -> Self {
        let inner = PrefixWatch::new(store, store.keys().leader(), 0);
        Self {
            store: store.clone(),
            inner,
            listed: false,
        }
    }

    /// The current leader at first, then the leader after each change.
    pub async fn next(&mut self) -> Result<Option<Leader>, StoreError> {
        if self.listed {
            let changes = self.inner.next_batch().await?;
            if changes.iter().any(|c| matches!(c, Change::Resync)) {
                self.inner.list().await?;
            }
        } else {
            self.inner.list().await?;
            self.listed = true;
        }
        current_leader(&self.store).await
    }
}

fn guard(store: &Store, token: LeaderToken) -> Compare {
    Compare::create_revision(store.keys().leader(), CompareOp::Equal, token.0)
}

/// Writes `assignments` if `token` still leads ([`StoreError::Fenced`] otherwise). More than
/// 100 are written in several transactions, each guarded. Returns the last revision written.
#[instrument(skip_all, fields(token = token.0, count = assignments.len()))]
pub async fn put_assignments(
    store: &Store,
    token: &LeaderToken,
    assignments: &[Assignment],
) -> Result<i64, StoreError> {
    let mut revision = 0;
    for chunk in assignments.chunks(TXN_CHUNK) {
        let mut ops = Vec::with_capacity(chunk.len());
        for a in chunk {
            let resource = parse_resource(&a.resource)?;
            let value = serde_json::to_vec(a).map_err(|e| StoreError::decode(&a.resource, e))?;
            ops.push(TxnOp::put(store.keys().assignment(&resource), value, None));
        }
        revision = guarded_txn(store, *token, ops).await?;
    }
    Ok(revision)
}

/// Deletes the assignment of `resource` if `token` still leads.
pub async fn delete_assignment(
    store: &Store,
    token: &LeaderToken,
    resource: &ResourceRef,
) -> Result<(), StoreError> {
    let ops = vec![TxnOp::delete(store.keys().assignment(resource), None)];
    guarded_txn(store, *token, ops).await.map(|_| ())
}

async fn guarded_txn(
    store: &Store,
    token: LeaderToken,
    ops: Vec<TxnOp>,
) -> Result<i64, StoreError> {
    let txn = Txn::new().when([guard(store, token)]).and_then(ops);
    let mut client = store.client();
    let response = store.timed(client.txn(txn)).await?;
    if !response.succeeded() {
        return Err(StoreError::Fenced(format!(
            "leader token {} is not current",
            token.0
        )));
    }
    Ok(response.header().map(|h| h.revision()).unwrap_or_default())
}

fn parse_resource(text: &str) -> Result<ResourceRef, StoreError> {
    text.parse().map_err(|e| StoreError::decode(text, e))
}

/// Every assignment (unreadable ones skipped with a warning) and the store revision of the
/// listing.
pub async fn list_assignments(store: &Store) -> Result<(Vec<Assignment>, i64), StoreError> {
    let (entries, revision) = list_prefix(store, &store.keys().assignments()).await?;
    let out = entries
        .iter()
        .filter_map(|e| read_assignment(store, &e.key, &e.value))
        .map(|(_, a)| a)
        .collect();
    Ok((out, revision))
}

/// An assignment and its workload, if the value is readable and names the workload of its key.
fn read_assignment(store: &Store, key: &str, value: &[u8]) -> Option<(ResourceRef, Assignment)> {
    let resource = store.keys().parse_assignment(key)?;
    let a: Assignment = decode_or_skip(key, value)?;
    if a.resource != resource.to_string() {
        tracing::warn!(%key, named = %a.resource, "skipping an assignment for another workload");
        return None;
    }
    Some((resource, a))
}

/// A change to what one node must run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssignmentEvent {
    /// Everything assigned to the node now (first event, and after a lost history).
    Snapshot(Vec<Assignment>),
    /// A workload was assigned to the node, or its assignment changed.
    Assigned(Assignment),
    /// A workload is no longer assigned to the node (deleted or moved elsewhere).
    Unassigned(ResourceRef),
}

/// The assignments of one node: an initial listing, then changes; it resumes after the last
/// revision it delivered when the connection comes back.
#[derive(Debug)]
pub struct AssignmentWatch {
    store: Store,
    node: String,
    inner: PrefixWatch,
    mine: BTreeSet<ResourceRef>,
    listed: bool,
}

impl AssignmentWatch {
    /// Watches what is assigned to `node`; the first [`AssignmentWatch::next`] lists.
    pub fn new(store: &Store, node: &str) -> Self {
        Self {
            store: store.clone(),
            node: node.to_string(),
            inner: PrefixWatch::new(store, store.keys().assignments(), 0),
            mine: BTreeSet::new(),
            listed: false,
        }
    }

    /// The revision the watch resumes from.
    pub fn next_revision(&self) -> i64 {
        self.inner.next_revision()
    }

    /// The next events for this node (at least one).
    pub async fn next(&mut self) -> Result<Vec<AssignmentEvent>, StoreError> {
        if !self.listed {
            return Ok(vec![self.snapshot().await?]);
        }
        loop {
            let changes = self.inner.next_batch().await?;
            let mut out = Vec::new();
            for change in changes {
                match change {
                    Change::Resync => {
                        out.clear();
                        out.push(self.snapshot().await?);
                        break;
                    }
                    other => out.extend(self.event(other)?),
                }
            }
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }

    async fn snapshot(&mut self) -> Result<AssignmentEvent, StoreError> {
        let entries = self.inner.list().await?;
        let mut mine = BTreeMap::new();
        for e in entries {
            if let Some((resource, a)) = read_assignment(&self.store, &e.key, &e.value)
                && a.node == self.node
            {
                mine.insert(resource, a);
            }
        }
        self.mine = mine.keys().cloned().collect();
        self.listed = true;
        Ok(AssignmentEvent::Snapshot(mine.into_values().collect()))
    }

    fn event(&mut self, change: Change) -> Result<Option<AssignmentEvent>, StoreError> {
        match change {
            Change::Put { key, value, .. } => {
                let Some((resource, a)) = read_assignment(&self.store, &key, &value) else {
                    return Ok(None);
                };
                if a.node == self.node {
                    self.mine.insert(resource);
                    Ok(Some(AssignmentEvent::Assigned(a)))
                } else if self.mine.remove(&resource) {
                    Ok(Some(AssignmentEvent::Unassigned(resource)))
                } else {
                    Ok(None)
                }
            }
            Change::Delete { key, .. } => {
                let Some(resource) = self.store.keys().parse_assignment(&key) else {
                    return Ok(None);
                };
                Ok(self
                    .mine
                    .remove(&resource)
                    .then_some(AssignmentEvent::Unassigned(resource)))
            }
            Change::Resync => Ok(None),
        }
    }
}
