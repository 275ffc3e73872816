//! `devicekey serve --socket`: a client cannot forge log lines. Its `clientInfo` strings reach the
//! log with newlines, escape sequences and Unicode line separators escaped.

#![cfg(target_os = "linux")]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::json;
use testkit::rpc::*;

#[test]
fn a_client_name_with_a_newline_stays_on_one_escaped_log_line() {
    let env = Env::ours_software("");
    let path = env.dir.path().join("sock/dk.sock");
    let stderr = std::fs::File::create(env.dir.path().join("serve.stderr")).unwrap();
    let mut child = env
        .command()
        .arg("serve")
        .arg("--socket")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr))
        .spawn()
        .unwrap();
    let start = Instant::now();
    let stream = loop {
        if let Ok(s) = UnixStream::connect(&path) {
            break s;
        }
        assert!(child.try_wait().unwrap().is_none(), "server exited early");
        assert!(start.elapsed() < TIMEOUT, "socket never appeared");
        std::thread::sleep(Duration::from_millis(20));
    };
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let request = json!({"id": 1, "method": "initialize", "params": {"clientInfo": {
        "name": "x\nFAKE LOG LINE",
        "version": "1\r\u{1b}[2K\u{2028}FAKE VERSION LINE"}}});
    writeln!(writer, "{request}").unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let response: serde_json::Value = serde_json::from_str(&line).unwrap();
    result(&response);
    // The log line is written before the answer.
    let _ = child.kill();
    let _ = child.wait();

    let log = env.log();
    let forged: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("FAKE LOG LINE"))
        .collect();
    assert_eq!(forged.len(), 1, "exactly one line names the client:\n{log}");
    assert!(
        forged[0]
            .contains(r"client x\nFAKE LOG LINE 1\r\u{1b}[2K\u{2028}FAKE VERSION LINE connected"),
        "escaped on one line: {:?}",
        forged[0]
    );
    assert!(
        forged[0].starts_with("devicekey["),
        "the line is the server's own: {:?}",
        forged[0]
    );
    assert!(
        !log.contains('\u{1b}') && !log.contains('\u{2028}') && !log.contains('\r'),
        "no raw control characters: {log:?}"
    );
    for l in log.lines() {
        assert!(
            l.starts_with("devicekey["),
            "a line not written by the server: {l:?}"
        );
    }
}
