//! `stead cluster init|status|lead`: the cluster's certificates, its state in etcd, and a
//! controller candidate.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Subcommand, ValueEnum};
use serde::Serialize;
use stead_cluster::election::{current_leader, list_assignments};
use stead_cluster::etcd::{EtcdConfig, Store};
use stead_cluster::events::{ClusterEvent, recent};
use stead_cluster::keys::ResourceRef;
use stead_cluster::leader::{self, LeaderConfig, LeaderStatus, Manifests};
use stead_cluster::metrics::LeaderMetrics;
use stead_cluster::migrate::{self, MigrationMode, MigrationRecord, MigrationState};
use stead_cluster::model::{Assignment, NodeInfo};
use stead_cluster::owner::list_owners;
use stead_cluster::pki::{self, CaMode, InitReport, InitRequest, Layout, Member};
use stead_cluster::replication::{ReplicationStatus, list_status};
use stead_cluster::watch::{decode_or_skip, list_prefix};

use crate::Global;
use crate::cmd_agent::{
    AgentFile, etcd_config, host_name, load, node_tls, parse_duration, runtime, serve_metrics,
    shutdown_signal,
};

/// Output format of the cluster verbs.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// For people.
    Text,
    /// One JSON document.
    Json,
}

/// `stead cluster` subcommands.
#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Make the cluster's CA and the certificates of every etcd member, agent and the
    /// operator, and print the etcd flags of each member.
    Init(InitArgs),
    /// Nodes with their lease, the elected controller, capacity and placements.
    Status(StatusArgs),
    /// Run a controller candidate: campaign for leadership through etcd and, while elected,
    /// place the manifests' workloads on the live nodes (any number may run; one leads).
    Lead(LeadArgs),
}

/// How to reach etcd, for verbs run off a node (default: the node's `agent.json`).
#[derive(clap::Args, Debug)]
pub struct EtcdArgs {
    /// etcd client URLs (default: the ones `stead node join` wrote under the state dir).
    #[arg(long = "etcd", value_name = "URL", value_delimiter = ',')]
    endpoints: Vec<String>,
    /// CA certificate of the cluster.
    #[arg(long, requires_all = ["cert", "key"])]
    ca: Option<PathBuf>,
    /// Client certificate (the operator's `admin.crt`, or a node's).
    #[arg(long, requires_all = ["ca", "key"])]
    cert: Option<PathBuf>,
    /// Its key.
    #[arg(long, requires_all = ["ca", "cert"])]
    key: Option<PathBuf>,
}

impl EtcdArgs {
    fn config(&self, g: &Global) -> Result<EtcdConfig> {
        if self.endpoints.is_empty() {
            return Ok(AgentFile::read(&g.state_dir)?.etcd());
        }
        Ok(etcd_config(
            &self.endpoints,
            self.ca.clone(),
            self.cert.clone(),
            self.key.clone(),
        ))
    }
}

/// `stead cluster status` arguments.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Text)]
    output: Format,
    /// How many of the last cluster events to show.
    #[arg(long, default_value_t = 10)]
    events: usize,
}

/// `stead cluster lead` arguments.
#[derive(clap::Args, Debug)]
pub struct LeadArgs {
    /// The cluster's manifests (files or directories; read again every `--reload`).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Candidate name (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// TTL of the leadership lease: a dead controller is replaced after about this long.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    lease_ttl: Duration,
    /// How often the manifests are read again.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    reload: Duration,
    /// Serve Prometheus metrics (`GET /metrics`) on this address, e.g. `127.0.0.1:9475`
    /// (default: no metrics endpoint).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Serve the metrics over TLS with this node's certificate (from `stead node join`, in
    /// the state dir), to clients presenting a certificate the cluster's CA signed.
    #[arg(long, requires = "metrics_listen")]
    metrics_tls: bool,
}

