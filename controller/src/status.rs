//! The controller's status document, served as JSON on `<run-dir>/controller.sock` and
//! read by `stead get`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use stead_reconciler::driver::{Health, Observed};
use stead_reconciler::plan::Action;
use stead_schema::{Desired, Kind, ResourceId};

use crate::gate::Blocked;
use crate::source::short;

/// One condition of a resource (Kubernetes style).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `Progressing` or `Failed`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True` or `False`.
    pub status: String,
    /// Short CamelCase reason.
    pub reason: String,
    /// Human-readable message.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// When the condition last changed (Unix seconds).
    pub last_transition_time: f64,
}

/// One resource as the controller last saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceStatus {
    /// Kind.
    pub kind: String,
    /// Name.
    pub name: String,
    /// Summary: Ready, Progressing, Failed or Drifted.
    pub status: String,
    /// Conditions.
    pub conditions: Vec<Condition>,
}

/// The whole status document.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// The `--source`.
    pub source: String,
    /// The revision applied last (the last good one).
    pub revision: Option<String>,
    /// The newest revision seen at the source (may be rejected).
    pub head_revision: Option<String>,
    /// Why the head is not applied (invalid manifests, unsigned), if it is not.
    pub head_error: Option<String>,
    /// The result of the last reconcile.
    pub last_result: Option<String>,
    /// Message of the last reconcile (errors).
    pub message: String,
    /// When a plan was last executed or found converged (Unix seconds).
    pub last_apply_time: Option<f64>,
    /// When the last reconcile ended (Unix seconds).
    pub last_reconcile_time: Option<f64>,
    /// The last fetch error, cleared by a good fetch.
    pub fetch_error: Option<String>,
    /// Reconciles so far.
    pub reconciles: u64,
    /// Whether a good revision has been applied.
    pub ready: bool,
    /// `heal` or `report`.
    pub drift_mode: String,
    /// Per resource of the applied revision.
    pub resources: Vec<ResourceStatus>,
}

/// What a run decided about each resource, from which its status follows.
pub(crate) struct RunVerdicts<'a> {
    /// Left out of the run (plan error, backoff, hold, dependency): (reason, message).
    pub(crate) blocked: &'a Blocked,
    /// Failed in the run: (reason, message).
    pub(crate) failed: &'a Blocked,
    /// Drift that is only reported (`--drift=report`); empty when healing.
    pub(crate) reported_drift: &'a BTreeMap<ResourceId, String>,
    /// Applied in the run.
    pub(crate) applied: &'a BTreeMap<ResourceId, Action>,
    /// The revision applied (for the `Applied` message).
    pub(crate) revision: &'a str,
}

/// The status word of `id` (`Ready`, `Progressing`, `Failed`, `Drifted`) with its
/// condition's reason and message: blocked or failed first, then reported drift, then
/// what this run applied, then the health observe saw (none: `Ready`).
pub(crate) fn verdict(
    id: &ResourceId,
    v: &RunVerdicts<'_>,
    health: Option<&Health>,
) -> (&'static str, String, String) {
    if let Some((reason, msg)) = v.blocked.get(id).or_else(|| v.failed.get(id)) {
        return ("Failed", reason.clone(), msg.clone());
    }
    if let Some(what) = v.reported_drift.get(id) {
        return ("Drifted", "Drifted".into(), what.clone());
    }
    if let Some(a) = v.applied.get(id) {
        let message = format!("{} at {}", a.verb(), short(v.revision));
        return ("Ready", "Applied".into(), message);
    }
    match health {
        Some(Health::Ready) | None => ("Ready", "Converged".into(), String::new()),
        Some(Health::Progressing) => ("Progressing", "Progressing".into(), String::new()),
        Some(Health::Degraded(m)) => ("Failed", "Degraded".into(), m.clone()),
        Some(Health::Failed(m)) => ("Failed", "Unhealthy".into(), m.clone()),
    }
}

