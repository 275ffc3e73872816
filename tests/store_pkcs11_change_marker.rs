//! A pkcs11 slot (over SoftHSM) sees keys that another process of ours adds while this one runs:
//! the other process counts its change in the token's lock file, and this process's next
//! C_FindObjectsInit notices the new count and reloads the wrapped store, without a
//! re-initialization.
//!
//! Skipped (with a message) when SoftHSM is not installed; fails instead when
//! `DEVICEKEY_TEST_REQUIRE` names softhsm.

use testkit as common;

use std::path::PathBuf;
use std::sync::OnceLock;

use common::softhsm::{self, have_softhsm, PIN};
use common::*;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

/// The variable the slot reads its PIN from.
const PIN_ENV: &str = "DEVICEKEY_MARKER_HSM_PIN";
/// Set in the child process: the label of the key it creates.
const CHILD_ENV: &str = "DEVICEKEY_MARKER_CHILD_KEY";

/// Makes this process's SoftHSM token (once) and points SoftHSM at it; returns its label.
fn softhsm_token() -> &'static str {
    static TOKEN: OnceLock<(PathBuf, String)> = OnceLock::new();
    let (_, label) = TOKEN.get_or_init(|| {
        let dir = softhsm::process_dir("pkcs11-change-marker");
        let conf = softhsm::write_conf(&dir);
        std::env::set_var("SOFTHSM2_CONF", &conf);
        std::env::set_var(PIN_ENV, PIN);
        let label = softhsm::token_label("dkcm", "marker");
        softhsm::init_token(&conf, &label);
        (conf, label)
    });
    label
}

/// The private keys the slot lists, by label.
fn private_keys(s: &Session) -> Vec<(String, ObjectHandle)> {
    let found = s
        .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
        .expect("C_FindObjects");
    found.into_iter().map(|h| (label_of(s, h), h)).collect()
}

/// Child side of the test below (runs only when spawned by it): creates one key and exits.
#[test]
#[ignore = "child process of a_key_added_by_another_process_is_found_without_reinitializing"]
fn marker_child_create_key() {
    let Ok(label) = std::env::var(CHILD_ENV) else {
        return;
    };
    let t = Token::from_env_config();
    let s = t.session();
    gen_p256(&s, &label, true);
}

#[test]
fn a_key_added_by_another_process_is_found_without_reinitializing() {
    if !have_softhsm() {
        return;
    }
    let mut t = Token::uninitialized();
    let token = softhsm_token();
    let config = t.root().join("hsm.toml");
    std::fs::write(
        &config,
        format!(
            "[[slot]]\nlabel = \"{TOKEN_LABEL}\"\nbackend = \"pkcs11\"\nmodule = \"{}\"\n\
             token = \"{token}\"\npin_env = \"{PIN_ENV}\"\nprotection_class = \"hardware_tpm\"\n",
            softhsm::module()
        ),
    )
    .expect("write config");
    use_config(&config);
    t.config = config;
    t.initialize();

    // Process A: one key of its own, listed.
    let s = t.session();
    gen_p256(&s, "from-a", true);
    let before = private_keys(&s);
    assert_eq!(
        before.iter().map(|(l, _)| l.as_str()).collect::<Vec<_>>(),
        ["from-a"]
    );

    // Process B: adds a key through the module, then exits.
    let child = spawn_self(
        "marker_child_create_key",
        &[
            (CHILD_ENV, "from-b".to_string()),
            ("DEVICEKEY_CONFIG", t.config.display().to_string()),
        ],
    );
    let out = child.wait_with_output().expect("wait for the child");
    assert!(
        out.status.success(),
        "the child failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Process A, same C_Initialize and session: the next search finds B's key too.
    let after = private_keys(&s);
    let mut labels: Vec<_> = after.iter().map(|(l, _)| l.as_str()).collect();
    labels.sort();
    assert_eq!(
        labels,
        ["from-a", "from-b"],
        "C_FindObjects after another process added a key"
    );
    let (_, private) = after.iter().find(|(l, _)| l == "from-b").expect("B's key");
    let point = public_point(&s, public_for(&s, *private));
    let digest = sha256(b"signed by process A with a key made by process B");
    let sig = s
        .sign(&Mechanism::Ecdsa, *private, &digest)
        .expect("C_Sign with B's key");
    assert!(
        verify_prehash(&point, &digest, &sig),
        "B's key signs, and the signature verifies with its public point"
    );
}
