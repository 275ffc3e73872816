//! Attribute values as the C caller sees them: a type and the exact bytes to copy out.
//!
//! CK_ULONG values are native-endian `CK_ULONG`s, CK_BBOOL values one byte; everything else is
//! raw bytes. Keeping values encoded makes C_GetAttributeValue a copy and C_FindObjects a byte
//! comparison.

use std::collections::BTreeMap;

use cryptoki_sys::*;

use super::error::{fail, Result};

/// `CK_UNAVAILABLE_INFORMATION`: `(CK_ULONG)-1`.
pub const CK_UNAVAILABLE_INFORMATION: CK_ULONG = !0;

/// The encoding of a CK_BBOOL.
pub fn bool_bytes(v: bool) -> Vec<u8> {
    vec![if v { CK_TRUE } else { CK_FALSE }]
}

/// The encoding of a CK_ULONG.
pub fn ulong_bytes(v: CK_ULONG) -> Vec<u8> {
    v.to_ne_bytes().to_vec()
}

/// Decodes a CK_BBOOL template value.
pub fn parse_bool(bytes: &[u8]) -> Result<bool> {
    match bytes {
        [b] => Ok(*b != CK_FALSE),
        _ => fail(CKR_ATTRIBUTE_VALUE_INVALID),
    }
}

/// Decodes a CK_ULONG template value.
pub fn parse_ulong(bytes: &[u8]) -> Result<CK_ULONG> {
    match <[u8; std::mem::size_of::<CK_ULONG>()]>::try_from(bytes) {
        Ok(b) => Ok(CK_ULONG::from_ne_bytes(b)),
        Err(_) => fail(CKR_ATTRIBUTE_VALUE_INVALID),
    }
}

/// A caller's template, decoded into owned values.
pub type Template = Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)>;

/// Looks up one attribute in a template (the last occurrence wins, as most tokens do).
pub fn find(template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)], t: CK_ATTRIBUTE_TYPE) -> Option<&[u8]> {
    template
        .iter()
        .rev()
        .find(|(ty, _)| *ty == t)
        .map(|(_, v)| v.as_slice())
}

/// Looks up a CK_BBOOL in a template.
pub fn find_bool(
    template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
    t: CK_ATTRIBUTE_TYPE,
) -> Result<Option<bool>> {
    find(template, t).map(parse_bool).transpose()
}

/// Looks up a CK_ULONG in a template.
pub fn find_ulong(
    template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
    t: CK_ATTRIBUTE_TYPE,
) -> Result<Option<CK_ULONG>> {
    find(template, t).map(parse_ulong).transpose()
}

/// The attributes of one object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attributes(BTreeMap<CK_ATTRIBUTE_TYPE, Vec<u8>>);

impl Attributes {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets raw bytes.
    pub fn set(&mut self, t: CK_ATTRIBUTE_TYPE, value: impl Into<Vec<u8>>) -> &mut Self {
        self.0.insert(t, value.into());
        self
    }

    /// Sets a CK_BBOOL.
    pub fn set_bool(&mut self, t: CK_ATTRIBUTE_TYPE, v: bool) -> &mut Self {
        self.set(t, bool_bytes(v))
    }

    /// Sets a CK_ULONG.
    pub fn set_ulong(&mut self, t: CK_ATTRIBUTE_TYPE, v: CK_ULONG) -> &mut Self {
        self.set(t, ulong_bytes(v))
    }

    /// Sets a value only when the attribute is absent.
    pub fn set_default(&mut self, t: CK_ATTRIBUTE_TYPE, value: impl Into<Vec<u8>>) -> &mut Self {
        self.0.entry(t).or_insert_with(|| value.into());
        self
    }

    /// The bytes of an attribute.
    pub fn get(&self, t: CK_ATTRIBUTE_TYPE) -> Option<&[u8]> {
        self.0.get(&t).map(Vec::as_slice)
    }

    /// A CK_BBOOL attribute (false when absent or malformed).
    pub fn get_bool(&self, t: CK_ATTRIBUTE_TYPE) -> bool {
        self.get(t)
            .is_some_and(|b| b.first().is_some_and(|v| *v != CK_FALSE))
    }

    /// A CK_ULONG attribute.
    pub fn get_ulong(&self, t: CK_ATTRIBUTE_TYPE) -> Option<CK_ULONG> {
        self.get(t).and_then(|b| parse_ulong(b).ok())
    }

    /// Every attribute, in type order.
    pub fn iter(&self) -> impl Iterator<Item = (CK_ATTRIBUTE_TYPE, &[u8])> {
        self.0.iter().map(|(t, v)| (*t, v.as_slice()))
    }

    /// True when every template entry is present here with the same bytes.
    pub fn matches(&self, template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)]) -> bool {
        template
            .iter()
            .all(|(t, v)| self.get(*t) == Some(v.as_slice()))
    }

    /// The attributes as a list, for storage.
    pub fn to_vec(&self) -> Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)> {
        self.0.iter().map(|(t, v)| (*t, v.clone())).collect()
    }

    /// Builds a set from a stored list.
    pub fn from_list(list: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)]) -> Self {
        Self(list.iter().cloned().collect())
    }
}
