"""CurveZMQ for the broker: keys under ``var/keys/``, an allow-list of client public keys.

Layout: ``broker.key``/``broker.key_secret`` (the server pair), ``<name>.key``/``.key_secret``
for clients (``services`` is used by every BAT OS worker, ``console`` by consoles), and
``authorized/`` holding the public keys the broker accepts. A client whose key is not in
``authorized/`` completes no handshake and receives nothing.

Keys carry a role (broker/roles.py): a key listed with an ``authorized/<name>.services`` file beside it is a
service key that may serve the services named there (``*`` = any); every other listed key is a console key
(the kernel's console commands and the broker's read-only commands only). The broker reads the list at
start. ``services`` (every local BAT OS worker: they run as one user and can read each other's keys anyway)
is listed for ``*``. A key for another host serves only what it is given:

    python -m batos.curve add memory-host --serves memory    # var/keys/memory-host.key_secret + its list

then copy ``memory-host.key_secret`` and ``broker.key`` to that host's ``var/keys/`` and run its worker with
``BATOS_CURVE_SERVICE_KEY=memory-host``. ``add NAME`` without ``--serves`` makes a console key.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from batos.config import Settings

LOCAL_SERVICE_KEY = "services"  # the key of every local worker (Settings.curve_service_key's default)
SERVICES_SUFFIX = ".services"  # broker.roles reads authorized/<name>.services


def ensure_keys(settings: Settings, clients: tuple[str, ...] = (LOCAL_SERVICE_KEY, "console")) -> Path:
    keys = settings.keys_dir
    authorized = keys / "authorized"
    authorized.mkdir(parents=True, exist_ok=True)
    for name in ("broker", *clients):
        _create(keys, name)
    for name in clients:
        target = authorized / f"{name}.key"
        if not target.exists():
            shutil.copy(keys / f"{name}.key", target)
    local = authorized / f"{LOCAL_SERVICE_KEY}{SERVICES_SUFFIX}"
    if (authorized / f"{LOCAL_SERVICE_KEY}.key").exists() and not local.exists():
        _write_private(local, "# every local BAT OS worker uses this key\n*\n")
    return keys


def add_key(settings: Settings, name: str, serves: list[str] | None) -> Path:
    """A new allow-listed key ``name``: a service key serving ``serves`` (``["*"]`` = any), or a console key when
    ``serves`` is None. The broker reads the allow-list at start: restart it (``make down && make up``)."""
    if not name or "/" in name or name.startswith(".") or name == "broker":
        raise ValueError(f"not a usable key name: {name!r}")
    keys = ensure_keys(settings)
    _create(keys, name)
    authorized = keys / "authorized"
    shutil.copy(keys / f"{name}.key", authorized / f"{name}.key")
    listing = authorized / f"{name}{SERVICES_SUFFIX}"
    if serves is None:
        listing.unlink(missing_ok=True)
    else:
        _write_private(listing, "".join(f"{s}\n" for s in serves))
    return keys / f"{name}.key_secret"


def _create(keys: Path, name: str) -> None:
    if not (keys / f"{name}.key_secret").exists():
        zmq.auth.create_certificates(str(keys), name)
        os.chmod(keys / f"{name}.key_secret", 0o600)


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o600)
    tmp.replace(path)  # atomic: a broker starting beside never reads half a list


def configure_server(sock: zmq.Socket[object], settings: Settings) -> ThreadAuthenticator:
    keys = ensure_keys(settings)
    auth = ThreadAuthenticator(sock.context)
    auth.start()
    auth.configure_curve(domain="*", location=str(keys / "authorized"))
    public, secret = zmq.auth.load_certificate(str(keys / "broker.key_secret"))
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    return auth


def configure_client(sock: zmq.Socket[object], settings: Settings, name: str | None = None) -> None:
    """``name`` picks the key pair under var/keys/; default: ``settings.curve_key``."""
    keys = settings.keys_dir
    name = name or settings.curve_key
    public, secret = zmq.auth.load_certificate(str(keys / f"{name}.key_secret"))
    server_public, _ = zmq.auth.load_certificate(str(keys / "broker.key"))
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server_public


def main(argv: list[str] | None = None) -> int:
    import argparse

    from batos.config import load

    parser = argparse.ArgumentParser(prog="python -m batos.curve", description="CurveZMQ keys of the broker")
    sub = parser.add_subparsers(dest="action", required=True)
    add = sub.add_parser("add", help="create and allow-list a key")
    add.add_argument("name")
    add.add_argument("--serves", help="comma-separated services this key may serve (a service key); '*' = any")
    args = parser.parse_args(argv)
    serves = [s.strip() for s in args.serves.split(",") if s.strip()] if args.serves is not None else None
    secret = add_key(load(), args.name, serves)
    kind = f"service key serving {', '.join(serves) or 'nothing'}" if serves is not None else "console key"
    print(f"{secret}: {kind}. Restart the broker to load it; a remote host needs this file and "
          f"{secret.parent / 'broker.key'} in its var/keys/.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
