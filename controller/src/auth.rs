//! Who may use the web UI and `/api/v1`, and how they prove it.
//!
//! - The UI and the API exist only with `--ui` (otherwise their routes are absent: 404).
//! - Two ways in: a bearer token (`Authorization: Bearer T`, from `--ui-token-file`; it
//!   has the operator role and is meant for scripts), or a login with a user name and
//!   password checked against an argon2 hash from `--ui-users` (lines
//!   `name:role:$argon2id$…`), which opens a session: an HttpOnly, SameSite=Strict cookie
//!   of 256 random bits, kept in memory (a restart logs everyone out).
//! - Roles: `viewer` reads everything the API shows; `operator` may also run the actions.
//! - Every action (a POST other than the login) from a session needs the session's CSRF
//!   token in `X-CSRF-Token` (synchronizer pattern: the token is handed out by
//!   `GET /api/v1/session` and embedded in the pages), and a POST whose `Origin` names
//!   another host is refused. A bearer request needs no CSRF token: a browser never
//!   sends one on its own.
//! - Every UI and API response carries a strict CSP, `X-Content-Type-Options: nosniff`,
//!   `frame-ancestors 'none'`/`X-Frame-Options: DENY`, `Referrer-Policy: same-origin` and
//!   `Cache-Control: no-store`.
//! - Secrets are compared in constant time; an unknown user costs the same argon2 work as
//!   a wrong password.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::Shared;
use crate::server::token_eq;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "stead_session";
/// The header that carries the CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// The Content-Security-Policy of every UI and API response: everything from the
/// controller itself, nothing inline, no framing.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";
/// Sessions kept at most (the oldest is dropped past this).
const MAX_SESSIONS: usize = 1024;

/// What a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read everything the UI shows.
    Viewer,
    /// Read, and run the actions (sync, restart, backup, verify).
    Operator,
}

impl Role {
    /// Parses `viewer` or `operator`.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            _ => None,
        }
    }
}

/// A user of `--ui-users`.
#[derive(Debug, Clone)]
pub struct User {
    /// Login name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Argon2 hash in PHC form (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`).
    pub hash: String,
}

/// The UI's settings.
#[derive(Clone)]
pub struct UiConfig {
    /// The bearer token (operator), if any.
    pub token: Option<String>,
    /// Users who may log in.
    pub users: Vec<User>,
    /// How long a session lasts without use.
    pub session_idle: Duration,
    /// Mark the cookie `Secure` (the UI is served through a TLS proxy).
    pub secure_cookie: bool,
}

impl std::fmt::Debug for UiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UiConfig")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field(
                "users",
                &self.users.iter().map(|u| &u.name).collect::<Vec<_>>(),
            )
            .field("session_idle", &self.session_idle)
            .field("secure_cookie", &self.secure_cookie)
            .finish()
    }
}

impl UiConfig {
    /// Settings with `token` and `users`, sessions idle out after 12 hours.
    pub fn new(token: Option<String>, users: Vec<User>) -> Result<Self, String> {
        if token.is_none() && users.is_empty() {
            return Err("--ui needs --ui-token-file or --ui-users (nobody could log in)".into());
        }
        if token.as_deref().is_some_and(|t| t.len() < 16) {
            return Err("the UI token must have at least 16 characters".into());
        }
        Ok(UiConfig {
            token,
            users,
            session_idle: Duration::from_secs(12 * 3600),
            secure_cookie: false,
        })
    }
}

/// Parses a users file: `name:role:hash` lines, `#` comments and blank lines skipped.
/// The hash must be an argon2 PHC string.
pub fn parse_users(text: &str) -> Result<Vec<User>, String> {
    let mut out: Vec<User> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let n = i + 1;
        let mut parts = line.splitn(3, ':');
        let (Some(name), Some(role), Some(hash)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!("line {n}: expected name:role:hash"));
        };
        let valid_name = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c));
        if !valid_name {
            return Err(format!("line {n}: bad user name {name:?}"));
        }
        let role = Role::parse(role)
            .ok_or_else(|| format!("line {n}: role must be viewer or operator, not {role:?}"))?;
        let parsed = PasswordHash::new(hash)
            .map_err(|e| format!("line {n}: not a PHC password hash: {e}"))?;
        if !parsed.algorithm.as_str().starts_with("argon2") {
            return Err(format!("line {n}: the hash must be argon2 (argon2id)"));
        }
        if out.iter().any(|u| u.name == name) {
            return Err(format!("line {n}: user {name} twice"));
        }
        out.push(User {
            name: name.into(),
            role,
            hash: hash.into(),
        });
    }
    Ok(out)
}

