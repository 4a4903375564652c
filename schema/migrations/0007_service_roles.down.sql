-- 0007_service_roles (down): takes back this database's grants, then drops each role
-- that nothing else needs. Roles are shared by every database of the cluster: a role
-- still granted something in another database (dependent_objects_still_exist 2BP01)
-- stays, and so does one another migration drops at the same moment.
DO $$
DECLARE
  r TEXT;
BEGIN
  FOREACH r IN ARRAY ARRAY['argus_ingest', 'argus_admin', 'argus_reader'] LOOP
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
      EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA public FROM %I', r);
      EXECUTE format('REVOKE ALL ON SCHEMA public FROM %I', r);
      EXECUTE format('REVOKE ALL ON DATABASE %I FROM %I', current_database(), r);
      BEGIN
        EXECUTE format('DROP ROLE %I', r);
      EXCEPTION WHEN dependent_objects_still_exist OR undefined_object THEN
        NULL;
      END;
    END IF;
  END LOOP;
END
$$;