/// `stead cluster init` arguments.
#[derive(clap::Args, Debug)]
pub struct InitArgs {
    /// Directory of the certificates (created; keys are written 0600).
    #[arg(long, default_value = "/etc/stead/pki")]
    dir: PathBuf,
    /// An etcd member and node, NAME=IP (repeat for each).
    #[arg(long = "node", value_name = "NAME=IP", required = true)]
    nodes: Vec<Member>,
    /// Sign with the CA already in DIR (adding nodes).
    #[arg(long, conflicts_with = "force_new_ca")]
    reuse_ca: bool,
    /// Replace a CA already in DIR: every certificate it signed stops working.
    #[arg(long)]
    force_new_ca: bool,
    /// Validity of the member and client certificates in days (the CA: ten times this).
    #[arg(long, default_value_t = 825)]
    days: u32,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Text)]
    output: Format,
}

/// Runs a `stead cluster` subcommand.
pub fn run(cmd: ClusterCmd, g: &Global) -> Result<u8> {
    match cmd {
        ClusterCmd::Init(a) => init(a),
        ClusterCmd::Status(a) => status(a, g),
        ClusterCmd::Lead(a) => lead(a, g),
    }
}

fn init(a: InitArgs) -> Result<u8> {
    let ca = match (a.reuse_ca, a.force_new_ca) {
        (true, _) => CaMode::Reuse,
        (_, true) => CaMode::Replace,
        _ => CaMode::New,
    };
    let report = pki::init(&InitRequest {
        layout: Layout::new(&a.dir),
        members: a.nodes,
        ca,
        days: a.days,
    })?;
    match a.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Format::Text => print_init(&report),
    }
    Ok(0)
}

fn print_init(r: &InitReport) {
    let ca = if r.ca_created { "created" } else { "reused" };
    println!("CA {ca}: {}", r.ca_cert.display());
    println!(
        "operator client certificate: {} (key {})",
        r.admin.0.display(),
        r.admin.1.display()
    );
    for m in &r.members {
        println!();
        println!(
            "# {}: agent certificate {} (key {})",
            m.name,
            m.agent.0.display(),
            m.agent.1.display()
        );
        println!("etcd --data-dir=/var/lib/etcd/stead \\");
        let n = m.etcd_flags.len();
        for (i, f) in m.etcd_flags.iter().enumerate() {
            let end = if i + 1 < n { " \\" } else { "" };
            println!("  {f}{end}");
        }
    }
}

/// What `stead cluster status` shows.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Status {
    /// The elected controller, if any.
    leader: Option<String>,
    /// Registered (live) nodes.
    nodes: Vec<NodeStatus>,
    /// Every assignment, with its current owner.
    assignments: Vec<AssignmentStatus>,
    /// Replicated volumes: last point, lag, bytes, last error, last failover.
    replication: BTreeMap<String, ReplicationStatus>,
    /// The last cluster events (failovers, fences, unplaceable workloads), oldest first.
    events: Vec<ClusterEvent>,
    /// etcd revision of the reading.
    revision: i64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct NodeStatus {
    #[serde(flatten)]
    info: NodeInfo,
    /// The node's lease.
    lease: i64,
    /// Seconds left on it (-1: unknown).
    lease_ttl_seconds: i64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct AssignmentStatus {
    #[serde(flatten)]
    assignment: Assignment,
    /// The node holding its owner key (running it), if any.
    owner: Option<String>,
    /// The owner key's revision: the token its side effects carry.
    fencing_token: Option<i64>,
}

fn status(a: StatusArgs, g: &Global) -> Result<u8> {
    let etcd = a.etcd.config(g)?;
    let st = runtime()?.block_on(read_status(&etcd, a.events))?;
    match a.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&st)?),
        Format::Text => print_status(&st),
    }
    Ok(0)
}

/// The JSON of `stead cluster status` for the controller's cluster page; `None` when this
/// host never joined a cluster (no agent file in `state_dir`).
pub(crate) fn status_json(state_dir: &std::path::Path) -> Option<Result<serde_json::Value>> {
    if !AgentFile::path(state_dir).exists() {
        return None;
    }
    let read = || -> Result<serde_json::Value> {
        let etcd = AgentFile::read(state_dir)?.etcd();
        let st = runtime()?.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), read_status(&etcd, 0)).await
        })??;
        Ok(serde_json::to_value(st)?)
    };
    Some(read())
}

