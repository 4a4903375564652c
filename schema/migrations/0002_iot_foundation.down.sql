-- 0002_iot_foundation (down): back to exactly the state after 0001.
-- Indexes on added columns and the CHECK/FK constraints of added columns go
-- with their columns; they are dropped explicitly anyway so this file reads
-- as the mirror of the up file.

-- 10. entity_edges indexes
DROP INDEX IF EXISTS idx_entity_edges_relationship;
DROP INDEX IF EXISTS idx_entity_edges_device_asset;

-- 9..5. new tables (their indexes, constraints and triggers go with them)
DROP TABLE IF EXISTS threshold_rules;
DROP TABLE IF EXISTS telemetry_transactions;
DROP TABLE IF EXISTS telemetry_chunks;
DROP TABLE IF EXISTS telemetry_raw;
DROP FUNCTION IF EXISTS telemetry_raw_reject_change();
DROP TABLE IF EXISTS telemetry_history;

-- 4. device_types
ALTER TABLE device_types
  DROP COLUMN IF EXISTS transformation_rules,
  DROP COLUMN IF EXISTS chunking_config,
  DROP COLUMN IF EXISTS demux_strategy,
  DROP COLUMN IF EXISTS extraction_rules,
  DROP COLUMN IF EXISTS message_schema,
  DROP COLUMN IF EXISTS protocol_adapter,
  DROP COLUMN IF EXISTS processing_mode;

-- 3. asset_types
DROP INDEX IF EXISTS idx_asset_types_config_version;
ALTER TABLE asset_types
  DROP COLUMN IF EXISTS telemetry_config_updated_by,
  DROP COLUMN IF EXISTS telemetry_config_updated_at,
  DROP COLUMN IF EXISTS telemetry_config_version,
  DROP COLUMN IF EXISTS validation_rules,
  DROP COLUMN IF EXISTS aggregation_rules,
  DROP COLUMN IF EXISTS event_rules,
  DROP COLUMN IF EXISTS threshold_rules,
  DROP COLUMN IF EXISTS health_algorithm,
  DROP COLUMN IF EXISTS transformation_engine,
  DROP COLUMN IF EXISTS metric_definitions;

-- 2. assets
DROP INDEX IF EXISTS idx_assets_last_telemetry;
DROP INDEX IF EXISTS idx_assets_health_updated;
ALTER TABLE assets
  DROP COLUMN IF EXISTS last_telemetry_at,
  DROP COLUMN IF EXISTS health_score_computed_by,
  DROP COLUMN IF EXISTS health_score_updated_at;

-- 1. devices
DROP INDEX IF EXISTS idx_devices_last_seen;
DROP INDEX IF EXISTS idx_devices_parent;
DROP INDEX IF EXISTS idx_devices_role;
ALTER TABLE devices
  DROP COLUMN IF EXISTS protocol,
  DROP COLUMN IF EXISTS network_metadata,
  DROP COLUMN IF EXISTS last_seen_at,
  DROP COLUMN IF EXISTS logical_identifier,
  DROP COLUMN IF EXISTS parent_device_id,
  DROP COLUMN IF EXISTS device_role;
