//! stead's host drivers, one module per domain. Each implements
//! [`stead_schema::Driver`] for its kinds; [`registry`] builds them all for a host.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod backup;
pub mod container;
pub mod net;
pub mod netns;
pub mod schedules;
pub mod storage;
pub mod vm;

use stead_schema::{Driver, DriverError, HostEnv};

/// Every driver of this build, pointed at `env`.
pub fn registry(env: &HostEnv) -> Result<Vec<Box<dyn Driver>>, DriverError> {
    let drivers: Vec<Box<dyn Driver>> = vec![
        Box::new(storage::PoolDriver::new(env)),
        Box::new(storage::VolumeDriver::new(env)),
        Box::new(net::NetworkDriver::new(env)?),
        Box::new(net::BondDriver::new(env)?),
        Box::new(container::ContainerDriver::new(env)?),
        Box::new(vm::VmDriver::new(env)?),
        Box::new(schedules::ScheduleDriver::new(env)),
    ];
    Ok(drivers)
}
