//! The local index of everything a CA issued (like openssl's `index.txt`): `index.json`
//! in the PKI dir. Read and written only under [`crate::files::DirLock`], replaced
//! atomically (temp file + rename).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::files::{write_atomic, PUBLIC_MODE};
use crate::PkiError;

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertKind {
    Ca,
    Server,
    Device,
    Bridge,
}

/// One issued certificate. Times are RFC 3339 (UTC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// Lowercase hex, no separators (the `device_certificates.serial_number` format).
    pub serial: String,
    pub kind: CertKind,
    pub common_name: String,
    pub not_before: String,
    pub not_after: String,
    pub fingerprint_sha256: String,
    pub issued_at: String,
    pub revoked_at: Option<String>,
    pub revocation_reason: Option<String>,
}

/// The whole index file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    /// The number of the last CRL written (CRL numbers only ever increase).
    pub crl_number: u64,
    pub certificates: Vec<IndexEntry>,
}

impl Index {
    pub const FILE: &'static str = "index.json";

    /// Reads the index; a missing file is an empty index.
    pub fn read(dir: &Path) -> Result<Index, PkiError> {
        let path = dir.join(Self::FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| PkiError::CorruptIndex(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Index::default()),
            Err(e) => Err(PkiError::io(&path, e)),
        }
    }

    pub fn write(&self, dir: &Path) -> Result<(), PkiError> {
        let path = dir.join(Self::FILE);
        let mut bytes =
            serde_json::to_vec_pretty(self).map_err(|e| PkiError::CorruptIndex(e.to_string()))?;
        bytes.push(b'\n');
        write_atomic(&path, &bytes, PUBLIC_MODE).map_err(|e| PkiError::io(&path, e))
    }

    pub fn find_mut(&mut self, serial: &str) -> Option<&mut IndexEntry> {
        self.certificates.iter_mut().find(|c| c.serial == serial)
    }
}
