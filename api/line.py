"""What the dashboard shows about the serial line: ports, the board on each, its step.

The serial line driver (another process or thread) publishes port status in
``DATA_DIR/line-status.json``, replaced atomically (write a temp file, then
``os.replace``)::

    {
      "updated_at": "2026-11-29T11:00:00Z",
      "ports": [
        {"port": "/dev/ttyUSB0", "device_id": "artik-0001", "batch": "B1",
         "step": "prove", "since": "2026-11-29T10:59:58Z", "message": "",
         "error": null}
      ]
    }

``step`` is one of idle, hello, key, csr, sign, install, prove, done, failed;
``error`` is a reason code when ``step`` is failed. An in-process driver can
call :meth:`LineStatus.update_port` instead; both sources are merged (the
in-process entry wins for the same port).
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

STEPS = ("idle", "hello", "key", "csr", "sign", "install", "prove", "done", "failed")
FILE_NAME = "line-status.json"


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class LineStatus:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._ports: dict[str, dict[str, Any]] = {}

    def update_port(
        self,
        port: str,
        step: str,
        *,
        device_id: str | None = None,
        batch: str | None = None,
        message: str = "",
        error: str | None = None,
    ) -> None:
        if step not in STEPS:
            raise ValueError(f"step {step!r} is not one of {', '.join(STEPS)}")
        with self._lock:
            self._ports[port] = {
                "port": port,
                "device_id": device_id,
                "batch": batch,
                "step": step,
                "since": _now(),
                "message": message,
                "error": error,
            }

    def _from_file(self) -> tuple[list[dict[str, Any]], str | None]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return [], None
        if not isinstance(data, dict):
            return [], None
        ports = [p for p in data.get("ports", []) if isinstance(p, dict) and "port" in p]
        updated = data.get("updated_at")
        return ports, updated if isinstance(updated, str) else None

    def snapshot(self) -> dict[str, Any]:
        ports, updated = self._from_file()
        merged = {str(p["port"]): p for p in ports}
        with self._lock:
            merged.update({k: dict(v) for k, v in self._ports.items()})
        return {"updated_at": updated, "ports": [merged[k] for k in sorted(merged)]}
