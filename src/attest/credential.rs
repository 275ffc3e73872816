//! TPM2_MakeCredential done in software, for an RSA 2048 or ECC P-256 EK (TPM 2.0 Part 1,
//! "Credential Protection" and the secret-sharing annexes):
//!
//! - a seed: for RSA, 32 random bytes encrypted with RSA-OAEP (SHA-256, label `"IDENTITY\0"`);
//!   for ECC, `KDFe(SHA-256, Z, "IDENTITY", ephemeral x, EK x)` from an ephemeral ECDH key, whose
//!   point is sent instead;
//! - `symKey = KDFa(seed, "STORAGE", AK name)`, and the credential (as a `TPM2B`) encrypted with
//!   AES-CFB and a zero IV;
//! - `hmacKey = KDFa(seed, "INTEGRITY")`, and `HMAC(hmacKey, encIdentity ‖ AK name)` in front.
//!
//! The output is what TPM2_MakeCredential returns: a `TPM2B_ID_OBJECT` and a
//! `TPM2B_ENCRYPTED_SECRET`, size prefixes included.

use openssl::derive::Deriver;
use openssl::ec::{EcGroup, EcKey};
use openssl::encrypt::Encrypter;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::PKey;
use openssl::rsa::Padding;
use openssl::sign::Signer;
use openssl::symm::{encrypt, Cipher};

use super::public_area::{EkKey, PublicArea};
use super::sha256;

/// The two blobs a device gives to TPM2_ActivateCredential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialChallenge {
    /// The marshalled `TPM2B_ID_OBJECT` (size prefix included).
    pub credential_blob: Vec<u8>,
    /// The marshalled `TPM2B_ENCRYPTED_SECRET` (size prefix included).
    pub encrypted_secret: Vec<u8>,
}

const DIGEST_LEN: usize = 32;

