//! The `Network` driver: a Linux bridge (plus, for `type: vxlan`, a VXLAN port with
//! unicast flood entries), its addresses, MTU and enslaved host ports, and its NAT and
//! port forwards in the stead nftables table.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rtnetlink::packet_core::{NLM_F_APPEND, NLM_F_CREATE};
use rtnetlink::packet_route::link::{InfoBridge, InfoData, InfoKind, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::RouteType;
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVxlan};
use serde_json::{Value, json};
use stead_reconciler::driver::{DriverError, Health, HostEnv, Impact, Lookup, Observed, Typed};
use stead_schema::{ForwardSpec, Kind, NetworkSpec, NetworkType, ResourceId, VxlanSpec};

use super::netns::NetnsRef;
use super::nft::{self, Nft, NftTable};
use super::nl::{Addr, Link, Netlink, nl_err};
use super::{
    ALIAS_PREFIX, Ownership, STEAD_LINK_GROUP, addr_strings, claim, create_link, delete_link_index,
    owner_alias, ownership, set_link, sync_addresses,
};

/// Drives `Network` resources inside one network namespace.
#[derive(Debug)]
pub struct NetworkDriver {
    nl: Mutex<Netlink>,
    nft: Nft,
    /// The stead table as last listed (by observe) or written (by apply), with rule
    /// handles; the mutex also serialises read-modify-write between parallel applies.
    /// A transaction built on a stale copy fails (its delete-by-handle misses) and is
    /// retried on a fresh listing.
    nft_cache: Mutex<Option<(Instant, NftTable)>>,
}

/// The VXLAN link stead creates for network `name` with `vni`: `<name>-vx` when that
/// fits in 15 bytes, else `vx<vni>`.
pub fn vxlan_link_name(name: &str, vni: u32) -> String {
    let n = format!("{name}-vx");
    if n.len() <= 15 { n } else { format!("vx{vni}") }
}

/// Links one apply created (ifindex, name), so that a failure later in the same apply
/// can remove them.
#[derive(Debug, Default)]
struct Made {
    bridge: Option<(u32, String)>,
    vxlan: Option<(u32, String)>,
}

/// Everything observe reads, dumped once per call.
struct Snapshot {
    links: Vec<Link>,
    addrs: BTreeMap<u32, Vec<Addr>>,
    /// (vxlan ifindex) → remote VTEPs of all-zero FDB entries.
    fdb: BTreeMap<u32, BTreeSet<IpAddr>>,
    table: NftTable,
    ip_forward: Option<bool>,
    ip6_forward: Option<bool>,
}

impl Snapshot {
    fn by_name(&self, name: &str) -> Option<&Link> {
        self.links.iter().find(|l| l.name == name)
    }
}

/// Whether an enslaved link is a host port (not a stead attachment or VXLAN port).
fn is_host_port(l: &Link) -> bool {
    match l.alias.as_deref() {
        Some(a) if a.starts_with(ALIAS_PREFIX) => a.starts_with("stead:Bond/"),
        _ => l.group != STEAD_LINK_GROUP,
    }
}

/// Whether an enslaved link is a guest's tap or veth that stead did not make (another
/// manager's VM or container): not one of the bridge's physical ports.
fn is_foreign_guest_port(l: &Link) -> bool {
    matches!(l.kind.as_deref(), Some("tun" | "veth"))
        && l.alias
            .as_deref()
            .is_none_or(|a| !a.starts_with(ALIAS_PREFIX))
}

/// Whether the enslaved link `l` counts as one of the bridge's physical ports for
/// `spec`: a host port, unless it is a foreign guest port the manifest does not list.
fn is_physical_port(l: &Link, spec: &NetworkSpec) -> bool {
    is_host_port(l)
        && (spec.ports.iter().any(|p| p.as_str() == l.name) || !is_foreign_guest_port(l))
}

/// The names of the physical ports of the bridge with ifindex `br`, sorted.
fn physical_ports<'a>(links: &'a [Link], br: u32, spec: &NetworkSpec) -> Vec<&'a str> {
    let mut ports: Vec<&str> = links
        .iter()
        .filter(|l| l.controller == Some(br) && is_physical_port(l, spec))
        .map(|l| l.name.as_str())
        .collect();
    ports.sort();
    ports
}

