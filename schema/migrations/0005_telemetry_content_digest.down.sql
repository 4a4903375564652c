-- 0005_telemetry_content_digest (down). Dropping the column drops its CHECK.
ALTER TABLE telemetry_raw DROP COLUMN IF EXISTS content_sha256;
