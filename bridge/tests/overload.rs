//! A sustained overload (the rumqttc manual-ack deadlock in `docs/bridge.md`): devices publish faster than the bridge
//! can store, for over a minute. The bridge must never stall (rumqttc's manual acks go
//! through the same bounded channel `EventLoop::poll` drains; a poll loop that waits on
//! the pipeline while the pipeline waits on `ack()` deadlocks for good), and must end
//! with every message stored and published once.
//!
//! With MQTT 5 what the bridge holds stays within its connections' Receive Maximum.
//!
//! The bridge is made slow on purpose: a statement trigger sleeps 50 ms on every COPY
//! into `telemetry_raw`, so with batches of 50 it stores about 1,000 msg/s at most, and
//! the devices publish 1,500 msg/s for 62 s.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use argus_bridge::config::Cli;
use clap::Parser as _;
use common::*;
use uuid::Uuid;

const PUBLISH_RATE: usize = 1_500; // msg/s, over two devices
const PUBLISH_FOR: Duration = Duration::from_secs(62);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sustained_overload_never_stalls_and_loses_nothing() {
    let stack = Stack::start(false).await;
    stack
        .db()
        .await
        .batch_execute(
            "CREATE FUNCTION slow_flush() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN PERFORM pg_sleep(0.05); RETURN NULL; END $$;
             CREATE TRIGGER slow_flush AFTER INSERT ON telemetry_raw
               FOR EACH STATEMENT EXECUTE FUNCTION slow_flush();",
        )
        .await
        .unwrap();

    let mut args = vec![
        "argus-bridge".to_string(),
        "--metrics-addr".into(),
        "127.0.0.1:0".into(),
    ];
    args.extend(stack.bridge_args(0));
    for (flag, value) in [("--batch-size", "50"), ("--batch-linger", "5ms")] {
        let at = args
            .iter()
            .position(|a| a == flag)
            .expect("flag in bridge_args")
            + 1;
        args[at] = value.into();
    }
    let config = Cli::try_parse_from(args).unwrap().into_config().unwrap();
    let max_in_flight = config.mqtt.max_inflight * usize::from(config.mqtt.connections);
    let bridge = argus_bridge::app::start(config).await.unwrap();
    wait_ready(bridge.metrics_addr.port(), Duration::from_secs(20)).await;

    let devices = [
        argus_schema::seed::SENSOR_IDS[0],
        argus_schema::seed::SENSOR_IDS[1],
    ];
    let publishers: Vec<Arc<Publisher>> =
        devices.iter().map(|d| Arc::new(stack.device(*d))).collect();
    let mut expected: HashSet<Uuid> = HashSet::new();
    let mut tasks = Vec::new();
    for (device, publisher) in devices.iter().zip(&publishers) {
        let per_device = PUBLISH_RATE / devices.len();
        let total = per_device * PUBLISH_FOR.as_secs() as usize;
        let run = format!("overload-{device}");
        expected.extend((0..total).map(|n| expected_id(*device, &numbered_payload(&run, n))));
        let (device, publisher) = (*device, publisher.clone());
        tasks.push(tokio::spawn(async move {
            let topic = telemetry_topic(device);
            // 10 ms ticks of per_device/100 messages each: a steady rate.
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut n = 0;
            while n < total {
                tick.tick().await;
                for _ in 0..(per_device / 100).min(total - n) {
                    publisher.publish(&topic, numbered_payload(&run, n)).await;
                    n += 1;
                }
            }
        }));
    }

    // While publishing: the store keeps moving (no stall) and the bridge holds no more
    // than its inflight windows.
    let db = stack.db().await;
    let started = Instant::now();
    let mut last_rows = 0;
    let mut peak_in_flight = 0.0f64;
    while started.elapsed() < PUBLISH_FOR {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let rows = row_count(&db).await;
        assert!(
            rows > last_rows,
            "no progress in 5 s at {:?}: {rows} rows (stalled)",
            started.elapsed()
        );
        last_rows = rows;
        let metrics = argus_testkit::http_get(bridge.metrics_addr.port(), "/metrics")
            .unwrap()
            .1;
        peak_in_flight =
            peak_in_flight.max(metric_sum(&metrics, "argus_bridge_in_flight_messages"));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let sent = expected.len();
    let behind = sent as i64 - row_count(&db).await;
    eprintln!("published {sent} in {:?}; the bridge was {behind} messages behind; peak in flight {peak_in_flight}", started.elapsed());
    assert!(
        behind > 1_000,
        "the bridge kept up ({behind} behind): this test did not overload it"
    );
    // With MQTT 5 (the default) the bridge holds the broker to its Receive Maximum
    // per connection. Mosquitto 2.0.11 does not keep to it once acknowledgements
    // flow (its issue #2301; measured here: 21,422 held through windows of 2 x 1000
    // before the bridge enforced it), so the bridge leaves what comes past it to
    // the broker (`argus_bridge_receive_maximum_exceeded_total`) and renews the
    // connection: what it holds stays within the windows either way.
    let metrics = argus_testkit::http_get(bridge.metrics_addr.port(), "/metrics")
        .unwrap()
        .1;
    eprintln!(
        "inflight windows {max_in_flight}, peak held by the bridge {peak_in_flight}; \
         past the Receive Maximum {}, connections renewed {}",
        metric_sum(&metrics, "argus_bridge_receive_maximum_exceeded_total"),
        metric_sum(&metrics, "argus_bridge_intake_full_disconnects_total")
    );
    assert!(
        peak_in_flight <= max_in_flight as f64,
        "the bridge held {peak_in_flight} messages, past its Receive Maximum windows ({max_in_flight})"
    );
    assert_eq!(
        metric_sum(&metrics, "argus_bridge_intake_overflow_total"),
        0.0,
        "an intake held more than --max-inflight"
    );
    for p in &publishers {
        p.wait_acked(sent / devices.len(), Duration::from_secs(60))
            .await;
    }
    wait_stored(&stack, sent, Duration::from_secs(180)).await;
    assert_exactly_once(&stack, &expected).await;
    bridge.shutdown.cancel();
    bridge.task.await.unwrap().unwrap();
}