async fn read_status(etcd: &EtcdConfig, last_events: usize) -> Result<Status> {
    let store = Store::connect(etcd).await?;
    let leader = current_leader(&store).await?.map(|l| l.name);
    let (entries, revision) = list_prefix(&store, &store.keys().nodes()).await?;
    let mut nodes = Vec::new();
    for e in entries {
        let Some(info) = decode_or_skip::<NodeInfo>(&e.key, &e.value) else {
            continue;
        };
        nodes.push(NodeStatus {
            info,
            lease: e.lease,
            lease_ttl_seconds: lease_ttl(&store, e.lease).await,
        });
    }
    let owners = owners(&store).await?;
    let (assigned, _) = list_assignments(&store).await?;
    let assignments = assigned
        .into_iter()
        .map(|a| {
            let owned = owners.get(&a.resource);
            AssignmentStatus {
                owner: owned.map(|(n, _)| n.clone()),
                fencing_token: owned.map(|(_, t)| *t),
                assignment: a,
            }
        })
        .collect();
    let replication = list_status(&store).await?;
    let events = recent(&store, last_events).await?;
    Ok(Status {
        leader,
        nodes,
        assignments,
        replication,
        events,
        revision,
    })
}

/// `Kind/name` → owning node and its fencing token.
async fn owners(store: &Store) -> Result<BTreeMap<String, (String, i64)>> {
    Ok(list_owners(store)
        .await?
        .into_iter()
        .map(|o| {
            (
                o.token.resource().to_string(),
                (o.record.node, o.token.revision()),
            )
        })
        .collect())
}

/// Seconds left on `lease` (-1 when etcd does not say or it is gone).
async fn lease_ttl(store: &Store, lease: i64) -> i64 {
    match store.lease_remaining(lease).await {
        Ok(Some(d)) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        _ => -1,
    }
}

fn print_status(st: &Status) {
    println!("leader: {}", st.leader.as_deref().unwrap_or("(none)"));
    println!();
    println!(
        "{:<16} {:<16} {:>6} {:>10} {:>9}  LABELS",
        "NODE", "ADDRESS", "CPUS", "MEMORY", "LEASE"
    );
    for n in &st.nodes {
        let labels: Vec<String> = n
            .info
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!(
            "{:<16} {:<16} {:>6.1} {:>9}M {:>8}s  {}",
            n.info.name,
            n.info.address,
            n.info.capacity.milli_cpus as f64 / 1000.0,
            n.info.capacity.memory_bytes >> 20,
            n.lease_ttl_seconds,
            labels.join(",")
        );
    }
    println!();
    println!("{:<32} {:<16} {:<4} OWNER", "WORKLOAD", "NODE", "HA");
    for a in &st.assignments {
        println!(
            "{:<32} {:<16} {:<4} {}",
            a.assignment.resource,
            a.assignment.node,
            if a.assignment.ha { "yes" } else { "no" },
            a.owner.as_deref().unwrap_or("-")
        );
    }
    if !st.replication.is_empty() {
        println!();
        print_replication(&st.replication);
    }
    if !st.events.is_empty() {
        println!();
        print_events(&st.events);
    }
}

