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
