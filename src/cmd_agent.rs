//! `stead node join` (the agent's configuration) and `stead agent` (the node's agent: it
//! registers the node with its capacity and converges what the cluster assigns to it with
//! the same plan/execute path `stead apply` uses).

use std::collections::{BTreeMap, BTreeSet};
use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use stead_cluster::agent::{self, AgentConfig, Converge, ConvergeError, Owned};
use stead_cluster::etcd::{EtcdConfig, Store};
use stead_cluster::keys::ResourceRef;
use stead_cluster::local::local_set;
use stead_cluster::metrics::AgentMetrics;
use stead_cluster::migrate::LiveProgress;
use stead_cluster::model::{Capacity, NodeInfo};
use stead_cluster::registry::LeaseConfig;
use stead_cluster::replication::{Transfer, jobs_for, receiving_pool};
use stead_drivers::storage::replicate::{backend_for, promote_if_absent};
use stead_drivers::storage::replicate_tls::{DEFAULT_PORT, ReplicationTls, TlsFiles};
use stead_reconciler::driver::HostEnv;
use stead_reconciler::plan::PlanOptions;
use stead_schema::{Desired, Kind, ResourceId};

use crate::agent_repl::{self, ReplState};
use crate::{ApplyRequest, Global, PlanFormat};

/// The agent's configuration file, under the state dir.
const CONFIG_FILE: &str = "cluster/agent.json";

/// What `stead node join` writes and `stead agent` reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentFile {
    /// Node name.
    pub name: String,
    /// Address other nodes reach this node on.
    pub address: String,
    /// etcd client URLs.
    pub endpoints: Vec<String>,
    /// CA certificate of the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// This node's client certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// Its key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// Labels placement matches.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Node lease TTL in milliseconds.
    pub lease_ttl_ms: u64,
    /// Node-local pools this node has (besides those it applied).
    #[serde(default)]
    pub pools: Vec<String>,
    /// Node-local networks this node has (besides those it applied).
    #[serde(default)]
    pub networks: Vec<String>,
    /// TCP port this node receives volume replicas on (default 7443), registered with the
    /// node so its peers dial it there. Replication needs the CA, certificate and key above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_port: Option<u16>,
}

impl AgentFile {
    /// The file's path under `state_dir`.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(CONFIG_FILE)
    }

    /// Reads it from `state_dir`.
    pub fn read(state_dir: &Path) -> Result<AgentFile> {
        let p = Self::path(state_dir);
        let text = std::fs::read(&p)
            .with_context(|| format!("{} (run `stead node join` first)", p.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("{}", p.display()))
    }

    /// The etcd connection it describes.
    pub fn etcd(&self) -> EtcdConfig {
        etcd_config(
            &self.endpoints,
            self.ca.clone(),
            self.cert.clone(),
            self.key.clone(),
        )
    }
}

/// An etcd configuration: TLS when a CA, certificate and key are all given.
pub fn etcd_config(
    endpoints: &[String],
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> EtcdConfig {
    let c = EtcdConfig::new(endpoints.to_vec());
    match (ca, cert, key) {
        (Some(ca), Some(cert), Some(key)) => c.with_tls(ca, cert, key),
        _ => c,
    }
}

/// `stead node` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum NodeCmd {
    /// Write this node's agent configuration after checking etcd answers.
    Join(JoinArgs),
}

/// Runs a `stead node` subcommand.
pub fn node(cmd: NodeCmd, g: &Global) -> Result<u8> {
    match cmd {
        NodeCmd::Join(a) => join(a, g),
    }
}

/// `stead node join` arguments.
#[derive(clap::Args, Debug)]
pub struct JoinArgs {
    /// etcd client URLs (repeat, or comma-separated).
    #[arg(
        long = "etcd",
        value_name = "URL",
        required = true,
        value_delimiter = ','
    )]
    endpoints: Vec<String>,
    /// CA certificate of the cluster (from `stead cluster init`).
    #[arg(long, requires_all = ["cert", "key"])]
    ca: Option<PathBuf>,
    /// This node's client certificate.
    #[arg(long, requires_all = ["ca", "key"])]
    cert: Option<PathBuf>,
    /// Its key.
    #[arg(long, requires_all = ["ca", "cert"])]
    key: Option<PathBuf>,
    /// A label placement matches, k=v (repeat).
    #[arg(long = "label", value_name = "K=V", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Node name (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Address other nodes reach this node on (default: the name).
    #[arg(long)]
    address: Option<String>,
    /// A node-local pool this node has (a btrfs, zfs or lvmthin pool on its disks; repeat).
    #[arg(long = "pool", value_name = "NAME")]
    pools: Vec<String>,
    /// A node-local network this node has (one with ports on its interfaces; repeat).
    #[arg(long = "network", value_name = "NAME")]
    networks: Vec<String>,
    /// Node lease TTL: a dead node's workloads move after about this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    lease_ttl: Duration,
    /// TCP port this node receives volume replicas on (default 7443); registered with the
    /// node, so every node may use its own.
    #[arg(long)]
    replication_port: Option<u16>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or("expected K=V")?;
    if k.is_empty() {
        return Err("empty label key".into());
    }
    Ok((k.to_string(), v.to_string()))
}

