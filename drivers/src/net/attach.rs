//! Attachment API for the container and VM drivers: veth pairs and taps plugged into a
//! stead bridge. Synchronous, idempotent, crash-safe (see the module docs of
//! [`crate::net`] for the ownership mark).
//!
//! `host_netns` is the namespace the bridges live in ([`stead_reconciler::driver::HostEnv::netns`]),
//! `None` for the caller's own.

use std::fs::OpenOptions;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_REPLACE};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::link::{BridgeVlanInfoFlags, InfoData, InfoVeth};
use rtnetlink::{LinkBridgeVlan, LinkUnspec, LinkVeth, RouteMessageBuilder};
use stead_reconciler::driver::DriverError;
use stead_schema::{Cidr, MacAddr};

use super::netns::{NetnsRef, run_in};
use super::nl::{Link, Netlink, nl_err};
use super::{
    Ownership, STEAD_LINK_GROUP, claim, create_link, delete_link_index, ownership, set_link,
    sync_addresses,
};

/// The container side of a veth pair.
#[derive(Debug, Clone, Default)]
pub struct VethPeer {
    /// Interface name of the peer (inside its namespace), e.g. `eth0`.
    pub name: String,
    /// Namespace to create the peer in; `None` keeps it beside the host end.
    pub netns: Option<NetnsRef>,
    /// MAC address; kernel-chosen when `None`.
    pub mac: Option<MacAddr>,
    /// Addresses to set on the peer (exactly this set).
    pub addresses: Vec<Cidr>,
    /// Default gateway (a default route via this address on the peer).
    pub gateway: Option<IpAddr>,
    /// Also bring up `lo` in the peer namespace.
    pub loopback_up: bool,
}

/// A veth pair whose host end is enslaved to a bridge.
#[derive(Debug, Clone, Default)]
pub struct VethSpec {
    /// Host-end name (≤ 15 bytes), e.g. `vethweb0`.
    pub host_name: String,
    /// Bridge to enslave the host end to.
    pub bridge: String,
    /// Ownership alias written on both ends, e.g. `stead:Container/web`
    /// (see [`super::owner_alias`]).
    pub owner: String,
    /// MTU of both ends; the bridge's when `None`.
    pub mtu: Option<u32>,
    /// The other end.
    pub peer: VethPeer,
}

/// What [`ensure_veth`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethInfo {
    /// Interface index of the host end.
    pub host_index: u32,
    /// Whether the pair was (re)created by this call.
    pub created: bool,
}

/// A tap device enslaved to a bridge.
#[derive(Debug, Clone, Default)]
pub struct TapSpec {
    /// Tap name (≤ 15 bytes), e.g. `tapvm1i0`.
    pub name: String,
    /// Bridge to enslave to.
    pub bridge: String,
    /// Ownership alias, e.g. `stead:VirtualMachine/vm1`.
    pub owner: String,
    /// MAC address of the host-side tap (not the guest's).
    pub mac: Option<MacAddr>,
    /// MTU; the bridge's when `None`.
    pub mtu: Option<u32>,
    /// Persistent device (survives closing the fd; delete with [`delete_link`]).
    pub persistent: bool,
    /// Return an open queue fd (for the VMM). A non-persistent tap needs this.
    pub want_fd: bool,
    /// `IFF_VNET_HDR`: frames carry a `virtio_net_hdr`.
    pub vnet_hdr: bool,
    /// `TUNSETOWNER` uid, so an unprivileged VMM may open it later.
    pub owner_uid: Option<u32>,
}

/// What [`ensure_tap`] did.
#[derive(Debug)]
pub struct TapInfo {
    /// Interface index.
    pub index: u32,
    /// Whether the device was created by this call.
    pub created: bool,
    /// The queue fd when `want_fd` was set.
    pub fd: Option<OwnedFd>,
}

fn host_ns(host_netns: Option<&Path>) -> Option<NetnsRef> {
    host_netns.map(NetnsRef::from)
}

