//! The TCP transport: a yamux multiplexer on one TLS 1.3/TCP connection.
//!
//! yamux (libp2p's, the well-kept Rust implementation) lets either end open streams, as
//! QUIC does, and gives each stream its own flow-control window, so a slow reader on one
//! stream back-pressures only that stream. A yamux `Connection` must be polled by one task
//! for anything to move (inbound frames, window updates, outbound opens), so a driver task
//! owns it; [`MuxConnection`] is a cheap handle that talks to that task over channels.

use crate::split::{MuxRecv, MuxSend};
use futures_util::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, watch, Mutex};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

/// A yamux stream as a tokio reader/writer.
pub(crate) type MuxStream = Compat<yamux::Stream>;

/// Inbound streams queued for `accept_bi` before further ones are refused (reset). The
/// driver must keep polling the connection, so it cannot wait for a slow acceptor; a
/// bounded queue keeps a flooding peer from growing memory (yamux #144).
pub const ACCEPT_QUEUE: usize = 256;

/// Streams the peer may have open at once; the relay opens one per browser request.
pub const MAX_STREAMS: usize = 1024;

/// yamux's initial (and smallest) per-stream window.
const YAMUX_DEFAULT_WINDOW: usize = 256 * 1024;

/// Upper bound of all streams' receive windows together: yamux auto-tunes each stream's
/// window towards the bandwidth-delay product; this caps what a peer can make us buffer.
/// yamux requires room for every stream's initial window (it panics otherwise).
pub const MAX_CONNECTION_RECEIVE_WINDOW: usize = YAMUX_DEFAULT_WINDOW * MAX_STREAMS;

/// Which end of the TLS connection this is: yamux gives clients odd stream ids and
/// servers even ones, so the two ends must pick different roles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The end that dialed (the agent).
    Client,
    /// The end that accepted (the relay).
    Server,
}

/// Why a TCP-transport connection ended.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MuxError {
    /// This end closed it with this jobgate close code.
    #[error("closed locally (code {code})")]
    LocallyClosed {
        /// The jobgate close code given to `close`.
        code: u32,
    },
    /// The peer closed the connection or the TCP connection ended.
    #[error("connection closed by peer")]
    Closed,
    /// yamux or the socket failed.
    #[error("connection failed: {0}")]
    Failed(String),
}

/// The close code recorded when the connection closes because every handle was dropped.
const DROPPED: u32 = 0;

type OpenReply = oneshot::Sender<Result<yamux::Stream, MuxError>>;

struct Inner {
    open: mpsc::Sender<OpenReply>,
    inbound: Mutex<mpsc::Receiver<yamux::Stream>>,
    close: mpsc::Sender<u32>,
    ended: watch::Receiver<Option<MuxError>>,
    remote: SocketAddr,
}

/// A handle on a yamux connection; clones share it. As with quinn, dropping the last
/// handle closes the connection (open streams end with it).
#[derive(Clone)]
pub struct MuxConnection {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MuxConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxConnection")
            .field("remote", &self.inner.remote)
            .finish()
    }
}

