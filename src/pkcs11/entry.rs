//! The PKCS#11 functions we implement. Each is a thin shim: it catches panics, checks the
//! caller's pointers through `memory`, and calls the token.

#![allow(non_snake_case)]

use std::os::raw::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

use cryptoki_sys::*;

use super::memory::{self, pad, AbiResult};
use super::state;
use crate::token::attributes::CK_UNAVAILABLE_INFORMATION;
use crate::token::object::Lookup;
use crate::token::{self, Operation, Token};

/// Runs an entry point's body: a panic becomes `CKR_GENERAL_ERROR`, never an unwind into C.
fn guard(name: &str, body: impl FnOnce() -> AbiResult<()>) -> CK_RV {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => CKR_OK,
        Ok(Err(rv)) => rv,
        Err(_) => {
            log::error!("{name}: internal error (panic caught at the ABI)");
            CKR_GENERAL_ERROR
        }
    }
}

/// Runs a body that needs the token.
fn with_token(name: &str, body: impl FnOnce(&Token) -> AbiResult<()>) -> CK_RV {
    guard(name, || body(&*state::token()?))
}

/// Runs the body of a call that belongs to a running operation: when the call fails in a way
/// that must end the operation (anything but `CKR_BUFFER_TOO_SMALL`) before the token saw it,
/// the operation is ended here.
fn with_operation(
    name: &str,
    session: CK_SESSION_HANDLE,
    op: Operation,
    body: impl FnOnce(&Token) -> AbiResult<()>,
) -> CK_RV {
    with_token(name, |t| {
        let r = body(t);
        if matches!(r, Err(rv) if rv == CKR_ARGUMENTS_BAD) {
            t.end_operation(session, op);
        }
        r
    })
}

/// A token error as the CK_RV the caller gets.
fn rv<T>(r: token::Result<T>) -> AbiResult<T> {
    r.map_err(|e| e.rv)
}

/// Runs a call that writes a variable-length result into `(out, out_len)` following the
/// length-query rules: NULL `out` asks for the length; a short buffer gets the length and
/// `CKR_BUFFER_TOO_SMALL`.
///
/// # Safety
/// `out` must be NULL or point to `*out_len` writable bytes; `out_len` must be NULL or writable.
unsafe fn variable_output(
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
    call: impl FnOnce(Option<&mut [u8]>) -> token::Result<usize>,
) -> AbiResult<()> {
    // SAFETY: forwarded contract.
    let capacity = unsafe { memory::read(out_len) }?;
    let buf = if out.is_null() {
        None
    } else {
        // SAFETY: forwarded contract.
        Some(unsafe { memory::output(out, capacity) }?)
    };
    match call(buf) {
        Ok(n) => {
            // SAFETY: checked readable above, writable per contract.
            unsafe { memory::write(out_len, n as CK_ULONG) }
        }
        Err(e) => {
            if let Some(n) = e.needed {
                // SAFETY: as above.
                unsafe { memory::write(out_len, n as CK_ULONG) }?;
            }
            Err(e.rv)
        }
    }
}

fn version(v: (u8, u8)) -> CK_VERSION {
    CK_VERSION {
        major: v.0,
        minor: v.1,
    }
}

/// `C_Initialize`: the four locking cases; `pReserved` must be NULL.
#[no_mangle]
pub unsafe extern "C" fn C_Initialize(pInitArgs: *mut c_void) -> CK_RV {
    guard("C_Initialize", || {
        crate::logging::init();
        if !pInitArgs.is_null() {
            // SAFETY: non-NULL; the caller passes a CK_C_INITIALIZE_ARGS.
            let args = unsafe { memory::read(pInitArgs as *const CK_C_INITIALIZE_ARGS) }?;
            if !args.pReserved.is_null() {
                return Err(CKR_ARGUMENTS_BAD);
            }
            let set = [
                args.CreateMutex.is_some(),
                args.DestroyMutex.is_some(),
                args.LockMutex.is_some(),
                args.UnlockMutex.is_some(),
            ];
            // Either all four mutex functions or none. With them, we still lock with the OS
            // primitives, which any caller that passes mutex functions can live with: our locks
            // never block on anything the application holds.
            if set.iter().any(|s| *s) && !set.iter().all(|s| *s) {
                return Err(CKR_ARGUMENTS_BAD);
            }
        }
        state::initialize()
    })
}

