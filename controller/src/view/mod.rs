//! The read model that `/api/v1` and the web pages share: an overview, the resource
//! tree, a resource's detail and the pending plan, built from the controller's status
//! document, the last reconcile's [`Snapshot`] and the [`EventLog`](crate::events).
//!
//! Every builder here is a pure function of those inputs. Nothing secret leaves this
//! module: specs, observed state, diffs and plan text go through [`redact`].

pub mod capacity;
pub mod cluster;
pub mod redact;

pub use capacity::console_tail;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use stead_reconciler::driver::{Health, Observed};
use stead_reconciler::plan::{Action, Change, Plan};
use stead_reconciler::render;
use stead_schema::graph::edges;
use stead_schema::{Desired, Kind, ResourceId};
use utoipa::ToSchema;

use crate::events::Event;
use crate::status::{Condition, ResourceStatus, Status};

/// Where a revision came from and whether its signature was checked.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevisionInfo {
    /// Full commit id (or a content hash for a directory source).
    pub id: String,
    /// The first 12 characters.
    pub short: String,
    /// Commit author (`Name <email>`), for git.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    /// Commit summary line, for git.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Commit time (Unix seconds), for git.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<i64>,
    /// `verified` (signed by a key of `--verify-commits`) or `not-checked`.
    pub signature: String,
    /// Who signed it, when verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
}

impl RevisionInfo {
    /// A revision known by its id only.
    pub fn bare(id: &str) -> Self {
        RevisionInfo {
            id: id.to_string(),
            short: id.chars().take(12).collect(),
            signature: "not-checked".into(),
            ..RevisionInfo::default()
        }
    }
}

/// Where the controller stands with its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum SyncState {
    /// The head is applied and every resource converged.
    Synced,
    /// The head is not applied (yet, or it was rejected), or something waits or drifted.
    OutOfSync,
    /// A reconcile is running.
    Syncing,
    /// Nothing could be applied yet (no good revision).
    Unknown,
}

/// The sync state and the last reconcile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SyncInfo {
    /// Summary.
    pub state: SyncState,
    /// Result of the last reconcile (`success`, `failed`, `invalid`, `unsigned`, `error`).
    pub last_result: Option<String>,
    /// Message of the last reconcile.
    pub message: String,
    /// When the last reconcile ended (Unix seconds).
    pub last_reconcile_time: Option<f64>,
    /// When a plan was last executed or found converged (Unix seconds).
    pub last_apply_time: Option<f64>,
    /// The last fetch error.
    pub fetch_error: Option<String>,
    /// Why the head is not applied, if it was rejected.
    pub head_error: Option<String>,
    /// Reconciles so far.
    pub reconciles: u64,
    /// `heal` or `report`.
    pub drift_mode: String,
    /// `auto` (every good head is applied) or `manual` (a new head waits for `sync`).
    pub sync_mode: String,
}

/// Resource counts of one kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct KindCount {
    /// Kind.
    pub kind: String,
    /// All of this kind.
    pub total: usize,
    /// By status word (`Ready`, `Progressing`, `Failed`, `Drifted`).
    pub by_status: BTreeMap<String, usize>,
}

/// Host capacity, when the controller can read it cheaply.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Capacity {
    /// CPUs available to the controller.
    pub cpus: usize,
    /// Memory in total, bytes.
    pub memory_total_bytes: u64,
    /// Memory available, bytes.
    pub memory_available_bytes: u64,
    /// 1-minute load average.
    pub load1: f64,
    /// Storage pools' file systems.
    pub pools: Vec<PoolUsage>,
}

/// One storage pool's file-system usage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolUsage {
    /// Pool name.
    pub name: String,
    /// Size of the file system, bytes.
    pub total_bytes: u64,
    /// Free for unprivileged use, bytes.
    pub available_bytes: u64,
}

/// `GET /api/v1/overview`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Overview {
    /// The `--source`.
    pub source: String,
    /// The revision applied last.
    pub applied: Option<RevisionInfo>,
    /// The newest revision seen at the source.
    pub head: Option<RevisionInfo>,
    /// Sync state and the last reconcile.
    pub sync: SyncInfo,
    /// Resources of the applied revision.
    pub total: usize,
    /// Counts by kind (kinds in their dependency order).
    pub counts: Vec<KindCount>,
    /// Counts by status word.
    pub by_status: BTreeMap<String, usize>,
    /// Resources not `Ready`, failing first.
    pub attention: Vec<ResourceSummary>,
    /// Changes not applied: waiting, failed, reported drift, or a head not synced.
    pub pending_changes: usize,
    /// Host capacity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Capacity>,
}

