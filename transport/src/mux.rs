//! The TCP transport: a yamux multiplexer on one TLS 1.3/TCP connection.
//!
//! yamux (libp2p's, the well-kept Rust implementation) lets either end open streams, as
//! QUIC does, and gives each stream its own flow-control window, so a slow reader on one
//! stream back-pressures only that stream. A yamux `Connection` must be polled by one task
//! for anything to move (inbound frames, window updates, outbound opens), so a driver task
//! owns it; [`MuxConnection`] is a cheap handle that talks to that task over channels.
//!
//! yamux's `GoAway` carries no application code, but jobgate's closes mean something
//! (`Revoked`: stop; `Draining`: come back at once; `Normal`: the job is over). So the
//! dialing end opens one stream of its own first (yamux stream id 1, never handed to the
//! code above), and a close writes a small record on it — code and reason — before the
//! `GoAway`; the peer reads it and reports [`MuxError::ApplicationClosed`], as quinn
//! reports `ApplicationClosed`. yamux flushes stream data before its `GoAway`, so the
//! record always arrives first.
//!
//! TCP alone notices a dead peer late or never (a silent network, a proxy that keeps its
//! half open), so each end also writes a one-byte heartbeat on that stream every
//! [`MuxSettings::keep_alive`], and a connection that received nothing for
//! [`MuxSettings::idle_timeout`] ends with [`MuxError::TimedOut`] — QUIC's keep-alive and idle
//! timeout, on TCP.

use crate::split::{MuxRecv, MuxSend, StreamSlot};
use futures_util::future::poll_fn;
// yamux streams are futures-io readers/writers (the driver polls its own stream directly).
use futures_util::io::{AsyncRead as _, AsyncWrite as _};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot, watch, Mutex};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

/// A yamux stream as a tokio reader/writer.
pub(crate) type MuxStream = Compat<yamux::Stream>;

/// Inbound streams queued for `accept_bi` before further ones are refused (reset). The
/// driver must keep polling the connection, so it cannot wait for a slow acceptor; a
/// bounded queue keeps a flooding peer from growing memory (yamux #144).
pub const ACCEPT_QUEUE: usize = 256;

/// Streams the peer may have open at once; the relay opens one per browser request.
pub const MAX_STREAMS: usize = 1024;

/// Room above [`MuxSettings::max_streams`] in yamux's own stream limit (see `new`).
const STREAM_SLACK: usize = 32;

/// yamux's initial (and smallest) per-stream window.
const YAMUX_DEFAULT_WINDOW: usize = 256 * 1024;

/// The yamux id of the transport's own stream (the dialing end's first; yamux gives
/// clients odd ids from 1).
const CLOSE_STREAM_ID: u32 = 1;
/// First byte the dialing end writes on that stream, so that yamux sends its `SYN` at once.
const CLOSE_STREAM_GREETING: u8 = 0;
/// A heartbeat byte on that stream (see [`MuxSettings`]).
const HEARTBEAT: u8 = 2;
/// Tag of a close record: then the code (u32, big-endian), the reason's length (u16) and
/// the reason.
const CLOSE_RECORD_TAG: u8 = 1;
/// Longest close reason carried (longer ones are cut).
const MAX_CLOSE_REASON: usize = 256;
/// Longest close record.
const MAX_CLOSE_RECORD: usize = 1 + 4 + 2 + MAX_CLOSE_REASON;

/// How a connection notices that its peer is gone, and how much it may be made to buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MuxSettings {
    /// How often this end sends a heartbeat.
    pub keep_alive: Duration,
    /// Silence (nothing received) after which the connection counts as dead.
    pub idle_timeout: Duration,
    /// Streams open at once (both directions); an open beyond fails with
    /// [`MuxError::TooManyStreams`] and the connection lives on. Each stream may hold
    /// 256 KiB unread (yamux's fixed initial window), so this also bounds what the peer
    /// can make this end buffer: (`max_streams` + 32) × 256 KiB in all.
    pub max_streams: usize,
}

