"""`make up` / `make status` / `make down` for real: supervisord with the repo's supervisord.conf,
every program, in a temp var dir, on a free broker port. One installation for the module (starting
it loads two models); the last test takes it down and proves nothing is left running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from batos.programs import PROGRAMS, SERVICE_PROGRAM
from tests.integration.system_fixture import REPO, SERVICES, Installation, installation_fixture

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def installation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    yield from installation_fixture(tmp_path_factory, "system")


def test_up_names_a_failing_program_and_down_cleans_up(tmp_path: Path) -> None:
    # runs before the module's installation exists: a broker that cannot bind its endpoint
    inst = Installation(tmp_path, "tcp://no-such-host.invalid:5555")
    try:
        with pytest.raises(RuntimeError):
            inst.up()
        up = inst.last_up
        assert up is not None and up.returncode == 1
        assert "did not come up: broker is" in up.stderr and "no-such-host.invalid" in up.stderr, up.stderr
    finally:
        down = inst.down()
        inst.kill_leftovers()
    assert down.returncode == 0, down.stdout + down.stderr
    assert inst.seen and inst.leftovers() == []


def status_json(inst: Installation) -> dict:
    out = inst.ctl("status", "--json", timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def test_up_waits_until_everything_is_ready(installation: Installation) -> None:
    up = installation.last_up
    assert up is not None and up.returncode == 0
    assert "ready" in up.stdout and "make console" in up.stdout, up.stdout
    states = {name: p["statename"] for name, p in installation.programs().items()}
    assert states == dict.fromkeys(PROGRAMS, "RUNNING")
    print(f"\n`batos.ctl up` took {installation.up_seconds:.1f} s")


def test_status_json_lists_every_program_and_worker(installation: Installation) -> None:
    table = status_json(installation)
    programs = {p["name"]: p for p in table["programs"]}
    assert set(programs) == set(PROGRAMS)
    assert {p["statename"] for p in programs.values()} == {"RUNNING"}
    assert {n: p["pid"] for n, p in programs.items()} == {n: p["pid"] for n, p in installation.programs().items()}
    kernel = table["kernel"]
    assert "error" not in kernel, kernel
    # the kernel answered `status` itself: its own cycles and loops, and the broker's worker table
    assert kernel["service"] == "kernel" and kernel["pid"] == programs["kernel"]["pid"]
    workers = kernel.get("services") or kernel["broker"]["services"]
    for service in SERVICES:
        assert workers.get(service), (service, workers)
        assert all(w["alive"] and w["version"] and w["uptime_s"] >= 0 for w in workers[service])
    # each service is served by the program supervisord started for it
    for service in SERVICES:
        program = SERVICE_PROGRAM[service]
        assert programs[program]["pid"] in {w["pid"] for w in workers[service]}, (service, workers[service])


def test_make_status_prints_every_program_and_every_worker(installation: Installation) -> None:
    out = subprocess.run(["make", "--no-print-directory", "-s", "status"], cwd=REPO, env=installation.env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    for name, info in installation.programs().items():
        assert any(line.split()[:3] == [name, "RUNNING", str(info["pid"])] for line in lines), (name, out.stdout)
    # README: "`make status` lists every program and every worker (liveness, version, uptime, requests served)"
    header = next((i for i, line in enumerate(lines) if line.split()[:2] == ["service", "worker"]), None)
    assert header is not None, out.stdout
    for service in SERVICES:
        rows = [line.split() for line in lines[header + 1:] if line.split()[:1] == [service]]
        assert rows and all(row[2] == "yes" for row in rows), (service, out.stdout)


def test_up_again_changes_nothing(installation: Installation) -> None:
    before = {n: p["pid"] for n, p in installation.programs().items()}
    again = installation.ctl("up")
    assert again.returncode == 0 and "ready" in again.stdout, again.stdout + again.stderr
    assert {n: p["pid"] for n, p in installation.programs().items()} == before


def test_the_console_one_command_that_up_prints_works(installation: Installation) -> None:
    # `up` suggests `.venv/bin/batos-console -c status`; the script is services.console's main
    out = subprocess.run([sys.executable, "-m", "services.console", "--json", "-c", "status"], cwd=REPO,
                         env=installation.env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    final = json.loads(out.stdout.strip().splitlines()[-1])
    assert final["kind"] == "reply", final


async def test_a_killed_program_is_restarted_and_rejoins(installation: Installation) -> None:
    old = installation.pid("kernel")
    os.kill(old, signal.SIGKILL)
    new = installation.wait_restarted("kernel", old)
    async with installation.client() as client:
        await installation.wait_worker(client, "kernel", new, timeout=120)
        reply = await client.call("kernel", "status", {}, timeout=30)
    assert reply["pid"] == new
    table = status_json(installation)
    assert {p["name"]: p["statename"] for p in table["programs"]} == dict.fromkeys(PROGRAMS, "RUNNING")


def test_down_stops_everything_and_leaves_nothing_behind(installation: Installation) -> None:
    installation.remember_processes()
    assert len(installation.seen) >= len(PROGRAMS) + 1  # supervisord and every program, at least
    down = installation.down()
    assert down.returncode == 0, down.stdout + down.stderr
    assert "no process left behind" in down.stdout
    assert installation.leftovers() == []
    assert _unlocked(installation.var / "live_image.fs.lock")
    status = installation.ctl("status", timeout=60)
    assert status.returncode == 1 and "not running" in status.stdout
    again = installation.ctl("down", timeout=60)
    assert again.returncode == 0 and "not running" in again.stdout


def _unlocked(lock_path: Path) -> bool:
    """ZODB leaves the .lock file behind but unlocked; what matters is that nobody holds it."""
    import zc.lockfile

    if not lock_path.exists():
        return True
    try:
        lock = zc.lockfile.LockFile(str(lock_path))
    except zc.lockfile.LockError:
        return False
    lock.close()
    return True
