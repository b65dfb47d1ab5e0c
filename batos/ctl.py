"""`make up`, `make status`, `make down`: drive supervisord and wait for real readiness.

``up`` returns when every program is RUNNING and every service worker has registered with
the broker; otherwise it names the program that failed, prints its log tail and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path
from typing import Any

from batos import hostconf, supervisor_rpc, transport
from batos.client import Client
from batos.config import REPO_ROOT, Settings, load
from batos.errors import ServiceError
from batos.programs import PROGRAMS, REGISTERS
from proto import contract
from proto.bodies.broker import Workers, WorkerTable

CONF = REPO_ROOT / "supervisord.conf"
UP_TIMEOUT = 240.0  # first start converts nothing (make setup did) but loads two models on 2 cores


def supervisor(settings: Settings) -> xmlrpc.client.ServerProxy:
    return supervisor_rpc.proxy(supervisor_rpc.url_for(settings))


def supervisor_running(settings: Settings) -> bool:
    return supervisor_rpc.running(supervisor_rpc.url_for(settings))


def prepare_var(settings: Settings, programs: tuple[str, ...] = PROGRAMS) -> None:
    from services.memory_weaver.zeo_conf import write_zeo_conf

    for d in (settings.var_dir, settings.log_dir, settings.lora_dir):
        d.mkdir(parents=True, exist_ok=True)
    # owner-only (issue 13): the image, audit log, logs and keys live under var/; supervisord's umask=077
    # makes what the programs create there 0600 / 0700
    for d in (settings.var_dir, settings.log_dir):
        d.chmod(0o700)
    if settings.curve_enabled and "broker" not in programs:
        missing_keys(settings)  # another host's keys are made on the broker's host and copied here
    elif settings.curve_enabled:
        # generated here, before supervisord starts anything: when the broker generated them at its start,
        # workers starting beside it read half-written files ("Invalid certificate file") on a fresh var/keys
        from batos import curve

        keys = curve.ensure_keys(settings)
        for d in (keys, keys / "authorized"):
            d.chmod(0o700)
    if "zeo" in programs:
        write_zeo_conf(settings, settings.var_dir / "zeo.conf")


def missing_keys(settings: Settings) -> None:
    """On a host without the broker: the service key and the broker's public key must have been copied in
    (never generated here: a new broker.key would not be the broker's)."""
    need = [settings.keys_dir / f"{settings.curve_service_key}.key_secret", settings.keys_dir / "broker.key"]
    absent = [str(p) for p in need if not p.is_file()]
    if absent:
        raise hostconf.HostConfError(
            f"no {' or '.join(absent)}: on the broker's host run `python -m batos.curve add NAME --serves "
            f"SERVICES`, copy var/keys/NAME.key_secret and var/keys/broker.key here and set "
            f"BATOS_CURVE_SERVICE_KEY=NAME")


def client_key(settings: Settings) -> str:
    """The key batosctl presents: the console key, or on a host that holds only a service key, that one."""
    console = settings.keys_dir / f"{settings.curve_key}.key_secret"
    return settings.curve_key if console.is_file() or not settings.curve_enabled else settings.curve_service_key


def start_supervisord(conf: Path, env: dict[str, str] | None = None) -> None:
    """Start supervisord (it daemonizes). umask 077 from the start: its own log is created before it applies
    the ``umask`` of supervisord.conf, which then covers every program (image, audit log, logs: owner-only)."""
    subprocess.run([str(Path(sys.executable).parent / "supervisord"), "-c", str(conf)], check=True, env=env,
                   umask=0o077)


def log_tail(settings: Settings, program: str, lines: int = 30) -> str:
    path = settings.log_dir / f"{program}.log"
    if not path.exists():
        return f"(no log at {path})"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def fail(settings: Settings, program: str, why: str) -> int:
    print(f"\nBAT OS did not come up: {program} {why}. Last lines of var/log/{program}.log:\n", file=sys.stderr)
    print(log_tail(settings, program), file=sys.stderr)
    return 1


async def registered(settings: Settings) -> dict[str, int]:
    async with Client(settings, identity=f"batosctl-{os.getpid()}", curve_key=client_key(settings)) as c:
        table = await c.request(Workers(), timeout=2)
    return {s: len([w for w in ws if w.alive]) for s, ws in table.services.items()}


def up(settings: Settings) -> int:
    try:
        programs = hostconf.selected(settings.programs)
        prepare_var(settings, programs)
    except hostconf.HostConfError as e:
        print(f"BAT OS did not start: {e}", file=sys.stderr)
        return 2
    if supervisor_running(settings):
        supervisor(settings).supervisor.startAllProcesses(False)
    else:
        # supervisord.conf reads the var dir from the environment; every program inherits BATOS_*
        # ingest's default root is the directory `make up` was run from (services.ingestor.roots)
        env = {**os.environ, "BATOS_VAR_DIR": str(settings.var_dir),
               "BATOS_INGEST_HOME": settings.ingest_home or os.getcwd()}
        start_supervisord(hostconf.write(CONF, programs, settings.var_dir / "supervisord.conf"), env)
    rpc = supervisor(settings)
    deadline = time.monotonic() + UP_TIMEOUT
    print("starting BAT OS", end="", flush=True)
    want = {s for p in programs for s in REGISTERS.get(p, ())}
    while time.monotonic() < deadline:
        try:
            infos = {p["name"]: p for p in supervisor_rpc.all_process_info(rpc.supervisor.getAllProcessInfo())}
        except (OSError, xmlrpc.client.Fault):
            time.sleep(0.5)
            continue
        for name, info in infos.items():
            if info["statename"] in ("FATAL", "BACKOFF", "EXITED"):
                return fail(settings, name, f"is {info['statename']}")
        running = all(p in infos and infos[p]["statename"] == "RUNNING" for p in programs)
        have: dict[str, int] = {}
        if running:
            try:
                have = asyncio.run(registered(settings))
            except ServiceError:
                have = {}
            if all(have.get(s, 0) >= 1 for s in want):
                print(" ready.\n")
                print("Every program is RUNNING and every service has registered with the broker.")
                if programs != PROGRAMS:
                    print(f"  on this host: {', '.join(programs)} (BATOS_PROGRAMS)")
                print(f"  broker: {settings.broker_endpoint}   logs: {settings.log_dir}")
                exposed = transport.exposure_warning(settings.broker_endpoint, settings.curve_enabled)
                if exposed:
                    print(f"  WARNING: {exposed}")
                print("  attach a console:   make console      (or .venv/bin/batos-console)")
                print("  one command:        .venv/bin/batos-console -c status")
                print("  see everything:     make status       stop: make down")
                return 0
        print(".", end="", flush=True)
        time.sleep(1.0)
    missing = [p for p in programs if any(have.get(s, 0) < 1 for s in REGISTERS.get(p, ()))] or ["(unknown)"]
    return fail(settings, missing[0], f"did not register with the broker within {UP_TIMEOUT:.0f} s")


def status(settings: Settings, as_json: bool = False) -> int:
    if not supervisor_running(settings):
        print("BAT OS is not running (no supervisord at var/supervisor.sock). Start it with `make up`.")
        return 1
    raw = supervisor(settings).supervisor.getAllProcessInfo()  # --json passes every field supervisord sends
    infos = supervisor_rpc.all_process_info(raw)
    table, kernel = asyncio.run(_live_status(settings))
    if as_json:
        print(json.dumps({"programs": raw, "workers": table and contract.encode(table), "kernel": kernel},
                         indent=2, default=str))
        return 0
    print(f"{'program':15} {'state':10} {'pid':>7}  uptime")
    for p in infos:
        print(f"{p['name']:15} {p['statename']:10} {p['pid']:>7}  {p['description']}")
    print()
    if "error" in kernel:
        print(f"kernel status unavailable: {kernel['error']}")
    if table is None:
        print("the broker did not answer: no worker table")
        return 0
    print(f"{'service':8} {'worker':40} {'alive':5} {'version':8} {'uptime':>8} {'served':>7} {'busy':>4}")
    for name, workers in sorted(table.services.items()):
        for w in workers:
            print(f"{name:8} {w.identity[:40]:40} {'yes' if w.alive else 'NO':5} {w.version:8} "
                  f"{w.uptime_s:>7.0f}s {w.served:>7} {w.inflight:>4}")
    return 0


async def _live_status(settings: Settings) -> tuple[WorkerTable | None, dict[str, Any]]:
    """The broker's worker table and the kernel's own status (each None/{"error"} when it does not answer)."""
    async with Client(settings, identity=f"batosctl-{os.getpid()}", curve_key=client_key(settings)) as c:
        try:
            table: WorkerTable | None = await c.request(Workers(), timeout=5)
        except ServiceError:
            table = None
        try:
            kernel = await c.call("kernel", "status", timeout=5)
        except ServiceError as e:
            kernel = {"error": e.message}
    return table, kernel


def down(settings: Settings) -> int:
    if not supervisor_running(settings):
        print("BAT OS is not running.")
        return 0
    rpc = supervisor(settings)
    pids = [p["pid"] for p in supervisor_rpc.all_process_info(rpc.supervisor.getAllProcessInfo()) if p["pid"]]
    rpc.supervisor.stopAllProcesses(True)  # reverse priority order, SIGTERM then wait
    sup_pid = supervisor_rpc.supervisor_pid(rpc)
    rpc.supervisor.shutdown()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p) for p in [*pids, sup_pid]):
        time.sleep(0.2)
    left = [p for p in [*pids, sup_pid] if _alive(p)]
    if left:
        print(f"processes still alive after 30 s: {left}", file=sys.stderr)
        return 1
    print("BAT OS stopped; no process left behind. Memory is in var/live_image.fs.")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(prog="batosctl", description="start, inspect and stop BAT OS")
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    settings = load()
    actions = {"up": lambda: up(settings), "down": lambda: down(settings),
               "status": lambda: status(settings, args.json)}
    sys.exit(actions[args.action]())


if __name__ == "__main__":
    main()
