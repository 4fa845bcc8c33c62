//! Storage replication schedule and status: which volumes are due for a copy to their peer
//! node (`Volume.spec.replication: {to, every}`), and the status record in etcd under
//! `replication/Volume/<name>` (last replicated point, bytes, duration, lag, last error).
//!
//! The agent owning a volume's workload calls [`Replicator::tick`] on a timer with the jobs
//! of the workloads it owns and their fencing tokens. A job runs only while its token is
//! current, and its status is written in a transaction guarded by that token: an agent that
//! lost ownership neither starts a transfer nor records one over the new owner's status.
//! The transfer itself is the [`Transfer`] given by the binary (btrfs/zfs send over mutual
//! TLS in stead-drivers).
//!
//! Schedule ([`next_due`]): a volume never replicated is due at once; after a success, one
//! `every` after that attempt started; after `n` failures in a row, a backoff of 10 s × 2ⁿ⁻¹,
//! never longer than `every`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{info, instrument, warn};

use stead_schema::{Desired, Kind, ResourceId, StoragePoolSpec};

use crate::agent::Owned;
use crate::etcd::{Store, StoreError};
use crate::keys::{Key, ResourceRef};
use crate::owner::{self, FencingToken};
use crate::placement::volumes_of;
use crate::watch::{decode_or_skip, list_prefix};

/// First retry delay after a failed transfer (doubled per further failure, capped at `every`).
pub const FIRST_BACKOFF: Duration = Duration::from_secs(10);

/// One volume to replicate from this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationJob {
    /// The volume's name.
    pub volume: String,
    /// The node receiving the copies.
    pub to: String,
    /// Interval between copies.
    pub every: Duration,
    /// The workload using the volume, whose ownership guards the job.
    pub token: FencingToken,
}

/// What a successful transfer reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferReport {
    /// Sequence number of the replication point.
    pub seq: u64,
    /// When the point's snapshot was taken (Unix seconds).
    pub taken_at: u64,
    /// Bytes sent.
    pub bytes: u64,
    /// Whether it was incremental.
    pub incremental: bool,
    /// How long it took.
    pub duration: Duration,
    /// Where the receiver kept its stale live copy of the volume (a read-only snapshot),
    /// if it held one that changed since the common point.
    pub kept: Option<String>,
}

/// The transfer of one replication point (blocking; run off the async runtime).
pub trait Transfer: Send + Sync {
    /// Sends the next point of `job.volume` to `job.to`; the error is shown in status.
    fn transfer(&self, job: &ReplicationJob) -> Result<TransferReport, String>;
}

/// The status record of one volume's replication, as written to etcd.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationStatus {
    /// The sending node.
    pub from: String,
    /// The receiving node.
    pub to: String,
    /// The last replicated point's sequence number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// When the last replicated point was taken (Unix seconds): a failover loses what was
    /// written after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_point: Option<u64>,
    /// Bytes of the last successful transfer.
    pub bytes: u64,
    /// Duration of the last successful transfer, in milliseconds.
    pub duration_ms: u64,
    /// Seconds between the last point and the time this record was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_s: Option<u64>,
    /// When the last attempt started (Unix seconds).
    pub last_attempt: u64,
    /// Failures in a row since the last success.
    pub failures: u32,
    /// The last attempt's error, if it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The last failover that started the volume from its replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<FailoverRecord>,
    /// The last stale live copy a receiver kept (as a read-only snapshot) when the volume
    /// became a replica there; the operator deletes it when it is not needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_copy: Option<StaleCopy>,
}

/// A receiving node's divergent live copy of a volume, kept read-only when the volume
/// became a replica there (after a failover gave up its writes after the last point).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StaleCopy {
    /// The node holding it.
    pub node: String,
    /// Its path there (`<pool>/snapshots/<volume>/stale-<unix time>`).
    pub path: String,
    /// When it was kept (Unix seconds).
    pub at: u64,
}

/// A failover that made a replica the live volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailoverRecord {
    /// The node the volume now lives on.
    pub node: String,
    /// When the replica was promoted (Unix seconds).
    pub at: u64,
    /// The replica's sequence number.
    pub seq: u64,
    /// When the replica's snapshot was taken (Unix seconds).
    pub point: u64,
    /// Data-loss window in seconds: writes after `point` on the old node are lost.
    pub window_s: u64,
}

