//! The one response body type of the front door: a small page, or a QUIC stream.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use jobgate_transport::body::StreamBody;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A response body: no boxing, no copying.
pub enum RelayBody {
    /// A complete small body (error pages, redirects); `None` once sent.
    Full(Option<Bytes>),
    /// The app's response body, streamed from the agent.
    Stream(StreamBody),
}

impl RelayBody {
    /// An empty body.
    pub fn empty() -> Self {
        Self::Full(None)
    }
}

impl Body for RelayBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            Self::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Self::Stream(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(data) => data.is_none(),
            Self::Stream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(Some(d)) => SizeHint::with_exact(d.len() as u64),
            Self::Full(None) => SizeHint::with_exact(0),
            Self::Stream(body) => body.size_hint(),
        }
    }
}
