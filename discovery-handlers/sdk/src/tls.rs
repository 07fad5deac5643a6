//! TLS for network (`NETWORK`) handler endpoints.
//!
//! The agent accepts plain `http://` endpoints only inside its node's pod network (or on loopback);
//! a handler anywhere else serves `https://`, and the agent verifies it against a CA bundle (the
//! system roots when none is given). Mutual TLS is optional: a handler that names a client CA only
//! answers agents that present a certificate signed by it.

use std::path::{Path, PathBuf};

pub use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is not PEM (tonic checks the contents only when connecting; we fail early).
    #[error("{0} holds no PEM block")]
    NotPem(PathBuf),
    /// A certificate was given without its key, or the other way round.
    #[error("a TLS certificate and its key must be given together")]
    CertWithoutKey,
}

/// Makes rustls' ring provider the process default unless one is installed already. Needed
/// when a binary links both rustls providers (feature unification across a workspace, or a
/// dependency such as reqwest enabling aws-lc-rs): rustls then refuses to choose by itself.
pub fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Err: another thread installed one meanwhile, which is just as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    let data = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if !data.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(TlsError::NotPem(path.to_path_buf()));
    }
    Ok(data)
}

/// Client side (the agent): trust `ca` (else the system roots), and present `cert`+`key` when given.
pub fn client_config(
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<ClientTlsConfig, TlsError> {
    ensure_crypto_provider();
    let mut config = match ca {
        Some(ca) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_pem(ca)?)),
        None => ClientTlsConfig::new().with_enabled_roots(),
    };
    match (cert, key) {
        (Some(cert), Some(key)) => {
            config = config.identity(Identity::from_pem(read_pem(cert)?, read_pem(key)?));
        }
        (None, None) => {}
        _ => return Err(TlsError::CertWithoutKey),
    }
    Ok(config)
}

/// Server side (a handler): serve with `cert`+`key`; require client certificates signed by
/// `client_ca` when given.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<ServerTlsConfig, TlsError> {
    ensure_crypto_provider();
    let mut config =
        ServerTlsConfig::new().identity(Identity::from_pem(read_pem(cert)?, read_pem(key)?));
    if let Some(ca) = client_ca {
        config = config.client_ca_root(Certificate::from_pem(read_pem(ca)?));
    }
    Ok(config)
}
