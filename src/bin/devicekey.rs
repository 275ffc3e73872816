//! `devicekey`: the command line of the device key.
//!
//! Each subcommand is a variant of [`Command`] with its own `Args` struct and `run` method; to add
//! one, add the variant, the struct and one match arm in [`Command::run`].
//!
//! Exit codes: 0 success, 1 platform or token failure, 2 usage error, 3 key not found,
//! 4 request refused (invalid payload, policy not satisfiable, binding mismatch).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use clap::{Args, Parser, Subcommand, ValueEnum};

use devicekey_pkcs11::backend::KeyPurpose;
use devicekey_pkcs11::config::Config;
use devicekey_pkcs11::proof::SignPayload;
use devicekey_pkcs11::rpc::types::{Binding, KeyInfo, ProtectionPolicy, SignParams};
use devicekey_pkcs11::rpc::{DeviceKeyError, TokenClient};

/// Writes one line to stdout; a closed pipe (`devicekey list | head`) ends output quietly.
fn emit(line: std::fmt::Arguments<'_>) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{line}") {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(CliError::Input(format!("cannot write to stdout: {e}"))),
    }
}

/// `println!` that returns a [`CliError`] instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {
        emit(format_args!($($arg)*))?
    };
}

#[derive(Parser, Debug)]
#[command(
    name = "devicekey",
    version,
    about = "One device-bound ECDSA P-256 key: PKCS#11 module and device-key JSON-RPC server",
    after_help = "Exit codes: 0 success, 1 platform or token failure, 2 usage error, 3 key not found, 4 request refused.\nConfig: $DEVICEKEY_CONFIG, else $XDG_CONFIG_HOME/devicekey/config.toml, else /etc/devicekey/config.toml.\nLogs: DEVICEKEY_LOG=level, DEVICEKEY_LOG_FILE=path (never stdout)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the device-key JSON-RPC protocol on stdin/stdout (newline-delimited JSON).
    Serve(ServeArgs),
    /// Create a device key bound to an account and a client.
    Create(CreateArgs),
    /// Show the public key of a device key.
    Public(PublicArgs),
    /// Sign a device-key payload (JSON from a file or stdin).
    Sign(SignArgs),
    /// List the keys on every token the server uses.
    List(ListArgs),
    /// Delete a device key and its binding.
    Delete(DeleteArgs),
    /// Print the pkcs11: URIs of keys and their certificates.
    Uri(devicekey_pkcs11::cli::UriArgs),
    /// Make a self-signed certificate (stored on the token) or a CSR for a key, signed by the token.
    Cert(devicekey_pkcs11::cli::CertArgs),
    /// Check the config and every slot: backend, protection class, reachable or not, and the fix.
    Doctor(devicekey_pkcs11::cli::doctor::DoctorArgs),
    /// Key attestation: print the evidence that a key lives in a TPM, answer a challenge, or
    /// verify evidence (the relying party's reference verifier).
    Attest(AttestArgs),
    /// The user PIN of a slot with `login = "pin"`: `set`, `change`, `status` (`--slot LABEL`).
    Pin(devicekey_pkcs11::cli::pin::PinArgs),
    /// TPM housekeeping: `persist-srk --slot LABEL` makes the storage root key persistent.
    #[cfg(all(target_os = "linux", feature = "tpm"))]
    Tpm(devicekey_pkcs11::cli::tpm::TpmArgs),
}

impl Command {
    fn run(self) -> Result<(), CliError> {
        match self {
            Self::Serve(a) => a.run(),
            Self::Create(a) => a.run(),
            Self::Public(a) => a.run(),
            Self::Sign(a) => a.run(),
            Self::List(a) => a.run(),
            Self::Delete(a) => a.run(),
            Self::Uri(a) => emit(format_args!("{}", a.run().map_err(DeviceKeyError::from)?)),
            Self::Cert(a) => emit(format_args!("{}", a.run().map_err(DeviceKeyError::from)?)),
            Self::Attest(a) => a.run(),
            Self::Pin(a) => {
                let config = Config::load()?;
                let text = a.run(&config).map_err(tool_error)?;
                emit(format_args!("{text}"))
            }
            #[cfg(all(target_os = "linux", feature = "tpm"))]
            Self::Tpm(a) => {
                let config = Config::load()?;
                let text = a.run(&config).map_err(tool_error)?;
                emit(format_args!("{text}"))
            }
            Self::Doctor(a) => {
                let report = a.run();
                emit(format_args!("{report}"))?;
                match report.problem_summary() {
                    None => Ok(()),
                    Some(p) => Err(DeviceKeyError::Platform(p).into()),
                }
            }
        }
    }
}

