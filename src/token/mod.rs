//! The token as plain Rust: slots, sessions, objects, attributes, find, and the sign, verify and
//! digest state machines. No raw pointers here; `crate::pkcs11` turns C calls into calls on a
//! [`Token`].

pub mod attributes;
pub mod error;
pub mod host;
pub mod mechanism;
pub mod object;
pub mod op_state;
pub mod session;
pub mod slot;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use cryptoki_sys::*;

use crate::backend::{LookupAttribute, NewKey};
use crate::config::Config;
use crate::proof::ProofPolicy;
use attributes::{find, Template};
use error::fail;
pub use error::{Error, Result};
use object::{Lookup, Object, Origin};
use session::{Capacity, Output, Session};
use slot::{Handles, Login, Slot, Store};

/// Library version reported by C_GetInfo and the token info.
pub const VERSION: (u8, u8) = (0, 1);

/// What C_GetSlotInfo reports.
#[derive(Clone, Debug)]
pub struct SlotInfo {
    /// Slot description.
    pub description: String,
    /// CKF_TOKEN_PRESENT etc.
    pub flags: CK_FLAGS,
}

/// What C_GetTokenInfo reports.
#[derive(Clone, Debug)]
pub struct TokenInfo {
    /// Token label.
    pub label: String,
    /// Manufacturer.
    pub manufacturer: String,
    /// Model: the protection class.
    pub model: String,
    /// Serial number.
    pub serial: String,
    /// CKF_* flags.
    pub flags: CK_FLAGS,
    /// Open sessions.
    pub session_count: usize,
    /// Open read-write sessions.
    pub rw_session_count: usize,
    /// ulMinPinLen.
    pub min_pin_len: usize,
    /// ulMaxPinLen.
    pub max_pin_len: usize,
}

/// What C_GetSessionInfo reports.
#[derive(Clone, Copy, Debug)]
pub struct SessionInfo {
    /// The slot.
    pub slot: CK_SLOT_ID,
    /// CKS_*.
    pub state: CK_STATE,
    /// CKF_SERIAL_SESSION | CKF_RW_SESSION.
    pub flags: CK_FLAGS,
}

/// The kinds of operation a session runs, for [`Token::end_operation`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// C_Sign*.
    Sign,
    /// C_Verify*.
    Verify,
    /// C_Digest*.
    Digest,
}

/// One open session. Its slot and RW flag are fixed at C_OpenSession and read without a lock,
/// so token info, login and close never wait behind an operation in flight on the session; its
/// operations sit behind the session's own mutex.
struct SessionEntry {
    /// Index of its slot.
    slot: usize,
    /// CKF_RW_SESSION.
    rw: bool,
    /// Find, sign, verify and digest state.
    state: Mutex<Session>,
}

/// The whole module state between C_Initialize and C_Finalize.
pub struct Token {
    slots: Vec<Slot>,
    sessions: RwLock<HashMap<CK_SESSION_HANDLE, Arc<SessionEntry>>>,
    next_session: AtomicU64,
    handles: Handles,
    proof_policy: ProofPolicy,
}