fn bridge_link(nl: &mut Netlink, bridge: &str) -> Result<Link, DriverError> {
    let b = nl
        .link_by_name(bridge)?
        .ok_or_else(|| DriverError::NotReady(format!("bridge {bridge} does not exist")))?;
    if b.kind.as_deref() != Some("bridge") {
        return Err(DriverError::Conflict(format!(
            "{bridge} is not a bridge (kind {:?})",
            b.kind
        )));
    }
    Ok(b)
}

/// Enslaves `link` to `bridge`, sets MTU and brings it up, when not already so.
fn plug(nl: &mut Netlink, link: &Link, bridge: &Link, mtu: Option<u32>) -> Result<(), DriverError> {
    let mtu = mtu.unwrap_or(bridge.mtu);
    if link.controller == Some(bridge.index) && link.up && link.mtu == mtu {
        return Ok(());
    }
    let mut b = LinkUnspec::new_with_index(link.index).mtu(mtu);
    if link.controller != Some(bridge.index) {
        b = b.controller(bridge.index);
    }
    set_link(nl, b.up().build(), &link.name)
}

/// Creates (or checks) a veth pair: host end `spec.host_name` enslaved to
/// `spec.bridge` and up; peer `spec.peer.name` created directly in `spec.peer.netns`
/// with its MAC, then given its addresses, brought up and given its default route.
/// Re-running converges; a pair whose peer is missing (e.g. the container's namespace
/// was replaced) is recreated.
pub fn ensure_veth(host_netns: Option<&Path>, spec: &VethSpec) -> Result<VethInfo, DriverError> {
    let _span =
        tracing::info_span!("ensure_veth", host = %spec.host_name, owner = %spec.owner).entered();
    let hns = host_ns(host_netns);
    let mut nl = Netlink::open(hns.as_ref())?;
    let bridge = bridge_link(&mut nl, &spec.bridge)?;
    let peer_ns = spec.peer.netns.as_ref().or(hns.as_ref());
    let mut pnl = match &spec.peer.netns {
        Some(ns) => Some(Netlink::open(Some(ns))?),
        None => None,
    };

    let mut created = false;
    let mut host = nl.link_by_name(&spec.host_name)?;
    if let Some(h) = &host {
        claim(&mut nl, h, &spec.owner)?;
        let peer_nl = pnl.as_mut().unwrap_or(&mut nl);
        let peer_ok = match peer_nl.link_by_name(&spec.peer.name)? {
            Some(p) => {
                p.kind.as_deref() == Some("veth")
                    && ownership(&p, &spec.owner) != Ownership::Foreign
            }
            None => false,
        };
        if !peer_ok || h.kind.as_deref() != Some("veth") {
            tracing::info!("peer missing or foreign: recreating the pair");
            delete_link_index(&mut nl, h.index, &spec.host_name)?;
            host = None;
        }
    }
    if host.is_none() {
        // A stale peer of ours with the wanted name in the peer namespace is removed.
        let peer_nl = pnl.as_mut().unwrap_or(&mut nl);
        if let Some(p) = peer_nl.link_by_name(&spec.peer.name)? {
            if ownership(&p, &spec.owner) == Ownership::Foreign {
                return Err(DriverError::Conflict(format!(
                    "interface {} exists in {} and is not owned by {}",
                    spec.peer.name,
                    peer_ns
                        .map(|n| n.to_string())
                        .unwrap_or_else(|| "the current netns".into()),
                    spec.owner
                )));
            }
            delete_link_index(peer_nl, p.index, &spec.peer.name)?;
        }
        let ns_file = match &spec.peer.netns {
            Some(ns) => Some(ns.open()?),
            None => None,
        };
        let mtu = spec.mtu.unwrap_or(bridge.mtu);
        let mut peer = LinkUnspec::new_with_name(&spec.peer.name)
            .link_group(STEAD_LINK_GROUP)
            .mtu(mtu);
        if let Some(mac) = spec.peer.mac {
            peer = peer.address(mac.0.to_vec());
        }
        if let Some(f) = &ns_file {
            peer = peer.setns_by_fd(f.as_raw_fd());
        }
        let msg = LinkVeth::new(&spec.host_name, &spec.peer.name)
            .link_group(STEAD_LINK_GROUP)
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())))
            .build();
        let h = create_link(&mut nl, msg, &spec.host_name, &spec.owner)?;
        created = true;
        host = Some(h);
    }
    let host = host.ok_or_else(|| DriverError::Other("veth host end missing".into()))?;
    let configured = plug(&mut nl, &host, &bridge, spec.mtu)
        .and_then(|()| finish_peer(pnl.as_mut().unwrap_or(&mut nl), spec));
    if let Err(e) = configured {
        if created {
            // A pair this call made is not left half configured (deleting the host
            // end removes the peer too).
            tracing::info!(link = %spec.host_name, "removing the veth pair of a failed attach");
            if let Err(d) = delete_link_index(&mut nl, host.index, &spec.host_name) {
                tracing::warn!(link = %spec.host_name, error = %d, "cannot undo a failed attach");
            }
        }
        return Err(e);
    }
    Ok(VethInfo {
        host_index: host.index,
        created,
    })
}

