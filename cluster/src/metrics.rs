//! Prometheus metrics of a node's agent ([`AgentMetrics`]) and of a controller candidate
//! ([`LeaderMetrics`]), each in a registry of its own (no global registry), and [`serve`]: a
//! small HTTP/1.1 endpoint for `GET /metrics`. docs/metrics.md lists every metric.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

pub use prometheus::Registry;
use prometheus::{
    Encoder, Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, TextEncoder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::debug;

use crate::leader::LeaderStatus;
use crate::quorum::QuorumView;
use crate::registry::Liveness;

/// A metric could not be created or registered (a programming error: names are constants).
#[derive(Debug, thiserror::Error)]
#[error("metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

fn gauge(r: &Registry, name: &str, help: &str) -> Result<Gauge, MetricsError> {
    let g = Gauge::new(name, help)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn int_gauge(r: &Registry, name: &str, help: &str) -> Result<IntGauge, MetricsError> {
    let g = IntGauge::new(name, help)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn counter(r: &Registry, name: &str, help: &str) -> Result<IntCounter, MetricsError> {
    let c = IntCounter::new(name, help)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge_vec(r: &Registry, name: &str, help: &str, l: &[&str]) -> Result<GaugeVec, MetricsError> {
    let g = GaugeVec::new(Opts::new(name, help), l)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

/// Encodes `registry` in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut out) {
        debug!(error = %e, "encoding metrics failed");
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A node agent's metrics.
#[derive(Debug)]
pub struct AgentMetrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    /// `stead_cluster_node_registered`: 1 while the node's key is registered under a lease.
    pub registered: IntGauge,
    /// `stead_cluster_node_up`: 1 while registered and not fenced.
    pub up: IntGauge,
    /// `stead_cluster_lease_ack_gap_seconds`: time between the sends of the last two
    /// acknowledged keepalives.
    pub ack_gap: Gauge,
    /// `stead_cluster_lease_ack_gap_max_seconds`: the largest such gap since the start.
    pub ack_gap_max: Gauge,
    /// `stead_cluster_lease_replaced_total`: expired leases replaced by a new one.
    pub lease_replaced: IntCounter,
    /// `stead_cluster_fences_total`: times the node fenced itself.
    pub fences: IntCounter,
    /// `stead_cluster_owner_acquisitions_total`: owner keys acquired.
    pub acquisitions: IntCounter,
    /// `stead_cluster_owner_losses_total`: ownerships dropped without a release (a fence,
    /// an expired lease).
    pub losses: IntCounter,
    /// `stead_cluster_owner_releases_total`: ownerships released (workload unassigned).
    pub releases: IntCounter,
    /// `stead_cluster_owned_workloads`: workloads this node owns now.
    pub owned: IntGauge,
    /// `stead_cluster_quorum_hold`: 1 while the node holds its workloads through a loss of
    /// etcd quorum.
    pub quorum_hold: IntGauge,
    /// `stead_cluster_agent_errors_total{step}`: retried etcd failures inside the agent.
    pub errors: IntCounterVec,
    /// `stead_cluster_replication_lag_seconds{volume}`: age of the last replicated point.
    pub replication_lag: GaugeVec,
    /// `stead_cluster_replication_last_send_bytes{volume}`.
    pub replication_bytes: GaugeVec,
    /// `stead_cluster_replication_failures_total{volume}`.
    pub replication_failures: IntCounterVec,
    last_point: Mutex<BTreeMap<String, u64>>,
}

impl AgentMetrics {
    /// Creates and registers every agent metric.
    pub fn new() -> Result<Self, MetricsError> {
        let r = Registry::new();
        let errors = IntCounterVec::new(
            Opts::new(
                "stead_cluster_agent_errors_total",
                "etcd failures the agent retried in place, by step.",
            ),
            &["step"],
        )?;
        r.register(Box::new(errors.clone()))?;
        let replication_failures = IntCounterVec::new(
            Opts::new(
                "stead_cluster_replication_failures_total",
                "Failed replication transfers, by volume.",
            ),
            &["volume"],
        )?;
        r.register(Box::new(replication_failures.clone()))?;
        Ok(Self {
            registered: int_gauge(
                &r,
                "stead_cluster_node_registered",
                "1 while the node is registered under a lease.",
            )?,
            up: int_gauge(
                &r,
                "stead_cluster_node_up",
                "1 while the node is registered and not fenced.",
            )?,
            ack_gap: gauge(
                &r,
                "stead_cluster_lease_ack_gap_seconds",
                "Seconds between the sends of the last two acknowledged keepalives.",
            )?,
            ack_gap_max: gauge(
                &r,
                "stead_cluster_lease_ack_gap_max_seconds",
                "Largest gap between acknowledged keepalives since the agent started.",
            )?,
            lease_replaced: counter(
                &r,
                "stead_cluster_lease_replaced_total",
                "Expired node leases replaced by a new one.",
            )?,
            fences: counter(
                &r,
                "stead_cluster_fences_total",
                "Times the node fenced itself (stopped its HA workloads).",
            )?,
            acquisitions: counter(
                &r,
                "stead_cluster_owner_acquisitions_total",
                "Owner keys acquired.",
            )?,
            losses: counter(
                &r,
                "stead_cluster_owner_losses_total",
                "Ownerships dropped without a release (fence, expired lease).",
            )?,
            releases: counter(
                &r,
                "stead_cluster_owner_releases_total",
                "Ownerships released after an unassignment.",
            )?,
            owned: int_gauge(
                &r,
                "stead_cluster_owned_workloads",
                "Workloads this node owns.",
            )?,
            quorum_hold: int_gauge(
                &r,
                "stead_cluster_quorum_hold",
                "1 while holding workloads through a loss of etcd quorum.",
            )?,
            errors,
            replication_lag: gauge_vec(
                &r,
                "stead_cluster_replication_lag_seconds",
                "Seconds since the last replicated point of a volume was taken.",
                &["volume"],
            )?,
            replication_bytes: gauge_vec(
                &r,
                "stead_cluster_replication_last_send_bytes",
                "Bytes sent by the last successful replication of a volume.",
                &["volume"],
            )?,
            replication_failures,
            last_point: Mutex::new(BTreeMap::new()),
            registry: r,
        })
    }

    /// Records a new liveness after `previous` (same lease: the gap between the two sends).
    pub fn observe_liveness(&self, previous: &Liveness, now: &Liveness) {
        if now.generation != previous.generation {
            self.lease_replaced.inc();
            return;
        }
        if now.acked_at <= previous.acked_at {
            return;
        }
        let gap = (now.acked_at - previous.acked_at).as_secs_f64();
        self.ack_gap.set(gap);
        if gap > self.ack_gap_max.get() {
            self.ack_gap_max.set(gap);
        }
    }

    /// Records the quorum probe's view.
    pub fn observe_quorum(&self, view: &QuorumView) {
        self.quorum_hold.set(i64::from(view.lost));
    }

    /// Records a replication: the point's time and the bytes sent.
    pub fn replicated(&self, volume: &str, taken_at: u64, bytes: u64) {
        self.replication_bytes
            .with_label_values(&[volume])
            .set(bytes as f64);
        self.last_point
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(volume.to_string(), taken_at);
    }

    /// Sets every volume's lag at Unix time `now`.
    pub fn update_lag(&self, now: u64) {
        let points = self
            .last_point
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (volume, at) in points.iter() {
            self.replication_lag
                .with_label_values(&[volume])
                .set(now.saturating_sub(*at) as f64);
        }
    }
}

/// A controller candidate's metrics.
#[derive(Debug)]
pub struct LeaderMetrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    /// `stead_cluster_is_leader`.
    pub is_leader: IntGauge,
    /// `stead_cluster_leader_terms_total`: terms this candidate led.
    pub terms: IntCounter,
    /// `stead_cluster_failovers_total`: workloads reassigned because their node died.
    pub failovers: IntCounter,
    /// `stead_cluster_assignment_writes_total`.
    pub writes: IntCounter,
    /// `stead_cluster_nodes_alive`.
    pub nodes_alive: IntGauge,
    /// `stead_cluster_placements{node}`: workloads assigned to each node.
    pub placements: IntGaugeVec,
    /// `stead_cluster_unplaceable_workloads`.
    pub unplaceable: IntGauge,
    /// `stead_cluster_unavailable_workloads`: assigned to a dead node and staying there.
    pub unavailable: IntGauge,
    seen: Mutex<Seen>,
}

/// What the last observed status counted (counters move by the difference).
#[derive(Debug, Default)]
struct Seen {
    token: Option<i64>,
    failovers: u64,
    writes: u64,
    nodes: BTreeSet<String>,
}

impl LeaderMetrics {
    /// Creates and registers every leader metric.
    pub fn new() -> Result<Self, MetricsError> {
        let r = Registry::new();
        let placements = IntGaugeVec::new(
            Opts::new(
                "stead_cluster_placements",
                "Workloads assigned to each node.",
            ),
            &["node"],
        )?;
        r.register(Box::new(placements.clone()))?;
        Ok(Self {
            is_leader: int_gauge(
                &r,
                "stead_cluster_is_leader",
                "1 while this candidate leads.",
            )?,
            terms: counter(
                &r,
                "stead_cluster_leader_terms_total",
                "Terms this candidate led.",
            )?,
            failovers: counter(
                &r,
                "stead_cluster_failovers_total",
                "Workloads reassigned because their node died.",
            )?,
            writes: counter(
                &r,
                "stead_cluster_assignment_writes_total",
                "Assignments written or deleted.",
            )?,
            nodes_alive: int_gauge(
                &r,
                "stead_cluster_nodes_alive",
                "Nodes alive at the last placement.",
            )?,
            placements,
            unplaceable: int_gauge(
                &r,
                "stead_cluster_unplaceable_workloads",
                "Workloads no node can take.",
            )?,
            unavailable: int_gauge(
                &r,
                "stead_cluster_unavailable_workloads",
                "Workloads assigned to a dead node that stay there.",
            )?,
            seen: Mutex::new(Seen::default()),
            registry: r,
        })
    }

    /// Records a status the leader loop published.
    pub fn observe(&self, s: &LeaderStatus) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        self.is_leader.set(i64::from(s.leading));
        if s.leading && s.token.is_some() && s.token != seen.token {
            self.terms.inc();
            seen.token = s.token;
        }
        self.failovers
            .inc_by(s.failovers.saturating_sub(seen.failovers));
        self.writes.inc_by(s.writes.saturating_sub(seen.writes));
        seen.failovers = s.failovers;
        seen.writes = s.writes;
        self.nodes_alive
            .set(i64::try_from(s.nodes.len()).unwrap_or(i64::MAX));
        self.unplaceable
            .set(i64::try_from(s.unplaceable.len()).unwrap_or(i64::MAX));
        self.unavailable
            .set(i64::try_from(s.unavailable.len()).unwrap_or(i64::MAX));
        let shown = if s.leading {
            s.placements.clone()
        } else {
            BTreeMap::new()
        };
        for gone in seen.nodes.iter().filter(|n| !shown.contains_key(*n)) {
            let _ = self.placements.remove_label_values(&[gone]);
        }
        for (node, n) in &shown {
            self.placements
                .with_label_values(&[node])
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        seen.nodes = shown.into_keys().collect();
    }
}

/// How long one connection may take to send its request.
const REQUEST_WAIT: Duration = Duration::from_secs(5);

/// Serves `GET /metrics` (the registry) and `GET /healthz` on `listener` until `shutdown`
/// turns true. One connection at a time is plenty for a scraper.
pub async fn serve(listener: TcpListener, registry: Registry, shutdown: watch::Receiver<bool>) {
    serve_with(listener, registry, shutdown, None).await;
}

/// The TLS server configuration [`serve_tls`] takes (rustls').
pub type TlsConfig = rustls::ServerConfig;

/// [`serve`] over TLS with `tls` (the node's certificate; a client must present a
/// certificate the cluster's CA signed, or the handshake fails).
pub async fn serve_tls(
    listener: TcpListener,
    registry: Registry,
    shutdown: watch::Receiver<bool>,
    tls: Arc<TlsConfig>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    serve_with(listener, registry, shutdown, Some(acceptor)).await;
}

async fn serve_with(
    listener: TcpListener,
    registry: Registry,
    mut shutdown: watch::Receiver<bool>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let r = registry.clone();
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        let answered = match tls {
                            None => answer(stream, &r).await,
                            Some(acceptor) => {
                                match tokio::time::timeout(REQUEST_WAIT, acceptor.accept(stream)).await {
                                    Ok(Ok(s)) => answer(s, &r).await,
                                    Ok(Err(e)) => Err(e),
                                    Err(_) => Err(std::io::Error::new(
                                        std::io::ErrorKind::TimedOut,
                                        "TLS handshake too slow",
                                    )),
                                }
                            }
                        };
                        if let Err(e) = answered {
                            debug!(error = %e, %peer, "metrics request failed");
                        }
                    });
                }
                Err(e) => {
                    debug!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() { return; }
            }
        }
    }
}

