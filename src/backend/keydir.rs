//! The owner-only key directory shared by the software and the TPM key stores: the only code
//! that opens their files.
//!
//! **One permission policy.** A key directory is used only when
//! - every ancestor (from `/` down) is owned by this user or by root, and is not writable by
//!   others (or by a group other than the user's own) unless it has the sticky bit: otherwise
//!   another user could rename the key directory away and put a directory of theirs in its place;
//! - the directory itself is owned by this user and has no group or other bits (0700; a
//!   directory this module creates is made exactly 0700);
//! - every file loaded from it is a regular file (never a symlink), owned by this user, with no
//!   group or other bits. Anything else is refused and logged once per file and process.
//!
//! **Reached through one descriptor.** The directory is opened once with
//! `O_DIRECTORY | O_NOFOLLOW`; every file is reached relative to that descriptor with
//! `O_NOFOLLOW`, so a symlink swapped in for the directory or a file is never followed. Before
//! each reload and write, the directory's path must still name the opened directory (same device
//! and inode) and its ancestors must still pass: a directory replaced under a running process is
//! refused, it is never silently followed.
//!
//! **Writes are atomic**: a temporary file `.<name>.<random>.tmp` (0600), fsync, rename over the
//! target, fsync of the directory. Temporary files left by a crash are removed by
//! [`KeyDir::remove_stale_temp_files`].
//!
//! **Change marker**: the directory's mtime and a counter in `.lock` (bumped by
//! [`KeyDirLock::bump`]), so another process's change is seen even within one mtime tick.
//!
//! **Stamp**: `.lock` also holds the directory's mtime and inode as they were when the store's
//! caches (its index and lookup hints) last matched its files. Opening a store compares it with
//! the directory (one `fstat`, one 32-byte read) instead of listing the directory. Every file
//! created, replaced or removed changes the directory's mtime, so a file added, replaced or
//! removed by anything else makes the stamp stale and the next lookup checks the whole
//! directory. A holder of the lock carries the stamp over its own changes: each rename or
//! removal through this module checks the mtime before and after, and the stamp is written
//! when the lock is released only when every change in between was one of its own. Before its
//! first change the holder clears the stamp on disk (a change within the clock tick of the
//! directory's last one does not move the mtime, so a crash mid-change must not find the old
//! stamp still matching). A change
//! that makes the caches disagree with the files without touching the directory (the index
//! forgetting a name before its file is rewritten) clears the stamp on disk first and keeps it
//! from being written until the change is closed ([`KeyDirLock::open_change`]), so a crash in
//! between leaves no stamp. What this cannot tell apart: a change made by hand within the same
//! clock tick (a few milliseconds) right after a change of devicekey's.
//!
//! [`diagnose`] reports the same problems, each with its fix, without opening anything.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rustix::fd::OwnedFd;
use rustix::fs::{AtFlags, FlockOperation, Mode, OFlags, CWD};
use zeroize::Zeroizing;

use crate::backend::{BackendError, Result};

mod policy;

pub use policy::diagnose;
use policy::{ancestor_problem, dir_problem, file_problem};

/// The lock file: held with `flock` around changes; its first 8 bytes count the changes, the
/// next [`STAMP_LEN`] hold the stamp.
const LOCK_FILE: &str = ".lock";
/// Where the stamp is in `.lock`.
const STAMP_AT: u64 = 8;
/// The stamp: a tag, the directory's mtime (ns) and inode, and a check of those.
const STAMP_LEN: usize = 32;
const STAMP_TAG: &[u8; 8] = b"dkstamp1";
/// How long after the directory's last change a full check may write a stamp: a change made
/// later is then sure to get another mtime, whatever the clock's tick.
const STAMP_SETTLED: Duration = Duration::from_millis(100);
/// The suffix of temporary files.
const TMP_SUFFIX: &str = ".tmp";
/// The largest file [`KeyDir::read`] accepts.
pub const MAX_FILE: u64 = 16 * 1024 * 1024;

/// How ancestors are opened while walking down: without needing read permission on them.
#[cfg(any(target_os = "linux", target_os = "android"))]
const WALK_FLAGS: OFlags = OFlags::PATH;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const WALK_FLAGS: OFlags = OFlags::RDONLY;

/// An opened, checked, owner-only key directory (it holds the directory's descriptor).
pub struct KeyDir {
    path: PathBuf,
    fd: OwnedFd,
    dev: rustix::fs::Dev,
    ino: u64,
    /// A read-only handle on `.lock`, to read the change counter without taking the lock.
    counter: Mutex<Option<File>>,
    /// While this process holds the lock: the stamp carried over its own changes.
    chain: Arc<Mutex<Chain>>,
}

