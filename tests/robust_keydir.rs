//! Hardening of the key directory, through the built module: a key directory under a parent
//! others can write to is refused; a key file others can read and a symlink to a key file,
//! dropped into the store, are not loaded (the good key next to them is); a key directory
//! replaced under a running process (a symlink to another directory, or a plain new directory)
//! is refused at the next C_FindObjectsInit and the key planted in it never appears. As root, a
//! throwaway second user does the swap and plants a key of theirs.

use testkit as common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{gen_p256, Token, TOKEN_LABEL};
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::Session;

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// Rewrites the test's config: one software slot with its keys in `keys`.
fn config_with_dir(token: &Token, keys: &Path) {
    std::fs::write(
        &token.config,
        format!(
            "[[slot]]\nlabel = \"{TOKEN_LABEL}\"\nbackend = \"software\"\ndir = \"{}\"\n",
            keys.display()
        ),
    )
    .expect("write config");
}

/// Labels of the private keys the module shows; `Err` when C_FindObjectsInit fails.
fn private_labels(s: &Session) -> cryptoki::error::Result<Vec<String>> {
    let found = s.find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])?;
    Ok(found.into_iter().map(|h| common::label_of(s, h)).collect())
}

/// The `<name>.key` files of a software key directory.
fn key_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read key dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "key"))
        .collect();
    v.sort();
    v
}

/// A valid key file name that is not taken.
fn fresh_name(tag: u8) -> String {
    format!("{}.key", format!("{tag:02x}").repeat(16))
}

/// Makes a key file labelled `label` (a real key of a scratch store) and returns its bytes.
/// Call with the module not initialized; leaves it so, configured for `<root>/keys`.
fn planted_key_bytes(token: &mut Token, label: &str) -> Vec<u8> {
    let scratch = token.root().join("scratch-keys");
    let keys = token.root().join("keys");
    config_with_dir(token, &scratch);
    token.initialize();
    gen_p256(&token.session(), label, true);
    token.finalize();
    config_with_dir(token, &keys);
    let files = key_files(&scratch);
    assert_eq!(files.len(), 1);
    std::fs::read(&files[0]).expect("read the scratch key")
}

#[test]
fn a_key_dir_under_a_parent_others_can_write_is_refused() {
    let mut token = Token::uninitialized();
    let open = token.root().join("open");
    std::fs::create_dir(&open).unwrap();
    chmod(&open, 0o777);
    config_with_dir(&token, &open.join("keys"));
    token.initialize();
    let slots = token.ctx.get_slots_with_token().expect("C_GetSlotList");
    assert!(
        slots.is_empty(),
        "a key directory whose parent is 0777 without the sticky bit must be refused"
    );
    // The sticky bit (as on /tmp) makes the parent safe.
    token.finalize();
    chmod(&open, 0o1777);
    token.initialize();
    assert_eq!(token.ctx.get_slots_with_token().unwrap().len(), 1);
}

#[test]
fn loose_and_symlinked_key_files_are_not_loaded() {
    let mut token = Token::uninitialized();
    let planted = planted_key_bytes(&mut token, "planted");
    token.initialize();
    gen_p256(&token.session(), "good", true);
    token.finalize();
    let keys = token.root().join("keys");
    // A key file others can read, dropped into the store.
    let loose = keys.join(fresh_name(0x11));
    std::fs::write(&loose, &planted).unwrap();
    chmod(&loose, 0o644);
    // A symlink to a key file elsewhere (owner-only).
    let elsewhere = token.root().join("elsewhere.key");
    std::fs::write(&elsewhere, &planted).unwrap();
    chmod(&elsewhere, 0o600);
    std::os::unix::fs::symlink(&elsewhere, keys.join(fresh_name(0x22))).unwrap();
    token.initialize();
    let labels = private_labels(&token.session()).expect("C_FindObjects");
    assert_eq!(labels, vec!["good".to_string()], "only the good key loads");
    // Owner-only, the same file is loaded (so it was refused for its mode, not its contents).
    token.finalize();
    chmod(&loose, 0o600);
    token.initialize();
    let mut labels = private_labels(&token.session()).expect("C_FindObjects");
    labels.sort();
    assert_eq!(labels, vec!["good".to_string(), "planted".to_string()]);
}

/// How the key directory is replaced under the running module.
#[derive(Clone, Copy, Debug)]
enum Swap {
    /// `mv keys keys.old; ln -s evil keys`.
    Symlink,
    /// `mv keys keys.old; mkdir keys` with the planted key in it.
    NewDirectory,
}