/// An argon2id hash of `password` in PHC form (default parameters).
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// 256 random bits as 64 hex digits.
pub fn random_token() -> String {
    let mut b = [0u8; 32];
    OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// How a request proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// `Authorization: Bearer`.
    Token,
    /// The session cookie.
    Session,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// User name (`token` for the bearer token).
    pub user: String,
    /// Role.
    pub role: Role,
    /// How.
    pub via: Via,
    /// The session's CSRF token (sessions only).
    pub csrf: Option<String>,
    /// The session id (sessions only).
    pub session: Option<String>,
}

struct Session {
    user: String,
    role: Role,
    csrf: String,
    last_used: Instant,
}

/// The UI's authentication state: settings and open sessions.
pub struct UiAuth {
    cfg: UiConfig,
    sessions: Mutex<HashMap<String, Session>>,
    /// One password check at a time: a flood of logins waits here, on the async side,
    /// instead of filling the blocking pool that reconciles run on.
    pub(crate) login_gate: tokio::sync::Semaphore,
    /// A hash to check unknown users against, so they cost what a known user costs.
    dummy_hash: String,
}

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No valid credentials: 401.
    Unauthenticated,
    /// The role does not allow it: 403.
    Forbidden,
    /// An action from a session without the right CSRF token: 403.
    Csrf,
    /// A POST from another origin: 403.
    CrossOrigin,
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        let (code, msg) = match self {
            Denied::Unauthenticated => (StatusCode::UNAUTHORIZED, "authentication required"),
            Denied::Forbidden => (StatusCode::FORBIDDEN, "the operator role is required"),
            Denied::Csrf => (StatusCode::FORBIDDEN, "missing or wrong CSRF token"),
            Denied::CrossOrigin => (StatusCode::FORBIDDEN, "cross-origin request refused"),
        };
        let mut r = (code, axum::Json(serde_json::json!({ "error": msg }))).into_response();
        if self == Denied::Unauthenticated {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"stead\""),
            );
        }
        r
    }
}

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Any authenticated user.
    Read,
    /// An operator, with CSRF for sessions.
    Operate,
}

/// The decision for a caller: `need` on a request with `method`, the CSRF header
/// `csrf_header`, and whether its `Origin` matched the host (`None`: no Origin header).
pub fn decide(
    who: Option<&Principal>,
    need: Need,
    method: &Method,
    csrf_header: Option<&str>,
    same_origin: Option<bool>,
) -> Result<(), Denied> {
    let who = who.ok_or(Denied::Unauthenticated)?;
    let writes = !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    if writes && same_origin == Some(false) {
        return Err(Denied::CrossOrigin);
    }
    if need == Need::Operate && who.role < Role::Operator {
        return Err(Denied::Forbidden);
    }
    if writes && who.via == Via::Session {
        let expected = who.csrf.as_deref().unwrap_or("");
        let given = csrf_header.unwrap_or("");
        if expected.is_empty() || !token_eq(given.as_bytes(), expected.as_bytes()) {
            return Err(Denied::Csrf);
        }
    }
    Ok(())
}

/// A cookie's value from the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Whether the request's `Origin` names its `Host`; `None` without an Origin.
pub fn same_origin(headers: &HeaderMap) -> Option<bool> {
    let origin = headers.get(header::ORIGIN)?.to_str().ok()?;
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let origin_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .unwrap_or("");
    Some(!host.is_empty() && origin_host.eq_ignore_ascii_case(host))
}

impl UiAuth {
    /// The state for `cfg`, no sessions yet.
    pub fn new(cfg: UiConfig) -> Self {
        let dummy_hash = hash_password(&random_token()).unwrap_or_default();
        UiAuth {
            cfg,
            sessions: Mutex::new(HashMap::new()),
            login_gate: tokio::sync::Semaphore::new(1),
            dummy_hash,
        }
    }

