//! `stead qemu` (hidden): the per-VM supervisor of a qemu-engine VM, started by the
//! VirtualMachine driver as `stead qemu --run-dir DIR --name NAME --config FILE`
//! (`--run-dir` is the global option).

use std::path::{Path, PathBuf};

use anyhow::Result;
use stead_drivers::vm::qemu::supervisor;

/// Arguments of `stead qemu`.
#[derive(clap::Args, Debug)]
pub struct QemuArgs {
    /// VM name.
    #[arg(long)]
    name: String,
    /// The VM's QEMU configuration (JSON, written by the driver).
    #[arg(long)]
    config: PathBuf,
}

/// Runs `stead qemu` with the global `--run-dir`. Must run before any thread exists (the
/// supervisor forks).
pub fn run(args: QemuArgs, run_dir: &Path) -> Result<u8> {
    let code = supervisor::main(&supervisor::QemuArgs {
        run_dir: run_dir.to_path_buf(),
        name: args.name,
        config: args.config,
    });
    Ok(u8::try_from(code).unwrap_or(1))
}
