"""A stand-in for ARTIK's ``see_test`` tool, for tests and demos. NOT the real tool.

Real boards have ``see_test`` (Secure Element test tool) and the OpenSSL
``artiksee`` engine. Neither exists off the board, so this module plays both,
keeping keys as files in the directory named by ``$SEE_TEST_STORE``::

    python3 -m firmware_hooks.see_test -K set-key -a 4097 -k NAME -I KEY.der
        The real tool's documented command: store an RSA-2048 private key (DER,
        PKCS#1 or PKCS#8) under NAME (at most 20 characters).

    python3 -m firmware_hooks.see_test -K sign -k NAME -I DATA -O SIG
        Stand-in ONLY, for the artiksee engine: sign DATA with the stored key,
        RSA PKCS#1 v1.5 with SHA-256, like
        ``openssl dgst -sha256 -engine artiksee -keyform engine -sign rsa2048://NAME``.

    python3 -m firmware_hooks.see_test -K remove-key -k NAME

Exit codes (stand-in's own; the real tool's are undocumented):
0 ok, 1 usage, 2 unsupported algorithm, 3 bad key name, 4 input unreadable,
5 invalid key, 6 store failure, 7 key not found. Messages go to stderr as
``see_test: <command> failed (<code name>): <detail>``.

Standard library only: the key is checked and used with a small DER reader and
Python integers.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

STORE_ENV = "SEE_TEST_STORE"
RSA_2048 = 0x1001  # 4097
KEY_NAME_MAX = 20
_NAME_RE = re.compile(r"\A[A-Za-z0-9._-]+\Z")  # not "$": no trailing newline

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_BAD_ALGORITHM = 2
EXIT_BAD_NAME = 3
EXIT_UNREADABLE = 4
EXIT_INVALID_KEY = 5
EXIT_STORE = 6
EXIT_NO_KEY = 7

_CODE_NAMES = {
    EXIT_USAGE: "ERR_SEE_USAGE",
    EXIT_BAD_ALGORITHM: "ERR_SEE_INVALID_ALGORITHM",
    EXIT_BAD_NAME: "ERR_SEE_INVALID_KEY_NAME",
    EXIT_UNREADABLE: "ERR_SEE_INPUT_UNREADABLE",
    EXIT_INVALID_KEY: "ERR_SEE_INVALID_KEY",
    EXIT_STORE: "ERR_SEE_STORAGE",
    EXIT_NO_KEY: "ERR_SEE_KEY_NOT_FOUND",
}

_RSA_OID = bytes.fromhex("2a864886f70d010101")  # 1.2.840.113549.1.1.1
_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


class SeeError(Exception):
    def __init__(self, exit_code: int, detail: str) -> None:
        super().__init__(detail)
        self.exit_code = exit_code
        self.detail = detail


@dataclass(frozen=True)
class RsaKey:
    n: int
    e: int
    d: int

    @property
    def bits(self) -> int:
        return self.n.bit_length()


# --------------------------------------------------------------------------- DER


def _read_tlv(data: bytes, pos: int) -> tuple[int, bytes, int]:
    if pos + 2 > len(data):
        raise ValueError("truncated DER element")
    tag = data[pos]
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or pos + count > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    if pos + length > len(data):
        raise ValueError("DER element runs past the end")
    return tag, data[pos : pos + length], pos + length


def _elements(body: bytes) -> list[tuple[int, bytes]]:
    items = []
    pos = 0
    while pos < len(body):
        tag, value, pos = _read_tlv(body, pos)
        items.append((tag, value))
    return items


def _sequence(data: bytes) -> list[tuple[int, bytes]]:
    tag, body, end = _read_tlv(data, 0)
    if tag != 0x30 or end != len(data):
        raise ValueError("not a single DER SEQUENCE")
    return _elements(body)


def parse_rsa_private_key(der: bytes) -> RsaKey:
    """An RSA private key from DER: PKCS#1 RSAPrivateKey or PKCS#8 PrivateKeyInfo."""
    items = _sequence(der)
    if len(items) >= 3 and items[1][0] == 0x30 and items[2][0] == 0x04:  # PKCS#8
        algorithm = _elements(items[1][1])
        if not algorithm or algorithm[0] != (0x06, _RSA_OID):
            raise ValueError("PKCS#8 key is not an RSA key")
        items = _sequence(items[2][1])
    if len(items) < 9 or any(tag != 0x02 for tag, _ in items[:9]):
        raise ValueError("not an RSAPrivateKey (expected 9 INTEGERs)")
    version, n, e, d = (int.from_bytes(v, "big") for _, v in items[:4])
    if version != 0:
        raise ValueError(f"unsupported RSAPrivateKey version {version}")
    if n < 3 or not (1 < e < n) or not (1 < d < n) or pow(pow(2, e, n), d, n) != 2:
        raise ValueError("RSA key components are inconsistent")
    return RsaKey(n, e, d)


