"""Standard enrollment protocols (EST, RFC 7030; CMP, RFC 9483): their wire formats.

The HTTP routes live in api/routers/; this package turns bytes into requests and
answers into bytes, through ASN.1 libraries (cryptography, asn1crypto), never
hand-written DER. Issuance itself is the ledger's one path.
"""
