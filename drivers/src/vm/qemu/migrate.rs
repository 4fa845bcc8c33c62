//! Live migration of a running QEMU VM over TCP (QMP `migrate`).
//!
//! Both ends run QEMU from the same [`super::config::QemuConfig`] (same machine type,
//! devices and RAM): the target starts with `-incoming defer`
//! ([`super::config::QemuConfig::incoming`]) and waits in run state `inmigrate` until
//! [`listen_incoming`] has it listen on an address its node picks; the source then runs
//! [`migrate_out`], which sets the capabilities and parameters both sides need
//! ([`capabilities`], [`MigrateOptions`]), starts `migrate` and polls `query-migrate`,
//! reporting [`Progress`] (status, RAM transferred and remaining, expected downtime) until
//! `completed`. On a failure, a timeout or an error the outgoing migration is cancelled
//! (`migrate_cancel`) and the source guest is left running ([`ensure_running`]): only
//! `completed` ends the source's ownership of the guest.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use std::path::PathBuf;

use stead_reconciler::driver::DriverError;

use super::config::{QemuConfig, QemuDisk};
use super::mirror::{self, DiskCopy, MirrorError, NbdTarget};
use super::qmp::{Cont, Empty, Qmp, QmpCommand, QmpError, RunState};
use super::supervisor::QemuState;
use crate::container::config::{read_json, write_json};
use crate::vm::config::Paths;

/// Errors of a migration.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// A QMP exchange failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// QEMU reported the migration failed (its `error-desc`).
    #[error("migration failed: {0}")]
    Failed(String),
    /// The migration was cancelled (by QEMU or another client).
    #[error("migration was cancelled")]
    Cancelled,
    /// The migration did not complete in time (it was cancelled).
    #[error("migration did not complete within {0:?} (cancelled)")]
    TimedOut(Duration),
    /// The guest is not in the run state the step needs.
    #[error("{0}")]
    State(String),
    /// The disk copy failed.
    #[error(transparent)]
    Disk(#[from] MirrorError),
}

/// How an outgoing migration runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateOptions {
    /// Time allowed from `migrate` to `completed`; past it the migration is cancelled.
    pub timeout: Duration,
    /// How often `query-migrate` is polled (and progress reported).
    pub poll: Duration,
    /// Longest pause of the guest QEMU may plan for the final copy, in milliseconds.
    pub downtime_limit_ms: u64,
    /// Bandwidth cap in bytes per second (set on every migration: QEMU keeps the last
    /// value it was given).
    pub max_bandwidth: u64,
    /// Throttle the guest's vCPUs when it dirties RAM faster than it can be sent (TCG
    /// guests are slow to copy; this bounds the number of rounds).
    pub auto_converge: bool,
    /// Pause before the device state moves (`pause-before-switchover`): set by
    /// [`migrate_out_disks`], which completes the disk copy in that pause.
    pub pause_before_switchover: bool,
}

/// The default bandwidth cap: QEMU's own default, 128 MiB/s (about a 1 Gbit/s link).
pub const DEFAULT_MAX_BANDWIDTH: u64 = 128 << 20;

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            timeout: Duration::from_secs(300),
            poll: Duration::from_millis(250),
            downtime_limit_ms: 300,
            max_bandwidth: DEFAULT_MAX_BANDWIDTH,
            auto_converge: true,
            pause_before_switchover: false,
        }
    }
}

/// One migration capability and whether it is on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CapabilityState {
    /// The capability (`events`, `auto-converge`, …).
    pub capability: String,
    /// On or off.
    pub state: bool,
}

/// `migrate-set-capabilities`.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateSetCapabilities {
    /// The capabilities to set.
    pub capabilities: Vec<CapabilityState>,
}
impl QmpCommand for MigrateSetCapabilities {
    const NAME: &'static str = "migrate-set-capabilities";
    type Ret = Empty;
}

/// `migrate-set-parameters` (only the parameters stead sets).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrateSetParameters {
    /// Longest planned pause, in milliseconds.
    pub downtime_limit: u64,
    /// Bandwidth cap in bytes per second.
    pub max_bandwidth: u64,
}
impl QmpCommand for MigrateSetParameters {
    const NAME: &'static str = "migrate-set-parameters";
    type Ret = Empty;
}

/// `migrate-incoming`: a target started with `-incoming defer` listens on `uri`.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateIncoming {
    /// `tcp:HOST:PORT` (port 0: QEMU picks one, see [`MigrationInfo::socket_address`]).
    pub uri: String,
}
impl QmpCommand for MigrateIncoming {
    const NAME: &'static str = "migrate-incoming";
    type Ret = Empty;
}

/// `migrate`: starts an outgoing migration to `uri`.
#[derive(Debug, Clone, Serialize)]
pub struct Migrate {
    /// `tcp:HOST:PORT` of the listening target.
    pub uri: String,
}
impl QmpCommand for Migrate {
    const NAME: &'static str = "migrate";
    type Ret = Empty;
}

/// `migrate-continue`: ends the pause of `pause-before-switchover`.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateContinue {
    /// The status being left (`pre-switchover`).
    pub state: &'static str,
}
impl QmpCommand for MigrateContinue {
    const NAME: &'static str = "migrate-continue";
    type Ret = Empty;
}

/// `query-migrate`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryMigrate;
impl QmpCommand for QueryMigrate {
    const NAME: &'static str = "query-migrate";
    type Ret = MigrationInfo;
}

/// `migrate_cancel`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct MigrateCancel;
impl QmpCommand for MigrateCancel {
    const NAME: &'static str = "migrate_cancel";
    type Ret = Empty;
}

/// A migration's status (`query-migrate`, event `MIGRATION`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    /// No migration ran.
    None,
    /// Setting up.
    Setup,
    /// Being cancelled.
    Cancelling,
    /// Cancelled.
    Cancelled,
    /// Copying RAM and devices.
    Active,
    /// Stopped for the final copy of devices.
    Device,
    /// Waiting before the switch-over.
    PreSwitchover,
    /// Done: the target runs the guest.
    Completed,
    /// Failed.
    Failed,
    /// A status this client does not act on (postcopy, COLO, …).
    #[serde(other)]
    Other,
}

impl MigrationStatus {
    /// Whether the migration has ended (completed, failed or cancelled).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        )
    }
}

/// RAM counters of a migration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RamStats {
    /// Bytes sent so far.
    #[serde(default)]
    pub transferred: u64,
    /// Bytes still dirty.
    #[serde(default)]
    pub remaining: u64,
    /// Guest RAM in bytes.
    #[serde(default)]
    pub total: u64,
    /// Rounds over the dirty bitmap so far.
    #[serde(default)]
    pub dirty_sync_count: u64,
    /// Current throughput in Mbit/s.
    #[serde(default)]
    pub mbps: f64,
}

/// A listening socket of an incoming migration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SocketAddress {
    /// `inet`, `unix`, ….
    #[serde(rename = "type")]
    pub kind: String,
    /// The host of an `inet` socket.
    #[serde(default)]
    pub host: Option<String>,
    /// The port of an `inet` socket.
    #[serde(default)]
    pub port: Option<String>,
}

/// `query-migrate` reply.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// The status (absent before any migration).
    #[serde(default)]
    pub status: Option<MigrationStatus>,
    /// RAM counters (while active and once completed).
    #[serde(default)]
    pub ram: Option<RamStats>,
    /// Milliseconds since `migrate` (total once completed).
    #[serde(default)]
    pub total_time: Option<u64>,
    /// Milliseconds the guest was paused (once completed).
    #[serde(default)]
    pub downtime: Option<u64>,
    /// Downtime QEMU expects for the final copy, in milliseconds (while active).
    #[serde(default)]
    pub expected_downtime: Option<u64>,
    /// Percentage of vCPU throttling by auto-converge.
    #[serde(default)]
    pub cpu_throttle_percentage: Option<u64>,
    /// Why the migration failed.
    #[serde(default)]
    pub error_desc: Option<String>,
    /// Where an incoming migration listens (target side).
    #[serde(default)]
    pub socket_address: Vec<SocketAddress>,
}

/// A progress report of an outgoing migration.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Time since `migrate`.
    pub elapsed: Duration,
    /// The status.
    pub status: MigrationStatus,
    /// RAM sent so far, in bytes.
    pub transferred: u64,
    /// RAM still dirty, in bytes.
    pub remaining: u64,
    /// Guest RAM, in bytes.
    pub total: u64,
    /// Expected (while active) or actual (once completed) guest pause, in milliseconds.
    pub downtime_ms: Option<u64>,
    /// The disk copy, while it runs (before the RAM: `status` is then `setup`).
    pub disk: Option<DiskCopy>,
}

impl Progress {
    /// Reads a progress report from `query-migrate`.
    pub fn from_info(info: &MigrationInfo, elapsed: Duration) -> Self {
        let ram = info.ram.unwrap_or_default();
        let status = info.status.unwrap_or(MigrationStatus::None);
        let downtime_ms = if status == MigrationStatus::Completed {
            info.downtime
        } else {
            info.expected_downtime
        };
        Progress {
            elapsed,
            status,
            transferred: ram.transferred,
            remaining: ram.remaining,
            total: ram.total,
            downtime_ms,
            disk: None,
        }
    }

