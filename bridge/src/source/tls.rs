//! The rustls client configuration of each connection: the broker's CA and, for
//! mutual TLS, the connection's own certificate and key (read with
//! `rustls-pki-types`' PEM parser).

use std::sync::Arc;

use crate::config::{MqttConfig, MqttScheme};

/// Errors building the TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what} {path}: {source}")]
    Pem {
        what: &'static str,
        path: String,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path} holds no certificate")]
    NoCertificate { path: String },
    #[error("CA certificate from {path} rejected: {source}")]
    BadCa { path: String, source: rustls::Error },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The rustls configuration of every connection, in connection order (see [`tls_config`]).
pub fn tls_configs(cfg: &MqttConfig) -> Result<Vec<Option<Arc<rustls::ClientConfig>>>, TlsError> {
    (0..cfg.connections).map(|c| tls_config(cfg, c)).collect()
}

/// Builds the rustls client configuration (ring provider) of connection
/// `conn`: the CA from `--mqtt-ca-file` and, when configured, the client
/// certificate and key, with `{replica}` and `{connection}` in their paths
/// expanded (brokers that take the client id from the certificate's CN need
/// one certificate per connection: `bridges/bridge-{replica}-{connection}.crt`).
pub fn tls_config(
    cfg: &MqttConfig,
    conn: u16,
) -> Result<Option<Arc<rustls::ClientConfig>>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    if cfg.addr.scheme != MqttScheme::Tls {
        return Ok(None);
    }
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = &cfg.ca_file {
        let path = ca.display().to_string();
        let certs = CertificateDer::pem_file_iter(ca)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|source| TlsError::Pem {
                what: "CA file",
                path: path.clone(),
                source,
            })?;
        if certs.is_empty() {
            return Err(TlsError::NoCertificate { path });
        }
        for c in certs {
            roots.add(c).map_err(|source| TlsError::BadCa {
                path: path.clone(),
                source,
            })?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let config = match cfg
        .identity
        .as_ref()
        .map(|id| id.for_connection(cfg.replica, conn))
    {
        Some(id) => {
            let cert_path = id.cert_file.display().to_string();
            let chain = CertificateDer::pem_file_iter(&id.cert_file)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|source| TlsError::Pem {
                    what: "client certificate",
                    path: cert_path.clone(),
                    source,
                })?;
            if chain.is_empty() {
                return Err(TlsError::NoCertificate { path: cert_path });
            }
            let key =
                PrivateKeyDer::from_pem_file(&id.key_file).map_err(|source| TlsError::Pem {
                    what: "client key",
                    path: id.key_file.display().to_string(),
                    source,
                })?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Some(Arc::new(config)))
}
