//! VXLAN overlay: two "hosts" (namespaces) joined by a veth underlay, each with a
//! `type: vxlan` Network applied through the driver; a guest namespace plugged into each
//! bridge (attach API) pings the other across the overlay.
#![allow(clippy::unwrap_used)]

mod net_util;

use net_util::*;
use serde_json::json;
use stead_drivers::net::attach::{VethPeer, VethSpec, ensure_veth};
use stead_drivers::net::{NetnsRef, NetworkDriver, owner_alias, vxlan_link_name};
use stead_schema::Kind;

fn guest(host: &Netns, g: &Netns, veth: &str, addr: &str) {
    ensure_veth(
        Some(&host.path()),
        &VethSpec {
            host_name: veth.into(),
            bridge: "ov0".into(),
            owner: owner_alias(Kind::Container, veth),
            peer: VethPeer {
                name: "eth0".into(),
                netns: Some(NetnsRef::Path(g.path())),
                addresses: vec![addr.parse().unwrap()],
                loopback_up: true,
                ..VethPeer::default()
            },
            ..VethSpec::default()
        },
    )
    .unwrap();
}

#[test]
fn net_vxlan_overlay_joins_two_hosts() {
    if let Some(r) = can_run() {
        eprintln!("SKIP net_vxlan_overlay_joins_two_hosts: {r}");
        return;
    }
    let a = Netns::new();
    let b = Netns::new();
    a.ip(&[
        "link", "add", "under", "type", "veth", "peer", "name", "under", "netns", &b.name,
    ]);
    a.ip(&["addr", "add", "10.201.0.1/24", "dev", "under"]);
    b.ip(&["addr", "add", "10.201.0.2/24", "dev", "under"]);
    a.ip(&["link", "set", "under", "up"]);
    b.ip(&["link", "set", "under", "up"]);

    let net = |local: &str, remote: &str| {
        resource(
            Kind::Network,
            "ov0",
            json!({"type": "vxlan", "addresses": [],
                   "vxlan": {"vni": 4242, "local": local, "remotes": [remote], "port": 4789}}),
        )
    };
    let na = net("10.201.0.1", "10.201.0.2");
    let nb = net("10.201.0.2", "10.201.0.1");
    let da = NetworkDriver::new(&env(&a)).unwrap();
    let db = NetworkDriver::new(&env(&b)).unwrap();
    apply(&da, &na).unwrap();
    apply(&db, &nb).unwrap();
    assert_converged(&da, &na);
    assert_converged(&db, &nb);

    let vx = vxlan_link_name("ov0", 4242);
    assert_eq!(vx, "ov0-vx");
    let l = a.link(&vx).unwrap();
    assert_eq!(l["linkinfo"]["info_kind"], "vxlan");
    assert_eq!(l["linkinfo"]["info_data"]["id"], 4242);
    assert_eq!(l["master"], "ov0");
    assert_eq!(l["ifalias"], "stead:Network/ov0");
    let fdb = a.exec(&["bridge", "fdb", "show", "dev", &vx]).1;
    assert!(fdb.contains("00:00:00:00:00:00 dst 10.201.0.2"), "{fdb}");

    let ga = Netns::new();
    let gb = Netns::new();
    guest(&a, &ga, "vga", "10.30.0.11/24");
    guest(&b, &gb, "vgb", "10.30.0.12/24");
    let (ok, out) = ga.exec(&["ping", "-c1", "-W2", "10.30.0.12"]);
    assert!(ok, "ping across the overlay: {out}");

    // Drift: the flood entry removed by hand is detected and restored.
    let (ok, out) = a.exec(&[
        "bridge",
        "fdb",
        "del",
        "00:00:00:00:00:00",
        "dst",
        "10.201.0.2",
        "dev",
        &vx,
    ]);
    assert!(ok, "{out}");
    assert_drift(&da, &na, "vxlan");
    apply(&da, &na).unwrap();
    assert_converged(&da, &na);
    // The VXLAN port deleted by hand comes back too.
    a.ip(&["link", "del", &vx]);
    assert_drift(&da, &na, "vxlan");
    assert_drift(&da, &na, "type");
    apply(&da, &na).unwrap();
    assert_converged(&da, &na);
    let (ok, out) = ga.exec(&["ping", "-c1", "-W2", "10.30.0.12"]);
    assert!(ok, "ping after healing: {out}");

    // Changing the remote list replaces the flood entries.
    let na2 = net("10.201.0.1", "10.201.0.9");
    apply(&da, &na2).unwrap();
    assert_converged(&da, &na2);
    let fdb = a.exec(&["bridge", "fdb", "show", "dev", &vx]).1;
    assert!(
        fdb.contains("dst 10.201.0.9") && !fdb.contains("00:00:00:00:00:00 dst 10.201.0.2"),
        "{fdb}"
    );

    // type vxlan → bridge: the VXLAN port goes, the bridge stays.
    let plain = resource(Kind::Network, "ov0", json!({}));
    apply(&da, &plain).unwrap();
    assert_converged(&da, &plain);
    assert!(a.link(&vx).is_none());

    delete(&da, &plain).unwrap();
    delete(&db, &nb).unwrap();
    assert!(a.link("ov0").is_none() && b.link("ov0").is_none() && b.link(&vx).is_none());
    assert!(
        a.link("vga").is_none(),
        "attachment removed with its bridge"
    );
}
