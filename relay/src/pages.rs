//! The relay's own pages: small, static, and never echoing request input.

use crate::body::RelayBody;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};

/// Seconds a client is told to wait before retrying a reconnecting session.
const RETRY_AFTER_SECS: &str = "3";

/// The pages the relay can answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// No live session under this name (never existed, or ended).
    NoSession,
    /// The host is not a session name of this relay at all.
    NotASession,
    /// The agent or the app failed while answering.
    BadGateway,
    /// The agent is connected but cannot reach its app (not listening, or gone).
    AppUnreachable,
    /// The request was malformed.
    BadRequest,
    /// No valid access key or cookie for a `link` session.
    Unauthorized,
    /// The session's agent lost its connection and may come back (resume grace).
    Reconnecting,
    /// The session has as many requests in flight as the relay allows.
    Busy,
    /// The app sent no response head within the response-head timeout.
    GatewayTimeout,
    /// A cookie-authenticated request came from a page of another origin (another site,
    /// or a sibling session under the same domain) and was not a top-level navigation.
    ForeignOrigin,
    /// A reserved name whose job has no session yet: where the job is
    /// ([`crate::queued`] renders it).
    Queued,
    /// In a cluster: the session is held by another relay, and this connection was made
    /// for another name (a browser reusing one HTTP/2 connection for several names): 421
    /// makes the browser open a new connection for this name, which reaches its relay.
    Misdirected,
}

impl Page {
    /// Every page, in the order of [`Page::index`].
    pub const ALL: [Page; 12] = [
        Self::NoSession,
        Self::NotASession,
        Self::BadGateway,
        Self::AppUnreachable,
        Self::BadRequest,
        Self::Unauthorized,
        Self::Reconnecting,
        Self::Busy,
        Self::GatewayTimeout,
        Self::ForeignOrigin,
        Self::Queued,
        Self::Misdirected,
    ];

    /// This page's position in [`Page::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The page's name in metrics.
    pub fn metric_label(self) -> &'static str {
        match self {
            Self::NoSession => "no_session",
            Self::NotASession => "not_a_session",
            Self::BadGateway => "bad_gateway",
            Self::AppUnreachable => "app_unreachable",
            Self::BadRequest => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::Reconnecting => "reconnecting",
            Self::Busy => "busy",
            Self::GatewayTimeout => "gateway_timeout",
            Self::ForeignOrigin => "foreign_origin",
            Self::Queued => "queued",
            Self::Misdirected => "misdirected",
        }
    }

    /// The status code the page is sent with.
    pub fn status(self) -> StatusCode {
        self.parts().0
    }

    fn parts(self) -> (StatusCode, &'static str, &'static str) {
        match self {
            Self::NoSession => (
                StatusCode::NOT_FOUND,
                "Session not found",
                "This jobgate session does not exist or has ended. When a batch job ends, its URL ends with it; start a new job to get a new URL.",
            ),
            Self::NotASession => (
                StatusCode::NOT_FOUND,
                "Not a session",
                "This address is not a jobgate session URL.",
            ),
            Self::BadGateway => (
                StatusCode::BAD_GATEWAY,
                "The app did not answer",
                "The job's app could not answer this request: it may have stopped, or the job's connection was lost.",
            ),
            Self::AppUnreachable => (
                StatusCode::BAD_GATEWAY,
                "The app is not reachable",
                "The job is connected, but its app does not accept connections: it may still be starting, or it has stopped.",
            ),
            Self::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "Private session",
                "This jobgate session is private. Open it with the full link its owner's job printed (it contains a jobgate_key).",
            ),
            Self::Reconnecting => (
                StatusCode::SERVICE_UNAVAILABLE,
                "Reconnecting",
                "The job's connection to the relay was interrupted. This page retries by itself; the session comes back at the same address if the job is still running.",
            ),
            Self::Busy => (
                StatusCode::SERVICE_UNAVAILABLE,
                "Too many requests",
                "This session has as many requests in flight as the relay allows. Try again in a moment.",
            ),
            Self::GatewayTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "The app did not answer in time",
                "The job's app accepted this request but sent no answer within the relay's time limit. It may be busy or stuck; reload to try again.",
            ),
            Self::ForeignOrigin => (
                StatusCode::FORBIDDEN,
                "Blocked: request from another page",
                "A page from another site or another jobgate session tried to act in this session, and the relay refused it. To use this session, open its address directly.",
            ),
            Self::BadRequest => (
                StatusCode::BAD_REQUEST,
                "Bad request",
                "The request was malformed and was not forwarded.",
            ),
            Self::Queued => (
                StatusCode::OK,
                "Queued",
                "The job of this session has not started yet.",
            ),
            Self::Misdirected => (
                StatusCode::MISDIRECTED_REQUEST,
                "Served by another relay",
                "This session is served by another relay of the cluster; your browser retries on a new connection by itself. Reload if this page stays.",
            ),
        }
    }

    /// Renders the page and asks hyper to close the connection after it (for requests
    /// whose framing cannot be trusted).
    pub fn render_closing(self, request_headers: &HeaderMap) -> Response<RelayBody> {
        let mut response = self.render(request_headers);
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        response
    }

    /// Renders the page as HTML for browsers, plain text for everything else.
    pub fn render(self, request_headers: &HeaderMap) -> Response<RelayBody> {
        self.render_as(wants_html(request_headers))
    }

    /// Renders the page as HTML (`html`, see [`wants_html`]) or plain text.
    pub fn render_as(self, html: bool) -> Response<RelayBody> {
        let (status, title, text) = self.parts();
        let mut response = if html {
            relay_response(
                status,
                "text/html; charset=utf-8",
                format!(
                    "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title} · jobgate</title>\
                     <style>{PAGE_STYLE}</style></head>\
                     <body><h1>{title}</h1><p>{text}</p><p><small>{} · jobgate relay</small></p></body></html>\n",
                    status.as_u16()
                ),
            )
        } else {
            relay_response(
                status,
                "text/plain; charset=utf-8",
                format!("{} {title}: {text}\n", status.as_u16()),
            )
        };
        let h = response.headers_mut();
        if matches!(self, Self::Reconnecting | Self::Busy) {
            h.insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
            h.insert(header::REFRESH, HeaderValue::from_static(RETRY_AFTER_SECS));
        }
        // Lets the front door count which page it sent (see `metrics`).
        response.extensions_mut().insert(self);
        response
    }
}

/// Whether the client reads pages as HTML (a browser's `Accept` names `text/html`): the
/// one thing a page needs to know of the request it answers.
pub fn wants_html(request_headers: &HeaderMap) -> bool {
    request_headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/html"))
}

/// The style of every page the relay writes itself: plain and readable, nothing loaded
/// from elsewhere.
pub(crate) const PAGE_STYLE: &str = "body{font:16px/1.5 system-ui,sans-serif;max-width:36em;margin:4em auto;padding:0 1em;color:#222}h1{font-size:1.4em}small{color:#777}";

/// A response the relay writes itself (not the app's): `content_type`, never cached,
/// marked `x-jobgate: relay`.
pub(crate) fn relay_response(
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<RelayBody> {
    let mut response = Response::new(RelayBody::Full(Some(Bytes::from(body))));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-jobgate", HeaderValue::from_static("relay"));
    response
}
