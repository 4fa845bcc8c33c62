//! The dependency graph: references and `dependsOn` as edges, cycle paths, waves.

use std::collections::{BTreeMap, BTreeSet};

use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};

use crate::resource::{Kind, Resource, ResourceId, Spec};

/// An edge `from` depends on `to`, with the JSON pointer of the referencing field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edge {
    /// The dependent.
    pub from: ResourceId,
    /// The dependency.
    pub to: ResourceId,
    /// Where in `from` the reference is written.
    pub pointer: String,
}

/// All dependency edges of a set of resources. Edges to unknown resources are kept
/// (validation reports them as dangling); implicit edges (a Network port that names a
/// Bond) are added when the target exists.
pub fn edges<'a>(resources: impl Iterator<Item = &'a Resource> + Clone) -> Vec<Edge> {
    let bonds: BTreeSet<&str> = resources
        .clone()
        .filter(|r| r.id.kind == Kind::Bond)
        .map(|r| r.id.name.as_str())
        .collect();
    let mut out = Vec::new();
    for r in resources {
        for (to, pointer) in r.spec.references() {
            out.push(Edge {
                from: r.id.clone(),
                to,
                pointer,
            });
        }
        if let Spec::Network(n) = &r.spec {
            for (i, p) in n.ports.iter().enumerate() {
                if bonds.contains(p.as_str()) {
                    out.push(Edge {
                        from: r.id.clone(),
                        to: ResourceId::new(Kind::Bond, p.as_str()),
                        pointer: format!("/spec/ports/{i}"),
                    });
                }
            }
        }
    }
    out
}

/// A dependency graph over a set of ids.
#[derive(Debug, Default)]
pub struct DepGraph {
    graph: DiGraph<ResourceId, ()>,
    index: BTreeMap<ResourceId, NodeIndex>,
}

impl DepGraph {
    /// Builds the graph over `ids`; edges whose ends are not both in `ids` are ignored.
    pub fn new(ids: impl IntoIterator<Item = ResourceId>, edges: &[Edge]) -> Self {
        let mut g = DepGraph::default();
        for id in ids {
            let n = g.graph.add_node(id.clone());
            g.index.insert(id, n);
        }
        for e in edges {
            if let (Some(&a), Some(&b)) = (g.index.get(&e.to), g.index.get(&e.from)) {
                // dependency -> dependent
                g.graph.update_edge(a, b, ());
            }
        }
        g
    }

    /// Every cycle, each as a path `a -> b -> … -> a` of ids.
    pub fn cycles(&self) -> Vec<Vec<ResourceId>> {
        let mut out = Vec::new();
        for scc in tarjan_scc(&self.graph) {
            let self_loop = scc.len() == 1 && self.graph.contains_edge(scc[0], scc[0]);
            if scc.len() < 2 && !self_loop {
                continue;
            }
            let members: BTreeSet<NodeIndex> = scc.iter().copied().collect();
            // Start at the smallest id for a stable message, then walk a cycle inside the SCC.
            let Some(&start) = scc.iter().min_by_key(|n| &self.graph[**n]) else {
                continue;
            };
            if let Some(path) = self.find_cycle(start, &members) {
                // `path` follows dependency -> dependent edges from `start`; "depends on"
                // order is start, then the path backwards, then start again.
                let mut ids = vec![self.graph[start].clone()];
                ids.extend(path.iter().skip(1).rev().map(|n| self.graph[*n].clone()));
                ids.push(self.graph[start].clone());
                out.push(ids);
            }
        }
        out
    }

    fn find_cycle(
        &self,
        start: NodeIndex,
        members: &BTreeSet<NodeIndex>,
    ) -> Option<Vec<NodeIndex>> {
        // Iterative DFS for a path start -> … -> start.
        let mut stack = vec![(start, vec![start])];
        let mut seen = BTreeSet::new();
        while let Some((n, path)) = stack.pop() {
            for next in self.graph.neighbors(n) {
                if next == start {
                    return Some(path);
                }
                if members.contains(&next) && seen.insert(next) {
                    let mut p = path.clone();
                    p.push(next);
                    stack.push((next, p));
                }
            }
        }
        None
    }

    /// Topological waves: wave 0 has no dependencies inside the set, wave k depends only
    /// on earlier waves. Nodes in cycles are left out (validation rejects cycles).
    pub fn waves(&self) -> Vec<Vec<ResourceId>> {
        let n = self.graph.node_count();
        let mut indeg: Vec<usize> = vec![0; n];
        for e in self.graph.edge_indices() {
            if let Some((_, b)) = self.graph.edge_endpoints(e) {
                indeg[b.index()] += 1;
            }
        }
        let mut current: Vec<NodeIndex> = self
            .graph
            .node_indices()
            .filter(|i| indeg[i.index()] == 0)
            .collect();
        let mut waves = Vec::new();
        while !current.is_empty() {
            let mut next = Vec::new();
            for &i in &current {
                for m in self.graph.neighbors(i) {
                    indeg[m.index()] -= 1;
                    if indeg[m.index()] == 0 {
                        next.push(m);
                    }
                }
            }
            let mut wave: Vec<ResourceId> =
                current.iter().map(|i| self.graph[*i].clone()).collect();
            wave.sort();
            waves.push(wave);
            current = next;
        }
        waves
    }

