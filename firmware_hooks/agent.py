"""The board agent: answers the station over the serial line.

Run on the board (standard library, pyserial and the OpenSSL CLI only)::

    python3 -m firmware_hooks.agent --port /dev/ttyGS0 [--key-dir DIR] [--hardware-id ID]
        [--baud 115200] [--see-test CMD] [--se-sign TEMPLATE] [--max-protocol 2] [--no-renew]

- board-ecc: ``openssl ecparam -genkey -name prime256v1`` makes the key (mode
  0600 in the key directory, it never leaves the board) and
  ``openssl req -new -key ... -subj SUBJ -outform DER`` the CSR.
- see-rsa: the station's RSA-2048 key (DER) goes to a 0600 temporary file,
  ``see_test -K set-key -a 4097 -k NAME -I FILE`` loads it into the Secure
  Element, and the file is overwritten with zeros and deleted whatever happens
  (an agent killed meanwhile does it for ``.se-key-*`` files when it starts again).
- the chain is stored as ``deviceCertAndCACert.crt`` in the key directory.
- field renewal (capability ``renew``): RENEW_KEY_CSR makes a new key beside the
  live one (``<name>.key.renew``), PUT_CHAIN and PROVE of the renewal session use
  ``deviceCertAndCACert.crt.renew`` and that key, RENEW_COMMIT puts both in place
  of the live ones (the old key overwritten), ABORT wipes only the renewal's files.
- proof of possession: ``openssl dgst -sha256 -sign KEYFILE`` for board-ecc;
  for see-rsa the ``--se-sign`` command template, by default the ``artiksee``
  OpenSSL engine with key ``rsa2048://NAME``. Off the board, point it at the
  stand-in: ``--se-sign "python3 -m firmware_hooks.see_test -K sign -k {key} -I {in} -O {out}"``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from firmware_hooks import AGENT_VERSION
from firmware_hooks.link import Link, SerialLike
from firmware_hooks.protocol import (
    PROTOCOL_V2,
    PROTOCOL_V3,
    PROTOCOL_VERSION,
    SIG_ECDSA_SHA256,
    SIG_RSA_PKCS1V15_SHA256,
    BadPayload,
    Disconnected,
    ErrorCode,
    Fields,
    FieldValue,
    Message,
    MsgType,
    Tag,
    Timeout,
    UnsupportedVersion,
    encode_tlv,
    error_payload,
    parse_proof_message,
    response_type,
)

log = logging.getLogger("firmware_hooks.agent")

CHAIN_FILE = "deviceCertAndCACert.crt"
RENEW_SUFFIX = ".renew"  # a renewal's key and chain until RENEW_COMMIT
STATE_FILE = "agent-state.json"
DEFAULT_KEY_NAME = "deviceCert"
SE_KEY_NAME_MAX = 20
SE_RSA_2048 = 4097
DEFAULT_SE_SIGN = (
    "openssl dgst -sha256 -engine artiksee -keyform engine -sign rsa2048://{key} -out {out} {in}"
)
HARDWARE_ID_SOURCES = (
    "/sys/firmware/devicetree/base/serial-number",
    "/proc/device-tree/serial-number",
    "/etc/machine-id",
)
OPENSSL_ECPARAM = ("ecparam", "-genkey", "-name", "prime256v1", "-noout")
OPENSSL_REQ = ("-utf8", "-sha256", "-outform", "DER")
_NAME_RE = re.compile(r"\A[A-Za-z0-9._-]{1,64}\Z")  # not "$": no trailing newline
# Temporary files in the key directory that hold private key material: the station's
# RSA key on its way to the Secure Element, a board-ecc key before its rename.
SE_KEY_PREFIX = ".se-key-"
KEY_TMP_PREFIX = ".key-"
T = TypeVar("T")


def shred(path: str | os.PathLike[str]) -> None:
    """Overwrite a file with zeros (fsync) and remove it; a missing file is fine.

    For the temporary copies of private keys. On a journalling or flash file
    system the old blocks may survive elsewhere: this removes what the file
    system lets a program remove, not what its wear levelling kept."""
    try:
        with open(path, "r+b", buffering=0) as handle:
            size = os.fstat(handle.fileno()).st_size
            zeros = bytes(min(size, 65536))
            done = 0
            while done < size:
                done += handle.write(zeros[: size - done])
            os.fsync(handle.fileno())
    except FileNotFoundError:
        return
    except OSError as exc:  # still remove it below
        log.warning("cannot overwrite %s before removing it: %s", path, exc)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class Refusal(Exception):
    """A request the agent refuses; becomes an ERROR message with this code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def default_hardware_id() -> str:
    for source in HARDWARE_ID_SOURCES:
        try:
            value = Path(source).read_bytes().replace(b"\x00", b"").decode().strip()
        except (OSError, UnicodeDecodeError):
            continue
        if value:
            return value
    raise RuntimeError("no hardware id found; pass --hardware-id")


