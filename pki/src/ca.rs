//! The certificate authority: create ([`Ca::init`]), load ([`Ca::load`]), issue, revoke, CRL.

use std::fmt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CrlDistributionPoint,
    CrlIssuingDistributionPoint, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyIdMethod, KeyPair, KeyUsagePurpose, PublicKeyData, RevokedCertParams, SerialNumber,
    PKCS_ECDSA_P256_SHA256,
};
use ring::digest::{digest, SHA256};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};
use uuid::Uuid;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::files::{ensure_dir, write_atomic, write_new, DirLock, KEY_MODE, PUBLIC_MODE};
use crate::index::{CertKind, Index, IndexEntry};
use crate::{PkiError, RevocationReason};

/// Where EMQX (and anyone) fetches the CRL: the HTTP sidecar's `GET /pki/crl.der`.
pub const DEFAULT_CRL_URL: &str = "http://127.0.0.1:17081/pki/crl.der";
/// SANs of the broker's server certificate when none are added.
pub const DEFAULT_SANS: [&str; 2] = ["localhost", "127.0.0.1"];
pub const CA_VALIDITY_DAYS: i64 = 3650;
pub const SERVER_VALIDITY_DAYS: i64 = 365;
/// `init` re-issues the server certificate when it expires within this many days.
pub const RENEW_WITHIN_DAYS: i64 = 30;
/// Default and maximum validity of device certificates.
pub const DEFAULT_VALIDITY_DAYS: u32 = 365;
pub const MAX_DEVICE_VALIDITY_DAYS: u32 = 365;
/// Bridge identities are operated by us, not shipped in devices: allow longer.
pub const MAX_BRIDGE_VALIDITY_DAYS: u32 = 825;
/// A CRL's next-update time: brokers refuse every client once it has passed, so the
/// CRL must be re-written (`argus-pki crl`) well before (daily is fine).
pub const CRL_NEXT_UPDATE_DAYS: i64 = 7;
/// Certificates start this much in the past, to absorb small clock differences.
const BACKDATE: Duration = Duration::minutes(5);

/// File names inside a PKI directory.
pub mod paths {
    pub const CA_CERT: &str = "ca.crt";
    pub const CA_KEY: &str = "ca.key";
    pub const SERVER_CERT: &str = "server.crt";
    pub const SERVER_KEY: &str = "server.key";
    pub const CRL_PEM: &str = "crl.pem";
    pub const CRL_DER: &str = "crl.der";
    /// One line per revoked certificate, `<identity (CN)> <serial>`, rewritten with the
    /// CRL: the local stack's Mosquitto plugin (`compose/mosquitto/argus_sub_acl.c`)
    /// disconnects the live sessions of each new line's identity.
    pub const REVOKED_IDENTITIES: &str = "revoked-identities.txt";
    pub const DEVICES: &str = "devices";
    pub const BRIDGES: &str = "bridges";
}

/// Who a client certificate is for. The certificate's CN is the id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    /// CN = the device id (hyphenated lowercase UUID); may publish `devices/<id>/telemetry`.
    Device(Uuid),
    /// CN = the bridge identity, e.g. `bridge-0`; reads `devices/+/telemetry`.
    Bridge(String),
}

impl Subject {
    /// A bridge subject, checked: 1..=64 chars of `[a-z0-9-]` (it becomes an MQTT username).
    pub fn bridge(name: &str) -> Result<Subject, PkiError> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(Subject::Bridge(name.to_string()))
        } else {
            Err(PkiError::InvalidName(format!(
                "bridge name {name:?} must be 1 to 64 characters of a-z, 0-9 and '-'"
            )))
        }
    }

    pub fn common_name(&self) -> String {
        match self {
            Subject::Device(id) => id.hyphenated().to_string(),
            Subject::Bridge(name) => name.clone(),
        }
    }

    pub fn kind(&self) -> CertKind {
        match self {
            Subject::Device(_) => CertKind::Device,
            Subject::Bridge(_) => CertKind::Bridge,
        }
    }

    pub fn max_validity_days(&self) -> u32 {
        match self {
            Subject::Device(_) => MAX_DEVICE_VALIDITY_DAYS,
            Subject::Bridge(_) => MAX_BRIDGE_VALIDITY_DAYS,
        }
    }

    /// Where the CLI writes this subject's files: `DIR/devices/` or `DIR/bridges/`.
    pub fn default_out_dir(&self, pki_dir: &Path) -> PathBuf {
        match self {
            Subject::Device(_) => pki_dir.join(paths::DEVICES),
            Subject::Bridge(_) => pki_dir.join(paths::BRIDGES),
        }
    }
}

