//! CSR parsing in the certificate API: `argus_pki::Ca::issue(.., Some(csr_pem))`,
//! what `POST /api/v1/devices/{id}/certificate` with `{"csr": ...}` calls.
//!
//! Properties: a CSR is either refused as `InvalidCsr` (a 400 naming `csr`), or
//! accepted, and then the certificate's subject is the device id (whatever the CSR
//! asked for) and no private key is returned. Nothing else (I/O, signing) may fail.
//! The CA is created once per process in a temporary directory.
#![no_main]

use std::sync::OnceLock;

use argus_pki::{Ca, PkiError, Subject};
use libfuzzer_sys::fuzz_target;
use uuid::Uuid;

const DEVICE: Uuid = Uuid::from_u128(0x0d000000_0000_4000_8000_000000000001);

fn ca() -> &'static Ca {
    static CA: OnceLock<(tempfile::TempDir, Ca)> = OnceLock::new();
    &CA.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        Ca::init(dir.path(), &[]).expect("init");
        let ca = Ca::load(dir.path()).expect("load");
        (dir, ca)
    })
    .1
}

fuzz_target!(|data: &[u8]| {
    // The API takes the CSR from a JSON string: always UTF-8.
    let Ok(pem) = std::str::from_utf8(data) else {
        return;
    };
    match ca().issue(&Subject::Device(DEVICE), 1, Some(pem)) {
        Err(PkiError::InvalidCsr(_)) => {}
        Err(other) => panic!("a bad CSR must be InvalidCsr, got {other:?}"),
        Ok(issued) => {
            assert!(issued.private_key_pem.is_none());
            assert_eq!(issued.common_name, DEVICE.to_string());
            assert!(issued
                .certificate_pem
                .starts_with("-----BEGIN CERTIFICATE-----"));
        }
    }
});