/// One resource in lists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceSummary {
    /// `Kind/name`.
    pub id: String,
    /// Kind.
    pub kind: String,
    /// Name.
    pub name: String,
    /// `Ready`, `Progressing`, `Failed` or `Drifted`.
    pub status: String,
    /// The reason of its condition.
    pub reason: String,
    /// The message of its condition.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Since when (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<f64>,
    /// Drift the last reconcile found (repaired or reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<String>,
    /// Whether it is still drifted (drift only reported, or its repair failed).
    pub drifted: bool,
}

/// A node of the resource tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TreeNode {
    /// The resource.
    #[serde(flatten)]
    pub resource: ResourceSummary,
    /// Depth in the dependency graph: 0 depends on nothing, n depends on something at
    /// n - 1 (the column of a left-to-right tree).
    pub level: usize,
    /// Health the last observe saw (`Ready`, `Progressing`, `Degraded`, `Failed`,
    /// `Absent`).
    pub health: String,
    /// A change is planned and not applied yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<String>,
}

/// An edge of the resource tree: `from` depends on `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TreeEdge {
    /// The dependent (`Kind/name`).
    pub from: String,
    /// The dependency (`Kind/name`).
    pub to: String,
    /// Where `from` names `to` (a JSON pointer).
    pub field: String,
}

/// `GET /api/v1/resources`: the dependency tree of the applied revision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Tree {
    /// The revision it shows.
    pub revision: Option<String>,
    /// Nodes in dependency order (by level, then kind and name).
    pub nodes: Vec<TreeNode>,
    /// Edges between shown nodes.
    pub edges: Vec<TreeEdge>,
    /// Resources in all (before filters).
    pub total: usize,
}

/// The status of one node, for live updates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// `Kind/name`.
    pub id: String,
    /// Status word.
    pub status: String,
    /// Reason.
    pub reason: String,
    /// Still drifted.
    pub drifted: bool,
}

/// Tree filters (`?kind=&status=&name=`).
#[derive(Debug, Clone, Default, Deserialize, ToSchema, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TreeFilter {
    /// Kind (case-insensitive, `vm` for VirtualMachine and the like).
    pub kind: Option<String>,
    /// Status word (case-insensitive).
    pub status: Option<String>,
    /// Substring of the name.
    pub name: Option<String>,
}

/// One changed field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FieldDiff {
    /// JSON pointer relative to the spec.
    pub path: String,
    /// What the host has (or had at the last apply); absent: none.
    #[schema(value_type = Object)]
    pub observed: Option<Value>,
    /// What the manifest asks for; absent: removed.
    #[schema(value_type = Object)]
    pub desired: Option<Value>,
    /// `hot`, `restart`, `recreate` or `data-loss`.
    pub impact: String,
    /// `old -> new` as the CLI prints it.
    pub text: String,
}

/// What the last observe saw of a resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObservedView {
    /// An object with this identity exists on the host.
    pub exists: bool,
    /// It carries stead's ownership mark.
    pub owned: bool,
    /// Health word.
    pub health: String,
    /// Health message.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub health_message: String,
    /// Observed state, in the spec's shape (redacted).
    #[schema(value_type = Object)]
    pub state: Value,
    /// Runtime status (pids, restarts, usage, paths; redacted).
    #[schema(value_type = Object)]
    pub status: Value,
}

/// Workload figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadInfo {
    /// `running`, `stopped`, `restarting`, …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Addresses from the manifest's interfaces.
    pub addresses: Vec<String>,
    /// CPU time used, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<f64>,
    /// Memory in use, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<f64>,
    /// Restarts by the supervisor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarts: Option<u64>,
    /// The console log's last lines, when the driver keeps one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_tail: Option<String>,
}

/// One backup of a resource.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupEntry {
    /// `Kind/name/TIME`.
    pub id: String,
    /// When (RFC 3339).
    pub time: String,
    /// The StoragePool holding it.
    pub storage: String,
    /// Bytes of content backed up.
    pub bytes: u64,
    /// Bytes written to the chunk store for it (compressed new chunks).
    pub stored_bytes: u64,
    /// How long it took, milliseconds.
    pub duration_ms: u64,
    /// How the data was made consistent (`snapshot`, `stop`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<String>,
    /// The last verify of it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<VerifyState>,
}

