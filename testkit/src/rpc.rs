//! Shared helpers of the `rpc_*` tests: a throwaway SoftHSM token, configs, and a client that
//! drives the real `devicekey serve` binary over pipes.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde_json::{json, Value};

use crate::softhsm;

pub use crate::softhsm::have_softhsm;
/// Carries the SoftHSM token label inside `Env::vars`.
const HSM_LABEL_VAR: &str = "DEVICEKEY_TEST_HSM_LABEL";
pub const PIN_VAR: &str = "DEVICEKEY_TEST_HSM_PIN";
pub const NONCE: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
pub const HASH: &str = "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU";
pub const ACCOUNT: &str = "account-user-1";
pub const CLIENT: &str = "cli_123";

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Our module next to the test binary, when it exists and lists a token.
pub fn our_module() -> Option<PathBuf> {
    let module = crate::module_path();
    module.exists().then_some(module)
}

/// A directory with a devicekey config (and maybe a SoftHSM token) for one server.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub vars: Vec<(String, String)>,
}

impl Env {
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("devicekey.toml")
    }

    fn write_config(&self, text: &str) {
        std::fs::write(self.config_path(), text).unwrap();
    }

    /// Rewrites the config: `slots` (where `@KEYS@` is this environment's key directory), then
    /// `[server]` with `extra_server`.
    pub fn set_config(&self, slots: &str, extra_server: &str) {
        let keys = self.dir.path().join("keys");
        let slots = slots.replace("@KEYS@", &keys.display().to_string());
        self.write_config(&format!("{slots}\n[server]\n{extra_server}\n"));
    }

    /// Writes `text` to `name` in this environment's directory, mode 0600 (a PIN file).
    pub fn secret_file(&self, name: &str, text: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    fn base(extra_server: &str, slots: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let env = Env { vars: vec![], dir };
        env.set_config(slots, extra_server);
        let mut env = env;
        env.vars.push((
            "DEVICEKEY_CONFIG".into(),
            env.config_path().display().to_string(),
        ));
        env.vars.push(("DEVICEKEY_LOG".into(), "info".into()));
        env
    }

    /// Server over SoftHSM as a foreign module declared `hardware_tpm`; our software slot is in
    /// the config too (for the module), but the server does not use our module.
    pub fn softhsm(extra_server: &str) -> Self {
        let mut env = Self::base(
            &format!(
                "module = \"{}\"\nprotection_class = \"hardware_tpm\"\npin_env = \"{PIN_VAR}\"\n{extra_server}",
                softhsm::module()
            ),
            "[[slot]]\nbackend = \"software\"\ndir = \"@KEYS@\"\n",
        );
        let conf = softhsm::write_conf(env.dir.path());
        let label = format!("dk-rpc-{}", &URL_SAFE_NO_PAD.encode(rand_bytes())[..10]);
        softhsm::init_token(&conf, &label);
        env.vars
            .push(("SOFTHSM2_CONF".into(), conf.display().to_string()));
        env.vars.push((PIN_VAR.into(), softhsm::PIN.into()));
        env.vars.push((HSM_LABEL_VAR.into(), label));
        env
    }

    /// The label of this environment's SoftHSM token.
    pub fn softhsm_label(&self) -> String {
        self.vars
            .iter()
            .find(|(k, _)| k == HSM_LABEL_VAR)
            .map(|(_, v)| v.clone())
            .expect("a SoftHSM environment")
    }

    /// Server over our own module (the default) with only a software slot.
    pub fn ours_software(extra_server: &str) -> Self {
        Self::base(
            extra_server,
            "[[slot]]\nbackend = \"software\"\ndir = \"@KEYS@\"\n",
        )
    }

    /// Server over our own module with one software slot labelled `label` that has
    /// `login = "pin"` (no PIN yet: `devicekey pin set --slot LABEL --pin-file F`).
    pub fn ours_software_pin(label: &str, extra_server: &str) -> Self {
        Self::base(extra_server, &software_pin_slot(label))
    }

    /// Server over our own module with a software slot and a pkcs11 slot wrapping SoftHSM
    /// declared `hardware_tpm`.
    pub fn ours_with_softhsm_slot(extra_server: &str) -> Self {
        let env = Self::softhsm("");
        let keys = env.dir.path().join("keys");
        env.write_config(&format!(
            "[[slot]]\nbackend = \"software\"\ndir = \"{}\"\n\n[[slot]]\nlabel = \"hsm\"\nbackend = \"pkcs11\"\nmodule = \"{}\"\ntoken = \"{}\"\npin_env = \"{PIN_VAR}\"\nprotection_class = \"hardware_tpm\"\n\n[server]\n{extra_server}\n",
            keys.display(),
            softhsm::module(),
            env.softhsm_label()
        ));
        env
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(crate::bin_path());
        for (k, v) in &self.vars {
            cmd.env(k, v);
        }
        cmd.env("HOME", self.dir.path());
        cmd.env("XDG_DATA_HOME", self.dir.path().join("data"));
        cmd.env("XDG_CONFIG_HOME", self.dir.path().join("config"));
        cmd
    }

    /// `devicekey create --json` of a proof key that an OS-protected slot may hold (a software
    /// slot); asserts success and returns the key's JSON.
    pub fn cli_create_os_protected(&self) -> Value {
        let args = [
            "create",
            "--account-user-id",
            ACCOUNT,
            "--client-id",
            CLIENT,
            "--policy",
            "allow-os-protected-nonextractable",
            "--json",
        ];
        let (code, out, err) = self.cli(&args, None);
        assert_eq!(code, 0, "devicekey create: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.stderr")).unwrap_or_default()
    }

    /// Starts `devicekey serve`.
    pub fn serve(&self) -> Server {
        let stderr = std::fs::File::create(self.dir.path().join("serve.stderr")).unwrap();
        let mut child = self
            .command()
            .arg("serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("start devicekey serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let reader = BufReader::new(stdout);
            for line in reader.lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Server {
            stdin: child.stdin.take(),
            child,
            lines: rx,
            next_id: 1000,
        }
    }

    /// Runs the CLI with `args`; returns (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str], stdin: Option<&[u8]>) -> (i32, String, String) {
        let mut cmd = self.command();
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if let Some(data) = stdin {
            child.stdin.take().unwrap().write_all(data).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// A `[[slot]]` of the software store in the environment's key directory with `login = "pin"`.
pub fn software_pin_slot(label: &str) -> String {
    format!("[[slot]]\nlabel = \"{label}\"\nbackend = \"software\"\ndir = \"@KEYS@\"\nlogin = \"pin\"\n")
}

pub fn rand_bytes() -> [u8; 16] {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).unwrap();
    b
}

/// A running `devicekey serve`.
pub struct Server {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    pub lines: mpsc::Receiver<String>,
    next_id: i64,
}

pub const TIMEOUT: Duration = Duration::from_secs(60);

impl Server {
    pub fn send_raw(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(bytes).unwrap();
        stdin.flush().unwrap();
    }

    pub fn send(&mut self, message: &Value) {
        let mut line = serde_json::to_vec(message).unwrap();
        line.push(b'\n');
        self.send_raw(&line);
    }

    /// The next output line, parsed; panics after [`TIMEOUT`].
    pub fn recv(&mut self) -> Value {
        let line = self
            .lines
            .recv_timeout(TIMEOUT)
            .expect("a response line in time");
        let value: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {line}"));
        assert!(
            value.get("jsonrpc").is_none(),
            "no jsonrpc member on output: {line}"
        );
        value
    }

    /// True when no line arrives within `wait`.
    pub fn silent_for(&mut self, wait: Duration) -> bool {
        self.lines.recv_timeout(wait).is_err()
    }

    pub fn fresh_id(&mut self) -> i64 {
        self.next_id += 1;
        self.next_id
    }

    /// Sends a request and returns its response (the next line; requests here are sequential).
    pub fn request(&mut self, method: &str, params: Value) -> Value {
        let id = self.fresh_id();
        self.send(&json!({"id": id, "method": method, "params": params}));
        let response = self.recv();
        assert_eq!(response["id"], json!(id), "{response}");
        response
    }

    pub fn initialize(&mut self) -> Value {
        let r = self.request(
            "initialize",
            json!({"clientInfo": {"name": "rpc-test", "title": null, "version": "1.0"}, "capabilities": {}}),
        );
        assert!(r.get("error").is_none(), "{r}");
        self.send(&json!({"method": "initialized"}));
        r
    }

    /// `device/key/create` of a proof key that an OS-protected slot may hold; its result.
    pub fn create_os_protected(&mut self) -> Value {
        let r = self.request(
            "device/key/create",
            json!({"accountUserId": ACCOUNT, "clientId": CLIENT,
                   "protectionPolicy": "allow_os_protected_nonextractable"}),
        );
        result(&r).clone()
    }

    /// `device/key/sign` of `payload` with the key `info` (a create or public result) describes;
    /// the signature must verify ([`verify_sign_result`], scratch files in `dir`).
    pub fn sign_verified(&mut self, dir: &Path, info: &Value, payload: &Value) {
        let r = self.request(
            "device/key/sign",
            json!({"keyId": info["keyId"], "payload": payload}),
        );
        verify_sign_result(
            dir,
            info["publicKeySpkiDerBase64"].as_str().unwrap(),
            result(&r),
            &canonical_bytes(payload),
        );
    }

    /// Closes stdin and waits for the exit code.
    pub fn finish(mut self) -> i32 {
        drop(self.stdin.take());
        wait_timeout(&mut self.child, TIMEOUT)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> i32 {
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            panic!("server did not exit in time");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The result of a successful response.
pub fn result(response: &Value) -> &Value {
    assert!(
        response.get("error").is_none(),
        "expected a result: {response}"
    );
    &response["result"]
}

/// Asserts an error response with `code` and `message`.
pub fn assert_error(response: &Value, code: i64, message: &str) {
    assert!(
        response.get("result").is_none(),
        "expected an error: {response}"
    );
    assert_eq!(response["error"]["code"], json!(code), "{response}");
    assert_eq!(response["error"]["message"], json!(message), "{response}");
}

pub fn connection_payload() -> Value {
    json!({
        "type": "remoteControlClientConnection",
        "nonce": NONCE,
        "audience": "remote_control_client_websocket",
        "sessionId": "wssess_123",
        "targetOrigin": "https://chatgpt.com",
        "targetPath": "/api/codex/remote/control/client",
        "accountUserId": ACCOUNT,
        "clientId": CLIENT,
        "tokenExpiresAt": now() + 300,
        "tokenSha256Base64url": HASH,
        "scopes": ["remote_control_controller_websocket"],
    })
}

pub fn enrollment_payload() -> Value {
    json!({
        "type": "remoteControlClientEnrollment",
        "nonce": NONCE,
        "audience": "remote_control_client_enrollment",
        "challengeId": "rch_123",
        "targetOrigin": "https://chatgpt.com",
        "targetPath": "/wham/remote/control/client/enroll",
        "accountUserId": ACCOUNT,
        "clientId": CLIENT,
        "deviceIdentitySha256Base64url": HASH,
        "challengeExpiresAt": now() + 300,
    })
}

/// The canonical signing bytes of a wire payload, computed independently of the library: sort
/// keys recursively with a BTreeMap and print compactly.
pub fn canonical_bytes(payload: &Value) -> Vec<u8> {
    fn sorted(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let b: std::collections::BTreeMap<String, Value> =
                    m.iter().map(|(k, v)| (k.clone(), sorted(v))).collect();
                Value::Object(b.into_iter().collect())
            }
            Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    let wrapped = json!({"domain": "codex-device-key-sign-payload/v1", "payload": payload});
    serde_json::to_vec(&sorted(&wrapped)).unwrap()
}

/// Verifies a sign result with p256 against the SPKI, and once with `openssl dgst -verify`.
pub fn verify_sign_result(dir: &Path, spki_b64: &str, result: &Value, expected_bytes: &[u8]) {
    use p256::ecdsa::signature::Verifier;
    use p256::pkcs8::DecodePublicKey;
    assert_eq!(result["algorithm"], json!("ecdsa_p256_sha256"));
    let signed = STANDARD
        .decode(result["signedPayloadBase64"].as_str().unwrap())
        .unwrap();
    assert_eq!(
        signed,
        expected_bytes,
        "signed bytes:\n{}\nexpected:\n{}",
        String::from_utf8_lossy(&signed),
        String::from_utf8_lossy(expected_bytes)
    );
    let sig_der = STANDARD
        .decode(result["signatureDerBase64"].as_str().unwrap())
        .unwrap();
    let spki = STANDARD.decode(spki_b64).unwrap();
    let key = p256::ecdsa::VerifyingKey::from_public_key_der(&spki).unwrap();
    let sig = p256::ecdsa::Signature::from_der(&sig_der).unwrap();
    key.verify(&signed, &sig)
        .expect("p256 verifies the signature");

    let pub_der = dir.join("pub.der");
    let pub_pem = dir.join("pub.pem");
    let data = dir.join("signed.bin");
    let sig_file = dir.join("sig.der");
    std::fs::write(&pub_der, &spki).unwrap();
    std::fs::write(&data, &signed).unwrap();
    std::fs::write(&sig_file, &sig_der).unwrap();
    let out = Command::new("openssl")
        .args(["pkey", "-pubin", "-inform", "DER", "-in"])
        .arg(&pub_der)
        .arg("-out")
        .arg(&pub_pem)
        .output()
        .expect("openssl");
    assert!(out.status.success(), "openssl pkey: {out:?}");
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-verify"])
        .arg(&pub_pem)
        .arg("-signature")
        .arg(&sig_file)
        .arg(&data)
        .output()
        .expect("openssl");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Verified OK"),
        "openssl dgst -verify: {out:?}"
    );
}

/// Checks that openssl parses an SPKI and that it is a 91-byte P-256 key.
pub fn check_spki_with_openssl(dir: &Path, spki_b64: &str) {
    assert!(spki_b64.starts_with("MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE"));
    let spki = STANDARD.decode(spki_b64).unwrap();
    assert_eq!(spki.len(), 91);
    let path = dir.join("spki.der");
    std::fs::write(&path, spki).unwrap();
    let out = Command::new("openssl")
        .args(["pkey", "-pubin", "-inform", "DER", "-noout", "-text", "-in"])
        .arg(&path)
        .output()
        .expect("openssl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "openssl pkey: {out:?}");
    assert!(
        text.contains("prime256v1") || text.contains("P-256"),
        "{text}"
    );
}

/// create, public, sign (both payload types, non-ASCII), binding mismatch on one server.
/// `policy` is sent as `protectionPolicy` unless `None`. Returns the key id.
pub fn create_public_sign(
    env: &Env,
    server: &mut Server,
    policy: Option<&str>,
    expect_prefix: &str,
    class: &str,
) -> String {
    let mut params = json!({"accountUserId": ACCOUNT, "clientId": CLIENT});
    if let Some(policy) = policy {
        params["protectionPolicy"] = json!(policy);
    }
    let r = server.request("device/key/create", params);
    let info = result(&r).clone();
    let key_id = info["keyId"].as_str().unwrap().to_string();
    assert!(key_id.starts_with(expect_prefix), "{info}");
    assert_eq!(key_id.len(), 50);
    assert_eq!(info["algorithm"], json!("ecdsa_p256_sha256"));
    assert_eq!(info["protectionClass"], json!(class));
    let spki = info["publicKeySpkiDerBase64"].as_str().unwrap().to_string();
    check_spki_with_openssl(env.dir.path(), &spki);

    let r = server.request("device/key/public", json!({"keyId": key_id}));
    assert_eq!(result(&r), &info);

    for payload in [connection_payload(), enrollment_payload()] {
        let r = server.request(
            "device/key/sign",
            json!({"keyId": key_id, "payload": payload}),
        );
        verify_sign_result(
            env.dir.path(),
            &spki,
            result(&r),
            &canonical_bytes(&payload),
        );
    }
    // Non-ASCII content is signed unescaped and verifies.
    let mut payload = connection_payload();
    payload["sessionId"] = json!("sess-é/ü-\u{1F511}");
    let r = server.request(
        "device/key/sign",
        json!({"keyId": key_id, "payload": payload}),
    );
    let expected = canonical_bytes(&payload);
    assert!(String::from_utf8_lossy(&expected).contains("sess-é/ü-\u{1F511}"));
    verify_sign_result(env.dir.path(), &spki, result(&r), &expected);

    // Binding mismatch, either half.
    for (field, value) in [("accountUserId", "someone-else"), ("clientId", "cli_other")] {
        let mut payload = connection_payload();
        payload[field] = json!(value);
        let r = server.request(
            "device/key/sign",
            json!({"keyId": key_id, "payload": payload}),
        );
        assert_error(
            &r,
            -32600,
            "invalid device key payload: payload accountUserId/clientId does not match device key binding",
        );
    }
    key_id
}

/// One key, then `n` pipelined sign and public requests at once; every answer matches its id
/// and every signature verifies.
pub fn concurrent_signs(server: &mut Server, policy: &str, n: usize) {
    use p256::ecdsa::signature::Verifier;
    use p256::pkcs8::DecodePublicKey;
    let r = server.request(
        "device/key/create",
        json!({"accountUserId": ACCOUNT, "clientId": CLIENT, "protectionPolicy": policy}),
    );
    let info = result(&r).clone();
    let key_id = info["keyId"].as_str().unwrap().to_string();
    let spki = STANDARD
        .decode(info["publicKeySpkiDerBase64"].as_str().unwrap())
        .unwrap();
    let key = p256::ecdsa::VerifyingKey::from_public_key_der(&spki).unwrap();
    let mut batch = Vec::new();
    let mut expected = std::collections::HashMap::new();
    for i in 0..n {
        let id = format!("c-{i}");
        let message = if i % 5 == 4 {
            json!({"id": id, "method": "device/key/public", "params": {"keyId": key_id}})
        } else {
            let mut payload = connection_payload();
            payload["sessionId"] = json!(format!("session-{i}"));
            expected.insert(id.clone(), canonical_bytes(&payload));
            json!({"id": id, "method": "device/key/sign", "params": {"keyId": key_id, "payload": payload}})
        };
        batch.extend(serde_json::to_vec(&message).unwrap());
        batch.push(b'\n');
    }
    server.send_raw(&batch);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..n {
        let r = server.recv();
        let id = r["id"].as_str().unwrap().to_string();
        assert!(seen.insert(id.clone()), "repeated id {id}");
        let res = result(&r);
        match expected.get(&id) {
            Some(bytes) => {
                let signed = STANDARD
                    .decode(res["signedPayloadBase64"].as_str().unwrap())
                    .unwrap();
                assert_eq!(&signed, bytes, "{id}");
                let sig = p256::ecdsa::Signature::from_der(
                    &STANDARD
                        .decode(res["signatureDerBase64"].as_str().unwrap())
                        .unwrap(),
                )
                .unwrap();
                key.verify(&signed, &sig).unwrap();
            }
            None => assert_eq!(res, &info, "{id}"),
        }
    }
}
