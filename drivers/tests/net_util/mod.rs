//! Shared helpers of the net_* tests: named network namespaces with Drop guards and
//! `ip`/`nft` runners for inspecting and making drift.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A named netns `stead-t-<pid>-<n>`, deleted on drop.
pub struct Netns {
    /// Its name.
    pub name: String,
}

impl Netns {
    /// Creates a fresh namespace with `lo` up.
    pub fn new() -> Netns {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("stead-t-{}-{n}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// `ip -n <name> ARGS`, must succeed; returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        sh("ip", &a)
    }

    /// `ip -n <name> ARGS`, may fail; returns (ok, stdout+stderr).
    pub fn ip_try(&self, args: &[&str]) -> (bool, String) {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        try_sh("ip", &a)
    }

    /// Runs a command inside the namespace (`ip netns exec`), may fail.
    pub fn exec(&self, args: &[&str]) -> (bool, String) {
        let mut a = vec!["netns", "exec", self.name.as_str()];
        a.extend_from_slice(args);
        try_sh("ip", &a)
    }

    /// `ip -j -d link show` parsed.
    pub fn links(&self) -> serde_json::Value {
        serde_json::from_str(&self.ip(&["-j", "-d", "link", "show"])).unwrap_or_default()
    }

    /// One link's JSON, if present.
    pub fn link(&self, name: &str) -> Option<serde_json::Value> {
        self.links()
            .as_array()?
            .iter()
            .find(|l| l["ifname"] == name)
            .cloned()
    }

    /// `nft -j list ruleset` parsed.
    pub fn ruleset(&self) -> serde_json::Value {
        let (ok, out) = self.exec(&["nft", "-j", "list", "ruleset"]);
        assert!(ok, "nft list ruleset: {out}");
        serde_json::from_str(&out).unwrap_or_default()
    }

    /// Whether the netns has a table `family name`.
    pub fn has_table(&self, family: &str, name: &str) -> bool {
        self.ruleset()["nftables"]
            .as_array()
            .map(|a| {
                a.iter()
                    .any(|o| o["table"]["family"] == family && o["table"]["name"] == name)
            })
            .unwrap_or(false)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill anything left running in it (servers), then delete.
        let _ = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).output();
                }
            });
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Runs a command that must succeed; returns stdout.
pub fn sh(cmd: &str, args: &[&str]) -> String {
    let (ok, out) = try_sh(cmd, args);
    assert!(ok, "{cmd} {args:?} failed: {out}");
    out
}

/// Runs a command; returns (success, stdout, or stdout+stderr on failure).
pub fn try_sh(cmd: &str, args: &[&str]) -> (bool, String) {
    match Command::new(cmd).args(args).output() {
        Ok(o) => {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            if !o.status.success() {
                s.push_str(&String::from_utf8_lossy(&o.stderr));
            }
            (o.status.success(), s)
        }
        Err(e) => (false, e.to_string()),
    }
}

/// Whether `ip` and root privileges are there (else the test prints SKIP).
pub fn can_run() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root".into());
    }
    if try_sh("ip", &["-V"]).0 {
        None
    } else {
        Some("iproute2 `ip` missing".into())
    }
}

/// A `HostEnv` managing networking in `ns`.
pub fn env(ns: &Netns) -> stead_reconciler::driver::HostEnv {
    let tmp = std::env::temp_dir().join(format!("stead-net-test-{}", ns.name));
    stead_reconciler::driver::HostEnv {
        state_dir: tmp.join("state"),
        run_dir: tmp.join("run"),
        cgroup_parent: format!("stead-test-{}", std::process::id()),
        netns: Some(ns.path()),
        self_exe: PathBuf::from("/bin/false"),
        fence_file: None,
    }
}

/// A resource of `kind` named `name` with `spec` (JSON, as in a manifest).
pub fn resource(
    kind: stead_schema::Kind,
    name: &str,
    spec: serde_json::Value,
) -> stead_schema::Resource {
    let spec = stead_schema::Spec::from_value(kind, spec).expect("valid spec");
    stead_schema::Resource {
        id: stead_schema::ResourceId::new(kind, name),
        metadata: stead_schema::Metadata {
            name: stead_schema::Name(name.to_string()),
            ..Default::default()
        },
        spec,
        origin: Default::default(),
    }
}

/// The resources as a `Lookup`.
pub fn world(
    rs: &[&stead_schema::Resource],
) -> std::collections::BTreeMap<stead_schema::ResourceId, stead_schema::Resource> {
    rs.iter().map(|r| (r.id.clone(), (*r).clone())).collect()
}

/// Observes `r` alone.
pub fn observe(
    d: &dyn stead_reconciler::driver::Driver,
    r: &stead_schema::Resource,
) -> stead_reconciler::driver::Observed {
    let w = world(&[r]);
    let mut m = d.observe(&[r], &w).expect("observe");
    m.remove(&r.id).expect("observed entry")
}

/// Applies `r` after observing it.
pub fn apply(
    d: &dyn stead_reconciler::driver::Driver,
    r: &stead_schema::Resource,
) -> Result<(), stead_reconciler::driver::DriverError> {
    let w = world(&[r]);
    let o = observe(d, r);
    d.apply(r, &o, &w)
}

/// Asserts desired == observed for `r`.
pub fn assert_converged(d: &dyn stead_reconciler::driver::Driver, r: &stead_schema::Resource) {
    let w = world(&[r]);
    let o = observe(d, r);
    assert!(o.exists, "{} should exist", r.id);
    assert!(o.owned, "{} should be owned", r.id);
    assert_eq!(
        d.desired_state(r, &w),
        o.state,
        "{}: desired (left) vs observed (right)",
        r.id
    );
}

/// The observed value of `field` when it differs from the desired one, else panics.
pub fn assert_drift(
    d: &dyn stead_reconciler::driver::Driver,
    r: &stead_schema::Resource,
    field: &str,
) -> serde_json::Value {
    let w = world(&[r]);
    let o = observe(d, r);
    let want = d.desired_state(r, &w);
    assert_ne!(
        want.get(field),
        o.state.get(field),
        "{}: drift in {field} not detected; state {}",
        r.id,
        o.state
    );
    o.state
        .get(field)
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

/// Deletes `r` after observing it.
pub fn delete(
    d: &dyn stead_reconciler::driver::Driver,
    r: &stead_schema::Resource,
) -> Result<(), stead_reconciler::driver::DriverError> {
    let w = world(&[r]);
    let o = observe(d, r);
    d.delete(r, &o, &w)
}

/// Whether `nft` is installed.
pub fn have_nft() -> bool {
    try_sh("nft", &["--version"]).0
}
