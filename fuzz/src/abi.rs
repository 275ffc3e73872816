//! Fuzz harness (a): the C ABI. Each input is a program: a sequence of PKCS#11 calls on the
//! exported `C_*` functions of the library, with random templates, attribute types and lengths,
//! NULL pointers, stale and invalid handles, and mechanism parameters.
//!
//! The harness keeps every promise a C caller must keep (a non-NULL pointer points to as many
//! bytes as its length says) and breaks every other rule. One exception, because callers break
//! it in the wild: a variable-length output sometimes claims a capacity no buffer can have
//! (`CK_UNAVAILABLE_INFORMATION`, `isize::MAX + 1`) for a real buffer; the module must refuse it
//! with `CKR_ARGUMENTS_BAD` and write nothing (it once made a slice of the claim, which aborts). Properties: no call panics (the panic
//! hook turns a caught panic into a crash) and every output stays inside its buffer (each output
//! buffer is followed by a canary that must survive); a length the module reports for a filled
//! buffer fits it; a private key's CKA_VALUE is never revealed.

use std::os::raw::c_void;
use std::path::PathBuf;
use std::ptr::null_mut;
use std::sync::OnceLock;

use cryptoki_sys::*;
use devicekey_pkcs11::pkcs11::entry as e;

use crate::input::Input;

const CANARY: u8 = 0xA5;
const CANARY_LEN: usize = 16;
const P256_OID: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

const ATTRIBUTE_TYPES: &[CK_ATTRIBUTE_TYPE] = &[
    CKA_CLASS,
    CKA_TOKEN,
    CKA_PRIVATE,
    CKA_LABEL,
    CKA_APPLICATION,
    CKA_VALUE,
    CKA_OBJECT_ID,
    CKA_CERTIFICATE_TYPE,
    CKA_ISSUER,
    CKA_SERIAL_NUMBER,
    CKA_KEY_TYPE,
    CKA_SUBJECT,
    CKA_ID,
    CKA_SENSITIVE,
    CKA_ENCRYPT,
    CKA_DECRYPT,
    CKA_WRAP,
    CKA_UNWRAP,
    CKA_SIGN,
    CKA_SIGN_RECOVER,
    CKA_VERIFY,
    CKA_DERIVE,
    CKA_MODIFIABLE,
    CKA_COPYABLE,
    CKA_DESTROYABLE,
    CKA_EC_PARAMS,
    CKA_EC_POINT,
    CKA_EXTRACTABLE,
    CKA_LOCAL,
    CKA_NEVER_EXTRACTABLE,
    CKA_ALWAYS_SENSITIVE,
    CKA_ALWAYS_AUTHENTICATE,
    CKA_KEY_GEN_MECHANISM,
    CKA_START_DATE,
    CKA_VALUE_LEN,
    CKA_MODULUS,
    0x8000_0000 | 0x444B_0001,
    0x8000_0000 | 0x444B_0002,
    0x8000_0000,
    CK_UNAVAILABLE_INFORMATION,
];

const MECHANISMS: &[CK_MECHANISM_TYPE] = &[
    CKM_EC_KEY_PAIR_GEN,
    CKM_ECDSA,
    CKM_ECDSA_SHA1,
    CKM_ECDSA_SHA256,
    CKM_ECDSA_SHA384,
    CKM_ECDSA_SHA512,
    CKM_SHA256,
    CKM_SHA384,
    CKM_SHA512,
    CKM_SHA_1,
    CKM_RSA_PKCS,
    CKM_RSA_PKCS_KEY_PAIR_GEN,
    CKM_AES_KEY_GEN,
    0x8000_0000,
    CK_UNAVAILABLE_INFORMATION,
];

