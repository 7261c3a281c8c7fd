//! The user's token file, guarded like an ssh key: refused if group or others can read it.

use jobgate_protocol::Token;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Environment variable naming the token file.
pub const TOKEN_FILE_ENV: &str = "JOBGATE_TOKEN_FILE";

/// Why the token could not be loaded.
#[derive(Debug, Error)]
pub enum TokenError {
    /// No file given and none at the default place.
    #[error(
        "no token: pass --token-file, set JOBGATE_TOKEN_FILE, or put it in ~/.config/jobgate/token"
    )]
    Missing,
    /// The file could not be read.
    #[error("cannot read token file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// The file's mode lets others read it.
    #[error("token file {path} is readable by others (mode {mode:04o}): run `chmod 600 {path}`", path = .0.display(), mode = .1)]
    Exposed(PathBuf, u32),
    /// The file is empty.
    #[error("token file {0} is empty")]
    Empty(PathBuf),
}

/// The token file to use: the flag, then `$JOBGATE_TOKEN_FILE`, then the default.
pub fn token_path(flag: Option<PathBuf>) -> Option<PathBuf> {
    flag.or_else(|| std::env::var_os(TOKEN_FILE_ENV).map(PathBuf::from))
        .or_else(|| {
            let home = std::env::var_os("HOME")?;
            let path = PathBuf::from(home).join(".config/jobgate/token");
            path.exists().then_some(path)
        })
}

/// Reads the token, refusing a file readable by group or others.
pub fn load_token(flag: Option<PathBuf>) -> Result<Token, TokenError> {
    let path = token_path(flag).ok_or(TokenError::Missing)?;
    let loose = jobgate_files::loose_bits(&path, jobgate_files::GROUP_OR_OTHER)
        .map_err(|e| TokenError::Read(path.clone(), e))?;
    if let Some(mode) = loose {
        return Err(TokenError::Exposed(path, mode));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| TokenError::Read(path.clone(), e))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(TokenError::Empty(path));
    }
    Ok(Token(token.to_owned()))
}

/// Writes `contents` to `path` readable by the owner only (0600), atomically.
pub fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    jobgate_files::write_atomically(path, contents.as_bytes())
}
