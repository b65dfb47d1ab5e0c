"""Install llama-cpp-python (the GGUF runtime of the embedded LLM) into the venv, building it once.

PyPI has only an sdist of llama-cpp-python 0.3.36: pip compiles llama.cpp (~10 CPU-minutes with the
machine's gcc and cmake). We build a wheel ONCE, keep it outside the checkout (``~/.cache/batos/wheels``;
pip does not reuse its own cached build for a fresh download), and later venvs install it in seconds.

The build is native (``-DGGML_NATIVE=ON``: AVX-512/VNNI where the CPU has them, measurably faster than a
portable build), so the wheel fits this CPU only: its cache directory is keyed by the version, the Python
tag AND a hash of the CPU's feature flags; another CPU builds its own.

A failed build does not fail ``make setup``: BAT OS then runs the embedded model on transformers (slower),
``make up`` says so, and the failure is remembered so that later setups do not spend 10 minutes on it
again (``BATOS_REBUILD_LLAMA=1`` retries). The sdist is kept beside the wheel: it also holds llama.cpp's
LoRA converter, which turns forge adapters into GGUF LoRAs (services/forge/backends/gguf_lora.py).

CLI (the Makefile): ``python -m batos.runtime_install install`` and ``python -m batos.runtime_install check``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from batos.config import load

VERSION = "0.3.36"
PACKAGE = "llama-cpp-python"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
CMAKE_ARGS = "-DGGML_NATIVE=ON"
TOOLS = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion/", "gguf-py/")  # under vendor/llama.cpp
_PROGRESS = re.compile(r"^\s*\[\s*(\d+)%\]\s*(Building|Linking)\s+\w+\s+\w+\s+(?:object\s+)?(\S+)")


def cpu_key() -> str:
    """A short hash of the CPU's feature flags: a native build runs only where these are the same."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = next((line.split(":", 1)[1] for line in lines if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:10]


def cache_dir() -> Path:
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    return Path(load().cache_dir) / "wheels" / f"llama_cpp_python-{VERSION}-{tag}-native-{cpu_key()}"


def tools_dir() -> Path:
    """llama.cpp's conversion scripts (LoRA -> GGUF), unpacked from the sdist."""
    return Path(load().cache_dir) / f"llama.cpp-tools-{VERSION}"


def installed_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return None


def _pip(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], **kw)


def _cached_wheel(where: Path) -> Path | None:
    wheels = sorted(where.glob("llama_cpp_python-*.whl"))
    return wheels[-1] if wheels else None


def _download_sdist(where: Path) -> Path:
    sdist = where / SDIST
    if not sdist.is_file():
        print(f"  downloading {PACKAGE} {VERSION} (sdist)", flush=True)
        _pip("download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(where), f"{PACKAGE}=={VERSION}",
             check=True)  # fmt: skip
    return sdist


def _build(where: Path, log_path: Path) -> Path:
    """pip wheel from the sdist, showing cmake's progress lines; the wheel's path."""
    sdist = _download_sdist(where)
    env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    print(f"  building {PACKAGE} {VERSION} ({CMAKE_ARGS}): about 5-10 minutes on 2 cores, once; log {log_path}",
          flush=True)  # fmt: skip
    started = time.monotonic()
    last_shown = -10
    # built beside the cache so the finished wheel appears there by an atomic rename
    with tempfile.TemporaryDirectory(prefix=".wheel-", dir=where) as out, log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", out, str(sdist)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
        )  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            match = _PROGRESS.match(line)
            if match and int(match.group(1)) >= last_shown + 10:  # one line per 10%
                last_shown = int(match.group(1))
                print(f"  [{match.group(1):>3}%] {time.monotonic() - started:5.0f} s  {Path(match.group(3)).name}",
                      flush=True)  # fmt: skip
        if proc.wait() != 0:
            raise RuntimeError(f"pip wheel exited with {proc.returncode}")
        built = _cached_wheel(Path(out))
        if built is None:
            raise RuntimeError("pip wheel reported success but wrote no wheel")
        target = where / built.name
        os.replace(built, target)
    print(f"  built in {time.monotonic() - started:.0f} s: {target}", flush=True)
    return target


def _unpack_tools(sdist: Path, target: Path) -> None:
    if (target / "convert_lora_to_gguf.py").is_file():
        return
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    tmp = Path(tempfile.mkdtemp(prefix=".llama-tools-", dir=target.parent))
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers()
                   if m.name.startswith(prefix) and m.name[len(prefix):].startswith(TOOLS) and m.isfile()]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(tmp, members=members, filter="data")
    os.replace(tmp, target)


def install(rebuild: bool = False) -> tuple[bool, str]:
    """(ok, what happened). Never raises for a failed build: the caller reports and carries on."""
    where = cache_dir()
    where.mkdir(parents=True, exist_ok=True)
    failed_marker = where / "BUILD_FAILED"
    if installed_version() == VERSION:
        _ensure_tools(where)
        return True, f"llama-cpp-python {VERSION}: installed"
    wheel = _cached_wheel(where)
    if wheel is None:
        if failed_marker.is_file() and not rebuild:
            return False, (f"llama-cpp-python: an earlier build failed ({failed_marker.read_text().strip()}); "
                           "BATOS_REBUILD_LLAMA=1 make setup retries")  # fmt: skip
        try:
            wheel = _build(where, where / "build.log")
            failed_marker.unlink(missing_ok=True)
        except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
            failed_marker.write_text(f"{e}; log {where / 'build.log'}\n")
            return False, f"llama-cpp-python: build FAILED ({e}); log {where / 'build.log'}"
    started = time.monotonic()
    # dependencies (numpy, jinja2, diskcache, ...) are pinned in requirements.lock
    result = _pip("install", "-q", "--no-deps", str(wheel))
    if result.returncode != 0:
        return False, f"llama-cpp-python: installing {wheel} failed (exit {result.returncode})"
    _ensure_tools(where)
    return True, f"llama-cpp-python {VERSION}: installed from the cached wheel in {time.monotonic() - started:.1f} s"


def _ensure_tools(where: Path) -> None:
    sdist = where / SDIST
    try:
        if not sdist.is_file():
            _download_sdist(where)
        _unpack_tools(sdist, tools_dir())
    except (OSError, subprocess.CalledProcessError, tarfile.TarError) as e:
        print(f"  note: llama.cpp's LoRA converter is not unpacked ({e}): adapters stay on transformers only")


def fallback_notice() -> str:
    return ("WARNING: llama-cpp-python is not installed: the embedded LLM runs SmolLM2-135M on transformers "
            "(several times slower, and not the configured model). See `make setup`.")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m batos.runtime_install", description=__doc__.split("\n\n")[0])
    parser.add_argument("cmd", choices=["install", "check"])
    args = parser.parse_args(argv)
    if args.cmd == "check":
        if installed_version() is None:
            print(fallback_notice())
        return 0
    ok, message = install(rebuild=os.environ.get("BATOS_REBUILD_LLAMA") == "1")
    print(message)
    if not ok:
        print(fallback_notice())
    return 0  # a failed build leaves a working (slower) system


if __name__ == "__main__":
    raise SystemExit(main())
