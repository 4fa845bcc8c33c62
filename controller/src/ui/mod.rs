//! The web UI: server-rendered pages from the read model ([`crate::view`]), with a
//! stylesheet and one plain script embedded in the binary ([`assets`]). Served with
//! `--ui` only, behind the same authentication as `/api/v1` ([`crate::auth`]): a page
//! requested without a session redirects to `/login`. The pages work without the script
//! (links and GET forms); the script adds live updates (server-sent events from
//! `/api/v1/stream`), tree filtering and edges, confirmations of actions (which it posts
//! with the CSRF token) and the console.

pub mod assets;
mod console;
pub mod html;
pub mod layout;
pub mod pages;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{Html as HtmlResponse, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use serde::Deserialize;
use tracing::{debug, info};

use crate::Shared;
use crate::auth::{Principal, Role};
use crate::view::TreeFilter;
use html::{Html, url_part};
use layout::{Host, Live, Nav};

/// The page routes (authentication and security headers are layered on by the server,
/// with those of `/api/v1`).
pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/", get(overview_page))
        .route("/resources", get(tree_page))
        .route("/resources/{kind}/{name}", get(detail_page))
        .route("/pending", get(pending_page))
        .route("/events", get(events_page))
        .route("/cluster", get(cluster_page))
        .route("/console/{kind}/{name}", get(console_page))
        .route("/console/{kind}/{name}/ws", get(console::upgrade))
        .route("/screen/VirtualMachine/{name}", get(screen_page))
        .route(
            "/screen/VirtualMachine/{name}/ws",
            get(console::upgrade_screen),
        )
        .route("/login", get(login_page))
        .route("/logout", post(logout))
        .route("/assets/{*path}", get(assets::serve))
}

type Who = Option<Extension<Principal>>;

/// Whether this controller's host is a node of a cluster (what the navigation offers).
fn host_of(s: &Shared) -> Host {
    if s.housekeeping
        .as_ref()
        .is_some_and(|hk| hk.is_cluster_node())
    {
        Host::ClusterNode
    } else {
        Host::Single
    }
}

/// A page, or the redirect to the login for a caller without a session.
fn page_or_login(who: Who, uri: &Uri, render: impl FnOnce(&Principal) -> String) -> Response {
    match who {
        Some(Extension(p)) => HtmlResponse(render(&p)).into_response(),
        None => {
            let next = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
            debug!(path = %next, "page without a session: to the login");
            Redirect::to(&format!("/login?next={}", url_part(&next))).into_response()
        }
    }
}

async fn overview_page(State(s): State<Arc<Shared>>, who: Who, uri: Uri) -> Response {
    if who.is_none() {
        return page_or_login(who, &uri, |_| String::new());
    }
    let host = host_of(&s);
    // Reads the host's capacity (the pools' file systems): off the async workers.
    let Ok(o) = tokio::task::spawn_blocking(move || crate::api::overview_of(&s)).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    page_or_login(who, &uri, |p| {
        layout::page(
            "Overview",
            host,
            Nav::Overview,
            Some(p),
            Live::Swap,
            pages::overview(&o, p.role >= Role::Operator),
        )
    })
}

async fn tree_page(
    State(s): State<Arc<Shared>>,
    who: Who,
    uri: Uri,
    Query(filter): Query<TreeFilter>,
) -> Response {
    let host = host_of(&s);
    page_or_login(who, &uri, |p| {
        let all = crate::api::tree_of(&s, &TreeFilter::default());
        let kinds: BTreeSet<String> = all.nodes.iter().map(|n| n.resource.kind.clone()).collect();
        let filtered = if filter.kind.is_some() || filter.status.is_some() || filter.name.is_some()
        {
            crate::api::tree_of(&s, &filter)
        } else {
            all
        };
        layout::page(
            "Resources",
            host,
            Nav::Resources,
            Some(p),
            Live::InPlace,
            pages::tree(&filtered, &filter, &kinds),
        )
    })
}

async fn detail_page(
    State(s): State<Arc<Shared>>,
    who: Who,
    uri: Uri,
    Path((kind, name)): Path<(String, String)>,
) -> Response {
    if who.is_none() {
        return page_or_login(who, &uri, |_| String::new());
    }
    let host = host_of(&s);
    // Reads the console log and the backups: off the async workers.
    let found = match crate::api::parse_id(&kind, &name) {
        Some(id) => tokio::task::spawn_blocking(move || crate::api::detail_of(&s, &id))
            .await
            .ok()
            .flatten(),
        None => None,
    };
    let Some(d) = found else {
        return not_found(
            host,
            who,
            &format!("No {kind}/{name} in the applied revision."),
        );
    };
    page_or_login(who, &uri, |p| {
        let title = format!("{}/{}", d.resource.kind, d.resource.name);
        layout::page(
            &title,
            host,
            Nav::Resources,
            Some(p),
            Live::Swap,
            pages::detail(&d, p.role >= Role::Operator),
        )
    })
}

