//! Slots: one key store each, opened on first use, with the table of its objects.
//!
//! The object table maps handles to immutable objects. Opening a slot loads none: a search by
//! CKA_LABEL or CKA_ID asks the store for the objects that hold that value (a store with lookup
//! hints answers without reading the rest), and any other search loads every object, again
//! whenever the store says another process changed it. Either way the answer is merged into the
//! table by the store's names, so handles stay stable for objects that did not change.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use cryptoki_sys::*;

use super::attributes::Attributes;
use super::error::{fail, Error, Result};
use super::object::{self, Object, Origin};
use crate::backend::{self, Backend, LookupAttribute, StoreInfo};
use crate::config::{LoginMode, SlotConfig};

/// Module-wide object handle counter (handles are never reused within one C_Initialize).
pub struct Handles(AtomicU64);

impl Handles {
    /// Starts at 1 (0 is CK_INVALID_HANDLE).
    pub fn new() -> Self {
        Self(AtomicU64::new(1))
    }

    /// The next handle.
    pub fn next(&self) -> CK_ULONG {
        self.0.fetch_add(1, Ordering::Relaxed) as CK_ULONG
    }
}

impl Default for Handles {
    fn default() -> Self {
        Self::new()
    }
}

/// Handles of the two halves of a key pair.
#[derive(Clone, Copy, Default)]
struct PairHandles {
    private: Option<CK_OBJECT_HANDLE>,
    public: Option<CK_OBJECT_HANDLE>,
}

/// Attributes indexed for C_FindObjectsInit, so a lookup by CKA_ID or label does not scan.
const INDEXED: [CK_ATTRIBUTE_TYPE; 2] = [CKA_ID, CKA_LABEL];

/// Every object of one slot.
#[derive(Default)]
pub struct ObjectTable {
    objects: HashMap<CK_OBJECT_HANDLE, Arc<Object>>,
    keys: HashMap<String, PairHandles>,
    stored: HashMap<String, CK_OBJECT_HANDLE>,
    index: HashMap<(CK_ATTRIBUTE_TYPE, Vec<u8>), Vec<CK_OBJECT_HANDLE>>,
}

impl ObjectTable {
    fn index_add(&mut self, h: CK_OBJECT_HANDLE, obj: &Object) {
        for t in INDEXED {
            if let Some(v) = obj.attrs.get(t) {
                self.index.entry((t, v.to_vec())).or_default().push(h);
            }
        }
    }

    fn index_remove(&mut self, h: CK_OBJECT_HANDLE, obj: &Object) {
        for t in INDEXED {
            if let Some(v) = obj.attrs.get(t) {
                let key = (t, v.to_vec());
                if let Some(list) = self.index.get_mut(&key) {
                    list.retain(|x| *x != h);
                    if list.is_empty() {
                        self.index.remove(&key);
                    }
                }
            }
        }
    }

