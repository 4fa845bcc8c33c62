//! `stead backup …` as a standalone binary: compiles the CLI module `src/cmd_backup.rs` of the
//! `stead` crate against this crate, so the backup CLI can be tested and benchmarked without
//! the whole `stead` binary. `cargo run -p stead-drivers --example backup_cli -- list -s POOL`.

#[path = "../../src/cmd_backup.rs"]
mod cmd_backup;

use clap::Parser;

/// stead backup (standalone).
#[derive(Parser, Debug)]
#[command(name = "stead-backup")]
struct Cli {
    /// State directory.
    #[arg(long, default_value = "/var/lib/stead")]
    state_dir: std::path::PathBuf,
    #[command(subcommand)]
    cmd: cmd_backup::BackupCmd,
}

fn main() {
    let cli = Cli::parse();
    let env = stead_reconciler::driver::HostEnv {
        state_dir: cli.state_dir.clone(),
        run_dir: std::path::PathBuf::from("/run/stead"),
        cgroup_parent: "stead".into(),
        netns: None,
        self_exe: std::env::current_exe().unwrap_or_default(),
    };
    match cmd_backup::run_with(cli.cmd, &env, None, None) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
