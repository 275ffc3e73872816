//! Fork detection through the fork generation (a `pthread_atfork` child handler): in a forked
//! child every call sees `CKR_CRYPTOKI_NOT_INITIALIZED` until C_Initialize (C_Finalize does not
//! tear down the parent's state), C_Initialize then builds a fresh state, and a grandchild forked
//! from that child is detected the same way. The parent keeps its state: its C_Initialize still
//! says CKR_CRYPTOKI_ALREADY_INITIALIZED.
#![cfg(unix)]

#[macro_use]
extern crate testkit as common;

use std::time::{Duration, Instant};

use common::Token;
use cryptoki_sys::*;

/// The number of slots (C_GetSlotList), or the CKR_ value it failed with.
fn slot_count() -> Result<CK_ULONG, CK_RV> {
    let mut count: CK_ULONG = 0;
    // SAFETY: NULL list (a count query) and a valid out-pointer.
    let rv = unsafe { ck!(C_GetSlotList)(CK_FALSE, std::ptr::null_mut(), &mut count) };
    if rv == CKR_OK {
        Ok(count)
    } else {
        Err(rv)
    }
}

fn initialize() -> CK_RV {
    // SAFETY: NULL init args.
    unsafe { ck!(C_Initialize)(std::ptr::null_mut()) }
}

fn finalize() -> CK_RV {
    // SAFETY: NULL reserved pointer.
    unsafe { ck!(C_Finalize)(std::ptr::null_mut()) }
}

/// What a freshly forked process must see; returns 0 or the number of the failed check.
fn fresh_child_checks(depth: u32) -> i32 {
    if slot_count() != Err(CKR_CRYPTOKI_NOT_INITIALIZED) {
        return 1;
    }
    if finalize() != CKR_CRYPTOKI_NOT_INITIALIZED {
        return 2;
    }
    if initialize() != CKR_OK {
        return 3;
    }
    if !matches!(slot_count(), Ok(n) if n >= 1) {
        return 4;
    }
    if initialize() != CKR_CRYPTOKI_ALREADY_INITIALIZED {
        return 5;
    }
    if depth > 0 {
        let code = in_child(|| fresh_child_checks(depth - 1));
        if code != 0 {
            return 10 + code;
        }
        // The grandchild's C_Initialize did not touch this process's state.
        if !matches!(slot_count(), Ok(n) if n >= 1) {
            return 6;
        }
    }
    if finalize() != CKR_OK {
        return 7;
    }
    0
}

/// Runs `f` in a forked child and returns its exit code.
fn in_child(f: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child only runs `f` (module calls on memory it owns), then leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(99);
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
    assert!(libc::WIFEXITED(status), "child died (status {status:#x})");
    libc::WEXITSTATUS(status)
}

#[test]
fn forked_children_and_grandchildren_start_uninitialized() {
    let t = Token::new();
    let before = slot_count().expect("C_GetSlotList in the parent");
    let code = in_child(|| fresh_child_checks(1));
    assert_eq!(
        code, 0,
        "check {code} failed in the child (1x) or grandchild (1xx: 10 + its check)"
    );
    assert_eq!(slot_count(), Ok(before), "the parent's state is intact");
    assert_eq!(initialize(), CKR_CRYPTOKI_ALREADY_INITIALIZED);
    drop(t);
}
