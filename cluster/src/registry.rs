//! The node registry: a node registers its [`NodeInfo`] under a lease and keeps the lease
//! alive; the leader lists nodes and watches them join and leave.
//!
//! The keepalive task publishes a [`Liveness`] after every acknowledged keepalive: the
//! monotonic time the acknowledged request was *sent* (etcd extended the lease no earlier
//! than that, so the lease lives at least until `acked_at + ttl`), and the round trip. The
//! fence guard ([`crate::fence`]) works from it.

use std::time::Duration;

use etcd_client::{Client, PutOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::etcd::{Store, StoreError};
use crate::fence::boottime_now;
use crate::model::NodeInfo;
use crate::watch::{Change, PrefixWatch, decode_or_skip, list_prefix};

/// How a node's lease is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    /// Time to live of the lease (etcd raises anything below 2 s to 2 s).
    pub ttl: Duration,
    /// Time between keepalives (also how long an answer is awaited before reconnecting).
    pub interval: Duration,
}

impl LeaseConfig {
    /// A lease of `ttl` kept alive five times per TTL (at least every 200 ms, at most 1 s).
    pub fn with_ttl(ttl: Duration) -> Self {
        let interval = (ttl / 5).clamp(Duration::from_millis(200), Duration::from_secs(1));
        Self { ttl, interval }
    }
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self::with_ttl(Duration::from_secs(10))
    }
}

/// What the keepalive task last knew about the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// The lease (changes when an expired lease is replaced: then every key bound to the old
    /// one, owner keys included, is gone).
    pub lease: i64,
    /// How many times the lease was replaced after expiring (0 for the first).
    pub generation: u64,
    /// TTL etcd granted.
    pub ttl: Duration,
    /// When the latest acknowledged keepalive (or the grant) was sent.
    pub acked_at: Instant,
    /// The same moment on `CLOCK_BOOTTIME`, which keeps counting while the host is suspended
    /// (the monotonic clock does not, but etcd's lease timers do).
    pub acked_at_boot: Duration,
    /// Its round trip.
    pub rtt: Duration,
    /// The largest round trip seen over the last 64 acknowledgements.
    pub max_rtt: Duration,
}

