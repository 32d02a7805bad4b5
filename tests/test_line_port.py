"""The line's port wrapper (CountingPort) on a real pty: bytes counted, sized reads
straight on the descriptor, the link's timeouts reaching pyserial."""

from __future__ import annotations

import contextlib
import os
import time
import tty
from collections.abc import Iterator

import pytest

from firmware_hooks.protocol import Disconnected, MsgType
from station.line.driver import CountingPort, open_port_client


@pytest.fixture
def pty_pair() -> Iterator[tuple[int, str]]:
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    os.close(slave)
    yield master, path
    with contextlib.suppress(OSError):  # the hang-up test closed it
        os.close(master)


def test_read_available_takes_a_whole_burst_and_counts_it(pty_pair: tuple[int, str]) -> None:
    master, path = pty_pair
    client = open_port_client(path)
    port = client.port
    assert isinstance(port, CountingPort)
    os.write(master, b"x" * 3000)
    time.sleep(0.05)
    data = port.read_available()
    assert data == b"x" * 3000  # one call, not one per byte or per in_waiting
    assert port.rx == 3000
    client.close()


def test_a_silent_port_reads_empty_after_the_timeout(pty_pair: tuple[int, str]) -> None:
    _, path = pty_pair
    client = open_port_client(path)
    port = client.port
    assert isinstance(port, CountingPort) and port.timeout == 0.05
    started = time.monotonic()
    assert port.read_available() == b""
    assert time.monotonic() - started >= 0.045
    client.close()


def test_the_link_sets_its_timeouts_on_the_wrapped_pyserial_port(pty_pair: tuple[int, str]) -> None:
    _, path = pty_pair
    client = open_port_client(path)
    port = client.port
    assert isinstance(port, CountingPort)
    raw = port._port
    assert raw.write_timeout == port.write_timeout == 5.0
    assert raw.timeout == 0.05
    client.close()


def test_a_port_whose_far_end_hangs_up_is_disconnected(pty_pair: tuple[int, str]) -> None:
    master, path = pty_pair
    client = open_port_client(path, timeouts={MsgType.HELLO: 2.0}, retries=0)
    os.close(master)
    started = time.monotonic()
    with pytest.raises(Disconnected):
        client.hello()
    assert time.monotonic() - started < 1.0
    client.close()
