//! Two slots at once through the built module: the software store (slot 0, `os_protected`) and a
//! SoftHSM-backed pkcs11 slot declared `hardware_tpm` (slot 1).
//!
//! Covers the SoftHSM slot end to end (slot list, labels, models, keygen, find, attributes with the
//! EC point compared to what SoftHSM itself reports, CKM_ECDSA and CKM_ECDSA_SHA256 signatures
//! verified with p256, the vendor protection class on both slots, 4 threads signing at once), and
//! the broken cases (missing wrapped module, wrong token label, wrong PIN): the HSM slot has no
//! token, the log names the problem and the fix, and the software slot keeps working.
//!
//! SoftHSM reads SOFTHSM2_CONF and its token directory when it is initialized, so every token
//! this process needs is created up front in a private token directory (one per test).
//! Skipped (with a message) when SoftHSM is not installed.

use testkit as common;

use std::path::PathBuf;
use std::sync::{Barrier, OnceLock};

use common::softhsm::{self, have_softhsm, PIN};
use common::*;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::slot::Slot;

/// The variable the HSM slot reads its PIN from.
const PIN_ENV: &str = "DEVICEKEY_TWO_SLOTS_PIN";
/// A variable holding a wrong PIN.
const WRONG_PIN_ENV: &str = "DEVICEKEY_TWO_SLOTS_WRONG_PIN";
/// Our token label of the HSM slot.
const HSM_LABEL: &str = "devicekey-hsm";
/// CKA_DEVICEKEY_PROTECTION_CLASS of a hardware_tpm key.
const CLASS_HARDWARE_TPM: u64 = 1;

/// The tokens of a test process, one per test (SoftHSM sees only tokens that exist when it is
/// initialized).
const TAGS: &[&str] = &["slots", "keys", "threads", "classes", "pin", "persist"];

struct Fixture {
    dir: PathBuf,
    log: PathBuf,
}

fn token_label(tag: &str) -> String {
    softhsm::token_label("dk2s", tag)
}

/// Sets up SoftHSM, the tokens and the module's log file. Call with the test lock held and before
/// the module's first C_Initialize (the module opens its log file once per process).
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = softhsm::process_dir("pkcs11-two-slots");
        let conf = softhsm::write_conf(&dir);
        let log = dir.join("module.log");
        std::env::set_var("SOFTHSM2_CONF", &conf);
        std::env::set_var(PIN_ENV, PIN);
        std::env::set_var(WRONG_PIN_ENV, "999999");
        std::env::set_var("DEVICEKEY_LOG", "warn");
        std::env::set_var("DEVICEKEY_LOG_FILE", &log);
        for tag in TAGS {
            softhsm::init_token(&conf, &token_label(tag));
        }
        Fixture { dir, log }
    })
}

/// The module's log so far (bytes), to read only what a test adds.
fn log_len() -> u64 {
    std::fs::metadata(&fixture().log)
        .map(|m| m.len())
        .unwrap_or(0)
}

/// The module's log lines written since `offset`.
fn log_since(offset: u64) -> String {
    let all = std::fs::read(&fixture().log).unwrap_or_default();
    let start = usize::try_from(offset).unwrap_or(usize::MAX).min(all.len());
    String::from_utf8_lossy(&all[start..]).into_owned()
}

/// Asserts one log line (since `offset`) contains every one of `needles`.
fn assert_log_line(offset: u64, needles: &[&str]) {
    let text = log_since(offset);
    assert!(
        text.lines().any(|l| needles.iter().all(|n| l.contains(n))),
        "no log line contains all of {needles:?}; the module logged:\n{text}"
    );
}

/// What the HSM slot (the second `[[slot]]`) says.
struct HsmSlot<'a> {
    module: &'a str,
    token: &'a str,
    pin_env: &'a str,
}

impl HsmSlot<'_> {
    fn good(token: &str) -> HsmSlot<'_> {
        HsmSlot {
            module: softhsm::module(),
            token,
            pin_env: PIN_ENV,
        }
    }
}

