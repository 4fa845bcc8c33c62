//! The `Bond` driver: a Linux bond (`kind bond`) with its slaves, over netlink.
//!
//! Kernels built without bonding refuse the link kind (`EOPNOTSUPP`, "Unknown device
//! type"); apply then fails with [`DriverError::Unsupported`] ("kernel lacks bonding").

use std::collections::BTreeMap;
use std::sync::Mutex;

use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::link::{BondMode as NlBondMode, InfoBond, InfoData, LinkInfo};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::{LinkBond, LinkUnspec};
use serde_json::{Value, json};
use stead_reconciler::driver::{DriverError, Health, HostEnv, Impact, Lookup, Observed, Typed};
use stead_schema::{BondMode, BondSpec, Kind, ResourceId};

use super::netns::NetnsRef;
use super::nl::{Netlink, nl_err};
use super::{
    Ownership, STEAD_LINK_GROUP, claim, create_link, delete_link_index, owner_alias, ownership,
    set_link,
};

/// Drives `Bond` resources inside one network namespace.
#[derive(Debug)]
pub struct BondDriver {
    nl: Mutex<Netlink>,
}

fn mode_name(m: BondMode) -> &'static str {
    match m {
        BondMode::BalanceRr => "balance-rr",
        BondMode::ActiveBackup => "active-backup",
        BondMode::BalanceXor => "balance-xor",
        BondMode::Broadcast => "broadcast",
        BondMode::Lacp => "802.3ad",
        BondMode::BalanceTlb => "balance-tlb",
        BondMode::BalanceAlb => "balance-alb",
    }
}

fn nl_mode(m: BondMode) -> NlBondMode {
    match m {
        BondMode::BalanceRr => NlBondMode::BalanceRr,
        BondMode::ActiveBackup => NlBondMode::ActiveBackup,
        BondMode::BalanceXor => NlBondMode::BalanceXor,
        BondMode::Broadcast => NlBondMode::Broadcast,
        BondMode::Lacp => NlBondMode::Ieee8023Ad,
        BondMode::BalanceTlb => NlBondMode::BalanceTlb,
        BondMode::BalanceAlb => NlBondMode::BalanceAlb,
    }
}

fn nl_mode_name(m: &NlBondMode) -> String {
    match m {
        NlBondMode::BalanceRr => "balance-rr".into(),
        NlBondMode::ActiveBackup => "active-backup".into(),
        NlBondMode::BalanceXor => "balance-xor".into(),
        NlBondMode::Broadcast => "broadcast".into(),
        NlBondMode::Ieee8023Ad => "802.3ad".into(),
        NlBondMode::BalanceTlb => "balance-tlb".into(),
        NlBondMode::BalanceAlb => "balance-alb".into(),
        NlBondMode::Other(x) => format!("mode-{x}"),
        _ => "unknown".into(),
    }
}

/// Bond attributes read from a RTM_NEWLINK dump entry: (mode, miimon).
fn bond_info(m: &LinkMessage) -> (Option<String>, Option<u32>) {
    let mut mode = None;
    let mut miimon = None;
    for a in &m.attributes {
        if let LinkAttribute::LinkInfo(infos) = a {
            for i in infos {
                if let LinkInfo::Data(InfoData::Bond(b)) = i {
                    for x in b {
                        match x {
                            InfoBond::Mode(md) => mode = Some(nl_mode_name(md)),
                            InfoBond::MiiMon(v) => miimon = Some(*v),
                            _ => {}
                        }
                    }
                }
            }
        }
    }
    (mode, miimon)
}

