//! Cold migration: an operator's override that moves one workload to a named node, stored in
//! etcd under `migrate/<Kind>/<name>` (not a manifest edit). The elected leader honours it in
//! placement (as a pin to that node) until it is cleared, or refuses it with the reason when
//! the manifest's placement forbids that node (another pin, a selector, a restricted HA
//! group, anti-affinity, a missing node-local pool, data that cannot follow, capacity).
//!
//! The move itself is the ordinary one: the leader reassigns the workload; the source node's
//! agent stops it, hands it off ([`crate::agent::Converge::hand_off`]: a final replication of
//! its replicated volumes to the target, with the still-current token) and only then releases
//! its owner key; the target's agent acquires the key, promotes the replicas and starts it. A
//! workload with a node-local volume that is not replicated to the target cannot move
//! (placement excludes the target: its data is not there).

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use stead_schema::{NodeName, ResourceId};

use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use crate::etcd::{Store, StoreError};
use crate::keys::{Key, ResourceRef};
use crate::owner::FencingToken;
use crate::placement::{DataLocality, PlacementResult, Workload};
use crate::watch::{decode_or_skip, list_prefix};

/// Where a migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationState {
    /// Written by the operator; the leader has not placed it yet.
    Requested,
    /// The leader assigned the workload to the target (the move is under way or done).
    Assigned,
    /// The leader refused it ([`MigrationRecord::message`] says why); placement ignores it.
    Refused,
    /// Live: the leader chose to move it live; the target's agent is to start its QEMU
    /// waiting for the migration (the workload stays assigned to and owned by the source).
    Preparing,
    /// Live: the target's QEMU waits in incoming mode on [`MigrationRecord::listen`].
    Incoming,
    /// Live: the source's QEMU sends the guest ([`MigrationRecord::progress`]).
    Transferring,
    /// Live: the guest runs on the target; the source has stopped its QEMU and releases its
    /// ownership, the leader assigns the workload to the target, which takes it over.
    Completed,
    /// Live: the move failed ([`MigrationRecord::message`] says why); the workload keeps
    /// running on and owned by the source, the target's QEMU is killed; placement ignores it.
    Failed,
}

/// A state change [`MigrationState::can_become`] does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a migration cannot go from {from:?} to {to:?}")]
pub struct TransitionError {
    /// The state it was in.
    pub from: MigrationState,
    /// The state asked for.
    pub to: MigrationState,
}

impl MigrationState {
    /// Whether a record in this state may be written as `next` (pure). `Assigned`,
    /// `Refused` and `Failed` are final: only a new request replaces them.
    pub fn can_become(self, next: MigrationState) -> bool {
        use MigrationState::*;
        matches!(
            (self, next),
            (Requested, Assigned | Refused | Preparing)
                | (Preparing, Incoming | Failed)
                | (Incoming, Transferring | Completed | Failed)
                | (Transferring, Transferring | Completed | Failed)
                | (Completed, Assigned)
        )
    }

    /// Whether placement pins the workload to the record's target in this state: a cold
    /// move as soon as it is asked for, a live one only once the guest runs there.
    pub fn pins(self) -> bool {
        matches!(
            self,
            MigrationState::Requested | MigrationState::Assigned | MigrationState::Completed
        )
    }

    /// Whether this is a live migration under way (the target's QEMU exists or is coming).
    pub fn is_live_in_flight(self) -> bool {
        matches!(
            self,
            MigrationState::Preparing | MigrationState::Incoming | MigrationState::Transferring
        )
    }

    /// The word `stead migrate` and `stead cluster status` show.
    pub fn describe(self) -> &'static str {
        match self {
            MigrationState::Requested => "requested, waiting for the leader",
            MigrationState::Assigned => "assigned by the leader",
            MigrationState::Refused => "refused by the leader",
            MigrationState::Preparing => "live: starting the target's QEMU",
            MigrationState::Incoming => "live: the target waits for the guest",
            MigrationState::Transferring => "live: sending the guest",
            MigrationState::Completed => "live: the guest runs on the target",
            MigrationState::Failed => "live migration failed",
        }
    }
}

/// How far a live transfer is, as the source writes it into the record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LiveProgress {
    /// QEMU's migration status (`setup`, `active`, `device`, `completed`, …).
    pub phase: String,
    /// Share of guest RAM copied, 0–100.
    pub ram_percent: u8,
    /// RAM sent so far, in MiB.
    pub sent_mib: u64,
    /// RAM still dirty, in MiB.
    pub remaining_mib: u64,
    /// Average rate since the start, in MiB/s.
    pub mib_per_s: f64,
    /// Seconds since `migrate`.
    pub elapsed_s: f64,
    /// Expected (while copying) or actual (once completed) guest pause, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// While the disks not shared are copied (phase `disk`, before the RAM): MiB copied
    /// and MiB to copy, summed over the disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mib: Option<(u64, u64)>,
}

/// The `phase` of the disk copy that precedes the RAM of a live move.
pub const DISK_PHASE: &str = "disk";

