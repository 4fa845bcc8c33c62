//! Storage replication in the agent: a receiver of replicas on the node's address (mutual
//! TLS with the cluster's CA, only volumes the manifests replicate to this node), a sender
//! ([`Transfer`] over TLS to the peer's registered address), the schedule
//! ([`Replicator::tick`] every [`TICK`] for the volumes of the workloads the node owns, none
//! once it fenced) and, at failover, the promotion of a replica before the workload starts.
//! A volume whose workload runs on the node its `to` names goes back to its previous owner
//! (the reversal rule, [`stead_cluster::replication::effective_peer`]), which then receives it.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use stead_cluster::agent::Owned;
use stead_cluster::etcd::{EtcdConfig, Store, StoreError};
use stead_cluster::metrics::AgentMetrics;
use stead_cluster::model::NodeInfo;
use stead_cluster::owner::FencingToken;
use stead_cluster::replication::{
    FailoverRecord, Outcome, ReplicationJob, ReplicationStatus, Replicator, Transfer,
    TransferReport, jobs_reversed, list_status, owned_volumes, read_status,
    receiving_pool_reversed, record_failover,
};
use stead_cluster::watch::list_prefix;
use stead_drivers::storage::replicate::{
    ReplicationBackend, backend_for, promote_if_absent, unix_now,
};
use stead_drivers::storage::replicate_tls::{ReplicationServer, ReplicationTls, send_to};
use stead_schema::{Desired, Kind, ResourceId, Spec, StoragePoolSpec};

use crate::cmd_agent::load;

/// How often the agent looks for replication jobs that are due.
pub const TICK: Duration = Duration::from_secs(2);

/// A peer's registered address and replication port.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Peer {
    host: String,
    port: u16,
}

/// A failover waiting to be recorded in etcd.
type PendingFailover = (String, FailoverRecord, FencingToken);

