//! `devicekey-bench`: the benchmark harness behind `scripts/bench.sh`.
//!
//! It loads any PKCS#11 module by path through `cryptoki`, so the same code measures our module
//! and its peers (SoftHSM, tpm2-pkcs11). Each subcommand measures one thing and prints one JSON
//! line per measurement on stdout (a readable line on stderr); `report` turns the JSON lines into
//! a table and the targets. Every figure is the median of several runs, with min and max.
//! Signatures are checked (a sample of every run) with the `p256` crate, so a module that
//! returns garbage cannot look fast. Not part of CI.

mod cold;
mod p11;
mod report;
mod rpc;
mod runner;
mod scale;
mod sign;
mod stats;
#[cfg(all(feature = "tpm", target_os = "linux"))]
mod tpm;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Errors of the harness.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A PKCS#11 call failed.
    #[error("{0}: {1}")]
    Pkcs11(&'static str, cryptoki::error::Error),
    /// A module returned something wrong (a bad signature, a missing object...).
    #[error("invalid result: {0}")]
    Invalid(String),
    /// I/O (files, child processes, pipes).
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

/// The harness's result type.
pub type Result<T> = std::result::Result<T, BenchError>;

/// Names the PKCS#11 call of a `cryptoki` error.
pub trait Ctx<T> {
    /// Maps the error to [`BenchError::Pkcs11`] with `what`.
    fn ctx(self, what: &'static str) -> Result<T>;
}

impl<T> Ctx<T> for std::result::Result<T, cryptoki::error::Error> {
    fn ctx(self, what: &'static str) -> Result<T> {
        self.map_err(|e| BenchError::Pkcs11(what, e))
    }
}

#[derive(Parser)]
#[command(
    name = "devicekey-bench",
    about = "Benchmarks PKCS#11 modules side by side"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Makes a persistent P-256 key pair with this label unless the token has one.
    Keygen {
        #[command(flatten)]
        target: p11::Target,
        /// The key's label.
        #[arg(long)]
        label: String,
    },
    /// C_Sign throughput (per thread count) and latency, CKA_EC_POINT latency.
    Sign {
        #[command(flatten)]
        target: p11::Target,
        /// The key's label.
        #[arg(long)]
        label: String,
        #[command(flatten)]
        plan: sign::Plan,
    },
    /// The signing primitive in-process, without PKCS#11.
    Raw {
        #[command(flatten)]
        plan: sign::Plan,
    },
    /// Cold start in fresh processes.
    Cold {
        #[command(flatten)]
        target: p11::Target,
        /// The label to find.
        #[arg(long)]
        label: String,
        #[command(flatten)]
        plan: cold::ColdPlan,
    },
    /// One cold start (run by `cold` in a child process).
    #[command(hide = true)]
    ColdChild {
        #[command(flatten)]
        target: p11::Target,
        #[arg(long)]
        label: String,
        #[arg(long)]
        sign: bool,
    },
    /// Makes key stores of N keys under a directory (reused when present).
    ScalePrepare {
        /// The directory that holds `keys-<N>` stores.
        #[arg(long)]
        dir: PathBuf,
        /// Store sizes.
        #[arg(long, value_delimiter = ',', default_value = "10,1000,10000,100000")]
        counts: Vec<usize>,
        /// Where to generate keys before copying them (a RAM disk saves the fsyncs).
        #[arg(long)]
        staging: Option<PathBuf>,
        /// TPM stores on the TPM of the config's TPM slot instead of software stores.
        #[cfg(all(feature = "tpm", target_os = "linux"))]
        #[arg(long)]
        tpm: bool,
    },
    /// FindObjects latency by CKA_ID and by label for bench key `index`.
    Find {
        #[command(flatten)]
        target: p11::Target,
        /// The bench key to look for.
        #[arg(long, default_value_t = 7)]
        index: usize,
        /// The variant shown in the output (e.g. "10000 keys").
        #[arg(long)]
        variant: String,
        #[command(flatten)]
        plan: sign::Plan,
    },
    /// `devicekey serve` sign requests over stdio.
    Rpc {
        #[command(flatten)]
        rpc: rpc::RpcPlan,
        /// Calls per latency run of the in-process baseline.
        #[arg(long, default_value_t = 2000)]
        iterations: usize,
    },
    /// One TPM signature through our TPM key store in-process (no PKCS#11), to compare with a
    /// C_Sign through the module: a length query that signed would double the module's time.
    #[cfg(all(feature = "tpm", target_os = "linux"))]
    TpmRaw {
        /// The key's label.
        #[arg(long)]
        label: String,
        #[command(flatten)]
        plan: sign::Plan,
    },
    /// Prints the table and the targets from a file of JSON lines.
    Report {
        /// The JSON lines.
        file: PathBuf,
        /// Markdown instead of plain text.
        #[arg(long)]
        markdown: bool,
        /// The merged measurements as JSON lines instead of the table.
        #[arg(long, conflicts_with = "markdown")]
        json: bool,
    },
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Keygen { target, label } => {
            let m = p11::Module::open(&target)?;
            let id = p11::ensure_key(&m, &label)?;
            eprintln!(
                "  {}: key {label:?} ready (CKA_ID {})",
                target.name,
                id.iter().map(|b| format!("{b:02x}")).collect::<String>()
            );
            Ok(())
        }
        Cmd::Sign {
            target,
            label,
            plan,
        } => sign::module(&target, &label, &plan),
        Cmd::Raw { plan } => sign::raw(&plan),
        Cmd::Cold {
            target,
            label,
            plan,
        } => cold::parent(&target, &label, &plan),
        Cmd::ColdChild {
            target,
            label,
            sign,
        } => cold::child(&target, &label, sign),
        #[cfg(all(feature = "tpm", target_os = "linux"))]
        Cmd::ScalePrepare {
            dir,
            counts,
            staging,
            tpm: true,
        } => tpm::prepare(&dir, &counts, staging.as_deref()),
        Cmd::ScalePrepare {
            dir,
            counts,
            staging,
            ..
        } => scale::prepare(
            &dir,
            &counts,
            staging.as_deref(),
            "ours",
            &scale::open_software,
        ),
        Cmd::Find {
            target,
            index,
            variant,
            plan,
        } => scale::find(&target, index, &variant, &plan),
        Cmd::Rpc { rpc, iterations } => {
            let plan = sign::Plan {
                runs: rpc.runs,
                seconds: 1.0,
                iterations,
                threads: vec![1],
                warmup: 200,
            };
            rpc::run(&rpc, &plan)
        }
        #[cfg(all(feature = "tpm", target_os = "linux"))]
        Cmd::TpmRaw { label, plan } => tpm::raw(&label, &plan),
        Cmd::Report {
            file,
            markdown,
            json,
        } => report::print(&file, markdown, json),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("devicekey-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
