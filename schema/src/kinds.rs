//! The spec of every kind in SPEC.md §1, as serde + schemars types.
//!
//! All structs refuse unknown fields. Defaults are written out here, so the plan
//! and the JSON Schema agree on them.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::values::*;

fn is_false(b: &bool) -> bool {
    !*b
}
fn default_true() -> bool {
    true
}
fn is_true(b: &bool) -> bool {
    *b
}

// ------------------------------------------------------------------ Network

/// `Network.spec.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NetworkType {
    /// A Linux bridge.
    #[default]
    Bridge,
    /// A bridge plus a VXLAN port that stead owns.
    Vxlan,
}

/// `Network.spec`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkSpec {
    /// bridge | vxlan.
    #[serde(rename = "type", default)]
    pub net_type: NetworkType,
    /// MTU of the bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Host addresses on the bridge.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<Cidr>,
    /// Host interfaces (or Bond names) enslaved to the bridge.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<IfName>,
    /// Bridge VLAN filtering.
    #[serde(default, skip_serializing_if = "is_false")]
    pub vlan_aware: bool,
    /// Masquerade of the bridge's subnets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<NatSpec>,
    /// DNAT port forwards from the host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forwards: Vec<ForwardSpec>,
    /// VXLAN settings (type vxlan only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vxlan: Option<VxlanSpec>,
    /// Explicit dependencies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<ResourceRef>,
}

/// `Network.spec.nat`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NatSpec {
    /// Whether masquerading is on.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Egress interface; absent means any interface but the bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<IfName>,
}

/// Transport protocol of a port forward.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

/// A DNAT forward `hostPort -> to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ForwardSpec {
    /// tcp | udp.
    #[serde(default)]
    pub protocol: Protocol,
    /// Port on the host.
    pub host_port: u16,
    /// Destination `ip:port` behind the bridge.
    #[schemars(with = "String")]
    pub to: SocketAddr,
}

/// `Network.spec.vxlan`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VxlanSpec {
    /// VXLAN network identifier (24 bits).
    pub vni: u32,
    /// Local underlay address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<IpAddr>,
    /// Remote VTEPs (unicast flooding list).
    #[serde(default)]
    pub remotes: Vec<IpAddr>,
    /// UDP port (default 4789).
    #[serde(default = "default_vxlan_port")]
    pub port: u16,
}

fn default_vxlan_port() -> u16 {
    4789
}

// ------------------------------------------------------------------ Bond

/// Linux bonding modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum BondMode {
    /// Round robin.
    #[serde(rename = "balance-rr")]
    BalanceRr,
    /// One active slave.
    #[serde(rename = "active-backup")]
    ActiveBackup,
    /// XOR hash.
    #[serde(rename = "balance-xor")]
    BalanceXor,
    /// Everything on every slave.
    #[serde(rename = "broadcast")]
    Broadcast,
    /// LACP.
    #[serde(rename = "802.3ad")]
    Lacp,
    /// Adaptive transmit load balancing.
    #[serde(rename = "balance-tlb")]
    BalanceTlb,
    /// Adaptive load balancing.
    #[serde(rename = "balance-alb")]
    BalanceAlb,
}

/// `Bond.spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BondSpec {
    /// Bonding mode.
    pub mode: BondMode,
    /// Slave interfaces.
    pub slaves: Vec<IfName>,
    /// MII link monitoring interval in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub miimon: Option<u32>,
    /// MTU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Explicit dependencies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<ResourceRef>,
}

// ------------------------------------------------------------------ StoragePool

/// `StoragePool.spec.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PoolType {
    /// A directory.
    Dir,
    /// A btrfs file system (volumes are subvolumes).
    Btrfs,
    /// LVM thin pool.
    Lvmthin,
    /// ZFS dataset.
    Zfs,
    /// NFS export mounted at path.
    Nfs,
}

impl PoolType {
    /// The manifest spelling (`dir`, `btrfs`, `lvmthin`, `zfs`, `nfs`).
    pub fn as_str(self) -> &'static str {
        match self {
            PoolType::Dir => "dir",
            PoolType::Btrfs => "btrfs",
            PoolType::Lvmthin => "lvmthin",
            PoolType::Zfs => "zfs",
            PoolType::Nfs => "nfs",
        }
    }
}

/// What a pool may hold (as in Proxmox).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
#[schemars(transform = accept_vztmpl)]
pub enum Content {
    /// VM disk images and volumes.
    Images,
    /// Container root file systems.
    Rootdir,
    /// Backup archives.
    Backup,
    /// ISO images.
    Iso,
    /// Container templates. Proxmox's name for it, `vztmpl`, is accepted as well.
    #[serde(alias = "vztmpl")]
    Templates,
}

