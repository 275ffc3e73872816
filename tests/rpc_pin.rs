//! `devicekey serve` on a slot with `login = "pin"`: the server logs in at start with the PIN
//! that `[server]` names (`pin_env` or `pin_file`) and then creates, shows and signs as on any
//! slot; without a PIN source, or with a wrong PIN, it stops before answering anything, with a
//! message that names the PIN's source and never the PIN. On the software store, and once on a
//! TPM slot (swtpm), where the PIN is each key's authValue.

use serde_json::json;
use testkit::rpc::*;

const SLOT: &str = "pinslot";
const PIN_ENV: &str = "DEVICEKEY_TEST_USER_PIN";
const PIN: &str = "correct-pin-4821";
const WRONG_PIN: &str = "wrong-pin-7390";

/// An environment whose PIN slot got `PIN` through `devicekey pin set`, and whose `[server]`
/// has `extra_server`.
fn env_with_pin(extra_server: &str) -> Env {
    assert!(
        our_module().is_some(),
        "libdevicekey_pkcs11.so is not built next to the binary (cargo build)"
    );
    let mut env = Env::ours_software_pin(SLOT, extra_server);
    // The debug build's cheap Argon2id cost (written in the store at `pin set`).
    env.vars
        .push(("DEVICEKEY_TEST_CHEAP_PIN_KDF".into(), "1".into()));
    pin_set(&env);
    env
}

/// `devicekey pin set --slot SLOT --pin-file F` with `PIN` in F.
fn pin_set(env: &Env) {
    let file = env.secret_file("pin.txt", PIN);
    let args = ["pin", "set", "--slot", SLOT, "--pin-file"];
    let (code, out, err) = env.cli(&[&args[..], &[file.to_str().unwrap()]].concat(), None);
    assert_eq!(code, 0, "pin set: {out}{err}");
}

/// `create`, `public` and `sign` over the running server; the signature verifies.
fn create_public_sign(env: &Env) {
    create_public_sign_as(env, "dk_osn_");
}

/// [`create_public_sign`], the key id starting with `prefix` (its protection class).
fn create_public_sign_as(env: &Env, prefix: &str) {
    let mut server = env.serve();
    server.initialize();
    let info = server.create_os_protected();
    let key_id = info["keyId"].as_str().unwrap().to_string();
    assert!(key_id.starts_with(prefix), "{info}");
    let r = server.request("device/key/public", json!({"keyId": key_id}));
    assert_eq!(
        result(&r)["publicKeySpkiDerBase64"],
        info["publicKeySpkiDerBase64"]
    );
    server.sign_verified(env.dir.path(), &info, &connection_payload());
    assert_eq!(server.finish(), 0, "{}", env.log());
    let log = env.log();
    assert!(log.contains(&format!("token {SLOT:?}: logged in")), "{log}");
    assert!(!log.contains(PIN), "the PIN is in the server's log: {log}");
}

/// `devicekey pin status` of the PIN slot: (tries left, max tries).
fn tries(env: &Env) -> (u32, u32) {
    let (code, out, err) = env.cli(&["pin", "status", "--slot", SLOT], None);
    assert_eq!(code, 0, "pin status: {out}{err}");
    let rest = out
        .split("tries left ")
        .nth(1)
        .unwrap_or_else(|| panic!("no tries in {out}"));
    let mut words = rest.split_whitespace();
    let left = words.next().unwrap().parse().unwrap();
    assert_eq!(words.next(), Some("of"), "{out}");
    let max = words.next().unwrap().trim_end_matches(',').parse().unwrap();
    (left, max)
}

#[test]
fn create_public_sign_with_the_pin_from_pin_env() {
    let mut env = env_with_pin(&format!("pin_env = \"{PIN_ENV}\""));
    env.vars.push((PIN_ENV.into(), PIN.into()));
    create_public_sign(&env);
}

#[test]
fn create_public_sign_with_the_pin_from_pin_file() {
    let env = env_with_pin("");
    let file = env.secret_file("server-pin.txt", &format!("{PIN}\n"));
    env.set_config(
        &software_pin_slot(SLOT),
        &format!("pin_file = \"{}\"", file.display()),
    );
    create_public_sign(&env);
}

#[test]
fn no_pin_source_stops_the_server_at_start() {
    let env = env_with_pin("");
    let server = env.serve();
    assert_eq!(server.finish(), 1);
    let log = env.log();
    assert!(
        log.contains(&format!(
            "token {SLOT:?} needs a login; set pin_env or pin_file in [server]"
        )),
        "{log}"
    );
}

#[test]
fn wrong_pin_stops_the_server_at_start_naming_the_source_not_the_pin() {
    let mut env = env_with_pin("");
    let (before, max) = tries(&env);
    assert_eq!(before, max, "a fresh PIN has every try left");
    let file = env.secret_file("server-pin.txt", WRONG_PIN);
    env.set_config(
        &software_pin_slot(SLOT),
        &format!("pin_file = \"{}\"", file.display()),
    );
    let mut server = env.serve();
    assert!(
        server.silent_for(std::time::Duration::from_millis(500)),
        "the server answered on stdout"
    );
    assert_eq!(server.finish(), 1);
    let log = env.log();
    assert!(
        log.contains(&format!("rejected the PIN from file {}", file.display()))
            && log.contains("CKR_PIN_INCORRECT"),
        "{log}"
    );
    assert!(!log.contains(WRONG_PIN) && !log.contains(PIN), "{log}");
    // One login, one try: the server does not guess again.
    assert_eq!(tries(&env), (max - 1, max));

    // The same slot with the right PIN in the environment: the server starts and signs.
    env.set_config(
        &software_pin_slot(SLOT),
        &format!("pin_env = \"{PIN_ENV}\""),
    );
    env.vars.push((PIN_ENV.into(), PIN.into()));
    create_public_sign(&env);
}

#[test]
fn tpm_slot_with_a_pin_serves_and_refuses_a_wrong_pin() {
    if !testkit::swtpm::have_swtpm() {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let tpm = testkit::swtpm::Swtpm::start(state.path());
    let slot = format!(
        "[[slot]]\nlabel = \"{SLOT}\"\nbackend = \"tpm\"\ntcti = \"{}\"\ndir = \"@KEYS@\"\nallow_simulator = true\nlogin = \"pin\"\n",
        tpm.tcti()
    );
    let mut env = Env::ours_software_pin(SLOT, "");
    env.set_config(&slot, "");
    pin_set(&env);

    let wrong = env.secret_file("wrong.txt", WRONG_PIN);
    env.set_config(&slot, &format!("pin_file = \"{}\"", wrong.display()));
    let server = env.serve();
    assert_eq!(server.finish(), 1);
    let log = env.log();
    assert!(
        log.contains(&format!("rejected the PIN from file {}", wrong.display())),
        "{log}"
    );
    assert!(!log.contains(WRONG_PIN) && !log.contains(PIN), "{log}");

    env.set_config(&slot, &format!("pin_env = \"{PIN_ENV}\""));
    env.vars.push((PIN_ENV.into(), PIN.into()));
    create_public_sign_as(&env, "dk_tpm_");
}
