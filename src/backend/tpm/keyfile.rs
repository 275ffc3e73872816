//! The TSS2 PRIVATE KEY file format (`-----BEGIN TSS2 PRIVATE KEY-----`), as other TPM tools
//! (the tpm2 OpenSSL provider and engines) read and write it.
//!
//! ```text
//! TPMKey ::= SEQUENCE {
//!     type        OBJECT IDENTIFIER,          -- 2.23.133.10.1.3, a loadable key
//!     emptyAuth   [0] EXPLICIT BOOLEAN OPTIONAL,
//!     policy      [1] EXPLICIT SEQUENCE OF TPMPolicy OPTIONAL,
//!     secret      [2] EXPLICIT OCTET STRING OPTIONAL,
//!     authPolicy  [3] EXPLICIT SEQUENCE OF TPMAuthPolicy OPTIONAL,
//!     description [4] EXPLICIT UTF8String OPTIONAL,
//!     rsaParent   [5] EXPLICIT BOOLEAN OPTIONAL,
//!     parent      INTEGER,                    -- 0x40000001: the owner hierarchy's SRK
//!     pubkey      OCTET STRING,               -- a marshalled TPM2B_PUBLIC
//!     privkey     OCTET STRING                -- a marshalled TPM2B_PRIVATE
//! }
//! ```
//!
//! Parent `0x40000001` (TPM2_RH_OWNER) means "the primary key that the standard ECC P-256 storage
//! template derives in the owner hierarchy", which is exactly the SRK we use. The encoder and the
//! parser are small and hand-written: the structure is fixed and every length is checked.

use base64::Engine as _;

/// The parent handle that names the owner hierarchy's standard SRK.
pub const PARENT_OWNER: u32 = 0x4000_0001;

/// DER of the OID 2.23.133.10.1.3 (TCG "loadable key"), tag and length included.
const OID_LOADABLE_KEY: [u8; 8] = [0x06, 0x06, 0x67, 0x81, 0x05, 0x0a, 0x01, 0x03];

const PEM_BEGIN: &str = "-----BEGIN TSS2 PRIVATE KEY-----";
const PEM_END: &str = "-----END TSS2 PRIVATE KEY-----";

/// A TPM key blob: the marshalled TPM2B_PUBLIC and TPM2B_PRIVATE (each with its 2-byte size).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyBlob {
    /// TPM2B_PUBLIC, marshalled.
    pub public: Vec<u8>,
    /// TPM2B_PRIVATE, marshalled (the private area, encrypted by the parent).
    pub private: Vec<u8>,
    /// `emptyAuth`: the key's authValue is empty. False for the keys of a PIN slot, whose
    /// authValue is derived from the PIN (other tools then know they need one).
    pub empty_auth: bool,
}

/// Why a key file could not be read.
#[derive(Debug, thiserror::Error)]
#[error("not a usable TSS2 PRIVATE KEY: {0}")]
pub struct KeyFileError(pub String);

fn bad(msg: impl Into<String>) -> KeyFileError {
    KeyFileError(msg.into())
}

fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = (len as u64).to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (8 - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 6);
    out.push(tag);
    push_len(&mut out, content.len());
    out.extend_from_slice(content);
    out
}

fn der_uint(value: u32) -> Vec<u8> {
    let bytes = value.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count().min(3);
    let mut content = Vec::with_capacity(5);
    if bytes[skip] & 0x80 != 0 {
        content.push(0);
    }
    content.extend_from_slice(&bytes[skip..]);
    tlv(0x02, &content)
}

impl KeyBlob {
    /// The DER encoding (emptyAuth = TRUE when the authValue is empty, else absent; parent =
    /// the owner SRK).
    pub fn to_der(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(self.public.len() + self.private.len() + 32);
        body.extend_from_slice(&OID_LOADABLE_KEY);
        if self.empty_auth {
            body.extend_from_slice(&tlv(0xa0, &[0x01, 0x01, 0xff]));
        }
        body.extend_from_slice(&der_uint(PARENT_OWNER));
        body.extend_from_slice(&tlv(0x04, &self.public));
        body.extend_from_slice(&tlv(0x04, &self.private));
        tlv(0x30, &body)
    }

