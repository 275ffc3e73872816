//! End-to-end `create` / `public` / `sign` through `devicekey serve` with SoftHSM configured as a
//! foreign module declared `hardware_tpm` (SoftHSM lacks CKM_ECDSA_SHA256, so this also covers
//! the hash-then-CKM_ECDSA path), plus the CLI against the same token.

use serde_json::{json, Value};
use testkit::rpc::*;

#[test]
fn softhsm_create_public_sign() {
    if !have_softhsm() {
        return;
    }
    let env = Env::softhsm("");
    let mut server = env.serve();
    server.initialize();
    create_public_sign(&env, &mut server, None, "dk_tpm_", "hardware_tpm");
    // allow_os_protected_nonextractable still prefers hardware.
    let r = server.request(
        "device/key/create",
        json!({"accountUserId": "a", "clientId": "c", "protectionPolicy": "allow_os_protected_nonextractable"}),
    );
    assert!(result(&r)["keyId"].as_str().unwrap().starts_with("dk_tpm_"));
    let r = server.request(
        "device/key/create",
        json!({"accountUserId": "a", "clientId": "c", "protectionPolicy": "hardware_only"}),
    );
    assert!(result(&r)["keyId"].as_str().unwrap().starts_with("dk_tpm_"));
    // Unknown keys of every class.
    for prefix in ["dk_tpm_", "dk_hse_", "dk_osn_"] {
        let key_id = format!("{prefix}{}", "B".repeat(42) + "A");
        let r = server.request("device/key/public", json!({"keyId": key_id}));
        assert_error(&r, -32600, "device key not found");
        let r = server.request(
            "device/key/sign",
            json!({"keyId": key_id, "payload": connection_payload()}),
        );
        assert_error(&r, -32600, "device key not found");
    }
    assert_eq!(server.finish(), 0);
}

#[test]
fn softhsm_declared_secure_enclave_and_os_protected() {
    if !have_softhsm() {
        return;
    }
    let env = Env::softhsm("");
    let config = std::fs::read_to_string(env.config_path()).unwrap();
    std::fs::write(
        env.config_path(),
        config.replace(
            "protection_class = \"hardware_tpm\"",
            "protection_class = \"hardware_secure_enclave\"",
        ),
    )
    .unwrap();
    let mut server = env.serve();
    server.initialize();
    create_public_sign(
        &env,
        &mut server,
        Some("hardware_only"),
        "dk_hse_",
        "hardware_secure_enclave",
    );
    assert_eq!(server.finish(), 0);

    // A module declared os_protected_nonextractable: hardware_only refuses with the exact text.
    let config = std::fs::read_to_string(env.config_path()).unwrap();
    std::fs::write(
        env.config_path(),
        config.replace(
            "protection_class = \"hardware_secure_enclave\"",
            "protection_class = \"os_protected_nonextractable\"",
        ),
    )
    .unwrap();
    let mut server = env.serve();
    server.initialize();
    let r = server.request(
        "device/key/create",
        json!({"accountUserId": ACCOUNT, "clientId": CLIENT}),
    );
    assert_error(
        &r,
        -32600,
        "hardware-backed device keys are not available; set protectionPolicy to allow_os_protected_nonextractable to allow key protection class os_protected_nonextractable",
    );
    let r = server.request(
        "device/key/create",
        json!({"accountUserId": ACCOUNT, "clientId": CLIENT, "protectionPolicy": "allow_os_protected_nonextractable"}),
    );
    let info = result(&r);
    assert!(info["keyId"].as_str().unwrap().starts_with("dk_osn_"));
    assert_eq!(
        info["protectionClass"],
        json!("os_protected_nonextractable")
    );
    assert_eq!(server.finish(), 0);
}

#[test]
fn keys_and_bindings_survive_a_restart() {
    if !have_softhsm() {
        return;
    }
    let env = Env::softhsm("");
    let mut server = env.serve();
    server.initialize();
    let r = server.request(
        "device/key/create",
        json!({"accountUserId": ACCOUNT, "clientId": CLIENT}),
    );
    let info = result(&r).clone();
    assert_eq!(server.finish(), 0);

    let mut server = env.serve();
    server.initialize();
    let key_id = info["keyId"].clone();
    let r = server.request("device/key/public", json!({"keyId": key_id}));
    assert_eq!(result(&r), &info);
    let payload = enrollment_payload();
    server.sign_verified(env.dir.path(), &info, &payload);
    let mut other = payload.clone();
    other["clientId"] = json!("x");
    let r = server.request(
        "device/key/sign",
        json!({"keyId": key_id, "payload": other}),
    );
    assert_error(
        &r,
        -32600,
        "invalid device key payload: payload accountUserId/clientId does not match device key binding",
    );
    assert_eq!(server.finish(), 0);
}

