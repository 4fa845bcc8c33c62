//! The controller's housekeeping, done in this process by the CLI's own code paths:
//! expired environments go through `stead env gc`'s function, backup schedules run on
//! the same runner `stead backup daemon` builds, with a clock the controller can stop.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, BTreeSet};
use stead_controller::env::{self, EnvRecord};
use stead_controller::{Housekeeping, HousekeepingError, StopSignal};
use stead_drivers::backup::consistency::WorldLoader;
use stead_drivers::backup::runner::{self, Clock};

use stead_controller::view::{BackupEntry, VerifyState};
use stead_drivers::backup::ops::{self, World};
use stead_drivers::backup::targets;
use stead_drivers::container::ContainerDriver;
use stead_drivers::vm::VmDriver;
use stead_reconciler::driver::HostEnv;
use stead_reconciler::state::now_secs;
use stead_schema::{Kind, Resource, ResourceId, Spec};
use tracing::{debug, info};

use crate::{Global, applied_world, cmd_backup, cmd_env};

/// Housekeeping by library calls, in the controller's process.
pub(crate) struct CliHousekeeping {
    /// The global flags, quiet (a teardown prints no step lines).
    g: Global,
    /// The host handles environments are made under (no `--netns`: each brings its own).
    base: HostEnv,
    /// The controller's host handles (the backup schedules run against them).
    env: HostEnv,
}

impl CliHousekeeping {
    /// Housekeeping for the controller started with `g` on `env`.
    pub(crate) fn new(g: &Global, env: &HostEnv) -> anyhow::Result<Self> {
        let mut g = g.clone();
        g.quiet = true;
        let base = crate::host_env_unchecked(&g)?;
        Ok(CliHousekeeping {
            g,
            base,
            env: env.clone(),
        })
    }
}

impl Housekeeping for CliHousekeeping {
    fn environments(&self) -> Vec<EnvRecord> {
        let (records, errors) = env::list_lenient(&self.base.state_dir);
        for e in errors {
            debug!(error = %e, "environment record skipped");
        }
        records
    }

    fn collect_expired(&self) -> Result<(), HousekeepingError> {
        // `env down` scopes the storage drivers' ownership marks to the environment,
        // process-wide: back to the host's own scope afterwards, whatever happens.
        let _scope = HostScope;
        match cmd_env::gc(&self.g, &self.base) {
            Ok(0) => Ok(()),
            Ok(code) => Err(HousekeepingError(format!(
                "a teardown did not complete (exit code {code}); it is retried"
            ))),
            Err(e) => Err(HousekeepingError(format!("{e:#}"))),
        }
    }

    fn run_backup_schedules(&self, stop: &StopSignal) -> Result<(), HousekeepingError> {
        let err = |e: anyhow::Error| HousekeepingError(format!("{e:#}"));
        let world = applied_world(&self.env).map_err(err)?;
        let reload_env = self.env.clone();
        let reload: WorldLoader = Arc::new(move || applied_world(&reload_env).ok());
        let (mut runner, schedules) = cmd_backup::schedule_runner(
            &cmd_backup::ManifestArgs::default(),
            &self.env,
            Some(&world),
            Some(reload),
            StoppableClock(stop.clone()),
        )
        .map_err(err)?;
        info!(schedules, "backup schedules: running");
        runner
            .run()
            .map_err(|e| HousekeepingError(format!("{:#}", anyhow::Error::from(e))))
    }

    fn restart_workload(&self, id: &ResourceId) -> Result<String, HousekeepingError> {
        let err = |e: stead_reconciler::driver::DriverError| HousekeepingError(e.to_string());
        // Stopped here; the reconcile the action triggers starts it again.
        match id.kind {
            Kind::Container => ContainerDriver::new(&self.env)
                .map_err(err)?
                .stop(&id.name)
                .map_err(err)?,
            Kind::VirtualMachine => VmDriver::new(&self.env)
                .map_err(err)?
                .stop(&id.name)
                .map_err(err)?,
            other => return Err(HousekeepingError(format!("{other} cannot be restarted"))),
        }
        Ok(format!("{id} stopped; the reconcile starts it again"))
    }

