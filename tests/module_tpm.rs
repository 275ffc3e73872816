//! The TPM slot end to end: the built module through `cryptoki`, a `[[slot]] backend = "tpm"`
//! on a swtpm each test starts (and kills by pid, also on panic). Covers key generation; the key
//! surviving a module reload (C_Finalize / C_Initialize) and a swtpm restart on the same state;
//! CKM_ECDSA and CKM_ECDSA_SHA256 signatures checked by p256 and by `openssl dgst -verify`; length
//! queries and CKR_BUFFER_TOO_SMALL sending no TPM2_Sign (counted in the module's debug log);
//! four threads signing at once; and the honest class (token model `hardware_tpm` only with
//! `allow_simulator = true`, else `os_protected`, with CKA_DEVICEKEY_PROTECTION_CLASS to match).
#![cfg(all(feature = "tpm", target_os = "linux"))]

#[macro_use]
extern crate testkit as common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier, OnceLock};

use base64::Engine as _;
use common::swtpm::Swtpm;
use common::{
    gen_p256, label_of, public_for, public_point, sha256, sign_init, sign_raw, vendor_ulong,
    verify_prehash, Token, CKA_DEVICEKEY_PROTECTION_CLASS, CLASS_OS_PROTECTED,
};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki_sys::*;

/// The label of the TPM slot in every config here.
const TPM_LABEL: &str = "devicekey-tpm";
/// CKA_DEVICEKEY_PROTECTION_CLASS of a TPM key.
const CLASS_HARDWARE_TPM: u64 = 1;
/// The line the TPM store logs (at debug level) for every TPM2_Sign it sends.
const SIGN_LINE: &str = "tpm: TPM2_Sign";
/// The DER prefix of a P-256 SubjectPublicKeyInfo; the 65-byte point follows.
const P256_SPKI_PREFIX: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// The module's log file (the module's logger is set up once per process, at the first
/// C_Initialize, from DEVICEKEY_LOG and DEVICEKEY_LOG_FILE). One file per user, shared by runs:
/// each line names the pid that wrote it, and only this process's lines are counted.
fn log_file() -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let uid = std::fs::metadata("/proc/self").map_or(0, |m| m.uid());
        let path = std::env::temp_dir().join(format!("devicekey-pkcs11-tpm-test-{uid}.log"));
        if std::fs::metadata(&path).is_ok_and(|m| m.len() > 1 << 20) {
            let _ = std::fs::remove_file(&path);
        }
        path
    })
    .clone()
}

/// How many TPM2_Sign commands the module has logged so far in this process.
fn signs_logged() -> usize {
    let ours = format!("devicekey[{}] ", std::process::id());
    std::fs::read_to_string(log_file())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(&ours) && l.contains(SIGN_LINE))
        .count()
}

/// Writes a one-slot TPM config.
fn write_tpm_config(config: &Path, tcti: &str, keys: &Path, allow_simulator: bool) {
    std::fs::write(
        config,
        format!(
            "[[slot]]\nlabel = \"{TPM_LABEL}\"\nbackend = \"tpm\"\ntcti = \"{tcti}\"\ndir = \"{}\"\nallow_simulator = {allow_simulator}\n",
            keys.display()
        ),
    )
    .expect("write the TPM config");
}

/// The module on a TPM slot backed by this test's own swtpm.
struct TpmFixture {
    token: Token,
    swtpm: Swtpm,
    allow_simulator: bool,
}

impl TpmFixture {
    /// Starts swtpm, writes the config (allow_simulator = true) and initializes the module.
    fn new() -> Self {
        Self::with_allow_simulator(true)
    }

    fn with_allow_simulator(allow_simulator: bool) -> Self {
        // Token::uninitialized holds the process-wide test lock from here on.
        let token = Token::uninitialized();
        std::env::set_var("DEVICEKEY_LOG", "debug");
        std::env::set_var("DEVICEKEY_LOG_FILE", log_file());
        std::env::remove_var("DEVICEKEY_TPM_TCTI");
        let swtpm = Swtpm::start(&token.root().join("swtpm"));
        let mut f = Self {
            token,
            swtpm,
            allow_simulator,
        };
        f.write_config();
        f.token.initialize();
        f
    }

    fn keys(&self) -> PathBuf {
        self.token.root().join("tpmkeys")
    }

    fn write_config(&self) {
        write_tpm_config(
            &self.token.config,
            &self.swtpm.tcti(),
            &self.keys(),
            self.allow_simulator,
        );
    }

