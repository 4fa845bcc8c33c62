//! Live hand-over between two agents against a real etcd member on 127.0.0.1 (the leader's
//! writes done by the test, the engines fakes that record what they were asked): the target
//! starts a waiting VM, the owning source sends the guest and reports progress fenced by its
//! token, the ownership moves only after `completed` (released by the source, acquired by
//! the target), and a failed send leaves the guest running on, and owned by, the source.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use stead_cluster::agent::{Converge, ConvergeError, Owned};
use stead_cluster::election::{self, Election};
use stead_cluster::etcd::Store;
use stead_cluster::keys::ResourceRef;
use stead_cluster::migrate::{self, LiveProgress, MigrationRecord, MigrationState};
use stead_cluster::model::Assignment;
use stead_cluster::owner;
use stead_cluster::testkit::{RunningAgent, agent_config, member_with_store, spawn_agent};
use tokio::time::Instant;

const VM: &str = "VirtualMachine/web";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Converge(Vec<String>),
    StartIncoming(String),
    MigrateOut(String, String),
    Finish(String),
    Abort(String),
    ResumeOut(String),
    StopHa(Vec<String>),
}

/// What the VM's QEMU says of the send a previous agent started.
#[derive(Debug, Clone)]
enum Resumed {
    /// Still active: these reports, then completed.
    Active(Vec<u8>),
    /// Failed, cancelled or never started: this reason.
    Failed(String),
}

#[derive(Default)]
struct LiveFake {
    calls: Mutex<Vec<Call>>,
    /// Why the send fails (`None`: it completes).
    send_fails: Option<String>,
    /// Progress reports before the end (default 3, 600 ms apart).
    reports: Option<u8>,
    /// How a send found under way ends (`None`: the fake cannot follow one).
    resumed: Option<Resumed>,
    /// Whether the VM waiting for the guest runs it.
    incoming_runs: bool,
}

fn progress(pct: u8) -> LiveProgress {
    LiveProgress {
        phase: if pct == 100 { "completed" } else { "active" }.into(),
        ram_percent: pct,
        sent_mib: u64::from(pct),
        remaining_mib: 100 - u64::from(pct),
        mib_per_s: 50.0,
        elapsed_s: f64::from(pct) / 50.0,
        downtime_ms: None,
        disk_mib: None,
    }
}

impl Converge for LiveFake {
    fn converge(&self, owned: &[Owned]) -> Result<(), ConvergeError> {
        let set = owned.iter().map(|o| o.resource.to_string()).collect();
        self.push(Call::Converge(set));
        Ok(())
    }

    fn stop_ha(&self, resources: &[ResourceRef]) {
        let set = resources.iter().map(ToString::to_string).collect();
        self.push(Call::StopHa(set));
    }

    fn start_incoming(&self, resource: &ResourceRef) -> Result<String, ConvergeError> {
        self.push(Call::StartIncoming(resource.to_string()));
        Ok("tcp:127.0.0.1:49152".into())
    }

    fn migrate_out(
        &self,
        owned: &Owned,
        uri: &str,
        report: &mut dyn FnMut(LiveProgress) -> bool,
    ) -> Result<LiveProgress, ConvergeError> {
        self.push(Call::MigrateOut(owned.resource.to_string(), uri.into()));
        let n = self.reports.unwrap_or(3);
        for pct in (1..=n).map(|i| u8::try_from(u16::from(i) * 90 / u16::from(n)).unwrap_or(90)) {
            if !report(progress(pct)) {
                return Err(ConvergeError("cancelled".into()));
            }
            std::thread::sleep(Duration::from_millis(600));
        }
        match &self.send_fails {
            Some(why) => Err(ConvergeError(why.clone())),
            None => Ok(progress(100)),
        }
    }

    fn resume_out(
        &self,
        owned: &Owned,
        report: &mut dyn FnMut(LiveProgress) -> bool,
    ) -> Result<LiveProgress, ConvergeError> {
        self.push(Call::ResumeOut(owned.resource.to_string()));
        match &self.resumed {
            Some(Resumed::Active(reports)) => {
                for pct in reports {
                    if !report(progress(*pct)) {
                        return Err(ConvergeError("cancelled".into()));
                    }
                    std::thread::sleep(Duration::from_millis(600));
                }
                Ok(progress(100))
            }
            Some(Resumed::Failed(why)) => Err(ConvergeError(why.clone())),
            None => Err(ConvergeError("cannot follow".into())),
        }
    }

