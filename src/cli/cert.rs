//! `devicekey cert`: a self-signed certificate or a CSR for a token key, signed by the token, and
//! certificate import.
//!
//! The certificate is built with `x509-cert` and its to-be-signed bytes are signed by the module
//! (`C_Sign` with `CKM_ECDSA_SHA256`, or `CKM_ECDSA` over a SHA-256 digest on tokens without it);
//! the raw `r‖s` becomes a DER signature. Every signature is verified with the token's public key
//! before it is used, so a broken token cannot produce a certificate that does not verify. An
//! imported certificate must carry the key's public key; it is stored with the key's CKA_ID and
//! label, with CKA_SUBJECT, CKA_ISSUER and CKA_SERIAL_NUMBER filled in (NSS reads them).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, CertificateType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use der::asn1::{Ia5String, OctetString};
use der::oid::db::rfc5280::{ID_KP_CLIENT_AUTH, ID_KP_SERVER_AUTH};
use der::{Decode, DecodePem, Encode, EncodePem};
use p256::ecdsa::signature::{self, Keypair, Verifier};
use p256::ecdsa::{DerSignature, Signature, VerifyingKey};
use sha2::{Digest, Sha256};
use spki::{AlgorithmIdentifierOwned, DynSignatureAlgorithmIdentifier, SubjectPublicKeyInfoOwned};
use x509_cert::builder::{Builder, CertificateBuilder, Profile, RequestBuilder};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{ExtendedKeyUsage, SubjectAltName};
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::{Time, Validity};
use x509_cert::Certificate;

use super::uri::{object_uri, KeyArgs, ObjectKind};
use super::{hex, objects_with_id, read_bytes, token_error, KeyRef, Module, Result, ToolError};

/// ecdsa-with-SHA256 (1.2.840.10045.4.3.2).
const ECDSA_WITH_SHA256: der::oid::ObjectIdentifier =
    der::oid::ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");

fn cert_err(what: &str, e: impl std::fmt::Display) -> ToolError {
    ToolError::Certificate(format!("{what}: {e}"))
}

/// The public key of a token key, from the public key object with the same CKA_ID.
pub fn token_public_key(session: &Session, key: &KeyRef) -> Result<VerifyingKey> {
    let handles = if key.id.is_empty() {
        Vec::new()
    } else {
        objects_with_id(session, ObjectClass::PUBLIC_KEY, &key.id)?
    };
    let Some(&public) = handles.first() else {
        return Err(ToolError::KeyNotFound(format!(
            "the public key with id {} on token {:?}",
            hex(&key.id),
            key.token.label
        )));
    };
    let point = read_bytes(session, public, AttributeType::EcPoint)?.ok_or_else(|| {
        ToolError::Token("the public key has no CKA_EC_POINT (not an EC key?)".into())
    })?;
    let sec1 = if point.len() == 65 && point[0] == 0x04 {
        point
    } else {
        OctetString::from_der(&point)
            .map_err(|e| cert_err("CKA_EC_POINT is not a DER OCTET STRING", e))?
            .into_bytes()
    };
    VerifyingKey::from_sec1_bytes(&sec1).map_err(|e| cert_err("not a P-256 public key", e))
}

/// A signer whose private half is a token key: every signature is a `C_Sign`.
pub struct TokenSigner<'a> {
    session: &'a Session,
    key: ObjectHandle,
    public: VerifyingKey,
}

impl std::fmt::Debug for TokenSigner<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner")
            .field("key", &self.key)
            .finish()
    }
}

impl<'a> TokenSigner<'a> {
    /// A signer for the private key `key` whose public key is `public`.
    pub fn new(session: &'a Session, key: ObjectHandle, public: VerifyingKey) -> Self {
        Self {
            session,
            key,
            public,
        }
    }

    /// Signs `msg` on the token (ECDSA with SHA-256) and checks the signature; raw `r‖s` in.
    pub fn sign_checked(&self, msg: &[u8]) -> Result<Signature> {
        let raw = match self.session.sign(&Mechanism::EcdsaSha256, self.key, msg) {
            Ok(raw) => raw,
            Err(CkError::Pkcs11(RvError::MechanismInvalid, _)) => self
                .session
                .sign(&Mechanism::Ecdsa, self.key, &Sha256::digest(msg))
                .map_err(sign_error)?,
            Err(e) => return Err(sign_error(e)),
        };
        let sig = Signature::from_slice(&raw).map_err(|e| {
            ToolError::Token(format!(
                "C_Sign returned {} bytes that are not a P-256 r||s signature: {e}",
                raw.len()
            ))
        })?;
        self.public.verify(msg, &sig).map_err(|_| {
            ToolError::Token(
                "the token's signature does not verify with its public key (wrong key or broken token)"
                    .into(),
            )
        })?;
        Ok(sig)
    }
}

