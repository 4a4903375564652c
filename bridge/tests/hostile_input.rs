//! Hostile input over the real MQTT path (issue 8): devices publish over mutual
//! TLS through Mosquitto (the local stack's template and ACL) to a real bridge
//! with Postgres, NATS and Redis. Every row of the table has an expected outcome:
//!
//! - `Stored`: one row in `telemetry_raw` and one message in `TELEMETRY_RAW_V1`;
//! - `Dlq(reason)`: one letter on `telemetry.dlq.<reason>` with the original bytes,
//!   nothing stored;
//! - `BrokerDrops`: the broker acknowledges (MQTT 3.1.1 has no PUBACK reason code)
//!   but the ACL denies it, so it never reaches the bridge: nothing anywhere;
//! - `BrokerRefuses`: the broker closes the connection without a PUBACK (malformed
//!   topic, packet too large): the device knows it was not accepted.
//!
//! After the table, the accounting: exactly the `Stored` ids in both stores, once,
//! exactly one letter per `Dlq` row, and nothing else. Expected outcomes and the
//! debatable ones are explained in docs/reliability.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use argus_testkit::mosquitto::Mosquitto;
use argus_testkit::nats::NatsServer;
use argus_testkit::pg::TestDb;
use argus_testkit::redis::RedisServer;
use async_nats::jetstream;
use base64::Engine as _;
use common::*;
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS, TlsConfiguration, Transport};
use uuid::Uuid;

/// The bridge's default payload limit (the test bridge does not override it).
const LIMIT: usize = argus_pipeline::reading::DEFAULT_MAX_PAYLOAD_BYTES;
/// Mosquitto's `max_packet_size` in compose/mosquitto/mosquitto.conf.in.
const BROKER_MAX_PACKET: usize = 1_048_576;

fn repo_root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Mosquitto from the stack's template and ACL, rendered here so that this file
/// follows the template as the PKI work changes it (e.g. a subscribe plugin).
async fn mosquitto(pki: &Pki) -> Mosquitto {
    let root = repo_root();
    let mut text = std::fs::read_to_string(root.join("compose/mosquitto/mosquitto.conf.in"))
        .expect("mosquitto template")
        .replace("@PORT@", "{port}")
        .replace("@PKI_DIR@", &pki.dir.path().display().to_string())
        .replace("@DATA_DIR@", "{dir}")
        .replace(
            "@ACL_FILE@",
            &root.join("compose/mosquitto/acl").display().to_string(),
        );
    if text.contains("@SUB_ACL_PLUGIN@") {
        let out = pki.dir.path().join("argus_sub_acl.so");
        let status = std::process::Command::new("cc")
            .args(["-shared", "-fPIC", "-O2", "-o"])
            .arg(&out)
            .arg(root.join("compose/mosquitto/argus_sub_acl.c"))
            .status()
            .expect("cc");
        assert!(status.success(), "building argus_sub_acl.so failed");
        text = text.replace("@SUB_ACL_PLUGIN@", &out.display().to_string());
    }
    Mosquitto::start(&text).await
}

async fn start_stack() -> Stack {
    let pki = Pki::new();
    let (mq, nats, redis, db) = tokio::join!(
        mosquitto(&pki),
        NatsServer::start(),
        RedisServer::start(),
        TestDb::create()
    );
    let pg = Pg::Shared(db);
    let mut client = argus_testkit::pg::connect(&pg.url()).await;
    argus_schema::migrate::migrate(&mut client).await.unwrap();
    argus_schema::seed::seed(&mut client).await.unwrap();
    argus_schema::streams::apply(&common::nats_client(&nats, "admin").await, Some(1))
        .await
        .unwrap();
    Stack {
        pki,
        mq,
        nats,
        pg,
        redis,
    }
}

