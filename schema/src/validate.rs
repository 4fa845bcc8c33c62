//! Semantic validation of a loaded manifest set: every rule reports every violation,
//! each at the line of the offending node.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Component, Path};

use crate::graph::{DepGraph, edges};
use crate::kinds::*;
use crate::load::Diagnostic;
use crate::resource::{Desired, Kind, Resource, ResourceId, Spec};
use crate::values::Cidr;

mod placement;
mod vm;
mod volume;

fn at(r: &Resource, ptr: &str, message: impl Into<String>, hint: Option<&str>) -> Diagnostic {
    Diagnostic {
        file: r.origin.file.clone(),
        pos: r.origin.pos_of(ptr),
        field: format!("{} {}", r.id, crate::load::pointer_to_field(ptr)),
        message: message.into(),
        hint: hint.map(str::to_string),
    }
}

/// The spec of the Volume `name`, when it is defined.
fn volume_spec<'d>(desired: &'d Desired, name: &str) -> Option<&'d VolumeSpec> {
    match &desired.get(&ResourceId::new(Kind::Volume, name))?.spec {
        Spec::Volume(v) => Some(v),
        _ => None,
    }
}

/// The spec of the StoragePool `name`, when it is defined.
fn pool_spec<'d>(desired: &'d Desired, name: &str) -> Option<&'d StoragePoolSpec> {
    match &desired.get(&ResourceId::new(Kind::StoragePool, name))?.spec {
        Spec::StoragePool(p) => Some(p),
        _ => None,
    }
}

/// Runs every semantic rule over `desired`.
pub fn validate(desired: &Desired) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for r in desired.resources.values() {
        check_resource(r, desired, &mut out);
    }
    check_references_and_cycles(desired, &mut out);
    check_conflicts(desired, &mut out);
    out.sort_by(|a, b| (&a.file, a.pos).cmp(&(&b.file, b.pos)));
    out
}

fn check_abs_path(r: &Resource, ptr: &str, p: &Path, what: &str, out: &mut Vec<Diagnostic>) {
    if !p.is_absolute() {
        out.push(at(
            r,
            ptr,
            format!("{what} {} must be an absolute path", p.display()),
            None,
        ));
    } else if p.components().any(|c| matches!(c, Component::ParentDir)) {
        out.push(at(
            r,
            ptr,
            format!("{what} {} must not contain `..`", p.display()),
            None,
        ));
    }
}

/// Runs the rules of `r`'s kind.
fn check_resource(r: &Resource, desired: &Desired, out: &mut Vec<Diagnostic>) {
    match &r.spec {
        Spec::Network(n) => check_network(r, n, out),
        Spec::Bond(b) => check_bond(r, b, out),
        Spec::StoragePool(p) => check_pool(r, p, out),
        Spec::Volume(v) => volume::check_volume(r, v, desired, out),
        Spec::Container(c) => check_container(r, c, desired, out),
        Spec::VirtualMachine(vm) => vm::check_vm(r, vm, desired, out),
        Spec::BackupSchedule(b) => check_backup_schedule(r, b, desired, out),
        Spec::HaGroup(g) => placement::check_ha_group(r, g, out),
    }
    placement::check_placement(r, desired, out);
    if let Spec::Volume(v) = &r.spec {
        placement::check_replication(r, v, desired, out);
    }
}

/// A Network: interface name, MTU, VXLAN, NAT, forwards and ports.
fn check_network(r: &Resource, n: &NetworkSpec, out: &mut Vec<Diagnostic>) {
    check_network_link(r, n, out);
    check_network_ports(r, n, out);
}

/// The bridge itself: name, MTU, VXLAN block, NAT.
fn check_network_link(r: &Resource, n: &NetworkSpec, out: &mut Vec<Diagnostic>) {
    if r.id.name.len() > 15 {
        out.push(at(
            r,
            "/metadata/name",
            format!("network name {:?} is {} bytes; it is also the bridge's interface name, at most 15 bytes", r.id.name, r.id.name.len()),
            Some("use a shorter name, e.g. lan0"),
        ));
    }
    if let Some(mtu) = n.mtu
        && !(68..=65535).contains(&mtu)
    {
        out.push(at(
            r,
            "/spec/mtu",
            format!("mtu {mtu} is out of range 68..65535"),
            None,
        ));
    }
    match (n.net_type, &n.vxlan) {
        (NetworkType::Vxlan, None) => out.push(at(
            r,
            "/spec/type",
            "type vxlan needs a `vxlan` block",
            Some("add vxlan: {vni: 100, remotes: [...]}"),
        )),
        (NetworkType::Bridge, Some(_)) => out.push(at(
            r,
            "/spec/vxlan",
            "`vxlan` is only valid with type: vxlan",
            Some("set type: vxlan or remove the vxlan block"),
        )),
        (_, Some(v)) if v.vni == 0 || v.vni >= (1 << 24) => out.push(at(
            r,
            "/spec/vxlan/vni",
            format!("vni {} must be in 1..16777215", v.vni),
            None,
        )),
        _ => {}
    }
    if let Some(nat) = &n.nat
        && nat.enabled
        && n.addresses.is_empty()
    {
        out.push(at(
            r,
            "/spec/nat",
            "NAT needs at least one host address on the bridge (its subnet is masqueraded)",
            Some("add addresses: [10.10.0.1/24]"),
        ));
    }
}

