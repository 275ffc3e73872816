//! What a test run requires: `DEVICEKEY_TEST_REQUIRE=softhsm,swtpm` turns a missing SoftHSM or
//! swtpm from "skipped" into a failure that names what is missing (`scripts/test.sh` sets it, so a
//! green run has touched every key store). Unset, a test that needs a missing tool says so on
//! stderr and passes without checking anything.

/// The variable naming what must be installed, comma-separated.
pub const REQUIRE_ENV: &str = "DEVICEKEY_TEST_REQUIRE";

/// The names `DEVICEKEY_TEST_REQUIRE` may hold.
pub const KNOWN: &[&str] = &["softhsm", "swtpm"];

/// The names in `DEVICEKEY_TEST_REQUIRE`; panics on a name it does not know (a typo must not
/// turn a required store back into a skipped one).
pub fn required() -> Vec<String> {
    let value = std::env::var(REQUIRE_ENV).unwrap_or_default();
    let names: Vec<String> = value
        .split(',')
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect();
    for n in &names {
        assert!(
            KNOWN.contains(&n.as_str()),
            "{REQUIRE_ENV}={value}: unknown name {n:?} (known: {})",
            KNOWN.join(", ")
        );
    }
    names
}

/// The one place a test decides to skip: `available` is whether `what` (one of [`KNOWN`]) can be
/// used, `missing` says what is missing. Returns `available`; when it is false and `what` is
/// required, panics naming `missing` instead.
pub fn available_or_skip(what: &str, available: bool, missing: &str) -> bool {
    debug_assert!(KNOWN.contains(&what), "{what} is not in KNOWN");
    if available {
        return true;
    }
    if required().iter().any(|n| n == what) {
        panic!("{missing}, and {REQUIRE_ENV} requires {what}");
    }
    eprintln!("SKIPPED: {missing} (set {REQUIRE_ENV}={what} to make this a failure)");
    false
}
