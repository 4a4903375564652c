//! Shared harness of the end-to-end and fault tests: a real stack (Mosquitto
//! with the local stack's mTLS template and ACL, NATS with the JetStream
//! topology, Postgres migrated and seeded, Redis), certificates from
//! `argus_pki`, publishers that wait for every PUBACK, and checks on
//! `telemetry_raw` and the streams.
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use argus_bridge::app;
use argus_bridge::config::{Cli, Config};
use argus_pki::{Ca, Subject};
use argus_testkit::mosquitto::Mosquitto;
use argus_testkit::nats::NatsServer;
use argus_testkit::pg::{PgServer, TestDb};
use argus_testkit::redis::RedisServer;
use async_nats::jetstream;
use clap::Parser;
use futures::StreamExt;
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS, TlsConfiguration, Transport};
use tempfile::TempDir;
use uuid::Uuid;

pub use argus_schema::seed::{DEMO_DEVICE_ID, DEMO_ORG_ID, SENSOR_IDS};

/// A CA and the files issued from it.
pub struct Pki {
    pub dir: TempDir,
    ca: Ca,
}

/// A client certificate and key on disk.
#[derive(Clone, Debug)]
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("argus-bridge-pki-")
            .tempdir()
            .unwrap();
        Ca::init(dir.path(), &[]).expect("pki init");
        let ca = Ca::load(dir.path()).expect("pki load");
        Pki { dir, ca }
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    fn issue(&self, subject: Subject, sub: &str) -> Identity {
        let issued = self.ca.issue(&subject, 30, None).expect("issue");
        let files = issued
            .write_files(&self.dir.path().join(sub))
            .expect("write cert");
        Identity {
            cert: files.cert,
            key: files.key.expect("key"),
        }
    }

    /// A device certificate: CN = the device id; may publish `devices/<id>/telemetry`.
    pub fn device(&self, id: Uuid) -> Identity {
        self.issue(Subject::Device(id), "devices")
    }

    /// The identities of replica `replica`'s two connections (CN = client id
    /// `bridge-<replica>-<connection>`, as the broker requires); returns the
    /// path templates the bridge expands per connection.
    pub fn bridge(&self, replica: u32) -> Identity {
        for conn in 0..2 {
            self.issue(
                Subject::bridge(&format!("bridge-{replica}-{conn}")).unwrap(),
                "bridges",
            );
        }
        let dir = self.dir.path().join("bridges");
        Identity {
            cert: dir.join(format!("bridge-{replica}-{{connection}}.crt")),
            key: dir.join(format!("bridge-{replica}-{{connection}}.key")),
        }
    }

    /// A client whose CN is not a UUID: the ACL pattern lets it publish to
    /// `devices/<cn>/telemetry`, a topic the bridge must reject (`bad_topic`).
    pub fn odd_client(&self, cn: &str) -> Identity {
        self.issue(Subject::bridge(cn).unwrap(), "others")
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Mosquitto with the local stack's template (`compose/mosquitto/mosquitto.conf.in`)
/// and ACL: mTLS only, persistence on, inflight 1000.
pub async fn mosquitto(pki: &Pki) -> Mosquitto {
    let template = std::fs::read_to_string(repo_root().join("compose/mosquitto/mosquitto.conf.in"))
        .expect("mosquitto template");
    let acl = repo_root().join("compose/mosquitto/acl");
    let plugin = build_sub_acl_plugin(pki.dir.path());
    let text = template
        .replace("@PORT@", "{port}")
        .replace("@PKI_DIR@", &pki.dir.path().display().to_string())
        .replace("@DATA_DIR@", "{dir}")
        .replace("@ACL_FILE@", &acl.display().to_string())
        .replace("@SUB_ACL_PLUGIN@", &plugin.display().to_string());
    assert!(
        !text.contains("@PORT@") && !text.contains("@SUB_"),
        "unreplaced placeholder in the Mosquitto template"
    );
    Mosquitto::start(&text).await
}

/// Builds the subscribe-authorisation plugin (`compose/mosquitto/argus_sub_acl.c`)
/// into `dir`, the way `compose/up` does.
fn build_sub_acl_plugin(dir: &Path) -> PathBuf {
    let out = dir.join("argus_sub_acl.so");
    let status = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&out)
        .arg(repo_root().join("compose/mosquitto/argus_sub_acl.c"))
        .status()
        .expect("run cc (a C compiler is needed to build the Mosquitto plugin)");
    assert!(status.success(), "building argus_sub_acl.so failed");
    out
}

