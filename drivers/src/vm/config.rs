//! What the VM driver hands to `stead vmm` (`config.json`), what the supervisor reports
//! (`supervisor.json`), and the file layout of a VM's run directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use stead_schema::{MacAddr, RestartPolicy};

/// Files of VM `name` under `<run_dir>/vms/<name>/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// The directory.
    pub dir: PathBuf,
}

impl Paths {
    /// Paths of VM `name` under `run_dir`.
    pub fn new(run_dir: &Path, name: &str) -> Self {
        Paths {
            dir: vms_dir(run_dir).join(name),
        }
    }
    /// The configuration the supervisor runs ([`VmRunConfig`]).
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }
    /// The supervisor's state ([`SupervisorState`]).
    pub fn supervisor_state(&self) -> PathBuf {
        self.dir.join("supervisor.json")
    }
    /// The VMM's own state file (written by `stead_vmm`).
    pub fn vmm_state(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    /// The VMM's control socket.
    pub fn control_socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }
    /// The VMM's serial console socket.
    pub fn console_socket(&self) -> PathBuf {
        self.dir.join("console.sock")
    }
    /// Serial output, size-capped (oldest half dropped past [`super::supervisor::LOG_CAP`]).
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// The supervisor's and VMM's own stdout/stderr.
    pub fn vmm_log(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }
    /// `flock` held by the live supervisor.
    pub fn lock(&self) -> PathBuf {
        self.dir.join("supervisor.lock")
    }
}

/// `<run_dir>/vms`.
pub fn vms_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("vms")
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

/// Stable locally administered unicast MAC for interface `idx` of VM `name`:
/// `52:54:xx:xx:xx:xx`-like but with the locally administered bit (`0x02`) set in the
/// first octet (`56:`), derived from a hash of the name and index.
pub fn generated_mac(name: &str, idx: usize) -> MacAddr {
    let h = fnv1a(&format!("{name}/{idx}")).to_be_bytes();
    let h2 = fnv1a(&format!("{idx}/{name}")).to_be_bytes();
    MacAddr([0x56, h2[0], h[0], h[1], h[2], h[3]])
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
        };
        let s = serde_json::to_string(&c).expect("json");
        assert!(s.contains("\"restartPolicy\":\"on-failure\""), "{s}");
        let back: VmRunConfig = serde_json::from_str(&s).expect("parse");
        assert_eq!(back, c);
    }
}
