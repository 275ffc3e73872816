//! An advisory lock per (module, token) shared by every process of the user, held around the
//! calls that read or write the token's state outside signing: loading the module (C_Initialize),
//! finding the token, logging in, key generation, object creation and deletion. Never around
//! signing.
//!
//! Why: SoftHSM rewrites its `token.object` in place and releases its own
//! fcntl lock between the `ftruncate(0)` and the `write`, and every C_Initialize rewrites each
//! token's `generation` file after unlocking it; another process that loads the module or logs in
//! at that moment reads a torn file: the token is missing, or its user PIN "not initialized". With
//! this lock our processes do these steps one at a time (what other programs do to the same token
//! is ridden out by the retries in [`super::pool`]).
//!
//! The lock file is `<dir>/<hash of module path and token label>.lock`, where `<dir>` is
//! `$XDG_RUNTIME_DIR/devicekey/locks`, else `$XDG_DATA_HOME/devicekey/locks`, else
//! `~/.local/share/devicekey/locks`. The directory is created 0700 and must be the user's own with
//! no group/other bits; the file is opened without following symlinks and must be the user's own
//! regular file. When no safe place exists, or another process holds the lock for more than 10 s,
//! the call goes ahead unlocked with a log line (the lock is advisory).
//!
//! A waiter waits in the kernel (a blocking `flock`, on a short-lived helper thread so that the
//! wait can end after 10 s; the thread may outlive C_Finalize, which is safe because the module is
//! linked `-z nodelete`), not by polling: processes that take the lock back to back (key
//! generations in a loop) leave it free only for microseconds, and a poller that sleeps between
//! tries almost never sees it free (a module load waited out the whole 10 s, then went ahead
//! unlocked, while four processes generated keys).
//!
//! **Change counter.** The lock file also counts the changes our processes make to the token:
//! 8 bytes (little-endian) at offset 0, incremented under the lock when a holder that changed the
//! token releases it (after the change, so a reader that sees the new count also sees the
//! change). [`ChangeCounter`] reads it without the lock, so a process notices that another one of
//! ours changed the token. Changes by programs that do not use this module are not counted.
//!
//! In a process the threads take turns first (a thread that holds the lock passes through nested
//! sections: a write's session logs in); the holding thread has the lock file open on its own
//! open file description (flock works per open file description), closed on release.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::thread::ThreadId;
use std::time::Duration;

use rustix::fs::{FileType, FlockOperation, Mode, OFlags};
use sha2::{Digest, Sha256};

/// How long a caller waits for another process's write before going ahead (with a warning).
const WAIT: Duration = Duration::from_secs(10);

/// One lock file of this process, and the thread of this process that holds it.
struct FileLock {
    path: PathBuf,
    pid: u32,
    holder: Mutex<Option<ThreadId>>,
    changed: Condvar,
    /// Set when the holder changed the token; the count is bumped when the lock is released.
    dirty: AtomicBool,
}