impl Default for MuxSettings {
    /// 2 s heartbeats, 30 s of silence (the agent's QUIC defaults), [`MAX_STREAMS`].
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(30),
            max_streams: MAX_STREAMS,
        }
    }
}

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
    /// The peer closed the connection with this jobgate close code and reason.
    #[error("closed by peer (code {code}: {reason})")]
    ApplicationClosed {
        /// The peer's jobgate close code.
        code: u32,
        /// The peer's reason, lossily decoded.
        reason: String,
    },
    /// The peer closed the connection without a code, or the TCP connection ended.
    #[error("connection closed by peer")]
    Closed,
    /// yamux or the socket failed.
    #[error("connection failed: {0}")]
    Failed(String),
    /// As many streams as allowed are open; the connection lives on.
    #[error("{max} streams open already")]
    TooManyStreams {
        /// The cap.
        max: usize,
    },
    /// Nothing arrived from the peer for the idle timeout.
    #[error("timed out: nothing from the peer for {seconds} s")]
    TimedOut {
        /// The idle timeout.
        seconds: u64,
    },
}

/// The close code recorded when the connection closes because every handle was dropped.
const DROPPED: u32 = 0;

type OpenReply = oneshot::Sender<Result<yamux::Stream, MuxError>>;

struct Inner {
    open: mpsc::Sender<OpenReply>,
    inbound: Mutex<mpsc::Receiver<(yamux::Stream, StreamSlot)>>,
    /// Streams open now, both directions (see [`MuxSettings::max_streams`]).
    open_streams: Arc<AtomicUsize>,
    max_streams: usize,
    close: mpsc::Sender<(u32, Vec<u8>)>,
    ended: watch::Receiver<Option<MuxError>>,
    remote: SocketAddr,
    bytes: Arc<ByteCounts>,
}

