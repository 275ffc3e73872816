//! Connection to the wrapped token: the token found by label, a pool of logged-in sessions, and
//! the one retry after a dropped session.
//!
//! Every operation takes a session from the pool (or opens one), runs, and puts it back, so
//! signatures run in parallel on as many sessions as there are callers; no lock is held across a
//! call into the module. The user login belongs to the application, not to a session: it is done
//! once (checked with C_GetSessionInfo on each new session) and serialized, and after one
//! CKR_PIN_INCORRECT no further login is attempted (the token counts failures and would lock).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::ObjectHandle;
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::{Slot, TokenInfo};
use sha2::{Digest, Sha256};

use super::client::{open_module, ModuleClient};
use super::errors::{self, Failure, OpError};
use super::settings::Settings;
use crate::backend::{BackendError, KeyPurpose, Result};

/// How long a caller waits for a free session when the token allows no more (CKR_SESSION_COUNT).
const SESSION_WAIT: Duration = Duration::from_secs(10);

/// Locks a mutex; a poisoned lock is an error, not a panic.
pub(super) fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| BackendError::Unusable("pkcs11 backend lock poisoned".into()))
}

/// PINs a token rejected in this process, as (module, token, PIN) fingerprints: the same wrong
/// PIN is never presented twice (the token counts failures and locks), even when the slot is
/// opened again; a corrected PIN is tried.
fn rejected_pins() -> &'static Mutex<HashSet<[u8; 32]>> {
    static REJECTED: OnceLock<Mutex<HashSet<[u8; 32]>>> = OnceLock::new();
    REJECTED.get_or_init(|| Mutex::new(HashSet::new()))
}

fn pin_fingerprint(settings: &Settings, pin: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(settings.module.as_os_str().as_encoded_bytes());
    h.update([0]);
    h.update(settings.token.as_bytes());
    h.update([0]);
    h.update(pin.as_bytes());
    h.finalize().into()
}

/// One connection to the wrapped token, valid in the process that made it.
pub(super) struct Conn {
    // Field order matters: the idle sessions are closed (in Drop) before the client goes away.
    idle: Mutex<Vec<Session>>,
    freed: Condvar,
    /// Replaced after a dropped session or token: its sessions are forgotten, never closed (their
    /// handles may already belong to new sessions).
    retired: AtomicBool,
    pub slot: Slot,
    pub pid: u32,
    pub client: Arc<ModuleClient>,
}

impl Conn {
    fn new(client: Arc<ModuleClient>, slot: Slot) -> Self {
        Self {
            idle: Mutex::new(Vec::new()),
            freed: Condvar::new(),
            retired: AtomicBool::new(false),
            slot,
            pid: std::process::id(),
            client,
        }
    }

    fn put(&self, session: Session) {
        if self.retired.load(Ordering::SeqCst) {
            return;
        }
        match self.idle.lock() {
            Ok(mut idle) => {
                idle.push(session);
                self.freed.notify_one();
            }
            Err(_) => close(session, self.pid),
        }
    }
}

/// Closes a session we opened, unless we are a forked child (the handle is the parent's).
fn close(session: Session, pid: u32) {
    if pid == std::process::id() {
        if let Err(e) = session.close() {
            log::debug!("{}", errors::describe(&e));
        }
    }
    // Sessions are opened without close-on-drop, so dropping one in a child does nothing.
}

impl Drop for Conn {
    fn drop(&mut self) {
        let sessions = std::mem::take(self.idle.get_mut().unwrap_or_else(PoisonError::into_inner));
        if self.retired.load(Ordering::SeqCst) {
            return;
        }
        for s in sessions {
            close(s, self.pid);
        }
    }
}

/// What we remember about a key pair between calls.
#[derive(Clone, Debug)]
pub(super) struct KeyEntry {
    pub id: Vec<u8>,
    pub point: [u8; 65],
    pub purpose: KeyPurpose,
    pub persistent: bool,
    pub private: Option<ObjectHandle>,
    pub public: Option<ObjectHandle>,
}

/// The shared state of one pkcs11 slot (the backend and all its signers hold it).
pub(super) struct Inner {
    pub settings: Settings,
    conn: Mutex<Option<Arc<Conn>>>,
    login_lock: Mutex<()>,
    /// Known keys by name.
    pub keys: Mutex<HashMap<String, KeyEntry>>,
    /// Known objects by name.
    pub objects: Mutex<HashMap<String, ObjectHandle>>,
}

impl Inner {
    pub(super) fn new(settings: Settings) -> Self {
        Self {
            settings,
            conn: Mutex::new(None),
            login_lock: Mutex::new(()),
            keys: Mutex::new(HashMap::new()),
            objects: Mutex::new(HashMap::new()),
        }
    }

