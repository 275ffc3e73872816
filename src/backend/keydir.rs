//! The key directory: the one place that opens key-store files.
//!
//! An owner-only directory (mode 0700, owned by the effective user) holding one file per key or
//! object. Files are read without following symbolic links and only when they are regular files
//! owned by us with no group or other permission bits; they are written atomically (a temporary
//! file, fsync, rename, fsync of the directory) with mode 0600. An exclusive `flock` on a lock file
//! serializes writers across processes.
//!
//! This is the path-based minimal form of the module's API; the fd-relative implementation
//! (`openat` on a held directory descriptor) keeps the same names.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::backend::{BackendError, Result};

/// The largest store file this module reads.
const MAX_FILE: u64 = 1 << 20;
/// The name of the lock file inside the directory.
const LOCK_FILE: &str = ".lock";
/// The prefix of temporary files (skipped by [`KeyDir::list`]).
const TEMP_PREFIX: &str = ".tmp-";

/// An opened, checked, owner-only key directory.
#[derive(Debug)]
pub struct KeyDir {
    path: PathBuf,
}

/// An exclusive lock on a key directory, held until dropped.
#[derive(Debug)]
pub struct KeyDirLock {
    _file: File,
}

fn io_err(what: &str, path: &Path, e: &std::io::Error) -> BackendError {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
            BackendError::Full(format!("{what} {}: {e}", path.display()))
        }
        _ => BackendError::Io(format!("{what} {}: {e}", path.display())),
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn check_name(name: &str) -> Result<()> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(BackendError::NotFound(format!(
            "invalid key-store file name {name:?}"
        )))
    }
}

