"""Schemathesis hooks of ingest-http/contract/run (loaded through SCHEMATHESIS_HOOKS).

The generated data is kept as generated, except where a random value could only ever
meet a refusal:
- an ingest reading's `deviceId`, when it is a valid UUID, becomes the contract
  device's (the one the API key belongs to), so valid readings are accepted and
  stored; a generated invalid `deviceId` (a negative case) is kept;
- the API-key endpoints' `{deviceId}`, for about half of the cases that carry a UUID,
  becomes the contract device, so a key list and key creation really run (never the
  certificate endpoints: they would issue or revoke certificates).
"""

import os
import random
import uuid

import schemathesis

DEVICE = os.environ["CONTRACT_DEVICE_ID"]
INGEST = "/api/v1/telemetry/ingest"


def _is_uuid(value):
    if not isinstance(value, str):
        return False
    try:
        return str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False


def _own(reading):
    if isinstance(reading, dict) and _is_uuid(reading.get("deviceId")):
        reading = dict(reading)
        reading["deviceId"] = DEVICE
    return reading


@schemathesis.hook
def map_body(context, body):
    if context.operation is None or context.operation.path != INGEST:
        return body
    if isinstance(body, list):
        return [_own(r) for r in body]
    return _own(body)


@schemathesis.hook
def map_path_parameters(context, path_parameters):
    operation = context.operation
    if operation is None or "/api-keys" not in operation.path:
        return path_parameters
    if _is_uuid(path_parameters.get("deviceId")) and random.random() < 0.5:
        path_parameters = dict(path_parameters)
        path_parameters["deviceId"] = DEVICE
    return path_parameters
