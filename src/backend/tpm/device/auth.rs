//! Keys with an authorization value (the PIN slot's keys) on the TPM connection.
//!
//! Every command that proves or sets an authValue goes through one **salted HMAC session** per
//! connection: its salt is encrypted to the SRK, so the session key (and with it the HMAC that
//! proves the authValue) is unknown to anyone watching the bus, who therefore cannot test PIN
//! guesses offline either. The authValue itself is never sent: TPM2_Sign and TPM2_Unseal carry
//! only an HMAC keyed with it. Where a new authValue must travel (TPM2_Create's sensitive area,
//! TPM2_ObjectChangeAuth's `newAuth`), the session's `decrypt` attribute has the command's first
//! parameter AES-128-CFB encrypted under the session key.
//!
//! A refused authorization is never retried (a retry would cost the user a second try against
//! the TPM's dictionary-attack counter): TPM_RC_AUTH_FAIL and TPM_RC_BAD_AUTH become
//! `BackendError::PinIncorrect`, TPM_RC_LOCKOUT becomes `BackendError::PinLocked`.
//!
//! The PIN check object is a sealed data object (keyed hash, no scheme, 32 random bytes) under
//! the SRK with the PIN's authValue and, like the keys, without `noDA`: unsealing it with a
//! wrong authValue counts against the dictionary-attack counter, and nothing else can tell a
//! right PIN from a wrong one.

use tss_esapi::attributes::SessionAttributesBuilder;
use tss_esapi::constants::tss::TPM2_PT_PERMANENT;
use tss_esapi::constants::{CapabilityType, PropertyTag, SessionType};
use tss_esapi::handles::ObjectHandle;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Auth, CapabilityData, Digest, KeyedHashScheme, Private, Public, PublicKeyedHashParameters,
    SensitiveData, SymmetricDefinition,
};
use tss_esapi::Context;

use super::{raw_rc, tpm_code, tss, Conn, Fail, Op, TpmKey, RC_LOCKOUT};
use crate::backend::BackendError;

/// TPM_RC_AUTH_FAIL (format one, without the session bits) and TPM_RC_BAD_AUTH.
const RC_AUTH_FAIL: u32 = 0x8e;
const RC_BAD_AUTH: u32 = 0xa2;

/// The inLockout bit of TPM_PT_PERMANENT.
const IN_LOCKOUT: u32 = 1 << 2;

/// The TPM's dictionary-attack state (TPM2_GetCapability, TPM_PT_PERMANENT and
/// TPM_PT_LOCKOUT_COUNTER through TPM_PT_LOCKOUT_RECOVERY). It is the whole TPM's: wrong
/// authorizations of any DA-protected object count, not only ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lockout {
    /// TPM_PT_LOCKOUT_COUNTER: authorization failures not yet forgiven.
    pub counter: u32,
    /// TPM_PT_MAX_AUTH_FAIL: failures before lockout.
    pub max_tries: u32,
    /// TPM_PT_LOCKOUT_INTERVAL: seconds after which one failure is forgiven.
    pub interval: u32,
    /// TPM_PT_LOCKOUT_RECOVERY: seconds before the lockout hierarchy may try again after a
    /// failed lockout authorization.
    pub recovery: u32,
    /// TPM_PT_PERMANENT's inLockout.
    pub in_lockout: bool,
}

impl Lockout {
    /// Tries left before lockout.
    pub fn tries_left(&self) -> u32 {
        self.max_tries.saturating_sub(self.counter)
    }

    /// No authorization of a DA-protected object is accepted now.
    pub fn locked(&self) -> bool {
        self.in_lockout || self.tries_left() == 0
    }

    /// What the log says about the lockout: the counter, and when the next try is possible.
    pub fn describe(&self) -> String {
        format!(
            "the TPM's dictionary-attack counter is {}/{}; it forgives one failure every {} s \
             (lockout recovery {} s){}",
            self.counter,
            self.max_tries,
            self.interval,
            self.recovery,
            if self.locked() {
                format!("; the next try is possible in at most {} s", self.interval)
            } else {
                String::new()
            }
        )
    }
}

/// A refused authorization as the PIN errors; anything else as a TPM error.
fn auth_failure(what: &'static str, e: tss_esapi::Error) -> Fail {
    let rc = raw_rc(&e);
    match tpm_code(rc) {
        RC_AUTH_FAIL | RC_BAD_AUTH => Fail::Other(BackendError::PinIncorrect(format!(
            "{what}: the TPM refused the authorization value ({rc:#x})"
        ))),
        RC_LOCKOUT => Fail::Other(BackendError::PinLocked(format!(
            "{what}: the TPM is in dictionary-attack lockout ({rc:#x})"
        ))),
        _ => Fail::Tss(what, e),
    }
}

