//! Loading the wildcard certificate and building the two TLS configurations (front door
//! and QUIC endpoint) from it.

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;

/// Why the certificate or key could not be used.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The certificate file held no certificate.
    #[error("{0} holds no PEM certificate")]
    NoCertificate(PathBuf),
    /// The key file held no private key.
    #[error("{0} holds no PEM private key")]
    NoKey(PathBuf),
    /// rustls refused the pair (e.g. key does not match).
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A certificate chain and its key, as loaded from PEM files.
pub struct CertifiedKey {
    /// The chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key.
    pub key: PrivateKeyDer<'static>,
}

/// Reads a PEM chain and a PEM key.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let cert_pem = read(cert)?;
    let chain: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            path: cert.to_owned(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(cert.to_owned()));
    }
    let key_pem = read(key)?;
    let key_der = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|source| TlsError::Read {
            path: key.to_owned(),
            source,
        })?
        .ok_or_else(|| TlsError::NoKey(key.to_owned()))?;
    Ok(CertifiedKey {
        chain,
        key: key_der,
    })
}

/// The relay's TLS provider (ring), with the AES-128-GCM suites first.
///
/// The relay picks the suite in its own order ([`prefer_own_order`]): curl, OpenSSL and
/// rustls clients list AES-256-GCM first, browsers AES-128-GCM. Both are full-strength
/// TLS 1.3 AEADs; AES-128 runs 10 AES rounds per block instead of 14, and on a relay that
/// decrypts and re-encrypts every byte that moves (HTTPS on one side, QUIC on the other),
/// bulk transfers and WebSockets cost 3–7 % less server CPU per MB
/// (docs/performance.md). A client that offers only AES-256-GCM still gets it.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    // A stable sort: the suites keep their order within each group.
    provider
        .cipher_suites
        .sort_by_key(|suite| !is_aes_128_gcm(suite.suite()));
    Arc::new(provider)
}

fn is_aes_128_gcm(suite: rustls::CipherSuite) -> bool {
    use rustls::CipherSuite as S;
    matches!(
        suite,
        S::TLS13_AES_128_GCM_SHA256
            | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
    )
}

/// Chooses the cipher suite by the relay's preference ([`provider`]), not the client's.
fn prefer_own_order(config: &mut rustls::ServerConfig) {
    config.ignore_client_order = true;
}

/// The relay's certificate, shared by the front door and the QUIC endpoint, and swapped
/// in place on reload (SIGHUP or a changed file) without touching live connections.
#[derive(Debug)]
pub struct CertStore {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
    stamp: std::sync::Mutex<Option<FileStamp>>,
}

type FileStamp = (std::time::SystemTime, std::time::SystemTime);

impl CertStore {
    /// Loads the certificate chain and key.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let store = Self {
            cert_path: cert.to_owned(),
            key_path: key.to_owned(),
            current: std::sync::RwLock::new(Arc::new(Self::read(cert, key)?)),
            stamp: std::sync::Mutex::new(None),
        };
        *store.stamp.lock().unwrap_or_else(|e| e.into_inner()) = store.file_stamp();
        Ok(store)
    }

    fn read(cert: &Path, key: &Path) -> Result<rustls::sign::CertifiedKey, TlsError> {
        let loaded = load_certified_key(cert, key)?;
        let signing = provider().key_provider.load_private_key(loaded.key)?;
        let certified = rustls::sign::CertifiedKey::new(loaded.chain, signing);
        certified.keys_match()?;
        Ok(certified)
    }

    fn file_stamp(&self) -> Option<FileStamp> {
        let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        Some((modified(&self.cert_path)?, modified(&self.key_path)?))
    }

    /// Re-reads the files if they changed. On error the current certificate stays.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let stamp = self.file_stamp();
        if stamp == *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) {
            return Ok(false);
        }
        self.reload()?;
        Ok(true)
    }

    /// Re-reads the files now. On error the current certificate stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamp = self.file_stamp();
        let fresh = Self::read(&self.cert_path, &self.key_path)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh);
        *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) = stamp;
        Ok(())
    }
}

impl rustls::server::ResolvesServerCert for CertStore {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// TLS for the HTTPS front door: HTTP/2 and HTTP/1.1 by ALPN.
pub fn front_server_config(certs: Arc<CertStore>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    // Browsers offer h2/http/1.1; agents that cannot use UDP offer only `jobgate/1`
    // (the TCP transport), so one port serves both and no new port must be opened.
    config.alpn_protocols = vec![
        b"h2".to_vec(),
        b"http/1.1".to_vec(),
        jobgate_transport::ALPN_TCP.to_vec(),
    ];
    prefer_own_order(&mut config);
    Ok(Arc::new(config))
}

/// TLS 1.3 for the agents' QUIC endpoint, ALPN `jobgate/1`.
pub fn quic_server_config(certs: Arc<CertStore>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    config.alpn_protocols = vec![jobgate_protocol::ALPN.to_vec()];
    config.max_early_data_size = 0;
    prefer_own_order(&mut config);
    Ok(Arc::new(config))
}
