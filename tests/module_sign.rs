//! PKCS#11 signing, verification and digest rules: the C_Sign length-query and buffer-too-small
//! rules (raw ABI), CKM_ECDSA digest lengths, CKM_ECDSA_SHA256/384/512 single- and multi-part,
//! C_Verify, and the SHA-2 digests.

#[macro_use]
extern crate testkit as common;

use std::ptr;

use common::{
    expect_err, gen_p256, mech, normalize_digest, public_point, sha256, sign_init, sign_raw,
    verify_prehash, Token,
};
use cryptoki::error::RvError;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use cryptoki_sys::*;
use sha2::Digest;

fn sign_final_raw(s: &Session, buf_len: Option<usize>) -> (CK_RV, CK_ULONG, Vec<u8>) {
    let mut buf = vec![0xAAu8; 100];
    let mut len: CK_ULONG = buf_len.unwrap_or(0) as CK_ULONG;
    let out = if buf_len.is_some() {
        buf.as_mut_ptr()
    } else {
        ptr::null_mut()
    };
    // SAFETY: out is NULL or has 100 >= len bytes.
    let rv = unsafe { ck!(C_SignFinal)(s.handle(), out, &mut len) };
    (rv, len, buf)
}

fn sign_update_raw(s: &Session, data: &[u8]) -> CK_RV {
    // SAFETY: data is readable for data.len() bytes.
    unsafe { ck!(C_SignUpdate)(s.handle(), data.as_ptr() as *mut u8, data.len() as CK_ULONG) }
}

struct Key {
    private: ObjectHandle,
    public: ObjectHandle,
    point: Vec<u8>,
}

fn key(s: &Session) -> Key {
    let (public, private) = gen_p256(s, "signer", false);
    Key {
        private,
        public,
        point: public_point(s, public),
    }
}

#[test]
fn sign_length_query_then_sign_gives_one_signature() {
    let t = Token::new();
    let s = t.session();
    let k = key(&s);
    let digest = sha256(b"length query");

    assert_rv!(sign_init(&s, CKM_ECDSA, k.private), CKR_OK);
    let (rv, len, _) = sign_raw(&s, &digest, None);
    assert_rv!(rv, CKR_OK, "length query");
    assert_eq!(len, 64, "P-256 signature length");
    // The operation is still alive: the real call signs.
    let (rv, len, buf) = sign_raw(&s, &digest, Some(64));
    assert_rv!(rv, CKR_OK, "C_Sign after the length query");
    assert_eq!(len, 64);
    assert!(
        verify_prehash(&k.point, &digest, &buf[..64]),
        "signature verifies"
    );
    assert!(buf[64..].iter().all(|&b| b == 0xAA), "wrote past 64 bytes");
    // ...and ends the operation: exactly one signature.
    let (rv, _, _) = sign_raw(&s, &digest, Some(64));
    assert_rv!(
        rv,
        CKR_OPERATION_NOT_INITIALIZED,
        "C_Sign after a completed signature"
    );

    // Same with the hashing mechanism.
    assert_rv!(sign_init(&s, CKM_ECDSA_SHA256, k.private), CKR_OK);
    let (rv, len, _) = sign_raw(&s, b"message", None);
    assert_rv!(rv, CKR_OK);
    assert_eq!(len, 64);
    let (rv, _, buf) = sign_raw(&s, b"message", Some(80));
    assert_rv!(rv, CKR_OK);
    assert!(verify_prehash(&k.point, &sha256(b"message"), &buf[..64]));
    let (rv, _, _) = sign_raw(&s, b"message", Some(64));
    assert_rv!(rv, CKR_OPERATION_NOT_INITIALIZED);
}

