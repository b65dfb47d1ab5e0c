"""batos.config is the one settings source: BATOS_<FIELD> from the environment, overrides win, bad values fail
loudly, and no other module reads a BATOS_* variable itself."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from batos.config import REPO_ROOT, Settings, load

SOURCE_DIRS = ("batos", "services", "broker", "proto")
# a read of a BATOS_* variable: os.environ.get("BATOS_X"), os.getenv(f"BATOS_{n}"), os.environ["BATOS_X"], ...
DIRECT_READ = re.compile(r"""(?:getenv|environ\.get|environ\.setdefault|environ\.pop)\(\s*f?["']BATOS_"""
                         r"""|environ\[\s*f?["']BATOS_""")


def test_fields_come_from_prefixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATOS_WORKER_CAPACITY", "3")
    monkeypatch.setenv("BATOS_CURVE_ENABLED", "1")
    monkeypatch.setenv("BATOS_EXTRA_SERVICES", "echo,slow")  # comma-separated strings stay plain str
    monkeypatch.setenv("WORKER_CAPACITY", "99")  # without the prefix: not a setting
    s = load()
    assert (s.worker_capacity, s.curve_enabled, s.extra_services) == (3, True, "echo,slow")


def test_overrides_win_over_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BATOS_WORKER_CAPACITY", "3")
    monkeypatch.setenv("BATOS_VAR_DIR", str(tmp_path / "from-env"))
    s = load(worker_capacity=5, var_dir=tmp_path / "override")
    assert s.worker_capacity == 5
    assert s.var_dir == tmp_path / "override"
    assert s.audit_log == tmp_path / "override" / "metacognition.jsonl"


def test_defaults_without_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BATOS_WORKER_CAPACITY", raising=False)
    assert load().worker_capacity == Settings.model_fields["worker_capacity"].default


@pytest.mark.parametrize(("var", "value", "field"), [
    ("BATOS_WORKER_CAPACITY", "eight", "worker_capacity"),
    ("BATOS_LLM_BACKEND", "gpt", "llm_backend"),
    ("BATOS_CURVE_ENABLED", "maybe", "curve_enabled"),
])
def test_bad_value_names_field_and_value(monkeypatch: pytest.MonkeyPatch, var: str, value: str, field: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ValidationError) as err:
        load()
    text = str(err.value)
    assert field in text and value in text


def test_pattern_catches_direct_reads() -> None:
    for line in ('os.environ.get("BATOS_LOG_LEVEL", "INFO")', "os.getenv('BATOS_X')",
                 'os.environ.get(f"BATOS_{name.upper()}")', 'os.environ["BATOS_KERNEL_INSTANCE"]'):
        assert DIRECT_READ.search(line), line
    # building a child process's environment is a write, not a read
    assert not DIRECT_READ.search('env = {**os.environ, "BATOS_VAR_DIR": str(settings.var_dir)}')


def test_no_module_reads_batos_environment_directly() -> None:
    config = REPO_ROOT / "batos" / "config.py"
    offenders = []
    for top in SOURCE_DIRS:
        for path in sorted((REPO_ROOT / top).rglob("*.py")):
            if path == config:
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if DIRECT_READ.search(line):
                    offenders.append(f"{path.relative_to(REPO_ROOT)}:{n}: {line.strip()}")
    assert not offenders, "read settings through batos.config.load():\n" + "\n".join(offenders)
