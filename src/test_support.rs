//! Setup shared by the unit tests: a scratch path inside a fresh temporary directory.

use std::path::PathBuf;

/// A fresh temporary directory and the path `relative` inside it (not created). The directory
/// is removed when the returned [`tempfile::TempDir`] drops, so keep it alive for the test.
pub fn scratch(relative: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join(relative);
    (tmp, path)
}
