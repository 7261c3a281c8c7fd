//! Serving the relay's request streams: each one becomes an HTTP/1.1 exchange with the
//! local app, its response streamed back; a `101` turns the stream into a byte pipe.

use crate::target::TargetPool;
use http::{header, HeaderMap, Request, StatusCode};
use hyper_util::rt::TokioIo;
use jobgate_protocol::upgrade;
use jobgate_protocol::{RequestHead, ResponseHead, StreamCode, MAX_HEAD_FRAME};
use jobgate_transport::body::{abandon, pipe, pump_body, StreamBody};
use jobgate_transport::{Connection, ConnectionError, RecvStream, SendStream};
use std::sync::Arc;
use thiserror::Error;

/// Serves every stream the relay opens until the connection ends, and says why it ended.
pub async fn serve_streams(connection: Connection, pool: Arc<TargetPool>) -> ConnectionError {
    loop {
        match connection.accept_bi().await {
            Ok((send, recv)) => {
                tokio::spawn(serve_stream(send, recv, pool.clone()));
            }
            Err(e) => return e,
        }
    }
}

async fn serve_stream(mut send: SendStream, mut recv: RecvStream, pool: Arc<TargetPool>) {
    let head = match recv.read_frame(MAX_HEAD_FRAME).await {
        Ok(Some(payload)) => RequestHead::decode_shared(&payload).ok(),
        _ => None,
    };
    let Some(mut head) = head else {
        return abandon(&mut send, &mut recv, StreamCode::MalformedHead);
    };
    let upgrade = match prepare_upgrade(&mut head.headers) {
        Ok(upgrade) => upgrade,
        Err(why) => {
            tracing::debug!("refused a request from the relay: {why}");
            return abandon(&mut send, &mut recv, StreamCode::MalformedHead);
        }
    };

    let mut sender = match pool.checkout().await {
        Ok(sender) => sender,
        Err(e) => {
            tracing::warn!("{e}");
            return abandon(&mut send, &mut recv, StreamCode::TargetUnavailable);
        }
    };
    // An upgrade keeps the receive half for the pipe; otherwise it is the request body.
    let (body, kept_recv) = if upgrade {
        (StreamBody::empty(), Some(recv))
    } else {
        (StreamBody::new(recv), None)
    };
    let mut request = Request::new(body);
    *request.method_mut() = head.method;
    *request.uri_mut() = head.target;
    *request.headers_mut() = head.headers;

    let mut response = match sender.send_request(request).await {
        Ok(response) => response,
        Err(e) => {
            tracing::debug!("app did not answer: {e}");
            send.reset(StreamCode::BadResponse);
            if let Some(mut recv) = kept_recv {
                recv.stop(StreamCode::BadResponse);
            }
            return;
        }
    };

    let status = response.status();
    // Moved out rather than cloned (a clone costs a reference count per field): neither
    // the body nor the upgrade needs them.
    let response_head = ResponseHead {
        status,
        headers: std::mem::take(response.headers_mut()),
    };
    if write_head(&mut send, &response_head).await.is_err() {
        return;
    }

    if status == StatusCode::SWITCHING_PROTOCOLS {
        let Some(recv) = kept_recv else {
            send.reset(StreamCode::BadResponse);
            return;
        };
        match hyper::upgrade::on(response).await {
            Ok(upgraded) => {
                if let Err(e) = pipe(TokioIo::new(upgraded), send, recv).await {
                    tracing::debug!("upgraded stream ended: {e}");
                }
            }
            Err(e) => tracing::debug!("app upgrade failed: {e}"),
        }
        return;
    }
    drop(kept_recv);

    match pump_body(response.into_body(), &mut send).await {
        Ok(_) => {
            let _ = send.finish().await;
            // A connection on which an upgrade was asked for and refused goes no further:
            // the app may have switched state for it, or still wait for a body it was
            // told of, and the next request would be read as that body (smuggling).
            //
            // Other ways a connection could fall out of step are hyper's to catch, and
            // it does: a response body cut short is an error here (no checkin); a
            // request body shorter than its `Content-Length` closes the connection, a
            // longer one is cut at the length; an app that answers before reading the
            // whole request body gets the rest first, as hyper finishes writing the
            // request before the connection counts as ready again (`checkout` waits for
            // that) and closes it if the body fails.
            if !upgrade {
                pool.checkin(sender);
            }
        }
        Err(e) => {
            tracing::debug!("response body ended early: {e}");
            send.reset(StreamCode::Cancelled);
        }
    }
}

/// Why the agent refuses an upgrade request the relay sent (a relay of this version never
/// sends one; an older or broken one might).
#[derive(Debug, Error, PartialEq, Eq)]
enum UpgradeRefusal {
    /// An upgrade to anything but WebSocket (`h2c` would be a tunnel past the relay).
    #[error("upgrade to a protocol other than websocket")]
    NotWebSocket,
    /// An upgrade request that declares a body, which would never be sent to the app.
    #[error("upgrade request that declares a body")]
    WithBody,
}

/// Whether the request is an upgrade (a WebSocket handshake), made safe to send to the
/// app with an empty body: it must not declare a body, and loses any `Content-Length:
/// 0`, so its head never announces bytes that do not follow.
fn prepare_upgrade(headers: &mut HeaderMap) -> Result<bool, UpgradeRefusal> {
    let Some(value) = headers.get(header::UPGRADE) else {
        return Ok(false);
    };
    if !upgrade::is_websocket(value) || headers.get_all(header::UPGRADE).iter().count() > 1 {
        return Err(UpgradeRefusal::NotWebSocket);
    }
    if upgrade::declares_body(headers) {
        return Err(UpgradeRefusal::WithBody);
    }
    headers.remove(header::CONTENT_LENGTH);
    Ok(true)
}

async fn write_head(send: &mut SendStream, head: &ResponseHead) -> std::io::Result<()> {
    // Handed over as it is (no copy into the stream's buffer).
    send.write_chunk(head.to_frame().into()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(fields: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in fields {
            h.append(*name, HeaderValue::from_static(value));
        }
        h
    }

    #[test]
    fn a_plain_request_is_left_alone() {
        let mut h = headers(&[("content-length", "5")]);
        assert_eq!(prepare_upgrade(&mut h), Ok(false));
        assert_eq!(h["content-length"], "5");
    }

    #[test]
    fn a_websocket_upgrade_goes_without_framing_fields() {
        let mut h = headers(&[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("content-length", "0"),
        ]);
        assert_eq!(prepare_upgrade(&mut h), Ok(true));
        assert!(h.get("content-length").is_none());
    }

    #[test]
    fn an_upgrade_with_a_body_or_to_another_protocol_is_refused() {
        for fields in [
            &[("upgrade", "websocket"), ("content-length", "12")][..],
            &[("upgrade", "websocket"), ("transfer-encoding", "chunked")][..],
        ] {
            let mut h = headers(fields);
            assert_eq!(prepare_upgrade(&mut h), Err(UpgradeRefusal::WithBody));
        }
        for fields in [
            &[("upgrade", "h2c")][..],
            &[("upgrade", "foo")][..],
            &[("upgrade", "websocket"), ("upgrade", "h2c")][..],
        ] {
            let mut h = headers(fields);
            assert_eq!(prepare_upgrade(&mut h), Err(UpgradeRefusal::NotWebSocket));
        }
    }
}
