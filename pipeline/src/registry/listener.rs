//! The invalidation listener: one tokio task per registry with Redis, subscribed to
//! `cache:invalidate`.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::layers::Shared;
use super::types::{Invalidation, INVALIDATION_CHANNEL};
use crate::backoff::Backoff;

/// First and longest wait between two subscription attempts.
const RETRY_INITIAL: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// The invalidation listener: subscribes to `cache:invalidate`, clears entries; reconnects
/// with [`Backoff`] (100 ms doubling up to 2 s, jittered), clearing the whole local layer after
/// each resubscription. Stops when `stop` is cancelled (the last `Registry` clone dropped).
pub(super) async fn listen(
    shared: Arc<Shared>,
    stop: CancellationToken,
    subscribed: watch::Sender<bool>,
) {
    let Some(r) = &shared.redis else { return };
    let mut backoff = Backoff::between(RETRY_INITIAL, RETRY_MAX);
    let mut first = true;
    loop {
        let attempt = async {
            let mut ps =
                tokio::time::timeout(shared.config.redis_timeout, r.client.get_async_pubsub())
                    .await
                    .map_err(|_| "connect timed out".to_owned())?
                    .map_err(|e| e.to_string())?;
            tokio::time::timeout(
                shared.config.redis_timeout,
                ps.subscribe(INVALIDATION_CHANNEL),
            )
            .await
            .map_err(|_| "subscribe timed out".to_owned())?
            .map_err(|e| e.to_string())?;
            Ok::<_, String>(ps)
        };
        let ps = tokio::select! {
            _ = stop.cancelled() => return,
            ps = attempt => ps,
        };
        match ps {
            Ok(ps) => {
                backoff.reset();
                if !first {
                    // Invalidations may have been missed while we were not subscribed.
                    shared.clear_all_local();
                    tracing::info!(
                        "Resubscribed to cache invalidations; cleared the in-process cache."
                    );
                }
                first = false;
                let _ = subscribed.send(true);
                let mut msgs = ps.into_on_message();
                loop {
                    let msg = tokio::select! {
                        _ = stop.cancelled() => return,
                        msg = msgs.next() => msg,
                    };
                    let Some(msg) = msg else { break };
                    let Ok(text) = msg.get_payload::<String>() else {
                        continue;
                    };
                    match serde_json::from_str::<Invalidation>(&text) {
                        Ok(inv) => shared.apply_invalidation(&inv).await,
                        Err(e) => {
                            tracing::warn!(error = %e, "Ignored a malformed cache invalidation message.")
                        }
                    }
                }
                let _ = subscribed.send(false);
                // Whatever we cached may be stale from now on.
                shared.clear_all_local();
                tracing::warn!("Lost the cache invalidation subscription; reconnecting.");
            }
            Err(e) => {
                shared.redis_failed(&e);
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}
