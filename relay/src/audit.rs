//! The audit log: one JSON object per line for every session opened or closed and every
//! refused agent. It never holds a secret (no token, key, cookie or query string).

use serde::Serialize;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;

/// One audit record.
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AuditEvent<'a> {
    /// A session was registered.
    Opened {
        /// User from the token.
        user: &'a str,
        /// Session name.
        name: &'a str,
        /// Batch job id, if the agent said.
        job_id: Option<&'a str>,
        /// Node host name, if the agent said.
        host: Option<&'a str>,
        /// Agent address as seen by the relay.
        agent_addr: SocketAddr,
        /// `link` or `public`.
        access: &'a str,
        /// `quic`, or `tcp` (TLS over TCP, where UDP is blocked).
        transport: &'a str,
    },
    /// A session ended.
    Closed {
        /// User from the token.
        user: &'a str,
        /// Session name.
        name: &'a str,
        /// Why it ended.
        reason: &'a str,
        /// Seconds it lived.
        duration_s: u64,
        /// Bytes received from the agent (UDP payloads; TLS bytes on the TCP transport).
        bytes_in: u64,
        /// Bytes sent to the agent.
        bytes_out: u64,
        /// Requests forwarded.
        requests: u64,
    },
    /// A live session was closed because the token that opened it was revoked or
    /// replaced (`jobgate token issue` again): its name ended for good.
    Revoked {
        /// User from the token.
        user: &'a str,
        /// Session name.
        name: &'a str,
    },
    /// An agent was refused.
    Refused {
        /// The user, if the token was valid (limits, mode).
        user: Option<&'a str>,
        /// Agent address.
        agent_addr: SocketAddr,
        /// Machine-readable reason.
        code: &'a str,
    },
    /// `jobgate login` got an agent token after the user's single sign-on.
    LoginToken {
        /// The user name from the ID token.
        user: &'a str,
    },
}

/// Where audit records go: a file opened for append, or nowhere.
#[derive(Default)]
pub struct AuditLog {
    file: Option<Mutex<std::fs::File>>,
}

impl AuditLog {
    /// Opens (creates, mode 0600) the log file for appending.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(Self {
            file: Some(Mutex::new(file)),
        })
    }

    /// Appends one record with a Unix timestamp. Failures are logged, never fatal.
    pub fn record(&self, event: &AuditEvent<'_>) {
        let Some(file) = &self.file else { return };
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let mut line = match serde_json::to_value(event) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => return,
        };
        line.insert("time".into(), serde_json::json!(time));
        let mut text = serde_json::Value::Object(line).to_string();
        text.push('\n');
        let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = file.write_all(text.as_bytes()) {
            tracing::warn!("audit log write failed: {e}");
        }
    }
}
