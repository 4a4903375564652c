//! The device certificate API over real HTTP, with a real Postgres and a real CA directory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use argus_ingest_http::admin::AdminToken;
use argus_ingest_http::certificates::{standalone as router, CertState};
use argus_pki::Ca;
use argus_testkit::pg::TestDb;
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;
use x509_parser::prelude::*;

const ADMIN: &str = "test-admin-token-0123456789";

struct Api {
    base: String,
    http: reqwest::Client,
    db: TestDb,
    ca_pem: String,
    device: Uuid,
    _pki: tempfile::TempDir,
}

impl Api {
    async fn start() -> Api {
        let db = TestDb::create().await;
        let mut client = db.client().await;
        argus_schema::migrate::migrate(&mut client).await.unwrap();
        let org = Uuid::new_v4();
        let device = Uuid::new_v4();
        client
            .execute(
                "INSERT INTO organizations (id, name, slug) VALUES ($1, 'Org', $2)",
                &[&org, &org.to_string()],
            )
            .await
            .unwrap();
        client
            .execute(
                "INSERT INTO devices (id, tenant_id, name, network_metadata) \
                 VALUES ($1, $2, 'sensor', '{\"ip\": \"10.0.0.7\"}'::jsonb)",
                &[&device, &org],
            )
            .await
            .unwrap();

        let pki = tempfile::tempdir().unwrap();
        Ca::init(pki.path(), &[]).unwrap();
        let pool =
            argus_ingest_http::state::pg_pool(&db.url_as(argus_schema::roles::ADMIN), 4).unwrap();
        let state = CertState::load(pki.path(), None, pool, AdminToken::new(ADMIN)).unwrap();
        let ca_pem = state.ca.ca_certificate_pem().to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router(state)).await });
        Api {
            base,
            http: reqwest::Client::new(),
            db,
            ca_pem,
            device,
            _pki: pki,
        }
    }

    fn cert_url(&self, device: Uuid) -> String {
        format!("{}/api/v1/devices/{device}/certificate", self.base)
    }

    async fn post(&self, device: Uuid, body: Value) -> (StatusCode, Value) {
        let r = self
            .http
            .post(self.cert_url(device))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status(), r.json().await.unwrap())
    }
}

fn der_of(pem_text: &str) -> Vec<u8> {
    x509_parser::pem::parse_x509_pem(pem_text.as_bytes())
        .unwrap()
        .1
        .contents
}

/// Checks CN, EKU, signature by the CA and expiry; returns the certificate's public key.
fn check_cert(ca_pem: &str, body: &Value, device: Uuid, days: i64) -> Vec<u8> {
    let ca_der = der_of(ca_pem);
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
    assert_eq!(body["caCertificate"].as_str().unwrap(), ca_pem);
    let der = der_of(body["certificate"].as_str().unwrap());
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    cert.verify_signature(Some(ca.public_key())).unwrap();
    let cn = cert.subject().iter_common_name().next().unwrap();
    assert_eq!(cn.as_str().unwrap(), device.to_string());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
    assert_eq!(
        hex::encode(cert.raw_serial()),
        body["serialNumber"].as_str().unwrap()
    );
    let expires =
        chrono::DateTime::parse_from_rfc3339(body["expiresAt"].as_str().unwrap()).unwrap();
    assert_eq!(expires.timestamp(), cert.validity().not_after.timestamp());
    let expected = chrono::Utc::now().timestamp() + days * 86_400;
    assert!((expires.timestamp() - expected).abs() < 120);
    cert.public_key().raw.to_vec()
}

