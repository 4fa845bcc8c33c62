//! Housekeeping beside the reconcile loop, through the [`Housekeeping`] trait that the
//! binary implements with the CLI's own library code (no child processes):
//! - backup schedules registered by the BackupSchedule driver (`<state-dir>/schedules`)
//!   run on a dedicated thread, stopped and started again when the set of schedules
//!   changes (or the runner ends), and stopped when the controller stops;
//! - the runner's `backup/schedules.json` is exported as
//!   `stead_backup_last_run_timestamp_seconds`, `…_last_success_…` and
//!   `stead_backup_last_run_failed` per schedule;
//! - environments (`stead env`): their count, ages and teardown failures are exported,
//!   and expired ones are torn down (the `stead env gc` code path), one at a time with
//!   the reconciles (the work lock), since the drivers keep process-wide scope.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use stead_reconciler::state::now_secs;
use tracing::{info, warn};

use crate::Shared;
use crate::env::{self, EnvRecord};
use crate::metrics::Metrics;

/// A failed housekeeping job (logged; the next tick tries again).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HousekeepingError(pub String);

/// A request to stop a long-running housekeeping job; clones share the request.
#[derive(Debug, Clone, Default)]
pub struct StopSignal(Arc<AtomicBool>);

impl StopSignal {
    /// A signal not yet raised.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the job to stop.
    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether the job was asked to stop.
    pub fn is_stopped(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The host work the controller does beside reconciling. Every method blocks: the
/// controller calls them on blocking threads, never on the async runtime.
pub trait Housekeeping: Send + Sync {
    /// The environments' records (unreadable ones left out).
    fn environments(&self) -> Vec<EnvRecord>;
    /// Tears down every environment whose TTL has run out (what `stead env gc` does).
    fn collect_expired(&self) -> Result<(), HousekeepingError>;
    /// Runs the registered backup schedules until `stop` is raised or no schedule will
    /// fire again (what `stead backup daemon` does).
    fn run_backup_schedules(&self, stop: &StopSignal) -> Result<(), HousekeepingError>;
    /// Restarts a running container or VM (an operator action; desired state is not
    /// touched). Returns what was done.
    fn restart_workload(&self, id: &stead_schema::ResourceId) -> Result<String, HousekeepingError> {
        Err(HousekeepingError(format!(
            "restarting {id} is not available in this controller"
        )))
    }
    /// Runs the BackupSchedule `schedule` once now (what `stead backup run` does).
    fn backup_now(&self, schedule: &str) -> Result<String, HousekeepingError> {
        Err(HousekeepingError(format!(
            "running backup schedule {schedule} is not available in this controller"
        )))
    }
    /// Verifies the newest backup of `schedule` (what `stead backup verify` does).
    fn verify_backup(&self, schedule: &str) -> Result<String, HousekeepingError> {
        Err(HousekeepingError(format!(
            "verifying the backups of {schedule} is not available in this controller"
        )))
    }
    /// Attaches to a running container's or VM's serial console (what `stead console`
    /// does): a stream of its output that takes input (the web UI's console page).
    fn open_console(
        &self,
        id: &stead_schema::ResourceId,
    ) -> Result<std::os::unix::net::UnixStream, HousekeepingError> {
        Err(HousekeepingError(format!(
            "the console of {id} is not available in this controller"
        )))
    }
    /// Connects to a running QEMU VM's VNC server (a unix socket in its run dir; the web
    /// UI's screen page relays it to noVNC).
    fn open_vnc(
        &self,
        id: &stead_schema::ResourceId,
    ) -> Result<std::os::unix::net::UnixStream, HousekeepingError> {
        Err(HousekeepingError(format!(
            "the screen of {id} is not available in this controller"
        )))
    }
    /// Whether this host is a node of a cluster (cheap: no etcd read). The web UI
    /// offers its Cluster page only then.
    fn is_cluster_node(&self) -> bool {
        false
    }
    /// What `stead cluster status -o json` reads from etcd, when this host is a node of a
    /// cluster (`None`: not a cluster).
    fn cluster_status(&self) -> Option<Result<serde_json::Value, HousekeepingError>> {
        None
    }
    /// The backups of `id` with their last verify (none known: empty).
    fn backups(
        &self,
        _id: &stead_schema::ResourceId,
    ) -> Result<Vec<crate::view::BackupEntry>, HousekeepingError> {
        Ok(Vec::new())
    }
}

/// What the housekeeping loop reads from the controller's state dir.
#[derive(Debug, Clone)]
pub(crate) struct Paths {
    /// `<state-dir>/schedules`: the BackupSchedule driver's registrations.
    schedules: PathBuf,
    /// `<state-dir>/backup/schedules.json`: the schedule runner's state.
    backup_state: PathBuf,
    /// The state dir (environment records and teardown failures).
    state_dir: PathBuf,
}

impl Paths {
    pub(crate) fn new(state_dir: &Path) -> Self {
        Paths {
            schedules: state_dir.join("schedules"),
            backup_state: state_dir.join("backup/schedules.json"),
            state_dir: state_dir.to_path_buf(),
        }
    }
}

/// The backup schedule runner's thread and the set of schedules it was started for.
#[derive(Default)]
struct BackupThread {
    key: String,
    running: Option<(StopSignal, JoinHandle<()>)>,
}

impl BackupThread {
    /// Starts, stops or restarts the runner for the schedules `key` names: a changed set
    /// stops the runner and starts a new one once the old has ended (a backup under way
    /// finishes first); a runner that ended starts again while schedules exist.
    fn follow(&mut self, key: String, hk: &Arc<dyn Housekeeping>) {
        let alive = self.running.as_ref().is_some_and(|(_, h)| !h.is_finished());
        if key == self.key && (alive || key.is_empty()) {
            return;
        }
        if let Some((stop, handle)) = &self.running {
            stop.stop();
            if !handle.is_finished() {
                info!("backup schedules changed: waiting for the runner to stop");
                return;
            }
        }
        self.running = None;
        self.key = key;
        if !self.key.is_empty() {
            self.running = start_runner(hk.clone());
        }
    }
}

impl Drop for BackupThread {
    fn drop(&mut self) {
        if let Some((stop, _)) = &self.running {
            stop.stop();
        }
    }
}

/// Starts the backup schedule runner on its own thread.
fn start_runner(hk: Arc<dyn Housekeeping>) -> Option<(StopSignal, JoinHandle<()>)> {
    let stop = StopSignal::new();
    let signal = stop.clone();
    let spawned = std::thread::Builder::new()
        .name("backup-schedules".into())
        .spawn(move || {
            let _span = tracing::info_span!("backup_schedules").entered();
            match hk.run_backup_schedules(&signal) {
                Ok(()) => info!("backup schedules: runner stopped"),
                Err(e) => warn!(error = %e, "backup schedules: runner failed"),
            }
        });
    match spawned {
        Ok(handle) => {
            info!("backup schedules: runner started");
            Some((stop, handle))
        }
        Err(e) => {
            warn!(error = %e, "cannot start the backup schedule runner");
            None
        }
    }
}

/// The state one housekeeping tick carries to the next.
#[derive(Default)]
struct Tick {
    backups: BackupThread,
    failures_seen: u64,
}

impl Tick {
    /// One round: follow the schedules, export metrics, collect expired environments.
    /// Blocking (file reads, teardowns).
    fn run(&mut self, hk: &Arc<dyn Housekeeping>, shared: &Shared, paths: &Paths) {
        self.backups.follow(schedules_key(&paths.schedules), hk);
        let records = hk.environments();
        let expired = export_environments(&shared.metrics, &records, now_secs());
        export_backup_state(&shared.metrics, &paths.backup_state);
        if expired {
            let _work = shared.work.lock().unwrap_or_else(|p| p.into_inner());
            match hk.collect_expired() {
                Ok(()) => info!("expired environments collected"),
                Err(e) => warn!(error = %e, "env gc failed"),
            }
        }
        let failures = env::teardown_failures(&paths.state_dir);
        if failures > self.failures_seen {
            shared
                .metrics
                .environment_teardown_failures
                .inc_by(failures - self.failures_seen);
            self.failures_seen = failures;
        }
    }
}

/// Runs housekeeping every `every` until aborted; each round runs on a blocking thread.
/// Dropping the task stops the backup schedule runner.
pub(crate) async fn housekeeping_task(
    shared: Arc<Shared>,
    hk: Arc<dyn Housekeeping>,
    paths: Paths,
    every: Duration,
) {
    let tick = Arc::new(Mutex::new(Tick::default()));
    loop {
        let (tick, shared, hk, paths) = (tick.clone(), shared.clone(), hk.clone(), paths.clone());
        let span = tracing::Span::current();
        let round = tokio::task::spawn_blocking(move || {
            let _span = span.entered();
            let mut t = tick.lock().unwrap_or_else(|p| p.into_inner());
            t.run(&hk, &shared, &paths);
        });
        if let Err(e) = round.await {
            warn!(error = %e, "housekeeping round panicked");
        }
        tokio::time::sleep(every).await;
    }
}

/// What identifies the set of registered backup schedules: their names and contents.
fn schedules_key(dir: &Path) -> String {
    let mut parts: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .map(|e| {
            let body = std::fs::read_to_string(e.path()).unwrap_or_default();
            format!("{}={body}", e.file_name().to_string_lossy())
        })
        .collect();
    parts.sort();
    parts.join("\n")
}

/// Sets the environment gauges from `records` at `now`; whether any has expired.
fn export_environments(m: &Metrics, records: &[EnvRecord], now: f64) -> bool {
    m.environment_age.reset();
    for r in records {
        m.environment_age
            .with_label_values(&[r.name.as_str()])
            .set(r.age(now));
    }
    m.environments.set(records.len() as f64);
    records.iter().any(|r| r.is_expired(now))
}

/// Sets the backup schedule gauges from the runner's state file (absent: no schedules).
fn export_backup_state(m: &Metrics, path: &Path) {
    let state: serde_json::Value = match std::fs::read_to_string(path) {
        Ok(t) => match serde_json::from_str(&t) {
            Ok(v) => v,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "unreadable backup state");
                return;
            }
        },
        Err(_) => serde_json::Value::Null,
    };
    m.backup_last_run.reset();
    m.backup_last_success.reset();
    m.backup_last_failed.reset();
    let ts = |v: &serde_json::Value| {
        v.as_str()
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.timestamp() as f64)
    };
    let Some(obj) = state.as_object() else { return };
    for (name, st) in obj {
        if let Some(t) = ts(&st["lastRun"]) {
            m.backup_last_run.with_label_values(&[name.as_str()]).set(t);
            let failed = st["lastResult"].as_str().is_some_and(|r| r != "ok");
            m.backup_last_failed
                .with_label_values(&[name.as_str()])
                .set(if failed { 1.0 } else { 0.0 });
        }
        if let Some(t) = ts(&st["lastSuccess"]) {
            m.backup_last_success
                .with_label_values(&[name.as_str()])
                .set(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts calls; the runner waits for its stop signal.
    #[derive(Default)]
    struct Fake {
        records: Vec<EnvRecord>,
        gcs: AtomicUsize,
        runs: AtomicUsize,
    }

    impl Housekeeping for Fake {
        fn environments(&self) -> Vec<EnvRecord> {
            self.records.clone()
        }
        fn collect_expired(&self) -> Result<(), HousekeepingError> {
            self.gcs.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn run_backup_schedules(&self, stop: &StopSignal) -> Result<(), HousekeepingError> {
            self.runs.fetch_add(1, Ordering::SeqCst);
            while !stop.is_stopped() {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(())
        }
    }

    fn rec(name: &str, created_at: f64, ttl: Option<u64>) -> EnvRecord {
        EnvRecord {
            name: name.into(),
            created_at,
            ttl_seconds: ttl,
            manifests: vec![],
            netns: String::new(),
            pool_areas: vec![],
        }
    }

    fn wait_finished(b: &BackupThread) {
        for _ in 0..400 {
            if b.running.as_ref().is_none_or(|(_, h)| h.is_finished()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("runner did not stop");
    }

    #[test]
    fn the_runner_starts_with_schedules_and_restarts_when_they_change() {
        let fake = Arc::new(Fake::default());
        let hk: Arc<dyn Housekeeping> = fake.clone();
        let mut b = BackupThread::default();
        b.follow(String::new(), &hk);
        assert!(b.running.is_none(), "no schedules, no runner");
        b.follow("a.json=1".into(), &hk);
        b.follow("a.json=1".into(), &hk);
        assert!(b.running.is_some());
        // A changed set stops the runner; the new one starts once the old has ended.
        b.follow("a.json=2".into(), &hk);
        wait_finished(&b);
        b.follow("a.json=2".into(), &hk);
        assert_eq!(b.key, "a.json=2");
        assert!(b.running.as_ref().is_some_and(|(s, _)| !s.is_stopped()));
        // No schedules left: the runner stops and is not started again.
        b.follow(String::new(), &hk);
        wait_finished(&b);
        b.follow(String::new(), &hk);
        assert!(b.running.is_none());
        for _ in 0..400 {
            if fake.runs.load(Ordering::SeqCst) == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(fake.runs.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn dropping_the_housekeeping_state_stops_the_runner() {
        let hk: Arc<dyn Housekeeping> = Arc::new(Fake::default());
        let mut b = BackupThread::default();
        b.follow("a.json=1".into(), &hk);
        let stop = b.running.as_ref().map(|(s, _)| s.clone()).expect("running");
        drop(b);
        assert!(stop.is_stopped());
    }

    #[test]
    fn environment_metrics_count_every_record_and_flag_expired_ones() {
        let m = Metrics::new().expect("metrics");
        let live = [rec("a", 100.0, Some(60)), rec("b", 50.0, None)];
        assert!(!export_environments(&m, &live, 130.0));
        assert_eq!(m.environments.get(), 2.0);
        assert_eq!(m.environment_age.with_label_values(&["a"]).get(), 30.0);
        assert!(export_environments(&m, &live, 160.0));
    }

    #[test]
    fn a_tick_collects_expired_environments_and_counts_teardown_failures() {
        let t = tempfile::tempdir().expect("tmp");
        let fake = Arc::new(Fake {
            records: vec![rec("old", 0.0, Some(1))],
            ..Fake::default()
        });
        let hk: Arc<dyn Housekeeping> = fake.clone();
        let shared = crate::tests::shared();
        std::fs::create_dir_all(env::envs_dir(t.path())).expect("mkdir");
        env::count_teardown_failure(t.path()).expect("count");
        let mut tick = Tick::default();
        tick.run(&hk, &shared, &Paths::new(t.path()));
        assert_eq!(fake.gcs.load(Ordering::SeqCst), 1);
        assert_eq!(shared.metrics.environment_teardown_failures.get(), 1);
        tick.run(&hk, &shared, &Paths::new(t.path()));
        assert_eq!(shared.metrics.environment_teardown_failures.get(), 1);
    }

    #[test]
    fn the_schedules_key_names_each_registration_and_its_content() {
        let t = tempfile::tempdir().expect("tmp");
        assert_eq!(schedules_key(&t.path().join("absent")), "");
        std::fs::write(t.path().join("b.json"), "2").expect("write");
        std::fs::write(t.path().join("a.json"), "1").expect("write");
        std::fs::write(t.path().join("notes.txt"), "x").expect("write");
        assert_eq!(schedules_key(t.path()), "a.json=1\nb.json=2");
    }

    #[test]
    fn backup_state_is_exported_per_schedule() {
        let t = tempfile::tempdir().expect("tmp");
        let p = t.path().join("schedules.json");
        std::fs::write(
            &p,
            r#"{"nightly":{"lastRun":"2026-01-01T00:00:00Z","lastResult":"1 error","lastSuccess":"2025-12-31T00:00:00Z"}}"#,
        )
        .expect("write");
        let m = Metrics::new().expect("metrics");
        export_backup_state(&m, &p);
        assert_eq!(
            m.backup_last_run.with_label_values(&["nightly"]).get(),
            1_767_225_600.0
        );
        assert_eq!(
            m.backup_last_failed.with_label_values(&["nightly"]).get(),
            1.0
        );
        assert_eq!(
            m.backup_last_success.with_label_values(&["nightly"]).get(),
            1_767_139_200.0
        );
    }
}