    /// The PEM encoding (64-column base64, RFC 7468).
    pub fn to_pem(&self) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(self.to_der());
        let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 80);
        out.push_str(PEM_BEGIN);
        out.push('\n');
        for chunk in b64.as_bytes().chunks(64) {
            // Base64 output is ASCII.
            out.push_str(&String::from_utf8_lossy(chunk));
            out.push('\n');
        }
        out.push_str(PEM_END);
        out.push('\n');
        out
    }

    /// Parses the PEM encoding; text around the block is ignored.
    pub fn from_pem(text: &str) -> Result<Self, KeyFileError> {
        let start = text
            .find(PEM_BEGIN)
            .ok_or_else(|| bad("no BEGIN TSS2 PRIVATE KEY line"))?;
        let rest = &text[start + PEM_BEGIN.len()..];
        let end = rest
            .find(PEM_END)
            .ok_or_else(|| bad("no END TSS2 PRIVATE KEY line"))?;
        let b64: String = rest[..end]
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map_err(|e| bad(format!("bad base64: {e}")))?;
        Self::from_der(&der)
    }

    /// Parses the DER encoding. Keys with a policy, an import secret or a parent other than the
    /// owner SRK are refused: this store neither creates nor needs them. Whether the key has an
    /// authValue is reported (`empty_auth`); the caller decides whether it knows it.
    pub fn from_der(der: &[u8]) -> Result<Self, KeyFileError> {
        let mut outer = Reader(der);
        let body = outer.expect(0x30)?;
        if !outer.0.is_empty() {
            return Err(bad("trailing bytes after the key"));
        }
        let mut r = Reader(body);
        let (tag, oid) = r.next()?;
        if tag != 0x06 || oid != &OID_LOADABLE_KEY[2..] {
            return Err(bad("type is not 2.23.133.10.1.3 (loadable key)"));
        }
        let mut empty_auth = false;
        while let Some(tag) = r.peek_tag() {
            if !(0xa0..=0xa5).contains(&tag) {
                break;
            }
            let (_, content) = r.next()?;
            match tag {
                0xa0 => empty_auth = content == [0x01, 0x01, 0xff],
                0xa1 | 0xa3 => return Err(bad("keys with a policy are not supported")),
                0xa2 => return Err(bad("imported keys with a secret are not supported")),
                _ => {}
            }
        }
        let parent = r.expect(0x02)?;
        let parent = parse_uint(parent)?;
        if parent != PARENT_OWNER && parent != 0 {
            return Err(bad(format!(
                "parent {parent:#x} is not the owner SRK (0x40000001)"
            )));
        }
        let public = r.expect(0x04)?.to_vec();
        let private = r.expect(0x04)?.to_vec();
        if !r.0.is_empty() {
            return Err(bad("unexpected fields after privkey"));
        }
        check_tpm2b(&public, "pubkey")?;
        check_tpm2b(&private, "privkey")?;
        Ok(Self {
            public,
            private,
            empty_auth,
        })
    }
}

fn check_tpm2b(bytes: &[u8], what: &str) -> Result<(), KeyFileError> {
    if bytes.len() < 2 || usize::from(u16::from_be_bytes([bytes[0], bytes[1]])) != bytes.len() - 2 {
        return Err(bad(format!("{what} is not a sized TPM2B structure")));
    }
    Ok(())
}

