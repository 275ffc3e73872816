//! Another process's relabel and delete, seen through the module without C_Finalize: the next
//! C_FindObjectsInit reloads the software store from its index (`store.index`), the relabelled
//! key keeps its handles and shows its new label, the deleted key is gone, and a key nobody
//! touched keeps its handles and signs. (Keys another process creates:
//! `tests/module_concurrency.rs`.)

use testkit as common;

use std::collections::BTreeMap;

use common::{gen_p256, public_point, sha256, verify_prehash, Token};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

const CHILD_ENV: &str = "DEVICEKEY_TEST_RELOAD_CHILD";

/// Handle by label of every private key.
fn private_keys(s: &Session) -> BTreeMap<String, ObjectHandle> {
    s.find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
        .expect("C_FindObjects")
        .into_iter()
        .map(|h| (common::label_of(s, h), h))
        .collect()
}

fn signs(s: &Session, private: ObjectHandle) {
    let point = public_point(s, common::public_for(s, private));
    let d = sha256(b"after a reload");
    let sig = s.sign(&Mechanism::Ecdsa, private, &d).expect("C_Sign");
    assert!(verify_prehash(&point, &d, &sig));
}

/// Child: relabels the key labelled "relabel" and destroys the one labelled "destroy".
#[test]
#[ignore = "child process of another_processs_relabel_and_delete_are_seen_at_the_next_search"]
fn child_relabels_and_destroys() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let t = Token::from_env_config();
    let s = t.session();
    let keys = private_keys(&s);
    let relabel = keys["relabel"];
    for h in [relabel, common::public_for(&s, relabel)] {
        s.update_attributes(h, &[Attribute::Label(b"relabelled".to_vec())])
            .expect("C_SetAttributeValue");
    }
    let destroy = keys["destroy"];
    let public = common::public_for(&s, destroy);
    s.destroy_object(destroy).expect("C_DestroyObject");
    s.destroy_object(public).expect("C_DestroyObject");
}

#[test]
fn another_processs_relabel_and_delete_are_seen_at_the_next_search() {
    let t = Token::new();
    let s = t.session();
    for label in ["keep", "relabel", "destroy"] {
        gen_p256(&s, label, true);
    }
    let before = private_keys(&s);
    signs(&s, before["keep"]);
    assert!(
        t.root().join("keys").join("store.index").exists(),
        "the store keeps an index"
    );

    common::run_self_ok(
        "child_relabels_and_destroys",
        &[
            (CHILD_ENV, "1".to_string()),
            ("DEVICEKEY_CONFIG", t.config.display().to_string()),
        ],
    );

    let after = private_keys(&s);
    let labels: Vec<&str> = after.keys().map(String::as_str).collect();
    assert_eq!(labels, ["keep", "relabelled"]);
    assert_eq!(
        after["keep"], before["keep"],
        "an untouched key keeps its handle"
    );
    assert_eq!(
        after["relabelled"], before["relabel"],
        "a relabelled key keeps its handle"
    );
    signs(&s, after["keep"]);
    signs(&s, after["relabelled"]);
}
