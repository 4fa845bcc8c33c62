//! The OpenAPI document of `/api/v1`, generated from the handlers and the read-model
//! types. `docs/openapi.json` is this document checked in; a test fails when it is stale
//! (`STEAD_UPDATE_OPENAPI=1 cargo test -p stead-controller openapi` rewrites it).

use axum::Json;
use axum::response::IntoResponse;
use utoipa::OpenApi;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};

use crate::auth::{Role, Via};
use crate::events::{Event, EventKind, StatusUpdate, Update};
use crate::view::cluster::{ClusterNode, ClusterView, Placement, Replication};
use crate::view::{
    BackupEntry, BranchPlan, Capacity, ConditionView, Detail, FieldDiff, KindCount, NodeStatus,
    ObservedView, Overview, Pending, PlanProblem, PlannedChange, PoolUsage, ResourceSummary,
    RevisionInfo, SyncInfo, SyncState, Tree, TreeEdge, TreeNode, VerifyState, WorkloadInfo,
};

use super::{ActionAccepted, ApiError, LoginRequest, ResourceTarget, SessionInfo};

/// The document's root.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "stead controller API",
        description = "The JSON API behind the stead web UI (`stead controller --ui`). Read-only views of the desired and observed state, the pending plan and the events, a server-sent event stream, and a few operational actions that never edit the desired state. See docs/api.md.",
        license(name = "Apache-2.0"),
        version = "1"
    ),
    paths(
        super::get_overview, super::get_resources, super::get_resource, super::get_pending,
        super::get_cluster,
        super::get_events, super::stream, super::get_session, super::login, super::logout,
        super::action_sync, super::action_restart, super::action_backup, super::action_verify,
    ),
    components(schemas(
        Overview, SyncInfo, SyncState, KindCount, Capacity, PoolUsage, RevisionInfo,
        ResourceSummary, Tree, TreeNode, TreeEdge, NodeStatus, Detail, ConditionView,
        ObservedView, FieldDiff, WorkloadInfo, BackupEntry, VerifyState, Pending, PlannedChange, PlanProblem, BranchPlan, Event,
        EventKind, Update, StatusUpdate, SessionInfo, Role, Via, LoginRequest,
        ResourceTarget, ActionAccepted, ApiError, ClusterView, ClusterNode, Placement,
        Replication,
    )),
    modifiers(&Security),
    security(("bearer" = []), ("session" = [])),
    tags(
        (name = "read", description = "The read model: overview, resource tree, detail, pending plan, events, cluster"),
        (name = "live", description = "Server-sent events"),
        (name = "auth", description = "Login, logout, the caller's session and CSRF token"),
        (name = "actions", description = "Operator actions (operator role; CSRF token from a session)"),
    )
)]
pub struct ApiDoc;

struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let c = doc.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        c.add_security_scheme(
            "session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new(
                crate::auth::SESSION_COOKIE,
            ))),
        );
    }
}

/// The document as pretty JSON with a trailing newline (what `docs/openapi.json` holds).
pub fn document() -> String {
    let mut s = ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    s.push('\n');
    s
}

/// `GET /api/v1/openapi.json` (public: it describes, it does not show state).
pub(super) async fn serve() -> impl IntoResponse {
    let doc: serde_json::Value = serde_json::from_str(&document()).unwrap_or_default();
    Json(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checked_in_openapi_document_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
        let doc = document();
        if std::env::var_os("STEAD_UPDATE_OPENAPI").is_some() {
            std::fs::write(&path, &doc).expect("write docs/openapi.json");
            return;
        }
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == doc,
            "docs/openapi.json is stale: run STEAD_UPDATE_OPENAPI=1 cargo test -p stead-controller openapi"
        );
    }

    #[test]
    fn every_route_is_documented() {
        let doc = ApiDoc::openapi();
        for p in [
            "/api/v1/overview",
            "/api/v1/resources",
            "/api/v1/resources/{kind}/{name}",
            "/api/v1/pending",
            "/api/v1/cluster",
            "/api/v1/events",
            "/api/v1/stream",
            "/api/v1/session",
            "/api/v1/login",
            "/api/v1/logout",
            "/api/v1/actions/sync",
            "/api/v1/actions/restart",
            "/api/v1/actions/backup",
            "/api/v1/actions/verify",
        ] {
            assert!(doc.paths.paths.contains_key(p), "{p} missing");
        }
    }
}
