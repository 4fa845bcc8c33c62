//! `stead get`: observed state and status of owned resources.

use anyhow::{Result, bail};
use serde_json::{Value, json};
use std::collections::BTreeMap;

use stead_reconciler::driver::{Health, HostEnv, Observed};
use stead_reconciler::state::Event;
use stead_reconciler::{InventoryEntry, StateDb, observe_where};
use stead_schema::{Desired, Kind, ResourceId};

use crate::GetFormat;

/// The running controller's status document from `<run-dir>/controller.sock`, if one
/// answers (within 2 s).
fn controller_status(env: &HostEnv) -> Option<Value> {
    use std::io::{Read, Write};
    let path = env.run_dir.join("controller.sock");
    let mut s = std::os::unix::net::UnixStream::connect(&path).ok()?;
    let t = Some(std::time::Duration::from_secs(2));
    s.set_read_timeout(t).ok()?;
    s.set_write_timeout(t).ok()?;
    s.write_all(b"status\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    serde_json::from_str(&text).ok()
}

/// The controller's entry for a resource.
fn controller_resource<'a>(ctl: Option<&'a Value>, kind: Kind, name: &str) -> Option<&'a Value> {
    ctl?.get("resources")?.as_array()?.iter().find(|r| {
        r.get("kind").and_then(Value::as_str) == Some(kind.as_str())
            && r.get("name").and_then(Value::as_str) == Some(name)
    })
}

/// `reason: message` of the controller's first condition of a `Failed` resource (the
/// error class, e.g. `Refused`, and what failed), for the DETAILS column.
fn failed_details(r: &Value) -> Option<String> {
    if r.get("status").and_then(Value::as_str) != Some("Failed") {
        return None;
    }
    let c = r.pointer("/conditions/0")?;
    let reason = c.get("reason").and_then(Value::as_str).unwrap_or("Failed");
    let message = c.get("message").and_then(Value::as_str).unwrap_or("");
    Some(
        format!("{reason}: {message}")
            .trim_end_matches([':', ' '])
            .to_string(),
    )
}

/// One line about the controller for the text output.
fn controller_line(ctl: &Value) -> String {
    let s = |k: &str| ctl.get(k).and_then(Value::as_str).unwrap_or("");
    let short = |r: &str| r.get(..12).unwrap_or(r).to_string();
    let mut line = format!(
        "Controller: {} at revision {}",
        s("source"),
        short(s("revision"))
    );
    if let Some(t) = ctl.get("lastApplyTime").and_then(Value::as_f64) {
        line.push_str(&format!(", checked {} ago", age(t)));
    }
    if !s("lastResult").is_empty() {
        line.push_str(&format!(", last result {}", s("lastResult")));
    }
    if let Some(e) = ctl.get("headError").and_then(Value::as_str) {
        let first = e.lines().next().unwrap_or("");
        line.push_str(&format!(
            "\n  head {} not applied: {first}",
            short(s("headRevision"))
        ));
    }
    if let Some(e) = ctl.get("fetchError").and_then(Value::as_str) {
        line.push_str(&format!("\n  fetch failing: {e}"));
    }
    line
}

fn age(secs: f64) -> String {
    let d = (stead_reconciler::state::now_secs() - secs).max(0.0) as u64;
    match d {
        0..60 => format!("{d}s"),
        60..3600 => format!("{}m", d / 60),
        3600..86400 => format!("{}h", d / 3600),
        _ => format!("{}d", d / 86400),
    }
}

