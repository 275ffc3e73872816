//! Helpers for the pkcs11 key store tests (`tests/store_pkcs11*.rs`): one private SoftHSM config
//! per test process (SoftHSM reads SOFTHSM2_CONF once, at C_Initialize) and one throwaway,
//! uniquely labelled token per test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use p256::ecdsa::signature::hazmat::PrehashVerifier;

use crate::softhsm;
pub use crate::softhsm::{have_softhsm, PIN};

/// The variable holding [`PIN`].
pub const PIN_ENV: &str = "DEVICEKEY_TEST_HSM_PIN";

struct Fixture {
    dir: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = softhsm::process_dir("pkcs11-backend");
        let conf = softhsm::write_conf(&dir);
        // Set once, before anything in this process loads SoftHSM.
        std::env::set_var("SOFTHSM2_CONF", &conf);
        std::env::set_var(PIN_ENV, PIN);
        if Path::new(softhsm::module()).exists() {
            for tag in TAGS {
                softhsm::init_token(&conf, &token_label(tag));
            }
        }
        Fixture { dir }
    })
}

/// The tempdir of this process's SoftHSM.
pub fn dir() -> &'static Path {
    &fixture().dir
}

/// The tokens of a test process. SoftHSM sees only the tokens that exist when it is initialized,
/// so they are all made up front, one per tag (each test uses its own).
const TAGS: &[&str] = &[
    "keys", "threads", "purpose", "update", "session", "foreign", "objects", "present", "pin",
    "config", "fork", "reinit",
];

fn token_label(tag: &str) -> String {
    softhsm::token_label("dkb", tag)
}

/// The label of this test's own fresh token.
pub fn new_token(tag: &str) -> String {
    assert!(TAGS.contains(&tag), "add the tag {tag} to TAGS");
    fixture();
    token_label(tag)
}

/// The TOML of a pkcs11 slot over SoftHSM and `token`; `extra` is appended to the `[[slot]]`
/// table (TOML lines).
pub fn slot_toml(token: &str, extra: &str) -> String {
    format!(
        "[[slot]]\nlabel = \"hsm-{token}\"\nbackend = \"pkcs11\"\nmodule = \"{}\"\ntoken = \"{token}\"\n{extra}\n",
        softhsm::module()
    )
}

/// The usual slot's extra lines: PIN from the environment, declared hardware_tpm.
pub fn good_slot_extra() -> String {
    format!("pin_env = \"{PIN_ENV}\"\nprotection_class = \"hardware_tpm\"")
}

/// Checks a raw r‖s signature over a digest with a SEC1 point.
pub fn verifies(point: &[u8; 65], digest: &[u8; 32], sig: &[u8; 64]) -> bool {
    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(point).expect("valid point");
    let sig = p256::ecdsa::Signature::from_slice(sig).expect("valid signature");
    key.verify_prehash(digest, &sig).is_ok()
}

/// pkcs11-tool against SoftHSM and a token (logged in).
pub fn pkcs11_tool(token: &str, args: &[&str]) -> std::process::Output {
    Command::new("pkcs11-tool")
        .args([
            "--module",
            softhsm::module(),
            "--token-label",
            token,
            "--login",
            "--pin",
            PIN,
        ])
        .args(args)
        .output()
        .expect("pkcs11-tool runs")
}

/// The public point of the key with this CKA_ID, as SoftHSM reports it through pkcs11-tool.
pub fn softhsm_point(token: &str, id: &[u8]) -> [u8; 65] {
    use p256::pkcs8::DecodePublicKey;
    let out_path: PathBuf = dir().join(format!("pub-{}-{}.der", token, hex(id)));
    let out = pkcs11_tool(
        token,
        &[
            "--read-object",
            "--type",
            "pubkey",
            "--id",
            &hex(id),
            "-o",
            out_path.to_str().expect("utf-8 path"),
        ],
    );
    assert!(
        out.status.success(),
        "pkcs11-tool --read-object: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let der = std::fs::read(&out_path).expect("public key written");
    let key = p256::PublicKey::from_public_key_der(&der).expect("SPKI of a P-256 key");
    let point = p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&key, false);
    point.as_bytes().try_into().expect("65 bytes")
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
