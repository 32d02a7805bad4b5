"""OpenAPI operation ids a client generator can use: ``createBatch``, not
``create_batch_v1_batches_post``.

The id is the route function's name in lowerCamelCase; the few functions
whose name is not a verb and a noun get theirs here. Unique across the API
(tests/test_openapi.py checks).
"""

from __future__ import annotations

from fastapi.routing import APIRoute

_NAMES = {
    "challenge": "createChallenge",
    "proof": "submitProof",
    "revoke": "revokeDevice",
    "healthz": "getHealth",
    "metrics": "getMetrics",
    "line_status": "getLineStatus",
    "dashboard": "getDashboard",
}


def operation_id(route: APIRoute) -> str:
    name = _NAMES.get(route.name, route.name)
    first, *rest = name.split("_")
    return first + "".join(part[:1].upper() + part[1:] for part in rest)
