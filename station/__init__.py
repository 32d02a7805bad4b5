"""The provisioning station: CA profiles, CSR policy, ledger, serial line, AWS IoT, reports."""

__version__ = "0.1.0"