    /// The connection of this process, established on first use and again after a fork.
    pub(super) fn conn(&self) -> std::result::Result<Arc<Conn>, Failure> {
        let pid = std::process::id();
        let mut guard =
            lock(&self.conn).map_err(|e| Failure::from_error(e, "restart the application"))?;
        if let Some(c) = guard.as_ref() {
            if c.pid == pid {
                return Ok(c.clone());
            }
            log::info!(
                "slot '{}': process {pid} was forked from {}; connecting to the wrapped module afresh",
                self.settings.slot_label,
                c.pid
            );
        }
        let client = open_module(&self.settings.module)?;
        let (slot, _) = self.find_token(&client)?;
        let conn = Arc::new(Conn::new(client, slot));
        *guard = Some(conn.clone());
        drop(guard);
        self.forget_handles();
        Ok(conn)
    }

    /// The slot holding the token with our label, and its info.
    pub(super) fn find_token(
        &self,
        client: &ModuleClient,
    ) -> std::result::Result<(Slot, TokenInfo), Failure> {
        let want = self.settings.token.as_str();
        let module = client.path().display().to_string();
        let slots = client.context().get_slots_with_token().map_err(|e| {
            Failure::from_error(
                errors::map(&e, &format!("C_GetSlotList of {module}")),
                "check that the device behind the module is connected and reachable",
            )
        })?;
        let mut found = Vec::new();
        let mut labels = Vec::new();
        for slot in slots {
            match client.context().get_token_info(slot) {
                Ok(info) => {
                    let label = info.label().trim_end().to_string();
                    if label == want {
                        found.push((slot, info));
                    } else if !label.is_empty() {
                        labels.push(label);
                    }
                }
                Err(e) => log::debug!("slot {} of {module}: {}", slot.id(), errors::describe(&e)),
            }
        }
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => Err(Failure::new(
                BackendError::NotFound,
                format!(
                    "slot '{}': no token labelled '{want}' in {module} (tokens there: {})",
                    self.settings.slot_label,
                    if labels.is_empty() { "none".to_string() } else { labels.join(", ") }
                ),
                format!(
                    "correct `token` in the slot, or create the token (SoftHSM: softhsm2-util --init-token --free --label {want})"
                ),
            )),
            n => Err(Failure::new(
                BackendError::Unusable,
                format!(
                    "slot '{}': {n} tokens labelled '{want}' in {module}; refusing to guess",
                    self.settings.slot_label
                ),
                "give each token a unique label",
            )),
        }
    }

    fn forget_handles(&self) {
        if let Ok(mut keys) = self.keys.lock() {
            for e in keys.values_mut() {
                e.private = None;
                e.public = None;
            }
        }
        if let Ok(mut objects) = self.objects.lock() {
            objects.clear();
        }
    }

    /// Re-establishes after `err` on `old`: re-initializes the module if it was finalized under
    /// us, finds the token again (its slot may have changed) and installs a new connection with an
    /// empty pool. The old connection is retired: its sessions are forgotten, not closed, because
    /// after a finalize, a removal or C_CloseAllSessions their handle numbers may be reused by the
    /// module for new sessions. Cached object handles are forgotten.
    fn reestablish(&self, old: &Arc<Conn>, err: &CkError) -> Result<Arc<Conn>> {
        if errors::rv(err) == Some(RvError::CryptokiNotInitialized) {
            old.client.reinitialize()?;
        }
        let mut guard = lock(&self.conn)?;
        if let Some(cur) = guard.as_ref() {
            if !Arc::ptr_eq(cur, old) && cur.pid == std::process::id() {
                return Ok(cur.clone());
            }
        }
        let (slot, _) = self.find_token(&old.client).map_err(|f| match f.error {
            BackendError::NotFound(m) => BackendError::Unreachable(m),
            other => other,
        })?;
        old.retired.store(true, Ordering::SeqCst);
        if let Ok(mut idle) = old.idle.lock() {
            idle.clear();
        }
        let conn = Arc::new(Conn::new(old.client.clone(), slot));
        *guard = Some(conn.clone());
        drop(guard);
        self.forget_handles();
        Ok(conn)
    }

    /// Opens a new session and logs it in if needed.
    fn open_session(&self, conn: &Conn) -> std::result::Result<Session, OpError> {
        let deadline = Instant::now() + SESSION_WAIT;
        loop {
            match conn.client.context().open_rw_session_no_drop(conn.slot) {
                Ok(s) => {
                    if let Err(e) = self.login(&s) {
                        close(s, conn.pid);
                        return Err(e);
                    }
                    return Ok(s);
                }
                Err(CkError::Pkcs11(RvError::SessionCount, f)) if Instant::now() < deadline => {
                    // The token allows no more sessions: wait for one of ours to come back.
                    let idle = lock(&conn.idle)?;
                    let (mut idle, _) = conn
                        .freed
                        .wait_timeout(idle, Duration::from_millis(200))
                        .map_err(|_| {
                        BackendError::Unusable("pkcs11 backend lock poisoned".into())
                    })?;
                    if let Some(s) = idle.pop() {
                        return Ok(s);
                    }
                    log::debug!("{f}: session limit reached, waiting");
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A session from the pool, or a new one.
    fn take(&self, conn: &Conn) -> std::result::Result<Session, OpError> {
        if let Some(s) = lock(&conn.idle)?.pop() {
            return Ok(s);
        }
        self.open_session(conn)
    }

    /// Logs the application in (once; the login is shared by all sessions).
    fn login(&self, s: &Session) -> std::result::Result<(), OpError> {
        let Some(pin) = &self.settings.pin else {
            return Ok(());
        };
        let state = |s: &Session| s.get_session_info().map(|i| i.session_state());
        if matches!(state(s)?, SessionState::RoUser | SessionState::RwUser) {
            return Ok(());
        }
        let label = &self.settings.slot_label;
        let token = &self.settings.token;
        let _serial = lock(&self.login_lock)?;
        let fingerprint = pin_fingerprint(&self.settings, pin);
        if lock(rejected_pins())?.contains(&fingerprint) {
            return Err(BackendError::Auth(format!(
                "slot '{label}': the PIN from {} was rejected by token '{token}' earlier; not trying again (fix the PIN and restart the application)",
                self.settings.pin_source
            ))
            .into());
        }
        match state(s)? {
            SessionState::RoUser | SessionState::RwUser => return Ok(()),
            SessionState::RwSecurityOfficer => {
                return Err(BackendError::Auth(format!(
                    "slot '{label}': the security officer is logged in to token '{token}'; log the SO out"
                ))
                .into())
            }
            _ => {}
        }
        let auth = cryptoki::types::AuthPin::from(pin.to_string());
        match s.login(UserType::User, Some(&auth)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
            Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => {
                lock(rejected_pins())?.insert(fingerprint);
                Err(BackendError::Auth(format!(
                    "slot '{label}': token '{token}' rejected the PIN from {}; fix: put the token's user PIN there and restart (no further attempts are made: the token counts failures and locks)",
                    self.settings.pin_source
                ))
                .into())
            }
            Err(CkError::Pkcs11(RvError::PinLocked, _)) => Err(BackendError::Auth(format!(
                "slot '{label}': the user PIN of token '{token}' is locked; fix: unlock it with the SO PIN (SoftHSM: softhsm2-util; an HSM: its admin tool)"
            ))
            .into()),
            Err(e) => Err(e.into()),
        }
    }

    /// Runs `f` on a session of the pool. A dropped session or token is re-established once and
    /// `f` retried once on a fresh session; any other failure is final.
    pub(super) fn run<T>(
        &self,
        what: &str,
        f: impl Fn(&Session) -> std::result::Result<T, OpError>,
    ) -> Result<T> {
        let conn = self.conn().map_err(|f| f.error)?;
        match self.attempt(&conn, false, &f) {
            Ok(v) => Ok(v),
            Err(OpError::Ck(e)) if errors::needs_reconnect(&e) => {
                log::warn!(
                    "slot '{}': {what}: the wrapped token dropped the session ({}); re-establishing once",
                    self.settings.slot_label,
                    errors::describe(&e)
                );
                let conn = if errors::rv(&e) == Some(RvError::UserNotLoggedIn) {
                    // Someone logged the application out: the sessions are fine, a fresh one
                    // logs in again.
                    conn
                } else {
                    self.reestablish(&conn, &e)?
                };
                self.attempt(&conn, true, &f)
                    .map_err(|e| e.into_backend(what))
            }
            Err(e) => Err(e.into_backend(what)),
        }
    }

    fn attempt<T>(
        &self,
        conn: &Conn,
        fresh: bool,
        f: &impl Fn(&Session) -> std::result::Result<T, OpError>,
    ) -> std::result::Result<T, OpError> {
        let s = if fresh {
            self.open_session(conn)?
        } else {
            self.take(conn)?
        };
        match f(&s) {
            Ok(v) => {
                conn.put(s);
                Ok(v)
            }
            Err(OpError::Ck(e)) if errors::session_dead(&e) => {
                drop(s); // forgotten, not closed: the module already dropped it
                Err(OpError::Ck(e))
            }
            Err(e) => {
                conn.put(s);
                Err(e)
            }
        }
    }
}
