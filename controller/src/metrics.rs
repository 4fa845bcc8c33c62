//! The controller's Prometheus metrics. The registry lives in [`Metrics`], which travels
//! in the controller's context (no global registry). docs/metrics.md lists every metric.

use std::collections::BTreeMap;

use prometheus::{
    CounterVec, Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    Opts, Registry, TextEncoder,
};
use stead_schema::Kind;

/// Results a reconcile can end with (label `result`).
pub const RESULTS: [&str; 5] = ["success", "failed", "invalid", "unsigned", "error"];

/// Statuses a resource can have (label `status` of `stead_resources`).
pub const STATUSES: [&str; 4] = ["Ready", "Progressing", "Failed", "Drifted"];

/// Every controller metric, registered in one registry.
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    /// `stead_reconcile_duration_seconds{result}`.
    pub reconcile_duration: HistogramVec,
    /// `stead_reconcile_total{result}`.
    pub reconcile_total: IntCounterVec,
    /// `stead_resources{kind,status}`.
    pub resources: GaugeVec,
    /// `stead_drift_detected_total{kind}`.
    pub drift_detected: IntCounterVec,
    /// `stead_apply_changes_total{kind,action}`.
    pub apply_changes: IntCounterVec,
    /// `stead_apply_failures_total{kind}`.
    pub apply_failures: IntCounterVec,
    /// `stead_resource_failed{kind,name,reason}`: 1 per resource whose status is
    /// `Failed`, labelled with the condition's reason.
    pub resource_failed: GaugeVec,
    /// `stead_source_revision_info{revision}`.
    pub source_revision: GaugeVec,
    /// `stead_source_fetch_errors_total`.
    pub fetch_errors: IntCounter,
    /// `stead_source_fetch_duration_seconds`.
    pub fetch_duration: HistogramVec,
    /// `stead_last_successful_reconcile_timestamp_seconds`.
    pub last_success: Gauge,
    /// `stead_controller_ready`.
    pub ready: Gauge,
    /// `stead_workload_cpu_seconds_total{kind,name}`.
    pub workload_cpu: CounterVec,
    /// `stead_workload_memory_bytes{kind,name}`.
    pub workload_memory: GaugeVec,
    /// `stead_environments`: environments (`stead env`) on this host.
    pub environments: Gauge,
    /// `stead_environment_age_seconds{name}`.
    pub environment_age: GaugeVec,
    /// `stead_backup_last_run_timestamp_seconds{schedule}`.
    pub backup_last_run: GaugeVec,
    /// `stead_backup_last_success_timestamp_seconds{schedule}`.
    pub backup_last_success: GaugeVec,
    /// `stead_backup_last_run_failed{schedule}`: 1 when the last run had an error.
    pub backup_last_failed: GaugeVec,
    /// `stead_environment_teardown_failures_total`.
    pub environment_teardown_failures: IntCounter,
    cpu_seen: std::sync::Mutex<BTreeMap<(String, String), f64>>,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let reconcile_duration = HistogramVec::new(
            HistogramOpts::new(
                "stead_reconcile_duration_seconds",
                "Duration of one reconcile (fetch, load, observe, plan, apply), by result.",
            )
            .buckets(vec![
                0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]),
            &["result"],
        )?;
        let reconcile_total = IntCounterVec::new(
            Opts::new(
                "stead_reconcile_total",
                "Reconciles, by result (success, failed, invalid, unsigned, error).",
            ),
            &["result"],
        )?;
        let resources = GaugeVec::new(
            Opts::new(
                "stead_resources",
                "Managed resources of the applied revision, by kind and status.",
            ),
            &["kind", "status"],
        )?;
        let drift_detected = IntCounterVec::new(
            Opts::new(
                "stead_drift_detected_total",
                "Resources found drifted from their last apply (changed or removed by hand), by kind.",
            ),
            &["kind"],
        )?;
        let apply_changes = IntCounterVec::new(
            Opts::new(
                "stead_apply_changes_total",
                "Changes applied successfully, by kind and action (create, update, replace, delete, retain).",
            ),
            &["kind", "action"],
        )?;
        let apply_failures = IntCounterVec::new(
            Opts::new(
                "stead_apply_failures_total",
                "Changes that failed or were skipped, by kind.",
            ),
            &["kind"],
        )?;
        let resource_failed = GaugeVec::new(
            Opts::new(
                "stead_resource_failed",
                "1 for each resource of the applied revision whose status is Failed, by kind, name and reason (Refused, Conflict, Unsupported: held until the manifest or the host changes; ApplyFailed, Backoff: retried; PlanError, DependencyNotReady, Degraded, Unhealthy).",
            ),
            &["kind", "name", "reason"],
        )?;
        let source_revision = GaugeVec::new(
            Opts::new(
                "stead_source_revision_info",
                "The revision currently applied (value 1).",
            ),
            &["revision"],
        )?;
        let fetch_errors = IntCounter::new(
            "stead_source_fetch_errors_total",
            "Failed fetches of the source.",
        )?;
        let fetch_duration = HistogramVec::new(
            HistogramOpts::new(
                "stead_source_fetch_duration_seconds",
                "Duration of source fetches, by result (success, error).",
            )
            .buckets(vec![0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0]),
            &["result"],
        )?;
        let last_success = Gauge::new(
            "stead_last_successful_reconcile_timestamp_seconds",
            "Unix time of the last reconcile that ended with result success.",
        )?;
        let ready = Gauge::new(
            "stead_controller_ready",
            "1 once a revision has been applied successfully, else 0.",
        )?;
        let workload_cpu = CounterVec::new(
            Opts::new(
                "stead_workload_cpu_seconds_total",
                "CPU time used by a workload (container, VM), as observed at the last reconcile.",
            ),
            &["kind", "name"],
        )?;
        let workload_memory = GaugeVec::new(
            Opts::new(
                "stead_workload_memory_bytes",
                "Memory used by a workload (container, VM), as observed at the last reconcile.",
            ),
            &["kind", "name"],
        )?;
        let environments = Gauge::new(
            "stead_environments",
            "Environments (stead env) on this host, expired ones included.",
        )?;
        let environment_age = GaugeVec::new(
            Opts::new(
                "stead_environment_age_seconds",
                "Age of each environment (stead env).",
            ),
            &["name"],
        )?;
        let environment_teardown_failures = IntCounter::new(
            "stead_environment_teardown_failures_total",
            "Environment teardowns (stead env down or gc) that left something behind.",
        )?;
        let backup_last_run = GaugeVec::new(
            Opts::new(
                "stead_backup_last_run_timestamp_seconds",
                "When each BackupSchedule last ran (Unix time).",
            ),
            &["schedule"],
        )?;
        let backup_last_success = GaugeVec::new(
            Opts::new(
                "stead_backup_last_success_timestamp_seconds",
                "When each BackupSchedule last ran without an error (Unix time).",
            ),
            &["schedule"],
        )?;
        let backup_last_failed = GaugeVec::new(
            Opts::new(
                "stead_backup_last_run_failed",
                "1 if the last run of the BackupSchedule had an error, else 0.",
            ),
            &["schedule"],
        )?;
        registry.register(Box::new(backup_last_run.clone()))?;
        registry.register(Box::new(backup_last_success.clone()))?;
        registry.register(Box::new(backup_last_failed.clone()))?;
        registry.register(Box::new(environments.clone()))?;
        registry.register(Box::new(environment_age.clone()))?;
        registry.register(Box::new(environment_teardown_failures.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(reconcile_total.clone()))?;
        registry.register(Box::new(resources.clone()))?;
        registry.register(Box::new(drift_detected.clone()))?;
        registry.register(Box::new(apply_changes.clone()))?;
        registry.register(Box::new(apply_failures.clone()))?;
        registry.register(Box::new(resource_failed.clone()))?;
        registry.register(Box::new(source_revision.clone()))?;
        registry.register(Box::new(fetch_errors.clone()))?;
        registry.register(Box::new(fetch_duration.clone()))?;
        registry.register(Box::new(last_success.clone()))?;
        registry.register(Box::new(ready.clone()))?;
        registry.register(Box::new(workload_cpu.clone()))?;
        registry.register(Box::new(workload_memory.clone()))?;
        for r in RESULTS {
            reconcile_total.with_label_values(&[r]);
        }
        Ok(Metrics {
            registry,
            reconcile_duration,
            reconcile_total,
            resources,
            drift_detected,
            apply_changes,
            apply_failures,
            resource_failed,
            source_revision,
            fetch_errors,
            fetch_duration,
            last_success,
            ready,
            workload_cpu,
            workload_memory,
            environments,
            environment_age,
            backup_last_run,
            backup_last_success,
            backup_last_failed,
            environment_teardown_failures,
            cpu_seen: std::sync::Mutex::new(BTreeMap::new()),
        })
    }

    /// Records one finished reconcile.
    pub fn reconciled(&self, result: &str, seconds: f64) {
        self.reconcile_total.with_label_values(&[result]).inc();
        self.reconcile_duration
            .with_label_values(&[result])
            .observe(seconds);
    }

    /// Sets the applied revision (one series at a time).
    pub fn set_revision(&self, rev: &str) {
        self.source_revision.reset();
        self.source_revision.with_label_values(&[rev]).set(1.0);
    }

    /// Replaces `stead_resources` with `counts` (every kind/status pair of a managed kind
    /// is exported, zeros included, so sums and alerts see 0 rather than no data).
    pub fn set_resources(&self, counts: &BTreeMap<(Kind, &'static str), usize>) {
        self.resources.reset();
        let kinds: std::collections::BTreeSet<Kind> = counts.keys().map(|(k, _)| *k).collect();
        for k in kinds {
            for s in STATUSES {
                let n = counts.get(&(k, s)).copied().unwrap_or(0);
                self.resources
                    .with_label_values(&[k.as_str(), s])
                    .set(n as f64);
            }
        }
    }

    /// Replaces `stead_resource_failed` with `failed` (kind, name, reason).
    pub fn set_failed(&self, failed: &[(Kind, String, String)]) {
        self.resource_failed.reset();
        for (kind, name, reason) in failed {
            self.resource_failed
                .with_label_values(&[kind.as_str(), name.as_str(), reason.as_str()])
                .set(1.0);
        }
    }

    /// Updates per-workload usage from observed `cpu_seconds` / `memory_bytes`.
    /// Workloads not in `usage` are dropped from the output.
    pub fn set_workloads(&self, usage: &[(Kind, String, Option<f64>, Option<f64>)]) {
        let mut seen = self.cpu_seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut keep = BTreeMap::new();
        self.workload_memory.reset();
        for (kind, name, cpu, mem) in usage {
            let key = (kind.as_str().to_string(), name.clone());
            if let Some(cpu) = cpu {
                let c = self
                    .workload_cpu
                    .with_label_values(&[kind.as_str(), name.as_str()]);
                let prev = seen.get(&key).copied().unwrap_or(0.0);
                if *cpu >= prev {
                    c.inc_by(*cpu - prev);
                } else {
                    // The workload restarted: its counter restarts too.
                    c.reset();
                    c.inc_by(*cpu);
                }
                keep.insert(key.clone(), *cpu);
            }
            if let Some(mem) = mem {
                self.workload_memory
                    .with_label_values(&[kind.as_str(), name.as_str()])
                    .set(*mem);
            }
        }
        for (k, n) in seen.keys() {
            if !keep.contains_key(&(k.clone(), n.clone())) {
                let _ = self
                    .workload_cpu
                    .remove_label_values(&[k.as_str(), n.as_str()]);
            }
        }
        *seen = keep;
    }

    /// The text exposition format.
    pub fn encode(&self) -> Result<String, prometheus::Error> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `stead_*` series the chart's dashboard and alert rules use is one this
    /// module registers (histogram suffixes stripped), so a renamed metric cannot leave
    /// them silently empty.
    #[test]
    fn dashboard_and_alerts_use_registered_metrics() {
        let dir = std::env::var_os("CARGO_MANIFEST_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
            .join("../charts/stead");
        let this = include_str!("metrics.rs");
        let mut seen = 0;
        for f in ["dashboards/stead.json", "rules/alerts.yaml"] {
            let text = std::fs::read_to_string(dir.join(f)).expect("chart file");
            let bytes = text.as_bytes();
            let mut i = 0;
            while let Some(off) = text[i..].find("stead_") {
                let start = i + off;
                let mut end = start;
                while end < bytes.len()
                    && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_')
                {
                    end += 1;
                }
                let mut name = &text[start..end];
                for suffix in ["_bucket", "_sum", "_count"] {
                    name = name.strip_suffix(suffix).unwrap_or(name);
                }
                assert!(
                    this.contains(&format!("\"{name}\"")),
                    "{f} uses {name}, which the controller does not export"
                );
                seen += 1;
                i = end;
            }
        }
        assert!(seen > 10, "only {seen} series found");
    }

    #[test]
    fn encodes_and_tracks_workloads() {
        let m = Metrics::new().unwrap();
        m.reconciled("success", 0.2);
        m.set_revision("abc");
        m.set_revision("def");
        let mut counts = BTreeMap::new();
        counts.insert((Kind::Volume, "Ready"), 3);
        m.set_resources(&counts);
        m.set_workloads(&[(Kind::Container, "web".into(), Some(2.0), Some(1024.0))]);
        m.set_workloads(&[(Kind::Container, "web".into(), Some(5.0), Some(2048.0))]);
        let text = m.encode().unwrap();
        assert!(
            text.contains("stead_reconcile_total{result=\"success\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("stead_reconcile_total{result=\"invalid\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("stead_source_revision_info{revision=\"def\"} 1"),
            "{text}"
        );
        assert!(!text.contains("revision=\"abc\""), "{text}");
        assert!(
            text.contains("stead_resources{kind=\"Volume\",status=\"Ready\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("stead_resources{kind=\"Volume\",status=\"Failed\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("stead_workload_cpu_seconds_total{kind=\"Container\",name=\"web\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("stead_workload_memory_bytes{kind=\"Container\",name=\"web\"} 2048"),
            "{text}"
        );
        // A restart lowers the observed CPU time: the counter restarts.
        m.set_workloads(&[(Kind::Container, "web".into(), Some(1.0), None)]);
        let text = m.encode().unwrap();
        assert!(
            text.contains("stead_workload_cpu_seconds_total{kind=\"Container\",name=\"web\"} 1"),
            "{text}"
        );
        m.set_workloads(&[]);
        assert!(!m.encode().unwrap().contains("name=\"web\""));
    }
}