/// The module with a software slot and a pkcs11 slot: holds the test lock, C_Initialize done.
struct TwoSlots {
    t: Token,
    /// The software slot (slot 0).
    sw: Slot,
    /// The pkcs11 slot (slot 1).
    hsm: Slot,
}

impl TwoSlots {
    fn new(hsm: HsmSlot<'_>) -> TwoSlots {
        let mut t = Token::uninitialized();
        fixture();
        let config = t.root().join("two-slots.toml");
        std::fs::write(
            &config,
            format!(
                r#"[[slot]]
label = "{TOKEN_LABEL}"
backend = "software"
dir = "{}"

[[slot]]
label = "{HSM_LABEL}"
backend = "pkcs11"
module = "{}"
token = "{}"
pin_env = "{}"
protection_class = "hardware_tpm"
"#,
                t.root().join("keys").display(),
                hsm.module,
                hsm.token,
                hsm.pin_env
            ),
        )
        .expect("write config");
        use_config(&config);
        t.config = config;
        t.initialize();
        let all = t.ctx.get_all_slots().expect("C_GetSlotList(FALSE)");
        assert_eq!(all.len(), 2, "two configured slots, got {all:?}");
        TwoSlots {
            sw: all[0],
            hsm: all[1],
            t,
        }
    }

    fn ctx(&self) -> &Pkcs11 {
        &self.t.ctx
    }

    fn session(&self, slot: Slot) -> Session {
        self.ctx()
            .open_rw_session(slot)
            .unwrap_or_else(|e| panic!("C_OpenSession on slot {}: {e}", slot.id()))
    }
}

/// Generates a P-256 pair with CKA_ID `id` and label `label`; returns (public, private).
fn gen_with_id(s: &Session, id: &[u8], label: &str) -> (ObjectHandle, ObjectHandle) {
    let mut public = pub_template(label, true);
    public.push(Attribute::Id(id.to_vec()));
    let mut private = priv_template(label, true);
    private.push(Attribute::Id(id.to_vec()));
    s.generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)
        .unwrap_or_else(|e| panic!("C_GenerateKeyPair({label}): {e}"))
}

/// One boolean attribute.
fn attr_bool(s: &Session, h: ObjectHandle, t: AttributeType) -> bool {
    let attrs = s.get_attributes(h, &[t]).expect("C_GetAttributeValue");
    match attrs.first() {
        Some(Attribute::Token(v))
        | Some(Attribute::Sensitive(v))
        | Some(Attribute::Extractable(v))
        | Some(Attribute::AlwaysSensitive(v))
        | Some(Attribute::NeverExtractable(v))
        | Some(Attribute::Sign(v))
        | Some(Attribute::Private(v)) => *v,
        other => panic!("attribute {t:?}: unexpected {other:?}"),
    }
}

/// Signs with CKM_ECDSA (a digest of `len` bytes) and CKM_ECDSA_SHA256, checks both with p256.
fn sign_both_and_verify(s: &Session, private: ObjectHandle, point: &[u8], msg: &[u8]) {
    let digest = sha256(msg);
    for len in [20usize, 32, 48] {
        let input: Vec<u8> = digest.iter().cycle().take(len).copied().collect();
        let sig = s
            .sign(&Mechanism::Ecdsa, private, &input)
            .unwrap_or_else(|e| panic!("C_Sign CKM_ECDSA ({len}-byte input): {e}"));
        assert_eq!(sig.len(), 64, "CKM_ECDSA signature is raw r||s");
        assert!(
            verify_prehash(point, &normalize_digest(&input), &sig),
            "CKM_ECDSA signature over a {len}-byte input does not verify"
        );
    }
    let sig = s
        .sign(&Mechanism::EcdsaSha256, private, msg)
        .unwrap_or_else(|e| panic!("C_Sign CKM_ECDSA_SHA256: {e}"));
    assert_eq!(sig.len(), 64, "CKM_ECDSA_SHA256 signature is raw r||s");
    assert!(
        verify_prehash(point, &digest, &sig),
        "CKM_ECDSA_SHA256 signature does not verify"
    );
    let mut other = msg.to_vec();
    other.push(0);
    assert!(
        !verify_prehash(point, &sha256(&other), &sig),
        "a signature verified over other data"
    );
}

