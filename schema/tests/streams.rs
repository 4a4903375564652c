//! JetStream topology against the pinned nats-server (compose/nats/requirements.txt): one
//! server, and a 3-node cluster.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::Duration;

use argus_schema::streams::{self, Action, StreamsError, CONSUMERS, STREAMS};
use argus_testkit::nats::{NatsCluster, NatsCredentials, NatsServer};
use async_nats::jetstream::{self, consumer::PullConsumer};
use futures::StreamExt;
use serde_json::{json, Value};

/// Logged in as `admin`, as `argus-schema streams` is.
async fn connect(admin: NatsCredentials, urls: &[String]) -> async_nats::Client {
    let auth = argus_schema::nats::NatsAuth::user_password(admin.user, admin.password);
    streams::connect(&auth, urls).await.expect("connect")
}

fn js(client: &async_nats::Client) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        .build(client.clone())
}

/// A concrete subject of a stream (`telemetry.raw.v1.>` -> `telemetry.raw.v1.<leaf>`).
fn subject_of(stream: &str, leaf: &str) -> String {
    let s = STREAMS.iter().find(|s| s.name == stream).unwrap();
    s.subjects[0].replace('>', leaf)
}

async fn publish(
    js: &jetstream::Context,
    subject: String,
    id: &str,
    body: &str,
) -> jetstream::publish::PublishAck {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", id);
    js.publish_with_headers(subject, headers, body.to_owned().into())
        .await
        .expect("publish")
        .await
        .expect("publish ack")
}

/// Fetches everything pending on a consumer, acks each (double ack: confirmed by the server).
async fn drain(js: &jetstream::Context, stream: &str, durable: &str) -> Vec<String> {
    let consumer: PullConsumer = js
        .get_stream(stream)
        .await
        .unwrap()
        .get_consumer(durable)
        .await
        .unwrap();
    let mut got = Vec::new();
    loop {
        // Stop when the server says nothing is left, instead of waiting for an empty fetch.
        let pending = js
            .get_stream(stream)
            .await
            .unwrap()
            .consumer_info(durable)
            .await
            .unwrap();
        if pending.num_pending == 0 && pending.num_ack_pending == 0 {
            break;
        }
        let mut batch = consumer
            .fetch()
            .max_messages(200)
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .unwrap();
        while let Some(m) = batch.next().await {
            let m = m.unwrap();
            got.push(String::from_utf8(m.payload.to_vec()).unwrap());
            m.double_ack().await.unwrap();
        }
    }
    let info = js
        .get_stream(stream)
        .await
        .unwrap()
        .consumer_info(durable)
        .await
        .unwrap();
    assert_eq!(info.num_ack_pending, 0, "{stream}/{durable}: all acked");
    assert_eq!(info.num_pending, 0, "{stream}/{durable}: nothing left");
    got
}

/// One message into every stream; every consumer of it receives and acks it.
async fn check_flow(js: &jetstream::Context, tag: &str) {
    for s in STREAMS {
        let body = format!("{}:{tag}", s.name);
        let ack = publish(
            js,
            subject_of(s.name, "flow"),
            &format!("{}-{tag}", s.name),
            &body,
        )
        .await;
        assert_eq!(ack.stream, s.name);
        assert!(!ack.duplicate);
    }
    for c in CONSUMERS {
        let got = drain(js, c.stream, c.durable).await;
        assert!(
            got.contains(&format!("{}:{tag}", c.stream)),
            "{}/{} did not receive its message: {got:?}",
            c.stream,
            c.durable
        );
    }
}

async fn stream_config(js: &jetstream::Context, name: &str) -> Value {
    let info: Value = js
        .request(format!("STREAM.INFO.{name}"), &json!({}))
        .await
        .unwrap();
    info["config"].clone()
}

async fn api_ok(js: &jetstream::Context, subject: String, body: Value) {
    let resp: Value = js.request(subject.clone(), &body).await.unwrap();
    assert!(resp.get("error").is_none(), "{subject}: {resp}");
}

