//! Cluster rules: workload placement, HA groups, shared pools and volume replication.
//! A single host ignores these fields, but they are checked everywhere, so a manifest set
//! that validates on one host also validates for a cluster.

use std::collections::BTreeSet;

use super::{at, pool_spec};
use crate::kinds::*;
use crate::load::Diagnostic;
use crate::resource::{Desired, Kind, Resource, ResourceId, Spec};
use crate::values::ResourceRef;

/// The placement of a workload, when `r` is one.
pub(crate) fn placement_of(r: &Resource) -> Option<&Placement> {
    match &r.spec {
        Spec::Container(c) => Some(&c.placement),
        Spec::VirtualMachine(vm) => Some(&vm.placement),
        _ => None,
    }
}

/// The spec of the HaGroup `name`, when it is defined.
fn ha_group_spec<'d>(desired: &'d Desired, name: &str) -> Option<&'d HaGroupSpec> {
    match &desired.get(&ResourceId::new(Kind::HaGroup, name))?.spec {
        Spec::HaGroup(g) => Some(g),
        _ => None,
    }
}

/// The four workload lists of a placement, each with its field name.
fn rule_lists(p: &Placement) -> [(&'static str, &[ResourceRef]); 4] {
    [
        ("affinity", &p.affinity),
        ("antiAffinity", &p.anti_affinity),
        ("preferredAffinity", &p.preferred_affinity),
        ("preferredAntiAffinity", &p.preferred_anti_affinity),
    ]
}

/// A workload's `spec.placement`: its node, its HA group and its workload lists.
pub(super) fn check_placement(r: &Resource, desired: &Desired, out: &mut Vec<Diagnostic>) {
    let Some(p) = placement_of(r) else { return };
    check_pin(r, p, desired, out);
    check_ha_group_ref(r, p, desired, out);
    for (field, list) in rule_lists(p) {
        check_rule_list(r, field, list, desired, out);
    }
    check_contradictions(r, p, desired, out);
    if p.node_selector.keys().any(String::is_empty) {
        out.push(at(
            r,
            "/spec/placement/nodeSelector",
            "a node selector label key must not be empty",
            None,
        ));
    }
}

/// `node` pins the workload: it cannot fail over, and must be a member of a restricted
/// group.
fn check_pin(r: &Resource, p: &Placement, desired: &Desired, out: &mut Vec<Diagnostic>) {
    let Some(node) = &p.node else { return };
    if p.is_ha() {
        out.push(at(
            r,
            "/spec/placement/node",
            format!(
                "the workload is pinned to node {node}, so it cannot fail over as an HA workload"
            ),
            Some("remove node, or remove ha and haGroup"),
        ));
    }
    if let Some(g) = &p.ha_group
        && let Some(group) = ha_group_spec(desired, g.as_str())
        && group.restricted
        && !group.nodes.contains_key(node)
    {
        out.push(at(
            r,
            "/spec/placement/node",
            format!("node {node} is not a member of the restricted HaGroup {g}"),
            None,
        ));
    }
}

/// `haGroup` names an HaGroup.
fn check_ha_group_ref(r: &Resource, p: &Placement, desired: &Desired, out: &mut Vec<Diagnostic>) {
    let Some(g) = &p.ha_group else { return };
    if ha_group_spec(desired, g.as_str()).is_none() {
        out.push(at(
            r,
            "/spec/placement/haGroup",
            format!("{} references HaGroup/{g} which is not defined", r.id),
            similar_name(desired, Kind::HaGroup, g.as_str()).as_deref(),
        ));
    }
}

/// A `did you mean` hint: the defined name of `kind` closest to `name`, when close.
fn similar_name(desired: &Desired, kind: Kind, name: &str) -> Option<String> {
    desired
        .resources
        .keys()
        .filter(|k| k.kind == kind)
        .map(|k| (crate::load::edit_distance(&k.name, name), k))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, k)| format!("did you mean {k}?"))
}

/// Each entry of a workload list: a defined Container or VirtualMachine, not the
/// workload itself, listed once.
fn check_rule_list(
    r: &Resource,
    field: &str,
    list: &[ResourceRef],
    desired: &Desired,
    out: &mut Vec<Diagnostic>,
) {
    let mut seen = BTreeSet::new();
    for (i, t) in list.iter().enumerate() {
        let ptr = format!("/spec/placement/{field}/{i}");
        let id = ResourceId::new(t.kind, t.name.clone());
        if !t.kind.is_workload() {
            out.push(at(
                r,
                &ptr,
                format!("{t} is not a workload: {field} names Containers or VirtualMachines"),
                None,
            ));
        } else if id == r.id {
            out.push(at(
                r,
                &ptr,
                format!("{field} names the workload itself"),
                None,
            ));
        } else if desired.get(&id).is_none() {
            out.push(at(
                r,
                &ptr,
                format!("{} references {t} which is not defined", r.id),
                similar_name(desired, t.kind, &t.name).as_deref(),
            ));
        }
        if !seen.insert(t) {
            out.push(at(r, &ptr, format!("{t} is listed twice"), None));
        }
    }
}

