//! Mutual TLS at a real Mosquitto (the repo's template and ACL) with certificates from argus-pki.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use argus_pki::{Ca, RevocationReason, Subject};
use argus_testkit::mosquitto::Mosquitto;
use rumqttc::{
    AsyncClient, Event, MqttOptions, Packet, QoS, SubscribeReasonCode, TlsConfiguration, Transport,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::mpsc;
use uuid::Uuid;

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// Builds the subscribe-authorisation plugin (compose/mosquitto/argus_sub_acl.c) into `dir`,
/// the way compose/up does it.
fn build_sub_acl_plugin(dir: &Path) -> PathBuf {
    let out = dir.join("argus_sub_acl.so");
    let status = std::process::Command::new("cc")
        .args([
            "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-o",
        ])
        .arg(&out)
        .arg(repo_file("compose/mosquitto/argus_sub_acl.c"))
        .status()
        .expect("run cc (a C compiler is needed to build the Mosquitto plugin)");
    assert!(status.success(), "building argus_sub_acl.so failed");
    out
}

/// The template rendered the way compose/up does it; testkit fills `{port}` and `{dir}`.
fn mosquitto_config(pki_dir: &Path) -> String {
    let plugin = build_sub_acl_plugin(pki_dir);
    let text = std::fs::read_to_string(repo_file("compose/mosquitto/mosquitto.conf.in"))
        .unwrap()
        .replace("@PORT@", "{port}")
        .replace("@PKI_DIR@", &pki_dir.display().to_string())
        .replace("@DATA_DIR@", "{dir}")
        .replace(
            "@ACL_FILE@",
            &repo_file("compose/mosquitto/acl").display().to_string(),
        )
        .replace("@SUB_ACL_PLUGIN@", &plugin.display().to_string());
    assert!(
        !text.contains("@SUB_") && !text.contains("@PORT@"),
        "unreplaced placeholder"
    );
    text
}

struct Setup {
    _pki: tempfile::TempDir,
    dir: PathBuf,
    ca: Ca,
    mq: Mosquitto,
}

async fn setup() -> Setup {
    let pki = tempfile::tempdir().unwrap();
    let dir = pki.path().to_path_buf();
    Ca::init(&dir, &[]).unwrap();
    let ca = Ca::load(&dir).unwrap();
    let mq = Mosquitto::start(&mosquitto_config(&dir)).await;
    Setup {
        _pki: pki,
        dir,
        ca,
        mq,
    }
}

/// A rustls client config trusting `ca_pem`, with an optional client identity.
fn tls(ca_pem: &str, identity: Option<(&str, &str)>) -> TlsConfiguration {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .map(|c| c.unwrap())
                    .collect(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    TlsConfiguration::Rustls(Arc::new(config))
}

struct Conn {
    client: AsyncClient,
    events: mpsc::Receiver<Result<Packet, String>>,
}

impl Conn {
    /// Connects; `Err` if the broker refuses (TLS or MQTT) within 5 s.
    async fn open(port: u16, client_id: &str, tls: TlsConfiguration) -> Result<Conn, String> {
        let mut opts = MqttOptions::new(client_id, "localhost", port);
        opts.set_transport(Transport::tls_with_config(tls));
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        let (tx, mut events) = mpsc::channel(1000);
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(p)) => {
                        if tx.send(Ok(p)).await.is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string())).await;
                        return;
                    }
                }
            }
        });
        match tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
            Ok(Some(Ok(Packet::ConnAck(ack))))
                if ack.code == rumqttc::ConnectReturnCode::Success =>
            {
                Ok(Conn { client, events })
            }
            Ok(Some(Ok(other))) => Err(format!("unexpected first packet {other:?}")),
            Ok(Some(Err(e))) => Err(e),
            Ok(None) => Err("event loop ended".into()),
            Err(_) => Err("no CONNACK within 5 s".into()),
        }
    }

    /// Waits for the next packet matching `f`, up to `wait`.
    async fn next_where<T>(
        &mut self,
        wait: Duration,
        mut f: impl FnMut(&Packet) -> Option<T>,
    ) -> Option<T> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Ok(p))) => {
                    if let Some(t) = f(&p) {
                        return Some(t);
                    }
                }
                _ => return None,
            }
        }
    }

    /// Subscribes at QoS 1; `true` if the SUBACK grants it, `false` if it refuses (0x80).
    async fn try_subscribe(&mut self, filter: &str) -> bool {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        let codes = self
            .next_where(Duration::from_secs(5), |p| match p {
                Packet::SubAck(ack) => Some(ack.return_codes.clone()),
                _ => None,
            })
            .await
            .expect("SUBACK");
        assert_eq!(codes.len(), 1);
        matches!(codes[0], SubscribeReasonCode::Success(_))
    }

    /// Subscribes; the broker must grant it.
    async fn subscribe(&mut self, filter: &str) {
        assert!(
            self.try_subscribe(filter).await,
            "SUBSCRIBE {filter} refused"
        );
    }

    /// Subscribes; the broker must refuse it.
    async fn subscribe_refused(&mut self, filter: &str) {
        assert!(
            !self.try_subscribe(filter).await,
            "SUBSCRIBE {filter} granted"
        );
    }

    /// Publishes at QoS 1 and waits for the PUBACK (Mosquitto acks even what its ACL drops).
    async fn publish(&mut self, topic: &str, payload: &str) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
            .await
            .unwrap();
        self.next_where(Duration::from_secs(5), |p| {
            matches!(p, Packet::PubAck(_)).then_some(())
        })
        .await
        .expect("PUBACK");
    }

    /// Publishes what the ACL must drop: waits for the PUBACK or the broker closing the
    /// connection (Mosquitto 2.0.11 does both).
    async fn publish_denied(&mut self, topic: &str, payload: &str) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
            .await
            .unwrap();
        let _ = self
            .next_where(Duration::from_secs(5), |p| {
                matches!(p, Packet::PubAck(_)).then_some(())
            })
            .await;
    }

    /// Payloads of messages received within `wait`.
    async fn received(&mut self, wait: Duration) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        while let Some(m) = self
            .next_where(deadline - tokio::time::Instant::now(), |p| match p {
                Packet::Publish(m) => Some((
                    m.topic.clone(),
                    String::from_utf8_lossy(&m.payload).into_owned(),
                )),
                _ => None,
            })
            .await
        {
            out.push(m);
        }
        out
    }
}

