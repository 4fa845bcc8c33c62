//! HTTP (`/metrics`, `/healthz`, `/readyz`, `POST /hooks/git`; with `--ui` also `/api/v1`
//! and the web pages) and the status socket.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::UnixListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tracing::{debug, info, warn};

use super::{ControllerError, Shared};

/// Limits of the controller's HTTP server.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Connections served at once; more wait in the kernel's listen backlog until one
    /// closes.
    pub max_connections: usize,
    /// A connection on which nothing moves for this long is closed: a client that sends
    /// half a request and stalls, or an idle keep-alive connection.
    pub idle_timeout: Duration,
    /// A connection is closed after this long whatever it does (a client that drips one
    /// byte at a time).
    pub max_connection_age: Duration,
    /// Largest `POST /hooks/git` body; larger gets 413.
    pub webhook_body_limit: usize,
}

impl Default for HttpLimits {
    /// 64 connections, 10 s idle, 60 s per connection, 1 MiB webhook bodies.
    fn default() -> Self {
        HttpLimits {
            max_connections: 64,
            idle_timeout: Duration::from_secs(10),
            max_connection_age: Duration::from_secs(60),
            webhook_body_limit: 1 << 20,
        }
    }
}

impl HttpLimits {
    /// With the web UI: live streams (the SSE stream, a console) stay open up to an hour
    /// and 256 connections are served at once (browser tabs hold one stream each); the
    /// 10 s idle limit stays, so a stalled client is still closed quickly.
    pub fn with_ui() -> Self {
        HttpLimits {
            max_connections: 256,
            max_connection_age: Duration::from_secs(3600),
            ..HttpLimits::default()
        }
    }
}

/// The HTTP routes.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    router_with(shared, &HttpLimits::default())
}

/// The HTTP routes, with the webhook body limited to `limits.webhook_body_limit`.
pub(crate) fn router_with(shared: Arc<Shared>, limits: &HttpLimits) -> Router {
    let base = base_routes(shared.clone(), limits);
    if shared.ui.is_none() {
        return base;
    }
    base.merge(ui_routes(shared))
}

/// With `--ui`: `/api/v1` (and the pages), every route behind the authentication
/// middleware and with the security headers.
fn ui_routes(shared: Arc<Shared>) -> Router {
    Router::new()
        .merge(crate::api::routes())
        .merge(crate::ui::routes())
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            crate::auth::authenticate,
        ))
        .layer(axum::middleware::from_fn(crate::auth::security_headers))
        .with_state(shared)
}

/// `/metrics`, `/healthz`, `/readyz` and `/hooks/git`.
fn base_routes(shared: Arc<Shared>, limits: &HttpLimits) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route(
            "/hooks/git",
            post(hook)
                .layer(DefaultBodyLimit::max(limits.webhook_body_limit))
                .route_layer(axum::middleware::from_fn_with_state(
                    limits.webhook_body_limit,
                    refuse_declared_oversize,
                )),
        )
        .with_state(shared)
}

/// 413 at once for a request whose `Content-Length` is over `limit`, before any of the
/// body is read (a body without a length is cut off by `DefaultBodyLimit` as it comes).
async fn refuse_declared_oversize(
    State(limit): State<usize>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        warn!(bytes = declared, limit, "webhook body too large");
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the webhook body is limited to {limit} bytes\n"),
        )
            .into_response();
    }
    next.run(req).await
}

/// A TCP listener that serves at most `max_connections` at once and closes connections
/// that stall or live too long (see [`HttpLimits`]). Pass it to `axum::serve`.
pub struct LimitedListener {
    inner: tokio::net::TcpListener,
    permits: Arc<Semaphore>,
    limits: HttpLimits,
}

/// `listener` under `limits`.
pub fn limited(listener: tokio::net::TcpListener, limits: HttpLimits) -> LimitedListener {
    LimitedListener {
        inner: listener,
        permits: Arc::new(Semaphore::new(limits.max_connections.max(1))),
        limits,
    }
}

