//! Kinds, resource identities, metadata and the typed resource model.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::kinds::*;
use crate::values::{ResourceRef, ValueError};

/// The API version every manifest must carry.
pub const API_VERSION: &str = "stead.dev/v1alpha1";

/// Every kind stead manages.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
pub enum Kind {
    /// A storage pool (dir, btrfs, ...).
    StoragePool,
    /// A bridge or VXLAN network.
    Network,
    /// A Linux bond.
    Bond,
    /// A disk image or rootfs in a pool.
    Volume,
    /// A system container.
    Container,
    /// A KVM virtual machine.
    VirtualMachine,
    /// A backup schedule.
    BackupSchedule,
    /// A cluster HA group (node priorities). Cluster configuration: nothing on a host.
    HaGroup,
}

impl Kind {
    /// All kinds, in a stable order.
    pub const ALL: [Kind; 8] = [
        Kind::StoragePool,
        Kind::Network,
        Kind::Bond,
        Kind::Volume,
        Kind::Container,
        Kind::VirtualMachine,
        Kind::BackupSchedule,
        Kind::HaGroup,
    ];

    /// The kind's name as written in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::StoragePool => "StoragePool",
            Kind::Network => "Network",
            Kind::Bond => "Bond",
            Kind::Volume => "Volume",
            Kind::Container => "Container",
            Kind::VirtualMachine => "VirtualMachine",
            Kind::BackupSchedule => "BackupSchedule",
            Kind::HaGroup => "HaGroup",
        }
    }

    /// Whether resources of this kind are objects on a host that a driver converges.
    /// HaGroup is cluster configuration only: the single-host engine skips it.
    pub fn is_host_object(self) -> bool {
        !matches!(self, Kind::HaGroup)
    }

    /// Whether this kind is a workload the cluster places on a node.
    pub fn is_workload(self) -> bool {
        matches!(self, Kind::Container | Kind::VirtualMachine)
    }

    /// Parses a kind as the CLI accepts it: exact, lowercase, plural or short
    /// (`volume`, `volumes`, `vm`, `ct`, `net`, `pool`).
    pub fn parse_loose(s: &str) -> Option<Kind> {
        let l = s.to_ascii_lowercase();
        let l = l.strip_suffix('s').unwrap_or(&l);
        Some(match l {
            "storagepool" | "pool" => Kind::StoragePool,
            "network" | "net" => Kind::Network,
            "bond" => Kind::Bond,
            "volume" | "vol" => Kind::Volume,
            "container" | "ct" => Kind::Container,
            "virtualmachine" | "vm" => Kind::VirtualMachine,
            "backupschedule" | "backup" => Kind::BackupSchedule,
            "hagroup" | "ha" => Kind::HaGroup,
            _ => return None,
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                ValueError(format!(
                    "unknown kind {s:?}: expected one of {}",
                    Kind::ALL.map(|k| k.as_str()).join(", ")
                ))
            })
    }
}

/// The identity of a resource: its kind and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ResourceId {
    /// The kind.
    pub kind: Kind,
    /// The name (unique per kind).
    pub name: String,
}

impl ResourceId {
    /// Builds an id.
    pub fn new(kind: Kind, name: impl Into<String>) -> Self {
        ResourceId {
            kind,
            name: name.into(),
        }
    }

    /// Parses `Kind/name` as typed on a command line: the kind case-insensitively and with
    /// its short forms (`vm/web`, `volume/data`), see [`Kind::parse_loose`].
    pub fn parse_loose(s: &str) -> Result<Self, ValueError> {
        let (k, n) = s
            .split_once('/')
            .ok_or_else(|| ValueError(format!("expected Kind/name, got {s:?}")))?;
        let kind = Kind::parse_loose(k).ok_or_else(|| ValueError(format!("unknown kind {k:?}")))?;
        crate::values::check_name(n)?;
        Ok(ResourceId::new(kind, n))
    }
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

impl FromStr for ResourceId {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        let r: ResourceRef = s.parse()?;
        Ok(r.into())
    }
}

impl From<ResourceRef> for ResourceId {
    fn from(r: ResourceRef) -> Self {
        ResourceId {
            kind: r.kind,
            name: r.name,
        }
    }
}

