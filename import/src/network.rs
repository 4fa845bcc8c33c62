//! `interfaces(5)` (and `interfaces.d/*`) → Networks (bridges) and Bonds; SDN `vxlan`
//! zones and their vnets → Networks of type vxlan.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use stead_schema::{BondMode, BondSpec, Cidr, IfName, Kind, NetworkSpec, NetworkType, VxlanSpec};

use crate::model::Manifest;
use crate::names::Taken;
use crate::reader::{Section, Stanza};
use crate::report::Report;

/// The output file of networks and bonds.
const FILE: &str = "network.yaml";

/// What guests need to know of an imported Network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetInfo {
    /// The Network's name.
    pub name: String,
    /// Bridge VLAN filtering.
    pub vlan_aware: bool,
    /// The host's addresses on it (a container's address must lie in one of their
    /// subnets when there are any).
    pub addresses: Vec<Cidr>,
}

/// Networks and bonds read so far.
#[derive(Debug, Default)]
pub struct Networks {
    /// Imported networks by Proxmox bridge or vnet name.
    pub by_bridge: BTreeMap<String, NetInfo>,
    /// The host's own addresses (to leave out of VXLAN peers).
    pub own_addresses: BTreeSet<IpAddr>,
    /// Manifests.
    pub manifests: Vec<Manifest>,
    taken: Taken,
}

/// Bridge options carried over.
const BRIDGE_KEYS: &[&str] = &[
    "bridge-ports",
    "address",
    "netmask",
    "mtu",
    "bridge-vlan-aware",
];
/// Bridge options whose value is what a bridge stead makes has anyway (STP off, so no
/// forward delay).
const BRIDGE_DEFAULTS: &[(&str, &str)] = &[
    ("bridge-stp", "off"),
    ("bridge-stp", "no"),
    ("bridge-stp", "0"),
    ("bridge-fd", "0"),
];
/// Bond options carried over.
const BOND_KEYS: &[&str] = &["bond-slaves", "bond-mode", "bond-miimon", "mtu"];

/// One stanza with the file it came from; `inet` and `inet6` stanzas of the same
/// interface are merged.
#[derive(Debug, Clone)]
pub struct Iface {
    /// The file.
    pub file: PathBuf,
    /// Every stanza of this interface.
    pub stanzas: Vec<Stanza>,
}

impl Iface {
    fn value(&self, key: &str) -> Option<(&str, usize)> {
        self.stanzas
            .iter()
            .find_map(|s| s.options.get(key).map(|e| (e.value.as_str(), e.line)))
    }

    fn line(&self) -> usize {
        self.stanzas.first().map_or(0, |s| s.line)
    }

    fn is_bridge(&self, name: &str) -> bool {
        self.value("bridge-ports").is_some()
            || (name.starts_with("vmbr") && name[4..].chars().all(|c| c.is_ascii_digit()))
    }

    fn is_bond(&self, name: &str) -> bool {
        self.value("bond-slaves").is_some() || name.starts_with("bond")
    }
}

/// Groups stanzas by interface name, in file order.
pub fn group(files: Vec<(PathBuf, crate::reader::Interfaces)>) -> Vec<(String, Iface)> {
    let mut out: Vec<(String, Iface)> = Vec::new();
    for (file, parsed) in files {
        for st in parsed.stanzas {
            match out.iter_mut().find(|(n, _)| *n == st.name) {
                Some((_, i)) => i.stanzas.push(st),
                None => out.push((
                    st.name.clone(),
                    Iface {
                        file: file.clone(),
                        stanzas: vec![st],
                    },
                )),
            }
        }
    }
    out
}

impl Networks {
    /// Imports bridges and bonds; reports what is neither (physical ports, VLAN
    /// sub-interfaces) unless a bridge or bond uses it.
    pub fn import_interfaces(&mut self, ifaces: &[(String, Iface)], report: &mut Report) {
        let mut used: BTreeSet<String> = BTreeSet::new();
        for (_, i) in ifaces {
            for key in ["bridge-ports", "bond-slaves"] {
                if let Some((v, _)) = i.value(key) {
                    used.extend(v.split_whitespace().map(str::to_string));
                }
            }
            for st in &i.stanzas {
                if let Some(e) = st.options.get("address")
                    && let Some(ip) = e
                        .value
                        .split('/')
                        .next()
                        .and_then(|a| a.parse::<IpAddr>().ok())
                {
                    self.own_addresses.insert(ip);
                }
            }
        }
        for (name, i) in ifaces {
            if name == "lo" {
                continue;
            }
            if i.is_bridge(name) {
                self.bridge(name, i, report);
            } else if i.is_bond(name) {
                self.bond(name, i, report);
            } else if !used.contains(name) {
                let what = if name.contains('.') {
                    "a VLAN sub-interface"
                } else {
                    "a physical port (or other interface)"
                };
                report.note(
                    &i.file,
                    i.line(),
                    &format!("iface {name}"),
                    format!("{what} not part of a bridge or bond: not carried over"),
                );
            }
        }
    }