fn to_auth(bytes: &[u8]) -> Op<Auth> {
    tss("preparing an authorization value", Auth::try_from(bytes))
}

/// The public template of the PIN check object: sealed data, used with its authValue only,
/// dictionary-attack protected (no `noDA`).
fn check_template() -> tss_esapi::Result<Public> {
    // The sealed data comes from us, not from the TPM.
    let attributes = super::bound_attributes().with_sensitive_data_origin(false);
    super::public_builder(PublicAlgorithm::KeyedHash, attributes)?
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
        .with_keyed_hash_unique_identifier(Digest::default())
        .build()
}

impl Conn {
    /// The connection's salted HMAC session, started on first use (salt encrypted to the SRK,
    /// AES-128-CFB parameter encryption, SHA-256). It lives as long as the connection.
    ///
    /// When the TSS library cannot make the salt in this process (its OpenSSL EC methods were
    /// replaced: `openssl -engine pkcs11` makes an engine the default for everything, and that
    /// engine cannot make the ephemeral key), the session is an unsalted HMAC session, with a
    /// warning: the authValue still never crosses the bus (only HMACs keyed with it do), but a
    /// recording of the bus could be used to test PIN guesses offline, and no command that
    /// carries a new authValue runs through it (see [`Conn::with_auth_and`]).
    fn pin_session(&mut self) -> Op<AuthSession> {
        if let Some(session) = self.pin_session {
            return Ok(session);
        }
        let srk = self.srk()?;
        let ctx = self.ctx()?;
        let start = |ctx: &mut Context, salt_key| {
            ctx.start_auth_session(
                salt_key,
                None,
                None,
                SessionType::Hmac,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
        };
        let (started, salted) = match start(ctx, Some(srk)) {
            // An error of the TSS library itself (layer 7), not the TPM's answer.
            Err(e) if raw_rc(&e) >> 16 == 7 => {
                log::warn!(
                    "tpm: cannot salt the PIN session in this process ({e}; an OpenSSL engine \
                     may have replaced the EC methods); using an unsalted HMAC session: the PIN \
                     still never crosses the bus, but a recording of it could be used to test \
                     guesses offline"
                );
                (start(ctx, None), false)
            }
            other => (other, true),
        };
        let session = tss("starting an HMAC session (TPM2_StartAuthSession)", started)?
            .ok_or_else(|| {
                Fail::Other(BackendError::Refused(
                    "the TPM started no HMAC session".into(),
                ))
            })?;
        self.pin_session = Some(session);
        self.pin_session_salted = salted;
        Ok(session)
    }

    /// Runs `op`, whose one authorized handle is `object` with authValue `auth`, through the
    /// salted session; `decrypt` has the command's first parameter encrypted.
    pub(super) fn with_auth<T>(
        &mut self,
        object: ObjectHandle,
        auth: &[u8],
        decrypt: bool,
        what: &'static str,
        op: impl FnOnce(&mut Context) -> tss_esapi::Result<T>,
    ) -> Op<T> {
        self.with_auth_and(object, auth, decrypt, None, what, op)
    }

    /// [`Conn::with_auth`] for a command whose second authorized handle takes `second`.
    pub(super) fn with_auth_and<T>(
        &mut self,
        object: ObjectHandle,
        auth: &[u8],
        decrypt: bool,
        second: Option<AuthSession>,
        what: &'static str,
        op: impl FnOnce(&mut Context) -> tss_esapi::Result<T>,
    ) -> Op<T> {
        let session = self.pin_session()?;
        if decrypt && !self.pin_session_salted {
            return Err(Fail::Other(BackendError::Refused(format!(
                "{what}: a new authorization value would cross the bus under an unsalted \
                 session; this process cannot salt one (an OpenSSL engine replaced its EC \
                 methods). Fix: make keys and change the PIN from another program, e.g. \
                 pkcs11-tool or `devicekey pin change`"
            ))));
        }
        let auth = to_auth(auth)?;
        let ctx = self.ctx()?;
        let (attributes, mask) = SessionAttributesBuilder::new()
            .with_continue_session(true)
            .with_decrypt(decrypt)
            .with_encrypt(false)
            .build();
        tss(
            "setting the session's attributes",
            ctx.tr_sess_set_attributes(session, attributes, mask),
        )?;
        tss(
            "setting an authorization value",
            ctx.tr_set_auth(object, auth),
        )?;
        let result = ctx.execute_with_sessions((Some(session), second, None), op);
        let _ = ctx.tr_set_auth(object, Auth::default());
        result.map_err(|e| auth_failure(what, e))
    }

    /// TPM2_ObjectChangeAuth: the key's private area under `new` (authorized with `old`).
    pub(super) fn change_auth(&mut self, key: &TpmKey, old: &[u8], new: &[u8]) -> Op<Private> {
        let handle = self.ensure_loaded(key)?;
        let srk = self.srk()?;
        let new = to_auth(new)?;
        log::debug!("tpm: TPM2_ObjectChangeAuth of {}", key.name);
        let private = self.with_auth(
            handle.into(),
            old,
            true,
            "changing a key's authorization (TPM2_ObjectChangeAuth)",
            |c| c.object_change_auth(handle.into(), srk.into(), new),
        );
        // The loaded object keeps its old authValue: load the new blob when it is used.
        self.forget(&key.name);
        private
    }

    /// TPM2_Create of a PIN check object with authValue `auth`.
    pub(super) fn create_check(&mut self, auth: &[u8]) -> Op<(Public, Private)> {
        let template = tss("building the PIN check template", check_template())?;
        let mut secret = zeroize::Zeroizing::new([0u8; 32]);
        getrandom::getrandom(secret.as_mut()).map_err(|e| {
            Fail::Other(BackendError::Crypto(format!(
                "no randomness for the PIN check object: {e}"
            )))
        })?;
        let data = tss(
            "preparing the sealed data",
            SensitiveData::try_from(secret.to_vec()),
        )?;
        let auth = to_auth(auth)?;
        let srk = self.srk()?;
        log::debug!("tpm: TPM2_Create of the PIN check object");
        let created = self.with_auth(
            srk.into(),
            &[],
            true,
            "creating the PIN check object (TPM2_Create)",
            |c| c.create(srk, template, Some(auth), Some(data), None, None),
        )?;
        Ok((created.out_public, created.out_private))
    }

    /// TPM2_Unseal of the PIN check object with `auth`: succeeds only with its authValue; a
    /// wrong one costs a try against the dictionary-attack counter.
    pub(super) fn verify_check(&mut self, check: &TpmKey, auth: &[u8]) -> Op<()> {
        let handle = self.ensure_loaded(check)?;
        log::debug!("tpm: TPM2_Unseal of the PIN check object");
        let result = self.with_auth(
            handle.into(),
            auth,
            false,
            "checking the PIN (TPM2_Unseal)",
            |c| c.unseal(handle.into()).map(drop),
        );
        self.forget(&check.name);
        result
    }

    /// The TPM's dictionary-attack state.
    pub(super) fn lockout(&mut self) -> Op<Lockout> {
        let ctx = self.ctx()?;
        let (data, _) = tss(
            "reading the dictionary-attack state (TPM2_GetCapability)",
            ctx.execute_without_session(|c| {
                c.get_capability(CapabilityType::TpmProperties, TPM2_PT_PERMANENT, 0x20)
            }),
        )?;
        let CapabilityData::TpmProperties(props) = data else {
            return Err(Fail::Other(BackendError::Refused(
                "the TPM answered GetCapability with the wrong kind of data".into(),
            )));
        };
        let get = |tag| props.find(tag).map(|p| p.value()).unwrap_or(0);
        Ok(Lockout {
            counter: get(PropertyTag::LockoutCounter),
            max_tries: get(PropertyTag::MaxAuthFail),
            interval: get(PropertyTag::LockoutInterval),
            recovery: get(PropertyTag::LockoutRecovery),
            in_lockout: get(PropertyTag::Permanent) & IN_LOCKOUT != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_template_is_da_protected_sealed_data() {
        let t = check_template().unwrap();
        let a = t.object_attributes();
        assert!(!a.no_da() && a.user_with_auth() && a.fixed_tpm());
        assert!(!a.sign_encrypt() && !a.decrypt());
    }

    #[test]
    fn lockout_arithmetic() {
        let mut l = Lockout {
            counter: 1,
            max_tries: 3,
            interval: 10,
            recovery: 20,
            in_lockout: false,
        };
        assert_eq!(l.tries_left(), 2);
        assert!(!l.locked());
        l.counter = 3;
        assert!(l.locked());
        assert!(l.describe().contains("3/3"));
        l.counter = 0;
        l.in_lockout = true;
        assert!(l.locked());
    }
}