impl LiveProgress {
    /// The `stead migrate` line of this progress (pure).
    pub fn line(&self) -> String {
        if let (DISK_PHASE, Some((copied, total))) = (self.phase.as_str(), self.disk_mib) {
            let pct = (copied * 100).checked_div(total).unwrap_or(0);
            let rate = if self.elapsed_s > 0.0 {
                copied as f64 / self.elapsed_s
            } else {
                0.0
            };
            return format!("disk {pct}% ({copied} of {total} MiB copied, {rate:.1} MiB/s)");
        }
        let mut s = format!(
            "{} RAM {}% ({} MiB sent, {} MiB left, {:.1} MiB/s)",
            self.phase, self.ram_percent, self.sent_mib, self.remaining_mib, self.mib_per_s
        );
        match self.downtime_ms {
            Some(d) if self.phase == "completed" => s.push_str(&format!(", downtime {d} ms")),
            Some(d) => s.push_str(&format!(", expected downtime {d} ms")),
            None => {}
        }
        s
    }
}

/// A migration override.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationRecord {
    /// The target node.
    pub to: String,
    /// The node it was assigned to when the leader moved it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// When it was asked for (Unix milliseconds).
    pub requested_at_ms: u64,
    /// Where it stands.
    pub state: MigrationState,
    /// Why it was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// How the operator asked to move it (absent: [`MigrationMode::Auto`]).
    #[serde(default, skip_serializing_if = "is_auto")]
    pub mode: MigrationMode,
    /// How the leader moves it: `live`, or `cold (why not live)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Live: the `tcp:HOST:PORT` the target's QEMU listens on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Live: the source's last progress report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<LiveProgress>,
    /// Written by the leader for a manifest placement change, not by an operator: it pins
    /// nothing, it only tells the source to hand the workload off ([`handovers`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub placement_change: bool,
    /// Live: whether the workload is highly available, from its assignment when the leader
    /// chose to move it live. The target stops a guest that arrived before it owns it when
    /// it fences, unless this says `false` (absent: it does, to be safe).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ha: Option<bool>,
}

fn is_auto(m: &MigrationMode) -> bool {
    *m == MigrationMode::Auto
}

impl MigrationRecord {
    /// A new request to move to `to`.
    pub fn request(to: &str) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Self {
            to: to.to_string(),
            from: None,
            requested_at_ms: now,
            state: MigrationState::Requested,
            message: None,
            mode: MigrationMode::Auto,
            method: None,
            listen: None,
            progress: None,
            placement_change: false,
            ha: None,
        }
    }

    /// The leader's record of a manifest placement change that moves a workload from `from`
    /// to `to`, a node holding the replicas of its volumes: `assigned` at once, so the
    /// source's agent hands it off (a final replication) before it releases it.
    pub fn placement_change(from: &str, to: &str) -> Self {
        let mut r = Self::request(to);
        r.from = Some(from.to_string());
        r.state = MigrationState::Assigned;
        r.method = Some("cold (placement change: final replication first)".into());
        r.placement_change = true;
        r
    }

    /// This record moved to `next` (the fields `next` carries set by the caller after);
    /// refused when the state machine does not allow it.
    pub fn to_state(&self, next: MigrationState) -> Result<Self, TransitionError> {
        if !self.state.can_become(next) {
            return Err(TransitionError {
                from: self.state,
                to: next,
            });
        }
        let mut r = self.clone();
        r.state = next;
        Ok(r)
    }

    /// The leader chose to move it live from `from`; `ha`: whether its assignment is highly
    /// available.
    pub fn preparing(&self, from: &str, ha: bool) -> Result<Self, TransitionError> {
        let mut r = self.to_state(MigrationState::Preparing)?;
        r.from = Some(from.to_string());
        r.method = Some("live".into());
        r.ha = Some(ha);
        Ok(r)
    }

    /// Whether the target stops the guest when it fences before it owns it (a highly
    /// available workload could be started elsewhere meanwhile).
    pub fn stops_on_fence(&self) -> bool {
        self.ha != Some(false)
    }

    /// The target's QEMU listens on `uri`.
    pub fn incoming(&self, uri: &str) -> Result<Self, TransitionError> {
        let mut r = self.to_state(MigrationState::Incoming)?;
        r.listen = Some(uri.to_string());
        Ok(r)
    }

    /// The source reports `progress`.
    pub fn transferring(&self, progress: LiveProgress) -> Result<Self, TransitionError> {
        let mut r = self.to_state(MigrationState::Transferring)?;
        r.progress = Some(progress);
        Ok(r)
    }

    /// The guest runs on the target (`last`: the final report).
    pub fn completed(&self, last: Option<LiveProgress>) -> Result<Self, TransitionError> {
        let mut r = self.to_state(MigrationState::Completed)?;
        if last.is_some() {
            r.progress = last;
        }
        Ok(r)
    }

    /// The live move failed because of `why`.
    pub fn failed(&self, why: &str) -> Result<Self, TransitionError> {
        let mut r = self.to_state(MigrationState::Failed)?;
        r.message = Some(why.to_string());
        Ok(r)
    }
}

/// How the operator asked to move a workload (`stead migrate --live / --cold`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationMode {
    /// Live when [`choose_method`] finds it possible, else cold.
    #[default]
    Auto,
    /// Live or not at all (refused with the reason).
    Live,
    /// Cold even when live is possible.
    Cold,
}

