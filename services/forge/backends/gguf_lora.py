"""A forge adapter (PEFT LoRA on the transformers checkpoint) as a GGUF LoRA that llama.cpp can apply.

The conversion is llama.cpp's own ``convert_lora_to_gguf.py`` (with its ``gguf-py``), unpacked from the
llama-cpp-python sdist by batos/runtime_install.py: it maps PEFT tensor names onto GGUF ones for every
architecture llama.cpp knows, which a hand-written mapping would not. It runs in a subprocess (it imports
torch and transformers and sets up its own import path) and only needs the base model's config.json.
The result is content-addressed in the cache (sha256 of the adapter's config and weights), so a restart
or a second persona with the same adapter converts nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import proto
from services.forge.backends.base import BackendError

CONVERT_TIMEOUT = 600.0
_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def _digest(adapter_dir: Path, weights: Path) -> str:
    h = hashlib.sha256((adapter_dir / "adapter_config.json").read_bytes())
    with weights.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()[:24]


def cache_dir() -> Path:
    from batos.config import load

    return Path(load().cache_dir) / "gguf_lora"


def gguf_lora_for(adapter_dir: Path, base_checkpoint: str | None) -> Path:
    """The GGUF LoRA of a PEFT adapter directory (converted once); BackendError when it cannot be made."""
    from batos import runtime_install

    if adapter_dir.is_file() and adapter_dir.suffix == ".gguf":
        return adapter_dir  # already a GGUF LoRA
    if not (adapter_dir / "adapter_config.json").is_file():
        raise BackendError(proto.ErrorCode.BAD_ARGS, f"{adapter_dir} is not a PEFT adapter (no adapter_config.json)")
    weights = next((adapter_dir / n for n in _WEIGHTS if (adapter_dir / n).is_file()), None)
    if weights is None:
        raise BackendError(proto.ErrorCode.BAD_ARGS, f"{adapter_dir} has no adapter weights")
    if base_checkpoint is None:
        raise BackendError(
            proto.ErrorCode.BAD_ARGS,
            "the forge trains SmolLM2-135M; the served model is another one and cannot take its adapters "
            "(BATOS_LLM_MODEL=smollm2-135m serves adapters)",
        )
    tools = runtime_install.tools_dir()
    script = tools / "convert_lora_to_gguf.py"
    if not script.is_file():
        raise BackendError(proto.ErrorCode.UNAVAILABLE, f"llama.cpp's LoRA converter is missing ({script}): make setup")
    cache = cache_dir()
    target = cache / f"{_digest(adapter_dir, weights)}.gguf"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".lora-", suffix=".gguf", dir=cache)
    os.close(fd)
    try:
        proc = subprocess.run(
            [sys.executable, str(script), "--base", str(base_checkpoint), "--outtype", "f32", "--outfile", tmp,
             str(adapter_dir)],
            capture_output=True, text=True, timeout=CONVERT_TIMEOUT, cwd=tools,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        )  # fmt: skip
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise BackendError(proto.ErrorCode.BAD_ARGS, f"LoRA -> GGUF conversion failed: {' | '.join(tail)}")
        os.replace(tmp, target)
    except subprocess.TimeoutExpired as e:
        raise BackendError(proto.ErrorCode.TIMEOUT, f"LoRA -> GGUF conversion took over {CONVERT_TIMEOUT:g} s") from e
    finally:
        Path(tmp).unlink(missing_ok=True)
    meta = target.with_suffix(".json")
    meta.write_text(json.dumps({"adapter_dir": str(adapter_dir), "base": str(base_checkpoint)}))
    return target