/// The outcome of a backup's last verify.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VerifyState {
    /// Every chunk and checksum was right.
    pub ok: bool,
    /// When (Unix seconds).
    pub at: f64,
    /// Problems found (empty when ok).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

/// `GET /api/v1/resources/{kind}/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Detail {
    /// Summary.
    pub resource: ResourceSummary,
    /// Conditions.
    pub conditions: Vec<ConditionView>,
    /// Where the manifest is (`file:line`).
    pub origin: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// The desired spec (redacted).
    #[schema(value_type = Object)]
    pub desired: Value,
    /// What the last observe saw.
    pub observed: Option<ObservedView>,
    /// Fields where the host differs from the manifest (empty: converged).
    pub diff: Vec<FieldDiff>,
    /// The planned change, if any: `create`, `update in place`, …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<String>,
    /// Resources it depends on.
    pub depends_on: Vec<String>,
    /// Resources that depend on it.
    pub dependents: Vec<String>,
    /// Events about it, newest first.
    pub events: Vec<Event>,
    /// For containers and VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<WorkloadInfo>,
    /// Backups of it (volumes, containers, VMs) in the storages of the BackupSchedules
    /// that select it, oldest first.
    pub backups: Vec<BackupEntry>,
}

/// A condition, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConditionView {
    /// `Ready`, `Progressing` or `Failed`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True` or `False`.
    pub status: String,
    /// Reason.
    pub reason: String,
    /// Message.
    pub message: String,
    /// Unix seconds.
    pub last_transition_time: f64,
}

impl From<&Condition> for ConditionView {
    fn from(c: &Condition) -> Self {
        ConditionView {
            type_: c.type_.clone(),
            status: c.status.clone(),
            reason: c.reason.clone(),
            message: redact::redact_text(&c.message),
            last_transition_time: c.last_transition_time,
        }
    }
}

/// One planned change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlannedChange {
    /// `Kind/name`.
    pub id: String,
    /// `create`, `adopt`, `update`, `replace`, `delete`, `retain`.
    pub action: String,
    /// The plan symbol (`+`, `&`, `~`, `-/+`, `-`, `=`).
    pub symbol: String,
    /// The verb the CLI prints.
    pub verb: String,
    /// The highest impact: `hot`, `restart`, `recreate`, `data-loss`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub impact: Option<String>,
    /// Only repairs drift.
    pub drift: bool,
    /// Changed fields.
    pub fields: Vec<FieldDiff>,
    /// Why (notes of the plan).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Why it is not applied yet: `waiting-for-sync` (a head in manual sync),
    /// `reported-drift`, the reason of a failure or a wait (`Backoff`, `ApplyFailed`,
    /// `DependencyNotReady`, …).
    pub state: String,
}

/// A plan error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlanProblem {
    /// `Kind/name`.
    pub id: String,
    /// What is wrong.
    pub message: String,
}

/// `GET /api/v1/pending`: what is planned and not applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Pending {
    /// The revision applied.
    pub applied: Option<RevisionInfo>,
    /// The revision the plan is for (the head, in manual sync; else the applied one).
    pub target: Option<RevisionInfo>,
    /// Why the head is not applied, if it was rejected (no plan for it then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_error: Option<String>,
    /// The changes, in execution order.
    pub changes: Vec<PlannedChange>,
    /// Plan errors.
    pub errors: Vec<PlanProblem>,
    /// The highest impact of all changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_impact: Option<String>,
    /// The plan as `stead diff` prints it (redacted).
    pub text: String,
    /// The plan of the plan-only branch's head (`--plan-branch`), never applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<BranchPlan>,
}

/// The plan of the head of a plan-only branch against the host: what merging it would
/// do. Never applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BranchPlan {
    /// The branch.
    pub branch: String,
    /// Its head commit.
    pub target: RevisionInfo,
    /// The changes, in execution order (state `plan-only`).
    pub changes: Vec<PlannedChange>,
    /// Plan errors.
    pub errors: Vec<PlanProblem>,
    /// The highest impact of all changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_impact: Option<String>,
    /// The plan as `stead diff` prints it (redacted).
    pub text: String,
}