fn ossl(what: &str) -> impl Fn(openssl::error::ErrorStack) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn tpm2b(body: &[u8]) -> Result<Vec<u8>, String> {
    let len =
        u16::try_from(body.len()).map_err(|_| "a TPM2B longer than 65535 bytes".to_string())?;
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(body);
    Ok(out)
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Result<Vec<u8>, String> {
    let key = PKey::hmac(key).map_err(ossl("HMAC key"))?;
    let mut signer = Signer::new(MessageDigest::sha256(), &key).map_err(ossl("HMAC"))?;
    for p in parts {
        signer.update(p).map_err(ossl("HMAC"))?;
    }
    signer.sign_to_vec().map_err(ossl("HMAC"))
}

/// KDFa with HMAC-SHA256 (SP 800-108 counter mode as the TPM uses it): `bits` bits from
/// `HMAC(key, i ‖ label ‖ 0x00 ‖ context_u ‖ context_v ‖ bits)`, `i` counting from 1.
pub fn kdfa(
    key: &[u8],
    label: &str,
    context_u: &[u8],
    context_v: &[u8],
    bits: u32,
) -> Result<Vec<u8>, String> {
    let len = bits.div_ceil(8) as usize;
    let mut out = Vec::with_capacity(len + DIGEST_LEN);
    let mut counter: u32 = 1;
    while out.len() < len {
        out.extend(hmac_sha256(
            key,
            &[
                &counter.to_be_bytes(),
                label.as_bytes(),
                &[0],
                context_u,
                context_v,
                &bits.to_be_bytes(),
            ],
        )?);
        counter += 1;
    }
    out.truncate(len);
    Ok(out)
}

/// KDFe with SHA-256 (SP 800-56A concatenation as the TPM uses it): `bits` bits from
/// `SHA-256(i ‖ Z ‖ label ‖ 0x00 ‖ party_u ‖ party_v)`, `i` counting from 1.
pub fn kdfe(z: &[u8], label: &str, party_u: &[u8], party_v: &[u8], bits: u32) -> Vec<u8> {
    let len = bits.div_ceil(8) as usize;
    let mut out = Vec::with_capacity(len + DIGEST_LEN);
    let mut counter: u32 = 1;
    while out.len() < len {
        let mut input = counter.to_be_bytes().to_vec();
        input.extend_from_slice(z);
        input.extend_from_slice(label.as_bytes());
        input.push(0);
        input.extend_from_slice(party_u);
        input.extend_from_slice(party_v);
        out.extend_from_slice(&sha256(&input));
        counter += 1;
    }
    out.truncate(len);
    out
}

/// The seed and the `TPM2B_ENCRYPTED_SECRET` that carries it to the EK.
fn seed_for(ek: &EkKey) -> Result<(Vec<u8>, Vec<u8>), String> {
    match ek {
        EkKey::Rsa(key) => {
            let mut seed = vec![0; DIGEST_LEN];
            openssl::rand::rand_bytes(&mut seed).map_err(ossl("random seed"))?;
            let mut enc = Encrypter::new(key).map_err(ossl("RSA-OAEP"))?;
            enc.set_rsa_padding(Padding::PKCS1_OAEP)
                .and_then(|()| enc.set_rsa_oaep_md(MessageDigest::sha256()))
                .and_then(|()| enc.set_rsa_mgf1_md(MessageDigest::sha256()))
                .and_then(|()| enc.set_rsa_oaep_label(b"IDENTITY\0"))
                .map_err(ossl("RSA-OAEP"))?;
            let mut out = vec![0; enc.encrypt_len(&seed).map_err(ossl("RSA-OAEP"))?];
            let n = enc.encrypt(&seed, &mut out).map_err(ossl("RSA-OAEP"))?;
            out.truncate(n);
            Ok((seed, tpm2b(&out)?))
        }
        EkKey::Ecc { key, x: ek_x } => {
            let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).map_err(ossl("P-256"))?;
            let eph = EcKey::generate(&group).map_err(ossl("ephemeral key"))?;
            let mut ctx = openssl::bn::BigNumContext::new().map_err(ossl("ephemeral key"))?;
            let (mut ex, mut ey) = (
                openssl::bn::BigNum::new().map_err(ossl("ephemeral key"))?,
                openssl::bn::BigNum::new().map_err(ossl("ephemeral key"))?,
            );
            eph.public_key()
                .affine_coordinates(&group, &mut ex, &mut ey, &mut ctx)
                .map_err(ossl("ephemeral key"))?;
            let ex = ex.to_vec_padded(32).map_err(ossl("ephemeral key"))?;
            let ey = ey.to_vec_padded(32).map_err(ossl("ephemeral key"))?;
            let eph = PKey::from_ec_key(eph).map_err(ossl("ephemeral key"))?;
            let mut deriver = Deriver::new(&eph).map_err(ossl("ECDH"))?;
            deriver.set_peer(key).map_err(ossl("ECDH"))?;
            let z = zeroize::Zeroizing::new(deriver.derive_to_vec().map_err(ossl("ECDH"))?);
            let seed = kdfe(&z, "IDENTITY", &ex, ek_x, (DIGEST_LEN * 8) as u32);
            let mut point = tpm2b(&ex)?;
            point.extend(tpm2b(&ey)?);
            Ok((seed, tpm2b(&point)?))
        }
    }
}

/// TPM2_MakeCredential: protects `secret` (1 to 32 bytes) so that only the TPM holding the EK of
/// `ek_public_area`, with an object named `ak_name` loaded, can release it.
pub fn make_credential(
    ek_public_area: &PublicArea,
    ak_name: &[u8],
    secret: &[u8],
) -> Result<CredentialChallenge, String> {
    if secret.is_empty() || secret.len() > DIGEST_LEN {
        return Err(format!(
            "the secret is {} bytes; it must be 1 to {DIGEST_LEN}",
            secret.len()
        ));
    }
    let (ek, aes_key_len) = ek_public_area.ek_key()?;
    let (seed, encrypted_secret) = seed_for(&ek)?;
    let seed = zeroize::Zeroizing::new(seed);
    let sym_key = zeroize::Zeroizing::new(kdfa(
        &seed,
        "STORAGE",
        ak_name,
        &[],
        (aes_key_len * 8) as u32,
    )?);
    let cipher = match aes_key_len {
        16 => Cipher::aes_128_cfb128(),
        _ => Cipher::aes_256_cfb128(),
    };
    let plain = zeroize::Zeroizing::new(tpm2b(secret)?);
    let enc_identity =
        encrypt(cipher, &sym_key, Some(&[0u8; 16]), &plain).map_err(ossl("AES-CFB"))?;
    let hmac_key =
        zeroize::Zeroizing::new(kdfa(&seed, "INTEGRITY", &[], &[], (DIGEST_LEN * 8) as u32)?);
    let integrity = hmac_sha256(&hmac_key, &[&enc_identity, ak_name])?;
    let mut id_object = tpm2b(&integrity)?;
    id_object.extend_from_slice(&enc_identity);
    Ok(CredentialChallenge {
        credential_blob: tpm2b(&id_object)?,
        encrypted_secret,
    })
}

