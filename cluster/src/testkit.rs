//! Test support (feature `testkit`): one real etcd member on loopback, killed and removed on
//! drop. Tests that cannot find the etcd binary print `SKIP <name>: <reason>` and return.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::agent::{self, AgentConfig, Converge};
use crate::etcd::{EtcdConfig, Store, StoreError};
use crate::model::{Capacity, NodeInfo};
use crate::registry::Liveness;

/// Where the etcd binary is looked for unless `STEAD_ETCD_BIN` names one.
pub const ETCD_BIN: &str = "/usr/bin/etcd";

/// Why a member could not start.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    /// No etcd binary (the test should SKIP).
    #[error("no etcd binary at {0} (apt-get install etcd-server)")]
    Missing(PathBuf),
    /// Setting up or starting failed.
    #[error("{0}")]
    Start(String),
}

/// The etcd binary, if present.
pub fn etcd_binary() -> Result<PathBuf, TestkitError> {
    let path =
        std::env::var_os("STEAD_ETCD_BIN").map_or_else(|| PathBuf::from(ETCD_BIN), PathBuf::from);
    if path.is_file() {
        Ok(path)
    } else {
        Err(TestkitError::Missing(path))
    }
}

/// What a test does with `started` (a member or cluster it just started): keeps it, or
/// prints `SKIP <test>: ...` and gives `None` when the etcd binary is missing (the test
/// returns); any other failure panics.
pub fn or_skip<T>(test: &str, started: Result<T, TestkitError>) -> Option<T> {
    match started {
        Ok(t) => Some(t),
        Err(TestkitError::Missing(p)) => {
            println!("SKIP {test}: no etcd binary at {}", p.display());
            None
        }
        Err(e) => panic!("{test}: {e}"),
    }
}

/// One member started for `test` and a store on it under `prefix`; `None` (after the SKIP
/// line of [`or_skip`]) without the etcd binary.
pub async fn member_with_store(test: &str, prefix: &str) -> Option<(EtcdMember, Store)> {
    let member = or_skip(test, EtcdMember::start().await)?;
    let store = member
        .store(prefix)
        .await
        .unwrap_or_else(|e| panic!("{test}: store: {e}"));
    Some((member, store))
}

/// A node for tests: `name` at 127.0.0.1, no labels, pools or networks, zero capacity.
pub fn test_node(name: &str) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        address: "127.0.0.1".into(),
        labels: BTreeMap::new(),
        capacity: Capacity::default(),
        pools: vec![],
        networks: vec![],
        version: "test".into(),
        replication_port: 7443,
    }
}

/// An agent (`agent::run`) running in a test with the fake engine `E`.
pub struct RunningAgent<E> {
    /// The engine the agent converges through (a fake that records its calls).
    pub engine: Arc<E>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), StoreError>>,
}

/// An agent's configuration for tests: node `name` (see [`test_node`]), a lease of `ttl`,
/// retries every 100 ms.
pub fn agent_config(name: &str, ttl: Duration) -> AgentConfig {
    let mut config = AgentConfig::new(test_node(name));
    config.lease = crate::registry::LeaseConfig::with_ttl(ttl);
    config.retry = Duration::from_millis(100);
    config
}

/// Starts an agent with `config` and `engine` on a task of the current runtime.
pub fn spawn_agent<E: Converge>(
    store: &Store,
    config: AgentConfig,
    engine: Arc<E>,
) -> RunningAgent<E> {
    let (stop, rx) = watch::channel(false);
    let (store, dyn_engine) = (store.clone(), engine.clone() as Arc<dyn Converge>);
    let task = tokio::spawn(async move { agent::run(&store, &config, dyn_engine, rx).await });
    RunningAgent { engine, stop, task }
}

impl<E> RunningAgent<E> {
    /// Whether the agent's task has ended.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Ends the agent without its shutdown, as a crash would: its lease and owner keys
    /// live on until they expire.
    pub async fn crash(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    /// Asks the agent to stop and waits for it (10 s at most); panics if it does not stop
    /// cleanly.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let joined = tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the agent stops within 10 s");
        joined
            .expect("the agent task")
            .expect("the agent ends without error");
    }
}

