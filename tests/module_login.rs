//! A software slot with `login = "pin"`, through the built module: token flags, private keys
//! hidden and unusable before C_Login (also by a handle obtained while logged in), wrong PINs
//! counted and locked, C_SetPIN, C_Logout, and the slots that must refuse to open.
//!
//! The first PIN is set through the library (what `devicekey pin set` does); new PIN files use
//! the cheap Argon2id cost of `DEVICEKEY_TEST_CHEAP_PIN_KDF` (debug builds only) so the suite
//! stays fast. `store_software_pin` checks the default cost.

#[macro_use]
extern crate testkit as common;

use std::path::{Path, PathBuf};

use common::{expect_err, gen_p256, public_for, public_point, sha256, verify_prehash, Token};
use cryptoki::error::RvError;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use cryptoki_sys::*;
use devicekey_pkcs11::backend::software::{PinOptions, SoftwareStore};
use devicekey_pkcs11::backend::Backend;

const PIN: &str = "1234";

/// A token whose one software slot has `login = "pin"` (and `extra` options); the PIN is set
/// to `pin` before C_Initialize when given.
fn pin_token(extra: &str, pin: Option<&str>) -> Token {
    std::env::set_var("DEVICEKEY_TEST_CHEAP_PIN_KDF", "1");
    let mut t = Token::uninitialized();
    let keys = keys_dir(&t);
    std::fs::write(
        &t.config,
        format!(
            "[[slot]]\nlabel = \"{}\"\nbackend = \"software\"\ndir = \"{}\"\nlogin = \"pin\"\n{extra}",
            common::TOKEN_LABEL,
            keys.display()
        ),
    )
    .expect("write config");
    if let Some(pin) = pin {
        set_first_pin(&keys, pin);
    }
    t.initialize();
    t
}

fn keys_dir(t: &Token) -> PathBuf {
    t.root().join("keys")
}

fn set_first_pin(dir: &Path, pin: &str) {
    let store = SoftwareStore::open_with("devicekey", Some(dir), Some(PinOptions::default()))
        .expect("open the store");
    store
        .pin()
        .expect("a PIN guard")
        .set_pin(None, pin.as_bytes())
        .expect("set the first PIN");
}

fn login(s: &Session, pin: &str) -> cryptoki::error::Result<()> {
    s.login(UserType::User, Some(&AuthPin::new(pin.into())))
}

fn private_keys(s: &Session) -> Vec<ObjectHandle> {
    s.find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
        .expect("C_FindObjects")
}

fn public_keys(s: &Session) -> Vec<ObjectHandle> {
    s.find_objects(&[Attribute::Class(ObjectClass::PUBLIC_KEY)])
        .expect("C_FindObjects")
}

fn flags(t: &Token) -> CK_FLAGS {
    let mut info = CK_TOKEN_INFO::default();
    // SAFETY: `info` is a live CK_TOKEN_INFO.
    let rv = unsafe { ck!(C_GetTokenInfo)(t.slot().id(), &mut info) };
    assert_rv!(rv, CKR_OK, "C_GetTokenInfo");
    info.flags
}

/// Signs with `private` and checks the signature against its public key.
fn sign_and_verify(s: &Session, private: ObjectHandle) {
    let point = public_point(s, public_for(s, private));
    let data = b"signed behind a PIN";
    let sig = s
        .sign(&Mechanism::EcdsaSha256, private, data)
        .expect("C_Sign");
    assert!(verify_prehash(&point, &sha256(data), &sig), "signature");
}

fn is_private(s: &Session, h: ObjectHandle) -> bool {
    let attrs = s
        .get_attributes(h, &[AttributeType::Private])
        .expect("C_GetAttributeValue");
    matches!(attrs.as_slice(), [Attribute::Private(true)])
}