/// `StoragePool.spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StoragePoolSpec {
    /// Pool type.
    #[serde(rename = "type")]
    pub pool_type: PoolType,
    /// Absolute path of the pool (mount point for nfs/btrfs).
    pub path: PathBuf,
    /// Allowed content (default: images, rootdir).
    #[serde(default = "default_content")]
    pub content: Vec<Content>,
    /// NFS export (type nfs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nfs: Option<NfsSpec>,
    /// LVM thin pool (type lvmthin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lvm: Option<LvmSpec>,
    /// ZFS dataset (type zfs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zfs: Option<ZfsSpec>,
    /// Cluster: the same storage is reachable from every node (NFS, a cluster file
    /// system), so a workload whose volumes live here can fail over to any node without
    /// replication. Type nfs is always shared. A single host ignores it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub shared: bool,
    /// Explicit dependencies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<ResourceRef>,
}

/// Adds Proxmox's `vztmpl`, the serde alias of `templates`, to the schema's choices, so
/// editors accept what `stead validate` accepts.
fn accept_vztmpl(schema: &mut schemars::Schema) {
    if let Some(serde_json::Value::Array(choices)) = schema.get_mut("oneOf") {
        choices.push(serde_json::json!({
            "type": "string",
            "const": "vztmpl",
            "description": "Proxmox's name for `templates`.",
        }));
    }
}

fn default_content() -> Vec<Content> {
    vec![Content::Images, Content::Rootdir]
}

/// NFS source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NfsSpec {
    /// Server host name or address.
    pub server: String,
    /// Exported path.
    pub export: String,
    /// Mount options.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<String>,
}

/// LVM thin source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LvmSpec {
    /// Volume group.
    pub volume_group: String,
    /// Thin pool LV.
    pub thin_pool: String,
}

/// ZFS source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ZfsSpec {
    /// Parent dataset, e.g. `rpool/data`.
    pub dataset: String,
}

// ------------------------------------------------------------------ Volume

/// Volume image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum VolumeFormat {
    /// A raw sparse file.
    #[default]
    Raw,
    /// qcow2 (QEMU's copy-on-write format; needed for linked clones on dir pools and for
    /// incremental backups through persistent dirty bitmaps).
    Qcow2,
}

/// What happens to a volume's data when it leaves the manifests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum DeletionPolicy {
    /// Keep the data (default).
    #[default]
    Retain,
    /// Delete the data.
    Delete,
}

/// `Volume.spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VolumeSpec {
    /// Pool name.
    pub pool: Name,
    /// Size; growing is an in-place update, shrinking is refused.
    pub size: ByteSize,
    /// Image format.
    #[serde(default)]
    pub format: VolumeFormat,
    /// Initial content, copied once at creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<VolumeSource>,
    /// A template: read-only once created; the base of clones. A template with clones
    /// cannot be deleted.
    #[serde(default, skip_serializing_if = "is_false")]
    pub template: bool,
    /// Create this volume as a clone of another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone: Option<VolumeClone>,
    /// Retain (default) or Delete.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// Cluster: periodic incremental copies of this volume to another node (btrfs or zfs
    /// pools), so its workload can fail over there. A single host ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<ReplicationSpec>,
    /// Explicit dependencies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<ResourceRef>,
}

/// `Volume.spec.replication`: incremental send/receive to a peer node (like Proxmox's
/// storage replication).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ReplicationSpec {
    /// The node that receives the copies.
    pub to: NodeName,
    /// Interval between two copies (`5m`); the data-loss window of a failover.
    pub every: DurationSpec,
}

/// Initial content of a volume: exactly one of `file` or `url`. Either is an image (raw,
/// qcow2, …) that is converted to the volume's format once, at creation.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VolumeSource {
    /// A local image file (absolute path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// An http(s) URL of an image. Requires `sha256`: it is never fetched without a digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^https?://[^/\s]"))]
    pub url: Option<String>,
    /// Expected SHA-256 of the image (64 lowercase hex digits). Required with `url`,
    /// optional with `file` (then checked too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[0-9a-f]{64}$"))]
    pub sha256: Option<String>,
}

/// A volume made as a clone of another volume (usually a template).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VolumeClone {
    /// The volume cloned from (same pool).
    pub from: Name,
    /// Linked clone (default true): a qcow2 backing file, or a btrfs reflink, sharing the
    /// source's blocks. `false` copies every block.
    #[serde(default = "default_true")]
    pub linked: bool,
}

// ------------------------------------------------------------------ workloads

/// Desired run state of a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Running.
    #[default]
    Running,
    /// Stopped.
    Stopped,
}