fn fdb_dump(nl: &mut Netlink) -> Result<BTreeMap<u32, BTreeSet<IpAddr>>, DriverError> {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    let msgs = nl
        .dump(RouteNetlinkMessage::GetNeighbour(m))
        .map_err(|e| nl_err("dump bridge fdb", e))?;
    let mut out: BTreeMap<u32, BTreeSet<IpAddr>> = BTreeMap::new();
    for msg in msgs {
        let RouteNetlinkMessage::NewNeighbour(n) = msg else {
            continue;
        };
        let mut zero = false;
        let mut dst = None;
        for a in &n.attributes {
            match a {
                NeighbourAttribute::LinkLayerAddress(l) => zero = l.iter().all(|b| *b == 0),
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                    dst = Some(IpAddr::V4(*v4))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                    dst = Some(IpAddr::V6(*v6))
                }
                // With family AF_BRIDGE the address family of NDA_DST is not known to
                // the parser: raw bytes, 4 or 16 of them.
                NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                    dst = match b.len() {
                        4 => <[u8; 4]>::try_from(&b[..]).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(&b[..]).ok().map(IpAddr::from),
                        _ => None,
                    }
                }
                _ => {}
            }
        }
        if zero && let Some(d) = dst {
            out.entry(n.header.ifindex).or_default().insert(d);
        }
    }
    Ok(out)
}

fn fdb_message(ifindex: u32, remote: IpAddr) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = ifindex;
    m.header.state = NeighbourState::Permanent;
    m.header.flags = NeighbourFlags::Own;
    m.header.kind = RouteType::Unspec;
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(vec![0; 6]));
    m.attributes
        .push(NeighbourAttribute::Destination(match remote {
            IpAddr::V4(v) => NeighbourAddress::Inet(v),
            IpAddr::V6(v) => NeighbourAddress::Inet6(v),
        }));
    m
}

fn vxlan_json(v: &VxlanSpec, remotes: Vec<String>, local: Option<IpAddr>) -> Value {
    let mut o = serde_json::Map::new();
    o.insert("vni".into(), json!(v.vni));
    if let Some(l) = local {
        o.insert("local".into(), json!(l.to_string()));
    }
    o.insert("port".into(), json!(v.port));
    o.insert("remotes".into(), json!(remotes));
    Value::Object(o)
}

fn needs_v6(spec: &NetworkSpec) -> bool {
    spec.addresses.iter().any(|a| a.addr.is_ipv6()) || spec.forwards.iter().any(|f| f.to.is_ipv6())
}

fn needs_v4(spec: &NetworkSpec) -> bool {
    spec.addresses.iter().any(|a| a.addr.is_ipv4()) || spec.forwards.iter().any(|f| f.to.is_ipv4())
}

impl NetworkDriver {
    /// A driver managing networking in `env.netns` (the caller's namespace when `None`).
    pub fn new(env: &HostEnv) -> Result<Self, DriverError> {
        let ns = env.netns.as_deref().map(NetnsRef::from);
        Ok(NetworkDriver {
            nl: Mutex::new(Netlink::open(ns.as_ref())?),
            nft: Nft::new(ns.as_ref())?,
            nft_cache: Mutex::new(None),
        })
    }

    /// Netlink requests sent so far (each one round trip), for benchmarks.
    pub fn netlink_round_trips(&self) -> u64 {
        self.nl.lock().map(|n| n.round_trips).unwrap_or(0)
    }

    /// `nft` invocations so far, for benchmarks.
    pub fn nft_invocations(&self) -> u64 {
        self.nft.invocations()
    }

