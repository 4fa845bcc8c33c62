//! The cluster's certificates (`stead cluster init`): one certificate authority, and signed by
//! it, for each etcd member a server certificate (clients → member) and a peer certificate
//! (member ↔ member), for each node an agent certificate (CN = node name; a client of etcd,
//! and both ends of replication between agents), and one
//! operator client certificate (`admin`). etcd runs with `--client-cert-auth` and
//! `--peer-client-cert-auth`, so nothing without a certificate from this CA talks to it.
//!
//! Layout under the directory (see [`Layout`]):
//!
//! ```text
//! ca.crt ca.key                         the authority (keep ca.key offline once nodes exist)
//! etcd/NAME/server.crt server.key       SANs: NAME, the member's IP, localhost, 127.0.0.1
//! etcd/NAME/peer.crt peer.key           same SANs, server and client use
//! agent/NAME.crt agent/NAME.key         client and server use, CN = NAME, SANs: NAME, the
//!                                       node's IP (agents replicate volumes to each other)
//! admin.crt admin.key                   client use, CN = stead-admin
//! ```
//!
//! Keys are ECDSA P-256, written 0600; certificates 0644. Files are written atomically
//! (temporary file, fsync, rename).

use std::fs::OpenOptions;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use serde::Serialize;
use time::{Duration, OffsetDateTime};

/// The port etcd members serve clients on.
pub const CLIENT_PORT: u16 = 2379;
/// The port etcd members talk to each other on.
pub const PEER_PORT: u16 = 2380;
/// Common name of the operator's client certificate.
pub const ADMIN_CN: &str = "stead-admin";

/// What can go wrong while making the certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A `NAME=IP` argument that does not parse.
    #[error("bad member {0:?}: expected NAME=IP with NAME a DNS label (a-z, 0-9, '-')")]
    BadMember(String),
    /// Two members with the same name or address.
    #[error("member {0} is given twice")]
    DuplicateMember(String),
    /// No member at all.
    #[error("no member: give at least one --node NAME=IP")]
    NoMembers,
    /// A CA exists and the caller did not say what to do with it.
    #[error(
        "a CA already exists at {0}: pass --reuse-ca to sign certificates with it, or \
         --force-new-ca to replace it (every certificate it signed stops working)"
    )]
    CaExists(PathBuf),
    /// `--reuse-ca` without a CA.
    #[error("no CA at {0} to reuse")]
    CaMissing(PathBuf),
    /// Reading or writing a file.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// Generating or signing a key or certificate (or parsing the reused CA).
    #[error("certificate {what}")]
    Cert {
        /// Which certificate.
        what: String,
        /// What failed.
        #[source]
        source: rcgen::Error,
    },
}

/// One etcd member and node: its name and the address others reach it on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    /// Node name (a DNS label).
    pub name: String,
    /// Address of the node (etcd client and peer URLs use it).
    pub ip: IpAddr,
}

impl FromStr for Member {
    type Err = PkiError;

    /// Parses `NAME=IP`.
    fn from_str(s: &str) -> Result<Self, PkiError> {
        let bad = || PkiError::BadMember(s.to_string());
        let (name, ip) = s.split_once('=').ok_or_else(bad)?;
        if !is_dns_label(name) {
            return Err(bad());
        }
        let ip = ip.parse().map_err(|_| bad())?;
        Ok(Member {
            name: name.to_string(),
            ip,
        })
    }
}

impl Member {
    /// `https://IP:2379`.
    pub fn client_url(&self) -> String {
        format!("https://{}", socket(self.ip, CLIENT_PORT))
    }

    /// `https://IP:2380`.
    pub fn peer_url(&self) -> String {
        format!("https://{}", socket(self.ip, PEER_PORT))
    }
}

fn socket(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

/// Whether `s` is a lower-case DNS label (1–63 of a-z, 0-9, '-', not starting or ending
/// with '-'): a node name that is also a file name and a certificate SAN.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Where each file lives under the PKI directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    dir: PathBuf,
}