/// Bytes through the TLS connection (TLS records included), for the audit log.
#[derive(Default)]
struct ByteCounts {
    received: AtomicU64,
    sent: AtomicU64,
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
    /// Starts the multiplexer on an established (TLS) byte stream and spawns its driver,
    /// with the default [`MuxSettings`]. `remote` is the peer address to report.
    pub fn new<T>(io: T, role: Role, remote: SocketAddr) -> Self
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        Self::with_settings(io, role, remote, MuxSettings::default())
    }

    /// [`MuxConnection::new`] with heartbeats and idle timeout of `settings`.
    pub fn with_settings<T>(io: T, role: Role, remote: SocketAddr, settings: MuxSettings) -> Self
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut config = yamux::Config::default();
        let max_streams = settings.max_streams.max(1);
        // yamux ends the whole connection when an open goes over its own limit, so ours
        // is checked first and yamux's sits above it: streams just dropped, whose end
        // yamux has not processed yet, and the transport's own stream fit in between.
        let yamux_streams = max_streams + STREAM_SLACK;
        config.set_max_num_streams(yamux_streams);
        config.set_max_connection_receive_window(Some(yamux_streams * YAMUX_DEFAULT_WINDOW));
        let open_streams = Arc::new(AtomicUsize::new(0));
        let mode = match role {
            Role::Client => yamux::Mode::Client,
            Role::Server => yamux::Mode::Server,
        };
        let bytes = Arc::new(ByteCounts::default());
        let outgoing = Arc::new(std::sync::Mutex::new(Outgoing {
            io,
            held: Vec::with_capacity(COALESCE_LIMIT),
        }));
        let coalesced = Coalesced {
            outgoing: outgoing.clone(),
            bytes: bytes.clone(),
        };
        let connection = yamux::Connection::new(coalesced.compat(), config, mode);
        let (open_tx, open_rx) = mpsc::channel(16);
        let (inbound_tx, inbound_rx) = mpsc::channel(ACCEPT_QUEUE);
        let (close_tx, close_rx) = mpsc::channel(1);
        let (ended_tx, ended_rx) = watch::channel(None);
        let mut heartbeat = tokio::time::interval(settings.keep_alive);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let driver = Driver {
            connection,
            outgoing,
            role,
            heartbeat,
            heartbeat_due: false,
            idle_timeout: settings.idle_timeout,
            bytes: bytes.clone(),
            last_received: 0,
            last_heard: Instant::now(),
            open_rx,
            inbound_tx,
            open_streams: open_streams.clone(),
            close_rx,
            close_stream: None,
            greeting_due: false,
            close_stream_failed: false,
            received_close: Vec::new(),
        };
        tokio::spawn(async move {
            let why = driver.run().await;
            tracing::debug!(%why, "tcp transport ended");
            let _ = ended_tx.send(Some(why));
        });
        MuxConnection {
            inner: Arc::new(Inner {
                open: open_tx,
                inbound: Mutex::new(inbound_rx),
                open_streams,
                max_streams,
                close: close_tx,
                ended: ended_rx,
                remote,
                bytes,
            }),
        }
    }

    /// Opens a stream.
    pub(crate) async fn open_bi(&self) -> Result<(MuxSend, MuxRecv), MuxError> {
        let slot = StreamSlot::take(&self.inner.open_streams);
        if self.inner.open_streams.load(Ordering::Acquire) > self.inner.max_streams {
            return Err(MuxError::TooManyStreams {
                max: self.inner.max_streams,
            });
        }
        let (reply, answer) = oneshot::channel();
        if self.inner.open.send(reply).await.is_err() {
            return Err(self.ended_reason());
        }
        let stream = answer.await.map_err(|_| self.ended_reason())??;
        Ok(split(stream, slot))
    }

    /// Waits for the peer's next stream.
    pub(crate) async fn accept_bi(&self) -> Result<(MuxSend, MuxRecv), MuxError> {
        let stream = self.inner.inbound.lock().await.recv().await;
        stream
            .map(|(stream, slot)| split(stream, slot))
            .ok_or_else(|| self.ended_reason())
    }

    /// Closes the connection (all streams end); the peer sees
    /// [`MuxError::ApplicationClosed`] with `code` and `reason` (cut to 256 bytes).
    pub fn close(&self, code: u32, reason: &[u8]) {
        let reason = reason[..reason.len().min(MAX_CLOSE_REASON)].to_vec();
        let _ = self.inner.close.try_send((code, reason));
    }

    /// Why the connection ended, if it has.
    pub fn close_reason(&self) -> Option<MuxError> {
        self.inner.ended.borrow().clone()
    }

    /// Bytes received and sent on the TLS connection so far.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.inner.bytes.received.load(Ordering::Relaxed),
            self.inner.bytes.sent.load(Ordering::Relaxed),
        )
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

fn split(stream: yamux::Stream, slot: StreamSlot) -> (MuxSend, MuxRecv) {
    crate::split::split(stream.compat(), slot)
}

/// Owns the yamux connection: serves open requests, queues inbound streams, carries
/// close records, closes on request.
struct Driver<T> {
    connection: yamux::Connection<T>,
    /// Where the frames of a round wait (see [`Coalesced`]).
    outgoing: Arc<dyn RoundFlush>,
    role: Role,
    heartbeat: Interval,
    /// A heartbeat is to be written.
    heartbeat_due: bool,
    idle_timeout: Duration,
    bytes: Arc<ByteCounts>,
    /// Bytes received at the last heartbeat tick, and when that count last moved.
    last_received: u64,
    last_heard: Instant,
    open_rx: mpsc::Receiver<OpenReply>,
    inbound_tx: mpsc::Sender<(yamux::Stream, StreamSlot)>,
    open_streams: Arc<AtomicUsize>,
    close_rx: mpsc::Receiver<(u32, Vec<u8>)>,
    /// The transport's own stream (see the module docs), once open.
    close_stream: Option<yamux::Stream>,
    /// The dialing end still has to write its greeting.
    greeting_due: bool,
    /// The dialing end could not open its stream: closes go without a record.
    close_stream_failed: bool,
    /// Bytes read from the peer on the transport's stream (at most one record).
    received_close: Vec<u8>,
}

