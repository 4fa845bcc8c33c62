//! NAT and port forwards in the nftables table `inet stead`, which stead owns.
//!
//! Rules are tagged with the comment `stead:Network/<name>`. Applying one network
//! compares its rules (as nft lists them back, in canonical JSON) with the rules its spec
//! asks for; when they differ — or a base chain is missing or changed — the whole table
//! is rebuilt in one atomic `nft` transaction (`add table; delete table; add table;
//! add chains; add rules`), keeping the other networks' rules as they are. No other table
//! is ever read or written.
//!
//! `nft` runs inside the driver's network namespace: the child enters it with `setns`
//! between fork and exec.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use nftables::expr::Expression;
use nftables::schema::{
    Chain, Element, NfCmd, NfListObject, NfObject, Nftables, Rule, Set, SetType, SetTypeValue,
    Table,
};
use nftables::stmt::Statement;
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use serde_json::{Value, json};
use stead_reconciler::driver::DriverError;
use stead_schema::{Cidr, ForwardSpec, NetworkSpec, Protocol};

use super::netns::{NetnsRef, run_in};

/// The table stead owns (family `inet`).
pub const TABLE: &str = "stead";

/// The set of bridges whose forwarded traffic is accepted.
pub const SET: &str = "bridges";

/// Comment of the skeleton's shared rules.
const SHARED_COMMENT: &str = "stead:bridges";

/// The base chains: name, type, hook, priority.
const CHAINS: [(&str, NfChainType, NfHook, i32); 4] = [
    ("prerouting", NfChainType::NAT, NfHook::Prerouting, -100),
    ("output", NfChainType::NAT, NfHook::Output, -100),
    ("postrouting", NfChainType::NAT, NfHook::Postrouting, 100),
    ("forward", NfChainType::Filter, NfHook::Forward, 0),
];

/// One rule: chain, statements (canonical JSON, as `nft -j` lists them), comment.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NftRule {
    pub(crate) chain: String,
    pub(crate) expr: Value,
    pub(crate) comment: Option<String>,
    /// The kernel's handle (listed rules only).
    pub(crate) handle: Option<u32>,
}

/// The tables of `ruleset` (the text of `nft list ruleset`) other than `inet stead`
/// with a line naming interface `iface` in quotes, as nft prints interface names.
fn tables_naming(ruleset: &str, iface: &str) -> Vec<String> {
    let quoted = format!("\"{iface}\"");
    let mut out: Vec<String> = Vec::new();
    let mut table: Option<String> = None;
    for line in ruleset.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("table ") {
            table = Some(rest.trim_end_matches('{').trim().to_string());
            continue;
        }
        let Some(t) = &table else { continue };
        let ours = *t == format!("inet {TABLE}");
        if !ours && line.contains(&quoted) && !out.contains(t) {
            out.push(t.clone());
        }
    }
    out
}

/// The table as listed.
#[derive(Debug, Clone, Default)]
pub(crate) struct NftTable {
    /// Whether the table exists.
    pub(crate) exists: bool,
    /// Whether the table's skeleton is intact: the base chains exactly as stead
    /// declares them, the `bridges` set and the two rules accepting its members.
    pub(crate) chains_ok: bool,
    /// Every per-network rule (the skeleton's shared rules are not listed here).
    pub(crate) rules: Vec<NftRule>,
    /// Members of the `bridges` set: bridges whose forwarded traffic is accepted.
    pub(crate) bridges: BTreeSet<String>,
    /// Rules by comment, each list sorted.
    by_owner: BTreeMap<String, Vec<(String, Value)>>,
}

impl NftTable {
    /// Rules tagged `owner`, sorted (for comparison).
    pub(crate) fn rules_of(&self, owner: &str) -> Vec<(String, Value)> {
        self.by_owner.get(owner).cloned().unwrap_or_default()
    }