const ULONG_VALUES: &[CK_ULONG] = &[
    CKO_DATA,
    CKO_CERTIFICATE,
    CKO_PUBLIC_KEY,
    CKO_PRIVATE_KEY,
    CKO_SECRET_KEY,
    CKK_EC,
    CKK_RSA,
    CKC_X_509,
    1,
    2,
    3,
    0,
    CK_UNAVAILABLE_INFORMATION,
];

/// A config with one software slot in a private temporary directory, set up once.
fn setup() -> &'static PathBuf {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("devicekey-fuzz-abi-")
            .tempdir()
            .expect("tempdir");
        let keys = dir.path().join("keys");
        let config = dir.path().join("devicekey.toml");
        std::fs::write(
            &config,
            format!(
                "[[slot]]\nlabel = \"fuzz\"\nbackend = \"software\"\ndir = \"{}\"\n",
                keys.display()
            ),
        )
        .expect("write config");
        std::env::set_var("DEVICEKEY_CONFIG", &config);
        std::env::set_var("XDG_DATA_HOME", dir.path().join("data"));
        std::env::set_var("XDG_CONFIG_HOME", dir.path().join("config"));
        std::env::set_var("DEVICEKEY_LOG", "off");
        (dir, keys)
    })
    .1
}

/// Removes the token objects of earlier runs once there are many (C_Finalize first).
fn prune(keys: &PathBuf) {
    let Ok(entries) = std::fs::read_dir(keys) else {
        return;
    };
    let files: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    if files.len() > 40 {
        for f in files {
            if f.extension().is_some_and(|x| x == "key" || x == "obj") {
                let _ = std::fs::remove_file(f);
            }
        }
    }
}

/// An output buffer with a canary after it.
struct OutBuf {
    data: Vec<u8>,
    len: usize,
}

impl OutBuf {
    fn new(len: usize) -> Self {
        let mut data = vec![0u8; len + CANARY_LEN];
        data[len..].fill(CANARY);
        OutBuf { data, len }
    }
    fn ptr(&mut self) -> *mut u8 {
        self.data.as_mut_ptr()
    }
    fn check(&self, what: &str) {
        assert!(
            self.data[self.len..].iter().all(|&b| b == CANARY),
            "{what} wrote past the end of a {}-byte buffer",
            self.len
        );
    }
}

/// An input template and the storage its pointers point into.
struct Template {
    attrs: Vec<CK_ATTRIBUTE>,
    _values: Vec<Vec<u8>>,
    null_array: bool,
}

impl Template {
    fn ptr(&mut self) -> *mut CK_ATTRIBUTE {
        if self.null_array {
            null_mut()
        } else {
            self.attrs.as_mut_ptr()
        }
    }
    fn count(&self) -> CK_ULONG {
        self.attrs.len() as CK_ULONG
    }
}

fn attribute_type(input: &mut Input<'_>) -> CK_ATTRIBUTE_TYPE {
    if input.below(8) == 0 {
        input.u64() as CK_ATTRIBUTE_TYPE
    } else {
        ATTRIBUTE_TYPES[input.below(ATTRIBUTE_TYPES.len())]
    }
}

fn value(input: &mut Input<'_>) -> Option<Vec<u8>> {
    Some(match input.below(8) {
        0 => return None,
        1 => vec![input.u8() & 1],
        2 => ULONG_VALUES[input.below(ULONG_VALUES.len())]
            .to_ne_bytes()
            .to_vec(),
        3 => P256_OID.to_vec(),
        4 => Vec::new(),
        _ => input.bytes(72),
    })
}

fn template(input: &mut Input<'_>) -> Template {
    let n = input.below(7);
    let mut values = Vec::new();
    let mut attrs = Vec::new();
    for _ in 0..n {
        let type_ = attribute_type(input);
        match value(input) {
            None => attrs.push(CK_ATTRIBUTE {
                type_,
                pValue: null_mut(),
                ulValueLen: input.below(64) as CK_ULONG,
            }),
            Some(mut v) => {
                let (p, len) = (v.as_mut_ptr() as *mut c_void, v.len());
                values.push(v);
                attrs.push(CK_ATTRIBUTE {
                    type_,
                    pValue: if len == 0 && input.below(2) == 0 {
                        null_mut()
                    } else {
                        p
                    },
                    ulValueLen: len as CK_ULONG,
                })
            }
        }
    }
    Template {
        null_array: n > 0 && input.below(16) == 0,
        attrs,
        _values: values,
    }
}

