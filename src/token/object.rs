//! Objects as the token shows them: key pairs from a store, certificates and data objects.
//!
//! An object is immutable once built; a change (C_SetAttributeValue) builds a new one under the
//! same handle. Private keys carry their [`Signer`]; nothing in an object holds key material.

use std::sync::Arc;

use cryptoki_sys::*;
use der::{Decode, Encode};

use super::attributes::{find, find_bool, find_ulong, ulong_bytes, Attributes, Template};
use super::error::{fail, Result};
use super::host;
use super::mechanism::{PRIVATE_KEY_MECHANISMS, PUBLIC_KEY_MECHANISMS};
use crate::backend::{KeyPurpose, KeyRecord, ProtectionClass, Signer};
use crate::encoding::{self, P256_EC_PARAMS};
use crate::vendor::{
    CKA_DEVICEKEY_PROTECTION_CLASS, CKA_DEVICEKEY_PURPOSE, CKA_DEVICEKEY_TPM_PUBLIC_AREA,
};

/// Where an object lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// One half of a key pair in the store, by the store's name for it.
    Key(String),
    /// A certificate or data object in the store.
    Stored(String),
    /// A session object, which dies with its session.
    Session(CK_SESSION_HANDLE),
}

/// What an attribute lookup finds.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// The value, ready to copy.
    Value(&'a [u8]),
    /// The attribute exists but may not be revealed.
    Sensitive,
    /// The object has no such attribute.
    Invalid,
}

/// One object.
pub struct Object {
    /// CKA_CLASS.
    pub class: CK_OBJECT_CLASS,
    /// Every attribute the object answers.
    pub attrs: Attributes,
    /// Where it lives.
    pub origin: Origin,
    /// For private keys: the signer.
    pub signer: Option<Arc<dyn Signer>>,
    /// For keys: the purpose.
    pub purpose: KeyPurpose,
    /// For keys: the public point, SEC1 uncompressed.
    pub public_point: Option<[u8; 65]>,
    /// For session keys: the session that owns them (key-pair origin, session lifetime).
    pub owner_session: Option<CK_SESSION_HANDLE>,
}

impl Object {
    /// Looks up one attribute for C_GetAttributeValue.
    pub fn lookup(&self, t: CK_ATTRIBUTE_TYPE) -> Lookup<'_> {
        if let Some(v) = self.attrs.get(t) {
            return Lookup::Value(v);
        }
        if self.class == CKO_PRIVATE_KEY && t == CKA_VALUE {
            return Lookup::Sensitive;
        }
        Lookup::Invalid
    }

    /// CKA_TOKEN.
    pub fn is_token(&self) -> bool {
        self.attrs.get_bool(CKA_TOKEN)
    }

    /// The session that owns this object, if it is a session object.
    pub fn session_owner(&self) -> Option<CK_SESSION_HANDLE> {
        match self.origin {
            Origin::Session(s) => Some(s),
            _ => self.owner_session,
        }
    }

    /// The object with a new label and/or CKA_ID.
    pub fn relabeled(&self, label: Option<&[u8]>, id: Option<&[u8]>) -> Self {
        let mut attrs = self.attrs.clone();
        if let Some(l) = label {
            attrs.set(CKA_LABEL, l.to_vec());
        }
        if let Some(i) = id {
            attrs.set(CKA_ID, i.to_vec());
        }
        Self {
            class: self.class,
            attrs,
            origin: self.origin.clone(),
            signer: self.signer.clone(),
            purpose: self.purpose,
            public_point: self.public_point,
            owner_session: self.owner_session,
        }
    }
}

/// CKA_PUBLIC_KEY_INFO: the SubjectPublicKeyInfo DER of a point; empty (and logged) for a point
/// a store handed us that is not on P-256.
fn public_key_info(name: &str, point: &[u8; encoding::POINT_LEN]) -> Vec<u8> {
    encoding::spki_der(point).unwrap_or_else(|e| {
        log::warn!("key {name}: no CKA_PUBLIC_KEY_INFO: {e}");
        Vec::new()
    })
}

