//! The backup commands as a library: what `stead backup run|list|verify|restore|prune|gc`
//! do, so that a command line only converts its arguments and prints.
//!
//! Names resolve through a [`World`]: manifests given by the caller first, then a world the
//! caller already has (e.g. the state DB inventory). Explicit pool paths and input paths
//! work without any manifest. A run is two steps: [`World::plan_run`] resolves the request
//! into a [`RunPlan`] (store, targets, rules), [`execute_run`] backs the targets up, prunes
//! and collects garbage, reporting each outcome through a callback as it happens.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use stead_host::progress::Progress;
use stead_reconciler::driver::{DriverError, HostEnv, Lookup};
use stead_schema::kinds::{BackupMode, BackupScheduleSpec, Compression, Retention};
use stead_schema::{Diagnostic, Kind, Resource, ResourceId, Spec, ValueError};

use super::BackupError;
use super::consistency::{WorkloadHooks, WorldLoader};
use super::hooks::{BackupHooks, Target, backup_target};
use super::schedule::{self, Tz};
use super::store::{BackupInfo, BackupOptions, BackupStore};
use super::{retention, targets};

/// Errors of the backup commands.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// The manifests do not load or validate; the diagnostics say where.
    #[error("the manifests have {} errors", .0.len())]
    Manifests(Vec<Diagnostic>),
    /// No BackupSchedule of this name is known.
    #[error("{0} is not known; pass the manifests with -f")]
    UnknownSchedule(ResourceId),
    /// The name is known, as another kind.
    #[error("{0} is not a BackupSchedule")]
    NotASchedule(ResourceId),
    /// A StoragePool name does not resolve to a usable pool.
    #[error("StoragePool/{name} (pass the manifests with -f, or a pool path)")]
    Pool {
        /// The pool name.
        name: String,
        /// Why it does not resolve.
        #[source]
        source: DriverError,
    },
    /// No storage was given.
    #[error("--storage POOL (a StoragePool name or a pool path) is required")]
    NoStorage,
    /// Not an IANA time zone name.
    #[error("unknown time zone {0:?}: use an IANA name such as UTC or Europe/Berlin")]
    UnknownZone(String),
    /// A schedule whose targets select nothing.
    #[error("BackupSchedule/{0} selects no targets")]
    NoTargets(String),
    /// Explicit input paths without the resource to record them as.
    #[error("--path needs --name Kind/name")]
    PathNeedsName,
    /// Nothing to back up was named.
    #[error("give a TARGET (Kind/name), --schedule NAME, or --path with --name")]
    NothingToBackUp,
    /// Not a `Kind/name`.
    #[error(transparent)]
    BadName(#[from] ValueError),
    /// A target of a schedule cannot be resolved to paths.
    #[error("resolve {id}")]
    Resolve {
        /// The target.
        id: ResourceId,
        /// Why.
        #[source]
        source: BackupError,
    },
    /// A resource without any backup.
    #[error("no backup of {0}")]
    NoBackup(String),
    /// The store failed.
    #[error(transparent)]
    Backup(#[from] BackupError),
}

/// Resources to resolve names from.
#[derive(Debug, Clone, Default)]
pub struct World {
    /// Every resource by id.
    pub map: BTreeMap<ResourceId, Resource>,
}

impl World {
    /// `base` (e.g. the state DB inventory) overlaid with the validated resources of the
    /// `manifests` files and directories (none: `base` alone).
    pub fn load(
        manifests: &(impl AsRef<[PathBuf]> + ?Sized),
        base: Option<&BTreeMap<ResourceId, Resource>>,
    ) -> Result<World, OpsError> {
        let mut map = base.cloned().unwrap_or_default();
        let manifests = manifests.as_ref();
        if !manifests.is_empty() {
            let desired =
                stead_schema::load_and_validate(manifests).map_err(OpsError::Manifests)?;
            map.extend(desired.resources);
        }
        Ok(World { map })
    }

    /// The BackupSchedule `name`.
    pub fn schedule(&self, name: &str) -> Result<&BackupScheduleSpec, OpsError> {
        let id = ResourceId::new(Kind::BackupSchedule, name);
        match self.map.resource(&id) {
            Some(Resource {
                spec: Spec::BackupSchedule(s),
                ..
            }) => Ok(s),
            Some(_) => Err(OpsError::NotASchedule(id)),
            None => Err(OpsError::UnknownSchedule(id)),
        }
    }

    /// The path of the StoragePool `name`.
    pub fn pool_path(&self, name: &str) -> Result<PathBuf, OpsError> {
        crate::storage::pool_path(&self.map, name).map_err(|source| OpsError::Pool {
            name: name.to_string(),
            source,
        })
    }

    /// The backup store of the StoragePool `name`.
    pub fn store_named(&self, name: &str) -> Result<BackupStore, OpsError> {
        Ok(BackupStore::for_pool(&self.pool_path(name)?))
    }

    /// The backup store of `storage`: a pool path (anything containing `/`) or a
    /// StoragePool name.
    pub fn store(&self, storage: Option<&str>) -> Result<BackupStore, OpsError> {
        match storage {
            Some(p) if is_pool_path(p) => Ok(BackupStore::for_pool(Path::new(p))),
            Some(name) => self.store_named(name),
            None => Err(OpsError::NoStorage),
        }
    }
}

/// Whether a `--storage` value is a pool path rather than a StoragePool name.
fn is_pool_path(storage: &str) -> bool {
    storage.contains('/')
}

/// The time zone named `tz` (an IANA name), or the host's when none is given.
pub fn zone(tz: Option<&str>) -> Result<Tz, OpsError> {
    match tz {
        None => Ok(schedule::host_zone()),
        Some(s) => s.parse().map_err(|_| OpsError::UnknownZone(s.to_string())),
    }
}

/// The id of a backup: `Kind/name/TIME` as given, `Kind/name` for its newest backup.
pub fn backup_id(store: &BackupStore, backup: &str) -> Result<String, OpsError> {
    if names_one_backup(backup) {
        return Ok(backup.to_string());
    }
    store
        .newest(backup)?
        .ok_or_else(|| OpsError::NoBackup(backup.to_string()))
}

/// `Kind/name/TIME` (not just `Kind/name`).
fn names_one_backup(backup: &str) -> bool {
    backup.matches('/').count() >= 2
}

/// The consistency hooks of this host (the container and VM drivers) for the resources of
/// `map`; `reload` fetches a newer world before each backup. Fails where the workload
/// drivers cannot work (no cgroup hierarchy); callers may then read live
/// ([`super::hooks::NoHooks`]).
pub fn workload_hooks(
    env: &HostEnv,
    map: &BTreeMap<ResourceId, Resource>,
    reload: Option<WorldLoader>,
) -> Result<Arc<dyn BackupHooks>, BackupError> {
    let hooks = WorkloadHooks::new(env, Arc::new(map.clone()))?;
    Ok(match reload {
        Some(l) => Arc::new(hooks.with_loader(l)),
        None => Arc::new(hooks),
    })
}

/// What a run backs up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunTarget {
    /// One resource, `Kind/name`.
    Resource(String),
    /// Every target of the BackupSchedule of this name, with its storage, compression,
    /// mode and retention.
    Schedule(String),
    /// Explicit inputs recorded as resource `name` (`Kind/name`).
    Paths {
        /// Input name → file or directory.
        inputs: Vec<(String, PathBuf)>,
        /// `Kind/name` to record.
        name: String,
    },
}