/// Splits what `tpm2_makecredential` writes (an 8-byte header `badcc0de 00000001`, then the
/// `TPM2B_ID_OBJECT` and the `TPM2B_ENCRYPTED_SECRET`) and checks that each structure is
/// well-formed: sizes that add up, an integrity HMAC of 32 bytes, a non-empty encrypted identity.
pub fn parse_tpm2_tools_credential(file: &[u8]) -> Result<CredentialChallenge, String> {
    let body = file
        .strip_prefix(&[0xba, 0xdc, 0xc0, 0xde, 0, 0, 0, 1][..])
        .ok_or("the file does not start with the header badcc0de 00000001")?;
    let (credential_blob, rest) = split_tpm2b(body, "TPM2B_ID_OBJECT")?;
    let (encrypted_secret, rest) = split_tpm2b(rest, "TPM2B_ENCRYPTED_SECRET")?;
    if !rest.is_empty() {
        return Err(format!("{} bytes follow the encrypted secret", rest.len()));
    }
    let (integrity, enc_identity) = split_tpm2b(&credential_blob[2..], "the integrity HMAC")?;
    if integrity.len() != 2 + DIGEST_LEN {
        return Err(format!(
            "the integrity HMAC is {} bytes, not {DIGEST_LEN}",
            integrity.len() - 2
        ));
    }
    if enc_identity.len() < 3 {
        return Err("the encrypted identity is shorter than a TPM2B".into());
    }
    if encrypted_secret.len() <= 2 {
        return Err("the encrypted secret is empty".into());
    }
    Ok(CredentialChallenge {
        credential_blob,
        encrypted_secret,
    })
}

/// One `TPM2B` (size prefix included) and what follows it.
fn split_tpm2b<'a>(bytes: &'a [u8], what: &str) -> Result<(Vec<u8>, &'a [u8]), String> {
    if bytes.len() < 2 {
        return Err(format!("{what}: no room for the size"));
    }
    let size = u16::from_be_bytes([bytes[0], bytes[1]]) as usize;
    if bytes.len() < 2 + size {
        return Err(format!(
            "{what}: the size says {size} bytes, {} are there",
            bytes.len() - 2
        ));
    }
    Ok((bytes[..2 + size].to_vec(), &bytes[2 + size..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kdfa_lengths_and_determinism() {
        let a = kdfa(b"key", "STORAGE", b"name", &[], 128).unwrap();
        assert_eq!(a.len(), 16);
        assert_eq!(a, kdfa(b"key", "STORAGE", b"name", &[], 128).unwrap());
        // The first block is the whole HMAC output truncated, with `bits` in the input.
        let b = kdfa(b"key", "STORAGE", b"name", &[], 256).unwrap();
        assert_ne!(a[..], b[..16]);
        assert_eq!(kdfa(b"key", "INTEGRITY", &[], &[], 520).unwrap().len(), 65);
    }

    #[test]
    fn kdfe_first_block_is_the_hash_of_its_inputs() {
        let out = kdfe(b"zz", "IDENTITY", b"u", b"v", 256);
        assert_eq!(out, sha256(b"\0\0\0\x01zzIDENTITY\0uv").to_vec());
    }

    #[test]
    fn tpm2_tools_file_refused_when_malformed() {
        assert!(parse_tpm2_tools_credential(b"nothead!").is_err());
        let mut f = vec![0xba, 0xdc, 0xc0, 0xde, 0, 0, 0, 1, 0, 9, 0, 32];
        f.extend_from_slice(&[0; 3]);
        let e = parse_tpm2_tools_credential(&f).unwrap_err();
        assert!(e.contains("TPM2B_ID_OBJECT"), "{e}");
    }
}
