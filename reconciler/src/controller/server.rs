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
use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
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
    if let Some(sig) = h("x-hub-signature-256") {
        return sig
            .trim()
            .strip_prefix("sha256=")
            .and_then(|hexsig| hex::decode(hexsig).ok())
            .is_some_and(|given| hmac_sha256_verify(token, body, &given));
    }
    if let Some(auth) = h("authorization")
        && let Some(t) = auth.trim().strip_prefix("Bearer ")
    {
        return token_eq(t.trim().as_bytes(), token);
    }
    if let Some(t) = h("x-gitlab-token") {
        return token_eq(t.trim().as_bytes(), token);
    }
    false
}

/// Compares a presented token with the configured one in constant time. Both are hashed
/// first so that the comparison also does not reveal the token's length.
pub fn token_eq(given: &[u8], token: &[u8]) -> bool {
    Sha256::digest(given).ct_eq(&Sha256::digest(token)).into()
}

/// Whether `sig` is HMAC-SHA256(`key`, `msg`), compared in constant time.
pub fn hmac_sha256_verify(key: &[u8], msg: &[u8], sig: &[u8]) -> bool {
    let Ok(mut mac) = HmacSha256::new_from_slice(key) else {
        return false;
    };
    mac.update(msg);
    mac.verify_slice(sig).is_ok()
}

/// HMAC-SHA256.
type HmacSha256 = hmac::Hmac<Sha256>;

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

    /// The signature of `body` under `key`, as a forge sends it.
    fn sign(key: &[u8], body: &[u8]) -> String {
        let mut mac = HmacSha256::new_from_slice(key).unwrap();
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        let want = hex::decode("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
            .unwrap();
        assert!(hmac_sha256_verify(
            b"Jefe",
            b"what do ya want for nothing?",
            &want
        ));
        assert!(!hmac_sha256_verify(
            b"Jefe",
            b"what do ya want for nothing!",
            &want
        ));
        assert!(!hmac_sha256_verify(
            b"Jefe",
            b"what do ya want for nothing?",
            &want[..31]
        ));
    }

    #[test]
    fn hmac_matches_rfc4231_case_6_long_key() {
        // A key longer than the block size is hashed first.
        let want = hex::decode("60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54")
            .unwrap();
        assert!(hmac_sha256_verify(
            &[0xaa; 131],
            b"Test Using Larger Than Block-Size Key - Hash Key First",
            &want
        ));
    }

    #[test]
    fn github_documented_signature() {
        // docs.github.com, "Validating webhook deliveries": secret "It's a Secret to
        // Everybody", payload "Hello, World!".
        let mut h = HeaderMap::new();
        h.insert(
            "x-hub-signature-256",
            HeaderValue::from_static(
                "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
            ),
        );
        assert!(authorized(
            b"It's a Secret to Everybody",
            &h,
            b"Hello, World!"
        ));
        assert!(!authorized(
            b"It's a Secret to Everybody",
            &h,
            b"Hello, World?"
        ));
        assert!(!authorized(b"another secret", &h, b"Hello, World!"));
    }

    #[test]
    fn webhook_auth() {
        let mut h = HeaderMap::new();
        assert!(!authorized(b"s3cret", &h, b"{}"));
        h.insert("authorization", HeaderValue::from_static("Bearer s3cret"));
        assert!(authorized(b"s3cret", &h, b"{}"));
        h.insert("authorization", HeaderValue::from_static("Bearer s3cre"));
        assert!(!authorized(b"s3cret", &h, b"{}"));
        h.insert("authorization", HeaderValue::from_static("Bearer s3cret0"));
        assert!(!authorized(b"s3cret", &h, b"{}"));
        let mut h = HeaderMap::new();
        h.insert("x-gitlab-token", HeaderValue::from_static("s3cret"));
        assert!(authorized(b"s3cret", &h, b""));
        let mut h = HeaderMap::new();
        let sig = sign(b"s3cret", b"{\"ref\":1}");
        h.insert("x-hub-signature-256", HeaderValue::from_str(&sig).unwrap());
        assert!(authorized(b"s3cret", &h, b"{\"ref\":1}"));
        assert!(!authorized(b"s3cret", &h, b"{\"ref\":2}"));
        // A bad signature is not rescued by a good bearer token.
        h.insert("authorization", HeaderValue::from_static("Bearer s3cret"));
        assert!(!authorized(b"s3cret", &h, b"{\"ref\":2}"));
        h.insert("x-hub-signature-256", HeaderValue::from_static("sha256=zz"));
        assert!(!authorized(b"s3cret", &h, b"{\"ref\":1}"));
        assert!(token_eq(b"a", b"a") && !token_eq(b"a", b"ab") && !token_eq(b"", b"a"));
    }
}
