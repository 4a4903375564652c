//! `--replica auto`: replicas lease distinct slots, and a freed slot is taken again.

use argus_bridge::lease::lease_slot;
use argus_testkit::pg::TestDb;

#[tokio::test]
async fn replicas_lease_distinct_slots_and_a_freed_slot_is_reused() {
    let db = TestDb::create().await;
    let first = lease_slot(db.url(), 2).await.unwrap();
    let second = lease_slot(db.url(), 2).await.unwrap();
    assert_eq!((first.slot, second.slot), (0, 1));

    let err = lease_slot(db.url(), 2).await.unwrap_err().to_string();
    assert!(err.contains("all 2 replica slots are leased"), "{err}");

    // The replica on slot 0 dies: its replacement resumes slot 0 (and its sessions).
    drop(first);
    let mut replacement = None;
    for _ in 0..50 {
        if let Ok(lease) = lease_slot(db.url(), 2).await {
            replacement = Some(lease);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(replacement.expect("slot 0 freed").slot, 0);
    assert!(!second.lost.is_cancelled());
}

#[tokio::test]
async fn a_lost_lease_connection_is_reported() {
    let db = TestDb::create().await;
    let lease = lease_slot(db.url(), 4).await.unwrap();
    // Another session ends ours, as a Postgres restart or a network cut would.
    let admin = db.client().await;
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(15), lease.lost.cancelled())
        .await
        .expect("the holder learns that its lease is gone");
}
