//! Small in-memory stores for sign-on secrets: keyed by the SHA-256 of the secret (the
//! secret itself is never kept), each entry with an expiry, each store bounded.

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Instant;

/// SHA-256 of a presented secret: the key it is stored under.
pub fn key_of(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Why an entry could not be stored.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

/// Secret hash → (expiry, value), at most `cap` entries.
pub struct Store<T> {
    entries: RwLock<HashMap<[u8; 32], (Instant, T)>>,
    cap: usize,
}

impl<T: Clone> Store<T> {
    /// An empty store of at most `cap` entries.
    pub fn new(cap: usize) -> Self {
        Self {
            entries: RwLock::new(HashMap::new()),
            cap,
        }
    }

    /// Stores `value` under `secret` until `expires`; expired entries make room first.
    pub fn insert(&self, secret: &str, expires: Instant, value: T) -> Result<(), Full> {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= self.cap {
            let now = Instant::now();
            entries.retain(|_, (until, _)| *until > now);
            if entries.len() >= self.cap {
                return Err(Full);
            }
        }
        entries.insert(key_of(secret), (expires, value));
        Ok(())
    }

    /// The live value under the secret whose hash is `key` (a read lock, a clone).
    pub fn get(&self, key: &[u8; 32]) -> Option<T> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let (until, value) = entries.get(key)?;
        (*until > Instant::now()).then(|| value.clone())
    }

    /// Removes and returns the live value under `secret`: single use.
    pub fn take(&self, secret: &str) -> Option<T> {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        let (until, value) = entries.remove(&key_of(secret))?;
        (until > Instant::now()).then_some(value)
    }

    /// Removes the entry under `key`.
    pub fn remove(&self, key: &[u8; 32]) {
        self.entries
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    /// Keeps only the entries `keep` says yes to.
    pub fn retain(&self, mut keep: impl FnMut(&T) -> bool) {
        self.entries
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, (_, value)| keep(value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn entries_are_single_use_expire_and_are_bounded() {
        let store = Store::new(2);
        let later = Instant::now() + Duration::from_secs(60);
        store.insert("a", later, 1).expect("room");
        assert_eq!(store.get(&key_of("a")), Some(1));
        assert_eq!(store.take("a"), Some(1));
        assert_eq!(store.take("a"), None, "single use");
        store.insert("b", Instant::now(), 2).expect("room");
        assert_eq!(store.get(&key_of("b")), None, "expired");
        store.insert("c", later, 3).expect("room");
        store
            .insert("d", later, 4)
            .expect("the expired one made room");
        assert_eq!(store.insert("e", later, 5), Err(Full));
    }
}
