//! Self-fencing: stop the node's HA workloads before its lease can expire.
//!
//! etcd extends a lease when it receives a keepalive, which is after the agent sent it; so the
//! lease lives at least until `sent + ttl` of the latest acknowledged keepalive. The agent
//! fences at that local deadline minus a margin (the time stopping workloads takes, and slack
//! for slow answers): when the deadline passes without a newer acknowledgement, the
//! [`FenceGuard`] fires its callback. Everything runs on the monotonic clock
//! ([`tokio::time::Instant`]), so a wall-clock jump changes nothing.
//!
//! Once fenced, the agent's tokens are stale: when keepalives resume the guard re-arms with a
//! new epoch, and the agent must acquire ownership again before starting anything.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};
use tracing::{Instrument, info_span, warn};

use crate::registry::Liveness;

/// Measured on 3-member etcd 3.4 clusters under partition: fencing 1.5 s before the local
/// deadline was safe.
pub const MIN_MARGIN: Duration = Duration::from_millis(1500);

/// How the fencing margin is derived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FencePolicy {
    /// The smallest margin (default [`MIN_MARGIN`]).
    pub min_margin: Duration,
    /// How long stopping the node's HA workloads may take.
    pub stop_budget: Duration,
    /// Multiplier on the largest measured keepalive round trip added to the stop budget.
    pub rtt_factor: u32,
}

impl Default for FencePolicy {
    fn default() -> Self {
        Self {
            min_margin: MIN_MARGIN,
            stop_budget: Duration::from_secs(1),
            rtt_factor: 2,
        }
    }
}

impl FencePolicy {
    /// The margin for the largest measured round trip: `max(min_margin, stop_budget +
    /// rtt_factor × max_rtt)`.
    pub fn margin(&self, max_rtt: Duration) -> Duration {
        self.min_margin
            .max(self.stop_budget + max_rtt * self.rtt_factor)
    }

    /// The smallest TTL that does not fence a healthy node: the margin, plus one keepalive
    /// interval and a round trip before the next acknowledgement, plus as much again as slack
    /// for a slow answer.
    pub fn min_ttl(&self, max_rtt: Duration, interval: Duration) -> Duration {
        self.margin(max_rtt) + (interval + max_rtt) * 2
    }

    /// When to fence for `liveness`.
    pub fn fence_at(&self, liveness: &Liveness) -> Instant {
        fence_deadline(
            liveness.acked_at,
            liveness.ttl,
            self.margin(liveness.max_rtt),
        )
    }
}

/// The earliest the lease can expire on etcd, on the local monotonic clock: the send time of
/// the latest acknowledged keepalive plus the TTL.
pub fn lease_deadline(acked_at: Instant, ttl: Duration) -> Instant {
    acked_at + ttl
}

/// When to fence: the lease deadline minus `margin` (at `acked_at` if the margin is not
/// smaller than the TTL).
pub fn fence_deadline(acked_at: Instant, ttl: Duration, margin: Duration) -> Instant {
    acked_at + ttl.saturating_sub(margin)
}

/// The guard's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceState {
    /// Keepalives are acknowledged; the guard fires at `deadline` unless a newer one arrives.
    Armed {
        /// Epoch: incremented at every re-arm after a fence.
        epoch: u64,
        /// The lease generation the deadline belongs to.
        generation: u64,
        /// When it fires.
        deadline: Instant,
    },
    /// The deadline passed: HA workloads were stopped; every token from `epoch` is stale.
    Fenced {
        /// The epoch that was fenced.
        epoch: u64,
        /// When the guard fired.
        since: Instant,
    },
}

impl FenceState {
    /// The epoch (tokens acquired in one epoch are stale in the next).
    pub fn epoch(&self) -> u64 {
        match self {
            FenceState::Armed { epoch, .. } | FenceState::Fenced { epoch, .. } => *epoch,
        }
    }

    /// Whether the node is fenced now.
    pub fn is_fenced(&self) -> bool {
        matches!(self, FenceState::Fenced { .. })
    }
}

