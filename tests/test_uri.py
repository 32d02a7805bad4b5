"""RFC 7512 key URIs."""

from __future__ import annotations

import pytest

from hsm import PinUnavailable, Pkcs11Uri, UriError


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
    assert Pkcs11Uri(pin_source=f"file:{pin}").read_pin() == "1234"
    assert Pkcs11Uri(pin_source=str(pin)).read_pin() == "1234"
    with pytest.raises(PinUnavailable):
        Pkcs11Uri(pin_source=str(tmp_path / "missing")).read_pin()
