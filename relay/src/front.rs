//! The front door: accept TCP, terminate TLS (ALPN h2 / http/1.1), and serve each
//! connection with hyper, every request going to [`crate::forward`]. A connection that
//! negotiated ALPN `jobgate/1` is an agent on the TCP transport (UDP blocked where it
//! runs): it goes to [`crate::agents`] instead.

use crate::body::RelayBody;
use crate::limits::{AcceptBackoff, ClientPermit};
use crate::Shared;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// How long a client has for its TLS handshake (ClientHello included).
const TLS_HANDSHAKE_TIMEOUT: Duration =
    Duration::from_secs(crate::config::DEFAULT_TLS_HANDSHAKE_TIMEOUT_SECS);

/// Interval of HTTP/2 keep-alive pings to idle clients.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(30);

/// Serves HTTPS on `listener` until the task is aborted.
pub(crate) async fn serve_https(
    listener: TcpListener,
    core: usize,
    tls: Arc<rustls::ServerConfig>,
    shared: Arc<Shared>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let accepting = shared.clone();
    accept_loop(listener, core, accepting, move |tcp, peer, permit| {
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        async move {
            if shared.cluster.is_some() {
                serve_clustered(tcp, peer, permit, acceptor, shared).await
            } else {
                serve_tls(tcp, peer, permit, acceptor, shared).await
            }
        }
    })
    .await
}

/// Terminates TLS on `io` and serves it: a browser's connection, or an agent's (ALPN
/// `jobgate/1`).
async fn serve_tls<IO>(
    io: IO,
    peer: SocketAddr,
    permit: ClientPermit,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
        Ok(Ok(tls)) if jobgate_transport::tcp::is_agent(tls.get_ref().1.alpn_protocol()) => {
            // Agents are capped by the agent limits, not by the per-address client caps:
            // many jobs may share one proxy's or one NAT's address.
            drop(permit);
            shared
                .metrics
                .agent_tcp_connections
                .fetch_add(1, Ordering::Relaxed);
            crate::agents::serve_tcp_agent(tls, peer, shared).await
        }
        Ok(Ok(tls)) => serve_connection(tls, peer, shared, permit).await,
        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
}

/// In a cluster: reads the ClientHello first, and hands a connection for a session held
/// by another relay to that relay over the peer link (TLS included, untouched); any other
/// connection is served here.
async fn serve_clustered(
    mut tcp: TcpStream,
    peer: SocketAddr,
    permit: ClientPermit,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
) {
    let hello = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, read_client_hello(&mut tcp)).await
    {
        Ok(Ok(hello)) => hello,
        Ok(Err(e)) => return tracing::debug!(%peer, "no TLS ClientHello: {e}"),
        Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
    };
    match peer_target(&shared, hello.server_name.as_deref()) {
        Some((link, addr, owner)) => {
            forward_to_peer(tcp, hello.bytes, peer, (link, &addr, &owner), &shared).await;
            drop(permit);
        }
        None => {
            serve_tls(
                Rewind::new(hello.bytes, tcp),
                peer,
                permit,
                acceptor,
                shared,
            )
            .await
        }
    }
}

/// Where a connection for `server_name` goes when another relay of the cluster holds that
/// session and none of its connections is live here: (the link, its address, its node id).
fn peer_target(
    shared: &Shared,
    server_name: Option<&str>,
) -> Option<(Arc<crate::cluster::peer::PeerLink>, String, String)> {
    let cluster = shared.cluster.as_ref()?;
    let name = crate::routes::name_from_host(server_name?, &shared.domain)?;
    if matches!(
        shared.routes.route(&name),
        Some(crate::routes::Route::Live(_))
    ) {
        return None;
    }
    let owner = cluster.node.held_elsewhere(name.as_str())?;
    let addr = cluster.node.peer_address(&owner)?;
    Some((cluster.link.clone(), addr, owner))
}

/// Copies a browser's connection to the relay that holds its session, both ways, until
/// either side ends it.
async fn forward_to_peer(
    mut tcp: TcpStream,
    hello: Vec<u8>,
    client: SocketAddr,
    (link, addr, owner): (Arc<crate::cluster::peer::PeerLink>, &str, &str),
    shared: &Shared,
) {
    use tokio::io::AsyncWriteExt;
    let (mut send, recv) = match link.open(addr).await {
        Ok(stream) => stream,
        Err(e) => return tracing::warn!(%client, relay = owner, "cannot forward a connection: {e}"),
    };
    if crate::cluster::peer::write_preamble(&mut send, client)
        .await
        .is_err()
        || send.write_all(&hello).await.is_err()
    {
        return;
    }
    shared
        .metrics
        .peer_forwarded_connections
        .fetch_add(1, Ordering::Relaxed);
    let _open = shared.metrics.client_connections.enter();
    // The owner's TLS answer must come back promptly: a relay that just died still looks
    // alive to the peer link for a moment, and its routes until its lease ends.
    let mut recv = recv;
    let mut first = [0u8; 4096];
    let n = match tokio::time::timeout(
        crate::cluster::peer::PEER_FIRST_BYTES_TIMEOUT,
        recv.read(&mut first),
    )
    .await
    {
        Ok(Ok(Some(n))) => n,
        _ => {
            return tracing::debug!(%client, relay = owner, "the owning relay did not answer a forwarded connection")
        }
    };
    if tcp.write_all(&first[..n]).await.is_err() {
        return;
    }
    let mut stream = tokio::io::join(recv, send);
    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut stream).await;
}

