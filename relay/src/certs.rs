//! Certificates: load the server's PEM files into a rustls configuration, and generate a
//! development CA and server certificate (`hatch-relay dev`, tests, the load test).
//!
//! Every rustls configuration in Hatch names the ring provider explicitly, so that no feature
//! unification elsewhere in the dependency tree can change which crypto is used.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

/// The crypto provider of every rustls configuration in Hatch.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The crypto provider of the relay's listeners: [`provider`] with the SHA-256 cipher suites
/// first (TLS 1.3: AES-128-GCM, ChaCha20-Poly1305, then AES-256-GCM-SHA384).
///
/// rustls lists AES-256-GCM-SHA384 first, and a TLS 1.3 handshake's key schedule is a dozen
/// HKDF-HMAC runs of the suite's hash: SHA-384 is SHA-512 in software here, while SHA-256 has
/// CPU instructions (SHA-NI) on current x86 and ARM servers. A profile of session setup showed
/// SHA-512 as 17 % of the relay's handshake CPU. AES-128-GCM is TLS 1.3's mandatory suite.
pub fn server_provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    // Stable: within each group the provider's own order stays.
    p.cipher_suites.sort_by_key(|s| {
        let hash = match s {
            rustls::SupportedCipherSuite::Tls13(t) => t.common.hash_provider.algorithm(),
            rustls::SupportedCipherSuite::Tls12(t) => t.common.hash_provider.algorithm(),
        };
        hash != rustls::crypto::hash::HashAlgorithm::SHA256
    });
    Arc::new(p)
}

/// Reads a certificate chain and its private key from PEM files.
pub fn load_pem(
    cert: &Path,
    key: &Path,
) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading certificate file {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificate file {}", cert.display()))?;
    anyhow::ensure!(!chain.is_empty(), "no certificate in {}", cert.display());
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading private key file {}", key.display()))?;
    Ok((chain, key))
}

