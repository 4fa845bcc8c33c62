//! stead's cluster layer: many hosts on etcd.
//!
//! - [`model`]: the records the cluster keeps (nodes, assignments, owners), shared by every
//!   other module.
//! - [`local`]: the part of the desired set one node converges (its workloads and what they
//!   need).
//! - [`pki`]: the cluster's certificate authority and the etcd member, agent and operator
//!   certificates (`stead cluster init`).
//! - [`placement`]: which node runs each workload (pure, deterministic).
//!
//! Each node runs an agent that registers itself under a lease; one elected controller places
//! workloads and writes assignments; each agent converges only what is assigned to it with the
//! single-host engine. A running workload is owned through a key bound to its node's lease, and
//! side effects carry that key's revision as a fencing token. See docs/architecture.md.

pub mod local;
pub mod model;
pub mod pki;
pub mod placement;