/// Where one volume of a VM lives, for [`LiveFacts`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSite {
    /// The volume.
    pub volume: String,
    /// Its pool.
    pub pool: String,
    /// Whether the pool is declared `shared: true` (every node sees the same data).
    pub shared: bool,
    /// The node its replicas go to (`Volume.spec.replication.to`), if any: a live move
    /// there copies the disk during the migration.
    pub replicated_to: Option<String>,
}

/// What decides whether a VM can move live, read from its manifest and its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveFacts {
    /// Its engine (`qemu`, `vmm`).
    pub engine: String,
    /// Whether it runs now.
    pub running: bool,
    /// Its volumes.
    pub volumes: Vec<VolumeSite>,
    /// The node it would move to (set by [`LiveFacts::toward`]): volumes replicated there
    /// move live with their disk copied.
    pub to: Option<String>,
}

impl LiveFacts {
    /// These facts for a move to node `to`.
    pub fn toward(mut self, to: &str) -> Self {
        self.to = Some(to.to_string());
        self
    }

    /// The volumes a live move copies during the migration: those not on a shared pool
    /// (each replicated to the target, or the move is not live).
    pub fn copied_volumes(&self) -> Vec<&str> {
        self.volumes
            .iter()
            .filter(|v| !v.shared)
            .map(|v| v.volume.as_str())
            .collect()
    }
}

/// How a workload moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// QMP `migrate` to a QEMU waiting on the target: the guest keeps running.
    Live,
    /// Stop, final replication, start on the target; with why it is not live.
    Cold(String),
}

/// Why `facts` (`None`: not a VM) rule out a live migration, if they do (pure).
pub fn live_blocker(facts: Option<&LiveFacts>) -> Option<String> {
    let Some(f) = facts else {
        return Some("only a VirtualMachine moves live".into());
    };
    if f.engine != "qemu" {
        return Some(format!(
            "its engine is {}: only qemu VMs move live",
            f.engine
        ));
    }
    if !f.running {
        return Some("it is not running".into());
    }
    let on_target = |v: &VolumeSite| v.replicated_to.is_some() && v.replicated_to == f.to;
    f.volumes
        .iter()
        .find(|v| !v.shared && !on_target(v))
        .map(|v| match &v.replicated_to {
            Some(r) => format!(
                "volume {} is replicated to {r}, not to the target: only a move to {r} copies \
                 its disk live",
                v.volume
            ),
            None => format!(
                "volume {} is on pool {}, which is not shared, and it is not replicated to the \
                 target (the target must see its disk or hold a replica of it)",
                v.volume, v.pool
            ),
        })
}

/// Why an automatic move of a VM whose disks would be copied stays cold: copying whole disks
/// over the network during the move is asked for with `--live` only, as Proxmox VE asks for
/// `--with-local-disks`.
pub const COPY_NEEDS_LIVE: &str =
    "its disks would be copied during the move, which only --live asks for";

/// Chooses how to move a workload: the operator's `mode` against what the workload allows
/// (pure). `Err` when live was required and is impossible, with the reason. A move that
/// copies disks (volumes replicated to the target) is live only when asked with `--live`.
pub fn choose_method(mode: MigrationMode, facts: Option<&LiveFacts>) -> Result<Method, String> {
    let copies = facts.is_some_and(|f| !f.copied_volumes().is_empty());
    match (mode, live_blocker(facts)) {
        (MigrationMode::Cold, _) => Ok(Method::Cold("--cold".into())),
        (MigrationMode::Auto, None) if copies => Ok(Method::Cold(COPY_NEEDS_LIVE.into())),
        (_, None) => Ok(Method::Live),
        (MigrationMode::Live, Some(why)) => Err(format!("cannot move live: {why}")),
        (MigrationMode::Auto, Some(why)) => Ok(Method::Cold(why)),
    }
}

/// What `stead migrate` refuses before asking the leader (pure): `--live` for anything but
/// a VirtualMachine. Whether a VM can move live (engine, running, shared volumes) is the
/// leader's decision ([`choose_method`] on the manifests), written into the record.
pub fn precheck(mode: MigrationMode, is_vm: bool) -> Result<(), String> {
    match (mode, is_vm) {
        (MigrationMode::Live, false) => Err(format!(
            "cannot move live: {}",
            live_blocker(None).unwrap_or_default()
        )),
        _ => Ok(()),
    }
}

/// Writes (or replaces) the override of `resource`.
pub async fn put(
    store: &Store,
    resource: &ResourceRef,
    record: &MigrationRecord,
) -> Result<(), StoreError> {
    let key = store.keys().migration(resource);
    let value = serde_json::to_vec(record).map_err(|e| StoreError::decode(&key, e))?;
    let mut client = store.client();
    store.timed(client.put(key, value, None)).await?;
    Ok(())
}

/// Deletes the override of `resource`; whether there was one.
pub async fn clear(store: &Store, resource: &ResourceRef) -> Result<bool, StoreError> {
    let mut client = store.client();
    let key = store.keys().migration(resource);
    let r = store.timed(client.delete(key, None)).await?;
    Ok(r.deleted() > 0)
}

/// What [`cancel`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Cancelled {
    /// The override was deleted (a live move in flight is given up: the guest stays).
    Cleared,
    /// There was none.
    Absent,
    /// Refused: the live move completed, the guest runs on the target (this node).
    Completed(String),
}

