//! `device_api_keys.last_used_at`, kept cheaply up to date.
//!
//! The request path only records "key K was used" in a small map; at most once per
//! [`TOUCH_INTERVAL`] per key it hands the key id to a background task over a bounded
//! channel (a full channel drops the touch: it is a hint for operators, never worth
//! slowing a request). The task writes the ids it has collected with one `UPDATE ...
//! WHERE id = ANY($1)`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use uuid::Uuid;

/// A key's `last_used_at` is written at most this often.
pub const TOUCH_INTERVAL: Duration = Duration::from_secs(60);
/// Pending touches; beyond this they are dropped.
const CHANNEL_CAPACITY: usize = 1024;
/// Tracked keys before idle entries are swept.
const MAX_TRACKED: usize = 100_000;

/// Records key use; cheap to call on every request.
#[derive(Debug)]
pub struct KeyUsage {
    last: Mutex<HashMap<Uuid, Instant>>,
    tx: mpsc::Sender<Uuid>,
}

impl KeyUsage {
    /// Starts the writer task on `pool`. It ends when the `KeyUsage` is dropped.
    pub fn start(pool: deadpool_postgres::Pool) -> Self {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        tokio::spawn(write_loop(pool, rx));
        Self {
            last: Mutex::new(HashMap::new()),
            tx,
        }
    }

    /// Notes that `key_id` authenticated a request.
    pub fn touch(&self, key_id: Uuid) {
        let now = Instant::now();
        {
            // Poisoning cannot leave the map inconsistent (single inserts); keep using it.
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(t) = last.get(&key_id) {
                if now.duration_since(*t) < TOUCH_INTERVAL {
                    return;
                }
            }
            if last.len() >= MAX_TRACKED {
                last.retain(|_, t| now.duration_since(*t) < TOUCH_INTERVAL);
            }
            last.insert(key_id, now);
        }
        let _ = self.tx.try_send(key_id);
    }
}

async fn write_loop(pool: deadpool_postgres::Pool, mut rx: mpsc::Receiver<Uuid>) {
    let mut ids = Vec::new();
    while rx.recv_many(&mut ids, 256).await > 0 {
        ids.sort_unstable();
        ids.dedup();
        let result = async {
            let client = pool.get().await.map_err(|e| e.to_string())?;
            client
                .execute(
                    "UPDATE device_api_keys SET last_used_at = now() WHERE id = ANY($1)",
                    &[&ids],
                )
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        if let Err(e) = result {
            tracing::debug!(error = %e, keys = ids.len(), "Could not update API key last_used_at.");
        }
        ids.clear();
    }
}
