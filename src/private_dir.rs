//! A directory of this user's own that nobody else can reach: where `devicekey serve` puts its
//! socket, and where the pkcs11 store keeps its cross-process lock files. (Key directories have
//! a stricter policy of their own, in `backend::keydir`.)

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;

/// Creates `dir` (0700, with its missing parents) when it does not exist, and refuses it when it
/// is not a directory (a symlink included), is not owned by this user, or has a group or other
/// bit. `what` names the directory in the message (`"socket directory"`), which says the fix.
pub fn ensure(what: &str, dir: &Path) -> Result<(), String> {
    let shown = dir.display();
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create {what} {shown}: {e}"))?;
    }
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| format!("cannot inspect {what} {shown}: {e}"))?;
    if !meta.is_dir() {
        return Err(format!(
            "{what} {shown} is not a directory (symlinks are refused)"
        ));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(format!(
            "{what} {shown} is owned by uid {}, not by this user (uid {me}); use a directory of your own",
            meta.uid()
        ));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{what} {shown} has mode {mode:o}; others may reach it. Fix: chmod 700 {shown}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::ensure;

    #[test]
    fn made_0700_and_refused_when_open_to_others_or_a_symlink() {
        let (tmp, dir) = crate::test_support::scratch("run/devicekey");
        ensure("test directory", &dir).unwrap();
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = ensure("test directory", &dir).unwrap_err();
        assert!(
            e.contains("test directory") && e.contains("chmod 700"),
            "{e}"
        );
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(ensure("test directory", &link)
            .unwrap_err()
            .contains("not a directory"));
        let file = tmp.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(ensure("test directory", &file).is_err());
    }
}
