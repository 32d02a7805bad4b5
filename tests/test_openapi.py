"""The OpenAPI document a client generator reads, and the API keeping to it.

Operation ids are lowerCamelCase verbs (``createBatch``); every /v1 route
documents its 401, 403, 404, 409 and 422 as problem+json with example reason
codes; list routes are pages with a total; a field has one name everywhere;
every timestamp is RFC 3339 with ``Z``.
"""

from __future__ import annotations

import re
from typing import Any

from tests.test_api import issue
from tests.test_api_helpers import Api
from tests.test_api_helpers import api as api

RFC3339_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def operations(api: Api) -> list[tuple[str, str, dict[str, Any]]]:
    doc = api.client.get("/openapi.json").json()
    return [(m, p, op) for p, item in doc["paths"].items() for m, op in item.items()]


def test_operation_ids_are_camel_case_verbs_and_unique(api: Api) -> None:
    ops = operations(api)
    ids = {(m, p): op["operationId"] for m, p, op in ops}
    assert len(set(ids.values())) == len(ids)
    assert all(re.fullmatch(r"[a-z]+(?:[A-Z][a-z0-9]*)*", i) for i in ids.values()), ids
    assert ids[("post", "/v1/batches")] == "createBatch"
    assert ids[("get", "/v1/batches")] == "listBatches"
    assert ids[("get", "/v1/line/status")] == "getLineStatus"
    assert ids[("post", "/v1/devices/{device_id}/proof")] == "submitProof"


def test_every_v1_route_documents_its_errors_as_problems(api: Api) -> None:
    for method, path, op in operations(api):
        if not path.startswith("/v1/"):
            continue
        expected = {"401", "422"}
        expected |= {"403"} if path != "/v1/ca" else set()
        expected |= {"404"} if "{" in path else set()
        expected |= {"409"} if method == "post" else set()
        responses = op["responses"]
        assert expected <= set(responses), (method, path, sorted(responses))
        for status in expected:
            media = responses[status]["content"]["application/problem+json"]
            assert media["schema"] == {"$ref": "#/components/schemas/Problem"}
            for example in media["examples"].values():
                assert example["value"]["type"] == "urn:station:problem:" + example["value"]["code"]


def test_lists_are_pages_with_a_total(api: Api) -> None:
    api.batch("B1", planned=5)
    api.batch("B2", planned=5)
    for i in range(3):
        issue(api, f"dev-{i}")
    page = api.get("/v1/devices", "qa", params={"limit": 2, "offset": 1}).json()
    assert page["total"] == 3 and page["limit"] == 2 and page["offset"] == 1
    assert [d["device_id"] for d in page["items"]] == ["dev-1", "dev-2"]
    batches = api.get("/v1/batches", "qa", params={"limit": 1}).json()
    assert batches["total"] == 2 and [b["name"] for b in batches["items"]] == ["B1"]
    doc = api.client.get("/openapi.json").json()
    for path in ("/v1/devices", "/v1/batches"):
        ref = doc["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]
        name = ref["schema"]["$ref"].rsplit("/", 1)[1]
        assert {"items", "total", "limit", "offset"} <= set(
            doc["components"]["schemas"][name]["properties"]
        )


def test_one_name_per_field_and_rfc3339_z_timestamps(api: Api) -> None:
    api.batch("B1", planned=5)
    issue(api, "dev-1")
    api.post("/v1/certificates", "board", json={"batch": "B1", "device_id": "x", "csr": "junk"})
    batch = api.get("/v1/batches/B1", "qa").json()
    status = api.get("/v1/line/status", "qa").json()
    [line_batch] = [b for b in status["batches"] if b["name"] == "B1"]
    # The same facts under the same names in both places.
    for key in ("planned_count", "device_count"):
        assert line_batch[key] == batch[key], key
    assert "planned" not in line_batch and "devices" not in line_batch
    stamps = [
        batch["created_at"],
        status["now"],
        api.get("/v1/devices/dev-1", "qa").json()["created_at"],
    ]
    stamps += [f["at"] for f in status["failures"] + status["recent_refusals"] if f.get("at")]
    assert len(stamps) >= 4
    assert all(RFC3339_Z.match(s) for s in stamps), stamps
