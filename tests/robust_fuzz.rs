//! The fuzz harnesses of `fuzz/` on the stable toolchain: every seed and every regression input
//! is replayed, then each target runs on random and mutated inputs for a bounded time
//! (`FUZZ_SMOKE_SECONDS` per target, default 3). cargo-fuzz runs the same harnesses with coverage
//! guidance for longer (`scripts/fuzz.sh`).
//!
//! A panic anywhere, even one the ABI catches and turns into `CKR_GENERAL_ERROR`, fails the run;
//! the input is saved under `target/robust-fuzz-failures/` for `fuzz/regressions/`.

#[path = "../fuzz/src/abi.rs"]
mod abi;
#[path = "../fuzz/src/input.rs"]
mod input;
#[path = "../fuzz/src/key_file.rs"]
mod key_file;
#[path = "../fuzz/src/proof_payload.rs"]
mod proof_payload;
#[path = "../fuzz/src/rpc_lines.rs"]
mod rpc_lines;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use testkit::stress::Rng;

type Harness = fn(&[u8]);

const TARGETS: &[(&str, Harness)] = &[
    ("abi", abi::run),
    ("rpc_lines", rpc_lines::run),
    ("proof_payload", proof_payload::run),
    ("key_file", key_file::run),
];

static PANICS: AtomicUsize = AtomicUsize::new(0);
static LAST_PANIC: Mutex<String> = Mutex::new(String::new());

/// Counts every panic (caught or not) and keeps its message.
fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            if let Ok(mut last) = LAST_PANIC.lock() {
                *last = info.to_string();
            }
            default(info);
        }));
    });
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn files_in(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_file())
        .filter_map(|e| std::fs::read(e.path()).ok().map(|d| (e.path(), d)))
        .collect();
    out.sort();
    out
}

/// Runs one input; on a panic saves it and fails with its hex.
fn run_one(name: &str, harness: Harness, data: &[u8], origin: &str) {
    let before = PANICS.load(Ordering::SeqCst);
    let result = std::panic::catch_unwind(|| harness(data));
    let panicked = PANICS.load(Ordering::SeqCst) != before || result.is_err();
    if panicked {
        let dir = root().join("target/robust-fuzz-failures");
        let _ = std::fs::create_dir_all(&dir);
        let file = dir.join(format!("{name}-{:016x}", fxhash(data)));
        let _ = std::fs::write(&file, data);
        let message = LAST_PANIC.lock().map(|m| m.clone()).unwrap_or_default();
        panic!(
            "{name}: input from {origin} panicked: {message}\nsaved as {}\ninput ({} bytes): {}",
            file.display(),
            data.len(),
            hex(&data[..data.len().min(512)])
        );
    }
}

fn fxhash(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

/// A random input: fresh bytes, or a seed with a few mutations.
fn random_input(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    if seeds.is_empty() || rng.below(3) == 0 {
        let max = if rng.below(8) == 0 { 4096 } else { 256 };
        let len = rng.below(max);
        return rng.bytes(len);
    }
    let mut d = seeds[rng.below(seeds.len())].clone();
    for _ in 0..1 + rng.below(6) {
        let pos = if d.is_empty() { 0 } else { rng.below(d.len()) };
        match rng.below(5) {
            0 if !d.is_empty() => d[pos] ^= 1 << rng.below(8),
            1 if !d.is_empty() => d[pos] = rng.next_u64() as u8,
            2 => d.insert(pos, rng.next_u64() as u8),
            3 if !d.is_empty() => {
                d.remove(pos);
            }
            _ => {
                let n = rng.below(16);
                let chunk = rng.bytes(n);
                d.splice(pos..pos, chunk);
            }
        }
    }
    d
}

fn smoke_seconds() -> f64 {
    std::env::var("FUZZ_SMOKE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0)
}

#[test]
fn fuzz_targets_replay_seeds_and_regressions_then_run_random_inputs() {
    install_hook();
    let (mut rng, seed) = Rng::from_env_or_clock();
    let budget = Duration::from_secs_f64(smoke_seconds());
    for &(name, harness) in TARGETS {
        let mut seeds = Vec::new();
        let mut replayed = 0;
        for kind in ["seeds", "regressions"] {
            for (path, data) in files_in(&root().join("fuzz").join(kind).join(name)) {
                run_one(name, harness, &data, &path.display().to_string());
                replayed += 1;
                seeds.push(data);
            }
        }
        let started = Instant::now();
        let mut runs = 0u64;
        while started.elapsed() < budget {
            let data = random_input(&mut rng, &seeds);
            run_one(name, harness, &data, &format!("random (seed {seed})"));
            runs += 1;
        }
        eprintln!(
            "FUZZ-SMOKE {name}: {replayed} seeds/regressions replayed, {runs} random inputs in \
             {:?} (seed {seed}), no panic",
            started.elapsed()
        );
    }
}
