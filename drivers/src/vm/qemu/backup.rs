//! Backups of running QEMU VMs: one consistent point in time across all disks, incremental
//! through persistent dirty bitmaps, into the ordinary chunk store.
//!
//! 1. Per disk, [`BITMAP`] (`stead-backup`, persistent: it lives in the qcow2 file and
//!    survives QEMU restarts) holds the blocks written since the last backup that
//!    completed. It drives an incremental backup only if it is consistent, has the store's
//!    block granularity, and the store's [`BitmapRecord`] says it counts from the newest
//!    backup of this VM and this very image file; otherwise the disk is read in full and
//!    the consistency line says why.
//! 2. With the guest agent, the guest file systems are frozen; then one QMP `transaction`
//!    adds a scratch bitmap [`NEXT`] and starts a `blockdev-backup` job per disk (sync
//!    `full`, or `bitmap` with [`BITMAP`] and `bitmap-mode: never`) into a temporary
//!    qcow2: the jobs' point in time is the transaction. The guest is thawed at once,
//!    whatever happened.
//! 3. When the jobs are done, the temporary images are read through `qemu-img map`: only
//!    what the jobs wrote (dirty blocks, or the allocated disk) is read; clean blocks keep
//!    the previous backup's chunks ([`crate::backup::blocks`]).
//! 4. Only after the manifest is written does a second transaction make [`BITMAP`] equal to
//!    [`NEXT`] (the writes since the point in time) and drop [`NEXT`]. A failed or
//!    cancelled backup drops [`NEXT`] alone: [`BITMAP`] was never cleared, so the next
//!    backup still reads every changed block.

use std::fs;
use std::os::fd::AsFd;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stead_schema::VolumeFormat;
use tracing::{info, info_span, warn};

use crate::backup::BackupError;
use crate::backup::blocks::{BitmapRecord, IMAGE_BLOCK, ImageInput, parse_map};
use crate::backup::store::{BackupInfo, BackupOptions, BackupStore};
use crate::storage::qemu_img;

/// The persistent dirty bitmap of each disk: blocks written since the last backup.
pub const BITMAP: &str = "stead-backup";
/// The scratch bitmap started at a backup's point in time.
pub const NEXT: &str = "stead-backup-next";
/// How often the jobs are polled.
const POLL: Duration = Duration::from_millis(20);

/// Runs QMP commands ([`super::qmp::Qmp`] implements it).
pub trait QmpExec {
    /// Runs `command` with `arguments` (an object, or `null` for none): its `return` value,
    /// or the error QEMU gave, as text.
    fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String>;

    /// Passes `fd` to QEMU in a new fd set (`add-fd`) and returns the set's id, or `None`
    /// when this channel cannot pass descriptors (the file is then opened by its path).
    fn add_fd(&mut self, fd: BorrowedFd<'_>) -> Result<Option<u64>, String> {
        let _ = fd;
        Ok(None)
    }
}

impl QmpExec for super::qmp::Qmp {
    fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        self.execute_raw(command, arguments)
            .map_err(|e| e.to_string())
    }

    fn add_fd(&mut self, fd: BorrowedFd<'_>) -> Result<Option<u64>, String> {
        super::qmp::Qmp::add_fd(self, fd, None, Some("stead backup target"))
            .map(|i| Some(i.fdset_id))
            .map_err(|e| e.to_string())
    }
}

/// Freezes and thaws the guest's file systems (the guest agent client implements it).
pub trait GuestFreeze {
    /// `guest-fsfreeze-freeze`: the number of file systems frozen.
    fn freeze(&mut self) -> Result<u64, String>;
    /// `guest-fsfreeze-thaw`: the number thawed.
    fn thaw(&mut self) -> Result<u64, String>;
}

impl GuestFreeze for super::qga::Qga {
    fn freeze(&mut self) -> Result<u64, String> {
        self.fsfreeze_freeze(FREEZE_TIMEOUT)
            .map_err(|e| e.to_string())
    }
    fn thaw(&mut self) -> Result<u64, String> {
        self.fsfreeze_thaw().map_err(|e| e.to_string())
    }
}

/// Longest wait for the guest to flush and freeze its file systems.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for the guest agent to answer its first sync.
const AGENT_TIMEOUT: Duration = Duration::from_secs(5);

/// One disk of the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Input name in the backup (the volume name).
    pub input: String,
    /// Its format node in QEMU (what the guest device reads).
    pub node: String,
    /// Its image file.
    pub image: PathBuf,
}

