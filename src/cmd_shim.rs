//! `stead shim`: the per-container supervisor (internal; started by the Container driver).
//!
//! Dispatch this subcommand before creating any thread or async runtime: the shim forks
//! and clones, which is only sound in a single-threaded process.

use std::path::PathBuf;

use stead_drivers::container::shim::{self, ShimArgs};

/// Arguments of `stead shim`.
#[derive(Debug, Clone, clap::Args)]
pub struct ShimCmd {
    /// Run dir holding `containers/<name>/` (sockets, state, console log).
    #[arg(long = "run-dir")]
    pub run_dir: PathBuf,
    /// Container name.
    #[arg(long)]
    pub name: String,
    /// Resolved container config (JSON written by the driver).
    #[arg(long)]
    pub config: PathBuf,
}

/// Runs the supervisor. Returns the exit code of the launching process: 0 once the
/// container's init runs (the supervisor continues detached), 1 with the error on stderr.
pub fn run(args: &ShimCmd, _env: &stead_schema::HostEnv) -> anyhow::Result<i32> {
    Ok(shim::main(&ShimArgs {
        run_dir: args.run_dir.clone(),
        name: args.name.clone(),
        config: args.config.clone(),
    }))
}
