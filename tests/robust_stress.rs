//! Concurrency stress through the built `.so`: 16 threads mixing session open/close, find, sign
//! and get-attribute on shared keys; 4 processes creating keys in one store at once, alone and
//! with 2 processes signing and 2 listing every object at the same time; C_Finalize racing calls
//! in flight on other threads.
//!
//! The thread and process tests run on three key stores: the software store, a
//! `backend = "pkcs11"` slot wrapping a throwaway SoftHSM token (declared `hardware_tpm`), and a
//! TPM slot on a throwaway swtpm (on swtpm the processes' TPM commands take turns, but their key
//! files meet in one directory); the finalize race runs on the software store. SoftHSM and swtpm
//! tests are skipped (with a message) when they are not installed.
//!
//! Counts scale with `STRESS_SCALE` (see `testkit::stress`): the CI run is small, `scripts/stress.sh`
//! runs the full counts (16 x 1,000 operations, 4 x 100 keys, 200 finalize races). The TPM slot
//! works one command at a time (about 1 ms a signature), so its CI counts are halved again (see
//! [`Store::ci_factor`]).

#[macro_use]
extern crate testkit as common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

use common::softhsm::{self, have_softhsm, PIN};
use common::swtpm::{self, Swtpm};
use common::{gen_p256, public_point, sha256, use_config, verify_prehash, Token, TOKEN_LABEL};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki_sys::*;
use testkit::stress::{scale, scaled, with_watchdog, Rng};

const THREADS: usize = 16;
const SHARED_KEYS: usize = 4;

/// The key store behind the token under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Store {
    /// `backend = "software"`.
    Software,
    /// `backend = "pkcs11"` wrapping a throwaway SoftHSM token, declared `hardware_tpm`.
    SoftHsm,
    /// `backend = "tpm"` on a throwaway swtpm (`allow_simulator = true`).
    Tpm,
}

/// The variable the SoftHSM slot reads its PIN from.
const HSM_PIN_ENV: &str = "DEVICEKEY_STRESS_HSM_PIN";
/// The SoftHSM tokens of this process, one per test (SoftHSM sees only tokens that exist when it
/// is initialized).
const HSM_TAGS: &[&str] = &["threads", "procs", "mixed"];

impl Store {
    fn name(self) -> &'static str {
        match self {
            Store::Software => "software",
            Store::SoftHsm => "pkcs11/SoftHSM",
            Store::Tpm => "tpm/swtpm",
        }
    }

    /// True when the store can run here; else says on stderr that the test is skipped.
    fn available(self) -> bool {
        match self {
            Store::Software => true,
            Store::SoftHsm => have_softhsm(),
            Store::Tpm => swtpm::have_swtpm(),
        }
    }

    /// Extra factor on the CI counts only (`STRESS_SCALE` unset), to keep the default
    /// `cargo test` short on slow stores; `scripts/stress.sh` sets `STRESS_SCALE` and runs the
    /// full counts on every store.
    fn ci_factor(self) -> f64 {
        match (self, std::env::var_os("STRESS_SCALE").is_some()) {
            (Store::Tpm, false) => 0.5,
            _ => 1.0,
        }
    }

    /// `full` scaled by `STRESS_SCALE` and [`Store::ci_factor`], at least `min`.
    fn scaled(self, full: usize, min: usize) -> usize {
        ((full as f64 * scale() * self.ci_factor()).round() as usize).max(min)
    }
}

/// Makes this process's SoftHSM tokens (once) and points SoftHSM at them. Call with the test lock
/// held.
fn softhsm_conf() -> &'static PathBuf {
    static CONF: OnceLock<PathBuf> = OnceLock::new();
    CONF.get_or_init(|| {
        let dir = softhsm::process_dir("stress-pkcs11");
        let conf = softhsm::write_conf(&dir);
        std::env::set_var("SOFTHSM2_CONF", &conf);
        std::env::set_var(HSM_PIN_ENV, PIN);
        for tag in HSM_TAGS {
            softhsm::init_token(&conf, &softhsm::token_label("dkst", tag));
        }
        conf
    })
}

/// A token on one store: the test lock and config (`Token`), and the swtpm behind a TPM slot.
struct StoreToken {
    t: Token,
    /// Where the store keeps one file per key, with the file name's prefix and suffix (`None`:
    /// the keys live in SoftHSM).
    keys_dir: Option<(PathBuf, &'static str, &'static str)>,
    _swtpm: Option<Swtpm>,
}

