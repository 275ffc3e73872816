//! PKCS#11 object rules: key generation and its templates, every standard boolean, the five
//! C_GetAttributeValue cases (raw ABI), vendor attributes, find, set, create, destroy, and object
//! lifetime (token objects persist, session objects do not).

#[macro_use]
extern crate testkit as common;

use std::ffi::c_void;
use std::ptr;

use common::{
    attr_bytes, expect_err, gen_p256, id_of, label_of, public_point, vendor_ulong, Token,
    CKA_DEVICEKEY_PROTECTION_CLASS, CKA_DEVICEKEY_PURPOSE, CLASS_OS_PROTECTED, P256_OID_DER,
    P384_OID_DER, PURPOSE_GENERAL, PURPOSE_PROOF,
};
use cryptoki::error::RvError;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{
    Attribute, AttributeType, CertificateType, KeyType, ObjectClass, ObjectHandle,
};
use cryptoki::session::Session;
use cryptoki_sys::*;

fn ulong_attr(t: u64, v: u64) -> Attribute {
    Attribute::VendorDefined((AttributeType::VendorDefined(t), v.to_ne_bytes().to_vec()))
}

/// Raw C_GetAttributeValue over a caller-built template.
fn get_raw(s: &Session, o: ObjectHandle, tmpl: &mut [CK_ATTRIBUTE]) -> CK_RV {
    // SAFETY: tmpl is a live array of tmpl.len() CK_ATTRIBUTEs whose pValue pointers are NULL or
    // point to buffers of at least ulValueLen bytes, alive for the call.
    unsafe {
        ck!(C_GetAttributeValue)(
            s.handle(),
            o.handle(),
            tmpl.as_mut_ptr(),
            tmpl.len() as CK_ULONG,
        )
    }
}

fn attr(type_: CK_ATTRIBUTE_TYPE, buf: &mut [u8]) -> CK_ATTRIBUTE {
    CK_ATTRIBUTE {
        type_,
        pValue: buf.as_mut_ptr() as *mut c_void,
        ulValueLen: buf.len() as CK_ULONG,
    }
}

fn find(s: &Session, template: &[Attribute]) -> Vec<ObjectHandle> {
    s.find_objects(template).expect("C_FindObjects")
}

fn find_by_label(s: &Session, label: &str) -> Vec<ObjectHandle> {
    find(s, &[Attribute::Label(label.as_bytes().to_vec())])
}

fn class_of(s: &Session, h: ObjectHandle) -> ObjectClass {
    match s
        .get_attributes(h, &[AttributeType::Class])
        .expect("CKA_CLASS")
        .pop()
    {
        Some(Attribute::Class(c)) => c,
        other => panic!("CKA_CLASS: {other:?}"),
    }
}

#[test]
fn keygen_p256_creates_pair_with_der_params_and_point() {
    let t = Token::new();
    let s = t.session();
    let (public, private) = gen_p256(&s, "keygen", true);
    assert_ne!(public, private);

    assert_eq!(class_of(&s, public), ObjectClass::PUBLIC_KEY);
    assert_eq!(class_of(&s, private), ObjectClass::PRIVATE_KEY);
    for h in [public, private] {
        let attrs = s
            .get_attributes(h, &[AttributeType::KeyType, AttributeType::KeyGenMechanism])
            .expect("attributes");
        assert!(
            attrs.contains(&Attribute::KeyType(KeyType::EC)),
            "{attrs:?}"
        );
        assert!(
            attrs.contains(&Attribute::KeyGenMechanism(MechanismType::ECC_KEY_PAIR_GEN)),
            "CKA_KEY_GEN_MECHANISM: {attrs:?}"
        );
        assert_eq!(label_of(&s, h), "keygen");
        assert_eq!(
            attr_bytes(&s, h, AttributeType::EcParams).as_deref(),
            Some(P256_OID_DER),
            "CKA_EC_PARAMS is the DER OID of prime256v1 (on both keys)"
        );
    }
    let point = public_point(&s, public);
    p256::ecdsa::VerifyingKey::from_sec1_bytes(&point).expect("CKA_EC_POINT is on P-256");

    let pub_id = id_of(&s, public);
    let priv_id = id_of(&s, private);
    assert!(!pub_id.is_empty(), "CKA_ID must be non-empty");
    assert_eq!(pub_id, priv_id, "key pair shares CKA_ID");

    // A second key pair gets a different CKA_ID and point.
    let (public2, _) = gen_p256(&s, "keygen-2", true);
    assert_ne!(id_of(&s, public2), pub_id);
    assert_ne!(public_point(&s, public2), point);
}

#[test]
fn keygen_uses_supplied_id() {
    let t = Token::new();
    let s = t.session();
    let id = b"\x01\x02my-key".to_vec();
    let mut pt = common::pub_template("with-id", true);
    let mut vt = common::priv_template("with-id", true);
    pt.push(Attribute::Id(id.clone()));
    vt.push(Attribute::Id(id.clone()));
    let (public, private) = s
        .generate_key_pair(&Mechanism::EccKeyPairGen, &pt, &vt)
        .expect("C_GenerateKeyPair");
    assert_eq!(id_of(&s, public), id);
    assert_eq!(id_of(&s, private), id);
}