/// Port forwards (each host port once, into a subnet of the network) and member ports.
fn check_network_ports(r: &Resource, n: &NetworkSpec, out: &mut Vec<Diagnostic>) {
    let mut seen_ports = BTreeSet::new();
    for (i, f) in n.forwards.iter().enumerate() {
        if !seen_ports.insert((f.protocol, f.host_port)) {
            out.push(at(
                r,
                &format!("/spec/forwards/{i}/hostPort"),
                format!("host port {} is forwarded twice", f.host_port),
                None,
            ));
        }
        if !n.addresses.iter().any(|a| a.contains(f.to.ip())) {
            out.push(at(
                r,
                &format!("/spec/forwards/{i}/to"),
                format!(
                    "forward target {} is not inside any subnet of this network",
                    f.to
                ),
                None,
            ));
        }
    }
    let mut seen = BTreeSet::new();
    for (i, p) in n.ports.iter().enumerate() {
        if !seen.insert(p) {
            out.push(at(
                r,
                &format!("/spec/ports/{i}"),
                format!("port {p} is listed twice"),
                None,
            ));
        }
    }
}

/// A Bond: interface name and slaves.
fn check_bond(r: &Resource, b: &BondSpec, out: &mut Vec<Diagnostic>) {
    if r.id.name.len() > 15 {
        out.push(at(
            r,
            "/metadata/name",
            "bond name is the interface name: at most 15 bytes",
            None,
        ));
    }
    if b.slaves.is_empty() {
        out.push(at(
            r,
            "/spec/slaves",
            "a bond needs at least one slave",
            None,
        ));
    }
}

/// A StoragePool: its path, the block its type needs, tool names.
fn check_pool(r: &Resource, p: &StoragePoolSpec, out: &mut Vec<Diagnostic>) {
    check_abs_path(r, "/spec/path", &p.path, "pool path", out);
    if p.path == Path::new("/") {
        out.push(at(
            r,
            "/spec/path",
            "the root directory cannot be a pool",
            None,
        ));
    }
    let need = |ok: bool, ptr: &str, msg: &str| {
        if ok {
            None
        } else {
            Some(at(r, ptr, msg, None))
        }
    };
    out.extend(match p.pool_type {
        PoolType::Nfs => need(
            p.nfs.is_some(),
            "/spec/type",
            "type nfs needs an `nfs` block {server, export}",
        ),
        PoolType::Lvmthin => need(
            p.lvm.is_some(),
            "/spec/type",
            "type lvmthin needs an `lvm` block {volumeGroup, thinPool}",
        ),
        PoolType::Zfs => need(
            p.zfs.is_some(),
            "/spec/type",
            "type zfs needs a `zfs` block {dataset}",
        ),
        _ => None,
    });
    check_pool_tool_names(r, p, out);
    placement::check_pool_shared(r, p, out);
}

/// A Container: rootfs, hostname, command, limits, interfaces, mounts.
fn check_container(r: &Resource, c: &ContainerSpec, desired: &Desired, out: &mut Vec<Diagnostic>) {
    check_container_rootfs(r, c, out);
    check_container_process(r, c, out);
    check_container_interfaces(r, c, desired, out);
    check_container_mounts(r, c, out);
}

/// Exactly one rootfs source, its paths absolute.
fn check_container_rootfs(r: &Resource, c: &ContainerSpec, out: &mut Vec<Diagnostic>) {
    let set = [
        c.rootfs.template.is_some(),
        c.rootfs.path.is_some(),
        c.rootfs.volume.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if set != 1 {
        out.push(at(
            r,
            "/spec/rootfs",
            format!("rootfs needs exactly one of template, path, volume ({set} given)"),
            None,
        ));
    }
    if let Some(t) = &c.rootfs.template {
        check_abs_path(r, "/spec/rootfs/template", t, "template", out);
    }
    if let Some(p) = &c.rootfs.path {
        check_abs_path(r, "/spec/rootfs/path", p, "rootfs path", out);
    }
}

/// Hostname, command and resource limits.
fn check_container_process(r: &Resource, c: &ContainerSpec, out: &mut Vec<Diagnostic>) {
    if let Some(h) = &c.hostname
        && (h.is_empty()
            || h.len() > 64
            || !h
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '.'))
    {
        out.push(at(
            r,
            "/spec/hostname",
            format!("invalid hostname {h:?}"),
            None,
        ));
    }
    if c.command.as_ref().is_some_and(|v| v.is_empty()) {
        out.push(at(r, "/spec/command", "command must not be empty", None));
    }
    check_stop_timeout(r, c.stop_timeout, out);
    if let Some(cpus) = c.resources.cpus
        && !(cpus > 0.0 && cpus <= 1024.0)
    {
        out.push(at(
            r,
            "/spec/resources/cpus",
            format!("cpus {cpus} must be > 0"),
            None,
        ));
    }
    if c.resources.memory.is_some_and(|m| m.0 < (4 << 20)) {
        out.push(at(
            r,
            "/spec/resources/memory",
            "memory limit below 4Mi cannot run a container",
            None,
        ));
    }
}