/// How to run a VM backup.
#[derive(Debug, Clone)]
pub struct VmBackupOptions {
    /// Where the temporary job targets are made (a directory on the host, e.g. the pool).
    pub work_dir: PathBuf,
    /// Limit of each job in bytes per second (`None`: as fast as it goes).
    pub speed: Option<u64>,
    /// The UEFI NVRAM vars file, backed up as input [`NVRAM_INPUT`].
    pub nvram: Option<PathBuf>,
}

/// Input name of the UEFI NVRAM vars file.
pub const NVRAM_INPUT: &str = "uefi-vars";

fn qmp_err(what: &str) -> impl FnOnce(String) -> BackupError + '_ {
    move |e| BackupError::Invalid(format!("QEMU {what}: {e}"))
}

/// A disk whose backup job runs.
#[derive(Debug)]
struct DiskJob {
    disk: Disk,
    job: String,
    target_node: String,
    target: PathBuf,
    /// The fd set QEMU reaches the target through (it may run as a user that cannot open
    /// the store's directory).
    fdset: Option<u64>,
    size: u64,
    /// The previous backup's blocks (incremental), or why the disk is read in full.
    base: Result<crate::backup::blocks::Base, String>,
    /// [`BITMAP`] exists and is usable (kept and cleared at commit, else created then).
    bitmap_ok: bool,
    /// [`BITMAP`] is made persistent (qcow2).
    persistent: bool,
}

/// Backup jobs started at one point in time; [`finish`] or [`abort`] it.
#[derive(Debug)]
pub struct Started {
    jobs: Vec<DiskJob>,
    consistency: String,
    /// The transaction went through: the jobs are ours to cancel.
    running: bool,
}

impl Started {
    /// How the point in time was obtained (for the manifest).
    pub fn consistency(&self) -> &str {
        &self.consistency
    }

    /// QEMU's job ids, one per disk.
    pub fn job_ids(&self) -> Vec<String> {
        self.jobs.iter().map(|j| j.job.clone()).collect()
    }
}

/// The format node QEMU reads each `(input, image)` through: the `qcow2` or `raw` node
/// whose file is `image` (compared after resolving symlinks), whatever the engine named it.
pub fn find_disks(
    qmp: &mut dyn QmpExec,
    images: &[(String, PathBuf)],
) -> Result<Vec<Disk>, BackupError> {
    let nodes = qmp
        .execute("query-named-block-nodes", json!({"flat": true}))
        .map_err(qmp_err("query-named-block-nodes"))?;
    let canon = |p: &Path| fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let list = nodes.as_array().cloned().unwrap_or_default();
    images
        .iter()
        .map(|(input, image)| {
            let want = canon(image);
            let node = list
                .iter()
                .filter(|n| matches!(n["drv"].as_str(), Some("qcow2" | "raw")))
                .find(|n| {
                    n["file"]
                        .as_str()
                        .is_some_and(|f| canon(Path::new(f)) == want)
                })
                .and_then(|n| n["node-name"].as_str())
                .ok_or_else(|| {
                    BackupError::Invalid(format!(
                        "QEMU has no disk node for {} ({input})",
                        image.display()
                    ))
                })?;
            Ok(Disk {
                input: input.clone(),
                node: node.to_string(),
                image: image.clone(),
            })
        })
        .collect()
}

/// What QEMU says of [`BITMAP`] on one node.
#[derive(Debug, PartialEq, Eq)]
enum BitmapState {
    Missing,
    Usable,
    Unusable(String),
}

/// The virtual size of `node` and the state of its [`BITMAP`] (and whether [`NEXT`]
/// exists), from `query-named-block-nodes`.
/// What a disk's node says for a backup.
#[derive(Debug, PartialEq, Eq)]
struct NodeState {
    /// Virtual size.
    size: u64,
    /// [`BITMAP`].
    bitmap: BitmapState,
    /// [`NEXT`] exists (left by an interrupted backup).
    next: bool,
    /// The image keeps bitmaps (qcow2); a raw image's bitmap lives as long as its QEMU.
    persistent: bool,
}

fn node_state(nodes: &Value, node: &str) -> Result<NodeState, BackupError> {
    let n = nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node-name"] == node))
        .ok_or_else(|| BackupError::Invalid(format!("QEMU has no block node {node}")))?;
    let size = n["image"]["virtual-size"]
        .as_u64()
        .ok_or_else(|| BackupError::Invalid(format!("QEMU node {node}: no virtual size")))?;
    let persistent = n["drv"] == "qcow2";
    let bitmaps = n["dirty-bitmaps"].as_array().cloned().unwrap_or_default();
    let find = |name: &str| bitmaps.iter().find(|b| b["name"] == name).cloned();
    let bitmap = match find(BITMAP) {
        None => BitmapState::Missing,
        Some(b) => bitmap_state(&b, persistent),
    };
    Ok(NodeState {
        size,
        bitmap,
        next: find(NEXT).is_some(),
        persistent,
    })
}

