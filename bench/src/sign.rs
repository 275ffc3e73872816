//! C_Sign throughput and latency through a PKCS#11 module, C_GetAttributeValue(CKA_EC_POINT)
//! latency, and the same signing primitive called in-process (the ceiling for a module).

use std::time::Duration;

use cryptoki::mechanism::Mechanism;
use cryptoki::object::AttributeType;
use openssl::ec::{EcGroup, EcKey};
use openssl::ecdsa::EcdsaSig;
use openssl::nid::Nid;
use openssl::pkey::Private;
use serde_json::json;

use crate::p11::{self, Module, Target, Verifier};
use crate::runner::{self, Run};
use crate::stats::{percentile, Record};
use crate::{BenchError, Ctx, Result};

/// How long and how often to measure.
#[derive(clap::Args, Clone, Debug)]
pub struct Plan {
    /// Timed runs per figure.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Seconds per throughput run.
    #[arg(long, default_value_t = 1.0)]
    pub seconds: f64,
    /// Calls per latency run.
    #[arg(long, default_value_t = 2000)]
    pub iterations: usize,
    /// Thread counts for throughput.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub threads: Vec<usize>,
    /// Untimed calls before each run (per thread).
    #[arg(long, default_value_t = 200)]
    pub warmup: u64,
}

fn variant(threads: usize) -> String {
    if threads == 1 {
        "1 thread".into()
    } else {
        format!("{threads} threads")
    }
}

/// Checks every kept signature; returns how many were checked.
fn check(run: &Run, verifier: &Verifier) -> Result<usize> {
    for s in &run.samples {
        verifier.check_raw(&s.digest, &s.signature)?;
    }
    if run.samples.is_empty() {
        return Err(BenchError::Invalid(
            "no signature was kept for checking".into(),
        ));
    }
    Ok(run.samples.len())
}

/// Runs the throughput figures for every thread count and emits them.
fn throughput_figures<W, F>(
    subject: &str,
    plan: &Plan,
    verifier: &Verifier,
    factory: &F,
) -> Result<()>
where
    F: Fn() -> Result<W> + Sync,
    W: FnMut(&[u8; 32]) -> Result<Vec<u8>>,
{
    for &threads in &plan.threads {
        let (mut rates, mut verified, mut ops) = (Vec::new(), 0, 0);
        for _ in 0..plan.runs {
            let run = runner::throughput(
                threads,
                Duration::from_secs_f64(plan.seconds),
                plan.warmup,
                factory,
            )?;
            verified += check(&run, verifier)?;
            ops += run.ops;
            rates.push(run.rate);
        }
        Record::new(
            "sign_throughput",
            subject,
            &variant(threads),
            "ops/s",
            rates,
        )
        .with_detail(
            json!({"signatures": ops, "verified": verified, "seconds_per_run": plan.seconds}),
        )
        .emit();
    }
    Ok(())
}

/// Emits p50 and p99 records of `runs` latency runs of `op`.
pub fn latency_figures(
    bench: &str,
    subject: &str,
    variant: &str,
    plan: &Plan,
    mut op: impl FnMut(u64) -> Result<()>,
) -> Result<(f64, f64)> {
    let (mut p50, mut p99, mut mean) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..plan.runs {
        let mut samples = runner::latencies(plan.iterations, plan.warmup, &mut op)?;
        mean.push(samples.iter().sum::<f64>() / samples.len().max(1) as f64);
        p50.push(percentile(&mut samples, 0.50));
        p99.push(percentile(&mut samples, 0.99));
    }
    let detail = json!({"calls_per_run": plan.iterations, "mean_us": mean});
    let a = Record::new(&format!("{bench}_p50"), subject, variant, "us", p50)
        .with_detail(detail.clone());
    let b = Record::new(&format!("{bench}_p99"), subject, variant, "us", p99).with_detail(detail);
    a.emit();
    b.emit();
    Ok((a.median, b.median))
}

