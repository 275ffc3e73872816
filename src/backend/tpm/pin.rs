//! The user PIN of a TPM slot with `login = "pin"`, enforced by the TPM.
//!
//! **The PIN is each key's authValue.** The authValue is `HMAC-SHA256(salt, PIN)` (32 bytes, the
//! size of the keys' SHA-256 name algorithm), with a random 32-byte salt per PIN generation,
//! kept in the store's `pin.json`. The TPM signs only when the command proves that authValue
//! (through a salted HMAC session: see the device's `auth` module), and counts every wrong one
//! against its dictionary-attack (DA) counter, because the keys do not set `noDA`. A blob
//! loaded with tpm2-tools signs nothing without it.
//!
//! **Login** unseals the generation's PIN check object (a sealed data object under the SRK,
//! with the same authValue and also DA-protected, kept in `pin.json`): the TPM decides whether
//! the PIN is right and counts the wrong ones; nothing on disk can tell a right PIN from a
//! wrong one. The derived authValue is then kept (zeroized on logout) and signs.
//!
//! **Generations.** Each PIN set or change is a new generation `n` (a new salt and check
//! object). A key's metadata names the generation its blob is under (`pin_generation`, 0: an
//! empty authValue). A change from generation `g` to `n = g + 1`, under the directory's lock:
//! 1. prove the old PIN (or that none is set), finish a committed change another process left
//!    half-done, remove every leftover re-protected blob;
//! 2. create the new check object; for each key under `g`, TPM2_ObjectChangeAuth and write the
//!    new blob beside the old one as `<name>.pin<n>.pem`;
//! 3. **commit**: write `pin.json` for generation `n` (one atomic rename);
//! 4. finish: each `<name>.pin<n>.pem` replaces `<name>.pem`, the metadata says `n`, the side
//!    file goes.
//!
//! Before the commit only the old PIN logs in and every key's own blob is under it; after it
//! only the new PIN logs in, and each key's blob under `n` is the side file while it exists, its
//! own blob once finished. So a kill anywhere leaves every key usable with exactly one PIN, and
//! running the change again finishes (or redoes) it.
//!
//! The debug-build hook `DEVICEKEY_TEST_ABORT_PIN_CHANGE_AFTER=N` aborts the process after N
//! keys were re-protected (`=commit`: right after the commit), so that tests can kill a change
//! half-way; release builds do not have it.

use std::sync::{Arc, Mutex};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::device::{Device, TpmKey};
use super::keyfile::KeyBlob;
use super::store::{name_of, KeyFiles, KeyMeta};
use crate::backend::pin::{PinGuard, PinStatus, MAX_PIN_LEN, MIN_PIN_LEN};
use crate::backend::{BackendError, Result};
use crate::encoding::{hex, hex_decode};

/// The file that holds the PIN's generation, salt and check object.
pub const PIN_FILE: &str = "pin.json";

/// The store's name of the PIN check object (in logs and the connection's cache).
const CHECK_NAME: &str = "pin-check";

/// The environment variable of the debug-build hook that aborts a PIN change half-way.
pub const ABORT_AFTER_ENV: &str = "DEVICEKEY_TEST_ABORT_PIN_CHANGE_AFTER";

/// A key's authValue derived from a PIN.
pub type AuthValue = Zeroizing<[u8; 32]>;

/// The authValue of `pin` under `salt`: HMAC-SHA256 keyed with the salt.
pub fn derive_auth(salt: &[u8], pin: &[u8]) -> AuthValue {
    // HMAC takes a key of any length.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(salt).unwrap_or_else(|_| unreachable!());
    mac.update(pin);
    Zeroizing::new(mac.finalize().into_bytes().into())
}

/// `pin.json`: the current PIN generation.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct PinFile {
    /// Always `devicekey-tpm-pin`.
    format: String,
    /// Format version, 1.
    version: u32,
    /// The generation (1 for the first PIN set).
    generation: u32,
    /// The salt of the authValue derivation, hex.
    salt: String,
    /// The check object's TPM2B_PUBLIC, hex.
    check_public: String,
    /// The check object's TPM2B_PRIVATE, hex.
    check_private: String,
}

