-- 0005_telemetry_content_digest: the SHA-256 of each reading's payload bytes, as the
-- sink received them (pipeline/src/sink/copy.rs writes it with every row). A
-- redelivered reading carries the same digest and is a duplicate; a reading that
-- reuses a stored id with another digest is an id conflict and goes to the
-- dead-letter stream (docs/pipeline.md, "One id, one content").
--
-- Nullable: rows stored before this migration have none (the sink compares their
-- payload as jsonb instead). The CHECK is added NOT VALID so that adding it does
-- not scan a large table under an ACCESS EXCLUSIVE lock; every existing row is
-- NULL, which the CHECK allows anyway, and every new row is checked.
ALTER TABLE telemetry_raw ADD COLUMN IF NOT EXISTS content_sha256 BYTEA;
ALTER TABLE telemetry_raw DROP CONSTRAINT IF EXISTS telemetry_raw_content_sha256_check;
ALTER TABLE telemetry_raw ADD CONSTRAINT telemetry_raw_content_sha256_check
  CHECK (octet_length(content_sha256) = 32) NOT VALID;
