//! Check 1's certificate work: the EK certificate chains to a root the relying party trusts,
//! and holds the key of `ekPublicArea`.
//!
//! EK certificates are not web-PKI leaves: they have no TLS key usage, an often empty subject
//! with a critical subjectAltName in the TCG form, and a TCG extended key usage
//! (2.23.133.8.1). The chain is therefore verified with no purpose set (OpenSSL then checks
//! signatures, validity periods and the CA flags of the issuers, but applies no leaf usage
//! rules). Unknown critical extensions still fail the chain: a root that issues them must be
//! dealt with deliberately, not by ignoring criticality for everyone.

use std::path::Path;

use openssl::stack::Stack;
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::{X509StoreContext, X509};

use super::public_area::PublicArea;
use super::{exactly_one, AttestError, Result};

/// The relying party's trust: EK roots, plus intermediates it accepts that the TPM may not hold.
#[derive(Clone, Default)]
pub struct TrustAnchors {
    /// Trusted roots (TPM manufacturers' CAs; swtpm's local CA in tests).
    pub roots: Vec<X509>,
    /// Intermediate CA certificates to build chains with (not trusted by themselves).
    pub intermediates: Vec<X509>,
}

crate::redact::debug_shows!(TrustAnchors: |t|
    roots = t.roots.len(),
    intermediates = t.intermediates.len(),
);

/// Certificates from a PEM file (one or more) or a single DER certificate.
pub fn load_certificates(path: &Path) -> Result<Vec<X509>> {
    let bytes =
        std::fs::read(path).map_err(|e| AttestError::Input(format!("{}: {e}", path.display())))?;
    let certs = if bytes.starts_with(b"-----") || bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        X509::stack_from_pem(&bytes)
    } else {
        X509::from_der(&bytes).map(|c| vec![c])
    }
    .map_err(|e| AttestError::Input(format!("{}: not certificates: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(AttestError::Input(format!(
            "{}: holds no certificate",
            path.display()
        )));
    }
    Ok(certs)
}

impl TrustAnchors {
    /// Anchors from PEM (or DER) files of roots and of intermediates.
    pub fn from_files(roots: &[&Path], intermediates: &[&Path]) -> Result<Self> {
        let mut anchors = TrustAnchors::default();
        for p in roots {
            anchors.roots.extend(load_certificates(p)?);
        }
        for p in intermediates {
            anchors.intermediates.extend(load_certificates(p)?);
        }
        if anchors.roots.is_empty() {
            return Err(AttestError::Input("no trusted root given".into()));
        }
        Ok(anchors)
    }
}

fn subject(cert: &X509) -> String {
    let parts: Vec<String> = cert
        .subject_name()
        .entries()
        .map(|e| {
            let key = e.object().nid().short_name().unwrap_or("?");
            let value = String::from_utf8_lossy(e.data().as_slice());
            format!("{key}={value}")
        })
        .collect();
    if parts.is_empty() {
        "(empty subject)".into()
    } else {
        parts.join(", ")
    }
}

/// One certificate that is exactly its DER: no padding or other bytes after it (the contract
/// wants the exact DER, not the NV index's content).
fn exact_der(der: &[u8], what: &str) -> std::result::Result<X509, String> {
    let cert = X509::from_der(der).map_err(|e| format!("{what} is not DER X.509: {e}"))?;
    exactly_one("DER certificate", der, cert.to_der()).map_err(|e| format!("{what}: {e}"))?;
    Ok(cert)
}

/// Verifies `certs` (the EK certificate first, then chain certificates from the device) against
/// `anchors`, and compares the EK certificate's key with `ek`'s. Returns the chain it built, as
/// subjects from the EK certificate to the root.
pub fn verify_ek_certificate(
    certs: &[Vec<u8>],
    anchors: &TrustAnchors,
    ek: &PublicArea,
) -> std::result::Result<Vec<String>, String> {
    let (leaf_der, rest) = certs.split_first().ok_or("no EK certificate was sent")?;
    let leaf = exact_der(leaf_der, "the EK certificate")?;
    let ek_key = ek.ek_pkey().map_err(|e| format!("ekPublicArea: {e}"))?;
    let cert_key = leaf
        .public_key()
        .map_err(|e| format!("the EK certificate's key cannot be read: {e}"))?;
    if !cert_key.public_eq(&ek_key) {
        return Err("the EK certificate's public key is not ekPublicArea's key".into());
    }
    let ossl = |e: openssl::error::ErrorStack| format!("OpenSSL: {e}");
    let mut store = X509StoreBuilder::new().map_err(ossl)?;
    for root in &anchors.roots {
        store.add_cert(root.clone()).map_err(ossl)?;
    }
    let store = store.build();
    let mut chain = Stack::new().map_err(ossl)?;
    for (i, der) in rest.iter().enumerate() {
        let cert = exact_der(der, &format!("ekCertificates[{}]", i + 1))?;
        chain.push(cert).map_err(ossl)?;
    }
    for cert in &anchors.intermediates {
        chain.push(cert.clone()).map_err(ossl)?;
    }
    let mut ctx = X509StoreContext::new().map_err(ossl)?;
    ctx.init(&store, &leaf, &chain, |c| {
        if c.verify_cert()? {
            let built = c
                .chain()
                .map(|s| s.iter().map(|x| subject(&x.to_owned())).collect())
                .unwrap_or_default();
            Ok(Ok(built))
        } else {
            Ok(Err(format!(
                "the EK certificate does not chain to a trusted root: {} (at depth {})",
                c.error().error_string(),
                c.error_depth()
            )))
        }
    })
    .map_err(ossl)?
}
