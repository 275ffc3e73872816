//! `devicekey serve` under load and abuse, the real binary over our built module: 10,000
//! pipelined requests, a 10 MiB line, JSON nested 100,000 deep, invalid UTF-8, stdin closed
//! mid-request; in socket mode 1,000 connections at once, slow-loris writers and clients that
//! never read. The server answers or errors on each, never crashes, its peak RSS (VmHWM) stays
//! bounded, and the connection cap and deadlines hold.
//!
//! Counts scale with `STRESS_SCALE` (CI: 1,000 requests and 200 connections; full: 10,000 and
//! 1,000).

#![cfg(target_os = "linux")]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::rpc::*;
use testkit::stress::{proc_status_kib, scaled};

/// Peak RSS bound for the server, in KiB.
const MAX_HWM_KIB: u64 = 100 * 1024;

fn hwm(child: &Child) -> u64 {
    proc_status_kib(child.id(), "VmHWM").expect("VmHWM of the server")
}

fn started(env: &Env) -> Server {
    let mut server = env.serve();
    server.initialize();
    server
}

fn create_key(server: &mut Server) -> String {
    let r = server.request(
        "device/key/create",
        json!({"accountUserId": ACCOUNT, "clientId": CLIENT,
               "protectionPolicy": "allow_os_protected_nonextractable"}),
    );
    result(&r)["keyId"].as_str().unwrap().to_string()
}

/// Reads lines until `n` answers arrived (or the timeout).
fn collect(server: &mut Server, n: usize) -> Vec<Value> {
    (0..n).map(|_| server.recv()).collect()
}