fn rfc3339(secs: f64) -> String {
    chrono::DateTime::from_timestamp(secs as i64, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

fn health_word(h: &Health, exists: bool) -> String {
    if !exists {
        return "Missing".into();
    }
    match h {
        Health::Ready => "Ready".into(),
        Health::Progressing => "Progressing".into(),
        Health::Degraded(_) => "Degraded".into(),
        Health::Failed(_) => "Failed".into(),
    }
}

fn summary(kind: Kind, state: &Value, status: &Value) -> String {
    let s = |k: &str| {
        state
            .get(k)
            .map(|v| stead_reconciler::render::show_field(k, &Some(v.clone())))
    };
    let parts: Vec<String> = match kind {
        Kind::Volume => [
            s("pool").map(|p| format!("pool={p}")),
            s("size").map(|p| format!("size={p}")),
        ]
        .into_iter()
        .flatten()
        .collect(),
        Kind::StoragePool => [s("type"), s("path")].into_iter().flatten().collect(),
        Kind::BackupSchedule => {
            let t = |k: &str| status.get(k).and_then(Value::as_str).map(str::to_string);
            [
                s("schedule").map(|c| format!("schedule={c}")),
                t("nextRun").map(|n| format!("next={n}")),
                t("lastRun").map(|l| {
                    let ok = t("lastResult").as_deref() == Some("ok");
                    format!("last={l} ({})", if ok { "ok" } else { "failed" })
                }),
            ]
            .into_iter()
            .flatten()
            .collect()
        }
        Kind::Network => [
            s("addresses").map(|a| format!("addresses={a}")),
            s("mtu").map(|m| format!("mtu={m}")),
        ]
        .into_iter()
        .flatten()
        .collect(),
        _ => {
            let mut v = Vec::new();
            if let Some(st) = s("state") {
                v.push(st);
            }
            for k in ["pid", "restarts", "ip"] {
                if let Some(x) = status.get(k) {
                    v.push(format!(
                        "{k}={}",
                        x.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| x.to_string())
                    ));
                }
            }
            if kind == Kind::VirtualMachine {
                v.extend(vm_summary(status));
            }
            v
        }
    };
    parts.join(" ")
}

/// The qemu engine's extra VM details: accelerator, guest IPs and agent state (from the
/// guest agent), and the accelerator warning (TCG fallback).
fn vm_summary(status: &Value) -> Vec<String> {
    let text = |k: &str| status.get(k).and_then(Value::as_str).map(str::to_string);
    let mut v = Vec::new();
    if let Some(a) = text("accel") {
        v.push(format!("accel={a}"));
    }
    if let Some(ips) = status.get("guestIps").and_then(Value::as_array) {
        let ips: Vec<&str> = ips.iter().filter_map(Value::as_str).collect();
        if !ips.is_empty() {
            v.push(format!("ips={}", ips.join(",")));
        }
    }
    if let Some(a) = text("agent") {
        v.push(format!("agent={}", if a == "ok" { "ok" } else { "down" }));
    }
    if let Some(w) = text("warning") {
        v.push(format!("warning: {w}"));
    }
    v
}

/// What `stead get` was asked for: a kind, a name of it, or everything.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Selector {
    kind: Option<Kind>,
    name: Option<String>,
}

impl Selector {
    /// Parses `KIND`, `KIND/NAME` or nothing.
    fn parse(what: Option<&str>) -> Result<Selector> {
        let Some(w) = what else {
            return Ok(Selector {
                kind: None,
                name: None,
            });
        };
        let (k, n) = match w.split_once('/') {
            Some((k, n)) => (k, Some(n.to_string())),
            None => (w, None),
        };
        match Kind::parse_loose(k) {
            Some(kind) => Ok(Selector {
                kind: Some(kind),
                name: n,
            }),
            None => bail!(
                "unknown kind {k:?}: expected one of {}",
                Kind::ALL.map(|k| k.as_str()).join(", ")
            ),
        }
    }

    fn matches(&self, kind: Kind, name: &str) -> bool {
        self.kind.is_none_or(|k| kind == k) && self.name.as_ref().is_none_or(|n| n == name)
    }

    /// Exactly one resource named.
    fn one(&self) -> Option<(Kind, &str)> {
        Some((self.kind?, self.name.as_deref()?))
    }
}

/// The `Ready`/`Progressing` condition `stead get` reports without a controller.
fn condition(health: &Health, exists: bool, err: Option<&str>) -> Value {
    match (health, exists) {
        (_, false) => {
            json!({"type": "Ready", "status": "False", "reason": "Missing", "message": err.unwrap_or("not found on the host")})
        }
        (Health::Ready, _) => json!({"type": "Ready", "status": "True"}),
        (Health::Progressing, _) => json!({"type": "Progressing", "status": "True"}),
        (Health::Degraded(m), _) => {
            json!({"type": "Ready", "status": "False", "reason": "Degraded", "message": m})
        }
        (Health::Failed(m), _) => {
            json!({"type": "Ready", "status": "False", "reason": "Failed", "message": m})
        }
    }
}

