//! Timed loops: signing throughput on N threads (each with its own worker, e.g. one PKCS#11
//! session), and per-call latency samples. Every thread keeps a sample of what it signed so the
//! caller can check the signatures afterwards.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use crate::Result;

/// Every this many signatures, one is kept for checking.
const SAMPLE_EVERY: u64 = 500;

/// A signature kept for checking.
pub struct Sampled {
    /// What was signed.
    pub digest: [u8; 32],
    /// What the signer returned.
    pub signature: Vec<u8>,
}

/// The outcome of one timed run.
pub struct Run {
    /// Signatures per second, all threads together.
    pub rate: f64,
    /// Signatures made in the timed part.
    pub ops: u64,
    /// Signatures kept for checking.
    pub samples: Vec<Sampled>,
}

/// A distinct digest for signature `n` of thread `t`.
pub fn digest_for(t: usize, n: u64) -> [u8; 32] {
    let mut d = [0x5a_u8; 32];
    d[..8].copy_from_slice(&n.to_le_bytes());
    d[8] = t as u8;
    d
}

/// Runs `threads` workers for `duration`; each thread builds its worker with `factory` (so it
/// may hold a session that is not `Sync`), warms it up, then signs until told to stop.
pub fn throughput<W, F>(threads: usize, duration: Duration, warmup: u64, factory: &F) -> Result<Run>
where
    F: Fn() -> Result<W> + Sync,
    W: FnMut(&[u8; 32]) -> Result<Vec<u8>>,
{
    let stop = AtomicBool::new(false);
    let barrier = Barrier::new(threads + 1);
    let (results, elapsed) = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (stop, barrier) = (&stop, &barrier);
                scope.spawn(move || -> Result<(u64, Vec<Sampled>)> {
                    let prepared = factory().and_then(|mut w| {
                        for n in 0..warmup {
                            w(&digest_for(t, u64::MAX - n))?;
                        }
                        Ok(w)
                    });
                    barrier.wait();
                    let mut worker = prepared?;
                    let (mut n, mut samples) = (0u64, Vec::new());
                    while !stop.load(Ordering::Relaxed) {
                        let digest = digest_for(t, n);
                        let signature = worker(&digest)?;
                        if n % SAMPLE_EVERY == 0 {
                            samples.push(Sampled { digest, signature });
                        }
                        n += 1;
                    }
                    Ok((n, samples))
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        std::thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
        let results: Vec<_> = handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(crate::BenchError::Other("a worker thread panicked".into()))
                })
            })
            .collect();
        (results, start.elapsed())
    });
    let (mut ops, mut samples) = (0, Vec::new());
    for r in results {
        let (n, s) = r?;
        ops += n;
        samples.extend(s);
    }
    Ok(Run {
        rate: ops as f64 / elapsed.as_secs_f64(),
        ops,
        samples,
    })
}

/// Times `iterations` calls of `op` (after `warmup` untimed ones); returns each call's duration
/// in µs.
pub fn latencies(
    iterations: usize,
    warmup: u64,
    mut op: impl FnMut(u64) -> Result<()>,
) -> Result<Vec<f64>> {
    for n in 0..warmup {
        op(u64::MAX - n)?;
    }
    let mut out = Vec::with_capacity(iterations);
    for n in 0..iterations as u64 {
        let t = Instant::now();
        op(n)?;
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(out)
}