#[test]
fn token_info_of_a_pin_slot() {
    let t = pin_token("", None);
    let info = t.ctx.get_token_info(t.slot()).expect("C_GetTokenInfo");
    assert!(info.login_required(), "CKF_LOGIN_REQUIRED");
    assert!(
        !info.user_pin_initialized(),
        "no PIN set yet: CKF_USER_PIN_INITIALIZED unset"
    );
    let s = t.session();
    expect_err(login(&s, PIN), &[RvError::UserPinNotInitialized]);
    drop(s);

    set_first_pin(&keys_dir(&t), PIN);
    let info = t.ctx.get_token_info(t.slot()).expect("C_GetTokenInfo");
    assert!(info.login_required(), "CKF_LOGIN_REQUIRED");
    assert!(info.user_pin_initialized(), "CKF_USER_PIN_INITIALIZED");
    assert_eq!(info.min_pin_length(), 4);
    assert_eq!(info.max_pin_length(), 256);
    assert_eq!(flags(&t) & CKF_USER_PIN_COUNT_LOW, 0);
}

#[test]
fn private_keys_are_hidden_and_unusable_without_login() {
    let mut t = pin_token("", Some(PIN));
    let s = t.session();
    // Without login: no key generation.
    expect_err(
        s.generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &common::pub_template("k", true),
            &common::priv_template("k", true),
        ),
        &[RvError::UserNotLoggedIn],
    );
    login(&s, PIN).expect("C_Login with the right PIN");
    let (public, private) = gen_p256(&s, "pinned", true);
    assert!(is_private(&s, private), "the private key is CKA_PRIVATE");
    assert!(!is_private(&s, public), "the public key is not");
    assert_eq!(private_keys(&s), vec![private]);
    sign_and_verify(&s, private);

    // A sign operation started while logged in does not survive the logout.
    assert_rv!(common::sign_init(&s, CKM_ECDSA, private), CKR_OK);
    s.logout().expect("C_Logout");
    let (rv, _, _) = common::sign_raw(&s, &[1u8; 32], Some(64));
    assert_rv!(rv, CKR_USER_NOT_LOGGED_IN, "C_Sign after C_Logout");

    // Logged out: the public key is there, the private key is not, and its handle is refused.
    assert!(
        private_keys(&s).is_empty(),
        "private key found without login"
    );
    assert_eq!(public_keys(&s), vec![public]);
    assert_rv!(
        common::sign_init(&s, CKM_ECDSA, private),
        CKR_USER_NOT_LOGGED_IN,
        "C_SignInit with a handle from the logged-in period"
    );
    expect_err(
        s.get_attributes(private, &[AttributeType::Label]),
        &[RvError::ObjectHandleInvalid],
    );
    expect_err(s.destroy_object(private), &[RvError::UserNotLoggedIn]);

    // A new process (here: C_Finalize + C_Initialize) sees the same, and signs after login.
    drop(s);
    t.reinitialize();
    let s = t.session();
    assert!(
        private_keys(&s).is_empty(),
        "private key found without login"
    );
    assert_eq!(public_keys(&s).len(), 1);
    login(&s, PIN).expect("C_Login");
    let found = private_keys(&s);
    assert_eq!(found.len(), 1);
    sign_and_verify(&s, found[0]);
    // C_Login twice is an error; closing the last session logs out.
    expect_err(login(&s, PIN), &[RvError::UserAlreadyLoggedIn]);
    drop(s);
    let s = t.session();
    assert!(
        private_keys(&s).is_empty(),
        "closing the last session logs out"
    );
    expect_err(s.login(UserType::So, None), &[RvError::UserTypeInvalid]);
}

#[test]
fn wrong_pins_are_counted_and_lock() {
    let t = pin_token("pin_tries = 3\n", Some(PIN));
    let s = t.session();
    expect_err(login(&s, "12"), &[RvError::PinLenRange]);
    assert_eq!(
        flags(&t) & CKF_USER_PIN_COUNT_LOW,
        0,
        "a too short PIN costs no try"
    );

    expect_err(login(&s, "0000"), &[RvError::PinIncorrect]);
    let f = flags(&t);
    assert_ne!(f & CKF_USER_PIN_COUNT_LOW, 0, "one wrong PIN: COUNT_LOW");
    assert_eq!(f & (CKF_USER_PIN_FINAL_TRY | CKF_USER_PIN_LOCKED), 0);

    // A right PIN resets the count.
    login(&s, PIN).expect("C_Login");
    s.logout().expect("C_Logout");
    assert_eq!(
        flags(&t) & CKF_USER_PIN_COUNT_LOW,
        0,
        "reset by a right PIN"
    );

    expect_err(login(&s, "0000"), &[RvError::PinIncorrect]);
    expect_err(login(&s, "0001"), &[RvError::PinIncorrect]);
    let f = flags(&t);
    assert_ne!(f & CKF_USER_PIN_FINAL_TRY, 0, "one try left: FINAL_TRY");
    assert_eq!(f & CKF_USER_PIN_LOCKED, 0);
    expect_err(login(&s, "0002"), &[RvError::PinIncorrect]);
    let f = flags(&t);
    assert_ne!(f & CKF_USER_PIN_LOCKED, 0, "three wrong PINs: LOCKED");
    expect_err(login(&s, PIN), &[RvError::PinLocked]);
    assert!(private_keys(&s).is_empty());
}