    fn index(&mut self) {
        let mut by: BTreeMap<String, Vec<(String, String, Value)>> = BTreeMap::new();
        for r in &self.rules {
            if let Some(c) = &r.comment {
                by.entry(c.clone()).or_default().push((
                    r.chain.clone(),
                    r.expr.to_string(),
                    r.expr.clone(),
                ));
            }
        }
        self.by_owner = by
            .into_iter()
            .map(|(k, mut v)| {
                v.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
                (k, v.into_iter().map(|(c, _, e)| (c, e)).collect())
            })
            .collect();
    }
}

/// Runs `nft` in a network namespace.
#[derive(Debug, Clone)]
pub(crate) struct Nft {
    netns: Option<Arc<OwnedFd>>,
    ns_ref: Option<NetnsRef>,
    runs: Arc<AtomicU64>,
}

fn cmd_err(args: &[&str], status: String, stderr: &str) -> DriverError {
    DriverError::Command {
        command: format!("nft {}", args.join(" ")),
        status,
        stderr: stderr.trim().to_string(),
    }
}

impl Nft {
    pub(crate) fn new(ns: Option<&NetnsRef>) -> Result<Self, DriverError> {
        let netns = match ns {
            Some(n) => Some(Arc::new(OwnedFd::from(n.open()?))),
            None => None,
        };
        Ok(Nft {
            netns,
            ns_ref: ns.cloned(),
            runs: Arc::new(AtomicU64::new(0)),
        })
    }

    /// How many times `nft` ran.
    pub(crate) fn invocations(&self) -> u64 {
        self.runs.load(Ordering::Relaxed)
    }