fn bitmap_state(b: &Value, persistent: bool) -> BitmapState {
    if b["inconsistent"].as_bool() == Some(true) {
        BitmapState::Unusable("dirty bitmap inconsistent (QEMU was not shut down cleanly)".into())
    } else if b["granularity"].as_u64() != Some(IMAGE_BLOCK) {
        BitmapState::Unusable(format!(
            "dirty bitmap granularity {} is not {IMAGE_BLOCK}",
            b["granularity"]
        ))
    } else if b["persistent"].as_bool() != Some(persistent)
        || b["recording"].as_bool() != Some(true)
    {
        BitmapState::Unusable("dirty bitmap not recording, or not kept with the image".into())
    } else {
        BitmapState::Usable
    }
}

/// Whether `rec` says the bitmap of `image` counts from backup `base`.
fn record_matches(rec: Option<&BitmapRecord>, base: &str, image: &Path) -> Result<(), String> {
    let rec = rec.ok_or("no record of the backup the dirty bitmap counts from")?;
    let md = fs::metadata(image).map_err(|e| format!("{}: {e}", image.display()))?;
    if rec.backup != base {
        return Err(format!(
            "dirty bitmap counts from {}, not the newest backup {base}",
            rec.backup
        ));
    }
    if rec.image != image || rec.dev != md.dev() || rec.ino != md.ino() {
        return Err("the disk image was replaced since the last backup".into());
    }
    Ok(())
}

/// Plans one disk: incremental if everything agrees, else full (with the reason).
fn plan_disk(
    store: &BackupStore,
    resource: &str,
    disk: &Disk,
    size: u64,
    state: &BitmapState,
) -> Result<crate::backup::blocks::Base, String> {
    match state {
        BitmapState::Missing => return Err("no dirty bitmap yet".into()),
        BitmapState::Unusable(why) => return Err(why.clone()),
        BitmapState::Usable => {}
    }
    let base = store.image_base(resource, &disk.input, size)?;
    let rec = store.bitmap_record(resource, &disk.input);
    record_matches(rec.as_ref(), &base.id, &disk.image)?;
    Ok(base)
}

/// Creates the temporary qcow2 a job writes into (`path` is absolute: QEMU opens it).
fn create_target(path: &Path, size: u64) -> Result<(), BackupError> {
    let _ = fs::remove_file(path);
    qemu_img::create(path, VolumeFormat::Qcow2, size, None)
        .map_err(|e| BackupError::Invalid(format!("backup job target: {e}")))
}