impl<T> Driver<T>
where
    T: futures_util::AsyncRead + futures_util::AsyncWrite + Unpin,
{
    /// Runs until the connection ends; returns why.
    async fn run(mut self) -> MuxError {
        let mut waiting_open: Option<OpenReply> = None;
        let mut closing: Option<(u32, Vec<u8>, usize)> = None;
        poll_fn(|cx| {
            let round = self.round(cx, &mut waiting_open, &mut closing);
            if round.is_pending() {
                // Nothing more to do now: what this round wrote leaves in one go.
                if let Poll::Ready(Err(e)) = self.outgoing.poll_flush_round(cx) {
                    return Poll::Ready(MuxError::Failed(e.to_string()));
                }
            }
            round
        })
        .await
    }

    /// One round of work: runs until nothing is ready (`Pending`) or the connection ended.
    fn round(
        &mut self,
        cx: &mut Context<'_>,
        waiting_open: &mut Option<OpenReply>,
        closing: &mut Option<(u32, Vec<u8>, usize)>,
    ) -> Poll<MuxError> {
        loop {
            if let Some((code, record, written)) = closing.as_mut() {
                // Our record first (best effort), then yamux's close, which flushes it.
                if let Some(stream) = self.close_stream.as_mut() {
                    while *written < record.len() {
                        match Pin::new(&mut *stream).poll_write(cx, &record[*written..]) {
                            Poll::Ready(Ok(n)) if n > 0 => *written += n,
                            Poll::Ready(_) => *written = record.len(),
                            Poll::Pending => return Poll::Pending,
                        }
                    }
                }
                return match self.connection.poll_close(cx) {
                    Poll::Ready(_) => Poll::Ready(MuxError::LocallyClosed { code: *code }),
                    Poll::Pending => Poll::Pending,
                };
            }
            if let Poll::Ready(Some((code, reason))) = self.close_rx.poll_recv(cx) {
                *closing = Some((code, close_record(code, &reason), 0));
                continue;
            }
            if self.role == Role::Client && self.close_stream.is_none() && !self.close_stream_failed
            {
                match self.connection.poll_new_outbound(cx) {
                    Poll::Ready(Ok(stream)) => {
                        self.close_stream = Some(stream);
                        self.greeting_due = true;
                    }
                    Poll::Ready(Err(_)) => self.close_stream_failed = true,
                    Poll::Pending => {}
                }
            }
            if self.greeting_due {
                if let Some(stream) = self.close_stream.as_mut() {
                    match Pin::new(stream).poll_write(cx, &[CLOSE_STREAM_GREETING]) {
                        Poll::Ready(_) => self.greeting_due = false,
                        Poll::Pending => {}
                    }
                }
            }
            if self.heartbeat.poll_tick(cx).is_ready() {
                let received = self.bytes.received.load(Ordering::Relaxed);
                let now = Instant::now();
                if received != self.last_received {
                    self.last_received = received;
                    self.last_heard = now;
                } else if now.duration_since(self.last_heard) >= self.idle_timeout {
                    return Poll::Ready(MuxError::TimedOut {
                        seconds: self.idle_timeout.as_secs(),
                    });
                }
                self.heartbeat_due = true;
            }
            if self.heartbeat_due && !self.greeting_due {
                if let Some(stream) = self.close_stream.as_mut() {
                    if Pin::new(stream).poll_write(cx, &[HEARTBEAT]).is_ready() {
                        self.heartbeat_due = false;
                    }
                }
            }
            self.read_close_record(cx);
            if waiting_open.is_none() {
                match self.open_rx.poll_recv(cx) {
                    Poll::Ready(Some(reply)) => *waiting_open = Some(reply),
                    // Every handle is gone: nobody can use the connection any more.
                    Poll::Ready(None) => {
                        *closing = Some((DROPPED, close_record(DROPPED, b""), 0));
                        continue;
                    }
                    Poll::Pending => {}
                }
            }
            // The dialing end's own stream must get id 1: user streams wait for it.
            let own_stream_first = self.role == Role::Server
                || self.close_stream.is_some()
                || self.close_stream_failed;
            if waiting_open.is_some() && own_stream_first {
                if let Poll::Ready(opened) = self.connection.poll_new_outbound(cx) {
                    let opened = opened.map_err(|e| MuxError::Failed(e.to_string()));
                    if let Some(reply) = waiting_open.take() {
                        let _ = reply.send(opened);
                    }
                    continue;
                }
            }
            match self.connection.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(stream))) => {
                    if self.role == Role::Server
                        && self.close_stream.is_none()
                        && stream.id().val() == CLOSE_STREAM_ID
                    {
                        self.close_stream = Some(stream);
                        continue;
                    }
                    // Dropping a refused stream resets it: the peer sees the open fail.
                    let slot = StreamSlot::take(&self.open_streams);
                    if self.inbound_tx.try_send((stream, slot)).is_err() {
                        tracing::warn!("tcp transport: accept queue full, stream refused");
                    }
                }
                Poll::Ready(Some(Err(yamux::ConnectionError::Closed))) | Poll::Ready(None) => {
                    return Poll::Ready(self.peer_closed(cx))
                }
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(match self.peer_closed(cx) {
                        MuxError::Closed => MuxError::Failed(e.to_string()),
                        closed => closed,
                    })
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Reads what the peer wrote on the transport's stream so far (a greeting, then at
    /// most one close record).
    fn read_close_record(&mut self, cx: &mut Context<'_>) {
        let Some(stream) = self.close_stream.as_mut() else {
            return;
        };
        let mut buf = [0u8; MAX_CLOSE_RECORD];
        loop {
            match Pin::new(&mut *stream).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    let mut read = &buf[..n];
                    // Greeting and heartbeats come before a record: drop them.
                    if self.received_close.is_empty() {
                        let start = read
                            .iter()
                            .position(|b| *b != CLOSE_STREAM_GREETING && *b != HEARTBEAT)
                            .unwrap_or(read.len());
                        read = &read[start..];
                    }
                    let room = MAX_CLOSE_RECORD.saturating_sub(self.received_close.len());
                    self.received_close
                        .extend_from_slice(&read[..read.len().min(room)]);
                }
                Poll::Ready(_) | Poll::Pending => return,
            }
        }
    }

    /// Why the connection ended on the peer's side: its close record if it sent one.
    fn peer_closed(&mut self, cx: &mut Context<'_>) -> MuxError {
        // The record may sit in the stream's buffer, read with the connection's end.
        self.read_close_record(cx);
        parse_close_record(&self.received_close).unwrap_or(MuxError::Closed)
    }
}