    /// The handles of the objects that match a template, in handle order. Uses the index when
    /// the template names an indexed attribute.
    pub fn find(&self, template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)]) -> Vec<CK_OBJECT_HANDLE> {
        let indexed = template
            .iter()
            .find(|(t, _)| INDEXED.contains(t))
            .map(|(t, v)| {
                self.index
                    .get(&(*t, v.clone()))
                    .map(Vec::as_slice)
                    .unwrap_or(&[])
            });
        let mut out: Vec<_> = match indexed {
            Some(candidates) => candidates
                .iter()
                .filter(|h| {
                    self.objects
                        .get(h)
                        .is_some_and(|o| o.attrs.matches(template))
                })
                .copied()
                .collect(),
            None => self
                .objects
                .iter()
                .filter(|(_, o)| o.attrs.matches(template))
                .map(|(h, _)| *h)
                .collect(),
        };
        out.sort_unstable();
        out
    }

    /// One object.
    pub fn get(&self, h: CK_OBJECT_HANDLE) -> Option<&Arc<Object>> {
        self.objects.get(&h)
    }

    /// Adds an object under a new handle.
    pub fn insert(&mut self, handles: &Handles, obj: Object) -> CK_OBJECT_HANDLE {
        let h = handles.next();
        match &obj.origin {
            Origin::Key(name) => {
                let e = self.keys.entry(name.clone()).or_default();
                if obj.class == CKO_PRIVATE_KEY {
                    e.private = Some(h);
                } else {
                    e.public = Some(h);
                }
            }
            Origin::Stored(name) => {
                self.stored.insert(name.clone(), h);
            }
            Origin::Session(_) => {}
        }
        self.index_add(h, &obj);
        self.objects.insert(h, Arc::new(obj));
        h
    }

    /// Replaces an object under its handle.
    pub fn replace(&mut self, h: CK_OBJECT_HANDLE, obj: Object) {
        if let Some(old) = self.objects.get(&h).cloned() {
            self.index_remove(h, &old);
        }
        self.index_add(h, &obj);
        self.objects.insert(h, Arc::new(obj));
    }

    /// Removes an object.
    pub fn remove(&mut self, h: CK_OBJECT_HANDLE) -> Option<Arc<Object>> {
        let obj = self.objects.remove(&h)?;
        self.index_remove(h, &obj);
        match &obj.origin {
            Origin::Key(name) => {
                if let Some(e) = self.keys.get_mut(name) {
                    if e.private == Some(h) {
                        e.private = None;
                    }
                    if e.public == Some(h) {
                        e.public = None;
                    }
                    if e.private.is_none() && e.public.is_none() {
                        self.keys.remove(name);
                    }
                }
            }
            Origin::Stored(name) => {
                self.stored.remove(name);
            }
            Origin::Session(_) => {}
        }
        Some(obj)
    }

    /// The other half of a key pair.
    pub fn partner(&self, h: CK_OBJECT_HANDLE) -> Option<CK_OBJECT_HANDLE> {
        let obj = self.objects.get(&h)?;
        let Origin::Key(name) = &obj.origin else {
            return None;
        };
        let pair = self.keys.get(name)?;
        if pair.private == Some(h) {
            pair.public
        } else {
            pair.private
        }
    }

    /// Removes the persistent objects among `handles` whose store name is not in `kept`.
    fn remove_gone(&mut self, handles: Vec<CK_OBJECT_HANDLE>, kept: &HashSet<String>) {
        for h in handles {
            let gone = self.objects.get(&h).is_some_and(|o| {
                o.is_token()
                    && match &o.origin {
                        Origin::Key(name) | Origin::Stored(name) => !kept.contains(name),
                        Origin::Session(_) => false,
                    }
            });
            if gone {
                self.remove(h);
            }
        }
    }

    /// Removes every object owned by a session; returns the removed objects.
    pub fn remove_session(&mut self, session: CK_SESSION_HANDLE) -> Vec<Arc<Object>> {
        let gone: Vec<_> = self
            .objects
            .iter()
            .filter(|(_, o)| o.session_owner() == Some(session))
            .map(|(h, _)| *h)
            .collect();
        gone.into_iter().filter_map(|h| self.remove(h)).collect()
    }
}

/// An opened key store and its objects.
pub struct Store {
    /// The backend.
    pub backend: Arc<dyn Backend>,
    /// Its identity.
    pub info: StoreInfo,
    /// `login = "pin"`: private keys are CKA_PRIVATE, hidden and unusable until C_Login.
    pub login_required: bool,
    objects: RwLock<ObjectTable>,
    /// What the table holds of the store, behind the lock that orders changes: a reload and a
    /// change of ours (backend write + table update) never interleave.
    loaded: Mutex<Loaded>,
}

/// How much of the store the table holds.
#[derive(Default)]
pub struct Loaded {
    /// True once every persistent object was loaded ...
    complete: bool,
    /// ... as of this change marker of the store.
    marker: Option<u128>,
    /// The values looked up since, each with the change marker it was looked up at: while the
    /// store's marker stays the same, the table already shows what the store holds.
    looked_up: HashMap<(LookupAttribute, Vec<u8>), u128>,
}

/// How many looked-up values [`Loaded`] remembers before it starts over.
const LOOKUPS_KEPT: usize = 4096;

impl Store {
    fn open(backend: Arc<dyn Backend>) -> Self {
        Self {
            info: backend.info().clone(),
            login_required: backend.pin().is_some(),
            objects: RwLock::new(ObjectTable::default()),
            loaded: Mutex::new(Loaded::default()),
            backend,
        }
    }