fn swap_is_refused(how: Swap) {
    let mut token = Token::uninitialized();
    let planted = planted_key_bytes(&mut token, "planted");
    token.initialize();
    let s = token.session();
    gen_p256(&s, "good", true);
    assert_eq!(private_labels(&s).unwrap(), vec!["good".to_string()]);

    let keys = token.root().join("keys");
    let evil = token.root().join("evil");
    std::fs::create_dir(&evil).unwrap();
    chmod(&evil, 0o700);
    let file = evil.join(fresh_name(0x33));
    std::fs::write(&file, &planted).unwrap();
    chmod(&file, 0o600);
    std::fs::rename(&keys, token.root().join("keys.old")).unwrap();
    match how {
        Swap::Symlink => std::os::unix::fs::symlink(&evil, &keys).unwrap(),
        Swap::NewDirectory => std::fs::rename(&evil, &keys).unwrap(),
    }

    let after = private_labels(&s);
    assert!(
        after.is_err(),
        "{how:?}: C_FindObjectsInit after the swap must fail, got {after:?}"
    );
    // Still refused on later calls: the planted key never appears.
    let again = private_labels(&s);
    assert!(
        !again
            .as_ref()
            .is_ok_and(|l| l.iter().any(|l| l == "planted")),
        "{how:?}: the planted key appeared: {again:?}"
    );
}

#[test]
fn a_key_dir_swapped_for_a_symlink_is_refused() {
    swap_is_refused(Swap::Symlink);
}

#[test]
fn a_key_dir_swapped_for_another_directory_is_refused() {
    swap_is_refused(Swap::NewDirectory);
}

/// A throwaway local user, deleted on drop (also when the test fails).
struct ThrowawayUser {
    name: String,
}

impl ThrowawayUser {
    fn create() -> Self {
        let name = format!("dkt{}", std::process::id() % 100_000);
        let _ = Command::new("userdel").arg(&name).output();
        let out = Command::new("useradd")
            .args(["-M", "-N", "-s", "/bin/sh", &name])
            .output()
            .expect("run useradd");
        assert!(
            out.status.success(),
            "useradd {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { name }
    }

    /// Runs a shell command as this user; panics when it fails.
    fn sh(&self, script: &str) {
        let out = Command::new("runuser")
            .args(["-u", &self.name, "--", "sh", "-c", script])
            .output()
            .expect("run runuser");
        assert!(
            out.status.success(),
            "as {}: {script}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for ThrowawayUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).output();
    }
}

#[test]
fn a_second_user_cannot_swap_the_key_dir_or_plant_a_key() {
    if !rustix::process::geteuid().is_root() {
        println!(
            "SKIPPED a_second_user_cannot_swap_the_key_dir_or_plant_a_key: needs root (to make a \
             throwaway user with useradd)"
        );
        return;
    }
    let mut token = Token::uninitialized();
    let arena = token.root().join("arena");
    let keys = arena.join("keys");
    std::fs::create_dir(&arena).unwrap();
    chmod(token.root(), 0o755);
    chmod(&arena, 0o755);
    let planted = planted_key_bytes(&mut token, "planted");
    // The scratch key, readable by the other user (they know its scalar anyway: it is theirs).
    let theirs = token.root().join("theirs.key");
    std::fs::write(&theirs, &planted).unwrap();
    chmod(&theirs, 0o644);
    config_with_dir(&token, &keys);
    token.initialize();
    let s = token.session();
    gen_p256(&s, "good", true);
    assert_eq!(private_labels(&s).unwrap(), vec!["good".to_string()]);

    // The parent becomes writable by everyone while the module runs; the other user moves the
    // key directory away and puts a symlink to a directory of theirs, holding their key, in its
    // place (and makes that key look owner-only).
    let user = ThrowawayUser::create();
    chmod(&arena, 0o777);
    user.sh(&format!(
        "set -e; cd '{arena}'; mkdir -m 700 evil; cp '{theirs}' evil/{name}; chmod 600 evil/{name}; \
         chmod 755 evil; mv keys keys.old; ln -s evil keys",
        arena = arena.display(),
        theirs = theirs.display(),
        name = fresh_name(0x44)
    ));
    let after = private_labels(&s);
    assert!(
        after.is_err(),
        "C_FindObjectsInit after another user's swap must fail, got {after:?}"
    );
    drop(s);

    // A fresh start on the swapped path is refused too (the parent is 0777, the directory
    // belongs to the other user), and so is the other user's key even with a safe parent.
    token.finalize();
    token.initialize();
    assert!(token.ctx.get_slots_with_token().unwrap().is_empty());
    token.finalize();
    chmod(&arena, 0o755);
    token.initialize();
    assert!(
        token.ctx.get_slots_with_token().unwrap().is_empty(),
        "a key directory owned by another user must be refused"
    );
}
