//! The PKCS#11 functions we implement. Each is a thin shim: it catches panics, checks the
//! caller's pointers through `memory`, and calls the token. Each is declared through
//! [`entry!`], which names it once: the same name goes to the log line of a failing call.

#![allow(non_snake_case)]

use std::os::raw::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

use cryptoki_sys::*;

use super::memory::{self, pad, AbiResult};
use super::state;
use crate::token::attributes::CK_UNAVAILABLE_INFORMATION;
use crate::token::object::Lookup;
use crate::token::session::{Capacity, Output};
use crate::token::{self, Operation, Token};

/// Declares one exported entry point: `#[no_mangle] pub unsafe extern "C"`, returning `CK_RV`,
/// with `NAME` (the function's name, written once) in scope for its body.
macro_rules! entry {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        #[no_mangle]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> CK_RV {
            const NAME: &str = stringify!($name);
            $body
        }
    };
}

/// Runs an entry point's body: a panic becomes `CKR_GENERAL_ERROR`, never an unwind into C.
/// Every failing call leaves a debug line with the function and the `CKR_` name it returned
/// (never its arguments: a PIN or data to sign must not reach the log).
pub(crate) fn guard(name: &str, body: impl FnOnce() -> AbiResult<()>) -> CK_RV {
    let rv = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => CKR_OK,
        Ok(Err(rv)) => rv,
        Err(_) => {
            log::error!("{name}: internal error (panic caught at the ABI)");
            CKR_GENERAL_ERROR
        }
    };
    if rv != CKR_OK {
        log::debug!("{name} returned {}", super::rv::name(rv));
    }
    rv
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
/// `CKR_BUFFER_TOO_SMALL`. The caller's capacity is only compared: the bytes are copied through
/// a slice of exactly their length, and a capacity no buffer can have (above `isize::MAX`) is
/// `CKR_ARGUMENTS_BAD`. With a NULL `out` the capacity is not read as one.
///
/// # Safety
/// `out` must be NULL or point to `*out_len` writable bytes; `out_len` must be NULL or writable.
unsafe fn variable_output(
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
    call: impl FnOnce(Capacity) -> token::Result<Output>,
) -> AbiResult<()> {
    // SAFETY: forwarded contract.
    let claimed = unsafe { memory::read(out_len) }?;
    let capacity = if out.is_null() {
        None
    } else {
        Some(memory::capacity(claimed)?)
    };
    match call(capacity) {
        Ok(result) => {
            if let (Some(bytes), Some(room)) = (&result.bytes, capacity) {
                // SAFETY: `out` is non-NULL with `room` writable bytes per the caller.
                unsafe { memory::copy_out(out, room, bytes) }?;
            }
            // SAFETY: checked readable above, writable per contract.
            unsafe { memory::write(out_len, result.len as CK_ULONG) }
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

/// The shared body of `C_SignInit`, `C_VerifyInit` and `C_DigestInit`: check the session, read
/// the mechanism (no parameters), and hand it to `start`.
///
/// # Safety
/// `mechanism` must be NULL or point to a readable `CK_MECHANISM`.
unsafe fn operation_init(
    name: &str,
    session: CK_SESSION_HANDLE,
    mechanism: *const CK_MECHANISM,
    start: impl FnOnce(&Token, CK_MECHANISM_TYPE) -> token::Result<()>,
) -> CK_RV {
    with_token(name, |t| {
        rv(t.check_session(session))?;
        // SAFETY: NULL-checked read of a CK_MECHANISM, per the caller.
        let mech = unsafe { memory::mechanism(mechanism) }?;
        rv(start(t, mech))
    })
}

/// The shared body of the `C_*Update` calls: read the part and feed it to `update`.
///
/// # Safety
/// `part` must be NULL or point to `part_len` readable bytes.
unsafe fn operation_update(
    name: &str,
    session: CK_SESSION_HANDLE,
    op: Operation,
    part: *const CK_BYTE,
    part_len: CK_ULONG,
    update: impl FnOnce(&Token, &[u8]) -> token::Result<()>,
) -> CK_RV {
    with_operation(name, session, op, |t| {
        // SAFETY: `part_len` readable bytes per the caller.
        let data = unsafe { memory::input(part, part_len) }?;
        rv(update(t, data))
    })
}

/// The shared body of `C_SignFinal` and `C_DigestFinal`: the result goes out by the
/// length-query rules of [`variable_output`].
///
/// # Safety
/// As [`variable_output`] for `out` and `out_len`.
unsafe fn operation_final(
    name: &str,
    session: CK_SESSION_HANDLE,
    op: Operation,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
    finish: impl FnOnce(&Token, Capacity) -> token::Result<Output>,
) -> CK_RV {
    with_operation(name, session, op, |t| {
        // SAFETY: forwarded output contract.
        unsafe { variable_output(out, out_len, |cap| finish(t, cap)) }
    })
}

fn version(v: (u8, u8)) -> CK_VERSION {
    CK_VERSION {
        major: v.0,
        minor: v.1,
    }
}

entry! {
    /// `C_Initialize`: the four locking cases; `pReserved` must be NULL.
    fn C_Initialize(pInitArgs: *mut c_void) {
        guard(NAME, || {
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
}

entry! {
    /// `C_Finalize`: `pReserved` must be NULL.
    fn C_Finalize(pReserved: *mut c_void) {
        guard(NAME, || {
            if !pReserved.is_null() {
                return Err(CKR_ARGUMENTS_BAD);
            }
            state::finalize()
        })
    }
}

entry! {
    /// `C_GetInfo`.
    fn C_GetInfo(pInfo: *mut CK_INFO) {
        with_token(NAME, |_| {
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
}

entry! {
    /// `C_GetSlotList`, with the length-query rules.
    fn C_GetSlotList(tokenPresent: CK_BBOOL, pSlotList: *mut CK_SLOT_ID, pulCount: *mut CK_ULONG) {
        with_token(NAME, |t| {
            let slots = t.slot_list(tokenPresent != CK_FALSE);
            // SAFETY: NULL-checked read of the caller's count.
            let capacity = memory::entries(unsafe { memory::read(pulCount) }?);
            // SAFETY: NULL-checked write of the count.
            unsafe { memory::write(pulCount, slots.len() as CK_ULONG) }?;
            if pSlotList.is_null() {
                return Ok(());
            }
            // SAFETY: non-NULL, room for `capacity` entries per the caller; compared before copying.
            unsafe { memory::copy_out(pSlotList, capacity, &slots) }
        })
    }
}

entry! {
    /// `C_GetSlotInfo`.
    fn C_GetSlotInfo(slotID: CK_SLOT_ID, pInfo: *mut CK_SLOT_INFO) {
        with_token(NAME, |t| {
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
}

entry! {
    /// `C_GetTokenInfo`.
    fn C_GetTokenInfo(slotID: CK_SLOT_ID, pInfo: *mut CK_TOKEN_INFO) {
        with_token(NAME, |t| {
            let ti = rv(t.token_info(slotID))?;
            let mut info = CK_TOKEN_INFO {
                flags: ti.flags,
                ulMaxSessionCount: CK_EFFECTIVELY_INFINITE,
                ulSessionCount: ti.session_count as CK_ULONG,
                ulMaxRwSessionCount: CK_EFFECTIVELY_INFINITE,
                ulRwSessionCount: ti.rw_session_count as CK_ULONG,
                ulMaxPinLen: ti.max_pin_len as CK_ULONG,
                ulMinPinLen: ti.min_pin_len as CK_ULONG,
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
}

entry! {
    /// `C_GetMechanismList`, with the length-query rules.
    fn C_GetMechanismList(
        slotID: CK_SLOT_ID,
        pMechanismList: *mut CK_MECHANISM_TYPE,
        pulCount: *mut CK_ULONG,
    ) {
        with_token(NAME, |t| {
            let mechs = rv(t.mechanisms(slotID))?;
            // SAFETY: NULL-checked read of the caller's count.
            let capacity = memory::entries(unsafe { memory::read(pulCount) }?);
            // SAFETY: NULL-checked write.
            unsafe { memory::write(pulCount, mechs.len() as CK_ULONG) }?;
            if pMechanismList.is_null() {
                return Ok(());
            }
            // SAFETY: non-NULL, room for `capacity` entries per the caller; compared before copying.
            unsafe { memory::copy_out(pMechanismList, capacity, mechs) }
        })
    }
}

entry! {
    /// `C_GetMechanismInfo`.
    fn C_GetMechanismInfo(
        slotID: CK_SLOT_ID,
        type_: CK_MECHANISM_TYPE,
        pInfo: *mut CK_MECHANISM_INFO,
    ) {
        with_token(NAME, |t| {
            let info = rv(t.mechanism_info(slotID, type_))?;
            // SAFETY: NULL-checked write.
            unsafe { memory::write(pInfo, info) }
        })
    }
}

entry! {
    /// `C_OpenSession`; notification callbacks are accepted and never called.
    fn C_OpenSession(
        slotID: CK_SLOT_ID,
        flags: CK_FLAGS,
        _pApplication: *mut c_void,
        _Notify: CK_NOTIFY,
        phSession: *mut CK_SESSION_HANDLE,
    ) {
        with_token(NAME, |t| {
            if phSession.is_null() {
                return Err(CKR_ARGUMENTS_BAD);
            }
            let h = rv(t.open_session(slotID, flags))?;
            // SAFETY: NULL-checked write.
            unsafe { memory::write(phSession, h) }
        })
    }
}

entry! {
    /// `C_CloseSession`.
    fn C_CloseSession(hSession: CK_SESSION_HANDLE) {
        with_token(NAME, |t| rv(t.close_session(hSession)))
    }
}

entry! {
    /// `C_CloseAllSessions`.
    fn C_CloseAllSessions(slotID: CK_SLOT_ID) {
        with_token(NAME, |t| rv(t.close_all_sessions(slotID)))
    }
}

entry! {
    /// `C_GetSessionInfo`.
    fn C_GetSessionInfo(hSession: CK_SESSION_HANDLE, pInfo: *mut CK_SESSION_INFO) {
        with_token(NAME, |t| {
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
}

entry! {
    /// `C_Login`.
    fn C_Login(
        hSession: CK_SESSION_HANDLE,
        userType: CK_USER_TYPE,
        pPin: *mut CK_UTF8CHAR,
        ulPinLen: CK_ULONG,
    ) {
        with_token(NAME, |t| {
            // SAFETY: NULL (with length 0) or `ulPinLen` readable bytes per the caller.
            let pin = unsafe { memory::input(pPin, ulPinLen) }?;
            rv(t.login(hSession, userType, pin))
        })
    }
}

entry! {
    /// `C_LoginUser` (PKCS#11 3.0): as C_Login; the user name is not used.
    fn C_LoginUser(
        hSession: CK_SESSION_HANDLE,
        userType: CK_USER_TYPE,
        pPin: *mut CK_UTF8CHAR,
        ulPinLen: CK_ULONG,
        _pUsername: *mut CK_UTF8CHAR,
        _ulUsernameLen: CK_ULONG,
    ) {
        with_token(NAME, |t| {
            // SAFETY: NULL (with length 0) or `ulPinLen` readable bytes per the caller.
            let pin = unsafe { memory::input(pPin, ulPinLen) }?;
            rv(t.login(hSession, userType, pin))
        })
    }
}

entry! {
    /// `C_SetPIN`: the user PIN of a slot with `login = "pin"`.
    fn C_SetPIN(
        hSession: CK_SESSION_HANDLE,
        pOldPin: *mut CK_UTF8CHAR,
        ulOldLen: CK_ULONG,
        pNewPin: *mut CK_UTF8CHAR,
        ulNewLen: CK_ULONG,
    ) {
        with_token(NAME, |t| {
            // SAFETY: NULL (with length 0) or `ulOldLen` readable bytes per the caller.
            let old = unsafe { memory::input(pOldPin, ulOldLen) }?;
            // SAFETY: NULL (with length 0) or `ulNewLen` readable bytes per the caller.
            let new = unsafe { memory::input(pNewPin, ulNewLen) }?;
            rv(t.set_pin(hSession, old, new))
        })
    }
}

entry! {
    /// `C_Logout`.
    fn C_Logout(hSession: CK_SESSION_HANDLE) {
        with_token(NAME, |t| rv(t.logout(hSession)))
    }
}

entry! {
    /// `C_CreateObject`: certificates and data objects.
    fn C_CreateObject(
        hSession: CK_SESSION_HANDLE,
        pTemplate: *mut CK_ATTRIBUTE,
        ulCount: CK_ULONG,
        phObject: *mut CK_OBJECT_HANDLE,
    ) {
        with_token(NAME, |t| {
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
}

entry! {
    /// `C_DestroyObject`.
    fn C_DestroyObject(hSession: CK_SESSION_HANDLE, hObject: CK_OBJECT_HANDLE) {
        with_token(NAME, |t| {
            rv(t.destroy_object(hSession, hObject))
        })
    }
}

entry! {
    /// `C_GetObjectSize`: the total size of the object's attribute values.
    fn C_GetObjectSize(
        hSession: CK_SESSION_HANDLE,
        hObject: CK_OBJECT_HANDLE,
        pulSize: *mut CK_ULONG,
    ) {
        with_token(NAME, |t| {
            let n = rv(t.object_size(hSession, hObject))?;
            // SAFETY: NULL-checked write.
            unsafe { memory::write(pulSize, n as CK_ULONG) }
        })
    }
}

entry! {
    /// `C_GetAttributeValue`: every template entry is processed; the return value reports the
    /// first problem (sensitive, unknown type, or buffer too small).
    fn C_GetAttributeValue(
        hSession: CK_SESSION_HANDLE,
        hObject: CK_OBJECT_HANDLE,
        pTemplate: *mut CK_ATTRIBUTE,
        ulCount: CK_ULONG,
    ) {
        with_token(NAME, |t| {
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
                        } else if memory::entries(a.ulValueLen) < v.len() {
                            a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                            note(CKR_BUFFER_TOO_SMALL);
                        } else {
                            let room = memory::entries(a.ulValueLen);
                            // SAFETY: non-NULL with `ulValueLen` >= v.len() writable bytes per the
                            // caller; copy_out makes a slice of v.len() bytes only.
                            unsafe { memory::copy_out(a.pValue as *mut u8, room, v) }?;
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
}

entry! {
    /// `C_SetAttributeValue`: CKA_LABEL and CKA_ID.
    fn C_SetAttributeValue(
        hSession: CK_SESSION_HANDLE,
        hObject: CK_OBJECT_HANDLE,
        pTemplate: *mut CK_ATTRIBUTE,
        ulCount: CK_ULONG,
    ) {
        with_token(NAME, |t| {
            // SAFETY: the caller passes `ulCount` readable attributes.
            let template = unsafe { memory::template(pTemplate, ulCount) }?;
            rv(t.set_attributes(hSession, hObject, &template))
        })
    }
}

entry! {
    /// `C_FindObjectsInit`.
    fn C_FindObjectsInit(
        hSession: CK_SESSION_HANDLE,
        pTemplate: *mut CK_ATTRIBUTE,
        ulCount: CK_ULONG,
    ) {
        with_token(NAME, |t| {
            // SAFETY: the caller passes `ulCount` readable attributes.
            let template = unsafe { memory::template(pTemplate, ulCount) }?;
            rv(t.find_init(hSession, &template))
        })
    }
}

entry! {
    /// `C_FindObjects`.
    fn C_FindObjects(
        hSession: CK_SESSION_HANDLE,
        phObject: *mut CK_OBJECT_HANDLE,
        ulMaxObjectCount: CK_ULONG,
        pulObjectCount: *mut CK_ULONG,
    ) {
        with_token(NAME, |t| {
            if pulObjectCount.is_null() || (phObject.is_null() && ulMaxObjectCount > 0) {
                return Err(CKR_ARGUMENTS_BAD);
            }
            let room = memory::entries(ulMaxObjectCount);
            let found = rv(t.find(hSession, room))?;
            if !found.is_empty() {
                // SAFETY: non-NULL (found is empty when the count is 0), room for `ulMaxObjectCount`
                // >= found.len() handles per the caller.
                unsafe { memory::copy_out(phObject, room, &found) }?;
            }
            // SAFETY: NULL-checked above.
            unsafe { memory::write(pulObjectCount, found.len() as CK_ULONG) }
        })
    }
}

entry! {
    /// `C_FindObjectsFinal`.
    fn C_FindObjectsFinal(hSession: CK_SESSION_HANDLE) {
        with_token(NAME, |t| rv(t.find_final(hSession)))
    }
}

entry! {
    /// `C_GenerateKeyPair`: CKM_EC_KEY_PAIR_GEN on P-256.
    fn C_GenerateKeyPair(
        hSession: CK_SESSION_HANDLE,
        pMechanism: *mut CK_MECHANISM,
        pPublicKeyTemplate: *mut CK_ATTRIBUTE,
        ulPublicKeyAttributeCount: CK_ULONG,
        pPrivateKeyTemplate: *mut CK_ATTRIBUTE,
        ulPrivateKeyAttributeCount: CK_ULONG,
        phPublicKey: *mut CK_OBJECT_HANDLE,
        phPrivateKey: *mut CK_OBJECT_HANDLE,
    ) {
        with_token(NAME, |t| {
            rv(t.check_session(hSession))?;
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
}

entry! {
    /// `C_SignInit`.
    fn C_SignInit(
        hSession: CK_SESSION_HANDLE,
        pMechanism: *mut CK_MECHANISM,
        hKey: CK_OBJECT_HANDLE,
    ) {
        // SAFETY: `pMechanism` is NULL or a readable CK_MECHANISM per the caller.
        unsafe { operation_init(NAME, hSession, pMechanism, |t, m| t.sign_init(hSession, m, hKey)) }
    }
}

entry! {
    /// `C_Sign`: a NULL signature buffer asks for the length (64) and keeps the operation.
    fn C_Sign(
        hSession: CK_SESSION_HANDLE,
        pData: *mut CK_BYTE,
        ulDataLen: CK_ULONG,
        pSignature: *mut CK_BYTE,
        pulSignatureLen: *mut CK_ULONG,
    ) {
        with_operation(NAME, hSession, Operation::Sign, |t| {
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
}

entry! {
    /// `C_SignUpdate`.
    fn C_SignUpdate(hSession: CK_SESSION_HANDLE, pPart: *mut CK_BYTE, ulPartLen: CK_ULONG) {
        // SAFETY: `ulPartLen` readable bytes at `pPart` per the caller.
        unsafe {
            operation_update(NAME, hSession, Operation::Sign, pPart, ulPartLen, |t, d| {
                t.sign_update(hSession, d)
            })
        }
    }
}

entry! {
    /// `C_SignFinal`: a NULL signature buffer asks for the length and keeps the operation.
    fn C_SignFinal(
        hSession: CK_SESSION_HANDLE,
        pSignature: *mut CK_BYTE,
        pulSignatureLen: *mut CK_ULONG,
    ) {
        // SAFETY: forwarded output contract.
        unsafe {
            operation_final(NAME, hSession, Operation::Sign, pSignature, pulSignatureLen, |t, c| {
                t.sign_final(hSession, c)
            })
        }
    }
}

entry! {
    /// `C_VerifyInit`.
    fn C_VerifyInit(
        hSession: CK_SESSION_HANDLE,
        pMechanism: *mut CK_MECHANISM,
        hKey: CK_OBJECT_HANDLE,
    ) {
        // SAFETY: `pMechanism` is NULL or a readable CK_MECHANISM per the caller.
        unsafe { operation_init(NAME, hSession, pMechanism, |t, m| t.verify_init(hSession, m, hKey)) }
    }
}

entry! {
    /// `C_Verify`.
    fn C_Verify(
        hSession: CK_SESSION_HANDLE,
        pData: *mut CK_BYTE,
        ulDataLen: CK_ULONG,
        pSignature: *mut CK_BYTE,
        ulSignatureLen: CK_ULONG,
    ) {
        with_operation(NAME, hSession, Operation::Verify, |t| {
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
}

entry! {
    /// `C_VerifyUpdate`.
    fn C_VerifyUpdate(hSession: CK_SESSION_HANDLE, pPart: *mut CK_BYTE, ulPartLen: CK_ULONG) {
        // SAFETY: `ulPartLen` readable bytes at `pPart` per the caller.
        unsafe {
            operation_update(NAME, hSession, Operation::Verify, pPart, ulPartLen, |t, d| {
                t.verify_update(hSession, d)
            })
        }
    }
}

entry! {
    /// `C_VerifyFinal`.
    fn C_VerifyFinal(
        hSession: CK_SESSION_HANDLE,
        pSignature: *mut CK_BYTE,
        ulSignatureLen: CK_ULONG,
    ) {
        with_operation(NAME, hSession, Operation::Verify, |t| {
            // SAFETY: `ulSignatureLen` readable bytes per the caller.
            let sig = unsafe { memory::input(pSignature, ulSignatureLen) }?;
            rv(t.verify_final(hSession, sig))
        })
    }
}

entry! {
    /// `C_DigestInit`.
    fn C_DigestInit(hSession: CK_SESSION_HANDLE, pMechanism: *mut CK_MECHANISM) {
        // SAFETY: `pMechanism` is NULL or a readable CK_MECHANISM per the caller.
        unsafe { operation_init(NAME, hSession, pMechanism, |t, m| t.digest_init(hSession, m)) }
    }
}

entry! {
    /// `C_Digest`: a NULL output asks for the length and keeps the operation.
    fn C_Digest(
        hSession: CK_SESSION_HANDLE,
        pData: *mut CK_BYTE,
        ulDataLen: CK_ULONG,
        pDigest: *mut CK_BYTE,
        pulDigestLen: *mut CK_ULONG,
    ) {
        with_operation(NAME, hSession, Operation::Digest, |t| {
            // SAFETY: `ulDataLen` readable bytes per the caller.
            let data = unsafe { memory::input(pData, ulDataLen) }?;
            // SAFETY: forwarded output contract.
            unsafe { variable_output(pDigest, pulDigestLen, |out| t.digest(hSession, data, out)) }
        })
    }
}

entry! {
    /// `C_DigestUpdate`.
    fn C_DigestUpdate(hSession: CK_SESSION_HANDLE, pPart: *mut CK_BYTE, ulPartLen: CK_ULONG) {
        // SAFETY: `ulPartLen` readable bytes at `pPart` per the caller.
        unsafe {
            operation_update(NAME, hSession, Operation::Digest, pPart, ulPartLen, |t, d| {
                t.digest_update(hSession, d)
            })
        }
    }
}

entry! {
    /// `C_DigestFinal`: a NULL output asks for the length and keeps the operation.
    fn C_DigestFinal(
        hSession: CK_SESSION_HANDLE,
        pDigest: *mut CK_BYTE,
        pulDigestLen: *mut CK_ULONG,
    ) {
        // SAFETY: forwarded output contract.
        unsafe {
            operation_final(NAME, hSession, Operation::Digest, pDigest, pulDigestLen, |t, c| {
                t.digest_final(hSession, c)
            })
        }
    }
}

entry! {
    /// `C_GetOperationState`: a digest's saved state (docs/FEATURES.md); a NULL output asks
    /// for the length. The operation goes on either way.
    fn C_GetOperationState(
        hSession: CK_SESSION_HANDLE,
        pOperationState: *mut CK_BYTE,
        pulOperationStateLen: *mut CK_ULONG,
    ) {
        with_token(NAME, |t| {
            // SAFETY: forwarded output contract.
            unsafe {
                variable_output(pOperationState, pulOperationStateLen, |out| {
                    t.operation_state(hSession, out)
                })
            }
        })
    }
}

entry! {
    /// `C_SetOperationState`: restores a state C_GetOperationState gave.
    fn C_SetOperationState(
        hSession: CK_SESSION_HANDLE,
        pOperationState: *mut CK_BYTE,
        ulOperationStateLen: CK_ULONG,
        hEncryptionKey: CK_OBJECT_HANDLE,
        hAuthenticationKey: CK_OBJECT_HANDLE,
    ) {
        with_token(NAME, |t| {
            t.check_session(hSession).map_err(|e| e.rv)?;
            // SAFETY: `ulOperationStateLen` readable bytes per the caller.
            let state = unsafe { memory::input(pOperationState, ulOperationStateLen) }?;
            rv(t.set_operation_state(hSession, state, hEncryptionKey, hAuthenticationKey))
        })
    }
}

entry! {
    /// `C_SeedRandom`: the OS generator takes no seed (`CKR_RANDOM_SEED_NOT_SUPPORTED`).
    fn C_SeedRandom(hSession: CK_SESSION_HANDLE, pSeed: *mut CK_BYTE, ulSeedLen: CK_ULONG) {
        with_token(NAME, |t| {
            // SAFETY: `ulSeedLen` readable bytes per the caller.
            unsafe { memory::input(pSeed, ulSeedLen) }?;
            rv(t.seed_random(hSession))
        })
    }
}

entry! {
    /// `C_GenerateRandom`.
    fn C_GenerateRandom(
        hSession: CK_SESSION_HANDLE,
        RandomData: *mut CK_BYTE,
        ulRandomLen: CK_ULONG,
    ) {
        with_token(NAME, |t| {
            if ulRandomLen == 0 {
                return rv(t.generate_random(hSession, &mut []));
            }
            // SAFETY: `ulRandomLen` writable bytes per the caller.
            let out = unsafe { memory::output(RandomData, ulRandomLen) }?;
            rv(t.generate_random(hSession, out))
        })
    }
}

entry! {
    /// `C_WaitForSlotEvent`: slots never change, so a non-blocking call has no event and a blocking
    /// one is not supported.
    fn C_WaitForSlotEvent(flags: CK_FLAGS, pSlot: *mut CK_SLOT_ID, _pReserved: *mut c_void) {
        with_token(NAME, |_| {
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
}
