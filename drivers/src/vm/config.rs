//! What the VM driver hands to `stead vmm` (`config.json`), what the supervisor reports
//! (`supervisor.json`), and the file layout of a VM's run directory.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use stead_schema::{MacAddr, RestartPolicy};

/// Files of VM `name` under `<run_dir>/vms/<name>/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// The directory.
    pub dir: PathBuf,
}

/// The file names of a VM's run directory (the on-disk format of `stead vmm`).
pub static LAYOUT: crate::supervise::Layout = crate::supervise::Layout {
    kind_dir: "vms",
    state: "supervisor.json",
    lock: "supervisor.lock",
    socket: "control.sock",
    log: "vmm.log",
    console_log: "console.log",
};

impl Paths {
    /// Paths of VM `name` under `run_dir`.
    pub fn new(run_dir: &Path, name: &str) -> Self {
        Paths {
            dir: vms_dir(run_dir).join(name),
        }
    }
    /// The supervised instance these files belong to.
    pub fn instance(&self) -> crate::supervise::Instance {
        crate::supervise::Instance::in_dir(self.dir.clone(), &LAYOUT)
    }
    /// The configuration the supervisor runs ([`VmRunConfig`]).
    pub fn config(&self) -> PathBuf {
        self.instance().config()
    }
    /// The supervisor's state ([`SupervisorState`]).
    pub fn supervisor_state(&self) -> PathBuf {
        self.instance().state()
    }
    /// The VMM's own state file (written by `stead_vmm`).
    pub fn vmm_state(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    /// The VMM's control socket.
    pub fn control_socket(&self) -> PathBuf {
        self.instance().socket()
    }
    /// The VMM's serial console socket.
    pub fn console_socket(&self) -> PathBuf {
        self.dir.join("console.sock")
    }
    /// Serial output, size-capped (oldest half dropped past [`crate::supervise::console::LOG_CAP`]).
    pub fn console_log(&self) -> PathBuf {
        self.instance().console_log()
    }
    /// The supervisor's and VMM's own stdout/stderr.
    pub fn vmm_log(&self) -> PathBuf {
        self.instance().log()
    }
    /// `flock` held by the live supervisor.
    pub fn lock(&self) -> PathBuf {
        self.instance().lock_path()
    }
    /// QEMU engine: the QMP socket (one client at a time: the supervisor, or a short-lived
    /// connection of the driver or the backup runner).
    pub fn qmp_socket(&self) -> PathBuf {
        self.qemu_dir().join("qmp.sock")
    }
    /// QEMU engine: the guest agent's virtio-serial socket.
    pub fn qga_socket(&self) -> PathBuf {
        self.qemu_dir().join("qga.sock")
    }
    /// QEMU engine: the VNC display's unix socket.
    pub fn vnc_socket(&self) -> PathBuf {
        self.qemu_dir().join("vnc.sock")
    }
    /// QEMU engine: the directory of the sockets QEMU listens on, owned by the user QEMU
    /// runs as (mode 0700).
    pub fn qemu_dir(&self) -> PathBuf {
        self.dir.join("qemu")
    }
    /// The cloud-init NoCloud seed image (`cidata` ISO) generated from the manifest.
    pub fn seed_iso(&self) -> PathBuf {
        self.dir.join("seed.iso")
    }
}

/// `<run_dir>/vms`.
pub fn vms_dir(run_dir: &Path) -> PathBuf {
    run_dir.join(LAYOUT.kind_dir)
}

/// A disk as the VMM opens it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskRun {
    /// Volume name.
    pub volume: String,
    /// Raw file or block device.
    pub path: PathBuf,
    /// Read-only attachment.
    pub read_only: bool,
}

/// A network interface as the VMM opens it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceRun {
    /// Network (bridge) name.
    pub network: String,
    /// Persistent tap device on that bridge.
    pub tap: String,
    /// Guest MAC.
    pub mac: String,
}

