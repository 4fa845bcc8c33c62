//! stead's cluster layer: many hosts on etcd.
//!
//! - [`model`]: the records the cluster keeps (nodes, assignments, owners), shared by every
//!   other module.
//! - [`local`]: the part of the desired set one node converges (its workloads and what they
//!   need).
//! - [`pki`]: the cluster's certificate authority and the etcd member, agent and operator
//!   certificates (`stead cluster init`).
//! - [`keys`]: the key layout (the one place keys are built and parsed).
//! - [`etcd`]: the connection ([`etcd::EtcdConfig`] → [`etcd::Store`]) and typed errors.
//! - [`watch`]: prefix watches that resume after a reconnect.
//! - [`registry`]: nodes registered under a lease kept alive; node listing and watch.
//! - [`election`]: the controller's election, guarded assignment writes, a node's assignments.
//! - [`owner`]: owner keys and fencing tokens; guarded writes.
//! - [`fence`]: self-fencing before the lease can expire.
//! - [`quorum`]: holding workloads (not fencing) while no etcd member has a leader.
//! - [`agent`]: the loop each node runs, over a [`agent::Converge`] engine.
//! - [`placement`]: which node runs each workload (pure, deterministic).
//! - [`replication`]: storage replication schedule and fenced status records.
//! - [`leader`]: the elected controller's loop: place, write assignments, step down.
//! - [`events`]: cluster events (failover, fence, unplaceable) kept for an hour.
//! - [`migrate`]: operators' migration overrides (`stead migrate`), honoured by placement.
//! - [`metrics`]: Prometheus metrics of the agent and the leader, and their endpoint.
//! - `testkit` (feature `testkit`): one real etcd member on loopback for tests.
//!
//! Each node runs an agent that registers itself under a lease; one elected controller places
//! workloads and writes assignments; each agent converges only what is assigned to it with the
//! single-host engine. A running workload is owned through a key bound to its node's lease, and
//! side effects carry that key's revision as a fencing token. See docs/architecture.md.

pub mod agent;
pub mod election;
pub mod etcd;
pub mod events;
pub mod fence;
pub mod keys;
pub mod leader;
pub mod live;
pub mod local;
pub mod metrics;
pub mod migrate;
pub mod model;
pub mod owner;
pub mod pki;
pub mod placement;
pub mod quorum;
pub mod registry;
pub mod replication;
#[cfg(test)]
mod test_yaml;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod watch;
