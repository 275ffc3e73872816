//! The module's global state between C_Initialize and C_Finalize, and fork detection.
//!
//! The state is one `Arc<Token>` in a lock-free cell, so a call takes a reference without a lock
//! and C_Finalize never waits for (or breaks) calls in flight: they finish on their own `Arc`.
//! A forked child sees the parent's pid in the state and must call C_Initialize again, which
//! builds a fresh token; the parent's state is leaked in the child, never torn down there.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use cryptoki_sys::*;

use crate::token::Token;

/// The token and the process that built it.
pub struct Initialized {
    pid: u32,
    /// The token.
    pub token: Arc<Token>,
}

static STATE: ArcSwapOption<Initialized> = ArcSwapOption::const_empty();

/// Serializes C_Initialize and C_Finalize with each other.
static LIFECYCLE: Mutex<()> = Mutex::new(());

/// The token, or `CKR_CRYPTOKI_NOT_INITIALIZED`.
pub fn token() -> Result<Arc<Token>, CK_RV> {
    match STATE.load_full() {
        Some(s) if s.pid == std::process::id() => Ok(s.token.clone()),
        _ => Err(CKR_CRYPTOKI_NOT_INITIALIZED),
    }
}

/// C_Initialize's part after argument checks.
pub fn initialize() -> Result<(), CK_RV> {
    let _guard = LIFECYCLE.lock().unwrap_or_else(|e| e.into_inner());
    let pid = std::process::id();
    if let Some(old) = STATE.load_full() {
        if old.pid == pid {
            return Err(CKR_CRYPTOKI_ALREADY_INITIALIZED);
        }
        // A forked child: the parent's connections and locks are not ours to use or tear down.
        std::mem::forget(STATE.swap(None));
        log::debug!("C_Initialize after fork: building a fresh state");
    }
    let token = Token::from_environment().map_err(|e| {
        log::error!("{e}");
        CKR_FUNCTION_FAILED
    })?;
    STATE.store(Some(Arc::new(Initialized {
        pid,
        token: Arc::new(token),
    })));
    Ok(())
}

/// C_Finalize's part after argument checks.
pub fn finalize() -> Result<(), CK_RV> {
    let _guard = LIFECYCLE.lock().unwrap_or_else(|e| e.into_inner());
    match STATE.load_full() {
        Some(s) if s.pid == std::process::id() => {
            STATE.store(None);
            Ok(())
        }
        _ => Err(CKR_CRYPTOKI_NOT_INITIALIZED),
    }
}
