"""A forge adapter (PEFT LoRA on the transformers checkpoint) as a GGUF LoRA that llama.cpp can apply.

The forge trains the served model's transformers form (batos.models.training_checkpoint: the served GGUF
dequantized once), so the adapter's tensors fit the GGUF that llama.cpp runs, quantized or not.

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


# What makes two checkpoints the same network for a LoRA: its tensors' names and shapes follow from these.
_SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "vocab_size")


def check_same_model(adapter_dir: Path, base_checkpoint: Path) -> None:
    """Refuse, with both names, an adapter trained on another network than the served model's HF form.

    llama.cpp would refuse it too, but only as "cannot load", after a conversion against the wrong base.
    An adapter whose training base is gone (moved cache) is let through to llama.cpp's own shape checks.
    """
    trained_on = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not trained_on or not (Path(trained_on) / "config.json").is_file():
        return
    if Path(trained_on).resolve() == base_checkpoint.resolve():
        return
    ours, theirs = (json.loads((Path(d) / "config.json").read_text()) for d in (base_checkpoint, trained_on))
    if any(ours.get(k) != theirs.get(k) for k in _SHAPE_KEYS):
        raise BackendError(proto.ErrorCode.BAD_ARGS,
                           f"{adapter_dir.name} was trained on {trained_on}, not on the served model's "
                           f"{base_checkpoint}: its LoRA does not fit this model")


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
            "the served model has no transformers form, so the forge trains SmolLM2-135M and this model "
            "cannot take its adapters (models that do: BATOS_LLM_MODEL=qwen2.5-coder-0.5b or smollm2-135m)",
        )
    check_same_model(adapter_dir, Path(base_checkpoint))
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