/// Marks and configures the peer end, inside the peer's namespace.
fn finish_peer(peer_nl: &mut Netlink, spec: &VethSpec) -> Result<(), DriverError> {
    let p = peer_nl.link_by_name(&spec.peer.name)?.ok_or_else(|| {
        DriverError::Other(format!(
            "veth peer {} missing after creation",
            spec.peer.name
        ))
    })?;
    if p.alias.as_deref() != Some(spec.owner.as_str()) {
        set_link(
            peer_nl,
            LinkUnspec::new_with_index(p.index)
                .alias(&spec.owner)
                .build(),
            &spec.peer.name,
        )?;
    }
    configure_peer(peer_nl, &p, &spec.peer)
}

fn configure_peer(nl: &mut Netlink, p: &Link, peer: &VethPeer) -> Result<(), DriverError> {
    if let Some(mac) = peer.mac
        && p.mac.as_deref() != Some(&mac.0[..])
    {
        set_link(
            nl,
            LinkUnspec::new_with_index(p.index)
                .address(mac.0.to_vec())
                .build(),
            &p.name,
        )?;
    }
    let addrs = nl.addresses()?;
    sync_addresses(nl, p.index, &p.name, addrs.get(&p.index), &peer.addresses)?;
    if !p.up {
        set_link(
            nl,
            LinkUnspec::new_with_index(p.index).up().build(),
            &p.name,
        )?;
    }
    if peer.loopback_up
        && let Some(lo) = nl.link_by_name("lo")?
        && !lo.up
    {
        set_link(nl, LinkUnspec::new_with_index(lo.index).up().build(), "lo")?;
    }
    if let Some(gw) = peer.gateway {
        let msg = match gw {
            IpAddr::V4(g) => RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .gateway(g)
                .output_interface(p.index)
                .build(),
            IpAddr::V6(g) => RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .gateway(g)
                .output_interface(p.index)
                .build(),
        };
        nl.ack(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map_err(|e| nl_err(format!("default route via {gw} on {}", p.name), e))?;
    }
    Ok(())
}

/// Deletes link `name` in `host_netns` if it carries alias `owner` (for a veth this
/// removes the peer too). Absent: `Ok(false)`. Owned by someone else: `Conflict`.
pub fn delete_link(
    host_netns: Option<&Path>,
    name: &str,
    owner: &str,
) -> Result<bool, DriverError> {
    let hns = host_ns(host_netns);
    let mut nl = Netlink::open(hns.as_ref())?;
    let Some(l) = nl.link_by_name(name)? else {
        return Ok(false);
    };
    if ownership(&l, owner) == Ownership::Foreign {
        return Err(DriverError::Conflict(format!(
            "refusing to delete {name}: not owned by {owner} (alias {:?})",
            l.alias
        )));
    }
    tracing::info!(link = name, owner, "deleting link");
    delete_link_index(&mut nl, l.index, name)?;
    Ok(true)
}

/// The alias of every link in `host_netns` that has one, by link name (one dump, for
/// callers that check many owners).
pub fn link_aliases(
    host_netns: Option<&Path>,
) -> Result<std::collections::BTreeMap<String, String>, DriverError> {
    let hns = host_ns(host_netns);
    let mut nl = Netlink::open(hns.as_ref())?;
    Ok(nl
        .links()?
        .into_iter()
        .filter_map(|l| Some((l.name, l.alias?)))
        .collect())
}

/// Links carrying alias `owner` in `host_netns`, by name (to find leftovers).
pub fn owned_links(host_netns: Option<&Path>, owner: &str) -> Result<Vec<String>, DriverError> {
    let hns = host_ns(host_netns);
    let mut nl = Netlink::open(hns.as_ref())?;
    Ok(nl
        .links()?
        .into_iter()
        .filter(|l| l.alias.as_deref() == Some(owner))
        .map(|l| l.name)
        .collect())
}

// ------------------------------------------------------------------ tap

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_PERSIST: libc::c_short = 0x0800;
const IFF_VNET_HDR: libc::c_short = 0x4000;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A TUN ioctl that reads and/or writes a `struct ifreq` (`TUNSETIFF`, `TUNGETIFF`).
fn tun_ifreq(fd: &impl AsRawFd, request: libc::c_ulong, req: &mut IfReq) -> std::io::Result<()> {
    // SAFETY: TUNSETIFF and TUNGETIFF read and write a struct ifreq, which IfReq matches
    // in size and layout; `req` lives for the call and `fd` is an open tun fd. Neither
    // nix nor rustix wraps the TUN ioctls.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request, req as *mut IfReq) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `TUNSETIFF` on an open `/dev/net/tun`: makes `fd` a queue of tap `name` (no packet
/// info; virtio-net headers when `vnet_hdr`), creating the tap when the name is free.
pub(crate) fn tun_set_iff(fd: &impl AsRawFd, name: &str, vnet_hdr: bool) -> std::io::Result<()> {
    let n = name.as_bytes();
    if n.is_empty() || n.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("bad tap name {name:?}"),
        ));
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | if vnet_hdr { IFF_VNET_HDR } else { 0 },
        _pad: [0; 22],
    };
    req.name[..n.len()].copy_from_slice(n);
    tun_ifreq(fd, TUNSETIFF, &mut req)
}