/// The stamp a lock holder carries: `expected` is the mtime the directory has after this
/// holder's last change, `None` once something else changed it (or nothing vouched for it).
#[derive(Default)]
struct Chain {
    start: Option<u64>,
    expected: Option<u64>,
    /// The stamp in `.lock` was cleared for a change made in place (see
    /// [`KeyDirLock::open_change`]).
    cleared: bool,
    /// The names whose change is open: no stamp is written while there is one.
    open: HashSet<String>,
    /// A handle on `.lock` to clear the stamp with.
    writer: Option<File>,
}

impl Chain {
    /// Clears the stamp on disk (and syncs it) before this holder's first change, so a crash
    /// anywhere before the release leaves no stamp: a change within the clock tick of the
    /// directory's last one does not move its mtime, so the mtime alone cannot show it.
    fn clear_on_disk(&mut self) {
        if self.expected.is_none() || self.cleared {
            return;
        }
        self.cleared = true;
        self.start = None;
        let cleared = self.writer.as_ref().map(|f| {
            f.write_all_at(&[0; STAMP_LEN], STAMP_AT)
                .and_then(|()| f.sync_data())
        });
        if !matches!(cleared, Some(Ok(()))) {
            log::debug!("cannot clear the stamp; none is written on release");
            self.expected = None;
        }
    }
}

crate::redact::debug_shows!(KeyDir: path);

/// The exclusive lock on a key directory, held until dropped.
pub struct KeyDirLock {
    file: File,
    path: PathBuf,
    ino: u64,
    chain: Arc<Mutex<Chain>>,
}

impl Drop for KeyDirLock {
    /// Writes the stamp carried over this holder's changes, before the lock is released.
    fn drop(&mut self) {
        let Ok(mut chain) = self.chain.lock() else {
            return;
        };
        let chain = std::mem::take(&mut *chain);
        let expected = chain.expected.filter(|_| chain.open.is_empty());
        if let Some(mtime) = expected.filter(|m| chain.start != Some(*m)) {
            self.write_stamp(&encode_stamp(mtime, self.ino));
        }
    }
}

impl KeyDirLock {
    /// Says the caches may no longer match the files (a cache write failed): the stamp is
    /// cleared now, so the next lookup checks the whole directory.
    pub fn taint(&self) {
        if let Ok(mut chain) = self.chain.lock() {
            *chain = Chain::default();
        }
        self.write_stamp(&[0; STAMP_LEN]);
    }

    /// Says the caches are about to disagree with the files about `name` without the directory
    /// changing (the index forgets a name before its file is rewritten): the stamp in `.lock` is
    /// cleared (and synced) first, so a crash before the change is closed leaves no valid stamp
    /// behind, and no stamp is written on release until [`Self::close_change`] says the caches
    /// show `name` again. A change that fails half-way (a full disk) stays open, so the next
    /// lookup makes a full check.
    pub fn open_change(&self, name: &str) {
        if let Ok(mut chain) = self.chain.lock() {
            chain.open.insert(name.to_string());
            chain.clear_on_disk();
        }
    }

    /// Closes what [`Self::open_change`] opened: the caches show `name` as its file is again.
    pub fn close_change(&self, name: &str) {
        if let Ok(mut chain) = self.chain.lock() {
            chain.open.remove(name);
        }
    }

    /// Called by a full check, with the directory's mtime taken under this lock before it
    /// listed the directory: from now on the caches it writes match the files as of `mtime`.
    /// Ignored when `mtime` is too recent for a later change to be sure to move it.
    pub fn vouch(&self, mtime: u64) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        if now.saturating_sub(mtime) < STAMP_SETTLED.as_nanos() as u64 {
            log::debug!("{}: changed too recently to stamp", self.path.display());
            return;
        }
        if let Ok(mut chain) = self.chain.lock() {
            chain.expected = Some(mtime);
        }
    }

    fn write_stamp(&self, stamp: &[u8; STAMP_LEN]) {
        if let Err(e) = self.file.write_all_at(stamp, STAMP_AT) {
            log::debug!("cannot write the stamp in {}: {e}", self.path.display());
        }
    }

    /// Counts one change in `.lock`, so other processes' [`KeyDir::change_marker`] moves.
    pub fn bump(&self) {
        let mut count = [0u8; 8];
        let n = self.file.read_at(&mut count, 0).unwrap_or(0);
        let next = if n == 8 { u64::from_le_bytes(count) } else { 0 }.wrapping_add(1);
        if let Err(e) = self.file.write_all_at(&next.to_le_bytes(), 0) {
            log::warn!(
                "cannot update the change counter {}: {e}",
                self.path.display()
            );
        }
    }
}

