//! `stead backup run|list|verify|restore|prune|gc|simulate-prune|daemon`: the arguments
//! and the printing. The work is done by [`stead_drivers::backup::ops`].
//!
//! Targets and pools resolve through the manifests given with `-f/--manifests` (or a world
//! the caller passes to [`run_with`], e.g. the state DB inventory). Explicit
//! `--path/--name/--storage PATH` arguments work without any manifest.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use stead_drivers::backup::consistency::WorldLoader;
use stead_drivers::backup::hooks::{BackupHooks, NoHooks};
use stead_drivers::backup::ops::{self, OpsError, RunEvent, RunRequest, RunTarget, World};
use stead_drivers::backup::report;
use stead_drivers::backup::runner::{Clock, Job, Runner, SystemClock};
use stead_drivers::backup::store::DEFAULT_ZSTD_LEVEL;
use stead_drivers::backup::{retention, schedule, targets};
use stead_host::progress::Meter;
use stead_reconciler::driver::HostEnv;
use stead_schema::kinds::{BackupMode, Retention};
use stead_schema::{Resource, ResourceId, Spec};

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
        Ok(ops::zone(self.timezone.as_deref())?)
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

impl AsRef<[PathBuf]> for ManifestArgs {
    fn as_ref(&self) -> &[PathBuf] {
        &self.manifests
    }
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
    ops::workload_hooks(env, map, reload).unwrap_or_else(|e| {
        eprintln!("warning: workloads cannot be quiesced here ({e}); reading live");
        Arc::new(NoHooks)
    })
}

/// `stead backup` subcommands.
#[derive(Subcommand, Debug)]
pub enum BackupCmd {
    /// Back up a resource (Kind/name), every target of a schedule, or explicit paths.
    Run(RunArgs),
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

/// Arguments of `stead backup run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Volume/NAME, Container/NAME or VirtualMachine/NAME.
    pub target: Option<String>,
    /// Run this BackupSchedule's targets now (its storage, compression and retention).
    #[arg(long, conflicts_with = "target")]
    pub schedule: Option<String>,
    /// Explicit input instead of a resolved target: `PATH` or `NAME=PATH` (repeatable;
    /// a file such as a volume image, or a directory tree).
    #[arg(long, value_name = "[NAME=]PATH", conflicts_with_all = ["target", "schedule"])]
    pub path: Vec<String>,
    /// Kind/name to record for `--path` backups.
    #[arg(long, value_name = "KIND/NAME", requires = "path")]
    pub name: Option<String>,
    /// How running workloads are made consistent: `snapshot` (freeze or pause them,
    /// reflink-clone their volumes, let them run again) or `stop` (stop them, read,
    /// start them again). Default: the schedule's mode, else snapshot.
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    #[command(flatten)]
    pub storage: StorageArg,
    /// Store chunks uncompressed.
    #[arg(long)]
    pub no_compress: bool,
    /// zstd level for new chunks.
    #[arg(long, default_value_t = DEFAULT_ZSTD_LEVEL)]
    pub level: i32,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Read every file, even those whose size, mtime, inode and ctime show them
    /// unchanged since the previous backup (whose chunk lists are reused otherwise).
    #[arg(long)]
    pub reread: bool,
    /// Prune afterwards with these rules (a schedule uses its own retention).
    #[command(flatten)]
    pub keep: KeepArgs,
    #[command(flatten)]
    pub manifests: ManifestArgs,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Text)]
    pub output: Format,
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
    let code = match cmd {
        BackupCmd::SimulatePrune {
            keep,
            show_rule,
            file,
        } => simulate_prune(&keep, show_rule, file.as_deref()),
        BackupCmd::Run(args) => run(args, env, world),
        BackupCmd::List {
            resource,
            storage,
            manifests,
            output,
        } => {
            let w = World::load(&manifests, world)?;
            list(&w, resource.as_deref(), &storage, output)
        }
        BackupCmd::Verify {
            backup,
            storage,
            manifests,
            output,
        } => {
            let w = World::load(&manifests, world)?;
            verify(&w, &backup, &storage, output)
        }
        BackupCmd::Restore {
            backup,
            as_name,
            to,
            storage,
            manifests,
        } => {
            let w = World::load(&manifests, world)?;
            restore(&w, &backup, as_name.as_deref(), to, &storage)
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
            prune(
                &w,
                resource.as_deref(),
                &keep,
                schedule.as_deref(),
                dry_run,
                &storage,
            )
        }
        BackupCmd::Gc { storage, manifests } => {
            let w = World::load(&manifests, world)?;
            let r = w.store(storage.storage.as_deref())?.gc()?;
            println!("{}", report::gc_result(&r));
            Ok(0)
        }
        BackupCmd::Daemon { manifests } => {
            let (mut runner, schedules) =
                schedule_runner(&manifests, env, world, reload, SystemClock)?;
            eprintln!(
                "backup daemon: {schedules} schedules; state in {}",
                env.state_dir.join("backup/schedules.json").display()
            );
            runner.run()?;
            Ok(0)
        }
    };
    code.inspect_err(print_manifest_diagnostics)
}

