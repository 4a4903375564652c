//! Revocation cuts a live device off: a device connected over mutual TLS and
//! publishing is revoked (`argus_pki::Ca::revoke_device`, what the sidecar's
//! `DELETE /api/v1/devices/{id}/certificate` and `argus-pki revoke` run, then the
//! broker reload they trigger). The broker's plugin (`compose/mosquitto/argus_sub_acl.c`)
//! closes its connection within 2 s, the reloaded CRL refuses its reconnects, and
//! what it sent before the revocation is stored.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argus_pki::{Ca, RevocationReason};
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

    let revoked_at = Instant::now();
    let serials = Ca::load(stack.pki.dir.path())
        .unwrap()
        .revoke_device(device, RevocationReason::KeyCompromise)
        .unwrap();
    assert_eq!(serials.len(), 1);
    stack.mq.reload();

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
