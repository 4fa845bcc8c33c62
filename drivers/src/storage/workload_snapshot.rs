//! `stead snapshot … Kind/name SNAP` for whole workloads: a Volume, or a Container or
//! VirtualMachine as the set of its parts (each disk or mounted volume, and a container's
//! own rootfs directory), taken consistently and rolled back together.
//!
//! - **create**: running workloads that use the parts are quiesced (cgroup freeze or VM
//!   pause) while every part is snapshotted, then resumed: milliseconds where snapshots
//!   are cheap (btrfs, reflinks). If a part fails, the parts already taken are deleted.
//! - **rollback**: every part must have the snapshot. Running workloads are stopped, and
//!   held against other applies. Every part is rolled back, then the workloads are started
//!   again from their manifests. The caller confirms the restart first (its impact is
//!   `restart`).
//! - **list**: snapshot names across the parts. A snapshot is `complete` when every part
//!   has it.
//! - **delete**: from every part (absent is fine).
//!
//! A container rootfs given as `path` belongs to the operator and is never snapshotted:
//! create says so.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use stead_reconciler::driver::{DriverError, HostEnv, Lookup};
use stead_schema::{Resource, ResourceId, Spec};
use tracing::info_span;

use crate::backup::consistency::WorkloadHooks;
use crate::storage;
use crate::storage::rootfs_snapshot as tree;

/// One part of a workload snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// A volume (its pool's snapshot mechanism).
    Volume(String),
    /// A container's own rootfs directory.
    Rootfs {
        /// The data directory (`…/root` or `…/upper`).
        data: PathBuf,
        /// Where its snapshots live.
        snaps: PathBuf,
    },
}

impl Part {
    /// `Volume/x` or `rootfs`.
    pub fn label(&self) -> String {
        match self {
            Part::Volume(v) => format!("Volume/{v}"),
            Part::Rootfs { .. } => "rootfs".into(),
        }
    }
}

/// A snapshot name across the parts of a workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSnapshot {
    /// Snapshot name.
    pub name: String,
    /// Earliest creation time among the parts, RFC 3339, if known.
    pub created: Option<String>,
    /// Parts that have it.
    pub parts: Vec<String>,
    /// Every part has it (a rollback is possible).
    pub complete: bool,
}

/// What [`create`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    /// `(part label, method)` per part.
    pub parts: Vec<(String, String)>,
    /// How consistency was obtained, e.g. `frozen Container/web 3 ms`.
    pub consistency: String,
    /// Notes for the operator (parts that were skipped).
    pub notes: Vec<String>,
}

fn hooks(
    env: &HostEnv,
    world: &BTreeMap<ResourceId, Resource>,
) -> Result<WorkloadHooks, DriverError> {
    WorkloadHooks::new(env, Arc::new(world.clone())).map_err(|e| DriverError::Other(e.to_string()))
}

fn berr(e: crate::backup::BackupError) -> DriverError {
    DriverError::Other(e.to_string())
}

