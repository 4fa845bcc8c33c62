//! The replication transport between two nodes: TCP with mutual TLS (rustls, ring), both
//! ends holding a certificate signed by the cluster's CA. The sender verifies the receiver's
//! certificate names the node it means to reach; the receiver accepts only peers whose client
//! certificate the CA signed. One transfer per connection ([`super::replicate`]'s wire format).
//!
//! A node's certificate must be usable for both TLS client and server authentication, with
//! the node's name as a DNS subject alternative name.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection, StreamOwned,
};
use stead_reconciler::driver::DriverError;
use tracing::{info, instrument};

use super::replicate::{self, ReplicaInfo, ReplicationBackend, Resolve, SendReport};

/// The TCP port nodes receive replicas on unless configured otherwise.
pub const DEFAULT_PORT: u16 = 7443;
/// How long one read or write on the connection may block.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// A node's TLS files (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster's CA certificate.
    pub ca: PathBuf,
    /// This node's certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

/// Client and server TLS configurations of one node.
#[derive(Clone)]
pub struct ReplicationTls {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

impl std::fmt::Debug for ReplicationTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplicationTls")
    }
}

fn tls_err(what: &str, e: impl std::fmt::Display) -> DriverError {
    DriverError::Other(format!("replication TLS: {what}: {e}"))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, DriverError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| tls_err(&path.display().to_string(), e))?;
    if certs.is_empty() {
        return Err(tls_err(&path.display().to_string(), "no certificate"));
    }
    Ok(certs)
}

impl ReplicationTls {
    /// Loads `files` and builds both configurations.
    pub fn load(files: &TlsFiles) -> Result<Self, DriverError> {
        let mut roots = RootCertStore::empty();
        for ca in read_certs(&files.ca)? {
            roots.add(ca).map_err(|e| tls_err("CA", e))?;
        }
        let roots = Arc::new(roots);
        let chain = read_certs(&files.cert)?;
        let key = PrivateKeyDer::from_pem_file(&files.key)
            .map_err(|e| tls_err(&files.key.display().to_string(), e))?;
        // ring, as tonic uses it here (aws-lc-rs would bring a C toolchain dependency).
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err("client", e))?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(|e| tls_err("client certificate", e))?;
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| tls_err("client verifier", e))?;
        let server = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err("server", e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| tls_err("server certificate", e))?;
        Ok(Self {
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }
}

impl ReplicationTls {
    /// The server side: the node's certificate, clients must present one the CA signed
    /// (the agent's metrics endpoint with `--metrics-tls` uses it too).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }
}

fn tcp(stream: &TcpStream) -> Result<(), DriverError> {
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
        .and_then(|()| stream.set_nodelay(true))
        .map_err(|e| DriverError::io("replication socket", e))
}

/// A TLS connection to node `peer` at `addr` (its certificate must name `peer`).
pub fn connect(
    tls: &ReplicationTls,
    addr: SocketAddr,
    peer: &str,
) -> Result<impl Read + Write + use<>, DriverError> {
    let name = ServerName::try_from(peer.to_string()).map_err(|e| tls_err(peer, e))?;
    let conn = ClientConnection::new(tls.client.clone(), name).map_err(|e| tls_err(peer, e))?;
    let sock = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .map_err(|e| DriverError::io(format!("connect to {peer} at {addr}"), e))?;
    tcp(&sock)?;
    Ok(StreamOwned::new(conn, sock))
}

/// Sends one replication point of `volume` to node `peer` at `addr`, as the owner holding
/// fencing token `token`.
#[instrument(skip(tls, backend))]
pub fn send_to(
    tls: &ReplicationTls,
    backend: &dyn ReplicationBackend,
    volume: &str,
    token: i64,
    peer: &str,
    addr: SocketAddr,
) -> Result<SendReport, DriverError> {
    let mut stream = connect(tls, addr, peer)?;
    replicate::send_volume(backend, volume, token, &mut stream)
}

/// The receiving end: a TCP listener that speaks TLS and receives replicas.
#[derive(Debug)]
pub struct ReplicationServer {
    listener: TcpListener,
    tls: ReplicationTls,
}

impl ReplicationServer {
    /// Listens on `addr`.
    pub fn bind(addr: SocketAddr, tls: ReplicationTls) -> Result<Self, DriverError> {
        let listener =
            TcpListener::bind(addr).map_err(|e| DriverError::io(format!("listen on {addr}"), e))?;
        Ok(Self { listener, tls })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> Result<SocketAddr, DriverError> {
        self.listener
            .local_addr()
            .map_err(|e| DriverError::io("replication listener", e))
    }

    /// Accepts one connection and receives one replication point over it, into the backend
    /// `resolve` gives for its volume (`None`: refused). A peer without a certificate from
    /// the cluster's CA fails the handshake (an error here, nothing written). Call it in a
    /// loop on a thread of its own; one transfer at a time.
    pub fn serve_one(&self, resolve: Resolve<'_>) -> Result<(String, ReplicaInfo), DriverError> {
        let (sock, from) = self
            .listener
            .accept()
            .map_err(|e| DriverError::io("accept a replication connection", e))?;
        tcp(&sock)?;
        let conn =
            ServerConnection::new(self.tls.server.clone()).map_err(|e| tls_err("server", e))?;
        let mut stream = StreamOwned::new(conn, sock);
        let received = replicate::receive_volume(resolve, &mut stream)?;
        info!(%from, volume = %received.0, seq = received.1.seq, "replica received over TLS");
        Ok(received)
    }
}