/// A registered node: the keepalive task runs until [`Registration::leave`] or drop.
#[derive(Debug)]
pub struct Registration {
    store: Store,
    node: String,
    liveness: watch::Receiver<Liveness>,
    task: JoinHandle<()>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Registration {
    /// Grants a lease, writes the node key bound to it, and starts keeping it alive.
    pub async fn register(
        store: &Store,
        info: &NodeInfo,
        config: LeaseConfig,
    ) -> Result<Self, StoreError> {
        let first = match adopt_lease(store, info, config).await? {
            Some(adopted) => adopted,
            None => grant_and_put(store, info, config, 0).await?,
        };
        let (tx, rx) = watch::channel(first);
        let span = info_span!("keepalive", node = %info.name);
        let task =
            tokio::spawn(keep_alive(store.clone(), info.clone(), config, tx).instrument(span));
        info!(node = %info.name, lease = format!("{:x}", first.lease), "registered");
        Ok(Self {
            store: store.clone(),
            node: info.name.clone(),
            liveness: rx,
            task,
        })
    }

    /// The current lease.
    pub fn lease(&self) -> i64 {
        self.liveness.borrow().lease
    }

    /// The latest liveness.
    pub fn current(&self) -> Liveness {
        *self.liveness.borrow()
    }

    /// A receiver of every liveness update.
    pub fn liveness(&self) -> watch::Receiver<Liveness> {
        self.liveness.clone()
    }

    /// The node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Stops keeping the lease alive and revokes it: the node key and every key bound to the
    /// lease (owner keys) disappear at once.
    pub async fn leave(self) -> Result<(), StoreError> {
        self.task.abort();
        let lease = self.lease();
        self.store.revoke_lease(lease).await?;
        info!(node = %self.node, "left");
        Ok(())
    }
}

/// The lease of this node's previous agent, if it is still alive: the agent was restarted
/// (crashed, upgraded) while its workloads kept running. Keeping that lease keeps their owner
/// keys, so the new agent owns them with the same tokens instead of stopping them and waiting
/// for the old lease to expire. Only a record with the same address and a lease of the same
/// TTL is adopted; the first keepalive proves the lease alive and dates it.
async fn adopt_lease(
    store: &Store,
    info: &NodeInfo,
    config: LeaseConfig,
) -> Result<Option<Liveness>, StoreError> {
    let key = store.keys().node(&info.name);
    let mut client = store.client();
    let response = store.timed(client.get(key.clone(), None)).await?;
    let Some(kv) = response.kvs().first() else {
        return Ok(None);
    };
    let previous: Option<NodeInfo> = decode_or_skip(&key, kv.value());
    let lease = kv.lease();
    if lease == 0 || previous.is_none_or(|p| p.address != info.address) {
        return Ok(None);
    }
    let granted = store.timed(client.lease_time_to_live(lease, None)).await?;
    let ttl = Duration::from_secs(u64::try_from(granted.granted_ttl()).unwrap_or(0));
    if granted.ttl() <= 0 || ttl != config.ttl {
        return Ok(None);
    }
    let (sent, sent_boot) = (Instant::now(), boottime_now());
    match store.timed(client.lease_keep_alive(lease)).await {
        Ok(_) => {}
        Err(StoreError::LeaseExpired(_)) => return Ok(None),
        Err(e) => return Err(e),
    }
    let rtt = sent.elapsed();
    let value = serde_json::to_vec(info).map_err(|e| StoreError::decode(&info.name, e))?;
    let put = client.put(key, value, Some(PutOptions::new().with_lease(lease)));
    store.timed(put).await?;
    info!(
        lease = format!("{lease:x}"),
        "adopted the lease of this node's previous agent"
    );
    Ok(Some(Liveness {
        lease,
        generation: 0,
        ttl,
        acked_at: sent,
        acked_at_boot: sent_boot,
        rtt,
        max_rtt: rtt,
    }))
}

async fn grant_and_put(
    store: &Store,
    info: &NodeInfo,
    config: LeaseConfig,
    generation: u64,
) -> Result<Liveness, StoreError> {
    let (sent, sent_boot) = (Instant::now(), boottime_now());
    let (lease, ttl) = store.grant_lease(config.ttl).await?;
    let rtt = sent.elapsed();
    let value = serde_json::to_vec(info).map_err(|e| StoreError::decode(&info.name, e))?;
    let key = store.keys().node(&info.name);
    let mut client = store.client();
    store
        .timed(client.put(key, value, Some(PutOptions::new().with_lease(lease))))
        .await?;
    Ok(Liveness {
        lease,
        generation,
        ttl,
        acked_at: sent,
        acked_at_boot: sent_boot,
        rtt,
        max_rtt: rtt,
    })
}

/// The keepalive loop: one stream while it works, a new stream after a failure, a new lease
/// (and node key) once the old one has expired.
async fn keep_alive(
    store: Store,
    info: NodeInfo,
    config: LeaseConfig,
    tx: watch::Sender<Liveness>,
) {
    let mut rtts = RttWindow::default();
    let mut backoff = RETRY_MIN;
    let mut members = MemberRotation::new(&store);
    loop {
        let current = *tx.borrow();
        let result = keep_stream(&mut members, &current, config, &tx, &mut rtts).await;
        if tx.borrow().acked_at != current.acked_at {
            backoff = RETRY_MIN;
        }
        match result {
            Err(StoreError::LeaseExpired(_)) => {
                warn!(
                    lease = format!("{:x}", current.lease),
                    "lease expired; registering again"
                );
                replace_lease(&store, &info, config, &tx, current.generation + 1).await;
            }
            // Soon after a failure (an etcd leader election lasts 1-2 s: the first keepalive
            // after it should not wait a whole interval), then less often up to RETRY_MAX.
            Err(e) => {
                debug!(error = %e, ?backoff, "keepalive stream failed; reconnecting");
                sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX);
            }
            Ok(()) => sleep(config.interval).await,
        }
    }
}

/// How long a keepalive answer is awaited before the stream is opened again. A lease renewal
/// is answered by the etcd leader without a disk write; waiting longer mostly waits on a dead
/// member (measured on 3 members with the leader killed: the largest gap between
/// acknowledgements fell from 3.5 s to 1.8-2.7 s going from a 1 s to this 500 ms wait).
pub(crate) const ANSWER_WAIT: Duration = Duration::from_millis(500);

/// The first retry after a failed keepalive stream.
pub(crate) const RETRY_MIN: Duration = Duration::from_millis(100);

/// The longest wait between retries: a retry is one small request, and after an etcd leader
/// election (or while the client still picks a dead member) the next one should come soon.
pub(crate) const RETRY_MAX: Duration = Duration::from_millis(300);