impl MuxConnection {
    /// Starts the multiplexer on an established (TLS) byte stream and spawns its driver.
    /// `remote` is the peer address to report.
    pub fn new<T>(io: T, role: Role, remote: SocketAddr) -> Self
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut config = yamux::Config::default();
        config.set_max_num_streams(MAX_STREAMS);
        config.set_max_connection_receive_window(Some(MAX_CONNECTION_RECEIVE_WINDOW));
        let mode = match role {
            Role::Client => yamux::Mode::Client,
            Role::Server => yamux::Mode::Server,
        };
        let connection = yamux::Connection::new(io.compat(), config, mode);
        let (open_tx, open_rx) = mpsc::channel(16);
        let (inbound_tx, inbound_rx) = mpsc::channel(ACCEPT_QUEUE);
        let (close_tx, close_rx) = mpsc::channel(1);
        let (ended_tx, ended_rx) = watch::channel(None);
        tokio::spawn(async move {
            let why = drive(connection, open_rx, inbound_tx, close_rx).await;
            tracing::debug!(%why, "tcp transport ended");
            let _ = ended_tx.send(Some(why));
        });
        MuxConnection {
            inner: Arc::new(Inner {
                open: open_tx,
                inbound: Mutex::new(inbound_rx),
                close: close_tx,
                ended: ended_rx,
                remote,
            }),
        }
    }

    /// Opens a stream.
    pub(crate) async fn open_bi(&self) -> Result<(MuxSend, MuxRecv), MuxError> {
        let (reply, answer) = oneshot::channel();
        if self.inner.open.send(reply).await.is_err() {
            return Err(self.ended_reason());
        }
        let stream = answer.await.map_err(|_| self.ended_reason())??;
        Ok(split(stream))
    }

    /// Waits for the peer's next stream.
    pub(crate) async fn accept_bi(&self) -> Result<(MuxSend, MuxRecv), MuxError> {
        let stream = self.inner.inbound.lock().await.recv().await;
        stream.map(split).ok_or_else(|| self.ended_reason())
    }

    /// Closes the connection (all streams end); `code` is reported locally as the reason.
    /// yamux's GoAway cannot carry jobgate close codes, so the peer sees [`MuxError::Closed`].
    pub fn close(&self, code: u32, _reason: &[u8]) {
        let _ = self.inner.close.try_send(code);
    }

    /// Waits until the connection has ended.
    pub async fn closed(&self) -> MuxError {
        let mut ended = self.inner.ended.clone();
        let why = match ended.wait_for(Option::is_some).await {
            Ok(why) => why.clone().unwrap_or(MuxError::Closed),
            Err(_) => MuxError::Closed,
        };
        why
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.inner.remote
    }

    fn ended_reason(&self) -> MuxError {
        self.inner
            .ended
            .borrow()
            .clone()
            .unwrap_or(MuxError::Closed)
    }
}

fn split(stream: yamux::Stream) -> (MuxSend, MuxRecv) {
    crate::split::split(stream.compat())
}

/// Owns the yamux connection: serves open requests, queues inbound streams, closes on
/// request. Returns why the connection ended.
async fn drive<T>(
    mut connection: yamux::Connection<T>,
    mut open_rx: mpsc::Receiver<OpenReply>,
    inbound_tx: mpsc::Sender<yamux::Stream>,
    mut close_rx: mpsc::Receiver<u32>,
) -> MuxError
where
    T: futures_util::AsyncRead + futures_util::AsyncWrite + Unpin,
{
    let mut waiting_open: Option<OpenReply> = None;
    let mut closing: Option<u32> = None;
    poll_fn(|cx| loop {
        if let Some(code) = closing {
            return match connection.poll_close(cx) {
                Poll::Ready(_) => Poll::Ready(MuxError::LocallyClosed { code }),
                Poll::Pending => Poll::Pending,
            };
        }
        if let Poll::Ready(Some(code)) = close_rx.poll_recv(cx) {
            closing = Some(code);
            continue;
        }
        if waiting_open.is_none() {
            match open_rx.poll_recv(cx) {
                Poll::Ready(Some(reply)) => waiting_open = Some(reply),
                // Every handle is gone: nobody can use the connection any more.
                Poll::Ready(None) => {
                    closing = Some(DROPPED);
                    continue;
                }
                Poll::Pending => {}
            }
        }
        if waiting_open.is_some() {
            if let Poll::Ready(opened) = connection.poll_new_outbound(cx) {
                let opened = opened.map_err(|e| MuxError::Failed(e.to_string()));
                if let Some(reply) = waiting_open.take() {
                    let _ = reply.send(opened);
                }
                continue;
            }
        }
        match connection.poll_next_inbound(cx) {
            Poll::Ready(Some(Ok(stream))) => {
                // Dropping a refused stream resets it: the peer sees the open fail.
                if inbound_tx.try_send(stream).is_err() {
                    tracing::warn!("tcp transport: accept queue full, stream refused");
                }
            }
            Poll::Ready(Some(Err(yamux::ConnectionError::Closed))) | Poll::Ready(None) => {
                return Poll::Ready(MuxError::Closed)
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(MuxError::Failed(e.to_string())),
            Poll::Pending => return Poll::Pending,
        }
    })
    .await
}
