//! The backup library driven from a small command line, without the whole `stead` binary:
//! for benchmarks (`drivers/benches/backup_bench.sh`) and quick experiments.
//! `cargo run -p stead-drivers --example backup_cli -- list -s POOL`.
//!
//! It speaks a subset of `stead backup` (run, list, verify, restore, prune, gc) through the
//! same library calls ([`stead_drivers::backup::ops`]) and prints the same text; names
//! resolve through `-f` manifests only (there is no state DB here), and no progress bar is
//! drawn.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use stead_drivers::backup::hooks::BackupHooks;
use stead_drivers::backup::hooks::NoHooks;
use stead_drivers::backup::ops::{self, OpsError, RunEvent, RunRequest, RunTarget, World};
use stead_drivers::backup::report;
use stead_drivers::backup::store::DEFAULT_ZSTD_LEVEL;
use stead_host::progress::{NoProgress, Progress};
use stead_reconciler::driver::HostEnv;
use stead_schema::kinds::Retention;

/// stead backup (standalone).
#[derive(Parser, Debug)]
#[command(name = "stead-backup")]
struct Cli {
    /// State directory.
    #[arg(long, default_value = "/var/lib/stead")]
    state_dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Where the backups live and what names mean.
#[derive(Args, Debug, Clone)]
struct Where {
    /// Backup storage: a StoragePool name (resolved through the manifests) or a pool path.
    #[arg(long, short = 's', value_name = "POOL")]
    storage: Option<String>,
    /// Manifest files or directories to resolve names from.
    #[arg(long = "manifests", short = 'f', value_name = "PATH")]
    manifests: Vec<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Back up a resource (Kind/name), every target of a schedule, or explicit paths.
    Run {
        /// Volume/NAME, Container/NAME or VirtualMachine/NAME.
        target: Option<String>,
        /// Run this BackupSchedule's targets now.
        #[arg(long, conflicts_with = "target")]
        schedule: Option<String>,
        /// Explicit input: `PATH` or `NAME=PATH` (repeatable).
        #[arg(long, value_name = "[NAME=]PATH", conflicts_with_all = ["target", "schedule"])]
        path: Vec<String>,
        /// Kind/name to record for `--path` backups.
        #[arg(long, value_name = "KIND/NAME", requires = "path")]
        name: Option<String>,
        #[command(flatten)]
        at: Where,
        /// Store chunks uncompressed.
        #[arg(long)]
        no_compress: bool,
        /// zstd level for new chunks.
        #[arg(long, default_value_t = DEFAULT_ZSTD_LEVEL)]
        level: i32,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Read every file, even unchanged ones.
        #[arg(long)]
        reread: bool,
        /// Keep the N newest backups afterwards.
        #[arg(long, value_name = "N")]
        keep_last: Option<u32>,
    },
    /// List backups, oldest first.
    List {
        /// Only backups of this Kind/name.
        resource: Option<String>,
        #[command(flatten)]
        at: Where,
    },
    /// Check every chunk of a backup (`Kind/name` = the newest). Exit 1 if anything is wrong.
    Verify {
        /// Backup id.
        backup: String,
        #[command(flatten)]
        at: Where,
    },
    /// Restore a backup (`Kind/name` = the newest).
    Restore {
        /// Backup id.
        backup: String,
        /// Restore the (single) input under this new name.
        #[arg(long = "as", value_name = "NEWNAME")]
        as_name: Option<String>,
        /// Directory to restore into.
        #[arg(long, value_name = "DIR", default_value = ".")]
        to: PathBuf,
        #[command(flatten)]
        at: Where,
    },
    /// Keep the N newest backups of each resource, then collect garbage.
    Prune {
        /// Keep the N newest backups.
        #[arg(long, value_name = "N")]
        keep_last: u32,
        /// Show what would be removed; delete nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        at: Where,
    },
    /// Delete chunks no backup references.
    Gc {
        #[command(flatten)]
        at: Where,
    },
}

fn keep_last(n: Option<u32>) -> Retention {
    Retention {
        keep_last: n,
        ..Retention::default()
    }
}

fn print_lines(lines: &[String]) {
    for l in lines {
        println!("{l}");
    }
}

fn world(at: &Where) -> Result<World, OpsError> {
    World::load(&at.manifests, None)
}

fn run(cmd: Cmd, env: &HostEnv) -> Result<i32, OpsError> {
    match cmd {
        Cmd::Run {
            target,
            schedule,
            path,
            name,
            at,
            no_compress,
            level,
            threads,
            reread,
            keep_last: keep,
        } => {
            let w = world(&at)?;
            let req = RunRequest {
                target: RunTarget::from_args(target, schedule, &path, name)?,
                mode: None,
                storage: at.storage,
                compress: !no_compress,
                level,
                threads,
                reread,
                retention: keep_last(keep),
                timezone: None,
            };
            let plan = w.plan_run(env, &req)?;
            let hooks: Arc<dyn BackupHooks> = ops::workload_hooks(env, &w.map, None)
                .unwrap_or_else(|e| {
                    eprintln!("warning: workloads cannot be quiesced here ({e}); reading live");
                    Arc::new(NoHooks)
                });
            let progress = |_: &str| -> Arc<dyn Progress> { Arc::new(NoProgress) };
            let outcome = ops::execute_run(&plan, hooks.as_ref(), &progress, &mut |ev| match ev {
                RunEvent::BackedUp(info) => print_lines(&report::backup_written(info)),
                RunEvent::Failed { resource, error } => {
                    eprintln!("error: backup of {resource}: {}", chain(&error));
                }
                RunEvent::Pruned(id) => println!("pruned {id}"),
            })?;
            Ok(i32::from(outcome.failed))
        }
        Cmd::List { resource, at } => {
            let list = world(&at)?
                .store(at.storage.as_deref())?
                .list(resource.as_deref())?;
            print_lines(&report::backup_table(&list));
            Ok(0)
        }
        Cmd::Verify { backup, at } => {
            let store = world(&at)?.store(at.storage.as_deref())?;
            let r = store.verify(&ops::backup_id(&store, &backup)?)?;
            print_lines(&report::verify_result(&r));
            Ok(if r.ok() { 0 } else { 1 })
        }
        Cmd::Restore {
            backup,
            as_name,
            to,
            at,
        } => {
            let store = world(&at)?.store(at.storage.as_deref())?;
            let id = ops::backup_id(&store, &backup)?;
            let r = store.restore(&id, &to, as_name.as_deref())?;
            print_lines(&report::restored(&r));
            Ok(0)
        }
        Cmd::Prune {
            keep_last: keep,
            dry_run,
            at,
        } => {
            let p = world(&at)?.prune_target(
                None,
                at.storage.as_deref(),
                keep_last(Some(keep)),
                None,
            )?;
            let r = p.store.prune(None, &p.retention, &p.tz, dry_run)?;
            print_lines(&report::prune_result(&r));
            Ok(0)
        }
        Cmd::Gc { at } => {
            let r = world(&at)?.store(at.storage.as_deref())?.gc()?;
            println!("{}", report::gc_result(&r));
            Ok(0)
        }
    }
}

/// An error and its causes, `: `-separated.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(&format!(": {c}"));
        cause = c.source();
    }
    s
}

fn main() {
    let cli = Cli::parse();
    let env = HostEnv {
        state_dir: cli.state_dir.clone(),
        run_dir: PathBuf::from("/run/stead"),
        cgroup_parent: "stead".into(),
        netns: None,
        self_exe: std::env::current_exe().unwrap_or_default(),
        fence_file: None,
    };
    match run(cli.cmd, &env) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            if let OpsError::Manifests(diags) = &e {
                for d in diags {
                    eprintln!("{d}");
                }
            }
            eprintln!("error: {}", chain(&e));
            std::process::exit(1);
        }
    }
}