#[test]
fn keygen_other_curve_is_refused() {
    let t = Token::new();
    let s = t.session();
    let mut pt = common::pub_template("p384", true);
    pt[1] = Attribute::EcParams(P384_OID_DER.to_vec());
    expect_err(
        s.generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &pt,
            &common::priv_template("p384", true),
        ),
        &[RvError::CurveNotSupported, RvError::DomainParamsInvalid],
    );
    // Garbage parameters.
    pt[1] = Attribute::EcParams(vec![0x30, 0x03, 0x02, 0x01]);
    let r = s.generate_key_pair(
        &Mechanism::EccKeyPairGen,
        &pt,
        &common::priv_template("junk", true),
    );
    expect_err(
        r,
        &[
            RvError::CurveNotSupported,
            RvError::DomainParamsInvalid,
            RvError::AttributeValueInvalid,
        ],
    );
    assert!(
        find_by_label(&s, "p384").is_empty(),
        "no object left behind"
    );
}

#[test]
fn keygen_without_ec_params_is_template_incomplete() {
    let t = Token::new();
    let s = t.session();
    let mut pt = common::pub_template("no-params", true);
    pt.remove(1);
    expect_err(
        s.generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &pt,
            &common::priv_template("no-params", true),
        ),
        &[RvError::TemplateIncomplete],
    );
}

#[test]
fn keygen_with_wrong_mechanism_is_refused() {
    let t = Token::new();
    let s = t.session();
    expect_err(
        s.generate_key_pair(
            &Mechanism::RsaPkcsKeyPairGen,
            &common::pub_template("rsa", true),
            &common::priv_template("rsa", true),
        ),
        &[RvError::MechanismInvalid],
    );
}

#[test]
fn keygen_tolerates_benign_template_attributes() {
    let t = Token::new();
    let s = t.session();
    // What pkcs11-tool, OpenSSL's engine and NSS put in their templates.
    let pt = vec![
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::KeyType(KeyType::EC),
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::EcParams(P256_OID_DER.to_vec()),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
        Attribute::Derive(false),
        Attribute::VerifyRecover(false),
        Attribute::Label(b"benign".to_vec()),
        Attribute::Id(b"benign-id".to_vec()),
    ];
    let vt = vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::EC),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::SignRecover(false),
        Attribute::Label(b"benign".to_vec()),
        Attribute::Id(b"benign-id".to_vec()),
    ];
    let (public, private) = s
        .generate_key_pair(&Mechanism::EccKeyPairGen, &pt, &vt)
        .expect("C_GenerateKeyPair with CKA_DERIVE=false, CKA_WRAP=false etc.");
    assert_eq!(id_of(&s, public), b"benign-id");
    assert_eq!(id_of(&s, private), b"benign-id");
}

#[test]
fn keygen_extractable_or_non_sensitive_private_key_is_refused() {
    let t = Token::new();
    let s = t.session();
    for (what, extra) in [
        ("CKA_EXTRACTABLE=true", Attribute::Extractable(true)),
        ("CKA_SENSITIVE=false", Attribute::Sensitive(false)),
    ] {
        let mut vt = common::priv_template("refused", true);
        vt.retain(|a| a.attribute_type() != extra.attribute_type());
        vt.push(extra);
        let r = s.generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &common::pub_template("refused", true),
            &vt,
        );
        assert!(r.is_err(), "{what} must be refused, got {r:?}");
    }
    assert!(
        find_by_label(&s, "refused").is_empty(),
        "no object left behind"
    );
}

/// Reads CK_BBOOL attributes raw, requiring every one to be answered (CKR_OK).
fn read_bools(s: &Session, h: ObjectHandle, types: &[(CK_ATTRIBUTE_TYPE, &str)]) -> Vec<bool> {
    let mut bufs = vec![[0xAAu8; 1]; types.len()];
    let mut tmpl: Vec<CK_ATTRIBUTE> = types
        .iter()
        .zip(bufs.iter_mut())
        .map(|(&(t, _), b)| attr(t, b))
        .collect();
    let rv = get_raw(s, h, &mut tmpl);
    let missing: Vec<&str> = types
        .iter()
        .zip(&tmpl)
        .filter(|(_, a)| a.ulValueLen != 1)
        .map(|((_, n), _)| *n)
        .collect();
    assert!(
        missing.is_empty(),
        "unanswered booleans: {missing:?} (rv {})",
        common::rv_name(rv)
    );
    assert_rv!(rv, CKR_OK);
    drop(tmpl);
    bufs.iter()
        .zip(types)
        .map(|(b, (_, n))| {
            assert!(
                b[0] == CK_TRUE || b[0] == CK_FALSE,
                "{n}: not a CK_BBOOL: {}",
                b[0]
            );
            b[0] == CK_TRUE
        })
        .collect()
}

fn check_bools(s: &Session, h: ObjectHandle, expected: &[(CK_ATTRIBUTE_TYPE, &str, bool)]) {
    let types: Vec<(CK_ATTRIBUTE_TYPE, &str)> = expected.iter().map(|&(t, n, _)| (t, n)).collect();
    let got = read_bools(s, h, &types);
    let wrong: Vec<String> = expected
        .iter()
        .zip(got)
        .filter(|(e, g)| e.2 != *g)
        .map(|(e, g)| format!("{} = {g}, want {}", e.1, e.2))
        .collect();
    assert!(wrong.is_empty(), "wrong booleans: {wrong:?}");
}

