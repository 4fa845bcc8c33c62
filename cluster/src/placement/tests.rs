//! Placement rules, one test each, and the failover and failback cases.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;
use stead_schema::{HaGroupSpec, Placement, ResourceId};

use super::*;

const GI: u64 = 1 << 30;

fn node(name: &str, labels: &[(&str, &str)]) -> NodeState {
    NodeState {
        info: NodeInfo {
            name: name.into(),
            address: format!("{name}:7443"),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            capacity: Capacity {
                milli_cpus: 4000,
                memory_bytes: 8 * GI,
            },
            pools: vec![],
            networks: vec![],
            version: "test".into(),
            replication_port: 7443,
        },
        alive: true,
    }
}

fn dead(mut n: NodeState) -> NodeState {
    n.alive = false;
    n
}

fn id(s: &str) -> ResourceId {
    s.parse().expect("id")
}

/// A workload asking 1 CPU and 1Gi, with the placement `p` (JSON).
fn wl(name: &str, p: serde_json::Value) -> Workload {
    Workload {
        id: id(name),
        request: Capacity {
            milli_cpus: 1000,
            memory_bytes: GI,
        },
        placement: serde_json::from_value::<Placement>(p).expect("placement"),
        needs: vec![],
        data: DataLocality::Anywhere,
    }
}

fn group(nodes: &[(&str, u32)], restricted: bool, no_failback: bool) -> HaGroupSpec {
    serde_json::from_value(json!({
        "nodes": nodes.iter().map(|(n, p)| (n.to_string(), *p)).collect::<BTreeMap<_, _>>(),
        "restricted": restricted,
        "noFailback": no_failback,
    }))
    .expect("group")
}

/// Places with the given current assignments (`Kind/name` → node).
struct Case {
    nodes: Vec<NodeState>,
    workloads: Vec<Workload>,
    groups: BTreeMap<String, HaGroupSpec>,
    current: BTreeMap<ResourceId, Assignment>,
}

impl Case {
    fn new(nodes: Vec<NodeState>, workloads: Vec<Workload>) -> Self {
        Case {
            nodes,
            workloads,
            groups: BTreeMap::new(),
            current: BTreeMap::new(),
        }
    }

    fn group(mut self, name: &str, g: HaGroupSpec) -> Self {
        self.groups.insert(name.into(), g);
        self
    }

    fn at(mut self, current: &[(&str, &str)]) -> Self {
        for (w, n) in current {
            let ha = self
                .workloads
                .iter()
                .find(|x| x.id == id(w))
                .is_some_and(|x| x.placement.is_ha());
            self.current.insert(
                id(w),
                Assignment {
                    resource: w.to_string(),
                    node: n.to_string(),
                    ha,
                    revision: "r0".into(),
                },
            );
        }
        self
    }

    fn run(&self) -> PlacementResult {
        place(&PlacementInput {
            nodes: &self.nodes,
            workloads: &self.workloads,
            groups: &self.groups,
            current: &self.current,
            revision: "r1",
        })
    }

    /// `Kind/name=node` for every assignment.
    fn placed(&self) -> Vec<String> {
        placed(&self.run())
    }
}

fn placed(r: &PlacementResult) -> Vec<String> {
    r.assignments
        .iter()
        .map(|(id, a)| format!("{id}={}", a.node))
        .collect()
}

fn reasons(r: &PlacementResult) -> Vec<String> {
    r.unplaceable.iter().map(ToString::to_string).collect()
}

fn three() -> Vec<NodeState> {
    vec![node("n1", &[]), node("n2", &[]), node("n3", &[])]
}

#[test]
fn load_spreads_and_ties_go_to_the_first_name() {
    let c = Case::new(
        three(),
        ["Container/a", "Container/b", "Container/c", "Container/d"]
            .map(|n| wl(n, json!({})))
            .to_vec(),
    );
    assert_eq!(
        c.placed(),
        [
            "Container/a=n1",
            "Container/b=n2",
            "Container/c=n3",
            "Container/d=n1"
        ]
    );
}

