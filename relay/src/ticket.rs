//! Resume tickets: a reconnecting agent gets its old name (and private link) back.
//!
//! A ticket is `v1.<payload>.<mac>` where the payload is `name|user|key-hash|expiry` and
//! the MAC is HMAC-SHA256 under a relay key kept on disk, so tickets survive a relay
//! restart. The relay checks the MAC in constant time, the expiry, that the presenting
//! token belongs to the same user, and that the name has not ended (`Bye`, grace over).
//! The same key seeds QUIC stateless resets, so a restarted relay tells agents of the old
//! process at once that their connection is gone.

use crate::names::{base32, SessionName};
use ring::hmac;
use std::path::Path;
use thiserror::Error;

/// Bytes in the relay's resume key.
pub const KEY_BYTES: usize = 32;
const VERSION: &str = "v1";
/// Prefix of reservations: a different prefix and MAC domain than resume tickets, so
/// neither can be passed off as the other.
const RESERVATION_VERSION: &str = "r1";
/// What the MAC of a reservation covers before its payload (domain separation).
const RESERVATION_DOMAIN: &[u8] = b"jobgate reservation\0";
/// Longest batch job id a reservation carries (Slurm array ids such as `123_4`, PBS
/// ids such as `123.server` are far shorter).
pub const MAX_JOB_ID_BYTES: usize = 128;

/// What a valid reservation says: a name held for one batch job of one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationClaims {
    /// Name, user, access key hash and expiry, as in a resume ticket.
    pub ticket: TicketClaims,
    /// The batch job the name is held for.
    pub job_id: String,
}

/// Whether `job_id` may be reserved: non-empty, short, and only characters batch
/// systems use in job ids (so it can never break the payload's `|` fields).
pub fn valid_job_id(job_id: &str) -> bool {
    !job_id.is_empty()
        && job_id.len() <= MAX_JOB_ID_BYTES
        && job_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'[' | b']'))
}

/// Why the resume key could not be loaded.
#[derive(Debug, Error)]
#[error("resume key {path}: {source}")]
pub struct KeyError {
    path: String,
    source: std::io::Error,
}

/// What a valid ticket says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketClaims {
    /// The session name to give back.
    pub name: SessionName,
    /// The user it belongs to.
    pub user: String,
    /// SHA-256 of the session's access key, if it was a `link` session.
    pub key_hash: Option<[u8; 32]>,
    /// Unix seconds after which the ticket is void.
    pub expires: u64,
}

/// Signs and checks tickets.
pub struct TicketKey {
    key: hmac::Key,
    raw: [u8; KEY_BYTES],
}

impl TicketKey {
    /// Loads the key from `path`, creating it (mode 0600) on first start.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        let err = |source| KeyError {
            path: path.display().to_string(),
            source,
        };
        let raw = match std::fs::read(path) {
            Ok(bytes) if bytes.len() == KEY_BYTES => bytes,
            Ok(_) => {
                return Err(err(std::io::Error::other(
                    "wrong length: delete it to make a new one",
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = vec![0u8; KEY_BYTES];
                rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
                jobgate_files::create_new(path, &bytes).map_err(err)?;
                bytes
            }
            Err(e) => return Err(err(e)),
        };
        let mut fixed = [0u8; KEY_BYTES];
        fixed.copy_from_slice(&raw);
        Ok(Self::from_bytes(fixed))
    }

    /// A key from raw bytes.
    pub fn from_bytes(raw: [u8; KEY_BYTES]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, &raw),
            raw,
        }
    }

    /// A key for QUIC stateless resets, derived from (not equal to) the ticket key.
    pub fn reset_key(&self) -> hmac::Key {
        let derived = hmac::sign(&self.key, b"jobgate quic stateless reset key");
        hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref())
    }

    /// A key for the connection-ID generator, so that a restarted relay still recognises
    /// the old process's connection IDs as its own and answers them with a stateless reset
    /// (instead of dropping them, which leaves agents waiting for their idle timeout).
    pub fn cid_key(&self) -> u64 {
        let derived = hmac::sign(&self.key, b"jobgate quic connection id key");
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&derived.as_ref()[..8]);
        u64::from_le_bytes(bytes)
    }

    /// Makes a ticket.
    pub fn issue(&self, claims: &TicketClaims) -> String {
        let payload = encode_claims(claims);
        let mac = hmac::sign(&self.key, payload.as_bytes());
        format!(
            "{VERSION}.{}.{}",
            base32(payload.as_bytes()),
            base32(mac.as_ref())
        )
    }

    /// Checks a ticket's form and MAC (not its expiry or owner: see [`TicketClaims`]).
    pub fn verify(&self, ticket: &str) -> Option<TicketClaims> {
        let mut parts = ticket.split('.');
        let (version, payload, mac) = (parts.next()?, parts.next()?, parts.next()?);
        if version != VERSION || parts.next().is_some() {
            return None;
        }
        let payload = unbase32(payload)?;
        let mac = unbase32(mac)?;
        hmac::verify(&self.key, &payload, &mac).ok()?;
        decode_claims(std::str::from_utf8(&payload).ok()?)
    }

    /// Makes a reservation (see [`ReservationClaims`]); `None` for an invalid job id.
    pub fn issue_reservation(&self, claims: &ReservationClaims) -> Option<String> {
        if !valid_job_id(&claims.job_id) {
            return None;
        }
        let payload = format!("{}|{}", encode_claims(&claims.ticket), claims.job_id);
        let mac = hmac::sign(&self.key, &reservation_signed(payload.as_bytes()));
        Some(format!(
            "{RESERVATION_VERSION}.{}.{}",
            base32(payload.as_bytes()),
            base32(mac.as_ref())
        ))
    }

    /// Checks a reservation's form and MAC in constant time (not its expiry, owner or
    /// job: the caller compares those with the agent presenting it).
    pub fn verify_reservation(&self, reservation: &str) -> Option<ReservationClaims> {
        let mut parts = reservation.split('.');
        let (version, payload, mac) = (parts.next()?, parts.next()?, parts.next()?);
        if version != RESERVATION_VERSION || parts.next().is_some() {
            return None;
        }
        let payload = unbase32(payload)?;
        let mac = unbase32(mac)?;
        hmac::verify(&self.key, &reservation_signed(&payload), &mac).ok()?;
        let text = std::str::from_utf8(&payload).ok()?;
        let (ticket, job_id) = text.rsplit_once('|')?;
        if !valid_job_id(job_id) {
            return None;
        }
        Some(ReservationClaims {
            ticket: decode_claims(ticket)?,
            job_id: job_id.to_owned(),
        })
    }

    /// The raw key (for tests).
    #[doc(hidden)]
    pub fn raw(&self) -> &[u8; KEY_BYTES] {
        &self.raw
    }
}