impl PinFile {
    const FORMAT: &'static str = "devicekey-tpm-pin";

    fn salt(&self) -> Result<Vec<u8>> {
        hex_decode(&self.salt).ok_or_else(|| BackendError::Io(format!("bad salt in {PIN_FILE}")))
    }

    fn check(&self) -> Result<TpmKey> {
        let bad = |what: &str| BackendError::Io(format!("bad {what} in {PIN_FILE}"));
        let blob = KeyBlob {
            public: hex_decode(&self.check_public).ok_or_else(|| bad("check_public"))?,
            private: hex_decode(&self.check_private).ok_or_else(|| bad("check_private"))?,
            empty_auth: false,
        };
        TpmKey::from_blob(CHECK_NAME, &blob).map_err(|e| bad(&e))
    }
}

/// The side file of a key's blob re-protected under generation `generation`.
fn side_name(key: &str, generation: u32) -> String {
    format!("{key}.pin{generation}.pem")
}

/// The key and generation of a side file name.
fn parse_side(file: &str) -> Option<(&str, u32)> {
    let (key, generation) = file.strip_suffix(".pem")?.split_once(".pin")?;
    Some((key, generation.parse().ok()?))
}

/// What a login unlocked: the generation and its authValue.
struct LoggedIn {
    generation: u32,
    auth: AuthValue,
}

/// The PIN of one TPM store (see the module documentation).
pub struct TpmPin {
    dir: Arc<KeyFiles>,
    device: Arc<Device>,
    logged_in: Mutex<Option<LoggedIn>>,
}

impl std::fmt::Debug for TpmPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmPin")
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

fn poisoned() -> BackendError {
    BackendError::Unusable("the PIN state lock is poisoned".into())
}

fn check_length(pin: &[u8]) -> Result<()> {
    if (MIN_PIN_LEN..=MAX_PIN_LEN).contains(&pin.len()) {
        Ok(())
    } else {
        Err(BackendError::Refused(format!(
            "a PIN has {MIN_PIN_LEN} to {MAX_PIN_LEN} bytes, not {}",
            pin.len()
        )))
    }
}

/// Reads the PIN generation of a store directory (0: no PIN set).
pub(super) fn current_generation(dir: &KeyFiles) -> Result<u32> {
    Ok(read_file(dir)?.map_or(0, |f| f.generation))
}

fn read_file(dir: &KeyFiles) -> Result<Option<PinFile>> {
    let Some(bytes) = dir.key_dir().read(PIN_FILE)? else {
        return Ok(None);
    };
    let file: PinFile = serde_json::from_slice(&bytes)
        .map_err(|e| BackendError::Io(format!("bad {PIN_FILE}: {e}")))?;
    if file.format != PinFile::FORMAT || file.version != 1 || file.generation == 0 {
        return Err(BackendError::Io(format!(
            "{PIN_FILE} is not a devicekey TPM PIN file"
        )));
    }
    Ok(Some(file))
}

/// The blob of key `name` that is under generation `current` when there is one (the side file
/// of an unfinished change, else its own), with the generation it is under.
pub(super) fn resolve_blob(dir: &KeyFiles, name: &str, current: u32) -> Result<(KeyMeta, KeyBlob)> {
    let (mut meta, pem) = dir.read_key(name)?;
    let text = if meta.pin_generation == current {
        Zeroizing::new(pem.into_bytes())
    } else {
        match dir.key_dir().read(&side_name(name, current))? {
            Some(side) if current != 0 => {
                meta.pin_generation = current;
                side
            }
            _ => Zeroizing::new(pem.into_bytes()),
        }
    };
    let text = std::str::from_utf8(&text)
        .map_err(|_| BackendError::Io(format!("{name}: the key file is not text")))?;
    let blob = KeyBlob::from_pem(text).map_err(|e| BackendError::Io(format!("{name}: {e}")))?;
    if blob.empty_auth != (meta.pin_generation == 0) {
        let problem =
            format!(
            "refusing the TPM key {name}: its blob says {} authValue but its metadata says PIN \
             generation {}",
            if blob.empty_auth { "an empty" } else { "a non-empty" },
            meta.pin_generation
        );
        crate::backend::keydir::log_once(&problem);
        return Err(BackendError::Refused(problem));
    }
    Ok((meta, blob))
}

