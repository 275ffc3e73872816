//! The shared state of one pkcs11 slot: its settings, its connection to the wrapped token (a
//! [`p11::Token`]: session pool, login, the one retry after a dropped session) and the keys and
//! objects it knows by name.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use cryptoki::slot::{Slot, TokenInfo};

use super::errors::OpError;
use super::settings::Settings;
use crate::backend::{BackendError, KeyPurpose, Result};
use crate::p11::{self, Conn, Pin, Token, TokenSpec};

/// Locks a mutex; a poisoned lock is an error, not a panic.
pub(super) fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| BackendError::Unusable("pkcs11 backend lock poisoned".into()))
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
    token: Token,
    /// Known keys by name.
    pub keys: Mutex<HashMap<String, KeyEntry>>,
    /// Known objects by name.
    pub objects: Mutex<HashMap<String, ObjectHandle>>,
}

impl Inner {
    pub(super) fn new(settings: Settings) -> Self {
        let token = Token::new(TokenSpec {
            who: format!("slot '{}'", settings.slot_label),
            module: settings.module.clone(),
            token: settings.token.clone(),
            pin: settings.pin.as_ref().map(|secret| Pin {
                secret: secret.clone(),
                source: settings.pin_source.clone(),
            }),
        });
        Self {
            settings,
            token,
            keys: Mutex::new(HashMap::new()),
            objects: Mutex::new(HashMap::new()),
        }
    }

    /// The wrapped token.
    pub(super) fn token(&self) -> &Token {
        &self.token
    }

    /// The connection of this process, established on first use and again after a fork.
    pub(super) fn conn(&self) -> std::result::Result<Arc<Conn>, p11::Error> {
        self.token.conn(&|| self.forget_handles())
    }

    /// The slot holding the token with our label, and its info.
    pub(super) fn find_token(
        &self,
        client: &p11::ModuleClient,
    ) -> std::result::Result<(Slot, TokenInfo), p11::Error> {
        self.token.find(client)
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

    /// Runs `f` on a session of the pool. A dropped session or token is re-established once
    /// (cached handles forgotten) and `f` retried once on a fresh session; any other failure is
    /// final.
    pub(super) fn run<T>(
        &self,
        what: &str,
        f: impl Fn(&Session) -> std::result::Result<T, OpError>,
    ) -> Result<T> {
        self.token.run(what, &|| self.forget_handles(), f)
    }

    /// [`Inner::run`] for a change to the wrapped token: writes go one process at a time (see
    /// p11::lock), so the token's write lock is held while `f` runs, and the change is counted
    /// for other processes' change markers.
    pub(super) fn run_write<T>(
        &self,
        what: &str,
        f: impl Fn(&Session) -> std::result::Result<T, OpError>,
    ) -> Result<T> {
        let write = self.token().write_lock();
        write.mark_changed();
        self.run(what, f)
    }
}
