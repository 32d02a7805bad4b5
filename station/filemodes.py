"""The station's own files: the data directory 0700, what holds ledger data 0600.

The ledger holds CSRs, certificates, the audit chain and API token hashes; the
data directory also holds the development token and AWS state. Nobody but the
station's user has a reason to read them. Modes are set when the station creates
a file and tightened when it opens one it owns that is looser (a data directory
made by an older station, or by hand under a 022 umask); files of another user
are left as they are (the station cannot change them, and does not try).
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """Make ``path`` (and missing parents) and tighten it to 0700 if it is ours."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    _tighten(path, DIR_MODE)
    return path


def private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 if it is missing, else tighten it if it is ours."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    except FileExistsError:
        _tighten(path, FILE_MODE)
    else:
        os.close(fd)


def tighten(path: Path, mode: int = FILE_MODE) -> None:
    """Tighten an existing file of ours to ``mode`` (no error if it is gone)."""
    with contextlib.suppress(FileNotFoundError):
        _tighten(path, mode)


def _tighten(path: Path, mode: int) -> None:
    st = path.stat()
    if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) & ~mode:
        os.chmod(path, stat.S_IMODE(st.st_mode) & mode)
