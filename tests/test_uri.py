"""RFC 7512 key URIs."""

from __future__ import annotations

import pytest

from hsm import KeyStore, PinFileNotPrivate, PinUnavailable, Pkcs11Uri, TokenNotFound, UriError
from hsm.uri import resolve_module

SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"


def test_parses_path_and_query_attributes() -> None:
    uri = Pkcs11Uri.parse(
        "pkcs11:token=Line%201;object=ca-key;id=%01%a2;serial=abc;slot-id=3;type=private"
        "?module-path=/usr/lib/x.so&pin-source=file:/run/pin"
    )
    assert uri.token == "Line 1" and uri.object == "ca-key" and uri.id == b"\x01\xa2"
    assert uri.serial == "abc" and uri.slot_id == 3 and uri.type == "private"
    assert uri.module_path == "/usr/lib/x.so" and uri.pin_source == "file:/run/pin"


def test_round_trips() -> None:
    text = "pkcs11:token=t;object=o;id=%0a%10?module-path=/m.so&pin-source=/p"
    assert Pkcs11Uri.parse(str(Pkcs11Uri.parse(text))) == Pkcs11Uri.parse(text)


def test_pin_value_never_printed() -> None:
    uri = Pkcs11Uri.parse("pkcs11:token=t;object=o?pin-value=s3cret")
    assert uri.read_pin() == "s3cret"
    assert "s3cret" not in str(uri) and "s3cret" not in repr(uri)


@pytest.mark.parametrize(
    "text",
    [
        "file:/x",
        "pkcs11:tokn=t",
        "pkcs11:token=t;token=u",
        "pkcs11:slot-id=x",
        "pkcs11:type=banana",
        "pkcs11:token?pin-value=1",
        "pkcs11:token=t?pin-value=1&pin-source=/p",
        "pkcs11:token=t?debug=1",
    ],
)
def test_rejects_malformed(text: str) -> None:
    with pytest.raises(UriError):
        Pkcs11Uri.parse(text)


def test_pin_source_file(tmp_path) -> None:
    pin = tmp_path / "pin"
    pin.write_text("1234\n")
    pin.chmod(0o600)
    assert Pkcs11Uri(pin_source=f"file:{pin}").read_pin() == "1234"
    assert Pkcs11Uri(pin_source=str(pin)).read_pin() == "1234"
    with pytest.raises(PinUnavailable):
        Pkcs11Uri(pin_source=str(tmp_path / "missing")).read_pin()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_pin_file_readable_by_group_or_others_is_refused(tmp_path, mode: int) -> None:
    pin = tmp_path / "pin"
    pin.write_text("1234")
    pin.chmod(mode)
    with pytest.raises(PinFileNotPrivate) as info:
        Pkcs11Uri(pin_source=f"file:{pin}").read_pin()
    assert info.value.code == "hsm-pin-file-not-private"
    assert info.value.kind == "not-configured"
    assert "chmod 600" in str(info.value) and "1234" not in str(info.value)


def test_every_rfc7512_attribute_survives_a_round_trip() -> None:
    text = (
        "pkcs11:token=a;manufacturer=Acme;model=M%201;serial=42;object=k;type=private;"
        "slot-description=Slot%20A;slot-manufacturer=Vendor;library-manufacturer=Lib%20Co;"
        "library-description=Lib;library-version=2.6;id=%01;slot-id=1"
        "?module-name=yubihsm&pin-source=/p"
    )
    uri = Pkcs11Uri.parse(text)
    assert (uri.manufacturer, uri.model, uri.module_name) == ("Acme", "M 1", "yubihsm")
    assert (uri.slot_description, uri.slot_manufacturer) == ("Slot A", "Vendor")
    assert (uri.library_manufacturer, uri.library_description) == ("Lib Co", "Lib")
    assert uri.library_version == "2.6"
    again = str(uri)
    assert "manufacturer=Acme" in again and "module-name=yubihsm" in again
    assert Pkcs11Uri.parse(again) == uri


def test_issue_example_keeps_manufacturer_and_module_name() -> None:
    uri = Pkcs11Uri.parse("pkcs11:token=a;manufacturer=Acme?module-name=yubihsm")
    assert str(uri) == "pkcs11:token=a;manufacturer=Acme?module-name=yubihsm"


def test_module_name_is_resolved_or_refused_by_name() -> None:
    assert resolve_module(Pkcs11Uri(module_name="libsofthsm2"), "/x.so") == SOFTHSM
    assert resolve_module(Pkcs11Uri(module_name="softhsm2"), "/x.so") == SOFTHSM
    with pytest.raises(UriError, match="yubihsm"):
        resolve_module(Pkcs11Uri(module_name="yubihsm"), SOFTHSM)
    with pytest.raises(UriError, match="module-path"):
        resolve_module(Pkcs11Uri(module_name="../x"), SOFTHSM)
    with pytest.raises(UriError, match="different modules"):
        resolve_module(Pkcs11Uri(module_name="yubihsm", module_path=SOFTHSM), SOFTHSM)
    with pytest.raises(UriError):
        KeyStore("pkcs11:token=a?module-name=yubihsm", default_module=SOFTHSM)


def test_library_version_is_checked() -> None:
    with pytest.raises(UriError):
        Pkcs11Uri.parse("pkcs11:library-version=two")


@pytest.mark.parametrize(
    "attr",
    [
        "manufacturer=Acme",
        "model=Nope",
        "slot-description=Nope",
        "slot-manufacturer=Nope",
        "library-manufacturer=Nope",
        "library-description=Nope",
        "library-version=99.1",
    ],
)
def test_token_attributes_that_do_not_match_select_no_token(ca_home, attr: str) -> None:
    """The run's SoftHSM token matches by label; an extra attribute that differs must not."""
    base = (ca_home / "ca-key.uri").read_text().strip()
    path, _, query = base.partition("?")
    ks = KeyStore(f"{path};{attr}?{query}", default_module=SOFTHSM)
    with pytest.raises(TokenNotFound):
        ks.has_key()
    assert KeyStore(base, default_module=SOFTHSM).has_key()


def test_token_attributes_that_match_select_the_token(ca_home) -> None:
    base = (ca_home / "ca-key.uri").read_text().strip()
    path, _, query = base.partition("?")
    extra = (
        "manufacturer=SoftHSM%20project;model=SoftHSM%20v2;"
        "library-manufacturer=SoftHSM;library-version=2"
    )
    assert KeyStore(f"{path};{extra}?{query}", default_module=SOFTHSM).has_key()
