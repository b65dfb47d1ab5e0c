"""``fineTuneNewLoRA_``: BRICK writes the fine-tuning script; we validate it or fall back to the template.

BRICK is prompted with the contract (read the JSON config named by ``sys.argv[1]``, LoRA with PEFT, TRL's
SFTConfig/SFTTrainer, ``train()``, save the adapter to ``output_dir``) and Table 4's values. Its answer is
accepted only if it parses, imports nothing beyond :data:`ALLOWED_IMPORTS`, calls none of
:data:`FORBIDDEN_CALLS`, and visibly does each required step. Anything else (a 135M model's usual output,
an LLM error, a timeout) selects the canonical template (:mod:`services.forge.train_template`), and the
reason is reported.

These checks are a quality gate, not a security boundary (AST checks cannot be one; see FIELD_NOTES). The
boundary is where the steward runs the script (services/forge/confine.py): fresh namespaces, no network, a
read-only world with only the output and a scratch directory writable, keys and unix sockets hidden, a clean
environment, no capabilities, a time limit; the adapter it leaves is refused if it holds pickles or links. The
script is only parsed here, never imported or executed. What keeps the decision about the adapter honest is
that the metrics come from our evaluation module, never from the script.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ALLOWED_IMPORTS = frozenset({"json", "os", "sys", "math", "time", "pathlib", "torch", "transformers", "peft",
                             "trl", "datasets"})
# Calls that have no business in a training script: code from strings, processes, deleting files.
FORBIDDEN_CALLS = frozenset({"eval", "exec", "compile", "__import__", "breakpoint", "system", "popen", "execv",
                             "execve", "execvp", "execl", "spawnv", "spawnl", "fork", "kill", "remove", "unlink",
                             "rmdir", "removedirs", "rmtree", "chmod", "chown"})
# Dunder attributes are how AST-level escapes start (__class__.__subclasses__, __globals__); these are not.
HARMLESS_DUNDERS = frozenset({"__name__", "__version__", "__file__", "__doc__"})
# Table 4, the single statement of the recommended values. max_length is ours (Table 4 leaves it open):
# 2048 tokens hold a retrieval-augmented prompt with its answer; TRL cuts longer examples from the end.
# Every run's config carries these in full, so the template's own copy (LORA_DEFAULTS / TRAINING_DEFAULTS,
# kept equal by a test) is only a fallback.
TABLE4_LORA: dict[str, Any] = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "bias": "none",
                               "task_type": "CAUSAL_LM", "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
TABLE4_TRAINING: dict[str, Any] = {"learning_rate": 2e-4, "lr_scheduler_type": "cosine",
                                   "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                                   "num_train_epochs": 1, "save_strategy": "no", "logging_steps": 10,
                                   "max_steps": -1, "max_length": 2048}
# Read, never imported: importing the template pulls trl (~6 s) into the forge worker for nothing.
TEMPLATE_PATH = Path(__file__).with_name("train_template.py")
MAX_SCRIPT_CHARS = 20_000

Generate = Callable[[list[dict[str, str]]], Awaitable[str] | str]


@dataclass
class ScriptChoice:
    source: str
    origin: str  # "generated" | "template"
    reason: str  # why the template was used ("" when BRICK's script was accepted)
    problems: list[str] = field(default_factory=list)
    generated_chars: int = 0

    def describe(self) -> dict[str, Any]:
        return {"origin": self.origin, "reason": self.reason, "problems": self.problems[:10],
                "generated_chars": self.generated_chars}


def template_source() -> str:
    return TEMPLATE_PATH.read_text(encoding="utf-8")


# -- prompting BRICK ------------------------------------------------------------------------------


def script_prompt(config: dict[str, Any]) -> list[dict[str, str]]:
    lora = {**TABLE4_LORA, **config.get("lora", {})}
    hp = {**TABLE4_TRAINING, **config.get("training", {})}
    keys = ", ".join(sorted(config))
    return [{"role": "user", "content": (
        "Write a complete Python script that fine-tunes a LoRA adapter.\n"
        f"- Read a JSON config from the path in sys.argv[1]; its keys: {keys}.\n"
        "- Load the base model and tokenizer from config['base_model'] with transformers "
        "(AutoModelForCausalLM, AutoTokenizer).\n"
        "- Load config['train_path'] (JSONL, one {\"messages\": [...]} chat per line) with datasets.\n"
        f"- peft.LoraConfig with {json.dumps(lora)}.\n"
        f"- trl.SFTConfig with output_dir=config['output_dir'] and {json.dumps(hp)}; bf16 only if "
        "torch.cuda.is_available().\n"
        "- trl.SFTTrainer(model=..., args=..., train_dataset=..., processing_class=tokenizer, "
        "peft_config=...), then trainer.train().\n"
        "- Save the adapter with trainer.model.save_pretrained(config['output_dir']).\n"
        f"- Import only: {', '.join(sorted(ALLOWED_IMPORTS))}.\n"
        "Reply with only the code in one ```python block.")}]


# -- validation -------------------------------------------------------------------------------------

_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(text: str) -> str:
    """The code in a reply: the largest fenced block, else the whole text."""
    blocks = _FENCE.findall(text or "")
    return max(blocks, key=len) if blocks else (text or "")


def _call_name(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ""


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def validate_script(source: str) -> list[str]:
    """Problems that disqualify a training script; an empty list means it is accepted."""
    if not source.strip():
        return ["empty script"]
    if len(source) > MAX_SCRIPT_CHARS:
        return [f"script longer than {MAX_SCRIPT_CHARS} characters"]
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        return [f"does not parse: {e.msg} (line {e.lineno})"]
    problems: list[str] = []
    imported: dict[str, str] = {}  # local name -> "module.name"
    calls: set[str] = set()
    dotted_calls: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top not in ALLOWED_IMPORTS:
                    problems.append(f"import of {alias.name!r} is not allowed")
                imported[alias.asname or top] = alias.name
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level or module.split(".")[0] not in ALLOWED_IMPORTS:
                problems.append(f"import from {('.' * node.level + module)!r} is not allowed")
            for alias in node.names:
                imported[alias.asname or alias.name] = f"{module}.{alias.name}"
        elif isinstance(node, ast.Call):
            name = _call_name(node)
            calls.add(name)
            dotted_calls.add(_dotted(node.func))
            if name in FORBIDDEN_CALLS:
                problems.append(f"call to {name}() is not allowed")
        elif isinstance(node, ast.Attribute) and node.attr.startswith("__") and node.attr not in HARMLESS_DUNDERS:
            problems.append(f"dunder attribute access {node.attr!r} is not allowed")

    def uses(module: str, name: str) -> bool:
        """Called as an imported name (any alias) or as ``<alias of module>.name``."""
        local = {alias for alias, full in imported.items() if full.split(".")[0] == module and full.endswith(name)}
        mod_aliases = {alias for alias, full in imported.items() if full == module}
        return bool(local & calls) or any(f"{m}.{name}" in dotted_calls for m in mod_aliases)

    for module, name in (("peft", "LoraConfig"), ("trl", "SFTConfig"), ("trl", "SFTTrainer")):
        if not uses(module, name):
            problems.append(f"does not use {module}.{name}")
    if "train" not in calls:
        problems.append("never calls train()")
    if not calls & {"save_pretrained", "save_model"}:
        problems.append("never saves the adapter (save_pretrained / save_model)")
    if "sys.argv" not in {_dotted(n) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}:
        problems.append("does not read its config path from sys.argv")
    return list(dict.fromkeys(problems))


# -- producing the script --------------------------------------------------------------------------


async def produce_script(generate: Generate | None, config: dict[str, Any]) -> ScriptChoice:
    """BRICK's script if it validates, else the canonical template with the reason."""
    if generate is None:
        return ScriptChoice(template_source(), "template", "script generation disabled")
    try:
        reply = generate(script_prompt(config))
        if inspect.isawaitable(reply):
            reply = await reply
    except Exception as e:  # an LLM failure is a reason to use the template, not to fail the forge
        return ScriptChoice(template_source(), "template", f"generation failed: {type(e).__name__}: {e}")
    code = extract_code(str(reply or ""))
    problems = validate_script(code)
    if problems:
        return ScriptChoice(template_source(), "template", "generated script rejected: " + "; ".join(problems[:3]),
                            problems, len(code))
    return ScriptChoice(code, "generated", "", [], len(code))


