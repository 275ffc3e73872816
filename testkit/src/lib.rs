//! The fixtures of devicekey's integration tests (`tests/`), one crate for all of them.
//!
//! This file: locate and load the built module once per process, serialize tests (C_Initialize is
//! process-global), give each test a fresh software token in a temporary directory, and offer both
//! the `cryptoki` client and the raw function list. The modules: a private SoftHSM ([`softhsm`],
//! [`hsm_tokens`]), a throwaway swtpm ([`swtpm`]), `devicekey doctor` ([`doctor`]), `devicekey
//! serve` ([`rpc`]), the robustness knobs ([`stress`]) and what a run requires ([`require`]).
//!
//! The crate does not depend on the main crate: the tests pass it paths, strings and bytes.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use cryptoki_sys::{CK_FUNCTION_LIST, CK_RV};
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use tempfile::TempDir;

pub mod doctor;
pub mod hsm_tokens;
pub mod require;
pub mod rpc;
pub mod softhsm;
pub mod stress;
pub mod swtpm;

/// DER of the prime256v1 OID: what CKA_EC_PARAMS holds.
pub const P256_OID_DER: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// DER of the secp384r1 OID: a curve the token does not support.
pub const P384_OID_DER: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

/// Vendor attribute: protection class (CK_ULONG).
pub const CKA_DEVICEKEY_PROTECTION_CLASS: u64 = 0x8000_0000 | 0x444B_0001;
/// Vendor attribute: purpose (CK_ULONG).
pub const CKA_DEVICEKEY_PURPOSE: u64 = 0x8000_0000 | 0x444B_0002;
/// Protection class of the software store.
pub const CLASS_OS_PROTECTED: u64 = 3;
/// Purpose general.
pub const PURPOSE_GENERAL: u64 = 1;
/// Purpose proof-only.
pub const PURPOSE_PROOF: u64 = 2;

/// The token label every test config uses.
pub const TOKEN_LABEL: &str = "devicekey";

/// Environment variable that overrides the module path.
pub const MODULE_ENV: &str = "DEVICEKEY_TEST_MODULE";

/// `target/<profile>`: the directory of the built module and CLI, the parent of `deps/` where
/// the running test binary lives.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary is in target/<profile>/deps")
        .to_path_buf()
}

/// Path of the built module: `$DEVICEKEY_TEST_MODULE`, else `target/<profile>/libdevicekey_pkcs11.so`
/// next to this test binary (which lives in `target/<profile>/deps/`).
pub fn module_path() -> PathBuf {
    if let Some(p) = std::env::var_os(MODULE_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    profile_dir().join("libdevicekey_pkcs11.so")
}

/// Path of the built CLI, `target/<profile>/devicekey` (cargo builds it before the integration
/// tests run).
pub fn bin_path() -> PathBuf {
    profile_dir().join("devicekey")
}

fn check_module_exists() -> PathBuf {
    let path = module_path();
    assert!(
        path.exists(),
        "PKCS#11 module not found at {} (run `cargo build`, or set {MODULE_ENV})",
        path.display()
    );
    path
}

/// The module loaded once through `cryptoki_sys` (never unloaded): gives the exported symbols,
/// including the PKCS#11 3.0 `C_GetInterfaceList` / `C_GetInterface`.
pub fn raw_lib() -> &'static cryptoki_sys::Pkcs11 {
    static LIB: OnceLock<cryptoki_sys::Pkcs11> = OnceLock::new();
    LIB.get_or_init(|| {
        let path = check_module_exists();
        // SAFETY: loading a PKCS#11 module runs its initializers; the module is ours and is
        // built to be loaded this way. The handle is kept for the life of the process.
        unsafe { cryptoki_sys::Pkcs11::new(&path) }
            .unwrap_or_else(|e| panic!("cannot load {}: {e}", path.display()))
    })
}

struct FnList(&'static CK_FUNCTION_LIST);

/// The module's raw 2.x function list, from `C_GetFunctionList`.
pub fn fl() -> &'static CK_FUNCTION_LIST {
    static LIST: OnceLock<FnList> = OnceLock::new();
    LIST.get_or_init(|| {
        let lib = raw_lib();
        let mut p: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
        // SAFETY: C_GetFunctionList writes one pointer to a static list inside the module, which
        // stays loaded for the life of the process (raw_lib never unloads it).
        let rv = unsafe { lib.C_GetFunctionList(&mut p) };
        assert_eq!(
            rv,
            cryptoki_sys::CKR_OK,
            "C_GetFunctionList: {}",
            rv_name(rv)
        );
        assert!(!p.is_null(), "C_GetFunctionList gave NULL");
        // SAFETY: non-NULL, points to the module's static function list (see above).
        FnList(unsafe { &*p })
    })
    .0
}

