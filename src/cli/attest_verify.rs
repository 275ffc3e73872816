//! `devicekey attest verify`: the reference verifier ([`crate::attest`]) on the command line.
//!
//! Inputs: the evidence (the `result` of `device/key/attest`), the nonce the relying party sent,
//! EK roots and intermediates, and a way to reach the device for check 3:
//!
//! - `--activate-with CMD`: runs `sh -c CMD`, writes one JSON object to its stdin,
//!   `{"credentialBlobBase64": b64, "encryptedSecretBase64": b64}` (the params of
//!   `device/key/activateCredential` without `keyId`), and reads one JSON object from its stdout,
//!   `{"secretBase64": b64}` (that method's result). A non-zero exit is a refusal; the last line
//!   of its stderr is the reason. `devicekey attest activate --key-id ID` speaks this exchange.
//! - `--socket PATH --key-id ID`: sends `initialize`, `initialized` and
//!   `device/key/activateCredential` to a `devicekey serve --socket PATH`, one JSON line each.
//!
//! With `--pinned-ak FILE` (the base64 `akPublicArea` saved by `--save-ak` after a full
//! verification) checks 1 and 3 are replaced by comparing the AK with the pinned one; no roots
//! and no device round trip are needed.
//!
//! Nothing here writes to stdout: [`VerifyArgs::run`] returns the text to print.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde::Deserialize;

use super::ToolError;
use crate::attest::{
    verify, verify_pinned, AttestError, CredentialChallenge, Evidence, Report, TrustAnchors,
};

/// How long the device may take to answer the activation challenge.
const ACTIVATION_TIMEOUT: Duration = Duration::from_secs(60);

/// The longest answer line read from a command or a socket.
const MAX_ANSWER: u64 = 1 << 20;

/// Arguments of `devicekey attest verify`.
#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// The evidence JSON (the result of device/key/attest); `-` reads stdin.
    #[arg(long, value_name = "FILE")]
    pub evidence: PathBuf,
    /// The nonce sent with the attest request: unpadded base64url of 16 to 64 bytes (it may
    /// start with `-`, a base64url character).
    #[arg(long, allow_hyphen_values = true)]
    pub nonce: String,
    /// Trusted EK root certificates, PEM (one or more) or DER; repeat for more files.
    #[arg(
        long = "roots",
        value_name = "FILE",
        required_unless_present = "pinned_ak"
    )]
    pub roots: Vec<PathBuf>,
    /// Intermediate CA certificates to build the EK chain with (not trusted by themselves).
    #[arg(long = "intermediates", value_name = "FILE")]
    pub intermediates: Vec<PathBuf>,
    /// A command that answers the activation challenge: JSON on stdin and stdout (see the docs).
    #[arg(long, value_name = "CMD", conflicts_with_all = ["socket", "pinned_ak"])]
    pub activate_with: Option<String>,
    /// The socket of `devicekey serve --socket`, to send device/key/activateCredential to.
    #[arg(
        long,
        value_name = "PATH",
        requires = "key_id",
        conflicts_with = "pinned_ak"
    )]
    pub socket: Option<PathBuf>,
    /// The key id, for device/key/activateCredential over --socket.
    #[arg(long)]
    pub key_id: Option<String>,
    /// Verify against an AK pinned before (a file with its base64 akPublicArea) instead of the
    /// EK certificate and an activation.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["roots", "intermediates"])]
    pub pinned_ak: Option<PathBuf>,
    /// After a full verification passes, write the AK's base64 public area here (to pin it).
    #[arg(long, value_name = "FILE")]
    pub save_ak: Option<PathBuf>,
}

/// What `devicekey attest verify` found.
#[derive(Debug)]
pub struct VerifyOutput {
    /// The lines to print: one per check, then the verdict.
    pub text: String,
    /// The first failure, when not every check passed.
    pub failure: Option<AttestError>,
}

