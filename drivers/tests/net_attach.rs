//! Attachment API: veth pairs into other namespaces, taps, idempotence, ownership.
#![allow(clippy::unwrap_used)]

mod net_util;

use std::net::IpAddr;

use net_util::{Netns, can_run};
use stead_drivers::net::attach::{
    TapSpec, VethPeer, VethSpec, delete_link, ensure_tap, ensure_veth, owned_links,
};
use stead_drivers::net::{NetnsRef, owner_alias};
use stead_reconciler::driver::DriverError;
use stead_schema::Kind;

fn bridge(ns: &Netns, name: &str, addr: &str) {
    ns.ip(&["link", "add", name, "type", "bridge"]);
    ns.ip(&["addr", "add", addr, "dev", name]);
    ns.ip(&["link", "set", name, "up"]);
}

#[test]
fn net_attach_veth_into_netns_is_idempotent_and_pings() {
    if let Some(r) = can_run() {
        eprintln!("SKIP net_attach_veth_into_netns_is_idempotent_and_pings: {r}");
        return;
    }
    let host = Netns::new();
    let ct = Netns::new();
    bridge(&host, "br0", "10.99.0.1/24");
    let owner = owner_alias(Kind::Container, "web");
    let spec = VethSpec {
        host_name: "vweb0".into(),
        bridge: "br0".into(),
        owner: owner.clone(),
        mtu: None,
        peer: VethPeer {
            name: "eth0".into(),
            netns: Some(NetnsRef::Path(ct.path())),
            mac: Some("52:54:00:aa:00:01".parse().unwrap()),
            addresses: vec!["10.99.0.2/24".parse().unwrap()],
            gateway: Some("10.99.0.1".parse::<IpAddr>().unwrap()),
            loopback_up: true,
        },
    };
    let info = ensure_veth(Some(&host.path()), &spec).unwrap();
    assert!(info.created);

    let h = host.link("vweb0").expect("host end");
    assert_eq!(h["master"], "br0");
    assert_eq!(h["ifalias"], owner.as_str());
    let p = ct.link("eth0").expect("peer in ct netns");
    assert_eq!(p["address"], "52:54:00:aa:00:01");
    assert_eq!(p["ifalias"], owner.as_str());
    let addrs = ct.ip(&["-4", "-o", "addr", "show", "dev", "eth0"]);
    assert!(addrs.contains("10.99.0.2/24"), "{addrs}");
    let routes = ct.ip(&["route", "show", "default"]);
    assert!(routes.contains("via 10.99.0.1"), "{routes}");
    let (ok, out) = ct.exec(&["ping", "-c1", "-W2", "10.99.0.1"]);
    assert!(ok, "ping across the bridge: {out}");

    // Second run: nothing to create; a hand-removed address comes back.
    ct.ip(&["addr", "flush", "dev", "eth0"]);
    let again = ensure_veth(Some(&host.path()), &spec).unwrap();
    assert!(!again.created);
    assert_eq!(again.host_index, info.host_index);
    let addrs = ct.ip(&["-4", "-o", "addr", "show", "dev", "eth0"]);
    assert!(addrs.contains("10.99.0.2/24"), "{addrs}");

    assert_eq!(
        owned_links(Some(&host.path()), &owner).unwrap(),
        vec!["vweb0".to_string()]
    );
    assert!(delete_link(Some(&host.path()), "vweb0", &owner).unwrap());
    assert!(host.link("vweb0").is_none());
    assert!(ct.link("eth0").is_none(), "peer goes with the host end");
    assert!(!delete_link(Some(&host.path()), "vweb0", &owner).unwrap());
}

#[test]
fn net_attach_refuses_foreign_links() {
    if let Some(r) = can_run() {
        eprintln!("SKIP net_attach_refuses_foreign_links: {r}");
        return;
    }
    let host = Netns::new();
    bridge(&host, "br0", "10.98.0.1/24");
    host.ip(&[
        "link",
        "add",
        "vforeign",
        "type",
        "veth",
        "peer",
        "name",
        "vforeignp",
    ]);
    let owner = owner_alias(Kind::Container, "x");
    let err = delete_link(Some(&host.path()), "vforeign", &owner).unwrap_err();
    assert!(matches!(err, DriverError::Conflict(_)), "{err}");
    let spec = VethSpec {
        host_name: "vforeign".into(),
        bridge: "br0".into(),
        owner,
        peer: VethPeer {
            name: "vfp2".into(),
            ..VethPeer::default()
        },
        ..VethSpec::default()
    };
    let err = ensure_veth(Some(&host.path()), &spec).unwrap_err();
    assert!(matches!(err, DriverError::Conflict(_)), "{err}");
    assert!(host.link("vforeign").is_some(), "foreign link untouched");
    // Missing bridge: not ready (retryable).
    let spec2 = VethSpec {
        host_name: "vnew".into(),
        bridge: "nobr".into(),
        ..spec
    };
    let err = ensure_veth(Some(&host.path()), &spec2).unwrap_err();
    assert!(matches!(err, DriverError::NotReady(_)), "{err}");
}

#[test]
fn net_attach_tap_persistent_and_fd() {
    if let Some(r) = can_run() {
        eprintln!("SKIP net_attach_tap_persistent_and_fd: {r}");
        return;
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("SKIP net_attach_tap_persistent_and_fd: no /dev/net/tun");
        return;
    }
    let host = Netns::new();
    bridge(&host, "br0", "10.97.0.1/24");
    let owner = owner_alias(Kind::VirtualMachine, "vm1");
    let spec = TapSpec {
        name: "tapvm1".into(),
        bridge: "br0".into(),
        owner: owner.clone(),
        mac: Some("52:54:00:bb:00:01".parse().unwrap()),
        persistent: true,
        vnet_hdr: true,
        ..TapSpec::default()
    };
    let t = ensure_tap(Some(&host.path()), &spec).unwrap();
    assert!(t.created && t.fd.is_none());
    let l = host.link("tapvm1").expect("tap exists");
    assert_eq!(l["master"], "br0");
    assert_eq!(l["ifalias"], owner.as_str());
    assert_eq!(l["address"], "52:54:00:bb:00:01");
    assert_eq!(l["linkinfo"]["info_kind"], "tun");
    // Idempotent; reattach with an fd.
    let t2 = ensure_tap(
        Some(&host.path()),
        &TapSpec {
            want_fd: true,
            ..spec.clone()
        },
    )
    .unwrap();
    assert!(!t2.created && t2.fd.is_some());
    assert_eq!(t2.index, t.index);
    drop(t2);
    assert!(
        host.link("tapvm1").is_some(),
        "persistent tap survives its fd"
    );
    assert!(delete_link(Some(&host.path()), "tapvm1", &owner).unwrap());
    assert!(host.link("tapvm1").is_none());

    // Non-persistent: lives exactly as long as the fd.
    let t3 = ensure_tap(
        Some(&host.path()),
        &TapSpec {
            name: "tapvm1b".into(),
            persistent: false,
            want_fd: true,
            ..spec
        },
    )
    .unwrap();
    assert!(t3.created && t3.fd.is_some());
    assert_eq!(host.link("tapvm1b").expect("tap")["master"], "br0");
    drop(t3);
    assert!(
        host.link("tapvm1b").is_none(),
        "closing the fd removes the tap"
    );
}
