//! Placement: which node runs each workload. Pure: no I/O, no clock, deterministic.
//!
//! Input: the nodes (what they registered, and whether their lease is alive), the
//! workloads (request, `spec.placement`, the pools and networks they need, where their
//! data lives), the HA groups and the current assignments. Output: the new assignments
//! and, for each workload that cannot be placed, which rule excluded which node.
//!
//! Rules, hard ones first: a node must be alive; `node` pins; `nodeSelector` labels must
//! match; a restricted HA group keeps a workload on its members; `affinity` puts it on the
//! node of each named workload and `antiAffinity` (symmetric) never with one; node-local
//! pools and networks must exist on the node; a workload that moves must find its data
//! there (shared pool, or a replica); requests must fit the node's capacity. Among the
//! nodes left: the highest HA group priority, then the preferred (anti-)affinities, then
//! the least loaded node, then the name.
//!
//! Stability: a workload stays where it is unless its node is dead (an HA workload moves;
//! another stays assigned and is reported unavailable), it breaks a hard rule (capacity
//! excepted: a running workload is never evicted for it), or an HA group without
//! `noFailback` has a better member alive again (failback).

mod input;

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use stead_schema::{HaGroupSpec, Kind, Placement, ResourceId};

pub use input::{
    ReplicaStatuses, ha_groups, vm_live_facts, volumes_of, workload, workload_with_replicas,
    workloads, workloads_with_replicas,
};

use crate::model::{Assignment, Capacity, NodeInfo};

/// A node as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    /// What the node registered.
    pub info: NodeInfo,
    /// Whether its lease is alive.
    pub alive: bool,
}

/// A pool or network a workload needs on its node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Need {
    /// StoragePool or Network.
    pub kind: Kind,
    /// Its name.
    pub name: String,
    /// Made on any node that needs it; otherwise the node must report it.
    pub cluster_wide: bool,
}

/// Where a workload's data lives, which decides where it may move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataLocality {
    /// No data tied to a node (no volume, or only volumes on shared pools).
    Anywhere,
    /// Replicated to these nodes (all its node-local volumes have a copy there).
    Replicated {
        /// The nodes holding a replica of every volume.
        nodes: BTreeSet<String>,
    },
    /// A volume on a node-local pool without replication: it cannot move.
    Local {
        /// The first such volume.
        volume: String,
    },
}

/// A workload to place.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// `Container/name` or `VirtualMachine/name`.
    pub id: ResourceId,
    /// What it asks of a node.
    pub request: Capacity,
    /// Its placement rules.
    pub placement: Placement,
    /// Pools and networks it needs on its node.
    pub needs: Vec<Need>,
    /// Where its data lives.
    pub data: DataLocality,
}

/// Why a node cannot take a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exclusion {
    /// Its lease expired.
    Dead,
    /// The workload is pinned to another node.
    Pinned(String),
    /// A `nodeSelector` label is missing or different.
    Label {
        /// The label key.
        key: String,
        /// The value asked for.
        want: String,
    },
    /// Not a member of the workload's restricted HA group.
    NotInGroup(String),
    /// A required-affinity workload is not placed on this node.
    Affinity(ResourceId),
    /// An anti-affine workload is on this node.
    AntiAffinity(ResourceId),
    /// A node-local pool or network is missing.
    Missing(Kind, String),
    /// The workload would move and its data is not on this node.
    NoData(String),
    /// The request does not fit.
    Capacity {
        /// What the workload asks.
        request: Capacity,
        /// What is left on the node.
        free: Capacity,
    },
}

