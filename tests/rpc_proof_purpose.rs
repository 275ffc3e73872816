//! `device/key/sign` and `device/key/public` use only proof-only keys of our module: a general key
//! dressed up as a device key (labelled `dk_osn_<b64url(CKA_ID)>`, with a `devicekey-binding`
//! data object, all made with pkcs11-tool) is refused by the real stdio server, and the error says
//! why; a key made by `device/key/create` still works next to it.

use std::process::Command;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::json;
use testkit::rpc::*;

/// Runs pkcs11-tool on our module with the env's config; returns (success, stdout+stderr).
fn pkcs11_tool(env: &Env, module: &std::path::Path, args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new("pkcs11-tool");
    cmd.arg("--module").arg(module).args(args);
    for (k, v) in &env.vars {
        cmd.env(k, v);
    }
    cmd.env("HOME", env.dir.path());
    let out = cmd.output().expect("pkcs11-tool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

const REFUSED: &str = "Invalid request: key is not a proof-only device key (its CKA_DEVICEKEY_PURPOSE is not proof); device/key/sign and device/key/public use only keys made by device/key/create";

#[test]
fn general_key_dressed_as_a_device_key_is_refused() {
    let Some(module) = our_module() else {
        eprintln!("SKIPPED: libdevicekey_pkcs11.so is not built next to the binary");
        return;
    };
    if Command::new("pkcs11-tool").arg("--help").output().is_err() {
        eprintln!("SKIPPED: pkcs11-tool is not installed");
        return;
    }
    let env = Env::ours_software("");
    let dir = env.dir.path();

    // A general-purpose P-256 key with a device-key-shaped label and CKA_ID.
    let mut id = [0u8; 32];
    id[..16].copy_from_slice(&rand_bytes());
    id[16..].copy_from_slice(&rand_bytes());
    let id_hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let key_id = format!("dk_osn_{}", URL_SAFE_NO_PAD.encode(id));
    let (ok, text) = pkcs11_tool(
        &env,
        &module,
        &[
            "--keypairgen",
            "--key-type",
            "EC:prime256v1",
            "--id",
            &id_hex,
            "--label",
            &key_id,
        ],
    );
    assert!(ok, "keypairgen: {text}");

    // Its binding, as `create` would store it.
    let binding = dir.join("binding.json");
    std::fs::write(
        &binding,
        serde_json::to_vec(&json!({"accountUserId": ACCOUNT, "clientId": CLIENT})).unwrap(),
    )
    .unwrap();
    let (ok, text) = pkcs11_tool(
        &env,
        &module,
        &[
            "--write-object",
            binding.to_str().unwrap(),
            "--type",
            "data",
            "--label",
            &key_id,
            "--application-label",
            "devicekey-binding",
        ],
    );
    assert!(ok, "write-object: {text}");

    let mut server = env.serve();
    server.initialize();
    let r = server.request(
        "device/key/sign",
        json!({"keyId": key_id, "payload": connection_payload()}),
    );
    assert_error(&r, -32600, REFUSED);
    let r = server.request("device/key/public", json!({"keyId": key_id}));
    assert_error(&r, -32600, REFUSED);

    // A real proof key on the same token still signs.
    create_public_sign(
        &env,
        &mut server,
        Some("allow_os_protected_nonextractable"),
        "dk_osn_",
        "os_protected_nonextractable",
    );
    assert_eq!(server.finish(), 0);
}
