"""The ZEO config file is what runzeo itself parses: address, FileStorage path, blob dir."""

from __future__ import annotations

import subprocess
import sys

from ZEO.runzeo import ZEOOptions

from batos.config import REPO_ROOT, load
from services.memory_weaver.zeo_conf import write_zeo_conf


def test_runzeo_parses_the_config(tmp_path):
    settings = load(var_dir=tmp_path / "var", zeo_address="127.0.0.1:8123")
    conf = write_zeo_conf(settings, tmp_path / "etc" / "zeo.conf")
    options = ZEOOptions()
    options.realize(["-C", str(conf)])
    assert options.address == ("127.0.0.1", 8123)
    (storage,) = options.storages
    section = storage.config
    assert section.path == str((tmp_path / "var" / "live_image.fs").resolve())
    assert section.blob_dir == str((tmp_path / "var" / "blobs").resolve())
    assert (tmp_path / "var" / "blobs").is_dir()
    opened = storage.open()  # the FileStorage that never hands out an oid twice (issue 14)
    try:
        assert type(opened).__name__ == "OidSafeFileStorage"
    finally:
        opened.close()


def test_default_address_is_a_unix_socket_in_var(tmp_path):
    settings = load(var_dir=tmp_path / "var", zeo_address="")
    conf = write_zeo_conf(settings, tmp_path / "zeo.conf")
    options = ZEOOptions()
    options.realize(["-C", str(conf)])
    assert options.address == str(tmp_path / "var" / "zeo.sock")


def test_cli_writes_file(tmp_path):
    out = tmp_path / "zeo.conf"
    env = {"BATOS_VAR_DIR": str(tmp_path / "v"), "BATOS_ZEO_ADDRESS": "127.0.0.1:8124", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "services.memory_weaver.zeo_conf", str(out)], cwd=REPO_ROOT,
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert "address 127.0.0.1:8124" in text and "<oidsafefilestorage>" in text and "blob-dir" in text
    r = subprocess.run([sys.executable, "-m", "services.memory_weaver.zeo_conf"], cwd=REPO_ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "usage" in r.stderr
