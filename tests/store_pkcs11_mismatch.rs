//! A mismatched key pair in a wrapped token is refused. In a SoftHSM token made for this test,
//! pkcs11-tool generates three P-256 pairs (A, B, C), then moves CKA_IDs so that A's private key
//! shares its CKA_ID with B's public key (A's public key and B's private key get ids of their own,
//! so each has no partner). Through our module, over a `backend = "pkcs11"` slot wrapping that
//! token, the A/B pairing is either not served at all or every signature with it fails
//! (CKR_FUNCTION_FAILED: the first signature per key handle is checked against the paired public
//! key); no signature that fails verification with the public key our token shows is ever
//! returned. Pair C, untouched, signs and verifies, so the slot itself works.
//!
//! Skipped (with a message) when SoftHSM or pkcs11-tool is not installed.

use testkit as common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::softhsm::{self, have_softhsm, PIN};
use common::*;
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

/// The variable the pkcs11 slot reads the wrapped token's PIN from.
const PIN_ENV: &str = "DEVICEKEY_MISMATCH_PIN";
/// Our token label of the pkcs11 slot.
const HSM_LABEL: &str = "devicekey-hsm";
/// Signatures tried per mechanism on the mismatched pairing (the check must not be one-shot).
const ATTEMPTS: usize = 3;

fn have_pkcs11_tool() -> bool {
    let ok = Command::new("pkcs11-tool").arg("--help").output().is_ok();
    if !ok {
        eprintln!("pkcs11-tool not installed (opensc): test skipped");
    }
    ok
}

