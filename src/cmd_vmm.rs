//! `stead vmm` (hidden): the per-VM supervisor started by the VirtualMachine driver as
//! `stead vmm --run-dir DIR --name NAME --config FILE` (`--run-dir` is the global option),
//! and `stead vmm --write-demo-guest PATH` (writes the embedded tiny demo guest kernel).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use stead_drivers::vm;

/// Arguments of `stead vmm`.
#[derive(clap::Args, Debug)]
pub struct VmmArgs {
    /// VM name.
    #[arg(long, required_unless_present = "write_demo_guest")]
    name: Option<String>,
    /// The VM's run configuration (JSON, written by the driver).
    #[arg(long, required_unless_present = "write_demo_guest")]
    config: Option<PathBuf>,
    /// Write the built-in tiny demo guest kernel to PATH and exit (boot it with
    /// `cmdline: mode=idle`).
    #[arg(long, value_name = "PATH")]
    write_demo_guest: Option<PathBuf>,
}

/// Runs `stead vmm` with the global `--run-dir`. Must run before any thread exists (the
/// supervisor forks).
pub fn run(args: VmmArgs, run_dir: &Path) -> Result<u8> {
    if let Some(p) = args.write_demo_guest {
        vm::write_demo_guest(&p)?;
        println!(
            "wrote {} ({} bytes); boot it with cmdline {:?}",
            p.display(),
            vm::demo_guest_len(),
            vm::DEMO_GUEST_CMDLINE
        );
        return Ok(0);
    }
    let (Some(name), Some(config)) = (args.name, args.config) else {
        bail!("--name and --config are required");
    };
    let code = vm::supervisor::main(&vm::VmmArgs {
        run_dir: run_dir.to_path_buf(),
        name,
        config,
    });
    Ok(u8::try_from(code).unwrap_or(1))
}