impl axum::serve::Listener for LimitedListener {
    type Io = LimitedIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (LimitedIo, SocketAddr) {
        // Wait for a free slot before taking the next connection off the backlog.
        let Ok(permit) = self.permits.clone().acquire_owned().await else {
            // The semaphore is never closed.
            return std::future::pending().await;
        };
        loop {
            match self.inner.accept().await {
                Ok((io, addr)) => return (LimitedIo::new(io, permit, &self.limits), addr),
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "http accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A connection of a [`LimitedListener`]: fails with `TimedOut` once it has been idle
/// for the idle timeout or open for the maximum age; frees its slot when dropped.
pub struct LimitedIo {
    io: tokio::net::TcpStream,
    idle_timeout: Duration,
    idle: Pin<Box<Sleep>>,
    age: Pin<Box<Sleep>>,
    _permit: OwnedSemaphorePermit,
}

impl LimitedIo {
    fn new(io: tokio::net::TcpStream, permit: OwnedSemaphorePermit, limits: &HttpLimits) -> Self {
        let now = tokio::time::Instant::now();
        LimitedIo {
            io,
            idle_timeout: limits.idle_timeout,
            idle: Box::pin(tokio::time::sleep_until(now + limits.idle_timeout)),
            age: Box::pin(tokio::time::sleep_until(now + limits.max_connection_age)),
            _permit: permit,
        }
    }

    /// Something moved: restart the idle clock.
    fn touch(&mut self) {
        let at = tokio::time::Instant::now() + self.idle_timeout;
        self.idle.as_mut().reset(at);
    }

    /// `Ready(error)` once a clock ran out (and registers `cx` with both clocks).
    fn expired(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        let what = if self.age.as_mut().poll(cx).is_ready() {
            "connection open too long"
        } else if self.idle.as_mut().poll(cx).is_ready() {
            "connection idle too long"
        } else {
            return Poll::Pending;
        };
        debug!(what, "closing http connection");
        Poll::Ready(std::io::Error::new(std::io::ErrorKind::TimedOut, what))
    }

    /// The result of an I/O poll that moved `moved` bytes, under the clocks.
    fn guard<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
        moved: bool,
    ) -> Poll<std::io::Result<T>> {
        match polled {
            Poll::Ready(Ok(v)) => {
                if self.age.is_elapsed() {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "connection open too long",
                    )));
                }
                if moved {
                    self.touch();
                }
                Poll::Ready(Ok(v))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.expired(cx).map(Err),
        }
    }
}

impl AsyncRead for LimitedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        let moved = buf.filled().len() > before;
        this.guard(cx, polled, moved)
    }
}

