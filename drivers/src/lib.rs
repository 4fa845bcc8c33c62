//! placeholder
pub mod backup;
pub mod container;