    fn open_console(
        &self,
        id: &ResourceId,
    ) -> Result<std::os::unix::net::UnixStream, HousekeepingError> {
        let run_dir = &self.env.run_dir;
        let conn = match id.kind {
            Kind::Container => stead_drivers::container::control::console_stream(run_dir, &id.name),
            Kind::VirtualMachine => stead_drivers::vm::console::console_stream(run_dir, &id.name),
            other => return Err(HousekeepingError(format!("{other} has no console"))),
        };
        conn.map_err(|e| HousekeepingError(e.to_string()))
    }

    fn open_vnc(
        &self,
        id: &ResourceId,
    ) -> Result<std::os::unix::net::UnixStream, HousekeepingError> {
        if id.kind != Kind::VirtualMachine {
            return Err(HousekeepingError(format!("{id} has no screen")));
        }
        let sock = stead_drivers::vm::config::Paths::new(&self.env.run_dir, &id.name).vnc_socket();
        std::os::unix::net::UnixStream::connect(&sock).map_err(|e| {
            HousekeepingError(format!(
                "{id} has no screen now (only a running QEMU VM has one): {e}"
            ))
        })
    }

    fn is_cluster_node(&self) -> bool {
        crate::cmd_agent::AgentFile::path(&self.base.state_dir).exists()
    }

    fn cluster_status(&self) -> Option<Result<serde_json::Value, HousekeepingError>> {
        crate::cmd_cluster::status_json(&self.base.state_dir)
            .map(|r| r.map_err(|e| HousekeepingError(format!("{e:#}"))))
    }

    fn backup_now(&self, schedule: &str) -> Result<String, HousekeepingError> {
        let code = self.backup(&["backup", "run", "--schedule", schedule])?;
        match code {
            0 => Ok(format!(
                "backup schedule {schedule}: every target backed up"
            )),
            _ => Err(HousekeepingError(format!(
                "backup schedule {schedule}: a backup failed (see the controller log)"
            ))),
        }
    }

    fn verify_backup(&self, schedule: &str) -> Result<String, HousekeepingError> {
        let err = |e: String| HousekeepingError(e);
        let world = applied_world(&self.env).map_err(|e| err(format!("{e:#}")))?;
        let Some(Spec::BackupSchedule(spec)) = world
            .get(&ResourceId::new(Kind::BackupSchedule, schedule))
            .map(|r| &r.spec)
        else {
            return Err(err(format!("no BackupSchedule/{schedule} applied")));
        };
        let ids = targets::select(&spec.targets, world.values());
        let w = World::load(&cmd_backup::ManifestArgs::default(), Some(&world))
            .map_err(|e| err(e.to_string()))?;
        let store = w
            .store(Some(spec.storage.as_str()))
            .map_err(|e| err(e.to_string()))?;
        let mut verified = self.read_verified();
        let (mut good, mut bad, mut none) = (0, Vec::new(), 0);
        for id in &ids {
            let Ok(backup) = ops::backup_id(&store, &id.to_string()) else {
                none += 1;
                continue;
            };
            let state = match store.verify(&backup) {
                Ok(r) => VerifyState {
                    ok: r.ok(),
                    at: now_secs(),
                    problems: r
                        .problems
                        .iter()
                        .map(|p| serde_json::to_string(p).unwrap_or_default())
                        .collect(),
                },
                Err(e) => VerifyState {
                    ok: false,
                    at: now_secs(),
                    problems: vec![e.to_string()],
                },
            };
            info!(backup = %backup, ok = state.ok, "backup verified");
            if state.ok {
                good += 1;
            } else {
                bad.push(backup.clone());
            }
            verified.insert(backup, state);
        }
        self.write_verified(&verified);
        if bad.is_empty() {
            Ok(format!(
                "backup schedule {schedule}: {good} newest backup(s) verified, {none} target(s) without a backup"
            ))
        } else {
            Err(err(format!("verify found problems in {}", bad.join(", "))))
        }
    }

    fn backups(&self, id: &ResourceId) -> Result<Vec<BackupEntry>, HousekeepingError> {
        let err = |e: String| HousekeepingError(e);
        let world = applied_world(&self.env).map_err(|e| err(format!("{e:#}")))?;
        let verified = self.read_verified();
        let w = World::load(&cmd_backup::ManifestArgs::default(), Some(&world))
            .map_err(|e| err(e.to_string()))?;
        let mut out = Vec::new();
        for storage in storages_of(&world, id) {
            let store = w.store(Some(&storage)).map_err(|e| err(e.to_string()))?;
            for b in store
                .list(Some(&id.to_string()))
                .map_err(|e| err(e.to_string()))?
            {
                out.push(BackupEntry {
                    verified: verified.get(&b.id).cloned(),
                    id: b.id,
                    time: b.time.to_rfc3339(),
                    storage: storage.clone(),
                    bytes: b.stats.bytes,
                    stored_bytes: b.stats.stored_bytes,
                    duration_ms: b.stats.duration_ms,
                    consistency: b.consistency,
                });
            }
        }
        out.sort_by(|a, b| (&a.time, &a.id).cmp(&(&b.time, &b.id)));
        Ok(out)
    }
}

