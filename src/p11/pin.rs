//! Reading a token's user PIN from where the config says it is: an environment variable or a
//! file. The PIN itself is never logged, never put into an error, and zeroized when dropped.

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::error::{Error, Kind};

/// A PIN read from its source, with the source's description for messages.
pub struct Pin {
    /// The PIN.
    pub secret: Zeroizing<String>,
    /// Where it came from: "environment variable X", "file F".
    pub source: String,
}

crate::redact::debug_shows!(Pin: source);

/// Where the config says a token's PIN is: an environment variable (`pin_env`) or a file
/// (`pin_file`); at most one may be set.
#[derive(Clone, Debug, Default)]
pub struct PinSource {
    /// `pin_env`.
    pub env: Option<String>,
    /// `pin_file`.
    pub file: Option<PathBuf>,
}

impl PinSource {
    /// Reads the PIN, as [`read`] does.
    pub fn read(&self, who: &str) -> Result<Option<Pin>, Error> {
        read(who, self.env.as_deref(), self.file.as_deref())
    }
}

/// Reads the PIN named by `pin_env` or `pin_file` (at most one may be set); `None` when neither
/// is. `who` starts every message (`slot 'x'`, `[server]`).
pub fn read(
    who: &str,
    pin_env: Option<&str>,
    pin_file: Option<&Path>,
) -> Result<Option<Pin>, Error> {
    match (pin_env, pin_file) {
        (Some(_), Some(_)) => Err(Error::new(
            Kind::Unusable,
            format!("{who}: both pin_env and pin_file are set"),
            "keep only one of pin_env and pin_file",
        )),
        (Some(var), None) => Ok(Some(Pin {
            secret: from_env(who, var)?,
            source: format!("environment variable {var}"),
        })),
        (None, Some(path)) => Ok(Some(Pin {
            secret: from_file(who, path)?,
            source: format!("file {}", path.display()),
        })),
        (None, None) => Ok(None),
    }
}

fn from_env(who: &str, var: &str) -> Result<Zeroizing<String>, Error> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Ok(Zeroizing::new(v)),
        Ok(_) | Err(std::env::VarError::NotPresent) => Err(Error::new(
            Kind::Auth,
            format!("{who}: the PIN variable {var} (pin_env) is not set"),
            format!(
                "export {var}=<PIN of the wrapped token> in the environment of the application"
            ),
        )),
        Err(std::env::VarError::NotUnicode(_)) => Err(Error::new(
            Kind::Auth,
            format!("{who}: the PIN variable {var} (pin_env) is not valid UTF-8"),
            format!("set {var} to the PIN as text"),
        )),
    }
}

fn from_file(who: &str, path: &Path) -> Result<Zeroizing<String>, Error> {
    let text = std::fs::read(path).map(Zeroizing::new).map_err(|e| {
        Error::new(
            Kind::Auth,
            format!(
                "{who}: cannot read the PIN file {} (pin_file): {e}",
                path.display()
            ),
            format!(
                "create {} (mode 0600) holding the wrapped token's PIN",
                path.display()
            ),
        )
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                log::warn!(
                    "{who}: the PIN file {} is readable by others; chmod 600 it",
                    path.display()
                );
            }
        }
    }
    let mut end = text.len();
    while end > 0 && matches!(text[end - 1], b'\n' | b'\r') {
        end -= 1;
    }
    let pin = std::str::from_utf8(&text[..end]).map_err(|_| {
        Error::new(
            Kind::Auth,
            format!("{who}: the PIN file {} is not UTF-8 text", path.display()),
            "write the PIN as text (one line)",
        )
    })?;
    if pin.is_empty() {
        return Err(Error::new(
            Kind::Auth,
            format!("{who}: the PIN file {} is empty", path.display()),
            "write the wrapped token's PIN into it",
        ));
    }
    Ok(Zeroizing::new(pin.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_file_is_read_without_its_newline_and_never_shown() {
        let (_tmp, path) = crate::test_support::scratch("pin");
        std::fs::write(&path, "12 34\r\n").unwrap();
        let pin = read("test", None, Some(&path)).unwrap().unwrap();
        assert_eq!(pin.secret.as_str(), "12 34");
        assert!(!format!("{pin:?}").contains("12 34"));
        std::fs::write(&path, "\n").unwrap();
        assert!(read("test", None, Some(&path)).is_err());
        assert!(read("test", Some("X"), Some(&path)).is_err());
        assert!(read("test", None, None).unwrap().is_none());
    }
}
