//! PKCS#11 slot, token, mechanism and session rules through `cryptoki` (and the raw ABI where
//! cryptoki hides the behaviour): slot/token info, the mechanism list, login without a PIN,
//! sessions, invalid handles, random numbers.

#[macro_use]
extern crate testkit as common;

use std::ptr;

use common::{expect_err, Token};
use cryptoki::error::RvError;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::{SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use cryptoki_sys::*;

#[test]
fn slot_list_has_one_slot_with_token() {
    let t = Token::new();
    let all = t.ctx.get_all_slots().expect("C_GetSlotList(all)");
    let with_token = t
        .ctx
        .get_slots_with_token()
        .expect("C_GetSlotList(present)");
    assert_eq!(all.len(), 1, "one configured slot: {all:?}");
    assert_eq!(with_token, all);
    let info = t.ctx.get_slot_info(all[0]).expect("C_GetSlotInfo");
    assert!(info.token_present(), "CKF_TOKEN_PRESENT");
    assert!(!info.removable_device(), "a key store is not removable");
    assert!(
        !info.slot_description().trim().is_empty(),
        "slot description"
    );
    assert!(
        !info.manufacturer_id().trim().is_empty(),
        "slot manufacturerID"
    );
}

#[test]
fn slot_list_length_query_and_buffer_too_small() {
    let _t = Token::new();
    let mut count: CK_ULONG = 0;
    // SAFETY: NULL list asks for the count.
    let rv = unsafe { ck!(C_GetSlotList)(CK_FALSE, ptr::null_mut(), &mut count) };
    assert_rv!(rv, CKR_OK);
    assert_eq!(count, 1);
    let mut zero: CK_ULONG = 0;
    let mut slot: CK_SLOT_ID = 0xdead;
    // SAFETY: a valid buffer, with a count of 0 that is too small.
    let rv = unsafe { ck!(C_GetSlotList)(CK_FALSE, &mut slot, &mut zero) };
    assert_rv!(rv, CKR_BUFFER_TOO_SMALL);
    assert_eq!(zero, 1, "BUFFER_TOO_SMALL reports the count");
    // SAFETY: NULL count pointer must be refused.
    let rv = unsafe { ck!(C_GetSlotList)(CK_FALSE, ptr::null_mut(), ptr::null_mut()) };
    assert_rv!(rv, CKR_ARGUMENTS_BAD);
}

#[test]
fn token_info_reports_class_manufacturer_and_no_login() {
    let t = Token::new();
    let info = t.ctx.get_token_info(t.slot()).expect("C_GetTokenInfo");
    assert_eq!(info.label().trim_end(), common::TOKEN_LABEL);
    assert_eq!(
        info.model().trim_end(),
        "os_protected",
        "model names the protection class"
    );
    assert_eq!(info.manufacturer_id().trim_end(), "devicekey");
    assert!(
        !info.login_required(),
        "CKF_LOGIN_REQUIRED must be unset (no PIN)"
    );
    assert!(
        info.token_initialized(),
        "CKF_TOKEN_INITIALIZED must be set"
    );
    assert!(info.rng(), "CKF_RNG: C_GenerateRandom is supported");
    assert!(!info.write_protected(), "the token accepts new keys");
    assert!(!info.serial_number().trim().is_empty(), "serial number");
}

#[test]
fn invalid_slot_is_slot_id_invalid() {
    let t = Token::new();
    let bad = Slot::try_from(0xdead_u64).expect("slot");
    expect_err(t.ctx.get_slot_info(bad), &[RvError::SlotIdInvalid]);
    expect_err(t.ctx.get_token_info(bad), &[RvError::SlotIdInvalid]);
    expect_err(t.ctx.get_mechanism_list(bad), &[RvError::SlotIdInvalid]);
    expect_err(t.ctx.open_rw_session(bad), &[RvError::SlotIdInvalid]);
}

const EXPECTED_MECHANISMS: [MechanismType; 8] = [
    MechanismType::ECC_KEY_PAIR_GEN,
    MechanismType::ECDSA,
    MechanismType::ECDSA_SHA256,
    MechanismType::ECDSA_SHA384,
    MechanismType::ECDSA_SHA512,
    MechanismType::SHA256,
    MechanismType::SHA384,
    MechanismType::SHA512,
];

#[test]
fn mechanism_list_is_exactly_the_ec_and_sha2_set() {
    let t = Token::new();
    let mut list = t
        .ctx
        .get_mechanism_list(t.slot())
        .expect("C_GetMechanismList");
    let mut want = EXPECTED_MECHANISMS.to_vec();
    list.sort_by_key(|m| **m);
    want.sort_by_key(|m| **m);
    assert_eq!(list, want);
}

#[test]
fn mechanism_info_flags_and_key_sizes() {
    let t = Token::new();
    let slot = t.slot();
    for m in EXPECTED_MECHANISMS {
        let info = t
            .ctx
            .get_mechanism_info(slot, m)
            .unwrap_or_else(|e| panic!("{m}: {e}"));
        // Nothing we offer encrypts, wraps or derives.
        assert!(
            !info.encrypt() && !info.decrypt(),
            "{m}: no encrypt/decrypt"
        );
        assert!(!info.wrap() && !info.unwrap(), "{m}: no wrap/unwrap");
        assert!(!info.derive(), "{m}: no derive");
        assert!(
            !info.sign_recover() && !info.verify_recover(),
            "{m}: no recover"
        );
        match m {
            MechanismType::ECC_KEY_PAIR_GEN => {
                assert!(info.generate_key_pair(), "{m}: CKF_GENERATE_KEY_PAIR");
                assert!(
                    !info.sign() && !info.verify() && !info.digest(),
                    "{m}: only keygen"
                );
                assert!(info.ec_f_p(), "{m}: CKF_EC_F_P");
                assert!(info.ec_from_oid(), "{m}: CKF_EC_OID (CKF_EC_NAMEDCURVE)");
                assert!(info.ec_uncompressed(), "{m}: CKF_EC_UNCOMPRESS");
                assert_eq!(
                    (info.min_key_size(), info.max_key_size()),
                    (256, 256),
                    "{m}: key sizes"
                );
            }
            MechanismType::ECDSA
            | MechanismType::ECDSA_SHA256
            | MechanismType::ECDSA_SHA384
            | MechanismType::ECDSA_SHA512 => {
                assert!(info.sign() && info.verify(), "{m}: CKF_SIGN|CKF_VERIFY");
                assert!(
                    !info.generate_key_pair() && !info.digest(),
                    "{m}: sign/verify only"
                );
                assert_eq!(
                    (info.min_key_size(), info.max_key_size()),
                    (256, 256),
                    "{m}: key sizes"
                );
            }
            _ => {
                assert!(info.digest(), "{m}: CKF_DIGEST");
                assert!(
                    !info.sign() && !info.verify() && !info.generate_key_pair(),
                    "{m}: digest only"
                );
            }
        }
    }
    expect_err(
        t.ctx.get_mechanism_info(slot, MechanismType::RSA_PKCS),
        &[RvError::MechanismInvalid],
    );
    expect_err(
        t.ctx.get_mechanism_info(slot, MechanismType::ECDSA_SHA1),
        &[RvError::MechanismInvalid],
    );
}

#[test]
fn mechanism_list_length_query_and_buffer_too_small() {
    let t = Token::new();
    let slot: CK_SLOT_ID = t.slot().into();
    let mut count: CK_ULONG = 0;
    // SAFETY: NULL list asks for the count.
    let rv = unsafe { ck!(C_GetMechanismList)(slot, ptr::null_mut(), &mut count) };
    assert_rv!(rv, CKR_OK);
    assert_eq!(count, 8);
    let mut buf = [0 as CK_MECHANISM_TYPE; 2];
    let mut small: CK_ULONG = 2;
    // SAFETY: buffer of 2, count 2 (too small).
    let rv = unsafe { ck!(C_GetMechanismList)(slot, buf.as_mut_ptr(), &mut small) };
    assert_rv!(rv, CKR_BUFFER_TOO_SMALL);
    assert_eq!(small, 8);
}

#[test]
fn login_without_pin_is_ok() {
    let t = Token::new();
    let s = t.session();
    assert_eq!(
        s.get_session_info().expect("info").session_state(),
        SessionState::RwPublic
    );
    s.login(UserType::User, Some(&AuthPin::new("1234".into())))
        .expect("C_Login answers OK on a token without a PIN");
    assert_eq!(
        s.get_session_info().expect("info").session_state(),
        SessionState::RwUser
    );
    expect_err(
        s.login(UserType::User, Some(&AuthPin::new("1234".into()))),
        &[RvError::UserAlreadyLoggedIn],
    );
    s.logout().expect("C_Logout");
    assert_eq!(
        s.get_session_info().expect("info").session_state(),
        SessionState::RwPublic
    );
    expect_err(s.logout(), &[RvError::UserNotLoggedIn]);
    // Empty PIN (as tools do for a token without CKF_LOGIN_REQUIRED) is fine too.
    s.login(UserType::User, Some(&AuthPin::new("".into())))
        .expect("C_Login with an empty PIN");
    s.logout().expect("C_Logout");
}

#[test]
fn login_state_is_shared_by_sessions() {
    let t = Token::new();
    let a = t.session();
    let b = t.ro_session();
    a.login(UserType::User, Some(&AuthPin::new("0000".into())))
        .expect("C_Login");
    assert_eq!(
        b.get_session_info().expect("info").session_state(),
        SessionState::RoUser
    );
    a.logout().expect("C_Logout");
    assert_eq!(
        b.get_session_info().expect("info").session_state(),
        SessionState::RoPublic
    );
}

#[test]
fn session_info_and_read_only_sessions() {
    let t = Token::new();
    let ro = t.ro_session();
    let info = ro.get_session_info().expect("C_GetSessionInfo");
    assert_eq!(info.session_state(), SessionState::RoPublic);
    assert!(!info.read_write());
    assert_eq!(info.slot_id(), t.slot());
    // Token objects cannot be created in a read-only session.
    let r = ro.generate_key_pair(
        &Mechanism::EccKeyPairGen,
        &common::pub_template("ro", true),
        &common::priv_template("ro", true),
    );
    expect_err(r, &[RvError::SessionReadOnly]);
    // Session objects can.
    common::gen_p256(&ro, "ro-session-object", false);
}

#[test]
fn open_session_without_serial_flag_is_refused() {
    let t = Token::new();
    let slot: CK_SLOT_ID = t.slot().into();
    let mut h: CK_SESSION_HANDLE = 0;
    // SAFETY: valid out-pointer; flags lack CKF_SERIAL_SESSION.
    let rv = unsafe { ck!(C_OpenSession)(slot, CKF_RW_SESSION, ptr::null_mut(), None, &mut h) };
    assert_rv!(rv, CKR_SESSION_PARALLEL_NOT_SUPPORTED);
    // SAFETY: NULL out-pointer must be refused.
    let rv = unsafe {
        ck!(C_OpenSession)(
            slot,
            CKF_SERIAL_SESSION,
            ptr::null_mut(),
            None,
            ptr::null_mut(),
        )
    };
    assert_rv!(rv, CKR_ARGUMENTS_BAD);
}

#[test]
fn invalid_session_and_object_handles() {
    let t = Token::new();
    let s = t.session();
    let (public, _) = common::gen_p256(&s, "handles", false);

    let mut info = CK_SESSION_INFO::default();
    // SAFETY: valid out-pointer, bogus handle.
    let rv = unsafe { ck!(C_GetSessionInfo)(0xdead_beef, &mut info) };
    assert_rv!(rv, CKR_SESSION_HANDLE_INVALID, "C_GetSessionInfo(bogus)");
    // SAFETY: plain handle.
    let rv = unsafe { ck!(C_CloseSession)(0xdead_beef) };
    assert_rv!(rv, CKR_SESSION_HANDLE_INVALID, "C_CloseSession(bogus)");

    // A closed session's handle is invalid.
    let other = t.session();
    let closed = other.handle();
    other.close().expect("C_CloseSession");
    // SAFETY: valid out-pointer, closed handle.
    let rv = unsafe { ck!(C_GetSessionInfo)(closed, &mut info) };
    assert_rv!(rv, CKR_SESSION_HANDLE_INVALID, "C_GetSessionInfo(closed)");

    // Object handles.
    // SAFETY: the handle is only a number the module must check.
    let bogus = unsafe { ObjectHandle::new_from_raw(0xdead_beef) };
    expect_err(
        s.get_attributes(bogus, &[cryptoki::object::AttributeType::Label]),
        &[RvError::ObjectHandleInvalid],
    );
    expect_err(
        s.update_attributes(bogus, &[Attribute::Label(b"x".to_vec())]),
        &[RvError::ObjectHandleInvalid],
    );
    expect_err(s.destroy_object(bogus), &[RvError::ObjectHandleInvalid]);
    expect_err(
        s.sign_init(&Mechanism::Ecdsa, bogus),
        &[RvError::KeyHandleInvalid],
    );
    expect_err(
        s.verify_init(&Mechanism::Ecdsa, bogus),
        &[RvError::KeyHandleInvalid],
    );
    // Signing with the public key is refused.
    expect_err(
        s.sign_init(&Mechanism::Ecdsa, public),
        &[
            RvError::KeyTypeInconsistent,
            RvError::KeyFunctionNotPermitted,
        ],
    );

    // Closing all sessions invalidates them.
    let slot = t.slot();
    let third = t.session();
    let h3 = third.handle();
    std::mem::forget(third); // closed below by C_CloseAllSessions
                             // SAFETY: plain slot id.
    let rv = unsafe { ck!(C_CloseAllSessions)(slot.into()) };
    assert_rv!(rv, CKR_OK);
    // SAFETY: valid out-pointer, closed handle.
    let rv = unsafe { ck!(C_GetSessionInfo)(h3, &mut info) };
    assert_rv!(rv, CKR_SESSION_HANDLE_INVALID, "after C_CloseAllSessions");
    // s was closed too; its drop will get SESSION_HANDLE_INVALID, which cryptoki logs only.
}

#[test]
fn generate_random_and_seed() {
    let t = Token::new();
    let s = t.session();
    let a = s.generate_random_vec(32).expect("C_GenerateRandom");
    let b = s.generate_random_vec(32).expect("C_GenerateRandom");
    assert_eq!(a.len(), 32);
    assert_ne!(a, b, "two random draws differ");
    assert_ne!(a, vec![0u8; 32]);
    let big = s.generate_random_vec(4096).expect("C_GenerateRandom 4096");
    assert_eq!(big.len(), 4096);
    match s.seed_random(b"some entropy") {
        Ok(()) => {}
        Err(e) => expect_err::<()>(Err(e), &[RvError::RandomSeedNotSupported]),
    }
}