fn identity(ca: &Ca, subject: &Subject) -> (String, String) {
    let issued = ca.issue(subject, 30, None).unwrap();
    (issued.certificate_pem, issued.private_key_pem.unwrap())
}

async fn connect_as(s: &Setup, subject: &Subject, client_id: &str) -> Conn {
    let (cert, key) = identity(&s.ca, subject);
    Conn::open(
        s.mq.port(),
        client_id,
        tls(s.ca.ca_certificate_pem(), Some((&cert, &key))),
    )
    .await
    .unwrap_or_else(|e| panic!("{client_id} could not connect: {e}\n{}", s.mq.log_tail()))
}

fn telemetry(id: Uuid) -> String {
    format!("devices/{id}/telemetry")
}

#[tokio::test]
async fn device_certificate_publishes_with_rumqttc_and_mosquitto_pub() {
    let s = setup().await;
    let mut bridge = connect_as(&s, &Subject::bridge("bridge-0-0").unwrap(), "bridge-0-0").await;
    bridge.subscribe("$share/bridge/devices/+/telemetry").await;

    let device = Uuid::new_v4();
    let mut dev = connect_as(&s, &Subject::Device(device), &device.to_string()).await;
    dev.publish(&telemetry(device), r#"{"temperature":21.5}"#)
        .await;

    // The README's command line, with files written by the CLI's code path.
    let other = Uuid::new_v4();
    let issued = s.ca.issue(&Subject::Device(other), 30, None).unwrap();
    let files = issued.write_files(&s.dir.join("devices")).unwrap();
    let out = std::process::Command::new("mosquitto_pub")
        .args(["-h", "localhost", "-p", &s.mq.port().to_string()])
        .arg("--cafile")
        .arg(s.dir.join("ca.crt"))
        .arg("--cert")
        .arg(&files.cert)
        .arg("--key")
        .arg(files.key.as_ref().unwrap())
        .args(["-i", &other.to_string(), "-q", "1", "-t", &telemetry(other)])
        .args(["-m", r#"{"humidity":40}"#])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mosquitto_pub: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let got = bridge.received(Duration::from_secs(2)).await;
    assert_eq!(
        got,
        vec![
            (telemetry(device), r#"{"temperature":21.5}"#.to_string()),
            (telemetry(other), r#"{"humidity":40}"#.to_string()),
        ]
    );
}

#[tokio::test]
async fn broker_refuses_missing_foreign_and_expired_certificates() {
    let s = setup().await;
    let port = s.mq.port();
    let ca_pem = s.ca.ca_certificate_pem().to_string();

    // No client certificate.
    let err = Conn::open(port, "anon", tls(&ca_pem, None)).await.err();
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("CertificateRequired")),
        "a client without a certificate was accepted: {err:?}"
    );

    // A certificate from another CA (same CN shape).
    let other_dir = tempfile::tempdir().unwrap();
    Ca::init(other_dir.path(), &[]).unwrap();
    let other = Ca::load(other_dir.path()).unwrap();
    let device = Uuid::new_v4();
    let (cert, key) = identity(&other, &Subject::Device(device));
    let err = Conn::open(port, "foreign", tls(&ca_pem, Some((&cert, &key))))
        .await
        .err();
    assert!(
        err.as_deref().is_some_and(|e| e.contains("UnknownCA")),
        "a certificate from another CA was accepted: {err:?}"
    );

    // An expired certificate from our CA.
    let now = time::OffsetDateTime::now_utc();
    let expired =
        s.ca.issue_window(
            &Subject::Device(device),
            now - time::Duration::days(10),
            now - time::Duration::days(1),
            None,
        )
        .unwrap();
    let err = Conn::open(
        port,
        "expired",
        tls(
            &ca_pem,
            Some((
                &expired.certificate_pem,
                expired.private_key_pem.as_deref().unwrap(),
            )),
        ),
    )
    .await
    .err();
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("CertificateExpired")),
        "an expired certificate was accepted: {err:?}"
    );

    // And a valid one still works (the failures above were not the broker being down).
    connect_as(&s, &Subject::Device(device), "valid").await;
}

#[tokio::test]
async fn revoked_certificate_is_refused_after_crl_reload() {
    let s = setup().await;
    let device = Uuid::new_v4();
    let (cert, key) = identity(&s.ca, &Subject::Device(device));
    let config = || tls(s.ca.ca_certificate_pem(), Some((&cert, &key)));
    Conn::open(s.mq.port(), "before", config())
        .await
        .expect("valid before revocation");

    let revoked =
        s.ca.revoke_device(device, RevocationReason::KeyCompromise)
            .unwrap();
    assert_eq!(revoked.len(), 1);
    s.mq.reload();
    // SIGHUP is asynchronous: retry for a few seconds until the broker refuses.
    let mut refused = false;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Err(e) = Conn::open(s.mq.port(), "after", config()).await {
            assert!(e.contains("CertificateRevoked"), "{e}");
            refused = true;
            break;
        }
    }
    assert!(
        refused,
        "revoked certificate still accepted:\n{}",
        s.mq.log_tail()
    );

    // Another device of the same CA is unaffected.
    connect_as(&s, &Subject::Device(Uuid::new_v4()), "other").await;
}

