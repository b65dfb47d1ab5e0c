"""Judge a freshly trained adapter on the held-out split: base vs previous adapter vs new adapter.

Run by the steward after the training script (``python -m services.forge.evaluation CONFIG.json``), so the
numbers that decide activation come from our code, never from the script being judged. Two measures, both
on the same held-out examples, for each model:

* ``eval_loss``: mean cross-entropy per completion token (the prompt is masked, as in training);
* ``format_valid``: the share of greedy outputs on the held-out prompts that have the golden outputs'
  format: a ReAct action (services/forge/structured.py's parser), Python source (``ast.parse``) or JSON. Only
  a few prompts (``evaluation.max_format_prompts``), because CPU generation is slow.

Both are taken on the runtime that will serve the adapter (``serve_runtime`` in the config, set by
training_script.resolve_base_model): llama.cpp on the served GGUF with and without the adapter as a GGUF
LoRA (services/forge/evaluation_gguf.py) for the embedded default, else the transformers checkpoint with PEFT.

Writes ``metrics.json`` beside the adapter (and ``training_meta.json`` when a generated script wrote none).
"""

from __future__ import annotations

import ast
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DEFAULT_FORMAT_PROMPTS = 4
MAX_FORMAT_TOKENS = 256
_FENCE_OPEN = ("```python", "```py", "```json", "```")


def emit(event: str, **data: Any) -> None:
    print(json.dumps({"event": event, **data}, default=str), flush=True)


# -- output formats ------------------------------------------------------------------------------


def strip_fences(text: str) -> str:
    body = text.strip()
    for opener in _FENCE_OPEN:
        if body.startswith(opener):
            body = body[len(opener):]
            end = body.find("```")
            return (body if end < 0 else body[:end]).strip()
    return body


def is_react_action(text: str) -> bool:
    from services.forge.structured import parse_action

    action, _ = parse_action(text)  # proto.react's vocabulary: the one the kernel asks in
    return action is not None


def is_python(text: str) -> bool:
    code = strip_fences(text)
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return False
    return any(isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) for n in tree.body)


def is_json(text: str) -> bool:
    try:
        json.loads(strip_fences(text))
    except ValueError:
        return False
    return True


FORMATS = {"react_action": is_react_action, "python": is_python, "json": is_json}


def output_format(references: list[str]) -> str | None:
    """The format every golden output has (checked in this order), or None when they share none."""
    if not references:
        return None
    for name in ("react_action", "python", "json"):
        if all(FORMATS[name](r) for r in references):
            return name
    return None


# -- measuring -----------------------------------------------------------------------------------