/// One managed resource as a `stead get -o json` item.
fn managed_item(
    id: &ResourceId,
    entry: &InventoryEntry,
    obs: Option<&Observed>,
    err: Option<&str>,
    ctl: Option<&Value>,
) -> Value {
    let (exists, health, state, status) = match obs {
        Some(o) => (
            o.exists,
            o.health.clone(),
            o.state.clone(),
            o.status.clone(),
        ),
        None => (
            false,
            Health::Failed(err.unwrap_or_default().to_string()),
            Value::Null,
            Value::Null,
        ),
    };
    let from_ctl = controller_resource(ctl, id.kind, &id.name);
    let conditions = from_ctl
        .and_then(|r| r.get("conditions").cloned())
        .unwrap_or_else(|| json!([condition(&health, exists, err)]));
    json!({
        "apiVersion": stead_schema::API_VERSION,
        "kind": id.kind.as_str(),
        "metadata": entry.resource.metadata,
        "spec": entry.resource.spec,
        "status": {
            "exists": exists,
            "owned": obs.map(|o| o.owned).unwrap_or(false),
            "adopted": entry.adopted,
            "health": health_word(&health, exists),
            "appliedAt": rfc3339(entry.applied_at),
            "observed": state,
            "runtime": status,
            "controllerStatus": from_ctl.and_then(|r| r.get("status").cloned()),
            "conditions": conditions,
        }
    })
}

/// A resource the controller wants but has not created yet (failing, waiting): its
/// item, and its table row (kind, name, status, details).
fn pending_item(r: &Value) -> Option<(Value, [String; 4])> {
    let k = Kind::parse_loose(r.get("kind")?.as_str()?)?;
    let n = r.get("name")?.as_str()?;
    let msg = failed_details(r).unwrap_or_else(|| {
        r.pointer("/conditions/0/message")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    });
    let item = json!({
        "apiVersion": stead_schema::API_VERSION,
        "kind": k.as_str(),
        "metadata": {"name": n},
        "status": {
            "exists": false,
            "controllerStatus": r.get("status"),
            "conditions": r.get("conditions"),
        }
    });
    let status = r
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or("Pending")
        .to_string();
    Some((item, [k.to_string(), n.to_string(), status, msg]))
}

/// The controller's resources that `sel` asks for and the inventory does not hold.
fn pending_items(
    ctl: Option<&Value>,
    sel: &Selector,
    inventory: &BTreeMap<ResourceId, InventoryEntry>,
) -> Vec<(Value, [String; 4])> {
    let Some(rs) = ctl
        .and_then(|c| c.get("resources"))
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    rs.iter()
        .filter(|r| {
            let (Some(k), Some(n)) = (
                r.get("kind")
                    .and_then(Value::as_str)
                    .and_then(Kind::parse_loose),
                r.get("name").and_then(Value::as_str),
            ) else {
                return false;
            };
            let managed = inventory.keys().any(|id| id.kind == k && id.name == n);
            !managed && sel.matches(k, n)
        })
        .filter_map(pending_item)
        .collect()
}

/// A managed resource's table row: kind, name, status (the controller's word when it
/// knows of a failure, backoff or drift), age, details.
fn managed_row(
    id: &ResourceId,
    entry: &InventoryEntry,
    o: Option<&Observed>,
    ctl: Option<&Value>,
) -> [String; 5] {
    let exists = o.is_some_and(|o| o.exists);
    let mut health = o
        .map(|o| health_word(&o.health, exists))
        .unwrap_or_else(|| "Unknown".into());
    let from_ctl = controller_resource(ctl, id.kind, &id.name);
    if let Some(w) = from_ctl
        .and_then(|r| r.get("status"))
        .and_then(Value::as_str)
        && w != "Ready"
        && health == "Ready"
    {
        health = w.to_string();
    }
    let info = from_ctl.and_then(failed_details).unwrap_or_else(|| {
        o.map(|o| summary(id.kind, &o.state, &o.status))
            .unwrap_or_default()
    });
    [
        id.kind.to_string(),
        id.name.clone(),
        health,
        age(entry.applied_at),
        info,
    ]
}