/// Everything `stead vmm` needs to run (and re-run) one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmRunConfig {
    /// VM name.
    pub name: String,
    /// vCPUs.
    pub cpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initrd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line as declared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// Disks in order.
    #[serde(default)]
    pub disks: Vec<DiskRun>,
    /// Interfaces in order.
    #[serde(default)]
    pub interfaces: Vec<InterfaceRun>,
    /// Restart policy applied by the supervisor.
    pub restart_policy: RestartPolicy,
    /// Whether the VM should run (`false`: the config is recorded, nothing runs).
    pub running: bool,
    /// Cgroup parent (`--cgroup-parent`); the VM's cgroup is `<parent>/vm-<name>`.
    pub cgroup_parent: String,
    /// Network namespace holding the taps (`--netns`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// Graceful shutdown time before the VM is forced off, in seconds.
    pub shutdown_timeout_secs: u64,
    /// The node's fence deadline file an HA VM must not outlive (cluster; see
    /// `stead_host::fence`); `None`: not watched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence_file: Option<PathBuf>,
}

/// Phase of a supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// First boot under way.
    Starting,
    /// A VMM child runs the VM.
    Running,
    /// The VMM stopped; the next boot waits for its backoff.
    Restarting,
    /// Stopped on request (`SIGTERM` from the driver).
    Stopped,
    /// The VMM stopped and the restart policy says not to restart.
    Exited,
    /// Killed because the node's fence deadline passed (cluster HA); the supervisor has
    /// exited. The node's agent starts it again once it owns the VM again.
    Fenced,
}

/// `supervisor.json`, written atomically by the supervisor on every change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SupervisorState {
    /// Supervisor pid.
    pub supervisor_pid: i32,
    /// Pid of the current VMM child (the process running the VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm_pid: Option<i32>,
    /// Phase.
    pub phase: Phase,
    /// Restarts since the VM was first started (kept across supervisors).
    pub restarts: u64,
    /// When the current boot started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// How the previous VMM ended (`shutdown`, `reset`, `killed`, `error`, `signal 9`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
    /// Last error of a failed start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Cgroup name of VM `name` (below the cgroup parent).
pub fn cgroup_name(name: &str) -> String {
    format!("vm-{name}")
}

fn fnv1a(s: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// Tap name of interface `idx` of VM `name` (≤ 15 bytes, stable).
pub fn tap_name(name: &str, idx: usize) -> String {
    format!("tv{:08x}i{idx}", fnv1a(name))
}

/// Where the host's machine id is read from (the salt of generated MACs).
pub const MACHINE_ID_PATH: &str = "/etc/machine-id";

/// The salt of generated MACs on this host: the trimmed content of `machine_id`
/// (normally [`MACHINE_ID_PATH`]), or the hostname when that file is missing or empty.
/// Stable for the life of the host; differs between hosts.
pub fn host_salt(machine_id: &Path) -> String {
    match fs::read_to_string(machine_id) {
        Ok(s) if !s.trim().is_empty() => format!("machine-id:{}", s.trim()),
        _ => {
            let host = nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default();
            tracing::warn!(
                path = %machine_id.display(),
                "no machine id: generated MACs are salted with the hostname"
            );
            format!("hostname:{host}")
        }
    }
}

/// This host's MAC salt ([`host_salt`] of [`MACHINE_ID_PATH`]), read once per process.
fn this_host_salt() -> &'static str {
    static SALT: OnceLock<String> = OnceLock::new();
    SALT.get_or_init(|| host_salt(Path::new(MACHINE_ID_PATH)))
}

/// Stable locally administered unicast MAC for interface `idx` of VM `name` on this
/// host: [`generated_mac_salted`] with this host's [`host_salt`], so the same VM name on
/// two hosts (e.g. joined by a VXLAN network) gets different MACs.
pub fn generated_mac(name: &str, idx: usize) -> MacAddr {
    generated_mac_salted(this_host_salt(), name, idx)
}

/// Stable MAC for interface `idx` of Container `name` on this host (a container
/// interface without `mac`): like [`generated_mac`], in a namespace of its own so a
/// container and a VM of the same name differ.
pub fn generated_container_mac(name: &str, idx: usize) -> MacAddr {
    generated_mac_salted(this_host_salt(), &format!("Container/{name}"), idx)
}

