//! The schedule runner: runs due `BackupSchedule`s (each occurrence at most once, missed
//! occurrences after downtime once), then prunes by retention. Time comes from a [`Clock`] so
//! tests can drive it; the last run of each schedule persists in a small JSON file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use stead_schema::kinds::{BackupMode, BackupScheduleSpec, Compression, Retention};
use tracing::{error, info, info_span};

use super::BackupError;
use super::hooks::{BackupHooks, Target, backup_target};
use super::retention;
use super::schedule::{Due, Schedule};
use super::store::{BackupOptions, BackupStore, DEFAULT_ZSTD_LEVEL};

/// A source of time.
pub trait Clock: Send + Sync {
    /// The current time.
    fn now(&self) -> DateTime<Utc>;
    /// Sleeps until `t` (or earlier when asked to stop); returns `false` to stop the runner.
    fn sleep_until(&self, t: DateTime<Utc>) -> bool;
}

/// The real clock. The runner it drives runs until its process is stopped (a backup cut
/// short leaves no manifest; the next gc removes its chunks).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn sleep_until(&self, t: DateTime<Utc>) -> bool {
        sleep_until_unless(t, || false)
    }
}

/// Sleeps on the wall clock until `t`: true then, or false as soon as `stopped` says so
/// (asked before each step). Short steps notice a stop request and wall-clock jumps
/// (suspend, NTP).
pub fn sleep_until_unless(t: DateTime<Utc>, stopped: impl Fn() -> bool) -> bool {
    loop {
        if stopped() {
            return false;
        }
        let left = t - Utc::now();
        if left <= chrono::Duration::zero() {
            return true;
        }
        let step = left
            .to_std()
            .unwrap_or_default()
            .min(std::time::Duration::from_secs(1));
        std::thread::sleep(step);
    }
}

/// A schedule ready to run.
pub struct Job {
    /// `metadata.name` of the BackupSchedule.
    pub name: String,
    /// When.
    pub schedule: Schedule,
    /// Prune rules (periods in the schedule's zone).
    pub retention: Retention,
    /// snapshot | stop, passed to the hooks.
    pub mode: BackupMode,
    /// zstd level or none.
    pub zstd_level: Option<i32>,
    /// Where.
    pub store: BackupStore,
    /// What.
    pub targets: Vec<Target>,
}

impl Job {
    /// A job from a BackupSchedule spec, its storage pool's path and resolved targets.
    pub fn from_spec(
        name: &str,
        spec: &BackupScheduleSpec,
        pool_path: &Path,
        targets: Vec<Target>,
    ) -> Result<Self, BackupError> {
        Ok(Job {
            name: name.to_string(),
            schedule: Schedule::for_spec(spec)?,
            retention: spec.retention,
            mode: spec.mode,
            zstd_level: match spec.compression {
                Compression::Zstd => Some(DEFAULT_ZSTD_LEVEL),
                Compression::None => None,
            },
            store: BackupStore::for_pool(pool_path),
            targets,
        })
    }
}

/// Persisted state of one schedule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobState {
    /// The occurrence the last run stood for (or when the schedule was first seen).
    pub last_slot: Option<String>,
    /// When the last run started.
    pub last_run: Option<String>,
    /// `ok` or the error of the last run.
    pub last_result: Option<String>,
    /// When the last run without an error started.
    #[serde(default)]
    pub last_success: Option<String>,
    /// Runs so far.
    pub runs: u64,
}

/// What one due job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    /// Schedule name.
    pub job: String,
    /// The occurrence run.
    pub slot: DateTime<Utc>,
    /// Occurrences collapsed into this run (1 = on time).
    pub missed: u32,
    /// Backups written.
    pub backups: Vec<String>,
    /// Backups pruned afterwards.
    pub pruned: Vec<String>,
    /// Errors (per target), empty on success.
    pub errors: Vec<String>,
}

/// Runs jobs on a clock.
pub struct Runner<C: Clock> {
    jobs: Vec<Job>,
    clock: C,
    hooks: Arc<dyn BackupHooks>,
    state_path: PathBuf,
    state: BTreeMap<String, JobState>,
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

fn fmt_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

impl<C: Clock> Runner<C> {
    /// A runner keeping its state in `<state_dir>/backup/schedules.json`.
    pub fn new(
        jobs: Vec<Job>,
        clock: C,
        hooks: Arc<dyn BackupHooks>,
        state_dir: &Path,
    ) -> Result<Self, BackupError> {
        let state_path = state_dir.join("backup").join("schedules.json");
        let state = match std::fs::read(&state_path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| BackupError::Parse {
                path: state_path.clone(),
                source: e,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                return Err(BackupError::Io {
                    op: "read",
                    path: state_path,
                    source: e,
                });
            }
        };
        Ok(Runner {
            jobs,
            clock,
            hooks,
            state_path,
            state,
        })
    }

