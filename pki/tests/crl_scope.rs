//! The CRL's Issuing Distribution Point, checked with OpenSSL (what Mosquitto
//! verifies with, and the nearest real thing to EMQX's CRL check, which needs
//! the extension and cannot run here), and `--profile production` refusing a
//! CRL URL a broker cannot reach.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use argus_pki::{Ca, RevocationReason, Subject};
use uuid::Uuid;

const URL: &str = "http://ingest-http:8080/pki/crl.der";

fn openssl(args: &[&str], dir: &Path) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl (compose/test installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_crl_names_the_point_the_certificates_name_and_openssl_applies_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    Ca::init(dir, &[]).unwrap();
    let ca = Ca::load(dir).unwrap().with_crl_url(URL);
    let kept = ca
        .issue(&Subject::Device(Uuid::new_v4()), 30, None)
        .unwrap();
    let gone = ca
        .issue(&Subject::Device(Uuid::new_v4()), 30, None)
        .unwrap();
    std::fs::write(dir.join("kept.crt"), &kept.certificate_pem).unwrap();
    std::fs::write(dir.join("gone.crt"), &gone.certificate_pem).unwrap();
    ca.revoke(&gone.serial_hex, RevocationReason::KeyCompromise)
        .unwrap();

    // The broker plugin's list: the revoked certificate's identity and serial only.
    let listed = std::fs::read_to_string(dir.join("revoked-identities.txt")).unwrap();
    assert_eq!(
        listed,
        format!("{} {}\n", gone.common_name, gone.serial_hex)
    );

    let (ok, crl) = openssl(&["crl", "-in", "crl.pem", "-noout", "-text"], dir);
    assert!(ok, "{crl}");
    let idp = crl
        .split("X509v3 Issuing Distribution Point")
        .nth(1)
        .unwrap_or_else(|| panic!("no Issuing Distribution Point:\n{crl}"));
    assert!(idp.contains(&format!("URI:{URL}")), "{crl}");
    let (_, cert) = openssl(&["x509", "-in", "kept.crt", "-noout", "-text"], dir);
    assert!(cert.contains(&format!("URI:{URL}")), "{cert}");

    // OpenSSL takes the CRL as covering these certificates: the revoked one is
    // refused, the other passes (a scope mismatch would fail both).
    let verify = |c: &str| {
        openssl(
            &[
                "verify",
                "-crl_check",
                "-CAfile",
                "ca.crt",
                "-CRLfile",
                "crl.pem",
                c,
            ],
            dir,
        )
    };
    let (ok, out) = verify("kept.crt");
    assert!(ok, "{out}");
    let (ok, out) = verify("gone.crt");
    assert!(!ok && out.contains("revoked"), "{out}");
}

#[test]
fn production_refuses_a_loopback_crl_url() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    let pki = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_argus-pki"))
            .args(["--dir", dir])
            .args(args)
            .env_remove("ARGUS_PKI_CRL_URL")
            .env_remove("ARGUS_PKI_PROFILE")
            .output()
            .unwrap()
    };
    let out = pki(&["init"]);
    assert!(out.status.success());
    let device = Uuid::new_v4().to_string();
    for args in [
        vec!["issue", "--profile", "production", "--device", &device],
        vec![
            "issue",
            "--profile",
            "production",
            "--bridge",
            "bridge-0-0",
            "--crl-url",
            "http://127.0.0.1:8080/pki/crl.der",
        ],
        vec!["crl", "--profile", "production", "--crl-url", ""],
    ] {
        let out = pki(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(
            err.contains("--profile production") && err.contains("--crl-url"),
            "{err}"
        );
    }
    assert!(
        !Path::new(dir)
            .join(format!("devices/{device}.crt"))
            .exists(),
        "nothing issued"
    );
    let out = pki(&[
        "issue",
        "--profile",
        "production",
        "--device",
        &device,
        "--crl-url",
        URL,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = pki(&["crl", "--profile", "production", "--crl-url", URL]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
