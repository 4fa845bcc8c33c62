//! `stead backup run|list|verify|restore|prune|gc|simulate-prune|daemon`.
//!
//! Targets and pools resolve through the manifests given with `-f/--manifests` (or a world
//! the caller passes to [`run_with`], e.g. the state DB inventory). Explicit
//! `--path/--name/--storage PATH` arguments work without any manifest.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use stead_drivers::backup::consistency::{WorkloadHooks, WorldLoader};
use stead_drivers::backup::hooks::{BackupHooks, NoHooks, backup_target};
use stead_drivers::backup::runner::{Job, Runner, SystemClock};
use stead_drivers::backup::store::{BackupOptions, BackupStore, DEFAULT_ZSTD_LEVEL};
use stead_drivers::backup::{retention, schedule, targets};
use stead_reconciler::driver::{HostEnv, Lookup};
use stead_schema::kinds::{BackupMode, Retention};
use stead_schema::{Kind, Resource, ResourceId, Spec};

/// Output format.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Human-readable.
    Text,
    /// JSON.
    Json,
}

/// Prune rules on the command line (`--keep-last N` …).
#[derive(Args, Debug, Clone, Default)]
pub struct KeepArgs {
    /// Keep the N newest backups.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,
    /// Keep the newest backup of each of the last N hours that have one.
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<u32>,
    /// Keep the newest backup of each of the last N days that have one.
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u32>,
    /// Keep the newest backup of each of the last N ISO weeks that have one.
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u32>,
    /// Keep the newest backup of each of the last N months that have one.
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<u32>,
    /// Keep the newest backup of each of the last N years that have one.
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<u32>,
    /// Time zone of the periods (IANA name; default: host local time).
    #[arg(long, value_name = "TZ")]
    pub timezone: Option<String>,
}

impl KeepArgs {
    fn retention(&self) -> Retention {
        Retention {
            keep_last: self.keep_last,
            keep_hourly: self.keep_hourly,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_monthly: self.keep_monthly,
            keep_yearly: self.keep_yearly,
        }
    }

    fn zone(&self) -> Result<schedule::Tz> {
        zone(self.timezone.as_deref())
    }
}

fn zone(tz: Option<&str>) -> Result<schedule::Tz> {
    match tz {
        None => Ok(schedule::host_zone()),
        Some(s) => s.parse().map_err(|_| {
            anyhow::anyhow!(
                "unknown time zone {s:?}: use an IANA name such as UTC or Europe/Berlin"
            )
        }),
    }
}

/// Where the backups live.
#[derive(Args, Debug, Clone, Default)]
pub struct StorageArg {
    /// Backup storage: a StoragePool name (resolved through the manifests) or a pool path
    /// (anything containing `/`). Backups live under `<pool>/backups/`.
    #[arg(long, short = 's', value_name = "POOL")]
    pub storage: Option<String>,
}

/// Manifests that define targets, pools and schedules.
#[derive(Args, Debug, Clone, Default)]
pub struct ManifestArgs {
    /// Manifest files or directories to resolve names from.
    #[arg(long = "manifests", short = 'f', value_name = "PATH")]
    pub manifests: Vec<PathBuf>,
}

/// `--mode` of `stead backup run`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeArg {
    /// Freeze/pause, clone, resume (or stay quiesced while read when inputs cannot be cloned).
    Snapshot,
    /// Stop, read, start again.
    Stop,
}

impl From<ModeArg> for BackupMode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Snapshot => BackupMode::Snapshot,
            ModeArg::Stop => BackupMode::Stop,
        }
    }
}

/// The consistency hooks of this host: the container and VM drivers, or live reads when
/// they cannot work here (no cgroup hierarchy).
fn hooks_for(
    env: &HostEnv,
    map: &BTreeMap<ResourceId, Resource>,
    reload: Option<WorldLoader>,
) -> Arc<dyn BackupHooks> {
    match WorkloadHooks::new(env, Arc::new(map.clone())) {
        Ok(h) => match reload {
            Some(l) => Arc::new(h.with_loader(l)),
            None => Arc::new(h),
        },
        Err(e) => {
            eprintln!("warning: workloads cannot be quiesced here ({e}); reading live");
            Arc::new(NoHooks)
        }
    }
}