fn ck_bool(v: bool) -> Vec<u8> {
    vec![u8::from(v)]
}

/// A template that generates a key pair, with a random extra attribute sometimes.
fn keygen_templates(input: &mut Input<'_>) -> (Template, Template) {
    let token = input.below(8) == 0;
    let label = format!("fuzz-{}", input.u8()).into_bytes();
    let mut pub_values = vec![
        ck_bool(token),
        P256_OID.to_vec(),
        ck_bool(true),
        label.clone(),
    ];
    let mut priv_values = vec![ck_bool(token), ck_bool(true), label];
    let make = |values: &mut Vec<Vec<u8>>, types: &[CK_ATTRIBUTE_TYPE]| -> Vec<CK_ATTRIBUTE> {
        types
            .iter()
            .zip(values.iter_mut())
            .map(|(&type_, v)| CK_ATTRIBUTE {
                type_,
                pValue: v.as_mut_ptr() as *mut c_void,
                ulValueLen: v.len() as CK_ULONG,
            })
            .collect()
    };
    let pub_attrs = make(
        &mut pub_values,
        &[CKA_TOKEN, CKA_EC_PARAMS, CKA_VERIFY, CKA_LABEL],
    );
    let mut priv_attrs = make(&mut priv_values, &[CKA_TOKEN, CKA_SIGN, CKA_LABEL]);
    let mut extra = template(input);
    if input.below(4) == 0 && !extra.null_array {
        priv_attrs.append(&mut extra.attrs);
    }
    let mut all_values = priv_values;
    all_values.append(&mut extra._values);
    (
        Template {
            attrs: pub_attrs,
            _values: pub_values,
            null_array: false,
        },
        Template {
            attrs: priv_attrs,
            _values: all_values,
            null_array: false,
        },
    )
}

#[derive(Default)]
struct State {
    slots: Vec<CK_SLOT_ID>,
    sessions: Vec<CK_SESSION_HANDLE>,
    objects: Vec<CK_OBJECT_HANDLE>,
    private_keys: Vec<CK_OBJECT_HANDLE>,
}

fn pick(input: &mut Input<'_>, pool: &[CK_ULONG]) -> CK_ULONG {
    match input.below(8) {
        0 => input.u64() as CK_ULONG,
        1 => CK_ULONG::from(input.u8()),
        _ if pool.is_empty() => CK_ULONG::from(input.u8() & 7),
        _ => pool[input.below(pool.len())],
    }
}

/// A mechanism: NULL sometimes, a parameter sometimes.
struct Mech {
    m: CK_MECHANISM,
    _param: Vec<u8>,
    null: bool,
}

impl Mech {
    fn new(input: &mut Input<'_>) -> Self {
        let mechanism = if input.below(8) == 0 {
            input.u64() as CK_MECHANISM_TYPE
        } else {
            MECHANISMS[input.below(MECHANISMS.len())]
        };
        let mut param = Vec::new();
        let (p, len) = match input.below(8) {
            0 => (null_mut(), input.below(32) as CK_ULONG),
            1 => {
                param = input.bytes(32);
                (param.as_mut_ptr() as *mut c_void, param.len() as CK_ULONG)
            }
            _ => (null_mut(), 0),
        };
        Mech {
            m: CK_MECHANISM {
                mechanism,
                pParameter: p,
                ulParameterLen: len,
            },
            _param: param,
            null: input.below(32) == 0,
        }
    }
    fn ptr(&mut self) -> *mut CK_MECHANISM {
        if self.null {
            null_mut()
        } else {
            &mut self.m
        }
    }
}