/// `C_Finalize`: `pReserved` must be NULL.
#[no_mangle]
pub unsafe extern "C" fn C_Finalize(pReserved: *mut c_void) -> CK_RV {
    guard("C_Finalize", || {
        if !pReserved.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        state::finalize()
    })
}

/// `C_GetInfo`.
#[no_mangle]
pub unsafe extern "C" fn C_GetInfo(pInfo: *mut CK_INFO) -> CK_RV {
    with_token("C_GetInfo", |_| {
        let mut info = CK_INFO {
            cryptokiVersion: version((3, 0)),
            libraryVersion: version(token::VERSION),
            ..Default::default()
        };
        pad(
            &mut info.manufacturerID,
            crate::vendor::DEVICEKEY_MANUFACTURER,
        );
        pad(&mut info.libraryDescription, "devicekey PKCS#11 module");
        // SAFETY: pInfo is NULL-checked by `write` and points to a CK_INFO per the spec.
        unsafe { memory::write(pInfo, info) }
    })
}

/// `C_GetSlotList`, with the length-query rules.
#[no_mangle]
pub unsafe extern "C" fn C_GetSlotList(
    tokenPresent: CK_BBOOL,
    pSlotList: *mut CK_SLOT_ID,
    pulCount: *mut CK_ULONG,
) -> CK_RV {
    with_token("C_GetSlotList", |t| {
        let slots = t.slot_list(tokenPresent != CK_FALSE);
        // SAFETY: NULL-checked read of the caller's count.
        let capacity = unsafe { memory::read(pulCount) }? as usize;
        // SAFETY: NULL-checked write of the count.
        unsafe { memory::write(pulCount, slots.len() as CK_ULONG) }?;
        if pSlotList.is_null() {
            return Ok(());
        }
        if capacity < slots.len() {
            return Err(CKR_BUFFER_TOO_SMALL);
        }
        // SAFETY: non-NULL, and the caller promised `capacity` >= slots.len() entries.
        let out = unsafe { std::slice::from_raw_parts_mut(pSlotList, slots.len()) };
        out.copy_from_slice(&slots);
        Ok(())
    })
}

/// `C_GetSlotInfo`.
#[no_mangle]
pub unsafe extern "C" fn C_GetSlotInfo(slotID: CK_SLOT_ID, pInfo: *mut CK_SLOT_INFO) -> CK_RV {
    with_token("C_GetSlotInfo", |t| {
        let s = rv(t.slot_info(slotID))?;
        let mut info = CK_SLOT_INFO {
            flags: s.flags,
            hardwareVersion: version(token::VERSION),
            firmwareVersion: version(token::VERSION),
            ..Default::default()
        };
        pad(&mut info.slotDescription, &s.description);
        pad(
            &mut info.manufacturerID,
            crate::vendor::DEVICEKEY_MANUFACTURER,
        );
        // SAFETY: NULL-checked write of a CK_SLOT_INFO.
        unsafe { memory::write(pInfo, info) }
    })
}

/// `C_GetTokenInfo`.
#[no_mangle]
pub unsafe extern "C" fn C_GetTokenInfo(slotID: CK_SLOT_ID, pInfo: *mut CK_TOKEN_INFO) -> CK_RV {
    with_token("C_GetTokenInfo", |t| {
        let ti = rv(t.token_info(slotID))?;
        let mut info = CK_TOKEN_INFO {
            flags: ti.flags,
            ulMaxSessionCount: CK_EFFECTIVELY_INFINITE,
            ulSessionCount: ti.session_count as CK_ULONG,
            ulMaxRwSessionCount: CK_EFFECTIVELY_INFINITE,
            ulRwSessionCount: ti.rw_session_count as CK_ULONG,
            ulMaxPinLen: 255,
            ulMinPinLen: 0,
            ulTotalPublicMemory: CK_UNAVAILABLE_INFORMATION,
            ulFreePublicMemory: CK_UNAVAILABLE_INFORMATION,
            ulTotalPrivateMemory: CK_UNAVAILABLE_INFORMATION,
            ulFreePrivateMemory: CK_UNAVAILABLE_INFORMATION,
            hardwareVersion: version(token::VERSION),
            firmwareVersion: version(token::VERSION),
            ..Default::default()
        };
        pad(&mut info.label, &ti.label);
        pad(&mut info.manufacturerID, &ti.manufacturer);
        pad(&mut info.model, &ti.model);
        pad(&mut info.serialNumber, &ti.serial);
        pad(&mut info.utcTime, "");
        // SAFETY: NULL-checked write of a CK_TOKEN_INFO.
        unsafe { memory::write(pInfo, info) }
    })
}

