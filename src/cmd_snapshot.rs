//! `stead snapshot create|list|rollback|delete Kind/name [SNAP]`: volume snapshots.
//!
//! Works on Volumes. Containers and VirtualMachines are snapshotted through their
//! volumes; until that is wired (it needs the workload paused for consistency), they
//! get a clear error naming the volumes to snapshot instead.

use anyhow::{Context, Result, bail};
use clap::{Subcommand, ValueEnum};
use stead_drivers::storage::{self, CopyMethodOrNative};
use stead_schema::{HostEnv, Kind, Lookup, ResourceId, Spec};

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
    /// file system supports it, else a full sparse copy).
    Create {
        /// What to snapshot: Volume/NAME.
        target: String,
        /// Snapshot name: letters, digits, '.', '_', '-'.
        snap: String,
    },
    /// List the snapshots of a volume.
    List {
        /// Volume/NAME.
        target: String,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = ListFormat::Text)]
        output: ListFormat,
    },
    /// Replace the volume's content with a snapshot, atomically. Changes made since
    /// the snapshot are lost. Stop the container or VM using the volume first.
    Rollback {
        /// Volume/NAME.
        target: String,
        /// Snapshot name.
        snap: String,
    },
    /// Delete a snapshot (absent is success).
    Delete {
        /// Volume/NAME.
        target: String,
        /// Snapshot name.
        snap: String,
    },
}

/// Resolves `Kind/name` to the volume to act on, or explains why not.
fn volume_of(target: &str, world: &dyn Lookup) -> Result<String> {
    let (kind, name) = target
        .split_once('/')
        .with_context(|| format!("expected Kind/name, got {target:?}"))?;
    let kind = Kind::parse_loose(kind).with_context(|| format!("unknown kind {kind:?}"))?;
    let id = ResourceId::new(kind, name);
    let r = world
        .resource(&id)
        .with_context(|| format!("{id} is not known (not in the manifests or the state DB)"))?;
    let volumes: Vec<String> = match &r.spec {
        Spec::Volume(_) => return Ok(name.to_string()),
        Spec::Container(c) => c
            .rootfs
            .volume
            .iter()
            .chain(c.mounts.iter().map(|m| &m.volume))
            .map(|v| format!("Volume/{}", v.as_str()))
            .collect(),
        Spec::VirtualMachine(vm) => vm
            .disks
            .iter()
            .map(|d| format!("Volume/{}", d.volume.as_str()))
            .collect(),
        _ => bail!("{id}: only Volumes, Containers and VirtualMachines have snapshots"),
    };
    if volumes.is_empty() {
        bail!("{id} has no volumes to snapshot");
    }
    bail!(
        "snapshots of {id} as a whole are not supported yet; snapshot its volumes instead: {}",
        volumes.join(", ")
    )
}

/// Runs a `stead snapshot` subcommand. `world` resolves Volumes and their pools (built
/// from the manifests or the state DB). Returns the exit code.
pub fn run(cmd: SnapshotCmd, env: &HostEnv, world: &dyn Lookup) -> Result<i32> {
    match cmd {
        SnapshotCmd::Create { target, snap } => {
            let vol = volume_of(&target, world)?;
            let info = storage::snapshot_create(env, world, &vol, &snap)
                .with_context(|| format!("snapshot Volume/{vol}@{snap}"))?;
            println!(
                "created snapshot {snap} of Volume/{vol} ({}) at {}",
                info.method, info.location
            );
            Ok(0)
        }
        SnapshotCmd::List { target, output } => {
            let vol = volume_of(&target, world)?;
            let list = storage::snapshot_list(env, world, &vol)
                .with_context(|| format!("list snapshots of Volume/{vol}"))?;
            match output {
                ListFormat::Json => println!("{}", serde_json::to_string_pretty(&list)?),
                ListFormat::Text => {
                    println!(
                        "{:<24} {:<22} {:>10}  {:<8} LOCATION",
                        "NAME", "CREATED", "SIZE", "KIND"
                    );
                    for s in &list {
                        println!(
                            "{:<24} {:<22} {:>10}  {:<8} {}",
                            s.name,
                            s.created.as_deref().unwrap_or("-"),
                            s.size
                                .map(|b| stead_schema::ByteSize(b).to_string())
                                .unwrap_or_else(|| "-".into()),
                            s.method,
                            s.location
                        );
                    }
                }
            }
            Ok(0)
        }
        SnapshotCmd::Rollback { target, snap } => {
            let vol = volume_of(&target, world)?;
            let how = storage::snapshot_rollback(env, world, &vol, &snap)
                .with_context(|| format!("roll back Volume/{vol} to {snap}"))?;
            let how = match how {
                CopyMethodOrNative::Copy(m) => m.as_str(),
                CopyMethodOrNative::Native(n) => n,
            };
            println!("rolled back Volume/{vol} to snapshot {snap} ({how})");
            Ok(0)
        }
        SnapshotCmd::Delete { target, snap } => {
            let vol = volume_of(&target, world)?;
            storage::snapshot_delete(env, world, &vol, &snap)
                .with_context(|| format!("delete snapshot Volume/{vol}@{snap}"))?;
            println!("deleted snapshot {snap} of Volume/{vol}");
            Ok(0)
        }
    }
}