/// Records the largest gap between acknowledged keepalives that `liveness` shows, until its
/// registration goes away (the task's result).
pub fn largest_ack_gap(mut liveness: watch::Receiver<Liveness>) -> JoinHandle<Duration> {
    tokio::spawn(async move {
        let mut last = liveness.borrow().acked_at;
        let mut largest = Duration::ZERO;
        while liveness.changed().await.is_ok() {
            let at = liveness.borrow_and_update().acked_at;
            largest = largest.max(at.saturating_duration_since(last));
            last = at;
        }
        largest
    })
}

/// A free TCP port on 127.0.0.1 (bound and released; a race with other processes is possible
/// but harmless in tests).
pub fn free_port() -> Result<u16, TestkitError> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| TestkitError::Start(e.to_string()))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| TestkitError::Start(e.to_string()))
}

/// One etcd 3.4 member on 127.0.0.1, with its own data directory and free ports, started with
/// `--pre-vote=true` and `--grpc-keepalive-min-time=1s`. Dropping it kills the process and
/// removes the directory.
#[derive(Debug)]
pub struct EtcdMember {
    child: Option<Child>,
    dir: TempDir,
    client_url: String,
    peer_url: String,
    tls: Option<ServerTls>,
}

impl EtcdMember {
    /// Starts a single-member cluster and waits (up to 20 s) until it answers.
    pub async fn start() -> Result<Self, TestkitError> {
        let mut member = Self::spawn_member(None)?;
        let probe = member.config("/ready");
        member.wait_ready(probe).await?;
        Ok(member)
    }

    /// Starts a single-member cluster serving clients over TLS and requiring client
    /// certificates signed by `tls.ca`; waits until it answers a client configured as `client`
    /// (its endpoints are replaced by this member's).
    pub async fn start_tls(tls: &ServerTls, client: &EtcdConfig) -> Result<Self, TestkitError> {
        let mut member = Self::spawn_member(Some(tls))?;
        let mut probe = client.clone();
        probe.endpoints = vec![member.client_url.clone()];
        member.wait_ready(probe).await?;
        Ok(member)
    }

    fn spawn_member(tls: Option<&ServerTls>) -> Result<Self, TestkitError> {
        let bin = etcd_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("stead-etcd-")
            .tempdir()
            .map_err(|e| TestkitError::Start(e.to_string()))?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client_url = format!("{scheme}://127.0.0.1:{}", free_port()?);
        let peer_url = format!("http://127.0.0.1:{}", free_port()?);
        let child = spawn(&bin, dir.path(), &client_url, &peer_url, tls)?;
        Ok(Self {
            child: Some(child),
            dir,
            client_url,
            peer_url,
            tls: tls.cloned(),
        })
    }

    /// The client URL (`http://127.0.0.1:PORT`).
    pub fn client_url(&self) -> &str {
        &self.client_url
    }

    /// A configuration for this member under `prefix` (each test its own prefix), with short
    /// timeouts.
    pub fn config(&self, prefix: &str) -> EtcdConfig {
        let mut c = EtcdConfig::new(vec![self.client_url.clone()]).with_prefix(prefix);
        c.dial_timeout = Duration::from_secs(3);
        c.request_timeout = Duration::from_secs(3);
        c
    }

    /// Connects a store under `prefix`.
    pub async fn store(&self, prefix: &str) -> Result<Store, TestkitError> {
        Store::connect(&self.config(prefix))
            .await
            .map_err(|e| TestkitError::Start(e.to_string()))
    }