# -- the run's config -------------------------------------------------------------------------------

MIN_EPOCHS, MAX_EPOCHS = 1, 3  # Table 4: 1-3 epochs; fewer are often enough


class ForgeConfigError(ValueError):
    """The configured backend gives nothing to fine-tune, or a parameter is out of range."""


def resolve_base_model(settings: Any) -> dict[str, Any]:
    """The weights to fine-tune: those the llm service serves, so the adapter fits the model it will ride on.

    Embedded backend on llama.cpp: the served GGUF's transformers form (batos.models.training_checkpoint,
    dequantized once and cached), or SmolLM2-135M's when the served model has none; on the transformers
    fallback, SmolLM2-135M (what it serves). ``model`` names which; the ``serve_*`` keys tell the evaluation
    to judge the adapter on the runtime that will serve it.
    """
    backend = settings.llm_backend
    serving: dict[str, Any] = {"serve_runtime": "transformers"}
    if backend == "embedded":
        from batos import models

        on_llamacpp = serves_with_llamacpp(settings)
        try:
            spec = models.trained_spec(settings) if on_llamacpp else models.LLM_MODELS[models.TEST_LLM_MODEL]
            path = str(models.llm_checkpoint(settings, spec))
            serving = {"model": spec.key}
            if on_llamacpp and spec.key == settings.llm_model:
                serving |= {"serve_runtime": "llamacpp", "serve_gguf": str(models.llm_gguf_path(settings)),
                            "threads": int(getattr(settings, "llm_threads", 1) or 1)}  # fmt: skip
            else:
                serving |= {"serve_runtime": "transformers"}
        except models.ModelNotAvailable as e:
            raise ForgeConfigError(str(e)) from e
    elif settings.llm_model_path:
        path = settings.llm_model_path
    else:
        raise ForgeConfigError(f"llm_backend {backend!r} has no local weights to fine-tune; set llm_model_path")
    if not (Path(path) / "config.json").is_file():
        raise ForgeConfigError(f"base model {path} is not a local transformers checkpoint (no config.json)")
    return {"base_model": path, "dtype": settings.llm_dtype, "device": settings.llm_device, **serving}


