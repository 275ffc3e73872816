//! Concurrency rules: many threads on many sessions, keys another process creates, and a forked
//! child that re-initializes and signs. (Several processes creating keys in one store at the same
//! moment, on every store: `tests/robust_stress.rs`.)

#[macro_use]
extern crate testkit as common;

use std::collections::BTreeSet;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use common::{gen_p256, public_point, sha256, verify_prehash, Token};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass};

const THREADS: usize = 8;
const SIGNATURES_PER_THREAD: usize = 200;

#[test]
fn eight_threads_sign_on_eight_sessions_at_once() {
    let t = Token::new();
    let slot = t.slot();
    let (point, private) = {
        let s = t.session();
        let (public, private) = gen_p256(&s, "threads", true);
        (public_point(&s, public), private)
    };
    let barrier = Barrier::new(THREADS);
    let started = Instant::now();
    let results: Vec<Result<Vec<Vec<u8>>, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|i| {
                let ctx = t.ctx.clone();
                let barrier = &barrier;
                let point = &point;
                scope.spawn(move || -> Result<Vec<Vec<u8>>, String> {
                    let s = ctx
                        .open_ro_session(slot)
                        .map_err(|e| format!("thread {i}: open: {e}"))?;
                    barrier.wait();
                    let mut sigs = Vec::with_capacity(SIGNATURES_PER_THREAD);
                    for j in 0..SIGNATURES_PER_THREAD {
                        let digest = sha256(format!("thread {i} signature {j}").as_bytes());
                        let sig = s
                            .sign(&Mechanism::Ecdsa, private, &digest)
                            .map_err(|e| format!("thread {i} signature {j}: {e}"))?;
                        if sig.len() != 64 {
                            return Err(format!("thread {i} signature {j}: {} bytes", sig.len()));
                        }
                        if !verify_prehash(point, &digest, &sig) {
                            return Err(format!("thread {i} signature {j} does not verify"));
                        }
                        sigs.push(sig);
                    }
                    Ok(sigs)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())))
            .collect()
    });
    let errors: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(errors.is_empty(), "failures: {errors:?}");
    let all: BTreeSet<Vec<u8>> = results.into_iter().flat_map(Result::unwrap).collect();
    assert_eq!(
        all.len(),
        THREADS * SIGNATURES_PER_THREAD,
        "every signature is distinct"
    );
    eprintln!(
        "{} signatures on {THREADS} threads (signed and verified) in {:?}",
        THREADS * SIGNATURES_PER_THREAD,
        started.elapsed()
    );
}

#[test]
fn threads_mixing_keygen_find_sign_and_close() {
    let t = Token::new();
    let slot = t.slot();
    let barrier = Barrier::new(4);
    let errors: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let ctx = t.ctx.clone();
                let barrier = &barrier;
                scope.spawn(move || -> Result<(), String> {
                    barrier.wait();
                    for round in 0..5 {
                        let s = ctx.open_rw_session(slot).map_err(|e| e.to_string())?;
                        let label = format!("mix-{i}-{round}");
                        let (public, private) = gen_p256(&s, &label, round % 2 == 0);
                        let point = public_point(&s, public);
                        let found = s
                            .find_objects(&[Attribute::Label(label.clone().into_bytes())])
                            .map_err(|e| e.to_string())?;
                        if found.len() != 2 {
                            return Err(format!("{label}: found {}", found.len()));
                        }
                        for j in 0..5 {
                            let d = sha256(format!("{label}/{j}").as_bytes());
                            let sig = s
                                .sign(&Mechanism::Ecdsa, private, &d)
                                .map_err(|e| e.to_string())?;
                            if !verify_prehash(&point, &d, &sig) {
                                return Err(format!("{label}/{j}: bad signature"));
                            }
                        }
                        s.close().map_err(|e| e.to_string())?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("thread panicked".into()))
                    .err()
            })
            .collect()
    });
    assert!(errors.is_empty(), "failures: {errors:?}");
    // Token keys (rounds 0, 2, 4) remain; session keys went with their sessions.
    let s = t.session();
    let privs = s
        .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
        .expect("find");
    assert_eq!(privs.len(), 4 * 3);
}

const KEYS_PER_PROCESS: usize = 25;
const CHILD_ENV: &str = "DEVICEKEY_TEST_CHILD_INDEX";
const START_ENV: &str = "DEVICEKEY_TEST_START_AT_MS";
const COUNT_ENV: &str = "DEVICEKEY_TEST_KEY_COUNT";

/// Child side of `keys_created_by_another_process_are_visible_without_reinitializing` (runs only
/// when spawned by it). Four processes creating keys at once: `tests/robust_stress.rs`.
#[test]
#[ignore = "child process of keys_created_by_another_process_are_visible_without_reinitializing"]
fn child_create_keys() {
    let Some(index) = std::env::var(CHILD_ENV).ok() else {
        return;
    };
    let start_at: u64 = std::env::var(START_ENV)
        .expect(START_ENV)
        .parse()
        .expect("start time");
    let t = Token::from_env_config();
    let s = t.session();
    // Start barrier: everyone begins at the same wall-clock moment.
    let now = common::now_millis();
    if start_at > now {
        std::thread::sleep(Duration::from_millis(start_at - now));
    }
    let count: usize = std::env::var(COUNT_ENV)
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(KEYS_PER_PROCESS);
    for j in 0..count {
        gen_p256(&s, &format!("proc{index}-key{j}"), true);
    }
}