    /// C_Finalize, rewrite the config (swtpm port, allow_simulator), C_Initialize.
    fn reload(&mut self) {
        self.token.finalize();
        self.write_config();
        self.token.initialize();
    }

    fn session(&self) -> Session {
        let slot = self.token.slot();
        let info = self.token.ctx.get_token_info(slot).expect("C_GetTokenInfo");
        assert_eq!(info.label().trim_end(), TPM_LABEL);
        self.token.session()
    }

    fn model(&self) -> String {
        let info = self
            .token
            .ctx
            .get_token_info(self.token.slot())
            .expect("C_GetTokenInfo");
        info.model().trim_end().to_string()
    }
}

impl Drop for TpmFixture {
    fn drop(&mut self) {
        // Close the module's TPM connection before the TPM goes away; then stop swtpm by pid.
        let _ = self.token.ctx.clone().finalize();
        self.swtpm.stop();
    }
}

/// The private key labelled `label` (exactly one).
fn find_private(s: &Session, label: &str) -> ObjectHandle {
    let found = s
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .expect("C_FindObjects");
    assert_eq!(found.len(), 1, "one private key labelled {label}");
    found[0]
}

/// Signs a SHA-256 digest with CKM_ECDSA and checks it with p256.
fn sign_digest_and_verify(s: &Session, private: ObjectHandle, point: &[u8], msg: &[u8]) {
    let digest = sha256(msg);
    let sig = s
        .sign(&Mechanism::Ecdsa, private, &digest)
        .expect("C_Sign CKM_ECDSA");
    assert_eq!(sig.len(), 64, "raw r||s");
    assert!(
        verify_prehash(point, &digest, &sig),
        "CKM_ECDSA signature does not verify"
    );
}

/// PEM of a P-256 public key (SubjectPublicKeyInfo) from its uncompressed point.
fn public_pem(point: &[u8]) -> String {
    let mut der = P256_SPKI_PREFIX.to_vec();
    der.extend_from_slice(point);
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END PUBLIC KEY-----\n");
    pem
}

/// `openssl dgst -sha256 -verify pub.pem -signature sig.der data` on a raw r||s signature.
fn openssl_verifies(dir: &Path, tag: &str, point: &[u8], data: &[u8], raw_sig: &[u8]) -> bool {
    let sig = p256::ecdsa::Signature::from_slice(raw_sig).expect("r and s in range");
    let pub_pem = dir.join(format!("{tag}-pub.pem"));
    let sig_der = dir.join(format!("{tag}-sig.der"));
    let data_file = dir.join(format!("{tag}-data"));
    std::fs::write(&pub_pem, public_pem(point)).expect("write pub.pem");
    std::fs::write(&sig_der, sig.to_der().as_bytes()).expect("write sig.der");
    std::fs::write(&data_file, data).expect("write data");
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-verify"])
        .arg(&pub_pem)
        .arg("-signature")
        .arg(&sig_der)
        .arg(&data_file)
        .output()
        .expect("cannot run openssl (scripts/setup.sh installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    out.status.success() && stdout.contains("Verified OK")
}

#[test]
fn keygen_persists_across_module_reload_and_swtpm_restart() {
    let mut f = TpmFixture::new();
    let s = f.session();
    let (public, private) = gen_p256(&s, "tpm-persist", true);
    let point = public_point(&s, public);
    assert_eq!(label_of(&s, private), "tpm-persist");
    sign_digest_and_verify(&s, private, &point, b"before the reload");
    let blobs = std::fs::read_dir(f.keys())
        .expect("the TPM key directory exists")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".pem"))
        .count();
    assert_eq!(blobs, 1, "one TSS2 PEM key file in the key directory");
    drop(s);

    // Module reload: the key comes back from its blob, same public key, still signs.
    f.reload();
    let s = f.session();
    let private = find_private(&s, "tpm-persist");
    assert_eq!(public_point(&s, public_for(&s, private)), point);
    sign_digest_and_verify(&s, private, &point, b"after the reload");
    drop(s);

    // swtpm restart on the same state: the SRK is the same, so the blob loads again.
    let old_port = f.swtpm.port;
    f.swtpm.restart();
    if f.swtpm.port == old_port {
        // Same TCTI: the live module reconnects by itself.
        let s = f.session();
        let private = find_private(&s, "tpm-persist");
        sign_digest_and_verify(&s, private, &point, b"after the swtpm restart, no reload");
    }
    f.reload();
    let s = f.session();
    let private = find_private(&s, "tpm-persist");
    assert_eq!(public_point(&s, public_for(&s, private)), point);
    sign_digest_and_verify(&s, private, &point, b"after the swtpm restart");
}

