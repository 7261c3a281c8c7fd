//! One request's trip: find the session by host, open a stream to its agent, send
//! the head and stream the body, then stream the answer back. A `101` answer splices the
//! upgraded client connection to the stream.

use crate::access::{self, Decision};
use crate::body::RelayBody;
use crate::headers;
use crate::metrics::OwnedGaugeGuard;
use crate::names::SessionName;
use crate::pages::Page;
use crate::routes::{name_from_host, Route, Session};
use crate::Shared;
use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use jobgate_protocol::{ReadFrameError, RequestHead, ResponseHead, StreamCode, MAX_HEAD_FRAME};
use jobgate_transport::body::{abandon, pipe, pump_body, StreamBody};
use jobgate_transport::{RecvStream, SendStream};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

/// How long a request waits for its agent to allow one more stream. An honest agent
/// raises its allowance before it runs out (a round trip), so a request that waits this
/// long is at an agent that gives no credit at all (broken or hostile): its client gets
/// `503` rather than waiting with it.
const STREAM_CREDIT_TIMEOUT: Duration = Duration::from_secs(10);

/// A front-door connection's client, as each of its requests needs it.
#[derive(Clone)]
pub(crate) struct Client {
    /// The address the connection came from.
    addr: SocketAddr,
    /// Its IP as an `X-Forwarded-For` value, made once per connection rather than
    /// formatted for every request.
    forwarded_for: HeaderValue,
}

impl Client {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            forwarded_for: headers::forwarded_for(addr.ip()),
        }
    }
}

/// What the synchronous part of a request's trip decided: routing, access checks and the
/// head for the agent need no waiting, so they run before the request's future exists. The
/// future then holds only what the exchange with the agent needs, not the request's
/// parts several times over (hyper moves that future into place for every request).
pub(crate) enum Routed {
    /// Answered here, without an agent.
    Answer(Response<RelayBody>),
    /// A page of the sign-on host (rare: boxed, like the queued path).
    Login(Box<Request<Incoming>>),
    /// A name with no live session while agents wait in the queue.
    Queued(SessionName, Box<Request<Incoming>>),
    /// On to the session's agent.
    Forward(Exchange),
}

/// A request ready for its agent: the encoded head, the body still to stream, and the
/// in-flight counts it holds until its response head is ready.
pub(crate) struct Exchange {
    flight: InFlight,
    frame: Bytes,
    body: Incoming,
    on_upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// What an error page needs of the request.
    html: bool,
}

/// Routes a request and prepares it for its agent, without waiting on anything.
pub(crate) fn route(shared: &Arc<Shared>, req: Request<Incoming>, client: &Client) -> Routed {
    if let Err(why) = unambiguous(&req) {
        tracing::debug!(client = %client.addr, "rejected an ambiguous request: {why}");
        return Routed::Answer(Page::BadRequest.render_closing(req.headers()));
    }
    // Only a bodiless WebSocket handshake passes as an upgrade (see `headers`); anything
    // else that asks for one is refused here, before it can reach an app, and the
    // connection is closed (the body it may carry is not read).
    let upgrade = match headers::requested_upgrade(req.headers()) {
        Ok(upgrade) => upgrade,
        Err(why) => {
            tracing::debug!(client = %client.addr, "refused an upgrade request: {why}");
            return Routed::Answer(Page::BadRequest.render_closing(req.headers()));
        }
    };
    let Some(host) = request_host(&req) else {
        return Routed::Answer(Page::BadRequest.render(req.headers()));
    };
    if let Some(signon) = &shared.signon {
        if signon.is_login_host(host.as_bytes()) {
            return Routed::Login(Box::new(req));
        }
    }
    let Some(name) = host
        .to_str()
        .ok()
        .and_then(|h| name_from_host(h, &shared.domain))
    else {
        // `jobgate login` may talk to any name of the relay that is not a session.
        if let (Some(signon), Some(rest)) = (
            &shared.signon,
            req.uri().path().strip_prefix(crate::signon::COMMAND_PATHS),
        ) {
            let post = req.method() == http::Method::POST;
            return Routed::Answer(crate::signon::serve_command(
                signon,
                rest,
                post,
                req.headers(),
            ));
        }
        return Routed::Answer(Page::NotASession.render(req.headers()));
    };
    let session = match shared.routes.route(&name) {
        Some(Route::Live(session)) => session,
        // In a cluster, a name held by another relay is served there (this connection was
        // opened for another name; a new one for this name reaches that relay).
        Some(Route::Parked) | None
            if crate::cluster::held_elsewhere(shared, name.as_str()).is_some() =>
        {
            return Routed::Answer(Page::Misdirected.render(req.headers()))
        }
        Some(Route::Parked) => return Routed::Answer(Page::Reconnecting.render(req.headers())),
        None if shared.queued.is_empty() => {
            return Routed::Answer(Page::NoSession.render(req.headers()))
        }
        None => return Routed::Queued(name, Box::new(req)),
    };
    let flight = InFlight::enter(shared, session);
    if flight.session_count > shared.config.max_streams_per_agent as usize {
        return Routed::Answer(Page::Busy.render(req.headers()));
    }
    prepare(shared, flight, req, client, &host, upgrade)
}