/// `500ms`, `10s`, `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("bad duration unit in {s:?} (ms, s, m)")),
    }
}

/// Writes the agent configuration after checking that etcd answers with these credentials.
pub fn join(a: JoinArgs, g: &Global) -> Result<u8> {
    let name = match a.name {
        Some(n) => n,
        None => host_name().context("no --name and no host name")?,
    };
    if !stead_cluster::pki::is_dns_label(&name) {
        bail!("node name {name:?} must be a DNS label (a-z, 0-9, '-')");
    }
    let file = AgentFile {
        address: a.address.unwrap_or_else(|| name.clone()),
        name,
        endpoints: a.endpoints,
        ca: a.ca,
        cert: a.cert,
        key: a.key,
        labels: a.labels.into_iter().collect(),
        lease_ttl_ms: u64::try_from(a.lease_ttl.as_millis()).unwrap_or(u64::MAX),
        pools: a.pools,
        networks: a.networks,
        replication_port: a.replication_port,
    };
    let etcd = file.etcd();
    let revision = runtime()?.block_on(async {
        let store = Store::connect(&etcd).await?;
        store.ping(Duration::from_secs(5)).await
    })?;
    let path = AgentFile::path(&g.state_dir);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| parent.display().to_string())?;
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&file)?)
        .with_context(|| path.display().to_string())?;
    println!(
        "node {} joined (etcd at revision {revision}); configuration in {}",
        file.name,
        path.display()
    );
    Ok(0)
}

/// The kernel's host name (of this UTS namespace).
pub fn host_name() -> Option<String> {
    let path = stead_host::ProcFs::host().sysctl("kernel.hostname");
    let name = std::fs::read_to_string(path).ok()?;
    Some(name.trim().to_string()).filter(|n| !n.is_empty())
}

/// A tokio runtime for one verb.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// `stead agent` arguments.
#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// The cluster's manifests (files or directories; read again on every round).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Serve Prometheus metrics (`GET /metrics`) on this address, e.g. `127.0.0.1:9474`
    /// (default: no metrics endpoint).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Serve the metrics over TLS with the node's certificate, to clients presenting a
    /// certificate the cluster's CA signed (e.g. the operator's `admin.crt`).
    #[arg(long, requires = "metrics_listen")]
    pub metrics_tls: bool,
}

/// Runs the agent until SIGINT or SIGTERM.
pub fn run(a: AgentArgs, g: &Global, env: HostEnv) -> Result<u8> {
    let file = AgentFile::read(&g.state_dir)?;
    let node = node_info(&file, &env)?;
    let mut config = AgentConfig::new(node);
    config.lease = LeaseConfig::with_ttl(Duration::from_millis(file.lease_ttl_ms));
    let deadline = deadline_file(&g.run_dir);
    if let Some(dir) = deadline.parent() {
        std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    }
    // The supervisors of HA workloads read the same file: a frozen agent cannot keep them
    // running past the node's fence deadline.
    let mut env = env;
    env.fence_file = Some(deadline.clone());
    config.deadline_file = Some(deadline);
    // Replication is not what the node's workloads need to run: a receiver that cannot
    // start (an address that does not resolve, a port taken) leaves it off, loudly.
    let metrics = Arc::new(AgentMetrics::new()?);
    let metrics_tls = if a.metrics_tls {
        Some(node_tls(&file).context("--metrics-tls")?)
    } else {
        None
    };
    let replication = start_replication(&file, &a.paths, &metrics).unwrap_or_else(|e| {
        tracing::error!(error = format!("{e:#}"), "volume replication is off");
        None
    });
    let engine: Arc<dyn Converge> = Arc::new(NodeEngine {
        g: g.clone(),
        env,
        paths: a.paths,
        address: file.address.clone(),
        ledger: Mutex::default(),
        live_in: Mutex::default(),
        tickets: AtomicU64::new(0),
        repl: replication.as_ref().map(|(s, _)| s.clone()),
        sender: replication.as_ref().map(|(_, t)| t.clone()),
    });
    let rt = runtime()?;
    rt.block_on(async {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = tx.send(true);
        });
        if let Some((state, transfer)) = replication {
            agent_repl::spawn_loop(file.etcd(), state, transfer, rx.clone())?;
        }
        if let Some(addr) = a.metrics_listen {
            let tls = metrics_tls.map(|t| t.server_config());
            serve_metrics(addr, metrics.registry.clone(), rx.clone(), tls).await?;
        }
        supervise(&file.etcd(), &config, engine, rx, metrics).await
    })?;
    Ok(0)
}