    fn lock_nl(&self) -> Result<std::sync::MutexGuard<'_, Netlink>, DriverError> {
        self.nl
            .lock()
            .map_err(|_| DriverError::Other("netlink socket lock poisoned".into()))
    }

    fn list_table(&self, required: bool) -> Result<NftTable, DriverError> {
        match self.nft.list() {
            Ok(t) => Ok(t),
            Err(DriverError::Unsupported(m)) if !required => {
                tracing::warn!("{m}; NAT rules cannot be observed");
                Ok(NftTable::default())
            }
            Err(e) => Err(e),
        }
    }

    fn snapshot(&self, targets: &[&NetworkSpec]) -> Result<Snapshot, DriverError> {
        let mut nl = self.lock_nl()?;
        let links = nl.links()?;
        let addrs = nl.addresses()?;
        let fdb = if targets.iter().any(|s| s.vxlan.is_some())
            || links.iter().any(|l| l.kind.as_deref() == Some("vxlan"))
        {
            fdb_dump(&mut nl)?
        } else {
            BTreeMap::new()
        };
        drop(nl);
        let required = targets.iter().any(|s| nft::routed(s));
        let table = self.list_table(required)?;
        if let Ok(mut c) = self.nft_cache.lock() {
            *c = Some((Instant::now(), table.clone()));
        }
        let (ip_forward, ip6_forward) = if required {
            (
                Some(self.nft.sysctl_get(IP_FORWARD)? == "1"),
                Some(self.nft.sysctl_get(IP6_FORWARD)? == "1"),
            )
        } else {
            (None, None)
        };
        Ok(Snapshot {
            links,
            addrs,
            fdb,
            table,
            ip_forward,
            ip6_forward,
        })
    }

    fn observe_one(&self, name: &str, spec: &NetworkSpec, snap: &Snapshot) -> Observed {
        let owner = owner_alias(Kind::Network, name);
        let Some(br) = snap.by_name(name) else {
            return Observed::absent();
        };
        let owned = ownership(br, &owner) != Ownership::Foreign;
        let mut st = serde_json::Map::new();

        // The VXLAN port stead owns for this network, if any.
        let vx = snap.links.iter().find(|l| {
            l.kind.as_deref() == Some("vxlan")
                && l.alias.as_deref() == Some(owner.as_str())
                && l.controller == Some(br.index)
        });
        let ty = match br.kind.as_deref() {
            Some("bridge") if vx.is_some() => "vxlan".to_string(),
            Some(k) => k.to_string(),
            None => "unknown".to_string(),
        };
        st.insert("type".into(), json!(ty));
        if spec.mtu.is_some() {
            st.insert("mtu".into(), json!(br.mtu));
        }
        st.insert(
            "addresses".into(),
            json!(addr_strings(snap.addrs.get(&br.index))),
        );
        let ports = physical_ports(&snap.links, br.index, spec);
        st.insert("ports".into(), json!(ports));
        st.insert("up".into(), json!(br.up));
        if spec.vlan_aware {
            st.insert(
                "vlanAware".into(),
                json!(br.vlan_filtering.unwrap_or(false)),
            );
        }
        let rules = snap.table.rules_of(&owner);
        let rules = if snap.table.chains_ok {
            rules
        } else {
            Vec::new()
        };
        let (nat, forwards) = nft::observed_rules_state(&rules, name, spec);
        let accept = snap.table.chains_ok && snap.table.bridges.contains(name);
        if let Some(n) = nat {
            st.insert("nat".into(), n);
        }
        if !forwards.is_empty() {
            st.insert("forwards".into(), json!(forwards));
        }
        if accept {
            st.insert("forwardAccept".into(), json!(true));
        }
        if nft::routed(spec) {
            let mut f = true;
            if needs_v4(spec) {
                f &= snap.ip_forward.unwrap_or(false);
            }
            if needs_v6(spec) {
                f &= snap.ip6_forward.unwrap_or(false);
            }
            st.insert("ipForward".into(), json!(f));
        }
        if let Some(vx) = vx {
            let (vni, local, port) = vx.vxlan.unwrap_or((0, None, 0));
            let remotes: Vec<String> = snap
                .fdb
                .get(&vx.index)
                .map(|s| s.iter().map(|r| r.to_string()).collect())
                .unwrap_or_default();
            let v = VxlanSpec {
                vni,
                local,
                remotes: Vec::new(),
                port,
            };
            let shown_local = if spec.vxlan.as_ref().is_some_and(|s| s.local.is_some()) {
                local
            } else {
                None
            };
            st.insert("vxlan".into(), vxlan_json(&v, remotes, shown_local));
        }
        let health = if !br.up {
            Health::Degraded("bridge is down".into())
        } else {
            Health::Ready
        };
        Observed {
            exists: true,
            owned,
            state: Value::Object(st),
            status: json!({
                "ifindex": br.index,
                "alias": br.alias,
                "mtu": br.mtu,
                "attached": snap.links.iter().filter(|l| l.controller == Some(br.index)).count(),
            }),
            health,
        }
    }

    /// Brings the stead table in line for network `name` (`spec == None`: remove its
    /// rules).
    fn converge_rules(&self, name: &str, spec: Option<&NetworkSpec>) -> Result<(), DriverError> {
        let mut cache = self
            .nft_cache
            .lock()
            .map_err(|_| DriverError::Other("nft cache lock poisoned".into()))?;
        let owner = owner_alias(Kind::Network, name);
        let expected = spec
            .map(|s| nft::expected_rules(name, s))
            .unwrap_or_default();
        let accept = spec.is_some_and(nft::routed);
        let required = !expected.is_empty() || accept;
        let (table, cached) = match cache.take() {
            Some((at, t)) if at.elapsed() < NFT_CACHE_TTL => (t, true),
            _ => (self.list_table(required)?, false),
        };
        let current = table.rules_of(&owner);
        let same = |t: &NftTable| {
            t.rules_of(&owner) == expected
                && t.bridges.contains(name) == accept
                && ((expected.is_empty() && !accept) || t.chains_ok)
        };
        if same(&table) {
            *cache = Some((Instant::now(), table));
            return Ok(());
        }
        tracing::info!(
            network = name,
            have = current.len(),
            want = expected.len(),
            "nft rules differ"
        );
        let result = match self
            .nft
            .set_rules(&table, &owner, name, expected.clone(), accept)
        {
            Err(e) if cached => {
                tracing::info!(error = %e, "nft transaction on the cached table failed: relisting");
                let fresh = self.list_table(required)?;
                if same(&fresh) {
                    Ok(fresh)
                } else {
                    self.nft.set_rules(&fresh, &owner, name, expected, accept)
                }
            }
            other => other,
        };
        *cache = Some((Instant::now(), result?));
        Ok(())
    }

    fn converge_forwarding(&self, spec: &NetworkSpec) -> Result<(), DriverError> {
        if !nft::routed(spec) {
            return Ok(());
        }
        if needs_v4(spec) && self.nft.sysctl_get(IP_FORWARD)? != "1" {
            tracing::info!("enabling net.ipv4.ip_forward");
            self.nft.sysctl_set(IP_FORWARD, "1")?;
        }
        if needs_v6(spec) && self.nft.sysctl_get(IP6_FORWARD)? != "1" {
            tracing::info!("enabling net.ipv6.conf.all.forwarding");
            self.nft.sysctl_set(IP6_FORWARD, "1")?;
        }
        Ok(())
    }

    /// Removes what a failed apply made ([`Made`]): the rules of a bridge it created,
    /// then the links, so that a failed create leaves nothing behind. Best effort: a
    /// failure here is logged, and what is left keeps its ownership mark (the open
    /// journal entry of the failed step lets the next apply or destroy remove it).
    fn undo(&self, name: &str, made: &Made) {
        if made.bridge.is_some()
            && let Err(e) = self.converge_rules(name, None)
        {
            tracing::warn!(network = name, error = %e, "cannot undo the rules of a failed create");
        }
        let Ok(mut nl) = self.lock_nl() else {
            return;
        };
        let links = made.vxlan.iter().chain(made.bridge.iter());
        for (index, link) in links {
            tracing::info!(network = name, link = %link, "removing a link made by the failed apply");
            if let Err(e) = delete_link_index(&mut nl, *index, link) {
                tracing::warn!(link = %link, error = %e, "cannot undo a failed create");
            }
        }
    }

    fn converge_links(
        &self,
        name: &str,
        spec: &NetworkSpec,
        made: &mut Made,
    ) -> Result<(), DriverError> {
        let owner = owner_alias(Kind::Network, name);
        let mut nl = self.lock_nl()?;
        let links = nl.links()?;
        let find = |n: &str| links.iter().find(|l| l.name == n).cloned();

        // 1. The bridge.
        let mut br = match find(name) {
            Some(l) => {
                claim(&mut nl, &l, &owner)?;
                if l.kind.as_deref() != Some("bridge") {
                    tracing::warn!(link = name, kind = ?l.kind, "owned link is not a bridge: recreating");
                    delete_link_index(&mut nl, l.index, name)?;
                    None
                } else {
                    Some(l)
                }
            }
            None => None,
        };
        if br.is_none() {
            tracing::info!(bridge = name, "creating bridge");
            let mut b = LinkBridge::new(name).link_group(STEAD_LINK_GROUP);
            if let Some(m) = spec.mtu {
                b = b.mtu(m);
            }
            let msg = b.build();
            let l = create_link(&mut nl, msg, name, &owner)?;
            made.bridge = Some((l.index, name.to_string()));
            br = Some(l);
        }
        let br = br.ok_or_else(|| DriverError::Other("bridge missing".into()))?;

        // 2. VLAN filtering.
        if spec.vlan_aware != br.vlan_filtering.unwrap_or(false) {
            let msg = LinkMessageBuilder::<LinkBridge>::new_with_info_kind(InfoKind::Bridge)
                .index(br.index)
                .set_info_data(InfoData::Bridge(vec![InfoBridge::VlanFiltering(
                    spec.vlan_aware,
                )]))
                .build();
            set_vlan_filtering(&mut nl, msg, name)?;
        }

        // 4. Addresses (exactly the declared set).
        let addrs = nl.addresses()?;
        sync_addresses(
            &mut nl,
            br.index,
            name,
            addrs.get(&br.index),
            &spec.addresses,
        )?;

        // 5. Host ports: enslave the declared ones, release the others.
        for p in &spec.ports {
            let l = find(p.as_str()).ok_or_else(|| {
                DriverError::NotReady(format!("port {p} of {name} does not exist"))
            })?;
            if l.controller != Some(br.index) || !l.up {
                tracing::info!(bridge = name, port = %p, "enslaving port");
                set_link(
                    &mut nl,
                    LinkUnspec::new_with_index(l.index)
                        .controller(br.index)
                        .up()
                        .build(),
                    p.as_str(),
                )?;
            }
        }
        for l in links
            .iter()
            .filter(|l| l.controller == Some(br.index) && is_physical_port(l, spec))
        {
            if !spec.ports.iter().any(|p| p.as_str() == l.name) {
                tracing::info!(bridge = name, port = %l.name, "releasing undeclared port");
                set_link(
                    &mut nl,
                    LinkUnspec::new_with_index(l.index).nocontroller().build(),
                    &l.name,
                )?;
            }
        }

        // 6. VXLAN port.
        let want_vx = match (spec.net_type, &spec.vxlan) {
            (NetworkType::Vxlan, Some(v)) => Some((vxlan_link_name(name, v.vni), v)),
            (NetworkType::Vxlan, None) => {
                return Err(DriverError::Refused(format!(
                    "network {name} has type vxlan but no vxlan settings"
                )));
            }
            _ => None,
        };
        // Our VXLAN links that are not the wanted one go.
        for l in links.iter().filter(|l| {
            l.kind.as_deref() == Some("vxlan") && l.alias.as_deref() == Some(owner.as_str())
        }) {
            let keep = want_vx.as_ref().is_some_and(|(n, v)| {
                *n == l.name
                    && l.vxlan.is_some_and(|(id, local, port)| {
                        id == v.vni && port == v.port && (v.local.is_none() || local == v.local)
                    })
            });
            if !keep {
                tracing::info!(link = %l.name, "removing stale VXLAN port");
                delete_link_index(&mut nl, l.index, &l.name)?;
            }
        }
        if let Some((vxname, v)) = &want_vx {
            let cur = nl.link_by_name(vxname)?;
            let vx = match cur {
                Some(l) => {
                    claim(&mut nl, &l, &owner)?;
                    l
                }
                None => {
                    tracing::info!(link = %vxname, vni = v.vni, "creating VXLAN port");
                    let mut b = LinkVxlan::new(vxname, v.vni)
                        .port(v.port)
                        .learning(true)
                        .link_group(STEAD_LINK_GROUP);
                    match v.local {
                        Some(IpAddr::V4(a)) => b = b.local(a),
                        Some(IpAddr::V6(a)) => b = b.local6(a),
                        None => {}
                    }
                    let l = create_link(&mut nl, b.build(), vxname, &owner)?;
                    made.vxlan = Some((l.index, vxname.clone()));
                    l
                }
            };
            if vx.controller != Some(br.index) || !vx.up {
                set_link(
                    &mut nl,
                    LinkUnspec::new_with_index(vx.index)
                        .controller(br.index)
                        .up()
                        .build(),
                    vxname,
                )?;
            }
            let fdb = fdb_dump(&mut nl)?;
            let have = fdb.get(&vx.index).cloned().unwrap_or_default();
            let want: BTreeSet<IpAddr> = v.remotes.iter().copied().collect();
            for r in want.difference(&have) {
                tracing::info!(link = %vxname, remote = %r, "adding flood entry");
                nl.ack(
                    RouteNetlinkMessage::NewNeighbour(fdb_message(vx.index, *r)),
                    NLM_F_CREATE | NLM_F_APPEND,
                )
                .map_err(|e| {
                    nl_err(
                        format!("fdb append 00:00:00:00:00:00 dst {r} dev {vxname}"),
                        e,
                    )
                })?;
            }
            for r in have.difference(&want) {
                tracing::info!(link = %vxname, remote = %r, "removing flood entry");
                match nl.ack(
                    RouteNetlinkMessage::DelNeighbour(fdb_message(vx.index, *r)),
                    0,
                ) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => return Err(nl_err(format!("fdb del dst {r} dev {vxname}"), e)),
                }
            }
        }

        // 6b. MTU, last: enslaving ports re-adjusts a bridge MTU that was not set by
        // hand, so read the bridge again.
        if let Some(m) = spec.mtu {
            let cur = nl.link_by_name(name)?.map(|l| l.mtu).unwrap_or(br.mtu);
            if cur != m {
                set_link(
                    &mut nl,
                    LinkUnspec::new_with_index(br.index).mtu(m).build(),
                    name,
                )?;
            }
        }

        // 7. Up.
        if !br.up {
            set_link(
                &mut nl,
                LinkUnspec::new_with_index(br.index).up().build(),
                name,
            )?;
        }
        Ok(())
    }
}

