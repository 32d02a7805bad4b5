"""docs/enrollment.md lists every renewal code the station gives, and only codes it gives."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Every code a renewal refuses, abandons or audits with (station/ledger/succession.py,
# renewals.py, issuer.py, revocation.py, contact.py; api/routers/cmp.py).
RENEWAL_CODES = {
    "renewal-not-current", "renewal-same-key", "renewal-other-batch", "renewal-in-progress",
    "issuance-in-progress", "no-renewal", "renewal-restarted", "cmp-cert-rejected",
    "cmp-cert-not-waiting", "cmp-certificate-not-live", "certificate-not-live",
}  # fmt: skip


def _table() -> str:
    doc = (ROOT / "docs" / "enrollment.md").read_text()
    return doc[doc.index("**Renewal codes.**") :].split("\n\n")[1]


def test_every_renewal_code_is_documented_with_what_to_do() -> None:
    rows = {}
    for line in _table().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 4 and all(cells), line  # code, where, meaning, what to do
        rows[cells[0].strip("`")] = cells
    assert set(rows) == RENEWAL_CODES


def test_every_documented_code_is_one_the_code_gives() -> None:
    source = "\n".join(p.read_text() for d in ("station", "api") for p in (ROOT / d).rglob("*.py"))
    for code in RENEWAL_CODES:
        assert re.search(rf'"{re.escape(code)}"', source), code
