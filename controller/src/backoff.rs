//! Per-resource retry policy after failed changes (kube-runtime's `error_policy` +
//! requeue):
//! - a transient failure is retried after an exponential delay with jitter: the n-th
//!   consecutive failure waits a random time in `[d/2, d]` where `d = base·2^(n-1)`,
//!   capped; a success resets it, a new revision gives it a fresh try;
//! - a terminal failure (refused, conflict, unsupported) is not retried at all while the
//!   resource's spec hash and its observed state stay what they were when it failed: only
//!   a new manifest or a change on the host releases the hold.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, Instant};

use stead_schema::ResourceId;

/// One resource's failure record.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Consecutive failures.
    pub failures: u32,
    /// Not retried before this instant (transient failures).
    pub not_before: Instant,
    /// The last error.
    pub message: String,
    /// The error class (`Refused`, `IoError`, …).
    pub reason: String,
    /// A terminal hold: see [`Hold`].
    pub hold: Option<Hold>,
}

/// What a terminal failure was seen against; the hold lasts while both are unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    /// Spec hash of the resource (desired or last applied) when it failed.
    pub spec_hash: String,
    /// Fingerprint of its observed state when it failed.
    pub observed: u64,
}

/// Why a change is not tried now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wait {
    /// A transient failure: retried after the delay.
    Backoff(Duration),
    /// A terminal failure: held until the manifest or the host changes.
    Held,
}

/// Backoff state for all resources.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    entries: BTreeMap<ResourceId, Entry>,
    jitter: RandomState,
    draws: u64,
}