/// The conditions of a resource whose status is `word`: `Ready` always, plus
/// `Progressing` or `Failed`. A condition with the same type, status and reason as in
/// `prev` keeps its transition time; any other transitions at `now`.
pub(crate) fn conditions(
    prev: Option<&ResourceStatus>,
    word: &str,
    reason: &str,
    message: &str,
    now: f64,
) -> Vec<Condition> {
    let cond = |type_: &str, status: &str| {
        let since = prev
            .and_then(|p| {
                p.conditions
                    .iter()
                    .find(|c| c.type_ == type_ && c.status == status && c.reason == reason)
            })
            .map(|c| c.last_transition_time)
            .unwrap_or(now);
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: since,
        }
    };
    let mut out = vec![cond(
        "Ready",
        if word == "Ready" { "True" } else { "False" },
    )];
    match word {
        "Progressing" => out.push(cond("Progressing", "True")),
        "Failed" => out.push(cond("Failed", "True")),
        _ => {}
    }
    out
}

/// A workload's CPU seconds and memory bytes from its observed status, if it has any.
/// Drivers write camelCase (`cpuSeconds`); snake_case is accepted too.
pub(crate) fn usage(o: &Observed) -> Option<(Option<f64>, Option<f64>)> {
    let num = |k: &str| o.status.get(k).and_then(Value::as_f64);
    let cpu = num("cpuSeconds").or_else(|| num("cpu_seconds"));
    let mem = num("memoryBytes").or_else(|| num("memory_bytes"));
    (cpu.is_some() || mem.is_some()).then_some((cpu, mem))
}