    /// A bridge → a Network of type bridge.
    fn bridge(&mut self, name: &str, i: &Iface, report: &mut Report) {
        let net_name = self
            .taken
            .claim(Some(name), &format!("br-{}", crate::names::sanitize(name)));
        let mut spec = NetworkSpec::default();
        if let Some((ports, line)) = i.value("bridge-ports") {
            for p in ports.split_whitespace().filter(|p| *p != "none") {
                match p.parse::<IfName>() {
                    Ok(n) => spec.ports.push(n),
                    Err(e) => report.note(
                        &i.file,
                        line,
                        "bridge-ports",
                        format!("{e}: not carried over"),
                    ),
                }
            }
        }
        spec.addresses = addresses(i, report);
        spec.mtu = mtu(i, report);
        spec.vlan_aware = i
            .value("bridge-vlan-aware")
            .is_some_and(|(v, _)| v == "yes" || v == "1");
        report_others(i, BRIDGE_KEYS, "the Network kind", report);
        self.by_bridge.insert(
            name.to_string(),
            NetInfo {
                name: net_name.clone(),
                vlan_aware: spec.vlan_aware,
                addresses: spec.addresses.clone(),
            },
        );
        self.manifests
            .push(Manifest::new(Kind::Network, &net_name, &spec, FILE));
    }

    /// A bond → a Bond.
    fn bond(&mut self, name: &str, i: &Iface, report: &mut Report) {
        let Some((slaves, _)) = i.value("bond-slaves") else {
            report.note(
                &i.file,
                i.line(),
                &format!("iface {name}"),
                "a bond without `bond-slaves`: not carried over",
            );
            return;
        };
        let mode = match i.value("bond-mode") {
            None => BondMode::BalanceRr,
            Some((m, line)) => match bond_mode(m) {
                Some(m) => m,
                None => {
                    report.note(
                        &i.file,
                        line,
                        "bond-mode",
                        format!("unknown mode `{m}`: bond not carried over"),
                    );
                    return;
                }
            },
        };
        if stead_schema::check_name(name).is_err() {
            report.note(
                &i.file,
                i.line(),
                &format!("iface {name}"),
                "not a valid stead name: bond not carried over",
            );
            return;
        }
        let spec = BondSpec {
            mode,
            slaves: slaves
                .split_whitespace()
                .filter(|s| *s != "none")
                .filter_map(|s| s.parse().ok())
                .collect(),
            miimon: i.value("bond-miimon").and_then(|(v, _)| v.parse().ok()),
            mtu: mtu(i, report),
            depends_on: vec![],
        };
        for key in ["address", "gateway"] {
            if let Some((v, line)) = i.value(key) {
                report.note(
                    &i.file,
                    line,
                    key,
                    format!("`{v}` on a bond: the Bond kind has no addresses, not carried over"),
                );
            }
        }
        report_others(
            i,
            &[BOND_KEYS, &["address", "gateway", "netmask"]].concat(),
            "the Bond kind",
            report,
        );
        self.manifests
            .push(Manifest::new(Kind::Bond, name, &spec, FILE));
    }