fn errno_io(e: rustix::io::Errno) -> std::io::Error {
    std::io::Error::from(e)
}

fn io_err(what: &str, path: &Path, e: &std::io::Error) -> BackendError {
    let msg = format!("{what} {}: {e}", path.display());
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => BackendError::Full(msg),
        _ => BackendError::Io(msg),
    }
}

fn unusable(msg: String) -> BackendError {
    log_once(&msg);
    BackendError::Unusable(msg)
}

/// Logs `msg` as an error the first time this process sees it.
pub(crate) fn log_once(msg: &str) {
    static SEEN: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let first = SEEN
        .get_or_init(|| Mutex::new(HashSet::new()))
        .lock()
        .map(|mut seen| seen.insert(msg.to_string()))
        .unwrap_or(true);
    if first {
        log::error!("{msg}");
    }
}

/// True for a name a store may use: not empty, no `/`, no NUL, not `.`/`..`, no leading `.`
/// (dot files are this module's own: the lock and temporary files).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\0']) && name.len() <= 255
}

fn check_name(name: &str) -> Result<()> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(BackendError::NotFound(format!(
            "{name:?} is not a valid file name"
        )))
    }
}

fn random_hex() -> Result<String> {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b)
        .map_err(|e| BackendError::Crypto(format!("random number generator failed: {e}")))?;
    Ok(crate::encoding::hex(&b))
}

/// The absolute, lexically clean form of `path` (relative paths are taken from the current
/// directory; `.` and `..` are resolved later by `canonicalize`).
fn absolute(path: &Path) -> Result<PathBuf> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    std::env::current_dir()
        .map(|cwd| cwd.join(path))
        .map_err(|e| io_err("cannot resolve", path, &e))
}

/// Walks from `/` to the parent of `canonical` without following symlinks, checking every
/// ancestor; returns the parent's descriptor.
fn walk_ancestors(canonical: &Path) -> Result<OwnedFd> {
    let mut fd = rustix::fs::openat(
        CWD,
        "/",
        WALK_FLAGS | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err("cannot open", Path::new("/"), &errno_io(e)))?;
    let mut here = PathBuf::from("/");
    let parent = canonical.parent().unwrap_or(Path::new("/"));
    for comp in parent.components() {
        let Component::Normal(name) = comp else {
            continue;
        };
        let st = rustix::fs::fstat(&fd).map_err(|e| io_err("cannot stat", &here, &errno_io(e)))?;
        if let Some(p) = ancestor_problem(canonical, &here, &st) {
            return Err(unusable(p));
        }
        here.push(name);
        fd = rustix::fs::openat(
            &fd,
            name,
            WALK_FLAGS | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            unusable(format!(
                "the key directory {} is unsafe: cannot open its ancestor {} without following \
                 a symlink ({}); set the slot's `dir` to its real path",
                canonical.display(),
                here.display(),
                errno_io(e)
            ))
        })?;
    }
    let st = rustix::fs::fstat(&fd).map_err(|e| io_err("cannot stat", &here, &errno_io(e)))?;
    if let Some(p) = ancestor_problem(canonical, &here, &st) {
        return Err(unusable(p));
    }
    Ok(fd)
}

/// Creates `path` (and missing parents) mode 0700 when it does not exist.
fn create_missing(path: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if std::fs::symlink_metadata(path).is_ok() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| {
            unusable(format!(
                "cannot create the key directory {}: {e}; create it (mode 0700) or set the \
                 slot's `dir` to a writable place",
                path.display()
            ))
        })?;
    // The umask may have removed bits, never added any; make it exactly 0700.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| io_err("cannot set the mode of", path, &e))?;
    log::info!("created key directory {}", path.display());
    Ok(())
}

