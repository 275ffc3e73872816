//! C_GetOperationState / C_SetOperationState through the built `.so`: a digest's state is
//! saved mid-way and restored in another session, and both sessions finish with the right digest
//! (what OpenSSL's pkcs11 provider does when it copies a TLS handshake hash); a garbage or
//! altered state is refused with `CKR_SAVED_STATE_INVALID`; signing refuses to be saved
//! (`CKR_STATE_UNSAVEABLE`); a digest needs no keys (`CKR_KEY_NOT_NEEDED`).

#[macro_use]
extern crate testkit as common;

use std::ptr;

use common::{gen_p256, mech, rv_name, sha256, sign_init, Token};
use cryptoki::session::Session;
use cryptoki_sys::*;

fn digest_init(s: &Session, m: CK_MECHANISM_TYPE) -> CK_RV {
    let mut m = mech(m);
    // SAFETY: m is a live CK_MECHANISM without parameters.
    unsafe { ck!(C_DigestInit)(s.handle(), &mut m) }
}

fn digest_update(s: &Session, data: &[u8]) -> CK_RV {
    // SAFETY: data is readable for its length.
    unsafe { ck!(C_DigestUpdate)(s.handle(), data.as_ptr() as *mut u8, data.len() as CK_ULONG) }
}

fn digest_final(s: &Session) -> Vec<u8> {
    let mut out = vec![0u8; 64];
    let mut len = out.len() as CK_ULONG;
    // SAFETY: out has `len` writable bytes; len is a live CK_ULONG.
    let rv = unsafe { ck!(C_DigestFinal)(s.handle(), out.as_mut_ptr(), &mut len) };
    assert_eq!(rv, CKR_OK, "C_DigestFinal: {}", rv_name(rv));
    out.truncate(len as usize);
    out
}

/// C_GetOperationState: the length query, then the state; (rv, state).
fn get_state(s: &Session) -> (CK_RV, Vec<u8>) {
    let mut len: CK_ULONG = 0;
    // SAFETY: a NULL output asks for the length; len is a live CK_ULONG.
    let rv = unsafe { ck!(C_GetOperationState)(s.handle(), ptr::null_mut(), &mut len) };
    if rv != CKR_OK {
        return (rv, Vec::new());
    }
    let mut state = vec![0u8; len as usize];
    // A buffer one byte short is refused with the length, and the operation goes on.
    let mut short = len - 1;
    // SAFETY: state has at least `short` writable bytes.
    let rv = unsafe { ck!(C_GetOperationState)(s.handle(), state.as_mut_ptr(), &mut short) };
    assert_eq!(rv, CKR_BUFFER_TOO_SMALL, "short buffer: {}", rv_name(rv));
    assert_eq!(short, len);
    // SAFETY: state has `len` writable bytes.
    let rv = unsafe { ck!(C_GetOperationState)(s.handle(), state.as_mut_ptr(), &mut len) };
    state.truncate(len as usize);
    (rv, state)
}

fn set_state(s: &Session, state: &[u8], enc: CK_OBJECT_HANDLE, auth: CK_OBJECT_HANDLE) -> CK_RV {
    // SAFETY: state is readable for its length.
    unsafe {
        ck!(C_SetOperationState)(
            s.handle(),
            state.as_ptr() as *mut u8,
            state.len() as CK_ULONG,
            enc,
            auth,
        )
    }
}

#[test]
fn a_digest_saved_mid_way_finishes_alike_in_another_session() {
    let t = Token::new();
    let a = t.session();
    let b = t.session();
    assert_eq!(digest_init(&a, CKM_SHA256), CKR_OK);
    assert_eq!(digest_update(&a, b"client hello, "), CKR_OK);
    assert_eq!(digest_update(&a, b"server hello, "), CKR_OK);
    let (rv, state) = get_state(&a);
    assert_eq!(rv, CKR_OK, "C_GetOperationState: {}", rv_name(rv));
    // The restored session needs no C_DigestInit of its own.
    assert_eq!(set_state(&b, &state, 0, 0), CKR_OK);
    assert_eq!(digest_update(&a, b"finished"), CKR_OK);
    assert_eq!(digest_update(&b, b"finished"), CKR_OK);
    let expected = sha256(b"client hello, server hello, finished").to_vec();
    assert_eq!(digest_final(&a), expected);
    assert_eq!(digest_final(&b), expected);
}