/// Every desired resource's status after a run, with the figures the metrics take.
#[derive(Debug, Default)]
pub(crate) struct ResourceReport {
    /// Status by resource.
    pub(crate) statuses: BTreeMap<ResourceId, ResourceStatus>,
    /// Resources by kind and status word.
    pub(crate) counts: BTreeMap<(Kind, &'static str), usize>,
    /// Failed resources: kind, name, reason.
    pub(crate) failed: Vec<(Kind, String, String)>,
    /// Workload usage: kind, name, CPU seconds, memory bytes.
    pub(crate) usage: Vec<(Kind, String, Option<f64>, Option<f64>)>,
}

/// The status of every resource of `desired` after a run, transition times carried
/// over from `prev`.
pub(crate) fn resource_report(
    desired: &Desired,
    observed: &BTreeMap<ResourceId, Observed>,
    v: &RunVerdicts<'_>,
    prev: &BTreeMap<ResourceId, ResourceStatus>,
    now: f64,
) -> ResourceReport {
    let mut out = ResourceReport::default();
    for id in desired.resources.keys() {
        let obs = observed.get(id);
        let (word, reason, message) = verdict(id, v, obs.map(|o| &o.health));
        *out.counts.entry((id.kind, word)).or_insert(0) += 1;
        if word == "Failed" {
            out.failed.push((id.kind, id.name.clone(), reason.clone()));
        }
        let conditions = conditions(prev.get(id), word, &reason, &message, now);
        out.statuses.insert(
            id.clone(),
            ResourceStatus {
                kind: id.kind.as_str().into(),
                name: id.name.clone(),
                status: word.into(),
                conditions,
            },
        );
        if let Some((cpu, mem)) = obs.and_then(usage) {
            out.usage.push((id.kind, id.name.clone(), cpu, mem));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Inputs {
        blocked: Blocked,
        failed: Blocked,
        drift: BTreeMap<ResourceId, String>,
        applied: BTreeMap<ResourceId, Action>,
    }

    impl Inputs {
        fn new() -> Self {
            Inputs {
                blocked: Blocked::new(),
                failed: Blocked::new(),
                drift: BTreeMap::new(),
                applied: BTreeMap::new(),
            }
        }
        fn verdicts(&self) -> RunVerdicts<'_> {
            RunVerdicts {
                blocked: &self.blocked,
                failed: &self.failed,
                reported_drift: &self.drift,
                applied: &self.applied,
                revision: "0123456789abcdef",
            }
        }
    }

    fn v() -> ResourceId {
        ResourceId::new(Kind::Volume, "v")
    }

    #[test]
    fn blocked_wins_over_failed_drift_applied_and_health() {
        let mut i = Inputs::new();
        i.blocked.insert(v(), ("Backoff".into(), "retrying".into()));
        i.failed.insert(v(), ("ApplyFailed".into(), "boom".into()));
        i.drift.insert(v(), "missing from the host".into());
        i.applied.insert(v(), Action::Create);
        let (word, reason, _) = verdict(&v(), &i.verdicts(), Some(&Health::Ready));
        assert_eq!((word, reason.as_str()), ("Failed", "Backoff"));
        i.blocked.clear();
        let (word, reason, msg) = verdict(&v(), &i.verdicts(), None);
        assert_eq!(
            (word, reason.as_str(), msg.as_str()),
            ("Failed", "ApplyFailed", "boom")
        );
        i.failed.clear();
        let (word, _, msg) = verdict(&v(), &i.verdicts(), None);
        assert_eq!((word, msg.as_str()), ("Drifted", "missing from the host"));
        i.drift.clear();
        let (word, reason, msg) = verdict(&v(), &i.verdicts(), None);
        assert_eq!((word, reason.as_str()), ("Ready", "Applied"));
        assert!(msg.ends_with("at 0123456789ab"), "{msg}");
    }

    #[test]
    fn health_decides_when_nothing_happened() {
        let i = Inputs::new();
        let of = |h: Option<Health>| {
            let (w, r, _) = verdict(&v(), &i.verdicts(), h.as_ref());
            (w, r)
        };
        assert_eq!(of(None), ("Ready", "Converged".into()));
        assert_eq!(of(Some(Health::Ready)), ("Ready", "Converged".into()));
        assert_eq!(
            of(Some(Health::Progressing)),
            ("Progressing", "Progressing".into())
        );
        assert_eq!(
            of(Some(Health::Degraded("x".into()))),
            ("Failed", "Degraded".into())
        );
        assert_eq!(
            of(Some(Health::Failed("x".into()))),
            ("Failed", "Unhealthy".into())
        );
    }

    #[test]
    fn a_condition_keeps_its_transition_time_until_status_or_reason_change() {
        let status =
            |word: &str, reason: &str, now: f64, prev: Option<&ResourceStatus>| ResourceStatus {
                kind: "Volume".into(),
                name: "v".into(),
                status: word.into(),
                conditions: conditions(prev, word, reason, "", now),
            };
        let failed = status("Failed", "Backoff", 10.0, None);
        assert_eq!(failed.conditions.len(), 2);
        assert_eq!(failed.conditions[0].status, "False");
        assert_eq!(failed.conditions[1].type_, "Failed");
        // Same status and reason: the times stay.
        let again = status("Failed", "Backoff", 20.0, Some(&failed));
        assert_eq!(again.conditions[0].last_transition_time, 10.0);
        assert_eq!(again.conditions[1].last_transition_time, 10.0);
        // Another reason is a transition.
        let other = status("Failed", "ApplyFailed", 30.0, Some(&again));
        assert_eq!(other.conditions[0].last_transition_time, 30.0);
        // Ready: one condition, transitioned now.
        let ready = status("Ready", "Applied", 40.0, Some(&other));
        assert_eq!(ready.conditions.len(), 1);
        assert_eq!(ready.conditions[0].status, "True");
        assert_eq!(ready.conditions[0].last_transition_time, 40.0);
        let progressing = status("Progressing", "Progressing", 50.0, Some(&ready));
        assert_eq!(progressing.conditions[1].type_, "Progressing");
    }

    #[test]
    fn usage_reads_camel_and_snake_case_figures() {
        let with = |status: serde_json::Value| Observed {
            status,
            ..Observed::absent()
        };
        assert_eq!(
            usage(&with(json!({"cpuSeconds": 5.0, "memoryBytes": 2048}))),
            Some((Some(5.0), Some(2048.0)))
        );
        assert_eq!(
            usage(&with(json!({"cpu_seconds": 1}))),
            Some((Some(1.0), None))
        );
        assert_eq!(usage(&with(json!({"other": 1}))), None);
    }
}
