//! The console page's websocket: a container's or VM's serial console relayed to the
//! browser, attached the way `stead console` attaches (through the binary's
//! [`Housekeeping`](crate::Housekeeping)); and the screen page's: a QEMU VM's VNC server
//! (its unix socket, never TCP) relayed in binary frames to noVNC. Operators only; the
//! upgrade must come from a page of this server (a browser always sends `Origin` with a
//! websocket).

use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::Instrument as _;
use tracing::{info, info_span, warn};

use crate::Shared;
use crate::auth::{Principal, Role};

/// How often the relay pings the browser, so an idle console is not closed by the
/// server's idle limit.
const PING_EVERY: Duration = Duration::from_secs(4);

/// Why a console upgrade is refused (status and message).
pub(crate) fn refusal(
    who: Option<&Principal>,
    same_origin: Option<bool>,
) -> Option<(StatusCode, &'static str)> {
    match who {
        None => Some((StatusCode::UNAUTHORIZED, "authentication required")),
        Some(p) if p.role < Role::Operator => {
            Some((StatusCode::FORBIDDEN, "the console needs the operator role"))
        }
        Some(_) if same_origin != Some(true) => Some((
            StatusCode::FORBIDDEN,
            "the console is opened from this server's pages only",
        )),
        Some(_) => None,
    }
}

/// What a relay attaches to: the serial console, or a QEMU VM's VNC server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Console,
    Screen,
}

/// `GET /console/{kind}/{name}/ws`.
pub(crate) async fn upgrade(
    State(s): State<Arc<Shared>>,
    who: Option<Extension<Principal>>,
    headers: HeaderMap,
    Path((kind, name)): Path<(String, String)>,
    ws: WebSocketUpgrade,
) -> Response {
    attach(s, who, headers, (kind, name), ws, Target::Console).await
}

/// `GET /screen/VirtualMachine/{name}/ws`: the VM's VNC stream in binary frames (the
/// RFB protocol, spoken by noVNC in the page). Same checks as the console.
pub(crate) async fn upgrade_screen(
    State(s): State<Arc<Shared>>,
    who: Option<Extension<Principal>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    ws: WebSocketUpgrade,
) -> Response {
    let id = ("VirtualMachine".to_string(), name);
    attach(s, who, headers, id, ws, Target::Screen).await
}

async fn attach(
    s: Arc<Shared>,
    who: Option<Extension<Principal>>,
    headers: HeaderMap,
    (kind, name): (String, String),
    ws: WebSocketUpgrade,
    target: Target,
) -> Response {
    let who = who.map(|Extension(p)| p);
    if let Some((code, msg)) = refusal(who.as_ref(), crate::auth::same_origin(&headers)) {
        return (code, msg).into_response();
    }
    let user = who.map(|p| p.user).unwrap_or_default();
    let Some(id) =
        crate::api::parse_id(&kind, &name).filter(|id| super::pages::has_console(id.kind.as_str()))
    else {
        return (StatusCode::NOT_FOUND, "no such console").into_response();
    };
    let Some(hk) = s.housekeeping.clone() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "consoles are not available",
        )
            .into_response();
    };
    let for_open = id.clone();
    let opened = tokio::task::spawn_blocking(move || match target {
        Target::Console => hk.open_console(&for_open),
        Target::Screen => hk.open_vnc(&for_open),
    })
    .await;
    let conn = match opened {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return (StatusCode::CONFLICT, e.0).into_response(),
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    let conn = match conn
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(conn))
    {
        Ok(c) => c,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let span = match target {
        Target::Console => info_span!("console", resource = %id, user = %user),
        Target::Screen => info_span!("screen", resource = %id, user = %user),
    };
    ws.on_upgrade(move |socket| relay(socket, conn).instrument(span))
}

/// Copies console output to the browser and the browser's input to the console until
/// either side closes.
async fn relay(mut ws: WebSocket, conn: tokio::net::UnixStream) {
    info!("attached");
    let (mut rd, mut wr) = conn.into_split();
    let mut buf = vec![0u8; 8192];
    let mut ping = tokio::time::interval(PING_EVERY);
    loop {
        tokio::select! {
            n = rd.read(&mut buf) => match n {
                Ok(0) => break,
                Ok(n) => {
                    if ws.send(Message::Binary(buf[..n].to_vec().into())).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "console read");
                    break;
                }
            },
            m = ws.recv() => {
                let input = match m {
                    Some(Ok(Message::Text(t))) => t.as_bytes().to_vec(),
                    Some(Ok(Message::Binary(b))) => b.to_vec(),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                };
                if wr.write_all(&input).await.is_err() {
                    break;
                }
            },
            _ = ping.tick() => {
                if ws.send(Message::Ping(Vec::new().into())).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = ws.send(Message::Close(None)).await;
    info!("detached");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Via;

    fn who(role: Role) -> Principal {
        Principal {
            user: "u".into(),
            role,
            via: Via::Session,
            csrf: Some("c".into()),
            session: Some("s".into()),
        }
    }

    #[test]
    fn console_needs_an_operator_from_this_origin() {
        assert_eq!(
            refusal(None, Some(true)).map(|r| r.0),
            Some(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            refusal(Some(&who(Role::Viewer)), Some(true)).map(|r| r.0),
            Some(StatusCode::FORBIDDEN)
        );
        let op = who(Role::Operator);
        assert_eq!(
            refusal(Some(&op), Some(false)).map(|r| r.0),
            Some(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            refusal(Some(&op), None).map(|r| r.0),
            Some(StatusCode::FORBIDDEN)
        );
        assert_eq!(refusal(Some(&op), Some(true)), None);
    }
}