/// A node's replication state and its sender.
type Replication = (Arc<ReplState>, Arc<dyn Transfer>);

/// The replication state and sender of this node, its receiver started; `None` (with a
/// warning) when the agent has no certificate to authenticate peers with.
fn start_replication(
    file: &AgentFile,
    paths: &[PathBuf],
    metrics: &Arc<AgentMetrics>,
) -> Result<Option<Replication>> {
    let (Some(ca), Some(cert), Some(key)) = (&file.ca, &file.cert, &file.key) else {
        tracing::warn!("no certificates in agent.json: volume replication is off");
        return Ok(None);
    };
    let tls = ReplicationTls::load(&TlsFiles {
        ca: ca.clone(),
        cert: cert.clone(),
        key: key.clone(),
    })?;
    let port = file.replication_port.unwrap_or(DEFAULT_PORT);
    let state = Arc::new(ReplState::new(&file.name, paths.to_vec()).with_metrics(metrics.clone()));
    let bind = (file.address.as_str(), port)
        .to_socket_addrs()
        .with_context(|| format!("replication address {}", file.address))?
        .next()
        .with_context(|| format!("replication address {}: none", file.address))?;
    agent_repl::start_receiver(bind, tls.clone(), state.clone())?;
    Ok(Some((state.clone(), agent_repl::transfer(tls, state))))
}

/// Where the agent publishes its fence deadline for a watchdog below it
/// (`RUN_DIR/cluster/fence-deadline`; see `stead_cluster::fence::watchdog_expired`).
pub fn deadline_file(run_dir: &Path) -> PathBuf {
    run_dir.join("cluster").join("fence-deadline")
}

/// Pause before connecting to etcd again.
const CONNECT_PAUSE: Duration = Duration::from_secs(1);

