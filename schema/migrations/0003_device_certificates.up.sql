-- 0003_device_certificates: the client certificates issued to devices (mTLS).
-- serial_number is lowercase hex without separators, as argus-pki writes it,
-- so look-ups by serial (revocation, audit) are exact string matches.
CREATE TABLE IF NOT EXISTS device_certificates (
  id                 UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  device_id          UUID NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
  serial_number      TEXT NOT NULL
    CONSTRAINT device_certificates_serial_number_key UNIQUE,
  fingerprint_sha256 TEXT NOT NULL,
  not_before         TIMESTAMPTZ NOT NULL,
  not_after          TIMESTAMPTZ NOT NULL,
  revoked_at         TIMESTAMPTZ,
  revocation_reason  TEXT,
  created_at         TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

CREATE INDEX IF NOT EXISTS idx_device_certificates_device ON device_certificates(device_id);
