//! The BackupSchedule driver: a schedule is registered as a small file under
//! `<state-dir>/schedules/<name>.json` (its ownership mark and the applied spec). The
//! backup runner (`stead backup daemon`, or the controller) runs registered schedules at
//! their cron times; `observe` reports the next fire time.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{Value, json};
use stead_reconciler::driver::{DriverError, Health, HostEnv, Impact, Lookup, Observed, Typed};
use stead_schema::{BackupScheduleSpec, ResourceId};

/// Driver for `Kind::BackupSchedule`.
pub struct ScheduleDriver {
    dir: PathBuf,
    /// The runner's state file (`<state-dir>/backup/schedules.json`).
    runs: PathBuf,
}

impl ScheduleDriver {
    /// A driver keeping registrations under `<state_dir>/schedules`.
    pub fn new(env: &HostEnv) -> Self {
        ScheduleDriver {
            dir: env.state_dir.join("schedules"),
            runs: env.state_dir.join("backup/schedules.json"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }
}

fn owner(name: &str) -> String {
    format!("BackupSchedule/{name}")
}

fn next_run(spec: &Value) -> Option<String> {
    let spec: stead_schema::BackupScheduleSpec = serde_json::from_value(spec.clone()).ok()?;
    let sched = crate::backup::schedule::Schedule::for_spec(&spec).ok()?;
    sched.next_after(chrono::Utc::now()).map(|t| t.to_rfc3339())
}

impl stead_reconciler::driver::KindDriver for ScheduleDriver {
    type Spec = BackupScheduleSpec;

    fn observe(
        &self,
        targets: &[Typed<'_, BackupScheduleSpec>],
        _world: &dyn Lookup,
    ) -> Result<BTreeMap<ResourceId, Observed>, DriverError> {
        let mut out = BTreeMap::new();
        // What the runner recorded: lastRun, lastResult, lastSuccess, runs per schedule.
        let runs: Value = std::fs::read(&self.runs)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        for r in targets.iter().map(|t| t.resource) {
            let p = self.path(&r.id.name);
            let run = &runs[r.id.name.as_str()];
            let obs = match std::fs::read(&p) {
                Ok(bytes) => match serde_json::from_slice::<Value>(&bytes) {
                    Ok(doc) => {
                        let owned =
                            doc.get("owner").and_then(Value::as_str) == Some(&owner(&r.id.name));
                        let spec = doc.get("spec").cloned().unwrap_or(Value::Null);
                        let mut status = json!({"registration": p, "nextRun": next_run(&spec)});
                        for k in ["lastRun", "lastResult", "lastSuccess", "runs"] {
                            if !run[k].is_null() {
                                status[k] = run[k].clone();
                            }
                        }
                        // A failed last run is for the operator to see; the schedule itself
                        // is applied as declared.
                        let health = match run["lastResult"].as_str() {
                            Some(r) if r != "ok" => {
                                Health::Degraded(format!("last run failed: {r}"))
                            }
                            _ => Health::Ready,
                        };
                        Observed {
                            exists: true,
                            owned,
                            status,
                            state: spec,
                            health,
                        }
                    }
                    Err(e) => Observed {
                        exists: true,
                        owned: false,
                        state: Value::Null,
                        status: Value::Null,
                        health: Health::Failed(format!(
                            "unreadable registration {}: {e}",
                            p.display()
                        )),
                    },
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Observed::absent(),
                Err(e) => return Err(DriverError::io(format!("read {}", p.display()), e)),
            };
            out.insert(r.id.clone(), obs);
        }
        Ok(out)
    }

    fn desired_state(&self, desired: Typed<'_, BackupScheduleSpec>, _world: &dyn Lookup) -> Value {
        serde_json::to_value(desired.spec).unwrap_or(Value::Null)
    }

    fn impact(&self, _path: &str) -> Impact {
        Impact::Hot
    }

    fn apply(
        &self,
        desired: Typed<'_, BackupScheduleSpec>,
        _observed: &Observed,
        world: &dyn Lookup,
    ) -> Result<(), DriverError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| DriverError::io(format!("create {}", self.dir.display()), e))?;
        let doc = json!({"owner": owner(desired.name()), "spec": Self::desired_state(self, desired, world)});
        let bytes =
            serde_json::to_vec_pretty(&doc).map_err(|e| DriverError::Other(e.to_string()))?;
        // Temp file, fsync, rename, fsync the directory: never a truncated registration.
        crate::storage::fsutil::write_atomic(&self.path(desired.name()), &bytes)
    }

    fn delete(
        &self,
        last: Typed<'_, BackupScheduleSpec>,
        _observed: &Observed,
        _world: &dyn Lookup,
    ) -> Result<(), DriverError> {
        // Backups already taken stay in their pool; only the registration goes.
        match std::fs::remove_file(self.path(last.name())) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(DriverError::io("remove schedule registration", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stead_reconciler::driver::Driver;
    use stead_schema::Resource;

    #[test]
    fn register_observe_update_delete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let env = HostEnv {
            state_dir: dir.path().to_path_buf(),
            run_dir: dir.path().join("run"),
            cgroup_parent: "x".into(),
            netns: None,
            self_exe: PathBuf::from("/bin/true"),
            fence_file: None,
        };
        let d = ScheduleDriver::new(&env);
        let yaml = "apiVersion: stead.dev/v1alpha1\nkind: BackupSchedule\nmetadata: {name: nightly}\nspec: {schedule: \"0 2 * * *\", timezone: UTC, targets: {names: [Volume/v]}, storage: p}\n";
        let mut rs = Vec::new();
        let mut errs = Vec::new();
        stead_schema::load::load_str(std::path::Path::new("m.yaml"), yaml, &mut rs, &mut errs);
        assert!(errs.is_empty(), "{errs:?}");
        let r = &rs[0];
        let world: BTreeMap<ResourceId, Resource> = BTreeMap::new();
        let o = d.observe(&[r], &world).expect("observe");
        assert!(!o[&r.id].exists);
        d.apply(r, &o[&r.id], &world).expect("apply");
        let o = d.observe(&[r], &world).expect("observe");
        let obs = &o[&r.id];
        assert!(obs.exists && obs.owned);
        assert_eq!(obs.state, d.desired_state(r, &world));
        let next = obs.status["nextRun"].as_str().expect("next run");
        assert!(next.contains("T02:00:00"), "{next}");
        assert_eq!(obs.health, Health::Ready);
        // What the runner recorded shows in the status; a failed last run degrades health.
        std::fs::create_dir_all(dir.path().join("backup")).expect("mkdir");
        std::fs::write(
            dir.path().join("backup/schedules.json"),
            r#"{"nightly": {"lastSlot": "2026-01-01T02:00:00Z", "lastRun": "2026-01-01T02:00:00Z",
                "lastResult": "Volume/v: disk full", "lastSuccess": "2025-12-31T02:00:00Z", "runs": 7}}"#,
        )
        .expect("write");
        let o = d.observe(&[r], &world).expect("observe");
        let obs = &o[&r.id];
        assert_eq!(obs.status["lastRun"], "2026-01-01T02:00:00Z");
        assert_eq!(obs.status["lastSuccess"], "2025-12-31T02:00:00Z");
        assert_eq!(obs.status["runs"], 7);
        assert!(
            matches!(&obs.health, Health::Degraded(m) if m.contains("disk full")),
            "{:?}",
            obs.health
        );
        assert_eq!(
            obs.state,
            d.desired_state(r, &world),
            "no diff from a failed run"
        );
        d.delete(r, obs, &world).expect("delete");
        d.delete(r, obs, &world).expect("idempotent");
        assert!(!d.observe(&[r], &world).expect("observe")[&r.id].exists);
    }
}
