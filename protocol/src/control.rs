//! Control-stream messages: JSON objects, one per frame, tagged by `"type"`.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A secret bearer token. Its `Debug` output is redacted so that it can never reach a
/// log line through a derived `Debug` of a message that carries it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Token(pub String);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// How the relay guards a session's URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AccessMode {
    /// Default: a per-session access key in the printed link; browsers get a cookie.
    #[default]
    Link,
    /// No relay-side lock; the app's own authentication is the only one. Only where
    /// the relay's policy allows it.
    Public,
    /// Only the session's owner (the token's user) and the users and groups it is shared
    /// with, after the site's single sign-on (OIDC) at the relay. The relay's default
    /// when it has sign-on and the agent names no mode.
    Owner,
}

/// Whom an `owner` session is shared with, besides its owner (the names the site's
/// single sign-on gives users and groups).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Shares {
    /// Users who may open the session too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
    /// Groups whose members may open the session too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

impl Shares {
    /// Whether the session is shared with nobody.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty() && self.groups.is_empty()
    }
}

/// What the agent tells the relay about the job it runs in (for the audit log and `jobs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct JobInfo {
    /// Batch system job id (`SLURM_JOB_ID`, `PBS_JOBID`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Local user name on the node (informative; identity comes from the token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Host name of the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// Limits the relay applies to a session, told to the agent in `Welcome`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SessionLimits {
    /// Most request streams the relay will have open on this connection at once.
    pub max_streams: u64,
    /// Largest request head (headers and target) the relay accepts from clients, in bytes.
    pub max_header_bytes: u64,
}

/// Why the relay refused a `Hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalCode {
    /// The token is unknown or revoked.
    BadToken,
    /// The agent speaks a protocol version this relay does not.
    UnsupportedVersion,
    /// The requested access mode is not allowed by the relay's policy.
    AccessModeNotAllowed,
    /// The user already has as many live sessions as allowed.
    TooManySessions,
    /// The user opened new sessions faster than the relay's per-user rate allows; the
    /// message says when to try again. Temporary: agents wait and retry.
    RateLimited,
    /// The relay is at its global agent limit or is draining.
    Unavailable,
    /// The first frame was not a valid `Hello`.
    Malformed,
    /// The reservation is forged, another user's, for another job, or its job has ended.
    BadReservation,
    /// Not now, but soon: in a cluster of relays, the shared store (etcd) is unreachable,
    /// or the name is still held by a relay that just died (its lease ends within
    /// seconds). Temporary: agents wait and retry; the message says why.
    TryAgain,
}

/// One message on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlMessage {
    /// Agent → relay, first frame: who I am and what I want.
    Hello {
        /// Protocol version, [`crate::PROTOCOL_VERSION`].
        version: u32,
        /// The user's agent token.
        token: Token,
        /// Requested access mode; `None` (absent): the relay's default (`owner` when it has
        /// single sign-on, else `link`). Agents before sign-on always sent a mode.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        access: Option<AccessMode>,
        /// Whom an `owner` session is shared with (absent: nobody).
        #[serde(default, skip_serializing_if = "Shares::is_empty")]
        share: Shares,
        /// Job metadata.
        #[serde(default)]
        job: JobInfo,
        /// A resume ticket from an earlier `Welcome`, to get the same name back.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume: Option<Token>,
        /// A reservation from [`ControlMessage::Reserved`]: the name the user was given
        /// when the job was submitted. Old agents never send it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reservation: Option<Token>,
        /// The agent moves its live session here from its other connection (QUIC works
        /// again after a time on TCP): the relay lets the old connection finish the
        /// streams it carries (open WebSockets) instead of closing it at once. Only with
        /// `resume`; old agents never send it.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        moving: bool,
    },
    /// Client → relay, first frame of a connection that only asks for a name for a job
    /// that is queued (`jobgate launch`); answered with `Reserved` or `Refused`, then closed.
    Reserve {
        /// Protocol version, [`crate::PROTOCOL_VERSION`].
        version: u32,
        /// The user's agent token.
        token: Token,
        /// Requested access mode; `None` (absent): the relay's default, as in `Hello`
        /// (relays before this read an absent mode as `link`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        access: Option<AccessMode>,
        /// The batch job the name is for (`sbatch`'s job id).
        job_id: String,
    },
    /// Relay → client: the name is held for the job until it ends.
    Reserved {
        /// The reserved name.
        name: String,
        /// The session's base URL.
        url: String,
        /// The URL to hand to the user (with the access key in `link` mode).
        access_url: String,
        /// The signed reservation the job's agent presents in its `Hello`.
        reservation: Token,
    },
    /// Relay → agent: the session is live.
    Welcome {
        /// The session's name (the first DNS label of its host).
        name: String,
        /// The session's base URL, `https://<name>.<domain>/`.
        url: String,
        /// The URL to hand to the user (with the access key in `link` mode).
        access_url: String,
        /// Opaque ticket that gives this name back on reconnect, if the relay supports it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume_ticket: Option<Token>,
        /// Limits that apply to this session.
        limits: SessionLimits,
    },
    /// Relay → agent: no session; the connection closes after this.
    Refused {
        /// Machine-readable reason.
        code: RefusalCode,
        /// Human-readable reason, printed by the agent.
        message: String,
    },
    /// Relay → agent: a fresh resume ticket, replacing the one from `Welcome` before it
    /// expires.
    Ticket {
        /// The new ticket.
        resume_ticket: Token,
    },
    /// Relay → agent: the relay is going away; finish what you have, then reconnect.
    Drain {
        /// Human-readable reason.
        reason: String,
    },
    /// Agent → relay: the job is ending; the name is dead from now on.
    Bye {
        /// Human-readable reason (e.g. "app exited with status 0").
        reason: String,
    },
}