impl StoreToken {
    /// A fresh one-slot config on `store` (for SoftHSM, the token of test `tag`), C_Initialize
    /// done when `init`.
    fn new(store: Store, tag: &str, init: bool) -> StoreToken {
        let mut t = Token::uninitialized();
        let root = t.root().to_path_buf();
        let (slot, keys_dir, swtpm) = match store {
            Store::Software => (None, Some((root.join("keys"), "", ".key")), None),
            Store::SoftHsm => {
                softhsm_conf();
                let slot = format!(
                    "backend = \"pkcs11\"\nmodule = \"{}\"\ntoken = \"{}\"\n\
                     pin_env = \"{HSM_PIN_ENV}\"\nprotection_class = \"hardware_tpm\"\n",
                    softhsm::module(),
                    softhsm::token_label("dkst", tag)
                );
                (Some(slot), None, None)
            }
            Store::Tpm => {
                std::env::remove_var("DEVICEKEY_TPM_TCTI");
                let swtpm = Swtpm::start(&root.join("swtpm"));
                let keys = root.join("tpmkeys");
                let slot = format!(
                    "backend = \"tpm\"\ntcti = \"{}\"\ndir = \"{}\"\nallow_simulator = true\n",
                    swtpm.tcti(),
                    keys.display()
                );
                (Some(slot), Some((keys, "key", ".json")), Some(swtpm))
            }
        };
        if let Some(slot) = slot {
            let config = root.join("store.toml");
            std::fs::write(
                &config,
                format!("[[slot]]\nlabel = \"{TOKEN_LABEL}\"\n{slot}"),
            )
            .expect("write config");
            use_config(&config);
            t.config = config;
        }
        if init {
            t.initialize();
        }
        StoreToken {
            t,
            keys_dir,
            _swtpm: swtpm,
        }
    }
}

#[derive(Clone)]
struct SharedKey {
    label: String,
    private: ObjectHandle,
    public: ObjectHandle,
    point: Vec<u8>,
}

/// Counts of each operation, for the report line.
#[derive(Default)]
struct Counts {
    open: AtomicUsize,
    close: AtomicUsize,
    find: AtomicUsize,
    sign: AtomicUsize,
    attr: AtomicUsize,
}

