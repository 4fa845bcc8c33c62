//! Quiescing a running qemu-engine VM for a snapshot of its disks: the guest agent
//! freezes the guest's file systems when the VM has one and it answers (application-
//! consistent), then QMP `stop` pauses the vCPUs and drains and flushes every block device
//! (the disk files hold one point in time); [`release`] does `cont`, then the thaw (the
//! agent runs in the guest, so it can only thaw a running VM).
//!
//! The same contract as the vmm engine's pause through its control socket: the caller
//! copies the disks between [`quiesce`] and [`release`].

use std::time::{Duration, Instant};

use stead_reconciler::driver::DriverError;
use tracing::{info, warn};

use super::config::QemuConfig;
use super::qga::Qga;
use super::qmp::{self, Qmp};

/// Longest wait for QEMU's QMP socket.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the guest agent's first answer (a guest without a running agent
/// costs this once, then the VM is only paused).
const AGENT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest wait for the guest to flush and freeze its file systems.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(60);

/// How a VM was quiesced (what [`release`] undoes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quiesced {
    /// File systems the guest agent froze; `None` when it did not (no agent, or it did
    /// not answer: the snapshot is crash-consistent, the VM paused).
    pub frozen: Option<u64>,
    /// Why the agent did not freeze, when the VM has one.
    pub agent_note: Option<String>,
}

impl Quiesced {
    /// What the guest agent did, for the operator: `guest agent froze N file systems`,
    /// or why it did not (`None` for a VM without an agent).
    pub fn agent_report(&self) -> Option<String> {
        match (self.frozen, &self.agent_note) {
            (Some(n), _) => Some(format!("guest agent froze {n} file systems")),
            (None, Some(note)) => Some(format!("crash-consistent: {note}")),
            (None, None) => None,
        }
    }
}

fn qmp_err(name: &str, what: &str, e: impl std::fmt::Display) -> DriverError {
    DriverError::Other(format!("{what} VM {name}: {e}"))
}

/// The VM's run state from QMP `query-status` (`running`, `paused`, …); `None` when QEMU
/// does not answer within `timeout`.
pub fn run_state(cfg: &QemuConfig, timeout: Duration) -> Option<String> {
    let mut q = Qmp::connect(&cfg.sockets.qmp, timeout).ok()?;
    Some(word(q.query_status().ok()?.status))
}

fn word(s: qmp::RunState) -> String {
    match s {
        qmp::RunState::Running => "running".into(),
        qmp::RunState::Paused => "paused".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Pauses the VM (QMP `stop`: vCPUs stopped, block I/O drained and flushed).
pub fn pause(cfg: &QemuConfig) -> Result<(), DriverError> {
    let mut q =
        Qmp::connect(&cfg.sockets.qmp, QMP_TIMEOUT).map_err(|e| qmp_err(&cfg.name, "pause", e))?;
    stop(&mut q, &cfg.name)
}

fn stop(q: &mut Qmp, name: &str) -> Result<(), DriverError> {
    q.execute(&qmp::Stop)
        .map_err(|e| qmp_err(name, "pause", e))?;
    match q.query_status() {
        Ok(s) if s.status == qmp::RunState::Paused => Ok(()),
        Ok(s) => Err(qmp_err(
            name,
            "pause",
            format!("QEMU reports {}", word(s.status)),
        )),
        Err(e) => Err(qmp_err(name, "pause", e)),
    }
}

/// Resumes a paused VM (QMP `cont`).
pub fn resume(cfg: &QemuConfig) -> Result<(), DriverError> {
    let mut q =
        Qmp::connect(&cfg.sockets.qmp, QMP_TIMEOUT).map_err(|e| qmp_err(&cfg.name, "resume", e))?;
    q.execute(&qmp::Cont)
        .map(|_| ())
        .map_err(|e| qmp_err(&cfg.name, "resume", e))
}

/// Freezes the guest's file systems through its agent; `Err` says why not (the caller
/// goes on with a pause alone).
fn freeze(cfg: &QemuConfig) -> Result<u64, String> {
    let mut a = Qga::connect(&cfg.sockets.qga, AGENT_TIMEOUT)
        .map_err(|e| format!("guest agent not answering: {e}"))?;
    match a.fsfreeze_freeze(FREEZE_TIMEOUT) {
        Ok(n) => Ok(n),
        Err(e) => {
            // A partial freeze must not stay.
            let _ = a.fsfreeze_thaw();
            Err(format!("guest agent freeze failed: {e}"))
        }
    }
}

fn thaw(cfg: &QemuConfig) -> Result<u64, DriverError> {
    Qga::connect(&cfg.sockets.qga, AGENT_TIMEOUT)
        .and_then(|mut a| a.fsfreeze_thaw())
        .map_err(|e| qmp_err(&cfg.name, "thaw", e))
}

/// Quiesces running VM `cfg` for a snapshot: agent freeze when it answers, then pause.
pub fn quiesce(cfg: &QemuConfig) -> Result<Quiesced, DriverError> {
    let t = Instant::now();
    let mut q = Qmp::connect(&cfg.sockets.qmp, QMP_TIMEOUT)
        .map_err(|e| qmp_err(&cfg.name, "quiesce", e))?;
    let (frozen, agent_note) = if cfg.agent {
        match freeze(cfg) {
            Ok(n) => (Some(n), None),
            Err(note) => {
                warn!(vm = %cfg.name, "{note}: the snapshot is crash-consistent");
                (None, Some(note))
            }
        }
    } else {
        (None, None)
    };
    if let Err(e) = stop(&mut q, &cfg.name) {
        if frozen.is_some() {
            let _ = thaw(cfg);
        }
        return Err(e);
    }
    let held = Quiesced { frozen, agent_note };
    info!(vm = %cfg.name, agent = ?held.agent_report(), ms = t.elapsed().as_millis() as u64, "VM paused");
    Ok(held)
}

/// Undoes [`quiesce`]: `cont`, then the agent's thaw. Both are tried; the first error is
/// returned.
pub fn release(cfg: &QemuConfig, held: &Quiesced) -> Result<(), DriverError> {
    let resumed = resume(cfg);
    let thawed = match held.frozen {
        Some(_) => thaw(cfg).map(|_| ()),
        None => Ok(()),
    };
    resumed.and(thawed)
}