/// The parts of `id`, and notes about what is left out.
pub fn parts_of(
    env: &HostEnv,
    world: &dyn Lookup,
    id: &ResourceId,
) -> Result<(Vec<Part>, Vec<String>), DriverError> {
    let r = world.resource(id).ok_or_else(|| {
        DriverError::NotReady(format!(
            "{id} is not known (not in the manifests or the state DB)"
        ))
    })?;
    let mut parts = Vec::new();
    let mut notes = Vec::new();
    match &r.spec {
        Spec::Volume(_) => parts.push(Part::Volume(id.name.clone())),
        Spec::VirtualMachine(vm) => {
            for d in &vm.disks {
                parts.push(Part::Volume(d.volume.as_str().to_string()));
            }
        }
        Spec::Container(c) => {
            if let Some(v) = &c.rootfs.volume {
                parts.push(Part::Volume(v.as_str().to_string()));
            } else if let Some(p) = &c.rootfs.path {
                notes.push(format!(
                    "rootfs {} is the operator's directory (rootfs.path): not snapshotted",
                    p.display()
                ));
            } else {
                let base = match &c.rootfs.pool {
                    Some(p) => storage::pool_path(world, p.as_str())?,
                    None => env.state_dir.clone(),
                };
                match tree::own_data(&id.name, &base) {
                    Some((_, data)) => parts.push(Part::Rootfs {
                        data,
                        snaps: tree::snapshots_dir(&id.name, &base),
                    }),
                    None => notes.push("rootfs not unpacked yet (apply first)".into()),
                }
            }
            for m in &c.mounts {
                let p = Part::Volume(m.volume.as_str().to_string());
                if !parts.contains(&p) {
                    parts.push(p);
                }
            }
        }
        _ => {
            return Err(DriverError::Refused(format!(
                "{id}: only Volumes, Containers and VirtualMachines have snapshots"
            )));
        }
    }
    if parts.is_empty() {
        return Err(DriverError::Refused(format!(
            "{id} has nothing to snapshot{}",
            if notes.is_empty() {
                String::new()
            } else {
                format!(": {}", notes.join("; "))
            }
        )));
    }
    Ok((parts, notes))
}

/// Takes snapshot `snap` of every part of `id`, with the workloads quiesced.
pub fn create(
    env: &HostEnv,
    world: &BTreeMap<ResourceId, Resource>,
    id: &ResourceId,
    snap: &str,
) -> Result<Created, DriverError> {
    let _span = info_span!("workload_snapshot_create", resource = %id, snap).entered();
    storage::check_snapshot_name(snap)?;
    let (parts, notes) = parts_of(env, world, id)?;
    // Refuse a taken name before pausing anything.
    for s in snapshots_of(env, world, &parts)? {
        if s.name == snap {
            return Err(DriverError::Conflict(format!(
                "snapshot {snap:?} of {id} already exists (on {})",
                s.parts.join(", ")
            )));
        }
    }
    let h = hooks(env, world)?;
    let t = Instant::now();
    let hold = h
        .quiesce_running(&h.workloads_of(&id.to_string()))
        .map_err(berr)?;
    let mut done: Vec<(String, String)> = Vec::new();
    let mut taken: Vec<&Part> = Vec::new();
    for p in &parts {
        let r = match p {
            Part::Volume(v) => storage::snapshot_create(env, world, v, snap).map(|i| i.method),
            Part::Rootfs { data, snaps } => {
                tree::create(data, snaps, snap).map(|_| "cp --reflink=auto".to_string())
            }
        };
        match r {
            Ok(m) => {
                done.push((p.label(), m));
                taken.push(p);
            }
            Err(e) => {
                for q in taken {
                    let _ = delete_part(env, world, q, snap);
                }
                drop(hold);
                return Err(DriverError::Other(format!("snapshot {}: {e}", p.label())));
            }
        }
    }
    let labels = hold.labels();
    let verb = hold.verb();
    hold.release().map_err(berr)?;
    let consistency = if labels.is_empty() {
        "not running".to_string()
    } else {
        format!(
            "{verb} {} {} ms",
            labels.join(", "),
            t.elapsed().as_millis()
        )
    };
    Ok(Created {
        parts: done,
        consistency,
        notes,
    })
}

fn delete_part(env: &HostEnv, world: &dyn Lookup, p: &Part, snap: &str) -> Result<(), DriverError> {
    match p {
        Part::Volume(v) => storage::snapshot_delete(env, world, v, snap),
        Part::Rootfs { snaps, .. } => tree::delete(snaps, snap),
    }
}

/// Snapshot names across the parts of `id`, sorted by name.
pub fn list(
    env: &HostEnv,
    world: &dyn Lookup,
    id: &ResourceId,
) -> Result<Vec<WorkloadSnapshot>, DriverError> {
    let (parts, _) = parts_of(env, world, id)?;
    snapshots_of(env, world, &parts)
}

