//! Plan and report output: terraform-like text (colored on a TTY) and stable JSON.

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::exec::{Outcome, Report};
use crate::plan::{Action, Plan};

/// Text styling.
#[derive(Debug, Clone, Copy, Default)]
pub struct Style {
    /// Emit ANSI colors.
    pub color: bool,
}

impl Style {
    fn paint(&self, code: &str, s: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }
    fn for_action(&self, a: Action, s: &str) -> String {
        let code = match a {
            Action::Create => "32",
            Action::Adopt => "34",
            Action::Update => "33",
            Action::Replace => "35",
            Action::Delete => "31",
            Action::Retain => "36",
            Action::Noop => "0",
        };
        self.paint(code, s)
    }
}

/// A JSON value as plan text: strings bare, lists `[a, b]`, absent `(none)`.
pub fn show(v: &Option<Value>) -> String {
    match v {
        None | Some(Value::Null) => "(none)".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => {
            let items: Vec<String> = a.iter().map(|x| show(&Some(x.clone()))).collect();
            format!("[{}]", items.join(", "))
        }
        Some(other) => other.to_string(),
    }
}

/// A field value for display: byte quantities (`size`, `memory`, `*Bytes`) held as
/// integers print in the largest exact binary unit, like manifests write them.
pub fn show_field(path: &str, v: &Option<Value>) -> String {
    let last = path.rsplit('/').next().unwrap_or("");
    let bytes_field =
        matches!(last, "size" | "memory") || last.ends_with("Bytes") || last.ends_with("_bytes");
    match v {
        Some(Value::Number(n)) if bytes_field => match n.as_u64() {
            Some(b) => stead_schema::ByteSize(b).to_string(),
            None => n.to_string(),
        },
        _ => show(v),
    }
}

fn field_name(path: &str) -> String {
    path.trim_start_matches('/').replace('/', ".")
}

/// Renders the plan like `terraform plan`.
pub fn plan_text(plan: &Plan, style: Style) -> String {
    let mut out = String::new();
    for c in plan.changes.iter().filter(|c| c.action != Action::Noop) {
        let head = format!("{:>3} {}", c.action.symbol(), c.id);
        let mut tail = format!("  ({}", c.action.verb());
        if let Some(i) = c.impact {
            let _ = write!(tail, ", impact: {}", i.as_str());
        }
        if let Some(secs) = c.stop_timeout_secs {
            let _ = write!(tail, ", stop up to {secs}s");
        }
        if c.drift {
            tail.push_str(", drift");
        }
        tail.push(')');
        let _ = writeln!(out, "{}{}", style.for_action(c.action, &head), tail);
        if let Some(n) = &c.note {
            let _ = writeln!(out, "      # {n}");
        }
        if let Some(snap) = &c.safety_snapshot {
            let _ = writeln!(
                out,
                "      # safety snapshot {snap} is taken first (undo: stead snapshot rollback {} {snap})",
                c.id
            );
        }
        for f in &c.fields {
            let name = field_name(&f.path);
            if c.action == Action::Create {
                let _ = writeln!(out, "      {}: {}", name, show_field(&f.path, &f.new));
            } else {
                let label = if f.impact != crate::driver::Impact::Hot && c.fields.len() > 1 {
                    format!("  [{}]", f.impact.as_str())
                } else {
                    String::new()
                };
                let _ = writeln!(
                    out,
                    "      {}: {} -> {}{}",
                    name,
                    show_field(&f.path, &f.old),
                    show_field(&f.path, &f.new),
                    label
                );
            }
        }
    }
    let errors = plan
        .errors
        .iter()
        .map(|e| ("31;1", "error:", &e.id, &e.message));
    let warnings = plan
        .warnings
        .iter()
        .map(|w| ("33;1", "warning:", &w.id, &w.message));
    for (color, label, id, message) in errors.chain(warnings) {
        let _ = writeln!(out, "{} {}: {}", style.paint(color, label), id, message);
    }
    let s = plan.summary();
    let n = |a| s.get(&a).copied().unwrap_or(0);
    if plan.has_changes() {
        // The adopt count shows only when there is one: plans without adoption read as
        // they always did.
        let adopt = match n(Action::Adopt) {
            0 => String::new(),
            k => format!("{k} to adopt, "),
        };
        let _ = writeln!(
            out,
            "\nPlan: {adopt}{} to create, {} to update, {} to replace, {} to delete, {} to retain, {} unchanged.",
            n(Action::Create),
            n(Action::Update),
            n(Action::Replace),
            n(Action::Delete),
            n(Action::Retain),
            n(Action::Noop)
        );
    } else if plan.errors.is_empty() {
        let _ = writeln!(
            out,
            "No changes. {} resources match the host.",
            n(Action::Noop)
        );
    }
    if !plan.errors.is_empty() {
        let _ = writeln!(
            out,
            "\n{} error(s): the plan cannot be applied.",
            plan.errors.len()
        );
    }
    out
}

