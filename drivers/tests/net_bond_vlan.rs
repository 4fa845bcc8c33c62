//! Bond and bridge VLAN filtering. Kernels without them make apply fail with
//! `Unsupported` naming the feature; the tests then print SKIP with that reason.
#![allow(clippy::unwrap_used)]

mod net_util;

use net_util::*;
use serde_json::json;
use stead_drivers::net::{BondDriver, NetworkDriver};
use stead_reconciler::driver::DriverError;
use stead_schema::Kind;

#[test]
fn net_bond_active_backup_with_slaves() {
    if let Some(r) = can_run() {
        eprintln!("SKIP net_bond_active_backup_with_slaves: {r}");
        return;
    }
    let ns = Netns::new();
    ns.ip(&["link", "add", "s1", "type", "veth", "peer", "name", "s1p"]);
    ns.ip(&["link", "add", "s2", "type", "veth", "peer", "name", "s2p"]);
    let d = BondDriver::new(&env(&ns)).unwrap();
    let bond = resource(
        Kind::Bond,
        "bond0",
        json!({"mode": "active-backup", "slaves": ["s1", "s2"], "miimon": 100}),
    );
    assert!(!observe(&d, &bond).exists);
    match apply(&d, &bond) {
        Err(DriverError::Unsupported(m)) => {
            assert!(m.contains("kernel lacks bonding"), "{m}");
            assert!(ns.link("bond0").is_none(), "nothing half-made");
            eprintln!("SKIP net_bond_active_backup_with_slaves: {m}");
            return;
        }
        r => r.unwrap(),
    }
    assert_converged(&d, &bond);
    assert_eq!(ns.link("s1").unwrap()["master"], "bond0");
    ns.ip(&["link", "set", "s2", "nomaster"]);
    assert_drift(&d, &bond, "slaves");
    apply(&d, &bond).unwrap();
    assert_converged(&d, &bond);
    delete(&d, &bond).unwrap();
    assert!(ns.link("bond0").is_none());
}

#[test]
fn net_bridge_vlan_aware() {
    if let Some(r) = can_run() {
        eprintln!("SKIP net_bridge_vlan_aware: {r}");
        return;
    }
    let ns = Netns::new();
    let d = NetworkDriver::new(&env(&ns)).unwrap();
    let net = resource(Kind::Network, "vbr0", json!({"vlanAware": true}));
    match apply(&d, &net) {
        Err(DriverError::Unsupported(m)) => {
            assert!(m.contains("kernel lacks bridge VLAN filtering"), "{m}");
            eprintln!("SKIP net_bridge_vlan_aware: {m}");
            // The bridge itself was made and is stead's: delete cleans it.
            delete(&d, &net).unwrap();
            assert!(ns.link("vbr0").is_none());
            return;
        }
        r => r.unwrap(),
    }
    assert_converged(&d, &net);
    assert_eq!(
        ns.link("vbr0").unwrap()["linkinfo"]["info_data"]["vlan_filtering"],
        1
    );
    delete(&d, &net).unwrap();
}

#[test]
fn net_attach_port_vlan() {
    if let Some(r) = can_run() {
        eprintln!("SKIP net_attach_port_vlan: {r}");
        return;
    }
    let ns = Netns::new();
    ns.ip(&["link", "add", "vbr1", "type", "bridge"]);
    ns.ip(&["link", "add", "p1", "type", "veth", "peer", "name", "p1p"]);
    ns.ip(&["link", "set", "p1", "master", "vbr1"]);
    let err = stead_drivers::net::attach::set_port_vlan(Some(&ns.path()), "p1", 0).unwrap_err();
    assert!(matches!(err, DriverError::Refused(_)), "{err}");
    match stead_drivers::net::attach::set_port_vlan(Some(&ns.path()), "p1", 10) {
        Err(DriverError::Unsupported(m)) => {
            assert!(m.contains("kernel lacks bridge VLAN filtering"), "{m}");
            eprintln!("SKIP net_attach_port_vlan: {m}");
        }
        r => {
            r.unwrap();
            let (_, out) = ns.exec(&["bridge", "vlan", "show", "dev", "p1"]);
            assert!(out.contains("10 PVID"), "{out}");
        }
    }
}