/// The software slot still makes keys and signs.
fn software_slot_works(two: &TwoSlots, label: &str) {
    let s = two.session(two.sw);
    let (public, private) = gen_p256(&s, label, true);
    let point = public_point(&s, public);
    sign_both_and_verify(&s, private, &point, label.as_bytes());
    assert_eq!(
        vendor_ulong(&s, private, CKA_DEVICEKEY_PROTECTION_CLASS),
        Some(CLASS_OS_PROTECTED)
    );
}

/// SoftHSM opened directly in this process. Our module already initialized it (same library), so
/// C_Initialize answers CKR_CRYPTOKI_ALREADY_INITIALIZED; if it did not, we finalize it on drop.
struct DirectSoftHsm {
    ctx: Pkcs11,
    ours: bool,
}

impl DirectSoftHsm {
    fn open() -> DirectSoftHsm {
        let ctx = Pkcs11::new(softhsm::module()).expect("load SoftHSM");
        let ours = match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) => true,
            Err(Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => false,
            Err(e) => panic!("SoftHSM C_Initialize: {e}"),
        };
        DirectSoftHsm { ctx, ours }
    }

    fn session(&self, token: &str) -> Session {
        let slot = self
            .ctx
            .get_slots_with_token()
            .expect("SoftHSM C_GetSlotList")
            .into_iter()
            .find(|s| {
                self.ctx
                    .get_token_info(*s)
                    .is_ok_and(|i| i.label().trim_end() == token)
            })
            .unwrap_or_else(|| panic!("SoftHSM has no token {token}"));
        self.ctx
            .open_ro_session(slot)
            .expect("SoftHSM C_OpenSession")
    }
}

impl Drop for DirectSoftHsm {
    fn drop(&mut self) {
        if self.ours {
            let _ = self.ctx.clone().finalize();
        }
    }
}

/// The one object of `class` with CKA_ID `id`.
fn one_by_id(s: &Session, class: ObjectClass, id: &[u8]) -> ObjectHandle {
    let found = s
        .find_objects(&[Attribute::Class(class), Attribute::Id(id.to_vec())])
        .expect("C_FindObjects");
    assert_eq!(found.len(), 1, "objects of {class:?} with id {id:02x?}");
    found[0]
}

// ------------------------------------------------------------------------------------------------

#[test]
fn both_slots_listed_with_labels_models_and_flags() {
    if !have_softhsm() {
        return;
    }
    let token = token_label("slots");
    let two = TwoSlots::new(HsmSlot::good(&token));
    let ctx = two.ctx();
    let present = ctx.get_slots_with_token().expect("C_GetSlotList(TRUE)");
    assert_eq!(present, vec![two.sw, two.hsm], "both slots have a token");

    let sw = ctx.get_token_info(two.sw).expect("C_GetTokenInfo software");
    assert_eq!(sw.label().trim_end(), TOKEN_LABEL);
    assert_eq!(sw.model().trim_end(), "os_protected");
    assert_eq!(sw.manufacturer_id().trim_end(), "devicekey");

    let hsm = ctx.get_token_info(two.hsm).expect("C_GetTokenInfo pkcs11");
    assert_eq!(hsm.label().trim_end(), HSM_LABEL);
    assert_eq!(hsm.model().trim_end(), "hardware_tpm");
    assert!(hsm.token_initialized());
    assert!(
        !hsm.login_required(),
        "our token needs no PIN; the wrapped token's PIN comes from the config"
    );

    let sw_slot = ctx.get_slot_info(two.sw).expect("C_GetSlotInfo software");
    let hsm_slot = ctx.get_slot_info(two.hsm).expect("C_GetSlotInfo pkcs11");
    assert!(sw_slot.token_present() && hsm_slot.token_present());
    assert!(
        hsm_slot.hardware_slot(),
        "a hardware_tpm slot is a hardware slot"
    );
    assert!(!sw_slot.hardware_slot(), "the software slot is not");

    // Both slots offer the mechanisms; the combined one on the pkcs11 slot too (we hash).
    for slot in [two.sw, two.hsm] {
        let mechs = ctx.get_mechanism_list(slot).expect("C_GetMechanismList");
        for m in [
            cryptoki::mechanism::MechanismType::ECC_KEY_PAIR_GEN,
            cryptoki::mechanism::MechanismType::ECDSA,
            cryptoki::mechanism::MechanismType::ECDSA_SHA256,
        ] {
            assert!(mechs.contains(&m), "slot {} lacks {m}", slot.id());
        }
    }
}

