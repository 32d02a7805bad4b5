"""The one set of rules for text the ledger stores, applied by the ledger itself.

The CLI and the API check text too (to answer early and in their own words), but
the ledger is where every channel ends, so the rules hold here whatever calls it:

- a batch name is an identifier: ASCII letters, digits and ``. _ -``, starting with
  a letter or digit, 1-128 characters. It appears in URL paths (``/`` made every
  ``/v1/batches/{name}`` route answer 404), file names (``../../etc/passwd``),
  reports and AWS; ``.``, ``..`` and look-alikes in other scripts (a Cyrillic "B-1")
  are refused with it (code ``bad-batch``);
- any other text from a person (product, operator, reasons, token names) is
  printable: no control characters (a newline forges a log line, PostgreSQL
  refuses NUL), no bidi controls or zero-width characters, no separators but the
  space (code ``bad-text``);
- text the station itself records from a board or an exception (failure messages)
  is cleaned, not refused: the failure must be recorded whatever it says.
"""

from __future__ import annotations

from station.errors import PolicyError
from station.policy import BATCH_NAME_RE, has_invisible_characters

MAX_TEXT_CHARS = 128


def check_batch_name(name: str) -> None:
    """Code: bad-batch."""
    if not isinstance(name, str) or BATCH_NAME_RE.fullmatch(name) is None:
        raise PolicyError(
            "a batch name is 1-128 ASCII letters, digits, '.', '_' or '-', starting with "
            "a letter or digit",
            code="bad-batch",
        )


def check_text(value: str, what: str, *, max_chars: int = MAX_TEXT_CHARS) -> None:
    """Printable text of 1 to ``max_chars`` characters. Code: bad-text."""
    if not isinstance(value, str) or not 1 <= len(value) <= max_chars:
        raise PolicyError(f"{what} is 1 to {max_chars} characters", code="bad-text")
    if not value.isprintable() or has_invisible_characters(value):
        raise PolicyError(
            f"{what} must be printable text (no control, bidi or invisible characters)",
            code="bad-text",
        )


def clean_text(value: str, *, max_chars: int = 2000) -> str:
    """``value`` with every character check_text refuses replaced by U+FFFD."""
    return "".join(
        c if c.isprintable() and not has_invisible_characters(c) else "\ufffd"
        for c in value[:max_chars]
    )
