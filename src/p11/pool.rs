//! A connection to one token of one module: the token found by label, a pool of logged-in
//! sessions, and the one retry after a dropped session.
//!
//! Every operation takes a session from the pool (or opens one), runs, and puts it back, so calls
//! run in parallel on as many sessions as there are callers; no lock is held across a call into
//! the module. The user login belongs to the application, not to a session: it is done once
//! (checked with C_GetSessionInfo on each new session) and serialized, and after one
//! CKR_PIN_INCORRECT the same PIN is never presented again in this process (the token counts
//! failures and would lock).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::{Slot, TokenInfo};
use sha2::{Digest, Sha256};

use super::error::{self, describe, Error, Kind, OpError};
use super::lock::{self, WriteLock};
use super::pin::Pin;
use super::registry::{self, ModuleClient};
use super::token;

/// How long a caller waits for a free session when the token allows no more (CKR_SESSION_COUNT).
const SESSION_WAIT: Duration = Duration::from_secs(10);

/// Idle sessions kept per token, at most (more are closed when they come back).
const MAX_IDLE_SESSIONS: usize = 64;

/// The pauses before each retry of a token lookup or a login that met a transient answer (a
/// file-backed token such as SoftHSM, read while another process rewrites it, briefly shows no
/// token or an uninitialized PIN). 0.6 s in all: a real misconfiguration still fails within a
/// second.
const TRANSIENT_PAUSES_MS: [u64; 6] = [10, 20, 40, 80, 160, 300];

/// Runs `f` until it succeeds or fails with an answer `transient` does not accept, pausing per
/// [`TRANSIENT_PAUSES_MS`]; the last answer stands. Says in the log what was retried.
fn ride_out<T, E: std::fmt::Display>(
    who: &str,
    what: &str,
    transient: impl Fn(&E) -> bool,
    mut f: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let mut retries = 0;
    loop {
        match f() {
            Ok(v) => {
                if retries > 0 {
                    log::info!("{who}: {what} succeeded after {retries} retries");
                }
                return Ok(v);
            }
            Err(e) if retries < TRANSIENT_PAUSES_MS.len() && transient(&e) => {
                log::debug!("{who}: {what}: {e}; retrying (the token may be mid-write)");
                std::thread::sleep(Duration::from_millis(TRANSIENT_PAUSES_MS[retries]));
                retries += 1;
            }
            Err(e) => {
                if retries > 0 {
                    log::info!("{who}: {what} still failing after {retries} retries");
                }
                return Err(e);
            }
        }
    }
}

fn poisoned() -> Error {
    Error::new(
        Kind::Unusable,
        "PKCS#11 client lock poisoned",
        "restart the application",
    )
}

/// Locks a mutex; a poisoned lock is an error, not a panic.
fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>, Error> {
    m.lock().map_err(|_| poisoned())
}

/// Which token to use and how to log in to it.
#[derive(Debug)]
pub struct TokenSpec {
    /// Who uses it, to start messages: `slot 'devicekey-hsm'`, `[server] token 'x'`.
    pub who: String,
    /// The module as configured.
    pub module: PathBuf,
    /// The token's label.
    pub token: String,
    /// The user PIN, when the config names a source.
    pub pin: Option<Pin>,
}

impl TokenSpec {
    /// Where the PIN comes from, for messages.
    pub fn pin_source(&self) -> &str {
        self.pin
            .as_ref()
            .map_or("no PIN source", |p| p.source.as_str())
    }
}

/// PINs a token rejected in this process, as (module, token, PIN) fingerprints: the same wrong
/// PIN is never presented twice (the token counts failures and locks), even when the token is
/// opened again; a corrected PIN is tried.
fn rejected_pins() -> &'static Mutex<HashSet<[u8; 32]>> {
    static REJECTED: OnceLock<Mutex<HashSet<[u8; 32]>>> = OnceLock::new();
    REJECTED.get_or_init(|| Mutex::new(HashSet::new()))
}

fn pin_fingerprint(spec: &TokenSpec, pin: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(spec.module.as_os_str().as_encoded_bytes());
    h.update([0]);
    h.update(spec.token.as_bytes());
    h.update([0]);
    h.update(pin.as_bytes());
    h.finalize().into()
}

/// One connection to the token, valid in the process that made it.
pub struct Conn {
    // Field order matters: the idle sessions are closed (in Drop) before the client goes away.
    idle: Mutex<Vec<Session>>,
    freed: Condvar,
    /// Replaced after a dropped session or token: its sessions are forgotten, never closed (their
    /// handles may already belong to new sessions).
    retired: AtomicBool,
    /// The slot holding the token.
    pub slot: Slot,
    /// The process that connected.
    pub pid: u32,
    /// The module.
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
            Ok(mut idle) if idle.len() < MAX_IDLE_SESSIONS => {
                idle.push(session);
                self.freed.notify_one();
            }
            _ => close(session, self.pid),
        }
    }
}