#[test]
fn private_key_answers_every_standard_boolean() {
    let t = Token::new();
    let s = t.session();
    let (_, private) = gen_p256(&s, "bools", true);
    check_bools(
        &s,
        private,
        &[
            (CKA_SIGN, "CKA_SIGN", true),
            (CKA_VERIFY, "CKA_VERIFY", false),
            (CKA_DERIVE, "CKA_DERIVE", false),
            (CKA_DECRYPT, "CKA_DECRYPT", false),
            (CKA_ENCRYPT, "CKA_ENCRYPT", false),
            (CKA_WRAP, "CKA_WRAP", false),
            (CKA_UNWRAP, "CKA_UNWRAP", false),
            (CKA_SIGN_RECOVER, "CKA_SIGN_RECOVER", false),
            (CKA_VERIFY_RECOVER, "CKA_VERIFY_RECOVER", false),
            (CKA_ALWAYS_AUTHENTICATE, "CKA_ALWAYS_AUTHENTICATE", false),
            (CKA_LOCAL, "CKA_LOCAL", true),
            (CKA_SENSITIVE, "CKA_SENSITIVE", true),
            (CKA_EXTRACTABLE, "CKA_EXTRACTABLE", false),
            (CKA_ALWAYS_SENSITIVE, "CKA_ALWAYS_SENSITIVE", true),
            (CKA_NEVER_EXTRACTABLE, "CKA_NEVER_EXTRACTABLE", true),
            (CKA_PRIVATE, "CKA_PRIVATE", false),
            (CKA_MODIFIABLE, "CKA_MODIFIABLE", true),
            (CKA_TOKEN, "CKA_TOKEN", true),
            (CKA_WRAP_WITH_TRUSTED, "CKA_WRAP_WITH_TRUSTED", false),
        ],
    );
    // Answered, whatever the value.
    read_bools(
        &s,
        private,
        &[
            (CKA_COPYABLE, "CKA_COPYABLE"),
            (CKA_DESTROYABLE, "CKA_DESTROYABLE"),
        ],
    );
}

#[test]
fn public_key_answers_standard_booleans() {
    let t = Token::new();
    let s = t.session();
    let (public, _) = gen_p256(&s, "bools", false);
    check_bools(
        &s,
        public,
        &[
            (CKA_VERIFY, "CKA_VERIFY", true),
            (CKA_SIGN, "CKA_SIGN", false),
            (CKA_ENCRYPT, "CKA_ENCRYPT", false),
            (CKA_DECRYPT, "CKA_DECRYPT", false),
            (CKA_WRAP, "CKA_WRAP", false),
            (CKA_UNWRAP, "CKA_UNWRAP", false),
            (CKA_DERIVE, "CKA_DERIVE", false),
            (CKA_VERIFY_RECOVER, "CKA_VERIFY_RECOVER", false),
            (CKA_LOCAL, "CKA_LOCAL", true),
            (CKA_PRIVATE, "CKA_PRIVATE", false),
            (CKA_MODIFIABLE, "CKA_MODIFIABLE", true),
            (CKA_TOKEN, "CKA_TOKEN", false),
        ],
    );
    read_bools(&s, public, &[(CKA_TRUSTED, "CKA_TRUSTED")]);
}

const UNKNOWN_TYPE: CK_ATTRIBUTE_TYPE = 0x7FFF_FFF0;

#[test]
fn get_attribute_value_mixed_valid_sensitive_unknown() {
    let t = Token::new();
    let s = t.session();
    let (_, private) = gen_p256(&s, "mixed", true);
    let mut label = [0u8; 64];
    let mut value = [0xAAu8; 64];
    let mut unknown = [0xAAu8; 64];
    let mut sign = [0u8; 1];
    let mut tmpl = [
        attr(CKA_LABEL, &mut label),
        attr(CKA_VALUE, &mut value),
        attr(UNKNOWN_TYPE, &mut unknown),
        attr(CKA_SIGN, &mut sign),
    ];
    let rv = get_raw(&s, private, &mut tmpl);
    assert!(
        rv == CKR_ATTRIBUTE_SENSITIVE || rv == CKR_ATTRIBUTE_TYPE_INVALID,
        "rv {}",
        common::rv_name(rv)
    );
    assert_eq!(tmpl[0].ulValueLen, 5, "the valid CKA_LABEL is still filled");
    assert_eq!(
        tmpl[1].ulValueLen, CK_UNAVAILABLE_INFORMATION,
        "sensitive CKA_VALUE"
    );
    assert_eq!(
        tmpl[2].ulValueLen, CK_UNAVAILABLE_INFORMATION,
        "unknown type"
    );
    assert_eq!(
        tmpl[3].ulValueLen, 1,
        "CKA_SIGN after the bad entries is still processed"
    );
    assert_eq!(&label[..5], b"mixed");
    assert_eq!(sign[0], CK_TRUE);
    assert!(
        value.iter().all(|&b| b == 0xAA),
        "nothing written for CKA_VALUE"
    );
}

