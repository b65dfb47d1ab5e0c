"""Three "hosts" on one machine that share no files: main (broker, ZEO, kernel, ingestor), a worker host
(memory_weaver, forge, steward under its own supervisord) and a console host.

Each host has its own working directory and ``var/``. When mount namespaces work here (``unshare --mount``,
as the kernel's sandbox uses), every process of a host runs with the other hosts' directories hidden under an
empty tmpfs, so a path of one host's ``var/`` that another host tries to read is simply not there: the test
finds such a dependency instead of passing on a shared disk. Where namespaces are missing the hosts still
use separate directories, without that proof (``Hosts.isolated`` says which).

What crosses between hosts is what crosses between real machines: the broker over TCP with CurveZMQ (the
worker host holds only its own service key and the broker's public key, made by ``python -m batos.curve add``;
the console host only the console key and the broker's public key) and ZEO over TCP (each client keeps its
own blob cache, ``shared_blob_dir=False``: batos.image). The worker host comes up as a user brings it up there:
``batos.ctl up`` with ``BATOS_PROGRAMS=memory_weaver,forge,steward`` starts its own supervisord with the
repository's program sections for those three (the steward restarts ``forge`` through it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
import xmlrpc.client
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from batos import supervisor_rpc
from batos.client import Client
from batos.config import Settings, load
from tests.conftest import PY, REPO, Proc, System
from tests.integration.system_fixture import CTL_DOWN_TIMEOUT, CTL_UP_TIMEOUT, still_running

WORKER_KEY = "worker-host"  # the worker host's service key: it may serve only WORKER_SERVICES
WORKER_PROGRAMS = ("memory_weaver", "forge", "steward")
WORKER_SERVICES = ("memory", "llm", "forge", "steward")
MAIN_SERVICES = ("kernel", "ingest")
START_TIMEOUT = 30.0


def namespaces_work() -> bool:
    """Whether this process may make a mount namespace and mount a tmpfs in it (root, or user namespaces)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    probe = subprocess.run([unshare, "--mount", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


def hiding(hidden: list[Path], argv: list[str]) -> list[str]:
    """``argv`` run in its own mount namespace with each of ``hidden`` covered by an empty tmpfs."""
    mounts = " && ".join(f'mount -t tmpfs -o size=1m tmpfs "${i + 1}"' for i in range(len(hidden)))
    script = f"{mounts} && shift {len(hidden)} && exec \"$@\""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
            *map(str, hidden), *argv]


def listening_port(pid: int, timeout: float = START_TIMEOUT) -> int:
    """The TCP port a process listens on (a server told to bind port 0), read back from the kernel's tables."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(psutil.Error):
            ports = [c.laddr.port for c in psutil.Process(pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN]
            if ports:
                return ports[0]
        time.sleep(0.1)
    raise TimeoutError(f"process {pid} is not listening on TCP after {timeout} s")


def copy_private(src: Path, dest_dir: Path) -> None:
    dest_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    shutil.copy(src, dest_dir / src.name)
    os.chmod(dest_dir / src.name, 0o600)


@dataclass
class Hosts:
    root: Path
    isolated: bool = field(default_factory=namespaces_work)
    broker_endpoint: str = ""
    zeo_address: str = ""
    main: System = field(init=False)
    worker_procs: list[tuple[int, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for d in (self.main_root, self.worker_root, self.console_root):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.main = System(self.main_root)

    # -- the three hosts ---------------------------------------------------------------------------------

    @property
    def main_root(self) -> Path:
        return self.root / "main"

    @property
    def worker_root(self) -> Path:
        return self.root / "worker"

    @property
    def console_root(self) -> Path:
        return self.root / "console"

    def _others(self, own: Path) -> list[Path]:
        """What a host must not see: the other hosts, and the checkout's own var/ (a default nobody may fall
        back on)."""
        if not self.isolated:
            return []
        checkout_var = [REPO / "var"] if (REPO / "var").is_dir() else []
        return [d for d in (self.main_root, self.worker_root, self.console_root) if d != own] + checkout_var

    def _on(self, own: Path, argv: list[str]) -> list[str]:
        hidden = self._others(own)
        return hiding(hidden, argv) if hidden else argv

    def network_env(self) -> dict[str, str]:
        """What every host is told: where the broker and ZEO are, and that Curve is on."""
        return {"BATOS_BROKER_ENDPOINT": self.broker_endpoint, "BATOS_ZEO_ADDRESS": self.zeo_address,
                "BATOS_CURVE_ENABLED": "1"}

    def settings(self, root: Path, **overrides: object) -> Settings:
        return load(var_dir=root / "var", broker_endpoint=self.broker_endpoint, zeo_address=self.zeo_address,
                    curve_enabled=True, **overrides)

    # -- main host -------------------------------------------------------------------------------------------

    def start_main(self, **kernel_env: str) -> None:
        """Keys (the worker host's one listed for its services only), broker on TCP with Curve, ZEO on TCP,
        then kernel and ingestor: all in the main host's directory."""
        var = self.main.var
        var.mkdir(mode=0o700, parents=True, exist_ok=True)
        added = subprocess.run([PY, "-m", "batos.curve", "add", WORKER_KEY, "--serves", ",".join(WORKER_SERVICES)],
                               env=self.main.env(), cwd=REPO, capture_output=True, text=True, timeout=60)
        assert added.returncode == 0, added.stderr
        self._start_broker()
        self._start_zeo()
        env = self.network_env()
        self.main.spawn("ingestor", self._on(self.main_root, [PY, "-m", "services.ingestor"]),
                        BATOS_INGEST_ROOTS=str(self.main_root), **env)
        self.main.spawn("kernel", self._on(self.main_root, [PY, "-m", "services.kernel"]), **env, **kernel_env)

    def _start_broker(self) -> None:
        endpoint_file = self.main.var / "broker.endpoint"
        proc = self.main.spawn("broker", self._on(self.main_root, [PY, "-m", "broker"]),
                               BATOS_BROKER_ENDPOINT="tcp://127.0.0.1:*", BATOS_CURVE_ENABLED="1")
        self._wait(proc, endpoint_file.exists, "broker")
        self.broker_endpoint = endpoint_file.read_text().strip()  # the port the broker bound, read back

    def _start_zeo(self) -> None:
        from services.memory_weaver.zeo_conf import write_zeo_conf

        conf = write_zeo_conf(load(var_dir=self.main.var, zeo_address="127.0.0.1:0"), self.main.var / "zeo.conf")
        proc = self.main.spawn("zeo", self._on(self.main_root, [str(Path(PY).parent / "runzeo"), "-C", str(conf)]))
        self.zeo_address = f"127.0.0.1:{listening_port(proc.pid)}"  # port 0: the one ZEO got

    @staticmethod
    def _wait(proc: Proc, ready: object, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():  # type: ignore[operator]
            if not proc.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start:\n{proc.tail()}")
            time.sleep(0.05)

    # -- worker host ------------------------------------------------------------------------------------------

    @property
    def worker_var(self) -> Path:
        return self.worker_root / "var"

    def worker_env(self, **env: str) -> dict[str, str]:
        full = {k: v for k, v in os.environ.items() if not k.startswith("BATOS_")}
        full.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO),
                    BATOS_VAR_DIR=str(self.worker_var), BATOS_CURVE_SERVICE_KEY=WORKER_KEY,
                    BATOS_PROGRAMS=",".join(WORKER_PROGRAMS), **self.network_env(), **env)
        if "BATOS_LLM_MODEL" in os.environ:  # tests/conftest.py: the small model
            full.setdefault("BATOS_LLM_MODEL", os.environ["BATOS_LLM_MODEL"])
        return full

    def worker_ctl(self, action: str, timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
        """``python -m batos.ctl ACTION`` on the worker host, as its user types ``make up`` / ``make down``."""
        return subprocess.run(self._on(self.worker_root, [PY, "-m", "batos.ctl", action]), env=self.worker_env(**env),
                              cwd=self.worker_root, capture_output=True, text=True, timeout=timeout)

    def start_worker_host(self, **env: str) -> None:
        """What a user does on the other host: copy its key and the broker's public key into its own var/keys,
        point it at the broker and ZEO, say which programs run there, ``make up``."""
        keys = self.main.settings.keys_dir
        for name in (f"{WORKER_KEY}.key_secret", "broker.key"):
            copy_private(keys / name, self.worker_var / "keys")
        up = self.worker_ctl("up", CTL_UP_TIMEOUT, **env)
        self.remember_worker_processes()
        if up.returncode != 0:
            raise RuntimeError(f"the worker host's `batos.ctl up` failed ({up.returncode}):\n{up.stdout}\n{up.stderr}")

    @property
    def worker_supervisor_url(self) -> str:
        return f"unix://{self.worker_var / 'supervisor.sock'}"

    def worker_rpc(self) -> xmlrpc.client.ServerProxy:
        return supervisor_rpc.proxy(self.worker_supervisor_url)

    def worker_pid(self, program: str) -> int:
        return int(self.worker_rpc().supervisor.getProcessInfo(program)["pid"])

    def remember_worker_processes(self) -> None:
        with contextlib.suppress(OSError, ValueError, psutil.Error):
            sup = psutil.Process(int((self.worker_var / "supervisord.pid").read_text().strip()))
            for proc in [sup, *sup.children(recursive=True)]:
                key = (proc.pid, proc.create_time())
                if key not in self.worker_procs:
                    self.worker_procs.append(key)

    def worker_log(self, program: str, lines: int = 30) -> str:
        path = self.worker_var / "log" / f"{program}.log"
        with contextlib.suppress(OSError):
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return f"(no {path})"

    def stop_worker_host(self) -> subprocess.CompletedProcess[str]:
        self.remember_worker_processes()
        down = self.worker_ctl("down", CTL_DOWN_TIMEOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(still_running(k) for k in self.worker_procs):
            time.sleep(0.2)
        for pid, _ in [k for k in self.worker_procs if still_running(k)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return down

    # -- console host -----------------------------------------------------------------------------------------

    def prepare_console_host(self) -> Settings:
        keys = self.main.settings.keys_dir
        for name in ("console.key_secret", "broker.key"):
            copy_private(keys / name, self.console_root / "var" / "keys")
        return self.settings(self.console_root)

    def console(self, command: str, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
        """``batos-console --json -c COMMAND`` on the console host."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATOS_")}
        env.update(BATOS_VAR_DIR=str(self.console_root / "var"), PYTHONPATH=str(REPO), **self.network_env())
        argv = self._on(self.console_root, [PY, "-m", "services.console", "--json", "--connect-timeout", "30",
                                            "-c", command])
        return subprocess.run(argv, env=env, cwd=self.console_root, capture_output=True, text=True,
                              timeout=timeout)

    def client(self, root: Path, key: str, identity: str) -> Client:
        """A client presenting ``key`` from ``root``'s var/keys (a console key, or a service key)."""
        return Client(self.settings(root), identity=identity, curve_key=key)

    # -- both -----------------------------------------------------------------------------------------------

    async def wait_registered(self, client: Client, timeout: float = 300.0) -> dict[str, list[dict]]:
        want = (*MAIN_SERVICES, *WORKER_SERVICES)
        deadline = time.monotonic() + timeout
        services: dict[str, list[dict]] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                services = (await client.call("broker", "workers", timeout=2))["services"]
                if all(any(w["alive"] for w in services.get(s, [])) for s in want):
                    self.remember_worker_processes()
                    return services
            await asyncio.sleep(0.25)
        logs = "\n".join(f"--- worker {p}\n{self.worker_log(p, 15)}" for p in WORKER_PROGRAMS)
        logs += "\n".join(f"--- main {p.name}\n{p.tail(15)}" for p in self.main.procs)
        raise TimeoutError(f"not every service registered; the broker sees {sorted(services)}\n{logs}")

    def stop(self) -> None:
        try:
            self.stop_worker_host()
        finally:
            self.main.stop_all()

