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