impl BondDriver {
    /// A driver managing bonds in `env.netns` (the caller's namespace when `None`).
    pub fn new(env: &HostEnv) -> Result<Self, DriverError> {
        let ns = env.netns.as_deref().map(NetnsRef::from);
        Ok(BondDriver {
            nl: Mutex::new(Netlink::open(ns.as_ref())?),
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Netlink>, DriverError> {
        self.nl
            .lock()
            .map_err(|_| DriverError::Other("netlink socket lock poisoned".into()))
    }
}

impl stead_reconciler::driver::KindDriver for BondDriver {
    type Spec = BondSpec;

    fn observe(
        &self,
        targets: &[Typed<'_, BondSpec>],
        _world: &dyn Lookup,
    ) -> Result<BTreeMap<ResourceId, Observed>, DriverError> {
        let mut nl = self.lock()?;
        let msgs = nl
            .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))
            .map_err(|e| nl_err("dump links", e))?;
        let raw: Vec<LinkMessage> = msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .collect();
        let links: Vec<_> = raw.iter().map(super::nl::Link::from_msg).collect();
        let mut out = BTreeMap::new();
        for t in targets {
            let (r, spec) = (t.resource, t.spec);
            let owner = owner_alias(Kind::Bond, &r.id.name);
            let Some((i, l)) = links.iter().enumerate().find(|(_, l)| l.name == r.id.name) else {
                out.insert(r.id.clone(), Observed::absent());
                continue;
            };
            let (mode, miimon) = bond_info(&raw[i]);
            let mut slaves: Vec<&str> = links
                .iter()
                .filter(|s| s.controller == Some(l.index))
                .map(|s| s.name.as_str())
                .collect();
            slaves.sort();
            let mut st = serde_json::Map::new();
            st.insert("mode".into(), json!(mode));
            if spec.miimon.is_some() {
                st.insert("miimon".into(), json!(miimon));
            }
            if spec.mtu.is_some() {
                st.insert("mtu".into(), json!(l.mtu));
            }
            st.insert("slaves".into(), json!(slaves));
            st.insert("up".into(), json!(l.up));
            out.insert(
                r.id.clone(),
                Observed {
                    exists: true,
                    owned: ownership(l, &owner) != Ownership::Foreign,
                    state: Value::Object(st),
                    status: json!({"ifindex": l.index, "kind": l.kind}),
                    health: if l.up {
                        Health::Ready
                    } else {
                        Health::Degraded("bond is down".into())
                    },
                },
            );
        }
        Ok(out)
    }

    fn desired_state(&self, desired: Typed<'_, BondSpec>, _world: &dyn Lookup) -> Value {
        let spec = desired.spec;
        let mut slaves: Vec<&str> = spec.slaves.iter().map(|s| s.as_str()).collect();
        slaves.sort();
        slaves.dedup();
        let mut st = serde_json::Map::new();
        st.insert("mode".into(), json!(mode_name(spec.mode)));
        if let Some(m) = spec.miimon {
            st.insert("miimon".into(), json!(m));
        }
        if let Some(m) = spec.mtu {
            st.insert("mtu".into(), json!(m));
        }
        st.insert("slaves".into(), json!(slaves));
        st.insert("up".into(), json!(true));
        Value::Object(st)
    }

    fn impact(&self, path: &str) -> Impact {
        if path == "/mode" {
            Impact::Recreate
        } else {
            Impact::Hot
        }
    }

    fn apply(
        &self,
        desired: Typed<'_, BondSpec>,
        _observed: &Observed,
        _world: &dyn Lookup,
    ) -> Result<(), DriverError> {
        let (desired, spec) = (desired.resource, desired.spec);
        let _span = tracing::info_span!("apply", resource = %desired.id).entered();
        let name = desired.id.name.as_str();
        let owner = owner_alias(Kind::Bond, name);
        let mut nl = self.lock()?;
        let links = nl.links()?;
        let bond = match links.iter().find(|l| l.name == name) {
            Some(l) => {
                claim(&mut nl, l, &owner)?;
                l.clone()
            }
            None => {
                let mut b = LinkBond::new(name)
                    .mode(nl_mode(spec.mode))
                    .link_group(STEAD_LINK_GROUP);
                if let Some(m) = spec.miimon {
                    b = b.miimon(m);
                }
                if let Some(m) = spec.mtu {
                    b = b.mtu(m);
                }
                match create_link(&mut nl, b.build(), name, &owner) {
                    Err(DriverError::Unsupported(m)) => {
                        return Err(DriverError::Unsupported(format!(
                            "kernel lacks bonding (Bond/{name}): {m}"
                        )));
                    }
                    other => other?,
                }
            }
        };
        if let Some(m) = spec.mtu
            && bond.mtu != m
        {
            set_link(
                &mut nl,
                LinkUnspec::new_with_index(bond.index).mtu(m).build(),
                name,
            )?;
        }
        for s in &spec.slaves {
            let l = links.iter().find(|l| l.name == s.as_str()).ok_or_else(|| {
                DriverError::NotReady(format!("slave {s} of {name} does not exist"))
            })?;
            if l.controller != Some(bond.index) {
                // A slave must be down to be enslaved.
                set_link(
                    &mut nl,
                    LinkUnspec::new_with_index(l.index).down().build(),
                    s.as_str(),
                )?;
                set_link(
                    &mut nl,
                    LinkUnspec::new_with_index(l.index)
                        .controller(bond.index)
                        .up()
                        .build(),
                    s.as_str(),
                )?;
            }
        }
        for l in links.iter().filter(|l| l.controller == Some(bond.index)) {
            if !spec.slaves.iter().any(|s| s.as_str() == l.name) {
                set_link(
                    &mut nl,
                    LinkUnspec::new_with_index(l.index).nocontroller().build(),
                    &l.name,
                )?;
            }
        }
        if !bond.up {
            set_link(
                &mut nl,
                LinkUnspec::new_with_index(bond.index).up().build(),
                name,
            )?;
        }
        Ok(())
    }

    fn delete(
        &self,
        last_applied: Typed<'_, BondSpec>,
        _observed: &Observed,
        _world: &dyn Lookup,
    ) -> Result<(), DriverError> {
        let name = last_applied.name();
        let owner = owner_alias(Kind::Bond, name);
        let mut nl = self.lock()?;
        let Some(l) = nl.link_by_name(name)? else {
            return Ok(());
        };
        if ownership(&l, &owner) == Ownership::Foreign {
            tracing::warn!(bond = name, "not owned by stead: left alone");
            return Ok(());
        }
        delete_link_index(&mut nl, l.index, name)
    }
}