fn lock(s: &Mutex<Session>) -> Result<MutexGuard<'_, Session>> {
    s.lock().map_err(|_| Error::rv(CKR_GENERAL_ERROR))
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Token {
    /// Builds the token from the config; stores open lazily.
    pub fn new(config: &Config) -> Self {
        Self {
            slots: config.slots.iter().cloned().map(Slot::new).collect(),
            sessions: RwLock::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            handles: Handles::new(),
            proof_policy: ProofPolicy::from_config(&config.server),
        }
    }

    /// Loads the config the usual way and builds the token.
    pub fn from_environment() -> std::result::Result<Self, crate::config::ConfigError> {
        Ok(Self::new(&Config::load()?))
    }

    fn slot(&self, id: CK_SLOT_ID) -> Result<&Slot> {
        usize::try_from(id)
            .ok()
            .and_then(|i| self.slots.get(i))
            .ok_or(Error::rv(CKR_SLOT_ID_INVALID))
    }

    /// Read access to the session table (held only for a lookup or a count).
    fn sessions(
        &self,
    ) -> Result<std::sync::RwLockReadGuard<'_, HashMap<CK_SESSION_HANDLE, Arc<SessionEntry>>>> {
        self.sessions
            .read()
            .map_err(|_| Error::rv(CKR_GENERAL_ERROR))
    }

    /// An open session, or `CKR_SESSION_HANDLE_INVALID`.
    fn session(&self, h: CK_SESSION_HANDLE) -> Result<Arc<SessionEntry>> {
        self.sessions()?
            .get(&h)
            .cloned()
            .ok_or(Error::rv(CKR_SESSION_HANDLE_INVALID))
    }

    /// Runs `f` on a session's state, under the session's own lock.
    fn with_session<T>(
        &self,
        h: CK_SESSION_HANDLE,
        f: impl FnOnce(&SessionEntry, &mut Session) -> Result<T>,
    ) -> Result<T> {
        let entry = self.session(h)?;
        let mut state = lock(&entry.state)?;
        f(&entry, &mut state)
    }

    /// Checks that a session is open: the C ABI asks this before it reads a mechanism, so an
    /// invalid session is reported before anything about the mechanism.
    pub fn check_session(&self, h: CK_SESSION_HANDLE) -> Result<()> {
        self.session(h).map(|_| ())
    }

    /// The store of a session's slot.
    fn session_store(&self, s: &SessionEntry) -> Result<Arc<Store>> {
        slot::require(self.slots.get(s.slot).and_then(Slot::opened))
    }

    /// The session, the store of its slot, and whether the session is read-write.
    fn session_store_rw(&self, h: CK_SESSION_HANDLE) -> Result<(Arc<SessionEntry>, Arc<Store>)> {
        let s = self.session(h)?;
        let store = self.session_store(&s)?;
        Ok((s, store))
    }

    /// Finds an object of the store, visible or not.
    fn object(&self, store: &Store, h: CK_OBJECT_HANDLE) -> Result<Arc<Object>> {
        store
            .objects()?
            .get(h)
            .cloned()
            .ok_or(Error::rv(CKR_OBJECT_HANDLE_INVALID))
    }

    /// True when the CKA_PRIVATE objects of a session's slot are out of reach: a slot with a PIN
    /// and no user logged in. A slot without a PIN shows every object, as it always did.
    fn private_hidden(&self, s: &SessionEntry, store: &Store) -> Result<bool> {
        if !store.login_required {
            return Ok(false);
        }
        let slot = self.slots.get(s.slot).ok_or(Error::rv(CKR_GENERAL_ERROR))?;
        Ok(slot.login_state()? != Login::User)
    }

    /// An object of the session's store; a CKA_PRIVATE one while no user is logged in on a
    /// slot with a PIN fails with `hidden`.
    fn visible_object(
        &self,
        s: &SessionEntry,
        store: &Store,
        h: CK_OBJECT_HANDLE,
        hidden: CK_RV,
    ) -> Result<Arc<Object>> {
        let o = self.object(store, h)?;
        if o.attrs.get_bool(CKA_PRIVATE) && self.private_hidden(s, store)? {
            return fail(hidden);
        }
        Ok(o)
    }

    /// `CKR_USER_NOT_LOGGED_IN` on a slot with a PIN and no user logged in.
    fn require_user(&self, s: &SessionEntry, store: &Store) -> Result<()> {
        if self.private_hidden(s, store)? {
            return fail(CKR_USER_NOT_LOGGED_IN);
        }
        Ok(())
    }

    /// C_GetSlotList.
    pub fn slot_list(&self, token_present: bool) -> Vec<CK_SLOT_ID> {
        (0..self.slots.len())
            .filter(|i| !token_present || self.slots[*i].store().is_ok())
            .map(|i| i as CK_SLOT_ID)
            .collect()
    }

    /// C_GetSlotInfo.
    pub fn slot_info(&self, id: CK_SLOT_ID) -> Result<SlotInfo> {
        let slot = self.slot(id)?;
        let present = slot.store().is_ok();
        let mut flags = 0;
        if present {
            flags |= CKF_TOKEN_PRESENT;
        }
        if let Some(store) = slot.opened() {
            if store.info.protection_class.is_hardware() {
                flags |= CKF_HW_SLOT;
            }
        }
        let device = slot
            .opened()
            .map(|s| format!(" on {}", s.info.manufacturer))
            .unwrap_or_default();
        Ok(SlotInfo {
            description: format!(
                "devicekey {} slot {}{device}",
                slot.config.kind().as_str(),
                slot.label
            ),
            flags,
        })
    }

    /// C_GetTokenInfo.
    pub fn token_info(&self, id: CK_SLOT_ID) -> Result<TokenInfo> {
        let slot = self.slot(id)?;
        let store = slot.store()?;
        let (mut count, mut rw) = (0, 0);
        for s in self.sessions()?.values() {
            if s.slot as CK_SLOT_ID == id {
                count += 1;
                if s.rw {
                    rw += 1;
                }
            }
        }
        let (flags, min_pin_len, max_pin_len) = match store.backend.pin() {
            None => (
                CKF_RNG | CKF_TOKEN_INITIALIZED | CKF_USER_PIN_INITIALIZED,
                0,
                255,
            ),
            Some(guard) => (
                CKF_RNG | CKF_TOKEN_INITIALIZED | CKF_LOGIN_REQUIRED | pin_flags(&guard.status()?),
                crate::backend::pin::MIN_PIN_LEN,
                crate::backend::pin::MAX_PIN_LEN,
            ),
        };
        Ok(TokenInfo {
            label: store.info.label.clone(),
            // Every token of this module is ours, whatever device is behind it: the model names
            // the class, the slot description names the device.
            manufacturer: crate::vendor::DEVICEKEY_MANUFACTURER.to_string(),
            model: store.info.protection_class.token_model().to_string(),
            serial: store.info.serial.clone(),
            flags,
            session_count: count,
            rw_session_count: rw,
            min_pin_len,
            max_pin_len,
        })
    }

    /// C_GetMechanismList.
    pub fn mechanisms(&self, id: CK_SLOT_ID) -> Result<&'static [CK_MECHANISM_TYPE]> {
        self.slot(id)?;
        Ok(mechanism::MECHANISMS)
    }

    /// C_GetMechanismInfo.
    pub fn mechanism_info(
        &self,
        id: CK_SLOT_ID,
        mech: CK_MECHANISM_TYPE,
    ) -> Result<CK_MECHANISM_INFO> {
        let slot = self.slot(id)?;
        let hardware = slot
            .opened()
            .is_some_and(|s| s.info.protection_class.is_hardware());
        mechanism::info(mech, hardware)
    }

    /// C_OpenSession.
    pub fn open_session(&self, id: CK_SLOT_ID, flags: CK_FLAGS) -> Result<CK_SESSION_HANDLE> {
        let slot = self.slot(id)?;
        if flags & CKF_SERIAL_SESSION == 0 {
            return fail(CKR_SESSION_PARALLEL_NOT_SUPPORTED);
        }
        slot.store()?;
        let rw = flags & CKF_RW_SESSION != 0;
        if !rw && slot.login_state()? == Login::So {
            return fail(CKR_SESSION_READ_WRITE_SO_EXISTS);
        }
        let h = self.next_session.fetch_add(1, Ordering::Relaxed) as CK_SESSION_HANDLE;
        let session = SessionEntry {
            slot: id as usize,
            rw,
            state: Mutex::new(Session::new()),
        };
        self.sessions
            .write()
            .map_err(|_| Error::rv(CKR_GENERAL_ERROR))?
            .insert(h, Arc::new(session));
        Ok(h)
    }

    /// C_CloseSession.
    pub fn close_session(&self, h: CK_SESSION_HANDLE) -> Result<()> {
        let removed = self
            .sessions
            .write()
            .map_err(|_| Error::rv(CKR_GENERAL_ERROR))?
            .remove(&h)
            .ok_or(Error::rv(CKR_SESSION_HANDLE_INVALID))?;
        self.after_close(removed.slot, &[h])
    }

    /// C_CloseAllSessions.
    pub fn close_all_sessions(&self, id: CK_SLOT_ID) -> Result<()> {
        self.slot(id)?;
        let mut closed = Vec::new();
        {
            let mut sessions = self
                .sessions
                .write()
                .map_err(|_| Error::rv(CKR_GENERAL_ERROR))?;
            // Slot ids are read without taking any session's lock: an operation in flight on
            // one session never holds up the whole table here.
            sessions.retain(|h, s| {
                let mine = s.slot as CK_SLOT_ID == id;
                if mine {
                    closed.push(*h);
                }
                !mine
            });
        }
        self.after_close(id as usize, &closed)
    }

    /// Drops session objects, and logs out when the slot's last session closed.
    fn after_close(&self, slot_index: usize, closed: &[CK_SESSION_HANDLE]) -> Result<()> {
        let Some(slot) = self.slots.get(slot_index) else {
            return Ok(());
        };
        if let Some(store) = slot.opened() {
            let mut removed = Vec::new();
            {
                let mut table = store.objects_mut()?;
                for h in closed {
                    removed.extend(table.remove_session(*h));
                }
            }
            // Session keys live in the store's memory until they are destroyed.
            for o in removed {
                if let (Origin::Key(name), CKO_PRIVATE_KEY) = (&o.origin, o.class) {
                    if let Err(e) = store.backend.destroy_key(name) {
                        log::warn!("closing a session: session key not destroyed: {e}");
                    }
                }
            }
        }
        let any_left = self.sessions()?.values().any(|s| s.slot == slot_index);
        if !any_left {
            slot.set_login(Login::Public)?;
            if let Some(store) = slot.pin_store() {
                if let Some(guard) = store.backend.pin() {
                    guard.logout();
                }
            }
        }
        Ok(())
    }

    /// C_Finalize: every store with a PIN forgets what it unlocked.
    pub fn finalize(&self) {
        for slot in &self.slots {
            if let Some(guard) = slot.pin_store().as_deref().and_then(|s| s.backend.pin()) {
                guard.logout();
            }
            let _ = slot.set_login(Login::Public);
        }
    }

    /// C_GetSessionInfo.
    pub fn session_info(&self, h: CK_SESSION_HANDLE) -> Result<SessionInfo> {
        let s = self.session(h)?;
        let login = self.slots.get(s.slot).map(Slot::login_state).transpose()?;
        let state = match (login, s.rw) {
            (Some(Login::So), _) => CKS_RW_SO_FUNCTIONS,
            (Some(Login::User), true) => CKS_RW_USER_FUNCTIONS,
            (Some(Login::User), false) => CKS_RO_USER_FUNCTIONS,
            (_, true) => CKS_RW_PUBLIC_SESSION,
            (_, false) => CKS_RO_PUBLIC_SESSION,
        };
        let mut flags = CKF_SERIAL_SESSION;
        if s.rw {
            flags |= CKF_RW_SESSION;
        }
        Ok(SessionInfo {
            slot: s.slot as CK_SLOT_ID,
            state,
            flags,
        })
    }

    /// C_Login. With no PIN configured any PIN is accepted: the token needs no login, but some
    /// tools always log in. A slot with a PIN checks it through its store's guard, and has no
    /// security officer.
    pub fn login(&self, h: CK_SESSION_HANDLE, user: CK_USER_TYPE, pin: &[u8]) -> Result<()> {
        let slot_index = self.session(h)?.slot;
        let slot = self
            .slots
            .get(slot_index)
            .ok_or(Error::rv(CKR_GENERAL_ERROR))?;
        let current = slot.login_state()?;
        let pin_store = slot.pin_store();
        match user {
            CKU_USER => match current {
                Login::User => fail(CKR_USER_ALREADY_LOGGED_IN),
                Login::So => fail(CKR_USER_ANOTHER_ALREADY_LOGGED_IN),
                Login::Public => {
                    if let Some(store) = &pin_store {
                        user_login(store, pin)?;
                    }
                    slot.set_login(Login::User)
                }
            },
            CKU_SO if pin_store.is_some() => {
                log::info!("C_Login: a slot with a PIN has no security officer");
                fail(CKR_USER_TYPE_INVALID)
            }
            CKU_SO => match current {
                Login::So => fail(CKR_USER_ALREADY_LOGGED_IN),
                Login::User => fail(CKR_USER_ANOTHER_ALREADY_LOGGED_IN),
                Login::Public => {
                    let ro_exists = self
                        .sessions()?
                        .values()
                        .any(|s| s.slot == slot_index && !s.rw);
                    if ro_exists {
                        return fail(CKR_SESSION_READ_ONLY_EXISTS);
                    }
                    slot.set_login(Login::So)
                }
            },
            CKU_CONTEXT_SPECIFIC => fail(CKR_OPERATION_NOT_INITIALIZED),
            _ => fail(CKR_USER_TYPE_INVALID),
        }
    }

    /// C_Logout.
    pub fn logout(&self, h: CK_SESSION_HANDLE) -> Result<()> {
        let slot_index = self.session(h)?.slot;
        let slot = self
            .slots
            .get(slot_index)
            .ok_or(Error::rv(CKR_GENERAL_ERROR))?;
        if slot.login_state()? == Login::Public {
            return fail(CKR_USER_NOT_LOGGED_IN);
        }
        slot.set_login(Login::Public)?;
        if let Some(guard) = slot.pin_store().as_deref().and_then(|s| s.backend.pin()) {
            guard.logout();
        }
        Ok(())
    }

    /// C_SetPIN: changes the user PIN of a slot with a PIN, in a read-write session (public or
    /// user, as the spec says; the old PIN is checked and a wrong one costs a try). A slot
    /// without a PIN has none to change.
    pub fn set_pin(&self, h: CK_SESSION_HANDLE, old: &[u8], new: &[u8]) -> Result<()> {
        let entry = self.session(h)?;
        let store = self.session_store(&entry)?;
        let Some(guard) = store.backend.pin() else {
            return fail(CKR_FUNCTION_NOT_SUPPORTED);
        };
        if !entry.rw {
            return fail(CKR_SESSION_READ_ONLY);
        }
        check_pin_len(new)?;
        check_pin_usable(guard)?;
        guard.set_pin(Some(old), new)?;
        log::info!("slot \"{}\": user PIN changed", store.info.label);
        Ok(())
    }

    /// C_FindObjectsInit.
    pub fn find_init(&self, h: CK_SESSION_HANDLE, template: &Template) -> Result<()> {
        self.with_session(h, |entry, s| {
            if s.find.is_some() {
                return fail(CKR_OPERATION_ACTIVE);
            }
            let store = self.session_store(entry)?;
            let indexed = template
                .iter()
                .find_map(|(t, v)| Some((LookupAttribute::of_type(*t)?, v)));
            let looked_up = match indexed {
                Some((attribute, value)) => store.look_up(&self.handles, attribute, value)?,
                None => false,
            };
            if !looked_up {
                store.refresh(&self.handles)?;
            }
            let mut results = store.objects()?.find(template);
            if self.private_hidden(entry, &store)? {
                let table = store.objects()?;
                results.retain(|h| {
                    table
                        .get(*h)
                        .is_some_and(|o| !o.attrs.get_bool(CKA_PRIVATE))
                });
            }
            s.find = Some(session::FindState { results, pos: 0 });
            Ok(())
        })
    }

    /// C_FindObjects.
    pub fn find(&self, h: CK_SESSION_HANDLE, max: usize) -> Result<Vec<CK_OBJECT_HANDLE>> {
        self.with_session(h, |_, s| {
            let f = s
                .find
                .as_mut()
                .ok_or(Error::rv(CKR_OPERATION_NOT_INITIALIZED))?;
            let end = f.results.len().min(f.pos.saturating_add(max));
            let out = f.results[f.pos..end].to_vec();
            f.pos = end;
            Ok(out)
        })
    }

    /// C_FindObjectsFinal.
    pub fn find_final(&self, h: CK_SESSION_HANDLE) -> Result<()> {
        self.with_session(h, |_, s| {
            s.find
                .take()
                .map(|_| ())
                .ok_or(Error::rv(CKR_OPERATION_NOT_INITIALIZED))
        })
    }

    /// The object behind a handle, for C_GetAttributeValue and C_GetObjectSize.
    pub fn get_object(&self, h: CK_SESSION_HANDLE, obj: CK_OBJECT_HANDLE) -> Result<Arc<Object>> {
        let (entry, store) = self.session_store_rw(h)?;
        self.visible_object(&entry, &store, obj, CKR_OBJECT_HANDLE_INVALID)
    }

    /// C_GetObjectSize: the bytes of its attributes.
    pub fn object_size(&self, h: CK_SESSION_HANDLE, obj: CK_OBJECT_HANDLE) -> Result<usize> {
        let o = self.get_object(h, obj)?;
        Ok(o.attrs.iter().map(|(_, v)| v.len()).sum())
    }

    /// C_SetAttributeValue: CKA_LABEL and CKA_ID (CKA_ID on keys and certificates).
    pub fn set_attributes(
        &self,
        h: CK_SESSION_HANDLE,
        obj: CK_OBJECT_HANDLE,
        template: &Template,
    ) -> Result<()> {
        let (entry, store) = self.session_store_rw(h)?;
        let rw = entry.rw;
        let o = self.visible_object(&entry, &store, obj, CKR_USER_NOT_LOGGED_IN)?;
        for (t, _) in template {
            match *t {
                CKA_LABEL => {}
                CKA_ID if o.class != CKO_DATA => {}
                t if o.lookup(t) == Lookup::Invalid => return fail(CKR_ATTRIBUTE_TYPE_INVALID),
                _ => return fail(CKR_ATTRIBUTE_READ_ONLY),
            }
        }
        if o.is_token() && !rw {
            return fail(CKR_SESSION_READ_ONLY);
        }
        if !o.attrs.get_bool(CKA_MODIFIABLE) {
            return fail(CKR_ACTION_PROHIBITED);
        }
        let label = find(template, CKA_LABEL);
        let id = find(template, CKA_ID);
        let _changes = store.changes()?;
        let mut table = store.objects_mut()?;
        match &o.origin {
            Origin::Key(name) => {
                let label_text = match label {
                    Some(l) => std::str::from_utf8(l)
                        .map_err(|_| Error::rv(CKR_ATTRIBUTE_VALUE_INVALID))?
                        .to_string(),
                    None => {
                        String::from_utf8_lossy(o.attrs.get(CKA_LABEL).unwrap_or_default()).into()
                    }
                };
                let new_id = id.unwrap_or(o.attrs.get(CKA_ID).unwrap_or_default());
                if o.is_token() {
                    store.backend.update_key(name, &label_text, new_id)?;
                }
                // Both halves of a key pair share their label and CKA_ID.
                let partner = table.partner(obj);
                for handle in std::iter::once(obj).chain(partner) {
                    if let Some(cur) = table.get(handle).cloned() {
                        table.replace(handle, cur.relabeled(label, id));
                    }
                }
            }
            Origin::Stored(name) => {
                let updated = o.relabeled(label, id);
                store.backend.update_object(name, &updated.attrs.to_vec())?;
                table.replace(obj, updated);
            }
            Origin::Session(_) => table.replace(obj, o.relabeled(label, id)),
        }
        drop(table);
        Ok(())
    }

    /// C_CreateObject: certificates and data objects.
    pub fn create_object(
        &self,
        h: CK_SESSION_HANDLE,
        template: &Template,
    ) -> Result<CK_OBJECT_HANDLE> {
        let (entry, store) = self.session_store_rw(h)?;
        let rw = entry.rw;
        let attrs = object::parse_create(template)?;
        if attrs.get_bool(CKA_PRIVATE) {
            self.require_user(&entry, &store)?;
        }
        let class = attrs
            .get_ulong(CKA_CLASS)
            .ok_or(Error::rv(CKR_TEMPLATE_INCOMPLETE))?;
        let _changes = store.changes()?;
        let obj = if attrs.get_bool(CKA_TOKEN) {
            if !rw {
                return fail(CKR_SESSION_READ_ONLY);
            }
            let name = store.backend.store_object(&attrs.to_vec())?;
            object::stored(class, attrs, Origin::Stored(name))
        } else {
            object::stored(class, attrs, Origin::Session(h))
        };
        let handle = store.objects_mut()?.insert(&self.handles, obj);
        Ok(handle)
    }

    /// C_DestroyObject. Destroying a private key deletes the key pair from the store; its public
    /// half stays visible until the module is finalized.
    pub fn destroy_object(&self, h: CK_SESSION_HANDLE, obj: CK_OBJECT_HANDLE) -> Result<()> {
        let (entry, store) = self.session_store_rw(h)?;
        let rw = entry.rw;
        let o = self.visible_object(&entry, &store, obj, CKR_USER_NOT_LOGGED_IN)?;
        if o.is_token() && !rw {
            return fail(CKR_SESSION_READ_ONLY);
        }
        if !o.attrs.get_bool(CKA_DESTROYABLE) {
            return fail(CKR_ACTION_PROHIBITED);
        }
        let _changes = store.changes()?;
        match &o.origin {
            Origin::Key(name) if o.class == CKO_PRIVATE_KEY => {
                store.backend.destroy_key(name)?;
            }
            Origin::Stored(name) => store.backend.destroy_object(name)?,
            _ => {}
        }
        store.objects_mut()?.remove(obj);
        Ok(())
    }

    /// C_GenerateKeyPair (CKM_EC_KEY_PAIR_GEN, P-256). Returns (public, private).
    pub fn generate_key_pair(
        &self,
        h: CK_SESSION_HANDLE,
        mech: CK_MECHANISM_TYPE,
        public: &Template,
        private: &Template,
    ) -> Result<(CK_OBJECT_HANDLE, CK_OBJECT_HANDLE)> {
        let (entry, store) = self.session_store_rw(h)?;
        let rw = entry.rw;
        if mech != CKM_EC_KEY_PAIR_GEN {
            return fail(CKR_MECHANISM_INVALID);
        }
        self.require_user(&entry, &store)?;
        let req = object::parse_keygen(public, private)?;
        if req.persistent && !rw {
            return fail(CKR_SESSION_READ_ONLY);
        }
        let id = match req.id {
            Some(id) => id,
            None => {
                let mut id = vec![0u8; 16];
                getrandom::getrandom(&mut id).map_err(|_| Error::rv(CKR_FUNCTION_FAILED))?;
                id
            }
        };
        let label = match req.label {
            Some(l) => String::from_utf8(l).map_err(|_| Error::rv(CKR_ATTRIBUTE_VALUE_INVALID))?,
            None => String::new(),
        };
        let _changes = store.changes()?;
        let rec = store.backend.generate_key(&NewKey {
            id,
            label,
            purpose: req.purpose,
            persistent: req.persistent,
        })?;
        let (mut priv_obj, mut pub_obj) =
            object::key_pair(&rec, store.info.protection_class, store.login_required);
        if !req.persistent {
            priv_obj.owner_session = Some(h);
            pub_obj.owner_session = Some(h);
        }
        let mut table = store.objects_mut()?;
        let priv_h = table.insert(&self.handles, priv_obj);
        let pub_h = table.insert(&self.handles, pub_obj);
        Ok((pub_h, priv_h))
    }

    fn key_for(&self, s: &SessionEntry, key: CK_OBJECT_HANDLE) -> Result<Arc<Object>> {
        let store = self.session_store(s)?;
        let o = self
            .object(&store, key)
            .map_err(|_| Error::rv(CKR_KEY_HANDLE_INVALID))?;
        if o.attrs.get_bool(CKA_PRIVATE) && self.private_hidden(s, &store)? {
            return fail(CKR_USER_NOT_LOGGED_IN);
        }
        Ok(o)
    }

    /// Ends a sign operation whose slot was logged out since C_SignInit (the store refuses too;
    /// this answers the same for every store).
    fn sign_allowed(&self, entry: &SessionEntry, s: &mut Session) -> Result<()> {
        if s.sign.is_some() {
            let store = self.session_store(entry)?;
            if self.private_hidden(entry, &store)? {
                s.sign = None;
                return fail(CKR_USER_NOT_LOGGED_IN);
            }
        }
        Ok(())
    }

    fn proof_check(&self) -> impl Fn(&[u8]) -> Result<()> + '_ {
        move |bytes: &[u8]| {
            crate::proof::validate_signing_bytes(bytes, &self.proof_policy, now_unix()).map_err(
                |e| {
                    log::info!("proof-only key: refused to sign: {e}");
                    Error::rv(CKR_DATA_INVALID)
                },
            )
        }
    }

    /// Ends an operation that a call rejected before it reached the token (bad arguments): per
    /// the spec, every result but a length answer and `CKR_BUFFER_TOO_SMALL` ends it.
    pub fn end_operation(&self, h: CK_SESSION_HANDLE, op: Operation) {
        let _ = self.with_session(h, |_, s| {
            match op {
                Operation::Sign => s.sign = None,
                Operation::Verify => s.verify = None,
                Operation::Digest => s.digest = None,
            }
            Ok(())
        });
    }

    /// C_SignInit.
    pub fn sign_init(
        &self,
        h: CK_SESSION_HANDLE,
        mech: CK_MECHANISM_TYPE,
        key: CK_OBJECT_HANDLE,
    ) -> Result<()> {
        self.with_session(h, |entry, s| s.sign_init(mech, self.key_for(entry, key)?))
    }

    /// C_Sign.
    pub fn sign(&self, h: CK_SESSION_HANDLE, data: &[u8], out: Capacity) -> Result<Output> {
        self.with_session(h, |e, s| {
            self.sign_allowed(e, s)?;
            s.sign(data, out, &self.proof_check())
        })
    }

    /// C_SignUpdate.
    pub fn sign_update(&self, h: CK_SESSION_HANDLE, data: &[u8]) -> Result<()> {
        self.with_session(h, |e, s| {
            self.sign_allowed(e, s)?;
            s.sign_update(data)
        })
    }

    /// C_SignFinal.
    pub fn sign_final(&self, h: CK_SESSION_HANDLE, out: Capacity) -> Result<Output> {
        self.with_session(h, |e, s| {
            self.sign_allowed(e, s)?;
            s.sign_final(out, &self.proof_check())
        })
    }

    /// C_VerifyInit.
    pub fn verify_init(
        &self,
        h: CK_SESSION_HANDLE,
        mech: CK_MECHANISM_TYPE,
        key: CK_OBJECT_HANDLE,
    ) -> Result<()> {
        self.with_session(h, |entry, s| s.verify_init(mech, self.key_for(entry, key)?))
    }

    /// C_Verify.
    pub fn verify(&self, h: CK_SESSION_HANDLE, data: &[u8], signature: &[u8]) -> Result<()> {
        self.with_session(h, |_, s| s.verify(data, signature))
    }

    /// C_VerifyUpdate.
    pub fn verify_update(&self, h: CK_SESSION_HANDLE, data: &[u8]) -> Result<()> {
        self.with_session(h, |_, s| s.verify_update(data))
    }

    /// C_VerifyFinal.
    pub fn verify_final(&self, h: CK_SESSION_HANDLE, signature: &[u8]) -> Result<()> {
        self.with_session(h, |_, s| s.verify_final(signature))
    }

    /// C_DigestInit.
    pub fn digest_init(&self, h: CK_SESSION_HANDLE, mech: CK_MECHANISM_TYPE) -> Result<()> {
        self.with_session(h, |_, s| s.digest_init(mech))
    }

    /// C_Digest.
    pub fn digest(&self, h: CK_SESSION_HANDLE, data: &[u8], out: Capacity) -> Result<Output> {
        self.with_session(h, |_, s| s.digest(data, out))
    }

    /// C_DigestUpdate.
    pub fn digest_update(&self, h: CK_SESSION_HANDLE, data: &[u8]) -> Result<()> {
        self.with_session(h, |_, s| s.digest_update(data))
    }

    /// C_DigestFinal.
    pub fn digest_final(&self, h: CK_SESSION_HANDLE, out: Capacity) -> Result<Output> {
        self.with_session(h, |_, s| s.digest_final(out))
    }

    /// C_GetOperationState.
    pub fn operation_state(&self, h: CK_SESSION_HANDLE, out: Capacity) -> Result<Output> {
        self.with_session(h, |_, s| s.operation_state(out))
    }

    /// C_SetOperationState.
    pub fn set_operation_state(
        &self,
        h: CK_SESSION_HANDLE,
        state: &[u8],
        encryption_key: CK_OBJECT_HANDLE,
        authentication_key: CK_OBJECT_HANDLE,
    ) -> Result<()> {
        self.with_session(h, |_, s| {
            s.set_operation_state(state, encryption_key, authentication_key)
        })
    }

    /// C_GenerateRandom.
    pub fn generate_random(&self, h: CK_SESSION_HANDLE, out: &mut [u8]) -> Result<()> {
        self.session(h)?;
        getrandom::getrandom(out).map_err(|_| Error::rv(CKR_FUNCTION_FAILED))
    }

    /// C_SeedRandom: the operating system's generator takes no seed from callers.
    pub fn seed_random(&self, h: CK_SESSION_HANDLE) -> Result<()> {
        self.session(h)?;
        fail(CKR_RANDOM_SEED_NOT_SUPPORTED)
    }
}