fn sign_error(e: CkError) -> ToolError {
    match e {
        CkError::Pkcs11(RvError::KeyFunctionNotPermitted, _) => ToolError::Token(
            "the token refuses to sign with this key (a proof-only key signs only device-key proofs; make a general key)"
                .into(),
        ),
        e => token_error("signing on the token", e),
    }
}

impl Keypair for TokenSigner<'_> {
    type VerifyingKey = VerifyingKey;

    fn verifying_key(&self) -> VerifyingKey {
        self.public
    }
}

impl DynSignatureAlgorithmIdentifier for TokenSigner<'_> {
    fn signature_algorithm_identifier(&self) -> spki::Result<AlgorithmIdentifierOwned> {
        Ok(AlgorithmIdentifierOwned {
            oid: ECDSA_WITH_SHA256,
            parameters: None,
        })
    }
}

impl signature::Signer<DerSignature> for TokenSigner<'_> {
    fn try_sign(&self, msg: &[u8]) -> std::result::Result<DerSignature, signature::Error> {
        self.sign_checked(msg)
            .map(|s| s.to_der())
            .map_err(signature::Error::from_source)
    }
}

/// What goes into a certificate or request, as `devicekey cert` takes it.
#[derive(clap::Args, Debug)]
pub struct CertOptions {
    /// The subject, RFC 4514 (default: CN=<key label>).
    #[arg(long)]
    pub subject: Option<String>,
    /// Days the certificate is valid.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
    /// A subjectAltName DNS name (repeatable).
    #[arg(long = "dns")]
    pub dns: Vec<String>,
    /// A subjectAltName IP address (repeatable).
    #[arg(long = "ip")]
    pub ips: Vec<IpAddr>,
}

fn extensions(opts: &CertOptions) -> Result<(ExtendedKeyUsage, Option<SubjectAltName>)> {
    let eku = ExtendedKeyUsage(vec![ID_KP_CLIENT_AUTH, ID_KP_SERVER_AUTH]);
    let mut names = Vec::new();
    for d in &opts.dns {
        names.push(GeneralName::DnsName(
            Ia5String::new(d).map_err(|e| cert_err(&format!("DNS name {d:?}"), e))?,
        ));
    }
    for ip in &opts.ips {
        names.push(GeneralName::from(*ip));
    }
    Ok((eku, (!names.is_empty()).then_some(SubjectAltName(names))))
}

/// Adds extendedKeyUsage and, when there are names, subjectAltName to a certificate or request
/// builder (the two builders' `add_extension` belong to no shared trait).
macro_rules! add_extensions {
    ($builder:ident, $opts:expr) => {{
        let (eku, san) = extensions($opts)?;
        $builder
            .add_extension(&eku)
            .map_err(|e| cert_err("extendedKeyUsage", e))?;
        if let Some(san) = san {
            $builder
                .add_extension(&san)
                .map_err(|e| cert_err("subjectAltName", e))?;
        }
    }};
}

fn parse_subject(subject: &str) -> Result<Name> {
    Name::from_str(subject).map_err(|e| {
        ToolError::Usage(format!(
            "subject {subject:?} is not an RFC 4514 name (like CN=alice,O=Example): {e}"
        ))
    })
}