/// Calls one entry of the raw function list: `ck!(C_GetInfo)(&mut info)`. Panics if NULL.
#[macro_export]
macro_rules! ck {
    ($name:ident) => {
        $crate::fl()
            .$name
            .expect(concat!(stringify!($name), " is NULL in the function list"))
    };
}

/// The cryptoki context, created once per process (loading the module once).
pub fn ctx() -> &'static Pkcs11 {
    static CTX: OnceLock<Pkcs11> = OnceLock::new();
    CTX.get_or_init(|| {
        let _ = raw_lib();
        let path = check_module_exists();
        Pkcs11::new(&path)
            .unwrap_or_else(|e| panic!("cryptoki cannot load {}: {e}", path.display()))
    })
}

/// A readable name for a CK_RV.
pub fn rv_name(rv: CK_RV) -> String {
    match cryptoki::error::Rv::from(rv) {
        cryptoki::error::Rv::Ok => "CKR_OK".to_string(),
        cryptoki::error::Rv::Error(e) => format!("{e:?} (0x{rv:x})"),
    }
}

/// Asserts a raw CK_RV equals the expected one, with readable names.
#[macro_export]
macro_rules! assert_rv {
    ($actual:expr, $expected:expr) => {{
        let a: cryptoki_sys::CK_RV = $actual;
        let e: cryptoki_sys::CK_RV = $expected;
        assert!(
            a == e,
            "expected {}, got {}",
            $crate::rv_name(e),
            $crate::rv_name(a)
        );
    }};
    ($actual:expr, $expected:expr, $($msg:tt)+) => {{
        let a: cryptoki_sys::CK_RV = $actual;
        let e: cryptoki_sys::CK_RV = $expected;
        assert!(
            a == e,
            "{}: expected {}, got {}",
            format!($($msg)+),
            $crate::rv_name(e),
            $crate::rv_name(a)
        );
    }};
}

/// The RvError of a failed cryptoki call; panics on success or a non-PKCS#11 error.
pub fn rv_err<T: std::fmt::Debug>(r: cryptoki::error::Result<T>) -> RvError {
    match r {
        Err(Error::Pkcs11(e, _)) => e,
        other => panic!("expected a PKCS#11 error, got {other:?}"),
    }
}

/// Asserts a cryptoki call failed with one of `expected`.
pub fn expect_err<T: std::fmt::Debug>(r: cryptoki::error::Result<T>, expected: &[RvError]) {
    let e = rv_err(r);
    assert!(
        expected.contains(&e),
        "expected one of {expected:?}, got {e:?}"
    );
}

static LOCK: Mutex<()> = Mutex::new(());

/// Serializes tests in one process (C_Initialize is process-global).
pub fn lock() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Writes a one-slot software config into `root` and points the environment at it.
pub fn write_config(root: &Path) -> PathBuf {
    let config = root.join("devicekey.toml");
    let keys = root.join("keys");
    std::fs::write(
        &config,
        format!(
            "[[slot]]\nlabel = \"{TOKEN_LABEL}\"\nbackend = \"software\"\ndir = \"{}\"\n",
            keys.display()
        ),
    )
    .expect("write config");
    config
}

/// Points the module at `config` (and keeps XDG paths inside the test directory).
pub fn use_config(config: &Path) {
    let root = config.parent().expect("config has a parent");
    std::env::set_var("DEVICEKEY_CONFIG", config);
    std::env::set_var("XDG_DATA_HOME", root.join("xdg-data"));
    std::env::set_var("XDG_CONFIG_HOME", root.join("xdg-config"));
}

/// One test's view of the module: holds the process lock, a fresh config in a temporary
/// directory, and the (initialized) cryptoki context. Finalizes on drop.
pub struct Token {
    /// The cryptoki context (a clone of the process-wide one).
    pub ctx: Pkcs11,
    /// The temporary directory (config and keys); `None` in a child process that was given a config.
    pub dir: Option<TempDir>,
    /// The config file.
    pub config: PathBuf,
    _guard: MutexGuard<'static, ()>,
}

