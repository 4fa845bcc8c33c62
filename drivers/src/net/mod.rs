//! Networking: Linux bridges (`Network`), VXLAN overlays, NAT and port forwards in an
//! nftables table stead owns, bonds (`Bond`), and the attachment API the container and
//! VM drivers use to plug veth pairs and taps into bridges.
//!
//! Everything talks to the kernel over netlink in-process ([`nl`]), inside the network
//! namespace named by [`stead_reconciler::driver::HostEnv::netns`] when set. nftables is driven
//! through the `nft` binary with JSON (the `nftables` crate's schema), run inside the
//! same namespace.
//!
//! Ownership: every link stead creates carries `IFLA_IFALIAS` = `stead:<Kind>/<name>`.
//! Because the kernel ignores `IFLA_IFALIAS` in `RTM_NEWLINK`, links are created with
//! `IFLA_GROUP` = [`STEAD_LINK_GROUP`] (honoured at creation) and get their alias right
//! after; a link in that group without an alias is one stead created and crashed
//! before marking, and is adopted. Anything else without the alias is never touched.

pub mod attach;
pub mod bond;
pub mod netns;
mod network;
mod nft;
pub(crate) mod nl;

use std::net::IpAddr;

pub use bond::BondDriver;
pub use netns::NetnsRef;
pub use network::{NetworkDriver, vxlan_link_name};

use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::link::LinkMessage;
use rtnetlink::{AddressMessageBuilder, LinkUnspec};
use stead_reconciler::driver::DriverError;
use stead_schema::{Cidr, Kind};

use nl::{Addr, Link, Netlink, nl_err};

/// Prefix of every ownership alias.
pub const ALIAS_PREFIX: &str = "stead:";

/// `IFLA_GROUP` given to links at creation, before their alias is set (crash safety).
pub const STEAD_LINK_GROUP: u32 = 0x57EAD;

/// The ownership alias of a link created for resource `kind/name`: `stead:Kind/name`.
pub fn owner_alias(kind: Kind, name: &str) -> String {
    format!("{ALIAS_PREFIX}{kind}/{name}")
}

/// How a link relates to the resource that wants it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ownership {
    /// Carries the expected alias.
    Owned,
    /// Created by stead (group mark) but the alias was never written.
    HalfCreated,
    /// Someone else's (or another resource's).
    Foreign,
}

pub(crate) fn ownership(link: &Link, alias: &str) -> Ownership {
    match link.alias.as_deref() {
        Some(a) if a == alias => Ownership::Owned,
        None | Some("") if link.group == STEAD_LINK_GROUP => Ownership::HalfCreated,
        _ => Ownership::Foreign,
    }
}

/// Errors out unless `link` is (or may be adopted as) owned by `alias`; writes the alias
/// of a half-created link.
pub(crate) fn claim(nl: &mut Netlink, link: &Link, alias: &str) -> Result<(), DriverError> {
    match ownership(link, alias) {
        Ownership::Owned => Ok(()),
        Ownership::HalfCreated => {
            tracing::info!(link = %link.name, alias, "adopting half-created link");
            set_link(
                nl,
                LinkUnspec::new_with_index(link.index).alias(alias).build(),
                &link.name,
            )
        }
        Ownership::Foreign => Err(DriverError::Conflict(format!(
            "interface {} exists and is not owned by stead ({}); expected alias {alias:?}",
            link.name,
            match &link.alias {
                Some(a) => format!("alias {a:?}"),
                None => "no alias".into(),
            }
        ))),
    }
}

/// RTM_NEWLINK without create flags: change an existing link.
pub(crate) fn set_link(nl: &mut Netlink, msg: LinkMessage, what: &str) -> Result<(), DriverError> {
    nl.ack(RouteNetlinkMessage::SetLink(msg), 0)
        .map_err(|e| nl_err(format!("set link {what}"), e))
}

/// RTM_NEWLINK with `NLM_F_CREATE|NLM_F_EXCL`; returns the new link.
pub(crate) fn create_link(
    nl: &mut Netlink,
    msg: LinkMessage,
    name: &str,
    alias: &str,
) -> Result<Link, DriverError> {
    nl.ack(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL)
        .map_err(|e| {
            let unsupported = matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::ENODEV) | Some(libc::EAFNOSUPPORT)
            );
            if unsupported {
                DriverError::Unsupported(format!("create {name}: kernel refused: {e}"))
            } else {
                nl_err(format!("create link {name}"), e)
            }
        })?;
    let link = nl
        .link_by_name(name)?
        .ok_or_else(|| DriverError::Other(format!("link {name} vanished after creation")))?;
    set_link(
        nl,
        LinkUnspec::new_with_index(link.index).alias(alias).build(),
        name,
    )?;
    Ok(Link {
        alias: Some(alias.to_string()),
        ..link
    })
}

/// RTM_DELLINK by index; an absent link is success.
pub(crate) fn delete_link_index(
    nl: &mut Netlink,
    index: u32,
    name: &str,
) -> Result<(), DriverError> {
    let mut m = LinkMessage::default();
    m.header.index = index;
    match nl.ack(RouteNetlinkMessage::DelLink(m), 0) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
        Err(e) => Err(nl_err(format!("delete link {name}"), e)),
    }
}

/// Whether an address is managed by the kernel itself (IPv6 link-local).
fn kernel_managed(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

/// The non-link-local addresses of a link, as sorted CIDR strings.
pub(crate) fn addr_strings(addrs: Option<&Vec<Addr>>) -> Vec<String> {
    let mut v: Vec<String> = addrs
        .map(|a| {
            a.iter()
                .filter(|a| !kernel_managed(&a.ip))
                .map(|a| format!("{}/{}", a.ip, a.prefix))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v.dedup();
    v
}

fn address_message(index: u32, c: &Cidr) -> rtnetlink::packet_route::address::AddressMessage {
    match c.addr {
        IpAddr::V4(a) => AddressMessageBuilder::<std::net::Ipv4Addr>::new()
            .index(index)
            .address(a, c.prefix)
            .build(),
        IpAddr::V6(a) => AddressMessageBuilder::<std::net::Ipv6Addr>::new()
            .index(index)
            .address(a, c.prefix)
            .build(),
    }
}

/// Makes the link's addresses exactly `desired` (IPv6 link-local ones are left alone).
pub(crate) fn sync_addresses(
    nl: &mut Netlink,
    index: u32,
    name: &str,
    current: Option<&Vec<Addr>>,
    desired: &[Cidr],
) -> Result<(), DriverError> {
    let cur: Vec<Addr> = current
        .map(|v| {
            v.iter()
                .filter(|a| !kernel_managed(&a.ip))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    for a in &cur {
        if !desired
            .iter()
            .any(|d| d.addr == a.ip && d.prefix == a.prefix)
        {
            let c = Cidr {
                addr: a.ip,
                prefix: a.prefix,
            };
            tracing::info!(link = name, address = %c, "removing address");
            match nl.ack(
                RouteNetlinkMessage::DelAddress(address_message(index, &c)),
                0,
            ) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {}
                Err(e) => return Err(nl_err(format!("remove address {c} from {name}"), e)),
            }
        }
    }
    for d in desired {
        if !cur.iter().any(|a| d.addr == a.ip && d.prefix == a.prefix) {
            tracing::info!(link = name, address = %d, "adding address");
            match nl.ack(
                RouteNetlinkMessage::NewAddress(address_message(index, d)),
                NLM_F_CREATE | NLM_F_EXCL,
            ) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(nl_err(format!("add address {d} to {name}"), e)),
            }
        }
    }
    Ok(())
}
