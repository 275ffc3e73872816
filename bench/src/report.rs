//! The summary: every measurement as a table, and the targets as ratios (met or missed).

use std::path::Path;

use crate::stats::{fmt_num, median, Record};
use crate::{BenchError, Result};

/// One target of the issue, evaluated.
struct Verdict {
    what: &'static str,
    value: Option<f64>,
    unit: &'static str,
    goal: &'static str,
    met: Option<bool>,
}

fn find<'a>(
    records: &'a [Record],
    bench: &str,
    subject: &str,
    variant: &str,
) -> Option<&'a Record> {
    records
        .iter()
        .rev()
        .find(|r| r.bench == bench && r.subject == subject && r.variant == variant)
}

/// `a / b`. When both have one value per round (bench.sh measures compared subjects in turns),
/// the median of the per-round ratios: two runs taken seconds apart share the machine's load,
/// which the ratio of two medians would not cancel. Otherwise the ratio of the medians.
fn ratio(a: Option<&Record>, b: Option<&Record>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if a.values.len() == b.values.len() && a.values.len() > 1 => {
            let per_round: Vec<f64> = a
                .values
                .iter()
                .zip(&b.values)
                .filter(|(_, y)| **y > 0.0)
                .map(|(x, y)| x / y)
                .collect();
            (!per_round.is_empty()).then(|| median(&per_round))
        }
        (Some(a), Some(b)) if b.median > 0.0 => Some(a.median / b.median),
        _ => None,
    }
}

fn verdicts(r: &[Record]) -> Vec<Verdict> {
    let mut out = Vec::new();
    let mut push = |what, value: Option<f64>, unit, goal, test: &dyn Fn(f64) -> bool| {
        out.push(Verdict {
            what,
            value,
            unit,
            goal,
            met: value.map(test),
        })
    };
    let tput = |s: &str, v: &str| find(r, "sign_throughput", s, v);
    for (what, v) in [
        (
            "C_Sign throughput, ours / raw OpenSSL, 1 thread",
            "1 thread",
        ),
        (
            "C_Sign throughput, ours / raw OpenSSL, 2 threads",
            "2 threads",
        ),
    ] {
        push(
            what,
            ratio(tput("ours", v), tput("openssl-raw", v)),
            "x",
            ">= 0.80",
            &|x| x >= 0.8,
        );
    }
    for (what, v) in [
        ("C_Sign throughput, ours / SoftHSM, 1 thread", "1 thread"),
        ("C_Sign throughput, ours / SoftHSM, 2 threads", "2 threads"),
    ] {
        push(
            what,
            ratio(tput("ours", v), tput("softhsm", v)),
            "x",
            "about 2 (follows from 0.8 x raw)",
            &|x| x >= 1.8,
        );
    }
    for (what, v) in [
        (
            "Wrapping: ours over SoftHSM / SoftHSM, 1 thread",
            "1 thread",
        ),
        (
            "Wrapping: ours over SoftHSM / SoftHSM, 2 threads",
            "2 threads",
        ),
    ] {
        push(
            what,
            ratio(tput("ours-over-softhsm", v), tput("softhsm", v)),
            "x",
            ">= 0.90",
            &|x| x >= 0.9,
        );
    }
    push(
        "Cold start, ours, 10 keys",
        find(r, "cold_start", "ours", "10 keys").map(|x| x.median),
        "ms",
        "< 5",
        &|x| x < 5.0,
    );
    for (what, bench) in [
        (
            "FindObjects by CKA_ID p50, 10,000 / 10 keys",
            "find_by_id_p50",
        ),
        (
            "FindObjects by label p50, 10,000 / 10 keys",
            "find_by_label_p50",
        ),
    ] {
        push(
            what,
            ratio(
                find(r, bench, "ours", "10000 keys"),
                find(r, bench, "ours", "10 keys"),
            ),
            "x",
            "<= 2",
            &|x| x <= 2.0,
        );
    }
    // A store that grows must not make opening it, or its first signature, slower.
    for (what, bench, subject, big) in [
        (
            "Cold start, ours, 100,000 / 10 keys",
            "cold_start",
            "ours",
            "100000 keys",
        ),
        (
            "First signature after open, ours, 100,000 / 10 keys",
            "first_sign",
            "ours",
            "100000 keys",
        ),
        (
            "TPM cold start, ours, 1,000 / 10 keys",
            "cold_start",
            "ours-tpm",
            "1000 keys",
        ),
        (
            "TPM first signature after open, ours, 1,000 / 10 keys",
            "first_sign",
            "ours-tpm",
            "1000 keys",
        ),
    ] {
        push(
            what,
            ratio(
                find(r, bench, subject, big),
                find(r, bench, subject, "10 keys"),
            ),
            "x",
            "<= 2",
            &|x| x <= 2.0,
        );
    }
    push(
        "TPM2_CreatePrimary per process, ours, persistent SRK",
        find(
            r,
            "tpm_create_primary_per_process",
            "ours-tpm",
            "persistent SRK",
        )
        .map(|x| x.median),
        "commands",
        "0",
        &|x| x == 0.0,
    );
    push(
        "JSON-RPC sign overhead beyond C_Sign, p50, client and server on 1 CPU",
        find(r, "rpc_overhead_p50", "ours-serve", "one at a time, 1 CPU").map(|x| x.median),
        "us",
        "< 100",
        &|x| x < 100.0,
    );
    let minus = |a: Option<&Record>, b: Option<&Record>| match (a, b) {
        (Some(a), Some(b)) => Some(a.median - b.median),
        _ => None,
    };
    push(
        "JSON-RPC sign overhead beyond C_Sign, p50, unpinned, less the pipe round trip",
        minus(
            find(r, "rpc_overhead_p50", "ours-serve", "one at a time"),
            find(r, "pipe_echo_rtt_p50", "cat", "one at a time"),
        ),
        "us",
        "< 100",
        &|x| x < 100.0,
    );
    push(
        "JSON-RPC sign overhead beyond C_Sign, p50, unpinned (as measured)",
        find(r, "rpc_overhead_p50", "ours-serve", "one at a time").map(|x| x.median),
        "us",
        "< 100",
        &|x| x < 100.0,
    );
    for (what, bench, ours, theirs, goal, most) in [
        (
            "TPM sign p50, ours / tpm2-pkcs11",
            "sign_latency_p50",
            "",
            "",
            "<= 1",
            1.0,
        ),
        (
            "TPM cold start to one signature, ours (persistent SRK) / tpm2-pkcs11",
            "cold_start_sign",
            "1 key, persistent SRK",
            "1 key",
            "<= 0.5",
            0.5,
        ),
    ] {
        push(
            what,
            ratio(
                find(r, bench, "ours-tpm", ours),
                find(r, bench, "tpm2-pkcs11", theirs),
            ),
            "x",
            goal,
            &|x| x <= most,
        );
    }
    push(
        "TPM: TPM2_Sign commands per C_Sign (length query + sign)",
        find(
            r,
            "tpm_signatures_per_c_sign",
            "ours-tpm",
            "with length query",
        )
        .map(|x| x.median),
        "x",
        "1 (2 if the length query signed)",
        &|x| x <= 1.0,
    );
    out
}

