//! The store against a real etcd 3.4 member on 127.0.0.1 (stead_cluster::testkit). Each test
//! starts its own member; without the etcd binary a test prints SKIP and returns.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use stead_cluster::agent::{Converge, ConvergeError, Owned};
use stead_cluster::election::{
    self, AssignmentEvent, AssignmentWatch, Election, LeaderWatch, current_leader,
};
use stead_cluster::etcd::{Store, StoreError};
use stead_cluster::fence::{FencePolicy, boottime_now, watchdog_expired};
use stead_cluster::keys::ResourceRef;
use stead_cluster::migrate::{self, MigrationRecord, MigrationState};
use stead_cluster::model::Assignment;
use stead_cluster::owner::{self, Holder};
use stead_cluster::registry::{LeaseConfig, NodeEvent, NodeWatch, Registration, list_nodes};
use stead_cluster::testkit::{
    RunningAgent, agent_config, member_with_store, spawn_agent, test_node,
};
use tokio::time::{Instant, timeout};

fn res(s: &str) -> ResourceRef {
    s.parse().expect("resource ref")
}

fn assignment(resource: &str, node: &str, ha: bool) -> Assignment {
    Assignment {
        resource: resource.into(),
        node: node.into(),
        ha,
        revision: "r1".into(),
    }
}