/// Closes a session we opened, unless we are a forked child (the handle is the parent's).
fn close(session: Session, pid: u32) {
    if pid == std::process::id() {
        if let Err(e) = session.close() {
            log::debug!("{}", describe(&e));
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

/// One token of one module, as its users see it: connected on first use and again after a fork
/// or a dropped token, with a pool of logged-in sessions.
pub struct Token {
    spec: TokenSpec,
    conn: Mutex<Option<Arc<Conn>>>,
    login_lock: Mutex<()>,
}

crate::redact::debug_shows!(Token: spec);

impl Token {
    /// A token to connect to on first use.
    pub fn new(spec: TokenSpec) -> Self {
        Self {
            spec,
            conn: Mutex::new(None),
            login_lock: Mutex::new(()),
        }
    }

    /// What it was made from.
    pub fn spec(&self) -> &TokenSpec {
        &self.spec
    }

    /// The connection of this process, established on first use and again after a fork;
    /// `on_new_connection` runs when a new one is installed (cached object handles are void).
    pub fn conn(&self, on_new_connection: &dyn Fn()) -> Result<Arc<Conn>, Error> {
        let pid = std::process::id();
        let mut guard = lock(&self.conn)?;
        if let Some(c) = guard.as_ref() {
            if c.pid == pid {
                return Ok(c.clone());
            }
            log::info!(
                "{}: process {pid} was forked from {}; connecting to the module afresh",
                self.spec.who,
                c.pid
            );
        }
        // Loading the module reads (and SoftHSM even writes) the token's files: one of our
        // processes at a time.
        let _lock = self.write_lock();
        let client = registry::open(&self.spec.module)?;
        let (slot, _) = self.find(&client)?;
        let conn = Arc::new(Conn::new(client, slot));
        *guard = Some(conn.clone());
        drop(guard);
        on_new_connection();
        Ok(conn)
    }

    /// The slot holding the token with our label, and its info. A token not found is looked
    /// for again a few times within 0.6 s (a file-backed token being rewritten by another
    /// process briefly disappears).
    pub fn find(&self, client: &ModuleClient) -> Result<(Slot, TokenInfo), Error> {
        let _lock = self.write_lock();
        ride_out(
            &self.spec.who,
            "finding the token",
            |e: &Error| e.kind == Kind::NotFound,
            || token::find_by_label(client, &self.spec.token),
        )
        .map_err(|e| e.context(&self.spec.who))
    }

    /// The cross-process lock of this token: held around loading the module, finding the
    /// token, logging in, key generation, object creation and deletion (never around signing).
    pub fn write_lock(&self) -> WriteLock {
        lock::write_lock(&self.spec.module, &self.spec.token)
    }

    /// Re-establishes after `err` on `old`: re-initializes the module if it was finalized under
    /// us, finds the token again (its slot may have changed) and installs a new connection with an
    /// empty pool. The old connection is retired: its sessions are forgotten, not closed, because
    /// after a finalize, a removal or C_CloseAllSessions their handle numbers may be reused by the
    /// module for new sessions.
    fn reestablish(
        &self,
        old: &Arc<Conn>,
        err: &CkError,
        on_new_connection: &dyn Fn(),
    ) -> Result<Arc<Conn>, Error> {
        if error::rv(err) == Some(RvError::CryptokiNotInitialized) {
            old.client.reinitialize()?;
        }
        let mut guard = lock(&self.conn)?;
        if let Some(cur) = guard.as_ref() {
            if !Arc::ptr_eq(cur, old) && cur.pid == std::process::id() {
                return Ok(cur.clone());
            }
        }
        let (slot, _) = self.find(&old.client).map_err(|mut e| {
            if e.kind == Kind::NotFound {
                e.kind = Kind::Unreachable;
            }
            e
        })?;
        old.retired.store(true, Ordering::SeqCst);
        if let Ok(mut idle) = old.idle.lock() {
            idle.clear();
        }
        let conn = Arc::new(Conn::new(old.client.clone(), slot));
        *guard = Some(conn.clone());
        drop(guard);
        on_new_connection();
        Ok(conn)
    }

    /// Opens a new session and logs it in if needed.
    fn open_session<E: From<Error>>(&self, conn: &Conn) -> Result<Session, OpError<E>> {
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
                    let idle = lock(&conn.idle).map_err(fail)?;
                    let (mut idle, _) = conn
                        .freed
                        .wait_timeout(idle, Duration::from_millis(200))
                        .map_err(|_| fail(poisoned()))?;
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
    fn take<E: From<Error>>(&self, conn: &Conn) -> Result<Session, OpError<E>> {
        if let Some(s) = lock(&conn.idle).map_err(fail)?.pop() {
            return Ok(s);
        }
        self.open_session(conn)
    }

    /// Logs the application in (once; the login is shared by all sessions).
    fn login<E: From<Error>>(&self, s: &Session) -> Result<(), OpError<E>> {
        let Some(pin) = &self.spec.pin else {
            return Ok(());
        };
        let state = |s: &Session| s.get_session_info().map(|i| i.session_state());
        if matches!(state(s)?, SessionState::RoUser | SessionState::RwUser) {
            return Ok(());
        }
        let who = &self.spec.who;
        let token = &self.spec.token;
        let _lock = self.write_lock();
        let auth = |problem: String, fix: &str| {
            OpError::Fail(E::from(Error::new(Kind::Auth, problem, fix)))
        };
        let _serial = lock(&self.login_lock).map_err(fail)?;
        let fingerprint = pin_fingerprint(&self.spec, &pin.secret);
        if lock(rejected_pins()).map_err(fail)?.contains(&fingerprint) {
            return Err(auth(
                format!(
                    "{who}: the PIN from {} was rejected by token '{token}' earlier; not trying again",
                    pin.source
                ),
                "fix the PIN and restart the application",
            ));
        }
        match state(s)? {
            SessionState::RoUser | SessionState::RwUser => return Ok(()),
            SessionState::RwSecurityOfficer => {
                return Err(auth(
                    format!("{who}: the security officer is logged in to token '{token}'"),
                    "log the SO out",
                ))
            }
            _ => {}
        }
        let secret = cryptoki::types::AuthPin::from(pin.secret.to_string());
        // A token being rewritten by another process may briefly answer as if it had no user PIN
        // or were not a token at all.
        let transient = |e: &CkError| {
            matches!(
                error::rv(e),
                Some(RvError::UserPinNotInitialized | RvError::TokenNotRecognized)
            )
        };
        let logged_in = ride_out(who, "C_Login", transient, || {
            s.login(UserType::User, Some(&secret))
        });
        match logged_in {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
            Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => {
                lock(rejected_pins()).map_err(fail)?.insert(fingerprint);
                Err(auth(
                    format!(
                        "{who}: token '{token}' rejected the PIN from {} (CKR_PIN_INCORRECT)",
                        pin.source
                    ),
                    "put the token's user PIN there and restart (no further attempts are made: the token counts failures and locks)",
                ))
            }
            Err(CkError::Pkcs11(RvError::PinLocked, _)) => Err(auth(
                format!("{who}: the user PIN of token '{token}' is locked"),
                "unlock it with the SO PIN (SoftHSM: softhsm2-util; an HSM: its admin tool)",
            )),
            Err(e) => Err(e.into()),
        }
    }

    /// Runs `f` on a session of the pool. A dropped session or token is re-established once and
    /// `f` retried once on a fresh session; any other failure is final. `on_new_connection` runs
    /// whenever a new connection is installed (cached object handles are void then).
    pub fn run<T, E: From<Error>>(
        &self,
        what: &str,
        on_new_connection: &dyn Fn(),
        f: impl Fn(&Session) -> Result<T, OpError<E>>,
    ) -> Result<T, E> {
        self.try_run(what, on_new_connection, f)
            .map_err(|e| e.into_final(what))
    }

    /// [`Token::run`], leaving a module error that survived the retry as it is (for a caller that
    /// looks objects up again after [`super::Recovery::LookUpAgain`]).
    pub fn try_run<T, E: From<Error>>(
        &self,
        what: &str,
        on_new_connection: &dyn Fn(),
        f: impl Fn(&Session) -> Result<T, OpError<E>>,
    ) -> Result<T, OpError<E>> {
        let conn = self.conn(on_new_connection).map_err(fail)?;
        match self.attempt(&conn, false, &f) {
            Ok(v) => Ok(v),
            Err(OpError::Ck(e)) if error::needs_reconnect(&e) => {
                log::warn!(
                    "{}: {what}: the token dropped the session ({}); re-establishing once",
                    self.spec.who,
                    describe(&e)
                );
                let conn = if error::rv(&e) == Some(RvError::UserNotLoggedIn) {
                    // Someone logged the application out: the sessions are fine, a fresh one
                    // logs in again.
                    conn
                } else {
                    self.reestablish(&conn, &e, on_new_connection)
                        .map_err(fail)?
                };
                self.attempt(&conn, true, &f)
            }
            Err(e) => Err(e),
        }
    }

    fn attempt<T, E: From<Error>>(
        &self,
        conn: &Conn,
        fresh: bool,
        f: &impl Fn(&Session) -> Result<T, OpError<E>>,
    ) -> Result<T, OpError<E>> {
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
            Err(OpError::Ck(e)) if error::session_dead(&e) => {
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

fn fail<E: From<Error>>(e: Error) -> OpError<E> {
    OpError::Fail(E::from(e))
}