/// Starts a bridge in-process with one connection whose certificate's CN is its
/// client id, `bridge-0-0`: the broker maps client id = CN
/// (`use_username_as_clientid`) and the ACL grants `bridge-<replica>-<connection>`.
async fn start_bridge(stack: &Stack) -> argus_bridge::app::Running {
    use clap::Parser as _;
    let id = stack.pki.odd_client("bridge-0-0");
    let mut args = vec![
        "argus-bridge".to_string(),
        "--metrics-addr".into(),
        "127.0.0.1:0".into(),
    ];
    let mut it = stack.bridge_args(0).into_iter();
    while let Some(a) = it.next() {
        let value = it.next().unwrap();
        let value = match a.as_str() {
            "--mqtt-cert-file" => id.cert.display().to_string(),
            "--mqtt-key-file" => id.key.display().to_string(),
            "--connections" => "1".to_string(),
            _ => value,
        };
        args.extend([a, value]);
    }
    let config = argus_bridge::config::Cli::try_parse_from(args)
        .unwrap()
        .into_config()
        .unwrap();
    let running = argus_bridge::app::start(config).await.unwrap();
    wait_ready(running.metrics_addr.port(), Duration::from_secs(20)).await;
    running
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Stored,
    Dlq(&'static str),
    BrokerDrops,
    BrokerRefuses,
}
use Expect::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    /// The seeded demo device (active).
    Demo,
    /// A device with a valid certificate that is not in `devices`.
    Unknown,
    /// A seeded device set to `disabled` before the bridge starts.
    Disabled,
    /// A certificate whose CN is not a UUID: the ACL lets it publish to
    /// `devices/not-a-uuid/telemetry`, which the bridge must reject.
    Odd,
    /// Another seeded device over a raw MQTT connection (no client-side topic
    /// checks); not the demo device, so the two sessions never collide.
    Raw,
}

const RAW_DEVICE: Uuid = SENSOR_IDS[1];

fn device_of(who: Who) -> Uuid {
    match who {
        Who::Raw => RAW_DEVICE,
        _ => DEMO_DEVICE_ID,
    }
}

struct Row {
    name: &'static str,
    who: Who,
    topic: Vec<u8>,
    payload: Vec<u8>,
    expect: Expect,
}

fn row(name: &'static str, payload: impl Into<Vec<u8>>, expect: Expect) -> Row {
    Row {
        name,
        who: Who::Demo,
        topic: telemetry_topic(DEMO_DEVICE_ID).into_bytes(),
        payload: payload.into(),
        expect,
    }
}

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

