//! The HTTP sender: `--concurrency` clients posting single readings or batches of `--batch`
//! to the sidecar's `POST /api/v1/telemetry/ingest` (its device listener, over TLS with
//! `--ingest-http-ca-file`), each device with its own API key created through the admin
//! listener. A 200 acknowledges every reading of the request.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::ProgressBar;
use serde_json::Value;
use uuid::Uuid;

use crate::latency::Latencies;
use crate::pacing::{Pacer, Rate};
use crate::payload::{http_reading, now_ns};
use crate::run::Sent;

/// A device and its API key (never printed).
#[derive(Clone)]
pub struct KeyedDevice {
    pub id: Uuid,
    pub key: String,
}

/// The HTTP client: rustls (ring) trusting `ca_file`'s certificates, or the system's
/// roots without it; plain `http://` works too.
pub fn client(
    concurrency: usize,
    ca_file: Option<&std::path::Path>,
) -> anyhow::Result<reqwest::Client> {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in rustls_pki_types::CertificateDer::pem_file_iter(path)
                .with_context(|| format!("--ingest-http-ca-file {}", path.display()))?
            {
                let cert =
                    cert.with_context(|| format!("--ingest-http-ca-file {}", path.display()))?;
                roots
                    .add(cert)
                    .with_context(|| format!("--ingest-http-ca-file {}", path.display()))?;
            }
            anyhow::ensure!(
                !roots.is_empty(),
                "--ingest-http-ca-file {}: no PEM CERTIFICATE in it",
                path.display()
            );
        }
        None => {
            for cert in rustls_native_roots()? {
                let _ = roots.add(cert);
            }
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS versions")?
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .pool_max_idle_per_host(concurrency.max(1))
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")
}

/// The system's CA bundle (Debian's `ca-certificates`), when present.
fn rustls_native_roots() -> anyhow::Result<Vec<rustls_pki_types::CertificateDer<'static>>> {
    use rustls_pki_types::pem::PemObject as _;
    let path = std::path::Path::new("/etc/ssl/certs/ca-certificates.crt");
    if !path.exists() {
        return Ok(Vec::new());
    }
    Ok(rustls_pki_types::CertificateDer::pem_file_iter(path)
        .with_context(|| path.display().to_string())?
        .filter_map(Result::ok)
        .collect())
}

/// Creates one API key per device with the admin token, on the admin listener `base`.
pub async fn create_keys(
    http: &reqwest::Client,
    base: &str,
    admin_token: &str,
    ids: &[Uuid],
) -> anyhow::Result<Vec<KeyedDevice>> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let resp = http
            .post(format!("{base}/api/v1/devices/{id}/api-keys"))
            .bearer_auth(admin_token)
            .json(&serde_json::json!({}))
            .send()
            .await
            .context("creating an API key (is INGEST_HTTP_ADMIN_URL right?)")?;
        let status = resp.status();
        anyhow::ensure!(
            status.is_success(),
            "creating an API key for {id}: HTTP {status} (check ARGUS_ADMIN_TOKEN)"
        );
        let body: Value = resp.json().await.context("API key response")?;
        let key = body
            .get("key")
            .and_then(Value::as_str)
            .context("API key response has no `key`")?;
        out.push(KeyedDevice {
            id: *id,
            key: key.to_string(),
        });
    }
    Ok(out)
}

#[derive(Debug, Clone)]
pub struct HttpPlan {
    pub run_id: String,
    pub url: String,
    pub rate: Rate,
    pub count: Option<u64>,
    pub duration: Option<Duration>,
    pub batch: usize,
    pub concurrency: usize,
}