/// Runs a tool; its stdout, or an error with its stderr.
fn run_tool(cmd: &mut Command) -> Result<Vec<u8>, BackupError> {
    let out = cmd
        .output()
        .map_err(|e| BackupError::Invalid(format!("run {:?}: {e}", cmd.get_program())))?;
    if !out.status.success() {
        return Err(BackupError::Invalid(format!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out.stdout)
}

/// Freezes the guest (if it has an agent), starts every disk's backup job in one
/// transaction, and thaws at once. Nothing is left behind on an error.
pub fn start(
    qmp: &mut dyn QmpExec,
    agent: Option<&mut dyn GuestFreeze>,
    store: &BackupStore,
    resource: &str,
    disks: &[Disk],
    opts: &VmBackupOptions,
) -> Result<Started, BackupError> {
    let _span = info_span!("qemu_backup_start", resource = resource).entered();
    let nodes = qmp
        .execute("query-named-block-nodes", json!({"flat": true}))
        .map_err(qmp_err("query-named-block-nodes"))?;
    let mut started = Started {
        jobs: Vec::new(),
        consistency: String::new(),
        running: false,
    };
    for (i, d) in disks.iter().enumerate() {
        let NodeState {
            size,
            bitmap: state,
            next,
            persistent,
        } = node_state(&nodes, &d.node)?;
        if next {
            // Left by an interrupted backup: BITMAP still has every bit.
            qmp.execute(
                "block-dirty-bitmap-remove",
                json!({"node": d.node, "name": NEXT}),
            )
            .map_err(qmp_err("remove a stale scratch bitmap"))?;
        }
        let base = plan_disk(store, resource, d, size, &state);
        if matches!(state, BitmapState::Unusable(_)) {
            qmp.execute(
                "block-dirty-bitmap-remove",
                json!({"node": d.node, "name": BITMAP}),
            )
            .map_err(qmp_err("remove an unusable dirty bitmap"))?;
        }
        let target = opts.work_dir.join(format!(
            ".{}.stead-backup-{}.qcow2",
            d.input,
            std::process::id()
        ));
        started.jobs.push(DiskJob {
            disk: d.clone(),
            job: format!("stead-backup-{i}"),
            target_node: format!("stead-backup-target-{i}"),
            target,
            fdset: None,
            size,
            base,
            bitmap_ok: state == BitmapState::Usable,
            persistent,
        });
    }
    match start_jobs(qmp, agent, &mut started, opts) {
        Ok(()) => Ok(started),
        Err(e) => {
            abort(qmp, started);
            Err(e)
        }
    }
}

/// Makes the targets, then freeze → transaction → thaw.
fn start_jobs(
    qmp: &mut dyn QmpExec,
    agent: Option<&mut dyn GuestFreeze>,
    started: &mut Started,
    opts: &VmBackupOptions,
) -> Result<(), BackupError> {
    for j in started.jobs.iter_mut() {
        create_target(&j.target, j.size)?;
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&j.target)
            .map_err(BackupError::io("open", &j.target))?;
        j.fdset = qmp
            .add_fd(file.as_fd())
            .map_err(qmp_err("pass the backup target"))?;
        let filename = match j.fdset {
            Some(set) => format!("/dev/fdset/{set}"),
            None => j.target.to_string_lossy().into_owned(),
        };
        qmp.execute(
            "blockdev-add",
            json!({"node-name": j.target_node, "driver": "qcow2",
                   "file": {"driver": "file", "filename": filename}}),
        )
        .map_err(qmp_err("add the backup target"))?;
    }
    let actions = transaction_actions(&started.jobs, opts.speed);
    let t = Instant::now();
    let mut point = "crash-consistent (no guest agent)".to_string();
    let mut frozen = None;
    if let Some(agent) = agent {
        match agent.freeze() {
            Ok(n) => frozen = Some((agent, n)),
            Err(e) => {
                // A freeze that failed half-way leaves some file systems frozen.
                let _ = agent.thaw();
                warn!(error = %e, "guest agent freeze failed: the backup is crash-consistent");
                point = format!("crash-consistent (guest agent freeze failed: {e})");
            }
        }
    }
    let r = qmp.execute("transaction", json!({"actions": actions}));
    // Thawed at once, whether the jobs started or not.
    let thawed = frozen.map(|(agent, n)| (agent.thaw(), n, t.elapsed().as_millis()));
    r.map_err(qmp_err("start the backup jobs"))?;
    started.running = true;
    if let Some((thawed, frozen, ms)) = thawed {
        thawed.map_err(|e| BackupError::Invalid(format!("guest agent thaw: {e}")))?;
        info!(
            frozen,
            ms, "guest file systems frozen for the point in time"
        );
        point = format!("guest agent froze {frozen} file systems for {ms} ms");
    }
    describe(started, point);
    Ok(())
}

/// Sets the consistency line: how the point in time was had, and each disk's read.
fn describe(started: &mut Started, point: String) {
    let disks: Vec<String> = started
        .jobs
        .iter()
        .map(|j| match &j.base {
            Ok(b) => format!("{} incremental from {}", j.disk.input, b.id),
            Err(why) => format!("{} full read ({why})", j.disk.input),
        })
        .collect();
    started.consistency = format!(
        "QEMU backup job point in time, {point}; {}",
        disks.join("; ")
    );
}

/// One transaction: per disk, the scratch bitmap and the backup job.
fn transaction_actions(jobs: &[DiskJob], speed: Option<u64>) -> Vec<Value> {
    let mut actions = Vec::new();
    for j in jobs {
        actions.push(json!({"type": "block-dirty-bitmap-add", "data": {
            "node": j.disk.node, "name": NEXT, "granularity": IMAGE_BLOCK, "persistent": false}}));
        let mut data = json!({"job-id": j.job, "device": j.disk.node, "target": j.target_node,
            "auto-dismiss": false});
        if j.base.is_ok() {
            data["sync"] = json!("bitmap");
            data["bitmap"] = json!(BITMAP);
            data["bitmap-mode"] = json!("never");
        } else {
            data["sync"] = json!("full");
        }
        if let Some(s) = speed {
            data["speed"] = json!(s);
        }
        actions.push(json!({"type": "blockdev-backup", "data": data}));
    }
    actions
}

/// Waits until every job of `started` has concluded, then dismisses them; the first job
/// error (e.g. cancelled, or an I/O error) is returned.
pub fn wait(qmp: &mut dyn QmpExec, started: &Started) -> Result<(), BackupError> {
    let ids = started.job_ids();
    let mut first_err = None;
    loop {
        let jobs = qmp
            .execute("query-jobs", Value::Null)
            .map_err(qmp_err("query-jobs"))?;
        let mine: Vec<&Value> = jobs
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|j| ids.iter().any(|i| j["id"] == **i))
                    .collect()
            })
            .unwrap_or_default();
        if mine.len() < ids.len() {
            return Err(BackupError::Invalid(
                "a backup job vanished from QEMU".into(),
            ));
        }
        if mine.iter().all(|j| j["status"] == "concluded") {
            for j in &mine {
                if let Some(e) = j["error"].as_str() {
                    first_err.get_or_insert_with(|| format!("backup job {}: {e}", j["id"]));
                }
            }
            break;
        }
        std::thread::sleep(POLL);
    }
    for id in &ids {
        if let Err(e) = qmp.execute("job-dismiss", json!({"id": id})) {
            warn!(job = %id, error = %e, "cannot dismiss a backup job");
        }
    }
    first_err.map_or(Ok(()), |e| Err(BackupError::Invalid(e)))
}