async fn lease(store: &Store, secs: u64) -> i64 {
    store
        .grant_lease(Duration::from_secs(secs))
        .await
        .expect("lease")
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_lists_nodes_and_watches_them_expire() {
    let Some((_etcd, store)) =
        member_with_store("registry_lists_nodes_and_watches_them_expire", "/t").await
    else {
        return;
    };
    let config = LeaseConfig::with_ttl(Duration::from_secs(2));
    let a = Registration::register(&store, &test_node("a"), config)
        .await
        .expect("register a");
    let b = Registration::register(&store, &test_node("b"), config)
        .await
        .expect("register b");
    let (nodes, revision) = list_nodes(&store).await.expect("list");
    let names: Vec<_> = nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    let mut watch = NodeWatch::new(&store, revision);

    // Keepalives hold the lease well past its TTL.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(list_nodes(&store).await.expect("list").0.len(), 2);
    assert!(
        a.current().acked_at.elapsed() < Duration::from_secs(1),
        "keepalives acknowledged"
    );
    let left = store
        .lease_remaining(a.lease())
        .await
        .expect("ttl")
        .expect("alive");
    assert!(left <= Duration::from_secs(2));
    let l = a.current();
    println!(
        "keepalive round trip {:?}, largest {:?} (loopback)",
        l.rtt, l.max_rtt
    );

    // a stops keeping its lease alive (as if killed): it is gone about a TTL after the last ack.
    let last_ack = a.current().acked_at;
    drop(a);
    let events = timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("in time")
        .expect("watch");
    let gone_after = last_ack.elapsed();
    assert_eq!(events, vec![NodeEvent::Down("a".into())]);
    println!(
        "lease TTL 2 s: node key deleted {gone_after:?} after the last acknowledged keepalive"
    );
    assert!(gone_after >= Duration::from_secs(2), "{gone_after:?}");

    // b leaves: revoked at once.
    let t = Instant::now();
    let b_lease = b.lease();
    b.leave().await.expect("leave");
    assert_eq!(store.lease_remaining(b_lease).await.expect("ttl"), None);
    let events = timeout(Duration::from_secs(2), watch.next())
        .await
        .expect("in time")
        .expect("watch");
    assert_eq!(events, vec![NodeEvent::Down("b".into())]);
    assert!(t.elapsed() < Duration::from_secs(1));

    // A join shows up too.
    let _c = Registration::register(&store, &test_node("c"), config)
        .await
        .expect("register c");
    let events = timeout(Duration::from_secs(2), watch.next())
        .await
        .expect("in time")
        .expect("watch");
    assert_eq!(events, vec![NodeEvent::Up(test_node("c"))]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn election_hands_over_when_the_leaders_lease_is_revoked() {
    let Some((_etcd, store)) = member_with_store(
        "election_hands_over_when_the_leaders_lease_is_revoked",
        "/t",
    )
    .await
    else {
        return;
    };
    let (la, lb) = (lease(&store, 10).await, lease(&store, 10).await);
    let a = Election::new(&store, "ctl-a", la);
    let b = Election::new(&store, "ctl-b", lb);
    let ta = a.try_campaign().await.expect("campaign").expect("a leads");
    assert_eq!(
        a.try_campaign().await.expect("again"),
        Some(ta),
        "re-entrant with the same lease"
    );
    assert_eq!(b.try_campaign().await.expect("campaign"), None);
    let leader = current_leader(&store).await.expect("leader").expect("some");
    assert_eq!((leader.name.as_str(), leader.token), ("ctl-a", ta));

    let mut observe = LeaderWatch::new(&store);
    let first = observe.next().await.expect("observe").expect("a leader");
    assert_eq!(first.name, "ctl-a");
    let waiting = tokio::spawn({
        let b = b.clone();
        async move { b.campaign().await }
    });
    election::put_assignments(&store, &ta, &[assignment("Container/web", "n1", true)])
        .await
        .expect("leader writes");

    // a's lease ends (its node died): b is elected, a's token is dead.
    store.revoke_lease(la).await.expect("revoke");
    let tb = timeout(Duration::from_secs(5), waiting)
        .await
        .expect("in time")
        .expect("task")
        .expect("b");
    assert!(tb > ta);
    let seen = timeout(Duration::from_secs(5), async {
        loop {
            if let Some(l) = observe.next().await.expect("observe")
                && l.name == "ctl-b"
            {
                return l;
            }
        }
    })
    .await
    .expect("observed");
    assert_eq!(seen.token, tb);

    let stale =
        election::put_assignments(&store, &ta, &[assignment("Container/web", "n2", true)]).await;
    assert!(matches!(stale, Err(StoreError::Fenced(_))), "{stale:?}");
    let stale = election::delete_assignment(&store, &ta, &res("Container/web")).await;
    assert!(matches!(stale, Err(StoreError::Fenced(_))), "{stale:?}");
    let (all, _) = election::list_assignments(&store).await.expect("list");
    assert_eq!(
        all,
        vec![assignment("Container/web", "n1", true)],
        "the deposed leader wrote nothing"
    );

    // Many assignments go in several guarded transactions.
    let many: Vec<_> = (0..250)
        .map(|i| assignment(&format!("Container/c{i}"), "n1", false))
        .collect();
    election::put_assignments(&store, &tb, &many)
        .await
        .expect("b writes");
    assert_eq!(
        election::list_assignments(&store)
            .await
            .expect("list")
            .0
            .len(),
        251
    );

    b.resign(tb).await.expect("resign");
    assert_eq!(current_leader(&store).await.expect("leader"), None);
}

async fn next_events(watch: &mut AssignmentWatch) -> Vec<AssignmentEvent> {
    timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("in time")
        .expect("watch")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assignment_watch_follows_one_node() {
    let Some((_etcd, store)) = member_with_store("assignment_watch_follows_one_node", "/t").await
    else {
        return;
    };
    let ctl = Election::new(&store, "ctl", lease(&store, 10).await);
    let token = ctl.try_campaign().await.expect("campaign").expect("leads");
    let put = |a: Vec<Assignment>| {
        let store = store.clone();
        async move {
            election::put_assignments(&store, &token, &a)
                .await
                .expect("put")
        }
    };
    put(vec![
        assignment("Container/a", "n1", true),
        assignment("Container/b", "n2", true),
    ])
    .await;

    // Values stead cannot read, or naming another workload than their key, are skipped.
    let mut raw = store.client();
    raw.put(
        store.keys().assignment(&res("Container/bad")),
        "{not json",
        None,
    )
    .await
    .expect("put");
    let lying = serde_json::to_vec(&assignment("Container/a", "n1", true)).expect("json");
    raw.put(store.keys().assignment(&res("Container/liar")), lying, None)
        .await
        .expect("put");
    raw.put(store.keys().node("garbage"), "nope", None)
        .await
        .expect("put");
    assert!(list_nodes(&store).await.expect("list").0.is_empty());
    assert_eq!(
        election::list_assignments(&store)
            .await
            .expect("list")
            .0
            .len(),
        2
    );

    let mut watch = AssignmentWatch::new(&store, "n1");
    assert_eq!(
        next_events(&mut watch).await,
        vec![AssignmentEvent::Snapshot(vec![assignment(
            "Container/a",
            "n1",
            true
        )])]
    );
    raw.put(store.keys().assignment(&res("Container/bad")), "[]", None)
        .await
        .expect("put");
    put(vec![assignment("Container/c", "n1", false)]).await;
    assert_eq!(
        next_events(&mut watch).await,
        vec![AssignmentEvent::Assigned(assignment(
            "Container/c",
            "n1",
            false
        ))]
    );
    put(vec![assignment("Container/b", "n2", false)]).await; // not ours: nothing
    put(vec![assignment("Container/a", "n2", true)]).await; // moved away
    assert_eq!(
        next_events(&mut watch).await,
        vec![AssignmentEvent::Unassigned(res("Container/a"))]
    );
    election::delete_assignment(&store, &token, &res("Container/c"))
        .await
        .expect("delete");
    assert_eq!(
        next_events(&mut watch).await,
        vec![AssignmentEvent::Unassigned(res("Container/c"))]
    );
    assert!(watch.next_revision() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_owners_guarded_write_is_rejected_after_takeover() {
    let Some((_etcd, store)) = member_with_store(
        "an_old_owners_guarded_write_is_rejected_after_takeover",
        "/t",
    )
    .await
    else {
        return;
    };
    let web = res("Container/web");
    let old = Holder {
        node: "n1".into(),
        lease: lease(&store, 10).await,
    };
    let new = Holder {
        node: "n2".into(),
        lease: lease(&store, 10).await,
    };

    let t1 = owner::acquire(&store, &web, &old)
        .await
        .expect("acquire")
        .expect("owned");
    assert_eq!(
        owner::acquire(&store, &web, &old).await.expect("again"),
        Some(t1.clone())
    );
    assert_eq!(
        owner::acquire(&store, &web, &new).await.expect("acquire"),
        None,
        "owner key exists"
    );
    let data = store.keys().replication(&web);
    owner::guarded_put(&store, &data, "from n1", &t1)
        .await
        .expect("owner writes");

    // n1's lease expires (partitioned away): n2 takes over with a newer token.
    store.revoke_lease(old.lease).await.expect("revoke");
    let t2 = owner::acquire(&store, &web, &new)
        .await
        .expect("acquire")
        .expect("taken over");
    assert!(t2.revision() > t1.revision());
    assert!(!owner::is_current(&store, &t1).await.expect("check"));
    assert!(owner::is_current(&store, &t2).await.expect("check"));

    // n1 comes back and writes with its old token: rejected; n2's write stands.
    owner::guarded_put(&store, &data, "from n2", &t2)
        .await
        .expect("new owner writes");
    let stale = owner::guarded_put(&store, &data, "late write from n1", &t1).await;
    assert!(matches!(stale, Err(StoreError::Fenced(_))), "{stale:?}");
    let mut c = store.client();
    let value = c.get(data.as_str(), None).await.expect("get").kvs()[0]
        .value()
        .to_vec();
    assert_eq!(value, b"from n2");
    // n1's release with the old token does not delete n2's key.
    assert!(!owner::release(&store, &t1).await.expect("release"));
    assert!(owner::is_current(&store, &t2).await.expect("check"));
    let who = owner::owner_of(&store, &web)
        .await
        .expect("owner")
        .expect("some");
    assert_eq!((who.record.node.as_str(), who.lease), ("n2", new.lease));
    let all = owner::list_owners(&store).await.expect("owners");
    assert_eq!(all, vec![who.clone()]);
    assert!(owner::release(&store, &t2).await.expect("release"));
    assert_eq!(owner::owner_of(&store, &web).await.expect("owner"), None);
}

/// What the fake engine was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Converge(Vec<(String, i64)>),
    StopHa(Vec<String>),
    /// A converge that keeps these workloads' data (they are being handed off).
    Keeping(Vec<String>),
    /// A hand-off of a workload to a node, and whether it succeeded.
    HandOff(String, String, bool),
}

#[derive(Default)]
struct FakeEngine {
    calls: Mutex<Vec<Call>>,
    /// How many converges fail before one succeeds.
    failures: Mutex<usize>,
    /// How many hand-offs fail before one succeeds.
    hand_off_failures: Mutex<usize>,
}

impl Converge for FakeEngine {
    fn converge(&self, owned: &[Owned]) -> Result<(), ConvergeError> {
        let set = owned
            .iter()
            .map(|o| (o.resource.to_string(), o.token.revision()))
            .collect();
        self.calls.lock().expect("lock").push(Call::Converge(set));
        let mut failures = self.failures.lock().expect("lock");
        if *failures > 0 {
            *failures -= 1;
            return Err(ConvergeError("the engine failed".into()));
        }
        Ok(())
    }

    fn stop_ha(&self, resources: &[ResourceRef]) {
        let set = resources.iter().map(ToString::to_string).collect();
        self.calls.lock().expect("lock").push(Call::StopHa(set));
    }

    fn converge_keeping(&self, owned: &[Owned], keep: &[Owned]) -> Result<(), ConvergeError> {
        let set = keep.iter().map(|o| o.resource.to_string()).collect();
        self.calls.lock().expect("lock").push(Call::Keeping(set));
        self.converge(owned)
    }

    fn hand_off(&self, owned: &Owned, to: &str) -> Result<(), ConvergeError> {
        let mut failures = self.hand_off_failures.lock().expect("lock");
        let ok = *failures == 0;
        *failures = failures.saturating_sub(1);
        self.calls.lock().expect("lock").push(Call::HandOff(
            owned.resource.to_string(),
            to.to_string(),
            ok,
        ));
        if ok {
            Ok(())
        } else {
            Err(ConvergeError("the link to the target is down".into()))
        }
    }
}

impl FakeEngine {
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("lock").clone()
    }

    /// Waits until a call matches `pred`; returns the calls so far and when it matched.
    async fn wait_for(&self, what: &str, pred: impl Fn(&Call) -> bool) -> Instant {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if self.calls().iter().any(&pred) {
                return Instant::now();
            }
            assert!(
                Instant::now() < deadline,
                "{what}: calls {:?}",
                self.calls()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn runs(call: &Call, resource: &str) -> bool {
    matches!(call, Call::Converge(set) if set.iter().any(|(r, _)| r == resource))
}

fn start_agent(store: &Store, name: &str, ttl: Duration) -> RunningAgent<FakeEngine> {
    start_agent_with(store, name, ttl, None)
}

fn start_agent_with(
    store: &Store,
    name: &str,
    ttl: Duration,
    deadline_file: Option<std::path::PathBuf>,
) -> RunningAgent<FakeEngine> {
    let mut config = agent_config(name, ttl);
    config.fence = FencePolicy::default();
    config.deadline_file = deadline_file;
    spawn_agent(store, config, Arc::new(FakeEngine::default()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_acquires_runs_and_releases_what_is_assigned() {
    let Some((_etcd, store)) =
        member_with_store("agent_acquires_runs_and_releases_what_is_assigned", "/t").await
    else {
        return;
    };
    let ctl = Election::new(&store, "ctl", lease(&store, 10).await);
    let token = ctl.try_campaign().await.expect("campaign").expect("leads");
    let web = res("Container/web");

    // An old owner (another node's live lease) still holds web.
    let other = Holder {
        node: "old".into(),
        lease: lease(&store, 10).await,
    };
    owner::acquire(&store, &web, &other)
        .await
        .expect("acquire")
        .expect("old owns");

    let agent = start_agent(&store, "n1", Duration::from_secs(4));
    election::put_assignments(&store, &token, &[assignment("Container/web", "n1", true)])
        .await
        .expect("assign");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !agent
            .engine
            .calls()
            .iter()
            .any(|c| runs(c, "Container/web")),
        "ran without a token"
    );

    // The old owner's key goes: the agent acquires and runs it with the new token.
    store.revoke_lease(other.lease).await.expect("revoke");
    agent
        .engine
        .wait_for("web started", |c| runs(c, "Container/web"))
        .await;
    let who = owner::owner_of(&store, &web)
        .await
        .expect("owner")
        .expect("owned");
    assert_eq!(who.record.node, "n1");
    let started = agent
        .engine
        .calls()
        .into_iter()
        .find(|c| runs(c, "Container/web"));
    assert_eq!(
        started,
        Some(Call::Converge(vec![(
            "Container/web".into(),
            who.token.revision()
        )]))
    );

    // Moved to another node: stopped (converge without it), then released.
    election::put_assignments(&store, &token, &[assignment("Container/web", "n2", true)])
        .await
        .expect("move");
    let deadline = Instant::now() + Duration::from_secs(5);
    while owner::owner_of(&store, &web)
        .await
        .expect("owner")
        .is_some()
    {
        assert!(
            Instant::now() < deadline,
            "not released: {:?}",
            agent.engine.calls()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(agent.engine.calls().last(), Some(&Call::Converge(vec![])));
    agent.stop().await;
    assert!(
        list_nodes(&store).await.expect("list").0.is_empty(),
        "the lease was revoked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_fences_before_its_lease_can_expire_and_reacquires_after() {
    let test = "agent_fences_before_its_lease_can_expire_and_reacquires_after";
    let Some((etcd, store)) = member_with_store(test, "/t").await else {
        return;
    };
    let ctl = Election::new(&store, "ctl", lease(&store, 30).await);
    let token = ctl.try_campaign().await.expect("campaign").expect("leads");
    let ttl = Duration::from_secs(4);
    let dir = tempfile::tempdir().expect("tempdir");
    let deadline_file = dir.path().join("fence-deadline");
    let agent = start_agent_with(&store, "n1", ttl, Some(deadline_file.clone()));
    let read_deadline = || std::fs::read_to_string(&deadline_file).expect("deadline file");
    let both = [
        assignment("Container/web", "n1", true),
        assignment("Container/batch", "n1", false),
    ];
    election::put_assignments(&store, &token, &both)
        .await
        .expect("assign");
    agent
        .engine
        .wait_for("web started", |c| runs(c, "Container/web"))
        .await;
    let first = owner::owner_of(&store, &res("Container/web"))
        .await
        .expect("owner")
        .expect("owned");

    // etcd stops answering for longer than the TTL: the agent stops web before the lease
    // could expire (lease deadline = last acknowledged send + TTL, so < TTL after the pause).
    // The watchdog's view while keepalives flow: a deadline ahead, less than the TTL away.
    let published: u128 = read_deadline().trim().parse().expect("a number");
    let boot = boottime_now().as_nanos();
    assert!(
        published > boot && published < boot + ttl.as_nanos(),
        "{published} vs {boot}"
    );
    assert!(!watchdog_expired(&read_deadline(), boottime_now()));

    let paused = Instant::now();
    etcd.pause();
    let fenced = agent
        .engine
        .wait_for(
            "fenced",
            |c| matches!(c, Call::StopHa(s) if s == &["Container/web"]),
        )
        .await;
    let fenced_after = fenced - paused;
    println!("TTL {ttl:?}: fenced {fenced_after:?} after etcd stopped answering");
    assert!(
        fenced_after < ttl - Duration::from_secs(1),
        "{fenced_after:?}"
    );
    assert_eq!(
        read_deadline(),
        "0\n",
        "fenced: the watchdog stops HA workloads too"
    );
    tokio::time::sleep(ttl).await;
    etcd.resume();

    // Back: the old lease expired on resume, a new one is granted, ownership is acquired again
    // with a new token before web runs again.
    let before = agent.engine.calls().len();
    let deadline = Instant::now() + Duration::from_secs(20);
    let again = loop {
        let calls = agent.engine.calls();
        let restarted = calls[before..].iter().find_map(|c| match c {
            Call::Converge(set) => set
                .iter()
                .find(|(r, _)| r == "Container/web")
                .map(|(_, t)| *t),
            _ => None,
        });
        if let Some(t) = restarted {
            break t;
        }
        assert!(Instant::now() < deadline, "not restarted: {calls:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        again > first.token.revision(),
        "a new token, not the stale one"
    );
    let now = owner::owner_of(&store, &res("Container/web"))
        .await
        .expect("owner")
        .expect("owned");
    assert_eq!(now.token.revision(), again);
    assert_ne!(now.lease, first.lease);
    assert!(
        !watchdog_expired(&read_deadline(), boottime_now()),
        "re-armed"
    );
    agent.stop().await;
    assert_eq!(read_deadline(), "0\n", "stopped agent: nothing HA may run");
}

/// The next events, retrying retryable errors (a broken stream reconnects from its revision).
async fn next_events_across_outages(watch: &mut AssignmentWatch) -> Vec<AssignmentEvent> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match timeout(Duration::from_secs(5), watch.next()).await {
            Ok(Ok(events)) => return events,
            Ok(Err(e)) if e.is_retryable() => {}
            Ok(Err(e)) => panic!("watch: {e}"),
            Err(_) => {}
        }
        assert!(Instant::now() < deadline, "no events");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assignment_watch_resumes_after_etcd_restarts() {
    let Some((mut etcd, store)) =
        member_with_store("assignment_watch_resumes_after_etcd_restarts", "/t").await
    else {
        return;
    };
    let ctl = Election::new(&store, "ctl", lease(&store, 60).await);
    let token = ctl.try_campaign().await.expect("campaign").expect("leads");
    election::put_assignments(&store, &token, &[assignment("Container/a", "n1", true)])
        .await
        .expect("put");
    let mut watch = AssignmentWatch::new(&store, "n1");
    assert!(
        matches!(&next_events(&mut watch).await[..], [AssignmentEvent::Snapshot(s)] if s.len() == 1)
    );
    election::put_assignments(&store, &token, &[assignment("Container/b", "n1", true)])
        .await
        .expect("put");
    assert_eq!(
        next_events(&mut watch).await,
        vec![AssignmentEvent::Assigned(assignment(
            "Container/b",
            "n1",
            true
        ))]
    );
    let resume_at = watch.next_revision();

    // etcd dies and comes back; a change lands before the watch reconnects.
    etcd.restart().await.expect("restart");
    let deadline = Instant::now() + Duration::from_secs(10);
    let revision = loop {
        match election::put_assignments(&store, &token, &[assignment("Container/c", "n1", false)])
            .await
        {
            Ok(r) => break r,
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("put after restart: {e}"),
        }
    };
    assert!(revision >= resume_at);
    // Delivered once, nothing replayed from before the outage.
    assert_eq!(
        next_events_across_outages(&mut watch).await,
        vec![AssignmentEvent::Assigned(assignment(
            "Container/c",
            "n1",
            false
        ))]
    );
    election::delete_assignment(&store, &token, &res("Container/a"))
        .await
        .expect("delete");
    assert_eq!(
        next_events(&mut watch).await,
        vec![AssignmentEvent::Unassigned(res("Container/a"))]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_retries_a_failed_converge() {
    let Some((_etcd, store)) = member_with_store("agent_retries_a_failed_converge", "/t").await
    else {
        return;
    };
    let ctl = Election::new(&store, "ctl", lease(&store, 10).await);
    let token = ctl.try_campaign().await.expect("campaign").expect("leads");
    let agent = start_agent(&store, "n1", Duration::from_secs(4));
    *agent.engine.failures.lock().expect("lock") = 2;
    election::put_assignments(&store, &token, &[assignment("Container/web", "n1", true)])
        .await
        .expect("assign");
    let deadline = Instant::now() + Duration::from_secs(10);
    while *agent.engine.failures.lock().expect("lock") > 0
        || agent
            .engine
            .calls()
            .iter()
            .filter(|c| runs(c, "Container/web"))
            .count()
            < 3
    {
        assert!(
            Instant::now() < deadline,
            "no retry: {:?}",
            agent.engine.calls()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Retried with the same token: ownership was kept across the failures.
    let tokens: std::collections::BTreeSet<_> = agent
        .engine
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::Converge(set) => set.first().map(|(_, t)| *t),
            _ => None,
        })
        .collect();
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_adopts_its_live_lease_and_keeps_its_tokens() {
    let test = "a_restarted_agent_adopts_its_live_lease_and_keeps_its_tokens";
    let Some((_etcd, store)) = member_with_store(test, "/t").await else {
        return;
    };
    let config = LeaseConfig::with_ttl(Duration::from_secs(3));
    let web = res("Container/web");
    let first = Registration::register(&store, &test_node("n1"), config)
        .await
        .expect("register");
    let lease = first.lease();
    let holder = Holder {
        node: "n1".into(),
        lease,
    };
    let token = owner::acquire(&store, &web, &holder)
        .await
        .expect("acquire")
        .expect("owned");
    drop(first); // the agent crashes: no revoke

    let second = Registration::register(&store, &test_node("n1"), config)
        .await
        .expect("register");
    assert_eq!(second.lease(), lease, "the live lease is adopted");
    let again = owner::acquire(&store, &web, &holder)
        .await
        .expect("acquire");
    assert_eq!(again, Some(token.clone()), "same ownership, same token");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        owner::is_current(&store, &token).await.expect("check"),
        "kept alive past the TTL"
    );
    drop(second);

    // Another address under the same name (another host): a lease of its own.
    let mut elsewhere = test_node("n1");
    elsewhere.address = "10.0.0.9".into();
    let third = Registration::register(&store, &elsewhere, config)
        .await
        .expect("register");
    assert_ne!(third.lease(), lease);
    // A TTL that changed: a new lease too.
    let third_lease = third.lease();
    drop(third);
    let other_ttl = LeaseConfig::with_ttl(Duration::from_secs(5));
    let fourth = Registration::register(&store, &elsewhere, other_ttl)
        .await
        .expect("register");
    assert_ne!(fourth.lease(), third_lease);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_carries_on_after_etcd_restarts() {
    let Some((mut etcd, store)) =
        member_with_store("agent_carries_on_after_etcd_restarts", "/t").await
    else {
        return;
    };
    let ctl = Election::new(&store, "ctl", lease(&store, 60).await);
    let token = ctl.try_campaign().await.expect("campaign").expect("leads");
    let agent = start_agent(&store, "n1", Duration::from_secs(10));
    let web = assignment("Container/web", "n1", true);
    election::put_assignments(&store, &token, std::slice::from_ref(&web))
        .await
        .expect("assign");
    agent
        .engine
        .wait_for("web started", |c| runs(c, "Container/web"))
        .await;
    let before = web_tokens(&agent.engine.calls());

    etcd.restart().await.expect("restart");
    let deadline = Instant::now() + Duration::from_secs(10);
    let batch = assignment("Container/batch", "n1", false);
    while let Err(e) =
        election::put_assignments(&store, &token, &[web.clone(), batch.clone()]).await
    {
        assert!(e.is_retryable() && Instant::now() < deadline, "{e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent
        .engine
        .wait_for("batch started after the restart", |c| {
            runs(c, "Container/batch")
        })
        .await;
    assert!(
        !agent
            .engine
            .calls()
            .iter()
            .any(|c| matches!(c, Call::StopHa(_))),
        "a 10 s lease outlives a restart: no fence"
    );
    let after = web_tokens(&agent.engine.calls());
    assert_eq!(
        after.first(),
        before.first(),
        "the ownership survived the outage: one token for web throughout ({after:?})"
    );
    assert!(after.iter().all(|t| Some(t) == before.first()), "{after:?}");
    agent.stop().await;
}

/// The tokens web was converged with, in order, deduplicated.
fn web_tokens(calls: &[Call]) -> Vec<i64> {
    let mut out: Vec<i64> = Vec::new();
    for c in calls {
        if let Call::Converge(set) = c {
            for (r, t) in set {
                if r == "Container/web" && out.last() != Some(t) {
                    out.push(*t);
                }
            }
        }
    }
    out
}

/// An agent whose etcd is down when it starts keeps trying to register (it does not end)
/// and runs what is assigned once etcd is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_started_while_etcd_is_down_registers_once_it_is_back() {
    let Some((mut etcd, store)) = member_with_store(
        "an_agent_started_while_etcd_is_down_registers_once_it_is_back",
        "/t",
    )
    .await
    else {
        return;
    };
    etcd.kill();
    let agent = start_agent(&store, "n1", Duration::from_secs(10));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!agent.is_finished(), "the agent waits for etcd");
    etcd.restart().await.expect("restart");
    let deadline = Instant::now() + Duration::from_secs(10);
    let ctl = loop {
        match store.grant_lease(Duration::from_secs(60)).await {
            Ok((id, _)) => break Election::new(&store, "ctl", id),
            Err(e) => assert!(Instant::now() < deadline, "etcd back: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let token = ctl.try_campaign().await.expect("campaign").expect("leads");
    let web = assignment("Container/web", "n1", true);
    election::put_assignments(&store, &token, std::slice::from_ref(&web))
        .await
        .expect("assign");
    agent
        .engine
        .wait_for("web started after etcd came back", |c| {
            runs(c, "Container/web")
        })
        .await;
    agent.stop().await;
}

/// A migration away from the node: the agent stops the workload keeping its data, hands it
/// off to the target, and releases its owner key only once the hand-off worked (a failed
/// one keeps the key, so the target cannot start the workload, and is retried).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migrating_workload_is_handed_off_before_its_ownership_is_released() {
    let Some((_etcd, store)) = member_with_store(
        "a_migrating_workload_is_handed_off_before_its_ownership_is_released",
        "/t",
    )
    .await
    else {
        return;
    };
    let ctl = Election::new(&store, "ctl", lease(&store, 60).await);
    let token = ctl.try_campaign().await.expect("campaign").expect("leads");
    let agent = start_agent(&store, "n1", Duration::from_secs(10));
    *agent.engine.hand_off_failures.lock().expect("lock") = 1;
    let web = assignment("Container/web", "n1", false);
    election::put_assignments(&store, &token, std::slice::from_ref(&web))
        .await
        .expect("assign");
    agent
        .engine
        .wait_for("web started", |c| runs(c, "Container/web"))
        .await;

    // What the leader does for `stead migrate Container/web --to n2`: the record first, then
    // the assignment.
    let mut record = MigrationRecord::request("n2");
    record.state = MigrationState::Assigned;
    record.from = Some("n1".into());
    migrate::put(&store, &res("Container/web"), &record)
        .await
        .expect("record");
    let moved = assignment("Container/web", "n2", false);
    election::put_assignments(&store, &token, std::slice::from_ref(&moved))
        .await
        .expect("reassign");

    agent
        .engine
        .wait_for(
            "a failed hand-off",
            |c| matches!(c, Call::HandOff(r, to, false) if r == "Container/web" && to == "n2"),
        )
        .await;
    let held = owner::owner_of(&store, &res("Container/web"))
        .await
        .expect("owner");
    assert_eq!(
        held.map(|o| o.record.node).as_deref(),
        Some("n1"),
        "the ownership stays while the hand-off fails"
    );
    agent
        .engine
        .wait_for(
            "a hand-off that worked",
            |c| matches!(c, Call::HandOff(r, _, true) if r == "Container/web"),
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while owner::owner_of(&store, &res("Container/web"))
        .await
        .expect("owner")
        .is_some()
    {
        assert!(Instant::now() < deadline, "released after the hand-off");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let calls = agent.engine.calls();
    let first_keep = calls
        .iter()
        .position(|c| matches!(c, Call::Keeping(k) if k == &["Container/web".to_string()]))
        .expect("a converge keeping web's data");
    let first_hand_off = calls
        .iter()
        .position(|c| matches!(c, Call::HandOff(..)))
        .expect("a hand-off");
    assert!(
        first_keep < first_hand_off,
        "stopped (data kept) before the hand-off: {calls:?}"
    );
    assert!(
        !calls[first_keep..].iter().any(|c| runs(c, "Container/web")),
        "web no longer runs on n1: {calls:?}"
    );
    agent.stop().await;
}