/// When `status`'s volume is next due (Unix seconds); `None` status: now.
pub fn next_due(status: Option<&ReplicationStatus>, every: Duration, now: u64) -> u64 {
    let Some(s) = status else {
        return now;
    };
    if s.failover.is_some() && s.failures == 0 {
        // The volume changed nodes since the last transfer: its new owner sends at once.
        return now;
    }
    if s.failures == 0 {
        return s.last_attempt.saturating_add(every.as_secs());
    }
    s.last_attempt
        .saturating_add(backoff(s.failures, every).as_secs())
}

/// The delay after `failures` failures in a row: 10 s × 2ⁿ⁻¹, at most `every`.
pub fn backoff(failures: u32, every: Duration) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    FIRST_BACKOFF.saturating_mul(1 << exp).min(every)
}

/// The status after a successful transfer started at `started`, written at `now`; the
/// stale copy a receiver kept is the report's, else the `previous` status's.
pub fn after_success(
    previous: Option<&ReplicationStatus>,
    job: &ReplicationJob,
    from: &str,
    report: &TransferReport,
    started: u64,
    now: u64,
) -> ReplicationStatus {
    let stale_copy = report
        .kept
        .as_ref()
        .map(|path| StaleCopy {
            node: job.to.clone(),
            path: path.clone(),
            at: now,
        })
        .or_else(|| previous.and_then(|p| p.stale_copy.clone()));
    ReplicationStatus {
        from: from.to_string(),
        to: job.to.clone(),
        seq: Some(report.seq),
        last_point: Some(report.taken_at),
        bytes: report.bytes,
        duration_ms: u64::try_from(report.duration.as_millis()).unwrap_or(u64::MAX),
        lag_s: Some(now.saturating_sub(report.taken_at)),
        last_attempt: started,
        failures: 0,
        last_error: None,
        failover: None,
        stale_copy,
    }
}

/// The status after a failed attempt started at `started`: the last point is kept.
pub fn after_failure(
    previous: Option<&ReplicationStatus>,
    job: &ReplicationJob,
    from: &str,
    error: &str,
    started: u64,
    now: u64,
) -> ReplicationStatus {
    let mut s = previous.cloned().unwrap_or_default();
    s.from = from.to_string();
    s.to = job.to.clone();
    s.lag_s = s.last_point.map(|p| now.saturating_sub(p));
    s.last_attempt = started;
    s.failures = s.failures.saturating_add(1);
    s.last_error = Some(error.to_string());
    s
}

/// The replication jobs of the workloads `node` owns: each volume of an owned workload that
/// declares `replication` to another node, once (the first owner by id guards it). A volume
/// whose `to` is `node` itself (the workload moved or failed over to its replica node) has no
/// job here; [`jobs_reversed`] gives it one back to its previous owner.
pub fn jobs_for(desired: &Desired, owned: &[Owned], node: &str) -> Vec<ReplicationJob> {
    jobs_with(desired, owned, |_, to| (to != node).then(|| to.to_string()))
}

/// [`jobs_for`] with the reversal rule ([`effective_peer`] on `statuses`, by volume): a
/// volume whose `to` names `node` itself goes back to its previous owner.
pub fn jobs_reversed(
    desired: &Desired,
    owned: &[Owned],
    node: &str,
    statuses: &BTreeMap<String, ReplicationStatus>,
) -> Vec<ReplicationJob> {
    jobs_with(desired, owned, |volume, to| {
        effective_peer(to, node, statuses.get(volume))
    })
}

/// The reversal rule: where the copies of a volume whose manifest says `to` go from its
/// owner `owner`: to `to`, unless `to` names the owner itself (its workload moved or failed
/// over to the replica node); then to the other node its status names (the previous owner,
/// which keeps the old copy and its pool), if any.
pub fn effective_peer(to: &str, owner: &str, status: Option<&ReplicationStatus>) -> Option<String> {
    if to != owner {
        return Some(to.to_string());
    }
    let s = status?;
    [&s.to, &s.from]
        .into_iter()
        .find(|n| !n.is_empty() && n.as_str() != owner)
        .cloned()
}