    /// The member's log so far (stderr of etcd).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    /// Kills the member (SIGKILL) and starts it again on the same data and ports; waits until
    /// it answers (plaintext members only).
    pub async fn restart(&mut self) -> Result<(), TestkitError> {
        self.kill();
        let bin = etcd_binary()?;
        let log = self.dir.path().join("etcd.log");
        let before = std::fs::read(&log).unwrap_or_default();
        let child = spawn(
            &bin,
            self.dir.path(),
            &self.client_url,
            &self.peer_url,
            self.tls.as_ref(),
        )?;
        let _ = std::fs::write(self.dir.path().join("etcd.log.1"), before);
        self.child = Some(child);
        let probe = self.config("/ready");
        self.wait_ready(probe).await
    }

    /// Kills the member now (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                // SAFETY: as in `signal`; a stopped process must be continued to die promptly.
                unsafe {
                    libc::kill(pid, libc::SIGCONT);
                }
            }
            let _ = child.wait();
        }
    }

    /// Stops the member (SIGSTOP): it neither answers nor expires leases until resumed.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Resumes a paused member (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: libc::c_int) {
        let Some(pid) = self
            .child
            .as_ref()
            .and_then(|c| libc::pid_t::try_from(c.id()).ok())
        else {
            return;
        };
        // SAFETY: kill(2) on the pid of our own child, which has not been waited for yet.
        unsafe {
            libc::kill(pid, signal);
        }
    }

    async fn wait_ready(&mut self, mut config: EtcdConfig) -> Result<(), TestkitError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        config.dial_timeout = Duration::from_millis(500);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                return Err(TestkitError::Start(format!(
                    "etcd exited ({status}):\n{}",
                    self.log()
                )));
            }
            match Store::connect(&config).await {
                Ok(_) => return Ok(()),
                Err(e) if tokio::time::Instant::now() > deadline => {
                    return Err(TestkitError::Start(format!(
                        "etcd not ready: {e}\n{}",
                        self.log()
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        self.kill();
    }
}

/// PEM files of a member's server certificate and the CA its clients must be signed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    /// CA that signed the client certificates (and, for the clients, the server's).
    pub ca: PathBuf,
    /// Server certificate (valid for 127.0.0.1).
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

fn spawn(
    bin: &Path,
    dir: &Path,
    client_url: &str,
    peer_url: &str,
    tls: Option<&ServerTls>,
) -> Result<Child, TestkitError> {
    let single = format!("m0={peer_url}");
    spawn_named(bin, dir, "m0", &single, client_url, peer_url, tls)
}

fn spawn_named(
    bin: &Path,
    dir: &Path,
    name: &str,
    initial_cluster: &str,
    client_url: &str,
    peer_url: &str,
    tls: Option<&ServerTls>,
) -> Result<Child, TestkitError> {
    let log = File::create(dir.join("etcd.log")).map_err(|e| TestkitError::Start(e.to_string()))?;
    let mut cmd = Command::new(bin);
    cmd.arg(format!("--name={name}"))
        .arg(format!("--data-dir={}", dir.join("data").display()))
        .arg(format!("--listen-client-urls={client_url}"))
        .arg(format!("--advertise-client-urls={client_url}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster={initial_cluster}"))
        .arg("--initial-cluster-state=new")
        .arg("--pre-vote=true")
        .arg("--grpc-keepalive-min-time=1s")
        .arg("--logger=zap")
        .env_remove("ETCD_NAME")
        .args(tls.map(tls_args).unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0);
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the parent;
    // it makes the kernel kill etcd if the test process dies without dropping the member.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|e| TestkitError::Start(format!("{}: {e}", bin.display())))
}

fn tls_args(tls: &ServerTls) -> Vec<String> {
    vec![
        format!("--cert-file={}", tls.cert.display()),
        format!("--key-file={}", tls.key.display()),
        format!("--trusted-ca-file={}", tls.ca.display()),
        "--client-cert-auth=true".into(),
    ]
}

/// Three etcd members on 127.0.0.1 (plaintext), for faults a single member cannot show: a
/// leader killed while clients keep leases alive. Dropping it kills every member.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Option<Child>>,
    client_urls: Vec<String>,
    peer_urls: Vec<String>,
    initial: String,
    dir: TempDir,
}

impl EtcdCluster {
    /// Starts three members and waits until they answer through every endpoint.
    pub async fn start() -> Result<Self, TestkitError> {
        let bin = etcd_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("stead-etcd-")
            .tempdir()
            .map_err(|e| TestkitError::Start(e.to_string()))?;
        let mut peers = Vec::new();
        let mut client_urls = Vec::new();
        for _ in 0..3 {
            peers.push(format!("http://127.0.0.1:{}", free_port()?));
            client_urls.push(format!("http://127.0.0.1:{}", free_port()?));
        }
        let initial: Vec<String> = peers
            .iter()
            .enumerate()
            .map(|(i, p)| format!("m{i}={p}"))
            .collect();
        let initial = initial.join(",");
        let mut members = Vec::new();
        for (i, (peer, client)) in peers.iter().zip(&client_urls).enumerate() {
            let member_dir = dir.path().join(format!("m{i}"));
            std::fs::create_dir_all(&member_dir).map_err(|e| TestkitError::Start(e.to_string()))?;
            let name = format!("m{i}");
            members.push(Some(spawn_named(
                &bin,
                &member_dir,
                &name,
                &initial,
                client,
                peer,
                None,
            )?));
        }
        let cluster = Self {
            members,
            client_urls,
            peer_urls: peers,
            initial,
            dir,
        };
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    /// A configuration with every member's endpoint under `prefix`, short timeouts.
    pub fn config(&self, prefix: &str) -> EtcdConfig {
        let mut c = EtcdConfig::new(self.client_urls.clone()).with_prefix(prefix);
        c.dial_timeout = Duration::from_secs(3);
        c.request_timeout = Duration::from_secs(3);
        c
    }

    /// The index of the member that leads now, if one answers.
    pub async fn leader(&self) -> Option<usize> {
        for (i, url) in self.client_urls.iter().enumerate() {
            if self.members[i].is_none() {
                continue;
            }
            let Ok(mut client) = etcd_client::Client::connect([url.as_str()], None).await else {
                continue;
            };
            if let Ok(Ok(status)) =
                tokio::time::timeout(Duration::from_secs(1), client.status()).await
            {
                let me = status.header().map(|h| h.member_id());
                if me == Some(status.leader()) {
                    return Some(i);
                }
            }
        }
        None
    }

    /// Kills member `i` (SIGKILL) and waits for it.
    pub fn kill(&mut self, i: usize) {
        self.resume(i);
        if let Some(mut child) = self.members.get_mut(i).and_then(Option::take) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops member `i` (SIGSTOP): it accepts connections but answers nothing until resumed.
    pub fn pause(&self, i: usize) {
        self.signal(i, libc::SIGSTOP);
    }

    /// Resumes member `i` (SIGCONT).
    pub fn resume(&self, i: usize) {
        self.signal(i, libc::SIGCONT);
    }

    fn signal(&self, i: usize, signal: libc::c_int) {
        let pid = self
            .members
            .get(i)
            .and_then(Option::as_ref)
            .and_then(|c| libc::pid_t::try_from(c.id()).ok());
        if let Some(pid) = pid {
            // SAFETY: kill(2) on the pid of our own child, which has not been waited for yet.
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }

    /// Starts member `i` again on its data (after [`EtcdCluster::kill`]).
    pub fn restart(&mut self, i: usize) -> Result<(), TestkitError> {
        let bin = etcd_binary()?;
        let member_dir = self.dir.path().join(format!("m{i}"));
        let name = format!("m{i}");
        let (url, peer) = (&self.client_urls[i], &self.peer_urls[i]);
        let child = spawn_named(&bin, &member_dir, &name, &self.initial, url, peer, None)?;
        self.members[i] = Some(child);
        Ok(())
    }

    async fn wait_ready(&self) -> Result<(), TestkitError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut config = self.config("/ready");
        config.dial_timeout = Duration::from_millis(500);
        loop {
            if Store::connect(&config).await.is_ok() && self.leader().await.is_some() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(TestkitError::Start("etcd cluster not ready in 30 s".into()));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
