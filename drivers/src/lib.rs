//! stead's host drivers, one module (room) per domain. Each driver implements
//! [`stead_reconciler::driver::KindDriver`] for its kind (and so `Driver`); [`registry`] builds
//! them all for a host.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod backup;
pub mod container;
pub mod foreign;
pub mod net;
pub mod storage;
pub mod supervise;
pub mod vm;

use stead_reconciler::driver::{Driver, DriverError, HostEnv};
use stead_schema::Kind;

/// Tuning of the drivers for one run.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Seconds a container gets to stop after its stop signal before SIGKILL (default 10;
    /// environment teardown uses 0: nothing of it is kept).
    pub container_stop_timeout_secs: Option<u64>,
}

/// Every driver of this build, pointed at `env`.
pub fn registry(env: &HostEnv) -> Result<Vec<Box<dyn Driver>>, DriverError> {
    registry_with(env, &RegistryOptions::default())
}

/// [`registry`] with options.
pub fn registry_with(
    env: &HostEnv,
    opts: &RegistryOptions,
) -> Result<Vec<Box<dyn Driver>>, DriverError> {
    registry_for(env, opts, Kind::ALL)
}

/// The drivers for `kinds` only: a command that touches networks does not need cgroups,
/// so it works where the cgroup file systems are not visible (e.g. under `ip netns exec`).
pub fn registry_for(
    env: &HostEnv,
    opts: &RegistryOptions,
    kinds: impl IntoIterator<Item = Kind>,
) -> Result<Vec<Box<dyn Driver>>, DriverError> {
    let mut kinds: Vec<Kind> = kinds.into_iter().filter(|k| k.is_host_object()).collect();
    kinds.sort();
    kinds.dedup();
    kinds
        .into_iter()
        .map(|kind| driver_for(env, opts, kind).map_err(|e| explain_hidden_cgroupfs(kind, e)))
        .collect()
}

/// The driver of `kind`.
fn driver_for(
    env: &HostEnv,
    opts: &RegistryOptions,
    kind: Kind,
) -> Result<Box<dyn Driver>, DriverError> {
    Ok(match kind {
        Kind::StoragePool => Box::new(storage::PoolDriver::new(env)),
        Kind::Volume => Box::new(storage::VolumeDriver::new(env)),
        Kind::Network => Box::new(net::NetworkDriver::new(env)?),
        Kind::Bond => Box::new(net::BondDriver::new(env)?),
        Kind::Container => {
            let mut containers = container::ContainerDriver::new(env)?;
            containers.stop_timeout_secs = opts.container_stop_timeout_secs;
            Box::new(containers)
        }
        Kind::VirtualMachine => Box::new(vm::VmDriver::new(env)?),
        Kind::BackupSchedule => Box::new(backup::schedule_driver::ScheduleDriver::new(env)),
        Kind::HaGroup => {
            return Err(DriverError::Unsupported(
                "HaGroup is cluster configuration: no driver".into(),
            ));
        }
    })
}

/// Adds the likely cause to a driver's set-up error when `/sys/fs/cgroup` is empty:
/// `ip netns exec` remounts `/sys`, which hides the cgroup file systems.
fn explain_hidden_cgroupfs(kind: Kind, e: DriverError) -> DriverError {
    explain_hidden_cgroupfs_at(&stead_host::SysFs::host().cgroup_root(), kind, e)
}

/// [`explain_hidden_cgroupfs`] with the cgroup root at `root`.
fn explain_hidden_cgroupfs_at(root: &std::path::Path, kind: Kind, e: DriverError) -> DriverError {
    if !dir_is_empty(root) {
        return e;
    }
    DriverError::Unsupported(format!(
        "{kind}: {e}. {} is empty here: the cgroup file systems are hidden \
         (`ip netns exec` remounts /sys). Run `stead --netns NAME ...` instead of \
         `ip netns exec NAME stead ...`",
        root.display()
    ))
}

/// True if `dir` is missing or has no entries.
fn dir_is_empty(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |mut rd| rd.next().is_none())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu_missing() -> DriverError {
        DriverError::Unsupported("cgroup v1 controller cpu is not mounted".into())
    }

    #[test]
    fn an_empty_cgroup_root_is_explained() {
        let root = tempfile::tempdir().unwrap();
        let msg =
            explain_hidden_cgroupfs_at(root.path(), Kind::Container, cpu_missing()).to_string();
        assert!(
            msg.contains("Container")
                && msg.contains("cpu is not mounted")
                && msg.contains("ip netns exec")
                && msg.contains("--netns"),
            "{msg}"
        );
        let gone = root.path().join("missing");
        let msg = explain_hidden_cgroupfs_at(&gone, Kind::VirtualMachine, cpu_missing());
        assert!(msg.to_string().contains("--netns"), "{msg}");
    }

    /// `spec.placement` is cluster configuration: adding or changing it is no change on a
    /// host (no restart of a running workload).
    #[test]
    fn placement_is_not_host_state() {
        use serde_json::json;
        let p = json!({"nodeSelector": {"zone": "a"}, "haGroup": "prod", "antiAffinity": ["Container/b"]});
        let with = |mut v: serde_json::Value| {
            let bare = v.clone();
            v["placement"] = p.clone();
            (bare, v)
        };
        let (a, b) = with(json!({"rootfs": {"path": "/r"}}));
        let (a, b): (stead_schema::ContainerSpec, stead_schema::ContainerSpec) = (
            serde_json::from_value(a).unwrap(),
            serde_json::from_value(b).unwrap(),
        );
        assert_eq!(
            container::ContainerDriver::project("c", &a),
            container::ContainerDriver::project("c", &b)
        );
        let (a, b) = with(json!({"boot": {"kernel": "/k"}, "disks": [{"volume": "d"}]}));
        let (a, b): (
            stead_schema::VirtualMachineSpec,
            stead_schema::VirtualMachineSpec,
        ) = (
            serde_json::from_value(a).unwrap(),
            serde_json::from_value(b).unwrap(),
        );
        assert_eq!(
            vm::VmDriver::project("v", &a),
            vm::VmDriver::project("v", &b)
        );
    }

    #[test]
    fn a_populated_cgroup_root_keeps_the_error() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("cpu")).unwrap();
        let msg = explain_hidden_cgroupfs_at(root.path(), Kind::Container, cpu_missing());
        assert_eq!(msg.to_string(), cpu_missing().to_string());
    }
}
