//! The disk copy of a live migration whose disks are not shared: the target QEMU (waiting
//! in `-incoming defer`) exports each disk's format node over NBD, writable
//! ([`export_disks`]); the source mirrors each of its disks into those exports
//! ([`start_mirrors`], one `blockdev-mirror` job per disk, `sync: full`) until every job is
//! `ready` ([`poll_mirrors`]: the target holds the whole disk and every new write is copied
//! as it happens). The RAM migration then runs with `pause-before-switchover`: with the
//! guest paused, the source ends the jobs by `block-job-cancel` ([`complete_mirrors`]: a
//! ready mirror's cancel is its consistent completion) before the device state moves. On a
//! failure the jobs are cancelled ([`abort_mirrors`]) and the source's disks stay as they
//! were: the mirror only ever wrote the target's copy.
//!
//! The jobs run with `auto-dismiss: false`: a job that fails stays in `query-jobs`
//! (`concluded`, with its error) until this module dismisses it, so a failure is reported
//! with QEMU's reason instead of a job that is simply gone. While the RAM moves every poll
//! checks the jobs ([`check_ready`]): a job no longer `ready` fails the move.
//!
//! A disk is named alike on both ends: its format node (`disk0`, [`super::config::QemuDisk::node`])
//! is the export's name, the mirror job is `mirror-disk0` and the source's NBD client node
//! `mirror-disk0-nbd`.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};

use super::qmp::{
    BlockJobCancel, BlockdevAdd, BlockdevDel, Empty, JobDismiss, JobInfo, JobStatus, Qmp,
    QmpCommand, QmpError, QueryJobs,
};

/// Where the target exports the disks: its node address and the NBD port picked for this
/// migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdTarget {
    /// The target node's address.
    pub host: String,
    /// The NBD server's port.
    pub port: u16,
}

impl NbdTarget {
    /// `nbd://HOST:PORT/EXPORT` of one disk (IPv6 hosts bracketed), for logs and records.
    pub fn uri(&self, export: &str) -> String {
        if self.host.contains(':') {
            format!("nbd://[{}]:{}/{export}", self.host, self.port)
        } else {
            format!("nbd://{}:{}/{export}", self.host, self.port)
        }
    }

    /// Reads `nbd://HOST:PORT` (as [`NbdTarget::server_uri`] writes it).
    pub fn parse(uri: &str) -> Option<NbdTarget> {
        let rest = uri.strip_prefix("nbd://")?.trim_end_matches('/');
        let (host, port) = rest.rsplit_once(':')?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return None;
        }
        Some(NbdTarget {
            host: host.into(),
            port: port.parse().ok()?,
        })
    }

    /// `nbd://HOST:PORT` of the server.
    pub fn server_uri(&self) -> String {
        self.uri("").trim_end_matches('/').to_string()
    }

    /// The inet socket address QMP takes for it.
    fn inet(&self) -> Value {
        json!({"type": "inet", "host": self.host, "port": self.port.to_string()})
    }
}

/// `nbd-server-start` (target).
#[derive(Debug, Clone, Serialize)]
pub struct NbdServerStart {
    /// The listening address (QMP's legacy socket address form).
    pub addr: Value,
}
impl QmpCommand for NbdServerStart {
    const NAME: &'static str = "nbd-server-start";
    type Ret = Empty;
}

impl NbdServerStart {
    /// Listens on `target`'s address and port.
    pub fn on(target: &NbdTarget) -> Self {
        NbdServerStart {
            addr: json!({"type": "inet",
                         "data": {"host": target.host, "port": target.port.to_string()}}),
        }
    }
}

/// `nbd-server-stop` (target): stops the server and removes its exports.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct NbdServerStop;
impl QmpCommand for NbdServerStop {
    const NAME: &'static str = "nbd-server-stop";
    type Ret = Empty;
}

/// `block-export-add` of a writable NBD export (target).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockExportAdd {
    /// `nbd`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The export's id.
    pub id: String,
    /// The exported node.
    pub node_name: String,
    /// The name NBD clients ask for.
    pub name: String,
    /// Clients may write.
    pub writable: bool,
}
impl QmpCommand for BlockExportAdd {
    const NAME: &'static str = "block-export-add";
    type Ret = Empty;
}

impl BlockExportAdd {
    /// The writable export of disk node `node`, named after it.
    pub fn disk(node: &str) -> Self {
        BlockExportAdd {
            kind: "nbd",
            id: format!("export-{node}"),
            node_name: node.into(),
            name: node.into(),
            writable: true,
        }
    }
}

