//! The module's global state between C_Initialize and C_Finalize, and fork detection.
//!
//! The state is one `Arc<Token>` in a lock-free cell, so a call takes a reference without a lock
//! and C_Finalize never waits for (or breaks) calls in flight: they finish on their own `Arc`.
//! Fork detection costs one atomic load per call, not a `getpid()`: a `pthread_atfork` child
//! handler (registered at the first C_Initialize) bumps a fork generation, and the state
//! remembers the generation that built it. A forked child sees an older generation in the state
//! and must call C_Initialize again, which builds a fresh token; the parent's state is leaked in
//! the child, never torn down there.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use cryptoki_sys::*;

use crate::token::Token;

/// The token and the fork generation that built it.
pub struct Initialized {
    generation: u64,
    /// The token.
    pub token: Arc<Token>,
}

static STATE: ArcSwapOption<Initialized> = ArcSwapOption::const_empty();

/// Serializes C_Initialize and C_Finalize with each other.
static LIFECYCLE: Mutex<()> = Mutex::new(());

/// How many forks this process's ancestry went through since the module was loaded: bumped in
/// every child by [`forked_child`].
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Whether [`forked_child`] is registered (set under [`LIFECYCLE`]).
static ATFORK_REGISTERED: AtomicBool = AtomicBool::new(false);

/// The `pthread_atfork` child handler: runs in the child, in the forking thread, before
/// `fork()` returns there. Only an atomic add: async-signal-safe, as a child handler must be.
extern "C" fn forked_child() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// Registers [`forked_child`] once; called under [`LIFECYCLE`].
fn register_atfork() -> Result<(), CK_RV> {
    if ATFORK_REGISTERED.load(Ordering::Relaxed) {
        return Ok(());
    }
    // SAFETY: `forked_child` is a plain `extern "C" fn` that lives as long as the module's code
    // (glibc unregisters a library's handlers when it is unloaded) and only touches an atomic.
    let rc = unsafe { libc::pthread_atfork(None, None, Some(forked_child)) };
    if rc != 0 {
        log::error!("C_Initialize: pthread_atfork failed ({rc}): cannot detect fork");
        return Err(CKR_HOST_MEMORY);
    }
    ATFORK_REGISTERED.store(true, Ordering::Relaxed);
    Ok(())
}

/// The current fork generation.
fn generation() -> u64 {
    GENERATION.load(Ordering::Relaxed)
}

/// The token, or `CKR_CRYPTOKI_NOT_INITIALIZED`.
pub fn token() -> Result<Arc<Token>, CK_RV> {
    match STATE.load_full() {
        Some(s) if s.generation == generation() => Ok(s.token.clone()),
        _ => Err(CKR_CRYPTOKI_NOT_INITIALIZED),
    }
}

/// C_Initialize's part after argument checks.
pub fn initialize() -> Result<(), CK_RV> {
    let _guard = LIFECYCLE.lock().unwrap_or_else(|e| e.into_inner());
    register_atfork()?;
    let generation = generation();
    if let Some(old) = STATE.load_full() {
        if old.generation == generation {
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
        generation,
        token: Arc::new(token),
    })));
    Ok(())
}

/// C_Finalize's part after argument checks.
pub fn finalize() -> Result<(), CK_RV> {
    let _guard = LIFECYCLE.lock().unwrap_or_else(|e| e.into_inner());
    match STATE.load_full() {
        Some(s) if s.generation == generation() => {
            s.token.finalize();
            STATE.store(None);
            Ok(())
        }
        _ => Err(CKR_CRYPTOKI_NOT_INITIALIZED),
    }
}