fn parse_uint(content: &[u8]) -> Result<u32, KeyFileError> {
    if content.is_empty() || content[0] & 0x80 != 0 {
        return Err(bad("parent is not a non-negative INTEGER"));
    }
    let trimmed: Vec<u8> = content.iter().copied().skip_while(|b| *b == 0).collect();
    if trimmed.len() > 4 {
        return Err(bad("parent is out of range"));
    }
    Ok(trimmed
        .iter()
        .fold(0u32, |acc, b| (acc << 8) | u32::from(*b)))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn peek_tag(&self) -> Option<u8> {
        self.0.first().copied()
    }

    fn next(&mut self) -> Result<(u8, &'a [u8]), KeyFileError> {
        let data = self.0;
        if data.len() < 2 {
            return Err(bad("truncated DER"));
        }
        let tag = data[0];
        let (len, header) = if data[1] < 0x80 {
            (usize::from(data[1]), 2)
        } else {
            let n = usize::from(data[1] & 0x7f);
            if n == 0 || n > 4 || data.len() < 2 + n {
                return Err(bad("bad DER length"));
            }
            let len = data[2..2 + n]
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            (len, 2 + n)
        };
        let end = header
            .checked_add(len)
            .filter(|end| *end <= data.len())
            .ok_or_else(|| bad("DER length past the end"))?;
        self.0 = &data[end..];
        Ok((tag, &data[header..end]))
    }

    fn expect(&mut self, want: u8) -> Result<&'a [u8], KeyFileError> {
        let (tag, content) = self.next()?;
        if tag != want {
            return Err(bad(format!("expected tag {want:#04x}, found {tag:#04x}")));
        }
        Ok(content)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob() -> KeyBlob {
        let mut public = vec![0x00, 0x03, 1, 2, 3];
        public.truncate(5);
        let mut private = vec![0x00, 200];
        private.extend(std::iter::repeat(7u8).take(200));
        KeyBlob {
            public,
            private,
            empty_auth: true,
        }
    }

    #[test]
    fn pem_round_trip() {
        let b = blob();
        let pem = b.to_pem();
        assert!(pem.starts_with("-----BEGIN TSS2 PRIVATE KEY-----\n"));
        assert!(pem.lines().all(|l| l.len() <= 64));
        assert_eq!(KeyBlob::from_pem(&format!("comment\n{pem}")).unwrap(), b);
        // A key with an authValue: emptyAuth is left out, and read back as false.
        let with_auth = KeyBlob {
            empty_auth: false,
            ..b
        };
        let der = with_auth.to_der();
        assert!(!der.windows(5).any(|w| w == [0xa0, 0x03, 0x01, 0x01, 0xff]));
        assert_eq!(KeyBlob::from_der(&der).unwrap(), with_auth);
    }

    #[test]
    fn der_layout() {
        let der = blob().to_der();
        // SEQUENCE, long form length; then the OID, emptyAuth, parent.
        assert_eq!(der[0], 0x30);
        let body = &der[2 + usize::from(der[1] & 0x7f)..];
        assert_eq!(&body[..8], &OID_LOADABLE_KEY);
        assert_eq!(&body[8..13], &[0xa0, 0x03, 0x01, 0x01, 0xff]);
        assert_eq!(&body[13..19], &[0x02, 0x04, 0x40, 0x00, 0x00, 0x01]);
    }

    #[test]
    fn refuses_garbage_and_foreign_parents() {
        assert!(KeyBlob::from_der(&[0x30, 0x05, 0x06, 0x03, 1, 2, 3]).is_err());
        assert!(KeyBlob::from_der(&[]).is_err());
        let mut der = blob().to_der();
        let pos = der
            .windows(6)
            .position(|w| w == [0x02, 0x04, 0x40, 0x00, 0x00, 0x01])
            .unwrap();
        der[pos + 2] = 0x81; // 0x81000001, a persistent handle
        der.insert(pos + 2, 0);
        der[pos + 1] = 5;
        // Fix the outer length (long form, one or two bytes).
        let n = usize::from(der[1] & 0x7f);
        let len = der.len() - 2 - n;
        let mut fixed = vec![0x30];
        push_len(&mut fixed, len);
        fixed.extend_from_slice(&der[2 + n..]);
        let err = KeyBlob::from_der(&fixed).unwrap_err();
        assert!(err.0.contains("parent"), "{err}");
        // Truncation anywhere is an error, never a panic.
        let good = blob().to_der();
        for cut in 0..good.len() {
            assert!(KeyBlob::from_der(&good[..cut]).is_err());
        }
    }
}
