//! PKCS#11 library-level rules through the raw C ABI: C_Initialize and its locking cases,
//! calls before C_Initialize, function lists and PKCS#11 3.0 interfaces, unsupported functions.

#[macro_use]
extern crate testkit as common;

use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::Token;
use cryptoki_sys::*;

fn init_args(flags: CK_FLAGS) -> CK_C_INITIALIZE_ARGS {
    CK_C_INITIALIZE_ARGS {
        CreateMutex: None,
        DestroyMutex: None,
        LockMutex: None,
        UnlockMutex: None,
        flags,
        pReserved: ptr::null_mut(),
    }
}

fn initialize(args: Option<&mut CK_C_INITIALIZE_ARGS>) -> CK_RV {
    let p = args.map_or(ptr::null_mut(), |a| {
        a as *mut CK_C_INITIALIZE_ARGS as *mut c_void
    });
    // SAFETY: p is NULL or points to a live CK_C_INITIALIZE_ARGS for the duration of the call.
    unsafe { ck!(C_Initialize)(p) }
}

fn finalize() -> CK_RV {
    // SAFETY: C_Finalize takes a reserved pointer that must be NULL.
    unsafe { ck!(C_Finalize)(ptr::null_mut()) }
}

fn get_info() -> (CK_RV, CK_INFO) {
    let mut info = CK_INFO::default();
    // SAFETY: info is a valid CK_INFO to fill.
    let rv = unsafe { ck!(C_GetInfo)(&mut info) };
    (rv, info)
}

// ---- application-supplied mutexes (a tiny spin lock, so the module may really use them) ----

static MUTEXES_CREATED: AtomicUsize = AtomicUsize::new(0);

unsafe extern "C" fn create_mutex(pp: *mut *mut c_void) -> CK_RV {
    if pp.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    MUTEXES_CREATED.fetch_add(1, Ordering::SeqCst);
    // SAFETY: pp is non-NULL and the module gives us a place to write one pointer.
    unsafe { *pp = Box::into_raw(Box::new(AtomicBool::new(false))) as *mut c_void };
    CKR_OK
}

unsafe extern "C" fn destroy_mutex(p: *mut c_void) -> CK_RV {
    if p.is_null() {
        return CKR_MUTEX_BAD;
    }
    // SAFETY: p came from create_mutex's Box::into_raw and is destroyed once.
    drop(unsafe { Box::from_raw(p as *mut AtomicBool) });
    CKR_OK
}

unsafe extern "C" fn lock_mutex(p: *mut c_void) -> CK_RV {
    if p.is_null() {
        return CKR_MUTEX_BAD;
    }
    // SAFETY: p came from create_mutex and is alive until destroy_mutex.
    let m = unsafe { &*(p as *const AtomicBool) };
    while m
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        std::thread::yield_now();
    }
    CKR_OK
}

unsafe extern "C" fn unlock_mutex(p: *mut c_void) -> CK_RV {
    if p.is_null() {
        return CKR_MUTEX_BAD;
    }
    // SAFETY: p came from create_mutex and is alive until destroy_mutex.
    let m = unsafe { &*(p as *const AtomicBool) };
    if !m.swap(false, Ordering::Release) {
        return CKR_MUTEX_NOT_LOCKED;
    }
    CKR_OK
}

fn with_app_mutexes(flags: CK_FLAGS) -> CK_C_INITIALIZE_ARGS {
    CK_C_INITIALIZE_ARGS {
        CreateMutex: Some(create_mutex),
        DestroyMutex: Some(destroy_mutex),
        LockMutex: Some(lock_mutex),
        UnlockMutex: Some(unlock_mutex),
        flags,
        pReserved: ptr::null_mut(),
    }
}

