//! Logging to stderr or a file, never to stdout, never a PIN or key material.
//!
//! `DEVICEKEY_LOG` sets the level (`error`, `warn`, `info`, `debug`, `trace`, `off`; default
//! `warn`), `DEVICEKEY_LOG_FILE` sends the lines to a file (appended) instead of stderr.

use std::io::Write;
use std::sync::{Mutex, OnceLock};

use log::{LevelFilter, Log, Metadata, Record};

struct Logger {
    level: LevelFilter,
    file: Option<Mutex<std::fs::File>>,
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        // Only our own lines: the crates we use (cryptoki, tss-esapi) log their own view of
        // things we already report, at levels meant for their own users.
        metadata.level() <= self.level && metadata.target().starts_with("devicekey")
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = format!(
            "devicekey[{}] {}: {}\n",
            std::process::id(),
            record.level(),
            record.args()
        );
        match &self.file {
            Some(file) => {
                if let Ok(mut f) = file.lock() {
                    let _ = f.write_all(line.as_bytes());
                }
            }
            None => {
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
        }
    }

    fn flush(&self) {}
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// Installs the logger once per process; later calls do nothing.
pub fn init() {
    let logger = LOGGER.get_or_init(|| {
        let level = std::env::var("DEVICEKEY_LOG")
            .ok()
            .and_then(|l| l.parse().ok())
            .unwrap_or(LevelFilter::Warn);
        let file = std::env::var_os("DEVICEKEY_LOG_FILE")
            .filter(|p| !p.is_empty())
            .and_then(|p| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .ok()
            })
            .map(Mutex::new);
        Logger { level, file }
    });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(logger.level);
    }
}