impl KeyDir {
    /// Opens the directory, creating it with mode 0700 if missing; refuses a directory that is a
    /// symbolic link, not ours, or accessible to group or others.
    pub fn open(path: &Path) -> Result<KeyDir> {
        if !path.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
                .map_err(|e| io_err("cannot create the key directory", path, &e))?;
        }
        let meta = fs::symlink_metadata(path)
            .map_err(|e| io_err("cannot inspect the key directory", path, &e))?;
        if !meta.is_dir() {
            return Err(BackendError::Unusable(format!(
                "the key directory {} is not a directory (or is a symbolic link)",
                path.display()
            )));
        }
        let uid = rustix::process::geteuid().as_raw();
        if meta.uid() != uid {
            return Err(BackendError::Unusable(format!(
                "the key directory {} belongs to uid {}, not to this user ({uid})",
                path.display(),
                meta.uid()
            )));
        }
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(BackendError::Unusable(format!(
                "the key directory {} is accessible to others (mode {mode:04o}); `chmod 700` it",
                path.display()
            )));
        }
        Ok(KeyDir {
            path: path.to_path_buf(),
        })
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The names of the files in the directory (hidden and temporary files left out).
    pub fn list(&self) -> Result<Vec<String>> {
        let entries = fs::read_dir(&self.path)
            .map_err(|e| io_err("cannot list the key directory", &self.path, &e))?;
        let mut names = Vec::new();
        for entry in entries {
            let entry =
                entry.map_err(|e| io_err("cannot list the key directory", &self.path, &e))?;
            if let Some(name) = entry.file_name().to_str() {
                if valid_name(name) {
                    names.push(name.to_string());
                }
            }
        }
        names.sort();
        Ok(names)
    }

    /// Reads a file: `None` when absent; an error when it is not a regular file of ours with
    /// mode bits for us only, or larger than 1 MiB.
    pub fn read(&self, name: &str) -> Result<Option<Zeroizing<Vec<u8>>>> {
        check_name(name)?;
        let path = self.path.join(name);
        let file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("cannot open", &path, &e)),
        };
        let meta = file
            .metadata()
            .map_err(|e| io_err("cannot inspect", &path, &e))?;
        if !meta.is_file() {
            return Err(BackendError::Io(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        if meta.uid() != rustix::process::geteuid().as_raw() || meta.mode() & 0o077 != 0 {
            return Err(BackendError::Io(format!(
                "{} is not owned by this user or is accessible to others",
                path.display()
            )));
        }
        if meta.len() > MAX_FILE {
            return Err(BackendError::Io(format!("{} is too large", path.display())));
        }
        let mut buf = Zeroizing::new(Vec::with_capacity(meta.len() as usize));
        file.take(MAX_FILE + 1)
            .read_to_end(&mut buf)
            .map_err(|e| io_err("cannot read", &path, &e))?;
        Ok(Some(buf))
    }

    /// Replaces (or creates) a file atomically, mode 0600, durable when this returns.
    pub fn write_atomic(&self, name: &str, bytes: &[u8]) -> Result<()> {
        check_name(name)?;
        let mut suffix = [0u8; 8];
        getrandom::getrandom(&mut suffix)
            .map_err(|e| BackendError::Io(format!("no randomness for a temporary name: {e}")))?;
        let temp = self
            .path
            .join(format!("{TEMP_PREFIX}{}", crate::encoding::hex(&suffix)));
        let target = self.path.join(name);
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&temp)
                .map_err(|e| io_err("cannot create", &temp, &e))?;
            file.write_all(bytes)
                .and_then(|()| file.sync_all())
                .map_err(|e| io_err("cannot write", &temp, &e))?;
            fs::rename(&temp, &target).map_err(|e| io_err("cannot rename onto", &target, &e))?;
            self.sync_dir()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
    }

    /// Deletes a file; `NotFound` when it does not exist.
    pub fn remove(&self, name: &str) -> Result<()> {
        check_name(name)?;
        let path = self.path.join(name);
        match fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(BackendError::NotFound(name.to_string()))
            }
            Err(e) => Err(io_err("cannot remove", &path, &e)),
        }
    }

    /// Takes the directory's exclusive lock (blocks until it is free).
    pub fn lock(&self) -> Result<KeyDirLock> {
        let path = self.path.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| io_err("cannot open the lock file", &path, &e))?;
        loop {
            match rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive) {
                Ok(()) => break,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    return Err(io_err("cannot lock", &path, &std::io::Error::from(e)));
                }
            }
        }
        Ok(KeyDirLock { _file: file })
    }

    /// A value that changes when a file is added, replaced or removed (the directory's mtime).
    pub fn change_marker(&self) -> Option<u128> {
        let meta = fs::metadata(&self.path).ok()?;
        let ns = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
        Some(ns as u128)
    }

    fn sync_dir(&self) -> Result<()> {
        File::open(&self.path)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err("cannot sync the key directory", &self.path, &e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_round_trip_and_are_owner_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = KeyDir::open(&tmp.path().join("d")).unwrap();
        let mode = fs::metadata(dir.path()).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(dir.read("a.key").unwrap().is_none());
        dir.write_atomic("a.key", b"one").unwrap();
        dir.write_atomic("a.key", b"two").unwrap();
        assert_eq!(dir.read("a.key").unwrap().unwrap().as_slice(), b"two");
        let mode = fs::metadata(dir.path().join("a.key")).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let _lock = dir.lock().unwrap();
        assert_eq!(dir.list().unwrap(), vec!["a.key".to_string()]);
        dir.remove("a.key").unwrap();
        assert!(matches!(
            dir.remove("a.key"),
            Err(BackendError::NotFound(_))
        ));
        assert!(dir.read("../x").is_err());
    }

    #[test]
    fn open_directories_and_links_are_refused() {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let tmp = tempfile::tempdir().unwrap();
        let open_dir = tmp.path().join("open");
        fs::create_dir(&open_dir).unwrap();
        fs::set_permissions(&open_dir, fs::Permissions::from_mode(0o770)).unwrap();
        assert!(matches!(
            KeyDir::open(&open_dir),
            Err(BackendError::Unusable(m)) if m.contains("chmod 700")
        ));
        let dir = KeyDir::open(&tmp.path().join("d")).unwrap();
        fs::write(tmp.path().join("target"), b"secret").unwrap();
        symlink(tmp.path().join("target"), dir.path().join("link.key")).unwrap();
        assert!(dir.read("link.key").is_err());
        let loose = dir.path().join("loose.key");
        fs::write(&loose, b"x").unwrap();
        fs::set_permissions(&loose, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(dir.read("loose.key").is_err());
    }
}