impl KeyDir {
    /// Opens the key directory, creating it (0700) when missing. Refuses it (logging why, with
    /// the fix) when an ancestor, the directory or its owner breaks the policy of this module.
    pub fn open(path: &Path) -> Result<KeyDir> {
        let wanted = absolute(path)?;
        create_missing(&wanted)?;
        // Symlinks the user set up (a home on another volume...) are resolved once, here; from
        // now on the real path is walked without following any.
        let canonical = std::fs::canonicalize(&wanted).map_err(|e| {
            unusable(format!(
                "cannot use the key directory {}: {e}",
                wanted.display()
            ))
        })?;
        let parent = walk_ancestors(&canonical)?;
        let name = canonical.file_name().unwrap_or_default();
        let fd = rustix::fs::openat(
            &parent,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            unusable(format!(
                "cannot open the key directory {}: {}",
                canonical.display(),
                errno_io(e)
            ))
        })?;
        let st =
            rustix::fs::fstat(&fd).map_err(|e| io_err("cannot stat", &canonical, &errno_io(e)))?;
        if let Some(p) = dir_problem(&canonical, &st) {
            return Err(unusable(p));
        }
        let dir = KeyDir {
            path: canonical,
            fd,
            dev: st.st_dev,
            ino: st.st_ino,
            counter: Mutex::new(None),
            chain: Arc::new(Mutex::new(Chain::default())),
        };
        dir.open_counter();
        Ok(dir)
    }

    /// The directory's path (resolved when it was opened).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks that the path still names the directory opened, and that its ancestors are still
    /// safe. A directory replaced (renamed away, a symlink or another directory put in its
    /// place) is refused.
    pub fn verify(&self) -> Result<()> {
        self.verify_identity()?;
        walk_ancestors(&self.path).map(drop)
    }

    fn verify_identity(&self) -> Result<()> {
        let now = rustix::fs::statat(CWD, &self.path, AtFlags::SYMLINK_NOFOLLOW);
        match now {
            Ok(st) if st.st_dev == self.dev && st.st_ino == self.ino => Ok(()),
            Ok(_) | Err(_) => Err(unusable(format!(
                "the key directory {} was replaced since it was opened (it is now another \
                 directory, a symlink or gone); refusing it. Fix: find out who replaced it, put \
                 the original back, and restart the program",
                self.path.display()
            ))),
        }
    }

    /// The names of the files in the directory (its own dot files left out), sorted.
    pub fn list(&self) -> Result<Vec<String>> {
        self.verify()?;
        let mut dir = rustix::fs::Dir::read_from(&self.fd)
            .map_err(|e| io_err("cannot list", &self.path, &errno_io(e)))?;
        let mut names = Vec::new();
        while let Some(entry) = dir.read() {
            let entry = entry.map_err(|e| io_err("cannot list", &self.path, &errno_io(e)))?;
            if let Ok(name) = entry.file_name().to_str() {
                if valid_name(name) {
                    names.push(name.to_string());
                }
            }
        }
        names.sort();
        Ok(names)
    }

    /// Reads a file (at most [`MAX_FILE`] bytes). `None` when it is absent, or when it is not a
    /// regular file of this user's with no group or other bits (that refusal is logged once).
    pub fn read(&self, name: &str) -> Result<Option<Zeroizing<Vec<u8>>>> {
        self.read_limited(name, MAX_FILE)
    }

    /// [`Self::read`] with a size limit; a larger file is an error.
    pub fn read_limited(&self, name: &str, max: u64) -> Result<Option<Zeroizing<Vec<u8>>>> {
        check_name(name)?;
        let path = self.path.join(name);
        let fd = match rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(rustix::io::Errno::LOOP) => {
                log_once(&format!(
                    "refusing {}: it is a symlink. Fix: remove it",
                    path.display()
                ));
                return Ok(None);
            }
            Err(e) => return Err(io_err("cannot open", &path, &errno_io(e))),
        };
        let st = rustix::fs::fstat(&fd).map_err(|e| io_err("cannot stat", &path, &errno_io(e)))?;
        if let Some(p) = file_problem(&path, &st) {
            log_once(&p);
            return Ok(None);
        }
        let len = u64::try_from(st.st_size).unwrap_or(0);
        if len > max {
            return Err(BackendError::Io(format!(
                "{} is {len} bytes, more than {max}",
                path.display()
            )));
        }
        let mut file = File::from(fd);
        let cap = usize::try_from(len).unwrap_or(0).saturating_add(1);
        let mut buf = Zeroizing::new(Vec::with_capacity(cap));
        Read::by_ref(&mut file)
            .take(max + 1)
            .read_to_end(&mut buf)
            .map_err(|e| io_err("cannot read", &path, &e))?;
        if buf.len() as u64 > max {
            return Err(BackendError::Io(format!(
                "{} grew while being read",
                path.display()
            )));
        }
        Ok(Some(buf))
    }

    /// Replaces (or creates) a file atomically: a temporary file (0600), fsync, rename over the
    /// target, fsync of the directory.
    pub fn write_atomic(&self, name: &str, bytes: &[u8]) -> Result<()> {
        check_name(name)?;
        self.verify_identity()?;
        let target = self.path.join(name);
        let tmp = format!(".{name}.{}{TMP_SUFFIX}", random_hex()?);
        let written = (|| -> std::io::Result<()> {
            let fd = self.own_change(|| {
                rustix::fs::openat(
                    &self.fd,
                    tmp.as_str(),
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
            })?;
            // The umask may have removed bits; make the mode exactly 0600.
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o600))?;
            let mut f = File::from(fd);
            f.write_all(bytes)?;
            f.sync_all()?;
            self.own_change(|| rustix::fs::renameat(&self.fd, tmp.as_str(), &self.fd, name))?;
            Ok(())
        })();
        if let Err(e) = written {
            let _ =
                self.own_change(|| rustix::fs::unlinkat(&self.fd, tmp.as_str(), AtFlags::empty()));
            return Err(io_err("cannot write", &target, &e));
        }
        self.sync()
    }

    /// True when the directory holds an entry of this name (of any kind).
    pub fn exists(&self, name: &str) -> Result<bool> {
        check_name(name)?;
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(_) => Ok(true),
            Err(rustix::io::Errno::NOENT) => Ok(false),
            Err(e) => Err(io_err("cannot stat", &self.path.join(name), &errno_io(e))),
        }
    }

    /// Appends whole lines to an existing file and syncs it. An absent file is left absent
    /// (nothing is written); a file whose last byte is not a newline (a torn append) is an error,
    /// so that a line is never glued to a torn one.
    pub fn append_line(&self, name: &str, bytes: &[u8]) -> Result<()> {
        check_name(name)?;
        self.verify_identity()?;
        if let Ok(mut chain) = self.chain.lock() {
            chain.clear_on_disk();
        }
        let path = self.path.join(name);
        let fd = match rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDWR | OFlags::APPEND | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(()),
            Err(e) => return Err(io_err("cannot open", &path, &errno_io(e))),
        };
        let st = rustix::fs::fstat(&fd).map_err(|e| io_err("cannot stat", &path, &errno_io(e)))?;
        if let Some(p) = file_problem(&path, &st) {
            return Err(BackendError::Io(p));
        }
        let size = u64::try_from(st.st_size).unwrap_or(0);
        let mut f = File::from(fd);
        let mut last = [0u8; 1];
        let tail_ok =
            size > 0 && f.read_at(&mut last, size - 1).ok() == Some(1) && last[0] == b'\n';
        if !tail_ok {
            return Err(BackendError::Io(format!(
                "{} does not end with a whole line",
                path.display()
            )));
        }
        f.write_all(bytes)
            .and_then(|()| f.sync_data())
            .map_err(|e| io_err("cannot append to", &path, &e))
    }

    /// Removes a file; `NotFound` when it is absent.
    pub fn remove(&self, name: &str) -> Result<()> {
        check_name(name)?;
        self.verify_identity()?;
        match self.own_change(|| rustix::fs::unlinkat(&self.fd, name, AtFlags::empty())) {
            Ok(()) => self.sync(),
            Err(rustix::io::Errno::NOENT) => Err(BackendError::NotFound(name.to_string())),
            Err(e) => Err(io_err("cannot remove", &self.path.join(name), &errno_io(e))),
        }
    }

    fn sync(&self) -> Result<()> {
        rustix::fs::fsync(&self.fd)
            .map_err(|e| io_err("cannot sync the directory", &self.path, &errno_io(e)))
    }

    /// Takes the directory's exclusive lock (`flock` on `.lock`, created 0600 when missing),
    /// held until the returned guard is dropped. The lock file is opened afresh each time, so
    /// the lock excludes other threads of this process, other processes and forked children
    /// alike. On a read-only file system an existing lock file is opened read-only: `flock`
    /// works on it, so the store can still be read.
    pub fn lock(&self) -> Result<KeyDirLock> {
        let path = self.path.join(LOCK_FILE);
        let fd = match rustix::fs::openat(
            &self.fd,
            LOCK_FILE,
            OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::ROFS) => rustix::fs::openat(
                &self.fd,
                LOCK_FILE,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| io_err("cannot open the lock file", &path, &errno_io(e)))?,
            Err(e) => return Err(io_err("cannot open the lock file", &path, &errno_io(e))),
        };
        let st = rustix::fs::fstat(&fd).map_err(|e| io_err("cannot stat", &path, &errno_io(e)))?;
        if let Some(p) = file_problem(&path, &st) {
            return Err(unusable(p));
        }
        loop {
            match rustix::fs::flock(&fd, FlockOperation::LockExclusive) {
                Err(rustix::io::Errno::INTR) => continue,
                r => r.map_err(|e| io_err("cannot lock", &path, &errno_io(e)))?,
            }
            break;
        }
        if self.counter.lock().is_ok_and(|c| c.is_none()) {
            self.open_counter();
        }
        let file = File::from(fd);
        let mut stamp = [0u8; STAMP_LEN];
        let stamped = match file.read_at(&mut stamp, STAMP_AT) {
            Ok(STAMP_LEN) => decode_stamp(&stamp, self.ino),
            _ => None,
        };
        // The holder carries the stamp only when it still matches the directory.
        let mtime = self.mtime_ns();
        if let Ok(mut chain) = self.chain.lock() {
            *chain = Chain {
                start: stamped,
                expected: stamped.filter(|s| mtime == Some(*s)),
                cleared: false,
                open: HashSet::new(),
                writer: file.try_clone().ok(),
            };
        }
        Ok(KeyDirLock {
            file,
            path,
            ino: self.ino,
            chain: Arc::clone(&self.chain),
        })
    }

    /// The directory's mtime in nanoseconds.
    pub fn mtime_ns(&self) -> Option<u64> {
        let st = rustix::fs::fstat(&self.fd).ok()?;
        let ns = i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec);
        u64::try_from(ns).ok()
    }

    /// True when the stamp in `.lock` matches the directory: nothing but devicekey changed the
    /// directory since its caches last matched the files (see the module's doc).
    pub fn stamp_valid(&self) -> bool {
        let mut stamp = [0u8; STAMP_LEN];
        let read = self.counter.lock().ok().and_then(|c| {
            c.as_ref()
                .and_then(|f| f.read_at(&mut stamp, STAMP_AT).ok())
        });
        if read != Some(STAMP_LEN) {
            return false;
        }
        match (decode_stamp(&stamp, self.ino), self.mtime_ns()) {
            (Some(s), Some(m)) => s == m,
            _ => false,
        }
    }

    /// Runs one change of a directory entry (rename, unlink) and carries the stamp over it when
    /// the directory's mtime before it was the one expected.
    fn own_change<T>(
        &self,
        change: impl FnOnce() -> rustix::io::Result<T>,
    ) -> rustix::io::Result<T> {
        let Ok(mut chain) = self.chain.lock() else {
            return change();
        };
        chain.clear_on_disk();
        let before = self.mtime_ns();
        let r = change();
        let after = self.mtime_ns();
        chain.expected = match (chain.expected, before, after) {
            (Some(e), Some(b), Some(a)) if e == b => Some(a),
            _ => None,
        };
        r
    }

    /// Opens the read-only handle on `.lock` when the file exists.
    fn open_counter(&self) {
        let Ok(fd) = rustix::fs::openat(
            &self.fd,
            LOCK_FILE,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        ) else {
            return;
        };
        if rustix::fs::fstat(&fd).is_ok_and(|st| file_problem(Path::new(LOCK_FILE), &st).is_none())
        {
            if let Ok(mut c) = self.counter.lock() {
                *c = Some(File::from(fd));
            }
        }
    }

    /// Removes temporary files left by a crash: all of them when `min_age` is `None` (call with
    /// the lock held, when every writer takes it), else those older than `min_age`.
    pub fn remove_stale_temp_files(&self, min_age: Option<Duration>) {
        let Ok(mut dir) = rustix::fs::Dir::read_from(&self.fd) else {
            return;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        while let Some(Ok(entry)) = dir.read() {
            let Ok(name) = entry.file_name().to_str() else {
                continue;
            };
            if !(name.starts_with('.') && name.ends_with(TMP_SUFFIX)) || name.contains('/') {
                continue;
            }
            if let Some(age) = min_age {
                match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) if now - st.st_mtime >= age.as_secs() as i64 => {}
                    _ => continue,
                }
            }
            let path = self.path.join(name);
            match rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()) {
                Ok(()) => log::warn!("removed a stale temporary file {}", path.display()),
                Err(e) => log::warn!("cannot remove stale {}: {}", path.display(), errno_io(e)),
            }
        }
    }

    /// A value that moves whenever the directory changes: its mtime (nanoseconds) in the high
    /// half, the change counter of `.lock` in the low half. When the path no longer names the
    /// opened directory, a value that differs from every other, so the next reload runs and
    /// refuses the directory.
    pub fn change_marker(&self) -> Option<u128> {
        if self.verify_identity().is_err() {
            return Some(u128::MAX);
        }
        let st = rustix::fs::fstat(&self.fd).ok()?;
        let mtime_ns =
            (i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec)) as u64;
        let mut count = [0u8; 8];
        let n = self
            .counter
            .lock()
            .ok()
            .and_then(|c| c.as_ref().map(|f| f.read_at(&mut count, 0).unwrap_or(0)))
            .unwrap_or(0);
        let count = if n == 8 { u64::from_le_bytes(count) } else { 0 };
        Some((u128::from(mtime_ns) << 64) | u128::from(count))
    }
}