    /// Runs `nft ARGS` with `stdin`; returns (success, stdout, stderr).
    fn run(
        &self,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<(bool, String, String), DriverError> {
        self.runs.fetch_add(1, Ordering::Relaxed);
        let mut c = Command::new("nft");
        c.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // A child starts in the network namespace of the thread that spawns it: spawn
        // from a thread that entered the namespace.
        let ns = self.netns.as_ref().map(|fd| NetnsRef::Fd(fd.as_raw_fd()));
        let mut child = run_in(ns.as_ref(), || {
            c.spawn().map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    DriverError::Unsupported(
                        "the nft binary is missing (apt package nftables)".into(),
                    )
                } else {
                    DriverError::io("spawn nft", e)
                }
            })
        })?;
        if let Some(input) = stdin
            && let Some(mut si) = child.stdin.take()
        {
            si.write_all(input.as_bytes())
                .map_err(|e| DriverError::io("write nft input", e))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| DriverError::io("wait for nft", e))?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// The tables other than stead's whose rules name interface `iface` (e.g. another
    /// tool's NAT for a bridge), as `family name`.
    pub(crate) fn other_tables_naming(&self, iface: &str) -> Result<Vec<String>, DriverError> {
        let args = ["list", "ruleset"];
        let (ok, out, err) = self.run(&args, None)?;
        if !ok {
            return Err(cmd_err(&args, "exit".into(), &err));
        }
        Ok(tables_naming(&out, iface))
    }

    /// Lists the stead table (absent: `exists == false`).
    pub(crate) fn list(&self) -> Result<NftTable, DriverError> {
        let args = ["-j", "list", "table", "inet", TABLE];
        let (ok, out, err) = self.run(&args, None)?;
        if !ok {
            if err.contains("No such file or directory") || err.contains("does not exist") {
                return Ok(NftTable::default());
            }
            return Err(cmd_err(&args, "exit".into(), &err));
        }
        let doc: Nftables = serde_json::from_str(&out).map_err(|e| {
            DriverError::Other(format!(
                "cannot parse `nft -j list table inet {TABLE}`: {e}"
            ))
        })?;
        let mut t = NftTable {
            exists: true,
            ..NftTable::default()
        };
        let mut chains_seen = 0;
        let mut set_ok = false;
        let mut shared_seen: HashSet<String> = HashSet::new();
        let shared = shared_rules();
        for o in doc.objects.iter() {
            match o {
                NfObject::ListObject(NfListObject::Chain(c)) => {
                    let good = CHAINS.iter().any(|(n, ty, hook, prio)| {
                        c.name == *n
                            && c._type == Some(*ty)
                            && c.hook == Some(*hook)
                            && c.prio == Some(*prio)
                            && c.policy == Some(NfChainPolicy::Accept)
                    });
                    if good {
                        chains_seen += 1;
                    }
                }
                NfObject::ListObject(NfListObject::Set(set)) if set.name == SET => {
                    set_ok = set.set_type == SetTypeValue::Single(SetType::Ifname);
                    let elems = serde_json::to_value(&set.elem).unwrap_or(Value::Null);
                    for e in elems.as_array().into_iter().flatten() {
                        if let Some(name) = e.as_str() {
                            t.bridges.insert(name.to_string());
                        }
                    }
                }
                NfObject::ListObject(NfListObject::Rule(r)) => {
                    let expr = serde_json::to_value(&r.expr).unwrap_or(Value::Null);
                    if r.comment.as_deref() == Some(SHARED_COMMENT) {
                        if let Some((c, _)) =
                            shared.iter().find(|(c, e)| r.chain == *c && *e == expr)
                        {
                            shared_seen.insert(c.to_string() + &expr.to_string());
                        }
                        continue;
                    }
                    t.rules.push(NftRule {
                        chain: r.chain.to_string(),
                        expr,
                        comment: r.comment.as_ref().map(|c| c.to_string()),
                        handle: r.handle,
                    });
                }
                _ => {}
            }
        }
        t.chains_ok = chains_seen == CHAINS.len() && set_ok && shared_seen.len() == shared.len();
        t.index();
        Ok(t)
    }

    /// Makes the rules tagged `owner` exactly `expected` and `bridge`'s membership of
    /// the `bridges` set `accept`, in one atomic transaction. When the skeleton is
    /// intact only that owner's rules and element are swapped (delete by handle + add);
    /// otherwise the whole table is rebuilt, keeping the other owners' rules and
    /// elements. A table left with nothing in it is deleted.
    pub(crate) fn set_rules(
        &self,
        current: &NftTable,
        owner: &str,
        bridge: &str,
        expected: Vec<(String, Value)>,
        accept: bool,
    ) -> Result<NftTable, DriverError> {
        let mine = |r: &&NftRule| r.comment.as_deref() == Some(owner);
        let others = current.rules.iter().filter(|r| !mine(r)).count();
        let new_rules: Vec<NftRule> = expected
            .into_iter()
            .map(|(chain, expr)| NftRule {
                chain,
                expr,
                comment: Some(owner.to_string()),
                handle: None,
            })
            .collect();
        let mut bridges = current.bridges.clone();
        if accept {
            bridges.insert(bridge.to_string());
        } else {
            bridges.remove(bridge);
        }
        let incremental = current.exists
            && current.chains_ok
            && others + new_rules.len() + bridges.len() > 0
            && current
                .rules
                .iter()
                .filter(mine)
                .all(|r| r.handle.is_some());
        if !incremental {
            let mut rules: Vec<NftRule> =
                current.rules.iter().filter(|r| !mine(r)).cloned().collect();
            rules.extend(new_rules);
            return self.replace(current, &rules, &bridges);
        }
        let mut objs: Vec<NfObject> = Vec::new();
        for r in current.rules.iter().filter(mine) {
            objs.push(NfObject::CmdObject(NfCmd::Delete(NfListObject::Rule(
                Rule {
                    family: NfFamily::INet,
                    table: Cow::Borrowed(TABLE),
                    chain: Cow::Owned(r.chain.clone()),
                    handle: r.handle,
                    ..Rule::default()
                },
            ))));
        }
        for r in &new_rules {
            objs.push(rule_obj(r)?);
        }
        let element = || {
            NfListObject::Element(Element {
                family: NfFamily::INet,
                table: Cow::Borrowed(TABLE),
                name: Cow::Borrowed(SET),
                elem: Cow::Owned(vec![Expression::String(Cow::Owned(bridge.to_string()))]),
            })
        };
        match (current.bridges.contains(bridge), accept) {
            (false, true) => objs.push(NfObject::CmdObject(NfCmd::Add(element()))),
            (true, false) => objs.push(NfObject::CmdObject(NfCmd::Delete(element()))),
            _ => {}
        }
        if objs.is_empty() {
            return Ok(current.clone());
        }
        tracing::info!(
            owner,
            add = new_rules.len(),
            accept,
            "swapping rules in table inet {TABLE}"
        );
        self.transact(objs)?;
        // New rules' handles are not known (echoing them back costs a full cache
        // fetch in nft); a later swap of this owner's rules without handles rebuilds.
        let mut t = NftTable {
            exists: true,
            chains_ok: true,
            rules: current.rules.iter().filter(|r| !mine(r)).cloned().collect(),
            bridges,
            by_owner: BTreeMap::new(),
        };
        t.rules.extend(new_rules);
        t.index();
        Ok(t)
    }

    /// Runs one atomic transaction.
    fn transact(&self, objs: Vec<NfObject>) -> Result<(), DriverError> {
        let doc = Nftables {
            objects: Cow::Owned(objs),
        };
        let text = serde_json::to_string(&doc)
            .map_err(|e| DriverError::Other(format!("serialize nft batch: {e}")))?;
        let args = ["-j", "-f", "-"];
        let (ok, _, err) = self.run(&args, Some(&text))?;
        if !ok {
            return Err(cmd_err(
                &args,
                "exit".into(),
                &format!("{err} (batch: {text})"),
            ));
        }
        Ok(())
    }

    /// Replaces the whole table with its skeleton, `rules` and `bridges` atomically;
    /// deletes it when both are empty.
    pub(crate) fn replace(
        &self,
        current: &NftTable,
        rules: &[NftRule],
        bridges: &BTreeSet<String>,
    ) -> Result<NftTable, DriverError> {
        let fam = NfFamily::INet;
        let table = || Table {
            family: fam,
            name: Cow::Borrowed(TABLE),
            handle: None,
        };
        let empty = rules.is_empty() && bridges.is_empty();
        let mut objs: Vec<NfObject> = Vec::new();
        if empty {
            if !current.exists {
                return Ok(NftTable::default());
            }
            objs.push(NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(
                table(),
            ))));
        } else {
            // add+delete first, so the delete cannot fail on a missing table.
            objs.push(NfObject::CmdObject(NfCmd::Add(
                NfListObject::Table(table()),
            )));
            objs.push(NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(
                table(),
            ))));
            objs.push(NfObject::CmdObject(NfCmd::Add(
                NfListObject::Table(table()),
            )));
            for (name, ty, hook, prio) in CHAINS {
                objs.push(NfObject::CmdObject(NfCmd::Add(NfListObject::Chain(
                    Chain {
                        family: fam,
                        table: Cow::Borrowed(TABLE),
                        name: Cow::Borrowed(name),
                        _type: Some(ty),
                        hook: Some(hook),
                        prio: Some(prio),
                        policy: Some(NfChainPolicy::Accept),
                        ..Chain::default()
                    },
                ))));
            }
            let elem: Vec<Expression> = bridges
                .iter()
                .map(|b| Expression::String(Cow::Owned(b.clone())))
                .collect();
            objs.push(NfObject::CmdObject(NfCmd::Add(NfListObject::Set(
                Box::new(Set {
                    family: fam,
                    table: Cow::Borrowed(TABLE),
                    name: Cow::Borrowed(SET),
                    set_type: SetTypeValue::Single(SetType::Ifname),
                    elem: if elem.is_empty() {
                        None
                    } else {
                        Some(Cow::Owned(elem))
                    },
                    ..Set::default()
                }),
            ))));
            for (chain, expr) in shared_rules() {
                objs.push(rule_obj(&NftRule {
                    chain: chain.to_string(),
                    expr,
                    comment: Some(SHARED_COMMENT.to_string()),
                    handle: None,
                })?);
            }
            for r in rules {
                match rule_obj(r) {
                    Ok(o) => objs.push(o),
                    Err(e) => {
                        tracing::warn!(error = %e, "dropping a listed rule the schema cannot read")
                    }
                }
            }
        }
        self.transact(objs)?;
        tracing::info!(
            rules = rules.len(),
            bridges = bridges.len(),
            "rebuilt nftables table inet {TABLE}"
        );
        let mut t = NftTable {
            exists: !empty,
            chains_ok: !empty,
            rules: rules
                .iter()
                .map(|r| NftRule {
                    handle: None,
                    ..r.clone()
                })
                .collect(),
            bridges: bridges.clone(),
            by_owner: BTreeMap::new(),
        };
        t.index();
        Ok(t)
    }

    /// Reads the sysctl `key` (`net/ipv4/ip_forward`) of the namespace (procfs's sysctl
    /// tree is per netns of the reader).
    pub(crate) fn sysctl_get(&self, key: &'static str) -> Result<String, DriverError> {
        run_in(self.ns_ref.as_ref(), move || {
            let path = stead_host::ProcFs::host().sysctl(key);
            std::fs::read_to_string(&path)
                .map(|s| s.trim().to_string())
                .map_err(|e| DriverError::io(format!("read {}", path.display()), e))
        })
    }

    /// Writes a sysctl of the namespace.
    pub(crate) fn sysctl_set(
        &self,
        key: &'static str,
        value: &'static str,
    ) -> Result<(), DriverError> {
        run_in(self.ns_ref.as_ref(), move || {
            let path = stead_host::ProcFs::host().sysctl(key);
            std::fs::write(&path, value)
                .map_err(|e| DriverError::io(format!("write {}", path.display()), e))
        })
    }
}

