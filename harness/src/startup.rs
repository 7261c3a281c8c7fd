//! The relay's startup lines, read in ONE place (tests, the tunnel bench and the soak all
//! start relays on port 0 and learn the ports from what it prints):
//!
//! ```text
//! jobgate relay: HTTPS on 127.0.0.1:40123, agents (QUIC/UDP) on 127.0.0.1:51234
//! (`, serving on 4 cores` after it with `--cores 4`)
//! jobgate relay: metrics on http://127.0.0.1:40999/metrics, health on http://…/healthz
//! ```

use std::net::SocketAddr;
use thiserror::Error;

/// Printed once the relay accepts agents and clients: the line to wait for.
pub const READY_MARKER: &str = "agents (QUIC/UDP) on ";
/// Precedes the client-facing address on the ready line.
const HTTPS_MARKER: &str = "HTTPS on ";
/// Precedes the metrics listener's address, on its own line after the ready line.
pub const METRICS_MARKER: &str = "metrics on http://";

/// Where a started relay listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayAddrs {
    /// The HTTPS front door.
    pub https: SocketAddr,
    /// The QUIC endpoint for agents.
    pub quic: SocketAddr,
    /// The metrics listener, when it is configured and its line was printed already.
    pub metrics: Option<SocketAddr>,
}

/// Why the startup lines could not be read.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StartupError {
    /// The ready line is not (yet) in the text.
    #[error("no line with {READY_MARKER:?} yet")]
    NotReady,
    /// A marker is there but no address follows it.
    #[error("no address after {marker:?} in {line:?}")]
    NoAddress {
        /// The marker.
        marker: &'static str,
        /// The line.
        line: String,
    },
}

/// Reads the relay's addresses from its stderr so far (any prefix of lines).
pub fn parse_startup(stderr: &str) -> Result<RelayAddrs, StartupError> {
    let ready = stderr
        .lines()
        .find(|l| l.contains(READY_MARKER))
        .ok_or(StartupError::NotReady)?;
    let metrics = match stderr.lines().find(|l| l.contains(METRICS_MARKER)) {
        Some(line) => Some(addr_after(line, METRICS_MARKER)?),
        None => None,
    };
    Ok(RelayAddrs {
        https: addr_after(ready, HTTPS_MARKER)?,
        quic: addr_after(ready, READY_MARKER)?,
        metrics,
    })
}

/// The socket address that follows `marker` in `line`, up to `,`, `/` or a space.
fn addr_after(line: &str, marker: &'static str) -> Result<SocketAddr, StartupError> {
    line.split_once(marker)
        .and_then(|(_, rest)| rest.split([',', ' ', '/']).find(|s| !s.is_empty()))
        .and_then(|addr| addr.parse().ok())
        .ok_or_else(|| StartupError::NoAddress {
            marker,
            line: line.to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const READY: &str =
        "jobgate relay: HTTPS on 127.0.0.1:40123, agents (QUIC/UDP) on 127.0.0.1:51234\n";

    #[test]
    fn reads_both_ports_from_the_ready_line() {
        let addrs = parse_startup(&format!("some log\n{READY}")).expect("parsed");
        assert_eq!(addrs.https, "127.0.0.1:40123".parse().expect("addr"));
        assert_eq!(addrs.quic, "127.0.0.1:51234".parse().expect("addr"));
        assert_eq!(addrs.metrics, None);
        let on_cores = READY.replace('\n', ", serving on 4 cores\n");
        assert_eq!(parse_startup(&on_cores), Ok(addrs), "{on_cores}");
    }

    #[test]
    fn reads_the_metrics_line_and_ipv6() {
        let text = "jobgate relay: HTTPS on [::1]:443, agents (QUIC/UDP) on [::1]:4433\n\
                    jobgate relay: metrics on http://127.0.0.1:9100/metrics, health on http://127.0.0.1:9100/healthz\n";
        let addrs = parse_startup(text).expect("parsed");
        assert_eq!(addrs.https, "[::1]:443".parse().expect("addr"));
        assert_eq!(addrs.quic, "[::1]:4433".parse().expect("addr"));
        assert_eq!(addrs.metrics, Some("127.0.0.1:9100".parse().expect("addr")));
    }

    #[test]
    fn says_what_is_missing() {
        assert_eq!(parse_startup("starting\n"), Err(StartupError::NotReady));
        assert!(matches!(
            parse_startup("HTTPS on nowhere, agents (QUIC/UDP) on 127.0.0.1:1"),
            Err(StartupError::NoAddress {
                marker: "HTTPS on ",
                ..
            })
        ));
    }
}
