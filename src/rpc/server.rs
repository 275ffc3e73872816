//! The JSON-RPC loop: framing, handshake, dispatch onto a pool of worker threads, bounded
//! concurrency.
//!
//! The reader thread parses each line, answers framing and handshake errors itself (so they keep
//! their order), and queues each `device/key/*` request for a small pool of long-lived workers
//! while fewer than `max_concurrent_requests` are queued or running; past that bound the request
//! gets `-32001`. Each worker writes its own answer, one whole line under the output lock. A
//! `public` or `sign` request that finds nothing in flight and no further input already read (a
//! client waiting for its answer) runs on the reader thread itself. At end of input the loop
//! waits for the requests in flight, stops the workers, flushes, and returns.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use serde::Serialize;
use serde_json::Value;

use super::error::{
    DeviceKeyError, INTERNAL_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR,
    SERVER_OVERLOADED,
};
use super::framing::{Frame, LineReader};
use super::log_text::LogText;
use super::strict_json::{self, StrictJsonError};
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

/// Worker threads of one server loop at most, whatever `max_concurrent_requests` says: the
/// requests past the workers wait in the queue (still bounded by `max_concurrent_requests`).
const MAX_WORKERS: usize = 8;

/// What the server does for each method; implemented over PKCS#11 by
/// [`super::client::TokenClient`].
pub trait KeyService: Send + Sync {
    /// `device/key/create`.
    fn create(&self, params: CreateParams) -> Result<KeyInfo, DeviceKeyError>;
    /// `device/key/public`.
    fn public(&self, params: PublicParams) -> Result<KeyInfo, DeviceKeyError>;
    /// `device/key/sign`.
    fn sign(&self, params: SignParams) -> Result<SignResult, DeviceKeyError>;
    /// A devicekey extension method ([`super::attest::EXTENSIONS`]); `None` when this service
    /// does not offer it.
    fn extension(&self, _method: &str, _params: Value) -> Option<Result<Value, DeviceKeyError>> {
        None
    }
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

/// An `INVALID_REQUEST` error line: "Invalid request: <why>".
fn invalid_request(id: &Value, why: &str) -> Vec<u8> {
    error_line(id, INVALID_REQUEST, &format!("Invalid request: {why}"))
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
    /// A slot, if fewer than `max` are taken; with it, whether it is the only one taken.
    fn try_acquire(self: &Arc<Self>, max: usize) -> Option<(Permit, bool)> {
        let mut count = self.count.lock().unwrap_or_else(|e| e.into_inner());
        if *count >= max {
            return None;
        }
        *count += 1;
        Some((Permit(Arc::clone(self)), *count == 1))
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

/// The output stream: whole lines, one writer at a time. After a failed write every further
/// line is dropped and the reader stops reading.
struct Output<W> {
    stream: Mutex<W>,
    broken: AtomicBool,
}

impl<W: Write> Output<W> {
    fn new(stream: W) -> Self {
        Self {
            stream: Mutex::new(stream),
            broken: AtomicBool::new(false),
        }
    }

    fn is_broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }

    /// Writes one line (with its newline) and flushes.
    fn write_line(&self, line: &[u8]) {
        if self.is_broken() {
            return;
        }
        let mut stream = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        if self.is_broken() {
            return;
        }
        if let Err(e) = stream.write_all(line).and_then(|()| stream.flush()) {
            log::warn!("cannot write a response: {e}; dropping further responses");
            self.broken.store(true, Ordering::SeqCst);
        }
    }

    fn flush(&self) {
        if self.is_broken() {
            return;
        }
        let mut stream = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = stream.flush() {
            log::warn!("cannot flush the responses: {e}");
            self.broken.store(true, Ordering::SeqCst);
        }
    }
}

/// One queued `device/key/*` request.
struct Job {
    method: String,
    id: Value,
    params: Value,
    permit: Permit,
}

struct PoolState {
    jobs: VecDeque<Job>,
    /// Workers waiting for a job.
    idle: usize,
    workers: Vec<JoinHandle<()>>,
    closed: bool,
}

/// Long-lived worker threads, started on demand up to `max_workers`. The queue needs no bound of
/// its own: every job holds a [`Permit`], so at most `max_concurrent_requests` are queued or
/// running.
struct Pool<W> {
    state: Mutex<PoolState>,
    work: Condvar,
    max_workers: usize,
    service: Arc<dyn KeyService>,
    output: Arc<Output<W>>,
}

impl<W: Write + Send + 'static> Pool<W> {
    fn new(
        max_concurrent: usize,
        service: Arc<dyn KeyService>,
        output: Arc<Output<W>>,
    ) -> Arc<Self> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let max_workers = max_concurrent.min(2 * cores).clamp(1, MAX_WORKERS);
        Arc::new(Self {
            state: Mutex::new(PoolState {
                jobs: VecDeque::new(),
                idle: 0,
                workers: Vec::new(),
                closed: false,
            }),
            work: Condvar::new(),
            max_workers,
            service,
            output,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a job, starting a worker when none is free and the pool may grow. Gives the job
    /// back when no worker exists and none can be started.
    fn submit(self: &Arc<Self>, job: Job) -> Result<(), Job> {
        let mut state = self.lock();
        state.jobs.push_back(job);
        if state.idle >= state.jobs.len() || state.workers.len() >= self.max_workers {
            drop(state);
            self.work.notify_one();
            return Ok(());
        }
        let pool = Arc::clone(self);
        match std::thread::Builder::new()
            .name("devicekey-rpc".into())
            .spawn(move || pool.work_loop())
        {
            Ok(handle) => {
                state.workers.push(handle);
                Ok(())
            }
            Err(e) => {
                log::error!("cannot start a request thread: {e}");
                if state.workers.is_empty() {
                    // Nobody would ever run it (it is the only job: every earlier one found or
                    // started a worker).
                    return state.jobs.pop_back().map_or(Ok(()), Err);
                }
                drop(state);
                self.work.notify_one();
                Ok(())
            }
        }
    }

    fn work_loop(&self) {
        let mut state = self.lock();
        loop {
            if let Some(job) = state.jobs.pop_front() {
                drop(state);
                self.run(job);
                state = self.lock();
                continue;
            }
            if state.closed {
                return;
            }
            state.idle += 1;
            state = self.work.wait(state).unwrap_or_else(|e| e.into_inner());
            state.idle -= 1;
        }
    }

    fn run(&self, job: Job) {
        let Job {
            method,
            id,
            params,
            permit,
        } = job;
        let line = run_method(&*self.service, &method, &id, params);
        // Free the slot before answering, so a client that has its answer may send the next
        // request without meeting -32001.
        drop(permit);
        self.output.write_line(&line);
    }

    /// Lets the workers finish the queue, then stops and joins them.
    fn shutdown(&self) {
        let workers = {
            let mut state = self.lock();
            state.closed = true;
            std::mem::take(&mut state.workers)
        };
        self.work.notify_all();
        for worker in workers {
            if worker.join().is_err() {
                log::error!("a request thread panicked");
            }
        }
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
    let output = Arc::new(Output::new(output));
    let pool = Pool::new(
        options.max_concurrent_requests,
        service,
        Arc::clone(&output),
    );
    let in_flight = Arc::new(InFlight::default());
    let mut state = Session {
        initialized: false,
        options: options.clone(),
    };
    let mut reader = LineReader::new(input, options.max_line_bytes);
    let result = loop {
        if output.is_broken() {
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
                output.write_line(&invalid_request(
                    &Value::Null,
                    &format!(
                        "message exceeds the limit of {} bytes",
                        options.max_line_bytes
                    ),
                ));
            }
            Frame::Line(line) => {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let input_idle = !reader.has_buffered();
                state.handle_line(&line, &output, &pool, &in_flight, input_idle);
            }
        }
    };
    in_flight.wait_idle();
    pool.shutdown();
    output.flush();
    result
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
    fn handle_line<W: Write + Send + 'static>(
        &mut self,
        line: &[u8],
        output: &Output<W>,
        pool: &Arc<Pool<W>>,
        in_flight: &Arc<InFlight>,
        input_idle: bool,
    ) {
        let send = |bytes: Vec<u8>| output.write_line(&bytes);
        let message: Value = match strict_json::from_slice(line) {
            Ok(v) => v,
            Err(StrictJsonError::Syntax(e)) => {
                log::debug!("unparsable line: {}", LogText(&e.to_string()));
                send(error_line(&Value::Null, PARSE_ERROR, "Parse error"));
                return;
            }
            Err(StrictJsonError::DuplicateKey(duplicate, value)) => {
                // A proxy reading the first of two values and this server must never act on
                // different requests: the whole message is refused. A request is answered with
                // its id (null when the id itself is repeated); a notification, never.
                let message = duplicate.message();
                log::debug!("message refused: {}", LogText(&message));
                let id_repeated = duplicate.top_level && duplicate.key == "id";
                let id = match value.get("id") {
                    None if value.is_object() => return,
                    Some(id) if valid_id(id) && !id_repeated => id.clone(),
                    _ => Value::Null,
                };
                send(invalid_request(&id, &message));
                return;
            }
        };
        let Value::Object(mut object) = message else {
            send(invalid_request(&Value::Null, "expected a JSON object"));
            return;
        };
        let id = object.remove("id");
        let method = object.remove("method");
        let params = object.remove("params").unwrap_or(Value::Null);
        let id = match id {
            None => None,
            Some(id) if valid_id(&id) => Some(id),
            Some(_) => {
                send(invalid_request(
                    &Value::Null,
                    "id must be a string or an integer",
                ));
                return;
            }
        };
        let method = match method {
            Some(Value::String(m)) => m,
            Some(_) => {
                let id = id.unwrap_or(Value::Null);
                send(invalid_request(&id, "method must be a string"));
                return;
            }
            None => {
                if id.is_some() && (object.contains_key("result") || object.contains_key("error")) {
                    // A response to a request we never sent: nothing to do.
                    log::debug!("ignoring a response message from the client");
                    return;
                }
                let id = id.unwrap_or(Value::Null);
                send(invalid_request(&id, "missing method"));
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
        if ![METHOD_CREATE, METHOD_PUBLIC, METHOD_SIGN].contains(&method.as_str())
            && !super::attest::EXTENSIONS.contains(&method.as_str())
        {
            send(error_line(
                &id,
                METHOD_NOT_FOUND,
                &format!("Method not found: {method}"),
            ));
            return;
        }
        let Some((permit, alone)) = in_flight.try_acquire(self.options.max_concurrent_requests)
        else {
            send(error_line(
                &id,
                SERVER_OVERLOADED,
                "Server overloaded; retry later",
            ));
            return;
        };
        if alone && input_idle && method != METHOD_CREATE {
            // Nothing else to do: run it here, saving the hand-off to a worker (a wake-up of
            // another thread, often on another CPU). A line that arrives meanwhile is read
            // when this one is answered, as if it had come a moment later.
            let line = run_method(&*pool.service, &method, &id, params);
            drop(permit);
            send(line);
            return;
        }
        let job = Job {
            method,
            id,
            params,
            permit,
        };
        if let Err(job) = pool.submit(job) {
            let Job { id, permit, .. } = job;
            drop(permit);
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
            other => log::debug!("ignoring notification {}", LogText(other)),
        }
    }

    fn initialize(&mut self, id: &Value, params: Value) -> Vec<u8> {
        if self.initialized {
            return error_line(id, INVALID_REQUEST, "Already initialized");
        }
        let params: InitializeParams = match serde_json::from_value(params) {
            Ok(p) => p,
            Err(e) => return invalid_request(id, &e.to_string()),
        };
        self.initialized = true;
        log::info!(
            "client {} {} connected",
            LogText(&params.client_info.name),
            LogText(&params.client_info.version)
        );
        let result = InitializeResult {
            user_agent: user_agent(&params.client_info),
            codex_home: self.options.home.clone(),
            platform_family: std::env::consts::FAMILY.to_string(),
            platform_os: std::env::consts::OS.to_string(),
            extensions: super::attest::EXTENSIONS.to_vec(),
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
            log::error!("{} panicked", LogText(method));
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
        other if super::attest::EXTENSIONS.contains(&other) => {
            service.extension(other, params).unwrap_or_else(|| {
                Err(DeviceKeyError::InvalidRequest(format!(
                    "unknown method {other}"
                )))
            })
        }
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

    /// `public` waits at a gate and records the thread that ran it.
    #[derive(Default)]
    struct Gated {
        open: Mutex<bool>,
        opened: Condvar,
        threads: Mutex<Vec<std::thread::ThreadId>>,
    }

    impl Gated {
        fn open(&self) {
            *self.open.lock().unwrap() = true;
            self.opened.notify_all();
        }
    }

    impl KeyService for Gated {
        fn create(&self, _: CreateParams) -> Result<KeyInfo, DeviceKeyError> {
            Err(DeviceKeyError::KeyNotFound)
        }
        fn public(&self, p: PublicParams) -> Result<KeyInfo, DeviceKeyError> {
            self.threads
                .lock()
                .unwrap()
                .push(std::thread::current().id());
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
            Ok(KeyInfo {
                key_id: p.key_id,
                public_key_spki_der_base64: String::new(),
                algorithm: super::super::types::Algorithm::EcdsaP256Sha256,
                protection_class: crate::backend::ProtectionClass::OsProtectedNonextractable,
            })
        }
        fn sign(&self, _: SignParams) -> Result<SignResult, DeviceKeyError> {
            Err(DeviceKeyError::KeyNotFound)
        }
    }

    /// A shared output buffer.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn answers(&self) -> Vec<Value> {
            let bytes = self.0.lock().unwrap().clone();
            bytes
                .split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .map(|l| serde_json::from_slice(l).expect("each line is one JSON answer"))
                .collect()
        }
    }

    /// `initialize`, then `n` `public` requests with ids 1..=n, all in one buffer.
    fn requests(n: usize) -> Vec<u8> {
        let mut input =
            b"{\"id\":0,\"method\":\"initialize\",\"params\":{\"clientInfo\":{\"name\":\"t\",\"version\":\"1\"}}}\n".to_vec();
        for i in 1..=n {
            input.extend_from_slice(
                format!("{{\"id\":{i},\"method\":\"device/key/public\",\"params\":{{\"keyId\":\"k{i}\"}}}}\n")
                    .as_bytes(),
            );
        }
        input
    }

    fn options(max: usize) -> ServeOptions {
        ServeOptions {
            max_concurrent_requests: max,
            max_line_bytes: 1 << 20,
            home: String::new(),
        }
    }

    /// Runs `serve` on another thread, waits until `ready` holds for the answers so far, opens
    /// the gate, and returns every answer.
    fn run_gated(
        input: Vec<u8>,
        max: usize,
        ready: impl Fn(&[Value]) -> bool,
    ) -> (Vec<Value>, Arc<Gated>) {
        let service = Arc::new(Gated::default());
        let out = Shared::default();
        let server = std::thread::spawn({
            let service = Arc::clone(&service) as Arc<dyn KeyService>;
            let out = out.clone();
            move || serve(&input[..], out, service, &options(max)).unwrap()
        });
        let start = std::time::Instant::now();
        while !ready(&out.answers()) {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(20),
                "{:?}",
                out.answers()
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        service.open();
        server.join().unwrap();
        (out.answers(), service)
    }

    fn overloaded(answers: &[Value]) -> usize {
        answers
            .iter()
            .filter(|a| a["error"]["code"] == serde_json::json!(SERVER_OVERLOADED))
            .count()
    }

    #[test]
    fn past_the_bound_requests_get_32001_while_the_rest_wait_for_workers() {
        // Bound 2: the first two are queued, the other three are refused at once.
        let (answers, _) = run_gated(requests(5), 2, |a| overloaded(a) == 3);
        assert_eq!(answers.len(), 6, "{answers:?}");
        let ok: Vec<_> = answers
            .iter()
            .filter(|a| a.get("result").is_some())
            .map(|a| a["id"].clone())
            .collect();
        assert_eq!(ok.len(), 3, "initialize and two requests: {answers:?}");
        assert!(ok.contains(&serde_json::json!(1)) && ok.contains(&serde_json::json!(2)));
    }

    #[test]
    fn the_pool_is_bounded_and_queued_requests_are_all_answered() {
        // 40 requests under the default bound of 64: none refused, a few workers run them all.
        let (answers, service) = run_gated(requests(40), 64, |_| true);
        assert_eq!(answers.len(), 41);
        assert_eq!(overloaded(&answers), 0);
        let mut threads = service.threads.lock().unwrap().clone();
        assert_eq!(threads.len(), 40);
        threads.sort_by_key(|t| format!("{t:?}"));
        threads.dedup();
        // The workers, and the reader thread when the last request found nothing in flight.
        assert!(
            (1..=MAX_WORKERS + 1).contains(&threads.len()),
            "{} threads",
            threads.len()
        );
    }

    #[test]
    fn a_lone_request_with_no_more_input_runs_on_the_reader_thread() {
        let caller = std::thread::current().id();
        let service = Arc::new(Gated::default());
        service.open();
        let out = Shared::default();
        let dyn_service = Arc::clone(&service) as Arc<dyn KeyService>;
        serve(&requests(1)[..], out.clone(), dyn_service, &options(4)).unwrap();
        assert_eq!(out.answers().len(), 2);
        assert_eq!(*service.threads.lock().unwrap(), vec![caller]);
    }
}
