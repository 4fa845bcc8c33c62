//! A cluster lab for tests: a hub network namespace holding a bridge, one network namespace
//! per node joined to it by a veth pair (node `i` is `10.77.0.i/24`, the hub `10.77.0.254`),
//! and one etcd 3.4 member per node inside its namespace, with TLS on the client and peer
//! sides from `stead cluster init`. Nothing of the host's own network is touched: every link
//! is created inside the lab's namespaces, and the etcd data lives on a tmpfs of the lab.
//!
//! Faults: signals to any process the lab started (SIGKILL, SIGSTOP, SIGCONT), link down/up
//! of a node's veth on the hub side (a partition), killing the etcd leader, stopping a
//! quorum (paused members) or crashing one (killed members). Everything (processes, namespaces with their links, the tmpfs, the temp dir) is
//! removed on drop, also when the test panics.
//!
//! Clients: the lab talks to members with `curl` over etcd's JSON gateway (`/v3/...`), from
//! inside a node's namespace to its local member (`https://127.0.0.1:2379`), with the
//! operator certificate. A test that needs root, `etcd`, `curl` or `nsenter` and lacks one
//! gets `None` from [`ClusterLab::for_test`] after a SKIP line.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rustix::process::Signal;
use serde_json::{Value, json};

use crate::{Tmpfs, is_root, skip_unless, stead_bin};

/// etcd heartbeat interval of the lab's members, in milliseconds.
pub const HEARTBEAT_MS: u64 = 100;
/// etcd election timeout of the lab's members, in milliseconds (10 heartbeats: margin for
/// two shared cores).
pub const ELECTION_MS: u64 = 1000;

static LABS: AtomicUsize = AtomicUsize::new(0);

/// One node of the lab.
#[derive(Debug)]
pub struct LabNode {
    /// Node (and etcd member) name: `n1`, `n2`, ...
    pub name: String,
    /// Its network namespace (a name for `ip netns`).
    pub netns: String,
    /// Its address on the lab bridge.
    pub ip: Ipv4Addr,
    /// The hub-side end of its veth pair (down = partitioned).
    pub hub_link: String,
    etcd: Option<Child>,
}

/// A process the lab started in a node's namespace (an agent, a controller).
#[derive(Debug)]
pub struct LabProcess {
    /// Node index it runs on.
    pub node: usize,
    /// What it is, for messages.
    pub what: String,
    child: Child,
}

impl LabProcess {
    /// Its process id.
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(0)
    }
}

/// The lab: namespaces, members, certificates and the processes tests add.
pub struct ClusterLab {
    /// Unique prefix of this lab's namespaces (`stead-lab-PID-N`).
    pub tag: String,
    /// The hub namespace (bridge `br0`).
    pub hub: String,
    /// The nodes, index 0 is `n1`.
    pub nodes: Vec<LabNode>,
    /// Processes started with [`ClusterLab::spawn`], killed on drop.
    pub procs: Vec<LabProcess>,
    namespaces: Vec<String>,
    stead_nodes: Vec<usize>,
    destroy_paths: Vec<PathBuf>,
    /// Manifests of one node's own `stead destroy` at drop (instead of `destroy_paths`).
    node_destroy_paths: BTreeMap<usize, Vec<PathBuf>>,
    /// What each teardown `stead destroy` said.
    teardown_log: Vec<String>,
    tmpfs: Option<Tmpfs>,
    /// Temp dir: `pki/`, `data/` (tmpfs), `log/`.
    pub dir: tempfile::TempDir,
    /// Lease TTL of the nodes joined and of the controller started from now on (`4s`).
    pub lease_ttl: &'static str,
}

/// `etcd` status of one member, as its JSON gateway reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberStatus {
    /// This member's id.
    pub member_id: u64,
    /// The leader it knows (0: none).
    pub leader: u64,
    /// Raft term.
    pub raft_term: u64,
}

impl ClusterLab {
    /// A lab of `n` nodes with etcd running and healthy, or `None` after printing a SKIP
    /// line for `test` when this machine lacks root, etcd, curl or nsenter.
    pub fn for_test(test: &str, n: usize) -> Option<ClusterLab> {
        if skip_unless(is_root(), test, "needs root for network namespaces") {
            return None;
        }
        for tool in ["etcd", "curl", "nsenter", "ip"] {
            if skip_unless(have(tool), test, &format!("{tool} not installed")) {
                return None;
            }
        }
        let mut lab = ClusterLab::network(n);
        lab.make_pki();
        lab.start_all();
        lab.wait_healthy(Duration::from_secs(30));
        Some(lab)
    }

