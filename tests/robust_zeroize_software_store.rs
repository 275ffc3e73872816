//! Zeroization proof for the software key store: once a key has been used and every handle on
//! it is dropped, no piece of its private scalar is left in this process's memory.
//!
//! Phases, all on one worker thread that parks between them: (1) generate key A, sign, drop;
//! (2) open the store again, load A, sign (OpenSSL's `EC_KEY` and its private `BIGNUM` now
//! exist), relabel A (read, parse, encode, write); (3) drop store and records; (4) generate key
//! B and drop it without signing; (5) give B's file A's public point, load it and try to sign:
//! OpenSSL multiplies B's scalar to check it and refuses, no signature follows. After phases 1,
//! 3, 4 and 5 no piece of either scalar may be found; after phase 2 (the control) the `BIGNUM`
//! must be found.
//!
//! The scan reads this process's memory through `/proc/self/mem`: every readable mapping in
//! `/proc/self/maps` except the kernel's `[vvar]`/`[vsyscall]` pages and read-only file
//! mappings (code and constants, the same bytes as the files on disk), i.e. the heap and its
//! freed blocks, every thread's stack, anonymous mappings and the writable data of every
//! library. It looks for three forms of each scalar: big-endian (the file's and our buffers'
//! order), little-endian (a `BIGNUM`'s limbs on a little-endian machine) and the key file's 64
//! hex digits; each form in four pieces of at least 64 bits (8 bytes, 16 hex digits), so a
//! partial copy counts and a freed block whose first 16 bytes the allocator reused is still seen.
//!
//! The key work runs on its own thread, below a 64 KiB pad, and the scan runs on the test's
//! thread: the scan's own calls cannot overwrite what the key work left in dead stack frames.
//! The test never holds a form in the clear: each is kept as `masked = form ^ mask` with a random
//! `mask`, a window matches when `window[i] ^ mask[i] == masked[i]` for every byte, the key file
//! text is read into a wiped buffer, and each chunk of memory read is wiped once searched.
//!
//! Controls, checked in every scan: a canary left in a dead stack frame and one in a freed heap
//! block (by another parked thread) are found, so "not found" means gone, not unseen.

#![cfg(target_os = "linux")]

use std::any::Any;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use devicekey_pkcs11::backend::software::SoftwareStore;
use devicekey_pkcs11::backend::{Backend, KeyPurpose, KeyRecord, NewKey};
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::ecdsa::{Signature, VerifyingKey};
use zeroize::{Zeroize, Zeroizing};

/// One form of a secret, never stored in the clear: `masked = form ^ mask`.
struct Needle {
    form: String,
    masked: Vec<u8>,
    mask: Vec<u8>,
    /// The form's first two bytes in the clear: a prefilter, no secret by itself.
    prefix: u16,
}

impl Needle {
    fn new(form: &str, len: usize) -> Needle {
        let mut mask = vec![0u8; len];
        getrandom::getrandom(&mut mask).expect("random mask");
        Needle {
            form: form.to_string(),
            masked: vec![0u8; len],
            mask,
            prefix: 0,
        }
    }

    /// A random form (a canary for the controls).
    fn random(form: &str, len: usize) -> Needle {
        let mut n = Needle::new(form, len);
        getrandom::getrandom(&mut n.masked).expect("random canary");
        n.prefix = n.clear_prefix(0);
        n
    }

    /// Records byte `i` of the form.
    fn set(&mut self, i: usize, byte: u8) {
        self.masked[i] = byte ^ self.mask[i];
        if i < 2 {
            self.prefix = self.clear_prefix(0);
        }
    }

    /// Bytes `at` and `at + 1` of the form, big-endian.
    fn clear_prefix(&self, at: usize) -> u16 {
        u16::from(self.masked[at] ^ self.mask[at]) << 8
            | u16::from(self.masked[at + 1] ^ self.mask[at + 1])
    }