/// `stead backup` subcommands.
#[derive(Subcommand, Debug)]
pub enum BackupCmd {
    /// Back up a resource (Kind/name), every target of a schedule, or explicit paths.
    Run {
        /// Volume/NAME, Container/NAME or VirtualMachine/NAME.
        target: Option<String>,
        /// Run this BackupSchedule's targets now (its storage, compression and retention).
        #[arg(long, conflicts_with = "target")]
        schedule: Option<String>,
        /// Explicit input instead of a resolved target: `PATH` or `NAME=PATH` (repeatable;
        /// a file such as a volume image, or a directory tree).
        #[arg(long, value_name = "[NAME=]PATH", conflicts_with_all = ["target", "schedule"])]
        path: Vec<String>,
        /// Kind/name to record for `--path` backups.
        #[arg(long, value_name = "KIND/NAME", requires = "path")]
        name: Option<String>,
        /// How running workloads are made consistent: `snapshot` (freeze or pause them,
        /// reflink-clone their volumes, let them run again) or `stop` (stop them, read,
        /// start them again). Default: the schedule's mode, else snapshot.
        #[arg(long, value_enum)]
        mode: Option<ModeArg>,
        #[command(flatten)]
        storage: StorageArg,
        /// Store chunks uncompressed.
        #[arg(long)]
        no_compress: bool,
        /// zstd level for new chunks.
        #[arg(long, default_value_t = DEFAULT_ZSTD_LEVEL)]
        level: i32,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Read every file, even those whose size, mtime, inode and ctime show them
        /// unchanged since the previous backup (whose chunk lists are reused otherwise).
        #[arg(long)]
        reread: bool,
        /// Prune afterwards with these rules (a schedule uses its own retention).
        #[command(flatten)]
        keep: KeepArgs,
        #[command(flatten)]
        manifests: ManifestArgs,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Text)]
        output: Format,
    },
    /// List backups, oldest first.
    List {
        /// Only backups of this Kind/name.
        resource: Option<String>,
        #[command(flatten)]
        storage: StorageArg,
        #[command(flatten)]
        manifests: ManifestArgs,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Text)]
        output: Format,
    },
    /// Re-read every chunk of a backup and check all checksums. Exit 1 if anything is wrong.
    Verify {
        /// Backup id: Kind/name/TIME (see `stead backup list`); `Kind/name` = the newest.
        backup: String,
        #[command(flatten)]
        storage: StorageArg,
        #[command(flatten)]
        manifests: ManifestArgs,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Text)]
        output: Format,
    },
    /// Restore a backup (bit-identical; checked against the manifest's sha256).
    Restore {
        /// Backup id: Kind/name/TIME; `Kind/name` = the newest.
        backup: String,
        /// Restore the (single) input under this new name.
        #[arg(long = "as", value_name = "NEWNAME")]
        as_name: Option<String>,
        /// Directory to restore into (default: the current directory).
        #[arg(long, value_name = "DIR")]
        to: Option<PathBuf>,
        #[command(flatten)]
        storage: StorageArg,
        #[command(flatten)]
        manifests: ManifestArgs,
    },
    /// Apply retention rules, then garbage-collect unreferenced chunks.
    Prune {
        /// Only backups of this Kind/name (default: every resource, each on its own).
        resource: Option<String>,
        #[command(flatten)]
        keep: KeepArgs,
        /// Take the rules (and zone and storage) from this BackupSchedule.
        #[arg(long)]
        schedule: Option<String>,
        /// Show what would be removed; delete nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        storage: StorageArg,
        #[command(flatten)]
        manifests: ManifestArgs,
    },
    /// Delete chunks no backup references (mark & sweep).
    Gc {
        #[command(flatten)]
        storage: StorageArg,
        #[command(flatten)]
        manifests: ManifestArgs,
    },
    /// Show what retention rules keep: RFC 3339 timestamps in (one per line, FILE or stdin),
    /// one line per backup out, newest first: TIMESTAMP keep|remove [RULE].
    SimulatePrune {
        #[command(flatten)]
        keep: KeepArgs,
        /// Print the rule that kept each backup.
        #[arg(long)]
        show_rule: bool,
        /// Input file (default: standard input).
        file: Option<PathBuf>,
    },
    /// Run the BackupSchedules of the manifests until interrupted (until the controller
    /// runs them).
    Daemon {
        #[command(flatten)]
        manifests: ManifestArgs,
    },
}

