//! The resolved configuration a shim runs a container from, and the files it keeps.
//!
//! The driver resolves a `ContainerSpec` (rootfs prepared, volumes and bridges looked up,
//! ids allocated) into a [`ContainerConfig`], writes it to
//! `<run_dir>/containers/<name>/config.json` and starts `stead shim` on it. Observe reads
//! it back (the recorded config of the running instance) together with the shim's
//! `state.json`.

use std::collections::BTreeMap;
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use stead_host::cgroup::Limits;
use stead_reconciler::driver::DriverError;
use stead_schema::{Cidr, MacAddr, RestartPolicy};

/// Default init command.
pub const DEFAULT_COMMAND: &str = "/sbin/init";
/// Default graceful stop timeout before SIGKILL.
pub const DEFAULT_STOP_TIMEOUT_SECS: u64 = 10;

/// How the root file system is mounted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum RootfsMount {
    /// A directory, bind-mounted in place.
    Dir {
        /// The directory.
        path: PathBuf,
    },
    /// An overlay: a shared read-only template cache plus a per-container upper dir.
    Overlay {
        /// The unpacked template (shared, never written).
        lower: PathBuf,
        /// Per-container changes.
        upper: PathBuf,
        /// Overlayfs work dir (same file system as `upper`).
        work: PathBuf,
        /// Mount point (created by the shim, empty).
        target: PathBuf,
    },
    /// A Volume's disk image holding a root file system, mounted by the shim.
    Image {
        /// Image file or block device.
        source: PathBuf,
        /// Staging mount point (becomes `/`).
        target: PathBuf,
    },
}

impl RootfsMount {
    /// The directory that becomes `/`.
    pub fn root(&self) -> &Path {
        match self {
            RootfsMount::Dir { path } => path,
            RootfsMount::Overlay { target, .. } | RootfsMount::Image { target, .. } => target,
        }
    }
}

/// A user-namespace id map: container ids `0..size` map to host `base..base+size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMap {
    /// First host uid/gid.
    pub base: u32,
    /// Number of ids.
    pub size: u32,
}

/// A network interface, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceConfig {
    /// Name inside the container.
    pub name: String,
    /// Bridge on the host (the Network's name).
    pub bridge: String,
    /// Host end of the veth pair.
    pub host_name: String,
    /// Address inside.
    pub address: Option<Cidr>,
    /// Default gateway.
    pub gateway: Option<IpAddr>,
    /// MAC address.
    pub mac: Option<MacAddr>,
}

/// A volume mount, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MountConfig {
    /// Host directory.
    pub source: PathBuf,
    /// Mount point inside the container.
    pub target: PathBuf,
    /// Read-only.
    pub read_only: bool,
}

/// Everything a shim needs to run one container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerConfig {
    /// Container name.
    pub name: String,
    /// Root file system.
    pub rootfs: RootfsMount,
    /// Host name.
    pub hostname: String,
    /// Init command and arguments.
    pub command: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// User-namespace id map (`unprivileged: true`).
    pub idmap: Option<IdMap>,
    /// Cgroup limits.
    pub limits: Limits,
    /// Network interfaces.
    pub interfaces: Vec<InterfaceConfig>,
    /// Volume mounts.
    pub mounts: Vec<MountConfig>,
    /// Restart policy.
    pub restart_policy: RestartPolicy,
    /// Cgroup parent (`--cgroup-parent`).
    pub cgroup_parent: String,
    /// Network namespace of the bridges (`--netns`).
    pub host_netns: Option<PathBuf>,
    /// Seconds between the stop signal and SIGKILL.
    pub stop_timeout_secs: u64,
    /// The driver's desired-state projection this config was built from (observe reports
    /// it back, with live values for state and resources).
    pub desired: serde_json::Value,
    /// The node's fence deadline file, for an HA container on a cluster node: the shim
    /// kills the container once its deadline passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence_file: Option<PathBuf>,
}

impl ContainerConfig {
    /// Signal asking init to shut down: SIGPWR for `/sbin/init` (busybox init halts on
    /// it, as LXC's default `lxc.signal.halt`), SIGTERM for any other command.
    pub fn stop_signal(&self) -> nix::sys::signal::Signal {
        if self.command.first().map(String::as_str) == Some(DEFAULT_COMMAND) {
            nix::sys::signal::Signal::SIGPWR
        } else {
            nix::sys::signal::Signal::SIGTERM
        }
    }
}

/// Exit of a container's init.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExitInfo {
    /// Exit code (when it exited).
    pub code: Option<i32>,
    /// Signal number (when killed).
    pub signal: Option<i32>,
    /// When (RFC 3339).
    pub at: String,
}

impl ExitInfo {
    /// Whether this exit counts as a failure for `on-failure`.
    pub fn failed(&self) -> bool {
        self.signal.is_some() || self.code.is_some_and(|c| c != 0)
    }
}

/// Phase of a supervised container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Init is running.
    Running,
    /// Init exited; waiting for the backoff before restarting it.
    Restarting,
    /// Stopping (signal sent, waiting for init).
    Stopping,
    /// Stopped on request; the shim has exited.
    Stopped,
    /// Init exited and the policy says no restart; the shim has exited.
    Exited,
    /// Killed because the node's fence deadline passed (cluster HA); the shim has exited.
    /// The node's agent starts it again once it owns the workload again.
    Fenced,
}

