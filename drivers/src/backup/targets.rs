//! Resolving what to back up: `Kind/name` → files and directories, and a BackupSchedule's
//! `targets` (names and label selector) → resources.
//!
//! - `Volume/x` → its disk image (`storage::volume_path`), input name `x`.
//! - `VirtualMachine/x` → each disk's volume image, input names = volume names.
//! - `Container/x` → the rootfs directory (`rootfs.path`, or the unpacked template copy
//!   `<base>/rootfs/x/root`; a privileged overlay rootfs backs up its `upper` layer, the
//!   template is in the spec) as input `rootfs`, plus every mounted volume by name.

use std::path::PathBuf;

use stead_reconciler::driver::{HostEnv, Lookup};
use stead_schema::kinds::BackupTargets;
use stead_schema::{Kind, Resource, ResourceId, Spec};

use super::BackupError;
use super::hooks::Target;
use crate::storage;

fn not_ready(e: stead_reconciler::driver::DriverError) -> BackupError {
    BackupError::Invalid(e.to_string())
}

/// The files and directories to back up for resource `id`.
pub fn resolve(env: &HostEnv, world: &dyn Lookup, id: &ResourceId) -> Result<Target, BackupError> {
    let r = world.resource(id).ok_or_else(|| {
        BackupError::Invalid(format!(
            "{id} is not known (not in the manifests or the state DB)"
        ))
    })?;
    let spec = serde_json::to_value(&r.spec)
        .map_err(|e| BackupError::Invalid(format!("{id}: spec: {e}")))?;
    let mut inputs: Vec<(String, PathBuf)> = Vec::new();
    match &r.spec {
        Spec::Volume(_) => {
            inputs.push((
                id.name.clone(),
                storage::volume_path(world, &id.name).map_err(not_ready)?,
            ));
        }
        Spec::VirtualMachine(vm) => {
            for d in &vm.disks {
                let v = d.volume.as_str();
                inputs.push((
                    v.to_string(),
                    storage::volume_path(world, v).map_err(not_ready)?,
                ));
            }
        }
        Spec::Container(c) => {
            if let Some(p) = &c.rootfs.path {
                inputs.push(("rootfs".into(), p.clone()));
            } else if let Some(v) = &c.rootfs.volume {
                inputs.push((
                    v.as_str().to_string(),
                    storage::volume_path(world, v.as_str()).map_err(not_ready)?,
                ));
            } else {
                let base = match &c.rootfs.pool {
                    Some(p) => storage::pool_path(world, p.as_str()).map_err(not_ready)?,
                    None => env.state_dir.clone(),
                };
                match crate::storage::rootfs_snapshot::own_data(&id.name, &base) {
                    Some((input, dir)) => inputs.push((input.into(), dir)),
                    None => {
                        return Err(BackupError::Invalid(format!(
                            "{id}: its root file system is not unpacked yet ({} missing); apply first",
                            base.join("rootfs").join(&id.name).display()
                        )));
                    }
                }
            }
            for m in &c.mounts {
                let v = m.volume.as_str();
                if inputs.iter().all(|(n, _)| n != v) {
                    inputs.push((
                        v.to_string(),
                        storage::volume_path(world, v).map_err(not_ready)?,
                    ));
                }
            }
        }
        _ => {
            return Err(BackupError::Invalid(format!(
                "{id}: only Volumes, Containers and VirtualMachines can be backed up"
            )));
        }
    }
    Ok(Target {
        resource: format!("{}/{}", id.kind, id.name),
        spec,
        inputs,
    })
}

/// The resources a schedule's `targets` select among `all`: every named one, plus every
/// Container and VirtualMachine whose labels match the selector. Sorted, without duplicates.
pub fn select<'a>(
    targets: &BackupTargets,
    all: impl IntoIterator<Item = &'a Resource>,
) -> Vec<ResourceId> {
    let mut out: Vec<ResourceId> = targets
        .names
        .iter()
        .cloned()
        .map(ResourceId::from)
        .collect();
    if let Some(sel) = &targets.selector {
        for r in all {
            let workload = matches!(
                r.id.kind,
                Kind::Container | Kind::VirtualMachine | Kind::Volume
            );
            let matches = sel
                .match_labels
                .iter()
                .all(|(k, v)| r.metadata.labels.get(k) == Some(v));
            if workload && matches {
                out.push(r.id.clone());
            }
        }
    }
    out.sort();
    out.dedup();
    out
}
