//! Secrets the command line reads: from a file that must be the user's alone, or typed on the
//! terminal without echo. Never from an argument (other users see `ps`), never printed.

use std::path::Path;

use zeroize::Zeroizing;

use super::{Result, ToolError};

/// The contents of `path`, without a trailing newline; refused when the file is open to group or
/// others. `what` names the secret in messages ("the PIN file").
pub fn from_file(what: &str, path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    use std::os::unix::fs::PermissionsExt;
    let mut text = std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|source| ToolError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    let mode = std::fs::metadata(path).map_or(0, |m| m.permissions().mode());
    if mode & 0o077 != 0 {
        return Err(ToolError::Usage(format!(
            "{what} {} is open to others; chmod 600 it",
            path.display()
        )));
    }
    while matches!(text.last(), Some(b'\n' | b'\r')) {
        text.pop();
    }
    Ok(text)
}

/// Asks for a secret on the terminal without echo; with `confirm`, asks twice and refuses a
/// mismatch. Refused when there is no terminal (a script must give a file instead).
pub fn prompt(question: &str, confirm: bool, file_option: &str) -> Result<Zeroizing<Vec<u8>>> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        return Err(ToolError::Usage(format!(
            "no terminal to ask on; give {file_option} FILE (mode 0600)"
        )));
    }
    let read = |q: &str| {
        rpassword::prompt_password(q)
            .map(|s| Zeroizing::new(s.into_bytes()))
            .map_err(|e| ToolError::Usage(format!("cannot read from the terminal: {e}")))
    };
    let first = read(&format!("{question}: "))?;
    if confirm && *read(&format!("{question} again: "))? != *first {
        return Err(ToolError::Usage("the two entries differ".into()));
    }
    Ok(first)
}
