"""Checks a schemathesis run's HAR file against Postgres (ingest-http/contract/run).

Usage: verify.py HAR_FILE DEVICE_ID STORED_IDS_FILE

Every reading the sidecar stored for the contract device must be one it accepted in
an answer, and every reading it accepted must be stored:
- 200: `messageId` (single) or `messageIds` (batch);
- 409 `id_conflict`: `error.details.messageIds` except the conflicting ones;
- 422 `unstorable`: `error.details.messageIds` except `error.details.deadLettered`.
Any other answer accepted nothing. Also fails on any 5xx answer.
Prints one summary line; exits 1 on a mismatch.
"""

import json
import sys
from collections import Counter

INGEST = "/api/v1/telemetry/ingest"


def accepted_ids(status, body):
    if status == 200:
        if "messageIds" in body:
            return set(body["messageIds"])
        return {body["messageId"]}
    error = body.get("error", {}) if isinstance(body, dict) else {}
    details = error.get("details") or {}
    if status == 409 and error.get("code") == "id_conflict":
        refused = {c["messageId"] for c in details.get("conflicts", [])}
        return set(details.get("messageIds", [])) - refused
    if status == 422 and error.get("code") == "unstorable":
        refused = {d["messageId"] for d in details.get("deadLettered", [])}
        return set(details.get("messageIds", [])) - refused
    return set()


def main():
    har_file, device, stored_file = sys.argv[1:4]
    with open(har_file, encoding="utf-8") as f:
        entries = json.load(f)["log"]["entries"]
    with open(stored_file, encoding="utf-8") as f:
        stored = {line.strip() for line in f if line.strip()}
    statuses = Counter()
    server_errors = []
    accepted = set()
    requests = 0
    for entry in entries:
        request, response = entry["request"], entry["response"]
        status = response["status"]
        statuses[status] += 1
        if status >= 500:
            server_errors.append(f'{request["method"]} {request["url"]} -> {status}')
        if request["method"] != "POST" or not request["url"].split("?")[0].endswith(INGEST):
            continue
        requests += 1
        text = response.get("content", {}).get("text") or ""
        try:
            body = json.loads(text)
        except ValueError:
            body = {}
        if status == 200 and not isinstance(body, dict):
            server_errors.append(f"ingest 200 without a JSON object body: {text[:200]}")
            continue
        accepted |= accepted_ids(status, body)
    ok = True
    print(f"contract: {len(entries)} requests, statuses {dict(sorted(statuses.items()))}")
    print(
        f"contract: {requests} ingest requests, {len(accepted)} readings accepted, "
        f"{len(stored)} stored for device {device}"
    )
    if server_errors:
        ok = False
        print(f"contract: FAILED: {len(server_errors)} server errors:")
        for line in server_errors[:20]:
            print(f"  {line}")
    refused_but_stored = stored - accepted
    if refused_but_stored:
        ok = False
        print(
            f"contract: FAILED: {len(refused_but_stored)} stored readings were never "
            f"accepted (stored although refused): {sorted(refused_but_stored)[:10]}"
        )
    lost = accepted - stored
    if lost:
        ok = False
        print(f"contract: FAILED: {len(lost)} accepted readings are not stored: {sorted(lost)[:10]}")
    if entries and requests == 0:
        ok = False
        print("contract: FAILED: no ingest request was recorded")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