/// The status line, content type and body for a request line (pure).
pub fn respond(request_line: &str, registry: &Registry) -> (&'static str, &'static str, String) {
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            encode(registry),
        ),
        ("GET", "/healthz") => ("200 OK", "text/plain; charset=utf-8", "ok\n".into()),
        ("GET", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found\n".into(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "method not allowed\n".into(),
        ),
    }
}

async fn answer<S>(mut stream: S, registry: &Registry) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    let read = async {
        while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") && len < buf.len() {
            let n = stream.read(&mut buf[len..]).await?;
            if n == 0 {
                break;
            }
            len += n;
        }
        std::io::Result::Ok(())
    };
    tokio::time::timeout(REQUEST_WAIT, read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request too slow"))??;
    let text = String::from_utf8_lossy(&buf[..len]);
    let line = text.lines().next().unwrap_or("");
    let (status, content_type, body) = respond(line, registry);
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::Unplaceable;
    use tokio::net::TcpStream;
    use tokio::time::Instant;

    fn liveness(generation: u64, acked_at: Instant) -> Liveness {
        Liveness {
            lease: 1,
            generation,
            ttl: Duration::from_secs(4),
            acked_at,
            acked_at_boot: Duration::ZERO,
            rtt: Duration::from_millis(1),
            max_rtt: Duration::from_millis(1),
        }
    }

    #[test]
    fn ack_gaps_keep_the_last_and_the_largest() {
        let m = AgentMetrics::new().expect("metrics");
        let t0 = Instant::now();
        let a = liveness(0, t0);
        let b = liveness(0, t0 + Duration::from_millis(1500));
        let c = liveness(0, t0 + Duration::from_millis(2000));
        m.observe_liveness(&a, &b);
        m.observe_liveness(&b, &c);
        assert!((m.ack_gap.get() - 0.5).abs() < 1e-9);
        assert!((m.ack_gap_max.get() - 1.5).abs() < 1e-9);
        m.observe_liveness(&c, &liveness(1, t0));
        assert_eq!(m.lease_replaced.get(), 1);
        assert!(
            (m.ack_gap.get() - 0.5).abs() < 1e-9,
            "a new lease is no gap"
        );
    }

    #[test]
    fn replication_lag_counts_from_the_point() {
        let m = AgentMetrics::new().expect("metrics");
        m.replicated("data", 1_000, 4096);
        m.update_lag(1_030);
        let text = encode(&m.registry);
        assert!(text.contains("stead_cluster_replication_lag_seconds{volume=\"data\"} 30"));
        assert!(text.contains("stead_cluster_replication_last_send_bytes{volume=\"data\"} 4096"));
    }

    #[test]
    fn leader_counters_move_by_the_difference_and_terms_by_token() {
        let m = LeaderMetrics::new().expect("metrics");
        let mut s = LeaderStatus {
            leading: true,
            token: Some(5),
            nodes: vec!["n1".into(), "n2".into()],
            placements: BTreeMap::from([("n1".into(), 2), ("n2".into(), 1)]),
            failovers: 1,
            writes: 3,
            ..LeaderStatus::default()
        };
        m.observe(&s);
        m.observe(&s);
        assert_eq!(
            (m.terms.get(), m.failovers.get(), m.writes.get()),
            (1, 1, 3)
        );
        s.failovers = 3;
        s.token = Some(9);
        s.placements = BTreeMap::from([("n2".into(), 3)]);
        s.unplaceable = vec![Unplaceable {
            id: stead_schema::ResourceId::new(stead_schema::Kind::Container, "x"),
            excluded: BTreeMap::new(),
        }];
        m.observe(&s);
        assert_eq!((m.terms.get(), m.failovers.get()), (2, 3));
        assert_eq!(m.unplaceable.get(), 1);
        let text = encode(&m.registry);
        assert!(
            text.contains("stead_cluster_placements{node=\"n2\"} 3"),
            "{text}"
        );
        assert!(
            !text.contains("node=\"n1\""),
            "a node without placements goes: {text}"
        );
        s.leading = false;
        m.observe(&s);
        assert_eq!(m.is_leader.get(), 0);
    }

    #[test]
    fn only_get_metrics_and_healthz_answer() {
        let r = Registry::new();
        assert_eq!(respond("GET /metrics HTTP/1.1", &r).0, "200 OK");
        assert_eq!(respond("GET /healthz?x=1 HTTP/1.1", &r).0, "200 OK");
        assert_eq!(respond("GET /other HTTP/1.1", &r).0, "404 Not Found");
        assert_eq!(
            respond("POST /metrics HTTP/1.1", &r).0,
            "405 Method Not Allowed"
        );
        assert_eq!(respond("", &r).0, "405 Method Not Allowed");
    }

    /// A CA, node `n1`'s certificate and the operator's, as `stead cluster init` makes them.
    fn make_pki(dir: &std::path::Path) -> crate::pki::InitReport {
        crate::pki::init(&crate::pki::InitRequest {
            layout: crate::pki::Layout::new(dir),
            members: vec!["n1=127.0.0.1".parse().expect("member")],
            ca: crate::pki::CaMode::New,
            days: 2,
        })
        .expect("pki")
    }

    fn certs(p: &std::path::Path) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::pem_file_iter(p)
            .expect("pem")
            .collect::<Result<_, _>>()
            .expect("certs")
    }

    fn key(p: &std::path::Path) -> rustls::pki_types::PrivateKeyDer<'static> {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::PrivateKeyDer::from_pem_file(p).expect("key")
    }

    fn roots(ca: &std::path::Path) -> Arc<rustls::RootCertStore> {
        let mut r = rustls::RootCertStore::empty();
        for c in certs(ca) {
            r.add(c).expect("CA");
        }
        Arc::new(r)
    }

    /// A GET /metrics over TLS to `addr` as `who` (a cert and key, or none): the reply, or
    /// the error the handshake or the read ended with.
    async fn get_tls(
        addr: std::net::SocketAddr,
        ca: &std::path::Path,
        who: Option<(&std::path::Path, &std::path::Path)>,
    ) -> std::io::Result<String> {
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let b = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots(ca));
        let cfg = match who {
            Some((c, k)) => b
                .with_client_auth_cert(certs(c), key(k))
                .expect("client cert"),
            None => b.with_no_client_auth(),
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let tcp = TcpStream::connect(addr).await?;
        let name = rustls::pki_types::ServerName::try_from("n1").expect("name");
        let mut s = connector.connect(name, tcp).await?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: n1\r\n\r\n")
            .await?;
        let mut reply = String::new();
        s.read_to_string(&mut reply).await?;
        Ok(reply)
    }

    #[tokio::test]
    async fn serves_the_registry_over_mutual_tls_only_to_the_clusters_certificates() {
        let dir = tempfile::tempdir().expect("tmp");
        let pki = make_pki(dir.path());
        let (node_cert, node_key) = &pki.members[0].agent;
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots(&pki.ca_cert),
            provider.clone(),
        )
        .build()
        .expect("verifier");
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs(node_cert), key(node_key))
            .expect("server cert");
        let m = AgentMetrics::new().expect("metrics");
        m.fences.inc();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(serve_tls(
            listener,
            m.registry.clone(),
            rx,
            Arc::new(server),
        ));

        let (admin_cert, admin_key) = &pki.admin;
        let reply = get_tls(addr, &pki.ca_cert, Some((admin_cert, admin_key)))
            .await
            .expect("the operator's certificate is let in");
        assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
        assert!(reply.contains("stead_cluster_fences_total 1"), "{reply}");

        // No client certificate, or one from another CA: no metrics.
        let stranger = make_pki(&dir.path().join("other"));
        for who in [None, Some((&stranger.admin.0, &stranger.admin.1))] {
            let got = get_tls(
                addr,
                &pki.ca_cert,
                who.map(|(c, k)| (c.as_path(), k.as_path())),
            )
            .await;
            assert!(
                got.as_ref().map_or(true, |r| !r.contains("stead_cluster")),
                "{got:?}"
            );
        }
        // Plain HTTP on the TLS port gets nothing either.
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let _ = s
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            .await;
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply).await;
        assert!(!reply.contains("stead_cluster"), "{reply}");
        tx.send_replace(true);
        task.await.expect("server ends");
    }

    #[tokio::test]
    async fn serves_the_registry_over_http() {
        let m = AgentMetrics::new().expect("metrics");
        m.fences.inc();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(serve(listener, m.registry.clone(), rx));
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("send");
        let mut reply = String::new();
        s.read_to_string(&mut reply).await.expect("read");
        assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
        assert!(reply.contains("stead_cluster_fences_total 1"), "{reply}");
        tx.send_replace(true);
        task.await.expect("server ends");
    }
}