fn print_events(events: &[ClusterEvent]) {
    println!(
        "{:<20} {:<12} {:<12} MESSAGE",
        "WHEN (UTC)", "EVENT", "SOURCE"
    );
    for e in events {
        let secs = i64::try_from(e.at_ms / 1000).unwrap_or(i64::MAX);
        let when = chrono::DateTime::from_timestamp(secs, 0)
            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_else(|| e.at_ms.to_string());
        let kind = serde_json::to_value(e.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        println!("{when:<20} {kind:<12} {:<12} {}", e.source, e.message);
    }
}

fn print_replication(r: &BTreeMap<String, ReplicationStatus>) {
    println!(
        "{:<24} {:<12} {:<12} {:>6} {:>8} {:>12}  LAST ERROR / FAILOVER",
        "VOLUME", "FROM", "TO", "POINT", "LAG", "BYTES"
    );
    for (volume, s) in r {
        let opt = |v: Option<u64>, unit: &str| v.map_or("-".to_string(), |v| format!("{v}{unit}"));
        let mut note = s.last_error.clone().unwrap_or_default();
        if let Some(f) = &s.failover {
            note = format!(
                "failover to {} at {} from point {} (data-loss window {}s) {note}",
                f.node, f.at, f.seq, f.window_s
            );
        }
        if let Some(k) = &s.stale_copy {
            note = format!("{note} stale copy kept on {}: {}", k.node, k.path);
        }
        println!(
            "{:<24} {:<12} {:<12} {:>6} {:>8} {:>12}  {}",
            volume,
            s.from,
            s.to,
            opt(s.seq, ""),
            opt(s.lag_s, "s"),
            s.bytes,
            note.trim_end()
        );
    }
}

fn lead(a: LeadArgs, g: &Global) -> Result<u8> {
    let etcd = a.etcd.config(g)?;
    let name = match a.name {
        Some(n) => n,
        None => host_name().ok_or_else(|| anyhow::anyhow!("no --name and no host name"))?,
    };
    let config = LeaderConfig::new(&name, a.lease_ttl);
    // The operator's certificate, which a candidate may dial etcd with, is a client
    // certificate only: the metrics are served with the node's own.
    let metrics_tls = if a.metrics_tls {
        let file = AgentFile::read(&g.state_dir)
            .context("--metrics-tls serves with this node's certificate: join the node first")?;
        Some(node_tls(&file).context("--metrics-tls")?.server_config())
    } else {
        None
    };
    runtime()?.block_on(async {
        let store = Store::connect(&etcd).await?;
        let (manifests_tx, manifests_rx) = tokio::sync::watch::channel(None);
        let (status_tx, status_rx) = tokio::sync::watch::channel(LeaderStatus::default());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
        });
        tokio::spawn(reload_manifests(a.paths, a.reload, manifests_tx));
        let metrics = Arc::new(LeaderMetrics::new()?);
        if let Some(addr) = a.metrics_listen {
            serve_metrics(addr, metrics.registry.clone(), stop_rx.clone(), metrics_tls).await?;
        }
        tokio::spawn(log_status(status_rx, metrics));
        leader::run(&store, &config, manifests_rx, status_tx, stop_rx).await?;
        anyhow::Ok(())
    })?;
    Ok(0)
}

/// Loads the manifests every `every` and publishes them when they changed (a set that does
/// not validate is logged and the last good one kept).
async fn reload_manifests(
    paths: Vec<PathBuf>,
    every: Duration,
    tx: tokio::sync::watch::Sender<Option<Arc<Manifests>>>,
) {
    let mut last = String::new();
    loop {
        let p = paths.clone();
        match tokio::task::spawn_blocking(move || load(&p)).await {
            Ok(Ok(desired)) => {
                let revision = desired.content_hash();
                if revision != last {
                    tracing::info!(%revision, resources = desired.len(), "manifests loaded");
                    last.clone_from(&revision);
                    let _ = tx.send(Some(Arc::new(Manifests { desired, revision })));
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "manifests not loaded"),
            Err(e) => tracing::warn!(error = %e, "manifest loader failed"),
        }
        tokio::time::sleep(every).await;
    }
}

async fn log_status(
    mut rx: tokio::sync::watch::Receiver<LeaderStatus>,
    metrics: Arc<LeaderMetrics>,
) {
    while rx.changed().await.is_ok() {
        let s = rx.borrow_and_update().clone();
        metrics.observe(&s);
        tracing::info!(
            leading = s.leading,
            revision = %s.revision,
            nodes = ?s.nodes,
            unavailable = ?s.unavailable,
            writes = s.writes,
            "placement"
        );
        for u in &s.unplaceable {
            tracing::warn!(unplaceable = ?u, "workload cannot be placed");
        }
    }
}

/// `stead migrate` arguments.
#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    /// The workload, `Container/NAME` or `VirtualMachine/NAME`.
    resource: String,
    /// The node to move it to.
    #[arg(long, required_unless_present = "clear", conflicts_with = "clear")]
    to: Option<String>,
    /// Remove the override: placement decides again (the workload stays where it is while
    /// the rules allow).
    #[arg(long)]
    clear: bool,
    /// Move it live (a running QEMU VM keeps running: its guest is sent to a QEMU waiting on
    /// the target) or not at all (refused with the reason).
    #[arg(long, conflicts_with_all = ["cold", "clear"])]
    live: bool,
    /// Move it cold (stop, hand off, start on the target) even when live is possible.
    #[arg(long, conflicts_with = "clear")]
    cold: bool,
    /// Return once the override is written instead of following the move.
    #[arg(long)]
    no_wait: bool,
    /// How long to follow the move before giving up (the override stays).
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    etcd: EtcdArgs,
}

