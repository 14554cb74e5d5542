//! TLS for both of the agent's outbound connections (register, control channel, data legs).
//!
//! The relay's certificate is verified against the CA saved at registration, or the system's
//! CA bundle when none was given. The only way around verification is the
//! `--danger-accept-invalid-certs` flag, which still checks handshake signatures (so the peer
//! holds the key of the certificate it shows) but trusts any certificate.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use thiserror::Error;

/// System CA bundles tried, in order, when no CA was configured (Debian/Ubuntu/Alpine first,
/// then Fedora/RHEL). `SSL_CERT_FILE` wins over all of them.
const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// Why a TLS configuration could not be built.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The CA PEM held no certificate or one rustls rejects.
    #[error("CA certificates: {0}")]
    BadCa(String),
    /// No CA was configured and no system bundle was found.
    #[error("no CA configured (--ca) and no system CA bundle found in {SYSTEM_CA_BUNDLES:?}")]
    NoSystemBundle,
    /// rustls refused the configuration.
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The crypto provider of every rustls configuration of the agent (ring; never aws-lc-rs).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses every certificate of a PEM bundle; fails when there is none.
pub fn parse_ca_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCa(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::BadCa("no certificate in the PEM data".into()));
    }
    Ok(certs)
}

/// The PEM text of the system CA bundle.
fn system_bundle() -> Result<String, TlsError> {
    let env = std::env::var("SSL_CERT_FILE").ok();
    let candidates = env.iter().map(String::as_str).chain(SYSTEM_CA_BUNDLES.iter().copied());
    for path in candidates {
        if let Ok(pem) = std::fs::read_to_string(Path::new(path)) {
            return Ok(pem);
        }
    }
    Err(TlsError::NoSystemBundle)
}

/// A client configuration trusting `ca_pem` (or the system bundle), TLS 1.3 and 1.2, ring.
/// With `danger_accept_invalid_certs` any server certificate is accepted.
pub fn client_config(
    ca_pem: Option<&str>,
    danger_accept_invalid_certs: bool,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let cfg = if danger_accept_invalid_certs {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider())))
            .with_no_client_auth()
    } else {
        let pem = match ca_pem {
            Some(p) => p.to_owned(),
            None => system_bundle()?,
        };
        let mut roots = rustls::RootCertStore::empty();
        let (added, _ignored) = roots.add_parsable_certificates(parse_ca_pem(&pem)?);
        if added == 0 {
            return Err(TlsError::BadCa("no usable CA certificate".into()));
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    Ok(Arc::new(cfg))
}

/// Accepts any server certificate; still verifies handshake signatures with the provider.
#[derive(Debug)]
struct AcceptAnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_ca_is_refused_with_words() {
        let err = client_config(Some("not a pem"), false).unwrap_err();
        assert!(err.to_string().contains("no certificate"), "{err}");
    }
}