    /// SDN: `vxlan` zones with their peers (less this host's own addresses) and their
    /// vnets with `tag` → Networks of type vxlan. Other zone types are reported.
    pub fn import_sdn(
        &mut self,
        zones: (&Path, &[Section]),
        vnets: (&Path, &[Section]),
        report: &mut Report,
    ) {
        let (zfile, zones) = zones;
        let (vfile, vnets) = vnets;
        for z in zones.iter().filter(|z| z.kind != "vxlan") {
            report.note(
                zfile,
                z.line,
                &format!("{}: {}", z.kind, z.id),
                format!(
                    "SDN zone type `{}`: not carried over (stead has VXLAN networks)",
                    z.kind
                ),
            );
        }
        for v in vnets {
            let Some(zone) = v
                .value("zone")
                .and_then(|z| zones.iter().find(|s| s.id == z))
            else {
                report.note(
                    vfile,
                    v.line,
                    &format!("vnet: {}", v.id),
                    "no known `zone`: not carried over",
                );
                continue;
            };
            if zone.kind != "vxlan" {
                report.note(
                    vfile,
                    v.line,
                    &format!("vnet: {}", v.id),
                    format!(
                        "in the `{}` zone `{}`: not carried over",
                        zone.kind, zone.id
                    ),
                );
                continue;
            }
            let Some(vni) = v.value("tag").and_then(|t| t.parse::<u32>().ok()) else {
                report.note(
                    vfile,
                    v.line,
                    &format!("vnet: {}", v.id),
                    "no numeric `tag` (VNI): not carried over",
                );
                continue;
            };
            let remotes = zone
                .value("peers")
                .map(|p| {
                    p.split([',', ' ', ';'])
                        .filter_map(|a| a.trim().parse::<IpAddr>().ok())
                        .filter(|a| !self.own_addresses.contains(a))
                        .collect()
                })
                .unwrap_or_default();
            let spec = NetworkSpec {
                net_type: NetworkType::Vxlan,
                mtu: zone.value("mtu").and_then(|m| m.parse().ok()),
                vlan_aware: v.value("vlanaware") == Some("1"),
                vxlan: Some(VxlanSpec {
                    vni,
                    local: None,
                    remotes,
                    port: zone
                        .value("vxlan-port")
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(4789),
                }),
                ..NetworkSpec::default()
            };
            for e in &v.entries {
                if !matches!(e.key.as_str(), "zone" | "tag" | "vlanaware") {
                    report.note(
                        vfile,
                        e.line,
                        &e.key,
                        format!(
                            "`{} {}`: a vnet setting the Network kind has no field for: not carried over",
                            e.key, e.value
                        ),
                    );
                }
            }
            for e in &zone.entries {
                if !matches!(e.key.as_str(), "peers" | "mtu" | "vxlan-port") {
                    report.note(
                        zfile,
                        e.line,
                        &e.key,
                        format!(
                            "`{} {}`: a zone setting the VXLAN Network has no field for (only peers, mtu, vxlan-port): not carried over",
                            e.key, e.value
                        ),
                    );
                }
            }
            let name = self.taken.claim(Some(&v.id), &format!("vnet-{vni}"));
            self.by_bridge.insert(
                v.id.clone(),
                NetInfo {
                    name: name.clone(),
                    vlan_aware: spec.vlan_aware,
                    addresses: vec![],
                },
            );
            self.manifests
                .push(Manifest::new(Kind::Network, &name, &spec, FILE));
        }
    }
}

/// A bond mode by name or number.
fn bond_mode(m: &str) -> Option<BondMode> {
    Some(match m {
        "balance-rr" | "0" => BondMode::BalanceRr,
        "active-backup" | "1" => BondMode::ActiveBackup,
        "balance-xor" | "2" => BondMode::BalanceXor,
        "broadcast" | "3" => BondMode::Broadcast,
        "802.3ad" | "4" => BondMode::Lacp,
        "balance-tlb" | "5" => BondMode::BalanceTlb,
        "balance-alb" | "6" => BondMode::BalanceAlb,
        _ => return None,
    })
}

/// `address` (CIDR, or an address with `netmask`) of every stanza.
fn addresses(i: &Iface, report: &mut Report) -> Vec<Cidr> {
    let mut out = Vec::new();
    for st in &i.stanzas {
        let Some(a) = st.options.get("address") else {
            continue;
        };
        let text = match (a.value.contains('/'), st.options.value("netmask")) {
            (true, _) => a.value.clone(),
            (false, Some(mask)) => match prefix_len(mask) {
                Some(p) => format!("{}/{p}", a.value),
                None => {
                    report.note(
                        &i.file,
                        a.line,
                        "netmask",
                        format!("`{mask}` is not a netmask: address not carried over"),
                    );
                    continue;
                }
            },
            (false, None) => format!(
                "{}/{}",
                a.value,
                if st.family == "inet6" { 128 } else { 32 }
            ),
        };
        match text.parse::<Cidr>() {
            Ok(c) => out.push(c),
            Err(e) => report.note(&i.file, a.line, "address", format!("{e}: not carried over")),
        }
    }
    out
}

