"""Fixtures that start real BAT OS processes on free ports in a temp dir, and kill them all.

Nothing here touches the user's ``var/``: every process gets ``BATOS_VAR_DIR`` in the test's
temp dir, the broker binds its default ``ipc://`` socket in the temp var dir (or ``tcp://127.0.0.1:*``
when a test asks, and reports the port it got), and ZEO listens on a unix socket in the temp dir.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from batos.client import Client
from batos.config import Settings, load

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """A test process killed from outside (CI timeout) must not leave its servers running."""
    os.setsid()
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

def pytest_configure(config: pytest.Config) -> None:
    """Tests that just need "an LLM" serve the small fast SmolLM2 GGUF, whatever the default model is
    (BATOS_LLM_MODEL set outside overrides it)."""
    from batos.models import TEST_LLM_MODEL

    os.environ.setdefault("BATOS_LLM_MODEL", TEST_LLM_MODEL)
    # A shell starts a background job (`make test &`) with SIGINT ignored, and an ignored signal stays
    # ignored across exec: every console the tests spawn would then shrug off the Ctrl-C they send it.
    # With a handler here instead, children start with the default disposition, as from a terminal.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# Real service processes, by the name the broker knows them under.
SERVICE_MODULES = {
    "kernel": ("services.kernel", ["kernel"]),
    "memory": ("services.memory_weaver", ["memory"]),
    "ingest": ("services.ingestor", ["ingest"]),
    "forge": ("services.forge", ["llm", "forge"]),
}


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen | None = None

    def start(self) -> Proc:
        out = self.log.open("ab")
        self.popen = subprocess.Popen(self.argv, env=self.env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                      preexec_fn=_die_with_parent)
        out.close()
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.pid, sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.popen is None:
            return None
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(5)
        return self.popen.returncode

    def kill(self) -> None:
        if self.alive():
            self.signal(signal.SIGKILL)
            self.popen.wait(5)  # type: ignore[union-attr]

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""


@dataclass
class System:
    """A BAT OS installation in a temp dir; start what a test needs, all killed at teardown."""

    root: Path
    procs: list[Proc] = field(default_factory=list)
    endpoint: str = ""

    @property
    def var(self) -> Path:
        return self.root / "var"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATOS_")}
        env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   BATOS_VAR_DIR=str(self.var), BATOS_LOG_LEVEL="INFO", TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=str(REPO))
        if "BATOS_LLM_MODEL" in os.environ:  # the model tests serve (pytest_configure below)
            env["BATOS_LLM_MODEL"] = os.environ["BATOS_LLM_MODEL"]
        if self.endpoint:
            env["BATOS_BROKER_ENDPOINT"] = self.endpoint
        env.update(extra)
        return env

    @property
    def settings(self) -> Settings:
        return load(var_dir=self.var, broker_endpoint=self.endpoint)

    def spawn(self, name: str, argv: list[str], **env: str) -> Proc:
        (self.var / "log").mkdir(parents=True, exist_ok=True)
        proc = Proc(name, argv, self.env(**env), self.var / "log" / f"{name}.log").start()
        self.procs.append(proc)
        return proc

    def start_broker(self, endpoint: str = "", **env: str) -> Proc:
        """``endpoint`` "" = the default, ``ipc://<var>/broker.sock``; "tcp://127.0.0.1:*" for a free port."""
        endpoint_file = self.var / "broker.endpoint"
        endpoint_file.unlink(missing_ok=True)
        proc = self.spawn("broker", [PY, "-m", "broker"], BATOS_BROKER_ENDPOINT=endpoint, **env)
        deadline = time.monotonic() + 20
        while not endpoint_file.exists():
            if not proc.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"broker did not start:\n{proc.tail()}")
            time.sleep(0.05)
        self.endpoint = endpoint_file.read_text().strip()
        return proc

    def start_zeo(self) -> Proc:
        from services.memory_weaver.zeo_conf import write_zeo_conf

        self.var.mkdir(parents=True, exist_ok=True)
        conf = write_zeo_conf(self.settings, self.var / "zeo.conf")
        proc = self.spawn("zeo", [str(Path(PY).parent / "runzeo"), "-C", str(conf)])
        sock = self.settings.zeo_client_address
        deadline = time.monotonic() + 30
        while not (isinstance(sock, str) and os.path.exists(sock)):
            if not proc.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"zeo did not start:\n{proc.tail()}")
            time.sleep(0.05)
        return proc

    def start_service(self, name: str, **env: str) -> Proc:
        module, _ = SERVICE_MODULES[name]
        return self.spawn(name, [PY, "-m", module], **env)

    def start_cognitive(self, files: dict[str, str], **kernel_env: str) -> Path:
        """``files`` written under ``root/src``, then broker, ZEO, memory, ingest (reading under ``root``),
        forge and kernel started: what a test of the whole cognitive loop needs. Returns the source tree."""
        tree = self.root / "src"
        tree.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (tree / name).write_text(text)
        self.start_broker()
        self.start_zeo()
        self.start_service("memory")
        self.start_service("ingest", BATOS_INGEST_ROOTS=str(self.root))  # ingest reads only under its roots
        self.start_service("forge")
        self.start_service("kernel", **kernel_env)
        return tree

    def start_test_worker(self, service: str = "echo", name: str | None = None, **env: str) -> Proc:
        return self.spawn(name or f"worker-{service}-{len(self.procs)}",
                          [PY, str(REPO / "tests" / "integration" / "echo_worker.py")],
                          BATOS_TEST_SERVICE=service, **env)

    async def wait_registered(self, client: Client, services: dict[str, int], timeout: float = 60.0) -> dict:
        """Wait until each service has at least the given number of live workers."""
        deadline = time.monotonic() + timeout
        table: dict = {}
        while time.monotonic() < deadline:
            try:
                table = await client.call("broker", "workers", timeout=2)
            except Exception:
                await asyncio.sleep(0.2)
                continue
            have = {s: len([w for w in ws if w["alive"]]) for s, ws in table["services"].items()}
            if all(have.get(s, 0) >= n for s, n in services.items()):
                return table
            for p in self.procs:
                if not p.alive() and p.popen is not None and p.popen.returncode not in (0, -9, -15):
                    raise RuntimeError(f"{p.name} exited with {p.popen.returncode}:\n{p.tail()}")
            await asyncio.sleep(0.2)
        logs = "\n".join(f"--- {p.name}\n{p.tail(20)}" for p in self.procs)
        raise TimeoutError(f"services {services} not registered; broker sees {table.get('services')}\n{logs}")

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.kill()


@pytest.fixture
def system(tmp_path: Path) -> Iterator[System]:
    sys_ = System(tmp_path)
    try:
        yield sys_
    finally:
        sys_.stop_all()


@pytest.fixture
async def client(system: System) -> AsyncIterator[Client]:
    """A client of the system's broker (start the broker first)."""
    if not system.endpoint:
        system.start_broker()
    async with Client(system.settings, identity=f"test-client-{os.getpid()}") as c:
        await c.wait_for_broker(20)
        yield c