impl RunTarget {
    /// From the command line's choices: a schedule wins over `--path` inputs
    /// (`[NAME=]PATH`, which need `name`), which win over a `Kind/name` target.
    pub fn from_args(
        target: Option<String>,
        schedule: Option<String>,
        paths: &[String],
        name: Option<String>,
    ) -> Result<RunTarget, OpsError> {
        if let Some(s) = schedule {
            Ok(RunTarget::Schedule(s))
        } else if !paths.is_empty() {
            let name = name.ok_or(OpsError::PathNeedsName)?;
            Ok(RunTarget::Paths {
                inputs: parse_inputs(paths),
                name,
            })
        } else if let Some(t) = target {
            Ok(RunTarget::Resource(t))
        } else {
            Err(OpsError::NothingToBackUp)
        }
    }
}

/// `[NAME=]PATH` arguments → (input name, path); without `NAME=`, the path's file name.
pub fn parse_inputs(args: &[String]) -> Vec<(String, PathBuf)> {
    args.iter().map(|a| parse_input(a)).collect()
}

fn parse_input(arg: &str) -> (String, PathBuf) {
    match arg.split_once('=') {
        Some((n, p)) => (n.to_string(), PathBuf::from(p)),
        None => {
            let path = PathBuf::from(arg);
            let name = path
                .file_name()
                .and_then(|s| s.to_str())
                .unwrap_or("input")
                .to_string();
            (name, path)
        }
    }
}

