//! The agent through a loss of etcd quorum, on three real members on 127.0.0.1
//! (stead_cluster::testkit::EtcdCluster): two members crashed (their ports refuse, the third
//! has no leader) is proven leaderless everywhere, so the agent holds its HA workload; two
//! members paused (they accept connections and answer nothing: they may be a majority with a
//! leader elsewhere) is not, so it fences before its lease can expire. A silent follower
//! costs keepalives no fence. Without the etcd binary a test prints SKIP.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use stead_cluster::agent::{self, AgentConfig, Converge, ConvergeError, Owned};
use stead_cluster::election::{self, Election};
use stead_cluster::etcd::{Store, StoreError};
use stead_cluster::fence::FencePolicy;
use stead_cluster::keys::ResourceRef;
use stead_cluster::model::Assignment;
use stead_cluster::owner;
use stead_cluster::registry::LeaseConfig;
use stead_cluster::testkit::{EtcdCluster, largest_ack_gap, or_skip, test_node};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};

const TTL: Duration = Duration::from_secs(5);

/// Records what the agent asked: converges (with the HA set) and HA stops, with their times.
#[derive(Default)]
struct Recorder {
    converges: Mutex<Vec<(Instant, Vec<String>)>>,
    stops: Mutex<Vec<Instant>>,
}

impl Converge for Recorder {
    fn converge(&self, owned: &[Owned]) -> Result<(), ConvergeError> {
        let set = owned.iter().map(|o| o.resource.to_string()).collect();
        self.converges
            .lock()
            .expect("lock")
            .push((Instant::now(), set));
        Ok(())
    }

    fn stop_ha(&self, resources: &[ResourceRef]) {
        if !resources.is_empty() {
            self.stops.lock().expect("lock").push(Instant::now());
        }
    }
}

impl Recorder {
    fn stops(&self) -> Vec<Instant> {
        self.stops.lock().expect("lock").clone()
    }

    fn runs(&self, resource: &str) -> bool {
        let converges = self.converges.lock().expect("lock");
        converges
            .iter()
            .any(|(_, set)| set.iter().any(|r| r == resource))
    }
}

struct Agent {
    engine: Arc<Recorder>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), StoreError>>,
}

/// An agent on node n1 running the HA workload Container/web (assigned by an elected
/// controller), once it runs.
async fn agent_running_web(store: &Store) -> (Agent, i64) {
    let lease = store
        .grant_lease(Duration::from_secs(30))
        .await
        .expect("lease");
    let ctl = Election::new(store, "ctl", lease.0);
    let token = ctl.try_campaign().await.expect("campaign").expect("leads");
    let engine = Arc::new(Recorder::default());
    let (stop, rx) = watch::channel(false);
    let mut config = AgentConfig::new(test_node("n1"));
    config.lease = LeaseConfig::with_ttl(TTL);
    config.fence = FencePolicy::default();
    config.retry = Duration::from_millis(100);
    let (s, e) = (store.clone(), engine.clone() as Arc<dyn Converge>);
    let task = tokio::spawn(async move { agent::run(&s, &config, e, rx).await });
    let web = Assignment {
        resource: "Container/web".into(),
        node: "n1".into(),
        ha: true,
        revision: "r1".into(),
    };
    election::put_assignments(store, &token, &[web])
        .await
        .expect("assign");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !engine.runs("Container/web") {
        assert!(Instant::now() < deadline, "web never ran");
        sleep(Duration::from_millis(50)).await;
    }
    let owner = owner::owner_of(store, &"Container/web".parse().expect("ref"))
        .await
        .expect("owner")
        .expect("owned");
    // Let a few keepalives pass so the last acknowledgement is recent.
    sleep(Duration::from_secs(2)).await;
    (Agent { engine, stop, task }, owner.token.revision())
}

/// What member `url` says about its leader without quorum (leader 0, errors).
async fn status_of(url: &str) -> String {
    let Ok(mut c) = etcd_client::Client::connect([url], None).await else {
        return "no connection".into();
    };
    match timeout(Duration::from_secs(1), c.status()).await {
        Ok(Ok(s)) => format!("leader {} errors {:?}", s.leader(), s.errors()),
        Ok(Err(e)) => format!("error {e}"),
        Err(_) => "no answer in 1 s".into(),
    }
}