/// Connects to etcd (again and again while no member answers: nothing runs yet), then runs
/// the agent until shutdown. The agent retries every etcd failure inside its loop, keeping
/// its lease, its ownerships and its running workloads; it returns only at shutdown or on a
/// terminal error (a refused certificate, a configuration that cannot work).
async fn supervise(
    etcd: &EtcdConfig,
    config: &AgentConfig,
    engine: Arc<dyn Converge>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    metrics: Arc<AgentMetrics>,
) -> Result<()> {
    let store = loop {
        match Store::connect(etcd).await {
            Ok(store) => break store,
            Err(e) if !e.is_terminal() && !*shutdown.borrow() => {
                tracing::warn!(error = %e, "etcd not reachable; trying again");
                tokio::time::sleep(CONNECT_PAUSE).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    agent::run_with_metrics(&store, config, engine, shutdown, metrics).await?;
    Ok(())
}

/// Binds `addr` and serves `registry` on it (`GET /metrics`) until `shutdown`, over
/// mutual TLS with `tls` when given.
pub async fn serve_metrics(
    addr: std::net::SocketAddr,
    registry: stead_cluster::metrics::Registry,
    shutdown: tokio::sync::watch::Receiver<bool>,
    tls: Option<Arc<stead_cluster::metrics::TlsConfig>>,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("metrics address {addr}"))?;
    tracing::info!(%addr, tls = tls.is_some(), "serving metrics");
    match tls {
        Some(tls) => tokio::spawn(stead_cluster::metrics::serve_tls(
            listener, registry, shutdown, tls,
        )),
        None => tokio::spawn(stead_cluster::metrics::serve(listener, registry, shutdown)),
    };
    Ok(())
}

/// The node's TLS (its agent certificate, the cluster's CA) from `agent.json`.
pub(crate) fn node_tls(file: &AgentFile) -> Result<ReplicationTls> {
    let (Some(ca), Some(cert), Some(key)) = (&file.ca, &file.cert, &file.key) else {
        anyhow::bail!("agent.json has no certificates (join with --ca, --cert and --key)");
    };
    Ok(ReplicationTls::load(&TlsFiles {
        ca: ca.clone(),
        cert: cert.clone(),
        key: key.clone(),
    })?)
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// What the node registers: its capacity from the host, and the pools and networks it has:
/// those in its inventory (applied here before) and those declared with `node join --pool
/// / --network` (a btrfs pool on its disks, a network on its ports). Placement asks only for
/// node-local ones; cluster-wide ones are made by any node that needs them.
fn node_info(file: &AgentFile, env: &HostEnv) -> Result<NodeInfo> {
    let inventory = crate::applied_world(env)?;
    let has = |k: Kind, declared: &[String]| -> Vec<String> {
        let applied = inventory
            .keys()
            .filter(|id| id.kind == k)
            .map(|id| id.name.clone());
        let all: BTreeSet<String> = applied.chain(declared.iter().cloned()).collect();
        all.into_iter().collect()
    };
    Ok(NodeInfo {
        name: file.name.clone(),
        address: file.address.clone(),
        labels: file.labels.clone(),
        capacity: host_capacity(),
        pools: has(Kind::StoragePool, &file.pools),
        networks: has(Kind::Network, &file.networks),
        version: env!("CARGO_PKG_VERSION").to_string(),
        replication_port: file.replication_port.unwrap_or(DEFAULT_PORT),
    })
}

/// CPUs this process may use and the host's memory.
pub fn host_capacity() -> Capacity {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    Capacity {
        milli_cpus: u64::try_from(cpus).unwrap_or(1) * 1000,
        memory_bytes: mem_total().unwrap_or(0),
    }
}

/// `MemTotal` of the host, in bytes.
fn mem_total() -> Option<u64> {
    let path = stead_host::ProcFs::host().root().join("meminfo");
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Loads and validates the cluster's manifests.
pub fn load(paths: &[PathBuf]) -> Result<Desired> {
    stead_schema::load_and_validate(paths).map_err(|diags| {
        let first: Vec<String> = diags.iter().take(5).map(ToString::to_string).collect();
        anyhow::anyhow!("the cluster's manifests are invalid: {}", first.join("; "))
    })
}

/// What the engine runs, and what the last fence stopped: a converge that was already on
/// its way (called before the fence) when the fence stopped a workload must not start it
/// again; a converge called after the fence (the agent re-armed and owns it again) may.
/// Calls are numbered on arrival, before they wait for the engine. Pure.
#[derive(Debug, Default)]
struct Ledger {
    running: BTreeSet<ResourceId>,
    /// Calls numbered below this one arrived before the last fence.
    fence_ticket: u64,
    /// What the last fence stopped.
    fenced: BTreeSet<ResourceId>,
}

impl Ledger {
    /// The workloads of `owned` that a converge numbered `ticket` may run.
    fn admit(&self, owned: &BTreeSet<ResourceId>, ticket: u64) -> BTreeSet<ResourceId> {
        if ticket < self.fence_ticket {
            owned.difference(&self.fenced).cloned().collect()
        } else {
            owned.clone()
        }
    }

    /// A fence stops `stop`; `next_ticket` is the number the next call will get. What keeps
    /// running.
    fn fence(&mut self, stop: &BTreeSet<ResourceId>, next_ticket: u64) -> BTreeSet<ResourceId> {
        self.fence_ticket = next_ticket;
        self.fenced = stop.clone();
        self.running.difference(stop).cloned().collect()
    }
}

/// The single-host engine as the agent's [`Converge`]. Converges and fences are serialized
/// (the ledger's lock is held across the apply).
struct NodeEngine {
    g: Global,
    env: HostEnv,
    paths: Vec<PathBuf>,
    /// The address other nodes reach this one on (a live migration's target listens there).
    address: String,
    ledger: Mutex<Ledger>,
    /// VMs waiting for (or running after) a live migration to this node that it does not
    /// own yet: kept through converges, and the owned set of the last converge.
    live_in: Mutex<LiveIn>,
    /// Numbers converge calls on arrival.
    tickets: AtomicU64,
    /// Volume replication (`None`: off).
    repl: Option<Arc<ReplState>>,
    /// Its sender, for the final replication of a migration.
    sender: Option<Arc<dyn Transfer>>,
}

impl NodeEngine {
    /// The cluster's manifests, read again.
    fn desired(&self) -> Result<Desired, ConvergeError> {
        load(&self.paths).map_err(|e| ConvergeError(format!("{e:#}")))
    }

    /// Applies the part of `desired` that `ids` need (workloads not in `ids` stop), keeping
    /// what the workloads `keep` reference (their volumes and pools) but not them.
    fn apply_local(
        &self,
        desired: &Desired,
        ids: &BTreeSet<ResourceId>,
        keep: &BTreeSet<ResourceId>,
    ) -> Result<(), ConvergeError> {
        let mut local = local_set(desired, ids);
        if !keep.is_empty() {
            for (id, r) in local_set(desired, keep).resources {
                if !keep.contains(&id) && !matches!(id.kind, Kind::Container | Kind::VirtualMachine)
                {
                    local.resources.entry(id).or_insert(r);
                }
            }
        }
        if let Some(repl) = &self.repl {
            // The pools it receives replicas into stay applied (only them: not the volumes
            // on them, which would start empty where a replica is to be promoted).
            for id in agent_repl::receiving_pools(desired, repl.node()) {
                if let Some(r) = desired.get(&id) {
                    local.resources.insert(id, r.clone());
                }
            }
        }
        let code = crate::apply(
            &self.g,
            &self.env,
            ApplyRequest {
                desired: &local,
                only: None,
                opts: PlanOptions::default(),
                purge: false,
                yes: true,
                dry_run: false,
                parallelism: 4,
                lock_timeout: Duration::from_secs(30),
                output: PlanFormat::Text,
            },
        )
        .map_err(|e| ConvergeError(format!("{e:#}")))?;
        if code == 0 {
            Ok(())
        } else {
            Err(ConvergeError(format!("apply exited {code}")))
        }
    }
}

/// The VMs a live migration brings to this node, and the owned set of the last converge.
#[derive(Debug, Default)]
struct LiveIn {
    vms: BTreeSet<ResourceId>,
    /// The owned set of the last converge; `None` before this agent's first converge (the
    /// set the node runs is not known yet: converging anything then would stop it all).
    owned: Option<Vec<Owned>>,
    /// Volumes a live move to this node promoted from their replica (the move copies the
    /// disk into them); dropped again if the move fails.
    promoted: BTreeMap<ResourceId, Vec<String>>,
}

impl NodeEngine {
    fn vm_paths(&self, name: &str) -> stead_drivers::vm::config::Paths {
        stead_drivers::vm::config::Paths::new(&self.env.run_dir, name)
    }

    /// Before a live move of VM `id` to this node: the volumes the move copies (not on a
    /// shared pool), each promoted from its replica here unless it is live here already
    /// (the copy overwrites all of it; promoting saves creating it). Remembers what it
    /// promoted, for [`NodeEngine::drop_promoted`] if the move fails.
    fn promote_for_live(&self, id: &ResourceId) -> Result<Vec<String>, ConvergeError> {
        let desired = self.desired()?;
        let copied: Vec<String> = stead_cluster::placement::vm_live_facts(&desired, id, true)
            .map(|f| f.copied_volumes().into_iter().map(str::to_string).collect())
            .unwrap_or_default();
        let node = self.repl.as_ref().map(|r| r.node().to_string());
        let mut promoted = Vec::new();
        for volume in &copied {
            let backend = node
                .as_deref()
                .and_then(|n| receiving_pool(&desired, n, volume))
                .and_then(backend_for)
                .ok_or_else(|| {
                    ConvergeError(format!(
                        "volume {volume} is neither shared nor replicated to this node"
                    ))
                })?;
            match promote_if_absent(backend.as_ref(), volume) {
                Ok(Some(p)) => {
                    tracing::info!(volume, seq = p.point.seq, "live move: replica promoted");
                    promoted.push(volume.clone());
                }
                Ok(None) => {}
                Err(e) => {
                    self.drop_promoted(&promoted);
                    return Err(ConvergeError(format!(
                        "promoting the replica of volume {volume}: {e}"
                    )));
                }
            }
        }
        self.live_in
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .promoted
            .insert(id.clone(), promoted);
        Ok(copied)
    }

    /// After a failed live move: the volumes it promoted go again (a half-copied disk must
    /// never become the volume of a later failover; the replicas stay).
    fn drop_promoted(&self, volumes: &[String]) {
        let (Some(repl), Ok(desired)) = (&self.repl, self.desired()) else {
            return;
        };
        for volume in volumes {
            let Some(pool) = receiving_pool(&desired, repl.node(), volume) else {
                continue;
            };
            let dropped = match pool.pool_type {
                stead_schema::PoolType::Btrfs => {
                    stead_drivers::storage::btrfs::subvol_destroy(&pool.path.join("images"), volume)
                        .map_err(|e| e.to_string())
                }
                other => Err(format!(
                    "dropping a promoted {other:?} volume is not implemented"
                )),
            };
            match dropped {
                Ok(()) => tracing::info!(volume, "failed live move: promoted copy dropped"),
                Err(e) => tracing::error!(
                    volume,
                    error = %e,
                    "failed live move: the promoted copy stays; delete it before a failover"
                ),
            }
        }
    }

    /// Target: has the waiting QEMU listen, and export the disks of `copied` volumes when
    /// there are any (a port free now on the node address).
    fn listen_live(
        &self,
        paths: &stead_drivers::vm::config::Paths,
        copied: &[String],
    ) -> Result<String, stead_drivers::vm::qemu::migrate::MigrateError> {
        use stead_drivers::vm::qemu::migrate::{MigrateError, listen_vm, listen_vm_with_disks};
        let timeout = Duration::from_secs(30);
        if copied.is_empty() {
            return listen_vm(paths, &self.address, timeout);
        }
        let port = stead_drivers::vm::qemu::mirror::free_port(&self.address).ok_or_else(|| {
            MigrateError::State(format!(
                "no free port on {} for the disk copy",
                self.address
            ))
        })?;
        listen_vm_with_disks(paths, &self.address, port, copied, timeout)
    }

    /// The guest of VM `id` left (migration `done`, `last` its last report): its QEMU is
    /// stopped for good; the final progress.
    fn guest_left(
        &self,
        id: &ResourceId,
        done: &stead_drivers::vm::qemu::migrate::Completed,
        last: Option<LiveProgress>,
    ) -> LiveProgress {
        tracing::info!(
            vm = %id.name,
            total_ms = done.total_time_ms,
            downtime_ms = done.downtime_ms,
            sent_mib = done.transferred >> 20,
            "live migration completed"
        );
        // Its QEMU holds nothing any more (postmigrate): its supervisor quits it at once
        // and does not restart it.
        if let Err(e) = self.stop_vm(&id.name) {
            tracing::warn!(vm = %id.name, error = %e, "stopping the migrated VM");
        }
        let secs = Duration::from_millis(done.total_time_ms).as_secs_f64();
        let mut last = last.unwrap_or(LiveProgress {
            elapsed_s: secs,
            ..LiveProgress::default()
        });
        last.phase = "completed".into();
        last.ram_percent = 100;
        last.remaining_mib = 0;
        last.sent_mib = done.transferred >> 20;
        last.downtime_ms = Some(done.downtime_ms);
        last
    }

    /// Stops VM `name` through its driver, outside any apply.
    fn stop_vm(&self, name: &str) -> Result<(), stead_reconciler::driver::DriverError> {
        stead_drivers::vm::VmDriver::new(&self.env).and_then(|d| d.stop(name))
    }

    /// `run` with the VMs a live migration brings here (kept until owned); remembers
    /// `owned` for the converges the migration itself makes.
    fn with_live_in(&self, mut run: BTreeSet<ResourceId>, owned: &[Owned]) -> BTreeSet<ResourceId> {
        let mut l = self.live_in.lock().unwrap_or_else(PoisonError::into_inner);
        l.owned = Some(owned.to_vec());
        let owned_ids: BTreeSet<ResourceId> = owned
            .iter()
            .filter_map(|o| resource_id(&o.resource))
            .collect();
        l.vms.retain(|id| !owned_ids.contains(id));
        run.extend(l.vms.iter().cloned());
        run
    }
}

fn err(e: impl std::fmt::Display) -> ConvergeError {
    ConvergeError(e.to_string())
}

/// The VM `r` names (only VMs move live).
fn live_vm(r: &ResourceRef) -> Result<ResourceId, ConvergeError> {
    resource_id(r)
        .filter(|id| id.kind == Kind::VirtualMachine)
        .ok_or_else(|| ConvergeError(format!("{r} is not a VirtualMachine")))
}

/// The cluster's progress record of a QEMU migration report.
fn live_progress(p: &stead_drivers::vm::qemu::migrate::Progress) -> LiveProgress {
    let secs = p.elapsed.as_secs_f64();
    if let Some(d) = p.disk {
        return LiveProgress {
            phase: stead_cluster::migrate::DISK_PHASE.into(),
            elapsed_s: secs,
            disk_mib: Some((d.copied >> 20, d.total >> 20)),
            ..LiveProgress::default()
        };
    }
    let sent_mib = p.transferred >> 20;
    LiveProgress {
        phase: format!("{:?}", p.status).to_lowercase(),
        ram_percent: p.ram_percent(),
        sent_mib,
        remaining_mib: p.remaining >> 20,
        mib_per_s: if secs > 0.0 {
            (p.transferred as f64 / f64::from(1u32 << 20)) / secs
        } else {
            0.0
        },
        elapsed_s: secs,
        downtime_ms: p.downtime_ms,
        disk_mib: None,
    }
}

fn resource_id(r: &ResourceRef) -> Option<ResourceId> {
    Kind::parse_loose(r.kind()).map(|k| ResourceId::new(k, r.name()))
}

impl Converge for NodeEngine {
    fn converge(&self, owned: &[Owned]) -> Result<(), ConvergeError> {
        self.converge_keeping(owned, &[])
    }

    fn converge_keeping(&self, owned: &[Owned], keep: &[Owned]) -> Result<(), ConvergeError> {
        let keep: BTreeSet<ResourceId> = keep
            .iter()
            .filter_map(|o| resource_id(&o.resource))
            .collect();
        let ticket = self.tickets.fetch_add(1, Ordering::SeqCst);
        let ids: BTreeSet<ResourceId> = owned
            .iter()
            .filter_map(|o| resource_id(&o.resource))
            .collect();
        let mut ledger = self.ledger.lock().unwrap_or_else(PoisonError::into_inner);
        let run = ledger.admit(&ids, ticket);
        if run.len() < ids.len() {
            tracing::warn!("a converge from before the fence: the fenced workloads stay stopped");
        }
        let run = self.with_live_in(run, owned);
        let admitted: Vec<Owned> = owned
            .iter()
            .filter(|o| resource_id(&o.resource).is_some_and(|id| run.contains(&id)))
            .cloned()
            .collect();
        // Read once: the replicas' promotion and the apply work on the same manifests.
        let desired = self.desired();
        if let Some(repl) = &self.repl {
            // A failover: the replicas become the volumes before the volume driver runs.
            repl.promote_replicas(desired.as_ref().map_err(Clone::clone)?, &admitted);
        }
        let result = desired.and_then(|d| self.apply_local(&d, &run, &keep));
        ledger.running = run;
        if let Some(repl) = &self.repl {
            repl.set_owned(admitted);
        }
        result
    }

    fn hand_off(&self, owned: &Owned, to: &str) -> Result<(), ConvergeError> {
        let (Some(repl), Some(sender)) = (&self.repl, &self.sender) else {
            return Ok(());
        };
        let desired = self.desired()?;
        let jobs = jobs_for(&desired, std::slice::from_ref(owned), repl.node());
        for job in jobs.iter().filter(|j| j.to == to) {
            let r = sender.transfer(job).map_err(|e| {
                ConvergeError(format!(
                    "final replication of volume {} to {to}: {e}",
                    job.volume
                ))
            })?;
            tracing::info!(
                volume = %job.volume,
                %to,
                seq = r.seq,
                bytes = r.bytes,
                ms = r.duration.as_millis(),
                "final replication before the migration"
            );
        }
        Ok(())
    }

    fn start_incoming(&self, resource: &ResourceRef) -> Result<String, ConvergeError> {
        let id = live_vm(resource)?;
        let paths = self.vm_paths(&id.name);
        let Some(owned) = self
            .live_in
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .owned
            .clone()
        else {
            return Err(ConvergeError(
                "this node's agent is starting and has not converged yet; ask again".into(),
            ));
        };
        let copied = self.promote_for_live(&id)?;
        stead_drivers::vm::qemu::migrate::expect_incoming(&paths).map_err(err)?;
        self.live_in
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .vms
            .insert(id.clone());
        self.converge_keeping(&owned, &[])?;
        let uri = self.listen_live(&paths, &copied).map_err(err)?;
        tracing::info!(vm = %id.name, %uri, "waiting for the guest");
        Ok(uri)
    }

    fn migrate_out(
        &self,
        owned: &Owned,
        uri: &str,
        progress: &mut dyn FnMut(LiveProgress) -> bool,
    ) -> Result<LiveProgress, ConvergeError> {
        use stead_drivers::vm::qemu::migrate::{MigrateOptions, send_vm};
        let id = live_vm(&owned.resource)?;
        let paths = self.vm_paths(&id.name);
        let mut last = None;
        let done = send_vm(&paths, uri, &MigrateOptions::default(), |p| {
            let lp = live_progress(p);
            last = Some(lp.clone());
            progress(lp)
        })
        .map_err(err)?;
        tracing::info!(vm = %id.name, "the guest left for {uri}");
        Ok(self.guest_left(&id, &done, last))
    }

    fn resume_out(
        &self,
        owned: &Owned,
        progress: &mut dyn FnMut(LiveProgress) -> bool,
    ) -> Result<LiveProgress, ConvergeError> {
        use stead_drivers::vm::qemu::migrate::{MigrateOptions, follow_vm};
        let id = live_vm(&owned.resource)?;
        let paths = self.vm_paths(&id.name);
        let mut last = None;
        let done = follow_vm(&paths, &MigrateOptions::default(), |p| {
            let lp = live_progress(p);
            last = Some(lp.clone());
            progress(lp)
        })
        .map_err(err)?;
        tracing::info!(vm = %id.name, "the guest left (a send a previous agent started)");
        Ok(self.guest_left(&id, &done, last))
    }

    fn incoming_runs(&self, resource: &ResourceRef) -> bool {
        live_vm(resource).is_ok_and(|id| {
            stead_drivers::vm::qemu::migrate::incoming_runs(&self.vm_paths(&id.name))
        })
    }

    fn finish_incoming(&self, resource: &ResourceRef) -> Result<(), ConvergeError> {
        let id = live_vm(resource)?;
        stead_drivers::vm::qemu::migrate::adopt_incoming_vm(
            &self.vm_paths(&id.name),
            Duration::from_secs(60),
        )
        .map_err(err)?;
        // Kept through converges until owned (again, after this agent was restarted).
        let mut l = self.live_in.lock().unwrap_or_else(PoisonError::into_inner);
        // The guest runs on the volumes it promoted: they are the volumes now.
        l.promoted.remove(&id);
        if !l
            .owned
            .iter()
            .flatten()
            .any(|o| resource_id(&o.resource).as_ref() == Some(&id))
        {
            l.vms.insert(id);
        }
        Ok(())
    }

    fn abort_incoming(&self, resource: &ResourceRef) {
        let Ok(id) = live_vm(resource) else { return };
        if let Err(e) =
            stead_drivers::vm::qemu::migrate::abort_incoming_vm(&self.vm_paths(&id.name))
        {
            // Its QEMU runs the guest (the send completed, the record could not say so): the
            // only copy of the guest stays here, unowned, for the operator to sort out.
            tracing::error!(vm = %id.name, error = %e, "not killing the VM of a failed migration");
            return;
        }
        let (owned, promoted) = {
            let mut l = self.live_in.lock().unwrap_or_else(PoisonError::into_inner);
            l.vms.remove(&id);
            (l.owned.clone(), l.promoted.remove(&id).unwrap_or_default())
        };
        // Before this agent's first converge there is no set to converge to: the round
        // that follows removes the VM (no longer kept as an incoming one).
        if let Some(owned) = owned
            && let Err(e) = self.converge_keeping(&owned, &[])
        {
            tracing::warn!(vm = %id.name, error = %e, "converging after the failed migration");
        }
        self.drop_promoted(&promoted);
    }

    fn stop_ha(&self, resources: &[ResourceRef]) {
        let stop: BTreeSet<ResourceId> = resources.iter().filter_map(resource_id).collect();
        if let Some(repl) = &self.repl {
            repl.drop_owned(&stop.iter().cloned().collect::<Vec<_>>());
        }
        // A guest that arrived live and is not owned yet stops too, and no converge starts it
        // again until this node owns it.
        let converged = {
            let mut l = self.live_in.lock().unwrap_or_else(PoisonError::into_inner);
            l.vms.retain(|id| !stop.contains(id));
            l.owned.is_some()
        };
        if !converged {
            // Before this agent's first converge the set the node runs is not known, and an
            // apply of what the ledger holds (nothing yet) would stop every workload: only
            // the VMs named (guests that arrived live) are stopped, one by one. A converge
            // under way meanwhile is followed by the agent's own fence check.
            for id in stop.iter().filter(|id| id.kind == Kind::VirtualMachine) {
                if let Err(e) = self.stop_vm(&id.name) {
                    tracing::error!(vm = %id.name, error = %e, "fencing: stopping the VM failed");
                }
            }
            return;
        }
        let mut ledger = self.ledger.lock().unwrap_or_else(PoisonError::into_inner);
        let keep = ledger.fence(&stop, self.tickets.load(Ordering::SeqCst));
        if let Err(e) = self
            .desired()
            .and_then(|d| self.apply_local(&d, &keep, &BTreeSet::new()))
        {
            tracing::error!(error = %e, "fencing: stopping HA workloads failed");
        }
        ledger.running = keep;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_labels_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("2h").is_err());
        assert!(parse_duration("s").is_err());
        assert_eq!(parse_label("zone=a"), Ok(("zone".into(), "a".into())));
        assert!(parse_label("zone").is_err());
        assert!(parse_label("=a").is_err());
    }

    fn ct(name: &str) -> ResourceId {
        ResourceId::new(Kind::Container, name)
    }

    #[test]
    fn a_converge_from_before_a_fence_cannot_restart_what_it_stopped() {
        let mut l = Ledger::default();
        let both: BTreeSet<_> = [ct("a"), ct("b")].into();
        l.running = l.admit(&both, 0);
        assert_eq!(l.running, both);
        // Calls 1 and 2 arrived; the fence comes before they run: the next call gets 3.
        let keep = l.fence(&[ct("a")].into(), 3);
        assert_eq!(keep, [ct("b")].into());
        l.running = keep;
        assert_eq!(l.admit(&both, 1), [ct("b")].into(), "stale call");
        assert_eq!(l.admit(&both, 2), [ct("b")].into(), "stale call");
        // Called after the fence (the agent owns a again, same token or not): it runs.
        assert_eq!(l.admit(&both, 3), both);
    }

    #[test]
    fn the_host_has_some_capacity() {
        let c = host_capacity();
        assert!(c.milli_cpus >= 1000);
        assert!(c.memory_bytes > 0);
    }
}