/// The jobs of the volumes of `owned`, each to `peer(volume, manifest's to)` when it names one.
fn jobs_with(
    desired: &Desired,
    owned: &[Owned],
    peer: impl Fn(&str, &str) -> Option<String>,
) -> Vec<ReplicationJob> {
    let mut jobs: BTreeMap<String, ReplicationJob> = BTreeMap::new();
    let mut owned: Vec<&Owned> = owned.iter().collect();
    owned.sort_by(|a, b| a.resource.cmp(&b.resource));
    for o in owned {
        for volume in owned_volumes(desired, o) {
            let Some(rep) = desired.volume(&volume).and_then(|v| v.replication.as_ref()) else {
                continue;
            };
            if jobs.contains_key(&volume) {
                continue;
            }
            let Some(to) = peer(&volume, &rep.to.0) else {
                continue;
            };
            let job = ReplicationJob {
                volume: volume.clone(),
                to,
                every: rep.every.0,
                token: o.token.clone(),
            };
            jobs.insert(volume, job);
        }
    }
    jobs.into_values().collect()
}

/// The volumes of the workload `owned` guards, per the manifests (none when it is not in
/// them).
pub fn owned_volumes(desired: &Desired, owned: &Owned) -> BTreeSet<String> {
    let Ok(kind) = owned.resource.kind().parse::<Kind>() else {
        return BTreeSet::new();
    };
    desired
        .get(&ResourceId::new(kind, owned.resource.name()))
        .map(volumes_of)
        .unwrap_or_default()
}

/// The pool that receives replicas of `volume` on `node`: `None` unless the volume declares
/// replication to `node` (the receiver refuses everything else).
pub fn receiving_pool<'d>(
    desired: &'d Desired,
    node: &str,
    volume: &str,
) -> Option<&'d StoragePoolSpec> {
    let v = desired.volume(volume)?;
    if v.replication.as_ref()?.to.0 != node {
        return None;
    }
    desired.storage_pool(&v.pool.0)
}

/// [`receiving_pool`], and by the reversal rule: the pool of a volume that the node named in
/// its `to` owns and replicates back to `node` (its `status` says so: from that node to
/// `node`, as the new owner's failover record writes it).
pub fn receiving_pool_reversed<'d>(
    desired: &'d Desired,
    node: &str,
    volume: &str,
    status: Option<&ReplicationStatus>,
) -> Option<&'d StoragePoolSpec> {
    if let Some(pool) = receiving_pool(desired, node, volume) {
        return Some(pool);
    }
    let v = desired.volume(volume)?;
    let to = &v.replication.as_ref()?.to.0;
    let s = status?;
    (s.to == node && &s.from == to && to != node)
        .then(|| desired.storage_pool(&v.pool.0))
        .flatten()
}

/// The node that holds a replica of the volume by its status `s`, besides the node its
/// manifest names in `to`: the receiver of the last successful transfer (after a move or
/// failover, the previous owner the volume replicates back to). `None` while a failover is
/// recorded and nothing was sent since (the receiver's copy is then the stale one), or
/// before any success.
pub fn replica_holder(s: &ReplicationStatus) -> Option<&str> {
    (s.failover.is_none() && s.seq.is_some() && !s.to.is_empty() && s.to != s.from)
        .then_some(s.to.as_str())
}

/// The status key of volume `volume`.
pub fn status_key(store: &Store, volume: &str) -> Result<String, StoreError> {
    let r = ResourceRef::new("Volume", volume).map_err(|e| StoreError::Config(e.to_string()))?;
    Ok(store.keys().replication(&r))
}

/// Writes `status` for `volume` while `token` is current ([`StoreError::Fenced`] otherwise).
pub async fn write_status(
    store: &Store,
    volume: &str,
    status: &ReplicationStatus,
    token: &FencingToken,
) -> Result<(), StoreError> {
    let key = status_key(store, volume)?;
    let value = serde_json::to_vec(status).map_err(|e| StoreError::decode(&key, e))?;
    owner::guarded_put(store, &key, value, token)
        .await
        .map(|_| ())
}

/// Records that `node` promoted replica `seq` (taken at `point`) of `volume` at `now`, under
/// the new owner's `token`; the replication schedule starts over from there (the next
/// transfer runs at once).
pub async fn record_failover(
    store: &Store,
    volume: &str,
    record: FailoverRecord,
    token: &FencingToken,
) -> Result<(), StoreError> {
    let previous = read_status(store, volume).await?.unwrap_or_default();
    write_status(store, volume, &after_failover(previous, record), token).await
}