impl Token {
    /// Lock, fresh config, C_Initialize(OS_LOCKING_OK).
    // Not a Default: it takes the process-wide lock and initializes the module.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Token {
        let mut t = Token::uninitialized();
        t.initialize();
        t
    }

    /// Lock and fresh config, without C_Initialize.
    pub fn uninitialized() -> Token {
        let guard = lock();
        let dir = tempfile::Builder::new()
            .prefix("devicekey-test-")
            .tempdir()
            .expect("tempdir");
        let config = write_config(dir.path());
        use_config(&config);
        let ctx = ctx().clone();
        // Make sure no earlier test left the module initialized.
        // SAFETY: C_Finalize with NULL is always a valid call.
        let _ = unsafe { ck!(C_Finalize)(std::ptr::null_mut()) };
        Token {
            ctx,
            dir: Some(dir),
            config,
            _guard: guard,
        }
    }

    /// For a child process: use the config named by DEVICEKEY_CONFIG (set by the parent).
    pub fn from_env_config() -> Token {
        let guard = lock();
        let config = PathBuf::from(std::env::var_os("DEVICEKEY_CONFIG").expect("DEVICEKEY_CONFIG"));
        let ctx = ctx().clone();
        let mut t = Token {
            ctx,
            dir: None,
            config,
            _guard: guard,
        };
        t.initialize();
        t
    }

    /// The temporary directory.
    pub fn root(&self) -> &Path {
        self.config.parent().expect("config has a parent")
    }

    /// C_Initialize with OS locking.
    pub fn initialize(&mut self) {
        self.ctx
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .expect("C_Initialize");
    }

    /// C_Finalize.
    pub fn finalize(&mut self) {
        self.ctx.clone().finalize().expect("C_Finalize");
    }

    /// C_Finalize then C_Initialize.
    pub fn reinitialize(&mut self) {
        self.finalize();
        self.initialize();
    }

    /// The (single) slot with a token.
    pub fn slot(&self) -> Slot {
        let slots = self.ctx.get_slots_with_token().expect("C_GetSlotList");
        assert_eq!(slots.len(), 1, "one configured slot, got {slots:?}");
        slots[0]
    }

    /// A read-write session on the slot.
    pub fn session(&self) -> Session {
        self.ctx
            .open_rw_session(self.slot())
            .expect("C_OpenSession RW")
    }

    /// A read-only session on the slot.
    pub fn ro_session(&self) -> Session {
        self.ctx
            .open_ro_session(self.slot())
            .expect("C_OpenSession RO")
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        // SAFETY: C_Finalize with NULL is always a valid call; an error (not initialized) is fine.
        let _ = unsafe { ck!(C_Finalize)(std::ptr::null_mut()) };
    }
}

/// Public template for a P-256 key pair.
pub fn pub_template(label: &str, token: bool) -> Vec<Attribute> {
    vec![
        Attribute::Token(token),
        Attribute::EcParams(P256_OID_DER.to_vec()),
        Attribute::Verify(true),
        Attribute::Label(label.as_bytes().to_vec()),
    ]
}

/// Private template for a P-256 key pair.
pub fn priv_template(label: &str, token: bool) -> Vec<Attribute> {
    vec![
        Attribute::Token(token),
        Attribute::Sign(true),
        Attribute::Sensitive(true),
        Attribute::Label(label.as_bytes().to_vec()),
    ]
}

/// Generates a P-256 key pair; returns (public, private).
pub fn gen_p256(s: &Session, label: &str, token: bool) -> (ObjectHandle, ObjectHandle) {
    try_gen_p256(s, label, token).unwrap_or_else(|e| panic!("C_GenerateKeyPair({label}): {e}"))
}

/// C_GenerateKeyPair of a P-256 key pair with the usual templates; returns (public, private).
pub fn try_gen_p256(
    s: &Session,
    label: &str,
    token: bool,
) -> cryptoki::error::Result<(ObjectHandle, ObjectHandle)> {
    s.generate_key_pair(
        &Mechanism::EccKeyPairGen,
        &pub_template(label, token),
        &priv_template(label, token),
    )
}

/// One attribute's raw bytes, or None when unavailable.
pub fn attr_bytes(s: &Session, h: ObjectHandle, t: AttributeType) -> Option<Vec<u8>> {
    let attrs = s.get_attributes(h, &[t]).expect("C_GetAttributeValue");
    attrs.into_iter().next().map(|a| match a {
        Attribute::EcParams(v)
        | Attribute::EcPoint(v)
        | Attribute::Id(v)
        | Attribute::Label(v)
        | Attribute::Value(v)
        | Attribute::Subject(v)
        | Attribute::Issuer(v)
        | Attribute::SerialNumber(v)
        | Attribute::Application(v) => v,
        Attribute::VendorDefined((_, v)) => v,
        other => panic!("attr_bytes: unexpected {other:?}"),
    })
}

/// A CK_ULONG vendor attribute.
pub fn vendor_ulong(s: &Session, h: ObjectHandle, t: u64) -> Option<u64> {
    attr_bytes(s, h, AttributeType::VendorDefined(t)).map(|v| {
        let arr: [u8; 8] = v.as_slice().try_into().unwrap_or_else(|_| {
            panic!(
                "vendor attribute 0x{t:x} is {} bytes, want a CK_ULONG (8)",
                v.len()
            )
        });
        u64::from_ne_bytes(arr)
    })
}