/// What the last reconcile saw and planned: the read model's input besides the status
/// document and the events. Published by the engine at the end of each reconcile.
pub(crate) struct Snapshot {
    /// The applied revision.
    pub(crate) revision: RevisionInfo,
    /// Its desired set.
    pub(crate) desired: Arc<Desired>,
    /// What observe saw.
    pub(crate) observed: BTreeMap<ResourceId, Observed>,
    /// The run's first plan (before drift and held changes were left out).
    pub(crate) plan: Plan,
    /// Applied in the run.
    pub(crate) applied: BTreeMap<ResourceId, Action>,
    /// Drift the run found.
    pub(crate) drift: BTreeMap<ResourceId, String>,
    /// Still drifted after the run.
    pub(crate) drifted: BTreeSet<ResourceId>,
    /// A head waiting for `sync` (manual sync), with its plan.
    pub(crate) proposed: Option<(RevisionInfo, Plan)>,
    /// The plan-only branch's name, head and plan (`--plan-branch`).
    pub(crate) branch: Option<(String, RevisionInfo, Plan)>,
}

/// The summary of `id` from its status (if the controller has one) and the snapshot.
fn summary_of(
    id: &ResourceId,
    st: Option<&ResourceStatus>,
    snap: Option<&Snapshot>,
) -> ResourceSummary {
    let word = st.map_or("Unknown", |s| s.status.as_str());
    let cond = st.and_then(|s| {
        s.conditions
            .iter()
            .find(|c| c.type_ != "Ready")
            .or(s.conditions.first())
    });
    ResourceSummary {
        id: id.to_string(),
        kind: id.kind.as_str().into(),
        name: id.name.clone(),
        status: word.into(),
        reason: cond.map(|c| c.reason.clone()).unwrap_or_default(),
        message: cond
            .map(|c| redact::redact_text(&c.message))
            .unwrap_or_default(),
        since: cond.map(|c| c.last_transition_time),
        drift: snap.and_then(|s| s.drift.get(id).cloned()),
        drifted: snap.is_some_and(|s| s.drifted.contains(id)),
    }
}

/// Statuses by id.
fn status_index(status: &Status) -> BTreeMap<ResourceId, &ResourceStatus> {
    status
        .resources
        .iter()
        .filter_map(|r| {
            let kind = Kind::parse_loose(&r.kind)?;
            Some((ResourceId::new(kind, r.name.clone()), r))
        })
        .collect()
}

/// Ids the view shows: the snapshot's desired set, else those in the status.
fn shown_ids(status: &Status, snap: Option<&Snapshot>) -> Vec<ResourceId> {
    match snap {
        Some(s) => s.desired.resources.keys().cloned().collect(),
        None => status_index(status).into_keys().collect(),
    }
}

/// Order of status words for "failing first".
fn severity(word: &str) -> u8 {
    match word {
        "Failed" => 0,
        "Drifted" => 1,
        "Progressing" => 2,
        "Unknown" => 3,
        _ => 4,
    }
}

/// The sync state from the status and whether a reconcile runs.
fn sync_state(status: &Status, busy: bool, pending: usize) -> SyncState {
    if busy {
        return SyncState::Syncing;
    }
    if !status.ready {
        return SyncState::Unknown;
    }
    let head_applied = status.head_revision.is_none() || status.head_revision == status.revision;
    let all_ready = status.resources.iter().all(|r| r.status == "Ready");
    if head_applied && all_ready && pending == 0 {
        SyncState::Synced
    } else {
        SyncState::OutOfSync
    }
}

/// The changes of the last plan that were not applied, with why.
fn unapplied<'a>(snap: &'a Snapshot, status: &Status) -> Vec<(&'a Change, String)> {
    let index = status_index(status);
    snap.plan
        .changes
        .iter()
        .filter(|c| c.action != Action::Noop && !snap.applied.contains_key(&c.id))
        .map(|c| {
            let why = match index.get(&c.id) {
                Some(s) if s.status == "Failed" => summary_of(&c.id, Some(s), None).reason,
                _ if c.drift => "reported-drift".to_string(),
                _ => "waiting".to_string(),
            };
            (c, why)
        })
        .collect()
}

/// Inputs of [`overview`] besides the status and snapshot.
#[derive(Debug, Clone, Default)]
pub struct OverviewExtras {
    /// A reconcile is running.
    pub busy: bool,
    /// The head's commit details.
    pub head: Option<RevisionInfo>,
    /// `auto` or `manual`.
    pub sync_mode: String,
    /// Host capacity.
    pub capacity: Option<Capacity>,
}

