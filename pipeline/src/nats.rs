//! The source processes' NATS connection: [`connect`] logs in with the user of
//! `--nats-user` (`argus_schema::nats`), counts the server's errors on the
//! connection in `argus_nats_server_errors_total`, and keeps a count of refusals
//! ([`refusals`]) that the sink reads to tell a refused publish from a slow server.
//!
//! A publish the user's permissions do not allow is not answered by an error on the
//! publish: the server sends `-ERR 'Permissions Violation ...'` on the connection, which
//! async-nats reports as the event `ServerError::Other`, and the publish ack never
//! comes (the attempt times out). async-nats has no finer kind for it, so every
//! `ServerError::Other` counts as a refusal; the server's words are logged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use argus_schema::nats::{NatsAuth, NatsConnectError, Unreachable};
use async_nats::{Event, ServerError};

use crate::metrics;

/// Operations the NATS server refused on this process's connections so far.
static REFUSALS: AtomicU64 = AtomicU64::new(0);

/// How many operations the server has refused this process so far (a sink compares
/// the count before and after a failed publish attempt).
pub fn refusals() -> u64 {
    REFUSALS.load(Ordering::Relaxed)
}

fn on_event(event: &Event) {
    match event {
        Event::ServerError(ServerError::Other(_)) => {
            REFUSALS.fetch_add(1, Ordering::Relaxed);
            metrics::nats_server_error("refused");
        }
        Event::ServerError(ServerError::AuthorizationViolation) => {
            metrics::nats_server_error("authorization");
        }
        Event::ServerError(ServerError::SlowConsumer(_)) => {
            metrics::nats_server_error("slow_consumer");
        }
        _ => {}
    }
}

/// `auth` with this module's event hook (metrics and [`refusals`]).
pub fn with_metrics(auth: NatsAuth) -> NatsAuth {
    auth.with_event_hook(Arc::new(on_event))
}

/// Connects `name` to `urls` as `auth`, with the metrics hook. A refused login is an
/// error now, whatever `unreachable` says.
pub async fn connect(
    auth: NatsAuth,
    urls: &[String],
    name: &str,
    unreachable: Unreachable,
) -> Result<async_nats::Client, NatsConnectError> {
    argus_schema::nats::connect(&with_metrics(auth), urls, name, unreachable).await
}