async fn replace_lease(
    store: &Store,
    info: &NodeInfo,
    config: LeaseConfig,
    tx: &watch::Sender<Liveness>,
    generation: u64,
) {
    loop {
        match grant_and_put(store, info, config, generation).await {
            Ok(l) => {
                tx.send_replace(l);
                return;
            }
            Err(e) => {
                debug!(error = %e, "registering again failed");
                sleep(config.interval).await;
            }
        }
    }
}

async fn keep_stream(
    members: &mut MemberRotation,
    current: &Liveness,
    config: LeaseConfig,
    tx: &watch::Sender<Liveness>,
    rtts: &mut RttWindow,
) -> Result<(), StoreError> {
    let client = members.client().await;
    let kept = keep_lease_stream(
        client,
        current.lease,
        config.interval,
        ANSWER_WAIT,
        |sent| publish(tx, current, sent, rtts),
    )
    .await;
    if matches!(&kept, Err(e) if e.is_retryable()) {
        members.advance();
    }
    kept
}

/// One client per etcd member for a lease's keepalives, used in turn: after a failed stream the
/// next keepalive goes to the next member. The store's shared client balances requests over
/// every member and may keep picking one that accepts connections but answers nothing (paused,
/// or cut off from the others while this node still reaches it): measured on 3 members with a
/// follower paused, the gap between acknowledged keepalives reached 4.3 s of a 5 s TTL through
/// the shared client, enough to fence a healthy node. Pinned clients bound it to one answer
/// wait per silent member.
pub(crate) struct MemberRotation {
    store: Store,
    clients: Vec<(String, Option<Client>)>,
    at: usize,
}

impl MemberRotation {
    /// The store's members, starting at the first.
    pub(crate) fn new(store: &Store) -> Self {
        let clients = store
            .endpoints()
            .iter()
            .map(|url| (url.clone(), None))
            .collect();
        Self {
            store: store.clone(),
            clients,
            at: 0,
        }
    }

    /// The client of the current member (connected lazily; the shared client if that fails).
    pub(crate) async fn client(&mut self) -> Client {
        let store = self.store.clone();
        let Some((url, slot)) = self.clients.get_mut(self.at) else {
            return store.client();
        };
        if slot.is_none() {
            match store.pinned_client(url).await {
                Ok(c) => *slot = Some(c),
                Err(e) => {
                    debug!(member = %url, error = %e, "no client for the member; using the shared one");
                    return store.client();
                }
            }
        }
        slot.clone().unwrap_or_else(|| store.client())
    }

    /// Moves to the next member.
    pub(crate) fn advance(&mut self) {
        if !self.clients.is_empty() {
            self.at = (self.at + 1) % self.clients.len();
            debug!(member = %self.clients[self.at].0, "keepalives move to the next member");
        }
    }
}

/// Keeps lease `lease` alive on one stream until it fails: opening the stream is the first
/// keepalive, then one every `interval`, each answer awaited at most `wait`. `acked` gets the
/// send time (monotonic, `CLOCK_BOOTTIME`) of every acknowledged keepalive. An answer without
/// a TTL is [`StoreError::LeaseExpired`]. The node's and the controller candidate's lease.
pub(crate) async fn keep_lease_stream(
    mut client: Client,
    lease: i64,
    interval: Duration,
    wait: Duration,
    mut acked: impl FnMut((Instant, Duration)),
) -> Result<(), StoreError> {
    let sent = (Instant::now(), boottime_now());
    let opened = timeout(wait, client.lease_keep_alive(lease))
        .await
        .map_err(|_| StoreError::Unreachable("keepalive stream: no answer".into()))?;
    let (mut keeper, mut stream) = opened.map_err(|e| lease_error(e.into(), lease))?;
    acked(sent);
    loop {
        sleep(interval).await;
        let sent = (Instant::now(), boottime_now());
        keeper.keep_alive().await?;
        let answer = timeout(wait, stream.message())
            .await
            .map_err(|_| StoreError::Unreachable("keepalive: no answer".into()))??;
        let Some(answer) = answer else {
            return Err(StoreError::Unreachable("keepalive stream closed".into()));
        };
        if answer.ttl() <= 0 {
            return Err(StoreError::LeaseExpired(lease));
        }
        acked(sent);
    }
}

fn lease_error(e: StoreError, lease: i64) -> StoreError {
    match e {
        StoreError::LeaseExpired(_) => StoreError::LeaseExpired(lease),
        other => other,
    }
}

fn publish(
    tx: &watch::Sender<Liveness>,
    current: &Liveness,
    (sent, sent_boot): (Instant, Duration),
    rtts: &mut RttWindow,
) {
    let rtt = sent.elapsed();
    let max_rtt = rtts.push(rtt);
    tx.send_modify(|l| {
        if l.lease == current.lease {
            l.acked_at = sent;
            l.acked_at_boot = sent_boot;
            l.rtt = rtt;
            l.max_rtt = max_rtt;
        }
    });
}