/// Restart policy of a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Always restart.
    #[default]
    Always,
    /// Restart after a non-zero exit or a signal.
    OnFailure,
    /// Never restart.
    Never,
}

/// `Container.spec.rootfs`: exactly one of template, path, volume.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RootfsSpec {
    /// A .tar or .tar.zst unpacked once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<PathBuf>,
    /// An existing directory used in place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// A Volume holding the root file system.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<Name>,
    /// Pool where a template is unpacked (default: the run's state dir).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<Name>,
}

/// Resource limits.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ResourceLimits {
    /// CPU quota in cores (1.5 = 150 % of one core).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Memory limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteSize>,
    /// Maximum number of processes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
}

/// A container network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ContainerInterface {
    /// Name inside the container.
    pub name: IfName,
    /// Network (bridge) to plug into.
    pub network: Name,
    /// Address inside the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Cidr>,
    /// Default gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// VLAN tag (vlanAware networks only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
}

/// A volume mounted into a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MountSpec {
    /// Volume name.
    pub volume: Name,
    /// Mount point inside the container.
    pub path: PathBuf,
    /// Read-only mount.
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
}

/// `Container.spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ContainerSpec {
    /// Root file system.
    pub rootfs: RootfsSpec,
    /// Host name (default: metadata.name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Init command (default /sbin/init).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// User namespace with an id map (default true).
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub unprivileged: bool,
    /// Limits.
    #[serde(default)]
    pub resources: ResourceLimits,
    /// Network interfaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<ContainerInterface>,
    /// Volume mounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<MountSpec>,
    /// running | stopped.
    #[serde(default)]
    pub state: RunState,
    /// always | on-failure | never.
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// Time between the stop signal and SIGKILL when the container is stopped, restarted
    /// or deleted (whole seconds, at most 1h; default 10s). An init without a handler
    /// for the stop signal is killed at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_timeout: Option<DurationSpec>,
    /// What deleting the container does to the root file system stead unpacked from its
    /// template: unset, it is deleted once `--allow-data-loss` confirms; `Delete` deletes it
    /// without asking; `Retain` keeps it on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_policy: Option<DeletionPolicy>,
    /// Cluster: where it may run. A single host ignores it.
    #[serde(default, skip_serializing_if = "Placement::is_empty")]
    pub placement: Placement,
    /// Explicit dependencies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<ResourceRef>,
}

/// Default `stopTimeout` of a Container or VirtualMachine.
pub const DEFAULT_STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Longest `stopTimeout` accepted.
pub const MAX_STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

impl ContainerSpec {
    /// The stop timeout in seconds (`stopTimeout`, default 10).
    pub fn stop_timeout_secs(&self) -> u64 {
        self.stop_timeout
            .map_or(DEFAULT_STOP_TIMEOUT, |d| d.0)
            .as_secs()
    }
}

/// Which engine runs a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum VmEngine {
    /// stead's own KVM VMM: direct kernel boot, microVM devices.
    Vmm,
    /// QEMU (`qemu-system-x86_64`): firmware, disk images, cloud-init, guest agent.
    Qemu,
}

/// Accelerator for the QEMU engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum VmAccel {
    /// KVM when the host can run a full guest under it (hardware virtualization), else
    /// TCG with a warning.
    #[default]
    Auto,
    /// KVM; refused when the host cannot run a full guest under KVM.
    Kvm,
    /// QEMU's software emulation.
    Tcg,
}

/// Firmware of a QEMU VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// SeaBIOS.
    #[default]
    Bios,
    /// OVMF (UEFI), with a per-VM NVRAM vars file that persists and is backed up.
    Uefi,
}

/// Bus a QEMU disk is attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DiskBus {
    /// virtio-blk (vda, vdb, …).
    #[default]
    Virtio,
    /// virtio-scsi (sda, …).
    Scsi,
    /// AHCI SATA.
    Sata,
}

/// Host cache mode of a QEMU disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DiskCache {
    /// O_DIRECT, no host page cache (default).
    #[default]
    None,
    /// Host page cache, guest flushes honoured.
    Writeback,
    /// Host page cache, every write synchronous.
    Writethrough,
    /// O_DIRECT and every write synchronous.
    Directsync,
    /// Host page cache, guest flushes ignored (test rigs only).
    Unsafe,
}

/// VM boot settings (direct kernel boot).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BootSpec {
    /// Kernel image (bzImage or ELF vmlinux).
    pub kernel: PathBuf,
    /// Initial ramdisk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

