//! `stead controller`: the GitOps loop (see `stead_controller`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use stead_controller::source::{GitAuth, SourceSpec};
use stead_controller::{Config, DriftMode};
use stead_reconciler::Drivers;
use stead_reconciler::driver::HostEnv;
use stead_schema::DurationSpec;

use crate::Global;
use crate::housekeeping::CliHousekeeping;

/// What to do when the host drifts from the applied manifests.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriftArg {
    /// Apply the manifests again.
    Heal,
    /// Only report it (status, metrics, events).
    Report,
}

/// Follow a git repository or a directory and keep the host converged.
#[derive(clap::Args, Debug)]
pub struct ControllerArgs {
    /// `git+URL[#branch][:subdir]` (file://, https://, ssh://) or a local directory.
    #[arg(long, env = "STEAD_SOURCE")]
    pub source: String,
    /// How often to fetch a git source (webhooks fetch at once).
    #[arg(long, default_value = "60s")]
    pub interval: DurationSpec,
    /// How often to re-check the host for drift (jittered by ±10%).
    #[arg(long, default_value = "60s")]
    pub resync: DurationSpec,
    /// Heal drift or only report it.
    #[arg(long, value_enum, default_value_t = DriftArg::Heal)]
    pub drift: DriftArg,
    /// Address for /metrics, /healthz, /readyz and POST /hooks/git.
    #[arg(long, env = "STEAD_LISTEN", default_value = "127.0.0.1:9464")]
    pub listen: SocketAddr,
    /// File holding the webhook token (or set STEAD_WEBHOOK_TOKEN). Without one,
    /// /hooks/git is disabled.
    #[arg(long)]
    pub webhook_token_file: Option<PathBuf>,
    /// Apply only commits signed by a key in this file: an SSH allowed-signers file
    /// (`ssh-keygen -Y verify`) or an OpenPGP keyring (`gpgv`).
    #[arg(long, value_name = "KEYRING")]
    pub verify_commits: Option<PathBuf>,
    /// File with `username:password` or a token, for https remotes.
    #[arg(long)]
    pub git_credentials_file: Option<PathBuf>,
    /// SSH private key for ssh:// remotes.
    #[arg(long)]
    pub git_ssh_key: Option<PathBuf>,
    /// Do not delete owned resources missing from the manifests.
    #[arg(long)]
    pub no_prune: bool,
    /// Accept a revision without manifests (prunes everything stead owns).
    #[arg(long)]
    pub allow_empty: bool,
    /// Accept a git head that is not a descendant of the revision applied last (a
    /// force-push or a rewind to an older commit). Without it such a head is refused.
    #[arg(long)]
    pub allow_rewind: bool,
    /// Changes run at once.
    #[arg(long, default_value_t = 4)]
    pub parallelism: usize,
    /// Quiet time after file-system events before reconciling a directory source.
    #[arg(long, default_value = "200ms")]
    pub debounce: DurationSpec,
    /// `auto` applies every good head; `manual` plans a new head and shows it (web UI,
    /// /api/v1/pending) until an operator syncs it. Drift is healed either way.
    #[arg(long, value_enum, default_value_t = SyncArg::Auto)]
    pub sync: SyncArg,
    /// A branch of the git source whose head is planned against this host after each
    /// reconcile and shown on the pending-change page (and /api/v1/pending), never
    /// applied: what merging it would do.
    #[arg(long, value_name = "BRANCH")]
    pub plan_branch: Option<String>,
    /// Serve the web UI and /api/v1 on --listen (needs --ui-token-file or --ui-users).
    #[arg(long, env = "STEAD_UI")]
    pub ui: bool,
    /// File holding the UI's bearer token (operator role; at least 16 characters), or
    /// set STEAD_UI_TOKEN.
    #[arg(long, requires = "ui")]
    pub ui_token_file: Option<PathBuf>,
    /// File of UI users, one `name:role:argon2-hash` a line (role viewer or operator).
    #[arg(long, requires = "ui")]
    pub ui_users: Option<PathBuf>,
    /// Mark the session cookie Secure (the UI is served through a TLS proxy).
    #[arg(long, requires = "ui")]
    pub ui_secure_cookie: bool,
}

/// When a new head is applied.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncArg {
    /// At once.
    Auto,
    /// When an operator asks (POST /api/v1/actions/sync).
    Manual,
}

/// The UI settings from the flags, `None` without `--ui`.
fn ui_config(args: &ControllerArgs) -> Result<Option<stead_controller::auth::UiConfig>> {
    if !args.ui {
        return Ok(None);
    }
    let token = match (&args.ui_token_file, std::env::var("STEAD_UI_TOKEN")) {
        (Some(f), _) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("cannot read {}", f.display()))?
                .trim()
                .to_string(),
        ),
        (None, Ok(t)) => Some(t.trim().to_string()),
        (None, Err(_)) => None,
    };
    let users = match &args.ui_users {
        Some(f) => {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read {}", f.display()))?;
            stead_controller::auth::parse_users(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?
        }
        None => Vec::new(),
    };
    let mut cfg =
        stead_controller::auth::UiConfig::new(token, users).map_err(anyhow::Error::msg)?;
    cfg.secure_cookie = args.ui_secure_cookie;
    Ok(Some(cfg))
}

/// Runs the controller until SIGTERM/SIGINT. Exit 0 on a clean shutdown.
pub fn run(args: ControllerArgs, g: &Global, global_env: &HostEnv, drivers: Drivers) -> Result<u8> {
    let source = SourceSpec::parse(&args.source).map_err(anyhow::Error::msg)?;
    let webhook_token = match (
        &args.webhook_token_file,
        std::env::var("STEAD_WEBHOOK_TOKEN"),
    ) {
        (Some(f), _) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("cannot read {}", f.display()))?
                .trim()
                .to_string(),
        ),
        (None, Ok(t)) => Some(t.trim().to_string()),
        (None, Err(_)) => None,
    };
    if webhook_token.as_deref() == Some("") {
        bail!("the webhook token is empty");
    }
    if args.resync.0.is_zero() || args.interval.0.is_zero() {
        bail!("--resync and --interval must be positive");
    }
    if let Some(b) = &args.plan_branch {
        if !stead_controller::source::branch_name_is_valid(b) {
            bail!("--plan-branch {b:?}: not a valid branch name");
        }
        if !matches!(source, SourceSpec::Git { .. }) {
            bail!("--plan-branch needs a git source");
        }
    }
    let ui = ui_config(&args)?;
    let mut cfg = Config::new(source);
    cfg.plan_branch = args.plan_branch.clone();
    cfg.ui = ui;
    cfg.interval = args.interval.0;
    cfg.resync = args.resync.0;
    cfg.debounce = args.debounce.0;
    cfg.drift = match args.drift {
        DriftArg::Heal => DriftMode::Heal,
        DriftArg::Report => DriftMode::Report,
    };
    cfg.listen = args.listen;
    cfg.webhook_token = webhook_token;
    cfg.verify_commits = args.verify_commits;
    cfg.auth = GitAuth {
        credentials_file: args.git_credentials_file,
        ssh_key: args.git_ssh_key,
    };
    cfg.no_prune = args.no_prune;
    cfg.allow_empty = args.allow_empty;
    cfg.allow_rewind = args.allow_rewind;
    cfg.parallelism = args.parallelism.max(1);
    cfg.manual_sync = args.sync == SyncArg::Manual;
    let housekeeping = Arc::new(CliHousekeeping::new(g, global_env)?);
    stead_controller::run(cfg, global_env.clone(), drivers, housekeeping)?;
    Ok(0)
}