fn status(v: &Verdict) -> &'static str {
    match v.met {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "not measured",
    }
}

/// Merges the records of one measurement taken by several invocations (bench.sh interleaves
/// the runs of the subjects it compares, one run per invocation): their runs are pooled and the
/// median, min and max recomputed. Order: first appearance.
fn merge(records: Vec<Record>) -> Vec<Record> {
    let mut out: Vec<Record> = Vec::new();
    for r in records {
        match out
            .iter_mut()
            .find(|o| o.bench == r.bench && o.subject == r.subject && o.variant == r.variant)
        {
            Some(o) => {
                let mut values = std::mem::take(&mut o.values);
                values.extend(r.values);
                let detail = std::mem::take(&mut o.detail);
                *o = Record::new(&o.bench, &o.subject, &o.variant, &o.unit, values)
                    .with_detail(detail);
            }
            None => out.push(r),
        }
    }
    out
}

/// `report`: prints the table and the targets (Markdown with `markdown`), or with `json` the
/// merged measurements as JSON lines.
pub fn print(file: &Path, markdown: bool, json: bool) -> Result<()> {
    let text = std::fs::read_to_string(file)?;
    let mut records = Vec::new();
    for line in text.lines().filter(|l| l.starts_with('{')) {
        records.push(
            serde_json::from_str::<Record>(line)
                .map_err(|e| BenchError::Other(format!("{}: {e}", file.display())))?,
        );
    }
    let records = merge(records);
    if json {
        for r in &records {
            println!(
                "{}",
                serde_json::to_string(r).map_err(|e| BenchError::Other(e.to_string()))?
            );
        }
        return Ok(());
    }
    let v = verdicts(&records);
    if markdown {
        println!("| Measurement | Subject | Variant | Median | Min | Max | Unit |");
        println!("|---|---|---|---:|---:|---:|---|");
        for r in &records {
            println!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                r.bench,
                r.subject,
                r.variant,
                fmt_num(r.median),
                fmt_num(r.min),
                fmt_num(r.max),
                r.unit
            );
        }
        println!();
        println!("| Target | Value | Goal | Status |");
        println!("|---|---:|---|---|");
        for t in &v {
            let value = t
                .value
                .map_or("-".to_string(), |x| format!("{} {}", fmt_num(x), t.unit));
            println!("| {} | {} | {} | {} |", t.what, value, t.goal, status(t));
        }
    } else {
        println!(
            "{:<25} {:<17} {:<21} {:>9} {:>9} {:>9}  unit",
            "measurement", "subject", "variant", "median", "min", "max"
        );
        for r in &records {
            println!(
                "{:<25} {:<17} {:<21} {:>9} {:>9} {:>9}  {}",
                r.bench,
                r.subject,
                r.variant,
                fmt_num(r.median),
                fmt_num(r.min),
                fmt_num(r.max),
                r.unit
            );
        }
        println!();
        println!("{:<75} {:>10}  {:<34} status", "target", "value", "goal");
        for t in &v {
            let value = t
                .value
                .map_or("-".to_string(), |x| format!("{} {}", fmt_num(x), t.unit));
            println!("{:<75} {:>10}  {:<34} {}", t.what, value, t.goal, status(t));
        }
    }
    Ok(())
}