/// Interface names unique, VLANs, gateways and addresses inside their networks.
fn check_container_interfaces(
    r: &Resource,
    c: &ContainerSpec,
    desired: &Desired,
    out: &mut Vec<Diagnostic>,
) {
    let mut names = BTreeSet::new();
    for (i, ifc) in c.interfaces.iter().enumerate() {
        if !names.insert(&ifc.name) {
            out.push(at(
                r,
                &format!("/spec/interfaces/{i}/name"),
                format!("interface name {} used twice", ifc.name),
                None,
            ));
        }
        check_vlan(
            r,
            desired,
            &format!("/spec/interfaces/{i}"),
            ifc.network.as_str(),
            ifc.vlan,
            out,
        );
        if let (Some(addr), Some(gw)) = (&ifc.address, &ifc.gateway)
            && !addr.contains(*gw)
        {
            out.push(at(
                r,
                &format!("/spec/interfaces/{i}/gateway"),
                format!("gateway {gw} is not in {addr}"),
                None,
            ));
        }
        if let Some(addr) = &ifc.address {
            check_in_network(
                r,
                desired,
                &format!("/spec/interfaces/{i}/address"),
                ifc.network.as_str(),
                addr,
                out,
            );
        }
    }
}

/// `stopTimeout` (Container, VirtualMachine): whole seconds, at most an hour.
fn check_stop_timeout(
    r: &Resource,
    t: Option<crate::values::DurationSpec>,
    out: &mut Vec<Diagnostic>,
) {
    if let Some(t) = t
        && (t.0 > crate::kinds::MAX_STOP_TIMEOUT || t.0.subsec_nanos() != 0)
    {
        out.push(at(
            r,
            "/spec/stopTimeout",
            format!("stopTimeout {t} must be whole seconds between 0s and 1h"),
            None,
        ));
    }
}

/// Mount paths absolute and mounted once.
fn check_container_mounts(r: &Resource, c: &ContainerSpec, out: &mut Vec<Diagnostic>) {
    let mut paths = BTreeSet::new();
    for (i, m) in c.mounts.iter().enumerate() {
        check_abs_path(
            r,
            &format!("/spec/mounts/{i}/path"),
            &m.path,
            "mount path",
            out,
        );
        if !paths.insert(&m.path) {
            out.push(at(
                r,
                &format!("/spec/mounts/{i}/path"),
                format!("{} is mounted twice", m.path.display()),
                None,
            ));
        }
    }
}

/// A BackupSchedule: targets and a pool that takes backups.
fn check_backup_schedule(
    r: &Resource,
    b: &BackupScheduleSpec,
    desired: &Desired,
    out: &mut Vec<Diagnostic>,
) {
    if b.targets.selector.is_none() && b.targets.names.is_empty() {
        out.push(at(
            r,
            "/spec/targets",
            "targets needs a selector or names",
            None,
        ));
    }
    for (i, t) in b.targets.names.iter().enumerate() {
        if !matches!(
            t.kind,
            Kind::Container | Kind::VirtualMachine | Kind::Volume
        ) {
            out.push(at(
                r,
                &format!("/spec/targets/names/{i}"),
                format!(
                    "{t} cannot be backed up: targets are Containers, VirtualMachines or Volumes"
                ),
                None,
            ));
        }
    }
    if let Some(pool) = desired.get(&ResourceId::new(Kind::StoragePool, b.storage.as_str()))
        && let Spec::StoragePool(p) = &pool.spec
        && !p.content.contains(&Content::Backup)
    {
        out.push(at(
            r,
            "/spec/storage",
            format!("pool {} does not allow backup content", b.storage),
            Some("add backup to the pool's content list"),
        ));
    }
}

/// Names a pool hands to `lvcreate`, `zfs` or `mount` follow those tools' rules.
fn check_pool_tool_names(r: &Resource, p: &StoragePoolSpec, out: &mut Vec<Diagnostic>) {
    use crate::toolnames::*;
    let mut check = |ptr: &str, what: &str, value: &str, rule: fn(&str) -> Result<(), String>| {
        if let Err(why) = rule(value) {
            out.push(at(r, ptr, format!("{what} {value:?}: {why}"), None));
        }
    };
    if let Some(l) = &p.lvm {
        check(
            "/spec/lvm/volumeGroup",
            "volume group",
            &l.volume_group,
            check_lvm_name,
        );
        check(
            "/spec/lvm/thinPool",
            "thin pool",
            &l.thin_pool,
            check_lvm_name,
        );
    }
    if let Some(z) = &p.zfs {
        check(
            "/spec/zfs/dataset",
            "dataset",
            &z.dataset,
            check_zfs_dataset,
        );
    }
    if let Some(n) = &p.nfs {
        check(
            "/spec/nfs/server",
            "NFS server",
            &n.server,
            check_nfs_server,
        );
        check(
            "/spec/nfs/export",
            "NFS export",
            &n.export,
            check_nfs_export,
        );
        if let Some(o) = &n.options {
            check("/spec/nfs/options", "NFS options", o, check_nfs_options);
        }
    }
}

