//! The device's side of key attestation (ATTESTATION.md) through the real `devicekey serve` on a
//! swtpm slot whose TPM was manufactured with EK certificates (`swtpm_setup --create-ek-cert`):
//! the evidence is checked piece by piece (certifyInfo recomputed, the AK's signature verified,
//! the EK certificate compared with `tpm2_nvread`), credentials made by `tpm2_makecredential`
//! are activated, one made for another AK is refused while the TPM keeps working, and the debug
//! log shows one TPM2_Certify per request and the AK created once per store.
//!
//! Without swtpm, swtpm_setup or tpm2-tools the TPM test is skipped, unless
//! `DEVICEKEY_TEST_REQUIRE` contains `swtpm` (then it fails).

use testkit as common;

use std::path::Path;
use std::process::Command;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::ecdsa::{Signature, VerifyingKey};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use common::swtpm::{provision_with_ek_certificates, Swtpm};
use testkit::rpc::{assert_error, connection_payload, result, Env, ACCOUNT, CLIENT};

const NONCE_MESSAGE: &str = "Invalid request: nonce must be unpadded base64url of 16 to 64 bytes";

fn b64(v: &Value) -> Vec<u8> {
    STANDARD
        .decode(v.as_str().unwrap_or_else(|| panic!("not a string: {v}")))
        .unwrap()
}

fn nonce() -> (String, Vec<u8>) {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).unwrap();
    (URL_SAFE_NO_PAD.encode(bytes), bytes.to_vec())
}

fn name_of(public_area: &[u8]) -> Vec<u8> {
    let mut name = vec![0x00, 0x0b];
    name.extend_from_slice(&Sha256::digest(public_area));
    name
}

/// The P-256 point at the end of an ECC TPMT_PUBLIC (unique = x TPM2B, y TPM2B, 32 bytes each).
fn ecc_point(public_area: &[u8]) -> Vec<u8> {
    let tail = &public_area[public_area.len() - 68..];
    assert_eq!(&tail[..2], &[0, 32]);
    assert_eq!(&tail[34..36], &[0, 32]);
    let mut point = vec![4u8];
    point.extend_from_slice(&tail[2..34]);
    point.extend_from_slice(&tail[36..]);
    point
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.take(2).try_into().unwrap())
    }
    fn tpm2b(&mut self) -> &'a [u8] {
        let n = usize::from(self.u16());
        self.take(n)
    }
}

/// Checks `certifyInfo` as a verifier would (check 5 of ATTESTATION.md).
fn check_certify_info(certify_info: &[u8], nonce: &[u8], spki: &[u8], key_public_area: &[u8]) {
    let mut r = Reader(certify_info);
    assert_eq!(r.take(4), &[0xff, 0x54, 0x43, 0x47], "magic");
    assert_eq!(r.u16(), 0x8017, "type TPM_ST_ATTEST_CERTIFY");
    let _qualified_signer = r.tpm2b();
    let mut m = b"devicekey-tpm-attestation/v1\0".to_vec();
    m.extend_from_slice(nonce);
    m.extend_from_slice(spki);
    assert_eq!(r.tpm2b(), &Sha256::digest(&m)[..], "extraData");
    r.take(17); // clockInfo
    r.take(8); // firmwareVersion
    assert_eq!(
        r.tpm2b(),
        name_of(key_public_area).as_slice(),
        "attested name"
    );
    let _qualified_name = r.tpm2b();
    assert!(r.0.is_empty(), "trailing bytes in certifyInfo");
}