fn one_thread(
    ctx: cryptoki::context::Pkcs11,
    slot: cryptoki::slot::Slot,
    keys: &[SharedKey],
    index: usize,
    ops: usize,
    seed: u64,
    counts: &Counts,
) -> Result<(), String> {
    let mut rng = Rng::new(seed ^ (index as u64 + 1).wrapping_mul(0x1000_0000_01b3));
    let mut sessions: Vec<Session> = Vec::new();
    for op in 0..ops {
        let ctxt = |e: &dyn std::fmt::Display| format!("thread {index} op {op}: {e}");
        if sessions.is_empty() {
            sessions.push(ctx.open_ro_session(slot).map_err(|e| ctxt(&e))?);
            counts.open.fetch_add(1, Ordering::Relaxed);
        }
        let key = &keys[rng.below(keys.len())];
        let s = &sessions[rng.below(sessions.len())];
        match rng.below(10) {
            0 if sessions.len() < 4 => {
                let s = if rng.below(2) == 0 {
                    ctx.open_rw_session(slot)
                } else {
                    ctx.open_ro_session(slot)
                }
                .map_err(|e| ctxt(&e))?;
                sessions.push(s);
                counts.open.fetch_add(1, Ordering::Relaxed);
            }
            0 | 1 => {
                let s = sessions.swap_remove(rng.below(sessions.len()));
                s.close().map_err(|e| ctxt(&e))?;
                counts.close.fetch_add(1, Ordering::Relaxed);
            }
            2 | 3 => {
                let found = if rng.below(2) == 0 {
                    s.find_objects(&[
                        Attribute::Class(ObjectClass::PRIVATE_KEY),
                        Attribute::Label(key.label.as_bytes().to_vec()),
                    ])
                    .map_err(|e| ctxt(&e))?
                } else {
                    s.find_objects(&[Attribute::Class(ObjectClass::PUBLIC_KEY)])
                        .map_err(|e| ctxt(&e))?
                };
                let want = if found.len() == SHARED_KEYS || found == [key.private] {
                    true
                } else {
                    found.contains(&key.public) && found.len() == SHARED_KEYS
                };
                if !want {
                    return Err(ctxt(&format!("find returned {found:?}")));
                }
                counts.find.fetch_add(1, Ordering::Relaxed);
            }
            4..=6 => {
                let len = 1 + rng.below(100);
                let msg = rng.bytes(len);
                let (mech, digest) = if rng.below(2) == 0 {
                    (Mechanism::Ecdsa, sha256(&msg))
                } else {
                    (Mechanism::EcdsaSha256, sha256(&msg))
                };
                let input: &[u8] = if matches!(mech, Mechanism::Ecdsa) {
                    &digest
                } else {
                    &msg
                };
                let sig = s.sign(&mech, key.private, input).map_err(|e| ctxt(&e))?;
                if !verify_prehash(&key.point, &digest, &sig) {
                    return Err(ctxt(&format!("signature by {} does not verify", key.label)));
                }
                counts.sign.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                if rng.below(2) == 0 {
                    let point = public_point(s, key.public);
                    if point != key.point {
                        return Err(ctxt(&"CKA_EC_POINT changed"));
                    }
                } else {
                    let attrs = s
                        .get_attributes(
                            key.private,
                            &[
                                AttributeType::Label,
                                AttributeType::Sign,
                                AttributeType::Sensitive,
                            ],
                        )
                        .map_err(|e| ctxt(&e))?;
                    let ok = attrs.contains(&Attribute::Label(key.label.as_bytes().to_vec()))
                        && attrs.contains(&Attribute::Sign(true))
                        && attrs.contains(&Attribute::Sensitive(true));
                    if !ok {
                        return Err(ctxt(&format!("attributes {attrs:?}")));
                    }
                }
                counts.attr.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    for s in sessions {
        s.close()
            .map_err(|e| format!("thread {index} final close: {e}"))?;
    }
    Ok(())
}

#[test]
fn sixteen_threads_mix_sessions_find_sign_and_attributes() {
    sixteen_threads(Store::Software);
}

#[test]
fn sixteen_threads_on_a_softhsm_pkcs11_slot() {
    sixteen_threads(Store::SoftHsm);
}

#[test]
fn sixteen_threads_on_a_swtpm_tpm_slot() {
    sixteen_threads(Store::Tpm);
}

/// 16 threads x 1,000 mixed operations on 4 shared keys of `store`.
fn sixteen_threads(store: Store) {
    if !store.available() {
        return;
    }
    let st = StoreToken::new(store, "threads", true);
    let t = &st.t;
    let slot = t.slot();
    let keys: Vec<SharedKey> = {
        let s = t.session();
        (0..SHARED_KEYS)
            .map(|i| {
                let label = format!("shared-{i}");
                let (public, private) = gen_p256(&s, &label, true);
                SharedKey {
                    point: public_point(&s, public),
                    label,
                    private,
                    public,
                }
            })
            .collect()
    };
    let ops = store.scaled(1000, 50);
    let (_, seed) = Rng::from_env_or_clock();
    let ctx = t.ctx.clone();
    let counts = Arc::new(Counts::default());
    let started = Instant::now();
    let errors: Vec<String> = {
        let counts = Arc::clone(&counts);
        with_watchdog("16-thread stress", Duration::from_secs(300), move || {
            let barrier = Barrier::new(THREADS);
            std::thread::scope(|scope| {
                let handles: Vec<_> = (0..THREADS)
                    .map(|i| {
                        let ctx = ctx.clone();
                        let keys = &keys;
                        let barrier = &barrier;
                        let counts = &*counts;
                        scope.spawn(move || {
                            barrier.wait();
                            one_thread(ctx, slot, keys, i, ops, seed, counts)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .filter_map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err("thread panicked".into()))
                            .err()
                    })
                    .collect()
            })
        })
    };
    assert!(errors.is_empty(), "seed {seed}: failures: {errors:#?}");
    eprintln!(
        "STRESS threads ({}): {THREADS} x {ops} ops in {:?} (seed {seed}): open {} close {} \
         find {} sign+verify {} get-attribute {}",
        store.name(),
        started.elapsed(),
        counts.open.load(Ordering::Relaxed),
        counts.close.load(Ordering::Relaxed),
        counts.find.load(Ordering::Relaxed),
        counts.sign.load(Ordering::Relaxed),
        counts.attr.load(Ordering::Relaxed),
    );
    // Nothing leaked: every session was closed.
    let info = t.ctx.get_token_info(slot).expect("C_GetTokenInfo");
    if let Some(n) = info.session_count() {
        assert_eq!(n, 0, "sessions left open");
    }
}

const CHILD_ENV: &str = "DEVICEKEY_STRESS_CHILD";
const START_ENV: &str = "DEVICEKEY_STRESS_START_AT_MS";
const COUNT_ENV: &str = "DEVICEKEY_STRESS_KEYS";

/// Child side of `four_processes` and `mixed_processes` (runs only when spawned by them).
#[test]
#[ignore = "child process of four_processes_create_keys_in_one_store and mixed_processes"]
fn stress_child_create_keys() {
    let Ok(index) = std::env::var(CHILD_ENV) else {
        return;
    };
    let start_at: u64 = std::env::var(START_ENV).unwrap().parse().unwrap();
    let count: usize = std::env::var(COUNT_ENV).unwrap().parse().unwrap();
    let t = Token::from_env_config();
    let s = t.session();
    let now = common::now_millis();
    if start_at > now {
        std::thread::sleep(Duration::from_millis(start_at - now));
    }
    for j in 0..count {
        gen_p256(&s, &format!("p{index}-k{j}"), true);
    }
}

#[test]
fn four_processes_create_keys_in_one_store() {
    four_processes(Store::Software);
}

#[test]
fn four_processes_create_keys_on_a_softhsm_pkcs11_slot() {
    four_processes(Store::SoftHsm);
}

#[test]
fn four_processes_create_keys_on_a_swtpm_tpm_slot() {
    four_processes(Store::Tpm);
}

/// 4 processes x 100 keys created at once on `store`; all present, readable and signing.
fn four_processes(store: Store) {
    if !store.available() {
        return;
    }
    let per = store.scaled(100, 10);
    let mut st = StoreToken::new(store, "procs", false);
    let start_at = common::now_millis() + 1000;
    let started = Instant::now();
    let children = spawn_creators(&st.t, per, start_at);
    let failures = wait_children(children).failures;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let created_in = started.elapsed();
    check_all_keys(&mut st, &creator_labels(per));
    eprintln!(
        "STRESS processes ({}): {CREATORS} x {per} keys created at once in {created_in:?}; all \
         {} present, readable and signing",
        store.name(),
        CREATORS * per
    );
}

/// The processes that create keys at once.
const CREATORS: usize = 4;

/// Spawns the [`CREATORS`] processes, each creating `per` keys `p<i>-k<j>` from `start_at`.
fn spawn_creators(t: &Token, per: usize, start_at: u64) -> Vec<(String, std::process::Child)> {
    (0..CREATORS)
        .map(|i| {
            let child = common::spawn_self(
                "stress_child_create_keys",
                &[
                    (CHILD_ENV, i.to_string()),
                    (START_ENV, start_at.to_string()),
                    (COUNT_ENV, per.to_string()),
                    ("DEVICEKEY_CONFIG", t.config.display().to_string()),
                    ("DEVICEKEY_LOG", child_log_level()),
                ],
            );
            (format!("creator {i}"), child)
        })
        .collect()
}

/// The children's log level: `DEVICEKEY_LOG` when set, else `warn` (their warnings are counted).
fn child_log_level() -> String {
    std::env::var("DEVICEKEY_LOG").unwrap_or_else(|_| "warn".into())
}

/// The labels the creators make.
fn creator_labels(per: usize) -> BTreeSet<String> {
    (0..CREATORS)
        .flat_map(|i| (0..per).map(move |j| format!("p{i}-k{j}")))
        .collect()
}

/// What the child processes said.
#[derive(Default)]
struct ChildOutput {
    /// Each child's stdout.
    stdouts: Vec<String>,
    /// The module's warnings that the cross-process token lock was not obtained in time (the
    /// call went ahead unlocked), over all children.
    lock_timeouts: usize,
    /// One per child that did not pass.
    failures: Vec<String>,
}

/// Waits for `children` and collects what they said.
fn wait_children(children: Vec<(String, std::process::Child)>) -> ChildOutput {
    let mut said = ChildOutput::default();
    for (name, child) in children {
        let out = child.wait_with_output().expect("wait for child");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        said.lock_timeouts += stderr
            .matches("the cross-process token lock was not obtained")
            .count();
        if !out.status.success() || !stdout.contains("1 passed") {
            said.failures
                .push(format!("{name}: {}\n{stdout}\n{stderr}", out.status));
        }
        said.stdouts.push(stdout);
    }
    said
}

/// After the processes: exactly the keys `want` are on the store, each readable and signing, and
/// (file stores) one key file each.
fn check_all_keys(st: &mut StoreToken, want: &BTreeSet<String>) {
    let t = &mut st.t;
    t.initialize();
    let s = t.session();
    let privs = s
        .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
        .expect("find");
    let labels: BTreeSet<String> = privs.iter().map(|&h| common::label_of(&s, h)).collect();
    let missing: Vec<&String> = want.difference(&labels).collect();
    assert!(
        missing.is_empty(),
        "{} keys lost: {missing:?}",
        missing.len()
    );
    assert_eq!(privs.len(), want.len(), "no duplicates, no extras");
    for &private in &privs {
        let point = public_point(&s, common::public_for(&s, private));
        let d = sha256(&common::id_of(&s, private));
        let sig = s.sign(&Mechanism::Ecdsa, private, &d).expect("sign");
        assert!(verify_prehash(&point, &d, &sig), "key signs and verifies");
    }
    if let Some((dir, prefix, suffix)) = &st.keys_dir {
        let files = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with(prefix) && name.ends_with(suffix)
            })
            .count();
        assert_eq!(files, want.len(), "one key file per key");
    }
}

// ---- creators, signers and listers at once ----

/// The file whose existence tells signers and listers to stop.
const STOP_ENV: &str = "DEVICEKEY_STRESS_STOP_FILE";
/// The label of the key the signers use.
const SIGNER_KEY: &str = "signer";
/// How long a signer or lister runs at most when the stop file never comes (a parent that died).
const CHILD_LIMIT: Duration = Duration::from_secs(600);

/// Waits for the shared start time; then runs `step` until the stop file exists (at least
/// `min` times). Returns how many steps ran.
fn until_stopped(
    min: usize,
    mut step: impl FnMut(usize) -> Result<(), String>,
) -> Result<usize, String> {
    let start_at: u64 = std::env::var(START_ENV).unwrap().parse().unwrap();
    let stop = PathBuf::from(std::env::var_os(STOP_ENV).expect("stop file"));
    let now = common::now_millis();
    if start_at > now {
        std::thread::sleep(Duration::from_millis(start_at - now));
    }
    let began = Instant::now();
    let mut n = 0;
    while n < min || !stop.exists() {
        if began.elapsed() > CHILD_LIMIT {
            return Err(format!("no stop file after {CHILD_LIMIT:?}"));
        }
        step(n)?;
        n += 1;
    }
    Ok(n)
}

/// Child side of `mixed_processes`: signs with the key made before the start until told to stop,
/// verifying every signature.
#[test]
#[ignore = "child process of creators_signers_and_listers_at_once_on_a_softhsm_pkcs11_slot"]
fn stress_child_sign() {
    let Ok(index) = std::env::var(CHILD_ENV) else {
        return;
    };
    let t = Token::from_env_config();
    let s = t.session();
    let found = s
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(SIGNER_KEY.as_bytes().to_vec()),
        ])
        .expect("find the signing key");
    assert_eq!(found.len(), 1, "one signing key");
    let private = found[0];
    let point = public_point(&s, common::public_for(&s, private));
    let mut rng = Rng::new(common::now_millis() ^ index.parse::<u64>().unwrap_or(0));
    let n = until_stopped(10, |n| {
        let len = 1 + rng.below(64);
        let msg = rng.bytes(len);
        let digest = sha256(&msg);
        let sig = if n % 2 == 0 {
            s.sign(&Mechanism::Ecdsa, private, &digest)
        } else {
            s.sign(&Mechanism::EcdsaSha256, private, &msg)
        }
        .map_err(|e| format!("signature {n}: {e}"))?;
        if verify_prehash(&point, &digest, &sig) {
            Ok(())
        } else {
            Err(format!("signature {n} does not verify"))
        }
    });
    match n {
        Ok(n) => println!("MIXED-SIGNS {n}"),
        Err(e) => panic!("signer {index}: {e}"),
    }
}

