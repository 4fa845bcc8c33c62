//! HTTP (`/metrics`, `/healthz`, `/readyz`, `POST /hooks/git`) and the status socket.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tracing::{debug, info, warn};

use super::{ControllerError, Shared};

/// The HTTP routes.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/hooks/git", post(hook))
        .with_state(shared)
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    match s.metrics.encode() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn healthz(State(s): State<Arc<Shared>>) -> Response {
    // Alive while the loop turns: a reconcile stuck for 15 minutes is unhealthy.
    let stuck = s
        .busy_since
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_some_and(|t| t.elapsed() > Duration::from_secs(900));
    if stuck {
        (StatusCode::SERVICE_UNAVAILABLE, "reconcile stuck\n").into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

async fn readyz(State(s): State<Arc<Shared>>) -> Response {
    let ready = s.status.read().map(|st| st.ready).unwrap_or(false);
    if ready {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no revision applied yet\n").into_response()
    }
}

async fn hook(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(token) = &s.webhook_token else {
        return (
            StatusCode::NOT_FOUND,
            "webhook disabled: start the controller with --webhook-token-file or STEAD_WEBHOOK_TOKEN\n",
        )
            .into_response();
    };
    if !authorized(token.as_bytes(), &headers, &body) {
        warn!("webhook call with a bad or missing token");
        return (StatusCode::UNAUTHORIZED, "bad token\n").into_response();
    }
    debug!("webhook: fetching");
    s.trigger.fire(true);
    (StatusCode::ACCEPTED, "fetching\n").into_response()
}

/// Checks a webhook call: `Authorization: Bearer T`, `X-Gitlab-Token: T` (Gitea/GitLab),
/// or `X-Hub-Signature-256: sha256=HMAC(T, body)` (GitHub, Gitea, Forgejo).
/// Comparisons are constant-time.
pub fn authorized(token: &[u8], headers: &HeaderMap, body: &[u8]) -> bool {
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(sig) = h("x-hub-signature-256")
        && let Some(hexsig) = sig.trim().strip_prefix("sha256=")
        && let Ok(given) = hex::decode(hexsig)
    {
        return ct_eq(&hmac_sha256(token, body), &given);
    }
    if let Some(auth) = h("authorization")
        && let Some(t) = auth.trim().strip_prefix("Bearer ")
    {
        return ct_eq(t.trim().as_bytes(), token);
    }
    if let Some(t) = h("x-gitlab-token") {
        return ct_eq(t.trim().as_bytes(), token);
    }
    false
}

/// Compares two byte strings in time independent of where they differ. Lengths are
/// compared via the digests so the token's length does not leak either.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let da = Sha256::digest(a);
    let db = Sha256::digest(b);
    let mut diff = 0u8;
    for (x, y) in da.iter().zip(db.iter()) {
        diff |= x ^ y;
    }
    diff == 0
}

/// HMAC-SHA256 (RFC 2104).
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        let d = Sha256::digest(key);
        k[..32].copy_from_slice(&d);
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut ipad = [0x36u8; 64];
    let mut opad = [0x5cu8; 64];
    for i in 0..64 {
        ipad[i] ^= k[i];
        opad[i] ^= k[i];
    }
    let mut inner = Sha256::new();
    inner.update(ipad);
    inner.update(msg);
    let inner = inner.finalize();
    let mut outer = Sha256::new();
    outer.update(opad);
    outer.update(inner);
    outer.finalize().to_vec()
}

/// Binds `<run-dir>/controller.sock` (mode 0600), replacing a stale socket file.
pub(crate) fn bind_status_socket(
    run_dir: &Path,
) -> Result<(UnixListener, PathBuf), ControllerError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(run_dir)
        .map_err(|e| ControllerError::io(format!("create {}", run_dir.display()), e))?;
    let path = run_dir.join("controller.sock");
    if path.exists() {
        // The controller lock is held, so no live controller owns this socket.
        let _ = std::fs::remove_file(&path);
    }
    let l = UnixListener::bind(&path)
        .map_err(|e| ControllerError::io(format!("bind {}", path.display()), e))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| ControllerError::io(format!("chmod {}", path.display()), e))?;
    Ok((l, path))
}

/// Serves the status socket: a client writes one line (`status`, or `reconcile` to
/// trigger a fetch and reconcile) and reads one JSON document.
pub(crate) async fn serve_status(l: UnixListener, shared: Arc<Shared>) {
    loop {
        let (mut conn, _) = match l.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "status socket accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = conn.split();
            let mut line = String::new();
            let mut rd = BufReader::new(tokio::io::AsyncReadExt::take(rd, 256));
            let _ = tokio::time::timeout(Duration::from_secs(2), rd.read_line(&mut line)).await;
            let body = match line.trim() {
                "reconcile" => {
                    info!("reconcile requested on the status socket");
                    shared.trigger.fire(true);
                    "{\"accepted\":true}".to_string()
                }
                _ => {
                    let st = shared.status.read().map(|s| s.clone()).unwrap_or_default();
                    serde_json::to_string(&st).unwrap_or_else(|_| "{}".into())
                }
            };
            let _ = wr.write_all(body.as_bytes()).await;
            let _ = wr.write_all(b"\n").await;
            let _ = wr.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn webhook_auth() {
        let mut h = HeaderMap::new();
        assert!(!authorized(b"s3cret", &h, b"{}"));
        h.insert("authorization", HeaderValue::from_static("Bearer s3cret"));
        assert!(authorized(b"s3cret", &h, b"{}"));
        h.insert("authorization", HeaderValue::from_static("Bearer s3cre"));
        assert!(!authorized(b"s3cret", &h, b"{}"));
        let mut h = HeaderMap::new();
        h.insert("x-gitlab-token", HeaderValue::from_static("s3cret"));
        assert!(authorized(b"s3cret", &h, b""));
        let mut h = HeaderMap::new();
        let sig = format!(
            "sha256={}",
            hex::encode(hmac_sha256(b"s3cret", b"{\"ref\":1}"))
        );
        h.insert("x-hub-signature-256", HeaderValue::from_str(&sig).unwrap());
        assert!(authorized(b"s3cret", &h, b"{\"ref\":1}"));
        assert!(!authorized(b"s3cret", &h, b"{\"ref\":2}"));
        assert!(ct_eq(b"a", b"a") && !ct_eq(b"a", b"ab"));
    }
}
