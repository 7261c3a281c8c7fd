//! QUIC glue shared by the relay and the agent (feature `quic`).
//!
//! Both ends must agree on QUIC transport tuning; it lives here, once. (What both ends do
//! with a request stream — read it as an HTTP body, pump a body into it, splice it to an
//! upgraded connection — lives in `jobgate-transport`, over QUIC and TCP alike.)

use quinn::VarInt;
use std::sync::Arc;
use std::time::Duration;

use crate::StreamCode;

/// Largest chunk handed out by one read of a stream body. Matches the flow-control
/// granularity we want on bulk transfers without holding big buffers.
pub const MAX_CHUNK: usize = 64 * 1024;

/// Per-stream receive window: large enough for WAN bandwidth × RTT on one download.
pub const STREAM_RECEIVE_WINDOW: u32 = 8 * 1024 * 1024;

/// Per-connection receive window shared by all of a session's streams.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 32 * 1024 * 1024;

/// Send window per connection (quinn's default is the receive window; keep them equal).
pub const SEND_WINDOW: u64 = 32 * 1024 * 1024;

/// Socket buffers requested for the UDP socket; the default drops bursts under load.
pub const UDP_SOCKET_BUFFER: usize = 4 * 1024 * 1024;

impl From<StreamCode> for VarInt {
    /// A stream code as QUIC carries it (`RESET_STREAM`, `STOP_SENDING`).
    fn from(code: StreamCode) -> Self {
        VarInt::from_u32(code.as_u32())
    }
}

impl From<crate::CloseCode> for VarInt {
    /// A close code as QUIC carries it (`CONNECTION_CLOSE`).
    fn from(code: crate::CloseCode) -> Self {
        VarInt::from_u32(code.as_u32())
    }
}

/// Transport tuning both ends use.
///
/// `max_incoming_bidi` is how many streams the *peer* may open at once: the agent sets it
/// high (the relay opens one stream per request), the relay keeps it small (the agent only
/// opens the control stream).
pub fn transport_config(
    idle_timeout: Duration,
    keep_alive: Duration,
    max_incoming_bidi: u32,
) -> Arc<quinn::TransportConfig> {
    let mut config = quinn::TransportConfig::default();
    // An idle timeout of more than 2^62 ms cannot happen with our Durations; fall back to
    // quinn's default if conversion fails.
    if let Ok(timeout) = quinn::IdleTimeout::try_from(idle_timeout) {
        config.max_idle_timeout(Some(timeout));
    }
    config
        .keep_alive_interval(Some(keep_alive))
        .max_concurrent_bidi_streams(VarInt::from_u32(max_incoming_bidi))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW))
        .send_window(SEND_WINDOW);
    config.datagram_receive_buffer_size(None); // no QUIC datagrams: nothing would read them
    Arc::new(config)
}

/// The relay's tuning: [`transport_config`], but every connection starts with a
/// connection-level receive window of `initial_receive_window` bytes, which the relay
/// raises once the agent is admitted (`quinn::Connection::set_receive_window`), and
/// streams get `stream_receive_window` bytes each.
pub fn relay_transport_config(
    idle_timeout: Duration,
    keep_alive: Duration,
    max_incoming_bidi: u32,
    initial_receive_window: u32,
    stream_receive_window: u32,
) -> Arc<quinn::TransportConfig> {
    let mut config = transport_config(idle_timeout, keep_alive, max_incoming_bidi);
    // Freshly made, so never shared yet: `get_mut` always succeeds.
    if let Some(config) = Arc::get_mut(&mut config) {
        config
            .receive_window(VarInt::from_u32(initial_receive_window))
            .stream_receive_window(VarInt::from_u32(stream_receive_window));
    }
    config
}