/// After a successful initialize, the module works: GetInfo, slot list and a session.
fn assert_usable() {
    let (rv, info) = get_info();
    assert_rv!(rv, CKR_OK, "C_GetInfo after C_Initialize");
    assert!(info.cryptokiVersion.major >= 2);
    let mut count: CK_ULONG = 0;
    // SAFETY: NULL list asks for the count only.
    let rv = unsafe { ck!(C_GetSlotList)(CK_TRUE, ptr::null_mut(), &mut count) };
    assert_rv!(rv, CKR_OK, "C_GetSlotList count");
    assert_eq!(count, 1);
    let mut slot: CK_SLOT_ID = 0;
    // SAFETY: room for exactly `count` (1) slot id.
    let rv = unsafe { ck!(C_GetSlotList)(CK_TRUE, &mut slot, &mut count) };
    assert_rv!(rv, CKR_OK);
    let mut session: CK_SESSION_HANDLE = 0;
    // SAFETY: valid out-pointer; no notify callback.
    let rv = unsafe {
        ck!(C_OpenSession)(
            slot,
            CKF_SERIAL_SESSION | CKF_RW_SESSION,
            ptr::null_mut(),
            None,
            &mut session,
        )
    };
    assert_rv!(rv, CKR_OK, "C_OpenSession");
    // SAFETY: session was just opened.
    let rv = unsafe { ck!(C_CloseSession)(session) };
    assert_rv!(rv, CKR_OK, "C_CloseSession");
}

#[test]
fn functions_before_initialize_return_not_initialized() {
    let _t = Token::uninitialized();
    let (rv, _) = get_info();
    assert_rv!(rv, CKR_CRYPTOKI_NOT_INITIALIZED, "C_GetInfo");
    assert_rv!(finalize(), CKR_CRYPTOKI_NOT_INITIALIZED, "C_Finalize");

    let mut count: CK_ULONG = 0;
    // SAFETY: NULL list, valid count pointer.
    let rv = unsafe { ck!(C_GetSlotList)(CK_FALSE, ptr::null_mut(), &mut count) };
    assert_rv!(rv, CKR_CRYPTOKI_NOT_INITIALIZED, "C_GetSlotList");

    let mut slot_info = CK_SLOT_INFO::default();
    // SAFETY: valid out-pointer.
    let rv = unsafe { ck!(C_GetSlotInfo)(0, &mut slot_info) };
    assert_rv!(rv, CKR_CRYPTOKI_NOT_INITIALIZED, "C_GetSlotInfo");

    let mut token_info = CK_TOKEN_INFO::default();
    // SAFETY: valid out-pointer.
    let rv = unsafe { ck!(C_GetTokenInfo)(0, &mut token_info) };
    assert_rv!(rv, CKR_CRYPTOKI_NOT_INITIALIZED, "C_GetTokenInfo");

    let mut session: CK_SESSION_HANDLE = 0;
    // SAFETY: valid out-pointer.
    let rv =
        unsafe { ck!(C_OpenSession)(0, CKF_SERIAL_SESSION, ptr::null_mut(), None, &mut session) };
    assert_rv!(rv, CKR_CRYPTOKI_NOT_INITIALIZED, "C_OpenSession");

    // SAFETY: a session handle is just a number.
    let rv = unsafe { ck!(C_CloseSession)(1) };
    assert_rv!(rv, CKR_CRYPTOKI_NOT_INITIALIZED, "C_CloseSession");

    let mut buf = [0u8; 8];
    // SAFETY: buf has room for 8 bytes.
    let rv = unsafe { ck!(C_GenerateRandom)(1, buf.as_mut_ptr(), buf.len() as CK_ULONG) };
    assert_rv!(rv, CKR_CRYPTOKI_NOT_INITIALIZED, "C_GenerateRandom");

    // SAFETY: unsupported-or-not, the module must answer before touching arguments.
    let rv = unsafe { ck!(C_GetFunctionStatus)(1) };
    assert!(
        rv == CKR_CRYPTOKI_NOT_INITIALIZED || rv == CKR_FUNCTION_NOT_PARALLEL,
        "C_GetFunctionStatus before init: {}",
        common::rv_name(rv)
    );
}

#[test]
fn double_initialize_is_already_initialized() {
    let _t = Token::uninitialized();
    assert_rv!(initialize(None), CKR_OK);
    assert_rv!(initialize(None), CKR_CRYPTOKI_ALREADY_INITIALIZED);
    let mut args = init_args(CKF_OS_LOCKING_OK);
    assert_rv!(
        initialize(Some(&mut args)),
        CKR_CRYPTOKI_ALREADY_INITIALIZED
    );
    // Still initialized and usable.
    assert_usable();
    assert_rv!(finalize(), CKR_OK);
    assert_rv!(finalize(), CKR_CRYPTOKI_NOT_INITIALIZED);
}

