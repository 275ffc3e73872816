//! The JSON-RPC loop: framing, handshake, dispatch onto worker threads, bounded concurrency.
//!
//! The reader thread parses each line, answers framing and handshake errors itself (so they keep
//! their order), and hands each `device/key/*` request to a thread of its own while fewer than
//! `max_concurrent_requests` are in flight; past that bound the request gets `-32001`. Responses
//! go through one writer thread, one line each. At end of input the loop waits for the requests
//! in flight, flushes, and returns.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};

use serde::Serialize;
use serde_json::Value;

use super::error::{
    DeviceKeyError, INTERNAL_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR,
    SERVER_OVERLOADED,
};
use super::framing::{Frame, LineReader};
use super::types::{
    ClientInfo, CreateParams, InitializeParams, InitializeResult, KeyInfo, PublicParams,
    SignParams, SignResult,
};

/// `device/key/create`.
pub const METHOD_CREATE: &str = "device/key/create";
/// `device/key/public`.
pub const METHOD_PUBLIC: &str = "device/key/public";
/// `device/key/sign`.
pub const METHOD_SIGN: &str = "device/key/sign";

/// Answers queued for the writer at most. Past it the reader waits, so a client that does not
/// read its answers stops being read instead of growing the queue without bound.
const MAX_QUEUED_ANSWERS: usize = 256;

/// What the server does for each method; implemented over PKCS#11 by
/// [`super::client::TokenClient`].
pub trait KeyService: Send + Sync {
    /// `device/key/create`.
    fn create(&self, params: CreateParams) -> Result<KeyInfo, DeviceKeyError>;
    /// `device/key/public`.
    fn public(&self, params: PublicParams) -> Result<KeyInfo, DeviceKeyError>;
    /// `device/key/sign`.
    fn sign(&self, params: SignParams) -> Result<SignResult, DeviceKeyError>;
}

/// Limits of one server loop.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Requests handled at once; past it, `-32001`.
    pub max_concurrent_requests: usize,
    /// The longest request line, in bytes.
    pub max_line_bytes: usize,
    /// `codexHome` in the `initialize` result.
    pub home: String,
}

impl ServeOptions {
    /// The limits the `[server]` config names.
    pub fn from_config(config: &crate::config::ServerConfig) -> Self {
        Self {
            max_concurrent_requests: config.max_concurrent_requests,
            max_line_bytes: config.max_line_bytes,
            home: crate::config::default_data_dir().display().to_string(),
        }
    }
}

#[derive(Serialize)]
struct ErrorObject<'a> {
    code: i64,
    message: &'a str,
}

#[derive(Serialize)]
struct Response<'a> {
    id: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorObject<'a>>,
}

fn encode(response: &Response<'_>) -> Vec<u8> {
    let mut line = serde_json::to_vec(response).unwrap_or_else(|e| {
        format!(
            "{{\"id\":null,\"error\":{{\"code\":{INTERNAL_ERROR},\"message\":{}}}}}",
            Value::String(format!("Internal error: {e}"))
        )
        .into_bytes()
    });
    line.push(b'\n');
    line
}

fn error_line(id: &Value, code: i64, message: &str) -> Vec<u8> {
    encode(&Response {
        id,
        result: None,
        error: Some(ErrorObject { code, message }),
    })
}

fn result_line(id: &Value, result: Value) -> Vec<u8> {
    encode(&Response {
        id,
        result: Some(result),
        error: None,
    })
}

/// Counts requests in flight; `wait_idle` blocks until none are.
#[derive(Default)]
struct InFlight {
    count: Mutex<usize>,
    idle: Condvar,
}

struct Permit(Arc<InFlight>);

impl InFlight {
    fn try_acquire(self: &Arc<Self>, max: usize) -> Option<Permit> {
        let mut count = self.count.lock().unwrap_or_else(|e| e.into_inner());
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(Permit(Arc::clone(self)))
    }

