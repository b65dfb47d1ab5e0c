"""Issue 13 item 8: ingest reads only under its roots, refuses symlinks that leave them, skips special files.

A real broker and a real ingestor process (the process that reads files): ``/etc``, ``~root``, ``..`` escapes
and a symlink planted under the root are refused with ``bad_args`` naming the path and why; a fifo is refused
without blocking. The walk itself (unit level) skips and reports symlinks leaving the tree and special files.
"""

from __future__ import annotations

import configparser
import os
import signal
import stat
import sys
import time
from pathlib import Path

import pytest

from batos.config import Settings
from batos.ctl import _alive, prepare_var, start_supervisord
from batos.errors import ServiceError
from proto import ErrorCode, contract
from services.ingestor import roots, walker
from services.ingestor.files import chunk_file

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def ingestor(system, client, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "ok.py").write_text("def ok():\n    return 1\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.py").write_text('TOKEN = "root-only-secret"\n')
    (home / "planted.py").symlink_to(outside / "secret.py")
    (home / "planted_dir").symlink_to(outside)
    os.mkfifo(home / "pipe.py")
    system.start_service("ingest", BATOS_INGEST_HOME=str(home))
    await system.wait_registered(client, {"ingest": 1})
    return home, outside


@pytest.mark.parametrize("path", ["/etc", "/etc/passwd", "~root", "{home}/../outside/secret.py",
                                  "{home}/planted.py", "{home}/planted_dir", "{outside}"])
async def test_paths_outside_the_roots_are_refused(ingestor, client, path):
    home, outside = ingestor
    path = path.format(home=home, outside=outside)
    for command in ("ingest", "chunk"):
        with pytest.raises(ServiceError) as e:
            await client.call("ingest", command, {"path": path}, timeout=30)
        assert e.value.code == ErrorCode.BAD_ARGS, e.value
        assert "outside the ingest roots" in e.value.message and path in e.value.message


async def test_a_fifo_is_refused_without_blocking(ingestor, client):
    home, _ = ingestor
    with pytest.raises(ServiceError) as e:
        await client.call("ingest", "chunk", {"path": str(home / "pipe.py")}, timeout=30)
    assert e.value.code == ErrorCode.BAD_ARGS and "fifo" in e.value.message


async def test_a_file_inside_the_root_is_read(ingestor, client):
    home, _ = ingestor
    reply = await client.call("ingest", "chunk", {"path": str(home / "ok.py")}, timeout=30)
    assert reply["status"] == "chunked" and "def ok" in str(reply["chunks"])


def test_walk_skips_and_reports_symlinks_leaving_the_root_and_special_files(tmp_path):
    home, outside = tmp_path / "home", tmp_path / "outside"
    (home / "pkg").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.py").write_text("x = 1\n")
    (home / "pkg" / "a.py").write_text("a = 1\n")
    (home / "pkg" / "leak.py").symlink_to(outside / "secret.py")
    (home / "leakdir").symlink_to(outside)
    (home / "alias.py").symlink_to(home / "pkg" / "a.py")  # inside the root: taken
    os.mkfifo(home / "fifo.py")
    refused: list[dict[str, str]] = []
    files = walker.walk(home, refused)
    assert files == [str(home / "alias.py"), str(home / "pkg" / "a.py")]
    reasons = {Path(r["file_path"]).name: r["reason"] for r in refused}
    assert set(reasons) == {"leak.py", "leakdir", "fifo.py"}
    assert "symlink leaving the root" in reasons["leak.py"] and str(outside) in reasons["leakdir"]
    assert "fifo" in reasons["fifo.py"]


def test_chunk_file_never_opens_a_special_file_blocking(tmp_path):
    os.mkfifo(tmp_path / "swapped.py")  # e.g. swapped in after the walk
    assert chunk_file(str(tmp_path / "swapped.py"), 64, 1 << 20).reason == "special"