#[test]
fn double_initialize_through_cryptoki() {
    let t = common::Token::new();
    let e = common::rv_err(t.ctx.initialize(cryptoki::context::CInitializeArgs::new(
        cryptoki::context::CInitializeFlags::OS_LOCKING_OK,
    )));
    assert_eq!(e, cryptoki::error::RvError::CryptokiAlreadyInitialized);
}

#[test]
fn concurrent_initialize_exactly_one_wins() {
    let _t = Token::uninitialized();
    let results: Vec<CK_RV> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    let mut args = init_args(CKF_OS_LOCKING_OK);
                    initialize(Some(&mut args))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let ok = results.iter().filter(|&&rv| rv == CKR_OK).count();
    let already = results
        .iter()
        .filter(|&&rv| rv == CKR_CRYPTOKI_ALREADY_INITIALIZED)
        .count();
    assert_eq!(
        (ok, already),
        (1, 7),
        "results: {:?}",
        results
            .iter()
            .map(|&r| common::rv_name(r))
            .collect::<Vec<_>>()
    );
    assert_usable();
    assert_rv!(finalize(), CKR_OK);
}

#[test]
fn initialize_with_reserved_pointer_is_arguments_bad() {
    let _t = Token::uninitialized();
    let mut junk = 0u64;
    let mut args = init_args(CKF_OS_LOCKING_OK);
    args.pReserved = &mut junk as *mut u64 as *mut c_void;
    assert_rv!(initialize(Some(&mut args)), CKR_ARGUMENTS_BAD);
    // Nothing was initialized.
    let (rv, _) = get_info();
    assert_rv!(
        rv,
        CKR_CRYPTOKI_NOT_INITIALIZED,
        "C_GetInfo after a refused C_Initialize"
    );
    // A correct call still works afterwards.
    assert_rv!(initialize(None), CKR_OK);
    assert_rv!(finalize(), CKR_OK);
}

#[test]
fn finalize_with_reserved_pointer_is_arguments_bad() {
    let _t = Token::uninitialized();
    assert_rv!(initialize(None), CKR_OK);
    let mut junk = 0u64;
    // SAFETY: pReserved must be NULL; we pass a valid but non-NULL pointer to test the check.
    let rv = unsafe { ck!(C_Finalize)(&mut junk as *mut u64 as *mut c_void) };
    assert_rv!(rv, CKR_ARGUMENTS_BAD);
    assert_rv!(finalize(), CKR_OK);
}

#[test]
fn initialize_locking_case_null_args() {
    let _t = Token::uninitialized();
    assert_rv!(initialize(None), CKR_OK);
    assert_usable();
    assert_rv!(finalize(), CKR_OK);
}

#[test]
fn initialize_locking_case_no_flags_no_mutexes() {
    let _t = Token::uninitialized();
    let mut args = init_args(0);
    assert_rv!(initialize(Some(&mut args)), CKR_OK);
    assert_usable();
    assert_rv!(finalize(), CKR_OK);
}

#[test]
fn initialize_locking_case_os_locking_ok() {
    let _t = Token::uninitialized();
    let mut args = init_args(CKF_OS_LOCKING_OK);
    assert_rv!(initialize(Some(&mut args)), CKR_OK);
    assert_usable();
    assert_rv!(finalize(), CKR_OK);
}

#[test]
fn initialize_locking_case_app_mutexes() {
    let _t = Token::uninitialized();
    let mut args = with_app_mutexes(0);
    assert_rv!(initialize(Some(&mut args)), CKR_OK);
    assert_usable();
    assert_rv!(finalize(), CKR_OK);
}

#[test]
fn initialize_locking_case_app_mutexes_and_os_locking() {
    let _t = Token::uninitialized();
    let mut args = with_app_mutexes(CKF_OS_LOCKING_OK);
    assert_rv!(initialize(Some(&mut args)), CKR_OK);
    assert_usable();
    assert_rv!(finalize(), CKR_OK);
}