    /// The form in four pieces, each searched on its own (8 bytes of a 32-byte form, 16 hex
    /// digits of 64: at least 64 bits each, so a chance match is out of the question). A piece
    /// left behind is a leak too, and allocators and later calls overwrite parts of dead
    /// buffers (a freed heap chunk gets free-list pointers in its first 16 bytes), which would
    /// hide a whole-form match.
    fn pieces(&self) -> Vec<Needle> {
        let len = self.masked.len() / 4;
        (0..4)
            .map(|p| {
                let range = p * len..(p + 1) * len;
                Needle {
                    form: format!("{} (bytes {}..{})", self.form, range.start, range.end),
                    prefix: self.clear_prefix(range.start),
                    masked: self.masked[range.clone()].to_vec(),
                    mask: self.mask[range].to_vec(),
                }
            })
            .collect()
    }

    /// Writes the form into `out` (the controls plant canaries with it).
    fn write_to(&self, out: &mut [u8]) {
        for (i, o) in out.iter_mut().enumerate() {
            *o = self.masked[i] ^ std::hint::black_box(self.mask[i]);
        }
    }

    /// True when `window` starts with the form.
    #[inline(never)]
    fn is_at(&self, window: &[u8]) -> bool {
        // Through an opaque reference, so the compiler cannot fold `mask ^ masked` into a
        // clear copy of the form hoisted out of the loop.
        let mask = std::hint::black_box(&self.mask[..]);
        window
            .iter()
            .zip(mask)
            .zip(&self.masked)
            .all(|((w, m), x)| w ^ m == *x)
    }
}

fn nibble(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => panic!("the key file's scalar is not lowercase hex"),
    }
}

/// The three forms of the scalar in the key file at `path` (see `format.rs`: JSON with
/// `"private_scalar": "<64 lowercase hex digits>"`).
fn needles_from_key_file(path: &Path) -> Vec<Needle> {
    let mut file = File::open(path).expect("key file");
    let len = file.metadata().expect("key file metadata").len() as usize;
    // Exactly sized and filled by read_exact: no reallocation, no probe buffer on the stack.
    let mut text = Zeroizing::new(vec![0u8; len]);
    file.read_exact(&mut text).expect("read the key file");
    let key = b"\"private_scalar\"";
    let at = text
        .windows(key.len())
        .position(|w| w == key)
        .expect("private_scalar field")
        + key.len();
    let open = at
        + text[at..]
            .iter()
            .position(|&c| c == b'"')
            .expect("scalar string")
        + 1;
    assert_eq!(text.get(open + 64), Some(&b'"'), "scalar is 64 hex digits");
    let mut be = Needle::new("big-endian scalar", 32);
    let mut le = Needle::new("little-endian scalar", 32);
    let mut hex = Needle::new("hex scalar", 64);
    for i in 0..32 {
        let (h, l) = (text[open + 2 * i], text[open + 2 * i + 1]);
        hex.set(2 * i, h);
        hex.set(2 * i + 1, l);
        let byte = (nibble(h) << 4) | nibble(l);
        be.set(i, byte);
        le.set(31 - i, byte);
    }
    [be, le, hex].iter().flat_map(Needle::pieces).collect()
}

/// One place a form was found.
struct Hit {
    form: String,
    address: usize,
    mapping: String,
}

struct Scan {
    hits: Vec<Hit>,
    mappings: usize,
    bytes: usize,
    unreadable: Vec<String>,
    elapsed: Duration,
}

const CHUNK: usize = 1 << 20;
const OVERLAP: usize = 64;
const PAGE: usize = 4096;
static ZEROS: [u8; PAGE] = [0; PAGE];