/// Object metadata.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metadata {
    /// `[a-z0-9]([a-z0-9-]*[a-z0-9])?`, unique per kind.
    pub name: crate::values::Name,
    /// Labels, used by selectors.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Free-form annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The spec of a resource, one variant per kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Spec {
    /// StoragePool spec.
    StoragePool(StoragePoolSpec),
    /// Network spec.
    Network(NetworkSpec),
    /// Bond spec.
    Bond(BondSpec),
    /// Volume spec.
    Volume(VolumeSpec),
    /// Container spec.
    Container(ContainerSpec),
    /// VirtualMachine spec.
    VirtualMachine(VirtualMachineSpec),
    /// BackupSchedule spec.
    BackupSchedule(BackupScheduleSpec),
    /// HaGroup spec.
    HaGroup(HaGroupSpec),
}

impl Spec {
    /// The kind of this spec.
    pub fn kind(&self) -> Kind {
        match self {
            Spec::StoragePool(_) => Kind::StoragePool,
            Spec::Network(_) => Kind::Network,
            Spec::Bond(_) => Kind::Bond,
            Spec::Volume(_) => Kind::Volume,
            Spec::Container(_) => Kind::Container,
            Spec::VirtualMachine(_) => Kind::VirtualMachine,
            Spec::BackupSchedule(_) => Kind::BackupSchedule,
            Spec::HaGroup(_) => Kind::HaGroup,
        }
    }

    /// Deserializes a spec of `kind` from a JSON value.
    pub fn from_value(kind: Kind, v: serde_json::Value) -> Result<Spec, serde_json::Error> {
        Ok(match kind {
            Kind::StoragePool => Spec::StoragePool(serde_json::from_value(v)?),
            Kind::Network => Spec::Network(serde_json::from_value(v)?),
            Kind::Bond => Spec::Bond(serde_json::from_value(v)?),
            Kind::Volume => Spec::Volume(serde_json::from_value(v)?),
            Kind::Container => Spec::Container(serde_json::from_value(v)?),
            Kind::VirtualMachine => Spec::VirtualMachine(serde_json::from_value(v)?),
            Kind::BackupSchedule => Spec::BackupSchedule(serde_json::from_value(v)?),
            Kind::HaGroup => Spec::HaGroup(serde_json::from_value(v)?),
        })
    }

    /// Explicit `dependsOn` edges.
    pub fn depends_on(&self) -> &[ResourceRef] {
        match self {
            Spec::StoragePool(s) => &s.depends_on,
            Spec::Network(s) => &s.depends_on,
            Spec::Bond(s) => &s.depends_on,
            Spec::Volume(s) => &s.depends_on,
            Spec::Container(s) => &s.depends_on,
            Spec::VirtualMachine(s) => &s.depends_on,
            Spec::BackupSchedule(s) => &s.depends_on,
            Spec::HaGroup(_) => &[],
        }
    }