/// Input data: NULL with a random length sometimes.
fn data_in(input: &mut Input<'_>) -> (Vec<u8>, bool, CK_ULONG) {
    let data = input.bytes(80);
    if input.below(16) == 0 {
        (data, true, input.below(64) as CK_ULONG)
    } else {
        let len = data.len() as CK_ULONG;
        (data, false, len)
    }
}

/// A variable-length output: NULL (a length query), a buffer, and/or a NULL length pointer.
/// Calls `f(out_ptr, len_ptr)` and checks the buffer and the reported length.
fn var_out(
    input: &mut Input<'_>,
    what: &str,
    f: impl FnOnce(*mut u8, *mut CK_ULONG) -> CK_RV,
) -> CK_RV {
    let null_out = input.below(4) == 0;
    let null_len = input.below(32) == 0;
    let cap = input.below(80);
    let mut buf = OutBuf::new(cap);
    let impossible = match input.below(16) {
        0 => Some(CK_UNAVAILABLE_INFORMATION),
        1 => Some(isize::MAX as CK_ULONG + 1),
        _ => None,
    };
    let mut len: CK_ULONG = impossible.unwrap_or(cap as CK_ULONG);
    let out = if null_out { null_mut() } else { buf.ptr() };
    let len_ptr = if null_len {
        null_mut()
    } else {
        &mut len as *mut _
    };
    let rv = f(out, len_ptr);
    buf.check(what);
    if let (Some(claimed), false, false) = (impossible, null_out, null_len) {
        assert!(
            rv == CKR_ARGUMENTS_BAD || rv == CKR_CRYPTOKI_NOT_INITIALIZED,
            "{what}: a capacity of {claimed:#x} for a real buffer gave rv {rv:#x}"
        );
        assert_eq!(len, claimed, "{what}: changed the length of a refused call");
        assert!(
            buf.data[..cap].iter().all(|&b| b == 0),
            "{what}: wrote into a buffer whose capacity it refused"
        );
        return rv;
    }
    if rv == CKR_OK && !null_out && !null_len {
        assert!(
            len as usize <= cap,
            "{what}: reported {len} bytes in a {cap}-byte buffer"
        );
    }
    rv
}

