"""No user code runs in the kernel (issue 13 item 1), against real processes: broker, ZEO, kernel, sandbox.

A method's default-argument and decorator expressions are code. The kernel only parses stored method
source; it never compiles it to run. Each hostile method here is written straight into the image (as if
the code policy had been fooled: the design must hold without it), then sent through the real kernel.
What is asserted: the kernel's environment never reaches the caller or the host's files, the kernel keeps
answering while the sandbox spins or allocates, and the sandbox reports the failure.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from persistent.list import PersistentList

from batos.client import Client
from batos.errors import ServiceError
from batos.image import Image
from batos.uvm import oid_hex
from tests.conftest import System

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SECRET = f"kernel-secret-{uuid.uuid4().hex}"
KERNEL_ENV = {
    "BATOS_SANDBOX_TIMEOUT": "2",
    "BATOS_SANDBOX_MEMORY_MB": "256",
    "BATOS_AUTOTELIC_PERIOD": "3600",
    "BATOS_KERNEL_INSTANCE": "kernel-security-test",
    "KERNEL_SECRET_TOKEN": SECRET,  # what a leak would expose
}


class KernelSystem:
    def __init__(self, system: System) -> None:
        self.system = system

    def client(self) -> Client:
        return Client(self.system.settings, identity=f"sec-{uuid.uuid4().hex[:8]}")

    def kernel_process(self) -> psutil.Process:
        proc = next(p for p in reversed(self.system.procs) if p.name == "kernel" and p.alive())
        return psutil.Process(proc.pid)

    async def plant(self, methods: dict[str, str], **slots: Any) -> str:
        """A new object holding ``methods`` stored WITHOUT the code policy (only parsed, as the image does)."""

        def make(root: Any, conn: Any) -> str:
            obj = root["prototypes"]["traits"].clone("hostile", **slots)
            root.setdefault("security_things", PersistentList()).append(obj)
            conn.add(obj)
            for selector, source in methods.items():
                obj.define_method(selector, source)
            return oid_hex(obj)

        async with Image(self.system.settings, do_awaken=False) as image:
            return await image.transact(make)

    async def send(self, client: Client, oid: str, selector: str, args: list[Any] | None = None,
                   timeout: float = 60) -> dict[str, Any]:
        return await client.call("kernel", "send", {"oid": oid, "selector": selector, "args": args or []},
                                 timeout=timeout)


@pytest.fixture(scope="module")
def kernel_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelSystem]:
    system = System(tmp_path_factory.mktemp("kernel-sec"))
    try:
        system.start_broker()
        system.start_zeo()
        system.start_service("kernel", **KERNEL_ENV)

        async def ready() -> None:
            async with Client(system.settings, identity="sec-wait") as c:
                await c.wait_for_broker(20)
                await system.wait_registered(c, {"kernel": 1}, timeout=120)
                deadline = time.monotonic() + 120
                while True:  # registered is not awake: wait until the kernel answers a command
                    try:
                        await c.call("kernel", "status", timeout=10)
                        return
                    except ServiceError as e:
                        if e.code != "unavailable" or time.monotonic() > deadline:
                            return
                        await asyncio.sleep(0.5)

        asyncio.run(ready())
        yield KernelSystem(system)
    finally:
        system.stop_all()


@pytest.fixture
async def ks(kernel_system: KernelSystem) -> AsyncIterator[tuple[KernelSystem, Client]]:
    async with kernel_system.client() as c:
        await c.wait_for_broker(20)
        yield kernel_system, c


def leak_methods(marker: Path) -> dict[str, str]:
    """Default and decorator expressions that would read the kernel's environment if the kernel ran them."""
    env = "__import__('os').environ"
    write = f"open({str(marker)!r}, 'a').write(str({env}.get('KERNEL_SECRET_TOKEN')))"
    return {
        "leak_default": f"def leak_default(self, x={write}):\n    return x\n",
        "leak_kwonly": f"def leak_kwonly(self, *, x=[{write} for _ in [0]]):\n    return x\n",
        "leak_decorator": f"@(lambda f: ({write}, f)[1])\ndef leak_decorator(self):\n    return 'body'\n",
        "leak_raise": f"def leak_raise(self, x=int({env}.get('KERNEL_SECRET_TOKEN', 'absent'))):\n    return x\n",
        "leak_return": f"def leak_return(self, x=dict({env})):\n    return x\n",
    }


async def test_default_and_decorator_expressions_never_see_the_kernels_environment(ks, tmp_path):
    system, client = ks
    marker = tmp_path / "leaked"
    methods = leak_methods(marker)
    oid = await system.plant(methods)
    replies = []
    for selector in methods:
        try:
            replies.append(repr(await system.send(client, oid, selector)))
        except ServiceError as e:
            replies.append(f"{e.code}: {e.message} {e.details!r}")
    assert not marker.exists(), f"the kernel ran a default expression: {marker.read_text()!r}"
    for selector, reply in zip(methods, replies, strict=True):
        assert SECRET not in reply, f"#{selector} leaked the kernel's environment: {reply[:300]}"
    # The sandbox saw them instead, re-checked them against the code policy and refused `__import__`.
    assert all(r.startswith("rejected") for r in replies), replies


async def test_a_default_that_loops_forever_runs_out_its_time_in_the_sandbox_and_the_kernel_answers(ks):
    system, client = ks
    oid = await system.plant({
        "spin": "def spin(self, x=[0 for _ in iter(int, 1) if False]):\n    return len(x)\n",  # CPU, no memory
        "spin2": "def spin2(self, x=sum(1 for _ in iter(lambda: 0, 1))):\n    return x\n",
        "fine": "def fine(self, n=2):\n    return n * 21\n",
    })
    for selector in ("spin", "spin2"):
        started = time.monotonic()
        with pytest.raises(ServiceError) as info:
            await system.send(client, oid, selector, timeout=30)
        assert info.value.code == "sandbox" and ("timeout" in info.value.message or "cpu" in info.value.message)
        assert time.monotonic() - started < 20
        fine = await system.send(client, oid, "fine", timeout=15)  # the kernel is still itself
        assert fine["result"] == 42
    # While one spins in the sandbox, another request is answered at once.
    spinning = asyncio.create_task(system.send(client, oid, "spin", timeout=30))
    await asyncio.sleep(0.5)
    started = time.monotonic()
    async with system.client() as other:
        await other.wait_for_broker(10)
        stats = await other.call("kernel", "status", timeout=10)
    assert stats and time.monotonic() - started < 8
    with pytest.raises(ServiceError):
        await spinning


async def test_a_default_that_allocates_a_gigabyte_is_contained_by_the_sandbox(ks):
    system, client = ks
    oid = await system.plant({
        "hog": "def hog(self, x=b'x' * (1 << 30)):\n    return len(x)\n",
        "hog2": "def hog2(self, x=[bytearray(1 << 20) for _ in range(1024)]):\n    return len(x)\n",
    })
    kernel = system.kernel_process()
    before = kernel.memory_info().rss
    for selector in ("hog", "hog2"):
        with pytest.raises(ServiceError) as info:
            await system.send(client, oid, selector, timeout=60)
        assert info.value.code == "sandbox" and "memory" in info.value.message.lower()
    grown_mb = (kernel.memory_info().rss - before) / 2**20
    assert grown_mb < 200, f"the kernel grew by {grown_mb:.0f} MiB"
    assert kernel.is_running()
