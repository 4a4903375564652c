//! A flood of well-formed random API keys, from one client address, while a real
//! device keeps ingesting from another: the device's readings all arrive, the
//! unknown keys leave nothing in Redis, and the real key stays in the in-process
//! cache (its next request needs neither Redis nor Postgres).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use argus_ingest_http::apikey::{self, ApiKey};
use argus_ingest_http::Limits;
use common::*;
use reqwest::StatusCode;

const FLOOD: usize = 10_000;
const FLOOD_CONCURRENCY: usize = 16;
const DEVICE_READINGS: usize = 100;

#[tokio::test]
async fn random_api_keys_neither_reach_redis_nor_evict_nor_starve_a_real_device() {
    // Look-ups of keys this process does not know: 20/s and 20 at once per address.
    let s = Stack::start_with(Limits {
        preauth_rate_per_address: 20.0,
        preauth_burst: 20,
        ..test_limits()
    })
    .await;
    let (_, key) = create_key(&s.http, &s.app, DEVICE).await;
    // The attacker sends from 127.0.0.2, the device from 127.0.0.1 (both loopback).
    let attacker = reqwest::Client::builder()
        .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)))
        .build()
        .unwrap();

    let url = s.app.url("/api/v1/telemetry/ingest");
    let next = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..FLOOD_CONCURRENCY {
        let (http, url, next, refused) =
            (attacker.clone(), url.clone(), next.clone(), refused.clone());
        workers.push(tokio::spawn(async move {
            let body = serde_json::to_vec(&reading(DEVICE, 0.0)).unwrap();
            while next.fetch_add(1, Ordering::Relaxed) < FLOOD {
                let random = ApiKey::generate().unwrap();
                let resp = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("x-api-key", random.expose())
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                let st = resp.status();
                assert!(
                    st == StatusCode::FORBIDDEN || st == StatusCode::TOO_MANY_REQUESTS,
                    "random key answered {st}"
                );
                if st == StatusCode::TOO_MANY_REQUESTS {
                    assert!(resp.headers().contains_key("retry-after"));
                }
                refused.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Meanwhile the device sends its readings one after another; every one is accepted.
    for i in 0..DEVICE_READINGS {
        let (st, body, _) = ingest(
            &s.http,
            &s.app,
            Some(&key),
            &reading(DEVICE, i as f64),
            None,
        )
        .await;
        assert_eq!(st, StatusCode::OK, "device reading {i}: {body}");
    }
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(refused.load(Ordering::Relaxed), FLOOD);
    assert_eq!(
        row_count(&s.pg().await).await as usize,
        DEVICE_READINGS,
        "every device reading arrived"
    );

    // Redis holds the real key only: no entry for any unknown one.
    let mut redis = redis::Client::open(s.redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("api_key:*")
        .query_async(&mut redis)
        .await
        .unwrap();
    keys.sort();
    let real = format!(
        "api_key:{}",
        hex::encode(apikey::parse_presented(&key).unwrap())
    );
    assert_eq!(keys, vec![real], "Redis holds keys of unknown API keys");

    // The real key is still cached in process: its next request misses no local entry.
    let before = s.app.state.registry().stats();
    let (st, _, _) = ingest(&s.http, &s.app, Some(&key), &reading(DEVICE, -1.0), None).await;
    assert_eq!(st, StatusCode::OK);
    let after = s.app.state.registry().stats();
    assert_eq!(
        after.local_misses, before.local_misses,
        "{before:?} → {after:?}"
    );
    assert!(
        after.local_hits >= before.local_hits + 2,
        "{before:?} → {after:?}"
    );
}
