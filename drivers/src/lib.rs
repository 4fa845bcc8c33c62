//! stead's host drivers, one module per domain. Each implements
//! [`stead_schema::Driver`] for its kinds; [`registry`] builds them all for a host.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod backup;
pub mod container;
pub mod net;
pub mod netns;
pub mod schedules;
pub mod storage;
pub mod supervise;
pub mod vm;
pub mod workload_snapshots;

use stead_schema::{Driver, DriverError, HostEnv};

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
    let mut containers = container::ContainerDriver::new(env)?;
    if let Some(secs) = opts.container_stop_timeout_secs {
        containers.stop_timeout_secs = secs;
    }
    let drivers: Vec<Box<dyn Driver>> = vec![
        Box::new(storage::PoolDriver::new(env)),
        Box::new(storage::VolumeDriver::new(env)),
        Box::new(net::NetworkDriver::new(env)?),
        Box::new(net::BondDriver::new(env)?),
        Box::new(containers),
        Box::new(vm::VmDriver::new(env)?),
        Box::new(schedules::ScheduleDriver::new(env)),
    ];
    Ok(drivers)
}