def serves_with_llamacpp(settings: Any) -> bool:
    """Whether the embedded llm service runs llama.cpp (as services/forge/backends chooses), without importing
    llama_cpp into the forge worker, which does not need it."""
    import importlib.util

    return settings.llm_runtime != "transformers" and importlib.util.find_spec("llama_cpp") is not None


def build_config(
    *,
    base: dict[str, str],
    persona: str,
    dataset: dict[str, Any],
    output_dir: Path,
    epochs: int = 1,
    max_steps: int = -1,
    logging_steps: int | None = None,
    previous_adapter: str | None = None,
    evaluation: dict[str, Any] | None = None,
    seed: int = 42,
) -> dict[str, Any]:
    """The JSON config a training script and the evaluation read (Table 4 plus this run's paths and data)."""
    if not MIN_EPOCHS <= epochs <= MAX_EPOCHS:
        raise ForgeConfigError(f"epochs must be within {MIN_EPOCHS}-{MAX_EPOCHS} (Table 4), got {epochs}")
    if max_steps == 0 or max_steps < -1:
        raise ForgeConfigError("max_steps must be positive, or -1 for whole epochs")
    training = {**TABLE4_TRAINING, "num_train_epochs": epochs, "max_steps": max_steps}
    if logging_steps is not None:
        training["logging_steps"] = max(1, logging_steps)
    return {
        "persona": persona,
        **base,
        "train_path": str(dataset["train_path"]),
        "eval_path": str(dataset["eval_path"]),
        "dataset_sha256": dataset.get("sha256"),
        "train_ids": list(dataset.get("train_ids", [])),
        "eval_ids": list(dataset.get("eval_ids", [])),
        "output_dir": str(output_dir),
        "lora": dict(TABLE4_LORA),
        "training": training,
        "previous_adapter": previous_adapter,
        "evaluation": evaluation or {},
        "seed": seed,
    }