/// The status once `record`'s node promoted its replica: sent from there now, to the
/// previous sender by the reversal rule ([`effective_peer`]), due at once.
pub fn after_failover(previous: ReplicationStatus, record: FailoverRecord) -> ReplicationStatus {
    let to = effective_peer(&previous.to, &record.node, Some(&previous))
        .unwrap_or_else(|| previous.to.clone());
    ReplicationStatus {
        from: record.node.clone(),
        to,
        failover: Some(record),
        ..previous
    }
}

/// Reads the status of `volume`, if any.
pub async fn read_status(
    store: &Store,
    volume: &str,
) -> Result<Option<ReplicationStatus>, StoreError> {
    let key = status_key(store, volume)?;
    let mut client = store.client();
    let response = store.timed(client.get(key.clone(), None)).await?;
    let Some(kv) = response.kvs().first() else {
        return Ok(None);
    };
    serde_json::from_slice(kv.value())
        .map(Some)
        .map_err(|e| StoreError::decode(&key, e))
}

/// Every volume's replication status (for `stead cluster status`; unreadable ones skipped).
pub async fn list_status(store: &Store) -> Result<BTreeMap<String, ReplicationStatus>, StoreError> {
    let (entries, _) = list_prefix(store, &store.keys().replications()).await?;
    let mut out = BTreeMap::new();
    for e in entries {
        let Some(Key::Replication(r)) = store.keys().parse(&e.key) else {
            continue;
        };
        if let Some(s) = decode_or_skip::<ReplicationStatus>(&e.key, &e.value) {
            out.insert(r.name().to_string(), s);
        }
    }
    Ok(out)
}

/// What one job did in a tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Not due yet (until this Unix time).
    NotDue(u64),
    /// Replicated; the status was written.
    Replicated(TransferReport),
    /// The transfer failed; the status says why.
    Failed(String),
    /// The token is no longer current: nothing was sent or written.
    Fenced,
}

/// Runs the replication of one node's volumes.
pub struct Replicator {
    store: Store,
    node: String,
    transfer: Arc<dyn Transfer>,
}