#[test]
fn get_attribute_value_sensitive_alone_is_attribute_sensitive() {
    let t = Token::new();
    let s = t.session();
    let (_, private) = gen_p256(&s, "sensitive", true);
    let mut value = [0u8; 64];
    let mut label = [0u8; 64];
    let mut tmpl = [attr(CKA_LABEL, &mut label), attr(CKA_VALUE, &mut value)];
    assert_rv!(get_raw(&s, private, &mut tmpl), CKR_ATTRIBUTE_SENSITIVE);
    assert_eq!(tmpl[0].ulValueLen, 9);
    assert_eq!(tmpl[1].ulValueLen, CK_UNAVAILABLE_INFORMATION);
    // Even a length query for CKA_VALUE is refused.
    let mut tmpl = [CK_ATTRIBUTE {
        type_: CKA_VALUE,
        pValue: ptr::null_mut(),
        ulValueLen: 0,
    }];
    assert_rv!(get_raw(&s, private, &mut tmpl), CKR_ATTRIBUTE_SENSITIVE);
    assert_eq!(tmpl[0].ulValueLen, CK_UNAVAILABLE_INFORMATION);
    // cryptoki reports it as sensitive too.
    let info = s
        .get_attribute_info(private, &[AttributeType::Value])
        .expect("info");
    assert!(
        matches!(info[0], cryptoki::object::AttributeInfo::Sensitive),
        "{:?}",
        info[0]
    );
}

#[test]
fn get_attribute_value_unknown_alone_is_type_invalid() {
    let t = Token::new();
    let s = t.session();
    let (public, private) = gen_p256(&s, "unknown", true);
    for h in [public, private] {
        let mut unknown = [0u8; 16];
        let mut tmpl = [attr(UNKNOWN_TYPE, &mut unknown)];
        assert_rv!(get_raw(&s, h, &mut tmpl), CKR_ATTRIBUTE_TYPE_INVALID);
        assert_eq!(tmpl[0].ulValueLen, CK_UNAVAILABLE_INFORMATION);
    }
    // An attribute of another object type (CKA_MODULUS on an EC key) is invalid too.
    let mut m = [0u8; 16];
    let mut tmpl = [attr(CKA_MODULUS, &mut m)];
    assert_rv!(get_raw(&s, public, &mut tmpl), CKR_ATTRIBUTE_TYPE_INVALID);
    assert_eq!(tmpl[0].ulValueLen, CK_UNAVAILABLE_INFORMATION);
}

#[test]
fn get_attribute_value_null_pvalue_gives_length() {
    let t = Token::new();
    let s = t.session();
    let (public, _) = gen_p256(&s, "lengths", true);
    let mut tmpl = [
        CK_ATTRIBUTE {
            type_: CKA_EC_POINT,
            pValue: ptr::null_mut(),
            ulValueLen: 0,
        },
        CK_ATTRIBUTE {
            type_: CKA_EC_PARAMS,
            pValue: ptr::null_mut(),
            ulValueLen: 12345,
        },
        CK_ATTRIBUTE {
            type_: CKA_LABEL,
            pValue: ptr::null_mut(),
            ulValueLen: 0,
        },
        CK_ATTRIBUTE {
            type_: CKA_VERIFY,
            pValue: ptr::null_mut(),
            ulValueLen: 0,
        },
    ];
    assert_rv!(get_raw(&s, public, &mut tmpl), CKR_OK);
    assert_eq!(tmpl[0].ulValueLen, 67, "CKA_EC_POINT length");
    assert_eq!(tmpl[1].ulValueLen, 10, "CKA_EC_PARAMS length");
    assert_eq!(tmpl[2].ulValueLen, 7, "CKA_LABEL length");
    assert_eq!(tmpl[3].ulValueLen, 1, "CK_BBOOL length");
}

#[test]
fn get_attribute_value_too_small_buffer() {
    let t = Token::new();
    let s = t.session();
    let (public, _) = gen_p256(&s, "small", true);
    // A buffer of 100 bytes, of which we announce only 10: the module must not write past 10.
    let mut point = [0xAAu8; 100];
    let mut label = [0u8; 32];
    let mut tmpl = [
        CK_ATTRIBUTE {
            type_: CKA_EC_POINT,
            pValue: point.as_mut_ptr() as *mut c_void,
            ulValueLen: 10,
        },
        attr(CKA_LABEL, &mut label),
    ];
    assert_rv!(get_raw(&s, public, &mut tmpl), CKR_BUFFER_TOO_SMALL);
    assert_eq!(
        tmpl[0].ulValueLen, CK_UNAVAILABLE_INFORMATION,
        "too small → unavailable"
    );
    assert_eq!(tmpl[1].ulValueLen, 5, "the other entry is still filled");
    assert_eq!(&label[..5], b"small");
    assert!(
        point[10..].iter().all(|&b| b == 0xAA),
        "wrote past the announced length"
    );

    // Exactly the right size works; one byte more too (length is set to the real one).
    let mut point = [0u8; 68];
    let mut tmpl = [attr(CKA_EC_POINT, &mut point)];
    assert_rv!(get_raw(&s, public, &mut tmpl), CKR_OK);
    assert_eq!(tmpl[0].ulValueLen, 67);
    assert_eq!(&point[..3], &[0x04, 0x41, 0x04]);
    // A zero-length buffer for a bool.
    let mut b = [0u8; 1];
    let mut tmpl = [CK_ATTRIBUTE {
        type_: CKA_VERIFY,
        pValue: b.as_mut_ptr() as *mut c_void,
        ulValueLen: 0,
    }];
    assert_rv!(get_raw(&s, public, &mut tmpl), CKR_BUFFER_TOO_SMALL);
    assert_eq!(tmpl[0].ulValueLen, CK_UNAVAILABLE_INFORMATION);
}

