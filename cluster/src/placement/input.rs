//! The placement inputs a manifest set gives: each workload's request, rules, needs and
//! where its data lives, and the HA groups. Pure: reads the desired set only.

use std::collections::{BTreeMap, BTreeSet};

use stead_schema::{
    ContainerSpec, Desired, HaGroupSpec, Kind, NetworkSpec, PoolType, Resource, ResourceId, Spec,
    StoragePoolSpec, VirtualMachineSpec, VolumeSpec,
};

use super::{DataLocality, Need, Workload};
use crate::model::Capacity;
use crate::replication::{ReplicationStatus, replica_holder};

/// Replication statuses by volume name (`replication/Volume/<name>`).
pub type ReplicaStatuses = BTreeMap<String, ReplicationStatus>;

/// Every workload of `desired` (Containers and VirtualMachines), sorted by id.
pub fn workloads(desired: &Desired) -> Vec<Workload> {
    workloads_with_replicas(desired, &ReplicaStatuses::new())
}

/// [`workloads`], where a replicated volume's data is also on the node its replication
/// status says holds a replica ([`replica_holder`]: after a move or failover, the previous
/// owner the volume replicates back to), not only on the node its manifest names in `to`.
pub fn workloads_with_replicas(desired: &Desired, statuses: &ReplicaStatuses) -> Vec<Workload> {
    desired
        .resources
        .values()
        .filter_map(|r| workload_with_replicas(r, desired, statuses))
        .collect()
}

/// The HA groups of `desired`, by name.
pub fn ha_groups(desired: &Desired) -> BTreeMap<String, HaGroupSpec> {
    desired
        .resources
        .values()
        .filter_map(|r| match &r.spec {
            Spec::HaGroup(g) => Some((r.id.name.clone(), g.clone())),
            _ => None,
        })
        .collect()
}

/// The placement input of `r` when it is a workload.
pub fn workload(r: &Resource, desired: &Desired) -> Option<Workload> {
    workload_with_replicas(r, desired, &ReplicaStatuses::new())
}

/// [`workload`] with the replica holders of `statuses` ([`workloads_with_replicas`]).
pub fn workload_with_replicas(
    r: &Resource,
    desired: &Desired,
    statuses: &ReplicaStatuses,
) -> Option<Workload> {
    let (request, placement, volumes, networks) = match &r.spec {
        Spec::Container(c) => (
            container_request(c),
            c.placement.clone(),
            container_volumes(c),
            c.interfaces
                .iter()
                .map(|i| i.network.0.clone())
                .collect::<Vec<_>>(),
        ),
        Spec::VirtualMachine(vm) => (
            vm_request(vm),
            vm.placement.clone(),
            vm_volumes(vm),
            vm.interfaces
                .iter()
                .map(|i| i.network.0.clone())
                .collect::<Vec<_>>(),
        ),
        _ => return None,
    };
    let mut pools: Vec<String> = volumes
        .iter()
        .filter_map(|v| volume(desired, v).map(|s| s.pool.0.clone()))
        .collect();
    if let Spec::Container(c) = &r.spec
        && let Some(p) = &c.rootfs.pool
    {
        pools.push(p.0.clone());
    }
    Some(Workload {
        id: r.id.clone(),
        request,
        needs: needs(desired, &pools, &networks),
        data: data_locality(desired, &volumes, statuses),
        placement,
    })
}

/// The volumes workload `r` uses (empty for other kinds).
pub fn volumes_of(r: &Resource) -> BTreeSet<String> {
    match &r.spec {
        Spec::Container(c) => container_volumes(c),
        Spec::VirtualMachine(vm) => vm_volumes(vm),
        _ => BTreeSet::new(),
    }
}

/// A container asks for its limits; without limits, for nothing.
fn container_request(c: &ContainerSpec) -> Capacity {
    Capacity {
        milli_cpus: c.resources.cpus.map_or(0, |c| (c * 1000.0).round() as u64),
        memory_bytes: c.resources.memory.map_or(0, |m| m.bytes()),
    }
}

/// A VM asks for its vCPUs and guest memory.
fn vm_request(vm: &VirtualMachineSpec) -> Capacity {
    Capacity {
        milli_cpus: u64::from(vm.cpus) * 1000,
        memory_bytes: vm.memory.bytes(),
    }
}

