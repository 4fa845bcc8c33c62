//! `stead`: declarative reconciler for Linux virtualization hosts.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use stead_reconciler::driver::HostEnv;
use stead_reconciler::render::{self, Style};
use stead_reconciler::{ApplyLock, Drivers, ExecOptions, PlanOptions, StateDb, execute, plan_run};
use stead_schema::{Desired, Diagnostic, Kind, ResourceId};

mod agent_repl;
mod cmd_agent;
mod cmd_backup;
mod cmd_cluster;
mod cmd_console;
mod cmd_controller;
mod cmd_env;
mod cmd_import;
mod cmd_qemu;
mod cmd_snapshot;
mod cmd_vmm;
mod completions;
mod get;
mod housekeeping;
mod manpages;
mod progress;

/// Declarative, GitOps-style reconciler for Linux virtualization hosts.
#[derive(Parser, Debug)]
#[command(name = "stead", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Options valid before or after the verb.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Global {
    /// State directory (inventory, journal, lock).
    #[arg(
        long,
        global = true,
        env = "STEAD_STATE_DIR",
        default_value = "/var/lib/stead"
    )]
    state_dir: PathBuf,
    /// Runtime directory (supervisor sockets and state files).
    #[arg(
        long,
        global = true,
        env = "STEAD_RUN_DIR",
        default_value = stead_host::paths::RUN_DIR
    )]
    run_dir: PathBuf,
    /// Cgroup parent for workloads.
    #[arg(
        long,
        global = true,
        env = "STEAD_CGROUP_PARENT",
        default_value = "stead"
    )]
    cgroup_parent: String,
    /// Manage networking inside this network namespace (a name under /run/netns or a path).
    #[arg(long, global = true, env = "STEAD_NETNS")]
    netns: Option<String>,
    /// More log output (-v info, -vv debug, -vvv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Colored output.
    #[arg(long, global = true, value_enum, default_value_t = ColorWhen::Auto)]
    color: ColorWhen,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum ColorWhen {
    Auto,
    Always,
    Never,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PlanFormat {
    Text,
    Json,
    // A pull-request comment (plans only; `env` prints text for it).
    Markdown,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GetFormat {
    Text,
    Json,
    Yaml,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Parse and check manifests; print every error as FILE:LINE:COL.
    Validate {
        /// Manifest files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Show the plan against the host. Exit 0: no changes, 2: changes, 1: error.
    Diff {
        /// Manifest files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = PlanFormat::Text)]
        output: PlanFormat,
        /// Do not plan deletes of owned resources missing from the manifests.
        #[arg(long)]
        no_prune: bool,
        /// Plan data-loss changes instead of refusing them.
        #[arg(long)]
        allow_data_loss: bool,
        /// Adopt existing objects stead does not own instead of refusing them.
        #[arg(long)]
        adopt: bool,
    },
    /// Converge the host to the manifests. Exit 0: converged, 1: error.
    Apply {
        /// Manifest files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Do not ask for confirmation.
        #[arg(short, long)]
        yes: bool,
        /// Do not delete owned resources missing from the manifests.
        #[arg(long)]
        no_prune: bool,
        /// Show the plan and stop.
        #[arg(long)]
        dry_run: bool,
        /// Confirm changes that destroy data (other than deletionPolicy: Delete prunes).
        #[arg(long)]
        allow_data_loss: bool,
        /// Adopt existing objects stead does not own instead of refusing them.
        #[arg(long)]
        adopt: bool,
        /// Changes run at once.
        #[arg(long, default_value_t = 4)]
        parallelism: usize,
        /// How long to wait for another apply's lock.
        #[arg(long, default_value = "30s")]
        lock_timeout: stead_schema::DurationSpec,
        /// Output format of the plan.
        #[arg(short, long, value_enum, default_value_t = PlanFormat::Text)]
        output: PlanFormat,
    },
    /// Show observed state and status of owned resources.
    Get {
        /// KIND or KIND/NAME (e.g. volume, vm/web).
        what: Option<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = GetFormat::Text)]
        output: GetFormat,
    },
    /// Remove what the manifests own (Retain volumes are kept).
    Destroy {
        /// Manifest files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Do not ask for confirmation.
        #[arg(short, long)]
        yes: bool,
        /// Also delete data of changes marked data-loss.
        #[arg(long)]
        allow_data_loss: bool,
    },
    /// Follow a git repository or directory; converge on each revision, heal drift, export metrics.
    Controller(cmd_controller::ControllerArgs),
    /// Write stead manifests from another tool's configuration: `stead import proxmox`.
    Import {
        #[command(subcommand)]
        cmd: cmd_import::ImportCmd,
    },
    /// Backups: run, list, verify, restore, prune, simulate-prune, daemon.
    Backup {
        #[command(subcommand)]
        cmd: cmd_backup::BackupCmd,
    },
    /// Run a command inside a running container: `stead exec Container/web -- ps`.
    Exec {
        /// Container/NAME (or just NAME).
        target: String,
        /// Command and arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
    /// Per-container supervisor (internal; started by the Container driver).
    #[command(hide = true)]
    Shim {
        /// Container name.
        #[arg(long)]
        name: String,
        /// Resolved container config (JSON written by the driver).
        #[arg(long)]
        config: PathBuf,
    },
    /// Volume snapshots: create, list, rollback, delete.
    Snapshot {
        #[command(subcommand)]
        cmd: cmd_snapshot::SnapshotCmd,
    },
    /// Isolated environments (per branch or pull request) with a TTL.
    Env {
        #[command(subcommand)]
        cmd: cmd_env::EnvCmd,
    },
    /// Attach to a VM's serial console or a container's console (Ctrl-] detaches).
    Console(cmd_console::ConsoleArgs),
    /// Print the console log of a VM or container.
    Logs(cmd_console::LogsArgs),
    /// Per-VM supervisor started by the VirtualMachine driver (internal).
    #[command(hide = true)]
    Vmm(cmd_vmm::VmmArgs),
    /// Per-VM QEMU supervisor started by the VirtualMachine driver (internal).
    #[command(hide = true)]
    Qemu(cmd_qemu::QemuArgs),
    /// The cluster on etcd: certificates (init), state (status).
    Cluster {
        #[command(subcommand)]
        cmd: cmd_cluster::ClusterCmd,
    },
    /// This host as a cluster node: join.
    Node {
        #[command(subcommand)]
        cmd: cmd_agent::NodeCmd,
    },
    /// Run this node's cluster agent: register, converge what is assigned here.
    Agent(cmd_agent::AgentArgs),
    /// Move a cluster workload to another node (cold), or clear such an override.
    Migrate(cmd_cluster::MigrateArgs),
    /// Print the JSON Schema of all kinds.
    Schema,
    /// Print the manual page, or write one per subcommand with --out DIR.
    Man(manpages::ManArgs),
    /// Print the shell completion script (it completes Kind/name from the state dir too).
    Completions {
        /// Shell.
        shell: clap_complete::Shell,
    },
}

/// The process umask: files and directories stead creates (state DB, config.json,
/// console logs, sockets, run dirs) are private to root whatever the caller's umask;
/// `stead shim` and `stead vmm` (this binary) inherit it. Code that needs a wider mode
/// sets it explicitly.
const UMASK: u32 = 0o077;

fn main() -> ExitCode {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(UMASK));
    completions::answer_if_asked();
    let cli = Cli::parse();
    init_logging(&cli.global);
    stead_host::progress::install(Box::new(progress::Terminal));
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(g: &Global) {
    use tracing_subscriber::EnvFilter;
    let level = if g.quiet {
        "error"
    } else {
        match g.verbose {
            0 => "warn",
            1 => "info",
            2 => "debug",
            _ => "trace",
        }
    };
    let filter = EnvFilter::try_from_env("STEAD_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match g.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
}

/// Every resource as last applied (for commands that act on owned resources by name).
pub(crate) fn applied_world(env: &HostEnv) -> Result<BTreeMap<ResourceId, stead_schema::Resource>> {
    let db = StateDb::open(&env.state_dir)?;
    Ok(db
        .inventory()?
        .into_iter()
        .map(|(id, e)| (id, e.resource))
        .collect())
}

/// The host handles without `--netns` (environments bring their own namespace).
pub(crate) fn host_env_unchecked(g: &Global) -> Result<HostEnv> {
    Ok(HostEnv {
        state_dir: g.state_dir.clone(),
        run_dir: g.run_dir.clone(),
        cgroup_parent: g.cgroup_parent.clone(),
        netns: None,
        self_exe: std::env::current_exe().context("cannot find the stead binary")?,
        fence_file: None,
    })
}

pub(crate) fn host_env(g: &Global) -> Result<HostEnv> {
    let netns = g.netns.as_ref().map(|n| {
        if n.contains('/') {
            PathBuf::from(n)
        } else {
            stead_host::NetnsDir::host().path_of(n)
        }
    });
    if let Some(p) = &netns
        && !p.exists()
    {
        bail!("network namespace {} does not exist", p.display());
    }
    Ok(HostEnv {
        state_dir: g.state_dir.clone(),
        run_dir: g.run_dir.clone(),
        cgroup_parent: g.cgroup_parent.clone(),
        netns,
        self_exe: std::env::current_exe().context("cannot find the stead binary")?,
        fence_file: None,
    })
}

pub(crate) fn drivers(env: &HostEnv) -> Result<Drivers> {
    drivers_with(env, &stead_drivers::RegistryOptions::default())
}

pub(crate) fn drivers_with(
    env: &HostEnv,
    opts: &stead_drivers::RegistryOptions,
) -> Result<Drivers> {
    drivers_for(env, opts, Kind::ALL)
}

/// The drivers of `kinds` only (a network-only manifest needs no cgroups).
pub(crate) fn drivers_for(
    env: &HostEnv,
    opts: &stead_drivers::RegistryOptions,
    kinds: impl IntoIterator<Item = Kind>,
) -> Result<Drivers> {
    let mut map: Drivers = BTreeMap::new();
    for d in stead_drivers::registry_for(env, opts, kinds).context("cannot initialise drivers")? {
        map.insert(d.kind(), d);
    }
    Ok(map)
}

/// The kinds a plan of `desired` can touch: those in the manifests, in the inventory and
/// in open journal entries (an interrupted or failed create the inventory never recorded).
fn kinds_used(desired: &Desired, db: &StateDb) -> Result<BTreeSet<Kind>> {
    let mut kinds: BTreeSet<Kind> = desired.resources.keys().map(|id| id.kind).collect();
    kinds.extend(db.inventory()?.keys().map(|id| id.kind));
    kinds.extend(db.journal_open()?.keys().map(|id| id.kind));
    Ok(kinds)
}

fn style(g: &Global) -> Style {
    Style {
        color: match g.color {
            ColorWhen::Always => true,
            ColorWhen::Never => false,
            ColorWhen::Auto => {
                std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
            }
        },
    }
}

fn print_diagnostics(diags: &[Diagnostic]) {
    for d in diags {
        eprintln!("{d}");
    }
    eprintln!("{} error(s) found", diags.len());
}

fn load(paths: &[PathBuf]) -> Option<Desired> {
    match stead_schema::load_and_validate(paths) {
        Ok(d) => Some(d),
        Err(diags) => {
            print_diagnostics(&diags);
            None
        }
    }
}

/// Leaves `v` to the process's exit instead of freeing it piece by piece: the manifests
/// and the plan of a large diff are millions of small allocations (100k resources: about
/// a tenth of the run), and the process ends right after.
fn free_at_exit<T>(v: T) {
    std::mem::forget(v);
}

fn confirm(question: &str) -> Result<bool> {
    if !std::io::stdin().is_terminal() {
        bail!("refusing to change the host without --yes: standard input is not a terminal");
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush().ok();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes"))
}

fn run(cli: Cli) -> Result<u8> {
    let g = cli.global;
    match cli.command {
        Command::Validate { paths } => {
            let Some(d) = load(&paths) else { return Ok(1) };
            let mut per_kind: BTreeMap<Kind, usize> = BTreeMap::new();
            for id in d.resources.keys() {
                *per_kind.entry(id.kind).or_default() += 1;
            }
            let parts: Vec<String> = per_kind.iter().map(|(k, n)| format!("{n} {k}")).collect();
            println!("valid: {} resources ({})", d.len(), parts.join(", "));
            Ok(0)
        }
        Command::Diff {
            paths,
            output,
            no_prune,
            allow_data_loss,
            adopt,
        } => {
            let Some(desired) = load(&paths) else {
                return Ok(1);
            };
            let env = host_env(&g)?;
            let db = StateDb::open(&env.state_dir)?;
            let drivers = drivers_for(
                &env,
                &stead_drivers::RegistryOptions::default(),
                kinds_used(&desired, &db)?,
            )?;
            let run = plan_run(
                &drivers,
                &desired,
                &db,
                PlanOptions {
                    no_prune,
                    allow_data_loss,
                    adopt,
                    ..Default::default()
                },
            )?;
            match output {
                PlanFormat::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&render::plan_json(&run.plan))?
                ),
                PlanFormat::Text => print!("{}", render::plan_text(&run.plan, style(&g))),
                PlanFormat::Markdown => print!("{}", render::plan_markdown(&run.plan)),
            }
            let code = if !run.plan.errors.is_empty() {
                1
            } else if run.plan.has_changes() {
                2
            } else {
                0
            };
            free_at_exit(run);
            free_at_exit(desired);
            Ok(code)
        }
        Command::Apply {
            paths,
            yes,
            no_prune,
            dry_run,
            allow_data_loss,
            adopt,
            parallelism,
            lock_timeout,
            output,
        } => {
            let Some(desired) = load(&paths) else {
                return Ok(1);
            };
            let env = host_env(&g)?;
            apply(
                &g,
                &env,
                ApplyRequest {
                    desired: &desired,
                    only: None,
                    opts: PlanOptions {
                        no_prune,
                        allow_data_loss,
                        adopt,
                        ..Default::default()
                    },
                    purge: false,
                    yes,
                    dry_run,
                    parallelism,
                    lock_timeout: lock_timeout.0,
                    output,
                },
            )
        }
        Command::Destroy {
            paths,
            yes,
            allow_data_loss,
        } => {
            let Some(manifests) = load(&paths) else {
                return Ok(1);
            };
            let env = host_env(&g)?;
            let only: Vec<ResourceId> = manifests.resources.keys().cloned().collect();
            apply(
                &g,
                &env,
                ApplyRequest {
                    desired: &Desired::default(),
                    only: Some(only),
                    opts: PlanOptions {
                        no_prune: false,
                        allow_data_loss,
                        ..Default::default()
                    },
                    purge: false,
                    yes,
                    dry_run: false,
                    parallelism: 4,
                    lock_timeout: Duration::from_secs(30),
                    output: PlanFormat::Text,
                },
            )
        }
        Command::Get { what, output } => {
            let env = host_env(&g)?;
            get::run(&env, what.as_deref(), output)
        }
        Command::Env { cmd } => cmd_env::run(cmd, &g),
        Command::Import { cmd } => cmd_import::run(cmd),
        Command::Backup { cmd } => {
            let env = host_env(&g)?;
            let world = applied_world(&env)?;
            let reload_env = env.clone();
            let reload: stead_drivers::backup::consistency::WorldLoader =
                std::sync::Arc::new(move || applied_world(&reload_env).ok());
            let code = cmd_backup::run_with(cmd, &env, Some(&world), Some(reload))?;
            Ok(u8::try_from(code).unwrap_or(1))
        }
        Command::Exec { target, command } => {
            let name = match target.split_once('/') {
                Some((k, n)) if Kind::parse_loose(k) == Some(Kind::Container) => n.to_string(),
                Some((k, _)) => bail!("exec works on containers, not {k}"),
                None => target.clone(),
            };
            let code = stead_drivers::container::exec(&g.run_dir, &name, &command)?;
            Ok(u8::try_from(code).unwrap_or(1))
        }
        Command::Shim { name, config } => {
            let code =
                stead_drivers::container::shim::main(&stead_drivers::container::shim::ShimArgs {
                    run_dir: g.run_dir.clone(),
                    name,
                    config,
                });
            Ok(u8::try_from(code).unwrap_or(1))
        }
        Command::Snapshot { cmd } => {
            let env = host_env(&g)?;
            let world = applied_world(&env)?;
            let code = cmd_snapshot::run(cmd, &env, &world)?;
            Ok(u8::try_from(code).unwrap_or(1))
        }
        Command::Controller(args) => {
            let env = host_env(&g)?;
            let drivers = drivers(&env)?;
            cmd_controller::run(args, &g, &env, drivers)
        }
        Command::Console(args) => {
            let env = host_env(&g)?;
            cmd_console::run_console(args, &env)
        }
        Command::Logs(args) => {
            let env = host_env(&g)?;
            cmd_console::run_logs(args, &env)
        }
        Command::Vmm(args) => cmd_vmm::run(args, &g.run_dir),
        Command::Qemu(args) => cmd_qemu::run(args, &g.run_dir),
        Command::Cluster { cmd } => cmd_cluster::run(cmd, &g),
        Command::Migrate(args) => cmd_cluster::migrate(args, &g),
        Command::Node { cmd } => cmd_agent::node(cmd, &g),
        Command::Agent(args) => {
            let env = host_env(&g)?;
            cmd_agent::run(args, &g, env)
        }
        Command::Schema => {
            print!("{}", stead_schema::schema::json_schema_text());
            Ok(0)
        }
        Command::Man(args) => manpages::run(&args),
        Command::Completions { shell } => {
            completions::write_script(shell, &mut std::io::stdout())?;
            Ok(0)
        }
    }
}

/// One apply (or destroy) request.
pub(crate) struct ApplyRequest<'a> {
    /// The desired set.
    pub desired: &'a Desired,
    /// Restrict the plan to these ids (destroy).
    pub only: Option<Vec<ResourceId>>,
    /// Plan options.
    pub opts: PlanOptions,
    /// Environment teardown: delete retained resources too, and stop containers
    /// without a grace period.
    pub purge: bool,
    /// Do not ask.
    pub yes: bool,
    /// Plan only.
    pub dry_run: bool,
    /// Changes at once.
    pub parallelism: usize,
    /// Wait for the lock this long.
    pub lock_timeout: Duration,
    /// Plan output format.
    pub output: PlanFormat,
}

/// Plans and applies. With `only`, the inventory is restricted to those ids (destroy).
pub(crate) fn apply(g: &Global, env: &HostEnv, req: ApplyRequest<'_>) -> Result<u8> {
    let ApplyRequest {
        desired,
        only,
        opts,
        purge,
        yes,
        dry_run,
        parallelism,
        lock_timeout,
        output,
    } = req;
    let opts_drivers = stead_drivers::RegistryOptions {
        container_stop_timeout_secs: purge.then_some(0),
    };
    let _lock = if dry_run {
        None
    } else {
        Some(ApplyLock::acquire(&env.state_dir, lock_timeout)?)
    };
    let db = StateDb::open(&env.state_dir)?;
    let drivers = drivers_for(env, &opts_drivers, kinds_used(desired, &db)?)?;
    let only_ids = only.as_ref().map(|o| o.iter().cloned().collect());
    let opts = PlanOptions {
        only: only_ids,
        purge_retained: purge,
        ..opts
    };
    let mut run = plan_run(&drivers, desired, &db, opts)?;
    if let Some(only) = &only {
        run.inventory.retain(|id, _| only.contains(id));
    }
    let style = style(g);
    match output {
        PlanFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&render::plan_json(&run.plan))?
        ),
        PlanFormat::Text => print!("{}", render::plan_text(&run.plan, style)),
        PlanFormat::Markdown => print!("{}", render::plan_markdown(&run.plan)),
    }
    if !run.plan.errors.is_empty() {
        return Ok(1);
    }
    if dry_run {
        return Ok(0);
    }
    let changes = run.plan.has_changes();
    if changes && !yes && !confirm("Apply these changes?")? {
        eprintln!("Apply cancelled.");
        return Ok(1);
    }
    let opts = ExecOptions {
        parallelism,
        pause_after_steps: std::env::var("STEAD_TEST_PAUSE_AFTER_STEPS")
            .ok()
            .and_then(|v| v.parse().ok()),
    };
    let db = Mutex::new(db);
    let quiet = g.quiet;
    let report = execute(
        &run.plan,
        desired,
        &run.inventory,
        &run.observed,
        &drivers,
        &db,
        &opts,
        &|r| {
            // A plan without changes still runs: it records objects adopted after an
            // interrupted apply and closes their journal entries, silently.
            if !quiet && changes {
                eprintln!("{}", render::step_line(r, style));
            }
        },
    );
    if changes || !report.success() {
        println!("{}", render::report_summary(&report));
    }
    Ok(if report.success() { 0 } else { 1 })
}