fn table() -> &'static Mutex<HashMap<PathBuf, Arc<FileLock>>> {
    static TABLE: OnceLock<Mutex<HashMap<PathBuf, Arc<FileLock>>>> = OnceLock::new();
    TABLE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Holds the lock until dropped (nothing when the lock was not taken, or was already this
/// thread's).
pub struct WriteLock {
    /// The lock and the open lock file that holds it.
    lock: Option<(Arc<FileLock>, OwnedFd)>,
    /// The lock this thread already held when this guard was taken (a nested section).
    nested: Option<Arc<FileLock>>,
}

impl WriteLock {
    /// Records that the token is being changed under this lock: the change counter is bumped
    /// when the outermost guard of this thread releases the lock. Nothing when the lock was not
    /// obtained.
    pub fn mark_changed(&self) {
        if let Some(l) = self.lock.as_ref().map(|(l, _)| l).or(self.nested.as_ref()) {
            l.dirty.store(true, Ordering::Release);
        }
    }
}

/// Adds one to the change count in the lock file `fd` (which this process holds locked).
fn bump(fd: &OwnedFd, path: &Path) {
    let mut count = [0u8; 8];
    let n = rustix::io::pread(fd, &mut count, 0).unwrap_or(0);
    let next = if n == 8 { u64::from_le_bytes(count) } else { 0 }.wrapping_add(1);
    match rustix::io::pwrite(fd, &next.to_le_bytes(), 0) {
        Ok(8) => {}
        Ok(n) => log::warn!(
            "{}: short write ({n} of 8 bytes) of the change count",
            path.display()
        ),
        Err(e) => log::warn!("cannot update the change count in {}: {e}", path.display()),
    }
}

/// Reads the change count of a token's lock file without taking the lock (see the module doc).
pub struct ChangeCounter {
    fd: OwnedFd,
}

crate::redact::debug_shows!(ChangeCounter:);

impl ChangeCounter {
    /// The counter of `token` in `module`, opening (creating if missing) its lock file with the
    /// same checks as the lock; `None` (with a log line) when there is no safe place for it.
    pub fn open(module: &Path, token: &str) -> Option<Self> {
        let lock = file_lock(module, token)?;
        match open_lock_file(&lock.path) {
            Ok(fd) => Some(Self { fd }),
            Err(why) => {
                log::info!("token '{token}': no change counter: {why}");
                None
            }
        }
    }

    /// The number of changes counted so far (0 for a new or short file, or a failed read).
    pub fn read(&self) -> u64 {
        let mut count = [0u8; 8];
        match rustix::io::pread(&self.fd, &mut count, 0) {
            Ok(8) => u64::from_le_bytes(count),
            _ => 0,
        }
    }
}

crate::redact::debug_shows!(WriteLock: |w| held = w.lock.is_some());

/// The lock file at `path` opened and locked exclusively, waiting at most [`WAIT`]; `None` (with
/// a log line) when it was not obtained.
fn flock_within(path: &Path, what: &str) -> Option<OwnedFd> {
    let not_obtained = |why: &dyn std::fmt::Display| {
        log::warn!("{what}: the cross-process token lock was not obtained ({why}); going ahead");
        None
    };
    let fd = match open_lock_file(path) {
        Ok(fd) => fd,
        Err(why) => return not_obtained(&why),
    };
    match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => return Some(fd),
        Err(rustix::io::Errno::WOULDBLOCK) | Err(rustix::io::Errno::INTR) => {}
        Err(e) => return not_obtained(&e),
    }
    // Held by another process: wait in the kernel on a helper thread. When the wait is given up,
    // the helper's lock (if it comes) is released as its file is dropped: a send into a channel
    // whose receiver is gone hands the file back, and a file left in the buffer is dropped with
    // the channel.
    let (tx, rx) = mpsc::sync_channel(1);
    let spawned = std::thread::Builder::new()
        .name("devicekey-token-lock".into())
        .spawn(move || loop {
            match rustix::fs::flock(&fd, FlockOperation::LockExclusive) {
                Err(rustix::io::Errno::INTR) => continue,
                Ok(()) => {
                    let _ = tx.send(Ok(fd));
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        return not_obtained(&format!("cannot start a thread to wait for it: {e}"));
    }
    match rx.recv_timeout(WAIT) {
        Ok(Ok(fd)) => Some(fd),
        Ok(Err(e)) => not_obtained(&e),
        Err(_) => not_obtained(&format!("another process held it for more than {WAIT:?}")),
    }
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        let Some((lock, fd)) = self.lock.take() else {
            return;
        };
        let mut holder = lock.holder.lock().unwrap_or_else(PoisonError::into_inner);
        if lock.dirty.swap(false, Ordering::AcqRel) {
            bump(&fd, &lock.path);
        }
        let _ = rustix::fs::flock(&fd, FlockOperation::Unlock);
        drop(fd);
        *holder = None;
        drop(holder);
        lock.changed.notify_all();
    }
}

fn lock_dir() -> Option<PathBuf> {
    let from_env = |var: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    if let Some(run) = from_env("XDG_RUNTIME_DIR").filter(|p| p.is_dir()) {
        return Some(run.join("devicekey").join("locks"));
    }
    if let Some(data) = from_env("XDG_DATA_HOME") {
        return Some(data.join("devicekey").join("locks"));
    }
    from_env("HOME").map(|h| h.join(".local/share/devicekey/locks"))
}

fn open_lock_file(path: &Path) -> Result<OwnedFd, String> {
    let fd = rustix::fs::open(
        path,
        OFlags::CREATE | OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let st = rustix::fs::fstat(&fd).map_err(|e| format!("{}: {e}", path.display()))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile
        || st.st_uid != rustix::process::geteuid().as_raw()
    {
        return Err(format!(
            "{} is not the user's own regular file",
            path.display()
        ));
    }
    Ok(fd)
}

/// The file name of the lock of `token` in `module`.
fn lock_name(module: &Path, token: &str) -> String {
    let module = std::fs::canonicalize(module).unwrap_or_else(|_| module.to_path_buf());
    let mut h = Sha256::new();
    h.update(module.as_os_str().as_encoded_bytes());
    h.update([0]);
    h.update(token.as_bytes());
    format!("{}.lock", &crate::encoding::hex(&h.finalize())[..32])
}

/// This process's lock file for `token` in `module`, opened on first use; `None` (with a log
/// line) when there is no safe place for it.
fn file_lock(module: &Path, token: &str) -> Option<Arc<FileLock>> {
    let dir = match lock_dir() {
        Some(d) => d,
        None => {
            log::info!(
                "token '{token}': no XDG_RUNTIME_DIR, XDG_DATA_HOME or HOME; no cross-process lock"
            );
            return None;
        }
    };
    let path = dir.join(lock_name(module, token));
    let pid = std::process::id();
    let mut table = table().lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(l) = table.get(&path).filter(|l| l.pid == pid) {
        return Some(l.clone());
    }
    let opened =
        crate::private_dir::ensure("lock directory", &dir).and_then(|()| open_lock_file(&path));
    match opened {
        Ok(_) => {
            let l = Arc::new(FileLock {
                path: path.clone(),
                pid,
                holder: Mutex::new(None),
                changed: Condvar::new(),
                dirty: AtomicBool::new(false),
            });
            table.insert(path, l.clone());
            Some(l)
        }
        Err(why) => {
            log::info!("token '{token}': no cross-process lock: {why}");
            None
        }
    }
}

/// Takes the lock of `token` in `module`, waiting for other threads and processes; a thread that
/// already holds it gets a guard that releases nothing.
pub fn write_lock(module: &Path, token: &str) -> WriteLock {
    let unlocked = WriteLock {
        lock: None,
        nested: None,
    };
    let Some(lock) = file_lock(module, token) else {
        return unlocked;
    };
    let me = std::thread::current().id();
    let mut holder = lock.holder.lock().unwrap_or_else(PoisonError::into_inner);
    if *holder == Some(me) {
        drop(holder);
        return WriteLock {
            lock: None,
            nested: Some(lock),
        };
    }
    while holder.is_some() {
        holder = lock
            .changed
            .wait(holder)
            .unwrap_or_else(PoisonError::into_inner);
    }
    *holder = Some(me);
    drop(holder);
    let Some(fd) = flock_within(&lock.path, token) else {
        *lock.holder.lock().unwrap_or_else(PoisonError::into_inner) = None;
        lock.changed.notify_all();
        return unlocked;
    };
    WriteLock {
        lock: Some((lock, fd)),
        nested: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_excludes_a_second_holder_until_dropped() {
        let (_tmp, locks) = crate::test_support::scratch("locks");
        crate::private_dir::ensure("lock directory", &locks).unwrap();
        let path = locks.join(lock_name(Path::new("/nonexistent/module.so"), "t"));
        let a = open_lock_file(&path).unwrap();
        rustix::fs::flock(&a, FlockOperation::NonBlockingLockExclusive).unwrap();
        let b = open_lock_file(&path).unwrap();
        assert!(rustix::fs::flock(&b, FlockOperation::NonBlockingLockExclusive).is_err());
        drop(a);
        rustix::fs::flock(&b, FlockOperation::NonBlockingLockExclusive).unwrap();
        // A symlink in place of the lock file is refused.
        let link = locks.join("link.lock");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(open_lock_file(&link).is_err());
        assert_ne!(
            lock_name(Path::new("/m"), "a"),
            lock_name(Path::new("/m"), "b")
        );
    }

    #[test]
    fn the_change_count_starts_at_zero_and_counts_bumps() {
        let (_tmp, path) = crate::test_support::scratch("c.lock");
        let holder = open_lock_file(&path).unwrap();
        let counter = ChangeCounter {
            fd: open_lock_file(&path).unwrap(),
        };
        assert_eq!(counter.read(), 0, "a new (empty) lock file");
        bump(&holder, &path);
        assert_eq!(counter.read(), 1);
        bump(&holder, &path);
        assert_eq!(counter.read(), 2);
        // A short file reads as 0, and counting goes on from there.
        std::fs::write(&path, [7u8; 3]).unwrap();
        assert_eq!(counter.read(), 0);
        bump(&holder, &path);
        assert_eq!(counter.read(), 1);
    }

    #[test]
    fn a_waiter_gets_the_lock_as_soon_as_another_holder_releases_it() {
        let (_tmp, path) = crate::test_support::scratch("t.lock");
        let other = open_lock_file(&path).unwrap();
        rustix::fs::flock(&other, FlockOperation::NonBlockingLockExclusive).unwrap();
        let waiter = {
            let path = path.clone();
            std::thread::spawn(move || {
                let t0 = std::time::Instant::now();
                let fd = flock_within(&path, "test");
                (fd, t0.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        drop(other);
        let (fd, waited) = waiter.join().unwrap();
        let fd = fd.expect("the lock, once released");
        assert!(waited >= Duration::from_millis(150), "waited {waited:?}");
        assert!(waited < Duration::from_secs(5), "waited {waited:?}");
        // Held now: another open file cannot take it.
        let third = open_lock_file(&path).unwrap();
        assert!(rustix::fs::flock(&third, FlockOperation::NonBlockingLockExclusive).is_err());
        drop(fd);
        rustix::fs::flock(&third, FlockOperation::NonBlockingLockExclusive).unwrap();
    }
}