/// Required rules that no node can satisfy: a workload both affine and anti-affine to
/// another, affine to one that is anti-affine to it, or affine to one pinned elsewhere.
fn check_contradictions(r: &Resource, p: &Placement, desired: &Desired, out: &mut Vec<Diagnostic>) {
    for (i, t) in p.affinity.iter().enumerate() {
        let ptr = format!("/spec/placement/affinity/{i}");
        if p.anti_affinity.contains(t) {
            out.push(at(
                r,
                &ptr,
                format!("{t} is in both affinity and antiAffinity"),
                None,
            ));
        }
        let Some(other) = desired.get(&ResourceId::new(t.kind, t.name.clone())) else {
            continue;
        };
        let Some(op) = placement_of(other) else {
            continue;
        };
        if let Some(j) = op
            .anti_affinity
            .iter()
            .position(|a| a.kind == r.id.kind && a.name == r.id.name)
        {
            let loc = other
                .origin
                .locate(&format!("/spec/placement/antiAffinity/{j}"));
            out.push(at(
                r,
                &ptr,
                format!(
                    "{t} is anti-affine to {} ({loc}): they cannot share a node",
                    r.id
                ),
                None,
            ));
        }
        if let (Some(a), Some(b)) = (&p.node, &op.node)
            && a != b
        {
            out.push(at(
                r,
                &ptr,
                format!(
                    "{} is pinned to node {a} and {t} to node {b}: they cannot share a node",
                    r.id
                ),
                None,
            ));
        }
    }
}

/// An HaGroup has at least one member. (Members the loader refused were left out of
/// `nodes`: they are reported there, so an empty map counts only when nothing was written.)
pub(super) fn check_ha_group(r: &Resource, g: &HaGroupSpec, out: &mut Vec<Diagnostic>) {
    let written = r.origin.spans.keys().any(|k| k.starts_with("/spec/nodes/"));
    if g.nodes.is_empty() && !written {
        out.push(at(
            r,
            "/spec/nodes",
            "an HA group needs at least one node",
            Some("nodes: {pve1: 2, pve2: 1}"),
        ));
    }
}

/// `shared: true` only where several nodes can reach the same storage.
pub(super) fn check_pool_shared(r: &Resource, p: &StoragePoolSpec, out: &mut Vec<Diagnostic>) {
    if p.shared
        && matches!(
            p.pool_type,
            PoolType::Btrfs | PoolType::Zfs | PoolType::Lvmthin
        )
    {
        out.push(at(
            r,
            "/spec/shared",
            format!(
                "a {} pool lives on one node's disks: it cannot be shared",
                p.pool_type.as_str()
            ),
            Some("replicate its volumes instead (Volume spec.replication)"),
        ));
    }
}