/// `blockdev-mirror` (source).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevMirror {
    /// The job's id.
    pub job_id: String,
    /// The mirrored node (the disk's format node).
    pub device: String,
    /// The node written to (the NBD client).
    pub target: String,
    /// `full`: the whole disk, not only what its top image holds.
    pub sync: &'static str,
    /// False: the job stays (`concluded`, with its error) until `job-dismiss`.
    pub auto_dismiss: bool,
}
impl QmpCommand for BlockdevMirror {
    const NAME: &'static str = "blockdev-mirror";
    type Ret = Empty;
}

/// The mirror job's id of disk node `node`.
pub fn job_id(node: &str) -> String {
    format!("mirror-{node}")
}

/// The source's NBD client node of disk node `node`.
pub fn client_node(node: &str) -> String {
    format!("mirror-{node}-nbd")
}

/// The `blockdev-add` of the NBD client node that writes into the target's export of `node`.
pub fn nbd_client(target: &NbdTarget, node: &str) -> BlockdevAdd {
    BlockdevAdd(json!({
        "driver": "nbd",
        "node-name": client_node(node),
        "server": target.inet(),
        "export": node,
    }))
}

/// The mirror job of disk node `node` into its NBD client node.
pub fn mirror(node: &str) -> BlockdevMirror {
    BlockdevMirror {
        job_id: job_id(node),
        device: node.into(),
        target: client_node(node),
        sync: "full",
        auto_dismiss: false,
    }
}

/// Errors of the disk copy.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// A QMP exchange failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// A mirror job ended or failed before it was ready.
    #[error("copy of disk {node} failed: {reason}")]
    Failed {
        /// The disk node.
        node: String,
        /// QEMU's reason.
        reason: String,
    },
    /// The copy was given up (the progress callback said so).
    #[error("the disk copy was cancelled")]
    Cancelled,
    /// The jobs were not ready in time.
    #[error("the disk copy was not done within {0:?}")]
    TimedOut(Duration),
}

/// Progress of the disk copy, summed over the disks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskCopy {
    /// Bytes copied so far.
    pub copied: u64,
    /// Bytes to copy (grows as the guest writes).
    pub total: u64,
    /// Disks whose job is ready.
    pub ready: usize,
    /// Disks copied.
    pub disks: usize,
}

impl DiskCopy {
    /// Share copied, 0–100 (100 once every job is ready).
    pub fn percent(&self) -> u8 {
        if self.disks > 0 && self.ready == self.disks {
            return 100;
        }
        if self.total == 0 {
            return 0;
        }
        (self.copied.saturating_mul(100) / self.total).min(99) as u8
    }

    /// Whether every job is ready.
    pub fn all_ready(&self) -> bool {
        self.ready == self.disks
    }
}

/// What the jobs of `nodes` say: the summed progress, or the first disk whose job is gone
/// or failed.
pub fn disk_copy(jobs: &[JobInfo], nodes: &[String]) -> Result<DiskCopy, MirrorError> {
    let mut c = DiskCopy {
        disks: nodes.len(),
        ..DiskCopy::default()
    };
    for node in nodes {
        let id = job_id(node);
        let Some(j) = jobs.iter().find(|j| j.id == id) else {
            return Err(MirrorError::Failed {
                node: node.clone(),
                reason: "its mirror job ended before it was ready".into(),
            });
        };
        match j.status {
            JobStatus::Ready | JobStatus::Standby => c.ready += 1,
            JobStatus::Aborting | JobStatus::Concluded | JobStatus::Null => {
                return Err(MirrorError::Failed {
                    node: node.clone(),
                    reason: j.error.clone().unwrap_or_else(|| "job aborted".into()),
                });
            }
            _ => {}
        }
        c.copied += j.current_progress;
        c.total += j.total_progress;
    }
    Ok(c)
}

/// Target: starts the NBD server on `target` and exports each disk node of `nodes`,
/// writable. The QEMU must wait in `-incoming defer` (the export activates its disks; the
/// guest runs only once the migration completes).
#[tracing::instrument(level = "info", skip(qmp))]
pub fn export_disks(qmp: &mut Qmp, target: &NbdTarget, nodes: &[String]) -> Result<(), QmpError> {
    qmp.execute(&NbdServerStart::on(target))?;
    for node in nodes {
        if let Err(e) = qmp.execute(&BlockExportAdd::disk(node)) {
            stop_exports(qmp);
            return Err(e);
        }
    }
    Ok(())
}