class KeyBackend(Protocol):
    """What makes the board-ecc key and signs with it, when not the OpenSSL CLI.

    For simulated boards only (``station.line.simkeys``: in-process, no tool
    started per command, so a rig of many boards measures the station, not
    process starts). A real board leaves ``AgentConfig.keys`` at None."""

    def generate_key_csr(self, key_path: Path, subject: str) -> bytes:
        """Write a new P-256 key (PEM) to ``key_path``; return a CSR (DER) for the
        OpenSSL-style ``subject``, signed with it (SHA-256)."""
        ...

    def sign(self, key_path: Path, data: bytes) -> bytes:
        """ECDSA-SHA256 signature (DER) over ``data`` with the key at ``key_path``."""
        ...


@dataclass(frozen=True)
class AgentConfig:
    key_dir: Path
    hardware_id: str
    see_test: tuple[str, ...] = ("see_test",)
    se_sign: tuple[str, ...] = tuple(shlex.split(DEFAULT_SE_SIGN))
    openssl: str = "openssl"
    env: Mapping[str, str] | None = None  # environment of the tools (None: inherit)
    tool_timeout: float = 60.0
    keys: KeyBackend | None = None  # simulated boards only; None: the OpenSSL CLI
    # Protocol versions this agent speaks; version 2 is chosen in HELLO when the host
    # offers it (a rig whose own port loop speaks version 1 only passes (1,)).
    protocol_versions: tuple[int, ...] = (PROTOCOL_VERSION, PROTOCOL_V2, PROTOCOL_V3)
    # Field renewal (RENEW_KEY_CSR, RENEW_COMMIT); False behaves as agent 1.0.0 did.
    renewal: bool = True


@dataclass
class Session:
    """What the agent remembers between requests (persisted in the key directory)."""

    key_mode: str = "none"  # none | board-ecc | see-rsa
    key_name: str = ""
    # Made since the last HELLO, so ABORT wipes it: the key (a board-ecc key is
    # shredded; a Secure Element key cannot be) and the chain. HELLO clears both: what
    # an earlier session made (perhaps verified) is then no ABORT's to wipe.
    key_new: bool = False
    chain_sha256: str = ""
    chain_new: bool = False
    # A renewal session: a new key (and chain) beside the live ones until RENEW_COMMIT.
    renewing: bool = False
    renewal_chain_sha256: str = ""
    # The renewal was started since the last HELLO, so ABORT drops it. One of an earlier
    # session stays: the station may have confirmed it, and only RENEW_COMMIT is left.
    renewal_new: bool = False

    @property
    def state(self) -> str:
        if self.key_mode == "none":
            return "idle"
        if self.renewing:
            return "renewing"
        return "chain-stored" if self.chain_sha256 else "key-ready"


@dataclass
class _Replay:
    key: tuple[int, int, int] | None = None
    reply: Message | None = None
    hits: int = field(default=0)


