-- 0006_telemetry_mqtt_properties (down).
ALTER TABLE telemetry_raw DROP COLUMN IF EXISTS mqtt_properties;