/// Target: stops the NBD server and its exports (best effort: none running is fine).
pub fn stop_exports(qmp: &mut Qmp) {
    if let Err(e) = qmp.execute(&NbdServerStop) {
        tracing::debug!(error = %e, "nbd-server-stop");
    }
}

/// `query-block-exports` (target).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryBlockExports;
impl QmpCommand for QueryBlockExports {
    const NAME: &'static str = "query-block-exports";
    type Ret = Vec<BlockExportInfo>;
}

/// One block export (`query-block-exports`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockExportInfo {
    /// The export's id.
    pub id: String,
    /// The exported node.
    pub node_name: String,
}

/// Target, before the guest may run here: stops the NBD server (which closes its exports,
/// cutting the source's clients, and waits for them to go) and checks that no export is
/// left holding a disk writable. An export still there is an error: the guest must not
/// run while a client could write its disk.
pub fn close_exports(qmp: &mut Qmp) -> Result<(), QmpError> {
    stop_exports(qmp);
    let left = qmp.execute(&QueryBlockExports)?;
    if let Some(e) = left.first() {
        return Err(QmpError::Protocol(format!(
            "export {} of node {} is still there after nbd-server-stop",
            e.id, e.node_name
        )));
    }
    Ok(())
}

/// Source: connects to the target's export of each disk and starts its mirror job. On an
/// error what was started is aborted.
#[tracing::instrument(level = "info", skip(qmp))]
pub fn start_mirrors(
    qmp: &mut Qmp,
    target: &NbdTarget,
    nodes: &[String],
) -> Result<(), MirrorError> {
    for (i, node) in nodes.iter().enumerate() {
        let started = qmp
            .execute(&nbd_client(target, node))
            .and_then(|_| qmp.execute(&mirror(node)).map(|_| ()));
        if let Err(e) = started {
            abort_mirrors(qmp, &nodes[..=i]);
            return Err(e.into());
        }
    }
    Ok(())
}

/// Source: polls the jobs every `poll` until all are ready, calling `progress` after each
/// poll (false gives up). On a failure, a timeout or a give-up the jobs are aborted.
pub fn poll_mirrors(
    qmp: &mut Qmp,
    nodes: &[String],
    poll: Duration,
    timeout: Duration,
    mut progress: impl FnMut(&DiskCopy) -> bool,
) -> Result<DiskCopy, MirrorError> {
    let started = Instant::now();
    let r = loop {
        let c = match qmp.execute(&QueryJobs) {
            Ok(jobs) => disk_copy(&jobs, nodes),
            Err(e) => Err(e.into()),
        };
        match c {
            Ok(c) if c.all_ready() => {
                progress(&c);
                break Ok(c);
            }
            Ok(c) if !progress(&c) => break Err(MirrorError::Cancelled),
            Ok(_) if started.elapsed() >= timeout => break Err(MirrorError::TimedOut(timeout)),
            Ok(_) => std::thread::sleep(poll),
            Err(e) => break Err(e),
        }
    };
    if r.is_err() {
        abort_mirrors(qmp, nodes);
    }
    r
}

/// Source, while the RAM moves: every job of `nodes` must still be `ready` (in sync with
/// the target). A job that failed (`concluded` with QEMU's error, e.g. the target's NBD
/// server gone), is being cancelled, or vanished fails the copy with that reason.
pub fn check_ready(qmp: &mut Qmp, nodes: &[String]) -> Result<(), MirrorError> {
    let jobs = qmp.execute(&QueryJobs)?;
    ready_or_failed(&jobs, nodes)
}

/// [`check_ready`] on one `query-jobs` reply.
fn ready_or_failed(jobs: &[JobInfo], nodes: &[String]) -> Result<(), MirrorError> {
    for node in nodes {
        let id = job_id(node);
        match jobs.iter().find(|j| j.id == id) {
            Some(j) if matches!(j.status, JobStatus::Ready | JobStatus::Standby) => {}
            Some(j) => {
                return Err(MirrorError::Failed {
                    node: node.clone(),
                    reason: match &j.error {
                        Some(e) => e.clone(),
                        None => format!("its mirror job is {:?}, no longer ready", j.status),
                    },
                });
            }
            None => {
                return Err(MirrorError::Failed {
                    node: node.clone(),
                    reason: "its mirror job is gone".into(),
                });
            }
        }
    }
    Ok(())
}