/// A VM disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DiskSpec {
    /// Volume name.
    pub volume: Name,
    /// Attach read-only.
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
    /// Bus (QEMU engine): virtio (default) | scsi | sata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus: Option<DiskBus>,
    /// Host cache mode (QEMU engine); default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<DiskCache>,
    /// Pass the guest's discard (TRIM) requests down (QEMU engine).
    #[serde(default, skip_serializing_if = "is_false")]
    pub discard: bool,
    /// Boot index (QEMU engine): lower boots first, across disks, cdroms and interfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<u32>,
}

/// A VM cdrom drive (QEMU engine) holding an ISO volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CdromSpec {
    /// Volume holding the ISO image.
    pub volume: Name,
    /// Boot index (see [`DiskSpec::boot`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<u32>,
}

/// A cloud-init user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CloudInitUser {
    /// Login name (`[a-z_][a-z0-9_-]*`, at most 32 characters).
    #[schemars(pattern(r"^[a-z_][a-z0-9_-]{0,31}$"))]
    pub name: String,
    /// SSH public keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
    /// crypt(3) password hash (e.g. `$6$…` from `mkpasswd -m sha-512`); never a plain
    /// password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^\$[A-Za-z0-9]+\$"))]
    pub password_hash: Option<String>,
    /// Passwordless sudo.
    #[serde(default, skip_serializing_if = "is_false")]
    pub sudo: bool,
    /// Supplementary groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Login shell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
}

/// cloud-init NoCloud settings: stead generates the seed (`cidata`) from these.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CloudInitSpec {
    /// Guest host name (default: metadata.name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Users to create.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<CloudInitUser>,
    /// Network config, version 2 (netplan syntax) or 1, passed through as `network-config`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "network_config_schema")]
    pub network: Option<serde_json::Value>,
    /// Raw user-data (`#cloud-config` …), merged after the fields above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// Raw vendor-data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor_data: Option<String>,
}

/// The JSON Schema of a cloud-init network config: a mapping with `version: 1 | 2`.
fn network_config_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "required": ["version"],
        "properties": {"version": {"enum": [1, 2]}}
    })
}

/// A VM network interface (virtio-net on a tap).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VmInterface {
    /// Network (bridge) to plug into.
    pub network: Name,
    /// MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// VLAN tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
    /// Boot index for network boot (QEMU engine; see [`DiskSpec::boot`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<u32>,
}

/// `VirtualMachine.spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VirtualMachineSpec {
    /// vCPU count (default 1).
    #[serde(default = "default_vm_cpus")]
    pub cpus: u32,
    /// Guest memory (default 512Mi).
    #[serde(default = "default_vm_memory")]
    pub memory: ByteSize,
    /// vmm | qemu. Default: vmm when `boot.kernel` is set, else qemu
    /// ([`VirtualMachineSpec::engine`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<VmEngine>,
    /// auto | kvm | tcg (QEMU engine).
    #[serde(default)]
    pub accel: VmAccel,
    /// Direct kernel boot: the vmm engine's (required there). The qemu engine boots
    /// from firmware (its disks, cdroms or network) and refuses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootSpec>,
    /// bios | uefi (QEMU engine).
    #[serde(default)]
    pub firmware: Firmware,
    /// UEFI secure boot (OVMF with Microsoft keys enrolled).
    #[serde(default, skip_serializing_if = "is_false")]
    pub secure_boot: bool,
    /// Disks, in order vda, vdb, …
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskSpec>,
    /// Cdrom drives (QEMU engine).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cdroms: Vec<CdromSpec>,
    /// cloud-init NoCloud seed generated from the manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInitSpec>,
    /// QEMU guest agent channel (QEMU engine).
    #[serde(default, skip_serializing_if = "is_false")]
    pub agent: bool,
    /// Network interfaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<VmInterface>,
    /// running | stopped.
    #[serde(default)]
    pub state: RunState,
    /// always | on-failure | never.
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// Time the guest gets to shut down (ACPI power button, or Ctrl-Alt-Del on the vmm
    /// engine) when the VM is stopped, restarted or deleted, before it is forced off
    /// (whole seconds, at most 1h; default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_timeout: Option<DurationSpec>,
    /// Cluster: where it may run. A single host ignores it.
    #[serde(default, skip_serializing_if = "Placement::is_empty")]
    pub placement: Placement,
    /// Explicit dependencies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<ResourceRef>,
}

impl VirtualMachineSpec {
    /// The shutdown timeout in seconds (`stopTimeout`, default 10).
    pub fn stop_timeout_secs(&self) -> u64 {
        self.stop_timeout_secs_or(DEFAULT_STOP_TIMEOUT.as_secs())
    }

