//! Who is calling: `X-API-Key` → key row → device, with the pre-auth protection in
//! front of the look-up.
//!
//! A well-formed random key would otherwise cost a Redis GET, a Postgres SELECT and a
//! Redis SET each, and its "absent" entry would take a place in the registry's
//! in-process cache. So a presented key reaches the registry
//! ([`argus_pipeline::registry`]) only once this process knows that it exists:
//! 1. malformed → 403, no I/O;
//! 2. known to exist here ([`crate::preauth::KeyGate`]'s `known` set) → the registry, free of charge;
//! 3. known absent here (`absent`, short-lived, its own bounded set) → 403, no I/O;
//! 4. otherwise the per-client-address limiter (`--preauth-rate-per-address`) takes
//!    a cell (429 with `Retry-After` when empty), then one `SELECT 1` by digest on the
//!    look-up pool: absent → `absent`, 403; present → `known`, then the registry.
//!
//! Unknown keys are therefore never written to Redis and never enter the registry's
//! cache, so they cannot evict the entries of real keys; the sink writes through a
//! pool of its own (`--sink-pg-pool-size`), so look-ups cannot starve it. The client
//! address is the TCP peer's (behind a proxy, the proxy's: size the rate for it).

use std::net::{IpAddr, Ipv4Addr};

use axum::http::{HeaderMap, StatusCode};
use chrono::Utc;
use uuid::Uuid;

use crate::apikey::{self, KeyDigest};
use crate::error::ApiError;
use crate::metrics::{reject, Rejection};
use crate::ratelimit::retry_after_secs;
use crate::state::AppState;

/// The API key header.
pub const API_KEY_HEADER: &str = "x-api-key";

/// The authenticated caller: the key's id and its device.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub key_id: Uuid,
    pub device_id: Uuid,
    pub tenant_id: Uuid,
}

fn invalid_key() -> ApiError {
    // One message for every kind of bad key: the caller learns nothing about which keys exist.
    reject(
        Rejection::InvalidKey,
        ApiError::forbidden("The API key is not valid for this request."),
    )
}

fn unavailable(what: &str, error: &dyn std::fmt::Display) -> ApiError {
    tracing::warn!(%error, "{what} look-up failed.");
    reject(Rejection::Unavailable, ApiError::unavailable())
}

/// Whether a key with `digest` exists (one indexed `SELECT 1` on the look-up pool).
async fn key_exists(state: &AppState, digest: &KeyDigest) -> Result<bool, ApiError> {
    let client = state
        .pool()
        .get()
        .await
        .map_err(|e| unavailable("API key", &e))?;
    let stmt = client
        .prepare_cached("SELECT 1 FROM device_api_keys WHERE key_digest = $1")
        .await
        .map_err(|e| unavailable("API key", &e))?;
    let row = client
        .query_opt(&stmt, &[&&digest[..]])
        .await
        .map_err(|e| unavailable("API key", &e))?;
    Ok(row.is_some())
}

/// Passes a digest on to the registry only once it is known to exist (see the module doc).
async fn gate(state: &AppState, digest: &KeyDigest, peer: Option<IpAddr>) -> Result<(), ApiError> {
    let gate = state.key_gate();
    if gate.is_known(digest) {
        return Ok(());
    }
    if gate.is_absent(digest) {
        return Err(invalid_key());
    }
    // Without a peer address (a server not started by `crate::serve`) every caller
    // shares one bucket: stricter, never looser.
    let address = peer.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    if let Err(wait) = gate.check_address(address) {
        return Err(reject(
            Rejection::PreauthRateLimited,
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "Too many API-key look-ups from this address; slow down.",
            )
            .with_retry_after(retry_after_secs(wait)),
        ));
    }
    if key_exists(state, digest).await? {
        gate.mark_known(digest);
        Ok(())
    } else {
        gate.mark_absent(digest);
        Err(invalid_key())
    }
}

/// Authenticates a request by its `X-API-Key`; `peer` is the client's address.
pub async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    peer: Option<IpAddr>,
) -> Result<Caller, ApiError> {
    let Some(value) = headers.get(API_KEY_HEADER) else {
        return Err(reject(
            Rejection::MissingKey,
            ApiError::unauthorized("An X-API-Key header is required."),
        ));
    };
    let presented = value.to_str().map_err(|_| invalid_key())?.trim();
    let digest = apikey::parse_presented(presented).ok_or_else(invalid_key)?;
    gate(state, &digest, peer).await?;
    let info = match state.registry().api_key(&digest).await {
        Ok(Some(info)) => info,
        Ok(None) => return Err(invalid_key()),
        Err(e) => return Err(unavailable("API key", &e)),
    };
    if !info.is_valid_at(Utc::now()) {
        return Err(invalid_key());
    }
    let device = match state.registry().device(info.device_id).await {
        Ok(Some(device)) => device,
        Ok(None) => return Err(invalid_key()),
        Err(e) => return Err(unavailable("Device", &e)),
    };
    if !device.is_active() {
        return Err(reject(
            Rejection::DeviceNotActive,
            ApiError::forbidden("The device is not active."),
        ));
    }
    Ok(Caller {
        key_id: info.key_id,
        device_id: device.device_id,
        tenant_id: device.tenant_id,
    })
}