/// The prefix length of a dotted netmask (`255.255.255.0` → 24) or a bare length.
fn prefix_len(mask: &str) -> Option<u8> {
    if let Ok(n) = mask.parse::<u8>() {
        return Some(n);
    }
    let ip: std::net::Ipv4Addr = mask.parse().ok()?;
    let bits = u32::from(ip);
    (bits.leading_ones() + bits.trailing_zeros() == 32).then(|| bits.leading_ones() as u8)
}

/// `mtu`.
fn mtu(i: &Iface, report: &mut Report) -> Option<u32> {
    let (v, line) = i.value("mtu")?;
    match v.parse() {
        Ok(m) => Some(m),
        Err(_) => {
            report.note(
                &i.file,
                line,
                "mtu",
                format!("`{v}` is not a number: not carried over"),
            );
            None
        }
    }
}

/// Why an `interfaces` option of a stanza imported as `kind` is left out.
fn iface_option_reason(key: &str, kind: &str) -> String {
    match key {
        "gateway" => format!("{kind} has no gateway"),
        "up" | "down" | "pre-up" | "post-up" | "pre-down" | "post-down" => {
            "stead runs no interface hook commands".to_string()
        }
        "bridge-stp" | "bridge-fd" => format!("{kind} has no spanning tree settings"),
        "hwaddress" => format!("{kind} sets no MAC address"),
        "dns-nameservers" | "dns-search" => {
            "resolver settings are the host's, not a Network's".to_string()
        }
        _ => format!("{kind} has no field for it"),
    }
}