/// One listing: every object on the token, with its class and CKA_ID, checked for consistency
/// (each private key has its public key; no fewer private keys than the previous listing).
/// Returns the number of private keys.
fn one_listing(s: &Session, before: usize) -> Result<usize, String> {
    let all = s
        .find_objects(&[])
        .map_err(|e| format!("C_FindObjects: {e}"))?;
    let mut privates = BTreeSet::new();
    let mut publics = BTreeSet::new();
    for h in all {
        let attrs = s
            .get_attributes(h, &[AttributeType::Class, AttributeType::Id])
            .map_err(|e| format!("C_GetAttributeValue of a listed object: {e}"))?;
        let (mut class, mut id) = (None, None);
        for a in attrs {
            match a {
                Attribute::Class(c) => class = Some(c),
                Attribute::Id(i) => id = Some(i),
                _ => {}
            }
        }
        let (Some(class), Some(id)) = (class, id) else {
            return Err("a listed object without CKA_CLASS or CKA_ID".into());
        };
        let fresh = match class {
            ObjectClass::PRIVATE_KEY => privates.insert(id.clone()),
            ObjectClass::PUBLIC_KEY => publics.insert(id.clone()),
            _ => true,
        };
        if !fresh {
            return Err(format!(
                "two objects of class {class} with CKA_ID {id:02x?}"
            ));
        }
    }
    let alone: Vec<_> = privates.difference(&publics).collect();
    if !alone.is_empty() {
        return Err(format!(
            "private keys listed without their public key: {alone:02x?}"
        ));
    }
    if privates.len() < before {
        return Err(format!(
            "{} private keys listed after {before} (nothing is deleted)",
            privates.len()
        ));
    }
    Ok(privates.len())
}