/// Searches this process's memory for every needle.
fn scan(needles: &[Needle]) -> Scan {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    let mem = File::open("/proc/self/mem").expect("/proc/self/mem");
    let longest = needles.iter().map(|n| n.masked.len()).max().unwrap_or(1);
    assert!(longest <= OVERLAP);
    // A bit per two-byte prefix of some needle.
    let mut prefixes = vec![0u64; 1024];
    for n in needles {
        prefixes[usize::from(n.prefix >> 6)] |= 1 << (n.prefix & 63);
    }
    let started = Instant::now();
    let mut buf = Zeroizing::new(vec![0u8; CHUNK + OVERLAP]);
    let mut result = Scan {
        hits: Vec::new(),
        mappings: 0,
        bytes: 0,
        unreadable: Vec::new(),
        elapsed: Duration::ZERO,
    };
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let path = fields.nth(3).unwrap_or("");
        let perms = perms.as_bytes();
        if perms[0] != b'r' || matches!(path, "[vvar]" | "[vvar_vclock]" | "[vsyscall]") {
            continue;
        }
        let file_backed = !path.is_empty() && !path.starts_with('[');
        if file_backed && perms[1] != b'w' {
            continue;
        }
        let (start, end) = range.split_once('-').expect("address range");
        let start = usize::from_str_radix(start, 16).expect("start address");
        let end = usize::from_str_radix(end, 16).expect("end address");
        result.mappings += 1;
        let mut pos = start;
        while pos < end {
            let n = (end - pos).min(CHUNK + OVERLAP);
            if let Err(e) = mem.read_exact_at(&mut buf[..n], pos as u64) {
                result.unreadable.push(format!("{line} at {pos:#x}: {e}"));
                buf[..].zeroize();
                break;
            }
            result.bytes += n.min(CHUNK);
            // Windows starting past CHUNK are searched with the next chunk.
            let starts = if n == CHUNK + OVERLAP { CHUNK } else { n };
            let mut i = 0;
            while i < starts && i + 2 <= n {
                // A page of zeros holds no needle (each has 64 random bits); only the windows
                // that run into the next page need a look.
                if i % PAGE == 0 && i + PAGE <= n && buf[i..i + PAGE] == ZEROS[..] {
                    i += PAGE - OVERLAP;
                    continue;
                }
                let prefix = u16::from(buf[i]) << 8 | u16::from(buf[i + 1]);
                if prefixes[usize::from(prefix >> 6)] & (1 << (prefix & 63)) != 0 {
                    for needle in needles {
                        if needle.prefix == prefix
                            && i + needle.masked.len() <= n
                            && needle.is_at(&buf[i..n])
                        {
                            result.hits.push(Hit {
                                form: needle.form.clone(),
                                address: pos + i,
                                mapping: line.to_string(),
                            });
                        }
                    }
                }
                i += 1;
            }
            buf[..n].zeroize();
            pos += CHUNK;
        }
    }
    result.elapsed = started.elapsed();
    result
}

fn describe(scan: &Scan) -> String {
    let canaries = scan
        .hits
        .iter()
        .filter(|h| h.form.contains("canary"))
        .count();
    let found: Vec<&str> = scan
        .hits
        .iter()
        .filter(|h| h.form.contains("canary"))
        .map(|h| h.form.as_str())
        .collect();
    let mut s = format!(
        "{} mappings, {} KiB searched in {:.0?}, {} unreadable, {canaries} canary pieces found {found:?}",
        scan.mappings,
        scan.bytes / 1024,
        scan.elapsed,
        scan.unreadable.len()
    );
    for u in &scan.unreadable {
        s.push_str(&format!("\n  unreadable: {u}"));
    }
    for h in scan.hits.iter().filter(|h| !h.form.contains("canary")) {
        s.push_str(&format!(
            "\n  {} at {:#x} in {}",
            h.form, h.address, h.mapping
        ));
    }
    s
}

fn verify(point: &[u8; 65], digest: &[u8; 32], sig: &[u8; 64]) {
    let vk = VerifyingKey::from_sec1_bytes(point).expect("valid public point");
    let sig = Signature::from_slice(sig).expect("64-byte signature");
    vk.verify_prehash(digest, &sig).expect("signature verifies");
}

/// What the worker thread holds between jobs.
#[derive(Default)]
struct State {
    store: Option<SoftwareStore>,
    keys: Vec<KeyRecord>,
}

type Job = Box<dyn FnOnce(&mut State) -> Box<dyn Any + Send> + Send>;