/// A self-signed certificate (DER) for the key, signed by the token. It is a leaf certificate
/// (CA:FALSE; digitalSignature; clientAuth and serverAuth) that is its own issuer. `subject`
/// is RFC 4514 (`CN=alice,O=Example`); `opts.subject` is not read.
pub fn self_signed(signer: &TokenSigner<'_>, subject: &str, opts: &CertOptions) -> Result<Vec<u8>> {
    let subject = parse_subject(subject)?;
    let mut serial = [0u8; 16];
    getrandom::getrandom(&mut serial).map_err(|e| cert_err("no randomness for the serial", e))?;
    serial[0] = (serial[0] & 0x7f) | 0x40;
    let serial = SerialNumber::new(&serial).map_err(|e| cert_err("serial number", e))?;
    let now = SystemTime::now();
    let not_before = now - Duration::from_secs(3600);
    let not_after = now + Duration::from_secs(u64::from(opts.days.max(1)) * 86_400);
    let validity = Validity {
        not_before: Time::try_from(not_before).map_err(|e| cert_err("validity", e))?,
        not_after: Time::try_from(not_after).map_err(|e| cert_err("validity", e))?,
    };
    let spki = SubjectPublicKeyInfoOwned::from_key(signer.public)
        .map_err(|e| cert_err("public key", e))?;
    let profile = Profile::Leaf {
        issuer: subject.clone(),
        enable_key_agreement: false,
        enable_key_encipherment: false,
    };
    let mut builder = CertificateBuilder::new(profile, serial, validity, subject, spki, signer)
        .map_err(|e| cert_err("building the certificate", e))?;
    add_extensions!(builder, opts);
    let cert = builder
        .build::<DerSignature>()
        .map_err(|e| cert_err("signing the certificate", e))?;
    cert.to_der().map_err(|e| cert_err("encoding", e))
}

/// A PKCS#10 certificate request (DER) for the key, signed by the token; `subject` as for
/// [`self_signed`].
pub fn request(signer: &TokenSigner<'_>, subject: &str, opts: &CertOptions) -> Result<Vec<u8>> {
    let subject = parse_subject(subject)?;
    let mut builder =
        RequestBuilder::new(subject, signer).map_err(|e| cert_err("building the request", e))?;
    add_extensions!(builder, opts);
    let req = builder
        .build::<DerSignature>()
        .map_err(|e| cert_err("signing the request", e))?;
    req.to_der().map_err(|e| cert_err("encoding", e))
}

/// A certificate from PEM or DER bytes.
pub fn parse_certificate(bytes: &[u8]) -> Result<Certificate> {
    if bytes.starts_with(b"-----") || bytes.iter().take(64).any(|b| *b == b'-') {
        let text = std::str::from_utf8(bytes).map_err(|e| cert_err("PEM", e))?;
        let start = text
            .find("-----BEGIN CERTIFICATE-----")
            .ok_or_else(|| ToolError::Certificate("no CERTIFICATE in the PEM".into()))?;
        Certificate::from_pem(&text.as_bytes()[start..]).map_err(|e| cert_err("PEM", e))
    } else {
        Certificate::from_der(bytes).map_err(|e| cert_err("DER", e))
    }
}

/// What [`import_certificate`] did.
#[derive(Clone, Debug)]
pub struct Imported {
    /// The new certificate object.
    pub handle: ObjectHandle,
    /// How many older certificates with the same CKA_ID it replaced.
    pub replaced: usize,
}

/// Stores `cert_der` on the token next to `key` (same CKA_ID), replacing any certificate with
/// that CKA_ID. The certificate must carry the key's public key.
pub fn import_certificate(
    session: &Session,
    key: &KeyRef,
    public: &VerifyingKey,
    cert_der: &[u8],
    label: Option<&str>,
) -> Result<Imported> {
    let cert = Certificate::from_der(cert_der).map_err(|e| cert_err("certificate", e))?;
    let tbs = &cert.tbs_certificate;
    let ours =
        SubjectPublicKeyInfoOwned::from_key(*public).map_err(|e| cert_err("public key", e))?;
    if tbs.subject_public_key_info != ours {
        return Err(ToolError::Certificate(format!(
            "the certificate is not for this key (its public key differs from key {} on token {:?})",
            hex(&key.id),
            key.token.label
        )));
    }
    if key.id.is_empty() {
        return Err(ToolError::Usage(
            "the key has no CKA_ID; a certificate could not be matched to it".into(),
        ));
    }
    let subject = tbs.subject.to_der().map_err(|e| cert_err("subject", e))?;
    let issuer = tbs.issuer.to_der().map_err(|e| cert_err("issuer", e))?;
    let serial = tbs
        .serial_number
        .to_der()
        .map_err(|e| cert_err("serial number", e))?;
    let old = objects_with_id(session, ObjectClass::CERTIFICATE, &key.id)?;
    let mut template = vec![
        Attribute::Class(ObjectClass::CERTIFICATE),
        Attribute::CertificateType(CertificateType::X_509),
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Id(key.id.clone()),
        Attribute::Subject(subject),
        Attribute::Issuer(issuer),
        Attribute::SerialNumber(serial),
        Attribute::Value(cert_der.to_vec()),
    ];
    if let Some(label) = label.or(key.label.as_deref()) {
        template.push(Attribute::Label(label.as_bytes().to_vec()));
    }
    let handle = session
        .create_object(&template)
        .map_err(|e| token_error("storing the certificate (C_CreateObject)", e))?;
    for h in &old {
        session
            .destroy_object(*h)
            .map_err(|e| token_error("removing the old certificate", e))?;
    }
    Ok(Imported {
        handle,
        replaced: old.len(),
    })
}

