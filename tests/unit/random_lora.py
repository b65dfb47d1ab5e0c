"""A PEFT LoRA adapter made, not trained: random B matrices, so it visibly changes a model's output."""

from __future__ import annotations

from pathlib import Path


def random_adapter(checkpoint: Path, out: Path, *, std: float = 0.5, seed: int = 0) -> Path:
    """Save a rank-8 LoRA on the attention projections of ``checkpoint`` into ``out``; returns ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(checkpoint))
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")  # fmt: skip
    peft = get_peft_model(base, lora)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    peft.save_pretrained(str(out))
    return out