    /// Every by-name reference this spec makes, with the JSON pointer of the
    /// referencing field (for error locations). Includes `dependsOn`.
    pub fn references(&self) -> Vec<(ResourceId, String)> {
        let mut out = Vec::new();
        let mut push =
            |kind: Kind, name: &str, ptr: String| out.push((ResourceId::new(kind, name), ptr));
        match self {
            Spec::StoragePool(_) | Spec::Bond(_) | Spec::HaGroup(_) => {}
            Spec::Network(_) => {}
            Spec::Volume(v) => {
                push(Kind::StoragePool, v.pool.as_str(), "/spec/pool".into());
                if let Some(c) = &v.clone {
                    push(Kind::Volume, c.from.as_str(), "/spec/clone/from".into());
                }
            }
            Spec::Container(c) => {
                if let Some(v) = &c.rootfs.volume {
                    push(Kind::Volume, v.as_str(), "/spec/rootfs/volume".into());
                }
                if let Some(p) = &c.rootfs.pool {
                    push(Kind::StoragePool, p.as_str(), "/spec/rootfs/pool".into());
                }
                for (i, n) in c.interfaces.iter().enumerate() {
                    push(
                        Kind::Network,
                        n.network.as_str(),
                        format!("/spec/interfaces/{i}/network"),
                    );
                }
                for (i, m) in c.mounts.iter().enumerate() {
                    push(
                        Kind::Volume,
                        m.volume.as_str(),
                        format!("/spec/mounts/{i}/volume"),
                    );
                }
            }
            Spec::VirtualMachine(vm) => {
                for (i, d) in vm.disks.iter().enumerate() {
                    push(
                        Kind::Volume,
                        d.volume.as_str(),
                        format!("/spec/disks/{i}/volume"),
                    );
                }
                for (i, c) in vm.cdroms.iter().enumerate() {
                    push(
                        Kind::Volume,
                        c.volume.as_str(),
                        format!("/spec/cdroms/{i}/volume"),
                    );
                }
                for (i, n) in vm.interfaces.iter().enumerate() {
                    push(
                        Kind::Network,
                        n.network.as_str(),
                        format!("/spec/interfaces/{i}/network"),
                    );
                }
            }
            Spec::BackupSchedule(b) => {
                push(
                    Kind::StoragePool,
                    b.storage.as_str(),
                    "/spec/storage".into(),
                );
                for (i, r) in b.targets.names.iter().enumerate() {
                    push(r.kind, &r.name, format!("/spec/targets/names/{i}"));
                }
            }
        }
        for (i, r) in self.depends_on().iter().enumerate() {
            out.push((
                ResourceId::new(r.kind, r.name.clone()),
                format!("/spec/dependsOn/{i}"),
            ));
        }
        out
    }
}

/// A kind's spec type: which [`Kind`] it belongs to, and how to pick it out of a [`Spec`].
/// Drivers written for one spec type (`stead_reconciler::driver::KindDriver`) get their
/// spec through it.
pub trait KindSpec: Sized {
    /// The kind whose spec this is.
    const KIND: Kind;

    /// The spec as this type, or `None` when it is of another kind.
    fn from_spec(spec: &Spec) -> Option<&Self>;
}

macro_rules! kind_specs {
    ($($kind:ident => $ty:ty),* $(,)?) => {$(
        impl KindSpec for $ty {
            const KIND: Kind = Kind::$kind;

            fn from_spec(spec: &Spec) -> Option<&Self> {
                if let Spec::$kind(s) = spec { Some(s) } else { None }
            }
        }
    )*};
}

kind_specs!(
    StoragePool => StoragePoolSpec,
    Network => NetworkSpec,
    Bond => BondSpec,
    Volume => VolumeSpec,
    Container => ContainerSpec,
    VirtualMachine => VirtualMachineSpec,
    BackupSchedule => BackupScheduleSpec,
    HaGroup => HaGroupSpec,
);

/// A position in a manifest file. `line` and `col` are 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize)]
pub struct Pos {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub col: usize,
}

/// Where a resource came from, with a JSON-pointer → position map of its nodes.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    /// The manifest file.
    pub file: PathBuf,
    /// Position of the document's root node.
    pub pos: Pos,
    /// Positions of every node, keyed by JSON pointer (`/spec/interfaces/0/network`).
    pub spans: Arc<BTreeMap<String, NodePos>>,
}

/// Where a node is: its value, and the key that names it (for mapping entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NodePos {
    /// Position of the key (same as `value` for sequence items and the root).
    pub key: Pos,
    /// Position of the value.
    pub value: Pos,
}

impl Origin {
    /// The position of the node at `pointer`, or of its closest ancestor that has one.
    pub fn pos_of(&self, pointer: &str) -> Pos {
        let mut p = pointer;
        loop {
            if let Some(pos) = self.spans.get(p) {
                return pos.value;
            }
            match p.rfind('/') {
                Some(i) => p = &p[..i],
                None => return self.pos,
            }
        }
    }

    /// The position of the key naming the node at `pointer` (e.g. an unknown field).
    pub fn key_pos_of(&self, pointer: &str) -> Pos {
        match self.spans.get(pointer) {
            Some(p) => p.key,
            None => self.pos_of(pointer),
        }
    }

    /// `file:line:col` of the node at `pointer`.
    pub fn locate(&self, pointer: &str) -> String {
        let p = self.pos_of(pointer);
        format!("{}:{}:{}", self.file.display(), p.line, p.col)
    }
}

