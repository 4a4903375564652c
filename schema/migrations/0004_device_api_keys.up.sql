-- 0004_device_api_keys: API keys for HTTP ingest. Only a SHA-256 digest of the
-- whole key is stored (never the key); prefix is the first characters shown
-- to operators to tell keys apart, e.g. "argus_3f9a1c2b".
CREATE TABLE IF NOT EXISTS device_api_keys (
  id           UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  device_id    UUID NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
  prefix       TEXT NOT NULL,
  key_digest   BYTEA NOT NULL
    CONSTRAINT device_api_keys_key_digest_key UNIQUE,
  created_at   TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  last_used_at TIMESTAMPTZ,
  expires_at   TIMESTAMPTZ,
  revoked_at   TIMESTAMPTZ
);

CREATE INDEX IF NOT EXISTS idx_device_api_keys_device ON device_api_keys(device_id);
