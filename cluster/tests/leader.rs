//! The controller's leader loop against a real etcd on loopback: placement written as
//! assignments, node departures followed, manifest changes followed, a clean step-down and
//! a takeover by the next candidate whose predecessor's token is fenced.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use stead_cluster::election::{self, current_leader};
use stead_cluster::etcd::{Store, StoreError};
use stead_cluster::leader::{self, LeaderConfig, LeaderStatus, Manifests};
use stead_cluster::migrate::{self, MigrationMode, MigrationRecord, MigrationState};
use stead_cluster::model::{Assignment, Capacity, NodeInfo};
use stead_cluster::registry::{LeaseConfig, Registration};
use stead_cluster::testkit::member_with_store;
use stead_schema::Desired;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep};

fn node(name: &str) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        address: format!("127.0.0.1:{}", 7000),
        labels: BTreeMap::from([("zone".to_string(), name.to_string())]),
        capacity: Capacity {
            milli_cpus: 4000,
            memory_bytes: 8 << 30,
        },
        pools: vec![],
        networks: vec![],
        version: "test".into(),
        replication_port: 7443,
    }
}

async fn register(store: &Store, name: &str) -> Registration {
    Registration::register(
        store,
        &node(name),
        LeaseConfig::with_ttl(Duration::from_secs(2)),
    )
    .await
    .expect("register")
}

/// Manifests: containers `names`, each with the placement `placement` (YAML flow).
fn manifests(revision: &str, workloads: &[(&str, &str)]) -> Arc<Manifests> {
    let mut text = String::new();
    for (name, placement) in workloads {
        text.push_str(&format!(
            "---\napiVersion: stead.dev/v1alpha1\nkind: Container\nmetadata: {{name: {name}}}\n\
             spec: {{rootfs: {{path: /srv/r}}, resources: {{cpus: 1, memory: 1Gi}}, placement: {placement}}}\n"
        ));
    }
    let mut resources = Vec::new();
    let mut errors = Vec::new();
    stead_schema::load::load_str(Path::new("m.yaml"), &text, &mut resources, &mut errors);
    let desired: Desired = stead_schema::load::into_desired(resources, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    Arc::new(Manifests {
        desired,
        revision: revision.into(),
    })
}

/// A running leader loop and its handles.
struct Candidate {
    status: watch::Receiver<LeaderStatus>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<Result<(), leader::LeaderError>>,
}

impl Drop for Candidate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn candidate(
    store: &Store,
    name: &str,
    manifests: watch::Receiver<Option<Arc<Manifests>>>,
) -> Candidate {
    let mut config = LeaderConfig::new(name, Duration::from_secs(2));
    config.settle = Duration::ZERO;
    let (status_tx, status) = watch::channel(LeaderStatus::default());
    let (shutdown, shutdown_rx) = watch::channel(false);
    let store = store.clone();
    let task = tokio::spawn(async move {
        leader::run(&store, &config, manifests, status_tx, shutdown_rx).await
    });
    Candidate {
        status,
        shutdown,
        task,
    }
}

/// Assignments in etcd as `name=node`, sorted.
async fn assignments(store: &Store) -> Vec<String> {
    let (list, _) = election::list_assignments(store).await.expect("list");
    let mut out: Vec<String> = list
        .iter()
        .map(|a| format!("{}={}", a.resource, a.node))
        .collect();
    out.sort();
    out
}

/// Waits up to 15 s for `check` on the assignments in etcd.
async fn wait_for(store: &Store, what: &str, check: impl Fn(&[String]) -> bool) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = assignments(store).await;
        if check(&now) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {now:?}"
        );
        sleep(Duration::from_millis(50)).await;
    }
}