    /// The namespaces, bridge and veth pairs of `n` nodes (no etcd yet).
    pub fn network(n: usize) -> ClusterLab {
        let tag = format!(
            "stead-lab-{}-{}",
            std::process::id(),
            LABS.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::Builder::new()
            .prefix("stead-lab-")
            .tempdir()
            .expect("tempdir");
        let mut lab = ClusterLab {
            hub: format!("{tag}-hub"),
            tag,
            nodes: Vec::new(),
            procs: Vec::new(),
            namespaces: Vec::new(),
            stead_nodes: Vec::new(),
            destroy_paths: Vec::new(),
            node_destroy_paths: BTreeMap::new(),
            teardown_log: Vec::new(),
            tmpfs: None,
            dir,
            lease_ttl: "4s",
        };
        lab.add_netns(&lab.hub.clone());
        ip(&["-n", &lab.hub, "link", "add", "br0", "type", "bridge"]);
        ip(&[
            "-n",
            &lab.hub,
            "addr",
            "add",
            "10.77.0.254/24",
            "dev",
            "br0",
        ]);
        ip(&["-n", &lab.hub, "link", "set", "br0", "up"]);
        for i in 0..n {
            lab.add_node(i);
        }
        lab.tmpfs = Tmpfs::mount(&lab.path("data"), "512m");
        assert!(lab.tmpfs.is_some(), "could not mount the lab's tmpfs");
        lab
    }

    fn add_netns(&mut self, name: &str) {
        ip(&["netns", "add", name]);
        self.namespaces.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"]);
    }

    fn add_node(&mut self, i: usize) {
        let name = format!("n{}", i + 1);
        let netns = format!("{}-{name}", self.tag);
        self.add_netns(&netns);
        let octet = u8::try_from(i + 1).expect("at most 253 nodes");
        let hub_link = format!("v{name}");
        let hub = self.hub.clone();
        ip(&[
            "-n", &hub, "link", "add", &hub_link, "type", "veth", "peer", "name", "eth0", "netns",
            &netns,
        ]);
        ip(&["-n", &hub, "link", "set", &hub_link, "master", "br0", "up"]);
        let ipaddr = Ipv4Addr::new(10, 77, 0, octet);
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{ipaddr}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &netns, "link", "set", "eth0", "up"]);
        self.nodes.push(LabNode {
            name,
            netns,
            ip: ipaddr,
            hub_link,
            etcd: None,
        });
    }

    /// A path in the lab's temp dir.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The certificate directory (`stead cluster init --dir`).
    pub fn pki(&self) -> PathBuf {
        self.path("pki")
    }

    /// The CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.pki().join("ca.crt")
    }

    /// The operator's client certificate and key.
    pub fn admin(&self) -> (PathBuf, PathBuf) {
        (self.pki().join("admin.crt"), self.pki().join("admin.key"))
    }

    /// Node `i`'s agent client certificate and key.
    pub fn agent_cert(&self, i: usize) -> (PathBuf, PathBuf) {
        let n = &self.nodes[i].name;
        let d = self.pki().join("agent");
        (d.join(format!("{n}.crt")), d.join(format!("{n}.key")))
    }

    /// Client URLs of every member (`https://10.77.0.i:2379`).
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("https://{}:2379", n.ip))
            .collect()
    }

    fn members_args(&self) -> Vec<String> {
        self.nodes
            .iter()
            .flat_map(|n| ["--node".to_string(), format!("{}={}", n.name, n.ip)])
            .collect()
    }

    /// Runs `stead cluster init` for the lab's nodes and checks its report.
    fn make_pki(&mut self) {
        let out = Command::new(stead_bin())
            .args(["cluster", "init", "--dir"])
            .arg(self.pki())
            .args(self.members_args())
            .args(["-o", "json"])
            .output()
            .expect("spawn stead cluster init");
        assert!(out.status.success(), "stead cluster init: {}", show(&out));
        let report: Value = serde_json::from_slice(&out.stdout).expect("init report");
        let n = report["members"].as_array().map_or(0, Vec::len);
        assert_eq!(n, self.nodes.len(), "init report: {report}");
        std::fs::write(self.path("init.json"), &out.stdout).expect("keep init report");
    }

    /// The etcd flags `stead cluster init` printed for node `i`.
    fn init_flags(&self, i: usize) -> Vec<String> {
        let text = std::fs::read(self.path("init.json")).expect("init report");
        let report: Value = serde_json::from_slice(&text).expect("init report");
        report["members"][i]["etcdFlags"]
            .as_array()
            .expect("etcdFlags")
            .iter()
            .filter_map(|f| f.as_str().map(str::to_string))
            .collect()
    }

    /// Starts every member.
    pub fn start_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.start_etcd(i);
        }
    }

    /// Starts (or restarts, on its existing data) node `i`'s etcd member.
    pub fn start_etcd(&mut self, i: usize) {
        if let Some(mut old) = self.nodes[i].etcd.take() {
            let _ = old.kill();
            let _ = old.wait();
        }
        let name = self.nodes[i].name.clone();
        let data = self.path(&format!("data/{name}"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(&format!("etcd-{name}")))
            .expect("etcd log");
        let mut cmd = self.in_netns(i, Path::new("etcd"));
        cmd.args(self.init_flags(i))
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--heartbeat-interval={HEARTBEAT_MS}"))
            .arg(format!("--election-timeout={ELECTION_MS}"))
            .args(["--logger=zap", "--log-outputs=stderr"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        self.nodes[i].etcd = Some(cmd.spawn().expect("spawn etcd"));
    }

    /// A log file in the lab (`log/NAME.log`).
    pub fn log_path(&self, name: &str) -> PathBuf {
        let d = self.path("log");
        std::fs::create_dir_all(&d).expect("log dir");
        d.join(format!("{name}.log"))
    }

    /// A command running `prog` in node `i`'s network namespace (`nsenter --net`: only the
    /// network namespace changes; /sys and the cgroup file systems stay as they are).
    pub fn in_netns(&self, i: usize, prog: &Path) -> Command {
        let ns = stead_host::netns::NetnsDir::host().path_of(&self.nodes[i].netns);
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", ns.display())).arg("--").arg(prog);
        c
    }

    /// A command running `prog` in the hub namespace (it reaches every node).
    pub fn in_hub(&self, prog: &Path) -> Command {
        let ns = stead_host::netns::NetnsDir::host().path_of(&self.hub);
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", ns.display())).arg("--").arg(prog);
        c
    }

    /// Node `i`'s stead state dir (`node-nI/state`).
    pub fn node_state(&self, i: usize) -> PathBuf {
        self.path(&format!("node-{}/state", self.nodes[i].name))
    }

    /// Node `i`'s stead run dir.
    pub fn node_run(&self, i: usize) -> PathBuf {
        self.path(&format!("node-{}/run", self.nodes[i].name))
    }

    /// Node `i`'s cgroup parent (`stead-lab-PID-K-nI`).
    pub fn node_cgroup(&self, i: usize) -> String {
        self.nodes[i].netns.clone()
    }

    /// `stead` with node `i`'s state dir, run dir and cgroup parent, in its namespace. The
    /// workloads it starts are stopped and their cgroups removed when the lab drops.
    pub fn stead(&mut self, i: usize) -> Command {
        if !self.stead_nodes.contains(&i) {
            self.stead_nodes.push(i);
        }
        let mut c = self.in_netns(i, &stead_bin());
        c.arg("--state-dir").arg(self.node_state(i));
        c.arg("--run-dir").arg(self.node_run(i));
        c.args(["--cgroup-parent", &self.node_cgroup(i), "--color", "never"]);
        c
    }

    /// Manifests `stead destroy` runs with on every node the lab used `stead` on, at drop.
    pub fn destroy_on_drop(&mut self, paths: &[PathBuf]) {
        self.destroy_paths = paths.to_vec();
    }

    /// Manifests `stead destroy` runs with on node `i` at drop, when each node has its own
    /// (a pool of its own). Like [`ClusterLab::destroy_on_drop`], it runs once the lab's
    /// processes are gone: an agent still running would converge back what it destroys.
    pub fn destroy_node_on_drop(&mut self, i: usize, paths: &[PathBuf]) {
        self.node_destroy_paths.insert(i, paths.to_vec());
    }

    /// SIGKILLs node `i`'s workloads: its supervisors (`stead shim` of its run dir) and
    /// every process in its cgroup parent. Returns how many processes were signalled.
    pub fn kill_workloads(&self, i: usize) -> usize {
        let run = self.node_run(i).to_string_lossy().into_owned();
        let mut pids = processes_with(&[&run, " shim "]);
        pids.extend(cgroup_pids(&self.node_cgroup(i)));
        for &p in &pids {
            crate::signal(p, Signal::KILL);
        }
        pids.len()
    }

    /// Starts `cmd` (built with [`ClusterLab::in_netns`]) and keeps it to be killed on drop;
    /// its index in [`ClusterLab::procs`].
    pub fn spawn(&mut self, node: usize, what: &str, mut cmd: Command) -> usize {
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        self.procs.push(LabProcess {
            node,
            what: what.to_string(),
            child,
        });
        self.procs.len() - 1
    }

    /// Node `i`'s etcd process id (None when not running).
    pub fn etcd_pid(&self, i: usize) -> Option<i32> {
        self.nodes[i]
            .etcd
            .as_ref()
            .and_then(|c| i32::try_from(c.id()).ok())
    }

    /// Sends `sig` to node `i`'s etcd member.
    pub fn signal_etcd(&mut self, i: usize, sig: Signal) {
        let pid = self.etcd_pid(i).expect("etcd running");
        assert!(
            crate::signal(pid, sig),
            "signal etcd of {}",
            self.nodes[i].name
        );
    }

    /// SIGKILLs node `i`'s etcd member and reaps it.
    pub fn kill_etcd(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].etcd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGKILLs the etcd leader; its index.
    pub fn kill_leader(&mut self) -> usize {
        let l = self.leader().expect("a leader");
        self.kill_etcd(l);
        l
    }

    /// SIGSTOPs members other than `keep` until a majority is stopped; the stopped ones.
    pub fn stop_quorum(&mut self, keep: usize) -> Vec<usize> {
        let need = self.nodes.len() / 2 + 1;
        let stop: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| i != keep)
            .take(need)
            .collect();
        assert_eq!(stop.len(), need, "not enough members to stop a quorum");
        for &i in &stop {
            self.signal_etcd(i, Signal::STOP);
        }
        stop
    }

    /// SIGKILLs members other than `keep` until a majority is gone (crashed: their ports
    /// refuse connections); the killed ones, for [`ClusterLab::start_etcd`].
    pub fn crash_quorum(&mut self, keep: usize) -> Vec<usize> {
        let need = self.nodes.len() / 2 + 1;
        let kill: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| i != keep)
            .take(need)
            .collect();
        assert_eq!(kill.len(), need, "not enough members to crash a quorum");
        for &i in &kill {
            self.kill_etcd(i);
        }
        kill
    }

    /// SIGCONTs the given members.
    pub fn resume(&mut self, which: &[usize]) {
        for &i in which {
            self.signal_etcd(i, Signal::CONT);
        }
    }

    /// Takes node `i`'s link to the hub down: it is cut off from every other node.
    pub fn partition(&self, i: usize) {
        ip(&[
            "-n",
            &self.hub,
            "link",
            "set",
            &self.nodes[i].hub_link,
            "down",
        ]);
    }

    /// Brings node `i`'s link to the hub back up.
    pub fn heal(&self, i: usize) {
        ip(&[
            "-n",
            &self.hub,
            "link",
            "set",
            &self.nodes[i].hub_link,
            "up",
        ]);
    }

    /// Sends `sig` to a process of [`ClusterLab::procs`].
    pub fn signal_proc(&self, p: usize, sig: Signal) -> bool {
        crate::signal(self.procs[p].pid(), sig)
    }

    /// SIGKILLs and reaps a process of [`ClusterLab::procs`].
    pub fn kill_proc(&mut self, p: usize) {
        let _ = self.procs[p].child.kill();
        let _ = self.procs[p].child.wait();
    }

    /// A JSON request to node `i`'s local member (`https://127.0.0.1:2379/v3/PATH`) from
    /// inside its namespace with the operator certificate, giving up after `timeout`.
    pub fn call(
        &self,
        i: usize,
        path: &str,
        body: &Value,
        timeout: Duration,
    ) -> Result<Value, String> {
        let (cert, key) = self.admin();
        self.curl(
            i,
            &format!("https://127.0.0.1:2379/v3/{path}"),
            Some((&cert, &key)),
            body,
            timeout,
        )
    }

    /// `curl` from node `i`'s namespace to `url`, POSTing `body`, with the lab CA and an
    /// optional client certificate; the JSON reply, or why there is none (including an
    /// `error` the gateway returned).
    pub fn curl(
        &self,
        i: usize,
        url: &str,
        client: Option<(&Path, &Path)>,
        body: &Value,
        timeout: Duration,
    ) -> Result<Value, String> {
        let mut c = self.in_netns(i, Path::new("curl"));
        c.args([
            "-sS",
            "--max-time",
            &format!("{:.1}", timeout.as_secs_f64()),
        ]);
        c.arg("--cacert").arg(self.ca());
        if let Some((cert, key)) = client {
            c.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        c.args(["-X", "POST", "-d", &body.to_string(), url]);
        let out = c.output().map_err(|e| format!("spawn curl: {e}"))?;
        if !out.status.success() {
            return Err(format!("curl {url}: {}", show(&out)));
        }
        let v: Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("reply of {url} is not JSON ({e}): {}", show(&out)))?;
        match v.get("error") {
            Some(e) => Err(format!("{url}: {e}")),
            None => Ok(v),
        }
    }

    /// Node `i`'s member status (None when it does not answer within a second).
    pub fn status(&self, i: usize) -> Option<MemberStatus> {
        let v = self
            .call(i, "maintenance/status", &json!({}), Duration::from_secs(1))
            .ok()?;
        Some(MemberStatus {
            member_id: num(&v["header"]["member_id"])?,
            leader: num(&v["leader"]).unwrap_or(0),
            raft_term: num(&v["raftTerm"]).unwrap_or(0),
        })
    }

    /// The index of the member that is leader by its own account, if any.
    pub fn leader(&self) -> Option<usize> {
        (0..self.nodes.len()).find(|&i| {
            self.nodes[i].etcd.is_some()
                && self
                    .status(i)
                    .is_some_and(|s| s.leader != 0 && s.leader == s.member_id)
        })
    }

    /// Waits until every running member answers and all name the same leader; panics after
    /// `limit` with the members' logs' last lines.
    pub fn wait_healthy(&self, limit: Duration) -> Duration {
        let t0 = Instant::now();
        loop {
            let running: Vec<usize> = (0..self.nodes.len())
                .filter(|&i| self.nodes[i].etcd.is_some())
                .collect();
            let st: Vec<Option<MemberStatus>> = running.iter().map(|&i| self.status(i)).collect();
            let first = st.first().copied().flatten();
            if let Some(f) = first
                && f.leader != 0
                && st.iter().all(|s| s.is_some_and(|s| s.leader == f.leader))
            {
                return t0.elapsed();
            }
            if t0.elapsed() > limit {
                panic!(
                    "etcd members not healthy after {limit:?}: {st:?}\n{}",
                    self.logs_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for a leader other than `old` (a member id) among the running members; the
    /// time it took, or None after `limit`.
    pub fn wait_new_leader(&self, old: u64, limit: Duration) -> Option<(usize, Duration)> {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            for i in 0..self.nodes.len() {
                if self.nodes[i].etcd.is_none() {
                    continue;
                }
                if let Some(s) = self.status(i)
                    && s.leader == s.member_id
                    && s.member_id != old
                {
                    return Some((i, t0.elapsed()));
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Puts `key` = `value` through node `i`'s member (a linearizable write).
    pub fn put(&self, i: usize, key: &str, value: &str, timeout: Duration) -> Result<(), String> {
        let body = json!({"key": b64(key.as_bytes()), "value": b64(value.as_bytes())});
        self.call(i, "kv/put", &body, timeout).map(|_| ())
    }

    /// Reads `key` through node `i`'s member: linearizable, or `local` (serializable: what
    /// this member has, without asking the leader).
    pub fn get(
        &self,
        i: usize,
        key: &str,
        local: bool,
        timeout: Duration,
    ) -> Result<Option<String>, String> {
        let body = json!({"key": b64(key.as_bytes()), "serializable": local});
        let v = self.call(i, "kv/range", &body, timeout)?;
        let Some(kv) = v["kvs"].as_array().and_then(|a| a.first()) else {
            return Ok(None);
        };
        let raw = kv["value"].as_str().unwrap_or_default();
        let bytes = unb64(raw).ok_or_else(|| format!("bad base64 {raw:?}"))?;
        Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
    }

    /// Each member's status and each node's links, neighbours and peer connections, for
    /// failure messages.
    pub fn diagnose(&self) -> String {
        let mut s = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let st = self.call(i, "maintenance/status", &json!({}), Duration::from_secs(1));
            s.push_str(&format!("--- {} status: {st:?}\n", n.name));
            for args in [&["-br", "link"][..], &["neigh"][..]] {
                let out = Command::new("ip")
                    .arg("-n")
                    .arg(&n.netns)
                    .args(args)
                    .output();
                if let Ok(o) = out {
                    s.push_str(&String::from_utf8_lossy(&o.stdout));
                }
            }
            let ss = self.in_netns(i, Path::new("ss")).args(["-tn"]).output();
            if let Ok(o) = ss {
                s.push_str(&String::from_utf8_lossy(&o.stdout));
            }
        }
        let hub = Command::new("ip")
            .args(["-n", &self.hub, "-br", "link"])
            .output();
        if let Ok(o) = hub {
            s.push_str(&format!("--- hub\n{}", String::from_utf8_lossy(&o.stdout)));
        }
        s
    }

    /// The last lines of every member's log, for failure messages.
    pub fn logs_tail(&self) -> String {
        let mut s = String::new();
        for n in &self.nodes {
            let text = std::fs::read_to_string(self.log_path(&format!("etcd-{}", n.name)))
                .unwrap_or_default();
            // Every gateway request logs a warning about the client's common name: noise.
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| !l.contains("gRPC-gateway"))
                .collect();
            let from = lines.len().saturating_sub(12);
            s.push_str(&format!(
                "--- etcd {} (last lines)\n{}\n",
                n.name,
                lines[from..].join("\n")
            ));
        }
        s
    }
}

impl Drop for ClusterLab {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        self.stop_workloads();
        for n in &mut self.nodes {
            if let Some(mut c) = n.etcd.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let own = self.tmpfs.as_ref().map(|t| t.0.clone());
        if unmount_leftovers(self.dir.path(), own.as_deref()) {
            // What the teardown saw, and how each node's agent log ends: a leftover is a
            // leak to explain, not only to clean.
            for said in &self.teardown_log {
                eprintln!("cluster lab: {said}");
            }
            for n in &self.nodes {
                let agent = format!("agent-{}", n.name);
                let text = std::fs::read_to_string(self.path("log").join(format!("{agent}.log")))
                    .unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let from = lines.len().saturating_sub(40);
                eprintln!(
                    "cluster lab: --- {agent} (last lines)\n{}",
                    lines[from..].join("\n")
                );
            }
        }
        self.tmpfs.take();
    }
}

/// Unmounts whatever is still mounted under `dir` at the lab's end, deepest first, and says
/// so on stderr: a mount left there (a workload's volume whose teardown did not run) would
/// keep its loop device and the lab's file systems busy after the test. `own` (the lab's
/// tmpfs) is left to its own drop. Whether there was any.
fn unmount_leftovers(dir: &Path, own: Option<&Path>) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    let mut left: Vec<String> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|m| m.replace("\\040", " "))
        .filter(|m| Path::new(m).starts_with(dir) && own != Some(Path::new(m)))
        .collect();
    left.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in &left {
        eprintln!("cluster lab: unmounting a leftover mount at the lab's end: {m}");
        let _ = Command::new("umount").args(["-l", m]).status();
    }
    !left.is_empty()
}

impl ClusterLab {
    /// At drop: `stead destroy` on every node used, then SIGKILL whatever is left in the
    /// nodes' cgroups and supervisors, and remove the cgroups.
    fn stop_workloads(&mut self) {
        for i in std::mem::take(&mut self.stead_nodes) {
            let paths = self
                .node_destroy_paths
                .get(&i)
                .unwrap_or(&self.destroy_paths)
                .clone();
            if !paths.is_empty() {
                let mut c = self.stead(i);
                c.args(["destroy", "--yes"]).args(&paths);
                // Kept for the report of a leftover mount (see `unmount_leftovers`).
                let said = match c.stdin(Stdio::null()).output() {
                    Ok(o) => format!(
                        "stead destroy on node {i}: {}\n{}{}",
                        o.status,
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    ),
                    Err(e) => format!("stead destroy on node {i}: {e}"),
                };
                self.teardown_log.push(said);
            }
            for _ in 0..3 {
                if self.kill_workloads(i) == 0 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            remove_cgroups(&self.node_cgroup(i));
        }
    }
}

/// The cgroup controller mounts a node's cgroup parent may have a directory under.
const CGROUP_ROOTS: [&str; 11] = [
    "unified", "memory", "cpu", "cpuacct", "pids", "cpuset", "freezer", "devices", "blkio",
    "systemd", "",
];

fn cgroup_dirs(parent: &str) -> Vec<PathBuf> {
    let base = stead_host::SysFs::host().root().join("fs/cgroup");
    let mut out = Vec::new();
    for ctrl in CGROUP_ROOTS {
        let top = base.join(ctrl).join(parent);
        if top.is_dir() {
            walk_dirs(&top, &mut out);
        }
    }
    out
}

/// `dir` and every directory below it, parents first.
fn walk_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            walk_dirs(&e.path(), out);
        }
    }
}

/// Every process in cgroup `parent` or below, in any controller.
fn cgroup_pids(parent: &str) -> Vec<i32> {
    let mut pids: Vec<i32> = cgroup_dirs(parent)
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|t| {
            t.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Removes cgroup `parent` and everything below it (deepest first).
fn remove_cgroups(parent: &str) {
    for d in cgroup_dirs(parent).iter().rev() {
        let _ = std::fs::remove_dir(d);
    }
}

/// Processes whose command line contains every one of `needles`.
fn processes_with(needles: &[&str]) -> Vec<i32> {
    let proc = stead_host::ProcFs::host();
    let mut out = Vec::new();
    for e in std::fs::read_dir(proc.root())
        .into_iter()
        .flatten()
        .flatten()
    {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(c) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let c = String::from_utf8_lossy(&c).replace('\0', " ");
        if needles.iter().all(|n| c.contains(n)) {
            out.push(pid);
        }
    }
    out
}

/// Runs `ip ARGS`; panics with its output when it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("spawn ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        show(&out)
    );
}

fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

fn show(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A uint64 the gateway wrote as a string (or a number).
fn num(v: &Value) -> Option<u64> {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| v.as_u64())
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (the gateway's encoding of bytes).
pub fn b64(data: &[u8]) -> String {
    let mut s = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                s.push(char::from(B64[((n >> (18 - 6 * k)) & 63) as usize]));
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// Decodes standard base64 (padding optional); None on a bad character.
pub fn unb64(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = B64.iter().position(|&x| x == c)?;
        acc = (acc << 6) | u32::try_from(v).ok()?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xff).ok()?);
        }
    }
    Some(out)
}