/// `GET /api/v1/overview`.
pub(crate) fn overview(status: &Status, snap: Option<&Snapshot>, x: OverviewExtras) -> Overview {
    let index = status_index(status);
    let ids = shown_ids(status, snap);
    let mut counts: BTreeMap<Kind, KindCount> = BTreeMap::new();
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    let mut attention = Vec::new();
    for id in &ids {
        let s = summary_of(id, index.get(id).copied(), snap);
        let k = counts.entry(id.kind).or_insert_with(|| KindCount {
            kind: id.kind.as_str().into(),
            total: 0,
            by_status: BTreeMap::new(),
        });
        k.total += 1;
        *k.by_status.entry(s.status.clone()).or_insert(0) += 1;
        *by_status.entry(s.status.clone()).or_insert(0) += 1;
        if s.status != "Ready" || s.drifted {
            attention.push(s);
        }
    }
    attention.sort_by(|a, b| {
        (severity(&a.status), &a.kind, &a.name).cmp(&(severity(&b.status), &b.kind, &b.name))
    });
    let pending = snap.map_or(0, |s| {
        unapplied(s, status).len()
            + s.proposed.as_ref().map_or(0, |(_, p)| {
                p.changes
                    .iter()
                    .filter(|c| c.action != Action::Noop)
                    .count()
            })
    });
    let mut head = x.head;
    if head.is_none() {
        head = status.head_revision.as_deref().map(RevisionInfo::bare);
    }
    Overview {
        source: status.source.clone(),
        applied: snap
            .map(|s| s.revision.clone())
            .or_else(|| status.revision.as_deref().map(RevisionInfo::bare)),
        head,
        sync: SyncInfo {
            state: sync_state(status, x.busy, pending),
            last_result: status.last_result.clone(),
            message: redact::redact_text(&status.message),
            last_reconcile_time: status.last_reconcile_time,
            last_apply_time: status.last_apply_time,
            fetch_error: status.fetch_error.clone(),
            head_error: status.head_error.clone(),
            reconciles: status.reconciles,
            drift_mode: status.drift_mode.clone(),
            sync_mode: x.sync_mode,
        },
        total: ids.len(),
        counts: counts.into_values().collect(),
        by_status,
        attention,
        pending_changes: pending,
        capacity: x.capacity,
    }
}

/// The health word of an observation.
fn health_word(o: Option<&Observed>) -> (String, String) {
    match o {
        None => ("Unknown".into(), String::new()),
        Some(o) if !o.exists => ("Absent".into(), String::new()),
        Some(o) => match &o.health {
            Health::Ready => ("Ready".into(), String::new()),
            Health::Progressing => ("Progressing".into(), String::new()),
            Health::Degraded(m) => ("Degraded".into(), redact::redact_text(m)),
            Health::Failed(m) => ("Failed".into(), redact::redact_text(m)),
        },
    }
}

