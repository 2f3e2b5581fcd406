//! Certificates and TLS: loading PEM files, making dev certificates with rcgen, and building the
//! rustls configurations (TLS 1.3 only, ring provider, ALPN `sfc/1`) that quinn runs on.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::protocol::ALPN;

/// File name of the dev CA certificate that clients trust (`--ca`).
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the server certificate chain.
pub const SERVER_CERT_FILE: &str = "server.crt";
/// File name of the server's private key.
pub const SERVER_KEY_FILE: &str = "server.key";

/// Names every dev certificate is valid for, so local clients in any language can verify it.
pub const DEV_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Why certificates or TLS configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error (in the message, not a `source()`: see `StoreError`).
        error: std::io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{path}: {reason}")]
    Pem {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rcgen could not make a certificate.
    #[error("cannot generate certificate: {0}")]
    Generate(rcgen::Error),
    /// rustls refused the configuration (for example a key that does not match).
    #[error("TLS configuration rejected: {0}")]
    Rustls(rustls::Error),
    /// quinn refused the rustls configuration.
    #[error("QUIC cannot use this TLS configuration: {0}")]
    Quic(String),
}

impl From<rcgen::Error> for TlsError {
    fn from(error: rcgen::Error) -> Self {
        Self::Generate(error)
    }
}

impl From<rustls::Error> for TlsError {
    fn from(error: rustls::Error) -> Self {
        Self::Rustls(error)
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |error| TlsError::Io {
        path: path.to_owned(),
        error,
    }
}

/// A dev CA and a server certificate signed by it, in PEM.
pub struct DevCertificates {
    /// The CA certificate clients trust.
    pub ca_cert_pem: String,
    /// The server certificate.
    pub server_cert_pem: String,
    /// The server's private key (PKCS#8).
    pub server_key_pem: String,
}

impl std::fmt::Debug for DevCertificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCertificates").finish_non_exhaustive()
    }
}

impl DevCertificates {
    /// Makes a fresh CA (its key is discarded) and a server certificate for [`DEV_NAMES`] plus
    /// `extra_names` (DNS names or IP addresses).
    pub fn generate(extra_names: &[String]) -> Result<Self, TlsError> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca_params.distinguished_name = named("SecureFastChat development CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

        let mut names: Vec<String> = DEV_NAMES.iter().map(|n| (*n).to_owned()).collect();
        for name in extra_names {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name = named("SecureFastChat development server");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca)?;
        Ok(Self {
            ca_cert_pem: ca.pem(),
            server_cert_pem: cert.pem(),
            server_key_pem: key.serialize_pem(),
        })
    }

    /// Writes `ca.crt`, `server.crt` and `server.key` (mode 0600) into `dir`, creating it.
    pub fn write_to(&self, dir: &Path) -> Result<(), TlsError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        write_file(&dir.join(CA_CERT_FILE), &self.ca_cert_pem, false)?;
        write_file(&dir.join(SERVER_CERT_FILE), &self.server_cert_pem, false)?;
        write_file(&dir.join(SERVER_KEY_FILE), &self.server_key_pem, true)?;
        Ok(())
    }
}

fn named(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "SecureFastChat");
    dn
}

/// Writes a file atomically (temp file + rename), private to the owner when `secret`.
fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), TlsError> {
    let tmp = path.with_extension("tmp");
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut file = options.open(&tmp).map_err(io_err(&tmp))?;
    file.write_all(contents.as_bytes()).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// A certificate chain and its private key, ready for rustls.
pub struct ServerIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerIdentity")
            .field("chain_len", &self.chain.len())
            .finish()
    }
}

impl ServerIdentity {
    /// Loads a PEM certificate chain and a PEM private key.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let cert_pem = fs::read(cert).map_err(io_err(cert))?;
        let key_pem = fs::read(key).map_err(io_err(key))?;
        let chain = load_certs_pem(cert, &cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
            path: key.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Self { chain, key })
    }

    /// The identity held by dev certificates in memory.
    pub fn from_dev(dev: &DevCertificates) -> Result<Self, TlsError> {
        let origin = Path::new("<generated>");
        let chain = load_certs_pem(origin, dev.server_cert_pem.as_bytes())?;
        let key = PrivateKeyDer::from_pem_slice(dev.server_key_pem.as_bytes()).map_err(|e| {
            TlsError::Pem {
                path: origin.to_owned(),
                reason: e.to_string(),
            }
        })?;
        Ok(Self { chain, key })
    }
}

fn load_certs_pem(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            reason: "no certificate found".into(),
        });
    }
    Ok(certs)
}

/// Loads the CA certificates a client trusts from a PEM file.
pub fn load_trust_anchors(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = fs::read(path).map_err(io_err(path))?;
    load_certs_pem(path, &pem)
}

/// Loads the dev certificates from `dir`, generating them first if they are missing.
///
/// Returns the identity and whether new certificates were generated.
pub fn ensure_dev_certificates(dir: &Path) -> Result<(ServerIdentity, bool), TlsError> {
    let cert = dir.join(SERVER_CERT_FILE);
    let key = dir.join(SERVER_KEY_FILE);
    if cert.exists() && key.exists() {
        return Ok((ServerIdentity::load(&cert, &key)?, false));
    }
    let dev = DevCertificates::generate(&[])?;
    dev.write_to(dir)?;
    Ok((ServerIdentity::from_dev(&dev)?, true))
}

