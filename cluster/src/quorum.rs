//! Holding workloads through a loss of etcd quorum instead of fencing.
//!
//! etcd expires leases only on its leader, and a newly elected leader re-arms every lease with
//! its full TTL. So when, at some moment `t`, no member of the cluster has a leader, the lease
//! cannot expire before `t + ttl`: an old leader would have to be seen as one, and any leader
//! after `t` is promoted after `t`. The agent checks that every 250 ms while its keepalives go
//! unanswered ([`QuorumProbe`]), and each round that proves it ([`leaderless_everywhere`])
//! moves the fence deadline to `round start + ttl − margin` ([`crate::fence`]).
//!
//! A member proves it does not lead by answering `status` with no leader or another member
//! as leader, or by refusing the connection (its process is not running; restarted, it needs an election, which re-arms the
//! lease). A member that does not answer in time proves nothing: it may be a leader cut off
//! from the agent, or a paused old leader whose lease timers ran out and which, resumed, could
//! still commit a revoke through a leaderless member of its term. So any such member ends the
//! hold, and the agent fences as before. A minority of members saying "no leader" is never
//! enough.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::Client;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, sleep, timeout};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::etcd::{Store, StoreError};
use crate::fence::boottime_now;
use crate::registry::Liveness;

/// How often the probe looks at the members while keepalives go unanswered.
pub const PROBE_EVERY: Duration = Duration::from_millis(250);

/// How long one member's answer (connection, then `status`) is awaited.
pub const PROBE_WAIT: Duration = Duration::from_millis(200);

/// What one member said in a round. What matters is whether the member itself leads: a
/// follower still naming a leader that has died (its election timer has not fired yet) is
/// no leader itself; the one it names answers for itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberView {
    /// It answered: it is the leader.
    Leads,
    /// It answered: it follows another member (id), which answers for itself.
    Follows(u64),
    /// It answered without a leader (no quorum, or an election under way).
    NoLeader,
    /// It refused the connection: no etcd process listens there.
    Down,
    /// No answer in time, or an error: it proves nothing.
    Unknown,
}

/// A round that proved no member had a leader: when it started, on both clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hold {
    /// Start of the round (monotonic).
    pub at: Instant,
    /// Start of the round on `CLOCK_BOOTTIME`.
    pub at_boot: Duration,
}

/// What the probe publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QuorumView {
    /// The latest round that proved no leader anywhere.
    pub last_hold: Option<Hold>,
    /// Whether the latest round did (quorum is lost everywhere the agent can see).
    pub lost: bool,
}

/// Whether a round proves that no member of a cluster of `members` is a leader (pure): every
/// member was seen, and each answered that it does not lead or is not running. One silent
/// member, or one that leads, is enough to say no.
pub fn leaderless_everywhere(members: usize, views: &[MemberView]) -> bool {
    members > 0
        && views.len() == members
        && views.iter().all(|v| {
            matches!(
                v,
                MemberView::NoLeader | MemberView::Follows(_) | MemberView::Down
            )
        })
}

/// The latest fence deadline a hold justifies: `at + ttl − margin`, on both clocks (pure).
pub fn hold_deadline(hold: &Hold, ttl: Duration, margin: Duration) -> (Instant, Duration) {
    let keep = ttl.saturating_sub(margin);
    (hold.at + keep, hold.at_boot + keep)
}

/// Whether the probe should look now: keepalives have gone unanswered for two intervals.
pub fn probe_due(acked_at: Instant, interval: Duration, now: Instant) -> bool {
    now.saturating_duration_since(acked_at) > interval * 2
}

/// One cluster member as the probe knows it.
#[derive(Clone)]
struct Member {
    url: String,
    client: Option<Client>,
}

/// Watches the members while keepalives go unanswered.
#[derive(Debug)]
pub struct QuorumProbe {
    view: watch::Receiver<QuorumView>,
    task: JoinHandle<()>,
}

impl Drop for QuorumProbe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl QuorumProbe {
    /// Starts probing the members of the cluster `store` talks to whenever `liveness` shows
    /// keepalives unanswered for two `interval`s.
    pub fn spawn(store: &Store, liveness: watch::Receiver<Liveness>, interval: Duration) -> Self {
        let (tx, rx) = watch::channel(QuorumView::default());
        let task = tokio::spawn(
            probe_loop(store.clone(), liveness, interval, tx).instrument(info_span!("quorum")),
        );
        Self { view: rx, task }
    }

