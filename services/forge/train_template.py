"""The canonical LoRA fine-tuning script (blueprint §5.2, Table 4), used when BRICK's script fails validation.

Run as ``python train_template.py CONFIG.json`` (the forge copies it next to the run's config, so the exact
script that trained an adapter is kept with it). It imports only what a generated script may import
(json, os, sys, math, time, pathlib, torch, transformers, peft, trl, datasets), so it passes the same
validation as BRICK's output.

Config (written by the forge handler): base_model, dtype, device, train_path, output_dir, lora{...},
training{...}, seed, and what training_meta.json records (persona, dataset_sha256, train_ids, eval_ids).

Stdout is one JSON object per line so the steward can relay it: {"event": "progress", "step", "total",
"loss", ...}; non-JSON noise from libraries goes to stderr.
"""

import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
from trl import SFTConfig, SFTTrainer

# Table 4. The config may override any of them (num_train_epochs within 1-3; max_steps for tests).
LORA_DEFAULTS = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "bias": "none", "task_type": "CAUSAL_LM",
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
TRAINING_DEFAULTS = {"learning_rate": 2e-4, "lr_scheduler_type": "cosine", "per_device_train_batch_size": 2,
                     "gradient_accumulation_steps": 2, "num_train_epochs": 1, "save_strategy": "no",
                     "logging_steps": 10, "max_steps": -1, "max_length": 2048}


def emit(event, **data):
    print(json.dumps({"event": event, **data}, default=str), flush=True)


def split_messages(messages):
    """A chat ending in the assistant's reply -> (prompt messages, completion messages).

    TRL trains a conversational prompt/completion pair on the completion only: the model learns the
    validated output, not to echo the mission brief.
    """
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("each example must end with an assistant message")
    return messages[:-1], messages[-1:]


def load_chat_jsonl(path):
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        prompt, completion = split_messages(record["messages"])
        if not prompt:
            raise ValueError(f"{path}:{number}: an example needs the user's inputs before the reply")
        rows.append({"prompt": prompt, "completion": completion})
    return rows


def resolve_device(config):
    wanted = config.get("device", "auto")
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return wanted


def resolve_dtype(config, device):
    """bf16 only where the hardware has it (Table 4 asks for bf16 'if supported'); fp32 on CPU."""
    wanted = config.get("dtype", "auto")
    if device == "cuda" and wanted in ("auto", "bfloat16") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device == "cuda" and wanted == "float16":
        return torch.float16
    return torch.float32


class JsonProgress(TrainerCallback):
    """One JSON line per optimizer step (with the loss on logging steps), for the steward to relay."""

    def __init__(self, logging_steps):
        self.logging_steps = max(1, logging_steps)
        self.started = time.monotonic()

    def _eta(self, state):
        done = max(1, state.global_step)
        return round((time.monotonic() - self.started) / done * max(0, state.max_steps - done), 1)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.logging_steps:  # logging steps are reported by on_log, with the loss
            emit("progress", stage="train", step=state.global_step, total=state.max_steps, eta_s=self._eta(state))

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            emit("progress", stage="train", step=state.global_step, total=state.max_steps,
                 loss=round(float(logs["loss"]), 4), learning_rate=logs.get("learning_rate"),
                 epoch=logs.get("epoch"), eta_s=self._eta(state))
        elif "train_loss" in logs:
            emit("train_summary", stage="train", steps=state.global_step, train_loss=logs["train_loss"],
                 train_runtime_s=logs.get("train_runtime"))


def train(config):
    started = time.monotonic()
    output_dir = Path(config["output_dir"])
    lora = {**LORA_DEFAULTS, **config.get("lora", {})}
    hp = {**TRAINING_DEFAULTS, **config.get("training", {})}
    device = resolve_device(config)
    dtype = resolve_dtype(config, device)
    torch.manual_seed(int(config.get("seed", 42)))

    emit("progress", stage="load", step=0, total=hp["max_steps"], model=config["base_model"], device=device,
         dtype=str(dtype).replace("torch.", ""))
    tokenizer = AutoTokenizer.from_pretrained(config["base_model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(config["base_model"], dtype=dtype)
    rows = load_chat_jsonl(config["train_path"])
    if not rows:
        raise SystemExit("the training set is empty")
    steps_per_epoch = math.ceil(len(rows) / (hp["per_device_train_batch_size"] * hp["gradient_accumulation_steps"]))

    args = SFTConfig(
        output_dir=str(output_dir),
        learning_rate=hp["learning_rate"],
        lr_scheduler_type=hp["lr_scheduler_type"],
        per_device_train_batch_size=hp["per_device_train_batch_size"],
        gradient_accumulation_steps=hp["gradient_accumulation_steps"],
        num_train_epochs=hp["num_train_epochs"],
        max_steps=hp["max_steps"],
        save_strategy=hp["save_strategy"],
        logging_steps=hp["logging_steps"],
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=device == "cpu",
        max_length=hp["max_length"],
        completion_only_loss=True,
        report_to="none",
        disable_tqdm=True,
        seed=int(config.get("seed", 42)),
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(**lora),
        callbacks=[JsonProgress(hp["logging_steps"])],
    )
    trainer.remove_callback(PrinterCallback)  # it prints Python dicts to stdout; our JSON lines replace it
    result = trainer.train()
    output_dir.mkdir(parents=True, exist_ok=True)
    # The PEFT model saves only the adapter (adapter_config.json + adapter_model.safetensors);
    # trainer.save_model would add the tokenizer and a pickled training_args.bin we neither need nor trust.
    trainer.model.save_pretrained(str(output_dir))

    meta = {
        "persona": config.get("persona"),
        "base_model": config["base_model"],
        "dataset_sha256": config.get("dataset_sha256"),
        "train_path": config["train_path"],
        "eval_path": config.get("eval_path"),
        "train_ids": config.get("train_ids", []),
        "eval_ids": config.get("eval_ids", []),
        "train_examples": len(rows),
        "steps": trainer.state.global_step,
        "steps_per_epoch": steps_per_epoch,
        "train_loss": result.training_loss,
        "seconds": round(time.monotonic() - started, 1),
        "device": device,
        "dtype": str(dtype).replace("torch.", ""),
        "lora": lora,
        "training": hp,
        "script": os.path.abspath(__file__),
        "origin": config.get("origin", "template"),
        "instruction_id": config.get("instruction_id"),
        "cycle_id": config.get("cycle_id"),
        "versions": {"torch": torch.__version__},
    }
    (output_dir / "training_meta.json").write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")
    emit("trained", stage="train", adapter_dir=str(output_dir), steps=meta["steps"], train_loss=meta["train_loss"],
         seconds=meta["seconds"])
    return meta


def main(argv):
    if len(argv) != 2:
        print(f"usage: {argv[0]} CONFIG.json", file=sys.stderr)
        return 2
    train(json.loads(Path(argv[1]).read_text(encoding="utf-8")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