#[test]
fn node_selector_keeps_to_matching_labels() {
    let nodes = vec![node("n1", &[("zone", "a")]), node("n2", &[("zone", "b")])];
    let c = Case::new(
        nodes,
        vec![
            wl("Container/a", json!({"nodeSelector": {"zone": "b"}})),
            wl("Container/b", json!({"nodeSelector": {"zone": "b"}})),
            wl("Container/c", json!({"nodeSelector": {"zone": "c"}})),
        ],
    );
    let r = c.run();
    assert_eq!(placed(&r), ["Container/a=n2", "Container/b=n2"]);
    assert_eq!(
        reasons(&r),
        [
            "Container/c cannot be placed: n1: label zone=c does not match; n2: label zone=c does not match"
        ]
    );
}

#[test]
fn a_pin_is_the_only_node() {
    let c = Case::new(three(), vec![wl("Container/a", json!({"node": "n3"}))]);
    assert_eq!(c.placed(), ["Container/a=n3"]);
    let c = Case::new(three(), vec![wl("Container/a", json!({"node": "n9"}))]);
    assert_eq!(
        reasons(&c.run()),
        [
            "Container/a cannot be placed: n1: pinned to node n9; n2: pinned to node n9; n3: pinned to node n9"
        ]
    );
}

#[test]
fn anti_affinity_is_hard_and_symmetric() {
    // b names a; a names nothing, yet a never joins b (placed in id order: a first, on n1).
    let c = Case::new(
        vec![node("n1", &[]), node("n2", &[])],
        vec![
            wl("Container/a", json!({})),
            wl("Container/b", json!({"antiAffinity": ["Container/a"]})),
            wl(
                "Container/c",
                json!({"antiAffinity": ["Container/a", "Container/b"]}),
            ),
        ],
    )
    .at(&[("Container/b", "n2")]);
    let r = c.run();
    assert_eq!(placed(&r), ["Container/a=n1", "Container/b=n2"]);
    assert_eq!(
        reasons(&r),
        [
            "Container/c cannot be placed: n1: Container/a (anti-affinity) is on this node; n2: Container/b (anti-affinity) is on this node"
        ]
    );
    // Symmetry: z is placed after y and names nothing, but y names z.
    let c = Case::new(
        vec![node("n1", &[]), node("n2", &[])],
        vec![
            wl("Container/y", json!({"antiAffinity": ["Container/z"]})),
            wl("Container/z", json!({})),
        ],
    )
    .at(&[("Container/y", "n2")]);
    assert_eq!(c.placed(), ["Container/y=n2", "Container/z=n1"]);
}

#[test]
fn affinity_follows_its_target_whatever_the_order_and_load() {
    let c = Case::new(
        three(),
        vec![
            wl("Container/a", json!({"affinity": ["VirtualMachine/z"]})),
            wl("Container/b", json!({})),
            wl("VirtualMachine/z", json!({})),
        ],
    )
    .at(&[("Container/b", "n1")]);
    // z goes first (a needs it) to n2, the least loaded; a joins it although n3 is empty.
    assert_eq!(
        c.placed(),
        ["Container/a=n2", "Container/b=n1", "VirtualMachine/z=n2"]
    );
}

#[test]
fn preferences_rank_the_nodes_left() {
    let c = Case::new(
        three(),
        vec![
            wl("Container/a", json!({})),
            wl("Container/b", json!({"preferredAffinity": ["Container/a"]})),
            wl(
                "Container/c",
                json!({"preferredAntiAffinity": ["Container/a"]}),
            ),
        ],
    )
    .at(&[("Container/a", "n3")]);
    assert_eq!(
        c.placed(),
        ["Container/a=n3", "Container/b=n3", "Container/c=n1"]
    );
}