#[test]
fn get_attribute_value_null_template_is_arguments_bad() {
    let t = Token::new();
    let s = t.session();
    let (public, _) = gen_p256(&s, "null", false);
    // SAFETY: NULL template with a non-zero count must be refused, not dereferenced.
    let rv = unsafe { ck!(C_GetAttributeValue)(s.handle(), public.handle(), ptr::null_mut(), 3) };
    assert_rv!(rv, CKR_ARGUMENTS_BAD);
}

#[test]
fn public_objects_findable_and_readable_without_login() {
    let t = Token::new();
    {
        let s = t.session();
        gen_p256(&s, "nologin", true);
    }
    // A fresh session, never logged in, read-only (as OpenSSH and NSS enumerate).
    let s = t.ro_session();
    let pubs = find(&s, &[Attribute::Class(ObjectClass::PUBLIC_KEY)]);
    assert_eq!(pubs.len(), 1);
    public_point(&s, pubs[0]);
    assert_eq!(
        attr_bytes(&s, pubs[0], AttributeType::EcParams).as_deref(),
        Some(P256_OID_DER)
    );
    // No PIN configured: the private key is visible too.
    let privs = find(&s, &[Attribute::Class(ObjectClass::PRIVATE_KEY)]);
    assert_eq!(
        privs.len(),
        1,
        "private key visible without login on a token without a PIN"
    );
    assert_eq!(id_of(&s, privs[0]), id_of(&s, pubs[0]));
}

#[test]
fn vendor_attributes_protection_class_and_purpose() {
    let t = Token::new();
    let s = t.session();
    let (public, private) = gen_p256(&s, "general", true);
    for h in [public, private] {
        assert_eq!(
            vendor_ulong(&s, h, CKA_DEVICEKEY_PROTECTION_CLASS),
            Some(CLASS_OS_PROTECTED)
        );
    }
    assert_eq!(
        vendor_ulong(&s, private, CKA_DEVICEKEY_PURPOSE),
        Some(PURPOSE_GENERAL)
    );

    // Requested in the private template.
    let mut vt = common::priv_template("proof", true);
    vt.push(ulong_attr(CKA_DEVICEKEY_PURPOSE, PURPOSE_PROOF));
    let (_, proof) = s
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &common::pub_template("proof", true),
            &vt,
        )
        .expect("keygen with CKA_DEVICEKEY_PURPOSE=proof");
    assert_eq!(
        vendor_ulong(&s, proof, CKA_DEVICEKEY_PURPOSE),
        Some(PURPOSE_PROOF)
    );
    assert_eq!(
        vendor_ulong(&s, proof, CKA_DEVICEKEY_PROTECTION_CLASS),
        Some(CLASS_OS_PROTECTED)
    );

    // Requested in the public template only.
    let mut pt = common::pub_template("proof-pub", true);
    pt.push(ulong_attr(CKA_DEVICEKEY_PURPOSE, PURPOSE_PROOF));
    let (_, proof2) = s
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &pt,
            &common::priv_template("proof-pub", true),
        )
        .expect("keygen with CKA_DEVICEKEY_PURPOSE in the public template");
    assert_eq!(
        vendor_ulong(&s, proof2, CKA_DEVICEKEY_PURPOSE),
        Some(PURPOSE_PROOF)
    );

    // An unknown purpose is refused.
    let mut vt = common::priv_template("bad-purpose", true);
    vt.push(ulong_attr(CKA_DEVICEKEY_PURPOSE, 77));
    let r = s.generate_key_pair(
        &Mechanism::EccKeyPairGen,
        &common::pub_template("bad-purpose", true),
        &vt,
    );
    expect_err(
        r,
        &[
            RvError::AttributeValueInvalid,
            RvError::TemplateInconsistent,
        ],
    );

    // Fixed after creation; the protection class cannot be set either.
    expect_err(
        s.update_attributes(proof, &[ulong_attr(CKA_DEVICEKEY_PURPOSE, PURPOSE_GENERAL)]),
        &[RvError::AttributeReadOnly, RvError::ActionProhibited],
    );
    expect_err(
        s.update_attributes(private, &[ulong_attr(CKA_DEVICEKEY_PROTECTION_CLASS, 1)]),
        &[RvError::AttributeReadOnly, RvError::ActionProhibited],
    );
    assert_eq!(
        vendor_ulong(&s, proof, CKA_DEVICEKEY_PURPOSE),
        Some(PURPOSE_PROOF)
    );

    // Findable by purpose.
    let found = find(
        &s,
        &[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            ulong_attr(CKA_DEVICEKEY_PURPOSE, PURPOSE_PROOF),
        ],
    );
    assert_eq!(found.len(), 2);
}

