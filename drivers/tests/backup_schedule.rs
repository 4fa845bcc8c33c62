//! Schedule runner on an injected clock: every-minute schedule over a simulated hour creates
//! backups and prunes them by retention; no double runs; missed runs after downtime run once.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use stead_drivers::backup::BackupError;
use stead_drivers::backup::hooks::{BackupHooks, Prepared, Target};
use stead_drivers::backup::runner::{Clock, Job, Runner};
use stead_drivers::backup::store::BackupStore;
use stead_schema::kinds::{BackupMode, BackupScheduleSpec};

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .expect("time")
        .with_timezone(&Utc)
}

/// A clock that jumps to whatever instant the runner sleeps until, and stops at `end`.
#[derive(Clone)]
struct FakeClock {
    now: Arc<Mutex<DateTime<Utc>>>,
    end: DateTime<Utc>,
}

impl FakeClock {
    fn set(&self, to: DateTime<Utc>) {
        *self.now.lock().expect("clock") = to;
    }
}

impl Clock for FakeClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock().expect("clock")
    }
    fn sleep_until(&self, until: DateTime<Utc>) -> bool {
        if until > self.end {
            return false;
        }
        let mut n = self.now.lock().expect("clock");
        if until > *n {
            *n = until;
        }
        true
    }
}

/// Writes new content into the volume before every backup (the "workload" changes) and
/// counts calls.
struct ChangingData {
    file: PathBuf,
    clock: FakeClock,
    calls: AtomicU64,
}

impl BackupHooks for ChangingData {
    fn prepare(&self, target: &Target, mode: BackupMode) -> Result<Prepared, BackupError> {
        assert_eq!(mode, BackupMode::Snapshot);
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let body = format!("run {n} at {}\n", self.clock.now()).repeat(100);
        std::fs::write(&self.file, body).map_err(|e| BackupError::Io {
            op: "write",
            path: self.file.clone(),
            source: e,
        })?;
        Ok(Prepared {
            inputs: target.inputs.clone(),
            stat_of: Default::default(),
            consistency: format!("test hook, call {n}"),
            cleanup: Box::new(|| Ok(())),
            run: None,
        })
    }
}

fn spec(yaml_json: serde_json::Value) -> BackupScheduleSpec {
    serde_json::from_value(yaml_json).expect("spec")
}