fn reservation_signed(payload: &[u8]) -> Vec<u8> {
    let mut signed = Vec::with_capacity(RESERVATION_DOMAIN.len() + payload.len());
    signed.extend_from_slice(RESERVATION_DOMAIN);
    signed.extend_from_slice(payload);
    signed
}

fn encode_claims(c: &TicketClaims) -> String {
    let key: String = c
        .key_hash
        .map(|h| h.iter().map(|b| format!("{b:02x}")).collect())
        .unwrap_or_else(|| "-".into());
    format!("{}|{}|{}|{}", c.name, c.user, key, c.expires)
}

fn decode_claims(text: &str) -> Option<TicketClaims> {
    let mut f = text.split('|');
    let name = SessionName::parse(f.next()?.as_bytes())?;
    let user = f.next()?.to_owned();
    let key = f.next()?;
    let expires = f.next()?.parse().ok()?;
    if f.next().is_some() {
        return None;
    }
    let key_hash = if key == "-" {
        None
    } else {
        let mut out = [0u8; 32];
        if key.len() != 64 {
            return None;
        }
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(key.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(out)
    };
    Some(TicketClaims {
        name,
        user,
        key_hash,
        expires,
    })
}

fn unbase32(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 5 / 8);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes() {
        let v = match c {
            b'a'..=b'z' => c - b'a',
            b'2'..=b'7' => c - b'2' + 26,
            _ => return None,
        };
        acc = (acc << 5) | u32::from(v);
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> TicketClaims {
        TicketClaims {
            name: SessionName::parse(b"abcdefghijklmnop").expect("name"),
            user: "alice".into(),
            key_hash: Some([7u8; 32]),
            expires: 1_900_000_000,
        }
    }

    #[test]
    fn tickets_round_trip_and_any_change_breaks_them() {
        let key = TicketKey::from_bytes([1u8; KEY_BYTES]);
        let ticket = key.issue(&claims());
        assert_eq!(key.verify(&ticket), Some(claims()));
        let other = TicketKey::from_bytes([2u8; KEY_BYTES]);
        assert_eq!(other.verify(&ticket), None);
        // Flip one character of the payload.
        let mut forged: Vec<char> = ticket.chars().collect();
        let i = 5;
        forged[i] = if forged[i] == 'a' { 'b' } else { 'a' };
        assert_eq!(key.verify(&forged.into_iter().collect::<String>()), None);
        assert_eq!(key.verify("v1.x.y"), None);
        assert_eq!(key.verify("garbage"), None);
    }

    #[test]
    fn reservations_round_trip_and_are_no_tickets() {
        let key = TicketKey::from_bytes([1u8; KEY_BYTES]);
        let claims = ReservationClaims {
            ticket: claims(),
            job_id: "4242_7".into(),
        };
        let reservation = key.issue_reservation(&claims).expect("valid job id");
        assert_eq!(key.verify_reservation(&reservation), Some(claims.clone()));
        // Neither kind passes for the other, and another relay's key signs nothing here.
        assert_eq!(key.verify(&reservation), None);
        assert_eq!(key.verify_reservation(&key.issue(&claims.ticket)), None);
        let other = TicketKey::from_bytes([2u8; KEY_BYTES]);
        assert_eq!(other.verify_reservation(&reservation), None);
        let mut forged: Vec<char> = reservation.chars().collect();
        forged[5] = if forged[5] == 'a' { 'b' } else { 'a' };
        assert_eq!(
            key.verify_reservation(&forged.into_iter().collect::<String>()),
            None
        );
        for bad in ["", "1|2", "x y", &"9".repeat(MAX_JOB_ID_BYTES + 1)] {
            let claims = ReservationClaims {
                ticket: super::tests::claims(),
                job_id: bad.into(),
            };
            assert_eq!(key.issue_reservation(&claims), None, "{bad:?}");
        }
    }

    #[test]
    fn key_file_is_created_private_and_reloaded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("jobgate-ticket-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("resume.key");
        let _ = std::fs::remove_file(&path);
        let a = TicketKey::load_or_create(&path).expect("create");
        let b = TicketKey::load_or_create(&path).expect("load");
        assert_eq!(a.raw(), b.raw());
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).ok();
    }
}