#[test]
fn ten_thousand_pipelined_requests_are_all_answered() {
    let env = Env::ours_software("");
    let mut server = started(&env);
    let key = create_key(&mut server);
    let n = scaled(10_000, 1_000);
    let mut stdin = server.stdin.take().unwrap();
    let started = Instant::now();
    let key2 = key.clone();
    // Write everything at once from another thread while this one reads.
    let writer = std::thread::spawn(move || {
        let mut buf = Vec::new();
        for i in 0..n {
            let message = match i % 5 {
                0 => json!({"id": i, "method": "device/key/sign",
                            "params": {"keyId": key2, "payload": connection_payload()}}),
                1 => json!({"id": i, "method": "device/key/public", "params": {"keyId": "dk_bad"}}),
                2 => json!({"id": i, "method": "no/such/method"}),
                _ => json!({"id": i, "method": "device/key/public", "params": {"keyId": key2}}),
            };
            serde_json::to_writer(&mut buf, &message).unwrap();
            buf.push(b'\n');
            if buf.len() > 64 * 1024 {
                stdin.write_all(&buf).unwrap();
                buf.clear();
            }
        }
        stdin.write_all(&buf).unwrap();
        stdin
    });
    let answers = collect(&mut server, n);
    let elapsed = started.elapsed();
    let stdin = writer.join().unwrap();
    let mut ids = BTreeSet::new();
    let (mut ok, mut overloaded, mut errors) = (0, 0, 0);
    for a in &answers {
        let id = a["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("answer without id: {a}"));
        assert!(ids.insert(id), "id {id} answered twice");
        match (a.get("result"), a["error"]["code"].as_i64()) {
            (Some(_), None) => ok += 1,
            (None, Some(-32001)) => overloaded += 1,
            (None, Some(_)) => {
                errors += 1;
                let i = id % 5;
                assert!(i == 1 || i == 2, "request {id} failed: {a}");
            }
            _ => panic!("malformed answer {a}"),
        }
    }
    assert_eq!(ids.len(), n, "every request answered once");
    let peak = hwm(&server.child);
    server.stdin = Some(stdin);
    assert_eq!(server.finish(), 0, "clean exit at end of input");
    eprintln!(
        "SERVER pipelined: {n} requests answered in {elapsed:?}: {ok} results, {errors} expected \
         errors, {overloaded} -32001 overloaded; peak RSS {} MiB",
        peak / 1024
    );
    assert!(peak < MAX_HWM_KIB, "peak RSS {peak} KiB");
}

#[test]
fn huge_deep_and_broken_lines_get_errors_and_the_server_goes_on() {
    let env = Env::ours_software("");
    let mut server = started(&env);
    let key = create_key(&mut server);
    let base = hwm(&server.child);
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    // 10 MiB without a newline until the end, then a 10 MiB JSON string inside a request.
    let mut big = vec![b'x'; 10 << 20];
    big.push(b'\n');
    cases.push(("10 MiB line", big));
    let mut big_json = br#"{"id":1,"method":"device/key/public","params":{"keyId":""#.to_vec();
    big_json.extend(std::iter::repeat_n(b'a', 10 << 20));
    big_json.extend_from_slice(b"\"}}\n");
    cases.push(("10 MiB JSON request", big_json));
    let depth = 100_000;
    let mut deep = "[".repeat(depth).into_bytes();
    deep.extend("]".repeat(depth).into_bytes());
    deep.push(b'\n');
    cases.push(("array nested 100,000 deep", deep));
    let mut deep_obj = Vec::new();
    deep_obj.extend_from_slice(
        br#"{"id":2,"method":"device/key/sign","params":{"keyId":"k","payload":"#,
    );
    deep_obj.extend("{\"a\":".repeat(depth).into_bytes());
    deep_obj.extend_from_slice(b"1");
    deep_obj.extend("}".repeat(depth).into_bytes());
    deep_obj.extend_from_slice(b"}}\n");
    cases.push(("params nested 100,000 deep", deep_obj));
    cases.push(("invalid UTF-8", b"\xff\xfe\xfd{\"id\":3}\n".to_vec()));
    cases.push((
        "invalid UTF-8 inside a string",
        b"{\"id\":4,\"method\":\"device/key/public\",\"params\":{\"keyId\":\"\xc3\x28\"}}\n"
            .to_vec(),
    ));
    cases.push(("NUL bytes", b"\0\0\0\n".to_vec()));
    cases.push(("lone surrogate", br#"{"id":5,"method":"\ud800"}"#.to_vec()));
    cases.push((
        "bare newline-less garbage then newline",
        b"}}}]]]\n".to_vec(),
    ));
    let mut report = Vec::new();
    for (what, bytes) in cases {
        let t0 = Instant::now();
        server.send_raw(&bytes);
        if !bytes.ends_with(b"\n") {
            server.send_raw(b"\n");
        }
        let a = server.recv();
        assert!(
            a.get("error").is_some(),
            "{what}: expected an error, got {a}"
        );
        // The server still answers a good request.
        let r = server.request("device/key/public", json!({"keyId": key}));
        result(&r);
        report.push(format!(
            "{what}: {} in {:?}",
            a["error"]["code"],
            t0.elapsed()
        ));
    }
    let peak = hwm(&server.child);
    assert_eq!(server.finish(), 0);
    eprintln!(
        "SERVER abuse: {}; peak RSS {} MiB (after start-up {} MiB)",
        report.join("; "),
        peak / 1024,
        base / 1024
    );
    assert!(peak < MAX_HWM_KIB, "peak RSS {peak} KiB");
}

#[test]
fn stdin_closed_mid_request() {
    let env = Env::ours_software("");
    // A partial line, then end of input: answered as a parse error, clean exit.
    let mut server = started(&env);
    server.send_raw(br#"{"id":7,"method":"device/key/pub"#);
    drop(server.stdin.take());
    let a = server.recv();
    assert_eq!(a["error"]["code"], json!(-32700), "{a}");
    assert_eq!(server.finish(), 0);

    // Requests in flight when stdin closes are still answered before the exit.
    let mut server = started(&env);
    let key = create_key(&mut server);
    let n = 50;
    let mut buf = Vec::new();
    for i in 0..n {
        serde_json::to_writer(
            &mut buf,
            &json!({"id": i, "method": "device/key/sign",
                    "params": {"keyId": key, "payload": enrollment_payload()}}),
        )
        .unwrap();
        buf.push(b'\n');
    }
    buf.extend_from_slice(br#"{"id":999,"method":"device/key/si"#);
    server.send_raw(&buf);
    drop(server.stdin.take());
    let answers = collect(&mut server, n + 1);
    let signed = answers.iter().filter(|a| a.get("result").is_some()).count();
    assert_eq!(server.finish(), 0, "clean exit");
    eprintln!(
        "SERVER stdin closed: partial line -> -32700; {n} requests in flight at close -> {signed} \
         signed, the rest -32001; the cut request -> an error; exit 0"
    );
    assert!(answers.iter().any(|a| a["error"]["code"] == json!(-32700)));
}

// ---- socket mode ----

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

fn start_socket(env: &Env, cap: usize, idle_ms: u64) -> SocketServer {
    let dir = env.dir.path().join("run");
    let path = dir.join("dk.sock");
    let stderr = std::fs::File::create(env.dir.path().join("serve.stderr")).unwrap();
    let mut child = env
        .command()
        .args(["serve", "--socket"])
        .arg(&path)
        .args(["--max-connections", &cap.to_string()])
        .args(["--idle-timeout-ms", &idle_ms.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr))
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while UnixStream::connect(&path).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "server exited early");
        assert!(t0.elapsed() < TIMEOUT, "socket never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    SocketServer { child, path }
}

/// Raises the soft open-file limit so 1,000 connections fit.
fn raise_nofile(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 && lim.rlim_cur < want {
        lim.rlim_cur = want.min(lim.rlim_max);
        // SAFETY: valid pointer.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}

/// The first line on a connection, `None` at EOF, `Err` on timeout.
fn first_line(stream: &UnixStream, wait: Duration) -> Result<Option<Value>, ()> {
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) => Ok(None),
        Ok(_) => Ok(Some(serde_json::from_str(&line).unwrap())),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(None),
        Err(_) => Err(()),
    }
}

fn request(stream: &mut UnixStream, id: i64, method: &str, params: Value) -> Option<Value> {
    writeln!(
        stream,
        "{}",
        json!({"id": id, "method": method, "params": params})
    )
    .ok()?;
    first_line(stream, TIMEOUT).ok().flatten()
}

fn initialize(stream: &mut UnixStream) -> bool {
    request(
        stream,
        0,
        "initialize",
        json!({"clientInfo": {"name": "robust", "version": "1"}}),
    )
    .is_some_and(|r| r.get("result").is_some())
}

#[test]
fn a_thousand_connections_at_once_meet_the_cap_and_the_deadline() {
    const CAP: usize = 16;
    const IDLE_MS: u64 = 4000;
    let env = Env::ours_software("");
    let server = start_socket(&env, CAP, IDLE_MS);
    let n = scaled(1000, 200);
    raise_nofile(n as u64 + 256);
    let t0 = Instant::now();
    let conns: Vec<UnixStream> = (0..n)
        .map(|i| UnixStream::connect(&server.path).unwrap_or_else(|e| panic!("connect {i}: {e}")))
        .collect();
    let opened_in = t0.elapsed();
    let (mut refused, mut accepted) = (0, Vec::new());
    for c in conns {
        match first_line(&c, Duration::from_millis(100)) {
            Ok(Some(v)) => {
                assert_eq!(v["error"]["code"], json!(-32001), "{v}");
                refused += 1;
            }
            Ok(None) => panic!(
                "a connection closed without a word after {:?}",
                t0.elapsed()
            ),
            Err(()) => accepted.push(c),
        }
    }
    assert!(
        t0.elapsed() < Duration::from_millis(IDLE_MS),
        "the check took longer than the deadline; it cannot tell served from cut off"
    );
    let threads_at_peak = proc_status_kib(server.child.id(), "Threads").unwrap_or(0);
    assert!(
        accepted.len() <= CAP,
        "{} connections served at once, cap {CAP}",
        accepted.len()
    );
    assert_eq!(refused + accepted.len(), n);
    // The idle ones are cut off at the deadline.
    let cut0 = Instant::now();
    for c in &accepted {
        assert!(
            matches!(first_line(c, Duration::from_millis(IDLE_MS * 3)), Ok(None)),
            "an idle connection outlived its deadline"
        );
    }
    let cut_after = cut0.elapsed();
    drop(accepted);
    std::thread::sleep(Duration::from_millis(200));
    // The server is still alive and serves a new client.
    let mut c = UnixStream::connect(&server.path).unwrap();
    assert!(initialize(&mut c), "a new client is served after the storm");
    let peak = hwm(&server.child);
    eprintln!(
        "SERVER socket: {n} connections opened in {opened_in:?}: {refused} refused with -32001, \
         {} served (cap {CAP}); idle ones closed within {cut_after:?} of the check (deadline \
         {IDLE_MS} ms); server threads at peak {threads_at_peak}; peak RSS {} MiB",
        n - refused,
        peak / 1024
    );
    assert!(peak < MAX_HWM_KIB, "peak RSS {peak} KiB");
}

#[test]
fn slow_loris_and_non_reading_clients_do_not_hold_the_server() {
    const CAP: usize = 3;
    const IDLE_MS: u64 = 1000;
    let env = Env::ours_software("");
    let server = start_socket(&env, CAP, IDLE_MS);

    // A trickler: one byte every 100 ms, never a newline. Cut off at the deadline anyway.
    let path = server.path.clone();
    let trickler = std::thread::spawn(move || {
        let mut s = UnixStream::connect(&path).unwrap();
        let t0 = Instant::now();
        loop {
            if s.write_all(b" ").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            if t0.elapsed() > Duration::from_millis(IDLE_MS * 10) {
                return Err(t0.elapsed());
            }
        }
        Ok(t0.elapsed())
    });
    // A line writer that sends half a request and stops.
    let mut half = UnixStream::connect(&server.path).unwrap();
    half.write_all(br#"{"id":1,"method":"initialize","params":"#)
        .unwrap();
    // A client that sends many requests and never reads an answer.
    let mut deaf = UnixStream::connect(&server.path).unwrap();
    let mut flood = Vec::new();
    for i in 0..20_000 {
        flood.extend_from_slice(format!("{{\"id\":{i},\"method\":\"x\"}}\n").as_bytes());
    }
    deaf.set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let _ = deaf.write_all(&flood);

    let cut = trickler.join().unwrap();
    assert!(
        cut.is_ok(),
        "a byte-at-a-time client was never cut off: {cut:?}"
    );
    let mut buf = [0u8; 64];
    half.set_read_timeout(Some(Duration::from_millis(IDLE_MS * 5)))
        .unwrap();
    assert!(
        matches!(half.read(&mut buf), Ok(0) | Err(_)),
        "a half-sent request is cut off"
    );
    // Every slot must be free again by now (plus a deadline for the deaf client's writes).
    std::thread::sleep(Duration::from_millis(IDLE_MS * 3));
    let mut served = 0;
    let mut clients = Vec::new();
    for _ in 0..CAP {
        let mut c = UnixStream::connect(&server.path).unwrap();
        if initialize(&mut c) {
            served += 1;
        }
        clients.push(c);
    }
    eprintln!(
        "SERVER slow clients: trickler cut after {:?} (deadline {IDLE_MS} ms), half request cut, \
         deaf flooder released; afterwards {served} of {CAP} new clients served",
        cut.unwrap()
    );
    assert_eq!(
        served, CAP,
        "slow or deaf clients still hold connection slots"
    );
    drop(deaf);
}