/// The label of an object as a string.
pub fn label_of(s: &Session, h: ObjectHandle) -> String {
    String::from_utf8(attr_bytes(s, h, AttributeType::Label).expect("CKA_LABEL")).expect("utf-8")
}

/// The CKA_ID of an object.
pub fn id_of(s: &Session, h: ObjectHandle) -> Vec<u8> {
    attr_bytes(s, h, AttributeType::Id).expect("CKA_ID")
}

/// The uncompressed SEC1 point (65 bytes) of a public key, checking CKA_EC_POINT is a DER
/// OCTET STRING `04 41 04||X||Y`.
pub fn public_point(s: &Session, public: ObjectHandle) -> Vec<u8> {
    let der = attr_bytes(s, public, AttributeType::EcPoint).expect("CKA_EC_POINT");
    assert_eq!(der.len(), 67, "CKA_EC_POINT length: {der:02x?}");
    assert_eq!(
        &der[..3],
        &[0x04, 0x41, 0x04],
        "CKA_EC_POINT is not DER OCTET STRING of an uncompressed point"
    );
    der[2..].to_vec()
}

/// The public key matching a private key (same CKA_ID).
pub fn public_for(s: &Session, private: ObjectHandle) -> ObjectHandle {
    let id = id_of(s, private);
    let found = s
        .find_objects(&[Attribute::Class(ObjectClass::PUBLIC_KEY), Attribute::Id(id)])
        .expect("C_FindObjects");
    assert_eq!(found.len(), 1, "one public key per CKA_ID");
    found[0]
}

/// ECDSA input as the spec treats it for a 256-bit key: shorter inputs are left-padded as
/// integers, longer ones truncated to the leftmost 32 bytes.
pub fn normalize_digest(d: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    if d.len() >= 32 {
        out.copy_from_slice(&d[..32]);
    } else {
        out[32 - d.len()..].copy_from_slice(d);
    }
    out
}

/// Verifies a raw r||s signature over a 32-byte digest with p256.
pub fn verify_prehash(point: &[u8], digest32: &[u8; 32], sig: &[u8]) -> bool {
    let vk = p256::ecdsa::VerifyingKey::from_sec1_bytes(point).expect("valid P-256 point");
    let Ok(sig) = p256::ecdsa::Signature::from_slice(sig) else {
        return false;
    };
    vk.verify_prehash(digest32, &sig).is_ok()
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

/// Runs this test binary again as a child process running exactly one (ignored) test, with the
/// given extra environment.
pub fn spawn_self(test_name: &str, envs: &[(&str, String)]) -> std::process::Child {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = std::process::Command::new(exe);
    cmd.args([
        test_name,
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    cmd.spawn().expect("spawn child test process")
}

/// [`spawn_self`], then waits for the child and fails unless it succeeded (its stdout and stderr
/// in the message).
pub fn run_self_ok(test_name: &str, envs: &[(&str, String)]) {
    let out = spawn_self(test_name, envs)
        .wait_with_output()
        .expect("wait for the child test process");
    assert!(
        out.status.success(),
        "child {test_name}: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Milliseconds since the Unix epoch.
pub fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// A `CK_MECHANISM` without parameters.
pub fn mech(m: cryptoki_sys::CK_MECHANISM_TYPE) -> cryptoki_sys::CK_MECHANISM {
    cryptoki_sys::CK_MECHANISM {
        mechanism: m,
        pParameter: std::ptr::null_mut(),
        ulParameterLen: 0,
    }
}

/// Raw C_SignInit with a mechanism without parameters.
pub fn sign_init(s: &Session, m: cryptoki_sys::CK_MECHANISM_TYPE, key: ObjectHandle) -> CK_RV {
    let mut m = mech(m);
    // SAFETY: m is a live CK_MECHANISM without parameters.
    unsafe { ck!(C_SignInit)(s.handle(), &mut m, key.handle()) }
}

/// Raw C_Sign with an output buffer of `buf_len` bytes (NULL when None) inside a 100-byte canary.
pub fn sign_raw(
    s: &Session,
    data: &[u8],
    buf_len: Option<usize>,
) -> (CK_RV, cryptoki_sys::CK_ULONG, Vec<u8>) {
    let mut buf = vec![0xAAu8; 100];
    let mut len = buf_len.unwrap_or(0) as cryptoki_sys::CK_ULONG;
    let out = if buf_len.is_some() {
        buf.as_mut_ptr()
    } else {
        std::ptr::null_mut()
    };
    // SAFETY: data is readable for data.len() bytes; out is NULL or has 100 >= len bytes.
    let rv = unsafe {
        ck!(C_Sign)(
            s.handle(),
            data.as_ptr() as *mut u8,
            data.len() as cryptoki_sys::CK_ULONG,
            out,
            &mut len,
        )
    };
    (rv, len, buf)
}
