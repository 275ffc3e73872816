//! The key store on a full disk, then on a read-only one, through the built `.so`: key generation
//! fails with a clear error (CKR_DEVICE_MEMORY and a "no space" log line when full), existing keys
//! keep signing, open sessions survive, nothing already stored is damaged, and the store works
//! again once space is freed.
//!
//! Needs a small tmpfs: `mount -t tmpfs -o size=256k` (root). Without permission to mount, the
//! test says SKIPPED and passes.

use testkit as common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{gen_p256, public_point, sha256, verify_prehash, Token};
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

const MNT_ENV: &str = "DEVICEKEY_DISK_MNT";

fn mount_tmpfs(at: &Path) -> bool {
    std::fs::create_dir_all(at).unwrap();
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs"])
        .arg(at)
        .output();
    match out {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            eprintln!(
                "SKIPPED: cannot mount a tmpfs ({}); run as root",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            false
        }
        Err(e) => {
            eprintln!("SKIPPED: cannot run mount: {e}");
            false
        }
    }
}

struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn rv_of<T: std::fmt::Debug>(r: cryptoki::error::Result<T>) -> Option<RvError> {
    match r {
        Ok(_) => None,
        Err(Error::Pkcs11(e, _)) => Some(e),
        Err(other) => panic!("not a PKCS#11 error: {other}"),
    }
}

fn signs(s: &Session, private: ObjectHandle, point: &[u8], what: &str) {
    let d = sha256(what.as_bytes());
    let sig = s
        .sign(&Mechanism::Ecdsa, private, &d)
        .unwrap_or_else(|e| panic!("{what}: sign: {e}"));
    assert!(
        verify_prehash(point, &d, &sig),
        "{what}: signature verifies"
    );
}

/// Fills the file system at `mnt` until a write fails with ENOSPC.
fn fill(mnt: &Path) -> Vec<PathBuf> {
    use std::io::Write;
    let mut files = Vec::new();
    for i in 0.. {
        let path = mnt.join(format!("filler-{i}"));
        let Ok(mut f) = std::fs::File::create(&path) else {
            break;
        };
        files.push(path);
        let chunk = vec![0u8; if i == 0 { 4096 } else { 64 }];
        let mut wrote = false;
        while f.write_all(&chunk).and_then(|()| f.sync_all()).is_ok() {
            wrote = true;
        }
        if !wrote {
            break;
        }
    }
    files
}

