//! The user PIN of a software store with `login = "pin"`, and the PIN file code the pkcs11 store
//! reuses for its own PIN.
//!
//! **Keys.** A store with a PIN has one random 256-bit *data key*. Each key file holds its
//! scalar sealed under it (AES-256-GCM, a random 96-bit nonce, the key's file name as associated
//! data, so a sealed scalar moved to another file does not open). The data key itself is sealed
//! in the PIN file (`pin`) under a *key-encryption key* derived from the PIN with Argon2id; the
//! parameters and the random salt are written next to it. A wrong PIN fails the AES-GCM tag of
//! the wrapped data key: there is no separate verifier.
//!
//! **Changing the PIN** rewrites the PIN file alone (a new salt, the same data key), atomically:
//! a crash leaves either the old PIN or the new one. **Setting a first PIN** on a store whose keys
//! are in the clear writes the PIN file first, then seals each key file atomically; a key still in
//! the clear (a crash half-way) is sealed at the next login. The PIN file says sealing is
//! unfinished until every key is sealed, so no other login reads a key file. Every key is usable
//! at every moment: sealed ones with the PIN, clear ones as before.
//!
//! **Wrong tries** are counted in the PIN file, under the store lock, *before* the Argon2id work
//! starts (killing a process in the middle of a check does not give the try back), and reset by
//! a right PIN. At the limit ([`PinVault::max_tries`]) every try is refused as locked.
//!
//! **In memory**: the data key is kept (in a wiped buffer) from C_Login to C_Logout; the scalars
//! it opens become OpenSSL keys kept in one table, and both are dropped (OpenSSL clears its
//! private `BIGNUM`s) on logout. Neither the PIN nor any key is ever logged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use argon2::{Algorithm, Argon2, Params, Version};
use openssl::ec::EcKey;
use openssl::pkey::Private;
use zeroize::Zeroizing;

use super::format::{Hex, Kdf, KeyFile, PinFile, Sealed, PIN_FORMAT, SEALED_VERSION, VERSION};
use super::signer;
use crate::backend::file_store;
use crate::backend::keydir::KeyDir;
use crate::backend::pin::{PinGuard, PinStatus};
use crate::backend::{BackendError, Result, Signer};

/// The PIN file's name in the store directory.
pub const PIN_FILE: &str = "pin";

/// Wrong tries allowed in a row unless the slot's `pin_tries` says otherwise.
pub const DEFAULT_MAX_TRIES: u32 = 10;

/// The environment variable that makes new PIN files use [`KdfCost::TEST`]; honoured only by
/// debug builds (the test suite's), never by a release build.
pub const CHEAP_KDF_ENV: &str = "DEVICEKEY_TEST_CHEAP_PIN_KDF";

/// A PIN file is tiny; anything larger is not one.
const MAX_PIN_FILE: u64 = 16 * 1024;

/// The data key of a store: 32 bytes in a buffer that is wiped when dropped.
pub type DataKey = Box<Zeroizing<[u8; 32]>>;

/// The Argon2id cost of deriving a key from a PIN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfCost {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes.
    pub passes: u32,
    /// Lanes.
    pub lanes: u32,
}

impl KdfCost {
    /// What new PIN files use: 64 MiB, 3 passes, 1 lane (RFC 9106's second recommended option).
    pub const STRONG: KdfCost = KdfCost {
        memory_kib: 64 * 1024,
        passes: 3,
        lanes: 1,
    };

    /// What a debug build uses with `DEVICEKEY_TEST_CHEAP_PIN_KDF=1`: fast, and weak.
    pub const TEST: KdfCost = KdfCost {
        memory_kib: 256,
        passes: 1,
        lanes: 1,
    };

    /// The cost for a PIN file written now.
    pub fn for_new_pins() -> KdfCost {
        #[cfg(debug_assertions)]
        if std::env::var_os(CHEAP_KDF_ENV).is_some_and(|v| v == "1") {
            return KdfCost::TEST;
        }
        KdfCost::STRONG
    }
}

fn crypto(what: &str) -> BackendError {
    BackendError::Crypto(what.to_string())
}