/// Serves the browser connections other relays of the cluster forward here (the peer
/// link), each as if the browser had connected directly.
pub(crate) async fn serve_peers(tls: Arc<rustls::ServerConfig>, shared: Arc<Shared>) {
    let Some(cluster) = &shared.cluster else {
        return;
    };
    let acceptor = TlsAcceptor::from(tls);
    let endpoint = cluster.link.endpoint().clone();
    while let Some(incoming) = endpoint.accept().await {
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let connection = match incoming.await {
                Ok(connection) => connection,
                Err(e) => return tracing::debug!("peer link handshake failed: {e}"),
            };
            while let Ok((send, recv)) = connection.accept_bi().await {
                let serve = serve_forwarded(send, recv, acceptor.clone(), shared.clone());
                shared.core_load.spawn_in_turn(serve);
            }
        });
    }
}

/// One browser connection forwarded by another relay.
async fn serve_forwarded(
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
) {
    let client = match tokio::time::timeout(
        TLS_HANDSHAKE_TIMEOUT,
        crate::cluster::peer::read_preamble(&mut recv),
    )
    .await
    {
        Ok(Ok(client)) => client,
        _ => return tracing::debug!("a forwarded connection without a valid preamble"),
    };
    // The browser counts against its address's caps here too: the relay that serves it
    // holds its connection as long as the one that took it.
    match shared.client_caps.admit(client.ip()) {
        Ok(permit) => {
            serve_tls(
                tokio::io::join(recv, send),
                client,
                permit,
                acceptor,
                shared,
            )
            .await
        }
        Err(over) => shared.metrics.count_client_refused(over),
    }
}

/// Largest ClientHello read before deciding where a connection goes (a post-quantum key
/// share makes them ~1.8 KiB; 16 KiB is TLS's own record limit).
const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// A ClientHello as read off the wire, and the server name it asks for.
struct ClientHello {
    bytes: Vec<u8>,
    server_name: Option<String>,
}

/// Reads until rustls has a whole ClientHello (its bytes are kept, to be replayed to
/// whoever terminates TLS).
async fn read_client_hello(tcp: &mut TcpStream) -> std::io::Result<ClientHello> {
    use tokio::io::AsyncReadExt;
    let mut acceptor = rustls::server::Acceptor::default();
    let mut bytes = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    loop {
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        bytes.extend_from_slice(&chunk[..n]);
        acceptor.read_tls(&mut &chunk[..n])?;
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let server_name = accepted.client_hello().server_name().map(str::to_owned);
                return Ok(ClientHello { bytes, server_name });
            }
            Ok(None) if bytes.len() < MAX_CLIENT_HELLO => {}
            Ok(None) => return Err(std::io::Error::other("ClientHello too large")),
            // Not TLS, or broken: the normal handshake gives the same error its usual way.
            Err(_) => {
                return Ok(ClientHello {
                    bytes,
                    server_name: None,
                })
            }
        }
    }
}

/// A stream whose first bytes were already read: they are read again first.
struct Rewind<S> {
    prefix: Vec<u8>,
    offset: usize,
    inner: S,
}

impl<S> Rewind<S> {
    fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            offset: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.offset < this.prefix.len() {
            let rest = &this.prefix[this.offset..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.offset += n;
            if this.offset == this.prefix.len() {
                this.prefix = Vec::new();
                this.offset = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Serves plain HTTP on `listener` (behind a TLS-terminating load balancer).
pub(crate) async fn serve_http(listener: TcpListener, core: usize, shared: Arc<Shared>) {
    let accepting = shared.clone();
    accept_loop(listener, core, accepting, move |tcp, peer, permit| {
        serve_connection(tcp, peer, shared.clone(), permit)
    })
    .await
}

/// Accepts connections on `core`'s listener; one over a cap is closed at once, before
/// any TLS work.
async fn accept_loop<F, Fut>(listener: TcpListener, core: usize, shared: Arc<Shared>, serve: F)
where
    F: Fn(TcpStream, SocketAddr, ClientPermit) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut backoff = AcceptBackoff::new("front door");
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                backoff.succeeded();
                shared.core_load.client_accepted(core);
                match shared.client_caps.admit(peer.ip()) {
                    Ok(permit) => {
                        let _ = tcp.set_nodelay(true);
                        tokio::spawn(serve(tcp, peer, permit));
                    }
                    Err(over) => {
                        shared.metrics.count_client_refused(over);
                        tracing::debug!(%peer, "client connection over the cap ({over:?}): closed");
                    }
                }
            }
            Err(e) => backoff.failed(&e).await,
        }
    }
}