impl Layout {
    /// The layout under `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Layout { dir: dir.into() }
    }
    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The CA certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    /// The CA key.
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    fn member_dir(&self, name: &str) -> PathBuf {
        self.dir.join("etcd").join(name)
    }
    /// A member's server certificate.
    pub fn server_cert(&self, name: &str) -> PathBuf {
        self.member_dir(name).join("server.crt")
    }
    /// A member's server key.
    pub fn server_key(&self, name: &str) -> PathBuf {
        self.member_dir(name).join("server.key")
    }
    /// A member's peer certificate.
    pub fn peer_cert(&self, name: &str) -> PathBuf {
        self.member_dir(name).join("peer.crt")
    }
    /// A member's peer key.
    pub fn peer_key(&self, name: &str) -> PathBuf {
        self.member_dir(name).join("peer.key")
    }
    /// A node's agent client certificate.
    pub fn agent_cert(&self, name: &str) -> PathBuf {
        self.dir.join("agent").join(format!("{name}.crt"))
    }
    /// A node's agent client key.
    pub fn agent_key(&self, name: &str) -> PathBuf {
        self.dir.join("agent").join(format!("{name}.key"))
    }
    /// The operator's client certificate.
    pub fn admin_cert(&self) -> PathBuf {
        self.dir.join("admin.crt")
    }
    /// The operator's client key.
    pub fn admin_key(&self) -> PathBuf {
        self.dir.join("admin.key")
    }
}

/// What to do about a CA that may already exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CaMode {
    /// Make a CA; refuse when one exists.
    #[default]
    New,
    /// Sign with the existing CA (adding nodes to a cluster).
    Reuse,
    /// Make a new CA even if one exists.
    Replace,
}

/// A `stead cluster init` request.
#[derive(Debug, Clone)]
pub struct InitRequest {
    /// Where the files go.
    pub layout: Layout,
    /// The etcd members (and agent nodes).
    pub members: Vec<Member>,
    /// What to do with an existing CA.
    pub ca: CaMode,
    /// Validity of the leaf certificates, in days (the CA gets ten times as long).
    pub days: u32,
}

/// What `init` wrote, and how to run each member.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InitReport {
    /// Whether a CA was created (false: reused).
    pub ca_created: bool,
    /// The CA certificate file.
    pub ca_cert: PathBuf,
    /// The operator client certificate and key.
    pub admin: (PathBuf, PathBuf),
    /// Per member: files and etcd flags.
    pub members: Vec<MemberReport>,
}

/// One member's files and flags.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberReport {
    /// Node name.
    pub name: String,
    /// Its client URL.
    pub client_url: String,
    /// The agent client certificate and key.
    pub agent: (PathBuf, PathBuf),
    /// etcd flags for this member (add `--data-dir` and timing flags).
    pub etcd_flags: Vec<String>,
}

/// Checks the members: at least one, names and addresses unique.
pub fn check_members(members: &[Member]) -> Result<(), PkiError> {
    if members.is_empty() {
        return Err(PkiError::NoMembers);
    }
    for (i, m) in members.iter().enumerate() {
        if members[..i]
            .iter()
            .any(|o| o.name == m.name || o.ip == m.ip)
        {
            return Err(PkiError::DuplicateMember(m.name.clone()));
        }
    }
    Ok(())
}

/// Makes (or reuses) the CA and writes every member's and node's certificates.
#[tracing::instrument(skip_all, fields(dir = %req.layout.dir().display()))]
pub fn init(req: &InitRequest) -> Result<InitReport, PkiError> {
    check_members(&req.members)?;
    let l = &req.layout;
    let now = OffsetDateTime::now_utc();
    let (ca_key, ca_created) = load_or_make_ca(l, req.ca, now, req.days)?;
    let issuer = ca_issuer(l, ca_key)?;
    let leaf = Validity::from(now, req.days);
    let mut members = Vec::new();
    for m in &req.members {
        members.push(issue_member(l, &issuer, m, leaf, &req.members)?);
    }
    let admin = issue(&issuer, &client_params(ADMIN_CN, leaf), "admin")?;
    write_pair(&admin, &l.admin_cert(), &l.admin_key())?;
    tracing::info!(members = members.len(), ca_created, "certificates written");
    Ok(InitReport {
        ca_created,
        ca_cert: l.ca_cert(),
        admin: (l.admin_cert(), l.admin_key()),
        members,
    })
}

