//! One `cryptoki` context per wrapped module per process.
//!
//! PKCS#11 allows one C_Initialize per module per process, so every pkcs11 slot (and the server,
//! when it talks to the same module) shares one [`ModuleClient`] per module, found through a global
//! registry keyed by **process id** and canonical path. The registry holds weak references: when
//! the last slot using a module goes away (our C_Finalize), the module is finalized if we were the
//! ones who initialized it, and unloaded.
//!
//! `CKR_CRYPTOKI_ALREADY_INITIALIZED` from below counts as success (someone else in the process,
//! e.g. the application itself, initialized the module; they own it and we never finalize it).
//!
//! Fork: a context created in a parent is never used, closed or finalized in a child. The
//! registry key contains the process id, so a child gets a fresh `ModuleClient` (a fresh
//! C_Initialize, which a module like SoftHSM may answer with ALREADY_INITIALIZED: fine); every
//! backend checks the process id before each operation and reconnects when it changed (see
//! `pool.rs`); and a parent's context dropped in the child is left alone.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};

use super::errors::Failure;
use crate::backend::BackendError;

type Registry = Mutex<HashMap<(u32, PathBuf), Weak<ModuleClient>>>;

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(HashMap::new()))
}

/// A loaded and initialized PKCS#11 module, shared by everyone in this process.
pub struct ModuleClient {
    ctx: Pkcs11,
    path: PathBuf,
    pid: u32,
    /// True when our C_Initialize succeeded (then C_Finalize is ours to call).
    owns_init: AtomicBool,
}

impl std::fmt::Debug for ModuleClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleClient")
            .field("path", &self.path)
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

impl ModuleClient {
    /// The `cryptoki` context.
    pub fn context(&self) -> &Pkcs11 {
        &self.ctx
    }

    /// The canonical path of the module.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Calls C_Initialize again after the module answered CKR_CRYPTOKI_NOT_INITIALIZED (someone
    /// else in the process finalized it under us).
    pub(super) fn reinitialize(&self) -> Result<(), BackendError> {
        match initialize(&self.ctx) {
            Ok(true) => {
                log::warn!(
                    "{} was finalized by someone else in this process; initialized it again",
                    self.path.display()
                );
                self.owns_init.store(true, Ordering::SeqCst);
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(e) => Err(super::errors::map(
                &e,
                &format!("C_Initialize of {}", self.path.display()),
            )),
        }
    }
}

/// C_Initialize with OS locking; `Ok(false)` when the module was already initialized.
fn initialize(ctx: &Pkcs11) -> Result<bool, CkError> {
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => Ok(true),
        Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(false),
        Err(e) => Err(e),
    }
}

impl Drop for ModuleClient {
    fn drop(&mut self) {
        if self.pid != std::process::id() {
            // A parent's context in a forked child: its sessions and its initialization belong to
            // the parent. Touch nothing.
            return;
        }
        if !self.owns_init.load(Ordering::SeqCst) {
            return;
        }
        let mut reg = registry().lock().unwrap_or_else(PoisonError::into_inner);
        let key = (self.pid, self.path.clone());
        // A successor created while we were dying got ALREADY_INITIALIZED from our init: hand it
        // the ownership instead of finalizing under it.
        if let Some(next) = reg.get(&key).and_then(Weak::upgrade) {
            next.owns_init.store(true, Ordering::SeqCst);
            drop(reg);
            drop(next);
            return;
        }
        reg.remove(&key);
        if let Err(e) = self.ctx.clone().finalize() {
            log::debug!("{}: {}", self.path.display(), super::errors::describe(&e));
        }
    }
}

/// The process-wide client of the module at `path` (loaded and initialized on first use).
pub fn shared_module(path: &Path) -> Result<Arc<ModuleClient>, BackendError> {
    open_module(path).map_err(|f| f.error)
}

pub(super) fn open_module(path: &Path) -> Result<Arc<ModuleClient>, Failure> {
    let canonical = std::fs::canonicalize(path).map_err(|e| {
        Failure::new(
            BackendError::Unusable,
            format!("the wrapped PKCS#11 module {} cannot be found: {e}", path.display()),
            format!(
                "install the module (for SoftHSM: apt-get install softhsm2) or correct `module` (now {})",
                path.display()
            ),
        )
    })?;
    let pid = std::process::id();
    let key = (pid, canonical.clone());
    let mut reg = registry().lock().map_err(|_| {
        Failure::new(
            BackendError::Unusable,
            "module registry lock poisoned",
            "restart the application",
        )
    })?;
    if let Some(client) = reg.get(&key).and_then(Weak::upgrade) {
        return Ok(client);
    }
    // Forget entries of dead clients and of other processes (a forked child's inheritance).
    reg.retain(|(p, _), w| *p == pid && w.strong_count() > 0);
    let ctx = Pkcs11::new(&canonical).map_err(|e| {
        Failure::new(
            BackendError::Unusable,
            format!("cannot load the wrapped PKCS#11 module {}: {e}", canonical.display()),
            "check that the file is a PKCS#11 module built for this machine and that its dependencies are installed (ldd)",
        )
    })?;
    let owns = initialize(&ctx).map_err(|e| {
        Failure::new(
            BackendError::Unusable,
            format!(
                "C_Initialize of {} failed: {}",
                canonical.display(),
                super::errors::describe(&e)
            ),
            "check the module's own configuration (for SoftHSM: SOFTHSM2_CONF and its tokendir)",
        )
    })?;
    let client = Arc::new(ModuleClient {
        ctx,
        path: canonical,
        pid,
        owns_init: AtomicBool::new(owns),
    });
    reg.insert(key, Arc::downgrade(&client));
    log::debug!(
        "loaded {} ({})",
        client.path.display(),
        if owns {
            "initialized"
        } else {
            "already initialized"
        }
    );
    Ok(client)
}
