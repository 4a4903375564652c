-- 0004_device_api_keys (down)
DROP TABLE IF EXISTS device_api_keys;