/// Sends the plan; returns what was sent and acknowledged (HTTP 200).
pub async fn send(
    http: reqwest::Client,
    devices: Vec<KeyedDevice>,
    plan: HttpPlan,
    progress: ProgressBar,
    start_ns: u64,
) -> anyhow::Result<Sent> {
    anyhow::ensure!(
        !devices.is_empty(),
        "--devices: at least one device is needed"
    );
    let batch = plan.batch.max(1) as u64;
    let workers = plan.concurrency.max(1);
    // Requests per second, split over the workers.
    let req_rate = match plan.rate {
        Rate::Max => Rate::Max,
        Rate::PerSecond(r) => Rate::PerSecond(r / batch as f64),
    };
    let start = Instant::now();
    let deadline = plan.duration.map(|d| start + d);
    let mut tasks = Vec::new();
    for w in 0..workers {
        let http = http.clone();
        let devices = devices.clone();
        let plan = plan.clone();
        let progress = progress.clone();
        tasks.push(tokio::spawn(async move {
            let pacer = Pacer::new(start, req_rate.split(workers));
            let mut lat = Latencies::new(start_ns);
            let mut acked = Vec::new();
            let mut sent = 0u64;
            let (mut first, mut last) = (u64::MAX, 0u64);
            let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
            let mut k = 0u64;
            loop {
                let r = w as u64 + k * workers as u64; // request number
                let first_seq = r * batch;
                if plan.count.is_some_and(|n| first_seq >= n) {
                    break;
                }
                let now = Instant::now();
                if deadline.is_some_and(|d| now >= d) {
                    break;
                }
                if k >= pacer.allowed(now) {
                    tokio::time::sleep_until(pacer.due(k).into()).await;
                    continue;
                }
                let dev = &devices[(r as usize) % devices.len()];
                let end_seq = plan
                    .count
                    .map_or(first_seq + batch, |n| (first_seq + batch).min(n));
                let sent_ns = now_ns();
                let readings: Vec<Value> = (first_seq..end_seq)
                    .map(|s| http_reading(&plan.run_id, dev.id, s, sent_ns))
                    .collect();
                let body = if plan.batch <= 1 {
                    readings.into_iter().next().unwrap_or(Value::Null)
                } else {
                    Value::Array(readings)
                };
                first = first.min(sent_ns);
                last = last.max(sent_ns);
                sent += end_seq - first_seq;
                let res = http
                    .post(format!("{}/api/v1/telemetry/ingest", plan.url))
                    .header("x-api-key", &dev.key)
                    .json(&body)
                    .send()
                    .await;
                let at = now_ns();
                let label = match &res {
                    Ok(resp) => resp.status().as_u16().to_string(),
                    Err(e) if e.is_timeout() => "timeout".into(),
                    Err(_) => "connection error".into(),
                };
                if res.as_ref().is_ok_and(|r| r.status().is_success()) {
                    for s in first_seq..end_seq {
                        acked.push(s);
                        lat.record(sent_ns, at);
                    }
                    progress.inc(end_seq - first_seq);
                }
                *statuses.entry(label).or_insert(0) += 1;
                k += 1;
            }
            (sent, acked, first, last, lat, statuses)
        }));
    }
    let mut out = Sent {
        sent: 0,
        acked: Vec::new(),
        first_send_ns: u64::MAX,
        last_send_ns: 0,
        ack_latency: Latencies::new(start_ns),
        errors: Vec::new(),
        reconnects: 0,
        resent: 0,
        notes: Vec::new(),
    };
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    for t in tasks {
        let (sent, acked, first, last, lat, st) = t.await.context("an HTTP worker panicked")?;
        out.sent += sent;
        out.acked.extend(acked);
        out.first_send_ns = out.first_send_ns.min(first);
        out.last_send_ns = out.last_send_ns.max(last);
        out.ack_latency.merge(&lat);
        for (k, v) in st {
            *statuses.entry(k).or_insert(0) += v;
        }
    }
    if out.first_send_ns == u64::MAX {
        out.first_send_ns = start_ns;
    }
    let non_ok: Vec<String> = statuses
        .iter()
        .filter(|(k, _)| k.as_str() != "200")
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    if !non_ok.is_empty() {
        out.errors.push(format!(
            "HTTP responses other than 200 (requests): {}",
            non_ok.join(", ")
        ));
    }
    Ok(out)
}