#[test]
fn every_minute_for_an_hour_backs_up_and_prunes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pool = tmp.path().join("pool");
    let state = tmp.path().join("state");
    let vol = tmp.path().join("vol.raw");
    let start = t("2025-06-01T10:30:30Z");
    let clock = FakeClock {
        now: Arc::new(Mutex::new(start)),
        end: t("2025-06-01T11:30:30Z"),
    };
    let hooks = Arc::new(ChangingData {
        file: vol.clone(),
        clock: clock.clone(),
        calls: AtomicU64::new(0),
    });
    let s = spec(serde_json::json!({
        "schedule": "* * * * *",
        "timezone": "UTC",
        "targets": {"names": ["Volume/data"]},
        "storage": "backups",
        "retention": {"keepLast": 3, "keepHourly": 2}
    }));
    let target = Target {
        resource: "Volume/data".into(),
        spec: serde_json::json!({"size": "1Mi"}),
        inputs: vec![("data.raw".into(), vol.clone())],
    };
    let job = Job::from_spec("every-minute", &s, &pool, vec![target.clone()]).expect("job");
    let mut runner = Runner::new(vec![job], clock.clone(), hooks.clone(), &state).expect("runner");
    runner.run().expect("run");

    // 10:31 … 11:30: sixty occurrences, each run exactly once.
    assert_eq!(hooks.calls.load(Ordering::SeqCst), 60);
    let st = runner.state().get("every-minute").expect("state");
    assert_eq!(st.runs, 60);
    assert_eq!(st.last_slot.as_deref(), Some("2025-06-01T11:30:00Z"));
    assert_eq!(st.last_result.as_deref(), Some("ok"));

    // keepLast 3 → 11:30, 11:29, 11:28; keepHourly 2 → hour 11 already kept, so 10:59 for
    // hour 10 (10:31–10:58 are its removed siblings), and no older hour exists.
    let store = BackupStore::for_pool(&pool);
    let ids: Vec<String> = store
        .list(None)
        .expect("list")
        .into_iter()
        .map(|b| b.id)
        .collect();
    assert_eq!(
        ids,
        vec![
            "Volume/data/2025-06-01T10:59:00Z",
            "Volume/data/2025-06-01T11:28:00Z",
            "Volume/data/2025-06-01T11:29:00Z",
            "Volume/data/2025-06-01T11:30:00Z",
        ]
    );
    // Garbage collection left exactly the chunks of the kept backups (one each: unique content).
    let chunks: usize = std::fs::read_dir(pool.join("backups/.chunks"))
        .expect("chunks")
        .map(|d| {
            std::fs::read_dir(d.expect("entry").path())
                .expect("sub")
                .count()
        })
        .sum();
    assert_eq!(chunks, 4);
    for id in &ids {
        assert!(store.verify(id).expect("verify").ok());
    }

    // A restarted runner (same state dir) does not run the 11:30 occurrence again.
    let job = Job::from_spec("every-minute", &s, &pool, vec![target.clone()]).expect("job");
    let mut runner = Runner::new(vec![job], clock.clone(), hooks.clone(), &state).expect("runner");
    assert!(runner.tick().expect("tick").is_empty());
    assert_eq!(hooks.calls.load(Ordering::SeqCst), 60);

    // Downtime 11:30:30 → 13:00:10: 90 occurrences missed, one catch-up run.
    clock.set(t("2025-06-01T13:00:10Z"));
    let ran = runner.tick().expect("tick");
    assert_eq!(ran.len(), 1);
    assert_eq!(ran[0].slot, t("2025-06-01T13:00:00Z"));
    assert_eq!(ran[0].missed, 90);
    assert!(ran[0].errors.is_empty(), "{:?}", ran[0].errors);
    assert_eq!(hooks.calls.load(Ordering::SeqCst), 61);
    assert!(
        runner.tick().expect("tick").is_empty(),
        "no second run for the same slot"
    );
    assert_eq!(runner.next_wake(), Some(t("2025-06-01T13:01:00Z")));
}

#[test]
fn first_start_waits_for_the_next_occurrence() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let clock = FakeClock {
        now: Arc::new(Mutex::new(t("2025-06-01T01:59:00Z"))),
        end: t("2025-06-01T01:59:00Z"),
    };
    let hooks = Arc::new(ChangingData {
        file: tmp.path().join("v"),
        clock: clock.clone(),
        calls: AtomicU64::new(0),
    });
    let s = spec(serde_json::json!({
        "schedule": "0 2 * * *", "timezone": "UTC",
        "targets": {"names": ["Volume/v"]}, "storage": "b"
    }));
    let target = Target {
        resource: "Volume/v".into(),
        spec: serde_json::json!({}),
        inputs: vec![("v".into(), tmp.path().join("v"))],
    };
    let job = Job::from_spec("nightly", &s, &tmp.path().join("pool"), vec![target]).expect("job");
    let mut runner = Runner::new(
        vec![job],
        clock.clone(),
        hooks.clone(),
        &tmp.path().join("state"),
    )
    .expect("runner");
    assert!(runner.tick().expect("tick").is_empty());
    assert_eq!(runner.next_wake(), Some(t("2025-06-01T02:00:00Z")));
    clock.set(t("2025-06-01T02:00:00Z"));
    let ran = runner.tick().expect("tick");
    assert_eq!(ran.len(), 1);
    assert!(ran[0].errors.is_empty(), "{:?}", ran[0].errors);
    assert_eq!(
        ran[0].backups,
        vec!["Volume/v/2025-06-01T02:00:00Z".to_string()]
    );
    // A run without errors is recorded as the last success (what the controller exports).
    let st = runner.state().get("nightly").expect("state");
    assert_eq!(st.last_result.as_deref(), Some("ok"));
    assert_eq!(st.last_success.as_deref(), Some("2025-06-01T02:00:00Z"));
}
