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

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};
use tracing::{Instrument, info_span, warn};

use crate::quorum::{Hold, QuorumView, hold_deadline};
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

    /// When to fence for `liveness` on `CLOCK_BOOTTIME`.
    pub fn fence_at_boot(&self, liveness: &Liveness) -> Duration {
        liveness.acked_at_boot + liveness.ttl.saturating_sub(self.margin(liveness.max_rtt))
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

    /// Whether this state cannot be trusted at `now` to start anything: fenced, or armed
    /// with a deadline already past that the guard has not acted on yet (its task was
    /// stopped, or starved, like the whole agent after a SIGSTOP: the lease may have expired
    /// and the workloads be running elsewhere by now).
    pub fn stale_or_fenced(&self, now: Instant) -> bool {
        match self {
            FenceState::Fenced { .. } => true,
            FenceState::Armed { deadline, .. } => now >= *deadline,
        }
    }
}

/// The guard's decision on the latest liveness at `now` and `boot_now` (`CLOCK_BOOTTIME`)
/// (pure). The deadline passes when it passes on either clock: the monotonic one drives the
/// timers, the boot one also counts a suspended host (etcd's lease timers ran meanwhile).
pub fn next_state(
    state: FenceState,
    liveness: &Liveness,
    policy: &FencePolicy,
    now: Instant,
    boot_now: Duration,
) -> FenceState {
    next_state_held(state, liveness, None, policy, now, boot_now)
}

/// The deadlines for `liveness`, moved forward by `hold` when it counts (pure): a round that
/// proved no etcd member had a leader ([`crate::quorum`]) counts if it started before the
/// deadline the guard is armed with, while the lease was still certainly alive.
pub fn deadlines(
    state: &FenceState,
    liveness: &Liveness,
    hold: Option<Hold>,
    policy: &FencePolicy,
) -> (Instant, Duration) {
    let mut deadline = policy.fence_at(liveness);
    let mut boot = policy.fence_at_boot(liveness);
    if let FenceState::Armed {
        deadline: armed,
        generation,
        ..
    } = *state
        && generation == liveness.generation
    {
        let valid = |h: &Hold| h.at <= armed;
        if let Some(h) = hold.filter(valid) {
            let (m, b) = hold_deadline(&h, liveness.ttl, policy.margin(liveness.max_rtt));
            deadline = deadline.max(m);
            boot = boot.max(b);
        }
        // A deadline once justified stays justified (a hold earlier in this generation).
        deadline = deadline.max(armed);
    }
    (deadline, boot)
}

/// [`next_state`] with the latest quorum hold.
pub fn next_state_held(
    state: FenceState,
    liveness: &Liveness,
    hold: Option<Hold>,
    policy: &FencePolicy,
    now: Instant,
    boot_now: Duration,
) -> FenceState {
    let (deadline, boot_deadline) = deadlines(&state, liveness, hold, policy);
    let expired = now >= deadline || boot_now >= boot_deadline;
    let generation = liveness.generation;
    match state {
        FenceState::Armed { epoch, .. } if expired => FenceState::Fenced { epoch, since: now },
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
        FenceState::Fenced { epoch, since } if liveness.acked_at > since && !expired => {
            FenceState::Armed {
                epoch: epoch + 1,
                generation,
                deadline,
            }
        }
        fenced @ FenceState::Fenced { .. } => fenced,
    }
}