fn ulong_list(list: &[CK_MECHANISM_TYPE]) -> Vec<u8> {
    list.iter().flat_map(|m| m.to_ne_bytes()).collect()
}

/// Checks CKA_EC_PARAMS of a key-generation template: P-256 only.
pub fn check_ec_params(params: Option<&[u8]>) -> Result<()> {
    match params {
        None => Ok(()),
        Some(p) if encoding::is_p256_params(p) => Ok(()),
        // Another named curve (an OID).
        Some([0x06, ..]) => fail(CKR_CURVE_NOT_SUPPORTED),
        Some(_) => fail(CKR_DOMAIN_PARAMS_INVALID),
    }
}

/// The private and public objects of a key pair. The public key is never CKA_PRIVATE (OpenSSH
/// and NSS enumerate keys before logging in); the private key is CKA_PRIVATE exactly when the
/// slot has a PIN (`login_required`).
pub fn key_pair(rec: &KeyRecord, class: ProtectionClass, login_required: bool) -> (Object, Object) {
    let origin = Origin::Key(rec.name.clone());
    let mut common = Attributes::new();
    common
        .set_bool(CKA_TOKEN, rec.persistent)
        .set_bool(CKA_MODIFIABLE, true)
        .set_bool(CKA_COPYABLE, false)
        .set_bool(CKA_DESTROYABLE, true)
        .set(CKA_LABEL, rec.label.as_bytes().to_vec())
        .set_ulong(CKA_KEY_TYPE, CKK_EC)
        .set(CKA_ID, rec.id.clone())
        .set(CKA_START_DATE, Vec::new())
        .set(CKA_END_DATE, Vec::new())
        .set_bool(CKA_DERIVE, false)
        .set_bool(CKA_LOCAL, true)
        .set_ulong(CKA_KEY_GEN_MECHANISM, CKM_EC_KEY_PAIR_GEN)
        .set(CKA_SUBJECT, Vec::new())
        .set(CKA_EC_PARAMS, P256_EC_PARAMS.to_vec())
        .set(CKA_EC_POINT, encoding::ec_point_der(&rec.public_point))
        .set(
            CKA_PUBLIC_KEY_INFO,
            public_key_info(&rec.name, &rec.public_point),
        )
        .set_bool(CKA_ENCRYPT, false)
        .set_bool(CKA_DECRYPT, false)
        .set_bool(CKA_WRAP, false)
        .set_bool(CKA_UNWRAP, false)
        .set_bool(CKA_SIGN_RECOVER, false)
        .set_bool(CKA_VERIFY_RECOVER, false)
        .set_bool(CKA_ALWAYS_AUTHENTICATE, false)
        .set_bool(CKA_WRAP_WITH_TRUSTED, false)
        .set_bool(CKA_TRUSTED, false)
        .set_ulong(CKA_DEVICEKEY_PROTECTION_CLASS, class.vendor_value())
        .set_ulong(CKA_DEVICEKEY_PURPOSE, rec.purpose.vendor_value());
    if let Some(area) = rec.signer.tpm_public_area() {
        common.set(CKA_DEVICEKEY_TPM_PUBLIC_AREA, area);
    }

    let mut private = common.clone();
    let private_mechs: &[CK_MECHANISM_TYPE] = match rec.purpose {
        KeyPurpose::General => PRIVATE_KEY_MECHANISMS,
        KeyPurpose::Proof => &[CKM_ECDSA_SHA256],
    };
    private
        .set_ulong(CKA_CLASS, CKO_PRIVATE_KEY)
        .set_bool(CKA_PRIVATE, login_required)
        .set(CKA_UNIQUE_ID, format!("{}.private", rec.name).into_bytes())
        .set_bool(CKA_SIGN, true)
        .set_bool(CKA_VERIFY, false)
        .set_bool(CKA_SENSITIVE, true)
        .set_bool(CKA_EXTRACTABLE, false)
        .set_bool(CKA_ALWAYS_SENSITIVE, true)
        .set_bool(CKA_NEVER_EXTRACTABLE, true);

    let mut public = common;
    public
        .set_ulong(CKA_CLASS, CKO_PUBLIC_KEY)
        .set_bool(CKA_PRIVATE, false)
        .set(CKA_UNIQUE_ID, format!("{}.public", rec.name).into_bytes())
        .set_bool(CKA_SIGN, false)
        .set_bool(CKA_VERIFY, true)
        .set_bool(CKA_SENSITIVE, false)
        .set_bool(CKA_EXTRACTABLE, true)
        .set_bool(CKA_ALWAYS_SENSITIVE, false)
        .set_bool(CKA_NEVER_EXTRACTABLE, false);
    // Not through p11-kit's RPC, which cannot carry this attribute's length query (see `host`).
    if !host::hosted_by_p11_kit_rpc() {
        private.set(CKA_ALLOWED_MECHANISMS, ulong_list(private_mechs));
        public.set(CKA_ALLOWED_MECHANISMS, ulong_list(PUBLIC_KEY_MECHANISMS));
    }

    let owner = None;
    (
        Object {
            class: CKO_PRIVATE_KEY,
            attrs: private,
            origin: origin.clone(),
            signer: Some(rec.signer.clone()),
            purpose: rec.purpose,
            public_point: Some(rec.public_point),
            owner_session: owner,
        },
        Object {
            class: CKO_PUBLIC_KEY,
            attrs: public,
            origin,
            signer: None,
            purpose: rec.purpose,
            public_point: Some(rec.public_point),
            owner_session: owner,
        },
    )
}