fn random<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b)
        .map_err(|e| BackendError::Crypto(format!("random number generator failed: {e}")))?;
    Ok(b)
}

/// Seals `plaintext` under `key` with AES-256-GCM and a random nonce; `aad` is bound to it.
pub fn seal(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Result<Sealed> {
    let nonce: [u8; 12] = random()?;
    let cipher = Aes256Gcm::new(key.into());
    let ciphertext = cipher
        .encrypt(
            &Nonce::from(nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| crypto("AES-GCM sealing failed"))?;
    Ok(Sealed {
        nonce: Hex(nonce.to_vec()),
        ciphertext: Hex(ciphertext),
    })
}

/// Opens what [`seal`] sealed; `None` when the key, the associated data or the bytes differ.
pub fn open(key: &[u8; 32], aad: &[u8], sealed: &Sealed) -> Option<Zeroizing<Vec<u8>>> {
    let nonce: [u8; 12] = sealed.nonce.0.as_slice().try_into().ok()?;
    let cipher = Aes256Gcm::new(key.into());
    cipher
        .decrypt(
            &Nonce::from(nonce),
            Payload {
                msg: &sealed.ciphertext.0,
                aad,
            },
        )
        .ok()
        .map(Zeroizing::new)
}

/// Opens a sealed 32-byte secret (a scalar or a data key).
fn open_32(key: &[u8; 32], aad: &[u8], sealed: &Sealed) -> Option<DataKey> {
    let bytes = open(key, aad, sealed)?;
    let mut out = Box::new(Zeroizing::new([0u8; 32]));
    if bytes.len() != 32 {
        return None;
    }
    out.copy_from_slice(&bytes);
    Some(out)
}

/// Checks parameters read from a file (so a damaged or hostile file cannot ask for terabytes).
fn params_of(kdf: &Kdf) -> Result<Params> {
    let bad = |what: &str| BackendError::Unusable(format!("PIN file: {what}"));
    if !(8..=4 * 1024 * 1024).contains(&kdf.memory_kib)
        || !(1..=64).contains(&kdf.passes)
        || !(1..=16).contains(&kdf.lanes)
    {
        return Err(bad("Argon2id parameters out of range"));
    }
    if kdf.salt.0.len() < 16 {
        return Err(bad("salt shorter than 16 bytes"));
    }
    Params::new(kdf.memory_kib, kdf.passes, kdf.lanes, Some(32))
        .map_err(|e| bad(&format!("Argon2id parameters refused: {e}")))
}

/// The key-encryption key: Argon2id(PIN, salt) with the file's parameters.
fn derive(pin: &[u8], kdf: &Kdf) -> Result<DataKey> {
    let params = params_of(kdf)?;
    let mut out = Box::new(Zeroizing::new([0u8; 32]));
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(pin, &kdf.salt.0, &mut out[..])
        .map_err(|e| BackendError::Crypto(format!("Argon2id failed: {e}")))?;
    Ok(out)
}

/// The associated data of the wrapped data key.
const WRAP_AAD: &[u8] = b"devicekey data key";

/// A new PIN file sealing `data_key` under `pin`.
fn new_pin_file(pin: &[u8], data_key: &[u8; 32]) -> Result<PinFile> {
    let cost = KdfCost::for_new_pins();
    let kdf = Kdf {
        algorithm: "argon2id".into(),
        memory_kib: cost.memory_kib,
        passes: cost.passes,
        lanes: cost.lanes,
        salt: Hex(random::<16>()?.to_vec()),
    };
    let kek = derive(pin, &kdf)?;
    Ok(PinFile {
        format: PIN_FORMAT.into(),
        version: VERSION,
        wrapped_key: seal(&kek, WRAP_AAD, &data_key[..])?,
        kdf,
        failures: 0,
        clear_keys_left: true,
    })
}

/// The PIN file of one key directory: the wrapped data key, its Argon2id parameters and the
/// wrong-try counter. Used by the software store and, as a PIN verifier, by the pkcs11 store.
pub struct PinVault {
    dir: Arc<KeyDir>,
    max_tries: u32,
}

impl PinVault {
    /// The PIN file in `dir`, allowing `max_tries` wrong tries in a row (at least 1).
    pub fn new(dir: Arc<KeyDir>, max_tries: u32) -> Self {
        Self {
            dir,
            max_tries: max_tries.max(1),
        }
    }

    /// Wrong tries allowed in a row.
    pub fn max_tries(&self) -> u32 {
        self.max_tries
    }

    /// True when `dir` holds a PIN file.
    pub fn exists_in(dir: &KeyDir) -> Result<bool> {
        dir.exists(PIN_FILE)
    }

    /// The PIN file, `None` when there is none. A damaged file is an error, never "no PIN".
    fn read(&self) -> Result<Option<PinFile>> {
        if !Self::exists_in(&self.dir)? {
            return Ok(None);
        }
        let path = self.dir.path().join(PIN_FILE);
        let bytes = self
            .dir
            .read_limited(PIN_FILE, MAX_PIN_FILE)?
            .ok_or_else(|| {
                BackendError::Unusable(format!(
                    "{} is refused (see the log); the PIN cannot be checked",
                    path.display()
                ))
            })?;
        PinFile::parse(&bytes)
            .map(Some)
            .map_err(|e| BackendError::Unusable(format!("{} is damaged: {e}", path.display())))
    }

    fn write(&self, file: &PinFile) -> Result<()> {
        let bytes = file
            .to_bytes()
            .map_err(|e| BackendError::Io(format!("cannot encode the PIN file: {e}")))?;
        self.dir.write_atomic(PIN_FILE, &bytes)
    }

    fn not_set() -> BackendError {
        BackendError::Refused("no PIN is set; set one with `devicekey pin set`".into())
    }

    /// The PIN state, read fresh from the file.
    pub fn status(&self) -> Result<PinStatus> {
        let failures = self.read()?.map(|f| f.failures);
        Ok(PinStatus {
            initialized: failures.is_some(),
            tries_left: Some(self.max_tries.saturating_sub(failures.unwrap_or(0))),
            max_tries: self.max_tries,
            locked: failures.is_some_and(|f| f >= self.max_tries),
        })
    }

    /// Checks `pin` and returns the data key it unlocks. The try is counted in the file before
    /// the check starts and given back only when the PIN is right.
    pub fn unlock(&self, pin: &[u8]) -> Result<DataKey> {
        let file = {
            let _lock = self.dir.lock()?;
            let mut file = self.read()?.ok_or_else(Self::not_set)?;
            if file.failures >= self.max_tries {
                return Err(BackendError::PinLocked(format!(
                    "{} wrong PINs in a row",
                    file.failures
                )));
            }
            file.failures += 1;
            self.write(&file)?;
            file
        };
        let kek = derive(pin, &file.kdf)?;
        let Some(data_key) = open_32(&kek, WRAP_AAD, &file.wrapped_key) else {
            let left = self.max_tries.saturating_sub(file.failures);
            return Err(BackendError::PinIncorrect(format!("{left} tries left")));
        };
        let _lock = self.dir.lock()?;
        let mut now = self.read()?.ok_or_else(Self::not_set)?;
        if now.wrapped_key != file.wrapped_key {
            // The PIN changed while this one was checked: it is the old one.
            return Err(BackendError::PinIncorrect(
                "the PIN changed meanwhile".into(),
            ));
        }
        if now.failures != 0 {
            now.failures = 0;
            self.write(&now)?;
        }
        Ok(data_key)
    }

    /// Sets the first PIN: a new data key, sealed under `pin`. Refused when a PIN is set.
    pub fn set_first(&self, pin: &[u8]) -> Result<DataKey> {
        let data_key = Box::new(Zeroizing::new(random::<32>()?));
        let _lock = self.dir.lock()?;
        if self.read()?.is_some() {
            return Err(BackendError::Refused(
                "a PIN is set already; change it with the current PIN".into(),
            ));
        }
        self.write(&new_pin_file(pin, &data_key)?)?;
        Ok(data_key)
    }

    /// Changes the PIN from `old` to `new` (a wrong `old` costs a try): the same data key under
    /// a new salt, one atomic write of the PIN file. Returns the data key.
    pub fn change(&self, old: &[u8], new: &[u8]) -> Result<DataKey> {
        let data_key = self.unlock(old)?;
        let mut file = new_pin_file(new, &data_key)?;
        let _lock = self.dir.lock()?;
        file.clear_keys_left = self.read()?.ok_or_else(Self::not_set)?.clear_keys_left;
        self.write(&file)?;
        Ok(data_key)
    }

    /// True when key files may still hold their scalar in the clear (see
    /// [`PinFile::clear_keys_left`]); false also when no PIN is set.
    pub fn clear_keys_left(&self) -> Result<bool> {
        Ok(self.read()?.is_some_and(|f| f.clear_keys_left))
    }

    /// Records that every key file is sealed (after [`SoftwarePin`] sealed them all).
    fn all_sealed(&self) -> Result<()> {
        let _lock = self.dir.lock()?;
        match self.read()? {
            Some(mut file) if file.clear_keys_left => {
                file.clear_keys_left = false;
                self.write(&file)
            }
            _ => Ok(()),
        }
    }
}

/// What the store has unlocked between C_Login and C_Logout.
struct Unlocked {
    data_key: DataKey,
    /// OpenSSL keys built from opened scalars, by key name.
    keys: HashMap<String, EcKey<Private>>,
}

/// The login state of one software store: shared by its PIN guard and its signers.
#[derive(Default)]
pub struct PinSession {
    unlocked: Mutex<Option<Unlocked>>,
}

fn poisoned() -> BackendError {
    BackendError::Crypto("PIN session lock poisoned".into())
}

impl PinSession {
    fn set(&self, data_key: DataKey) -> Result<()> {
        *self.unlocked.lock().map_err(|_| poisoned())? = Some(Unlocked {
            data_key,
            keys: HashMap::new(),
        });
        Ok(())
    }

    /// Forgets the data key and every key it opened.
    pub fn clear(&self) {
        match self.unlocked.lock() {
            Ok(mut g) => *g = None,
            Err(p) => *p.into_inner() = None,
        }
    }

    /// Seals a scalar for the key file `<name>.key` (needs a login).
    pub fn seal_scalar(&self, name: &str, scalar: &[u8; 32]) -> Result<Sealed> {
        let g = self.unlocked.lock().map_err(|_| poisoned())?;
        let u = g.as_ref().ok_or_else(not_logged_in)?;
        seal(&u.data_key, name.as_bytes(), scalar)
    }

    /// Forgets the opened key of `name` (it was destroyed).
    pub fn forget(&self, name: &str) {
        if let Ok(mut g) = self.unlocked.lock() {
            if let Some(u) = g.as_mut() {
                u.keys.remove(name);
            }
        }
    }

    /// The OpenSSL key of `name`, opened now if needed (needs a login).
    fn key(&self, name: &str, point: &[u8; 65], source: &ScalarSource) -> Result<EcKey<Private>> {
        let mut g = self.unlocked.lock().map_err(|_| poisoned())?;
        let u = g.as_mut().ok_or_else(not_logged_in)?;
        if let Some(k) = u.keys.get(name) {
            return Ok(k.clone());
        }
        let open_sealed = |sealed: &Sealed| {
            let scalar = open_32(&u.data_key, name.as_bytes(), sealed)
                .ok_or_else(|| crypto("the sealed key does not open with this store's data key"))?;
            signer::build_checked(point, &scalar)
        };
        let key = match source {
            ScalarSource::Sealed(sealed) => open_sealed(sealed)?,
            ScalarSource::File(file) => {
                let file = file.read(point)?;
                match (&file.sealed_scalar, &file.private_scalar) {
                    (Some(sealed), _) => open_sealed(sealed)?,
                    (None, Some(clear)) => signer::build_checked(point, &clear.0)?,
                    (None, None) => return Err(crypto("the key file holds no private key")),
                }
            }
        };
        u.keys.insert(name.to_string(), key.clone());
        Ok(key)
    }
}

fn not_logged_in() -> BackendError {
    BackendError::NotLoggedIn("the store's PIN is needed first (C_Login)".into())
}

/// Where a key's scalar comes from in a store with a PIN.
pub enum ScalarSource {
    /// Sealed, in hand (a key just made).
    Sealed(Sealed),
    /// Its key file, read on the first signature after login (a key listed from the store
    /// index). The file holds the scalar sealed, or still in the clear (a first PIN was set and
    /// the process stopped before this key was sealed; the next login seals it): either way the
    /// key is usable only after login, like every key here.
    File(super::KeyFileRef),
}

/// Signs with a key of a store with a PIN: only while the store is logged in.
pub struct SealedSigner {
    name: String,
    public_point: [u8; 65],
    source: ScalarSource,
    session: Arc<PinSession>,
}

impl SealedSigner {
    /// The signer of key `name`.
    pub fn new(
        name: &str,
        public_point: [u8; 65],
        source: ScalarSource,
        session: Arc<PinSession>,
    ) -> Self {
        Self {
            name: name.to_string(),
            public_point,
            source,
            session,
        }
    }
}

impl Signer for SealedSigner {
    fn sign_digest(&self, digest: &[u8; 32]) -> Result<[u8; 64]> {
        let key = self
            .session
            .key(&self.name, &self.public_point, &self.source)?;
        signer::sign_with(&key, digest)
    }
}

/// The PIN of a software store (the token's [`PinGuard`]).
pub struct SoftwarePin {
    dir: Arc<KeyDir>,
    vault: PinVault,
    session: Arc<PinSession>,
}

impl SoftwarePin {
    /// The PIN of the store in `dir`.
    pub fn new(dir: Arc<KeyDir>, max_tries: u32) -> Self {
        Self {
            vault: PinVault::new(dir.clone(), max_tries),
            dir,
            session: Arc::new(PinSession::default()),
        }
    }

    /// The login state its signers share.
    pub fn session(&self) -> &Arc<PinSession> {
        &self.session
    }

    /// Seals the keys left in the clear when the PIN file says there may be some, then records
    /// that there are none.
    fn seal_if_needed(&self, data_key: &[u8; 32]) -> Result<()> {
        if self.vault.clear_keys_left()? {
            self.seal_clear_keys(data_key)?;
            self.vault.all_sealed()?;
        }
        Ok(())
    }

    /// Seals every key file still holding its scalar in the clear, each atomically. Returns how
    /// many it sealed.
    fn seal_clear_keys(&self, data_key: &[u8; 32]) -> Result<usize> {
        let lock = self.dir.lock()?;
        let mut sealed = 0;
        let files = self.dir.list()?;
        let names = files
            .iter()
            .filter_map(|f| file_store::stem(f, super::KEY_EXT));
        for name in names {
            let file_name = file_store::file_name(name, super::KEY_EXT);
            let Some(bytes) = self.dir.read_limited(&file_name, super::MAX_KEY_FILE)? else {
                continue;
            };
            let Ok(mut file) = KeyFile::parse(&bytes) else {
                continue;
            };
            let Some(scalar) = file.private_scalar.take() else {
                continue;
            };
            file.sealed_scalar = Some(seal(data_key, name.as_bytes(), &scalar.0[..])?);
            file.version = SEALED_VERSION;
            let out = file
                .to_bytes()
                .map_err(|e| BackendError::Io(format!("cannot encode a key file: {e}")))?;
            self.dir.write_atomic(&file_name, &out)?;
            sealed += 1;
        }
        if sealed > 0 {
            lock.bump();
            log::info!(
                "sealed {sealed} key(s) of {} under the PIN",
                self.dir.path().display()
            );
        }
        Ok(sealed)
    }
}

impl PinGuard for SoftwarePin {
    fn status(&self) -> Result<PinStatus> {
        self.vault.status()
    }

    fn login(&self, pin: &[u8]) -> Result<()> {
        let data_key = self.vault.unlock(pin)?;
        // Only when a first PIN's sealing was cut short: otherwise no key file is read here.
        if let Err(e) = self.seal_if_needed(&data_key) {
            log::warn!("keys left in the clear after login (sealed at the next one): {e}");
        }
        self.session.set(data_key)
    }

    fn logout(&self) {
        self.session.clear();
    }

    fn set_pin(&self, old: Option<&[u8]>, new: &[u8]) -> Result<()> {
        let data_key = match old {
            None => self.vault.set_first(new)?,
            Some(old) => self.vault.change(old, new)?,
        };
        self.seal_if_needed(&data_key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vault(max_tries: u32) -> (tempfile::TempDir, PinVault) {
        std::env::set_var(CHEAP_KDF_ENV, "1");
        let tmp = tempfile::tempdir().unwrap();
        let dir = Arc::new(KeyDir::open(&tmp.path().join("keys")).unwrap());
        (tmp, PinVault::new(dir, max_tries))
    }

    #[test]
    fn sealed_bytes_open_only_with_their_key_and_associated_data() {
        let key = [7u8; 32];
        let sealed = seal(&key, b"name-a", b"secret scalar").unwrap();
        assert_eq!(sealed.nonce.0.len(), 12);
        assert_eq!(
            open(&key, b"name-a", &sealed).as_deref().map(|v| &v[..]),
            Some(&b"secret scalar"[..])
        );
        assert!(
            open(&key, b"name-b", &sealed).is_none(),
            "moved to another file"
        );
        assert!(
            open(&[8u8; 32], b"name-a", &sealed).is_none(),
            "another key"
        );
        let mut bad = sealed.clone();
        bad.ciphertext.0[0] ^= 1;
        assert!(open(&key, b"name-a", &bad).is_none(), "tampered");
    }

    #[test]
    fn the_vault_counts_resets_and_locks() {
        let (_tmp, v) = vault(3);
        assert!(!v.status().unwrap().initialized);
        assert!(matches!(v.unlock(b"1234"), Err(BackendError::Refused(_))));
        let dk = v.set_first(b"1234").unwrap();
        assert!(matches!(
            v.set_first(b"5678"),
            Err(BackendError::Refused(_))
        ));
        assert!(matches!(
            v.unlock(b"0000"),
            Err(BackendError::PinIncorrect(_))
        ));
        assert_eq!(v.status().unwrap().tries_left, Some(2));
        assert_eq!(**v.unlock(b"1234").unwrap(), **dk);
        assert_eq!(
            v.status().unwrap().tries_left,
            Some(3),
            "reset by a right PIN"
        );
        assert_eq!(**v.change(b"1234", b"5678").unwrap(), **dk, "same data key");
        assert!(matches!(
            v.unlock(b"1234"),
            Err(BackendError::PinIncorrect(_))
        ));
        assert!(matches!(
            v.unlock(b"1234"),
            Err(BackendError::PinIncorrect(_))
        ));
        assert!(matches!(
            v.unlock(b"1234"),
            Err(BackendError::PinIncorrect(_))
        ));
        let s = v.status().unwrap();
        assert!(s.locked && s.tries_left == Some(0), "{s:?}");
        assert!(matches!(v.unlock(b"5678"), Err(BackendError::PinLocked(_))));
    }

    #[test]
    fn hostile_kdf_parameters_are_refused() {
        let kdf = |memory_kib, passes, lanes, salt: usize| Kdf {
            algorithm: "argon2id".into(),
            memory_kib,
            passes,
            lanes,
            salt: Hex(vec![1; salt]),
        };
        assert!(params_of(&kdf(256, 1, 1, 16)).is_ok());
        for bad in [
            kdf(u32::MAX, 1, 1, 16),
            kdf(256, 0, 1, 16),
            kdf(256, 1000, 1, 16),
            kdf(256, 1, 100, 16),
            kdf(256, 1, 1, 4),
        ] {
            assert!(params_of(&bad).is_err(), "{bad:?}");
        }
        assert_eq!(KdfCost::STRONG.memory_kib, 65536);
    }
}