    /// A receiver of the probe's view.
    pub fn subscribe(&self) -> watch::Receiver<QuorumView> {
        self.view.clone()
    }

    /// The latest view.
    pub fn current(&self) -> QuorumView {
        *self.view.borrow()
    }
}

/// How often the member list is read again while etcd is healthy.
const MEMBERS_EVERY: Duration = Duration::from_secs(10);

async fn probe_loop(
    store: Store,
    liveness: watch::Receiver<Liveness>,
    interval: Duration,
    tx: watch::Sender<QuorumView>,
) {
    let mut members: Vec<Member> = Vec::new();
    let mut listed_at: Option<Instant> = None;
    loop {
        let acked_at = liveness.borrow().acked_at;
        let now = Instant::now();
        if !probe_due(acked_at, interval, now) {
            if tx.borrow().lost {
                tx.send_modify(|v| v.lost = false);
            }
            if listed_at.is_none_or(|t| now.duration_since(t) > MEMBERS_EVERY) {
                match list_members(&store).await {
                    Ok(urls) => {
                        members = refresh_members(members, urls);
                        listed_at = Some(Instant::now());
                    }
                    Err(e) => debug!(error = %e, "cannot list the etcd members"),
                }
            }
            sleep(PROBE_EVERY).await;
            continue;
        }
        if members.is_empty() {
            // Never listed: nothing proves anything.
            sleep(PROBE_EVERY).await;
            continue;
        }
        let hold = Hold {
            at: Instant::now(),
            at_boot: boottime_now(),
        };
        let views = probe_round(&store, &mut members).await;
        let lost = leaderless_everywhere(members.len(), &views);
        let was = *tx.borrow();
        if lost != was.lost {
            if lost {
                warn!(?views, "no etcd member has a leader: holding workloads");
            } else {
                info!(?views, "quorum hold over");
            }
        }
        tx.send_replace(QuorumView {
            last_hold: if lost { Some(hold) } else { was.last_hold },
            lost,
        });
        sleep_until_next(hold.at).await;
    }
}

async fn sleep_until_next(started: Instant) {
    tokio::time::sleep_until(started + PROBE_EVERY).await;
}

async fn list_members(store: &Store) -> Result<Vec<String>, StoreError> {
    let mut client = store.client();
    let list = store.timed(client.member_list()).await?;
    Ok(list
        .members()
        .iter()
        .map(|m| m.client_urls().first().cloned().unwrap_or_default())
        .collect())
}

/// The new member list, keeping the clients of members already known.
fn refresh_members(old: Vec<Member>, urls: Vec<String>) -> Vec<Member> {
    let mut known: BTreeMap<String, Option<Client>> =
        old.into_iter().map(|m| (m.url, m.client)).collect();
    urls.into_iter()
        .map(|url| {
            let client = known.remove(&url).flatten();
            Member { url, client }
        })
        .collect()
}

async fn probe_round(store: &Store, members: &mut [Member]) -> Vec<MemberView> {
    let mut set = JoinSet::new();
    for (i, member) in members.iter_mut().enumerate() {
        if member.client.is_none() && !member.url.is_empty() {
            member.client = store.member_client(&member.url).await.ok();
        }
        let (url, client) = (member.url.clone(), member.client.clone());
        set.spawn(async move { (i, probe_member(&url, client).await) });
    }
    let mut views = vec![MemberView::Unknown; members.len()];
    while let Some(done) = set.join_next().await {
        if let Ok((i, view)) = done {
            views[i] = view;
        }
    }
    views
}