/// The flags `member` runs etcd with, TLS on both sides (client and peer certificates
/// required), every member of `all` in the initial cluster, `--pre-vote` and a 1 s
/// keepalive floor (a healed member must not force elections, agents keep alive every
/// second). The caller adds `--data-dir` and, if wanted, heartbeat and election timing.
pub fn etcd_flags(l: &Layout, all: &[Member], member: &Member) -> Vec<String> {
    let initial = all
        .iter()
        .map(|m| format!("{}={}", m.name, m.peer_url()))
        .collect::<Vec<_>>()
        .join(",");
    let local = format!(
        "https://{}",
        socket(IpAddr::V4(Ipv4Addr::LOCALHOST), CLIENT_PORT)
    );
    let path = |p: PathBuf| p.display().to_string();
    let mut f = vec![
        format!("--name={}", member.name),
        format!("--listen-client-urls={},{local}", member.client_url()),
        format!("--advertise-client-urls={}", member.client_url()),
        format!("--listen-peer-urls={}", member.peer_url()),
        format!("--initial-advertise-peer-urls={}", member.peer_url()),
        format!("--initial-cluster={initial}"),
        "--initial-cluster-state=new".to_string(),
        "--initial-cluster-token=stead".to_string(),
        format!("--trusted-ca-file={}", path(l.ca_cert())),
        format!("--cert-file={}", path(l.server_cert(&member.name))),
        format!("--key-file={}", path(l.server_key(&member.name))),
        "--client-cert-auth=true".to_string(),
        format!("--peer-trusted-ca-file={}", path(l.ca_cert())),
        format!("--peer-cert-file={}", path(l.peer_cert(&member.name))),
        format!("--peer-key-file={}", path(l.peer_key(&member.name))),
        "--peer-client-cert-auth=true".to_string(),
    ];
    f.extend(
        ["--pre-vote=true", "--grpc-keepalive-min-time=1s"]
            .iter()
            .map(|s| s.to_string()),
    );
    f
}

#[derive(Debug, Clone, Copy)]
struct Validity {
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

impl Validity {
    /// From an hour ago (clocks of nodes differ a little) for `days` days.
    fn from(now: OffsetDateTime, days: u32) -> Self {
        Validity {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(i64::from(days)),
        }
    }
}

fn load_or_make_ca(
    l: &Layout,
    mode: CaMode,
    now: OffsetDateTime,
    days: u32,
) -> Result<(KeyPair, bool), PkiError> {
    let exists = l.ca_cert().exists() || l.ca_key().exists();
    match (mode, exists) {
        (CaMode::New, true) => Err(PkiError::CaExists(l.ca_cert())),
        (CaMode::Reuse, false) => Err(PkiError::CaMissing(l.ca_cert())),
        (CaMode::Reuse, true) => {
            let pem = read(&l.ca_key())?;
            let key = KeyPair::from_pem(&pem).map_err(cert_err("CA key"))?;
            Ok((key, false))
        }
        (CaMode::New | CaMode::Replace, _) => {
            let key = KeyPair::generate().map_err(cert_err("CA key"))?;
            let cert = ca_params(Validity::from(now, days.saturating_mul(10)))
                .self_signed(&key)
                .map_err(cert_err("CA"))?;
            write_file(&l.ca_key(), key.serialize_pem().as_bytes(), 0o600)?;
            write_file(&l.ca_cert(), cert.pem().as_bytes(), 0o644)?;
            Ok((key, true))
        }
    }
}

fn ca_issuer(l: &Layout, key: KeyPair) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let pem = read(&l.ca_cert())?;
    Issuer::from_ca_cert_pem(&pem, key).map_err(cert_err("CA certificate"))
}