/// `tpm2_makecredential -T none` for the EK and an object name; returns (blob, secret) TPM2Bs.
fn make_credential(
    dir: &Path,
    ek_public_area: &[u8],
    name: &[u8],
    secret: &[u8],
) -> (Vec<u8>, Vec<u8>) {
    let mut ek_pub = (ek_public_area.len() as u16).to_be_bytes().to_vec();
    ek_pub.extend_from_slice(ek_public_area);
    std::fs::write(dir.join("ek.pub"), &ek_pub).unwrap();
    std::fs::write(dir.join("secret.bin"), secret).unwrap();
    let out = Command::new("tpm2_makecredential")
        .args(["-T", "none", "-u"])
        .arg(dir.join("ek.pub"))
        .arg("-s")
        .arg(dir.join("secret.bin"))
        .args(["-n", &hex::encode(name), "-o"])
        .arg(dir.join("cred.out"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cred = std::fs::read(dir.join("cred.out")).unwrap();
    let mut r = Reader(&cred[8..]);
    let blob_len = usize::from(r.u16());
    let blob = cred[8..8 + 2 + blob_len].to_vec();
    r.take(blob_len);
    let secret = r.0.to_vec();
    assert_eq!(
        usize::from(u16::from_be_bytes([secret[0], secret[1]])),
        secret.len() - 2
    );
    (blob, secret)
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// TPM2_Certify commands sent, less those retried because the TPM was out of object memory (a
/// TPM without a resource manager is shared with the module's own connection in the same
/// process; the store then empties it and tries once more).
fn certifies(log: &str) -> usize {
    count(log, "TPM2_Certify of") - count(log, "out of object memory (certifying the key")
}

/// TPM2_Create commands of an AK, less those retried the same way.
fn ak_creations(log: &str) -> usize {
    count(log, "TPM2_Create of the AK")
        - count(log, "out of object memory (creating the attestation key")
}

fn tpm_env(tpm: &Swtpm) -> Env {
    let mut env = Env::ours_software("");
    let keys = env.dir.path().join("tpm-keys");
    std::fs::write(
        env.config_path(),
        format!(
            "[[slot]]\nlabel = \"tpm\"\nbackend = \"tpm\"\ndir = \"{}\"\ntcti = \"{}\"\nallow_simulator = true\n\n[[slot]]\nlabel = \"soft\"\nbackend = \"software\"\ndir = \"{}\"\n\n[server]\n",
            keys.display(),
            tpm.tcti(),
            env.dir.path().join("soft-keys").display()
        ),
    )
    .unwrap();
    env.vars.push(("DEVICEKEY_LOG".into(), "debug".into()));
    env
}

#[test]
fn tpm_key_attestation_through_serve_and_cli() {
    if !testkit::swtpm::have_swtpm_and(&["swtpm_setup", "tpm2_makecredential", "tpm2_nvread"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("tpm-state");
    provision_with_ek_certificates(&state);
    let tpm = Swtpm::start(&state);
    let env = tpm_env(&tpm);

    let mut server = env.serve();
    let init = server.initialize();
    assert_eq!(
        result(&init)["extensions"],
        json!(["device/key/attest", "device/key/activateCredential"])
    );
    let r = server.request(
        "device/key/create",
        json!({"accountUserId": ACCOUNT, "clientId": CLIENT}),
    );
    let info = result(&r).clone();
    let key_id = info["keyId"].as_str().unwrap().to_string();
    assert!(key_id.starts_with("dk_tpm_"), "{info}");
    let spki = b64(&info["publicKeySpkiDerBase64"]);

    // Bad nonces.
    for bad in [
        URL_SAFE_NO_PAD.encode([1u8; 15]),
        format!("{}=", URL_SAFE_NO_PAD.encode([1u8; 16])),
        STANDARD.encode([0xffu8; 20]),
    ] {
        let r = server.request("device/key/attest", json!({"keyId": key_id, "nonce": bad}));
        assert_error(&r, -32600, NONCE_MESSAGE);
    }

    // The evidence.
    let (nonce_b64, nonce_bytes) = nonce();
    let r = server.request(
        "device/key/attest",
        json!({"keyId": key_id, "nonce": nonce_b64}),
    );
    let ev = result(&r).clone();
    eprintln!("evidence: {ev}");
    assert_eq!(ev["format"], json!("tpm"));
    assert_eq!(ev["version"], json!(1));
    assert_eq!(ev["publicKeySpkiDerBase64"], info["publicKeySpkiDerBase64"]);
    let key_public_area = b64(&ev["keyPublicArea"]);
    let certify_info = b64(&ev["certifyInfo"]);
    let ak_public_area = b64(&ev["akPublicArea"]);
    let ek_public_area = b64(&ev["ekPublicArea"]);
    check_certify_info(&certify_info, &nonce_bytes, &spki, &key_public_area);
    // The key's point is the SPKI's.
    assert_eq!(
        ecc_point(&key_public_area),
        spki[spki.len() - 65..].to_vec()
    );
    // The AK's signature over SHA-256(certifyInfo).
    let ak = VerifyingKey::from_sec1_bytes(&ecc_point(&ak_public_area)).unwrap();
    let sig = Signature::from_der(&b64(&ev["signatureDerBase64"])).unwrap();
    ak.verify_prehash(&Sha256::digest(&certify_info), &sig)
        .expect("the AK's signature verifies");
    // The EK certificate is exactly what the TPM holds at 0x01c00002.
    let nv = Command::new("tpm2_nvread")
        .args(["0x01c00002", "-o"])
        .arg(tmp.path().join("ek.der"))
        .env("TPM2TOOLS_TCTI", tpm.tcti())
        .output()
        .unwrap();
    assert!(
        nv.status.success(),
        "{}",
        String::from_utf8_lossy(&nv.stderr)
    );
    let certs = ev["ekCertificates"].as_array().unwrap();
    assert_eq!(
        b64(&certs[0]),
        std::fs::read(tmp.path().join("ek.der")).unwrap()
    );

    // Activation of a credential for this AK and EK.
    let ak_name = name_of(&ak_public_area);
    let secret = [0x5au8; 32];
    let (blob, enc) = make_credential(tmp.path(), &ek_public_area, &ak_name, &secret);
    let r = server.request(
        "device/key/activateCredential",
        json!({"keyId": key_id, "credentialBlobBase64": STANDARD.encode(&blob), "encryptedSecretBase64": STANDARD.encode(&enc)}),
    );
    assert_eq!(b64(&result(&r)["secretBase64"]), secret.to_vec());

    // A credential for another object's name: the TPM refuses, and keeps working.
    let (blob, enc) = make_credential(
        tmp.path(),
        &ek_public_area,
        &name_of(&key_public_area),
        &secret,
    );
    let r = server.request(
        "device/key/activateCredential",
        json!({"keyId": key_id, "credentialBlobBase64": STANDARD.encode(&blob), "encryptedSecretBase64": STANDARD.encode(&enc)}),
    );
    assert_eq!(r["error"]["code"], json!(-32603), "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("TPM2_ActivateCredential"),
        "{r}"
    );
    eprintln!("another AK: {}", r["error"]["message"]);
    let r = server.request(
        "device/key/sign",
        json!({"keyId": key_id, "payload": connection_payload()}),
    );
    assert!(result(&r)["signatureDerBase64"].is_string(), "{r}");

    // A credential for another EK (the RSA modulus changed): refused too (swtpm answers
    // TPM_RC_FAILURE), and the TPM is not given up for it: a good credential still activates.
    let mut other_ek = ek_public_area.clone();
    let at = other_ek.len() - 100;
    other_ek[at] ^= 0x55;
    let (blob, enc) = make_credential(tmp.path(), &other_ek, &ak_name, &secret);
    let r = server.request(
        "device/key/activateCredential",
        json!({"keyId": key_id, "credentialBlobBase64": STANDARD.encode(&blob), "encryptedSecretBase64": STANDARD.encode(&enc)}),
    );
    assert_eq!(r["error"]["code"], json!(-32603), "{r}");
    eprintln!("another EK: {}", r["error"]["message"]);
    let (blob, enc) = make_credential(tmp.path(), &ek_public_area, &ak_name, &secret);
    let r = server.request(
        "device/key/activateCredential",
        json!({"keyId": key_id, "credentialBlobBase64": STANDARD.encode(&blob), "encryptedSecretBase64": STANDARD.encode(&enc)}),
    );
    assert_eq!(b64(&result(&r)["secretBase64"]), secret.to_vec());
    let r = server.request(
        "device/key/sign",
        json!({"keyId": key_id, "payload": connection_payload()}),
    );
    assert!(result(&r)["signatureDerBase64"].is_string(), "{r}");

    // A second attest: one more TPM2_Certify, no new AK.
    let (nonce2, nonce2_bytes) = nonce();
    let r = server.request(
        "device/key/attest",
        json!({"keyId": key_id, "nonce": nonce2}),
    );
    let ev2 = result(&r).clone();
    check_certify_info(
        &b64(&ev2["certifyInfo"]),
        &nonce2_bytes,
        &spki,
        &key_public_area,
    );
    assert_eq!(ev2["akPublicArea"], ev["akPublicArea"]);
    assert_eq!(server.finish(), 0);
    let log = env.log();
    assert_eq!(certifies(&log), 2, "{log}");
    // A refused activation is not a lost connection.
    assert_eq!(count(&log, "stale (activating"), 0, "{log}");
    assert_eq!(ak_creations(&log), 1, "{log}");
    eprintln!(
        "first server: {} TPM2_Certify ({} retried), {} TPM2_Create of the AK, {} TPM2_CreatePrimary (EK), {} TPM2_CreatePrimary (SRK), {} TPM2_Sign",
        count(&log, "TPM2_Certify of"),
        count(&log, "out of object memory (certifying the key"),
        count(&log, "TPM2_Create of the AK"),
        count(&log, "TPM2_CreatePrimary (endorsement"),
        count(&log, "TPM2_CreatePrimary (owner"),
        count(&log, "TPM2_Sign with"),
    );

    // A new process on the same store reuses the AK.
    let mut server = env.serve();
    server.initialize();
    let (nonce3, _) = nonce();
    let r = server.request(
        "device/key/attest",
        json!({"keyId": key_id, "nonce": nonce3}),
    );
    assert_eq!(result(&r)["akPublicArea"], ev["akPublicArea"]);
    assert_eq!(server.finish(), 0);
    let log = env.log();
    assert_eq!(certifies(&log), 1, "{log}");
    assert_eq!(count(&log, "TPM2_Create of the AK"), 0, "{log}");

    // The CLI: the same evidence format, and the same activation exchange.
    let (nonce4, nonce4_bytes) = nonce();
    let (code, out, err) = env.cli(&["attest", "--key-id", &key_id, "--nonce", &nonce4], None);
    assert_eq!(code, 0, "{err}");
    let ev4: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(ev4["format"], json!("tpm"));
    check_certify_info(
        &b64(&ev4["certifyInfo"]),
        &nonce4_bytes,
        &spki,
        &key_public_area,
    );
    let (blob, enc) = make_credential(tmp.path(), &ek_public_area, &ak_name, &[7u8; 16]);
    let challenge = json!({"credentialBlobBase64": STANDARD.encode(&blob), "encryptedSecretBase64": STANDARD.encode(&enc)});
    let (code, out, err) = env.cli(
        &["attest", "activate", "--key-id", &key_id],
        Some(challenge.to_string().as_bytes()),
    );
    assert_eq!(code, 0, "{err}");
    let answer: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(b64(&answer["secretBase64"]), vec![7u8; 16]);

    // Without the persistent EK the store derives the same EK from the default template.
    let evict = Command::new("tpm2_evictcontrol")
        .args(["-C", "o", "-c", "0x81010001"])
        .env("TPM2TOOLS_TCTI", tpm.tcti())
        .output()
        .unwrap();
    assert!(
        evict.status.success(),
        "{}",
        String::from_utf8_lossy(&evict.stderr)
    );
    let (nonce5, nonce5_bytes) = nonce();
    let (code, out, err) = env.cli(&["attest", "--key-id", &key_id, "--nonce", &nonce5], None);
    assert_eq!(code, 0, "{err}");
    let ev5: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(ev5["ekPublicArea"], ev["ekPublicArea"]);
    assert_eq!(ev5["akPublicArea"], ev["akPublicArea"]);
    check_certify_info(
        &b64(&ev5["certifyInfo"]),
        &nonce5_bytes,
        &spki,
        &key_public_area,
    );
    assert!(
        err.contains("certificate at 0x1c00002, derived EK"),
        "{err}"
    );
    assert!(
        count(&err, "TPM2_CreatePrimary (endorsement hierarchy") >= 1,
        "{err}"
    );
    assert_eq!(count(&err, "TPM2_Create of the AK"), 0, "{err}");

    // PKCS#11: both halves of the TPM key carry their public area; a software key has none.
    check_public_area_attribute(&env, &key_id, &key_public_area);
}

/// Reads CKA_DEVICEKEY_TPM_PUBLIC_AREA through the built module (this process, the env's config).
fn check_public_area_attribute(env: &Env, key_id: &str, key_public_area: &[u8]) {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::{Attribute, AttributeInfo, AttributeType, ObjectClass};
    use devicekey_pkcs11::vendor::CKA_DEVICEKEY_TPM_PUBLIC_AREA;

    // Only this test loads the module in this process.
    std::env::set_var("DEVICEKEY_CONFIG", env.config_path());
    let ctx = Pkcs11::new(common::module_path()).unwrap();
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot_of = |label: &str| {
        ctx.get_slots_with_token()
            .unwrap()
            .into_iter()
            .find(|s| ctx.get_token_info(*s).unwrap().label() == label)
            .unwrap_or_else(|| panic!("no token {label}"))
    };
    let vendor = AttributeType::VendorDefined(CKA_DEVICEKEY_TPM_PUBLIC_AREA as _);
    let id = URL_SAFE_NO_PAD.decode(&key_id[7..]).unwrap();
    let session = ctx.open_ro_session(slot_of("tpm")).unwrap();
    for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
        let found = session
            .find_objects(&[Attribute::Class(class), Attribute::Id(id.clone())])
            .unwrap();
        assert_eq!(found.len(), 1, "{class:?}");
        let attrs = session.get_attributes(found[0], &[vendor]).unwrap();
        let [Attribute::VendorDefined((_, value))] = attrs.as_slice() else {
            panic!("{class:?}: no CKA_DEVICEKEY_TPM_PUBLIC_AREA: {attrs:?}");
        };
        assert_eq!(value.as_slice(), key_public_area, "{class:?}");
    }
    drop(session);
    let session = ctx.open_rw_session(slot_of("soft")).unwrap();
    let p256 = vec![0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    let (public, private) = session
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[Attribute::EcParams(p256), Attribute::Token(false)],
            &[Attribute::Token(false), Attribute::Sign(true)],
        )
        .unwrap();
    for key in [public, private] {
        let info = session.get_attribute_info(key, &[vendor]).unwrap();
        assert!(
            matches!(info.as_slice(), [AttributeInfo::TypeInvalid]),
            "{info:?}"
        );
    }
    drop(session);
    ctx.finalize().unwrap();
}

#[test]
fn software_keys_have_no_tpm_evidence() {
    let env = Env::ours_software("");
    let mut server = env.serve();
    server.initialize();
    let r = server.request(
        "device/key/create",
        json!({"accountUserId": ACCOUNT, "clientId": CLIENT, "protectionPolicy": "allow_os_protected_nonextractable"}),
    );
    let key_id = result(&r)["keyId"].as_str().unwrap().to_string();
    let (n, _) = nonce();
    let r = server.request("device/key/attest", json!({"keyId": key_id, "nonce": n}));
    assert_eq!(
        result(&r),
        &json!({"format": "none", "version": 1, "protectionClass": "os_protected_nonextractable"})
    );
    // Unknown keys get device/key/public's errors.
    let r = server.request("device/key/attest", json!({"keyId": "x", "nonce": n}));
    let p = server.request("device/key/public", json!({"keyId": "x"}));
    assert_eq!(r["error"], p["error"]);
    // No TPM, no attestation key to activate with.
    let r = server.request(
        "device/key/activateCredential",
        json!({"keyId": key_id, "credentialBlobBase64": "AAA=", "encryptedSecretBase64": "AAA="}),
    );
    assert_eq!(r["error"]["code"], json!(-32600), "{r}");
    assert_eq!(server.finish(), 0);
}