/// Either a database on the shared test server, or a private cluster that can be stopped.
pub enum Pg {
    Shared(TestDb),
    Private(PgServer, String),
}

impl Pg {
    pub fn url(&self) -> String {
        match self {
            Pg::Shared(db) => db.url().to_owned(),
            Pg::Private(_, url) => url.clone(),
        }
    }

    /// The URL the bridge connects with: the service role `argus_ingest`, as in
    /// production (the database is migrated, so the role exists).
    pub fn service_url(&self) -> String {
        argus_testkit::pg::with_user(&self.url(), argus_schema::roles::INGEST)
    }

    pub fn server(&mut self) -> &mut PgServer {
        match self {
            Pg::Private(s, _) => s,
            Pg::Shared(_) => panic!("not a private Postgres"),
        }
    }
}

/// Every server the bridge talks to.
pub struct Stack {
    pub pki: Pki,
    pub mq: Mosquitto,
    pub nats: NatsServer,
    pub pg: Pg,
    pub redis: RedisServer,
}

/// A NATS client logged in as `user` (`compose/nats/authorization.conf`).
pub async fn nats_client(nats: &NatsServer, user: &str) -> async_nats::Client {
    let c = nats.credentials(user);
    argus_schema::nats::connect(
        &argus_schema::nats::NatsAuth::user_password(c.user, c.password),
        &[nats.url()],
        "bridge-test",
        argus_schema::nats::Unreachable::Fail,
    )
    .await
    .expect("nats")
}

impl Stack {
    /// `private_pg`: a Postgres cluster of its own (for tests that stop it).
    pub async fn start(private_pg: bool) -> Stack {
        init_logs();
        let pki = Pki::new();
        let (mq, nats, redis) =
            tokio::join!(mosquitto(&pki), NatsServer::start(), RedisServer::start());
        let pg = if private_pg {
            let server = PgServer::start().await;
            let url = server.create_database("argus").await;
            Pg::Private(server, url)
        } else {
            Pg::Shared(TestDb::create().await)
        };
        let mut client = argus_testkit::pg::connect(&pg.url()).await;
        argus_schema::migrate::migrate(&mut client)
            .await
            .expect("migrate");
        argus_schema::seed::seed(&mut client).await.expect("seed");
        argus_schema::streams::apply(&nats_client(&nats, "admin").await, Some(1))
            .await
            .expect("streams");
        Stack {
            pki,
            mq,
            nats,
            pg,
            redis,
        }
    }

    pub fn mqtt_url(&self) -> String {
        format!("mqtts://127.0.0.1:{}", self.mq.port())
    }

    /// The bridge's flags for replica `replica` (the same as the binary's).
    pub fn bridge_args(&self, replica: u32) -> Vec<String> {
        let id = self.pki.bridge(replica);
        vec![
            "--mqtt-url".into(),
            self.mqtt_url(),
            "--mqtt-ca-file".into(),
            self.pki.ca_file().display().to_string(),
            "--mqtt-cert-file".into(),
            id.cert.display().to_string(),
            "--mqtt-key-file".into(),
            id.key.display().to_string(),
            "--replica".into(),
            replica.to_string(),
            "--connections".into(),
            "2".into(),
            "--database-url".into(),
            self.pg.service_url(),
            "--nats-urls".into(),
            self.nats.url(),
            "--nats-user".into(),
            "bridge".into(),
            "--nats-password-file".into(),
            self.nats.password_file("bridge").display().to_string(),
            "--redis-url".into(),
            self.redis.url(),
            "--batch-size".into(),
            "200".into(),
            "--batch-linger".into(),
            "10ms".into(),
            "--shutdown-timeout".into(),
            "10s".into(),
        ]
    }