impl fmt::Display for Exclusion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exclusion::Dead => write!(f, "node is down"),
            Exclusion::Pinned(n) => write!(f, "pinned to node {n}"),
            Exclusion::Label { key, want } => write!(f, "label {key}={want} does not match"),
            Exclusion::NotInGroup(g) => write!(f, "not a member of restricted HaGroup {g}"),
            Exclusion::Affinity(id) => write!(f, "{id} (affinity) is not on this node"),
            Exclusion::AntiAffinity(id) => write!(f, "{id} (anti-affinity) is on this node"),
            Exclusion::Missing(k, n) => write!(f, "{k} {n} is not on this node"),
            Exclusion::NoData(why) => write!(f, "its data is not on this node ({why})"),
            Exclusion::Capacity { request, free } => write!(
                f,
                "needs {} mCPU and {} bytes, {} mCPU and {} bytes free",
                request.milli_cpus, request.memory_bytes, free.milli_cpus, free.memory_bytes
            ),
        }
    }
}

/// Why a workload has no node: every node and what excluded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unplaceable {
    /// The workload.
    pub id: ResourceId,
    /// Each node and the rules that excluded it (first the hard ones, in rule order).
    pub excluded: BTreeMap<String, Vec<Exclusion>>,
}

impl fmt::Display for Unplaceable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} cannot be placed", self.id)?;
        if self.excluded.is_empty() {
            return write!(f, ": no node is registered");
        }
        for (i, (node, why)) in self.excluded.iter().enumerate() {
            let why: Vec<String> = why.iter().map(ToString::to_string).collect();
            let sep = if i == 0 { ": " } else { "; " };
            write!(f, "{sep}{node}: {}", why.join(", "))?;
        }
        Ok(())
    }
}

/// Everything placement is given.
#[derive(Debug, Clone, Copy)]
pub struct PlacementInput<'a> {
    /// Registered nodes.
    pub nodes: &'a [NodeState],
    /// Workloads of the manifests.
    pub workloads: &'a [Workload],
    /// HA groups by name.
    pub groups: &'a BTreeMap<String, HaGroupSpec>,
    /// Assignments in force, by workload.
    pub current: &'a BTreeMap<ResourceId, Assignment>,
    /// Revision of the manifests (written into new assignments).
    pub revision: &'a str,
}

/// The result of a placement.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlacementResult {
    /// The assignments that should be in force (unchanged ones are the current values).
    pub assignments: BTreeMap<ResourceId, Assignment>,
    /// Workloads no node can take (a workload assigned before keeps its assignment).
    pub unplaceable: Vec<Unplaceable>,
    /// Workloads assigned to a dead node that stay there: not HA, or no node can take them.
    pub unavailable: Vec<ResourceId>,
}

impl PlacementResult {
    /// The writes that turn `current` into these assignments: puts, then deletes.
    pub fn diff(
        &self,
        current: &BTreeMap<ResourceId, Assignment>,
    ) -> (Vec<Assignment>, Vec<ResourceId>) {
        let puts = self
            .assignments
            .iter()
            .filter(|(id, a)| current.get(*id) != Some(*a))
            .map(|(_, a)| a.clone())
            .collect();
        let deletes = current
            .keys()
            .filter(|id| !self.assignments.contains_key(*id))
            .cloned()
            .collect();
        (puts, deletes)
    }
}

/// Places every workload of `input`. See the module documentation for the rules.
pub fn place(input: &PlacementInput<'_>) -> PlacementResult {
    let mut p = Placer::new(input);
    let order = p.order();
    let mut pending = Vec::new();
    for w in &order {
        if !p.keep(w) {
            pending.push(*w);
        }
    }
    for w in pending {
        p.place_one(w);
    }
    p.result
}

/// The placement being built: where each workload is and what each node has left.
struct Placer<'a> {
    input: &'a PlacementInput<'a>,
    nodes: BTreeMap<&'a str, &'a NodeState>,
    location: BTreeMap<&'a ResourceId, String>,
    used: BTreeMap<String, Capacity>,
    /// For each workload, the workloads that name it in their `antiAffinity`.
    anti_by: BTreeMap<ResourceId, Vec<&'a ResourceId>>,
    result: PlacementResult,
}

