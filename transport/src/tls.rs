//! TLS from PEM files: the server's certificate and key, an optional CA that client
//! certificates must chain to (mutual TLS), and the client's CA and identity. rustls with the
//! `ring` provider, no OpenSSL.
//!
//! A server's configuration is held behind [`ServerTls`], which re-reads its files on
//! [`ServerTls::reload`] (the daemons call it on SIGHUP): connections accepted afterwards use
//! the new certificate, those already open keep theirs, and a reload that fails (a half-written
//! file, a key that does not match) keeps the old configuration and says why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// Why a TLS setting could not be loaded. Messages name the file and what to check; they never
/// quote a key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {what} {path}: {source}; check the path and its permissions")]
    Read {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file holds no PEM block of the expected kind.
    #[error("{path} holds no {what} in PEM form (-----BEGIN ...-----)")]
    NoPem {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// A PEM file is malformed.
    #[error("{path} is not a valid PEM file ({source})")]
    Pem {
        /// The file.
        path: PathBuf,
        /// Why.
        source: rustls::pki_types::pem::Error,
    },
    /// rustls refused the configuration (a key that does not match its certificate, an
    /// unusable CA).
    #[error("the TLS configuration from {cert} is not usable: {source}")]
    Config {
        /// The certificate (or CA) file it was built from.
        cert: PathBuf,
        /// Why.
        source: rustls::Error,
    },
    /// The client-certificate verifier could not be built from the CA file.
    #[error("the client CA {path} is not usable: {source}")]
    ClientCa {
        /// The CA file.
        path: PathBuf,
        /// Why.
        source: rustls::server::VerifierBuilderError,
    },
    /// reqwest refused a certificate or identity.
    #[error("the client TLS setting from {path} is not usable: {source}")]
    Client {
        /// The file.
        path: PathBuf,
        /// Why.
        source: reqwest::Error,
    },
}

/// The files a TLS server is configured from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// The server's certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// The server's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// When set, every client must present a certificate that chains to this CA (PEM).
    pub client_ca: Option<PathBuf>,
}

/// A TLS server configuration that can be re-read in place. Clones share it.
#[derive(Debug, Clone)]
pub struct ServerTls {
    files: ServerTlsFiles,
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl ServerTls {
    /// Loads the configuration from `files`.
    pub fn load(files: ServerTlsFiles) -> Result<Self, TlsError> {
        let config = server_config(&files)?;
        Ok(Self {
            files,
            current: Arc::new(RwLock::new(config)),
        })
    }

    /// Re-reads the files. On error the configuration in use stays as it was.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
        Ok(())
    }

    /// Whether clients must present a certificate.
    pub fn requires_client_certificates(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// The configuration new connections get.
    pub(crate) fn current(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_config(files: &ServerTlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_certs(&files.cert, "certificate")?;
    let key = read_key(&files.key)?;
    let config_err = |source| TlsError::Config {
        cert: files.cert.clone(),
        source,
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config_err)?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let roots = Arc::new(root_store(ca)?);
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
                .build()
                .map_err(|source| TlsError::ClientCa {
                    path: ca.clone(),
                    source,
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(config_err)?;
    // HTTP/1.1 only: both appliances' clients speak it, and one protocol keeps the idle and
    // header timeouts meaning one thing.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn read_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoPem {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path, "private key")?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|source| match source {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoPem {
            what: "private key",
            path: path.to_owned(),
        },
        source => TlsError::Pem {
            path: path.to_owned(),
            source,
        },
    })
}

fn root_store(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(ca, "CA certificate")? {
        roots.add(cert).map_err(|source| TlsError::Config {
            cert: ca.to_owned(),
            source,
        })?;
    }
    Ok(roots)
}

/// What a client trusts and presents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// The CA that servers' certificates must chain to (PEM). Without it no `https://` server
    /// can be verified: nothing else is trusted, not even the system's roots.
    pub ca: Option<PathBuf>,
    /// The client's own certificate (PEM), for servers that require one.
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
}

impl ClientTlsFiles {
    /// Whether `https://` servers can be called: a CA is configured.
    pub fn can_verify_servers(&self) -> bool {
        self.ca.is_some()
    }

    /// Configures `builder` for these files: rustls, only the configured CA as root, and the
    /// identity when both its files are given.
    pub fn apply(
        &self,
        builder: reqwest::ClientBuilder,
    ) -> Result<reqwest::ClientBuilder, TlsError> {
        let mut builder = builder.use_rustls_tls().tls_built_in_root_certs(false);
        if let Some(ca) = &self.ca {
            let bytes = read(ca, "CA certificate")?;
            let certs = reqwest::Certificate::from_pem_bundle(&bytes).map_err(|source| {
                TlsError::Client {
                    path: ca.clone(),
                    source,
                }
            })?;
            if certs.is_empty() {
                return Err(TlsError::NoPem {
                    what: "CA certificate",
                    path: ca.clone(),
                });
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            let mut pem = read(cert, "client certificate")?;
            pem.push(b'\n');
            pem.extend(read(key, "client private key")?);
            let identity =
                reqwest::Identity::from_pem(&pem).map_err(|source| TlsError::Client {
                    path: cert.clone(),
                    source,
                })?;
            builder = builder.identity(identity);
        }
        Ok(builder)
    }
}
