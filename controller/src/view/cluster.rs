//! The cluster page's model: what `stead cluster status -o json` reads from etcd (nodes
//! and their leases, the leader, placements and their owners, replication lag), in the
//! API's own types. The binary reads etcd (the controller crate does not link the
//! cluster client) and hands the JSON to [`ClusterView::from_status`].

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// `GET /api/v1/cluster`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterView {
    /// Whether this controller's host is a node of a cluster.
    pub cluster: bool,
    /// Why there is nothing to show (not a cluster, or etcd could not be read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice: Option<String>,
    /// The elected cluster controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// The etcd revision of the reading.
    pub revision: i64,
    /// Registered (live) nodes.
    pub nodes: Vec<ClusterNode>,
    /// Where each workload is placed and who runs it.
    pub placements: Vec<Placement>,
    /// Replicated volumes.
    pub replication: Vec<Replication>,
}

/// One node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterNode {
    /// Node name.
    pub name: String,
    /// Its agent's address.
    pub address: String,
    /// stead version of its agent.
    pub version: String,
    /// Its lease (hex as etcd shows it).
    pub lease: String,
    /// Seconds left on its lease (-1: unknown).
    pub lease_ttl_seconds: i64,
    /// CPUs it offers, in thousandths.
    pub milli_cpus: u64,
    /// Memory it offers, bytes.
    pub memory_bytes: u64,
    /// Whether it is the leader.
    pub leader: bool,
}

/// One workload's placement.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// `Kind/name`.
    pub resource: String,
    /// The node it is assigned to.
    pub node: String,
    /// Highly available (failed over when its node dies).
    pub ha: bool,
    /// The node holding its owner key (running it), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The owner key's revision (the fencing token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fencing_token: Option<i64>,
}

/// One replicated volume.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Replication {
    /// The volume.
    pub volume: String,
    /// Sending node.
    pub from: String,
    /// Receiving node.
    pub to: String,
    /// Seconds between the last replicated point and its record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<u64>,
    /// When the last point was taken (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_point: Option<u64>,
    /// Failures in a row.
    pub failures: u32,
    /// The last attempt's error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

fn text(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_default().to_string()
}

impl ClusterView {
    /// Not a cluster: the page says so.
    pub fn not_a_cluster() -> Self {
        ClusterView {
            notice: Some(
                "This controller's host is not a node of a cluster (no `stead node join`).".into(),
            ),
            ..Default::default()
        }
    }

    /// A cluster whose state could not be read.
    pub fn unreadable(why: &str) -> Self {
        ClusterView {
            cluster: true,
            notice: Some(format!("The cluster's state could not be read: {why}")),
            ..Default::default()
        }
    }

    /// From the JSON of `stead cluster status -o json`.
    pub fn from_status(st: &Value) -> Self {
        let leader = st["leader"].as_str().map(str::to_string);
        let empty = Vec::new();
        let list = |k: &str| st[k].as_array().unwrap_or(&empty).clone();
        let nodes = list("nodes")
            .iter()
            .map(|n| ClusterNode {
                name: text(n, "name"),
                address: text(n, "address"),
                version: text(n, "version"),
                lease: format!("{:x}", n["lease"].as_i64().unwrap_or(0)),
                lease_ttl_seconds: n["leaseTtlSeconds"].as_i64().unwrap_or(-1),
                milli_cpus: n["capacity"]["milliCpus"].as_u64().unwrap_or(0),
                memory_bytes: n["capacity"]["memoryBytes"].as_u64().unwrap_or(0),
                leader: leader.as_deref() == n["name"].as_str(),
            })
            .collect();
        let placements = list("assignments")
            .iter()
            .map(|a| Placement {
                resource: text(a, "resource"),
                node: text(a, "node"),
                ha: a["ha"].as_bool().unwrap_or(false),
                owner: a["owner"].as_str().map(str::to_string),
                fencing_token: a["fencingToken"].as_i64(),
            })
            .collect();
        let replication = st["replication"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(volume, r)| Replication {
                        volume: volume.clone(),
                        from: text(r, "from"),
                        to: text(r, "to"),
                        lag_seconds: r["lagS"].as_u64(),
                        last_point: r["lastPoint"].as_u64(),
                        failures: u32::try_from(r["failures"].as_u64().unwrap_or(0))
                            .unwrap_or(u32::MAX),
                        last_error: r["lastError"].as_str().map(str::to_string),
                    })
                    .collect()
            })
            .unwrap_or_default();
        ClusterView {
            cluster: true,
            notice: None,
            leader,
            revision: st["revision"].as_i64().unwrap_or(0),
            nodes,
            placements,
            replication,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_what_cluster_status_prints() {
        let st = json!({
            "leader": "n1",
            "nodes": [
                {"name": "n1", "address": "10.0.0.1:7443", "labels": {}, "capacity": {"milliCpus": 2000, "memoryBytes": 4_294_967_296u64}, "pools": [], "networks": [], "version": "0.1.0", "lease": 7_587_883_129_445_000_000i64, "leaseTtlSeconds": 8},
                {"name": "n2", "address": "10.0.0.2:7443", "capacity": {"milliCpus": 1000, "memoryBytes": 1024}, "version": "0.1.0", "lease": 255, "leaseTtlSeconds": -1}
            ],
            "assignments": [
                {"resource": "VirtualMachine/db", "node": "n2", "ha": true, "revision": "abc", "owner": "n2", "fencingToken": 42},
                {"resource": "Container/web", "node": "n1", "ha": false, "revision": "abc"}
            ],
            "replication": {"db-data": {"from": "n2", "to": "n1", "seq": 3, "lastPoint": 100, "bytes": 5, "durationMs": 1, "lagS": 4, "lastAttempt": 99, "failures": 1, "lastError": "refused"}},
            "events": [],
            "revision": 77
        });
        let v = ClusterView::from_status(&st);
        assert!(v.cluster && v.notice.is_none());
        assert_eq!(v.leader.as_deref(), Some("n1"));
        assert_eq!(v.revision, 77);
        assert_eq!(v.nodes.len(), 2);
        assert!(v.nodes[0].leader && !v.nodes[1].leader);
        assert_eq!(v.nodes[1].lease, "ff");
        assert_eq!(v.nodes[0].milli_cpus, 2000);
        assert_eq!(v.nodes[1].lease_ttl_seconds, -1);
        assert_eq!(v.placements[0].owner.as_deref(), Some("n2"));
        assert_eq!(v.placements[0].fencing_token, Some(42));
        assert!(v.placements[1].owner.is_none() && !v.placements[1].ha);
        assert_eq!(v.replication[0].volume, "db-data");
        assert_eq!(v.replication[0].lag_seconds, Some(4));
        assert_eq!(v.replication[0].last_error.as_deref(), Some("refused"));
    }

    #[test]
    fn notices() {
        assert!(!ClusterView::not_a_cluster().cluster);
        let u = ClusterView::unreadable("etcd down");
        assert!(u.cluster && u.notice.unwrap().contains("etcd down"));
        let empty = ClusterView::from_status(&json!({}));
        assert!(empty.cluster && empty.nodes.is_empty());
    }
}
