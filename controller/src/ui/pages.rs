//! The pages, each a pure function of the read model ([`crate::view`]) to HTML.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::html::{Html, url_part};
use super::layout::{bytes, css_word, impact_badge, status_badge, time};
use crate::events::Event;
use crate::view::{
    Detail, FieldDiff, Overview, Pending, PlannedChange, ResourceSummary, RevisionInfo, Tree,
    TreeFilter, TreeNode,
};

/// The detail page's path of `Kind/name`.
pub fn detail_href(kind: &str, name: &str) -> String {
    format!("/resources/{}/{}", url_part(kind), url_part(name))
}

/// Kinds with a serial console.
pub fn has_console(kind: &str) -> bool {
    matches!(kind, "Container" | "VirtualMachine")
}

fn revision(h: &mut Html, r: Option<&RevisionInfo>) {
    let Some(r) = r else {
        h.el("span", &[("class", "muted")], "none");
        return;
    };
    h.el("code", &[("title", &r.id)], &r.short);
    if let Some(m) = &r.message {
        h.text(" ").el("span", &[], m);
    }
    if let Some(a) = &r.author {
        h.text(" — ").el("span", &[("class", "muted")], a);
    }
    let sig = if r.signature == "verified" {
        format!(
            "signature verified{}",
            r.signer
                .as_deref()
                .map(|s| format!(" ({s})"))
                .unwrap_or_default()
        )
    } else {
        "signature not checked".to_string()
    };
    h.text(" ")
        .el("span", &[("class", "badge pending-badge")], &sig);
}

/// A resource's kind, linked name, status badge and reason, for lists.
fn summary_row(h: &mut Html, s: &ResourceSummary) {
    h.open("tr", &[("data-id", &s.id), ("data-status", &s.status)]);
    h.el("td", &[], &s.kind);
    h.open("td", &[])
        .link(&detail_href(&s.kind, &s.name), &s.name)
        .close("td");
    h.open("td", &[]);
    status_badge(h, &s.status);
    h.text(" ");
    drift_badge(h, s);
    h.close("td");
    h.open("td", &[])
        .el("span", &[("class", "reason")], &s.reason)
        .close("td");
    h.el("td", &[("class", "muted")], &s.message);
    h.close("tr");
}

/// The drift badge (an empty span the live updates fill when there is none).
fn drift_badge(h: &mut Html, s: &ResourceSummary) {
    match (&s.drift, s.drifted) {
        (_, true) => h.el(
            "span",
            &[
                ("class", "badge drift drift-badge"),
                ("title", s.drift.as_deref().unwrap_or("")),
            ],
            "drifted",
        ),
        (Some(d), false) => h.el(
            "span",
            &[("class", "badge healed drift-badge"), ("title", d)],
            "healed",
        ),
        (None, false) => h.el("span", &[("class", "drift-badge")], ""),
    };
}

/// `/`: the overview; `operator` adds *Sync now*.
pub fn overview(o: &Overview, operator: bool) -> Html {
    let mut h = Html::new();
    h.el("h1", &[], "Overview");
    h.open("div", &[("class", "grid")]);
    h.open(
        "section",
        &[("class", "panel"), ("aria-labelledby", "sync-h")],
    )
    .el("h2", &[("id", "sync-h")], "Sync")
    .open("dl", &[("class", "kv")])
    .el("dt", &[], "State")
    .open("dd", &[("id", "sync-state")]);
    let state = format!("{:?}", o.sync.state);
    status_badge(&mut h, &state);
    h.close("dd")
        .el("dt", &[], "Source")
        .el("dd", &[], &o.source);
    h.el("dt", &[], "Applied").open("dd", &[]);
    revision(&mut h, o.applied.as_ref());
    h.close("dd").el("dt", &[], "Head").open("dd", &[]);
    revision(&mut h, o.head.as_ref());
    h.close("dd")
        .el("dt", &[], "Last result")
        .el(
            "dd",
            &[],
            &format!(
                "{} {}",
                o.sync.last_result.as_deref().unwrap_or("none yet"),
                o.sync.message
            ),
        )
        .el("dt", &[], "Last reconcile")
        .el(
            "dd",
            &[],
            &o.sync.last_reconcile_time.map(time).unwrap_or_default(),
        )
        .el("dt", &[], "Modes")
        .el(
            "dd",
            &[],
            &format!("sync {}, drift {}", o.sync.sync_mode, o.sync.drift_mode),
        );
    for (label, err) in [
        ("Fetch error", &o.sync.fetch_error),
        ("Head refused", &o.sync.head_error),
    ] {
        if let Some(e) = err {
            h.el("dt", &[], label)
                .el("dd", &[("class", "notice error")], e);
        }
    }
    h.close("dl");
    h.open("p", &[])
        .link(
            "/pending",
            &format!("{} pending change(s)", o.pending_changes),
        )
        .close("p");
    if operator {
        action_form(
            &mut h,
            "/api/v1/actions/sync",
            None,
            "Sync now",
            "Fetch the source and reconcile now (and apply the head, in manual sync)?",
        );
    }
    h.close("section");
    if let Some(c) = &o.capacity {
        h.open(
            "section",
            &[("class", "panel"), ("aria-labelledby", "cap-h")],
        )
        .el("h2", &[("id", "cap-h")], "Host capacity")
        .open("dl", &[("class", "kv")])
        .el("dt", &[], "CPUs")
        .el("dd", &[], &format!("{} (load {:.2})", c.cpus, c.load1))
        .el("dt", &[], "Memory")
        .el(
            "dd",
            &[],
            &format!(
                "{} available of {}",
                bytes(c.memory_available_bytes as f64),
                bytes(c.memory_total_bytes as f64)
            ),
        );
        for p in &c.pools {
            h.el("dt", &[], &format!("Pool {}", p.name)).el(
                "dd",
                &[],
                &format!(
                    "{} free of {}",
                    bytes(p.available_bytes as f64),
                    bytes(p.total_bytes as f64)
                ),
            );
        }
        h.close("dl").close("section");
    }
    h.close("div");
    h.el("h2", &[], &format!("Resources ({})", o.total));
    h.open("div", &[("class", "counts")]);
    for k in &o.counts {
        h.open("div", &[("class", "count")])
            .el("span", &[("class", "n")], &k.total.to_string())
            .link(&format!("/resources?kind={}", url_part(&k.kind)), &k.kind)
            .open("div", &[]);
        for (word, n) in &k.by_status {
            let class = format!("badge s-{}", css_word(word));
            h.el("span", &[("class", &class)], &format!("{n} {word}"))
                .text(" ");
        }
        h.close("div").close("div");
    }
    h.close("div");
    h.el("h2", &[], "Needs attention");
    if o.attention.is_empty() {
        h.el("p", &[("class", "muted")], "Every resource is Ready.");
    } else {
        summary_table(&mut h, &o.attention);
    }
    h
}

