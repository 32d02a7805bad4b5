"""CONTRACT STUB, being implemented by the lead engineer right now.

class DeviceProfile (frozen dataclass): days: int = 3650, backdate_seconds: int = 300

class CertificateAuthority:
    certificate: x509.Certificate           # the CA certificate
    chain_pem: bytes                        # CA certificate(s), PEM
    def issue(self, csr: x509.CertificateSigningRequest, *, subject: x509.Name,
              serial: int, profile: DeviceProfile, now: datetime | None = None) -> x509.Certificate
        # signs through the HSM; does NOT check policy (station.policy does)
    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate
    def health(self) -> None   # raises hsm.errors.HsmError if token/key unusable

def open_ca(settings: Settings) -> CertificateAuthority   # raises ConfigurationError if no CA yet
def new_serial() -> int  # random positive, < 2**159
"""
