-- 0002_iot_foundation: the plan's W1-T1 §1.1, column for column.
--
-- Extends devices, assets, asset_types and device_types, and creates
-- telemetry_history, telemetry_raw, telemetry_chunks, telemetry_transactions
-- and threshold_rules with every index, partial index, GIN index and CHECK the
-- plan lists, plus the two entity_edges indexes. Every statement is
-- re-runnable (IF NOT EXISTS / OR REPLACE), unlike the plan's bare CREATE INDEX.
--
-- CHECK constraints, not enum types. The plan's SQL uses CHECK constraints
-- while its Drizzle example declares pgEnum types for the same columns
-- (entity_type, quality). We use text + CHECK everywhere, because:
-- * changing the allowed set is one transactional DROP/ADD CONSTRAINT; an enum
--   value can never be removed, and ALTER TYPE ... ADD VALUE cannot be used in
--   the same transaction that adds it, which breaks one-transaction migrations;
-- * down migrations stay exact: dropping a column drops its CHECK, there is no
--   separate type object to keep in step;
-- * the bridge writes telemetry_raw with binary COPY; text columns need no
--   per-database enum OID lookups in the encoder;
-- * the plan's own SQL already uses CHECK, so this matches the source of truth.
-- Constraint names are given explicitly and equal Postgres' default names
-- (<table>_<column>_check), so they are stable and easy to find.

-- 1. Extend devices
ALTER TABLE devices
  ADD COLUMN IF NOT EXISTS device_role TEXT DEFAULT 'endpoint'
    CONSTRAINT devices_device_role_check
    CHECK (device_role IN ('endpoint', 'gateway', 'gateway_chunked', 'rtu_multiport')),
  ADD COLUMN IF NOT EXISTS parent_device_id UUID REFERENCES devices(id) ON DELETE SET NULL,
  ADD COLUMN IF NOT EXISTS logical_identifier TEXT,
  ADD COLUMN IF NOT EXISTS last_seen_at TIMESTAMPTZ,
  ADD COLUMN IF NOT EXISTS network_metadata JSONB DEFAULT '{}',
  ADD COLUMN IF NOT EXISTS protocol TEXT DEFAULT 'mqtt';

CREATE INDEX IF NOT EXISTS idx_devices_role ON devices(device_role);
CREATE INDEX IF NOT EXISTS idx_devices_parent ON devices(parent_device_id);
CREATE INDEX IF NOT EXISTS idx_devices_last_seen ON devices(last_seen_at);

-- 2. Extend assets
ALTER TABLE assets
  ADD COLUMN IF NOT EXISTS health_score_updated_at TIMESTAMPTZ,
  ADD COLUMN IF NOT EXISTS health_score_computed_by TEXT,
  ADD COLUMN IF NOT EXISTS last_telemetry_at TIMESTAMPTZ;

CREATE INDEX IF NOT EXISTS idx_assets_health_updated ON assets(health_score_updated_at);
CREATE INDEX IF NOT EXISTS idx_assets_last_telemetry ON assets(last_telemetry_at);

-- 3. Extend asset_types for telemetry configuration
ALTER TABLE asset_types
  ADD COLUMN IF NOT EXISTS metric_definitions JSONB,
  ADD COLUMN IF NOT EXISTS transformation_engine JSONB,
  ADD COLUMN IF NOT EXISTS health_algorithm JSONB,
  ADD COLUMN IF NOT EXISTS threshold_rules JSONB,
  ADD COLUMN IF NOT EXISTS event_rules JSONB,
  ADD COLUMN IF NOT EXISTS aggregation_rules JSONB,
  ADD COLUMN IF NOT EXISTS validation_rules JSONB,
  ADD COLUMN IF NOT EXISTS telemetry_config_version TEXT DEFAULT '1.0.0',
  ADD COLUMN IF NOT EXISTS telemetry_config_updated_at TIMESTAMPTZ DEFAULT NOW(),
  ADD COLUMN IF NOT EXISTS telemetry_config_updated_by UUID REFERENCES users(id);

CREATE INDEX IF NOT EXISTS idx_asset_types_config_version
  ON asset_types(telemetry_config_version, telemetry_config_updated_at);

