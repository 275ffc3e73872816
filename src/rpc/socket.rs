//! Local socket mode (`devicekey serve --socket PATH`): the same protocol, one session per
//! connection, for a long-lived agent that keeps token keys loaded between clients.
//!
//! Only the owner may connect: the socket lives in a directory that must be owned by the server's
//! user and closed to everyone else (0700), the socket itself is 0600, and each peer's uid is
//! checked with SO_PEERCRED. Under socket activation ([`super::activation`]) the socket comes
//! from the service manager; its directory passes the same checks, and every peer the same uid
//! check. Connections are capped, and a connection that sends no complete line within the idle
//! timeout is closed, so a slow or idle client cannot hold the agent. Every request goes to the
//! token, so deleting a key takes effect on every open connection at once. There is no network
//! listener.

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::error::{DeviceKeyError, INVALID_REQUEST, SERVER_OVERLOADED};
use super::server::{serve, KeyService, ServeOptions};

/// Limits of socket mode.
#[derive(Clone, Debug)]
pub struct SocketOptions {
    /// Where the socket is created.
    pub path: PathBuf,
    /// Connections served at once; past it a connection gets `-32001` and is closed.
    pub max_connections: usize,
    /// A connection that sends no complete line for this long is closed.
    pub idle_timeout: Duration,
}

fn platform(message: String) -> DeviceKeyError {
    DeviceKeyError::Platform(message)
}

fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Creates the socket's directory (0700) if needed and refuses one that is not the user's own
/// or that others can enter or write (see [`crate::private_dir`]).
pub fn check_socket_dir(dir: &Path) -> Result<(), DeviceKeyError> {
    crate::private_dir::ensure("socket directory", dir).map_err(platform)
}

/// Binds the listener: checks the directory, replaces a stale socket, refuses a live one.
pub fn bind(path: &Path) -> Result<UnixListener, DeviceKeyError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    check_socket_dir(&dir)?;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(platform(format!(
                "{} exists and is not a socket; remove it or choose another path",
                path.display()
            )));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(platform(format!(
                "another server is already listening at {}",
                path.display()
            )));
        }
        std::fs::remove_file(path)
            .map_err(|e| platform(format!("cannot remove stale {}: {e}", path.display())))?;
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| platform(format!("cannot listen at {}: {e}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| platform(format!("cannot restrict {}: {e}", path.display())))?;
    Ok(listener)
}

/// Reads from a connection; fails with `TimedOut` when no newline arrived within the timeout.
struct IdleReader {
    stream: UnixStream,
    timeout: Duration,
    deadline: Instant,
}

impl IdleReader {
    /// True when a complete line already waits in the socket: it came while this thread was
    /// answering a request instead of reading, so it counts as in time.
    fn line_waiting(&self) -> bool {
        let mut peek = [0u8; 4096];
        let flags = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
        matches!(
            rustix::net::recv(&self.stream, &mut peek[..], flags),
            Ok((n, _)) if peek[..n].contains(&b'\n')
        )
    }
}

impl Read for IdleReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "client idle");
        let now = Instant::now();
        if now >= self.deadline && !self.line_waiting() {
            return Err(timed_out());
        }
        let wait = self
            .deadline
            .saturating_duration_since(now)
            .max(Duration::from_millis(1));
        self.stream.set_read_timeout(Some(wait))?;
        let n = match self.stream.read(buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(timed_out())
            }
            Err(e) => return Err(e),
        };
        if buf[..n].contains(&b'\n') {
            self.deadline = Instant::now() + self.timeout;
        }
        Ok(n)
    }
}