/// A JSON object of exactly `len` bytes: `{"pad":"xxx…"}`.
fn object_of_len(len: usize) -> Vec<u8> {
    let overhead = r#"{"pad":""}"#.len();
    format!(r#"{{"pad":"{}"}}"#, "x".repeat(len - overhead)).into_bytes()
}

fn table() -> Vec<Row> {
    let demo = telemetry_topic(DEMO_DEVICE_ID);
    let other = telemetry_topic(SENSOR_IDS[1]);
    let good = |n: u32| format!(r#"{{"temperature":{n}.5,"good":{n}}}"#);
    let mut rows = vec![
        row("good before", good(1), Stored),
        // Sizes.
        row("empty payload", "", Dlq("invalid_json")),
        row("1 byte, not JSON", "{", Dlq("invalid_json")),
        row("1 byte, a number", "7", Dlq("not_object")),
        row("exactly the size limit", object_of_len(LIMIT), Stored),
        row(
            "one byte over the limit",
            object_of_len(LIMIT + 1),
            Dlq("oversize"),
        ),
        // Nesting: known fields go through serde_json's 128-level limit; unknown
        // fields are skipped without a limit and Postgres decides.
        row(
            "nested 100 deep in an unknown field",
            format!(r#"{{"deep":{}}}"#, nested(100)),
            Stored,
        ),
        row(
            "nested 200 deep in a known field",
            format!(r#"{{"timestamp":{}}}"#, nested(200)),
            Dlq("invalid_json"),
        ),
        row(
            "nested 100000 deep in an unknown field (beyond serde_json's 128 levels)",
            format!(r#"{{"deep":{}}}"#, nested(100_000)),
            Dlq("invalid_json"),
        ),
        // Numbers.
        row(
            "huge integers and a long fraction",
            r#"{"big":123456789012345678901234567890,"neg":-9223372036854775809,"frac":0.1}"#,
            Stored,
        ),
        row(
            "a number beyond f64 and Postgres numeric (1e999999)",
            r#"{"big":1e999999}"#,
            Dlq("invalid_json"),
        ),
        row(
            "sequenceNumber beyond i32",
            r#"{"sequenceNumber":99999999999}"#,
            Dlq("invalid_field"),
        ),
        row(
            "sequenceNumber as 1e3",
            r#"{"sequenceNumber":1e3}"#,
            Dlq("invalid_field"),
        ),
        row("bare NaN", r#"{"v":NaN}"#, Dlq("invalid_json")),
        row(
            "NaN-like strings",
            r#"{"a":"NaN","b":"Infinity","c":"-Infinity","d":"1e999999","e":"-0"}"#,
            Stored,
        ),
        // Encodings.
        row(
            "invalid UTF-8",
            b"{\"a\":\"\xff\"}".to_vec(),
            Dlq("not_utf8"),
        ),
        row(
            "overlong UTF-8",
            b"{\"a\":\"\xc0\xaf\"}".to_vec(),
            Dlq("not_utf8"),
        ),
        row("a BOM", "\u{feff}{\"bom\":1}", Dlq("invalid_json")),
        row(
            "lone surrogate escape in an unknown field",
            r#"{"s":"\ud800"}"#,
            Dlq("invalid_json"),
        ),
        row(
            "lone surrogate escape in correlationId",
            r#"{"correlationId":"\ud800"}"#,
            Dlq("invalid_json"),
        ),
        // Duplicate keys: refused. Parsers disagree on which copy wins, so a check
        // of one copy could be bypassed by the other.
        row(
            "duplicate keys",
            r#"{"sequenceNumber":"x","sequenceNumber":5,"dup":1,"dup":2}"#,
            Dlq("invalid_json"),
        ),
        row(
            "duplicate key hiding U+0000 from the check",
            r#"{"sequenceNumber":"\u0000","sequenceNumber":1}"#,
            Dlq("invalid_json"),
        ),
        row(
            "duplicate key in a nested object",
            r#"{"m":{"t":1,"t":2}}"#,
            Dlq("invalid_json"),
        ),
        // Timestamps.
        row(
            "timestamp far future (9999)",
            r#"{"timestamp":"9999-12-31T23:59:59.999999Z"}"#,
            Stored,
        ),
        row(
            "timestamp far past (year 1)",
            r#"{"timestamp":"0001-01-01T00:00:00Z","past":1}"#,
            Stored,
        ),
        row(
            "timestamp year 0",
            r#"{"timestamp":"0000-01-01T00:00:00Z"}"#,
            Dlq("invalid_field"),
        ),
        row(
            "timestamp epoch ms in year 10000",
            r#"{"timestamp":253402300800000}"#,
            Dlq("invalid_field"),
        ),
        row(
            "timestamp 30 February",
            r#"{"timestamp":"2024-02-30T00:00:00Z"}"#,
            Dlq("invalid_field"),
        ),
        // SQL metacharacters and control characters in every string field.
        row(
            "SQL in correlationId, messageId, a key and a value",
            r#"{"correlationId":"'); DROP TABLE telemetry_raw; --","messageId":"x' OR '1'='1","k'\"; --":"\\'; DELETE FROM devices; --"}"#,
            Stored,
        ),
        row(
            "control characters (escaped) in keys and values",
            r#"{"correlationId":"c\u0001\t\r\n","ctl\u001f":"\u007f\u001b[2J\b\f"}"#,
            Stored,
        ),
        row(
            r"\u0000 in a value (jsonb cannot hold it: refused up front)",
            r#"{"v":"a\u0000b"}"#,
            Dlq("invalid_json"),
        ),
        row(
            r"\u0000 in correlationId",
            r#"{"correlationId":"c\u0000"}"#,
            Dlq("invalid_field"),
        ),
        row(
            r"\u0000 in messageId",
            r#"{"messageId":"m\u0000"}"#,
            Dlq("invalid_field"),
        ),
        row(r"\u0000 in a key", r#"{"k\u0000":1}"#, Dlq("invalid_json")),
        row(
            "a raw NUL byte inside a string",
            b"{\"v\":\"a\x00b\"}".to_vec(),
            Dlq("invalid_json"),
        ),
        row(
            "a raw control byte inside a string",
            b"{\"v\":\"a\x01b\"}".to_vec(),
            Dlq("invalid_json"),
        ),
        row("good in the middle", good(2), Stored),
    ];
    // Topics the ACL does not grant: acknowledged by the broker, never delivered.
    for (name, topic) in [
        ("extra level", format!("{demo}/extra")),
        ("trailing slash", format!("{demo}/")),
        (
            "another level name",
            format!("devices/{DEMO_DEVICE_ID}/status"),
        ),
        ("another device's topic", other.clone()),
        (
            "upper-case id of itself (ACL is case-sensitive)",
            format!(
                "devices/{}/telemetry",
                DEMO_DEVICE_ID.to_string().to_uppercase()
            ),
        ),
    ] {
        rows.push(Row {
            name,
            who: Who::Demo,
            topic: topic.into_bytes(),
            payload: format!(r#"{{"case":"{name}"}}"#).into_bytes(),
            expect: BrokerDrops,
        });
    }
    // Topics the broker refuses outright (rumqttc and mosquitto_pub refuse them
    // client-side, so these go over a raw connection).
    for (name, topic) in [
        ("wildcard +", b"devices/+/telemetry".to_vec()),
        ("wildcard #", b"devices/#".to_vec()),
        (
            "NUL in topic",
            format!("devices/{DEMO_DEVICE_ID}/tele\0metry").into_bytes(),
        ),
        ("invalid UTF-8 in topic", b"devices/\xff/telemetry".to_vec()),
    ] {
        rows.push(Row {
            name,
            who: Who::Raw,
            topic,
            payload: br#"{"raw":1}"#.to_vec(),
            expect: BrokerRefuses,
        });
    }
    rows.push(Row {
        name: "larger than the broker's max_packet_size",
        who: Who::Raw,
        topic: demo.clone().into_bytes(),
        payload: object_of_len(BROKER_MAX_PACKET + 1),
        expect: BrokerRefuses,
    });
    rows.push(Row {
        name: "the raw client's good message is delivered",
        who: Who::Raw,
        topic: telemetry_topic(RAW_DEVICE).into_bytes(),
        payload: br#"{"raw":"ok"}"#.to_vec(),
        expect: Stored,
    });
    rows.push(Row {
        name: "non-UUID CN on its own topic",
        who: Who::Odd,
        topic: b"devices/not-a-uuid/telemetry".to_vec(),
        payload: br#"{"odd":1}"#.to_vec(),
        expect: Dlq("bad_topic"),
    });
    rows.push(Row {
        name: "unknown device",
        who: Who::Unknown,
        topic: Vec::new(), // filled with its own topic
        payload: br#"{"unknown":1}"#.to_vec(),
        expect: Dlq("unknown_device"),
    });
    rows.push(Row {
        name: "disabled device",
        who: Who::Disabled,
        topic: telemetry_topic(SENSOR_IDS[2]).into_bytes(),
        payload: br#"{"disabled":1}"#.to_vec(),
        expect: Dlq("disabled_device"),
    });
    rows.push(row("good after", good(3), Stored));
    rows
}

/// What a raw publish got from the broker.
#[derive(Debug, PartialEq, Eq)]
enum RawOutcome {
    Acked,
    Closed,
}

/// A minimal MQTT 3.1.1 client over rustls: CONNECT, one QoS 1 PUBLISH with the
/// topic bytes as given (no client-side validation), then PUBACK or a closed socket.
fn raw_publish(port: u16, ca: &Path, id: &Identity, topic: &[u8], payload: &[u8]) -> RawOutcome {
    let tls = device_tls(ca, id);
    let conn = rustls::ClientConnection::new(
        tls,
        rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap(),
    )
    .unwrap();
    let sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut s = rustls::StreamOwned::new(conn, sock);

    let client_id = format!("raw-{}", Uuid::new_v4().simple());
    let mut var = Vec::new();
    var.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30]);
    var.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    var.extend_from_slice(client_id.as_bytes());
    s.write_all(&mqtt_packet(0x10, &var)).unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).expect("CONNACK");
    assert_eq!(connack, [0x20, 2, 0, 0], "connection refused");

    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic);
    body.extend_from_slice(&[0, 1]); // packet id
    body.extend_from_slice(payload);
    if s.write_all(&mqtt_packet(0x32, &body))
        .and_then(|()| s.flush())
        .is_err()
    {
        return RawOutcome::Closed;
    }
    let mut ack = [0u8; 4];
    match s.read_exact(&mut ack) {
        Ok(()) if ack == [0x40, 2, 0, 1] => RawOutcome::Acked,
        Ok(()) => panic!("unexpected packet {ack:?}"),
        Err(_) => RawOutcome::Closed,
    }
}

/// A dead letter as recorded: (reason, topic, original bytes).
async fn dead_letters(js: &jetstream::Context) -> Vec<(String, String, Vec<u8>)> {
    dlq_records(js)
        .await
        .into_iter()
        .map(|v| {
            let bytes = match (v["payload"].as_str(), v["payloadBase64"].as_str()) {
                (Some(t), None) => t.as_bytes().to_vec(),
                (None, Some(b)) => base64::engine::general_purpose::STANDARD.decode(b).unwrap(),
                other => panic!("letter has {other:?}"),
            };
            (
                v["reason"].as_str().unwrap().to_string(),
                v["topic"].as_str().unwrap_or("").to_string(),
                bytes,
            )
        })
        .collect()
}

fn id_of(device: Uuid, payload: &[u8]) -> Uuid {
    let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
    argus_pipeline::message_id::derive(
        device,
        &telemetry_topic(device),
        payload,
        v.get("messageId").and_then(|m| m.as_str()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_mqtt_input_table() {
    let stack = start_stack().await;
    let db = stack.db().await;
    db.execute(
        "UPDATE devices SET status = 'disabled' WHERE id = $1",
        &[&SENSOR_IDS[2]],
    )
    .await
    .unwrap();
    let bridge = start_bridge(&stack).await;

    let unknown = Uuid::new_v4();
    let demo = stack.device(DEMO_DEVICE_ID);
    let unknown_pub = stack.device(unknown);
    let disabled_pub = stack.device(SENSOR_IDS[2]);
    let odd_id = stack.pki.odd_client("not-a-uuid");
    let odd_pub = Publisher::new(stack.mq.port(), &stack.pki.ca_file(), &odd_id, "odd-client");
    let raw_id = stack.pki.device(RAW_DEVICE);

    let mut rows = table();
    for r in rows.iter_mut().filter(|r| r.who == Who::Unknown) {
        r.topic = telemetry_topic(unknown).into_bytes();
    }

    let (mut demo_n, mut unknown_n, mut disabled_n, mut odd_n) = (0, 0, 0, 0);
    for r in &rows {
        let topic = String::from_utf8_lossy(&r.topic).into_owned();
        match r.who {
            Who::Demo => {
                demo.publish(&topic, r.payload.clone()).await;
                demo_n += 1;
            }
            Who::Unknown => {
                unknown_pub.publish(&topic, r.payload.clone()).await;
                unknown_n += 1;
            }
            Who::Disabled => {
                disabled_pub.publish(&topic, r.payload.clone()).await;
                disabled_n += 1;
            }
            Who::Odd => {
                odd_pub.publish(&topic, r.payload.clone()).await;
                odd_n += 1;
            }
            Who::Raw => {
                let (port, ca, id, t, p) = (
                    stack.mq.port(),
                    stack.pki.ca_file(),
                    raw_id.clone(),
                    r.topic.clone(),
                    r.payload.clone(),
                );
                let got = tokio::task::spawn_blocking(move || raw_publish(port, &ca, &id, &t, &p))
                    .await
                    .unwrap();
                let want = if r.expect == BrokerRefuses {
                    RawOutcome::Closed
                } else {
                    RawOutcome::Acked
                };
                assert_eq!(got, want, "row {:?}: broker answer", r.name);
            }
        }
    }
    // Every publish of the rumqttc devices is acknowledged (including the ones the
    // ACL drops: MQTT 3.1.1 cannot say otherwise).
    let t = Duration::from_secs(30);
    demo.wait_acked(demo_n, t).await;
    unknown_pub.wait_acked(unknown_n, t).await;
    disabled_pub.wait_acked(disabled_n, t).await;
    odd_pub.wait_acked(odd_n, t).await;

    let stored: Vec<&Row> = rows.iter().filter(|r| r.expect == Stored).collect();
    let dlq: Vec<&Row> = rows.iter().filter(|r| matches!(r.expect, Dlq(_))).collect();
    let expected_ids: HashSet<Uuid> = stored
        .iter()
        .map(|r| id_of(device_of(r.who), &r.payload))
        .collect();
    assert_eq!(expected_ids.len(), stored.len(), "table rows must differ");

    // Wait until both stores and the DLQ hold what they should, then a little more
    // so that anything extra would show.
    let js = stack.js().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows_now = row_count(&db).await as usize;
        let letters = stream_count(&js, "TELEMETRY_DLQ").await as usize;
        let msgs = stream_count(&js, "TELEMETRY_RAW_V1").await as usize;
        if rows_now >= stored.len() && msgs >= stored.len() && letters >= dlq.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{rows_now}/{} rows, {msgs} stream messages, {letters}/{} letters",
            stored.len(),
            dlq.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;

    // Stored rows: exactly once in both stores, nothing else.
    assert_exactly_once(&stack, &expected_ids).await;
    // ... and stored right: the payload as sent, the fields as documented.
    for r in &stored {
        let id = id_of(device_of(r.who), &r.payload);
        let row = db
            .query_one(
                "SELECT payload, correlation_id, sequence_number, device_timestamp, device_id \
                 FROM telemetry_raw WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
        let sent: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        let payload: serde_json::Value = row.get(0);
        assert_eq!(payload, sent, "row {:?}: stored payload", r.name);
        assert_eq!(row.get::<_, Uuid>(4), device_of(r.who));
        let corr: Option<String> = row.get(1);
        assert_eq!(
            corr.as_deref(),
            sent.get("correlationId").and_then(|c| c.as_str()),
            "row {:?}: correlation_id",
            r.name
        );
        let seq: Option<i32> = row.get(2);
        assert_eq!(
            seq.map(i64::from),
            sent.get("sequenceNumber").and_then(|c| c.as_i64()),
            "row {:?}: sequence_number",
            r.name
        );
        if let Some(ts) = sent.get("timestamp").and_then(|t| t.as_str()) {
            let got: chrono::DateTime<chrono::Utc> = row.get(3);
            let want: chrono::DateTime<chrono::Utc> = ts.parse().unwrap();
            assert_eq!(got, want, "row {:?}: device_timestamp", r.name);
        }
    }
    // The SQL row did nothing but get stored.
    let devices: i64 = db
        .query_one("SELECT count(*) FROM devices", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(devices, argus_schema::seed::DEVICE_IDS.len() as i64);

    // Dead letters: one per row, with its reason, topic and the original bytes.
    let letters = dead_letters(&js).await;
    for r in &dlq {
        let Dlq(reason) = r.expect else {
            unreachable!()
        };
        let topic = String::from_utf8_lossy(&r.topic);
        let n = letters
            .iter()
            .filter(|(re, t, p)| re == reason && *t == topic && *p == r.payload)
            .count();
        let got: Vec<&str> = letters
            .iter()
            .filter(|(_, t, p)| *t == topic && *p == r.payload)
            .map(|(re, _, _)| re.as_str())
            .collect();
        assert_eq!(
            n, 1,
            "row {:?}: expected one {reason} letter, got {got:?}",
            r.name
        );
    }
    assert_eq!(letters.len(), dlq.len(), "no other dead letters");

    bridge.shutdown.cancel();
    bridge.task.await.unwrap().unwrap();
}

/// A subscriber that records what it receives (rumqttc, clean session).
async fn spy(
    stack: &Stack,
    id: Uuid,
    filters: &[&str],
) -> (AsyncClient, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let identity = stack.pki.device(id);
    let tls = device_tls(&stack.pki.ca_file(), &identity);
    let mut o = MqttOptions::new(id.to_string(), "127.0.0.1", stack.mq.port());
    o.set_keep_alive(Duration::from_secs(10))
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    let (client, mut ev) = AsyncClient::new(o, 64);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Incoming::Publish(p))) => {
                    let _ = tx.send(p.topic.clone());
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    for f in filters {
        client.subscribe(*f, QoS::AtLeastOnce).await.unwrap();
    }
    (client, rx)
}

/// Security, end to end through the bridge: a device that publishes on another
/// device's topic stores nothing for it; a device that subscribes to the bridge's
/// share group (and to everyone's telemetry) neither receives anything nor diverts
/// a single message away from the bridge: all of the victim's messages are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_cannot_forge_spy_or_divert_through_the_bridge() {
    const N: usize = 60;
    let stack = start_stack().await;
    let bridge = start_bridge(&stack).await;

    let victim = DEMO_DEVICE_ID;
    let (spy_device, forger_device) = (SENSOR_IDS[1], SENSOR_IDS[2]);
    let (_spy, mut spied) = spy(
        &stack,
        spy_device,
        &[
            "$share/bridge/devices/+/telemetry",
            "devices/+/telemetry",
            "#",
        ],
    )
    .await;
    // Let the subscriptions settle (granted or refused) before the victim publishes.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let forger = stack.device(forger_device);
    let victim_pub = stack.device(victim);
    let mut expected = HashSet::new();
    for i in 0..N {
        let p = numbered_payload("victim", i);
        expected.insert(expected_id(victim, &p));
        victim_pub.publish(&telemetry_topic(victim), p).await;
        if i % 10 == 0 {
            // Forged: the attacker's certificate, the victim's topic.
            forger
                .publish(
                    &telemetry_topic(victim),
                    format!(r#"{{"messageId":"forged-{i}","temperature":99}}"#),
                )
                .await;
        }
    }
    victim_pub.wait_acked(N, Duration::from_secs(30)).await;
    forger.wait_acked(N / 10, Duration::from_secs(30)).await;

    // Every one of the victim's messages arrives; none is diverted to the spy.
    let js = stack.js().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let db = stack.db().await;
    while (row_count(&db).await as usize) < N {
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut got_by_spy = Vec::new();
    while let Ok(t) = spied.try_recv() {
        got_by_spy.push(t);
    }
    assert!(
        got_by_spy.is_empty(),
        "the attacker received {} messages",
        got_by_spy.len()
    );
    assert_exactly_once(&stack, &expected).await;
    assert_eq!(
        stream_count(&js, "TELEMETRY_DLQ").await,
        0,
        "no dead letters"
    );
    let attacker_rows: i64 = db
        .query_one(
            "SELECT count(*) FROM telemetry_raw \
             WHERE device_id <> $1 OR payload->>'messageId' LIKE 'forged-%'",
            &[&victim],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(attacker_rows, 0);

    bridge.shutdown.cancel();
    bridge.task.await.unwrap().unwrap();
}

/// Security, end to end: a revoked certificate (revoked with argus-pki, CRL
/// re-read by the broker on SIGHUP) and an expired one cannot get a message
/// stored. A connection opened before the revocation is not cut by the reload
/// (Mosquitto checks the CRL at the TLS handshake only); this test records that
/// as the documented behaviour (docs/reliability.md): revoke, then make the
/// device reconnect (or restart the broker) to shut it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_and_expired_certificates_store_nothing() {
    use argus_pki::{Ca, RevocationReason, Subject};
    let stack = start_stack().await;
    let bridge = start_bridge(&stack).await;
    let db = stack.db().await;
    let ca = Ca::load(stack.pki.dir.path()).unwrap();

    // Revoked: works before, refused on a new connection after.
    let revoked = SENSOR_IDS[1];
    let identity = stack.pki.device(revoked);
    let port = stack.mq.port();
    let before = Publisher::new(port, &stack.pki.ca_file(), &identity, "revoked-before");
    before
        .publish(&telemetry_topic(revoked), r#"{"phase":"before"}"#)
        .await;
    before.wait_acked(1, Duration::from_secs(10)).await;
    wait_stored(&stack, 1, Duration::from_secs(15)).await;
    let serials = ca
        .revoke_device(revoked, RevocationReason::KeyCompromise)
        .unwrap();
    assert!(!serials.is_empty());
    stack.mq.reload();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The same certificate (Pki::device would issue a fresh one).
    let after = Publisher::new(port, &stack.pki.ca_file(), &identity, "revoked-after");
    after
        .publish(&telemetry_topic(revoked), r#"{"phase":"after"}"#)
        .await;

    // Expired: a certificate whose validity ended yesterday.
    let expired = SENSOR_IDS[2];
    // (An OffsetDateTime without naming the `time` crate: a fresh certificate's start.)
    let now = ca
        .issue(&Subject::Device(Uuid::new_v4()), 1, None)
        .unwrap()
        .not_before;
    let day = Duration::from_secs(86_400);
    let issued = ca
        .issue_window(&Subject::Device(expired), now - 30 * day, now - day, None)
        .unwrap();
    let files = issued
        .write_files(&stack.pki.dir.path().join("expired"))
        .unwrap();
    let id = Identity {
        cert: files.cert,
        key: files.key.unwrap(),
    };
    let old = Publisher::new(
        stack.mq.port(),
        &stack.pki.ca_file(),
        &id,
        &expired.to_string(),
    );
    old.publish(&telemetry_topic(expired), r#"{"phase":"expired"}"#)
        .await;

    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(after.acked(), 0, "a revoked certificate got a PUBACK");
    assert_eq!(old.acked(), 0, "an expired certificate got a PUBACK");
    let rows: i64 = db
        .query_one(
            "SELECT count(*) FROM telemetry_raw WHERE payload->>'phase' IN ('after', 'expired')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "a refused certificate's message was stored");
    assert!(
        stack.mq.log_tail().contains("certificate"),
        "the broker logs the TLS refusal:\n{}",
        stack.mq.log_tail()
    );

    // The connection opened before the revocation was cut by the broker plugin
    // (bridge/tests/revocation.rs), and its reconnects are refused: nothing more
    // is acknowledged or stored.
    before
        .publish(&telemetry_topic(revoked), r#"{"phase":"open-session"}"#)
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        before.acked(),
        1,
        "the revoked device's open session still publishes"
    );
    let rows: i64 = db
        .query_one(
            "SELECT count(*) FROM telemetry_raw WHERE payload->>'phase' = 'open-session'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0);

    bridge.shutdown.cancel();
    bridge.task.await.unwrap().unwrap();
}

/// A device whose counter restarted (issue 13): `{"messageId":"m-1","v":2}` after
/// `{"messageId":"m-1","v":1}` was PUBACKed and vanished. Now the second is PUBACKed
/// too, and is in the DLQ as `id_conflict` with its bytes; the stored row and its
/// stream message keep the first content. The first sent again is a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_message_id_is_dead_lettered_as_id_conflict() {
    let stack = start_stack().await;
    let bridge = start_bridge(&stack).await;
    let device = stack.device(DEMO_DEVICE_ID);
    let topic = telemetry_topic(DEMO_DEVICE_ID);
    let (first, reused) = (
        r#"{"messageId":"m-1","v":1}"#,
        r#"{"messageId":"m-1","v":2}"#,
    );
    device.publish(&topic, first).await;
    wait_stored(&stack, 1, Duration::from_secs(30)).await;
    device.publish(&topic, reused).await;
    device.publish(&topic, first).await;
    device.wait_acked(3, Duration::from_secs(30)).await;

    let js = stack.js().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let letters = loop {
        let letters = dead_letters(&js).await;
        if !letters.is_empty() || Instant::now() > deadline {
            break letters;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        letters,
        vec![(
            "id_conflict".to_string(),
            topic.clone(),
            reused.as_bytes().to_vec()
        )]
    );
    let id = id_of(DEMO_DEVICE_ID, first.as_bytes());
    assert_eq!(id, id_of(DEMO_DEVICE_ID, reused.as_bytes()));
    assert_exactly_once(&stack, &HashSet::from([id])).await;
    let db = stack.db().await;
    let v: String = db
        .query_one(
            "SELECT payload->>'v' FROM telemetry_raw WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "1");
    let raw = stream_messages(&js, "TELEMETRY_RAW_V1").await;
    assert_eq!(raw.len(), 1);
    assert_eq!(raw[0].body["payload"]["v"], 1);
    bridge.shutdown.cancel();
}
