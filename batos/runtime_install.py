"""Install llama-cpp-python (the GGUF runtime of the embedded LLM) into the venv, building it once.

PyPI has only an sdist of llama-cpp-python 0.3.36: pip compiles llama.cpp (~10 CPU-minutes with the
machine's gcc and cmake). We build a wheel ONCE, keep it outside the checkout (``~/.cache/batos/wheels``;
pip does not reuse its own cached build for a fresh download), and later venvs install it in seconds.

The build enables exactly the instruction sets this CPU reports (AVX2, AVX-512, VNNI, BF16, ...) as
explicit ggml options instead of ``-march=native``, and never AMX: this machine lists AMX in
/proc/cpuinfo, but the first AMX instruction (``tilezero``) dies with SIGILL here (the VM does not grant
the tile state), and ``-march=native`` turns AMX on. The wheel's cache directory is keyed by the
version, the Python tag and a hash of those cmake options, so a CPU with other instruction sets builds
its own wheel and one with the same set reuses it.

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
# (cpuinfo flags that must all be present, ggml option): what the wheel may use
ISA_OPTIONS = (
    (("sse4_2",), "GGML_SSE42"), (("f16c",), "GGML_F16C"), (("fma",), "GGML_FMA"), (("bmi2",), "GGML_BMI2"),
    (("avx",), "GGML_AVX"), (("avx2",), "GGML_AVX2"), (("avx_vnni",), "GGML_AVX_VNNI"),
    (("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"), "GGML_AVX512"),
    (("avx512vbmi",), "GGML_AVX512_VBMI"), (("avx512_vnni",), "GGML_AVX512_VNNI"),
    (("avx512_bf16",), "GGML_AVX512_BF16"),
)  # fmt: skip
NEVER = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")  # SIGILL in this VM (see above)
TOOLS = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion/", "gguf-py/")  # under vendor/llama.cpp
# ninja's "[12/140] /usr/bin/g++ ... -o x.o -c src.cpp" or make's "[ 42%] Building CXX object x.o"
_PROGRESS = re.compile(r"^\s*\[\s*(\d+)(?:%|/(\d+))\]\s.*?(\S+\.(?:c|cpp|cxx|o|so))\s*$")


def cpu_flags() -> set[str]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1] for line in lines if line.startswith("flags")), "").split())


def cmake_args(flags: set[str] | None = None) -> str:
    """The build's CMAKE_ARGS: each instruction set on exactly when the CPU has it; AMX and multimodal off."""
    flags = cpu_flags() if flags is None else flags
    isa = [f"-D{option}={'ON' if all(f in flags for f in needs) else 'OFF'}" for needs, option in ISA_OPTIONS]
    return " ".join(["-DGGML_NATIVE=OFF", *isa, *(f"-D{o}=OFF" for o in NEVER), "-DLLAVA_BUILD=OFF"])


def build_key(args: str | None = None) -> str:
    """A short hash of the cmake options: a wheel runs wherever the CPU has these instruction sets."""
    return hashlib.sha256((args or cmake_args()).encode()).hexdigest()[:10]


def cache_dir() -> Path:
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    return Path(load().cache_dir) / "wheels" / f"llama_cpp_python-{VERSION}-{tag}-{build_key()}"


def tools_dir() -> Path:
    """llama.cpp's conversion scripts (LoRA -> GGUF), unpacked from the sdist."""
    return Path(load().cache_dir) / f"llama.cpp-tools-{VERSION}"


def installed_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return None


def _key_file() -> Path:
    """Beside the installed package: which build it is (a wheel from another build key is replaced)."""
    import sysconfig

    return Path(sysconfig.get_paths()["purelib"]) / "llama_cpp" / ".batos_build_key"


def installed_key() -> str | None:
    try:
        return _key_file().read_text().strip()
    except OSError:
        return None


def _pip(*args: str, check: bool = False) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "pip", *args], check=check)


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


def progress(line: str) -> int | None:
    """Percent done from a build log line, or None."""
    match = _PROGRESS.match(line)
    if match is None:
        return None
    done, total = int(match.group(1)), match.group(2)
    return done * 100 // int(total) if total else done


def _build(where: Path, log_path: Path) -> Path:
    """pip wheel from the sdist, showing cmake's progress lines; the wheel's path."""
    sdist = _download_sdist(where)
    args = cmake_args()
    env = {**os.environ, "CMAKE_ARGS": args, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    print(f"  building {PACKAGE} {VERSION} once (about 5-10 minutes on 2 cores); log {log_path}", flush=True)
    print(f"  CMAKE_ARGS={args}", flush=True)
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
            percent = progress(line)
            if percent is not None and percent >= last_shown + 10:  # one line per 10%
                last_shown = percent
                print(f"  [{percent:>3}%] {time.monotonic() - started:5.0f} s", flush=True)
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
    if installed_version() == VERSION and installed_key() == build_key():
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
    _key_file().write_text(build_key())
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
    ok, message = install(rebuild=load().rebuild_llama)
    print(message)
    if not ok:
        print(fallback_notice())
    return 0  # a failed build leaves a working (slower) system


if __name__ == "__main__":
    raise SystemExit(main())