fn check_vlan(
    r: &Resource,
    desired: &Desired,
    ptr: &str,
    network: &str,
    vlan: Option<u16>,
    out: &mut Vec<Diagnostic>,
) {
    let Some(tag) = vlan else { return };
    if !(1..=4094).contains(&tag) {
        out.push(at(
            r,
            &format!("{ptr}/vlan"),
            format!("vlan {tag} must be in 1..4094"),
            None,
        ));
    }
    if let Some(n) = desired.get(&ResourceId::new(Kind::Network, network))
        && let Spec::Network(ns) = &n.spec
        && !ns.vlan_aware
    {
        out.push(at(
            r,
            &format!("{ptr}/vlan"),
            format!("network {network} is not vlanAware"),
            Some("set vlanAware: true on the network"),
        ));
    }
}

fn check_in_network(
    r: &Resource,
    desired: &Desired,
    ptr: &str,
    network: &str,
    addr: &Cidr,
    out: &mut Vec<Diagnostic>,
) {
    if let Some(n) = desired.get(&ResourceId::new(Kind::Network, network))
        && let Spec::Network(ns) = &n.spec
        && !ns.addresses.is_empty()
        && !ns.addresses.iter().any(|a| a.network() == addr.network())
    {
        let subnets: Vec<String> = ns
            .addresses
            .iter()
            .map(|a| a.network().to_string())
            .collect();
        out.push(at(
            r,
            ptr,
            format!(
                "{addr} is not in a subnet of network {network} ({})",
                subnets.join(", ")
            ),
            None,
        ));
    }
}

/// What a reference to an undefined resource means. A clone's source is most often a
/// template that was removed from the manifests while clones still use it.
fn dangling_message(e: &crate::graph::Edge) -> String {
    if e.from.kind == Kind::Volume && e.pointer == "/spec/clone/from" {
        format!(
            "{} is a clone of {}, which is not defined (a template with clones cannot be deleted)",
            e.from, e.to
        )
    } else {
        format!("{} references {} which is not defined", e.from, e.to)
    }
}

fn check_references_and_cycles(desired: &Desired, out: &mut Vec<Diagnostic>) {
    let all = edges(desired.resources.values());
    for e in &all {
        if desired.get(&e.to).is_none() {
            let Some(r) = desired.get(&e.from) else {
                continue;
            };
            let similar = desired
                .resources
                .keys()
                .filter(|k| k.kind == e.to.kind)
                .min_by_key(|k| crate::load::edit_distance(&k.name, &e.to.name))
                .filter(|k| crate::load::edit_distance(&k.name, &e.to.name) <= 2)
                .map(|k| format!("did you mean {k}?"));
            out.push(at(r, &e.pointer, dangling_message(e), similar.as_deref()));
        }
    }
    let graph = DepGraph::new(desired.resources.keys().cloned(), &all);
    for cycle in graph.cycles() {
        let Some(r) = desired.get(&cycle[0]) else {
            continue;
        };
        let path: Vec<String> = cycle.iter().map(|i| i.to_string()).collect();
        out.push(at(
            r,
            "/metadata/name",
            format!("dependency cycle: {}", path.join(" -> ")),
            Some("remove one of the references or dependsOn entries"),
        ));
    }
}

/// First claims of a key (an address on a network, a MAC, a read-write volume): a
/// second claim is refused with the place of the first.
struct Claims<'d, K> {
    desired: &'d Desired,
    first: BTreeMap<K, (ResourceId, String)>,
}

impl<'d, K: Ord> Claims<'d, K> {
    fn new(desired: &'d Desired) -> Self {
        Claims {
            desired,
            first: BTreeMap::new(),
        }
    }

    /// Records `r`'s claim of `key` at `ptr`; when `key` is taken, the first claimant
    /// and its location instead.
    fn claim(&mut self, key: K, r: &Resource, ptr: &str) -> Option<(ResourceId, String)> {
        match self.first.get(&key) {
            Some((first, first_ptr)) => {
                let loc = self
                    .desired
                    .get(first)
                    .map(|f| f.origin.locate(first_ptr))
                    .unwrap_or_default();
                Some((first.clone(), loc))
            }
            None => {
                self.first.insert(key, (r.id.clone(), ptr.to_string()));
                None
            }
        }
    }
}

/// What two resources must not share: an address on one network, a MAC, a volume
/// attached read-write.
struct Conflicts<'d> {
    ips: Claims<'d, (String, IpAddr)>,
    macs: Claims<'d, String>,
    rw: Claims<'d, String>,
}

