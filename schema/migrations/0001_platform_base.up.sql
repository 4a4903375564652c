-- 0001_platform_base: the platform tables the IoT foundation (0002) extends.
--
-- This product starts from an empty database, so these are the minimal, real
-- versions of the tables the plan assumes already exist: organizations (the
-- tenants), users, device_types, devices, asset_types, assets and entity_edges
-- (the typed graph that links devices to assets).
--
-- Conventions (kept by every later migration):
-- * uuid primary keys with gen_random_uuid() defaults (built into Postgres 13+,
--   no extension needed);
-- * every tenant-owned row has tenant_id -> organizations(id) ON DELETE CASCADE;
-- * closed sets of values are text columns with CHECK constraints, not enum
--   types (see the header of 0002 for why);
-- * timestamps are timestamptz, NOT NULL DEFAULT now() where always known.

CREATE TABLE IF NOT EXISTS organizations (
  id         UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  name       TEXT NOT NULL,
  slug       TEXT NOT NULL UNIQUE,
  status     TEXT NOT NULL DEFAULT 'active'
    CONSTRAINT organizations_status_check CHECK (status IN ('active', 'suspended', 'deleted')),
  created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

CREATE TABLE IF NOT EXISTS users (
  id           UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  tenant_id    UUID NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
  email        TEXT NOT NULL,
  display_name TEXT,
  status       TEXT NOT NULL DEFAULT 'active'
    CONSTRAINT users_status_check CHECK (status IN ('active', 'disabled')),
  created_at   TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  updated_at   TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  CONSTRAINT users_tenant_email_key UNIQUE (tenant_id, email)
);

CREATE TABLE IF NOT EXISTS device_types (
  id          UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  tenant_id   UUID NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
  name        TEXT NOT NULL,
  description TEXT,
  created_at  TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  updated_at  TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
CREATE INDEX IF NOT EXISTS idx_device_types_tenant ON device_types(tenant_id);

-- Only status = 'active' devices may send telemetry (the bridge and the HTTP
-- sidecar check it when they resolve a device).
CREATE TABLE IF NOT EXISTS devices (
  id             UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  tenant_id      UUID NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
  device_type_id UUID REFERENCES device_types(id),
  name           TEXT NOT NULL,
  status         TEXT NOT NULL DEFAULT 'active'
    CONSTRAINT devices_status_check CHECK (status IN ('active', 'disabled', 'decommissioned')),
  created_at     TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  updated_at     TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
CREATE INDEX IF NOT EXISTS idx_devices_tenant ON devices(tenant_id);
CREATE INDEX IF NOT EXISTS idx_devices_device_type ON devices(device_type_id);

CREATE TABLE IF NOT EXISTS asset_types (
  id          UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  tenant_id   UUID NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
  name        TEXT NOT NULL,
  description TEXT,
  created_at  TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  updated_at  TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
CREATE INDEX IF NOT EXISTS idx_asset_types_tenant ON asset_types(tenant_id);

-- health_score is here because 0002 adds health_score_updated_at and
-- health_score_computed_by next to it.
CREATE TABLE IF NOT EXISTS assets (
  id            UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  tenant_id     UUID NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
  asset_type_id UUID REFERENCES asset_types(id),
  name          TEXT NOT NULL,
  status        TEXT NOT NULL DEFAULT 'active'
    CONSTRAINT assets_status_check CHECK (status IN ('active', 'inactive', 'decommissioned')),
  health_score  NUMERIC
    CONSTRAINT assets_health_score_check CHECK (health_score >= 0 AND health_score <= 100),
  created_at    TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  updated_at    TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
CREATE INDEX IF NOT EXISTS idx_assets_tenant ON assets(tenant_id);
CREATE INDEX IF NOT EXISTS idx_assets_asset_type ON assets(asset_type_id);

-- A typed, time-bounded edge between two entities. The entity ids are not
-- foreign keys because an edge may point at any entity table; the types say
-- which. A device -> asset link is (source 'Device', target 'Asset').
CREATE TABLE IF NOT EXISTS entity_edges (
  id                 UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  tenant_id          UUID NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
  source_entity_id   UUID NOT NULL,
  source_entity_type TEXT NOT NULL
    CONSTRAINT entity_edges_source_entity_type_check CHECK (source_entity_type IN ('Device', 'Asset')),
  target_entity_id   UUID NOT NULL,
  target_entity_type TEXT NOT NULL
    CONSTRAINT entity_edges_target_entity_type_check CHECK (target_entity_type IN ('Device', 'Asset')),
  relationship_type  TEXT NOT NULL,
  valid_from         TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  valid_until        TIMESTAMPTZ,
  metadata           JSONB NOT NULL DEFAULT '{}',
  created_at         TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  CONSTRAINT entity_edges_valid_range_check CHECK (valid_until IS NULL OR valid_until > valid_from)
);
CREATE INDEX IF NOT EXISTS idx_entity_edges_tenant ON entity_edges(tenant_id);
CREATE INDEX IF NOT EXISTS idx_entity_edges_target ON entity_edges(target_entity_id, target_entity_type);
