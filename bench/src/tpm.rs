//! Our TPM key store called in-process through its `Backend` (no PKCS#11): one TPM signature per
//! call. Beside the module's C_Sign figures it shows what the module adds, and that a length query
//! costs no second TPM signature (that would make a C_Sign twice as slow as this). The first
//! signature, which loads the key into the TPM, is reported on its own. Also the TPM stores of
//! the scale part, made by `scale::prepare` with the config's TPM slot pointed at each directory.

use std::path::Path;

use devicekey_pkcs11::backend::tpm::TpmBackend;
use devicekey_pkcs11::backend::Backend;
use devicekey_pkcs11::config::{Config, SlotConfig, TpmSlot};
use serde_json::json;

use crate::p11::Verifier;
use crate::runner;
use crate::scale;
use crate::sign::{latency_figures, Plan};
use crate::stats::Record;
use crate::{BenchError, Result};

fn store_err(e: impl std::fmt::Display) -> BenchError {
    BenchError::Other(format!("TPM store: {e}"))
}

/// The first TPM slot of the config.
fn tpm_slot() -> Result<TpmSlot> {
    let config = Config::load().map_err(store_err)?;
    config
        .slots
        .into_iter()
        .find_map(|s| match s {
            SlotConfig::Tpm(t) => Some(t),
            _ => None,
        })
        .ok_or_else(|| BenchError::Other("the config has no TPM slot".into()))
}

/// `scale-prepare --tpm`: TPM stores of the given sizes under `base`, on the TPM of the config's
/// TPM slot.
pub fn prepare(base: &Path, counts: &[usize], staging: Option<&Path>) -> Result<()> {
    let slot = tpm_slot()?;
    let open = |dir: &Path| -> Result<Box<dyn Backend>> {
        let slot = TpmSlot {
            dir: Some(dir.to_path_buf()),
            ..slot.clone()
        };
        Ok(Box::new(
            TpmBackend::from_slot(&slot).map_err(scale::store_err)?,
        ))
    };
    scale::prepare(base, counts, staging, "ours-tpm", &open)
}

/// `tpm-raw`: latency and 1-thread throughput of `sign_digest` on the key labelled `label` of
/// the first TPM slot of the config.
pub fn raw(label: &str, plan: &Plan) -> Result<()> {
    let store = TpmBackend::from_slot(&tpm_slot()?).map_err(store_err)?;
    let key = store
        .load_keys()
        .map_err(store_err)?
        .into_iter()
        .find(|k| k.label == label)
        .ok_or_else(|| BenchError::Other(format!("no TPM key labelled {label:?}")))?;
    let verifier = Verifier::from_point(&key.public_point)?;
    let sign = |digest: &[u8; 32]| key.signer.sign_digest(digest).map_err(store_err);

    // The first signature after opening the store includes TPM2_Load of the key.
    let digest = runner::digest_for(0, 0);
    let t = std::time::Instant::now();
    let sig = sign(&digest)?;
    let first = t.elapsed().as_secs_f64() * 1e3;
    verifier.check_raw(&digest, &sig)?;
    Record::new(
        "sign_first_latency",
        "ours-tpm-backend",
        "with TPM2_Load",
        "ms",
        vec![first],
    )
    .emit();

    let mut rates = Vec::new();
    let mut verified = 0;
    for _ in 0..plan.runs {
        let run = runner::throughput(
            1,
            std::time::Duration::from_secs_f64(plan.seconds),
            plan.warmup,
            &|| Ok(|d: &[u8; 32]| sign(d).map(|s| s.to_vec())),
        )?;
        for s in &run.samples {
            verifier.check_raw(&s.digest, &s.signature)?;
            verified += 1;
        }
        rates.push(run.rate);
    }
    Record::new(
        "sign_throughput",
        "ours-tpm-backend",
        "1 thread",
        "ops/s",
        rates,
    )
    .with_detail(json!({"verified": verified, "seconds_per_run": plan.seconds}))
    .emit();
    latency_figures("sign_latency", "ours-tpm-backend", "", plan, |n| {
        let digest = runner::digest_for(0, n);
        let sig = sign(&digest)?;
        verifier.check_raw(&digest, &sig)
    })?;
    Ok(())
}