/// Reads what the jobs wrote into `store` as one backup, then moves each [`BITMAP`] on to
/// the point in time. On an error the bitmaps keep every bit (see [`abort`]).
pub fn finish(
    qmp: &mut dyn QmpExec,
    store: &BackupStore,
    started: Started,
    resource: &str,
    spec: &Value,
    vm_opts: &VmBackupOptions,
    mut opts: BackupOptions,
) -> Result<BackupInfo, BackupError> {
    let _span = info_span!("qemu_backup_finish", resource = resource).entered();
    let r = (|| {
        for j in &started.jobs {
            qmp.execute("blockdev-del", json!({"node-name": j.target_node}))
                .map_err(qmp_err("close the backup target"))?;
        }
        release_fdsets(qmp, &started);
        let mut inputs = Vec::new();
        for j in &started.jobs {
            inputs.push(image_input(j)?);
        }
        if let Some(nv) = &vm_opts.nvram {
            inputs.push(ImageInput::raw_file(NVRAM_INPUT, nv)?);
        }
        opts.consistency = Some(started.consistency.clone());
        store.backup_images(resource, spec, &inputs, &opts)
    })();
    let info = match r {
        Ok(i) => i,
        Err(e) => {
            abort(qmp, started);
            return Err(e);
        }
    };
    commit(qmp, store, &started, resource, &info.id);
    remove_targets(&started);
    Ok(info)
}

/// The image input of one disk: the job's target, read through its map.
fn image_input(j: &DiskJob) -> Result<ImageInput, BackupError> {
    let map = run_tool(
        Command::new("qemu-img")
            .args(["map", "--output=json", "-f", "qcow2"])
            .arg(&j.target),
    )?;
    Ok(ImageInput {
        name: j.disk.input.clone(),
        source: j.disk.image.clone(),
        size: j.size,
        read_from: j.target.clone(),
        extents: parse_map(&map)?,
        base: j.base.as_ref().ok().map(|b| b.chunks.clone()),
        meta: fs::metadata(&j.disk.image).ok(),
    })
}

/// Makes each [`BITMAP`] count from the point in time of backup `id` (it becomes
/// [`NEXT`]), atomically per disk, and records that. A failure only costs a full read next
/// time.
fn commit(qmp: &mut dyn QmpExec, store: &BackupStore, started: &Started, resource: &str, id: &str) {
    for j in &started.jobs {
        let node = &j.disk.node;
        let mut actions = Vec::new();
        if j.bitmap_ok {
            actions.push(json!({"type": "block-dirty-bitmap-clear",
                "data": {"node": node, "name": BITMAP}}));
        } else {
            actions.push(
                json!({"type": "block-dirty-bitmap-add", "data": {"node": node,
                "name": BITMAP, "granularity": IMAGE_BLOCK, "persistent": j.persistent}}),
            );
        }
        actions.push(json!({"type": "block-dirty-bitmap-merge",
            "data": {"node": node, "target": BITMAP, "bitmaps": [NEXT]}}));
        actions.push(json!({"type": "block-dirty-bitmap-remove",
            "data": {"node": node, "name": NEXT}}));
        if let Err(e) = qmp.execute("transaction", json!({"actions": actions})) {
            warn!(disk = %j.disk.input, error = %e, "cannot move the dirty bitmap on: the next backup reads it in full");
            continue;
        }
        let rec = fs::metadata(&j.disk.image).map(|md| BitmapRecord {
            backup: id.to_string(),
            image: j.disk.image.clone(),
            dev: md.dev(),
            ino: md.ino(),
        });
        let saved = rec
            .map_err(BackupError::io("stat", &j.disk.image))
            .and_then(|rec| store.save_bitmap_record(resource, &j.disk.input, &rec));
        if let Err(e) = saved {
            warn!(disk = %j.disk.input, error = %e, "cannot record the dirty bitmap's backup: the next backup reads it in full");
        }
    }
}

