"""The forge on the served model: HF form, LoRA training steps, GGUF LoRA, evaluation on llama.cpp.

Per model (SmolLM2-135M first: the baseline the forge trained until now), each stage in its own process so
its time and peak RSS are its own:

1. the HF form: loading the cached fp32 checkpoint with transformers (made by ``make setup``: dequantizing
   the GGUF, if it is missing, is timed too);
2. training: the forge's own template (services/forge/train_template.py) for ``--steps`` optimizer steps
   on short synthetic chats (batch 2 x accumulation 2, Table 4, ~70 tokens each): wall seconds per step,
   and CPU seconds per step (a 1-step run subtracted: loading and imports excluded), which a loaded
   machine distorts least;
3. the adapter as a GGUF LoRA (llama.cpp's converter, backends/gguf_lora.py), seconds;
4. the evaluation module on the serving runtime (llama.cpp with/without the GGUF LoRA): seconds, and the
   base vs adapter eval_loss / format_valid it reports.

Ratios are against the SmolLM2 row of the same run.

    .venv/bin/python bench/forge_lora.py [--models smollm2-135m,qwen2.5-coder-0.5b] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from services.forge.spare_cores import bound_openmp_spinning  # noqa: E402

bound_openmp_spinning()  # before llama_cpp loads, as the service does


def synthetic_chats(n: int, offset: int = 0) -> list[dict[str, Any]]:
    """Short golden-path-like examples: a request for a method, the method as a fenced Python block."""
    return [{"messages": [
        {"role": "system", "content": "You are BRICK. Reply with one Python method in a ```python block."},
        {"role": "user", "content": f"Define add_{i}(self, x) returning x plus {i}."},
        {"role": "assistant", "content": f"```python\ndef add_{i}(self, x):\n    return x + {i}\n```"},
    ]} for i in range(offset, offset + n)]  # fmt: skip


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def run(argv: list[str]) -> tuple[float, float, float, list[dict[str, Any]]]:
    """(wall seconds, CPU seconds, peak RSS MiB, JSON lines of stdout) of a child (GNU time reports CPU, RSS)."""
    started = time.monotonic()
    proc = subprocess.run(["/usr/bin/time", "-f", "RSS_KB=%M CPU_S=%U+%S", *argv], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"{argv[1:4]} failed:\n{proc.stderr[-3000:]}")
    tail = proc.stderr.rsplit("RSS_KB=", 1)[1].split()
    rss = int(tail[0]) / 1024
    cpu = sum(float(x) for x in tail[1].removeprefix("CPU_S=").split("+"))
    lines = []
    for line in proc.stdout.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            pass
    return wall, cpu, rss, lines


LOAD = """
import json, resource, sys, time
from batos import config, models
settings = config.load(llm_model=sys.argv[1])
t = time.monotonic(); path = models.training_checkpoint(settings); made = time.monotonic() - t
from transformers import AutoModelForCausalLM
t = time.monotonic(); m = AutoModelForCausalLM.from_pretrained(str(path)); load = time.monotonic() - t
print(json.dumps({"path": str(path), "made_s": made, "load_s": load,
                  "params_m": sum(p.numel() for p in m.parameters()) / 1e6,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def bench_model(key: str, steps: int, work: Path) -> dict[str, Any]:
    from batos import config
    from services.forge import training_script

    row: dict[str, Any] = {"model": key}
    _, _, _, lines = run([sys.executable, "-c", LOAD, key])
    row.update({k: lines[-1][k] for k in ("made_s", "load_s", "params_m", "rss_mb")})

    settings = config.load(llm_model=key, llm_backend="embedded", llm_device="cpu")
    base = training_script.resolve_base_model(settings)
    data = work / key
    data.mkdir(parents=True, exist_ok=True)
    write_jsonl(data / "train.jsonl", synthetic_chats(16))
    write_jsonl(data / "eval.jsonl", synthetic_chats(4, offset=100))
    cfg = training_script.build_config(
        base=base, persona="BRICK", dataset={"train_path": data / "train.jsonl", "eval_path": data / "eval.jsonl"},
        output_dir=data / "adapter", max_steps=steps, logging_steps=1,
        evaluation={"max_format_prompts": 2, "max_new_tokens": 32})  # fmt: skip
    (data / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    # One step, then all of them: the difference is the CPU time of steps 2..N without loading and imports.
    (data / "one.json").write_text(json.dumps({**cfg, "output_dir": str(data / "one"),
                                               "training": {**cfg["training"], "max_steps": 1}}))
    template = str(REPO / "services/forge/train_template.py")
    _, cpu_one, _, _ = run([sys.executable, "-u", template, str(data / "one.json")])
    wall, cpu, rss, lines = run([sys.executable, "-u", template, str(data / "config.json")])
    summary = next(line for line in lines if line.get("event") == "train_summary")
    row.update(train_wall_s=wall, train_rss_mb=rss, train_runtime_s=summary["train_runtime_s"],
               s_per_step=summary["train_runtime_s"] / max(1, summary["steps"]), steps=summary["steps"],
               cpu_s_per_step=(cpu - cpu_one) / max(1, summary["steps"] - 1), train_loss=summary["train_loss"])

    from services.forge.backends.gguf_lora import cache_dir, gguf_lora_for

    started = time.monotonic()
    lora = gguf_lora_for(data / "adapter", base["base_model"])
    row.update(convert_s=time.monotonic() - started, lora_mb=lora.stat().st_size / 2**20, lora_cache=str(cache_dir()))

    wall, cpu, rss, _ = run([sys.executable, "-u", "-m", "services.forge.evaluation", str(data / "config.json")])
    metrics = json.loads((data / "adapter" / "metrics.json").read_text())
    row.update(eval_s=wall, eval_cpu_s=cpu, eval_rss_mb=rss, eval_runtime=metrics.get("runtime"),
               base_loss=metrics["base"]["eval_loss"], adapter_loss=metrics["adapter"]["eval_loss"],
               base_format=metrics["base"]["format_valid"], adapter_format=metrics["adapter"]["format_valid"])
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-forge-") as tmp:
        for key in args.models.split(","):
            row = bench_model(key, args.steps, Path(tmp))
            rows.append(row)
            print(json.dumps(row), flush=True)
    baseline = rows[0]
    print(f"\n| model | load HF form (s) | s/step (wall) | CPU-s/step | ratio | train RSS (MiB) | GGUF LoRA (s) "
          f"| eval on {rows[0]['eval_runtime']}: wall / CPU (s) | eval RSS (MiB) | eval loss base -> adapter "
          "| format base -> adapter |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['load_s']:.1f} | {r['s_per_step']:.1f} | {r['cpu_s_per_step']:.1f} "
              f"| {r['cpu_s_per_step'] / baseline['cpu_s_per_step']:.2f}x | {r['train_rss_mb']:.0f} "
              f"| {r['convert_s']:.1f} | {r['eval_s']:.0f} / {r['eval_cpu_s']:.0f} | {r['eval_rss_mb']:.0f} "
              f"| {r['base_loss']} -> {r['adapter_loss']} | {r['base_format']} -> {r['adapter_format']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