/// The runner of `stead backup daemon`: one job per BackupSchedule of `manifests` and
/// `world` (the applied resources), consistency hooks that fetch the applied world again
/// through `reload` before each backup, time from `clock`; and the number of schedules.
/// The controller's housekeeping builds the same runner with a clock it can stop.
pub fn schedule_runner<C: Clock>(
    manifests: &ManifestArgs,
    env: &HostEnv,
    world: Option<&BTreeMap<ResourceId, Resource>>,
    reload: Option<WorldLoader>,
    clock: C,
) -> Result<(Runner<C>, usize)> {
    let w = World::load(manifests, world)?;
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
    // The manifests given with -f stay; the applied world is read again each time.
    let from_files: BTreeMap<ResourceId, Resource> = match &reload {
        Some(_) if !manifests.manifests.is_empty() => World::load(manifests, None)?.map,
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
    Ok((Runner::new(jobs, clock, hooks, &env.state_dir)?, schedules))
}

/// Before the error itself: each problem of manifests that do not validate.
fn print_manifest_diagnostics(e: &anyhow::Error) {
    if let Some(OpsError::Manifests(diags)) = e.downcast_ref::<OpsError>() {
        for d in diags {
            eprintln!("{d}");
        }
    }
}

/// `simulate-prune`: timestamps from `file` (or stdin) through the rules.
fn simulate_prune(keep: &KeepArgs, show_rule: bool, file: Option<&std::path::Path>) -> Result<i32> {
    let mut input = String::new();
    match file {
        Some(f) => {
            input = std::fs::read_to_string(f).with_context(|| format!("read {}", f.display()))?
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

/// The library's request for `run`'s arguments.
fn run_request(a: RunArgs) -> Result<RunRequest> {
    Ok(RunRequest {
        target: RunTarget::from_args(a.target, a.schedule, &a.path, a.name)?,
        mode: a.mode.map(BackupMode::from),
        storage: a.storage.storage,
        compress: !a.no_compress,
        level: a.level,
        threads: a.threads,
        reread: a.reread,
        retention: a.keep.retention(),
        timezone: a.keep.timezone,
    })
}

/// `run`: back up, print each outcome as it comes; 1 if any target failed.
fn run(
    args: RunArgs,
    env: &HostEnv,
    world: Option<&BTreeMap<ResourceId, Resource>>,
) -> Result<i32> {
    let w = World::load(&args.manifests, world)?;
    let output = args.output;
    let plan = w.plan_run(env, &run_request(args)?)?;
    let hooks = hooks_for(env, &w.map, None);
    let progress = |label: &str| stead_host::progress::start(label, Meter::Transfer);
    let outcome = ops::execute_run(&plan, hooks.as_ref(), &progress, &mut |ev| {
        print_run_event(ev, output)
    })?;
    if output == Format::Json {
        println!("{}", serde_json::to_string_pretty(&outcome.results)?);
    }
    Ok(if outcome.failed { 1 } else { 0 })
}

/// One outcome of a run: figures and prunes in text output, errors always.
fn print_run_event(ev: RunEvent<'_>, output: Format) {
    match ev {
        RunEvent::BackedUp(info) if output == Format::Text => {
            for l in report::backup_written(info) {
                println!("{l}");
            }
        }
        RunEvent::Failed { resource, error } => {
            eprintln!(
                "error: backup of {resource}: {:#}",
                anyhow::Error::from(error)
            );
        }
        RunEvent::Pruned(id) if output == Format::Text => println!("pruned {id}"),
        RunEvent::BackedUp(_) | RunEvent::Pruned(_) => {}
    }
}

/// `list`.
fn list(w: &World, resource: Option<&str>, storage: &StorageArg, output: Format) -> Result<i32> {
    let list = w.store(storage.storage.as_deref())?.list(resource)?;
    match output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&list)?),
        Format::Text => print_lines(&report::backup_table(&list)),
    }
    Ok(0)
}

/// `verify`: 1 if anything is wrong.
fn verify(w: &World, backup: &str, storage: &StorageArg, output: Format) -> Result<i32> {
    let store = w.store(storage.storage.as_deref())?;
    let r = store.verify(&ops::backup_id(&store, backup)?)?;
    match output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&r)?),
        Format::Text => print_lines(&report::verify_result(&r)),
    }
    Ok(if r.ok() { 0 } else { 1 })
}

/// `restore`, into `to` or the current directory.
fn restore(
    w: &World,
    backup: &str,
    as_name: Option<&str>,
    to: Option<PathBuf>,
    storage: &StorageArg,
) -> Result<i32> {
    let store = w.store(storage.storage.as_deref())?;
    let id = ops::backup_id(&store, backup)?;
    let dest = match to {
        Some(d) => d,
        None => std::env::current_dir().context("current directory")?,
    };
    let r = store.restore(&id, &dest, as_name)?;
    print_lines(&report::restored(&r));
    Ok(0)
}

/// `prune`, by a schedule's rules or the `--keep-*` ones.
fn prune(
    w: &World,
    resource: Option<&str>,
    keep: &KeepArgs,
    schedule: Option<&str>,
    dry_run: bool,
    storage: &StorageArg,
) -> Result<i32> {
    let p = w.prune_target(
        schedule,
        storage.storage.as_deref(),
        keep.retention(),
        keep.timezone.as_deref(),
    )?;
    if !retention::has_rules(&p.retention) {
        eprintln!("no keep rule given: every backup is kept");
    }
    let r = p.store.prune(resource, &p.retention, &p.tz, dry_run)?;
    print_lines(&report::prune_result(&r));
    Ok(0)
}

fn print_lines(lines: &[String]) {
    for l in lines {
        println!("{l}");
    }
}