/// The key `name` as its blob under `generation`; `NotLoggedIn` when the key is under another
/// PIN generation (its blob would not sign with this one's authValue).
pub(super) fn key_under(dir: &KeyFiles, name: &str, generation: u32) -> Result<TpmKey> {
    let (meta, blob) = resolve_blob(dir, name, generation)?;
    if meta.pin_generation != generation {
        return Err(BackendError::NotLoggedIn(format!(
            "the TPM key {name} is under PIN generation {}, not {generation}",
            meta.pin_generation
        )));
    }
    TpmKey::from_blob(name, &blob).map_err(|e| BackendError::Io(format!("{name}: {e}")))
}

/// Signs `digest` as the slot's PIN allows, with the key's blob under a PIN generation that
/// `key_under` finds. Without a PIN (`pin` is `None`) only a key with an empty authValue
/// (generation 0) signs; with one, only after login, with the logged-in authValue, and the TPM
/// is never asked with an authValue that cannot be the key's.
pub(super) fn sign(
    device: &Device,
    pin: Option<&TpmPin>,
    digest: &[u8; 32],
    key_under: impl FnOnce(u32) -> Result<Arc<TpmKey>>,
) -> Result<[u8; 64]> {
    let Some(pin) = pin else {
        let key = key_under(0).map_err(|e| match e {
            BackendError::NotLoggedIn(why) => BackendError::Refused(format!(
                "{why}: the key is protected by a PIN; set login = \"pin\" on its slot"
            )),
            e => e,
        })?;
        return device.sign(&key, digest);
    };
    let (generation, auth) = pin.logged_in()?;
    let key = key_under(generation)?;
    device
        .sign_with_auth(&key, digest, Some(&auth[..]))
        .map_err(|e| match e {
            BackendError::PinIncorrect(why) => BackendError::NotLoggedIn(format!(
                "{why}; the PIN was changed elsewhere, log in again"
            )),
            e => e,
        })
}

/// Aborts the process at `stage` (a count of keys done, or `commit`) when the debug-build test
/// hook asks for it.
fn test_abort_hook(stage: &str) {
    #[cfg(debug_assertions)]
    if std::env::var(ABORT_AFTER_ENV).is_ok_and(|v| v == stage) {
        log::warn!("tpm: {ABORT_AFTER_ENV}={stage}: aborting the PIN change half-way");
        std::process::abort();
    }
    #[cfg(not(debug_assertions))]
    let _ = stage;
}

impl TpmPin {
    /// The PIN of the store in `dir`, on `device`.
    pub fn new(dir: Arc<KeyFiles>, device: Arc<Device>) -> Self {
        Self {
            dir,
            device,
            logged_in: Mutex::new(None),
        }
    }

    /// The generation and authValue a login unlocked; `NotLoggedIn` before login.
    pub fn logged_in(&self) -> Result<(u32, AuthValue)> {
        let guard = self.logged_in.lock().map_err(|_| poisoned())?;
        guard
            .as_ref()
            .map(|l| (l.generation, l.auth.clone()))
            .ok_or_else(|| {
                BackendError::NotLoggedIn("the TPM slot's keys need the user PIN (C_Login)".into())
            })
    }

    /// The generation and authValue a new key gets: none before a PIN is set; the logged-in
    /// ones when they are the store's current generation. The caller holds the directory lock.
    pub fn for_new_key(&self) -> Result<(u32, Option<AuthValue>)> {
        let Some(file) = read_file(&self.dir)? else {
            return Ok((0, None));
        };
        let (generation, auth) = self.logged_in()?;
        if generation != file.generation {
            return Err(BackendError::NotLoggedIn(
                "the PIN was changed since this login; log in again".into(),
            ));
        }
        Ok((generation, Some(auth)))
    }