fn summary_table(h: &mut Html, rows: &[ResourceSummary]) {
    h.open("table", &[])
        .raw("<thead><tr><th scope=\"col\">Kind</th><th scope=\"col\">Name</th><th scope=\"col\">Status</th><th scope=\"col\">Reason</th><th scope=\"col\">Message</th></tr></thead>")
        .open("tbody", &[]);
    for s in rows {
        summary_row(h, s);
    }
    h.close("tbody").close("table");
}

/// A confirmation-guarded action (needs the script: it sends the CSRF header).
fn action_form(h: &mut Html, action: &str, resource: Option<&str>, label: &str, confirm: &str) {
    h.open(
        "form",
        &[
            ("class", "action"),
            ("data-action", action),
            ("data-confirm", confirm),
            ("method", "post"),
            ("action", action),
        ],
    );
    if let Some(r) = resource {
        h.open(
            "input",
            &[("type", "hidden"), ("name", "resource"), ("value", r)],
        );
    }
    h.el("button", &[("type", "submit"), ("class", "primary")], label)
        .el(
            "span",
            &[("class", "action-result"), ("role", "status")],
            "",
        )
        .close("form");
}

const STATUSES: &[&str] = &["Ready", "Progressing", "Failed", "Drifted", "Unknown"];

/// `/resources`: the dependency tree, levels left to right.
pub fn tree(t: &Tree, f: &TreeFilter, kinds: &BTreeSet<String>) -> Html {
    let mut h = Html::new();
    h.el("h1", &[], "Resources");
    filter_form(&mut h, f, kinds);
    h.el(
        "p",
        &[("class", "muted")],
        &format!(
            "{} of {} resources, revision {}",
            t.nodes.len(),
            t.total,
            t.revision
                .as_deref()
                .map(|r| r.chars().take(12).collect::<String>())
                .unwrap_or_else(|| "none".into())
        ),
    );
    let mut deps: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for e in &t.edges {
        deps.entry(e.from.as_str()).or_default().push(e.to.as_str());
    }
    let mut levels: BTreeMap<usize, Vec<&TreeNode>> = BTreeMap::new();
    for n in &t.nodes {
        levels.entry(n.level).or_default().push(n);
    }
    h.open(
        "div",
        &[
            ("class", "tree"),
            ("role", "list"),
            ("aria-label", "Resource tree"),
        ],
    )
    .raw("<svg class=\"edges\" aria-hidden=\"true\"></svg>");
    for (level, nodes) in &levels {
        h.open("section", &[("class", "level"), ("role", "listitem")])
            .el("h2", &[], &format!("Level {level}"));
        for n in nodes {
            tree_node(&mut h, n, deps.get(n.resource.id.as_str()));
        }
        h.close("section");
    }
    h.close("div");
    if t.nodes.is_empty() {
        h.el("p", &[("class", "notice")], "No resource matches.");
    }
    h
}

