//! The front door: accept TCP, terminate TLS (ALPN h2 / http/1.1), and serve each
//! connection with hyper, every request going to [`crate::forward`].

use crate::Shared;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// Pause after an accept error (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// Interval of HTTP/2 keep-alive pings to idle clients.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(30);

/// Serves HTTPS on `listener` until the task is aborted.
pub(crate) async fn serve_https(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    shared: Arc<Shared>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let handshake_timeout = Duration::from_secs(crate::config::DEFAULT_TLS_HANDSHAKE_TIMEOUT_SECS);
    accept_loop(listener, move |tcp, peer| {
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        async move {
            match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => serve_connection(tls, peer, shared).await,
                Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        }
    })
    .await
}

/// Serves plain HTTP on `listener` (behind a TLS-terminating load balancer).
pub(crate) async fn serve_http(listener: TcpListener, shared: Arc<Shared>) {
    accept_loop(listener, move |tcp, peer| {
        serve_connection(tcp, peer, shared.clone())
    })
    .await
}

async fn accept_loop<F, Fut>(listener: TcpListener, serve: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let _ = tcp.set_nodelay(true);
                tokio::spawn(serve(tcp, peer));
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
}

async fn serve_connection<I>(io: I, peer: SocketAddr, shared: Arc<Shared>)
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
    // hyper's header timer starts only once a request begins (and HTTP/2 has none): a
    // connection must deliver its first complete request head within the same timeout,
    // or it is closed (silent clients, half prefaces, never-ending header blocks).
    let got_request = Arc::new(AtomicBool::new(false));
    let service = {
        let shared = shared.clone();
        let got_request = got_request.clone();
        service_fn(move |req| {
            got_request.store(true, Ordering::Relaxed);
            crate::forward::handle(shared.clone(), req, peer)
        })
    };
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);
    let first_request_deadline = Duration::from_secs(config.header_read_timeout_secs);
    let early = tokio::select! {
        result = &mut connection => Some(result),
        _ = tokio::time::sleep(first_request_deadline) => None,
    };
    let result = match early {
        Some(result) => result,
        None if !got_request.load(Ordering::Relaxed) => {
            tracing::debug!(%peer, "no complete request within the header timeout: closing");
            return;
        }
        None => connection.await,
    };
    if let Err(e) = result {
        tracing::debug!(%peer, "client connection ended: {e}");
    }
}