#[tokio::test]
async fn acl_confines_devices_and_bridges() {
    let s = setup().await;
    let mut bridge = connect_as(&s, &Subject::bridge("bridge-0-0").unwrap(), "bridge-0-0").await;
    bridge.subscribe("devices/+/telemetry").await;
    // A bridge identity gets only the filters the plugin lists.
    bridge.subscribe_refused("#").await;

    let a = Uuid::new_v4();
    let b = Uuid::new_v4();
    // A impersonates B: dropped. A bridge certificate publishes device telemetry: dropped.
    // (Mosquitto 2.0.11 PUBACKs a denied publish, then closes the connection.)
    let mut forger = connect_as(&s, &Subject::Device(a), "dev-a-forger").await;
    forger.publish_denied(&telemetry(b), "forged-by-a").await;
    let mut br1 = connect_as(&s, &Subject::bridge("bridge-1-0").unwrap(), "bridge-1-0").await;
    br1.publish_denied(&telemetry(a), "forged-by-bridge").await;
    // A's own telemetry goes through (and marks the end: per-client order is kept).
    // (Connected after the forger: the client id is the CN, so one session per certificate.)
    let mut dev_a = connect_as(&s, &Subject::Device(a), "dev-a").await;
    dev_a.publish(&telemetry(a), "genuine").await;

    let got = bridge.received(Duration::from_secs(2)).await;
    assert_eq!(got, vec![(telemetry(a), "genuine".to_string())]);
}

