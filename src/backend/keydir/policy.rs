//! The key-directory policy, as plain checks on `stat` results (each problem comes with its
//! fix), and [`diagnose`], which applies them to a path without opening or creating anything.

use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Stat, CWD};

use super::{absolute, errno_io, LOCK_FILE};
use crate::backend::keydir::valid_name;

fn me() -> u32 {
    rustix::process::geteuid().as_raw()
}

fn my_group() -> u32 {
    rustix::process::getegid().as_raw()
}

// `st_mode` is a u32 on Linux and a u16 on macOS.
#[allow(clippy::unnecessary_cast)]
fn mode_of(st: &Stat) -> u32 {
    st.st_mode as u32 & 0o7777
}

fn is_dir(st: &Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::Directory
}

fn is_regular(st: &Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::RegularFile
}

/// What is wrong with an ancestor of a key directory, with the fix; `None` when it is safe.
pub(super) fn ancestor_problem(dir: &Path, ancestor: &Path, st: &Stat) -> Option<String> {
    let uid = st.st_uid;
    let mode = mode_of(st);
    if uid != me() && uid != 0 {
        return Some(format!(
            "the key directory {} is unsafe: its ancestor {} is owned by uid {uid}, neither this \
             user (uid {}) nor root, who could replace the key directory. Fix: set the slot's \
             `dir` to a directory under your home",
            dir.display(),
            ancestor.display(),
            me()
        ));
    }
    let sticky = mode & 0o1000 != 0;
    let other_write = mode & 0o002 != 0;
    let group_write = mode & 0o020 != 0 && st.st_gid != my_group();
    if (other_write || group_write) && !sticky {
        return Some(format!(
            "the key directory {} is unsafe: its ancestor {} (mode {mode:04o}) is writable by \
             other users and has no sticky bit, so they could replace the key directory. Fix: \
             `chmod go-w {}` (or `chmod +t` it), or set the slot's `dir` elsewhere",
            dir.display(),
            ancestor.display(),
            ancestor.display()
        ));
    }
    None
}

/// The first owner-only rule a directory or a file breaks.
enum Breach {
    /// Not a directory (or not a regular file).
    Kind,
    /// Owned by this other uid.
    Owner(u32),
    /// Group or other bits set: this mode.
    Mode(u32),
}

/// The first rule `st` breaks, in order: the right kind (`kind_ok`), owned by this user, no
/// group or other bits. The key directory and its files obey the same rules.
fn breach(st: &Stat, kind_ok: bool) -> Option<Breach> {
    if !kind_ok {
        return Some(Breach::Kind);
    }
    if st.st_uid != me() {
        return Some(Breach::Owner(st.st_uid));
    }
    let mode = mode_of(st);
    (mode & 0o077 != 0).then_some(Breach::Mode(mode))
}

/// What is wrong with the key directory itself, with the fix; `None` when it is safe.
pub(super) fn dir_problem(dir: &Path, st: &Stat) -> Option<String> {
    let dir = dir.display();
    let me = me();
    Some(match breach(st, is_dir(st))? {
        Breach::Kind => format!(
            "the key directory {dir} is not a directory; remove it or set the slot's `dir` elsewhere"
        ),
        Breach::Owner(uid) => format!(
            "the key directory {dir} is owned by uid {uid}, not by this user (uid {me}); refusing \
             it. Fix: `chown {me} {dir}` if it is yours, or set the slot's `dir` to a directory \
             you own"
        ),
        Breach::Mode(mode) => {
            let how = if mode & 0o022 != 0 {
                "writable"
            } else {
                "readable"
            };
            format!(
                "the key directory {dir} is {how} by group or others (mode {mode:04o}); refusing \
                 it. Fix: `chmod 700 {dir}`"
            )
        }
    })
}

/// What is wrong with a file of the key directory, with the fix; `None` when it may be loaded.
pub(super) fn file_problem(path: &Path, st: &Stat) -> Option<String> {
    let path = path.display();
    let me = me();
    Some(match breach(st, is_regular(st))? {
        Breach::Kind => format!("refusing {path}: not a regular file. Fix: remove it"),
        Breach::Owner(uid) => format!(
            "refusing {path}: owned by uid {uid}, not by this user (uid {me}). Fix: remove it, \
             or `chown {me}` it if you put it there"
        ),
        Breach::Mode(mode) => format!(
            "refusing {path}: accessible to group or others (mode {mode:04o}). Fix: `chmod 600 \
             {path}` if you put it there, else remove it"
        ),
    })
}

/// The problems of the key directory at `path`, each with its fix; empty when it is fine (or
/// does not exist yet, when its nearest existing ancestors are fine). Opens nothing, creates
/// nothing: `devicekey doctor` prints these.
pub fn diagnose(path: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let Ok(wanted) = absolute(path) else {
        return vec![format!(
            "cannot resolve the key directory {}",
            path.display()
        )];
    };
    // The part that exists, with symlinks the user set up resolved.
    let mut existing = wanted.as_path();
    while std::fs::symlink_metadata(existing).is_err() {
        match existing.parent() {
            Some(p) => existing = p,
            None => break,
        }
    }
    let Ok(canonical) = std::fs::canonicalize(existing) else {
        return vec![format!(
            "cannot resolve the key directory {}",
            path.display()
        )];
    };
    let exists = existing == wanted.as_path();
    let ancestors_of = if exists {
        canonical.parent().map(Path::to_path_buf)
    } else {
        Some(canonical.clone())
    };
    let mut here = PathBuf::from("/");
    let mut check = |p: &Path| {
        if let Ok(st) = rustix::fs::statat(CWD, p, AtFlags::SYMLINK_NOFOLLOW) {
            if let Some(problem) = ancestor_problem(&wanted, p, &st) {
                problems.push(problem);
            }
        }
    };
    check(&here);
    if let Some(anc) = ancestors_of {
        for comp in anc.components() {
            if let Component::Normal(name) = comp {
                here.push(name);
                check(&here);
            }
        }
    }
    if !exists {
        return problems;
    }
    match rustix::fs::statat(CWD, &canonical, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => {
            if let Some(p) = dir_problem(&canonical, &st) {
                problems.push(p);
                return problems;
            }
        }
        Err(e) => {
            problems.push(format!(
                "cannot stat {}: {}",
                canonical.display(),
                errno_io(e)
            ));
            return problems;
        }
    }
    if let Ok(entries) = std::fs::read_dir(&canonical) {
        let mut names: Vec<_> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| valid_name(n) || n == LOCK_FILE)
            .collect();
        names.sort();
        for name in names {
            let p = canonical.join(&name);
            match rustix::fs::statat(CWD, &p, AtFlags::SYMLINK_NOFOLLOW) {
                // A directory inside is another store's (the TPM store's `tpm` under the
                // default software store), never loaded from here.
                Ok(st) if is_dir(&st) => {}
                Ok(st) => {
                    if let Some(problem) = file_problem(&p, &st) {
                        problems.push(problem);
                    }
                }
                Err(e) => problems.push(format!("cannot stat {}: {}", p.display(), errno_io(e))),
            }
        }
    }
    problems
}