/// A key tool's error as the exit code wants it: a usage error is 2.
fn tool_error(e: devicekey_pkcs11::cli::ToolError) -> CliError {
    match e {
        devicekey_pkcs11::cli::ToolError::Usage(m) => CliError::Input(m),
        other => DeviceKeyError::from(other).into(),
    }
}

/// Why a command failed; decides the exit code.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("{0}")]
    Key(#[from] DeviceKeyError),
    #[error("{0}")]
    Config(#[from] devicekey_pkcs11::config::ConfigError),
    #[error("{0}")]
    Input(String),
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            Self::Key(DeviceKeyError::KeyNotFound) => 3,
            Self::Key(DeviceKeyError::Platform(_) | DeviceKeyError::Crypto(_)) => 1,
            Self::Key(_) => 4,
            Self::Config(_) => 1,
            Self::Input(_) => 2,
        }
    }
}

fn client() -> Result<TokenClient, CliError> {
    let config = Config::load()?;
    Ok(TokenClient::new(&config.server)?)
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::Input(format!("cannot encode the output: {e}")))?;
    out!("{text}");
    Ok(())
}

fn print_key_info(info: &KeyInfo) -> Result<(), CliError> {
    out!("key id:           {}", info.key_id);
    out!("protection class: {}", info.protection_class.as_str());
    out!("algorithm:        ecdsa_p256_sha256");
    out!("public key (SPKI DER, base64):");
    out!("  {}", info.public_key_spki_der_base64);
    Ok(())
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
struct AttestArgs {
    #[command(subcommand)]
    command: Option<AttestCommand>,
    #[command(flatten)]
    show: AttestShowArgs,
}

#[derive(Subcommand, Debug)]
enum AttestCommand {
    /// Print the evidence JSON for a key (the default).
    Show(AttestShowArgs),
    /// Answer a credential challenge: reads {"credentialBlobBase64", "encryptedSecretBase64"}
    /// on stdin, prints {"secretBase64"}.
    Activate(AttestActivateArgs),
    /// Verify attestation evidence: the six checks, each printed; exit 0 only when all pass.
    #[cfg(all(target_os = "linux", feature = "tpm"))]
    Verify(devicekey_pkcs11::cli::attest_verify::VerifyArgs),
}

#[derive(Args, Debug)]
struct AttestShowArgs {
    /// The key id.
    #[arg(long)]
    key_id: Option<String>,
    /// The relying party's nonce: unpadded base64url of 16 to 64 bytes (it may start with `-`,
    /// a base64url character).
    #[arg(long, allow_hyphen_values = true)]
    nonce: Option<String>,
}

#[derive(Args, Debug)]
struct AttestActivateArgs {
    /// The key id (its TPM store's attestation key answers).
    #[arg(long)]
    key_id: String,
}

impl AttestArgs {
    fn run(self) -> Result<(), CliError> {
        let command = self.command.unwrap_or(AttestCommand::Show(self.show));
        #[cfg(all(target_os = "linux", feature = "tpm"))]
        let command = match command {
            AttestCommand::Verify(a) => return verify_attestation(a),
            other => other,
        };
        let config = Config::load()?;
        let answer = match command {
            AttestCommand::Show(a) => {
                let (Some(key_id), Some(nonce)) = (a.key_id, a.nonce) else {
                    return Err(CliError::Input(
                        "devicekey attest needs --key-id and --nonce".into(),
                    ));
                };
                devicekey_pkcs11::cli::attest_device::show(&config, &key_id, &nonce)?
            }
            AttestCommand::Activate(a) => {
                let mut challenge = Vec::new();
                std::io::stdin()
                    .take(1 << 20)
                    .read_to_end(&mut challenge)
                    .map_err(|e| CliError::Input(format!("cannot read stdin: {e}")))?;
                devicekey_pkcs11::cli::attest_device::activate(&config, &a.key_id, &challenge)?
            }
            #[cfg(all(target_os = "linux", feature = "tpm"))]
            AttestCommand::Verify(_) => unreachable!("handled above"),
        };
        print_json(&answer)
    }
}

/// `devicekey attest verify`: needs no module and no TPM.
#[cfg(all(target_os = "linux", feature = "tpm"))]
fn verify_attestation(
    args: devicekey_pkcs11::cli::attest_verify::VerifyArgs,
) -> Result<(), CliError> {
    let output = args.run().map_err(|e| match e {
        devicekey_pkcs11::cli::ToolError::Usage(m) => CliError::Input(m),
        other => DeviceKeyError::from(other).into(),
    })?;
    emit(format_args!("{}", output.text))?;
    match output.failure {
        None => Ok(()),
        Some(e) => Err(DeviceKeyError::Crypto(format!("attestation not verified: {e}")).into()),
    }
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Listen on this Unix socket instead of stdin/stdout (Linux). Its directory must be yours
    /// and closed to others (0700; created so if missing); only your uid may connect.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Socket mode: connections served at once.
    #[arg(long, default_value_t = 16, requires = "socket")]
    max_connections: usize,
    /// Socket mode: close a connection that sends no complete line for this many milliseconds.
    #[arg(long, default_value_t = 30_000, requires = "socket")]
    idle_timeout_ms: u64,
}

impl ServeArgs {
    fn run(self) -> Result<(), CliError> {
        let config = Config::load()?;
        match self.socket {
            None => devicekey_pkcs11::rpc::serve_stdio(&config)?,
            Some(path) => serve_socket(&config, path, self.max_connections, self.idle_timeout_ms)?,
        }
        Ok(())
    }
}

#[cfg(target_os = "linux")]
fn serve_socket(
    config: &Config,
    path: PathBuf,
    max_connections: usize,
    idle_timeout_ms: u64,
) -> Result<(), CliError> {
    use devicekey_pkcs11::rpc::socket::{serve_socket, SocketOptions};
    let options = SocketOptions {
        path,
        max_connections: max_connections.max(1),
        idle_timeout: std::time::Duration::from_millis(idle_timeout_ms.max(1)),
    };
    Ok(serve_socket(config, &options)?)
}

#[cfg(not(target_os = "linux"))]
fn serve_socket(_: &Config, _: PathBuf, _: usize, _: u64) -> Result<(), CliError> {
    Err(CliError::Input(
        "socket mode is only available on Linux in this build".into(),
    ))
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PolicyArg {
    /// Only a TPM or Secure Enclave key.
    HardwareOnly,
    /// Also an OS-protected, non-extractable software key.
    AllowOsProtectedNonextractable,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PurposeArg {
    /// Signs only device-key proofs (the default; what the server creates).
    Proof,
    /// Signs anything (SSH, TLS, code signing); has no binding.
    General,
}

#[derive(Args, Debug)]
struct CreateArgs {
    /// The account the key is bound to (required for proof keys).
    #[arg(long)]
    account_user_id: Option<String>,
    /// The client the key is bound to (required for proof keys).
    #[arg(long)]
    client_id: Option<String>,
    /// Which protection classes are acceptable.
    #[arg(long, value_enum, default_value = "hardware-only")]
    policy: PolicyArg,
    /// What the key may sign.
    #[arg(long, value_enum, default_value = "proof")]
    purpose: PurposeArg,
    /// CKA_LABEL of a general key (default: the key id).
    #[arg(long)]
    label: Option<String>,
    /// Print the protocol's JSON result.
    #[arg(long)]
    json: bool,
}

impl CreateArgs {
    fn run(self) -> Result<(), CliError> {
        let policy = match self.policy {
            PolicyArg::HardwareOnly => ProtectionPolicy::HardwareOnly,
            PolicyArg::AllowOsProtectedNonextractable => {
                ProtectionPolicy::AllowOsProtectedNonextractable
            }
        };
        let info = match self.purpose {
            PurposeArg::Proof => {
                if self.label.is_some() {
                    return Err(CliError::Input(
                        "--label is only for --purpose general (a proof key's label is its id)"
                            .into(),
                    ));
                }
                let (Some(account_user_id), Some(client_id)) =
                    (self.account_user_id, self.client_id)
                else {
                    return Err(CliError::Input(
                        "a proof key needs --account-user-id and --client-id".into(),
                    ));
                };
                let binding = Binding {
                    account_user_id,
                    client_id,
                };
                client()?.create_key(policy, Some(&binding), KeyPurpose::Proof, None)?
            }
            PurposeArg::General => {
                client()?.create_key(policy, None, KeyPurpose::General, self.label.as_deref())?
            }
        };
        if self.json {
            print_json(&info)
        } else {
            print_key_info(&info)
        }
    }
}

#[derive(Args, Debug)]
struct PublicArgs {
    /// The key id (dk_tpm_..., dk_hse_..., dk_osn_...).
    key_id: String,
    /// Print the protocol's JSON result.
    #[arg(long, conflicts_with = "pem")]
    json: bool,
    /// Print the public key as PEM.
    #[arg(long)]
    pem: bool,
}

impl PublicArgs {
    fn run(self) -> Result<(), CliError> {
        let info = client()?.public_key(&self.key_id)?;
        if self.json {
            return print_json(&info);
        }
        if self.pem {
            let der = STANDARD
                .decode(&info.public_key_spki_der_base64)
                .map_err(|e| CliError::Input(e.to_string()))?;
            let body = STANDARD.encode(der);
            out!("-----BEGIN PUBLIC KEY-----");
            for chunk in body.as_bytes().chunks(64) {
                out!("{}", String::from_utf8_lossy(chunk));
            }
            out!("-----END PUBLIC KEY-----");
            return Ok(());
        }
        print_key_info(&info)
    }
}

#[derive(Args, Debug)]
struct SignArgs {
    /// The key id.
    key_id: String,
    /// The payload JSON (a DeviceKeySignPayload); `-` or absent reads stdin.
    #[arg(long)]
    payload: Option<PathBuf>,
    /// Print the protocol's JSON result.
    #[arg(long)]
    json: bool,
}

impl SignArgs {
    fn run(self) -> Result<(), CliError> {
        let text = match &self.payload {
            Some(path) if path.as_os_str() != "-" => std::fs::read(path)
                .map_err(|e| CliError::Input(format!("cannot read {}: {e}", path.display())))?,
            _ => {
                let mut buf = Vec::new();
                std::io::stdin()
                    .take(1 << 20)
                    .read_to_end(&mut buf)
                    .map_err(|e| CliError::Input(format!("cannot read stdin: {e}")))?;
                buf
            }
        };
        let payload: SignPayload = serde_json::from_slice(&text).map_err(|e| {
            CliError::Input(format!("the payload is not a device-key payload: {e}"))
        })?;
        let result = client()?.sign_payload(&SignParams {
            key_id: self.key_id,
            payload,
        })?;
        if self.json {
            return print_json(&result);
        }
        out!("algorithm:              ecdsa_p256_sha256");
        out!("signature (DER, base64): {}", result.signature_der_base64);
        out!("signed bytes (base64):   {}", result.signed_payload_base64);
        Ok(())
    }
}

#[derive(Args, Debug)]
struct ListArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl ListArgs {
    fn run(self) -> Result<(), CliError> {
        let keys = client()?.list()?;
        if self.json {
            return print_json(&keys);
        }
        if keys.is_empty() {
            out!("no keys");
            return Ok(());
        }
        for key in keys {
            let binding = match &key.binding {
                Some(b) => format!("bound to {} / {}", b.account_user_id, b.client_id),
                None => "no binding".to_string(),
            };
            out!(
                "{}  {}  token {:?}  {}",
                key.key_id,
                key.protection_class.as_str(),
                key.token,
                binding
            );
        }
        Ok(())
    }
}

#[derive(Args, Debug)]
struct DeleteArgs {
    /// The key id.
    key_id: String,
}

impl DeleteArgs {
    fn run(self) -> Result<(), CliError> {
        client()?.delete(&self.key_id)?;
        out!("deleted {}", self.key_id);
        Ok(())
    }
}

fn main() -> ExitCode {
    devicekey_pkcs11::logging::init();
    let cli = Cli::parse();
    match cli.command.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("devicekey: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
