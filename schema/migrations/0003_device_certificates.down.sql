-- 0003_device_certificates (down)
DROP TABLE IF EXISTS device_certificates;
