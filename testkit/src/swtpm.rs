//! A throwaway swtpm (TPM 2.0 simulator) for tests: started on a free loopback port with its own
//! state directory, stopped by its pid when dropped (also when a test panics).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// One swtpm process, killed by pid on drop.
pub struct Swtpm {
    /// The state directory (keep it to restart the same TPM).
    pub state: PathBuf,
    /// The server port (the control port is `port + 1`).
    pub port: u16,
    /// The swtpm pid (0 once stopped).
    pub pid: u32,
}

fn port_pair_free(port: u16) -> bool {
    let a = TcpListener::bind(("127.0.0.1", port));
    let b = TcpListener::bind(("127.0.0.1", port.wrapping_add(1)));
    a.is_ok() && b.is_ok()
}

/// A port to try for swtpm's pair: a random one below the kernel's ephemeral range, where no
/// outgoing connection takes the port next to it (on a busy machine thousands of sockets in
/// TIME_WAIT fill the ephemeral range); an ephemeral one when that range starts too low.
fn candidate_port() -> u16 {
    use std::hash::BuildHasher;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const LOW: u16 = 10000;
    if ephemeral_low > LOW + 1000 {
        let span = u64::from(ephemeral_low - 2 - LOW);
        let random =
            std::collections::hash_map::RandomState::new().hash_one(std::time::Instant::now());
        return LOW + (random % span) as u16;
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// True when swtpm can be run.
pub fn available() -> bool {
    Command::new("swtpm")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// True when swtpm can be run; else says on stderr that the test is skipped (the caller
/// returns), or panics when `DEVICEKEY_TEST_REQUIRE` names swtpm.
pub fn have_swtpm() -> bool {
    crate::require::available_or_skip(
        "swtpm",
        available(),
        "swtpm is not installed (scripts/setup.sh installs swtpm and swtpm-tools)",
    )
}

/// True when swtpm and every one of `tools` (swtpm_setup, tpm2-tools, openssl...) can be run;
/// else skips, or panics naming what is missing when `DEVICEKEY_TEST_REQUIRE` names swtpm.
/// A tool counts as present when it runs at all (swtpm_setup --version exits 1).
pub fn have_swtpm_and(tools: &[&str]) -> bool {
    let missing: Vec<&str> = std::iter::once("swtpm")
        .chain(tools.iter().copied())
        .filter(|t| Command::new(t).arg("--version").output().is_err())
        .collect();
    crate::require::available_or_skip(
        "swtpm",
        missing.is_empty(),
        &format!("{missing:?} not installed (scripts/setup.sh installs swtpm, swtpm-tools and tpm2-tools)"),
    )
}

/// Manufactures a TPM in `state` with EK certificates (`swtpm_setup --create-ek-cert`: RSA 2048
/// at NV 0x01c00002, EK persisted at 0x81010001, and a P-384 one), issued by swtpm's local CA.
/// Start it afterwards with [`Swtpm::start`]. Panics when swtpm_setup fails.
pub fn provision_with_ek_certificates(state: &Path) {
    std::fs::create_dir_all(state).expect("swtpm state dir");
    let out = Command::new("swtpm_setup")
        .args(["--tpm2", "--create-ek-cert", "--overwrite", "--tpmstate"])
        .arg(state)
        .output()
        .expect("cannot run swtpm_setup (package swtpm-tools)");
    assert!(
        out.status.success(),
        "swtpm_setup failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Swtpm {
    /// Starts swtpm with its state in `state` on a free port.
    pub fn start(state: &Path) -> Self {
        Self::start_with_log_level(state, None)
    }

    /// Starts swtpm like [`Swtpm::start`], logging every command and response it exchanges, in
    /// hex, to [`Swtpm::log_path`] (swtpm's log level 20): what a bus sniffer would see.
    pub fn start_recording_the_bus(state: &Path) -> Self {
        Self::start_with_log_level(state, Some(20))
    }

    /// swtpm's log file.
    pub fn log_path(&self) -> PathBuf {
        self.state.join("swtpm.log")
    }

    fn start_with_log_level(state: &Path, level: Option<u32>) -> Self {
        for _ in 0..500 {
            let port = candidate_port();
            if port == u16::MAX || !port_pair_free(port) {
                continue;
            }
            if let Some(s) = Self::start_on_with(state, port, level) {
                return s;
            }
        }
        panic!("could not start swtpm (is it installed? scripts/setup.sh installs it)");
    }

    /// Starts swtpm on `port` (control port `port + 1`); `None` if it could not start there.
    pub fn start_on(state: &Path, port: u16) -> Option<Self> {
        Self::start_on_with(state, port, None)
    }

    fn start_on_with(state: &Path, port: u16, level: Option<u32>) -> Option<Self> {
        std::fs::create_dir_all(state).expect("swtpm state dir");
        let level = level.map(|l| format!(",level={l}")).unwrap_or_default();
        let pidfile = state.join("swtpm.pid");
        let _ = std::fs::remove_file(&pidfile);
        let status = Command::new("swtpm")
            .arg("socket")
            .arg("--tpm2")
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
            .arg("--flags")
            .arg("not-need-init,startup-clear")
            .arg("--tpmstate")
            .arg(format!("dir={}", state.display()))
            .arg("--pid")
            .arg(format!("file={}", pidfile.display()))
            .arg("--log")
            .arg(format!("file={}{level}", state.join("swtpm.log").display()))
            .arg("--daemon")
            .output()
            .expect("cannot run swtpm (is it installed? scripts/setup.sh installs it)");
        if !status.status.success() {
            let log = std::fs::read_to_string(state.join("swtpm.log")).unwrap_or_default();
            eprintln!(
                "swtpm on port {port} failed ({}): {}{log}",
                status.status,
                String::from_utf8_lossy(&status.stderr)
            );
            return None;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(pid) = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                return Some(Self {
                    state: state.to_owned(),
                    port,
                    pid,
                });
            }
            assert!(Instant::now() < deadline, "swtpm wrote no pid file");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The TCTI string that names this swtpm.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// Stops this swtpm (TERM, then KILL after 5 s), by pid only.
    pub fn stop(&mut self) {
        if self.pid == 0 {
            return;
        }
        let pid = self.pid.to_string();
        let _ = Command::new("kill").arg(&pid).status();
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        let deadline = Instant::now() + Duration::from_secs(5);
        while proc_dir.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if proc_dir.exists() {
            let _ = Command::new("kill").args(["-9", &pid]).status();
        }
        self.pid = 0;
    }

    /// Stops this swtpm and starts a new one on the same state directory (same port if it is
    /// free again, else another one: check [`Swtpm::tcti`]).
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(2);
        let port = self.port;
        let state = self.state.clone();
        while Instant::now() < deadline {
            if port_pair_free(port) {
                if let Some(s) = Self::start_on(&state, port) {
                    *self = s;
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        *self = Self::start(&state);
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.stop();
    }
}
