//! The connection to etcd: configuration, a connected [`Store`], typed errors.
//!
//! Every other module talks to etcd through a [`Store`] (a cheap clone of one client and the
//! key layout). Errors say whether trying again can help ([`StoreError::is_retryable`]).

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use tracing::{debug, instrument};

use crate::keys::{DEFAULT_PREFIX, Keys};

/// How to reach etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs (`https://10.0.0.1:2379`, or `http://` without TLS).
    pub endpoints: Vec<String>,
    /// CA certificate (PEM) that signed the members' server certificates.
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) this node authenticates with.
    pub cert: Option<PathBuf>,
    /// Key (PEM) of the client certificate.
    pub key: Option<PathBuf>,
    /// Prefix of every key stead writes.
    pub prefix: String,
    /// How long connecting (and the first request) may take.
    pub dial_timeout: Duration,
    /// How long one request may take once connected.
    pub request_timeout: Duration,
}

impl EtcdConfig {
    /// A configuration for `endpoints` with defaults: no TLS, prefix `/stead/v1`, 5 s dial
    /// and request timeouts.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            ca: None,
            cert: None,
            key: None,
            prefix: DEFAULT_PREFIX.to_string(),
            dial_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
        }
    }

    /// The same configuration with TLS: a CA, and a client certificate and key.
    pub fn with_tls(mut self, ca: PathBuf, cert: PathBuf, key: PathBuf) -> Self {
        self.ca = Some(ca);
        self.cert = Some(cert);
        self.key = Some(key);
        self
    }

    /// The same configuration under another key prefix.
    pub fn with_prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.to_string();
        self
    }
}

/// What went wrong talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The configuration cannot work (no endpoints, unreadable certificate, bad URL).
    #[error("etcd configuration: {0}")]
    Config(String),
    /// No member answered in time, or the connection broke. Retryable.
    #[error("etcd unreachable: {0}")]
    Unreachable(String),
    /// etcd refused who we are (certificate, permissions). Terminal.
    #[error("etcd refused authentication: {0}")]
    Auth(String),
    /// etcd answered something unexpected. Terminal.
    #[error("etcd protocol error: {0}")]
    Protocol(String),
    /// A value under a stead key is not what stead writes.
    #[error("cannot decode the value of {key}: {reason}")]
    Decode {
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
    /// A guarded write was refused: the token is no longer current (a deposed leader or an
    /// old owner). Terminal for that token.
    #[error("fenced: {0}")]
    Fenced(String),
    /// The lease does not exist any more (it expired or was revoked). Terminal for that lease.
    #[error("lease {0:x} has expired")]
    LeaseExpired(i64),
}

impl StoreError {
    /// Whether the same request may succeed later (etcd unreachable, no leader, timeouts).
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unreachable(_))
    }

    /// Whether nothing this process can do will help (etcd refused who we are, or the
    /// configuration cannot work): a long-running loop stops on these and only these.
    pub fn is_terminal(&self) -> bool {
        matches!(self, StoreError::Auth(_) | StoreError::Config(_))
    }

    pub(crate) fn decode(key: &str, reason: impl ToString) -> Self {
        StoreError::Decode {
            key: key.to_string(),
            reason: reason.to_string(),
        }
    }
}

impl From<etcd_client::Error> for StoreError {
    fn from(e: etcd_client::Error) -> Self {
        classify(e)
    }
}

fn classify(e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(s) => classify_status(&s),
        E::TransportError(t) => classify_message(with_sources(&t)),
        E::IoError(io) => StoreError::Unreachable(io.to_string()),
        E::InvalidArgs(m) | E::EndpointError(m) => StoreError::Config(m),
        E::InvalidUri(u) => StoreError::Config(u.to_string()),
        E::LeaseKeepAliveError(m) if m.contains("not found") => StoreError::LeaseExpired(0),
        E::LeaseKeepAliveError(m) | E::WatchError(m) => StoreError::Unreachable(m),
        other => StoreError::Protocol(other.to_string()),
    }
}

fn classify_status(s: &tonic_status::Status) -> StoreError {
    use tonic_status::Code;
    let msg = format!("{}: {}", code_name(s.code()), s.message());
    let msg = append_sources(msg, s);
    match s.code() {
        Code::Unauthenticated | Code::PermissionDenied => StoreError::Auth(msg),
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::Cancelled
        | Code::ResourceExhausted
        | Code::Unknown => classify_message(msg),
        Code::NotFound if s.message().contains("lease not found") => StoreError::LeaseExpired(0),
        _ => StoreError::Protocol(msg),
    }
}

/// A transport failure caused by TLS (bad or unknown certificate) is an authentication
/// problem, not an outage; everything else on the wire is retryable.
fn classify_message(msg: String) -> StoreError {
    let lower = msg.to_ascii_lowercase();
    // A member that died or restarted under an open TLS connection: an outage, whatever the
    // TLS layer's words in the chain.
    let gone = [
        "connection refused",
        "connection reset",
        "broken pipe",
        "os error 111",
        "os error 104",
        "os error 32",
        "close_notify",
        "unexpected eof",
        "unexpected-eof",
    ];
    if gone.iter().any(|w| lower.contains(w)) {
        return StoreError::Unreachable(msg);
    }
    let tls = [
        "certificate",
        "unknownissuer",
        "badsignature",
        "handshake",
        "tls",
    ];
    if tls.iter().any(|w| lower.contains(w)) {
        StoreError::Auth(msg)
    } else {
        StoreError::Unreachable(msg)
    }
}

