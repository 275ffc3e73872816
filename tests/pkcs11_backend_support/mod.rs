//! Helpers for the pkcs11 backend tests: one private SoftHSM config per test process (SoftHSM
//! reads SOFTHSM2_CONF once, at C_Initialize) and one throwaway, uniquely labelled token per test.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use devicekey_pkcs11::config::{Config, SlotConfig};
use p256::ecdsa::signature::hazmat::PrehashVerifier;

/// SoftHSM's module.
pub const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// The user PIN of every test token.
pub const PIN: &str = "1234";
/// The SO PIN of every test token.
pub const SO_PIN: &str = "5678";
/// The variable holding [`PIN`].
pub const PIN_ENV: &str = "DEVICEKEY_TEST_HSM_PIN";

struct Fixture {
    dir: PathBuf,
}

/// This process's directory under cargo's tmp dir. Statics are never dropped, so directories of
/// finished runs are removed here (those whose process is gone).
fn process_dir() -> PathBuf {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pkcs11-backend");
    std::fs::create_dir_all(&base).expect("tmp dir");
    if let Ok(entries) = std::fs::read_dir(&base) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let alive = name
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
            if !alive {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = base.join(std::process::id().to_string());
    std::fs::create_dir_all(&dir).expect("process dir");
    dir
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = process_dir();
        let tokens = dir.join("tokens");
        std::fs::create_dir(&tokens).expect("token dir");
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                tokens.display()
            ),
        )
        .expect("softhsm2.conf");
        // Set once, before anything in this process loads SoftHSM.
        std::env::set_var("SOFTHSM2_CONF", &conf);
        std::env::set_var(PIN_ENV, PIN);
        if Path::new(SOFTHSM).exists() {
            for tag in TAGS {
                init_token(tag);
            }
        }
        Fixture { dir }
    })
}

/// True when SoftHSM and its tool are installed (else the caller skips, saying so).
pub fn have_softhsm() -> bool {
    let ok = Path::new(SOFTHSM).exists()
        && Command::new("softhsm2-util")
            .arg("--version")
            .output()
            .is_ok();
    if !ok {
        eprintln!("SoftHSM not installed ({SOFTHSM}, softhsm2-util): test skipped");
    }
    ok
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

fn init_token(tag: &str) -> String {
    let mut label = format!("dkb{}-{tag}", std::process::id());
    label.truncate(32);
    let out = Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            &label,
            "--pin",
            PIN,
            "--so-pin",
            SO_PIN,
        ])
        .output()
        .expect("softhsm2-util runs");
    assert!(
        out.status.success(),
        "softhsm2-util --init-token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    label
}

/// The label of this test's own fresh token.
pub fn new_token(tag: &str) -> String {
    assert!(TAGS.contains(&tag), "add the tag {tag} to TAGS");
    fixture();
    let mut label = format!("dkb{}-{tag}", std::process::id());
    label.truncate(32);
    label
}

/// A pkcs11 slot config; `extra` is appended to the `[[slot]]` table (TOML lines).
pub fn slot(token: &str, extra: &str) -> SlotConfig {
    let text = format!(
        "[[slot]]\nlabel = \"hsm-{token}\"\nbackend = \"pkcs11\"\nmodule = \"{SOFTHSM}\"\ntoken = \"{token}\"\n{extra}\n"
    );
    let mut c = Config::from_toml(&text).expect("test config parses");
    c.slots.remove(0)
}

/// The usual slot: PIN from the environment, declared hardware_tpm.
pub fn good_slot(token: &str) -> SlotConfig {
    slot(
        token,
        &format!("pin_env = \"{PIN_ENV}\"\nprotection_class = \"hardware_tpm\""),
    )
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
            SOFTHSM,
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
