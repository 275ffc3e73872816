//! Key ids: `<prefix><unpadded base64url of 32 random bytes>`, 50 characters; the prefix names the
//! protection class.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use super::ProofError;
use crate::backend::ProtectionClass;

/// Length of a key id.
pub const KEY_ID_LEN: usize = 50;
/// Random bytes behind a key id (also the key's CKA_ID).
pub const KEY_ID_RANDOM_BYTES: usize = 32;

/// The protocol's message (after `invalid device key payload: `) for a malformed key id.
pub const INVALID_KEY_ID_REASON: &str =
    "keyId must be dk_hse_, dk_tpm_, or dk_osn_ followed by unpadded base64url-encoded 32 bytes";

const CLASSES: [ProtectionClass; 3] = [
    ProtectionClass::HardwareSecureEnclave,
    ProtectionClass::HardwareTpm,
    ProtectionClass::OsProtectedNonextractable,
];

/// The key id prefix of a protection class.
pub fn key_id_prefix(class: ProtectionClass) -> &'static str {
    match class {
        ProtectionClass::HardwareSecureEnclave => "dk_hse_",
        ProtectionClass::HardwareTpm => "dk_tpm_",
        ProtectionClass::OsProtectedNonextractable => "dk_osn_",
    }
}

/// The key id for `class` and the given random bytes.
pub fn key_id_for(class: ProtectionClass, random: &[u8; KEY_ID_RANDOM_BYTES]) -> String {
    format!("{}{}", key_id_prefix(class), URL_SAFE_NO_PAD.encode(random))
}

/// Fresh random bytes for a new key id (from the OS).
pub fn random_key_id_bytes() -> Result<[u8; KEY_ID_RANDOM_BYTES], ProofError> {
    let mut bytes = [0u8; KEY_ID_RANDOM_BYTES];
    getrandom::getrandom(&mut bytes)
        .map_err(|e| ProofError::Platform(format!("no randomness from the OS: {e}")))?;
    Ok(bytes)
}

/// A validated key id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyId {
    /// The class its prefix names.
    pub class: ProtectionClass,
    /// The 32 bytes its suffix encodes (the key's CKA_ID).
    pub random: [u8; KEY_ID_RANDOM_BYTES],
}

/// Validates a key id: known prefix, 50 characters, suffix decoding canonically to 32 bytes.
pub fn parse_key_id(key_id: &str) -> Result<KeyId, ProofError> {
    let invalid = || ProofError::invalid(INVALID_KEY_ID_REASON);
    if key_id.len() != KEY_ID_LEN {
        return Err(invalid());
    }
    let (class, suffix) = CLASSES
        .iter()
        .find_map(|&c| key_id.strip_prefix(key_id_prefix(c)).map(|s| (c, s)))
        .ok_or_else(invalid)?;
    // The default engine refuses padding and non-zero trailing bits: only the canonical form of
    // 32 bytes decodes.
    let decoded = URL_SAFE_NO_PAD.decode(suffix).map_err(|_| invalid())?;
    let random: [u8; KEY_ID_RANDOM_BYTES] = decoded.try_into().map_err(|_| invalid())?;
    Ok(KeyId { class, random })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let random = random_key_id_bytes().unwrap();
        for class in CLASSES {
            let id = key_id_for(class, &random);
            assert_eq!(id.len(), KEY_ID_LEN);
            let parsed = parse_key_id(&id).unwrap();
            assert_eq!(parsed.class, class);
            assert_eq!(parsed.random, random);
        }
    }

    #[test]
    fn rejects_malformed() {
        let good = key_id_for(ProtectionClass::HardwareTpm, &[7u8; 32]);
        let suffix = &good[7..];
        let cases = [
            String::new(),
            format!("dk_xyz_{suffix}"),
            format!("dk_tpm_{suffix}A"),
            format!("dk_tpm_{}", &suffix[..42]),
            format!("dk_tpm_{}=", &suffix[..42]),
            // Non-zero trailing bits: not the canonical encoding.
            format!("dk_tpm_{}B", &"A".repeat(42)),
            format!("dk_tpm_{}+", &suffix[..42]),
            format!("DK_TPM_{suffix}"),
        ];
        for case in cases {
            let err = parse_key_id(&case).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("invalid device key payload: {INVALID_KEY_ID_REASON}"),
                "{case}"
            );
        }
        assert!(parse_key_id(&format!("dk_tpm_{}A", &"A".repeat(42))).is_ok());
    }
}
