//! One `cryptoki` context per PKCS#11 module per process: the only place in the crate that loads a
//! module (`Pkcs11::new`).
//!
//! PKCS#11 allows one C_Initialize per module per process, so every user of a module in this
//! process (the pkcs11 key store's slots, the server's inventory, the CLI) shares one
//! [`ModuleClient`], found through a global registry keyed by **process id** and canonical path.
//! The registry holds weak references: when the last user of a module goes away, the module is
//! finalized if we were the ones who initialized it.
//!
//! `CKR_CRYPTOKI_ALREADY_INITIALIZED` from below counts as success (someone else in the process,
//! e.g. the application itself, initialized the module; they own it and we never finalize it).
//!
//! Fork: a context created in a parent is never used, closed or finalized in a child. The
//! registry key contains the process id, so a child gets a fresh `ModuleClient` (a fresh
//! C_Initialize, which a module like SoftHSM may answer with ALREADY_INITIALIZED: fine); the
//! session pool checks the process id before each operation and reconnects when it changed (see
//! [`super::pool`]); and a parent's context dropped in the child is left alone.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};

use super::error::{describe, Error, Kind};

type Registry = Mutex<HashMap<(u32, PathBuf), Weak<ModuleClient>>>;

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The installed path of our own module.
pub const INSTALLED_MODULE: &str = "/usr/local/lib/devicekey/libdevicekey_pkcs11.so";

/// Our own module: next to the running binary (a build tree), else where the Debian package puts
/// it, else the installed path (`scripts/install.sh`).
pub fn our_module_path() -> PathBuf {
    let name = if cfg!(target_os = "macos") {
        "libdevicekey_pkcs11.dylib"
    } else {
        "libdevicekey_pkcs11.so"
    };
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            for candidate in [dir.join(name), dir.join("..").join(name)] {
                if candidate.is_file() {
                    return candidate;
                }
            }
        }
    }
    if let Some(packaged) = packaged_module_path().filter(|p| p.is_file()) {
        return packaged;
    }
    PathBuf::from(INSTALLED_MODULE)
}

/// Where the Debian package puts our module: p11-kit's module directory for this architecture
/// (`scripts/package.sh`). `None` where there is no such package.
pub fn packaged_module_path() -> Option<PathBuf> {
    let multiarch = match (std::env::consts::OS, std::env::consts::ARCH) {
        ("linux", "x86_64") => "x86_64-linux-gnu",
        ("linux", "aarch64") => "aarch64-linux-gnu",
        ("linux", "x86") => "i386-linux-gnu",
        ("linux", "riscv64") => "riscv64-linux-gnu",
        ("linux", "s390x") => "s390x-linux-gnu",
        _ => return None,
    };
    Some(PathBuf::from(format!(
        "/usr/lib/{multiarch}/pkcs11/libdevicekey_pkcs11.so"
    )))
}

/// A loaded and initialized PKCS#11 module, shared by everyone in this process.
pub struct ModuleClient {
    ctx: Pkcs11,
    path: PathBuf,
    pid: u32,
    /// True when our C_Initialize succeeded (then C_Finalize is ours to call).
    owns_init: AtomicBool,
}

crate::redact::debug_shows!(ModuleClient: path, pid);

impl ModuleClient {
    /// The `cryptoki` context.
    pub fn context(&self) -> &Pkcs11 {
        &self.ctx
    }

    /// The canonical path of the module.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The process that loaded it.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Calls C_Initialize again after the module answered CKR_CRYPTOKI_NOT_INITIALIZED (someone
    /// else in the process finalized it under us).
    pub fn reinitialize(&self) -> Result<(), Error> {
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
            Err(e) => Err(Error::from_ck(
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
            log::debug!("{}: {}", self.path.display(), describe(&e));
        }
    }
}

/// The process-wide client of the module at `path` (loaded and initialized on first use).
///
/// Errors are `Unusable`, with the fix for an operator: the file is missing, is not a loadable
/// PKCS#11 module, or its C_Initialize failed.
pub fn open(path: &Path) -> Result<Arc<ModuleClient>, Error> {
    let canonical = std::fs::canonicalize(path).map_err(|e| {
        Error::new(
            Kind::Unusable,
            format!("the PKCS#11 module {} cannot be found: {e}", path.display()),
            format!(
                "install the module (for SoftHSM: apt-get install softhsm2) or correct `module` (now {})",
                path.display()
            ),
        )
    })?;
    let pid = std::process::id();
    let key = (pid, canonical.clone());
    let mut reg = registry().lock().map_err(|_| {
        Error::new(
            Kind::Unusable,
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
        Error::new(
            Kind::Unusable,
            format!("cannot load the PKCS#11 module {}: {e}", canonical.display()),
            "check that the file is a PKCS#11 module built for this machine and that its dependencies are installed (ldd)",
        )
    })?;
    let owns = initialize(&ctx).map_err(|e| {
        Error::new(
            Kind::Unusable,
            format!(
                "C_Initialize of {} failed: {}",
                canonical.display(),
                describe(&e)
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