#[test]
fn ecdsa_and_ecdsa_sha256_verify_with_p256_and_openssl() {
    let f = TpmFixture::new();
    let s = f.session();
    let (public, private) = gen_p256(&s, "tpm-sign", true);
    let point = public_point(&s, public);
    let dir = f.token.root().to_path_buf();
    let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();

    // CKM_ECDSA over a SHA-256 digest the caller computed.
    let digest = sha256(&data);
    let sig = s
        .sign(&Mechanism::Ecdsa, private, &digest)
        .expect("C_Sign CKM_ECDSA");
    assert_eq!(sig.len(), 64);
    assert!(verify_prehash(&point, &digest, &sig), "p256: CKM_ECDSA");
    assert!(
        openssl_verifies(&dir, "ecdsa", &point, &data, &sig),
        "openssl: CKM_ECDSA"
    );

    // CKM_ECDSA_SHA256: the module hashes.
    let sig = s
        .sign(&Mechanism::EcdsaSha256, private, &data)
        .expect("C_Sign CKM_ECDSA_SHA256");
    assert_eq!(sig.len(), 64);
    assert!(
        verify_prehash(&point, &digest, &sig),
        "p256: CKM_ECDSA_SHA256"
    );
    assert!(
        openssl_verifies(&dir, "ecdsa-sha256", &point, &data, &sig),
        "openssl: CKM_ECDSA_SHA256"
    );

    // Multi-part CKM_ECDSA_SHA256 gives a signature over the same digest.
    s.sign_init(&Mechanism::EcdsaSha256, private)
        .expect("C_SignInit");
    s.sign_update(&data[..300]).expect("C_SignUpdate");
    s.sign_update(&data[300..]).expect("C_SignUpdate");
    let sig = s.sign_final().expect("C_SignFinal");
    assert!(verify_prehash(&point, &digest, &sig), "p256: multi-part");

    // A control: a signature does not verify over other data.
    let mut other = data.clone();
    other[0] ^= 1;
    assert!(
        !openssl_verifies(&dir, "control", &point, &other, &sig),
        "openssl verified a signature over other data"
    );
}

#[test]
fn length_query_and_buffer_too_small_send_no_tpm2_sign() {
    let f = TpmFixture::new();
    let s = f.session();
    let (public, private) = gen_p256(&s, "tpm-count", false);
    let point = public_point(&s, public);
    let digest = sha256(b"count the TPM commands");

    // Length query, then the signature: one TPM2_Sign.
    let before = signs_logged();
    assert_rv!(sign_init(&s, CKM_ECDSA, private), CKR_OK);
    let (rv, len, _) = sign_raw(&s, &digest, None);
    assert_rv!(rv, CKR_OK, "length query");
    assert_eq!(len, 64);
    assert_eq!(
        signs_logged(),
        before,
        "a length query sent a TPM2_Sign (see {})",
        log_file().display()
    );
    let (rv, len, buf) = sign_raw(&s, &digest, Some(64));
    assert_rv!(rv, CKR_OK, "C_Sign after the length query");
    assert_eq!(len, 64);
    assert!(verify_prehash(&point, &digest, &buf[..64]));
    assert_eq!(
        signs_logged() - before,
        1,
        "length query + sign must send exactly one TPM2_Sign (see {})",
        log_file().display()
    );

    // Too small a buffer, then the signature: one TPM2_Sign.
    let before = signs_logged();
    assert_rv!(sign_init(&s, CKM_ECDSA_SHA256, private), CKR_OK);
    let (rv, len, _) = sign_raw(&s, b"message", Some(10));
    assert_rv!(rv, CKR_BUFFER_TOO_SMALL);
    assert_eq!(len, 64, "CKR_BUFFER_TOO_SMALL tells the length");
    assert_eq!(
        signs_logged(),
        before,
        "CKR_BUFFER_TOO_SMALL sent a TPM2_Sign"
    );
    let (rv, _, buf) = sign_raw(&s, b"message", Some(64));
    assert_rv!(rv, CKR_OK, "C_Sign after CKR_BUFFER_TOO_SMALL");
    assert!(verify_prehash(&point, &sha256(b"message"), &buf[..64]));
    assert_eq!(
        signs_logged() - before,
        1,
        "CKR_BUFFER_TOO_SMALL + sign must send exactly one TPM2_Sign"
    );

    // cryptoki's sign (a length query, then the call): one each.
    let before = signs_logged();
    for i in 0..3u8 {
        let sig = s
            .sign(&Mechanism::Ecdsa, private, &sha256(&[i]))
            .expect("C_Sign");
        assert!(verify_prehash(&point, &sha256(&[i]), &sig));
    }
    assert_eq!(
        signs_logged() - before,
        3,
        "three signatures, three TPM2_Sign"
    );
}