fn rule_obj(r: &NftRule) -> Result<NfObject<'static>, DriverError> {
    let expr: Vec<Statement<'static>> = serde_json::from_value(r.expr.clone())
        .map_err(|e| DriverError::Other(format!("nft rule {}: {e}", r.expr)))?;
    Ok(NfObject::CmdObject(NfCmd::Add(NfListObject::Rule(Rule {
        family: NfFamily::INet,
        table: Cow::Borrowed(TABLE),
        chain: Cow::Owned(r.chain.clone()),
        expr: Cow::Owned(expr),
        comment: r.comment.clone().map(Cow::Owned),
        ..Rule::default()
    }))))
}

// ------------------------------------------------------------------ rule shapes

/// `ip` or `ip6` (the nft payload protocol) of an address.
fn fam(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() { "ip" } else { "ip6" }
}

fn prefix(c: &Cidr) -> Value {
    let n = c.network();
    json!({"prefix": {"addr": n.addr.to_string(), "len": n.prefix}})
}

fn m(op: &str, left: Value, right: Value) -> Value {
    json!({"match": {"op": op, "left": left, "right": right}})
}

fn payload(proto: &str, field: &str) -> Value {
    json!({"payload": {"protocol": proto, "field": field}})
}

fn meta(key: &str) -> Value {
    json!({"meta": {"key": key}})
}