/// The stamp of a directory with this mtime and inode.
fn encode_stamp(mtime: u64, ino: u64) -> [u8; STAMP_LEN] {
    use sha2::Digest;
    let mut out = [0u8; STAMP_LEN];
    out[..8].copy_from_slice(STAMP_TAG);
    out[8..16].copy_from_slice(&mtime.to_le_bytes());
    out[16..24].copy_from_slice(&ino.to_le_bytes());
    let check = sha2::Sha256::digest(&out[..24]);
    out[24..].copy_from_slice(&check[..8]);
    out
}

/// The mtime a stamp holds, when it is whole and made for the directory with inode `ino`.
fn decode_stamp(stamp: &[u8; STAMP_LEN], ino: u64) -> Option<u64> {
    let mtime = u64::from_le_bytes(stamp[8..16].try_into().ok()?);
    (encode_stamp(mtime, ino) == *stamp).then_some(mtime)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::assert_not_found;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    /// Makes the directory `path` with exactly `mode`.
    fn mkdir_mode(path: &Path, mode: u32) {
        std::fs::create_dir(path).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn creates_0700_and_writes_0600_atomically() {
        let (_tmp, path) = crate::test_support::scratch("a/b/keys");
        let kd = KeyDir::open(&path).unwrap();
        assert_eq!(mode(&path), 0o700);
        kd.write_atomic("one.key", b"hello").unwrap();
        assert_eq!(mode(&path.join("one.key")), 0o600);
        assert_eq!(&kd.read("one.key").unwrap().unwrap()[..], b"hello");
        kd.write_atomic("one.key", b"again").unwrap();
        assert_eq!(&kd.read("one.key").unwrap().unwrap()[..], b"again");
        assert_eq!(kd.list().unwrap(), vec!["one.key".to_string()]);
        assert!(kd.read("two.key").unwrap().is_none());
        kd.remove("one.key").unwrap();
        assert_not_found(kd.remove("one.key"));
        // Nothing left behind, not even a temporary file.
        assert_eq!(std::fs::read_dir(&path).unwrap().count(), 0);
    }

    /// Sets a directory's mtime two seconds back, so a full check may stamp it.
    fn settle(path: &Path) {
        let old = std::time::SystemTime::now() - Duration::from_secs(2);
        File::open(path).unwrap().set_modified(old).unwrap();
    }

    #[test]
    fn the_stamp_is_carried_over_own_changes_only() {
        let (_tmp, path) = crate::test_support::scratch("keys");
        let kd = KeyDir::open(&path).unwrap();
        drop(kd.lock().unwrap());
        assert!(!kd.stamp_valid(), "a new directory has no stamp");

        // A full check vouches only for a directory that has not changed for a while.
        let lock = kd.lock().unwrap();
        lock.vouch(kd.mtime_ns().unwrap());
        drop(lock);
        assert!(
            !kd.stamp_valid(),
            "a change just now is too recent to stamp"
        );
        settle(&path);
        let lock = kd.lock().unwrap();
        lock.vouch(kd.mtime_ns().unwrap());
        drop(lock);
        assert!(kd.stamp_valid());
        // Another opener of the same directory reads the same stamp.
        assert!(KeyDir::open(&path).unwrap().stamp_valid());

        // Own changes under the lock keep it.
        let lock = kd.lock().unwrap();
        kd.write_atomic("a.key", b"a").unwrap();
        kd.write_atomic("b.key", b"b\n").unwrap();
        kd.remove("a.key").unwrap();
        assert!(!kd.stamp_valid(), "stale until the lock is released");
        drop(lock);
        assert!(kd.stamp_valid(), "carried over the holder's own changes");

        // A holder's first change clears the stamp on disk even when the directory's mtime
        // does not move (an append in place here; a rename within the clock tick of the last
        // change alike), so a crash before the release leaves none.
        let lock = kd.lock().unwrap();
        kd.append_line("b.key", b"more\n").unwrap();
        assert!(!kd.stamp_valid(), "cleared before the first change");
        drop(lock);
        assert!(kd.stamp_valid(), "written again on release");

        // A change by anything else, outside or inside a holder's changes, makes it stale.
        std::fs::write(path.join("c.key"), b"c").unwrap();
        assert!(!kd.stamp_valid());
        settle(&path);
        let lock = kd.lock().unwrap();
        lock.vouch(kd.mtime_ns().unwrap());
        kd.write_atomic("d.key", b"d").unwrap();
        std::fs::write(path.join("e.key"), b"e").unwrap();
        kd.write_atomic("f.key", b"f").unwrap();
        drop(lock);
        assert!(!kd.stamp_valid(), "a foreign change between two own ones");

        // Tainted: cleared at once, whatever the holder changes next.
        settle(&path);
        let lock = kd.lock().unwrap();
        lock.vouch(kd.mtime_ns().unwrap());
        drop(lock);
        assert!(kd.stamp_valid());
        let lock = kd.lock().unwrap();
        lock.taint();
        assert!(!kd.stamp_valid());
        kd.write_atomic("g.key", b"g").unwrap();
        drop(lock);
        assert!(!kd.stamp_valid());

        // A copy of the directory (another inode) does not inherit the stamp.
        settle(&path);
        let lock = kd.lock().unwrap();
        lock.vouch(kd.mtime_ns().unwrap());
        drop(lock);
        let copy = path.with_file_name("copy");
        std::fs::create_dir(&copy).unwrap();
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::copy(path.join(LOCK_FILE), copy.join(LOCK_FILE)).unwrap();
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        File::open(&copy).unwrap().set_modified(mtime).unwrap();
        assert!(!KeyDir::open(&copy).unwrap().stamp_valid());
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", ".", "..", ".lock", "../x", "a/b", ".hidden"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(valid_name("key-0123.pem"));
        let tmp = tempfile::tempdir().unwrap();
        let kd = KeyDir::open(&tmp.path().join("k")).unwrap();
        assert!(kd.write_atomic("../escape", b"x").is_err());
        assert!(kd.read("../escape").is_err());
        assert!(!tmp.path().join("escape").exists());
    }

    #[test]
    fn refuses_group_or_other_bits_on_the_directory() {
        let (_tmp, path) = crate::test_support::scratch("k");
        mkdir_mode(&path, 0o750);
        let err = KeyDir::open(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 700"), "{err}");
        assert_eq!(diagnose(&path).len(), 1);
    }

    #[test]
    fn refuses_an_ancestor_others_can_write() {
        let (_tmp, open) = crate::test_support::scratch("open");
        mkdir_mode(&open, 0o777);
        let err = KeyDir::open(&open.join("keys")).unwrap_err().to_string();
        assert!(err.contains("chmod go-w"), "{err}");
        let problems = diagnose(&open.join("keys"));
        assert_eq!(problems.len(), 1, "{problems:?}");
        // The sticky bit makes it safe (as /tmp).
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        KeyDir::open(&open.join("keys")).unwrap();
        assert!(diagnose(&open.join("keys")).is_empty());
    }

    #[test]
    fn refuses_symlinks_and_loose_files() {
        let tmp = tempfile::tempdir().unwrap();
        let kd = KeyDir::open(&tmp.path().join("k")).unwrap();
        kd.write_atomic("good", b"g").unwrap();
        std::fs::write(tmp.path().join("outside"), b"o").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("outside"), kd.path().join("link")).unwrap();
        std::fs::write(kd.path().join("loose"), b"l").unwrap();
        std::fs::set_permissions(
            kd.path().join("loose"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        assert!(kd.read("link").unwrap().is_none());
        assert!(kd.read("loose").unwrap().is_none());
        assert!(kd.read("good").unwrap().is_some());
        // A subdirectory (another store's) is not a problem.
        std::fs::create_dir(kd.path().join("tpm")).unwrap();
        let problems = diagnose(kd.path());
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems
            .iter()
            .any(|p| p.contains("symlink") || p.contains("not a regular")));
        assert!(problems.iter().any(|p| p.contains("chmod 600")));
    }

    #[test]
    fn a_replaced_directory_is_refused() {
        let (tmp, path) = crate::test_support::scratch("k");
        let kd = KeyDir::open(&path).unwrap();
        let before = kd.change_marker();
        assert!(kd.list().is_ok());
        std::fs::rename(&path, tmp.path().join("k.old")).unwrap();
        mkdir_mode(&path, 0o700);
        assert_ne!(kd.change_marker(), before);
        assert!(matches!(kd.list(), Err(BackendError::Unusable(_))));
        assert!(kd.write_atomic("x", b"x").is_err());
    }

    #[test]
    fn stale_temp_files_go_and_the_marker_moves() {
        let tmp = tempfile::tempdir().unwrap();
        let kd = KeyDir::open(&tmp.path().join("k")).unwrap();
        std::fs::write(kd.path().join(".x.abc.tmp"), b"t").unwrap();
        kd.remove_stale_temp_files(Some(Duration::from_secs(3600)));
        assert!(kd.path().join(".x.abc.tmp").exists());
        let lock = kd.lock().unwrap();
        kd.remove_stale_temp_files(None);
        assert!(!kd.path().join(".x.abc.tmp").exists());
        let before = kd.change_marker();
        lock.bump();
        assert_ne!(kd.change_marker(), before);
    }
}