#[test]
fn softhsm_slot_keygen_find_attributes_and_sign() {
    if !have_softhsm() {
        return;
    }
    let token = token_label("keys");
    let two = TwoSlots::new(HsmSlot::good(&token));
    let s = two.session(two.hsm);
    let id = [0xd2, 0x51, 0x07];
    let (public, private) = gen_with_id(&s, &id, "hsm-key");

    // Find: by class and id, by label, and the pair shares CKA_ID.
    assert_eq!(one_by_id(&s, ObjectClass::PRIVATE_KEY, &id), private);
    assert_eq!(one_by_id(&s, ObjectClass::PUBLIC_KEY, &id), public);
    let by_label = s
        .find_objects(&[Attribute::Label(b"hsm-key".to_vec())])
        .expect("C_FindObjects by label");
    assert_eq!(by_label.len(), 2, "both halves by label: {by_label:?}");
    assert!(by_label.contains(&public) && by_label.contains(&private));
    assert_eq!(public_for(&s, private), public);
    // The key is on the HSM slot only.
    let sw = two.session(two.sw);
    assert!(sw
        .find_objects(&[Attribute::Id(id.to_vec())])
        .expect("C_FindObjects on the software slot")
        .is_empty());

    // Attributes through our module.
    assert_eq!(
        attr_bytes(&s, public, AttributeType::EcParams).as_deref(),
        Some(P256_OID_DER)
    );
    let point = public_point(&s, public);
    assert!(attr_bool(&s, private, AttributeType::Token));
    assert!(attr_bool(&s, private, AttributeType::Sensitive));
    assert!(!attr_bool(&s, private, AttributeType::Extractable));
    assert!(attr_bool(&s, private, AttributeType::AlwaysSensitive));
    assert!(attr_bool(&s, private, AttributeType::NeverExtractable));
    assert!(attr_bool(&s, private, AttributeType::Sign));
    assert_eq!(label_of(&s, private), "hsm-key");
    assert_eq!(id_of(&s, private), id);
    for h in [public, private] {
        assert_eq!(
            vendor_ulong(&s, h, CKA_DEVICEKEY_PROTECTION_CLASS),
            Some(CLASS_HARDWARE_TPM),
            "CKA_DEVICEKEY_PROTECTION_CLASS of a key on the hardware_tpm slot"
        );
    }
    let value = s.get_attributes(private, &[AttributeType::Value]);
    assert!(
        !matches!(&value, Ok(v) if v.iter().any(|a| matches!(a, Attribute::Value(_)))),
        "CKA_VALUE of the private key was readable: {value:?}"
    );

    // The EC point is the one SoftHSM itself reports, and the key lives in SoftHSM as a token
    // key that cannot leave it.
    {
        let direct = DirectSoftHsm::open();
        assert!(
            !direct.ours,
            "our module had not initialized SoftHSM although its slot is open"
        );
        let ds = direct.session(&token);
        let their_pub = one_by_id(&ds, ObjectClass::PUBLIC_KEY, &id);
        let theirs = attr_bytes(&ds, their_pub, AttributeType::EcPoint).expect("SoftHSM point");
        let ours = attr_bytes(&s, public, AttributeType::EcPoint).expect("our point");
        assert_eq!(ours, theirs, "CKA_EC_POINT differs from SoftHSM's");
        assert_eq!(label_of(&ds, their_pub), "hsm-key");
        // The application is logged in to SoftHSM (by our module), so its private keys show.
        let their_priv = one_by_id(&ds, ObjectClass::PRIVATE_KEY, &id);
        assert!(attr_bool(&ds, their_priv, AttributeType::Token));
        assert!(attr_bool(&ds, their_priv, AttributeType::Sensitive));
        assert!(!attr_bool(&ds, their_priv, AttributeType::Extractable));
    }

    // Signatures verify with the public key (SoftHSM's own point, compared above).
    sign_both_and_verify(&s, private, &point, b"signed on the SoftHSM slot");
    // A multi-part CKM_ECDSA_SHA256 signature too.
    let msg = vec![0x5a_u8; 3000];
    s.sign_init(&Mechanism::EcdsaSha256, private)
        .expect("C_SignInit");
    s.sign_update(&msg[..1000]).expect("C_SignUpdate");
    s.sign_update(&msg[1000..]).expect("C_SignUpdate");
    let sig = s.sign_final().expect("C_SignFinal");
    assert!(verify_prehash(&point, &sha256(&msg), &sig));
}

