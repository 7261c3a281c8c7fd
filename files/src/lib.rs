//! Private files, done one way everywhere: every secret or per-user file jobgate writes
//! (tokens files, resume key, state file, admin token, job files, URL files, certificates'
//! keys, Jupyter's token) and every private directory (job files, sockets).
//!
//! * [`write_atomically`]: readers see the old content or the new, never half; the file is
//!   0600 from its first byte (created with that mode, not chmod'ed after), its content and
//!   its directory entry are on disk when the call returns, and concurrent writers never
//!   share a temporary file.
//! * [`create_new`]: a file that must not exist yet (a freshly minted key), 0600, synced.
//! * [`ensure_dir`] and [`new_dir_in`]: 0700 directories.
//! * [`loose_bits`]: the permission bits a file should not have, for "refused like an ssh
//!   key" checks.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of every private file.
pub const FILE_MODE: u32 = 0o600;
/// Mode of every private directory.
pub const DIR_MODE: u32 = 0o700;
/// Bits that let group or others read, write or enter: a secret must have none.
pub const GROUP_OR_OTHER: u32 = 0o077;
/// Bits that let group or others write: a config file must have none.
pub const GROUP_OR_OTHER_WRITE: u32 = 0o022;

/// The directory a path lives in (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Replaces `path` with `bytes`, atomically and durably, mode 0600.
///
/// The temporary file is `.<name>.<pid>.<random>.tmp` beside the target (same file
/// system, so the rename is atomic), created exclusively: two writers, in one process or
/// several, never write into the same one. It is removed if anything fails.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = parent_dir(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.{}.{:016x}.tmp",
        std::process::id(),
        rand::random::<u64>()
    ));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&tmp)?;
        // The umask cannot loosen 0600, but it could tighten it to an unreadable 0400
        // for a mask like 0277: set it exactly.
        file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    // The rename is durable only once the directory entry is.
    std::fs::File::open(dir)?.sync_all()
}

/// Creates `path` with `bytes`, mode 0600, failing if it exists; synced to disk.
pub fn create_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::File::open(parent_dir(path))?.sync_all()
}

/// Makes `dir` (and any missing parents) 0700; tightens an existing `dir` that group or
/// others could enter (made earlier with a looser umask).
pub fn ensure_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    if std::fs::metadata(dir)?.mode() & GROUP_OR_OTHER != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))?;
    }
    Ok(())
}

/// A fresh 0700 directory `jobgate-<random>` in `base` (never an existing one).
pub fn new_dir_in(base: &Path) -> std::io::Result<PathBuf> {
    let dir = base.join(format!("jobgate-{:016x}", rand::random::<u64>()));
    std::fs::DirBuilder::new().mode(DIR_MODE).create(&dir)?;
    Ok(dir)
}

/// The file's permission bits if it has any of `forbidden` (e.g. [`GROUP_OR_OTHER`]),
/// else `None`.
pub fn loose_bits(path: &Path, forbidden: u32) -> std::io::Result<Option<u32>> {
    let mode = std::fs::metadata(path)?.mode() & 0o7777;
    Ok((mode & forbidden != 0).then_some(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "jobgate-files-{name}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("scratch");
        dir
    }

    #[test]
    fn atomic_writes_are_private_and_leave_no_temporary_file() {
        let dir = scratch("atomic");
        let path = dir.join("secret");
        write_atomically(&path, b"one").expect("first");
        write_atomically(&path, b"two").expect("second");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        assert_eq!(loose_bits(&path, 0o777 & !FILE_MODE).expect("mode"), None);
        assert_eq!(
            std::fs::metadata(&path).expect("meta").mode() & 0o777,
            FILE_MODE
        );
        let names: Vec<_> = std::fs::read_dir(&dir).expect("list").collect();
        assert_eq!(names.len(), 1, "a temporary file was left behind");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn concurrent_writers_never_share_a_temporary_file() {
        let dir = scratch("concurrent");
        let path = dir.join("file");
        let writers: Vec<_> = (0..16)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || write_atomically(&path, format!("{i}").as_bytes()))
            })
            .collect();
        for writer in writers {
            writer.join().expect("thread").expect("write");
        }
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.parse::<u32>().is_ok_and(|n| n < 16), "{text}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn create_new_refuses_an_existing_file() {
        let dir = scratch("create");
        let path = dir.join("key");
        create_new(&path, b"k").expect("create");
        assert!(create_new(&path, b"again").is_err());
        assert_eq!(std::fs::read(&path).expect("read"), b"k");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn directories_are_private_and_loose_ones_are_tightened() {
        let dir = scratch("dirs");
        let nested = dir.join("a/b");
        ensure_dir(&nested).expect("nested");
        assert_eq!(
            std::fs::metadata(&nested).expect("meta").mode() & 0o777,
            DIR_MODE
        );
        std::fs::set_permissions(&nested, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        ensure_dir(&nested).expect("again");
        assert_eq!(
            std::fs::metadata(&nested).expect("meta").mode() & 0o777,
            DIR_MODE
        );
        let fresh = new_dir_in(&dir).expect("fresh");
        assert_eq!(
            std::fs::metadata(&fresh).expect("meta").mode() & 0o777,
            DIR_MODE
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn loose_bits_name_the_mode() {
        let dir = scratch("bits");
        let path = dir.join("f");
        std::fs::write(&path, "x").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        assert_eq!(
            loose_bits(&path, GROUP_OR_OTHER).expect("bits"),
            Some(0o640)
        );
        assert_eq!(loose_bits(&path, GROUP_OR_OTHER_WRITE).expect("bits"), None);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