/// What a key-generation template asks for, after validation.
#[derive(Debug, Default)]
pub struct KeyGenRequest {
    /// CKA_TOKEN (either template).
    pub persistent: bool,
    /// CKA_LABEL.
    pub label: Option<Vec<u8>>,
    /// CKA_ID.
    pub id: Option<Vec<u8>>,
    /// CKA_DEVICEKEY_PURPOSE.
    pub purpose: KeyPurpose,
}

/// Attributes a key-generation template may set to the value we have anyway.
fn check_benign(template: &Template, t: CK_ATTRIBUTE_TYPE, allowed: bool) -> Result<()> {
    match find_bool(template, t)? {
        Some(v) if v != allowed => fail(CKR_ATTRIBUTE_VALUE_INVALID),
        _ => Ok(()),
    }
}

/// Validates the two templates of C_GenerateKeyPair.
pub fn parse_keygen(public: &Template, private: &Template) -> Result<KeyGenRequest> {
    for (t, _) in public.iter().chain(private.iter()) {
        if !KEY_TEMPLATE_ATTRIBUTES.contains(t) {
            log::info!("C_GenerateKeyPair: attribute type {t:#x} is not supported");
            return fail(CKR_ATTRIBUTE_TYPE_INVALID);
        }
    }
    if let Some(c) = find_ulong(public, CKA_CLASS)? {
        if c != CKO_PUBLIC_KEY {
            return fail(CKR_TEMPLATE_INCONSISTENT);
        }
    }
    if let Some(c) = find_ulong(private, CKA_CLASS)? {
        if c != CKO_PRIVATE_KEY {
            return fail(CKR_TEMPLATE_INCONSISTENT);
        }
    }
    for tpl in [public, private] {
        if let Some(k) = find_ulong(tpl, CKA_KEY_TYPE)? {
            if k != CKK_EC {
                return fail(CKR_TEMPLATE_INCONSISTENT);
            }
        }
        check_ec_params(find(tpl, CKA_EC_PARAMS))?;
    }
    if find(public, CKA_EC_PARAMS).is_none() && find(private, CKA_EC_PARAMS).is_none() {
        // The spec makes CKA_EC_PARAMS mandatory in the public template.
        return fail(CKR_TEMPLATE_INCOMPLETE);
    }
    // A private key never leaves the store: asking otherwise is an error.
    check_benign(private, CKA_SENSITIVE, true)?;
    check_benign(private, CKA_EXTRACTABLE, false)?;
    // Usage flags are tolerated (pkcs11-tool and NSS ask for CKA_DERIVE on every EC key); the
    // key reports what it can really do.
    for (tpl, t) in [
        (private, CKA_DECRYPT),
        (private, CKA_UNWRAP),
        (private, CKA_DERIVE),
        (private, CKA_SIGN_RECOVER),
        (public, CKA_ENCRYPT),
        (public, CKA_WRAP),
        (public, CKA_DERIVE),
        (public, CKA_VERIFY_RECOVER),
    ] {
        if find_bool(tpl, t)? == Some(true) {
            log::info!(
                "C_GenerateKeyPair: attribute {t:#x}=true ignored; P-256 keys here only sign"
            );
        }
    }
    let token_pub = find_bool(public, CKA_TOKEN)?;
    let token_priv = find_bool(private, CKA_TOKEN)?;
    let persistent = match (token_pub, token_priv) {
        (Some(a), Some(b)) if a != b => return fail(CKR_TEMPLATE_INCONSISTENT),
        (a, b) => a.or(b).unwrap_or(false),
    };
    let label = find(private, CKA_LABEL)
        .or_else(|| find(public, CKA_LABEL))
        .map(<[u8]>::to_vec);
    let id = find(private, CKA_ID)
        .or_else(|| find(public, CKA_ID))
        .map(<[u8]>::to_vec);
    let purpose = match find_ulong(private, CKA_DEVICEKEY_PURPOSE)?
        .or(find_ulong(public, CKA_DEVICEKEY_PURPOSE)?)
    {
        None => KeyPurpose::General,
        Some(v) => match KeyPurpose::from_vendor_value(v) {
            Some(p) => p,
            None => return fail(CKR_ATTRIBUTE_VALUE_INVALID),
        },
    };
    Ok(KeyGenRequest {
        persistent,
        label,
        id,
        purpose,
    })
}