fn tree_node(h: &mut Html, n: &TreeNode, deps: Option<&Vec<&str>>) {
    let r = &n.resource;
    let deps = deps
        .map(|d| d.iter().map(|x| url_part(x)).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    h.open(
        "a",
        &[
            ("class", "node"),
            ("href", &detail_href(&r.kind, &r.name)),
            ("data-id", &r.id),
            ("data-kind", &r.kind),
            ("data-name", &r.name),
            ("data-status", &r.status),
            ("data-deps", &deps),
        ],
    )
    .el("span", &[("class", "kind")], &r.kind)
    .el("span", &[("class", "name")], &r.name)
    .open("span", &[("class", "badges")]);
    status_badge(h, &r.status);
    drift_badge(h, r);
    if let Some(p) = &n.pending {
        h.el("span", &[("class", "badge pending-badge")], p);
    }
    if n.health != r.status && n.health != "Unknown" {
        h.el(
            "span",
            &[("class", "badge"), ("title", "health the last observe saw")],
            &n.health,
        );
    }
    h.close("span")
        .el("span", &[("class", "reason")], &r.reason)
        .close("a");
}

fn filter_form(h: &mut Html, f: &TreeFilter, kinds: &BTreeSet<String>) {
    h.open(
        "form",
        &[
            ("class", "filters"),
            ("method", "get"),
            ("action", "/resources"),
            ("role", "search"),
        ],
    );
    h.open("label", &[])
        .text("Kind")
        .open("select", &[("name", "kind")]);
    select_options(h, kinds.iter().map(String::as_str), f.kind.as_deref());
    h.close("select").close("label");
    h.open("label", &[])
        .text("Status")
        .open("select", &[("name", "status")]);
    select_options(h, STATUSES.iter().copied(), f.status.as_deref());
    h.close("select").close("label");
    h.open("label", &[]).text("Name").open(
        "input",
        &[
            ("type", "search"),
            ("name", "name"),
            ("value", f.name.as_deref().unwrap_or("")),
        ],
    );
    h.close("label")
        .el("button", &[("type", "submit")], "Filter")
        .close("form");
}

fn select_options<'a>(h: &mut Html, values: impl Iterator<Item = &'a str>, current: Option<&str>) {
    h.el("option", &[("value", "")], "any");
    for v in values {
        if current.is_some_and(|c| c.eq_ignore_ascii_case(v)) {
            h.el("option", &[("value", v), ("selected", "selected")], v);
        } else {
            h.el("option", &[("value", v)], v);
        }
    }
}

/// JSON pretty-printed (values come redacted from the read model).
fn json_block(h: &mut Html, v: &Value) {
    let text = serde_json::to_string_pretty(v).unwrap_or_default();
    h.el("pre", &[("tabindex", "0")], &text);
}

fn diff_table(h: &mut Html, fields: &[FieldDiff]) {
    h.open("table", &[("class", "diff")])
        .raw("<thead><tr><th scope=\"col\">Field</th><th scope=\"col\">Host → manifest</th><th scope=\"col\">Impact</th></tr></thead>")
        .open("tbody", &[]);
    for f in fields {
        // The CLI's words (`32Mi -> 48Mi`), else the raw values.
        let change = if f.text.is_empty() {
            let show =
                |v: &Option<Value>| v.as_ref().map_or("(none)".to_string(), |v| v.to_string());
            format!("{} -> {}", show(&f.observed), show(&f.desired))
        } else {
            f.text.clone()
        };
        h.open("tr", &[])
            .el("td", &[("class", "mono")], &f.path)
            .el("td", &[("class", "mono")], &change)
            .open("td", &[]);
        impact_badge(h, &f.impact);
        h.close("td").close("tr");
    }
    h.close("tbody").close("table");
}

/// `/resources/{kind}/{name}`: desired, observed, diff, events, workload figures.
pub fn detail(d: &Detail, operator: bool) -> Html {
    let r = &d.resource;
    let mut h = Html::new();
    h.open("h1", &[]).text(&format!("{} / {} ", r.kind, r.name));
    h.close("h1");
    h.open(
        "section",
        &[
            ("class", "panel"),
            ("data-id", &r.id),
            ("data-status", &r.status),
            ("aria-labelledby", "st-h"),
        ],
    )
    .el("h2", &[("id", "st-h")], "Status")
    .open("p", &[]);
    status_badge(&mut h, &r.status);
    h.text(" ");
    drift_badge(&mut h, r);
    if let Some(p) = &d.pending {
        h.text(" ")
            .el("span", &[("class", "badge pending-badge")], p);
    }
    h.text(" ")
        .el("span", &[("class", "reason")], &r.reason)
        .close("p");
    if !r.message.is_empty() {
        h.el("p", &[("class", "muted")], &r.message);
    }
    h.open("dl", &[("class", "kv")])
        .el("dt", &[], "Manifest")
        .el("dd", &[("class", "mono")], &d.origin);
    for (label, ids) in [("Depends on", &d.depends_on), ("Used by", &d.dependents)] {
        h.el("dt", &[], label).open("dd", &[]);
        if ids.is_empty() {
            h.text("none");
        }
        for id in ids {
            match id.split_once('/') {
                Some((k, n)) => h.link(&detail_href(k, n), id),
                None => h.text(id),
            };
            h.text(" ");
        }
        h.close("dd");
    }
    for (k, v) in &d.labels {
        h.el("dt", &[], &format!("label {k}")).el("dd", &[], v);
    }
    h.close("dl");
    if operator {
        detail_actions(&mut h, r);
    }
    h.close("section");
    if let Some(w) = &d.workload {
        workload(&mut h, r, w, &d.desired);
    }
    if !d.backups.is_empty() {
        backups(&mut h, &d.backups);
    }
    h.el("h2", &[], "Diff (host → manifest)");
    if d.diff.is_empty() {
        h.el("p", &[("class", "muted")], "No difference: converged.");
    } else {
        diff_table(&mut h, &d.diff);
    }
    h.open("div", &[("class", "grid")])
        .open("section", &[("aria-labelledby", "des-h")])
        .el("h2", &[("id", "des-h")], "Desired spec");
    json_block(&mut h, &d.desired);
    h.close("section")
        .open("section", &[("aria-labelledby", "obs-h")])
        .el("h2", &[("id", "obs-h")], "Observed");
    match &d.observed {
        Some(o) => {
            h.el(
                "p",
                &[],
                &format!(
                    "{} {}{}{}",
                    o.health,
                    o.health_message,
                    if o.exists { "" } else { " (absent)" },
                    if o.owned { "" } else { " (not owned by stead)" }
                ),
            );
            json_block(&mut h, &o.state);
            if !o.status.is_null() {
                h.el("h3", &[], "Runtime");
                json_block(&mut h, &o.status);
            }
        }
        None => {
            h.el("p", &[("class", "muted")], "Not observed yet.");
        }
    }
    h.close("section").close("div");
    h.el("h2", &[], "Conditions");
    h.open("table", &[])
        .raw("<thead><tr><th scope=\"col\">Type</th><th scope=\"col\">Status</th><th scope=\"col\">Reason</th><th scope=\"col\">Message</th><th scope=\"col\">Since</th></tr></thead>")
        .open("tbody", &[]);
    for c in &d.conditions {
        h.open("tr", &[])
            .el("td", &[], &c.type_)
            .el("td", &[], &c.status)
            .el("td", &[], &c.reason)
            .el("td", &[], &c.message)
            .el("td", &[], &time(c.last_transition_time))
            .close("tr");
    }
    h.close("tbody").close("table");
    h.el("h2", &[], "Events");
    events_list(&mut h, &d.events, Some(&r.id));
    h
}