/// Whether the tap behind the queue `fd` is persistent (`TUNGETIFF`): a tap that
/// [`tun_set_iff`] just made is not, and goes away with its last queue.
pub(crate) fn tun_is_persistent(fd: &impl AsRawFd) -> std::io::Result<bool> {
    let mut got = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    tun_ifreq(fd, TUNGETIFF, &mut got)?;
    Ok(got.flags & IFF_PERSIST != 0)
}

/// Opens `/dev/net/tun` (in the current thread's netns) and attaches to or creates tap
/// `name`.
fn tun_open(spec: &TapSpec) -> Result<OwnedFd, DriverError> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| DriverError::io("open /dev/net/tun", e))?;
    let n = spec.name.as_bytes();
    if n.is_empty() || n.len() >= libc::IFNAMSIZ {
        return Err(DriverError::Refused(format!(
            "bad tap name {:?}",
            spec.name
        )));
    }
    tun_set_iff(&f, &spec.name, spec.vnet_hdr)
        .map_err(|e| DriverError::io(format!("TUNSETIFF {}", spec.name), e))?;
    if let Some(uid) = spec.owner_uid {
        // SAFETY: TUNSETOWNER takes an integer argument by value; `f` is an open tun fd.
        // No safe wrapper exists.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETOWNER, uid as libc::c_ulong) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return Err(DriverError::io(format!("TUNSETOWNER {}", spec.name), e));
        }
    }
    Ok(OwnedFd::from(f))
}

/// Makes the tap behind `fd` persistent (after it carries stead's marks, so a crash
/// before this point leaves nothing behind: the tap dies with the fd).
pub(crate) fn tun_persist(fd: &impl AsRawFd, name: &str) -> Result<(), DriverError> {
    // SAFETY: TUNSETPERSIST takes an integer argument by value; `fd` is an open tun fd.
    // No safe wrapper exists.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return Err(DriverError::io(format!("TUNSETPERSIST {name}"), e));
    }
    Ok(())
}