/// Runs a `stead backup` subcommand; `world` (e.g. the state DB inventory) resolves names
/// that `-f` manifests do not define, and `reload` fetches it again (the daemon does so
/// before each backup, so its consistency hooks see workloads applied since it started).
pub fn run_with(
    cmd: BackupCmd,
    env: &HostEnv,
    world: Option<&BTreeMap<ResourceId, Resource>>,
    reload: Option<WorldLoader>,
) -> Result<i32> {
    match cmd {
        BackupCmd::SimulatePrune {
            keep,
            show_rule,
            file,
        } => {
            let mut input = String::new();
            match &file {
                Some(f) => {
                    input = std::fs::read_to_string(f)
                        .with_context(|| format!("read {}", f.display()))?
                }
                None => {
                    std::io::stdin()
                        .read_to_string(&mut input)
                        .context("read standard input")?;
                }
            }
            let out = retention::simulate(&input, &keep.retention(), &keep.zone()?, show_rule)?;
            print!("{out}");
            Ok(0)
        }
        BackupCmd::Run {
            target,
            schedule,
            path,
            name,
            mode,
            storage,
            no_compress,
            level,
            threads,
            reread,
            keep,
            manifests,
            output,
        } => {
            let w = World::load(&manifests, world)?;
            let mut mode = mode.map(BackupMode::from);
            let (store, targets, ret, tz, zstd) = if let Some(s) = schedule {
                let (spec, _) = w.schedule(&s)?;
                let store = w.store_named(spec.storage.as_str())?;
                let ids = targets::select(&spec.targets, w.map.values());
                if ids.is_empty() {
                    bail!("BackupSchedule/{s} selects no targets");
                }
                let ts = ids
                    .iter()
                    .map(|id| {
                        targets::resolve(env, &w.map, id).with_context(|| format!("resolve {id}"))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let tz = zone(spec.timezone.as_ref().map(|t| t.0.name()))?;
                mode.get_or_insert(spec.mode);
                let zstd = match spec.compression {
                    stead_schema::kinds::Compression::Zstd => Some(level),
                    stead_schema::kinds::Compression::None => None,
                };
                (store, ts, spec.retention, tz, zstd)
            } else if !path.is_empty() {
                let name = name.context("--path needs --name Kind/name")?;
                let inputs = path
                    .iter()
                    .map(|p| match p.split_once('=') {
                        Some((n, p)) => (n.to_string(), PathBuf::from(p)),
                        None => {
                            let pb = PathBuf::from(p);
                            let n = pb
                                .file_name()
                                .and_then(|s| s.to_str())
                                .unwrap_or("input")
                                .to_string();
                            (n, pb)
                        }
                    })
                    .collect();
                let t = stead_drivers::backup::hooks::Target {
                    resource: name,
                    spec: serde_json::json!({}),
                    inputs,
                };
                (
                    w.store(&storage)?,
                    vec![t],
                    keep.retention(),
                    keep.zone()?,
                    Some(level),
                )
            } else if let Some(t) = target {
                let id = ResourceId::parse_loose(&t)?;
                let t = targets::resolve(env, &w.map, &id)?;
                (
                    w.store(&storage)?,
                    vec![t],
                    keep.retention(),
                    keep.zone()?,
                    Some(level),
                )
            } else {
                bail!("give a TARGET (Kind/name), --schedule NAME, or --path with --name");
            };
            // --no-compress wins over a schedule's compression too.
            let zstd = if no_compress { None } else { zstd };
            let mode = mode.unwrap_or_default();
            let hooks = hooks_for(env, &w.map, None);
            let mut failed = false;
            let mut results = Vec::new();
            for t in &targets {
                let pb =
                    stead_host::progress::start(&t.resource, stead_host::progress::Meter::Transfer);
                let opts = BackupOptions {
                    zstd_level: zstd,
                    threads,
                    progress: pb,
                    reread,
                    ..BackupOptions::default()
                };
                match backup_target(&store, t, mode, hooks.as_ref(), opts) {
                    Ok(info) => {
                        if output == Format::Text {
                            let s = &info.stats;
                            if let Some(c) = &info.consistency {
                                println!("{}: consistency: {c}", info.id);
                            }
                            let secs = s.duration_ms.max(1) as f64 / 1000.0;
                            println!(
                                "{}: {} ({} unchanged, not read), {} new ({} stored), {} zero, {:.1}s, {:.0} MB/s",
                                info.id,
                                human(s.bytes),
                                human(s.reused_bytes),
                                human(s.new_bytes),
                                human(s.stored_bytes),
                                human(s.zero_bytes),
                                secs,
                                s.bytes as f64 / 1e6 / secs
                            );
                        }
                        results.push(info);
                    }
                    Err(e) => {
                        failed = true;
                        eprintln!(
                            "error: backup of {}: {:#}",
                            t.resource,
                            anyhow::Error::from(e)
                        );
                    }
                }
                if retention::has_rules(&ret) {
                    let r = store.prune_manifests(Some(&t.resource), &ret, &tz, false)?;
                    for id in &r.removed {
                        if output == Format::Text {
                            println!("pruned {id}");
                        }
                    }
                }
            }
            // One garbage collection after all targets are pruned.
            if retention::has_rules(&ret) {
                store.gc()?;
            }
            if output == Format::Json {
                println!("{}", serde_json::to_string_pretty(&results)?);
            }
            Ok(if failed { 1 } else { 0 })
        }
        BackupCmd::List {
            resource,
            storage,
            manifests,
            output,
        } => {
            let w = World::load(&manifests, world)?;
            let store = w.store(&storage)?;
            let list = store.list(resource.as_deref())?;
            match output {
                Format::Json => println!("{}", serde_json::to_string_pretty(&list)?),
                Format::Text => {
                    println!("{:<56} {:>10} {:>10}  INPUTS", "BACKUP", "SIZE", "NEW");
                    for b in &list {
                        println!(
                            "{:<56} {:>10} {:>10}  {}",
                            b.id,
                            human(b.stats.bytes),
                            human(b.stats.stored_bytes),
                            b.inputs.join(",")
                        );
                    }
                }
            }
            Ok(0)
        }
        BackupCmd::Verify {
            backup,
            storage,
            manifests,
            output,
        } => {
            let w = World::load(&manifests, world)?;
            let store = w.store(&storage)?;
            let id = newest_if_resource(&store, &backup)?;
            let r = store.verify(&id)?;
            match output {
                Format::Json => println!("{}", serde_json::to_string_pretty(&r)?),
                Format::Text => {
                    for p in &r.problems {
                        println!("{}: {p}", r.id);
                    }
                    println!(
                        "{}: {} ({} files, {} chunks, {} checked)",
                        r.id,
                        if r.ok() { "ok" } else { "FAILED" },
                        r.files,
                        r.chunks,
                        human(r.bytes)
                    );
                }
            }
            Ok(if r.ok() { 0 } else { 1 })
        }
        BackupCmd::Restore {
            backup,
            as_name,
            to,
            storage,
            manifests,
        } => {
            let w = World::load(&manifests, world)?;
            let store = w.store(&storage)?;
            let id = newest_if_resource(&store, &backup)?;
            let dest = match to {
                Some(d) => d,
                None => std::env::current_dir().context("current directory")?,
            };
            let r = store.restore(&id, &dest, as_name.as_deref())?;
            for (n, p) in &r.restored {
                println!("restored {}:{n} to {}", r.id, p.display());
            }
            Ok(0)
        }
        BackupCmd::Prune {
            resource,
            keep,
            schedule,
            dry_run,
            storage,
            manifests,
        } => {
            let w = World::load(&manifests, world)?;
            let (store, ret, tz) = match schedule {
                Some(s) => {
                    let (spec, _) = w.schedule(&s)?;
                    let tz = zone(spec.timezone.as_ref().map(|t| t.0.name()))?;
                    (w.store_named(spec.storage.as_str())?, spec.retention, tz)
                }
                None => (w.store(&storage)?, keep.retention(), keep.zone()?),
            };
            if !retention::has_rules(&ret) {
                eprintln!("no keep rule given: every backup is kept");
            }
            let r = store.prune(resource.as_deref(), &ret, &tz, dry_run)?;
            for (id, what) in &r.decisions {
                println!("{id} {what}");
            }
            if let Some(gc) = &r.gc {
                println!(
                    "removed {} backups; gc removed {} chunks ({}), kept {}",
                    r.removed.len(),
                    gc.removed,
                    human(gc.removed_bytes),
                    gc.kept
                );
            } else {
                println!("dry run: would remove {} backups", r.removed.len());
            }
            Ok(0)
        }
        BackupCmd::Gc { storage, manifests } => {
            let w = World::load(&manifests, world)?;
            let r = w.store(&storage)?.gc()?;
            println!(
                "gc: {} chunks referenced, {} kept, {} removed ({}), {} temp files removed",
                r.referenced,
                r.kept,
                r.removed,
                human(r.removed_bytes),
                r.temp_removed
            );
            Ok(0)
        }
        BackupCmd::Daemon { manifests } => {
            let w = World::load(&manifests, world)?;
            let mut jobs = Vec::new();
            for r in w.map.values() {
                let Spec::BackupSchedule(spec) = &r.spec else {
                    continue;
                };
                let pool = w.pool_path(spec.storage.as_str())?;
                let mut ts = Vec::new();
                for id in targets::select(&spec.targets, w.map.values()) {
                    match targets::resolve(env, &w.map, &id) {
                        Ok(t) => ts.push(t),
                        Err(e) => eprintln!("warning: BackupSchedule/{}: {id}: {e}", r.id.name),
                    }
                }
                jobs.push(Job::from_spec(&r.id.name, spec, &pool, ts)?);
            }
            if jobs.is_empty() {
                bail!("no BackupSchedule in the given manifests");
            }
            let clock = SystemClock;
            // The manifests given with -f stay; the applied world is read again each time.
            let from_files: BTreeMap<ResourceId, Resource> = match &reload {
                Some(_) if !manifests.manifests.is_empty() => World::load(&manifests, None)?.map,
                _ => BTreeMap::new(),
            };
            let reload = reload.map(|l| -> WorldLoader {
                Arc::new(move || {
                    let mut m = l()?;
                    m.extend(from_files.clone());
                    Some(m)
                })
            });
            let hooks = hooks_for(env, &w.map, reload);
            let schedules = jobs.len();
            let mut runner = Runner::new(jobs, clock, hooks, &env.state_dir)?;
            eprintln!(
                "backup daemon: {schedules} schedules; state in {}",
                env.state_dir.join("backup/schedules.json").display()
            );
            runner.run()?;
            Ok(0)
        }
    }
}

/// `Kind/name` means its newest backup; `Kind/name/TIME` is taken as is.
fn newest_if_resource(store: &BackupStore, s: &str) -> Result<String> {
    if s.matches('/').count() >= 2 {
        return Ok(s.to_string());
    }
    store
        .newest(s)?
        .with_context(|| format!("no backup of {s}"))
}

fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Resources to resolve names from: `-f` manifests first, then the caller's world.
struct World {
    map: BTreeMap<ResourceId, Resource>,
}

impl World {
    fn load(m: &ManifestArgs, world: Option<&BTreeMap<ResourceId, Resource>>) -> Result<World> {
        let mut map = world.cloned().unwrap_or_default();
        if !m.manifests.is_empty() {
            match stead_schema::load_and_validate(&m.manifests) {
                Ok(d) => map.extend(d.resources),
                Err(diags) => {
                    for d in &diags {
                        eprintln!("{d}");
                    }
                    bail!("the manifests have {} errors", diags.len());
                }
            }
        }
        Ok(World { map })
    }

    fn schedule(
        &self,
        name: &str,
    ) -> Result<(&stead_schema::kinds::BackupScheduleSpec, &Resource)> {
        let id = ResourceId::new(Kind::BackupSchedule, name);
        match self.map.resource(&id) {
            Some(r) => match &r.spec {
                Spec::BackupSchedule(s) => Ok((s, r)),
                _ => bail!("{id} is not a BackupSchedule"),
            },
            None => bail!("{id} is not known; pass the manifests with -f"),
        }
    }

    fn pool_path(&self, name: &str) -> Result<PathBuf> {
        stead_drivers::storage::pool_path(&self.map, name).with_context(|| {
            format!("StoragePool/{name} (pass the manifests with -f, or a pool path)")
        })
    }

    fn store_named(&self, name: &str) -> Result<BackupStore> {
        Ok(BackupStore::for_pool(&self.pool_path(name)?))
    }

    fn store(&self, s: &StorageArg) -> Result<BackupStore> {
        match s.storage.as_deref() {
            Some(p) if p.contains('/') => Ok(BackupStore::for_pool(Path::new(p))),
            Some(name) => self.store_named(name),
            None => bail!("--storage POOL (a StoragePool name or a pool path) is required"),
        }
    }
}