impl std::fmt::Debug for Replicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicator")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Replicator {
    /// A replicator for node `node`, sending with `transfer`.
    pub fn new(store: Store, node: &str, transfer: Arc<dyn Transfer>) -> Self {
        Self {
            store,
            node: node.to_string(),
            transfer,
        }
    }

    /// Runs every due job once, one after the other (call it on a timer, e.g. every 5 s).
    /// `now` gives the wall clock in Unix seconds.
    pub async fn tick(
        &self,
        jobs: &[ReplicationJob],
        now: &dyn Fn() -> u64,
    ) -> Result<Vec<(String, Outcome)>, StoreError> {
        let mut out = Vec::with_capacity(jobs.len());
        for job in jobs {
            let outcome = self.run_job(job, now).await?;
            out.push((job.volume.clone(), outcome));
        }
        Ok(out)
    }

    #[instrument(skip(self, now), fields(node = %self.node, volume = %job.volume, to = %job.to))]
    async fn run_job(
        &self,
        job: &ReplicationJob,
        now: &dyn Fn() -> u64,
    ) -> Result<Outcome, StoreError> {
        let previous = read_status(&self.store, &job.volume).await?;
        let started = now();
        let due = next_due(previous.as_ref(), job.every, started);
        if due > started {
            return Ok(Outcome::NotDue(due));
        }
        if !owner::is_current(&self.store, &job.token).await? {
            warn!("not the owner any more: no replication");
            return Ok(Outcome::Fenced);
        }
        let transfer = self.transfer.clone();
        let j = job.clone();
        let result = tokio::task::spawn_blocking(move || transfer.transfer(&j))
            .await
            .unwrap_or_else(|e| Err(format!("transfer task: {e}")));
        let (status, outcome) = match result {
            Ok(report) => {
                info!(seq = report.seq, bytes = report.bytes, "replicated");
                if let Some(kept) = &report.kept {
                    warn!(
                        peer = %job.to,
                        kept = %kept,
                        "the peer kept its stale live copy of the volume as a read-only snapshot"
                    );
                }
                let s = after_success(previous.as_ref(), job, &self.node, &report, started, now());
                (s, Outcome::Replicated(report))
            }
            Err(e) => {
                warn!(error = %e, "replication failed");
                let s = after_failure(previous.as_ref(), job, &self.node, &e, started, now());
                (s, Outcome::Failed(e))
            }
        };
        match write_status(&self.store, &job.volume, &status, &job.token).await {
            Ok(()) => Ok(outcome),
            Err(StoreError::Fenced(_)) => Ok(Outcome::Fenced),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> ReplicationJob {
        ReplicationJob {
            volume: "data".into(),
            to: "n2".into(),
            every: Duration::from_secs(300),
            token: FencingToken::new(ResourceRef::new("Container", "web").expect("ref"), 7),
        }
    }

    use crate::test_yaml::{desired, doc};

    fn owned(kind: &str, name: &str, revision: i64) -> Owned {
        let resource = ResourceRef::new(kind, name).expect("ref");
        Owned {
            token: FencingToken::new(resource.clone(), revision),
            resource,
            ha: true,
        }
    }

    fn cluster() -> Desired {
        desired(
            &(doc("StoragePool", "fast", "{type: btrfs, path: /f}")
                + &doc(
                    "Volume",
                    "data",
                    "{pool: fast, size: 1Gi, replication: {to: b, every: 5m}}",
                )
                + &doc(
                    "Volume",
                    "back",
                    "{pool: fast, size: 1Gi, replication: {to: a, every: 1m}}",
                )
                + &doc("Volume", "plain", "{pool: fast, size: 1Gi}")
                + &doc(
                    "Container",
                    "web",
                    "{rootfs: {volume: data}, mounts: [{volume: plain, path: /p}, {volume: back, path: /b}]}",
                )),
        )
    }

    #[test]
    fn jobs_are_the_owned_workloads_replicated_volumes_to_other_nodes() {
        let d = cluster();
        let jobs = jobs_for(&d, &[owned("Container", "web", 9)], "a");
        assert_eq!(jobs.len(), 1, "{jobs:?}");
        assert_eq!(jobs[0].volume, "data");
        assert_eq!(jobs[0].to, "b");
        assert_eq!(jobs[0].every, Duration::from_secs(300));
        assert_eq!(jobs[0].token.revision(), 9);
        let on_b: Vec<String> = jobs_for(&d, &[owned("Container", "web", 9)], "b")
            .into_iter()
            .map(|j| j.volume)
            .collect();
        assert_eq!(on_b, ["back"]);
        assert!(jobs_for(&d, &[owned("Container", "gone", 1)], "a").is_empty());
    }

    #[test]
    fn only_volumes_replicated_to_this_node_are_received() {
        let d = cluster();
        assert!(receiving_pool(&d, "b", "data").is_some());
        assert!(receiving_pool(&d, "a", "data").is_none());
        assert!(receiving_pool(&d, "b", "plain").is_none());
        assert!(receiving_pool(&d, "b", "missing").is_none());
    }

    #[test]
    fn never_replicated_is_due_now() {
        assert_eq!(next_due(None, Duration::from_secs(300), 1000), 1000);
    }

    #[test]
    fn a_success_is_followed_one_interval_later() {
        let report = TransferReport {
            seq: 3,
            taken_at: 1000,
            bytes: 10,
            incremental: true,
            duration: Duration::from_millis(1500),
            kept: None,
        };
        let s = after_success(None, &job(), "n1", &report, 999, 1002);
        assert_eq!(s.lag_s, Some(2));
        assert_eq!(s.duration_ms, 1500);
        assert_eq!(next_due(Some(&s), job().every, 1002), 1299);
    }

    #[test]
    fn failures_back_off_up_to_the_interval_and_keep_the_last_point() {
        let every = Duration::from_secs(60);
        assert_eq!(backoff(1, every), Duration::from_secs(10));
        assert_eq!(backoff(2, every), Duration::from_secs(20));
        assert_eq!(backoff(3, every), Duration::from_secs(40));
        assert_eq!(backoff(4, every), every);
        assert_eq!(backoff(u32::MAX, every), every);
        let ok = ReplicationStatus {
            seq: Some(3),
            last_point: Some(900),
            last_attempt: 899,
            ..Default::default()
        };
        let f1 = after_failure(Some(&ok), &job(), "n1", "peer down", 1000, 1001);
        assert_eq!(
            (f1.failures, f1.seq, f1.last_point),
            (1, Some(3), Some(900))
        );
        assert_eq!(f1.lag_s, Some(101));
        assert_eq!(f1.last_error.as_deref(), Some("peer down"));
        assert_eq!(next_due(Some(&f1), job().every, 1001), 1010);
        let f2 = after_failure(Some(&f1), &job(), "n1", "peer down", 1010, 1011);
        assert_eq!(next_due(Some(&f2), job().every, 1011), 1030);
    }

    fn failover_to(node: &str) -> FailoverRecord {
        FailoverRecord {
            node: node.into(),
            at: 2000,
            seq: 3,
            point: 1990,
            window_s: 10,
        }
    }

    #[test]
    fn after_a_move_to_the_replica_node_copies_go_back_to_the_previous_owner() {
        let sent = ReplicationStatus {
            from: "a".into(),
            to: "b".into(),
            seq: Some(3),
            last_point: Some(1990),
            last_attempt: 1990,
            ..Default::default()
        };
        // `data` is replicated to b: on a it goes to b; b (its owner now) sends it back to a.
        assert_eq!(effective_peer("b", "a", None).as_deref(), Some("b"));
        assert_eq!(effective_peer("b", "b", None), None, "no status: no peer");
        let moved = after_failover(sent, failover_to("b"));
        assert_eq!((moved.from.as_str(), moved.to.as_str()), ("b", "a"));
        assert_eq!(effective_peer("b", "b", Some(&moved)).as_deref(), Some("a"));
        assert_eq!(
            next_due(Some(&moved), Duration::from_secs(3600), 2001),
            2001
        );
        let d = cluster();
        let statuses = BTreeMap::from([("data".to_string(), moved.clone())]);
        let jobs: Vec<(String, String)> =
            jobs_reversed(&d, &[owned("Container", "web", 9)], "b", &statuses)
                .into_iter()
                .map(|j| (j.volume, j.to))
                .collect();
        assert_eq!(
            jobs,
            [("back".into(), "a".into()), ("data".into(), "a".into())]
        );
        // a receives `data` back only while the status says b sends it to a.
        assert!(receiving_pool_reversed(&d, "a", "data", Some(&moved)).is_some());
        assert!(receiving_pool_reversed(&d, "a", "data", None).is_none());
        assert!(receiving_pool_reversed(&d, "c", "data", Some(&moved)).is_none());
        assert!(
            receiving_pool_reversed(&d, "b", "data", None).is_some(),
            "its `to`"
        );
        // Later transfers keep the direction; a failure backs off as usual.
        let report = TransferReport {
            seq: 1,
            taken_at: 2001,
            bytes: 10,
            incremental: false,
            duration: Duration::from_millis(5),
            kept: Some("/pool/snapshots/data/stale-2001".into()),
        };
        let back = ReplicationJob {
            to: "a".into(),
            ..job()
        };
        let ok = after_success(Some(&moved), &back, "b", &report, 2001, 2002);
        assert_eq!(effective_peer("b", "b", Some(&ok)).as_deref(), Some("a"));
        // The stale copy a kept is recorded, and stays recorded after later transfers.
        let kept = StaleCopy {
            node: "a".into(),
            path: "/pool/snapshots/data/stale-2001".into(),
            at: 2002,
        };
        assert_eq!(ok.stale_copy.as_ref(), Some(&kept));
        let plain = TransferReport {
            kept: None,
            ..report.clone()
        };
        let later = after_success(Some(&ok), &back, "b", &plain, 2100, 2101);
        assert_eq!(later.stale_copy, Some(kept));
        // The previous owner holds a replica once a transfer back succeeded, not before.
        assert_eq!(
            replica_holder(&moved),
            None,
            "failover recorded, nothing sent back"
        );
        assert_eq!(replica_holder(&ok), Some("a"));
        let failed_later = after_failure(Some(&ok), &back, "b", "down", 2200, 2201);
        assert_eq!(
            replica_holder(&failed_later),
            Some("a"),
            "a failure keeps the last replica"
        );
        assert_eq!(replica_holder(&ReplicationStatus::default()), None);
        let failed = after_failure(Some(&moved), &back, "b", "down", 2001, 2002);
        assert_eq!(
            next_due(Some(&failed), Duration::from_secs(3600), 2002),
            2011
        );
    }
}
