//! The key layout in etcd: the one place that builds and parses keys. Pure.
//!
//! Under a prefix (default `/stead/v1`):
//!
//! | key | value | bound to |
//! |---|---|---|
//! | `nodes/<node>` | [`NodeInfo`](crate::model::NodeInfo) | the node's lease |
//! | `leader` | the elected controller's name | the controller's lease |
//! | `assign/<Kind>/<name>` | [`Assignment`](crate::model::Assignment) | nothing (guarded by the leader key) |
//! | `owner/<Kind>/<name>` | [`OwnerRecord`](crate::owner::OwnerRecord) | the owning agent's lease |
//! | `replication/<Kind>/<name>` | replication status | nothing |
//! | `events/<id>` | a cluster event | its own lease (an hour) |
//! | `migrate/<Kind>/<name>` | [`MigrationRecord`](crate::migrate::MigrationRecord) | nothing |

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The prefix every key lives under unless configured otherwise.
pub const DEFAULT_PREFIX: &str = "/stead/v1";

/// A workload in the cluster: `Kind/name` (a Container or a VirtualMachine).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ResourceRef {
    kind: String,
    name: String,
}

/// A `Kind/name` or key part that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid resource reference {text:?}: {reason}")]
pub struct InvalidRef {
    /// The text given.
    pub text: String,
    /// Why it was refused.
    pub reason: &'static str,
}

impl ResourceRef {
    /// A reference from its kind and name; both must be non-empty and free of `/`.
    pub fn new(kind: &str, name: &str) -> Result<Self, InvalidRef> {
        let text = format!("{kind}/{name}");
        check_segment(kind, &text, "empty kind or kind with '/'")?;
        check_segment(name, &text, "empty name or name with '/'")?;
        if !kind.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(InvalidRef {
                text,
                reason: "kind is not alphanumeric",
            });
        }
        Ok(Self {
            kind: kind.to_string(),
            name: name.to_string(),
        })
    }

    /// The kind (`Container`, `VirtualMachine`).
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The resource's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

fn check_segment(part: &str, text: &str, reason: &'static str) -> Result<(), InvalidRef> {
    if part.is_empty() || part.contains('/') || part.chars().any(char::is_control) {
        return Err(InvalidRef {
            text: text.to_string(),
            reason,
        });
    }
    Ok(())
}

impl fmt::Display for ResourceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

impl FromStr for ResourceRef {
    type Err = InvalidRef;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((kind, name)) = s.split_once('/') else {
            return Err(InvalidRef {
                text: s.to_string(),
                reason: "expected Kind/name",
            });
        };
        Self::new(kind, name)
    }
}

impl TryFrom<String> for ResourceRef {
    type Error = InvalidRef;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ResourceRef> for String {
    fn from(r: ResourceRef) -> Self {
        r.to_string()
    }
}

/// What a key names, once parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// `nodes/<node>`.
    Node(String),
    /// `leader`.
    Leader,
    /// `assign/<Kind>/<name>`.
    Assignment(ResourceRef),
    /// `owner/<Kind>/<name>`.
    Owner(ResourceRef),
    /// `replication/<Kind>/<name>`.
    Replication(ResourceRef),
    /// `events/<id>`.
    Event(String),
    /// `migrate/<Kind>/<name>`.
    Migration(ResourceRef),
}

/// Builds and parses the keys under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Default for Keys {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

const NODES: &str = "nodes/";
const LEADER: &str = "leader";
const ASSIGN: &str = "assign/";
const OWNER: &str = "owner/";
const REPLICATION: &str = "replication/";
const EVENTS: &str = "events/";
const MIGRATE: &str = "migrate/";