fn refuse(mut stream: UnixStream, code: i64, message: &str) {
    let line = serde_json::json!({"id": null, "error": {"code": code, "message": message}});
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = writeln!(stream, "{line}");
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

struct ConnectionSlot(Arc<AtomicUsize>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves connections on `listener` forever (until accepting fails).
pub fn serve_listener(
    listener: UnixListener,
    socket: &SocketOptions,
    service: Arc<dyn KeyService>,
    options: &ServeOptions,
) -> Result<(), DeviceKeyError> {
    let active = Arc::new(AtomicUsize::new(0));
    let owner = euid();
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                log::warn!("accept failed: {e}");
                continue;
            }
        };
        let peer = match rustix::net::sockopt::socket_peercred(&stream) {
            Ok(cred) => cred.uid.as_raw(),
            Err(e) => {
                log::warn!("cannot read the peer's credentials: {e}; connection refused");
                refuse(stream, INVALID_REQUEST, "connection refused: unknown peer");
                continue;
            }
        };
        if peer != owner {
            log::warn!("connection from uid {peer} refused (server runs as uid {owner})");
            refuse(
                stream,
                INVALID_REQUEST,
                "connection refused: only the server's own user may connect",
            );
            continue;
        }
        if active.fetch_add(1, Ordering::SeqCst) >= socket.max_connections {
            active.fetch_sub(1, Ordering::SeqCst);
            log::warn!(
                "connection refused: {} connections already open",
                socket.max_connections
            );
            refuse(
                stream,
                SERVER_OVERLOADED,
                "Server overloaded; too many connections",
            );
            continue;
        }
        let slot = ConnectionSlot(Arc::clone(&active));
        let reader = match stream.try_clone() {
            Ok(r) => r,
            Err(e) => {
                log::warn!("cannot clone a connection: {e}");
                continue;
            }
        };
        // A client that stops reading its answers is cut off after the same deadline (the
        // writer gives up, and the connection ends), so it cannot hold a slot for ever.
        if let Err(e) = stream.set_write_timeout(Some(socket.idle_timeout)) {
            log::warn!("cannot set a write deadline: {e}");
        }
        let service = Arc::clone(&service);
        let options = options.clone();
        let timeout = socket.idle_timeout;
        let spawned = std::thread::Builder::new()
            .name("devicekey-conn".into())
            .spawn(move || {
                let _slot = slot;
                let reader = IdleReader {
                    stream: reader,
                    timeout,
                    deadline: Instant::now() + timeout,
                };
                let closer = stream.try_clone();
                match serve(reader, stream, service, &options) {
                    Ok(()) => log::debug!("connection closed by the client"),
                    Err(e) => log::info!("connection closed: {e}"),
                }
                if let Ok(s) = closer {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot start a connection thread: {e}");
        }
    }
    Ok(())
}

/// `devicekey serve --socket`: takes the socket passed by the service manager, or binds one,
/// and serves until the process is stopped.
pub fn serve_socket(
    config: &crate::config::Config,
    socket: &SocketOptions,
) -> Result<(), DeviceKeyError> {
    // Taken first, before a PKCS#11 module loaded by the client can start threads.
    let activated = super::activation::activated_listener(&socket.path)?;
    let client = super::attest::WithAttestation::new(
        super::TokenClient::for_server(&config.server)?,
        config,
    );
    let options = ServeOptions::from_config(&config.server);
    let listener = match activated {
        Some(listener) => {
            log::info!(
                "listening at {} (socket passed by the service manager)",
                socket.path.display()
            );
            listener
        }
        None => {
            let listener = bind(&socket.path)?;
            log::info!("listening at {}", socket.path.display());
            listener
        }
    };
    serve_listener(listener, socket, Arc::new(client), &options)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_socket_is_replaced_and_live_one_refused() {
        let (_tmp, dir) = crate::test_support::scratch("s");
        let path = dir.join("dk.sock");
        let first = bind(&path).unwrap();
        assert!(bind(&path).is_err(), "a live socket is refused");
        drop(first);
        let _second = bind(&path).unwrap();
        let file = dir.join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(bind(&file).is_err());
    }

    #[test]
    fn a_line_that_came_while_busy_counts_as_in_time() {
        let (server, mut client) = UnixStream::pair().unwrap();
        let timeout = Duration::from_millis(50);
        let mut reader = IdleReader {
            stream: server,
            timeout,
            deadline: Instant::now() + timeout,
        };
        let mut buf = [0u8; 64];
        // The line arrives in time, but the reader comes back only after the deadline.
        client.write_all(b"{}\n").unwrap();
        std::thread::sleep(timeout * 2);
        assert_eq!(reader.read(&mut buf).unwrap(), 3);
        // A partial line does not keep the connection.
        client.write_all(b"{").unwrap();
        std::thread::sleep(timeout * 2);
        let e = reader.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        // Nor does silence.
        let mut reader = IdleReader {
            stream: reader.stream,
            timeout,
            deadline: Instant::now() + timeout,
        };
        assert_eq!(reader.read(&mut buf).unwrap(), 1);
        let e = reader.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    }
}