/// The guard's decision on the latest liveness at `now` (pure).
pub fn next_state(
    state: FenceState,
    liveness: &Liveness,
    policy: &FencePolicy,
    now: Instant,
) -> FenceState {
    let deadline = policy.fence_at(liveness);
    let generation = liveness.generation;
    match state {
        FenceState::Armed { epoch, .. } if now >= deadline => {
            FenceState::Fenced { epoch, since: now }
        }
        // The lease was replaced: the old one expired, so another node may own our workloads
        // already, whatever the new lease's deadline says.
        FenceState::Armed {
            epoch,
            generation: armed,
            ..
        } if armed != generation => FenceState::Fenced { epoch, since: now },
        FenceState::Armed { epoch, .. } => FenceState::Armed {
            epoch,
            generation,
            deadline,
        },
        // Only an acknowledgement sent after the fence re-arms: an answer to a keepalive sent
        // before it proves nothing about the time since.
        FenceState::Fenced { epoch, since } if liveness.acked_at > since && now < deadline => {
            FenceState::Armed {
                epoch: epoch + 1,
                generation,
                deadline,
            }
        }
        fenced @ FenceState::Fenced { .. } => fenced,
    }
}

/// What the guard calls when it fences (stop the node's HA workloads). It runs on a blocking
/// thread; the guard waits for it before reporting [`FenceState::Fenced`].
pub type FenceCallback = Arc<dyn Fn() + Send + Sync + 'static>;

/// Watches the keepalive acknowledgements and fences when they stop.
#[derive(Debug)]
pub struct FenceGuard {
    state: watch::Receiver<FenceState>,
    task: JoinHandle<()>,
}

impl Drop for FenceGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FenceGuard {
    /// Starts guarding `liveness` with `policy`; `on_fence` runs each time the guard fires.
    pub fn spawn(
        liveness: watch::Receiver<Liveness>,
        policy: FencePolicy,
        on_fence: FenceCallback,
    ) -> Self {
        let first = FenceState::Armed {
            epoch: 0,
            generation: liveness.borrow().generation,
            deadline: policy.fence_at(&liveness.borrow()),
        };
        let (tx, rx) = watch::channel(first);
        let task = tokio::spawn(
            guard_loop(liveness, policy, on_fence, tx).instrument(info_span!("fence")),
        );
        Self { state: rx, task }
    }

    /// The current state.
    pub fn state(&self) -> FenceState {
        *self.state.borrow()
    }

    /// A receiver of state changes.
    pub fn subscribe(&self) -> watch::Receiver<FenceState> {
        self.state.clone()
    }
}