fn read_input(path: &Path) -> Result<Vec<u8>, ToolError> {
    let io = |e: std::io::Error| ToolError::Usage(format!("{}: {e}", path.display()));
    if path.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .take(16 << 20)
            .read_to_end(&mut buf)
            .map_err(io)?;
        Ok(buf)
    } else {
        std::fs::read(path).map_err(io)
    }
}

impl VerifyArgs {
    /// Runs the six checks; `Err` only when the inputs cannot be used at all.
    pub fn run(self) -> Result<VerifyOutput, ToolError> {
        let nonce = URL_SAFE_NO_PAD.decode(self.nonce.trim()).map_err(|e| {
            ToolError::Usage(format!(
                "--nonce must be unpadded base64url of 16 to 64 bytes: {e}"
            ))
        })?;
        let evidence = Evidence::from_json(&read_input(&self.evidence)?)
            .map_err(|e| ToolError::Usage(e.to_string()))?;
        let evidence = match evidence.into_tpm() {
            Ok(t) => t,
            Err(e) => {
                return Ok(VerifyOutput {
                    text: format!("NOT verified: {e}"),
                    failure: Some(e),
                })
            }
        };
        let report = if let Some(pinned) = &self.pinned_ak {
            let text = read_input(pinned)?;
            let ak = STANDARD
                .decode(String::from_utf8_lossy(&text).trim())
                .map_err(|e| {
                    ToolError::Usage(format!(
                        "{}: not a base64 akPublicArea: {e}",
                        pinned.display()
                    ))
                })?;
            verify_pinned(&evidence, &nonce, &ak)
        } else {
            let roots: Vec<&Path> = self.roots.iter().map(PathBuf::as_path).collect();
            let intermediates: Vec<&Path> =
                self.intermediates.iter().map(PathBuf::as_path).collect();
            let anchors = TrustAnchors::from_files(&roots, &intermediates)
                .map_err(|e| ToolError::Usage(e.to_string()))?;
            let activate = |c: &CredentialChallenge| -> Result<Vec<u8>, String> {
                match (&self.activate_with, &self.socket, &self.key_id) {
                    (Some(cmd), _, _) => activate_with_command(cmd, c),
                    (None, Some(socket), Some(key_id)) => {
                        activate_over_socket(socket, key_id, c)
                    }
                    _ => Err("no way to reach the device was given (--activate-with or --socket with --key-id)".into()),
                }
            };
            verify(&evidence, &nonce, &anchors, activate)
        }
        .map_err(|e| ToolError::Usage(e.to_string()))?;
        if report.passed() {
            if let Some(path) = &self.save_ak {
                std::fs::write(
                    path,
                    format!("{}\n", STANDARD.encode(&report.ak_public_area)),
                )
                .map_err(|source| ToolError::Io {
                    path: path.clone(),
                    source,
                })?;
            }
        }
        Ok(render(&report))
    }
}

fn render(report: &Report) -> VerifyOutput {
    let mut text = String::new();
    for c in &report.checks {
        text.push_str(&c.to_string());
        text.push('\n');
    }
    let failure = report.first_failure();
    if failure.is_none() {
        text.push_str(&format!(
            "verified: all six checks pass; the private key of this SPKI was generated in, and cannot leave, the TPM of the certified EK:\n  {}",
            STANDARD.encode(&report.spki_der)
        ));
    } else {
        let failed = report.checks.iter().filter(|c| !c.passed()).count();
        text.push_str(&format!(
            "NOT verified: {failed} of {} checks failed",
            report.checks.len()
        ));
    }
    VerifyOutput { text, failure }
}

fn challenge_json(c: &CredentialChallenge) -> serde_json::Value {
    serde_json::json!({
        "credentialBlobBase64": STANDARD.encode(&c.credential_blob),
        "encryptedSecretBase64": STANDARD.encode(&c.encrypted_secret),
    })
}

/// The answer of the device: `{"secretBase64": b64}`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SecretAnswer {
    secret_base64: String,
}