#[test]
fn initialize_with_some_mutex_functions_null_is_arguments_bad() {
    let _t = Token::uninitialized();
    for missing in 0..4 {
        for flags in [0, CKF_OS_LOCKING_OK] {
            let mut args = with_app_mutexes(flags);
            match missing {
                0 => args.CreateMutex = None,
                1 => args.DestroyMutex = None,
                2 => args.LockMutex = None,
                _ => args.UnlockMutex = None,
            }
            assert_rv!(
                initialize(Some(&mut args)),
                CKR_ARGUMENTS_BAD,
                "mutex function #{missing} NULL, flags {flags:#x}"
            );
            let (rv, _) = get_info();
            assert_rv!(rv, CKR_CRYPTOKI_NOT_INITIALIZED);
        }
    }
    // Only one set, three NULL.
    let mut args = init_args(0);
    args.LockMutex = Some(lock_mutex);
    assert_rv!(initialize(Some(&mut args)), CKR_ARGUMENTS_BAD);
}

#[test]
fn get_info_after_initialize() {
    let _t = Token::new();
    let (rv, info) = get_info();
    assert_rv!(rv, CKR_OK);
    assert_eq!(info.flags, 0, "CK_INFO.flags must be 0");
    let manufacturer = String::from_utf8_lossy(&info.manufacturerID);
    assert!(!manufacturer.trim().is_empty(), "manufacturerID is blank");
    assert!(
        info.manufacturerID.iter().all(|&b| b != 0),
        "CK_INFO strings are blank-padded, not NUL-terminated"
    );
    assert!(info.libraryDescription.iter().all(|&b| b != 0));
    // SAFETY: NULL is an invalid out-pointer; the module must refuse it, not crash.
    let rv = unsafe { ck!(C_GetInfo)(ptr::null_mut()) };
    assert_rv!(rv, CKR_ARGUMENTS_BAD, "C_GetInfo(NULL)");
}

#[test]
fn get_function_list_checks_null_and_works_before_initialize() {
    let _t = Token::uninitialized();
    let lib = common::raw_lib();
    // SAFETY: NULL out-pointer must be refused.
    let rv = unsafe { lib.C_GetFunctionList(ptr::null_mut()) };
    assert_rv!(rv, CKR_ARGUMENTS_BAD);
    let mut p: *mut CK_FUNCTION_LIST = ptr::null_mut();
    // SAFETY: valid out-pointer.
    let rv = unsafe { lib.C_GetFunctionList(&mut p) };
    assert_rv!(rv, CKR_OK);
    assert!(!p.is_null());
    // SAFETY: the module returned a pointer to its static list.
    let list = unsafe { &*p };
    assert_eq!(
        (list.version.major, list.version.minor),
        (2, 40),
        "C_GetFunctionList gives the 2.40 list"
    );
    assert_no_null_entries(
        p as *const c_void,
        std::mem::size_of::<CK_FUNCTION_LIST>(),
        "2.40 list",
    );
}

/// Every function pointer in a function list must be set (callers call without checking).
fn assert_no_null_entries(list: *const c_void, size: usize, what: &str) {
    // Layout: CK_VERSION (2 bytes, padded to pointer alignment), then N function pointers.
    let ptr_size = std::mem::size_of::<usize>();
    let n = (size - ptr_size) / ptr_size;
    for i in 0..n {
        // SAFETY: list points to a repr(C) function list of `size` bytes: after the version
        // (padded to one pointer) come n pointer-sized, pointer-aligned entries.
        let entry = unsafe { *((list as *const u8).add(ptr_size + i * ptr_size) as *const usize) };
        assert_ne!(entry, 0, "{what}: function pointer #{i} is NULL");
    }
}

fn interface_name(iface: &CK_INTERFACE) -> String {
    assert!(!iface.pInterfaceName.is_null());
    // SAFETY: the interface name is a NUL-terminated static string inside the module.
    unsafe { std::ffi::CStr::from_ptr(iface.pInterfaceName as *const std::ffi::c_char) }
        .to_string_lossy()
        .into_owned()
}

fn interface_version(iface: &CK_INTERFACE) -> (u8, u8) {
    assert!(!iface.pFunctionList.is_null());
    // SAFETY: every function list starts with a CK_VERSION.
    let v = unsafe { *(iface.pFunctionList as *const CK_VERSION) };
    (v.major, v.minor)
}

