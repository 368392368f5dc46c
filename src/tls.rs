//! TLS set-up shared by the server, its peer links and the client: reading
//! PEM files and building rustls configurations (ring provider).
//!
//! What it owns: turning file names into `rustls::ServerConfig` /
//! `rustls::ClientConfig`, with one-line errors that name the file. What it
//! doesn't: the byte stream (the server's `server::tls::TlsStream`, the
//! client's tokio-rustls) and where the file names come from (config).

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

/// Why a TLS configuration could not be built: one line naming the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or holds no usable PEM.
    #[error("{path:?}: {msg}")]
    File {
        /// The file.
        path: String,
        /// What is wrong with it.
        msg: String,
    },
    /// The files were read but rustls refused them together (for example a
    /// key that does not belong to the certificate).
    #[error("{0}")]
    Config(String),
}

/// A node's TLS: how it accepts connections and how it dials peers.
#[derive(Debug, Clone)]
pub struct Configs {
    /// For accepted connections (clients and peers).
    pub accept: Arc<rustls::ServerConfig>,
    /// For dialled peer links: trusts `tls_ca`, presents this node's
    /// certificate. `None` without `tls_ca` (then no peer links over TLS).
    pub dial: Option<Arc<rustls::ClientConfig>>,
}

fn file_error(path: &str, msg: impl std::fmt::Display) -> Error {
    Error::File {
        path: path.to_string(),
        msg: msg.to_string(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM certificate chain (leaf first).
///
/// # Errors
/// When the file cannot be read, is not PEM or holds no certificate.
pub fn load_certs(path: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let bytes = std::fs::read(path).map_err(|e| file_error(path, format!("cannot read: {e}")))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(path, "no CERTIFICATE in the file"));
    }
    Ok(certs)
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1).
///
/// # Errors
/// When the file cannot be read or holds no private key.
pub fn load_key(path: &str) -> Result<PrivateKeyDer<'static>, Error> {
    let bytes = std::fs::read(path).map_err(|e| file_error(path, format!("cannot read: {e}")))?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| file_error(path, format!("no usable PRIVATE KEY: {e}")))
}

/// Reads a CA file into a root store.
///
/// # Errors
/// As [`load_certs`], or when a certificate is not a usable trust anchor.
pub fn load_roots(path: &str) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| file_error(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// Whether the accepting side asks the other for a certificate.
#[derive(Debug, Clone, Copy)]
pub enum ClientCerts<'a> {
    /// Not asked for.
    None,
    /// Asked for and checked against this CA file when presented, but not
    /// required (peers present one, plain clients need not).
    Optional(&'a str),
    /// Required, signed by this CA file.
    Required(&'a str),
}

/// The server's side: its certificate and key, and what it asks of the
/// other side's certificate.
///
/// # Errors
/// A file problem, or a key that does not match the certificate.
pub fn server_config(
    cert: &str,
    key: &str,
    client_certs: ClientCerts<'_>,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let certs = load_certs(cert)?;
    let key_der = load_key(key)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(e.to_string()))?;
    let builder = match client_certs {
        ClientCerts::None => builder.with_no_client_auth(),
        ClientCerts::Optional(ca) | ClientCerts::Required(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(load_roots(ca)?), provider());
            let verifier = match client_certs {
                ClientCerts::Optional(_) => verifier.allow_unauthenticated(),
                _ => verifier,
            };
            let verifier = verifier.build().map_err(|e| file_error(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(certs, key_der).map_err(|e| {
        Error::Config(format!(
            "{key:?} does not go with {cert:?} (or is not a supported key): {e}"
        ))
    })?;
    Ok(Arc::new(config))
}

/// The connecting side: trusts certificates signed by `ca`, and presents
/// `cert`/`key` when both are given (for servers that ask for one, and for
/// peer links).
///
/// # Errors
/// A file problem, or a key that does not match the certificate.
pub fn client_config(
    ca: &str,
    cert_and_key: Option<(&str, &str)>,
) -> Result<Arc<rustls::ClientConfig>, Error> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(e.to_string()))?
        .with_root_certificates(load_roots(ca)?);
    let config = match cert_and_key {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| {
                Error::Config(format!(
                    "{key:?} does not go with {cert:?} (or is not a supported key): {e}"
                ))
            })?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}
