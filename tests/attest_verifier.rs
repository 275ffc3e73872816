//! The attestation verifier (`devicekey_pkcs11::attest`) against a real TPM (swtpm) and the
//! reference tools (tpm2-tools), so that it does not only agree with itself:
//!
//! - credentials made by our MakeCredential, for an AK that tpm2-tools made under an RSA and an
//!   ECC EK, are released by `tpm2_activatecredential`; a credential for another AK is not;
//!   `tpm2_makecredential -T none` output parses as well-formed;
//! - `tpm2_certify` output (its fixed qualifying data `00ff55aa`) parses, its AK signature
//!   verifies (check 4) and its attested name is the key's (check 5's name part);
//! - evidence assembled from a raw TPM2_Certify (sent with `tpm2_send`, with the contract's
//!   qualifying data) passes all six checks with the swtpm EK certificate and the swtpm local CA,
//!   and each tampering fails at its check.
//!
//! Each test starts its own swtpm (with `swtpm_setup --create-ek-cert` where an EK certificate is
//! needed) in a private state directory and stops it by pid. Without swtpm or tpm2-tools the tests
//! skip, unless `DEVICEKEY_TEST_REQUIRE` contains `swtpm`, in which case they fail.
#![cfg(all(feature = "tpm", target_os = "linux"))]

use std::path::PathBuf;
use std::process::{Command, Stdio};

use devicekey_pkcs11::attest::certify::{expected_extra_data, parse_certify_info};
use devicekey_pkcs11::attest::credential::parse_tpm2_tools_credential;
use devicekey_pkcs11::attest::{
    make_credential, verify, verify_json, verify_pinned, AttestError, Check, CredentialChallenge,
    PublicArea, TpmEvidence, TrustAnchors,
};
use testkit::swtpm::Swtpm;

/// Where swtpm_setup's local CA keeps its root and its issuing certificate.
const LOCALCA: &str = "/var/lib/swtpm-localca";
const EK_HANDLE: &str = "0x81010001";
const AK_HANDLE: &str = "0x81010002";
const KEY_HANDLE: &str = "0x81000010";
const OTHER_KEY_HANDLE: &str = "0x81000011";
/// The tools these tests run besides swtpm.
const TPM_TOOLS: &[&str] = &[
    "swtpm_setup",
    "tpm2_createek",
    "tpm2_send",
    "tpm2_activatecredential",
];

/// A swtpm and a scratch directory for tpm2-tools files.
struct Tpm {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    swtpm: Swtpm,
}