async fn guard_loop(
    mut liveness: watch::Receiver<Liveness>,
    policy: FencePolicy,
    on_fence: FenceCallback,
    tx: watch::Sender<FenceState>,
) {
    loop {
        let state = *tx.borrow();
        let current = *liveness.borrow_and_update();
        let next = next_state(state, &current, &policy, Instant::now());
        if let (FenceState::Armed { .. }, FenceState::Fenced { .. }) = (state, next) {
            warn!(
                lease = format!("{:x}", current.lease),
                "no keepalive acknowledged in time: fencing"
            );
            let callback = on_fence.clone();
            if tokio::task::spawn_blocking(move || callback())
                .await
                .is_err()
            {
                warn!("the fence callback panicked");
            }
        }
        if next != state {
            tx.send_replace(next);
        }
        match next {
            FenceState::Armed { deadline, .. } => {
                tokio::select! {
                    changed = liveness.changed() => if changed.is_err() { return },
                    () = sleep_until(deadline) => {}
                }
            }
            FenceState::Fenced { .. } => {
                if liveness.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn live(acked_at: Instant, ttl_s: u64) -> Liveness {
        Liveness {
            lease: 1,
            generation: 0,
            ttl: Duration::from_secs(ttl_s),
            acked_at,
            rtt: Duration::from_millis(5),
            max_rtt: Duration::from_millis(5),
        }
    }

    #[test]
    fn deadlines_are_sent_time_plus_ttl_minus_margin() {
        let t = Instant::now();
        let ttl = Duration::from_secs(5);
        assert_eq!(lease_deadline(t, ttl), t + ttl);
        assert_eq!(
            fence_deadline(t, ttl, MIN_MARGIN),
            t + Duration::from_millis(3500)
        );
        assert_eq!(fence_deadline(t, ttl, Duration::from_secs(9)), t);
    }

    #[test]
    fn margin_grows_with_measured_round_trips() {
        let p = FencePolicy::default();
        assert_eq!(p.margin(Duration::from_millis(10)), MIN_MARGIN);
        assert_eq!(
            p.margin(Duration::from_millis(600)),
            Duration::from_millis(2200)
        );
        let ttl = p.min_ttl(Duration::from_millis(10), Duration::from_secs(1));
        assert_eq!(ttl, Duration::from_millis(3520));
    }

    #[test]
    fn armed_fences_at_the_deadline_and_rearms_on_a_later_ack() {
        let p = FencePolicy::default();
        let t0 = Instant::now();
        let l = live(t0, 5);
        let armed = next_state(
            FenceState::Armed {
                epoch: 0,
                generation: 0,
                deadline: t0,
            },
            &l,
            &p,
            t0,
        );
        assert_eq!(
            armed,
            FenceState::Armed {
                epoch: 0,
                generation: 0,
                deadline: t0 + Duration::from_millis(3500)
            }
        );
        let at = t0 + Duration::from_millis(3500);
        let fenced = next_state(armed, &l, &p, at);
        assert_eq!(
            fenced,
            FenceState::Fenced {
                epoch: 0,
                since: at
            }
        );
        // The same acknowledgement again does not re-arm.
        assert_eq!(
            next_state(fenced, &l, &p, at + Duration::from_secs(1)),
            fenced
        );
        // An acknowledgement of a keepalive sent after the fence does, with a new epoch.
        let later = at + Duration::from_millis(100);
        let again = next_state(
            fenced,
            &live(later, 5),
            &p,
            later + Duration::from_millis(5),
        );
        assert_eq!(
            again,
            FenceState::Armed {
                epoch: 1,
                generation: 0,
                deadline: later + Duration::from_millis(3500)
            }
        );
        assert_eq!(again.epoch(), 1);
        assert!(!again.is_fenced() && fenced.is_fenced());
    }

    #[test]
    fn a_replaced_lease_fences_even_with_a_fresh_deadline() {
        let p = FencePolicy::default();
        let t0 = Instant::now();
        let armed = FenceState::Armed {
            epoch: 0,
            generation: 0,
            deadline: t0 + Duration::from_millis(3500),
        };
        let now = t0 + Duration::from_secs(1);
        let mut replaced = live(now, 5);
        replaced.generation = 1;
        let fenced = next_state(armed, &replaced, &p, now);
        assert_eq!(
            fenced,
            FenceState::Fenced {
                epoch: 0,
                since: now
            }
        );
        // The first acknowledgement on the new lease after the fence re-arms.
        let later = now + Duration::from_millis(200);
        replaced.acked_at = later;
        let again = next_state(fenced, &replaced, &p, later);
        assert!(matches!(
            again,
            FenceState::Armed {
                epoch: 1,
                generation: 1,
                ..
            }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn guard_fires_once_when_acks_stop_and_rearms_when_they_resume() {
        let t0 = Instant::now();
        let (tx, rx) = watch::channel(live(t0, 5));
        let fired = Arc::new(AtomicUsize::new(0));
        let f = fired.clone();
        let guard = FenceGuard::spawn(
            rx,
            FencePolicy::default(),
            Arc::new(move || {
                f.fetch_add(1, Ordering::SeqCst);
            }),
        );
        let mut states = guard.subscribe();
        // Acks every second keep it armed.
        for i in 1..=5 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            tx.send_replace(live(t0 + Duration::from_secs(i), 5));
        }
        assert_eq!(fired.load(Ordering::SeqCst), 0);
        assert!(!guard.state().is_fenced());
        // Acks stop: it fences 3.5 s after the last one was sent.
        let last = t0 + Duration::from_secs(5);
        let fenced = tokio::time::timeout(
            Duration::from_secs(10),
            states.wait_for(FenceState::is_fenced),
        );
        fenced.await.expect("fenced in time").expect("guard alive");
        assert_eq!(fired.load(Ordering::SeqCst), 1);
        assert!(Instant::now() >= last + Duration::from_millis(3500));
        // A wall-clock jump cannot matter: nothing here reads it. Acks resume: re-armed.
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.send_replace(live(Instant::now(), 5));
        let rearmed =
            tokio::time::timeout(Duration::from_secs(1), states.wait_for(|s| !s.is_fenced()));
        rearmed
            .await
            .expect("re-armed in time")
            .expect("guard alive");
        assert_eq!(guard.state().epoch(), 1);
        assert_eq!(fired.load(Ordering::SeqCst), 1);
    }
}
