//! `/api/v1`: the JSON API behind the web UI (served with `--ui` only). Reads come from
//! the read model ([`crate::view`]), live updates from the event log
//! ([`crate::events`]); actions wake the loop or run through the
//! [`Housekeeping`](crate::Housekeeping) trait and never edit the desired state. Who may
//! do what is [`crate::auth`]'s. The OpenAPI document is generated from these handlers
//! and the read-model types ([`openapi`]) and served at `/api/v1/openapi.json`.

pub mod openapi;

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use stead_schema::{Kind, ResourceId};
use tokio::sync::broadcast::error::RecvError;
use tracing::{info, warn};
use utoipa::ToSchema;

use crate::Shared;
use crate::auth::{Operator, Principal, Role, Via, Viewer};
use crate::events::{Event, EventKind, NewEvent, Update};
use crate::view::{self, Detail, Overview, OverviewExtras, Pending, Tree, TreeFilter};

/// An error body.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    /// What went wrong.
    pub error: String,
}

fn error(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, Json(ApiError { error: msg.into() })).into_response()
}

/// The `/api/v1` routes (authentication and security headers are layered on by the
/// server).
pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/api/v1/overview", get(get_overview))
        .route("/api/v1/resources", get(get_resources))
        .route("/api/v1/resources/{kind}/{name}", get(get_resource))
        .route("/api/v1/pending", get(get_pending))
        .route("/api/v1/cluster", get(get_cluster))
        .route("/api/v1/events", get(get_events))
        .route("/api/v1/stream", get(stream))
        .route("/api/v1/session", get(get_session))
        .route("/api/v1/login", post(login))
        .route("/api/v1/logout", post(logout))
        .route("/api/v1/actions/sync", post(action_sync))
        .route("/api/v1/actions/restart", post(action_restart))
        .route("/api/v1/actions/backup", post(action_backup))
        .route("/api/v1/actions/verify", post(action_verify))
        .route("/api/v1/openapi.json", get(openapi::serve))
}

/// The status document and the last snapshot.
fn read_model(s: &Shared) -> (crate::status::Status, Option<Arc<view::Snapshot>>) {
    let status = s.status.read().map(|x| x.clone()).unwrap_or_default();
    let snap = s
        .snapshot
        .read()
        .map(|x| x.clone())
        .unwrap_or_else(|p| p.into_inner().clone());
    (status, snap)
}

/// The overview (read model).
pub(crate) fn overview_of(s: &Shared) -> Overview {
    let (status, snap) = read_model(s);
    let busy = s.busy_since.lock().map(|b| b.is_some()).unwrap_or(false);
    // The applied revision's info when it is the head (it carries the signature
    // status), else the waiting head's, else the head's commit details.
    let applied_head = snap
        .as_ref()
        .filter(|x| status.head_revision.as_deref() == Some(x.revision.id.as_str()))
        .map(|x| x.revision.clone());
    let proposed = snap
        .as_ref()
        .and_then(|x| x.proposed.as_ref().map(|(r, _)| r.clone()))
        .filter(|r| status.head_revision.as_deref() == Some(r.id.as_str()));
    let read = s
        .head_info
        .read()
        .map(|h| h.clone())
        .unwrap_or_else(|p| p.into_inner().clone())
        .filter(|r| status.head_revision.as_deref() == Some(r.id.as_str()));
    let head = applied_head.or(proposed).or(read);
    view::overview(
        &status,
        snap.as_deref(),
        OverviewExtras {
            busy,
            head,
            sync_mode: s.sync_mode.into(),
            capacity: Some(view::capacity::read(snap.as_deref())),
        },
    )
}

/// The tree (read model).
pub(crate) fn tree_of(s: &Shared, filter: &TreeFilter) -> Tree {
    let (status, snap) = read_model(s);
    view::tree(&status, snap.as_deref(), filter)
}

/// The cluster as etcd has it, or why there is none (blocking: it reads etcd).
pub(crate) fn cluster_of(s: &Shared) -> view::cluster::ClusterView {
    use view::cluster::ClusterView;
    match s.housekeeping.as_ref().and_then(|hk| hk.cluster_status()) {
        None => ClusterView::not_a_cluster(),
        Some(Ok(st)) => ClusterView::from_status(&st),
        Some(Err(e)) => {
            warn!(error = %e.0, "cluster status");
            ClusterView::unreadable(&e.0)
        }
    }
}

