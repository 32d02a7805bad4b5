"""A development SoftHSM2 token in a directory of the station's own.

SoftHSM reads ``SOFTHSM2_CONF`` once, when the module is first loaded in a
process, so the configuration must be in place before any key-store call. The
token is initialised with ``softhsm2-util`` driven through a pseudo-terminal:
it reads PINs only from a terminal, and PINs must never appear in argv.
"""

from __future__ import annotations

import os
import pty
import secrets
import select
import shutil
import subprocess
import time
from pathlib import Path

from hsm.errors import HsmError

DEFAULT_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def write_config(base_dir: Path) -> Path:
    """Create ``base_dir/tokens`` and ``base_dir/softhsm2.conf``; return the config path."""
    tokens = base_dir / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    os.chmod(base_dir, 0o700)
    conf = base_dir / "softhsm2.conf"
    if not conf.exists():
        conf.write_text(
            f"directories.tokendir = {tokens.resolve()}\n"
            "objectstore.backend = file\n"
            "log.level = ERROR\n"
            "slots.removable = false\n"
        )
    return conf


def use_config(conf: Path) -> None:
    """Point this process (and its children) at conf; must run before the module loads."""
    os.environ["SOFTHSM2_CONF"] = str(conf.resolve())


def token_labels() -> list[str]:
    """Labels of the initialised tokens SoftHSM currently sees (in a child process)."""
    util = shutil.which("softhsm2-util")
    if util is None:
        raise HsmError("softhsm2-util not found: install the softhsm2 package (make setup)")
    out = subprocess.run([util, "--show-slots"], capture_output=True, text=True, check=False)
    labels: list[str] = []
    initialised = False
    for line in out.stdout.splitlines():
        line = line.strip()
        if line.startswith("Initialized:"):
            initialised = line.endswith("yes")
        elif line.startswith("Label:") and initialised:
            labels.append(line[len("Label:") :].strip())
    return labels


def init_token(label: str, user_pin: str, so_pin: str, *, timeout: float = 30.0) -> None:
    """Initialise the first free SoftHSM slot as a token called label."""
    util = shutil.which("softhsm2-util")
    if util is None:
        raise HsmError("softhsm2-util not found: install the softhsm2 package (make setup)")
    answers = [so_pin, so_pin, user_pin, user_pin]
    pid, fd = pty.fork()
    if pid == 0:  # child: only exec, nothing else is safe after fork
        try:
            os.execv(util, [util, "--init-token", "--free", "--label", label])  # noqa: S606
        finally:
            os._exit(127)
    seen = b""
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
            output += chunk
            while b"PIN: " in seen and answers:
                _, _, seen = seen.partition(b"PIN: ")
                os.write(fd, answers.pop(0).encode() + b"\n")
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or answers:
        lines = [ln for ln in output.decode(errors="replace").splitlines() if "PIN" not in ln]
        detail = lines[-1].strip() if lines else "no output"
        raise HsmError(f"softhsm2-util could not initialise token {label!r}: {detail}")


def ensure_dev_token(base_dir: Path, label: str) -> tuple[Path, Path, bool]:
    """Make sure a development token called label exists; return (config, PIN file, created).

    A token created after the module was loaded in this process is invisible to
    it until ``hsm.reset_module()``; callers do that when ``created`` is true.

    The user PIN is random and kept in ``base_dir/<label>.pin`` (mode 0600); the
    SO PIN is random and thrown away, as nobody administers a development token.
    """
    base_dir.mkdir(parents=True, exist_ok=True)
    if "SOFTHSM2_CONF" not in os.environ:
        use_config(write_config(base_dir))
    conf = Path(os.environ["SOFTHSM2_CONF"])
    pin_file = base_dir / f"{label}.pin"
    if label in token_labels():
        if not pin_file.exists():
            raise HsmError(
                f"a SoftHSM token called {label!r} exists but its PIN file {pin_file} is "
                "missing; remove the token or restore the file"
            )
        return conf, pin_file, False
    user_pin = secrets.token_urlsafe(18)
    fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(user_pin)  # no newline: libp11 (OpenSSL engine) reads the file verbatim
    init_token(label, user_pin, secrets.token_urlsafe(18))
    return conf, pin_file, True
