//! Config and key-store rules seen through the module: a broken or missing config gives a CK_RV
//! (never a crash), a wrong option in a slot leaves that slot without a token, and the module
//! recovers once the config is fixed; a group- or world-writable key
//! directory is refused; the key directory and files it creates are owner-only.

#[macro_use]
extern crate testkit as common;

use std::os::unix::fs::PermissionsExt;
use std::ptr;

use common::{gen_p256, Token};
use cryptoki::mechanism::Mechanism;
use cryptoki_sys::*;

fn initialize() -> CK_RV {
    // SAFETY: NULL init args.
    unsafe { ck!(C_Initialize)(ptr::null_mut()) }
}

fn finalize() -> CK_RV {
    // SAFETY: NULL reserved pointer.
    unsafe { ck!(C_Finalize)(ptr::null_mut()) }
}

/// After a bad config, C_Initialize either fails with a CK_RV or succeeds without any usable
/// token; either way nothing crashes, and a fixed config works afterwards.
fn assert_refused_then_recovers(t: &mut Token, what: &str) {
    let rv = initialize();
    if rv == CKR_OK {
        let slots = t.ctx.get_slots_with_token().unwrap_or_default();
        assert!(
            slots.is_empty(),
            "{what}: C_Initialize succeeded with a usable token: {slots:?}"
        );
        assert_rv!(finalize(), CKR_OK);
    } else {
        assert_ne!(rv, CKR_CRYPTOKI_ALREADY_INITIALIZED, "{what}");
        // Nothing was left initialized.
        let mut info = CK_INFO::default();
        // SAFETY: valid out-pointer.
        let rv = unsafe { ck!(C_GetInfo)(&mut info) };
        assert_rv!(
            rv,
            CKR_CRYPTOKI_NOT_INITIALIZED,
            "{what}: after a failed C_Initialize"
        );
    }
    let config = common::write_config(t.root());
    common::use_config(&config);
    t.initialize();
    let s = t.session();
    gen_p256(&s, "recovered", true);
    drop(s);
    t.finalize();
}

#[test]
fn broken_config_is_an_error_not_a_crash() {
    let mut t = Token::uninitialized();
    std::fs::write(&t.config, "[[slot]\nbackend = \n").expect("write");
    assert_refused_then_recovers(&mut t, "invalid TOML");
}

#[test]
fn config_with_unknown_field_or_backend_is_an_error() {
    let mut t = Token::uninitialized();
    // A wrong option breaks its slot only: the module initializes, lists the slot, and the slot
    // has no token.
    std::fs::write(
        &t.config,
        "[[slot]]\nbackend = \"software\"\ncolour = \"blue\"\n",
    )
    .expect("write");
    assert_rv!(initialize(), CKR_OK);
    let all = t.ctx.get_all_slots().expect("C_GetSlotList");
    assert_eq!(all.len(), 1, "the broken slot is listed");
    assert!(
        t.ctx
            .get_slots_with_token()
            .expect("C_GetSlotList")
            .is_empty(),
        "the broken slot has no token"
    );
    assert_rv!(finalize(), CKR_OK);
    assert_refused_then_recovers(&mut t, "unknown field");
    // A slot whose backend is not a key store makes the whole config unusable.
    std::fs::write(&t.config, "[[slot]]\nbackend = \"floppy\"\n").expect("write");
    assert_ne!(initialize(), CKR_OK, "unknown backend");
    assert_refused_then_recovers(&mut t, "unknown backend");
}

#[test]
fn missing_config_file_is_an_error_not_a_crash() {
    let mut t = Token::uninitialized();
    std::env::set_var("DEVICEKEY_CONFIG", t.root().join("does-not-exist.toml"));
    assert_refused_then_recovers(&mut t, "missing config file");
}

#[test]
fn group_or_world_writable_key_directory_is_refused() {
    for mode in [0o770, 0o707] {
        let t = Token::uninitialized();
        let keys = t.root().join("keys");
        std::fs::create_dir(&keys).expect("mkdir");
        std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(mode)).expect("chmod");
        let rv = initialize();
        let mut created = false;
        if rv == CKR_OK {
            if let Ok(slots) = t.ctx.get_slots_with_token() {
                if let Some(&slot) = slots.first() {
                    if let Ok(s) = t.ctx.open_rw_session(slot) {
                        created = s
                            .generate_key_pair(
                                &Mechanism::EccKeyPairGen,
                                &common::pub_template("unsafe-dir", true),
                                &common::priv_template("unsafe-dir", true),
                            )
                            .is_ok();
                    }
                }
            }
            assert_rv!(finalize(), CKR_OK);
        }
        assert!(!created, "a key was stored in a {mode:o} directory");
        let now = std::fs::metadata(&keys).expect("stat").permissions().mode() & 0o777;
        assert!(
            now == mode || now & 0o077 == 0,
            "the module changed the directory to {now:o} without making it owner-only"
        );
        drop(t); // releases the lock before the next iteration takes it
    }
}

#[test]
fn key_directory_and_files_are_owner_only() {
    let t = Token::new();
    let s = t.session();
    let (_, private) = gen_p256(&s, "perms", true);
    s.sign(&Mechanism::Ecdsa, private, &[7u8; 32])
        .expect("sign");
    let keys = t.root().join("keys");
    let mode = std::fs::metadata(&keys)
        .expect("key dir created")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "key directory mode {:o}", mode & 0o777);
    let mut files = 0;
    let mut stack = vec![keys];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir") {
            let entry = entry.expect("entry");
            let meta = entry.metadata().expect("stat");
            let mode = meta.permissions().mode() & 0o777;
            assert_eq!(
                mode & 0o077,
                0,
                "{} has mode {mode:o}",
                entry.path().display()
            );
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                files += 1;
            }
        }
    }
    assert!(files > 0, "the token key is stored in the key directory");
}