/// The pending plan and which of its changes' `Kind/name`s have a detail page (the
/// pending page links only those).
pub(crate) fn pending_with_details(s: &Shared) -> (Pending, BTreeSet<String>) {
    let (status, snap) = read_model(s);
    let p = view::pending(&status, snap.as_deref());
    let branch = p.branch.iter().flat_map(|b| b.changes.iter());
    let ids = p.changes.iter().chain(branch).map(|c| c.id.as_str());
    let details = view::ids_with_detail(&status, snap.as_deref(), ids);
    (p, details)
}

/// The pending plan (read model).
pub(crate) fn pending_of(s: &Shared) -> Pending {
    let (status, snap) = read_model(s);
    view::pending(&status, snap.as_deref())
}

/// A resource's detail (read model); `None`: unknown. Reads the console log tail.
pub(crate) fn detail_of(s: &Shared, id: &ResourceId) -> Option<Detail> {
    let (status, snap) = read_model(s);
    let events = s.events.recent(Some(&id.to_string()), None, 100);
    let mut d = view::detail(&status, snap.as_deref(), id, events, view::console_tail)?;
    let backed_up = matches!(
        id.kind,
        Kind::Volume | Kind::Container | Kind::VirtualMachine
    );
    if backed_up && let Some(hk) = &s.housekeeping {
        match hk.backups(id) {
            Ok(b) => d.backups = b,
            Err(e) => warn!(resource = %id, error = %e, "cannot list backups"),
        }
    }
    Some(d)
}

/// The id named by a path's kind and name.
pub fn parse_id(kind: &str, name: &str) -> Option<ResourceId> {
    let kind = Kind::parse_loose(kind)?;
    Some(ResourceId::new(kind, name))
}

#[utoipa::path(get, path = "/api/v1/overview", tag = "read",
    responses((status = 200, body = Overview), (status = 401, body = ApiError)))]
async fn get_overview(_: Viewer, State(s): State<Arc<Shared>>) -> Json<Overview> {
    Json(overview_of(&s))
}

#[utoipa::path(get, path = "/api/v1/resources", tag = "read", params(TreeFilter),
    responses((status = 200, body = Tree), (status = 401, body = ApiError)))]
async fn get_resources(
    _: Viewer,
    State(s): State<Arc<Shared>>,
    Query(filter): Query<TreeFilter>,
) -> Json<Tree> {
    Json(tree_of(&s, &filter))
}

#[utoipa::path(get, path = "/api/v1/resources/{kind}/{name}", tag = "read",
    params(("kind" = String, Path, description = "Kind (`Container`, `vm`, …)"),
           ("name" = String, Path, description = "Name")),
    responses((status = 200, body = Detail), (status = 404, body = ApiError),
              (status = 401, body = ApiError)))]
async fn get_resource(
    _: Viewer,
    State(s): State<Arc<Shared>>,
    Path((kind, name)): Path<(String, String)>,
) -> Response {
    let Some(id) = parse_id(&kind, &name) else {
        return error(StatusCode::NOT_FOUND, format!("unknown kind {kind}"));
    };
    let shared = s.clone();
    let found = tokio::task::spawn_blocking(move || detail_of(&shared, &id))
        .await
        .ok()
        .flatten();
    match found {
        Some(d) => Json(d).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("no {kind}/{name} in the applied revision"),
        ),
    }
}

#[utoipa::path(get, path = "/api/v1/pending", tag = "read",
    responses((status = 200, body = Pending), (status = 401, body = ApiError)))]
async fn get_pending(_: Viewer, State(s): State<Arc<Shared>>) -> Json<Pending> {
    Json(pending_of(&s))
}

#[utoipa::path(get, path = "/api/v1/cluster", tag = "read",
    responses((status = 200, body = view::cluster::ClusterView), (status = 401, body = ApiError)))]
async fn get_cluster(_: Viewer, State(s): State<Arc<Shared>>) -> Response {
    match tokio::task::spawn_blocking(move || cluster_of(&s)).await {
        Ok(v) => Json(v).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// `GET /api/v1/events` parameters.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventQuery {
    /// Only about this resource (`Kind/name`).
    pub resource: Option<String>,
    /// Only events after this sequence number.
    pub after: Option<u64>,
    /// At most this many (default 200, at most 2000).
    pub limit: Option<usize>,
}

#[utoipa::path(get, path = "/api/v1/events", tag = "read", params(EventQuery),
    responses((status = 200, body = Vec<Event>, description = "Newest first"),
              (status = 401, body = ApiError)))]
async fn get_events(
    _: Viewer,
    State(s): State<Arc<Shared>>,
    Query(q): Query<EventQuery>,
) -> Json<Vec<Event>> {
    let limit = q.limit.unwrap_or(200).min(crate::events::RING_CAPACITY);
    Json(s.events.recent(q.resource.as_deref(), q.after, limit))
}