    fn incoming_runs(&self, _: &ResourceRef) -> bool {
        self.incoming_runs
    }

    fn finish_incoming(&self, resource: &ResourceRef) -> Result<(), ConvergeError> {
        self.push(Call::Finish(resource.to_string()));
        Ok(())
    }

    fn abort_incoming(&self, resource: &ResourceRef) {
        self.push(Call::Abort(resource.to_string()));
    }
}

impl LiveFake {
    fn push(&self, c: Call) {
        self.calls.lock().expect("lock").push(c);
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("lock").clone()
    }

    async fn wait_for(&self, what: &str, pred: impl Fn(&Call) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.calls().iter().any(&pred) {
            assert!(Instant::now() < deadline, "{what}: {:?}", self.calls());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn runs_vm(c: &Call) -> bool {
    matches!(c, Call::Converge(set) if set.iter().any(|r| r == VM))
}

fn res(s: &str) -> ResourceRef {
    s.parse().expect("resource")
}

type Agent = RunningAgent<LiveFake>;

fn start(store: &Store, name: &str, engine: LiveFake) -> Agent {
    start_with_ttl(store, name, engine, Duration::from_secs(10))
}

fn start_with_ttl(store: &Store, name: &str, engine: LiveFake, ttl: Duration) -> Agent {
    spawn_agent(store, agent_config(name, ttl), Arc::new(engine))
}

fn assignment(node: &str) -> Assignment {
    assignment_ha(node, false)
}

fn assignment_ha(node: &str, ha: bool) -> Assignment {
    Assignment {
        resource: VM.into(),
        node: node.into(),
        ha,
        revision: String::new(),
    }
}

/// Waits until the record is in `state`; the record.
async fn record_in(store: &Store, state: MigrationState) -> MigrationRecord {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = migrate::read(store, &res(VM)).await.expect("read");
        if let Some(r) = r.filter(|r| r.state == state) {
            return r;
        }
        assert!(Instant::now() < deadline, "record never {state:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn owner_node(store: &Store) -> Option<(String, i64)> {
    owner::owner_of(store, &res(VM))
        .await
        .expect("owner")
        .map(|o| (o.record.node, o.token.revision()))
}

/// Two agents, `web` running on n1, and the record the leader writes for a live move to n2.
async fn running_on_n1(
    store: &Store,
    source: LiveFake,
) -> (Agent, Agent, election::LeaderToken, i64) {
    running_on_n1_with(store, source, false, Duration::from_secs(10)).await
}

/// [`running_on_n1`] with `web` highly available or not, and agents with a lease of `ttl`.
async fn running_on_n1_with(
    store: &Store,
    source: LiveFake,
    ha: bool,
    ttl: Duration,
) -> (Agent, Agent, election::LeaderToken, i64) {
    let (id, _) = store
        .grant_lease(Duration::from_secs(60))
        .await
        .expect("lease");
    let ctl = Election::new(store, "ctl", id);
    let token = ctl.try_campaign().await.expect("campaign").expect("leads");
    let n1 = start_with_ttl(store, "n1", source, ttl);
    let n2 = start_with_ttl(store, "n2", LiveFake::default(), ttl);
    election::put_assignments(store, &token, &[assignment_ha("n1", ha)])
        .await
        .expect("assign");
    n1.engine.wait_for("web runs on n1", runs_vm).await;
    let (_, t1) = owner_node(store).await.expect("n1 owns web");
    let record = MigrationRecord::request("n2")
        .preparing("n1", ha)
        .expect("preparing");
    migrate::put(store, &res(VM), &record)
        .await
        .expect("record");
    (n1, n2, token, t1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_move_hands_ownership_over_only_after_the_guest_left() {
    let test = "a_live_move_hands_ownership_over_only_after_the_guest_left";
    let Some((_etcd, store)) = member_with_store(test, "/t").await else {
        return;
    };
    let (n1, n2, token, t1) = running_on_n1(&store, LiveFake::default()).await;

    // `incoming` lasts as long as the source takes to start sending: its address stays.
    let transferring = record_in(&store, MigrationState::Transferring).await;
    assert_eq!(transferring.listen.as_deref(), Some("tcp:127.0.0.1:49152"));
    assert!(transferring.progress.is_some(), "{transferring:?}");
    assert_eq!(
        owner_node(&store).await.map(|o| o.0).as_deref(),
        Some("n1"),
        "the source owns it while it sends"
    );
    let done = record_in(&store, MigrationState::Completed).await;
    assert_eq!(done.progress.as_ref().map(|p| p.ram_percent), Some(100));
    n2.engine
        .wait_for(
            "n2 finished its incoming VM",
            |c| matches!(c, Call::Finish(r) if r == VM),
        )
        .await;

    // What the leader does once the guest runs on n2: assign it there, mark it assigned.
    election::put_assignments(&store, &token, &[assignment("n2")])
        .await
        .expect("reassign");
    let assigned = done.to_state(MigrationState::Assigned).expect("assigned");
    migrate::put(&store, &res(VM), &assigned)
        .await
        .expect("record");
    n2.engine.wait_for("web runs on n2", runs_vm).await;
    let (owner, t2) = owner_node(&store).await.expect("owned");
    assert_eq!(owner, "n2");
    assert!(t2 > t1, "a new owner key, a new token: {t1} -> {t2}");

    let calls = n1.engine.calls();
    let sent = calls
        .iter()
        .position(
            |c| matches!(c, Call::MigrateOut(r, uri) if r == VM && uri == "tcp:127.0.0.1:49152"),
        )
        .expect("n1 sent web");
    assert!(
        !calls[sent..].iter().any(runs_vm),
        "n1 never ran web again after sending it: {calls:?}"
    );
    let n2_calls = n2.engine.calls();
    assert!(
        !n2_calls.iter().any(|c| matches!(c, Call::Abort(_))),
        "{n2_calls:?}"
    );
    n1.stop().await;
    n2.stop().await;
}

/// Whether `c` stops `web` (a fence's `stop_ha`).
fn stops_vm(c: &Call) -> bool {
    matches!(c, Call::StopHa(set) if set.iter().any(|r| r == VM))
}

/// A highly available guest runs on n2 from the moment the move completes, but n2 owns it
/// only once the leader reassigned it and n1 released its key. A fence of n2 in between must
/// stop it: n2 no longer answers etcd, so the workload may be given to another node. A
/// guest that is not highly available keeps running (nothing fails it over).
async fn fence_between_completed_and_owned(test: &str, ha: bool) {
    let Some((etcd, store)) = member_with_store(test, "/t").await else {
        return;
    };
    let ttl = Duration::from_secs(3);
    let (n1, n2, _token, _) = running_on_n1_with(&store, LiveFake::default(), ha, ttl).await;
    record_in(&store, MigrationState::Completed).await;
    n2.engine
        .wait_for(
            "n2 runs the guest",
            |c| matches!(c, Call::Finish(r) if r == VM),
        )
        .await;
    // The leader has not reassigned it yet: n1 still holds the owner key.
    assert_eq!(owner_node(&store).await.map(|o| o.0).as_deref(), Some("n1"));
    assert!(
        !n2.engine.calls().iter().any(stops_vm),
        "{:?}",
        n2.engine.calls()
    );

    let paused = Instant::now();
    etcd.pause();
    // Both agents fence (each stops its HA list, maybe empty) within the TTL.
    let deadline = paused + ttl + Duration::from_secs(5);
    while !n2
        .engine
        .calls()
        .iter()
        .any(|c| matches!(c, Call::StopHa(_)))
    {
        assert!(
            Instant::now() < deadline,
            "n2 never fenced: {:?}",
            n2.engine.calls()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "n2 fenced {:?} after etcd stopped answering",
        paused.elapsed()
    );
    let stopped = n2.engine.calls().iter().any(stops_vm);
    etcd.resume();
    if ha {
        assert!(stopped, "n2's fence stopped web: {:?}", n2.engine.calls());
    } else {
        assert!(!stopped, "web is not HA: {:?}", n2.engine.calls());
    }
    n1.stop().await;
    n2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_of_the_target_stops_an_ha_guest_it_does_not_own_yet() {
    fence_between_completed_and_owned(
        "a_fence_of_the_target_stops_an_ha_guest_it_does_not_own_yet",
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_of_the_target_leaves_a_guest_that_is_not_ha() {
    fence_between_completed_and_owned("a_fence_of_the_target_leaves_a_guest_that_is_not_ha", false)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_live_move_leaves_the_guest_on_the_source_and_kills_the_target() {
    let test = "a_failed_live_move_leaves_the_guest_on_the_source_and_kills_the_target";
    let Some((_etcd, store)) = member_with_store(test, "/t").await else {
        return;
    };
    let source = LiveFake {
        send_fails: Some("migration failed: connection reset".into()),
        ..LiveFake::default()
    };
    let (n1, n2, _token, t1) = running_on_n1(&store, source).await;
    let failed = record_in(&store, MigrationState::Failed).await;
    let why = failed.message.unwrap_or_default();
    assert!(why.contains("connection reset"), "{why}");
    n2.engine
        .wait_for(
            "n2 killed its waiting VM",
            |c| matches!(c, Call::Abort(r) if r == VM),
        )
        .await;
    assert_eq!(
        owner_node(&store).await,
        Some(("n1".into(), t1)),
        "n1 keeps the same ownership"
    );
    // The source converges again after the failed send, web included.
    let sent = n1
        .engine
        .calls()
        .iter()
        .position(|c| matches!(c, Call::MigrateOut(..)))
        .expect("sent");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !n1.engine.calls()[sent..].iter().any(runs_vm) {
        assert!(Instant::now() < deadline, "{:?}", n1.engine.calls());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    n1.stop().await;
    n2.stop().await;
}

/// `stead migrate --clear` while the guest is being sent cancels the move: the source's next
/// progress write is refused, it cancels the send, keeps the guest and its ownership, and
/// the target kills its waiting VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clearing_a_live_move_in_flight_cancels_it_and_the_guest_stays() {
    let test = "clearing_a_live_move_in_flight_cancels_it_and_the_guest_stays";
    let Some((_etcd, store)) = member_with_store(test, "/t").await else {
        return;
    };
    let source = LiveFake {
        reports: Some(10),
        ..LiveFake::default()
    };
    let (n1, n2, _token, t1) = running_on_n1(&store, source).await;
    record_in(&store, MigrationState::Transferring).await;
    assert!(migrate::clear(&store, &res(VM)).await.expect("clear"));
    n2.engine
        .wait_for(
            "n2 killed its waiting VM",
            |c| matches!(c, Call::Abort(r) if r == VM),
        )
        .await;
    let sent = n1
        .engine
        .calls()
        .iter()
        .position(|c| matches!(c, Call::MigrateOut(..)))
        .expect("sent");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !n1.engine.calls()[sent..].iter().any(runs_vm) {
        assert!(Instant::now() < deadline, "{:?}", n1.engine.calls());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(owner_node(&store).await, Some(("n1".into(), t1)));
    assert!(
        migrate::read(&store, &res(VM))
            .await
            .expect("read")
            .is_none(),
        "a cancelled move writes nothing back"
    );
    n1.stop().await;
    n2.stop().await;
}

/// `web` running on and owned by n1, whose agent dies (no shutdown: its lease lives on) in
/// the middle of sending it to n2; a new agent of n1 starts with `engine`. The leader's
/// token, the new agent and n1's token.
async fn restarted_mid_send(
    store: &Store,
    engine: LiveFake,
) -> (election::LeaderToken, Agent, i64) {
    let (id, _) = store
        .grant_lease(Duration::from_secs(60))
        .await
        .expect("lease");
    let ctl = Election::new(store, "ctl", id);
    let token = ctl.try_campaign().await.expect("campaign").expect("leads");
    let n1 = start(store, "n1", LiveFake::default());
    election::put_assignments(store, &token, &[assignment("n1")])
        .await
        .expect("assign");
    n1.engine.wait_for("web runs on n1", runs_vm).await;
    let (_, t1) = owner_node(store).await.expect("n1 owns web");
    crash(n1).await;
    let record = MigrationRecord::request("n2")
        .preparing("n1", false)
        .and_then(|r| r.incoming("tcp:127.0.0.1:49152"))
        .and_then(|r| r.transferring(progress(30)))
        .expect("transferring");
    migrate::put(store, &res(VM), &record)
        .await
        .expect("record");
    (token, start(store, "n1", engine), t1)
}

/// A restarted agent converges nothing before it knows what is assigned to it: a converge
/// of the empty set (no snapshot of the assignments yet) would stop every workload its node
/// runs. Its first converge already runs `web`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_converges_nothing_before_it_knows_its_assignments() {
    let test = "a_restarted_agent_converges_nothing_before_it_knows_its_assignments";
    let Some((_etcd, store)) = member_with_store(test, "/t").await else {
        return;
    };
    let (id, _) = store
        .grant_lease(Duration::from_secs(60))
        .await
        .expect("lease");
    let ctl = Election::new(&store, "ctl", id);
    let token = ctl.try_campaign().await.expect("campaign").expect("leads");
    let mut n1 = start(&store, "n1", LiveFake::default());
    election::put_assignments(&store, &token, &[assignment("n1")])
        .await
        .expect("assign");
    n1.engine.wait_for("web runs on n1", runs_vm).await;
    for round in 0..3 {
        crash(n1).await;
        let again = start(&store, "n1", LiveFake::default());
        again.engine.wait_for("web runs again", runs_vm).await;
        let calls = again.engine.calls();
        let first = calls.iter().find(|c| matches!(c, Call::Converge(_)));
        assert!(
            first.is_some_and(runs_vm),
            "restart {round}: the first converge runs web: {calls:?}"
        );
        n1 = again;
    }
    n1.stop().await;
}

/// Waits until the record is `transferring` with `pct` % reported.
async fn reported(store: &Store, pct: u8) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = migrate::read(store, &res(VM)).await.expect("read");
        if r.is_some_and(|r| {
            r.state == MigrationState::Transferring
                && r.progress.is_some_and(|p| p.ram_percent == pct)
        }) {
            return;
        }
        assert!(Instant::now() < deadline, "{pct} % never reported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A source agent restarted while QEMU sends the guest follows the send to its end, writes
/// `completed`, never runs the guest again, and gives its ownership up once the workload is
/// assigned to the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_source_follows_the_send_under_way_to_completed() {
    let test = "a_restarted_source_follows_the_send_under_way_to_completed";
    let Some((_etcd, store)) = member_with_store(test, "/t").await else {
        return;
    };
    let engine = LiveFake {
        resumed: Some(Resumed::Active(vec![60, 90])),
        ..LiveFake::default()
    };
    let (token, n1, t1) = restarted_mid_send(&store, engine).await;
    reported(&store, 60).await;
    assert_eq!(
        owner_node(&store).await,
        Some(("n1".into(), t1)),
        "the restarted agent sends with the same ownership"
    );
    let done = record_in(&store, MigrationState::Completed).await;
    assert_eq!(done.progress.as_ref().map(|p| p.ram_percent), Some(100));
    let calls = n1.engine.calls();
    assert!(
        calls.contains(&Call::ResumeOut(VM.into())),
        "asked QEMU: {calls:?}"
    );
    assert!(
        !calls
            .iter()
            .any(|c| runs_vm(c) || matches!(c, Call::MigrateOut(..))),
        "never ran nor sent web again: {calls:?}"
    );
    election::put_assignments(&store, &token, &[assignment("n2")])
        .await
        .expect("reassign");
    let deadline = Instant::now() + Duration::from_secs(15);
    while owner_node(&store).await.is_some() {
        assert!(Instant::now() < deadline, "n1 never released web");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!n1.engine.calls().iter().any(runs_vm));
    n1.stop().await;
}

/// A source agent restarted after QEMU's send failed (or never started) records the move
/// `failed` with QEMU's reason and keeps running and owning the guest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_source_whose_send_failed_keeps_the_guest() {
    let test = "a_restarted_source_whose_send_failed_keeps_the_guest";
    let Some((_etcd, store)) = member_with_store(test, "/t").await else {
        return;
    };
    let engine = LiveFake {
        resumed: Some(Resumed::Failed("QEMU has no migration".into())),
        ..LiveFake::default()
    };
    let (_token, n1, t1) = restarted_mid_send(&store, engine).await;
    let failed = record_in(&store, MigrationState::Failed).await;
    let why = failed.message.unwrap_or_default();
    assert!(why.contains("QEMU has no migration"), "{why}");
    n1.engine.wait_for("web runs on n1 again", runs_vm).await;
    let calls = n1.engine.calls();
    let asked = calls
        .iter()
        .position(|c| c == &Call::ResumeOut(VM.into()))
        .expect("asked QEMU");
    assert!(
        !calls[..asked].iter().any(runs_vm),
        "nothing converged before QEMU was asked: {calls:?}"
    );
    assert_eq!(owner_node(&store).await, Some(("n1".into(), t1)));
    n1.stop().await;
}

/// Ends an agent without its shutdown (its lease and owner keys live on until they expire).
async fn crash(agent: Agent) {
    agent.crash().await;
}

/// Both agents die while n1 sends `web` to n2 (the record says `transferring`); n2's agent
/// starts again with `engine`. The leader's token, n2's new agent.
async fn target_restarted_mid_send(
    store: &Store,
    engine: LiveFake,
) -> (election::LeaderToken, Agent) {
    let source = LiveFake {
        reports: Some(20),
        ..LiveFake::default()
    };
    let (n1, n2, token, _) = running_on_n1(store, source).await;
    record_in(store, MigrationState::Transferring).await;
    crash(n1).await;
    crash(n2).await;
    (token, start(store, "n2", engine))
}

/// A target agent restarted while its VM received the guest, whose VM runs the guest now,
/// takes it up: records the move `completed`, keeps the VM (no converge kills it before it
/// owns it) and acquires the ownership once the source's key is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_target_whose_vm_runs_the_guest_takes_it_over() {
    let test = "a_restarted_target_whose_vm_runs_the_guest_takes_it_over";
    let Some((_etcd, store)) = member_with_store(test, "/t").await else {
        return;
    };
    let engine = LiveFake {
        incoming_runs: true,
        ..LiveFake::default()
    };
    let (token, n2) = target_restarted_mid_send(&store, engine).await;
    let done = record_in(&store, MigrationState::Completed).await;
    assert_eq!(done.to, "n2");
    n2.engine
        .wait_for(
            "n2 took the VM up",
            |c| matches!(c, Call::Finish(r) if r == VM),
        )
        .await;
    // What the leader does with `completed`: the source's key expires with its lease.
    election::put_assignments(&store, &token, &[assignment("n2")])
        .await
        .expect("reassign");
    let deadline = Instant::now() + Duration::from_secs(30);
    while owner_node(&store).await.map(|o| o.0).as_deref() != Some("n2") {
        assert!(Instant::now() < deadline, "n2 never acquired web");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    n2.engine.wait_for("web runs on n2", runs_vm).await;
    let calls = n2.engine.calls();
    assert!(
        !calls.iter().any(|c| matches!(c, Call::Abort(_))),
        "the only copy is never killed: {calls:?}"
    );
    let finished = calls
        .iter()
        .position(|c| matches!(c, Call::Finish(_)))
        .expect("finished");
    assert!(
        !calls[..finished]
            .iter()
            .any(|c| matches!(c, Call::Converge(_))),
        "nothing converged before the VM was taken up: {calls:?}"
    );
    n2.stop().await;
}

/// A target agent restarted while its VM still waited kills that VM and records the move
/// `failed`: the guest stays with the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_target_whose_vm_still_waits_fails_the_move() {
    let test = "a_restarted_target_whose_vm_still_waits_fails_the_move";
    let Some((_etcd, store)) = member_with_store(test, "/t").await else {
        return;
    };
    let (_token, n2) = target_restarted_mid_send(&store, LiveFake::default()).await;
    let failed = record_in(&store, MigrationState::Failed).await;
    let why = failed.message.unwrap_or_default();
    assert!(why.contains("target's agent restarted"), "{why}");
    n2.engine
        .wait_for(
            "n2 killed its waiting VM",
            |c| matches!(c, Call::Abort(r) if r == VM),
        )
        .await;
    assert_eq!(owner_node(&store).await.map(|o| o.0).as_deref(), Some("n1"));
    n2.stop().await;
}

/// How a move cleared around its end settled.
#[derive(Debug, PartialEq)]
enum Settled {
    /// Completed: the target owns and runs the guest.
    Moved,
    /// Given up: the source still owns and runs it, the target killed its VM.
    Stayed,
}

/// Waits until the move settles one way or the other (playing the leader for `completed`);
/// panics when it settles neither way.
async fn settle(
    store: &Store,
    token: &election::LeaderToken,
    n1: &Agent,
    n2: &Agent,
    t1: i64,
) -> Settled {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let record = migrate::read(store, &res(VM)).await.expect("read");
        if let Some(done) = record.filter(|r| r.state == MigrationState::Completed) {
            election::put_assignments(store, token, &[assignment("n2")])
                .await
                .expect("reassign");
            let assigned = done.to_state(MigrationState::Assigned).expect("assigned");
            migrate::put(store, &res(VM), &assigned).await.expect("put");
            n2.engine.wait_for("web runs on n2", runs_vm).await;
            assert_eq!(owner_node(store).await.map(|o| o.0).as_deref(), Some("n2"));
            let calls = n1.engine.calls();
            let sent = calls.iter().position(|c| matches!(c, Call::MigrateOut(..)));
            assert!(
                !calls[sent.expect("sent")..].iter().any(runs_vm),
                "n1 never ran web again: {calls:?}"
            );
            return Settled::Moved;
        }
        let calls = n1.engine.calls();
        let sent = calls.iter().position(|c| matches!(c, Call::MigrateOut(..)));
        let runs_again = sent.is_some_and(|s| calls[s..].iter().any(runs_vm));
        if runs_again
            && n2
                .engine
                .calls()
                .iter()
                .any(|c| matches!(c, Call::Abort(_)))
        {
            assert_eq!(owner_node(store).await, Some(("n1".into(), t1)));
            return Settled::Stayed;
        }
        assert!(
            Instant::now() < deadline,
            "neither moved nor stayed: record {:?}, n1 {calls:?}, n2 {:?}",
            migrate::read(store, &res(VM)).await,
            n2.engine.calls()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `stead migrate --clear` racing the end of a send (cleared at moments before, around and
/// after the guest leaves): the move either completed and the target owns the guest, or
/// was given up and the source still owns and runs it; never neither. A move whose
/// `completed` is written is not cleared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clearing_as_the_send_completes_settles_one_way_or_the_other() {
    let test = "clearing_as_the_send_completes_settles_one_way_or_the_other";
    let mut seen = Vec::new();
    // The send: reports at 0, 0.6, 1.2 and 1.8 s (written at 0 and 1.2 s), done at 2.4 s.
    for (i, delay_ms) in [100u64, 1000, 2250, 2350, 2450, 2700]
        .into_iter()
        .enumerate()
    {
        let Some((_etcd, store)) = member_with_store(&format!("{test}-{i}"), "/t").await else {
            return;
        };
        let source = LiveFake {
            reports: Some(4),
            ..LiveFake::default()
        };
        let (n1, n2, token, t1) = running_on_n1(&store, source).await;
        record_in(&store, MigrationState::Transferring).await;
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        let cancelled = migrate::cancel(&store, &res(VM)).await.expect("cancel");
        let settled = settle(&store, &token, &n1, &n2, t1).await;
        if let migrate::Cancelled::Completed(_) = cancelled {
            assert_eq!(settled, Settled::Moved, "a completed move is not cleared");
        }
        seen.push((delay_ms, cancelled, settled));
        n1.stop().await;
        n2.stop().await;
    }
    for (delay, cancelled, settled) in &seen {
        let c = match cancelled {
            migrate::Cancelled::Completed(_) => "refused (completed)",
            migrate::Cancelled::Cleared => "cleared",
            migrate::Cancelled::Absent => "absent",
        };
        println!("{test}: cleared after {delay} ms: {c}, {settled:?}");
    }
    assert!(
        seen.iter().any(|s| s.2 == Settled::Stayed) && seen.iter().any(|s| s.2 == Settled::Moved),
        "both ends were reached: {seen:?}"
    );
}