/// What a connection is doing, for its idle timer: requests in flight (from arrival to
/// the end of the response body) and when the last one ended.
struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    /// Requests seen so far (only whether it is zero matters).
    seen: AtomicUsize,
    /// When the last request ended, in milliseconds since `opened`.
    last_end_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            seen: AtomicUsize::new(0),
            last_end_ms: AtomicU64::new(0),
        }
    }

    /// When the connection counts as idle for `idle`, if nothing is in flight now.
    fn idle_at(&self, idle: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last_end = Duration::from_millis(self.last_end_ms.load(Ordering::Relaxed));
        Some(self.opened + last_end + idle)
    }
}

/// One request in flight on its connection: from its arrival until its response body
/// ends or is dropped (a long download or a pending answer keeps the connection busy).
struct ActiveRequest(Arc<Activity>);

impl ActiveRequest {
    fn enter(activity: &Arc<Activity>) -> Self {
        activity.seen.fetch_add(1, Ordering::Relaxed);
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(activity.clone())
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        let ms = self.0.opened.elapsed().as_millis();
        self.0
            .last_end_ms
            .fetch_max(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as in flight until it ends.
struct TrackedBody {
    inner: RelayBody,
    active: Option<ActiveRequest>,
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if frame.is_none() {
            this.active = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

async fn serve_connection<I>(io: I, peer: SocketAddr, shared: Arc<Shared>, _permit: ClientPermit)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _open = shared.metrics.client_connections.enter();
    let config = &shared.config;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(config.header_read_timeout_secs))
        .max_buf_size(config.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(config.max_header_bytes as u32)
        .keep_alive_interval(H2_KEEP_ALIVE)
        .max_concurrent_streams(256);
    let activity = Arc::new(Activity::new());
    let service = {
        let shared = shared.clone();
        let activity = activity.clone();
        let client = crate::forward::Client::new(peer);
        service_fn(move |req| {
            let active = ActiveRequest::enter(&activity);
            // Routed before the future is made, so the future stays small (see `Routed`).
            let routed = crate::forward::route(&shared, req, &client);
            let answer = crate::forward::answer(shared.clone(), routed);
            async move {
                let response = answer.await?;
                Ok::<_, Infallible>(response.map(|inner| TrackedBody {
                    inner,
                    active: Some(active),
                }))
            }
        })
    };
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);
    let first_request_within = Duration::from_secs(config.header_read_timeout_secs);
    let idle = Duration::from_secs(config.client_idle_timeout_secs);
    let result = tokio::select! {
        result = &mut connection => result,
        quiet = quiet(&activity, first_request_within, idle) => match quiet {
            Quiet::NoRequest => {
                tracing::debug!(%peer, "no complete request within the header timeout: closing");
                return;
            }
            Quiet::Idle => {
                tracing::debug!(%peer, "client connection idle: closing");
                shared.metrics.client_connections_idle_closed.fetch_add(1, Ordering::Relaxed);
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        },
    };
    if let Err(e) = result {
        tracing::debug!(%peer, "client connection ended: {e}");
    }
}

/// Why a client connection is closed by the relay.
enum Quiet {
    /// No complete request head within the header timeout.
    NoRequest,
    /// No request in flight for the idle timeout.
    Idle,
}

/// Resolves when the connection should be closed:
/// * hyper's header timer starts only once a request begins (and HTTP/2 has none), so a
///   connection must deliver its first complete request head within
///   `first_request_within` (silent clients, half prefaces, never-ending header blocks);
/// * hyper's HTTP/2 server has no idle timeout (its HTTP/1.1 header timer also runs
///   between keep-alive requests), so a connection with nothing in flight for `idle` is
///   closed gracefully (HTTP/2 `GOAWAY`).
///
/// Wakes at most once per `idle` while requests flow.
async fn quiet(activity: &Activity, first_request_within: Duration, idle: Duration) -> Quiet {
    let no_request_by = activity.opened + first_request_within;
    loop {
        let now = Instant::now();
        let wake = if activity.seen.load(Ordering::Relaxed) == 0 {
            if now >= no_request_by {
                return Quiet::NoRequest;
            }
            // Also wake early enough to catch a first request that came and went.
            no_request_by.min(now + idle)
        } else {
            match activity.idle_at(idle) {
                Some(at) if at <= now => return Quiet::Idle,
                Some(at) => at,
                None => now + idle,
            }
        };
        tokio::time::sleep_until(wake.into()).await;
    }
}
