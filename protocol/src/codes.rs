//! Application error codes for QUIC `CONNECTION_CLOSE` and `RESET_STREAM`/`STOP_SENDING`.

/// Why a whole agent connection was closed (QUIC application close code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum CloseCode {
    /// Orderly end: the agent said `Bye`, or the relay shut down.
    Normal = 0,
    /// The peer broke the protocol (malformed or oversized control frame, bad first stream).
    ProtocolError = 1,
    /// `Hello` was refused (bad token, unsupported version, limits); `Refused` said why.
    Refused = 2,
    /// The user's token was revoked while the session was live.
    Revoked = 3,
    /// A newer connection took over this session's name (reconnect after a blip).
    Replaced = 4,
    /// The relay is draining (restart); reconnect later.
    Draining = 5,
    /// The agent did not finish its handshake in time.
    HandshakeTimeout = 6,
    /// The relay's admin closed the session (admin API); the reason text says so. The
    /// name is dead: the agent must not resume it.
    ClosedByAdmin = 7,
}

impl CloseCode {
    /// The code as sent on the wire.
    pub fn as_u32(self) -> u32 {
        self as u32
    }

    /// The code for a wire value, if it is one this version knows.
    pub fn from_u64(value: u64) -> Option<Self> {
        Some(match value {
            0 => Self::Normal,
            1 => Self::ProtocolError,
            2 => Self::Refused,
            3 => Self::Revoked,
            4 => Self::Replaced,
            5 => Self::Draining,
            6 => Self::HandshakeTimeout,
            7 => Self::ClosedByAdmin,
            _ => return None,
        })
    }
}

/// Why one request stream was reset or stopped (QUIC stream error code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum StreamCode {
    /// No error: the reader no longer needs the rest (e.g. the response is complete).
    NoError = 0,
    /// The head frame was malformed or too large.
    MalformedHead = 1,
    /// The agent could not reach the app (connection refused, app gone).
    TargetUnavailable = 2,
    /// The HTTP client went away or the request was cancelled.
    Cancelled = 3,
    /// The app's response was not valid HTTP.
    BadResponse = 4,
}

impl StreamCode {
    /// The code as sent on the wire.
    pub fn as_u32(self) -> u32 {
        self as u32
    }
}