#[test]
fn set_pin_changes_the_pin() {
    let t = pin_token("", Some(PIN));
    let s = t.session();
    login(&s, PIN).expect("C_Login");
    let (_, private) = gen_p256(&s, "before the change", true);
    let ro = t.ro_session();
    expect_err(
        ro.set_pin(&AuthPin::new(PIN.into()), &AuthPin::new("5678".into())),
        &[RvError::SessionReadOnly],
    );
    drop(ro);
    expect_err(
        s.set_pin(&AuthPin::new(PIN.into()), &AuthPin::new("56".into())),
        &[RvError::PinLenRange],
    );
    expect_err(
        s.set_pin(&AuthPin::new("9999".into()), &AuthPin::new("5678".into())),
        &[RvError::PinIncorrect],
    );
    s.set_pin(&AuthPin::new(PIN.into()), &AuthPin::new("5678".into()))
        .expect("C_SetPIN");
    // Still logged in, the key still signs.
    sign_and_verify(&s, private);
    s.logout().expect("C_Logout");
    expect_err(login(&s, PIN), &[RvError::PinIncorrect]);
    login(&s, "5678").expect("C_Login with the new PIN");
    sign_and_verify(&s, private);
    s.logout().expect("C_Logout");
    // In a read-write public session, C_SetPIN changes the user PIN too (given the old one).
    s.set_pin(&AuthPin::new("5678".into()), &AuthPin::new(PIN.into()))
        .expect("C_SetPIN in a public session");
    login(&s, PIN).expect("C_Login");
}

#[test]
fn a_slot_without_login_has_no_set_pin_and_shows_private_keys() {
    let t = Token::new();
    let s = t.session();
    let (_, private) = gen_p256(&s, "plain", true);
    assert!(!is_private(&s, private), "no PIN: CKA_PRIVATE false");
    assert_eq!(private_keys(&s), vec![private]);
    expect_err(
        s.set_pin(&AuthPin::new(PIN.into()), &AuthPin::new("5678".into())),
        &[RvError::FunctionNotSupported],
    );
    let info = t.ctx.get_token_info(t.slot()).expect("C_GetTokenInfo");
    assert!(!info.login_required());
    assert_eq!((info.min_pin_length(), info.max_pin_length()), (0, 255));
}

/// The slots of the config in `text`, and whether each has a token.
fn token_present(t: &mut Token, text: &str) -> bool {
    std::fs::write(&t.config, text).expect("write config");
    t.initialize();
    let slots = t.ctx.get_all_slots().expect("C_GetSlotList");
    assert_eq!(slots.len(), 1);
    let present = t.ctx.get_slots_with_token().expect("C_GetSlotList").len() == 1;
    t.finalize();
    present
}

#[test]
fn slots_that_cannot_keep_their_login_promise_do_not_open() {
    let mut t = Token::uninitialized();
    let keys = keys_dir(&t);
    std::env::set_var("DEVICEKEY_TEST_CHEAP_PIN_KDF", "1");
    set_first_pin(&keys, PIN);
    let software = format!(
        "[[slot]]\nbackend = \"software\"\ndir = \"{}\"\n",
        keys.display()
    );
    assert!(
        !token_present(&mut t, &software),
        "a store with a PIN file opened under login = \"none\""
    );
    let err = SoftwareStore::open("devicekey", Some(&keys))
        .expect_err("a store with a PIN file must not open without login")
        .to_string();
    assert!(err.contains("login"), "{err}");
    assert!(token_present(
        &mut t,
        &format!("{software}login = \"pin\"\n")
    ));
}
