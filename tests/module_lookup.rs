//! Searches by CKA_LABEL and CKA_ID through the module, which answers them from the store's
//! lookup instead of loading every object: a key another process creates, relabels or deletes
//! is seen at the next search even when the value was searched before; a search that names
//! neither completes the table without changing the handles a lookup gave out; a CKA_ID shared
//! by a key pair and a certificate finds all three.

use testkit as common;

use std::collections::BTreeSet;

use common::{gen_p256, id_of, public_point, sha256, verify_prehash, Token};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, CertificateType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

const CHILD_ENV: &str = "DEVICEKEY_TEST_LOOKUP_CHILD";

/// The handles a search finds, sorted.
fn find(s: &Session, template: &[Attribute]) -> Vec<ObjectHandle> {
    let mut found = s.find_objects(template).expect("C_FindObjects");
    found.sort_by_key(|h| h.handle());
    found
}

fn by_label(s: &Session, label: &str) -> Vec<ObjectHandle> {
    find(s, &[Attribute::Label(label.as_bytes().to_vec())])
}

/// The CKA_CLASS of an object.
fn class_of(s: &Session, h: ObjectHandle) -> ObjectClass {
    match s
        .get_attributes(h, &[AttributeType::Class])
        .expect("CKA_CLASS")[..]
    {
        [Attribute::Class(c)] => c,
        ref other => panic!("CKA_CLASS: {other:?}"),
    }
}

/// The one object of class `class` among `handles`.
fn one_of(s: &Session, handles: &[ObjectHandle], class: ObjectClass) -> ObjectHandle {
    let of_class: Vec<_> = handles
        .iter()
        .copied()
        .filter(|h| class_of(s, *h) == class)
        .collect();
    assert_eq!(of_class.len(), 1, "one {class:?} in {handles:?}");
    of_class[0]
}

/// Signs with `private` and verifies the signature against the CKA_EC_POINT of `public`.
fn signs(s: &Session, private: ObjectHandle, public: ObjectHandle) {
    let point = public_point(s, public);
    let digest = sha256(b"found by a lookup");
    let sig = s.sign(&Mechanism::Ecdsa, private, &digest).expect("C_Sign");
    assert!(
        verify_prehash(&point, &digest, &sig),
        "the signature verifies"
    );
}

/// Runs `test` in a child process on the parent's config (another process on the same store).
fn in_child(t: &Token, test: &str, action: &str) {
    common::run_self_ok(
        test,
        &[
            (CHILD_ENV, action.to_string()),
            ("DEVICEKEY_CONFIG", t.config.display().to_string()),
        ],
    );
}

/// Child: what the parent asked for in `CHILD_ENV`.
#[test]
#[ignore = "child process of the tests in this file"]
fn child_changes_the_store() {
    let Some(action) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let t = Token::from_env_config();
    let s = t.session();
    match action.to_str() {
        Some("create") => {
            gen_p256(&s, "made by another process", true);
        }
        Some("relabel and delete") => {
            let old = one_of(&s, &by_label(&s, "old"), ObjectClass::PRIVATE_KEY);
            s.update_attributes(old, &[Attribute::Label(b"new".to_vec())])
                .expect("C_SetAttributeValue");
            for h in by_label(&s, "doomed") {
                s.destroy_object(h).expect("C_DestroyObject");
            }
        }
        other => panic!("unknown child action {other:?}"),
    }
}

#[test]
fn a_label_searched_before_finds_the_key_another_process_created_since() {
    let t = Token::new();
    let s = t.session();
    gen_p256(&s, "already here", true);
    assert!(by_label(&s, "made by another process").is_empty());
    // Twice: the second search is answered from what the first looked up.
    assert!(by_label(&s, "made by another process").is_empty());

    in_child(&t, "child_changes_the_store", "create");

    let found = by_label(&s, "made by another process");
    assert_eq!(found.len(), 2, "the new key pair is found: {found:?}");
    let private = one_of(&s, &found, ObjectClass::PRIVATE_KEY);
    let public = one_of(&s, &found, ObjectClass::PUBLIC_KEY);
    signs(&s, private, public);
}