/// Dependency levels: 0 for no dependencies, else one more than the deepest dependency
/// (cycles, refused by validation, stop at the number of ids).
fn levels(ids: &[ResourceId], es: &[(ResourceId, ResourceId)]) -> BTreeMap<ResourceId, usize> {
    let mut level: BTreeMap<ResourceId, usize> = ids.iter().map(|i| (i.clone(), 0)).collect();
    for _ in 0..ids.len() {
        let mut changed = false;
        for (from, to) in es {
            let want = level.get(to).map_or(0, |l| l + 1);
            if let Some(l) = level.get_mut(from)
                && *l < want
            {
                *l = want;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    level
}

/// Whether `s` passes `f`.
fn passes(f: &TreeFilter, s: &ResourceSummary) -> bool {
    let kind_ok = f.kind.as_deref().filter(|k| !k.is_empty()).is_none_or(|k| {
        Kind::parse_loose(k).is_some_and(|k| k.as_str() == s.kind)
            || k.eq_ignore_ascii_case(&s.kind)
    });
    let status_ok = f
        .status
        .as_deref()
        .filter(|x| !x.is_empty())
        .is_none_or(|x| {
            x.eq_ignore_ascii_case(&s.status) || (x.eq_ignore_ascii_case("drifted") && s.drifted)
        });
    let name_ok = f
        .name
        .as_deref()
        .is_none_or(|n| s.name.to_lowercase().contains(&n.to_lowercase()));
    kind_ok && status_ok && name_ok
}

/// `GET /api/v1/resources`.
pub(crate) fn tree(status: &Status, snap: Option<&Snapshot>, filter: &TreeFilter) -> Tree {
    let index = status_index(status);
    let ids = shown_ids(status, snap);
    let all_edges: Vec<(ResourceId, ResourceId, String)> = snap
        .map(|s| {
            edges(s.desired.resources.values())
                .into_iter()
                .map(|e| (e.from, e.to, e.pointer))
                .collect()
        })
        .unwrap_or_default();
    let pairs: Vec<(ResourceId, ResourceId)> = all_edges
        .iter()
        .map(|(f, t, _)| (f.clone(), t.clone()))
        .collect();
    let level = levels(&ids, &pairs);
    let pending = snap.map(|s| pending_by_id(s, status)).unwrap_or_default();
    let mut nodes: Vec<TreeNode> = ids
        .iter()
        .map(|id| {
            let resource = summary_of(id, index.get(id).copied(), snap);
            let obs = snap.and_then(|s| s.observed.get(id));
            TreeNode {
                resource,
                level: level.get(id).copied().unwrap_or(0),
                health: health_word(obs).0,
                pending: pending.get(id).cloned(),
            }
        })
        .filter(|n| passes(filter, &n.resource))
        .collect();
    nodes.sort_by(|a, b| {
        (a.level, kind_rank(&a.resource.kind), &a.resource.name).cmp(&(
            b.level,
            kind_rank(&b.resource.kind),
            &b.resource.name,
        ))
    });
    let shown: BTreeSet<&str> = nodes.iter().map(|n| n.resource.id.as_str()).collect();
    let edges = all_edges
        .iter()
        .map(|(f, t, p)| TreeEdge {
            from: f.to_string(),
            to: t.to_string(),
            field: p.clone(),
        })
        .filter(|e| shown.contains(e.from.as_str()) && shown.contains(e.to.as_str()))
        .collect();
    Tree {
        revision: snap
            .map(|s| s.revision.id.clone())
            .or(status.revision.clone()),
        nodes,
        edges,
        total: ids.len(),
    }
}

/// A kind's position in [`Kind::ALL`].
fn kind_rank(kind: &str) -> usize {
    Kind::ALL
        .iter()
        .position(|k| k.as_str() == kind)
        .unwrap_or(Kind::ALL.len())
}

/// The verb of the change planned for each resource and not applied.
fn pending_by_id(snap: &Snapshot, status: &Status) -> BTreeMap<ResourceId, String> {
    let mut out: BTreeMap<ResourceId, String> = unapplied(snap, status)
        .into_iter()
        .map(|(c, _)| (c.id.clone(), c.action.verb().to_string()))
        .collect();
    if let Some((_, plan)) = &snap.proposed {
        for c in plan.changes.iter().filter(|c| c.action != Action::Noop) {
            out.insert(c.id.clone(), c.action.verb().to_string());
        }
    }
    out
}

/// Live-update entries for the resources whose status, reason or drift differ between
/// `prev` and `cur`.
pub fn changed_nodes(prev: &[NodeStatus], cur: &[NodeStatus]) -> Vec<NodeStatus> {
    let before: BTreeMap<&str, &NodeStatus> = prev.iter().map(|n| (n.id.as_str(), n)).collect();
    cur.iter()
        .filter(|n| before.get(n.id.as_str()).is_none_or(|p| *p != *n))
        .cloned()
        .collect()
}

/// Every node's live status.
pub(crate) fn node_statuses(status: &Status, snap: Option<&Snapshot>) -> Vec<NodeStatus> {
    let index = status_index(status);
    shown_ids(status, snap)
        .iter()
        .map(|id| {
            let s = summary_of(id, index.get(id).copied(), snap);
            NodeStatus {
                id: s.id,
                status: s.status,
                reason: s.reason,
                drifted: s.drifted,
            }
        })
        .collect()
}

/// A change's fields for display, redacted.
fn field_diffs(c: &Change) -> Vec<FieldDiff> {
    c.fields
        .iter()
        .map(|f| {
            let observed = redact::redacted_at(&f.path, &f.old);
            let desired = redact::redacted_at(&f.path, &f.new);
            let text = format!(
                "{} -> {}",
                render::show_field(&f.path, &observed),
                render::show_field(&f.path, &desired)
            );
            FieldDiff {
                path: f.path.clone(),
                observed,
                desired,
                impact: f.impact.as_str().into(),
                text,
            }
        })
        .collect()
}

/// `GET /api/v1/resources/{kind}/{name}`; `None` when the applied revision has no such
/// resource. `events` are the resource's, newest first.
/// Whether `id` has a detail page: the applied revision or the status knows it (a
/// resource that only a proposed head or the plan-only branch has does not).
fn has_detail(
    index: &BTreeMap<ResourceId, &ResourceStatus>,
    snap: Option<&Snapshot>,
    id: &ResourceId,
) -> bool {
    index.contains_key(id) || snap.is_some_and(|s| s.desired.get(id).is_some())
}

/// Of the `Kind/name` strings in `ids`, those with a detail page ([`detail`]).
pub(crate) fn ids_with_detail<'a>(
    status: &Status,
    snap: Option<&Snapshot>,
    ids: impl Iterator<Item = &'a str>,
) -> BTreeSet<String> {
    let index = status_index(status);
    ids.filter(|text| {
        text.split_once('/')
            .and_then(|(k, n)| Some(ResourceId::new(Kind::parse_loose(k)?, n)))
            .is_some_and(|id| has_detail(&index, snap, &id))
    })
    .map(str::to_string)
    .collect()
}

pub(crate) fn detail(
    status: &Status,
    snap: Option<&Snapshot>,
    id: &ResourceId,
    events: Vec<Event>,
    console_tail: impl Fn(&Observed) -> Option<String>,
) -> Option<Detail> {
    let index = status_index(status);
    if !has_detail(&index, snap, id) {
        return None;
    }
    let snap_res = snap.and_then(|s| s.desired.get(id));
    let st = index.get(id).copied();
    let resource = summary_of(id, st, snap);
    let obs = snap.and_then(|s| s.observed.get(id));
    let change = snap.and_then(|s| {
        s.proposed
            .as_ref()
            .and_then(|(_, p)| {
                p.changes
                    .iter()
                    .find(|c| &c.id == id && c.action != Action::Noop)
            })
            .or_else(|| s.plan.changes.iter().find(|c| &c.id == id))
    });
    let applied = snap.is_some_and(|s| s.applied.contains_key(id));
    let diff = change
        .filter(|_| !applied)
        .map(field_diffs)
        .unwrap_or_default();
    let pending = change
        .filter(|c| c.action != Action::Noop && !applied)
        .map(|c| c.action.verb().to_string());
    let (depends_on, dependents) = snap.map(|s| neighbours(&s.desired, id)).unwrap_or_default();
    let workload = matches!(id.kind, Kind::Container | Kind::VirtualMachine)
        .then(|| workload_info(snap_res.map(|r| r.spec_json()), obs, &console_tail));
    Some(Detail {
        resource,
        conditions: st
            .map(|s| s.conditions.iter().map(ConditionView::from).collect())
            .unwrap_or_default(),
        origin: snap_res
            .map(|r| format!("{}:{}", r.origin.file.display(), r.origin.pos.line))
            .unwrap_or_default(),
        labels: snap_res
            .map(|r| r.metadata.labels.clone().into_iter().collect())
            .unwrap_or_default(),
        desired: snap_res
            .map(|r| redact::redacted::<&str>(&[], &r.spec_json()))
            .unwrap_or(Value::Null),
        observed: obs.map(|o| {
            let (health, health_message) = health_word(Some(o));
            ObservedView {
                exists: o.exists,
                owned: o.owned,
                health,
                health_message,
                state: redact::redacted::<&str>(&[], &o.state),
                status: redact::redacted::<&str>(&[], &o.status),
            }
        }),
        diff,
        pending,
        depends_on,
        dependents,
        events,
        workload,
        backups: Vec::new(),
    })
}

/// What `id` depends on and what depends on it.
fn neighbours(desired: &Desired, id: &ResourceId) -> (Vec<String>, Vec<String>) {
    let mut on = BTreeSet::new();
    let mut by = BTreeSet::new();
    for e in edges(desired.resources.values()) {
        if &e.from == id {
            on.insert(e.to.to_string());
        }
        if &e.to == id {
            by.insert(e.from.to_string());
        }
    }
    (on.into_iter().collect(), by.into_iter().collect())
}

/// A workload's figures from its spec and observation.
fn workload_info(
    spec: Option<Value>,
    obs: Option<&Observed>,
    console_tail: &impl Fn(&Observed) -> Option<String>,
) -> WorkloadInfo {
    let st = obs.map(|o| &o.status);
    let get = |k: &str| st.and_then(|s| s.get(k));
    let (cpu_seconds, memory_bytes) = obs.and_then(crate::status::usage).unwrap_or((None, None));
    WorkloadInfo {
        phase: get("phase").and_then(Value::as_str).map(str::to_string),
        addresses: spec.as_ref().map(addresses_of).unwrap_or_default(),
        cpu_seconds,
        memory_bytes,
        restarts: get("restarts").and_then(Value::as_u64),
        console_tail: obs.and_then(console_tail),
    }
}

/// The addresses a workload's interfaces declare (`interfaces[].addresses[]` or
/// `.address`).
fn addresses_of(spec: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for i in spec
        .get("interfaces")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(a) = i.get("address").and_then(Value::as_str) {
            out.push(a.to_string());
        }
        for a in i
            .get("addresses")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            out.push(a.to_string());
        }
    }
    out
}