fn detail_actions(h: &mut Html, r: &ResourceSummary) {
    h.open("div", &[("class", "actions")]);
    match r.kind.as_str() {
        "Container" | "VirtualMachine" => action_form(
            h,
            "/api/v1/actions/restart",
            Some(&r.id),
            "Restart",
            &format!("Restart {}? It stops and starts again.", r.id),
        ),
        "BackupSchedule" => {
            action_form(
                h,
                "/api/v1/actions/backup",
                Some(&r.id),
                "Back up now",
                &format!("Run a backup of {} now?", r.id),
            );
            action_form(
                h,
                "/api/v1/actions/verify",
                Some(&r.id),
                "Verify",
                &format!("Verify the backups of {}?", r.id),
            );
        }
        _ => {}
    }
    h.close("div");
}

fn workload(
    h: &mut Html,
    r: &ResourceSummary,
    w: &crate::view::WorkloadInfo,
    desired: &serde_json::Value,
) {
    h.open(
        "section",
        &[("class", "panel"), ("aria-labelledby", "wl-h")],
    )
    .el("h2", &[("id", "wl-h")], "Workload")
    .open("dl", &[("class", "kv")])
    .el("dt", &[], "Phase")
    .el("dd", &[], w.phase.as_deref().unwrap_or("unknown"))
    .el("dt", &[], "Addresses")
    .el("dd", &[], &w.addresses.join(", "))
    .el("dt", &[], "CPU time")
    .el(
        "dd",
        &[],
        &w.cpu_seconds
            .map(|s| format!("{s:.1} s"))
            .unwrap_or_else(|| "unknown".into()),
    )
    .el("dt", &[], "Memory")
    .el(
        "dd",
        &[],
        &w.memory_bytes
            .map(bytes)
            .unwrap_or_else(|| "unknown".into()),
    )
    .el("dt", &[], "Restarts")
    .el(
        "dd",
        &[],
        &w.restarts.map(|n| n.to_string()).unwrap_or_default(),
    )
    .close("dl");
    if has_console(&r.kind) {
        h.open("p", &[])
            .link(
                &format!("/console/{}/{}", url_part(&r.kind), url_part(&r.name)),
                "Open the console",
            )
            .close("p");
    }
    if r.kind == "VirtualMachine" && desired["engine"] == "qemu" {
        h.open("p", &[])
            .link(
                &format!("/screen/VirtualMachine/{}", url_part(&r.name)),
                "Open the screen",
            )
            .close("p");
    }
    if let Some(tail) = &w.console_tail {
        h.el("h3", &[], "Console log (tail)");
        h.el("pre", &[("tabindex", "0")], tail);
    }
    h.close("section");
}

fn backups(h: &mut Html, list: &[crate::view::BackupEntry]) {
    h.el("h2", &[], "Backups");
    h.open("table", &[])
        .raw("<thead><tr><th scope=\"col\">Time</th><th scope=\"col\">Storage</th><th scope=\"col\">Size</th><th scope=\"col\">Stored</th><th scope=\"col\">Consistency</th><th scope=\"col\">Verified</th></tr></thead>")
        .open("tbody", &[]);
    for b in list.iter().rev() {
        let verified = match &b.verified {
            None => "not yet".to_string(),
            Some(v) if v.ok => format!("ok at {}", time(v.at)),
            Some(v) => format!("FAILED at {}: {}", time(v.at), v.problems.join("; ")),
        };
        h.open("tr", &[])
            .el("td", &[("title", &b.id)], &b.time)
            .el("td", &[], &b.storage)
            .el("td", &[], &bytes(b.bytes as f64))
            .el("td", &[], &bytes(b.stored_bytes as f64))
            .el("td", &[], b.consistency.as_deref().unwrap_or(""))
            .el("td", &[], &verified)
            .close("tr");
    }
    h.close("tbody").close("table");
}

/// A list of events, newest first; `resource` scopes the live additions.
pub fn events_list(h: &mut Html, events: &[Event], resource: Option<&str>) {
    h.open(
        "ul",
        &[
            ("id", "events-live"),
            ("class", "events"),
            ("data-resource", resource.unwrap_or("")),
            ("aria-live", "polite"),
        ],
    );
    for e in events {
        let level = css_word(&e.level);
        h.open("li", &[("class", &level)])
            .el("time", &[("class", "muted")], &time(e.ts))
            .text(" ")
            .el("strong", &[], &e.reason)
            .text(" ");
        if let Some(id) = &e.resource
            && resource.is_none()
        {
            match id.split_once('/') {
                Some((k, n)) => h.link(&detail_href(k, n), id),
                None => h.text(id),
            };
            h.text(" ");
        }
        h.text(&e.message);
        if let Some(c) = &e.class {
            h.text(" ").el("span", &[("class", "badge")], c);
        }
        if let Some(u) = &e.user {
            h.text(&format!(" (by {u})"));
        }
        h.close("li");
    }
    h.close("ul");
    if events.is_empty() {
        h.el("p", &[("class", "muted")], "No events yet.");
    }
}

