//! `argus-pki`: the certificate authority of the ingestion edge.
//!
//! Devices authenticate to the MQTT broker with a client certificate whose CN is their
//! device id; the bridge with one whose CN is its identity (`bridge-0`, ...). This crate
//! creates the CA, the broker's server certificate, client certificates (with a generated
//! ECDSA P-256 key or from a CSR), revocations and the CRL, all with rcgen (no openssl).
//!
//! Layout:
//! - [`ca`]: [`Ca`] (`init`, `load`, `issue`, `revoke`, `write_crl`), [`Subject`], [`Issued`].
//! - [`profile`]: [`profile::Profile`]: `--profile production` refuses a CRL URL a broker cannot reach.
//! - [`index`]: `index.json`, the record of every issued serial and its revocation.
//! - [`files`]: atomic writes with explicit modes (keys 0600, the rest 0644) and the
//!   directory lock that serialises writers (CLI and HTTP API on one directory).
//!
//! Directory layout (`DIR`): `ca.crt`, `ca.key` (0600), `server.crt`, `server.key` (0600),
//! `crl.pem`, `crl.der`, `index.json`, `devices/<uuid>.crt|.key`, `bridges/<name>.crt|.key`.
//! The CA key is read from `DIR/ca.key` only; it is never copied, returned or logged.

pub mod ca;
pub mod files;
pub mod index;
pub mod profile;

use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use ca::{
    Action, Ca, CrlInfo, InitReport, Issued, IssuedFiles, Subject, DEFAULT_CRL_URL, DEFAULT_SANS,
    DEFAULT_VALIDITY_DAYS, MAX_BRIDGE_VALIDITY_DAYS, MAX_DEVICE_VALIDITY_DAYS,
};
pub use index::{CertKind, IndexEntry};

/// Errors of every PKI operation.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no CA in {} (run `argus-pki init --dir {}`)", .0.display(), .0.display())]
    NotInitialized(PathBuf),
    #[error("{0}")]
    CaIncomplete(String),
    #[error("validity must be 1 to {max} days (got {got})")]
    InvalidValidity { max: u32, got: u32 },
    #[error("invalid CSR: {0}")]
    InvalidCsr(String),
    #[error("{0}")]
    InvalidName(String),
    #[error("no certificate with serial {0} in the index")]
    UnknownSerial(String),
    #[error("index: {0}")]
    CorruptIndex(String),
    #[error("{0}")]
    Parse(String),
    #[error("{0}")]
    InvalidCrlUrl(String),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

impl PkiError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> PkiError {
        PkiError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// True for errors caused by the caller's input (HTTP 400), not by the CA's state.
    pub fn is_caller_error(&self) -> bool {
        matches!(
            self,
            PkiError::InvalidValidity { .. }
                | PkiError::InvalidCsr(_)
                | PkiError::InvalidName(_)
                | PkiError::UnknownSerial(_)
        )
    }

    /// A lock held by another writer for too long: retrying later may succeed.
    pub fn is_retriable(&self) -> bool {
        matches!(self, PkiError::Io { source, .. } if source.kind() == std::io::ErrorKind::WouldBlock)
    }
}

/// Why a certificate was revoked (RFC 5280 reason codes). Parsed from
/// `keyCompromise`, `key-compromise` or `key_compromise` alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RevocationReason {
    #[default]
    Unspecified,
    KeyCompromise,
    CaCompromise,
    AffiliationChanged,
    Superseded,
    CessationOfOperation,
    CertificateHold,
    PrivilegeWithdrawn,
}

impl RevocationReason {
    pub const ALL: [RevocationReason; 8] = [
        RevocationReason::Unspecified,
        RevocationReason::KeyCompromise,
        RevocationReason::CaCompromise,
        RevocationReason::AffiliationChanged,
        RevocationReason::Superseded,
        RevocationReason::CessationOfOperation,
        RevocationReason::CertificateHold,
        RevocationReason::PrivilegeWithdrawn,
    ];

    /// The RFC 5280 name, e.g. `keyCompromise`.
    pub fn as_str(self) -> &'static str {
        match self {
            RevocationReason::Unspecified => "unspecified",
            RevocationReason::KeyCompromise => "keyCompromise",
            RevocationReason::CaCompromise => "cACompromise",
            RevocationReason::AffiliationChanged => "affiliationChanged",
            RevocationReason::Superseded => "superseded",
            RevocationReason::CessationOfOperation => "cessationOfOperation",
            RevocationReason::CertificateHold => "certificateHold",
            RevocationReason::PrivilegeWithdrawn => "privilegeWithdrawn",
        }
    }

    pub(crate) fn to_rcgen(self) -> rcgen::RevocationReason {
        use rcgen::RevocationReason as R;
        match self {
            RevocationReason::Unspecified => R::Unspecified,
            RevocationReason::KeyCompromise => R::KeyCompromise,
            RevocationReason::CaCompromise => R::CaCompromise,
            RevocationReason::AffiliationChanged => R::AffiliationChanged,
            RevocationReason::Superseded => R::Superseded,
            RevocationReason::CessationOfOperation => R::CessationOfOperation,
            RevocationReason::CertificateHold => R::CertificateHold,
            RevocationReason::PrivilegeWithdrawn => R::PrivilegeWithdrawn,
        }
    }
}

impl std::fmt::Display for RevocationReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RevocationReason {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm = |x: &str| {
            x.chars()
                .filter(|c| *c != '-' && *c != '_')
                .collect::<String>()
                .to_ascii_lowercase()
        };
        let wanted = norm(s);
        RevocationReason::ALL
            .into_iter()
            .find(|r| norm(r.as_str()) == wanted)
            .ok_or_else(|| {
                format!(
                    "unknown revocation reason {s:?}; one of: {}",
                    RevocationReason::ALL.map(|r| r.as_str()).join(", ")
                )
            })
    }
}
