//! `devicekey serve` over stdio: `device/key/sign` requests per second and latency, one request
//! at a time and pipelined, with a sample of the signatures checked; and, for the overhead
//! figure, the same proof signed through C_Sign(CKM_ECDSA_SHA256) in-process.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::ObjectClass;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::pkcs8::DecodePublicKey;
use serde_json::{json, Value};

use crate::p11::{self, Module, Target, Verifier};
use crate::sign::{latency_figures, Plan};
use crate::stats::{percentile, Record};
use crate::{BenchError, Ctx, Result};

const ACCOUNT: &str = "bench-account";
const CLIENT: &str = "bench-client";
/// Every this many responses, one signature is checked.
const CHECK_EVERY: usize = 100;
/// Requests sent before each timed run.
const WARMUP: usize = 100;

/// Options of the JSON-RPC measurement.
#[derive(clap::Args, Clone, Debug)]
pub struct RpcPlan {
    /// The `devicekey` binary.
    #[arg(long)]
    pub devicekey: PathBuf,
    /// Our module, for the in-process C_Sign baseline (same config, same key).
    #[arg(long)]
    pub module: PathBuf,
    /// Timed runs per figure.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Requests per run.
    #[arg(long, default_value_t = 2000)]
    pub requests: usize,
    /// Requests in flight when pipelining (the server's default limit is 64).
    #[arg(long, default_value_t = 32)]
    pub window: usize,
    /// Appended to every variant name (bench.sh marks the run pinned to one CPU with it).
    #[arg(long, default_value = "")]
    pub tag: String,
}

struct Server {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    line: String,
}

impl Server {
    fn spawn(devicekey: &Path) -> Result<Self> {
        let mut child = Command::new(devicekey)
            .arg("serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| BenchError::Other("no stdin".into()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| BenchError::Other("no stdout".into()))?;
        Ok(Server {
            child,
            stdin,
            stdout: BufReader::new(stdout),
            line: String::new(),
        })
    }

    fn send(&mut self, line: &str) -> Result<()> {
        self.stdin.write_all(line.as_bytes())?;
        self.stdin.flush()?;
        Ok(())
    }

    fn recv(&mut self) -> Result<Value> {
        self.line.clear();
        if self.stdout.read_line(&mut self.line)? == 0 {
            return Err(BenchError::Other("the server closed its output".into()));
        }
        serde_json::from_str(&self.line)
            .map_err(|e| BenchError::Invalid(format!("response is not JSON: {e}")))
    }

    fn call(&mut self, id: u64, method: &str, params: Value) -> Result<Value> {
        self.send(&format!(
            "{}\n",
            json!({"id": id, "method": method, "params": params})
        ))?;
        let r = self.recv()?;
        r.get("result")
            .cloned()
            .ok_or_else(|| BenchError::Invalid(format!("{method} failed: {r}")))
    }

    fn finish(mut self) -> Result<()> {
        drop(self.stdin);
        let status = self.child.wait()?;
        if !status.success() {
            return Err(BenchError::Other(format!(
                "devicekey serve exited with {status}"
            )));
        }
        Ok(())
    }
}

fn b64url_random(n: usize) -> Result<String> {
    let mut b = vec![0u8; n];
    getrandom::getrandom(&mut b).map_err(|e| BenchError::Other(format!("getrandom: {e}")))?;
    Ok(URL_SAFE_NO_PAD.encode(b))
}

/// `count` sign request lines with ids from `first`, each with a fresh nonce, expiring in 5 min.
fn sign_lines(key_id: &str, first: u64, count: usize) -> Result<Vec<String>> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| BenchError::Other(e.to_string()))?
        .as_secs();
    (0..count as u64)
        .map(|i| {
            let payload = json!({
                "type": "remoteControlClientConnection",
                "nonce": b64url_random(32)?,
                "audience": "remote_control_client_websocket",
                "sessionId": "wssess_bench",
                "targetOrigin": "https://chatgpt.com",
                "targetPath": "/api/codex/remote/control/client",
                "accountUserId": ACCOUNT,
                "clientId": CLIENT,
                "tokenExpiresAt": now + 300,
                "tokenSha256Base64url": b64url_random(32)?,
                "scopes": ["remote_control_controller_websocket"],
            });
            Ok(format!(
                "{}\n",
                json!({"id": first + i, "method": "device/key/sign",
                       "params": {"keyId": key_id, "payload": payload}})
            ))
        })
        .collect()
}