/// Refuses to adopt `br` as the bridge of `spec` unless it is a bridge, carries no other
/// resource's mark, and its physical ports are exactly the manifest's `ports` (guests'
/// tap and veth ports do not count).
fn check_adoptable_bridge(br: &Link, links: &[Link], spec: &NetworkSpec) -> Result<(), String> {
    let name = &br.name;
    if br.kind.as_deref() != Some("bridge") {
        return Err(format!(
            "{name} is a {} link, not a bridge",
            br.kind.as_deref().unwrap_or("plain")
        ));
    }
    if let Some(a) = br.alias.as_deref().filter(|a| a.starts_with(ALIAS_PREFIX)) {
        return Err(format!(
            "{name} carries the mark {a:?} of another stead resource"
        ));
    }
    let have = physical_ports(links, br.index, spec);
    let mut want: Vec<&str> = spec.ports.iter().map(|p| p.as_str()).collect();
    want.sort();
    want.dedup();
    if have != want {
        return Err(format!(
            "the physical ports of bridge {name} [{}] differ from the manifest's ports [{}] (guest tap and veth ports do not count): set ports to [{}] in the manifest, or change the bridge's ports by hand first",
            have.join(", "),
            want.join(", "),
            have.join(", ")
        ));
    }
    Ok(())
}

