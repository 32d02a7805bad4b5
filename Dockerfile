# Provisioning station: HTTP API + dashboard, CA key in a PKCS#11 token.
# Development: SoftHSM2 token in the /tokens volume (`station init` inside the
# container). Factory: mount the HSM vendor's PKCS#11 module and set
# STATION_CA_KEY_URI (see the README).
FROM python:3.11-slim-bookworm

# Debian bookworm versions; bump them when a point release replaces them.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        softhsm2=2.6.1-2.1 \
        opensc=0.23.0-0.3+deb12u2 \
        libpango-1.0-0=1.50.12+ds-1 \
        libpangoft2-1.0-0=1.50.12+ds-1 \
        libharfbuzz-subset0=6.0.0+dfsg-3 \
        fonts-dejavu-core=2.37-6 \
        fonts-noto-cjk=1:20220127+repack1-1 \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    STATION_DATA_DIR=/data \
    STATION_HOST=0.0.0.0 \
    STATION_PORT=8000 \
    STATION_PKCS11_MODULE=/usr/lib/softhsm/libsofthsm2.so \
    SOFTHSM2_CONF=/etc/softhsm/softhsm2.conf

WORKDIR /app
COPY pyproject.toml requirements.lock README.md ./
COPY hsm/ hsm/
COPY station/ station/
COPY api/ api/
COPY firmware_hooks/ firmware_hooks/
COPY jitr/ jitr/
# Runtime dependencies at the versions of the lock file.
RUN pip install --constraint requirements.lock . \
    && rm -rf build ./*.egg-info

# Non-root (numeric, so the runtime need not resolve the name); owns its
# volumes and the SoftHSM configuration.
RUN groupadd --system --gid 10001 station \
    && useradd --system --uid 10001 --gid 10001 --create-home --groups softhsm station \
    && mkdir -p /data /tokens \
    && printf 'directories.tokendir = /tokens\nobjectstore.backend = file\nlog.level = ERROR\n' \
        > /etc/softhsm/softhsm2.conf \
    && chown station:station /data /tokens \
    && chown station:softhsm /etc/softhsm/softhsm2.conf \
    && chmod 0640 /etc/softhsm/softhsm2.conf

USER 10001:10001
VOLUME ["/data", "/tokens"]
EXPOSE 8000

# `station serve` reads STATION_HOST and STATION_PORT, and so does the health check:
# another port is `-e STATION_PORT=9000 -p 9000:9000`, and the check follows it. HTTPS
# when STATION_TLS_CERT and STATION_TLS_KEY name a mounted pair (the probe skips the
# name check: the certificate names the host, not 127.0.0.1).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, ssl, urllib.request as u; t = os.environ.get('STATION_TLS_CERT'); u.urlopen(('https' if t else 'http') + '://127.0.0.1:%s/healthz' % os.environ['STATION_PORT'], timeout=4, context=ssl._create_unverified_context() if t else None)"]

ENTRYPOINT ["station"]
CMD ["serve"]