    /// Read access to the objects.
    pub fn objects(&self) -> Result<RwLockReadGuard<'_, ObjectTable>> {
        self.objects
            .read()
            .map_err(|_| Error::rv(CKR_GENERAL_ERROR))
    }

    /// Write access to the objects.
    pub fn objects_mut(&self) -> Result<RwLockWriteGuard<'_, ObjectTable>> {
        self.objects
            .write()
            .map_err(|_| Error::rv(CKR_GENERAL_ERROR))
    }

    /// Takes the lock that orders changes to the store: hold it across a backend write and the
    /// matching table update, so a concurrent reload never sees one without the other.
    pub fn changes(&self) -> Result<MutexGuard<'_, Loaded>> {
        self.loaded.lock().map_err(|_| Error::rv(CKR_GENERAL_ERROR))
    }

    /// Loads every persistent object, the first time and again when another process changed
    /// the store.
    pub fn refresh(&self, handles: &Handles) -> Result<()> {
        let mut loaded = self.changes()?;
        let now = self.backend.change_marker();
        if !loaded.complete || (now.is_some() && loaded.marker != now) {
            self.reload(handles)?;
            *loaded = Loaded {
                complete: true,
                marker: now,
                looked_up: HashMap::new(),
            };
        }
        Ok(())
    }

    /// Brings the table up to date for a search that names `attribute` = `value`: asks the
    /// store for the persistent objects that hold it now. False when the store has no lookup
    /// (then the caller loads everything).
    pub fn look_up(
        &self,
        handles: &Handles,
        attribute: LookupAttribute,
        value: &[u8],
    ) -> Result<bool> {
        let mut loaded = self.changes()?;
        let marker = self.backend.change_marker();
        let query = (attribute, value.to_vec());
        if let Some(m) = marker {
            let all_loaded = loaded.complete && loaded.marker == marker;
            if all_loaded || loaded.looked_up.get(&query) == Some(&m) {
                return Ok(true);
            }
        }
        let Some(found) = self.backend.lookup(attribute, value)? else {
            return Ok(false);
        };
        if let Some(m) = marker {
            if loaded.looked_up.len() >= LOOKUPS_KEPT {
                loaded.looked_up.clear();
            }
            loaded.looked_up.insert(query, m);
        }
        let mut table = self.objects_mut()?;
        let mut seen = HashSet::new();
        for rec in found.keys {
            seen.insert(rec.name.clone());
            self.merge_key(&mut table, handles, rec);
        }
        for rec in found.objects {
            seen.insert(rec.name.clone());
            self.merge_object(&mut table, handles, rec);
        }
        // What the table shows with that value and the store no longer has with it: deleted,
        // or changed, by another process.
        let shown = table.find(&[(attribute.attribute_type(), value.to_vec())]);
        table.remove_gone(shown, &seen);
        Ok(true)
    }

    /// Shows a persistent key pair in the table: new objects for a new key, the same handles
    /// for a known one.
    fn merge_key(&self, table: &mut ObjectTable, handles: &Handles, rec: backend::KeyRecord) {
        let class = self.info.protection_class;
        match table.keys.get(&rec.name).copied() {
            // Most keys did not change: leave their objects (and handles) alone.
            Some(pair) if unchanged(table, pair, &rec) => {}
            None => {
                let (private, public) = object::key_pair(&rec, class, self.login_required);
                table.insert(handles, private);
                table.insert(handles, public);
            }
            Some(pair) => {
                let (private, public) = object::key_pair(&rec, class, self.login_required);
                if let Some(h) = pair.private {
                    table.replace(h, private);
                }
                if let Some(h) = pair.public {
                    table.replace(h, public);
                }
            }
        }
    }

    /// Shows a stored object in the table, under its known handle when it has one.
    fn merge_object(&self, table: &mut ObjectTable, handles: &Handles, rec: backend::ObjectRecord) {
        let mut attrs = Attributes::from_list(&rec.attributes);
        let Some(class) = attrs.get_ulong(CKA_CLASS) else {
            log::warn!("stored object {} has no CKA_CLASS; skipped", rec.name);
            return;
        };
        object::complete(class, &mut attrs);
        let obj = object::stored(class, attrs, Origin::Stored(rec.name.clone()));
        match table.stored.get(&rec.name).copied() {
            None => {
                table.insert(handles, obj);
            }
            Some(h) => table.replace(h, obj),
        }
    }

    /// Merges the store's persistent keys and objects into the table, and drops those the
    /// store no longer has (deleted by another process).
    fn reload(&self, handles: &Handles) -> Result<()> {
        let keys = self.backend.load_keys()?;
        let stored = self.backend.load_objects()?;
        let names: HashSet<String> = keys
            .iter()
            .map(|k| &k.name)
            .chain(stored.iter().map(|o| &o.name))
            .cloned()
            .collect();
        let mut table = self.objects_mut()?;
        for rec in keys {
            self.merge_key(&mut table, handles, rec);
        }
        for rec in stored {
            self.merge_object(&mut table, handles, rec);
        }
        let all: Vec<_> = table.objects.keys().copied().collect();
        table.remove_gone(all, &names);
        Ok(())
    }
}