/// Snapshot names across `parts`, sorted by name.
fn snapshots_of(
    env: &HostEnv,
    world: &dyn Lookup,
    parts: &[Part],
) -> Result<Vec<WorkloadSnapshot>, DriverError> {
    let mut by_name: BTreeMap<String, (Option<String>, BTreeSet<String>)> = BTreeMap::new();
    for p in parts {
        let snaps: Vec<(String, Option<String>)> = match p {
            Part::Volume(v) => storage::snapshot_list(env, world, v)?
                .into_iter()
                .map(|s| (s.name, s.created))
                .collect(),
            Part::Rootfs { snaps, .. } => tree::list(snaps)?,
        };
        for (name, created) in snaps {
            let e = by_name.entry(name).or_default();
            e.0 = match (e.0.take(), created) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            e.1.insert(p.label());
        }
    }
    let labels: Vec<String> = parts.iter().map(Part::label).collect();
    Ok(by_name
        .into_iter()
        .map(|(name, (created, have))| WorkloadSnapshot {
            complete: labels.iter().all(|l| have.contains(l)),
            name,
            created,
            parts: labels
                .iter()
                .filter(|l| have.contains(*l))
                .cloned()
                .collect(),
        })
        .collect())
}

/// A checked rollback: every part has the snapshot; `running` are the workloads it
/// stops and starts again (its `restart` impact, to show before [`rollback`]).
pub struct RollbackPlan {
    /// The resource rolled back.
    pub id: ResourceId,
    /// The snapshot.
    pub snap: String,
    parts: Vec<Part>,
    /// Running workloads that use the parts.
    pub running: Vec<ResourceId>,
    hooks: WorkloadHooks,
}

impl RollbackPlan {
    /// `Volume/x` or `rootfs` for each part replaced.
    pub fn parts(&self) -> Vec<String> {
        self.parts.iter().map(Part::label).collect()
    }
}

/// Checks that a rollback of `id` to `snap` can be done and says what it will do. Fails
/// when a part lacks the snapshot.
pub fn rollback_plan(
    env: &HostEnv,
    world: &BTreeMap<ResourceId, Resource>,
    id: &ResourceId,
    snap: &str,
) -> Result<RollbackPlan, DriverError> {
    storage::check_snapshot_name(snap)?;
    let (parts, _) = parts_of(env, world, id)?;
    let s = snapshots_of(env, world, &parts)?
        .into_iter()
        .find(|s| s.name == snap);
    match s {
        None => {
            return Err(DriverError::Refused(format!(
                "{id} has no snapshot {snap:?}"
            )));
        }
        Some(s) if !s.complete => {
            let missing: Vec<String> = parts
                .iter()
                .map(Part::label)
                .filter(|l| !s.parts.contains(l))
                .collect();
            return Err(DriverError::Refused(format!(
                "snapshot {snap:?} of {id} is incomplete: {} lack it",
                missing.join(", ")
            )));
        }
        Some(_) => {}
    }
    let hooks = hooks(env, world)?;
    let running = hooks
        .workloads_of(&id.to_string())
        .into_iter()
        .filter(|w| hooks.running(w))
        .collect();
    Ok(RollbackPlan {
        id: id.clone(),
        snap: snap.to_string(),
        parts,
        running,
        hooks,
    })
}

