//! `--replica auto`: replicas lease distinct slots, a freed slot is taken again, a lost
//! lease connection takes its slot again, and only a slot taken meanwhile stops the holder.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use argus_bridge::lease::{lease_slot, LOCK_BASE};
use argus_testkit::pg::TestDb;

/// A migrated database, and its URL as the bridge's role `argus_ingest`: the lease
/// must work (lock, look up, end its own stale session) without more privileges.
async fn migrated() -> (TestDb, String) {
    let db = TestDb::create().await;
    argus_schema::migrate::migrate(&mut db.client().await)
        .await
        .expect("migrate");
    let url = db.url_as(argus_schema::roles::INGEST);
    (db, url)
}

#[tokio::test]
async fn replicas_lease_distinct_slots_and_a_freed_slot_is_reused() {
    let (_db, url) = migrated().await;
    let first = lease_slot(&url, 2).await.unwrap();
    let second = lease_slot(&url, 2).await.unwrap();
    assert_eq!((first.slot, second.slot), (0, 1));

    let err = lease_slot(&url, 2).await.unwrap_err().to_string();
    assert!(err.contains("all 2 replica slots are leased"), "{err}");

    // The replica on slot 0 dies: its replacement resumes slot 0 (and its sessions).
    drop(first);
    let mut replacement = None;
    for _ in 0..50 {
        if let Ok(lease) = lease_slot(&url, 2).await {
            replacement = Some(lease);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(replacement.expect("slot 0 freed").slot, 0);
    assert!(!second.lost.is_cancelled());
}

/// Ends the lease's Postgres session from another one, as a Postgres restart or a
/// network cut would.
async fn cut_lease_sessions(admin: &tokio_postgres::Client) {
    admin
        .execute(
            // Only this test's database: other tests run on the same server.
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'
               AND pid <> pg_backend_pid()
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .await
        .unwrap();
}

/// The backend holding slot `slot`'s lock, if any.
async fn holder(admin: &tokio_postgres::Client, slot: u32) -> Option<i32> {
    let key = LOCK_BASE + i64::from(slot);
    admin
        .query_opt(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND ((classid::int8 << 32) | objid::int8) = $1",
            &[&key],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

#[tokio::test]
async fn a_lost_lease_connection_takes_the_same_slot_again() {
    let (db, url) = migrated().await;
    let _other = lease_slot(&url, 4).await.unwrap();
    let lease = lease_slot(&url, 4).await.unwrap();
    assert_eq!(lease.slot, 1);
    let admin = db.client().await;
    let before = holder(&admin, 1).await.expect("slot 1 held");
    cut_lease_sessions(&admin).await;
    // Taken again by a new session, and the holder is not told to stop.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match holder(&admin, 1).await {
            Some(pid) if pid != before => break,
            _ => assert!(Instant::now() < deadline, "slot 1 not taken again"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!lease.lost.is_cancelled());
    assert_eq!(lease.slot, 1);
}

#[tokio::test]
async fn a_slot_taken_by_another_process_during_a_blip_stops_the_holder() {
    let (db, url) = migrated().await;
    let lease = lease_slot(&url, 4).await.unwrap();
    let admin = db.client().await;
    cut_lease_sessions(&admin).await;
    // Another process takes slot 0 while the holder waits to reconnect.
    let key = LOCK_BASE;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let row = admin
            .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
            .await
            .unwrap();
        if row.get::<_, bool>(0) {
            break;
        }
        assert!(Instant::now() < deadline, "the old session never let go");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::timeout(Duration::from_secs(20), lease.lost.cancelled())
        .await
        .expect("the holder learns that its slot is taken");
}
