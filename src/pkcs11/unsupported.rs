//! The PKCS#11 functions we do not offer, as one table. Each answers
//! `CKR_CRYPTOKI_NOT_INITIALIZED` before C_Initialize (like every other entry point) and then
//! `CKR_FUNCTION_NOT_SUPPORTED` (or `CKR_FUNCTION_NOT_PARALLEL` for the legacy parallel-function
//! calls), touching none of its arguments. docs/FEATURES.md lists them.

#![allow(non_snake_case)]

use cryptoki_sys::*;
use std::os::raw::c_void;

use super::entry::guard;
use super::state;

/// One exported function per entry: `name(argument types);`, answering
/// `CKR_FUNCTION_NOT_SUPPORTED` once initialized, or `name(argument types) => CKR_...;`.
macro_rules! not_supported {
    ($($name:ident($($ty:ty),* $(,)?) $(=> $rv:ident)?;)*) => {$(
        not_supported!(@one $name($($ty),*) => [$($rv)? CKR_FUNCTION_NOT_SUPPORTED]);
    )*};
    (@one $name:ident($($ty:ty),*) => [$rv:ident $($default:ident)?]) => {
        #[doc = concat!("`", stringify!($name), "`: not offered; answers `", stringify!($rv), "`.")]
        #[no_mangle]
        pub unsafe extern "C" fn $name($(_: $ty),*) -> CK_RV {
            guard(stringify!($name), || {
                state::token()?;
                Err($rv)
            })
        }
    };
}