/// `GET /api/v1/pending`.
pub(crate) fn pending(status: &Status, snap: Option<&Snapshot>) -> Pending {
    let applied = snap
        .map(|s| s.revision.clone())
        .or_else(|| status.revision.as_deref().map(RevisionInfo::bare));
    let Some(snap) = snap else {
        return Pending {
            applied,
            target: None,
            head_error: status.head_error.clone(),
            changes: Vec::new(),
            errors: Vec::new(),
            max_impact: None,
            text: String::new(),
            branch: None,
        };
    };
    let (target, plan, waiting): (RevisionInfo, &Plan, Vec<(&Change, String)>) =
        match &snap.proposed {
            Some((rev, plan)) => (
                rev.clone(),
                plan,
                plan.changes
                    .iter()
                    .filter(|c| c.action != Action::Noop)
                    .map(|c| (c, "waiting-for-sync".to_string()))
                    .collect(),
            ),
            None => (snap.revision.clone(), &snap.plan, unapplied(snap, status)),
        };
    let changes: Vec<PlannedChange> = waiting
        .iter()
        .map(|(c, why)| planned_change(c, why.clone()))
        .collect();
    let max_impact = waiting
        .iter()
        .filter_map(|(c, _)| c.impact)
        .max()
        .map(|i| i.as_str().to_string());
    let mut shown = plan.clone();
    let keep: BTreeSet<&ResourceId> = waiting.iter().map(|(c, _)| &c.id).collect();
    shown.changes = plan
        .changes
        .iter()
        .filter(|c| c.action == Action::Noop || keep.contains(&c.id))
        .map(redacted_change)
        .collect();
    Pending {
        applied: Some(snap.revision.clone()),
        target: Some(target),
        head_error: status.head_error.clone(),
        changes,
        errors: plan_problems(plan),
        max_impact,
        text: render::plan_text(&shown, render::Style::default()),
        branch: snap
            .branch
            .as_ref()
            .map(|(name, rev, plan)| branch_plan(name, rev, plan)),
    }
}