/// Refuses a port forward no host could receive (see [`bad_forward_target`]).
fn check_forward_targets(spec: &NetworkSpec) -> Result<(), String> {
    for f in &spec.forwards {
        if let Some(why) = bad_forward_target(spec, f) {
            return Err(format!(
                "forward of {} port {} to {}: {why}",
                nft::proto_name(f.protocol),
                f.host_port,
                f.to
            ));
        }
    }
    Ok(())
}

/// Why a port forward's target cannot receive it (nft would take the rule and traffic
/// would vanish): port 0, an unspecified, multicast or broadcast address, or the
/// network or broadcast address of one of the bridge's IPv4 subnets.
fn bad_forward_target(spec: &NetworkSpec, f: &ForwardSpec) -> Option<&'static str> {
    let ip = f.to.ip();
    if f.to.port() == 0 {
        return Some("port 0 cannot be a destination");
    }
    if ip.is_unspecified() || ip.is_multicast() {
        return Some("an unspecified or multicast address cannot be a destination");
    }
    let IpAddr::V4(v4) = ip else { return None };
    if v4.is_broadcast() {
        return Some("the broadcast address cannot be a destination");
    }
    let edge = spec.addresses.iter().any(|c| {
        let n = c.network();
        let host_bits = 32u32.saturating_sub(u32::from(n.prefix));
        match n.addr {
            IpAddr::V4(net) if c.contains(ip) && host_bits >= 2 => {
                let net = u32::from(net);
                let host_mask = 1u32.checked_shl(host_bits).map_or(u32::MAX, |b| b - 1);
                let bcast = net | host_mask;
                let x = u32::from(v4);
                x == net || x == bcast
            }
            _ => false,
        }
    });
    edge.then_some(
        "the network or broadcast address of the bridge's subnet cannot be a destination",
    )
}

