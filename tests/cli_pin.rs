//! `devicekey pin` as a user runs it: the built binary on a software slot that already holds a
//! key. `set` with `--pin-file` gives the slot its PIN and the key keeps working with it (a
//! proof signed through the CLI, logged in with the `[server]` PIN); `status` reports it; `change`
//! refuses a wrong old PIN (and counts the try) and takes the right one, after which only the new
//! PIN signs. Refused with a clear message: a PIN file open to others, a slot without
//! `login = "pin"`, and no terminal with no file (a usage error, exit 2).

use std::path::Path;

use testkit::rpc::*;

const SLOT: &str = "pinslot";
const PLAIN: &str = "plain";
const PIN_ENV: &str = "DEVICEKEY_TEST_USER_PIN";
const PIN: &str = "first-pin-1357";
const NEW_PIN: &str = "second-pin-2468";

/// The PIN slot (`login` as given) and a slot without a PIN, in one config.
fn slots(login: bool) -> String {
    let pin_slot = if login {
        software_pin_slot(SLOT)
    } else {
        format!("[[slot]]\nlabel = \"{SLOT}\"\nbackend = \"software\"\ndir = \"@KEYS@\"\n")
    };
    format!("{pin_slot}\n[[slot]]\nlabel = \"{PLAIN}\"\nbackend = \"software\"\ndir = \"@KEYS@-plain\"\n")
}

fn cli(env: &Env, args: &[&str]) -> (i32, String, String) {
    let (code, out, err) = env.cli(args, None);
    eprintln!("$ devicekey {}\n{out}{err}(exit {code})", args.join(" "));
    (code, out, err)
}

/// `devicekey pin set --slot SLOT [--pin-file FILE]`.
fn set(env: &Env, slot: &str, file: Option<&Path>) -> (i32, String, String) {
    let mut args = vec!["pin", "set", "--slot", slot];
    if let Some(f) = file {
        args.extend(["--pin-file", f.to_str().unwrap()]);
    }
    cli(env, &args)
}

/// `devicekey pin change --slot SLOT --old-pin-file OLD [--new-pin-file NEW]`.
fn change(env: &Env, old: &Path, new: Option<&Path>) -> (i32, String, String) {
    let mut args = vec!["pin", "change", "--slot", SLOT, "--old-pin-file"];
    args.push(old.to_str().unwrap());
    if let Some(n) = new {
        args.extend(["--new-pin-file", n.to_str().unwrap()]);
    }
    cli(env, &args)
}

/// `devicekey pin status --slot SLOT`: its output; asserts success.
fn status(env: &Env) -> String {
    let (code, out, err) = cli(env, &["pin", "status", "--slot", SLOT]);
    assert_eq!(code, 0, "{err}");
    out
}

/// `devicekey doctor`'s line about the PIN slot's user PIN.
fn doctor_pin_line(env: &Env) -> String {
    let (_, out, _) = cli(env, &["doctor"]);
    let block = out
        .split("\n\n")
        .find(|b| b.starts_with("slot ") && b.lines().next().unwrap().ends_with(SLOT))
        .unwrap_or_else(|| panic!("no block for slot {SLOT} in:\n{out}"));
    block
        .lines()
        .find(|l| l.trim_start().starts_with("user PIN:"))
        .unwrap_or_else(|| panic!("no user PIN line in:\n{block}"))
        .trim()
        .to_string()
}

/// Signs `payload` with `key_id` through the CLI, with `pin` in the `[server]` PIN variable.
fn sign_with(
    env: &mut Env,
    key_id: &str,
    payload: &serde_json::Value,
    pin: &str,
) -> (i32, String, String) {
    env.vars.retain(|(k, _)| k != PIN_ENV);
    env.vars.push((PIN_ENV.into(), pin.into()));
    env.cli(
        &["sign", key_id, "--json"],
        Some(payload.to_string().as_bytes()),
    )
}

/// Signs a fresh proof with `key_id` (see [`sign_with`]).
fn sign(env: &mut Env, key_id: &str, pin: &str) -> (i32, String, String) {
    sign_with(env, key_id, &connection_payload(), pin)
}

/// An environment for these tests: the debug build's cheap Argon2id cost (the PIN's KDF
/// parameters are written in the store, so this changes nothing else).
fn env() -> Env {
    let mut env = Env::ours_software("");
    env.vars
        .push(("DEVICEKEY_TEST_CHEAP_PIN_KDF".into(), "1".into()));
    env
}

