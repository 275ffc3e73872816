//! `pkcs11-headers/devicekey.h` (what C callers compile against) and `src/vendor.rs` (what the
//! module answers) name the same constants with the same values: every `#define` of the header is
//! a constant of `vendor.rs` and every constant of `vendor.rs` is a `#define`, and both agree
//! with the values the crate exports.

use std::collections::BTreeMap;

use devicekey_pkcs11::vendor;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Value {
    Number(u64),
    Text(String),
}

const HEADER: &str = include_str!("../pkcs11-headers/devicekey.h");
const VENDOR_RS: &str = include_str!("../src/vendor.rs");

/// A C or Rust integer literal: `0x444B0001UL`, `0x444B_0001`, `2UL`, `3`.
fn number(text: &str) -> u64 {
    let t = text
        .trim()
        .trim_end_matches(['U', 'L', 'u', 'l'])
        .replace('_', "");
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse(),
    };
    parsed.unwrap_or_else(|e| panic!("not a number: {text:?}: {e}"))
}

/// An expression of either file: a string literal, or numbers (and `CKA_VENDOR_DEFINED`) joined
/// by `|`, maybe in parentheses.
fn value(expr: &str) -> Value {
    let expr = expr.trim();
    if let Some(inner) = expr.strip_prefix('"') {
        let text = inner.strip_suffix('"').expect("closing quote");
        assert!(
            !text.contains(['"', '\\']),
            "escapes are not expected: {expr}"
        );
        return Value::Text(text.to_string());
    }
    let expr = expr.trim_start_matches('(').trim_end_matches(')');
    Value::Number(
        expr.split('|')
            .map(|part| match part.trim() {
                "CKA_VENDOR_DEFINED" => cryptoki_sys::CKA_VENDOR_DEFINED,
                n => number(n),
            })
            .fold(0, |a, b| a | b),
    )
}

/// `#define NAME VALUE` lines of the header, without the include guard.
fn header_defines() -> BTreeMap<String, Value> {
    let mut defines = BTreeMap::new();
    for line in HEADER.lines() {
        let Some(rest) = line.trim().strip_prefix("#define") else {
            continue;
        };
        let rest = rest.trim();
        let (name, expr) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        if expr.trim().is_empty() {
            assert_eq!(name, "DEVICEKEY_H", "a #define without a value: {line}");
            continue;
        }
        let old = defines.insert(name.to_string(), value(expr));
        assert!(old.is_none(), "{name} is defined twice in devicekey.h");
    }
    defines
}

/// `pub const NAME: TYPE = VALUE;` items of `src/vendor.rs`.
fn vendor_constants() -> BTreeMap<String, Value> {
    let mut constants = BTreeMap::new();
    for line in VENDOR_RS.lines() {
        let Some(rest) = line.trim().strip_prefix("pub const ") else {
            continue;
        };
        let (name, rest) = rest.split_once(':').expect("pub const NAME: TYPE");
        let (_, expr) = rest.split_once('=').expect("pub const NAME: TYPE = VALUE");
        let expr = expr
            .trim()
            .strip_suffix(';')
            .expect("one line per constant");
        let old = constants.insert(name.trim().to_string(), value(expr));
        assert!(old.is_none(), "{name} is defined twice in vendor.rs");
    }
    constants
}

/// What the crate exports, by name: the parsing above must read the same values.
fn exported(name: &str) -> Option<Value> {
    let n = |v: u64| Some(Value::Number(v));
    let t = |v: &str| Some(Value::Text(v.to_string()));
    match name {
        "CKA_DEVICEKEY_PROTECTION_CLASS" => n(vendor::CKA_DEVICEKEY_PROTECTION_CLASS),
        "CKA_DEVICEKEY_PURPOSE" => n(vendor::CKA_DEVICEKEY_PURPOSE),
        "CKA_DEVICEKEY_TPM_PUBLIC_AREA" => n(vendor::CKA_DEVICEKEY_TPM_PUBLIC_AREA),
        "DEVICEKEY_CLASS_HARDWARE_TPM" => n(vendor::DEVICEKEY_CLASS_HARDWARE_TPM),
        "DEVICEKEY_CLASS_HARDWARE_SECURE_ENCLAVE" => {
            n(vendor::DEVICEKEY_CLASS_HARDWARE_SECURE_ENCLAVE)
        }
        "DEVICEKEY_CLASS_OS_PROTECTED_NONEXTRACTABLE" => {
            n(vendor::DEVICEKEY_CLASS_OS_PROTECTED_NONEXTRACTABLE)
        }
        "DEVICEKEY_PURPOSE_GENERAL" => n(vendor::DEVICEKEY_PURPOSE_GENERAL),
        "DEVICEKEY_PURPOSE_PROOF" => n(vendor::DEVICEKEY_PURPOSE_PROOF),
        "DEVICEKEY_MODEL_HARDWARE_TPM" => t(vendor::DEVICEKEY_MODEL_HARDWARE_TPM),
        "DEVICEKEY_MODEL_HARDWARE_SECURE_ENCLAVE" => {
            t(vendor::DEVICEKEY_MODEL_HARDWARE_SECURE_ENCLAVE)
        }
        "DEVICEKEY_MODEL_OS_PROTECTED_NONEXTRACTABLE" => {
            t(vendor::DEVICEKEY_MODEL_OS_PROTECTED_NONEXTRACTABLE)
        }
        "DEVICEKEY_MANUFACTURER" => t(vendor::DEVICEKEY_MANUFACTURER),
        _ => None,
    }
}

#[test]
fn every_define_of_the_header_is_a_vendor_constant_with_the_same_value() {
    let header = header_defines();
    let constants = vendor_constants();
    assert!(header.len() >= 11, "the header parsed to {header:?}");
    for (name, v) in &header {
        assert_eq!(
            constants.get(name),
            Some(v),
            "devicekey.h defines {name} = {v:?}; src/vendor.rs has {:?}",
            constants.get(name)
        );
    }
}

#[test]
fn every_vendor_constant_is_a_define_of_the_header() {
    let header = header_defines();
    for (name, v) in vendor_constants() {
        assert_eq!(
            header.get(&name),
            Some(&v),
            "src/vendor.rs has {name} = {v:?}; devicekey.h has {:?}",
            header.get(&name)
        );
    }
}

#[test]
fn the_parsed_values_are_the_ones_the_crate_exports() {
    for (name, v) in vendor_constants() {
        assert_eq!(
            exported(&name),
            Some(v),
            "{name}: add it to `exported` in this test, or the parser misread it"
        );
    }
    assert_eq!(
        Value::Number(vendor::CKA_DEVICEKEY_PURPOSE),
        Value::Number(0x8000_0000 | 0x444B_0002)
    );
    // Model strings fit CK_TOKEN_INFO.model (16 characters, blank-padded).
    for (name, v) in header_defines() {
        if let (true, Value::Text(t)) = (name.starts_with("DEVICEKEY_MODEL_"), v) {
            assert!(t.len() <= 16, "{name} = {t:?} is longer than 16");
        }
    }
}
