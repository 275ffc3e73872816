//! Fuzz harness (b): JSON-RPC lines through the server loop (`rpc::serve`): framing, handshake,
//! dispatch and params parsing, with an in-memory key service behind it.
//!
//! Properties: the loop returns (never panics or hangs), every output line is one JSON object
//! with an `id` and exactly one of `result`/`error` (an integer `code` and a string `message`),
//! no `jsonrpc` member, and there is at most one answer per input line. The line reader never
//! returns a line longer than its limit or one that holds a newline.

use std::io::Write;
use std::sync::{Arc, Mutex};

use devicekey_pkcs11::backend::ProtectionClass;
use devicekey_pkcs11::proof::{self, ProofPolicy};
use devicekey_pkcs11::rpc::framing::{Frame, LineReader};
use devicekey_pkcs11::rpc::types::{
    Algorithm, CreateParams, KeyInfo, PublicParams, SignParams, SignResult,
};
use devicekey_pkcs11::rpc::{serve, DeviceKeyError, KeyService, ServeOptions};
use serde_json::Value;

use crate::input::Input;

/// A key service that keeps nothing and checks what the real one checks first.
struct FakeService;

impl KeyService for FakeService {
    fn create(&self, params: CreateParams) -> Result<KeyInfo, DeviceKeyError> {
        proof::validate_binding_fields(&params.account_user_id, &params.client_id)?;
        Ok(KeyInfo {
            key_id: proof::key_id_for(ProtectionClass::OsProtectedNonextractable, &[7; 32]),
            public_key_spki_der_base64: "MFkw".into(),
            algorithm: Algorithm::EcdsaP256Sha256,
            protection_class: ProtectionClass::OsProtectedNonextractable,
        })
    }

    fn public(&self, params: PublicParams) -> Result<KeyInfo, DeviceKeyError> {
        proof::parse_key_id(&params.key_id)?;
        Err(DeviceKeyError::KeyNotFound)
    }

    fn sign(&self, params: SignParams) -> Result<SignResult, DeviceKeyError> {
        proof::parse_key_id(&params.key_id)?;
        proof::validate_payload(&params.payload, &ProofPolicy::default(), 1_750_000_000)?;
        let bytes = proof::signing_bytes(&params.payload)?;
        Ok(SignResult {
            signature_der_base64: String::new(),
            signed_payload_base64: format!("{} bytes", bytes.len()),
            algorithm: Algorithm::EcdsaP256Sha256,
        })
    }
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A handshake prefix, so most inputs reach the methods.
const HANDSHAKE: &[u8] =
    b"{\"id\":0,\"method\":\"initialize\",\"params\":{\"clientInfo\":{\"name\":\"f\",\"version\":\"1\"}}}\n";

fn check_framing(stream: &[u8], max: usize) -> usize {
    let mut reader = LineReader::new(stream, max);
    let mut frames = 0;
    loop {
        match reader.next_frame().expect("reading a slice never fails") {
            Frame::Eof => return frames,
            Frame::Line(line) => {
                assert!(line.len() <= max, "a line over the limit was returned");
                assert!(!line.contains(&b'\n'), "a line holds a newline");
            }
            Frame::TooLong => {}
        }
        frames += 1;
        assert!(frames <= stream.len() + 1, "more frames than bytes");
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.u8();
    let max_line_bytes = 16 + input.below(4096);
    let max_concurrent_requests = 1 + input.below(4);
    let mut stream = Vec::new();
    if flags & 1 == 0 {
        stream.extend_from_slice(HANDSHAKE);
    }
    stream.extend_from_slice(input.rest());
    let frames = check_framing(&stream, max_line_bytes);

    let sink = Sink::default();
    let options = ServeOptions {
        max_concurrent_requests,
        max_line_bytes,
        home: "/nonexistent".into(),
    };
    serve(&stream[..], sink.clone(), Arc::new(FakeService), &options)
        .expect("reading a slice never fails");
    let out = sink.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut answers = 0;
    for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        answers += 1;
        let v: Value = serde_json::from_slice(line).unwrap_or_else(|e| {
            panic!(
                "output line is not JSON ({e}): {}",
                String::from_utf8_lossy(line)
            )
        });
        let obj = v.as_object().expect("each answer is an object");
        assert!(obj.contains_key("id"), "answer without id: {v}");
        assert!(!obj.contains_key("jsonrpc"), "answer with jsonrpc: {v}");
        match (obj.get("result"), obj.get("error")) {
            (Some(_), None) => {}
            (None, Some(e)) => {
                assert!(e["code"].is_i64(), "error code: {v}");
                assert!(e["message"].is_string(), "error message: {v}");
            }
            _ => panic!("exactly one of result and error: {v}"),
        }
    }
    assert!(
        answers <= frames,
        "{answers} answers to {frames} input lines"
    );
    assert!(
        out.is_empty() || out.ends_with(b"\n"),
        "output ends mid-line"
    );
}
