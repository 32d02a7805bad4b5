"""CONTRACT STUB, being implemented by the lead engineer right now.

def load_csr(data: bytes) -> x509.CertificateSigningRequest
    # PEM or DER; raises PolicyError(code="malformed-csr") on anything else
def check_csr(csr) -> None
    # raises PolicyError with codes: bad-signature, weak-key, unsupported-key, forbidden-extension...
def public_key_sha256(csr_or_cert) -> str  # hex SHA-256 of SubjectPublicKeyInfo DER
def parse_subject_template(template: str, **values: str) -> x509.Name
    # "/O=company/OU=team/CN={device_id}/C=US" -> x509.Name (order preserved)
"""
