//! `devicekey serve --socket`: owner-only directory, peer uid check, connection cap, idle
//! deadline, and deletions seen by every open connection.

#![cfg(target_os = "linux")]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::rpc::*;

struct SocketServer {
    child: Child,
    path: PathBuf,
}

impl Drop for SocketServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_socket(path: &Path, child: &mut Child) {
    let start = Instant::now();
    while UnixStream::connect(path).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("server exited early: {status}");
        }
        assert!(start.elapsed() < TIMEOUT, "socket never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Let the server see the probe connection close, so it holds no connection slot.
    std::thread::sleep(Duration::from_millis(200));
}

fn start(env: &Env, path: &Path, extra: &[&str]) -> SocketServer {
    let stderr = std::fs::File::create(env.dir.path().join("serve.stderr")).unwrap();
    let mut child = env
        .command()
        .arg("serve")
        .arg("--socket")
        .arg(path)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr))
        .spawn()
        .unwrap();
    wait_for_socket(path, &mut child);
    SocketServer {
        child,
        path: path.to_owned(),
    }
}

struct Conn {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    next: i64,
}

impl Conn {
    fn open(path: &Path) -> Self {
        let stream = UnixStream::connect(path).unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Conn {
            stream,
            reader,
            next: 0,
        }
    }

    /// The next line, or `None` at end of stream.
    fn line(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(serde_json::from_str(&line).unwrap()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("reading the socket: {e}"),
        }
    }

    fn request(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let message = json!({"id": self.next, "method": method, "params": params});
        writeln!(self.stream, "{message}").unwrap();
        let r = self.line().expect("a response");
        assert_eq!(r["id"], json!(self.next), "{r}");
        r
    }

    fn initialize(&mut self) {
        let r = self.request(
            "initialize",
            json!({"clientInfo": {"name": "socket-test", "version": "1"}}),
        );
        result(&r);
        writeln!(self.stream, "{}", json!({"method": "initialized"})).unwrap();
    }
}

#[test]
fn socket_sessions_share_the_token_and_see_deletions() {
    if !have_softhsm() {
        return;
    }
    let env = Env::softhsm("");
    let path = env.dir.path().join("run/devicekey/dk.sock");
    let server = start(&env, &path, &[]);
    let dir_mode = std::fs::metadata(path.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o700);
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let mut a = Conn::open(&server.path);
    let mut b = Conn::open(&server.path);
    // Each connection has its own handshake.
    let r = b.request("device/key/public", json!({"keyId": "x"}));
    assert_error(&r, -32600, "Not initialized");
    a.initialize();
    b.initialize();
    let r = a.request(
        "device/key/create",
        json!({"accountUserId": ACCOUNT, "clientId": CLIENT}),
    );
    let info = result(&r).clone();
    let key_id = info["keyId"].as_str().unwrap().to_string();
    let r = b.request("device/key/public", json!({"keyId": key_id}));
    assert_eq!(result(&r), &info);
    let r = b.request(
        "device/key/sign",
        json!({"keyId": key_id, "payload": connection_payload()}),
    );
    result(&r);

    // Delete from another process; both open connections see it at once.
    let (code, _, err) = env.cli(&["delete", &key_id], None);
    assert_eq!(code, 0, "{err}");
    for conn in [&mut a, &mut b] {
        let r = conn.request("device/key/public", json!({"keyId": key_id}));
        assert_error(&r, -32600, "device key not found");
        let r = conn.request(
            "device/key/sign",
            json!({"keyId": key_id, "payload": connection_payload()}),
        );
        assert_error(&r, -32600, "device key not found");
    }
    drop(server);
}

#[test]
fn idle_clients_are_cut_off_and_connections_are_capped() {
    let env = Env::ours_software("");
    let path = env.dir.path().join("sock/dk.sock");
    let server = start(
        &env,
        &path,
        &["--max-connections", "2", "--idle-timeout-ms", "700"],
    );
    let start_time = Instant::now();
    let mut idle = Conn::open(&server.path);
    let mut busy = Conn::open(&server.path);
    busy.initialize();
    // The cap: a third connection is told and closed.
    let mut third = Conn::open(&server.path);
    let r = third.line().expect("an overload notice");
    assert_error(&r, -32001, "Server overloaded; too many connections");
    assert!(third.line().is_none());
    // The idle client is cut off at its deadline, not long after.
    assert!(idle.line().is_none());
    let waited = start_time.elapsed();
    assert!(
        waited >= Duration::from_millis(600) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    // A slow client that trickles bytes without finishing a line is cut off too.
    let mut slow = Conn::open(&server.path);
    let t = Instant::now();
    let mut closed = false;
    for _ in 0..40 {
        if slow.stream.write_all(b" ").is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(closed || slow.line().is_none());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // Freed slots are reused.
    let mut again = Conn::open(&server.path);
    again.initialize();
    drop(server);
}

#[test]
fn socket_directory_must_be_private() {
    let env = Env::ours_software("");
    let dir = env.dir.path().join("open");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = env
        .command()
        .args(["serve", "--socket"])
        .arg(dir.join("dk.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chmod 700"), "{err}");

    let theirs = env.dir.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700)).unwrap();
    if std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).is_err() {
        eprintln!("SKIPPED (ownership part): not root");
        return;
    }
    let out = env
        .command()
        .args(["serve", "--socket"])
        .arg(theirs.join("dk.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("owned by uid 65534"), "{err}");
}

#[test]
fn another_uid_is_refused() {
    // The server runs as nobody; we (root, who can reach any directory) connect as another uid.
    if rustix::process::geteuid().as_raw() != 0
        || Command::new("setpriv").arg("--help").output().is_err()
    {
        eprintln!("SKIPPED: needs root and setpriv");
        return;
    }
    let env = Env::ours_software("");
    let base = env.dir.path();
    std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = base.join("nobody-run");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&run, Some(65534), Some(65534)).unwrap();
    let path = run.join("dk.sock");
    let mut child = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_devicekey"))
        .args(["serve", "--socket"])
        .arg(&path)
        .env("HOME", &run)
        .env("DEVICEKEY_CONFIG", env.config_path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_socket(&path, &mut child);
    let server = SocketServer {
        child,
        path: path.clone(),
    };
    let mut conn = Conn::open(&server.path);
    let r = conn.line().expect("a refusal");
    assert_error(
        &r,
        -32600,
        "connection refused: only the server's own user may connect",
    );
    assert!(conn.line().is_none());
    drop(server);
}