#[test]
fn interface_list_has_3_0_and_2_40() {
    let _t = Token::uninitialized(); // works before C_Initialize
    let lib = common::raw_lib();
    assert!(
        lib.C_GetInterfaceList.is_ok(),
        "C_GetInterfaceList is not exported"
    );
    let mut count: CK_ULONG = 0;
    // SAFETY: NULL list asks for the count.
    let rv = unsafe { lib.C_GetInterfaceList(ptr::null_mut(), &mut count) };
    assert_rv!(rv, CKR_OK);
    assert!(count >= 2, "at least two interfaces, got {count}");
    // Too small.
    let mut one = [CK_INTERFACE {
        pInterfaceName: ptr::null_mut(),
        pFunctionList: ptr::null_mut(),
        flags: 0,
    }];
    let mut small: CK_ULONG = 1;
    // SAFETY: room for 1 entry, and we say so.
    let rv = unsafe { lib.C_GetInterfaceList(one.as_mut_ptr(), &mut small) };
    assert_rv!(rv, CKR_BUFFER_TOO_SMALL);
    assert_eq!(small, count, "BUFFER_TOO_SMALL reports the needed count");
    // SAFETY: NULL count pointer must be refused.
    let rv = unsafe { lib.C_GetInterfaceList(ptr::null_mut(), ptr::null_mut()) };
    assert_rv!(rv, CKR_ARGUMENTS_BAD);

    let mut list = vec![
        CK_INTERFACE {
            pInterfaceName: ptr::null_mut(),
            pFunctionList: ptr::null_mut(),
            flags: 0
        };
        count as usize
    ];
    // SAFETY: room for `count` entries.
    let rv = unsafe { lib.C_GetInterfaceList(list.as_mut_ptr(), &mut count) };
    assert_rv!(rv, CKR_OK);
    let mut versions = Vec::new();
    for iface in &list[..count as usize] {
        assert_eq!(interface_name(iface), "PKCS 11");
        let v = interface_version(iface);
        let size = if v.0 >= 3 {
            std::mem::size_of::<CK_FUNCTION_LIST_3_0>()
        } else {
            std::mem::size_of::<CK_FUNCTION_LIST>()
        };
        assert_no_null_entries(iface.pFunctionList, size, &format!("interface {v:?}"));
        versions.push(v);
    }
    assert!(
        versions.contains(&(3, 0)),
        "3.0 interface missing: {versions:?}"
    );
    assert!(
        versions.contains(&(2, 40)),
        "2.40 interface missing: {versions:?}"
    );
}

#[test]
fn get_interface_by_name_and_version() {
    let _t = Token::uninitialized();
    let lib = common::raw_lib();
    assert!(lib.C_GetInterface.is_ok(), "C_GetInterface is not exported");
    let mut name = *b"PKCS 11\0";
    let mut iface: *mut CK_INTERFACE = ptr::null_mut();

    // Default (NULL name, NULL version), as cryptoki and NSS ask.
    // SAFETY: valid out-pointer.
    let rv = unsafe { lib.C_GetInterface(ptr::null_mut(), ptr::null_mut(), &mut iface, 0) };
    assert_rv!(rv, CKR_OK);
    assert!(!iface.is_null());
    // SAFETY: the module returned a pointer to a static interface.
    let default = unsafe { &*iface };
    assert_eq!(interface_name(default), "PKCS 11");
    assert_eq!(interface_version(default).0, 3, "default interface is 3.x");

    // By name only.
    // SAFETY: NUL-terminated name, valid out-pointer.
    let rv = unsafe { lib.C_GetInterface(name.as_mut_ptr(), ptr::null_mut(), &mut iface, 0) };
    assert_rv!(rv, CKR_OK);
    // SAFETY: static interface inside the module.
    assert_eq!(interface_version(unsafe { &*iface }).0, 3);

    for (major, minor) in [(3u8, 0u8), (2, 40)] {
        let mut v = CK_VERSION { major, minor };
        // SAFETY: NUL-terminated name, valid version and out-pointer.
        let rv = unsafe { lib.C_GetInterface(name.as_mut_ptr(), &mut v, &mut iface, 0) };
        assert_rv!(rv, CKR_OK, "C_GetInterface {major}.{minor}");
        // SAFETY: static interface inside the module.
        let i = unsafe { &*iface };
        assert_eq!(interface_version(i), (major, minor));
    }

    // Unknown name.
    let mut other = *b"Vendor Nope\0";
    // SAFETY: NUL-terminated name, valid out-pointer.
    let rv = unsafe { lib.C_GetInterface(other.as_mut_ptr(), ptr::null_mut(), &mut iface, 0) };
    assert_ne!(rv, CKR_OK, "an unknown interface name must not be found");
    // NULL out-pointer.
    // SAFETY: NULL out-pointer must be refused.
    let rv = unsafe { lib.C_GetInterface(name.as_mut_ptr(), ptr::null_mut(), ptr::null_mut(), 0) };
    assert_rv!(rv, CKR_ARGUMENTS_BAD);
}