impl Keys {
    /// Keys under `prefix` (a trailing `/` is ignored; an empty prefix puts keys at the root).
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: format!("{}/", prefix.trim_end_matches('/')),
        }
    }

    /// The prefix, with its trailing `/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn join(&self, parts: &[&str]) -> String {
        let mut key = self.prefix.clone();
        for p in parts {
            key.push_str(p);
        }
        key
    }

    /// The prefix of every node key.
    pub fn nodes(&self) -> String {
        self.join(&[NODES])
    }

    /// The key a node registers under.
    pub fn node(&self, name: &str) -> String {
        self.join(&[NODES, name])
    }

    /// The elected controller's key.
    pub fn leader(&self) -> String {
        self.join(&[LEADER])
    }

    /// The prefix of every assignment key.
    pub fn assignments(&self) -> String {
        self.join(&[ASSIGN])
    }

    /// A workload's assignment key.
    pub fn assignment(&self, resource: &ResourceRef) -> String {
        self.join(&[ASSIGN, &resource.to_string()])
    }

    /// The prefix of every owner key.
    pub fn owners(&self) -> String {
        self.join(&[OWNER])
    }

    /// A workload's owner key.
    pub fn owner(&self, resource: &ResourceRef) -> String {
        self.join(&[OWNER, &resource.to_string()])
    }

    /// The prefix of every replication status key.
    pub fn replications(&self) -> String {
        self.join(&[REPLICATION])
    }

    /// A workload's replication status key.
    pub fn replication(&self, resource: &ResourceRef) -> String {
        self.join(&[REPLICATION, &resource.to_string()])
    }

    /// The prefix of every migration override key.
    pub fn migrations(&self) -> String {
        self.join(&[MIGRATE])
    }

    /// A workload's migration override key.
    pub fn migration(&self, resource: &ResourceRef) -> String {
        self.join(&[MIGRATE, &resource.to_string()])
    }

    /// The prefix of every event key.
    pub fn events(&self) -> String {
        self.join(&[EVENTS])
    }

    /// An event's key; `id` sorts in time order when zero-padded (see [`Keys::event_id`]).
    pub fn event(&self, id: &str) -> String {
        self.join(&[EVENTS, id])
    }

    /// An event id that sorts by time: the revision, zero-padded to 20 digits.
    pub fn event_id(revision: i64) -> String {
        format!("{revision:020}")
    }

    /// What `key` names, or `None` for a key outside the layout.
    pub fn parse(&self, key: &str) -> Option<Key> {
        let rest = key.strip_prefix(&self.prefix)?;
        if rest == LEADER {
            return Some(Key::Leader);
        }
        if let Some(name) = rest.strip_prefix(NODES) {
            return plain(name).map(Key::Node);
        }
        if let Some(id) = rest.strip_prefix(EVENTS) {
            return plain(id).map(Key::Event);
        }
        if let Some(r) = rest.strip_prefix(ASSIGN) {
            return r.parse().ok().map(Key::Assignment);
        }
        if let Some(r) = rest.strip_prefix(OWNER) {
            return r.parse().ok().map(Key::Owner);
        }
        if let Some(r) = rest.strip_prefix(REPLICATION) {
            return r.parse().ok().map(Key::Replication);
        }
        if let Some(r) = rest.strip_prefix(MIGRATE) {
            return r.parse().ok().map(Key::Migration);
        }
        None
    }

    /// The workload an assignment key names.
    pub fn parse_assignment(&self, key: &str) -> Option<ResourceRef> {
        match self.parse(key)? {
            Key::Assignment(r) => Some(r),
            _ => None,
        }
    }

    /// The node a node key names.
    pub fn parse_node(&self, key: &str) -> Option<String> {
        match self.parse(key)? {
            Key::Node(n) => Some(n),
            _ => None,
        }
    }
}

