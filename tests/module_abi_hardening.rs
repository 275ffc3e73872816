//! Hardening of the C ABI, through the built `.so` and its raw function list: what an adversarial
//! review and an outside conformance suite broke.
//!
//! - A claimed output capacity no buffer can have (`CK_UNAVAILABLE_INFORMATION`) with a real
//!   buffer is refused with `CKR_ARGUMENTS_BAD`, never made into a slice (which aborted the
//!   process in a debug build).
//! - The operation state machine: once C_Sign / C_Digest (a length query included) was called,
//!   the multi-part calls get `CKR_OPERATION_ACTIVE`, and the other way round; `CKM_ECDSA` is
//!   single-part only.
//! - Unsupported functions answer `CKR_CRYPTOKI_NOT_INITIALIZED` before C_Initialize.
//! - The session handle is checked before the mechanism.
//! - C_GetInterface offers exactly the versions it has lists for: 3.0 and 2.40.
//! - A failing call leaves a debug log line with its function and `CKR_` name, and no PIN.

#[macro_use]
extern crate testkit as common;

use std::ptr;

use common::{gen_p256, mech, normalize_digest, public_point, sha256, sign_init, verify_prehash};
use common::{rv_name, Token};
use cryptoki::session::Session;
use cryptoki_sys::*;

/// A length no caller's buffer can have: what `*pulLen` often holds when a caller forgot to set it.
const UNAVAILABLE: CK_ULONG = CK_UNAVAILABLE_INFORMATION;

/// A variable-length output call: (session, out, &mut len) -> CK_RV.
type OutCall<'a> = &'a dyn Fn(CK_SESSION_HANDLE, *mut u8, *mut CK_ULONG) -> CK_RV;

fn sign_call(data: &'static [u8]) -> impl Fn(CK_SESSION_HANDLE, *mut u8, *mut CK_ULONG) -> CK_RV {
    move |s, out, len| {
        // SAFETY: data is readable; out is NULL or a live buffer; len is a live CK_ULONG.
        unsafe {
            ck!(C_Sign)(
                s,
                data.as_ptr() as *mut u8,
                data.len() as CK_ULONG,
                out,
                len,
            )
        }
    }
}

fn sign_final_call(s: CK_SESSION_HANDLE, out: *mut u8, len: *mut CK_ULONG) -> CK_RV {
    // SAFETY: out is NULL or a live buffer; len is a live CK_ULONG.
    unsafe { ck!(C_SignFinal)(s, out, len) }
}

fn digest_call(data: &'static [u8]) -> impl Fn(CK_SESSION_HANDLE, *mut u8, *mut CK_ULONG) -> CK_RV {
    move |s, out, len| {
        // SAFETY: data is readable; out is NULL or a live buffer; len is a live CK_ULONG.
        unsafe {
            ck!(C_Digest)(
                s,
                data.as_ptr() as *mut u8,
                data.len() as CK_ULONG,
                out,
                len,
            )
        }
    }
}

fn digest_final_call(s: CK_SESSION_HANDLE, out: *mut u8, len: *mut CK_ULONG) -> CK_RV {
    // SAFETY: out is NULL or a live buffer; len is a live CK_ULONG.
    unsafe { ck!(C_DigestFinal)(s, out, len) }
}

fn sign_update(s: CK_SESSION_HANDLE, data: &[u8]) -> CK_RV {
    // SAFETY: data is readable for data.len() bytes.
    unsafe { ck!(C_SignUpdate)(s, data.as_ptr() as *mut u8, data.len() as CK_ULONG) }
}

fn digest_update(s: CK_SESSION_HANDLE, data: &[u8]) -> CK_RV {
    // SAFETY: data is readable for data.len() bytes.
    unsafe { ck!(C_DigestUpdate)(s, data.as_ptr() as *mut u8, data.len() as CK_ULONG) }
}

fn digest_init(s: CK_SESSION_HANDLE, m: CK_MECHANISM_TYPE) -> CK_RV {
    let mut m = mech(m);
    // SAFETY: a live CK_MECHANISM without parameters.
    unsafe { ck!(C_DigestInit)(s, &mut m) }
}

/// Calls `f` with a 128-byte buffer and the given claimed length; returns (rv, len, buffer).
fn call_with(
    f: OutCall<'_>,
    s: CK_SESSION_HANDLE,
    claimed: CK_ULONG,
) -> (CK_RV, CK_ULONG, Vec<u8>) {
    let mut buf = vec![0xA5u8; 128];
    let mut len = claimed;
    let rv = f(s, buf.as_mut_ptr(), &mut len);
    (rv, len, buf)
}