/// Creates (or reattaches to) tap `spec.name`, marks it, enslaves it to `spec.bridge`
/// and brings it up. With `want_fd` the open queue fd is returned (the tap lives while
/// it is open unless `persistent`).
pub fn ensure_tap(host_netns: Option<&Path>, spec: &TapSpec) -> Result<TapInfo, DriverError> {
    let _span = tracing::info_span!("ensure_tap", tap = %spec.name, owner = %spec.owner).entered();
    if !spec.persistent && !spec.want_fd {
        return Err(DriverError::Refused(format!(
            "tap {}: a non-persistent tap without a returned fd would vanish at once",
            spec.name
        )));
    }
    let hns = host_ns(host_netns);
    let mut nl = Netlink::open(hns.as_ref())?;
    let bridge = bridge_link(&mut nl, &spec.bridge)?;
    let existing = nl.link_by_name(&spec.name)?;
    let mut created = false;
    let mut fd = None;
    let link = match existing {
        Some(l) => {
            claim(&mut nl, &l, &spec.owner)?;
            if l.kind.as_deref() != Some("tun") {
                return Err(DriverError::Conflict(format!(
                    "{} exists but is a {:?}, not a tap",
                    spec.name, l.kind
                )));
            }
            if spec.want_fd {
                fd = Some(run_in(hns.as_ref(), || tun_open(spec))?);
            }
            l
        }
        None => {
            let f = run_in(hns.as_ref(), || tun_open(spec))?;
            created = true;
            let l = nl.link_by_name(&spec.name)?.ok_or_else(|| {
                DriverError::Other(format!("tap {} missing after TUNSETIFF", spec.name))
            })?;
            // Mark first (group, then alias), as for netlink-created links.
            set_link(
                &mut nl,
                LinkUnspec::new_with_index(l.index)
                    .link_group(STEAD_LINK_GROUP)
                    .alias(&spec.owner)
                    .build(),
                &spec.name,
            )?;
            if spec.persistent {
                tun_persist(&f, &spec.name)?;
            }
            if spec.want_fd {
                fd = Some(f);
            }
            l
        }
    };
    if let Some(mac) = spec.mac
        && link.mac.as_deref() != Some(&mac.0[..])
    {
        set_link(
            &mut nl,
            LinkUnspec::new_with_index(link.index)
                .address(mac.0.to_vec())
                .build(),
            &spec.name,
        )?;
    }
    plug(&mut nl, &link, &bridge, spec.mtu)?;
    Ok(TapInfo {
        index: link.index,
        created,
        fd,
    })
}

// ------------------------------------------------------------------ VLAN

/// Puts bridge port `port` (a veth host end or tap) into VLAN `vid` as its PVID,
/// untagged (`bridge vlan add dev PORT vid VID pvid untagged`), for interfaces with
/// `vlan:` on a `vlanAware` network. Kernels without bridge VLAN filtering answer
/// [`DriverError::Unsupported`].
pub fn set_port_vlan(host_netns: Option<&Path>, port: &str, vid: u16) -> Result<(), DriverError> {
    if !(1..=4094).contains(&vid) {
        return Err(DriverError::Refused(format!(
            "VLAN id {vid} is outside 1..4094"
        )));
    }
    let hns = host_ns(host_netns);
    let mut nl = Netlink::open(hns.as_ref())?;
    let l = nl
        .link_by_name(port)?
        .ok_or_else(|| DriverError::NotReady(format!("port {port} does not exist")))?;
    let msg = LinkBridgeVlan::new(l.index)
        .vlan(
            vid,
            BridgeVlanInfoFlags::Pvid | BridgeVlanInfoFlags::Untagged,
        )
        .build();
    match nl.ack(RouteNetlinkMessage::SetLink(msg), 0) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Err(DriverError::Unsupported(
            format!("kernel lacks bridge VLAN filtering (vlan {vid} on {port})"),
        )),
        Err(e) => Err(nl_err(format!("set vlan {vid} on {port}"), e)),
    }
}
