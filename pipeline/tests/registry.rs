//! Device registry against real Redis and Postgres (servers on free ports, killed on drop).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use argus_pipeline::registry::{
    DeviceStatus, Invalidation, Registry, RegistryConfig, RegistryStats,
};
use argus_testkit::pg::TestDb;
use argus_testkit::redis::RedisServer;
use uuid::Uuid;

struct Fixture {
    db: TestDb,
    pool: deadpool_postgres::Pool,
    tenant: Uuid,
    device_type: Uuid,
}

async fn fixture() -> Fixture {
    let db = TestDb::create().await;
    let mut client = db.client().await;
    argus_schema::migrate::migrate(&mut client)
        .await
        .expect("migrate");
    let tenant = Uuid::new_v4();
    client
        .execute(
            "INSERT INTO organizations (id, name, slug) VALUES ($1, 'Org', $2)",
            &[&tenant, &tenant.to_string()],
        )
        .await
        .unwrap();
    let device_type = Uuid::new_v4();
    client
        .execute(
            "INSERT INTO device_types (id, tenant_id, name) VALUES ($1, $2, 'sensor')",
            &[&device_type, &tenant],
        )
        .await
        .unwrap();
    // The registry reads as the bridge's role.
    let pg_config: tokio_postgres::Config = db.url_as(argus_schema::roles::INGEST).parse().unwrap();
    let mgr = deadpool_postgres::Manager::new(pg_config, tokio_postgres::NoTls);
    let pool = deadpool_postgres::Pool::builder(mgr)
        .max_size(4)
        .build()
        .unwrap();
    Fixture {
        db,
        pool,
        tenant,
        device_type,
    }
}

impl Fixture {
    async fn add_device(&self, status: &str) -> Uuid {
        let id = Uuid::new_v4();
        self.db
            .client()
            .await
            .execute(
                "INSERT INTO devices (id, tenant_id, device_type_id, name, status) \
                 VALUES ($1, $2, $3, 'dev', $4)",
                &[&id, &self.tenant, &self.device_type, &status],
            )
            .await
            .unwrap();
        id
    }

    async fn set_status(&self, id: Uuid, status: &str) {
        self.db
            .client()
            .await
            .execute(
                "UPDATE devices SET status = $2 WHERE id = $1",
                &[&id, &status],
            )
            .await
            .unwrap();
    }

    fn registry(&self, redis: &RedisServer) -> Registry {
        Registry::start(
            RegistryConfig {
                redis_url: Some(redis.url()),
                redis_retry_after: Duration::from_millis(100),
                ..Default::default()
            },
            self.pool.clone(),
        )
        .unwrap()
    }
}