    /// Proves `pin` against the check object of `file`; its authValue when right.
    fn verify(&self, file: &PinFile, pin: &[u8]) -> Result<AuthValue> {
        let auth = derive_auth(&file.salt()?, pin);
        let check = file.check()?;
        match self.device.verify_check(&check, &auth[..]) {
            Ok(()) => Ok(auth),
            Err(BackendError::PinIncorrect(why)) => {
                let state = self.lockout_text();
                log::warn!(
                    "tpm: wrong PIN for {}: {why}; {state}",
                    self.dir.path().display()
                );
                Err(BackendError::PinIncorrect(format!("wrong PIN; {state}")))
            }
            Err(BackendError::PinLocked(why)) => {
                let state = self.lockout_text();
                log::error!(
                    "tpm: PIN of {} locked: {why}; {state}. Fix: wait, or reset the lockout with \
                     the lockout hierarchy's authorization (tpm2_dictionarylockout -c)",
                    self.dir.path().display()
                );
                Err(BackendError::PinLocked(format!(
                    "the TPM is in dictionary-attack lockout; {state}"
                )))
            }
            Err(e) => Err(e),
        }
    }

    fn lockout_text(&self) -> String {
        match self.device.lockout() {
            Ok(l) => l.describe(),
            Err(e) => format!("the dictionary-attack state is unknown ({e})"),
        }
    }

    /// The side files in the directory: (file, key, generation).
    fn side_files(&self) -> Result<Vec<(String, String, u32)>> {
        Ok(self
            .dir
            .key_dir()
            .list()?
            .into_iter()
            .filter_map(|f| {
                let (key, generation) = parse_side(&f)?;
                let key = key.to_string();
                Some((f, key, generation))
            })
            .collect())
    }