-- 4. Extend device_types for processing configuration
ALTER TABLE device_types
  ADD COLUMN IF NOT EXISTS processing_mode TEXT DEFAULT 'endpoint'
    CONSTRAINT device_types_processing_mode_check
    CHECK (processing_mode IN ('endpoint', 'gateway', 'gateway_chunked', 'rtu_multiport')),
  ADD COLUMN IF NOT EXISTS protocol_adapter TEXT DEFAULT 'json',
  ADD COLUMN IF NOT EXISTS message_schema JSONB,
  ADD COLUMN IF NOT EXISTS extraction_rules JSONB,
  ADD COLUMN IF NOT EXISTS demux_strategy JSONB,
  ADD COLUMN IF NOT EXISTS chunking_config JSONB,
  ADD COLUMN IF NOT EXISTS transformation_rules JSONB;

-- 5. telemetry_history
CREATE TABLE IF NOT EXISTS telemetry_history (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  tenant_id UUID NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,

  -- Entity reference (Device or Asset)
  entity_id UUID NOT NULL,
  entity_type TEXT NOT NULL
    CONSTRAINT telemetry_history_entity_type_check CHECK (entity_type IN ('Device', 'Asset')),

  -- Metric data
  metric_key TEXT NOT NULL,
  value NUMERIC,
  value_text TEXT,
  value_json JSONB,
  unit TEXT,

  -- Quality
  quality TEXT DEFAULT 'good'
    CONSTRAINT telemetry_history_quality_check CHECK (quality IN ('good', 'uncertain', 'bad')),

  -- Timestamps
  timestamp TIMESTAMPTZ NOT NULL,
  received_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),

  -- Source tracking
  source_device_id UUID REFERENCES devices(id) ON DELETE SET NULL,
  source_message_id TEXT,

  -- Metadata
  metadata JSONB DEFAULT '{}',

  created_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

CREATE INDEX IF NOT EXISTS idx_telemetry_entity ON telemetry_history(entity_id, entity_type, timestamp DESC);
CREATE INDEX IF NOT EXISTS idx_telemetry_tenant ON telemetry_history(tenant_id, timestamp DESC);
CREATE INDEX IF NOT EXISTS idx_telemetry_metric_key ON telemetry_history(metric_key);
CREATE INDEX IF NOT EXISTS idx_telemetry_timestamp ON telemetry_history(timestamp DESC);
CREATE INDEX IF NOT EXISTS idx_telemetry_quality ON telemetry_history(quality) WHERE quality != 'good';
CREATE INDEX IF NOT EXISTS idx_telemetry_metadata ON telemetry_history USING GIN(metadata);