/// `replication` on a volume of a btrfs or zfs pool that is not shared, at a sane
/// interval.
pub(super) fn check_replication(
    r: &Resource,
    v: &VolumeSpec,
    desired: &Desired,
    out: &mut Vec<Diagnostic>,
) {
    let Some(rep) = &v.replication else { return };
    if rep.every.0 < std::time::Duration::from_secs(1) {
        out.push(at(
            r,
            "/spec/replication/every",
            format!("replication interval {} is below 1s", rep.every),
            None,
        ));
    }
    let Some(p) = pool_spec(desired, v.pool.as_str()) else {
        return;
    };
    if !matches!(p.pool_type, PoolType::Btrfs | PoolType::Zfs) {
        out.push(at(
            r,
            "/spec/replication",
            format!(
                "replication needs a btrfs or zfs pool (incremental send/receive); pool {} is {}",
                v.pool,
                p.pool_type.as_str()
            ),
            None,
        ));
    } else if p.shared {
        out.push(at(
            r,
            "/spec/replication",
            format!(
                "pool {} is shared: every node already sees this volume",
                v.pool
            ),
            Some("remove replication"),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{POOL, diagnostics, doc};

    fn ct(name: &str, placement: &str) -> String {
        doc(
            "Container",
            name,
            &["rootfs: {path: /srv/x}", &format!("placement: {placement}")],
        )
    }

    #[test]
    fn a_valid_cluster_set_has_no_diagnostics() {
        let text = doc(
            "HaGroup",
            "prod",
            &[
                "nodes: {pve1: 2, pve2.lan: 1}",
                "restricted: true",
                "nofailback: true",
            ],
        ) + &doc(
            "StoragePool",
            "nfs",
            &[
                "type: nfs",
                "path: /mnt/nfs",
                "nfs: {server: s, export: /x}",
                "shared: true",
            ],
        ) + &doc("StoragePool", "fast", &["type: btrfs", "path: /srv/fast"])
            + &doc(
                "Volume",
                "db",
                &[
                    "pool: fast",
                    "size: 1Gi",
                    "replication: {to: pve2.lan, every: 5m}",
                ],
            )
            + &ct(
                "a",
                "{nodeSelector: {zone: a}, antiAffinity: [Container/b], haGroup: prod}",
            )
            + &ct(
                "b",
                "{antiAffinity: [Container/a], preferredAffinity: [VirtualMachine/c], ha: true}",
            )
            + &doc(
                "VirtualMachine",
                "c",
                &[
                    "boot: {kernel: /k}",
                    "placement: {node: pve1, affinity: [Container/d]}",
                ],
            )
            + &ct("d", "{preferredAntiAffinity: [Container/a]}");
        assert_eq!(diagnostics(&text), Vec::<String>::new());
    }

    #[test]
    fn workload_rules() {
        let text = doc("HaGroup", "prod", &["nodes: {pve1: 1}", "restricted: true"])
            + &ct("a", "{node: pve2, haGroup: prod}")
            + &ct(
                "b",
                "{affinity: [Container/b, Network/x, Container/zz, Container/a], antiAffinity: [Container/a, Container/a]}",
            )
            + &ct(
                "c",
                "{haGroup: prdo, affinity: [Container/d], preferredAntiAffinity: [Container/e]}",
            )
            + &ct("d", "{antiAffinity: [Container/c]}")
            + &ct(
                "e",
                "{nodeSelector: {'': x}, node: pve1, affinity: [Container/a]}",
            );
        assert_eq!(
            diagnostics(&text),
            [
                "m.yaml:14:21: Container/a spec.placement.node: the workload is pinned to node pve2, so it cannot fail over as an HA workload (hint: remove node, or remove ha and haGroup)",
                "m.yaml:14:21: Container/a spec.placement.node: node pve2 is not a member of the restricted HaGroup prod",
                "m.yaml:21:26: Container/b spec.placement.affinity[0]: affinity names the workload itself",
                "m.yaml:21:39: Container/b spec.placement.affinity[1]: Network/x is not a workload: affinity names Containers or VirtualMachines",
                "m.yaml:21:50: Container/b spec.placement.affinity[2]: Container/b references Container/zz which is not defined (hint: did you mean Container/a?)",
                "m.yaml:21:64: Container/b spec.placement.affinity[3]: Container/a is in both affinity and antiAffinity",
                "m.yaml:21:106: Container/b spec.placement.antiAffinity[1]: Container/a is listed twice",
                "m.yaml:28:24: Container/c spec.placement.haGroup: Container/c references HaGroup/prdo which is not defined (hint: did you mean HaGroup/prod?)",
                "m.yaml:28:41: Container/c spec.placement.affinity[0]: Container/d is anti-affine to Container/c (m.yaml:35:30): they cannot share a node",
                "m.yaml:42:15: Container/e spec.placement.nodeSelector: a node selector label key must not be empty",
                "m.yaml:42:61: Container/e spec.placement.affinity[0]: Container/e is pinned to node pve1 and Container/a to node pve2: they cannot share a node",
            ]
        );
    }

    #[test]
    fn ha_group_pool_and_replication_rules() {
        let text = doc("HaGroup", "empty", &["nodes: {}"])
            + &doc(
                "StoragePool",
                "z",
                &[
                    "type: zfs",
                    "path: /z",
                    "zfs: {dataset: tank}",
                    "shared: true",
                ],
            )
            + &doc("StoragePool", "local", POOL)
            + &doc(
                "Volume",
                "a",
                &[
                    "pool: local",
                    "size: 1Gi",
                    "replication: {to: pve2, every: 5m}",
                ],
            )
            + &doc(
                "Volume",
                "b",
                &[
                    "pool: z",
                    "size: 1Gi",
                    "replication: {to: pve2, every: 500ms}",
                ],
            );
        assert_eq!(
            diagnostics(&text),
            [
                "m.yaml:6:3: HaGroup/empty spec.nodes: an HA group needs at least one node (hint: nodes: {pve1: 2, pve2: 1})",
                "m.yaml:15:11: StoragePool/z spec.shared: a zfs pool lives on one node's disks: it cannot be shared (hint: replicate its volumes instead (Volume spec.replication))",
                "m.yaml:31:3: Volume/a spec.replication: replication needs a btrfs or zfs pool (incremental send/receive); pool local is dir",
                "m.yaml:39:3: Volume/b spec.replication: pool z is shared: every node already sees this volume (hint: remove replication)",
                "m.yaml:39:34: Volume/b spec.replication.every: replication interval 500ms is below 1s",
            ]
        );
    }
}