/// Attribute types a key-generation template may carry.
const KEY_TEMPLATE_ATTRIBUTES: &[CK_ATTRIBUTE_TYPE] = &[
    CKA_CLASS,
    CKA_TOKEN,
    CKA_PRIVATE,
    CKA_MODIFIABLE,
    CKA_COPYABLE,
    CKA_DESTROYABLE,
    CKA_LABEL,
    CKA_KEY_TYPE,
    CKA_ID,
    CKA_START_DATE,
    CKA_END_DATE,
    CKA_DERIVE,
    CKA_SUBJECT,
    CKA_EC_PARAMS,
    CKA_SENSITIVE,
    CKA_EXTRACTABLE,
    CKA_SIGN,
    CKA_VERIFY,
    CKA_ENCRYPT,
    CKA_DECRYPT,
    CKA_WRAP,
    CKA_UNWRAP,
    CKA_SIGN_RECOVER,
    CKA_VERIFY_RECOVER,
    CKA_ALWAYS_AUTHENTICATE,
    CKA_WRAP_WITH_TRUSTED,
    CKA_TRUSTED,
    CKA_ALLOWED_MECHANISMS,
    CKA_DEVICEKEY_PURPOSE,
];

/// Builds the attributes of a certificate or data object from a C_CreateObject template.
pub fn parse_create(template: &Template) -> Result<Attributes> {
    let class = match find_ulong(template, CKA_CLASS)? {
        Some(c) => c,
        None => return fail(CKR_TEMPLATE_INCOMPLETE),
    };
    for t in [
        CKA_DEVICEKEY_PROTECTION_CLASS,
        CKA_DEVICEKEY_PURPOSE,
        CKA_DEVICEKEY_TPM_PUBLIC_AREA,
        CKA_UNIQUE_ID,
    ] {
        if find(template, t).is_some() {
            return fail(CKR_ATTRIBUTE_READ_ONLY);
        }
    }
    for t in [
        CKA_TOKEN,
        CKA_PRIVATE,
        CKA_MODIFIABLE,
        CKA_COPYABLE,
        CKA_DESTROYABLE,
    ] {
        if let Some(v) = find(template, t) {
            super::attributes::parse_bool(v)?;
        }
    }
    match class {
        CKO_CERTIFICATE => {
            match find_ulong(template, CKA_CERTIFICATE_TYPE)? {
                Some(CKC_X_509) => {}
                Some(_) => return fail(CKR_ATTRIBUTE_VALUE_INVALID),
                None => return fail(CKR_TEMPLATE_INCOMPLETE),
            }
            let value = match find(template, CKA_VALUE) {
                Some(v) => v,
                None => return fail(CKR_TEMPLATE_INCOMPLETE),
            };
            if let Err(e) = x509_cert::Certificate::from_der(value) {
                log::info!("C_CreateObject: CKA_VALUE is not an X.509 certificate: {e}");
                return fail(CKR_ATTRIBUTE_VALUE_INVALID);
            }
        }
        CKO_DATA => {}
        CKO_PUBLIC_KEY | CKO_PRIVATE_KEY | CKO_SECRET_KEY => {
            log::info!(
                "C_CreateObject: importing keys is not supported; generate them on the token"
            );
            return fail(CKR_ATTRIBUTE_VALUE_INVALID);
        }
        _ => return fail(CKR_ATTRIBUTE_VALUE_INVALID),
    }
    let mut attrs = Attributes::new();
    for (t, v) in template {
        attrs.set(*t, v.clone());
    }
    complete(class, &mut attrs);
    Ok(attrs)
}