/// Undoes a backup that did not complete: cancels its jobs, drops the targets and the
/// scratch bitmaps. [`BITMAP`] is untouched, so no change is lost.
pub fn abort(qmp: &mut dyn QmpExec, started: Started) {
    for j in &started.jobs {
        let _ = qmp.execute("blockdev-del", json!({"node-name": j.target_node}));
    }
    if started.running {
        cancel_jobs(qmp, &started);
    }
    release_fdsets(qmp, &started);
    remove_targets(&started);
}

/// Drops the fd sets the targets were passed in (QEMU closes its copies).
fn release_fdsets(qmp: &mut dyn QmpExec, started: &Started) {
    for set in started.jobs.iter().filter_map(|j| j.fdset) {
        let _ = qmp.execute("remove-fd", json!({"fdset-id": set}));
    }
}

/// Cancels the jobs of `started` (an atomic transaction started them: all or none exist),
/// waits until QEMU dropped them, and removes the scratch bitmaps.
fn cancel_jobs(qmp: &mut dyn QmpExec, started: &Started) {
    for j in &started.jobs {
        // Each may already be gone; errors only mean there was nothing to undo.
        let _ = qmp.execute("job-cancel", json!({"id": j.job, "force": true}));
    }
    for j in &started.jobs {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline && job_exists(qmp, &j.job) {
            let _ = qmp.execute("job-dismiss", json!({"id": j.job}));
            std::thread::sleep(POLL);
        }
        let _ = qmp.execute("blockdev-del", json!({"node-name": j.target_node}));
        let _ = qmp.execute(
            "block-dirty-bitmap-remove",
            json!({"node": j.disk.node, "name": NEXT}),
        );
    }
}

fn job_exists(qmp: &mut dyn QmpExec, id: &str) -> bool {
    qmp.execute("query-jobs", Value::Null)
        .ok()
        .and_then(|v| v.as_array().map(|a| a.iter().any(|j| j["id"] == id)))
        .unwrap_or(false)
}

fn remove_targets(started: &Started) {
    for j in &started.jobs {
        if let Err(e) = fs::remove_file(&j.target)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(path = %j.target.display(), error = %e, "cannot remove a backup job target");
        }
    }
}

/// Backs up running VM `resource` (its `disks`, and NVRAM) into `store`: [`start`],
/// [`wait`], [`finish`]; on any error the jobs are undone and the bitmaps keep their bits.
#[allow(clippy::too_many_arguments)]
pub fn backup_vm(
    qmp: &mut dyn QmpExec,
    agent: Option<&mut dyn GuestFreeze>,
    store: &BackupStore,
    resource: &str,
    spec: &Value,
    disks: &[Disk],
    vm_opts: &VmBackupOptions,
    opts: BackupOptions,
) -> Result<BackupInfo, BackupError> {
    let started = start(qmp, agent, store, resource, disks, vm_opts)?;
    if let Err(e) = wait(qmp, &started) {
        abort(qmp, started);
        return Err(e);
    }
    finish(qmp, store, started, resource, spec, vm_opts, opts)
}

