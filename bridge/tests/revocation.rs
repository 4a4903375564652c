//! Revocation cuts a live device off: a device connected over mutual TLS and
//! publishing is revoked through the sidecar's admin API
//! (`DELETE /api/v1/devices/{id}/certificate` on its admin listener, the sidecar running
//! in process on the test's PKI directory, with the broker's pid file so that it reloads
//! the broker, as in `compose/up`). The broker's plugin
//! (`compose/mosquitto/argus_sub_acl.c`) closes its connection within 2 s, the reloaded
//! CRL refuses its reconnects, and what it sent before the revocation is stored.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argus_ingest_http::{serve, AppState, Cli, DeviceListener, Listeners};
use clap::Parser as _;
use common::*;
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS, TlsConfiguration, Transport};

/// What the device's event loop saw, with when.
#[derive(Default)]
struct Seen {
    connacks: Vec<Instant>,
    errors: Vec<(Instant, String)>,
    pubacks: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_device_is_disconnected_and_cannot_come_back() {
    let stack = Stack::start(false).await;
    let _bridge = stack.bridge_in_process(0).await;
    let device = SENSOR_IDS[1];
    let id = stack.pki.device(device);
    let mut o = MqttOptions::new(device.to_string(), "127.0.0.1", stack.mq.port());
    o.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            device_tls(&stack.pki.ca_file(), &id),
        )));
    let (client, mut eventloop) = AsyncClient::new(o, 64);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let log = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    log.lock().unwrap().connacks.push(Instant::now())
                }
                Ok(Event::Incoming(Incoming::PubAck(_))) => log.lock().unwrap().pubacks += 1,
                Ok(_) => {}
                Err(e) => {
                    log.lock()
                        .unwrap()
                        .errors
                        .push((Instant::now(), e.to_string()));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    let topic = telemetry_topic(device);
    let payloads: Vec<String> = (0..5).map(|n| numbered_payload("revoked", n)).collect();
    for p in &payloads {
        client
            .publish(&topic, QoS::AtLeastOnce, false, p.clone())
            .await
            .unwrap();
    }
    wait_for("the PUBACKs", Duration::from_secs(10), || {
        seen.lock().unwrap().pubacks == 5
    })
    .await;
    assert_eq!(seen.lock().unwrap().connacks.len(), 1);
    assert!(seen.lock().unwrap().errors.is_empty());

    let sidecar = Sidecar::start(&stack).await;
    let revoked_at = Instant::now();
    let answer = reqwest::Client::new()
        .delete(format!(
            "{}/api/v1/devices/{device}/certificate",
            sidecar.admin
        ))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"reason": "keyCompromise"}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let answer: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(
        answer["revokedSerialNumbers"].as_array().map(Vec::len),
        Some(1),
        "{answer}"
    );

    wait_for(
        "the broker to close the connection",
        Duration::from_secs(2),
        || !seen.lock().unwrap().errors.is_empty(),
    )
    .await;
    let closed_after = seen.lock().unwrap().errors[0].0 - revoked_at;
    // Reconnects (every 200 ms) are refused: no second CONNACK for 4 s.
    tokio::time::sleep(Duration::from_secs(4)).await;
    {
        let s = seen.lock().unwrap();
        assert_eq!(
            s.connacks.len(),
            1,
            "the revoked device connected again: {:?}",
            s.errors
        );
        assert!(s.errors.len() >= 3, "reconnects were tried: {:?}", s.errors);
    }
    task.abort();
    eprintln!("closed {closed_after:?} after the revocation");

    let expected = payloads.iter().map(|p| expected_id(device, p)).collect();
    assert_exactly_once(&stack, &expected).await;
    // The whole log: the reconnects refused since then push the notice out of its tail.
    let log = std::fs::read_to_string(stack.mq.dir().join("mosquitto.log")).unwrap();
    assert!(
        log.contains("revoked; disconnecting its clients"),
        "{}",
        stack.mq.log_tail()
    );
}

const ADMIN_TOKEN: &str = "revocation-test-admin-token";

/// The HTTP sidecar in process, configured from flags as the binary is: admin listener
/// on a free port, the test's PKI directory, the broker's pid in a file.
struct Sidecar {
    admin: String,
    _pid_file: tempfile::NamedTempFile,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Sidecar {
    async fn start(stack: &Stack) -> Sidecar {
        let pid_file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(pid_file.path(), stack.mq.pid().unwrap().to_string()).unwrap();
        let nats_password_file = stack.nats.password_file("ingest-http");
        argus_testkit::clear_flag_env();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let device = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_url = format!("http://{}", admin.local_addr().unwrap());
        let database_url = stack.pg.service_url();
        let admin_database_url =
            argus_testkit::pg::with_user(&stack.pg.url(), argus_schema::roles::ADMIN);
        let config = Cli::try_parse_from([
            "argus-ingest-http",
            "--database-url",
            &database_url,
            "--admin-database-url",
            &admin_database_url,
            "--nats-urls",
            &stack.nats.url(),
            "--nats-user",
            "ingest-http",
            "--nats-password-file",
            &nats_password_file.display().to_string(),
            "--admin-token",
            ADMIN_TOKEN,
            "--pki-dir",
            &stack.pki.dir.path().display().to_string(),
            "--broker-pid-file",
            &pid_file.path().display().to_string(),
        ])
        .unwrap()
        .into_config()
        .unwrap();
        let state = AppState::connect(config).await.expect("sidecar start");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let listeners = Listeners {
            device: DeviceListener::Plain(device),
            admin,
        };
        tokio::spawn(serve(listeners, state, async {
            let _ = stopped.await;
        }));
        Sidecar {
            admin: admin_url,
            _pid_file: pid_file,
            _stop: stop,
        }
    }
}
