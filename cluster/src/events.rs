//! Cluster events (a failover, a fence, a workload no node can take) under `events/`, each
//! bound to a lease of its own so etcd deletes it after [`EVENT_TTL`]. Writing one is best
//! effort: an event that cannot be written is logged, never a reason to stop a loop.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::PutOptions;
use serde::{Deserialize, Serialize};
use tracing::debug;

use crate::etcd::{Store, StoreError};
use crate::watch::{decode_or_skip, list_prefix};

/// How long an event stays in etcd.
pub const EVENT_TTL: Duration = Duration::from_secs(3600);

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// The leader moved a workload off a dead node.
    Failover,
    /// A node fenced itself (written once it reaches etcd again).
    Fence,
    /// No node can take a workload.
    Unplaceable,
    /// A workload runs on a node placement would not choose (a live migration completed
    /// there: the guest already runs there, so it stays, over capacity or not).
    Overcommitted,
}

/// One cluster event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterEvent {
    /// When (Unix milliseconds).
    pub at_ms: u64,
    /// What.
    pub kind: EventKind,
    /// Who wrote it (a node or a controller candidate).
    pub source: String,
    /// The workload concerned, if one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// A sentence for people.
    pub message: String,
}

impl ClusterEvent {
    /// An event happening now.
    pub fn now(kind: EventKind, source: &str, resource: Option<String>, message: String) -> Self {
        Self {
            at_ms: unix_ms(),
            kind,
            source: source.to_string(),
            resource,
            message,
        }
    }

    /// Its key id: the time zero-padded (sorts in time order), then the source.
    pub fn id(&self) -> String {
        format!("{:020}-{}", self.at_ms, self.source)
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Writes `event` under its own lease of [`EVENT_TTL`].
pub async fn record(store: &Store, event: &ClusterEvent) -> Result<(), StoreError> {
    let key = store.keys().event(&event.id());
    let value = serde_json::to_vec(event).map_err(|e| StoreError::decode(&key, e))?;
    let (lease, _) = store.grant_lease(EVENT_TTL).await?;
    let mut client = store.client();
    let put = client.put(key, value, Some(PutOptions::new().with_lease(lease)));
    store.timed(put).await?;
    Ok(())
}

/// [`record`], tried again once a second later, logging a failure instead of returning it.
pub async fn record_or_log(store: &Store, event: &ClusterEvent) {
    for attempt in 0..2 {
        match record(store, event).await {
            Ok(()) => return,
            Err(e) if attempt == 0 && !e.is_terminal() => {
                debug!(error = %e, kind = ?event.kind, "cluster event not written; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                debug!(error = %e, kind = ?event.kind, "cluster event not written");
                return;
            }
        }
    }
}

/// Writes `events` on a task of their own, in order (a slow etcd must not hold up the
/// caller's loop).
pub fn spawn_records(store: &Store, events: Vec<ClusterEvent>) {
    if events.is_empty() {
        return;
    }
    let store = store.clone();
    tokio::spawn(async move {
        for event in &events {
            record_or_log(&store, event).await;
        }
    });
}

/// The last `n` events, oldest first.
pub async fn recent(store: &Store, n: usize) -> Result<Vec<ClusterEvent>, StoreError> {
    let (entries, _) = list_prefix(store, &store.keys().events()).await?;
    let mut events: Vec<ClusterEvent> = entries
        .iter()
        .filter_map(|e| decode_or_skip(&e.key, &e.value))
        .collect();
    events.sort_by(|a, b| (a.at_ms, &a.source).cmp(&(b.at_ms, &b.source)));
    let from = events.len().saturating_sub(n);
    Ok(events.split_off(from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_in_time_order() {
        let mut a = ClusterEvent::now(EventKind::Fence, "n1", None, "x".into());
        let mut b = a.clone();
        a.at_ms = 9_999;
        b.at_ms = 10_000;
        assert!(a.id() < b.id());
        assert_eq!(b.id(), "00000000000000010000-n1");
    }

    #[test]
    fn events_round_trip_as_json() {
        let e = ClusterEvent::now(
            EventKind::Failover,
            "ctl",
            Some("Container/a".into()),
            "moved".into(),
        );
        let text = serde_json::to_string(&e).expect("json");
        assert!(text.contains("\"kind\":\"failover\""), "{text}");
        assert_eq!(
            serde_json::from_str::<ClusterEvent>(&text).expect("back"),
            e
        );
    }
}
