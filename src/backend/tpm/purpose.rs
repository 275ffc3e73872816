//! A TPM key's purpose (general or proof-only), bound into the key's public area.
//!
//! The purpose is written into the `authPolicy` field of the key's template when the TPM creates
//! it: SHA-256 of `devicekey key purpose v1: general` or of `devicekey key purpose v1: proof`
//! ([`policy_digest`]). The TPM covers the public area with its integrity protection (the key's
//! name, a hash of the public area, is part of the private blob's integrity value), so a blob
//! whose `authPolicy` was changed no longer loads, and the module reads the purpose from the
//! public area, never from the JSON sidecar: a sidecar that disagrees marks the key damaged.
//!
//! The digests are not the result of any sequence of policy commands anyone knows, so the
//! policy path of these keys is unusable; the keys are used, as before, through `userWithAuth`
//! with their authorization value: empty, or derived from the slot's PIN (`login = "pin"`). That
//! is why the binding holds against everything that reaches the key only through PKCS#11 or
//! JSON-RPC, and not against code running as the same user: without a PIN such code can load the
//! blob with tpm2-tools and sign whatever it likes (with one, it needs the PIN).
//!
//! Keys created before the binding existed have an empty `authPolicy`: their purpose lives only
//! in the sidecar, where anyone who can edit the file can turn proof into general, so they are
//! refused (logged, with the fix: create a new key).

use sha2::{Digest, Sha256};

use crate::backend::KeyPurpose;

/// The text whose SHA-256 is the `authPolicy` of a key of `purpose`.
pub fn policy_text(purpose: KeyPurpose) -> &'static str {
    match purpose {
        KeyPurpose::General => "devicekey key purpose v1: general",
        KeyPurpose::Proof => "devicekey key purpose v1: proof",
    }
}

/// The `authPolicy` digest that marks a key of `purpose`.
pub fn policy_digest(purpose: KeyPurpose) -> [u8; 32] {
    Sha256::digest(policy_text(purpose).as_bytes()).into()
}

/// What a key's `authPolicy` says about its purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binding {
    /// One of our two digests.
    Bound(KeyPurpose),
    /// Empty: a key made before purposes were bound.
    Unbound,
    /// Some other policy: not a key of ours.
    Foreign,
}

/// Reads the purpose from an `authPolicy` value.
pub fn binding(auth_policy: &[u8]) -> Binding {
    if auth_policy.is_empty() {
        return Binding::Unbound;
    }
    [KeyPurpose::General, KeyPurpose::Proof]
        .into_iter()
        .find(|p| policy_digest(*p) == auth_policy)
        .map_or(Binding::Foreign, Binding::Bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_fixed_and_distinct() {
        // Documented values: changing them would orphan every key.
        assert_eq!(
            crate::encoding::hex(&policy_digest(KeyPurpose::Proof)),
            crate::encoding::hex(&Sha256::digest(b"devicekey key purpose v1: proof"))
        );
        assert_ne!(
            policy_digest(KeyPurpose::General),
            policy_digest(KeyPurpose::Proof)
        );
        for p in [KeyPurpose::General, KeyPurpose::Proof] {
            assert_eq!(binding(&policy_digest(p)), Binding::Bound(p));
        }
        assert_eq!(binding(&[]), Binding::Unbound);
        assert_eq!(binding(&[0u8; 32]), Binding::Foreign);
    }
}