/// The token flags of a PIN's state.
fn pin_flags(status: &crate::backend::pin::PinStatus) -> CK_FLAGS {
    let mut flags = 0;
    if status.initialized {
        flags |= CKF_USER_PIN_INITIALIZED;
    }
    if status.locked {
        flags |= CKF_USER_PIN_LOCKED;
    } else if let Some(left) = status.tries_left {
        if left == 1 {
            flags |= CKF_USER_PIN_FINAL_TRY;
        }
        if left < status.max_tries {
            flags |= CKF_USER_PIN_COUNT_LOW;
        }
    }
    flags
}

/// `CKR_PIN_LEN_RANGE` unless the PIN's length is within the token's bounds.
fn check_pin_len(pin: &[u8]) -> Result<()> {
    use crate::backend::pin::{MAX_PIN_LEN, MIN_PIN_LEN};
    if (MIN_PIN_LEN..=MAX_PIN_LEN).contains(&pin.len()) {
        Ok(())
    } else {
        fail(CKR_PIN_LEN_RANGE)
    }
}

/// C_Login(CKU_USER) on a slot with a PIN: checked by the store's guard.
fn user_login(store: &Store, pin: &[u8]) -> Result<()> {
    let guard = store.backend.pin().ok_or(Error::rv(CKR_GENERAL_ERROR))?;
    check_pin_len(pin)?;
    check_pin_usable(guard)?;
    guard.login(pin)?;
    Ok(())
}

