//! `stead-supervise qemu --run-dir DIR --name NAME --config FILE`: the per-VM supervisor of
//! a qemu-engine VM in a binary of its own; `stead-supervise shim …` likewise runs the
//! per-container supervisor (`stead shim`).
//!
//! A supervisor lives as long as its VM, so its memory is paid once per VM. Forked from the
//! whole `stead` binary it carries that binary's relocated data and start-up pages (about
//! 6 MiB resident); this binary links only the supervisor's code. The VirtualMachine driver
//! starts it when it sits next to `stead` (see `stead_drivers::supervise::supervisor_exe`),
//! else `stead qemu`, which runs the same code.

use std::process::ExitCode;

use stead_drivers::supervise::SupervisorArgs;
use stead_drivers::vm::qemu::supervisor;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let code = match args.next().as_deref() {
        Some("qemu") => match SupervisorArgs::parse(args) {
            Ok(a) => supervisor::main(&a),
            Err(e) => {
                eprintln!("stead-supervise qemu: {e}");
                2
            }
        },
        // Started for every container: a start pays this binary's start-up (its dynamic
        // loading and relocation), not the whole CLI's, about a quarter of the CPU time of
        // `stead apply` of one container (docs/performance.md, "Profile").
        Some("shim") => match SupervisorArgs::parse(args) {
            Ok(a) => {
                init_shim_process();
                stead_drivers::container::shim::main(&a)
            }
            Err(e) => {
                eprintln!("stead-supervise shim: {e}");
                2
            }
        },
        other => {
            eprintln!(
                "usage: stead-supervise qemu|shim --run-dir DIR --name NAME --config FILE (got {other:?})"
            );
            2
        }
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// What `stead` does before it runs `stead shim`: the private umask (files the shim makes
/// are root's only) and a log subscriber on stderr (the shim's log once it detached),
/// filtered by `STEAD_LOG` (default `warn`).
fn init_shim_process() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let filter = tracing_subscriber::EnvFilter::try_from_env("STEAD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}
