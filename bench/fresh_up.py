"""Benchmark `make up` on a fresh machine (issue 16: first run <= 20 min including any build, later runs <= 2 min).

A fresh machine is simulated by a `git clone` of this repository into a temp dir and an empty ``HOME``: no
pip cache, no ``~/.cache/batos`` (no llama-cpp-python wheel, no converted models). Only the machine's pip
configuration is copied in (which indexes to use is machine set-up, not a cache). Then:

1. ``make up`` (venv, pinned packages, llama.cpp build, models, every program started), timed;
2. ``make down``; ``make up`` again, timed (everything cached); ``make down``.

Each figure is printed beside the issue's target as a ratio (< 1 is inside it), with the load average
before and after, since the machine may be shared. Takes 10-40 minutes and ~8 GB of disk.

    python3.11 bench/fresh_up.py [--repo PATH] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIRST_TARGET_S = 20 * 60
LATER_TARGET_S = 2 * 60


def timed_make(target: str, cwd: Path, env: dict[str, str], log: Path) -> float:
    start = time.monotonic()
    with log.open("a") as out:
        out.write(f"\n=== make {target}\n")
        out.flush()
        rc = subprocess.run(["make", target], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    took = time.monotonic() - start
    if rc != 0:
        sys.exit(f"make {target} failed (exit {rc}) after {took:.0f} s; see {log}")
    return took


def fresh_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATOS_")}
    real_home = Path(os.environ.get("HOME", "/root"))
    pip_conf = real_home / ".config" / "pip"
    if pip_conf.is_dir():
        shutil.copytree(pip_conf, home / ".config" / "pip")
    env["HOME"] = str(home)
    env.setdefault("PYENV_ROOT", str(real_home / ".pyenv"))  # the interpreter is installed, not a cache
    env.pop("PIP_CACHE_DIR", None)
    env.pop("XDG_CACHE_HOME", None)
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, default=REPO)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (clone, HOME, log)")
    args = ap.parse_args()
    top = Path(tempfile.mkdtemp(prefix="batos-fresh-up-"))
    clone, home, log = top / "clone", top / "home", top / "make.log"
    home.mkdir()
    subprocess.run(["git", "clone", "-q", str(args.repo), str(clone)], check=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True,
                          check=True).stdout.strip()
    env = fresh_env(home)
    load_before = os.getloadavg()
    try:
        first = timed_make("up", clone, env, log)
        timed_make("down", clone, env, log)
        later = timed_make("up", clone, env, log)
        load_after = os.getloadavg()
    finally:
        subprocess.run(["make", "down"], cwd=clone, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"fresh-machine make up of {head}, {os.cpu_count()} cores, load before {load_before[0]:.1f}/"
          f"{load_before[1]:.1f}, after {load_after[0]:.1f}/{load_after[1]:.1f} (1/5 min)")
    print(f"{'run':<8}{'seconds':>10}{'target':>10}{'ratio':>8}")
    for name, took, target in (("first", first, FIRST_TARGET_S), ("later", later, LATER_TARGET_S)):
        print(f"{name:<8}{took:>10.0f}{target:>10}{took / target:>8.2f}")
    for line in log.read_text(errors="replace").splitlines():  # where the first run's time went
        if "built in" in line or line.rstrip().endswith(" s)") or line.startswith("=== "):
            print("  " + line.strip())
    print(f"log: {log}" if args.keep else "(--keep keeps the log)")
    if not args.keep:
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