/// A backup run as requested.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// What to back up.
    pub target: RunTarget,
    /// Consistency mode (default: the schedule's, else snapshot).
    pub mode: Option<BackupMode>,
    /// `--storage`: pool path or StoragePool name (a schedule names its own).
    pub storage: Option<String>,
    /// `false` stores chunks uncompressed, whatever a schedule says.
    pub compress: bool,
    /// zstd level of new chunks.
    pub level: i32,
    /// Worker threads (default: all cores).
    pub threads: Option<usize>,
    /// Read files even when unchanged since the previous backup.
    pub reread: bool,
    /// Prune afterwards with these rules (a schedule uses its own).
    pub retention: Retention,
    /// Time zone of the retention periods (default: host local time).
    pub timezone: Option<String>,
}

/// A run resolved: where to, what, and the rules that follow.
#[derive(Debug)]
pub struct RunPlan {
    /// The store written to.
    pub store: BackupStore,
    /// The resources to back up, in order.
    pub targets: Vec<Target>,
    /// Pruned after each target; garbage is collected once at the end.
    pub retention: Retention,
    /// Zone of the retention periods.
    pub tz: Tz,
    /// zstd level of new chunks; `None` stores them uncompressed.
    pub zstd: Option<i32>,
    /// Consistency mode.
    pub mode: BackupMode,
    /// Worker threads.
    pub threads: Option<usize>,
    /// Read files even when unchanged.
    pub reread: bool,
}

/// Where, what and how, before the request's common options are applied.
struct Resolved {
    store: BackupStore,
    targets: Vec<Target>,
    retention: Retention,
    tz: Tz,
    zstd: Option<i32>,
    mode: Option<BackupMode>,
}

impl World {
    /// Resolves `req` into a plan: store, targets and rules.
    pub fn plan_run(&self, env: &HostEnv, req: &RunRequest) -> Result<RunPlan, OpsError> {
        let r = match &req.target {
            RunTarget::Schedule(name) => self.resolve_schedule(env, name, req)?,
            RunTarget::Paths { inputs, name } => self.resolve_paths(inputs, name, req)?,
            RunTarget::Resource(t) => self.resolve_resource(env, t, req)?,
        };
        Ok(RunPlan {
            store: r.store,
            targets: r.targets,
            retention: r.retention,
            tz: r.tz,
            // No compression wins over a schedule's compression too.
            zstd: r.zstd.filter(|_| req.compress),
            mode: req.mode.or(r.mode).unwrap_or_default(),
            threads: req.threads,
            reread: req.reread,
        })
    }

