//! placeholder
pub mod backup;
pub mod container;
pub mod net;
