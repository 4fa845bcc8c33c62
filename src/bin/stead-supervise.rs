//! `stead-supervise qemu --run-dir DIR --name NAME --config FILE`: the per-VM supervisor of
//! a qemu-engine VM in a binary of its own.
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
        other => {
            eprintln!(
                "usage: stead-supervise qemu --run-dir DIR --name NAME --config FILE (got {other:?})"
            );
            2
        }
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