/// Child side: runs the whole scenario against the store on the tmpfs named by `MNT_ENV`.
#[test]
#[ignore = "child process of full_then_read_only_disk"]
fn disk_child_scenario() {
    let Ok(mnt) = std::env::var(MNT_ENV) else {
        return;
    };
    let mnt = PathBuf::from(mnt);
    let mut t = Token::from_env_config();
    let s = t.session();
    let (pa, a) = gen_p256(&s, "before-a", true);
    let (pb, b) = gen_p256(&s, "before-b", true);
    let (point_a, point_b) = (public_point(&s, pa), public_point(&s, pb));

    // Full disk.
    let fillers = fill(&mnt);
    let full = rv_of(s.generate_key_pair(
        &Mechanism::EccKeyPairGen,
        &common::pub_template("when-full", true),
        &common::priv_template("when-full", true),
    ));
    println!("RESULT keygen-full {full:?}");
    assert_eq!(full, Some(RvError::DeviceMemory), "keygen on a full disk");
    let relabel = rv_of(s.update_attributes(a, &[Attribute::Label(b"renamed".to_vec())]));
    println!("RESULT relabel-full {relabel:?}");
    assert!(relabel.is_some(), "a relabel on a full disk fails");
    assert_eq!(
        common::label_of(&s, a),
        "before-a",
        "a failed relabel changes nothing"
    );
    signs(&s, a, &point_a, "full: key a");
    signs(&s, b, &point_b, "full: key b");
    let (_, session_key) = gen_p256(&s, "session-key-when-full", false);
    let _ = session_key;
    let s2 = t.ro_session();
    signs(&s2, b, &point_b, "full: new session");
    let n = s
        .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
        .unwrap()
        .len();
    assert_eq!(n, 3, "two token keys and one session key");

    // Space again: the store works again.
    for f in &fillers {
        std::fs::remove_file(f).unwrap();
    }
    let (pc, c) = gen_p256(&s, "after-full", true);
    signs(&s, c, &public_point(&s, pc), "freed: new key");

    // Read-only.
    let out = Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(out.status.success(), "remount ro: {out:?}");
    let ro = rv_of(s.generate_key_pair(
        &Mechanism::EccKeyPairGen,
        &common::pub_template("when-ro", true),
        &common::priv_template("when-ro", true),
    ));
    println!("RESULT keygen-read-only {ro:?}");
    assert!(ro.is_some(), "keygen on a read-only disk fails");
    let destroy = rv_of(s.destroy_object(b));
    println!("RESULT destroy-read-only {destroy:?}");
    assert!(destroy.is_some(), "destroy on a read-only disk fails");
    signs(&s, a, &point_a, "read-only: key a");
    signs(
        &s,
        b,
        &point_b,
        "read-only: key b (destroy failed, key kept)",
    );
    signs(&s2, a, &point_a, "read-only: second session");

    // A fresh C_Initialize on the read-only store still serves the keys.
    drop(s2);
    drop(s);
    t.finalize();
    let reinit = t.ctx.initialize(cryptoki::context::CInitializeArgs::new(
        cryptoki::context::CInitializeFlags::OS_LOCKING_OK,
    ));
    println!("RESULT reinitialize-read-only {:?}", reinit.as_ref().err());
    reinit.expect("C_Initialize with a read-only store");
    let slots = t.ctx.get_slots_with_token().unwrap();
    println!("RESULT slots-read-only {}", slots.len());
    assert_eq!(slots.len(), 1, "the read-only store still shows its token");
    let s = t.ro_session();
    let keys = s
        .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
        .unwrap();
    assert_eq!(keys.len(), 3, "before-a, before-b, after-full");
    for k in keys {
        let point = public_point(&s, common::public_for(&s, k));
        signs(&s, k, &point, "read-only after re-initialize");
    }
    println!("RESULT done");
}

#[test]
fn full_then_read_only_disk() {
    let t = Token::uninitialized();
    let mnt = t.root().join("mnt");
    if !mount_tmpfs(&mnt) {
        return;
    }
    let _unmount = Unmount(mnt.clone());
    let log = t.root().join("module.log");
    std::fs::write(
        &t.config,
        format!(
            "[[slot]]\nlabel = \"{}\"\nbackend = \"software\"\ndir = \"{}\"\n",
            common::TOKEN_LABEL,
            mnt.join("keys").display()
        ),
    )
    .unwrap();
    let child = common::spawn_self(
        "disk_child_scenario",
        &[
            (MNT_ENV, mnt.display().to_string()),
            ("DEVICEKEY_CONFIG", t.config.display().to_string()),
            ("DEVICEKEY_LOG", "info".into()),
            ("DEVICEKEY_LOG_FILE", log.display().to_string()),
        ],
    );
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    for line in stdout.lines().filter(|l| l.contains("RESULT")) {
        eprintln!("CRASH disk: {}", line.trim_start_matches(|c| c != 'R'));
    }
    assert!(
        out.status.success() && stdout.contains("RESULT done"),
        "child failed:\n{stdout}\n{}\n--- module log\n{log_text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let full_line = log_text
        .lines()
        .find(|l| l.contains("No space left on device"));
    eprintln!("CRASH disk: log line when full: {full_line:?}");
    assert!(
        full_line.is_some_and(|l| l.contains("full")),
        "the log says the disk is full:\n{log_text}"
    );
    let ro_line = log_text
        .lines()
        .find(|l| l.contains("Read-only file system"));
    eprintln!("CRASH disk: log line when read-only: {ro_line:?}");
    assert!(ro_line.is_some(), "the log names the read-only file system");
}