/// Checks one sign response (its id, and its signature when `verify`); returns the signed bytes.
fn check_response(r: &Value, id: u64, verifier: &Verifier, verify: bool) -> Result<Vec<u8>> {
    if r.get("id").and_then(Value::as_u64) != Some(id) {
        return Err(BenchError::Invalid(format!(
            "expected the answer to {id}, got {r}"
        )));
    }
    let result = r
        .get("result")
        .ok_or_else(|| BenchError::Invalid(format!("sign failed: {r}")))?;
    let field = |name: &str| -> Result<Vec<u8>> {
        let text = result.get(name).and_then(Value::as_str).unwrap_or_default();
        STANDARD
            .decode(text)
            .map_err(|e| BenchError::Invalid(format!("{name} is not base64: {e}")))
    };
    let signed = field("signedPayloadBase64")?;
    if verify {
        verifier.check_der(&signed, &field("signatureDerBase64")?)?;
    }
    Ok(signed)
}

/// The transport floor: one line at a time through `cat` over the same kind of pipes, p50 of
/// each run in µs. No server can answer faster than this on the machine.
fn echo_rtt(plan: &RpcPlan, line: &str) -> Result<Vec<f64>> {
    let mut child = Command::new("cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut input = child
        .stdin
        .take()
        .ok_or_else(|| BenchError::Other("no stdin".into()))?;
    let mut output = BufReader::new(
        child
            .stdout
            .take()
            .ok_or_else(|| BenchError::Other("no stdout".into()))?,
    );
    let mut back = String::new();
    let mut p50 = Vec::new();
    for _ in 0..plan.runs {
        let mut lat = Vec::with_capacity(plan.requests);
        for i in 0..WARMUP + plan.requests {
            let t = Instant::now();
            input.write_all(line.as_bytes())?;
            input.flush()?;
            back.clear();
            output.read_line(&mut back)?;
            if i >= WARMUP {
                lat.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        p50.push(percentile(&mut lat, 0.50));
    }
    drop(input);
    child.wait()?;
    Ok(p50)
}

/// `rpc`: the whole JSON-RPC measurement.
pub fn run(plan: &RpcPlan, sign_plan: &Plan) -> Result<()> {
    let serial_v = format!("one at a time{}", plan.tag);
    let pipe_v = format!("pipelined{}", plan.tag);
    let mut server = Server::spawn(&plan.devicekey)?;
    server.call(
        0,
        "initialize",
        json!({"clientInfo": {"name": "devicekey-bench", "version": env!("CARGO_PKG_VERSION")}}),
    )?;
    server.send("{\"method\":\"initialized\"}\n")?;
    let created = server.call(
        1,
        "device/key/create",
        json!({"accountUserId": ACCOUNT, "clientId": CLIENT,
               "protectionPolicy": "allow_os_protected_nonextractable"}),
    )?;
    let key_id = created["keyId"].as_str().unwrap_or_default().to_string();
    let spki = STANDARD
        .decode(
            created["publicKeySpkiDerBase64"]
                .as_str()
                .unwrap_or_default(),
        )
        .map_err(|e| BenchError::Invalid(format!("publicKeySpkiDerBase64: {e}")))?;
    let public = p256::PublicKey::from_public_key_der(&spki).map_err(|e| {
        BenchError::Invalid(format!("publicKeySpkiDerBase64 is not P-256 SPKI: {e}"))
    })?;
    let verifier = Verifier::from_point(public.to_encoded_point(false).as_bytes())?;

    let mut next_id = 10u64;
    let mut signed_example = Vec::new();
    let (mut serial_p50, mut serial_p99, mut serial_rate) = (Vec::new(), Vec::new(), Vec::new());
    let (mut pipe_p50, mut pipe_rate, mut public_p50) = (Vec::new(), Vec::new(), Vec::new());
    let mut checked = 0usize;
    for _ in 0..plan.runs {
        // One at a time.
        for line in sign_lines(&key_id, next_id, WARMUP)? {
            server.send(&line)?;
            server.recv()?;
        }
        next_id += WARMUP as u64;
        let lines = sign_lines(&key_id, next_id, plan.requests)?;
        let mut lat = Vec::with_capacity(lines.len());
        let start = Instant::now();
        for (i, line) in lines.iter().enumerate() {
            let t = Instant::now();
            server.send(line)?;
            let r = server.recv()?;
            lat.push(t.elapsed().as_secs_f64() * 1e6);
            let verify = i % CHECK_EVERY == 0;
            signed_example = check_response(&r, next_id + i as u64, &verifier, verify)?;
            checked += usize::from(verify);
        }
        serial_rate.push(lines.len() as f64 / start.elapsed().as_secs_f64());
        serial_p50.push(percentile(&mut lat, 0.50));
        serial_p99.push(percentile(&mut lat, 0.99));
        next_id += lines.len() as u64;

        // Pipelined: up to `window` requests in flight.
        let lines = sign_lines(&key_id, next_id, plan.requests)?;
        let mut sent_at = Vec::with_capacity(lines.len());
        let mut lat = Vec::with_capacity(lines.len());
        let start = Instant::now();
        let mut sent = 0;
        while sent < lines.len().min(plan.window) {
            sent_at.push(Instant::now());
            server.send(&lines[sent])?;
            sent += 1;
        }
        for received in 0..lines.len() {
            let r = server.recv()?;
            let id = r.get("id").and_then(Value::as_u64).unwrap_or(0);
            let i = id.checked_sub(next_id).unwrap_or(u64::MAX) as usize;
            let at = sent_at
                .get(i)
                .ok_or_else(|| BenchError::Invalid(format!("unexpected response {r}")))?;
            lat.push(at.elapsed().as_secs_f64() * 1e6);
            let verify = received % CHECK_EVERY == 0;
            check_response(&r, id, &verifier, verify)?;
            checked += usize::from(verify);
            if sent < lines.len() {
                sent_at.push(Instant::now());
                server.send(&lines[sent])?;
                sent += 1;
            }
        }
        pipe_rate.push(lines.len() as f64 / start.elapsed().as_secs_f64());
        pipe_p50.push(percentile(&mut lat, 0.50));
        next_id += lines.len() as u64;

        // device/key/public one at a time: the same transport and dispatch, no signature.
        let mut lat = Vec::with_capacity(plan.requests);
        for _ in 0..plan.requests {
            let line = format!(
                "{}\n",
                json!({"id": next_id, "method": "device/key/public", "params": {"keyId": key_id}})
            );
            let t = Instant::now();
            server.send(&line)?;
            let r = server.recv()?;
            lat.push(t.elapsed().as_secs_f64() * 1e6);
            if r.get("id").and_then(Value::as_u64) != Some(next_id) || r.get("result").is_none() {
                return Err(BenchError::Invalid(format!(
                    "device/key/public failed: {r}"
                )));
            }
            next_id += 1;
        }
        public_p50.push(percentile(&mut lat, 0.50));
    }
    server.finish()?;
    Record::new("rpc_public_p50", "ours-serve", &serial_v, "us", public_p50)
        .with_detail(json!({"requests_per_run": plan.requests}))
        .emit();

    let detail = json!({"requests_per_run": plan.requests, "signatures_checked": checked});
    let serial = Record::new("rpc_sign_p50", "ours-serve", &serial_v, "us", serial_p50)
        .with_detail(detail.clone());
    serial.emit();
    Record::new("rpc_sign_p99", "ours-serve", &serial_v, "us", serial_p99)
        .with_detail(detail.clone())
        .emit();
    Record::new(
        "rpc_sign_throughput",
        "ours-serve",
        &serial_v,
        "req/s",
        serial_rate,
    )
    .with_detail(detail.clone())
    .emit();
    Record::new(
        "rpc_sign_throughput",
        "ours-serve",
        &pipe_v,
        "req/s",
        pipe_rate,
    )
    .with_detail(json!({"requests_per_run": plan.requests, "window": plan.window}))
    .emit();
    Record::new("rpc_sign_p50", "ours-serve", &pipe_v, "us", pipe_p50)
        .with_detail(json!({"requests_per_run": plan.requests, "window": plan.window}))
        .emit();

    // The same proof through C_Sign in-process: what the server cannot avoid paying.
    let target = Target {
        module: plan.module.clone(),
        token: None,
        pin_env: None,
        name: "ours".into(),
    };
    let m = Module::open(&target)?;
    let s = m.session()?;
    let key = p11::find_labelled(&s, ObjectClass::PRIVATE_KEY, &key_id)?
        .ok_or_else(|| BenchError::Other(format!("our module does not show key {key_id}")))?;
    let (base_p50, _) = latency_figures(
        "proof_sign_latency",
        "ours",
        "CKM_ECDSA_SHA256",
        sign_plan,
        |_| {
            s.sign(&Mechanism::EcdsaSha256, key, &signed_example)
                .ctx("C_Sign")
                .map(|_| ())
        },
    )?;
    let overhead = serial.values.iter().map(|v| v - base_p50).collect();
    Record::new("rpc_overhead_p50", "ours-serve", &serial_v, "us", overhead)
        .with_detail(json!({"c_sign_p50_us": base_p50}))
        .emit();

    // The same round trip through `cat`: what the pipes and the scheduler alone cost.
    let line = sign_lines(&key_id, 0, 1)?.concat();
    Record::new(
        "pipe_echo_rtt_p50",
        "cat",
        &serial_v,
        "us",
        echo_rtt(plan, &line)?,
    )
    .with_detail(json!({"line_bytes": line.len(), "round_trips_per_run": plan.requests}))
    .emit();
    Ok(())
}