#[test]
fn wrong_pin_is_a_platform_error() {
    if !have_softhsm() {
        return;
    }
    let mut env = Env::softhsm("");
    env.vars.push((PIN_VAR.into(), "0000".into()));
    let mut server = env.serve();
    server.initialize();
    let r = server.request(
        "device/key/create",
        json!({"accountUserId": ACCOUNT, "clientId": CLIENT}),
    );
    assert_eq!(r["error"]["code"], json!(-32603), "{r}");
    let message = r["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("device key platform error: ") && message.contains("PIN_INCORRECT"),
        "{message}"
    );
    assert_eq!(server.finish(), 0);
}

#[test]
fn missing_module_is_a_platform_error() {
    let env = Env::ours_software("module = \"/nonexistent/libnothing.so\"");
    let mut server = env.serve();
    server.initialize();
    let r = server.request(
        "device/key/create",
        json!({"accountUserId": ACCOUNT, "clientId": CLIENT}),
    );
    assert_eq!(r["error"]["code"], json!(-32603), "{r}");
    assert!(r["error"]["message"].as_str().unwrap().starts_with(
        "device key platform error: PKCS#11 module /nonexistent/libnothing.so not found"
    ));
    assert_eq!(server.finish(), 0);
}

fn json_out(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn cli_create_public_sign_list_delete() {
    if !have_softhsm() {
        return;
    }
    let env = Env::softhsm("");
    let (code, out, err) = env.cli(
        &[
            "create",
            "--account-user-id",
            ACCOUNT,
            "--client-id",
            CLIENT,
            "--json",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let info = json_out(&out);
    let key_id = info["keyId"].as_str().unwrap().to_string();
    assert!(key_id.starts_with("dk_tpm_"));

    let (code, out, err) = env.cli(&["public", &key_id], None);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&key_id) && out.contains("hardware_tpm"),
        "{out}"
    );
    let (code, out, _) = env.cli(&["public", &key_id, "--pem"], None);
    assert_eq!(code, 0);
    assert!(out.starts_with("-----BEGIN PUBLIC KEY-----"), "{out}");

    // sign from stdin and from a file
    let payload = connection_payload();
    let (code, out, err) = env.cli(
        &["sign", &key_id, "--json"],
        Some(payload.to_string().as_bytes()),
    );
    assert_eq!(code, 0, "{err}");
    verify_sign_result(
        env.dir.path(),
        info["publicKeySpkiDerBase64"].as_str().unwrap(),
        &json_out(&out),
        &canonical_bytes(&payload),
    );
    let file = env.dir.path().join("payload.json");
    let payload = enrollment_payload();
    std::fs::write(&file, payload.to_string()).unwrap();
    let (code, out, err) = env.cli(
        &["sign", &key_id, "--payload", file.to_str().unwrap()],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("signature (DER, base64)"), "{out}");

    // refused payload: exit 4; garbage payload: exit 2
    let mut expired = connection_payload();
    expired["tokenExpiresAt"] = json!(1);
    let (code, _, err) = env.cli(&["sign", &key_id], Some(expired.to_string().as_bytes()));
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("remote-control token is expired"), "{err}");
    let (code, _, _) = env.cli(&["sign", &key_id], Some(b"nope"));
    assert_eq!(code, 2);

    let (code, out, err) = env.cli(&["list"], None);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&key_id) && out.contains(&format!("bound to {ACCOUNT} / {CLIENT}")),
        "{out}"
    );
    let (code, out, _) = env.cli(&["list", "--json"], None);
    assert_eq!(code, 0);
    let list = json_out(&out);
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["keyId"] == json!(key_id) && k["binding"]["clientId"] == json!(CLIENT)));

    let (code, _, err) = env.cli(&["delete", &key_id], None);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = env.cli(&["public", &key_id], None);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("device key not found"), "{err}");
    let (code, _, _) = env.cli(&["delete", &key_id], None);
    assert_eq!(code, 3);
    let (code, _, _) = env.cli(&["public", "not-a-key"], None);
    assert_eq!(code, 4);
    let (code, _, _) = env.cli(&["create", "--client-id", "c"], None);
    assert_eq!(code, 2);
    let (code, _, _) = env.cli(&["frobnicate"], None);
    assert_eq!(code, 2);

    // A general key has no binding and is listed as such.
    let (code, out, err) = env.cli(
        &[
            "create",
            "--purpose",
            "general",
            "--label",
            "ssh-key",
            "--json",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(json_out(&out)["keyId"]
        .as_str()
        .unwrap()
        .starts_with("dk_tpm_"));
    let (_, out, _) = env.cli(&["list"], None);
    assert!(
        out.contains("ssh-key") && out.contains("no binding"),
        "{out}"
    );
}

#[test]
fn softhsm_hundred_concurrent_signs() {
    if !have_softhsm() {
        return;
    }
    let env = Env::softhsm("max_concurrent_requests = 200");
    let mut server = env.serve();
    server.initialize();
    concurrent_signs(&mut server, "hardware_only", 100);
    assert_eq!(server.finish(), 0);
}