def test_roots_setting_lists_extra_roots(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    allowed = roots.allowed(Settings(ingest_home=str(a), ingest_roots=f"{b},{tmp_path / 'c'}{os.pathsep} "))
    assert allowed == [str(a), str(b), str(tmp_path / "c")]
    assert roots.check(str(b), allowed) == str(b)
    with pytest.raises(ServiceError):
        roots.check(str(tmp_path / "ab"), allowed)  # a prefix is not containment


def test_var_is_owner_only(tmp_path):
    """prepare_var makes var/ and its logs 0700; a real supervisord with the [supervisord] section of our
    supervisord.conf gives its log and what its programs create (image, audit log, logs) 0600 / 0700."""
    settings = Settings(var_dir=tmp_path / "var")
    (tmp_path / "var").mkdir(mode=0o755)
    prepare_var(settings)
    for d in (settings.var_dir, settings.log_dir):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    conf = configparser.RawConfigParser()
    conf.read(REPO / "supervisord.conf")
    var = settings.var_dir
    made = var / "made"
    lines = ["[supervisord]"] + [f"{k}={v}" for k, v in conf["supervisord"].items()
                                 if k not in ("environment", "directory")]
    lines += ["[program:maker]", f"command={sys.executable} -c \"import os, pathlib, time; "
              f"pathlib.Path('{made}.f').write_text('x'); os.mkdir('{made}.d'); time.sleep(60)\"",
              "autorestart=false", "startsecs=0", f"stdout_logfile={var}/log/maker.log"]
    # as `make up` runs it: daemonized (supervisord applies its umask when it daemonizes)
    (tmp_path / "s.conf").write_text("\n".join(lines).replace("%(ENV_BATOS_VAR_DIR)s", str(var)) + "\n")
    start_supervisord(tmp_path / "s.conf")
    pidfile = var / "supervisord.pid"
    try:
        deadline = time.monotonic() + 30
        while not (Path(f"{made}.d").exists() and pidfile.exists()) and time.monotonic() < deadline:
            time.sleep(0.1)  # polling a file another process creates: no event to wait on
        assert Path(f"{made}.d").exists(), (var / "log" / "supervisord.log").read_text(errors="replace")
        assert stat.S_IMODE(Path(f"{made}.f").stat().st_mode) == 0o600
        assert stat.S_IMODE(Path(f"{made}.d").stat().st_mode) == 0o700
        for log in (var / "log" / "supervisord.log", var / "log" / "maker.log"):
            assert stat.S_IMODE(log.stat().st_mode) & 0o077 == 0, log
    finally:
        if pidfile.exists():
            pid = int(pidfile.read_text())
            os.kill(pid, signal.SIGTERM)  # supervisord stops its program and exits
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)


def test_up_generates_curve_keys_before_any_program_starts(tmp_path):
    """With Curve on and a fresh var/keys, `batos.ctl up` writes every key pair before supervisord starts the
    programs (the broker generating them while workers read them failed the first `make up`)."""
    settings = Settings(var_dir=tmp_path / "var", curve_enabled=True)
    prepare_var(settings)
    keys = settings.keys_dir
    for name in ("broker", "services", "console"):
        assert (keys / f"{name}.key").is_file() and (keys / f"{name}.key_secret").is_file()
        assert stat.S_IMODE((keys / f"{name}.key_secret").stat().st_mode) == 0o600
    assert {p.name for p in (keys / "authorized").iterdir()} == {"services.key", "console.key", "services.services"}
    assert "*" in (keys / "authorized" / "services.services").read_text().split()  # local workers serve anything
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    before = {p: p.read_bytes() for p in keys.glob("*.key*")}
    prepare_var(settings)  # a second `up` keeps the keys: consoles already hold them
    assert {p: p.read_bytes() for p in keys.glob("*.key*")} == before


