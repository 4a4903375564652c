//! NATS users against a real server with `compose/nats/authorization.conf`: with the
//! bridge's credentials ingest works, while deleting a stream, publishing outside the
//! telemetry subjects and reading a worker group's consumer are refused; a connection
//! without credentials, or with a wrong password, is refused; and the bridge binary
//! refuses to start with a wrong password, naming the user and never the password.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use argus_schema::nats::{NatsAuth, NatsConnectError, Unreachable};
use async_nats::jetstream::{self, context::RequestErrorKind};
use async_nats::ConnectErrorKind;
use common::*;

/// JetStream as the bridge, with a short request timeout: a refused request is never
/// answered, so it ends in this timeout.
async fn bridge_js(stack: &Stack) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(1))
        .build(nats_client(&stack.nats, "bridge").await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_user_ingests_and_may_do_nothing_else() {
    let stack = Stack::start(false).await;
    // The topology's EVENTS_V1 stores events.v1.>: a publish there that passed would show.
    let admin = stack.js().await;

    // Ingest works: the bridge logs in as `bridge` and a reading lands in both stores.
    let _bridge = stack.bridge_in_process(0).await;
    let publisher = stack.device(DEMO_DEVICE_ID);
    publisher
        .publish(&telemetry_topic(DEMO_DEVICE_ID), r#"{"temperature":21.5}"#)
        .await;
    publisher.wait_acked(1, Duration::from_secs(10)).await;
    wait_stored(&stack, 1, Duration::from_secs(15)).await;
    let raw = |js: jetstream::Context| async move {
        js.get_stream("TELEMETRY_RAW_V1")
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .messages
    };
    assert_eq!(raw(admin.clone()).await, 1, "the reading is in the stream");

    let js = bridge_js(&stack).await;
    // Deleting a stream: refused, never answered; the stream is still there.
    let Err(err) = js.delete_stream("TELEMETRY_RAW_V1").await else {
        panic!("the bridge deleted a stream");
    };
    // A request the server drops is a request error (its timeout), not an API answer.
    assert_eq!(
        err.kind(),
        async_nats::jetstream::context::DeleteStreamErrorKind::Request,
        "{err}"
    );
    assert_eq!(
        raw(admin.clone()).await,
        1,
        "the stream and its message stay"
    );

    // Publishing to events.v1.x: refused, nothing stored.
    let err = js
        .publish("events.v1.x", "forged".into())
        .await
        .unwrap()
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        async_nats::jetstream::context::PublishErrorKind::TimedOut,
        "{err}"
    );
    let mut events = admin.get_stream("EVENTS_V1").await.unwrap();
    assert_eq!(events.info().await.unwrap().state.messages, 0);

    // Reading a worker group's consumer: refused (no info, no messages).
    let err = js
        .request::<_, _, serde_json::Value>(
            "$JS.API.CONSUMER.MSG.NEXT.TELEMETRY_RAW_V1.demux-processor-group".to_string(),
            &serde_json::json!({"batch": 1, "no_wait": true}),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), RequestErrorKind::TimedOut, "{err}");
    let demux = admin
        .get_stream("TELEMETRY_RAW_V1")
        .await
        .unwrap()
        .consumer_info("demux-processor-group")
        .await
        .unwrap();
    assert_eq!(
        demux.num_ack_pending, 0,
        "nothing was delivered to the bridge"
    );
    assert_eq!(demux.delivered.stream_sequence, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_without_credentials_or_with_a_wrong_password_is_refused() {
    let nats = argus_testkit::nats::NatsServer::start().await;
    let urls = [nats.url()];
    // Without credentials: the server's authorization violation, as its kind.
    let err = async_nats::connect(nats.url()).await.unwrap_err();
    assert_eq!(err.kind(), ConnectErrorKind::AuthorizationViolation);
    let err = argus_schema::nats::connect(&NatsAuth::none(), &urls, "t", Unreachable::Fail)
        .await
        .unwrap_err();
    assert!(matches!(err, NatsConnectError::NoUser), "{err}");

    // A wrong password: refused even by a client that would retry an unreachable server.
    let wrong = NatsAuth::user_password("bridge", "pwrong-password-123");
    let err = argus_schema::nats::connect(&wrong, &urls, "t", Unreachable::Retry)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, NatsConnectError::Refused { user } if user == "bridge"),
        "{err}"
    );
    assert!(!err.to_string().contains("pwrong-password-123"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_refuses_to_start_with_a_wrong_password() {
    let stack = Stack::start(false).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wrong.password");
    std::fs::write(&file, "pwrong0secret0value\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_argus-bridge"))
        .args(stack.bridge_args(0))
        .arg("--nats-password-file")
        .arg(&file)
        .args(["--metrics-addr", "127.0.0.1:0"])
        .env_remove("NATS_PASSWORD")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refused the login of user bridge"),
        "{stderr}"
    );
    assert!(!stderr.contains("pwrong0secret0value"), "{stderr}");
}
