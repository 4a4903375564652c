//! Replica slot leases, for `--replica auto`.
//!
//! Each bridge connection has a persistent broker session named by its slot
//! (`bridge-<slot>-<connection>`). A replica started by an orchestrator that cannot
//! number its replicas (`docker compose --scale`) leases the lowest free slot: a
//! Postgres session advisory lock per slot, held for the life of the process. A
//! replacement replica therefore takes over a dead replica's slot, and with it the
//! messages the broker queued in that slot's sessions (`docs/bridge.md`, "Stable slots matter").
//!
//! A lost lease connection (a Postgres restart, a network cut, a terminated
//! backend) releases the lock, but it does not stop the replica: it keeps
//! running (the sink and the registry have their own pool and retry on their
//! own), reconnects with backoff and takes the same slot again. Only when
//! `pg_try_advisory_lock` answers false, because another live process took the
//! slot meanwhile, is the holder told through [`SlotLease::lost`]; it must stop,
//! so two processes never keep sharing a client id. `argus_bridge_lease_held`
//! is 1 while the lock is held.

use std::time::Duration;

use argus_pipeline::backoff::Backoff;
use argus_schema::tls::PgConnectConfig;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::metrics;

/// Advisory-lock keys of the slots: this base plus the slot number. The base spells
/// "ARGUSBRS" so it cannot collide with the migration runner's lock.
pub const LOCK_BASE: i64 = 0x4152_4755_5342_5200;

/// How often the lease connection is checked while the process runs.
const KEEPALIVE: Duration = Duration::from_secs(10);

/// First wait before re-taking a lost slot, and the cap of the backoff after it.
const RETAKE_FIRST: Duration = Duration::from_millis(500);
const RETAKE_MAX: Duration = Duration::from_secs(5);

/// A leased replica slot; the lock is held until this value and its task end.
#[derive(Debug)]
pub struct SlotLease {
    pub slot: u32,
    /// Cancelled when another process holds the slot after a lost lease
    /// connection: the replica must stop.
    pub lost: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        // Closing the connection releases the advisory lock.
        self.task.abort();
    }
}