#[test]
fn sign_buffer_too_small_keeps_operation_alive() {
    let t = Token::new();
    let s = t.session();
    let k = key(&s);
    let digest = sha256(b"too small");
    assert_rv!(sign_init(&s, CKM_ECDSA, k.private), CKR_OK);
    let (rv, len, buf) = sign_raw(&s, &digest, Some(10));
    assert_rv!(rv, CKR_BUFFER_TOO_SMALL);
    assert_eq!(len, 64, "BUFFER_TOO_SMALL reports the needed length");
    assert!(
        buf[10..].iter().all(|&b| b == 0xAA),
        "wrote past the announced 10 bytes"
    );
    let (rv, _, _) = sign_raw(&s, &digest, Some(63));
    assert_rv!(rv, CKR_BUFFER_TOO_SMALL, "63 bytes is still too small");
    let (rv, len, buf) = sign_raw(&s, &digest, Some(64));
    assert_rv!(rv, CKR_OK, "the operation survived CKR_BUFFER_TOO_SMALL");
    assert_eq!(len, 64);
    assert!(verify_prehash(&k.point, &digest, &buf[..64]));
    let (rv, _, _) = sign_raw(&s, &digest, Some(64));
    assert_rv!(rv, CKR_OPERATION_NOT_INITIALIZED);
}

#[test]
fn sign_final_length_query_and_too_small_keep_operation_alive() {
    let t = Token::new();
    let s = t.session();
    let k = key(&s);
    assert_rv!(sign_init(&s, CKM_ECDSA_SHA256, k.private), CKR_OK);
    assert_rv!(sign_update_raw(&s, b"multi"), CKR_OK);
    assert_rv!(sign_update_raw(&s, b"-part"), CKR_OK);
    let (rv, len, _) = sign_final_raw(&s, None);
    assert_rv!(rv, CKR_OK, "C_SignFinal length query");
    assert_eq!(len, 64);
    let (rv, len, _) = sign_final_raw(&s, Some(32));
    assert_rv!(rv, CKR_BUFFER_TOO_SMALL);
    assert_eq!(len, 64);
    let (rv, len, buf) = sign_final_raw(&s, Some(64));
    assert_rv!(rv, CKR_OK);
    assert_eq!(len, 64);
    assert!(verify_prehash(&k.point, &sha256(b"multi-part"), &buf[..64]));
    let (rv, _, _) = sign_final_raw(&s, Some(64));
    assert_rv!(rv, CKR_OPERATION_NOT_INITIALIZED);
}

#[test]
fn sign_errors_end_the_operation() {
    let t = Token::new();
    let s = t.session();
    let k = key(&s);
    let digest = sha256(b"errors");

    // Without C_SignInit.
    let (rv, _, _) = sign_raw(&s, &digest, Some(64));
    assert_rv!(rv, CKR_OPERATION_NOT_INITIALIZED);
    assert_rv!(sign_update_raw(&s, b"x"), CKR_OPERATION_NOT_INITIALIZED);

    // A bad data length ends the operation.
    assert_rv!(sign_init(&s, CKM_ECDSA, k.private), CKR_OK);
    let (rv, _, _) = sign_raw(&s, &[0u8; 33], Some(64));
    assert_rv!(rv, CKR_DATA_LEN_RANGE);
    let (rv, _, _) = sign_raw(&s, &digest, Some(64));
    assert_rv!(
        rv,
        CKR_OPERATION_NOT_INITIALIZED,
        "operation ended by the error"
    );

    // NULL length pointer: refused, and the operation ends.
    assert_rv!(sign_init(&s, CKM_ECDSA, k.private), CKR_OK);
    let mut buf = [0u8; 64];
    // SAFETY: valid data and output; the length pointer is NULL on purpose.
    let rv = unsafe {
        ck!(C_Sign)(
            s.handle(),
            digest.as_ptr() as *mut u8,
            32,
            buf.as_mut_ptr(),
            ptr::null_mut(),
        )
    };
    assert_rv!(rv, CKR_ARGUMENTS_BAD);
    let (rv, _, _) = sign_raw(&s, &digest, Some(64));
    assert_rv!(rv, CKR_OPERATION_NOT_INITIALIZED);

    // A second C_SignInit while one is active.
    assert_rv!(sign_init(&s, CKM_ECDSA, k.private), CKR_OK);
    assert_rv!(sign_init(&s, CKM_ECDSA, k.private), CKR_OPERATION_ACTIVE);
    let (rv, _, buf) = sign_raw(&s, &digest, Some(64));
    assert_rv!(rv, CKR_OK, "the first operation is intact");
    assert!(verify_prehash(&k.point, &digest, &buf[..64]));

    // Unsupported mechanisms and NULL mechanism.
    assert_rv!(
        sign_init(&s, CKM_ECDSA_SHA1, k.private),
        CKR_MECHANISM_INVALID
    );
    assert_rv!(sign_init(&s, CKM_SHA256, k.private), CKR_MECHANISM_INVALID);
    assert_rv!(
        sign_init(&s, CKM_RSA_PKCS, k.private),
        CKR_MECHANISM_INVALID
    );
    // SAFETY: NULL mechanism must be refused (or, in 3.0, cancel; nothing is active here).
    let rv = unsafe { ck!(C_SignInit)(s.handle(), ptr::null_mut(), k.private.handle()) };
    assert_ne!(
        rv, CKR_OK,
        "C_SignInit(NULL mechanism) must not start an operation"
    );
    let (rv, _, _) = sign_raw(&s, &digest, Some(64));
    assert_rv!(rv, CKR_OPERATION_NOT_INITIALIZED);
    // Sign with the public key.
    let rv = sign_init(&s, CKM_ECDSA, k.public);
    assert!(
        rv == CKR_KEY_TYPE_INCONSISTENT || rv == CKR_KEY_FUNCTION_NOT_PERMITTED,
        "C_SignInit(public key): {}",
        common::rv_name(rv)
    );
}

