//! The controller's status document, served as JSON on `<run-dir>/controller.sock` and
//! read by `stead get`.

use serde::{Deserialize, Serialize};

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