fn plain(segment: &str) -> Option<String> {
    (!segment.is_empty() && !segment.contains('/')).then(|| segment.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> ResourceRef {
        s.parse().expect("valid ref")
    }

    #[test]
    fn builds_keys_under_the_default_prefix() {
        let k = Keys::default();
        assert_eq!(k.node("n1"), "/stead/v1/nodes/n1");
        assert_eq!(k.nodes(), "/stead/v1/nodes/");
        assert_eq!(k.leader(), "/stead/v1/leader");
        assert_eq!(
            k.assignment(&r("Container/web")),
            "/stead/v1/assign/Container/web"
        );
        assert_eq!(
            k.owner(&r("VirtualMachine/db")),
            "/stead/v1/owner/VirtualMachine/db"
        );
        assert_eq!(
            k.replication(&r("Container/web")),
            "/stead/v1/replication/Container/web"
        );
        assert_eq!(
            k.migration(&r("Container/web")),
            "/stead/v1/migrate/Container/web"
        );
        assert_eq!(
            k.parse("/stead/v1/migrate/Container/web"),
            Some(Key::Migration(r("Container/web")))
        );
        assert_eq!(
            k.event(&Keys::event_id(42)),
            "/stead/v1/events/00000000000000000042"
        );
    }

    #[test]
    fn trailing_slash_in_prefix_is_ignored() {
        assert_eq!(Keys::new("/x/").leader(), "/x/leader");
        assert_eq!(Keys::new("/x").leader(), "/x/leader");
    }

    #[test]
    fn parse_inverts_build() {
        let k = Keys::new("/t");
        let web = r("Container/web");
        assert_eq!(k.parse(&k.node("a")), Some(Key::Node("a".into())));
        assert_eq!(k.parse(&k.leader()), Some(Key::Leader));
        assert_eq!(
            k.parse(&k.assignment(&web)),
            Some(Key::Assignment(web.clone()))
        );
        assert_eq!(k.parse(&k.owner(&web)), Some(Key::Owner(web.clone())));
        assert_eq!(
            k.parse(&k.replication(&web)),
            Some(Key::Replication(web.clone()))
        );
        assert_eq!(k.parse(&k.event("7")), Some(Key::Event("7".into())));
        assert_eq!(k.parse_assignment(&k.assignment(&web)), Some(web));
        assert_eq!(k.parse_node(&k.node("b")), Some("b".into()));
    }

    #[test]
    fn parse_refuses_foreign_and_malformed_keys() {
        let k = Keys::new("/t");
        assert_eq!(k.parse("/other/leader"), None);
        assert_eq!(k.parse("/t/leaderx"), None);
        assert_eq!(k.parse("/t/nodes/"), None);
        assert_eq!(k.parse("/t/nodes/a/b"), None);
        assert_eq!(k.parse("/t/assign/Container"), None);
        assert_eq!(k.parse("/t/assign/Container/a/b"), None);
        assert_eq!(k.parse("/t/owner//x"), None);
        assert_eq!(k.parse_node(&k.leader()), None);
    }

    #[test]
    fn resource_refs_are_checked() {
        assert!("Container/web".parse::<ResourceRef>().is_ok());
        assert!("Container".parse::<ResourceRef>().is_err());
        assert!("/web".parse::<ResourceRef>().is_err());
        assert!("Container/".parse::<ResourceRef>().is_err());
        assert!("Container/a/b".parse::<ResourceRef>().is_err());
        assert!("Con-tainer/a".parse::<ResourceRef>().is_err());
        let web = r("Container/web");
        assert_eq!((web.kind(), web.name()), ("Container", "web"));
        let json = serde_json::to_string(&web).expect("serialize");
        assert_eq!(json, "\"Container/web\"");
        assert_eq!(
            serde_json::from_str::<ResourceRef>(&json).expect("parse"),
            web
        );
        assert!(serde_json::from_str::<ResourceRef>("\"nope\"").is_err());
    }

    #[test]
    fn event_ids_sort_by_revision() {
        let mut ids = [Keys::event_id(10), Keys::event_id(9), Keys::event_id(100)];
        ids.sort();
        assert_eq!(
            ids,
            [Keys::event_id(9), Keys::event_id(10), Keys::event_id(100)]
        );
    }
}
