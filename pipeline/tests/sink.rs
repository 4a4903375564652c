//! The batch sink against real Postgres and NATS: exactly-once effect in both
//! stores, idempotent redelivery, one transaction per unit, outages that are
//! waited out, and readings Postgres refuses going to the DLQ.
// Helpers outside #[test] fns panic on purpose: a test whose setup fails must fail loudly.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use argus_pipeline::envelope::Envelope;
use argus_pipeline::reading::{check, Limits, Reading, Source};
use argus_pipeline::sink::{Sink, SinkConfig, SinkHandle, Ticket};
use argus_schema::nats::{NatsAuth, Unreachable};
use argus_schema::seed::{DEMO_ORG_ID, SENSOR_IDS};
use argus_testkit::nats::NatsServer;
use argus_testkit::pg::{PgServer, TestDb};
use async_nats::jetstream;
use bytes::Bytes;
use chrono::Utc;
use uuid::Uuid;

const RAW_STREAM: &str = "TELEMETRY_RAW_V1";
const DLQ_STREAM: &str = "TELEMETRY_DLQ";

/// The sink's pool, as the service role `argus_ingest` (the URL's database is migrated).
fn pool(url: &str) -> deadpool_postgres::Pool {
    let url = argus_testkit::pg::with_user(url, argus_schema::roles::INGEST);
    let config: tokio_postgres::Config = url.parse().unwrap();
    let manager = deadpool_postgres::Manager::from_config(
        config,
        tokio_postgres::NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    deadpool_postgres::Pool::builder(manager)
        .max_size(4)
        .build()
        .unwrap()
}

async fn prepare_db(url: &str) {
    let (mut client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    argus_schema::migrate::migrate(&mut client).await.unwrap();
    argus_schema::seed::seed(&mut client).await.unwrap();
}

/// A client logged in as `user`, as the process it stands for would.
async fn client_as(nats: &NatsServer, user: &str) -> async_nats::Client {
    let c = nats.credentials(user);
    argus_pipeline::nats::connect(
        NatsAuth::user_password(c.user, c.password),
        &[nats.url()],
        "sink-test",
        Unreachable::Retry,
    )
    .await
    .unwrap()
}

/// The topology applied; JetStream as `admin` (the test's checks) and as `bridge` (the sink's).
async fn jetstream_for(nats: &NatsServer) -> (jetstream::Context, jetstream::Context) {
    let admin = client_as(nats, "admin").await;
    argus_schema::streams::apply(&admin, Some(1)).await.unwrap();
    let bridge = client_as(nats, "bridge").await;
    (jetstream::new(admin), jetstream::new(bridge))
}

fn config() -> SinkConfig {
    SinkConfig {
        batch_size: 50,
        batch_max_bytes: 1024 * 1024,
        batch_linger: Duration::from_millis(10),
        linger_mode: Default::default(),
        queue_capacity: 1000,
        queue_max_bytes: 16 * 1024 * 1024,
        retry_initial: Duration::from_millis(50),
        retry_max: Duration::from_millis(500),
        pg_timeout: Duration::from_secs(5),
        publish_timeout: Duration::from_secs(2),
    }
}

fn reading(device: Uuid, payload: &str) -> Reading {
    let topic = format!("devices/{device}/telemetry");
    let checked = check(&topic, payload.as_bytes(), &Limits::default()).unwrap();
    Reading::from_checked(
        checked,
        DEMO_ORG_ID,
        Bytes::from(payload.to_string()),
        Utc::now(),
        Source::Mqtt,
        Some(topic),
        Some("bridge-0-0".into()),
    )
}

fn readings(n: usize, tag: &str) -> Vec<Reading> {
    (0..n)
        .map(|i| {
            reading(
                SENSOR_IDS[i % SENSOR_IDS.len()],
                &format!(r#"{{"tag":"{tag}","i":{i},"temperature":21.5}}"#),
            )
        })
        .collect()
}

async fn enqueue_each(sink: &SinkHandle, rs: &[Reading]) -> Vec<Ticket> {
    let mut tickets = Vec::new();
    for r in rs {
        tickets.push(sink.enqueue(vec![r.clone()]).await.unwrap());
    }
    tickets
}

async fn await_all(tickets: Vec<Ticket>, within: Duration) -> (usize, usize) {
    let all = futures::future::join_all(tickets);
    let results = tokio::time::timeout(within, all)
        .await
        .expect("tickets did not resolve in time");
    let mut dups = 0;
    let mut readings = 0;
    for r in results {
        let d = r.unwrap();
        dups += d.duplicates;
        readings += d.readings;
        assert!(d.dead_lettered.is_empty());
    }
    (readings, dups)
}

async fn row_count(url: &str) -> i64 {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .query_one("SELECT count(*) FROM telemetry_raw", &[])
        .await
        .unwrap()
        .get(0)
}

async fn stream_messages(
    js: &jetstream::Context,
    stream: &str,
) -> Vec<jetstream::message::StreamMessage> {
    let mut s = js.get_stream(stream).await.unwrap();
    let state = s.info().await.unwrap().state.clone();
    let mut out = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        if state.messages == 0 {
            break;
        }
        out.push(s.get_raw_message(seq).await.unwrap());
    }
    out
}

fn msg_id(m: &jetstream::message::StreamMessage) -> String {
    m.headers
        .get("Nats-Msg-Id")
        .expect("Nats-Msg-Id header")
        .to_string()
}

#[tokio::test]
async fn batch_lands_once_in_postgres_and_jetstream() {
    let db = TestDb::create().await;
    prepare_db(db.url()).await;
    let nats = NatsServer::start().await;
    let (js, bridge) = jetstream_for(&nats).await;
    let (sink, task) = Sink::start(config(), pool(db.url()), bridge);

    let first = reading(
        SENSOR_IDS[0],
        r#"{"timestamp":"2024-05-01T10:00:00.5Z","correlationId":"c-1","sequenceNumber":1,"totalChunks":2,"t":1}"#,
    );
    let mut rs = readings(9, "landing");
    rs.insert(0, first.clone());
    let tickets = enqueue_each(&sink, &rs).await;
    assert_eq!(await_all(tickets, Duration::from_secs(20)).await, (10, 0));
    assert!(sink.is_healthy());

    // Postgres: one row per reading, every column right.
    let client = db.client().await;
    assert_eq!(row_count(db.url()).await, 10);
    let row = client
        .query_one(
            "SELECT tenant_id, device_id, payload, payload_size_bytes, correlation_id, sequence_number, \
             total_chunks, device_timestamp, received_at, ingestion_source, mqtt_topic, client_id \
             FROM telemetry_raw WHERE id = $1",
            &[&first.message_id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Uuid>(0), DEMO_ORG_ID);
    assert_eq!(row.get::<_, Uuid>(1), SENSOR_IDS[0]);
    let payload: serde_json::Value = row.get(2);
    assert_eq!(payload["correlationId"], "c-1");
    assert_eq!(
        row.get::<_, Option<i32>>(3),
        Some(first.payload.len() as i32)
    );
    assert_eq!(row.get::<_, Option<String>>(4).as_deref(), Some("c-1"));
    assert_eq!(row.get::<_, Option<i32>>(5), Some(1));
    assert_eq!(row.get::<_, Option<i32>>(6), Some(2));
    assert_eq!(
        row.get::<_, Option<chrono::DateTime<Utc>>>(7),
        first.device_timestamp
    );
    assert_eq!(row.get::<_, chrono::DateTime<Utc>>(8), first.received_at);
    assert_eq!(row.get::<_, Option<String>>(9).as_deref(), Some("mqtt"));
    assert_eq!(row.get::<_, Option<String>>(10), first.mqtt_topic);
    assert_eq!(
        row.get::<_, Option<String>>(11).as_deref(),
        Some("bridge-0-0")
    );

    // JetStream: one message per reading, Nats-Msg-Id = row id, envelope right.
    let msgs = stream_messages(&js, RAW_STREAM).await;
    assert_eq!(msgs.len(), 10);
    let ids: std::collections::HashSet<String> =
        rs.iter().map(|r| r.message_id.to_string()).collect();
    for m in &msgs {
        assert!(ids.contains(&msg_id(m)));
        let e: Envelope = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(e.message_id.to_string(), msg_id(m));
        assert_eq!(
            m.subject.as_str(),
            format!("telemetry.raw.v1.{}", e.device_id)
        );
    }
    let m = msgs
        .iter()
        .find(|m| msg_id(m) == first.message_id.to_string())
        .unwrap();
    let e: Envelope = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(e.tenant_id, DEMO_ORG_ID);
    assert_eq!(e.device_id, SENSOR_IDS[0]);
    assert_eq!(e.topic, first.mqtt_topic);
    assert_eq!(e.client_id.as_deref(), Some("bridge-0-0"));
    assert_eq!(e.received_at, first.received_at);
    assert_eq!(e.device_timestamp, first.device_timestamp);
    assert_eq!(e.payload, payload);
    assert_eq!(e.source, "mqtt");

    sink.close();
    task.await.unwrap();
}

#[tokio::test]
async fn redelivered_readings_are_stored_and_published_once() {
    let db = TestDb::create().await;
    prepare_db(db.url()).await;
    let nats = NatsServer::start().await;
    let (js, bridge) = jetstream_for(&nats).await;
    let (sink, task) = Sink::start(config(), pool(db.url()), bridge);

    let rs = readings(20, "dup");
    // Twice in the same batch (a broker redelivery while the first copy waits).
    let mut twice = rs[..5].to_vec();
    twice.extend_from_slice(&rs[..5]);
    let t = sink.enqueue(twice).await.unwrap();
    let d = t.await.unwrap();
    assert_eq!((d.readings, d.duplicates), (10, 5));

    // Again after they are stored, mixed with new ones: fast path fails on the
    // primary key, the staging path skips the stored ones.
    let tickets = enqueue_each(&sink, &rs).await;
    assert_eq!(await_all(tickets, Duration::from_secs(20)).await, (20, 5));
    // And once more, all already stored.
    let tickets = enqueue_each(&sink, &rs).await;
    assert_eq!(await_all(tickets, Duration::from_secs(20)).await, (20, 20));

    assert_eq!(row_count(db.url()).await, 20);
    let msgs = stream_messages(&js, RAW_STREAM).await;
    assert_eq!(msgs.len(), 20, "JetStream deduplicates by Nats-Msg-Id");
    sink.close();
    task.await.unwrap();
}

/// A reading with a supplied `messageId`, so that its id does not depend on its payload.
fn with_id(supplied: &str, v: i64) -> Reading {
    reading(
        SENSOR_IDS[0],
        &format!(r#"{{"messageId":"{supplied}","v":{v}}}"#),
    )
}

#[tokio::test]
async fn a_reused_id_with_other_content_is_a_conflict_and_the_stored_row_stays() {
    let db = TestDb::create().await;
    prepare_db(db.url()).await;
    let nats = NatsServer::start().await;
    let (js, bridge) = jetstream_for(&nats).await;
    let (sink, task) = Sink::start(config(), pool(db.url()), bridge);

    let first = with_id("m-1", 1);
    let d = sink
        .enqueue(vec![first.clone()])
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        d.conflicts.is_empty() && d.duplicate_ids.is_empty(),
        "{d:?}"
    );

    // The same reading redelivered later, from another client: a duplicate,
    // republished with the stored row's context.
    let mut again = first.clone();
    again.received_at = first.received_at + chrono::Duration::seconds(5);
    again.client_id = Some("bridge-1-0".into());
    let d = sink.enqueue(vec![again]).await.unwrap().await.unwrap();
    assert_eq!(d.duplicate_ids, vec![first.message_id]);
    assert!(d.conflicts.is_empty(), "{d:?}");
    // The same JSON in other bytes (key order, whitespace), stored or in one batch:
    // still a duplicate, not a conflict.
    let reencoded = reading(SENSOR_IDS[0], r#"{ "v": 1, "messageId": "m-1" }"#);
    assert_eq!(reencoded.message_id, first.message_id);
    let d = sink
        .enqueue(vec![reencoded.clone()])
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(d.duplicate_ids, vec![first.message_id], "{d:?}");
    let fresh = with_id("m-9", 1);
    let fresh_reencoded = reading(SENSOR_IDS[0], r#"{"v":1, "messageId":"m-9"}"#);
    let d = sink
        .enqueue(vec![fresh.clone(), fresh_reencoded])
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(d.duplicate_ids, vec![fresh.message_id], "{d:?}");
    assert!(d.conflicts.is_empty(), "{d:?}");

    // A restarted counter: the same id, other content. In the DLQ, not stored.
    let reused = with_id("m-1", 2);
    assert_eq!(reused.message_id, first.message_id);
    let other = with_id("m-2", 1);
    let d = sink
        .enqueue(vec![other.clone(), reused.clone()])
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(d.conflicts.len(), 1, "{d:?}");
    let c = &d.conflicts[0];
    assert_eq!(c.id, first.message_id);
    assert_eq!(c.stored_sha256, hex::encode(first.content_sha256()));
    assert_eq!(c.sha256, hex::encode(reused.content_sha256()));
    assert!(
        d.duplicate_ids.is_empty() && d.dead_lettered.is_empty(),
        "{d:?}"
    );

    // Two readings under one new id in one batch: the first is stored, the second
    // conflicts with it.
    let (a, b) = (with_id("m-3", 1), with_id("m-3", 2));
    let d = sink
        .enqueue(vec![a.clone(), b.clone()])
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(d.conflicts.len(), 1, "{d:?}");
    assert_eq!(d.conflicts[0].sha256, hex::encode(b.content_sha256()));

    let client = db.client().await;
    let rows = client
        .query(
            "SELECT payload->>'v', content_sha256, client_id FROM telemetry_raw \
             WHERE id = ANY($1) ORDER BY payload->>'messageId'",
            &[&vec![first.message_id, a.message_id]],
        )
        .await
        .unwrap();
    let v: Vec<(String, Vec<u8>, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        v,
        vec![
            (
                "1".into(),
                first.content_sha256().to_vec(),
                "bridge-0-0".into()
            ),
            ("1".into(), a.content_sha256().to_vec(), "bridge-0-0".into()),
        ]
    );
    assert_eq!(row_count(db.url()).await, 4, "m-1, m-2, m-3, m-9");

    // JetStream holds the stored content once per id (the duplicate was published
    // with the stored row's context, inside the dedupe window).
    let raw = stream_messages(&js, RAW_STREAM).await;
    assert_eq!(raw.len(), 4);
    for m in &raw {
        let env: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(env["payload"]["v"], 1, "{env}");
        assert_eq!(env["clientId"], "bridge-0-0", "{env}");
    }
    let letters = stream_messages(&js, DLQ_STREAM).await;
    let subjects: Vec<&str> = letters.iter().map(|l| l.subject.as_str()).collect();
    assert_eq!(subjects, vec!["telemetry.dlq.id_conflict"; 2]);
    let letter: serde_json::Value = serde_json::from_slice(&letters[0].payload).unwrap();
    assert_eq!(letter["messageId"], first.message_id.to_string());
    assert_eq!(letter["payload"], r#"{"messageId":"m-1","v":2}"#);
    assert!(
        letter["detail"]
            .as_str()
            .unwrap()
            .contains(&hex::encode(first.content_sha256())),
        "{letter}"
    );
    sink.close();
    task.await.unwrap();
}

#[tokio::test]
async fn a_timed_out_batch_is_split_and_every_part_lands() {
    let db = TestDb::create().await;
    prepare_db(db.url()).await;
    let nats = NatsServer::start().await;
    let (js, bridge) = jetstream_for(&nats).await;
    // The server's statement timeout (SQLSTATE 57014) refuses a batch of 40 rows
    // that each take 10 ms to insert (a trigger stands in for slow storage); halves
    // of 10 or fewer fit.
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE FUNCTION slow_row() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN PERFORM pg_sleep(0.01); RETURN NEW; END $$; \
             CREATE TRIGGER slow_row BEFORE INSERT ON telemetry_raw \
             FOR EACH ROW EXECUTE FUNCTION slow_row();",
        )
        .await
        .unwrap();
    let url = format!("{}?options=-c%20statement_timeout%3D150", db.url());
    let mut cfg = config();
    cfg.batch_size = 40;
    cfg.batch_linger = Duration::from_millis(200);
    let (sink, task) = Sink::start(cfg, pool(&url), bridge);

    let rs = readings(40, "slow");
    let tickets = enqueue_each(&sink, &rs).await;
    assert_eq!(
        await_all(tickets, Duration::from_secs(30)).await,
        (40, 0),
        "every reading stored once, none dead-lettered"
    );
    assert_eq!(row_count(db.url()).await, 40);
    assert_eq!(stream_messages(&js, RAW_STREAM).await.len(), 40);
    sink.close();
    task.await.unwrap();
}

#[tokio::test]
async fn a_unit_is_one_transaction() {
    let db = TestDb::create().await;
    prepare_db(db.url()).await;
    let nats = NatsServer::start().await;
    let (_admin, bridge) = jetstream_for(&nats).await;
    let mut cfg = config();
    cfg.batch_size = 2; // smaller than the unit: the unit is still not split
    let (sink, task) = Sink::start(cfg, pool(db.url()), bridge);

    let unit = readings(7, "unit");
    let d = sink.enqueue(unit).await.unwrap().await.unwrap();
    assert_eq!(d.readings, 7);
    let client = db.client().await;
    let xmins: i64 = client
        .query_one("SELECT count(DISTINCT xmin::text) FROM telemetry_raw", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(xmins, 1, "all rows of a unit come from one transaction");
    assert_eq!(row_count(db.url()).await, 7);
    sink.close();
    task.await.unwrap();
}

#[tokio::test]
async fn unstorable_reading_goes_to_the_dlq_and_the_rest_is_stored() {
    let db = TestDb::create().await;
    prepare_db(db.url()).await;
    let nats = NatsServer::start().await;
    let (js, bridge) = jetstream_for(&nats).await;
    let (sink, task) = Sink::start(config(), pool(db.url()), bridge);

    let mut rs = readings(6, "poison");
    // Valid JSON that jsonb refuses. The bridge's checks refuse it before the sink
    // (`invalid_json`), so it is built here as something that got past them would be:
    // the sink is the last line of defence.
    let mut poison = reading(SENSOR_IDS[1], r#"{"note":"nul here"}"#);
    poison.payload = Bytes::from_static(br#"{"note":"nul \u0000 here"}"#);
    rs.insert(3, poison.clone());
    let tickets = enqueue_each(&sink, &rs).await;
    let results = tokio::time::timeout(Duration::from_secs(20), futures::future::join_all(tickets))
        .await
        .unwrap();
    let dead: Vec<Uuid> = results
        .into_iter()
        .flat_map(|r| r.unwrap().dead_lettered)
        .collect();
    assert_eq!(dead, vec![poison.message_id]);

    assert_eq!(row_count(db.url()).await, 6);
    assert_eq!(stream_messages(&js, RAW_STREAM).await.len(), 6);
    let letters = stream_messages(&js, DLQ_STREAM).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].subject.as_str(), "telemetry.dlq.unstorable");
    let v: serde_json::Value = serde_json::from_slice(&letters[0].payload).unwrap();
    assert_eq!(v["reason"], "unstorable");
    assert_eq!(v["payload"], r#"{"note":"nul \u0000 here"}"#);
    assert_eq!(v["messageId"], poison.message_id.to_string());
    assert_eq!(v["topic"], poison.mqtt_topic.clone().unwrap());
    assert!(v["detail"].as_str().unwrap().contains("22P05"), "{v}");
    sink.close();
    task.await.unwrap();
}

/// A permanent publish error ends: a reading whose envelope the stream refuses
/// (past its `max_msg_size`: JetStream error 10054) is stored, dead-lettered as
/// `oversize`, and its ticket resolves; the readings around it are published. Before,
/// the publish was retried forever and the unit never resolved.
#[tokio::test]
async fn an_envelope_jetstream_refuses_for_good_is_dead_lettered_and_the_rest_flows() {
    let db = TestDb::create().await;
    prepare_db(db.url()).await;
    let nats = NatsServer::start().await;
    let (js, bridge) = jetstream_for(&nats).await;
    let raw = js.get_stream(RAW_STREAM).await.unwrap();
    let mut stream_config = raw.cached_info().config.clone();
    stream_config.max_message_size = 4096;
    js.update_stream(stream_config).await.unwrap();
    let (sink, task) = Sink::start(config(), pool(db.url()), bridge);

    let mut rs = readings(6, "big");
    let pad = "x".repeat(5000);
    let big = reading(SENSOR_IDS[1], &format!(r#"{{"pad":"{pad}"}}"#));
    rs.insert(3, big.clone());
    let tickets = enqueue_each(&sink, &rs).await;
    let results = tokio::time::timeout(Duration::from_secs(20), futures::future::join_all(tickets))
        .await
        .expect("every ticket resolves: no retry loop on a permanent error");
    let dead: Vec<Uuid> = results
        .into_iter()
        .flat_map(|r| r.unwrap().dead_lettered)
        .collect();
    assert_eq!(dead, vec![big.message_id]);

    assert_eq!(
        row_count(db.url()).await,
        7,
        "the refused reading's row stays stored"
    );
    let published = stream_messages(&js, RAW_STREAM).await;
    assert_eq!(published.len(), 6);
    assert!(published
        .iter()
        .all(|m| msg_id(m) != big.message_id.to_string()));
    let letters = stream_messages(&js, DLQ_STREAM).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].subject.as_str(), "telemetry.dlq.oversize");
    let v: serde_json::Value = serde_json::from_slice(&letters[0].payload).unwrap();
    assert_eq!(v["messageId"], big.message_id.to_string());
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("stored in telemetry_raw"),
        "{v}"
    );
    sink.close();
    task.await.unwrap();
}

/// Enqueues `n` readings in a steady trickle and returns their tickets.
async fn trickle(sink: &SinkHandle, rs: &[Reading], every: Duration) -> Vec<Ticket> {
    let mut tickets = Vec::new();
    for r in rs {
        tickets.push(sink.enqueue(vec![r.clone()]).await.unwrap());
        tokio::time::sleep(every).await;
    }
    tickets
}

#[tokio::test]
async fn nats_outage_is_waited_out_and_everything_lands_once() {
    let db = TestDb::create().await;
    prepare_db(db.url()).await;
    let mut nats = NatsServer::start().await;
    let (js, bridge) = jetstream_for(&nats).await;
    let (sink, task) = Sink::start(config(), pool(db.url()), bridge);

    let rs = readings(60, "nats-outage");
    let before = trickle(&sink, &rs[..20], Duration::from_millis(2)).await;
    await_all(before, Duration::from_secs(20)).await;

    nats.stop().await;
    let during = trickle(&sink, &rs[20..40], Duration::from_millis(2)).await;
    // Stored in Postgres, but not acknowledged while JetStream is down.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!sink.is_healthy());
    assert!(sink.last_error().is_some());
    assert_eq!(sink.queued(), 20, "nothing resolved while NATS is down");

    nats.restart().await;
    let after = trickle(&sink, &rs[40..], Duration::from_millis(2)).await;
    await_all(during, Duration::from_secs(30)).await;
    await_all(after, Duration::from_secs(30)).await;
    assert!(sink.is_healthy());

    assert_eq!(row_count(db.url()).await, 60);
    let msgs = stream_messages(&js, RAW_STREAM).await;
    let ids: std::collections::HashSet<String> = msgs.iter().map(msg_id).collect();
    assert_eq!(msgs.len(), 60, "each message exactly once in the stream");
    assert_eq!(ids.len(), 60);
    sink.close();
    task.await.unwrap();
}

#[tokio::test]
async fn postgres_outage_is_waited_out_and_everything_lands_once() {
    let mut pg = PgServer::start().await;
    let url = pg.create_database("argus").await;
    prepare_db(&url).await;
    let nats = NatsServer::start().await;
    let (js, bridge) = jetstream_for(&nats).await;
    let (sink, task) = Sink::start(config(), pool(&url), bridge);

    let rs = readings(60, "pg-outage");
    let before = trickle(&sink, &rs[..20], Duration::from_millis(2)).await;
    await_all(before, Duration::from_secs(20)).await;

    pg.stop().await;
    let during = trickle(&sink, &rs[20..40], Duration::from_millis(2)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!sink.is_healthy());
    assert_eq!(sink.queued(), 20, "nothing resolved while Postgres is down");
    assert_eq!(
        stream_messages(&js, RAW_STREAM).await.len(),
        20,
        "nothing is published before it is stored"
    );

    pg.restart().await;
    let after = trickle(&sink, &rs[40..], Duration::from_millis(2)).await;
    await_all(during, Duration::from_secs(30)).await;
    await_all(after, Duration::from_secs(30)).await;
    assert!(sink.is_healthy());

    assert_eq!(row_count(&url).await, 60);
    assert_eq!(stream_messages(&js, RAW_STREAM).await.len(), 60);
    sink.close();
    task.await.unwrap();
}

#[tokio::test]
async fn full_queue_pushes_back_and_close_flushes() {
    let db = TestDb::create().await;
    prepare_db(db.url()).await;
    let mut nats = NatsServer::start().await;
    let (js, bridge) = jetstream_for(&nats).await;
    let mut cfg = config();
    cfg.queue_capacity = 10;
    let (sink, task) = Sink::start(cfg, pool(db.url()), bridge);

    nats.stop().await;
    let rs = readings(11, "full");
    let tickets = enqueue_each(&sink, &rs[..10]).await;
    // At capacity: try_enqueue hands the unit back, enqueue waits.
    let back = sink.try_enqueue(vec![rs[10].clone()]).unwrap_err();
    assert_eq!(back.into_inner().len(), 1);
    assert!(
        tokio::time::timeout(
            Duration::from_millis(300),
            sink.enqueue(vec![rs[10].clone()])
        )
        .await
        .is_err(),
        "enqueue waits for capacity"
    );

    nats.restart().await;
    let last = sink.enqueue(vec![rs[10].clone()]).await.unwrap();
    sink.close();
    assert!(sink.try_enqueue(vec![rs[0].clone()]).is_err());
    await_all(tickets, Duration::from_secs(30)).await;
    last.await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row_count(db.url()).await, 11);
    assert_eq!(stream_messages(&js, RAW_STREAM).await.len(), 11);
}

/// A sink whose NATS user may not publish telemetry (here the load tester's): the
/// server's refusal is told apart from a slow server, nothing is acknowledged, nothing
/// reaches the stream, and the rows stay stored.
#[tokio::test]
async fn a_publish_the_user_may_not_make_is_reported_as_refused_and_nothing_is_acked() {
    let db = TestDb::create().await;
    prepare_db(db.url()).await;
    let nats = NatsServer::start().await;
    let (js, _bridge) = jetstream_for(&nats).await;
    let not_allowed = jetstream::new(client_as(&nats, "loadtest").await);
    let (sink, _task) = Sink::start(config(), pool(db.url()), not_allowed);

    let rs = readings(3, "refused");
    let tickets = trickle(&sink, &rs, Duration::from_millis(1)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let error = loop {
        match sink.last_error() {
            Some(e) if e.contains("NATS refused the publish") => break e,
            _ => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no refusal reported; last error: {:?}",
                    sink.last_error()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert!(error.contains("permissions"), "{error}");
    assert!(!sink.is_healthy());
    assert!(argus_pipeline::nats::refusals() > 0);
    assert_eq!(sink.queued(), 3, "nothing acknowledged");
    assert_eq!(row_count(db.url()).await, 3, "the rows are stored");
    assert!(stream_messages(&js, RAW_STREAM).await.is_empty());
    drop(tickets);
}