/// How often the guard also checks the boot clock.
const BOOT_CHECK: Duration = Duration::from_millis(250);

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
        Self::spawn_with_watchdog(liveness, policy, on_fence, None)
    }

    /// The same, also publishing the deadline in `deadline_file` for a watchdog.
    pub fn spawn_with_watchdog(
        liveness: watch::Receiver<Liveness>,
        policy: FencePolicy,
        on_fence: FenceCallback,
        deadline_file: Option<DeadlineFile>,
    ) -> Self {
        Self::spawn_with_quorum(liveness, None, policy, on_fence, deadline_file)
    }

    /// The same, also holding the deadline while `quorum` proves that no etcd member has a
    /// leader (see [`crate::quorum`]).
    pub fn spawn_with_quorum(
        liveness: watch::Receiver<Liveness>,
        quorum: Option<watch::Receiver<QuorumView>>,
        policy: FencePolicy,
        on_fence: FenceCallback,
        deadline_file: Option<DeadlineFile>,
    ) -> Self {
        let first = FenceState::Armed {
            epoch: 0,
            generation: liveness.borrow().generation,
            deadline: policy.fence_at(&liveness.borrow()),
        };
        let (tx, rx) = watch::channel(first);
        let task = tokio::spawn(
            guard_loop(liveness, quorum, policy, on_fence, tx, deadline_file)
                .instrument(info_span!("fence")),
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
    mut quorum: Option<watch::Receiver<QuorumView>>,
    policy: FencePolicy,
    on_fence: FenceCallback,
    tx: watch::Sender<FenceState>,
    deadline_file: Option<DeadlineFile>,
) {
    let mut published = None;
    loop {
        let state = *tx.borrow();
        let current = *liveness.borrow_and_update();
        let hold = quorum
            .as_mut()
            .and_then(|q| q.borrow_and_update().last_hold);
        let now = Instant::now();
        let next = next_state_held(state, &current, hold, &policy, now, boottime_now());
        if let Some(file) = &deadline_file
            && published != Some(next)
        {
            let (_, boot_deadline) = deadlines(&state, &current, hold, &policy);
            file.publish(&next, boot_deadline).await;
            published = Some(next);
        }
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
                    changed = quorum_changed(&mut quorum) => if changed.is_err() { quorum = None },
                    () = sleep_until(deadline) => {}
                    // Timers run on the monotonic clock, which stops while the host is
                    // suspended: look at the boot clock now and then too.
                    () = tokio::time::sleep(BOOT_CHECK) => {}
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

/// The next change of the quorum view (never, without one).
async fn quorum_changed(
    quorum: &mut Option<watch::Receiver<QuorumView>>,
) -> Result<(), watch::error::RecvError> {
    match quorum {
        Some(q) => q.changed().await,
        None => std::future::pending().await,
    }
}

/// The guard's deadline, published in a file for a watchdog below the agent: a process that
/// is not the agent (a workload's supervisor) stops HA workloads once the deadline has passed,
/// even when the agent itself is stopped (SIGSTOP, a hung runtime) and cannot fence.
///
/// The file holds one decimal number: the fence deadline in nanoseconds of `CLOCK_BOOTTIME`
/// (monotonic, counts suspend, the same for every process of the host), `0` once fenced. It
/// is replaced atomically at every change (about every keepalive interval).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadlineFile {
    path: PathBuf,
}

impl DeadlineFile {
    /// A deadline file at `path` (its directory must exist; a tmpfs is best).
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `0`: HA workloads must not run (the agent stopped them and is going away).
    pub async fn publish_fenced(&self) {
        self.write(stead_host::fence::FENCED.to_string()).await;
    }

    async fn publish(&self, state: &FenceState, boot_deadline: Duration) {
        let text = deadline_text(state, Instant::now(), boottime_now(), boot_deadline);
        self.write(text).await;
    }

    async fn write(&self, text: String) {
        let tmp = self.path.with_extension("tmp");
        let written = async {
            tokio::fs::write(&tmp, text).await?;
            tokio::fs::rename(&tmp, &self.path).await
        };
        if let Err(e) = written.await {
            warn!(path = %self.path.display(), error = %e, "cannot publish the fence deadline");
        }
    }
}

/// The deadline file's content for `state`, seen at `now` (monotonic) and `boottime`: the
/// earlier of the monotonic deadline (as boot time) and `boot_deadline` (pure).
pub fn deadline_text(
    state: &FenceState,
    now: Instant,
    boottime: Duration,
    boot_deadline: Duration,
) -> String {
    match state {
        FenceState::Armed { deadline, .. } => {
            let left = deadline.saturating_duration_since(now);
            stead_host::fence::deadline_content((boottime + left).min(boot_deadline))
        }
        FenceState::Fenced { .. } => stead_host::fence::FENCED.to_string(),
    }
}

/// Whether a watchdog reading `content` at `boottime` must stop the HA workloads: the deadline
/// passed, the node is fenced (`0`), or the content is unreadable (fail safe). The reader
/// lives in `stead-host` (the supervisors use it); this is the same function.
pub fn watchdog_expired(content: &str, boottime: Duration) -> bool {
    stead_host::fence::expired(content.as_bytes(), boottime)
}

pub use stead_host::fence::boottime_now;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_armed_state_past_its_deadline_starts_nothing() {
        let now = Instant::now();
        let armed = |deadline| FenceState::Armed {
            epoch: 0,
            generation: 0,
            deadline,
        };
        assert!(!armed(now + Duration::from_millis(1)).stale_or_fenced(now));
        assert!(armed(now).stale_or_fenced(now), "at the deadline");
        assert!(
            armed(now).stale_or_fenced(now + Duration::from_secs(5)),
            "a paused agent"
        );
        let fenced = FenceState::Fenced {
            epoch: 0,
            since: now,
        };
        assert!(fenced.stale_or_fenced(now));
    }
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn live(acked_at: Instant, ttl_s: u64) -> Liveness {
        Liveness {
            lease: 1,
            generation: 0,
            ttl: Duration::from_secs(ttl_s),
            acked_at,
            acked_at_boot: boottime_now(),
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
            Duration::ZERO,
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
        let fenced = next_state(armed, &l, &p, at, Duration::ZERO);
        assert_eq!(
            fenced,
            FenceState::Fenced {
                epoch: 0,
                since: at
            }
        );
        // The same acknowledgement again does not re-arm.
        assert_eq!(
            next_state(fenced, &l, &p, at + Duration::from_secs(1), Duration::ZERO),
            fenced
        );
        // An acknowledgement of a keepalive sent after the fence does, with a new epoch.
        let later = at + Duration::from_millis(100);
        let again = next_state(
            fenced,
            &live(later, 5),
            &p,
            later + Duration::from_millis(5),
            Duration::ZERO,
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
        let fenced = next_state(armed, &replaced, &p, now, Duration::ZERO);
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
        let again = next_state(fenced, &replaced, &p, later, Duration::ZERO);
        assert!(matches!(
            again,
            FenceState::Armed {
                epoch: 1,
                generation: 1,
                ..
            }
        ));
    }

    #[test]
    fn a_suspended_host_fences_on_the_boot_clock() {
        let p = FencePolicy::default();
        let t0 = Instant::now();
        let l = live(t0, 5);
        let armed = FenceState::Armed {
            epoch: 0,
            generation: 0,
            deadline: p.fence_at(&l),
        };
        // The monotonic clock barely moved (it stops during suspend); the boot clock did.
        let boot = l.acked_at_boot + Duration::from_secs(10);
        let state = next_state(armed, &l, &p, t0 + Duration::from_millis(10), boot);
        assert!(state.is_fenced());
        // And an old acknowledgement cannot re-arm it.
        assert!(next_state(state, &l, &p, t0 + Duration::from_millis(20), boot).is_fenced());
    }

    #[test]
    fn a_quorum_hold_moves_the_deadline_while_it_started_in_time() {
        let p = FencePolicy::default();
        let t0 = Instant::now();
        let l = live(t0, 5);
        let boot0 = l.acked_at_boot;
        let armed = next_state(
            FenceState::Armed {
                epoch: 0,
                generation: 0,
                deadline: t0,
            },
            &l,
            &p,
            t0,
            boot0,
        );
        // Rounds proving no leader anywhere, every 250 ms from 3 s on: the deadline follows
        // each round's start + TTL − margin, far past the lease's own 3.5 s.
        let mut state = armed;
        let mut at = t0 + Duration::from_secs(3);
        while at < t0 + Duration::from_secs(15) {
            let hold = Hold {
                at,
                at_boot: boot0 + (at - t0),
            };
            let now = at + Duration::from_millis(200);
            state = next_state_held(state, &l, Some(hold), &p, now, boot0 + (now - t0));
            assert_eq!(
                state,
                FenceState::Armed {
                    epoch: 0,
                    generation: 0,
                    deadline: at + Duration::from_millis(3500)
                }
            );
            at += Duration::from_millis(250);
        }
        // The rounds stop proving it: the last hold's deadline still stands, then fences.
        let last = at - Duration::from_millis(250);
        let hold = Some(Hold {
            at: last,
            at_boot: boot0 + (last - t0),
        });
        let end = last + Duration::from_millis(3500);
        let before = end - Duration::from_millis(1);
        let boot = |i: Instant| boot0 + (i - t0);
        assert!(!next_state_held(state, &l, hold, &p, before, boot(before)).is_fenced());
        assert!(next_state_held(state, &l, hold, &p, end, boot(end)).is_fenced());
        // On the boot clock too (a suspend during the hold).
        let held_boot = next_state_held(state, &l, hold, &p, before, boot(end));
        assert!(held_boot.is_fenced());
    }

    #[test]
    fn a_hold_that_started_after_the_deadline_counts_for_nothing() {
        let p = FencePolicy::default();
        let t0 = Instant::now();
        let l = live(t0, 5);
        let armed = FenceState::Armed {
            epoch: 0,
            generation: 0,
            deadline: t0 + Duration::from_millis(3500),
        };
        // The lease may have expired already when this round started.
        let late = t0 + Duration::from_millis(3600);
        let hold = Some(Hold {
            at: late,
            at_boot: l.acked_at_boot + Duration::from_millis(3600),
        });
        let now = late + Duration::from_millis(10);
        let boot = l.acked_at_boot + Duration::from_millis(3610);
        assert!(next_state_held(armed, &l, hold, &p, now, boot).is_fenced());
        // Nor for another lease generation.
        let mut replaced = l;
        replaced.generation = 1;
        let early = Some(Hold {
            at: t0 + Duration::from_secs(1),
            at_boot: l.acked_at_boot + Duration::from_secs(1),
        });
        let now = t0 + Duration::from_secs(2);
        let boot = l.acked_at_boot + Duration::from_secs(2);
        assert!(next_state_held(armed, &replaced, early, &p, now, boot).is_fenced());
    }

    #[test]
    fn deadline_file_content_and_watchdog_decision() {
        let now = Instant::now();
        let boot = Duration::from_secs(1000);
        let armed = FenceState::Armed {
            epoch: 0,
            generation: 0,
            deadline: now + Duration::from_millis(2500),
        };
        let far = Duration::MAX;
        let text = deadline_text(&armed, now, boot, far);
        assert_eq!(text, "1002500000000\n");
        assert!(!watchdog_expired(&text, boot));
        assert!(!watchdog_expired(&text, boot + Duration::from_millis(2499)));
        assert!(watchdog_expired(&text, boot + Duration::from_millis(2500)));
        let fenced = FenceState::Fenced {
            epoch: 0,
            since: now,
        };
        assert_eq!(deadline_text(&fenced, now, boot, far), "0\n");
        assert!(watchdog_expired("0\n", boot));
        assert!(watchdog_expired("garbage", boot), "unreadable fails safe");
        // A deadline already passed is published as now, never in the past of boottime.
        let late = FenceState::Armed {
            epoch: 0,
            generation: 0,
            deadline: now,
        };
        let later = now + Duration::from_secs(1);
        assert_eq!(deadline_text(&late, later, boot, far), "1000000000000\n");
        // The boot clock's deadline wins when it is earlier.
        let early = boot + Duration::from_secs(1);
        assert_eq!(deadline_text(&armed, now, boot, early), "1001000000000\n");
        assert!(boottime_now() > Duration::ZERO);
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