/// A freshly issued client certificate.
#[derive(Clone)]
pub struct Issued {
    pub certificate_pem: String,
    /// PKCS#8 PEM of the generated key; `None` when issued from a CSR (the key stays with its owner).
    pub private_key_pem: Option<String>,
    /// Lowercase hex, no separators.
    pub serial_hex: String,
    /// SHA-256 of the DER certificate, lowercase hex.
    pub fingerprint_sha256: String,
    pub common_name: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("common_name", &self.common_name)
            .field("serial_hex", &self.serial_hex)
            .field("not_after", &self.not_after)
            .field(
                "private_key_pem",
                &self.private_key_pem.as_ref().map(|_| ".."),
            )
            .finish_non_exhaustive()
    }
}

/// The files [`Issued::write_files`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedFiles {
    pub cert: PathBuf,
    pub key: Option<PathBuf>,
}

impl Issued {
    /// Writes `<dir>/<CN>.crt` (0644) and, if there is a key, `<dir>/<CN>.key` (0600).
    pub fn write_files(&self, dir: &Path) -> Result<IssuedFiles, PkiError> {
        ensure_dir(dir).map_err(|e| PkiError::io(dir, e))?;
        let cert = dir.join(format!("{}.crt", self.common_name));
        write_atomic(&cert, self.certificate_pem.as_bytes(), PUBLIC_MODE)
            .map_err(|e| PkiError::io(&cert, e))?;
        let key = match &self.private_key_pem {
            Some(pem) => {
                let key = dir.join(format!("{}.key", self.common_name));
                write_atomic(&key, pem.as_bytes(), KEY_MODE).map_err(|e| PkiError::io(&key, e))?;
                Some(key)
            }
            None => None,
        };
        Ok(IssuedFiles { cert, key })
    }
}

/// What `init` did with one artefact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Created,
    Kept,
    Reissued(String),
}

/// What [`Ca::init`] did; `Display` prints one line per artefact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitReport {
    pub dir: PathBuf,
    pub ca: Action,
    pub server: Action,
    pub crl: Action,
    /// Warnings for the operator (e.g. the CA itself expires soon: rotate it).
    pub warnings: Vec<String>,
}

impl fmt::Display for InitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let line = |f: &mut fmt::Formatter<'_>, what: &str, file: &str, a: &Action| match a {
            Action::Created => writeln!(f, "{what}: created {}", self.dir.join(file).display()),
            Action::Kept => writeln!(f, "{what}: kept {}", self.dir.join(file).display()),
            Action::Reissued(why) => writeln!(
                f,
                "{what}: re-issued {} ({why})",
                self.dir.join(file).display()
            ),
        };
        line(f, "ca", paths::CA_CERT, &self.ca)?;
        line(f, "server certificate", paths::SERVER_CERT, &self.server)?;
        line(f, "crl", paths::CRL_PEM, &self.crl)?;
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        Ok(())
    }
}

/// The CRL that was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlInfo {
    pub number: u64,
    pub this_update: OffsetDateTime,
    pub next_update: OffsetDateTime,
    /// Serials listed (lowercase hex).
    pub revoked: Vec<String>,
    pub pem_path: PathBuf,
    pub der_path: PathBuf,
}

/// A loaded CA. Cheap to share behind an `Arc`: every mutation takes the directory's
/// lock file, so several processes (CLI, HTTP API) can use one directory.
/// Blocking file I/O: call it from `spawn_blocking` in async code.
pub struct Ca {
    dir: PathBuf,
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
    /// The CA's subject key identifier, reused as the CRL's authority key identifier.
    key_id: Vec<u8>,
    crl_url: String,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("dir", &self.dir)
            .field("crl_url", &self.crl_url)
            .finish_non_exhaustive()
    }
}

fn now() -> OffsetDateTime {
    // Certificates carry whole seconds; keep the values we report equal to what is encoded.
    OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| OffsetDateTime::now_utc())
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