#[test]
fn set_status_change_on_a_slot_with_a_key() {
    let mut env = env();
    env.set_config(&slots(false), "");
    // A key made before the slot had a PIN.
    let info = env.cli_create_os_protected();
    let key_id = info["keyId"].as_str().unwrap().to_string();

    env.set_config(&slots(true), &format!("pin_env = \"{PIN_ENV}\""));
    let out = status(&env);
    assert!(
        out.contains(&format!("slot {SLOT:?}: PIN not set")),
        "{out}"
    );
    assert_eq!(
        doctor_pin_line(&env),
        format!("user PIN:         not set yet; set it with `devicekey pin set --slot {SLOT}`")
    );

    let pin_file = env.secret_file("pin.txt", &format!("{PIN}\n"));
    let (code, out, _) = set(&env, SLOT, Some(&pin_file));
    assert_eq!(code, 0);
    assert_eq!(out.trim(), format!("slot {SLOT:?} now has a user PIN"));
    let out = status(&env);
    assert!(
        out.contains(&format!("slot {SLOT:?}: PIN set, tries left 10 of 10")),
        "{out}"
    );
    assert_eq!(
        doctor_pin_line(&env),
        "user PIN:         set; wrong tries left: 10 of 10"
    );
    // A second `set` is refused: that is what `change` is for.
    let (code, _, err) = set(&env, SLOT, Some(&pin_file));
    assert_eq!(code, 2);
    assert!(
        err.contains("already has a PIN; use `devicekey pin change`"),
        "{err}"
    );

    // The key made before still signs, now with the PIN, and not with another.
    let payload = connection_payload();
    let (code, out, err) = sign_with(&mut env, &key_id, &payload, PIN);
    assert_eq!(code, 0, "{err}");
    verify_sign_result(
        env.dir.path(),
        info["publicKeySpkiDerBase64"].as_str().unwrap(),
        &serde_json::from_str(&out).unwrap(),
        &canonical_bytes(&payload),
    );
    let (code, _, err) = sign(&mut env, &key_id, NEW_PIN);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("CKR_PIN_INCORRECT"), "{err}");
    assert!(!err.contains(NEW_PIN), "{err}");
    // A right login resets the count.
    let (code, _, err) = sign(&mut env, &key_id, PIN);
    assert_eq!(code, 0, "{err}");
    assert!(status(&env).contains("tries left 10 of 10"));

    // A wrong old PIN is refused and costs one try; the PIN stays.
    let new_file = env.secret_file("new.txt", NEW_PIN);
    let wrong_file = env.secret_file("wrong.txt", "not-the-pin");
    let (code, _, err) = change(&env, &wrong_file, Some(&new_file));
    assert_eq!(code, 1);
    assert!(err.contains("PIN"), "{err}");
    assert!(
        !err.contains("not-the-pin") && !err.contains(NEW_PIN),
        "{err}"
    );
    let out = status(&env);
    assert!(out.contains("PIN set, tries left 9 of 10"), "{out}");
    assert_eq!(
        doctor_pin_line(&env),
        "user PIN:         set; wrong tries left: 9 of 10"
    );
    let (code, _, err) = sign(&mut env, &key_id, PIN);
    assert_eq!(code, 0, "{err}");

    let (code, out, _) = change(&env, &pin_file, Some(&new_file));
    assert_eq!(code, 0);
    assert_eq!(
        out.trim(),
        format!("the user PIN of slot {SLOT:?} is changed")
    );
    let (code, _, err) = sign(&mut env, &key_id, NEW_PIN);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = sign(&mut env, &key_id, PIN);
    assert_eq!(code, 1, "the old PIN still signs: {err}");
}

#[test]
fn refusals_with_their_messages() {
    let env = env();
    env.set_config(&slots(true), "");
    let pin_file = env.secret_file("pin.txt", PIN);

    // A PIN file that others can read.
    let open_file = env.secret_file("open.txt", PIN);
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&open_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let (code, _, err) = set(&env, SLOT, Some(&open_file));
    assert_eq!(code, 2);
    let message = format!(
        "the PIN file {} is open to others; chmod 600 it",
        open_file.display()
    );
    assert!(err.contains(&message), "{err}");

    // Not a regular file, or far longer than a PIN.
    let (code, _, err) = set(&env, SLOT, Some(Path::new("/dev/zero")));
    assert_eq!(code, 2);
    assert!(
        err.contains("the PIN file /dev/zero is not a regular file"),
        "{err}"
    );
    let long = env.secret_file("long.txt", &"7".repeat(5000));
    let (code, _, err) = set(&env, SLOT, Some(&long));
    assert_eq!(code, 2);
    assert!(err.contains("is longer than 4096 bytes"), "{err}");

    // No terminal and no file: a usage error that names the option.
    let (code, _, err) = set(&env, SLOT, None);
    assert_eq!(code, 2);
    let message = "no terminal to ask on; give --pin-file FILE (mode 0600)";
    assert!(err.contains(message), "{err}");
    let out = status(&env);
    assert!(
        out.contains("PIN not set"),
        "a refused command set a PIN: {out}"
    );

    // `change` before `set`.
    let (code, _, err) = change(&env, &pin_file, None);
    assert_eq!(code, 2);
    assert!(
        err.contains("has no PIN yet; use `devicekey pin set`"),
        "{err}"
    );

    assert_eq!(set(&env, SLOT, Some(&pin_file)).0, 0);
    let (code, _, err) = change(&env, &pin_file, None);
    assert_eq!(code, 2);
    let message = "no terminal to ask on; give --new-pin-file FILE (mode 0600)";
    assert!(err.contains(message), "{err}");

    // A PIN too short for the token.
    let short = env.secret_file("short.txt", "123");
    let (code, _, err) = change(&env, &pin_file, Some(&short));
    assert_eq!(code, 2);
    assert!(
        err.contains("a PIN has 4 to 256 bytes; this one has 3"),
        "{err}"
    );

    // A slot without login = "pin".
    let plain =
        format!("slot {PLAIN:?} has no user PIN: add login = \"pin\" to its [[slot]] first");
    let (code, _, err) = set(&env, PLAIN, Some(&pin_file));
    assert_eq!(code, 2);
    assert!(err.contains(&plain), "{err}");
    let (code, _, err) = cli(&env, &["pin", "status", "--slot", PLAIN]);
    assert_eq!(code, 2);
    assert!(err.contains(&plain), "{err}");
    // A slot that does not exist.
    let (code, _, err) = cli(&env, &["pin", "status", "--slot", "nope"]);
    assert_ne!(code, 0);
    assert!(err.contains("nope"), "{err}");
}