impl Tpm {
    /// A fresh TPM; with `ek_cert`, manufactured by swtpm_setup with EK certificates.
    fn start(ek_cert: bool) -> Tpm {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        let state = dir.join("state");
        std::fs::create_dir_all(&state).unwrap();
        if ek_cert {
            let out = Command::new("swtpm_setup")
                .args(["--tpm2", "--create-ek-cert", "--overwrite", "--tpmstate"])
                .arg(&state)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "swtpm_setup: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let swtpm = Swtpm::start(&state);
        Tpm {
            _tmp: tmp,
            dir,
            swtpm,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Runs a tpm2-tools command against this TPM; `Err(stderr)` when it fails.
    fn try_tool(&self, tool: &str, args: &[&str]) -> Result<Vec<u8>, String> {
        let out = Command::new(tool)
            .args(args)
            .current_dir(&self.dir)
            .env("TPM2TOOLS_TCTI", self.swtpm.tcti())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn tool(&self, tool: &str, args: &[&str]) -> Vec<u8> {
        self.try_tool(tool, args)
            .unwrap_or_else(|e| panic!("{tool} {args:?} failed: {e}"))
    }

    /// Flushes every transient object and session (swtpm has no resource manager).
    fn flush(&self) {
        self.tool("tpm2_flushcontext", &["-t"]);
        self.tool("tpm2_flushcontext", &["-s"]);
    }

    /// The public area (`TPMT_PUBLIC`, no size prefix) of a loaded or persistent object.
    fn public_area(&self, handle: &str) -> Vec<u8> {
        let file = format!("pub-{handle}.bin");
        self.tool("tpm2_readpublic", &["-c", handle, "-o", &file]);
        self.flush();
        let tpm2b = std::fs::read(self.path(&file)).unwrap();
        let size = u16::from_be_bytes([tpm2b[0], tpm2b[1]]) as usize;
        assert_eq!(size + 2, tpm2b.len(), "TPM2B_PUBLIC size");
        tpm2b[2..].to_vec()
    }

    /// An AK made by tpm2-tools under the EK at `ek`, made persistent at `handle`.
    fn create_ak(&self, ek: &str, handle: &str) {
        let ctx = format!("ak-{handle}.ctx");
        self.tool(
            "tpm2_createak",
            &[
                "-C", ek, "-c", &ctx, "-G", "ecc", "-g", "sha256", "-s", "ecdsa",
            ],
        );
        self.tool("tpm2_evictcontrol", &["-C", "o", "-c", &ctx, handle]);
        self.flush();
    }

    /// Device-key-like signing keys (children of an ECC SRK), persistent at `handles`.
    fn create_signing_keys(&self, handles: &[&str]) {
        self.tool(
            "tpm2_createprimary",
            &[
                "-C",
                "o",
                "-g",
                "sha256",
                "-G",
                "ecc256:aes128cfb",
                "-a",
                "restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda",
                "-c",
                "srk.ctx",
            ],
        );
        self.tool(
            "tpm2_evictcontrol",
            &["-C", "o", "-c", "srk.ctx", "0x81000001"],
        );
        self.flush();
        for handle in handles {
            let (public, private, ctx) = (
                format!("{handle}.pub"),
                format!("{handle}.priv"),
                format!("{handle}.ctx"),
            );
            self.tool(
                "tpm2_create",
                &[
                    "-C",
                    "0x81000001",
                    "-G",
                    "ecc256:ecdsa-sha256",
                    "-a",
                    "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign",
                    "-u",
                    &public,
                    "-r",
                    &private,
                ],
            );
            self.flush();
            self.tool(
                "tpm2_load",
                &[
                    "-C",
                    "0x81000001",
                    "-u",
                    &public,
                    "-r",
                    &private,
                    "-c",
                    &ctx,
                ],
            );
            self.tool("tpm2_evictcontrol", &["-C", "o", "-c", &ctx, handle]);
            self.flush();
        }
    }

    /// TPM2_ActivateCredential of `challenge` with `activate` as the activate handle and the EK
    /// at `ek` (through its PolicySecret(endorsement) session), as tpm2-tools does it.
    fn activate(
        &self,
        challenge: &CredentialChallenge,
        activate: &str,
        ek: &str,
    ) -> Result<Vec<u8>, String> {
        let mut file = vec![0xba, 0xdc, 0xc0, 0xde, 0, 0, 0, 1];
        file.extend_from_slice(&challenge.credential_blob);
        file.extend_from_slice(&challenge.encrypted_secret);
        std::fs::write(self.path("cred.in"), file).unwrap();
        let _ = std::fs::remove_file(self.path("secret.out"));
        self.tool(
            "tpm2_startauthsession",
            &["--policy-session", "-S", "session.ctx"],
        );
        self.tool("tpm2_policysecret", &["-S", "session.ctx", "-c", "e"]);
        let result = self.try_tool(
            "tpm2_activatecredential",
            &[
                "-c",
                activate,
                "-C",
                ek,
                "-i",
                "cred.in",
                "-o",
                "secret.out",
                "-P",
                "session:session.ctx",
            ],
        );
        self.flush();
        result.map(|_| std::fs::read(self.path("secret.out")).unwrap())
    }

    /// A raw TPM2_Certify of `key` by `ak` with `qualifying` data, sent with `tpm2_send`:
    /// returns the marshalled `TPMS_ATTEST` and the signature as DER.
    fn certify(&self, key: &str, ak: &str, qualifying: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let handle = |h: &str| u32::from_str_radix(h.trim_start_matches("0x"), 16).unwrap();
        let password_session = [0x40, 0, 0, 0x09, 0, 0, 0, 0, 0];
        let mut body = Vec::new();
        body.extend_from_slice(&handle(key).to_be_bytes());
        body.extend_from_slice(&handle(ak).to_be_bytes());
        body.extend_from_slice(&18u32.to_be_bytes());
        body.extend_from_slice(&password_session);
        body.extend_from_slice(&password_session);
        body.extend_from_slice(&(qualifying.len() as u16).to_be_bytes());
        body.extend_from_slice(qualifying);
        body.extend_from_slice(&[0x00, 0x10]); // inScheme TPM_ALG_NULL: the AK's own scheme
        let mut command = vec![0x80, 0x02];
        command.extend_from_slice(&((10 + body.len()) as u32).to_be_bytes());
        command.extend_from_slice(&0x0148u32.to_be_bytes()); // TPM_CC_Certify
        command.extend_from_slice(&body);
        std::fs::write(self.path("certify.cmd"), &command).unwrap();
        // TPM_RC_RETRY (0x922) and TPM_RC_YIELDED (0x908) ask for the same command again.
        let mut rsp = Vec::new();
        for _ in 0..20 {
            self.tool("tpm2_send", &["-o", "certify.rsp", "certify.cmd"]);
            rsp = std::fs::read(self.path("certify.rsp")).unwrap();
            if rsp[6..10] != [0, 0, 0x09, 0x22] && rsp[6..10] != [0, 0, 0x09, 0x08] {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert_eq!(
            &rsp[6..10],
            &[0, 0, 0, 0],
            "TPM2_Certify failed: {rsp:02x?}"
        );
        let mut at = 14; // tag, size, rc, parameterSize
        let mut take = |n: usize| {
            let s = rsp[at..at + n].to_vec();
            at += n;
            s
        };
        let attest_len = u16::from_be_bytes(take(2).try_into().unwrap()) as usize;
        let attest = take(attest_len);
        assert_eq!(take(4), vec![0x00, 0x18, 0x00, 0x0b], "ECDSA with SHA-256");
        let mut raw = Vec::new();
        for _ in 0..2 {
            let n = u16::from_be_bytes(take(2).try_into().unwrap()) as usize;
            let v = take(n);
            raw.extend(std::iter::repeat(0).take(32 - n));
            raw.extend(v);
        }
        let der = devicekey_pkcs11::encoding::signature_to_der(&raw).unwrap();
        (attest, der)
    }

    /// The EK certificate at NV 0x01c00002, exactly its DER (without NV padding).
    fn ek_certificate(&self) -> Vec<u8> {
        self.tool("tpm2_nvread", &["0x01c00002", "-o", "ek-cert.bin"]);
        let nv = std::fs::read(self.path("ek-cert.bin")).unwrap();
        // DER SEQUENCE with a two-byte length: 30 82 hi lo.
        assert_eq!(&nv[..2], &[0x30, 0x82], "EK certificate DER");
        let len = 4 + u16::from_be_bytes([nv[2], nv[3]]) as usize;
        nv[..len].to_vec()
    }
}

fn localca_anchors() -> TrustAnchors {
    let root = PathBuf::from(LOCALCA).join("swtpm-localca-rootca-cert.pem");
    let issuer = PathBuf::from(LOCALCA).join("issuercert.pem");
    TrustAnchors::from_files(&[root.as_path()], &[issuer.as_path()]).unwrap()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Our MakeCredential, activated by the real TPM through tpm2-tools, for an RSA and an ECC EK;
/// the TPM refuses a credential made for another AK; tpm2_makecredential's output parses.
#[test]
fn our_make_credential_is_released_by_tpm2_activatecredential() {
    if !testkit::swtpm::have_swtpm_and(TPM_TOOLS) {
        return;
    }
    let tpm = Tpm::start(false);
    for (alg, ek, ak, other_ak) in [
        ("rsa", "0x81010001", "0x81010002", "0x81010005"),
        ("ecc", "0x81010003", "0x81010004", "0x81010006"),
    ] {
        tpm.tool("tpm2_createek", &["-G", alg, "-c", ek]);
        tpm.flush();
        tpm.create_ak(ek, ak);
        tpm.create_ak(ek, other_ak);
        let ek_area = PublicArea::parse(&tpm.public_area(ek)).unwrap();
        let ak_area = PublicArea::parse(&tpm.public_area(ak)).unwrap();
        let other_area = PublicArea::parse(&tpm.public_area(other_ak)).unwrap();
        assert_ne!(ak_area.name(), other_area.name());

        for len in [16, 32] {
            let secret: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            let challenge = make_credential(&ek_area, &ak_area.name(), &secret).unwrap();
            let released = tpm.activate(&challenge, ak, ek).unwrap();
            assert_eq!(released, secret, "{alg} EK, {len}-byte secret");
        }

        // The same blobs name the first AK: activating them with the other AK is refused.
        let challenge = make_credential(&ek_area, &ak_area.name(), &[9; 32]).unwrap();
        let err = tpm.activate(&challenge, other_ak, ek).unwrap_err();
        assert!(err.contains("0x") || err.contains("rror"), "{alg}: {err}");

        // tpm2_makecredential (software, no TPM) for the same EK and AK: well-formed, the same
        // structure sizes as ours, and the TPM releases its secret too.
        std::fs::write(tpm.path("secret.bin"), [5u8; 32]).unwrap();
        let ek_file = format!("ek-{alg}.pub");
        tpm.tool("tpm2_readpublic", &["-c", ek, "-o", &ek_file]);
        tpm.flush();
        let name = hex(&ak_area.name());
        tpm.tool(
            "tpm2_makecredential",
            &[
                "-T",
                "none",
                "-u",
                &ek_file,
                "-s",
                "secret.bin",
                "-n",
                &name,
                "-o",
                "mc.out",
            ],
        );
        let theirs =
            parse_tpm2_tools_credential(&std::fs::read(tpm.path("mc.out")).unwrap()).unwrap();
        assert_eq!(
            theirs.credential_blob.len(),
            challenge.credential_blob.len()
        );
        assert_eq!(
            theirs.encrypted_secret.len(),
            challenge.encrypted_secret.len()
        );
        assert_eq!(tpm.activate(&theirs, ak, ek).unwrap(), vec![5u8; 32]);
    }
}

/// tpm2_certify's output, parsed by the verifier: the AK's signature verifies (check 4), the
/// attested name is the key's (check 5's name part), and only its fixed qualifying data
/// (00ff55aa, not the contract's) keeps check 5 from passing.
#[test]
fn tpm2_certify_output_parses_and_its_signature_verifies() {
    if !testkit::swtpm::have_swtpm_and(TPM_TOOLS) {
        return;
    }
    let tpm = Tpm::start(true);
    tpm.create_ak(EK_HANDLE, AK_HANDLE);
    tpm.create_signing_keys(&[KEY_HANDLE]);
    tpm.tool(
        "tpm2_certify",
        &[
            "-c",
            KEY_HANDLE,
            "-C",
            AK_HANDLE,
            "-g",
            "sha256",
            "-o",
            "attest.out",
            "-s",
            "sig.out",
            "-f",
            "plain",
        ],
    );
    tpm.flush();
    let attest = std::fs::read(tpm.path("attest.out")).unwrap();
    let signature = std::fs::read(tpm.path("sig.out")).unwrap();
    let key_area = tpm.public_area(KEY_HANDLE);
    let ak_area = tpm.public_area(AK_HANDLE);

    let info = parse_certify_info(&attest).unwrap();
    assert_eq!(info.extra_data, vec![0x00, 0xff, 0x55, 0xaa]);
    assert_eq!(info.name, PublicArea::parse(&key_area).unwrap().name());

    let point = PublicArea::parse(&key_area).unwrap().p256_point().unwrap();
    let evidence = TpmEvidence {
        spki_der: devicekey_pkcs11::encoding::spki_der(&point).unwrap(),
        key_public_area: key_area,
        certify_info: attest.clone(),
        signature_der: signature,
        ak_public_area: ak_area.clone(),
        ek_public_area: tpm.public_area(EK_HANDLE),
        ek_certificates: vec![tpm.ek_certificate()],
    };
    let report = verify_pinned(&evidence, &[1; 16], &ak_area).unwrap();
    for check in [Check::AkPublicArea, Check::Signature, Check::KeyPublicArea] {
        let r = report.check(check).unwrap();
        assert!(r.passed(), "{r}");
    }
    let r5 = report.check(Check::CertifyInfo).unwrap().outcome.clone();
    assert_eq!(
        r5,
        Err("extraData does not match the nonce and SPKI".to_string())
    );

    // One flipped bit of certifyInfo and check 4 fails.
    let mut tampered = evidence.clone();
    tampered.certify_info[20] ^= 1;
    let report = verify_pinned(&tampered, &[1; 16], &ak_area).unwrap();
    assert!(!report.check(Check::Signature).unwrap().passed());
}

/// A TPM with an EK certificate, an AK and two signing keys, and evidence for the first key
/// made the way the contract says (a raw TPM2_Certify with the contract's qualifying data).
fn evidence_from_the_tpm() -> (Tpm, TpmEvidence, Vec<u8>) {
    let tpm = Tpm::start(true);
    tpm.create_ak(EK_HANDLE, AK_HANDLE);
    tpm.create_signing_keys(&[KEY_HANDLE, OTHER_KEY_HANDLE]);
    let key_area = tpm.public_area(KEY_HANDLE);
    let point = PublicArea::parse(&key_area).unwrap().p256_point().unwrap();
    let spki = devicekey_pkcs11::encoding::spki_der(&point).unwrap();
    let nonce = b"a nonce of the relying party".to_vec();
    let (attest, signature) =
        tpm.certify(KEY_HANDLE, AK_HANDLE, &expected_extra_data(&nonce, &spki));
    let evidence = TpmEvidence {
        spki_der: spki,
        key_public_area: key_area,
        certify_info: attest,
        signature_der: signature,
        ak_public_area: tpm.public_area(AK_HANDLE),
        ek_public_area: tpm.public_area(EK_HANDLE),
        ek_certificates: vec![tpm.ek_certificate()],
    };
    (tpm, evidence, nonce)
}

/// Evidence the way the contract defines it, from the real TPM: all six checks pass; then each
/// tampering fails at its check, with a message that names it.
#[test]
fn tpm_evidence_passes_all_six_checks_and_each_tampering_fails_at_its_check() {
    if !testkit::swtpm::have_swtpm_and(TPM_TOOLS) {
        return;
    }
    let (tpm, evidence, nonce) = evidence_from_the_tpm();
    let anchors = localca_anchors();
    let activate_with = |handle: &'static str| {
        let tpm = &tpm;
        move |c: &CredentialChallenge| tpm.activate(c, handle, EK_HANDLE)
    };

    // The happy path, through the JSON the device sends.
    let json = evidence.to_json().to_string();
    let report = verify_json(json.as_bytes(), &nonce, &anchors, activate_with(AK_HANDLE)).unwrap();
    for c in &report.checks {
        eprintln!("{c}");
    }
    assert!(report.passed(), "{:?}", report.first_failure());
    assert_eq!(report.checks.len(), 6);
    assert_eq!(report.spki_der, evidence.spki_der);

    // Once pinned, the same AK verifies without roots or activation.
    let pinned = verify_pinned(&evidence, &nonce, &report.ak_public_area).unwrap();
    assert!(pinned.passed(), "{:?}", pinned.first_failure());

    let first_failure = |report: devicekey_pkcs11::attest::Report| match report.into_result() {
        Err(AttestError::Check { check, reason }) => (check, reason),
        other => panic!("expected a failed check, got {other:?}"),
    };

    // Another nonce: check 5, and only check 5.
    let report = verify(
        &evidence,
        b"another nonce, not the one sent",
        &anchors,
        activate_with(AK_HANDLE),
    )
    .unwrap();
    let failed: Vec<Check> = report
        .checks
        .iter()
        .filter(|c| !c.passed())
        .map(|c| c.check)
        .collect();
    assert_eq!(failed, vec![Check::CertifyInfo]);
    let err = report.into_result().unwrap_err().to_string();
    assert_eq!(
        err,
        "check 5 (certifyInfo): extraData does not match the nonce and SPKI"
    );

    // The key's public area swapped for another TPM key's: the attested name differs (check 5)
    // and so does the point (check 6).
    let mut swapped = evidence.clone();
    swapped.key_public_area = tpm.public_area(OTHER_KEY_HANDLE);
    let report = verify(&swapped, &nonce, &anchors, activate_with(AK_HANDLE)).unwrap();
    assert!(!report.check(Check::KeyPublicArea).unwrap().passed());
    let (check, reason) = first_failure(report);
    assert_eq!(check, Check::CertifyInfo);
    assert!(reason.contains("attested name"), "{reason}");

    // The SPKI swapped for a software key's: extraData (check 5) and the point (check 6).
    let group = openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap();
    let soft = openssl::ec::EcKey::generate(&group).unwrap();
    let mut soft_spki = evidence.clone();
    soft_spki.spki_der = soft.public_key_to_der().unwrap();
    let report = verify(&soft_spki, &nonce, &anchors, activate_with(AK_HANDLE)).unwrap();
    assert_eq!(
        report.check(Check::KeyPublicArea).unwrap().outcome,
        Err("the key's point is not the SPKI's point".to_string())
    );
    let (check, reason) = first_failure(report);
    assert_eq!(check, Check::CertifyInfo);
    assert!(reason.contains("extraData"), "{reason}");

    // The EK certificate with NV padding after its DER: check 1 (the contract wants the exact DER).
    let mut padded = evidence.clone();
    padded.ek_certificates[0].extend_from_slice(&[0xff; 16]);
    let report = verify(&padded, &nonce, &anchors, activate_with(AK_HANDLE)).unwrap();
    let (check, reason) = first_failure(report);
    assert_eq!(check, Check::EkCertificate);
    assert!(
        reason.contains("not exactly one DER certificate"),
        "{reason}"
    );

    // A roots file without the swtpm CA: check 1.
    let other_root = tpm.path("other-root.pem");
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args([
            "-nodes",
            "-subj",
            "/CN=not the swtpm CA",
            "-days",
            "2",
            "-keyout",
        ])
        .arg(tpm.path("other-root.key"))
        .arg("-out")
        .arg(&other_root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let issuer = PathBuf::from(LOCALCA).join("issuercert.pem");
    let wrong_anchors =
        TrustAnchors::from_files(&[other_root.as_path()], &[issuer.as_path()]).unwrap();
    let report = verify(&evidence, &nonce, &wrong_anchors, activate_with(AK_HANDLE)).unwrap();
    let (check, reason) = first_failure(report);
    assert_eq!(check, Check::EkCertificate);
    assert!(reason.contains("does not chain"), "{reason}");
    // ... and without the intermediate the chain cannot be built either.
    let root = PathBuf::from(LOCALCA).join("swtpm-localca-rootca-cert.pem");
    let no_issuer = TrustAnchors::from_files(&[root.as_path()], &[]).unwrap();
    let report = verify(&evidence, &nonce, &no_issuer, activate_with(AK_HANDLE)).unwrap();
    assert_eq!(first_failure(report).0, Check::EkCertificate);

    // An "AK" without `restricted`: another key of the same TPM signs the genuine certifyInfo
    // (an unrestricted key signs anything), and the TPM even activates a credential for it,
    // since it lives next to the EK. Only check 2 catches it.
    std::fs::write(tpm.path("certify-info.bin"), &evidence.certify_info).unwrap();
    tpm.tool(
        "tpm2_sign",
        &[
            "-c",
            OTHER_KEY_HANDLE,
            "-g",
            "sha256",
            "-f",
            "plain",
            "-o",
            "forged.sig",
            "certify-info.bin",
        ],
    );
    tpm.flush();
    let mut unrestricted = evidence.clone();
    unrestricted.ak_public_area = tpm.public_area(OTHER_KEY_HANDLE);
    unrestricted.signature_der = std::fs::read(tpm.path("forged.sig")).unwrap();
    let report = verify(
        &unrestricted,
        &nonce,
        &anchors,
        activate_with(OTHER_KEY_HANDLE),
    )
    .unwrap();
    let failed: Vec<Check> = report
        .checks
        .iter()
        .filter(|c| !c.passed())
        .map(|c| c.check)
        .collect();
    assert_eq!(failed, vec![Check::AkPublicArea], "{:?}", report.checks);
    assert_eq!(
        report.into_result().unwrap_err().to_string(),
        "check 2 (akPublicArea): restricted is clear"
    );

    // A credential the device cannot activate (here: sent to the wrong AK): check 3.
    let report = verify(&evidence, &nonce, &anchors, activate_with(OTHER_KEY_HANDLE)).unwrap();
    let (check, reason) = first_failure(report);
    assert_eq!(check, Check::Activation);
    assert!(reason.contains("did not activate"), "{reason}");

    // A device that answers with some other secret: check 3.
    let report = verify(&evidence, &nonce, &anchors, |_| Ok(vec![0; 32])).unwrap();
    assert_eq!(first_failure(report).0, Check::Activation);

    // Evidence for a key that is not in a TPM: refused as such.
    let none = br#"{"format":"none","version":1,"protectionClass":"os_protected_nonextractable"}"#;
    let err = verify_json(none, &nonce, &anchors, |_| Ok(Vec::new())).unwrap_err();
    assert!(matches!(err, AttestError::NotInTpm(_)), "{err}");

    // A nonce outside 16..=64 bytes is the verifier's own mistake.
    assert!(matches!(
        verify(&evidence, &[0; 8], &anchors, |_| Ok(Vec::new())),
        Err(AttestError::Input(_))
    ));
}

/// The activation command of `devicekey attest verify --activate-with`, as a shell script
/// around tpm2-tools: one JSON object in, `{"secretBase64": ...}` out.
fn activation_script(tpm: &Tpm, activate: &str) -> PathBuf {
    let script = tpm.path(&format!("activate-{activate}.sh"));
    let text = format!(
        r#"#!/bin/sh
set -e
cd '{dir}'
export TPM2TOOLS_TCTI='{tcti}'
read -r line
cred=$(printf '%s' "$line" | sed -n 's/.*"credentialBlobBase64":"\([^"]*\)".*/\1/p')
sec=$(printf '%s' "$line" | sed -n 's/.*"encryptedSecretBase64":"\([^"]*\)".*/\1/p')
{{ printf '\272\334\300\336\000\000\000\001'; printf '%s' "$cred" | base64 -d; printf '%s' "$sec" | base64 -d; }} > cli-cred.in
tpm2_startauthsession --policy-session -S cli-s.ctx >/dev/null
tpm2_policysecret -S cli-s.ctx -c e >/dev/null
status=0
tpm2_activatecredential -c {activate} -C {ek} -i cli-cred.in -o cli-secret.out -P session:cli-s.ctx >/dev/null || status=$?
tpm2_flushcontext -t; tpm2_flushcontext -s
[ "$status" = 0 ] || exit "$status"
printf '{{"secretBase64":"%s"}}\n' "$(base64 -w0 cli-secret.out)"
"#,
        dir = tpm.dir.display(),
        tcti = tpm.swtpm.tcti(),
        ek = EK_HANDLE,
    );
    std::fs::write(&script, text).unwrap();
    script
}

fn devicekey() -> Command {
    Command::new(env!("CARGO_BIN_EXE_devicekey"))
}

/// `devicekey attest verify`: the six checks in plain words and exit 0 on real evidence; a
/// saved AK pins it; a wrong nonce, a refused activation and "none" evidence exit non-zero,
/// naming the check.
#[test]
fn cli_attest_verify_prints_each_check_and_exits_zero_only_when_all_pass() {
    if !testkit::swtpm::have_swtpm_and(TPM_TOOLS) {
        return;
    }
    let (tpm, evidence, nonce) = evidence_from_the_tpm();
    let evidence_file = tpm.path("evidence.json");
    std::fs::write(&evidence_file, evidence.to_json().to_string()).unwrap();
    let root = PathBuf::from(LOCALCA).join("swtpm-localca-rootca-cert.pem");
    let issuer = PathBuf::from(LOCALCA).join("issuercert.pem");
    let b64url = |b: &[u8]| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    };
    let run = |nonce: &[u8], activate: &str, extra: &[&str]| {
        let out = devicekey()
            .args(["attest", "verify", "--evidence"])
            .arg(&evidence_file)
            .args(["--nonce", &b64url(nonce), "--roots"])
            .arg(&root)
            .arg("--intermediates")
            .arg(&issuer)
            .arg("--activate-with")
            .arg(format!(
                "sh '{}'",
                activation_script(&tpm, activate).display()
            ))
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let ak_file = tpm.path("pinned-ak.b64");
    let (code, stdout, stderr) = run(&nonce, AK_HANDLE, &["--save-ak", ak_file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    eprintln!("{stdout}");
    for n in 1..=6 {
        assert!(stdout.contains(&format!("check {n} (")), "{stdout}");
    }
    assert_eq!(stdout.matches(": pass: ").count(), 6, "{stdout}");
    assert!(stdout.contains("verified: all six checks pass"), "{stdout}");

    // Pinned: no roots, no activation.
    let out = devicekey()
        .args(["attest", "verify", "--evidence"])
        .arg(&evidence_file)
        .args(["--nonce", &b64url(&nonce), "--pinned-ak"])
        .arg(&ak_file)
        .output()
        .unwrap();
    let stdout_pinned = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout_pinned}");
    assert!(stdout_pinned.contains("pinned AK"), "{stdout_pinned}");

    let (code, stdout, stderr) = run(b"another nonce, not the one sent", AK_HANDLE, &[]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("check 5 (certifyInfo): FAIL: extraData does not match the nonce and SPKI"),
        "{stdout}"
    );
    assert!(stderr.contains("check 5 (certifyInfo)"), "{stderr}");

    let (code, stdout, _) = run(&nonce, OTHER_KEY_HANDLE, &[]);
    assert_ne!(code, Some(0));
    assert!(
        stdout.contains("check 3 (credential activation): FAIL"),
        "{stdout}"
    );
    assert!(stdout.contains("NOT verified: 1 of 6"), "{stdout}");

    // A nonce that is too short is a usage error (exit 2), not a verdict.
    let (code, _, stderr) = run(b"short", AK_HANDLE, &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("16 to 64"), "{stderr}");

    // Over the socket of a real `devicekey serve`: the exchange reaches the server, and a
    // server that cannot activate (no such key here) fails check 3 with its own answer.
    let env = testkit::rpc::Env::ours_software("");
    let socket_dir = env.dir.path().join("run");
    std::fs::create_dir(&socket_dir).unwrap();
    std::fs::set_permissions(
        &socket_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let socket = socket_dir.join("serve.sock");
    let mut server = env
        .command()
        .args(["serve", "--socket"])
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(env.dir.path().join("serve.stderr")).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !socket.exists() {
        let exited = server.try_wait().unwrap();
        assert!(
            exited.is_none() && std::time::Instant::now() < deadline,
            "devicekey serve did not listen ({exited:?}): {}",
            env.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = devicekey()
        .args(["attest", "verify", "--evidence"])
        .arg(&evidence_file)
        .args(["--nonce", &b64url(&nonce), "--roots"])
        .arg(&root)
        .arg("--intermediates")
        .arg(&issuer)
        .arg("--socket")
        .arg(&socket)
        .args(["--key-id", "no-such-key"])
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_ne!(out.status.code(), Some(0), "{stdout}");
    eprintln!("{stdout}");
    assert!(
        stdout.contains("check 3 (credential activation): FAIL: the device did not activate the credential: the server answered error"),
        "{stdout}"
    );
    assert!(
        stdout.contains("check 1 (EK certificate): pass"),
        "{stdout}"
    );

    std::fs::write(
        &evidence_file,
        r#"{"format":"none","version":1,"protectionClass":"os_protected_nonextractable"}"#,
    )
    .unwrap();
    let (code, stdout, _) = run(&nonce, AK_HANDLE, &[]);
    assert_ne!(code, Some(0));
    assert!(stdout.contains("format \"none\""), "{stdout}");
}