-- 6. telemetry_raw: immutable, append-only. id = the message id (see the
-- bridge's message_id::derive), so a redelivered message hits the primary key
-- and is detected as a duplicate instead of being stored twice.
CREATE TABLE IF NOT EXISTS telemetry_raw (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  tenant_id UUID NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,

  device_id UUID NOT NULL REFERENCES devices(id) ON DELETE CASCADE,

  -- Raw payload
  payload JSONB NOT NULL,
  payload_size_bytes INTEGER,

  -- Message metadata
  correlation_id TEXT,
  sequence_number INTEGER,
  total_chunks INTEGER,

  -- Timestamps
  device_timestamp TIMESTAMPTZ,
  received_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),

  -- Source tracking
  ingestion_source TEXT DEFAULT 'mqtt'
    CONSTRAINT telemetry_raw_ingestion_source_check CHECK (ingestion_source IN ('mqtt', 'http', 'bridge')),
  mqtt_topic TEXT,
  client_id TEXT,

  created_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

CREATE INDEX IF NOT EXISTS idx_telemetry_raw_device ON telemetry_raw(device_id, received_at DESC);
CREATE INDEX IF NOT EXISTS idx_telemetry_raw_tenant ON telemetry_raw(tenant_id, received_at DESC);
CREATE INDEX IF NOT EXISTS idx_telemetry_raw_correlation ON telemetry_raw(correlation_id)
  WHERE correlation_id IS NOT NULL;

-- The database itself enforces immutability. Row-level triggers for UPDATE
-- and DELETE (so a cascade from deleting a device or tenant that never sent
-- telemetry still works, while one that did is refused), and a statement-level
-- trigger for TRUNCATE, which fires no row triggers. INSERT ... ON CONFLICT
-- DO NOTHING (the idempotent write path) fires neither.
CREATE OR REPLACE FUNCTION telemetry_raw_reject_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'telemetry_raw is append-only: % is not allowed', TG_OP
    USING ERRCODE = 'restrict_violation',
          HINT = 'Raw telemetry is immutable; insert corrected data as new rows.';
END;
$$;

CREATE OR REPLACE TRIGGER telemetry_raw_no_update_delete
  BEFORE UPDATE OR DELETE ON telemetry_raw
  FOR EACH ROW EXECUTE FUNCTION telemetry_raw_reject_change();

CREATE OR REPLACE TRIGGER telemetry_raw_no_truncate
  BEFORE TRUNCATE ON telemetry_raw
  FOR EACH STATEMENT EXECUTE FUNCTION telemetry_raw_reject_change();

-- 7. telemetry_chunks (chunked gateway messages)
CREATE TABLE IF NOT EXISTS telemetry_chunks (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  tenant_id UUID NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,

  device_id UUID NOT NULL REFERENCES devices(id) ON DELETE CASCADE,

  correlation_id TEXT NOT NULL,
  sequence_number INTEGER NOT NULL,
  total_chunks INTEGER NOT NULL,

  chunk_payload JSONB NOT NULL,

  received_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  expires_at TIMESTAMPTZ NOT NULL DEFAULT (NOW() + INTERVAL '60 seconds'),

  CONSTRAINT telemetry_chunks_correlation_id_sequence_number_key UNIQUE (correlation_id, sequence_number)
);

CREATE INDEX IF NOT EXISTS idx_telemetry_chunks_correlation ON telemetry_chunks(correlation_id);
CREATE INDEX IF NOT EXISTS idx_telemetry_chunks_expires ON telemetry_chunks(expires_at);

-- 8. telemetry_transactions (atomic processing of gateway messages)
CREATE TABLE IF NOT EXISTS telemetry_transactions (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  tenant_id UUID NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,

  correlation_id TEXT NOT NULL
    CONSTRAINT telemetry_transactions_correlation_id_key UNIQUE,
  gateway_device_id UUID NOT NULL REFERENCES devices(id) ON DELETE CASCADE,

  total_logical_devices INTEGER NOT NULL,
  processed_devices INTEGER DEFAULT 0,

  status TEXT DEFAULT 'pending'
    CONSTRAINT telemetry_transactions_status_check
    CHECK (status IN ('pending', 'processing', 'completed', 'failed')),

  started_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  completed_at TIMESTAMPTZ,

  error_message TEXT,

  metadata JSONB DEFAULT '{}'
);

CREATE INDEX IF NOT EXISTS idx_telemetry_tx_correlation ON telemetry_transactions(correlation_id);
CREATE INDEX IF NOT EXISTS idx_telemetry_tx_status ON telemetry_transactions(status);

-- 9. threshold_rules
CREATE TABLE IF NOT EXISTS threshold_rules (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  tenant_id UUID NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,

  name TEXT NOT NULL,
  description TEXT,

  -- Scope
  asset_type_id UUID REFERENCES asset_types(id) ON DELETE CASCADE,
  specific_asset_ids UUID[], -- if null, applies to all assets of the type

  -- Rule definition
  metric_key TEXT NOT NULL,
  condition JSONB NOT NULL, -- JSONata expression

  -- Thresholds
  warning_threshold NUMERIC,
  critical_threshold NUMERIC,

  -- Behaviour
  hysteresis NUMERIC DEFAULT 0,
  debounce_seconds INTEGER DEFAULT 60,
  cooldown_seconds INTEGER DEFAULT 300,

  -- Event generation
  event_type TEXT NOT NULL,
  event_severity TEXT NOT NULL
    CONSTRAINT threshold_rules_event_severity_check CHECK (event_severity IN ('info', 'warning', 'critical')),
  event_priority INTEGER DEFAULT 3,
  message_template TEXT,

  -- Status
  is_active BOOLEAN DEFAULT true,

  -- Metadata
  created_by UUID REFERENCES users(id) ON DELETE SET NULL,
  created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

CREATE INDEX IF NOT EXISTS idx_threshold_rules_tenant ON threshold_rules(tenant_id);
CREATE INDEX IF NOT EXISTS idx_threshold_rules_asset_type ON threshold_rules(asset_type_id);
CREATE INDEX IF NOT EXISTS idx_threshold_rules_active ON threshold_rules(is_active) WHERE is_active = true;

-- 10. entity_edges indexes for device -> asset links
CREATE INDEX IF NOT EXISTS idx_entity_edges_device_asset
  ON entity_edges(source_entity_id, target_entity_id)
  WHERE source_entity_type = 'Device' AND target_entity_type = 'Asset';

CREATE INDEX IF NOT EXISTS idx_entity_edges_relationship
  ON entity_edges(relationship_type, valid_from, valid_until);