/// `C_GetMechanismList`, with the length-query rules.
#[no_mangle]
pub unsafe extern "C" fn C_GetMechanismList(
    slotID: CK_SLOT_ID,
    pMechanismList: *mut CK_MECHANISM_TYPE,
    pulCount: *mut CK_ULONG,
) -> CK_RV {
    with_token("C_GetMechanismList", |t| {
        let mechs = rv(t.mechanisms(slotID))?;
        // SAFETY: NULL-checked read of the caller's count.
        let capacity = unsafe { memory::read(pulCount) }? as usize;
        // SAFETY: NULL-checked write.
        unsafe { memory::write(pulCount, mechs.len() as CK_ULONG) }?;
        if pMechanismList.is_null() {
            return Ok(());
        }
        if capacity < mechs.len() {
            return Err(CKR_BUFFER_TOO_SMALL);
        }
        // SAFETY: non-NULL, room for `capacity` >= mechs.len() entries per the caller.
        let out = unsafe { std::slice::from_raw_parts_mut(pMechanismList, mechs.len()) };
        out.copy_from_slice(mechs);
        Ok(())
    })
}

/// `C_GetMechanismInfo`.
#[no_mangle]
pub unsafe extern "C" fn C_GetMechanismInfo(
    slotID: CK_SLOT_ID,
    type_: CK_MECHANISM_TYPE,
    pInfo: *mut CK_MECHANISM_INFO,
) -> CK_RV {
    with_token("C_GetMechanismInfo", |t| {
        let info = rv(t.mechanism_info(slotID, type_))?;
        // SAFETY: NULL-checked write.
        unsafe { memory::write(pInfo, info) }
    })
}

/// `C_OpenSession`; notification callbacks are accepted and never called.
#[no_mangle]
pub unsafe extern "C" fn C_OpenSession(
    slotID: CK_SLOT_ID,
    flags: CK_FLAGS,
    _pApplication: *mut c_void,
    _Notify: CK_NOTIFY,
    phSession: *mut CK_SESSION_HANDLE,
) -> CK_RV {
    with_token("C_OpenSession", |t| {
        if phSession.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let h = rv(t.open_session(slotID, flags))?;
        // SAFETY: NULL-checked write.
        unsafe { memory::write(phSession, h) }
    })
}

/// `C_CloseSession`.
#[no_mangle]
pub unsafe extern "C" fn C_CloseSession(hSession: CK_SESSION_HANDLE) -> CK_RV {
    with_token("C_CloseSession", |t| rv(t.close_session(hSession)))
}

/// `C_CloseAllSessions`.
#[no_mangle]
pub unsafe extern "C" fn C_CloseAllSessions(slotID: CK_SLOT_ID) -> CK_RV {
    with_token("C_CloseAllSessions", |t| rv(t.close_all_sessions(slotID)))
}

/// `C_GetSessionInfo`.
#[no_mangle]
pub unsafe extern "C" fn C_GetSessionInfo(
    hSession: CK_SESSION_HANDLE,
    pInfo: *mut CK_SESSION_INFO,
) -> CK_RV {
    with_token("C_GetSessionInfo", |t| {
        let s = rv(t.session_info(hSession))?;
        let info = CK_SESSION_INFO {
            slotID: s.slot,
            state: s.state,
            flags: s.flags,
            ulDeviceError: 0,
        };
        // SAFETY: NULL-checked write.
        unsafe { memory::write(pInfo, info) }
    })
}

/// `C_Login`.
#[no_mangle]
pub unsafe extern "C" fn C_Login(
    hSession: CK_SESSION_HANDLE,
    userType: CK_USER_TYPE,
    pPin: *mut CK_UTF8CHAR,
    ulPinLen: CK_ULONG,
) -> CK_RV {
    with_token("C_Login", |t| {
        // SAFETY: NULL (with length 0) or `ulPinLen` readable bytes per the caller.
        let pin = unsafe { memory::input(pPin, ulPinLen) }?;
        rv(t.login(hSession, userType, pin))
    })
}