/// A lister loads the module afresh (C_Finalize, C_Initialize, a new session) every this many
/// listings, as a short-lived lister (`pkcs11-tool -O`) does; in between it lists on one session.
const RELOAD_EVERY: usize = 25;

/// Child side of `mixed_processes`: lists every object until told to stop, each listing
/// consistent; then loads the module once more and prints how many private keys it lists.
#[test]
#[ignore = "child process of creators_signers_and_listers_at_once_on_a_softhsm_pkcs11_slot"]
fn stress_child_list() {
    let Ok(index) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut t = Token::from_env_config();
    let mut s = Some(t.ro_session());
    let mut seen = 0;
    let mut reloads = 0;
    let mut slowest = Duration::ZERO;
    let mut reload = |t: &mut Token, s: &mut Option<Session>| {
        let began = Instant::now();
        drop(s.take());
        t.reinitialize();
        *s = Some(t.ro_session());
        slowest = slowest.max(began.elapsed());
    };
    let n = until_stopped(10, |n| {
        if n % RELOAD_EVERY == RELOAD_EVERY - 1 {
            reload(&mut t, &mut s);
            reloads += 1;
        }
        let session = s.as_ref().expect("a session");
        seen = one_listing(session, seen).map_err(|e| format!("listing {n}: {e}"))?;
        Ok(())
    });
    let n = n.unwrap_or_else(|e| panic!("lister {index}: {e}"));
    reload(&mut t, &mut s);
    let last = one_listing(s.as_ref().expect("a session"), seen)
        .unwrap_or_else(|e| panic!("lister {index}: the last listing: {e}"));
    println!("MIXED-LISTS {n} reloads {reloads} (slowest {slowest:?}) last {last}");
}