/// Clears the override of `resource` unless its live move has completed (the guest runs on
/// the target then: clearing would leave the workload neither moved nor where its guest
/// runs). The delete compares the revision read, so a `completed` written meanwhile is
/// never lost.
pub async fn cancel(store: &Store, resource: &ResourceRef) -> Result<Cancelled, StoreError> {
    loop {
        let Some((record, rev)) = read_versioned(store, resource).await? else {
            return Ok(Cancelled::Absent);
        };
        if record.state == MigrationState::Completed {
            return Ok(Cancelled::Completed(record.to));
        }
        let key = store.keys().migration(resource);
        let txn = Txn::new()
            .when([Compare::mod_revision(key.clone(), CompareOp::Equal, rev)])
            .and_then([TxnOp::delete(key, None)]);
        let mut client = store.client();
        if store.timed(client.txn(txn)).await?.succeeded() {
            return Ok(Cancelled::Cleared);
        }
    }
}

/// The override of `resource`, if any.
pub async fn read(
    store: &Store,
    resource: &ResourceRef,
) -> Result<Option<MigrationRecord>, StoreError> {
    let key = store.keys().migration(resource);
    let mut client = store.client();
    let r = store.timed(client.get(key.clone(), None)).await?;
    Ok(r.kvs()
        .first()
        .and_then(|kv| decode_or_skip(&key, kv.value())))
}

/// The override of `resource` and its mod revision (for [`put_if_unchanged`]), if any.
pub async fn read_versioned(
    store: &Store,
    resource: &ResourceRef,
) -> Result<Option<(MigrationRecord, i64)>, StoreError> {
    let key = store.keys().migration(resource);
    let mut client = store.client();
    let r = store.timed(client.get(key.clone(), None)).await?;
    Ok(r.kvs().first().and_then(|kv| {
        decode_or_skip::<MigrationRecord>(&key, kv.value()).map(|m| (m, kv.mod_revision()))
    }))
}

/// Writes `record` only if the override is still at `mod_revision` (nobody changed it since
/// it was read: not the operator, not the leader, not the other node) and, with `token`,
/// only while that ownership is current (the source's progress is fenced like any side
/// effect). The record's new mod revision, `None` when it was not written.
pub async fn put_if_unchanged(
    store: &Store,
    resource: &ResourceRef,
    record: &MigrationRecord,
    mod_revision: i64,
    token: Option<&FencingToken>,
) -> Result<Option<i64>, StoreError> {
    let key = store.keys().migration(resource);
    let value = serde_json::to_vec(record).map_err(|e| StoreError::decode(&key, e))?;
    let mut when = vec![Compare::mod_revision(
        key.clone(),
        CompareOp::Equal,
        mod_revision,
    )];
    if let Some(t) = token {
        when.push(Compare::create_revision(
            store.keys().owner(t.resource()),
            CompareOp::Equal,
            t.revision(),
        ));
    }
    let txn = Txn::new()
        .when(when)
        .and_then([TxnOp::put(key, value, None)]);
    let mut client = store.client();
    let r = store.timed(client.txn(txn)).await?;
    Ok(r.succeeded()
        .then(|| r.header().map(|h| h.revision()).unwrap_or_default()))
}

/// Every override, by workload, and the revision of the reading.
pub async fn list(
    store: &Store,
) -> Result<(BTreeMap<ResourceId, MigrationRecord>, i64), StoreError> {
    let (entries, revision) = list_prefix(store, &store.keys().migrations()).await?;
    let mut out = BTreeMap::new();
    for e in entries {
        let Some(Key::Migration(r)) = store.keys().parse(&e.key) else {
            continue;
        };
        let (Ok(id), Some(record)) = (
            r.to_string().parse::<ResourceId>(),
            decode_or_skip::<MigrationRecord>(&e.key, &e.value),
        ) else {
            continue;
        };
        out.insert(id, record);
    }
    Ok((out, revision))
}

/// Pins each workload with a pinning override ([`MigrationState::pins`]) to its target
/// (pure): a live move in flight leaves it where it runs. Overrides the manifest
/// forbids outright are not applied: the refusals, by workload. An override of a workload
/// the manifests do not have is ignored.
pub fn apply_overrides(
    workloads: &mut [Workload],
    overrides: &BTreeMap<ResourceId, MigrationRecord>,
) -> BTreeMap<ResourceId, String> {
    let mut refused = BTreeMap::new();
    for w in workloads.iter_mut() {
        let Some(m) = overrides.get(&w.id) else {
            continue;
        };
        if !m.state.pins() {
            continue;
        }
        if let Some(reason) = forbidden(w, &m.to) {
            refused.insert(w.id.clone(), reason);
            continue;
        }
        match m.to.parse::<NodeName>() {
            Ok(node) => w.placement.node = Some(node),
            Err(e) => {
                refused.insert(w.id.clone(), format!("{:?} is not a node name: {e}", m.to));
            }
        }
    }
    refused
}

