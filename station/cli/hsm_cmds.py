"""`station hsm ...`: check the token, list tokens and keys, delete a key the station made."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer
from cryptography import x509

from hsm import KeyNotOwned, KeyStore, Pkcs11Uri, list_tokens
from hsm.uri import resolve_module
from station import keys_made
from station.ca import _activate_dev_token_config
from station.cli.common import cli_errors, console
from station.cli.common import settings as load_settings
from station.errors import ConfigurationError, Kind, StationError
from station.hsm_check import CheckFailed, check

hsm_app = typer.Typer(
    help="Check the PKCS#11 token, list its tokens and keys, delete a key the station made.",
    no_args_is_help=True,
)

KeyUriOption = Annotated[
    str | None,
    typer.Option(
        "--key-uri",
        help="pkcs11: URI of the key (default: the CA key).",
    ),
]


def _keystore(key_uri: str | None) -> KeyStore:
    settings = load_settings()
    uri = key_uri or settings.resolved_ca_key_uri()
    if uri is None:
        raise ConfigurationError(
            "no key URI: give --key-uri, set STATION_CA_KEY_URI or run `station init`"
        )
    _activate_dev_token_config(settings)
    return KeyStore(uri, default_module=settings.pkcs11_module)


def _ca_certificate() -> x509.Certificate | None:
    path = load_settings().ca_cert_path
    if not path.exists():
        return None
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        return None


@hsm_app.command("check")
@cli_errors
def check_cmd(
    key_uri: KeyUriOption = None,
    seconds: Annotated[
        float, typer.Option(min=0.1, max=60, help="How long to measure the signature rate.")
    ] = 2.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Module, token, mechanisms, key flags, a verified test signature and the signature rate.

    Exits non-zero when the key could leave the token or signing fails.
    """
    report = check(_keystore(key_uri), _ca_certificate(), seconds=seconds)
    if as_json:
        typer.echo(json.dumps({**asdict(report), "ok": report.ok}, indent=2))
    else:
        console.print(f"module      {report.module}", highlight=False)
        for k, v in report.token.items():
            console.print(f"token.{k:<16} {v}", highlight=False)
        for row in report.mechanisms:
            state = ", ".join(row["present"]) if row["ok"] else "MISSING"
            console.print(f"mechanism   {row['need']:<28} {state}", highlight=False)
        for k, v in report.key.items():
            console.print(f"key.{k:<18} {v}", highlight=False)
        console.print(
            f"signature   {report.signature}"
            + (f" (with {report.verified_with})" if report.verified_with else ""),
            highlight=False,
        )
        if report.signatures_per_second is not None:
            console.print(
                f"rate        {report.signatures_per_second:.0f} signatures/s "
                f"(one process, {seconds:g} s)",
                highlight=False,
            )
        console.print("result      " + ("ok" if report.ok else "FAILED"), highlight=False)
    if not report.ok:
        raise CheckFailed("; ".join(report.problems))


@hsm_app.command("list")
@cli_errors
def list_cmd(
    key_uri: KeyUriOption = None,
    module: Annotated[
        str | None,
        typer.Option("--module", help="PKCS#11 module to list (default: the key URI's)."),
    ] = None,
) -> None:
    """Tokens, and the private keys in the key URI's token, as RFC 7512 URIs (never a PIN)."""
    settings = load_settings()
    uri_text = key_uri or settings.resolved_ca_key_uri()
    uri = Pkcs11Uri.parse(uri_text) if uri_text else None
    _activate_dev_token_config(settings)
    path = module or (resolve_module(uri, settings.pkcs11_module) if uri else None)
    path = path or settings.pkcs11_module
    for tok in list_tokens(path):
        token_uri = Pkcs11Uri(
            token=tok.label,
            manufacturer=tok.manufacturer,
            model=tok.model,
            serial=tok.serial,
            module_path=path,
        )
        typer.echo(f"token  {token_uri}")
    if uri is None or (module is not None and module != resolve_module(uri, path)):
        return
    store = KeyStore(uri, default_module=settings.pkcs11_module)
    for key in store.private_keys():
        key_uri_out = Pkcs11Uri(
            token=uri.token,
            serial=uri.serial,
            object=key.label or None,
            id=key.id or None,
            type="private",
            module_path=store.module,
        )
        flags = "sensitive" if key.attributes.get("SENSITIVE") else "NOT-SENSITIVE"
        if key.attributes.get("EXTRACTABLE") is not False:
            flags += ",EXTRACTABLE"
        typer.echo(f"key    {key_uri_out}  {key.key_type} {flags}")


@hsm_app.command("delete-key")
@cli_errors
def delete_key_cmd(
    key_uri: Annotated[
        str, typer.Option("--key-uri", help="pkcs11: URI of the key to delete (object= or id=).")
    ],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a key pair the station generated (never one it did not make, nor the CA's key)."""
    settings = load_settings()
    store = _keystore(key_uri)
    key = store.private_key()
    if not keys_made.made_by_station(settings, key):
        raise KeyNotOwned(
            f"the station did not make the key {store.uri} (it is not in "
            f"{settings.data_dir / 'keys-made.json'}); it may be a key ceremony's: delete it "
            "with the token's own tools if you mean to"
        )
    cert = _ca_certificate()
    if cert is not None and keys_made.public_key_sha256(cert) == keys_made.public_key_sha256(key):
        raise StationError(
            f"{store.uri} is the key of the current CA certificate; run `station init --force` "
            "first",
            code="ca-key-in-use",
            kind=Kind.CONFLICT,
        )
    if not yes:
        typer.confirm(f"delete the key {store.uri} from the token?", abort=True)
    store.delete_key()
    keys_made.forget(settings, key)
    console.print(f"deleted the key {store.uri}", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(hsm_app, name="hsm")
