//! The CA library and the CLI: files, modes, idempotent init, certificate contents, CSR, CRL.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use argus_pki::{Action, Ca, PkiError, RevocationReason, Subject};
use rcgen::{CertificateParams, DnType, KeyPair};
use uuid::Uuid;
use x509_parser::prelude::*;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn der_of(pem_text: &str) -> Vec<u8> {
    x509_parser::pem::parse_x509_pem(pem_text.as_bytes())
        .unwrap()
        .1
        .contents
}

#[test]
fn init_creates_files_with_modes_and_is_idempotent() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let first = Ca::init(&dir, &[]).unwrap();
    assert_eq!(
        (first.ca.clone(), first.server.clone(), first.crl.clone()),
        (Action::Created, Action::Created, Action::Created)
    );
    for (f, m) in [
        ("ca.crt", 0o644),
        ("ca.key", 0o600),
        ("server.crt", 0o644),
        ("server.key", 0o600),
        ("crl.pem", 0o644),
        ("crl.der", 0o644),
    ] {
        assert_eq!(mode(&dir.join(f)), m, "{f}");
    }
    let ca_before = std::fs::read(dir.join("ca.key")).unwrap();
    let server_before = std::fs::read(dir.join("server.crt")).unwrap();

    let again = Ca::init(&dir, &[]).unwrap();
    assert_eq!(
        (again.ca, again.server, again.crl),
        (Action::Kept, Action::Kept, Action::Kept)
    );
    assert_eq!(
        std::fs::read(dir.join("server.crt")).unwrap(),
        server_before
    );

    // A missing server key: only the server certificate is re-issued, never the CA.
    std::fs::remove_file(dir.join("server.key")).unwrap();
    let third = Ca::init(&dir, &["emqx".to_string()]).unwrap();
    assert_eq!(third.ca, Action::Kept);
    assert_eq!(third.server, Action::Created);
    assert_eq!(std::fs::read(dir.join("ca.key")).unwrap(), ca_before);
    let server_der = der_of(&std::fs::read_to_string(dir.join("server.crt")).unwrap());
    let (_, server) = X509Certificate::from_der(&server_der).unwrap();
    let sans: Vec<String> = server
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert!(
        sans.iter().any(|s| s.contains("emqx")) && sans.iter().any(|s| s.contains("localhost")),
        "{sans:?}"
    );
    assert!(
        server
            .extended_key_usage()
            .unwrap()
            .unwrap()
            .value
            .server_auth
    );

    // A CA key without its certificate is refused, not replaced.
    std::fs::remove_file(dir.join("ca.crt")).unwrap();
    assert!(matches!(
        Ca::init(&dir, &[]),
        Err(PkiError::CaIncomplete(_))
    ));
    assert_eq!(std::fs::read(dir.join("ca.key")).unwrap(), ca_before);
}

#[test]
fn issued_device_certificate_has_cn_eku_serial_validity_and_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    Ca::init(tmp.path(), &[]).unwrap();
    let ca = Ca::load(tmp.path())
        .unwrap()
        .with_crl_url("http://crl.example/ca.der");
    let ca_der = der_of(ca.ca_certificate_pem());
    let (_, ca_cert) = X509Certificate::from_der(&ca_der).unwrap();

    let device = Uuid::new_v4();
    let mut serials = HashSet::new();
    for days in [1u32, 90, 365] {
        let issued = ca.issue(&Subject::Device(device), days, None).unwrap();
        assert!(issued
            .private_key_pem
            .as_deref()
            .unwrap()
            .contains("PRIVATE KEY"));
        let der = der_of(&issued.certificate_pem);
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
        assert_eq!(
            cert.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            device.to_string()
        );
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        // Positive, at least 64 bits, and what we report.
        let raw = cert.raw_serial();
        assert!(raw.len() >= 8 && raw[0] & 0x80 == 0, "{raw:?}");
        assert_eq!(hex::encode(raw), issued.serial_hex);
        assert!(serials.insert(issued.serial_hex.clone()));
        let not_after = cert.validity().not_after.timestamp();
        let expected =
            ::time::OffsetDateTime::now_utc().unix_timestamp() + i64::from(days) * 86_400;
        assert!((not_after - expected).abs() < 120, "validity {days} days");
        assert_eq!(not_after, issued.not_after.unix_timestamp());
        let crl_dp = cert
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::CRLDistributionPoints(p) => Some(format!("{p:?}")),
                _ => None,
            });
        assert!(crl_dp.unwrap().contains("http://crl.example/ca.der"));
    }
    assert!(matches!(
        ca.issue(&Subject::Device(device), 366, None),
        Err(PkiError::InvalidValidity { max: 365, .. })
    ));
    assert!(matches!(
        ca.issue(&Subject::Device(device), 0, None),
        Err(PkiError::InvalidValidity { .. })
    ));
    assert!(Subject::bridge("Bridge 0").is_err());
    let entries = ca.certificates().unwrap();
    assert_eq!(
        entries
            .iter()
            .filter(|e| e.common_name == device.to_string())
            .count(),
        3
    );
}

