//! Cold start: a fresh process per sample that loads the module and runs C_Initialize,
//! C_GetSlotList (+ C_GetTokenInfo to pick the token), C_OpenSession and C_FindObjects by label,
//! which is what every `ssh -I` or `pkcs11-tool` run pays.

use std::process::{Command, Stdio};
use std::time::Instant;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::Attribute;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::p11::{self, Target};
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
    /// ... + C_OpenSession.
    session: f64,
    /// ... + C_OpenSession + C_FindObjects (the whole cold start).
    total: f64,
    /// Objects found with the label.
    found: usize,
}

/// Runs in the child: one cold start, printed as JSON on stdout.
pub fn child(target: &Target, label: &str) -> Result<()> {
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
    let opened = Instant::now();
    let found = session
        .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
        .ctx("C_FindObjects")?
        .len();
    let done = Instant::now();
    let times = ChildTimes {
        load: us(loaded),
        init: us(initialized),
        slots: us(listed),
        session: us(opened),
        total: us(done),
        found,
    };
    println!(
        "{}",
        serde_json::to_string(&times).map_err(|e| BenchError::Other(e.to_string()))?
    );
    Ok(())
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
}

/// Runs `runs × samples` children and emits the cold start, its C_Initialize part, and the
/// wall time of the whole child process (exec included).
pub fn parent(target: &Target, label: &str, plan: &ColdPlan) -> Result<()> {
    let exe = std::env::current_exe()?;
    let (mut total, mut init, mut wall) = (Vec::new(), Vec::new(), Vec::new());
    let mut found = 0;
    // Every sample's phases: load, C_Initialize, slot list, open session, find (ms).
    let mut phases: [Vec<f64>; 5] = Default::default();
    for _ in 0..plan.runs {
        let (mut t, mut i, mut w) = (Vec::new(), Vec::new(), Vec::new());
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
            t.push(times.total / 1e3);
            i.push(times.init / 1e3);
            w.push(elapsed);
        }
        total.push(median(&t));
        init.push(median(&i));
        wall.push(median(&w));
    }
    let [load, initialize, slots, session, find] = phases.map(|p| median(&p));
    let detail = json!({
        "processes_per_run": plan.samples,
        "objects_found": found,
        "median_phases_ms": {
            "dlopen": load, "C_Initialize": initialize, "C_GetSlotList+C_GetTokenInfo": slots,
            "C_OpenSession": session, "C_FindObjects": find,
        },
    });
    for (bench, values) in [
        ("cold_start", total),
        ("c_initialize", init),
        ("cold_start_process", wall),
    ] {
        Record::new(bench, &target.name, &plan.variant, "ms", values)
            .with_detail(detail.clone())
            .emit();
    }
    Ok(())
}
