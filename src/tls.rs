//! TLS for both sides: the certificate pglease shows to clients, and how it checks the upstream.
//!
//! rustls with the `ring` provider. Channel binding (`tls-server-end-point`, RFC 5929 §4.1) hashes
//! the server's leaf certificate with the hash of its signature algorithm, or SHA-256 when that
//! is MD5 or SHA-1 — the rule libpq and the Postgres server both follow (`be_tls_get_certificate_hash`).

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::Digest;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} holds no {what}")]
    Empty { path: String, what: &'static str },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("certificate {0} cannot be parsed")]
    BadCertificate(String),
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.display().to_string(), source })
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Read { path: path.display().to_string(), source })?;
    if certs.is_empty() {
        return Err(TlsError::Empty { path: path.display().to_string(), what: "PEM certificate" });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|source| TlsError::Read { path: path.display().to_string(), source })?
        .ok_or_else(|| TlsError::Empty { path: path.display().to_string(), what: "PEM private key" })
}

/// The most plaintext pglease puts in one TLS record to a client: what Postgres sends at most
/// (its 8 KiB send buffer goes out in one `SSL_write`).
///
/// NOTE: not a tuning knob. libpq's async API (psycopg 3, ruby-pg; libpq up to at least 18.0)
/// reads once per socket wake-up into the free space of its input buffer, which it keeps at
/// 8 KiB or more; a 16 KiB record leaves the rest decrypted inside OpenSSL while the socket
/// reads as empty, and the client waits forever for bytes it already has. Records no larger
/// than 8 KiB always fit, as they do with Postgres itself. CockroachDB and Supavisor cap their
/// records alike for the same libpq behaviour.
pub const MAX_RECORD_PLAINTEXT: usize = 8192;

/// rustls counts the record header (type, version, length) in `max_fragment_size`.
const TLS_RECORD_HEADER: usize = 5;

/// The client-facing TLS setup, with the channel-binding data of its certificate.
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    /// `tls-server-end-point` channel-binding data for SCRAM-SHA-256-PLUS.
    pub end_point_hash: Vec<u8>,
}

impl ServerTls {
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let certs = load_certs(cert)?;
        let key = load_key(key)?;
        let end_point_hash = end_point_hash(&certs[0]).ok_or_else(|| TlsError::BadCertificate(cert.display().to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        // PG 17 clients using `sslnegotiation=direct` require the "postgresql" ALPN protocol;
        // others send it too, or send nothing, and are served alike.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        config.max_fragment_size = Some(MAX_RECORD_PLAINTEXT + TLS_RECORD_HEADER);
        Ok(Self { config: Arc::new(config), end_point_hash })
    }
}

/// `tls-server-end-point` data of a certificate (RFC 5929 §4.1), or `None` if it cannot be parsed.
pub fn end_point_hash(cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
    use x509_parser::prelude::*;
    let (_, parsed) = X509Certificate::from_der(cert.as_ref()).ok()?;
    let oid = parsed.signature_algorithm.algorithm.to_id_string();
    let hash = match oid.as_str() {
        // sha384WithRSAEncryption, ecdsa-with-SHA384
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => sha2::Sha384::digest(cert.as_ref()).to_vec(),
        // sha512WithRSAEncryption, ecdsa-with-SHA512
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => sha2::Sha512::digest(cert.as_ref()).to_vec(),
        // SHA-256, and MD5/SHA-1 which the RFC maps to SHA-256. Ed25519 has no defined binding;
        // Postgres refuses it, and so will the SCRAM exchange when the hashes differ.
        _ => sha2::Sha256::digest(cert.as_ref()).to_vec(),
    };
    Some(hash)
}

/// How pglease checks the upstream's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamVerify {
    /// Encrypt, but accept any certificate (libpq's `require` / `prefer`).
    None,
    /// Chain to the configured CA and match the host name (`verify-full`).
    Full,
}

pub fn upstream_client_config(verify: UpstreamVerify, ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let config = match verify {
        UpstreamVerify::Full => {
            let mut roots = rustls::RootCertStore::empty();
            let path = ca_file.ok_or_else(|| TlsError::Empty { path: "upstream.ca_file".into(), what: "CA certificate" })?;
            for cert in load_certs(path)? {
                roots.add(cert)?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        UpstreamVerify::None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider())))
            .with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Accepts any certificate but still checks the handshake signatures, as libpq's `require` does.
/// Channel binding (SCRAM-SHA-256-PLUS) is what then protects the login from a man in the middle.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
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

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A self-signed CA and a server certificate it signs, for the demo and the tests.
pub struct DevCertificates {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Makes a CA and a leaf certificate for `names` (DNS names or IP addresses).
pub fn generate_dev_certificates(names: &[&str]) -> Result<DevCertificates, rcgen::Error> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "pglease development CA");
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);

    let leaf_key = KeyPair::generate()?;
    let mut leaf_params = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
    leaf_params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("localhost"));
    let leaf = leaf_params.signed_by(&leaf_key, &issuer)?;
    Ok(DevCertificates { ca_pem: ca.pem(), cert_pem: leaf.pem(), key_pem: leaf_key.serialize_pem() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_certificates_load_and_hash_with_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let dev = generate_dev_certificates(&["localhost", "127.0.0.1"]).unwrap();
        std::fs::write(dir.path().join("c.pem"), &dev.cert_pem).unwrap();
        std::fs::write(dir.path().join("k.pem"), &dev.key_pem).unwrap();
        let tls = ServerTls::from_files(&dir.path().join("c.pem"), &dir.path().join("k.pem")).unwrap();
        let cert = &load_certs(&dir.path().join("c.pem")).unwrap()[0];
        // rcgen signs with ECDSA P-256 / SHA-256.
        assert_eq!(tls.end_point_hash, sha2::Sha256::digest(cert.as_ref()).to_vec());
    }

    #[test]
    fn missing_files_are_named() {
        let e = ServerTls::from_files(Path::new("/nonexistent/c.pem"), Path::new("/nonexistent/k.pem")).err().unwrap();
        assert!(e.to_string().contains("/nonexistent/c.pem"), "{e}");
    }
}