    /// A schedule's targets with its storage, zone, compression, mode and retention.
    fn resolve_schedule(
        &self,
        env: &HostEnv,
        name: &str,
        req: &RunRequest,
    ) -> Result<Resolved, OpsError> {
        let spec = self.schedule(name)?;
        let store = self.store_named(spec.storage.as_str())?;
        let ids = targets::select(&spec.targets, self.map.values());
        if ids.is_empty() {
            return Err(OpsError::NoTargets(name.to_string()));
        }
        let targets = ids
            .into_iter()
            .map(|id| match targets::resolve(env, &self.map, &id) {
                Ok(t) => Ok(t),
                Err(source) => Err(OpsError::Resolve { id, source }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let tz = zone(spec.timezone.as_ref().map(|t| t.0.name()))?;
        let zstd = match spec.compression {
            Compression::Zstd => Some(req.level),
            Compression::None => None,
        };
        Ok(Resolved {
            store,
            targets,
            retention: spec.retention,
            tz,
            zstd,
            mode: Some(spec.mode),
        })
    }

    /// Explicit inputs, recorded as `name`, into the request's storage.
    fn resolve_paths(
        &self,
        inputs: &[(String, PathBuf)],
        name: &str,
        req: &RunRequest,
    ) -> Result<Resolved, OpsError> {
        let target = Target {
            resource: name.to_string(),
            spec: serde_json::json!({}),
            inputs: inputs.to_vec(),
        };
        self.resolved_with_request(vec![target], req)
    }

    /// One resource (`Kind/name`), into the request's storage.
    fn resolve_resource(
        &self,
        env: &HostEnv,
        target: &str,
        req: &RunRequest,
    ) -> Result<Resolved, OpsError> {
        let id = ResourceId::parse_loose(target)?;
        let target = targets::resolve(env, &self.map, &id)?;
        self.resolved_with_request(vec![target], req)
    }

    /// `targets` with the request's storage, retention, zone and level.
    fn resolved_with_request(
        &self,
        targets: Vec<Target>,
        req: &RunRequest,
    ) -> Result<Resolved, OpsError> {
        Ok(Resolved {
            store: self.store(req.storage.as_deref())?,
            targets,
            retention: req.retention,
            tz: zone(req.timezone.as_deref())?,
            zstd: Some(req.level),
            mode: None,
        })
    }
}

/// What happened during [`execute_run`], as it happens.
#[derive(Debug)]
pub enum RunEvent<'a> {
    /// A target was backed up.
    BackedUp(&'a BackupInfo),
    /// The backup of a target failed; the run goes on with the next.
    Failed {
        /// `Kind/name`.
        resource: &'a str,
        /// Why.
        error: BackupError,
    },
    /// A backup was removed by the retention rules.
    Pruned(&'a str),
}

/// The outcome of [`execute_run`].
#[derive(Debug, Default)]
pub struct RunOutcome {
    /// The backups written, in order.
    pub results: Vec<BackupInfo>,
    /// Whether any target failed.
    pub failed: bool,
}

/// Backs up every target of `plan` (a failed target does not stop the others), prunes each
/// target's backups after it, and collects garbage once at the end when there are rules.
/// `progress` makes the progress of one target's backup.
pub fn execute_run(
    plan: &RunPlan,
    hooks: &dyn BackupHooks,
    progress: &dyn Fn(&str) -> Arc<dyn Progress>,
    on_event: &mut dyn FnMut(RunEvent<'_>),
) -> Result<RunOutcome, OpsError> {
    let mut outcome = RunOutcome::default();
    for t in &plan.targets {
        match backup_one(plan, t, hooks, progress(&t.resource)) {
            Ok(info) => {
                on_event(RunEvent::BackedUp(&info));
                outcome.results.push(info);
            }
            Err(error) => {
                outcome.failed = true;
                on_event(RunEvent::Failed {
                    resource: &t.resource,
                    error,
                });
            }
        }
        prune_target(plan, t, on_event)?;
    }
    collect_garbage(plan)?;
    Ok(outcome)
}

/// Backs up one target with the plan's options.
fn backup_one(
    plan: &RunPlan,
    target: &Target,
    hooks: &dyn BackupHooks,
    progress: Arc<dyn Progress>,
) -> Result<BackupInfo, BackupError> {
    let opts = BackupOptions {
        zstd_level: plan.zstd,
        threads: plan.threads,
        progress,
        reread: plan.reread,
        ..BackupOptions::default()
    };
    backup_target(&plan.store, target, plan.mode, hooks, opts)
}

/// Applies the plan's retention rules (if any) to `target`'s backups, without the gc.
fn prune_target(
    plan: &RunPlan,
    target: &Target,
    on_event: &mut dyn FnMut(RunEvent<'_>),
) -> Result<(), OpsError> {
    if !retention::has_rules(&plan.retention) {
        return Ok(());
    }
    let r = plan
        .store
        .prune_manifests(Some(&target.resource), &plan.retention, &plan.tz, false)?;
    for id in &r.removed {
        on_event(RunEvent::Pruned(id));
    }
    Ok(())
}

/// One garbage collection after all targets are pruned (only when there are rules).
fn collect_garbage(plan: &RunPlan) -> Result<(), OpsError> {
    if retention::has_rules(&plan.retention) {
        plan.store.gc()?;
    }
    Ok(())
}

/// The store and rules of a prune.
#[derive(Debug)]
pub struct PruneTarget {
    /// The store to prune.
    pub store: BackupStore,
    /// The rules.
    pub retention: Retention,
    /// Zone of the retention periods.
    pub tz: Tz,
}

impl World {
    /// The store and rules of a prune: the BackupSchedule `schedule`'s (storage, rules,
    /// zone) if given, else `storage` with `retention` in zone `timezone`.
    pub fn prune_target(
        &self,
        schedule: Option<&str>,
        storage: Option<&str>,
        retention: Retention,
        timezone: Option<&str>,
    ) -> Result<PruneTarget, OpsError> {
        match schedule {
            Some(s) => {
                let spec = self.schedule(s)?;
                let tz = zone(spec.timezone.as_ref().map(|t| t.0.name()))?;
                Ok(PruneTarget {
                    store: self.store_named(spec.storage.as_str())?,
                    retention: spec.retention,
                    tz,
                })
            }
            None => Ok(PruneTarget {
                store: self.store(storage)?,
                retention,
                tz: zone(timezone)?,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn inputs_are_named_by_prefix_or_file_name() {
        let got = parse_inputs(&strings(&["disk=/a/b.raw", "/srv/data", "/", "x=y=z"]));
        assert_eq!(
            got,
            vec![
                ("disk".to_string(), PathBuf::from("/a/b.raw")),
                ("data".to_string(), PathBuf::from("/srv/data")),
                ("input".to_string(), PathBuf::from("/")),
                ("x".to_string(), PathBuf::from("y=z")),
            ]
        );
    }

    #[test]
    fn a_schedule_wins_then_paths_then_a_target() {
        let t = RunTarget::from_args(
            Some("Volume/a".into()),
            Some("nightly".into()),
            &strings(&["/p"]),
            Some("Volume/p".into()),
        );
        assert_eq!(t.ok(), Some(RunTarget::Schedule("nightly".into())));
        let t = RunTarget::from_args(
            Some("Volume/a".into()),
            None,
            &strings(&["/p"]),
            Some("Volume/p".into()),
        );
        assert_eq!(
            t.ok(),
            Some(RunTarget::Paths {
                inputs: vec![("p".into(), PathBuf::from("/p"))],
                name: "Volume/p".into(),
            })
        );
        let t = RunTarget::from_args(Some("Volume/a".into()), None, &[], None);
        assert_eq!(t.ok(), Some(RunTarget::Resource("Volume/a".into())));
    }

    #[test]
    fn paths_need_a_name_and_something_must_be_named() {
        let e = RunTarget::from_args(None, None, &strings(&["/p"]), None);
        assert!(matches!(e, Err(OpsError::PathNeedsName)), "{e:?}");
        let e = RunTarget::from_args(None, None, &[], None);
        assert!(matches!(e, Err(OpsError::NothingToBackUp)), "{e:?}");
    }

    #[test]
    fn storage_with_a_slash_is_a_path_else_a_pool_name() {
        let w = World::default();
        let s = w.store(Some("/srv/pool")).expect("path");
        assert_eq!(
            s.root(),
            BackupStore::for_pool(Path::new("/srv/pool")).root()
        );
        let s = w.store(Some("./pool")).expect("relative path");
        assert_eq!(s.root(), BackupStore::for_pool(Path::new("./pool")).root());
        let e = w.store(Some("fast"));
        assert!(
            matches!(&e, Err(OpsError::Pool { name, .. }) if name == "fast"),
            "{e:?}"
        );
        assert!(matches!(w.store(None), Err(OpsError::NoStorage)));
    }

    #[test]
    fn unknown_schedules_and_zones_are_named() {
        let w = World::default();
        let e = w.schedule("nightly").map(|_| ());
        assert_eq!(
            e.map_err(|e| e.to_string()),
            Err("BackupSchedule/nightly is not known; pass the manifests with -f".into())
        );
        assert!(zone(Some("Europe/Berlin")).is_ok());
        assert!(zone(None).is_ok());
        let e = zone(Some("Mars/Olympus")).map(|_| ());
        assert!(matches!(&e, Err(OpsError::UnknownZone(z)) if z == "Mars/Olympus"));
    }

    #[test]
    fn a_full_backup_id_is_taken_as_is() {
        assert!(names_one_backup("Volume/x/2024-01-01T00:00:00Z"));
        assert!(!names_one_backup("Volume/x"));
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BackupStore::for_pool(dir.path());
        let id = "Volume/x/2024-01-01T00:00:00Z";
        assert_eq!(backup_id(&store, id).ok().as_deref(), Some(id));
    }

    #[test]
    fn plans_of_explicit_paths_take_the_request_options() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = dir.path().join("pool");
        let req = RunRequest {
            target: RunTarget::Paths {
                inputs: vec![("disk".into(), PathBuf::from("/img"))],
                name: "Volume/v".into(),
            },
            mode: None,
            storage: Some(pool.display().to_string()),
            compress: false,
            level: 5,
            threads: Some(2),
            reread: true,
            retention: Retention {
                keep_last: Some(3),
                ..Retention::default()
            },
            timezone: Some("UTC".into()),
        };
        let env = HostEnv {
            state_dir: dir.path().join("state"),
            run_dir: dir.path().join("run"),
            cgroup_parent: "stead-test".into(),
            netns: None,
            self_exe: PathBuf::new(),
            fence_file: None,
        };
        let plan = World::default().plan_run(&env, &req).expect("plan");
        assert_eq!(plan.targets.len(), 1);
        assert_eq!(plan.targets[0].resource, "Volume/v");
        assert_eq!(plan.zstd, None, "no compression wins");
        assert_eq!(plan.mode, BackupMode::default());
        assert_eq!(plan.retention.keep_last, Some(3));
        assert_eq!((plan.threads, plan.reread), (Some(2), true));
        assert_eq!(plan.store.root(), BackupStore::for_pool(&pool).root());
    }
}
