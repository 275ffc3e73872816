//! Secrets the command line reads: from a file that must be the user's alone, or typed on the
//! terminal without echo. Never from an argument (other users see `ps`), never printed.

use std::path::Path;

use zeroize::Zeroizing;

use super::{Result, ToolError};

/// The longest secret file read, in bytes (a PIN has at most 256; an owner authorization less).
const MAX_SECRET_FILE: u64 = 4096;

/// The contents of `path`, without a trailing newline; refused when it is not a regular file,
/// when it is open to group or others, or when it is longer than a secret can be. `what` names the
/// secret in messages ("the PIN file"). The checks are made on the opened file, so what is read
/// is what was checked.
pub fn from_file(what: &str, path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let io = |source| ToolError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(ToolError::Usage(format!(
            "{what} {} is not a regular file",
            path.display()
        )));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(ToolError::Usage(format!(
            "{what} {} is open to others; chmod 600 it",
            path.display()
        )));
    }
    let mut text = Zeroizing::new(Vec::new());
    file.take(MAX_SECRET_FILE + 1)
        .read_to_end(&mut text)
        .map_err(io)?;
    if text.len() as u64 > MAX_SECRET_FILE {
        return Err(ToolError::Usage(format!(
            "{what} {} is longer than {MAX_SECRET_FILE} bytes",
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