/// A digest-like input with the high bits set, so padding and truncation both matter.
fn input(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| 0xF0 ^ (i as u8).wrapping_mul(37))
        .collect()
}

#[test]
fn ecdsa_accepts_spec_digest_lengths() {
    let t = Token::new();
    let s = t.session();
    let k = key(&s);
    for len in [20usize, 28, 32, 48, 64] {
        let d = input(len);
        let sig = s
            .sign(&Mechanism::Ecdsa, k.private, &d)
            .unwrap_or_else(|e| panic!("CKM_ECDSA over {len} bytes: {e}"));
        assert_eq!(sig.len(), 64);
        let e = normalize_digest(&d);
        assert!(
            verify_prehash(&k.point, &e, &sig),
            "{len}-byte input: signature must be over the {} (spec: left-pad shorter, keep leftmost 32 bytes of longer)",
            if len < 32 { "left-padded integer" } else { "leftmost 32 bytes" }
        );
        s.verify(&Mechanism::Ecdsa, k.public, &d, &sig)
            .unwrap_or_else(|e| panic!("C_Verify CKM_ECDSA over {len} bytes: {e}"));
    }
}

#[test]
fn ecdsa_other_digest_lengths_are_data_len_range() {
    let t = Token::new();
    let s = t.session();
    let k = key(&s);
    for len in [0usize, 1, 16, 19, 21, 31, 33, 47, 63, 65, 100] {
        expect_err(
            s.sign(&Mechanism::Ecdsa, k.private, &input(len)),
            &[RvError::DataLenRange],
        );
    }
}

fn sha(mech: &Mechanism, data: &[u8]) -> Vec<u8> {
    match mech {
        Mechanism::EcdsaSha256 | Mechanism::Sha256 => sha2::Sha256::digest(data).to_vec(),
        Mechanism::EcdsaSha384 | Mechanism::Sha384 => sha2::Sha384::digest(data).to_vec(),
        Mechanism::EcdsaSha512 | Mechanism::Sha512 => sha2::Sha512::digest(data).to_vec(),
        other => panic!("no hash for {other:?}"),
    }
}

const ECDSA_SHA: [Mechanism<'static>; 3] = [
    Mechanism::EcdsaSha256,
    Mechanism::EcdsaSha384,
    Mechanism::EcdsaSha512,
];

#[test]
fn ecdsa_sha2_single_part_verifies() {
    let t = Token::new();
    let s = t.session();
    let k = key(&s);
    let msg: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
    for m in ECDSA_SHA {
        let sig = s
            .sign(&m, k.private, &msg)
            .unwrap_or_else(|e| panic!("{m:?}: {e}"));
        assert_eq!(sig.len(), 64, "{m:?}");
        let e = normalize_digest(&sha(&m, &msg));
        assert!(
            verify_prehash(&k.point, &e, &sig),
            "{m:?} signature verifies"
        );
        // Empty message too.
        let sig = s.sign(&m, k.private, b"").expect("empty message");
        assert!(
            verify_prehash(&k.point, &normalize_digest(&sha(&m, b"")), &sig),
            "{m:?} empty"
        );
    }
}