def _swap_tree(tmp_path: Path) -> tuple[Path, Path, Path]:
    """home/pkg/mod.py under the root; outside/mod.py (same relative name) holds a secret."""
    home, outside = tmp_path / "home", tmp_path / "outside"
    (home / "pkg").mkdir(parents=True)
    outside.mkdir()
    (home / "pkg" / "mod.py").write_text("def fine():\n    return 1\n")
    (outside / "mod.py").write_text('TOKEN = "root-only-secret"\n')
    return home, outside, home / "pkg" / "mod.py"


@pytest.mark.parametrize("swap", ["directory", "file"])
def test_a_symlink_swapped_in_between_check_and_open_is_never_read(tmp_path, monkeypatch, swap):
    """The check passes on the real file; then (in the gap an attacker races for) a directory component or
    the file itself becomes a symlink out of the root. The open must fail, not read the outside file."""
    home, outside, target = _swap_tree(tmp_path)
    checked = roots.resolve_within

    def check_then_swap(path: str, root: str) -> str:
        real = checked(path, root)  # the check sees the honest tree
        if swap == "directory":
            (home / "pkg").rename(home / "pkg.orig")
            (home / "pkg").symlink_to(outside)
        else:
            target.unlink()
            target.symlink_to(outside / "mod.py")
        return real

    monkeypatch.setattr(roots, "resolve_within", check_then_swap)
    reads: list[str] = []
    real_open = os.open

    def spy_open(path, flags, mode=0o777, *, dir_fd=None):
        fd = real_open(path, flags, mode, dir_fd=dir_fd)
        reads.append(os.readlink(f"/proc/self/fd/{fd}"))
        return fd

    monkeypatch.setattr(os, "open", spy_open)
    out = chunk_file(str(target), 64, 1 << 20, beneath=str(home))
    assert out.status == "skipped" and out.reason == "outside_root", out
    assert "symlink" in (out.error or "")
    assert not any(r.startswith(str(outside)) for r in reads), reads  # the outside file was never opened


def test_open_beneath_reads_files_and_in_root_symlinks(tmp_path):
    home, outside, target = _swap_tree(tmp_path)
    (home / "alias.py").symlink_to(target)  # a symlink inside the root is resolved first: allowed
    (home / "leak.py").symlink_to(outside / "mod.py")
    assert chunk_file(str(target), 64, 1 << 20, beneath=str(home)).status == "chunked"
    assert chunk_file(str(home / "alias.py"), 64, 1 << 20, beneath=str(home)).status == "chunked"
    leak = chunk_file(str(home / "leak.py"), 64, 1 << 20, beneath=str(home))
    assert leak.reason == "outside_root" and "outside the ingest root" in (leak.error or "")


async def test_ingest_of_a_tree_swapped_after_the_walk_reads_nothing_outside(tmp_path, monkeypatch):
    """The whole pipeline: the walk lists home/pkg/mod.py, then pkg becomes a symlink to outside/."""
    from services.ingestor import pipeline

    home, outside, _ = _swap_tree(tmp_path)
    walked = walker.walk

    def walk_then_swap(root, refused=None):
        files = walked(root, refused)
        (home / "pkg").rename(home / "pkg.orig")
        (home / "pkg").symlink_to(outside)
        return files

    monkeypatch.setattr(walker, "walk", walk_then_swap)
    sent: list = []

    class Memory:  # batos.client's typed request: memory's bodies in, its replies out
        async def request(self, typed, **kw):
            s = contract.spec_of(typed)
            body = contract.encode(typed)
            sent.append((s.command, body))
            return contract.decode_reply(s, {"hashes": {}} if s.command == "file_hashes" else {})

    async def emit(*a, **kw):
        return None

    reply = await pipeline.ingest(str(home), client=Memory(), emit=emit, max_chunk_tokens=64,
                                  max_file_bytes=1 << 20, beneath=str(home))
    assert reply["skipped_by_reason"] == {"outside_root": 1}, reply
    assert "root-only-secret" not in repr(sent)