/// The plan as a stable JSON document.
pub fn plan_json(plan: &Plan) -> Value {
    let s = plan.summary();
    let n = |a| s.get(&a).copied().unwrap_or(0);
    json!({
        "apiVersion": stead_schema::API_VERSION,
        "kind": "Plan",
        "changes": plan.changes.iter().filter(|c| c.action != Action::Noop).collect::<Vec<_>>(),
        "errors": plan.errors,
        "warnings": plan.warnings,
        "summary": {
            "create": n(Action::Create),
            "adopt": n(Action::Adopt),
            "update": n(Action::Update),
            "replace": n(Action::Replace),
            "delete": n(Action::Delete),
            "retain": n(Action::Retain),
            "unchanged": n(Action::Noop),
        },
        "hasChanges": plan.has_changes(),
    })
}

/// One line for a finished step.
pub fn step_line(r: &crate::exec::StepResult, style: Style) -> String {
    let word = r.outcome.word();
    let colored = match &r.outcome {
        Outcome::Failed(_) | Outcome::Skipped(_) => style.paint("31", word),
        _ => style.paint("32", word),
    };
    match (&r.outcome, &r.error) {
        (Outcome::Failed(m), Some(e)) => {
            let class = if e.terminal { "terminal" } else { "retryable" };
            format!(
                "{}: {} ({:.2}s, {} {class}): {}",
                r.id, colored, r.seconds, e.reason, m
            )
        }
        (Outcome::Failed(m) | Outcome::Skipped(m), _) => {
            format!("{}: {} ({:.2}s): {}", r.id, colored, r.seconds, m)
        }
        _ => format!("{}: {} ({:.2}s)", r.id, colored, r.seconds),
    }
}

/// Closing summary of an apply.
pub fn report_summary(report: &Report) -> String {
    let parts: Vec<String> = report
        .summary()
        .iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect();
    if report.success() {
        format!("Apply complete: {}.", parts.join(", "))
    } else {
        format!("Apply finished with errors: {}.", parts.join(", "))
    }
}

/// The first line of [`plan_markdown`]: a hidden marker by which CI scripts find the
/// comment they posted before and update it instead of adding another.
pub const MARKDOWN_MARKER: &str = "<!-- stead-plan -->";

/// The plan as a pull-request comment (GitHub/GitLab/Forgejo markdown): a title with the
/// counts, a table by impact (`data-loss` and `recreate` first), each changed resource
/// with its field changes in a collapsible block, then the errors and warnings.
///
/// Every action is rendered by its symbol and verb, so actions added later need no
/// change here.
pub fn plan_markdown(plan: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{MARKDOWN_MARKER}");
    let _ = writeln!(out, "### {}\n", md_title(plan));
    let changes: Vec<&crate::plan::Change> = plan
        .changes
        .iter()
        .filter(|c| c.action != Action::Noop)
        .collect();
    if !changes.is_empty() {
        out.push_str(&md_impact_table(&changes));
        out.push_str("\n#### Changes\n\n");
        for c in &changes {
            out.push_str(&md_change(c));
        }
    }
    md_problems(&mut out, "Errors", "error", &plan.errors);
    md_problems(&mut out, "Warnings", "warning", &plan.warnings);
    out
}

/// `stead plan: 1 to create, 2 to update in place, 3 unchanged` (+ the error count).
fn md_title(plan: &Plan) -> String {
    let summary = plan.summary();
    let mut parts: Vec<String> = summary
        .iter()
        .filter(|(a, _)| **a != Action::Noop)
        .map(|(a, n)| format!("{n} to {}", a.verb()))
        .collect();
    let unchanged = summary.get(&Action::Noop).copied().unwrap_or(0);
    if parts.is_empty() {
        parts.push("no changes".into());
    }
    parts.push(format!("{unchanged} unchanged"));
    let mut title = format!("stead plan: {}", parts.join(", "));
    if !plan.errors.is_empty() {
        let _ = write!(
            title,
            " — {} error(s), the plan cannot be applied",
            plan.errors.len()
        );
    }
    title
}

/// The label of a change's impact row: its impact, or `none` (create, retain …).
fn md_impact_label(impact: Option<crate::driver::Impact>) -> &'static str {
    impact.map_or("none", |i| i.as_str())
}

