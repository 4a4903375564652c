//! Device API keys: format, generation and digest.
//!
//! A key reads `argus_<prefix>_<secret>`:
//! - `prefix`: 8 lowercase hex characters (32 random bits), shown to operators so they can
//!   tell keys apart (`argus_3f9a1c2b`) without ever seeing a secret;
//! - `secret`: 32 random bytes (256 bits) from the OS CSPRNG, base64url without padding
//!   (43 characters).
//!
//! Only the SHA-256 digest of the whole key string is stored (`device_api_keys.key_digest`);
//! a presented key is parsed strictly, hashed, and looked up by digest through the registry
//! (hash map, Redis key, Postgres unique index). No secret is ever compared byte by byte:
//! the digest of a random 256-bit secret is itself unguessable, so the timing of a look-up
//! by digest tells an attacker nothing useful. (The admin token, which is compared, uses
//! a constant-time comparison; see [`crate::admin`].)
//!
//! `ApiKey` never prints its secret (`Debug` shows the prefix only).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand::TryRngCore as _;

/// Literal start of every key.
pub const KEY_SCHEME: &str = "argus_";
/// Hex characters of the operator-visible prefix id.
const PREFIX_HEX_LEN: usize = 8;
/// Random bytes in the secret part (256 bits).
const SECRET_BYTES: usize = 32;
/// base64url (no padding) length of [`SECRET_BYTES`].
const SECRET_LEN: usize = 43;
/// Full length of a well-formed key: `argus_` + 8 + `_` + 43.
pub const KEY_LEN: usize = KEY_SCHEME.len() + PREFIX_HEX_LEN + 1 + SECRET_LEN;

/// SHA-256 of a whole key string; what `device_api_keys.key_digest` stores.
pub type KeyDigest = [u8; 32];

/// A freshly generated key. The only place a full key exists is the response to
/// the admin request that created it.
pub struct ApiKey {
    key: String,
}

impl ApiKey {
    /// Generates a new key from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, rand::rand_core::OsError> {
        let mut rng = rand::rngs::OsRng;
        let mut prefix = [0u8; PREFIX_HEX_LEN / 2];
        let mut secret = [0u8; SECRET_BYTES];
        rng.try_fill_bytes(&mut prefix)?;
        rng.try_fill_bytes(&mut secret)?;
        let key = format!(
            "{KEY_SCHEME}{}_{}",
            hex::encode(prefix),
            URL_SAFE_NO_PAD.encode(secret)
        );
        Ok(Self { key })
    }

    /// The whole key, to hand to the operator exactly once.
    pub fn expose(&self) -> &str {
        &self.key
    }

    /// `argus_<8 hex>`: safe to store, list and log.
    pub fn prefix(&self) -> &str {
        &self.key[..KEY_SCHEME.len() + PREFIX_HEX_LEN]
    }

    pub fn digest(&self) -> KeyDigest {
        digest(&self.key)
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKey({}_..)", self.prefix())
    }
}

/// SHA-256 of a key string.
pub fn digest(key: &str) -> KeyDigest {
    argus_pipeline::digest::sha256(key.as_bytes())
}

/// Checks the shape of a presented key (`argus_<8 lowercase hex>_<43 base64url>`)
/// and returns its digest. A malformed key is refused before any look-up.
pub fn parse_presented(key: &str) -> Option<KeyDigest> {
    if key.len() != KEY_LEN || !key.starts_with(KEY_SCHEME) {
        return None;
    }
    let rest = &key.as_bytes()[KEY_SCHEME.len()..];
    let (prefix, rest) = rest.split_at(PREFIX_HEX_LEN);
    let prefix_ok = prefix
        .iter()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b));
    let secret_ok = rest.first() == Some(&b'_')
        && rest[1..]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_');
    (prefix_ok && secret_ok).then(|| digest(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_have_the_documented_shape_and_parse() {
        let key = ApiKey::generate().unwrap();
        let s = key.expose();
        assert_eq!(s.len(), KEY_LEN);
        assert!(s.starts_with("argus_"));
        assert_eq!(key.prefix().len(), 14);
        assert!(s.starts_with(key.prefix()));
        assert_eq!(parse_presented(s), Some(key.digest()));
        assert!(!format!("{key:?}").contains(&s[15..]));
    }

    #[test]
    fn keys_are_distinct() {
        let a = ApiKey::generate().unwrap();
        let b = ApiKey::generate().unwrap();
        assert_ne!(a.expose(), b.expose());
        assert_ne!(a.prefix(), b.prefix());
    }

    #[test]
    fn malformed_keys_are_refused() {
        let key = ApiKey::generate().unwrap();
        let s = key.expose();
        assert_eq!(parse_presented(""), None);
        assert_eq!(parse_presented(&s[..s.len() - 1]), None);
        assert_eq!(parse_presented(&format!("{s}x")), None);
        assert_eq!(parse_presented(&s.replacen("argus_", "argos_", 1)), None);
        assert_eq!(parse_presented(&s.to_uppercase()), None);
        let mut bad = s.to_string();
        bad.replace_range(20..21, "!");
        assert_eq!(parse_presented(&bad), None);
    }
}