fn cli(args: &[&str], nats: &NatsServer) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_argus-schema"))
        .arg("streams")
        .args(args)
        .env("NATS_URLS", nats.url())
        .env("NATS_USER", "admin")
        .env("NATS_PASSWORD", nats.credentials("admin").password)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn single_server_apply_verify_flow_dedup_drift() {
    let nats = NatsServer::start().await;
    let client = connect(nats.credentials("admin"), &[nats.url()]).await;
    let js = js(&client);

    assert_eq!(streams::detect_replicas(&client).await.unwrap(), 1);
    let report = streams::apply(&client, None).await.unwrap();
    assert_eq!(report.replicas, 1);
    assert_eq!(report.items.len(), 12);
    assert!(
        report.items.iter().all(|i| i.action == Action::Created),
        "{report:?}"
    );
    let again = streams::apply(&client, None).await.unwrap();
    assert!(
        again.is_unchanged(),
        "second apply changed something: {again:?}"
    );
    assert_eq!(streams::verify(&client).await.unwrap(), vec![]);

    // The plan's settings, as the server reports them.
    let raw = stream_config(&js, "TELEMETRY_RAW_V1").await;
    assert_eq!(raw["subjects"], json!(["telemetry.raw.v1.>"]));
    assert_eq!(raw["retention"], "limits");
    assert_eq!(raw["storage"], "file");
    assert_eq!(raw["max_age"], 604_800_000_000_000u64);
    assert_eq!(raw["max_bytes"], 10_737_418_240i64);
    assert_eq!(raw["duplicate_window"], 120_000_000_000u64);
    assert_eq!(raw["num_replicas"], 1);
    let c: Value = js
        .request(
            "CONSUMER.INFO.TELEMETRY_NORMALIZED_V1.tsdb-writer-group".to_owned(),
            &json!({}),
        )
        .await
        .unwrap();
    let c = &c["config"];
    assert_eq!(
        (c["ack_policy"].as_str(), c["deliver_policy"].as_str()),
        (Some("explicit"), Some("all"))
    );
    assert_eq!(
        (c["max_deliver"].as_i64(), c["ack_wait"].as_u64()),
        (Some(3), Some(60_000_000_000))
    );
    assert!(c.get("deliver_subject").is_none(), "pull consumer");

    check_flow(&js, "one").await;

    // Same Nats-Msg-Id inside the window: stored once, second ack says duplicate.
    let before = js
        .get_stream("TELEMETRY_RAW_V1")
        .await
        .unwrap()
        .cached_info()
        .state
        .messages;
    let a = publish(&js, subject_of("TELEMETRY_RAW_V1", "dev1"), "dup-1", "x").await;
    let b = publish(&js, subject_of("TELEMETRY_RAW_V1", "dev1"), "dup-1", "x").await;
    assert!(!a.duplicate);
    assert!(b.duplicate);
    assert_eq!(a.sequence, b.sequence);
    let after = js
        .get_stream("TELEMETRY_RAW_V1")
        .await
        .unwrap()
        .cached_info()
        .state
        .messages;
    assert_eq!(after, before + 1);

    // Drift made by hand: verify names it (library and CLI), apply repairs it.
    let mut dlq = stream_config(&js, "TELEMETRY_DLQ").await;
    dlq["max_bytes"] = json!(1_000_000);
    api_ok(&js, "STREAM.UPDATE.TELEMETRY_DLQ".into(), dlq).await;
    let mut cc = CONSUMERS
        .iter()
        .find(|c| c.durable == "event-engine-group")
        .unwrap()
        .config_json();
    cc["ack_wait"] = json!(5_000_000_000u64);
    api_ok(
        &js,
        "CONSUMER.CREATE.TELEMETRY_ASSET_V1.event-engine-group".into(),
        json!({"stream_name": "TELEMETRY_ASSET_V1", "config": cc}),
    )
    .await;
    let drift = streams::verify(&client).await.unwrap();
    let fields: Vec<_> = drift
        .iter()
        .map(|d| (d.stream.as_str(), d.consumer.as_deref(), d.field.as_str()))
        .collect();
    assert_eq!(
        fields,
        vec![
            ("TELEMETRY_ASSET_V1", Some("event-engine-group"), "ack_wait"),
            ("TELEMETRY_DLQ", None, "max_bytes"),
        ]
    );
    let (ok, out) = cli(&["verify"], &nats);
    assert!(!ok, "verify must fail on drift: {out}");
    assert!(
        out.contains("DRIFT stream TELEMETRY_DLQ: max_bytes is 1000000, wanted 1073741824"),
        "{out}"
    );
    let report = streams::apply(&client, None).await.unwrap();
    let updated: Vec<_> = report
        .items
        .iter()
        .filter(|i| i.action != Action::Unchanged)
        .map(|i| i.to_string())
        .collect();
    assert_eq!(
        updated,
        vec![
            "consumer TELEMETRY_ASSET_V1/event-engine-group: updated (ack_wait)",
            "stream TELEMETRY_DLQ: updated (max_bytes)",
        ]
    );
    let (ok, out) = cli(&["verify"], &nats);
    assert!(ok, "{out}");
    let (ok, out) = cli(&["apply"], &nats);
    assert!(ok && out.contains("Nothing changed"), "{out}");

    // Settings NATS cannot change in place: reported with stream/consumer and field.
    api_ok(
        &js,
        "CONSUMER.DELETE.TELEMETRY_ASSET_V1.event-engine-group".into(),
        json!({}),
    )
    .await;
    cc["ack_wait"] = json!(30_000_000_000u64);
    cc["deliver_policy"] = json!("new");
    api_ok(
        &js,
        "CONSUMER.CREATE.TELEMETRY_ASSET_V1.event-engine-group".into(),
        json!({"stream_name": "TELEMETRY_ASSET_V1", "config": cc}),
    )
    .await;
    api_ok(&js, "STREAM.DELETE.EVENTS_V1".into(), json!({})).await;
    let mut ev = STREAMS
        .iter()
        .find(|s| s.name == "EVENTS_V1")
        .unwrap()
        .config_json(1);
    ev["storage"] = json!("memory");
    api_ok(&js, "STREAM.CREATE.EVENTS_V1".into(), ev).await;
    match streams::apply(&client, None).await {
        Err(StreamsError::CannotChange { conflicts, report }) => {
            let text: Vec<_> = conflicts.iter().map(|d| d.to_string()).collect();
            assert_eq!(
                text,
                vec![
                    r#"stream TELEMETRY_ASSET_V1 consumer event-engine-group: deliver_policy is "new", wanted "all""#,
                    r#"stream EVENTS_V1: storage is "memory", wanted "file""#,
                ]
            );
            assert_eq!(report.items.len(), 12);
        }
        other => panic!("expected CannotChange, got {other:?}"),
    }
    let (ok, out) = cli(&["apply"], &nats);
    assert!(!ok && out.contains("cannot change in place"), "{out}");
    assert_eq!(
        stream_config(&js, "EVENTS_V1").await["storage"],
        "memory",
        "not silently replaced"
    );
}