/// Why the manifest alone forbids moving `w` to `to`, before looking at the nodes.
fn forbidden(w: &Workload, to: &str) -> Option<String> {
    if let Some(pin) = &w.placement.node
        && pin.as_str() != to
    {
        return Some(format!("its manifest pins it to node {pin}"));
    }
    if let DataLocality::Replicated { nodes } = &w.data
        && !nodes.contains(to)
    {
        let to_list: Vec<&str> = nodes.iter().map(String::as_str).collect();
        return Some(format!(
            "its volumes are replicated to {} only: the data cannot follow it to {to}",
            to_list.join(", ")
        ));
    }
    None
}

/// After placing with the overrides applied: the overridden workloads no node could take,
/// each with why its target was excluded (pure).
pub fn refused_by_placement(
    result: &PlacementResult,
    overrides: &BTreeMap<ResourceId, MigrationRecord>,
) -> BTreeMap<ResourceId, String> {
    let mut out = BTreeMap::new();
    for u in &result.unplaceable {
        let Some(m) = overrides.get(&u.id) else {
            continue;
        };
        if !m.state.pins() {
            continue;
        }
        let why = match u.excluded.get(&m.to) {
            Some(rules) => rules
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
            None => format!("node {} is not registered", m.to),
        };
        out.insert(u.id.clone(), format!("node {} cannot take it: {why}", m.to));
    }
    out
}