#[tokio::test]
async fn issue_issue_from_csr_revoke_and_crl() {
    let api = Api::start().await;
    let url = api.cert_url(api.device);

    // Issue with a generated key.
    let (status, a) = api.post(api.device, json!({"validityDays": 30})).await;
    assert_eq!(status, StatusCode::CREATED, "{a}");
    assert!(a["privateKey"].as_str().unwrap().contains("PRIVATE KEY"));
    check_cert(&api.ca_pem, &a, api.device, 30);

    // Issue from a CSR whose subject asks for something else: replaced, no key returned.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "bridge-0");
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let (status, b) = api.post(api.device, json!({"csr": csr})).await;
    assert_eq!(status, StatusCode::CREATED, "{b}");
    assert!(b.get("privateKey").is_none());
    let public_key = check_cert(&api.ca_pem, &b, api.device, 365);
    assert_eq!(
        public_key,
        rcgen::PublicKeyData::subject_public_key_info(&key)
    );
    assert_ne!(a["serialNumber"], b["serialNumber"]);

    // Recorded, and network_metadata merged (the existing "ip" stays).
    let client = api.db.client().await;
    let rows = client
        .query(
            "SELECT serial_number, fingerprint_sha256, not_after, revoked_at IS NULL \
             FROM device_certificates WHERE device_id = $1",
            &[&api.device],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows
        .iter()
        .all(|r| r.get::<_, bool>(3) && r.get::<_, String>(1).len() == 64));
    let meta: Value = client
        .query_one(
            "SELECT network_metadata FROM devices WHERE id = $1",
            &[&api.device],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(meta["ip"], "10.0.0.7");
    assert_eq!(meta["certificateIssued"], true);

    // Revoke: both serials, in the database and in the CRL.
    let r = api
        .http
        .delete(&url)
        .bearer_auth(ADMIN)
        .json(&json!({"reason": "keyCompromise"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let revoked: Value = r.json().await.unwrap();
    let mut serials: Vec<String> = revoked["revokedSerialNumbers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    serials.sort();
    let mut expected = vec![
        a["serialNumber"].as_str().unwrap().to_string(),
        b["serialNumber"].as_str().unwrap().to_string(),
    ];
    expected.sort();
    assert_eq!(serials, expected);
    let active: i64 = client
        .query_one(
            "SELECT count(*) FROM device_certificates WHERE device_id = $1 AND revoked_at IS NULL",
            &[&api.device],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(active, 0);
    let meta: Value = client
        .query_one(
            "SELECT network_metadata FROM devices WHERE id = $1",
            &[&api.device],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(meta["ip"], "10.0.0.7");
    assert_eq!(meta["certificateRevoked"], true);
    assert_eq!(meta["certificateIssued"], true);

    let r = api
        .http
        .get(format!("{}/pki/crl.der", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/pkix-crl");
    let der = r.bytes().await.unwrap();
    let (_, crl) = CertificateRevocationList::from_der(&der).unwrap();
    let mut listed: Vec<String> = crl
        .iter_revoked_certificates()
        .map(|c| hex::encode(c.raw_serial()))
        .collect();
    listed.sort();
    assert_eq!(listed, expected);
    let pem = api
        .http
        .get(format!("{}/pki/crl.pem", api.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(pem.starts_with("-----BEGIN X509 CRL-----"));
}

#[tokio::test]
async fn auth_unknown_device_and_bad_input() {
    let api = Api::start().await;
    let url = api.cert_url(api.device);

    let r = api.http.post(&url).json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = api
        .http
        .delete(&url)
        .bearer_auth("wrong-token-wrong-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "forbidden");

    let (status, _) = api.post(Uuid::new_v4(), json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let r = api
        .http
        .delete(api.cert_url(Uuid::new_v4()))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    for (body, field) in [
        (json!({"validityDays": 0}), "validityDays"),
        (json!({"validityDays": 400}), "validityDays"),
        (json!({"validityDays": "ten"}), "validityDays"),
        (
            json!({"csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"}),
            "csr",
        ),
        (json!({"csr": api.ca_pem}), "csr"),
        (json!({"csr": 12}), "csr"),
    ] {
        let (status, err) = api.post(api.device, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let message = err["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(field), "{body}: {message}");
        assert_eq!(err["success"], false);
    }
    // Nothing was issued by the failures.
    let n: i64 = api
        .db
        .client()
        .await
        .query_one("SELECT count(*) FROM device_certificates", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}