/// The bytes of a close record.
fn close_record(code: u32, reason: &[u8]) -> Vec<u8> {
    let reason = &reason[..reason.len().min(MAX_CLOSE_REASON)];
    let mut record = Vec::with_capacity(7 + reason.len());
    record.push(CLOSE_RECORD_TAG);
    record.extend_from_slice(&code.to_be_bytes());
    record.extend_from_slice(&(reason.len() as u16).to_be_bytes());
    record.extend_from_slice(reason);
    record
}

/// The close record in what the peer wrote on the transport's stream, if complete.
fn parse_close_record(bytes: &[u8]) -> Option<MuxError> {
    let start = bytes
        .iter()
        .position(|b| *b != CLOSE_STREAM_GREETING && *b != HEARTBEAT)?;
    let record = &bytes[start..];
    if record.first() != Some(&CLOSE_RECORD_TAG) || record.len() < 7 {
        return None;
    }
    let code = u32::from_be_bytes([record[1], record[2], record[3], record[4]]);
    let len = usize::from(u16::from_be_bytes([record[5], record[6]]));
    let reason = record.get(7..7 + len.min(MAX_CLOSE_REASON))?;
    Some(MuxError::ApplicationClosed {
        code,
        reason: String::from_utf8_lossy(reason).into_owned(),
    })
}