async fn redis_conn(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

fn delta(after: RegistryStats, before: RegistryStats) -> RegistryStats {
    RegistryStats {
        local_hits: after.local_hits - before.local_hits,
        local_misses: after.local_misses - before.local_misses,
        redis_hits: after.redis_hits - before.redis_hits,
        redis_misses: after.redis_misses - before.redis_misses,
        redis_errors: after.redis_errors - before.redis_errors,
        postgres_hits: after.postgres_hits - before.postgres_hits,
        postgres_misses: after.postgres_misses - before.postgres_misses,
        invalidations_received: after.invalidations_received - before.invalidations_received,
    }
}

#[tokio::test]
async fn hit_miss_and_expiry_through_the_layers() {
    let f = fixture().await;
    let redis = RedisServer::start().await;
    let reg = f.registry(&redis);
    let id = f.add_device("active").await;

    // Miss everywhere: Postgres answers, both caches are filled.
    let d = reg.device(id).await.unwrap().expect("device exists");
    assert_eq!(d.tenant_id, f.tenant);
    assert_eq!(d.device_type_id, Some(f.device_type));
    assert!(d.is_active());
    let s = reg.stats();
    assert_eq!((s.local_misses, s.redis_misses, s.postgres_hits), (1, 1, 1));
    let mut conn = redis_conn(&redis).await;
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!("device:{id}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((290..=300).contains(&ttl), "device:<id> TTL {ttl}");

    // Hit in process: no network.
    let before = reg.stats();
    assert_eq!(reg.device(id).await.unwrap(), Some(d.clone()));
    let s = delta(reg.stats(), before);
    assert_eq!((s.local_hits, s.redis_hits, s.postgres_hits), (1, 0, 0));

    // In-process TTL ends (clock advanced, no sleeping): Redis answers.
    reg.clock().advance(Duration::from_secs(31));
    let before = reg.stats();
    assert_eq!(reg.device(id).await.unwrap(), Some(d));
    let s = delta(reg.stats(), before);
    assert_eq!((s.local_misses, s.redis_hits, s.postgres_hits), (1, 1, 0));

    // Unknown device: Postgres once, then cached as absent in process and in Redis.
    let unknown = Uuid::new_v4();
    assert_eq!(reg.device(unknown).await.unwrap(), None);
    assert_eq!(reg.device(unknown).await.unwrap(), None);
    let s = reg.stats();
    assert_eq!(s.postgres_misses, 1);
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!("device:{unknown}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((1..=10).contains(&ttl), "negative TTL {ttl}");
    let other = f.registry(&redis);
    assert_eq!(other.device(unknown).await.unwrap(), None);
    assert_eq!(
        other.stats().redis_hits,
        1,
        "second process gets the absence from Redis"
    );
    // Negative entries expire after negative_ttl (10 s) in process.
    reg.clock().advance(Duration::from_secs(11));
    let before = reg.stats();
    let _ = reg.device(unknown).await.unwrap();
    assert_eq!(delta(reg.stats(), before).local_misses, 1);
}

#[tokio::test]
async fn api_key_and_device_profile() {
    let f = fixture().await;
    let redis = RedisServer::start().await;
    let reg = f.registry(&redis);
    let id = f.add_device("active").await;
    let key = format!("argus_{}", Uuid::new_v4().simple());
    let digest = argus_pipeline::digest::sha256(key.as_bytes());
    let key_id: Uuid = f
        .db
        .client()
        .await
        .query_one(
            "INSERT INTO device_api_keys (device_id, prefix, key_digest) VALUES ($1, $2, $3) RETURNING id",
            &[&id, &&key[..14], &&digest[..]],
        )
        .await
        .unwrap()
        .get(0);
    let k = reg.api_key(&digest).await.unwrap().expect("key found");
    assert_eq!((k.key_id, k.device_id), (key_id, id));
    assert!(k.is_valid_at(chrono::Utc::now()));
    assert_eq!(reg.api_key(&[7u8; 32]).await.unwrap(), None);

    // Revoke, invalidate: seen at once.
    f.db.client()
        .await
        .execute(
            "UPDATE device_api_keys SET revoked_at = now() WHERE id = $1",
            &[&key_id],
        )
        .await
        .unwrap();
    reg.invalidate(Invalidation::api_key(&digest))
        .await
        .unwrap();
    let k = reg.api_key(&digest).await.unwrap().unwrap();
    assert!(!k.is_valid_at(chrono::Utc::now()));

    let p = reg
        .device_profile(f.device_type)
        .await
        .unwrap()
        .expect("profile");
    assert_eq!(p.row["name"], "sensor");
    assert_eq!(
        p.processing_mode.as_deref(),
        Some("endpoint"),
        "0002 default"
    );
    let mut conn = redis_conn(&redis).await;
    let exists: bool = redis::cmd("EXISTS")
        .arg(format!("device_profile:{}", f.device_type))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(exists, "plan §4.2 key device_profile:<id>");
    assert_eq!(reg.device_profile(Uuid::new_v4()).await.unwrap(), None);
}

#[tokio::test]
async fn invalidation_reaches_other_process_and_disabled_is_seen_at_once() {
    let f = fixture().await;
    let redis = RedisServer::start().await;
    let a = f.registry(&redis);
    let b = f.registry(&redis);
    assert!(b.wait_subscribed(Duration::from_secs(5)).await);
    let id = f.add_device("active").await;
    assert!(a.device(id).await.unwrap().unwrap().is_active());
    assert!(b.device(id).await.unwrap().unwrap().is_active());
    assert!(b.device(id).await.unwrap().unwrap().is_active());
    assert_eq!(b.stats().local_hits, 1, "b serves from its own memory");

    f.set_status(id, "disabled").await;
    // Without invalidation, b still has the old answer in process (that is what TTLs are for).
    assert!(b.device(id).await.unwrap().unwrap().is_active());

    // An invalidation message in the plan's §4.3 format, as any process would publish it.
    let mut conn = redis_conn(&redis).await;
    let seen_before = b.stats().invalidations_received;
    a.invalidate(Invalidation::device(id)).await.unwrap();
    assert_eq!(
        a.device(id).await.unwrap().unwrap().status,
        DeviceStatus::Disabled
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while b.stats().invalidations_received == seen_before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "b never got the invalidation"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let d = b.device(id).await.unwrap().unwrap();
    assert_eq!(d.status, DeviceStatus::Disabled);
    assert!(!d.is_active());

    // A raw publish (another language, redis-cli) works the same.
    f.set_status(id, "active").await;
    let seen_before = b.stats().invalidations_received;
    let msg = format!(r#"{{"type":"device","id":"{id}"}}"#);
    let _: i64 = redis::cmd("PUBLISH")
        .arg("cache:invalidate")
        .arg(&msg)
        .query_async(&mut conn)
        .await
        .unwrap();
    while b.stats().invalidations_received == seen_before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "b never got the raw invalidation"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(b.device(id).await.unwrap().unwrap().is_active());
}

#[tokio::test]
async fn redis_down_falls_back_to_postgres_and_comes_back() {
    let f = fixture().await;
    let mut redis = RedisServer::start().await;
    let reg = f.registry(&redis);
    assert!(reg.wait_subscribed(Duration::from_secs(5)).await);
    let id = f.add_device("active").await;
    assert!(reg.device(id).await.unwrap().unwrap().is_active());

    redis.stop().await;
    f.set_status(id, "disabled").await;
    reg.clear_local();
    // Answers stay correct (Postgres), and fast: Redis calls time out in 250 ms at most.
    let started = std::time::Instant::now();
    let d = reg.device(id).await.unwrap().unwrap();
    assert_eq!(d.status, DeviceStatus::Disabled);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert!(reg.stats().redis_errors >= 1);
    let unknown = Uuid::new_v4();
    assert_eq!(reg.device(unknown).await.unwrap(), None);
    for _ in 0..20 {
        reg.clear_local();
        assert!(!reg.device(id).await.unwrap().unwrap().is_active());
    }
    // Invalidate reports that other processes could not be told, but clears locally.
    assert!(reg.invalidate(Invalidation::device(id)).await.is_err());

    // Redis back: the listener resubscribes and look-ups use Redis again.
    redis.start_again().await;
    assert!(
        reg.wait_subscribed(Duration::from_secs(10)).await,
        "resubscribed"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        reg.clear_local();
        let before = reg.stats();
        assert_eq!(
            reg.device(id).await.unwrap().unwrap().status,
            DeviceStatus::Disabled
        );
        let s = delta(reg.stats(), before);
        if s.redis_hits == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Redis never used again: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

#[tokio::test]
async fn works_without_redis() {
    let f = fixture().await;
    let reg = Registry::start(RegistryConfig::default(), f.pool.clone()).unwrap();
    let id = f.add_device("decommissioned").await;
    let d = reg.device(id).await.unwrap().unwrap();
    assert_eq!(d.status, DeviceStatus::Decommissioned);
    assert_eq!(reg.device(id).await.unwrap(), Some(d));
    assert_eq!(reg.stats().local_hits, 1);
    reg.invalidate(Invalidation::device(id)).await.unwrap();
    assert!(!reg.wait_subscribed(Duration::from_millis(10)).await);
}