/// `/events`: the controller's recent events.
pub fn events(events: &[Event]) -> Html {
    let mut h = Html::new();
    h.el("h1", &[], "Events");
    events_list(&mut h, events, None);
    h
}

/// `/pending`: the impact-labelled plan, as `stead diff` prints it. A change links to
/// its resource's page when its `Kind/name` is in `details` (a resource only the
/// proposed head or the plan-only branch has is plain text: it has no page yet).
pub fn pending(p: &Pending, details: &BTreeSet<String>) -> Html {
    let mut h = Html::new();
    h.el("h1", &[], "Pending change");
    h.open("dl", &[("class", "kv panel")])
        .el("dt", &[], "Applied")
        .open("dd", &[]);
    revision(&mut h, p.applied.as_ref());
    h.close("dd").el("dt", &[], "Plan for").open("dd", &[]);
    revision(&mut h, p.target.as_ref());
    h.close("dd")
        .el("dt", &[], "Highest impact")
        .open("dd", &[("id", "max-impact")]);
    match &p.max_impact {
        Some(i) => impact_badge(&mut h, i),
        None => {
            h.text("none");
        }
    }
    h.close("dd").close("dl");
    if let Some(e) = &p.head_error {
        h.el(
            "p",
            &[("class", "notice error")],
            &format!("The head is refused: {e}"),
        );
    }
    for e in &p.errors {
        h.el(
            "p",
            &[("class", "notice error")],
            &format!("{}: {}", e.id, e.message),
        );
    }
    if p.changes.is_empty() {
        h.el(
            "p",
            &[("class", "notice")],
            "Nothing pending: the host matches the applied revision.",
        );
    }
    h.open("div", &[("class", "plan")]);
    for c in &p.changes {
        planned_change(&mut h, c, details);
    }
    h.close("div");
    if !p.text.is_empty() {
        h.el("h2", &[], "As the CLI prints it");
        h.el("pre", &[("tabindex", "0"), ("id", "plan-text")], &p.text);
    }
    if let Some(b) = &p.branch {
        branch_plan(&mut h, b, details);
    }
    h
}

/// The plan-only branch's section of the pending page.
fn branch_plan(h: &mut Html, b: &crate::view::BranchPlan, details: &BTreeSet<String>) {
    h.open(
        "section",
        &[
            ("class", "panel"),
            ("id", "branch-plan"),
            ("aria-labelledby", "branch-h"),
        ],
    )
    .el(
        "h2",
        &[("id", "branch-h")],
        &format!("Plan-only branch {}", b.branch),
    )
    .el(
        "p",
        &[("class", "muted")],
        "What merging this branch would do to this host. It is planned, never applied.",
    );
    h.open("dl", &[("class", "kv")])
        .el("dt", &[], "Head")
        .open("dd", &[]);
    revision(h, Some(&b.target));
    h.close("dd")
        .el("dt", &[], "Highest impact")
        .open("dd", &[("id", "branch-max-impact")]);
    match &b.max_impact {
        Some(i) => impact_badge(h, i),
        None => {
            h.text("none");
        }
    }
    h.close("dd").close("dl");
    for e in &b.errors {
        h.el(
            "p",
            &[("class", "notice error")],
            &format!("{}: {}", e.id, e.message),
        );
    }
    if b.changes.is_empty() {
        h.el(
            "p",
            &[("class", "notice")],
            "No change: the branch's head matches the host.",
        );
    }
    h.open("div", &[("class", "plan")]);
    for c in &b.changes {
        planned_change(h, c, details);
    }
    h.close("div");
    if !b.text.is_empty() {
        h.el(
            "pre",
            &[("tabindex", "0"), ("id", "branch-plan-text")],
            &b.text,
        );
    }
    h.close("section");
}

fn planned_change(h: &mut Html, c: &PlannedChange, details: &BTreeSet<String>) {
    h.open("article", &[("class", "change"), ("data-id", &c.id)])
        .open("h3", &[])
        .el("span", &[("class", "sym")], &c.symbol);
    match c.id.split_once('/') {
        Some((k, n)) if details.contains(&c.id) => h.link(&detail_href(k, n), &c.id),
        _ => h.el("span", &[("title", "not on this host yet: no page")], &c.id),
    };
    h.el("span", &[("class", "verb")], &c.verb);
    if let Some(i) = &c.impact {
        impact_badge(h, i);
    }
    if c.drift {
        h.el("span", &[("class", "badge drift")], "drift");
    }
    h.el("span", &[("class", "badge pending-badge")], &c.state)
        .close("h3");
    if let Some(n) = &c.note {
        h.el("p", &[("class", "muted")], n);
    }
    if !c.fields.is_empty() {
        diff_table(h, &c.fields);
    }
    h.close("article");
}