def sign_pkcs1v15_sha256(key: RsaKey, data: bytes) -> bytes:
    k = (key.bits + 7) // 8
    t = _SHA256_DIGEST_INFO + hashlib.sha256(data).digest()
    em = b"\x00\x01" + b"\xff" * (k - len(t) - 3) + b"\x00" + t
    return pow(int.from_bytes(em, "big"), key.d, key.n).to_bytes(k, "big")


# --------------------------------------------------------------------------- commands


def _store() -> Path:
    value = os.environ.get(STORE_ENV)
    if not value:
        raise SeeError(EXIT_STORE, f"secure storage unavailable (${STORE_ENV} is not set)")
    path = Path(value)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise SeeError(EXIT_STORE, f"secure storage unavailable: {exc}") from exc
    return path


def _check_name(name: str) -> None:
    if len(name) > KEY_NAME_MAX:
        raise SeeError(
            EXIT_BAD_NAME, f"key name '{name}' is {len(name)} characters, at most {KEY_NAME_MAX}"
        )
    if not _NAME_RE.fullmatch(name) or name in {".", ".."}:
        raise SeeError(EXIT_BAD_NAME, f"key name '{name}' has characters outside [A-Za-z0-9._-]")


def _read_input(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SeeError(EXIT_UNREADABLE, f"cannot read {path}: {exc.strerror or exc}") from exc


def _load_stored(name: str) -> RsaKey:
    _check_name(name)
    path = _store() / f"{name}.der"
    if not path.exists():
        raise SeeError(EXIT_NO_KEY, f"no key named '{name}' in secure storage")
    return parse_rsa_private_key(path.read_bytes())


def set_key(algorithm: int, name: str, input_path: str) -> str:
    if algorithm != RSA_2048:
        raise SeeError(
            EXIT_BAD_ALGORITHM,
            f"unsupported algorithm {algorithm:#06x} ({algorithm}); supported: 0x1001 (RSA-2048)",
        )
    _check_name(name)
    der = _read_input(input_path)
    try:
        key = parse_rsa_private_key(der)
    except ValueError as exc:
        raise SeeError(
            EXIT_INVALID_KEY, f"{input_path} is not an RSA private key in DER: {exc}"
        ) from exc
    if key.bits != 2048:
        raise SeeError(EXIT_INVALID_KEY, f"{input_path} holds an RSA-{key.bits} key, not RSA-2048")
    store = _store()
    try:
        fd, tmp = tempfile.mkstemp(dir=store, prefix=".set-key-")
        with os.fdopen(fd, "wb") as handle:
            handle.write(der)
        os.replace(tmp, store / f"{name}.der")
    except OSError as exc:
        raise SeeError(EXIT_STORE, f"cannot write secure storage: {exc}") from exc
    return f"set-key: stored '{name}' (algorithm 0x1001, RSA-2048) in secure storage"


def sign(name: str, input_path: str, output_path: str) -> str:
    key = _load_stored(name)
    signature = sign_pkcs1v15_sha256(key, _read_input(input_path))
    try:
        Path(output_path).write_bytes(signature)
    except OSError as exc:
        raise SeeError(EXIT_STORE, f"cannot write {output_path}: {exc.strerror or exc}") from exc
    return f"sign: {len(signature)}-byte signature with '{name}' written to {output_path}"


def remove_key(name: str) -> str:
    _check_name(name)
    path = _store() / f"{name}.der"
    if not path.exists():
        raise SeeError(EXIT_NO_KEY, f"no key named '{name}' in secure storage")
    path.unlink()
    return f"remove-key: removed '{name}'"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise SeeError(EXIT_USAGE, f"{message}\n{self.format_usage().strip()}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="see_test", description="Stand-in for ARTIK's see_test (simulation).")
    parser.add_argument("-K", dest="command", required=True, help="set-key | sign | remove-key")
    parser.add_argument("-a", dest="algorithm", type=lambda s: int(s, 0), default=None)
    parser.add_argument("-k", dest="name", required=True)
    parser.add_argument("-I", dest="input")
    parser.add_argument("-O", dest="output")
    command = "see_test"
    try:
        args = parser.parse_args(argv)
        command = args.command
        if command == "set-key":
            if args.algorithm is None or args.input is None:
                raise SeeError(EXIT_USAGE, "set-key needs -a ALGORITHM -k NAME -I FILE")
            text = set_key(args.algorithm, args.name, args.input)
        elif command == "sign":
            if args.input is None or args.output is None:
                raise SeeError(EXIT_USAGE, "sign needs -k NAME -I DATA -O SIGNATURE")
            text = sign(args.name, args.input, args.output)
        elif command == "remove-key":
            text = remove_key(args.name)
        else:
            raise SeeError(EXIT_USAGE, f"unknown command -K {command}")
    except SeeError as exc:
        print(
            f"see_test: {command} failed ({_CODE_NAMES.get(exc.exit_code, exc.exit_code)}): "
            f"{exc.detail}",
            file=sys.stderr,
        )
        return exc.exit_code
    except ValueError as exc:  # e.g. a stored key file that no longer parses
        print(f"see_test: {command} failed (ERR_SEE_INVALID_KEY): {exc}", file=sys.stderr)
        return EXIT_INVALID_KEY
    print(text)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