/// What the engine, the replication loop and the receiver share.
#[derive(Debug)]
pub struct ReplState {
    node: String,
    paths: Vec<PathBuf>,
    /// The workloads the node runs under ownership (HA ones removed when it fences).
    owned: Mutex<Vec<Owned>>,
    /// Promotions not yet recorded.
    failovers: Mutex<Vec<PendingFailover>>,
    /// Registered node addresses and replication ports.
    peers: Mutex<BTreeMap<String, Peer>>,
    /// The replication status of every volume, as last read (the reversal rule reads it).
    statuses: Mutex<BTreeMap<String, ReplicationStatus>>,
    /// Where the receiver reads a status the last round did not see yet.
    etcd: Mutex<Option<EtcdConfig>>,
    /// Where replication lag, bytes and failures are recorded.
    metrics: Option<Arc<AgentMetrics>>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ReplState {
    /// The state of node `node` reading manifests from `paths`.
    pub fn new(node: &str, paths: Vec<PathBuf>) -> Self {
        Self {
            node: node.to_string(),
            paths,
            owned: Mutex::default(),
            failovers: Mutex::default(),
            peers: Mutex::default(),
            statuses: Mutex::default(),
            etcd: Mutex::default(),
            metrics: None,
        }
    }

    /// Records replications into `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<AgentMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The node now runs `owned`.
    pub fn set_owned(&self, owned: Vec<Owned>) {
        *locked(&self.owned) = owned;
    }

    /// The node stopped `stopped` (fencing): their volumes are not replicated any more.
    pub fn drop_owned(&self, stopped: &[ResourceId]) {
        locked(&self.owned).retain(|o| {
            !stopped
                .iter()
                .any(|id| id.kind.as_str() == o.resource.kind() && id.name == o.resource.name())
        });
    }

    /// Before `owned` start here: promotes the last replica of each of their volumes that
    /// this node receives (by the manifests, or sent back to it by the reversal rule) and
    /// does not have live (a failover), and queues its record.
    pub fn promote_replicas(&self, desired: &Desired, owned: &[Owned]) {
        for o in owned {
            for volume in owned_volumes(desired, o) {
                self.promote_one(desired, &volume, &o.token);
            }
        }
    }

    fn promote_one(&self, desired: &Desired, volume: &str, token: &FencingToken) {
        // The node `to` names, or the previous owner the volume was sent back to (its
        // status says so; placement made it a failover target for that reason).
        let cached = locked(&self.statuses).get(volume).cloned();
        let sent_elsewhere = desired
            .volume(volume)
            .and_then(|v| v.replication.as_ref())
            .is_some_and(|rep| rep.to.0 != self.node);
        // Not seen by a round yet (the agent just started): read it now, or the volume
        // driver would make an empty volume over the replica sent back here.
        let status = match cached {
            None if sent_elsewhere => self.fresh_status(volume),
            other => other,
        };
        let Some(backend) = receiving_pool_reversed(desired, &self.node, volume, status.as_ref())
            .and_then(backend_for)
        else {
            return;
        };
        match promote_if_absent(backend.as_ref(), volume) {
            Ok(Some(p)) => {
                tracing::warn!(
                    volume,
                    seq = p.point.seq,
                    window_s = p.window.as_secs(),
                    "failover: replica promoted; writes after its point are lost"
                );
                let record = FailoverRecord {
                    node: self.node.clone(),
                    at: unix_now(),
                    seq: p.point.seq,
                    point: p.point.taken_at,
                    window_s: p.window.as_secs(),
                };
                locked(&self.failovers).push((volume.to_string(), record, token.clone()));
            }
            Ok(None) => {}
            Err(e) => tracing::error!(volume, error = %e, "promoting the replica failed"),
        }
    }

    /// Where `node` receives replicas: the address and port it registered.
    fn peer_addr(&self, node: &str) -> Result<SocketAddr, String> {
        let Peer { host, port } = locked(&self.peers)
            .get(node)
            .cloned()
            .ok_or_else(|| format!("node {node} is not registered"))?;
        (host.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| format!("address of {node} ({host}): {e}"))?
            .next()
            .ok_or_else(|| format!("address of {node} ({host}): none"))
    }
}

/// The StoragePools of the volumes the manifests replicate to `node`: the node keeps them
/// applied (it receives into them) whether or not it runs their workloads.
pub fn receiving_pools(desired: &Desired, node: &str) -> Vec<ResourceId> {
    desired
        .resources
        .values()
        .filter_map(|r| match &r.spec {
            Spec::Volume(v) if v.replication.as_ref().is_some_and(|rep| rep.to.0 == node) => {
                Some(ResourceId::new(Kind::StoragePool, &v.pool.0))
            }
            _ => None,
        })
        .collect()
}

impl ReplState {
    /// The node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The status of `volume` read from etcd now (kept for the next lookups); `None`
    /// without etcd or a status.
    fn fresh_status(&self, volume: &str) -> Option<ReplicationStatus> {
        let etcd = locked(&self.etcd).clone()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        let status = rt.block_on(async {
            let store = Store::connect(&etcd).await.ok()?;
            read_status(&store, volume).await.ok().flatten()
        })?;
        locked(&self.statuses).insert(volume.to_string(), status.clone());
        Some(status)
    }
}

/// The pool `volume` lives in, per the manifests.
fn pool_of<'d>(desired: &'d Desired, volume: &str) -> Option<&'d StoragePoolSpec> {
    desired.storage_pool(&desired.volume(volume)?.pool.0)
}

/// Sends replication points over mutual TLS to the peer's registered address.
#[derive(Debug)]
pub struct TlsTransfer {
    tls: ReplicationTls,
    state: Arc<ReplState>,
}

impl Transfer for TlsTransfer {
    fn transfer(&self, job: &ReplicationJob) -> Result<TransferReport, String> {
        let desired = load(&self.state.paths).map_err(|e| format!("{e:#}"))?;
        let backend = pool_of(&desired, &job.volume)
            .and_then(backend_for)
            .ok_or_else(|| format!("volume {}: its pool cannot replicate", job.volume))?;
        let addr = self.state.peer_addr(&job.to)?;
        let r = send_to(
            &self.tls,
            backend.as_ref(),
            &job.volume,
            job.token.revision(),
            &job.to,
            addr,
        )
        .map_err(|e| e.to_string())?;
        Ok(TransferReport {
            seq: r.point.seq,
            taken_at: r.point.taken_at,
            bytes: r.bytes,
            incremental: r.parent.is_some(),
            duration: r.duration,
            kept: r.kept,
        })
    }
}