fn set_vlan_filtering(nl: &mut Netlink, msg: LinkMessage, name: &str) -> Result<(), DriverError> {
    // RTM_NEWLINK without NLM_F_CREATE: only that path runs the bridge's changelink
    // (RTM_SETLINK ignores IFLA_LINKINFO).
    match nl.ack(RouteNetlinkMessage::NewLink(msg), 0) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Err(DriverError::Unsupported(
            format!("kernel lacks bridge VLAN filtering (vlanAware on {name})"),
        )),
        Err(e) => Err(nl_err(format!("set vlan_filtering on {name}"), e)),
    }
}

/// How long a listed or written nft table is trusted without listing it again (the
/// usual observe → apply sequence of one reconcile pass falls well inside).
const NFT_CACHE_TTL: Duration = Duration::from_secs(5);

const IP_FORWARD: &str = "net/ipv4/ip_forward";
const IP6_FORWARD: &str = "net/ipv6/conf/all/forwarding";

impl stead_reconciler::driver::KindDriver for NetworkDriver {
    type Spec = NetworkSpec;

    fn observe(
        &self,
        targets: &[Typed<'_, NetworkSpec>],
        _world: &dyn Lookup,
    ) -> Result<BTreeMap<ResourceId, Observed>, DriverError> {
        let _span = tracing::debug_span!("observe", kind = "Network", n = targets.len()).entered();
        let specs: Vec<&NetworkSpec> = targets.iter().map(|t| t.spec).collect();
        let snap = self.snapshot(&specs)?;
        let mut out = BTreeMap::new();
        for t in targets {
            out.insert(t.id().clone(), self.observe_one(t.name(), t.spec, &snap));
        }
        Ok(out)
    }

    fn desired_state(&self, desired: Typed<'_, NetworkSpec>, _world: &dyn Lookup) -> Value {
        let spec = desired.spec;
        let mut st = serde_json::Map::new();
        let ty = match spec.net_type {
            NetworkType::Bridge => "bridge",
            NetworkType::Vxlan => "vxlan",
        };
        st.insert("type".into(), json!(ty));
        if let Some(m) = spec.mtu {
            st.insert("mtu".into(), json!(m));
        }
        let mut addrs: Vec<String> = spec.addresses.iter().map(|a| a.to_string()).collect();
        addrs.sort();
        addrs.dedup();
        st.insert("addresses".into(), json!(addrs));
        let mut ports: Vec<&str> = spec.ports.iter().map(|p| p.as_str()).collect();
        ports.sort();
        ports.dedup();
        st.insert("ports".into(), json!(ports));
        st.insert("up".into(), json!(true));
        if spec.vlan_aware {
            st.insert("vlanAware".into(), json!(true));
        }
        if let Some(n) = nft::desired_nat(spec) {
            st.insert("nat".into(), n);
        }
        let fw = nft::desired_forwards(spec);
        if !fw.is_empty() {
            st.insert("forwards".into(), json!(fw));
        }
        if nft::routed(spec) {
            st.insert("forwardAccept".into(), json!(true));
            st.insert("ipForward".into(), json!(true));
        }
        if spec.net_type == NetworkType::Vxlan
            && let Some(v) = &spec.vxlan
        {
            // Sorted as the observed side is (by address, not text), without duplicates.
            let mut rs: Vec<IpAddr> = v.remotes.clone();
            rs.sort();
            rs.dedup();
            let remotes: Vec<String> = rs.iter().map(|r| r.to_string()).collect();
            st.insert("vxlan".into(), vxlan_json(v, remotes, v.local));
        }
        Value::Object(st)
    }

    fn impact(&self, path: &str) -> Impact {
        if path == "/type" || path.starts_with("/type/") {
            Impact::Recreate
        } else {
            Impact::Hot
        }
    }

    fn check(
        &self,
        desired: Typed<'_, NetworkSpec>,
        observed: &Observed,
        _changes: &[stead_reconciler::driver::FieldChange],
    ) -> Result<(), String> {
        let (desired, spec) = (desired.resource, desired.spec);
        if observed.exists && !observed.owned {
            return Err(format!(
                "interface {} exists and is not owned by stead (no alias {:?})",
                desired.id.name,
                owner_alias(Kind::Network, &desired.id.name)
            ));
        }
        if spec.net_type == NetworkType::Vxlan && spec.vxlan.is_none() {
            return Err("type vxlan needs spec.vxlan".into());
        }
        if let Some(v) = &spec.vxlan
            && v.vni >= 1 << 24
        {
            return Err(format!("vxlan.vni {} exceeds 24 bits", v.vni));
        }
        check_forward_targets(spec)
    }

    fn adopt_check(
        &self,
        desired: Typed<'_, NetworkSpec>,
        observed: &Observed,
        _world: &dyn Lookup,
    ) -> Result<(), String> {
        if !observed.exists {
            return Ok(());
        }
        let (name, spec) = (desired.name(), desired.spec);
        if spec.net_type == NetworkType::Vxlan {
            return Err(format!(
                "stead adopts bridges, not vxlan networks: adopt {name} as type bridge, or remove it and let stead create the vxlan network"
            ));
        }
        let links = self
            .lock_nl()
            .and_then(|mut nl| nl.links())
            .map_err(|e| e.to_string())?;
        let Some(br) = links.iter().find(|l| l.name == name) else {
            return Err(format!("interface {name} is gone"));
        };
        check_adoptable_bridge(br, &links, spec)?;
        if nft::routed(spec) {
            let others = self
                .nft
                .other_tables_naming(name)
                .map_err(|e| e.to_string())?;
            if !others.is_empty() {
                return Err(format!(
                    "nftables table(s) {} of another manager have rules for {name}: stead would add its own NAT and forwards beside them; remove those rules, or drop nat and forwards from the manifest",
                    others.join(", ")
                ));
            }
        }
        Ok(())
    }

    fn adopt(
        &self,
        desired: Typed<'_, NetworkSpec>,
        _observed: &Observed,
        _world: &dyn Lookup,
    ) -> Result<(), DriverError> {
        let name = desired.name();
        let owner = owner_alias(Kind::Network, name);
        let mut nl = self.lock_nl()?;
        let Some(br) = nl.link_by_name(name)? else {
            return Err(DriverError::NotReady(format!("bridge {name} is gone")));
        };
        if br.alias.as_deref() == Some(owner.as_str()) {
            return Ok(());
        }
        tracing::info!(bridge = name, ifindex = br.index, old_alias = ?br.alias, "adopting: writing the ownership alias");
        set_link(
            &mut nl,
            LinkUnspec::new_with_index(br.index).alias(&owner).build(),
            name,
        )
    }

    fn release(
        &self,
        last_applied: Typed<'_, NetworkSpec>,
        _observed: &Observed,
    ) -> Result<(), DriverError> {
        let name = last_applied.name();
        let owner = owner_alias(Kind::Network, name);
        let mut nl = self.lock_nl()?;
        let Some(br) = nl.link_by_name(name)? else {
            return Ok(());
        };
        if br.alias.as_deref() != Some(owner.as_str()) {
            return Ok(());
        }
        // Only the mark goes: the bridge, its addresses, ports and any rules stay.
        tracing::info!(
            bridge = name,
            "releasing the adopted bridge: clearing its alias"
        );
        set_link(
            &mut nl,
            LinkUnspec::new_with_index(br.index).alias("").build(),
            name,
        )
    }

    fn apply(
        &self,
        desired: Typed<'_, NetworkSpec>,
        _observed: &Observed,
        _world: &dyn Lookup,
    ) -> Result<(), DriverError> {
        let (name, spec) = (desired.name(), desired.spec);
        let _span = tracing::info_span!("apply", resource = %desired.id()).entered();
        // The plan's check refuses bad targets; this guards callers that skip the plan,
        // before anything is made.
        check_forward_targets(spec).map_err(DriverError::Refused)?;
        let mut made = Made::default();
        let result = self
            .converge_links(name, spec, &mut made)
            .and_then(|()| self.converge_rules(name, Some(spec)))
            .and_then(|()| self.converge_forwarding(spec));
        if result.is_err() {
            self.undo(name, &made);
        }
        result
    }

    fn marked_on_host(&self) -> Result<Vec<String>, DriverError> {
        let links = self.lock_nl()?.links()?;
        Ok(links
            .into_iter()
            .filter(|l| l.alias.as_deref() == Some(owner_alias(Kind::Network, &l.name).as_str()))
            .map(|l| l.name)
            .collect())
    }

    fn delete(
        &self,
        last_applied: Typed<'_, NetworkSpec>,
        _observed: &Observed,
        _world: &dyn Lookup,
    ) -> Result<(), DriverError> {
        let name = last_applied.name();
        let _span = tracing::info_span!("delete", resource = %last_applied.id()).entered();
        let owner = owner_alias(Kind::Network, name);
        // Rules first: a crash after this leaves a bridge that apply/delete still finds.
        self.converge_rules(name, None)?;
        let mut nl = self.lock_nl()?;
        let links = nl.links()?;
        let Some(br) = links.iter().find(|l| l.name == name) else {
            return Ok(());
        };
        if ownership(br, &owner) == Ownership::Foreign {
            tracing::warn!(bridge = name, "not owned by stead: left alone");
            return Ok(());
        }
        // Our VXLAN port and stead attachments (veths/taps) plugged into the bridge go
        // with it; host ports are just released by the kernel.
        for l in &links {
            let ours_vx = l.alias.as_deref() == Some(owner.as_str()) && l.index != br.index;
            let attachment = l.controller == Some(br.index) && !is_host_port(l);
            if ours_vx || attachment {
                tracing::info!(link = %l.name, "deleting");
                delete_link_index(&mut nl, l.index, &l.name)?;
            }
        }
        tracing::info!(bridge = name, "deleting bridge");
        delete_link_index(&mut nl, br.index, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(addrs: &[&str]) -> NetworkSpec {
        NetworkSpec {
            addresses: addrs.iter().map(|a| a.parse().expect("cidr")).collect(),
            ..NetworkSpec::default()
        }
    }

    fn fwd(to: &str) -> ForwardSpec {
        ForwardSpec {
            protocol: Default::default(),
            host_port: 80,
            to: to.parse().expect("socket addr"),
        }
    }

    #[test]
    fn forward_targets_at_subnet_edges_are_refused_for_every_prefix() {
        // /0 has 32 host bits: the mask must not overflow.
        let s = spec(&["10.1.0.1/0", "10.2.0.1/24", "10.3.0.1/31"]);
        assert!(bad_forward_target(&s, &fwd("0.0.0.0:80")).is_some());
        assert!(bad_forward_target(&s, &fwd("10.2.0.255:80")).is_some());
        assert!(bad_forward_target(&s, &fwd("10.2.0.0:80")).is_some());
        assert!(bad_forward_target(&s, &fwd("10.2.0.7:80")).is_none());
        // A /31 has no network or broadcast address (RFC 3021).
        assert!(bad_forward_target(&spec(&["10.3.0.1/31"]), &fwd("10.3.0.0:80")).is_none());
        assert!(bad_forward_target(&spec(&["10.4.0.1/0"]), &fwd("10.4.0.9:80")).is_none());
    }
}