/// Fills in every attribute a certificate or data object answers that its creator (or the store
/// it came from) left out: the common defaults, and for certificates the subject, issuer, serial
/// number and check value read from the DER.
pub fn complete(class: CK_OBJECT_CLASS, attrs: &mut Attributes) {
    attrs
        .set_default(CKA_TOKEN, vec![CK_FALSE])
        .set_default(CKA_PRIVATE, vec![CK_FALSE])
        .set_default(CKA_MODIFIABLE, vec![CK_TRUE])
        .set_default(CKA_COPYABLE, vec![CK_FALSE])
        .set_default(CKA_DESTROYABLE, vec![CK_TRUE])
        .set_default(CKA_LABEL, Vec::new());
    match class {
        CKO_CERTIFICATE => {
            let value = attrs.get(CKA_VALUE).unwrap_or_default().to_vec();
            if let Ok(cert) = x509_cert::Certificate::from_der(&value) {
                let tbs = &cert.tbs_certificate;
                attrs
                    .set_default(CKA_SUBJECT, tbs.subject.to_der().unwrap_or_default())
                    .set_default(CKA_ISSUER, tbs.issuer.to_der().unwrap_or_default())
                    .set_default(
                        CKA_SERIAL_NUMBER,
                        tbs.serial_number.to_der().unwrap_or_default(),
                    );
            }
            attrs
                .set_default(CKA_ID, Vec::new())
                .set_default(CKA_TRUSTED, vec![CK_FALSE])
                .set_default(CKA_START_DATE, Vec::new())
                .set_default(CKA_END_DATE, Vec::new())
                .set_default(CKA_URL, Vec::new())
                .set_default(CKA_HASH_OF_SUBJECT_PUBLIC_KEY, Vec::new())
                .set_default(CKA_HASH_OF_ISSUER_PUBLIC_KEY, Vec::new())
                .set_default(CKA_CERTIFICATE_CATEGORY, ulong_bytes(0))
                .set_default(CKA_JAVA_MIDP_SECURITY_DOMAIN, ulong_bytes(0))
                .set_default(CKA_NAME_HASH_ALGORITHM, ulong_bytes(CKM_SHA_1))
                .set_default(CKA_CHECK_VALUE, sha1_check::check_value(&value));
        }
        CKO_DATA => {
            attrs
                .set_default(CKA_APPLICATION, Vec::new())
                .set_default(CKA_OBJECT_ID, Vec::new())
                .set_default(CKA_VALUE, Vec::new());
        }
        _ => {}
    }
}

mod sha1_check {
    //! CKA_CHECK_VALUE of a certificate: the first three bytes of its SHA-1.
    pub fn check_value(der: &[u8]) -> Vec<u8> {
        use sha1::Digest;
        sha1::Sha1::digest(der)[..3].to_vec()
    }
}

/// A stored certificate or data object.
pub fn stored(class: CK_OBJECT_CLASS, attrs: Attributes, origin: Origin) -> Object {
    Object {
        class,
        attrs,
        origin,
        signer: None,
        purpose: KeyPurpose::General,
        public_point: None,
        owner_session: None,
    }
}
