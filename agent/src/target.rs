//! The local app the agent forwards to, and a keep-alive pool of HTTP/1.1 connections
//! to it (TCP on loopback, or a unix socket).

use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use jobgate_transport::body::StreamBody;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Mutex;
use thiserror::Error;
use tokio::net::{TcpStream, UnixStream};

/// Idle connections kept per target: enough for the requests the relay has in flight under
/// load (each costs an fd and a few KiB; 64 made the agent reconnect per request).
const MAX_IDLE_CONNECTIONS: usize = 1024;

/// Where the app listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A TCP address, normally on loopback.
    Tcp(SocketAddr),
    /// A unix socket path.
    Unix(PathBuf),
}

/// A `--to` value that is neither `HOST:PORT` nor `unix:/path`.
#[derive(Debug, Error)]
#[error("invalid target {0:?}: expected 127.0.0.1:PORT, localhost:PORT or unix:/path/to/socket")]
pub struct TargetParseError(String);

impl FromStr for Target {
    type Err = TargetParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(TargetParseError(s.to_owned()));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if let Some(port) = s.strip_prefix("localhost:") {
            let port = port.parse().map_err(|_| TargetParseError(s.to_owned()))?;
            return Ok(Self::Tcp(SocketAddr::from(([127, 0, 0, 1], port))));
        }
        s.parse()
            .map(Self::Tcp)
            .map_err(|_| TargetParseError(s.to_owned()))
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A byte stream to the app.
pub enum TargetStream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix socket.
    Unix(UnixStream),
}

impl Target {
    /// Opens one connection to the app.
    pub async fn connect(&self) -> std::io::Result<TargetStream> {
        match self {
            Self::Tcp(addr) => {
                let stream = TcpStream::connect(addr).await?;
                stream.set_nodelay(true)?;
                Ok(TargetStream::Tcp(stream))
            }
            Self::Unix(path) => Ok(TargetStream::Unix(UnixStream::connect(path).await?)),
        }
    }
}

macro_rules! delegate_io {
    ($self:ident, $method:ident($($arg:expr),*)) => {
        match $self.get_mut() {
            TargetStream::Tcp(s) => std::pin::Pin::new(s).$method($($arg),*),
            TargetStream::Unix(s) => std::pin::Pin::new(s).$method($($arg),*),
        }
    };
}

impl tokio::io::AsyncRead for TargetStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        delegate_io!(self, poll_read(cx, buf))
    }
}

impl tokio::io::AsyncWrite for TargetStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        delegate_io!(self, poll_write(cx, buf))
    }

    // Vectored writes passed on: hyper then writes a request head and its body chunks, and
    // the WebSocket pipe a batch of chunks, in one `writev` instead of copying them into
    // one buffer or writing them one by one (the default writes the first slice only).
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        delegate_io!(self, poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            TargetStream::Tcp(s) => s.is_write_vectored(),
            TargetStream::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        delegate_io!(self, poll_flush(cx))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        delegate_io!(self, poll_shutdown(cx))
    }
}

/// Why a request could not be sent to the app.
#[derive(Debug, Error)]
pub enum TargetError {
    /// The app refused or dropped the connection.
    #[error("cannot connect to the app at {target}: {source}")]
    Connect {
        /// The app's address.
        target: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The HTTP/1.1 handshake failed.
    #[error("HTTP handshake with the app failed: {0}")]
    Handshake(#[from] hyper::Error),
}

/// Keep-alive HTTP/1.1 connections to one target. A connection is taken for one
/// exchange and given back once its response body has been fully forwarded.
pub struct TargetPool {
    target: Target,
    idle: Mutex<Vec<SendRequest<StreamBody>>>,
}

impl TargetPool {
    /// A pool with no connection open yet.
    pub fn new(target: Target) -> Self {
        Self {
            target,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// The target this pool connects to.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// An idle, ready connection, or a new one.
    pub async fn checkout(&self) -> Result<SendRequest<StreamBody>, TargetError> {
        loop {
            let candidate = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            match candidate {
                // A connection is given back only once its exchange is complete; hyper may
                // not have polled it back to idle yet, so wait for that (it is immediate
                // unless the app closed the connection, which `ready` then reports).
                Some(mut sender) if !sender.is_closed() => {
                    if sender.ready().await.is_ok() {
                        return Ok(sender);
                    }
                }
                Some(_) => continue, // closed: drop it
                None => break,
            }
        }
        let stream = self
            .target
            .connect()
            .await
            .map_err(|source| TargetError::Connect {
                target: self.target.to_string(),
                source,
            })?;
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!("app connection ended: {e}");
            }
        });
        Ok(sender)
    }

    /// Returns a connection whose exchange is complete.
    pub fn checkin(&self, sender: SendRequest<StreamBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE_CONNECTIONS {
            idle.push(sender);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(
            "127.0.0.1:8888".parse::<Target>().ok(),
            Some(Target::Tcp(SocketAddr::from(([127, 0, 0, 1], 8888))))
        );
        assert_eq!(
            "localhost:80".parse::<Target>().ok(),
            Some(Target::Tcp(SocketAddr::from(([127, 0, 0, 1], 80))))
        );
        assert_eq!(
            "unix:/tmp/a.sock".parse::<Target>().ok(),
            Some(Target::Unix("/tmp/a.sock".into()))
        );
        assert!("unix:".parse::<Target>().is_err());
        assert!("example.org:80".parse::<Target>().is_err());
    }

    #[tokio::test]
    async fn app_connections_take_vectored_writes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let target = Target::Tcp(listener.local_addr().expect("addr"));
        let stream = target.connect().await.expect("connect");
        // hyper picks its write strategy from this, and the WebSocket pipe batches on it.
        assert!(tokio::io::AsyncWrite::is_write_vectored(&stream));
    }
}
