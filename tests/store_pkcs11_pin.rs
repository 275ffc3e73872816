//! A pkcs11 slot (over SoftHSM) with `login = "pin"`, through the built module: our PIN gates our
//! token (private keys hidden, no key generation and no signature before C_Login, wrong PINs
//! counted, C_SetPIN), while the wrapped token keeps its own PIN from `pin_env`. The PIN file
//! lives in the slot's `pin_dir`, written by the same code as the software store's.

#[macro_use]
extern crate testkit as common;

use std::sync::Arc;

use common::{expect_err, gen_p256, public_for, public_point, sha256, verify_prehash, Token};
use cryptoki::error::RvError;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use cryptoki_sys::*;
use devicekey_pkcs11::backend::keydir::KeyDir;
use devicekey_pkcs11::backend::pkcs11::Pkcs11Backend;
use devicekey_pkcs11::backend::software::pin::{PinVault, CHEAP_KDF_ENV};
use devicekey_pkcs11::config::{Config, SlotConfig};
use testkit::hsm_tokens::{good_slot_extra, have_softhsm, new_token, slot_toml};

const OUR_PIN: &str = "our-pin";

fn login(s: &Session, pin: &str) -> cryptoki::error::Result<()> {
    s.login(UserType::User, Some(&AuthPin::new(pin.into())))
}

fn private_count(s: &Session) -> usize {
    s.find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
        .expect("C_FindObjects")
        .len()
}

#[test]
fn our_pin_gates_a_pkcs11_slot() {
    if !have_softhsm() {
        return;
    }
    std::env::set_var(CHEAP_KDF_ENV, "1");
    let token = new_token("keys");
    let mut t = Token::uninitialized();
    let pin_dir = t.root().join("pin");
    std::fs::write(
        &t.config,
        slot_toml(
            &token,
            &format!(
                "{}\nlogin = \"pin\"\npin_dir = \"{}\"\npin_tries = 4",
                good_slot_extra(),
                pin_dir.display()
            ),
        ),
    )
    .expect("write config");
    let dir = Arc::new(KeyDir::open(&pin_dir).expect("PIN directory"));
    PinVault::new(dir, 4)
        .set_first(OUR_PIN.as_bytes())
        .expect("set our PIN");
    t.initialize();

    let info = t.ctx.get_token_info(t.slot()).expect("C_GetTokenInfo");
    assert!(info.login_required() && info.user_pin_initialized());
    let s = t.session();
    expect_err(
        common::try_gen_p256(&s, "k", true),
        &[RvError::UserNotLoggedIn],
    );
    // The wrapped token's PIN is not ours.
    expect_err(login(&s, common::softhsm::PIN), &[RvError::PinIncorrect]);
    assert!(t
        .ctx
        .get_token_info(t.slot())
        .expect("C_GetTokenInfo")
        .user_pin_count_low());
    login(&s, OUR_PIN).expect("C_Login with our PIN");
    let (_, private) = gen_p256(&s, "behind our PIN", true);
    let point = public_point(&s, public_for(&s, private));
    let sig = s
        .sign(&Mechanism::EcdsaSha256, private, b"data")
        .expect("C_Sign");
    assert!(verify_prehash(&point, &sha256(b"data"), &sig));
    assert_eq!(private_count(&s), 1);

    s.logout().expect("C_Logout");
    assert_eq!(private_count(&s), 0, "private key found without login");
    assert_rv!(
        common::sign_init(&s, CKM_ECDSA, private),
        CKR_USER_NOT_LOGGED_IN
    );
    s.set_pin(
        &AuthPin::new(OUR_PIN.into()),
        &AuthPin::new("new-pin".into()),
    )
    .expect("C_SetPIN");
    expect_err(login(&s, OUR_PIN), &[RvError::PinIncorrect]);
    login(&s, "new-pin").expect("C_Login with the new PIN");
    assert_eq!(private_count(&s), 1);
    s.destroy_object(private).expect("clean up the key");
}

#[test]
fn login_pin_on_a_pkcs11_slot_needs_a_pin_dir() {
    let text = slot_toml("any", &format!("{}\nlogin = \"pin\"", good_slot_extra()));
    let mut c = Config::from_toml(&text).expect("config parses");
    let SlotConfig::Pkcs11(slot) = c.slots.remove(0) else {
        panic!("not a pkcs11 slot");
    };
    let err = Pkcs11Backend::open(&slot).expect_err("opened without a PIN directory");
    let msg = err.to_string();
    assert!(msg.contains("login") && msg.contains("pin_dir"), "{msg}");
}