#[test]
fn softhsm_keys_persist_across_reinitialize() {
    if !have_softhsm() {
        return;
    }
    let token = token_label("persist");
    let mut two = TwoSlots::new(HsmSlot::good(&token));
    let id = [0x77, 0x01];
    let point = {
        let s = two.session(two.hsm);
        let (public, _) = gen_with_id(&s, &id, "persisted");
        public_point(&s, public)
    };
    two.t.reinitialize();
    let s = two.session(two.hsm);
    let private = one_by_id(&s, ObjectClass::PRIVATE_KEY, &id);
    let public = one_by_id(&s, ObjectClass::PUBLIC_KEY, &id);
    assert_eq!(public_point(&s, public), point);
    assert_eq!(
        vendor_ulong(&s, private, CKA_DEVICEKEY_PROTECTION_CLASS),
        Some(CLASS_HARDWARE_TPM)
    );
    sign_both_and_verify(&s, private, &point, b"after C_Finalize and C_Initialize");
}

#[test]
fn protection_class_attribute_per_slot() {
    if !have_softhsm() {
        return;
    }
    let token = token_label("classes");
    let two = TwoSlots::new(HsmSlot::good(&token));
    for (slot, want) in [(two.sw, CLASS_OS_PROTECTED), (two.hsm, CLASS_HARDWARE_TPM)] {
        let s = two.session(slot);
        let (public, private) = gen_p256(&s, &format!("class-{want}"), true);
        for h in [public, private] {
            assert_eq!(
                vendor_ulong(&s, h, CKA_DEVICEKEY_PROTECTION_CLASS),
                Some(want),
                "slot {}",
                slot.id()
            );
        }
        // Find by the vendor attribute.
        let found = s
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::VendorDefined((
                    AttributeType::VendorDefined(CKA_DEVICEKEY_PROTECTION_CLASS),
                    want.to_ne_bytes().to_vec(),
                )),
            ])
            .expect("C_FindObjects by class");
        assert_eq!(found, vec![private], "slot {}", slot.id());
        let point = public_point(&s, public);
        sign_both_and_verify(&s, private, &point, b"class check");
    }
}

#[test]
fn four_threads_sign_on_the_softhsm_slot_at_once() {
    if !have_softhsm() {
        return;
    }
    let token = token_label("threads");
    let two = TwoSlots::new(HsmSlot::good(&token));
    let (point, id) = {
        let s = two.session(two.hsm);
        let id = vec![0x4b, 0x01];
        let (public, _) = gen_with_id(&s, &id, "threads");
        (public_point(&s, public), id)
    };
    const THREADS: usize = 4;
    const ROUNDS: usize = 25;
    let barrier = Barrier::new(THREADS);
    let verified = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (ctx, slot, barrier, point, id) = (two.ctx(), two.hsm, &barrier, &point, &id);
                scope.spawn(move || {
                    let s = ctx.open_ro_session(slot).expect("C_OpenSession");
                    let private = one_by_id(&s, ObjectClass::PRIVATE_KEY, id);
                    barrier.wait();
                    let mut n = 0;
                    for r in 0..ROUNDS {
                        let msg = format!("thread {t} round {r}");
                        let (mech, input) = if r % 2 == 0 {
                            (Mechanism::Ecdsa, sha256(msg.as_bytes()).to_vec())
                        } else {
                            (Mechanism::EcdsaSha256, msg.as_bytes().to_vec())
                        };
                        let sig = s
                            .sign(&mech, private, &input)
                            .unwrap_or_else(|e| panic!("thread {t} round {r}: C_Sign: {e}"));
                        assert!(
                            verify_prehash(point, &sha256(msg.as_bytes()), &sig),
                            "thread {t} round {r}: signature does not verify"
                        );
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("signing thread panicked"))
            .sum::<usize>()
    });
    assert_eq!(verified, THREADS * ROUNDS);
}

