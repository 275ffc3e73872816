//! Key attestation end to end: the device side (`devicekey serve` on a swtpm slot whose TPM was
//! manufactured with EK certificates) against the reference verifier (`devicekey attest verify`,
//! the real binary), as a relying party would run them:
//!
//! - create a proof key, `device/key/attest` with a fresh nonce, then `devicekey attest verify`
//!   with swtpm's local CA (root and intermediate) and the activation done (a) through
//!   `--activate-with 'devicekey attest activate --key-id ID'` and (b) through the server's
//!   socket: all six checks pass, exit 0;
//! - negative controls, each failing at its check with a message that names it, exit non-zero:
//!   another nonce (5), another TPM key's public area (5 and 6), a software key's SPKI (5 and 6),
//!   roots without the swtpm CA (1), a credential made for another AK (3: the TPM refuses it),
//!   and `"format":"none"` evidence of a software key (refused as not in a TPM);
//! - over three attests the server's debug log shows one TPM2_Certify per request and the AK
//!   created once.
//!
//! Without swtpm or swtpm_setup the tests skip, unless `DEVICEKEY_TEST_REQUIRE` contains
//! `swtpm` (then they fail).
#![cfg(all(feature = "tpm", target_os = "linux"))]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};

use testkit::rpc::{result, Env, ACCOUNT, CLIENT};
use testkit::swtpm::{provision_with_ek_certificates, Swtpm};

/// Where swtpm_setup's local CA keeps its root and the certificate that issues EK certificates.
const ROOT_CA: &str = "/var/lib/swtpm-localca/swtpm-localca-rootca-cert.pem";
const ISSUER_CA: &str = "/var/lib/swtpm-localca/issuercert.pem";

fn nonce() -> String {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).unwrap();
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A nonce whose base64url starts with `-` (one in 64 random nonces does): the command line must
/// take it as the value of `--nonce`, not as an option.
fn hyphen_nonce() -> String {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).unwrap();
    bytes[0] = 0xf8 | (bytes[0] & 0x03); // first six bits 62: '-'
    let nonce = URL_SAFE_NO_PAD.encode(bytes);
    assert!(nonce.starts_with('-'), "{nonce}");
    nonce
}

/// An env whose config has one TPM slot on `tpm`, with its key store in `store`.
fn tpm_env(tpm: &Swtpm, store: &str) -> Env {
    let mut env = Env::ours_software("");
    let keys = env.dir.path().join(store);
    std::fs::write(
        env.config_path(),
        format!(
            "[[slot]]\nlabel = \"tpm\"\nbackend = \"tpm\"\ndir = \"{}\"\ntcti = \"{}\"\nallow_simulator = true\n\n[server]\n",
            keys.display(),
            tpm.tcti(),
        ),
    )
    .unwrap();
    env.vars.push(("DEVICEKEY_LOG".into(), "debug".into()));
    env
}

/// `devicekey serve --socket` of an env, and a line-per-request client of it.
struct SocketServer {
    child: Child,
    socket: PathBuf,
}

impl SocketServer {
    fn start(env: &Env) -> SocketServer {
        let dir = env.dir.path().join("run");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        let socket = dir.join("serve.sock");
        let mut child = env
            .command()
            .args(["serve", "--socket"])
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(env.dir.path().join("serve.stderr")).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            let exited = child.try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "devicekey serve did not listen ({exited:?}): {}",
                env.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        SocketServer { child, socket }
    }

