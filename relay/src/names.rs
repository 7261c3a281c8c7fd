//! Session names: 16 characters of `[a-z2-7]` (80 bits) from the OS CSPRNG.
//!
//! A new name is never one that is live, parked, recently ended, or issued within the
//! last ticket lifetime: those are remembered and a draw that hits one is redrawn. Older
//! names are forgotten (see [`NameRegistry::forget_issued_before`]), so the registry stays
//! bounded under any churn; a fresh draw then equals a forgotten name with probability
//! n / 2^80 for n forgotten names (about 10^-18 after a million sessions), far below any
//! other risk, and that name's tickets have expired anyway.

use rand::rngs::OsRng;
use rand::RngCore;
use std::collections::HashMap;
use std::sync::Mutex;

/// Random bytes in a name: 10 bytes = 80 bits = 16 base32 characters.
pub const NAME_BYTES: usize = 10;
/// Characters in a name.
pub const NAME_LEN: usize = NAME_BYTES * 8 / 5;

const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// A session name in its canonical lower-case form; `Copy` and allocation-free, so the
/// request path can look it up without touching the heap.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionName([u8; NAME_LEN]);

impl SessionName {
    /// Parses a DNS label as a name: exactly [`NAME_LEN`] base32 characters, any case.
    pub fn parse(label: &[u8]) -> Option<Self> {
        let mut out = [0u8; NAME_LEN];
        if label.len() != NAME_LEN {
            return None;
        }
        for (o, &b) in out.iter_mut().zip(label) {
            let b = b.to_ascii_lowercase();
            if !(b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b)) {
                return None;
            }
            *o = b;
        }
        Some(Self(out))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        // Only ASCII letters and digits are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

impl std::fmt::Display for SessionName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for SessionName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionName({})", self.as_str())
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Lower-case RFC 4648 base32 without padding.
pub fn base32(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(BASE32[((acc >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(BASE32[((acc << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// `n` bytes from the OS CSPRNG, base32-encoded: the form of every secret we mint.
pub fn random_secret(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    OsRng.fill_bytes(&mut bytes);
    base32(&bytes)
}

/// The names this process issued or gave back recently, and those that ended for good.
#[derive(Default)]
pub struct NameRegistry {
    /// Issued or claimed names, each with the Unix time it was issued or last claimed.
    issued: Mutex<HashMap<SessionName, u64>>,
    /// Ended names, each with the Unix time after which no ticket for it can be valid
    /// (then it is forgotten: only a ticket could have brought it back).
    ended: Mutex<HashMap<SessionName, u64>>,
    /// Bumped whenever a name ends, so the state file is rewritten only when needed.
    ended_generation: std::sync::atomic::AtomicU64,
}

impl NameRegistry {
    /// Draws a name that is neither remembered as issued nor as ended.
    pub fn issue(&self) -> SessionName {
        let now = unix_now();
        let mut issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let mut raw = [0u8; NAME_BYTES];
            OsRng.fill_bytes(&mut raw);
            let Some(name) = SessionName::parse(base32(&raw).as_bytes()) else {
                continue;
            };
            if issued.contains_key(&name) || self.is_ended(&name) {
                continue;
            }
            issued.insert(name, now);
            return name;
        }
    }

    /// Records a name given back by a resume ticket (e.g. after a restart), so it is
    /// never drawn for anyone else while it can matter.
    pub fn claim(&self, name: SessionName) {
        self.issued
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name, unix_now());
    }

    /// Forgets issued names older than `before` (Unix seconds) unless `held` says they
    /// are still live or parked. The caller passes now minus one ticket lifetime: a name
    /// that ended is remembered by the ended list instead, one issued longer ago than
    /// that has no valid ticket left unless its session still holds it.
    pub fn forget_issued_before(&self, before: u64, held: impl Fn(&SessionName) -> bool) {
        self.issued
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|name, issued| *issued >= before || held(name));
    }

    /// Marks a name dead for good: no ticket can bring it back. `forget_after` is when
    /// every ticket for it will have expired.
    pub fn mark_ended_until(&self, name: SessionName, forget_after: u64) {
        let mut ended = self.ended.lock().unwrap_or_else(|e| e.into_inner());
        let entry = ended.entry(name).or_insert(forget_after);
        *entry = (*entry).max(forget_after);
        self.ended_generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many times a name was marked ended.
    pub fn ended_generation(&self) -> u64 {
        self.ended_generation
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The ended names still to remember at Unix time `now`; forgets the others.
    pub fn ended_until(&self, now: u64) -> Vec<(SessionName, u64)> {
        let mut ended = self.ended.lock().unwrap_or_else(|e| e.into_inner());
        ended.retain(|_, forget_after| *forget_after > now);
        ended.iter().map(|(n, t)| (*n, *t)).collect()
    }

    /// Whether a name has ended for good.
    pub fn is_ended(&self, name: &SessionName) -> bool {
        self.ended
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(name)
    }

    /// How many names were issued.
    pub fn issued_count(&self) -> usize {
        self.issued.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_16_base32_chars_and_unique() {
        let registry = NameRegistry::default();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let name = registry.issue();
            assert_eq!(name.as_str().len(), 16);
            assert!(name
                .as_str()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b)));
            assert!(seen.insert(name));
        }
        assert_eq!(registry.issued_count(), 10_000);
    }

    #[test]
    fn ended_names_are_remembered_until_their_tickets_expire() {
        let registry = NameRegistry::default();
        let (a, b) = (registry.issue(), registry.issue());
        registry.mark_ended_until(a, 100);
        registry.mark_ended_until(b, 200);
        assert!(registry.is_ended(&a) && registry.is_ended(&b));
        assert_eq!(registry.ended_until(150), vec![(b, 200)]);
        assert!(!registry.is_ended(&a), "forgotten once its tickets expired");
        assert!(registry.is_ended(&b));
    }

    #[test]
    fn issued_names_are_forgotten_after_a_ticket_lifetime_unless_held() {
        let registry = NameRegistry::default();
        let held = registry.issue();
        registry.issue();
        // Nothing is older than a minute ago: all kept.
        registry.forget_issued_before(unix_now() - 60, |_| false);
        assert_eq!(registry.issued_count(), 2);
        // A lifetime later: only the held name stays.
        registry.forget_issued_before(unix_now() + 1, |n| *n == held);
        assert_eq!(registry.issued_count(), 1);
        registry.forget_issued_before(unix_now() + 1, |_| false);
        assert_eq!(registry.issued_count(), 0);
        // Churn stays bounded: a thousand issued and forgotten leave nothing behind.
        for _ in 0..1000 {
            registry.issue();
        }
        registry.forget_issued_before(unix_now() + 1, |_| false);
        assert_eq!(registry.issued_count(), 0);
    }

    #[test]
    fn an_ended_name_is_not_drawn_again_while_remembered() {
        let registry = NameRegistry::default();
        let name = registry.issue();
        registry.mark_ended_until(name, u64::MAX);
        registry.forget_issued_before(u64::MAX, |_| false);
        assert!(
            registry.is_ended(&name),
            "still ended after the issued set forgot it"
        );
    }

    #[test]
    fn base32_matches_rfc4648_vectors() {
        assert_eq!(base32(b"foobar"), "mzxw6ytboi");
        assert_eq!(base32(b"f"), "my");
    }

    #[test]
    fn parse_accepts_any_case_and_refuses_other_shapes() {
        assert!(SessionName::parse(b"ABCDEFGHIJKLMNOP").is_some());
        assert!(SessionName::parse(b"abcdefghijklmno1").is_none());
        assert!(SessionName::parse(b"short").is_none());
    }
}
