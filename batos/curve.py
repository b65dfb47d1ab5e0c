"""CurveZMQ for the broker: keys under ``var/keys/``, an allow-list of client public keys.

Layout: ``broker.key``/``broker.key_secret`` (the server pair), ``<name>.key``/``.key_secret``
for clients (``services`` is used by every BAT OS worker, ``console`` by consoles), and
``authorized/`` holding the public keys the broker accepts. A client whose key is not in
``authorized/`` completes no handshake and receives nothing.

Keys carry a role (broker/roles.py): a key listed as ``authorized/services*.key`` is a service key
(may register workers and call anything); every other listed key is a console key (the kernel's
console commands and the broker's read-only commands only). The broker reads the list at start.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from batos.config import Settings


def ensure_keys(settings: Settings, clients: tuple[str, ...] = ("services", "console")) -> Path:
    keys = settings.keys_dir
    authorized = keys / "authorized"
    authorized.mkdir(parents=True, exist_ok=True)
    for name in ("broker", *clients):
        if not (keys / f"{name}.key_secret").exists():
            zmq.auth.create_certificates(str(keys), name)
            os.chmod(keys / f"{name}.key_secret", 0o600)
    for name in clients:
        target = authorized / f"{name}.key"
        if not target.exists():
            shutil.copy(keys / f"{name}.key", target)
    return keys


def configure_server(sock: zmq.Socket, settings: Settings) -> ThreadAuthenticator:
    keys = ensure_keys(settings)
    auth = ThreadAuthenticator(sock.context)
    auth.start()
    auth.configure_curve(domain="*", location=str(keys / "authorized"))
    public, secret = zmq.auth.load_certificate(str(keys / "broker.key_secret"))
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    return auth


def configure_client(sock: zmq.Socket, settings: Settings, name: str | None = None) -> None:
    """``name`` picks the key pair under var/keys/; default: ``settings.curve_key``."""
    keys = settings.keys_dir
    name = name or settings.curve_key
    public, secret = zmq.auth.load_certificate(str(keys / f"{name}.key_secret"))
    server_public, _ = zmq.auth.load_certificate(str(keys / "broker.key"))
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server_public