/// Source, guest paused (`pre-switchover`): every job must be `ready`; each is ended by
/// `block-job-cancel` (a ready mirror's cancel completes it without switching the source
/// over: the target then holds the disk as the guest left it, flushed) and waited for
/// until `concluded`. A job that concludes with an error, or with less copied than its
/// length, fails the copy. The concluded jobs are dismissed.
pub fn complete_mirrors(
    qmp: &mut Qmp,
    nodes: &[String],
    timeout: Duration,
) -> Result<(), MirrorError> {
    check_ready(qmp, nodes)?;
    for node in nodes {
        qmp.execute(&BlockJobCancel {
            device: job_id(node),
            force: None,
        })?;
    }
    let deadline = Instant::now() + timeout;
    let mut left: Vec<String> = nodes.to_vec();
    while !left.is_empty() {
        let jobs = qmp.execute(&QueryJobs)?;
        let mut still = Vec::new();
        for node in left {
            let id = job_id(&node);
            let Some(j) = jobs.iter().find(|j| j.id == id) else {
                return Err(MirrorError::Failed {
                    node,
                    reason: "its mirror job vanished while completing".into(),
                });
            };
            if j.status != JobStatus::Concluded {
                still.push(node);
                continue;
            }
            dismiss(qmp, &id);
            if let Some(reason) = &j.error {
                return Err(MirrorError::Failed {
                    node,
                    reason: reason.clone(),
                });
            }
            if j.current_progress != j.total_progress {
                return Err(MirrorError::Failed {
                    reason: format!(
                        "its mirror job ended with {} of {} bytes copied",
                        j.current_progress, j.total_progress
                    ),
                    node,
                });
            }
        }
        left = still;
        if left.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            return Err(MirrorError::TimedOut(timeout));
        }
        // A status change wakes us early; otherwise poll again.
        match qmp.wait_event("JOB_STATUS_CHANGE", Duration::from_millis(100), |_| true) {
            Ok(_) | Err(QmpError::Timeout { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// `job-dismiss` of a concluded job (best effort).
fn dismiss(qmp: &mut Qmp, id: &str) {
    if let Err(e) = qmp.execute(&JobDismiss { id: id.into() }) {
        tracing::debug!(error = %e, job = id, "job-dismiss");
    }
}

/// Source: cancels the jobs of `nodes` still there (forced: the target's copy is given
/// up), waits up to 10 s for them to conclude, dismisses them and deletes the NBD client
/// nodes. Best effort: errors are logged.
pub fn abort_mirrors(qmp: &mut Qmp, nodes: &[String]) {
    for node in nodes {
        let _ = qmp.execute(&BlockJobCancel {
            device: job_id(node),
            force: Some(true),
        });
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let jobs = match qmp.execute(&QueryJobs) {
            Ok(jobs) => jobs,
            Err(e) => {
                tracing::warn!(error = %e, "query-jobs while aborting the disk copy");
                break;
            }
        };
        let ours: Vec<&JobInfo> = jobs
            .iter()
            .filter(|j| nodes.iter().any(|n| job_id(n) == j.id))
            .collect();
        for j in ours.iter().filter(|j| j.status == JobStatus::Concluded) {
            if let Some(e) = &j.error {
                tracing::info!(job = %j.id, error = %e, "aborted mirror job");
            }
            dismiss(qmp, &j.id);
        }
        if ours.iter().all(|j| j.status == JobStatus::Concluded) {
            break;
        }
        if Instant::now() >= deadline {
            tracing::warn!("mirror jobs still there 10 s after their cancel");
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    delete_clients(qmp, nodes);
}

/// Source: the disk nodes whose mirror job (of a migration) is under way, as
/// [`start_mirrors`] named them; none when QEMU cannot be asked.
pub fn running_mirrors(qmp: &mut Qmp) -> Vec<String> {
    qmp.execute(&QueryJobs)
        .map(|jobs| mirrored_nodes(&jobs))
        .unwrap_or_default()
}

/// The disk nodes of the mirror jobs among `jobs`.
fn mirrored_nodes(jobs: &[JobInfo]) -> Vec<String> {
    jobs.iter()
        .filter(|j| j.kind == "mirror")
        .filter_map(|j| j.id.strip_prefix("mirror-"))
        .map(str::to_string)
        .collect()
}

/// Source: deletes the NBD client nodes (best effort).
pub fn delete_clients(qmp: &mut Qmp, nodes: &[String]) {
    for node in nodes {
        if let Err(e) = qmp.execute(&BlockdevDel {
            node_name: client_node(node),
        }) {
            tracing::debug!(error = %e, node = %node, "blockdev-del of the NBD client");
        }
    }
}

/// A port for the NBD server on `host`: one the system hands out for `host` (free now),
/// or `None` when `host` is not an address of this network namespace.
pub fn free_port(host: &str) -> Option<u16> {
    let l = std::net::TcpListener::bind((host, 0)).ok()?;
    l.local_addr().ok().map(|a| a.port())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn job(id: &str, status: &str, cur: u64, total: u64) -> JobInfo {
        serde_json::from_value(json!({"id": id, "type": "mirror", "status": status,
            "current-progress": cur, "total-progress": total}))
        .expect("job")
    }

    #[test]
    fn target_commands_export_each_disk_writable_on_the_node_address() {
        let t = NbdTarget {
            host: "10.1.0.2".into(),
            port: 10809,
        };
        assert_eq!(
            serde_json::to_value(NbdServerStart::on(&t)).expect("encode"),
            json!({"addr": {"type": "inet", "data": {"host": "10.1.0.2", "port": "10809"}}})
        );
        assert_eq!(
            serde_json::to_value(BlockExportAdd::disk("disk0")).expect("encode"),
            json!({"type": "nbd", "id": "export-disk0", "node-name": "disk0",
                   "name": "disk0", "writable": true})
        );
        assert_eq!(t.uri("disk0"), "nbd://10.1.0.2:10809/disk0");
        assert_eq!(t.server_uri(), "nbd://10.1.0.2:10809");
        assert_eq!(NbdTarget::parse(&t.server_uri()), Some(t));
        let v6 = NbdTarget {
            host: "fd00::2".into(),
            port: 1,
        };
        assert_eq!(v6.server_uri(), "nbd://[fd00::2]:1");
        assert_eq!(NbdTarget::parse(&v6.server_uri()), Some(v6));
        assert_eq!(NbdTarget::parse("tcp:1.2.3.4:5"), None);
        assert_eq!(NbdTarget::parse("nbd://:5"), None);
    }

    #[test]
    fn source_commands_mirror_each_disk_into_the_export_of_the_same_name() {
        let t = NbdTarget {
            host: "10.1.0.2".into(),
            port: 10809,
        };
        assert_eq!(
            nbd_client(&t, "disk1").0,
            json!({"driver": "nbd", "node-name": "mirror-disk1-nbd",
                   "server": {"type": "inet", "host": "10.1.0.2", "port": "10809"},
                   "export": "disk1"})
        );
        assert_eq!(
            serde_json::to_value(mirror("disk1")).expect("encode"),
            json!({"job-id": "mirror-disk1", "device": "disk1",
                   "target": "mirror-disk1-nbd", "sync": "full", "auto-dismiss": false})
        );
    }

    #[test]
    fn progress_sums_the_jobs_and_a_missing_or_failed_job_fails_the_copy() {
        let nodes = vec!["disk0".to_string(), "disk1".to_string()];
        let c = disk_copy(
            &[
                job("mirror-disk0", "ready", 100, 100),
                job("mirror-disk1", "running", 50, 300),
                job("backup-x", "running", 0, 9),
            ],
            &nodes,
        )
        .expect("running");
        assert_eq!((c.copied, c.total, c.ready, c.percent()), (150, 400, 1, 37));
        assert!(!c.all_ready());
        let c = disk_copy(
            &[
                job("mirror-disk0", "ready", 100, 100),
                job("mirror-disk1", "standby", 300, 300),
            ],
            &nodes,
        )
        .expect("ready");
        assert!(c.all_ready());
        assert_eq!(c.percent(), 100);
        let gone = disk_copy(&[job("mirror-disk0", "ready", 1, 1)], &nodes).expect_err("gone");
        assert!(gone.to_string().contains("disk1"), "{gone}");
        let mut failed = job("mirror-disk0", "concluded", 1, 9);
        failed.error = Some("Connection reset by peer".into());
        let e = disk_copy(&[failed], &nodes[..1]).expect_err("failed");
        assert!(e.to_string().contains("Connection reset"), "{e}");
        assert_eq!(DiskCopy::default().percent(), 0);
        let mut backup = job("mirror-x", "running", 0, 1);
        backup.kind = "backup".into();
        assert_eq!(
            mirrored_nodes(&[job("mirror-disk0", "ready", 1, 1), backup]),
            ["disk0"]
        );
    }
}