pub(crate) fn proto_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

/// The distinct subnets (networks) of a network's addresses, sorted.
pub(crate) fn subnets(spec: &NetworkSpec) -> Vec<Cidr> {
    let mut v: Vec<Cidr> = spec.addresses.iter().map(|a| a.network()).collect();
    v.sort();
    v.dedup();
    v
}

fn nat_enabled(spec: &NetworkSpec) -> bool {
    spec.nat.as_ref().is_some_and(|n| n.enabled) && !subnets(spec).is_empty()
}

/// Whether the network needs forwarding (and so rules and `ip_forward`).
pub(crate) fn routed(spec: &NetworkSpec) -> bool {
    nat_enabled(spec) || !spec.forwards.is_empty()
}

fn masq_rule(bridge: &str, subnet: &Cidr, egress: Option<&str>) -> Value {
    let f = fam(&subnet.addr);
    let oif = match egress {
        Some(e) => m("==", meta("oifname"), json!(e)),
        None => m("!=", meta("oifname"), json!(bridge)),
    };
    json!([
        m("==", payload(f, "saddr"), prefix(subnet)),
        m("!=", payload(f, "daddr"), prefix(subnet)),
        oif,
        {"masquerade": null}
    ])
}

fn dnat_rule(f: &ForwardSpec) -> Value {
    let ip = f.to.ip();
    let (nfproto, family) = if ip.is_ipv4() {
        ("ipv4", "ip")
    } else {
        ("ipv6", "ip6")
    };
    json!([
        m("==", json!({"fib": {"result": "type", "flags": ["daddr"]}}), json!("local")),
        m("==", meta("nfproto"), json!(nfproto)),
        m("==", payload(proto_name(f.protocol), "dport"), json!(f.host_port)),
        {"dnat": {"family": family, "addr": ip.to_string(), "port": f.to.port()}}
    ])
}

