//! The pkcs11 key store against throwaway SoftHSM tokens, driven directly through the `Backend`
//! trait: keys, signatures (also from several threads), objects, metadata, and the errors an
//! operator meets (missing module, wrong token label, wrong PIN, missing class).

use std::sync::Arc;

use devicekey_pkcs11::backend::pkcs11::{diagnose, Pkcs11Backend};
use devicekey_pkcs11::backend::{Backend, BackendError, KeyPurpose, NewKey, ProtectionClass};
use devicekey_pkcs11::config::{Config, Pkcs11Slot, SlotConfig};
use sha2::{Digest, Sha256};
use testkit::hsm_tokens::*;

const CKA_CLASS: u64 = 0x0;
const CKA_TOKEN: u64 = 0x1;
const CKA_LABEL: u64 = 0x3;
const CKA_APPLICATION: u64 = 0x10;
const CKA_VALUE: u64 = 0x11;
const CKA_CERTIFICATE_TYPE: u64 = 0x80;
const CKA_ISSUER: u64 = 0x81;
const CKA_SERIAL_NUMBER: u64 = 0x82;
const CKA_SUBJECT: u64 = 0x101;
const CKA_ID: u64 = 0x102;
const CKO_DATA: u64 = 0;
const CKO_CERTIFICATE: u64 = 1;
const CKC_X_509: u64 = 0;

/// A pkcs11 slot config over `token`; `extra` is appended to the `[[slot]]` table (TOML lines).
fn slot(token: &str, extra: &str) -> Pkcs11Slot {
    let mut c = Config::from_toml(&slot_toml(token, extra)).expect("test config parses");
    match c.slots.remove(0) {
        SlotConfig::Pkcs11(s) => s,
        other => panic!("not a pkcs11 slot: {other:?}"),
    }
}

/// The usual slot: PIN from the environment, declared hardware_tpm.
fn good_slot(token: &str) -> Pkcs11Slot {
    slot(token, &good_slot_extra())
}

fn ulong(v: u64) -> Vec<u8> {
    v.to_ne_bytes().to_vec()
}

fn digest(msg: &str) -> [u8; 32] {
    Sha256::digest(msg.as_bytes()).into()
}

fn new_key(id: &[u8], label: &str, purpose: KeyPurpose) -> NewKey {
    NewKey {
        id: id.to_vec(),
        label: label.into(),
        purpose,
        persistent: true,
    }
}

fn attr(attrs: &[(u64, Vec<u8>)], t: u64) -> Option<&[u8]> {
    attrs
        .iter()
        .find(|(at, _)| *at == t)
        .map(|(_, v)| v.as_slice())
}

#[test]
fn generate_list_and_sign() {
    if !have_softhsm() {
        return;
    }
    let token = new_token("keys");
    let backend = Pkcs11Backend::open(&good_slot(&token)).expect("open");
    let info = backend.info();
    assert_eq!(info.backend, "pkcs11");
    assert_eq!(info.label, format!("hsm-{token}"));
    assert_eq!(info.protection_class, ProtectionClass::HardwareTpm);
    assert!(
        info.manufacturer.contains("SoftHSM"),
        "{}",
        info.manufacturer
    );
    assert!(!info.serial.is_empty());
    assert!(backend.load_keys().expect("empty list").is_empty());

    let made = backend
        .generate_key(&new_key(&[0xa1, 0x01], "first", KeyPurpose::General))
        .expect("generate");
    assert_eq!(made.id, vec![0xa1, 0x01]);
    assert_eq!(made.label, "first");
    assert!(made.persistent);
    assert_eq!(made.public_point, softhsm_point(&token, &[0xa1, 0x01]));

    let keys = backend.load_keys().expect("list");
    assert_eq!(keys.len(), 1);
    let k = &keys[0];
    assert_eq!(k.name, made.name);
    assert_eq!(k.label, "first");
    assert_eq!(k.id, vec![0xa1, 0x01]);
    assert_eq!(k.public_point, made.public_point);
    assert_eq!(k.purpose, KeyPurpose::General);

    for (i, signer) in [&made.signer, &k.signer].into_iter().enumerate() {
        let d = digest(&format!("message {i}"));
        let sig = signer.sign_digest(&d).expect("sign");
        assert!(verifies(&k.public_point, &d, &sig));
    }

    // Our metadata object is not reported as one of the token's objects.
    assert!(backend.load_objects().expect("objects").is_empty());

    // The key was generated non-extractable and sensitive in the wrapped token.
    let out = pkcs11_tool(&token, &["--list-objects", "--type", "privkey"]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("Access:     sensitive, always sensitive, never extractable"),
        "{listing}"
    );
    assert!(listing.contains("label:      first"), "{listing}");
}