/// An error's message followed by those of its sources (a TLS failure is often only named
/// deep in the chain).
fn with_sources(e: &dyn std::error::Error) -> String {
    append_sources(e.to_string(), e)
}

fn append_sources(mut text: String, e: &dyn std::error::Error) -> String {
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

fn code_name(c: tonic_status::Code) -> String {
    format!("{c:?}")
}

mod tonic_status {
    pub use tonic::{Code, Status};
}

/// A connected etcd client and the key layout: what every cluster module works with.
#[derive(Clone)]
pub struct Store {
    client: Client,
    keys: Keys,
    request_timeout: Duration,
    options: ConnectOptions,
    endpoints: Vec<String>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("prefix", &self.keys.prefix())
            .finish()
    }
}

impl Store {
    /// Connects to etcd and checks that a member answers (within the dial timeout).
    #[instrument(skip_all, fields(endpoints = ?config.endpoints))]
    pub async fn connect(config: &EtcdConfig) -> Result<Self, StoreError> {
        if config.endpoints.is_empty() {
            return Err(StoreError::Config("no etcd endpoints".into()));
        }
        let options = connect_options(config)?;
        let dial = config.dial_timeout;
        let connecting = Client::connect(&config.endpoints, Some(options.clone()));
        let client = tokio::time::timeout(dial, connecting)
            .await
            .map_err(|_| StoreError::Unreachable(format!("no answer within {dial:?}")))??;
        let store = Store {
            client,
            keys: Keys::new(&config.prefix),
            request_timeout: config.request_timeout,
            options,
            endpoints: config.endpoints.clone(),
        };
        match store.ping(dial).await {
            Ok(_) => {
                debug!("connected");
                Ok(store)
            }
            Err(StoreError::Unreachable(m)) if config.ca.is_some() && dropped(&m) => {
                Err(dropped_tls(config, m).await)
            }
            Err(e) => Err(e),
        }
    }

    /// Asks a member for its status (a cheap liveness check), waiting at most `timeout`.
    pub async fn ping(&self, timeout: Duration) -> Result<i64, StoreError> {
        let mut c = self.client.clone();
        let r = tokio::time::timeout(timeout, c.get(self.keys.leader(), None))
            .await
            .map_err(|_| StoreError::Unreachable(format!("no answer within {timeout:?}")))??;
        Ok(r.header().map(|h| h.revision()).unwrap_or_default())
    }

    /// The key layout.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A clone of the client (cheap; it shares the connection).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// A client of the one member at `url`, with the store's TLS identity, that does not ask
    /// for a leader (a member without one still answers `status`). Connects lazily.
    pub(crate) async fn member_client(&self, url: &str) -> Result<Client, StoreError> {
        let options = self.options.clone().with_require_leader(false);
        Ok(Client::connect([url], Some(options)).await?)
    }

    /// The client URLs the store was configured with, in order.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// A client of the one member at `url`, with the store's options (it asks for a leader, so
    /// a member cut off from the majority fails fast instead of answering). Connects lazily.
    pub(crate) async fn pinned_client(&self, url: &str) -> Result<Client, StoreError> {
        Ok(Client::connect([url], Some(self.options.clone())).await?)
    }

    /// The timeout for one request.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// Runs one request with the request timeout; a timeout is [`StoreError::Unreachable`].
    pub(crate) async fn timed<T, F>(&self, request: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let t = self.request_timeout;
        match tokio::time::timeout(t, request).await {
            Ok(r) => r.map_err(StoreError::from),
            Err(_) => Err(StoreError::Unreachable(format!(
                "request timed out after {t:?}"
            ))),
        }
    }

    /// Grants a lease of `ttl` (etcd raises TTLs below 2 s to 2 s); returns its id and the TTL
    /// etcd granted.
    pub async fn grant_lease(&self, ttl: Duration) -> Result<(i64, Duration), StoreError> {
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let mut c = self.client.clone();
        let r = self.timed(c.lease_grant(secs, None)).await?;
        let granted = Duration::from_secs(u64::try_from(r.ttl()).unwrap_or(0));
        Ok((r.id(), granted))
    }

    /// How long a lease has left on etcd (`None`: it does not exist any more).
    pub async fn lease_remaining(&self, id: i64) -> Result<Option<Duration>, StoreError> {
        let mut c = self.client.clone();
        let r = self.timed(c.lease_time_to_live(id, None)).await?;
        Ok(u64::try_from(r.ttl()).ok().map(Duration::from_secs))
    }