fn random_serial() -> Vec<u8> {
    // 128 random bits; the top bit cleared keeps the INTEGER positive and the first byte
    // non-zero keeps the DER encoding exactly 16 bytes (so hex = the encoded value).
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f).max(1);
    bytes.to_vec()
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Argus");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn read_text(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|e| PkiError::io(path, e))
}

fn pem_to_der(pem_text: &str, what: &str) -> Result<Vec<u8>, PkiError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem_text.as_bytes())
        .map_err(|e| PkiError::Parse(format!("{what}: not PEM: {e}")))?;
    Ok(pem.contents)
}

fn parse_cert<'a>(der: &'a [u8], what: &str) -> Result<X509Certificate<'a>, PkiError> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| PkiError::Parse(format!("{what}: {e}")))
}

fn to_offset(t: x509_parser::time::ASN1Time) -> OffsetDateTime {
    t.to_datetime()
}

/// Parses and checks a CSR (PEM): its signature must verify. Everything it asks for
/// (subject, extensions) is ignored; only the public key is used.
fn csr_public_key(csr_pem: &str) -> Result<rcgen::SubjectPublicKeyInfo, PkiError> {
    use x509_parser::certification_request::X509CertificationRequest;
    let (_, pem) = x509_parser::pem::parse_x509_pem(csr_pem.trim_start().as_bytes())
        .map_err(|_| PkiError::InvalidCsr("not a PEM CERTIFICATE REQUEST".into()))?;
    if pem.label != "CERTIFICATE REQUEST" && pem.label != "NEW CERTIFICATE REQUEST" {
        return Err(PkiError::InvalidCsr(format!(
            "PEM label is {:?}, expected \"CERTIFICATE REQUEST\"",
            pem.label
        )));
    }
    let (_, csr) = X509CertificationRequest::from_der(&pem.contents)
        .map_err(|e| PkiError::InvalidCsr(format!("not a PKCS#10 request: {e}")))?;
    csr.verify_signature()
        .map_err(|_| PkiError::InvalidCsr("the request's signature does not verify".into()))?;
    rcgen::SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
        .map_err(|_| PkiError::InvalidCsr("unsupported public key algorithm".into()))
}

fn fingerprint(der: &[u8]) -> String {
    hex::encode(digest(&SHA256, der))
}

impl Ca {
    /// Creates what is missing in `dir`: the CA (10 years; never overwritten), the broker's
    /// server certificate (1 year; re-issued when missing, expiring within 30 days, lacking
    /// a requested SAN, or not signed by this CA) and the CRL (written when missing or due
    /// within a day). `extra_sans` are added to [`DEFAULT_SANS`].
    pub fn init(dir: &Path, extra_sans: &[String]) -> Result<InitReport, PkiError> {
        ensure_dir(dir).map_err(|e| PkiError::io(dir, e))?;
        let _lock = DirLock::acquire(dir).map_err(|e| PkiError::io(dir, e))?;
        let mut warnings = Vec::new();
        let ca_crt = dir.join(paths::CA_CERT);
        let ca_key = dir.join(paths::CA_KEY);
        let ca_action = match (ca_crt.exists(), ca_key.exists()) {
            (true, true) => Action::Kept,
            (false, false) => {
                Self::create_ca(dir)?;
                Action::Created
            }
            (crt, _) => {
                return Err(PkiError::CaIncomplete(format!(
                "{} exists but {} does not; refusing to create a new CA over it (see docs/pki.md)",
                if crt {
                    ca_crt.display()
                } else {
                    ca_key.display()
                },
                if crt {
                    ca_key.display()
                } else {
                    ca_crt.display()
                },
            )))
            }
        };
        let ca = Self::load(dir)?;
        let mut index = Index::read(dir)?;
        if ca_action == Action::Created {
            let der = pem_to_der(&ca.ca_pem, "ca.crt")?;
            let cert = parse_cert(&der, "ca.crt")?;
            index.certificates.push(IndexEntry {
                serial: hex::encode(cert.raw_serial()),
                kind: CertKind::Ca,
                common_name: cert
                    .subject()
                    .iter_common_name()
                    .next()
                    .and_then(|c| c.as_str().ok())
                    .unwrap_or_default()
                    .to_string(),
                not_before: rfc3339(to_offset(cert.validity().not_before)),
                not_after: rfc3339(to_offset(cert.validity().not_after)),
                fingerprint_sha256: fingerprint(&der),
                issued_at: rfc3339(now()),
                revoked_at: None,
                revocation_reason: None,
            });
        }
        if let Some(until) = ca.ca_not_after()? {
            if until < now() + Duration::days(365) {
                warnings.push(format!(
                    "the CA expires on {}; plan its rotation (docs/pki.md)",
                    rfc3339(until)
                ));
            }
        }

        let mut sans: Vec<String> = DEFAULT_SANS.iter().map(|s| s.to_string()).collect();
        for s in extra_sans {
            if !sans.contains(s) {
                sans.push(s.clone());
            }
        }
        let server_action = match ca.server_cert_problem(&sans)? {
            None => Action::Kept,
            Some(problem) => {
                ca.issue_server(&sans, &mut index)?;
                if problem == "missing" {
                    Action::Created
                } else {
                    Action::Reissued(problem)
                }
            }
        };

        let crl_action = match ca.crl_problem()? {
            None => Action::Kept,
            Some(problem) => {
                ca.write_crl_locked(&mut index)?;
                if problem == "missing" {
                    Action::Created
                } else {
                    Action::Reissued(problem)
                }
            }
        };
        index.write(dir)?;
        Ok(InitReport {
            dir: dir.to_path_buf(),
            ca: ca_action,
            server: server_action,
            crl: crl_action,
            warnings,
        })
    }