impl ControlMessage {
    /// Serialises the message as a frame payload.
    pub fn to_payload(&self) -> Vec<u8> {
        // Serialising these plain structs cannot fail: no maps with non-string keys.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a frame payload.
    pub fn from_payload(payload: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_never_shows_in_debug_output() {
        let hello = ControlMessage::Hello {
            version: 1,
            token: Token("s3cret-token".into()),
            access: Some(AccessMode::Link),
            share: Shares::default(),
            job: JobInfo::default(),
            resume: Some(Token("ticket".into())),
            reservation: Some(Token("reserved-secret".into())),
            moving: false,
        };
        let shown = format!("{hello:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(!shown.contains("ticket\""), "{shown}");
        assert!(!shown.contains("reserved-secret"), "{shown}");
    }

    #[test]
    fn hello_round_trips_and_garbage_is_an_error() {
        let hello = ControlMessage::Hello {
            version: 1,
            token: Token("t".into()),
            access: Some(AccessMode::Public),
            share: Shares::default(),
            job: JobInfo {
                id: Some("42".into()),
                user: None,
                host: Some("n1".into()),
            },
            resume: None,
            reservation: None,
            moving: false,
        };
        let back = ControlMessage::from_payload(&hello.to_payload()).expect("decodes");
        assert_eq!(back, hello);
        assert!(ControlMessage::from_payload(b"{\"type\":\"nope\"}").is_err());
        assert!(ControlMessage::from_payload(b"\xff\x00").is_err());
    }

    #[test]
    fn an_old_agents_hello_without_reservation_still_decodes() {
        let old = br#"{"type":"hello","version":1,"token":"t","access":"link","job":{}}"#;
        match ControlMessage::from_payload(old) {
            Ok(ControlMessage::Hello { reservation, .. }) => assert_eq!(reservation, None),
            other => panic!("old Hello not understood: {other:?}"),
        }
    }

    #[test]
    fn reserve_and_reserved_round_trip() {
        for message in [
            ControlMessage::Reserve {
                version: 1,
                token: Token("t".into()),
                access: Some(AccessMode::Link),
                job_id: "4242".into(),
            },
            ControlMessage::Reserved {
                name: "abc".into(),
                url: "https://abc.example/".into(),
                access_url: "https://abc.example/?k=1".into(),
                reservation: Token("r1.x.y".into()),
            },
        ] {
            assert_eq!(
                ControlMessage::from_payload(&message.to_payload()).ok(),
                Some(message)
            );
        }
    }

    #[test]
    fn an_old_agents_hello_still_decodes_and_shares_round_trip() {
        // What agents before sign-on sent: a mode always, no shares.
        let old = br#"{"type":"hello","version":1,"token":"t","access":"link","job":{}}"#;
        let Ok(ControlMessage::Hello { access, share, .. }) = ControlMessage::from_payload(old)
        else {
            panic!("an old Hello must decode")
        };
        assert_eq!(access, Some(AccessMode::Link));
        assert!(share.is_empty());
        let hello = ControlMessage::Hello {
            version: 1,
            token: Token("t".into()),
            access: None,
            share: Shares {
                users: vec!["bob".into()],
                groups: vec!["physics".into()],
            },
            job: JobInfo::default(),
            resume: None,
            reservation: None,
            moving: false,
        };
        let payload = hello.to_payload();
        assert!(!String::from_utf8_lossy(&payload).contains("access"));
        assert_eq!(
            ControlMessage::from_payload(&payload).expect("decodes"),
            hello
        );
        let owner = br#"{"type":"hello","version":1,"token":"t","access":"owner"}"#;
        assert!(matches!(
            ControlMessage::from_payload(owner),
            Ok(ControlMessage::Hello {
                access: Some(AccessMode::Owner),
                ..
            })
        ));
    }
}