fn decode_secret(answer: serde_json::Value) -> Result<Vec<u8>, String> {
    let answer: SecretAnswer = serde_json::from_value(answer)
        .map_err(|e| format!("the answer is not {{\"secretBase64\": ...}}: {e}"))?;
    STANDARD
        .decode(answer.secret_base64)
        .map_err(|e| format!("secretBase64 is not base64: {e}"))
}

/// Runs `sh -c cmd` with the challenge as JSON on stdin; reads `{"secretBase64"}` from stdout.
fn activate_with_command(cmd: &str, c: &CredentialChallenge) -> Result<Vec<u8>, String> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let input = format!("{}\n", challenge_json(c));
    if let Some(mut stdin) = child.stdin.take() {
        // A command that exits without reading its input is judged by its answer below.
        let _ = stdin.write_all(input.as_bytes());
    }
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let mut stderr = child.stderr.take().ok_or("no stderr")?;
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = (&mut stdout).take(MAX_ANSWER).read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = (&mut stderr).take(MAX_ANSWER).read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + ACTIVATION_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{cmd:?} did not answer within {} s",
                    ACTIVATION_TIMEOUT.as_secs()
                ));
            }
            Err(e) => return Err(format!("waiting for {cmd:?}: {e}")),
        }
    };
    let out = out_reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    if !status.success() {
        // The reason is the last line of its stderr (a command's earlier lines are its logs): the
        // check's verdict stays one line.
        let err = String::from_utf8_lossy(&err);
        let reason = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        return Err(format!("{cmd:?} failed ({status}): {}", reason.trim()));
    }
    let answer: serde_json::Value = serde_json::from_slice(&out)
        .map_err(|e| format!("{cmd:?} did not print one JSON object: {e}"))?;
    decode_secret(answer)
}

/// Sends `device/key/activateCredential` to `devicekey serve --socket`.
fn activate_over_socket(
    socket: &Path,
    key_id: &str,
    c: &CredentialChallenge,
) -> Result<Vec<u8>, String> {
    let stream = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
    stream
        .set_read_timeout(Some(ACTIVATION_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(ACTIVATION_TIMEOUT)))
        .map_err(|e| format!("socket: {e}"))?;
    let mut writer = stream.try_clone().map_err(|e| format!("socket: {e}"))?;
    let mut reader = BufReader::new(stream);
    let mut send = |v: serde_json::Value| {
        writer
            .write_all(format!("{v}\n").as_bytes())
            .map_err(|e| format!("writing to {}: {e}", socket.display()))
    };
    send(
        serde_json::json!({"id": 1, "method": "initialize", "params": {
        "clientInfo": {"name": "devicekey-attest-verify", "version": env!("CARGO_PKG_VERSION")}}}),
    )?;
    read_response(&mut reader, 1)?;
    send(serde_json::json!({"method": "initialized"}))?;
    let mut params = challenge_json(c);
    params["keyId"] = key_id.into();
    send(
        serde_json::json!({"id": 2, "method": "device/key/activateCredential", "params": params}),
    )?;
    decode_secret(read_response(&mut reader, 2)?)
}

/// Reads lines until the response with `id`; returns its result or the error as text.
fn read_response(reader: &mut impl BufRead, id: u64) -> Result<serde_json::Value, String> {
    loop {
        let mut line = String::new();
        let n = (&mut *reader)
            .take(MAX_ANSWER)
            .read_line(&mut line)
            .map_err(|e| format!("reading the server's answer: {e}"))?;
        if n == 0 {
            return Err("the server closed the connection without an answer".into());
        }
        let mut message: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| format!("the server sent a line that is not JSON: {e}"))?;
        if message.get("id") != Some(&serde_json::Value::from(id)) {
            continue; // a notification, or an answer to something else
        }
        if let Some(error) = message.get("error") {
            return Err(format!(
                "the server answered error {}: {}",
                error.get("code").cloned().unwrap_or_default(),
                error
                    .get("message")
                    .and_then(|m| m.as_str())
                    .unwrap_or("(no message)")
            ));
        }
        return message
            .get_mut("result")
            .map(serde_json::Value::take)
            .ok_or_else(|| "the server's answer has no result".to_string());
    }
}