/// `C_LoginUser` (PKCS#11 3.0): as C_Login; the user name is not used.
#[no_mangle]
pub unsafe extern "C" fn C_LoginUser(
    hSession: CK_SESSION_HANDLE,
    userType: CK_USER_TYPE,
    pPin: *mut CK_UTF8CHAR,
    ulPinLen: CK_ULONG,
    _pUsername: *mut CK_UTF8CHAR,
    _ulUsernameLen: CK_ULONG,
) -> CK_RV {
    // SAFETY: same contract as C_Login.
    unsafe { C_Login(hSession, userType, pPin, ulPinLen) }
}

/// `C_Logout`.
#[no_mangle]
pub unsafe extern "C" fn C_Logout(hSession: CK_SESSION_HANDLE) -> CK_RV {
    with_token("C_Logout", |t| rv(t.logout(hSession)))
}

/// `C_CreateObject`: certificates and data objects.
#[no_mangle]
pub unsafe extern "C" fn C_CreateObject(
    hSession: CK_SESSION_HANDLE,
    pTemplate: *mut CK_ATTRIBUTE,
    ulCount: CK_ULONG,
    phObject: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    with_token("C_CreateObject", |t| {
        if phObject.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: the caller passes `ulCount` readable attributes.
        let template = unsafe { memory::template(pTemplate, ulCount) }?;
        let h = rv(t.create_object(hSession, &template))?;
        // SAFETY: NULL-checked write.
        unsafe { memory::write(phObject, h) }
    })
}

/// `C_DestroyObject`.
#[no_mangle]
pub unsafe extern "C" fn C_DestroyObject(
    hSession: CK_SESSION_HANDLE,
    hObject: CK_OBJECT_HANDLE,
) -> CK_RV {
    with_token("C_DestroyObject", |t| {
        rv(t.destroy_object(hSession, hObject))
    })
}

/// `C_GetObjectSize`: the total size of the object's attribute values.
#[no_mangle]
pub unsafe extern "C" fn C_GetObjectSize(
    hSession: CK_SESSION_HANDLE,
    hObject: CK_OBJECT_HANDLE,
    pulSize: *mut CK_ULONG,
) -> CK_RV {
    with_token("C_GetObjectSize", |t| {
        let n = rv(t.object_size(hSession, hObject))?;
        // SAFETY: NULL-checked write.
        unsafe { memory::write(pulSize, n as CK_ULONG) }
    })
}

/// `C_GetAttributeValue`: every template entry is processed; the return value reports the
/// first problem (sensitive, unknown type, or buffer too small).
#[no_mangle]
pub unsafe extern "C" fn C_GetAttributeValue(
    hSession: CK_SESSION_HANDLE,
    hObject: CK_OBJECT_HANDLE,
    pTemplate: *mut CK_ATTRIBUTE,
    ulCount: CK_ULONG,
) -> CK_RV {
    with_token("C_GetAttributeValue", |t| {
        let obj = rv(t.get_object(hSession, hObject))?;
        // SAFETY: the caller passes `ulCount` writable attributes.
        let attrs = unsafe { memory::attributes_mut(pTemplate, ulCount) }?;
        let mut result = CKR_OK;
        let mut note = |rv: CK_RV| {
            if result == CKR_OK {
                result = rv;
            }
        };
        for a in attrs.iter_mut() {
            match obj.lookup(a.type_) {
                Lookup::Value(v) => {
                    if a.pValue.is_null() {
                        a.ulValueLen = v.len() as CK_ULONG;
                    } else if (a.ulValueLen as usize) < v.len() {
                        a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                        note(CKR_BUFFER_TOO_SMALL);
                    } else {
                        // SAFETY: non-NULL, and the caller promised `ulValueLen` >= v.len() bytes.
                        let out =
                            unsafe { std::slice::from_raw_parts_mut(a.pValue as *mut u8, v.len()) };
                        out.copy_from_slice(v);
                        a.ulValueLen = v.len() as CK_ULONG;
                    }
                }
                Lookup::Sensitive => {
                    a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                    note(CKR_ATTRIBUTE_SENSITIVE);
                }
                Lookup::Invalid => {
                    a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                    note(CKR_ATTRIBUTE_TYPE_INVALID);
                }
            }
        }
        match result {
            CKR_OK => Ok(()),
            rv => Err(rv),
        }
    })
}