def encode_example(tokenizer: Any, prompt: list[dict[str, str]], completion: list[dict[str, str]],
                   max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt+completion through the chat template, and how many belong to the prompt."""
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full_text.startswith(prompt_text):  # a template that rewrites history: fall back to plain text
        prompt_text, full_text = prompt_text, prompt_text + completion[0]["content"]
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + completion_ids)[-max_length:]  # keep the completion when truncating
    return ids, max(0, len(ids) - len(completion_ids))


def completion_loss(model: Any, encoded: list[tuple[list[int], int]], device: str) -> float | None:
    """Mean loss per completion token over all examples (not a mean of per-example means)."""
    import torch

    total, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for ids, n_prompt in encoded:
            if len(ids) - n_prompt < 1:
                continue
            input_ids = torch.tensor([ids], device=device)
            labels = input_ids.clone()
            labels[0, :n_prompt] = -100
            out = model(input_ids=input_ids, labels=labels)
            n = int((labels[0, 1:] != -100).sum())  # the model shifts labels by one
            total += float(out.loss) * n
            tokens += n
    return round(total / tokens, 6) if tokens else None


def greedy_outputs(model: Any, tokenizer: Any, prompts: list[list[dict[str, str]]], max_new_tokens: int,
                   device: str) -> list[str]:
    import torch

    outputs = []
    model.eval()
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)["input_ids"].to(device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            outputs.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return outputs


def score_outputs(texts: list[str], kind: str) -> dict[str, Any]:
    """The share of outputs in the golden format, and two samples to read."""
    return {"format_valid": round(sum(FORMATS[kind](t) for t in texts) / len(texts), 4),
            "samples": [t[:300] for t in texts[:2]]}


def measure(model: Any, tokenizer: Any, encoded: list[tuple[list[int], int]], prompts: list[list[dict[str, str]]],
            kind: str | None, max_new_tokens: int, device: str) -> dict[str, Any]:
    started = time.monotonic()
    result: dict[str, Any] = {"eval_loss": completion_loss(model, encoded, device), "format_valid": None}
    if kind is not None and prompts:
        result.update(score_outputs(greedy_outputs(model, tokenizer, prompts, max_new_tokens, device), kind))
    result["seconds"] = round(time.monotonic() - started, 2)
    return result


class TorchJudge:
    """The transformers checkpoint the adapter was trained on, with PEFT switching between adapters."""

    runtime = "transformers"

    def __init__(self, config: dict[str, Any], tokenizer: Any, adapters: dict[str, str]):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from services.forge.train_template import resolve_device, resolve_dtype

        self.tokenizer = tokenizer
        self.device = resolve_device(config)
        self.dtype = resolve_dtype(config, self.device)
        base = AutoModelForCausalLM.from_pretrained(config["base_model"], dtype=self.dtype).to(self.device)
        (first, path), *rest = adapters.items()
        self.model = PeftModel.from_pretrained(base, path, adapter_name=first)
        for name, path in rest:
            self.model.load_adapter(path, adapter_name=name)

    def measure(self, adapter: str | None, encoded: list[tuple[list[int], int]],
                prompts: list[list[dict[str, str]]], kind: str | None, max_new_tokens: int) -> dict[str, Any]:
        args = (self.model, self.tokenizer, encoded, prompts, kind, max_new_tokens, self.device)
        if adapter is None:
            with self.model.disable_adapter():
                return measure(*args)
        self.model.set_adapter(adapter)
        return measure(*args)

    def describe(self) -> dict[str, Any]:
        import torch

        return {"runtime": self.runtime, "device": self.device, "dtype": str(self.dtype).replace("torch.", ""),
                "torch": torch.__version__}

    def close(self) -> None:
        pass


def make_judge(config: dict[str, Any], tokenizer: Any, adapters: dict[str, str], context_tokens: int) -> Any:
    """The runtime that will serve the adapter: llama.cpp on the served GGUF when the config says so (the
    forge's resolve_base_model), else the transformers checkpoint."""
    if config.get("serve_runtime") == "llamacpp" and config.get("serve_gguf"):
        from services.forge.evaluation_gguf import GGUFJudge

        judge = GGUFJudge(config["serve_gguf"], config["base_model"], adapters,
                          threads=int(config.get("threads") or 1), context_tokens=context_tokens)
        return judge
    return TorchJudge(config, tokenizer, adapters)


# -- the whole evaluation ---------------------------------------------------------------------------


def evaluate(config: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    # The template's helper, so data is read exactly as in training (imported here: it pulls trl).
    from services.forge.evaluation_gguf import context_for
    from services.forge.train_template import load_chat_jsonl

    started = time.monotonic()
    adapter_dir = Path(config["output_dir"])
    opts = config.get("evaluation", {})
    rows = load_chat_jsonl(config["eval_path"]) if config.get("eval_path") else []
    tokenizer = AutoTokenizer.from_pretrained(config["base_model"])
    max_length = int(config.get("training", {}).get("max_length", 2048))
    encoded = [encode_example(tokenizer, r["prompt"], r["completion"], max_length) for r in rows]
    references = [r["completion"][0]["content"] for r in rows]
    kind = output_format(references)
    prompts = [r["prompt"] for r in rows[: int(opts.get("max_format_prompts", DEFAULT_FORMAT_PROMPTS))]]
    longest = max((len(ids) - n for ids, n in encoded), default=0)
    max_new = int(opts.get("max_new_tokens") or min(MAX_FORMAT_TOKENS, max(32, longest + 16)))

    previous = config.get("previous_adapter")
    if previous and not (Path(previous) / "adapter_config.json").is_file():
        previous = None  # gone since the forge started: compare with the base only
    adapters = {"candidate": str(adapter_dir)} | ({"previous": str(previous)} if previous else {})
    longest_prompt = max((n for _, n in encoded), default=0)
    judge = make_judge(config, tokenizer, adapters, context_for(encoded, longest_prompt + 64, max_new))

    total = 2 + bool(previous)
    emit("progress", stage="evaluate", step=0, total=total, examples=len(rows), format_kind=kind,
         runtime=judge.runtime)
    try:
        base_m = judge.measure(None, encoded, prompts, kind, max_new)
        emit("progress", stage="evaluate", step=1, total=total, model="base", **_brief(base_m))
        prev_m = None
        if previous:
            prev_m = {**judge.measure("previous", encoded, prompts, kind, max_new), "path": str(previous)}
            emit("progress", stage="evaluate", step=2, total=total, model="previous", **_brief(prev_m))
        cand_m = judge.measure("candidate", encoded, prompts, kind, max_new)
        emit("progress", stage="evaluate", step=total, total=total, model="adapter", **_brief(cand_m))
    finally:
        judge.close()
    return {
        "eval_examples": len(rows),
        "format_kind": kind,
        "format_prompts": len(prompts) if kind else 0,
        "max_new_tokens": max_new,
        "base": base_m,
        "previous": prev_m,
        "adapter": cand_m,
        "dataset_sha256": config.get("dataset_sha256"),
        **judge.describe(),
        "seconds": round(time.monotonic() - started, 1),
        "evaluated_at": datetime.now(UTC).isoformat(),
    }


def _brief(m: dict[str, Any]) -> dict[str, Any]:
    return {"eval_loss": m["eval_loss"], "format_valid": m["format_valid"]}


def training_meta_from_config(config: dict[str, Any]) -> dict[str, Any]:
    keys = ("persona", "base_model", "model", "serve_runtime", "serve_gguf", "dataset_sha256", "train_path",
            "eval_path", "train_ids", "eval_ids",
            "lora", "training", "origin", "script_path", "instruction_id", "cycle_id")
    return {k: config.get(k) for k in keys} | {"written_by": "evaluation (the script wrote no training_meta.json)"}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} CONFIG.json", file=sys.stderr)
        return 2
    config = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    adapter_dir = Path(config["output_dir"])
    if not (adapter_dir / "adapter_config.json").is_file():
        print(f"no adapter in {adapter_dir}", file=sys.stderr)
        return 1
    metrics = evaluate(config)
    _write_json(adapter_dir / "metrics.json", metrics)
    if not (adapter_dir / "training_meta.json").is_file():
        _write_json(adapter_dir / "training_meta.json", training_meta_from_config(config))
    emit("evaluated", stage="evaluate", adapter_dir=str(adapter_dir), base=_brief(metrics["base"]),
         adapter=_brief(metrics["adapter"]), seconds=metrics["seconds"])
    return 0


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