/// The summary table: one row per impact, the most disruptive first.
fn md_impact_table(changes: &[&crate::plan::Change]) -> String {
    let mut rows: std::collections::BTreeMap<
        std::cmp::Reverse<Option<crate::driver::Impact>>,
        Vec<String>,
    > = std::collections::BTreeMap::new();
    for c in changes {
        rows.entry(std::cmp::Reverse(c.impact))
            .or_default()
            .push(format!("`{}` ({})", c.id, c.action.verb()));
    }
    let mut out = String::from("| Impact | Changes | Resources |\n|---|---:|---|\n");
    for (std::cmp::Reverse(impact), ids) in &rows {
        let label = md_impact_label(*impact);
        let label = if *impact >= Some(crate::driver::Impact::Recreate) {
            format!("**{label}**")
        } else {
            label.to_string()
        };
        let _ = writeln!(out, "| {label} | {} | {} |", ids.len(), ids.join(", "));
    }
    out
}

/// One resource: its plan line, and its notes and field changes in a `<details>` block.
fn md_change(c: &crate::plan::Change) -> String {
    let mut head = format!(
        "<code>{} {}</code> {}",
        md_html(c.action.symbol()),
        md_html(&c.id.to_string()),
        md_html(c.action.verb())
    );
    let mut tags: Vec<String> = Vec::new();
    if let Some(i) = c.impact {
        tags.push(format!("impact: <b>{}</b>", i.as_str()));
    }
    if let Some(secs) = c.stop_timeout_secs {
        tags.push(format!("stop up to {secs}s"));
    }
    if c.drift {
        tags.push("drift".into());
    }
    if !tags.is_empty() {
        let _ = write!(head, " ({})", tags.join(", "));
    }
    let body = md_change_body(c);
    if body.is_empty() {
        return format!("{head}\n\n");
    }
    format!("<details><summary>{head}</summary>\n\n{body}\n</details>\n\n")
}

/// The notes and `field: old → new` lines of one change, as a markdown list.
fn md_change_body(c: &crate::plan::Change) -> String {
    let mut out = String::new();
    if let Some(n) = &c.note {
        let _ = writeln!(out, "- _{}_", md_html(n));
    }
    if let Some(snap) = &c.safety_snapshot {
        let _ = writeln!(
            out,
            "- _safety snapshot {} is taken first (undo: {})_",
            md_code(snap),
            md_code(&format!("stead snapshot rollback {} {snap}", c.id))
        );
    }
    for f in &c.fields {
        let name = md_code(&field_name(&f.path));
        let new = md_code(&show_field(&f.path, &f.new));
        if c.action == Action::Create {
            let _ = writeln!(out, "- {name}: {new}");
        } else {
            let old = md_code(&show_field(&f.path, &f.old));
            let _ = writeln!(out, "- {name}: {old} → {new} ({})", f.impact.as_str());
        }
    }
    out
}

/// A section of plan errors or warnings (nothing when there are none).
fn md_problems(out: &mut String, title: &str, word: &str, items: &[crate::plan::PlanError]) {
    if items.is_empty() {
        return;
    }
    let _ = writeln!(out, "#### {title}\n");
    for e in items {
        let _ = writeln!(out, "- **{word}** `{}`: {}", e.id, md_html(&e.message));
    }
    out.push('\n');
}

/// Text safe inside HTML and markdown prose: `&`, `<`, `>` escaped, line breaks folded.
fn md_html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace(['\n', '\r'], " ")
}