/// A TLS 1.3 + 1.2 server configuration from PEM files, with the given ALPN protocols,
/// stateless session tickets, and the server's cipher suite order ([`server_provider`]).
///
/// The relay serves one such configuration on both listeners, so a ticket from either resumes
/// on either: a `hatch` client's data leg resumes the session of its API call, and an agent's
/// data leg the session of its control channel or previous leg. A resumed handshake skips the
/// certificate (no signature here, no chain verification on the peer). The tickets are
/// encrypted with a key the ticketer rotates every 6 hours (the previous one still accepted),
/// so no server memory is spent on them and a ticket does not expire because other clients
/// connected meanwhile, as it does in rustls's default 256-entry session cache. A new
/// configuration (a certificate reload) has a new ticketer: tickets from before it are refused
/// and those clients do a full handshake with the new certificate.
pub fn server_config(
    cert: &Path,
    key: &Path,
    alpn: &[&[u8]],
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let (chain, key) = load_pem(cert, key)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(server_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("certificate and key do not match")?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // The suite is the server's choice (rustls clients list AES-256 first).
    cfg.ignore_client_order = true;
    cfg.ticketer = rustls::crypto::ring::Ticketer::new().context("creating the TLS ticketer")?;
    Ok(Arc::new(cfg))
}

/// A client configuration that trusts exactly the CA certificates in `ca_file`.
pub fn client_config_with_ca(ca_file: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file)
        .with_context(|| format!("reading CA file {}", ca_file.display()))?
    {
        roots
            .add(cert.with_context(|| format!("parsing CA file {}", ca_file.display()))?)
            .with_context(|| format!("CA certificate in {} rejected", ca_file.display()))?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Paths of a generated development PKI.
#[derive(Debug, Clone)]
pub struct DevPki {
    /// The CA certificate clients and agents trust.
    pub ca_file: PathBuf,
    /// The server certificate (for `localhost`, `127.0.0.1` and `::1`).
    pub cert_file: PathBuf,
    /// The server's private key (0600).
    pub key_file: PathBuf,
}

/// Generates (or reuses, when all three files exist) a CA and a server certificate for
/// `localhost`, `127.0.0.1`, `::1` and `extra_names` in `dir`.
pub fn ensure_dev_pki(dir: &Path, extra_names: &[String]) -> anyhow::Result<DevPki> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

    let pki = DevPki {
        ca_file: dir.join("ca.pem"),
        cert_file: dir.join("server.pem"),
        key_file: dir.join("server-key.pem"),
    };
    if pki.ca_file.exists() && pki.cert_file.exists() && pki.key_file.exists() {
        owner_only(&pki.key_file, 0o600)?;
        return Ok(pki);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name.push(DnType::CommonName, "Hatch development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    names.extend(extra_names.iter().cloned());
    let server_key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names)?;
    params.distinguished_name.push(DnType::CommonName, "hatch-relay");
    let server_cert = params.signed_by(&server_key, &issuer)?;

    write_private(&pki.key_file, server_key.serialize_pem().as_bytes())?;
    std::fs::write(&pki.cert_file, server_cert.pem())
        .with_context(|| format!("writing {}", pki.cert_file.display()))?;
    std::fs::write(&pki.ca_file, ca_cert.pem())
        .with_context(|| format!("writing {}", pki.ca_file.display()))?;
    Ok(pki)
}

/// Writes a file readable only by its owner (0600), creating or truncating it.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    // The mode above applies to a new file only: an older one may be readable by others.
    owner_only(path, 0o600)?;
    f.write_all(bytes).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Creates a directory (and its parents) accessible only by its owner (0700), or takes group
/// and other access away from one that exists.
pub fn private_dir(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if !path.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .with_context(|| format!("creating {}", path.display()))?;
    }
    owner_only(path, 0o700)
}

/// Takes group and other access away from `path` (a file: 0600, a directory: 0700) when it
/// has any, saying so in the log; a file that does not exist is left alone. A mode that cannot
/// be changed (a read-only file system, another owner) is a warning: what the relay then fails
/// to read or write says so in its own words.
pub fn owner_only(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(path) else { return Ok(()) };
    let old = meta.permissions().mode() & 0o7777;
    if old & 0o077 != 0 {
        let (from, to) = (format!("{old:o}"), format!("{mode:o}"));
        match std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
            Ok(()) => tracing::info!(path = %path.display(), from, to,
                "took group and other access away"),
            Err(e) => tracing::warn!(path = %path.display(), from, to, err = %e,
                "could not take group and other access away"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_pki_loads_as_server_and_client_config() {
        let dir = tempfile::tempdir().unwrap();
        let pki = ensure_dev_pki(dir.path(), &[]).unwrap();
        server_config(&pki.cert_file, &pki.key_file, &[b"http/1.1"]).unwrap();
        client_config_with_ca(&pki.ca_file).unwrap();
        let mode = std::fs::metadata(&pki.key_file).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
    }

    #[tokio::test]
    async fn server_picks_aes128_sha256_over_a_client_preferring_aes256() {
        let dir = tempfile::tempdir().unwrap();
        let pki = ensure_dev_pki(dir.path(), &[]).unwrap();
        let server = tokio_rustls::TlsAcceptor::from(
            server_config(&pki.cert_file, &pki.key_file, &[]).unwrap(),
        );
        // The client's own order: rustls's default, AES-256-GCM-SHA384 first.
        let client = client_config_with_ca(&pki.ca_file).unwrap();
        assert_eq!(
            client.crypto_provider().cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            server.accept(tcp).await.unwrap()
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(client).connect(name, tcp).await.unwrap();
        let suite = tls.get_ref().1.negotiated_cipher_suite().unwrap().suite();
        assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        drop(accept.await.unwrap());
    }

    #[test]
    fn missing_files_name_the_file() {
        let err =
            server_config(Path::new("/nonexistent/c.pem"), Path::new("/nonexistent/k.pem"), &[])
                .unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/c.pem"), "{err:#}");
    }
}