/// An open lease connection: the client, and a token cancelled when the
/// connection ends.
struct Session {
    client: Client,
    /// Its backend's process id, to recognise our own lock after a lost connection.
    pid: Option<i32>,
    closed: CancellationToken,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

async fn connect(database_url: &str) -> anyhow::Result<Session> {
    // lease_slot parsed the URL before the first connect, so this cannot fail there.
    let pg = PgConnectConfig::parse(database_url, None)?;
    let (client, connection) = pg.config.connect(pg.tls).await?;
    let closed = CancellationToken::new();
    let done = closed.clone();
    let driver = tokio::spawn(async move {
        if let Err(e) = connection.await {
            warn!(error = %e, "The replica slot lease connection failed.");
        }
        done.cancel();
    });
    let pid = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .ok()
        .map(|r| r.get(0));
    Ok(Session {
        client,
        pid,
        closed,
        driver,
    })
}

/// Connects, retrying with backoff while Postgres is unreachable.
async fn connect_retrying(database_url: &str, backoff: &mut Backoff, what: &str) -> Session {
    loop {
        match connect(database_url).await {
            Ok(s) => return s,
            Err(e) => {
                let delay = backoff.next_delay();
                // The driver's error names host and database, never the password.
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "Cannot reach Postgres to {what}; retrying.");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// The backend that holds slot `slot`'s lock, if any.
async fn holder(client: &Client, slot: u32) -> Result<Option<i32>, tokio_postgres::Error> {
    let key = LOCK_BASE + i64::from(slot);
    // Advisory locks belong to a database; a bigint key is split into classid (high
    // half) and objid (low half).
    let row = client
        .query_opt(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 \
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND ((classid::int8 << 32) | objid::int8) = $1",
            &[&key],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

async fn try_lock(client: &Client, slot: u32) -> Result<bool, tokio_postgres::Error> {
    let key = LOCK_BASE + i64::from(slot);
    let row = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
        .await?;
    Ok(row.get::<_, bool>(0))
}

/// Leases the lowest free slot in `0..max_slots`, waiting (with backoff) while
/// Postgres is unreachable. Fails only when every slot is taken.
pub async fn lease_slot(database_url: &str, max_slots: u32) -> anyhow::Result<SlotLease> {
    PgConnectConfig::parse(database_url, None)?;
    let mut backoff = Backoff::between(Duration::from_millis(200), RETAKE_MAX);
    let session = connect_retrying(database_url, &mut backoff, "lease a replica slot").await;
    for slot in 0..max_slots {
        if try_lock(&session.client, slot).await? {
            info!(slot, "Leased replica slot.");
            metrics::lease_held(true);
            let lost = CancellationToken::new();
            let task = tokio::spawn(hold(database_url.to_owned(), slot, session, lost.clone()));
            return Ok(SlotLease { slot, lost, task });
        }
    }
    anyhow::bail!(
        "--replica auto: all {max_slots} replica slots are leased by running bridges; raise --max-replicas (and issue certificates and ACL entries for the new slots) or stop a replica"
    )
}

/// Holds the slot for the life of the process: checks the connection, and after
/// losing it takes the same slot again, until another process holds it.
async fn hold(database_url: String, slot: u32, mut session: Session, lost: CancellationToken) {
    let mut tick = tokio::time::interval(KEEPALIVE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Wait until the connection is found gone.
        loop {
            tokio::select! {
                () = session.closed.cancelled() => break,
                _ = tick.tick() => {
                    if session.client.simple_query("SELECT 1").await.is_err() {
                        break;
                    }
                }
            }
        }
        metrics::lease_held(false);
        warn!(slot, "Lost the replica slot lease connection; the replica keeps running and takes the slot again.");
        // The backend of the lost connection may hold the lock a while longer
        // (Postgres notices a cut connection late): that holder is ours.
        let mut ours: Vec<i32> = session.pid.into_iter().collect();
        let mut backoff = Backoff::between(RETAKE_FIRST, RETAKE_MAX);
        loop {
            tokio::time::sleep(backoff.next_delay()).await;
            session =
                connect_retrying(&database_url, &mut backoff, "take the replica slot again").await;
            match retake(&session.client, slot, &ours).await {
                Ok(Retake::Taken) => {
                    info!(slot, "Took the replica slot again.");
                    metrics::lease_held(true);
                    break;
                }
                Ok(Retake::StillOurs) => {
                    info!(
                        slot,
                        "The lost lease session still holds the slot; ended it, retrying."
                    );
                }
                Ok(Retake::Elsewhere) => {
                    error!(slot, "Another process holds this replica slot now; stopping so that two processes do not share its client ids.");
                    lost.cancel();
                    return;
                }
                Err(e) => {
                    warn!(slot, error = %e, "Taking the replica slot again failed; retrying.");
                }
            }
            // A session that failed may have taken the lock before failing.
            ours.extend(session.pid);
        }
    }
}

enum Retake {
    Taken,
    /// Held by the lost connection's backend, which was ended: try again.
    StillOurs,
    /// Held by another process.
    Elsewhere,
}

async fn retake(client: &Client, slot: u32, ours: &[i32]) -> Result<Retake, tokio_postgres::Error> {
    if try_lock(client, slot).await? {
        return Ok(Retake::Taken);
    }
    match holder(client, slot).await? {
        // Released between the two queries: the next round takes it.
        None => Ok(Retake::StillOurs),
        Some(pid) if ours.contains(&pid) => {
            client
                .execute("SELECT pg_terminate_backend($1)", &[&pid])
                .await?;
            Ok(Retake::StillOurs)
        }
        Some(_) => Ok(Retake::Elsewhere),
    }
}