/// How often the stream sends a comment to keep the connection alive (under the
/// server's 10 s idle limit).
const KEEP_ALIVE: Duration = Duration::from_secs(4);

#[utoipa::path(get, path = "/api/v1/stream", tag = "live",
    responses((status = 200, content_type = "text/event-stream", body = Update,
        description = "Server-sent events: `event` (an Event, its SSE id its sequence number) \
            and `status` (a StatusUpdate) messages; `resync` when the client fell behind \
            and should reload. The server closes a connection after an hour; EventSource \
            reconnects by itself and, with `Last-Event-ID`, gets the events it missed."),
        (status = 401, body = ApiError)))]
async fn stream(
    _: Viewer,
    State(s): State<Arc<Shared>>,
    headers: axum::http::HeaderMap,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    use futures_util::StreamExt;
    // Subscribe first, then read the backlog: nothing falls in between (a duplicate is
    // dropped by its sequence number).
    let rx = s.events.subscribe();
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let backlog: Vec<Event> = match last {
        Some(seq) => {
            let mut b = s
                .events
                .recent(None, Some(seq), crate::events::RING_CAPACITY);
            b.reverse();
            b
        }
        None => Vec::new(),
    };
    let mut seen = backlog.last().map(|e| e.seq).or(last).unwrap_or(0);
    let hello = SseEvent::default()
        .retry(Duration::from_secs(1))
        .event("hello")
        .data("{}");
    let first: Vec<Result<SseEvent, Infallible>> = std::iter::once(hello)
        .chain(backlog.iter().filter_map(event_message))
        .map(Ok)
        .collect();
    let updates = futures_util::stream::unfold(rx, move |mut rx| async move {
        loop {
            let msg = match rx.recv().await {
                Ok(Update::Event(e)) if e.seq <= seen => continue,
                Ok(Update::Event(e)) => {
                    seen = e.seq;
                    event_message(&e)
                }
                Ok(Update::Status(u)) => serde_json::to_string(&u)
                    .ok()
                    .map(|d| SseEvent::default().event("status").data(d)),
                Err(RecvError::Lagged(_)) => Some(SseEvent::default().event("resync").data("{}")),
                Err(RecvError::Closed) => return None,
            };
            if let Some(m) = msg {
                return Some((Ok(m), rx));
            }
        }
    });
    Sse::new(futures_util::stream::iter(first).chain(updates))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}

/// An event as an SSE message whose id is its sequence number (a reconnecting
/// EventSource sends it back as `Last-Event-ID` and gets what it missed).
fn event_message(e: &Event) -> Option<SseEvent> {
    let data = serde_json::to_string(e).ok()?;
    Some(
        SseEvent::default()
            .id(e.seq.to_string())
            .event("event")
            .data(data),
    )
}

/// `GET /api/v1/session` and the login's answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionInfo {
    /// User name (`token` for the bearer token).
    pub user: String,
    /// Role.
    pub role: Role,
    /// How the caller authenticated.
    pub via: Via,
    /// The CSRF token to send in `X-CSRF-Token` with every POST (sessions only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csrf: Option<String>,
}

impl From<&Principal> for SessionInfo {
    fn from(p: &Principal) -> Self {
        SessionInfo {
            user: p.user.clone(),
            role: p.role,
            via: p.via,
            csrf: p.csrf.clone(),
        }
    }
}

#[utoipa::path(get, path = "/api/v1/session", tag = "auth",
    responses((status = 200, body = SessionInfo), (status = 401, body = ApiError)))]
async fn get_session(Viewer(p): Viewer) -> Json<SessionInfo> {
    Json(SessionInfo::from(&p))
}

/// A login.
#[derive(Debug, Deserialize, ToSchema)]
pub struct LoginRequest {
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
    /// Where a form login goes next (a path on this server; default `/`).
    #[serde(default)]
    pub next: Option<String>,
}

/// `next` if it is a local path (not `//host` nor a scheme), else `/`.
pub fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n.contains('\\')
                && !n.chars().any(char::is_control) =>
        {
            n.to_string()
        }
        _ => "/".into(),
    }
}

#[utoipa::path(post, path = "/api/v1/login", tag = "auth",
    request_body(content = LoginRequest, description = "JSON, or a form (`application/x-www-form-urlencoded`): a form login answers 303 to `next` (or to `/login?failed=1`)",
        content_type = "application/json"),
    responses((status = 200, body = SessionInfo, description = "Logged in; the session cookie is set"),
              (status = 303, description = "Form login: redirect"),
              (status = 401, body = ApiError), (status = 404, body = ApiError, description = "No users configured")))]
