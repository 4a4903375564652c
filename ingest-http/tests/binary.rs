//! The real binary: flags from the environment, serve (devices on `--listen`, operators
//! on `--admin-listen`), graceful SIGTERM; refuses a short admin token without printing
//! it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use argus_testkit::nats::NatsServer;
use argus_testkit::redis::RedisServer;
use common::*;
use reqwest::StatusCode;

const BIN: &str = env!("CARGO_BIN_EXE_argus-ingest-http");

#[test]
fn refuses_a_short_admin_token_without_printing_it() {
    let out = Command::new(BIN)
        .env_clear()
        .env("DATABASE_URL", "postgres://x@127.0.0.1:1/none")
        .env("NATS_URLS", "nats://127.0.0.1:1")
        .env("ARGUS_ADMIN_TOKEN", "short-secret")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--admin-token"), "{stderr}");
    assert!(!stderr.contains("short-secret"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_to_start_when_a_reading_could_not_fit_nats_max_payload() {
    let nats = NatsServer::start().await;
    let out = Command::new(BIN)
        .env_clear()
        .env("DATABASE_URL", "postgres://x@127.0.0.1:1/none")
        .env("NATS_URLS", nats.url())
        .env("NATS_USER", "ingest-http")
        .env("NATS_PASSWORD", nats.credentials("ingest-http").password)
        .env("ARGUS_ADMIN_TOKEN", ADMIN_TOKEN)
        // NATS's default max_payload: the envelope of such a reading is larger.
        .env("ARGUS_HTTP_MAX_READING_BYTES", "1048576")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--max-reading-bytes 1048576"), "{stderr}");
    assert!(stderr.contains("max_payload of 1048576"), "{stderr}");
}

#[tokio::test]
async fn serves_from_env_and_stops_gracefully_on_sigterm() {
    let (db, nats, redis) = tokio::join!(
        argus_testkit::pg::TestDb::create(),
        NatsServer::start(),
        RedisServer::start()
    );
    prepare_database(db.url()).await;
    apply_streams(&nats).await;
    let (port, admin_port) = (argus_testkit::free_port(), argus_testkit::free_port());
    let mut child = Command::new(BIN)
        .env_clear()
        .env("DATABASE_URL", db.url_as(argus_schema::roles::INGEST))
        .env("ADMIN_DATABASE_URL", db.url_as(argus_schema::roles::ADMIN))
        .env("NATS_URLS", nats.url())
        .env("NATS_USER", "ingest-http")
        .env("NATS_PASSWORD", nats.credentials("ingest-http").password)
        .env("REDIS_URL", redis.url())
        .env("ARGUS_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("ARGUS_HTTP_LISTEN", format!("127.0.0.1:{port}"))
        .env("ARGUS_HTTP_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        argus_testkit::wait_for_port(port, Duration::from_secs(20)).await,
        "the binary did not listen"
    );
    let http = reqwest::Client::new();
    assert!(argus_testkit::wait_for_port(admin_port, Duration::from_secs(20)).await);
    let base = format!("http://127.0.0.1:{port}");
    let admin = format!("http://127.0.0.1:{admin_port}");
    let resp = http
        .post(format!("{admin}/api/v1/devices/{DEVICE}/api-keys"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let key = resp.json::<serde_json::Value>().await.unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();
    let resp = http
        .post(format!("{base}/api/v1/telemetry/ingest"))
        .header("x-api-key", &key)
        .json(&reading(DEVICE, 21.5))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(row_count(&db.client().await).await, 1);

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "exit status {exit}");
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(!stderr.contains(ADMIN_TOKEN));
    assert!(!stderr.contains(api_key_secret(&key)));
    assert!(stderr.contains("Sink closed"), "{stderr}");
}

/// The CRL number and next update of `dir`'s CRL, from `openssl crl`.
fn crl_number(dir: &std::path::Path) -> u64 {
    let out = Command::new("openssl")
        .args(["crl", "-in"])
        .arg(dir.join("crl.pem"))
        .args(["-noout", "-crlnumber"])
        .output()
        .expect("openssl");
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = text
        .trim()
        .trim_start_matches("crlNumber=")
        .trim_start_matches("0x");
    u64::from_str_radix(hex, 16).unwrap_or_else(|_| panic!("crl number in {text:?}"))
}

#[tokio::test]
async fn re_signs_the_crl_past_its_max_age_and_reports_its_age() {
    // Refused: a max age the 7-day next update does not leave room for.
    let out = Command::new(BIN)
        .env_clear()
        .env("DATABASE_URL", "postgres://x@127.0.0.1:1/none")
        .env("NATS_URLS", "nats://127.0.0.1:1")
        .env("ARGUS_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("ARGUS_HTTP_CRL_MAX_AGE", "7d")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--crl-max-age"));

    let (db, nats) = tokio::join!(argus_testkit::pg::TestDb::create(), NatsServer::start());
    prepare_database(db.url()).await;
    apply_streams(&nats).await;
    let pki = tempfile::tempdir().unwrap();
    argus_pki::Ca::init(pki.path(), &[]).unwrap();
    let first = crl_number(pki.path());
    let (port, admin_port) = (argus_testkit::free_port(), argus_testkit::free_port());
    let mut child = Command::new(BIN)
        .env_clear()
        .env("DATABASE_URL", db.url_as(argus_schema::roles::INGEST))
        .env("ADMIN_DATABASE_URL", db.url_as(argus_schema::roles::ADMIN))
        .env("NATS_URLS", nats.url())
        .env("NATS_USER", "ingest-http")
        .env("NATS_PASSWORD", nats.credentials("ingest-http").password)
        .env("ARGUS_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("ARGUS_PKI_DIR", pki.path())
        .env("ARGUS_HTTP_CRL_MAX_AGE", "1s")
        .env("ARGUS_HTTP_LISTEN", format!("127.0.0.1:{port}"))
        .env("ARGUS_HTTP_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(argus_testkit::wait_for_port(admin_port, Duration::from_secs(20)).await);
    let deadline = Instant::now() + Duration::from_secs(20);
    while crl_number(pki.path()) < first + 2 {
        assert!(Instant::now() < deadline, "the CRL was not re-signed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = reqwest::get(format!("http://127.0.0.1:{admin_port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{metrics}"))
    };
    assert!(value("argus_pki_crl_resigned_total") >= 2.0);
    // Since its thisUpdate, which argus-pki back-dates by a minute for clock skew.
    let age = value("argus_pki_crl_age_seconds");
    assert!((60.0..70.0).contains(&age), "age {age}");
    let next = value("argus_pki_crl_next_update_timestamp_seconds");
    let in_days = (next - chrono::Utc::now().timestamp() as f64) / 86_400.0;
    assert!(
        (6.9..7.1).contains(&in_days),
        "next update in {in_days} days"
    );
    let _ = child.kill();
    let _ = child.wait();
}