impl<'a> Placer<'a> {
    fn new(input: &'a PlacementInput<'a>) -> Self {
        let mut anti_by: BTreeMap<ResourceId, Vec<&ResourceId>> = BTreeMap::new();
        for w in input.workloads {
            for a in &w.placement.anti_affinity {
                anti_by.entry(a.clone().into()).or_default().push(&w.id);
            }
        }
        Placer {
            input,
            nodes: input
                .nodes
                .iter()
                .map(|n| (n.info.name.as_str(), n))
                .collect(),
            location: BTreeMap::new(),
            used: BTreeMap::new(),
            anti_by,
            result: PlacementResult::default(),
        }
    }

    /// Workloads in the order they are decided: those a required affinity names come
    /// before the workloads naming them, otherwise by id.
    fn order(&self) -> Vec<&'a Workload> {
        let by_id: BTreeMap<&ResourceId, &Workload> =
            self.input.workloads.iter().map(|w| (&w.id, w)).collect();
        let mut out = Vec::with_capacity(by_id.len());
        let mut done: BTreeSet<&ResourceId> = BTreeSet::new();
        for w in by_id.values() {
            visit(w, &by_id, &mut done, &mut BTreeSet::new(), &mut out);
        }
        out
    }

    /// Keeps `w` where it is assigned, when it should stay. False when it must be
    /// (re)placed.
    fn keep(&mut self, w: &'a Workload) -> bool {
        let Some(cur) = self.input.current.get(&w.id) else {
            return false;
        };
        let alive = self.nodes.get(cur.node.as_str()).is_some_and(|n| n.alive);
        if !alive {
            if w.placement.is_ha() {
                return false;
            }
            self.result.unavailable.push(w.id.clone());
            self.commit(w, &cur.node, Some(cur));
            return true;
        }
        let node = self.nodes[cur.node.as_str()];
        if !self.hard_exclusions(w, node, false).is_empty() || self.fails_back(w, &cur.node) {
            return false;
        }
        self.commit(w, &cur.node, Some(cur));
        true
    }

    /// Whether an HA workload on `node` should move back to a better member of its group
    /// that is alive and can take it.
    fn fails_back(&self, w: &Workload, node: &str) -> bool {
        let Some(group) = self.group(w) else {
            return false;
        };
        if group.no_failback {
            return false;
        }
        let here = group.nodes.get(node).copied().map(i64::from).unwrap_or(-1);
        self.nodes.values().any(|n| {
            group
                .nodes
                .get(n.info.name.as_str())
                .is_some_and(|p| i64::from(*p) > here)
                && self.exclusions(w, n, true).is_empty()
        })
    }

    /// Places `w` on the best node, or reports why none can take it.
    fn place_one(&mut self, w: &'a Workload) {
        let current = self.input.current.get(&w.id);
        let mut best: Option<&'a NodeState> = None;
        let mut excluded = BTreeMap::new();
        for n in self.nodes.values().copied() {
            let moving = current.is_some_and(|c| c.node != n.info.name);
            let why = self.exclusions(w, n, moving);
            if !why.is_empty() {
                excluded.insert(n.info.name.clone(), why);
            } else if best.is_none_or(|b| self.better(w, n, b) == Ordering::Greater) {
                best = Some(n);
            }
        }
        match (best, current) {
            (Some(n), _) => self.commit(w, &n.info.name, None),
            (None, cur) => {
                self.result.unplaceable.push(Unplaceable {
                    id: w.id.clone(),
                    excluded,
                });
                if let Some(cur) = cur {
                    let alive = self.nodes.get(cur.node.as_str()).is_some_and(|n| n.alive);
                    if !alive {
                        self.result.unavailable.push(w.id.clone());
                    }
                    self.commit(w, &cur.node, Some(cur));
                }
            }
        }
    }

    /// Records `w` on `node`: the old assignment when it is unchanged, else a new one.
    fn commit(&mut self, w: &'a Workload, node: &str, old: Option<&Assignment>) {
        let ha = w.placement.is_ha();
        let a = match old.or_else(|| self.input.current.get(&w.id)) {
            Some(o) if o.node == node && o.ha == ha => o.clone(),
            _ => Assignment {
                resource: w.id.to_string(),
                node: node.to_string(),
                ha,
                revision: self.input.revision.to_string(),
            },
        };
        let used = self.used.entry(node.to_string()).or_default();
        used.milli_cpus = used.milli_cpus.saturating_add(w.request.milli_cpus);
        used.memory_bytes = used.memory_bytes.saturating_add(w.request.memory_bytes);
        self.location.insert(&w.id, node.to_string());
        self.result.assignments.insert(w.id.clone(), a);
    }

    fn group(&self, w: &Workload) -> Option<&'a HaGroupSpec> {
        let name = w.placement.ha_group.as_ref()?;
        self.input.groups.get(name.as_str())
    }

    /// Every rule that keeps `w` off `n`: the hard rules, then data and capacity.
    fn exclusions(&self, w: &Workload, n: &NodeState, moving: bool) -> Vec<Exclusion> {
        let mut why = self.hard_exclusions(w, n, moving);
        let free = self.free(n);
        if w.request.milli_cpus > free.milli_cpus || w.request.memory_bytes > free.memory_bytes {
            why.push(Exclusion::Capacity {
                request: w.request,
                free,
            });
        }
        why
    }

    /// The rules that keep `w` off `n` whatever the load: liveness, pin, labels, group,
    /// (anti-)affinity, needs, and when `moving`, where its data is.
    fn hard_exclusions(&self, w: &Workload, n: &NodeState, moving: bool) -> Vec<Exclusion> {
        let mut why = Vec::new();
        let name = n.info.name.as_str();
        if !n.alive {
            why.push(Exclusion::Dead);
        }
        let p = &w.placement;
        if let Some(pin) = &p.node
            && pin.as_str() != name
        {
            why.push(Exclusion::Pinned(pin.to_string()));
        }
        for (key, want) in &p.node_selector {
            if n.info.labels.get(key) != Some(want) {
                why.push(Exclusion::Label {
                    key: key.clone(),
                    want: want.clone(),
                });
            }
        }
        if let (Some(g), Some(spec)) = (&p.ha_group, self.group(w))
            && spec.restricted
            && !spec.nodes.keys().any(|m| m.as_str() == name)
        {
            why.push(Exclusion::NotInGroup(g.to_string()));
        }
        self.affinity_exclusions(w, name, &mut why);
        self.need_exclusions(w, n, &mut why);
        if moving && let Some(reason) = data_elsewhere(&w.data, name) {
            why.push(Exclusion::NoData(reason));
        }
        why
    }

    /// Required affinity (each named workload placed here) and anti-affinity in both
    /// directions (no named workload here, and no workload here naming this one).
    fn affinity_exclusions(&self, w: &Workload, node: &str, why: &mut Vec<Exclusion>) {
        for a in &w.placement.affinity {
            let id: ResourceId = a.clone().into();
            if self.location.get(&id).is_none_or(|n| n != node) {
                why.push(Exclusion::Affinity(id));
            }
        }
        let named = w.placement.anti_affinity.iter().map(|a| a.clone().into());
        let naming = self
            .anti_by
            .get(&w.id)
            .into_iter()
            .flatten()
            .map(|id| (*id).clone());
        let mut seen = BTreeSet::new();
        for id in named.chain(naming) {
            if self.location.get(&id).is_some_and(|n| n == node) && seen.insert(id.clone()) {
                why.push(Exclusion::AntiAffinity(id));
            }
        }
    }

    /// Node-local pools and networks the node does not report.
    fn need_exclusions(&self, w: &Workload, n: &NodeState, why: &mut Vec<Exclusion>) {
        for need in w.needs.iter().filter(|n| !n.cluster_wide) {
            let have = match need.kind {
                Kind::StoragePool => &n.info.pools,
                _ => &n.info.networks,
            };
            if !have.contains(&need.name) {
                why.push(Exclusion::Missing(need.kind, need.name.clone()));
            }
        }
    }

    /// What `n` has left.
    fn free(&self, n: &NodeState) -> Capacity {
        let used = self.used.get(&n.info.name).copied().unwrap_or_default();
        Capacity {
            milli_cpus: n.info.capacity.milli_cpus.saturating_sub(used.milli_cpus),
            memory_bytes: n
                .info
                .capacity
                .memory_bytes
                .saturating_sub(used.memory_bytes),
        }
    }

    /// Compares two eligible nodes for `w`: group priority, preferences, load, name
    /// (`Greater` means `a` is better).
    fn better(&self, w: &Workload, a: &NodeState, b: &NodeState) -> Ordering {
        let prio = |n: &NodeState| {
            self.group(w)
                .and_then(|g| g.nodes.get(n.info.name.as_str()))
                .map_or(-1, |p| i64::from(*p))
        };
        prio(a)
            .cmp(&prio(b))
            .then_with(|| {
                self.preference(w, &a.info.name)
                    .cmp(&self.preference(w, &b.info.name))
            })
            .then_with(|| self.load_after(w, b).cmp(&self.load_after(w, a)))
            .then_with(|| b.info.name.cmp(&a.info.name))
    }

    /// Preferred affinities met on `node` minus preferred anti-affinities met there.
    fn preference(&self, w: &Workload, node: &str) -> i64 {
        let here = |r: &stead_schema::ResourceRef| {
            let id: ResourceId = r.clone().into();
            self.location.get(&id).is_some_and(|n| n == node)
        };
        let p = &w.placement;
        let plus = p.preferred_affinity.iter().filter(|r| here(r)).count();
        let minus = p.preferred_anti_affinity.iter().filter(|r| here(r)).count();
        plus as i64 - minus as i64
    }

    /// The node's load once `w` is on it: the larger of its CPU and memory shares, in
    /// millionths (a node without capacity counts as full).
    fn load_after(&self, w: &Workload, n: &NodeState) -> u64 {
        let used = self.used.get(&n.info.name).copied().unwrap_or_default();
        let share = |used: u64, req: u64, cap: u64| -> u64 {
            if cap == 0 {
                return 1_000_000;
            }
            let total = u128::from(used) + u128::from(req);
            u64::try_from(total * 1_000_000 / u128::from(cap)).unwrap_or(u64::MAX)
        };
        let cap = n.info.capacity;
        share(used.milli_cpus, w.request.milli_cpus, cap.milli_cpus).max(share(
            used.memory_bytes,
            w.request.memory_bytes,
            cap.memory_bytes,
        ))
    }
}