async fn wait_leader(etcd: &EtcdCluster) -> Duration {
    let t = Instant::now();
    let deadline = t + Duration::from_secs(30);
    while etcd.leader().await.is_none() {
        assert!(Instant::now() < deadline, "no leader after restart");
        sleep(Duration::from_millis(100)).await;
    }
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_quorum_holds_ha_workloads_without_fencing() {
    let test = "crashed_quorum_holds_ha_workloads_without_fencing";
    let Some(mut etcd) = or_skip(test, EtcdCluster::start().await) else {
        return;
    };
    let config = etcd.config("/q");
    let survivor = config.endpoints[0].clone();
    let store = Store::connect(&config).await.expect("store");
    let (agent, revision) = agent_running_web(&store).await;
    let converges_before = agent.engine.converges.lock().expect("lock").len();

    let lost = Instant::now();
    etcd.kill(1);
    etcd.kill(2);
    sleep(Duration::from_secs(2)).await;
    println!(
        "{test}: m0 without quorum answers status with {}",
        status_of(&survivor).await
    );
    // Three TTLs without quorum: the workload is neither stopped nor started again.
    sleep(TTL * 3 - Duration::from_secs(2)).await;
    assert_eq!(agent.engine.stops(), vec![], "fenced during the hold");
    let during = agent.engine.converges.lock().expect("lock").clone();
    let late: Vec<_> = during[converges_before..]
        .iter()
        .filter(|(at, _)| at.duration_since(lost) > Duration::from_secs(5))
        .collect();
    assert!(late.is_empty(), "converged while holding: {late:?}");

    etcd.restart(1).expect("restart m1");
    etcd.restart(2).expect("restart m2");
    let elected = wait_leader(&etcd).await;
    // The lease outlived the loss: the owner key (bound to it) is still there, same token.
    let deadline = Instant::now() + Duration::from_secs(10);
    let owner = loop {
        match owner::owner_of(&store, &"Container/web".parse().expect("ref")).await {
            Ok(o) => break o,
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("owner: {e}"),
        }
    };
    let owner = owner.expect("web still owned after the quorum returned");
    assert_eq!(owner.record.node, "n1");
    assert_eq!(
        owner.token.revision(),
        revision,
        "the owner key was replaced"
    );
    sleep(Duration::from_secs(3)).await;
    assert_eq!(
        agent.engine.stops(),
        vec![],
        "fenced after the quorum returned"
    );
    println!(
        "{test}: quorum lost {:.1} s, leader back {:.1} s after the restart; 0 fences, token kept",
        (lost.elapsed() - elected).as_secs_f64() - 3.0,
        elected.as_secs_f64()
    );
    let _ = agent.stop.send(true);
    let _ = timeout(Duration::from_secs(10), agent.task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_majority_is_not_proof_and_the_agent_fences_in_time() {
    let test = "paused_majority_is_not_proof_and_the_agent_fences_in_time";
    let Some(etcd) = or_skip(test, EtcdCluster::start().await) else {
        return;
    };
    let store = Store::connect(&etcd.config("/q")).await.expect("store");
    let (agent, _) = agent_running_web(&store).await;
    // The leader and one follower: the survivor is a follower, so no keepalive is answered
    // after the pause (a leader left alone still renews leases until it steps down, which
    // moves the deadline, soundly, past this test's bound).
    let leader = etcd.leader().await.expect("a leader");
    let other = (0..3).find(|&i| i != leader).expect("a follower");
    let paused = Instant::now();
    etcd.pause(leader);
    etcd.pause(other);
    let deadline = paused + TTL * 2;
    while agent.engine.stops().is_empty() && Instant::now() < deadline {
        sleep(Duration::from_millis(20)).await;
    }
    etcd.resume(leader);
    etcd.resume(other);
    let stops = agent.engine.stops();
    let first = *stops.first().expect("the agent never fenced");
    let after = first.duration_since(paused);
    println!(
        "{test}: fenced {:.2} s after two members paused (TTL {TTL:?})",
        after.as_secs_f64()
    );
    // The last acknowledged keepalive was sent before the pause: its lease lives at least until
    // then + TTL, and the fence must come before that.
    assert!(after < TTL, "fenced {after:?} after the pause, TTL {TTL:?}");
    let _ = agent.stop.send(true);
    let _ = timeout(Duration::from_secs(10), agent.task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalives_move_off_a_silent_member_without_fencing() {
    let test = "keepalives_move_off_a_silent_member_without_fencing";
    let Some(etcd) = or_skip(test, EtcdCluster::start().await) else {
        return;
    };
    let store = Store::connect(&etcd.config("/k")).await.expect("store");
    let registration = stead_cluster::registry::Registration::register(
        &store,
        &test_node("n1"),
        LeaseConfig::with_ttl(TTL),
    )
    .await
    .expect("register");
    let fences = Arc::new(Mutex::new(0usize));
    let counter = fences.clone();
    let guard = stead_cluster::fence::FenceGuard::spawn(
        registration.liveness(),
        FencePolicy::default(),
        Arc::new(move || *counter.lock().expect("lock") += 1),
    );
    let gaps = largest_ack_gap(registration.liveness());
    // Each follower in turn goes silent (paused: connections accepted, nothing answered) for
    // two TTLs, as a member cut off from the others and from this client would.
    let leader = etcd.leader().await.expect("a leader");
    for silent in (0..3).filter(|&i| i != leader) {
        etcd.pause(silent);
        sleep(TTL * 2).await;
        etcd.resume(silent);
        wait_leader(&etcd).await;
        sleep(Duration::from_secs(2)).await;
    }
    drop(guard);
    drop(registration);
    let largest = gaps.await.expect("gaps");
    let fenced = *fences.lock().expect("lock");
    println!(
        "{test}: TTL {TTL:?}: largest gap between acknowledged keepalives {largest:?}; fences {fenced}"
    );
    assert_eq!(fenced, 0, "largest ack gap {largest:?}");
}
