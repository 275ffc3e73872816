//! A proof-only key signs only the exact canonical bytes of a valid proof, checked on every call
//! through the module's C ABI: the same valid bytes sign again, while bytes that differ from a
//! valid proof in any way (right after it was signed, at the same length, with `type` moved or
//! swapped, or split over C_SignUpdate calls) and a proof that has expired since it was last
//! signed are refused with CKR_DATA_INVALID. Whatever makes the token's check cheaper must keep
//! all of this.

use testkit as common;

use common::rpc::{canonical_bytes, connection_payload, enrollment_payload, now};
use common::{
    public_point, rv_err, sha256, verify_prehash, Token, CKA_DEVICEKEY_PURPOSE, PURPOSE_PROOF,
};
use cryptoki::error::RvError;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectHandle};
use cryptoki::session::Session;

/// A session proof-only key pair: (private key, public point).
fn proof_key(s: &Session) -> (ObjectHandle, Vec<u8>) {
    let mut private = common::priv_template("proof", false);
    private.push(Attribute::VendorDefined((
        AttributeType::VendorDefined(CKA_DEVICEKEY_PURPOSE),
        PURPOSE_PROOF.to_ne_bytes().to_vec(),
    )));
    let (public, private) = s
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &common::pub_template("proof", false),
            &private,
        )
        .expect("C_GenerateKeyPair");
    (private, public_point(s, public))
}

/// Signs `data` in one C_Sign and checks the signature.
fn signs(s: &Session, key: ObjectHandle, point: &[u8], data: &[u8]) {
    let sig = s
        .sign(&Mechanism::EcdsaSha256, key, data)
        .unwrap_or_else(|e| panic!("a valid proof was refused: {e}"));
    assert!(verify_prehash(point, &sha256(data), &sig));
}

fn refused(s: &Session, key: ObjectHandle, data: &[u8]) {
    assert_eq!(
        rv_err(s.sign(&Mechanism::EcdsaSha256, key, data)),
        RvError::DataInvalid,
        "signed {}",
        String::from_utf8_lossy(data)
    );
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[test]
fn only_the_exact_bytes_of_a_valid_proof_sign() {
    let t = Token::new();
    let s = t.session();
    let (key, point) = proof_key(&s);
    let connection = canonical_bytes(&connection_payload());
    let enrollment = canonical_bytes(&enrollment_payload());
    for valid in [&connection, &enrollment, &connection] {
        signs(&s, key, &point, valid);
    }

    let c = text(&connection);
    let e = text(&enrollment);
    let connection_type = r#","type":"remoteControlClientConnection""#;
    let enrollment_type = r#","type":"remoteControlClientEnrollment""#;
    let moved_type = c.replacen(connection_type, "", 1).replacen(
        r#""payload":{"#,
        r#""payload":{"type":"remoteControlClientConnection","#,
        1,
    );
    assert_eq!(moved_type.len(), c.len());
    let changed = [
        // A disallowed origin, same length.
        c.replacen("https://chatgpt.com", "https://chatgpt.con", 1),
        // `type` first: the same payload, not in canonical order.
        moved_type,
        // The other payload's `type` on these fields, and the reverse.
        c.replacen(connection_type, enrollment_type, 1),
        e.replacen(enrollment_type, connection_type, 1),
        // Whitespace, an escaped slash, a trailing newline, a repeated key, a cut.
        c.replacen(',', ", ", 1),
        c.replacen("https://", "https:\\/\\/", 1),
        format!("{c}\n"),
        c.replacen(
            r#""clientId""#,
            r#""clientId":"someone-else","clientId""#,
            1,
        ),
        c[..c.len() - 1].to_string(),
        // Not a proof at all.
        "hello".into(),
        String::new(),
    ];
    for data in &changed {
        refused(&s, key, data.as_bytes());
    }
    // The same bytes are still good afterwards.
    signs(&s, key, &point, &connection);

    // Multi-part: the whole of what was fed is checked.
    let (head, tail) = connection.split_at(100);
    s.sign_init(&Mechanism::EcdsaSha256, key).unwrap();
    s.sign_update(head).unwrap();
    s.sign_update(tail).unwrap();
    let sig = s.sign_final().expect("a valid proof in two parts");
    assert!(verify_prehash(&point, &sha256(&connection), &sig));
    let spaced = c.replacen(',', ", ", 1);
    let (head, tail) = spaced.as_bytes().split_at(100);
    s.sign_init(&Mechanism::EcdsaSha256, key).unwrap();
    s.sign_update(head).unwrap();
    s.sign_update(tail).unwrap();
    assert_eq!(rv_err(s.sign_final()), RvError::DataInvalid);
}

#[test]
fn a_proof_signed_once_is_refused_once_it_has_expired() {
    let t = Token::new();
    let s = t.session();
    let (key, point) = proof_key(&s);
    let mut payload = connection_payload();
    let expires = now() + 2;
    payload["tokenExpiresAt"] = expires.into();
    let bytes = canonical_bytes(&payload);
    signs(&s, key, &point, &bytes);
    while now() <= expires {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    refused(&s, key, &bytes);
}
