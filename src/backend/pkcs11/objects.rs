//! Certificates and data objects, stored in the wrapped token as token objects.
//!
//! An object's name is derived from its content (see `encoding::object_name`): the same in every
//! process and after a reconnect. After `update_object` the caller's name keeps working in this
//! process; a later `load_objects` reports the name of the new content.

use cryptoki::error::Error as CkError;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki_sys::{
    CKA_APPLICATION, CKA_CERTIFICATE_TYPE, CKA_CLASS, CKA_ID, CKA_ISSUER, CKA_LABEL,
    CKA_MODIFIABLE, CKA_OBJECT_ID, CKA_PRIVATE, CKA_SERIAL_NUMBER, CKA_SUBJECT, CKA_TOKEN,
    CKA_VALUE, CKO_CERTIFICATE, CKO_DATA, CK_ATTRIBUTE_TYPE,
};

use super::encoding::{
    attribute_to_raw, object_name, raw_bytes, raw_to_attribute, raw_ulong, META_APPLICATION,
    OBJECT_ATTRIBUTES,
};
use super::errors::{handle_stale, rv, OpError};
use super::pool::{lock, Inner};
use crate::backend::{BackendError, ObjectRecord, RawAttribute};

type Op<T> = std::result::Result<T, OpError>;

/// Reads the attributes an object has, as raw attributes.
pub(super) fn read_raw(
    s: &Session,
    h: ObjectHandle,
) -> std::result::Result<Vec<RawAttribute>, CkError> {
    match s.get_attributes(h, OBJECT_ATTRIBUTES) {
        Ok(attrs) => Ok(attrs.iter().filter_map(attribute_to_raw).collect()),
        // A value `cryptoki` cannot model (say, a vendor certificate type): read one at a time
        // and leave out what cannot be read.
        Err(e) if rv(&e).is_none() => Ok(OBJECT_ATTRIBUTES
            .iter()
            .filter_map(|t| s.get_attributes(h, &[*t]).ok())
            .flatten()
            .filter_map(|a| attribute_to_raw(&a))
            .collect()),
        Err(e) => Err(e),
    }
}

/// Checks what the token layer asks to store, and makes it a token object.
pub(super) fn prepare(attributes: &[RawAttribute]) -> crate::backend::Result<Vec<RawAttribute>> {
    match raw_ulong(attributes, CKA_CLASS) {
        Some(c) if c == CKO_CERTIFICATE || c == CKO_DATA => {}
        Some(c) => {
            return Err(BackendError::Refused(format!(
                "the pkcs11 key store keeps only certificates and data objects, not class {c:#x}"
            )))
        }
        None => return Err(BackendError::Refused("object without CKA_CLASS".into())),
    }
    check_application(attributes)?;
    // Only what a token must be told: the defaults our token fills in (CKA_COPYABLE,
    // CKA_NAME_HASH_ALGORITHM, empty dates and hashes...) make some tokens (SoftHSM 2.6) fail
    // C_CreateObject with CKR_GENERAL_ERROR, and our token fills them in again on load.
    let mut out: Vec<RawAttribute> = attributes
        .iter()
        .filter(|(t, v)| FORWARDED.contains(t) && (!v.is_empty() || *t == CKA_LABEL))
        .cloned()
        .collect();
    out.push((CKA_TOKEN, vec![1]));
    Ok(out)
}

/// The attributes of a certificate or data object that go to the wrapped token.
const FORWARDED: &[CK_ATTRIBUTE_TYPE] = &[
    CKA_CLASS,
    CKA_PRIVATE,
    CKA_MODIFIABLE,
    CKA_LABEL,
    CKA_ID,
    CKA_VALUE,
    CKA_CERTIFICATE_TYPE,
    CKA_SUBJECT,
    CKA_ISSUER,
    CKA_SERIAL_NUMBER,
    CKA_APPLICATION,
    CKA_OBJECT_ID,
];

fn check_application(attributes: &[RawAttribute]) -> crate::backend::Result<()> {
    if raw_bytes(attributes, CKA_APPLICATION) == Some(META_APPLICATION) {
        return Err(BackendError::Refused(
            "CKA_APPLICATION \"devicekey\" is reserved for devicekey's own metadata".into(),
        ));
    }
    Ok(())
}

