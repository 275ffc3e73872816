//! Key pairs in the wrapped token: listing, pairing by CKA_ID, generation, lookup, and our
//! metadata objects.
//!
//! Key metadata (the purpose; the class is the slot's) lives in the wrapped token itself, as one
//! CKO_DATA object per key: CKA_APPLICATION "devicekey", CKA_LABEL "devicekey-key:<name>",
//! CKA_VALUE `{"key":"<name>","purpose":"proof"}`, CKA_PRIVATE (when we log in) and
//! CKA_MODIFIABLE=false. Why in the token rather than in a file next to us: the purpose travels
//! with the key (a network HSM is shared by several machines and users; a proof-only key must not
//! turn general on the next machine or under another data directory), it is created and deleted
//! in the same place as the key, and there is no second store to keep in sync or to protect.
//! A key without a metadata object (made by another tool) is a general key; a key whose metadata
//! object is unreadable is skipped (fail closed).

use std::collections::HashMap;

use cryptoki::error::Error as CkError;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::encoding::{key_name, META_APPLICATION, META_LABEL_PREFIX};
use super::errors::{describe, handle_stale, OpError};
use super::pool::{lock, Inner, KeyEntry};
use crate::backend::{BackendError, KeyPurpose, NewKey};
use crate::encoding::{decode_ec_point, hex, P256_EC_PARAMS};

/// A persistent key pair found in the wrapped token: its name and CKA_LABEL, and what we
/// remember about it.
pub(super) struct Scanned {
    pub name: String,
    pub label: String,
    pub entry: KeyEntry,
}

type Op<T> = std::result::Result<T, OpError>;

fn ec_template(class: ObjectClass) -> Vec<Attribute> {
    vec![Attribute::Class(class), Attribute::KeyType(KeyType::EC)]
}