    pub fn bridge_config(&self, replica: u32) -> Config {
        let mut args = vec![
            "argus-bridge".to_string(),
            "--metrics-addr".into(),
            "127.0.0.1:0".into(),
        ];
        args.extend(self.bridge_args(replica));
        Cli::try_parse_from(args)
            .expect("flags")
            .into_config()
            .expect("config")
    }

    /// Starts a bridge in this process and waits until it is ready.
    pub async fn bridge_in_process(&self, replica: u32) -> app::Running {
        self.bridge_in_process_with(self.bridge_config(replica))
            .await
    }

    /// [`Stack::bridge_in_process`] with a configuration the test adjusted.
    pub async fn bridge_in_process_with(&self, config: Config) -> app::Running {
        let running = app::start(config).await.expect("bridge");
        wait_ready(running.metrics_addr.port(), Duration::from_secs(20)).await;
        running
    }

    /// Starts the `argus-bridge` binary as a child process and waits until it is ready.
    pub async fn bridge_process(&self, replica: u32, metrics_port: u16) -> BridgeProcess {
        self.bridge_process_with(replica, metrics_port, &[]).await
    }

    /// [`Stack::bridge_process`] with `extra` flags after the usual ones (a flag
    /// given twice takes the last value).
    pub async fn bridge_process_with(
        &self,
        replica: u32,
        metrics_port: u16,
        extra: &[&str],
    ) -> BridgeProcess {
        let log = std::fs::File::create(
            self.pki
                .dir
                .path()
                .join(format!("bridge-{replica}-{metrics_port}.log")),
        )
        .unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_argus-bridge"))
            .args(self.bridge_args(replica))
            .args(extra)
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn argus-bridge");
        let p = BridgeProcess {
            child,
            metrics_port,
        };
        wait_ready(metrics_port, Duration::from_secs(30)).await;
        p
    }

    pub async fn db(&self) -> tokio_postgres::Client {
        argus_testkit::pg::connect(&self.pg.url()).await
    }

    /// JetStream as `admin`, for a test's checks of stream contents.
    pub async fn js(&self) -> jetstream::Context {
        jetstream::new(nats_client(&self.nats, "admin").await)
    }

    /// An MQTT 5 device.
    pub fn device5(&self, id: Uuid) -> Publisher5 {
        Publisher5::new(
            self.mq.port(),
            &self.pki.ca_file(),
            &self.pki.device(id),
            &id.to_string(),
        )
    }

    pub fn device(&self, id: Uuid) -> Publisher {
        let identity = self.pki.device(id);
        Publisher::new(
            self.mq.port(),
            &self.pki.ca_file(),
            &identity,
            &id.to_string(),
        )
    }
}

/// Logs of the in-process bridge on the test's output (shown when it fails).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}

/// A bridge child process; SIGKILLed on drop.
pub struct BridgeProcess {
    pub child: std::process::Child,
    pub metrics_port: u16,
}

impl BridgeProcess {
    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn sigterm(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
    }

    /// Resident set size of the process, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        rss_of(self.child.id()).expect("VmRSS of the bridge")
    }

    pub fn metrics(&self) -> String {
        argus_testkit::http_get(self.metrics_port, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }
}

impl Drop for BridgeProcess {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// Resident set size of process `pid`, in bytes (`VmRSS` in `/proc/<pid>/status`).
pub fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Waits until `/ready` answers 200.
pub async fn wait_ready(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some((200, _)) = argus_testkit::http_get(port, "/ready") {
            return;
        }
        assert!(Instant::now() < deadline, "bridge on :{port} not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (polling every 100 ms) until `done` holds; panics naming `what` after `timeout`.
pub async fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of an unlabelled counter (or the sum over its label sets) in a
/// Prometheus text exposition.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A device (or other client) that publishes QoS 1 and counts PUBACKs.
///
/// A persistent session (`clean_session = false`) so that unacknowledged
/// publishes are sent again after a broker restart.
pub struct Publisher {
    client: AsyncClient,
    acked: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

/// The mTLS client configuration of a device identity.
pub fn device_tls(ca: &Path, id: &Identity) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<_> = CertificateDer::pem_file_iter(&id.cert)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(&id.key).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap(),
    )
}

impl Publisher {
    pub fn new(port: u16, ca: &Path, id: &Identity, client_id: &str) -> Publisher {
        let tls = device_tls(ca, id);
        let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(10))
            .set_clean_session(false)
            .set_inflight(200)
            .set_max_packet_size(2 * 1024 * 1024, 2 * 1024 * 1024)
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        let (client, mut eventloop) = AsyncClient::new(o, 256);
        let acked = Arc::new(AtomicUsize::new(0));
        let counter = acked.clone();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Incoming::PubAck(_))) => {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        Publisher {
            client,
            acked,
            task,
        }
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("publish request");
    }