/// The moves of a placement change that must hand their data off (pure): each workload
/// assigned in `current` to a node still `alive`, assigned to another node in `next`, whose
/// node-local volumes are all replicated to that node, and not moved by an operator (no
/// record in `records` that pins it or moves it live). Each gets
/// [`MigrationRecord::placement_change`], written before the assignment changes, so the
/// source runs the same hand-over as `stead migrate --cold` instead of a plain reassignment
/// (which would lose the writes made since the last scheduled replication).
pub fn handovers(
    workloads: &[Workload],
    current: &BTreeMap<ResourceId, crate::model::Assignment>,
    next: &BTreeMap<ResourceId, crate::model::Assignment>,
    alive: impl Fn(&str) -> bool,
    records: &BTreeMap<ResourceId, MigrationRecord>,
) -> Vec<(ResourceId, MigrationRecord)> {
    let mut out = Vec::new();
    for w in workloads {
        let (Some(old), Some(new)) = (current.get(&w.id), next.get(&w.id)) else {
            continue;
        };
        if old.node == new.node || !alive(&old.node) {
            continue;
        }
        let DataLocality::Replicated { nodes } = &w.data else {
            continue;
        };
        let by_operator = records.get(&w.id).is_some_and(|r| {
            !r.placement_change && (r.state.pins() || r.state.is_live_in_flight())
        });
        if nodes.contains(&new.node) && !by_operator {
            let record = MigrationRecord::placement_change(&old.node, &new.node);
            out.push((w.id.clone(), record));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Capacity, NodeInfo};
    use crate::placement::{NodeState, PlacementInput, place};
    use std::collections::BTreeSet;
    use stead_schema::{Kind, Placement};

    fn workload(name: &str, placement: Placement, data: DataLocality) -> Workload {
        Workload {
            id: ResourceId::new(Kind::Container, name),
            request: Capacity::default(),
            placement,
            needs: Vec::new(),
            data,
        }
    }

    fn node(name: &str, label: Option<(&str, &str)>) -> NodeState {
        NodeState {
            info: NodeInfo {
                name: name.into(),
                address: name.into(),
                labels: label
                    .map(|(k, v)| BTreeMap::from([(k.to_string(), v.to_string())]))
                    .unwrap_or_default(),
                capacity: Capacity {
                    milli_cpus: 4000,
                    memory_bytes: 1 << 33,
                },
                pools: Vec::new(),
                networks: Vec::new(),
                version: String::new(),
                replication_port: 7443,
            },
            alive: true,
        }
    }

    fn overrides(name: &str, to: &str) -> BTreeMap<ResourceId, MigrationRecord> {
        BTreeMap::from([(
            ResourceId::new(Kind::Container, name),
            MigrationRecord::request(to),
        )])
    }

    fn placed(nodes: &[NodeState], workloads: &[Workload]) -> PlacementResult {
        place(&PlacementInput {
            nodes,
            workloads,
            groups: &BTreeMap::new(),
            current: &BTreeMap::new(),
            revision: "r",
        })
    }

    #[test]
    fn an_override_pins_the_workload_to_its_target() {
        let nodes = [node("n1", None), node("n2", None)];
        let mut ws = [workload("a", Placement::default(), DataLocality::Anywhere)];
        assert_eq!(
            placed(&nodes, &ws)
                .assignments
                .values()
                .next()
                .map(|a| a.node.as_str()),
            Some("n1")
        );
        let o = overrides("a", "n2");
        assert!(apply_overrides(&mut ws, &o).is_empty());
        let r = placed(&nodes, &ws);
        assert_eq!(
            r.assignments.values().next().map(|a| a.node.as_str()),
            Some("n2")
        );
        assert!(refused_by_placement(&r, &o).is_empty());
    }

    #[test]
    fn a_manifest_pin_or_replicated_data_refuses_it() {
        let pinned = Placement {
            node: Some("n1".parse().expect("name")),
            ..Placement::default()
        };
        let mut ws = [
            workload("a", pinned, DataLocality::Anywhere),
            workload(
                "b",
                Placement::default(),
                DataLocality::Replicated {
                    nodes: ["n2".to_string()].into(),
                },
            ),
        ];
        let mut o = overrides("a", "n2");
        o.extend(overrides("b", "n3"));
        let refused = apply_overrides(&mut ws, &o);
        assert!(
            refused[&ws[0].id].contains("pins it to node n1"),
            "{refused:?}"
        );
        assert!(
            refused[&ws[1].id].contains("replicated to n2 only"),
            "{refused:?}"
        );
        assert_eq!(
            ws[0].placement.node.as_ref().map(NodeName::as_str),
            Some("n1")
        );
        assert!(
            ws[1].placement.node.is_none(),
            "a refused override pins nothing"
        );
        let to_replica = overrides("b", "n2");
        assert!(
            apply_overrides(&mut ws, &to_replica).is_empty(),
            "to its replica"
        );
        assert_eq!(
            ws[1].placement.node.as_ref().map(NodeName::as_str),
            Some("n2")
        );
    }

    #[test]
    fn a_target_the_rules_exclude_is_refused_with_the_rules() {
        let nodes = [
            node("n1", Some(("zone", "a"))),
            node("n2", Some(("zone", "b"))),
        ];
        let selector = Placement {
            node_selector: BTreeMap::from([("zone".to_string(), "a".to_string())]),
            ..Placement::default()
        };
        let mut ws = [workload("a", selector, DataLocality::Anywhere)];
        let o = overrides("a", "n2");
        assert!(apply_overrides(&mut ws, &o).is_empty());
        let r = placed(&nodes, &ws);
        let refused = refused_by_placement(&r, &o);
        assert!(
            refused[&ws[0].id].contains("node n2 cannot take it: label zone=a does not match"),
            "{refused:?}"
        );
        let gone = refused_by_placement(&placed(&nodes[..1], &ws), &overrides("a", "n9"));
        assert!(gone[&ws[0].id].contains("n9 is not registered"), "{gone:?}");
    }

    fn qemu_vm(running: bool, shared: &[bool]) -> LiveFacts {
        LiveFacts {
            engine: "qemu".into(),
            running,
            volumes: shared
                .iter()
                .enumerate()
                .map(|(i, &shared)| VolumeSite {
                    volume: format!("disk{i}"),
                    pool: if shared { "nfs" } else { "local" }.into(),
                    shared,
                    replicated_to: None,
                })
                .collect(),
            to: None,
        }
    }

    #[test]
    fn a_volume_replicated_to_the_target_moves_live_with_its_disk_copied() {
        let mut vm = qemu_vm(true, &[true, false]);
        vm.volumes[1].replicated_to = Some("n2".into());
        let to_n2 = vm.clone().toward("n2");
        assert_eq!(
            choose_method(MigrationMode::Live, Some(&to_n2)),
            Ok(Method::Live)
        );
        // Copying the disk is asked for with --live only.
        assert_eq!(
            choose_method(MigrationMode::Auto, Some(&to_n2)),
            Ok(Method::Cold(COPY_NEEDS_LIVE.into()))
        );
        assert_eq!(to_n2.copied_volumes(), ["disk1"]);
        let to_n3 = vm.clone().toward("n3");
        match choose_method(MigrationMode::Auto, Some(&to_n3)) {
            Ok(Method::Cold(why)) => assert!(why.contains("replicated to n2, not to"), "{why}"),
            other => panic!("{other:?}"),
        }
        let e = choose_method(MigrationMode::Live, Some(&to_n3)).expect_err("refused");
        assert!(e.contains("volume disk1 is replicated to n2"), "{e}");
        // Without a target (not asked for a move) a replicated volume is not enough.
        assert!(matches!(
            choose_method(MigrationMode::Auto, Some(&vm)),
            Ok(Method::Cold(_))
        ));
        // A node-local volume without a replica stays a cold move, whatever the target.
        let local = qemu_vm(true, &[false]).toward("n2");
        match choose_method(MigrationMode::Auto, Some(&local)) {
            Ok(Method::Cold(why)) => {
                assert!(why.contains("not replicated to the target"), "{why}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_running_qemu_vm_on_shared_pools_moves_live_unless_told_cold() {
        let vm = qemu_vm(true, &[true, true]);
        assert_eq!(
            choose_method(MigrationMode::Auto, Some(&vm)),
            Ok(Method::Live)
        );
        assert_eq!(
            choose_method(MigrationMode::Live, Some(&vm)),
            Ok(Method::Live)
        );
        assert_eq!(
            choose_method(MigrationMode::Cold, Some(&vm)),
            Ok(Method::Cold("--cold".into()))
        );
        let diskless = qemu_vm(true, &[]);
        assert_eq!(
            choose_method(MigrationMode::Auto, Some(&diskless)),
            Ok(Method::Live)
        );
    }

    #[test]
    fn what_rules_out_live_is_said_and_live_is_refused_for_it() {
        let local = qemu_vm(true, &[true, false]);
        let stopped = qemu_vm(false, &[true]);
        let vmm = LiveFacts {
            engine: "vmm".into(),
            ..qemu_vm(true, &[])
        };
        for (facts, why) in [
            (
                Some(&local),
                "volume disk1 is on pool local, which is not shared",
            ),
            (Some(&stopped), "it is not running"),
            (Some(&vmm), "its engine is vmm"),
            (None, "only a VirtualMachine moves live"),
        ] {
            match choose_method(MigrationMode::Auto, facts) {
                Ok(Method::Cold(reason)) => assert!(reason.contains(why), "{reason}"),
                other => panic!("{other:?}"),
            }
            let e = choose_method(MigrationMode::Live, facts).expect_err("live refused");
            assert!(
                e.starts_with("cannot move live: ") && e.contains(why),
                "{e}"
            );
        }
    }

    #[test]
    fn the_cli_refuses_live_only_for_what_is_not_a_vm() {
        for mode in [
            MigrationMode::Auto,
            MigrationMode::Cold,
            MigrationMode::Live,
        ] {
            assert_eq!(precheck(mode, true), Ok(()));
        }
        assert_eq!(precheck(MigrationMode::Auto, false), Ok(()));
        assert_eq!(
            precheck(MigrationMode::Live, false),
            Err("cannot move live: only a VirtualMachine moves live".into())
        );
    }

    #[test]
    fn a_record_without_a_mode_reads_as_auto() {
        let r: MigrationRecord =
            serde_json::from_str(r#"{"to":"n2","requestedAtMs":1,"state":"requested"}"#)
                .expect("decode");
        assert_eq!(r.mode, MigrationMode::Auto);
        let mut live = MigrationRecord::request("n2");
        live.mode = MigrationMode::Live;
        let v = serde_json::to_value(&live).expect("encode");
        assert_eq!(v["mode"], "live");
        assert!(
            serde_json::to_value(MigrationRecord::request("n2"))
                .expect("encode")
                .get("mode")
                .is_none()
        );
    }

    fn progress(pct: u8) -> LiveProgress {
        LiveProgress {
            phase: "active".into(),
            ram_percent: pct,
            sent_mib: 100,
            remaining_mib: 50,
            mib_per_s: 20.0,
            elapsed_s: 5.0,
            downtime_ms: None,
            disk_mib: None,
        }
    }

    #[test]
    fn the_disk_copy_is_shown_before_the_ram() {
        let disk = LiveProgress {
            phase: DISK_PHASE.into(),
            ram_percent: 0,
            disk_mib: Some((512, 2048)),
            ..progress(0)
        };
        assert_eq!(
            disk.line(),
            "disk 25% (512 of 2048 MiB copied, 102.4 MiB/s)"
        );
        assert!(progress(40).line().starts_with("active RAM 40%"));
        let v = serde_json::to_value(&disk).expect("encode");
        assert_eq!(v["diskMib"], serde_json::json!([512, 2048]));
        let old: LiveProgress = serde_json::from_value(serde_json::json!({"phase": "active",
            "ramPercent": 1, "sentMib": 1, "remainingMib": 1, "mibPerS": 1.0, "elapsedS": 1.0}))
        .expect("a record without disk fields");
        assert_eq!(old.disk_mib, None);
    }

    #[test]
    fn a_live_move_goes_preparing_incoming_transferring_completed_assigned() {
        let r = MigrationRecord::request("n2");
        assert!(
            r.stops_on_fence(),
            "a record without the flag is taken for HA"
        );
        let r = r.preparing("n1", true).expect("leader");
        assert_eq!(
            (r.state, r.from.as_deref(), r.method.as_deref()),
            (MigrationState::Preparing, Some("n1"), Some("live"))
        );
        assert!(r.stops_on_fence());
        assert!(
            !MigrationRecord::request("n2")
                .preparing("n1", false)
                .expect("leader")
                .stops_on_fence()
        );
        let r = r.incoming("tcp:10.0.0.2:4444").expect("target");
        assert_eq!(r.listen.as_deref(), Some("tcp:10.0.0.2:4444"));
        let r = r.transferring(progress(10)).expect("source");
        let r = r.transferring(progress(60)).expect("more progress");
        assert_eq!(r.progress.as_ref().map(|p| p.ram_percent), Some(60));
        let r = r.completed(None).expect("done");
        assert_eq!(r.progress.as_ref().map(|p| p.ram_percent), Some(60));
        assert!(
            r.state.pins(),
            "the leader pins it once the guest runs there"
        );
        let r = r.to_state(MigrationState::Assigned).expect("leader");
        assert!(r.state.pins());
        let v = serde_json::to_value(&r).expect("encode");
        assert_eq!(v["state"], "assigned");
        assert_eq!(v["progress"]["ramPercent"], 60);
        let back: MigrationRecord = serde_json::from_value(v).expect("decode");
        assert_eq!(back, r);
    }

    #[test]
    fn a_live_move_can_fail_at_every_step_and_failure_is_final() {
        let prep = MigrationRecord::request("n2")
            .preparing("n1", false)
            .expect("leader");
        let inc = prep.incoming("tcp:h:1").expect("target");
        let tr = inc.transferring(progress(5)).expect("source");
        for r in [&prep, &inc, &tr] {
            assert!(r.state.is_live_in_flight());
            assert!(!r.state.pins(), "in flight it stays where it runs");
            let f = r.failed("the target died").expect("fail");
            assert_eq!(f.message.as_deref(), Some("the target died"));
            assert!(!f.state.pins());
            for next in [
                MigrationState::Preparing,
                MigrationState::Incoming,
                MigrationState::Transferring,
                MigrationState::Completed,
                MigrationState::Assigned,
            ] {
                assert_eq!(
                    f.to_state(next),
                    Err(TransitionError {
                        from: MigrationState::Failed,
                        to: next
                    })
                );
            }
        }
    }

    #[test]
    fn steps_cannot_be_skipped_or_replayed() {
        use MigrationState::*;
        let all = [
            Requested,
            Assigned,
            Refused,
            Preparing,
            Incoming,
            Transferring,
            Completed,
            Failed,
        ];
        let allowed: Vec<(MigrationState, MigrationState)> = all
            .iter()
            .flat_map(|&a| all.iter().map(move |&b| (a, b)))
            .filter(|(a, b)| a.can_become(*b))
            .collect();
        assert_eq!(
            allowed,
            [
                (Requested, Assigned),
                (Requested, Refused),
                (Requested, Preparing),
                (Preparing, Incoming),
                (Preparing, Failed),
                (Incoming, Transferring),
                (Incoming, Completed),
                (Incoming, Failed),
                (Transferring, Transferring),
                (Transferring, Completed),
                (Transferring, Failed),
                (Completed, Assigned),
            ]
        );
        let r = MigrationRecord::request("n2");
        assert!(
            r.incoming("tcp:h:1").is_err(),
            "no target before the leader"
        );
        assert!(r.completed(None).is_err());
        assert!(
            r.to_state(Assigned)
                .expect("cold")
                .preparing("n1", false)
                .is_err(),
            "a cold move does not turn live"
        );
    }

    #[test]
    fn progress_reads_as_one_line() {
        let mut p = progress(42);
        assert_eq!(
            p.line(),
            "active RAM 42% (100 MiB sent, 50 MiB left, 20.0 MiB/s)"
        );
        p.downtime_ms = Some(120);
        assert!(
            p.line().ends_with(", expected downtime 120 ms"),
            "{}",
            p.line()
        );
        p.phase = "completed".into();
        assert!(p.line().ends_with("/s), downtime 120 ms"), "{}", p.line());
    }

    #[test]
    fn a_refused_override_is_left_alone() {
        let mut ws = [workload("a", Placement::default(), DataLocality::Anywhere)];
        let mut o = overrides("a", "n2");
        for m in o.values_mut() {
            m.state = MigrationState::Refused;
        }
        assert!(apply_overrides(&mut ws, &o).is_empty());
        assert!(ws[0].placement.node.is_none());
    }

    fn assigned(pairs: &[(&str, &str)]) -> BTreeMap<ResourceId, crate::model::Assignment> {
        pairs
            .iter()
            .map(|(w, n)| {
                let id = ResourceId::new(Kind::Container, *w);
                let a = crate::model::Assignment {
                    resource: id.to_string(),
                    node: (*n).into(),
                    ha: true,
                    revision: "r".into(),
                };
                (id, a)
            })
            .collect()
    }

    #[test]
    fn a_placement_change_to_the_replica_node_hands_the_data_off() {
        let to_n2 = || DataLocality::Replicated {
            nodes: BTreeSet::from(["n2".to_string()]),
        };
        let ws = [
            workload("moved", Placement::default(), to_n2()),
            workload("stays", Placement::default(), to_n2()),
            workload("shared", Placement::default(), DataLocality::Anywhere),
            workload("elsewhere", Placement::default(), to_n2()),
            workload("from-dead", Placement::default(), to_n2()),
            workload("by-operator", Placement::default(), to_n2()),
        ];
        let current = assigned(&[
            ("moved", "n1"),
            ("stays", "n1"),
            ("shared", "n1"),
            ("elsewhere", "n1"),
            ("from-dead", "n3"),
            ("by-operator", "n1"),
        ]);
        let next = assigned(&[
            ("moved", "n2"),
            ("stays", "n1"),
            ("shared", "n2"),
            ("elsewhere", "n3"),
            ("from-dead", "n2"),
            ("by-operator", "n2"),
        ]);
        let mut records = overrides("by-operator", "n2");
        // An old hand-over of `moved` does not stop a new one.
        records.insert(
            ResourceId::new(Kind::Container, "moved"),
            MigrationRecord::placement_change("n2", "n1"),
        );
        let out = handovers(&ws, &current, &next, |n| n != "n3", &records);
        assert_eq!(out.len(), 1, "{out:?}");
        let (id, r) = &out[0];
        assert_eq!(id.name, "moved");
        assert_eq!((r.from.as_deref(), r.to.as_str()), (Some("n1"), "n2"));
        assert_eq!(r.state, MigrationState::Assigned);
        assert!(r.placement_change && !r.state.can_become(MigrationState::Assigned));
    }

    #[test]
    fn a_placement_change_record_reads_back_and_an_operator_s_omits_the_flag() {
        let r = MigrationRecord::placement_change("n1", "n2");
        let json = serde_json::to_string(&r).expect("encode");
        assert!(json.contains("\"placementChange\":true"), "{json}");
        let back: MigrationRecord = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, r);
        let operator = serde_json::to_string(&MigrationRecord::request("n2")).expect("encode");
        assert!(!operator.contains("placementChange"), "{operator}");
    }
}
