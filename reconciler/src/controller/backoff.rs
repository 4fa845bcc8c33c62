//! Per-resource exponential backoff after failed changes (kube-runtime's
//! `error_policy` + requeue): a resource that failed is not retried before its delay
//! has passed; the delay doubles per failure up to a cap, and a success or a new
//! revision resets it. Terminal errors (refused, conflict, unsupported) wait the cap.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use stead_schema::ResourceId;

/// One resource's failure record.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Consecutive failures.
    pub failures: u32,
    /// Not retried before this instant.
    pub not_before: Instant,
    /// The last error.
    pub message: String,
}

/// Backoff state for all resources.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    entries: BTreeMap<ResourceId, Entry>,
}

impl Backoff {
    /// Delays `base`, `2*base`, … up to `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            entries: BTreeMap::new(),
        }
    }

    /// The delay after `failures` consecutive failures.
    pub fn delay(&self, failures: u32) -> Duration {
        let shift = failures.saturating_sub(1).min(20);
        self.base.saturating_mul(1u32 << shift).min(self.cap)
    }

    /// Records a failure at `now`; returns the delay before the next try.
    pub fn failed(
        &mut self,
        id: &ResourceId,
        message: &str,
        terminal: bool,
        now: Instant,
    ) -> Duration {
        let failures = self.entries.get(id).map(|e| e.failures).unwrap_or(0) + 1;
        let delay = if terminal {
            self.cap
        } else {
            self.delay(failures)
        };
        self.entries.insert(
            id.clone(),
            Entry {
                failures,
                not_before: now + delay,
                message: message.to_string(),
            },
        );
        delay
    }

    /// Forgets `id` (it converged).
    pub fn succeeded(&mut self, id: &ResourceId) {
        self.entries.remove(id);
    }

    /// Forgets everything (a new revision: every resource gets a fresh try).
    pub fn reset(&mut self) {
        self.entries.clear();
    }

    /// The entry of `id` if it must still wait at `now`.
    pub fn waiting(&self, id: &ResourceId, now: Instant) -> Option<&Entry> {
        self.entries.get(id).filter(|e| e.not_before > now)
    }

    /// The entry of `id`, waiting or due.
    pub fn get(&self, id: &ResourceId) -> Option<&Entry> {
        self.entries.get(id)
    }

    /// The earliest instant a waiting resource becomes due.
    pub fn next_due(&self, now: Instant) -> Option<Instant> {
        self.entries
            .values()
            .map(|e| e.not_before)
            .filter(|t| *t > now)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stead_schema::Kind;

    #[test]
    fn doubles_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        let id = ResourceId::new(Kind::Volume, "a");
        let t0 = Instant::now();
        assert_eq!(b.failed(&id, "x", false, t0), Duration::from_secs(1));
        assert_eq!(b.failed(&id, "x", false, t0), Duration::from_secs(2));
        assert_eq!(b.failed(&id, "x", false, t0), Duration::from_secs(4));
        assert_eq!(b.failed(&id, "x", false, t0), Duration::from_secs(8));
        assert_eq!(b.failed(&id, "x", false, t0), Duration::from_secs(10));
        assert!(b.waiting(&id, t0).is_some());
        assert!(b.waiting(&id, t0 + Duration::from_secs(11)).is_none());
        assert_eq!(b.next_due(t0), Some(t0 + Duration::from_secs(10)));
        b.succeeded(&id);
        assert!(b.get(&id).is_none());
        assert_eq!(b.failed(&id, "x", true, t0), Duration::from_secs(10));
        b.reset();
        assert!(b.next_due(t0).is_none());
    }
}