/// The shim's state file (`state.json`), rewritten atomically on every change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShimState {
    /// Phase.
    pub phase: Phase,
    /// Pid of the shim.
    pub shim_pid: i32,
    /// Pid of the container's init (host pid namespace), when running.
    pub init_pid: Option<i32>,
    /// Restarts since the shim started.
    pub restarts: u64,
    /// When init was last started (RFC 3339).
    pub started_at: Option<String>,
    /// Last exit of init.
    pub last_exit: Option<ExitInfo>,
    /// Last start error, when a restart failed.
    pub last_error: Option<String>,
    /// Duration of the last start (clone → init exec'd, with namespaces, cgroup attach,
    /// id maps and network), in microseconds.
    #[serde(default)]
    pub start_micros: Option<u64>,
    /// When the fence watchdog killed the container, in nanoseconds of `CLOCK_BOOTTIME`
    /// (compare with the fence deadline file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced_at_boot_ns: Option<u64>,
}

/// Files of one container under `<run_dir>/containers/<name>/`.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The directory.
    pub dir: PathBuf,
}

/// The file names of a container's run directory (the on-disk format of `stead shim`).
pub static LAYOUT: crate::supervise::Layout = crate::supervise::Layout {
    kind_dir: "containers",
    state: "state.json",
    lock: "shim.lock",
    socket: "control.sock",
    log: "shim.log",
    console_log: "console.log",
};

impl Paths {
    /// Paths of container `name` under `run_dir`.
    pub fn new(run_dir: &Path, name: &str) -> Self {
        Paths {
            dir: run_dir.join(LAYOUT.kind_dir).join(name),
        }
    }
    /// The supervised instance these files belong to.
    pub fn instance(&self) -> crate::supervise::Instance {
        crate::supervise::Instance::in_dir(self.dir.clone(), &LAYOUT)
    }
    /// Recorded config.
    pub fn config(&self) -> PathBuf {
        self.instance().config()
    }
    /// Shim state.
    pub fn state(&self) -> PathBuf {
        self.instance().state()
    }
    /// Control socket.
    pub fn socket(&self) -> PathBuf {
        self.instance().socket()
    }
    /// Console log (ring-buffered).
    pub fn console_log(&self) -> PathBuf {
        self.instance().console_log()
    }
    /// Shim's own log.
    pub fn shim_log(&self) -> PathBuf {
        self.instance().log()
    }
    /// flock held by the live shim (no duplicate shims).
    pub fn lock(&self) -> PathBuf {
        self.instance().lock_path()
    }
    /// Overlay mount point.
    pub fn rootfs_mount(&self) -> PathBuf {
        self.dir.join("rootfs")
    }
}

/// Reads and parses a JSON file; `Ok(None)` when it does not exist.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, DriverError> {
    match fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| DriverError::Other(format!("parse {}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(DriverError::io(format!("read {}", path.display()), e)),
    }
}

/// Writes a value as pretty JSON, atomically and durably, mode 0600
/// ([`crate::storage::fsutil::write_atomic`]).
pub fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<(), DriverError> {
    let data = serde_json::to_vec_pretty(v)
        .map_err(|e| DriverError::Other(format!("serialize {}: {e}", path.display())))?;
    crate::storage::fsutil::write_atomic(path, &data)
}

/// Host-end veth name for interface `idx` of container `name` (≤ 15 bytes, stable).
pub fn host_veth_name(name: &str, idx: usize) -> String {
    // FNV-1a: short, stable, no dependency.
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("vs{h:08x}i{idx}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_files_with_the_same_stem_do_not_share_a_temp_file() {
        // a.json and a.yaml used to be written through the same a.tmp: concurrent writers
        // renamed each other's content into place (or found their temp gone).
        let d = tempfile::tempdir().expect("tempdir");
        let writer = |name: &'static str| {
            let path = d.path().join(name);
            move || {
                for i in 0..300u32 {
                    write_json(&path, &(name, i)).expect("write");
                    let got: (String, u32) = read_json(&path).expect("read").expect("exists");
                    assert_eq!(got.0, name, "{name} holds another file's content");
                }
            }
        };
        std::thread::scope(|s| {
            let a = s.spawn(writer("a.json"));
            let b = s.spawn(writer("a.yaml"));
            a.join().expect("a.json writer");
            b.join().expect("a.yaml writer");
        });
    }

    #[test]
    fn veth_names_fit_and_differ() {
        let a = host_veth_name("web", 0);
        let b = host_veth_name("web2", 0);
        assert!(a.len() <= 15 && b.len() <= 15);
        assert_ne!(a, b);
        assert_eq!(a, host_veth_name("web", 0));
        assert_ne!(a, host_veth_name("web", 1));
    }

    #[test]
    fn exit_failure() {
        let e = |code, signal| ExitInfo {
            code,
            signal,
            at: String::new(),
        };
        assert!(!e(Some(0), None).failed());
        assert!(e(Some(1), None).failed());
        assert!(e(None, Some(9)).failed());
    }
}