not_supported! {
    C_InitToken(CK_SLOT_ID, *mut CK_UTF8CHAR, CK_ULONG, *mut CK_UTF8CHAR);
    C_InitPIN(CK_SESSION_HANDLE, *mut CK_UTF8CHAR, CK_ULONG);
    C_CopyObject(
        CK_SESSION_HANDLE,
        CK_OBJECT_HANDLE,
        *mut CK_ATTRIBUTE,
        CK_ULONG,
        *mut CK_OBJECT_HANDLE,
    );
    C_EncryptInit(CK_SESSION_HANDLE, *mut CK_MECHANISM, CK_OBJECT_HANDLE);
    C_Encrypt(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_EncryptUpdate(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_EncryptFinal(CK_SESSION_HANDLE, *mut CK_BYTE, *mut CK_ULONG);
    C_DecryptInit(CK_SESSION_HANDLE, *mut CK_MECHANISM, CK_OBJECT_HANDLE);
    C_Decrypt(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_DecryptUpdate(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_DecryptFinal(CK_SESSION_HANDLE, *mut CK_BYTE, *mut CK_ULONG);
    C_DigestKey(CK_SESSION_HANDLE, CK_OBJECT_HANDLE);
    C_SignRecoverInit(CK_SESSION_HANDLE, *mut CK_MECHANISM, CK_OBJECT_HANDLE);
    C_SignRecover(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_VerifyRecoverInit(CK_SESSION_HANDLE, *mut CK_MECHANISM, CK_OBJECT_HANDLE);
    C_VerifyRecover(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_DigestEncryptUpdate(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_DecryptDigestUpdate(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_SignEncryptUpdate(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_DecryptVerifyUpdate(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_GenerateKey(
        CK_SESSION_HANDLE,
        *mut CK_MECHANISM,
        *mut CK_ATTRIBUTE,
        CK_ULONG,
        *mut CK_OBJECT_HANDLE,
    );
    C_WrapKey(
        CK_SESSION_HANDLE,
        *mut CK_MECHANISM,
        CK_OBJECT_HANDLE,
        CK_OBJECT_HANDLE,
        *mut CK_BYTE,
        *mut CK_ULONG,
    );
    C_UnwrapKey(
        CK_SESSION_HANDLE,
        *mut CK_MECHANISM,
        CK_OBJECT_HANDLE,
        *mut CK_BYTE,
        CK_ULONG,
        *mut CK_ATTRIBUTE,
        CK_ULONG,
        *mut CK_OBJECT_HANDLE,
    );
    C_DeriveKey(
        CK_SESSION_HANDLE,
        *mut CK_MECHANISM,
        CK_OBJECT_HANDLE,
        *mut CK_ATTRIBUTE,
        CK_ULONG,
        *mut CK_OBJECT_HANDLE,
    );
    C_GetFunctionStatus(CK_SESSION_HANDLE) => CKR_FUNCTION_NOT_PARALLEL;
    C_CancelFunction(CK_SESSION_HANDLE) => CKR_FUNCTION_NOT_PARALLEL;
    C_SessionCancel(CK_SESSION_HANDLE, CK_FLAGS);
    C_MessageEncryptInit(CK_SESSION_HANDLE, *mut CK_MECHANISM, CK_OBJECT_HANDLE);
    C_EncryptMessage(
        CK_SESSION_HANDLE,
        *mut c_void,
        CK_ULONG,
        *mut CK_BYTE,
        CK_ULONG,
        *mut CK_BYTE,
        CK_ULONG,
        *mut CK_BYTE,
        *mut CK_ULONG,
    );
    C_EncryptMessageBegin(CK_SESSION_HANDLE, *mut c_void, CK_ULONG, *mut CK_BYTE, CK_ULONG);
    C_EncryptMessageNext(
        CK_SESSION_HANDLE,
        *mut c_void,
        CK_ULONG,
        *mut CK_BYTE,
        CK_ULONG,
        *mut CK_BYTE,
        *mut CK_ULONG,
        CK_FLAGS,
    );
    C_MessageEncryptFinal(CK_SESSION_HANDLE);
    C_MessageDecryptInit(CK_SESSION_HANDLE, *mut CK_MECHANISM, CK_OBJECT_HANDLE);
    C_DecryptMessage(
        CK_SESSION_HANDLE,
        *mut c_void,
        CK_ULONG,
        *mut CK_BYTE,
        CK_ULONG,
        *mut CK_BYTE,
        CK_ULONG,
        *mut CK_BYTE,
        *mut CK_ULONG,
    );
    C_DecryptMessageBegin(CK_SESSION_HANDLE, *mut c_void, CK_ULONG, *mut CK_BYTE, CK_ULONG);
    C_DecryptMessageNext(
        CK_SESSION_HANDLE,
        *mut c_void,
        CK_ULONG,
        *mut CK_BYTE,
        CK_ULONG,
        *mut CK_BYTE,
        *mut CK_ULONG,
        CK_FLAGS,
    );
    C_MessageDecryptFinal(CK_SESSION_HANDLE);
    C_MessageSignInit(CK_SESSION_HANDLE, *mut CK_MECHANISM, CK_OBJECT_HANDLE);
    C_SignMessage(
        CK_SESSION_HANDLE,
        *mut c_void,
        CK_ULONG,
        *mut CK_BYTE,
        CK_ULONG,
        *mut CK_BYTE,
        *mut CK_ULONG,
    );
    C_SignMessageBegin(CK_SESSION_HANDLE, *mut c_void, CK_ULONG);
    C_SignMessageNext(
        CK_SESSION_HANDLE,
        *mut c_void,
        CK_ULONG,
        *mut CK_BYTE,
        CK_ULONG,
        *mut CK_BYTE,
        *mut CK_ULONG,
    );
    C_MessageSignFinal(CK_SESSION_HANDLE);
    C_MessageVerifyInit(CK_SESSION_HANDLE, *mut CK_MECHANISM, CK_OBJECT_HANDLE);
    C_VerifyMessage(
        CK_SESSION_HANDLE,
        *mut c_void,
        CK_ULONG,
        *mut CK_BYTE,
        CK_ULONG,
        *mut CK_BYTE,
        CK_ULONG,
    );
    C_VerifyMessageBegin(CK_SESSION_HANDLE, *mut c_void, CK_ULONG);
    C_VerifyMessageNext(
        CK_SESSION_HANDLE,
        *mut c_void,
        CK_ULONG,
        *mut CK_BYTE,
        CK_ULONG,
        *mut CK_BYTE,
        CK_ULONG,
    );
    C_MessageVerifyFinal(CK_SESSION_HANDLE);
}