/// Backs up running VM `resource` through its QMP connection: `images` are its disks'
/// `(input, image file)`; `agent_socket`, when the VM has a guest agent, freezes the guest
/// (an agent that does not answer makes the backup crash-consistent, and says so). The job
/// targets are made in the store's directory.
#[allow(clippy::too_many_arguments)]
pub fn backup_running_vm(
    qmp: &mut dyn QmpExec,
    agent_socket: Option<&Path>,
    store: &BackupStore,
    resource: &str,
    spec: &Value,
    images: &[(String, PathBuf)],
    nvram: Option<PathBuf>,
    opts: BackupOptions,
) -> Result<BackupInfo, BackupError> {
    let disks = find_disks(qmp, images)?;
    let mut agent = agent_socket.and_then(|p| match super::qga::Qga::connect(p, AGENT_TIMEOUT) {
        Ok(a) => Some(a),
        Err(e) => {
            warn!(error = %e, "guest agent not answering: the backup is crash-consistent");
            None
        }
    });
    fs::create_dir_all(store.root()).map_err(BackupError::io("create", store.root()))?;
    let vm_opts = VmBackupOptions {
        work_dir: store.root().to_path_buf(),
        speed: None,
        nvram,
    };
    let agent = agent.as_mut().map(|a| a as &mut dyn GuestFreeze);
    backup_vm(qmp, agent, store, resource, spec, &disks, &vm_opts, opts)
}

/// Format of a restored disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    /// A raw image.
    Raw,
    /// A qcow2 image (converted from the restored raw data).
    Qcow2,
}