/// `/login`.
pub fn login(next: &str, failed: bool) -> Html {
    let mut h = Html::new();
    h.open(
        "form",
        &[
            ("class", "login panel"),
            ("method", "post"),
            ("action", "/api/v1/login"),
        ],
    )
    .el("h1", &[], "Log in to stead");
    if failed {
        h.el(
            "p",
            &[("class", "notice error"), ("role", "alert")],
            "Wrong user name or password.",
        );
    }
    h.open("label", &[])
        .text("User name")
        .open(
            "input",
            &[
                ("name", "username"),
                ("autocomplete", "username"),
                ("required", "required"),
            ],
        )
        .close("label")
        .open("label", &[])
        .text("Password")
        .open(
            "input",
            &[
                ("name", "password"),
                ("type", "password"),
                ("autocomplete", "current-password"),
                ("required", "required"),
            ],
        )
        .close("label")
        .open(
            "input",
            &[("type", "hidden"), ("name", "next"), ("value", next)],
        )
        .el(
            "button",
            &[("type", "submit"), ("class", "primary")],
            "Log in",
        )
        .close("form");
    h
}

/// `/console/{kind}/{name}`: the serial console over a websocket.
pub fn console(kind: &str, name: &str) -> Html {
    let mut h = Html::new();
    let id = format!("{kind}/{name}");
    h.open("h1", &[])
        .text("Console of ")
        .link(&detail_href(kind, name), &id)
        .close("h1");
    h.open("p", &[])
        .el(
            "span",
            &[("id", "console-state"), ("role", "status")],
            "connecting",
        )
        .text(" ")
        .el(
            "button",
            &[("type", "button"), ("id", "console-detach")],
            "Detach",
        )
        .close("p");
    // xterm.js mounts its terminal in `#console-term` and hides the plain text view;
    // without it (no script, or xterm.js not loaded) the plain view stays.
    h.el(
        "div",
        &[
            ("id", "console-term"),
            ("class", "console-term hidden"),
            ("role", "region"),
            ("aria-label", "Terminal"),
        ],
        "",
    );
    h.open("noscript", &[])
        .el(
            "p",
            &[("class", "notice")],
            &format!(
                "The console needs JavaScript; from a shell, `stead console {kind}/{name}` \
                 attaches to it."
            ),
        )
        .close("noscript");
    h.el(
        "pre",
        &[
            ("id", "console-screen"),
            ("class", "console"),
            ("tabindex", "0"),
            ("aria-label", "Console output"),
            ("aria-live", "off"),
            (
                "data-ws",
                &format!("/console/{}/{}/ws", url_part(kind), url_part(name)),
            ),
            (
                "data-replays",
                if kind == "VirtualMachine" {
                    "true"
                } else {
                    "false"
                },
            ),
        ],
        "",
    );
    h.open("form", &[("class", "console-input")])
        .open("label", &[("for", "console-line"), ("class", "muted")])
        .text("Input")
        .close("label")
        .open(
            "input",
            &[
                ("id", "console-line"),
                ("name", "line"),
                ("autocomplete", "off"),
            ],
        )
        .el("button", &[("type", "submit")], "Send")
        .close("form");
    h.el(
        "p",
        &[("class", "muted")],
        "Type into the terminal, or send a whole line (with a newline) from the field. Detach \
         leaves the workload running; it is the browser's equivalent of leaving `stead \
         console`.",
    );
    h
}

/// The cluster page: nodes with their leases, the leader, placements and owners,
/// replication lag; or the notice of why there is nothing to show.
pub fn cluster(c: &crate::view::cluster::ClusterView) -> Html {
    let mut h = Html::new();
    h.el("h1", &[], "Cluster");
    if let Some(n) = &c.notice {
        h.el("p", &[("class", "notice"), ("id", "cluster-notice")], n);
    }
    if !c.cluster || c.notice.is_some() {
        return h;
    }
    h.open("dl", &[("class", "kv")])
        .el("dt", &[], "Leader")
        .el(
            "dd",
            &[("id", "cluster-leader")],
            c.leader.as_deref().unwrap_or("none elected"),
        )
        .el("dt", &[], "etcd revision")
        .el("dd", &[], &c.revision.to_string())
        .close("dl");
    h.el("h2", &[], "Nodes");
    h.open("table", &[("id", "cluster-nodes")])
        .raw("<thead><tr><th scope=\"col\">Node</th><th scope=\"col\">Address</th><th scope=\"col\">CPUs</th><th scope=\"col\">Memory</th><th scope=\"col\">Lease</th><th scope=\"col\">Lease left</th><th scope=\"col\">Version</th></tr></thead>")
        .open("tbody", &[]);
    for n in &c.nodes {
        let name = if n.leader {
            format!("{} (leader)", n.name)
        } else {
            n.name.clone()
        };
        let left = if n.lease_ttl_seconds < 0 {
            "unknown".to_string()
        } else {
            format!("{} s", n.lease_ttl_seconds)
        };
        h.open("tr", &[("data-node", &n.name)])
            .el("td", &[], &name)
            .el("td", &[], &n.address)
            .el("td", &[], &format!("{:.1}", n.milli_cpus as f64 / 1000.0))
            .el("td", &[], &bytes(n.memory_bytes as f64))
            .el("td", &[("class", "mono")], &n.lease)
            .el("td", &[], &left)
            .el("td", &[], &n.version)
            .close("tr");
    }
    h.close("tbody").close("table");
    h.el("h2", &[], "Placements");
    h.open("table", &[("id", "cluster-placements")])
        .raw("<thead><tr><th scope=\"col\">Workload</th><th scope=\"col\">Assigned to</th><th scope=\"col\">Running on</th><th scope=\"col\">HA</th><th scope=\"col\">Fencing token</th></tr></thead>")
        .open("tbody", &[]);
    for p in &c.placements {
        h.open("tr", &[("data-id", &p.resource)])
            .el("td", &[], &p.resource)
            .el("td", &[], &p.node)
            .el("td", &[], p.owner.as_deref().unwrap_or("nobody"))
            .el("td", &[], if p.ha { "yes" } else { "no" })
            .el(
                "td",
                &[],
                &p.fencing_token.map(|t| t.to_string()).unwrap_or_default(),
            )
            .close("tr");
    }
    h.close("tbody").close("table");
    h.el("h2", &[], "Replication");
    if c.replication.is_empty() {
        h.el("p", &[("class", "muted")], "No replicated volumes.");
        return h;
    }
    h.open("table", &[("id", "cluster-replication")])
        .raw("<thead><tr><th scope=\"col\">Volume</th><th scope=\"col\">From</th><th scope=\"col\">To</th><th scope=\"col\">Lag</th><th scope=\"col\">Last point</th><th scope=\"col\">Failures</th><th scope=\"col\">Last error</th></tr></thead>")
        .open("tbody", &[]);
    for r in &c.replication {
        h.open("tr", &[])
            .el("td", &[], &r.volume)
            .el("td", &[], &r.from)
            .el("td", &[], &r.to)
            .el(
                "td",
                &[],
                &r.lag_seconds
                    .map(|s| format!("{s} s"))
                    .unwrap_or_else(|| "unknown".into()),
            )
            .el(
                "td",
                &[],
                &r.last_point.map(|t| time(t as f64)).unwrap_or_default(),
            )
            .el("td", &[], &r.failures.to_string())
            .el("td", &[], r.last_error.as_deref().unwrap_or(""))
            .close("tr");
    }
    h.close("tbody").close("table");
    h
}