/// ring with the TLS 1.3 suites in the order we prefer: AES-128-GCM first.
///
/// rustls's default order puts `TLS13_AES_256_GCM_SHA384` first. Its transcript hash and HKDF
/// run SHA-384, which has no hardware instructions on x86: the server spent ≈ 10 % of its
/// handshake CPU in SHA-512 blocks (`perf`, `sfc-bench handshake`). `TLS13_AES_128_GCM_SHA256`
/// hashes with SHA-256 (SHA-NI where present), and its AES has 10 rounds instead of 14 on every
/// packet. QUIC requires it anyway (RFC 9001 §5.3: Initial packets use it). The others stay
/// offered: a server picks by the client's order, so a client without AES instructions may put
/// ChaCha20-Poly1305 first.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite, default_provider};
    let mut provider = default_provider();
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    Arc::new(provider)
}

/// The server's QUIC crypto: TLS 1.3 only, ALPN `sfc/1`, session tickets for fast reconnects.
pub fn server_crypto(identity: ServerIdentity) -> Result<QuicServerConfig, TlsError> {
    QuicServerConfig::try_from(server_tls(identity)?).map_err(|e| TlsError::Quic(e.to_string()))
}

fn server_tls(identity: ServerIdentity) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(identity.chain, identity.key)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    // Stateless tickets let a phone that lost its connection resume TLS without a full
    // handshake; 0-RTT stays off (max_early_data_size = 0) until requests are marked idempotent.
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(config)
}

/// The client's QUIC crypto: TLS 1.3 only, ALPN `sfc/1`, trusting exactly `anchors`.
///
/// With `resumption`, session tickets the server sends are kept (in memory, for this
/// configuration) and a later handshake with the same configuration resumes; without, every
/// handshake is a full one.
pub fn client_crypto(
    anchors: Vec<CertificateDer<'static>>,
    resumption: bool,
) -> Result<QuicClientConfig, TlsError> {
    QuicClientConfig::try_from(client_tls(anchors, resumption)?)
        .map_err(|e| TlsError::Quic(e.to_string()))
}

fn client_tls(
    anchors: Vec<CertificateDer<'static>>,
    resumption: bool,
) -> Result<rustls::ClientConfig, TlsError> {
    client_tls_with(provider(), anchors, resumption)
}

fn client_tls_with(
    provider: Arc<CryptoProvider>,
    anchors: Vec<CertificateDer<'static>>,
    resumption: bool,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    for anchor in anchors {
        roots.add(anchor)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    if !resumption {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a TLS 1.3 handshake in memory between our server configuration and a client
    /// configuration like ours with `client_suites`, and returns the suite they agreed on.
    fn negotiated_suite(client_suites: Vec<rustls::SupportedCipherSuite>) -> rustls::CipherSuite {
        let dev = DevCertificates::generate(&[]).expect("dev certificates");
        let server = server_tls(ServerIdentity::from_dev(&dev).expect("identity")).expect("server");
        let ca = load_certs_pem(Path::new("<ca>"), dev.ca_cert_pem.as_bytes()).expect("ca");
        let mut provider = (*provider()).clone();
        provider.cipher_suites = client_suites;
        let client = client_tls_with(Arc::new(provider), ca, false).expect("client");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let mut client = rustls::ClientConnection::new(Arc::new(client), name).expect("client");
        let mut server = rustls::ServerConnection::new(Arc::new(server)).expect("server");
        let mut wire = Vec::new();
        for _ in 0..10 {
            wire.clear();
            client.write_tls(&mut wire).expect("client writes");
            server.read_tls(&mut wire.as_slice()).expect("server reads");
            server.process_new_packets().expect("server accepts");
            wire.clear();
            server.write_tls(&mut wire).expect("server writes");
            client.read_tls(&mut wire.as_slice()).expect("client reads");
            client.process_new_packets().expect("client accepts");
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
        }
        assert!(!client.is_handshaking() && !server.is_handshaking());
        server.negotiated_cipher_suite().expect("suite").suite()
    }

    #[test]
    fn our_client_and_server_agree_on_aes_128_gcm() {
        let ours = provider().cipher_suites.clone();
        assert_eq!(
            negotiated_suite(ours),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
    }

    #[test]
    fn the_server_follows_the_clients_order() {
        use rustls::crypto::ring::cipher_suite::*;
        // A client without AES instructions puts ChaCha20-Poly1305 first.
        let chacha_first = vec![
            TLS13_CHACHA20_POLY1305_SHA256,
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
        ];
        assert_eq!(
            negotiated_suite(chacha_first),
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        );
        // rustls's default order (aioquic's too) starts with AES-256-GCM.
        let aes_256_first = vec![
            TLS13_AES_256_GCM_SHA384,
            TLS13_AES_128_GCM_SHA256,
            TLS13_CHACHA20_POLY1305_SHA256,
        ];
        assert_eq!(
            negotiated_suite(aes_256_first),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
        );
    }

    #[test]
    fn dev_certificates_round_trip_through_files() {
        let dir = tempfile::tempdir().unwrap();
        let dev = DevCertificates::generate(&["chat.example".into()]).unwrap();
        dev.write_to(dir.path()).unwrap();
        let (identity, generated) = ensure_dev_certificates(dir.path()).unwrap();
        assert!(!generated);
        assert_eq!(identity.chain.len(), 1);
        assert_eq!(
            load_trust_anchors(&dir.path().join(CA_CERT_FILE))
                .unwrap()
                .len(),
            1
        );
        server_crypto(identity).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join(SERVER_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn missing_certificates_are_generated_once() {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        assert!(ensure_dev_certificates(&certs).unwrap().1);
        assert!(!ensure_dev_certificates(&certs).unwrap().1);
    }

    #[test]
    fn an_empty_pem_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.crt");
        fs::write(&path, "").unwrap();
        let err = load_trust_anchors(&path).unwrap_err();
        assert!(err.to_string().contains("no certificate"), "{err}");
    }
}