    /// A progress report of the disk copy (before the RAM migration starts).
    pub fn of_disks(copy: &DiskCopy, elapsed: Duration) -> Self {
        Progress {
            elapsed,
            status: MigrationStatus::Setup,
            transferred: 0,
            remaining: 0,
            total: 0,
            downtime_ms: None,
            disk: Some(*copy),
        }
    }

    /// Share of guest RAM already copied, 0–100 (100 once completed).
    pub fn ram_percent(&self) -> u8 {
        if self.status == MigrationStatus::Completed {
            return 100;
        }
        if self.total == 0 {
            return 0;
        }
        let done = self.total.saturating_sub(self.remaining.min(self.total));
        u8::try_from(done.saturating_mul(100) / self.total).unwrap_or(100)
    }
}

/// The result of a completed migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completed {
    /// Total time QEMU reports, in milliseconds.
    pub total_time_ms: u64,
    /// How long the guest was paused, in milliseconds.
    pub downtime_ms: u64,
    /// RAM bytes sent.
    pub transferred: u64,
}

/// What the poll loop does after one `query-migrate`.
#[derive(Debug)]
enum Step {
    /// Keep polling.
    Wait,
    /// Done.
    Done(Completed),
    /// Ended without completing.
    Fail(MigrateError),
    /// Took too long: cancel.
    Cancel,
}

/// Decides the next step from one `query-migrate` reply.
fn next_step(info: &MigrationInfo, elapsed: Duration, timeout: Duration) -> Step {
    match info.status {
        Some(MigrationStatus::Completed) => Step::Done(Completed {
            total_time_ms: info.total_time.unwrap_or(0),
            downtime_ms: info.downtime.unwrap_or(0),
            transferred: info.ram.map(|r| r.transferred).unwrap_or(0),
        }),
        Some(MigrationStatus::Failed) => Step::Fail(MigrateError::Failed(
            info.error_desc
                .clone()
                .unwrap_or_else(|| "no reason given".into()),
        )),
        Some(MigrationStatus::Cancelled) => Step::Fail(MigrateError::Cancelled),
        _ if elapsed >= timeout => Step::Cancel,
        _ => Step::Wait,
    }
}

/// The capabilities both ends set: `events` (the `MIGRATION` event) and, on the source,
/// `auto-converge`.
pub fn capabilities(opts: &MigrateOptions) -> Vec<CapabilityState> {
    let cap = |name: &str, state| CapabilityState {
        capability: name.into(),
        state,
    };
    vec![
        cap("events", true),
        cap("auto-converge", opts.auto_converge),
        cap("pause-before-switchover", opts.pause_before_switchover),
    ]
}

/// `tcp:HOST:PORT` (IPv6 hosts bracketed).
pub fn tcp_uri(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("tcp:[{host}]:{port}")
    } else {
        format!("tcp:{host}:{port}")
    }
}

/// Target side: has QEMU (started with `-incoming defer`, run state `inmigrate`) listen
/// on `host` (port 0: QEMU picks one) and returns the `tcp:` URI the source migrates to.
#[tracing::instrument(level = "info", skip(qmp))]
pub fn listen_incoming(qmp: &mut Qmp, host: &str, port: u16) -> Result<String, MigrateError> {
    let st = qmp.query_status()?;
    if st.status != RunState::Inmigrate {
        return Err(MigrateError::State(format!(
            "the target QEMU is {:?}, not waiting for a migration (started without -incoming defer?)",
            st.status
        )));
    }
    qmp.execute(&MigrateSetCapabilities {
        capabilities: capabilities(&MigrateOptions::default()),
    })?;
    qmp.execute(&MigrateIncoming {
        uri: tcp_uri(host, port),
    })?;
    let info = qmp.execute(&QueryMigrate)?;
    let bound = info
        .socket_address
        .iter()
        .find_map(|s| s.port.as_deref()?.parse::<u16>().ok())
        .unwrap_or(port);
    if bound == 0 {
        return Err(MigrateError::State(
            "QEMU did not report the port it listens on".into(),
        ));
    }
    Ok(tcp_uri(host, bound))
}