/// Prints rows under `KIND NAME STATUS AGE DETAILS`, columns padded to their widest cell.
fn print_table(rows: &[[String; 5]]) {
    let headers = ["KIND", "NAME", "STATUS", "AGE", "DETAILS"];
    let mut widths = headers.map(str::len);
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cols: [&str; 5]| {
        format!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {}",
            cols[0],
            cols[1],
            cols[2],
            cols[3],
            cols[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3]
        )
    };
    println!("{}", line(headers).trim_end());
    for r in rows {
        println!("{}", line([&r[0], &r[1], &r[2], &r[3], &r[4]]).trim_end());
    }
}

/// One resource's condition message and recent events, as `kubectl describe` does.
fn print_details(item: &Value, events: &[Event]) {
    if let Some(m) = item
        .pointer("/status/conditions/0/message")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
    {
        println!("\nCondition: {m}");
    }
    if !events.is_empty() {
        println!("\nEvents (newest last):");
        for e in events {
            println!(
                "  {}  {:<7}  {:<8}  {}",
                rfc3339(e.ts),
                e.level,
                e.reason,
                e.message
            );
        }
    }
}

/// Runs `stead get [KIND[/NAME]]`.
pub fn run(env: &HostEnv, what: Option<&str>, output: GetFormat) -> Result<u8> {
    let sel = Selector::parse(what)?;
    let db = StateDb::open(&env.state_dir)?;
    let all = db.inventory()?;
    let kinds: Vec<Kind> = match sel.kind {
        Some(k) => vec![k],
        None => all.keys().map(|id| id.kind).collect(),
    };
    let drivers = crate::drivers_for(env, &Default::default(), kinds)?;
    let mut inventory = all.clone();
    inventory.retain(|id, _| sel.matches(id.kind, &id.name));
    if let Some((k, n)) = sel.one()
        && inventory.is_empty()
    {
        bail!(
            "{k}/{n} is not managed by stead (not in the inventory of {})",
            env.state_dir.display()
        );
    }
    // The whole inventory is the world (a volume needs its pool); only the selected
    // resources are observed.
    let (observed, errors) = observe_where(&drivers, &Desired::default(), &all, &|id| {
        inventory.contains_key(id)
    });
    let ctl = controller_status(env);
    let mut items: Vec<Value> = inventory
        .iter()
        .map(|(id, entry)| {
            let err = errors
                .iter()
                .find(|e| &e.id == id)
                .map(|e| e.message.as_str());
            managed_item(id, entry, observed.get(id), err, ctl.as_ref())
        })
        .collect();
    let pending = pending_items(ctl.as_ref(), &sel, &inventory);
    items.extend(pending.iter().map(|(item, _)| item.clone()));
    // One resource asked for by name: its recent events too.
    let single = sel.one().is_some() && items.len() == 1;
    let events = match sel.one() {
        Some((k, n)) if single => db.events(Some(&format!("{k}/{n}")), 10)?,
        _ => Vec::new(),
    };
    if single && let Some(st) = items[0].get_mut("status") {
        st["events"] = json!(
            events
                .iter()
                .map(|e| json!({"time": rfc3339(e.ts), "level": e.level, "reason": e.reason, "message": e.message}))
                .collect::<Vec<_>>()
        );
    }
    match output {
        GetFormat::Json | GetFormat::Yaml => {
            let mut list =
                json!({"apiVersion": stead_schema::API_VERSION, "kind": "List", "items": items});
            if let Some(c) = &ctl {
                let mut c = c.clone();
                if let Some(o) = c.as_object_mut() {
                    o.remove("resources");
                }
                list["controller"] = c;
            }
            if output == GetFormat::Json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!("{}", serde_saphyr::to_string(&list)?);
            }
        }
        GetFormat::Text => {
            if let Some(c) = &ctl {
                println!("{}", controller_line(c));
            }
            if items.is_empty() {
                println!(
                    "No resources managed by stead{}.",
                    sel.kind
                        .map(|k| format!(" of kind {k}"))
                        .unwrap_or_default()
                );
                return Ok(0);
            }
            let mut rows: Vec<[String; 5]> = inventory
                .iter()
                .map(|(id, entry)| managed_row(id, entry, observed.get(id), ctl.as_ref()))
                .collect();
            for (_, [k, n, st, msg]) in &pending {
                rows.push([k.clone(), n.clone(), st.clone(), "-".into(), msg.clone()]);
            }
            print_table(&rows);
            if let (Some(item), true) = (items.first(), single) {
                print_details(item, &events);
            }
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_parses_kind_name_and_refuses_unknown_kinds() {
        let s = Selector::parse(Some("volume/a")).expect("parse");
        assert_eq!(s.kind, Some(Kind::Volume));
        assert_eq!(s.name.as_deref(), Some("a"));
        assert!(s.matches(Kind::Volume, "a"));
        assert!(!s.matches(Kind::Volume, "b"));
        assert!(!s.matches(Kind::Network, "a"));
        assert_eq!(s.one(), Some((Kind::Volume, "a")));
        let all = Selector::parse(None).expect("parse");
        assert!(all.matches(Kind::Network, "x") && all.one().is_none());
        let k = Selector::parse(Some("Network")).expect("parse");
        assert!(k.matches(Kind::Network, "x") && k.one().is_none());
        let e = Selector::parse(Some("Gadget/x")).expect_err("unknown kind");
        assert!(
            e.to_string()
                .starts_with("unknown kind \"Gadget\": expected one of "),
            "{e}"
        );
    }

    #[test]
    fn condition_without_a_controller() {
        assert_eq!(
            condition(&Health::Ready, false, None)["message"],
            "not found on the host"
        );
        assert_eq!(
            condition(&Health::Ready, false, Some("boom"))["reason"],
            "Missing"
        );
        assert_eq!(condition(&Health::Ready, true, None)["status"], "True");
        assert_eq!(
            condition(&Health::Progressing, true, None)["type"],
            "Progressing"
        );
        let d = condition(&Health::Degraded("slow".into()), true, None);
        assert_eq!(
            (d["reason"].as_str(), d["message"].as_str()),
            (Some("Degraded"), Some("slow"))
        );
    }

    #[test]
    fn pending_items_are_the_controllers_unmanaged_wanted_resources() {
        let ctl = json!({"resources": [
            {"kind": "Volume", "name": "a", "status": "Failed",
             "conditions": [{"message": "no room"}]},
            {"kind": "Volume", "name": "b", "status": "Backoff",
             "conditions": [{"message": "retrying in 4s"}]},
            {"kind": "Network", "name": "n"},
            {"kind": "Gadget", "name": "g"},
        ]});
        let sel = Selector::parse(Some("Volume")).expect("parse");
        let rows: Vec<[String; 4]> = pending_items(Some(&ctl), &sel, &BTreeMap::new())
            .into_iter()
            .map(|(_, row)| row)
            .collect();
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(rows[0][..3], ["Volume", "a", "Failed"]);
        assert_eq!(rows[0][3], "Failed: no room", "a failure names its reason");
        assert_eq!(rows[1][2..], ["Backoff", "retrying in 4s"]);
        let none = Selector::parse(None).expect("parse");
        let rows = pending_items(Some(&ctl), &none, &BTreeMap::new());
        assert_eq!(rows.len(), 3, "an unknown kind is left out");
        assert_eq!(rows[2].1[2], "Pending", "no status: Pending");
    }

    #[test]
    fn qemu_vm_details_show_accel_ips_agent_and_the_warning() {
        let state = json!({"state": "running"});
        let status = json!({"pid": 7, "restarts": 0, "accel": "tcg",
            "guestIps": ["10.0.0.5", "fe80::1"], "agent": "ok",
            "warning": "running under TCG emulation (slow)"});
        let s = summary(Kind::VirtualMachine, &state, &status);
        assert!(s.contains("accel=tcg"), "{s}");
        assert!(s.contains("ips=10.0.0.5,fe80::1"), "{s}");
        assert!(s.contains("agent=ok"), "{s}");
        assert!(
            s.ends_with("warning: running under TCG emulation (slow)"),
            "{s}"
        );
        let s = summary(
            Kind::VirtualMachine,
            &state,
            &json!({"agent": "not answering: x"}),
        );
        assert!(s.contains("agent=down") && !s.contains("ips="), "{s}");
    }
}
