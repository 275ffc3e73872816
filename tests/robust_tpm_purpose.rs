//! A TPM key's purpose is read from the TPM object, not from its JSON sidecar: on a swtpm, a
//! proof-only key whose sidecar is edited from "proof" to "general" is refused after a reload:
//! it signs nothing, not even a proof payload (the store index still lists it, as proof-only:
//! the index keeps the purpose the TPM object is bound to, and the sidecar is checked again at
//! the key's first signature); once the index is rebuilt from the files it is not listed at all.
//! The general key beside it still signs, and the key comes back, still proof-only and signing
//! proof payloads, when the sidecar is restored.
#![cfg(all(feature = "tpm", target_os = "linux"))]

use testkit as common;

use std::path::{Path, PathBuf};

use common::swtpm::Swtpm;
use common::{
    public_point, sha256, vendor_ulong, verify_prehash, Token, CKA_DEVICEKEY_PURPOSE, PURPOSE_PROOF,
};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

const TPM_LABEL: &str = "devicekey-tpm";

fn write_tpm_config(config: &Path, tcti: &str, keys: &Path) {
    std::fs::write(
        config,
        format!(
            "[[slot]]\nlabel = \"{TPM_LABEL}\"\nbackend = \"tpm\"\ntcti = \"{tcti}\"\ndir = \"{}\"\nallow_simulator = true\n",
            keys.display()
        ),
    )
    .expect("write the TPM config");
}

fn keygen(s: &Session, label: &str, purpose: Option<u64>) -> (ObjectHandle, ObjectHandle) {
    let mut private = common::priv_template(label, true);
    if let Some(p) = purpose {
        private.push(Attribute::VendorDefined((
            AttributeType::VendorDefined(CKA_DEVICEKEY_PURPOSE),
            p.to_ne_bytes().to_vec(),
        )));
    }
    s.generate_key_pair(
        &Mechanism::EccKeyPairGen,
        &common::pub_template(label, true),
        &private,
    )
    .unwrap_or_else(|e| panic!("C_GenerateKeyPair({label}): {e}"))
}

fn private_keys(s: &Session, label: &str) -> Vec<ObjectHandle> {
    s.find_objects(&[
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::Label(label.as_bytes().to_vec()),
    ])
    .expect("C_FindObjects")
}

/// The sidecar of the only key whose sidecar says `purpose`.
fn sidecar_with(keys: &Path, purpose: &str) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(keys)
        .expect("read the key directory")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .filter(|p| {
            let v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap_or_default();
            v["purpose"] == purpose
        })
        .collect();
    assert_eq!(found.len(), 1, "one sidecar with purpose {purpose}");
    found[0].clone()
}

fn set_purpose(sidecar: &Path, purpose: &str) {
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sidecar).unwrap()).unwrap();
    v["purpose"] = serde_json::Value::from(purpose);
    // Rewriting in place keeps the file's owner and 0600 mode.
    std::fs::write(sidecar, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

#[test]
fn an_edited_sidecar_does_not_make_a_proof_key_general() {
    if !common::swtpm::have_swtpm() {
        println!(
            "SKIPPED an_edited_sidecar_does_not_make_a_proof_key_general: swtpm is not installed"
        );
        return;
    }
    let mut token = Token::uninitialized();
    std::env::remove_var("DEVICEKEY_TPM_TCTI");
    let mut swtpm = Swtpm::start(&token.root().join("swtpm"));
    let keys = token.root().join("tpmkeys");
    write_tpm_config(&token.config, &swtpm.tcti(), &keys);
    token.initialize();

    let s = token.session();
    let (_, proof) = keygen(&s, "proof", Some(PURPOSE_PROOF));
    let (general_pub, _) = keygen(&s, "general", None);
    let general_point = public_point(&s, general_pub);
    assert_eq!(
        vendor_ulong(&s, proof, CKA_DEVICEKEY_PURPOSE),
        Some(PURPOSE_PROOF)
    );
    let digest = sha256(b"an arbitrary message");
    assert!(
        s.sign(&Mechanism::Ecdsa, proof, &digest).is_err(),
        "a proof-only key signs an arbitrary digest"
    );
    let payload = common::rpc::canonical_bytes(&common::rpc::connection_payload());
    s.sign(&Mechanism::EcdsaSha256, proof, &payload)
        .expect("the proof key signs a proof payload");
    drop(s);

    // The attack: the sidecar now says "general".
    let sidecar = sidecar_with(&keys, "proof");
    set_purpose(&sidecar, "general");
    token.reinitialize();
    let s = token.session();
    // Listed from the index: still proof-only, and its first signature reads the sidecar and
    // refuses the key.
    for h in private_keys(&s, "proof") {
        assert_eq!(
            vendor_ulong(&s, h, CKA_DEVICEKEY_PURPOSE),
            Some(PURPOSE_PROOF)
        );
        assert!(s.sign(&Mechanism::Ecdsa, h, &digest).is_err());
        assert!(
            s.sign(&Mechanism::EcdsaSha256, h, &payload).is_err(),
            "a key whose sidecar disagrees with its TPM object signs nothing"
        );
    }
    drop(s);
    // Rebuilt from the files, the index does not list it at all.
    std::fs::remove_file(keys.join("store.index")).expect("remove the store index");
    token.reinitialize();
    let s = token.session();
    assert!(
        private_keys(&s, "proof").is_empty(),
        "the key whose sidecar disagrees with its TPM object must be refused"
    );
    let everything = s
        .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
        .expect("C_FindObjects");
    for h in everything {
        let sig = s.sign(&Mechanism::Ecdsa, h, &digest);
        let label = common::label_of(&s, h);
        assert_eq!(label, "general", "only the general key is left");
        let point = public_point(&s, common::public_for(&s, h));
        assert!(verify_prehash(&point, &digest, &sig.expect("C_Sign")));
    }
    drop(s);

    // Restored, the key is back, still proof-only.
    set_purpose(&sidecar, "proof");
    token.reinitialize();
    let s = token.session();
    let back = private_keys(&s, "proof");
    assert_eq!(back.len(), 1);
    assert_eq!(
        vendor_ulong(&s, back[0], CKA_DEVICEKEY_PURPOSE),
        Some(PURPOSE_PROOF)
    );
    assert!(s.sign(&Mechanism::Ecdsa, back[0], &digest).is_err());
    s.sign(&Mechanism::EcdsaSha256, back[0], &payload)
        .expect("the restored proof key signs a proof payload");
    let general = private_keys(&s, "general");
    assert_eq!(general.len(), 1);
    assert_eq!(
        public_point(&s, common::public_for(&s, general[0])),
        general_point
    );
    drop(s);
    let _ = token.ctx.clone().finalize();
    swtpm.stop();
}