    /// Revokes a lease: every key bound to it is deleted at once.
    pub async fn revoke_lease(&self, id: i64) -> Result<(), StoreError> {
        let mut c = self.client.clone();
        match self.timed(c.lease_revoke(id)).await {
            Ok(_) | Err(StoreError::LeaseExpired(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Whether a failure is the peer closing an accepted connection.
fn dropped(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "connection closed",
        "broken pipe",
        "connection reset",
        "stream closed",
        "close_notify",
        "unexpected eof",
    ]
    .iter()
    .any(|w| m.contains(w))
}

/// With TLS 1.3 a member that refuses the client certificate just closes the connection after
/// the handshake. If a member accepts TCP connections, a dropped TLS connection at connect time
/// is that refusal: an authentication error, not an outage.
async fn dropped_tls(config: &EtcdConfig, message: String) -> StoreError {
    for endpoint in &config.endpoints {
        let Some(authority) = endpoint
            .split("://")
            .nth(1)
            .map(|a| a.trim_end_matches('/'))
        else {
            continue;
        };
        let tcp = tokio::net::TcpStream::connect(authority);
        if let Ok(Ok(_)) = tokio::time::timeout(config.dial_timeout, tcp).await {
            return StoreError::Auth(format!(
                "{authority} accepts connections but closed the TLS session (client certificate \
                 refused? the member's log says why): {message}"
            ));
        }
    }
    StoreError::Unreachable(message)
}

fn connect_options(config: &EtcdConfig) -> Result<ConnectOptions, StoreError> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(config.dial_timeout)
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_require_leader(true);
    if let Some(tls) = tls_options(config)? {
        options = options.with_tls(tls);
    }
    Ok(options)
}

/// TLS needs all three files: etcd members of a stead cluster require client certificates
/// (a client without one would only see the connection drop, like an outage). None of them:
/// plaintext, for `http://` endpoints only.
fn tls_options(config: &EtcdConfig) -> Result<Option<TlsOptions>, StoreError> {
    let read = |p: &PathBuf| {
        std::fs::read(p).map_err(|e| StoreError::Config(format!("{}: {e}", p.display())))
    };
    match (&config.ca, &config.cert, &config.key) {
        (Some(ca), Some(cert), Some(key)) => Ok(Some(
            TlsOptions::new()
                .ca_certificate(Certificate::from_pem(read(ca)?))
                .identity(Identity::from_pem(read(cert)?, read(key)?)),
        )),
        (None, None, None) => {
            if config.endpoints.iter().any(|e| e.starts_with("https://")) {
                return Err(StoreError::Config(
                    "https endpoints need a CA, a client certificate and its key".into(),
                ));
            }
            Ok(None)
        }
        _ => Err(StoreError::Config(
            "TLS needs a CA, a client certificate and its key".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_outages_are_retryable_and_tls_failures_are_not() {
        assert!(classify_message("connection refused".into()).is_retryable());
        // A member killed under an open TLS connection.
        let killed = "h2 protocol error: error reading a body from connection: peer closed \
                      connection without sending TLS close_notify";
        assert!(classify_message(killed.into()).is_retryable());
        let tls = classify_message("invalid peer certificate: UnknownIssuer".into());
        assert!(matches!(tls, StoreError::Auth(_)));
        assert!(!tls.is_retryable());
        assert!(tls.is_terminal());
    }

    #[test]
    fn only_refusals_and_bad_configuration_are_terminal() {
        assert!(StoreError::Config("x".into()).is_terminal());
        for e in [
            StoreError::Unreachable("x".into()),
            StoreError::Protocol("watch canceled".into()),
            StoreError::Fenced("x".into()),
            StoreError::LeaseExpired(1),
        ] {
            assert!(!e.is_terminal(), "{e}");
        }
    }

    #[test]
    fn grpc_codes_map_to_kinds() {
        use tonic_status::{Code, Status};
        let s = |c, m: &str| classify_status(&Status::new(c, m));
        assert!(s(Code::Unavailable, "etcdserver: no leader").is_retryable());
        assert!(s(Code::DeadlineExceeded, "timeout").is_retryable());
        assert!(matches!(
            s(Code::PermissionDenied, "nope"),
            StoreError::Auth(_)
        ));
        assert!(matches!(
            s(Code::InvalidArgument, "x"),
            StoreError::Protocol(_)
        ));
        assert!(matches!(
            s(Code::NotFound, "etcdserver: requested lease not found"),
            StoreError::LeaseExpired(_)
        ));
    }

    #[test]
    fn a_certificate_without_key_is_a_config_error() {
        let mut c = EtcdConfig::new(vec!["https://127.0.0.1:1".into()]);
        c.cert = Some("/nonexistent.pem".into());
        assert!(matches!(tls_options(&c), Err(StoreError::Config(_))));
    }

    #[tokio::test]
    async fn no_endpoints_is_a_config_error() {
        let err = Store::connect(&EtcdConfig::new(vec![]))
            .await
            .expect_err("must fail");
        assert!(matches!(err, StoreError::Config(_)));
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let mut c = EtcdConfig::new(vec![format!("http://127.0.0.1:{port}")]);
        c.dial_timeout = Duration::from_millis(500);
        let err = Store::connect(&c).await.expect_err("must fail");
        assert!(err.is_retryable(), "{err}");
    }
}