/// Carries out `plan`: running workloads are stopped first and started again afterwards
/// (also when a part fails). Returns the parts rolled back and how.
pub fn rollback(
    env: &HostEnv,
    world: &BTreeMap<ResourceId, Resource>,
    plan: &RollbackPlan,
) -> Result<Vec<(String, String)>, DriverError> {
    let (id, snap, h) = (&plan.id, plan.snap.as_str(), &plan.hooks);
    let _span = info_span!("workload_snapshot_rollback", resource = %id, snap).entered();
    let hold = h
        .stop_running(&h.workloads_of(&id.to_string()))
        .map_err(berr)?;
    let mut done = Vec::new();
    let mut failed = None;
    for p in &plan.parts {
        let r = match p {
            Part::Volume(v) => storage::snapshot_rollback(env, world, v, snap).map(|m| match m {
                storage::CopyMethodOrNative::Copy(c) => c.as_str().to_string(),
                storage::CopyMethodOrNative::Native(n) => n.to_string(),
            }),
            Part::Rootfs { data, snaps } => {
                tree::rollback(data, snaps, snap).map(|_| "cp --reflink=auto".to_string())
            }
        };
        match r {
            Ok(m) => done.push((p.label(), m)),
            Err(e) => {
                failed = Some(DriverError::Other(format!(
                    "roll back {}: {e} (rolled back before the failure: {})",
                    p.label(),
                    if done.is_empty() {
                        "none".to_string()
                    } else {
                        done.iter()
                            .map(|(l, _)| l.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                )));
                break;
            }
        }
    }
    let started = hold.release().map_err(berr);
    if let Some(e) = failed {
        return Err(e);
    }
    started?;
    Ok(done)
}

/// Deletes `snap` from every part of `id` (absent is fine).
pub fn delete(
    env: &HostEnv,
    world: &dyn Lookup,
    id: &ResourceId,
    snap: &str,
) -> Result<Vec<String>, DriverError> {
    storage::check_snapshot_name(snap)?;
    let (parts, _) = parts_of(env, world, id)?;
    for p in &parts {
        delete_part(env, world, p, snap)?;
    }
    Ok(parts.iter().map(Part::label).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use stead_schema::{Kind, Metadata, Origin};

    fn res(kind: Kind, name: &str, spec: serde_json::Value) -> Resource {
        Resource {
            id: ResourceId::new(kind, name),
            metadata: Metadata {
                name: name.parse().expect("name"),
                ..Default::default()
            },
            spec: Spec::from_value(kind, spec).expect("spec"),
            origin: Origin::default(),
        }
    }

    #[test]
    fn parts_of_workloads() {
        let t = tempfile::tempdir().expect("tmp");
        let env = HostEnv {
            state_dir: t.path().join("state"),
            run_dir: t.path().join("run"),
            cgroup_parent: "stead-test".into(),
            netns: None,
            self_exe: PathBuf::from("/bin/true"),
            fence_file: None,
        };
        std::fs::create_dir_all(env.state_dir.join("rootfs/web/upper")).expect("mkdir");
        let mut w: BTreeMap<ResourceId, Resource> = BTreeMap::new();
        for r in [
            res(
                Kind::Container,
                "web",
                serde_json::json!({"rootfs": {"template": "/t.tar"}, "mounts": [{"volume": "data", "path": "/data"}]}),
            ),
            res(
                Kind::Container,
                "own",
                serde_json::json!({"rootfs": {"path": "/srv/own"}}),
            ),
            res(
                Kind::VirtualMachine,
                "vm1",
                serde_json::json!({"cpus": 1, "memory": "32Mi", "boot": {"kernel": "/k"}, "disks": [{"volume": "a"}, {"volume": "b"}]}),
            ),
        ] {
            w.insert(r.id.clone(), r);
        }
        let (p, notes) = parts_of(&env, &w, &ResourceId::new(Kind::Container, "web")).expect("web");
        assert_eq!(
            p.iter().map(Part::label).collect::<Vec<_>>(),
            ["rootfs", "Volume/data"]
        );
        assert!(notes.is_empty());
        assert!(matches!(&p[0], Part::Rootfs { data, .. } if data.ends_with("rootfs/web/upper")));
        let (p, _) = parts_of(&env, &w, &ResourceId::new(Kind::VirtualMachine, "vm1")).expect("vm");
        assert_eq!(
            p.iter().map(Part::label).collect::<Vec<_>>(),
            ["Volume/a", "Volume/b"]
        );
        let e = parts_of(&env, &w, &ResourceId::new(Kind::Container, "own")).expect_err("own");
        assert!(e.to_string().contains("operator's directory"), "{e}");
        assert!(parts_of(&env, &w, &ResourceId::new(Kind::Container, "nope")).is_err());
    }
}