/// The largest of the last 64 round trips.
#[derive(Debug, Default)]
struct RttWindow {
    samples: std::collections::VecDeque<Duration>,
}

impl RttWindow {
    fn push(&mut self, rtt: Duration) -> Duration {
        if self.samples.len() == 64 {
            self.samples.pop_front();
        }
        self.samples.push_back(rtt);
        self.samples.iter().copied().max().unwrap_or(rtt)
    }
}

/// Every registered node (alive: their leases hold; unreadable records skipped with a
/// warning) and the store revision of the listing.
pub async fn list_nodes(store: &Store) -> Result<(Vec<NodeInfo>, i64), StoreError> {
    let (entries, revision) = list_prefix(store, &store.keys().nodes()).await?;
    let nodes = entries
        .iter()
        .filter_map(|e| decode_or_skip(&e.key, &e.value))
        .collect();
    Ok((nodes, revision))
}

/// A change in the set of nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// A node joined or updated its record.
    Up(NodeInfo),
    /// A node left or its lease expired.
    Down(String),
    /// The watch lost its history: here is every node now.
    Resync(Vec<NodeInfo>),
}

/// Node joins and departures, from a revision on (for the leader).
#[derive(Debug)]
pub struct NodeWatch {
    store: Store,
    inner: PrefixWatch,
}

impl NodeWatch {
    /// Watches nodes after `revision` (the one [`list_nodes`] returned; 0: from now on).
    pub fn new(store: &Store, revision: i64) -> Self {
        let from = if revision > 0 { revision + 1 } else { 0 };
        Self {
            store: store.clone(),
            inner: PrefixWatch::new(store, store.keys().nodes(), from),
        }
    }

    /// The next changes. Errors are worth retrying when retryable: the watch resumes where it
    /// stopped.
    pub async fn next(&mut self) -> Result<Vec<NodeEvent>, StoreError> {
        loop {
            let out = self.next_changes().await?;
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }

    async fn next_changes(&mut self) -> Result<Vec<NodeEvent>, StoreError> {
        let changes = self.inner.next_batch().await?;
        let mut out = Vec::with_capacity(changes.len());
        for change in changes {
            match change {
                Change::Put { key, value, .. } => {
                    out.extend(decode_or_skip(&key, &value).map(NodeEvent::Up));
                }
                Change::Delete { key, .. } => {
                    if let Some(name) = self.store.keys().parse_node(&key) {
                        out.push(NodeEvent::Down(name));
                    }
                }
                Change::Resync => {
                    let (nodes, revision) = list_nodes(&self.store).await?;
                    self.inner =
                        PrefixWatch::new(&self.store, self.store.keys().nodes(), revision + 1);
                    out.push(NodeEvent::Resync(nodes));
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalive_interval_follows_ttl_within_bounds() {
        assert_eq!(
            LeaseConfig::with_ttl(Duration::from_secs(2)).interval,
            Duration::from_millis(400)
        );
        assert_eq!(
            LeaseConfig::with_ttl(Duration::from_secs(30)).interval,
            Duration::from_secs(1)
        );
        assert_eq!(
            LeaseConfig::with_ttl(Duration::from_millis(500)).interval,
            Duration::from_millis(200)
        );
    }

    #[test]
    fn rtt_window_keeps_the_largest_of_the_last_64() {
        let mut w = RttWindow::default();
        assert_eq!(w.push(Duration::from_millis(90)), Duration::from_millis(90));
        for _ in 0..63 {
            w.push(Duration::from_millis(1));
        }
        assert_eq!(w.push(Duration::from_millis(2)), Duration::from_millis(2));
    }

    #[test]
    fn the_node_record_carries_its_replication_port_and_old_records_read_as_7443() {
        let mut info = crate::testkit::test_node("n2");
        info.replication_port = 7444;
        let json = serde_json::to_string(&info).expect("encode");
        assert!(json.contains("\"replicationPort\":7444"), "{json}");
        let back: NodeInfo = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, info);
        // A record an agent wrote before the port was registered.
        let old = r#"{"name":"n1","address":"10.77.0.1","capacity":{"milliCpus":1000,"memoryBytes":1},"version":"0.1.0"}"#;
        let old: NodeInfo = serde_json::from_str(old).expect("old record");
        assert_eq!(old.replication_port, crate::model::DEFAULT_REPLICATION_PORT);
    }
}