#[test]
fn requests_add_up_to_the_capacity() {
    let mut big = wl("VirtualMachine/big", json!({}));
    big.request.memory_bytes = 6 * GI;
    let mut huge = wl("VirtualMachine/huge", json!({}));
    huge.request.milli_cpus = 5000;
    let c = Case::new(
        vec![node("n1", &[])],
        vec![
            wl("Container/a", json!({})),
            wl("Container/b", json!({})),
            big,
            huge,
        ],
    );
    let r = c.run();
    assert_eq!(
        placed(&r),
        ["Container/a=n1", "Container/b=n1", "VirtualMachine/big=n1"]
    );
    assert_eq!(
        reasons(&r),
        [format!(
            "VirtualMachine/huge cannot be placed: n1: needs 5000 mCPU and {GI} bytes, 1000 mCPU and 0 bytes free"
        )]
    );
}

#[test]
fn node_local_pools_and_networks_must_be_reported() {
    let mut n2 = node("n2", &[]);
    n2.info.pools = vec!["fast".into()];
    n2.info.networks = vec!["uplink".into()];
    let mut a = wl("Container/a", json!({}));
    a.needs = vec![
        Need {
            kind: Kind::StoragePool,
            name: "fast".into(),
            cluster_wide: false,
        },
        Need {
            kind: Kind::Network,
            name: "lan0".into(),
            cluster_wide: true,
        },
    ];
    let mut b = wl("Container/b", json!({}));
    b.needs = vec![Need {
        kind: Kind::Network,
        name: "uplink".into(),
        cluster_wide: false,
    }];
    let c = Case::new(vec![node("n1", &[]), n2], vec![a, b]);
    assert_eq!(c.placed(), ["Container/a=n2", "Container/b=n2"]);
}

#[test]
fn a_placed_workload_stays_and_keeps_its_assignment() {
    let c = Case::new(
        three(),
        ["Container/a", "Container/b"]
            .map(|n| wl(n, json!({})))
            .to_vec(),
    )
    .at(&[("Container/a", "n1"), ("Container/b", "n1")]);
    let r = c.run();
    assert_eq!(placed(&r), ["Container/a=n1", "Container/b=n1"]);
    assert_eq!(r.diff(&c.current), (vec![], vec![]), "nothing to write");
    assert!(r.assignments.values().all(|a| a.revision == "r0"));
}

#[test]
fn a_dead_node_moves_ha_workloads_and_strands_the_others() {
    let c = Case::new(
        vec![dead(node("n1", &[])), node("n2", &[]), node("n3", &[])],
        vec![
            wl("Container/ha", json!({"ha": true})),
            wl("Container/plain", json!({})),
        ],
    )
    .at(&[("Container/ha", "n1"), ("Container/plain", "n1")]);
    let r = c.run();
    assert_eq!(placed(&r), ["Container/ha=n2", "Container/plain=n1"]);
    assert_eq!(r.unavailable, [id("Container/plain")]);
    assert!(r.unplaceable.is_empty());
    let (puts, deletes) = r.diff(&c.current);
    assert_eq!(
        puts,
        [Assignment {
            resource: "Container/ha".into(),
            node: "n2".into(),
            ha: true,
            revision: "r1".into(),
        }]
    );
    assert!(deletes.is_empty());
}

#[test]
fn an_ha_group_picks_its_highest_priority_alive_member() {
    let g = group(&[("n1", 1), ("n2", 3), ("n3", 2)], false, false);
    let w = vec![wl("Container/a", json!({"haGroup": "prod"}))];
    let c = Case::new(three(), w.clone()).group("prod", g.clone());
    assert_eq!(c.placed(), ["Container/a=n2"]);
    // n2 dies: failover to n3 (priority 2), not to the less loaded n1.
    let c = Case::new(
        vec![node("n1", &[]), dead(node("n2", &[])), node("n3", &[])],
        w,
    )
    .group("prod", g)
    .at(&[("Container/a", "n2")]);
    assert_eq!(c.placed(), ["Container/a=n3"]);
}