/// Checks a routed request against its session's lock and encodes its head for the agent.
fn prepare(
    shared: &Shared,
    flight: InFlight,
    mut req: Request<Incoming>,
    client: &Client,
    host: &HeaderValue,
    upgrade: Option<HeaderValue>,
) -> Routed {
    let on_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let session = &flight.session;
    if matches!(session.lock, access::SessionLock::Owner) {
        if let Decision::Answer(response) = crate::signon::gate(shared, session, &mut parts) {
            return Routed::Answer(response);
        }
    }
    if let Decision::Answer(response) =
        access::check(&session.lock, &session.name, &session.origin, &mut parts)
    {
        return Routed::Answer(response);
    }
    // What an error page needs of the request, kept before the headers move on (a copy
    // of the whole map here cost every request a clone of each field).
    let html = crate::pages::wants_html(&parts.headers);
    headers::for_app(
        &mut parts.headers,
        host,
        client.forwarded_for.clone(),
        upgrade,
    );
    let head = RequestHead {
        method: parts.method,
        target: parts.uri,
        headers: parts.headers,
        client: Some(client.addr),
    };
    session.requests.fetch_add(1, Ordering::Relaxed);
    Routed::Forward(Exchange {
        flight,
        frame: head.to_frame().into(),
        body,
        on_upgrade,
        html,
    })
}

/// The hyper service of the front door, after [`route`]: every request, on every
/// connection.
pub(crate) async fn answer(
    shared: Arc<Shared>,
    routed: Routed,
) -> Result<Response<RelayBody>, Infallible> {
    let response = match routed {
        Routed::Answer(response) => response,
        Routed::Forward(exchange) => forward(exchange).await,
        // Boxed: the rare paths' futures would otherwise make every request's future
        // (moved into place per request) several times bigger.
        Routed::Login(req) => Box::pin(crate::signon::serve_login_host(&shared, *req)).await,
        Routed::Queued(name, req) => {
            let headers = req.headers().clone();
            match Box::pin(crate::queued::serve(&shared, name, *req)).await {
                Some(page) => page,
                None => Page::NoSession.render(&headers),
            }
        }
    };
    shared.metrics.count_response(&response);
    Ok(response)
}

/// Counts an open WebSocket (or other upgraded connection) on its session until dropped,
/// for the admin API.
struct OpenWebSocket(Arc<Session>);

impl OpenWebSocket {
    fn enter(session: &Arc<Session>) -> Self {
        session.websockets.fetch_add(1, Ordering::Relaxed);
        Self(session.clone())
    }
}