    /// The persisted state, by schedule name.
    pub fn state(&self) -> &BTreeMap<String, JobState> {
        &self.state
    }

    fn save(&self) -> Result<(), BackupError> {
        let data = serde_json::to_vec_pretty(&self.state).map_err(|e| BackupError::Parse {
            path: self.state_path.clone(),
            source: e,
        })?;
        super::store::write_atomic(&self.state_path, &data)
    }

    /// Runs every job that is due now, once each; returns what ran.
    pub fn tick(&mut self) -> Result<Vec<RunOutcome>, BackupError> {
        let now = self.clock.now();
        let mut out = Vec::new();
        for i in 0..self.jobs.len() {
            let job = &self.jobs[i];
            let st = self.state.entry(job.name.clone()).or_default();
            let Some(last) = st.last_slot.as_deref().and_then(parse_time) else {
                // First sight: start counting now, like cron.
                st.last_slot = Some(fmt_time(now));
                self.save()?;
                continue;
            };
            let Due::Run { slot, missed } = job.schedule.due(Some(last), now) else {
                continue;
            };
            let outcome = run_job(job, self.hooks.as_ref(), slot, missed, now);
            let st = self.state.entry(job.name.clone()).or_default();
            st.last_slot = Some(fmt_time(slot));
            st.last_run = Some(fmt_time(now));
            st.runs += 1;
            if outcome.errors.is_empty() {
                st.last_success = Some(fmt_time(now));
                st.last_result = Some("ok".into());
            } else {
                st.last_result = Some(outcome.errors.join("; "));
            }
            self.save()?;
            out.push(outcome);
        }
        Ok(out)
    }

    /// The earliest instant any job is due next.
    pub fn next_wake(&self) -> Option<DateTime<Utc>> {
        let now = self.clock.now();
        self.jobs
            .iter()
            .filter_map(|j| {
                let last = self
                    .state
                    .get(&j.name)?
                    .last_slot
                    .as_deref()
                    .and_then(parse_time);
                match j.schedule.due(last.or(Some(now)), now) {
                    Due::Run { .. } => Some(now),
                    Due::Wait(t) => Some(t),
                    Due::Never => None,
                }
            })
            .min()
    }

    /// Runs until the clock says stop (or no job will ever fire again).
    pub fn run(&mut self) -> Result<(), BackupError> {
        loop {
            for o in self.tick()? {
                info!(job = %o.job, backups = o.backups.len(), pruned = o.pruned.len(), errors = o.errors.len(), "schedule ran");
            }
            let Some(t) = self.next_wake() else {
                return Ok(());
            };
            if !self.clock.sleep_until(t) {
                return Ok(());
            }
        }
    }
}

fn run_job(
    job: &Job,
    hooks: &dyn BackupHooks,
    slot: DateTime<Utc>,
    missed: u32,
    now: DateTime<Utc>,
) -> RunOutcome {
    let _span = info_span!("schedule", name = %job.name, slot = %fmt_time(slot)).entered();
    if missed > 1 {
        info!(missed, "catching up once after missed occurrences");
    }
    let mut o = RunOutcome {
        job: job.name.clone(),
        slot,
        missed,
        backups: Vec::new(),
        pruned: Vec::new(),
        errors: Vec::new(),
    };
    for t in &job.targets {
        let opts = BackupOptions {
            time: Some(now),
            zstd_level: job.zstd_level,
            ..BackupOptions::default()
        };
        let res = backup_target(&job.store, t, job.mode, hooks, opts);
        match res {
            Ok(info) => o.backups.push(info.id),
            Err(e) => {
                error!(resource = %t.resource, error = %e, "backup failed");
                o.errors.push(format!("{}: {e}", t.resource));
                continue;
            }
        }
        if retention::has_rules(&job.retention) {
            match job.store.prune_manifests(
                Some(&t.resource),
                &job.retention,
                &job.schedule.zone(),
                false,
            ) {
                Ok(r) => o.pruned.extend(r.removed),
                Err(e) => {
                    error!(resource = %t.resource, error = %e, "prune failed");
                    o.errors.push(format!("{}: prune: {e}", t.resource));
                }
            }
        }
    }
    // One garbage collection for the whole run, not one per target.
    if retention::has_rules(&job.retention)
        && let Err(e) = job.store.gc()
    {
        error!(error = %e, "garbage collection failed");
        o.errors.push(format!("gc: {e}"));
    }
    o
}