fn step(input: &mut Input<'_>, st: &mut State) {
    let session = pick(input, &st.sessions);
    // SAFETY (for every call below): each pointer is NULL or points to as many bytes as its
    // length says, which is the whole of a C caller's contract.
    unsafe {
        match input.below(40) {
            0 => {
                let mut args = CK_C_INITIALIZE_ARGS {
                    CreateMutex: None,
                    DestroyMutex: None,
                    LockMutex: None,
                    UnlockMutex: None,
                    flags: input.u64() as CK_FLAGS,
                    pReserved: null_mut(),
                };
                let mut reserved = 0u64;
                if input.below(4) == 0 {
                    args.pReserved = &mut reserved as *mut u64 as *mut c_void;
                }
                let p = if input.below(2) == 0 {
                    null_mut()
                } else {
                    &mut args as *mut _ as *mut c_void
                };
                e::C_Initialize(p);
            }
            1 => {
                let mut reserved = 0u64;
                let p = if input.below(8) == 0 {
                    &mut reserved as *mut u64 as *mut c_void
                } else {
                    null_mut()
                };
                if e::C_Finalize(p) == CKR_OK {
                    *st = State::default();
                }
            }
            2 => {
                let mut info = std::mem::MaybeUninit::<CK_INFO>::zeroed();
                let p = if input.below(4) == 0 {
                    null_mut()
                } else {
                    info.as_mut_ptr()
                };
                e::C_GetInfo(p);
            }
            3 => {
                let cap = input.below(4);
                let mut buf = vec![0 as CK_SLOT_ID; cap + 1];
                let mut n: CK_ULONG = cap as CK_ULONG;
                let list = if input.below(3) == 0 {
                    null_mut()
                } else {
                    buf.as_mut_ptr()
                };
                let np = if input.below(16) == 0 {
                    null_mut()
                } else {
                    &mut n as *mut _
                };
                let rv = e::C_GetSlotList(CK_BBOOL::from(input.u8() & 1), list, np);
                if rv == CKR_OK && !list.is_null() && !np.is_null() {
                    assert!(n as usize <= cap, "C_GetSlotList wrote {n} of {cap}");
                    st.slots = buf[..n as usize].to_vec();
                }
            }
            4 => {
                let mut info = std::mem::MaybeUninit::<CK_SLOT_INFO>::zeroed();
                let p = if input.below(8) == 0 {
                    null_mut()
                } else {
                    info.as_mut_ptr()
                };
                e::C_GetSlotInfo(pick(input, &st.slots), p);
            }
            5 => {
                let mut info = std::mem::MaybeUninit::<CK_TOKEN_INFO>::zeroed();
                let p = if input.below(8) == 0 {
                    null_mut()
                } else {
                    info.as_mut_ptr()
                };
                e::C_GetTokenInfo(pick(input, &st.slots), p);
            }
            6 => {
                let cap = input.below(16);
                let mut buf = vec![0 as CK_MECHANISM_TYPE; cap + 1];
                let mut n: CK_ULONG = cap as CK_ULONG;
                let list = if input.below(3) == 0 {
                    null_mut()
                } else {
                    buf.as_mut_ptr()
                };
                let rv = e::C_GetMechanismList(pick(input, &st.slots), list, &mut n);
                if rv == CKR_OK && !list.is_null() {
                    assert!(n as usize <= cap, "C_GetMechanismList wrote {n} of {cap}");
                }
            }
            7 => {
                let mut info = std::mem::MaybeUninit::<CK_MECHANISM_INFO>::zeroed();
                let p = if input.below(8) == 0 {
                    null_mut()
                } else {
                    info.as_mut_ptr()
                };
                let m = Mech::new(input).m.mechanism;
                e::C_GetMechanismInfo(pick(input, &st.slots), m, p);
            }
            8 | 9 => {
                let flags = match input.below(4) {
                    0 => input.u64() as CK_FLAGS,
                    1 => CKF_SERIAL_SESSION,
                    _ => CKF_SERIAL_SESSION | CKF_RW_SESSION,
                };
                let mut h: CK_SESSION_HANDLE = 0;
                let hp = if input.below(16) == 0 {
                    null_mut()
                } else {
                    &mut h as *mut _
                };
                let mut app = 0u64;
                let app_p = if input.below(4) == 0 {
                    &mut app as *mut u64 as *mut c_void
                } else {
                    null_mut()
                };
                if e::C_OpenSession(pick(input, &st.slots), flags, app_p, None, hp) == CKR_OK
                    && !hp.is_null()
                {
                    st.sessions.push(h);
                }
            }
            10 => {
                if e::C_CloseSession(session) == CKR_OK {
                    st.sessions.retain(|&s| s != session);
                }
            }
            11 => {
                if input.below(4) == 0 && e::C_CloseAllSessions(pick(input, &st.slots)) == CKR_OK {
                    st.sessions.clear();
                }
            }
            12 => {
                let mut info = std::mem::MaybeUninit::<CK_SESSION_INFO>::zeroed();
                let p = if input.below(8) == 0 {
                    null_mut()
                } else {
                    info.as_mut_ptr()
                };
                e::C_GetSessionInfo(session, p);
            }
            13 => {
                let (mut pin, null, len) = data_in(input);
                let p = if null { null_mut() } else { pin.as_mut_ptr() };
                let user = match input.below(4) {
                    0 => input.u64() as CK_USER_TYPE,
                    1 => CKU_SO,
                    2 => CKU_CONTEXT_SPECIFIC,
                    _ => CKU_USER,
                };
                e::C_Login(session, user, p, len);
            }
            14 => {
                e::C_Logout(session);
            }
            15 | 16 => {
                let mut t = template(input);
                let mut h: CK_OBJECT_HANDLE = 0;
                let hp = if input.below(16) == 0 {
                    null_mut()
                } else {
                    &mut h as *mut _
                };
                if e::C_CreateObject(session, t.ptr(), t.count(), hp) == CKR_OK && !hp.is_null() {
                    st.objects.push(h);
                }
            }
            17 => {
                let obj = pick(input, &st.objects);
                if e::C_DestroyObject(session, obj) == CKR_OK {
                    st.objects.retain(|&o| o != obj);
                    st.private_keys.retain(|&o| o != obj);
                }
            }
            18 => {
                let mut size: CK_ULONG = 0;
                let p = if input.below(8) == 0 {
                    null_mut()
                } else {
                    &mut size as *mut _
                };
                e::C_GetObjectSize(session, pick(input, &st.objects), p);
            }
            19..=21 => get_attribute_value(input, st, session),
            22 => {
                let mut t = template(input);
                e::C_SetAttributeValue(session, pick(input, &st.objects), t.ptr(), t.count());
            }
            23 | 24 => {
                let mut t = template(input);
                e::C_FindObjectsInit(session, t.ptr(), t.count());
                let cap = input.below(8);
                let mut buf = vec![0 as CK_OBJECT_HANDLE; cap + 1];
                let mut n: CK_ULONG = 0;
                let out = if input.below(16) == 0 {
                    null_mut()
                } else {
                    buf.as_mut_ptr()
                };
                let np = if input.below(16) == 0 {
                    null_mut()
                } else {
                    &mut n as *mut _
                };
                let rv = e::C_FindObjects(session, out, cap as CK_ULONG, np);
                if rv == CKR_OK && !out.is_null() && !np.is_null() {
                    assert!(n as usize <= cap, "C_FindObjects returned {n} of {cap}");
                    st.objects.extend_from_slice(&buf[..n as usize]);
                    st.objects.sort_unstable();
                    st.objects.dedup();
                }
                if input.below(4) != 0 {
                    e::C_FindObjectsFinal(session);
                }
            }
            25 | 26 => {
                let mut mech = if input.below(4) == 0 {
                    Mech::new(input)
                } else {
                    Mech {
                        m: CK_MECHANISM {
                            mechanism: CKM_EC_KEY_PAIR_GEN,
                            pParameter: null_mut(),
                            ulParameterLen: 0,
                        },
                        _param: Vec::new(),
                        null: false,
                    }
                };
                let (mut pubt, mut privt) = if input.below(4) == 0 {
                    (template(input), template(input))
                } else {
                    keygen_templates(input)
                };
                let (mut hpub, mut hpriv): (CK_OBJECT_HANDLE, CK_OBJECT_HANDLE) = (0, 0);
                let pp = if input.below(32) == 0 {
                    null_mut()
                } else {
                    &mut hpub as *mut _
                };
                let rv = e::C_GenerateKeyPair(
                    session,
                    mech.ptr(),
                    pubt.ptr(),
                    pubt.count(),
                    privt.ptr(),
                    privt.count(),
                    pp,
                    &mut hpriv,
                );
                if rv == CKR_OK {
                    st.objects.push(hpub);
                    st.objects.push(hpriv);
                    st.private_keys.push(hpriv);
                }
            }
            27 | 28 => {
                let mut mech = Mech::new(input);
                if input.below(2) == 0 {
                    mech.m.mechanism = [CKM_ECDSA, CKM_ECDSA_SHA256][input.below(2)];
                }
                let key = if !st.private_keys.is_empty() && input.below(2) == 0 {
                    st.private_keys[input.below(st.private_keys.len())]
                } else {
                    pick(input, &st.objects)
                };
                e::C_SignInit(session, mech.ptr(), key);
            }
            29 | 30 => {
                let (mut data, null, len) = data_in(input);
                let dp = if null { null_mut() } else { data.as_mut_ptr() };
                var_out(input, "C_Sign", |out, lp| {
                    e::C_Sign(session, dp, len, out, lp)
                });
            }
            31 => {
                let (mut data, null, len) = data_in(input);
                let dp = if null { null_mut() } else { data.as_mut_ptr() };
                e::C_SignUpdate(session, dp, len);
            }
            32 => {
                var_out(input, "C_SignFinal", |out, lp| {
                    e::C_SignFinal(session, out, lp)
                });
            }
            33 => {
                let mut mech = Mech::new(input);
                e::C_VerifyInit(session, mech.ptr(), pick(input, &st.objects));
            }
            34 => {
                let (mut data, null, len) = data_in(input);
                let dp = if null { null_mut() } else { data.as_mut_ptr() };
                let (mut sig, snull, slen) = data_in(input);
                let sp = if snull { null_mut() } else { sig.as_mut_ptr() };
                if input.below(2) == 0 {
                    e::C_Verify(session, dp, len, sp, slen);
                } else {
                    e::C_VerifyUpdate(session, dp, len);
                    e::C_VerifyFinal(session, sp, slen);
                }
            }
            35 => {
                let mut mech = Mech::new(input);
                e::C_DigestInit(session, mech.ptr());
            }
            36 => {
                let (mut data, null, len) = data_in(input);
                let dp = if null { null_mut() } else { data.as_mut_ptr() };
                match input.below(3) {
                    0 => {
                        var_out(input, "C_Digest", |out, lp| {
                            e::C_Digest(session, dp, len, out, lp)
                        });
                    }
                    1 => {
                        e::C_DigestUpdate(session, dp, len);
                    }
                    _ => {
                        var_out(input, "C_DigestFinal", |out, lp| {
                            e::C_DigestFinal(session, out, lp)
                        });
                    }
                }
            }
            37 => {
                let (mut data, null, len) = data_in(input);
                let dp = if null { null_mut() } else { data.as_mut_ptr() };
                if input.below(2) == 0 {
                    e::C_SeedRandom(session, dp, len);
                } else {
                    let cap = input.below(300);
                    let mut buf = OutBuf::new(cap);
                    let p = if input.below(8) == 0 {
                        null_mut()
                    } else {
                        buf.ptr()
                    };
                    e::C_GenerateRandom(session, p, cap as CK_ULONG);
                    buf.check("C_GenerateRandom");
                }
            }
            38 => {
                let mut slot: CK_SLOT_ID = 0;
                let p = if input.below(8) == 0 {
                    null_mut()
                } else {
                    &mut slot as *mut _
                };
                // Always non-blocking: a blocking wait is unsupported, and a fuzzer must not hang.
                e::C_WaitForSlotEvent(CKF_DONT_BLOCK, p, null_mut());
            }
            _ => {
                let mut list: *mut CK_FUNCTION_LIST = null_mut();
                let p = if input.below(4) == 0 {
                    null_mut()
                } else {
                    &mut list as *mut _
                };
                devicekey_pkcs11::pkcs11::C_GetFunctionList(p);
                let mut ifaces = [std::mem::MaybeUninit::<CK_INTERFACE>::zeroed(); 4];
                let mut n: CK_ULONG = input.below(5) as CK_ULONG;
                let lp = if input.below(3) == 0 {
                    null_mut()
                } else {
                    ifaces.as_mut_ptr() as *mut CK_INTERFACE
                };
                devicekey_pkcs11::pkcs11::C_GetInterfaceList(lp, &mut n);
                let mut name = *b"PKCS 11\0";
                if input.below(2) == 0 {
                    name[input.below(7)] = input.u8() | 1;
                }
                let mut version = CK_VERSION {
                    major: input.u8() % 4,
                    minor: input.u8() % 41,
                };
                let mut iface: *mut CK_INTERFACE = null_mut();
                devicekey_pkcs11::pkcs11::C_GetInterface(
                    if input.below(2) == 0 {
                        name.as_mut_ptr()
                    } else {
                        null_mut()
                    },
                    if input.below(2) == 0 {
                        &mut version
                    } else {
                        null_mut()
                    },
                    &mut iface,
                    if input.below(4) == 0 {
                        input.u64() as CK_FLAGS
                    } else {
                        0
                    },
                );
            }
        }
    }
}