/// Calls `f` as a length query (NULL buffer) with the given claimed length.
fn query_with(f: OutCall<'_>, s: CK_SESSION_HANDLE, claimed: CK_ULONG) -> (CK_RV, CK_ULONG) {
    let mut len = claimed;
    let rv = f(s, ptr::null_mut(), &mut len);
    (rv, len)
}

struct Signer {
    session: Session,
    private: cryptoki::object::ObjectHandle,
    point: Vec<u8>,
}

fn signer(t: &Token) -> Signer {
    let session = t.session();
    let (public, private) = gen_p256(&session, "hardening", false);
    let point = public_point(&session, public);
    Signer {
        session,
        private,
        point,
    }
}

#[test]
fn unavailable_capacity_with_a_real_buffer_is_refused_not_sliced() {
    let t = Token::new();
    let k = signer(&t);
    let s = k.session.handle();
    let sign = sign_call(b"data");
    let digest = digest_call(b"data");
    let cases: [(&str, OutCall<'_>, bool); 4] = [
        ("C_Sign", &sign, true),
        ("C_SignFinal", &sign_final_call, true),
        ("C_Digest", &digest, false),
        ("C_DigestFinal", &digest_final_call, false),
    ];
    for (name, call, signs) in cases {
        let start = || {
            if signs {
                sign_init(&k.session, CKM_ECDSA_SHA256, k.private)
            } else {
                digest_init(s, CKM_SHA256)
            }
        };
        // A length query is unaffected by the claimed capacity.
        assert_rv!(start(), CKR_OK, "{name}: init");
        let (rv, len) = query_with(call, s, UNAVAILABLE);
        assert_rv!(
            rv,
            CKR_OK,
            "{name}: length query with an unavailable capacity"
        );
        assert_eq!(len, if signs { 64 } else { 32 }, "{name}: length");
        // A real buffer whose claimed capacity no buffer can have: refused, nothing written.
        let (rv, len, buf) = call_with(call, s, UNAVAILABLE);
        assert_rv!(
            rv,
            CKR_ARGUMENTS_BAD,
            "{name}: capacity CK_UNAVAILABLE_INFORMATION"
        );
        assert_eq!(len, UNAVAILABLE, "{name}: the length was left alone");
        assert!(
            buf.iter().all(|&b| b == 0xA5),
            "{name}: wrote into the buffer"
        );
        // The refusal ended the operation, as any error but CKR_BUFFER_TOO_SMALL does.
        let (rv, _, _) = call_with(call, s, 128);
        assert_rv!(
            rv,
            CKR_OPERATION_NOT_INITIALIZED,
            "{name}: after the refusal"
        );
        // isize::MAX + 1 is refused too; isize::MAX itself is only compared.
        assert_rv!(start(), CKR_OK, "{name}: init again");
        let (rv, _, _) = call_with(call, s, (isize::MAX as CK_ULONG) + 1);
        assert_rv!(rv, CKR_ARGUMENTS_BAD, "{name}: capacity isize::MAX + 1");
        assert_rv!(start(), CKR_OK, "{name}: init again");
        let (rv, len, buf) = call_with(call, s, isize::MAX as CK_ULONG);
        assert_rv!(
            rv,
            CKR_OK,
            "{name}: capacity isize::MAX, a real 128-byte buffer"
        );
        assert_eq!(len, if signs { 64 } else { 32 });
        assert!(
            buf[len as usize..].iter().all(|&b| b == 0xA5),
            "{name}: wrote past the result"
        );
    }
}

#[test]
fn impossible_input_and_fill_lengths_are_refused() {
    let t = Token::new();
    let k = signer(&t);
    let s = k.session.handle();
    let mut buf = [0xA5u8; 128];
    // C_GenerateRandom fills exactly the count it is given: a count no buffer can have is refused.
    // SAFETY: a real 128-byte buffer; the module must not believe the count.
    let rv = unsafe { ck!(C_GenerateRandom)(s, buf.as_mut_ptr(), UNAVAILABLE) };
    assert_rv!(
        rv,
        CKR_ARGUMENTS_BAD,
        "C_GenerateRandom with CK_UNAVAILABLE_INFORMATION"
    );
    assert!(buf.iter().all(|&b| b == 0xA5), "C_GenerateRandom wrote");
    // An input count no buffer can have is refused before it is read.
    assert_rv!(sign_init(&k.session, CKM_ECDSA_SHA256, k.private), CKR_OK);
    // SAFETY: as above.
    let rv = unsafe { ck!(C_SignUpdate)(s, buf.as_mut_ptr(), UNAVAILABLE) };
    assert_rv!(
        rv,
        CKR_ARGUMENTS_BAD,
        "C_SignUpdate with CK_UNAVAILABLE_INFORMATION"
    );
    let mut attr = CK_ATTRIBUTE {
        type_: CKA_LABEL,
        pValue: buf.as_mut_ptr() as *mut std::ffi::c_void,
        ulValueLen: 4,
    };
    // SAFETY: one real attribute; the module must not believe the count.
    let rv = unsafe { ck!(C_FindObjectsInit)(s, &mut attr, UNAVAILABLE) };
    assert_rv!(
        rv,
        CKR_ARGUMENTS_BAD,
        "C_FindObjectsInit with CK_UNAVAILABLE_INFORMATION"
    );
}

#[test]
fn sign_final_after_a_sign_length_query_is_refused() {
    let t = Token::new();
    let k = signer(&t);
    let s = k.session.handle();
    let sign = sign_call(b"the message");
    assert_rv!(sign_init(&k.session, CKM_ECDSA_SHA256, k.private), CKR_OK);
    let (rv, len) = query_with(&sign, s, 0);
    assert_rv!(rv, CKR_OK, "C_Sign length query");
    assert_eq!(len, 64);
    // Mixing styles: refused, and nothing is signed (it used to sign the empty message).
    let (rv, _, buf) = call_with(&sign_final_call, s, 128);
    assert_rv!(
        rv,
        CKR_OPERATION_ACTIVE,
        "C_SignFinal after a C_Sign length query"
    );
    assert!(
        buf.iter().all(|&b| b == 0xA5),
        "C_SignFinal wrote a signature"
    );
    assert_rv!(
        sign_update(s, b"more"),
        CKR_OPERATION_ACTIVE,
        "C_SignUpdate after C_Sign"
    );
    // The single-part operation is still there and signs the data C_Sign is given.
    let (rv, len, buf) = call_with(&sign, s, 128);
    assert_rv!(rv, CKR_OK, "C_Sign after the refused calls");
    assert_eq!(len, 64);
    let digest = normalize_digest(&sha256(b"the message"));
    assert!(
        verify_prehash(&k.point, &digest, &buf[..64]),
        "signature over the message"
    );
}

#[test]
fn sign_after_a_sign_update_is_operation_active() {
    let t = Token::new();
    let k = signer(&t);
    let s = k.session.handle();
    let sign = sign_call(b"other data");
    assert_rv!(sign_init(&k.session, CKM_ECDSA_SHA256, k.private), CKR_OK);
    assert_rv!(sign_update(s, b"multi"), CKR_OK);
    let (rv, _, buf) = call_with(&sign, s, 128);
    assert_rv!(rv, CKR_OPERATION_ACTIVE, "C_Sign after C_SignUpdate");
    assert!(buf.iter().all(|&b| b == 0xA5), "C_Sign wrote a signature");
    let (rv, _) = query_with(&sign, s, 0);
    assert_rv!(
        rv,
        CKR_OPERATION_ACTIVE,
        "C_Sign length query after C_SignUpdate"
    );
    // The multi-part operation survives and signs what was fed to it.
    assert_rv!(sign_update(s, b"-part"), CKR_OK);
    let (rv, len, buf) = call_with(&sign_final_call, s, 128);
    assert_rv!(rv, CKR_OK, "C_SignFinal");
    assert_eq!(len, 64);
    let digest = normalize_digest(&sha256(b"multi-part"));
    assert!(
        verify_prehash(&k.point, &digest, &buf[..64]),
        "signature over the parts"
    );
}

#[test]
fn digest_styles_do_not_mix() {
    let t = Token::new();
    let session = t.session();
    let s = session.handle();
    let digest = digest_call(b"abc");

    // C_Digest length query, then C_DigestFinal: refused (it used to give the SHA-256 of nothing).
    assert_rv!(digest_init(s, CKM_SHA256), CKR_OK);
    let (rv, len) = query_with(&digest, s, 0);
    assert_rv!(rv, CKR_OK);
    assert_eq!(len, 32);
    let (rv, _, buf) = call_with(&digest_final_call, s, 128);
    assert_rv!(
        rv,
        CKR_OPERATION_ACTIVE,
        "C_DigestFinal after a C_Digest length query"
    );
    assert!(buf.iter().all(|&b| b == 0xA5));
    assert_rv!(
        digest_update(s, b"x"),
        CKR_OPERATION_ACTIVE,
        "C_DigestUpdate after C_Digest"
    );
    let (rv, len, buf) = call_with(&digest, s, 128);
    assert_rv!(rv, CKR_OK);
    assert_eq!(&buf[..len as usize], &sha256(b"abc"));

    // C_DigestUpdate, then C_Digest: CKR_OPERATION_ACTIVE (it used to be CKR_FUNCTION_FAILED).
    assert_rv!(digest_init(s, CKM_SHA256), CKR_OK);
    assert_rv!(digest_update(s, b"ab"), CKR_OK);
    let (rv, _, _) = call_with(&digest, s, 128);
    assert_rv!(rv, CKR_OPERATION_ACTIVE, "C_Digest after C_DigestUpdate");
    assert_rv!(digest_update(s, b"c"), CKR_OK);
    let (rv, len, buf) = call_with(&digest_final_call, s, 128);
    assert_rv!(rv, CKR_OK);
    assert_eq!(&buf[..len as usize], &sha256(b"abc"));
}

#[test]
fn verify_after_verify_update_is_operation_active() {
    let t = Token::new();
    let k = signer(&t);
    let s = k.session.handle();
    let msg = b"verified in parts";
    let sig = k
        .session
        .sign(&cryptoki::mechanism::Mechanism::EcdsaSha256, k.private, msg)
        .expect("C_Sign");
    let mut m = mech(CKM_ECDSA_SHA256);
    // SAFETY: live mechanism; the private key verifies too.
    assert_rv!(
        unsafe { ck!(C_VerifyInit)(s, &mut m, k.private.handle()) },
        CKR_OK
    );
    // SAFETY: readable buffers of the stated lengths.
    let rv = unsafe { ck!(C_VerifyUpdate)(s, msg.as_ptr() as *mut u8, msg.len() as CK_ULONG) };
    assert_rv!(rv, CKR_OK);
    // SAFETY: as above.
    let rv = unsafe {
        ck!(C_Verify)(
            s,
            msg.as_ptr() as *mut u8,
            msg.len() as CK_ULONG,
            sig.as_ptr() as *mut u8,
            64,
        )
    };
    assert_rv!(rv, CKR_OPERATION_ACTIVE, "C_Verify after C_VerifyUpdate");
    // SAFETY: as above.
    let rv = unsafe { ck!(C_VerifyFinal)(s, sig.as_ptr() as *mut u8, 64) };
    assert_rv!(rv, CKR_OK, "C_VerifyFinal over the parts");
}

#[test]
fn ecdsa_is_single_part_only() {
    let t = Token::new();
    let k = signer(&t);
    let s = k.session.handle();
    assert_rv!(sign_init(&k.session, CKM_ECDSA, k.private), CKR_OK);
    assert_rv!(
        sign_update(s, &[1u8; 32]),
        CKR_FUNCTION_NOT_SUPPORTED,
        "C_SignUpdate with CKM_ECDSA"
    );
    // The refusal ended the operation.
    let (rv, _, _) = call_with(&sign_final_call, s, 128);
    assert_rv!(rv, CKR_OPERATION_NOT_INITIALIZED);
    // C_SignFinal straight after C_SignInit is a multi-part call too.
    assert_rv!(sign_init(&k.session, CKM_ECDSA, k.private), CKR_OK);
    let (rv, _, buf) = call_with(&sign_final_call, s, 128);
    assert_rv!(rv, CKR_FUNCTION_NOT_SUPPORTED, "C_SignFinal with CKM_ECDSA");
    assert!(buf.iter().all(|&b| b == 0xA5));
    // Single-part CKM_ECDSA still works.
    assert_rv!(sign_init(&k.session, CKM_ECDSA, k.private), CKR_OK);
    let sign = sign_call(&[7u8; 32]);
    let (rv, _, buf) = call_with(&sign, s, 128);
    assert_rv!(rv, CKR_OK);
    assert!(verify_prehash(&k.point, &[7u8; 32], &buf[..64]));
    // And C_VerifyUpdate with it is refused the same way.
    let mut m = mech(CKM_ECDSA);
    // SAFETY: live mechanism.
    assert_rv!(
        unsafe { ck!(C_VerifyInit)(s, &mut m, k.private.handle()) },
        CKR_OK
    );
    // SAFETY: 32 readable bytes.
    let rv = unsafe { ck!(C_VerifyUpdate)(s, [7u8; 32].as_ptr() as *mut u8, 32) };
    assert_rv!(
        rv,
        CKR_FUNCTION_NOT_SUPPORTED,
        "C_VerifyUpdate with CKM_ECDSA"
    );
}

/// Calls a selection of the unsupported functions with plausible arguments.
fn unsupported_calls(s: CK_SESSION_HANDLE) -> Vec<(&'static str, CK_RV)> {
    let mut m = mech(CKM_AES_CBC);
    let mut buf = [0u8; 64];
    let mut handle: CK_OBJECT_HANDLE = 0;
    let mut pin = *b"123456";
    // SAFETY: every pointer points to a live local of the right type and size.
    unsafe {
        vec![
            ("C_EncryptInit", ck!(C_EncryptInit)(s, &mut m, 1)),
            ("C_DecryptInit", ck!(C_DecryptInit)(s, &mut m, 1)),
            (
                "C_InitToken",
                ck!(C_InitToken)(0, pin.as_mut_ptr(), 6, buf.as_mut_ptr()),
            ),
            ("C_InitPIN", ck!(C_InitPIN)(s, pin.as_mut_ptr(), 6)),
            (
                "C_SetPIN",
                ck!(C_SetPIN)(s, pin.as_mut_ptr(), 6, pin.as_mut_ptr(), 6),
            ),
            (
                "C_GenerateKey",
                ck!(C_GenerateKey)(s, &mut m, ptr::null_mut(), 0, &mut handle),
            ),
            ("C_DigestKey", ck!(C_DigestKey)(s, 1)),
            ("C_SignRecoverInit", ck!(C_SignRecoverInit)(s, &mut m, 1)),
            ("C_GetFunctionStatus", ck!(C_GetFunctionStatus)(s)),
            ("C_CancelFunction", ck!(C_CancelFunction)(s)),
        ]
    }
}

#[test]
fn unsupported_functions_answer_not_initialized_first() {
    let mut t = Token::uninitialized();
    let wrong: Vec<String> = unsupported_calls(1)
        .into_iter()
        .filter(|(_, rv)| *rv != CKR_CRYPTOKI_NOT_INITIALIZED)
        .map(|(name, rv)| format!("{name} -> {}", rv_name(rv)))
        .collect();
    assert!(wrong.is_empty(), "before C_Initialize: {wrong:?}");
    t.initialize();
    let s = t.session();
    for (name, rv) in unsupported_calls(s.handle()) {
        let want = if matches!(name, "C_GetFunctionStatus" | "C_CancelFunction") {
            CKR_FUNCTION_NOT_PARALLEL
        } else {
            CKR_FUNCTION_NOT_SUPPORTED
        };
        assert_rv!(rv, want, "{name} once initialized");
    }
}

#[test]
fn session_handle_is_checked_before_the_mechanism() {
    let t = Token::new();
    let k = signer(&t);
    let bad: CK_SESSION_HANDLE = 0xDEAD_BEEF;
    let key = k.private.handle();
    let mut rsa_gen = mech(CKM_RSA_PKCS_KEY_PAIR_GEN);
    let mut rsa = mech(CKM_RSA_PKCS);
    let mut md5 = mech(CKM_MD5);
    let (mut hpub, mut hpriv): (CK_OBJECT_HANDLE, CK_OBJECT_HANDLE) = (0, 0);
    // SAFETY: every pointer is NULL or points to a live local of the right type.
    let results = unsafe {
        [
            (
                "C_GenerateKeyPair",
                ck!(C_GenerateKeyPair)(
                    bad,
                    &mut rsa_gen,
                    ptr::null_mut(),
                    0,
                    ptr::null_mut(),
                    0,
                    &mut hpub,
                    &mut hpriv,
                ),
            ),
            ("C_SignInit", ck!(C_SignInit)(bad, &mut rsa, key)),
            (
                "C_SignInit (NULL mechanism)",
                ck!(C_SignInit)(bad, ptr::null_mut(), key),
            ),
            ("C_VerifyInit", ck!(C_VerifyInit)(bad, &mut rsa, key)),
            ("C_DigestInit", ck!(C_DigestInit)(bad, &mut md5)),
        ]
    };
    for (name, rv) in results {
        assert_rv!(
            rv,
            CKR_SESSION_HANDLE_INVALID,
            "{name} on an invalid session"
        );
    }
    // On a valid session the mechanism is still judged.
    let s = k.session.handle();
    // SAFETY: as above.
    let rv = unsafe {
        ck!(C_GenerateKeyPair)(
            s,
            &mut rsa_gen,
            ptr::null_mut(),
            0,
            ptr::null_mut(),
            0,
            &mut hpub,
            &mut hpriv,
        )
    };
    assert_rv!(rv, CKR_MECHANISM_INVALID);
}

#[test]
fn get_interface_offers_only_the_versions_it_has() {
    let _t = Token::uninitialized();
    let lib = common::raw_lib();
    let mut name = *b"PKCS 11\0";
    for (major, minor, ok) in [
        (3u8, 0u8, true),
        (2, 40, true),
        (2, 0, false),
        (2, 11, false),
        (2, 20, false),
        (2, 41, false),
        (3, 1, false),
    ] {
        let mut v = CK_VERSION { major, minor };
        let mut iface: *mut CK_INTERFACE = ptr::null_mut();
        // SAFETY: NUL-terminated name, live version and out-pointer.
        let rv = unsafe { lib.C_GetInterface(name.as_mut_ptr(), &mut v, &mut iface, 0) };
        if ok {
            assert_rv!(rv, CKR_OK, "C_GetInterface {major}.{minor}");
            // SAFETY: the module returned a pointer to its static interface, whose function
            // list starts with a CK_VERSION.
            let got = unsafe { *((*iface).pFunctionList as *const CK_VERSION) };
            assert_eq!((got.major, got.minor), (major, minor));
        } else {
            assert_rv!(rv, CKR_ARGUMENTS_BAD, "C_GetInterface {major}.{minor}");
            assert!(
                iface.is_null(),
                "no interface handed out for {major}.{minor}"
            );
        }
    }
}

/// The secret the log test hands to C_Login: it must never reach the log.
const LOG_TEST_PIN: &str = "pin-that-must-not-be-logged-4711";

#[test]
fn failing_calls_are_logged_with_their_ckr_name() {
    let child = common::spawn_self(
        "failing_calls_log_child",
        &[
            ("DEVICEKEY_LOG", "debug".into()),
            ("DEVICEKEY_LOG_FILE", String::new()),
        ],
    );
    let out = child.wait_with_output().expect("child test");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "child failed: {}\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    let has = |a: &str, b: &str| stderr.lines().any(|l| l.contains(a) && l.contains(b));
    assert!(
        has("C_SignInit", "CKR_MECHANISM_INVALID"),
        "no log line names C_SignInit and CKR_MECHANISM_INVALID:\n{stderr}"
    );
    assert!(
        has("C_Login", "CKR_USER_TYPE_INVALID"),
        "no log line for the failing C_Login:\n{stderr}"
    );
    assert!(
        has("C_EncryptInit", "CKR_FUNCTION_NOT_SUPPORTED"),
        "unsupported functions log too:\n{stderr}"
    );
    assert!(!stderr.contains(LOG_TEST_PIN), "the PIN reached the log");
    assert!(
        !stderr.lines().any(|l| l.contains("C_GetInfo")),
        "a successful call was logged as failing:\n{stderr}"
    );
}

/// Child of `failing_calls_are_logged_with_their_ckr_name`: runs with DEVICEKEY_LOG=debug.
#[test]
#[ignore]
fn failing_calls_log_child() {
    let t = Token::new();
    let k = signer(&t);
    assert_rv!(
        sign_init(&k.session, CKM_RSA_PKCS, k.private),
        CKR_MECHANISM_INVALID
    );
    let mut pin = LOG_TEST_PIN.as_bytes().to_vec();
    // SAFETY: the PIN buffer is readable for its length.
    let rv = unsafe {
        ck!(C_Login)(
            k.session.handle(),
            77,
            pin.as_mut_ptr(),
            pin.len() as CK_ULONG,
        )
    };
    assert_rv!(rv, CKR_USER_TYPE_INVALID);
    let mut m = mech(CKM_AES_CBC);
    // SAFETY: live mechanism.
    let rv = unsafe { ck!(C_EncryptInit)(k.session.handle(), &mut m, 1) };
    assert_rv!(rv, CKR_FUNCTION_NOT_SUPPORTED);
    t.ctx.get_library_info().expect("C_GetInfo");
}
