"""Write a real LoRA adapter for the tiny Llama with `peft` (adapter_config.json naming its base, and its weights in
adapter_model.safetensors), as a fine-tuning run would save it.

    <python with torch, transformers and peft> portal/engines/tiny_lora.py BASE_DIR BASE_REPO_ID SEED OUT_DIR

The weights are random (seeded by SEED) and both of each pair are non-zero (peft's own initialisation leaves B at zero,
an adapter that changes nothing), scaled so that greedy decoding with the adapter picks other tokens than the base
model: what a test can tell apart.
"""
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

RANK, ALPHA = 8, 64
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(base: Path, base_repo_id: str, seed: int, out: Path) -> None:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.name_or_path = base_repo_id  # what adapter_config.json names as its base
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM", init_lora_weights=False)
    adapted = get_peft_model(model, config)
    out.mkdir(parents=True, exist_ok=True)
    adapted.save_pretrained(out, safe_serialization=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