#[test]
fn creators_signers_and_listers_at_once_on_a_softhsm_pkcs11_slot() {
    mixed_processes(Store::SoftHsm);
}

/// Set aside: 8 processes on one swtpm (a TPM without a resource manager) evict each other's
/// transient objects. A process whose TPM is full flushes every transient object, among them
/// another process's SRK or loaded key; that one gets TPM_RC_REFERENCE_H0 (0x910) or
/// TPM_RC_OBJECT_MEMORY (0x902) on TPM2_Load, TPM2_Sign or TPM2_Create, reconnects, and after
/// three tries fails the call (CKR_FUNCTION_REJECTED or CKR_DEVICE_MEMORY): 5 of 10 CI-scale runs.
#[test]
#[ignore = "processes on one swtpm without a resource manager flush each other's objects (see the doc comment)"]
fn creators_signers_and_listers_at_once_on_a_swtpm_tpm_slot() {
    mixed_processes(Store::Tpm);
}

/// The four creators of [`four_processes`] with 2 processes signing with a key made before the
/// start and 2 listing every object, all at once on `store`; every process succeeds, and
/// afterwards every key is listed and signs.
fn mixed_processes(store: Store) {
    const SIGNERS: usize = 2;
    const LISTERS: usize = 2;
    if !store.available() {
        return;
    }
    let per = store.scaled(100, 10);
    let mut st = StoreToken::new(store, "mixed", true);
    {
        let s = st.t.session();
        gen_p256(&s, SIGNER_KEY, true);
    }
    st.t.finalize();
    let stop = st.t.root().join("stop");
    let start_at = common::now_millis() + 1000;
    let started = Instant::now();
    let creators = spawn_creators(&st.t, per, start_at);
    let others: Vec<_> = (0..SIGNERS + LISTERS)
        .map(|i| {
            let (name, test) = if i < SIGNERS {
                (format!("signer {i}"), "stress_child_sign")
            } else {
                (format!("lister {}", i - SIGNERS), "stress_child_list")
            };
            let child = common::spawn_self(
                test,
                &[
                    (CHILD_ENV, i.to_string()),
                    (START_ENV, start_at.to_string()),
                    (STOP_ENV, stop.display().to_string()),
                    ("DEVICEKEY_CONFIG", st.t.config.display().to_string()),
                    ("DEVICEKEY_LOG", child_log_level()),
                ],
            );
            (name, child)
        })
        .collect();
    let creators = wait_children(creators);
    let created_in = started.elapsed();
    std::fs::write(&stop, b"").expect("write the stop file");
    let others = wait_children(others);
    let failures = [creators.failures, others.failures].concat();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let lock_timeouts = creators.lock_timeouts + others.lock_timeouts;
    let stdouts = others.stdouts;
    // Each signer and lister prints its count (after libtest's "test <name> ... ").
    let count = |tag: &str, processes: usize| -> usize {
        let counts: Vec<usize> = stdouts
            .iter()
            .filter_map(|o| {
                let (_, rest) = o.split_once(tag)?;
                rest.split_whitespace().next()?.parse::<usize>().ok()
            })
            .collect();
        assert_eq!(
            counts.len(),
            processes,
            "a {tag}count from each process: {stdouts:?}"
        );
        counts.iter().sum()
    };
    let (signs, lists) = (
        count("MIXED-SIGNS ", SIGNERS),
        count("MIXED-LISTS ", LISTERS),
    );
    let mut want = creator_labels(per);
    want.insert(SIGNER_KEY.to_string());
    let reloads: Vec<&str> = stdouts
        .iter()
        .filter_map(|o| {
            o.split_once(" reloads ")?
                .1
                .split_once(" last ")
                .map(|r| r.0)
        })
        .collect();
    // Loaded after the creators finished, each lister lists every key.
    let lasts: Vec<&str> = stdouts
        .iter()
        .filter_map(|o| o.split_once(" last ")?.1.split_whitespace().next())
        .collect();
    assert_eq!(
        lasts,
        vec![want.len().to_string(); LISTERS],
        "the listers' last listings"
    );
    check_all_keys(&mut st, &want);
    eprintln!(
        "STRESS mixed processes ({}): {CREATORS} x {per} keys created in {created_in:?} while \
         {SIGNERS} processes made {signs} verified signatures and {LISTERS} processes made {lists} \
         consistent listings (reloads: {}); all {} keys present and signing; {lock_timeouts} \
         waits for the token lock ran out",
        store.name(),
        reloads.join(", "),
        want.len()
    );
}

// ---- C_Finalize racing calls in flight (raw function list: exact return codes) ----

fn raw_slot() -> CK_SLOT_ID {
    let mut slots = [0 as CK_SLOT_ID; 4];
    let mut n: CK_ULONG = slots.len() as CK_ULONG;
    // SAFETY: `slots` has room for `n` entries.
    let rv = unsafe { ck!(C_GetSlotList)(CK_TRUE, slots.as_mut_ptr(), &mut n) };
    assert_rv!(rv, CKR_OK);
    assert_eq!(n, 1);
    slots[0]
}