/// Restores disk `input` of backup `id` to the new image `dest` in `format`, bootable by a
/// new VM.
pub fn restore_disk(
    store: &BackupStore,
    id: &str,
    input: &str,
    dest: &Path,
    format: DiskFormat,
) -> Result<u64, BackupError> {
    if format == DiskFormat::Raw {
        return store.restore_image(id, input, dest);
    }
    if fs::symlink_metadata(dest).is_ok() {
        return Err(BackupError::Invalid(format!(
            "{} exists; refusing to overwrite",
            dest.display()
        )));
    }
    let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("disk");
    let raw = dest.with_file_name(format!(".{name}.raw-{}", std::process::id()));
    let _ = fs::remove_file(&raw);
    let n = store.restore_image(id, input, &raw)?;
    let tmp = dest.with_file_name(format!(".{name}.qcow2-{}", std::process::id()));
    let r = run_tool(
        Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&tmp),
    )
    .and_then(|_| fs::rename(&tmp, dest).map_err(BackupError::io("rename", &tmp)));
    let _ = fs::remove_file(&raw);
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r.map(|()| n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(bitmaps: Value) -> Value {
        json!([{"node-name": "disk0", "drv": "qcow2", "image": {"virtual-size": 1024},
                "dirty-bitmaps": bitmaps}])
    }

    #[test]
    fn the_bitmap_state_comes_from_query_named_block_nodes() {
        let ok = json!({"name": BITMAP, "granularity": IMAGE_BLOCK, "persistent": true, "recording": true});
        let st = node_state(&nodes(json!([ok])), "disk0").expect("node");
        assert_eq!(
            st,
            NodeState {
                size: 1024,
                bitmap: BitmapState::Usable,
                next: false,
                persistent: true
            }
        );
        let st = node_state(
            &nodes(json!([{"name": NEXT}, {"name": BITMAP, "inconsistent": true}])),
            "disk0",
        )
        .expect("node");
        assert!(matches!(st.bitmap, BitmapState::Unusable(w) if w.contains("inconsistent")));
        assert!(st.next);
        let fine =
            json!({"name": BITMAP, "granularity": 65536, "persistent": true, "recording": true});
        let st = node_state(&nodes(json!([fine])), "disk0").expect("node");
        assert!(matches!(st.bitmap, BitmapState::Unusable(w) if w.contains("granularity")));
        let st = node_state(&nodes(Value::Null), "disk0").expect("node");
        assert_eq!(st.bitmap, BitmapState::Missing);
        assert!(node_state(&nodes(Value::Null), "disk1").is_err());
        // A raw image keeps no bitmap: QEMU's own (not persistent) is the usable one.
        let raw = json!([{"node-name": "r", "drv": "raw", "image": {"virtual-size": 1},
            "dirty-bitmaps": [{"name": BITMAP, "granularity": IMAGE_BLOCK, "persistent": false,
                               "recording": true}]}]);
        let st = node_state(&raw, "r").expect("node");
        assert_eq!((st.bitmap, st.persistent), (BitmapState::Usable, false));
    }

    #[test]
    fn a_record_must_name_the_base_and_the_same_image_file() {
        let t = tempfile::tempdir().expect("tmp");
        let img = t.path().join("a.qcow2");
        fs::write(&img, b"x").expect("write");
        let md = fs::metadata(&img).expect("stat");
        let rec = BitmapRecord {
            backup: "VirtualMachine/a/1".into(),
            image: img.clone(),
            dev: md.dev(),
            ino: md.ino(),
        };
        assert!(record_matches(Some(&rec), "VirtualMachine/a/1", &img).is_ok());
        assert!(record_matches(Some(&rec), "VirtualMachine/a/2", &img).is_err());
        assert!(record_matches(None, "VirtualMachine/a/1", &img).is_err());
        fs::remove_file(&img).expect("rm");
        fs::write(t.path().join("other"), b"y").expect("keep the inode busy");
        fs::write(&img, b"x").expect("replace");
        let replaced = record_matches(Some(&rec), "VirtualMachine/a/1", &img);
        let same_ino = fs::metadata(&img).expect("stat").ino() == md.ino();
        assert!(same_ino || replaced.is_err());
    }

    #[test]
    fn incremental_jobs_keep_the_bitmap_and_full_jobs_take_none() {
        let job = |base| DiskJob {
            disk: Disk {
                input: "d".into(),
                node: "n".into(),
                image: "/i".into(),
            },
            job: "j".into(),
            target_node: "t".into(),
            target: "/t".into(),
            fdset: None,
            size: 1,
            base,
            bitmap_ok: true,
            persistent: true,
        };
        let inc = job(Ok(crate::backup::blocks::Base {
            id: "x".into(),
            chunks: Vec::new(),
        }));
        let a = transaction_actions(&[inc, job(Err("first".into()))], Some(5));
        assert_eq!(a.len(), 4);
        assert_eq!(a[1]["data"]["sync"], "bitmap");
        assert_eq!(a[1]["data"]["bitmap-mode"], "never");
        assert_eq!(a[1]["data"]["speed"], 5);
        assert_eq!(a[3]["data"]["sync"], "full");
        assert!(a[3]["data"].get("bitmap").is_none());
        assert_eq!(a[2]["data"]["name"], NEXT);
    }

    /// A QMP that answers `transaction` with `result` and records the commands.
    struct FakeQmp {
        result: Result<Value, String>,
        calls: Vec<String>,
    }

    impl QmpExec for FakeQmp {
        fn execute(&mut self, command: &str, _: Value) -> Result<Value, String> {
            self.calls.push(command.to_string());
            self.result.clone()
        }
    }

    /// A guest agent whose freeze answers `freeze`, recording the calls.
    struct FakeAgent {
        freeze: Result<u64, String>,
        calls: Vec<&'static str>,
    }

    impl GuestFreeze for FakeAgent {
        fn freeze(&mut self) -> Result<u64, String> {
            self.calls.push("freeze");
            self.freeze.clone()
        }
        fn thaw(&mut self) -> Result<u64, String> {
            self.calls.push("thaw");
            Ok(0)
        }
    }

    #[test]
    fn the_point_in_time_says_how_it_was_had_and_the_guest_is_always_thawed() {
        let opts = VmBackupOptions {
            work_dir: "/nonexistent".into(),
            speed: None,
            nvram: None,
        };
        let run = |tx: Result<Value, String>, freeze: Option<Result<u64, String>>| {
            let mut qmp = FakeQmp {
                result: tx,
                calls: Vec::new(),
            };
            let mut agent = freeze.map(|freeze| FakeAgent {
                freeze,
                calls: Vec::new(),
            });
            let mut started = Started {
                jobs: Vec::new(),
                consistency: String::new(),
                running: false,
            };
            let r = start_jobs(
                &mut qmp,
                agent.as_mut().map(|a| a as &mut dyn GuestFreeze),
                &mut started,
                &opts,
            );
            assert_eq!(qmp.calls, ["transaction"]);
            (r, started, agent.map(|a| a.calls).unwrap_or_default())
        };

        let (r, st, calls) = run(Ok(Value::Null), None);
        assert!(r.is_ok() && st.running);
        assert!(st.consistency.contains("crash-consistent (no guest agent)"));
        assert!(calls.is_empty());

        let (r, st, calls) = run(Ok(Value::Null), Some(Ok(3)));
        assert!(r.is_ok() && st.running);
        assert!(
            st.consistency.contains("guest agent froze 3 file systems"),
            "{}",
            st.consistency
        );
        assert_eq!(calls, ["freeze", "thaw"]);

        let (r, st, calls) = run(Ok(Value::Null), Some(Err("no fsfreeze".into())));
        assert!(r.is_ok() && st.running);
        assert!(
            st.consistency
                .contains("crash-consistent (guest agent freeze failed: no fsfreeze)"),
            "{}",
            st.consistency
        );
        assert_eq!(calls, ["freeze", "thaw"]);

        let (r, st, calls) = run(Err("job id in use".into()), Some(Ok(3)));
        assert!(r.is_err() && !st.running);
        assert_eq!(calls, ["freeze", "thaw"]);
    }
}