/// C_GetAttributeValue with a random template of output buffers.
fn get_attribute_value(input: &mut Input<'_>, st: &State, session: CK_SESSION_HANDLE) {
    let key_chosen = !st.private_keys.is_empty() && input.below(2) == 0;
    let obj = if key_chosen {
        st.private_keys[input.below(st.private_keys.len())]
    } else {
        pick(input, &st.objects)
    };
    let n = input.below(7);
    let mut bufs: Vec<Option<OutBuf>> = Vec::new();
    let mut attrs: Vec<CK_ATTRIBUTE> = Vec::new();
    for _ in 0..n {
        let type_ = if input.below(4) == 0 {
            CKA_VALUE
        } else {
            attribute_type(input)
        };
        if input.below(3) == 0 {
            bufs.push(None);
            attrs.push(CK_ATTRIBUTE {
                type_,
                pValue: null_mut(),
                ulValueLen: input.below(100) as CK_ULONG,
            });
        } else {
            let mut b = OutBuf::new(input.below(100));
            attrs.push(CK_ATTRIBUTE {
                type_,
                pValue: b.ptr() as *mut c_void,
                ulValueLen: b.len as CK_ULONG,
            });
            bufs.push(Some(b));
        }
    }
    let p = if n > 0 && input.below(16) == 0 {
        null_mut()
    } else {
        attrs.as_mut_ptr()
    };
    // SAFETY: each pValue is NULL or points to ulValueLen writable bytes.
    let rv = unsafe { e::C_GetAttributeValue(session, obj, p, n as CK_ULONG) };
    for (a, b) in attrs.iter().zip(&bufs) {
        if let Some(b) = b {
            b.check("C_GetAttributeValue");
            if a.ulValueLen != CK_UNAVAILABLE_INFORMATION {
                assert!(
                    a.ulValueLen as usize <= b.len,
                    "C_GetAttributeValue: {} bytes reported for a {}-byte buffer (rv {rv:#x})",
                    a.ulValueLen,
                    b.len
                );
            }
        }
        let processed = [
            CKR_OK,
            CKR_ATTRIBUTE_SENSITIVE,
            CKR_ATTRIBUTE_TYPE_INVALID,
            CKR_BUFFER_TOO_SMALL,
        ]
        .contains(&rv);
        if key_chosen && processed && a.type_ == CKA_VALUE {
            assert_eq!(
                a.ulValueLen, CK_UNAVAILABLE_INFORMATION,
                "a private key's CKA_VALUE was revealed (rv {rv:#x})"
            );
        }
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let keys = setup();
    let mut input = Input::new(data);
    // SAFETY: NULL reserved pointer.
    unsafe { e::C_Finalize(null_mut()) };
    prune(keys);
    let mut st = State::default();
    if input.below(16) != 0 {
        // SAFETY: NULL args.
        let rv = unsafe { e::C_Initialize(null_mut()) };
        assert_eq!(rv, CKR_OK, "C_Initialize on a fresh state");
    }
    let mut steps = 0;
    while !input.is_empty() && steps < 64 {
        step(&mut input, &mut st);
        steps += 1;
    }
    // SAFETY: NULL reserved pointer.
    unsafe { e::C_Finalize(null_mut()) };
}