/// `C_SetAttributeValue`: CKA_LABEL and CKA_ID.
#[no_mangle]
pub unsafe extern "C" fn C_SetAttributeValue(
    hSession: CK_SESSION_HANDLE,
    hObject: CK_OBJECT_HANDLE,
    pTemplate: *mut CK_ATTRIBUTE,
    ulCount: CK_ULONG,
) -> CK_RV {
    with_token("C_SetAttributeValue", |t| {
        // SAFETY: the caller passes `ulCount` readable attributes.
        let template = unsafe { memory::template(pTemplate, ulCount) }?;
        rv(t.set_attributes(hSession, hObject, &template))
    })
}

/// `C_FindObjectsInit`.
#[no_mangle]
pub unsafe extern "C" fn C_FindObjectsInit(
    hSession: CK_SESSION_HANDLE,
    pTemplate: *mut CK_ATTRIBUTE,
    ulCount: CK_ULONG,
) -> CK_RV {
    with_token("C_FindObjectsInit", |t| {
        // SAFETY: the caller passes `ulCount` readable attributes.
        let template = unsafe { memory::template(pTemplate, ulCount) }?;
        rv(t.find_init(hSession, &template))
    })
}

/// `C_FindObjects`.
#[no_mangle]
pub unsafe extern "C" fn C_FindObjects(
    hSession: CK_SESSION_HANDLE,
    phObject: *mut CK_OBJECT_HANDLE,
    ulMaxObjectCount: CK_ULONG,
    pulObjectCount: *mut CK_ULONG,
) -> CK_RV {
    with_token("C_FindObjects", |t| {
        if pulObjectCount.is_null() || (phObject.is_null() && ulMaxObjectCount > 0) {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let found = rv(t.find(hSession, ulMaxObjectCount as usize))?;
        if !found.is_empty() {
            // SAFETY: non-NULL, room for `ulMaxObjectCount` >= found.len() handles.
            let out = unsafe { std::slice::from_raw_parts_mut(phObject, found.len()) };
            out.copy_from_slice(&found);
        }
        // SAFETY: NULL-checked above.
        unsafe { memory::write(pulObjectCount, found.len() as CK_ULONG) }
    })
}

/// `C_FindObjectsFinal`.
#[no_mangle]
pub unsafe extern "C" fn C_FindObjectsFinal(hSession: CK_SESSION_HANDLE) -> CK_RV {
    with_token("C_FindObjectsFinal", |t| rv(t.find_final(hSession)))
}

/// `C_GenerateKeyPair`: CKM_EC_KEY_PAIR_GEN on P-256.
#[no_mangle]
pub unsafe extern "C" fn C_GenerateKeyPair(
    hSession: CK_SESSION_HANDLE,
    pMechanism: *mut CK_MECHANISM,
    pPublicKeyTemplate: *mut CK_ATTRIBUTE,
    ulPublicKeyAttributeCount: CK_ULONG,
    pPrivateKeyTemplate: *mut CK_ATTRIBUTE,
    ulPrivateKeyAttributeCount: CK_ULONG,
    phPublicKey: *mut CK_OBJECT_HANDLE,
    phPrivateKey: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    with_token("C_GenerateKeyPair", |t| {
        if phPublicKey.is_null() || phPrivateKey.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: NULL-checked read of a CK_MECHANISM.
        let mech = unsafe { memory::mechanism(pMechanism) }?;
        // SAFETY: the caller passes the stated numbers of readable attributes.
        let public = unsafe { memory::template(pPublicKeyTemplate, ulPublicKeyAttributeCount) }?;
        // SAFETY: as above.
        let private = unsafe { memory::template(pPrivateKeyTemplate, ulPrivateKeyAttributeCount) }?;
        let (pub_h, priv_h) = rv(t.generate_key_pair(hSession, mech, &public, &private))?;
        // SAFETY: both NULL-checked above.
        unsafe {
            memory::write(phPublicKey, pub_h)?;
            memory::write(phPrivateKey, priv_h)
        }
    })
}

/// `C_SignInit`.
#[no_mangle]
pub unsafe extern "C" fn C_SignInit(
    hSession: CK_SESSION_HANDLE,
    pMechanism: *mut CK_MECHANISM,
    hKey: CK_OBJECT_HANDLE,
) -> CK_RV {
    with_token("C_SignInit", |t| {
        // SAFETY: NULL-checked read of a CK_MECHANISM.
        let mech = unsafe { memory::mechanism(pMechanism) }?;
        rv(t.sign_init(hSession, mech, hKey))
    })
}

/// `C_Sign`: a NULL signature buffer asks for the length (64) and keeps the operation.
#[no_mangle]
pub unsafe extern "C" fn C_Sign(
    hSession: CK_SESSION_HANDLE,
    pData: *mut CK_BYTE,
    ulDataLen: CK_ULONG,
    pSignature: *mut CK_BYTE,
    pulSignatureLen: *mut CK_ULONG,
) -> CK_RV {
    with_operation("C_Sign", hSession, Operation::Sign, |t| {
        // SAFETY: `ulDataLen` readable bytes per the caller.
        let data = unsafe { memory::input(pData, ulDataLen) }?;
        // SAFETY: forwarded output contract.
        unsafe {
            variable_output(pSignature, pulSignatureLen, |out| {
                t.sign(hSession, data, out)
            })
        }
    })
}

/// `C_SignUpdate`.
#[no_mangle]
pub unsafe extern "C" fn C_SignUpdate(
    hSession: CK_SESSION_HANDLE,
    pPart: *mut CK_BYTE,
    ulPartLen: CK_ULONG,
) -> CK_RV {
    with_operation("C_SignUpdate", hSession, Operation::Sign, |t| {
        // SAFETY: `ulPartLen` readable bytes per the caller.
        let data = unsafe { memory::input(pPart, ulPartLen) }?;
        rv(t.sign_update(hSession, data))
    })
}

/// `C_SignFinal`: a NULL signature buffer asks for the length and keeps the operation.
#[no_mangle]
pub unsafe extern "C" fn C_SignFinal(
    hSession: CK_SESSION_HANDLE,
    pSignature: *mut CK_BYTE,
    pulSignatureLen: *mut CK_ULONG,
) -> CK_RV {
    with_operation("C_SignFinal", hSession, Operation::Sign, |t| {
        // SAFETY: forwarded output contract.
        unsafe {
            variable_output(pSignature, pulSignatureLen, |out| {
                t.sign_final(hSession, out)
            })
        }
    })
}

/// `C_VerifyInit`.
#[no_mangle]
pub unsafe extern "C" fn C_VerifyInit(
    hSession: CK_SESSION_HANDLE,
    pMechanism: *mut CK_MECHANISM,
    hKey: CK_OBJECT_HANDLE,
) -> CK_RV {
    with_token("C_VerifyInit", |t| {
        // SAFETY: NULL-checked read of a CK_MECHANISM.
        let mech = unsafe { memory::mechanism(pMechanism) }?;
        rv(t.verify_init(hSession, mech, hKey))
    })
}

/// `C_Verify`.
#[no_mangle]
pub unsafe extern "C" fn C_Verify(
    hSession: CK_SESSION_HANDLE,
    pData: *mut CK_BYTE,
    ulDataLen: CK_ULONG,
    pSignature: *mut CK_BYTE,
    ulSignatureLen: CK_ULONG,
) -> CK_RV {
    with_operation("C_Verify", hSession, Operation::Verify, |t| {
        // SAFETY: readable input buffers per the caller.
        let (data, sig) = unsafe {
            (
                memory::input(pData, ulDataLen)?,
                memory::input(pSignature, ulSignatureLen)?,
            )
        };
        rv(t.verify(hSession, data, sig))
    })
}

/// `C_VerifyUpdate`.
#[no_mangle]
pub unsafe extern "C" fn C_VerifyUpdate(
    hSession: CK_SESSION_HANDLE,
    pPart: *mut CK_BYTE,
    ulPartLen: CK_ULONG,
) -> CK_RV {
    with_operation("C_VerifyUpdate", hSession, Operation::Verify, |t| {
        // SAFETY: `ulPartLen` readable bytes per the caller.
        let data = unsafe { memory::input(pPart, ulPartLen) }?;
        rv(t.verify_update(hSession, data))
    })
}

/// `C_VerifyFinal`.
#[no_mangle]
pub unsafe extern "C" fn C_VerifyFinal(
    hSession: CK_SESSION_HANDLE,
    pSignature: *mut CK_BYTE,
    ulSignatureLen: CK_ULONG,
) -> CK_RV {
    with_operation("C_VerifyFinal", hSession, Operation::Verify, |t| {
        // SAFETY: `ulSignatureLen` readable bytes per the caller.
        let sig = unsafe { memory::input(pSignature, ulSignatureLen) }?;
        rv(t.verify_final(hSession, sig))
    })
}

/// `C_DigestInit`.
#[no_mangle]
pub unsafe extern "C" fn C_DigestInit(
    hSession: CK_SESSION_HANDLE,
    pMechanism: *mut CK_MECHANISM,
) -> CK_RV {
    with_token("C_DigestInit", |t| {
        // SAFETY: NULL-checked read of a CK_MECHANISM.
        let mech = unsafe { memory::mechanism(pMechanism) }?;
        rv(t.digest_init(hSession, mech))
    })
}

/// `C_Digest`: a NULL output asks for the length and keeps the operation.
#[no_mangle]
pub unsafe extern "C" fn C_Digest(
    hSession: CK_SESSION_HANDLE,
    pData: *mut CK_BYTE,
    ulDataLen: CK_ULONG,
    pDigest: *mut CK_BYTE,
    pulDigestLen: *mut CK_ULONG,
) -> CK_RV {
    with_operation("C_Digest", hSession, Operation::Digest, |t| {
        // SAFETY: `ulDataLen` readable bytes per the caller.
        let data = unsafe { memory::input(pData, ulDataLen) }?;
        // SAFETY: forwarded output contract.
        unsafe { variable_output(pDigest, pulDigestLen, |out| t.digest(hSession, data, out)) }
    })
}

/// `C_DigestUpdate`.
#[no_mangle]
pub unsafe extern "C" fn C_DigestUpdate(
    hSession: CK_SESSION_HANDLE,
    pPart: *mut CK_BYTE,
    ulPartLen: CK_ULONG,
) -> CK_RV {
    with_operation("C_DigestUpdate", hSession, Operation::Digest, |t| {
        // SAFETY: `ulPartLen` readable bytes per the caller.
        let data = unsafe { memory::input(pPart, ulPartLen) }?;
        rv(t.digest_update(hSession, data))
    })
}

/// `C_DigestFinal`: a NULL output asks for the length and keeps the operation.
#[no_mangle]
pub unsafe extern "C" fn C_DigestFinal(
    hSession: CK_SESSION_HANDLE,
    pDigest: *mut CK_BYTE,
    pulDigestLen: *mut CK_ULONG,
) -> CK_RV {
    with_operation("C_DigestFinal", hSession, Operation::Digest, |t| {
        // SAFETY: forwarded output contract.
        unsafe { variable_output(pDigest, pulDigestLen, |out| t.digest_final(hSession, out)) }
    })
}

/// `C_SeedRandom`: the OS generator takes no seed (`CKR_RANDOM_SEED_NOT_SUPPORTED`).
#[no_mangle]
pub unsafe extern "C" fn C_SeedRandom(
    hSession: CK_SESSION_HANDLE,
    pSeed: *mut CK_BYTE,
    ulSeedLen: CK_ULONG,
) -> CK_RV {
    with_token("C_SeedRandom", |t| {
        // SAFETY: `ulSeedLen` readable bytes per the caller.
        unsafe { memory::input(pSeed, ulSeedLen) }?;
        rv(t.seed_random(hSession))
    })
}

/// `C_GenerateRandom`.
#[no_mangle]
pub unsafe extern "C" fn C_GenerateRandom(
    hSession: CK_SESSION_HANDLE,
    RandomData: *mut CK_BYTE,
    ulRandomLen: CK_ULONG,
) -> CK_RV {
    with_token("C_GenerateRandom", |t| {
        if ulRandomLen == 0 {
            return rv(t.generate_random(hSession, &mut []));
        }
        // SAFETY: `ulRandomLen` writable bytes per the caller.
        let out = unsafe { memory::output(RandomData, ulRandomLen) }?;
        rv(t.generate_random(hSession, out))
    })
}

/// `C_WaitForSlotEvent`: slots never change, so a non-blocking call has no event and a blocking
/// one is not supported.
#[no_mangle]
pub unsafe extern "C" fn C_WaitForSlotEvent(
    flags: CK_FLAGS,
    pSlot: *mut CK_SLOT_ID,
    _pReserved: *mut c_void,
) -> CK_RV {
    with_token("C_WaitForSlotEvent", |_| {
        if pSlot.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        if flags & CKF_DONT_BLOCK != 0 {
            Err(CKR_NO_EVENT)
        } else {
            Err(CKR_FUNCTION_NOT_SUPPORTED)
        }
    })
}
