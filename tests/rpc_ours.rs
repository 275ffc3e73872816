//! `devicekey serve` over our own module (the default module, found next to the binary): the
//! software slot's honest class, proof-only keys enforced by the token, and (when the module has
//! its pkcs11 key store) a SoftHSM-backed slot declared `hardware_tpm`.

use std::process::Command;

use serde_json::json;
use testkit::rpc::*;

const DEGRADED: &str = "hardware-backed device keys are not available; set protectionPolicy to allow_os_protected_nonextractable to allow key protection class os_protected_nonextractable";

fn module() -> Option<std::path::PathBuf> {
    let m = our_module();
    if m.is_none() {
        eprintln!("SKIPPED: libdevicekey_pkcs11.so is not built next to the binary");
    }
    m
}

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

/// CKA_ID of a key id, in hex.
fn id_hex(key_id: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(&key_id[7..])
        .unwrap()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn software_slot_is_not_hardware() {
    let Some(_) = module() else { return };
    let env = Env::ours_software("");
    let mut server = env.serve();
    server.initialize();
    for params in [
        json!({"accountUserId": ACCOUNT, "clientId": CLIENT}),
        json!({"accountUserId": ACCOUNT, "clientId": CLIENT, "protectionPolicy": null}),
        json!({"accountUserId": ACCOUNT, "clientId": CLIENT, "protectionPolicy": "hardware_only"}),
    ] {
        let r = server.request("device/key/create", params);
        assert_error(&r, -32600, DEGRADED);
    }
    let key_id = create_public_sign(
        &env,
        &mut server,
        Some("allow_os_protected_nonextractable"),
        "dk_osn_",
        "os_protected_nonextractable",
    );
    let r = server.request(
        "device/key/public",
        json!({"keyId": key_id.replacen("dk_osn_", "dk_tpm_", 1)}),
    );
    assert_error(&r, -32600, "device key not found");
    assert_eq!(server.finish(), 0);

    // The key, its binding and the refusal survive a restart.
    let mut server = env.serve();
    server.initialize();
    let r = server.request("device/key/public", json!({"keyId": key_id}));
    let spki = result(&r)["publicKeySpkiDerBase64"]
        .as_str()
        .unwrap()
        .to_string();
    let payload = enrollment_payload();
    let r = server.request(
        "device/key/sign",
        json!({"keyId": key_id, "payload": payload}),
    );
    verify_sign_result(
        env.dir.path(),
        &spki,
        result(&r),
        &canonical_bytes(&payload),
    );
    assert_eq!(server.finish(), 0);
}

#[test]
fn proof_keys_refuse_arbitrary_data_through_pkcs11_tool() {
    let Some(module) = module() else { return };
    if Command::new("pkcs11-tool").arg("--help").output().is_err() {
        eprintln!("SKIPPED: pkcs11-tool is not installed");
        return;
    }
    let env = Env::ours_software("");
    let info = env.cli_create_os_protected();
    let key_id = info["keyId"].as_str().unwrap().to_string();
    // pkcs11-tool picks the signing key by CKA_ID (it ignores --label there).
    let key_hex = id_hex(&key_id);

    let dir = env.dir.path();
    let data = dir.join("data.txt");
    std::fs::write(&data, b"hello, anything at all").unwrap();
    let digest = dir.join("digest.bin");
    std::fs::write(&digest, {
        use sha2::Digest;
        sha2::Sha256::digest(b"hello, anything at all").to_vec()
    })
    .unwrap();
    let sig = dir.join("sig.bin");
    let sig_s = sig.to_str().unwrap();
    for (mechanism, input) in [("ECDSA", &digest), ("ECDSA-SHA256", &data)] {
        let (ok, text) = pkcs11_tool(
            &env,
            &module,
            &[
                "--sign",
                "-m",
                mechanism,
                "--id",
                &key_hex,
                "--input-file",
                input.to_str().unwrap(),
                "--output-file",
                sig_s,
            ],
        );
        assert!(
            !ok,
            "proof key signed arbitrary data with {mechanism}: {text}"
        );
        assert!(
            text.contains("CKR_KEY_FUNCTION_NOT_PERMITTED") || text.contains("CKR_DATA_INVALID"),
            "{mechanism}: {text}"
        );
    }
    // The canonical bytes of a valid payload do sign through pkcs11-tool.
    let canonical = dir.join("canonical.json");
    std::fs::write(&canonical, canonical_bytes(&connection_payload())).unwrap();
    let (ok, text) = pkcs11_tool(
        &env,
        &module,
        &[
            "--sign",
            "-m",
            "ECDSA-SHA256",
            "--id",
            &key_hex,
            "--input-file",
            canonical.to_str().unwrap(),
            "--output-file",
            sig_s,
        ],
    );
    assert!(ok, "{text}");
    assert_eq!(std::fs::read(&sig).unwrap().len(), 64);

    // A general key signs anything.
    let (code, out, err) = env.cli(
        &[
            "create",
            "--purpose",
            "general",
            "--label",
            "general-key",
            "--policy",
            "allow-os-protected-nonextractable",
            "--json",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let general: serde_json::Value = serde_json::from_str(&out).unwrap();
    let general_hex = id_hex(general["keyId"].as_str().unwrap());
    for (mechanism, input) in [("ECDSA", &digest), ("ECDSA-SHA256", &data)] {
        let (ok, text) = pkcs11_tool(
            &env,
            &module,
            &[
                "--sign",
                "-m",
                mechanism,
                "--id",
                &general_hex,
                "--input-file",
                input.to_str().unwrap(),
                "--output-file",
                sig_s,
            ],
        );
        assert!(ok, "general key, {mechanism}: {text}");
    }
}

#[test]
fn softhsm_slot_of_our_module_is_hardware_tpm() {
    let Some(module) = module() else { return };
    if !have_softhsm() {
        return;
    }
    let env = Env::ours_with_softhsm_slot("");
    let (_, listing) = pkcs11_tool(&env, &module, &["-L"]);
    assert!(
        listing.contains("hardware_tpm"),
        "our module shows no hardware_tpm slot for SoftHSM:\n{listing}"
    );
    let mut server = env.serve();
    server.initialize();
    create_public_sign(&env, &mut server, None, "dk_tpm_", "hardware_tpm");
    assert_eq!(server.finish(), 0);
}

#[test]
fn cli_against_our_module() {
    let Some(_) = module() else { return };
    let env = Env::ours_software("");
    let (code, _, err) = env.cli(
        &["create", "--account-user-id", "a", "--client-id", "c"],
        None,
    );
    assert_eq!(code, 4, "{err}");
    assert!(err.contains(DEGRADED), "{err}");
    let (code, out, err) = env.cli(
        &[
            "create",
            "--account-user-id",
            "a",
            "--client-id",
            "c",
            "--policy",
            "allow-os-protected-nonextractable",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("dk_osn_"), "{out}");
    let (code, out, _) = env.cli(&["list"], None);
    assert_eq!(code, 0);
    assert!(out.contains("bound to a / c"), "{out}");
}

#[test]
fn ours_hundred_concurrent_signs() {
    let Some(_) = module() else { return };
    let env = Env::ours_software("max_concurrent_requests = 200");
    let mut server = env.serve();
    server.initialize();
    concurrent_signs(&mut server, "allow_os_protected_nonextractable", 100);
    assert_eq!(server.finish(), 0);
}

#[test]
fn configured_origins_reach_the_token_too() {
    let Some(_) = module() else { return };
    let env = Env::ours_software("allowed_origin_hosts = [\"example.org\"]");
    let mut server = env.serve();
    server.initialize();
    let r = server.request(
        "device/key/create",
        json!({"accountUserId": ACCOUNT, "clientId": CLIENT, "protectionPolicy": "allow_os_protected_nonextractable"}),
    );
    let info = result(&r).clone();
    let mut payload = connection_payload();
    payload["targetOrigin"] = json!("https://api.example.org");
    let r = server.request(
        "device/key/sign",
        json!({"keyId": info["keyId"], "payload": payload}),
    );
    verify_sign_result(
        env.dir.path(),
        info["publicKeySpkiDerBase64"].as_str().unwrap(),
        result(&r),
        &canonical_bytes(&payload),
    );
    assert_eq!(server.finish(), 0);
}