async fn login(State(s): State<Arc<Shared>>, req: Request) -> Response {
    let Some(ui) = &s.ui else {
        return error(StatusCode::NOT_FOUND, "the UI is off");
    };
    if ui.config().users.is_empty() {
        return error(
            StatusCode::NOT_FOUND,
            "no users: log in with the bearer token",
        );
    }
    if crate::auth::same_origin(req.headers()) == Some(false) {
        return crate::auth::Denied::CrossOrigin.into_response();
    }
    let is_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let body = if is_json {
        Json::<LoginRequest>::from_request(req, &())
            .await
            .map(|Json(b)| b)
            .map_err(|e| e.into_response())
    } else {
        Form::<LoginRequest>::from_request(req, &())
            .await
            .map(|Form(b)| b)
            .map_err(|e| e.into_response())
    };
    let body = match body {
        Ok(b) => b,
        Err(r) => return r,
    };
    let Ok(_permit) = ui.login_gate.acquire().await else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    };
    let shared = s.clone();
    let (user, password) = (body.username.clone(), body.password);
    let who = tokio::task::spawn_blocking(move || {
        shared.ui.as_ref().and_then(|ui| ui.login(&user, &password))
    })
    .await
    .ok()
    .flatten();
    let Some(p) = who else {
        warn!(user = %body.username, "UI login failed");
        // Slows down guessing from one client.
        tokio::time::sleep(Duration::from_millis(300)).await;
        return if is_json {
            error(StatusCode::UNAUTHORIZED, "wrong user name or password")
        } else {
            Redirect::to("/login?failed=1").into_response()
        };
    };
    info!(user = %p.user, role = ?p.role, "UI login");
    let cookie = ui.session_cookie(p.session.as_deref().unwrap_or(""));
    let mut r = if is_json {
        Json(SessionInfo::from(&p)).into_response()
    } else {
        Redirect::to(&safe_next(body.next.as_deref())).into_response()
    };
    if let Ok(v) = header::HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

#[utoipa::path(post, path = "/api/v1/logout", tag = "auth",
    responses((status = 204, description = "Logged out; the cookie is cleared"),
              (status = 401, body = ApiError), (status = 403, body = ApiError)))]
async fn logout(Viewer(p): Viewer, State(s): State<Arc<Shared>>) -> Response {
    let Some(ui) = &s.ui else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if let Some(sid) = &p.session {
        ui.logout(sid);
    }
    let mut r = StatusCode::NO_CONTENT.into_response();
    if let Ok(v) = header::HeaderValue::from_str(&ui.clear_cookie()) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// An action's answer: it was accepted and recorded as an event.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActionAccepted {
    /// The event that records the request; the outcome follows as another event.
    pub event: Event,
}

/// A workload action's target.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ResourceTarget {
    /// `Kind/name`: a Container or VirtualMachine for `restart`, a BackupSchedule for
    /// `backup` and `verify`.
    pub resource: String,
}

#[utoipa::path(post, path = "/api/v1/actions/sync", tag = "actions",
    description = "Fetches the source and reconciles now; in manual sync also applies the head. Needs the operator role and, from a session, `X-CSRF-Token`.",
    responses((status = 202, body = ActionAccepted), (status = 401, body = ApiError),
              (status = 403, body = ApiError)))]
async fn action_sync(Operator(p): Operator, State(s): State<Arc<Shared>>) -> Response {
    s.sync_requested.store(true, Ordering::SeqCst);
    s.trigger.fire(true);
    info!(user = %p.user, "sync requested");
    let event = s.events.record(
        NewEvent::new(
            EventKind::Action,
            "SyncNow",
            "sync requested: fetching and reconciling",
        )
        .by(&p.user),
    );
    (StatusCode::ACCEPTED, Json(ActionAccepted { event })).into_response()
}

/// Which housekeeping action.
#[derive(Debug, Clone, Copy)]
enum Job {
    Restart,
    Backup,
    Verify,
}

impl Job {
    fn reason(self) -> &'static str {
        match self {
            Job::Restart => "Restart",
            Job::Backup => "BackupNow",
            Job::Verify => "VerifyBackup",
        }
    }

    fn accepts(self, kind: Kind) -> bool {
        match self {
            Job::Restart => matches!(kind, Kind::Container | Kind::VirtualMachine),
            Job::Backup | Job::Verify => kind == Kind::BackupSchedule,
        }
    }
}