impl<'d> Conflicts<'d> {
    fn ip(&mut self, net: &str, ip: IpAddr, r: &Resource, ptr: &str, out: &mut Vec<Diagnostic>) {
        if let Some((first, loc)) = self.ips.claim((net.to_string(), ip), r, ptr) {
            let msg = format!("address {ip} on network {net} is already used by {first} ({loc})");
            out.push(at(r, ptr, msg, None));
        }
    }

    fn mac(&mut self, mac: String, r: &Resource, ptr: &str, out: &mut Vec<Diagnostic>) {
        if let Some((first, loc)) = self.macs.claim(mac.clone(), r, ptr) {
            let msg = format!("MAC {mac} is already used by {first} ({loc})");
            out.push(at(r, ptr, msg, None));
        }
    }

    fn read_write(&mut self, vol: &str, r: &Resource, ptr: &str, out: &mut Vec<Diagnostic>) {
        if volume_spec(self.rw.desired, vol).is_some_and(|v| v.template) {
            out.push(at(
                r,
                ptr,
                format!(
                    "volume {vol} is a template: it is attached read-only or cloned, never written"
                ),
                Some(&format!(
                    "attach it with readOnly: true, or attach a Volume with clone: {{from: {vol}}}"
                )),
            ));
            return;
        }
        if let Some((first, loc)) = self.rw.claim(vol.to_string(), r, ptr) {
            let msg =
                format!("volume {vol} is attached read-write twice (also by {first} at {loc})");
            out.push(at(
                r,
                ptr,
                msg,
                Some("attach it readOnly in all but one place"),
            ));
        }
    }
}

fn check_conflicts(desired: &Desired, out: &mut Vec<Diagnostic>) {
    let mut c = Conflicts {
        ips: Claims::new(desired),
        macs: Claims::new(desired),
        rw: Claims::new(desired),
    };
    for r in desired.resources.values() {
        match &r.spec {
            Spec::Network(n) => {
                for (i, a) in n.addresses.iter().enumerate() {
                    c.ip(&r.id.name, a.addr, r, &format!("/spec/addresses/{i}"), out);
                }
            }
            Spec::Container(ct) => claim_container(&mut c, r, ct, out),
            Spec::VirtualMachine(vm) => claim_vm(&mut c, r, vm, out),
            _ => {}
        }
    }
}

/// A container's addresses, MACs and read-write volumes.
fn claim_container(
    c: &mut Conflicts<'_>,
    r: &Resource,
    ct: &ContainerSpec,
    out: &mut Vec<Diagnostic>,
) {
    for (i, ifc) in ct.interfaces.iter().enumerate() {
        if let Some(a) = &ifc.address {
            let ptr = format!("/spec/interfaces/{i}/address");
            c.ip(ifc.network.as_str(), a.addr, r, &ptr, out);
        }
        if let Some(m) = &ifc.mac {
            c.mac(m.to_string(), r, &format!("/spec/interfaces/{i}/mac"), out);
        }
    }
    if let Some(v) = &ct.rootfs.volume {
        c.read_write(v.as_str(), r, "/spec/rootfs/volume", out);
    }
    for (i, m) in ct.mounts.iter().enumerate() {
        if !m.read_only {
            c.read_write(
                m.volume.as_str(),
                r,
                &format!("/spec/mounts/{i}/volume"),
                out,
            );
        }
    }
}

