//! Bounds on what the ingest endpoint holds at once: requests in flight and
//! request-body bytes in flight. Both are try-acquired, never waited for: a request
//! that does not fit answers 503 with `Retry-After` at once, so a burst cannot queue
//! without bound in front of the sink (whose own queue is bounded too).
//!
//! - A request slot is taken first thing and held until the answer
//!   (`--max-in-flight-requests`).
//! - Body bytes are taken before the body is read, at its `Content-Length` (or at
//!   `--body-limit` for a body without one), and held until the answer
//!   (`--max-in-flight-bytes`); the readings stay in memory until they are durable.

use std::sync::Arc;

use axum::http::StatusCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;
use crate::metrics::{self as m, Rejection};

/// Seconds a shed client is told to wait: in-flight requests end within the
/// durability timeout, usually within milliseconds.
const RETRY_AFTER_SECS: u64 = 1;

/// The two budgets (shared by every request).
#[derive(Debug)]
pub struct Admission {
    requests: Arc<Semaphore>,
    max_requests: usize,
    bytes: Arc<Semaphore>,
    max_bytes: usize,
}

/// What one admitted request holds until it is answered.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

/// Body bytes one request holds until it is answered.
#[derive(Debug)]
pub struct BodyBytes {
    _permit: OwnedSemaphorePermit,
}

fn overloaded(what: &str) -> ApiError {
    m::rejected(Rejection::Overloaded);
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        format!("The sidecar holds as many {what} as it may; retry later."),
    )
    .with_retry_after(RETRY_AFTER_SECS)
}

impl Admission {
    /// `max_bytes` is clamped to what a semaphore can count.
    pub fn new(max_requests: usize, max_bytes: usize) -> Admission {
        let max_bytes = max_bytes.min(Semaphore::MAX_PERMITS);
        Admission {
            requests: Arc::new(Semaphore::new(max_requests)),
            max_requests,
            bytes: Arc::new(Semaphore::new(max_bytes)),
            max_bytes,
        }
    }

    /// A request slot, or 503 `overloaded` when all are taken.
    pub fn try_request(&self) -> Result<Slot, ApiError> {
        let permit = self
            .requests
            .clone()
            .try_acquire_owned()
            .map_err(|_| overloaded("requests"))?;
        Ok(Slot { _permit: permit })
    }

    /// `n` body bytes (the caller caps `n` at the body limit, which config keeps within
    /// `u32` and within the budget), or 503 `overloaded` when they do not fit now.
    pub fn try_bytes(&self, n: u32) -> Result<BodyBytes, ApiError> {
        let permit = self
            .bytes
            .clone()
            .try_acquire_many_owned(n.max(1))
            .map_err(|_| overloaded("request bytes"))?;
        Ok(BodyBytes { _permit: permit })
    }

    /// Requests holding a slot now.
    pub fn requests_in_flight(&self) -> usize {
        self.max_requests - self.requests.available_permits()
    }

    /// Body bytes held now.
    pub fn bytes_in_flight(&self) -> usize {
        self.max_bytes - self.bytes.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_refuse_past_their_size_and_recover() {
        let a = Admission::new(1, 100);
        let slot = a.try_request().unwrap();
        let e = a.try_request().unwrap_err();
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.retry_after, Some(RETRY_AFTER_SECS));
        drop(slot);
        assert!(a.try_request().is_ok());

        let held = a.try_bytes(60).unwrap();
        assert_eq!(a.bytes_in_flight(), 60);
        assert!(a.try_bytes(41).is_err());
        let small = a.try_bytes(40).unwrap();
        drop((held, small));
        assert_eq!(a.bytes_in_flight(), 0);
        assert!(a.try_bytes(100).is_ok());
    }
}
