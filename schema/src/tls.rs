//! TLS to Postgres, for every Argus process: [`PgConnectConfig::parse`] reads the
//! `sslmode` of a database URL (and a CA file) into a `tokio_postgres::Config` and a
//! rustls connector (ring provider), so the bridge, the sidecar, `argus-dlq`,
//! `argus-schema` and the load tester connect the same way.
//!
//! | `sslmode` | TLS | server certificate |
//! |---|---|---|
//! | `disable`, or no `sslmode` | never | - |
//! | `prefer` | if the server offers it | checked against the CA file if one is given, else not checked |
//! | `require` | always | as for `prefer` |
//! | `verify-full` | always | must chain to the CA file and name the host; the CA file is required |
//!
//! The CA file comes from the URL's `sslrootcert=` (as libpq reads it, so the same URL
//! works with `psql`) or else from `--pg-ca-file` / `PGSSLROOTCERT`. With a CA file,
//! every TLS mode checks chain and host name (`verify-ca`, which skips the host name, is
//! refused: use `verify-full`). Without one, `prefer` and `require` encrypt without
//! checking who answers, as libpq does. Unlike libpq, a URL without `sslmode` means
//! plain TCP (libpq's default `prefer` can be downgraded by anyone on the path and
//! checks nothing): ask for TLS with `require` or, better, `verify-full`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::DigitallySignedStruct;
use tokio_postgres::config::SslMode;
pub use tokio_postgres_rustls::MakeRustlsConnect;

/// What a database URL's TLS settings say. Never holds the password in an error.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("invalid database URL: {reason}")]
    Url { reason: String },
    #[error("sslmode={0} is not supported (use disable, prefer, require or verify-full)")]
    UnsupportedMode(String),
    #[error("sslmode=verify-full needs a CA file: sslrootcert= in the URL, --pg-ca-file or PGSSLROOTCERT")]
    NoCaFile,
    #[error("Postgres CA file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("TLS set-up: {0}")]
    Rustls(#[from] rustls::Error),
}

/// How certificates are checked, after [`PgConnectConfig::parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    /// No TLS at all (`sslmode=disable`).
    None,
    /// Encrypted, but anyone may answer (`prefer`/`require` without a CA file).
    EncryptOnly,
    /// Chain to the CA file and the host name.
    Full,
}

/// A parsed database URL with its TLS connector.
#[derive(Clone)]
pub struct PgConnectConfig {
    pub config: tokio_postgres::Config,
    pub tls: MakeRustlsConnect,
    pub verification: Verification,
}

impl std::fmt::Debug for PgConnectConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // tokio_postgres::Config's Debug redacts the password.
        f.debug_struct("PgConnectConfig")
            .field("config", &self.config)
            .field("verification", &self.verification)
            .finish_non_exhaustive()
    }
}