/// A VM's MACs and read-write disks.
fn claim_vm(
    c: &mut Conflicts<'_>,
    r: &Resource,
    vm: &VirtualMachineSpec,
    out: &mut Vec<Diagnostic>,
) {
    for (i, ifc) in vm.interfaces.iter().enumerate() {
        if let Some(m) = &ifc.mac {
            c.mac(m.to_string(), r, &format!("/spec/interfaces/{i}/mac"), out);
        }
    }
    for (i, d) in vm.disks.iter().enumerate() {
        if !d.read_only {
            c.read_write(
                d.volume.as_str(),
                r,
                &format!("/spec/disks/{i}/volume"),
                out,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// One document: kind, name, and the lines of its spec (indented by two).
    pub(super) fn doc(kind: &str, name: &str, spec: &[&str]) -> String {
        let mut s = format!(
            "---\napiVersion: stead.dev/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}}}\nspec:\n"
        );
        for line in spec {
            s.push_str("  ");
            s.push_str(line);
            s.push('\n');
        }
        s
    }

    /// The diagnostics of `validate` over `text`, as `file:line:col: field: message`.
    pub(super) fn diagnostics(text: &str) -> Vec<String> {
        let mut resources = Vec::new();
        let mut errors = Vec::new();
        crate::load::load_str(Path::new("m.yaml"), text, &mut resources, &mut errors);
        let desired = crate::load::into_desired(resources, &mut errors);
        assert!(errors.is_empty(), "the test manifest must load: {errors:?}");
        validate(&desired).iter().map(|d| d.to_string()).collect()
    }

    pub(super) const POOL: &[&str] = &["type: dir", "path: /p", "content: [images, rootdir]"];

    #[test]
    fn a_valid_set_has_no_diagnostics() {
        let text = doc("StoragePool", "local", POOL)
            + &doc("Network", "lan0", &["addresses: [10.0.0.1/24]"])
            + &doc("Volume", "data", &["pool: local", "size: 1Mi"])
            + &doc(
                "Container",
                "web",
                &[
                    "rootfs: {path: /srv/web}",
                    "interfaces: [{name: eth0, network: lan0, address: 10.0.0.2/24}]",
                    "mounts: [{volume: data, path: /data}]",
                ],
            );
        assert_eq!(diagnostics(&text), Vec::<String>::new());
    }

    #[test]
    fn stop_timeout_is_whole_seconds_up_to_an_hour() {
        let ct = |name: &str, t: &str| {
            doc(
                "Container",
                name,
                &["rootfs: {path: /srv/web}", &format!("stopTimeout: {t}")],
            )
        };
        let text = ct("a", "30s") + &ct("b", "0s") + &ct("c", "1500ms") + &ct("d", "2h");
        let d = diagnostics(&text);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(
            d[0].ends_with("Container/c spec.stopTimeout: stopTimeout 1500ms must be whole seconds between 0s and 1h"),
            "{d:?}"
        );
        assert!(
            d[1].contains("Container/d spec.stopTimeout: stopTimeout 2h"),
            "{d:?}"
        );
    }

    #[test]
    fn network_rules() {
        let text = doc(
            "Network",
            "abcdefghijklmnop",
            &[
                "mtu: 70000",                                                                   // line 5
                "type: vxlan",                                                                  // 6
                "nat: {enabled: true}",                                                         // 7
                "ports: [eth1, eth1]",                                                          // 8
                "forwards: [{hostPort: 80, to: 10.9.0.2:80}, {hostPort: 80, to: 10.9.0.3:80}]", // 9
            ],
        );
        assert_eq!(
            diagnostics(&text),
            [
                "m.yaml:4:18: Network/abcdefghijklmnop metadata.name: network name \"abcdefghijklmnop\" is 16 bytes; it is also the bridge's interface name, at most 15 bytes (hint: use a shorter name, e.g. lan0)",
                "m.yaml:6:8: Network/abcdefghijklmnop spec.mtu: mtu 70000 is out of range 68..65535",
                "m.yaml:7:9: Network/abcdefghijklmnop spec.type: type vxlan needs a `vxlan` block (hint: add vxlan: {vni: 100, remotes: [...]})",
                "m.yaml:8:3: Network/abcdefghijklmnop spec.nat: NAT needs at least one host address on the bridge (its subnet is masqueraded) (hint: add addresses: [10.10.0.1/24])",
                "m.yaml:9:17: Network/abcdefghijklmnop spec.ports[1]: port eth1 is listed twice",
                "m.yaml:10:33: Network/abcdefghijklmnop spec.forwards[0].to: forward target 10.9.0.2:80 is not inside any subnet of this network",
                "m.yaml:10:58: Network/abcdefghijklmnop spec.forwards[1].hostPort: host port 80 is forwarded twice",
                "m.yaml:10:66: Network/abcdefghijklmnop spec.forwards[1].to: forward target 10.9.0.3:80 is not inside any subnet of this network",
            ]
        );
    }

    #[test]
    fn pool_content_takes_proxmox_names_and_keeps_stead_names() {
        let text = doc(
            "StoragePool",
            "pve",
            &[
                "type: dir",
                "path: /p",
                "content: [images, rootdir, vztmpl, iso, backup]",
            ],
        ) + &doc(
            "StoragePool",
            "old",
            &["type: dir", "path: /q", "content: [templates]"],
        );
        assert_eq!(diagnostics(&text), Vec::<String>::new());
        let mut resources = Vec::new();
        let mut errors = Vec::new();
        crate::load::load_str(Path::new("m.yaml"), &text, &mut resources, &mut errors);
        let contents: Vec<Vec<Content>> = resources
            .iter()
            .map(|r| match &r.spec {
                Spec::StoragePool(p) => p.content.clone(),
                other => panic!("not a pool: {other:?}"),
            })
            .collect();
        use Content::*;
        assert_eq!(
            contents,
            [
                vec![Images, Rootdir, Templates, Iso, Backup],
                vec![Templates]
            ]
        );
        assert_eq!(
            resources[0].spec_json()["content"],
            serde_json::json!(["images", "rootdir", "templates", "iso", "backup"])
        );
    }

    #[test]
    fn bond_and_pool_rules() {
        let text = doc(
            "Bond",
            "abcdefghijklmnop",
            &["mode: active-backup", "slaves: []"],
        ) + &doc("StoragePool", "root", &["type: dir", "path: /"])
            + &doc("StoragePool", "rel", &["type: nfs", "path: srv/../x"])
            + &doc("StoragePool", "thin", &["type: lvmthin", "path: /t"])
            + &doc("StoragePool", "tank", &["type: zfs", "path: /z"]);
        assert_eq!(
            diagnostics(&text),
            [
                "m.yaml:4:18: Bond/abcdefghijklmnop metadata.name: bond name is the interface name: at most 15 bytes",
                "m.yaml:7:3: Bond/abcdefghijklmnop spec.slaves: a bond needs at least one slave",
                "m.yaml:14:9: StoragePool/root spec.path: the root directory cannot be a pool",
                "m.yaml:20:9: StoragePool/rel spec.type: type nfs needs an `nfs` block {server, export}",
                "m.yaml:21:9: StoragePool/rel spec.path: pool path srv/../x must be an absolute path",
                "m.yaml:27:9: StoragePool/thin spec.type: type lvmthin needs an `lvm` block {volumeGroup, thinPool}",
                "m.yaml:34:9: StoragePool/tank spec.type: type zfs needs a `zfs` block {dataset}",
            ]
        );
    }

    #[test]
    fn volume_rules() {
        let pool = doc(
            "StoragePool",
            "bk",
            &["type: dir", "path: /b", "content: [backup]"],
        );
        let text = pool
            + &doc("Volume", "empty", &["pool: bk", "size: 0", "format: qcow2"])
            + &doc(
                "Volume",
                "copy",
                &["pool: bk", "size: 1Mi", "source: {file: img.raw}"],
            );
        assert_eq!(
            diagnostics(&text),
            [
                "m.yaml:14:9: Volume/empty spec.pool: pool bk does not allow images, rootdir or iso content",
                "m.yaml:15:9: Volume/empty spec.size: size must be greater than zero",
                "m.yaml:22:9: Volume/copy spec.pool: pool bk does not allow images, rootdir or iso content",
                "m.yaml:24:18: Volume/copy spec.source.file: source file img.raw must be an absolute path",
            ]
        );
    }

    #[test]
    fn container_rules() {
        let net = doc("Network", "lan0", &["addresses: [10.0.0.1/24]"]);
        let text = net
            + &doc(
                "Container",
                "web",
                &[
                    "rootfs: {path: rel/root, template: /t.tar}",
                    "hostname: \"bad host\"",
                    "command: []",
                    "resources: {cpus: 0, memory: 1Mi}",
                    "interfaces: [{name: eth0, network: lan0, address: 10.1.0.2/24, gateway: 10.2.0.1, vlan: 5}, {name: eth0, network: lan0}]",
                    "mounts: [{volume: a, path: /d}, {volume: b, path: /d}, {volume: c, path: x/../y}]",
                ],
            );
        assert_eq!(
            diagnostics(&text),
            [
                "m.yaml:12:3: Container/web spec.rootfs: rootfs needs exactly one of template, path, volume (2 given)",
                "m.yaml:12:18: Container/web spec.rootfs.path: rootfs path rel/root must be an absolute path",
                "m.yaml:13:13: Container/web spec.hostname: invalid hostname \"bad host\"",
                "m.yaml:14:3: Container/web spec.command: command must not be empty",
                "m.yaml:15:21: Container/web spec.resources.cpus: cpus 0 must be > 0",
                "m.yaml:15:32: Container/web spec.resources.memory: memory limit below 4Mi cannot run a container",
                "m.yaml:16:53: Container/web spec.interfaces[0].address: 10.1.0.2/24 is not in a subnet of network lan0 (10.0.0.0/24)",
                "m.yaml:16:75: Container/web spec.interfaces[0].gateway: gateway 10.2.0.1 is not in 10.1.0.2/24",
                "m.yaml:16:91: Container/web spec.interfaces[0].vlan: network lan0 is not vlanAware (hint: set vlanAware: true on the network)",
                "m.yaml:16:102: Container/web spec.interfaces[1].name: interface name eth0 used twice",
                "m.yaml:17:21: Container/web spec.mounts[0].volume: Container/web references Volume/a which is not defined",
                "m.yaml:17:44: Container/web spec.mounts[1].volume: Container/web references Volume/b which is not defined",
                "m.yaml:17:53: Container/web spec.mounts[1].path: /d is mounted twice",
                "m.yaml:17:67: Container/web spec.mounts[2].volume: Container/web references Volume/c which is not defined",
                "m.yaml:17:76: Container/web spec.mounts[2].path: mount path x/../y must be an absolute path",
            ]
        );
    }

    #[test]
    fn vm_rules() {
        let text = doc(
            "VirtualMachine",
            "vm1",
            &[
                "cpus: 0",
                "memory: 1Mi",
                "boot: {kernel: vmlinuz, initrd: /i/../x}",
                "disks: [{volume: d}, {volume: d}]",
                "interfaces: [{network: lan0, vlan: 5000}]",
                "stopTimeout: 2h",
            ],
        );
        assert_eq!(
            diagnostics(&text),
            [
                "m.yaml:6:9: VirtualMachine/vm1 spec.cpus: cpus 0 must be in 1..254",
                "m.yaml:7:11: VirtualMachine/vm1 spec.memory: memory must be at least 2Mi",
                "m.yaml:8:18: VirtualMachine/vm1 spec.boot.kernel: kernel vmlinuz must be an absolute path",
                "m.yaml:8:35: VirtualMachine/vm1 spec.boot.initrd: initrd /i/../x must not contain `..`",
                "m.yaml:9:20: VirtualMachine/vm1 spec.disks[0].volume: VirtualMachine/vm1 references Volume/d which is not defined",
                "m.yaml:9:33: VirtualMachine/vm1 spec.disks[1].volume: volume d attached twice",
                "m.yaml:9:33: VirtualMachine/vm1 spec.disks[1].volume: VirtualMachine/vm1 references Volume/d which is not defined",
                "m.yaml:9:33: VirtualMachine/vm1 spec.disks[1].volume: volume d is attached read-write twice (also by VirtualMachine/vm1 at m.yaml:9:20) (hint: attach it readOnly in all but one place)",
                "m.yaml:10:26: VirtualMachine/vm1 spec.interfaces[0].network: VirtualMachine/vm1 references Network/lan0 which is not defined",
                "m.yaml:10:38: VirtualMachine/vm1 spec.interfaces[0].vlan: vlan 5000 must be in 1..4094",
                "m.yaml:11:16: VirtualMachine/vm1 spec.stopTimeout: stopTimeout 2h must be whole seconds between 0s and 1h",
            ]
        );
    }

    #[test]
    fn backup_schedule_rules() {
        let text = doc("StoragePool", "local", POOL)
            + &doc(
                "BackupSchedule",
                "nightly",
                &[
                    "schedule: '0 2 * * *'",
                    "targets: {names: [Network/lan0]}",
                    "storage: local",
                ],
            )
            + &doc(
                "BackupSchedule",
                "none",
                &["schedule: '0 2 * * *'", "targets: {}", "storage: elsewhere"],
            );
        assert_eq!(
            diagnostics(&text),
            [
                "m.yaml:15:21: BackupSchedule/nightly spec.targets.names[0]: Network/lan0 cannot be backed up: targets are Containers, VirtualMachines or Volumes",
                "m.yaml:15:21: BackupSchedule/nightly spec.targets.names[0]: BackupSchedule/nightly references Network/lan0 which is not defined",
                "m.yaml:16:12: BackupSchedule/nightly spec.storage: pool local does not allow backup content (hint: add backup to the pool's content list)",
                "m.yaml:23:3: BackupSchedule/none spec.targets: targets needs a selector or names",
                "m.yaml:24:12: BackupSchedule/none spec.storage: BackupSchedule/none references StoragePool/elsewhere which is not defined",
            ]
        );
    }

    #[test]
    fn dangling_references_and_cycles() {
        let text = doc("StoragePool", "local", POOL)
            + &doc("Volume", "data", &["pool: locl", "size: 1Mi"])
            + &doc("Network", "a", &["dependsOn: [Network/b]"])
            + &doc("Network", "b", &["dependsOn: [Network/a]"]);
        assert_eq!(
            diagnostics(&text),
            [
                "m.yaml:14:9: Volume/data spec.pool: Volume/data references StoragePool/locl which is not defined (hint: did you mean StoragePool/local?)",
                "m.yaml:19:18: Network/a metadata.name: dependency cycle: Network/a -> Network/b -> Network/a (hint: remove one of the references or dependsOn entries)",
            ]
        );
    }

    #[test]
    fn shared_addresses_macs_and_volumes_conflict() {
        let text = doc("StoragePool", "local", POOL)
            + &doc("Volume", "data", &["pool: local", "size: 1Mi"])
            + &doc("Network", "lan0", &["addresses: [10.0.0.1/24]"])
            + &doc(
                "Container",
                "a",
                &[
                    "rootfs: {volume: data}",
                    "interfaces: [{name: eth0, network: lan0, address: 10.0.0.1/24, mac: '02:00:00:00:00:01'}]",
                ],
            )
            + &doc(
                "VirtualMachine",
                "b",
                &[
                    "boot: {kernel: /k}",
                    "disks: [{volume: data}, {volume: data, readOnly: true}]",
                    "interfaces: [{network: lan0, mac: '02:00:00:00:00:01'}]",
                ],
            );
        assert_eq!(
            diagnostics(&text),
            [
                "m.yaml:28:53: Container/a spec.interfaces[0].address: address 10.0.0.1 on network lan0 is already used by Network/lan0 (m.yaml:21:15)",
                "m.yaml:35:20: VirtualMachine/b spec.disks[0].volume: volume data is attached read-write twice (also by Container/a at m.yaml:27:20) (hint: attach it readOnly in all but one place)",
                "m.yaml:35:36: VirtualMachine/b spec.disks[1].volume: volume data attached twice",
                "m.yaml:36:37: VirtualMachine/b spec.interfaces[0].mac: MAC 02:00:00:00:00:01 is already used by Container/a (m.yaml:28:71)",
            ]
        );
    }
}
