"""The serial line driver: boards on USB serial ports, provisioned one step at a time.

``provision_board`` takes one board through steps 2 to 7 of the design
(hello, key, issue, chain, proof of possession, verified); ``LineDriver``
runs it on every port at once, one thread per port, and ``LineStatus`` keeps
what an operator (the rich view) and the dashboard (``line-status.json``) see.
"""

from station.line.driver import LineDriver, open_port_client
from station.line.provision import Outcome, ProvisionContext, failure_code, provision_board
from station.line.status import LineStatus

__all__ = [
    "LineDriver",
    "LineStatus",
    "Outcome",
    "ProvisionContext",
    "failure_code",
    "open_port_client",
    "provision_board",
]
