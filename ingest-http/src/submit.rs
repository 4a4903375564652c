//! [`Submitter`]: hands one request's readings to the shared batching sink
//! ([`argus_pipeline::sink`]) and waits until they are durable.
//!
//! One request = one unit: its readings go to the sink together and are committed in
//! one Postgres transaction (all or none), then published to JetStream with their
//! message ids; the request waits for that, bounded by the durability timeout.
//!
//! The sink never gives up on an outage (it retries with backoff), so the bound is
//! ours: if the unit is not durable within the timeout the request answers 503. The
//! unit may still land later (it stays queued in the sink); a retry carries the same
//! message ids and is stored once.

use std::sync::Mutex;
use std::time::Duration;

use argus_pipeline::reading::Reading;
use argus_pipeline::sink::{Delivered, SinkHandle};
use tokio::task::JoinHandle;

/// Why a unit is not (known to be) durable.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// No confirmation within the durability timeout (Postgres or NATS down or slow,
    /// or the sink's queue full). The unit may still land later.
    #[error("no durability confirmation within {0:?}")]
    Timeout(Duration),
    /// The sink is shut down (or its task ended); the unit was not (known to be) stored.
    #[error("sink closed")]
    Closed,
}

/// Submits units to the sink (one request = one unit, bounded by the durability
/// timeout), and owns the sink's task for the drain at shutdown.
#[derive(Debug)]
pub struct Submitter {
    sink: SinkHandle,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Submitter {
    pub fn new(sink: SinkHandle, task: JoinHandle<()>) -> Self {
        Self {
            sink,
            task: Mutex::new(Some(task)),
        }
    }

    /// Sends one unit and waits until it is durable, at most `timeout` in all (the wait
    /// for queue space included). What became of each reading (stored, already stored,
    /// dead-lettered, an id conflict) is in the [`Delivered`]; `crate::outcome` answers it.
    pub async fn submit(
        &self,
        unit: Vec<Reading>,
        timeout: Duration,
    ) -> Result<Delivered, SubmitError> {
        let work = async {
            let ticket = self
                .sink
                .enqueue(unit)
                .await
                .map_err(|_| SubmitError::Closed)?;
            ticket.await.map_err(|_| SubmitError::Closed)
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| SubmitError::Timeout(timeout))?
    }

    /// False while the sink's last attempt failed (for `/ready`).
    pub fn is_healthy(&self) -> bool {
        self.sink.is_healthy()
    }

    /// Stops intake, then waits up to `timeout` for the sink to flush what it holds.
    pub async fn close(&self, timeout: Duration) {
        self.sink.close();
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            let abort = task.abort_handle();
            if tokio::time::timeout(timeout, task).await.is_err() {
                tracing::warn!(
                    queued = self.sink.queued(),
                    "The sink did not drain in time; pending requests were answered 503."
                );
                abort.abort();
            }
        }
    }
}