#[test]
fn four_threads_sign_at_once() {
    if !have_softhsm() {
        return;
    }
    let token = new_token("threads");
    let backend = Arc::new(Pkcs11Backend::open(&good_slot(&token)).expect("open"));
    let key = backend
        .generate_key(&new_key(b"t", "threads", KeyPurpose::General))
        .expect("generate");
    let barrier = Arc::new(std::sync::Barrier::new(4));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let signer = key.signer.clone();
            let barrier = barrier.clone();
            let point = key.public_point;
            std::thread::spawn(move || {
                barrier.wait();
                for i in 0..25 {
                    let d = digest(&format!("thread {t} message {i}"));
                    let sig = signer.sign_digest(&d).expect("sign");
                    assert!(verifies(&point, &d, &sig), "thread {t} signature {i}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("signing thread");
    }
}

#[test]
fn purpose_persists_across_reopen() {
    if !have_softhsm() {
        return;
    }
    let token = new_token("purpose");
    let config = good_slot(&token);
    let (proof_name, general_name) = {
        let backend = Pkcs11Backend::open(&config).expect("open");
        let p = backend
            .generate_key(&new_key(b"p", "proof key", KeyPurpose::Proof))
            .expect("generate proof");
        let g = backend
            .generate_key(&new_key(b"g", "general key", KeyPurpose::General))
            .expect("generate general");
        assert_eq!(p.purpose, KeyPurpose::Proof);
        (p.name, g.name)
    };
    let backend = Pkcs11Backend::open(&config).expect("reopen");
    let keys = backend.load_keys().expect("list");
    assert_eq!(keys.len(), 2);
    let by_name = |n: &str| keys.iter().find(|k| k.name == n).expect("key listed");
    assert_eq!(by_name(&proof_name).purpose, KeyPurpose::Proof);
    assert_eq!(by_name(&general_name).purpose, KeyPurpose::General);
}

#[test]
fn update_and_destroy_keys() {
    if !have_softhsm() {
        return;
    }
    let token = new_token("update");
    let backend = Pkcs11Backend::open(&good_slot(&token)).expect("open");
    let key = backend
        .generate_key(&new_key(b"old", "old label", KeyPurpose::Proof))
        .expect("generate");
    backend
        .update_key(&key.name, "new label", b"new-id")
        .expect("update");
    let keys = backend.load_keys().expect("list");
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].name, key.name, "the name survives a new CKA_ID");
    assert_eq!(keys[0].label, "new label");
    assert_eq!(keys[0].id, b"new-id".to_vec());
    assert_eq!(keys[0].purpose, KeyPurpose::Proof);
    assert_eq!(softhsm_point(&token, b"new-id"), key.public_point);
    // The signer made before the change still finds its key.
    let d = digest("after update");
    let sig = key.signer.sign_digest(&d).expect("sign after update");
    assert!(verifies(&key.public_point, &d, &sig));

    backend.destroy_key(&key.name).expect("destroy");
    assert!(backend.load_keys().expect("list").is_empty());
    assert!(matches!(
        key.signer.sign_digest(&d),
        Err(BackendError::NotFound(_))
    ));
    assert!(matches!(
        backend.destroy_key(&key.name),
        Err(BackendError::NotFound(_))
    ));
    // No metadata object is left behind.
    let out = pkcs11_tool(&token, &["--list-objects", "--type", "data"]);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("devicekey"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn session_keys_are_not_listed() {
    if !have_softhsm() {
        return;
    }
    let token = new_token("session");
    let backend = Pkcs11Backend::open(&good_slot(&token)).expect("open");
    let key = backend
        .generate_key(&NewKey {
            id: b"s".to_vec(),
            label: "session".into(),
            purpose: KeyPurpose::Proof,
            persistent: false,
        })
        .expect("generate");
    assert!(!key.persistent);
    assert_eq!(key.purpose, KeyPurpose::Proof);
    let d = digest("session");
    let sig = key.signer.sign_digest(&d).expect("sign");
    assert!(verifies(&key.public_point, &d, &sig));
    assert!(backend.load_keys().expect("list").is_empty());
    // Still usable after a listing.
    key.signer.sign_digest(&d).expect("sign again");
    backend.destroy_key(&key.name).expect("destroy");
}

#[test]
fn keys_made_by_other_tools() {
    if !have_softhsm() {
        return;
    }
    let token = new_token("foreign");
    for id in ["c1", "c2"] {
        let out = pkcs11_tool(
            &token,
            &[
                "--keypairgen",
                "--key-type",
                "EC:prime256v1",
                "--id",
                id,
                "--label",
                id,
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = pkcs11_tool(
        &token,
        &["--delete-object", "--type", "pubkey", "--id", "c2"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let backend = Pkcs11Backend::open(&good_slot(&token)).expect("open");
    let keys = backend.load_keys().expect("list");
    assert_eq!(keys.len(), 1, "the key without a public object is skipped");
    assert_eq!(keys[0].id, vec![0xc1]);
    assert_eq!(keys[0].purpose, KeyPurpose::General);
    assert_eq!(keys[0].public_point, softhsm_point(&token, &[0xc1]));
    let d = digest("foreign");
    let sig = keys[0].signer.sign_digest(&d).expect("sign");
    assert!(verifies(&keys[0].public_point, &d, &sig));
}

#[test]
fn objects_store_load_update_destroy() {
    if !have_softhsm() {
        return;
    }
    let token = new_token("objects");
    let backend = Pkcs11Backend::open(&good_slot(&token)).expect("open");
    let cert = vec![
        (CKA_CLASS, ulong(CKO_CERTIFICATE)),
        (CKA_TOKEN, vec![1]),
        (CKA_CERTIFICATE_TYPE, ulong(CKC_X_509)),
        (CKA_LABEL, b"my cert".to_vec()),
        (CKA_ID, vec![0xa1, 0x01]),
        (
            CKA_SUBJECT,
            b"0\x0f1\r0\x0b\x06\x03U\x04\x03\x0c\x04test".to_vec(),
        ),
        (
            CKA_ISSUER,
            b"0\x0f1\r0\x0b\x06\x03U\x04\x03\x0c\x04test".to_vec(),
        ),
        (CKA_SERIAL_NUMBER, vec![0x02, 0x01, 0x05]),
        (CKA_VALUE, vec![0x30, 0x03, 0x02, 0x01, 0x05]),
    ];
    let data = vec![
        (CKA_CLASS, ulong(CKO_DATA)),
        (CKA_TOKEN, vec![1]),
        (CKA_LABEL, b"my data".to_vec()),
        (CKA_APPLICATION, b"some app".to_vec()),
        (CKA_VALUE, b"hello".to_vec()),
    ];
    let cert_name = backend.store_object(&cert).expect("store cert");
    let data_name = backend.store_object(&data).expect("store data");
    assert_ne!(cert_name, data_name);

    let objects = backend.load_objects().expect("load");
    assert_eq!(objects.len(), 2);
    let c = objects
        .iter()
        .find(|o| o.name == cert_name)
        .expect("cert listed by its name");
    for (t, v) in &cert {
        assert_eq!(
            attr(&c.attributes, *t),
            Some(v.as_slice()),
            "cert attribute {t:#x}"
        );
    }
    let d = objects
        .iter()
        .find(|o| o.name == data_name)
        .expect("data listed by its name");
    for (t, v) in &data {
        assert_eq!(
            attr(&d.attributes, *t),
            Some(v.as_slice()),
            "data attribute {t:#x}"
        );
    }
    assert!(
        attr(&d.attributes, CKA_SUBJECT).is_none(),
        "only the attributes an object has"
    );

    // Visible to another application of the token too.
    let out = pkcs11_tool(&token, &["--list-objects", "--type", "cert"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("my cert"));

    backend
        .update_object(
            &cert_name,
            &[
                (CKA_CLASS, ulong(CKO_CERTIFICATE)),
                (CKA_LABEL, b"renamed".to_vec()),
            ],
        )
        .expect("update");
    let objects = backend.load_objects().expect("load");
    let c = objects
        .iter()
        .find(|o| attr(&o.attributes, CKA_CLASS) == Some(&ulong(CKO_CERTIFICATE)[..]))
        .expect("cert");
    assert_eq!(attr(&c.attributes, CKA_LABEL), Some(&b"renamed"[..]));

    backend
        .destroy_object(&cert_name)
        .expect("destroy cert (old name still known here)");
    backend.destroy_object(&data_name).expect("destroy data");
    assert!(backend.load_objects().expect("load").is_empty());
    assert!(matches!(
        backend.destroy_object(&data_name),
        Err(BackendError::NotFound(_))
    ));

    // Keys are generated, never imported; our metadata application is reserved.
    assert!(matches!(
        backend.store_object(&[(CKA_CLASS, ulong(3)), (CKA_TOKEN, vec![1])]),
        Err(BackendError::Refused(_))
    ));
    assert!(matches!(
        backend.store_object(&[
            (CKA_CLASS, ulong(CKO_DATA)),
            (CKA_APPLICATION, b"devicekey".to_vec())
        ]),
        Err(BackendError::Refused(_))
    ));
}

#[test]
fn wrong_token_label_is_not_found() {
    if !have_softhsm() {
        return;
    }
    new_token("present");
    let err = Pkcs11Backend::open(&good_slot("no-such-token")).unwrap_err();
    assert!(matches!(err, BackendError::NotFound(_)), "{err:?}");
    assert!(err.to_string().contains("no-such-token"), "{err}");
    let report = diagnose(&good_slot("no-such-token"));
    assert!(!report.reachable);
    assert!(report.fix.unwrap_or_default().contains("token"));
}

#[test]
fn missing_module_is_unusable() {
    let mut config = good_slot("whatever");
    config.module = Some("/nonexistent/libnothing.so".into());
    let err = Pkcs11Backend::open(&config).unwrap_err();
    assert!(matches!(err, BackendError::Unusable(_)), "{err:?}");
    assert!(
        err.to_string().contains("/nonexistent/libnothing.so"),
        "{err}"
    );
    let report = diagnose(&config);
    assert!(!report.reachable);
    assert_eq!(report.protection_class, Some(ProtectionClass::HardwareTpm));
    assert!(report.fix.is_some());

    // A file that is not a PKCS#11 module.
    config.module = Some("/etc/hostname".into());
    let err = Pkcs11Backend::open(&config).unwrap_err();
    assert!(matches!(err, BackendError::Unusable(_)), "{err:?}");
}

#[test]
fn wrong_pin_is_auth_and_not_retried() {
    if !have_softhsm() {
        return;
    }
    let token = new_token("pin");
    let pin_file = dir().join(format!("{token}.pin"));
    std::fs::write(&pin_file, "9999\n").expect("pin file");
    let config = slot(
        &token,
        &format!(
            "pin_file = \"{}\"\nprotection_class = \"hardware_tpm\"",
            pin_file.display()
        ),
    );
    for attempt in 0..5 {
        let err = Pkcs11Backend::open(&config).unwrap_err();
        assert!(matches!(err, BackendError::Auth(_)), "{err:?}");
        let expected = if attempt == 0 {
            "rejected the PIN"
        } else {
            "rejected by token"
        };
        assert!(
            err.to_string().contains(expected),
            "attempt {attempt}: {err}"
        );
        assert!(
            !err.to_string().contains("9999"),
            "the PIN is never in a message"
        );
    }
    // The same wrong PIN was presented once only: SoftHSM would have locked after a few.
    std::fs::write(&pin_file, format!("{PIN}\n")).expect("pin file");
    let backend = Pkcs11Backend::open(&config).expect("the corrected PIN works");
    assert!(backend.load_keys().expect("list").is_empty());
}

#[test]
fn config_errors() {
    if !have_softhsm() {
        return;
    }
    let token = new_token("config");
    let no_class = slot(&token, &format!("pin_env = \"{PIN_ENV}\""));
    let err = Pkcs11Backend::open(&no_class).unwrap_err();
    assert!(matches!(err, BackendError::Unusable(_)), "{err:?}");
    assert!(err.to_string().contains("protection_class"), "{err}");

    let bad_class = slot(
        &token,
        &format!("pin_env = \"{PIN_ENV}\"\nprotection_class = \"hardware\""),
    );
    assert!(matches!(
        Pkcs11Backend::open(&bad_class),
        Err(BackendError::Unusable(_))
    ));

    let unset_env = slot(&token, "pin_env = \"DEVICEKEY_TEST_UNSET_VARIABLE\"\nprotection_class = \"os_protected_nonextractable\"");
    assert!(matches!(
        Pkcs11Backend::open(&unset_env),
        Err(BackendError::Auth(_))
    ));

    let no_pin = slot(&token, "protection_class = \"hardware_tpm\"");
    assert!(matches!(
        Pkcs11Backend::open(&no_pin),
        Err(BackendError::Auth(_))
    ));

    let declared_se = slot(
        &token,
        &format!("pin_env = \"{PIN_ENV}\"\nprotection_class = \"hardware_secure_enclave\""),
    );
    let backend = Pkcs11Backend::open(&declared_se).expect("open");
    assert_eq!(
        backend.info().protection_class,
        ProtectionClass::HardwareSecureEnclave
    );

    let report = diagnose(&good_slot(&token));
    assert!(report.reachable, "{report:?}");
    assert!(report.fix.is_none());
}
