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

/// Largest UDP payload a QUIC packet may grow to. quinn starts every connection at 1200
/// bytes and path-MTU discovery (RFC 8899: probes that are simply lost where the path is
/// narrower) climbs towards this bound, so an Ethernet path settles at ~1450 as before,
/// while a jumbo-frame fabric (common inside HPC centres) or a relay and agent on one host
/// get ~4.5× fewer packets to encrypt, acknowledge and send per megabyte (loopback bulk:
/// 2× the rate at half the CPU per MB, docs/performance.md). quinn's default bound is 1452.
///
/// Why not 8952 (a 9000-byte jumbo frame): quinn hands the kernel up to 10 packets in one
/// GSO send, and one GSO send must fit a 64 KiB UDP datagram (payload ≤ 65,507 bytes over
/// IPv4). Above 6,550 bytes a full batch fails with `EMSGSIZE`, which quinn-udp treats as a
/// lost MTU probe and drops: measured, bulk fell to a fraction of the 1452-byte rate.
pub const MAX_UDP_PAYLOAD: u16 = 6500;

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
    config.mtu_discovery_config(Some(mtu_discovery()));
    Arc::new(config)
}

/// Path-MTU discovery up to [`MAX_UDP_PAYLOAD`].
pub fn mtu_discovery() -> quinn::MtuDiscoveryConfig {
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    mtu
}

/// Endpoint settings both ends use: accept packets up to [`MAX_UDP_PAYLOAD`] (quinn's
/// default advertises and receives at most 1472 bytes, which would cap path-MTU discovery
/// whatever [`transport_config`] says). The receive buffer grows with it, once per
/// endpoint, not per connection.
pub fn tune_endpoint(config: &mut quinn::EndpointConfig) {
    // In range (1200..=65527) by construction, so this cannot fail.
    let _ = config.max_udp_payload_size(MAX_UDP_PAYLOAD);
}

/// A fresh [`quinn::EndpointConfig`] with [`tune_endpoint`] applied.
pub fn endpoint_config() -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::default();
    tune_endpoint(&mut config);
    config
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
