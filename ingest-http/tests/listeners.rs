//! The device listener over TLS, as a device sees it: `curl --cacert` reaches it and
//! sends a reading; plain HTTP to it fails; a client that does not trust the CA is
//! refused. The real binary: SIGHUP reloads the certificate without dropping the
//! listener, a bad file on reload keeps the old one; plain HTTP on a non-loopback
//! address, and a loopback CRL URL with the production profile, refuse to start.
//! The certificates are made at run time (`argus_pki::Ca::init`: a CA and a server
//! certificate for localhost and 127.0.0.1).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use argus_ingest_http::tls::CertReloader;
use argus_ingest_http::Limits;
use argus_testkit::nats::NatsServer;
use common::*;
use reqwest::StatusCode;

const BIN: &str = env!("CARGO_BIN_EXE_argus-ingest-http");

/// `curl` with `args`; (exit success, stdout).
fn curl(args: &[&str]) -> (bool, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .args(args)
        .output()
        .expect("curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The servers, a PKI made now (its `ca.crt` for clients), and the sidecar with
/// `limits` serving its device listener over TLS.
async fn tls_app(limits: Limits) -> (Stack, tempfile::TempDir, App) {
    let s = Stack::start().await;
    let pki = tempfile::tempdir().unwrap();
    argus_pki::Ca::init(pki.path(), &[]).expect("pki init");
    let reloader =
        CertReloader::load(pki.path().join("server.crt"), pki.path().join("server.key")).unwrap();
    let app = App::start_tls(
        config(s.db.url(), &s.nats, &s.redis.url(), limits),
        &reloader,
    )
    .await;
    (s, pki, app)
}

// Two worker threads: `curl` blocks this test's thread while the server answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_with_the_ca_reaches_the_tls_listener_and_plain_http_fails() {
    let (s, pki, mut app) = tls_app(test_limits()).await;
    assert!(app.base.starts_with("https://127.0.0.1:"), "{}", app.base);
    let ca = pki.path().join("ca.crt");
    let (_, key) = create_key(&s.http, &app, DEVICE).await;

    let (ok, out) = curl(&["--cacert", path_str(&ca), &app.url("/health")]);
    assert!(ok, "curl --cacert: {out}");
    assert!(out.contains("\"ok\""), "{out}");
    let body = serde_json::to_string(&reading(DEVICE, 20.5)).unwrap();
    let (ok, out) = curl(&[
        "--cacert",
        path_str(&ca),
        "-X",
        "POST",
        "-H",
        &format!("X-API-Key: {key}"),
        "-H",
        "Content-Type: application/json",
        "-d",
        &body,
        &app.url("/api/v1/telemetry/ingest"),
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("messageId"), "{out}");
    assert_eq!(row_count(&s.pg().await).await, 1);

    // The CA is really checked: curl with its system roots only is refused.
    let (ok, _) = curl(&[&app.url("/health")]);
    assert!(!ok, "curl trusted a certificate of a CA it was not given");
    // Plain HTTP to the TLS port gets no answer.
    let plain = app.base.replace("https://", "http://");
    let (ok, out) = curl(&[&format!("{plain}/health")]);
    assert!(!ok, "plain HTTP to the TLS listener answered: {out}");
    let plain = reqwest::get(format!("{plain}/health")).await;
    assert!(plain.is_err(), "{plain:?}");
    app.stop().await;
}

/// Over TLS to `addr`, trusting `ca`, on one connection: each request written whole,
/// then its answer read whole; the answers' status lines, or how the connection failed.
async fn on_one_connection(addr: &str, ca: &Path, requests: &[Vec<u8>]) -> Vec<String> {
    use rustls_pki_types::pem::PemObject;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .unwrap();
    let mut stream = BufReader::new(stream);
    let mut answers = Vec::new();
    for request in requests {
        if let Err(e) = stream.get_mut().write_all(request).await {
            answers.push(format!("write: {:?}", e.kind()));
            break;
        }
        let (mut status, mut length) = (String::new(), 0usize);
        loop {
            let mut line = String::new();
            match stream.read_line(&mut line).await {
                Ok(0) => {
                    status = "closed".into();
                    break;
                }
                Ok(_) if line == "\r\n" => break,
                Ok(_) => {
                    if status.is_empty() {
                        status = line.trim_end().to_owned();
                    } else if let Some(v) =
                        line.to_ascii_lowercase().strip_prefix("content-length:")
                    {
                        length = v.trim().parse().unwrap();
                    }
                }
                Err(e) => {
                    status = format!("read: {:?}", e.kind());
                    break;
                }
            }
        }
        let mut body = vec![0; length];
        let _ = stream.read_exact(&mut body).await;
        let failed = !status.starts_with("HTTP/");
        answers.push(status);
        if failed {
            break;
        }
    }
    answers
}

// A request refused before its body is read (here: an unknown key) leaves its
// connection usable: the sidecar reads and discards the body. Unread, the body made the
// server close the connection after the 403 without saying so, and a client reusing it
// (Python's requests, schemathesis) lost every other request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_with_a_large_body_leaves_its_connection_usable() {
    let (_s, pki, mut app) = tls_app(Limits {
        body_limit: 1024 * 1024,
        ..test_limits()
    })
    .await;
    let ca = pki.path().join("ca.crt");
    let addr = app.base.trim_start_matches("https://").to_owned();
    let body = format!("{{\"a\":\"{}\"}}", "x".repeat(200_000));
    let requests: Vec<Vec<u8>> = (0..3)
        .map(|i| {
            let head = format!(
                "POST /api/v1/telemetry/ingest HTTP/1.1\r\nHost: {addr}\r\nX-API-Key: argus_unknown{i}\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            [head.as_bytes(), body.as_bytes()].concat()
        })
        .collect();
    let answers = on_one_connection(&addr, &ca, &requests).await;
    assert_eq!(answers.len(), 3, "{answers:?}");
    assert!(
        answers.iter().all(|a| a.starts_with("HTTP/1.1 403")),
        "every refusal answered: {answers:?}"
    );
    app.stop().await;
}

/// The binary, serving with `env`; waits until both listeners accept.
fn spawn(env: &[(&str, String)], device_port: u16, admin_port: u16) -> Child {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("ARGUS_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("ARGUS_HTTP_LISTEN", format!("127.0.0.1:{device_port}"))
        .env("ARGUS_HTTP_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

fn copy_cert(from: &Path, to: &Path) {
    std::fs::copy(from.join("server.crt"), to.join("tls.crt")).unwrap();
    std::fs::copy(from.join("server.key"), to.join("tls.key")).unwrap();
}

fn hangup(child: &Child) {
    let status = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// The value of a metric line starting with `series` on the admin listener.
async fn metric(admin: &str, series: &str) -> f64 {
    let text = reqwest::get(format!("{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn sighup_reloads_the_certificate_and_a_bad_file_keeps_the_old_one() {
    let (db, nats) = tokio::join!(argus_testkit::pg::TestDb::create(), NatsServer::start());
    let (old_ca, new_ca, files) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    argus_pki::Ca::init(old_ca.path(), &[]).unwrap();
    argus_pki::Ca::init(new_ca.path(), &[]).unwrap();
    copy_cert(old_ca.path(), files.path());
    let (port, admin_port) = (argus_testkit::free_port(), argus_testkit::free_port());
    let mut child = spawn(
        &[
            ("DATABASE_URL", db.url().to_string()),
            ("NATS_URLS", nats.url()),
            ("NATS_USER", "ingest-http".to_string()),
            ("NATS_PASSWORD", nats.credentials("ingest-http").password),
            (
                "ARGUS_HTTP_TLS_CERT",
                files.path().join("tls.crt").display().to_string(),
            ),
            (
                "ARGUS_HTTP_TLS_KEY",
                files.path().join("tls.key").display().to_string(),
            ),
        ],
        port,
        admin_port,
    );
    assert!(argus_testkit::wait_for_port(admin_port, Duration::from_secs(20)).await);
    let health = format!("https://127.0.0.1:{port}/health");
    let admin = format!("http://127.0.0.1:{admin_port}");
    let trusts = |ca: &Path| curl(&["--cacert", path_str(&ca.join("ca.crt")), &health]).0;
    assert!(trusts(old_ca.path()));
    assert!(!trusts(new_ca.path()));

    // New files, SIGHUP: new handshakes get the new certificate, on the same listener.
    copy_cert(new_ca.path(), files.path());
    hangup(&child);
    wait_for("the new certificate is served", || trusts(new_ca.path())).await;
    assert!(!trusts(old_ca.path()));
    assert_eq!(
        metric(&admin, "argus_http_tls_reloads_total{result=\"ok\"}").await,
        1.0
    );

    // A certificate file that is no certificate: refused, logged, the old one stays.
    std::fs::write(files.path().join("tls.crt"), "not a certificate\n").unwrap();
    hangup(&child);
    let errors = "argus_http_tls_reloads_total{result=\"error\"}";
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&admin, errors).await < 1.0 {
        assert!(Instant::now() < deadline, "the bad reload was not counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        trusts(new_ca.path()),
        "a bad reload dropped the certificate"
    );
    // A key of another certificate: refused too.
    copy_cert(new_ca.path(), files.path());
    std::fs::copy(
        old_ca.path().join("server.key"),
        files.path().join("tls.key"),
    )
    .unwrap();
    hangup(&child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&admin, errors).await < 2.0 {
        assert!(
            Instant::now() < deadline,
            "the mismatched key was not refused"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(trusts(new_ca.path()));
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP ended the process"
    );
    let resp = reqwest::get(format!("{admin}/health")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs the binary with `env` to its refusal at start-up; returns its stderr.
fn refused(env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("DATABASE_URL", "postgres://x@127.0.0.1:1/none")
        .env("NATS_URLS", "nats://127.0.0.1:1")
        .env("ARGUS_ADMIN_TOKEN", ADMIN_TOKEN);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn plain_http_on_a_non_loopback_address_is_refused_without_insecure_http() {
    for addr in ["0.0.0.0:18080", "192.0.2.10:18080", "[::]:18080"] {
        let stderr = refused(&[("ARGUS_HTTP_LISTEN", addr)]);
        assert!(stderr.contains("--listen"), "{stderr}");
        assert!(stderr.contains("--tls-cert"), "{stderr}");
        assert!(stderr.contains("--insecure-http"), "{stderr}");
    }
    // --insecure-http gets past the check (on to the unreachable NATS and Postgres).
    let mut child = Command::new(BIN)
        .env_clear()
        .env("DATABASE_URL", "postgres://x@127.0.0.1:1/none")
        .env("NATS_URLS", "nats://127.0.0.1:1")
        .env("ARGUS_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("ARGUS_HTTP_LISTEN", "0.0.0.0:18080")
        .env("ARGUS_HTTP_INSECURE_HTTP", "true")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("loopback"),
        "--insecure-http was refused: {stderr}"
    );
    // A certificate that cannot be read: refused at start-up, naming the file.
    let stderr = refused(&[
        ("ARGUS_HTTP_LISTEN", "0.0.0.0:18080"),
        ("ARGUS_HTTP_TLS_CERT", "/nonexistent/tls.crt"),
        ("ARGUS_HTTP_TLS_KEY", "/nonexistent/tls.key"),
    ]);
    assert!(stderr.contains("/nonexistent/tls.crt"), "{stderr}");
}

#[test]
fn the_production_profile_refuses_a_loopback_or_empty_crl_url() {
    let pki = tempfile::tempdir().unwrap();
    argus_pki::Ca::init(pki.path(), &[]).unwrap();
    let dir = pki.path().to_str().unwrap();
    for url in [
        "",
        "http://127.0.0.1:17081/pki/crl.der",
        "http://localhost/crl",
    ] {
        let stderr = refused(&[
            ("ARGUS_PKI_PROFILE", "production"),
            ("ARGUS_PKI_DIR", dir),
            ("ARGUS_HTTP_CRL_URL", url),
        ]);
        assert!(stderr.contains("--crl-url"), "{url}: {stderr}");
        assert!(stderr.contains("--profile production"), "{url}: {stderr}");
    }
}
