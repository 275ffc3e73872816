//! Command-line tools that act on keys through a PKCS#11 module: `devicekey uri` ([`uri`]) and
//! `devicekey cert` ([`cert`]).
//!
//! Both are PKCS#11 *clients* (through `cryptoki`) of a module given by path: our own by default,
//! or any other (SoftHSM, a smart card). They never touch key material: certificates and requests
//! are signed by the token with `C_Sign`. Nothing here writes to stdout; the binary prints what
//! the functions return.
//!
//! `devicekey attest verify` ([`attest_verify`], Linux with the `tpm` feature) is the relying
//! party's reference verifier of TPM key attestation; it needs no module and no TPM.

pub mod attest_device;
#[cfg(all(target_os = "linux", feature = "tpm"))]
pub mod attest_verify;
pub mod cert;
pub mod doctor;
pub mod pin;
mod secret;
#[cfg(all(target_os = "linux", feature = "tpm"))]
pub mod tpm;
pub mod uri;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

pub use cert::CertArgs;
pub use uri::UriArgs;

use crate::p11::{self, ModuleClient};
use crate::rpc::DeviceKeyError;

/// Errors of the key tools.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The module cannot be loaded or initialized.
    #[error("cannot use the PKCS#11 module {path}: {message}")]
    Module {
        /// The module's path.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A PKCS#11 call failed.
    #[error("{0}")]
    Token(String),
    /// No key matches the selection.
    #[error("no key matches {0}")]
    KeyNotFound(String),
    /// More than one key matches where one is needed.
    #[error("{0}")]
    Ambiguous(String),
    /// The arguments do not make sense.
    #[error("{0}")]
    Usage(String),
    /// Building or parsing a certificate failed.
    #[error("{0}")]
    Certificate(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl From<ToolError> for DeviceKeyError {
    fn from(e: ToolError) -> Self {
        match e {
            ToolError::KeyNotFound(_) => Self::KeyNotFound,
            ToolError::Usage(m) | ToolError::Ambiguous(m) => Self::InvalidRequest(m),
            ToolError::Certificate(m) => Self::Crypto(m),
            other => Self::Platform(other.to_string()),
        }
    }
}

type Result<T> = std::result::Result<T, ToolError>;

/// `C_Function: CKR_...` for a failed call, with what we were doing.
pub(crate) fn token_error(what: &str, e: CkError) -> ToolError {
    ToolError::Token(format!("{what}: {}", p11::describe(&e)))
}

/// Which keys a command acts on. Empty fields match everything.
#[derive(Clone, Debug, Default)]
pub struct KeySelector {
    /// The token label.
    pub token: Option<String>,
    /// CKA_ID.
    pub id: Option<Vec<u8>>,
    /// CKA_LABEL of the private key.
    pub label: Option<String>,
}

impl KeySelector {
    /// What the selector asks for, in words (for error messages).
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(t) = &self.token {
            parts.push(format!("token {t:?}"));
        }
        if let Some(id) = &self.id {
            parts.push(format!("id {}", hex(id)));
        }
        if let Some(l) = &self.label {
            parts.push(format!("label {l:?}"));
        }
        if parts.is_empty() {
            "any key".to_string()
        } else {
            parts.join(", ")
        }
    }
}

pub use crate::encoding::hex;

/// Bytes from hex (`0a1b`, `0A:1B` and `0x0a1b` are accepted).
pub fn parse_hex(text: &str) -> Result<Vec<u8>> {
    let clean: String = text
        .trim()
        .trim_start_matches("0x")
        .chars()
        .filter(|c| *c != ':')
        .collect();
    if clean.is_empty() || clean.len() % 2 != 0 {
        return Err(ToolError::Usage(format!(
            "{text:?} is not an even number of hex digits"
        )));
    }
    crate::encoding::hex_decode(&clean)
        .ok_or_else(|| ToolError::Usage(format!("{text:?} is not hex")))
}

/// The `[[slot]]` labelled `label`, or a usage error listing the labels there are.
pub fn slot_by_label<'a>(
    config: &'a crate::config::Config,
    label: &str,
) -> Result<&'a crate::config::SlotConfig> {
    config
        .slots
        .iter()
        .find(|s| s.label() == label)
        .ok_or_else(|| {
            let labels: Vec<&str> = config.slots.iter().map(|s| s.label()).collect();
            ToolError::Usage(format!(
                "no slot labelled {label:?}; the config has {labels:?}"
            ))
        })
}

/// Our module: next to the running binary (a build tree), else the installed path.
pub fn default_module() -> PathBuf {
    p11::our_module_path()
}

/// A loaded, initialized module (the process-wide client of [`crate::p11`]).
pub struct Module {
    path: PathBuf,
    client: Arc<ModuleClient>,
}

crate::redact::debug_shows!(Module: path);

/// One token found in a module.
#[derive(Clone, Debug)]
pub struct TokenRef {
    /// The slot.
    pub slot: Slot,
    /// CK_TOKEN_INFO.label, trimmed.
    pub label: String,
    /// CK_TOKEN_INFO.manufacturerID, trimmed.
    pub manufacturer: String,
    /// CK_TOKEN_INFO.model, trimmed.
    pub model: String,
    /// CK_TOKEN_INFO.serialNumber, trimmed.
    pub serial: String,
}

/// One key pair (found by its private key).
#[derive(Clone, Debug)]
pub struct KeyRef {
    /// Its token.
    pub token: TokenRef,
    /// The private key object.
    pub private: ObjectHandle,
    /// CKA_ID (may be empty on foreign tokens).
    pub id: Vec<u8>,
    /// CKA_LABEL, when it has one.
    pub label: Option<String>,
}