    fn create_ca(dir: &Path) -> Result<(), PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let start = now();
        let mut params = CertificateParams::default();
        // A dated name tells two CAs apart during a rotation (both sit in the broker's cafile).
        params.distinguished_name = dn(&format!(
            "Argus IoT CA {:04}-{:02}-{:02}",
            start.year(),
            u8::from(start.month()),
            start.day()
        ));
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        params.not_before = start - BACKDATE;
        params.not_after = start + Duration::days(CA_VALIDITY_DAYS);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        // The key first, with O_EXCL: an existing CA key is never replaced.
        let key_path = dir.join(paths::CA_KEY);
        write_new(&key_path, key.serialize_pem().as_bytes(), KEY_MODE)
            .map_err(|e| PkiError::io(&key_path, e))?;
        let crt_path = dir.join(paths::CA_CERT);
        write_atomic(&crt_path, cert.pem().as_bytes(), PUBLIC_MODE)
            .map_err(|e| PkiError::io(&crt_path, e))
    }

    /// Loads the CA from `dir` (`ca.crt` + `ca.key`), with [`DEFAULT_CRL_URL`].
    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        let crt_path = dir.join(paths::CA_CERT);
        let key_path = dir.join(paths::CA_KEY);
        if !crt_path.exists() || !key_path.exists() {
            return Err(PkiError::NotInitialized(dir.to_path_buf()));
        }
        let ca_pem = read_text(&crt_path)?;
        let key_pem = read_text(&key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|_| {
            PkiError::Parse(format!("{}: not a usable private key", key_path.display()))
        })?;
        let der = pem_to_der(&ca_pem, "ca.crt")?;
        let key_id = {
            let cert = parse_cert(&der, "ca.crt")?;
            if cert.public_key().raw != key.subject_public_key_info().as_slice() {
                return Err(PkiError::CaIncomplete(format!(
                    "{} does not belong to {}",
                    key_path.display(),
                    crt_path.display()
                )));
            }
            cert.extensions()
                .iter()
                .find_map(|e| match e.parsed_extension() {
                    x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => {
                        Some(k.0.to_vec())
                    }
                    _ => None,
                })
                .unwrap_or_else(|| {
                    digest(&SHA256, &key.subject_public_key_info()).as_ref()[..20].to_vec()
                })
        };
        let issuer = Issuer::from_ca_cert_der(&der.into(), key)?;
        Ok(Ca {
            dir: dir.to_path_buf(),
            ca_pem,
            issuer,
            key_id,
            crl_url: DEFAULT_CRL_URL.to_string(),
        })
    }

    /// Sets the CRL distribution point URL written into client certificates.
    pub fn with_crl_url(mut self, url: impl Into<String>) -> Ca {
        self.crl_url = url.into();
        self
    }

    pub fn crl_url(&self) -> &str {
        &self.crl_url
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate (PEM), what clients and the broker trust.
    pub fn ca_certificate_pem(&self) -> &str {
        &self.ca_pem
    }

    fn ca_not_after(&self) -> Result<Option<OffsetDateTime>, PkiError> {
        let der = pem_to_der(&self.ca_pem, "ca.crt")?;
        let cert = parse_cert(&der, "ca.crt")?;
        Ok(Some(to_offset(cert.validity().not_after)))
    }

    /// `Some(reason)` when the server certificate must be (re-)issued.
    fn server_cert_problem(&self, sans: &[String]) -> Result<Option<String>, PkiError> {
        let crt = self.dir.join(paths::SERVER_CERT);
        let key = self.dir.join(paths::SERVER_KEY);
        if !crt.exists() || !key.exists() {
            return Ok(Some("missing".into()));
        }
        let der = match pem_to_der(&read_text(&crt)?, "server.crt") {
            Ok(d) => d,
            Err(_) => return Ok(Some("unreadable".into())),
        };
        let Ok(cert) = parse_cert(&der, "server.crt") else {
            return Ok(Some("unreadable".into()));
        };
        if to_offset(cert.validity().not_after) < now() + Duration::days(RENEW_WITHIN_DAYS) {
            return Ok(Some(format!("expires within {RENEW_WITHIN_DAYS} days")));
        }
        if !self.signed_by_me(&cert)? {
            return Ok(Some("not signed by this CA".into()));
        }
        let present: Vec<String> = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|ext| {
                ext.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                        x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                            4 => <[u8; 4]>::try_from(*b)
                                .ok()
                                .map(|a| std::net::IpAddr::from(a).to_string()),
                            16 => <[u8; 16]>::try_from(*b)
                                .ok()
                                .map(|a| std::net::IpAddr::from(a).to_string()),
                            _ => None,
                        },
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        if let Some(missing) = sans.iter().find(|s| !present.contains(s)) {
            return Ok(Some(format!("SAN {missing} was missing")));
        }
        Ok(None)
    }

    fn signed_by_me(&self, cert: &X509Certificate<'_>) -> Result<bool, PkiError> {
        let der = pem_to_der(&self.ca_pem, "ca.crt")?;
        let ca = parse_cert(&der, "ca.crt")?;
        Ok(cert.verify_signature(Some(ca.public_key())).is_ok())
    }

    fn issue_server(&self, sans: &[String], index: &mut Index) -> Result<(), PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(sans.to_vec())?;
        let start = now();
        let serial = random_serial();
        params.distinguished_name = dn("Argus MQTT broker");
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = start - BACKDATE;
        params.not_after = start + Duration::days(SERVER_VALIDITY_DAYS);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        let key_path = self.dir.join(paths::SERVER_KEY);
        write_atomic(&key_path, key.serialize_pem().as_bytes(), KEY_MODE)
            .map_err(|e| PkiError::io(&key_path, e))?;
        let crt_path = self.dir.join(paths::SERVER_CERT);
        write_atomic(&crt_path, cert.pem().as_bytes(), PUBLIC_MODE)
            .map_err(|e| PkiError::io(&crt_path, e))?;
        index.certificates.push(IndexEntry {
            serial: hex::encode(&serial),
            kind: CertKind::Server,
            common_name: "Argus MQTT broker".into(),
            not_before: rfc3339(params.not_before),
            not_after: rfc3339(params.not_after),
            fingerprint_sha256: fingerprint(cert.der()),
            issued_at: rfc3339(start),
            revoked_at: None,
            revocation_reason: None,
        });
        Ok(())
    }

    /// When the CRL on disk was signed and when it says the next one is due; `None`
    /// when there is none, or it cannot be read.
    pub fn crl_times(&self) -> Result<Option<(OffsetDateTime, OffsetDateTime)>, PkiError> {
        let pem_path = self.dir.join(paths::CRL_PEM);
        if !pem_path.exists() {
            return Ok(None);
        }
        let Ok(der) = pem_to_der(&read_text(&pem_path)?, "crl.pem") else {
            return Ok(None);
        };
        let Ok((_, crl)) = x509_parser::revocation_list::CertificateRevocationList::from_der(&der)
        else {
            return Ok(None);
        };
        Ok(crl
            .next_update()
            .map(|next| (to_offset(crl.last_update()), to_offset(next))))
    }

    /// `Some(reason)` when the CRL files must be (re-)written.
    fn crl_problem(&self) -> Result<Option<String>, PkiError> {
        let pem_path = self.dir.join(paths::CRL_PEM);
        if !pem_path.exists() || !self.dir.join(paths::CRL_DER).exists() {
            return Ok(Some("missing".into()));
        }
        let Ok(der) = pem_to_der(&read_text(&pem_path)?, "crl.pem") else {
            return Ok(Some("unreadable".into()));
        };
        let Ok((_, crl)) = x509_parser::revocation_list::CertificateRevocationList::from_der(&der)
        else {
            return Ok(Some("unreadable".into()));
        };
        let ca_der = pem_to_der(&self.ca_pem, "ca.crt")?;
        let ca = parse_cert(&ca_der, "ca.crt")?;
        if crl.verify_signature(ca.public_key()).is_err() {
            return Ok(Some("not signed by this CA".into()));
        }
        match crl.next_update() {
            Some(next) if to_offset(next) > now() + Duration::days(1) => Ok(None),
            _ => Ok(Some("next update due within a day".into())),
        }
    }

    /// Issues a client certificate valid from now for `validity_days` (1..=365 for
    /// devices, 1..=825 for bridges). With `csr_pem`, the CSR's signature is verified and
    /// only its public key is used (subject and extensions are replaced); no key is returned.
    pub fn issue(
        &self,
        subject: &Subject,
        validity_days: u32,
        csr_pem: Option<&str>,
    ) -> Result<Issued, PkiError> {
        let max = subject.max_validity_days();
        if validity_days == 0 || validity_days > max {
            return Err(PkiError::InvalidValidity {
                max,
                got: validity_days,
            });
        }
        let start = now();
        self.issue_window(
            subject,
            start - BACKDATE,
            start + Duration::days(i64::from(validity_days)),
            csr_pem,
        )
    }

    /// Issues with an explicit validity window and no maximum (tools and tests: e.g. an
    /// already expired certificate). Recorded in the index like any other.
    pub fn issue_window(
        &self,
        subject: &Subject,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        csr_pem: Option<&str>,
    ) -> Result<Issued, PkiError> {
        if not_after <= not_before {
            return Err(PkiError::InvalidValidity {
                max: subject.max_validity_days(),
                got: 0,
            });
        }
        let issued = self.sign_client(subject, not_before, not_after, csr_pem)?;
        let _lock = DirLock::acquire(&self.dir).map_err(|e| PkiError::io(&self.dir, e))?;
        let mut index = Index::read(&self.dir)?;
        index.certificates.push(entry_for(&issued, subject.kind()));
        index.write(&self.dir)?;
        Ok(issued)
    }

    /// Issues one certificate (with a generated key) per subject, taking the lock and
    /// rewriting the index once: for load tests that need thousands of device identities.
    pub fn issue_many(
        &self,
        subjects: &[Subject],
        validity_days: u32,
    ) -> Result<Vec<Issued>, PkiError> {
        let start = now();
        let mut out = Vec::with_capacity(subjects.len());
        for s in subjects {
            let max = s.max_validity_days();
            if validity_days == 0 || validity_days > max {
                return Err(PkiError::InvalidValidity {
                    max,
                    got: validity_days,
                });
            }
            out.push(self.sign_client(
                s,
                start - BACKDATE,
                start + Duration::days(i64::from(validity_days)),
                None,
            )?);
        }
        let _lock = DirLock::acquire(&self.dir).map_err(|e| PkiError::io(&self.dir, e))?;
        let mut index = Index::read(&self.dir)?;
        for (issued, s) in out.iter().zip(subjects) {
            index.certificates.push(entry_for(issued, s.kind()));
        }
        index.write(&self.dir)?;
        Ok(out)
    }

    fn sign_client(
        &self,
        subject: &Subject,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        csr_pem: Option<&str>,
    ) -> Result<Issued, PkiError> {
        let cn = subject.common_name();
        let serial = random_serial();
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(&cn);
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = not_before.replace_nanosecond(0).unwrap_or(not_before);
        params.not_after = not_after.replace_nanosecond(0).unwrap_or(not_after);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        if !self.crl_url.is_empty() {
            params.crl_distribution_points = vec![CrlDistributionPoint {
                uris: vec![self.crl_url.clone()],
            }];
        }
        let (cert, key_pem) = match csr_pem {
            None => {
                let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
                (
                    params.signed_by(&key, &self.issuer)?,
                    Some(key.serialize_pem()),
                )
            }
            Some(pem) => {
                let public_key = csr_public_key(pem)?;
                (params.signed_by(&public_key, &self.issuer)?, None)
            }
        };
        Ok(Issued {
            certificate_pem: cert.pem(),
            private_key_pem: key_pem,
            serial_hex: hex::encode(&serial),
            fingerprint_sha256: fingerprint(cert.der()),
            common_name: cn,
            not_before: params.not_before,
            not_after: params.not_after,
        })
    }

    /// Every certificate in the index.
    pub fn certificates(&self) -> Result<Vec<IndexEntry>, PkiError> {
        Ok(Index::read(&self.dir)?.certificates)
    }

    /// Revokes one certificate by serial (hex, any case, `:` separators allowed) and
    /// rewrites the CRL. Returns `false` if it was already revoked (the CRL is still refreshed).
    pub fn revoke(&self, serial: &str, reason: RevocationReason) -> Result<bool, PkiError> {
        let serial = normalize_serial(serial)?;
        let _lock = DirLock::acquire(&self.dir).map_err(|e| PkiError::io(&self.dir, e))?;
        let mut index = Index::read(&self.dir)?;
        let entry = index
            .find_mut(&serial)
            .ok_or_else(|| PkiError::UnknownSerial(serial.clone()))?;
        let newly = entry.revoked_at.is_none();
        if newly {
            entry.revoked_at = Some(rfc3339(now()));
            entry.revocation_reason = Some(reason.as_str().to_string());
        }
        self.write_crl_locked(&mut index)?;
        index.write(&self.dir)?;
        Ok(newly)
    }

    /// Revokes every not-yet-revoked certificate whose CN is `device`, rewrites the CRL,
    /// and returns the serials revoked now (empty if there were none).
    pub fn revoke_device(
        &self,
        device: Uuid,
        reason: RevocationReason,
    ) -> Result<Vec<String>, PkiError> {
        let cn = device.hyphenated().to_string();
        let _lock = DirLock::acquire(&self.dir).map_err(|e| PkiError::io(&self.dir, e))?;
        let mut index = Index::read(&self.dir)?;
        let at = rfc3339(now());
        let mut serials = Vec::new();
        for e in index
            .certificates
            .iter_mut()
            .filter(|e| e.kind == CertKind::Device && e.common_name == cn && e.revoked_at.is_none())
        {
            e.revoked_at = Some(at.clone());
            e.revocation_reason = Some(reason.as_str().to_string());
            serials.push(e.serial.clone());
        }
        self.write_crl_locked(&mut index)?;
        index.write(&self.dir)?;
        Ok(serials)
    }

    /// Writes a fresh CRL (`crl.pem` and `crl.der`, next update in [`CRL_NEXT_UPDATE_DAYS`]
    /// days, CRL number incremented). Brokers must reload it (Mosquitto: SIGHUP).
    pub fn write_crl(&self) -> Result<CrlInfo, PkiError> {
        let _lock = DirLock::acquire(&self.dir).map_err(|e| PkiError::io(&self.dir, e))?;
        let mut index = Index::read(&self.dir)?;
        let info = self.write_crl_locked(&mut index)?;
        index.write(&self.dir)?;
        Ok(info)
    }

    fn write_crl_locked(&self, index: &mut Index) -> Result<CrlInfo, PkiError> {
        index.crl_number += 1;
        let start = now();
        let mut revoked = Vec::new();
        let mut revoked_certs = Vec::new();
        for e in &index.certificates {
            let Some(at) = &e.revoked_at else { continue };
            let serial = hex::decode(&e.serial)
                .map_err(|_| PkiError::CorruptIndex(format!("bad serial {:?}", e.serial)))?;
            let time = OffsetDateTime::parse(at, &Rfc3339)
                .map_err(|_| PkiError::CorruptIndex(format!("bad revoked_at {at:?}")))?;
            revoked_certs.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial),
                revocation_time: time,
                reason_code: e
                    .revocation_reason
                    .as_deref()
                    .and_then(|r| r.parse::<RevocationReason>().ok())
                    .map(RevocationReason::to_rcgen),
                invalidity_date: None,
            });
            revoked.push(e.serial.clone());
        }
        let number = index.crl_number;
        let number_bytes = number.to_be_bytes();
        let first = number_bytes.iter().position(|b| *b != 0).unwrap_or(7);
        let params = CertificateRevocationListParams {
            this_update: start - Duration::minutes(1),
            next_update: start + Duration::days(CRL_NEXT_UPDATE_DAYS),
            crl_number: SerialNumber::from_slice(&number_bytes[first..]),
            // The same URL as the certificates' CRL distribution point: a CRL
            // without it is not applied by EMQX's CRL check, and one whose
            // point differs from the certificate's does not cover it (RFC 5280
            // §5.2.5, §6.3.3).
            issuing_distribution_point: (!self.crl_url.is_empty()).then(|| {
                CrlIssuingDistributionPoint {
                    distribution_point: CrlDistributionPoint {
                        uris: vec![self.crl_url.clone()],
                    },
                    scope: None,
                }
            }),
            revoked_certs,
            key_identifier_method: KeyIdMethod::PreSpecified(self.key_id.clone()),
        };
        let crl = params.signed_by(&self.issuer)?;
        let der_path = self.dir.join(paths::CRL_DER);
        let pem_path = self.dir.join(paths::CRL_PEM);
        // The broker plugin cuts the live sessions of each new line's identity, and
        // again 1 s and 3 s later, so a reconnect before the broker has reloaded the
        // CRL written below is cut too.
        let identities: String = index
            .certificates
            .iter()
            .filter(|e| e.revoked_at.is_some())
            .map(|e| format!("{} {}\n", e.common_name, e.serial))
            .collect();
        let list_path = self.dir.join(paths::REVOKED_IDENTITIES);
        write_atomic(&list_path, identities.as_bytes(), PUBLIC_MODE)
            .map_err(|e| PkiError::io(&list_path, e))?;
        write_atomic(&der_path, crl.der(), PUBLIC_MODE).map_err(|e| PkiError::io(&der_path, e))?;
        write_atomic(&pem_path, crl.pem()?.as_bytes(), PUBLIC_MODE)
            .map_err(|e| PkiError::io(&pem_path, e))?;
        Ok(CrlInfo {
            number,
            this_update: params.this_update,
            next_update: params.next_update,
            revoked,
            pem_path,
            der_path,
        })
    }

    /// The current CRL (PEM), written first if there is none.
    pub fn crl_pem(&self) -> Result<String, PkiError> {
        let path = self.dir.join(paths::CRL_PEM);
        if !path.exists() {
            self.write_crl()?;
        }
        read_text(&path)
    }

    /// The current CRL (DER), written first if there is none.
    pub fn crl_der(&self) -> Result<Vec<u8>, PkiError> {
        let path = self.dir.join(paths::CRL_DER);
        if !path.exists() {
            self.write_crl()?;
        }
        std::fs::read(&path).map_err(|e| PkiError::io(&path, e))
    }
}

fn entry_for(issued: &Issued, kind: CertKind) -> IndexEntry {
    IndexEntry {
        serial: issued.serial_hex.clone(),
        kind,
        common_name: issued.common_name.clone(),
        not_before: rfc3339(issued.not_before),
        not_after: rfc3339(issued.not_after),
        fingerprint_sha256: issued.fingerprint_sha256.clone(),
        issued_at: rfc3339(now()),
        revoked_at: None,
        revocation_reason: None,
    }
}

/// Lowercase hex without separators; accepts `AB:CD` and `0x` forms.
pub fn normalize_serial(serial: &str) -> Result<String, PkiError> {
    let s: String = serial
        .trim()
        .trim_start_matches("0x")
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(PkiError::InvalidName(format!(
            "serial {serial:?} is not hex"
        )));
    }
    Ok(s)
}