    /// Publishes at QoS 0 (no PUBACK, at most once).
    pub async fn publish_qos0(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtMostOnce, false, payload)
            .await
            .expect("publish request");
    }

    pub fn acked(&self) -> usize {
        self.acked.load(Ordering::SeqCst)
    }

    /// Waits until `n` PUBACKs have arrived in total.
    pub async fn wait_acked(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.acked() < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} publishes acknowledged by the broker",
                self.acked()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An MQTT 5 device: publishes QoS 1 with publish properties and counts PUBACKs.
pub struct Publisher5 {
    client: rumqttc::v5::AsyncClient,
    acked: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher5 {
    pub fn new(port: u16, ca: &Path, id: &Identity, client_id: &str) -> Publisher5 {
        use rumqttc::v5::{Event as Event5, Incoming as Incoming5};
        let mut o = rumqttc::v5::MqttOptions::new(client_id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(10))
            .set_max_packet_size(Some(2 * 1024 * 1024))
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                device_tls(ca, id),
            )));
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(o, 256);
        let acked = Arc::new(AtomicUsize::new(0));
        let counter = acked.clone();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event5::Incoming(Incoming5::PubAck(_))) => {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        Publisher5 {
            client,
            acked,
            task,
        }
    }

    pub async fn publish(
        &self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        properties: rumqttc::v5::mqttbytes::v5::PublishProperties,
    ) {
        self.client
            .publish_with_properties(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                payload.into(),
                properties,
            )
            .await
            .expect("publish request");
    }

    /// Waits until `n` PUBACKs have arrived in total.
    pub async fn wait_acked(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.acked.load(Ordering::SeqCst) < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} MQTT 5 publishes acknowledged by the broker",
                self.acked.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Publisher5 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn telemetry_topic(device: Uuid) -> String {
    format!("devices/{device}/telemetry")
}

/// Payload `n` of a stream: unique by `messageId`.
pub fn numbered_payload(run: &str, n: usize) -> String {
    format!(
        r#"{{"messageId":"{run}-{n}","temperature":{}.5,"seq":{n}}}"#,
        n % 40
    )
}

/// The message id the bridge derives for `payload` on `device`'s topic.
pub fn expected_id(device: Uuid, payload: &str) -> Uuid {
    let v: serde_json::Value = serde_json::from_str(payload).unwrap();
    argus_pipeline::message_id::derive(
        device,
        &telemetry_topic(device),
        payload.as_bytes(),
        v.get("messageId").and_then(|m| m.as_str()),
    )
}

/// Row ids in `telemetry_raw`, with how often each occurs.
pub async fn row_ids(db: &tokio_postgres::Client) -> BTreeMap<Uuid, i64> {
    db.query("SELECT id, count(*) FROM telemetry_raw GROUP BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, Uuid>(0), r.get::<_, i64>(1)))
        .collect()
}

pub async fn row_count(db: &tokio_postgres::Client) -> i64 {
    db.query_one("SELECT count(*) FROM telemetry_raw", &[])
        .await
        .unwrap()
        .get(0)
}

/// A stream message: subject, `Nats-Msg-Id` and body.
#[derive(Debug, Clone)]
pub struct StreamMsg {
    pub subject: String,
    pub msg_id: Option<String>,
    pub body: serde_json::Value,
}

/// Every message in `stream` (reads them with an ordered consumer).
pub async fn stream_messages(js: &jetstream::Context, stream: &str) -> Vec<StreamMsg> {
    let mut s = js.get_stream(stream).await.expect("stream");
    let total = s.info().await.expect("info").state.messages as usize;
    if total == 0 {
        return Vec::new();
    }
    let consumer = s
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await
        .expect("consumer");
    let mut messages = consumer.messages().await.expect("messages");
    let mut out = Vec::with_capacity(total);
    while out.len() < total {
        let m = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("stream read timed out")
            .expect("stream ended")
            .expect("message");
        out.push(StreamMsg {
            subject: m.subject.to_string(),
            msg_id: m
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.to_string()),
            body: serde_json::from_slice(&m.payload).unwrap_or(serde_json::Value::Null),
        });
    }
    out
}