/// Depth-first: `w` after the workloads its required affinity names (a cycle is cut
/// where it closes).
fn visit<'a>(
    w: &'a Workload,
    by_id: &BTreeMap<&ResourceId, &'a Workload>,
    done: &mut BTreeSet<&'a ResourceId>,
    on_path: &mut BTreeSet<&'a ResourceId>,
    out: &mut Vec<&'a Workload>,
) {
    if done.contains(&w.id) || !on_path.insert(&w.id) {
        return;
    }
    for a in &w.placement.affinity {
        let id: ResourceId = a.clone().into();
        if let Some(dep) = by_id.get(&id) {
            visit(dep, by_id, done, on_path, out);
        }
    }
    on_path.remove(&w.id);
    done.insert(&w.id);
    out.push(w);
}

/// Why a workload cannot move to `node` for its data, or `None` when it can.
fn data_elsewhere(data: &DataLocality, node: &str) -> Option<String> {
    match data {
        DataLocality::Anywhere => None,
        DataLocality::Replicated { nodes } if nodes.contains(node) => None,
        DataLocality::Replicated { nodes } => Some(format!(
            "replicas are on {}",
            nodes.iter().cloned().collect::<Vec<_>>().join(", ")
        )),
        DataLocality::Local { volume } => Some(format!(
            "volume {volume} is on a node-local pool without replication"
        )),
    }
}

#[cfg(test)]
mod tests;