/// `devicekey cert`: a self-signed certificate (stored on the token) or a CSR for a key, signed
/// through the module; or import a certificate a CA issued.
#[derive(clap::Args, Debug)]
pub struct CertArgs {
    /// The module, the key (`--id` or `--label` required) and the PIN.
    #[command(flatten)]
    pub key: KeyArgs,
    /// What goes into the certificate or request.
    #[command(flatten)]
    pub cert: CertOptions,
    /// Make a certificate request (PKCS#10) instead; nothing is stored on the token.
    #[arg(long, conflicts_with_all = ["import", "no_import"])]
    pub csr: bool,
    /// Store this certificate (PEM or DER, e.g. issued for a CSR) instead of making one.
    #[arg(long, value_name = "FILE")]
    pub import: Option<PathBuf>,
    /// Make the self-signed certificate but do not store it on the token.
    #[arg(long)]
    pub no_import: bool,
    /// Write the PEM here instead of stdout.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// CKA_LABEL of the stored certificate (default: the key's label).
    #[arg(long)]
    pub cert_label: Option<String>,
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|source| ToolError::Io {
        path: path.to_owned(),
        source,
    })
}

fn pem(label: &str, der: &[u8]) -> Result<String> {
    let text = match label {
        "CERTIFICATE" => Certificate::from_der(der)
            .and_then(|c| c.to_pem(der::pem::LineEnding::LF))
            .map_err(|e| cert_err("PEM", e))?,
        _ => x509_cert::request::CertReq::from_der(der)
            .and_then(|c| c.to_pem(der::pem::LineEnding::LF))
            .map_err(|e| cert_err("PEM", e))?,
    };
    Ok(text)
}

impl CertArgs {
    /// Runs the command; returns the text to print (the PEM, or a summary when `--out` is set).
    pub fn run(self) -> Result<String> {
        if self.key.id.is_none() && self.key.label.is_none() {
            return Err(ToolError::Usage(
                "choose the key with --id HEX or --label LABEL (`devicekey uri` lists them)".into(),
            ));
        }
        let sel = self.key.selector()?;
        let pin = self.key.pin()?;
        let path = self.key.module_path();
        let module = Module::open(&path)?;
        let (key, session) = module.find_one_key(&sel, pin.as_deref())?;
        let public = token_public_key(&session, &key)?;
        let signer = TokenSigner::new(&session, key.private, public);
        let opts = &self.cert;
        let subject = opts
            .subject
            .clone()
            .unwrap_or_else(|| format!("CN={}", key.label.as_deref().unwrap_or("devicekey")));

        let (text, what) = if self.csr {
            (
                pem("CERTIFICATE REQUEST", &request(&signer, &subject, opts)?)?,
                "certificate request",
            )
        } else {
            let der = match &self.import {
                Some(file) => {
                    let bytes = std::fs::read(file).map_err(|source| ToolError::Io {
                        path: file.clone(),
                        source,
                    })?;
                    parse_certificate(&bytes)?
                        .to_der()
                        .map_err(|e| cert_err("certificate", e))?
                }
                None => self_signed(&signer, &subject, opts)?,
            };
            if !self.no_import {
                import_certificate(&session, &key, &public, &der, self.cert_label.as_deref())?;
            }
            (pem("CERTIFICATE", &der)?, "certificate")
        };

        match &self.out {
            None => Ok(text.trim_end().to_string()),
            Some(file) => {
                write_file(file, &text)?;
                let mut summary = format!(
                    "{what} for key {} on token {:?} written to {}",
                    hex(&key.id),
                    key.token.label,
                    file.display()
                );
                if !self.csr && !self.no_import {
                    summary.push_str(&format!(
                        "\nstored on the token as {}",
                        object_uri(
                            &key.token,
                            &key.id,
                            self.cert_label.as_deref().or(key.label.as_deref()),
                            ObjectKind::Cert,
                            false
                        )
                    ));
                }
                Ok(summary)
            }
        }
    }
}
