//! The pkcs11 key store across a fork and after the wrapped module was finalized under it. One
//! test per process on purpose: a forked child inherits only the forking thread, so no other
//! test may be running (and holding locks) when it forks.

use std::path::Path;

use devicekey_pkcs11::backend::pkcs11::{shared_module, Pkcs11Backend};
use devicekey_pkcs11::backend::{Backend, KeyPurpose, NewKey};
use devicekey_pkcs11::config::{Config, Pkcs11Slot, SlotConfig};
use sha2::{Digest, Sha256};
use testkit::hsm_tokens::*;
use testkit::softhsm;

/// The usual pkcs11 slot over `token`: PIN from the environment, declared hardware_tpm.
fn good_slot(token: &str) -> Pkcs11Slot {
    let text = slot_toml(token, &good_slot_extra());
    let mut c = Config::from_toml(&text).expect("test config parses");
    match c.slots.remove(0) {
        SlotConfig::Pkcs11(s) => s,
        other => panic!("not a pkcs11 slot: {other:?}"),
    }
}

fn new_key(id: &[u8]) -> NewKey {
    NewKey {
        id: id.to_vec(),
        label: "k".into(),
        purpose: KeyPurpose::General,
        persistent: true,
    }
}

#[test]
fn fork_and_finalize_are_survived() {
    if !have_softhsm() {
        return;
    }
    // DEVICEKEY_LOG=info shows the re-initialization and the reconnect in the child.
    devicekey_pkcs11::logging::init();
    // 1. The module is finalized by someone else in the process: the next call initializes it
    //    again, opens a fresh session, logs in and succeeds.
    let token = new_token("reinit");
    let backend = Pkcs11Backend::open(&good_slot(&token)).expect("open");
    let key = backend.generate_key(&new_key(b"r")).expect("generate");
    let client = shared_module(Path::new(softhsm::module())).expect("the shared client");
    client
        .context()
        .clone()
        .finalize()
        .expect("finalize under the backend");
    drop(client);
    let d: [u8; 32] = Sha256::digest(b"after finalize").into();
    let sig = key.signer.sign_digest(&d).expect("sign after a finalize");
    assert!(verifies(&key.public_point, &d, &sig));
    assert_eq!(backend.load_keys().expect("list").len(), 1);

    // 2. Fork: the child uses the parent's backend and signer; they notice the new process id
    //    and connect afresh instead of reusing the parent's context and sessions.
    let token = new_token("fork");
    let backend = Pkcs11Backend::open(&good_slot(&token)).expect("open");
    let key = backend.generate_key(&new_key(b"f")).expect("generate");
    let d: [u8; 32] = Sha256::digest(b"in the child").into();
    // SAFETY: fork has no crate wrapper in our dependencies. This test is alone in its process
    // and the child only signs, checks and leaves with _exit (no unwinding, no destructors, no
    // test harness output).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let ok = (|| {
            let sig = key.signer.sign_digest(&d).ok()?;
            if !verifies(&key.public_point, &d, &sig) {
                return None;
            }
            let other = backend.generate_key(&new_key(b"c")).ok()?;
            let sig = other.signer.sign_digest(&d).ok()?;
            verifies(&other.public_point, &d, &sig).then_some(())
        })()
        .is_some();
        // SAFETY: leaving the child without running the parent's destructors.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(waited, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the child could not sign (status {status:#x})"
    );
    // The parent's connection is untouched by the child.
    let sig = key
        .signer
        .sign_digest(&d)
        .expect("parent signs after the fork");
    assert!(verifies(&key.public_point, &d, &sig));
    assert_eq!(
        backend.load_keys().expect("list").len(),
        2,
        "the child's key is on the token"
    );
}