fn raw_find_private(session: CK_SESSION_HANDLE) -> Result<CK_OBJECT_HANDLE, CK_RV> {
    let mut class: CK_OBJECT_CLASS = CKO_PRIVATE_KEY;
    let mut template = [CK_ATTRIBUTE {
        type_: CKA_CLASS,
        pValue: &mut class as *mut CK_OBJECT_CLASS as *mut std::ffi::c_void,
        ulValueLen: std::mem::size_of::<CK_OBJECT_CLASS>() as CK_ULONG,
    }];
    // SAFETY: one valid template entry.
    let rv = unsafe { ck!(C_FindObjectsInit)(session, template.as_mut_ptr(), 1) };
    if rv != CKR_OK {
        return Err(rv);
    }
    let mut h: CK_OBJECT_HANDLE = 0;
    let mut n: CK_ULONG = 0;
    // SAFETY: room for one handle.
    let rv = unsafe { ck!(C_FindObjects)(session, &mut h, 1, &mut n) };
    // SAFETY: plain call.
    let rv2 = unsafe { ck!(C_FindObjectsFinal)(session) };
    if rv != CKR_OK {
        return Err(rv);
    }
    if rv2 != CKR_OK {
        return Err(rv2);
    }
    if n != 1 {
        return Err(CKR_GENERAL_ERROR);
    }
    Ok(h)
}

/// One caller's loop during a finalize race. Returns the CK_RVs it saw, and an error for any
/// return code outside the allowed set.
fn race_caller(
    slot: CK_SLOT_ID,
    point: &[u8],
    finalized: &AtomicBool,
    stop: &AtomicBool,
    rng: &mut Rng,
) -> Result<(usize, usize), String> {
    // Codes a call may get while the module is being finalized under it.
    let racing_ok = [
        CKR_OK,
        CKR_CRYPTOKI_NOT_INITIALIZED,
        CKR_SESSION_HANDLE_INVALID,
        CKR_SESSION_CLOSED,
        CKR_OBJECT_HANDLE_INVALID,
        CKR_KEY_HANDLE_INVALID,
        CKR_OPERATION_NOT_INITIALIZED,
    ];
    let mut ok_calls = 0;
    let mut after = 0;
    let check = |rv: CK_RV, before_call_finalized: bool, what: &str| -> Result<(), String> {
        if before_call_finalized {
            if rv != CKR_CRYPTOKI_NOT_INITIALIZED {
                return Err(format!(
                    "{what} after C_Finalize returned {}",
                    common::rv_name(rv)
                ));
            }
        } else if !racing_ok.contains(&rv) {
            return Err(format!("{what} during the race: {}", common::rv_name(rv)));
        }
        Ok(())
    };
    while !stop.load(Ordering::SeqCst) {
        let was = finalized.load(Ordering::SeqCst);
        let mut session: CK_SESSION_HANDLE = 0;
        // SAFETY: valid out pointer; no callback.
        let rv = unsafe {
            ck!(C_OpenSession)(
                slot,
                CKF_SERIAL_SESSION,
                std::ptr::null_mut(),
                None,
                &mut session,
            )
        };
        check(rv, was, "C_OpenSession")?;
        if was {
            after += 1;
        }
        if rv != CKR_OK {
            std::thread::yield_now();
            continue;
        }
        ok_calls += 1;
        for _ in 0..1 + rng.below(4) {
            let was = finalized.load(Ordering::SeqCst);
            let key = match raw_find_private(session) {
                Ok(k) => k,
                Err(rv) => {
                    check(rv, was, "find")?;
                    break;
                }
            };
            let digest = sha256(&rng.bytes(16));
            let mut mech = CK_MECHANISM {
                mechanism: CKM_ECDSA,
                pParameter: std::ptr::null_mut(),
                ulParameterLen: 0,
            };
            let was = finalized.load(Ordering::SeqCst);
            // SAFETY: valid mechanism.
            let rv = unsafe { ck!(C_SignInit)(session, &mut mech, key) };
            check(rv, was, "C_SignInit")?;
            if rv != CKR_OK {
                break;
            }
            let mut sig = [0u8; 64];
            let mut len: CK_ULONG = 64;
            let was = finalized.load(Ordering::SeqCst);
            // SAFETY: 32 input bytes, 64 output bytes.
            let rv = unsafe {
                ck!(C_Sign)(
                    session,
                    digest.as_ptr() as *mut u8,
                    32,
                    sig.as_mut_ptr(),
                    &mut len,
                )
            };
            check(rv, was, "C_Sign")?;
            if rv == CKR_OK {
                if len != 64 || !verify_prehash(point, &digest, &sig) {
                    return Err("a signature made during the race does not verify".into());
                }
                ok_calls += 1;
            } else {
                break;
            }
        }
        let was = finalized.load(Ordering::SeqCst);
        // SAFETY: plain call.
        let rv = unsafe { ck!(C_CloseSession)(session) };
        check(rv, was, "C_CloseSession")?;
    }
    // A few calls certainly after C_Finalize returned.
    for _ in 0..3 {
        let mut info = std::mem::MaybeUninit::<CK_INFO>::zeroed();
        // SAFETY: valid out pointer.
        let rv = unsafe { ck!(C_GetInfo)(info.as_mut_ptr()) };
        check(rv, true, "C_GetInfo")?;
        // SAFETY: plain call.
        let rv = unsafe { ck!(C_CloseAllSessions)(slot) };
        check(rv, true, "C_CloseAllSessions")?;
        after += 2;
    }
    Ok((ok_calls, after))
}

