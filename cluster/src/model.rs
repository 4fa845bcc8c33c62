//! Records the cluster keeps in etcd, as JSON values. Pure data: no I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a node says about itself when it registers (the value of its node key, bound to its
/// lease, so it disappears when the node stops keeping the lease alive).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    /// Node name, unique in the cluster (default: the host name).
    pub name: String,
    /// Address other nodes reach this node's agent on (replication, migration).
    pub address: String,
    /// Labels that `placement.nodeSelector` matches.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// What the node can give to workloads.
    pub capacity: Capacity,
    /// Storage pools present on this node.
    #[serde(default)]
    pub pools: Vec<String>,
    /// Networks present on this node.
    #[serde(default)]
    pub networks: Vec<String>,
    /// stead version of the agent.
    pub version: String,
    /// TCP port the node's agent receives volume replicas on (a record written before the
    /// port was registered reads as [`DEFAULT_REPLICATION_PORT`]).
    #[serde(default = "default_replication_port")]
    pub replication_port: u16,
}

/// The replication port of a node that does not register one.
pub const DEFAULT_REPLICATION_PORT: u16 = 7443;

fn default_replication_port() -> u16 {
    DEFAULT_REPLICATION_PORT
}

/// Allocatable resources of a node, or the request of a workload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Capacity {
    /// CPUs in thousandths (1 CPU = 1000).
    pub milli_cpus: u64,
    /// Memory in bytes.
    pub memory_bytes: u64,
}

/// The controller's decision: this workload runs on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    /// `Kind/name` of the workload (a Container or VirtualMachine).
    pub resource: String,
    /// The node it is assigned to.
    pub node: String,
    /// Whether the workload is highly available (failed over when its node dies).
    #[serde(default)]
    pub ha: bool,
    /// Revision of the manifests the decision was made from.
    #[serde(default)]
    pub revision: String,
}