/// Records the request, runs `job` on a blocking thread in the background and records
/// its outcome.
fn start_job(s: &Arc<Shared>, p: &Principal, job: Job, target: &str) -> Response {
    let Ok(id) = target.parse::<ResourceId>() else {
        return error(StatusCode::BAD_REQUEST, format!("not Kind/name: {target}"));
    };
    if !job.accepts(id.kind) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{} does not apply to {}", job.reason(), id.kind),
        );
    }
    let known = s
        .status
        .read()
        .map(|st| {
            st.resources
                .iter()
                .any(|r| r.kind == id.kind.as_str() && r.name == id.name)
        })
        .unwrap_or(false);
    if !known {
        return error(
            StatusCode::NOT_FOUND,
            format!("no {id} in the applied revision"),
        );
    }
    let reporting = s
        .status
        .read()
        .map(|st| st.drift_mode == "report")
        .unwrap_or(false);
    if matches!(job, Job::Restart) && reporting {
        return error(
            StatusCode::CONFLICT,
            "restart stops the workload and lets the reconcile start it again: not with --drift=report",
        );
    }
    let Some(hk) = s.housekeeping.clone() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no housekeeping in this controller",
        );
    };
    info!(user = %p.user, resource = %id, action = job.reason(), "action requested");
    let event = s.events.record(
        NewEvent::new(
            EventKind::Action,
            job.reason(),
            format!("{} requested", job.reason()),
        )
        .on(&id)
        .by(&p.user),
    );
    let shared = s.clone();
    let user = p.user.clone();
    tokio::task::spawn_blocking(move || {
        let result = match job {
            Job::Restart => {
                let _work = shared.work.lock().unwrap_or_else(|e| e.into_inner());
                hk.restart_workload(&id)
            }
            Job::Backup => hk.backup_now(&id.name),
            Job::Verify => hk.verify_backup(&id.name),
        };
        if matches!(job, Job::Restart) && result.is_ok() {
            // The reconcile starts the stopped workload again.
            shared.trigger.fire(false);
        }
        let (reason, msg, class) = match result {
            Ok(m) => (format!("{}Done", job.reason()), m, None),
            Err(e) => (format!("{}Failed", job.reason()), e.0, Some("action")),
        };
        let mut ev = NewEvent::new(EventKind::Action, &reason, msg)
            .on(&id)
            .by(&user);
        if let Some(c) = class {
            ev = ev.class(c);
        }
        shared.events.record(ev);
    });
    (StatusCode::ACCEPTED, Json(ActionAccepted { event })).into_response()
}

#[utoipa::path(post, path = "/api/v1/actions/restart", tag = "actions", request_body = ResourceTarget,
    description = "Restarts a Container or VirtualMachine: stops it, and the reconcile it triggers starts it again (refused with 409 under `--drift=report`). Operator role; `X-CSRF-Token` from a session.",
    responses((status = 202, body = ActionAccepted), (status = 400, body = ApiError),
              (status = 404, body = ApiError), (status = 401, body = ApiError),
              (status = 403, body = ApiError), (status = 409, body = ApiError)))]
async fn action_restart(
    Operator(p): Operator,
    State(s): State<Arc<Shared>>,
    Json(t): Json<ResourceTarget>,
) -> Response {
    start_job(&s, &p, Job::Restart, &t.resource)
}

#[utoipa::path(post, path = "/api/v1/actions/backup", tag = "actions", request_body = ResourceTarget,
    description = "Runs a BackupSchedule once now. Operator role; `X-CSRF-Token` from a session.",
    responses((status = 202, body = ActionAccepted), (status = 400, body = ApiError),
              (status = 404, body = ApiError), (status = 401, body = ApiError),
              (status = 403, body = ApiError)))]
async fn action_backup(
    Operator(p): Operator,
    State(s): State<Arc<Shared>>,
    Json(t): Json<ResourceTarget>,
) -> Response {
    start_job(&s, &p, Job::Backup, &t.resource)
}

#[utoipa::path(post, path = "/api/v1/actions/verify", tag = "actions", request_body = ResourceTarget,
    description = "Verifies the newest backup of each target of a BackupSchedule (every chunk re-read, checksums checked). Operator role; `X-CSRF-Token` from a session.",
    responses((status = 202, body = ActionAccepted), (status = 400, body = ApiError),
              (status = 404, body = ApiError), (status = 401, body = ApiError),
              (status = 403, body = ApiError)))]
async fn action_verify(
    Operator(p): Operator,
    State(s): State<Arc<Shared>>,
    Json(t): Json<ResourceTarget>,
) -> Response {
    start_job(&s, &p, Job::Verify, &t.resource)
}

#[cfg(test)]
mod tests;
