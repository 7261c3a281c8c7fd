//! The jobgate wire protocol, version 1.
//!
//! An agent (inside a batch job) holds one QUIC connection to the relay, negotiated with
//! ALPN [`ALPN`]. On it:
//!
//! * the **control stream** is the first bidirectional stream, opened by the agent. It
//!   carries length-prefixed JSON [`ControlMessage`]s: `Hello` → `Welcome` | `Refused`,
//!   later `Drain` and `Bye`;
//! * every inbound HTTP request is a **request stream**, a bidirectional stream opened by
//!   the relay: one [`RequestHead`] frame, then the raw request body until FIN. The agent
//!   answers with one [`ResponseHead`] frame, then the raw response body until FIN. A `101`
//!   response turns both directions into a raw byte pipe (WebSocket).
//!
//! This crate is pure: types, codecs and limits, no sockets and no runtime, so that every
//! decoder can be fuzzed and property-tested on its own. Two optional features add the
//! glue the relay and the agent share, kept here so it exists once:
//!
//! * `tokio-io`: two small helpers that move one frame over any `AsyncRead`/`AsyncWrite`;
//! * `quic` (implies `tokio-io`): the QUIC side of a request stream — a receive stream as a
//!   streaming HTTP body ([`quic::QuicBody`]), pumping an HTTP body into a send stream,
//!   splicing an upgraded connection to a stream after a `101`, and the transport tuning
//!   both ends must agree on.
//!
//! The full specification is `docs/protocol.md`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod codes;
mod control;
mod frame;
mod head;
#[cfg(feature = "tokio-io")]
mod io;
#[cfg(feature = "quic")]
pub mod quic;
pub mod upgrade;

pub use codes::{CloseCode, StreamCode};
pub use control::{AccessMode, ControlMessage, JobInfo, RefusalCode, SessionLimits, Shares, Token};
pub use frame::{decode_frame, encode_frame, encode_frame_with, FrameError, FRAME_HEADER_LEN};
pub use head::{
    HeadError, RequestHead, ResponseHead, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO,
};
#[cfg(feature = "tokio-io")]
pub use io::{read_frame, write_frame, ReadFrameError};

/// ALPN protocol id the agent and relay negotiate on the QUIC connection.
pub const ALPN: &[u8] = b"jobgate/1";

/// Protocol version carried in `Hello`; a relay refuses versions it does not speak.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest control-stream frame payload (JSON). Control messages are small; anything
/// larger is a protocol error that closes the connection.
pub const MAX_CONTROL_FRAME: usize = 16 * 1024;

/// Largest request/response head frame payload. The relay limits request headers to
/// 64 KiB; this leaves room for the target and the encoding overhead.
pub const MAX_HEAD_FRAME: usize = 128 * 1024;