#[test]
fn finalize_races_calls_in_flight() {
    let t = Token::new();
    let point = {
        let s = t.session();
        let (public, _) = gen_p256(&s, "race", true);
        public_point(&s, public)
    };
    t.ctx.clone().finalize().expect("C_Finalize");
    let rounds = scaled(200, 20);
    let (mut rng, seed) = Rng::from_env_or_clock();
    let started = Instant::now();
    let (ok_total, after_total) =
        with_watchdog("finalize race", Duration::from_secs(300), move || {
            let mut ok_total = 0;
            let mut after_total = 0;
            for round in 0..rounds {
                // SAFETY: NULL args = no locking requirements beyond OS threads.
                let rv = unsafe { ck!(C_Initialize)(std::ptr::null_mut()) };
                assert_rv!(rv, CKR_OK, "round {round}: C_Initialize");
                let slot = raw_slot();
                let finalized = AtomicBool::new(false);
                let stop = AtomicBool::new(false);
                let delay = Duration::from_micros(200 + rng.below(5000) as u64);
                let results: Vec<Result<(usize, usize), String>> = std::thread::scope(|scope| {
                    let handles: Vec<_> = (0..6)
                        .map(|i| {
                            let (finalized, stop, point) = (&finalized, &stop, &point);
                            let mut rng = Rng::new(seed ^ ((round * 64 + i) as u64 + 7));
                            scope.spawn(move || race_caller(slot, point, finalized, stop, &mut rng))
                        })
                        .collect();
                    std::thread::sleep(delay);
                    // SAFETY: NULL reserved.
                    let rv = unsafe { ck!(C_Finalize)(std::ptr::null_mut()) };
                    finalized.store(true, Ordering::SeqCst);
                    assert_rv!(
                        rv,
                        CKR_OK,
                        "round {round}: C_Finalize while calls are in flight"
                    );
                    std::thread::sleep(Duration::from_millis(2));
                    stop.store(true, Ordering::SeqCst);
                    handles
                        .into_iter()
                        .map(|h| h.join().unwrap_or_else(|_| Err("caller panicked".into())))
                        .collect()
                });
                for r in results {
                    match r {
                        Ok((ok, after)) => {
                            ok_total += ok;
                            after_total += after;
                        }
                        Err(e) => panic!("seed {seed} round {round}: {e}"),
                    }
                }
                // SAFETY: NULL reserved.
                let rv = unsafe { ck!(C_Finalize)(std::ptr::null_mut()) };
                assert_rv!(rv, CKR_CRYPTOKI_NOT_INITIALIZED, "second C_Finalize");
            }
            (ok_total, after_total)
        });
    eprintln!(
        "STRESS finalize race: {rounds} rounds x 6 threads in {:?} (seed {seed}): {ok_total} \
         calls succeeded during the race, {after_total} calls after C_Finalize all got \
         CKR_CRYPTOKI_NOT_INITIALIZED",
        started.elapsed()
    );
    // The module initializes again afterwards and the key is still there.
    let mut t = t;
    t.initialize();
    let s = t.session();
    let found = s
        .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
        .unwrap();
    assert_eq!(found.len(), 1);
}

/// Run under valgrind by `scripts/stress.sh`: `DEVICEKEY_VALGRIND_CYCLES` rounds of
/// C_Initialize, key generation, sign, get-attribute, C_Finalize. Comparing the leak summary of
/// two cycle counts gives the leak per cycle.
#[test]
#[ignore = "run under valgrind by scripts/stress.sh"]
fn valgrind_initialize_finalize_cycles() {
    let Some(cycles) = std::env::var("DEVICEKEY_VALGRIND_CYCLES")
        .ok()
        .and_then(|c| c.parse::<usize>().ok())
    else {
        return;
    };
    let mut t = Token::uninitialized();
    for i in 0..cycles {
        t.initialize();
        {
            let s = t.session();
            let (public, private) = gen_p256(&s, &format!("cycle-{i}"), i == 0);
            let point = public_point(&s, public);
            let d = sha256(&i.to_be_bytes());
            let sig = s.sign(&Mechanism::Ecdsa, private, &d).expect("sign");
            assert!(verify_prehash(&point, &d, &sig));
            let sig = s
                .sign(&Mechanism::EcdsaSha256, private, b"message")
                .expect("sign");
            assert_eq!(sig.len(), 64);
            let found = s
                .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
                .expect("find");
            assert!(!found.is_empty());
        }
        t.finalize();
    }
    println!("VALGRIND-CYCLES {cycles} done");
}
