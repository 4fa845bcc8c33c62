//! A small synchronous rtnetlink client.
//!
//! The driver trait is sync, so instead of running rtnetlink's tokio connection we send
//! the same messages (built with rtnetlink's builders and `netlink-packet-route` types)
//! over a blocking `netlink-sys` socket. That also lets us count round trips exactly
//! (the benchmark reports them) and bind the socket to a network namespace by creating
//! it on a thread that entered the namespace.

use std::collections::BTreeMap;
use std::io;
use std::net::IpAddr;

use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoBridge, InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use stead_reconciler::driver::DriverError;

use super::netns::{NetnsRef, run_in};

/// A blocking NETLINK_ROUTE socket bound to one network namespace.
#[derive(Debug)]
pub(crate) struct Netlink {
    sock: Socket,
    seq: u32,
    /// Requests sent (each answered by one reply or one dump): the round trips.
    pub(crate) round_trips: u64,
}

/// A netlink error with the kernel's errno.
pub(crate) fn nl_err(context: impl Into<String>, e: io::Error) -> DriverError {
    DriverError::io(context, e)
}

impl Netlink {
    /// Opens a socket in `ns` (the caller's namespace when `None`).
    pub(crate) fn open(ns: Option<&NetnsRef>) -> Result<Self, DriverError> {
        let sock = run_in(ns, || {
            let mut s =
                Socket::new(NETLINK_ROUTE).map_err(|e| nl_err("open NETLINK_ROUTE socket", e))?;
            s.bind_auto()
                .map_err(|e| nl_err("bind netlink socket", e))?;
            s.connect(&SocketAddr::new(0, 0))
                .map_err(|e| nl_err("connect netlink socket", e))?;
            // Extended acks give readable messages; failure to enable them is harmless.
            let _ = s.set_ext_ack(true);
            let _ = s.set_rx_buf_sz(1 << 20);
            Ok(s)
        })?;
        Ok(Netlink {
            sock,
            seq: 0,
            round_trips: 0,
        })
    }

    fn send(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<u32, io::Error> {
        self.seq = self.seq.wrapping_add(1);
        let mut m =
            NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::InnerMessage(msg));
        m.header.flags = flags;
        m.header.sequence_number = self.seq;
        m.finalize();
        let mut buf = vec![0u8; m.buffer_len()];
        m.serialize(&mut buf);
        self.round_trips += 1;
        self.sock.send(&buf, 0)?;
        Ok(self.seq)
    }

    /// Sends `msg` and collects every reply until DONE or the ack.
    fn exchange(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, io::Error> {
        let seq = self.send(msg, flags)?;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut out = Vec::new();
        loop {
            let (buf, _) = self.sock.recv_from_full()?;
            let mut off = 0usize;
            while off + 16 <= buf.len() {
                let len = u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]])
                    as usize;
                if len < 16 || off + len > buf.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "truncated netlink message",
                    ));
                }
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[off..off + len])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                off += (len + 3) & !3;
                if msg.header.sequence_number != seq {
                    continue; // a stale reply of an earlier, failed exchange
                }
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => {
                        if e.code.is_none() {
                            // An ack. Dumps end with DONE, requests with the ack.
                            if !dump {
                                return Ok(out);
                            }
                        } else {
                            return Err(e.to_io());
                        }
                    }
                    NetlinkPayload::InnerMessage(m) => {
                        out.push(m);
                        if !dump && flags & NLM_F_ACK == 0 {
                            return Ok(out);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// A dump request (`NLM_F_DUMP`).
    pub(crate) fn dump(
        &mut self,
        msg: RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, io::Error> {
        self.exchange(msg, NLM_F_REQUEST | NLM_F_DUMP)
    }

    /// A change request acknowledged by the kernel; `extra` adds `NLM_F_CREATE` & co.
    pub(crate) fn ack(&mut self, msg: RouteNetlinkMessage, extra: u16) -> Result<(), io::Error> {
        self.exchange(msg, NLM_F_REQUEST | NLM_F_ACK | extra)
            .map(|_| ())
    }

    /// Dumps every link.
    pub(crate) fn links(&mut self) -> Result<Vec<Link>, DriverError> {
        let msgs = self
            .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))
            .map_err(|e| nl_err("dump links", e))?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(Link::from_msg(&l)),
                _ => None,
            })
            .collect())
    }

    /// One link by name (a GETLINK with IFLA_IFNAME), `None` when absent.
    pub(crate) fn link_by_name(&mut self, name: &str) -> Result<Option<Link>, DriverError> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.exchange(RouteNetlinkMessage::GetLink(m), NLM_F_REQUEST) {
            Ok(v) => Ok(v.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(Link::from_msg(&l)),
                _ => None,
            })),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(nl_err(format!("get link {name}"), e)),
        }
    }

    /// Dumps every address, grouped by interface index.
    pub(crate) fn addresses(&mut self) -> Result<BTreeMap<u32, Vec<Addr>>, DriverError> {
        let msgs = self
            .dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))
            .map_err(|e| nl_err("dump addresses", e))?;
        let mut out: BTreeMap<u32, Vec<Addr>> = BTreeMap::new();
        for m in msgs {
            if let RouteNetlinkMessage::NewAddress(a) = m
                && let Some(addr) = Addr::from_msg(&a)
            {
                out.entry(a.header.index).or_default().push(addr);
            }
        }
        Ok(out)
    }
}