    /// The settings.
    pub fn config(&self) -> &UiConfig {
        &self.cfg
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks `user`'s `password`; on success opens a session and returns it. Blocking
    /// (argon2): call it on a blocking thread.
    pub fn login(&self, user: &str, password: &str) -> Option<Principal> {
        let found = self.cfg.users.iter().find(|u| u.name == user);
        let hash = found.map_or(self.dummy_hash.as_str(), |u| u.hash.as_str());
        let ok = PasswordHash::new(hash).is_ok_and(|h| {
            argon2::Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        });
        let u = found.filter(|_| ok)?;
        let sid = random_token();
        let csrf = random_token();
        let mut sessions = self.lock();
        self.expire(&mut sessions);
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(k, _)| k.clone())
        {
            sessions.remove(&oldest);
        }
        sessions.insert(
            sid.clone(),
            Session {
                user: u.name.clone(),
                role: u.role,
                csrf: csrf.clone(),
                last_used: Instant::now(),
            },
        );
        Some(Principal {
            user: u.name.clone(),
            role: u.role,
            via: Via::Session,
            csrf: Some(csrf),
            session: Some(sid),
        })
    }

    fn expire(&self, sessions: &mut HashMap<String, Session>) {
        let idle = self.cfg.session_idle;
        sessions.retain(|_, s| s.last_used.elapsed() < idle);
    }

    /// Ends the session `sid`.
    pub fn logout(&self, sid: &str) {
        self.lock().remove(sid);
    }

    /// Who sent a request with `headers`: a valid bearer token, else a live session
    /// cookie, else nobody. A wrong bearer token is nobody (the cookie is not tried).
    pub fn authenticate(&self, headers: &HeaderMap) -> Option<Principal> {
        if let Some(auth) = headers.get(header::AUTHORIZATION) {
            let given = auth.to_str().ok()?.strip_prefix("Bearer ")?.trim();
            let token = self.cfg.token.as_deref()?;
            return token_eq(given.as_bytes(), token.as_bytes()).then(|| Principal {
                user: "token".into(),
                role: Role::Operator,
                via: Via::Token,
                csrf: None,
                session: None,
            });
        }
        let sid = cookie(headers, SESSION_COOKIE)?;
        let mut sessions = self.lock();
        let idle = self.cfg.session_idle;
        let s = sessions.get_mut(sid)?;
        if s.last_used.elapsed() >= idle {
            sessions.remove(sid);
            return None;
        }
        s.last_used = Instant::now();
        Some(Principal {
            user: s.user.clone(),
            role: s.role,
            via: Via::Session,
            csrf: Some(s.csrf.clone()),
            session: Some(sid.to_string()),
        })
    }

    /// The `Set-Cookie` value that opens session `sid`.
    pub fn session_cookie(&self, sid: &str) -> String {
        let secure = if self.cfg.secure_cookie {
            "; Secure"
        } else {
            ""
        };
        format!(
            "{SESSION_COOKIE}={sid}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
            self.cfg.session_idle.as_secs()
        )
    }

    /// The `Set-Cookie` value that removes the session cookie.
    pub fn clear_cookie(&self) -> String {
        format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
    }
}

/// Middleware: puts the caller's [`Principal`] (if any) into the request's extensions.
/// Handlers decide with the [`Viewer`] and [`Operator`] extractors; pages may use
/// `Option<Extension<Principal>>` to send a login form instead.
pub(crate) async fn authenticate(
    State(shared): State<Arc<Shared>>,
    mut req: Request,
    next: Next,
) -> Response {
    if let Some(ui) = &shared.ui
        && let Some(p) = ui.authenticate(req.headers())
    {
        req.extensions_mut().insert(p);
    }
    next.run(req).await
}

/// Middleware: the security headers of every UI and API response.
pub async fn security_headers(req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    r
}

/// The decision for the request `parts` needing `need`.
fn check(parts: &Parts, need: Need) -> Result<Principal, Denied> {
    let who = parts.extensions.get::<Principal>();
    let csrf = parts.headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
    decide(who, need, &parts.method, csrf, same_origin(&parts.headers))?;
    who.cloned().ok_or(Denied::Unauthenticated)
}

/// An authenticated caller (any role); a POST from a session carries its CSRF token.
#[derive(Debug, Clone)]
pub struct Viewer(pub Principal);

/// An operator; a POST from a session carries its CSRF token.
#[derive(Debug, Clone)]
pub struct Operator(pub Principal);

impl<S: Send + Sync> FromRequestParts<S> for Viewer {
    type Rejection = Denied;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Denied> {
        check(parts, Need::Read).map(Viewer)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Operator {
    type Rejection = Denied;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Denied> {
        check(parts, Need::Operate).map(Operator)
    }
}

#[cfg(test)]
pub(crate) mod tests;