#[test]
fn csr_subject_is_replaced_and_bad_csrs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    Ca::init(tmp.path(), &[]).unwrap();
    let ca = Ca::load(tmp.path()).unwrap();
    let device = Uuid::new_v4();

    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "bridge-0");
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let issued = ca.issue(&Subject::Device(device), 30, Some(&csr)).unwrap();
    assert!(issued.private_key_pem.is_none());
    let der = der_of(&issued.certificate_pem);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    assert_eq!(
        cert.subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap(),
        device.to_string()
    );
    assert!(
        cert.subject_alternative_name().unwrap().is_none(),
        "requested SANs must be dropped"
    );
    assert_eq!(
        cert.public_key().raw,
        rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
    );

    // A tampered request (signature no longer matches) and garbage.
    let mut csr_der = der_of(&csr);
    let n = csr_der.len();
    csr_der[n - 5] ^= 0x55;
    let tampered = pem_encode("CERTIFICATE REQUEST", &csr_der);
    assert!(matches!(
        ca.issue(&Subject::Device(device), 30, Some(&tampered)),
        Err(PkiError::InvalidCsr(_))
    ));
    assert!(matches!(
        ca.issue(&Subject::Device(device), 30, Some("not a csr")),
        Err(PkiError::InvalidCsr(_))
    ));
    assert!(matches!(
        ca.issue(&Subject::Device(device), 30, Some(ca.ca_certificate_pem())),
        Err(PkiError::InvalidCsr(_))
    ));
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let body: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        body.join("\n")
    )
}

fn crl_serials(ca: &Ca) -> (Vec<String>, u64) {
    let der = ca.crl_der().unwrap();
    let (_, crl) = CertificateRevocationList::from_der(&der).unwrap();
    let ca_der = der_of(ca.ca_certificate_pem());
    let (_, ca_cert) = X509Certificate::from_der(&ca_der).unwrap();
    crl.verify_signature(ca_cert.public_key()).unwrap();
    assert!(crl.next_update().is_some());
    let number = crl
        .crl_number()
        .unwrap()
        .to_u64_digits()
        .first()
        .copied()
        .unwrap_or(0);
    (
        crl.iter_revoked_certificates()
            .map(|r| hex::encode(r.raw_serial()))
            .collect(),
        number,
    )
}

#[test]
fn revocation_lists_serials_and_crl_number_increases() {
    let tmp = tempfile::tempdir().unwrap();
    Ca::init(tmp.path(), &[]).unwrap();
    let ca = Ca::load(tmp.path()).unwrap();
    let (listed, n0) = crl_serials(&ca);
    assert!(listed.is_empty());

    let d1 = Uuid::new_v4();
    let a = ca.issue(&Subject::Device(d1), 30, None).unwrap();
    let b = ca.issue(&Subject::Device(d1), 30, None).unwrap();
    let other = ca
        .issue(&Subject::Device(Uuid::new_v4()), 30, None)
        .unwrap();

    assert!(ca
        .revoke(&a.serial_hex.to_uppercase(), RevocationReason::Superseded)
        .unwrap());
    assert!(!ca
        .revoke(&a.serial_hex, RevocationReason::Superseded)
        .unwrap());
    let (listed, n1) = crl_serials(&ca);
    assert_eq!(listed, vec![a.serial_hex.clone()]);
    assert!(n1 > n0);

    assert_eq!(
        ca.revoke_device(d1, RevocationReason::KeyCompromise)
            .unwrap(),
        vec![b.serial_hex.clone()]
    );
    let (listed, n2) = crl_serials(&ca);
    assert!(n2 > n1);
    assert!(
        listed.contains(&a.serial_hex)
            && listed.contains(&b.serial_hex)
            && !listed.contains(&other.serial_hex)
    );
    assert!(matches!(
        ca.revoke("abcdef", RevocationReason::Unspecified),
        Err(PkiError::UnknownSerial(_))
    ));
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("crl.pem")).unwrap(),
        ca.crl_pem().unwrap()
    );
}

#[test]
fn concurrent_writers_keep_every_entry() {
    let tmp = tempfile::tempdir().unwrap();
    Ca::init(tmp.path(), &[]).unwrap();
    let dir = tmp.path().to_path_buf();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let ca = Ca::load(&dir).unwrap();
                for _ in 0..10 {
                    ca.issue(&Subject::Device(Uuid::new_v4()), 30, None)
                        .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let ca = Ca::load(&dir).unwrap();
    let devices = ca
        .certificates()
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == argus_pki::CertKind::Device)
        .count();
    assert_eq!(devices, 40);
    let many = ca
        .issue_many(
            &[
                Subject::Device(Uuid::new_v4()),
                Subject::bridge("bridge-3").unwrap(),
            ],
            30,
        )
        .unwrap();
    assert_eq!(many.len(), 2);
    assert_eq!(ca.certificates().unwrap().len(), 2 + 40 + 2);
}

#[test]
fn cli_init_issue_revoke_crl() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let bin = env!("CARGO_BIN_EXE_argus-pki");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin)
            .arg("--dir")
            .arg(&dir)
            .args(args)
            .env_remove("ARGUS_PKI_CRL_URL")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(run(&["init"]).contains("ca: created"));
    assert!(run(&["init", "--san", "emqx"]).contains("ca: kept"));
    let device = Uuid::new_v4().to_string();
    let out = run(&["issue", "--device", &device, "--days", "10"]);
    assert_eq!(mode(&dir.join(format!("devices/{device}.key"))), 0o600);
    assert_eq!(mode(&dir.join(format!("devices/{device}.crt"))), 0o644);
    let serial = out
        .split_whitespace()
        .skip_while(|w| *w != "serial")
        .nth(1)
        .unwrap()
        .to_string();
    run(&["issue", "--bridge", "bridge-0"]);
    assert!(dir.join("bridges/bridge-0.crt").exists());
    assert!(run(&["revoke", &serial, "--reason", "key-compromise"])
        .contains(&format!("revoked {serial}")));
    assert!(run(&["crl"]).contains("1 revoked serial"));
    let bad = std::process::Command::new(bin)
        .arg("--dir")
        .arg(&dir)
        .args(["issue", "--device", &device, "--days", "400"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("validity"));
    // The CA key never appears in any output.
    let key = std::fs::read_to_string(dir.join("ca.key")).unwrap();
    let body = key.lines().nth(1).unwrap();
    assert!(!run(&["list"]).contains(body));
}