/// The HSM slot has no token; the software slot is untouched.
fn assert_hsm_slot_absent(two: &TwoSlots) {
    let ctx = two.ctx();
    let present = ctx.get_slots_with_token().expect("C_GetSlotList(TRUE)");
    assert_eq!(present, vec![two.sw], "only the software slot has a token");
    assert_eq!(
        ctx.get_all_slots().expect("C_GetSlotList(FALSE)"),
        vec![two.sw, two.hsm],
        "the broken slot is still listed without a token"
    );
    let info = ctx.get_slot_info(two.hsm).expect("C_GetSlotInfo");
    assert!(
        !info.token_present(),
        "CKF_TOKEN_PRESENT on the broken slot"
    );
    expect_err(ctx.get_token_info(two.hsm), &[RvError::TokenNotPresent]);
    expect_err(ctx.open_rw_session(two.hsm), &[RvError::TokenNotPresent]);
    expect_err(ctx.open_ro_session(two.hsm), &[RvError::TokenNotPresent]);
    let sw = ctx.get_token_info(two.sw).expect("C_GetTokenInfo software");
    assert_eq!(sw.model().trim_end(), "os_protected");
}

#[test]
fn missing_wrapped_module_leaves_the_software_slot_working() {
    if !have_softhsm() {
        return;
    }
    let offset = log_len();
    let missing = fixture()
        .dir
        .join(format!("no-such-module-{}.so", now_millis()));
    let missing = missing.to_str().expect("utf-8 path").to_string();
    let token = token_label("slots");
    let two = TwoSlots::new(HsmSlot {
        module: &missing,
        token: &token,
        pin_env: PIN_ENV,
    });
    assert_hsm_slot_absent(&two);
    assert_log_line(
        offset,
        &[&missing, "cannot be found", "fix:", "correct `module`"],
    );
    software_slot_works(&two, "after-missing-module");
}

#[test]
fn wrong_token_label_leaves_the_software_slot_working() {
    if !have_softhsm() {
        return;
    }
    let offset = log_len();
    let wrong = format!("dk2s-absent-{}", now_millis() % 1_000_000);
    let two = TwoSlots::new(HsmSlot {
        module: softhsm::module(),
        token: &wrong,
        pin_env: PIN_ENV,
    });
    assert_hsm_slot_absent(&two);
    assert_log_line(
        offset,
        &[
            &format!("no token labelled '{wrong}'"),
            "fix:",
            "correct `token`",
        ],
    );
    software_slot_works(&two, "after-wrong-label");
}

#[test]
fn wrong_pin_leaves_the_software_slot_working() {
    if !have_softhsm() {
        return;
    }
    let offset = log_len();
    let token = token_label("pin");
    let two = TwoSlots::new(HsmSlot {
        module: softhsm::module(),
        token: &token,
        pin_env: WRONG_PIN_ENV,
    });
    assert_hsm_slot_absent(&two);
    assert_log_line(
        offset,
        &[
            &format!("token '{token}' rejected the PIN"),
            WRONG_PIN_ENV,
            "fix:",
        ],
    );
    let log = log_since(offset);
    assert!(
        !log.contains("999999"),
        "the PIN appears in the log:\n{log}"
    );
    software_slot_works(&two, "after-wrong-pin");
}
