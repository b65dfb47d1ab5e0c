"""Run a training script confined: fresh namespaces, a read-only world, one writable output directory.

    argv = confined_argv([python, "-u", script, config], writable=[output_dir], hidden=[var/keys, ...])

The steward runs BRICK's training script (or the template) through this, the same kind of sandbox as
methods (services/kernel/sandbox.py), adapted to a job that needs the Python install, the base model and
the dataset, and may need a GPU:

    unshare --mount --net --pid --ipc --uts --fork --kill-child --mount-proc  python -I -S confine.py SPEC -- ARGV

This file's ``init`` (PID 1 of the new namespaces, stdlib only) then:
  1. makes every mount private (nothing propagates to the host);
  2. mounts a private tmpfs on /tmp (unless a writable path lies under the host's /tmp: then that /tmp stays,
     read-only); HOME, TMPDIR and the caches point to a writable scratch directory;
  3. builds a fresh /dev on a tmpfs holding only null, zero, full, random, urandom and the GPU nodes
     (nvidia*, dri/*) found on the host, plus a tmpfs /dev/shm -- no disks, no /dev/mem, no loop devices;
  4. hides secrets: an empty read-only tmpfs over each hidden directory (var/keys), /dev/null over each
     hidden file and over every unix socket bound on the host (a read-only mount does not stop connect():
     ZEO's, supervisord's and the broker's sockets would otherwise stay reachable without a network);
  5. remounts every other mount read-only (bind remount, per mount point from /proc/self/mountinfo,
     /proc and /sys included), except the writable directories, /tmp and /dev/shm;
  6. execs ``setpriv`` to drop every capability (bounding, inheritable, ambient) with no_new_privs, which
     execs the script. Root without capabilities cannot remount, mount, chroot, load modules or trace.

No network (a new, empty network namespace), no host processes visible (a PID namespace), a clean
environment (a short allow-list; no keys or tokens), and a wall-clock limit kept by the steward (it kills
the process group; ``--kill-child`` then takes the namespace down). Where namespaces are unavailable
(not root, no unshare/setpriv) :func:`available` says why and the steward refuses generated scripts.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

UNSHARE_ARGS = ("--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc")
TMP_MB = 4096  # the script's private /tmp (tmpfs pages count as memory)
DEVICE_NODES = ("null", "zero", "full", "random", "urandom", "tty")
GPU_GLOBS = ("nvidia*", "nvidia-caps/*", "dri/*", "kfd")
ENV_ALLOW = ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "PYTHONUNBUFFERED", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
             "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS",
             "TOKENIZERS_PARALLELISM", "TORCH_NUM_THREADS")

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 32, 4096, 8192, 16384, 1 << 18
_FLAG_OPTIONS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}


# -- host side ---------------------------------------------------------------------------------------


def available() -> str:
    """"" when confinement can be used here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "confinement needs root (namespaces and mounts)"
    for tool in ("unshare", "setpriv"):
        if shutil.which(tool, path="/usr/bin:/bin:/usr/sbin:/sbin") is None:
            return f"`{tool}` (util-linux) is not installed"
    return ""


