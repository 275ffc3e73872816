//! Cold start: a fresh process per sample that loads the module and runs C_Initialize,
//! C_GetSlotList (+ C_GetTokenInfo to pick the token), C_OpenSession (+ C_Login when the target
//! has a PIN) and C_FindObjects by label, which is what every `ssh -I` or `pkcs11-tool` run pays.
//! With `--sign` the child looks for the private key and makes one signature with it: the first
//! signature after opening the store, where a store that parses key files lazily pays for it.

use std::process::{Command, Stdio};
use std::time::Instant;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::Attribute;
use serde::{Deserialize, Serialize};
use serde_json::json;

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{AttributeType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use devicekey_pkcs11::encoding::{hex, hex_decode};

use crate::p11::{self, Target, Verifier};
use crate::runner::digest_for;
use crate::stats::{median, Record};
use crate::{BenchError, Ctx, Result};

/// What one child measured, in µs from before loading the module.
#[derive(Serialize, Deserialize)]
struct ChildTimes {
    /// dlopen + C_GetFunctionList.
    load: f64,
    /// ... + C_Initialize.
    init: f64,
    /// ... + C_GetSlotList (+ C_GetTokenInfo with a token label).
    slots: f64,
    /// ... + C_OpenSession (+ C_Login).
    session: f64,
    /// ... + C_FindObjects (the whole cold start).
    total: f64,
    /// ... + C_SignInit + C_Sign of one digest (with `--sign`).
    signed: Option<f64>,
    /// Objects found with the label.
    found: usize,
    /// With `--sign`: the signature (r‖s) of `digest_for(0, 0)` and the key's public point (SEC1),
    /// hex, read after the clock stopped, for the parent to check.
    signature: Option<(String, String)>,
}

/// Runs in the child: one cold start (and with `sign`, one signature), printed as JSON on stdout.
pub fn child(target: &Target, label: &str, sign: bool) -> Result<()> {
    let pin = match &target.pin_env {
        Some(var) => Some(AuthPin::from(std::env::var(var).map_err(|_| {
            BenchError::Other(format!("the PIN variable {var} is not set"))
        })?)),
        None => None,
    };
    let mut template = vec![Attribute::Label(label.as_bytes().to_vec())];
    if sign {
        template.push(Attribute::Class(ObjectClass::PRIVATE_KEY));
    }
    let t0 = Instant::now();
    let us = |t: Instant| t.duration_since(t0).as_secs_f64() * 1e6;
    let ctx = Pkcs11::new(&target.module).ctx("loading the module")?;
    let loaded = Instant::now();
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .ctx("C_Initialize")?;
    let initialized = Instant::now();
    let slot = p11::find_slot(&ctx, target.token.as_deref())?;
    let listed = Instant::now();
    let session = ctx.open_ro_session(slot).ctx("C_OpenSession")?;
    if let Some(pin) = &pin {
        session.login(UserType::User, Some(pin)).ctx("C_Login")?;
    }
    let opened = Instant::now();
    let objects = session.find_objects(&template).ctx("C_FindObjects")?;
    let done = Instant::now();
    let digest = digest_for(0, 0);
    let signature = match (sign, objects.first()) {
        (true, Some(&key)) => Some(
            session
                .sign(&Mechanism::Ecdsa, key, &digest)
                .ctx("C_Sign")?,
        ),
        _ => None,
    };
    let signed = signature.is_some().then(|| us(Instant::now()));
    let signature = match signature {
        Some(sig) => {
            let public = p11::find_labelled(&session, ObjectClass::PUBLIC_KEY, label)?
                .ok_or_else(|| BenchError::Invalid(format!("no public key labelled {label:?}")))?;
            let point = p11::attribute_bytes(&session, public, AttributeType::EcPoint)?
                .ok_or_else(|| BenchError::Invalid("the public key has no CKA_EC_POINT".into()))?;
            Some((hex(&sig), hex(&p11::decode_point(&point)?)))
        }
        None => None,
    };
    let times = ChildTimes {
        load: us(loaded),
        init: us(initialized),
        slots: us(listed),
        session: us(opened),
        total: us(done),
        signed,
        found: objects.len(),
        signature,
    };
    println!(
        "{}",
        serde_json::to_string(&times).map_err(|e| BenchError::Other(e.to_string()))?
    );
    Ok(())
}

/// Checks a child's signature of `digest_for(0, 0)` against the point it read.
fn check_child_signature(signature: &Option<(String, String)>) -> Result<()> {
    let Some((sig, point)) = signature else {
        return Err(BenchError::Invalid(
            "the cold-start child did not sign".into(),
        ));
    };
    let unhex = |h: &str| {
        hex_decode(h).ok_or_else(|| BenchError::Invalid("cold-start child output: bad hex".into()))
    };
    Verifier::from_point(&unhex(point)?)?.check_raw(&digest_for(0, 0), &unhex(sig)?)
}

/// Options of the cold-start measurement.
#[derive(clap::Args, Clone, Debug)]
pub struct ColdPlan {
    /// Runs per figure.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Child processes per run (the run's value is their median).
    #[arg(long, default_value_t = 20)]
    pub samples: usize,
    /// The variant shown in the output (e.g. "10 keys").
    #[arg(long, default_value = "")]
    pub variant: String,
    /// Also make one signature with the private key of that label after finding it.
    #[arg(long)]
    pub sign: bool,
}

/// Runs `runs × samples` children and emits the cold start, its C_Initialize part, and the
/// wall time of the whole child process (exec included); with `sign` also the first signature
/// (C_SignInit + C_Sign) and the cold start up to that signature.
pub fn parent(target: &Target, label: &str, plan: &ColdPlan) -> Result<()> {
    let exe = std::env::current_exe()?;
    // Per run, the median over its samples of: cold start, C_Initialize, process wall time (ms),
    // first signature (us), cold start to the signature (ms).
    let mut runs: [Vec<f64>; 5] = Default::default();
    let mut found = 0;
    // Every sample's phases: load, C_Initialize, slot list, open session, find (ms).
    let mut phases: [Vec<f64>; 5] = Default::default();
    for _ in 0..plan.runs {
        let mut samples: [Vec<f64>; 5] = Default::default();
        for _ in 0..plan.samples {
            let mut cmd = Command::new(&exe);
            cmd.arg("cold-child")
                .arg("--module")
                .arg(&target.module)
                .arg("--name")
                .arg(&target.name)
                .arg("--label")
                .arg(label)
                .stdin(Stdio::null())
                .stderr(Stdio::inherit());
            if let Some(token) = &target.token {
                cmd.arg("--token").arg(token);
            }
            if let Some(pin_env) = &target.pin_env {
                cmd.arg("--pin-env").arg(pin_env);
            }
            if plan.sign {
                cmd.arg("--sign");
            }
            let start = Instant::now();
            let out = cmd.output()?;
            let elapsed = start.elapsed().as_secs_f64() * 1e3;
            if !out.status.success() {
                return Err(BenchError::Other(format!(
                    "cold-start child failed ({})",
                    out.status
                )));
            }
            let times: ChildTimes = serde_json::from_slice(&out.stdout)
                .map_err(|e| BenchError::Other(format!("cold-start child output: {e}")))?;
            if times.found == 0 {
                return Err(BenchError::Invalid(format!(
                    "the cold-start child found no object labelled {label:?}"
                )));
            }
            found = times.found;
            let marks = [
                0.0,
                times.load,
                times.init,
                times.slots,
                times.session,
                times.total,
            ];
            for (k, p) in phases.iter_mut().enumerate() {
                p.push((marks[k + 1] - marks[k]) / 1e3);
            }
            samples[0].push(times.total / 1e3);
            samples[1].push(times.init / 1e3);
            samples[2].push(elapsed);
            if plan.sign {
                check_child_signature(&times.signature)?;
                let signed = times.signed.unwrap_or_default();
                samples[3].push(signed - times.total);
                samples[4].push(signed / 1e3);
            }
        }
        for (run, sample) in runs.iter_mut().zip(&samples) {
            run.push(median(sample));
        }
    }
    let [load, initialize, slots, session, find] = phases.map(|p| median(&p));
    let detail = json!({
        "processes_per_run": plan.samples,
        "objects_found": found,
        "signature_checked": plan.sign,
        "median_phases_ms": {
            "dlopen": load, "C_Initialize": initialize, "C_GetSlotList+C_GetTokenInfo": slots,
            "C_OpenSession(+C_Login)": session, "C_FindObjects": find,
        },
    });
    let [total, init, wall, first_sign, to_sign] = runs;
    let mut records = vec![
        ("cold_start", "ms", total),
        ("c_initialize", "ms", init),
        ("cold_start_process", "ms", wall),
    ];
    if plan.sign {
        records.push(("first_sign", "us", first_sign));
        records.push(("cold_start_sign", "ms", to_sign));
    }
    for (bench, unit, values) in records {
        Record::new(bench, &target.name, &plan.variant, unit, values)
            .with_detail(detail.clone())
            .emit();
    }
    Ok(())
}