#[test]
fn four_threads_sign_at_once() {
    const THREADS: usize = 4;
    const PER_THREAD: usize = 8;
    let f = TpmFixture::new();
    let s = f.session();
    let (public, private) = gen_p256(&s, "tpm-threads", true);
    let point = public_point(&s, public);
    let before = signs_logged();

    let barrier = Arc::new(Barrier::new(THREADS));
    let results: Vec<Vec<(Vec<u8>, Vec<u8>)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let barrier = Arc::clone(&barrier);
                let token = &f.token;
                scope.spawn(move || {
                    let session = token.session();
                    barrier.wait();
                    (0..PER_THREAD)
                        .map(|i| {
                            let msg = format!("thread {t} message {i}").into_bytes();
                            let sig = if i % 2 == 0 {
                                session.sign(&Mechanism::Ecdsa, private, &sha256(&msg))
                            } else {
                                session.sign(&Mechanism::EcdsaSha256, private, &msg)
                            }
                            .unwrap_or_else(|e| panic!("thread {t} signature {i}: {e}"));
                            (msg, sig)
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a signing thread panicked"))
            .collect()
    });

    let mut n = 0;
    for (msg, sig) in results.iter().flatten() {
        assert!(
            verify_prehash(&point, &sha256(msg), sig),
            "signature over {:?} does not verify",
            String::from_utf8_lossy(msg)
        );
        n += 1;
    }
    assert_eq!(n, THREADS * PER_THREAD);
    assert_eq!(
        signs_logged() - before,
        THREADS * PER_THREAD,
        "one TPM2_Sign per signature"
    );
}

#[test]
fn token_model_is_hardware_tpm_only_with_allow_simulator() {
    // allow_simulator = true: swtpm counts as a TPM.
    let mut f = TpmFixture::new();
    assert_eq!(f.model(), "hardware_tpm");
    let s = f.session();
    let (public, private) = gen_p256(&s, "tpm-class", true);
    assert_eq!(
        vendor_ulong(&s, private, CKA_DEVICEKEY_PROTECTION_CLASS),
        Some(CLASS_HARDWARE_TPM)
    );
    assert_eq!(
        vendor_ulong(&s, public, CKA_DEVICEKEY_PROTECTION_CLASS),
        Some(CLASS_HARDWARE_TPM)
    );
    drop(s);

    // Without it, the same TPM (a simulator) and the same key are os_protected.
    f.allow_simulator = false;
    f.reload();
    assert_eq!(f.model(), "os_protected");
    let s = f.session();
    let private = find_private(&s, "tpm-class");
    assert_eq!(
        vendor_ulong(&s, private, CKA_DEVICEKEY_PROTECTION_CLASS),
        Some(CLASS_OS_PROTECTED)
    );
    let public = public_for(&s, private);
    assert_eq!(
        vendor_ulong(&s, public, CKA_DEVICEKEY_PROTECTION_CLASS),
        Some(CLASS_OS_PROTECTED)
    );
    // A key made now is os_protected too, and still signs with the TPM.
    let (public, private) = gen_p256(&s, "tpm-class-2", true);
    assert_eq!(
        vendor_ulong(&s, private, CKA_DEVICEKEY_PROTECTION_CLASS),
        Some(CLASS_OS_PROTECTED)
    );
    let point = public_point(&s, public);
    sign_digest_and_verify(&s, private, &point, b"simulator, honestly labelled");
}

#[test]
fn a_fresh_fixture_starts_clean_and_swtpm_dies_with_it() {
    // The drop guard stops swtpm by pid; nothing of ours stays running.
    let pid;
    {
        let f = TpmFixture::new();
        pid = f.swtpm.pid;
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        let s = f.session();
        assert!(s
            .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
            .expect("C_FindObjects")
            .is_empty());
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Gone, or at worst a zombie waiting for its (other) parent.
    assert!(
        stat.is_empty() || stat.contains(") Z "),
        "swtpm {pid} still runs after the fixture was dropped"
    );
}
