//! The part of the cluster's desired set one node converges: the workloads assigned to it,
//! everything they need (volumes, pools, networks, bonds, transitively), and the other
//! resources that only concern those (a backup schedule of an assigned workload). Pure.

use std::collections::{BTreeMap, BTreeSet};

use stead_schema::graph::edges;
use stead_schema::{Desired, Kind, ResourceId};

/// Whether `kind` is a workload (placed by the controller, run by one node).
pub fn is_workload(kind: Kind) -> bool {
    matches!(kind, Kind::Container | Kind::VirtualMachine)
}

/// The subset of `desired` a node converges when `assigned` are the workloads it owns.
/// Workloads not in `assigned` are left out (so the engine stops them where they ran);
/// assigned ids that `desired` lacks are ignored (the manifests moved on).
pub fn local_set(desired: &Desired, assigned: &BTreeSet<ResourceId>) -> Desired {
    let all = edges(desired.resources.values());
    let mut deps: BTreeMap<&ResourceId, Vec<&ResourceId>> = BTreeMap::new();
    for e in &all {
        deps.entry(&e.from).or_default().push(&e.to);
    }
    let mut keep: BTreeSet<ResourceId> = BTreeSet::new();
    let mut todo: Vec<&ResourceId> = assigned
        .iter()
        .filter(|id| desired.resources.contains_key(*id))
        .collect();
    while let Some(id) = todo.pop() {
        if !desired.resources.contains_key(id) || !keep.insert(id.clone()) {
            continue;
        }
        for d in deps.get(id).into_iter().flatten() {
            // A workload another one depends on is placed on its own, not pulled along.
            if !is_workload(d.kind) || assigned.contains(*d) {
                todo.push(d);
            }
        }
    }
    add_companions(desired, &deps, assigned, &mut keep);
    Desired {
        resources: desired
            .resources
            .iter()
            .filter(|(id, _)| keep.contains(*id))
            .map(|(id, r)| (id.clone(), r.clone()))
            .collect(),
    }
}

/// Adds the non-workload resources that reference an assigned workload and nothing outside
/// the set (a backup schedule of it).
fn add_companions(
    desired: &Desired,
    deps: &BTreeMap<&ResourceId, Vec<&ResourceId>>,
    assigned: &BTreeSet<ResourceId>,
    keep: &mut BTreeSet<ResourceId>,
) {
    let companions: Vec<ResourceId> = desired
        .resources
        .keys()
        .filter(|id| !is_workload(id.kind) && !keep.contains(*id))
        .filter(|id| {
            let d = deps.get(id).map(Vec::as_slice).unwrap_or_default();
            d.iter().any(|t| assigned.contains(*t)) && d.iter().all(|t| keep.contains(*t))
        })
        .cloned()
        .collect();
    keep.extend(companions);
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn desired(yaml: &str) -> Desired {
        let mut out = Vec::new();
        let mut errors = Vec::new();
        stead_schema::load::load_str(Path::new("t.yaml"), yaml, &mut out, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        Desired {
            resources: out.into_iter().map(|r| (r.id.clone(), r)).collect(),
        }
    }

    const SET: &str = r#"
apiVersion: stead.dev/v1alpha1
kind: StoragePool
metadata: {name: local}
spec: {type: dir, path: /srv/pools/local}
---
apiVersion: stead.dev/v1alpha1
kind: StoragePool
metadata: {name: other}
spec: {type: dir, path: /srv/pools/other}
---
apiVersion: stead.dev/v1alpha1
kind: Network
metadata: {name: lan0}
spec: {addresses: [10.10.0.1/24]}
---
apiVersion: stead.dev/v1alpha1
kind: Network
metadata: {name: lan1}
spec: {addresses: [10.11.0.1/24]}
---
apiVersion: stead.dev/v1alpha1
kind: Volume
metadata: {name: web-data}
spec: {pool: local, size: 1Gi}
---
apiVersion: stead.dev/v1alpha1
kind: Volume
metadata: {name: db-data}
spec: {pool: other, size: 1Gi}
---
apiVersion: stead.dev/v1alpha1
kind: Container
metadata: {name: web}
spec:
  rootfs: {path: /srv/rootfs/web}
  interfaces: [{name: eth0, network: lan0, address: 10.10.0.10/24}]
  mounts: [{volume: web-data, path: /data}]
---
apiVersion: stead.dev/v1alpha1
kind: Container
metadata: {name: db}
spec:
  rootfs: {path: /srv/rootfs/db}
  interfaces: [{name: eth0, network: lan1, address: 10.11.0.10/24}]
  mounts: [{volume: db-data, path: /data}]
"#;

    fn ids(d: &Desired) -> Vec<String> {
        d.resources.keys().map(ToString::to_string).collect()
    }

    fn id(kind: Kind, name: &str) -> ResourceId {
        ResourceId::new(kind, name)
    }

    #[test]
    fn an_assigned_workload_brings_what_it_needs_and_nothing_else() {
        let d = desired(SET);
        let web: BTreeSet<_> = [id(Kind::Container, "web")].into();
        let got = local_set(&d, &web);
        let want: BTreeSet<ResourceId> = [
            id(Kind::StoragePool, "local"),
            id(Kind::Network, "lan0"),
            id(Kind::Volume, "web-data"),
            id(Kind::Container, "web"),
        ]
        .into();
        assert_eq!(
            got.resources.keys().cloned().collect::<BTreeSet<_>>(),
            want,
            "{:?}",
            ids(&got)
        );
    }

    #[test]
    fn nothing_assigned_is_an_empty_set_and_unknown_ids_are_ignored() {
        let d = desired(SET);
        assert!(local_set(&d, &BTreeSet::new()).resources.is_empty());
        let ghost: BTreeSet<_> = [id(Kind::Container, "gone")].into();
        assert!(local_set(&d, &ghost).resources.is_empty());
    }

    #[test]
    fn two_workloads_share_nothing_twice() {
        let d = desired(SET);
        let both: BTreeSet<_> = [id(Kind::Container, "web"), id(Kind::Container, "db")].into();
        assert_eq!(local_set(&d, &both).len(), d.len());
    }
}