/// Starts the receiver on `bind` (a thread of its own, for the life of the process).
pub fn start_receiver(
    bind: SocketAddr,
    tls: ReplicationTls,
    state: Arc<ReplState>,
) -> anyhow::Result<SocketAddr> {
    let server = ReplicationServer::bind(bind, tls)?;
    let local = server.local_addr()?;
    std::thread::Builder::new()
        .name("replication-receiver".into())
        .spawn(move || receive_forever(&server, &state))?;
    tracing::info!(%local, "receiving replicas");
    Ok(local)
}

fn receive_forever(server: &ReplicationServer, state: &ReplState) {
    let resolve = |volume: &str| -> Option<Box<dyn ReplicationBackend>> {
        let desired = load(&state.paths).ok()?;
        let status = locked(&state.statuses).get(volume).cloned();
        receiving_pool_reversed(&desired, &state.node, volume, status.as_ref())
            .or_else(|| {
                // A volume sent back before this node's round saw the new direction (only
                // a volume replicated to another node can be).
                let rep = desired.volume(volume)?.replication.as_ref()?;
                if rep.to.0 == state.node {
                    return None;
                }
                let fresh = state.fresh_status(volume)?;
                receiving_pool_reversed(&desired, &state.node, volume, Some(&fresh))
            })
            .and_then(backend_for)
    };
    loop {
        if let Err(e) = server.serve_one(&resolve) {
            tracing::warn!(error = %e, "a replication transfer was not received");
        }
    }
}

/// A sender for `state`'s node with `tls`.
pub fn transfer(tls: ReplicationTls, state: Arc<ReplState>) -> Arc<dyn Transfer> {
    Arc::new(TlsTransfer { tls, state })
}