fn not_found(host: Host, who: Who, msg: &str) -> Response {
    let mut h = Html::new();
    h.el("h1", &[], "Not found").el("p", &[], msg);
    let body = layout::page(
        "Not found",
        host,
        Nav::None,
        who.as_ref().map(|e| &e.0),
        Live::Off,
        h,
    );
    (StatusCode::NOT_FOUND, HtmlResponse(body)).into_response()
}

async fn pending_page(State(s): State<Arc<Shared>>, who: Who, uri: Uri) -> Response {
    let host = host_of(&s);
    page_or_login(who, &uri, |p| {
        let (pending, details) = crate::api::pending_with_details(&s);
        layout::page(
            "Pending change",
            host,
            Nav::Pending,
            Some(p),
            Live::Swap,
            pages::pending(&pending, &details),
        )
    })
}

async fn events_page(State(s): State<Arc<Shared>>, who: Who, uri: Uri) -> Response {
    let host = host_of(&s);
    page_or_login(who, &uri, |p| {
        let events = s.events.recent(None, None, 200);
        layout::page(
            "Events",
            host,
            Nav::Events,
            Some(p),
            Live::Swap,
            pages::events(&events),
        )
    })
}

async fn cluster_page(State(s): State<Arc<Shared>>, who: Who, uri: Uri) -> Response {
    if who.is_none() {
        return page_or_login(who, &uri, |_| String::new());
    }
    let host = host_of(&s);
    // Reads etcd: off the async workers.
    let Ok(c) = tokio::task::spawn_blocking(move || crate::api::cluster_of(&s)).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    page_or_login(who, &uri, |p| {
        layout::page(
            "Cluster",
            host,
            Nav::Cluster,
            Some(p),
            Live::Swap,
            pages::cluster(&c),
        )
    })
}

async fn console_page(
    State(s): State<Arc<Shared>>,
    who: Who,
    uri: Uri,
    Path((kind, name)): Path<(String, String)>,
) -> Response {
    let host = host_of(&s);
    let Some(id) = crate::api::parse_id(&kind, &name) else {
        return not_found(host, who, &format!("No {kind}/{name}."));
    };
    let kind = id.kind.as_str().to_string();
    if !pages::has_console(&kind) {
        return not_found(host, who, &format!("{kind} has no console."));
    }
    page_or_login(who, &uri, |p| {
        layout::page_with(
            &format!("Console {kind}/{}", id.name),
            host,
            Nav::None,
            Some(p),
            Live::Off,
            pages::console(&kind, &id.name),
            layout::Extra {
                styles: &[assets::xterm_css_url()],
                scripts: &[assets::xterm_js_url()],
            },
        )
    })
}

async fn screen_page(
    State(s): State<Arc<Shared>>,
    who: Who,
    uri: Uri,
    Path(name): Path<String>,
) -> Response {
    let host = host_of(&s);
    let Some(id) = crate::api::parse_id("VirtualMachine", &name) else {
        return not_found(host, who, &format!("No VirtualMachine/{name}."));
    };
    page_or_login(who, &uri, |p| {
        layout::page(
            &format!("Screen VirtualMachine/{}", id.name),
            host,
            Nav::None,
            Some(p),
            Live::Off,
            pages::screen(&id.name, &assets::novnc_rfb_url()),
        )
    })
}

/// `/login` parameters.
#[derive(Debug, Default, Deserialize)]
struct LoginQuery {
    next: Option<String>,
    failed: Option<String>,
}

async fn login_page(State(s): State<Arc<Shared>>, Query(q): Query<LoginQuery>) -> Response {
    let next = crate::api::safe_next(q.next.as_deref());
    let users = s.ui.as_ref().is_some_and(|u| !u.config().users.is_empty());
    let body = if users {
        pages::login(&next, q.failed.is_some())
    } else {
        let mut h = Html::new();
        h.el("h1", &[], "No UI users").el(
            "p",
            &[],
            "This controller has no --ui-users file: use /api/v1 with the bearer token, or \
             add users (see docs/ui.md).",
        );
        h
    };
    HtmlResponse(layout::page(
        "Log in",
        Host::Single,
        Nav::None,
        None,
        Live::Off,
        body,
    ))
    .into_response()
}

/// The logout form (works without the script): the session's CSRF token in a field.
#[derive(Debug, Deserialize)]
struct LogoutForm {
    csrf: String,
}

async fn logout(State(s): State<Arc<Shared>>, who: Who, Form(f): Form<LogoutForm>) -> Response {
    let Some(Extension(p)) = who else {
        return Redirect::to("/login").into_response();
    };
    let (Some(ui), Some(sid), Some(csrf)) = (&s.ui, &p.session, &p.csrf) else {
        return StatusCode::FORBIDDEN.into_response();
    };
    if !crate::server::token_eq(f.csrf.as_bytes(), csrf.as_bytes()) {
        return (StatusCode::FORBIDDEN, "missing or wrong CSRF token\n").into_response();
    }
    ui.logout(sid);
    info!(user = %p.user, "UI logout");
    let mut r = Redirect::to("/login").into_response();
    if let Ok(v) = HeaderValue::from_str(&ui.clear_cookie()) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}