/// One typed, loaded resource.
#[derive(Debug, Clone)]
pub struct Resource {
    /// Kind and name.
    pub id: ResourceId,
    /// Metadata (labels, annotations).
    pub metadata: Metadata,
    /// The typed spec.
    pub spec: Spec,
    /// Source location.
    pub origin: Origin,
}

impl Resource {
    /// The spec as canonical JSON (what the state DB stores and hashes).
    pub fn spec_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.spec).unwrap_or(serde_json::Value::Null)
    }

    /// A stable content hash of the spec and labels (hex sha-like FNV, fast).
    pub fn spec_hash(&self) -> String {
        let text = serde_json::to_string(&(&self.spec, &self.metadata.labels)).unwrap_or_default();
        fnv1a_hex([text.as_bytes()])
    }
}

/// FNV-1a 64 of the concatenated `parts`, as 16 hex digits: the hash detects change, it is
/// not a security boundary.
fn fnv1a_hex<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in parts.into_iter().flatten() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// The desired state: every loaded resource keyed by id.
#[derive(Debug, Clone, Default)]
pub struct Desired {
    /// Resources by id.
    pub resources: BTreeMap<ResourceId, Resource>,
}

impl Desired {
    /// A content hash of the whole set (each id with its spec hash, in id order): equal for
    /// equal manifests, whatever files they came from.
    pub fn content_hash(&self) -> String {
        let entries: Vec<String> = self
            .resources
            .iter()
            .map(|(id, r)| format!("{id}={};", r.spec_hash()))
            .collect();
        fnv1a_hex(entries.iter().map(String::as_bytes))
    }

    /// Looks a resource up.
    pub fn get(&self, id: &ResourceId) -> Option<&Resource> {
        self.resources.get(id)
    }

    /// The spec of the Volume `name`, when it is defined.
    pub fn volume(&self, name: &str) -> Option<&VolumeSpec> {
        match &self.get(&ResourceId::new(Kind::Volume, name))?.spec {
            Spec::Volume(v) => Some(v),
            _ => None,
        }
    }

    /// The spec of the StoragePool `name`, when it is defined.
    pub fn storage_pool(&self, name: &str) -> Option<&StoragePoolSpec> {
        match &self.get(&ResourceId::new(Kind::StoragePool, name))?.spec {
            Spec::StoragePool(p) => Some(p),
            _ => None,
        }
    }

    /// Number of resources.
    pub fn len(&self) -> usize {
        self.resources.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.resources.is_empty()
    }
}

#[cfg(test)]
mod tests {

    fn desired(yaml: &str) -> Desired {
        let mut out = Vec::new();
        let mut errors = Vec::new();
        crate::load::load_str(std::path::Path::new("t.yaml"), yaml, &mut out, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        Desired {
            resources: out.into_iter().map(|r| (r.id.clone(), r)).collect(),
        }
    }

    const NET: &str = "apiVersion: stead.dev/v1alpha1\nkind: Network\nmetadata: {name: lan0}\nspec: {addresses: [10.10.0.1/24]}\n";

    #[test]
    fn the_content_hash_follows_the_content() {
        let a = desired(NET).content_hash();
        assert_eq!(a, desired(NET).content_hash(), "stable");
        assert_eq!(a.len(), 16);
        assert_ne!(
            a,
            desired(&NET.replace("10.10.0.1", "10.10.0.2")).content_hash()
        );
        assert_ne!(a, desired(&NET.replace("lan0", "lan1")).content_hash());
    }
    use super::*;

    #[test]
    fn ids_parse_loosely_from_the_command_line() {
        assert_eq!(
            ResourceId::parse_loose("vm/web").expect("vm"),
            ResourceId::new(Kind::VirtualMachine, "web")
        );
        assert_eq!(
            ResourceId::parse_loose("Volume/data").expect("volume"),
            ResourceId::new(Kind::Volume, "data")
        );
        assert!(ResourceId::parse_loose("web").is_err());
        assert!(ResourceId::parse_loose("gadget/web").is_err());
        assert!(ResourceId::parse_loose("vm/Not_A_Name").is_err());
    }
}
