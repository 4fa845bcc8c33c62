//! Keepalives across etcd leader elections, on three real members on 127.0.0.1
//! (stead_cluster::testkit::EtcdCluster). Without the etcd binary the test prints SKIP.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use stead_cluster::etcd::Store;
use stead_cluster::fence::{FenceGuard, FencePolicy};
use stead_cluster::registry::{LeaseConfig, Registration};
use stead_cluster::testkit::{EtcdCluster, largest_ack_gap, or_skip, test_node};
use tokio::time::{Instant, sleep};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalives_survive_etcd_leader_kills_without_fencing() {
    let test = "keepalives_survive_etcd_leader_kills_without_fencing";
    let Some(mut etcd) = or_skip(test, EtcdCluster::start().await) else {
        return;
    };
    let store = Store::connect(&etcd.config("/t")).await.expect("store");
    let ttl = Duration::from_secs(6);
    let registration = Registration::register(&store, &test_node("n1"), LeaseConfig::with_ttl(ttl))
        .await
        .expect("register");
    let fences = Arc::new(AtomicUsize::new(0));
    let counter = fences.clone();
    let guard = FenceGuard::spawn(
        registration.liveness(),
        FencePolicy::default(),
        Arc::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }),
    );

    // Record the largest gap between acknowledged keepalives while leaders are killed.
    let gaps = largest_ack_gap(registration.liveness());

    for round in 0..3 {
        let leader = etcd.leader().await.expect("a leader");
        let killed = Instant::now();
        etcd.kill(leader);
        let deadline = Instant::now() + Duration::from_secs(15);
        let elected = loop {
            if let Some(new) = etcd.leader().await {
                break new;
            }
            assert!(Instant::now() < deadline, "no new leader");
            sleep(Duration::from_millis(50)).await;
        };
        println!(
            "round {round}: killed m{leader}, m{elected} leads after {:?}",
            killed.elapsed()
        );
        sleep(Duration::from_secs(2)).await;
        etcd.restart(leader).expect("restart");
        sleep(Duration::from_secs(3)).await;
    }
    drop(guard);
    drop(registration);
    let largest = gaps.await.expect("gaps");
    let fenced = fences.load(Ordering::SeqCst);
    println!(
        "TTL {ttl:?}: largest gap between acknowledged keepalives {largest:?}; fences {fenced}"
    );
    assert_eq!(fenced, 0, "largest ack gap {largest:?}");
}
