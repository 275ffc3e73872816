//! `devicekey uri`: the RFC 7512 `pkcs11:` URIs of keys and their certificates.
//!
//! A key is found by its private key object; its public key and certificate are the objects with
//! the same CKA_ID on the same token. URIs name the token by label and the object by CKA_ID,
//! CKA_LABEL and type (`pkcs11:token=devicekey;id=%01;object=k1;type=private`), which is what
//! OpenSSL's pkcs11 engine, GnuTLS, p11-kit and OpenSSH understand.

use std::path::PathBuf;

use cryptoki::object::ObjectClass;

use super::{hex, objects_with_id, parse_hex, KeySelector, Module, Result, TokenRef, ToolError};

/// Percent-encodes an attribute value for a `pkcs11:` URI path: everything but RFC 3986
/// unreserved characters becomes `%XX`.
pub fn encode_component(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 3);
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-encodes every byte (the usual form of `id=`).
pub fn encode_all(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("%{b:02X}")).collect()
}

/// The kind of object a URI names (`type=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ObjectKind {
    /// The private key.
    Private,
    /// The public key.
    Public,
    /// The certificate.
    Cert,
}

impl ObjectKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Private => "private",
            Self::Public => "public",
            Self::Cert => "cert",
        }
    }
}

/// The URI of one object. `full` adds the token's manufacturer, model and serial number.
pub fn object_uri(
    token: &TokenRef,
    id: &[u8],
    label: Option<&str>,
    kind: ObjectKind,
    full: bool,
) -> String {
    let identity = [
        ("model", &token.model),
        ("manufacturer", &token.manufacturer),
        ("serial", &token.serial),
    ];
    let mut parts: Vec<String> = identity
        .iter()
        .filter(|_| full)
        .chain([("token", &token.label)].iter())
        .map(|(name, value)| format!("{name}={}", encode_component(value.as_bytes())))
        .collect();
    if !id.is_empty() {
        parts.push(format!("id={}", encode_all(id)));
    }
    if let Some(label) = label.filter(|l| !l.is_empty()) {
        parts.push(format!("object={}", encode_component(label.as_bytes())));
    }
    parts.push(format!("type={}", kind.as_str()));
    format!("pkcs11:{}", parts.join(";"))
}

/// The URIs of one key pair.
#[derive(Clone, Debug)]
pub struct KeyUris {
    /// The token label.
    pub token: String,
    /// CKA_ID.
    pub id: Vec<u8>,
    /// CKA_LABEL of the private key.
    pub label: Option<String>,
    /// The private key.
    pub private_key: String,
    /// The public key, when the token has a public key object with the same CKA_ID.
    pub public_key: Option<String>,
    /// The certificate, when the token has one with the same CKA_ID.
    pub certificate: Option<String>,
}

/// The URIs of every key that matches `sel`.
pub fn key_uris(
    module: &Module,
    sel: &KeySelector,
    pin: Option<&str>,
    full: bool,
) -> Result<Vec<KeyUris>> {
    let mut out = Vec::new();
    for (key, session) in module.find_keys(sel, pin)? {
        let label = key.label.as_deref();
        let has = |class: ObjectClass| -> Result<bool> {
            if key.id.is_empty() {
                return Ok(false);
            }
            Ok(!objects_with_id(&session, class, &key.id)?.is_empty())
        };
        let public_key = has(ObjectClass::PUBLIC_KEY)?
            .then(|| object_uri(&key.token, &key.id, label, ObjectKind::Public, full));
        let certificate = has(ObjectClass::CERTIFICATE)?
            .then(|| object_uri(&key.token, &key.id, label, ObjectKind::Cert, full));
        out.push(KeyUris {
            token: key.token.label.clone(),
            id: key.id.clone(),
            label: key.label.clone(),
            private_key: object_uri(&key.token, &key.id, label, ObjectKind::Private, full),
            public_key,
            certificate,
        });
    }
    Ok(out)
}

/// How `devicekey uri` and `devicekey cert` pick the module, the keys and the PIN.
#[derive(clap::Args, Debug)]
pub struct KeyArgs {
    /// The PKCS#11 module (default: ours, next to this binary or installed).
    #[arg(long)]
    pub module: Option<PathBuf>,
    /// The token label.
    #[arg(long)]
    pub token: Option<String>,
    /// The key's CKA_ID (hex).
    #[arg(long)]
    pub id: Option<String>,
    /// The key's CKA_LABEL.
    #[arg(long)]
    pub label: Option<String>,
    /// The environment variable holding the token's PIN (only for tokens that need a login).
    #[arg(long)]
    pub pin_env: Option<String>,
}

