"""A whole BAT OS installation for system tests, started exactly as `make up` starts it.

``batos.ctl up`` runs supervisord with the repository's own supervisord.conf; the only
difference from a user's machine is the var dir (a temp dir, via ``BATOS_VAR_DIR``): the broker and ZEO
listen on their default unix sockets in it, as they do for a user (``Installation(endpoint="tcp://...")``
overrides the broker's). Starting loads two models on two
cores, so a test module brings one installation up once (``installation_fixture``) and runs
its tests against it; ``down`` runs at the end whatever happened, and any process it left
behind is killed by pid (and reported by the module's last test, which calls ``down`` itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from batos.client import Client
from batos.config import Settings
from batos.ctl import supervisor
from batos.programs import PROGRAMS

REPO = Path(__file__).resolve().parent.parent.parent
SERVICES = ("kernel", "memory", "ingest", "llm", "forge")
CTL_UP_TIMEOUT = 300.0  # ctl's own UP_TIMEOUT (240 s) plus supervisord's start
CTL_DOWN_TIMEOUT = 90.0  # every program gets stopwaitsecs (10) in reverse priority order, worst case


def process_key(pid: int) -> tuple[int, float] | None:
    """(pid, start time): a pid alone may be reused by an unrelated process later."""
    try:
        return pid, psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def still_running(key: tuple[int, float]) -> bool:
    try:
        proc = psutil.Process(key[0])
        return proc.create_time() == key[1] and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@dataclass
class Installation:
    root: Path
    endpoint: str = ""  # "" = the default ipc:// socket in the var dir
    extra_env: dict[str, str] = field(default_factory=dict)
    last_up: subprocess.CompletedProcess | None = None
    up_seconds: float = 0.0
    seen: dict[tuple[int, float], str] = field(default_factory=dict, repr=False)  # every process it ran -> name

    @property
    def var(self) -> Path:
        return self.root / "var"

    @property
    def settings(self) -> Settings:
        # what the programs read from their environment (self.env), not this process's BATOS_*
        extra = {k.removeprefix("BATOS_").lower(): v for k, v in self.extra_env.items() if k.startswith("BATOS_")}
        return Settings(var_dir=self.var, **({"broker_endpoint": self.endpoint} if self.endpoint else {}), **extra)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATOS_")}
        env.update(BATOS_VAR_DIR=str(self.var), BATOS_BROKER_ENDPOINT=self.endpoint, HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO),
                   BATOS_INGEST_ROOTS=str(self.root))  # besides the repo (`up` runs there): trees the tests write
        env.update(self.extra_env)
        if "BATOS_LLM_MODEL" in os.environ and "BATOS_LLM_MODEL" not in self.extra_env:
            env["BATOS_LLM_MODEL"] = os.environ["BATOS_LLM_MODEL"]  # tests/conftest.py: the small model
        return env

    # -- the three commands --------------------------------------------------------------------

    def ctl(self, *args: str, timeout: float = CTL_UP_TIMEOUT) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "batos.ctl", *args], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def up(self) -> subprocess.CompletedProcess:
        started = time.monotonic()
        self.last_up = self.ctl("up")
        self.up_seconds = time.monotonic() - started
        self.remember_processes()
        if self.last_up.returncode != 0:
            raise RuntimeError(f"`batos.ctl up` failed (rc {self.last_up.returncode}):\n{self.last_up.stdout}\n"
                               f"{self.last_up.stderr}\n{self.log_tails()}")
        return self.last_up

    def down(self) -> subprocess.CompletedProcess:
        self.remember_processes()
        return self.ctl("down", timeout=CTL_DOWN_TIMEOUT)

    # -- supervisord ---------------------------------------------------------------------------

    def rpc(self) -> xmlrpc.client.ServerProxy:
        return supervisor(self.settings)

    def programs(self) -> dict[str, dict[str, Any]]:
        return {p["name"]: p for p in self.rpc().supervisor.getAllProcessInfo()}

    def pid(self, program: str) -> int:
        return int(self.rpc().supervisor.getProcessInfo(program)["pid"])

    def wait_restarted(self, program: str, old_pid: int, timeout: float = 60.0) -> int:
        """supervisord's autorestart: the program RUNNING again under a new pid."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, xmlrpc.client.Fault):
                info = self.rpc().supervisor.getProcessInfo(program)
                if info["statename"] == "RUNNING" and info["pid"] not in (0, old_pid):
                    self.remember_processes()
                    return int(info["pid"])
            time.sleep(0.2)
        raise TimeoutError(f"{program} was not restarted within {timeout} s:\n{self.log_tail(program)}")

    def remember_processes(self) -> None:
        """Note supervisord and every process under it, to prove later that none is left."""
        pid_file = self.var / "supervisord.pid"
        try:
            sup = psutil.Process(int(pid_file.read_text().strip()))
            procs = [sup, *sup.children(recursive=True)]
        except (OSError, ValueError, psutil.Error):
            return
        for proc in procs:
            key = process_key(proc.pid)
            if key is not None:
                with contextlib.suppress(psutil.Error):
                    self.seen.setdefault(key, " ".join(proc.cmdline()[:4]))

    def leftovers(self) -> list[str]:
        return [f"{pid} {name}" for (pid, t), name in self.seen.items() if still_running((pid, t))]

    def kill_leftovers(self) -> None:
        for pid, _ in [k for k in self.seen if still_running(k)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    # -- logs and clients ----------------------------------------------------------------------

    def log_tail(self, program: str, lines: int = 25) -> str:
        path = self.var / "log" / f"{program}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return f"(no {path})"

    def log_tails(self, lines: int = 15) -> str:
        return "\n".join(f"--- var/log/{p}.log\n{self.log_tail(p, lines)}" for p in (*PROGRAMS, "supervisord"))

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[Client]:
        async with Client(self.settings, identity=f"systest-{os.getpid()}-{time.monotonic_ns()}") as c:
            await c.wait_for_broker(20)
            yield c

    async def wait_worker(self, client: Client, service: str, pid: int, timeout: float = 120.0) -> dict:
        """Until the broker lists a live worker of ``service`` running as ``pid``."""
        deadline = time.monotonic() + timeout
        table: dict = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                table = await client.call("broker", "workers", timeout=2)
                for w in table["services"].get(service, []):
                    if w["alive"] and w["pid"] == pid:
                        return w
            await asyncio.sleep(0.25)
        raise TimeoutError(f"no live {service} worker with pid {pid}; broker: {table.get('services')}\n"
                           f"{self.log_tails()}")


def installation_fixture(tmp_path_factory: Any, name: str, **extra_env: str) -> Iterator[Installation]:
    """Body of a module-scoped fixture: `up` once, yield, always `down` and kill whatever is left."""
    inst = Installation(tmp_path_factory.mktemp(name), extra_env=dict(extra_env))
    try:
        inst.up()
        yield inst
    finally:
        down = inst.down()
        deadline = time.monotonic() + 10
        while inst.leftovers() and time.monotonic() < deadline:
            time.sleep(0.2)
        left = inst.leftovers()
        inst.kill_leftovers()
    # reached when the module's tests are done (not when `up` failed): the final `down` was clean
    assert down.returncode == 0 and not left, f"`down` left {left}:\n{down.stdout}{down.stderr}"