/// Target side: waits until the incoming migration has completed: the guest is here,
/// running (QEMU started without `-S`) or paused until [`resume_incoming`] (with `-S`, as
/// the driver starts a target). A failed incoming migration is an error.
pub fn wait_incoming(qmp: &mut Qmp, timeout: Duration) -> Result<(), MigrateError> {
    let deadline = Instant::now() + timeout;
    loop {
        if holds_guest(qmp)? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(MigrateError::TimedOut(timeout));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Target side: whether the incoming migration has completed (the guest is here, running
/// or paused); false while it still waits; an error for a state a target never reaches.
fn holds_guest(qmp: &mut Qmp) -> Result<bool, MigrateError> {
    let st = qmp.query_status()?;
    match st.status {
        RunState::Running => Ok(true),
        RunState::Inmigrate | RunState::Prelaunch => Ok(false),
        RunState::Paused => {
            let info = qmp.execute(&QueryMigrate)?;
            match info.status {
                Some(MigrationStatus::Completed) => Ok(true),
                Some(MigrationStatus::Failed) => Err(MigrateError::Failed(
                    info.error_desc
                        .unwrap_or_else(|| "the incoming migration failed".into()),
                )),
                _ => Ok(false),
            }
        }
        other => Err(MigrateError::State(format!(
            "the target QEMU is {other:?} after the migration"
        ))),
    }
}

/// Target side, once the incoming migration has completed: closes the disk copy's NBD
/// exports (none is fine) and only then starts the guest (`cont`): the guest never runs
/// while a client could still write its disk.
#[tracing::instrument(level = "info", skip(qmp))]
pub fn resume_incoming(qmp: &mut Qmp) -> Result<(), MigrateError> {
    mirror::close_exports(qmp)?;
    if qmp.query_status()?.status != RunState::Running {
        qmp.execute(&Cont)?;
    }
    let st = qmp.query_status()?;
    if st.status != RunState::Running {
        return Err(MigrateError::State(format!(
            "the target QEMU is {:?} after cont",
            st.status
        )));
    }
    Ok(())
}

/// Source side: migrates the running guest to `uri`, calling `progress` after every poll.
/// On `completed` the guest runs on the target and this QEMU is in `postmigrate` (the
/// caller quits it). On any failure the migration is cancelled and the guest keeps
/// running here.
#[tracing::instrument(level = "info", skip(qmp, opts, progress))]
pub fn migrate_out(
    qmp: &mut Qmp,
    uri: &str,
    opts: &MigrateOptions,
    mut progress: impl FnMut(&Progress),
) -> Result<Completed, MigrateError> {
    migrate_out_until(qmp, uri, opts, |p| {
        progress(p);
        true
    })
}

/// [`migrate_out`] whose `progress` may cancel it by returning false (the migration is
/// cancelled and the guest left running here, [`MigrateError::Cancelled`]).
pub fn migrate_out_until(
    qmp: &mut Qmp,
    uri: &str,
    opts: &MigrateOptions,
    mut progress: impl FnMut(&Progress) -> bool,
) -> Result<Completed, MigrateError> {
    check_running(qmp)?;
    let started = Instant::now();
    start_migrate(qmp, uri, opts)?;
    match poll_until_final(qmp, started, opts, &mut progress, &[]) {
        Ok(done) => Ok(done),
        Err(e) => match cancel_and_resume(qmp) {
            // It completed as it was being given up: the guest runs on the target.
            Some(done) => Ok(done),
            None => Err(e),
        },
    }
}

/// Source side, for a migration someone else started (an agent restarted while QEMU was
/// sending): follows it from its current `query-migrate` like [`migrate_out_until`] does
/// after `migrate`. `completed` (already, or while followed): the guest runs on the target
/// and this QEMU is in `postmigrate`. `failed`, `cancelled` or no migration at all: an
/// error with the reason, and the guest is resumed here if the migration left it paused.
#[tracing::instrument(level = "info", skip(qmp, opts, progress))]
pub fn follow_out(
    qmp: &mut Qmp,
    opts: &MigrateOptions,
    mut progress: impl FnMut(&Progress) -> bool,
) -> Result<Completed, MigrateError> {
    let info = qmp.execute(&QueryMigrate)?;
    if let Some(e) = nothing_to_follow(&info) {
        // A disk copy left without its migration (the sender was gone before `migrate`).
        let mirrors = mirror::running_mirrors(qmp);
        mirror::abort_mirrors(qmp, &mirrors);
        if let Err(r) = ensure_running(qmp) {
            tracing::warn!(error = %r, "resuming the guest after the migration ended");
        }
        return Err(e);
    }
    let mirrors = mirror::running_mirrors(qmp);
    let started = Instant::now();
    match poll_until_final(qmp, started, opts, &mut progress, &mirrors) {
        Ok(done) => Ok(done),
        Err(e) => match cancel_and_resume(qmp) {
            Some(done) => Ok(done),
            None => {
                mirror::abort_mirrors(qmp, &mirrors);
                Err(e)
            }
        },
    }
}

/// Source side: [`migrate_out_until`] for a VM whose disks the target does not share: each
/// disk node of `nodes` is first mirrored into the target's NBD export of the same name
/// ([`mirror`]; progress reports carry [`Progress::disk`]) until every copy is ready, then
/// the RAM moves with `pause-before-switchover`: in that pause (guest stopped) the mirrors
/// are completed, then the device state moves and the target runs the guest on its copy.
/// On any failure the migration and the mirrors are cancelled and the guest keeps running
/// here on its own disks.
#[tracing::instrument(level = "info", skip(qmp, opts, progress))]
pub fn migrate_out_disks(
    qmp: &mut Qmp,
    uri: &str,
    target: &NbdTarget,
    nodes: &[String],
    opts: &MigrateOptions,
    mut progress: impl FnMut(&Progress) -> bool,
) -> Result<Completed, MigrateError> {
    if nodes.is_empty() {
        return migrate_out_until(qmp, uri, opts, progress);
    }
    check_running(qmp)?;
    let started = Instant::now();
    mirror::start_mirrors(qmp, target, nodes)?;
    mirror::poll_mirrors(qmp, nodes, opts.poll, opts.timeout, |c| {
        progress(&Progress::of_disks(c, started.elapsed()))
    })?;
    let opts = MigrateOptions {
        pause_before_switchover: true,
        ..opts.clone()
    };
    let sent = start_migrate(qmp, uri, &opts)
        .and_then(|()| poll_until_final(qmp, started, &opts, &mut progress, nodes));
    match sent {
        Ok(done) => {
            mirror::delete_clients(qmp, nodes);
            Ok(done)
        }
        Err(e) => match cancel_and_resume(qmp) {
            Some(done) => Ok(done),
            None => {
                mirror::abort_mirrors(qmp, nodes);
                Err(e)
            }
        },
    }
}

/// Fails unless the source guest runs.
fn check_running(qmp: &mut Qmp) -> Result<(), MigrateError> {
    let st = qmp.query_status()?;
    if st.status != RunState::Running {
        return Err(MigrateError::State(format!(
            "the source QEMU is {:?}, not running",
            st.status
        )));
    }
    Ok(())
}

/// Sets the capabilities and parameters of `opts` and starts `migrate` to `uri`.
fn start_migrate(qmp: &mut Qmp, uri: &str, opts: &MigrateOptions) -> Result<(), MigrateError> {
    qmp.execute(&MigrateSetCapabilities {
        capabilities: capabilities(opts),
    })?;
    qmp.execute(&MigrateSetParameters {
        downtime_limit: opts.downtime_limit_ms,
        max_bandwidth: opts.max_bandwidth,
    })?;
    qmp.execute(&Migrate { uri: uri.into() })?;
    Ok(())
}

/// In the pause before the switch-over (guest stopped): completes the disk mirrors of
/// `mirrors`, then lets the device state move.
fn switch_over(qmp: &mut Qmp, mirrors: &[String]) -> Result<(), MigrateError> {
    mirror::complete_mirrors(qmp, mirrors, Duration::from_secs(60))?;
    qmp.execute(&MigrateContinue {
        state: "pre-switchover",
    })?;
    Ok(())
}

/// Why a `query-migrate` reply leaves no migration to follow (failed, cancelled, none),
/// `None` when there is one (under way or completed).
fn nothing_to_follow(info: &MigrationInfo) -> Option<MigrateError> {
    match info.status.unwrap_or(MigrationStatus::None) {
        MigrationStatus::None => Some(MigrateError::State(
            "QEMU has no outgoing migration (it never started)".into(),
        )),
        MigrationStatus::Failed | MigrationStatus::Cancelled => {
            match next_step(info, Duration::ZERO, Duration::MAX) {
                Step::Fail(e) => Some(e),
                _ => Some(MigrateError::Cancelled),
            }
        }
        _ => None,
    }
}

/// How many extra `query-migrate` a `completed` without times gets (20 ms apart).
const SETTLE_POLLS: u32 = 50;

/// Polls `query-migrate` until the migration ends or times out.
fn poll_until_final(
    qmp: &mut Qmp,
    started: Instant,
    opts: &MigrateOptions,
    progress: &mut impl FnMut(&Progress) -> bool,
    mirrors: &[String],
) -> Result<Completed, MigrateError> {
    let mut settle = 0;
    // The switch-over happens once: a `query-migrate` right after `migrate-continue` may
    // still say `pre-switchover` (the migration thread has not moved on yet).
    let mut switched = false;
    loop {
        let info = qmp.execute(&QueryMigrate)?;
        let elapsed = started.elapsed();
        if info.status == Some(MigrationStatus::PreSwitchover) {
            if !switched {
                switch_over(qmp, mirrors)?;
                switched = true;
            } else {
                std::thread::sleep(Duration::from_millis(10));
            }
            continue;
        }
        // Until the switch-over every mirror must stay in sync with the target: one that
        // failed or went fails the move (cancelled by the caller, the guest stays here).
        if !switched && !mirrors.is_empty() && !info.status.is_some_and(MigrationStatus::is_final) {
            mirror::check_ready(qmp, mirrors)?;
        }
        match next_step(&info, elapsed, opts.timeout) {
            // QEMU reports `completed` a moment before it has filled in the times.
            Step::Done(c) if c.total_time_ms == 0 && settle < SETTLE_POLLS => {
                settle += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Step::Wait => {
                if !progress(&Progress::from_info(&info, elapsed)) {
                    return Err(MigrateError::Cancelled);
                }
                pause(qmp, opts.poll, mirrors)?;
            }
            Step::Done(c) => {
                progress(&Progress::from_info(&info, elapsed));
                return Ok(c);
            }
            Step::Fail(e) => return Err(e),
            Step::Cancel => return Err(MigrateError::TimedOut(opts.timeout)),
        }
    }
}

/// Waits `poll` before the next `query-migrate`; with disk mirrors, a `MIGRATION` event
/// saying `pre-switchover` ends the wait at once (the guest is paused then: the sooner the
/// mirrors complete, the shorter the downtime).
fn pause(qmp: &mut Qmp, poll: Duration, mirrors: &[String]) -> Result<(), MigrateError> {
    if mirrors.is_empty() {
        std::thread::sleep(poll);
        return Ok(());
    }
    let at_switchover = |ev: &super::qmp::QmpEvent| {
        ev.data.get("status").and_then(serde_json::Value::as_str) == Some("pre-switchover")
    };
    match qmp.wait_event("MIGRATION", poll, at_switchover) {
        Ok(_) | Err(QmpError::Timeout { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// After a failed outgoing migration: cancels it if it still runs, waits for it to end and
/// resumes the guest if QEMU left it paused. A migration that completed meanwhile is
/// returned (the guest must not be resumed here: it runs on the target). Errors are logged
/// (best effort: the caller reports the migration's own error).
fn cancel_and_resume(qmp: &mut Qmp) -> Option<Completed> {
    match cancel(qmp, Duration::from_secs(10)) {
        Ok(MigrationStatus::Completed) => {
            tracing::warn!("the migration completed while it was being cancelled");
            let info = qmp.execute(&QueryMigrate).unwrap_or_default();
            return match next_step(&info, Duration::ZERO, Duration::MAX) {
                Step::Done(c) => Some(c),
                _ => Some(Completed {
                    total_time_ms: 0,
                    downtime_ms: 0,
                    transferred: 0,
                }),
            };
        }
        Ok(_) => {}
        Err(e) => {
            // State unknown: resuming could run the guest twice.
            tracing::warn!(error = %e, "cancelling the migration");
            return None;
        }
    }
    if let Err(e) = ensure_running(qmp) {
        tracing::warn!(error = %e, "resuming the guest after a failed migration");
    }
    None
}

/// `migrate_cancel`, then waits up to `timeout` for the migration to end.
pub fn cancel(qmp: &mut Qmp, timeout: Duration) -> Result<MigrationStatus, MigrateError> {
    let deadline = Instant::now() + timeout;
    loop {
        let status = qmp
            .execute(&QueryMigrate)?
            .status
            .unwrap_or(MigrationStatus::None);
        if status.is_final() || status == MigrationStatus::None {
            return Ok(status);
        }
        if status != MigrationStatus::Cancelling {
            qmp.execute(&MigrateCancel)?;
        }
        if Instant::now() >= deadline {
            return Err(MigrateError::TimedOut(timeout));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Resumes the guest when a failed migration left it paused (`cont`); a guest that runs is
/// left alone, and one in `postmigrate` (its migration completed: it runs on the target)
/// is refused.
pub fn ensure_running(qmp: &mut Qmp) -> Result<(), MigrateError> {
    let st = qmp.query_status()?;
    match st.status {
        RunState::Running => Ok(()),
        RunState::Paused | RunState::FinishMigrate => {
            qmp.execute(&Cont)?;
            Ok(())
        }
        other => Err(MigrateError::State(format!(
            "the source QEMU is {other:?} after the failed migration"
        ))),
    }
}

/// The file whose presence makes the driver start VM `paths` waiting for a migration
/// (`-incoming defer`) instead of booting it: written by a cluster node that is about to
/// receive the guest, removed by [`adopt_incoming_vm`] or [`abort_incoming_vm`].
pub fn incoming_marker(paths: &Paths) -> PathBuf {
    paths.dir.join("incoming")
}

/// Marks VM `paths` to start waiting for a migration (see [`incoming_marker`]).
pub fn expect_incoming(paths: &Paths) -> Result<(), DriverError> {
    std::fs::create_dir_all(&paths.dir)
        .map_err(|e| DriverError::io(format!("create {}", paths.dir.display()), e))?;
    let m = incoming_marker(paths);
    std::fs::write(&m, b"").map_err(|e| DriverError::io(format!("write {}", m.display()), e))
}

/// Whether the VM the driver is about to start waits for a migration: marked, and not
/// already running as an ordinary VM (a mark never turns a running guest into a target).
pub fn starts_incoming(paths: &Paths, running: Option<&QemuConfig>) -> bool {
    incoming_marker(paths).exists() && running.is_none_or(|c| c.incoming)
}

/// Target: has the waiting QEMU of VM `paths` listen on `host` (a port QEMU picks); the
/// `tcp:` URI the source sends to.
pub fn listen_vm(paths: &Paths, host: &str, timeout: Duration) -> Result<String, MigrateError> {
    let mut q = Qmp::connect_retry(&paths.qmp_socket(), timeout)?;
    listen_incoming(&mut q, host, 0)
}

/// Where a target waits for a guest: QEMU's migration URI and, when disks are copied
/// during the migration, the NBD server and the disk nodes it exports. One string in a
/// cluster's record ([`Incoming::encode`]): `tcp:HOST:PORT`, or
/// `tcp:HOST:PORT nbd://HOST:PORT disk0,disk1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// `tcp:HOST:PORT` of the migration stream.
    pub uri: String,
    /// The exports of the copied disks (none: every disk is shared).
    pub disks: Option<(NbdTarget, Vec<String>)>,
}

impl Incoming {
    /// The record's string.
    pub fn encode(&self) -> String {
        match &self.disks {
            Some((t, nodes)) => format!("{} {} {}", self.uri, t.server_uri(), nodes.join(",")),
            None => self.uri.clone(),
        }
    }

    /// Reads [`Incoming::encode`]'s string.
    pub fn parse(s: &str) -> Result<Self, MigrateError> {
        let bad = || MigrateError::State(format!("not a migration address: {s:?}"));
        let mut parts = s.split(' ');
        let uri = parts
            .next()
            .filter(|u| u.starts_with("tcp:"))
            .ok_or_else(bad)?;
        let disks = match (parts.next(), parts.next(), parts.next()) {
            (None, _, _) => None,
            (Some(server), Some(nodes), None) => {
                let t = NbdTarget::parse(server).ok_or_else(bad)?;
                let nodes: Vec<String> = nodes.split(',').map(str::to_string).collect();
                if nodes.iter().any(String::is_empty) {
                    return Err(bad());
                }
                Some((t, nodes))
            }
            _ => return Err(bad()),
        };
        Ok(Incoming {
            uri: uri.into(),
            disks,
        })
    }
}

/// Target: has the waiting QEMU of VM `paths` listen on `host` and export over NBD, on
/// `nbd_port` of `host`, the disks of its volumes `volumes` (those not shared: the source
/// copies them during the migration); the record's string ([`Incoming::encode`]).
pub fn listen_vm_with_disks(
    paths: &Paths,
    host: &str,
    nbd_port: u16,
    volumes: &[String],
    timeout: Duration,
) -> Result<String, MigrateError> {
    let state = |e: DriverError| MigrateError::State(e.to_string());
    let Some(cfg) = read_json::<QemuConfig>(&paths.config()).map_err(state)? else {
        return Err(MigrateError::State("the VM has no config".into()));
    };
    let nodes = copied_nodes(&cfg.disks, volumes)?;
    let mut q = Qmp::connect_retry(&paths.qmp_socket(), timeout)?;
    let uri = listen_incoming(&mut q, host, 0)?;
    if nodes.is_empty() {
        return Ok(uri);
    }
    let target = NbdTarget {
        host: host.into(),
        port: nbd_port,
    };
    mirror::export_disks(&mut q, &target, &nodes)?;
    Ok(Incoming {
        uri,
        disks: Some((target, nodes)),
    }
    .encode())
}

/// The nodes of the disks holding volumes `volumes`; every volume must be a disk (a cdrom
/// is read-only and must be on a shared pool).
fn copied_nodes(disks: &[QemuDisk], volumes: &[String]) -> Result<Vec<String>, MigrateError> {
    volumes
        .iter()
        .map(|v| {
            disks
                .iter()
                .find(|d| &d.volume == v)
                .map(|d| d.node())
                .ok_or_else(|| {
                    MigrateError::State(format!(
                        "volume {v} is not a disk of the VM: it cannot be copied live"
                    ))
                })
        })
        .collect()
}

/// Source: sends the running guest of VM `paths` to the target `listen` names
/// ([`Incoming::encode`]) over the VM's QMP socket: [`migrate_out_until`], or
/// [`migrate_out_disks`] when the target exports disks to copy.
pub fn send_vm(
    paths: &Paths,
    listen: &str,
    opts: &MigrateOptions,
    progress: impl FnMut(&Progress) -> bool,
) -> Result<Completed, MigrateError> {
    let to = Incoming::parse(listen)?;
    let mut q = Qmp::connect(&paths.qmp_socket(), Duration::from_secs(10))?;
    q.set_timeout(Duration::from_secs(30));
    match &to.disks {
        Some((target, nodes)) => migrate_out_disks(&mut q, &to.uri, target, nodes, opts, progress),
        None => migrate_out_until(&mut q, &to.uri, opts, progress),
    }
}

/// Source: follows the outgoing migration QEMU of VM `paths` has under way
/// ([`follow_out`]).
pub fn follow_vm(
    paths: &Paths,
    opts: &MigrateOptions,
    progress: impl FnMut(&Progress) -> bool,
) -> Result<Completed, MigrateError> {
    let mut q = Qmp::connect(&paths.qmp_socket(), Duration::from_secs(10))?;
    q.set_timeout(Duration::from_secs(30));
    follow_out(&mut q, opts, progress)
}

/// Target: whether the QEMU of VM `paths` holds the guest: the incoming migration
/// completed (it runs, or waits paused for [`adopt_incoming_vm`]'s `cont`). False when it
/// still waits, or cannot be asked.
pub fn incoming_runs(paths: &Paths) -> bool {
    Qmp::connect(&paths.qmp_socket(), Duration::from_secs(5))
        .map_err(MigrateError::from)
        .and_then(|mut q| holds_guest(&mut q))
        .unwrap_or(false)
}

/// Target: the guest runs here (waits up to `timeout` for it); the VM becomes an ordinary
/// one: the mark goes, its config says it no longer waits and its supervisor re-reads it
/// (from now on it restarts the guest by its restart policy).
pub fn adopt_incoming_vm(paths: &Paths, timeout: Duration) -> Result<(), MigrateError> {
    let mut q = Qmp::connect(&paths.qmp_socket(), Duration::from_secs(10))?;
    wait_incoming(&mut q, timeout)?;
    // The disk copy's exports (if any) are done with (the source completed its mirrors
    // before the device state moved): they go, then the guest runs.
    resume_incoming(&mut q)?;
    drop(q);
    let state = |e: DriverError| MigrateError::State(e.to_string());
    let _ = std::fs::remove_file(incoming_marker(paths));
    let Some(mut cfg) = read_json::<QemuConfig>(&paths.config()).map_err(state)? else {
        return Err(MigrateError::State("the VM has no config".into()));
    };
    cfg.incoming = false;
    write_json(&paths.config(), &cfg).map_err(state)?;
    if let Some(st) = read_json::<QemuState>(&paths.supervisor_state()).map_err(state)? {
        paths
            .instance()
            .signal_supervisor(st.supervisor_pid, libc::SIGHUP)
            .map_err(state)?;
    }
    Ok(())
}

/// Target: the migration failed or was given up: the mark goes and a QEMU still waiting
/// (never one that runs the guest) quits; its supervisor does not restart it.
pub fn abort_incoming_vm(paths: &Paths) -> Result<(), MigrateError> {
    let _ = std::fs::remove_file(incoming_marker(paths));
    let mut q = match Qmp::connect(&paths.qmp_socket(), Duration::from_secs(5)) {
        Ok(q) => q,
        Err(_) => return Ok(()),
    };
    let st = q.query_status()?;
    if st.status != RunState::Inmigrate {
        return Err(MigrateError::State(format!(
            "the target QEMU is {:?}: not killing it",
            st.status
        )));
    }
    q.execute(&super::qmp::Quit)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use serde_json::json;

    use super::*;
    use crate::vm::qemu::qga::Qga;
    use crate::vm::qemu::test_qemu::TestQemu;

    fn info(v: serde_json::Value) -> MigrationInfo {
        serde_json::from_value(v).expect("decode query-migrate")
    }

    #[test]
    fn query_migrate_replies_decode_and_give_progress() {
        let active = info(json!({
            "status": "active", "expected-downtime": 120, "total-time": 900,
            "ram": {"transferred": 300, "remaining": 250, "total": 1000,
                    "dirty-sync-count": 2, "mbps": 8.5, "duplicate": 7},
            "setup-time": 3
        }));
        let p = Progress::from_info(&active, Duration::from_secs(1));
        assert_eq!(p.status, MigrationStatus::Active);
        assert_eq!((p.transferred, p.remaining, p.total), (300, 250, 1000));
        assert_eq!(p.ram_percent(), 75);
        assert_eq!(p.downtime_ms, Some(120));
        let done = info(
            json!({"status": "completed", "downtime": 42, "total-time": 1500,
                               "ram": {"transferred": 900, "remaining": 0, "total": 1000}}),
        );
        let p = Progress::from_info(&done, Duration::from_secs(2));
        assert_eq!((p.ram_percent(), p.downtime_ms), (100, Some(42)));
        let none = info(json!({}));
        assert_eq!(Progress::from_info(&none, Duration::ZERO).ram_percent(), 0);
        let odd = info(json!({"status": "postcopy-paused"}));
        assert_eq!(odd.status, Some(MigrationStatus::Other));
        let target = info(json!({"status": "setup", "socket-address":
            [{"type": "inet", "host": "10.0.0.2", "port": "40123"}]}));
        assert_eq!(target.socket_address[0].port.as_deref(), Some("40123"));
    }

    #[test]
    fn the_poll_loop_completes_fails_or_cancels_past_the_timeout() {
        let t = Duration::from_secs(10);
        let done = info(
            json!({"status": "completed", "downtime": 42, "total-time": 1500,
                               "ram": {"transferred": 900}}),
        );
        assert!(matches!(
            next_step(&done, Duration::from_secs(30), t),
            Step::Done(Completed {
                total_time_ms: 1500,
                downtime_ms: 42,
                transferred: 900
            })
        ));
        let failed = info(json!({"status": "failed", "error-desc": "Connection reset"}));
        match next_step(&failed, Duration::ZERO, t) {
            Step::Fail(MigrateError::Failed(d)) => assert_eq!(d, "Connection reset"),
            other => panic!("{other:?}"),
        }
        let cancelled = info(json!({"status": "cancelled"}));
        assert!(matches!(
            next_step(&cancelled, Duration::ZERO, t),
            Step::Fail(MigrateError::Cancelled)
        ));
        let active = info(json!({"status": "active"}));
        assert!(matches!(
            next_step(&active, Duration::from_secs(9), t),
            Step::Wait
        ));
        assert!(matches!(next_step(&active, t, t), Step::Cancel));
    }

    #[test]
    fn the_targets_address_names_the_disk_exports_when_disks_are_copied() {
        let plain = Incoming::parse("tcp:10.1.0.2:4444").expect("plain");
        assert_eq!(plain.disks, None);
        assert_eq!(plain.encode(), "tcp:10.1.0.2:4444");
        let with = Incoming {
            uri: "tcp:10.1.0.2:4444".into(),
            disks: Some((
                NbdTarget {
                    host: "10.1.0.2".into(),
                    port: 40000,
                },
                vec!["disk0".into(), "disk2".into()],
            )),
        };
        assert_eq!(
            with.encode(),
            "tcp:10.1.0.2:4444 nbd://10.1.0.2:40000 disk0,disk2"
        );
        assert_eq!(Incoming::parse(&with.encode()).expect("with disks"), with);
        for bad in [
            "",
            "nbd://x:1",
            "tcp:a:1 nbd://x:1",
            "tcp:a:1 nbd://x:1 a,,b",
            "tcp:a:1 x y",
        ] {
            assert!(Incoming::parse(bad).is_err(), "{bad:?}");
        }
        let disk = |id: &str, volume: &str| QemuDisk {
            id: id.into(),
            volume: volume.into(),
            path: format!("/p/images/{volume}.qcow2").into(),
            format: crate::vm::qemu::config::DiskFormat::Qcow2,
            bus: stead_schema::DiskBus::Virtio,
            cache: stead_schema::DiskCache::None,
            discard: false,
            read_only: false,
            boot: None,
        };
        let disks = [disk("disk0", "shared"), disk("disk1", "root")];
        assert_eq!(
            copied_nodes(&disks, &["root".into()]).expect("a disk"),
            ["disk1"]
        );
        let e = copied_nodes(&disks, &["iso".into()]).expect_err("not a disk");
        assert!(e.to_string().contains("volume iso"), "{e}");
    }

    #[test]
    fn uris_and_capabilities() {
        assert_eq!(tcp_uri("10.1.0.2", 4444), "tcp:10.1.0.2:4444");
        assert_eq!(tcp_uri("fd00::2", 4444), "tcp:[fd00::2]:4444");
        let caps = capabilities(&MigrateOptions::default());
        let names: Vec<(&str, bool)> = caps
            .iter()
            .map(|c| (c.capability.as_str(), c.state))
            .collect();
        assert_eq!(
            names,
            [
                ("events", true),
                ("auto-converge", true),
                ("pause-before-switchover", false)
            ]
        );
        let v = serde_json::to_value(MigrateSetParameters {
            downtime_limit: 300,
            max_bandwidth: DEFAULT_MAX_BANDWIDTH,
        })
        .expect("encode");
        assert_eq!(
            v,
            json!({"downtime-limit": 300, "max-bandwidth": 134217728})
        );
    }

    /// The same small machine on both ends (a BIOS guest without disks).
    const MACHINE: [&str; 6] = ["-machine", "pc", "-m", "128M", "-smp", "1"];

    /// A running source and a target waiting in `-incoming defer`.
    fn pair(test: &str) -> Option<(TestQemu, TestQemu)> {
        let src = TestQemu::start(test, &MACHINE)?;
        let mut args = MACHINE.to_vec();
        args.extend(["-incoming", "defer"]);
        let dst = TestQemu::start(test, &args)?;
        Some((src, dst))
    }

    #[test]
    fn qemu_live_migration_moves_the_running_guest_to_the_target() {
        let Some((src, dst)) = pair("qemu_live_migration") else {
            return;
        };
        let (mut qs, mut qd) = (src.qmp(), dst.qmp());
        let e = listen_incoming(&mut qs, "127.0.0.1", 0).expect_err("source is not incoming");
        assert!(e.to_string().contains("not waiting"), "{e}");
        let uri = listen_incoming(&mut qd, "127.0.0.1", 0).expect("listen");
        assert!(
            uri.starts_with("tcp:127.0.0.1:") && !uri.ends_with(":0"),
            "{uri}"
        );
        let mut seen = Vec::new();
        let done = migrate_out(&mut qs, &uri, &MigrateOptions::default(), |p| {
            seen.push(p.clone())
        })
        .expect("migrate");
        wait_incoming(&mut qd, Duration::from_secs(10)).expect("target runs");
        assert_eq!(
            qs.query_status().expect("status").status,
            RunState::Postmigrate
        );
        assert_eq!(qd.query_status().expect("status").status, RunState::Running);
        assert!(done.transferred > 0 && done.total_time_ms > 0, "{done:?}");
        assert_eq!(seen.last().map(|p| p.ram_percent()), Some(100));
        println!(
            "qemu_live_migration: 128 MiB guest, total {} ms, downtime {} ms, {} bytes, {} polls",
            done.total_time_ms,
            done.downtime_ms,
            done.transferred,
            seen.len()
        );
    }

    /// A multiboot guest of 97 bytes (32-bit, paging off) that stores into 512 pages from
    /// 2 MiB over and over, each pass first checking that every page holds the previous
    /// pass's number. Its pass count is at 5 MiB; a page that holds another number (a
    /// store the migration lost) stops it with the page, its number and `0xBAD0BAD0` at
    /// 5 MiB + 4, + 8, + 12. Built from (GNU as, `ld -Ttext=0x100000 --oformat binary`):
    ///
    /// ```text
    ///         .long 0x1BADB002, 0x00010000, -(0x1BADB002 + 0x00010000)
    ///         .long 0x100000, 0x100000, 0, 0, 0x100020   # header, load, entry addresses
    ///         xor %ebp, %ebp
    /// outer:  mov $0x200000, %edi
    ///         mov $512, %ecx
    /// inner:  mov (%edi), %eax
    ///         cmp %ebp, %eax
    ///         jne bad
    ///         lea 1(%ebp), %eax
    ///         mov %eax, (%edi)
    ///         add $4096, %edi
    ///         dec %ecx
    ///         jnz inner
    ///         inc %ebp
    ///         mov %ebp, 0x500000
    ///         jmp outer
    /// bad:    mov %edi, 0x500004
    ///         mov %eax, 0x500008
    ///         movl $0xBAD0BAD0, 0x50000c
    /// 1:      hlt
    ///         jmp 1b
    /// ```
    const STORE_CHECKER: [u8; 97] = [
        0x02, 0xb0, 0xad, 0x1b, 0x00, 0x00, 0x01, 0x00, 0xfe, 0x4f, 0x51, 0xe4, 0x00, 0x00, 0x10,
        0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x20, 0x00,
        0x10, 0x00, 0x31, 0xed, 0xbf, 0x00, 0x00, 0x20, 0x00, 0xb9, 0x00, 0x02, 0x00, 0x00, 0x8b,
        0x07, 0x39, 0xe8, 0x75, 0x17, 0x8d, 0x45, 0x01, 0x89, 0x07, 0x81, 0xc7, 0x00, 0x10, 0x00,
        0x00, 0x49, 0x75, 0xec, 0x45, 0x89, 0x2d, 0x00, 0x00, 0x50, 0x00, 0xeb, 0xd9, 0x89, 0x3d,
        0x04, 0x00, 0x50, 0x00, 0xa3, 0x08, 0x00, 0x50, 0x00, 0xc7, 0x05, 0x0c, 0x00, 0x50, 0x00,
        0xd0, 0xba, 0xd0, 0xba, 0xf4, 0xeb, 0xfd,
    ];

    /// The checker's four words at 5 MiB: passes, failed page, its number, mark.
    fn checker_words(qmp: &mut Qmp) -> [u32; 4] {
        let out = qmp.hmp("xp /4wx 0x500000").expect("xp");
        let mut words = [0u32; 4];
        let values = out.split(':').nth(1).unwrap_or_default().split_whitespace();
        for (w, v) in words.iter_mut().zip(values) {
            *w = u32::from_str_radix(v.trim_start_matches("0x"), 16)
                .unwrap_or_else(|e| panic!("xp word {v:?}: {e}"));
        }
        words
    }

    /// Migrates the store checker with RAM `ram` (a `-m` value) at 2 MiB/s, so that QEMU
    /// syncs the dirty bitmap several times while the guest runs, then lifts the cap after
    /// the fourth sync; returns the target's words after it ran on.
    fn migrate_store_checker(test: &str, ram: &str) -> Option<[u32; 4]> {
        let dir = tempfile::tempdir().expect("tmp");
        let kernel = dir.path().join("checker.bin");
        std::fs::write(&kernel, STORE_CHECKER).expect("write the checker");
        let kernel = kernel.display().to_string();
        let args = ["-machine", "pc", "-m", ram, "-smp", "1", "-kernel", &kernel];
        let src = TestQemu::start(test, &args)?;
        let mut dargs = args.to_vec();
        dargs.extend(["-incoming", "defer"]);
        let dst = TestQemu::start(test, &dargs)?;
        let (mut qs, mut qd) = (src.qmp(), dst.qmp());
        let uri = listen_incoming(&mut qd, "127.0.0.1", 0).expect("listen");
        let deadline = Instant::now() + Duration::from_secs(30);
        while checker_words(&mut qs)[0] < 1000 {
            assert!(Instant::now() < deadline, "the checker does not run");
            std::thread::sleep(Duration::from_millis(50));
        }
        qs.execute(&MigrateSetParameters {
            downtime_limit: 300,
            max_bandwidth: 2 << 20,
        })
        .expect("cap the bandwidth");
        qs.execute(&Migrate { uri }).expect("migrate");
        let mut lifted = false;
        loop {
            let info: MigrationInfo = qs.execute(&QueryMigrate).expect("query-migrate");
            let syncs = info.ram.as_ref().map_or(0, |r| r.dirty_sync_count);
            match info.status {
                Some(MigrationStatus::Completed) => break,
                Some(MigrationStatus::Failed | MigrationStatus::Cancelled) => {
                    panic!("{test}: migration ended {info:?}")
                }
                _ => {}
            }
            if syncs >= 4 && !lifted {
                qs.execute(&MigrateSetParameters {
                    downtime_limit: 300,
                    max_bandwidth: DEFAULT_MAX_BANDWIDTH,
                })
                .expect("lift the cap");
                lifted = true;
            }
            assert!(Instant::now() < deadline, "{test}: no end: {info:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        wait_incoming(&mut qd, Duration::from_secs(10)).expect("the target runs");
        let moved = checker_words(&mut qd)[0];
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let words = checker_words(&mut qd);
            if words[3] != 0 || words[0] > moved + 1000 {
                return Some(words);
            }
            assert!(Instant::now() < deadline, "the checker stopped: {words:x?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A TCG guest's stores during a live migration all reach the target with the RAM size
    /// the driver gives it ([`super::super::argv::ram_size_arg`]). The same guest with a
    /// 64-page multiple (512 MiB) is the control: QEMU before 9.0 loses its stores (the
    /// bug that size avoids), which also shows the checker catches a lost store.
    #[test]
    fn qemu_tcg_migration_keeps_every_guest_store_with_the_drivers_ram_size() {
        let test = "qemu_tcg_migration_keeps_every_guest_store";
        let ram = super::super::argv::ram_size_arg(512 << 20, super::super::accel::Accel::Tcg);
        let Some(words) = migrate_store_checker(test, &ram) else {
            return;
        };
        assert_eq!(
            words[3], 0,
            "{test}: with -m {ram} the target found page {:#x} holding {} (a lost store)",
            words[1], words[2]
        );
        let control = migrate_store_checker(test, "512M").expect("QEMU runs");
        let version = TestQemu::start(test, &MACHINE)
            .expect("QEMU runs")
            .qmp()
            .version()
            .qemu;
        println!(
            "{test}: QEMU {}.{}.{}; -m {ram}: {} passes, no store lost; control -m 512M: {}",
            version.major,
            version.minor,
            version.micro,
            words[0],
            if control[3] == 0 {
                "no store lost".to_string()
            } else {
                format!(
                    "page {:#x} lost its stores (held {})",
                    control[1], control[2]
                )
            }
        );
        if version.major < 9 {
            assert_ne!(
                control[3], 0,
                "{test}: QEMU {}.{} is expected to lose the control's stores",
                version.major, version.minor
            );
        }
    }

    #[test]
    fn only_a_migration_under_way_or_completed_can_be_followed() {
        let nothing = |v| nothing_to_follow(&info(v)).map(|e| e.to_string());
        let none = nothing(json!({})).expect("no migration");
        assert!(none.contains("never started"), "{none}");
        let failed =
            nothing(json!({"status": "failed", "error-desc": "connection reset"})).expect("failed");
        assert!(failed.contains("connection reset"), "{failed}");
        assert!(nothing(json!({"status": "cancelled"})).is_some());
        for s in ["setup", "active", "device", "completed"] {
            assert!(nothing(json!({ "status": s })).is_none(), "{s}");
        }
    }

    #[test]
    fn qemu_a_migration_started_by_someone_else_is_followed_to_its_end() {
        let Some((src, dst)) = pair("qemu_follow_out") else {
            return;
        };
        let (mut qs, mut qd) = (src.qmp(), dst.qmp());
        let e = follow_out(&mut qs, &MigrateOptions::default(), |_| true)
            .expect_err("nothing under way");
        assert!(e.to_string().contains("never started"), "{e}");
        assert_eq!(qs.query_status().expect("status").status, RunState::Running);
        let uri = listen_incoming(&mut qd, "127.0.0.1", 0).expect("listen");
        qs.execute(&Migrate { uri }).expect("migrate");
        // The agent that started it is gone: a new connection follows it.
        drop(qs);
        let mut again = src.qmp();
        let mut polls = 0;
        let done = follow_out(&mut again, &MigrateOptions::default(), |_| {
            polls += 1;
            true
        })
        .expect("followed to completed");
        wait_incoming(&mut qd, Duration::from_secs(10)).expect("target runs");
        assert_eq!(
            again.query_status().expect("status").status,
            RunState::Postmigrate
        );
        let twice = follow_out(&mut again, &MigrateOptions::default(), |_| true)
            .expect("a completed migration reads as completed");
        assert_eq!(twice.transferred, done.transferred);
        println!("qemu_follow_out: {done:?} after {polls} polls");
    }

    /// Options that make a migration of the small guest last several seconds.
    fn slow() -> MigrateOptions {
        MigrateOptions {
            max_bandwidth: 32 << 10,
            poll: Duration::from_millis(100),
            ..MigrateOptions::default()
        }
    }

    #[test]
    fn qemu_a_killed_target_fails_the_migration_and_the_source_keeps_running() {
        let Some((src, dst)) = pair("qemu_killed_target") else {
            return;
        };
        let (mut qs, mut qd) = (src.qmp(), dst.qmp());
        let uri = listen_incoming(&mut qd, "127.0.0.1", 0).expect("listen");
        let mut dst = Some(dst);
        let started = Instant::now();
        let e = migrate_out(&mut qs, &uri, &slow(), |p| {
            if p.elapsed > Duration::from_millis(500) && p.status == MigrationStatus::Active {
                drop(dst.take());
            }
        })
        .expect_err("the target died");
        assert!(matches!(e, MigrateError::Failed(_)), "{e}");
        assert_eq!(qs.query_status().expect("status").status, RunState::Running);
        assert!(started.elapsed() < Duration::from_secs(30));
        println!("qemu_killed_target: {e} after {:?}", started.elapsed());
    }

    #[test]
    fn qemu_a_migration_past_its_timeout_is_cancelled_and_the_source_keeps_running() {
        let Some((src, dst)) = pair("qemu_migration_timeout") else {
            return;
        };
        let (mut qs, mut qd) = (src.qmp(), dst.qmp());
        let uri = listen_incoming(&mut qd, "127.0.0.1", 0).expect("listen");
        let opts = MigrateOptions {
            timeout: Duration::from_millis(700),
            ..slow()
        };
        let e = migrate_out(&mut qs, &uri, &opts, |_| {}).expect_err("timeout");
        assert!(matches!(e, MigrateError::TimedOut(_)), "{e}");
        let info = qs.execute(&QueryMigrate).expect("query-migrate");
        assert_eq!(info.status, Some(MigrationStatus::Cancelled));
        assert_eq!(qs.query_status().expect("status").status, RunState::Running);
    }

    /// The small machine with one raw disk `path` as node `disk0` (as the driver names it).
    fn with_disk(path: &std::path::Path) -> Vec<String> {
        let mut args: Vec<String> = MACHINE.map(String::from).to_vec();
        args.push("-blockdev".into());
        args.push(format!(
            "driver=file,filename={},node-name=disk0-file",
            path.display()
        ));
        args.push("-blockdev".into());
        args.push("driver=raw,file=disk0-file,node-name=disk0".into());
        args.push("-device".into());
        args.push("virtio-blk-pci,drive=disk0,id=disk0-dev".into());
        args
    }

    /// A source QEMU on raw file `sdisk` (plus `extra` arguments) and a target waiting for
    /// its guest on `ddisk` (`-incoming defer`, and paused with `-S` when `paused`); `None`
    /// when QEMU is not installed.
    fn start_disk_pair(
        test: &str,
        sdisk: &std::path::Path,
        ddisk: &std::path::Path,
        paused: bool,
        extra: &[String],
    ) -> Option<(TestQemu, TestQemu)> {
        let mut sargs = with_disk(sdisk);
        sargs.extend_from_slice(extra);
        let src = TestQemu::start(test, &sargs.iter().map(String::as_str).collect::<Vec<_>>())?;
        let mut dargs = with_disk(ddisk);
        if paused {
            dargs.push("-S".into());
        }
        dargs.extend(["-incoming".into(), "defer".into()]);
        let dst = TestQemu::start(test, &dargs.iter().map(String::as_str).collect::<Vec<_>>())
            .expect("target");
        Some((src, dst))
    }

    /// The waiting target listens for the RAM on loopback and exports `disk0` over NBD on a
    /// free port: the migration URI, the NBD address and the disk nodes to mirror.
    fn listen_and_export(qd: &mut Qmp) -> (String, NbdTarget, Vec<String>) {
        let uri = listen_incoming(qd, "127.0.0.1", 0).expect("listen");
        let target = NbdTarget {
            host: "127.0.0.1".into(),
            port: mirror::free_port("127.0.0.1").expect("a free port"),
        };
        let nodes = vec!["disk0".to_string()];
        mirror::export_disks(qd, &target, &nodes).expect("export");
        (uri, target, nodes)
    }

    /// A source with a disk full of a pattern and a target whose disk (the same size) is a
    /// stale copy: the mirror makes the target's file equal the source's, then the RAM moves.
    #[test]
    fn qemu_a_migration_with_disk_copy_leaves_the_targets_disk_equal_to_the_sources() {
        let test = "qemu_migration_with_disk_copy";
        let dir = tempfile::tempdir().expect("tmp");
        let (sdisk, ddisk) = (dir.path().join("src.raw"), dir.path().join("dst.raw"));
        let data: Vec<u8> = (0..(32u32 << 20)).map(|i| (i / 4096 % 251) as u8).collect();
        std::fs::write(&sdisk, &data).expect("source disk");
        let mut stale = data.clone();
        stale[..(8 << 20)].fill(0);
        std::fs::write(&ddisk, &stale).expect("target disk");
        let Some((src, dst)) = start_disk_pair(test, &sdisk, &ddisk, true, &[]) else {
            return;
        };
        let (mut qs, mut qd) = (src.qmp(), dst.qmp());
        let (uri, target, nodes) = listen_and_export(&mut qd);
        let mut seen = Vec::new();
        let done = migrate_out_disks(
            &mut qs,
            &uri,
            &target,
            &nodes,
            &MigrateOptions::default(),
            |p| {
                seen.push(p.clone());
                true
            },
        )
        .expect("migrate with the disk");
        wait_incoming(&mut qd, Duration::from_secs(10)).expect("the guest arrived");
        // Started with -S: the guest waits, paused, while the export still holds the disk.
        assert_eq!(qd.query_status().expect("status").status, RunState::Paused);
        assert_eq!(
            qd.execute(&mirror::QueryBlockExports)
                .expect("query-block-exports")
                .len(),
            1
        );
        resume_incoming(&mut qd).expect("exports closed, then cont");
        assert_eq!(qd.query_status().expect("status").status, RunState::Running);
        assert!(
            qd.execute(&mirror::QueryBlockExports)
                .expect("query-block-exports")
                .is_empty()
        );
        assert_eq!(
            qs.query_status().expect("status").status,
            RunState::Postmigrate
        );
        assert!(
            qs.execute(&super::super::qmp::QueryJobs)
                .expect("query-jobs")
                .is_empty(),
            "the completed mirror was dismissed"
        );
        let disk_polls: Vec<_> = seen.iter().filter_map(|p| p.disk).collect();
        assert_eq!(disk_polls.last().map(DiskCopy::percent), Some(100));
        assert_eq!(seen.last().map(|p| p.ram_percent()), Some(100));
        assert!(mirror::running_mirrors(&mut qs).is_empty());
        qd.execute(&super::super::qmp::Quit).expect("quit target");
        drop((qs, qd, src, dst));
        assert!(
            std::fs::read(&ddisk).expect("target disk") == data,
            "the target's disk equals the source's"
        );
        println!(
            "{test}: 32 MiB disk, {} disk polls, total {} ms, downtime {} ms",
            disk_polls.len(),
            done.total_time_ms,
            done.downtime_ms
        );
    }

    /// A disk copy whose sender went away before `migrate` (an agent restart) cannot be
    /// followed: its jobs are cancelled and the guest keeps running on its own disk.
    #[test]
    fn qemu_a_disk_copy_without_its_migration_is_given_up_by_a_follower() {
        let test = "qemu_disk_copy_follow";
        let dir = tempfile::tempdir().expect("tmp");
        let (sdisk, ddisk) = (dir.path().join("src.raw"), dir.path().join("dst.raw"));
        std::fs::write(&sdisk, vec![5u8; 8 << 20]).expect("source disk");
        std::fs::write(&ddisk, vec![0u8; 8 << 20]).expect("target disk");
        let Some((src, dst)) = start_disk_pair(test, &sdisk, &ddisk, false, &[]) else {
            return;
        };
        let (mut qs, mut qd) = (src.qmp(), dst.qmp());
        let (_, target, nodes) = listen_and_export(&mut qd);
        mirror::start_mirrors(&mut qs, &target, &nodes).expect("mirror");
        assert_eq!(mirror::running_mirrors(&mut qs), nodes);
        drop(qs);
        let mut again = src.qmp();
        let e = follow_out(&mut again, &MigrateOptions::default(), |_| true)
            .expect_err("no migration to follow");
        assert!(e.to_string().contains("never started"), "{e}");
        assert!(mirror::running_mirrors(&mut again).is_empty());
        assert_eq!(
            again.query_status().expect("status").status,
            RunState::Running
        );
    }

    /// A move given up during the disk copy (the progress callback says so, as a cleared
    /// record does) cancels the jobs; the guest keeps running on its own disk.
    #[test]
    fn qemu_a_disk_copy_given_up_leaves_the_source_running_without_jobs() {
        let test = "qemu_disk_copy_given_up";
        let dir = tempfile::tempdir().expect("tmp");
        let (sdisk, ddisk) = (dir.path().join("src.raw"), dir.path().join("dst.raw"));
        std::fs::write(&sdisk, vec![9u8; 64 << 20]).expect("source disk");
        std::fs::write(&ddisk, vec![0u8; 64 << 20]).expect("target disk");
        let Some((src, dst)) = start_disk_pair(test, &sdisk, &ddisk, false, &[]) else {
            return;
        };
        let (mut qs, mut qd) = (src.qmp(), dst.qmp());
        let (uri, target, nodes) = listen_and_export(&mut qd);
        let e = migrate_out_disks(
            &mut qs,
            &uri,
            &target,
            &nodes,
            &MigrateOptions::default(),
            |_| false,
        )
        .expect_err("given up");
        assert!(
            matches!(
                e,
                MigrateError::Cancelled | MigrateError::Disk(MirrorError::Cancelled)
            ),
            "{e}"
        );
        assert_eq!(qs.query_status().expect("status").status, RunState::Running);
        assert!(mirror::running_mirrors(&mut qs).is_empty());
        assert_eq!(
            qd.query_status().expect("status").status,
            RunState::Inmigrate,
            "the target still waits (its agent quits it)"
        );
    }

    /// A target that is gone fails the disk copy; the source keeps running, no job left.
    #[test]
    fn qemu_a_disk_copy_to_a_dead_target_fails_and_the_source_keeps_running() {
        let test = "qemu_disk_copy_dead_target";
        let dir = tempfile::tempdir().expect("tmp");
        let sdisk = dir.path().join("src.raw");
        std::fs::write(&sdisk, vec![7u8; 4 << 20]).expect("source disk");
        let sargs = with_disk(&sdisk);
        let Some(src) =
            TestQemu::start(test, &sargs.iter().map(String::as_str).collect::<Vec<_>>())
        else {
            return;
        };
        let mut qs = src.qmp();
        let target = NbdTarget {
            host: "127.0.0.1".into(),
            port: mirror::free_port("127.0.0.1").expect("a free port"),
        };
        let e = migrate_out_disks(
            &mut qs,
            "tcp:127.0.0.1:1",
            &target,
            &["disk0".to_string()],
            &MigrateOptions::default(),
            |_| true,
        )
        .expect_err("nobody listens");
        assert!(matches!(e, MigrateError::Disk(_)), "{e}");
        assert_eq!(qs.query_status().expect("status").status, RunState::Running);
        assert!(mirror::running_mirrors(&mut qs).is_empty());
        println!("{test}: {e}");
    }

    /// A source with a disk of `mib` MiB of non-zero data and a second QMP socket (for a
    /// test to act beside the migration), and a target waiting with `-S` on a zeroed disk
    /// exported over NBD; the migration URI, the NBD target and the source's second socket.
    #[allow(clippy::type_complexity)]
    fn disk_pair(
        test: &str,
        dir: &std::path::Path,
        mib: u32,
    ) -> Option<(TestQemu, TestQemu, String, NbdTarget, std::path::PathBuf)> {
        let (sdisk, ddisk) = (dir.join("src.raw"), dir.join("dst.raw"));
        let data: Vec<u8> = (0..(mib << 20))
            .map(|i| (i / 512 % 249) as u8 + 1)
            .collect();
        std::fs::write(&sdisk, &data).expect("source disk");
        std::fs::write(&ddisk, vec![0u8; data.len()]).expect("target disk");
        let side = dir.join("side.sock");
        let side_qmp = [
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", side.display()),
        ];
        let (src, dst) = start_disk_pair(test, &sdisk, &ddisk, true, &side_qmp)?;
        let mut qd = dst.qmp();
        let (uri, target, _) = listen_and_export(&mut qd);
        Some((src, dst, uri, target, side))
    }

    /// A mirror job that fails while the RAM moves (cancelled by force from a second QMP
    /// client, as an I/O error would end it) fails the move with the job's error: the
    /// migration is cancelled, the guest keeps running on the source, no job is left
    /// behind and the target never ran the guest.
    #[test]
    fn qemu_a_mirror_job_failing_during_the_ram_copy_fails_the_move_cleanly() {
        let test = "qemu_mirror_job_fails";
        let dir = tempfile::tempdir().expect("tmp");
        let Some((src, dst, uri, target, side)) = disk_pair(test, dir.path(), 8) else {
            return;
        };
        let (mut qs, mut qd) = (src.qmp(), dst.qmp());
        let nodes = vec!["disk0".to_string()];
        let mut broke = false;
        let e = migrate_out_disks(&mut qs, &uri, &target, &nodes, &slow(), |p| {
            if !broke && p.disk.is_none() && p.status == MigrationStatus::Active {
                let mut other =
                    Qmp::connect_retry(&side, Duration::from_secs(5)).expect("side QMP");
                other
                    .execute(&super::super::qmp::BlockJobCancel {
                        device: mirror::job_id("disk0"),
                        force: Some(true),
                    })
                    .expect("cancel the mirror job");
                broke = true;
            }
            true
        })
        .expect_err("the mirror failed");
        assert!(broke, "the RAM phase was never seen: {e}");
        assert!(
            matches!(e, MigrateError::Disk(MirrorError::Failed { .. })),
            "{e}"
        );
        println!("{test}: {e}");
        assert_eq!(qs.query_status().expect("status").status, RunState::Running);
        assert_eq!(
            qs.execute(&QueryMigrate).expect("query-migrate").status,
            Some(MigrationStatus::Cancelled)
        );
        assert!(
            qs.execute(&super::super::qmp::QueryJobs)
                .expect("query-jobs")
                .is_empty(),
            "the failed job was dismissed"
        );
        // The target never started the guest (it exits once its stream is cut).
        if let Ok(st) = qd.query_status() {
            assert_ne!(st.status, RunState::Running);
        }
    }

    /// The target QEMU killed while the disk is being copied: the mirror (or the migration)
    /// fails, the guest keeps running on the source on its own disk, no job is left.
    #[test]
    fn qemu_a_target_killed_during_the_disk_copy_leaves_the_guest_on_the_source() {
        let test = "qemu_disk_copy_target_killed";
        let dir = tempfile::tempdir().expect("tmp");
        let Some((src, dst, uri, target, _side)) = disk_pair(test, dir.path(), 64) else {
            return;
        };
        let mut qs = src.qmp();
        let nodes = vec!["disk0".to_string()];
        let mut dst = Some(dst);
        let mut killed_at = None;
        let started = Instant::now();
        let e = migrate_out_disks(&mut qs, &uri, &target, &nodes, &slow(), |p| {
            if let Some(d) = dst.take() {
                killed_at = Some(p.disk.map(|c| c.percent()));
                drop(d);
            }
            true
        })
        .expect_err("the target is gone");
        println!(
            "{test}: killed at disk {killed_at:?}%: {e} after {:?}",
            started.elapsed()
        );
        assert!(killed_at.is_some());
        assert!(
            matches!(e, MigrateError::Disk(_) | MigrateError::Failed(_)),
            "{e}"
        );
        assert_eq!(qs.query_status().expect("status").status, RunState::Running);
        assert!(
            qs.execute(&super::super::qmp::QueryJobs)
                .expect("query-jobs")
                .is_empty()
        );
        assert!(started.elapsed() < Duration::from_secs(60));
    }

    /// The command line of the booted guest test: one shared disk, its own agent socket and
    /// serial log per QEMU.
    fn guest_args(disk: &std::path::Path, dir: &std::path::Path, side: &str) -> Vec<String> {
        let mut args: Vec<String> = [
            "-machine",
            "pc",
            "-m",
            &crate::vm::qemu::argv::ram_size_arg(512 << 20, crate::vm::qemu::accel::Accel::Tcg),
            "-smp",
            "1",
            "-device",
            "virtio-serial-pci",
            "-device",
            "virtio-blk-pci,drive=root,bootindex=0",
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ]
        .map(String::from)
        .to_vec();
        args.push("-drive".into());
        args.push(format!(
            "file={},format=qcow2,if=none,id=root",
            disk.display()
        ));
        args.push("-chardev".into());
        let sock = dir.join(format!("qga-{side}.sock"));
        args.push(format!(
            "socket,id=qga0,path={},server=on,wait=off",
            sock.display()
        ));
        args.push("-serial".into());
        args.push(format!(
            "file:{}",
            dir.join(format!("serial-{side}.log")).display()
        ));
        args
    }

    /// The guest's boot id, read by its agent.
    fn boot_id(qga: &mut Qga) -> String {
        let out = qga
            .exec(
                "/usr/bin/systemd-id128",
                &["boot-id"],
                None,
                Duration::from_secs(60),
            )
            .expect("systemd-id128 boot-id");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Boots the cached Debian guest under TCG on a disk both QEMUs open (shared storage),
    /// then live-migrates it idle at 16 MiB/s (many rounds): the same boot, its RAM (a file
    /// in tmpfs) and its agent on the target. With a 64-page-aligned RAM size (`-m 512M`)
    /// instead of the driver's, QEMU 7.2 loses guest stores here and the guest kernel oopses
    /// on the target (2 of 2 runs).
    #[test]
    fn qemu_a_booted_debian_guest_migrates_live_with_its_boot_and_memory() {
        use crate::vm::qemu::test_qemu::{guest_image, make_overlay, tail};
        let test = "qemu_a_booted_debian_guest_migrates_live";
        let Some(image) = guest_image(test) else {
            return;
        };
        let shared = tempfile::tempdir().expect("tmp");
        let disk = shared.path().join("disk.qcow2");
        make_overlay(&image, &disk);
        let sargs = guest_args(&disk, shared.path(), "src");
        let sargs: Vec<&str> = sargs.iter().map(String::as_str).collect();
        let Some(src) = TestQemu::start(test, &sargs) else {
            return;
        };
        let mut qs = src.qmp();
        let booted = Instant::now();
        let mut agent = Qga::connect(
            &shared.path().join("qga-src.sock"),
            Duration::from_secs(300),
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e}; serial log ends with:\n{}",
                tail(&shared.path().join("serial-src.log"), 3000)
            )
        });
        agent.set_timeout(Duration::from_secs(30));
        println!(
            "{test}: agent answered {:?} after QEMU started",
            booted.elapsed()
        );
        let before = boot_id(&mut agent);
        assert_eq!(before.len(), 32, "{before:?}");
        let marker: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        agent
            .write_file("/dev/shm/marker", &marker)
            .expect("write marker");
        drop(agent);

        let mut dargs = guest_args(&disk, shared.path(), "dst");
        dargs.extend(["-incoming".into(), "defer".into()]);
        let dargs: Vec<&str> = dargs.iter().map(String::as_str).collect();
        let dst = TestQemu::start(test, &dargs).expect("target QEMU");
        let mut qd = dst.qmp();
        let uri = listen_incoming(&mut qd, "127.0.0.1", 0).expect("listen");
        let mut last = None;
        // Capped so that the copy takes many rounds while the guest runs (the case that
        // lost guest memory under TCG with a 64-page-aligned RAM size).
        let opts = MigrateOptions {
            max_bandwidth: 16 << 20,
            ..MigrateOptions::default()
        };
        let done = migrate_out(&mut qs, &uri, &opts, |p| last = Some(p.clone())).expect("migrate");
        wait_incoming(&mut qd, Duration::from_secs(30)).expect("the target runs the guest");
        assert_eq!(
            qs.query_status().expect("status").status,
            RunState::Postmigrate
        );
        qs.execute(&super::super::qmp::Quit)
            .expect("quit the source");
        drop(src);

        let mut agent = Qga::connect(&shared.path().join("qga-dst.sock"), Duration::from_secs(60))
            .unwrap_or_else(|e| {
                panic!(
                    "the agent answers on the target: {e}; target status {:?}; its serial log ends with:\n{}",
                    qd.query_status().map(|s| s.status),
                    tail(&shared.path().join("serial-dst.log"), 4000)
                )
            });
        agent.set_timeout(Duration::from_secs(30));
        assert_eq!(boot_id(&mut agent), before, "the same boot goes on");
        assert_eq!(
            agent
                .read_file("/dev/shm/marker", 1 << 20)
                .expect("read marker"),
            marker
        );
        println!(
            "{test}: 512 MiB TCG guest at 16 MiB/s, total {} ms, downtime {} ms, {} MiB sent, last poll {:?}",
            done.total_time_ms,
            done.downtime_ms,
            done.transferred >> 20,
            last.map(|p| (p.status, p.ram_percent()))
        );
    }
}
