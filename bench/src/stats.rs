//! Figures: percentiles of samples, the median/min/max of several runs, and the JSON line that
//! records one measurement.

use serde::{Deserialize, Serialize};

/// The value at quantile `q` (0..=1) of `samples` (nearest rank); 0 when empty.
pub fn percentile(samples: &mut [f64], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_by(f64::total_cmp);
    let rank = (q * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

/// The median of `values` (mean of the middle two for an even count); 0 when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// One measurement: a figure taken in several runs, reported as the median with min and max.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// What is measured (`sign_throughput`, `sign_latency_p50`, `cold_start`, ...).
    pub bench: String,
    /// Who is measured (`ours`, `softhsm`, `openssl-raw`, `ours-over-softhsm`, ...).
    pub subject: String,
    /// The variant (`1 thread`, `10000 keys`, `pipelined`, ...).
    pub variant: String,
    /// The unit of the figures.
    pub unit: String,
    /// The median of the runs.
    pub median: f64,
    /// The smallest run.
    pub min: f64,
    /// The largest run.
    pub max: f64,
    /// The value of every run, in order.
    pub values: Vec<f64>,
    /// Free-form details (samples per run, signatures verified, ...).
    #[serde(default)]
    pub detail: serde_json::Value,
}

impl Record {
    /// A record of `values` (one per run).
    pub fn new(bench: &str, subject: &str, variant: &str, unit: &str, values: Vec<f64>) -> Self {
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Record {
            bench: bench.into(),
            subject: subject.into(),
            variant: variant.into(),
            unit: unit.into(),
            median: median(&values),
            min: if values.is_empty() { 0.0 } else { min },
            max: if values.is_empty() { 0.0 } else { max },
            values,
            detail: serde_json::Value::Null,
        }
    }

    /// Adds details.
    pub fn with_detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = detail;
        self
    }

    /// Prints the JSON line on stdout and a readable line on stderr.
    pub fn emit(&self) {
        eprintln!(
            "  {:<24} {:<18} {:<20} {:>10} {:<5} (min {}, max {})",
            self.bench,
            self.subject,
            self.variant,
            fmt_num(self.median),
            self.unit,
            fmt_num(self.min),
            fmt_num(self.max)
        );
        match serde_json::to_string(self) {
            Ok(line) => println!("{line}"),
            Err(e) => eprintln!("cannot encode a record: {e}"),
        }
    }
}

/// A figure with sensible precision.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_medians() {
        let mut s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut s, 0.5), 50.0);
        assert_eq!(percentile(&mut s, 0.99), 99.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let r = Record::new("b", "s", "v", "u", vec![2.0, 1.0, 3.0]);
        assert_eq!((r.median, r.min, r.max), (2.0, 1.0, 3.0));
    }
}