/// Security case (issue 8): a device cannot subscribe to other devices' telemetry, nor to
/// anything else. Mosquitto's acl_file would grant these; the argus_sub_acl plugin refuses.
#[tokio::test]
async fn device_cannot_subscribe_to_other_devices_telemetry() {
    let s = setup().await;
    let a = Uuid::new_v4();
    let b = Uuid::new_v4();
    let mut dev_b = connect_as(&s, &Subject::Device(b), "dev-b").await;
    for filter in [
        telemetry(a),
        "devices/+/telemetry".to_string(),
        "#".to_string(),
        "$share/spy/devices/+/telemetry".to_string(),
        "$SYS/#".to_string(),
        // Not even its own topic: devices only publish.
        telemetry(b),
    ] {
        dev_b.subscribe_refused(&filter).await;
    }
    let mut dev_a = connect_as(&s, &Subject::Device(a), "dev-a").await;
    dev_a.publish(&telemetry(a), "private").await;
    assert!(
        dev_b.received(Duration::from_millis(500)).await.is_empty(),
        "device B received another device's telemetry"
    );
    assert!(
        s.mq.log_tail().contains("argus_sub_acl: denied SUBSCRIBE"),
        "no denial logged:\n{}",
        s.mq.log_tail()
    );
}

/// Security case (issue 8): a device cannot join the bridge's share group, so no message is
/// diverted: the bridge receives all of them. Also after a SIGHUP (the acl_file is reloaded
/// and must not take precedence over the plugin).
#[tokio::test]
async fn device_cannot_join_the_share_group() {
    const N: usize = 20;
    let s = setup().await;
    let mut bridge = connect_as(&s, &Subject::bridge("bridge-0-0").unwrap(), "bridge-0-0").await;
    bridge.subscribe("$share/bridge/devices/+/telemetry").await;
    // A second bridge connection is a legitimate member of the group.
    let mut bridge1 = connect_as(&s, &Subject::bridge("bridge-0-1").unwrap(), "bridge-0-1").await;
    bridge1.subscribe("$share/bridge/devices/+/telemetry").await;

    let a = Uuid::new_v4();
    let mut dev_b = connect_as(&s, &Subject::Device(Uuid::new_v4()), "dev-b").await;
    dev_b
        .subscribe_refused("$share/bridge/devices/+/telemetry")
        .await;
    s.mq.reload();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut dev_c = connect_as(&s, &Subject::Device(Uuid::new_v4()), "dev-c").await;
    dev_c
        .subscribe_refused("$share/bridge/devices/+/telemetry")
        .await;

    let mut dev_a = connect_as(&s, &Subject::Device(a), "dev-a").await;
    for i in 0..N {
        dev_a.publish(&telemetry(a), &i.to_string()).await;
    }
    let (got0, got1) = tokio::join!(
        bridge.received(Duration::from_secs(2)),
        bridge1.received(Duration::from_secs(2))
    );
    let mut all: Vec<usize> = got0
        .iter()
        .chain(&got1)
        .map(|(_, p)| p.parse().unwrap())
        .collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (0..N).collect::<Vec<_>>(),
        "the bridge connections got {} + {} of {N}",
        got0.len(),
        got1.len()
    );
    assert!(
        !got0.is_empty() && !got1.is_empty(),
        "round robin over both"
    );
    assert!(dev_b.received(Duration::from_millis(100)).await.is_empty());
    assert!(dev_c.received(Duration::from_millis(100)).await.is_empty());
}