/// Reports the options of `i` outside `keys`.
fn report_others(i: &Iface, keys: &[&str], kind: &str, report: &mut Report) {
    for st in &i.stanzas {
        for e in &st.options.entries {
            let default = BRIDGE_DEFAULTS.contains(&(e.key.as_str(), e.value.as_str()));
            if !keys.contains(&e.key.as_str()) && !default {
                let why = iface_option_reason(&e.key, kind);
                report.note(
                    &i.file,
                    e.line,
                    &e.key,
                    format!("`{} {}`: {why}: not carried over", e.key, e.value),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reader::{parse_interfaces, parse_section_config};

    const IFACES: &str = "auto lo\niface lo inet loopback\n\niface eno1 inet manual\niface eno2 inet manual\niface eno3 inet manual\niface eno4 inet manual\n\n\
auto bond0\niface bond0 inet manual\n\tbond-slaves eno2 eno3\n\tbond-miimon 100\n\tbond-mode 802.3ad\n\tbond-xmit-hash-policy layer3+4\n\n\
auto vmbr0\niface vmbr0 inet static\n\taddress 192.168.1.10/24\n\tgateway 192.168.1.1\n\tbridge-ports eno1\n\tbridge-stp off\n\tbridge-fd 0\n\n\
iface vmbr0 inet6 static\n\taddress fd00::10/64\n\n\
auto vmbr1\niface vmbr1 inet static\n\taddress 10.10.0.1\n\tnetmask 255.255.0.0\n\tbridge-ports bond0\n\tbridge-vlan-aware yes\n\tbridge-vids 2-4094\n\tmtu 9000\n\n\
iface eno4.50 inet manual\n";

    fn nets() -> (Networks, Vec<String>) {
        let f = PathBuf::from("interfaces");
        let parsed = parse_interfaces(&f, IFACES).unwrap();
        let mut n = Networks::default();
        let mut r = Report::default();
        n.import_interfaces(&group(vec![(f, parsed)]), &mut r);
        (n, r.notes().iter().map(|n| n.render()).collect())
    }

    #[test]
    fn bridges_and_bonds() {
        let (n, notes) = nets();
        let kinds: Vec<(Kind, &str)> = n
            .manifests
            .iter()
            .map(|m| (m.kind, m.name.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                (Kind::Bond, "bond0"),
                (Kind::Network, "vmbr0"),
                (Kind::Network, "vmbr1")
            ]
        );
        let bond = &n.manifests[0].spec;
        assert_eq!(bond["mode"], "802.3ad");
        assert_eq!(bond["slaves"], serde_json::json!(["eno2", "eno3"]));
        assert_eq!(bond["miimon"], 100);
        let v0 = &n.manifests[1].spec;
        assert_eq!(v0["ports"], serde_json::json!(["eno1"]));
        assert_eq!(
            v0["addresses"],
            serde_json::json!(["192.168.1.10/24", "fd00::10/64"])
        );
        let v1 = &n.manifests[2].spec;
        assert_eq!(v1["addresses"], serde_json::json!(["10.10.0.1/16"]));
        assert_eq!(v1["vlanAware"], true);
        assert_eq!(v1["mtu"], 9000);
        assert_eq!(n.by_bridge["vmbr1"].name, "vmbr1");
        assert!(n.by_bridge["vmbr1"].vlan_aware);
        for p in [
            "interfaces:7: iface eno4: a physical port",
            "interfaces:14: bond-xmit-hash-policy:",
            "interfaces:19: gateway: `gateway 192.168.1.1`: the Network kind has no gateway",
            "interfaces:33: bridge-vids:",
            "interfaces:36: iface eno4.50: a VLAN sub-interface",
        ] {
            assert!(notes.iter().any(|n| n.starts_with(p)), "{p} in {notes:?}");
        }
        assert!(
            !notes.iter().any(|n| n.contains("iface eno1")
                || n.contains("iface eno2")
                || n.contains("bridge-stp off")),
            "{notes:?}"
        );
    }

    #[test]
    fn interface_options_left_out_say_why() {
        let k = "the Network kind";
        assert_eq!(
            iface_option_reason("post-up", k),
            "stead runs no interface hook commands"
        );
        assert_eq!(
            iface_option_reason("bridge-stp", k),
            "the Network kind has no spanning tree settings"
        );
        assert_eq!(
            iface_option_reason("bond-xmit-hash-policy", "the Bond kind"),
            "the Bond kind has no field for it"
        );
        let (_, notes) = nets();
        assert!(
            notes.iter().any(|n| n
                .starts_with("interfaces:14: bond-xmit-hash-policy: `bond-xmit-hash-policy ")
                && n.ends_with("`: the Bond kind has no field for it: not carried over")),
            "{notes:?}"
        );
    }

    #[test]
    fn netmasks() {
        assert_eq!(prefix_len("255.255.255.0"), Some(24));
        assert_eq!(prefix_len("255.255.0.0"), Some(16));
        assert_eq!(prefix_len("24"), Some(24));
        assert_eq!(prefix_len("255.0.255.0"), None);
    }

    #[test]
    fn sdn_vxlan() {
        let (mut n, _) = nets();
        let zf = PathBuf::from("zones.cfg");
        let vf = PathBuf::from("vnets.cfg");
        let zones = parse_section_config(&zf, "vxlan: overlay\n\tpeers 192.168.1.10,192.168.1.11,192.168.1.12\n\tmtu 1450\n\tipam pve\n\nsimple: lab\n\tipam pve\n").unwrap();
        let vnets = parse_section_config(
            &vf,
            "vnet: vnet100\n\tzone overlay\n\ttag 100\n\nvnet: labnet\n\tzone lab\n",
        )
        .unwrap();
        let mut r = Report::default();
        n.import_sdn((&zf, &zones), (&vf, &vnets), &mut r);
        let m = n.manifests.last().unwrap();
        assert_eq!(m.name, "vnet100");
        assert_eq!(m.spec["type"], "vxlan");
        assert_eq!(m.spec["mtu"], 1450);
        assert_eq!(m.spec["vxlan"]["vni"], 100);
        assert_eq!(
            m.spec["vxlan"]["remotes"],
            serde_json::json!(["192.168.1.11", "192.168.1.12"])
        );
        let notes: Vec<String> = r.notes().iter().map(|n| n.render()).collect();
        assert!(
            notes
                .iter()
                .any(|n| n.starts_with("zones.cfg:6: simple: lab: SDN zone type")),
            "{notes:?}"
        );
        assert!(
            notes
                .iter()
                .any(|n| n.starts_with("vnets.cfg:5: vnet: labnet: in the `simple` zone")),
            "{notes:?}"
        );
        assert!(
            notes.iter().any(|n| n.starts_with("zones.cfg:4: ipam:")),
            "{notes:?}"
        );
    }
}
