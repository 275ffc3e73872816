//! Socket activation: the listening socket systemd (or `systemd-socket-activate`) passes to
//! `devicekey serve --socket PATH`.
//!
//! The passing protocol: `LISTEN_PID` is the pid the sockets are meant for, `LISTEN_FDS` how many
//! there are, starting at fd 3; `LISTEN_FDNAMES` optionally names them. Variables meant for
//! another process (a `LISTEN_PID` that is not ours, or none at all) are ignored, as
//! `sd_listen_fds` does, and the server binds PATH itself. Variables meant for us must describe
//! exactly one listening Unix stream socket bound at PATH, in a directory that passes the same
//! owner-only checks as a socket the server makes; anything else is a clear error rather than a
//! silent bind elsewhere. Taking ownership of fd 3 is done by the `listenfd` crate, which checks
//! the fd is a Unix stream socket first.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use super::error::DeviceKeyError;

/// The first passed fd (`SD_LISTEN_FDS_START`).
const FIRST_FD: i32 = 3;

fn platform(message: String) -> DeviceKeyError {
    DeviceKeyError::Platform(format!("socket activation: {message}"))
}

/// What the environment says about passed sockets.
#[derive(Debug, PartialEq, Eq)]
enum Passed {
    /// No sockets for this process.
    Nothing,
    /// This many sockets, for this process.
    Sockets(usize),
}

/// Reads `LISTEN_PID` / `LISTEN_FDS` for process `pid`.
fn passed(pid: u32, listen_pid: Option<&str>, listen_fds: Option<&str>) -> Result<Passed, String> {
    let Some(fds) = listen_fds else {
        return Ok(Passed::Nothing);
    };
    match listen_pid {
        Some(p) if p.trim().parse::<u32>().ok() == Some(pid) => {}
        other => {
            log::info!(
                "LISTEN_FDS is set but LISTEN_PID ({}) is not this process ({pid}): not socket-activated",
                other.map_or_else(|| "unset".to_string(), |p| format!("{:?}", p))
            );
            return Ok(Passed::Nothing);
        }
    }
    let count: usize = fds
        .trim()
        .parse()
        .map_err(|_| format!("LISTEN_FDS={fds:?} is not a number"))?;
    Ok(if count == 0 {
        Passed::Nothing
    } else {
        Passed::Sockets(count)
    })
}

/// True when `a` and `b` name the same file system entry (parents compared after resolving).
fn same_path(a: &Path, b: &Path) -> bool {
    if a == b {
        return true;
    }
    let resolved = |p: &Path| -> Option<PathBuf> {
        let parent = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        Some(parent.canonicalize().ok()?.join(p.file_name()?))
    };
    matches!((resolved(a), resolved(b)), (Some(x), Some(y)) if x == y)
}

/// The listening socket passed for `path`, when this process was socket-activated; `None` when it
/// was not (the caller binds `path` itself).
pub fn activated_listener(path: &Path) -> Result<Option<UnixListener>, DeviceKeyError> {
    let pid = rustix::process::getpid()
        .as_raw_nonzero()
        .get()
        .unsigned_abs();
    let listen_pid = std::env::var("LISTEN_PID").ok();
    let listen_fds = std::env::var("LISTEN_FDS").ok();
    let count = match passed(pid, listen_pid.as_deref(), listen_fds.as_deref()).map_err(platform)? {
        Passed::Nothing => return Ok(None),
        Passed::Sockets(n) => n,
    };
    if count != 1 {
        return Err(platform(format!(
            "{count} sockets passed (LISTEN_FDS={count}); devicekey serve takes exactly one listening Unix stream socket"
        )));
    }
    if let Ok(first) = std::env::var("LISTEN_FDS_FIRST_FD") {
        return Err(platform(format!(
            "LISTEN_FDS_FIRST_FD={first:?} is not part of systemd's protocol; passed sockets start at fd {FIRST_FD}"
        )));
    }
    if let Ok(names) = std::env::var("LISTEN_FDNAMES") {
        log::debug!("passed socket named {:?}", names);
    }
    // Unsets LISTEN_PID and LISTEN_FDS, so nothing this process starts takes them for its own.
    let mut fds = listenfd::ListenFd::from_env();
    let listener = fds
        .take_unix_listener(0)
        .map_err(|e| {
            platform(format!(
                "fd {FIRST_FD} is not a listening Unix stream socket ({e}); pass one with ListenStream= and Accept=no"
            ))
        })?
        .ok_or_else(|| platform(format!("no socket at fd {FIRST_FD}")))?;
    let listening = rustix::net::sockopt::socket_acceptconn(&listener)
        .map_err(|e| platform(format!("cannot inspect fd {FIRST_FD}: {e}")))?;
    if !listening {
        return Err(platform(format!(
            "fd {FIRST_FD} is a Unix stream socket that is not listening (a connection passed with Accept=yes?); devicekey serve needs the listening socket (Accept=no)"
        )));
    }
    let address = listener
        .local_addr()
        .map_err(|e| platform(format!("cannot read the address of fd {FIRST_FD}: {e}")))?;
    let Some(bound) = address.as_pathname() else {
        return Err(platform(format!(
            "fd {FIRST_FD} is not bound to a path (abstract or unnamed socket); pass a socket in a directory of your own"
        )));
    };
    if !same_path(bound, path) {
        return Err(platform(format!(
            "the passed socket is bound at {}, not at {} as --socket says",
            bound.display(),
            path.display()
        )));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    super::socket::check_socket_dir(&dir)?;
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            log::warn!(
                "the passed socket {} has mode {mode:o} (SocketMode=0600 is meant); its 0700 directory and the peer uid check still keep other users out",
                path.display()
            );
        }
    }
    // systemd passes a blocking socket unless NonBlocking=yes; the accept loop needs blocking.
    listener
        .set_nonblocking(false)
        .map_err(|e| platform(format!("cannot make fd {FIRST_FD} blocking: {e}")))?;
    Ok(Some(listener))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_variables_meant_for_this_process_count() {
        assert_eq!(passed(42, None, None), Ok(Passed::Nothing));
        assert_eq!(passed(42, Some("42"), None), Ok(Passed::Nothing));
        assert_eq!(passed(42, None, Some("1")), Ok(Passed::Nothing));
        assert_eq!(passed(42, Some("41"), Some("1")), Ok(Passed::Nothing));
        assert_eq!(passed(42, Some("x"), Some("1")), Ok(Passed::Nothing));
        assert_eq!(passed(42, Some("42"), Some("1")), Ok(Passed::Sockets(1)));
        assert_eq!(passed(42, Some("42"), Some("2")), Ok(Passed::Sockets(2)));
        assert_eq!(passed(42, Some("42"), Some("0")), Ok(Passed::Nothing));
        assert!(passed(42, Some("42"), Some("one")).is_err());
    }

    #[test]
    fn paths_compare_after_resolving_the_parent() {
        let (tmp, a) = crate::test_support::scratch("s.sock");
        let b = tmp.path().join(".").join("s.sock");
        assert!(same_path(&a, &b));
        assert!(!same_path(&a, &tmp.path().join("t.sock")));
    }
}