/// `CKR_USER_PIN_NOT_INITIALIZED` before a PIN is set, `CKR_PIN_LOCKED` once it is locked.
fn check_pin_usable(guard: &dyn crate::backend::pin::PinGuard) -> Result<()> {
    let status = guard.status()?;
    if !status.initialized {
        return fail(CKR_USER_PIN_NOT_INITIALIZED);
    }
    if status.locked {
        return fail(CKR_PIN_LOCKED);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    fn software_token(dir: &std::path::Path) -> Token {
        let text = format!(
            "[[slot]]\nlabel = \"lockfree\"\nbackend = \"software\"\ndir = \"{}\"\n",
            dir.join("keys").display()
        );
        Token::new(&Config::from_toml(&text).expect("config"))
    }

    /// A session whose operation lock is held (as by a signature in flight) holds up nothing
    /// but that session: token info, session info, login, logout and both closes answer.
    #[test]
    fn token_calls_do_not_wait_behind_a_busy_session() {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = Arc::new(software_token(dir.path()));
        let rw = CKF_SERIAL_SESSION | CKF_RW_SESSION;
        let busy = token.open_session(0, rw).expect("open busy session");
        let other = token.open_session(0, CKF_SERIAL_SESSION).expect("open");
        let entry = token.session(busy).expect("busy session");
        let held = entry.state.lock().expect("session lock");

        let (done, finished) = mpsc::channel();
        let t = token.clone();
        std::thread::spawn(move || {
            let r = (|| -> Result<()> {
                let info = t.token_info(0)?;
                assert_eq!((info.session_count, info.rw_session_count), (2, 1));
                assert_eq!(t.session_info(busy)?.flags & CKF_RW_SESSION, CKF_RW_SESSION);
                t.login(other, CKU_USER, b"")?;
                t.logout(other)?;
                t.close_session(other)?;
                t.close_all_sessions(0)
            })();
            let _ = done.send(r);
        });
        let r = finished.recv_timeout(Duration::from_secs(20));
        drop(held);
        r.expect("token calls waited behind a busy session")
            .expect("token calls");
        assert_eq!(
            token.check_session(busy).unwrap_err().rv,
            CKR_SESSION_HANDLE_INVALID,
            "C_CloseAllSessions closed the busy session too"
        );
    }
}
