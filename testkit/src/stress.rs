//! Shared helpers of the robustness tests (`stress_*`, `crash_*`, `robust_*`): the scale knob,
//! a deterministic pseudo-random generator, a watchdog, and peak-RSS reading.
//!
//! `STRESS_SCALE` scales every count: `1` (or `full`) gives the full counts, which
//! `scripts/stress.sh` uses; unset, the tests run at the small CI scale (`0.1`).

use std::sync::mpsc;
use std::time::Duration;

/// The scale factor: `STRESS_SCALE` as a number (`full` = 1), else 0.1.
pub fn scale() -> f64 {
    match std::env::var("STRESS_SCALE") {
        Ok(s) if s == "full" => 1.0,
        Ok(s) => s.parse::<f64>().ok().filter(|f| *f > 0.0).unwrap_or(0.1),
        Err(_) => 0.1,
    }
}

/// `full` scaled, at least `min`.
pub fn scaled(full: usize, min: usize) -> usize {
    ((full as f64 * scale()).round() as usize).max(min)
}

/// xorshift64*: small, fast, reproducible from a seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed (0 is replaced by a constant).
    pub fn new(seed: u64) -> Self {
        Rng(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// A generator seeded from `STRESS_SEED` or the clock; returns the seed used too.
    pub fn from_env_or_clock() -> (Self, u64) {
        let seed = std::env::var("STRESS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        (Rng::new(seed), seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

/// Runs `f` on its own thread; panics (failing the test) if it has not finished after `limit`,
/// which is how a deadlock shows up. The stuck thread is left behind; the test process exits.
pub fn with_watchdog<T: Send + 'static>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("watched: {what}"))
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = tx.send(r);
        })
        .expect("spawn watched thread");
    match rx.recv_timeout(limit) {
        Ok(Ok(v)) => v,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("{what}: not finished after {limit:?} (deadlock?)"),
    }
}

/// A field of `/proc/<pid>/status` in KiB (`VmHWM`, `VmRSS`...).
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(&format!("{field}:")))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