/// Runs [`run_loop`] on a thread of its own (the schedule's clock is not `Sync`, so its
/// future stays on one thread).
pub fn spawn_loop(
    etcd: EtcdConfig,
    state: Arc<ReplState>,
    transfer: Arc<dyn Transfer>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    *locked(&state.etcd) = Some(etcd.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("replication".into())
        .spawn(move || rt.block_on(run_loop(etcd, state, transfer, shutdown)))?;
    Ok(())
}

/// Runs the schedule until `shutdown`: every [`TICK`], refreshes the peers' addresses,
/// records pending failovers, and runs the due jobs of the workloads the node owns.
pub async fn run_loop(
    etcd: EtcdConfig,
    state: Arc<ReplState>,
    transfer: Arc<dyn Transfer>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut store = None;
    loop {
        if *shutdown.borrow() {
            return;
        }
        if store.is_none() {
            store = Store::connect(&etcd)
                .await
                .inspect_err(|e| tracing::warn!(error = %e, "replication: etcd"))
                .ok();
        }
        if let Some(s) = &store
            && let Err(e) = round(s, &state, transfer.clone()).await
        {
            tracing::warn!(error = %e, "replication round failed");
            if e.is_retryable() {
                store = None;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = shutdown.changed() => {}
        }
    }
}

async fn round(
    store: &Store,
    state: &ReplState,
    transfer: Arc<dyn Transfer>,
) -> Result<(), StoreError> {
    refresh_peers(store, state).await?;
    flush_failovers(store, state).await?;
    // After the failovers: their records turn the direction of the volumes they moved.
    let statuses = list_status(store).await?;
    *locked(&state.statuses) = statuses.clone();
    let Ok(desired) = load(&state.paths) else {
        return Ok(());
    };
    let owned = locked(&state.owned).clone();
    let jobs = jobs_reversed(&desired, &owned, &state.node, &statuses);
    if jobs.is_empty() {
        return Ok(());
    }
    let outcomes = Replicator::new(store.clone(), &state.node, transfer)
        .tick(&jobs, &unix_now)
        .await?;
    if let Some(m) = &state.metrics {
        record_outcomes(m, &outcomes);
        m.update_lag(unix_now());
    }
    Ok(())
}

/// Replication metrics from one tick's outcomes.
fn record_outcomes(metrics: &AgentMetrics, outcomes: &[(String, Outcome)]) {
    for (volume, outcome) in outcomes {
        match outcome {
            Outcome::Replicated(r) => metrics.replicated(volume, r.taken_at, r.bytes),
            Outcome::Failed(_) => metrics
                .replication_failures
                .with_label_values(&[volume.as_str()])
                .inc(),
            Outcome::NotDue(_) | Outcome::Fenced => {}
        }
    }
}

async fn refresh_peers(store: &Store, state: &ReplState) -> Result<(), StoreError> {
    let (entries, _) = list_prefix(store, &store.keys().nodes()).await?;
    let peers: BTreeMap<String, Peer> = entries
        .iter()
        .filter_map(|e| serde_json::from_slice::<NodeInfo>(&e.value).ok())
        .map(|n| {
            let peer = Peer {
                host: n.address,
                port: n.replication_port,
            };
            (n.name, peer)
        })
        .collect();
    *locked(&state.peers) = peers;
    Ok(())
}

async fn flush_failovers(store: &Store, state: &ReplState) -> Result<(), StoreError> {
    let pending = std::mem::take(&mut *locked(&state.failovers));
    for (i, (volume, record, token)) in pending.iter().enumerate() {
        match record_failover(store, volume, record.clone(), token).await {
            Ok(()) => tracing::info!(volume, window_s = record.window_s, "failover recorded"),
            Err(StoreError::Fenced(_)) => tracing::warn!(volume, "failover not recorded: fenced"),
            Err(e) => {
                locked(&state.failovers).extend(pending[i..].iter().cloned());
                return Err(e);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use stead_cluster::keys::ResourceRef;

    fn owned(kind: &str, name: &str, ha: bool) -> Owned {
        let resource = ResourceRef::new(kind, name).expect("ref");
        Owned {
            token: FencingToken::new(resource.clone(), 7),
            resource,
            ha,
        }
    }

    #[test]
    fn a_fence_stops_the_replication_of_what_it_stopped() {
        let s = ReplState::new("n1", Vec::new());
        s.set_owned(vec![
            owned("Container", "a", true),
            owned("Container", "b", false),
        ]);
        s.drop_owned(&[ResourceId::new(Kind::Container, "a")]);
        let left: Vec<String> = locked(&s.owned)
            .iter()
            .map(|o| o.resource.name().to_string())
            .collect();
        assert_eq!(left, ["b"]);
    }

    #[test]
    fn a_peer_is_dialled_at_its_registered_address_and_port() {
        let s = ReplState::new("n1", Vec::new());
        assert!(s.peer_addr("n2").is_err(), "not registered");
        let peer = |host: &str, port| Peer {
            host: host.into(),
            port,
        };
        locked(&s.peers).insert("n2".into(), peer("10.77.0.2", 7444));
        locked(&s.peers).insert("n3".into(), peer("10.77.0.3", 7443));
        assert_eq!(
            s.peer_addr("n2"),
            Ok("10.77.0.2:7444".parse().expect("addr"))
        );
        assert_eq!(
            s.peer_addr("n3"),
            Ok("10.77.0.3:7443".parse().expect("addr"))
        );
    }

    #[test]
    fn a_volume_s_pool_comes_from_the_manifests() {
        let yaml = "apiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {name: fast}\n\
                    spec: {type: btrfs, path: /srv/fast}\n---\n\
                    apiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {name: data}\n\
                    spec: {pool: fast, size: 1Gi}\n";
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("m.yaml");
        std::fs::write(&file, yaml).expect("write");
        let desired = load(&[file]).expect("manifests");
        let pool = pool_of(&desired, "data").expect("pool");
        assert_eq!(pool.path, std::path::Path::new("/srv/fast"));
        assert!(pool_of(&desired, "other").is_none());
        assert!(receiving_pools(&desired, "n2").is_empty(), "not replicated");
    }
}