/// `sign`: throughput (1 and 2 threads), sign latency and CKA_EC_POINT latency of one module.
pub fn module(target: &Target, label: &str, plan: &Plan) -> Result<()> {
    let m = Module::open(target)?;
    let s = m.session()?;
    let (private, public) = p11::key_pair(&s, label)?;
    let verifier = Verifier::from_object(&s, public)?;
    let mech = Mechanism::Ecdsa;

    // Module holds the login session, which is not Sync: the threads take only the context.
    let (ctx, slot) = (&m.ctx, m.slot);
    let factory = || {
        let session = ctx.open_rw_session(slot).ctx("C_OpenSession")?;
        let (key, _) = p11::key_pair(&session, label)?;
        Ok(move |digest: &[u8; 32]| session.sign(&Mechanism::Ecdsa, key, digest).ctx("C_Sign"))
    };
    throughput_figures(&target.name, plan, &verifier, &factory)?;

    latency_figures("sign_latency", &target.name, "", plan, |n| {
        let digest = runner::digest_for(0, n);
        let sig = s.sign(&mech, private, &digest).ctx("C_Sign")?;
        if n % 500 == 0 {
            verifier.check_raw(&digest, &sig)?;
        }
        Ok(())
    })?;
    latency_figures("ec_point_latency", &target.name, "", plan, |_| {
        s.get_attributes(public, &[AttributeType::EcPoint])
            .ctx("C_GetAttributeValue")
            .map(|_| ())
    })?;
    Ok(())
}

/// Signs like the software store does: `EcdsaSig::sign` over the digest, then raw `r‖s`.
fn openssl_sign(key: &EcKey<Private>, digest: &[u8; 32]) -> Result<Vec<u8>> {
    let sig = EcdsaSig::sign(digest, key).map_err(|e| BenchError::Other(format!("sign: {e}")))?;
    let mut out = sig
        .r()
        .to_vec_padded(32)
        .map_err(|e| BenchError::Other(format!("r: {e}")))?;
    out.extend(
        sig.s()
            .to_vec_padded(32)
            .map_err(|e| BenchError::Other(format!("s: {e}")))?,
    );
    Ok(out)
}

/// `raw`: the signing primitive in-process, no PKCS#11 (OpenSSL as the software store uses it;
/// the RustCrypto `p256` crate for comparison, one thread).
pub fn raw(plan: &Plan) -> Result<()> {
    // The RustCrypto implementation, to show the choice of primitive (first, so that OpenSSL
    // runs right before the module runs that bench.sh compares with it).
    use p256::ecdsa::signature::hazmat::PrehashSigner;
    let mut secret = [0u8; 32];
    getrandom::getrandom(&mut secret).map_err(|e| BenchError::Other(format!("getrandom: {e}")))?;
    let sk = p256::ecdsa::SigningKey::from_slice(&secret)
        .map_err(|e| BenchError::Other(format!("p256 key: {e}")))?;
    let vk = Verifier::from_point(sk.verifying_key().to_encoded_point(false).as_bytes())?;
    let rc_plan = Plan {
        threads: vec![1],
        ..plan.clone()
    };
    let factory = || {
        Ok(|digest: &[u8; 32]| {
            let sig: p256::ecdsa::Signature = sk
                .sign_prehash(digest)
                .map_err(|e| BenchError::Other(format!("p256 sign: {e}")))?;
            Ok(sig.to_bytes().to_vec())
        })
    };
    throughput_figures("p256-crate-raw", &rc_plan, &vk, &factory)?;

    let ossl = |e: openssl::error::ErrorStack| BenchError::Other(format!("openssl: {e}"));
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).map_err(ossl)?;
    let key = EcKey::generate(&group).map_err(ossl)?;
    let mut ctx = openssl::bn::BigNumContext::new().map_err(ossl)?;
    let point = key
        .public_key()
        .to_bytes(
            &group,
            openssl::ec::PointConversionForm::UNCOMPRESSED,
            &mut ctx,
        )
        .map_err(ossl)?;
    let verifier = Verifier::from_point(&point)?;
    let factory = || Ok(|digest: &[u8; 32]| openssl_sign(&key, digest));
    throughput_figures("openssl-raw", plan, &verifier, &factory)?;
    latency_figures("sign_latency", "openssl-raw", "", plan, |n| {
        openssl_sign(&key, &runner::digest_for(0, n)).map(|_| ())
    })?;
    Ok(())
}