#[test]
fn sha384_and_sha512_states_restore_too_and_the_copy_is_independent() {
    use sha2::Digest;
    let t = Token::new();
    for m in [CKM_SHA384, CKM_SHA512] {
        let a = t.session();
        let b = t.session();
        assert_eq!(digest_init(&a, m), CKR_OK);
        assert_eq!(digest_update(&a, b"part one "), CKR_OK);
        let (rv, state) = get_state(&a);
        assert_eq!(rv, CKR_OK);
        assert_eq!(set_state(&b, &state, 0, 0), CKR_OK);
        assert_eq!(digest_update(&a, b"goes on"), CKR_OK);
        assert_eq!(digest_update(&b, b"diverges"), CKR_OK);
        let (ea, eb) = if m == CKM_SHA384 {
            (
                sha2::Sha384::digest(b"part one goes on").to_vec(),
                sha2::Sha384::digest(b"part one diverges").to_vec(),
            )
        } else {
            (
                sha2::Sha512::digest(b"part one goes on").to_vec(),
                sha2::Sha512::digest(b"part one diverges").to_vec(),
            )
        };
        assert_eq!(digest_final(&a), ea);
        assert_eq!(digest_final(&b), eb);
    }
}

#[test]
fn a_garbage_or_altered_state_is_refused() {
    let t = Token::new();
    let a = t.session();
    let b = t.session();
    assert_eq!(digest_init(&a, CKM_SHA256), CKR_OK);
    assert_eq!(digest_update(&a, b"abc"), CKR_OK);
    let (rv, state) = get_state(&a);
    assert_eq!(rv, CKR_OK);
    let garbage = [0x5au8; 48];
    assert_eq!(set_state(&b, &garbage, 0, 0), CKR_SAVED_STATE_INVALID);
    assert_eq!(set_state(&b, &[], 0, 0), CKR_SAVED_STATE_INVALID);
    let mut altered = state.clone();
    let mid = altered.len() / 2;
    altered[mid] ^= 1;
    assert_eq!(set_state(&b, &altered, 0, 0), CKR_SAVED_STATE_INVALID);
    assert_eq!(
        set_state(&b, &state[..state.len() - 1], 0, 0),
        CKR_SAVED_STATE_INVALID
    );
    // Nothing was restored: b has no digest running.
    assert_eq!(digest_update(&b, b"x"), CKR_OPERATION_NOT_INITIALIZED);
    // A digest needs no keys.
    assert_eq!(set_state(&b, &state, 1, 0), CKR_KEY_NOT_NEEDED);
    // The source is untouched by all this.
    assert_eq!(digest_final(&a), sha256(b"abc").to_vec());
}

#[test]
fn signing_is_unsaveable_and_no_operation_is_not_initialized() {
    let t = Token::new();
    let s = t.session();
    let (rv, _) = get_state(&s);
    assert_eq!(rv, CKR_OPERATION_NOT_INITIALIZED, "{}", rv_name(rv));
    let (_, private) = gen_p256(&s, "state", false);
    assert_eq!(sign_init(&s, CKM_ECDSA_SHA256, private), CKR_OK);
    // SAFETY: readable data.
    let rv = unsafe { ck!(C_SignUpdate)(s.handle(), b"abc".as_ptr() as *mut u8, 3) };
    assert_eq!(rv, CKR_OK);
    let (rv, _) = get_state(&s);
    assert_eq!(rv, CKR_STATE_UNSAVEABLE, "{}", rv_name(rv));
    // A digest next to the signature does not make it saveable.
    assert_eq!(digest_init(&s, CKM_SHA256), CKR_OK);
    let (rv, _) = get_state(&s);
    assert_eq!(rv, CKR_STATE_UNSAVEABLE, "{}", rv_name(rv));
}

#[test]
fn a_digest_longer_than_the_bound_is_unsaveable_but_goes_on() {
    let t = Token::new();
    let s = t.session();
    assert_eq!(digest_init(&s, CKM_SHA256), CKR_OK);
    let chunk = vec![7u8; 64 * 1024];
    for _ in 0..5 {
        assert_eq!(digest_update(&s, &chunk), CKR_OK);
    }
    let (rv, _) = get_state(&s);
    assert_eq!(rv, CKR_STATE_UNSAVEABLE, "{}", rv_name(rv));
    assert_eq!(digest_final(&s), sha256(&chunk.repeat(5)).to_vec());
}
