//! Splitting a yamux stream into halves that different tasks may poll.
//!
//! A yamux stream's reads and writes both go through one channel sender, which remembers
//! only the last task that waited on it. With `tokio::io::split`, a reader task's poll
//! overwrote the writer task's waker and the writer slept forever (a 16 MiB echo stalled).
//! Here each half polls the stream with a waker that wakes both halves' tasks: a spurious
//! wakeup at worst, never a lost one.

use futures_util::task::{waker, ArcWake};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::mux::MuxStream;

#[derive(Default)]
struct Waiters {
    read: Mutex<Option<Waker>>,
    write: Mutex<Option<Waker>>,
}

impl ArcWake for Waiters {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        for slot in [&arc_self.read, &arc_self.write] {
            let waiter = slot.lock().map(|mut w| w.take()).unwrap_or(None);
            if let Some(w) = waiter {
                w.wake();
            }
        }
    }
}

/// Counts one open stream of its connection until dropped (with the stream's last half).
pub(crate) struct StreamSlot(pub(crate) Arc<std::sync::atomic::AtomicUsize>);

impl StreamSlot {
    /// Counts one more stream on `open`.
    pub(crate) fn take(open: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        open.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self(open.clone())
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

struct Shared {
    /// Dropped after the stream (fields drop in order): the count falls once yamux
    /// has been told.
    stream: Mutex<MuxStream>,
    _slot: StreamSlot,
    waiters: Arc<Waiters>,
    both: Waker,
}

/// The reading half of a yamux stream.
pub struct MuxRecv(Arc<Shared>);

/// The writing half of a yamux stream.
pub struct MuxSend(Arc<Shared>);

impl std::fmt::Debug for MuxRecv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MuxRecv")
    }
}

impl std::fmt::Debug for MuxSend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MuxSend")
    }
}

/// Splits a stream into halves; the stream ends (reset unless closed) when both drop.
pub(crate) fn split(stream: MuxStream, slot: StreamSlot) -> (MuxSend, MuxRecv) {
    let waiters = Arc::new(Waiters::default());
    let shared = Arc::new(Shared {
        stream: Mutex::new(stream),
        _slot: slot,
        both: waker(waiters.clone()),
        waiters,
    });
    (MuxSend(shared.clone()), MuxRecv(shared))
}

fn poisoned() -> io::Error {
    io::Error::other("tcp transport stream lock poisoned")
}

impl Shared {
    /// Registers the caller in `slot`, then polls the stream with the waker of both halves.
    fn poll<T>(
        &self,
        slot: &Mutex<Option<Waker>>,
        cx: &mut Context<'_>,
        f: impl FnOnce(Pin<&mut MuxStream>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match slot.lock() {
            Ok(mut w) => *w = Some(cx.waker().clone()),
            Err(_) => return Poll::Ready(Err(poisoned())),
        }
        let mut stream = match self.stream.lock() {
            Ok(s) => s,
            Err(_) => return Poll::Ready(Err(poisoned())),
        };
        let mut both = Context::from_waker(&self.both);
        f(Pin::new(&mut *stream), &mut both)
    }
}

impl MuxRecv {
    /// Reads into `dst`, which is already initialised. tokio's `AsyncRead` goes through
    /// `Compat`, which zeroes all of a fresh `ReadBuf`'s room before every read (yamux
    /// reads into `&mut [u8]`); a caller that keeps a zeroed buffer across reads (the
    /// chunked reads of [`RecvStream`](crate::RecvStream)) pays that once per buffer.
    pub(crate) fn poll_read_slice(
        &self,
        cx: &mut Context<'_>,
        dst: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let shared = &self.0;
        shared.poll(&shared.waiters.read, cx, |s, c| {
            futures_util::io::AsyncRead::poll_read(Pin::new(Pin::into_inner(s).get_mut()), c, dst)
        })
    }
}

impl AsyncRead for MuxRecv {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let shared = &self.0;
        shared.poll(&shared.waiters.read, cx, |s, c| s.poll_read(c, buf))
    }
}

impl AsyncWrite for MuxSend {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let shared = &self.0;
        shared.poll(&shared.waiters.write, cx, |s, c| s.poll_write(c, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let shared = &self.0;
        shared.poll(&shared.waiters.write, cx, |s, c| s.poll_flush(c))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let shared = &self.0;
        shared.poll(&shared.waiters.write, cx, |s, c| s.poll_shutdown(c))
    }
}