/// A thread that runs jobs and parks between them. The key work runs there, not on the
/// scanning thread, so the scan's own calls cannot overwrite what the key work left on its
/// stack; and every job runs below a 64 KiB pad, so the frames the parked thread uses
/// afterwards (answering, waiting for the next job) cannot reach that stack either.
struct Worker {
    jobs: Option<mpsc::Sender<Job>>,
    answers: mpsc::Receiver<Box<dyn Any + Send>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Worker {
    fn spawn(name: &str) -> Worker {
        let (tx, rx) = mpsc::channel::<Job>();
        let (answer_tx, answers) = mpsc::channel();
        let thread = thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let mut state = State::default();
                while let Ok(job) = rx.recv() {
                    let answer = below_a_pad(job, &mut state);
                    if answer_tx.send(answer).is_err() {
                        break;
                    }
                }
            })
            .expect("spawn worker");
        Worker {
            jobs: Some(tx),
            answers,
            thread: Some(thread),
        }
    }

    fn run<R: Send + 'static>(&self, f: impl FnOnce(&mut State) -> R + Send + 'static) -> R {
        let job: Job = Box::new(move |state: &mut State| Box::new(f(state)));
        self.jobs
            .as_ref()
            .expect("worker running")
            .send(job)
            .expect("worker alive");
        *self
            .answers
            .recv()
            .expect("job done")
            .downcast::<R>()
            .expect("answer type")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[inline(never)]
fn below_a_pad(job: Job, state: &mut State) -> Box<dyn Any + Send> {
    let pad = [0u8; 64 * 1024];
    std::hint::black_box(&pad);
    let answer = job(state);
    std::hint::black_box(&pad);
    answer
}

/// Leaves `canary` in a stack frame that returns without wiping it, below a pad so that the
/// calls the thread makes afterwards do not overwrite it.
#[inline(never)]
fn leave_on_stack(canary: &Needle) {
    let pad = [0u8; 4096];
    std::hint::black_box(&pad);
    leave_in_frame(canary);
    std::hint::black_box(&pad);
}

#[inline(never)]
fn leave_in_frame(canary: &Needle) {
    let mut frame = [0u8; 32];
    canary.write_to(&mut frame);
    std::hint::black_box(&frame);
}

/// Leaves `canary` in a heap block that is freed without wiping it.
#[inline(never)]
fn leave_in_freed_heap(canary: &Needle) {
    // A block of an odd, large size, the canary in its middle: the allocator's free-list links
    // overwrite only the head of a freed block, and no small allocation of the parked thread
    // (its channel message, say) reuses a block this size.
    let mut block = vec![0u8; 3000];
    canary.write_to(&mut block[1500..1532]);
    std::hint::black_box(&block);
}

fn found(scan: &Scan, form: &str) -> bool {
    scan.hits.iter().any(|h| h.form.starts_with(form))
}

fn new_key(label: &str) -> NewKey {
    NewKey {
        id: label.as_bytes().to_vec(),
        label: label.to_string(),
        purpose: KeyPurpose::General,
        persistent: true,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Replaces the public point in the key file at `path` (same length, in place, in a buffer
/// that is wiped: the file holds the scalar).
fn give_point(path: &Path, point: &[u8; 65]) {
    let mut file = File::open(path).expect("key file");
    let len = file.metadata().expect("key file metadata").len() as usize;
    let mut text = Zeroizing::new(vec![0u8; len]);
    file.read_exact(&mut text).expect("read the key file");
    drop(file);
    let key = b"\"public_point\": \"";
    let at = text
        .windows(key.len())
        .position(|w| w == key)
        .expect("public_point field")
        + key.len();
    let new = hex(point);
    text[at..at + new.len()].copy_from_slice(new.as_bytes());
    std::fs::write(path, &text[..]).expect("rewrite the key file");
}

/// The scan's controls: a canary in a dead stack frame and one in a freed heap block, left by a
/// parked thread (kept alive, so nothing it does later overwrites them).
fn plant_canaries() -> (Arc<Vec<Needle>>, Worker) {
    let canaries = Arc::new(vec![
        Needle::random("stack canary", 32),
        Needle::random("freed-heap canary", 32),
    ]);
    let canary_thread = Worker::spawn("canaries");
    let c = Arc::clone(&canaries);
    canary_thread.run(move |_| {
        leave_on_stack(&c[0]);
        leave_in_freed_heap(&c[1]);
    });
    (canaries, canary_thread)
}

/// The controls of every scan: all memory read, both canaries found; and in `loaded` (taken while
/// a key was in use) the key's BIGNUM found.
fn check_controls<'a>(scans: impl IntoIterator<Item = &'a Scan>, loaded: &Scan) {
    for s in scans {
        assert!(
            s.unreadable.is_empty(),
            "unreadable memory: {}",
            describe(s)
        );
        assert!(
            found(s, "stack canary") && found(s, "freed-heap canary"),
            "control failed: the scan misses a dead stack frame or a freed heap block: {}",
            describe(s)
        );
    }
    assert!(
        found(loaded, "little-endian scalar"),
        "control failed: the scan did not find the loaded key's BIGNUM: {}",
        describe(loaded)
    );
}

/// The tests of this file one at a time: a scan reads every mapping of the process, and another
/// test's threads and allocations come and go under it (an unmapped range is unreadable).
fn one_test_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn scalar_hits(scan: &Scan) -> usize {
    scan.hits
        .iter()
        .filter(|h| !h.form.contains("canary"))
        .count()
}

#[test]
fn the_scalar_is_not_in_memory_after_the_key_is_dropped() {
    let _one_at_a_time = one_test_at_a_time();
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("keys");
    let digest = [0x5au8; 32];

    // Controls for the scan itself: a canary in a dead stack frame and one in a freed heap
    // block, both left by another parked thread, must be found by every scan.
    let (canaries, canary_thread) = plant_canaries();

    let worker = Worker::spawn("key-worker");
    let mut scans: Vec<(&str, Scan)> = Vec::new();

    // 1. Generate key A, sign with it, drop store and record.
    let store_dir = dir.clone();
    let (name_a, point_a, sig) = worker.run(move |_| {
        let store = SoftwareStore::open("zeroize", Some(&store_dir)).expect("open store");
        let key = store.generate_key(&new_key("a")).expect("generate key");
        let sig = key.signer.sign_digest(&digest).expect("sign");
        (key.name.clone(), key.public_point, sig)
    });
    verify(&point_a, &digest, &sig);
    let mut needles: Vec<Needle> = canaries.iter().flat_map(Needle::pieces).collect();
    needles.extend(needles_from_key_file(&dir.join(format!("{name_a}.key"))));
    scans.push(("A generated, signed, dropped", scan(&needles)));

    // 2. Load A from its file, sign (the EC_KEY and its BIGNUM now exist) and relabel it (the
    //    file is read, parsed, encoded and written again).
    let store_dir = dir.clone();
    let wanted = name_a.clone();
    let sig = worker.run(move |state| {
        let store = SoftwareStore::open("zeroize", Some(&store_dir)).expect("reopen store");
        state.keys = store.load_keys().expect("load keys");
        let key = state
            .keys
            .iter()
            .find(|k| k.name == wanted)
            .expect("A loaded");
        let sig = key.signer.sign_digest(&digest).expect("sign");
        store.update_key(&wanted, "a2", b"a2").expect("relabel");
        state.store = Some(store);
        sig
    });
    verify(&point_a, &digest, &sig);
    let loaded = scan(&needles);

    // 3. Drop everything that holds A.
    worker.run(|state| *state = State::default());
    scans.push(("A loaded, signed, relabelled, dropped", scan(&needles)));

    // 4. Key B, generated and dropped without signing (no later signature overwrites what
    //    generating left behind) ...
    let store_dir = dir.clone();
    let name_b = worker.run(move |_| {
        let store = SoftwareStore::open("zeroize", Some(&store_dir)).expect("open store");
        let key = store.generate_key(&new_key("b")).expect("generate key");
        key.name.clone()
    });
    let path_b = dir.join(format!("{name_b}.key"));
    needles.extend(needles_from_key_file(&path_b));
    scans.push(("B generated, dropped", scan(&needles)));

    // 5. ... then given A's public point, loaded, and refused at its first signature: OpenSSL
    //    multiplied B's scalar to check it against the point, and no signature follows.
    give_point(&path_b, &point_a);
    // The store index still lists B with its own point (and would refuse the changed file before
    // OpenSSL sees it); without the index, B is listed with the point its file now holds.
    std::fs::remove_file(dir.join(devicekey_pkcs11::backend::index::INDEX_FILE))
        .expect("remove the store index");
    let store_dir = dir.clone();
    let refused = worker.run(move |_| {
        let store = SoftwareStore::open("zeroize", Some(&store_dir)).expect("open store");
        let keys = store.load_keys().expect("load keys");
        let key = keys.iter().find(|k| k.name == name_b).expect("B loaded");
        key.signer.sign_digest(&digest).err().map(|e| e.to_string())
    });
    assert!(
        refused
            .as_deref()
            .is_some_and(|e| e.contains("does not match")),
        "a key whose point is not its own must not sign: {refused:?}"
    );
    scans.push(("B loaded, refused, dropped", scan(&needles)));

    eprintln!("while A is loaded: {}", describe(&loaded));
    for (phase, s) in &scans {
        eprintln!("{phase}: {}", describe(s));
    }
    eprintln!("total {:.2?}", started.elapsed());

    check_controls(scans.iter().map(|(_, s)| s).chain([&loaded]), &loaded);
    for (phase, s) in &scans {
        assert_eq!(
            scalar_hits(s),
            0,
            "a scalar lingers in memory ({phase}): {}",
            describe(s)
        );
    }
    drop(canary_thread);
}

/// A store with a PIN: a key sealed under the first PIN, opened by a login and signed with, is
/// in memory while logged in (the control) and gone after C_Logout's `logout()`, even though the
/// store and the key's record are still held (the next login opens it again).
#[test]
fn the_scalar_is_not_in_memory_after_logout() {
    let _one_at_a_time = one_test_at_a_time();
    use devicekey_pkcs11::backend::software::pin::CHEAP_KDF_ENV;
    use devicekey_pkcs11::backend::software::PinOptions;
    std::env::set_var(CHEAP_KDF_ENV, "1");
    const PIN: &[u8] = b"zeroize-pin";
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("keys");
    let digest = [0x3cu8; 32];
    let (canaries, canary_thread) = plant_canaries();
    let worker = Worker::spawn("pin-key-worker");

    // A clear key (its file gives the needles), then the first PIN seals it.
    let store_dir = dir.clone();
    let name = worker.run(move |_| {
        let store = SoftwareStore::open("zeroize", Some(&store_dir)).expect("open store");
        store.generate_key(&new_key("p")).expect("generate").name
    });
    let mut needles: Vec<Needle> = canaries.iter().flat_map(Needle::pieces).collect();
    needles.extend(needles_from_key_file(&dir.join(format!("{name}.key"))));

    let store_dir = dir.clone();
    let (point, sig) = worker.run(move |state| {
        let store =
            SoftwareStore::open_with("zeroize", Some(&store_dir), Some(PinOptions::default()))
                .expect("open store with a PIN");
        let guard = store.pin().expect("PIN guard");
        guard.set_pin(None, PIN).expect("set the first PIN");
        guard.login(PIN).expect("login");
        state.keys = store.load_keys().expect("load keys");
        let key = &state.keys[0];
        let sig = key.signer.sign_digest(&digest).expect("sign");
        let point = key.public_point;
        state.store = Some(store);
        (point, sig)
    });
    verify(&point, &digest, &sig);
    let logged_in = scan(&needles);

    let still_refused = worker.run(move |state| {
        state
            .store
            .as_ref()
            .expect("store")
            .pin()
            .expect("guard")
            .logout();
        state.keys[0].signer.sign_digest(&digest).is_err()
    });
    assert!(still_refused, "the key signed after logout");
    let logged_out = scan(&needles);
    eprintln!("logged in: {}", describe(&logged_in));
    eprintln!("logged out: {}", describe(&logged_out));

    check_controls([&logged_in, &logged_out], &logged_in);
    assert_eq!(
        scalar_hits(&logged_out),
        0,
        "a scalar lingers in memory after logout: {}",
        describe(&logged_out)
    );
    drop(worker);
    drop(canary_thread);
}