/// Most bytes of frames held back within one driver round before they are written.
const COALESCE_LIMIT: usize = 64 * 1024;

/// What the driver flushes at the end of each round.
trait RoundFlush: Send + Sync {
    /// Writes the frames held back this round and flushes the TLS connection.
    fn poll_flush_round(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>>;
}

/// The TLS connection and the frames held back for it.
struct Outgoing<T> {
    io: T,
    held: Vec<u8>,
}

impl<T: AsyncWrite + Unpin> Outgoing<T> {
    /// Writes every held byte, then flushes.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while !self.held.is_empty() {
            match Pin::new(&mut self.io).poll_write(cx, &self.held) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => {
                    self.held.drain(..n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }
}

fn poisoned() -> std::io::Error {
    std::io::Error::other("tcp transport: connection lock poisoned")
}

impl<T: AsyncWrite + Unpin + Send> RoundFlush for std::sync::Mutex<Outgoing<T>> {
    fn poll_flush_round(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.lock() {
            Ok(mut outgoing) => outgoing.poll_drain(cx),
            Err(_) => Poll::Ready(Err(poisoned())),
        }
    }
}

/// The TLS connection under yamux. It counts bytes, and holds back yamux's frames until the
/// driver has nothing more to do this round: yamux writes and flushes every frame on its
/// own (a stream's open, its head, its FIN, window updates), which on TLS costs a record
/// and a syscall each; held back, one round's frames leave in one write. Only the driver
/// task touches it, so the lock is never contended.
struct Coalesced<T> {
    outgoing: Arc<std::sync::Mutex<Outgoing<T>>>,
    bytes: Arc<ByteCounts>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesced<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let Ok(mut outgoing) = self.outgoing.lock() else {
            return Poll::Ready(Err(poisoned()));
        };
        let before = buf.filled().len();
        let polled = Pin::new(&mut outgoing.io).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        self.bytes
            .received
            .fetch_add(read as u64, Ordering::Relaxed);
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesced<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let Ok(mut outgoing) = self.outgoing.lock() else {
            return Poll::Ready(Err(poisoned()));
        };
        // Back-pressure: past the limit, what is held must leave first.
        if !outgoing.held.is_empty() && outgoing.held.len() + buf.len() > COALESCE_LIMIT {
            std::task::ready!(outgoing.poll_drain(cx))?;
        }
        outgoing.held.extend_from_slice(buf);
        self.bytes
            .sent
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Poll::Ready(Ok(buf.len()))
    }

    /// Deferred to the end of the driver's round ([`RoundFlush`]).
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let Ok(mut outgoing) = self.outgoing.lock() else {
            return Poll::Ready(Err(poisoned()));
        };
        std::task::ready!(outgoing.poll_drain(cx))?;
        Pin::new(&mut outgoing.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_records_round_trip_and_cut_long_reasons() {
        let mut bytes = vec![CLOSE_STREAM_GREETING];
        bytes.extend(close_record(7, b"revoked"));
        assert_eq!(
            parse_close_record(&bytes),
            Some(MuxError::ApplicationClosed {
                code: 7,
                reason: "revoked".into()
            })
        );
        let long = close_record(1, &[b'x'; 1000]);
        assert_eq!(long.len(), MAX_CLOSE_RECORD);
        assert!(parse_close_record(&long[..long.len() - 1]).is_none());
        assert!(parse_close_record(&[CLOSE_STREAM_GREETING]).is_none());
        assert!(parse_close_record(&[9, 9, 9, 9, 9, 9, 9, 9]).is_none());
    }
}