#[test]
fn a_restricted_group_stays_inside_and_an_open_one_falls_back() {
    let nodes = vec![dead(node("n1", &[])), node("n2", &[])];
    let w = vec![wl("Container/a", json!({"haGroup": "g"}))];
    let c = Case::new(nodes.clone(), w.clone())
        .group("g", group(&[("n1", 1)], true, false))
        .at(&[("Container/a", "n1")]);
    let r = c.run();
    assert_eq!(placed(&r), ["Container/a=n1"], "stays assigned to n1");
    assert_eq!(r.unavailable, [id("Container/a")]);
    assert_eq!(
        reasons(&r),
        [
            "Container/a cannot be placed: n1: node is down; n2: not a member of restricted HaGroup g"
        ]
    );
    let c = Case::new(nodes, w)
        .group("g", group(&[("n1", 1)], false, false))
        .at(&[("Container/a", "n1")]);
    assert_eq!(c.placed(), ["Container/a=n2"]);
}

#[test]
fn a_returning_member_takes_its_workload_back_unless_nofailback() {
    let w = vec![wl("Container/a", json!({"haGroup": "g"}))];
    let back = Case::new(three(), w.clone())
        .group("g", group(&[("n1", 2), ("n2", 1)], false, false))
        .at(&[("Container/a", "n2")]);
    assert_eq!(back.placed(), ["Container/a=n1"]);
    let stay = Case::new(three(), w)
        .group("g", group(&[("n1", 2), ("n2", 1)], false, true))
        .at(&[("Container/a", "n2")]);
    assert_eq!(stay.placed(), ["Container/a=n2"]);
}

#[test]
fn data_decides_where_a_workload_may_move() {
    let nodes = vec![dead(node("n1", &[])), node("n2", &[]), node("n3", &[])];
    let mut rep = wl("Container/rep", json!({"ha": true}));
    rep.data = DataLocality::Replicated {
        nodes: BTreeSet::from(["n3".to_string()]),
    };
    let mut local = wl("Container/local", json!({"ha": true}));
    local.data = DataLocality::Local {
        volume: "data".into(),
    };
    let c = Case::new(nodes, vec![rep, local])
        .at(&[("Container/rep", "n1"), ("Container/local", "n1")]);
    let r = c.run();
    assert_eq!(placed(&r), ["Container/local=n1", "Container/rep=n3"]);
    assert_eq!(
        reasons(&r),
        [
            "Container/local cannot be placed: n1: node is down; n2: its data is not on this node (volume data is on a node-local pool without replication); n3: its data is not on this node (volume data is on a node-local pool without replication)"
        ]
    );
    assert_eq!(r.unavailable, [id("Container/local")]);
}

#[test]
fn a_broken_hard_rule_moves_a_workload_on_a_live_node() {
    let c = Case::new(
        vec![node("n1", &[]), node("n2", &[("ssd", "yes")])],
        vec![wl("Container/a", json!({"nodeSelector": {"ssd": "yes"}}))],
    )
    .at(&[("Container/a", "n1")]);
    assert_eq!(c.placed(), ["Container/a=n2"]);
    // No node fits: it stays where it runs, and the reason is reported.
    let c = Case::new(
        vec![node("n1", &[])],
        vec![wl("Container/a", json!({"nodeSelector": {"ssd": "yes"}}))],
    )
    .at(&[("Container/a", "n1")]);
    let r = c.run();
    assert_eq!(placed(&r), ["Container/a=n1"]);
    assert_eq!(r.unplaceable.len(), 1);
    assert!(r.unavailable.is_empty());
}

#[test]
fn a_workload_gone_from_the_manifests_loses_its_assignment() {
    let c = Case::new(three(), vec![wl("Container/a", json!({}))])
        .at(&[("Container/a", "n1"), ("Container/gone", "n2")]);
    let r = c.run();
    assert_eq!(r.diff(&c.current), (vec![], vec![id("Container/gone")]));
}

#[test]
fn no_node_at_all_is_said_plainly() {
    let c = Case::new(vec![], vec![wl("Container/a", json!({}))]);
    assert_eq!(
        reasons(&c.run()),
        ["Container/a cannot be placed: no node is registered"]
    );
}