/// Runs pkcs11-tool, logged in, on the test token; panics with its output on failure.
fn pkcs11_tool(conf: &Path, token: &str, args: &[&str]) {
    let out = Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", conf)
        .args(["--module", softhsm::module(), "--token-label", token])
        .args(["--login", "--pin", PIN])
        .args(args)
        .output()
        .expect("pkcs11-tool runs");
    assert!(
        out.status.success(),
        "pkcs11-tool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The token made for this process (pairs A, B, C, then the CKA_ID moves): its SoftHSM config,
/// its label, the points of A, B and C, and where our module logs.
struct Fixture {
    conf: PathBuf,
    token: String,
    point_a: Vec<u8>,
    point_b: Vec<u8>,
    point_c: Vec<u8>,
    log: PathBuf,
}

fn fixture() -> Fixture {
    let dir = softhsm::process_dir("pkcs11-backend-mismatch");
    let conf = softhsm::write_conf(&dir);
    let token = softhsm::token_label("dkmm", "pairs");
    softhsm::init_token(&conf, &token);
    for k in ["a", "b", "c"] {
        pkcs11_tool(
            &conf,
            &token,
            &[
                "--keypairgen",
                "--key-type",
                "EC:prime256v1",
                "--id",
                &format!("{k}1"),
                "--label",
                &format!("pair-{k}"),
            ],
        );
    }
    // A's public key leaves id a1; B's private key leaves id b1; B's public key takes a1.
    pkcs11_tool(
        &conf,
        &token,
        &["--set-id", "a0", "--type", "pubkey", "--id", "a1"],
    );
    pkcs11_tool(
        &conf,
        &token,
        &["--set-id", "b2", "--type", "privkey", "--id", "b1"],
    );
    pkcs11_tool(
        &conf,
        &token,
        &["--set-id", "a1", "--type", "pubkey", "--id", "b1"],
    );
    let point_a = read_point(&conf, &token, &dir, "a0");
    let point_b = read_point(&conf, &token, &dir, "a1");
    let point_c = read_point(&conf, &token, &dir, "c1");
    assert_ne!(point_a, point_b);
    Fixture {
        log: dir.join("module.log"),
        conf,
        token,
        point_a,
        point_b,
        point_c,
    }
}

/// The point of the public key with CKA_ID `id_hex`, exported by pkcs11-tool.
fn read_point(conf: &Path, token: &str, dir: &Path, id_hex: &str) -> Vec<u8> {
    let file = dir.join(format!("pub-{id_hex}.der"));
    let file_arg = file.display().to_string();
    pkcs11_tool(
        conf,
        token,
        &[
            "--read-object",
            "--type",
            "pubkey",
            "--id",
            id_hex,
            "-o",
            &file_arg,
        ],
    );
    let spki = std::fs::read(&file).expect("exported public key");
    // P-256 SubjectPublicKeyInfo: a fixed 26-byte header, then the 65-byte point.
    assert_eq!(spki.len(), 91, "SPKI of a P-256 key: {spki:02x?}");
    assert_eq!(spki[26], 0x04, "uncompressed point: {spki:02x?}");
    spki[26..].to_vec()
}

/// Every private key our slot serves, with the point of its public key (same CKA_ID in our
/// token).
fn served_keys(s: &Session) -> Vec<(ObjectHandle, Vec<u8>)> {
    s.find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
        .expect("C_FindObjects")
        .into_iter()
        .map(|private| (private, public_point(s, public_for(s, private))))
        .collect()
}

/// Signs `msg` with CKM_ECDSA (over its SHA-256) and CKM_ECDSA_SHA256; every signature returned
/// must verify with `point`. Returns the errors.
fn sign_and_check(s: &Session, private: ObjectHandle, point: &[u8], msg: &[u8]) -> Vec<Error> {
    let digest = sha256(msg);
    let mut errors = Vec::new();
    for (mechanism, input) in [
        (Mechanism::Ecdsa, digest.to_vec()),
        (Mechanism::EcdsaSha256, msg.to_vec()),
    ] {
        match s.sign(&mechanism, private, &input) {
            Ok(sig) => assert!(
                verify_prehash(point, &digest, &sig),
                "{mechanism:?}: our module returned a signature that does not verify with the public key it shows for the key"
            ),
            Err(e) => errors.push(e),
        }
    }
    errors
}

#[test]
fn a_private_key_paired_with_another_keys_public_key_never_signs() {
    if !have_softhsm() || !have_pkcs11_tool() {
        return;
    }
    let f = fixture();
    let mut t = Token::uninitialized();
    let config = t.root().join("mismatch.toml");
    std::fs::write(
        &config,
        format!(
            r#"[[slot]]
label = "{HSM_LABEL}"
backend = "pkcs11"
module = "{softhsm_module}"
token = "{}"
pin_env = "{PIN_ENV}"
protection_class = "hardware_tpm"
"#,
            f.token,
            softhsm_module = softhsm::module()
        ),
    )
    .expect("write config");
    use_config(&config);
    std::env::set_var("SOFTHSM2_CONF", &f.conf);
    std::env::set_var(PIN_ENV, PIN);
    std::env::set_var("DEVICEKEY_LOG", "warn");
    std::env::set_var("DEVICEKEY_LOG_FILE", &f.log);
    t.config = config;
    t.initialize();
    let log = || std::fs::read_to_string(&f.log).unwrap_or_default();

    let s = t.session();
    let keys = served_keys(&s);
    let points: Vec<&Vec<u8>> = keys.iter().map(|(_, p)| p).collect();

    // The control: pair C is served and signs.
    let (control, _) = keys
        .iter()
        .find(|(_, p)| *p == f.point_c)
        .unwrap_or_else(|| {
            panic!(
                "pair C is not served; served points {points:02x?}; log:\n{}",
                log()
            )
        });
    let errors = sign_and_check(&s, *control, &f.point_c, b"pair C signs");
    assert!(errors.is_empty(), "pair C: {errors:?}; log:\n{}", log());

    // Neither half-pair (A's public key, B's private key) is served as a key on its own.
    assert!(
        !points.contains(&&f.point_a),
        "A's public key has no private key with its CKA_ID, yet a key with its point is served"
    );

    // The mismatched pairing (A's private key under B's public key): skipped, or refused.
    match keys.iter().find(|(_, p)| *p == f.point_b) {
        None => eprintln!("the mismatched pair is not served (skipped at load)"),
        Some((mismatched, _)) => {
            for attempt in 0..ATTEMPTS {
                let msg = format!("mismatched pair, attempt {attempt}");
                let errors = sign_and_check(&s, *mismatched, &f.point_b, msg.as_bytes());
                assert_eq!(
                    errors.len(),
                    2,
                    "attempt {attempt}: both mechanisms must fail; log:\n{}",
                    log()
                );
                for e in errors {
                    assert!(
                        matches!(e, Error::Pkcs11(RvError::FunctionFailed, _)),
                        "attempt {attempt}: expected CKR_FUNCTION_FAILED, got {e}"
                    );
                }
            }
            // Signing with the good key still works after the refusals.
            let errors = sign_and_check(&s, *control, &f.point_c, b"pair C again");
            assert!(errors.is_empty(), "pair C after the refusals: {errors:?}");
            eprintln!(
                "the mismatched pair is served and refused: {ATTEMPTS} x 2 signatures, each CKR_FUNCTION_FAILED"
            );
            assert!(
                log().contains("mismatched"),
                "the refusal is logged; log:\n{}",
                log()
            );
        }
    }
}