impl AsyncWrite for LimitedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, data);
        let moved = matches!(polled, Poll::Ready(Ok(n)) if n > 0);
        this.guard(cx, polled, moved)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        let moved = matches!(polled, Poll::Ready(Ok(n)) if n > 0);
        this.guard(cx, polled, moved)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.guard(cx, polled, false)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
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

    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Instant;

    /// Serves a `/healthz` route under `limits` on 127.0.0.1 from a background thread
    /// (ended with the test process); returns the port.
    fn serve(limits: HttpLimits) -> u16 {
        serve_app(
            Router::new().route("/healthz", get(|| async { "ok\n" })),
            limits,
        )
    }

    /// Serves `app` under `limits` on 127.0.0.1 from a background thread; the port.
    fn serve_app(app: Router, limits: HttpLimits) -> u16 {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let port = std_listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(std_listener).unwrap();
                let _ = axum::serve(limited(l, limits), app).await;
            });
        });
        port
    }

    fn limits(idle_ms: u64, max: usize) -> HttpLimits {
        HttpLimits {
            max_connections: max,
            idle_timeout: Duration::from_millis(idle_ms),
            max_connection_age: Duration::from_secs(30),
            webhook_body_limit: 1 << 20,
        }
    }

    /// Reads until EOF or error (bounded by a 10 s socket timeout); the bytes read.
    fn read_all(s: &mut TcpStream) -> Vec<u8> {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    }

    fn healthz(port: u16) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        String::from_utf8_lossy(&read_all(&mut s)).into_owned()
    }

    #[test]
    fn a_stalled_header_is_cut_off_after_the_idle_timeout() {
        let port = serve(limits(300, 8));
        assert!(healthz(port).starts_with("HTTP/1.1 200"));
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Half: ")
            .unwrap();
        let t = Instant::now();
        let got = read_all(&mut s);
        let took = t.elapsed();
        assert!(
            !String::from_utf8_lossy(&got).contains("200 OK"),
            "answered a half request"
        );
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(5),
            "closed after {took:?}"
        );
    }

    #[test]
    fn a_slow_drip_is_cut_off_at_the_maximum_age() {
        let mut l = limits(2000, 8);
        l.max_connection_age = Duration::from_millis(600);
        let port = serve(l);
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let t = Instant::now();
        // One header byte every 100 ms never trips the idle timeout.
        let mut closed = false;
        for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter() {
            if s.write_all(&[*b]).is_err() {
                closed = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !closed {
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let mut buf = [0u8; 64];
            closed = matches!(s.read(&mut buf), Ok(0) | Err(_));
        }
        assert!(closed, "still open after {:?}", t.elapsed());
    }

    #[test]
    fn over_the_cap_healthz_waits_for_idle_connections_to_time_out() {
        let port = serve(limits(400, 4));
        // Six silent clients: four hold every slot, two wait in the backlog.
        let idle: Vec<TcpStream> = (0..6)
            .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        let answer = healthz(port);
        let took = t.elapsed();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
        // It could only be served once idle clients were closed (the cap held).
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(8),
            "served after {took:?}"
        );
        drop(idle);
    }

    /// The controller's routes with the webhook token `tok` and a `limit`-byte body cap.
    fn serve_controller(tok: &str, limit: usize) -> u16 {
        let shared = crate::tests::shared_with(Some(tok.into()), None, None);
        let mut l = limits(2000, 8);
        l.webhook_body_limit = limit;
        serve_app(router_with(shared, &l), l)
    }

    /// POSTs `body` to the webhook with a bearer token, with a `Content-Length` or
    /// chunked; the status code (0 if none). Bodies stay under 8 KiB, so the server
    /// has read all of it when it answers (no reset that would eat the answer).
    fn post_hook(port: u16, tok: &str, body: &[u8], chunked: bool) -> u16 {
        send_hook(port, tok, body, chunked, body.len())
    }

    /// [`post_hook`] announcing `len` bytes with `Content-Length` (when not chunked).
    fn send_hook(port: u16, tok: &str, body: &[u8], chunked: bool, len: usize) -> u16 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let framing = if chunked {
            "Transfer-Encoding: chunked".to_string()
        } else {
            format!("Content-Length: {len}")
        };
        let head = format!(
            "POST /hooks/git HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {tok}\r\n{framing}\r\n\r\n"
        );
        let _ = s.write_all(head.as_bytes());
        if chunked {
            for part in body.chunks(512) {
                let _ = s.write_all(format!("{:x}\r\n", part.len()).as_bytes());
                let _ = s.write_all(part);
                let _ = s.write_all(b"\r\n");
            }
            let _ = s.write_all(b"0\r\n\r\n");
        } else {
            let _ = s.write_all(body);
        }
        let text = String::from_utf8_lossy(&read_all(&mut s)).into_owned();
        text.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    }

    #[test]
    fn webhook_bodies_over_the_limit_get_413() {
        let port = serve_controller("t0k", 4096);
        assert_eq!(post_hook(port, "t0k", &[b'x'; 4096], false), 202);
        assert_eq!(post_hook(port, "t0k", &[b'x'; 4096], true), 202);
        // Announced too large: refused before the body is read (none is sent).
        assert_eq!(send_hook(port, "t0k", b"", false, 1 << 30), 413);
        // No length announced: cut off once it passes the limit.
        assert_eq!(post_hook(port, "t0k", &[b'x'; 5000], true), 413);
        assert_eq!(post_hook(port, "wrong", b"{}", false), 401);
    }

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
