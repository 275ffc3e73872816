//! Logging to stderr or a file, never to stdout, never a PIN or key material.
//!
//! `DEVICEKEY_LOG` sets the level (`error`, `warn`, `info`, `debug`, `trace`, `off`; default
//! `warn`), `DEVICEKEY_LOG_FILE` sends the lines to a file (appended) instead of stderr.
//!
//! The log file is opened with `O_NOFOLLOW | O_CLOEXEC | O_APPEND` and created 0600; a path that
//! is a symlink, not a regular file, not owned by this user, or writable by others is
//! refused, and the lines go to stderr after one line that says why.

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

/// Opens the log file, or says why it is refused.
fn open_log_file(path: &std::path::Path) -> Result<std::fs::File, String> {
    use rustix::fs::{FileType, Mode, OFlags, CWD};
    let fd = rustix::fs::openat(
        CWD,
        path,
        OFlags::WRONLY
            | OFlags::CREATE
            | OFlags::APPEND
            | OFlags::NOFOLLOW
            | OFlags::CLOEXEC
            | OFlags::NONBLOCK,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| match e {
        rustix::io::Errno::LOOP => "it is a symlink".to_string(),
        e => std::io::Error::from(e).to_string(),
    })?;
    let st = rustix::fs::fstat(&fd).map_err(|e| std::io::Error::from(e).to_string())?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err("it is not a regular file".into());
    }
    let me = rustix::process::geteuid().as_raw();
    if st.st_uid != me {
        return Err(format!(
            "it is owned by uid {}, not by this user (uid {me})",
            st.st_uid
        ));
    }
    #[allow(clippy::unnecessary_cast)] // st_mode is a u16 on macOS
    let mode = st.st_mode as u32 & 0o7777;
    if mode & 0o022 != 0 {
        return Err(format!(
            "other users can write to it (mode {mode:04o}); `chmod 600` it"
        ));
    }
    Ok(std::fs::File::from(fd))
}

/// Installs the logger once per process; later calls do nothing.
pub fn init() {
    let mut refused = None;
    let logger = LOGGER.get_or_init(|| {
        let level = std::env::var("DEVICEKEY_LOG")
            .ok()
            .and_then(|l| l.parse().ok())
            .unwrap_or(LevelFilter::Warn);
        let file = std::env::var_os("DEVICEKEY_LOG_FILE")
            .filter(|p| !p.is_empty())
            .and_then(|p| {
                let path = std::path::PathBuf::from(p);
                open_log_file(&path)
                    .map_err(|why| refused = Some(format!("{}: {why}", path.display())))
                    .ok()
            })
            .map(Mutex::new);
        Logger { level, file }
    });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(logger.level);
        if let Some(why) = refused {
            log::error!("DEVICEKEY_LOG_FILE refused, logging to stderr: {why}");
        }
    }
}