#[test]
fn ecdsa_sha2_multi_part_verifies() {
    let t = Token::new();
    let s = t.session();
    let k = key(&s);
    let parts: [&[u8]; 4] = [b"device", b"", b"key ", &[0u8; 300]];
    let whole: Vec<u8> = parts.concat();
    for m in ECDSA_SHA {
        s.sign_init(&m, k.private).expect("C_SignInit");
        for p in parts {
            s.sign_update(p).expect("C_SignUpdate");
        }
        let sig = s.sign_final().expect("C_SignFinal");
        assert_eq!(sig.len(), 64);
        assert!(
            verify_prehash(&k.point, &normalize_digest(&sha(&m, &whole)), &sig),
            "{m:?} multi-part signature is over the concatenation"
        );
    }
    // CKM_ECDSA is single-part only (or, if multi-part, still over the digest bytes).
    s.sign_init(&Mechanism::Ecdsa, k.private)
        .expect("C_SignInit");
    match s.sign_update(&[1u8; 32]) {
        Err(e) => {
            let _ = e;
        }
        Ok(()) => {
            let sig = s.sign_final().expect("C_SignFinal");
            assert!(verify_prehash(&k.point, &[1u8; 32], &sig));
        }
    }
}

#[test]
fn verify_accepts_good_and_rejects_bad_signatures() {
    let t = Token::new();
    let s = t.session();
    let k = key(&s);
    let msg = b"verify me";
    for m in ECDSA_SHA {
        let sig = s.sign(&m, k.private, msg).expect("sign");
        s.verify(&m, k.public, msg, &sig).expect("good signature");
        let mut bad = sig.clone();
        bad[10] ^= 0x01;
        expect_err(
            s.verify(&m, k.public, msg, &bad),
            &[RvError::SignatureInvalid],
        );
        expect_err(
            s.verify(&m, k.public, b"other message", &sig),
            &[RvError::SignatureInvalid],
        );
        expect_err(
            s.verify(&m, k.public, msg, &sig[..63]),
            &[RvError::SignatureLenRange],
        );
        let mut long = sig.clone();
        long.push(0);
        expect_err(
            s.verify(&m, k.public, msg, &long),
            &[RvError::SignatureLenRange],
        );
        // r = 0, s = 0.
        expect_err(
            s.verify(&m, k.public, msg, &[0u8; 64]),
            &[RvError::SignatureInvalid],
        );

        // Multi-part.
        s.verify_init(&m, k.public).expect("C_VerifyInit");
        s.verify_update(b"verify ").expect("C_VerifyUpdate");
        s.verify_update(b"me").expect("C_VerifyUpdate");
        s.verify_final(&sig).expect("C_VerifyFinal good");
        s.verify_init(&m, k.public).expect("C_VerifyInit");
        s.verify_update(msg).expect("C_VerifyUpdate");
        expect_err(s.verify_final(&bad), &[RvError::SignatureInvalid]);
    }
    // CKM_ECDSA over a digest.
    let d = sha256(msg);
    let sig = s.sign(&Mechanism::Ecdsa, k.private, &d).expect("sign");
    s.verify(&Mechanism::Ecdsa, k.public, &d, &sig)
        .expect("good");
    expect_err(
        s.verify(&Mechanism::Ecdsa, k.public, &sha256(b"x"), &sig),
        &[RvError::SignatureInvalid],
    );
    // A signature from another key.
    let other = key(&s);
    let sig2 = s.sign(&Mechanism::Ecdsa, other.private, &d).expect("sign");
    expect_err(
        s.verify(&Mechanism::Ecdsa, k.public, &d, &sig2),
        &[RvError::SignatureInvalid],
    );
}

#[test]
fn verify_failure_ends_the_operation() {
    let t = Token::new();
    let s = t.session();
    let k = key(&s);
    let d = sha256(b"once");
    let mut m = mech(CKM_ECDSA);
    let bad = [1u8; 64];
    // SAFETY: live mechanism, data and signature buffers of the stated lengths.
    unsafe {
        assert_rv!(
            ck!(C_VerifyInit)(s.handle(), &mut m, k.public.handle()),
            CKR_OK
        );
        assert_rv!(
            ck!(C_Verify)(
                s.handle(),
                d.as_ptr() as *mut u8,
                32,
                bad.as_ptr() as *mut u8,
                64
            ),
            CKR_SIGNATURE_INVALID
        );
        assert_rv!(
            ck!(C_Verify)(
                s.handle(),
                d.as_ptr() as *mut u8,
                32,
                bad.as_ptr() as *mut u8,
                64
            ),
            CKR_OPERATION_NOT_INITIALIZED
        );
    }
}

