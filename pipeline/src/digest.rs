//! SHA-256, as every Argus binary computes it: the message id
//! ([`crate::message_id`]), the content digest (`telemetry_raw.content_sha256`), API-key
//! and dead-letter digests.
//!
//! It is ring's, the TLS provider the binaries link anyway: its assembly uses the CPU's
//! SHA extensions (or AVX2), and it is the largest single cost per message otherwise
//! (`docs/benchmarks.md`, "Instructions per message").

pub use ring::digest::Context;
use ring::digest::SHA256;

/// A new incremental SHA-256.
pub fn sha256_context() -> Context {
    Context::new(&SHA256)
}

/// The SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut h = sha256_context();
    h.update(data);
    finish(h)
}

/// The digest of `h`, as the 32 bytes it is.
pub fn finish(h: Context) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(h.finish().as_ref());
    out
}