/// The storages of the BackupSchedules of `world` that select `id`.
fn storages_of(world: &BTreeMap<ResourceId, Resource>, id: &ResourceId) -> BTreeSet<String> {
    world
        .values()
        .filter_map(|r| match &r.spec {
            Spec::BackupSchedule(s) => Some(s),
            _ => None,
        })
        .filter(|s| targets::select(&s.targets, world.values()).contains(id))
        .map(|s| s.storage.to_string())
        .collect()
}

impl CliHousekeeping {
    /// `<state-dir>/backup/verified.json`: the last verify of each backup from the UI.
    fn verified_path(&self) -> std::path::PathBuf {
        self.env.state_dir.join("backup").join("verified.json")
    }

    fn read_verified(&self) -> BTreeMap<String, VerifyState> {
        std::fs::read(self.verified_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn write_verified(&self, m: &BTreeMap<String, VerifyState>) {
        let path = self.verified_path();
        let written = std::fs::create_dir_all(path.parent().unwrap_or(&path))
            .map_err(|e| e.to_string())
            .and_then(|_| serde_json::to_vec_pretty(m).map_err(|e| e.to_string()))
            .and_then(|b| stead_host::write_atomic(&path, &b).map_err(|e| e.to_string()));
        if let Err(e) = written {
            tracing::warn!(file = %path.display(), error = %e, "cannot record verify results");
        }
    }
}

/// `stead backup …` parsed from words, for the controller's actions.
#[derive(clap::Parser, Debug)]
struct BackupCli {
    #[command(subcommand)]
    cmd: cmd_backup::BackupCmd,
}

impl CliHousekeeping {
    /// Runs `stead <args>` (a backup subcommand) against the applied world; its exit code.
    fn backup(&self, args: &[&str]) -> Result<i32, HousekeepingError> {
        use clap::Parser;
        let err = |e: anyhow::Error| HousekeepingError(format!("{e:#}"));
        let cli = BackupCli::try_parse_from(args).map_err(|e| HousekeepingError(e.to_string()))?;
        let world = applied_world(&self.env).map_err(err)?;
        cmd_backup::run_with(cli.cmd, &self.env, Some(&world), None).map_err(err)
    }
}

/// Returns the storage drivers to the host's own ownership scope when dropped.
struct HostScope;

impl Drop for HostScope {
    fn drop(&mut self) {
        stead_drivers::storage::set_owner_scope(None);
    }
}

/// The wall clock, whose sleeps end early (and stop the runner) once `0` is raised.
struct StoppableClock(StopSignal);

impl Clock for StoppableClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn sleep_until(&self, t: DateTime<Utc>) -> bool {
        runner::sleep_until_unless(t, || self.0.is_stopped())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_actions_backup_words_parse_as_backup_subcommands() {
        use clap::Parser;
        let run = BackupCli::try_parse_from(["backup", "run", "--schedule", "nightly"]);
        assert!(
            matches!(run.map(|c| c.cmd), Ok(cmd_backup::BackupCmd::Run(a)) if a.schedule.as_deref() == Some("nightly"))
        );
        let verify =
            BackupCli::try_parse_from(["backup", "verify", "Volume/a", "--storage", "lab"]);
        assert!(matches!(
            verify.map(|c| c.cmd),
            Ok(cmd_backup::BackupCmd::Verify { backup, .. }) if backup == "Volume/a"
        ));
    }

    #[test]
    fn a_raised_stop_ends_the_clock_s_sleep_and_the_runner() {
        let stop = StopSignal::new();
        let clock = StoppableClock(stop.clone());
        assert!(clock.sleep_until(Utc::now() - chrono::Duration::seconds(1)));
        stop.stop();
        let t0 = std::time::Instant::now();
        assert!(!clock.sleep_until(Utc::now() + chrono::Duration::hours(1)));
        assert!(t0.elapsed() < Duration::from_secs(1));
    }
}