#[test]
fn the_result_does_not_depend_on_input_order() {
    let ws: Vec<Workload> = (0..30)
        .map(|i| {
            wl(
                &format!("Container/w{i:02}"),
                json!({"preferredAntiAffinity": [format!("Container/w{:02}", (i + 1) % 30)]}),
            )
        })
        .collect();
    let a = Case::new(three(), ws.clone()).run();
    let mut rev = ws;
    rev.reverse();
    let mut nodes = three();
    nodes.reverse();
    let b = Case::new(nodes, rev).run();
    assert_eq!(a, b);
}

/// Placement of 1,000 workloads on 3 nodes, from scratch and again with every workload
/// placed (the steady state). Run with
/// `cargo test -p stead-cluster --release -- --ignored --nocapture bench_place`.
#[test]
#[ignore = "benchmark"]
fn bench_place_1000_workloads_on_3_nodes() {
    let mut nodes = three();
    for n in &mut nodes {
        n.info.capacity = Capacity {
            milli_cpus: 1_000_000,
            memory_bytes: 1 << 50,
        };
    }
    let ws: Vec<Workload> = (0..1000)
        .map(|i| {
            let p = match i % 4 {
                0 => json!({"antiAffinity": [format!("Container/w{:04}", (i + 1) % 1000)]}),
                1 => json!({"preferredAffinity": [format!("Container/w{:04}", i - 1)], "ha": true}),
                2 => json!({"haGroup": "g"}),
                _ => json!({}),
            };
            wl(&format!("Container/w{i:04}"), p)
        })
        .collect();
    let mut c = Case::new(nodes, ws).group("g", group(&[("n1", 2), ("n2", 1)], false, false));
    let t = std::time::Instant::now();
    let first = c.run();
    let cold = t.elapsed();
    assert_eq!(first.assignments.len(), 1000, "{:?}", reasons(&first));
    c.current = first.assignments.clone();
    let t = std::time::Instant::now();
    let again = c.run();
    let warm = t.elapsed();
    assert_eq!(again.diff(&c.current), (vec![], vec![]));
    println!(
        "placement of 1000 workloads on 3 nodes: from scratch {cold:?}, steady state {warm:?}"
    );
}

/// examples/cluster on its three nodes: the webs spread, the database and its cache on
/// pve1; when pve1 dies, both fail over to the replica node pve2, and the third web has
/// nowhere to go (its anti-affinity leaves no node).
#[test]
fn the_cluster_example_places_and_fails_over() {
    // The runtime value: a test binary reused from a shared target dir may have been
    // compiled in another checkout.
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
        .join("../examples/cluster");
    let desired = stead_schema::load_and_validate(&[dir]).expect("examples/cluster validates");
    let big = |mut n: NodeState, pools: &[&str]| {
        n.info.capacity = Capacity {
            milli_cpus: 8000,
            memory_bytes: 16 * GI,
        };
        n.info.pools = pools.iter().map(|p| p.to_string()).collect();
        n
    };
    let mut nodes = vec![
        big(node("pve1", &[("zone", "a"), ("disk", "ssd")]), &["fast"]),
        big(node("pve2", &[("zone", "b"), ("disk", "ssd")]), &["fast"]),
        big(node("pve3", &[("zone", "b")]), &[]),
    ];
    let mut c = Case::new(nodes.clone(), workloads(&desired));
    c.groups = ha_groups(&desired);
    let first = c.run();
    assert!(first.unplaceable.is_empty(), "{:?}", reasons(&first));
    let on = |r: &PlacementResult, w: &str| r.assignments[&id(w)].node.clone();
    assert_eq!(on(&first, "VirtualMachine/db"), "pve1");
    assert_eq!(on(&first, "Container/cache"), "pve1");
    assert_ne!(on(&first, "Container/batch"), "pve1", "zone b");
    let webs: BTreeSet<String> = ["Container/web1", "Container/web2", "Container/web3"]
        .iter()
        .map(|w| on(&first, w))
        .collect();
    assert_eq!(webs.len(), 3, "{:?}", placed(&first));

    nodes[0].alive = false;
    c.nodes = nodes;
    c.current = first.assignments.clone();
    let after = c.run();
    assert_eq!(on(&after, "VirtualMachine/db"), "pve2");
    assert_eq!(on(&after, "Container/cache"), "pve2");
    let stranded: Vec<String> = after.unplaceable.iter().map(|u| u.id.to_string()).collect();
    let web_on_pve1 = ["Container/web1", "Container/web2", "Container/web3"]
        .into_iter()
        .find(|w| on(&first, w) == "pve1")
        .expect("a web on pve1");
    assert_eq!(stranded, [web_on_pve1]);
    assert_eq!(after.unavailable, [id(web_on_pve1)]);
}

