-- 0001_platform_base (down): back to an empty database.
-- Reverse dependency order; CASCADE is not used, so an unexpected dependent
-- object (something not created by our migrations) makes this fail loudly
-- instead of being dropped silently.
DROP TABLE IF EXISTS entity_edges;
DROP TABLE IF EXISTS assets;
DROP TABLE IF EXISTS asset_types;
DROP TABLE IF EXISTS devices;
DROP TABLE IF EXISTS device_types;
DROP TABLE IF EXISTS users;
DROP TABLE IF EXISTS organizations;
