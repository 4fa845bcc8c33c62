//! Failure paths of the Network driver: a create that fails half way (a missing port, an
//! address the kernel refuses, a VXLAN port the kernel refuses, a NAT rule `nft`
//! refuses) leaves no stead link and no half-written rule behind, and other networks'
//! rules are untouched; a port forward to an address that cannot receive it is refused
//! before anything is made.
#![allow(clippy::unwrap_used)]

mod net_util;

use net_util::*;
use serde_json::json;
use stead_drivers::net::{NetworkDriver, owner_alias};
use stead_reconciler::driver::{Driver, Observed};
use stead_schema::Kind;

/// Links of the namespace carrying a stead alias (`stead:…`).
fn stead_links(ns: &Netns) -> Vec<String> {
    ns.links()
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| {
            l["ifalias"]
                .as_str()
                .is_some_and(|a| a.starts_with("stead:"))
        })
        .map(|l| l["ifname"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// Names of every link but `lo`.
fn link_names(ns: &Netns) -> Vec<String> {
    ns.links()
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["ifname"].as_str().unwrap_or("?").to_string())
        .filter(|n| n != "lo")
        .collect()
}

/// Comments of the rules in table `inet stead`.
fn rule_comments(ns: &Netns) -> Vec<String> {
    ns.ruleset()["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["rule"]["table"] == "stead")
        .map(|o| o["rule"]["comment"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Applies `spec` as network `name` in a fresh namespace (after `prepare`), expects the
/// apply to fail, and checks that nothing of it is left: no link at all, no rule.
fn assert_failed_create_leaves_nothing(
    test: &str,
    name: &str,
    spec: serde_json::Value,
    prepare: &dyn Fn(&Netns),
) {
    if let Some(r) = can_run() {
        eprintln!("SKIP {test}: {r}");
        return;
    }
    let ns = Netns::new();
    prepare(&ns);
    let d = NetworkDriver::new(&env(&ns)).unwrap();
    let r = resource(Kind::Network, name, spec);
    let err = apply(&d, &r).expect_err("the apply must fail");
    eprintln!("{test}: apply failed as expected: {err}");
    assert!(
        link_names(&ns).is_empty(),
        "{test}: links left after the failed apply: {:?} (stead-owned: {:?})",
        link_names(&ns),
        stead_links(&ns)
    );
    assert!(d.marked_on_host().unwrap().is_empty());
    if have_nft() {
        assert!(rule_comments(&ns).is_empty(), "{test}: rules left");
    }
    // The observe the next apply or destroy makes sees nothing to clean.
    assert!(!observe(&d, &r).exists);
    d.delete(&r, &Observed::absent(), &world(&[&r])).unwrap();
}

#[test]
fn net_failed_create_missing_port_leaves_no_bridge() {
    assert_failed_create_leaves_nothing(
        "net_failed_create_missing_port_leaves_no_bridge",
        "lan0",
        json!({"addresses": ["10.30.0.1/24"], "ports": ["nosuch0"]}),
        &|_| {},
    );
}

#[test]
fn net_failed_create_refused_address_leaves_no_bridge() {
    assert_failed_create_leaves_nothing(
        "net_failed_create_refused_address_leaves_no_bridge",
        "lan0",
        json!({"addresses": ["10.30.0.1/24", "2001:db8:30::1/64"]}),
        // IPv6 disabled in the namespace: the kernel refuses the IPv6 address.
        &|ns| {
            let (ok, out) = ns.exec(&[
                "sysctl",
                "-w",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ]);
            assert!(ok, "sysctl: {out}");
        },
    );
}

#[test]
fn net_failed_create_vxlan_bad_local_leaves_no_link() {
    // A link-local source address without a device: the kernel refuses the VXLAN port
    // after the bridge was made.
    assert_failed_create_leaves_nothing(
        "net_failed_create_vxlan_bad_local_leaves_no_link",
        "ov0",
        json!({"type": "vxlan",
               "vxlan": {"vni": 4301, "local": "fe80::1", "remotes": ["fe80::2"], "port": 4789}}),
        &|_| {},
    );
}

#[test]
fn net_failed_create_vxlan_refused_remote_leaves_no_link() {
    // An IPv6 source with an IPv4 remote: the port is made, its flood entry refused.
    assert_failed_create_leaves_nothing(
        "net_failed_create_vxlan_refused_remote_leaves_no_link",
        "ov1",
        json!({"type": "vxlan",
               "vxlan": {"vni": 4302, "local": "::1", "remotes": ["192.0.2.7"], "port": 4789}}),
        &|_| {},
    );
}

#[test]
fn net_failed_create_nat_refused_by_nft_keeps_other_rules() {
    let test = "net_failed_create_nat_refused_by_nft_keeps_other_rules";
    if let Some(r) = can_run() {
        eprintln!("SKIP {test}: {r}");
        return;
    }
    if !have_nft() {
        eprintln!("SKIP {test}: nft missing");
        return;
    }
    let ns = Netns::new();
    let d = NetworkDriver::new(&env(&ns)).unwrap();
    let good = resource(
        Kind::Network,
        "good0",
        json!({"addresses": ["10.31.0.1/24"], "nat": {"enabled": true},
               "forwards": [{"hostPort": 8080, "to": "10.31.0.5:80"}]}),
    );
    apply(&d, &good).unwrap();
    assert_converged(&d, &good);
    let before = rule_comments(&ns);
    assert!(!before.is_empty());

    // An egress name Linux allows but nft reads as a set reference: nft refuses the
    // transaction.
    let bad = resource(
        Kind::Network,
        "bad0",
        json!({"addresses": ["10.32.0.1/24"], "nat": {"enabled": true, "egress": "@wan"},
               "forwards": [{"hostPort": 8081, "to": "10.32.0.5:80"}]}),
    );
    let err = apply(&d, &bad).expect_err("nft must refuse the egress name");
    assert!(err.to_string().contains("nft"), "{err}");
    assert_eq!(link_names(&ns), vec!["good0".to_string()]);
    assert_eq!(rule_comments(&ns), before, "half-written or lost rules");
    assert!(
        !rule_comments(&ns).contains(&owner_alias(Kind::Network, "bad0")),
        "rules of the failed network"
    );
    assert_converged(&d, &good);

    // A network whose bridge already existed keeps it (and its rules) on failure.
    let mut good_bad = good.clone();
    good_bad.spec = resource(
        Kind::Network,
        "good0",
        json!({"addresses": ["10.31.0.1/24"], "nat": {"enabled": true, "egress": "@wan"}}),
    )
    .spec;
    apply(&d, &good_bad).expect_err("nft must refuse the egress name");
    assert_eq!(link_names(&ns), vec!["good0".to_string()]);
    assert_eq!(rule_comments(&ns), before);

    delete(&d, &good).unwrap();
    assert!(link_names(&ns).is_empty());
    assert!(!ns.has_table("inet", "stead"));
}

#[test]
fn net_forward_to_bad_address_refused_before_anything_is_made() {
    let test = "net_forward_to_bad_address_refused_before_anything_is_made";
    if let Some(r) = can_run() {
        eprintln!("SKIP {test}: {r}");
        return;
    }
    let ns = Netns::new();
    let d = NetworkDriver::new(&env(&ns)).unwrap();
    let with_forward = |to: &str| {
        resource(
            Kind::Network,
            "fw0",
            json!({"addresses": ["10.33.0.1/24", "fd33::1/64"],
                   "forwards": [{"hostPort": 8080, "to": to}]}),
        )
    };
    for to in [
        "10.33.0.0:80",
        "10.33.0.255:80",
        "10.33.0.5:0",
        "[fd33::]:0",
    ] {
        let r = with_forward(to);
        let err = d
            .check(&r, &Observed::absent(), &[])
            .expect_err(&format!("forward to {to} must be refused"));
        assert!(err.contains(to), "{err}");
        // A create (which the plan does not check) is refused before anything is made.
        let err = apply(&d, &r).expect_err(&format!("apply of a forward to {to}"));
        assert!(
            matches!(err, stead_reconciler::driver::DriverError::Refused(_)),
            "{err:?}"
        );
        assert!(link_names(&ns).is_empty(), "{:?}", link_names(&ns));
    }
    for to in ["10.33.0.5:80", "10.33.0.1:22", "[fd33::5]:80"] {
        let r = with_forward(to);
        d.check(&r, &Observed::absent(), &[])
            .unwrap_or_else(|e| panic!("forward to {to}: {e}"));
    }
    assert!(link_names(&ns).is_empty());
}

#[test]
fn net_failed_veth_attach_leaves_no_pair() {
    use stead_drivers::net::NetnsRef;
    use stead_drivers::net::attach::{VethPeer, VethSpec, ensure_veth};
    let test = "net_failed_veth_attach_leaves_no_pair";
    if let Some(r) = can_run() {
        eprintln!("SKIP {test}: {r}");
        return;
    }
    let host = Netns::new();
    let guest = Netns::new();
    let d = NetworkDriver::new(&env(&host)).unwrap();
    let lan = resource(
        Kind::Network,
        "lan0",
        json!({"addresses": ["10.40.0.1/24"]}),
    );
    apply(&d, &lan).unwrap();
    let spec = |gateway: &str| VethSpec {
        host_name: "vc-web".into(),
        bridge: "lan0".into(),
        owner: owner_alias(Kind::Container, "web"),
        peer: VethPeer {
            name: "eth0".into(),
            netns: Some(NetnsRef::Path(guest.path())),
            addresses: vec!["10.40.0.2/24".parse().unwrap()],
            gateway: Some(gateway.parse().unwrap()),
            loopback_up: true,
            ..VethPeer::default()
        },
        ..VethSpec::default()
    };
    // A gateway outside the peer's subnet: the kernel refuses the route after the pair
    // was made, plugged and addressed.
    let err = ensure_veth(Some(&host.path()), &spec("192.0.2.1")).expect_err("no route");
    eprintln!("{test}: attach failed as expected: {err}");
    assert_eq!(link_names(&host), vec!["lan0".to_string()]);
    assert!(link_names(&guest).is_empty(), "{:?}", link_names(&guest));
    // The same attach with a reachable gateway then succeeds from scratch.
    let info = ensure_veth(Some(&host.path()), &spec("10.40.0.1")).unwrap();
    assert!(info.created);
    assert_eq!(link_names(&guest), vec!["eth0".to_string()]);
    delete(&d, &lan).unwrap();
    assert!(link_names(&host).is_empty(), "{:?}", link_names(&host));
}