#[test]
fn find_objects_by_id_label_and_class() {
    let t = Token::new();
    let s = t.session();
    let (pub_a, priv_a) = gen_p256(&s, "alpha", true);
    let (_pub_b, priv_b) = gen_p256(&s, "beta", false);
    let id_a = id_of(&s, pub_a);

    let mut by_id = find(&s, &[Attribute::Id(id_a.clone())]);
    by_id.sort_by_key(|h| h.handle());
    let mut want = vec![pub_a, priv_a];
    want.sort_by_key(|h| h.handle());
    assert_eq!(by_id, want, "CKA_ID finds the pair");

    assert_eq!(find_by_label(&s, "beta").len(), 2);
    assert!(find_by_label(&s, "gamma").is_empty());

    let mut privs = find(&s, &[Attribute::Class(ObjectClass::PRIVATE_KEY)]);
    privs.sort_by_key(|h| h.handle());
    let mut want = vec![priv_a, priv_b];
    want.sort_by_key(|h| h.handle());
    assert_eq!(privs, want);

    assert_eq!(
        find(
            &s,
            &[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Id(id_a.clone())
            ]
        ),
        vec![priv_a]
    );
    assert_eq!(
        find(
            &s,
            &[
                Attribute::Token(false),
                Attribute::Class(ObjectClass::PRIVATE_KEY)
            ]
        ),
        vec![priv_b]
    );
    assert_eq!(find(&s, &[Attribute::KeyType(KeyType::EC)]).len(), 4);
    assert_eq!(find(&s, &[]).len(), 4, "empty template finds everything");
    assert!(find(&s, &[Attribute::Class(ObjectClass::SECRET_KEY)]).is_empty());
    // An attribute no object has matches nothing (not an error).
    assert!(find(&s, &[Attribute::Modulus(vec![1, 2, 3])]).is_empty());
}

#[test]
fn find_objects_state_machine() {
    let t = Token::new();
    let s = t.session();
    for i in 0..5 {
        gen_p256(&s, &format!("k{i}"), false);
    }
    let sh = s.handle();
    let mut out = [0 as CK_OBJECT_HANDLE; 4];
    let mut n: CK_ULONG = 0;
    // SAFETY: valid buffers and out-pointers throughout.
    unsafe {
        assert_rv!(
            ck!(C_FindObjects)(sh, out.as_mut_ptr(), 4, &mut n),
            CKR_OPERATION_NOT_INITIALIZED
        );
        assert_rv!(ck!(C_FindObjectsFinal)(sh), CKR_OPERATION_NOT_INITIALIZED);
        assert_rv!(ck!(C_FindObjectsInit)(sh, ptr::null_mut(), 0), CKR_OK);
        assert_rv!(
            ck!(C_FindObjectsInit)(sh, ptr::null_mut(), 0),
            CKR_OPERATION_ACTIVE
        );
        // Ten objects, fetched four at a time.
        let mut total = 0;
        loop {
            assert_rv!(ck!(C_FindObjects)(sh, out.as_mut_ptr(), 4, &mut n), CKR_OK);
            assert!(n <= 4);
            if n == 0 {
                break;
            }
            total += n;
        }
        assert_eq!(total, 10);
        assert_rv!(
            ck!(C_FindObjects)(sh, out.as_mut_ptr(), 4, ptr::null_mut()),
            CKR_ARGUMENTS_BAD
        );
        assert_rv!(ck!(C_FindObjectsFinal)(sh), CKR_OK);
        assert_rv!(ck!(C_FindObjectsFinal)(sh), CKR_OPERATION_NOT_INITIALIZED);
        // NULL template with a non-zero count.
        assert_rv!(
            ck!(C_FindObjectsInit)(sh, ptr::null_mut(), 2),
            CKR_ARGUMENTS_BAD
        );
    }
}

#[test]
fn set_attribute_value_label_and_id() {
    let t = Token::new();
    let s = t.session();
    let (public, private) = gen_p256(&s, "before", true);
    s.update_attributes(private, &[Attribute::Label(b"after".to_vec())])
        .expect("set CKA_LABEL");
    assert_eq!(label_of(&s, private), "after");
    let new_id = b"new-id".to_vec();
    for h in [public, private] {
        s.update_attributes(h, &[Attribute::Id(new_id.clone())])
            .expect("set CKA_ID");
    }
    assert_eq!(find(&s, &[Attribute::Id(new_id.clone())]).len(), 2);
    // The module keeps both halves of a key pair under one label (one key record), so the
    // public key may follow; the private key must carry the new label.
    let relabeled = find_by_label(&s, "after");
    assert!(relabeled.contains(&private), "{relabeled:?}");
    assert!(
        relabeled.iter().all(|h| [public, private].contains(h)),
        "{relabeled:?}"
    );

    // Survives a restart.
    drop(s);
    let mut t = t;
    t.reinitialize();
    let s = t.session();
    let found = find(
        &s,
        &[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(b"after".to_vec()),
        ],
    );
    assert_eq!(found.len(), 1);
    assert_eq!(id_of(&s, found[0]), new_id);
    assert_eq!(find(&s, &[Attribute::Id(new_id.clone())]).len(), 2);

    // Read-only or security attributes cannot be changed.
    let private = found[0];
    for (what, a) in [
        ("CKA_CLASS", Attribute::Class(ObjectClass::DATA)),
        ("CKA_KEY_TYPE", Attribute::KeyType(KeyType::RSA)),
        ("CKA_SENSITIVE=false", Attribute::Sensitive(false)),
        ("CKA_EXTRACTABLE=true", Attribute::Extractable(true)),
        ("CKA_EC_PARAMS", Attribute::EcParams(P384_OID_DER.to_vec())),
        ("CKA_LOCAL", Attribute::Local(false)),
    ] {
        let r = s.update_attributes(private, &[a]);
        let e = common::rv_err(r);
        assert!(
            matches!(
                e,
                RvError::AttributeReadOnly
                    | RvError::AttributeValueInvalid
                    | RvError::ActionProhibited
            ),
            "{what}: {e:?}"
        );
    }
    let b = read_bools(&s, private, &[(CKA_SENSITIVE, "s"), (CKA_EXTRACTABLE, "e")]);
    assert_eq!(b, vec![true, false]);
}

