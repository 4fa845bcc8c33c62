//! Container networking: one veth pair per interface, host end on the Network's bridge
//! (in `--netns` when set), peer created directly in the container's network namespace
//! with its name, MAC, address and default route; loopback brought up. Uses
//! [`crate::net::attach::ensure_veth`] (netlink, no `ip` commands).
//!
//! The pair lives exactly as long as the container's network namespace: when init dies
//! the namespace goes and the kernel deletes both ends, so a stopped or crashed container
//! leaves no veth behind. [`detach`] removes a host end that is still there (owned ones only).

use nix::unistd::Pid;
use rtnetlink::LinkUnspec;
use rtnetlink::packet_route::RouteNetlinkMessage;
use stead_reconciler::driver::DriverError;
use stead_schema::Kind;

use super::config::ContainerConfig;
use crate::net::NetnsRef;
use crate::net::attach::{VethPeer, VethSpec, delete_link, ensure_veth};
use crate::net::nl::Netlink;

/// Ownership alias of container `name`'s links.
pub fn owner(name: &str) -> String {
    crate::net::owner_alias(Kind::Container, name)
}

/// Creates and configures the interfaces of `cfg` for the container whose init is `pid`.
/// With no interfaces there is nothing to do here: init brings up its loopback itself
/// ([`loopback_up_here`]).
pub(crate) fn attach(cfg: &ContainerConfig, pid: Pid) -> Result<(), DriverError> {
    let _span = tracing::info_span!("container_net", container = %cfg.name).entered();
    if cfg.interfaces.is_empty() {
        return Ok(());
    }
    let owner = owner(&cfg.name);
    for (i, ifc) in cfg.interfaces.iter().enumerate() {
        let spec = VethSpec {
            host_name: ifc.host_name.clone(),
            bridge: ifc.bridge.clone(),
            owner: owner.clone(),
            mtu: None,
            peer: VethPeer {
                name: ifc.name.clone(),
                netns: Some(NetnsRef::Pid(pid.as_raw() as u32)),
                mac: ifc.mac,
                addresses: ifc.address.into_iter().collect(),
                gateway: ifc.gateway,
                loopback_up: i == 0,
            },
        };
        ensure_veth(cfg.host_netns.as_deref(), &spec)?;
    }
    Ok(())
}

/// Brings up `lo` in the caller's network namespace: a veth-less container's init does
/// this itself before it execs, while the shim attaches it to its cgroup. (Done from the
/// shim it took a thread entering the container's netns, on the start's critical path.)
pub(crate) fn loopback_up_here() -> Result<(), DriverError> {
    let mut nl = Netlink::open(None)?;
    let lo = nl
        .link_by_name("lo")?
        .ok_or_else(|| DriverError::Other("the container's netns has no lo".into()))?;
    let up = LinkUnspec::new_with_index(lo.index).up().build();
    nl.ack(RouteNetlinkMessage::SetLink(up), 0)
        .map_err(|e| DriverError::io("bring up lo", e))
}

/// Deletes host ends of `cfg`'s veth pairs that are still present (normally the kernel
/// already removed them with the namespace). Only links carrying the container's alias.
pub fn detach(cfg: &ContainerConfig) -> Result<(), DriverError> {
    let owner = owner(&cfg.name);
    for ifc in &cfg.interfaces {
        delete_link(cfg.host_netns.as_deref(), &ifc.host_name, &owner)?;
    }
    Ok(())
}