fn hairpin_rule(subnet: &Cidr, f: &ForwardSpec) -> Value {
    let ip = f.to.ip();
    json!([
        m("in", json!({"ct": {"key": "status"}}), json!("dnat")),
        m("==", payload(fam(&ip), "saddr"), prefix(subnet)),
        m("==", payload(fam(&ip), "daddr"), json!(ip.to_string())),
        m("==", payload(proto_name(f.protocol), "dport"), json!(f.to.port())),
        {"masquerade": null}
    ])
}

/// The skeleton's two forward-chain rules accepting traffic from and to the members of
/// the `bridges` set (bridged traffic crosses the forward hook too when
/// `bridge-nf-call-iptables` is on).
fn shared_rules() -> Vec<(&'static str, Value)> {
    ["iifname", "oifname"]
        .into_iter()
        .map(|dir| {
            (
                "forward",
                normalize(json!([m("==", meta(dir), json!(format!("@{SET}"))), {"accept": null}])),
            )
        })
        .collect()
}

/// The subnet of `spec` holding `ip`, if any (then the forward needs a hairpin rule).
fn subnet_of(spec: &NetworkSpec, ip: IpAddr) -> Option<Cidr> {
    subnets(spec)
        .into_iter()
        // Same family first: Cidr::contains assumes it.
        .find(|s| s.addr.is_ipv4() == ip.is_ipv4() && s.contains(ip))
}

/// Every rule network `bridge` with `spec` needs, tagged `owner`, sorted.
pub(crate) fn expected_rules(bridge: &str, spec: &NetworkSpec) -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = Vec::new();
    if nat_enabled(spec) {
        let egress = spec
            .nat
            .as_ref()
            .and_then(|n| n.egress.as_ref())
            .map(|e| e.as_str());
        for s in subnets(spec) {
            out.push(("postrouting".into(), masq_rule(bridge, &s, egress)));
        }
    }
    for f in &spec.forwards {
        out.push(("prerouting".into(), dnat_rule(f)));
        out.push(("output".into(), dnat_rule(f)));
        if let Some(s) = subnet_of(spec, f.to.ip()) {
            out.push(("postrouting".into(), hairpin_rule(&s, f)));
        }
    }
    let mut out: Vec<(String, Value)> = out.into_iter().map(|(c, e)| (c, normalize(e))).collect();
    out.sort_by_key(|(c, e)| (c.clone(), e.to_string()));
    out.dedup();
    out
}

/// Passes statements through the `nftables` schema types, so generated rules and
/// listed rules have the same JSON form (key order included).
fn normalize(e: Value) -> Value {
    match serde_json::from_value::<Vec<Statement>>(e.clone()) {
        Ok(st) => serde_json::to_value(&st).unwrap_or(e),
        Err(_) => e,
    }
}