fn make_certificate() -> (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>) {
    use openssl::asn1::{Asn1Integer, Asn1Time};
    use openssl::bn::BigNum;
    use openssl::ec::{EcGroup, EcKey};
    use openssl::hash::MessageDigest;
    use openssl::nid::Nid;
    use openssl::pkey::PKey;
    use openssl::x509::{X509Builder, X509NameBuilder};
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).expect("group");
    let key = PKey::from_ec_key(EcKey::generate(&group).expect("key")).expect("pkey");
    let mut name = X509NameBuilder::new().expect("name");
    name.append_entry_by_text("CN", "devicekey test")
        .expect("CN");
    let name = name.build();
    let mut b = X509Builder::new().expect("builder");
    b.set_version(2).expect("version");
    let serial = BigNum::from_u32(0x1234).expect("bn");
    b.set_serial_number(&Asn1Integer::from_bn(&serial).expect("serial"))
        .expect("serial");
    b.set_subject_name(&name).expect("subject");
    b.set_issuer_name(&name).expect("issuer");
    b.set_pubkey(&key).expect("pubkey");
    b.set_not_before(&Asn1Time::days_from_now(0).expect("t"))
        .expect("nb");
    b.set_not_after(&Asn1Time::days_from_now(1).expect("t"))
        .expect("na");
    b.sign(&key, MessageDigest::sha256()).expect("sign");
    let cert = b.build();
    let der = cert.to_der().expect("der");
    let subject = name.to_der().expect("name der");
    (der, subject.clone(), subject, vec![0x02, 0x02, 0x12, 0x34])
}

#[test]
fn create_certificate_object_find_and_destroy() {
    let t = Token::new();
    let s = t.session();
    let (public, _) = gen_p256(&s, "with-cert", true);
    let id = id_of(&s, public);
    let (der, subject, issuer, serial) = make_certificate();
    let cert = s
        .create_object(&[
            Attribute::Class(ObjectClass::CERTIFICATE),
            Attribute::CertificateType(CertificateType::X_509),
            Attribute::Token(true),
            Attribute::Label(b"with-cert".to_vec()),
            Attribute::Id(id.clone()),
            Attribute::Subject(subject.clone()),
            Attribute::Issuer(issuer.clone()),
            Attribute::SerialNumber(serial.clone()),
            Attribute::Value(der.clone()),
        ])
        .expect("C_CreateObject certificate");
    let found = find(
        &s,
        &[
            Attribute::Class(ObjectClass::CERTIFICATE),
            Attribute::Id(id.clone()),
        ],
    );
    assert_eq!(found, vec![cert]);
    assert_eq!(
        attr_bytes(&s, cert, AttributeType::Value),
        Some(der.clone())
    );
    assert_eq!(attr_bytes(&s, cert, AttributeType::Subject), Some(subject));
    assert_eq!(attr_bytes(&s, cert, AttributeType::Issuer), Some(issuer));
    assert_eq!(
        attr_bytes(&s, cert, AttributeType::SerialNumber),
        Some(serial)
    );
    let attrs = s
        .get_attributes(
            cert,
            &[
                AttributeType::CertificateType,
                AttributeType::Token,
                AttributeType::Private,
            ],
        )
        .expect("attributes");
    assert!(attrs.contains(&Attribute::CertificateType(CertificateType::X_509)));
    assert!(attrs.contains(&Attribute::Token(true)));
    assert!(
        attrs.contains(&Attribute::Private(false)),
        "a certificate is public: {attrs:?}"
    );
    assert_eq!(
        find(&s, &[Attribute::Id(id.clone())]).len(),
        3,
        "pair and certificate share CKA_ID"
    );

    // Persists, readable from a fresh read-only session.
    drop(s);
    let mut t = t;
    t.reinitialize();
    let s = t.ro_session();
    let found = find(&s, &[Attribute::Class(ObjectClass::CERTIFICATE)]);
    assert_eq!(found.len(), 1);
    assert_eq!(attr_bytes(&s, found[0], AttributeType::Value), Some(der));
    drop(s);

    let s = t.session();
    let cert = find(&s, &[Attribute::Class(ObjectClass::CERTIFICATE)])[0];
    s.destroy_object(cert).expect("C_DestroyObject");
    assert!(find(&s, &[Attribute::Class(ObjectClass::CERTIFICATE)]).is_empty());
    expect_err(
        s.get_attributes(cert, &[AttributeType::Label]),
        &[RvError::ObjectHandleInvalid],
    );
    drop(s);
    t.reinitialize();
    let s = t.session();
    assert!(
        find(&s, &[Attribute::Class(ObjectClass::CERTIFICATE)]).is_empty(),
        "destroyed for good"
    );
    assert_eq!(
        find(&s, &[Attribute::Id(id)]).len(),
        2,
        "the key pair is untouched"
    );
}

#[test]
fn create_certificate_without_value_is_template_incomplete() {
    let t = Token::new();
    let s = t.session();
    let r = s.create_object(&[
        Attribute::Class(ObjectClass::CERTIFICATE),
        Attribute::CertificateType(CertificateType::X_509),
        Attribute::Token(true),
        Attribute::Subject(vec![0x30, 0x00]),
    ]);
    expect_err(r, &[RvError::TemplateIncomplete]);
}

