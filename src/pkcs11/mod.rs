//! The C ABI and nothing else: the exported entry points, the PKCS#11 2.40 and 3.0 function
//! lists, and the interfaces of C_GetInterfaceList. Every raw pointer in the crate lives here.
//!
//! # Safety
//! Every exported `C_*` function is `unsafe`: its contract is the PKCS#11 specification (each
//! pointer is NULL or valid for the length the caller states). Within that contract nothing here
//! is undefined: pointers are NULL-checked and lengths bounded before any access.

#![deny(unsafe_op_in_unsafe_fn)]
// The safety contract of every entry point is the PKCS#11 specification (see above).
#![allow(clippy::missing_safety_doc)]
#![allow(non_snake_case)]

pub mod entry;
pub mod memory;
pub mod rv;
pub mod state;
pub mod unsupported;

use std::os::raw::c_void;

use cryptoki_sys::*;

use entry::*;
use unsupported::*;

macro_rules! function_list {
    ($ty:ident, $major:expr, $minor:expr, { $($extra:ident),* }) => {
        $ty {
            version: CK_VERSION { major: $major, minor: $minor },
            C_Initialize: Some(C_Initialize),
            C_Finalize: Some(C_Finalize),
            C_GetInfo: Some(C_GetInfo),
            C_GetFunctionList: Some(C_GetFunctionList),
            C_GetSlotList: Some(C_GetSlotList),
            C_GetSlotInfo: Some(C_GetSlotInfo),
            C_GetTokenInfo: Some(C_GetTokenInfo),
            C_GetMechanismList: Some(C_GetMechanismList),
            C_GetMechanismInfo: Some(C_GetMechanismInfo),
            C_InitToken: Some(C_InitToken),
            C_InitPIN: Some(C_InitPIN),
            C_SetPIN: Some(C_SetPIN),
            C_OpenSession: Some(C_OpenSession),
            C_CloseSession: Some(C_CloseSession),
            C_CloseAllSessions: Some(C_CloseAllSessions),
            C_GetSessionInfo: Some(C_GetSessionInfo),
            C_GetOperationState: Some(C_GetOperationState),
            C_SetOperationState: Some(C_SetOperationState),
            C_Login: Some(C_Login),
            C_Logout: Some(C_Logout),
            C_CreateObject: Some(C_CreateObject),
            C_CopyObject: Some(C_CopyObject),
            C_DestroyObject: Some(C_DestroyObject),
            C_GetObjectSize: Some(C_GetObjectSize),
            C_GetAttributeValue: Some(C_GetAttributeValue),
            C_SetAttributeValue: Some(C_SetAttributeValue),
            C_FindObjectsInit: Some(C_FindObjectsInit),
            C_FindObjects: Some(C_FindObjects),
            C_FindObjectsFinal: Some(C_FindObjectsFinal),
            C_EncryptInit: Some(C_EncryptInit),
            C_Encrypt: Some(C_Encrypt),
            C_EncryptUpdate: Some(C_EncryptUpdate),
            C_EncryptFinal: Some(C_EncryptFinal),
            C_DecryptInit: Some(C_DecryptInit),
            C_Decrypt: Some(C_Decrypt),
            C_DecryptUpdate: Some(C_DecryptUpdate),
            C_DecryptFinal: Some(C_DecryptFinal),
            C_DigestInit: Some(C_DigestInit),
            C_Digest: Some(C_Digest),
            C_DigestUpdate: Some(C_DigestUpdate),
            C_DigestKey: Some(C_DigestKey),
            C_DigestFinal: Some(C_DigestFinal),
            C_SignInit: Some(C_SignInit),
            C_Sign: Some(C_Sign),
            C_SignUpdate: Some(C_SignUpdate),
            C_SignFinal: Some(C_SignFinal),
            C_SignRecoverInit: Some(C_SignRecoverInit),
            C_SignRecover: Some(C_SignRecover),
            C_VerifyInit: Some(C_VerifyInit),
            C_Verify: Some(C_Verify),
            C_VerifyUpdate: Some(C_VerifyUpdate),
            C_VerifyFinal: Some(C_VerifyFinal),
            C_VerifyRecoverInit: Some(C_VerifyRecoverInit),
            C_VerifyRecover: Some(C_VerifyRecover),
            C_DigestEncryptUpdate: Some(C_DigestEncryptUpdate),
            C_DecryptDigestUpdate: Some(C_DecryptDigestUpdate),
            C_SignEncryptUpdate: Some(C_SignEncryptUpdate),
            C_DecryptVerifyUpdate: Some(C_DecryptVerifyUpdate),
            C_GenerateKey: Some(C_GenerateKey),
            C_GenerateKeyPair: Some(C_GenerateKeyPair),
            C_WrapKey: Some(C_WrapKey),
            C_UnwrapKey: Some(C_UnwrapKey),
            C_DeriveKey: Some(C_DeriveKey),
            C_SeedRandom: Some(C_SeedRandom),
            C_GenerateRandom: Some(C_GenerateRandom),
            C_GetFunctionStatus: Some(C_GetFunctionStatus),
            C_CancelFunction: Some(C_CancelFunction),
            C_WaitForSlotEvent: Some(C_WaitForSlotEvent),
            $($extra: Some($extra),)*
        }
    };
}

/// The PKCS#11 2.40 function list (C_GetFunctionList).
static FUNCTION_LIST: CK_FUNCTION_LIST = function_list!(CK_FUNCTION_LIST, 2, 40, {});