#[tokio::test]
async fn cluster_r3_survives_a_node_and_catches_up() {
    let mut cluster = NatsCluster::start(3).await;
    let client = connect(cluster.credentials("admin"), &cluster.urls()).await;
    let js = js(&client);

    let report = streams::apply(&client, None).await.unwrap();
    assert_eq!(report.replicas, 3, "3-node cluster holds R3");
    assert!(report.items.iter().all(|i| i.action == Action::Created));
    assert!(streams::apply(&client, None).await.unwrap().is_unchanged());
    assert_eq!(streams::verify(&client).await.unwrap(), vec![]);
    for s in STREAMS {
        assert_eq!(
            stream_config(&js, s.name).await["num_replicas"],
            3,
            "{}",
            s.name
        );
    }
    // No probe stream left behind.
    let names: Vec<String> = js.stream_names().map(|n| n.unwrap()).collect().await;
    assert_eq!(names.len(), 6, "{names:?}");
    check_flow(&js, "before").await;

    // Stop the raw stream's leader: the hardest node to lose.
    let info: Value = js
        .request("STREAM.INFO.TELEMETRY_RAW_V1".to_owned(), &json!({}))
        .await
        .unwrap();
    let leader = info["cluster"]["leader"].as_str().unwrap().to_owned();
    let idx = cluster
        .nodes()
        .iter()
        .position(|n| n.name() == leader)
        .unwrap();
    cluster.node(idx).stop().await;

    // Publishes are still acknowledged (retried while a new leader is elected).
    let mut acked = HashSet::new();
    for i in 0..50 {
        let id = format!("failover-{i}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.as_str());
            let res = match js
                .publish_with_headers(
                    subject_of("TELEMETRY_RAW_V1", "dev"),
                    headers,
                    id.clone().into(),
                )
                .await
            {
                Ok(fut) => fut.await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match res {
                Ok(_) => break,
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "publish {id} never acked: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        acked.insert(id);
    }
    // Consumers still receive (the demux consumer gets every acknowledged message).
    let got: HashSet<String> = drain(&js, "TELEMETRY_RAW_V1", "demux-processor-group")
        .await
        .into_iter()
        .collect();
    assert!(
        acked.is_subset(&got),
        "lost: {:?}",
        acked.difference(&got).collect::<Vec<_>>()
    );
    check_flow(&js, "during").await;

    // Bring it back: it catches up (current, no lag) and nothing acknowledged was lost.
    cluster.node(idx).restart().await;
    cluster.wait_healthy().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let info: Value = js
            .request("STREAM.INFO.TELEMETRY_RAW_V1".to_owned(), &json!({}))
            .await
            .unwrap();
        let c = &info["cluster"];
        let mut peers: Vec<(String, bool, u64)> = c["replicas"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|r| {
                (
                    r["name"].as_str().unwrap_or("").to_owned(),
                    r["current"].as_bool().unwrap_or(false),
                    r["lag"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        peers.push((c["leader"].as_str().unwrap_or("").to_owned(), true, 0));
        let restarted = peers.iter().find(|p| p.0 == leader);
        if restarted.is_some_and(|p| p.1 && p.2 == 0) && peers.len() == 3 {
            // 1 (check_flow before) + 50 + 1 (check_flow during).
            assert_eq!(info["state"]["messages"], 52);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{leader} never caught up: {peers:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(streams::verify(&client).await.unwrap(), vec![]);
    check_flow(&js, "after").await;
}

#[tokio::test]
async fn messages_prints_the_newest_with_their_ids() {
    let server = NatsServer::start().await;
    let client = connect(server.credentials("admin"), &[server.url()]).await;
    streams::apply(&client, None).await.expect("apply");
    let js = js(&client);
    for n in 0..3 {
        let subject = subject_of("TELEMETRY_DLQ", "invalid_json");
        publish(&js, subject, &format!("id-{n}"), &format!(r#"{{"n":{n}}}"#)).await;
    }
    let lines = streams::newest_messages(&client, "TELEMETRY_DLQ", 2)
        .await
        .expect("messages");
    let parsed: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(parsed.len(), 2, "{lines:?}");
    assert_eq!(parsed[0]["msgId"], "id-1");
    assert_eq!(parsed[1]["msgId"], "id-2");
    assert_eq!(parsed[1]["body"]["n"], 2);
    assert_eq!(parsed[1]["subject"], "telemetry.dlq.invalid_json");
    let err = streams::newest_messages(&client, "NO_SUCH_STREAM", 1)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("NO_SUCH_STREAM"), "{err}");
}
