"""A real ZEO server in a subprocess (``runzeo``), so a test can ``kill -9`` it or restart it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

RUNZEO = Path(sys.executable).with_name("runzeo")
REPO = str(Path(__file__).resolve().parent.parent.parent)
START_TIMEOUT = 30.0


class ZeoProcess:
    """``runzeo`` on a unix socket in ``root``, serving ``root/data.fs``; restartable on the same file.
    ``oid_safe``: the storage is batos.zeo_storage's (as BAT OS's zeo.conf has it), else ZODB's own."""

    def __init__(self, root: Path, oid_safe: bool = False):
        self.root = root
        self.oid_safe = oid_safe
        self.address = str(root / "zeo.sock")
        self.path = root / "data.fs"
        self.popen: subprocess.Popen | None = None

    def start(self) -> ZeoProcess:
        if os.path.exists(self.address):
            os.unlink(self.address)  # a kill -9 leaves the socket file behind
        log = (self.root / "zeo.log").open("ab")
        if self.oid_safe:
            conf = self.root / "zeo.conf"
            conf.write_text(f"%import batos.zeo_storage\n<zeo>\n  address {self.address}\n</zeo>\n"
                            f"<oidsafefilestorage>\n  path {self.path}\n</oidsafefilestorage>\n")
            argv = [str(RUNZEO), "-C", str(conf)]
        else:
            argv = [str(RUNZEO), "-a", self.address, "-f", str(self.path)]
        env = {**os.environ, "PYTHONPATH": REPO}  # runzeo imports batos.zeo_storage
        self.popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(self.address):  # runzeo binds the socket once the storage is open
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"runzeo did not start:\n{(self.root / 'zeo.log').read_text()}")
            time.sleep(0.02)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(sig)
            self.popen.wait(30)

    def restart(self, sig: int) -> None:
        """SIGKILL: the crash; SIGTERM: what ``supervisorctl restart zeo`` does."""
        self.stop(sig)
        self.start()