/// The volumes a container uses: its root volume and mounts.
fn container_volumes(c: &ContainerSpec) -> BTreeSet<String> {
    let root = c.rootfs.volume.iter().map(|v| v.0.clone());
    root.chain(c.mounts.iter().map(|m| m.volume.0.clone()))
        .collect()
}

/// The volumes a VM uses: disks and cdroms.
fn vm_volumes(vm: &VirtualMachineSpec) -> BTreeSet<String> {
    let disks = vm.disks.iter().map(|d| d.volume.0.clone());
    disks
        .chain(vm.cdroms.iter().map(|c| c.volume.0.clone()))
        .collect()
}

/// What decides whether VM `id` of `desired` can move live ([`crate::migrate::live_facts`]):
/// its engine, whether it is declared running and runs now (`running`), and where each of
/// its volumes lives. `None` when `id` is not a VirtualMachine of `desired`.
pub fn vm_live_facts(
    desired: &Desired,
    id: &ResourceId,
    running: bool,
) -> Option<crate::migrate::LiveFacts> {
    let Spec::VirtualMachine(vm) = &desired.get(id)?.spec else {
        return None;
    };
    let engine = match vm.engine() {
        stead_schema::VmEngine::Qemu => "qemu",
        stead_schema::VmEngine::Vmm => "vmm",
    };
    let volumes = vm_volumes(vm)
        .into_iter()
        .map(|name| {
            let pool = volume(desired, &name).map(|v| v.pool.0.clone());
            let shared = pool
                .as_deref()
                .and_then(|p| self::pool(desired, p))
                .is_some_and(pool_is_shared);
            let replicated_to = volume(desired, &name)
                .and_then(|v| v.replication.as_ref())
                .map(|r| r.to.0.clone());
            crate::migrate::VolumeSite {
                volume: name,
                pool: pool.unwrap_or_default(),
                shared,
                replicated_to,
            }
        })
        .collect();
    Some(crate::migrate::LiveFacts {
        engine: engine.into(),
        running: running && vm.state == stead_schema::RunState::Running,
        volumes,
        to: None,
    })
}

fn volume<'d>(desired: &'d Desired, name: &str) -> Option<&'d VolumeSpec> {
    match &desired.get(&ResourceId::new(Kind::Volume, name))?.spec {
        Spec::Volume(v) => Some(v),
        _ => None,
    }
}

fn pool<'d>(desired: &'d Desired, name: &str) -> Option<&'d StoragePoolSpec> {
    match &desired.get(&ResourceId::new(Kind::StoragePool, name))?.spec {
        Spec::StoragePool(p) => Some(p),
        _ => None,
    }
}

fn network<'d>(desired: &'d Desired, name: &str) -> Option<&'d NetworkSpec> {
    match &desired.get(&ResourceId::new(Kind::Network, name))?.spec {
        Spec::Network(n) => Some(n),
        _ => None,
    }
}

/// Whether every node sees the same pool (NFS, or declared shared).
fn pool_is_shared(p: &StoragePoolSpec) -> bool {
    p.shared || p.pool_type == PoolType::Nfs
}

/// Whether a pool can be made on any node (a directory, an NFS mount) rather than
/// needing the node's own disks (btrfs, zfs, lvmthin), which its agent must report.
fn pool_is_cluster_wide(p: &StoragePoolSpec) -> bool {
    pool_is_shared(p) || p.pool_type == PoolType::Dir
}

/// A network with host ports enslaves the node's own interfaces, which its agent must
/// report; a bridge or VXLAN without ports can be made on any node.
fn network_is_cluster_wide(n: &NetworkSpec) -> bool {
    n.ports.is_empty()
}

/// The pools and networks a workload needs on its node.
fn needs(desired: &Desired, pools: &[String], networks: &[String]) -> Vec<Need> {
    let mut out: BTreeSet<Need> = BTreeSet::new();
    for p in pools {
        let cluster_wide = pool(desired, p).is_none_or(pool_is_cluster_wide);
        out.insert(Need {
            kind: Kind::StoragePool,
            name: p.clone(),
            cluster_wide,
        });
    }
    for n in networks {
        let cluster_wide = network(desired, n).is_none_or(network_is_cluster_wide);
        out.insert(Need {
            kind: Kind::Network,
            name: n.clone(),
            cluster_wide,
        });
    }
    out.into_iter().collect()
}