/// The PKCS#11 3.0 function list (C_GetInterface).
static FUNCTION_LIST_3_0: CK_FUNCTION_LIST_3_0 = function_list!(CK_FUNCTION_LIST_3_0, 3, 0, {
    C_GetInterfaceList, C_GetInterface, C_LoginUser, C_SessionCancel,
    C_MessageEncryptInit, C_EncryptMessage, C_EncryptMessageBegin, C_EncryptMessageNext,
    C_MessageEncryptFinal, C_MessageDecryptInit, C_DecryptMessage, C_DecryptMessageBegin,
    C_DecryptMessageNext, C_MessageDecryptFinal, C_MessageSignInit, C_SignMessage,
    C_SignMessageBegin, C_SignMessageNext, C_MessageSignFinal, C_MessageVerifyInit,
    C_VerifyMessage, C_VerifyMessageBegin, C_VerifyMessageNext, C_MessageVerifyFinal
});

/// The interface name of both lists, NUL-terminated.
static INTERFACE_NAME: &[u8] = b"PKCS 11\0";

/// Our interfaces, 3.0 first (the default).
fn interfaces() -> [CK_INTERFACE; 2] {
    [
        CK_INTERFACE {
            pInterfaceName: INTERFACE_NAME.as_ptr() as *mut CK_UTF8CHAR,
            pFunctionList: &FUNCTION_LIST_3_0 as *const CK_FUNCTION_LIST_3_0 as *mut c_void,
            flags: 0,
        },
        CK_INTERFACE {
            pInterfaceName: INTERFACE_NAME.as_ptr() as *mut CK_UTF8CHAR,
            pFunctionList: &FUNCTION_LIST as *const CK_FUNCTION_LIST as *mut c_void,
            flags: 0,
        },
    ]
}

/// Storage for the interface C_GetInterface hands out: callers keep the pointer.
struct StaticInterfaces([CK_INTERFACE; 2]);
// SAFETY: the pointers inside point to immutable statics; nothing ever writes through them.
unsafe impl Sync for StaticInterfaces {}
// SAFETY: as above; the value is built once and never mutated.
unsafe impl Send for StaticInterfaces {}
static INTERFACES: std::sync::OnceLock<StaticInterfaces> = std::sync::OnceLock::new();

/// `C_GetFunctionList`: the 2.40 list. Callable before C_Initialize.
#[no_mangle]
pub unsafe extern "C" fn C_GetFunctionList(ppFunctionList: *mut *mut CK_FUNCTION_LIST) -> CK_RV {
    entry::guard("C_GetFunctionList", || {
        let list = &FUNCTION_LIST as *const CK_FUNCTION_LIST as *mut CK_FUNCTION_LIST;
        // SAFETY: NULL-checked write of one pointer.
        unsafe { memory::write(ppFunctionList, list) }
    })
}

/// `C_GetInterfaceList` (3.0): our two interfaces, with the length-query rules.
#[no_mangle]
pub unsafe extern "C" fn C_GetInterfaceList(
    pInterfacesList: *mut CK_INTERFACE,
    pulCount: *mut CK_ULONG,
) -> CK_RV {
    entry::guard("C_GetInterfaceList", || {
        let list = interfaces();
        // SAFETY: NULL-checked read of the caller's count.
        let capacity = memory::entries(unsafe { memory::read(pulCount) }?);
        // SAFETY: NULL-checked write of the count.
        unsafe { memory::write(pulCount, list.len() as CK_ULONG) }?;
        if pInterfacesList.is_null() {
            return Ok(());
        }
        // SAFETY: non-NULL, room for `capacity` entries per the caller; compared before copying.
        unsafe { memory::copy_out(pInterfacesList, capacity, &list) }
    })
}

/// `C_GetInterface` (3.0): "PKCS 11" (or NULL) at version 3.0 (default) or 2.40; any other
/// version, 2.x included, is `CKR_ARGUMENTS_BAD` (we offer no list for it).
#[no_mangle]
pub unsafe extern "C" fn C_GetInterface(
    pInterfaceName: *mut CK_UTF8CHAR,
    pVersion: *mut CK_VERSION,
    ppInterface: *mut *mut CK_INTERFACE,
    flags: CK_FLAGS,
) -> CK_RV {
    entry::guard("C_GetInterface", || {
        // Callers (and call tracers) read the pointer even after an error: NULL until found.
        // SAFETY: NULL-checked write of one pointer.
        unsafe { memory::write(ppInterface, std::ptr::null_mut()) }?;
        if !pInterfaceName.is_null() {
            // SAFETY: a non-NULL name is a NUL-terminated string per the spec.
            let name =
                unsafe { std::ffi::CStr::from_ptr(pInterfaceName as *const std::os::raw::c_char) };
            if name.to_bytes() != b"PKCS 11" {
                return Err(CKR_ARGUMENTS_BAD);
            }
        }
        if flags != 0 {
            // We claim no interface flags (e.g. CKF_INTERFACE_FORK_SAFE).
            return Err(CKR_ARGUMENTS_BAD);
        }
        let all = &INTERFACES.get_or_init(|| StaticInterfaces(interfaces())).0;
        let index = if pVersion.is_null() {
            0
        } else {
            // SAFETY: NULL-checked read of the caller's version.
            match unsafe { memory::read(pVersion) }? {
                CK_VERSION { major: 3, minor: 0 } => 0,
                CK_VERSION {
                    major: 2,
                    minor: 40,
                } => 1,
                _ => return Err(CKR_ARGUMENTS_BAD),
            }
        };
        let found = &all[index] as *const CK_INTERFACE as *mut CK_INTERFACE;
        // SAFETY: NULL-checked write; the interface lives in a static.
        unsafe { memory::write(ppInterface, found) }
    })
}