    fn wait_idle(&self) {
        let mut count = self.count.lock().unwrap_or_else(|e| e.into_inner());
        while *count > 0 {
            count = self.idle.wait(count).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut count = self.0.count.lock().unwrap_or_else(|e| e.into_inner());
        *count = count.saturating_sub(1);
        self.0.idle.notify_all();
    }
}

/// Serves JSON-RPC from `input` to `output` until end of input; returns when every request in
/// flight is answered. An error is returned only when reading `input` fails.
pub fn serve<R, W>(
    input: R,
    output: W,
    service: Arc<dyn KeyService>,
    options: &ServeOptions,
) -> std::io::Result<()>
where
    R: Read,
    W: Write + Send + 'static,
{
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(MAX_QUEUED_ANSWERS);
    let broken = Arc::new(AtomicBool::new(false));
    let writer = std::thread::Builder::new()
        .name("devicekey-rpc-writer".into())
        .spawn({
            let broken = Arc::clone(&broken);
            move || write_loop(output, rx, &broken)
        })?;
    let in_flight = Arc::new(InFlight::default());
    let mut state = Session {
        initialized: false,
        options: options.clone(),
    };
    let mut reader = LineReader::new(input, options.max_line_bytes);
    let result = loop {
        if broken.load(Ordering::SeqCst) {
            // Nobody can receive answers any more: stop reading requests.
            break Ok(());
        }
        let frame = match reader.next_frame() {
            Ok(f) => f,
            Err(e) => break Err(e),
        };
        match frame {
            Frame::Eof => break Ok(()),
            Frame::TooLong => {
                log::warn!(
                    "request line longer than {} bytes skipped",
                    options.max_line_bytes
                );
                let _ = tx.send(error_line(
                    &Value::Null,
                    INVALID_REQUEST,
                    &format!(
                        "Invalid request: message exceeds the limit of {} bytes",
                        options.max_line_bytes
                    ),
                ));
            }
            Frame::Line(line) => {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                state.handle_line(&line, &tx, &service, &in_flight);
            }
        }
    };
    in_flight.wait_idle();
    drop(tx);
    if writer.join().is_err() {
        log::error!("the response writer panicked");
    }
    result
}

fn write_loop<W: Write>(mut output: W, rx: mpsc::Receiver<Vec<u8>>, broken: &AtomicBool) {
    for line in rx {
        if broken.load(Ordering::SeqCst) {
            // Keep draining, so no sender waits on a full queue.
            continue;
        }
        if let Err(e) = output.write_all(&line).and_then(|()| output.flush()) {
            log::warn!("cannot write a response: {e}; dropping further responses");
            broken.store(true, Ordering::SeqCst);
        }
    }
}

struct Session {
    initialized: bool,
    options: ServeOptions,
}

/// A valid request id: a string or an integer.
fn valid_id(id: &Value) -> bool {
    match id {
        Value::String(_) => true,
        Value::Number(n) => n.is_i64() || n.is_u64(),
        _ => false,
    }
}

impl Session {
    fn handle_line(
        &mut self,
        line: &[u8],
        tx: &mpsc::SyncSender<Vec<u8>>,
        service: &Arc<dyn KeyService>,
        in_flight: &Arc<InFlight>,
    ) {
        let send = |bytes: Vec<u8>| {
            let _ = tx.send(bytes);
        };
        let message: Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => {
                log::debug!("unparsable line: {e}");
                send(error_line(&Value::Null, PARSE_ERROR, "Parse error"));
                return;
            }
        };
        let Value::Object(mut object) = message else {
            send(error_line(
                &Value::Null,
                INVALID_REQUEST,
                "Invalid request: expected a JSON object",
            ));
            return;
        };
        let id = object.remove("id");
        let method = object.remove("method");
        let params = object.remove("params").unwrap_or(Value::Null);
        let id = match id {
            None => None,
            Some(id) if valid_id(&id) => Some(id),
            Some(_) => {
                send(error_line(
                    &Value::Null,
                    INVALID_REQUEST,
                    "Invalid request: id must be a string or an integer",
                ));
                return;
            }
        };
        let method = match method {
            Some(Value::String(m)) => m,
            Some(_) => {
                let id = id.unwrap_or(Value::Null);
                send(error_line(
                    &id,
                    INVALID_REQUEST,
                    "Invalid request: method must be a string",
                ));
                return;
            }
            None => {
                if id.is_some() && (object.contains_key("result") || object.contains_key("error")) {
                    // A response to a request we never sent: nothing to do.
                    log::debug!("ignoring a response message from the client");
                    return;
                }
                let id = id.unwrap_or(Value::Null);
                send(error_line(
                    &id,
                    INVALID_REQUEST,
                    "Invalid request: missing method",
                ));
                return;
            }
        };
        let Some(id) = id else {
            self.handle_notification(&method);
            return;
        };
        if method == "initialize" {
            send(self.initialize(&id, params));
            return;
        }
        if !self.initialized {
            send(error_line(&id, INVALID_REQUEST, "Not initialized"));
            return;
        }
        if ![METHOD_CREATE, METHOD_PUBLIC, METHOD_SIGN].contains(&method.as_str()) {
            send(error_line(
                &id,
                METHOD_NOT_FOUND,
                &format!("Method not found: {method}"),
            ));
            return;
        }
        let Some(permit) = in_flight.try_acquire(self.options.max_concurrent_requests) else {
            send(error_line(
                &id,
                SERVER_OVERLOADED,
                "Server overloaded; retry later",
            ));
            return;
        };
        let service = Arc::clone(service);
        let tx = tx.clone();
        let spawned = std::thread::Builder::new()
            .name("devicekey-rpc".into())
            .spawn({
                let id = id.clone();
                move || {
                    let line = run_method(&*service, &method, &id, params);
                    // Free the slot before answering, so a client that has its answer may send
                    // the next request without meeting -32001.
                    drop(permit);
                    let _ = tx.send(line);
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot start a request thread: {e}");
            send(error_line(
                &id,
                SERVER_OVERLOADED,
                "Server overloaded; retry later",
            ));
        }
    }

    fn handle_notification(&mut self, method: &str) {
        match method {
            "initialized" => {
                if !self.initialized {
                    log::warn!("`initialized` before `initialize`; ignored");
                }
            }
            other => log::debug!("ignoring notification {other}"),
        }
    }

    fn initialize(&mut self, id: &Value, params: Value) -> Vec<u8> {
        if self.initialized {
            return error_line(id, INVALID_REQUEST, "Already initialized");
        }
        let params: InitializeParams = match serde_json::from_value(params) {
            Ok(p) => p,
            Err(e) => return error_line(id, INVALID_REQUEST, &format!("Invalid request: {e}")),
        };
        self.initialized = true;
        log::info!(
            "client {} {} connected",
            params.client_info.name,
            params.client_info.version
        );
        let result = InitializeResult {
            user_agent: user_agent(&params.client_info),
            codex_home: self.options.home.clone(),
            platform_family: std::env::consts::FAMILY.to_string(),
            platform_os: std::env::consts::OS.to_string(),
        };
        match serde_json::to_value(result) {
            Ok(v) => result_line(id, v),
            Err(e) => error_line(id, INTERNAL_ERROR, &format!("Internal error: {e}")),
        }
    }
}

fn user_agent(client: &ClientInfo) -> String {
    let sanitize = |s: &str| -> String {
        s.chars()
            .map(|c| if c.is_ascii_graphic() { c } else { '_' })
            .collect()
    };
    format!(
        "devicekey/{} ({}; {}) {}/{}",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS,
        std::env::consts::ARCH,
        sanitize(&client.name),
        sanitize(&client.version)
    )
}

fn run_method(service: &dyn KeyService, method: &str, id: &Value, params: Value) -> Vec<u8> {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        call(service, method, params)
    }));
    match outcome {
        Ok(Ok(result)) => result_line(id, result),
        Ok(Err(e)) => error_line(id, e.code(), &e.to_string()),
        Err(_) => {
            log::error!("{method} panicked");
            error_line(id, INTERNAL_ERROR, "Internal error")
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(params: Value) -> Result<T, DeviceKeyError> {
    serde_json::from_value(params).map_err(|e| DeviceKeyError::InvalidRequest(e.to_string()))
}

fn to_value<T: Serialize>(v: T) -> Result<Value, DeviceKeyError> {
    serde_json::to_value(v).map_err(|e| DeviceKeyError::Platform(e.to_string()))
}

fn call(service: &dyn KeyService, method: &str, params: Value) -> Result<Value, DeviceKeyError> {
    match method {
        METHOD_CREATE => to_value(service.create(parse(params)?)?),
        METHOD_PUBLIC => to_value(service.public(parse(params)?)?),
        METHOD_SIGN => to_value(service.sign(parse(params)?)?),
        other => Err(DeviceKeyError::InvalidRequest(format!(
            "unknown method {other}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct NoService;

    impl KeyService for NoService {
        fn create(&self, _: CreateParams) -> Result<KeyInfo, DeviceKeyError> {
            Err(DeviceKeyError::KeyNotFound)
        }
        fn public(&self, _: PublicParams) -> Result<KeyInfo, DeviceKeyError> {
            Err(DeviceKeyError::KeyNotFound)
        }
        fn sign(&self, _: SignParams) -> Result<SignResult, DeviceKeyError> {
            Err(DeviceKeyError::KeyNotFound)
        }
    }

    /// Endless requests; counts the bytes read.
    struct Endless(Arc<AtomicUsize>);

    impl Read for Endless {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            const LINE: &[u8] = b"{\"id\":1,\"method\":\"x\"}\n";
            let n = (buf.len() / LINE.len()) * LINE.len();
            for chunk in buf[..n].chunks_mut(LINE.len()) {
                chunk.copy_from_slice(LINE);
            }
            self.0.fetch_add(n, Ordering::SeqCst);
            Ok(n)
        }
    }

    struct Closed;

    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_client_that_cannot_receive_answers_stops_being_read() {
        // Before the fix the reader went on for ever, queueing every answer in memory.
        let read = Arc::new(AtomicUsize::new(0));
        let options = ServeOptions {
            max_concurrent_requests: 4,
            max_line_bytes: 1024,
            home: String::new(),
        };
        serve(
            Endless(Arc::clone(&read)),
            Closed,
            Arc::new(NoService),
            &options,
        )
        .unwrap();
        assert!(read.load(Ordering::SeqCst) < 64 << 20);
    }
}
