"""Files the station writes whole or not at all.

Every file a reader may open at any moment (the CA certificate, the AWS
registration state, the line status, reports, manifests, the Lambda zip) is
written to a temporary file in the same directory, synced, then renamed over
the old one: a reader sees the old file or the new one, never half of either.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_writer(path: Path, *, mode: int = 0o644, sync: bool = True) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` (with ``mode``) when the block ends.

    If the block raises, ``path`` is left as it was and the temporary file removed.
    ``sync=False`` skips the fsync for files that are rewritten often and may be
    lost in a power cut (the line status).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            if sync:
                os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomically(path: Path, data: bytes, *, mode: int = 0o644, sync: bool = True) -> None:
    """``path`` holds ``data`` (and ``mode``), or what it held before."""
    with atomic_writer(path, mode=mode, sync=sync) as handle:
        handle.write(data)
