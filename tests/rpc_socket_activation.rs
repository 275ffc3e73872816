//! `devicekey serve --socket PATH` under socket activation: `systemd-socket-activate` listens at
//! PATH and passes the socket as fd 3 (LISTEN_FDS/LISTEN_PID); the server answers on it instead of
//! binding PATH itself, and refuses with a clear error anything that is not one listening Unix
//! stream socket at PATH. Our module, software store.

#![cfg(target_os = "linux")]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::rpc::*;

const ACTIVATE: &str = "systemd-socket-activate";

fn have_activate() -> bool {
    let ok = Command::new(ACTIVATE)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED: {ACTIVATE} is not installed (package systemd; run scripts/setup.sh)");
    }
    ok
}

struct Activated {
    child: Child,
    stderr: PathBuf,
}

impl Drop for Activated {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Activated {
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for the process to exit; its exit code.
    fn exit_code(&mut self) -> i32 {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(start.elapsed() < TIMEOUT, "did not exit: {}", self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the server's stderr contains `text`.
    fn wait_for_stderr(&self, text: &str) -> String {
        let start = Instant::now();
        loop {
            let log = self.stderr();
            if log.contains(text) {
                return log;
            }
            assert!(start.elapsed() < TIMEOUT, "no {text:?} in:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The variables `Env::command` sets.
fn env_vars(env: &Env) -> Vec<(String, String)> {
    let mut vars = env.vars.clone();
    let dir = env.dir.path();
    vars.push(("HOME".into(), dir.display().to_string()));
    vars.push((
        "XDG_DATA_HOME".into(),
        dir.join("data").display().to_string(),
    ));
    vars.push((
        "XDG_CONFIG_HOME".into(),
        dir.join("config").display().to_string(),
    ));
    vars
}

/// `systemd-socket-activate [options] -l LISTEN devicekey serve --socket SOCKET`, with the
/// environment's variables passed on (the tool passes only those named with -E).
fn activate(env: &Env, options: &[&str], listen: &Path, socket: &Path) -> Activated {
    let stderr = env.dir.path().join("activate.stderr");
    let mut cmd = Command::new(ACTIVATE);
    cmd.args(options);
    for (k, v) in env_vars(env) {
        cmd.arg(format!("--setenv={k}={v}"));
    }
    cmd.arg("-l")
        .arg(listen)
        .arg(env!("CARGO_BIN_EXE_devicekey"))
        .args(["serve", "--socket"])
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&stderr).unwrap()));
    let mut child = cmd.spawn().unwrap();
    let start = Instant::now();
    while !listen.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "{ACTIVATE} exited: {}",
            std::fs::read_to_string(&stderr).unwrap_or_default()
        );
        assert!(start.elapsed() < TIMEOUT, "{ACTIVATE} never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    Activated { child, stderr }
}

/// A socket directory of the user's own, closed to others.
fn socket_dir(env: &Env) -> PathBuf {
    let dir = env.dir.path().join("run");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    dir
}

struct Conn {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Conn {
    fn open(path: &Path) -> Self {
        let start = Instant::now();
        // The path appears at bind(), a moment before listen().
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => assert!(start.elapsed() < TIMEOUT, "cannot connect: {e}"),
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Conn { stream, reader }
    }

    /// Sends one request; the answer, or `None` when the connection ends first.
    fn request(&mut self, id: i64, method: &str, params: Value) -> Option<Value> {
        let message = json!({"id": id, "method": method, "params": params});
        // The server may have closed the connection already.
        let _ = writeln!(self.stream, "{message}");
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(serde_json::from_str(&line).unwrap()),
        }
    }

    fn initialize(&mut self) -> Option<Value> {
        self.request(
            1,
            "initialize",
            json!({"clientInfo": {"name": "activation-test", "version": "1"}}),
        )
    }
}

#[test]
fn initialize_answers_over_the_activated_socket() {
    if !have_activate() {
        return;
    }
    let env = Env::ours_software("");
    let path = socket_dir(&env).join("dk.sock");
    let server = activate(&env, &[], &path, &path);
    let inode = std::fs::metadata(&path).unwrap().ino();
    // The first connection starts the server, which takes over the listening socket.
    let mut conn = Conn::open(&path);
    let r = conn.initialize().expect("an answer to initialize");
    assert_eq!(r["id"], json!(1));
    assert!(result(&r)["userAgent"]
        .as_str()
        .unwrap()
        .contains("activation-test/1"));
    let r = conn
        .request(
            2,
            "device/key/create",
            json!({"accountUserId": ACCOUNT, "clientId": CLIENT,
                   "protectionPolicy": "allow_os_protected_nonextractable"}),
        )
        .expect("an answer to create");
    assert!(result(&r)["keyId"].is_string(), "{r}");
    // A second connection, on the same passed socket (never re-bound: same inode).
    let mut second = Conn::open(&path);
    assert!(second.initialize().is_some());
    assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode);
    let log = server.wait_for_stderr("socket passed by the service manager");
    assert!(!log.contains("ERROR"), "{log}");
}

/// Starts the activation with `options`, connects once, and returns the server's error output
/// once it names `expected`. The connection gets no answer.
fn refused(env: &Env, options: &[&str], listen: &Path, socket: &Path, expected: &str) -> String {
    let mut server = activate(env, options, listen, socket);
    if options.contains(&"--seqpacket") {
        // A stream client cannot connect to a seqpacket socket; a seqpacket one triggers it.
        let s = rustix::net::socket(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            None,
        )
        .unwrap();
        let addr = rustix::net::SocketAddrUnix::new(listen).unwrap();
        let start = Instant::now();
        // The path appears at bind(), a moment before listen().
        while let Err(e) = rustix::net::connect(&s, &addr) {
            assert!(start.elapsed() < TIMEOUT, "cannot connect: {e}");
            std::thread::sleep(Duration::from_millis(10));
        }
    } else {
        let mut conn = Conn::open(listen);
        assert!(conn.initialize().is_none(), "no answer on a refused socket");
    }
    let log = server.wait_for_stderr(expected);
    if !options.contains(&"--accept") {
        // The server replaced the activating process; it fails with the usage/platform code.
        assert_eq!(server.exit_code(), 1, "{log}");
    }
    log
}

#[test]
fn a_passed_fd_that_is_not_a_listening_unix_stream_socket_is_a_clear_error() {
    if !have_activate() {
        return;
    }
    // A connected socket (Accept=yes passes each connection, not the listener).
    let env = Env::ours_software("");
    let path = socket_dir(&env).join("dk.sock");
    refused(
        &env,
        &["--accept"],
        &path,
        &path,
        "fd 3 is a Unix stream socket that is not listening",
    );
    // A Unix socket of another type.
    let env = Env::ours_software("");
    let path = socket_dir(&env).join("dk.sock");
    let log = refused(
        &env,
        &["--seqpacket"],
        &path,
        &path,
        "fd 3 is not a listening Unix stream socket",
    );
    assert!(log.contains("not a valid unix stream socket"), "{log}");
    // A socket at another path than --socket names.
    let env = Env::ours_software("");
    let dir = socket_dir(&env);
    let log = refused(
        &env,
        &[],
        &dir.join("other.sock"),
        &dir.join("dk.sock"),
        "the passed socket is bound at",
    );
    assert!(
        log.contains("other.sock") && log.contains("dk.sock"),
        "{log}"
    );
    assert!(!dir.join("dk.sock").exists(), "nothing bound elsewhere");
}

#[test]
fn listen_variables_are_checked_before_anything_is_served() {
    let env = Env::ours_software("");
    let dir = socket_dir(&env);
    let path = dir.join("dk.sock");
    let file = env.dir.path().join("not-a-socket");
    std::fs::write(&file, b"x").unwrap();
    // LISTEN_PID is this very process (the shell execs the server), fd 3 a regular file.
    let run = |fds: &str, pid: &str| {
        let script = format!(
            "exec 3<\"$1\"; export LISTEN_FDS={fds} LISTEN_PID={pid}; exec \"$2\" serve --socket \"$3\""
        );
        let err_path = env.dir.path().join("sh.stderr");
        let mut child = Command::new("sh")
            .args(["-c", &script, "sh"])
            .arg(&file)
            .arg(env!("CARGO_BIN_EXE_devicekey"))
            .arg(&path)
            .envs(env_vars(&env))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&err_path).unwrap()))
            .spawn()
            .unwrap();
        // A server that ignored the variables would bind PATH and serve for ever.
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if start.elapsed() > TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the server did not refuse LISTEN_FDS={fds}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (
            status.code().unwrap_or(-1),
            std::fs::read_to_string(&err_path).unwrap_or_default(),
        )
    };
    let (code, err) = run("1", "$$");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("socket activation: fd 3 is not a listening Unix stream socket")
            && err.contains("not a socket"),
        "{err}"
    );
    let (code, err) = run("2", "$$");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("2 sockets passed"), "{err}");
    let (code, err) = run("x", "$$");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("LISTEN_FDS=\"x\" is not a number"), "{err}");
    assert!(!path.exists(), "nothing was bound");
}

#[test]
fn listen_variables_meant_for_another_process_are_ignored() {
    // Inherited variables (LISTEN_PID of a parent) do not make this process socket-activated:
    // it binds PATH itself and serves.
    let env = Env::ours_software("");
    let path = socket_dir(&env).join("dk.sock");
    let stderr = std::fs::File::create(env.dir.path().join("serve.stderr")).unwrap();
    let mut child = env
        .command()
        .env("LISTEN_FDS", "1")
        .env("LISTEN_PID", "1")
        .args(["serve", "--socket"])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr))
        .spawn()
        .unwrap();
    let start = Instant::now();
    while UnixStream::connect(&path).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "{}", env.log());
        assert!(start.elapsed() < TIMEOUT, "never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut conn = Conn::open(&path);
    let r = conn.initialize().expect("an answer");
    result(&r);
    let _ = child.kill();
    let _ = child.wait();
    let log = env.log();
    assert!(
        log.contains("LISTEN_PID (\"1\") is not this process"),
        "{log}"
    );
    assert!(
        !log.contains("socket passed by the service manager"),
        "{log}"
    );
}