impl MigrateArgs {
    /// The mode the flags ask for.
    fn mode(&self) -> MigrationMode {
        if self.live {
            MigrationMode::Live
        } else if self.cold {
            MigrationMode::Cold
        } else {
            MigrationMode::Auto
        }
    }
}

/// How the operator's mode is announced.
fn mode_words(m: MigrationMode) -> &'static str {
    match m {
        MigrationMode::Auto => "live if it can, else cold",
        MigrationMode::Live => "--live",
        MigrationMode::Cold => "--cold",
    }
}

/// Writes (or clears) a migration override and follows the move until the target owns the
/// workload; 1 when the leader refuses it or the timeout passes.
pub fn migrate(a: MigrateArgs, g: &Global) -> Result<u8> {
    let resource: ResourceRef = a.resource.parse()?;
    if !matches!(resource.kind(), "Container" | "VirtualMachine") {
        anyhow::bail!("only a Container or a VirtualMachine can be migrated, not {resource}");
    }
    let mode = a.mode();
    if let Err(why) = migrate::precheck(mode, resource.kind() == "VirtualMachine") {
        eprintln!("error: {resource} {why} (use --cold)");
        return Ok(1);
    }
    let etcd = a.etcd.config(g)?;
    runtime()?.block_on(async {
        let store = Store::connect(&etcd).await?;
        if a.clear {
            return Ok(match migrate::cancel(&store, &resource).await? {
                migrate::Cancelled::Cleared => {
                    println!("{resource}: override cleared");
                    0
                }
                migrate::Cancelled::Absent => {
                    println!("{resource}: no override");
                    0
                }
                migrate::Cancelled::Completed(to) => {
                    eprintln!(
                        "error: {resource}: its live migration has completed (the guest runs on node {to}); not cleared"
                    );
                    1
                }
            });
        }
        let to = a.to.clone().unwrap_or_default();
        let (nodes, _) = list_prefix(&store, &store.keys().nodes()).await?;
        if !nodes
            .iter()
            .any(|e| store.keys().parse_node(&e.key).as_deref() == Some(&to))
        {
            anyhow::bail!("node {to:?} is not registered (see `stead cluster status`)");
        }
        let (assigned, _) = list_assignments(&store).await?;
        let Some(now) = assigned.iter().find(|x| x.resource == resource.to_string()) else {
            anyhow::bail!(
                "{resource} is not placed in the cluster (not in the manifests, or no leader yet)"
            );
        };
        println!(
            "{resource}: on {}, moving to {to} ({}; the leader chooses how)",
            now.node,
            mode_words(mode)
        );
        let mut record = MigrationRecord::request(&to);
        record.mode = mode;
        migrate::put(&store, &resource, &record).await?;
        if a.no_wait {
            println!("override written; follow with `stead cluster status`");
            return Ok(0);
        }
        follow_migration(&store, &resource, &to, a.timeout).await
    })
}