impl Module {
    /// Loads and initializes the module at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let module_err = |message: String| ToolError::Module {
            path: path.to_owned(),
            message,
        };
        if !path.exists() {
            return Err(module_err(
                "no such file (build it with `cargo build --release`, or install it with scripts/install.sh)"
                    .into(),
            ));
        }
        let client = p11::registry::open(path).map_err(|e| module_err(e.problem))?;
        Ok(Self {
            path: path.to_owned(),
            client,
        })
    }

    /// The module's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tokens present, optionally only the one labelled `label`.
    pub fn tokens(&self, label: Option<&str>) -> Result<Vec<TokenRef>> {
        let slots = self
            .client
            .context()
            .get_slots_with_initialized_token()
            .map_err(|e| token_error("listing slots", e))?;
        let mut out = Vec::new();
        for slot in slots {
            let info = self
                .client
                .context()
                .get_token_info(slot)
                .map_err(|e| token_error("reading token info", e))?;
            let token = TokenRef {
                slot,
                label: info.label().trim_end().to_string(),
                manufacturer: info.manufacturer_id().trim_end().to_string(),
                model: info.model().trim_end().to_string(),
                serial: info.serial_number().trim_end().to_string(),
            };
            if label.map_or(true, |l| l == token.label) {
                out.push(token);
            }
        }
        Ok(out)
    }

    /// A read-write session on `token`, logged in when `pin` is given.
    pub fn session(&self, token: &TokenRef, pin: Option<&str>) -> Result<Session> {
        let session = self
            .client
            .context()
            .open_rw_session(token.slot)
            .map_err(|e| token_error(&format!("opening a session on {:?}", token.label), e))?;
        if let Some(pin) = pin {
            match session.login(UserType::User, Some(&AuthPin::from(pin.to_string()))) {
                Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
                Err(e) => return Err(token_error(&format!("logging in to {:?}", token.label), e)),
            }
        }
        Ok(session)
    }

    /// Every private key that matches `sel`, with a session on its token (one per token).
    pub fn find_keys(
        &self,
        sel: &KeySelector,
        pin: Option<&str>,
    ) -> Result<Vec<(KeyRef, std::rc::Rc<Session>)>> {
        let mut out = Vec::new();
        for token in self.tokens(sel.token.as_deref())? {
            let session = std::rc::Rc::new(self.session(&token, pin)?);
            let mut template = vec![Attribute::Class(ObjectClass::PRIVATE_KEY)];
            if let Some(id) = &sel.id {
                template.push(Attribute::Id(id.clone()));
            }
            if let Some(label) = &sel.label {
                template.push(Attribute::Label(label.as_bytes().to_vec()));
            }
            let handles = session
                .find_objects(&template)
                .map_err(|e| token_error("finding private keys", e))?;
            for handle in handles {
                let id = read_bytes(&session, handle, AttributeType::Id)?.unwrap_or_default();
                let label = read_bytes(&session, handle, AttributeType::Label)?
                    .map(|l| String::from_utf8_lossy(&l).into_owned());
                out.push((
                    KeyRef {
                        token: token.clone(),
                        private: handle,
                        id,
                        label,
                    },
                    session.clone(),
                ));
            }
        }
        Ok(out)
    }

    /// Exactly one key matching `sel`, or a readable error.
    pub fn find_one_key(
        &self,
        sel: &KeySelector,
        pin: Option<&str>,
    ) -> Result<(KeyRef, std::rc::Rc<Session>)> {
        let mut keys = self.find_keys(sel, pin)?;
        match keys.len() {
            0 => Err(ToolError::KeyNotFound(format!(
                "{} in {}",
                sel.describe(),
                self.path.display()
            ))),
            1 => Ok(keys.remove(0)),
            n => {
                let names: Vec<String> = keys
                    .iter()
                    .map(|(k, _)| {
                        format!(
                            "token {:?} id {} label {:?}",
                            k.token.label,
                            hex(&k.id),
                            k.label.as_deref().unwrap_or("")
                        )
                    })
                    .collect();
                Err(ToolError::Ambiguous(format!(
                    "{n} keys match {}; choose one with --id or --label: {}",
                    sel.describe(),
                    names.join("; ")
                )))
            }
        }
    }
}

/// One byte-string attribute of an object, `None` when the token has none.
pub(crate) fn read_bytes(
    session: &Session,
    object: ObjectHandle,
    kind: AttributeType,
) -> Result<Option<Vec<u8>>> {
    let attrs = match session.get_attributes(object, &[kind]) {
        Ok(a) => a,
        Err(CkError::Pkcs11(RvError::AttributeTypeInvalid | RvError::AttributeSensitive, _)) => {
            return Ok(None)
        }
        Err(e) => return Err(token_error("C_GetAttributeValue", e)),
    };
    Ok(attrs.into_iter().find_map(|a| match a {
        Attribute::Label(v)
        | Attribute::Value(v)
        | Attribute::EcPoint(v)
        | Attribute::EcParams(v)
        | Attribute::Id(v)
        | Attribute::Subject(v) => Some(v),
        _ => None,
    }))
}

/// Objects of `class` with CKA_ID `id` on the session's token.
pub(crate) fn objects_with_id(
    session: &Session,
    class: ObjectClass,
    id: &[u8],
) -> Result<Vec<ObjectHandle>> {
    session
        .find_objects(&[Attribute::Class(class), Attribute::Id(id.to_vec())])
        .map_err(|e| token_error("C_FindObjects", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        assert_eq!(parse_hex("0a:1B").unwrap(), vec![0x0a, 0x1b]);
        assert_eq!(parse_hex("0x01").unwrap(), vec![1]);
        assert!(parse_hex("abc").is_err());
        assert!(parse_hex("zz").is_err());
        assert_eq!(hex(&[0, 255]), "00ff");
    }
}