/// What one member says: a refused connection is [`MemberView::Down`], then its `status`.
async fn probe_member(url: &str, client: Option<Client>) -> MemberView {
    let Some(authority) = authority(url) else {
        return MemberView::Unknown;
    };
    match timeout(PROBE_WAIT, tokio::net::TcpStream::connect(authority)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return MemberView::Down;
        }
        _ => return MemberView::Unknown,
    }
    let Some(mut client) = client else {
        return MemberView::Unknown;
    };
    match timeout(PROBE_WAIT, client.status()).await {
        Ok(Ok(status)) if status.leader() == 0 => MemberView::NoLeader,
        Ok(Ok(status)) => match status.header().map(|h| h.member_id()) {
            Some(me) if me == status.leader() => MemberView::Leads,
            Some(_) => MemberView::Follows(status.leader()),
            None => MemberView::Unknown,
        },
        Ok(Err(e)) if e.to_string().contains("no leader") => MemberView::NoLeader,
        _ => MemberView::Unknown,
    }
}

/// `host:port` of a client URL.
fn authority(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next()?;
    (!authority.is_empty()).then_some(authority)
}

#[cfg(test)]
mod tests {
    use super::*;
    use MemberView::{Down, Follows, Leads, NoLeader, Unknown};

    #[test]
    fn every_member_must_be_seen_leaderless() {
        assert!(leaderless_everywhere(3, &[NoLeader, NoLeader, NoLeader]));
        assert!(leaderless_everywhere(3, &[NoLeader, Down, Down]));
        assert!(leaderless_everywhere(3, &[Down, Down, Down]));
        // A follower still naming a dead leader does not lead itself.
        assert!(leaderless_everywhere(3, &[Follows(7), Down, Down]));
        assert!(leaderless_everywhere(3, &[Follows(7), NoLeader, Down]));
        // A leader anywhere, or a silent member (a partitioned majority, a paused leader).
        assert!(!leaderless_everywhere(3, &[NoLeader, NoLeader, Leads]));
        assert!(!leaderless_everywhere(3, &[Follows(7), Follows(7), Leads]));
        assert!(!leaderless_everywhere(
            3,
            &[Follows(7), Follows(7), Unknown]
        ));
        assert!(!leaderless_everywhere(3, &[NoLeader, Unknown, Unknown]));
        assert!(!leaderless_everywhere(3, &[NoLeader, NoLeader, Unknown]));
        // A round that does not cover every member proves nothing.
        assert!(!leaderless_everywhere(3, &[NoLeader, NoLeader]));
        assert!(!leaderless_everywhere(0, &[]));
        assert!(leaderless_everywhere(1, &[NoLeader]));
        assert!(leaderless_everywhere(
            5,
            &[NoLeader, NoLeader, Down, Down, Down]
        ));
        assert!(!leaderless_everywhere(
            5,
            &[NoLeader, NoLeader, NoLeader, NoLeader, Unknown]
        ));
    }

    #[test]
    fn a_minority_without_a_leader_is_never_enough() {
        // The minority side of a partition says "no leader" too; so does a majority whose
        // third member may be a paused old leader.
        assert!(!leaderless_everywhere(3, &[NoLeader, Unknown, Unknown]));
        assert!(!leaderless_everywhere(3, &[Unknown, NoLeader, NoLeader]));
    }

    #[test]
    fn a_hold_lasts_one_ttl_minus_margin_from_the_round_start() {
        let at = Instant::now();
        let hold = Hold {
            at,
            at_boot: Duration::from_secs(100),
        };
        let (m, b) = hold_deadline(&hold, Duration::from_secs(4), Duration::from_millis(1500));
        assert_eq!(m, at + Duration::from_millis(2500));
        assert_eq!(b, Duration::from_millis(102_500));
        let (m, _) = hold_deadline(&hold, Duration::from_secs(1), Duration::from_secs(2));
        assert_eq!(m, at);
    }

    #[test]
    fn probes_only_after_two_unanswered_intervals() {
        let t = Instant::now();
        let i = Duration::from_millis(400);
        assert!(!probe_due(t, i, t + Duration::from_millis(800)));
        assert!(probe_due(t, i, t + Duration::from_millis(801)));
    }

    #[test]
    fn authority_of_client_urls() {
        assert_eq!(authority("http://127.0.0.1:2379"), Some("127.0.0.1:2379"));
        assert_eq!(authority("https://10.0.0.1:2379/"), Some("10.0.0.1:2379"));
        assert_eq!(authority("10.0.0.1:2379"), Some("10.0.0.1:2379"));
        assert_eq!(authority("http://"), None);
    }
}
