-- 0007_service_roles: least privilege. One login role per kind of process, each
-- granted exactly what that process's queries need (docs/schema.md, "Roles"):
--
-- - argus_ingest: the bridge, argus-dlq, and the HTTP sidecar's ingest path. Reads
--   the registry (devices, device_types, API key look-ups), stamps last_used_at on
--   API keys, and writes telemetry_raw with COPY / INSERT through a temporary
--   staging table.
-- - argus_admin: the sidecar's admin routes (API keys, device certificates).
-- - argus_reader: SELECT for operators, the load tester's counts and dashboards.
--
-- None of them owns a table, so none can ALTER (or DISABLE TRIGGER on)
-- telemetry_raw, and none is granted UPDATE, DELETE or TRUNCATE on it. The owner,
-- the role that runs these migrations, is whoever connects with the owner URL; a
-- migration cannot create the role it runs as.
--
-- Roles belong to the cluster, grants to one database, and many databases (one per
-- test) may run this migration at the same time. So each role is created only if
-- it is missing, and losing the race to a concurrent CREATE ROLE (duplicate_object
-- 42710, or unique_violation 23505 on pg_authid) counts as created; and if another
-- database's rollback drops a role between its creation and a grant
-- (undefined_object 42704), the whole step is tried again. Passwords are not set here: `argus-schema passwords` sets them (docs/runbook.md).
DO $$
DECLARE
  r TEXT;
  attempt INT := 0;
  owner_oid OID := (SELECT relowner FROM pg_class WHERE oid = 'telemetry_raw'::regclass);
BEGIN
  -- A GRANT by a non-owner grants nothing and only warns: refuse instead.
  IF NOT pg_has_role(current_user, owner_oid, 'USAGE') THEN
    RAISE EXCEPTION 'migration 0007 must run as the owner of the tables (%), not as %',
      pg_get_userbyid(owner_oid), current_user
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  LOOP
    attempt := attempt + 1;
    BEGIN
      FOREACH r IN ARRAY ARRAY['argus_ingest', 'argus_admin', 'argus_reader'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
          BEGIN
            EXECUTE format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE '
                           'NOREPLICATION NOBYPASSRLS', r);
          EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
          END;
        END IF;
      END LOOP;

      EXECUTE format('GRANT CONNECT ON DATABASE %I TO argus_ingest, argus_admin, argus_reader',
                     current_database());
      -- The sink stages each batch in a temporary table (pipeline/src/sink/store.rs).
      EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO argus_ingest', current_database());
      GRANT USAGE ON SCHEMA public TO argus_ingest, argus_admin, argus_reader;

      -- argus_ingest
      GRANT SELECT, INSERT ON telemetry_raw TO argus_ingest;
      GRANT SELECT ON devices, device_types TO argus_ingest;
      GRANT SELECT ON device_api_keys TO argus_ingest;
      GRANT UPDATE (last_used_at) ON device_api_keys TO argus_ingest;

      -- argus_admin
      GRANT SELECT ON devices TO argus_admin;
      GRANT UPDATE (network_metadata, updated_at) ON devices TO argus_admin;
      GRANT SELECT, INSERT ON device_api_keys TO argus_admin;
      GRANT UPDATE (revoked_at) ON device_api_keys TO argus_admin;
      GRANT SELECT, INSERT ON device_certificates TO argus_admin;
      GRANT UPDATE (revoked_at, revocation_reason) ON device_certificates TO argus_admin;

      -- argus_reader: every table, but not the API keys' digests.
      GRANT SELECT ON organizations, users, device_types, devices, asset_types, assets,
        entity_edges, telemetry_history, telemetry_raw, telemetry_chunks,
        telemetry_transactions, threshold_rules, device_certificates, schema_migrations
        TO argus_reader;
      GRANT SELECT (id, device_id, prefix, created_at, last_used_at, expires_at, revoked_at)
        ON device_api_keys TO argus_reader;
      EXIT;
    EXCEPTION WHEN undefined_object THEN
      IF attempt >= 5 THEN
        RAISE;
      END IF;
    END;
  END LOOP;
END
$$;
