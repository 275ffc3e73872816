//! The PKCS#11 functions we do not offer. Each answers `CKR_FUNCTION_NOT_SUPPORTED` (or
//! `CKR_FUNCTION_NOT_PARALLEL` for the legacy parallel-function calls) and touches nothing.

#![allow(non_snake_case)]

use cryptoki_sys::*;
use std::os::raw::c_void;

/// `C_InitToken`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_InitToken(
    _: CK_SLOT_ID,
    _: *mut CK_UTF8CHAR,
    _: CK_ULONG,
    _: *mut CK_UTF8CHAR,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_InitPIN`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_InitPIN(
    _: CK_SESSION_HANDLE,
    _: *mut CK_UTF8CHAR,
    _: CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_SetPIN`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_SetPIN(
    _: CK_SESSION_HANDLE,
    _: *mut CK_UTF8CHAR,
    _: CK_ULONG,
    _: *mut CK_UTF8CHAR,
    _: CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_GetOperationState`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_GetOperationState(
    _: CK_SESSION_HANDLE,
    _: *mut CK_BYTE,
    _: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_SetOperationState`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_SetOperationState(
    _: CK_SESSION_HANDLE,
    _: *mut CK_BYTE,
    _: CK_ULONG,
    _: CK_OBJECT_HANDLE,
    _: CK_OBJECT_HANDLE,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_CopyObject`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_CopyObject(
    _: CK_SESSION_HANDLE,
    _: CK_OBJECT_HANDLE,
    _: *mut CK_ATTRIBUTE,
    _: CK_ULONG,
    _: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_EncryptInit`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_EncryptInit(
    _: CK_SESSION_HANDLE,
    _: *mut CK_MECHANISM,
    _: CK_OBJECT_HANDLE,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_Encrypt`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_Encrypt(
    _: CK_SESSION_HANDLE,
    _: *mut CK_BYTE,
    _: CK_ULONG,
    _: *mut CK_BYTE,
    _: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_EncryptUpdate`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_EncryptUpdate(
    _: CK_SESSION_HANDLE,
    _: *mut CK_BYTE,
    _: CK_ULONG,
    _: *mut CK_BYTE,
    _: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_EncryptFinal`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_EncryptFinal(
    _: CK_SESSION_HANDLE,
    _: *mut CK_BYTE,
    _: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_DecryptInit`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_DecryptInit(
    _: CK_SESSION_HANDLE,
    _: *mut CK_MECHANISM,
    _: CK_OBJECT_HANDLE,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_Decrypt`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_Decrypt(
    _: CK_SESSION_HANDLE,
    _: *mut CK_BYTE,
    _: CK_ULONG,
    _: *mut CK_BYTE,
    _: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_DecryptUpdate`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_DecryptUpdate(
    _: CK_SESSION_HANDLE,
    _: *mut CK_BYTE,
    _: CK_ULONG,
    _: *mut CK_BYTE,
    _: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_DecryptFinal`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_DecryptFinal(
    _: CK_SESSION_HANDLE,
    _: *mut CK_BYTE,
    _: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_DigestKey`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_DigestKey(_: CK_SESSION_HANDLE, _: CK_OBJECT_HANDLE) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_SignRecoverInit`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_SignRecoverInit(
    _: CK_SESSION_HANDLE,
    _: *mut CK_MECHANISM,
    _: CK_OBJECT_HANDLE,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_SignRecover`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_SignRecover(
    _: CK_SESSION_HANDLE,
    _: *mut CK_BYTE,
    _: CK_ULONG,
    _: *mut CK_BYTE,
    _: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_VerifyRecoverInit`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_VerifyRecoverInit(
    _: CK_SESSION_HANDLE,
    _: *mut CK_MECHANISM,
    _: CK_OBJECT_HANDLE,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_VerifyRecover`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_VerifyRecover(
    _: CK_SESSION_HANDLE,
    _: *mut CK_BYTE,
    _: CK_ULONG,
    _: *mut CK_BYTE,
    _: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_DigestEncryptUpdate`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_DigestEncryptUpdate(
    _: CK_SESSION_HANDLE,
    _: *mut CK_BYTE,
    _: CK_ULONG,
    _: *mut CK_BYTE,
    _: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_DecryptDigestUpdate`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_DecryptDigestUpdate(
    _: CK_SESSION_HANDLE,
    _: *mut CK_BYTE,
    _: CK_ULONG,
    _: *mut CK_BYTE,
    _: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_SignEncryptUpdate`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_SignEncryptUpdate(
    _: CK_SESSION_HANDLE,
    _: *mut CK_BYTE,
    _: CK_ULONG,
    _: *mut CK_BYTE,
    _: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_DecryptVerifyUpdate`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_DecryptVerifyUpdate(
    _: CK_SESSION_HANDLE,
    _: *mut CK_BYTE,
    _: CK_ULONG,
    _: *mut CK_BYTE,
    _: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_GenerateKey`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_GenerateKey(
    _: CK_SESSION_HANDLE,
    _: *mut CK_MECHANISM,
    _: *mut CK_ATTRIBUTE,
    _: CK_ULONG,
    _: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_WrapKey`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_WrapKey(
    _: CK_SESSION_HANDLE,
    _: *mut CK_MECHANISM,
    _: CK_OBJECT_HANDLE,
    _: CK_OBJECT_HANDLE,
    _: *mut CK_BYTE,
    _: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_UnwrapKey`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_UnwrapKey(
    _: CK_SESSION_HANDLE,
    _: *mut CK_MECHANISM,
    _: CK_OBJECT_HANDLE,
    _: *mut CK_BYTE,
    _: CK_ULONG,
    _: *mut CK_ATTRIBUTE,
    _: CK_ULONG,
    _: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_DeriveKey`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_DeriveKey(
    _: CK_SESSION_HANDLE,
    _: *mut CK_MECHANISM,
    _: CK_OBJECT_HANDLE,
    _: *mut CK_ATTRIBUTE,
    _: CK_ULONG,
    _: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_GetFunctionStatus`: not offered; answers `CKR_FUNCTION_NOT_PARALLEL`.
#[no_mangle]
pub unsafe extern "C" fn C_GetFunctionStatus(_: CK_SESSION_HANDLE) -> CK_RV {
    CKR_FUNCTION_NOT_PARALLEL
}

/// `C_CancelFunction`: not offered; answers `CKR_FUNCTION_NOT_PARALLEL`.
#[no_mangle]
pub unsafe extern "C" fn C_CancelFunction(_: CK_SESSION_HANDLE) -> CK_RV {
    CKR_FUNCTION_NOT_PARALLEL
}

/// `C_SessionCancel`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_SessionCancel(_: CK_SESSION_HANDLE, _: CK_FLAGS) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_MessageEncryptInit`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_MessageEncryptInit(
    _: CK_SESSION_HANDLE,
    _: *mut CK_MECHANISM,
    _: CK_OBJECT_HANDLE,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_EncryptMessage`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_EncryptMessage(
    _: CK_SESSION_HANDLE,
    _: *mut c_void,
    _: CK_ULONG,
    _: *mut CK_BYTE,
    _: CK_ULONG,
    _: *mut CK_BYTE,
    _: CK_ULONG,
    _: *mut CK_BYTE,
    _: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_EncryptMessageBegin`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_EncryptMessageBegin(
    _: CK_SESSION_HANDLE,
    _: *mut c_void,
    _: CK_ULONG,
    _: *mut CK_BYTE,
    _: CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_EncryptMessageNext`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_EncryptMessageNext(
    _: CK_SESSION_HANDLE,
    _: *mut c_void,
    _: CK_ULONG,
    _: *mut CK_BYTE,
    _: CK_ULONG,
    _: *mut CK_BYTE,
    _: *mut CK_ULONG,
    _: CK_FLAGS,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_MessageEncryptFinal`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_MessageEncryptFinal(_: CK_SESSION_HANDLE) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_MessageDecryptInit`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_MessageDecryptInit(
    _: CK_SESSION_HANDLE,
    _: *mut CK_MECHANISM,
    _: CK_OBJECT_HANDLE,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_DecryptMessage`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_DecryptMessage(
    _: CK_SESSION_HANDLE,
    _: *mut c_void,
    _: CK_ULONG,
    _: *mut CK_BYTE,
    _: CK_ULONG,
    _: *mut CK_BYTE,
    _: CK_ULONG,
    _: *mut CK_BYTE,
    _: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_DecryptMessageBegin`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_DecryptMessageBegin(
    _: CK_SESSION_HANDLE,
    _: *mut c_void,
    _: CK_ULONG,
    _: *mut CK_BYTE,
    _: CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_DecryptMessageNext`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_DecryptMessageNext(
    _: CK_SESSION_HANDLE,
    _: *mut c_void,
    _: CK_ULONG,
    _: *mut CK_BYTE,
    _: CK_ULONG,
    _: *mut CK_BYTE,
    _: *mut CK_ULONG,
    _: CK_FLAGS,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_MessageDecryptFinal`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_MessageDecryptFinal(_: CK_SESSION_HANDLE) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_MessageSignInit`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_MessageSignInit(
    _: CK_SESSION_HANDLE,
    _: *mut CK_MECHANISM,
    _: CK_OBJECT_HANDLE,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_SignMessage`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_SignMessage(
    _: CK_SESSION_HANDLE,
    _: *mut c_void,
    _: CK_ULONG,
    _: *mut CK_BYTE,
    _: CK_ULONG,
    _: *mut CK_BYTE,
    _: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_SignMessageBegin`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_SignMessageBegin(
    _: CK_SESSION_HANDLE,
    _: *mut c_void,
    _: CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_SignMessageNext`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_SignMessageNext(
    _: CK_SESSION_HANDLE,
    _: *mut c_void,
    _: CK_ULONG,
    _: *mut CK_BYTE,
    _: CK_ULONG,
    _: *mut CK_BYTE,
    _: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_MessageSignFinal`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_MessageSignFinal(_: CK_SESSION_HANDLE) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_MessageVerifyInit`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_MessageVerifyInit(
    _: CK_SESSION_HANDLE,
    _: *mut CK_MECHANISM,
    _: CK_OBJECT_HANDLE,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_VerifyMessage`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_VerifyMessage(
    _: CK_SESSION_HANDLE,
    _: *mut c_void,
    _: CK_ULONG,
    _: *mut CK_BYTE,
    _: CK_ULONG,
    _: *mut CK_BYTE,
    _: CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_VerifyMessageBegin`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_VerifyMessageBegin(
    _: CK_SESSION_HANDLE,
    _: *mut c_void,
    _: CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_VerifyMessageNext`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_VerifyMessageNext(
    _: CK_SESSION_HANDLE,
    _: *mut c_void,
    _: CK_ULONG,
    _: *mut CK_BYTE,
    _: CK_ULONG,
    _: *mut CK_BYTE,
    _: CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_MessageVerifyFinal`: not offered; answers `CKR_FUNCTION_NOT_SUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn C_MessageVerifyFinal(_: CK_SESSION_HANDLE) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}
