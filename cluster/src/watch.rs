//! A watch of every key under one prefix that survives reconnects: it resumes from the
//! revision after the last one it delivered, and says when it cannot (the history was
//! compacted) so the caller lists again.

use etcd_client::{EventType, GetOptions, WatchOptions, WatchStream};
use serde::de::DeserializeOwned;
use tracing::{debug, warn};

use crate::etcd::{Store, StoreError};

/// One change under the watched prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A key was created or updated.
    Put {
        /// The key.
        key: String,
        /// Its new value.
        value: Vec<u8>,
        /// Revision the key was created at (the token of leader and owner keys).
        create_revision: i64,
        /// Revision of this change.
        mod_revision: i64,
    },
    /// A key was deleted (explicitly, or because its lease expired).
    Delete {
        /// The key.
        key: String,
        /// Revision of this change.
        mod_revision: i64,
    },
    /// The history from the resume point was compacted away: the caller must list the prefix
    /// again ([`PrefixWatch::list`]), which restarts the watch after the listed revision.
    Resync,
}

/// A key and its value as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// Revision the key was created at.
    pub create_revision: i64,
    /// The lease the key is bound to (0: none).
    pub lease: i64,
}

/// Watches a prefix from a revision on, reconnecting as needed.
#[derive(Debug)]
pub struct PrefixWatch {
    store: Store,
    prefix: String,
    next_revision: i64,
    stream: Option<WatchStream>,
}

impl PrefixWatch {
    /// A watch of `prefix` starting at `from_revision` (0: from now on). Nothing is sent to etcd
    /// until the first [`PrefixWatch::next_batch`] or [`PrefixWatch::list`].
    pub fn new(store: &Store, prefix: String, from_revision: i64) -> Self {
        Self {
            store: store.clone(),
            prefix,
            next_revision: from_revision,
            stream: None,
        }
    }

    /// The revision the watch resumes from after a reconnect.
    pub fn next_revision(&self) -> i64 {
        self.next_revision
    }

    /// Lists every key under the prefix and restarts the watch just after that listing.
    pub async fn list(&mut self) -> Result<Vec<Entry>, StoreError> {
        let (entries, revision) = list_prefix(&self.store, &self.prefix).await?;
        self.next_revision = revision + 1;
        self.stream = None;
        Ok(entries)
    }

    /// The next changes (at least one). On an error the stream is dropped and the next call
    /// reconnects from [`PrefixWatch::next_revision`]; retryable errors are worth retrying.
    pub async fn next_batch(&mut self) -> Result<Vec<Change>, StoreError> {
        loop {
            if self.stream.is_none() {
                self.stream = Some(self.open().await?);
            }
            let Some(stream) = self.stream.as_mut() else {
                continue;
            };
            let message = match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) => {
                    self.stream = None;
                    return Err(StoreError::Unreachable("watch stream closed".into()));
                }
                Err(e) => {
                    self.stream = None;
                    return Err(e.into());
                }
            };
            if message.compact_revision() > 0 {
                debug!(prefix = %self.prefix, compacted = message.compact_revision(), "resync");
                self.stream = None;
                return Ok(vec![Change::Resync]);
            }
            if message.canceled() {
                self.stream = None;
                let reason = message.cancel_reason().to_string();
                return Err(StoreError::Unreachable(format!("watch canceled: {reason}")));
            }
            let changes = self.changes(message.events())?;
            if !changes.is_empty() {
                return Ok(changes);
            }
        }
    }

    async fn open(&self) -> Result<WatchStream, StoreError> {
        let mut options = WatchOptions::new().with_prefix();
        if self.next_revision > 0 {
            options = options.with_start_revision(self.next_revision);
        }
        let mut client = self.store.client();
        self.store
            .timed(client.watch(self.prefix.clone(), Some(options)))
            .await
    }

    fn changes(&mut self, events: &[etcd_client::Event]) -> Result<Vec<Change>, StoreError> {
        let mut out = Vec::with_capacity(events.len());
        for event in events {
            let Some(kv) = event.kv() else { continue };
            let key = kv
                .key_str()
                .map_err(|e| StoreError::decode("(watch)", e))?
                .to_string();
            self.next_revision = self.next_revision.max(kv.mod_revision() + 1);
            out.push(match event.event_type() {
                EventType::Put => Change::Put {
                    key,
                    value: kv.value().to_vec(),
                    create_revision: kv.create_revision(),
                    mod_revision: kv.mod_revision(),
                },
                EventType::Delete => Change::Delete {
                    key,
                    mod_revision: kv.mod_revision(),
                },
            });
        }
        Ok(out)
    }
}

/// Every key under `prefix` and the store revision of the listing.
pub async fn list_prefix(store: &Store, prefix: &str) -> Result<(Vec<Entry>, i64), StoreError> {
    let mut client = store.client();
    let response = store
        .timed(client.get(prefix.to_string(), Some(GetOptions::new().with_prefix())))
        .await?;
    let revision = response.header().map(|h| h.revision()).unwrap_or_default();
    let mut entries = Vec::with_capacity(response.kvs().len());
    for kv in response.kvs() {
        let key = kv
            .key_str()
            .map_err(|e| StoreError::decode(prefix, e))?
            .to_string();
        entries.push(Entry {
            key,
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            lease: kv.lease(),
        });
    }
    Ok((entries, revision))
}

/// A JSON value, or `None` with a warning: one bad value must not stop a listing or a watch.
pub fn decode_or_skip<T: DeserializeOwned>(key: &str, value: &[u8]) -> Option<T> {
    match serde_json::from_slice(value) {
        Ok(v) => Some(v),
        Err(e) => {
            warn!(%key, error = %e, "skipping a value stead cannot read");
            None
        }
    }
}