/// True when both halves of a key pair already show `rec`: the same label, CKA_ID, purpose,
/// public point and signer. Building a key pair's objects costs far more than this check, and a
/// reload after another process's change would otherwise rebuild every key of the store.
fn unchanged(table: &ObjectTable, pair: PairHandles, rec: &backend::KeyRecord) -> bool {
    let shows = |h: Option<CK_OBJECT_HANDLE>| {
        h.and_then(|h| table.get(h)).is_some_and(|o| {
            o.attrs.get(CKA_LABEL) == Some(rec.label.as_bytes())
                && o.attrs.get(CKA_ID) == Some(rec.id.as_slice())
                && o.purpose == rec.purpose
                && o.public_point == Some(rec.public_point)
                && o.is_token() == rec.persistent
        })
    };
    let same_signer = pair
        .private
        .and_then(|h| table.get(h))
        .and_then(|o| o.signer.as_ref())
        .is_some_and(|s| Arc::ptr_eq(s, &rec.signer));
    shows(pair.private) && shows(pair.public) && same_signer
}

/// Who is logged in on a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Login {
    /// Nobody.
    Public,
    /// The normal user.
    User,
    /// The security officer.
    So,
}

/// One slot.
pub struct Slot {
    /// Its config.
    pub config: SlotConfig,
    /// Its token label.
    pub label: String,
    store: Mutex<StoreState>,
    /// Who is logged in.
    pub login: Mutex<Login>,
}

/// How long a slot whose store failed to open answers from that failure before trying again.
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// The store of a slot: not tried yet, open, or failed (and when).
enum StoreState {
    Untried,
    Open(Arc<Store>),
    Failed(std::time::Instant, Error),
}

impl Slot {
    /// A slot for a config entry; the store opens on first use.
    pub fn new(config: SlotConfig) -> Self {
        let label = config.label().to_string();
        Self {
            config,
            label,
            store: Mutex::new(StoreState::Untried),
            login: Mutex::new(Login::Public),
        }
    }

    /// The opened store, opening it now if needed. A store that failed to open answers with that
    /// failure for a moment, then is tried again, so a device that comes back is picked up
    /// without a retry (and a log line) on every call.
    pub fn store(&self) -> Result<Arc<Store>> {
        let mut guard = self
            .store
            .lock()
            .map_err(|_| Error::rv(CKR_GENERAL_ERROR))?;
        match &*guard {
            StoreState::Open(s) => return Ok(s.clone()),
            StoreState::Failed(at, e) if at.elapsed() < RETRY_AFTER => return Err(*e),
            _ => {}
        }
        // Said once at error level; retries after that only at debug level.
        let first = matches!(*guard, StoreState::Untried);
        let opened = backend::open(&self.config)
            .and_then(|b| self.check_login(b))
            .map_err(|e| {
                if first {
                    log::error!("slot \"{}\" has no token: {e}", self.label);
                } else {
                    log::debug!("slot \"{}\" still has no token: {e}", self.label);
                }
                Error::rv(CKR_TOKEN_NOT_PRESENT)
            })
            .map(Store::open);
        match opened {
            Ok(store) => {
                let store = Arc::new(store);
                *guard = StoreState::Open(store.clone());
                Ok(store)
            }
            Err(e) => {
                *guard = StoreState::Failed(std::time::Instant::now(), e);
                Err(e)
            }
        }
    }

    /// Refuses a store that cannot enforce the slot's `login = "pin"`: no silent fallback to a
    /// token without a PIN.
    fn check_login(&self, backend: Arc<dyn Backend>) -> backend::Result<Arc<dyn Backend>> {
        if self.config.login() == LoginMode::Pin && backend.pin().is_none() {
            return Err(backend::BackendError::Unusable(format!(
                "slot \"{}\" has login = \"pin\", but the {} store has no PIN support; \
                 fix: remove `login` from the slot, or use a store that supports it",
                self.label,
                self.config.kind()
            )));
        }
        Ok(backend)
    }

    /// The PIN guard of the slot's store, when the store is open and has one.
    pub fn pin_store(&self) -> Option<Arc<Store>> {
        self.opened().filter(|s| s.login_required)
    }

    /// The store if it is already open.
    pub fn opened(&self) -> Option<Arc<Store>> {
        match &*self.store.lock().ok()? {
            StoreState::Open(s) => Some(s.clone()),
            _ => None,
        }
    }

    /// Who is logged in.
    pub fn login_state(&self) -> Result<Login> {
        self.login
            .lock()
            .map(|g| *g)
            .map_err(|_| Error::rv(CKR_GENERAL_ERROR))
    }

    /// Sets who is logged in.
    pub fn set_login(&self, l: Login) -> Result<()> {
        *self
            .login
            .lock()
            .map_err(|_| Error::rv(CKR_GENERAL_ERROR))? = l;
        Ok(())
    }
}

/// Fails unless the store is open.
pub fn require(store: Option<Arc<Store>>) -> Result<Arc<Store>> {
    match store {
        Some(s) => Ok(s),
        None => fail(CKR_TOKEN_NOT_PRESENT),
    }
}