/// The public point of a P-256 public key object; `None` for other curves or unreadable points.
fn read_point(s: &Session, h: ObjectHandle) -> Op<Option<(Vec<u8>, [u8; 65])>> {
    let attrs = match s.get_attributes(
        h,
        &[
            AttributeType::Id,
            AttributeType::EcParams,
            AttributeType::EcPoint,
        ],
    ) {
        Ok(a) => a,
        Err(e) if handle_stale(&e) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let (mut id, mut params, mut point) = (Vec::new(), None, None);
    for a in attrs {
        match a {
            Attribute::Id(v) => id = v,
            Attribute::EcParams(v) => params = Some(v),
            Attribute::EcPoint(v) => point = Some(v),
            _ => {}
        }
    }
    if params.as_deref() != Some(&P256_EC_PARAMS[..]) {
        return Ok(None);
    }
    match point.as_deref().and_then(|v| decode_ec_point(v).ok()) {
        Some(p) => Ok(Some((id, p))),
        None => {
            log::warn!(
                "public key (CKA_ID {}) has an unreadable CKA_EC_POINT; skipped",
                hex(&id)
            );
            Ok(None)
        }
    }
}

impl Inner {
    /// Every P-256 signing key pair on the token, paired by CKA_ID, with its purpose.
    pub(super) fn scan_keys(&self, s: &Session) -> Op<Vec<Scanned>> {
        let token = &self.settings.token;
        let mut pubs: HashMap<Vec<u8>, Vec<(ObjectHandle, [u8; 65])>> = HashMap::new();
        let mut template = ec_template(ObjectClass::PUBLIC_KEY);
        template.push(Attribute::Token(true));
        for h in s.find_objects(&template)? {
            if let Some((id, point)) = read_point(s, h)? {
                pubs.entry(id).or_default().push((h, point));
            }
        }
        let mut privs: HashMap<Vec<u8>, Vec<(ObjectHandle, String)>> = HashMap::new();
        let mut template = ec_template(ObjectClass::PRIVATE_KEY);
        template.push(Attribute::Token(true));
        for h in s.find_objects(&template)? {
            let attrs = match s.get_attributes(
                h,
                &[
                    AttributeType::Id,
                    AttributeType::Label,
                    AttributeType::EcParams,
                    AttributeType::Sign,
                ],
            ) {
                Ok(a) => a,
                Err(e) if handle_stale(&e) => continue,
                Err(e) => return Err(e.into()),
            };
            let (mut id, mut label, mut p256, mut sign) = (Vec::new(), String::new(), true, false);
            for a in attrs {
                match a {
                    Attribute::Id(v) => id = v,
                    Attribute::Label(v) => label = String::from_utf8_lossy(&v).into_owned(),
                    Attribute::EcParams(v) => p256 = v == P256_EC_PARAMS,
                    Attribute::Sign(b) => sign = b,
                    _ => {}
                }
            }
            if p256 && sign {
                privs.entry(id).or_default().push((h, label));
            }
        }
        let meta = self.scan_meta(s)?;
        let mut out: Vec<Scanned> = Vec::new();
        for (id, mut list) in privs {
            if list.len() > 1 {
                log::warn!(
                    "token '{token}': {} private keys share CKA_ID {}; none of them is served (give each key its own CKA_ID)",
                    list.len(),
                    hex(&id)
                );
                continue;
            }
            let (private, label) = list.remove(0);
            let (public, point) = match pubs.get(&id).map(Vec::as_slice) {
                None | Some([]) => {
                    log::warn!(
                        "token '{token}': private key '{label}' (CKA_ID {}) has no public key object with the same CKA_ID (another process may be writing the pair); skipped",
                        hex(&id)
                    );
                    continue;
                }
                Some([one]) => *one,
                Some(many) => {
                    if many.iter().any(|(_, p)| *p != many[0].1) {
                        log::warn!(
                            "token '{token}': several public keys with CKA_ID {} and different points; key '{label}' skipped",
                            hex(&id)
                        );
                        continue;
                    }
                    many[0]
                }
            };
            let name = key_name(&point);
            let purpose = match meta.get(&name) {
                None => KeyPurpose::General,
                Some(Some(p)) => *p,
                Some(None) => {
                    log::warn!(
                        "token '{token}': the metadata of key '{label}' ({name}) is unreadable; the key is not served"
                    );
                    continue;
                }
            };
            if out.iter().any(|k| k.name == name) {
                log::warn!("token '{token}': key '{label}' ({name}) is present twice; served once");
                continue;
            }
            out.push(Scanned {
                name,
                label,
                entry: KeyEntry {
                    id,
                    point,
                    purpose,
                    persistent: true,
                    private: Some(private),
                    public: Some(public),
                },
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Our metadata objects: key name → purpose (`None` when unreadable).
    fn scan_meta(&self, s: &Session) -> Op<HashMap<String, Option<KeyPurpose>>> {
        let mut out = HashMap::new();
        for h in s.find_objects(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Application(META_APPLICATION.to_vec()),
        ])? {
            let attrs = match s.get_attributes(h, &[AttributeType::Label, AttributeType::Value]) {
                Ok(a) => a,
                Err(e) if handle_stale(&e) => continue,
                Err(e) => return Err(e.into()),
            };
            let (mut label, mut value) = (Vec::new(), Vec::new());
            for a in attrs {
                match a {
                    Attribute::Label(v) => label = v,
                    Attribute::Value(v) => value = v,
                    _ => {}
                }
            }
            let Some(name) = std::str::from_utf8(&label)
                .ok()
                .and_then(|l| l.strip_prefix(META_LABEL_PREFIX))
            else {
                continue;
            };
            let purpose = serde_json::from_slice::<serde_json::Value>(&value)
                .ok()
                .filter(|v| v.get("key").and_then(|k| k.as_str()) == Some(name))
                .and_then(|v| serde_json::from_value::<KeyPurpose>(v.get("purpose")?.clone()).ok());
            // Two metadata objects that disagree make the key unreadable.
            let entry = out.entry(name.to_string()).or_insert(purpose);
            if *entry != purpose {
                *entry = None;
            }
        }
        Ok(out)
    }

    fn meta_handles(&self, s: &Session, name: &str) -> Op<Vec<ObjectHandle>> {
        Ok(s.find_objects(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Application(META_APPLICATION.to_vec()),
            Attribute::Label(format!("{META_LABEL_PREFIX}{name}").into_bytes()),
        ])?)
    }

    /// Rescans the token and refreshes the known persistent keys.
    pub(super) fn refresh_keys(&self, s: &Session) -> Op<Vec<Scanned>> {
        let scanned = self.scan_keys(s)?;
        let mut keys = lock(&self.keys)?;
        keys.retain(|_, e| !e.persistent);
        for k in &scanned {
            keys.insert(k.name.clone(), k.entry.clone());
        }
        Ok(scanned)
    }

    /// Generates a P-256 key pair in the wrapped token (and its metadata object).
    pub(super) fn generate(&self, s: &Session, req: &NewKey) -> Op<KeyEntry> {
        let private_objects = self.settings.pin.is_some();
        let label = req.label.as_bytes().to_vec();
        let public_template = vec![
            Attribute::Token(req.persistent),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::EcParams(P256_EC_PARAMS.to_vec()),
            Attribute::Label(label.clone()),
            Attribute::Id(req.id.clone()),
        ];
        let private_template = vec![
            Attribute::Token(req.persistent),
            Attribute::Private(private_objects),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Derive(false),
            Attribute::Label(label),
            Attribute::Id(req.id.clone()),
        ];
        let (public, private) = s.generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &public_template,
            &private_template,
        )?;
        // From here on nothing is retried: a retry would leave a second key pair behind.
        let finish = || -> Op<[u8; 65]> {
            let point = read_point(s, public)?.map(|(_, p)| p).ok_or_else(|| {
                BackendError::Crypto("the new public key has no readable P-256 point".into())
            })?;
            if req.persistent {
                let name = key_name(&point);
                let value = serde_json::json!({ "key": name, "purpose": req.purpose });
                s.create_object(&[
                    Attribute::Class(ObjectClass::DATA),
                    Attribute::Token(true),
                    Attribute::Private(private_objects),
                    Attribute::Modifiable(false),
                    Attribute::Application(META_APPLICATION.to_vec()),
                    Attribute::Label(format!("{META_LABEL_PREFIX}{name}").into_bytes()),
                    Attribute::Value(value.to_string().into_bytes()),
                ])?;
            }
            Ok(point)
        };
        match finish() {
            Ok(point) => Ok(KeyEntry {
                id: req.id.clone(),
                point,
                purpose: req.purpose,
                persistent: req.persistent,
                private: Some(private),
                public: Some(public),
            }),
            Err(e) => {
                let _ = s.destroy_object(private);
                let _ = s.destroy_object(public);
                Err(e.finalize("generate a key pair"))
            }
        }
    }

    /// The (private, public) handles of a key pair with this CKA_ID and point.
    fn find_pair(
        &self,
        s: &Session,
        id: &[u8],
        point: &[u8; 65],
    ) -> Op<Option<(ObjectHandle, ObjectHandle)>> {
        let mut template = ec_template(ObjectClass::PUBLIC_KEY);
        template.push(Attribute::Id(id.to_vec()));
        let mut public = None;
        for h in s.find_objects(&template)? {
            if read_point(s, h)?.map(|(_, p)| p) == Some(*point) {
                public = Some(h);
                break;
            }
        }
        let Some(public) = public else {
            return Ok(None);
        };
        let mut template = ec_template(ObjectClass::PRIVATE_KEY);
        template.push(Attribute::Id(id.to_vec()));
        let privs = s.find_objects(&template)?;
        match privs.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some((*one, public))),
            _ => Err(BackendError::Refused(format!(
                "token '{}': several private keys share CKA_ID {}",
                self.settings.token,
                hex(id)
            ))
            .into()),
        }
    }

    /// The (private, public) handles of a named key: cached, else found by CKA_ID, else (the
    /// CKA_ID was changed elsewhere) by its public point.
    fn resolve_key(&self, s: &Session, name: &str) -> Op<(ObjectHandle, ObjectHandle)> {
        let known = lock(&self.keys)?.get(name).cloned();
        let entry = match known {
            Some(e) => e,
            None => {
                self.refresh_keys(s)?;
                lock(&self.keys)?.get(name).cloned().ok_or_else(|| {
                    BackendError::NotFound(format!(
                        "key {name} is not in token '{}'",
                        self.settings.token
                    ))
                })?
            }
        };
        if let (Some(p), Some(q)) = (entry.private, entry.public) {
            return Ok((p, q));
        }
        let mut id = entry.id.clone();
        let mut pair = self.find_pair(s, &id, &entry.point)?;
        if pair.is_none() {
            for h in s.find_objects(&ec_template(ObjectClass::PUBLIC_KEY))? {
                if let Some((other_id, p)) = read_point(s, h)? {
                    if p == entry.point && other_id != id {
                        pair = self.find_pair(s, &other_id, &entry.point)?;
                        if pair.is_some() {
                            id = other_id;
                            break;
                        }
                    }
                }
            }
        }
        let Some((private, public)) = pair else {
            lock(&self.keys)?.remove(name);
            return Err(BackendError::NotFound(format!(
                "key {name} is no longer in token '{}'",
                self.settings.token
            ))
            .into());
        };
        if let Some(e) = lock(&self.keys)?.get_mut(name) {
            e.id = id;
            e.private = Some(private);
            e.public = Some(public);
        }
        Ok((private, public))
    }

    fn forget_key_handles(&self, name: &str) -> Op<()> {
        if let Some(e) = lock(&self.keys)?.get_mut(name) {
            e.private = None;
            e.public = None;
        }
        Ok(())
    }

    /// Runs `op` on the (private, public) handles of a key; a stale handle is looked up again
    /// and `op` retried once.
    pub(super) fn with_key<T>(
        &self,
        s: &Session,
        name: &str,
        op: impl Fn(ObjectHandle, ObjectHandle) -> std::result::Result<T, CkError>,
    ) -> Op<T> {
        let (private, public) = self.resolve_key(s, name)?;
        match op(private, public) {
            Err(e) if handle_stale(&e) => {
                self.forget_key_handles(name)?;
                let (private, public) = self.resolve_key(s, name)?;
                Ok(op(private, public)?)
            }
            other => Ok(other?),
        }
    }

    /// Sets CKA_LABEL and CKA_ID on both halves (and restores the private half if the public
    /// half refuses).
    pub(super) fn relabel(&self, s: &Session, name: &str, label: &str, id: &[u8]) -> Op<()> {
        let new = [
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.to_vec()),
        ];
        self.with_key(s, name, |private, public| {
            let old = s.get_attributes(private, &[AttributeType::Label, AttributeType::Id])?;
            s.update_attributes(private, &new)?;
            if let Err(e) = s.update_attributes(public, &new) {
                if let Err(e2) = s.update_attributes(private, &old) {
                    log::warn!(
                        "could not restore the private key's label and id: {}",
                        describe(&e2)
                    );
                }
                return Err(e);
            }
            Ok(())
        })?;
        if let Some(e) = lock(&self.keys)?.get_mut(name) {
            e.id = id.to_vec();
        }
        Ok(())
    }

    /// Destroys both halves of a key pair and its metadata.
    pub(super) fn destroy(&self, s: &Session, name: &str) -> Op<()> {
        self.with_key(s, name, |private, public| {
            s.destroy_object(private)?;
            if let Err(e) = s.destroy_object(public) {
                if !handle_stale(&e) {
                    log::warn!(
                        "key {name}: the private key is gone but the public key stays: {}",
                        describe(&e)
                    );
                }
            }
            Ok(())
        })?;
        lock(&self.keys)?.remove(name);
        for h in self.meta_handles(s, name)? {
            if let Err(e) = s.destroy_object(h) {
                log::warn!(
                    "key {name}: its metadata object stays in the token: {}",
                    describe(&e)
                );
            }
        }
        Ok(())
    }
}
