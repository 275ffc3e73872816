//! The saved state of a digest operation, for C_GetOperationState and C_SetOperationState.
//!
//! A running digest keeps the input it has hashed so far, up to [`MAX_SAVED_INPUT`] bytes; its
//! saved state is that input, replayed into a fresh hash when the state is restored (in this
//! session, another session or another process). The hash crate does not export its internal
//! state, and the input is what the caller gave us anyway: a state holds nothing the caller did
//! not already have, and restoring one can do nothing the caller could not do with
//! C_DigestUpdate. A longer input makes the digest unsaveable (`CKR_STATE_UNSAVEABLE`); the
//! digest itself goes on.
//!
//! The encoding is versioned and checked, so a truncated, altered or foreign blob is refused
//! with `CKR_SAVED_STATE_INVALID` rather than restored into a wrong digest:
//!
//! ```text
//! "DKOS" | version 1 | kind 1 (digest) | mechanism u32 BE | style u8 | input length u32 BE
//!        | input | first 16 bytes of SHA-256 over everything before
//! ```
//!
//! Sign and verify operations are never saved: their state holds a key and, for the proof
//! policy, data under check (`CKR_STATE_UNSAVEABLE`).

use cryptoki_sys::*;
use sha2::Digest;
use zeroize::Zeroizing;

use super::error::{fail, Result};

/// The most input a digest keeps for saving its state (a TLS 1.3 handshake transcript, the
/// reason this exists, is a few kilobytes).
pub const MAX_SAVED_INPUT: usize = 256 * 1024;

const MAGIC: &[u8; 4] = b"DKOS";
const VERSION: u8 = 1;
const KIND_DIGEST: u8 = 1;
const HEADER_LEN: usize = 4 + 1 + 1 + 4 + 1 + 4;
const CHECK_LEN: usize = 16;

/// The saved state of a digest operation.
#[derive(Debug, PartialEq, Eq)]
pub struct SavedDigest {
    /// CKM_SHA256, CKM_SHA384 or CKM_SHA512.
    pub mechanism: CK_MECHANISM_TYPE,
    /// 0: neither single- nor multi-part yet, 1: single-part, 2: multi-part.
    pub style: u8,
    /// The input hashed so far.
    pub input: Zeroizing<Vec<u8>>,
}

fn check(bytes: &[u8]) -> [u8; CHECK_LEN] {
    let mut out = [0u8; CHECK_LEN];
    out.copy_from_slice(&sha2::Sha256::digest(bytes)[..CHECK_LEN]);
    out
}

/// Whether a mechanism is one our digests run.
fn is_digest(mechanism: CK_MECHANISM_TYPE) -> bool {
    matches!(mechanism, CKM_SHA256 | CKM_SHA384 | CKM_SHA512)
}

impl SavedDigest {
    /// The encoded state.
    pub fn encode(&self) -> Result<Zeroizing<Vec<u8>>> {
        let mechanism = u32::try_from(self.mechanism).or(fail(CKR_STATE_UNSAVEABLE))?;
        if self.input.len() > MAX_SAVED_INPUT || !is_digest(self.mechanism) || self.style > 2 {
            return fail(CKR_STATE_UNSAVEABLE);
        }
        let mut out = Zeroizing::new(Vec::with_capacity(
            HEADER_LEN + self.input.len() + CHECK_LEN,
        ));
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(KIND_DIGEST);
        out.extend_from_slice(&mechanism.to_be_bytes());
        out.push(self.style);
        out.extend_from_slice(&(self.input.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.input);
        let sum = check(&out);
        out.extend_from_slice(&sum);
        Ok(out)
    }

    /// Decodes a state; anything but a well-formed state of ours is `CKR_SAVED_STATE_INVALID`.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let invalid = || fail(CKR_SAVED_STATE_INVALID);
        if bytes.len() < HEADER_LEN + CHECK_LEN {
            return invalid();
        }
        let (body, sum) = bytes.split_at(bytes.len() - CHECK_LEN);
        if check(body) != sum {
            return invalid();
        }
        let (header, input) = body.split_at(HEADER_LEN);
        if &header[..4] != MAGIC || header[4] != VERSION || header[5] != KIND_DIGEST {
            return invalid();
        }
        let u32_at =
            |i: usize| u32::from_be_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        let mechanism = CK_MECHANISM_TYPE::from(u32_at(6));
        let style = header[10];
        let len = u32_at(11) as usize;
        if !is_digest(mechanism) || style > 2 || len != input.len() || len > MAX_SAVED_INPUT {
            return invalid();
        }
        Ok(Self {
            mechanism,
            style,
            input: Zeroizing::new(input.to_vec()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(input: &[u8]) -> SavedDigest {
        SavedDigest {
            mechanism: CKM_SHA256,
            style: 2,
            input: Zeroizing::new(input.to_vec()),
        }
    }

    #[test]
    fn a_state_round_trips() {
        let s = state(b"transcript so far");
        assert_eq!(SavedDigest::decode(&s.encode().unwrap()).unwrap(), s);
        let empty = state(b"");
        assert_eq!(
            SavedDigest::decode(&empty.encode().unwrap()).unwrap(),
            empty
        );
    }

    #[test]
    fn every_altered_or_cut_state_is_refused() {
        let bytes = state(b"abc").encode().unwrap();
        for i in 0..bytes.len() {
            let mut bad = bytes.to_vec();
            bad[i] ^= 0x01;
            assert_eq!(
                SavedDigest::decode(&bad).unwrap_err().rv,
                CKR_SAVED_STATE_INVALID,
                "byte {i}"
            );
        }
        for n in 0..bytes.len() {
            assert_eq!(
                SavedDigest::decode(&bytes[..n]).unwrap_err().rv,
                CKR_SAVED_STATE_INVALID
            );
        }
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert_eq!(
            SavedDigest::decode(&longer).unwrap_err().rv,
            CKR_SAVED_STATE_INVALID
        );
    }

    #[test]
    fn a_state_of_another_mechanism_or_too_long_is_not_made() {
        let mut s = state(b"x");
        s.mechanism = CKM_ECDSA_SHA256;
        assert_eq!(s.encode().unwrap_err().rv, CKR_STATE_UNSAVEABLE);
        let big = state(&vec![0u8; MAX_SAVED_INPUT + 1]);
        assert_eq!(big.encode().unwrap_err().rv, CKR_STATE_UNSAVEABLE);
    }
}