/// A session (and a key) for calling the unsupported functions with plausible arguments.
fn with_session<F: FnOnce(CK_SESSION_HANDLE, CK_OBJECT_HANDLE)>(f: F) {
    let t = Token::new();
    let s = t.session();
    let (_, private) = common::gen_p256(&s, "unsupported", false);
    f(s.handle(), private.handle());
}

#[test]
fn unsupported_functions_return_function_not_supported() {
    with_session(|s, key| {
        let mut mech = CK_MECHANISM {
            mechanism: CKM_AES_CBC,
            pParameter: ptr::null_mut(),
            ulParameterLen: 0,
        };
        let mut buf = [0u8; 256];
        let mut len: CK_ULONG = buf.len() as CK_ULONG;
        let mut handle: CK_OBJECT_HANDLE = 0;
        let mut attr = CK_ATTRIBUTE {
            type_: CKA_TOKEN,
            pValue: ptr::null_mut(),
            ulValueLen: 0,
        };
        // SAFETY: all pointers below point to live locals of the right types and sizes.
        let results: Vec<(&str, CK_RV)> = unsafe {
            vec![
                ("C_EncryptInit", ck!(C_EncryptInit)(s, &mut mech, key)),
                ("C_DecryptInit", ck!(C_DecryptInit)(s, &mut mech, key)),
                (
                    "C_WrapKey",
                    ck!(C_WrapKey)(s, &mut mech, key, key, buf.as_mut_ptr(), &mut len),
                ),
                (
                    "C_UnwrapKey",
                    ck!(C_UnwrapKey)(
                        s,
                        &mut mech,
                        key,
                        buf.as_mut_ptr(),
                        16,
                        &mut attr,
                        1,
                        &mut handle,
                    ),
                ),
                (
                    "C_DeriveKey",
                    ck!(C_DeriveKey)(s, &mut mech, key, &mut attr, 1, &mut handle),
                ),
                (
                    "C_GenerateKey",
                    ck!(C_GenerateKey)(s, &mut mech, &mut attr, 1, &mut handle),
                ),
                (
                    "C_SignRecoverInit",
                    ck!(C_SignRecoverInit)(s, &mut mech, key),
                ),
                (
                    "C_VerifyRecoverInit",
                    ck!(C_VerifyRecoverInit)(s, &mut mech, key),
                ),
                (
                    "C_CopyObject",
                    ck!(C_CopyObject)(s, key, &mut attr, 1, &mut handle),
                ),
            ]
        };
        let wrong: Vec<String> = results
            .iter()
            .filter(|(_, rv)| *rv != CKR_FUNCTION_NOT_SUPPORTED)
            .map(|(name, rv)| format!("{name} -> {}", common::rv_name(*rv)))
            .collect();
        assert!(
            wrong.is_empty(),
            "expected CKR_FUNCTION_NOT_SUPPORTED: {wrong:?}"
        );
    });
}

#[test]
fn function_status_and_cancel_are_not_parallel() {
    with_session(|s, _| {
        // SAFETY: plain handle arguments.
        let rv = unsafe { ck!(C_GetFunctionStatus)(s) };
        assert_rv!(rv, CKR_FUNCTION_NOT_PARALLEL, "C_GetFunctionStatus");
        // SAFETY: plain handle arguments.
        let rv = unsafe { ck!(C_CancelFunction)(s) };
        assert_rv!(rv, CKR_FUNCTION_NOT_PARALLEL, "C_CancelFunction");
    });
}