    /// The shutdown timeout in seconds: `stopTimeout`, else `default`.
    pub fn stop_timeout_secs_or(&self, default: u64) -> u64 {
        self.stop_timeout.map_or(default, |d| d.0.as_secs())
    }

    /// The engine that runs this VM: `engine` when set, else vmm with a direct kernel boot
    /// and qemu without one.
    pub fn engine(&self) -> VmEngine {
        match (self.engine, &self.boot) {
            (Some(e), _) => e,
            (None, Some(_)) => VmEngine::Vmm,
            (None, None) => VmEngine::Qemu,
        }
    }
}

fn default_vm_cpus() -> u32 {
    1
}

fn default_vm_memory() -> ByteSize {
    ByteSize(512 << 20)
}

// ------------------------------------------------------------------ cluster placement

/// `spec.placement` of a Container or VirtualMachine: the rules the cluster's controller
/// places it by. Required rules (`node`, `nodeSelector`, `affinity`, `antiAffinity`, an
/// HA group's `restricted`) exclude nodes; preferred ones rank the nodes left. A single
/// host ignores the whole block. Its references are checked but are not dependency edges.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Placement {
    /// Pin to this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeName>,
    /// Only nodes carrying all these labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Only on the node where each of these workloads (`Kind/name`) runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub affinity: Vec<ResourceRef>,
    /// Never on a node where one of these workloads runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anti_affinity: Vec<ResourceRef>,
    /// Rather on the node where these workloads run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preferred_affinity: Vec<ResourceRef>,
    /// Rather not on a node where these workloads run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preferred_anti_affinity: Vec<ResourceRef>,
    /// Highly available through this HaGroup (its node priorities, `restricted`,
    /// `noFailback`): moved to another node when its node dies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ha_group: Option<Name>,
    /// Highly available without a group: moved to any eligible node when its node dies.
    /// Implied by `haGroup`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub ha: bool,
}

impl Placement {
    /// Whether no rule is set (the serialized form leaves it out).
    pub fn is_empty(&self) -> bool {
        self == &Placement::default()
    }

    /// Whether the workload fails over when its node dies: `ha`, or an HA group.
    pub fn is_ha(&self) -> bool {
        self.ha || self.ha_group.is_some()
    }
}

/// `HaGroup.spec`: the nodes an HA workload prefers, like a Proxmox VE HA group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HaGroupSpec {
    /// Member nodes and their priorities (`{pve1: 2, pve2: 1}`): alive members of the
    /// highest priority run the group's workloads first.
    pub nodes: BTreeMap<NodeName, u32>,
    /// Only the member nodes may run the group's workloads; when none is alive, they stay
    /// stopped. Unrestricted groups fall back to any node.
    #[serde(default, skip_serializing_if = "is_false")]
    pub restricted: bool,
    /// A workload stays where it runs when a higher-priority member comes back (no move
    /// back). Proxmox spells it `nofailback`, which is accepted too.
    #[serde(default, skip_serializing_if = "is_false", alias = "nofailback")]
    pub no_failback: bool,
}

// ------------------------------------------------------------------ BackupSchedule

/// Label selector.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Selector {
    /// All of these labels must match.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// What a schedule backs up.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackupTargets {
    /// Workloads whose labels match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    /// Explicit `Kind/name` targets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<ResourceRef>,
}

/// Backup mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackupMode {
    /// Consistent without downtime.
    #[default]
    Snapshot,
    /// Stop, back up, start.
    Stop,
}

/// Archive compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// zstd (multi-threaded).
    #[default]
    Zstd,
    /// None.
    None,
}

/// Proxmox-style prune settings. Absent or zero means the rule is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Retention {
    /// Keep the last N.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    /// Keep one per hour for N hours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_hourly: Option<u32>,
    /// Keep one per day for N days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_daily: Option<u32>,
    /// Keep one per ISO week for N weeks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_weekly: Option<u32>,
    /// Keep one per month for N months.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_monthly: Option<u32>,
    /// Keep one per year for N years.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_yearly: Option<u32>,
}

/// `BackupSchedule.spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackupScheduleSpec {
    /// When to run.
    pub schedule: CronSpec,
    /// Time zone of the schedule and of retention periods (default: host local).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<TimeZone>,
    /// What to back up.
    pub targets: BackupTargets,
    /// A StoragePool with content backup.
    pub storage: Name,
    /// snapshot | stop.
    #[serde(default)]
    pub mode: BackupMode,
    /// zstd | none.
    #[serde(default)]
    pub compression: Compression,
    /// Prune rules.
    #[serde(default)]
    pub retention: Retention,
    /// Explicit dependencies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<ResourceRef>,
}