#[test]
fn keys_created_by_another_process_are_visible_without_reinitializing() {
    let t = Token::new();
    let s = t.session();
    gen_p256(&s, "mine", true);
    let child = common::spawn_self(
        "child_create_keys",
        &[
            (CHILD_ENV, "other".to_string()),
            (START_ENV, "0".to_string()),
            (COUNT_ENV, "3".to_string()),
            ("DEVICEKEY_CONFIG", t.config.display().to_string()),
        ],
    );
    let out = child.wait_with_output().expect("wait for child");
    assert!(
        out.status.success(),
        "child: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Same module instance, no C_Finalize: the other process's keys show up.
    let privs = s
        .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
        .expect("find");
    let labels: BTreeSet<String> = privs.iter().map(|&h| common::label_of(&s, h)).collect();
    let want: BTreeSet<String> = ["mine", "procother-key0", "procother-key1", "procother-key2"]
        .iter()
        .map(|l| l.to_string())
        .collect();
    assert_eq!(labels, want);
    for &private in &privs {
        let point = public_point(&s, common::public_for(&s, private));
        let d = sha256(b"cross-process");
        let sig = s.sign(&Mechanism::Ecdsa, private, &d).expect("sign");
        assert!(verify_prehash(&point, &d, &sig));
    }
}

/// Exit codes of the forked child.
const FORK_OK: i32 = 0;
const FORK_INIT_FAILED: i32 = 10;
const FORK_OLD_SESSION_VALID: i32 = 11;
const FORK_OPEN_FAILED: i32 = 12;
const FORK_FIND_FAILED: i32 = 13;
const FORK_SIGN_FAILED: i32 = 14;
const FORK_BAD_SIGNATURE: i32 = 15;
const FORK_PANIC: i32 = 99;

fn fork_code_name(code: i32) -> &'static str {
    match code {
        FORK_INIT_FAILED => "C_Initialize in the child did not return CKR_OK",
        FORK_OLD_SESSION_VALID => {
            "the parent's session handle was still valid after the child's C_Initialize"
        }
        FORK_OPEN_FAILED => "C_OpenSession failed in the child",
        FORK_FIND_FAILED => "the token key was not found in the child",
        FORK_SIGN_FAILED => "C_Sign failed in the child",
        FORK_BAD_SIGNATURE => "the child's signature does not verify",
        FORK_PANIC => "the child panicked",
        _ => "unknown",
    }
}

fn forked_child(t: &Token, parent_session: cryptoki_sys::CK_SESSION_HANDLE, point: &[u8]) -> i32 {
    // SAFETY: NULL init args: the child must be able to initialize afresh after fork().
    let rv = unsafe { ck!(C_Initialize)(std::ptr::null_mut()) };
    if rv != cryptoki_sys::CKR_OK {
        return FORK_INIT_FAILED;
    }
    let mut info = cryptoki_sys::CK_SESSION_INFO::default();
    // SAFETY: valid out-pointer; the handle is the parent's.
    let rv = unsafe { ck!(C_GetSessionInfo)(parent_session, &mut info) };
    if rv != cryptoki_sys::CKR_SESSION_HANDLE_INVALID {
        return FORK_OLD_SESSION_VALID;
    }
    let Ok(slots) = t.ctx.get_slots_with_token() else {
        return FORK_OPEN_FAILED;
    };
    let Some(&slot) = slots.first() else {
        return FORK_OPEN_FAILED;
    };
    let Ok(s) = t.ctx.open_rw_session(slot) else {
        return FORK_OPEN_FAILED;
    };
    let found = s.find_objects(&[
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::Label(b"forked".to_vec()),
    ]);
    let Some(&private) = found.as_ref().ok().and_then(|f| f.first()) else {
        return FORK_FIND_FAILED;
    };
    let d = sha256(b"signed in the child");
    let Ok(sig) = s.sign(&Mechanism::Ecdsa, private, &d) else {
        return FORK_SIGN_FAILED;
    };
    if !verify_prehash(point, &d, &sig) {
        return FORK_BAD_SIGNATURE;
    }
    drop(s);
    // SAFETY: C_Finalize with NULL.
    unsafe { ck!(C_Finalize)(std::ptr::null_mut()) };
    FORK_OK
}

#[test]
fn forked_child_reinitializes_and_signs() {
    let t = Token::new();
    let s = t.session();
    let (public, private) = gen_p256(&s, "forked", true);
    let point = public_point(&s, public);
    let d = sha256(b"parent before fork");
    assert!(verify_prehash(
        &point,
        &d,
        &s.sign(&Mechanism::Ecdsa, private, &d).expect("sign")
    ));

    // SAFETY: fork() in a test process. The child only runs forked_child (module calls and
    // memory it owns), then leaves with _exit, never returning into the test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            forked_child(&t, s.handle(), &point)
        }))
        .unwrap_or(FORK_PANIC);
        // SAFETY: leave the child at once, running no destructors or atexit handlers.
        unsafe { libc::_exit(code) };
    }

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut status = 0;
    loop {
        // SAFETY: waiting for our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        assert!(r >= 0, "waitpid failed");
        if r == pid {
            break;
        }
        if Instant::now() > deadline {
            // SAFETY: killing and reaping our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            panic!("forked child hung for 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        libc::WIFEXITED(status),
        "child died abnormally (status {status:#x})"
    );
    let code = libc::WEXITSTATUS(status);
    assert_eq!(code, FORK_OK, "forked child: {}", fork_code_name(code));

    // The parent is unaffected.
    let d = sha256(b"parent after fork");
    let sig = s
        .sign(&Mechanism::Ecdsa, private, &d)
        .expect("parent signs after the fork");
    assert!(verify_prehash(&point, &d, &sig));
}
