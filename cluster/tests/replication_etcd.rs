//! Replication schedule and status against a real etcd 3.4 member on 127.0.0.1: a due job
//! runs and records its point; a failure is recorded with backoff and keeps the last point;
//! an agent that lost the workload's ownership neither transfers nor writes status.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use stead_cluster::etcd::Store;
use stead_cluster::keys::ResourceRef;
use stead_cluster::owner::{self, Holder};
use stead_cluster::replication::{
    self, Outcome, ReplicationJob, Replicator, Transfer, TransferReport,
};
use stead_cluster::testkit::member_with_store;

async fn lease(store: &Store) -> i64 {
    store
        .grant_lease(Duration::from_secs(30))
        .await
        .expect("lease")
        .0
}

/// A transfer that fails while `fail` is set and counts its calls.
#[derive(Default)]
struct Scripted {
    calls: AtomicUsize,
    fail: AtomicU64,
}

impl Transfer for Scripted {
    fn transfer(&self, _job: &ReplicationJob) -> Result<TransferReport, String> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) as u64 + 1;
        if self.fail.load(Ordering::SeqCst) != 0 {
            return Err("peer unreachable".into());
        }
        Ok(TransferReport {
            seq: n,
            taken_at: 1000 + n,
            bytes: 10 << 20,
            incremental: n > 1,
            duration: Duration::from_millis(700),
            kept: None,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_runs_when_due_records_status_and_stops_when_fenced() {
    let Some((_etcd, store)) = member_with_store(
        "replication_runs_when_due_records_status_and_stops_when_fenced",
        "/t",
    )
    .await
    else {
        return;
    };
    let web = ResourceRef::new("Container", "web").expect("ref");
    let n1 = Holder {
        node: "n1".into(),
        lease: lease(&store).await,
    };
    let token = owner::acquire(&store, &web, &n1)
        .await
        .expect("acquire")
        .expect("owned");
    let job = ReplicationJob {
        volume: "data".into(),
        to: "n2".into(),
        every: Duration::from_secs(60),
        token: token.clone(),
    };
    let transfer = Arc::new(Scripted::default());
    let r = Replicator::new(store.clone(), "n1", transfer.clone());

    // Never replicated: due now; the status holds the point and the lag.
    let out = r
        .tick(std::slice::from_ref(&job), &|| 1010)
        .await
        .expect("tick");
    assert!(matches!(out[0].1, Outcome::Replicated(_)), "{out:?}");
    let s = replication::read_status(&store, "data")
        .await
        .expect("read")
        .expect("status");
    assert_eq!(
        (s.seq, s.last_point, s.lag_s),
        (Some(1), Some(1001), Some(9))
    );
    assert_eq!(
        (s.from.as_str(), s.to.as_str(), s.bytes),
        ("n1", "n2", 10 << 20)
    );

    // Not due before `every` has passed.
    let out = r
        .tick(std::slice::from_ref(&job), &|| 1030)
        .await
        .expect("tick");
    assert_eq!(out[0].1, Outcome::NotDue(1070));
    assert_eq!(transfer.calls.load(Ordering::SeqCst), 1);

    // A failure: recorded, the last point kept, retried after the backoff (10 s).
    transfer.fail.store(1, Ordering::SeqCst);
    let out = r
        .tick(std::slice::from_ref(&job), &|| 1070)
        .await
        .expect("tick");
    assert!(matches!(out[0].1, Outcome::Failed(_)), "{out:?}");
    let s = replication::read_status(&store, "data")
        .await
        .expect("read")
        .expect("status");
    assert_eq!((s.failures, s.last_point), (1, Some(1001)));
    assert_eq!(s.last_error.as_deref(), Some("peer unreachable"));
    let out = r
        .tick(std::slice::from_ref(&job), &|| 1075)
        .await
        .expect("tick");
    assert_eq!(out[0].1, Outcome::NotDue(1080));

    // n1 loses the workload (its lease goes, n2 takes over): no transfer, no status write.
    store.revoke_lease(n1.lease).await.expect("revoke");
    let n2 = Holder {
        node: "n2".into(),
        lease: lease(&store).await,
    };
    let t2 = owner::acquire(&store, &web, &n2)
        .await
        .expect("acquire")
        .expect("taken over");
    transfer.fail.store(0, Ordering::SeqCst);
    let calls = transfer.calls.load(Ordering::SeqCst);
    let out = r
        .tick(std::slice::from_ref(&job), &|| 2000)
        .await
        .expect("tick");
    assert_eq!(out[0].1, Outcome::Fenced);
    assert_eq!(
        transfer.calls.load(Ordering::SeqCst),
        calls,
        "a fenced agent sent"
    );
    let s = replication::read_status(&store, "data")
        .await
        .expect("read")
        .expect("status");
    assert_eq!(s.failures, 1, "a fenced agent wrote status");
    // The stale token cannot write directly either; the new owner can.
    let stale = replication::write_status(&store, "data", &s, &token).await;
    assert!(
        matches!(stale, Err(stead_cluster::etcd::StoreError::Fenced(_))),
        "{stale:?}"
    );
    replication::write_status(&store, "data", &s, &t2)
        .await
        .expect("new owner writes");
    let record = replication::FailoverRecord {
        node: "n2".into(),
        at: 2010,
        seq: 1,
        point: 1001,
        window_s: 1009,
    };
    replication::record_failover(&store, "data", record.clone(), &token)
        .await
        .expect_err("the old owner cannot record a failover");
    replication::record_failover(&store, "data", record.clone(), &t2)
        .await
        .expect("failover recorded");
    let s = replication::read_status(&store, "data")
        .await
        .expect("read")
        .expect("status");
    assert_eq!((s.from.as_str(), s.failover), ("n2", Some(record)));
    let all = replication::list_status(&store).await.expect("list");
    assert_eq!(all.keys().collect::<Vec<_>>(), ["data"]);
}