/// The MAC of interface `idx` of VM `name` under `salt`: the first six bytes of
/// SHA-256 over (salt, name, index), with the multicast bit cleared and the locally
/// administered bit set in the first octet.
pub fn generated_mac_salted(salt: &str, name: &str, idx: usize) -> MacAddr {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for part in [salt.as_bytes(), name.as_bytes(), idx.to_string().as_bytes()] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    let d = h.finalize();
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&d[..6]);
    mac[0] = (mac[0] & !0x01) | 0x02;
    MacAddr(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_and_differ() {
        let a = tap_name("vm1", 0);
        let b = tap_name("vm1", 1);
        let c = tap_name("vm2", 0);
        assert!(a.len() <= 15, "{a}");
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a, tap_name("vm1", 0));
    }

    #[test]
    fn generated_macs_are_stable_local_unicast() {
        let m = generated_mac("web", 0);
        assert_eq!(m, generated_mac("web", 0));
        assert_ne!(m, generated_mac("web", 1));
        assert_ne!(m, generated_mac("db", 0));
        assert_eq!(m.0[0] & 0x01, 0, "unicast");
        assert_eq!(m.0[0] & 0x02, 0x02, "locally administered");
    }

    #[test]
    fn generated_macs_are_salted_with_the_machine_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::write(&a, "0123456789abcdef0123456789abcdef\n").expect("write a");
        fs::write(&b, "fedcba9876543210fedcba9876543210\n").expect("write b");
        let (sa, sb) = (host_salt(&a), host_salt(&b));
        assert_eq!(sa, host_salt(&a), "stable per host");
        // The same VM name on two hosts: different MACs.
        let (ma, mb) = (
            generated_mac_salted(&sa, "web", 0),
            generated_mac_salted(&sb, "web", 0),
        );
        assert_ne!(ma, mb);
        assert_eq!(ma, generated_mac_salted(&host_salt(&a), "web", 0));
        for m in [ma, mb] {
            assert_eq!(m.0[0] & 0x01, 0, "unicast: {m}");
            assert_eq!(m.0[0] & 0x02, 0x02, "locally administered: {m}");
        }
        // Missing or empty machine id: the hostname, still stable.
        let missing = dir.path().join("none");
        fs::write(dir.path().join("empty"), "\n").expect("write empty");
        let host = host_salt(&missing);
        assert!(host.starts_with("hostname:"), "{host}");
        assert_eq!(host, host_salt(&dir.path().join("empty")));
        assert_ne!(generated_mac_salted(&host, "web", 0), ma);
        // Containers have their own namespace: same name, different MAC.
        assert_ne!(generated_container_mac("web", 0), generated_mac("web", 0));
        assert_eq!(
            generated_container_mac("web", 0),
            generated_container_mac("web", 0)
        );
        assert_eq!(generated_container_mac("web", 0).0[0] & 0x03, 0x02);
        // Salt, name and index are framed: moving bytes between them changes the MAC.
        assert_ne!(
            generated_mac_salted("ab", "c", 0),
            generated_mac_salted("a", "bc", 0)
        );
    }

    #[test]
    fn run_config_round_trips() {
        let c = VmRunConfig {
            name: "vm1".into(),
            cpus: 2,
            memory: 64 << 20,
            kernel: "/k".into(),
            initrd: None,
            cmdline: Some("mode=idle".into()),
            disks: vec![DiskRun {
                volume: "d".into(),
                path: "/p/d.raw".into(),
                read_only: true,
            }],
            interfaces: vec![],
            restart_policy: RestartPolicy::OnFailure,
            running: true,
            cgroup_parent: "stead".into(),
            netns: None,
            shutdown_timeout_secs: 10,
            fence_file: None,
        };
        let s = serde_json::to_string(&c).expect("json");
        assert!(s.contains("\"restartPolicy\":\"on-failure\""), "{s}");
        let back: VmRunConfig = serde_json::from_str(&s).expect("parse");
        assert_eq!(back, c);
    }
}