def confined_env(scratch: str | Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The allow-listed environment; home, caches and temporary files in the writable ``scratch`` dir."""
    src = os.environ if base is None else base
    env = {k: src[k] for k in ENV_ALLOW if k in src}
    env.setdefault("PATH", "/usr/bin:/bin")
    home = str(Path(scratch).resolve())
    env.update(HOME=home, XDG_CACHE_HOME=f"{home}/.cache", HF_HOME=f"{home}/.cache/huggingface", TMPDIR=home)
    return env


def unix_socket_paths() -> list[str]:
    """Bound unix sockets on the file system (from this network namespace's /proc/net/unix). A read-only mount
    does not stop connect() on a socket file (ZEO's, supervisord's, the broker's ipc): each must be hidden."""
    found = []
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="replace") as fh:
            next(fh, None)
            for line in fh:
                fields = line.split()
                if len(fields) >= 8 and fields[7].startswith("/") and os.path.exists(fields[7]):
                    found.append(fields[7])
    except OSError:
        pass
    return sorted(set(found))


def confined_argv(argv: list[str], *, writable: Sequence[str | Path], hidden: Sequence[str | Path] = (),
                  tmp_mb: int = TMP_MB) -> list[str]:
    """``argv`` wrapped so that it runs confined (see the module docstring). ``writable``: existing or new
    directories the script may write (its output and its scratch dir), the only writable places besides a
    private /tmp (a private /tmp only when none of them lies under the host's /tmp)."""
    unshare = shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin") or "unshare"
    setpriv = shutil.which("setpriv", path="/usr/bin:/bin:/usr/sbin:/sbin") or "setpriv"
    if not writable:
        raise ValueError("a confined script needs at least one writable directory")
    spec = {"writable": [str(Path(p).resolve()) for p in writable],
            "hidden": sorted({str(Path(p).resolve()) for p in [*hidden, *unix_socket_paths()] if Path(p).exists()}),
            "tmp_mb": int(tmp_mb), "setpriv": setpriv}
    return [unshare, *UNSHARE_ARGS, sys.executable, "-I", "-S", str(Path(__file__).resolve()), json.dumps(spec),
            "--", *argv]


# -- inside the namespaces (PID 1, root with capabilities until the exec) ---------------------------


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    import ctypes

    enc = lambda s: s.encode() if s is not None else None
    if _libc().mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or source or ''} on {target}: {os.strerror(err)}")


def _mount_points() -> list[tuple[str, int]]:
    """(mount point, flags to keep) for every mount in this namespace, from /proc/self/mountinfo."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")  # \040 for spaces
            flags = 0
            for opt in fields[5].split(","):
                flags |= _FLAG_OPTIONS.get(opt, 0)
            found.append((point, flags))
    return found


def _fresh_dev(workdir: str) -> None:
    staging = os.path.join(workdir, ".confine-dev")
    os.mkdir(staging, 0o755)
    _mount("confine-dev", staging, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=0755")
    nodes = [name for name in DEVICE_NODES if os.path.exists(f"/dev/{name}")]
    for pattern in GPU_GLOBS:
        nodes += [path[len("/dev/"):] for path in glob.glob(f"/dev/{pattern}")]
    for name in nodes:
        target = f"{staging}/{name}"
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.isdir(f"/dev/{name}"):
            continue
        open(target, "w").close()  # a mount point for the host's node
        _mount(f"/dev/{name}", target, None, MS_BIND)
    os.mkdir(f"{staging}/shm", 0o1777)
    for fd_name, fd in (("stdin", 0), ("stdout", 1), ("stderr", 2)):
        os.symlink(f"/proc/self/fd/{fd}", f"{staging}/{fd_name}")
    os.symlink("/proc/self/fd", f"{staging}/fd")
    _mount(staging, "/dev", None, MS_MOVE)
    os.rmdir(staging)
    _mount("confine-shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "size=1g,mode=1777")


def _hide(path: str) -> None:
    if os.path.isdir(path):
        _mount("confine-hidden", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0500")
    elif os.path.exists(path):
        _mount("/dev/null", path, None, MS_BIND)


def init(spec: dict, argv: list[str]) -> None:
    if os.getpid() != 1 or os.geteuid() != 0:
        raise RuntimeError(f"confine init must be PID 1 and root in fresh namespaces (pid {os.getpid()})")
    writable = [str(p) for p in spec["writable"]]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    for path in writable:  # each its own mount point, so the read-only pass can skip it
        os.makedirs(path, exist_ok=True)
        _mount(path, path, None, MS_BIND | MS_REC)
    keep_writable = {"/dev/shm", *writable}
    if not any(p == "/tmp" or p.startswith("/tmp/") for p in writable):  # hidden paths there vanish with it
        _mount("confine-tmp", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={int(spec['tmp_mb'])}m,mode=1777")
        keep_writable.add("/tmp")  # else the host's /tmp stays, read-only, and TMPDIR points to scratch
    _fresh_dev(writable[0])
    for path in spec.get("hidden", []):
        _hide(path)
    for point, flags in reversed(_mount_points()):  # innermost first; any other failure is fatal
        if point in keep_writable:
            continue
        try:
            _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
        except OSError as e:
            if e.errno != errno.ENOENT:  # ENOENT: covered by a later mount (the old /dev/pts): unreachable
                raise
    os.chdir(writable[0])
    os.execv(spec["setpriv"], [spec["setpriv"], "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all",
                               "--no-new-privs", "--", *argv])


def main() -> int:
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        print("usage: confine.py SPEC_JSON -- ARGV...", file=sys.stderr)
        return 2
    try:
        init(json.loads(sys.argv[1]), sys.argv[3:])
    except Exception as exc:  # nothing of the script has run: say why, fail
        print(f"confine: setup failed, the script was not run: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 97
    return 0  # not reached: execv


if __name__ == "__main__":
    raise SystemExit(main())