    /// Direct and transitive dependents of `id` inside the graph.
    pub fn dependents(&self, id: &ResourceId) -> BTreeSet<ResourceId> {
        let mut out = BTreeSet::new();
        let Some(&start) = self.index.get(id) else {
            return out;
        };
        let mut stack = vec![start];
        while let Some(n) = stack.pop() {
            for m in self.graph.neighbors(n) {
                if out.insert(self.graph[m].clone()) {
                    stack.push(m);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(kind: Kind, name: &str) -> ResourceId {
        ResourceId::new(kind, name)
    }

    fn net(name: &str) -> ResourceId {
        id(Kind::Network, name)
    }

    /// `from` depends on `to`.
    fn edge(from: &ResourceId, to: &ResourceId) -> Edge {
        Edge {
            from: from.clone(),
            to: to.clone(),
            pointer: "/spec/dependsOn/0".into(),
        }
    }

    #[test]
    fn waves_put_dependencies_first_and_sort_each_wave() {
        let (a, b, c, d) = (net("a"), net("b"), net("c"), net("d"));
        // d -> b -> a, c -> a; d also -> c.
        let edges = [edge(&d, &b), edge(&b, &a), edge(&c, &a), edge(&d, &c)];
        let g = DepGraph::new([d.clone(), c.clone(), b.clone(), a.clone()], &edges);
        assert_eq!(
            g.waves(),
            [vec![a.clone()], vec![b.clone(), c.clone()], vec![d.clone()]]
        );
        assert_eq!(g.dependents(&a), [b, c, d].into());
        assert!(g.cycles().is_empty());
    }

    #[test]
    fn edges_to_ids_outside_the_set_are_ignored() {
        let (a, b) = (net("a"), net("b"));
        let g = DepGraph::new([a.clone()], &[edge(&a, &b)]);
        assert_eq!(g.waves(), [vec![a.clone()]]);
        assert!(g.dependents(&b).is_empty());
    }

    #[test]
    fn cycles_are_reported_from_their_smallest_id_and_left_out_of_the_waves() {
        let (a, b, c, z) = (net("a"), net("b"), net("c"), net("z"));
        // a -> b -> c -> a is a cycle; z depends on nothing; self-loop on z is one too.
        let edges = [edge(&a, &b), edge(&b, &c), edge(&c, &a)];
        let g = DepGraph::new([c.clone(), b.clone(), a.clone(), z.clone()], &edges);
        assert_eq!(
            g.cycles(),
            [vec![a.clone(), b.clone(), c.clone(), a.clone()]]
        );
        assert_eq!(g.waves(), [vec![z.clone()]]);

        let g = DepGraph::new([z.clone()], &[edge(&z, &z)]);
        assert_eq!(g.cycles(), [vec![z.clone(), z.clone()]]);
    }

    #[test]
    fn edges_come_from_references_depends_on_and_bond_ports() {
        let yaml = "---
apiVersion: stead.dev/v1alpha1
kind: Bond
metadata: {name: bond0}
spec: {mode: active-backup, slaves: [eth0]}
---
apiVersion: stead.dev/v1alpha1
kind: Network
metadata: {name: lan0}
spec: {ports: [bond0, eth9], dependsOn: [Network/wan]}
---
apiVersion: stead.dev/v1alpha1
kind: Volume
metadata: {name: data}
spec: {pool: local, size: 1Mi}
";
        let mut resources = Vec::new();
        let mut errors = Vec::new();
        crate::load::load_str(
            std::path::Path::new("m.yaml"),
            yaml,
            &mut resources,
            &mut errors,
        );
        assert!(errors.is_empty(), "{errors:?}");
        let mut found: Vec<(String, String, String)> = edges(resources.iter())
            .into_iter()
            .map(|e| (e.from.to_string(), e.to.to_string(), e.pointer))
            .collect();
        found.sort();
        assert_eq!(
            found,
            [
                (
                    "Network/lan0".to_string(),
                    "Bond/bond0".to_string(),
                    "/spec/ports/0".to_string()
                ),
                (
                    "Network/lan0".to_string(),
                    "Network/wan".to_string(),
                    "/spec/dependsOn/0".to_string()
                ),
                (
                    "Volume/data".to_string(),
                    "StoragePool/local".to_string(),
                    "/spec/pool".to_string()
                ),
            ]
        );
    }
}