impl KeyArgs {
    /// The keys the options select.
    pub fn selector(&self) -> Result<KeySelector> {
        Ok(KeySelector {
            token: self.token.clone(),
            id: self.id.as_deref().map(parse_hex).transpose()?,
            label: self.label.clone(),
        })
    }

    /// The PIN, from the variable `--pin-env` names.
    pub fn pin(&self) -> Result<Option<String>> {
        pin_from_env(self.pin_env.as_deref())
    }

    /// The module's path (the default one unless `--module` names one).
    pub fn module_path(&self) -> PathBuf {
        self.module.clone().unwrap_or_else(super::default_module)
    }
}

/// `devicekey uri`: print the `pkcs11:` URIs of keys and their certificates.
#[derive(clap::Args, Debug)]
pub struct UriArgs {
    /// The module, the keys (every key when none is named) and the PIN.
    #[command(flatten)]
    pub key: KeyArgs,
    /// Print only this URI of each key, one per line (for scripts).
    #[arg(long = "type", value_enum)]
    pub kind: Option<ObjectKind>,
    /// Also name the token's manufacturer, model and serial number.
    #[arg(long)]
    pub full: bool,
}

/// Reads a PIN from the environment variable `name`.
fn pin_from_env(name: Option<&str>) -> Result<Option<String>> {
    match name {
        None => Ok(None),
        Some(var) => std::env::var(var)
            .map(Some)
            .map_err(|_| ToolError::Usage(format!("the PIN variable {var} is not set"))),
    }
}

impl UriArgs {
    /// Runs the command; returns the text to print.
    pub fn run(self) -> Result<String> {
        let sel = self.key.selector()?;
        let pin = self.key.pin()?;
        let path = self.key.module_path();
        let module = Module::open(&path)?;
        let keys = key_uris(&module, &sel, pin.as_deref(), self.full)?;
        if keys.is_empty() {
            return Err(ToolError::KeyNotFound(format!(
                "{} in {}",
                sel.describe(),
                path.display()
            )));
        }
        let mut lines = Vec::new();
        for k in &keys {
            match self.kind {
                Some(ObjectKind::Private) => lines.push(k.private_key.clone()),
                Some(ObjectKind::Public) => lines.extend(k.public_key.clone()),
                Some(ObjectKind::Cert) => lines.extend(k.certificate.clone()),
                None => {
                    lines.push(format!(
                        "key {} on token {:?} (label {:?})",
                        hex(&k.id),
                        k.token,
                        k.label.as_deref().unwrap_or("")
                    ));
                    lines.push(format!("  private key: {}", k.private_key));
                    if let Some(u) = &k.public_key {
                        lines.push(format!("  public key:  {u}"));
                    }
                    match &k.certificate {
                        Some(u) => lines.push(format!("  certificate: {u}")),
                        None => lines.push(
                            "  certificate: none (make one with `devicekey cert`)".to_string(),
                        ),
                    }
                }
            }
        }
        if lines.is_empty() {
            return Err(ToolError::KeyNotFound(format!(
                "a {} object for {}",
                self.kind.map_or("", ObjectKind::as_str),
                sel.describe()
            )));
        }
        Ok(lines.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cryptoki::slot::Slot;

    fn token() -> TokenRef {
        TokenRef {
            slot: Slot::try_from(0u64).unwrap(),
            label: "my token".into(),
            manufacturer: "devicekey".into(),
            model: "os_protected".into(),
            serial: "0001".into(),
        }
    }

    #[test]
    fn encodes_rfc7512() {
        assert_eq!(encode_component(b"a b;c/d"), "a%20b%3Bc%2Fd");
        assert_eq!(encode_all(&[1, 0xab]), "%01%AB");
        assert_eq!(
            object_uri(&token(), &[1], Some("k1"), ObjectKind::Private, false),
            "pkcs11:token=my%20token;id=%01;object=k1;type=private"
        );
        assert_eq!(
            object_uri(&token(), &[], None, ObjectKind::Cert, true),
            "pkcs11:model=os_protected;manufacturer=devicekey;serial=0001;token=my%20token;type=cert"
        );
    }
}
