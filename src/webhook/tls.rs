//! The webhook's TLS configuration: the serving certificate is re-read from its files while
//! the server runs, so a rotation (including the kubelet's `..data` symlink swap of a mounted
//! Secret) takes effect without a restart. A pair that does not load is logged and the old
//! one kept.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Why a certificate pair could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("the key in {key} does not match the certificate in {cert}: {reason}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// A certificate pair as loaded, with the bytes it came from (to notice changes).
struct Loaded {
    key: Arc<CertifiedKey>,
    source: (Vec<u8>, Vec<u8>),
    not_after: Option<i64>,
}

/// Serves the most recently loaded pair.
#[derive(Clone)]
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: Arc<RwLock<Loaded>>,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert", &self.cert_path)
            .finish()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn load(cert_path: &Path, key_path: &Path, provider: &CryptoProvider) -> Result<Loaded, TlsError> {
    let cert_pem = read(cert_path)?;
    let key_pem = read(key_path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Parse {
            path: cert_path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Parse {
            path: cert_path.to_path_buf(),
            reason: "no certificate in PEM".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Parse {
        path: key_path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let not_after = not_after(&certs[0]);
    let certified =
        CertifiedKey::from_der(certs, key, provider).map_err(|e| TlsError::Mismatch {
            cert: cert_path.to_path_buf(),
            key: key_path.to_path_buf(),
            reason: e.to_string(),
        })?;
    Ok(Loaded {
        key: Arc::new(certified),
        source: (cert_pem, key_pem),
        not_after,
    })
}

/// The expiry (Unix seconds) of a certificate.
fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    crate::webhook::certs::not_after(cert.as_ref())
}

impl ReloadingCert {
    /// Loads the pair; fails when it does not load (at start-up there is nothing to keep).
    pub fn new(cert_path: PathBuf, key_path: PathBuf) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let loaded = load(&cert_path, &key_path, &provider)?;
        Ok(ReloadingCert {
            cert_path,
            key_path,
            current: Arc::new(RwLock::new(loaded)),
            provider,
        })
    }

    /// Re-reads the files; swaps in the new pair when they changed and load. Returns whether
    /// a new pair is now served.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let cert = read(&self.cert_path)?;
        let key = read(&self.key_path)?;
        {
            let current = self.current.read().unwrap_or_else(|e| e.into_inner());
            if current.source.0 == cert && current.source.1 == key {
                return Ok(false);
            }
        }
        let loaded = load(&self.cert_path, &self.key_path, &self.provider)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = loaded;
        Ok(true)
    }

    /// The served certificate's notAfter (Unix seconds).
    pub fn not_after(&self) -> Option<i64> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .not_after
    }

    /// Polls the files every `period` until the task is dropped.
    pub async fn watch(self, period: Duration) {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            match self.reload() {
                Ok(true) => {
                    tracing::info!(cert = %self.cert_path.display(), "serving certificate reloaded")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "new serving certificate not loaded; keeping the current one")
                }
            }
        }
    }

    /// A rustls server configuration that serves this certificate, offering HTTP/1.1 and,
    /// when `http2`, h2 first.
    pub fn server_config(&self, http2: bool) -> rustls::ServerConfig {
        self.server_config_with_client_auth(http2, None)
    }

    /// The same, asking clients for a certificate through `client_auth` when given (see
    /// [`crate::webhook::auth::Authenticator::tls_verifier`]).
    pub fn server_config_with_client_auth(
        &self,
        http2: bool,
        client_auth: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
    ) -> rustls::ServerConfig {
        let builder = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default protocol versions");
        let builder = match client_auth {
            Some(verifier) => builder.with_client_cert_verifier(verifier),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(Arc::new(self.clone()));
        config.alpn_protocols = if http2 {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        config
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .key
                .clone(),
        )
    }
}