/// stead's cluster verbs on the lab, as the cluster tests run them: nodes joined with a 4 s
/// lease, agents and a controller candidate logging to `log/`, status read with the
/// operator certificate from the hub.
impl ClusterLab {
    /// `stead node join` of node `i` (its agent certificate, its lab IP as address, a lease of
    /// [`ClusterLab::lease_ttl`]) with `extra` arguments (e.g. `--pool NAME`); panics when it fails.
    pub fn join_node(&mut self, i: usize, extra: &[&str]) {
        let (cert, key) = self.agent_cert(i);
        let (name, ip) = (self.nodes[i].name.clone(), self.nodes[i].ip.to_string());
        let eps = self.endpoints().join(",");
        let ca = self.ca();
        let mut c = self.stead(i);
        c.args(["node", "join", "--etcd", &eps, "--name", &name])
            .args(["--address", &ip, "--lease-ttl", self.lease_ttl, "--ca"])
            .arg(ca)
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .args(extra);
        let out = c.output().expect("stead node join");
        assert!(
            out.status.success(),
            "node join {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts `stead agent MANIFESTS` on node `i` (log `agent-NAME`); its index in
    /// [`ClusterLab::procs`].
    pub fn start_agent(&mut self, i: usize, manifests: &Path) -> usize {
        self.start_agent_with_env(i, manifests, &[])
    }

    /// [`ClusterLab::start_agent`] with `env` added to the agent's environment (e.g.
    /// [`WallClockShift::env`]); the processes it starts inherit it.
    pub fn start_agent_with_env(
        &mut self,
        i: usize,
        manifests: &Path,
        env: &[(String, OsString)],
    ) -> usize {
        let log = std::fs::File::create(self.log_path(&format!("agent-{}", self.nodes[i].name)))
            .expect("agent log");
        let mut c = self.stead(i);
        c.args(["-vv", "agent"]).arg(manifests);
        c.args([
            "--metrics-listen",
            &format!("127.0.0.1:{AGENT_METRICS_PORT}"),
        ]);
        c.envs(env.iter().map(|(k, v)| (k, v)));
        c.stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let what = format!("agent {}", self.nodes[i].name);
        self.spawn(i, &what, c)
    }

    /// Starts a controller candidate `stead cluster lead MANIFESTS` in the hub (log
    /// `controller`, a lease of [`ClusterLab::lease_ttl`]); its index in [`ClusterLab::procs`].
    pub fn start_controller(&mut self, manifests: &Path) -> usize {
        let (cert, key) = self.admin();
        let log = std::fs::File::create(self.log_path("controller")).expect("log");
        let mut c = self.in_hub(&stead_bin());
        c.args(["-vv", "cluster", "lead"]).arg(manifests).args([
            "--name",
            "ctl",
            "--lease-ttl",
            self.lease_ttl,
            "--metrics-listen",
            &format!("127.0.0.1:{LEADER_METRICS_PORT}"),
        ]);
        self.operator_args(&mut c, &cert, &key);
        c.stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        self.spawn(0, "controller", c)
    }

    /// `stead cluster status -o json` from the hub (`null` when it fails).
    pub fn cluster_status(&self) -> Value {
        let (cert, key) = self.admin();
        let mut c = self.in_hub(&stead_bin());
        c.args(["cluster", "status", "-o", "json"]);
        self.operator_args(&mut c, &cert, &key);
        let out = c.output().expect("stead cluster status");
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// `stead migrate WHAT --to TO --timeout TIMEOUT` as the operator, run to its end.
    pub fn migrate(&self, what: &str, to: &str, timeout: &str) -> std::process::Output {
        self.operator_cmd(&["migrate", what, "--to", to, "--timeout", timeout])
            .output()
            .expect("stead migrate")
    }

    /// `stead ARGS...` in the hub with the operator's etcd arguments after them (for verbs
    /// that take `--etcd/--ca/--cert/--key`).
    pub fn operator_cmd(&self, args: &[&str]) -> Command {
        let (cert, key) = self.admin();
        let mut c = self.in_hub(&stead_bin());
        c.args(args);
        self.operator_args(&mut c, &cert, &key);
        c
    }

    fn operator_args(&self, c: &mut Command, cert: &Path, key: &Path) {
        c.arg("--etcd")
            .arg(self.endpoints().join(","))
            .arg("--ca")
            .arg(self.ca())
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key);
    }

    /// The last `n` lines of log `name`, without the transport crates' chatter (HTTP/2
    /// frames, connection pools drown what matters).
    pub fn log_tail(&self, name: &str, n: usize) -> Vec<String> {
        let text = std::fs::read_to_string(self.log_path(name)).unwrap_or_default();
        let noise = ["h2::", "hyper", "tower::", "rustls::", "tonic::"];
        let lines: Vec<String> = text
            .lines()
            .filter(|l| !noise.iter().any(|x| l.contains(x)))
            .map(str::to_string)
            .collect();
        let from = lines.len().saturating_sub(n);
        lines[from..].to_vec()
    }
}

/// The port agents serve metrics on, on the loopback of their node's namespace (each node
/// has its own, so every agent can use the same port).
pub const AGENT_METRICS_PORT: u16 = 9464;

/// The port the controller candidate serves metrics on, on the hub's loopback.
pub const LEADER_METRICS_PORT: u16 = 9465;

impl ClusterLab {
    /// Node `i`'s agent metrics (the Prometheus text), or why there are none.
    pub fn agent_metrics(&self, i: usize) -> Result<String, String> {
        let c = self.in_netns(i, Path::new("curl"));
        http_get(c, &format!("http://127.0.0.1:{AGENT_METRICS_PORT}/metrics"))
    }

    /// The controller candidate's metrics, or why there are none.
    pub fn leader_metrics(&self) -> Result<String, String> {
        let c = self.in_hub(Path::new("curl"));
        http_get(
            c,
            &format!("http://127.0.0.1:{LEADER_METRICS_PORT}/metrics"),
        )
    }

    /// Host pids of this lab's workloads (in one of its nodes' cgroup parents) whose command
    /// line contains every one of `needles`. Other labs running at the same time start the
    /// same workloads: matching by command line alone finds theirs too.
    pub fn workload_pids_with(&self, needles: &[&str]) -> Vec<i32> {
        let proc = stead_host::ProcFs::host();
        let cgroups: Vec<String> = (0..self.nodes.len()).map(|i| self.node_cgroup(i)).collect();
        processes_with(needles)
            .into_iter()
            .filter(|&pid| {
                std::fs::read_to_string(proc.pid_file(pid, "cgroup"))
                    .is_ok_and(|c| cgroups.iter().any(|g| c.contains(&format!("/{g}/"))))
            })
            .collect()
    }
}

fn http_get(mut curl: Command, url: &str) -> Result<String, String> {
    let out = curl
        .args(["-sS", "--max-time", "3", url])
        .output()
        .map_err(|e| format!("spawn curl: {e}"))?;
    if !out.status.success() {
        return Err(format!("curl {url}: {}", show(&out)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The value of metric `name` with exactly `labels` (`""` for none, else `a="b",c="d"` as
/// Prometheus writes them) in a text exposition.
pub fn metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    let want = if labels.is_empty() {
        name.to_string()
    } else {
        format!("{name}{{{labels}}}")
    };
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        (series == want).then(|| value.parse().ok()).flatten()
    })
}

/// The node owning `resource` (`Kind/name`) in a `stead cluster status -o json` document.
pub fn owner_in(status: &Value, resource: &str) -> Option<String> {
    status["assignments"]
        .as_array()?
        .iter()
        .find(|a| a["resource"] == resource)?["owner"]
        .as_str()
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_values_are_found_by_name_and_labels() {
        let text = "# HELP x y\n# TYPE x counter\nstead_cluster_fences_total 2\n\
                    stead_cluster_placements{node=\"n1\"} 1\n";
        assert_eq!(metric(text, "stead_cluster_fences_total", ""), Some(2.0));
        assert_eq!(
            metric(text, "stead_cluster_placements", "node=\"n1\""),
            Some(1.0)
        );
        assert_eq!(metric(text, "stead_cluster_placements", ""), None);
        assert_eq!(metric(text, "stead_cluster_fences", ""), None);
    }

    #[test]
    fn samples_make_one_run_per_stretch_and_node() {
        let mut runs = Vec::new();
        for (at, seen) in [
            (0.0, [false, false]),
            (0.1, [true, false]),
            (0.2, [true, false]),
            (0.3, [false, false]),
            (0.4, [false, true]),
            (0.5, [true, true]),
        ] {
            record_sample(&mut runs, &seen, at);
        }
        let r = |node, first, last, open| NodeRun {
            node,
            first,
            last,
            open,
        };
        assert_eq!(
            runs,
            vec![
                r(0, 0.1, 0.2, false),
                r(1, 0.4, 0.5, true),
                r(0, 0.5, 0.5, true)
            ]
        );
        assert_eq!(overlap(&runs), Some((runs[1], runs[2])));
        assert_eq!(overlap(&runs[..2]), None);
    }

    #[test]
    fn a_run_starting_at_the_last_sample_of_another_node_s_overlaps_it() {
        let a = NodeRun {
            node: 0,
            first: 1.0,
            last: 2.0,
            open: false,
        };
        let b = NodeRun {
            node: 1,
            first: 2.0,
            last: 3.0,
            open: true,
        };
        let later = NodeRun { first: 2.05, ..b };
        let same_node = NodeRun { node: 0, ..b };
        assert_eq!(overlap(&[b, a]), Some((a, b)));
        assert_eq!(overlap(&[a, later]), None);
        assert_eq!(overlap(&[a, same_node]), None);
    }

    #[test]
    fn base64_round_trips() {
        for s in ["", "a", "ab", "abc", "abcd", "stead/nodes/n1"] {
            assert_eq!(unb64(&b64(s.as_bytes())).as_deref(), Some(s.as_bytes()));
        }
        assert_eq!(b64(b"ab"), "YWI=");
        assert_eq!(b64(b"abc"), "YWJj");
    }
}

/// Where Debian's `faketime` package installs libfaketime.
const LIBFAKETIME: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
];

/// libfaketime, if installed.
pub fn libfaketime() -> Option<PathBuf> {
    LIBFAKETIME.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// A wall clock shifted for one process tree without touching the host's: libfaketime
/// preloaded, `CLOCK_REALTIME` offset by what a file says (rewritten by the test, read again
/// within a second), the monotonic clocks left real.
#[derive(Debug)]
pub struct WallClockShift {
    lib: PathBuf,
    file: PathBuf,
}

impl WallClockShift {
    /// A shift of 0 s kept in `file`, or `None` when libfaketime is not installed.
    pub fn new(file: PathBuf) -> Option<WallClockShift> {
        let shift = WallClockShift {
            lib: libfaketime()?,
            file,
        };
        shift.set(0);
        Some(shift)
    }

    /// Shifts the wall clock of the processes started with [`WallClockShift::env`] to real
    /// time + `offset_s` (replaces the file in one rename: never read half written).
    pub fn set(&self, offset_s: i64) {
        let tmp = self.file.with_extension("tmp");
        std::fs::write(&tmp, format!("{offset_s:+}\n")).expect("write faketime file");
        std::fs::rename(&tmp, &self.file).expect("rename faketime file");
    }

    /// The environment of a process whose wall clock follows this shift.
    pub fn env(&self) -> Vec<(String, OsString)> {
        let v = |s: &str| OsString::from(s);
        vec![
            ("LD_PRELOAD".into(), self.lib.clone().into_os_string()),
            (
                "FAKETIME_TIMESTAMP_FILE".into(),
                self.file.clone().into_os_string(),
            ),
            ("FAKETIME_DONT_FAKE_MONOTONIC".into(), v("1")),
            ("FAKETIME_CACHE_DURATION".into(), v("1")),
        ]
    }
}

/// Waits until `ok()` holds, checking every 100 ms; panics after `limit` with `what` and the
/// last lines of the lab's agents' and controller's logs.
pub fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool, lab: &ClusterLab) {
    let t0 = Instant::now();
    while !ok() {
        if t0.elapsed() > limit {
            panic!("{what}: not after {limit:?}\n{}", agent_logs(lab));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last 25 lines of every agent's log and of the controller's, for failure messages.
pub fn agent_logs(lab: &ClusterLab) -> String {
    let mut names: Vec<String> = lab
        .nodes
        .iter()
        .map(|n| format!("agent-{}", n.name))
        .collect();
    names.push("controller".into());
    let mut s = String::new();
    for name in names {
        s.push_str(&format!(
            "--- {name}\n{}\n",
            lab.log_tail(&name, 25).join("\n")
        ));
    }
    s
}

/// One uninterrupted stretch in which a workload was seen running on one node, in seconds
/// on the recorder's monotonic clock (the first and the last sample that saw it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NodeRun {
    /// Index of the node.
    pub node: usize,
    /// First sample that saw it running.
    pub first: f64,
    /// Last sample that saw it running (the latest sample while it still runs).
    pub last: f64,
    /// Whether the latest sample still saw it running.
    pub open: bool,
}

/// Samples, every [`RunRecorder::PERIOD`] on a thread of its own, one predicate per node
/// ("does the workload run there now?") and records the runs: where and when a workload
/// ran, seen from the host, for workloads that cannot write a probe file themselves (a VM).
pub struct RunRecorder {
    t0: Instant,
    runs: std::sync::Arc<std::sync::Mutex<Vec<NodeRun>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Whether a workload runs on one node now.
pub type RunningProbe = Box<dyn Fn() -> bool + Send>;

impl RunRecorder {
    /// Time between two samples (the resolution of the record).
    pub const PERIOD: Duration = Duration::from_millis(50);

    /// Starts sampling `probes[i]` for node `i`.
    pub fn start(probes: Vec<RunningProbe>) -> RunRecorder {
        let t0 = Instant::now();
        let runs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (r, s) = (runs.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let seen: Vec<bool> = probes.iter().map(|p| p()).collect();
                let at = t0.elapsed().as_secs_f64();
                record_sample(&mut r.lock().unwrap_or_else(|e| e.into_inner()), &seen, at);
                std::thread::sleep(Self::PERIOD);
            }
        });
        RunRecorder {
            t0,
            runs,
            stop,
            thread: Some(thread),
        }
    }

    /// Seconds on the recorder's clock now.
    pub fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    /// The runs recorded so far, in the order they started.
    pub fn runs(&self) -> Vec<NodeRun> {
        self.runs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for RunRecorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Adds one sample (`seen[i]`: running on node `i` at `at`) to `runs`: extends each node's
/// open run, opens a run where it started, closes the run where it stopped.
pub fn record_sample(runs: &mut Vec<NodeRun>, seen: &[bool], at: f64) {
    for (node, &up) in seen.iter().enumerate() {
        let open = runs.iter_mut().find(|r| r.node == node && r.open);
        match (open, up) {
            (Some(r), true) => r.last = at,
            (Some(r), false) => r.open = false,
            (None, true) => runs.push(NodeRun {
                node,
                first: at,
                last: at,
                open: true,
            }),
            (None, false) => {}
        }
    }
}

/// The first pair of runs on two nodes at the same time (a double run), if any. Runs are
/// sampled: two runs overlap when one started at or before a sample at which the other was
/// still seen.
pub fn overlap(runs: &[NodeRun]) -> Option<(NodeRun, NodeRun)> {
    let mut v = runs.to_vec();
    v.sort_by(|a, b| a.first.total_cmp(&b.first));
    v.iter().enumerate().find_map(|(k, a)| {
        v[k + 1..]
            .iter()
            .find(|b| b.node != a.node && b.first <= a.last)
            .map(|b| (*a, *b))
    })
}
