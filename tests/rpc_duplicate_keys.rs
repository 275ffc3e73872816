//! `devicekey serve` over pipes refuses a request that repeats an object key anywhere (the
//! envelope, the params, the nested sign payload): a proxy reading the first of two values must
//! never see a different request from the one the server acts on. Our module, software store.

use serde_json::{json, Value};
use testkit::rpc::*;

fn keys_listed(env: &Env) -> Vec<Value> {
    let (code, out, err) = env.cli(&["list", "--json"], None);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str::<Value>(&out)
        .unwrap_or_else(|e| panic!("list --json ({e}): {out}"))
        .as_array()
        .expect("a JSON array")
        .clone()
}

/// Sends one raw line and returns the single answer.
fn raw(server: &mut Server, line: &str) -> Value {
    server.send_raw(format!("{line}\n").as_bytes());
    server.recv()
}

/// A sign payload with one field written twice: `first` then the payload's own value.
fn payload_with_twice(field: &str, first: &str) -> String {
    let payload = connection_payload();
    let text = payload.to_string();
    // Put `"field":"first",` right after the opening brace; the payload keeps its own value
    // later on, so the last occurrence is the good one.
    format!("{{\"{field}\":{},{}", json!(first), &text[1..])
}

fn create_line(id: i64, params: &str) -> String {
    format!(r#"{{"id":{id},"method":"device/key/create","params":{params}}}"#)
}

#[test]
fn a_repeated_key_in_the_envelope_is_refused() {
    let env = Env::ours_software("");
    let mut server = env.serve();
    // Before the handshake: a repeated id gets id null, and is no handshake.
    let r = raw(
        &mut server,
        r#"{"id":1,"id":2,"method":"initialize","params":{"clientInfo":{"name":"t","version":"1"}}}"#,
    );
    assert_error(&r, -32600, "Invalid request: duplicate field `id`");
    assert_eq!(r["id"], Value::Null, "{r}");
    let r = server.request("device/key/public", json!({"keyId": "x"}));
    assert_error(&r, -32600, "Not initialized");
    server.initialize();
    // Two methods: the last one (create) must not run.
    let r = raw(
        &mut server,
        &format!(
            r#"{{"id":10,"method":"device/key/public","method":"device/key/create","params":{{"accountUserId":"{ACCOUNT}","clientId":"{CLIENT}","protectionPolicy":"allow_os_protected_nonextractable"}}}}"#
        ),
    );
    assert_error(&r, -32600, "Invalid request: duplicate field `method`");
    assert_eq!(r["id"], json!(10));
    // Two params: neither is used.
    let params = format!(
        r#"{{"accountUserId":"{ACCOUNT}","clientId":"{CLIENT}","protectionPolicy":"allow_os_protected_nonextractable"}}"#
    );
    let r = raw(
        &mut server,
        &format!(r#"{{"id":11,"method":"device/key/create","params":{{}},"params":{params}}}"#),
    );
    assert_error(&r, -32600, "Invalid request: duplicate field `params`");
    assert!(keys_listed(&env).is_empty(), "no key was created");
    // The same request, once, works.
    let r = raw(&mut server, &create_line(12, &params));
    assert!(result(&r)["keyId"].is_string(), "{r}");
    assert_eq!(keys_listed(&env).len(), 1);
    assert_eq!(server.finish(), 0);
}

#[test]
fn a_repeated_key_in_the_params_is_refused() {
    let env = Env::ours_software("");
    let mut server = env.serve();
    let r = raw(
        &mut server,
        r#"{"id":3,"method":"initialize","params":{"clientInfo":{"name":"a","name":"b","version":"1"}}}"#,
    );
    assert_error(&r, -32600, "Invalid request: duplicate field `name`");
    assert_eq!(r["id"], json!(3));
    server.initialize();
    // A proxy reading the first accountUserId sees another account than the one bound.
    let r = raw(
        &mut server,
        &create_line(
            11,
            &format!(
                r#"{{"accountUserId":"someone-else","accountUserId":"{ACCOUNT}","clientId":"{CLIENT}","protectionPolicy":"allow_os_protected_nonextractable"}}"#
            ),
        ),
    );
    assert_error(
        &r,
        -32600,
        "Invalid request: duplicate field `accountUserId`",
    );
    assert_eq!(r["id"], json!(11));
    assert!(keys_listed(&env).is_empty(), "no key was created");
    // A notification is refused too, and (as every notification) never answered.
    server.send_raw(b"{\"method\":\"initialized\",\"params\":{\"a\":1,\"a\":2}}\n");
    assert!(server.silent_for(std::time::Duration::from_millis(300)));
    // Without the repetition the key is made, bound to the one account.
    server.create_os_protected();
    let keys = keys_listed(&env);
    assert_eq!(keys.len(), 1);
    assert_eq!(
        keys[0]["binding"]["accountUserId"],
        json!(ACCOUNT),
        "{keys:?}"
    );
    assert_eq!(server.finish(), 0);
}

#[test]
fn a_repeated_key_in_the_sign_payload_is_refused_and_nothing_is_signed() {
    let env = Env::ours_software("");
    let mut server = env.serve();
    server.initialize();
    let key_id = server.create_os_protected()["keyId"]
        .as_str()
        .unwrap()
        .to_string();

    // A proxy reading the first targetOrigin sees evil.example; serde_json alone would have
    // signed for chatgpt.com. Also a repeated type, and a repeated keyId in the params.
    let sign_line = |keys: &str, payload: &str| {
        format!(r#"{{"id":20,"method":"device/key/sign","params":{{{keys},"payload":{payload}}}}}"#)
    };
    let one_key = format!(r#""keyId":"{key_id}""#);
    let cases = [
        (
            sign_line(
                &one_key,
                &payload_with_twice("targetOrigin", "https://evil.example"),
            ),
            "targetOrigin",
        ),
        (
            sign_line(
                &one_key,
                &payload_with_twice("type", "remoteControlClientEnrollment"),
            ),
            "type",
        ),
        (
            sign_line(
                &format!(
                    r#""keyId":"dk_osn_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",{one_key}"#
                ),
                &connection_payload().to_string(),
            ),
            "keyId",
        ),
    ];
    for (line, field) in &cases {
        let r = raw(&mut server, line);
        assert_error(
            &r,
            -32600,
            &format!("Invalid request: duplicate field `{field}`"),
        );
        assert_eq!(r["id"], json!(20));
        assert!(r.get("result").is_none(), "no signature: {r}");
    }

    // The same sign request without the repetition is signed.
    let r = raw(
        &mut server,
        &sign_line(&one_key, &connection_payload().to_string()),
    );
    assert!(result(&r)["signatureDerBase64"].is_string(), "{r}");
    // The same key name in different objects is no repetition.
    let r = raw(
        &mut server,
        &format!(
            r#"{{"id":30,"method":"device/key/public","params":{{"keyId":"{key_id}"}},"extra":{{"keyId":"x","id":1}}}}"#
        ),
    );
    assert_eq!(result(&r)["keyId"], json!(key_id));
    assert_eq!(server.finish(), 0);
}

/// Not a regression test: the order of checks. A line that is not JSON stays a parse error.
#[test]
fn a_line_that_is_not_json_is_a_parse_error_even_with_a_repeated_key() {
    let env = Env::ours_software("");
    let mut server = env.serve();
    let r = raw(&mut server, r#"{"id":1,"id":2,"method":"initialize""#);
    assert_error(&r, -32700, "Parse error");
    assert_eq!(server.finish(), 0);
}