/// Where the data of `volumes` lives: anywhere (shared pools or no volume), on the
/// replica nodes every replicated volume shares (its `to`, and the node its status says
/// holds a replica), or only where the workload runs now.
fn data_locality(
    desired: &Desired,
    volumes: &BTreeSet<String>,
    statuses: &ReplicaStatuses,
) -> DataLocality {
    let mut replicas: Option<BTreeSet<String>> = None;
    for name in volumes {
        let Some(v) = volume(desired, name) else {
            continue;
        };
        if pool(desired, &v.pool.0).is_some_and(pool_is_shared) {
            continue;
        }
        let Some(rep) = &v.replication else {
            return DataLocality::Local {
                volume: name.clone(),
            };
        };
        let mut to = BTreeSet::from([rep.to.0.clone()]);
        if let Some(holder) = statuses.get(name).and_then(replica_holder) {
            to.insert(holder.to_string());
        }
        replicas = Some(match replicas {
            None => to,
            Some(r) => r.intersection(&to).cloned().collect(),
        });
    }
    match replicas {
        None => DataLocality::Anywhere,
        Some(nodes) => DataLocality::Replicated { nodes },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_yaml::{desired, doc};

    #[test]
    fn requests_needs_and_data_come_from_the_manifests() {
        let d = desired(
            &(doc(
                "StoragePool",
                "nfs",
                "{type: nfs, path: /n, nfs: {server: s, export: /x}}",
            ) + &doc("StoragePool", "fast", "{type: btrfs, path: /f}")
                + &doc("StoragePool", "dir", "{type: dir, path: /d}")
                + &doc("Network", "lan0", "{}")
                + &doc("Network", "uplink", "{ports: [eth1]}")
                + &doc("Volume", "shared", "{pool: nfs, size: 1Gi}")
                + &doc(
                    "Volume",
                    "rep",
                    "{pool: fast, size: 1Gi, replication: {to: b, every: 1m}}",
                )
                + &doc("Volume", "local", "{pool: dir, size: 1Gi}")
                + &doc(
                    "Container",
                    "web",
                    "{rootfs: {volume: shared}, resources: {cpus: 1.5, memory: 1Gi}, interfaces: [{name: eth0, network: uplink}]}",
                )
                + &doc(
                    "VirtualMachine",
                    "db",
                    "{boot: {kernel: /k}, cpus: 2, memory: 2Gi, disks: [{volume: rep}, {volume: shared}], interfaces: [{network: lan0}]}",
                )
                + &doc(
                    "Container",
                    "app",
                    "{rootfs: {path: /r}, mounts: [{volume: local, path: /d}]}",
                )
                + &doc("HaGroup", "prod", "{nodes: {a: 1}}")),
        );
        let w = workloads(&d);
        let ids: Vec<String> = w.iter().map(|w| w.id.to_string()).collect();
        assert_eq!(ids, ["Container/app", "Container/web", "VirtualMachine/db"]);
        let (app, web, db) = (&w[0], &w[1], &w[2]);
        assert_eq!(
            web.request,
            Capacity {
                milli_cpus: 1500,
                memory_bytes: 1 << 30
            }
        );
        assert_eq!(
            db.request,
            Capacity {
                milli_cpus: 2000,
                memory_bytes: 2 << 30
            }
        );
        assert_eq!(app.request, Capacity::default());
        assert_eq!(web.data, DataLocality::Anywhere);
        assert_eq!(
            db.data,
            DataLocality::Replicated {
                nodes: BTreeSet::from(["b".to_string()])
            }
        );
        assert_eq!(
            app.data,
            DataLocality::Local {
                volume: "local".into()
            }
        );
        let need = |k, n: &str, c| Need {
            kind: k,
            name: n.into(),
            cluster_wide: c,
        };
        assert_eq!(
            web.needs,
            [
                need(Kind::StoragePool, "nfs", true),
                need(Kind::Network, "uplink", false)
            ]
        );
        assert_eq!(
            db.needs,
            [
                need(Kind::StoragePool, "fast", false),
                need(Kind::StoragePool, "nfs", true),
                need(Kind::Network, "lan0", true)
            ]
        );
        assert_eq!(ha_groups(&d).keys().collect::<Vec<_>>(), ["prod"]);
    }
}
