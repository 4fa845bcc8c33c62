//! Ownership of a running workload, and fencing tokens.
//!
//! A workload is owned through its owner key, created only if absent and bound to the owning
//! agent's lease: when the agent's lease expires the key goes, and only then can another node
//! take the workload. The [`FencingToken`] is the owner key's create revision; a write that
//! matters compares it in the same transaction ([`guarded_put`]), so an old owner that comes
//! back after a partition cannot write over the new owner's work.

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use tracing::{debug, instrument};

use crate::etcd::{Store, StoreError};
use crate::keys::{Key, ResourceRef};
use crate::watch::{decode_or_skip, list_prefix};

/// The value of an owner key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnerRecord {
    /// The owning node.
    pub node: String,
}

/// Proof of ownership of one workload: its owner key's create revision.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken {
    resource: ResourceRef,
    revision: i64,
}

impl FencingToken {
    /// A token for `resource` at `revision` (as read from etcd).
    pub fn new(resource: ResourceRef, revision: i64) -> Self {
        Self { resource, revision }
    }

    /// The workload.
    pub fn resource(&self) -> &ResourceRef {
        &self.resource
    }

    /// The owner key's create revision.
    pub fn revision(&self) -> i64 {
        self.revision
    }
}

/// Who may own: a node and its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The node's name.
    pub node: String,
    /// The node's current lease.
    pub lease: i64,
}

/// The current owner of a workload and its token, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ownership {
    /// Who owns it.
    pub record: OwnerRecord,
    /// The lease the owner key is bound to.
    pub lease: i64,
    /// The current token.
    pub token: FencingToken,
}

/// Takes ownership of `resource` if nobody owns it; `None` while another owner's key exists.
/// Already owning it with the same lease returns the current token.
#[instrument(skip(store, holder), fields(node = %holder.node))]
pub async fn acquire(
    store: &Store,
    resource: &ResourceRef,
    holder: &Holder,
) -> Result<Option<FencingToken>, StoreError> {
    let key = store.keys().owner(resource);
    let record = OwnerRecord {
        node: holder.node.clone(),
    };
    let value = serde_json::to_vec(&record).map_err(|e| StoreError::decode(&key, e))?;
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            key,
            value,
            Some(PutOptions::new().with_lease(holder.lease)),
        )]);
    let mut client = store.client();
    let response = store.timed(client.txn(txn)).await?;
    if response.succeeded() {
        let revision = response.header().map(|h| h.revision()).unwrap_or_default();
        debug!(token = revision, "acquired");
        return Ok(Some(FencingToken::new(resource.clone(), revision)));
    }
    let current = owner_of(store, resource).await?;
    Ok(current
        .filter(|o| o.lease == holder.lease && o.record.node == holder.node)
        .map(|o| o.token))
}

/// Who owns `resource` now.
pub async fn owner_of(
    store: &Store,
    resource: &ResourceRef,
) -> Result<Option<Ownership>, StoreError> {
    let key = store.keys().owner(resource);
    let mut client = store.client();
    let response = store.timed(client.get(key.clone(), None)).await?;
    let Some(kv) = response.kvs().first() else {
        return Ok(None);
    };
    let record: OwnerRecord =
        serde_json::from_slice(kv.value()).map_err(|e| StoreError::decode(&key, e))?;
    let token = FencingToken::new(resource.clone(), kv.create_revision());
    Ok(Some(Ownership {
        record,
        lease: kv.lease(),
        token,
    }))
}

/// Every owned workload (for status; unreadable owner records skipped with a warning).
pub async fn list_owners(store: &Store) -> Result<Vec<Ownership>, StoreError> {
    let (entries, _) = list_prefix(store, &store.keys().owners()).await?;
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let Some(Key::Owner(resource)) = store.keys().parse(&e.key) else {
            continue;
        };
        let Some(record) = decode_or_skip::<OwnerRecord>(&e.key, &e.value) else {
            continue;
        };
        let token = FencingToken::new(resource, e.create_revision);
        out.push(Ownership {
            record,
            lease: e.lease,
            token,
        });
    }
    Ok(out)
}

/// Gives up ownership (only if `token` is still current); returns whether a key was deleted.
pub async fn release(store: &Store, token: &FencingToken) -> Result<bool, StoreError> {
    let key = store.keys().owner(&token.resource);
    let txn = Txn::new()
        .when([guard(&key, token)])
        .and_then([TxnOp::delete(key.clone(), None)]);
    let mut client = store.client();
    let response = store.timed(client.txn(txn)).await?;
    debug!(%key, released = response.succeeded(), "release");
    Ok(response.succeeded())
}

/// Whether `token` is still the current ownership of its workload.
pub async fn is_current(store: &Store, token: &FencingToken) -> Result<bool, StoreError> {
    Ok(owner_of(store, &token.resource)
        .await?
        .is_some_and(|o| o.token == *token))
}

fn guard(owner_key: &str, token: &FencingToken) -> Compare {
    Compare::create_revision(owner_key.to_string(), CompareOp::Equal, token.revision)
}

/// Writes `value` at `key` only while `token` is current ([`StoreError::Fenced`] otherwise):
/// the owner key's create revision is compared in the same transaction.
pub async fn guarded_put(
    store: &Store,
    key: &str,
    value: impl Into<Vec<u8>>,
    token: &FencingToken,
) -> Result<i64, StoreError> {
    let owner_key = store.keys().owner(&token.resource);
    let txn = Txn::new()
        .when([guard(&owner_key, token)])
        .and_then([TxnOp::put(key.to_string(), value.into(), None)]);
    let mut client = store.client();
    let response = store.timed(client.txn(txn)).await?;
    if !response.succeeded() {
        return Err(StoreError::Fenced(format!(
            "{} token {} is not current",
            token.resource, token.revision
        )));
    }
    Ok(response.header().map(|h| h.revision()).unwrap_or_default())
}