/// The [`BranchPlan`] of `plan`, the plan of branch `name`'s head `rev`.
pub(crate) fn branch_plan(name: &str, rev: &RevisionInfo, plan: &Plan) -> BranchPlan {
    let live: Vec<&Change> = plan
        .changes
        .iter()
        .filter(|c| c.action != Action::Noop)
        .collect();
    let mut shown = plan.clone();
    shown.changes = plan.changes.iter().map(redacted_change).collect();
    BranchPlan {
        branch: name.to_string(),
        target: rev.clone(),
        changes: live
            .iter()
            .map(|c| planned_change(c, "plan-only".into()))
            .collect(),
        errors: plan_problems(plan),
        max_impact: live
            .iter()
            .filter_map(|c| c.impact)
            .max()
            .map(|i| i.as_str().to_string()),
        text: render::plan_text(&shown, render::Style::default()),
    }
}

/// The [`PlannedChange`] the API shows for `c` (redacted), in `state`.
fn planned_change(c: &Change, state: String) -> PlannedChange {
    PlannedChange {
        id: c.id.to_string(),
        action: format!("{:?}", c.action).to_lowercase(),
        symbol: c.action.symbol().into(),
        verb: c.action.verb().into(),
        impact: c.impact.map(|i| i.as_str().to_string()),
        drift: c.drift,
        fields: field_diffs(c),
        note: c.note.as_deref().map(redact::redact_text),
        state,
    }
}

/// The errors of `plan`, redacted.
fn plan_problems(plan: &Plan) -> Vec<PlanProblem> {
    plan.errors
        .iter()
        .map(|e| PlanProblem {
            id: e.id.to_string(),
            message: redact::redact_text(&e.message),
        })
        .collect()
}

/// `c` with its field values redacted.
fn redacted_change(c: &Change) -> Change {
    let mut c = c.clone();
    for f in &mut c.fields {
        f.old = redact::redacted_at(&f.path, &f.old);
        f.new = redact::redacted_at(&f.path, &f.new);
    }
    c.note = c.note.as_deref().map(redact::redact_text);
    c
}

#[cfg(test)]
pub(crate) mod tests;
