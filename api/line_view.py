"""What the dashboard shows about the serial line: ports, the board on each, its step.

The serial line driver (``station.line``) publishes its state in
``DATA_DIR/line-status.json``, replaced atomically (temp file, then
``os.replace``) at most every 0.5 s. Shape (written by
``station.line.status.LineStatus.snapshot``)::

    {
      "updated": "2026-11-29T11:00:00.123+00:00",
      "batch": "B1",
      "ports": [
        {"port": "/dev/ttyUSB0", "device_id": "artik-0001", "step": "prove",
         "since": "2026-11-29T10:59:58.000+00:00", "last_error": null}
      ],
      "counts": {"verified": 12, "failed": 1, "skipped": 0, "in_progress": 3},
      "recent_failures": [
        {"device_id": "artik-0007", "code": "bad-proof", "message": "...",
         "at": "2026-11-29T10:58:00.000+00:00"}
      ],
      "issued_per_min": 42.0
    }

``step`` is ``waiting`` (no board on the port), a step of the line, or a
terminal ``verified`` / ``failed`` / ``skipped``; ``last_error`` is
``"code: message"`` after a failure. A driver running in the API's process can
:meth:`LineView.attach` its ``LineStatus`` instead of going through the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

FILE_NAME = "line-status.json"


class _Snapshots(Protocol):
    def snapshot(self) -> dict[str, Any]: ...


class LineView:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._attached: _Snapshots | None = None

    def attach(self, status: _Snapshots | None) -> None:
        self._attached = status

    def _raw(self) -> dict[str, Any]:
        if self._attached is not None:
            return self._attached.snapshot()
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def snapshot(self) -> dict[str, Any]:
        """The line's state, normalised: missing file or fields become empty values."""
        raw = self._raw()
        batch = raw.get("batch")
        ports = []
        for p in raw.get("ports") or []:
            if isinstance(p, dict) and "port" in p:
                ports.append(
                    {
                        "port": str(p["port"]),
                        "device_id": p.get("device_id"),
                        "batch": p.get("batch", batch),
                        "step": str(p.get("step", "waiting")),
                        "since": p.get("since"),
                        "last_error": p.get("last_error"),
                    }
                )
        failures = [
            {
                "device_id": f.get("device_id"),
                "batch": batch,
                "code": f.get("code"),
                "detail": f.get("message", ""),
                "at": f.get("at"),
            }
            for f in raw.get("recent_failures") or []
            if isinstance(f, dict)
        ]
        rate = raw.get("issued_per_min")
        running = raw.get("running")
        return {
            "updated": raw.get("updated"),
            "running": running if isinstance(running, bool) else None,
            "batch": batch,
            "ports": ports,
            "recent_failures": failures,
            "issued_per_min": float(rate) if isinstance(rate, int | float) else 0.0,
        }