impl Backoff {
    /// Delays around `base`, `2*base`, … up to `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            entries: BTreeMap::new(),
            jitter: RandomState::new(),
            draws: 0,
        }
    }

    /// The upper bound of the delay after `failures` consecutive failures.
    pub fn delay(&self, failures: u32) -> Duration {
        let shift = failures.saturating_sub(1).min(20);
        self.base.saturating_mul(1u32 << shift).min(self.cap)
    }

    /// A random delay in `[d/2, d]` for `d = delay(failures)`, so that resources that
    /// failed together do not retry together.
    fn jittered(&mut self, failures: u32) -> Duration {
        let d = self.delay(failures);
        self.draws = self.draws.wrapping_add(1);
        let r = self.jitter.hash_one(self.draws);
        let fraction = (r >> 11) as f64 / (1u64 << 53) as f64;
        d / 2 + (d / 2).mul_f64(fraction)
    }

    /// Records a transient failure at `now`; returns the delay before the next try.
    pub fn failed(
        &mut self,
        id: &ResourceId,
        reason: &str,
        message: &str,
        now: Instant,
    ) -> Duration {
        let failures = self.entries.get(id).map(|e| e.failures).unwrap_or(0) + 1;
        let delay = self.jittered(failures);
        self.entries.insert(
            id.clone(),
            Entry {
                failures,
                not_before: now + delay,
                message: message.to_string(),
                reason: reason.to_string(),
                hold: None,
            },
        );
        delay
    }

    /// Records a terminal failure: `id` is held while it keeps `hold`.
    pub fn failed_terminal(&mut self, id: &ResourceId, reason: &str, message: &str, hold: Hold) {
        let failures = self.entries.get(id).map(|e| e.failures).unwrap_or(0) + 1;
        self.entries.insert(
            id.clone(),
            Entry {
                failures,
                not_before: Instant::now(),
                message: message.to_string(),
                reason: reason.to_string(),
                hold: Some(hold),
            },
        );
    }

    /// Forgets `id` (it converged).
    pub fn succeeded(&mut self, id: &ResourceId) {
        self.entries.remove(id);
    }

    /// A new revision: every transient failure gets a fresh try. Terminal holds stay;
    /// they are released by [`Self::waiting`] when the resource's spec changed.
    pub fn reset(&mut self) {
        self.entries.retain(|_, e| e.hold.is_some());
    }

    /// Whether `id` must still wait at `now`, given its current spec hash and observed
    /// fingerprint. A terminal hold whose spec or observation changed is released (and
    /// forgotten) here.
    pub fn waiting(
        &mut self,
        id: &ResourceId,
        now: Instant,
        current: &Hold,
    ) -> Option<(Wait, &Entry)> {
        let released = self
            .entries
            .get(id)
            .is_some_and(|e| e.hold.as_ref().is_some_and(|h| h != current));
        if released {
            self.entries.remove(id);
            return None;
        }
        let e = self.entries.get(id)?;
        match &e.hold {
            Some(_) => Some((Wait::Held, e)),
            None if e.not_before > now => Some((
                Wait::Backoff(e.not_before.saturating_duration_since(now)),
                e,
            )),
            None => None,
        }
    }

    /// The entry of `id`, waiting or due.
    pub fn get(&self, id: &ResourceId) -> Option<&Entry> {
        self.entries.get(id)
    }

    /// The resources held by a terminal failure.
    pub fn held(&self) -> impl Iterator<Item = (&ResourceId, &Entry)> {
        self.entries.iter().filter(|(_, e)| e.hold.is_some())
    }

    /// The earliest instant a resource in transient backoff becomes due.
    pub fn next_due(&self, now: Instant) -> Option<Instant> {
        self.entries
            .values()
            .filter(|e| e.hold.is_none())
            .map(|e| e.not_before)
            .filter(|t| *t > now)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stead_schema::Kind;

    fn hold(spec: &str, observed: u64) -> Hold {
        Hold {
            spec_hash: spec.into(),
            observed,
        }
    }

    #[test]
    fn transient_backoff_grows_with_jitter_within_bounds() {
        let (base, cap) = (Duration::from_secs(1), Duration::from_secs(10));
        let mut b = Backoff::new(base, cap);
        let t0 = Instant::now();
        let any = hold("h", 0);
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..50 {
            let id = ResourceId::new(Kind::Volume, format!("v{i}"));
            for n in 1..=6u32 {
                let d = b.failed(&id, "IoError", "x", t0);
                let hi = (base * 2u32.pow(n - 1)).min(cap);
                assert!(
                    d >= hi / 2 && d <= hi,
                    "failure {n}: {d:?} not in [{:?}, {hi:?}]",
                    hi / 2
                );
                seen.insert(d);
            }
            assert!(b.waiting(&id, t0, &any).is_some());
            assert!(
                b.waiting(&id, t0 + cap + Duration::from_millis(1), &any)
                    .is_none()
            );
        }
        // Jitter: 300 delays drawn over six bounds are not six values.
        assert!(seen.len() > 50, "{} distinct delays", seen.len());
        let id = ResourceId::new(Kind::Volume, "v0");
        b.succeeded(&id);
        assert!(b.get(&id).is_none());
        b.reset();
        assert!(b.next_due(t0).is_none());
    }

    #[test]
    fn terminal_hold_released_by_spec_or_host_change_only() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        let id = ResourceId::new(Kind::Volume, "a");
        let t0 = Instant::now();
        b.failed_terminal(&id, "Refused", "refused: shrink", hold("h1", 7));
        // No expiry: an hour later, same spec and host, still held.
        let later = t0 + Duration::from_secs(3600);
        assert!(matches!(
            b.waiting(&id, later, &hold("h1", 7)),
            Some((Wait::Held, _))
        ));
        assert_eq!(b.held().count(), 1);
        assert!(b.next_due(t0).is_none(), "a hold is not a timer");
        // A new revision that leaves the resource alone keeps the hold.
        b.reset();
        assert!(matches!(
            b.waiting(&id, later, &hold("h1", 7)),
            Some((Wait::Held, _))
        ));
        // The manifest changed: released and forgotten.
        assert!(b.waiting(&id, later, &hold("h2", 7)).is_none());
        assert!(b.get(&id).is_none());
        // The host changed: released too.
        b.failed_terminal(&id, "Conflict", "conflict", hold("h2", 7));
        assert!(b.waiting(&id, later, &hold("h2", 8)).is_none());
        assert_eq!(b.held().count(), 0);
    }
}