/// Assigns each object its content name; identical objects get `-2`, `-3`... in handle order.
fn name_all(
    mut found: Vec<(ObjectHandle, Vec<RawAttribute>)>,
) -> Vec<(String, ObjectHandle, Vec<RawAttribute>)> {
    found.sort_by_key(|(h, _)| h.handle());
    let mut out: Vec<(String, ObjectHandle, Vec<RawAttribute>)> = Vec::new();
    for (h, raw) in found {
        let base = object_name(&raw);
        let mut name = base.clone();
        let mut n = 1;
        while out.iter().any(|(other, _, _)| *other == name) {
            n += 1;
            name = format!("{base}-{n}");
        }
        out.push((name, h, raw));
    }
    out
}

impl Inner {
    /// Every certificate and data object on the token (not our metadata), named; their handles
    /// are remembered by name.
    pub(super) fn scan_objects(&self, s: &Session) -> Op<Vec<ObjectRecord>> {
        let mut found = Vec::new();
        for class in [ObjectClass::CERTIFICATE, ObjectClass::DATA] {
            for h in s.find_objects(&[Attribute::Class(class), Attribute::Token(true)])? {
                let raw = match read_raw(s, h) {
                    Ok(r) => r,
                    Err(e) if handle_stale(&e) => continue,
                    Err(e) => return Err(e.into()),
                };
                if raw_bytes(&raw, CKA_APPLICATION) == Some(META_APPLICATION) {
                    continue;
                }
                found.push((h, raw));
            }
        }
        let mut known = lock(&self.objects)?;
        Ok(name_all(found)
            .into_iter()
            .map(|(name, h, attributes)| {
                known.insert(name.clone(), h);
                ObjectRecord { name, attributes }
            })
            .collect())
    }

    /// Creates a token object; returns its handle and attributes as the token reports them.
    pub(super) fn create(&self, s: &Session, template: &[Attribute]) -> Op<String> {
        let h = s.create_object(template)?;
        // Not retried from here on: a retry would store the object twice.
        let raw = match read_raw(s, h) {
            Ok(r) => r,
            Err(e) => {
                let _ = s.destroy_object(h);
                return Err(OpError::from(e).finalize("read back the stored object"));
            }
        };
        let base = object_name(&raw);
        let mut known = lock(&self.objects)?;
        let mut name = base.clone();
        let mut n = 1;
        while known.get(&name).is_some_and(|other| *other != h) {
            n += 1;
            name = format!("{base}-{n}");
        }
        known.insert(name.clone(), h);
        Ok(name)
    }

    fn resolve_object(&self, s: &Session, name: &str) -> Op<ObjectHandle> {
        if let Some(h) = lock(&self.objects)?.get(name) {
            return Ok(*h);
        }
        self.scan_objects(s)?;
        lock(&self.objects)?.get(name).copied().ok_or_else(|| {
            BackendError::NotFound(format!(
                "object {name} is not in token '{}'",
                self.settings.token
            ))
            .into()
        })
    }

    /// Runs `op` on a named object's handle; a stale handle is looked up again once.
    pub(super) fn with_object<T>(
        &self,
        s: &Session,
        name: &str,
        op: impl Fn(ObjectHandle) -> std::result::Result<T, CkError>,
    ) -> Op<T> {
        let h = self.resolve_object(s, name)?;
        match op(h) {
            Err(e) if handle_stale(&e) => {
                lock(&self.objects)?.remove(name);
                let h = self.resolve_object(s, name)?;
                Ok(op(h)?)
            }
            other => Ok(other?),
        }
    }

    /// Sets the attributes that differ from what the object has now.
    pub(super) fn update(&self, s: &Session, name: &str, attributes: &[RawAttribute]) -> Op<()> {
        check_application(attributes)?;
        self.with_object(s, name, |h| {
            let current = read_raw(s, h)?;
            let changes: Vec<Attribute> = attributes
                .iter()
                .filter(|a| !current.contains(a))
                .map(raw_to_attribute)
                .collect();
            if changes.is_empty() {
                return Ok(());
            }
            s.update_attributes(h, &changes)
        })
    }

    /// Destroys a named object.
    pub(super) fn destroy_named(&self, s: &Session, name: &str) -> Op<()> {
        self.with_object(s, name, |h| s.destroy_object(h))?;
        lock(&self.objects)?.remove(name);
        Ok(())
    }
}