/// A container on `web` using volume `data` (btrfs pool `fast`) replicated to n2, HA.
fn replicated_web() -> stead_schema::Desired {
    use crate::test_yaml::{desired, doc};
    let yaml = doc("StoragePool", "fast", "{type: btrfs, path: /f}")
        + &doc(
            "Volume",
            "data",
            "{pool: fast, size: 1Gi, replication: {to: n2, every: 1m}}",
        )
        + &doc(
            "Container",
            "web",
            "{rootfs: {path: /r}, mounts: [{volume: data, path: /d}], placement: {ha: true}}",
        );
    desired(&yaml)
}

/// After a failover n1 → n2 the volume replicates back to n1: once a transfer back
/// succeeded, n1 holds a replica and is where the workload goes when n2 dies; while the
/// failover is recorded and nothing was sent back (n1's copy is the stale one), it is not.
#[test]
fn the_previous_owner_holding_the_replica_sent_back_is_a_failover_target() {
    use crate::replication::{FailoverRecord, ReplicationStatus};
    let desired = replicated_web();
    let with_pool = |mut n: NodeState| {
        n.info.pools = vec!["fast".into()];
        n
    };
    let nodes = vec![
        with_pool(node("n1", &[])),
        dead(with_pool(node("n2", &[]))),
        with_pool(node("n3", &[])),
    ];
    let failed_over = ReplicationStatus {
        from: "n2".into(),
        to: "n1".into(),
        seq: Some(4),
        last_point: Some(1000),
        failover: Some(FailoverRecord {
            node: "n2".into(),
            at: 1010,
            seq: 4,
            point: 1000,
            window_s: 10,
        }),
        ..Default::default()
    };
    let sent_back = ReplicationStatus {
        seq: Some(5),
        last_point: Some(1020),
        failover: None,
        ..failed_over.clone()
    };
    let run = |statuses: &ReplicaStatuses| {
        let mut c = Case::new(nodes.clone(), workloads_with_replicas(&desired, statuses));
        c = c.at(&[("Container/web", "n2")]);
        c.run()
    };

    // Nothing sent back yet: only `to` (n2, dead) holds the data.
    let r = run(&BTreeMap::from([("data".to_string(), failed_over)]));
    assert!(
        r.assignments
            .get(&id("Container/web"))
            .is_none_or(|a| a.node == "n2")
    );
    assert_eq!(r.unavailable, [id("Container/web")]);
    assert!(
        reasons(&r)
            .iter()
            .any(|why| why.contains("replicas are on n2")),
        "{:?}",
        reasons(&r)
    );

    // The replica sent back: n1 holds it, n3 does not.
    let statuses = BTreeMap::from([("data".to_string(), sent_back)]);
    let w = workloads_with_replicas(&desired, &statuses);
    assert_eq!(
        w[0].data,
        DataLocality::Replicated {
            nodes: BTreeSet::from(["n1".to_string(), "n2".to_string()])
        }
    );
    let r = run(&statuses);
    assert_eq!(placed(&r), ["Container/web=n1"]);
    assert!(r.unplaceable.is_empty(), "{:?}", reasons(&r));
    // Without statuses (the manifests alone) nothing changed.
    assert_eq!(
        workloads(&desired)[0].data,
        DataLocality::Replicated {
            nodes: BTreeSet::from(["n2".to_string()])
        }
    );
}