/// A markdown code span that holds `s` whatever backticks it contains.
fn md_code(s: &str) -> String {
    let s = s.replace(['\n', '\r'], " ");
    if s.is_empty() {
        return "`\"\"`".into();
    }
    let mut longest = 0;
    let mut run = 0;
    for ch in s.chars() {
        run = if ch == '`' { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    let fence = "`".repeat(longest + 1);
    let pad = if s.starts_with('`') || s.ends_with('`') {
        " "
    } else {
        ""
    };
    format!("{fence}{pad}{s}{pad}{fence}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{FieldChange, Impact};
    use crate::plan::Change;
    use stead_schema::{Kind, ResourceId};

    fn change(action: Action, impact: Option<Impact>, fields: Vec<FieldChange>) -> Change {
        Change {
            id: ResourceId::new(Kind::Container, "web"),
            action,
            impact,
            fields,
            drift: false,
            note: None,
            safety_snapshot: None,
            stop_timeout_secs: None,
        }
    }

    fn field(path: &str, old: &str, new: &str, impact: Impact) -> FieldChange {
        FieldChange {
            path: path.into(),
            old: Some(Value::from(old)),
            new: Some(Value::from(new)),
            impact,
        }
    }

    #[test]
    fn changes_that_stop_the_object_are_told_apart() {
        let restart = field("/command", "a", "b", Impact::Restart);
        let stop = field("/state", "running", "stopped", Impact::Hot);
        let start = field("/state", "stopped", "running", Impact::Hot);
        assert!(change(Action::Delete, Some(Impact::Recreate), vec![]).stops());
        assert!(change(Action::Replace, Some(Impact::Recreate), vec![]).stops());
        assert!(change(Action::Update, Some(Impact::Restart), vec![restart]).stops());
        assert!(change(Action::Update, Some(Impact::Hot), vec![stop]).stops());
        assert!(!change(Action::Update, Some(Impact::Hot), vec![start]).stops());
        assert!(!change(Action::Create, None, vec![]).stops());
        assert!(!change(Action::Retain, None, vec![]).stops());
    }

    #[test]
    fn an_adopt_line_has_its_symbol_word_fields_and_count() {
        let mut c = change(
            Action::Adopt,
            Some(Impact::Hot),
            vec![field("/mtu", "1500", "9000", Impact::Hot)],
        );
        c.id = ResourceId::new(Kind::Network, "vmbr0");
        c.note = Some("exists on the host".into());
        let plan = Plan {
            changes: vec![c],
            errors: vec![],
            warnings: vec![],
        };
        let text = plan_text(&plan, Style::default());
        assert!(
            text.contains("  & Network/vmbr0  (adopt, impact: hot)\n      # exists on the host\n      mtu: 1500 -> 9000\n"),
            "{text}"
        );
        assert!(text.contains("Plan: 1 to adopt, 0 to create,"), "{text}");
        let j = plan_json(&plan);
        assert_eq!(j["changes"][0]["action"], "adopt");
        assert_eq!(j["summary"]["adopt"], 1);
        assert_eq!(j["hasChanges"], true);
    }

    #[test]
    fn the_plan_text_shows_how_long_a_stop_may_take() {
        let mut c = change(
            Action::Update,
            Some(Impact::Restart),
            vec![field("/command", "a", "b", Impact::Restart)],
        );
        c.stop_timeout_secs = Some(10);
        let mut d = change(Action::Delete, Some(Impact::Recreate), vec![]);
        d.id = ResourceId::new(Kind::Container, "old");
        d.stop_timeout_secs = Some(30);
        let plan = Plan {
            changes: vec![c, d],
            errors: vec![],
            warnings: vec![],
        };
        let text = plan_text(&plan, Style::default());
        assert!(
            text.contains("Container/web  (update in place, impact: restart, stop up to 10s)"),
            "{text}"
        );
        assert!(
            text.contains("Container/old  (delete, impact: recreate, stop up to 30s)"),
            "{text}"
        );
        assert_eq!(plan_json(&plan)["changes"][1]["stopTimeoutSecs"], 30);
    }
}

#[cfg(test)]
mod markdown_tests {
    use super::*;
    use crate::driver::{FieldChange, Impact};
    use crate::plan::{Change, PlanError};
    use stead_schema::{Kind, ResourceId};

    fn change(kind: Kind, name: &str, action: Action, impact: Option<Impact>) -> Change {
        Change {
            id: ResourceId::new(kind, name),
            action,
            impact,
            fields: vec![],
            drift: false,
            note: None,
            safety_snapshot: None,
            stop_timeout_secs: None,
        }
    }

    fn field(path: &str, old: Option<Value>, new: Option<Value>, impact: Impact) -> FieldChange {
        FieldChange {
            path: path.into(),
            old,
            new,
            impact,
        }
    }

    /// A plan with every action and impact: create, hot and restart updates, a replace,
    /// a data-loss delete, a retain, a no-op, an error and a warning.
    fn sample_plan() -> Plan {
        let mut create = change(Kind::Network, "br0", Action::Create, None);
        create.fields = vec![
            field("/type", None, Some(json!("bridge")), Impact::Hot),
            field("/mtu", None, Some(json!(1500)), Impact::Hot),
        ];
        let mut hot = change(Kind::Network, "lan", Action::Update, Some(Impact::Hot));
        hot.fields = vec![field(
            "/mtu",
            Some(json!(1500)),
            Some(json!(9000)),
            Impact::Hot,
        )];
        hot.drift = true;
        let mut restart = change(
            Kind::Container,
            "web",
            Action::Update,
            Some(Impact::Restart),
        );
        restart.fields = vec![
            field(
                "/resources/memory",
                Some(json!(536_870_912)),
                Some(json!(1_073_741_824)),
                Impact::Restart,
            ),
            field(
                "/command",
                Some(json!(["nginx"])),
                Some(json!(["nginx", "-g", "daemon off;"])),
                Impact::Restart,
            ),
        ];
        restart.stop_timeout_secs = Some(10);
        let mut replace = change(
            Kind::VirtualMachine,
            "db",
            Action::Replace,
            Some(Impact::Recreate),
        );
        replace.fields = vec![field(
            "/firmware",
            Some(json!("bios")),
            Some(json!("uefi")),
            Impact::Recreate,
        )];
        let mut delete = change(
            Kind::Volume,
            "scratch",
            Action::Delete,
            Some(Impact::DataLoss),
        );
        delete.note = Some("deletionPolicy: Delete".into());
        delete.safety_snapshot = Some("pre-delete-20261206T220000Z".into());
        let retain = change(Kind::Volume, "old-data", Action::Retain, None);
        let noop = change(Kind::StoragePool, "default", Action::Noop, None);
        Plan {
            changes: vec![create, hot, restart, replace, delete, retain, noop],
            errors: vec![PlanError {
                id: ResourceId::new(Kind::Volume, "big"),
                message: "size 10G -> 5G: a volume cannot <shrink>".into(),
            }],
            warnings: vec![PlanError {
                id: ResourceId::new(Kind::Network, "stray"),
                message: "carries stead's mark but no state knows it".into(),
            }],
        }
    }

    #[test]
    fn the_markdown_plan_is_a_pull_request_comment() {
        let expected = r#"<!-- stead-plan -->
### stead plan: 1 to create, 2 to update in place, 1 to replace, 1 to delete, 1 to retain, 1 unchanged — 1 error(s), the plan cannot be applied

| Impact | Changes | Resources |
|---|---:|---|
| **data-loss** | 1 | `Volume/scratch` (delete) |
| **recreate** | 1 | `VirtualMachine/db` (replace) |
| restart | 1 | `Container/web` (update in place) |
| hot | 1 | `Network/lan` (update in place) |
| none | 2 | `Network/br0` (create), `Volume/old-data` (retain) |

#### Changes

<details><summary><code>+ Network/br0</code> create</summary>

- `type`: `bridge`
- `mtu`: `1500`

</details>

<details><summary><code>~ Network/lan</code> update in place (impact: <b>hot</b>, drift)</summary>

- `mtu`: `1500` → `9000` (hot)

</details>

<details><summary><code>~ Container/web</code> update in place (impact: <b>restart</b>, stop up to 10s)</summary>

- `resources.memory`: `512Mi` → `1Gi` (restart)
- `command`: `[nginx]` → `[nginx, -g, daemon off;]` (restart)

</details>

<details><summary><code>-/+ VirtualMachine/db</code> replace (impact: <b>recreate</b>)</summary>

- `firmware`: `bios` → `uefi` (recreate)

</details>

<details><summary><code>- Volume/scratch</code> delete (impact: <b>data-loss</b>)</summary>

- _deletionPolicy: Delete_
- _safety snapshot `pre-delete-20261206T220000Z` is taken first (undo: `stead snapshot rollback Volume/scratch pre-delete-20261206T220000Z`)_

</details>

<code>= Volume/old-data</code> retain

#### Errors

- **error** `Volume/big`: size 10G -&gt; 5G: a volume cannot &lt;shrink&gt;

#### Warnings

- **warning** `Network/stray`: carries stead's mark but no state knows it

"#;
        let got = plan_markdown(&sample_plan());
        assert_eq!(got, expected, "\n{got}");
    }

    #[test]
    fn a_plan_without_changes_is_one_line_under_the_marker() {
        let plan = Plan {
            changes: vec![change(Kind::Network, "lan", Action::Noop, None)],
            errors: vec![],
            warnings: vec![],
        };
        assert_eq!(
            plan_markdown(&plan),
            "<!-- stead-plan -->\n### stead plan: no changes, 1 unchanged\n\n"
        );
    }

    #[test]
    fn code_spans_hold_backticks_and_html_is_escaped() {
        assert_eq!(md_code("a`b"), "``a`b``");
        assert_eq!(md_code("`x`"), "`` `x` ``");
        assert_eq!(md_code(""), "`\"\"`");
        assert_eq!(md_html("<b>&</b>\nx"), "&lt;b&gt;&amp;&lt;/b&gt; x");
    }
}