impl Drop for OpenWebSocket {
    fn drop(&mut self) {
        self.0.websockets.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a request as in flight, on the relay and on its session, until its response
/// head is ready (or it is dropped).
struct InFlight {
    shared: Arc<Shared>,
    session: Arc<Session>,
    /// The session's requests in flight, this one included, when it entered.
    session_count: usize,
}

impl InFlight {
    fn enter(shared: &Arc<Shared>, session: Arc<Session>) -> Self {
        shared.in_flight.fetch_add(1, Ordering::Relaxed);
        let session_count = session.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        Self {
            shared: shared.clone(),
            session,
            session_count,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.session.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Refuses framing and routing shapes that two parsers could read differently (request
/// smuggling): a `Transfer-Encoding` other than exactly one `chunked` (hyper already
/// refuses one that does not end in `chunked`, and drops `Content-Length` beside it and
/// closes the connection after, as RFC 9112 §6.3 allows), several `Host` fields
/// (RFC 9112 §3.2), and an absolute-form target naming another host than `Host`.
fn unambiguous(req: &Request<Incoming>) -> Result<(), &'static str> {
    let mut codings = req.headers().get_all(header::TRANSFER_ENCODING).iter();
    if let Some(first) = codings.next() {
        let only_chunked = first
            .as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(b"chunked");
        if !only_chunked || codings.next().is_some() {
            return Err("transfer-encoding other than a single chunked");
        }
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err("several Host fields");
    }
    if let (Some(host), Some(authority)) = (host, req.uri().authority()) {
        if !host
            .as_bytes()
            .eq_ignore_ascii_case(authority.as_str().as_bytes())
        {
            return Err("absolute-form target and Host disagree");
        }
    }
    Ok(())
}

/// The host the client asked for: `:authority` (HTTP/2, absolute-form) or `Host`.
fn request_host(req: &Request<Incoming>) -> Option<HeaderValue> {
    if let Some(authority) = req.uri().authority() {
        return HeaderValue::from_str(authority.as_str()).ok();
    }
    req.headers().get(header::HOST).cloned()
}

async fn forward(exchange: Exchange) -> Response<RelayBody> {
    let Exchange {
        flight,
        frame,
        body,
        on_upgrade,
        html,
    } = exchange;
    let shared = &flight.shared;
    let session = &flight.session;
    // A connection that fails here is an agent that just went away: its name is parked
    // (or ended) a moment later, so the client is told to retry rather than given a 502.
    let Some(Ok((mut send, recv))) = open_stream(&session.connection).await else {
        // A live connection with no stream to give: the agent's credit ran out (QUIC) or
        // its stream cap was reached (the TCP transport refuses at once).
        if session.connection.close_reason().is_none() {
            return Page::Busy.render_as(html);
        }
        return Page::Reconnecting.render_as(html);
    };
    // Handed over as it is (no copy into the stream's buffer).
    if send.write_chunk(frame).await.is_err() {
        return Page::Reconnecting.render_as(html);
    }

    // The request body streams on its own task, so a large upload and the response
    // can flow at the same time. An upgrade keeps the send half for the pipe.
    let send = if on_upgrade.is_some() {
        Some(send)
    } else {
        use http_body::Body;
        if body.is_end_stream() {
            let _ = send.finish().await;
        } else {
            tokio::spawn(async move {
                match pump_body(body, &mut send).await {
                    Ok(_) => {
                        let _ = send.finish().await;
                    }
                    Err(e) => {
                        tracing::debug!("request body ended early: {e}");
                        send.reset(StreamCode::Cancelled);
                    }
                }
            });
        }
        None
    };

    // If the client goes away while the agent has not answered yet, the guard resets
    // the exchange with `Cancelled` so the agent can stop asking the app.
    let mut recv = recv;
    let response_head =
        {
            let mut pending = PendingAnswer {
                recv: &mut recv,
                answered: false,
            };
            let head =
                match read_head_in_time(&mut *pending.recv, shared.config.response_head_timeout())
                    .await
                {
                    Some(Ok(Some(payload))) => {
                        ResponseHead::decode_shared(&payload).map_err(|_| Page::BadGateway)
                    }
                    Some(Ok(None)) => Err(Page::BadGateway),
                    Some(Err(e)) => Err(page_for_failed_answer(session, &e)),
                    // Not answered: the guard stops the stream with `Cancelled` as it drops.
                    None => return answer_timed_out(send, html),
                };
            pending.answered = true;
            head
        };
    let response_head = match response_head {
        Ok(head) => head,
        Err(page) => {
            recv.stop(StreamCode::MalformedHead);
            return page.render_as(html);
        }
    };

    let switching = response_head.status == StatusCode::SWITCHING_PROTOCOLS;
    let mut response = match (switching, on_upgrade, send) {
        (true, Some(on_upgrade), Some(send)) => {
            let open = OwnedGaugeGuard::enter(shared.clone(), |m| &m.upgraded);
            let open_here = OpenWebSocket::enter(session);
            tokio::spawn(async move {
                let _open = (open, open_here);
                match on_upgrade.await {
                    Ok(upgraded) => {
                        if let Err(e) = pipe(TokioIo::new(upgraded), send, recv).await {
                            tracing::debug!("upgraded connection ended: {e}");
                        }
                    }
                    Err(e) => {
                        let mut send = send;
                        abandon(&mut send, &mut recv, StreamCode::Cancelled);
                        tracing::debug!("client upgrade failed: {e}");
                    }
                }
            });
            Response::new(RelayBody::empty())
        }
        (true, _, _) => {
            // A 101 the client did not ask for cannot be honoured.
            return Page::BadGateway.render_as(html);
        }
        (false, _, send) => {
            if let Some(mut send) = send {
                // Upgrade refused by the app: an upgrade request has no body (checked in
                // `route`), so the request is complete.
                let _ = send.finish().await;
            }
            Response::new(RelayBody::Stream(StreamBody::new(recv)))
        }
    };
    *response.status_mut() = response_head.status;
    let mut response_headers = response_head.headers;
    headers::for_client(&mut response_headers, switching);
    *response.headers_mut() = response_headers;
    response
}

/// Opens the request's stream to the agent, giving up (`None`) after
/// [`STREAM_CREDIT_TIMEOUT`]. The open is normally ready at once, so it is polled once
/// before a timer is armed: the common case pays for no timer.
async fn open_stream(
    connection: &jobgate_transport::Connection,
) -> Option<Result<(SendStream, RecvStream), jobgate_transport::ConnectionError>> {
    let mut open = std::pin::pin!(connection.open_bi());
    match std::future::poll_fn(|cx| Poll::Ready(open.as_mut().poll(cx))).await {
        Poll::Ready(opened) => Some(opened),
        Poll::Pending => tokio::time::timeout(STREAM_CREDIT_TIMEOUT, open).await.ok(),
    }
}

/// Reads the response head, giving up (`None`) after `limit`.
async fn read_head_in_time(
    recv: &mut RecvStream,
    limit: Option<std::time::Duration>,
) -> Option<Result<Option<Bytes>, ReadFrameError>> {
    let read = recv.read_frame(MAX_HEAD_FRAME);
    match limit {
        Some(limit) => tokio::time::timeout(limit, read).await.ok(),
        None => Some(read.await),
    }
}

/// The app sent no response head within the timeout: the client gets `504`, and the
/// request stream is reset both ways with `Cancelled` (its receive half by the caller's
/// guard) so the agent stops waiting for the app.
fn answer_timed_out(send: Option<SendStream>, html: bool) -> Response<RelayBody> {
    if let Some(mut send) = send {
        send.reset(StreamCode::Cancelled);
    }
    Page::GatewayTimeout.render_as(html)
}

/// The page for a request whose stream failed before the response head: the agent could
/// not reach its app, or the agent's connection is gone (it may come back), or anything
/// else the agent or app did wrong. (On the TCP transport a stream reset carries no
/// code: an unreachable app shows as a bad gateway there.)
fn page_for_failed_answer(session: &Session, error: &ReadFrameError) -> Page {
    if session.connection.close_reason().is_some() {
        return Page::Reconnecting;
    }
    let ReadFrameError::Io(io) = error else {
        return Page::BadGateway;
    };
    match io
        .get_ref()
        .and_then(|e| e.downcast_ref::<quinn::ReadError>())
    {
        Some(quinn::ReadError::Reset(code))
            if code.into_inner() == u64::from(StreamCode::TargetUnavailable.as_u32()) =>
        {
            Page::AppUnreachable
        }
        Some(quinn::ReadError::ConnectionLost(_)) => Page::Reconnecting,
        _ => Page::BadGateway,
    }
}

/// A request stream waiting for its response head; stopped with `Cancelled` if the wait
/// is dropped (the client went away) before the head arrived.
struct PendingAnswer<'a> {
    recv: &'a mut RecvStream,
    answered: bool,
}

impl Drop for PendingAnswer<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.recv.stop(StreamCode::Cancelled);
        }
    }
}
#[cfg(test)]
mod tests {
    fn size_of_answer<A, B, F>(_: impl Fn(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn a_requests_future_stays_small() {
        // hyper moves this future into place for every request: it was 3,288 bytes when
        // routing ran inside it (each async layer kept its own copy of the request).
        // 1,552 since a TCP-transport stream remembers how much its next read asks for.
        let size = size_of_answer(super::answer);
        assert!(size <= 1_600, "the request future grew to {size} bytes");
    }
}