// ------------------------------------------------------------------ observed state

fn forward_json(f: &ForwardSpec) -> Value {
    json!({"protocol": proto_name(f.protocol), "hostPort": f.host_port, "to": f.to.to_string()})
}

/// The `nat` value of the desired state.
pub(crate) fn desired_nat(spec: &NetworkSpec) -> Option<Value> {
    if !nat_enabled(spec) {
        return None;
    }
    let mut o = serde_json::Map::new();
    o.insert("enabled".into(), json!(true));
    if let Some(e) = spec.nat.as_ref().and_then(|n| n.egress.as_ref()) {
        o.insert("egress".into(), json!(e.as_str()));
    }
    o.insert(
        "subnets".into(),
        json!(
            subnets(spec)
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
        ),
    );
    Some(Value::Object(o))
}

/// The `forwards` value of the desired state (sorted).
pub(crate) fn desired_forwards(spec: &NetworkSpec) -> Vec<Value> {
    let mut v: Vec<Value> = spec.forwards.iter().map(forward_json).collect();
    v.sort_by_key(|x| x.to_string());
    v.dedup();
    v
}

/// Reads the rules tagged for one network back into the state shape:
/// (`nat`, `forwards`). `spec` tells which hairpin rules belong to which forward;
/// `bridge` is the interface the masquerade rules exclude.
pub(crate) fn observed_rules_state(
    rules: &[(String, Value)],
    bridge: &str,
    spec: &NetworkSpec,
) -> (Option<Value>, Vec<Value>) {
    let has = |chain: &str, expr: &Value| rules.iter().any(|(c, e)| c == chain && e == expr);
    // Masquerade rules: [saddr == prefix, daddr != prefix, oifname ==/!=, masquerade].
    let mut subnets_seen: Vec<String> = Vec::new();
    let mut egress: Option<String> = None;
    for (c, e) in rules {
        let Some(a) = e.as_array() else { continue };
        if c != "postrouting" || a.len() != 4 || a[3] != json!({"masquerade": null}) {
            continue;
        }
        let sm = &a[0]["match"];
        let om = &a[2]["match"];
        if sm["op"] != "==" || sm["left"]["payload"]["field"] != "saddr" {
            continue;
        }
        let Some(p) = sm["right"]["prefix"].as_object() else {
            continue;
        };
        let (Some(addr), Some(len)) = (p.get("addr").and_then(|x| x.as_str()), p.get("len")) else {
            continue;
        };
        if a[1]["match"]["right"]["prefix"] != sm["right"]["prefix"] {
            continue;
        }
        if om["left"] != meta("oifname") {
            continue;
        }
        match (om["op"].as_str(), om["right"].as_str()) {
            (Some("=="), Some(e)) => egress = Some(e.to_string()),
            (Some("!="), Some(b)) if b == bridge => {}
            _ => continue,
        }
        subnets_seen.push(format!("{addr}/{len}"));
    }
    subnets_seen.sort();
    subnets_seen.dedup();
    let nat = if subnets_seen.is_empty() {
        None
    } else {
        let mut o = serde_json::Map::new();
        o.insert("enabled".into(), json!(true));
        if let Some(e) = egress {
            o.insert("egress".into(), json!(e));
        }
        o.insert("subnets".into(), json!(subnets_seen));
        Some(Value::Object(o))
    };

    // Forwards: decode prerouting DNAT rules; a forward counts when its output twin
    // (and hairpin, when its target is on the bridge) are there too.
    let mut fwds: BTreeMap<String, Value> = BTreeMap::new();
    for (c, e) in rules {
        if c != "prerouting" {
            continue;
        }
        let Some(a) = e.as_array() else { continue };
        if a.len() != 4 {
            continue;
        }
        let pm = &a[2]["match"];
        let proto = match pm["left"]["payload"]["protocol"].as_str() {
            Some("tcp") => Protocol::Tcp,
            Some("udp") => Protocol::Udp,
            _ => continue,
        };
        let Some(hp) = pm["right"].as_u64().and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        let d = &a[3]["dnat"];
        let (Some(addr), Some(port)) = (
            d["addr"].as_str().and_then(|s| s.parse::<IpAddr>().ok()),
            d["port"].as_u64().and_then(|p| u16::try_from(p).ok()),
        ) else {
            continue;
        };
        let f = ForwardSpec {
            protocol: proto,
            host_port: hp,
            to: SocketAddr::new(addr, port),
        };
        if dnat_rule(&f) != *e || !has("output", &dnat_rule(&f)) {
            continue;
        }
        if let Some(s) = subnet_of(spec, addr)
            && !has("postrouting", &hairpin_rule(&s, &f))
        {
            continue;
        }
        let j = forward_json(&f);
        fwds.insert(j.to_string(), j);
    }
    (nat, fwds.into_values().collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec(yaml: serde_json::Value) -> NetworkSpec {
        serde_json::from_value(yaml).unwrap()
    }

    #[test]
    fn tables_naming_an_interface_are_found_outside_stead_s_own() {
        let ruleset = "table inet stead {\n\tchain post {\n\t\toifname \"vmbr0\" masquerade\n\t}\n}\n\
            table ip pve {\n\tchain post {\n\t\toifname \"vmbr0\" masquerade\n\t}\n}\n\
            table ip other {\n\tchain x {\n\t\tiifname \"vmbr01\" accept\n\t}\n}\n";
        assert_eq!(tables_naming(ruleset, "vmbr0"), ["ip pve"]);
        assert_eq!(tables_naming(ruleset, "vmbr01"), ["ip other"]);
        assert!(tables_naming(ruleset, "lan0").is_empty());
    }

    #[test]
    fn expected_rules_roundtrip_into_state() {
        let s = spec(json!({
            "addresses": ["10.10.0.1/24", "fd00::1/64"],
            "nat": {"enabled": true, "egress": "eth0"},
            "forwards": [{"protocol": "tcp", "hostPort": 8080, "to": "10.10.0.10:80"},
                         {"protocol": "udp", "hostPort": 53, "to": "192.0.2.9:53"}]
        }));
        let rules = expected_rules("lan0", &s);
        // 2 masq + 2×(pre+out) + 1 hairpin
        assert_eq!(rules.len(), 7);
        let (nat, fwds) = observed_rules_state(&rules, "lan0", &s);
        assert_eq!(nat, desired_nat(&s));
        assert_eq!(fwds, desired_forwards(&s));
        // Drop the hairpin: the tcp forward is no longer complete.
        let partial: Vec<_> = rules
            .iter()
            .filter(|(c, e)| !(c == "postrouting" && e[0]["match"]["op"] == "in"))
            .cloned()
            .collect();
        let (_, fwds) = observed_rules_state(&partial, "lan0", &s);
        assert_eq!(fwds.len(), 1);
        assert_eq!(fwds[0]["protocol"], "udp");
    }

    #[test]
    fn nat_without_addresses_or_disabled_needs_nothing() {
        let s = spec(json!({"nat": {"enabled": true}}));
        assert!(expected_rules("b", &s).is_empty());
        assert_eq!(desired_nat(&s), None);
        let s = spec(json!({"addresses": ["10.0.0.1/24"], "nat": {"enabled": false}}));
        assert!(expected_rules("b", &s).is_empty());
        let s = spec(json!({"addresses": ["10.0.0.1/24"], "nat": {}}));
        let r = expected_rules("b", &s);
        assert_eq!(r.len(), 1);
        let (nat, _) = observed_rules_state(&r, "b", &s);
        assert_eq!(
            nat,
            Some(json!({"enabled": true, "subnets": ["10.0.0.0/24"]}))
        );
    }
}
