"""Publishing: what relying parties learn about the station's certificates.

The whitelist goes to AWS IoT (``aws_sync``, with ``aws_state`` and the loop in
``whitelist_sync``); the CRL (``crl``) and OCSP answers (``ocsp``) go to any other
relying party: a local MQTT broker, a gateway, a second cloud. Both are signed in
the token by the CA key; what they say comes from the ledger's tables through
``revoked``, a read-only query of its own.
"""