fn node_of(list: &[String], resource: &str) -> Option<String> {
    list.iter()
        .find_map(|l| l.strip_prefix(&format!("{resource}=")))
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_places_and_follows_nodes_and_manifests() {
    let Some((_etcd, store)) = member_with_store(
        "the_leader_places_and_follows_nodes_and_manifests",
        "/leader-test",
    )
    .await
    else {
        return;
    };
    let n1 = register(&store, "n1").await;
    let _n2 = register(&store, "n2").await;
    let _n3 = register(&store, "n3").await;
    let anti = |others: &[&str]| {
        let list: Vec<String> = others.iter().map(|o| format!("Container/{o}")).collect();
        format!("{{antiAffinity: [{}], ha: true}}", list.join(", "))
    };
    let first = manifests(
        "r1",
        &[
            ("a", &anti(&["b", "c"])),
            ("b", &anti(&["a", "c"])),
            ("c", &anti(&["a", "b"])),
            ("pinned", "{node: n1}"),
        ],
    );
    let (manifests_tx, manifests_rx) = watch::channel(Some(first));
    let c = candidate(&store, "ctl1", manifests_rx);

    let placed = wait_for(&store, "four assignments", |l| l.len() == 4).await;
    assert_eq!(
        placed,
        [
            "Container/a=n1",
            "Container/b=n2",
            "Container/c=n3",
            "Container/pinned=n1"
        ]
    );

    // n1 leaves: a (HA) has no node left (anti-affinity), pinned (not HA) stays on n1.
    n1.leave().await.expect("leave");
    let mut status = c.status.clone();
    let s = status
        .wait_for(|s| !s.unplaceable.is_empty())
        .await
        .expect("status")
        .clone();
    assert!(s.leading);
    let unplaceable: Vec<String> = s.unplaceable.iter().map(|u| u.id.to_string()).collect();
    assert_eq!(unplaceable, ["Container/a"]);
    assert_eq!(s.nodes, ["n2", "n3"]);
    let mut unavailable: Vec<String> = s.unavailable.iter().map(ToString::to_string).collect();
    unavailable.sort();
    assert_eq!(unavailable, ["Container/a", "Container/pinned"]);

    // The manifests drop c and pinned: a moves to n3, the two assignments are deleted.
    manifests_tx.send_replace(Some(manifests(
        "r2",
        &[("a", &anti(&["b"])), ("b", &anti(&["a"]))],
    )));
    let after = wait_for(&store, "a on n3", |l| {
        l.len() == 2 && node_of(l, "Container/a").as_deref() == Some("n3")
    })
    .await;
    assert_eq!(after, ["Container/a=n3", "Container/b=n2"]);
    let (list, _) = election::list_assignments(&store).await.expect("list");
    let a: Vec<&Assignment> = list
        .iter()
        .filter(|a| a.resource == "Container/a")
        .collect();
    assert_eq!(a[0].revision, "r2", "a moved under the new manifests");
    assert!(a[0].ha);

    c.shutdown.send_replace(true);
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        let mut s = c.status.clone();
        s.wait_for(|s| !s.leading).await.map(|_| ())
    })
    .await;
    assert!(ended.is_ok(), "the leader steps down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_candidate_takes_over_and_the_first_is_fenced() {
    let Some((_etcd, store)) = member_with_store(
        "a_second_candidate_takes_over_and_the_first_is_fenced",
        "/leader-test",
    )
    .await
    else {
        return;
    };
    let _n1 = register(&store, "n1").await;
    let _n2 = register(&store, "n2").await;
    let (manifests_tx, manifests_rx) = watch::channel(Some(manifests("r1", &[("a", "{}")])));
    let first = candidate(&store, "ctl1", manifests_rx.clone());
    wait_for(&store, "a placed", |l| l.len() == 1).await;
    let leader = current_leader(&store)
        .await
        .expect("leader")
        .expect("some leader");
    assert_eq!(leader.name, "ctl1");
    let second = candidate(&store, "ctl2", manifests_rx);
    sleep(Duration::from_millis(500)).await;
    assert!(!second.status.borrow().leading, "one leader at a time");

    // The first steps down: the second is elected and follows the next manifest change.
    let started = Instant::now();
    first.shutdown.send_replace(true);
    let mut s2 = second.status.clone();
    tokio::time::timeout(Duration::from_secs(10), s2.wait_for(|s| s.leading))
        .await
        .expect("the second candidate is elected")
        .expect("status");
    println!("takeover after a clean step-down: {:?}", started.elapsed());
    let now = current_leader(&store)
        .await
        .expect("leader")
        .expect("some leader");
    assert_eq!(now.name, "ctl2");
    manifests_tx.send_replace(Some(manifests("r2", &[("a", "{}"), ("b", "{}")])));
    wait_for(&store, "b placed by ctl2", |l| l.len() == 2).await;

    // A write with the first leader's token is refused.
    let stale = Assignment {
        resource: "Container/a".into(),
        node: "n2".into(),
        ha: false,
        revision: "stale".into(),
    };
    let err = election::put_assignments(&store, &leader.token, &[stale])
        .await
        .expect_err("fenced");
    assert!(matches!(err, StoreError::Fenced(_)), "{err}");
    assert_eq!(
        node_of(&assignments(&store).await, "Container/a").as_deref(),
        Some("n1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_leader_is_replaced_once_its_lease_expires() {
    let Some((_etcd, store)) = member_with_store(
        "a_crashed_leader_is_replaced_once_its_lease_expires",
        "/leader-test",
    )
    .await
    else {
        return;
    };
    let _n1 = register(&store, "n1").await;
    let (manifests_tx, manifests_rx) = watch::channel(Some(manifests("r1", &[("a", "{}")])));
    let first = candidate(&store, "ctl1", manifests_rx.clone());
    wait_for(&store, "a placed", |l| l.len() == 1).await;
    let second = candidate(&store, "ctl2", manifests_rx);
    // The first dies without resigning (its task and lease keepalive stop).
    let started = Instant::now();
    drop(first);
    let mut s2 = second.status.clone();
    tokio::time::timeout(Duration::from_secs(15), s2.wait_for(|s| s.leading))
        .await
        .expect("the second candidate is elected")
        .expect("status");
    let took = started.elapsed();
    println!("takeover after a leader crash (lease TTL 2 s): {took:?}");
    assert!(
        took >= Duration::from_secs(1),
        "not before the lease expires: {took:?}"
    );
    manifests_tx.send_replace(Some(manifests("r2", &[("b", "{}")])));
    wait_for(&store, "b replaces a", |l| l == ["Container/b=n1"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assignments_on_nodes_not_seen_yet_are_held_while_settling() {
    let Some((_etcd, store)) = member_with_store(
        "assignments_on_nodes_not_seen_yet_are_held_while_settling",
        "/leader-test",
    )
    .await
    else {
        return;
    };
    // A previous leader placed an HA workload on n2, which has not registered again yet.
    let (lease, _) = store
        .grant_lease(Duration::from_secs(2))
        .await
        .expect("lease");
    let old = election::Election::new(&store, "old", lease);
    let token = old.campaign().await.expect("elected");
    let before = Assignment {
        resource: "Container/a".into(),
        node: "n2".into(),
        ha: true,
        revision: "r0".into(),
    };
    election::put_assignments(&store, &token, &[before])
        .await
        .expect("put");
    old.resign(token).await.expect("resign");
    store.revoke_lease(lease).await.expect("revoke");

    let _n1 = register(&store, "n1").await;
    let (_tx, rx) = watch::channel(Some(manifests("r1", &[("a", "{ha: true}")])));
    let mut config = LeaderConfig::new("ctl", Duration::from_secs(2));
    config.settle = Duration::from_secs(3);
    let (status_tx, mut status) = watch::channel(LeaderStatus::default());
    let (_shutdown, shutdown_rx) = watch::channel(false);
    let s = store.clone();
    let started = Instant::now();
    let task =
        tokio::spawn(async move { leader::run(&s, &config, rx, status_tx, shutdown_rx).await });
    let token = status.wait_for(|s| s.leading).await.expect("leading").token;
    sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        assignments(&store).await,
        ["Container/a=n2"],
        "held while settling"
    );
    let moved = wait_for(&store, "a moved to n1", |l| l == ["Container/a=n1"]).await;
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "{moved:?} before the settle time"
    );
    let now = status.borrow().clone();
    assert!(
        now.leading && now.token == token,
        "one term, longer than the lease TTL: {now:?}"
    );
    task.abort();
}

/// Manifests from YAML text.
fn manifests_text(revision: &str, text: &str) -> Arc<Manifests> {
    let mut resources = Vec::new();
    let mut errors = Vec::new();
    stead_schema::load::load_str(Path::new("m.yaml"), text, &mut resources, &mut errors);
    let desired: Desired = stead_schema::load::into_desired(resources, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    Arc::new(Manifests {
        desired,
        revision: revision.into(),
    })
}

const LIVE_MANIFESTS: &str = "\
apiVersion: stead.dev/v1alpha1
kind: StoragePool
metadata: {name: shared}
spec: {type: dir, path: /srv/shared, shared: true}
---
apiVersion: stead.dev/v1alpha1
kind: StoragePool
metadata: {name: local}
spec: {type: dir, path: /srv/local}
---
apiVersion: stead.dev/v1alpha1
kind: Volume
metadata: {name: web-root}
spec: {pool: shared, size: 1Gi}
---
apiVersion: stead.dev/v1alpha1
kind: Volume
metadata: {name: db-root}
spec: {pool: local, size: 1Gi}
---
apiVersion: stead.dev/v1alpha1
kind: VirtualMachine
metadata: {name: web}
spec: {engine: qemu, cpus: 1, memory: 512Mi, disks: [{volume: web-root}]}
---
apiVersion: stead.dev/v1alpha1
kind: VirtualMachine
metadata: {name: db}
spec: {engine: qemu, cpus: 1, memory: 512Mi, disks: [{volume: db-root}]}
---
apiVersion: stead.dev/v1alpha1
kind: Container
metadata: {name: c}
spec: {rootfs: {path: /srv/r}}
";

async fn record_where(
    store: &Store,
    resource: &str,
    what: &str,
    check: impl Fn(&MigrationRecord) -> bool,
) -> MigrationRecord {
    let r: stead_cluster::keys::ResourceRef = resource.parse().expect("ref");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(m) = migrate::read(store, &r).await.expect("read")
            && check(&m)
        {
            return m;
        }
        assert!(Instant::now() < deadline, "{resource}: never {what}");
        sleep(Duration::from_millis(50)).await;
    }
}

/// The leader chooses how each request moves: a running qemu VM on a shared pool goes
/// `preparing` (live) and stays where it runs until the move completed, then is assigned
/// to the target; `--live` for a VM on a node-local pool is refused with the reason; a
/// container moves cold at once, its record saying why not live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_chooses_live_or_cold_and_pins_a_live_move_only_once_completed() {
    let test = "the_leader_chooses_live_or_cold_and_pins_a_live_move_only_once_completed";
    let Some((_etcd, store)) = member_with_store(test, "/t").await else {
        return;
    };
    let _n1 = register(&store, "n1").await;
    let _n2 = register(&store, "n2").await;
    let (_tx, rx) = watch::channel(Some(manifests_text("r1", LIVE_MANIFESTS)));
    let _c = candidate(&store, "ctl", rx);
    let placed = wait_for(&store, "three placed", |l| l.len() == 3).await;
    let other = |r: &str| {
        if node_of(&placed, r).as_deref() == Some("n1") {
            "n2"
        } else {
            "n1"
        }
    };
    let (web_to, db_to, c_to) = (
        other("VirtualMachine/web"),
        other("VirtualMachine/db"),
        other("Container/c"),
    );
    let web_from = node_of(&placed, "VirtualMachine/web").expect("web placed");
    let put = |r: &str, to: &str, mode: MigrationMode| {
        let mut m = MigrationRecord::request(to);
        m.mode = mode;
        let (store, r) = (store.clone(), r.parse::<stead_cluster::keys::ResourceRef>());
        async move {
            migrate::put(&store, &r.expect("ref"), &m)
                .await
                .expect("put")
        }
    };
    put("VirtualMachine/web", web_to, MigrationMode::Auto).await;
    put("VirtualMachine/db", db_to, MigrationMode::Live).await;
    put("Container/c", c_to, MigrationMode::Auto).await;

    let web = record_where(&store, "VirtualMachine/web", "preparing", |m| {
        m.state == MigrationState::Preparing
    })
    .await;
    assert_eq!(web.method.as_deref(), Some("live"));
    assert_eq!(web.from.as_deref(), Some(web_from.as_str()));
    assert_eq!(web.ha, Some(false), "web is not HA: its assignment says so");
    let db = record_where(&store, "VirtualMachine/db", "refused", |m| {
        m.state == MigrationState::Refused
    })
    .await;
    let why = db.message.unwrap_or_default();
    assert!(
        why.starts_with("cannot move live: ") && why.contains("not shared"),
        "{why}"
    );
    let c = record_where(&store, "Container/c", "assigned", |m| {
        m.state == MigrationState::Assigned
    })
    .await;
    assert_eq!(
        c.method.as_deref(),
        Some("cold (only a VirtualMachine moves live)")
    );
    wait_for(&store, "c moved", |l| {
        node_of(l, "Container/c").as_deref() == Some(c_to)
    })
    .await;
    sleep(Duration::from_millis(500)).await;
    let now = assignments(&store).await;
    assert_eq!(
        node_of(&now, "VirtualMachine/web").as_deref(),
        Some(web_from.as_str()),
        "a live move in flight stays where it runs"
    );
    assert_eq!(
        node_of(&now, "VirtualMachine/db"),
        node_of(&placed, "VirtualMachine/db"),
        "a refused move moves nothing"
    );

    // What the agents write once the guest runs on the target.
    let done = web
        .incoming("tcp:127.0.0.1:1")
        .and_then(|m| m.completed(None))
        .expect("completed");
    migrate::put(&store, &"VirtualMachine/web".parse().expect("ref"), &done)
        .await
        .expect("put");
    wait_for(&store, "web assigned to its target", |l| {
        node_of(l, "VirtualMachine/web").as_deref() == Some(web_to)
    })
    .await;
    let web = record_where(&store, "VirtualMachine/web", "assigned", |m| {
        m.state == MigrationState::Assigned
    })
    .await;
    assert_eq!(web.from.as_deref(), Some(web_from.as_str()));
}

/// Two VMs on a shared pool that do not fit on one node together.
const FULL_MANIFESTS: &str = "\
apiVersion: stead.dev/v1alpha1
kind: StoragePool
metadata: {name: shared}
spec: {type: dir, path: /srv/shared, shared: true}
---
apiVersion: stead.dev/v1alpha1
kind: Volume
metadata: {name: a-root}
spec: {pool: shared, size: 1Gi}
---
apiVersion: stead.dev/v1alpha1
kind: Volume
metadata: {name: b-root}
spec: {pool: shared, size: 1Gi}
---
apiVersion: stead.dev/v1alpha1
kind: VirtualMachine
metadata: {name: a}
spec: {engine: qemu, cpus: 1, memory: 6Gi, disks: [{volume: a-root}]}
---
apiVersion: stead.dev/v1alpha1
kind: VirtualMachine
metadata: {name: b}
spec: {engine: qemu, cpus: 1, memory: 6Gi, disks: [{volume: b-root}]}
";

/// A live move to a node without room is refused with the reason before any QEMU starts
/// (never `preparing`); but a live move that completed anyway (the guest runs there) is
/// assigned to its target over capacity, with an event saying so, and stays there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_move_is_checked_against_capacity_first_and_a_completed_one_never_refused() {
    let test = "a_live_move_is_checked_against_capacity_first_and_a_completed_one_never_refused";
    let Some((_etcd, store)) = member_with_store(test, "/t").await else {
        return;
    };
    let _n1 = register(&store, "n1").await;
    let _n2 = register(&store, "n2").await;
    let (_tx, rx) = watch::channel(Some(manifests_text("r1", FULL_MANIFESTS)));
    let _c = candidate(&store, "ctl", rx);
    let placed = wait_for(&store, "two placed", |l| l.len() == 2).await;
    let a_on = node_of(&placed, "VirtualMachine/a").expect("a placed");
    let b_on = node_of(&placed, "VirtualMachine/b").expect("b placed");
    assert_ne!(a_on, b_on, "6 GiB each on 8 GiB nodes: {placed:?}");
    let a: stead_cluster::keys::ResourceRef = "VirtualMachine/a".parse().expect("ref");
    migrate::put(&store, &a, &MigrationRecord::request(&b_on))
        .await
        .expect("put");
    let refused = record_where(&store, "VirtualMachine/a", "refused", |m| {
        m.state != MigrationState::Requested
    })
    .await;
    assert_eq!(refused.state, MigrationState::Refused, "{refused:?}");
    let why = refused.message.unwrap_or_default();
    assert!(
        why.contains(&format!("node {b_on} cannot take it")),
        "{why}"
    );

    // The agents say the guest runs on the full node (a move that raced a change).
    let done = MigrationRecord::request(&b_on)
        .preparing(&a_on, false)
        .and_then(|m| m.incoming("tcp:127.0.0.1:1"))
        .and_then(|m| m.completed(None))
        .expect("completed");
    migrate::put(&store, &a, &done).await.expect("put");
    wait_for(&store, "a assigned where its guest runs", |l| {
        node_of(l, "VirtualMachine/a").as_deref() == Some(b_on.as_str())
    })
    .await;
    let assigned = record_where(&store, "VirtualMachine/a", "assigned", |m| {
        m.state != MigrationState::Completed
    })
    .await;
    assert_eq!(assigned.state, MigrationState::Assigned, "{assigned:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = stead_cluster::events::recent(&store, 20)
            .await
            .expect("events");
        if events.iter().any(|e| {
            e.kind == stead_cluster::events::EventKind::Overcommitted
                && e.resource.as_deref() == Some("VirtualMachine/a")
        }) {
            break;
        }
        assert!(Instant::now() < deadline, "no event: {events:?}");
        sleep(Duration::from_millis(100)).await;
    }
    sleep(Duration::from_millis(1500)).await;
    let now = assignments(&store).await;
    assert_eq!(
        node_of(&now, "VirtualMachine/a").as_deref(),
        Some(b_on.as_str()),
        "it stays where it runs: {now:?}"
    );
    let still = migrate::read(&store, &a)
        .await
        .expect("read")
        .expect("record");
    assert_eq!(still.state, MigrationState::Assigned, "{still:?}");
}

/// Manifests of a container on a btrfs pool's volume replicated to `to`, on the node whose
/// `zone` label is `zone`; `other` is a container without volumes on the same node.
fn replicated_manifests(revision: &str, to: &str, zone: &str) -> Arc<Manifests> {
    manifests_with_mounts(revision, to, zone, "[{volume: data, path: /data}]")
}

/// [`replicated_manifests`] with `mounts` for `app`.
fn manifests_with_mounts(revision: &str, to: &str, zone: &str, mounts: &str) -> Arc<Manifests> {
    manifests_text(
        revision,
        &format!(
            "apiVersion: stead.dev/v1alpha1
kind: StoragePool
metadata: {{name: fast}}
spec: {{type: btrfs, path: /srv/fast}}
---
apiVersion: stead.dev/v1alpha1
kind: Volume
metadata: {{name: data}}
spec: {{pool: fast, size: 1Gi, replication: {{to: {to}, every: 1h}}}}
---
apiVersion: stead.dev/v1alpha1
kind: Container
metadata: {{name: app}}
spec: {{rootfs: {{path: /srv/r}}, mounts: {mounts}, placement: {{nodeSelector: {{zone: {zone}}}}}}}
---
apiVersion: stead.dev/v1alpha1
kind: Container
metadata: {{name: other}}
spec: {{rootfs: {{path: /srv/r}}, placement: {{nodeSelector: {{zone: {zone}}}}}}}
"
        ),
    )
}

/// A manifest change that moves a workload to the node holding its volume's replica is
/// written as a hand-over record (placementChange, assigned, from the old node) before the
/// assignment moves; a workload without node-local data just moves; the record pins nothing
/// (the next manifest change moves the workload back, with a new record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placement_change_to_the_replica_node_is_a_hand_over() {
    let Some((_etcd, store)) = member_with_store(
        "a_placement_change_to_the_replica_node_is_a_hand_over",
        "/leader-handover",
    )
    .await
    else {
        return;
    };
    let mut regs = Vec::new();
    for name in ["n1", "n2"] {
        let mut info = node(name);
        info.pools = vec!["fast".into()];
        let reg =
            Registration::register(&store, &info, LeaseConfig::with_ttl(Duration::from_secs(2)))
                .await
                .expect("register");
        regs.push(reg);
    }
    let (manifests_tx, manifests_rx) = watch::channel(Some(replicated_manifests("r1", "n2", "n1")));
    let _c = candidate(&store, "ctl1", manifests_rx);
    wait_for(&store, "both on n1", |l| {
        l == ["Container/app=n1", "Container/other=n1"]
    })
    .await;
    let app: stead_cluster::keys::ResourceRef = "Container/app".parse().expect("ref");
    let other: stead_cluster::keys::ResourceRef = "Container/other".parse().expect("ref");
    assert!(migrate::read(&store, &app).await.expect("read").is_none());

    manifests_tx.send_replace(Some(replicated_manifests("r2", "n2", "n2")));
    wait_for(&store, "both on n2", |l| {
        l == ["Container/app=n2", "Container/other=n2"]
    })
    .await;
    // Written before the assignment: it is there as soon as the workload is on n2.
    let record = migrate::read(&store, &app)
        .await
        .expect("read")
        .expect("a hand-over record");
    assert!(record.placement_change, "{record:?}");
    assert_eq!(record.state, MigrationState::Assigned);
    assert_eq!(
        (record.from.as_deref(), record.to.as_str()),
        (Some("n1"), "n2")
    );
    assert!(
        migrate::read(&store, &other).await.expect("read").is_none(),
        "no data to hand over"
    );

    // It pins nothing: replicated to n1 and placed on n1 by the manifests, app goes back,
    // handed over again.
    manifests_tx.send_replace(Some(replicated_manifests("r3", "n1", "n1")));
    wait_for(&store, "both back on n1", |l| {
        l == ["Container/app=n1", "Container/other=n1"]
    })
    .await;
    let back = migrate::read(&store, &app)
        .await
        .expect("read")
        .expect("a hand-over record");
    assert_eq!(
        (
            back.from.as_deref(),
            back.to.as_str(),
            back.placement_change
        ),
        (Some("n2"), "n1", true)
    );

    // A later move without a hand-over (app no longer mounts the volume) clears the record.
    manifests_tx.send_replace(Some(manifests_with_mounts("r4", "n1", "n2", "[]")));
    wait_for(&store, "both on n2 again", |l| {
        l == ["Container/app=n2", "Container/other=n2"]
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while migrate::read(&store, &app).await.expect("read").is_some() {
        assert!(Instant::now() < deadline, "the old hand-over record stays");
        sleep(Duration::from_millis(50)).await;
    }
}
