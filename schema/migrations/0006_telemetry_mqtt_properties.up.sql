-- 0006_telemetry_mqtt_properties: the MQTT 5 publish properties a device sent with a
-- reading (content type, payload format indicator, response topic, correlation data
-- in base64, user properties as [name, value] pairs), as one JSON object, the same
-- one the envelope carries as `properties` (pipeline/src/properties.rs;
-- docs/pipeline.md, "MQTT 5 properties").
--
-- Nullable and without a default: NULL for HTTP readings, MQTT 3.1.1 readings and
-- MQTT 5 readings without properties, and for every row stored before. Adding such
-- a column only changes the catalog; it does not rewrite the table.
ALTER TABLE telemetry_raw ADD COLUMN IF NOT EXISTS mqtt_properties JSONB;
