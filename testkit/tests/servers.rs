//! The harness itself: each server starts, answers, stops and comes back.

use argus_testkit::{mosquitto::Mosquitto, nats, pg, redis::RedisServer, wait_for_port};
use std::time::Duration;

#[tokio::test]
async fn test_db_is_fresh_and_dropped() {
    let name;
    {
        let db = pg::TestDb::create().await;
        name = db.name().to_string();
        let client = db.client().await;
        let row = client
            .query_one("SELECT current_database()", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), name);
    }
    let admin = pg::connect(&pg::admin_url()).await;
    let left = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .unwrap();
    assert!(left.is_none(), "database {name} was not dropped");
}

#[tokio::test]
async fn pg_server_stops_and_restarts_with_its_data() {
    let mut server = pg::PgServer::start().await;
    let url = server.create_database("argus").await;
    pg::connect(&url)
        .await
        .batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (7)")
        .await
        .unwrap();
    server.stop().await;
    assert!(tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .is_err());
    server.restart().await;
    let row = pg::connect(&url)
        .await
        .query_one("SELECT x FROM t", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 7);
}

/// Every server the tests start is the pinned release, and so is the local stack's
/// (compose/up exports ARGUS_NATS_SERVER in .stack/env; compose/test runs the tests with it).
#[tokio::test]
async fn nats_servers_run_the_pinned_version() {
    let pinned = nats::pinned_version();
    let server = nats::NatsServer::start().await;
    let (status, body) = argus_testkit::http_get(server.monitor_port(), "/varz").unwrap();
    assert_eq!(status, 200, "{body}");
    let varz: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        varz["version"], pinned,
        "the test server is not the pinned release"
    );

    let out = std::process::Command::new(nats::server_binary())
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("nats-server: v{pinned}"),
        "{} is not the pinned release",
        nats::server_binary().display()
    );
}

/// The production compose file runs the same release as the tests and the local stack.
#[test]
fn production_compose_pins_the_same_nats_release() {
    let compose = include_str!("../../compose/docker-compose.yml");
    let images: Vec<&str> = compose
        .lines()
        .filter_map(|l| l.trim().strip_prefix("image: nats:"))
        .collect();
    assert!(
        !images.is_empty(),
        "no nats image in compose/docker-compose.yml"
    );
    for tag in images {
        assert_eq!(
            tag,
            format!("{}-alpine", nats::pinned_version()),
            "compose/docker-compose.yml runs nats:{tag}, compose/nats/requirements.txt pins {}",
            nats::pinned_version()
        );
    }
}

#[tokio::test]
async fn nats_server_restarts_on_the_same_port() {
    let mut server = nats::NatsServer::start().await;
    let port = server.port();
    server.stop().await;
    assert!(!wait_for_port(port, Duration::from_millis(200)).await);
    server.restart().await;
    assert!(wait_for_port(port, Duration::from_secs(1)).await);
}

#[tokio::test]
async fn nats_cluster_of_three_forms() {
    let mut cluster = nats::NatsCluster::start(3).await;
    assert_eq!(cluster.urls().len(), 3);
    let (_, body) = argus_testkit::http_get(cluster.node(0).monitor_port(), "/routez").unwrap();
    // nats-server 2.10+ pools several connections per peer: count the peers.
    let routez: serde_json::Value = serde_json::from_str(&body).unwrap();
    let peers: std::collections::BTreeSet<&str> = routez["routes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["remote_name"].as_str())
        .collect();
    assert_eq!(peers.len(), 2, "routes: {body}");
    cluster.node(1).stop().await;
    cluster.node(1).restart().await;
    cluster.wait_healthy().await;
}

#[tokio::test]
async fn redis_stops_and_restarts() {
    let mut redis = RedisServer::start().await;
    let port = redis.port();
    redis.stop().await;
    assert!(!wait_for_port(port, Duration::from_millis(200)).await);
    redis.restart().await;
    assert!(wait_for_port(port, Duration::from_secs(1)).await);
}

#[tokio::test]
async fn mosquitto_starts_with_the_given_config() {
    let mut mq = Mosquitto::start(
        "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {dir}/\n",
    )
    .await;
    assert!(wait_for_port(mq.port(), Duration::from_secs(1)).await);
    mq.reload();
    mq.stop().await;
    mq.restart().await;
    assert!(wait_for_port(mq.port(), Duration::from_secs(1)).await);
}