    /// Step 4 of a change to `generation`: each re-protected blob replaces the key's own one.
    /// The caller holds the directory lock.
    fn finish(&self, generation: u32) -> Result<()> {
        for (file, key, g) in self.side_files()? {
            if g != generation {
                continue;
            }
            match self.dir.read_key(&key) {
                Ok((mut meta, _)) => {
                    let Some(side) = self.dir.key_dir().read(&file)? else {
                        continue;
                    };
                    let pem = std::str::from_utf8(&side)
                        .map_err(|_| BackendError::Io(format!("{file} is not text")))?;
                    meta.pin_generation = generation;
                    self.dir.write_key(&key, pem, &meta)?;
                }
                // The key was deleted meanwhile: only the side file is left.
                Err(BackendError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
            self.dir.key_dir().remove(&file)?;
        }
        Ok(())
    }

    /// Steps 2 to 4: re-protects every key under `old` (authValue `old_auth`) under a new
    /// generation with the PIN `new`; returns the generation and its authValue.
    fn change(&self, old: u32, old_auth: &[u8], new: &[u8]) -> Result<(u32, AuthValue)> {
        let generation = old
            .checked_add(1)
            .ok_or_else(|| BackendError::Refused("too many PIN changes".into()))?;
        let mut salt = [0u8; 32];
        getrandom::getrandom(&mut salt)
            .map_err(|e| BackendError::Crypto(format!("no randomness for the PIN salt: {e}")))?;
        let auth = derive_auth(&salt, new);
        let check = self
            .device
            .create_check(CHECK_NAME, &auth[..])?
            .to_blob()
            .map_err(BackendError::Crypto)?;
        let mut done = 0;
        let names: Vec<String> = (self.dir.key_dir().list()?.iter())
            .filter_map(|f| name_of(f, "key"))
            .map(str::to_string)
            .collect();
        for name in names {
            let (meta, blob) = match resolve_blob(&self.dir, &name, old) {
                Ok(found) => found,
                Err(BackendError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            if meta.pin_generation != old {
                log::warn!(
                    "tpm: key {name} is under another PIN (generation {}, the store's is {old}); \
                     it cannot be re-protected and stays unusable",
                    meta.pin_generation
                );
                continue;
            }
            let key = TpmKey::from_blob(&name, &blob)
                .map_err(|e| BackendError::Io(format!("{name}: {e}")))?;
            let changed = self.device.change_auth(&key, old_auth, &auth[..])?;
            let mut blob = changed.to_blob().map_err(BackendError::Crypto)?;
            blob.empty_auth = false;
            self.dir
                .key_dir()
                .write_atomic(&side_name(&name, generation), blob.to_pem().as_bytes())?;
            done += 1;
            test_abort_hook(&done.to_string());
        }
        // The commit.
        let file = PinFile {
            format: PinFile::FORMAT.into(),
            version: 1,
            generation,
            salt: hex(&salt),
            check_public: hex(&check.public),
            check_private: hex(&check.private),
        };
        let json = serde_json::to_vec_pretty(&file)
            .map_err(|e| BackendError::Io(format!("cannot encode {PIN_FILE}: {e}")))?;
        self.dir.key_dir().write_atomic(PIN_FILE, &json)?;
        test_abort_hook("commit");
        log::info!(
            "tpm: PIN generation {generation} committed for {}; {done} keys re-protected",
            self.dir.path().display()
        );
        // Committed: the new PIN holds whatever happens now. A key whose own blob is not yet
        // replaced is used through its side file, and the next change finishes it.
        if let Err(e) = self.finish(generation) {
            log::warn!("tpm: the PIN change is committed but not tidied yet: {e}");
        }
        Ok((generation, auth))
    }
}

impl PinGuard for TpmPin {
    fn status(&self) -> Result<PinStatus> {
        let initialized = read_file(&self.dir)?.is_some();
        let lockout = self.device.lockout()?;
        Ok(PinStatus {
            initialized,
            tries_left: Some(lockout.tries_left()),
            max_tries: lockout.max_tries,
            locked: lockout.locked(),
        })
    }

    fn login(&self, pin: &[u8]) -> Result<()> {
        let Some(file) = read_file(&self.dir)? else {
            return Err(BackendError::Refused(
                "no PIN is set on this TPM slot yet; set one first (devicekey pin set)".into(),
            ));
        };
        if check_length(pin).is_err() {
            // Cannot be right; the TPM is not asked (it would count a try).
            return Err(BackendError::PinIncorrect(format!(
                "a PIN has {MIN_PIN_LEN} to {MAX_PIN_LEN} bytes"
            )));
        }
        let auth = self.verify(&file, pin)?;
        *self.logged_in.lock().map_err(|_| poisoned())? = Some(LoggedIn {
            generation: file.generation,
            auth,
        });
        Ok(())
    }

    fn logout(&self) {
        if let Ok(mut guard) = self.logged_in.lock() {
            *guard = None;
        }
    }

    fn set_pin(&self, old: Option<&[u8]>, new: &[u8]) -> Result<()> {
        check_length(new)?;
        let lock = self.dir.lock()?;
        let file = read_file(&self.dir)?;
        let (generation, old_auth) = match (&file, old) {
            (None, _) => (0, Zeroizing::new(Vec::new())),
            (Some(_), None) => {
                return Err(BackendError::PinIncorrect(
                    "a PIN is set; changing it needs the current one".into(),
                ))
            }
            (Some(f), Some(old)) => (f.generation, Zeroizing::new(self.verify(f, old)?.to_vec())),
        };
        // Finish a committed change left half-done, then drop what an uncommitted one left.
        if generation != 0 {
            self.finish(generation)?;
        }
        for (side, _, _) in self.side_files()? {
            self.dir.key_dir().remove(&side)?;
        }
        let (new_generation, auth) = self.change(generation, &old_auth, new)?;
        lock.bump();
        drop(lock);
        let mut guard = self.logged_in.lock().map_err(|_| poisoned())?;
        if guard.is_some() {
            *guard = Some(LoggedIn {
                generation: new_generation,
                auth,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivation_is_hmac_sha256_of_the_pin_keyed_by_the_salt() {
        let a = derive_auth(b"salt", b"1234");
        assert_eq!(a.len(), 32);
        assert_ne!(*a, *derive_auth(b"salt", b"1235"));
        assert_ne!(*a, *derive_auth(b"tlas", b"1234"));
        // RFC 4231 test case 2.
        assert_eq!(
            hex(&derive_auth(b"Jefe", b"what do ya want for nothing?")[..]),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn side_file_names_round_trip() {
        let name = "key-00112233445566778899aabbccddeeff";
        assert_eq!(parse_side(&side_name(name, 7)), Some((name, 7)));
        assert_eq!(parse_side(&format!("{name}.pem")), None);
        assert_eq!(parse_side(&format!("{name}.json")), None);
    }
}