/// An interface address as dumped.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Addr {
    /// The address (IFA_LOCAL for IPv4, IFA_ADDRESS for IPv6).
    pub(crate) ip: IpAddr,
    /// Prefix length.
    pub(crate) prefix: u8,
}

impl Addr {
    fn from_msg(a: &AddressMessage) -> Option<Addr> {
        let mut local = None;
        let mut address = None;
        for at in &a.attributes {
            match at {
                AddressAttribute::Local(ip) => local = Some(*ip),
                AddressAttribute::Address(ip) => address = Some(*ip),
                _ => {}
            }
        }
        let ip = local.or(address)?;
        Some(Addr {
            ip,
            prefix: a.header.prefix_len,
        })
    }
}

/// The parts of a link the drivers look at.
#[derive(Debug, Clone, Default)]
pub(crate) struct Link {
    pub(crate) index: u32,
    pub(crate) name: String,
    pub(crate) alias: Option<String>,
    pub(crate) mtu: u32,
    pub(crate) up: bool,
    pub(crate) controller: Option<u32>,
    pub(crate) kind: Option<String>,
    pub(crate) mac: Option<Vec<u8>>,
    /// IFLA_GROUP (stead marks links it creates, see [`super::STEAD_LINK_GROUP`]).
    pub(crate) group: u32,
    /// VXLAN id, local address, UDP port (vxlan links only).
    pub(crate) vxlan: Option<(u32, Option<IpAddr>, u16)>,
    /// Bridge VLAN filtering (bridges only).
    pub(crate) vlan_filtering: Option<bool>,
}

impl Link {
    pub(crate) fn from_msg(m: &LinkMessage) -> Link {
        let mut l = Link {
            index: m.header.index,
            up: m.header.flags.contains(LinkFlags::Up),
            ..Link::default()
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => l.name = n.clone(),
                LinkAttribute::IfAlias(s) => l.alias = Some(s.clone()),
                LinkAttribute::Mtu(v) => l.mtu = *v,
                LinkAttribute::Controller(c) if *c != 0 => l.controller = Some(*c),
                LinkAttribute::Address(mac) => l.mac = Some(mac.clone()),
                LinkAttribute::Group(g) => l.group = *g,
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        match i {
                            LinkInfo::Kind(k) => l.kind = Some(kind_name(k)),
                            LinkInfo::Data(InfoData::Vxlan(v)) => {
                                let (mut id, mut local, mut port) = (0, None, 4789);
                                for x in v {
                                    match x {
                                        InfoVxlan::Id(i) => id = *i,
                                        InfoVxlan::Local(a) => local = Some(IpAddr::V4(*a)),
                                        InfoVxlan::Local6(a) => local = Some(IpAddr::V6(*a)),
                                        InfoVxlan::Port(p) => port = *p,
                                        _ => {}
                                    }
                                }
                                l.vxlan = Some((id, local, port));
                            }
                            LinkInfo::Data(InfoData::Bridge(b)) => {
                                for x in b {
                                    if let InfoBridge::VlanFiltering(f) = x {
                                        l.vlan_filtering = Some(*f);
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        l
    }
}

/// The kernel's kind string (`bridge`, `veth`, `tun`, `vxlan`, `bond`, …).
pub(crate) fn kind_name(k: &InfoKind) -> String {
    k.to_string()
}