#[test]
fn create_key_objects_is_refused() {
    // Private keys come only from C_GenerateKeyPair: importing one would make it extractable.
    let t = Token::new();
    let s = t.session();
    let r = s.create_object(&[
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::EC),
        Attribute::Token(true),
        Attribute::EcParams(P256_OID_DER.to_vec()),
        Attribute::Value(vec![1u8; 32]),
    ]);
    assert!(r.is_err(), "importing a private key must be refused: {r:?}");
}

#[test]
fn create_data_object_find_and_destroy() {
    let t = Token::new();
    let s = t.session();
    let data = s
        .create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Label(b"note".to_vec()),
            Attribute::Application(b"devicekey-tests".to_vec()),
            Attribute::Value(b"hello".to_vec()),
        ])
        .expect("C_CreateObject data");
    let found = find(
        &s,
        &[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Application(b"devicekey-tests".to_vec()),
        ],
    );
    assert_eq!(found, vec![data]);
    assert_eq!(
        attr_bytes(&s, data, AttributeType::Value),
        Some(b"hello".to_vec())
    );
    assert_eq!(label_of(&s, data), "note");

    // A session data object.
    let temp = s
        .create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(false),
            Attribute::Label(b"temp".to_vec()),
            Attribute::Value(vec![]),
        ])
        .expect("C_CreateObject session data");
    assert_eq!(attr_bytes(&s, temp, AttributeType::Value), Some(vec![]));

    s.destroy_object(data).expect("C_DestroyObject");
    assert!(find(&s, &[Attribute::Label(b"note".to_vec())]).is_empty());
    expect_err(s.destroy_object(data), &[RvError::ObjectHandleInvalid]);
    s.destroy_object(temp)
        .expect("C_DestroyObject session object");
    assert!(find(&s, &[Attribute::Class(ObjectClass::DATA)]).is_empty());
}

#[test]
fn destroy_key_pair() {
    let t = Token::new();
    let s = t.session();
    let (public, private) = gen_p256(&s, "doomed", true);
    s.destroy_object(private).expect("destroy private");
    s.destroy_object(public).expect("destroy public");
    assert!(find_by_label(&s, "doomed").is_empty());
    expect_err(
        s.sign_init(&Mechanism::Ecdsa, private),
        &[RvError::KeyHandleInvalid, RvError::ObjectHandleInvalid],
    );
    drop(s);
    let mut t = t;
    t.reinitialize();
    let s = t.session();
    assert!(
        find_by_label(&s, "doomed").is_empty(),
        "destroyed keys stay destroyed"
    );
}

#[test]
fn token_objects_persist_and_session_objects_do_not() {
    let mut t = Token::new();
    let (point, id) = {
        let s = t.session();
        let (public, _) = gen_p256(&s, "persistent", true);
        gen_p256(&s, "ephemeral", false);
        (public_point(&s, public), id_of(&s, public))
    };
    t.reinitialize();
    let s = t.session();
    let found = find_by_label(&s, "persistent");
    assert_eq!(
        found.len(),
        2,
        "token key pair survives C_Finalize/C_Initialize"
    );
    assert!(
        find_by_label(&s, "ephemeral").is_empty(),
        "session objects do not survive"
    );
    let privs = find(
        &s,
        &[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Id(id.clone()),
        ],
    );
    assert_eq!(privs.len(), 1);
    let public = common::public_for(&s, privs[0]);
    assert_eq!(
        public_point(&s, public),
        point,
        "same public key after restart"
    );
    // The reloaded key still signs, with the same key.
    let digest = common::sha256(b"after restart");
    let sig = s
        .sign(&Mechanism::Ecdsa, privs[0], &digest)
        .expect("C_Sign");
    assert!(common::verify_prehash(&point, &digest, &sig));
    // Every boolean still has its value.
    let b = read_bools(
        &s,
        privs[0],
        &[
            (CKA_TOKEN, "token"),
            (CKA_SENSITIVE, "sensitive"),
            (CKA_LOCAL, "local"),
            (CKA_NEVER_EXTRACTABLE, "ne"),
        ],
    );
    assert_eq!(b, vec![true, true, true, true]);
}

#[test]
fn session_objects_shared_between_sessions_and_vanish_at_close() {
    let t = Token::new();
    let a = t.session();
    let b = t.session();
    let (public, private) = gen_p256(&a, "session-only", false);
    let (tpub, _) = gen_p256(&a, "token-too", true);
    assert_eq!(
        find_by_label(&b, "session-only").len(),
        2,
        "session objects are visible to the app's other sessions"
    );
    // b can use a's session key.
    let digest = common::sha256(b"x");
    let sig = b
        .sign(&Mechanism::Ecdsa, private, &digest)
        .expect("sign from another session");
    assert!(common::verify_prehash(
        &public_point(&b, public),
        &digest,
        &sig
    ));
    a.close().expect("C_CloseSession");
    assert!(
        find_by_label(&b, "session-only").is_empty(),
        "gone when their session closes"
    );
    expect_err(
        b.get_attributes(public, &[AttributeType::Label]),
        &[RvError::ObjectHandleInvalid],
    );
    assert_eq!(
        find_by_label(&b, "token-too").len(),
        2,
        "token objects stay"
    );
    public_point(&b, tpub);
}
