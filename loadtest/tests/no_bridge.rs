//! A run whose messages cannot arrive: a private Mosquitto (mTLS) + NATS + Postgres and no
//! bridge. The broker acks every message, nothing reaches the stores, so the load tester must
//! report every acked message as lost and exit non-zero.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use argus_testkit::mosquitto::Mosquitto;
use argus_testkit::nats::NatsServer;
use argus_testkit::pg::TestDb;

const MTLS_CONFIG: &str = "per_listener_settings false
listener {port} 127.0.0.1
cafile {dir}/pki/ca.crt
certfile {dir}/pki/server.crt
keyfile {dir}/pki/server.key
require_certificate true
use_identity_as_username true
allow_anonymous false
persistence false
max_inflight_messages 1000
max_queued_messages 0
log_dest stderr
";

struct Env {
    db: TestDb,
    nats: NatsServer,
    mq: Mosquitto,
    pki: std::path::PathBuf,
}

async fn env() -> Env {
    let db = TestDb::create().await;
    {
        let mut c = db.client().await;
        argus_schema::migrate::migrate(&mut c)
            .await
            .expect("migrate");
        argus_schema::seed::seed(&mut c).await.expect("seed");
    }
    let nats = NatsServer::start().await;
    let admin = nats.credentials("admin");
    let nc = argus_schema::streams::connect(
        &argus_schema::nats::NatsAuth::user_password(admin.user, admin.password),
        &[nats.url()],
    )
    .await
    .expect("nats");
    argus_schema::streams::apply(&nc, Some(1))
        .await
        .expect("streams apply");
    let dir = tempfile::Builder::new()
        .prefix("argus-loadtest-")
        .tempdir()
        .expect("tempdir");
    let pki = dir.path().join("pki");
    argus_pki::Ca::init(&pki, &[]).expect("pki init");
    let mq = Mosquitto::start_in(dir, MTLS_CONFIG).await;
    Env { db, nats, mq, pki }
}

fn loadtest(e: &Env, sub: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_argus-loadtest"));
    c.arg(sub)
        .args(["--quiet", "--pid-dir", "/nonexistent"])
        .arg("--mqtt-url")
        .arg(format!("mqtts://127.0.0.1:{}", e.mq.port()))
        .arg("--mqtt-ca-file")
        .arg(e.pki.join("ca.crt"))
        .arg("--pki-dir")
        .arg(&e.pki)
        .arg("--database-url")
        .arg(e.db.url())
        .arg("--nats-urls")
        .arg(e.nats.url())
        .env_remove("ARGUS_LOADTEST_BRIDGE_PIDS");
    // A run reads the streams as `loadtest`; `baseline` makes scratch streams as `admin`.
    let user = if sub == "baseline" {
        "admin"
    } else {
        "loadtest"
    };
    c.env_remove("NATS_PASSWORD")
        .arg("--nats-user")
        .arg(user)
        .arg("--nats-password-file")
        .arg(e.nats.password_file(user));
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baseline_measures_each_part_alone() {
    let e = env().await;
    let out_dir = tempfile::tempdir().unwrap();
    let json = out_dir.path().join("baseline.json");
    let status = loadtest(&e, "baseline")
        .args(["--count", "1000", "--devices", "2", "--bridge-rate", "5000"])
        .arg("--json")
        .arg(&json)
        .status()
        .expect("run argus-loadtest baseline");
    assert!(status.success());
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("report written")).unwrap();
    for f in [
        "broker_msgs_per_s",
        "copy_rows_per_s",
        "jetstream_msgs_per_s",
        "per_message_msgs_per_s",
        "pipeline_efficiency",
        "multiple_of_per_message",
    ] {
        assert!(r[f].as_f64().unwrap_or(0.0) > 0.0, "{f}: {r:#}");
    }
}

/// With no bridge every acked message is lost; `version` is the devices' MQTT version.
async fn acked_messages_that_never_arrive_are_lost(version: &str) {
    let e = env().await;
    let out_dir = tempfile::tempdir().unwrap();
    let json = out_dir.path().join("report.json");
    let status = loadtest(&e, "mqtt")
        .args([
            "--mqtt-version",
            version,
            "--devices",
            "3",
            "--count",
            "150",
            "--rate",
            "max",
            "--settle",
            "1s",
        ])
        .arg("--json")
        .arg(&json)
        .status()
        .expect("run argus-loadtest");
    assert_eq!(status.code(), Some(1), "a run with losses must exit 1");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("report written")).unwrap();
    assert_eq!(report["config"]["mqtt_version"], version, "{report:#}");
    assert_eq!(report["sent"], 150, "{report:#}");
    assert_eq!(report["acked"], 150, "{report:#}");
    assert_eq!(report["persisted"], 0);
    assert_eq!(report["published"], 0);
    assert_eq!(report["dead_lettered"], 0);
    assert_eq!(report["lost"], 150);
    assert_eq!(report["passed"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_that_never_arrive_are_lost_and_the_exit_code_says_so() {
    acked_messages_that_never_arrive_are_lost("3.1.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_5_devices_are_acked_and_counted_the_same_way() {
    acked_messages_that_never_arrive_are_lost("5").await;
}

/// `--properties` with 3.1.1 devices is a setup error (exit 2) that names the fix,
/// before any device is registered or connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_with_mqtt_3_1_1_are_refused_at_start() {
    let e = env().await;
    let out = loadtest(&e, "mqtt")
        .args(["--properties", "user", "--count", "10"])
        .output()
        .expect("run argus-loadtest");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--mqtt-version 5"), "{stderr}");
    let c = e.db.client().await;
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM devices WHERE name LIKE 'loadtest-%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "no device was registered");
}

/// A broker restart in the middle of the load: every device connection is dropped, comes
/// back, publishes again what was not acknowledged and goes on. Everything sent ends up
/// acked (and, with no bridge, lost: the accounting still sees each message once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_reconnect_after_a_broker_restart_and_every_message_is_acked() {
    let mut e = env().await;
    let out_dir = tempfile::tempdir().unwrap();
    let json = out_dir.path().join("report.json");
    let mut child = loadtest(&e, "mqtt")
        .args([
            "--devices",
            "3",
            "--rate",
            "150",
            "--duration",
            "4s",
            "--settle",
            "2s",
        ])
        .arg("--json")
        .arg(&json)
        .spawn()
        .expect("run argus-loadtest");
    // Certificates and devices first, then about 1.5 s of load.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    e.mq.stop().await;
    e.mq.restart().await;
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .expect("wait for argus-loadtest");
    assert_eq!(
        status.code(),
        Some(1),
        "no bridge: the acked messages are lost"
    );
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("report written")).unwrap();
    let sent = r["sent"].as_u64().unwrap();
    assert!(
        sent >= 550,
        "the plan is 600 messages, paced by the clock: {r:#}"
    );
    assert_eq!(r["acked"], sent, "{r:#}");
    assert_eq!(r["unacked"], 0, "{r:#}");
    assert_eq!(r["lost"], sent, "{r:#}");
    assert_eq!(r["errors"].as_array().unwrap().len(), 0, "{r:#}");
    assert!(
        r["reconnects"].as_u64().unwrap() >= 3,
        "each of 3 connections: {r:#}"
    );
}