/// What a migration looks like from etcd at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MoveView {
    state: Option<MigrationState>,
    message: Option<String>,
    method: Option<String>,
    progress: Option<String>,
    from: Option<String>,
    assigned: Option<String>,
    owner: Option<String>,
}

/// Prints each change of the move until the target owns the workload.
async fn follow_migration(
    store: &Store,
    resource: &ResourceRef,
    to: &str,
    timeout: Duration,
) -> Result<u8> {
    let t0 = std::time::Instant::now();
    let mut last: Option<MoveView> = None;
    loop {
        let view = read_move(store, resource).await?;
        if last.as_ref() != Some(&view) {
            print_move(t0.elapsed(), &view, last.as_ref(), to);
        }
        if view.state == Some(MigrationState::Refused) {
            eprintln!(
                "error: migration of {resource} to {to} refused: {}",
                view.message.as_deref().unwrap_or("no reason given")
            );
            return Ok(1);
        }
        if view.state == Some(MigrationState::Failed) {
            eprintln!(
                "error: live migration of {resource} to {to} failed: {}; it keeps running on {}",
                view.message.as_deref().unwrap_or("no reason given"),
                view.from.as_deref().unwrap_or("its node")
            );
            return Ok(1);
        }
        if view.state.is_none() {
            eprintln!("error: the override of {resource} was cleared");
            return Ok(1);
        }
        if view.assigned.as_deref() == Some(to) && view.owner.as_deref() == Some(to) {
            println!(
                "{resource}: runs on {to} ({:.1} s)",
                t0.elapsed().as_secs_f64()
            );
            return Ok(0);
        }
        if t0.elapsed() > timeout {
            eprintln!("error: {resource} is not on {to} after {timeout:?} (the override stays)");
            return Ok(1);
        }
        last = Some(view);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn read_move(store: &Store, resource: &ResourceRef) -> Result<MoveView> {
    let record = migrate::read(store, resource).await?;
    let key = resource.to_string();
    let (assigned, _) = list_assignments(store).await?;
    let owners = owners(store).await?;
    Ok(MoveView {
        state: record.as_ref().map(|r| r.state),
        method: record.as_ref().and_then(|r| r.method.clone()),
        progress: record
            .as_ref()
            .and_then(|r| r.progress.as_ref())
            .map(|p| p.line()),
        from: record.as_ref().and_then(|r| r.from.clone()),
        message: record.and_then(|r| r.message),
        assigned: assigned
            .into_iter()
            .find(|x| x.resource == key)
            .map(|x| x.node),
        owner: owners.get(&key).map(|(n, _)| n.clone()),
    })
}

/// One progress line per change.
fn print_move(at: Duration, now: &MoveView, before: Option<&MoveView>, to: &str) {
    let t = at.as_secs_f64();
    let changed = |f: fn(&MoveView) -> &Option<String>| before.is_none_or(|b| f(b) != f(now));
    if before.is_none_or(|b| b.state != now.state)
        && let Some(state) = now.state
    {
        println!("{t:>6.1}s  migration {}", state.describe());
    }
    if changed(|v| &v.method)
        && let Some(m) = &now.method
    {
        println!("{t:>6.1}s  method: {m}");
    }
    if changed(|v| &v.progress)
        && let Some(p) = &now.progress
    {
        println!("{t:>6.1}s  {p}");
    }
    if changed(|v| &v.assigned) {
        println!(
            "{t:>6.1}s  assigned to {}",
            now.assigned.as_deref().unwrap_or("(none)")
        );
    }
    if changed(|v| &v.owner) {
        match now.owner.as_deref() {
            Some(n) if n == to => println!("{t:>6.1}s  owned by {n}: starting there"),
            Some(n) => println!("{t:>6.1}s  running on {n}"),
            None => println!("{t:>6.1}s  stopped and released; waiting for {to} to take it"),
        }
    }
}
