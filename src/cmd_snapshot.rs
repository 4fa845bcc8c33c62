//! `stead snapshot create|list|rollback|delete Kind/name [SNAP]`: snapshots of a Volume,
//! or of a Container or VirtualMachine as a whole (every volume it uses and a container's
//! own rootfs), taken with the workload quiesced and rolled back with it stopped. See
//! `stead_drivers::storage::workload_snapshot`.

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};

use anyhow::{Context, Result};
use clap::{Subcommand, ValueEnum};
use stead_drivers::storage::workload_snapshot as ws;
use stead_reconciler::driver::HostEnv;
use stead_schema::{Resource, ResourceId};

/// Output format of `stead snapshot list`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListFormat {
    /// A table.
    Text,
    /// A JSON array.
    Json,
}

/// `stead snapshot` subcommands.
#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Take a snapshot (btrfs: read-only subvolume snapshot; dir: reflink copy where the
    /// file system supports it, else a full sparse copy). A running container or VM is
    /// frozen or paused while its parts are taken.
    Create {
        /// What to snapshot: Volume/NAME, Container/NAME or VirtualMachine/NAME.
        target: String,
        /// Snapshot name: letters, digits, '.', '_', '-'.
        snap: String,
    },
    /// List the snapshots of a volume or workload.
    List {
        /// Volume/NAME, Container/NAME or VirtualMachine/NAME.
        target: String,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = ListFormat::Text)]
        output: ListFormat,
    },
    /// Replace the content with a snapshot. Changes made since the snapshot are lost.
    /// Running containers and VMs that use it are stopped first and started again
    /// afterwards (impact: restart), which needs --yes or a confirmation on a terminal.
    Rollback {
        /// Volume/NAME, Container/NAME or VirtualMachine/NAME.
        target: String,
        /// Snapshot name.
        snap: String,
        /// Do not ask before restarting running workloads.
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Delete a snapshot from every part (absent is success).
    Delete {
        /// Volume/NAME, Container/NAME or VirtualMachine/NAME.
        target: String,
        /// Snapshot name.
        snap: String,
    },
}

/// Asks on the terminal; `false` without one.
fn confirm(question: &str) -> bool {
    if !std::io::stdin().is_terminal() {
        return false;
    }
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).is_ok() && matches!(line.trim(), "y" | "Y" | "yes")
}

/// Runs a `stead snapshot` subcommand. `world` resolves the targets, their volumes and
/// pools (the state DB's inventory). Returns the exit code.
pub fn run(cmd: SnapshotCmd, env: &HostEnv, world: &BTreeMap<ResourceId, Resource>) -> Result<i32> {
    match cmd {
        SnapshotCmd::Create { target, snap } => {
            let id = ResourceId::parse_loose(&target)?;
            let c = ws::create(env, world, &id, &snap)
                .with_context(|| format!("snapshot {id}@{snap}"))?;
            for n in &c.notes {
                eprintln!("note: {n}");
            }
            let parts: Vec<String> = c.parts.iter().map(|(l, m)| format!("{l} ({m})")).collect();
            println!(
                "created snapshot {snap} of {id}: {}; consistency: {}",
                parts.join(", "),
                c.consistency
            );
            Ok(0)
        }
        SnapshotCmd::List { target, output } => {
            let id = ResourceId::parse_loose(&target)?;
            let list =
                ws::list(env, world, &id).with_context(|| format!("list snapshots of {id}"))?;
            match output {
                ListFormat::Json => println!("{}", serde_json::to_string_pretty(&list)?),
                ListFormat::Text => {
                    println!("{:<28} {:<22} {:<9} PARTS", "NAME", "CREATED", "COMPLETE");
                    for s in &list {
                        println!(
                            "{:<28} {:<22} {:<9} {}",
                            s.name,
                            s.created.as_deref().unwrap_or("-"),
                            if s.complete { "yes" } else { "no" },
                            s.parts.join(",")
                        );
                    }
                }
            }
            Ok(0)
        }
        SnapshotCmd::Rollback { target, snap, yes } => {
            let id = ResourceId::parse_loose(&target)?;
            let plan = ws::rollback_plan(env, world, &id, &snap)
                .with_context(|| format!("roll back {id} to {snap}"))?;
            let running = &plan.running;
            println!("Rollback of {id} to snapshot {snap}:");
            for w in running {
                println!("  ~ {w}  impact: restart (running: stopped first, started again after)");
            }
            for p in plan.parts() {
                println!("  ! {p}  replaced by snapshot {snap}: changes since are lost");
            }
            if !running.is_empty()
                && !yes
                && !confirm(&format!("Restart {} for the rollback?", running.len()))
            {
                eprintln!("error: the rollback restarts running workloads; pass --yes to confirm");
                return Ok(1);
            }
            let done = ws::rollback(env, world, &plan)
                .with_context(|| format!("roll back {id} to {snap}"))?;
            let parts: Vec<String> = done.iter().map(|(l, m)| format!("{l} ({m})")).collect();
            println!("rolled back {id} to snapshot {snap}: {}", parts.join(", "));
            if !running.is_empty() {
                let names: Vec<String> = running.iter().map(|r| r.to_string()).collect();
                println!("started again: {}", names.join(", "));
            }
            Ok(0)
        }
        SnapshotCmd::Delete { target, snap } => {
            let id = ResourceId::parse_loose(&target)?;
            let parts = ws::delete(env, world, &id, &snap)
                .with_context(|| format!("delete snapshot {id}@{snap}"))?;
            println!("deleted snapshot {snap} of {id} ({})", parts.join(", "));
            Ok(0)
        }
    }
}