const DIGESTS: [Mechanism<'static>; 3] = [Mechanism::Sha256, Mechanism::Sha384, Mechanism::Sha512];

#[test]
fn digest_sha2_single_and_multi_part_match() {
    let t = Token::new();
    let s = t.ro_session();
    let data: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
    for m in DIGESTS {
        assert_eq!(
            s.digest(&m, &data).expect("C_Digest"),
            sha(&m, &data),
            "{m:?}"
        );
        assert_eq!(
            s.digest(&m, b"").expect("C_Digest empty"),
            sha(&m, b""),
            "{m:?} empty"
        );
        s.digest_init(&m).expect("C_DigestInit");
        for chunk in data.chunks(777) {
            s.digest_update(chunk).expect("C_DigestUpdate");
        }
        assert_eq!(
            s.digest_final().expect("C_DigestFinal"),
            sha(&m, &data),
            "{m:?} multi-part"
        );
    }
    expect_err(
        s.digest_init(&Mechanism::Ecdsa),
        &[RvError::MechanismInvalid],
    );
    expect_err(
        s.digest_init(&Mechanism::Sha1),
        &[RvError::MechanismInvalid],
    );
}

#[test]
fn digest_length_query_and_too_small_keep_operation_alive() {
    let t = Token::new();
    let s = t.ro_session();
    let mut m = mech(CKM_SHA384);
    let data = b"abc";
    let mut out = [0xAAu8; 64];
    let mut len: CK_ULONG = 0;
    let digest = |buf: *mut u8, len: &mut CK_ULONG| -> CK_RV {
        // SAFETY: `data` is 3 readable bytes; `buf` is NULL or `out` (64 writable bytes), and
        // every call passes a `len` of at most 64.
        unsafe { ck!(C_Digest)(s.handle(), data.as_ptr() as *mut u8, 3, buf, len) }
    };
    // SAFETY: live mechanism and buffers of the stated lengths throughout.
    unsafe {
        assert_rv!(
            digest(out.as_mut_ptr(), &mut len),
            CKR_OPERATION_NOT_INITIALIZED
        );
        assert_rv!(ck!(C_DigestInit)(s.handle(), &mut m), CKR_OK);
        assert_rv!(ck!(C_DigestInit)(s.handle(), &mut m), CKR_OPERATION_ACTIVE);
        len = 0;
        assert_rv!(digest(ptr::null_mut(), &mut len), CKR_OK);
        assert_eq!(len, 48);
        len = 20;
        assert_rv!(digest(out.as_mut_ptr(), &mut len), CKR_BUFFER_TOO_SMALL);
        assert_eq!(len, 48);
        assert!(out[20..].iter().all(|&b| b == 0xAA), "wrote past 20 bytes");
        len = 64;
        assert_rv!(digest(out.as_mut_ptr(), &mut len), CKR_OK);
        assert_eq!(len, 48);
        assert_eq!(&out[..48], &sha2::Sha384::digest(data)[..]);
        assert_rv!(
            digest(out.as_mut_ptr(), &mut len),
            CKR_OPERATION_NOT_INITIALIZED
        );
    }
}

#[test]
fn sign_and_digest_operations_are_per_session() {
    let t = Token::new();
    let a = t.session();
    let b = t.session();
    let k = key(&a);
    a.sign_init(&Mechanism::EcdsaSha256, k.private)
        .expect("init on a");
    // b has no operation, and can run its own.
    b.sign_init(&Mechanism::EcdsaSha384, k.private)
        .expect("init on b");
    a.sign_update(b"on a").expect("update a");
    b.sign_update(b"on b").expect("update b");
    let sa = a.sign_final().expect("final a");
    let sb = b.sign_final().expect("final b");
    assert!(verify_prehash(&k.point, &sha256(b"on a"), &sa));
    assert!(verify_prehash(
        &k.point,
        &normalize_digest(&sha2::Sha384::digest(b"on b")),
        &sb
    ));
}