/// Every record in `TELEMETRY_DLQ`, in order (gaps skipped), each checked to be on its reason's subject.
pub async fn dlq_records(js: &jetstream::Context) -> Vec<serde_json::Value> {
    let mut s = js.get_stream("TELEMETRY_DLQ").await.unwrap();
    let state = s.info().await.unwrap().state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return out;
    }
    for seq in state.first_sequence..=state.last_sequence {
        // A gap is a letter a replay removed (`argus-dlq replay`).
        let m = match s.get_raw_message(seq).await {
            Ok(m) => m,
            Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
                continue
            }
            Err(e) => panic!("dead letter {seq}: {e}"),
        };
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(
            m.subject.as_str(),
            format!("telemetry.dlq.{}", v["reason"].as_str().unwrap())
        );
        out.push(v);
    }
    out
}

pub async fn stream_count(js: &jetstream::Context, stream: &str) -> u64 {
    js.get_stream(stream)
        .await
        .expect("stream")
        .info()
        .await
        .expect("info")
        .state
        .messages
}

/// Waits until `telemetry_raw` holds `n` rows and the raw stream `n` messages.
pub async fn wait_stored(stack: &Stack, n: usize, timeout: Duration) {
    let db = stack.db().await;
    let js = stack.js().await;
    let deadline = Instant::now() + timeout;
    loop {
        let rows = row_count(&db).await as usize;
        let msgs = stream_count(&js, "TELEMETRY_RAW_V1").await as usize;
        if rows >= n && msgs >= n {
            return;
        }
        if Instant::now() >= deadline {
            let metrics = argus_bridge::server::prometheus_handle().render();
            let interesting: Vec<&str> = metrics
                .lines()
                .filter(|l| l.starts_with("argus_bridge_") && !l.contains("_bucket"))
                .collect();
            panic!(
                "after {timeout:?}: {rows} rows and {msgs} stream messages, expected {n}\n{}\nbroker log:\n{}",
                interesting.join("\n"),
                stack.mq.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts every expected id is stored exactly once and published exactly once,
/// and nothing else is.
pub async fn assert_exactly_once(stack: &Stack, expected: &HashSet<Uuid>) {
    let rows = row_ids(&stack.db().await).await;
    let dup_rows: Vec<_> = rows.iter().filter(|(_, c)| **c > 1).collect();
    assert!(dup_rows.is_empty(), "duplicate rows: {dup_rows:?}");
    let row_set: HashSet<Uuid> = rows.keys().copied().collect();
    assert_eq!(row_set.len(), expected.len(), "row count");
    assert_eq!(&row_set, expected, "row ids differ from what was published");

    let msgs = stream_messages(&stack.js().await, "TELEMETRY_RAW_V1").await;
    assert_eq!(msgs.len(), expected.len(), "stream message count");
    let ids: HashSet<Uuid> = msgs
        .iter()
        .map(|m| m.msg_id.as_deref().expect("Nats-Msg-Id").parse().unwrap())
        .collect();
    assert_eq!(ids.len(), msgs.len(), "duplicate Nats-Msg-Id in the stream");
    assert_eq!(&ids, expected, "stream ids differ from what was published");
}

/// One MQTT packet: the fixed header byte, the remaining length, the body.
pub fn mqtt_packet(header: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![header];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}
