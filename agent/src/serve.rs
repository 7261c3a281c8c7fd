//! Serving the relay's request streams: each one becomes an HTTP/1.1 exchange with the
//! local app, its response streamed back; a `101` turns the stream into a byte pipe.

use crate::dial::{INITIAL_INCOMING_STREAMS, MAX_INCOMING_STREAMS};
use crate::target::TargetPool;
use bytes::Bytes;
use http::{header, HeaderMap, Request, StatusCode};
use hyper_util::rt::TokioIo;
use jobgate_protocol::upgrade;
use jobgate_protocol::{RequestHead, ResponseHead, StreamCode, MAX_HEAD_FRAME};
use jobgate_transport::body::{abandon, pipe, pump_body, StreamBody};
use jobgate_transport::{Connection, ConnectionError, RecvStream, SendStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use thiserror::Error;

/// Serves every stream the relay opens until the connection ends, and says why it ended.
pub async fn serve_streams(connection: Connection, pool: Arc<TargetPool>) -> ConnectionError {
    let session = Arc::new(SessionStreams {
        pool,
        open: AtomicUsize::new(0),
    });
    let mut allowance = StreamAllowance::new(INITIAL_INCOMING_STREAMS, MAX_INCOMING_STREAMS);
    loop {
        match connection.accept_bi().await {
            Ok((send, recv)) => {
                let (open, count) = OpenStream::new(&session);
                if let Some(more) = allowance.raise_for(count) {
                    connection.allow_incoming_streams(more);
                }
                tokio::spawn(serve_stream(send, recv, open));
            }
            Err(e) => return e,
        }
    }
}

/// What the streams of one connection share: the app's connections, and how many of the
/// relay's streams are being served now.
struct SessionStreams {
    pool: Arc<TargetPool>,
    open: AtomicUsize,
}

/// One stream being served; counted among the connection's open streams until dropped.
struct OpenStream {
    session: Arc<SessionStreams>,
}

impl OpenStream {
    /// Counts a newly accepted stream; also returns how many are open now, this one included.
    fn new(session: &Arc<SessionStreams>) -> (Self, usize) {
        let count = session.open.fetch_add(1, Ordering::Relaxed) + 1;
        let open = Self {
            session: session.clone(),
        };
        (open, count)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.session.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How many streams the relay may have open at once on one connection. It starts small,
/// because quinn's stream tables grow with the allowance rather than with use, and doubles
/// whenever the open streams pass three quarters of it, so the relay gets more credit
/// well before it would have to wait for some (a `MAX_STREAMS` frame takes one round
/// trip). It never shrinks: tables that grew once stay grown in quinn anyway.
#[derive(Debug)]
pub struct StreamAllowance {
    now: u32,
    most: u32,
}

impl StreamAllowance {
    /// An allowance of `initial` streams that may grow to `most`.
    pub fn new(initial: u32, most: u32) -> Self {
        Self {
            now: initial.clamp(1, most.max(1)),
            most: most.max(1),
        }
    }

    /// The allowance now.
    pub fn now(&self) -> u32 {
        self.now
    }

    /// With `open` streams open: the new, larger allowance to give the relay, if it is
    /// time to raise it.
    pub fn raise_for(&mut self, open: usize) -> Option<u32> {
        let threshold = self.now as usize - self.now as usize / 4;
        if open <= threshold || self.now >= self.most {
            return None;
        }
        self.now = self.now.saturating_mul(2).min(self.most);
        Some(self.now)
    }
}

// The steps that need no waiting (decoding the head, building the request, encoding the
// response head) are plain functions or blocks: what an async fn keeps in scope across an
// `.await` is stored in its future, moved values included, and this future is copied into
// its task for every request.
async fn serve_stream(mut send: SendStream, mut recv: RecvStream, open: OpenStream) {
    let pool = &open.session.pool;
    let decoded = match recv.read_frame(MAX_HEAD_FRAME).await {
        Ok(Some(payload)) => decode_request_head(&payload),
        _ => Err(None),
    };
    let (head, upgrade) = match decoded {
        Ok(decoded) => decoded,
        Err(refusal) => {
            if let Some(why) = refusal {
                tracing::debug!("refused a request from the relay: {why}");
            }
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
    let mut response = match sender.send_request(request_for_app(head, body)).await {
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
    let on_upgrade =
        (status == StatusCode::SWITCHING_PROTOCOLS).then(|| hyper::upgrade::on(&mut response));
    // Moved out rather than cloned (a clone costs a reference count per field): neither
    // the body nor the upgrade needs them.
    let frame = ResponseHead {
        status,
        headers: std::mem::take(response.headers_mut()),
    }
    .to_frame();
    let body = response.into_body();
    // Handed over as it is (no copy into the stream's buffer).
    if send.write_chunk(frame.into()).await.is_err() {
        return;
    }

    if let Some(on_upgrade) = on_upgrade {
        let Some(recv) = kept_recv else {
            send.reset(StreamCode::BadResponse);
            return;
        };
        match on_upgrade.await {
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

    match pump_body(body, &mut send).await {
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

/// The request head the relay sent, and whether it is an upgrade; `Err(None)` for a
/// head that does not decode, `Err(Some(why))` for an upgrade the agent refuses.
fn decode_request_head(payload: &Bytes) -> Result<(RequestHead, bool), Option<UpgradeRefusal>> {
    let mut head = RequestHead::decode_shared(payload).map_err(|_| None)?;
    let upgrade = prepare_upgrade(&mut head.headers).map_err(Some)?;
    Ok((head, upgrade))
}

/// The HTTP/1.1 request for the app.
fn request_for_app(head: RequestHead, body: StreamBody) -> Request<StreamBody> {
    let mut request = Request::new(body);
    *request.method_mut() = head.method;
    *request.uri_mut() = head.target;
    *request.headers_mut() = head.headers;
    request
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

    fn size_of_task<A, B, C, F>(_: impl Fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn a_streams_task_stays_small() {
        // Copied into a new task for every request: 2,048 bytes when the decoded head, the
        // request and the response were all kept in scope across every `.await`.
        let size = size_of_task(serve_stream);
        assert!(size <= 1_600, "the stream's task grew to {size} bytes");
    }

    #[test]
    fn the_stream_allowance_doubles_as_streams_fill_it_up_to_the_most() {
        let mut allowance = StreamAllowance::new(1_024, 16_384);
        assert_eq!(allowance.now(), 1_024);
        // Up to three quarters open, the relay has enough credit.
        assert_eq!(allowance.raise_for(1), None);
        assert_eq!(allowance.raise_for(768), None);
        assert_eq!(allowance.raise_for(769), Some(2_048));
        assert_eq!(allowance.raise_for(769), None, "raised once per threshold");
        assert_eq!(allowance.raise_for(1_537), Some(4_096));
        assert_eq!(allowance.raise_for(3_073), Some(8_192));
        assert_eq!(allowance.raise_for(8_000), Some(16_384));
        assert_eq!(allowance.raise_for(16_384), None, "never past the most");
        assert_eq!(allowance.now(), 16_384);
        // Fewer open streams never take credit back.
        assert_eq!(allowance.raise_for(0), None);
        assert_eq!(allowance.now(), 16_384);
    }

    #[test]
    fn a_stream_allowance_stays_within_its_bounds() {
        assert_eq!(StreamAllowance::new(0, 16).now(), 1);
        assert_eq!(StreamAllowance::new(64, 16).now(), 16);
        let mut one = StreamAllowance::new(1, 3);
        assert_eq!(one.raise_for(1), None);
        assert_eq!(one.raise_for(2), Some(2));
        assert_eq!(one.raise_for(3), Some(3));
        assert_eq!(one.raise_for(usize::MAX), None);
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