/// The screen page of QEMU VM `name`: noVNC (loaded by the script from `rfb_url`) draws
/// the VM's display in `#screen` from the websocket in its `data-ws`.
pub fn screen(name: &str, rfb_url: &str) -> Html {
    let mut h = Html::new();
    let id = format!("VirtualMachine/{name}");
    h.open("h1", &[])
        .text("Screen of ")
        .link(&detail_href("VirtualMachine", name), &id)
        .close("h1");
    h.open("p", &[])
        .el(
            "span",
            &[("id", "screen-state"), ("role", "status")],
            "connecting",
        )
        .text(" ")
        .el(
            "button",
            &[("type", "button"), ("id", "screen-detach")],
            "Disconnect",
        )
        .text(" ")
        .el(
            "button",
            &[("type", "button"), ("id", "screen-cad")],
            "Send Ctrl-Alt-Del",
        )
        .close("p");
    h.open("noscript", &[])
        .el("p", &[("class", "notice")], "The screen needs JavaScript.")
        .close("noscript");
    h.el(
        "div",
        &[
            ("id", "screen"),
            ("class", "screen"),
            ("role", "region"),
            ("aria-label", "Screen of the VM"),
            (
                "data-ws",
                &format!("/screen/VirtualMachine/{}/ws", url_part(name)),
            ),
            ("data-rfb", rfb_url),
        ],
        "",
    );
    h.el(
        "p",
        &[("class", "muted")],
        "The VM's display (QEMU's VNC server, through the controller). Click it to type into \
         the VM; Disconnect leaves the VM running.",
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::TreeEdge;

    fn summary(kind: &str, name: &str, status: &str) -> ResourceSummary {
        ResourceSummary {
            id: format!("{kind}/{name}"),
            kind: kind.into(),
            name: name.into(),
            status: status.into(),
            reason: "Converged".into(),
            message: String::new(),
            since: None,
            drift: None,
            drifted: false,
        }
    }

    fn node(kind: &str, name: &str, level: usize) -> TreeNode {
        TreeNode {
            resource: summary(kind, name, "Ready"),
            level,
            health: "Ready".into(),
            pending: None,
        }
    }

    fn tree_of(nodes: Vec<TreeNode>, edges: Vec<TreeEdge>) -> Tree {
        Tree {
            revision: Some("0123456789abcdef".into()),
            total: nodes.len(),
            nodes,
            edges,
        }
    }

    #[test]
    fn cluster_page_shows_nodes_leader_placements_and_lag_or_a_notice() {
        use crate::view::cluster::ClusterView;
        let none = cluster(&ClusterView::not_a_cluster()).into_string();
        assert!(none.contains("not a node of a cluster"), "{none}");
        assert!(!none.contains("<table"));
        let st = serde_json::json!({
            "leader": "n1",
            "nodes": [{"name": "n1", "address": "a:1", "capacity": {"milliCpus": 2000, "memoryBytes": 1073741824u64}, "version": "0.1.0", "lease": 16, "leaseTtlSeconds": 7}],
            "assignments": [{"resource": "VirtualMachine/db<x>", "node": "n1", "ha": true, "owner": "n1", "fencingToken": 9}],
            "replication": {"data": {"from": "n1", "to": "n2", "lagS": 3, "failures": 0}},
            "revision": 5
        });
        let page = cluster(&ClusterView::from_status(&st)).into_string();
        for want in [
            "n1 (leader)",
            "7 s",
            "1.0 GiB",
            "VirtualMachine/db&lt;x&gt;",
            ">9<",
            "3 s",
            "2.0",
        ] {
            assert!(page.contains(want), "{want} in {page}");
        }
    }

    #[test]
    fn tree_puts_levels_in_columns_with_their_edges() {
        let t = tree_of(
            vec![node("StoragePool", "local", 0), node("Volume", "a", 1)],
            vec![TreeEdge {
                from: "Volume/a".into(),
                to: "StoragePool/local".into(),
                field: "/spec/pool".into(),
            }],
        );
        let html = tree(&t, &TreeFilter::default(), &BTreeSet::new()).into_string();
        let l0 = html.find("Level 0").unwrap();
        let l1 = html.find("Level 1").unwrap();
        let pool = html.find("data-id=\"StoragePool/local\"").unwrap();
        let vol = html.find("data-id=\"Volume/a\"").unwrap();
        assert!(l0 < pool && pool < l1 && l1 < vol, "{html}");
        assert!(html.contains("data-deps=\"StoragePool%2Flocal\""), "{html}");
        assert!(html.contains("2 of 2 resources, revision 0123456789ab"));
    }

    #[test]
    fn tree_escapes_names_and_badges_drift_and_pending() {
        let mut n = node("Volume", "<img src=x onerror=alert(1)>", 0);
        n.resource.drift = Some("size 1 -> 2".into());
        n.resource.drifted = true;
        n.pending = Some("update in place".into());
        let html = tree(
            &tree_of(vec![n], vec![]),
            &TreeFilter::default(),
            &BTreeSet::new(),
        )
        .into_string();
        assert!(!html.contains("<img"), "{html}");
        assert!(html.contains("&lt;img src=x onerror=alert(1)&gt;"));
        assert!(
            html.contains(">drifted<") && html.contains(">update in place<"),
            "{html}"
        );
        assert!(
            html.contains(
                "href=\"/resources/Volume/%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E\""
            ),
            "{html}"
        );
    }

    #[test]
    fn filter_form_keeps_the_choice() {
        let f = TreeFilter {
            kind: Some("volume".into()),
            status: Some("Failed".into()),
            name: Some("we\"b".into()),
        };
        let kinds: BTreeSet<String> = ["Volume".to_string(), "Network".to_string()].into();
        let html = tree(&tree_of(vec![], vec![]), &f, &kinds).into_string();
        assert!(
            html.contains("<option value=\"Volume\" selected=\"selected\">"),
            "{html}"
        );
        assert!(
            html.contains("<option value=\"Failed\" selected=\"selected\">"),
            "{html}"
        );
        assert!(html.contains("value=\"we&quot;b\""), "{html}");
        assert!(html.contains("No resource matches."));
    }

    #[test]
    fn pending_shows_impact_and_fields() {
        let p = Pending {
            applied: None,
            target: None,
            head_error: None,
            changes: vec![PlannedChange {
                id: "VirtualMachine/vm1".into(),
                action: "update".into(),
                symbol: "~".into(),
                verb: "update in place".into(),
                impact: Some("restart".into()),
                drift: false,
                fields: vec![FieldDiff {
                    path: "/memory".into(),
                    observed: Some(Value::from(32)),
                    desired: Some(Value::from(48)),
                    impact: "restart".into(),
                    text: "32 -> 48".into(),
                }],
                note: None,
                state: "waiting-for-sync".into(),
            }],
            errors: vec![],
            max_impact: Some("restart".into()),
            text: "~ VirtualMachine/vm1 <restart>".into(),
            branch: None,
        };
        let details: BTreeSet<String> = ["VirtualMachine/vm1".to_string()].into();
        let html = pending(&p, &details).into_string();
        assert!(!html.contains("branch-plan"));
        assert!(
            html.contains("<a href=\"/resources/VirtualMachine/vm1\">VirtualMachine/vm1</a>"),
            "{html}"
        );
        let mut with_branch = p.clone();
        with_branch.branch = Some(crate::view::BranchPlan {
            branch: "preview<1>".into(),
            target: crate::view::RevisionInfo::bare(&"c".repeat(40)),
            changes: vec![PlannedChange {
                id: "Volume/new".into(),
                action: "create".into(),
                symbol: "+".into(),
                verb: "create".into(),
                impact: None,
                fields: vec![],
                state: "plan-only".into(),
                ..p.changes[0].clone()
            }],
            errors: vec![],
            max_impact: Some("data-loss".into()),
            text: "- Volume/old".into(),
        });
        let b = pending(&with_branch, &details).into_string();
        assert!(!b.contains("href=\"/resources/Volume/new\""), "{b}");
        assert!(
            b.contains("<span title=\"not on this host yet: no page\">Volume/new</span>"),
            "{b}"
        );
        assert!(b.contains("Plan-only branch preview&lt;1&gt;"), "{b}");
        assert!(
            b.contains("id=\"branch-max-impact\"><span class=\"badge i-data-loss\">"),
            "{b}"
        );
        assert!(
            html.contains("<span class=\"badge i-restart\">restart</span>"),
            "{html}"
        );
        assert!(
            html.contains(">/memory<") && html.contains(">waiting-for-sync<"),
            "{html}"
        );
        assert!(
            html.contains("~ VirtualMachine/vm1 &lt;restart&gt;"),
            "{html}"
        );
    }

    #[test]
    fn console_page_points_at_its_websocket() {
        let html = console("VirtualMachine", "vm 1").into_string();
        assert!(
            html.contains("data-ws=\"/console/VirtualMachine/vm%201/ws\""),
            "{html}"
        );
        assert!(html.contains("data-replays=\"true\""));
        assert!(has_console("Container") && !has_console("Volume"));
    }

    #[test]
    fn login_keeps_next_escaped() {
        let html = login("/resources?x=\"><script>", true).into_string();
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("Wrong user name or password."));
    }
}