impl PgConnectConfig {
    /// Parses `url` (a `postgres://` URL or a libpq `key=value` string). `ca_file` is
    /// the flag's value; the URL's `sslrootcert=` wins over it.
    pub fn parse(url: &str, ca_file: Option<&Path>) -> Result<Self, TlsConfigError> {
        let (url, mode, root) = take_tls_params(url);
        let verify_full = match mode.as_deref() {
            None | Some("disable" | "prefer" | "require") => false,
            Some("verify-full") => true,
            Some(other) => return Err(TlsConfigError::UnsupportedMode(other.to_owned())),
        };
        let mut config: tokio_postgres::Config =
            url.parse()
                .map_err(|e: tokio_postgres::Error| TlsConfigError::Url {
                    reason: parse_error_text(&e),
                })?;
        config.ssl_mode(match mode.as_deref() {
            None | Some("disable") => SslMode::Disable,
            Some("require" | "verify-full") => SslMode::Require,
            _ => SslMode::Prefer,
        });
        let ca = root.or_else(|| ca_file.map(Path::to_path_buf));
        if verify_full && ca.is_none() {
            return Err(TlsConfigError::NoCaFile);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let (client, verification) = match &ca {
            Some(path) => (
                builder
                    .with_root_certificates(roots(path)?)
                    .with_no_client_auth(),
                Verification::Full,
            ),
            None => (
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
                    .with_no_client_auth(),
                Verification::EncryptOnly,
            ),
        };
        let verification = if config.get_ssl_mode() == SslMode::Disable {
            Verification::None
        } else {
            verification
        };
        Ok(PgConnectConfig {
            config,
            tls: MakeRustlsConnect::new(client),
            verification,
        })
    }
}

/// A URL parse error with its causes (the driver's `Display` alone says only "invalid
/// configuration"). Never holds the URL.
fn parse_error_text(e: &tokio_postgres::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn roots(path: &PathBuf) -> Result<rustls::RootCertStore, TlsConfigError> {
    use rustls_pki_types::pem::PemObject;
    let shown = path.display().to_string();
    let err = |reason: String| TlsConfigError::CaFile {
        path: shown.clone(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in it".into()));
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| err(e.to_string()))?;
    }
    Ok(roots)
}

/// `url` with `sslrootcert=<ca_file>` added, unless it names one already: how
/// `--pg-ca-file` travels with the URL to every pool and connection of a process.
pub fn with_ca_file(url: &str, ca_file: &Path) -> Result<String, TlsConfigError> {
    if take_tls_params(url).2.is_some() {
        return Ok(url.to_owned());
    }
    let path = ca_file.to_str().ok_or_else(|| TlsConfigError::CaFile {
        path: ca_file.display().to_string(),
        reason: "the path is not UTF-8".into(),
    })?;
    if is_url(url) {
        let encoded: String = path
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'/' | b'.' | b'-' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let sep = if url.contains('?') { '&' } else { '?' };
        Ok(format!("{url}{sep}sslrootcert={encoded}"))
    } else if path.contains(char::is_whitespace) || path.contains('\'') {
        Err(TlsConfigError::CaFile {
            path: path.to_owned(),
            reason: "a key=value connection string cannot take this path; use a postgres:// URL"
                .into(),
        })
    } else {
        Ok(format!("{url} sslrootcert={path}"))
    }
}

fn is_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// `%2F` and friends back to bytes (a URL query value).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes `sslmode` and `sslrootcert` from `url` (tokio-postgres knows neither
/// `verify-full` nor `sslrootcert`) and returns them.
fn take_tls_params(url: &str) -> (String, Option<String>, Option<PathBuf>) {
    let mut mode = None;
    let mut root = None;
    let url_form = is_url(url);
    let mut take = |key: &str, value: &str| {
        let value = if url_form {
            percent_decode(value)
        } else {
            value.to_owned()
        };
        match key {
            "sslmode" => {
                mode = Some(value);
                true
            }
            "sslrootcert" => {
                root = Some(PathBuf::from(value));
                true
            }
            _ => false,
        }
    };
    let rest = if url_form {
        match url.split_once('?') {
            None => url.to_owned(),
            Some((base, query)) => {
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|kv| {
                        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                        !take(k, v)
                    })
                    .collect();
                if kept.is_empty() {
                    base.to_owned()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        url.split_whitespace()
            .filter(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                !take(k.trim(), v.trim())
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    (rest, mode, root)
}

/// `prefer`/`require` without a CA file: libpq's "encrypt, trust whoever answers".
/// Handshake signatures are still checked, so the session key belongs to the
/// certificate shown; only who holds that certificate is not.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
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
        verify_tls12_signature(
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
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_of_the_url() {
        let (u, m, r) = take_tls_params(
            "postgres://u:p@h:5/db?sslmode=verify-full&sslrootcert=/c.pem&application_name=x",
        );
        assert_eq!(u, "postgres://u:p@h:5/db?application_name=x");
        assert_eq!(m.as_deref(), Some("verify-full"));
        assert_eq!(r, Some(PathBuf::from("/c.pem")));
        let (u, m, r) = take_tls_params("host=h user=u sslmode=require dbname=d");
        assert_eq!(u, "host=h user=u dbname=d");
        assert_eq!(m.as_deref(), Some("require"));
        assert_eq!(r, None);
        let (u, m, _) = take_tls_params("postgres://u@h/db");
        assert_eq!((u.as_str(), m), ("postgres://u@h/db", None));
    }

    #[test]
    fn the_ca_file_travels_in_the_url() {
        let u = with_ca_file(
            "postgres://u@h/db?sslmode=verify-full",
            Path::new("/a b/ca.crt"),
        )
        .expect("URL");
        assert_eq!(
            u,
            "postgres://u@h/db?sslmode=verify-full&sslrootcert=/a%20b/ca.crt"
        );
        assert_eq!(take_tls_params(&u).2, Some(PathBuf::from("/a b/ca.crt")));
        // The URL's own sslrootcert= wins.
        let own = "postgres://u@h/db?sslrootcert=/own.crt";
        assert_eq!(with_ca_file(own, Path::new("/flag.crt")).expect("URL"), own);
        assert_eq!(
            with_ca_file("host=h sslmode=require", Path::new("/c.crt")).expect("kv"),
            "host=h sslmode=require sslrootcert=/c.crt"
        );
    }

    #[test]
    fn modes_and_their_errors() {
        let c = PgConnectConfig::parse("postgres://u@h/db", None).expect("plain URL");
        assert_eq!(c.config.get_ssl_mode(), SslMode::Disable);
        assert_eq!(c.verification, Verification::None);
        let c = PgConnectConfig::parse("postgres://u@h/db?sslmode=prefer", None).expect("prefer");
        assert_eq!(c.config.get_ssl_mode(), SslMode::Prefer);
        assert_eq!(c.verification, Verification::EncryptOnly);
        let c = PgConnectConfig::parse("postgres://u@h/db?sslmode=disable", None).expect("disable");
        assert_eq!(c.verification, Verification::None);
        assert!(matches!(
            PgConnectConfig::parse("postgres://u:secret@h/db?sslmode=verify-full", None),
            Err(TlsConfigError::NoCaFile)
        ));
        let e = PgConnectConfig::parse("postgres://u:secret@h/db?sslmode=verify-ca", None)
            .expect_err("verify-ca");
        assert!(matches!(e, TlsConfigError::UnsupportedMode(_)), "{e}");
        let e = PgConnectConfig::parse(
            "postgres://u:secret@h/db?sslmode=require",
            Some(Path::new("/nonexistent/ca.crt")),
        )
        .expect_err("missing CA file");
        assert!(e.to_string().contains("/nonexistent/ca.crt"), "{e}");
        assert!(!e.to_string().contains("secret"), "{e}");
    }
}
