//! Network driver: a two-bridge NAT lab applied through the Driver API, checked with
//! `ip`/`nft`, drift of each kind made by hand, detected and healed; ownership and
//! delete semantics.
#![allow(clippy::unwrap_used)]

mod net_util;

use net_util::*;
use serde_json::json;
use stead_drivers::net::attach::{VethPeer, VethSpec, ensure_veth};
use stead_drivers::net::{NetworkDriver, STEAD_LINK_GROUP, owner_alias};
use stead_reconciler::driver::{Driver, DriverError};
use stead_schema::Kind;

fn stead_rules(ns: &Netns) -> Vec<serde_json::Value> {
    ns.ruleset()["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["rule"]["table"] == "stead")
        .map(|o| o["rule"].clone())
        .collect()
}

#[test]
fn net_driver_nat_lab_converges_detects_drift_and_heals() {
    if let Some(r) = can_run() {
        eprintln!("SKIP net_driver_nat_lab_converges_detects_drift_and_heals: {r}");
        return;
    }
    if !have_nft() {
        eprintln!("SKIP net_driver_nat_lab_converges_detects_drift_and_heals: nft missing");
        return;
    }
    let ns = Netns::new();
    ns.ip(&[
        "link", "add", "uplink", "type", "veth", "peer", "name", "uplinkp",
    ]);
    ns.ip(&[
        "link", "add", "eth1", "type", "veth", "peer", "name", "eth1p",
    ]);
    // A foreign table and an unowned bridge that must survive everything.
    for cmd in [
        "add table ip foreign",
        "add chain ip foreign post { type nat hook postrouting priority 50; }",
        "add rule ip foreign post ip saddr 192.0.2.0/24 masquerade",
    ] {
        let mut a = vec!["nft"];
        a.extend(cmd.split(' '));
        let (ok, out) = ns.exec(&a);
        assert!(ok, "{cmd}: {out}");
    }
    let foreign_before = ns.exec(&["nft", "list", "table", "ip", "foreign"]).1;
    ns.ip(&["link", "add", "foreign0", "type", "bridge"]);

    let d = NetworkDriver::new(&env(&ns)).unwrap();
    let lan0 = resource(
        Kind::Network,
        "lan0",
        json!({"type": "bridge", "mtu": 1400, "addresses": ["10.10.0.1/24"], "ports": ["eth1"],
               "nat": {"enabled": true, "egress": "uplink"},
               "forwards": [{"protocol": "tcp", "hostPort": 8080, "to": "10.10.0.10:80"}]}),
    );
    let lan1 = resource(
        Kind::Network,
        "lan1",
        json!({"addresses": ["10.11.0.1/24", "fd11::1/64"], "nat": {}}),
    );
    // Before: absent.
    assert!(!observe(&d, &lan0).exists);
    apply(&d, &lan0).unwrap();
    apply(&d, &lan1).unwrap();

    // The host shows exactly the declared state.
    let l0 = ns.link("lan0").unwrap();
    assert_eq!(l0["linkinfo"]["info_kind"], "bridge");
    assert_eq!(l0["mtu"], 1400);
    assert_eq!(l0["ifalias"], "stead:Network/lan0");
    assert!(l0["flags"].as_array().unwrap().contains(&json!("UP")));
    assert_eq!(ns.link("eth1").unwrap()["master"], "lan0");
    let a0 = ns.ip(&["-o", "addr", "show", "dev", "lan0"]);
    assert!(a0.contains("10.10.0.1/24"), "{a0}");
    let a1 = ns.ip(&["-o", "addr", "show", "dev", "lan1"]);
    assert!(
        a1.contains("10.11.0.1/24") && a1.contains("fd11::1/64"),
        "{a1}"
    );
    let rules = stead_rules(&ns);
    let tagged = |n: &str| rules.iter().filter(|r| r["comment"] == n).count();
    // lan0: masq + dnat pre/out + hairpin; lan1: 2 masq; the skeleton: 2 accepts of
    // the members of set `bridges`.
    assert_eq!(tagged("stead:Network/lan0"), 4, "{rules:#?}");
    assert_eq!(tagged("stead:Network/lan1"), 2, "{rules:#?}");
    assert_eq!(tagged("stead:bridges"), 2, "{rules:#?}");
    assert_eq!(rules.len(), 8);
    let set = ns
        .exec(&["nft", "list", "set", "inet", "stead", "bridges"])
        .1;
    assert!(
        set.contains("\"lan0\"") && set.contains("\"lan1\""),
        "{set}"
    );
    assert_eq!(
        ns.exec(&["cat", "/proc/sys/net/ipv4/ip_forward"]).1.trim(),
        "1"
    );
    let text = ns.exec(&["nft", "list", "table", "inet", "stead"]).1;
    assert!(text.contains("oifname \"uplink\" masquerade"), "{text}");
    assert!(text.contains("dnat ip to 10.10.0.10:80"), "{text}");

    // observe + diff: equal.
    assert_converged(&d, &lan0);
    assert_converged(&d, &lan1);

    // A no-op apply changes nothing (the table is not rebuilt: handles stay).
    let handles = |ns: &Netns| -> Vec<serde_json::Value> {
        stead_rules(ns)
            .iter()
            .map(|r| r["handle"].clone())
            .collect()
    };
    let h_before = handles(&ns);
    let runs = d.nft_invocations();
    apply(&d, &lan0).unwrap();
    assert_eq!(handles(&ns), h_before);
    assert!(d.nft_invocations() - runs <= 3, "no-op apply only lists");

    // Drift, one kind at a time: detected on that field, healed by apply.
    ns.ip(&["link", "set", "lan0", "mtu", "1300"]);
    assert_eq!(assert_drift(&d, &lan0, "mtu"), json!(1300));
    apply(&d, &lan0).unwrap();
    assert_converged(&d, &lan0);

    ns.ip(&["addr", "del", "10.10.0.1/24", "dev", "lan0"]);
    ns.ip(&["addr", "add", "10.10.9.9/24", "dev", "lan0"]);
    assert_eq!(
        assert_drift(&d, &lan0, "addresses"),
        json!(["10.10.9.9/24"])
    );
    apply(&d, &lan0).unwrap();
    assert_converged(&d, &lan0);

    ns.ip(&["link", "set", "eth1", "nomaster"]);
    assert_eq!(assert_drift(&d, &lan0, "ports"), json!([]));
    apply(&d, &lan0).unwrap();
    assert_converged(&d, &lan0);

    ns.ip(&["link", "set", "lan0", "down"]);
    assert_eq!(assert_drift(&d, &lan0, "up"), json!(false));
    apply(&d, &lan0).unwrap();
    assert_converged(&d, &lan0);

    // Rules: flush the NAT chain (both networks lose their masquerade).
    let (ok, out) = ns.exec(&["nft", "flush", "chain", "inet", "stead", "postrouting"]);
    assert!(ok, "{out}");
    assert_drift(&d, &lan0, "nat");
    assert_drift(&d, &lan0, "forwards"); // the hairpin rule lived there too
    assert_drift(&d, &lan1, "nat");
    apply(&d, &lan0).unwrap();
    apply(&d, &lan1).unwrap();
    assert_converged(&d, &lan0);
    assert_converged(&d, &lan1);

    // Rules: delete one DNAT rule by handle.
    let out_rule = stead_rules(&ns)
        .into_iter()
        .find(|r| r["chain"] == "output")
        .unwrap();
    let h = out_rule["handle"].to_string();
    let (ok, out) = ns.exec(&[
        "nft", "delete", "rule", "inet", "stead", "output", "handle", &h,
    ]);
    assert!(ok, "{out}");
    assert_eq!(assert_drift(&d, &lan0, "forwards"), serde_json::Value::Null);
    apply(&d, &lan0).unwrap();
    assert_converged(&d, &lan0);

    // The bridge removed from the accept set by hand.
    let (ok, out) = ns.exec(&[
        "nft", "delete", "element", "inet", "stead", "bridges", "{", "lan0", "}",
    ]);
    assert!(ok, "{out}");
    assert_eq!(
        assert_drift(&d, &lan0, "forwardAccept"),
        serde_json::Value::Null
    );
    apply(&d, &lan0).unwrap();
    assert_converged(&d, &lan0);

    // ip_forward turned off by hand.
    let (ok, out) = ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
    assert!(ok, "{out}");
    assert_eq!(assert_drift(&d, &lan0, "ipForward"), json!(false));
    apply(&d, &lan0).unwrap();
    assert_converged(&d, &lan0);

    // A rule deleted by hand between observe and apply: the transaction built on the
    // observed table misses that handle, fails atomically, and is redone on a fresh
    // listing.
    let w = world(&[&lan0]);
    let stale = observe(&d, &lan0);
    let masq = stead_rules(&ns)
        .into_iter()
        .find(|r| r["chain"] == "postrouting" && r["comment"] == "stead:Network/lan0")
        .unwrap();
    let h = masq["handle"].to_string();
    let (ok, out) = ns.exec(&[
        "nft",
        "delete",
        "rule",
        "inet",
        "stead",
        "postrouting",
        "handle",
        &h,
    ]);
    assert!(ok, "{out}");
    let lan0c = resource(
        Kind::Network,
        "lan0",
        json!({"type": "bridge", "mtu": 1400, "addresses": ["10.10.0.1/24"], "ports": ["eth1"],
               "nat": {"enabled": true, "egress": "uplink"},
               "forwards": [{"protocol": "tcp", "hostPort": 8080, "to": "10.10.0.10:80"},
                            {"protocol": "udp", "hostPort": 5353, "to": "10.10.0.10:53"}]}),
    );
    d.apply(&lan0c, &stale, &w).unwrap();
    assert_converged(&d, &lan0c);
    apply(&d, &lan0).unwrap();
    assert_converged(&d, &lan0);

    // Bridge deleted by hand.
    ns.ip(&["link", "del", "lan1"]);
    assert!(!observe(&d, &lan1).exists);
    apply(&d, &lan1).unwrap();
    assert_converged(&d, &lan1);

    // Spec change: drop NAT and forwards from lan0 → its rules go, lan1's stay.
    let lan0b = resource(
        Kind::Network,
        "lan0",
        json!({"mtu": 1400, "addresses": ["10.10.0.1/24"], "ports": ["eth1"]}),
    );
    assert_drift(&d, &lan0b, "nat");
    apply(&d, &lan0b).unwrap();
    assert_converged(&d, &lan0b);
    let rules = stead_rules(&ns);
    assert!(
        rules
            .iter()
            .all(|r| r["comment"] == "stead:Network/lan1" || r["comment"] == "stead:bridges"),
        "{rules:#?}"
    );
    let set = ns
        .exec(&["nft", "list", "set", "inet", "stead", "bridges"])
        .1;
    assert!(
        !set.contains("\"lan0\"") && set.contains("\"lan1\""),
        "{set}"
    );
    apply(&d, &lan0).unwrap();
    assert_converged(&d, &lan0);

    // Unowned bridge with a declared name: exists, not owned, never modified.
    let f = resource(
        Kind::Network,
        "foreign0",
        json!({"addresses": ["10.12.0.1/24"]}),
    );
    let o = observe(&d, &f);
    assert!(o.exists && !o.owned);
    let err = apply(&d, &f).unwrap_err();
    assert!(matches!(err, DriverError::Conflict(_)), "{err}");
    assert!(
        !ns.ip(&["-o", "addr", "show", "dev", "foreign0"])
            .contains("10.12.0.1")
    );
    assert!(d.check(&f, &o, &[]).is_err(), "plan refuses the name clash");

    // A half-created bridge (crash between create and alias) is adopted.
    ns.ip(&[
        "link",
        "add",
        "lan2",
        "group",
        &STEAD_LINK_GROUP.to_string(),
        "type",
        "bridge",
    ]);
    let lan2 = resource(Kind::Network, "lan2", json!({}));
    assert!(observe(&d, &lan2).owned);
    apply(&d, &lan2).unwrap();
    assert_converged(&d, &lan2);
    assert_eq!(ns.link("lan2").unwrap()["ifalias"], "stead:Network/lan2");

    // Delete: bridges, their stead attachments and exactly stead's rules go.
    let ct = Netns::new();
    ensure_veth(
        Some(&ns.path()),
        &VethSpec {
            host_name: "vct0".into(),
            bridge: "lan0".into(),
            owner: owner_alias(Kind::Container, "ct"),
            peer: VethPeer {
                name: "eth0".into(),
                netns: Some(stead_drivers::net::NetnsRef::Path(ct.path())),
                ..VethPeer::default()
            },
            ..VethSpec::default()
        },
    )
    .unwrap();
    delete(&d, &lan0).unwrap();
    assert!(ns.link("lan0").is_none());
    assert!(
        ns.link("vct0").is_none(),
        "attachment veth deleted with its bridge"
    );
    assert!(ns.link("eth1").is_some(), "host port released, not deleted");
    assert!(
        stead_rules(&ns)
            .iter()
            .all(|r| r["comment"] == "stead:Network/lan1" || r["comment"] == "stead:bridges")
    );
    delete(&d, &lan1).unwrap();
    delete(&d, &lan2).unwrap();
    delete(&d, &lan1).unwrap(); // idempotent
    assert!(!ns.has_table("inet", "stead"), "empty stead table removed");
    assert!(ns.link("lan1").is_none() && ns.link("lan2").is_none());
    assert!(ns.link("foreign0").is_some(), "unowned bridge survives");
    assert_eq!(
        ns.exec(&["nft", "list", "table", "ip", "foreign"]).1,
        foreign_before,
        "foreign table untouched"
    );
    // Deleting a name held by an unowned bridge leaves it.
    delete(&d, &f).unwrap();
    assert!(ns.link("foreign0").is_some());
}