fn ca_params(v: Validity) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = dn("stead cluster CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = v.not_before;
    p.not_after = v.not_after;
    p
}

fn dn(cn: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::OrganizationName, "stead");
    d.push(DnType::CommonName, cn);
    d
}

fn leaf_params(cn: &str, v: Validity, eku: Vec<ExtendedKeyUsagePurpose>) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(cn);
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = eku;
    p.use_authority_key_identifier_extension = true;
    p.not_before = v.not_before;
    p.not_after = v.not_after;
    p
}

fn client_params(cn: &str, v: Validity) -> CertificateParams {
    leaf_params(cn, v, vec![ExtendedKeyUsagePurpose::ClientAuth])
}

/// Both TLS uses: server and client.
fn both_uses() -> Vec<ExtendedKeyUsagePurpose> {
    vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ]
}

fn dns_san(s: &str) -> Result<SanType, PkiError> {
    s.to_string()
        .try_into()
        .map(SanType::DnsName)
        .map_err(cert_err("SAN"))
}

/// Server and peer certificates: both uses (etcd's gateway and peers dial with them).
fn member_params(m: &Member, v: Validity) -> Result<CertificateParams, PkiError> {
    let mut p = leaf_params(&m.name, v, both_uses());
    p.subject_alt_names = vec![
        dns_san(&m.name)?,
        dns_san("localhost")?,
        SanType::IpAddress(m.ip),
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
    ];
    Ok(p)
}

/// An agent's certificate: a client of etcd, and both ends of replication between agents
/// (the sender checks the receiver's certificate names the node it dials).
fn agent_params(m: &Member, v: Validity) -> Result<CertificateParams, PkiError> {
    let mut p = leaf_params(&m.name, v, both_uses());
    p.subject_alt_names = vec![dns_san(&m.name)?, SanType::IpAddress(m.ip)];
    Ok(p)
}

struct Issued {
    cert_pem: String,
    key_pem: String,
}

fn issue(
    issuer: &Issuer<'_, KeyPair>,
    params: &CertificateParams,
    what: &str,
) -> Result<Issued, PkiError> {
    let key = KeyPair::generate().map_err(cert_err(what))?;
    let cert = params.signed_by(&key, issuer).map_err(cert_err(what))?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn issue_member(
    l: &Layout,
    issuer: &Issuer<'_, KeyPair>,
    m: &Member,
    v: Validity,
    all: &[Member],
) -> Result<MemberReport, PkiError> {
    let params = member_params(m, v)?;
    let server = issue(issuer, &params, &format!("{} server", m.name))?;
    write_pair(&server, &l.server_cert(&m.name), &l.server_key(&m.name))?;
    let peer = issue(issuer, &params, &format!("{} peer", m.name))?;
    write_pair(&peer, &l.peer_cert(&m.name), &l.peer_key(&m.name))?;
    let agent = issue(issuer, &agent_params(m, v)?, &format!("{} agent", m.name))?;
    write_pair(&agent, &l.agent_cert(&m.name), &l.agent_key(&m.name))?;
    Ok(MemberReport {
        name: m.name.clone(),
        client_url: m.client_url(),
        agent: (l.agent_cert(&m.name), l.agent_key(&m.name)),
        etcd_flags: etcd_flags(l, all, m),
    })
}

fn cert_err(what: &str) -> impl Fn(rcgen::Error) -> PkiError + '_ {
    move |source| PkiError::Cert {
        what: what.to_string(),
        source,
    }
}

fn write_pair(i: &Issued, cert: &Path, key: &Path) -> Result<(), PkiError> {
    write_file(key, i.key_pem.as_bytes(), 0o600)?;
    write_file(cert, i.cert_pem.as_bytes(), 0o644)
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `data` to `path` with `mode` through a temporary file, fsync and rename: a
/// reader sees the old file or the whole new one, and a key is never readable by others.
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    // The umask may have narrowed the mode: certificates are meant to be world-readable.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests;
