//! Agent tokens: one entry per user in a TOML file, holding only the SHA-256 of the token.
//!
//! ```toml
//! [[token]]
//! user = "alice"
//! sha256 = "9f86d0…"
//! ```
//! A presented token is hashed and compared in constant time against every entry.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use subtle::ConstantTimeEq;
use thiserror::Error;

/// Random bytes in a token (256 bits).
pub const TOKEN_BYTES: usize = 32;
/// Prefix that makes a jobgate token recognisable (e.g. by secret scanners).
pub const TOKEN_PREFIX: &str = "jgt_";

/// Why the tokens file could not be used.
#[derive(Debug, Error)]
pub enum TokensError {
    /// The file could not be read or written.
    #[error("tokens file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("tokens file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A user name is empty or holds characters other than `[A-Za-z0-9._-]`.
    #[error("invalid user name {0:?}")]
    BadUser(String),
}

/// One user's entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// The user the token belongs to.
    pub user: String,
    /// Hex SHA-256 of the token.
    pub sha256: String,
    /// Live sessions this user may hold (overrides the relay default).
    /// (`max_mappings`, the key's old name, is still read.)
    #[serde(
        default,
        alias = "max_mappings",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_sessions: Option<usize>,
    /// When the token was issued (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<u64>,
    /// Where the token came from: absent for `jobgate token issue`, `"login"` for a
    /// self-service token minted after a single sign-on (`jobgate login`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// When the token stops working (Unix seconds); absent: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
}

/// `origin` of the tokens `jobgate login` mints.
pub const LOGIN_ORIGIN: &str = "login";
/// Most unexpired login tokens a user keeps: each `jobgate login` adds one (a token in use
/// by running jobs must not be replaced under them); past this, the oldest goes.
pub const MAX_LOGIN_TOKENS_PER_USER: usize = 8;

/// The tokens file's contents.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensFile {
    /// Entries, one per user.
    #[serde(default, rename = "token")]
    pub tokens: Vec<TokenEntry>,
}

/// What a verified token says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user name.
    pub user: String,
    /// The user's own session limit, if the entry sets one.
    pub max_sessions: Option<usize>,
    /// SHA-256 of the token that was presented: a session remembers it (never the token)
    /// so that re-issuing or revoking the token closes the sessions it opened.
    pub token_sha256: [u8; 32],
}

fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if text.len() != 64 {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// First line of every tokens file written by jobgate.
const TOKENS_FILE_HEADER: &str = "# jobgate agent tokens: only SHA-256 hashes are stored here.\n";

/// Takes an exclusive `flock` on `<path>.lock`, created 0600 if missing; released when
/// the returned guard drops (or the process dies, so a crash never leaves it stuck).
fn lock_exclusive(path: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, TokensError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let io = |source| TokensError::Io {
        path: lock_path.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io)?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, errno)| io(std::io::Error::from(errno)))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn valid_user(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= 64
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl TokensFile {
    /// Reads a tokens file; a missing file is an empty one.
    pub fn read(path: &Path) -> Result<Self, TokensError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(TokensError::Io {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        let file: Self = toml::from_str(&text).map_err(|e| TokensError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        for entry in &file.tokens {
            if !valid_user(&entry.user) || unhex(&entry.sha256).is_none() {
                return Err(TokensError::Parse {
                    path: path.to_owned(),
                    message: format!("bad entry for user {:?}", entry.user),
                });
            }
        }
        Ok(file)
    }

    /// Reads, changes and writes the file under an exclusive lock, so that concurrent
    /// `jobgate token` runs never lose each other's entries. The lock is an `flock` on
    /// `<tokens>.lock` (mode 0600, beside the file), held from before the read until the
    /// new file is in place; `change` returns what the caller reports.
    pub fn update<T>(
        path: &Path,
        change: impl FnOnce(&mut Self) -> Result<T, TokensError>,
    ) -> Result<T, TokensError> {
        let _lock = lock_exclusive(path)?;
        let mut file = Self::read(path)?;
        let result = change(&mut file)?;
        file.write(path)?;
        Ok(result)
    }

    /// Writes the file atomically, mode 0600: a temporary file of its own in the same
    /// directory (so concurrent writers never share one), fsync, rename, fsync of the
    /// directory (so the rename survives a crash). Prefer [`TokensFile::update`], which
    /// also keeps concurrent writers from losing each other's entries.
    pub fn write(&self, path: &Path) -> Result<(), TokensError> {
        let io = |source| TokensError::Io {
            path: path.to_owned(),
            source,
        };
        let text = toml::to_string(self).map_err(|e| TokensError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let mut contents = String::from(TOKENS_FILE_HEADER);
        contents.push_str(&text);
        jobgate_files::write_atomically(path, contents.as_bytes()).map_err(io)
    }

    /// Mints a new token for `user`, replacing any earlier one, and returns it. Only its
    /// hash is kept; the caller shows the token once.
    pub fn issue(
        &mut self,
        user: &str,
        max_sessions: Option<usize>,
        now: u64,
    ) -> Result<String, TokensError> {
        if !valid_user(user) {
            return Err(TokensError::BadUser(user.to_owned()));
        }
        let token = format!("{TOKEN_PREFIX}{}", crate::names::random_secret(TOKEN_BYTES));
        self.tokens.retain(|e| e.user != user);
        self.tokens.push(TokenEntry {
            user: user.to_owned(),
            sha256: hex(&hash(&token)),
            max_sessions,
            created: Some(now),
            origin: None,
            expires: None,
        });
        Ok(token)
    }

    /// Mints a self-service token for `user`, valid for `ttl_secs`, beside the user's other
    /// tokens (running jobs keep theirs); drops expired entries and the user's oldest login
    /// tokens past [`MAX_LOGIN_TOKENS_PER_USER`].
    pub fn issue_login(
        &mut self,
        user: &str,
        ttl_secs: u64,
        now: u64,
    ) -> Result<String, TokensError> {
        if !valid_user(user) {
            return Err(TokensError::BadUser(user.to_owned()));
        }
        self.tokens.retain(|e| e.expires.is_none_or(|at| at > now));
        let is_users_login =
            |e: &TokenEntry| e.user == user && e.origin.as_deref() == Some(LOGIN_ORIGIN);
        while self.tokens.iter().filter(|e| is_users_login(e)).count() >= MAX_LOGIN_TOKENS_PER_USER
        {
            let oldest = self
                .tokens
                .iter()
                .enumerate()
                .filter(|(_, e)| is_users_login(e))
                .min_by_key(|(_, e)| e.created.unwrap_or(0))
                .map(|(i, _)| i);
            match oldest {
                Some(i) => {
                    self.tokens.remove(i);
                }
                None => break,
            }
        }
        let max_sessions = self
            .tokens
            .iter()
            .find(|e| e.user == user)
            .and_then(|e| e.max_sessions);
        let token = format!("{TOKEN_PREFIX}{}", crate::names::random_secret(TOKEN_BYTES));
        self.tokens.push(TokenEntry {
            user: user.to_owned(),
            sha256: hex(&hash(&token)),
            max_sessions,
            created: Some(now),
            origin: Some(LOGIN_ORIGIN.to_owned()),
            expires: Some(now.saturating_add(ttl_secs)),
        });
        Ok(token)
    }

    /// Removes `user`'s token; returns whether there was one.
    pub fn revoke(&mut self, user: &str) -> bool {
        let before = self.tokens.len();
        self.tokens.retain(|e| e.user != user);
        before != self.tokens.len()
    }
}

struct Loaded {
    hash: [u8; 32],
    identity: Identity,
    /// When the token stops working (Unix seconds).
    expires: Option<u64>,
}

/// The entries of one read of the tokens file.
#[derive(Default)]
struct Entries {
    /// Scanned in full, in constant time, for every presented token.
    list: Vec<Loaded>,
    /// The same hashes, to check quickly on reload whether a live session's token is
    /// still in the file (these hashes come from tokens already verified, not from an
    /// attacker probing, so a hash-set lookup leaks nothing useful).
    hashes: HashSet<[u8; 32]>,
}

/// The relay's in-memory view of the tokens file.
pub struct TokenStore {
    path: PathBuf,
    entries: RwLock<Entries>,
    /// (modification time, length) of the file when last read, to notice changes.
    stamp: std::sync::Mutex<Option<(std::time::SystemTime, u64)>>,
}

impl TokenStore {
    /// Loads the tokens file.
    pub fn load(path: &Path) -> Result<Self, TokensError> {
        let store = Self {
            path: path.to_owned(),
            entries: RwLock::new(Entries::default()),
            stamp: std::sync::Mutex::new(None),
        };
        store.reload()?;
        Ok(store)
    }

    fn current_stamp(&self) -> Option<(std::time::SystemTime, u64)> {
        let meta = std::fs::metadata(&self.path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    }

    /// Re-reads the file if it changed since the last read. Returns whether it did.
    pub fn reload_if_changed(&self) -> Result<bool, TokensError> {
        let now = self.current_stamp();
        if now == *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) {
            return Ok(false);
        }
        self.reload()?;
        Ok(true)
    }

    /// Re-reads the file; on error the previous entries stay in force.
    pub fn reload(&self) -> Result<usize, TokensError> {
        let stamp = self.current_stamp();
        let file = TokensFile::read(&self.path)?;
        *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) = stamp;
        let list: Vec<Loaded> = file
            .tokens
            .into_iter()
            .filter_map(|e| {
                let hash = unhex(&e.sha256)?;
                Some(Loaded {
                    hash,
                    expires: e.expires,
                    identity: Identity {
                        user: e.user,
                        max_sessions: e.max_sessions,
                        token_sha256: hash,
                    },
                })
            })
            .collect();
        let count = list.len();
        let hashes = list.iter().map(|e| e.hash).collect();
        *self.entries.write().unwrap_or_else(|e| e.into_inner()) = Entries { list, hashes };
        Ok(count)
    }

    /// Who holds `token`, if anyone. Compares against every entry in constant time, so
    /// neither the match position nor a near miss shows in the timing.
    pub fn verify(&self, token: &str) -> Option<Identity> {
        let presented = hash(token);
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let mut found = None;
        for entry in entries.list.iter() {
            if bool::from(entry.hash.ct_eq(&presented)) {
                found = Some((entry.identity.clone(), entry.expires));
            }
        }
        let (identity, expires) = found?;
        // An expired (login) token opens nothing new; sessions it opened run on.
        expires.is_none_or(|at| at > unix_now()).then_some(identity)
    }

    /// Whether `user` still has a token entry.
    pub fn has_user(&self, user: &str) -> bool {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries.list.iter().any(|e| e.identity.user == user)
    }

    /// Every user with a token, sorted.
    pub fn users(&self) -> Vec<String> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let mut users: Vec<String> = entries
            .list
            .iter()
            .map(|e| e.identity.user.clone())
            .collect();
        users.sort();
        users.dedup();
        users
    }

    /// The session limit the tokens file sets for `user`, if it sets one.
    pub fn max_sessions_of(&self, user: &str) -> Option<usize> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries
            .list
            .iter()
            .find(|e| e.identity.user == user)
            .and_then(|e| e.identity.max_sessions)
    }

    /// Whether a token with this SHA-256 is still in the file (not re-issued or revoked).
    pub fn holds_hash(&self, token_sha256: &[u8; 32]) -> bool {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries.hashes.contains(token_sha256)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_tokens_sit_beside_the_users_token_expire_and_are_capped() {
        let dir = std::env::temp_dir().join(format!("jobgate-login-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("tokens.toml");
        let now = unix_now();
        let mut file = TokensFile::default();
        let admin_issued = file.issue("alice", Some(3), now).expect("issue");
        let fresh = file.issue_login("alice", 3600, now).expect("login");
        // Issued (and pruning) as of 10 s ago, valid for 0 s: expired now.
        let expired = file.issue_login("alice", 0, now - 10).expect("login");
        assert_eq!(file.tokens.len(), 3, "no replacement");
        file.write(&path).expect("write");
        let store = TokenStore::load(&path).expect("load");
        assert!(store.verify(&admin_issued).is_some());
        assert!(store.verify(&fresh).is_some());
        assert_eq!(store.verify(&fresh).map(|i| i.max_sessions), Some(Some(3)));
        assert!(store.verify(&expired).is_none(), "expired");
        for _ in 0..2 * MAX_LOGIN_TOKENS_PER_USER {
            file.issue_login("alice", 3600, now).expect("login");
        }
        let logins = file
            .tokens
            .iter()
            .filter(|e| e.origin.as_deref() == Some(LOGIN_ORIGIN))
            .count();
        assert_eq!(logins, MAX_LOGIN_TOKENS_PER_USER);
        assert!(
            file.tokens.iter().any(|e| e.origin.is_none()),
            "the admin's token stays"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn issued_token_verifies_and_only_its_hash_is_stored() {
        let dir = std::env::temp_dir().join(format!("jobgate-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("tokens.toml");
        let mut file = TokensFile::default();
        let token = file.issue("alice", Some(3), 1).expect("issue");
        assert!(token.starts_with(TOKEN_PREFIX) && token.len() > 50);
        file.write(&path).expect("write");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(!text.contains(&token[TOKEN_PREFIX.len()..]));

        let store = TokenStore::load(&path).expect("load");
        assert_eq!(
            store.verify(&token),
            Some(Identity {
                user: "alice".into(),
                max_sessions: Some(3),
                token_sha256: hash(&token),
            })
        );
        assert_eq!(store.verify("jgt_wrong"), None);
        assert!(store.holds_hash(&hash(&token)));

        let mut file = TokensFile::read(&path).expect("read");
        assert!(file.revoke("alice"));
        file.write(&path).expect("write");
        store.reload().expect("reload");
        assert_eq!(store.verify(&token), None);
        assert!(!store.holds_hash(&hash(&token)));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn the_old_max_mappings_key_is_still_read() {
        let file: TokensFile =
            toml::from_str("[[token]]\nuser = \"a\"\nsha256 = \"00\"\nmax_mappings = 3\n")
                .expect("old key");
        assert_eq!(file.tokens[0].max_sessions, Some(3));
    }

    #[test]
    fn bad_user_names_are_refused() {
        let mut file = TokensFile::default();
        assert!(file.issue("", None, 0).is_err());
        assert!(file.issue("a b", None, 0).is_err());
        assert!(file.issue("a\"]\n[x", None, 0).is_err());
    }
}