    /// One connection: initialize, initialized, then each request in turn; their responses.
    fn requests(&self, requests: &[(&str, Value)]) -> Vec<Value> {
        let stream = UnixStream::connect(&self.socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        let mut call = |id: u64, method: &str, params: Value| -> Value {
            writeln!(
                writer,
                "{}",
                json!({"id": id, "method": method, "params": params})
            )
            .unwrap();
            loop {
                let mut line = String::new();
                assert_ne!(reader.read_line(&mut line).unwrap(), 0, "connection closed");
                let v: Value = serde_json::from_str(&line).unwrap();
                if v["id"] == json!(id) {
                    if method == "initialize" {
                        writeln!(writer, "{}", json!({"method": "initialized"})).unwrap();
                    }
                    return v;
                }
            }
        };
        call(
            1,
            "initialize",
            json!({"clientInfo": {"name": "attest-e2e", "version": "1"}}),
        );
        requests
            .iter()
            .enumerate()
            .map(|(i, (method, params))| call(i as u64 + 2, method, params.clone()))
            .collect()
    }

    fn request(&self, method: &str, params: Value) -> Value {
        self.requests(&[(method, params)]).remove(0)
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SocketServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `devicekey attest verify` with `evidence` and `nonce`, the swtpm CA (or `roots`) and `extra`
/// arguments (the way to reach the device); returns (exit code, stdout, stderr).
fn verify(
    env: &Env,
    evidence: &Value,
    nonce: &str,
    roots: &str,
    extra: &[&str],
) -> (Option<i32>, String, String) {
    let file = env.dir.path().join("evidence.json");
    std::fs::write(&file, evidence.to_string()).unwrap();
    let out = env
        .command()
        .args(["attest", "verify", "--evidence"])
        .arg(&file)
        .args([
            "--nonce",
            nonce,
            "--roots",
            roots,
            "--intermediates",
            ISSUER_CA,
        ])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("--- attest verify {extra:?}\n{stdout}");
    (out.status.code(), stdout, stderr)
}

fn assert_all_six_pass(code: Option<i32>, stdout: &str, stderr: &str) {
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    for n in 1..=6 {
        assert!(stdout.contains(&format!("check {n} (")), "{stdout}");
    }
    assert_eq!(stdout.matches(": pass: ").count(), 6, "{stdout}");
    assert!(stdout.contains("verified: all six checks pass"), "{stdout}");
}

/// Asserts a refusal (exit 1) whose output names each of `checks` as failed (first the first).
fn assert_fails_at(result: (Option<i32>, String, String), checks: &[&str]) {
    let (code, stdout, stderr) = result;
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    for check in checks {
        assert!(
            stdout.contains(&format!("{check}: FAIL")),
            "{check} should fail:\n{stdout}"
        );
    }
    assert!(stdout.contains("NOT verified"), "{stdout}");
    // The error line names the first failed check.
    assert!(
        stderr.contains(&format!("attestation not verified: {}", checks[0])),
        "{stderr}"
    );
    assert_eq!(
        stdout.matches(": FAIL").count(),
        checks.len(),
        "only {checks:?} fail:\n{stdout}"
    );
}

fn b64_field(v: &Value, field: &str) -> String {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("no {field}: {v}"))
        .to_string()
}

/// TPM2_Certify commands, less those retried because swtpm (no resource manager, shared with the
/// module's own connection) was out of object memory.
fn certifies(log: &str) -> usize {
    count(log, "TPM2_Certify of") - count(log, "out of object memory (certifying the key")
}

/// TPM2_Create commands of an AK, less those retried the same way.
fn ak_creations(log: &str) -> usize {
    count(log, "TPM2_Create of the AK")
        - count(log, "out of object memory (creating the attestation key")
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn server_evidence_passes_the_reference_verifier_and_each_forgery_fails_at_its_check() {
    if !testkit::swtpm::have_swtpm_and(&["swtpm_setup", "openssl"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("tpm-state");
    provision_with_ek_certificates(&state);
    // swtpm_setup --create-ek-cert creates its local CA on first use.
    for ca in [ROOT_CA, ISSUER_CA] {
        assert!(Path::new(ca).exists(), "{ca} missing after swtpm_setup");
    }
    let tpm = Swtpm::start(&state);

    // A second TPM store on the same TPM: its own AK (the AK is per store), a genuine one. Run
    // first and alone (swtpm serves one connection at a time).
    let other_store = tpm_env(&tpm, "other-store");
    let mut server = other_store.serve();
    server.initialize();
    let r = server.request(
        "device/key/create",
        json!({"accountUserId": ACCOUNT, "clientId": CLIENT}),
    );
    let other_key = b64_field(result(&r), "keyId");
    let other_nonce = nonce();
    let r = server.request(
        "device/key/attest",
        json!({"keyId": other_key, "nonce": other_nonce}),
    );
    let other_store_evidence = result(&r).clone();
    assert_eq!(server.finish(), 0);

    // A software key: its SPKI, and its evidence ("format":"none").
    let soft = Env::ours_software("");
    let mut server = soft.serve();
    server.initialize();
    let r = server.request(
        "device/key/create",
        json!({"accountUserId": ACCOUNT, "clientId": CLIENT, "protectionPolicy": "allow_os_protected_nonextractable"}),
    );
    let soft_key = b64_field(result(&r), "keyId");
    let soft_spki = b64_field(result(&r), "publicKeySpkiDerBase64");
    let soft_nonce = nonce();
    let r = server.request(
        "device/key/attest",
        json!({"keyId": soft_key, "nonce": soft_nonce}),
    );
    let none_evidence = result(&r).clone();
    assert_eq!(none_evidence["format"], json!("none"), "{none_evidence}");
    assert_eq!(server.finish(), 0);

    // The device under test: `devicekey serve --socket` on the TPM slot.
    let env = tpm_env(&tpm, "keys");
    let server = SocketServer::start(&env);
    let (nonce1, nonce2, nonce3) = (nonce(), nonce(), hyphen_nonce());
    let answers = server.requests(&[
        (
            "device/key/create",
            json!({"accountUserId": ACCOUNT, "clientId": CLIENT}),
        ),
        (
            "device/key/create",
            json!({"accountUserId": ACCOUNT, "clientId": "cli_other"}),
        ),
    ]);
    let key_id = b64_field(result(&answers[0]), "keyId");
    let second_key = b64_field(result(&answers[1]), "keyId");
    assert!(key_id.starts_with("dk_tpm_"), "{}", answers[0]);
    assert_eq!(
        result(&answers[0])["protectionClass"],
        json!("hardware_tpm")
    );
    let log_before = env.log();
    let answers = server.requests(&[
        (
            "device/key/attest",
            json!({"keyId": key_id, "nonce": nonce1}),
        ),
        (
            "device/key/attest",
            json!({"keyId": second_key, "nonce": nonce2}),
        ),
        (
            "device/key/attest",
            json!({"keyId": key_id, "nonce": nonce3}),
        ),
    ]);
    let evidence = result(&answers[0]).clone();
    let second_evidence = result(&answers[1]).clone();
    let evidence3 = result(&answers[2]).clone();
    assert_eq!(evidence["format"], json!("tpm"), "{evidence}");
    assert_eq!(
        evidence["publicKeySpkiDerBase64"],
        result(&answers[0])["publicKeySpkiDerBase64"]
    );

    // Three attests: three TPM2_Certify (one per request), the AK created once (by the first)
    // and never again; the store's AK is the same in all three.
    let log = env.log();
    let attest_log = &log[log_before.len()..];
    assert_eq!(certifies(attest_log), 3, "{attest_log}");
    assert_eq!(ak_creations(attest_log), 1, "{attest_log}");
    assert_eq!(evidence["akPublicArea"], second_evidence["akPublicArea"]);
    assert_eq!(evidence["akPublicArea"], evidence3["akPublicArea"]);
    assert_ne!(
        evidence["akPublicArea"], other_store_evidence["akPublicArea"],
        "each store has its own AK"
    );
    eprintln!(
        "3 attests: {} TPM2_Certify ({} retried), {} TPM2_Create of the AK ({} retried)",
        count(attest_log, "TPM2_Certify of"),
        count(attest_log, "out of object memory (certifying the key"),
        count(attest_log, "TPM2_Create of the AK"),
        count(
            attest_log,
            "out of object memory (creating the attestation key"
        ),
    );

    let socket = server.socket.to_str().unwrap().to_string();
    let over_socket = ["--socket", socket.as_str(), "--key-id", key_id.as_str()];

    // (b) Activation through the server's socket: all six checks pass.
    let (code, stdout, stderr) = verify(&env, &evidence, &nonce1, ROOT_CA, &over_socket);
    assert_all_six_pass(code, &stdout, &stderr);
    assert!(
        stdout.contains(&b64_field(&evidence, "publicKeySpkiDerBase64")),
        "{stdout}"
    );

    // Another nonce: check 5.
    assert_fails_at(
        verify(&env, &evidence, &nonce2, ROOT_CA, &over_socket),
        &["check 5 (certifyInfo)"],
    );

    // The key's public area swapped for another TPM key's (the second key's, from its own
    // attest): the attested name is not that area's name (5), its point not the SPKI's (6).
    let mut swapped = evidence.clone();
    swapped["keyPublicArea"] = second_evidence["keyPublicArea"].clone();
    let failed = verify(&env, &swapped, &nonce1, ROOT_CA, &over_socket);
    assert!(failed.1.contains("attested name"), "{}", failed.1);
    assert_fails_at(
        failed,
        &["check 5 (certifyInfo)", "check 6 (keyPublicArea)"],
    );

    // The SPKI swapped for a software key's: extraData no longer matches (5), nor the point (6).
    let mut soft_spki_evidence = evidence.clone();
    soft_spki_evidence["publicKeySpkiDerBase64"] = json!(soft_spki);
    let failed = verify(&env, &soft_spki_evidence, &nonce1, ROOT_CA, &over_socket);
    assert!(failed.1.contains("extraData"), "{}", failed.1);
    assert_fails_at(
        failed,
        &["check 5 (certifyInfo)", "check 6 (keyPublicArea)"],
    );

    // A roots file without the swtpm CA (a fresh self-signed root): check 1.
    let other_root = tmp.path().join("other-root.pem");
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:P-256", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=not the swtpm CA", "-keyout"])
        .arg(tmp.path().join("other-root.key"))
        .arg("-out")
        .arg(&other_root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let failed = verify(
        &env,
        &evidence,
        &nonce1,
        other_root.to_str().unwrap(),
        &over_socket,
    );
    assert!(failed.1.contains("does not chain"), "{}", failed.1);
    assert_fails_at(failed, &["check 1 (EK certificate)"]);

    // A credential made for another AK. The construction: the evidence names the genuine AK of
    // another store on the same TPM (same EK, so check 1 still passes, and a well-formed
    // restricted AK, so check 2 passes). The verifier makes its credential for that AK's name
    // and this device activates it with its own AK: the TPM finds the name in the blob is not
    // its activation key's and refuses to release the secret (check 3). The AK's signature over
    // certifyInfo then does not verify with the claimed AK either (check 4).
    let mut other_ak = evidence.clone();
    other_ak["akPublicArea"] = other_store_evidence["akPublicArea"].clone();
    let failed = verify(&env, &other_ak, &nonce1, ROOT_CA, &over_socket);
    assert!(
        failed
            .1
            .contains("did not activate the credential: the server answered error -32603"),
        "{}",
        failed.1
    );
    assert!(failed.1.contains("TPM2_ActivateCredential"), "{}", failed.1);
    assert_fails_at(
        failed,
        &["check 3 (credential activation)", "check 4 (AK signature)"],
    );

    // Evidence asked for a software-store key: "format":"none", refused as such.
    let (code, stdout, stderr) = verify(&env, &none_evidence, &soft_nonce, ROOT_CA, &over_socket);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("NOT verified: the evidence has format \"none\": the key is not in a TPM (protection class os_protected_nonextractable)"),
        "{stdout}"
    );
    assert!(!stdout.contains(": pass: "), "{stdout}");

    // The device kept working through the refusals: the key still signs.
    let r = server.request(
        "device/key/sign",
        json!({"keyId": key_id, "payload": testkit::rpc::connection_payload()}),
    );
    assert!(result(&r)["signatureDerBase64"].is_string(), "{r}");
    server.stop();
    let log = env.log();
    assert_eq!(ak_creations(&log), 1, "{log}");

    // (a) Activation through `devicekey attest activate` as the verifier's command (the server
    // is stopped: swtpm serves one client at a time). Save the AK for pinning.
    let ak_file = tmp.path().join("ak.b64");
    let activate = format!(
        "'{}' attest activate --key-id {key_id}",
        testkit::bin_path().display()
    );
    let (code, stdout, stderr) = verify(
        &env,
        &evidence3,
        &nonce3,
        ROOT_CA,
        &[
            "--activate-with",
            &activate,
            "--save-ak",
            ak_file.to_str().unwrap(),
        ],
    );
    assert_all_six_pass(code, &stdout, &stderr);

    // The same command refuses a credential for another AK: check 3, with the TPM's reason (the
    // command's last stderr line, not its debug log) on the check's one line.
    let failed = verify(
        &env,
        &other_ak,
        &nonce1,
        ROOT_CA,
        &["--activate-with", &activate],
    );
    let line = failed
        .1
        .lines()
        .find(|l| l.starts_with("check 3"))
        .unwrap_or_default();
    assert!(
        line.contains("refused by device: activating the credential (TPM2_ActivateCredential)"),
        "{}",
        failed.1
    );
    assert_eq!(
        failed.1.lines().count(),
        7,
        "one line per check and the verdict: {}",
        failed.1
    );
    assert_fails_at(
        failed,
        &["check 3 (credential activation)", "check 4 (AK signature)"],
    );

    // Pinned: a later attest of the same store verifies against the saved AK without roots or
    // activation; the other store's evidence does not match it.
    let nonce4 = hyphen_nonce();
    let (code, stdout, stderr) =
        env.cli(&["attest", "--key-id", &key_id, "--nonce", &nonce4], None);
    assert_eq!(code, 0, "{stderr}");
    let evidence4: Value = serde_json::from_str(&stdout).unwrap();
    let pinned = |ev: &Value, nonce: &str| {
        let file = tmp.path().join("pinned-evidence.json");
        std::fs::write(&file, ev.to_string()).unwrap();
        env.command()
            .args(["attest", "verify", "--evidence"])
            .arg(&file)
            .args(["--nonce", nonce, "--pinned-ak"])
            .arg(&ak_file)
            .output()
            .unwrap()
    };
    let out = pinned(&evidence4, &nonce4);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("pinned AK"), "{text}");
    let out = pinned(&other_store_evidence, &other_nonce);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("akPublicArea is not the pinned AK"), "{text}");
}