#[test]
fn another_processs_relabel_and_delete_are_seen_by_label() {
    let t = Token::new();
    let s = t.session();
    let (a_public, a_private) = gen_p256(&s, "old", true);
    gen_p256(&s, "doomed", true);
    let point = public_point(&s, a_public);
    assert_eq!(by_label(&s, "old"), {
        let mut both = vec![a_public, a_private];
        both.sort_by_key(|h| h.handle());
        both
    });
    assert_eq!(by_label(&s, "doomed").len(), 2);
    assert!(by_label(&s, "new").is_empty());

    in_child(&t, "child_changes_the_store", "relabel and delete");

    assert!(
        by_label(&s, "old").is_empty(),
        "the old label finds nothing"
    );
    let found = by_label(&s, "new");
    assert_eq!(
        found.len(),
        2,
        "the new label finds the key pair: {found:?}"
    );
    let private = one_of(&s, &found, ObjectClass::PRIVATE_KEY);
    let public = one_of(&s, &found, ObjectClass::PUBLIC_KEY);
    assert_eq!(public_point(&s, public), point, "it is key A");
    signs(&s, private, public);
    assert!(by_label(&s, "doomed").is_empty(), "the deleted key is gone");
    // A search that loads everything agrees.
    let labels: BTreeSet<String> = find(&s, &[])
        .into_iter()
        .map(|h| common::label_of(&s, h))
        .collect();
    assert_eq!(labels, BTreeSet::from(["new".to_string()]));
}

#[test]
fn a_search_after_a_lookup_completes_the_table_and_keeps_its_handles() {
    let mut t = Token::new();
    {
        let s = t.session();
        for label in ["a", "b", "c"] {
            gen_p256(&s, label, true);
        }
        s.create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Label(b"some data".to_vec()),
            Attribute::Value(b"data".to_vec()),
        ])
        .expect("C_CreateObject");
    }
    // A fresh table: nothing loaded yet.
    t.reinitialize();
    let s = t.session();
    let b = by_label(&s, "b");
    assert_eq!(b.len(), 2);

    let private = find(&s, &[Attribute::Class(ObjectClass::PRIVATE_KEY)]);
    assert_eq!(private.len(), 3, "every private key: {private:?}");
    assert!(private.contains(&one_of(&s, &b, ObjectClass::PRIVATE_KEY)));

    let all = find(&s, &[]);
    assert_eq!(all.len(), 7, "three key pairs and a data object: {all:?}");
    for h in &b {
        assert!(all.contains(h), "the handles of the lookup are kept");
    }
    let labels: BTreeSet<String> = all.iter().map(|h| common::label_of(&s, *h)).collect();
    assert_eq!(
        labels,
        BTreeSet::from(["a", "b", "c", "some data"].map(String::from))
    );
    assert_eq!(by_label(&s, "b"), b, "the same handles after the full load");
}

/// A self-signed certificate (DER) of the key pair, signed on the token (as `devicekey cert`
/// makes it).
fn certificate_of(s: &Session, private: ObjectHandle, public: ObjectHandle) -> Vec<u8> {
    use devicekey_pkcs11::cli::cert::{self_signed, CertOptions, TokenSigner};
    let point = public_point(s, public);
    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point).expect("a P-256 point");
    let opts = CertOptions {
        subject: None,
        days: 1,
        dns: Vec::new(),
        ips: Vec::new(),
    };
    self_signed(&TokenSigner::new(s, private, key), "CN=lookup", &opts).expect("a certificate")
}

#[test]
fn a_cka_id_shared_with_a_certificate_finds_the_key_pair_and_the_certificate() {
    let mut t = Token::new();
    let id = {
        let s = t.session();
        let (public, private) = gen_p256(&s, "with a certificate", true);
        gen_p256(&s, "another key", true);
        let id = id_of(&s, public);
        s.create_object(&[
            Attribute::Class(ObjectClass::CERTIFICATE),
            Attribute::CertificateType(CertificateType::X_509),
            Attribute::Token(true),
            Attribute::Label(b"the certificate".to_vec()),
            Attribute::Id(id.clone()),
            Attribute::Value(certificate_of(&s, private, public)),
        ])
        .expect("C_CreateObject certificate");
        id
    };
    t.reinitialize();
    let s = t.session();
    let found = find(&s, &[Attribute::Id(id.clone())]);
    let classes: BTreeSet<u64> = found.iter().map(|h| u64::from(class_of(&s, *h))).collect();
    assert_eq!(found.len(), 3, "{found:?}");
    assert_eq!(
        classes,
        BTreeSet::from(
            [
                ObjectClass::PRIVATE_KEY,
                ObjectClass::PUBLIC_KEY,
                ObjectClass::CERTIFICATE
            ]
            .map(u64::from)
        )
    );
    let cert = one_of(&s, &found, ObjectClass::CERTIFICATE);
    assert_eq!(common::label_of(&s, cert), "the certificate");
    assert_eq!(
        find(
            &s,
            &[
                Attribute::Class(ObjectClass::CERTIFICATE),
                Attribute::Id(id)
            ]
        ),
        [cert]
    );
    signs(
        &s,
        one_of(&s, &found, ObjectClass::PRIVATE_KEY),
        one_of(&s, &found, ObjectClass::PUBLIC_KEY),
    );
}