/// Security case: the client id is the certificate's CN (use_username_as_clientid), so a
/// device (or another bridge connection) asking for `bridge-0-0` neither takes over nor kicks
/// the bridge's session.
#[tokio::test]
async fn client_cannot_take_a_bridge_client_id() {
    let s = setup().await;
    let mut bridge = connect_as(&s, &Subject::bridge("bridge-0-0").unwrap(), "bridge-0-0").await;
    bridge.subscribe("$share/bridge/devices/+/telemetry").await;

    let a = Uuid::new_v4();
    let mut thief = connect_as(&s, &Subject::Device(a), "bridge-0-0").await;
    // As a device it still cannot subscribe to the group (its identity is its CN) ...
    thief
        .subscribe_refused("$share/bridge/devices/+/telemetry")
        .await;
    // ... and what it publishes is checked against its CN: only its own topic goes through.
    thief.publish(&telemetry(a), "from-thief").await;
    let mut other_bridge =
        connect_as(&s, &Subject::bridge("bridge-1-0").unwrap(), "bridge-0-0").await;
    other_bridge
        .subscribe("$share/bridge/devices/+/telemetry")
        .await;

    // The original bridge connection is still up and still gets messages: if it had been
    // kicked, its event loop would have ended and it would receive nothing.
    let dev_id = Uuid::new_v4();
    let mut dev = connect_as(&s, &Subject::Device(dev_id), "dev").await;
    for i in 0..10 {
        dev.publish(&telemetry(dev_id), &i.to_string()).await;
    }
    let (got0, got1) = tokio::join!(
        bridge.received(Duration::from_secs(2)),
        other_bridge.received(Duration::from_secs(2))
    );
    assert_eq!(
        got0.len() + got1.len(),
        11,
        "bridge-0-0 got {got0:?}, bridge-1-0 got {got1:?}"
    );
    assert!(!got0.is_empty(), "bridge-0-0 was kicked");

    // The broker log names each session by its CN, never the requested id.
    let log = std::fs::read_to_string(s.mq.dir().join("mosquitto.log")).unwrap();
    assert_eq!(
        log.matches(" as bridge-0-0 ").count(),
        1,
        "bridge-0-0 connected more than once:\n{log}"
    );
    assert!(log.contains(&format!(" as {a} ")), "{log}");
    assert!(log.contains(" as bridge-1-0 "), "{log}");
}

/// EMQX cannot run here: check that its config keeps the same guarantees (client id = CN;
/// devices may not subscribe at all; bridges may subscribe to the share group; deny by default).
#[test]
fn emqx_config_is_equivalent() {
    let conf = std::fs::read_to_string(repo_file("compose/emqx/emqx.conf")).unwrap();
    let acl = std::fs::read_to_string(repo_file("compose/emqx/acl.conf")).unwrap();
    for line in [
        "peer_cert_as_clientid = cn",
        "peer_cert_as_username = cn",
        "no_match = deny",
        "verify = verify_peer",
        "fail_if_no_peer_cert = true",
    ] {
        assert!(conf.contains(line), "emqx.conf lacks {line:?}");
    }
    let rules: Vec<&str> = acl
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with('{'))
        .collect();
    // The only subscribe grant is for bridge identities, and the list ends with deny all.
    let subscribe_grants: Vec<&&str> = rules
        .iter()
        .filter(|r| r.starts_with("{allow") && (r.contains("subscribe") || r.contains(", all,")))
        .filter(|r| !r.contains(", publish,"))
        .collect();
    assert_eq!(subscribe_grants.len(), 1, "{subscribe_grants:?}");
    assert!(subscribe_grants[0].contains(r#"{username, {re, "^bridge-"#));
    assert!(acl.contains(r#""$share/bridge/devices/+/telemetry""#));
    assert_eq!(rules.last(), Some(&"{deny, all}."));
    // The device rule grants publish only.
    assert!(acl.contains(r#"{allow, all, publish, ["devices/${username}/telemetry"]}."#));
}
