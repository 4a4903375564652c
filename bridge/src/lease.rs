//! Replica slot leases, for `--replica auto`.
//!
//! Each bridge connection has a persistent broker session named by its slot
//! (`bridge-<slot>-<connection>`). A replica started by an orchestrator that cannot
//! number its replicas (`docker compose --scale`) leases the lowest free slot: a
//! Postgres session advisory lock per slot, held for the life of the process. A
//! replacement replica therefore takes over a dead replica's slot, and with it the
//! messages the broker queued in that slot's sessions (`docs/bridge.md`, "Stable slots matter").
//!
//! If the lease connection dies, the lock is gone and another replica may take the
//! slot: the holder is told through [`SlotLease::lost`] and must stop, so two
//! processes never share a client id.

use std::time::Duration;

use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Advisory-lock keys of the slots: this base plus the slot number. The base spells
/// "ARGUSBRS" so it cannot collide with the migration runner's lock.
const LOCK_BASE: i64 = 0x4152_4755_5342_5200;

/// How often the lease connection is checked while the process runs.
const KEEPALIVE: Duration = Duration::from_secs(10);

/// A leased replica slot; the lock is held until this value and its task end.
#[derive(Debug)]
pub struct SlotLease {
    pub slot: u32,
    /// Cancelled when the lease connection is lost.
    pub lost: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        // Closing the connection releases the advisory lock.
        self.task.abort();
    }
}

/// Leases the lowest free slot in `0..max_slots`, waiting (with backoff) while
/// Postgres is unreachable. Fails only when every slot is taken.
pub async fn lease_slot(database_url: &str, max_slots: u32) -> anyhow::Result<SlotLease> {
    let mut delay = Duration::from_millis(200);
    let (client, connection) = loop {
        match tokio_postgres::connect(database_url, NoTls).await {
            Ok(pair) => break pair,
            Err(e) => {
                warn!(error = %e, "Cannot reach Postgres to lease a replica slot; retrying.");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    };
    let lost = CancellationToken::new();
    let conn_lost = lost.clone();
    let conn_task = tokio::spawn(async move {
        if let Err(e) = connection.await {
            error!(error = %e, "The replica slot lease connection failed.");
        }
        conn_lost.cancel();
    });
    for slot in 0..max_slots {
        let key = LOCK_BASE + i64::from(slot);
        let row = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
            .await?;
        if row.get::<_, bool>(0) {
            info!(slot, "Leased replica slot.");
            let keep_lost = lost.clone();
            let task = tokio::spawn(async move {
                // Owns the client: the session, and with it the lock, lives as long as this task.
                let mut tick = tokio::time::interval(KEEPALIVE);
                loop {
                    tokio::select! {
                        () = keep_lost.cancelled() => break,
                        _ = tick.tick() => {
                            if client.simple_query("SELECT 1").await.is_err() {
                                error!(slot, "Lost the replica slot lease; stopping.");
                                keep_lost.cancel();
                                break;
                            }
                        }
                    }
                }
                conn_task.abort();
            });
            return Ok(SlotLease { slot, lost, task });
        }
    }
    conn_task.abort();
    anyhow::bail!(
        "--replica auto: all {max_slots} replica slots are leased by running bridges; raise --max-replicas (and issue certificates and ACL entries for the new slots) or stop a replica"
    )
}
