"""The board side of the provisioning line.

Everything in this package imports only the Python standard library and
pyserial, so the folder can be copied onto a board as is:

- ``protocol``: the wire format (COBS framing, header, CRC-32, chunking, TLV),
  a pure codec with no I/O. The station imports it too.
- ``link``: a transport over any pyserial-like port, with sized reads,
  per-command timeouts and bounded retries.
- ``host``: ``BoardClient``, what the station's line driver talks to.
- ``agent``: the board agent (``python3 -m firmware_hooks.agent``).
- ``see_test``: a stand-in for ARTIK's ``see_test`` tool, for tests and demos.
- ``simboard``: a simulated board (the real agent on a pseudo-terminal pair).

The wire protocol is specified in ``docs/serial-protocol.md``.
"""

AGENT_VERSION = "1.1.0"  # 1.1.0: field renewal (capability "renew")
