# Two commands for a newcomer: `make demo` and `make test`. Both run `make setup`
# first, which installs what the station and its tests need and is idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

# Debian packages: the token and its tools, OpenSSL, the mTLS broker used to
# check issued chains, PostgreSQL for the shared ledger, Chromium for the
# dashboard test, poppler for checking PDF reports; a TPM 2.0 simulator with its
# resource manager and PKCS#11 module, and opencryptoki, the two other tokens the
# key-store tests run on (docs/hsm.md); pango and fonts for WeasyPrint's PDF
# reports (DejaVu for Latin, Noto CJK for Chinese, Japanese and Korean); zbar-tools
# to read back the QR codes of shipping labels; strongSwan's `pki --est` and curl as
# real EST clients.
DEB_PACKAGES := softhsm2 opensc openssl libengine-pkcs11-openssl mosquitto \
	mosquitto-clients postgresql poppler-utils chromium python3-venv \
	swtpm swtpm-tools tpm2-tools tpm2-abrmd libtss2-tcti-tabrmd0 libtpm2-pkcs11-1 \
	libtpm2-pkcs11-tools dbus opencryptoki iproute2 \
	libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz-subset0 fonts-dejavu-core fonts-noto-cjk \
	zbar-tools strongswan-pki libstrongswan-extra-plugins libstrongswan-standard-plugins curl

.PHONY: setup demo test lint bench lock clean
.DEFAULT_GOAL := help

help:
	@echo "make demo   - install what is needed, then provision a demo batch"
	@echo "make test   - install what is needed, then run the whole test suite"
	@echo "make lint   - ruff, mypy, hadolint, cfn-lint"
	@echo "make bench  - benchmarks (see docs/benchmarks.md)"
	@echo "make lock   - re-resolve requirements.lock from pyproject.toml"

setup: .stamp-debs $(VENV)/.stamp

.stamp-debs: Makefile
	@missing=""; for p in $(DEB_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@touch $@

$(VENV)/.stamp: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	@touch $@

demo: setup
	$(BIN)/station demo

test: setup
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile
	$(BIN)/cfn-lint deploy/*.yaml

# Each benchmark runs the station and its baseline side by side and prints ratios.
bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# Re-resolve the lock from pyproject.toml (needs the network to PyPI).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q '.[dev]'
	.lock-venv/bin/pip freeze --exclude provisioning-station > requirements.lock
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .stamp-debs build *.egg-info