class Agent:
    """Dispatches requests to handlers; ``serve()`` runs the loop on a port."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        config.key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._shred_leftovers()
        self.session = self._load_session()
        self._finish_commit()
        self._replay = _Replay()
        self._request_version = PROTOCOL_VERSION  # of the request being handled

    def _shred_leftovers(self) -> None:
        """Key material an earlier agent left behind when it died mid-request (power
        cut, kill): the temporary copy of a station RSA key on its way to the Secure
        Element, a board-ecc key not yet renamed into place. Overwritten and removed."""
        try:
            names = os.listdir(self.config.key_dir)
        except OSError as exc:
            log.warning("cannot list %s: %s", self.config.key_dir, exc)
            return
        for name in names:
            leftover = name.startswith(SE_KEY_PREFIX) or (
                name.startswith(KEY_TMP_PREFIX) and name.endswith(".tmp")
            )
            if leftover:
                log.warning("removing key material left by an earlier run: %s", name)
                shred(self.config.key_dir / name)

    # ------------------------------------------------------------------ loop

    def serve(self, port: SerialLike, stop: threading.Event | None = None) -> None:
        """Answer requests until ``stop`` is set; raises Disconnected when the port goes away."""
        link = Link(port, versions=self.config.protocol_versions)
        while stop is None or not stop.is_set():
            try:
                request = link.receive(0.2)
            except UnsupportedVersion as exc:
                log.warning("request in protocol version %d refused", exc.version)
                refusal = error_payload(
                    ErrorCode.UNSUPPORTED_VERSION,
                    f"protocol version {exc.version} not supported; supported: "
                    + ", ".join(str(v) for v in self.config.protocol_versions),
                )
                self._write(link, Message(MsgType.ERROR, exc.seq, refusal))
                continue
            if request is None:
                continue
            key = (request.seq, request.type, zlib.crc32(request.payload))
            if key == self._replay.key and self._replay.reply is not None:
                # A retry of the request just answered: replay, never run it twice.
                self._replay.hits += 1
                log.info("replaying the reply to seq %d", request.seq)
                self._write(link, self._replay.reply)
                continue
            reply = self.handle(request)
            reply = Message(reply.type, reply.seq, reply.payload, request.version)
            self._replay.key, self._replay.reply = key, reply
            self._write(link, reply)

    @staticmethod
    def _write(link: Link, reply: Message) -> None:
        """Send a reply in the version of its request; if the station is not reading
        (write timeout, no acknowledgement), drop it and keep serving: the station's
        retry of the request gets it from the replay cache."""
        try:
            link.send_message(reply)
        except Timeout as exc:
            log.warning("reply dropped: %s", exc)

    # ------------------------------------------------------------------ dispatch

    def handle(self, request: Message) -> Message:
        """The reply to one request. Never raises: failures become ERROR messages."""
        handlers = {
            MsgType.HELLO: self._hello,
            MsgType.GEN_KEY_CSR: self._gen_key_csr,
            MsgType.PUT_SECURE_KEY: self._put_secure_key,
            MsgType.PUT_CHAIN: self._put_chain,
            MsgType.PROVE: self._prove,
            MsgType.STATUS: self._status,
            MsgType.ABORT: self._abort,
        }
        if self.config.renewal:
            handlers[MsgType.RENEW_KEY_CSR] = self._renew_key_csr
            handlers[MsgType.RENEW_COMMIT] = self._renew_commit
        handler = handlers.get(request.type)  # type: ignore[call-overload]
        self._request_version = request.version
        try:
            if handler is None:
                raise Refusal(ErrorCode.UNKNOWN_COMMAND, f"unknown command {request.type:#04x}")
            fields = Fields.decode(request.payload)
            expected = fields.get_all_str(Tag.EXPECTED_ID)
            if expected and expected[0] != self.config.hardware_id:
                raise Refusal(
                    ErrorCode.WRONG_BOARD,
                    f"this is board {self.config.hardware_id!r}, the request is for "
                    f"{expected[0][:64]!r}: nothing done",
                )
            payload = encode_tlv(handler(fields))
        except Refusal as exc:
            log.warning("refused %#04x: %s", request.type, exc.message)
            return Message(MsgType.ERROR, request.seq, error_payload(exc.code, exc.message))
        except BadPayload as exc:
            return Message(
                MsgType.ERROR, request.seq, error_payload(ErrorCode.BAD_REQUEST, str(exc))
            )
        except Exception as exc:  # the agent must answer, whatever went wrong
            log.exception("internal error")
            return Message(MsgType.ERROR, request.seq, error_payload(ErrorCode.INTERNAL, repr(exc)))
        return Message(response_type(request.type), request.seq, payload)

    # ------------------------------------------------------------------ handlers

    def capabilities(self) -> list[str]:
        caps = ["board-ecc", "put-chain", "prove", "replay"]
        if self.config.renewal:
            caps.append("renew")
        if shutil.which(self.config.see_test[0], path=self._path()):
            caps.append("see-rsa")
        return caps

    def _hello(self, fields: Fields) -> list[tuple[int, FieldValue]]:
        session = self.session
        if session.key_new or session.chain_new or session.renewal_new:
            # A HELLO starts a new session: the key, the chain and a renewal stay, and
            # ABORT keeps them.
            session.key_new = session.chain_new = session.renewal_new = False
            self._save_session()
        reply: list[tuple[int, FieldValue]] = [
            (Tag.HARDWARE_ID, self.config.hardware_id),
            (Tag.AGENT_VERSION, AGENT_VERSION),
            *((Tag.CAPABILITY, cap) for cap in self.capabilities()),
        ]
        offered = {int.from_bytes(v, "big") for v in fields.get_all_bytes(Tag.PROTOCOL_VERSIONS)}
        common = offered & set(self.config.protocol_versions)
        if common:
            reply.append((Tag.PROTOCOL_VERSION, max(common)))
        return reply

    @staticmethod
    def _subject(fields: Fields) -> str:
        subject = fields.get_str(Tag.SUBJECT)
        if (
            not subject.startswith("/")
            or len(subject) > 1024
            or any(c in subject for c in "\0\n\r")
        ):
            raise Refusal(ErrorCode.INVALID_ARGUMENT, f"bad subject {subject!r}")
        return subject

    def _gen_key_csr(self, fields: Fields) -> list[tuple[int, FieldValue]]:
        subject = self._subject(fields)
        name = fields.get_str(Tag.KEY_NAME, DEFAULT_KEY_NAME)
        self._check_name(name)
        self._drop_renewal()
        csr = self._make_key_csr(self.config.key_dir / f"{name}.key", subject)
        self.session = Session(key_mode="board-ecc", key_name=name, key_new=True)
        self._save_session()
        log.info("generated P-256 key %s.key and a CSR for %s", name, subject)
        return [(Tag.CSR, csr), (Tag.KEY_NAME, name)]

    def _make_key_csr(self, key_path: Path, subject: str) -> bytes:
        """A new P-256 key at ``key_path`` (0600, replacing any atomically) and its CSR."""
        fd, tmp = tempfile.mkstemp(dir=self.config.key_dir, prefix=KEY_TMP_PREFIX, suffix=".tmp")
        os.close(fd)  # mkstemp made it 0600; openssl writes into it and keeps the mode
        try:
            if self.config.keys is not None:
                csr = self._with_backend(
                    ErrorCode.KEYGEN_FAILED, self.config.keys.generate_key_csr, Path(tmp), subject
                )
            else:
                openssl = self.config.openssl
                self._run([openssl, *OPENSSL_ECPARAM, "-out", tmp], ErrorCode.KEYGEN_FAILED)
                req = [openssl, "req", "-new", "-key", tmp, "-subj", subject, *OPENSSL_REQ]
                csr = self._run(req, ErrorCode.KEYGEN_FAILED)
            os.chmod(tmp, 0o600)
            os.replace(tmp, key_path)
        finally:
            shred(tmp)  # a key that did not make it into place (renamed: nothing to do)
        return csr

    def _put_secure_key(self, fields: Fields) -> list[tuple[int, FieldValue]]:
        name = fields.get_str(Tag.KEY_NAME)
        key_der = fields.get_bytes(Tag.KEY_DER)
        algorithm = fields.get_u16(Tag.ALGORITHM, SE_RSA_2048)
        if len(name) > SE_KEY_NAME_MAX:
            raise Refusal(
                ErrorCode.KEY_NAME_TOO_LONG,
                f"key name {name!r} is {len(name)} characters; the Secure Element "
                f"takes at most {SE_KEY_NAME_MAX}",
            )
        self._check_name(name)
        self._drop_renewal()
        fd, tmp = tempfile.mkstemp(dir=self.config.key_dir, prefix=SE_KEY_PREFIX, suffix=".der")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(key_der)
            command = [*self.config.see_test, "-K", "set-key", "-a", str(algorithm)]
            command += ["-k", name, "-I", tmp]
            try:
                done = subprocess.run(
                    command,
                    capture_output=True,
                    env=self._env(),
                    timeout=self.config.tool_timeout,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise Refusal(ErrorCode.SEE_FAILED, f"cannot run see_test: {exc}") from exc
            if done.returncode != 0:
                output = (done.stdout + done.stderr).decode("utf-8", "replace")
                raise Refusal(
                    ErrorCode.SEE_FAILED, f"see_test exited with status {done.returncode}: {output}"
                )
        finally:
            # The only copy of the key outside the Secure Element: always overwritten
            # and removed (an agent that dies here has it removed at its next start).
            shred(tmp)
        self.session = Session(key_mode="see-rsa", key_name=name, key_new=True)
        self._save_session()
        log.info("loaded key %s into the Secure Element", name)
        return [(Tag.KEY_NAME, name)]

    def _put_chain(self, fields: Fields) -> list[tuple[int, FieldValue]]:
        chain = fields.get_bytes(Tag.CHAIN)
        if self.session.key_mode == "none":
            raise Refusal(ErrorCode.BAD_STATE, "no key installed: generate or load a key first")
        if b"-----BEGIN CERTIFICATE-----" not in chain:
            raise Refusal(ErrorCode.INVALID_ARGUMENT, "chain holds no PEM certificate")
        renewing = self.session.renewing
        path = self.config.key_dir / (CHAIN_FILE + (RENEW_SUFFIX if renewing else ""))
        try:
            fd, tmp = tempfile.mkstemp(dir=self.config.key_dir, prefix=".chain-")
            with os.fdopen(fd, "wb") as handle:
                handle.write(chain)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
            digest = hashlib.sha256(path.read_bytes()).digest()
        except OSError as exc:
            raise Refusal(ErrorCode.STORAGE_FAILED, f"cannot store the chain: {exc}") from exc
        if renewing:
            self.session.renewal_chain_sha256 = digest.hex()
        else:
            self.session.chain_sha256 = digest.hex()
            self.session.chain_new = True
        self._save_session()
        return [(Tag.DIGEST, digest)]

    def _prove(self, fields: Fields) -> list[tuple[int, FieldValue]]:
        nonce = fields.get_bytes(Tag.NONCE)
        # Only a proof message naming this board: anything else would make the agent
        # sign bytes of the caller's choosing with the device key (a signing oracle).
        try:
            device_id, _ = parse_proof_message(nonce)
        except BadPayload as exc:
            raise Refusal(ErrorCode.INVALID_ARGUMENT, f"PROVE refused: {exc}") from exc
        if device_id != self.config.hardware_id:
            raise Refusal(
                ErrorCode.INVALID_ARGUMENT,
                f"PROVE refused: the proof names device {device_id!r}, this board is "
                f"{self.config.hardware_id!r}",
            )
        session = self.session
        if session.key_mode == "board-ecc":
            # The renewal's key only within the session that started the renewal (a
            # RENEW_KEY_CSR since the last HELLO); otherwise the live key, which the
            # station asks for before it renews (section 6d).
            renewal = session.renewing and session.renewal_new
            key_file = str(self._key_path(renewal=renewal))
            if self.config.keys is not None:
                signature = self._with_backend(
                    ErrorCode.SIGN_FAILED, self.config.keys.sign, Path(key_file), nonce
                )
                return [(Tag.SIGNATURE, signature), (Tag.SIG_ALG, SIG_ECDSA_SHA256)]
            signature = self._run(
                [self.config.openssl, "dgst", "-sha256", "-sign", key_file],
                ErrorCode.SIGN_FAILED,
                stdin=nonce,
            )
            return [(Tag.SIGNATURE, signature), (Tag.SIG_ALG, SIG_ECDSA_SHA256)]
        if session.key_mode == "see-rsa":
            with tempfile.TemporaryDirectory(prefix="prove-") as work:
                data_path, sig_path = os.path.join(work, "nonce"), os.path.join(work, "sig")
                Path(data_path).write_bytes(nonce)
                values = {"key": session.key_name, "in": data_path, "out": sig_path}
                self._run(
                    [arg.format(**values) for arg in self.config.se_sign], ErrorCode.SIGN_FAILED
                )
                try:
                    signature = Path(sig_path).read_bytes()
                except OSError as exc:
                    raise Refusal(ErrorCode.SIGN_FAILED, f"no signature written: {exc}") from exc
            return [(Tag.SIGNATURE, signature), (Tag.SIG_ALG, SIG_RSA_PKCS1V15_SHA256)]
        raise Refusal(ErrorCode.BAD_STATE, "no key installed: nothing to prove with")

    def _status(self, fields: Fields) -> list[tuple[int, FieldValue]]:
        items = {
            "state": self.session.state,
            "key_mode": self.session.key_mode,
            "key_name": self.session.key_name,
            "chain_sha256": self.session.chain_sha256,
            "hardware_id": self.config.hardware_id,
            "agent_version": AGENT_VERSION,
            # The version the session speaks: every request after HELLO comes in it.
            "protocol_version": str(self._request_version),
        }
        if self.session.renewing:  # only then: every board's STATUS stays as short
            items["renewal_chain_sha256"] = self.session.renewal_chain_sha256
        return [(Tag.STATUS_ITEM, f"{k}={v}") for k, v in items.items()]

    def _abort(self, fields: Fields) -> list[tuple[int, FieldValue]]:
        """End the session and wipe what it made since the last HELLO: the board-ecc
        key it generated and the chain it stored (the station aborts only a session
        that failed, so no certificate of that key is whitelisted). Secure Element
        keys stay: see_test has no way to delete one; the next PUT_SECURE_KEY of the
        name replaces it. A renewal session wipes only the renewal's key and chain:
        the live ones stay. Nothing made since the last HELLO: nothing changes."""
        session = self.session
        if session.renewing and session.renewal_new:
            self._drop_renewal()
            log.info("renewal aborted; the live key and chain stay")
            return []
        if session.renewing or not (session.key_new or session.chain_new):
            log.info("abort: nothing made since the last hello, nothing changed")
            return []
        if session.key_mode == "board-ecc" and session.key_new:
            shred(self.config.key_dir / f"{session.key_name}.key")
        if session.chain_new:
            (self.config.key_dir / CHAIN_FILE).unlink(missing_ok=True)
        self.session = Session()
        self._save_session()
        log.info("session aborted")
        return []

    # ------------------------------------------------------------------ renewal

    def _key_path(self, *, renewal: bool = False) -> Path:
        return self.config.key_dir / (
            f"{self.session.key_name}.key" + (RENEW_SUFFIX if renewal else "")
        )

    def _renew_key_csr(self, fields: Fields) -> list[tuple[int, FieldValue]]:
        """Start a renewal session: a new P-256 key beside the live one, and its CSR.
        Only a board holding a board-ecc key and a chain renews (a Secure Element key
        cannot be made beside another of the same name by this agent)."""
        subject = self._subject(fields)
        session = self.session
        if session.key_mode != "board-ecc" or not session.chain_sha256:
            raise Refusal(
                ErrorCode.BAD_STATE,
                f"nothing to renew: the board is {session.state} with key mode "
                f"{session.key_mode} (renewal needs a board-ecc key and a stored chain)",
            )
        self._drop_renewal()
        csr = self._make_key_csr(self._key_path(renewal=True), subject)
        # The live key and chain belong to no session any more: no ABORT wipes them.
        session.key_new = session.chain_new = False
        session.renewing, session.renewal_chain_sha256 = True, ""
        session.renewal_new = True
        self._save_session()
        log.info("renewal: generated a new P-256 key beside %s.key", session.key_name)
        return [(Tag.CSR, csr), (Tag.KEY_NAME, session.key_name)]

    def _renew_commit(self, fields: Fields) -> list[tuple[int, FieldValue]]:
        """The station confirmed the renewal: its key and chain replace the live ones
        (the old key overwritten with zeros). Answers the digest of the live chain."""
        session = self.session
        if not session.renewing or not session.renewal_chain_sha256:
            raise Refusal(
                ErrorCode.BAD_STATE, f"no renewal with a stored chain to commit ({session.state})"
            )
        live, new = self._key_path(), self._key_path(renewal=True)
        try:
            old = open(live, "r+b", buffering=0)  # noqa: SIM115 - zeroed after the swap
        except FileNotFoundError:
            old = None
        try:
            os.replace(new, live)
            if old is not None:  # the replaced key's blocks, overwritten
                size = os.fstat(old.fileno()).st_size
                old.write(bytes(size))
                os.fsync(old.fileno())
        except OSError as exc:
            raise Refusal(ErrorCode.STORAGE_FAILED, f"cannot commit the renewal: {exc}") from exc
        finally:
            if old is not None:
                old.close()
        self._finish_commit()
        chain = self.config.key_dir / CHAIN_FILE
        log.info("renewal committed")
        return [(Tag.DIGEST, hashlib.sha256(chain.read_bytes()).digest())]

    def _finish_commit(self) -> None:
        """Second half of RENEW_COMMIT (also at start, after a commit a power cut
        interrupted): once the new key is in place, the new chain follows it."""
        session = self.session
        if not session.renewing:
            self._drop_renewal()  # files a renewal left when its session ended
            return
        if self._key_path(renewal=True).exists():
            return
        pending = self.config.key_dir / (CHAIN_FILE + RENEW_SUFFIX)
        if pending.exists():
            os.replace(pending, self.config.key_dir / CHAIN_FILE)
        self.session = Session(
            key_mode=session.key_mode,
            key_name=session.key_name,
            chain_sha256=session.renewal_chain_sha256 or session.chain_sha256,
        )
        self._save_session()

    def _drop_renewal(self) -> None:
        """Wipe a renewal session's key and chain; the live ones stay."""
        session = self.session
        if session.renewing:
            # The session first: a power cut before the files go must not look like a
            # commit half done (_finish_commit) at the next start.
            session.renewing, session.renewal_chain_sha256 = False, ""
            session.renewal_new = False
            self._save_session()
        if session.key_mode == "none":
            return
        shred(self._key_path(renewal=True))
        (self.config.key_dir / (CHAIN_FILE + RENEW_SUFFIX)).unlink(missing_ok=True)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _check_name(name: str) -> None:
        if not _NAME_RE.fullmatch(name) or name in {".", ".."}:
            raise Refusal(
                ErrorCode.INVALID_ARGUMENT, f"key name {name!r}: 1-64 characters of [A-Za-z0-9._-]"
            )

    def _env(self) -> dict[str, str] | None:
        return None if self.config.env is None else dict(self.config.env)

    def _path(self) -> str | None:
        env = self.config.env if self.config.env is not None else os.environ
        return env.get("PATH")

    def _run(self, command: Sequence[str], code: ErrorCode, stdin: bytes | None = None) -> bytes:
        try:
            done = subprocess.run(
                list(command),
                input=stdin,
                capture_output=True,
                env=self._env(),
                timeout=self.config.tool_timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise Refusal(code, f"cannot run {command[0]}: {exc}") from exc
        if done.returncode != 0:
            raise Refusal(
                code,
                f"{shlex.join(command[:2])} exited with status {done.returncode}: "
                + done.stderr.decode("utf-8", "replace").strip(),
            )
        return done.stdout

    @staticmethod
    def _with_backend(
        code: ErrorCode, call: Callable[[Path, T], bytes], path: Path, arg: T
    ) -> bytes:
        try:
            return call(path, arg)
        except Exception as exc:  # the backend's failure is the board's refusal
            raise Refusal(code, f"key backend: {exc!r}") from exc

    def _load_session(self) -> Session:
        try:
            data = json.loads((self.config.key_dir / STATE_FILE).read_text())
            return Session(
                key_mode=str(data["key_mode"]),
                key_name=str(data["key_name"]),
                key_new=bool(data["key_new"]),
                chain_sha256=str(data["chain_sha256"]),
                chain_new=bool(data.get("chain_new", False)),
                renewing=bool(data.get("renewing", False)),
                renewal_chain_sha256=str(data.get("renewal_chain_sha256", "")),
                renewal_new=bool(data.get("renewal_new", False)),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return Session()

    def _save_session(self) -> None:
        s = self.session
        data = {
            "key_mode": s.key_mode,
            "key_name": s.key_name,
            "key_new": s.key_new,
            "chain_sha256": s.chain_sha256,
            "chain_new": s.chain_new,
            "renewing": s.renewing,
            "renewal_chain_sha256": s.renewal_chain_sha256,
            "renewal_new": s.renewal_new,
        }
        path = self.config.key_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m firmware_hooks.agent", description="Provisioning agent of a board."
    )
    parser.add_argument("--port", required=True, help="serial device or pyserial URL")
    parser.add_argument("--baud", type=int, default=115200)
    parser.add_argument("--key-dir", type=Path, default=Path("/etc/provisioning"))
    parser.add_argument("--hardware-id", help="default: device tree serial or /etc/machine-id")
    parser.add_argument("--see-test", default="see_test", help="see_test command (shell words)")
    parser.add_argument(
        "--se-sign",
        default=DEFAULT_SE_SIGN,
        help="command signing {in} into {out} with Secure Element key {key} (shell words)",
    )
    parser.add_argument("--openssl", default="openssl")
    parser.add_argument(
        "--max-protocol",
        type=int,
        choices=[PROTOCOL_VERSION, PROTOCOL_V2, PROTOCOL_V3],
        default=PROTOCOL_V3,
        help="highest protocol version to agree to in HELLO (1: behave as a version 1 board)",
    )
    parser.add_argument(
        "--no-renew",
        action="store_true",
        help="no field renewal (answer as agent 1.0.0 did: no 'renew' capability)",
    )
    parser.add_argument(
        "--exit-on-disconnect",
        action="store_true",
        help="exit when the port goes away instead of reopening it",
    )
    parser.add_argument(
        "--notify-ready", action="store_true", help="print READY on stdout once the port is open"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s agent %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    import serial  # pyserial

    config = AgentConfig(
        key_dir=args.key_dir,
        hardware_id=args.hardware_id or default_hardware_id(),
        see_test=tuple(shlex.split(args.see_test)),
        se_sign=tuple(shlex.split(args.se_sign)),
        openssl=args.openssl,
        protocol_versions=tuple(range(PROTOCOL_VERSION, args.max_protocol + 1)),
        renewal=not args.no_renew,
    )
    agent = Agent(config)
    while True:
        try:
            port = serial.serial_for_url(args.port, baudrate=args.baud, timeout=0.05)
        except (OSError, ValueError) as exc:
            log.error("cannot open %s: %s", args.port, exc)
            if args.exit_on_disconnect:
                return 1
            time.sleep(1.0)
            continue
        log.info("agent %s serving %s as %s", AGENT_VERSION, args.port, config.hardware_id)
        if args.notify_ready:
            print("READY", flush=True)
        try:
            agent.serve(port)
        except Disconnected as exc:
            log.info("port gone: %s", exc)
        finally:
            port.close()
        if args.exit_on_disconnect:
            return 0
        time.sleep(1.0)


if __name__ == "__main__":
    sys.exit(main())
