"""Write a tiny but real vision-language model for vLLM: an Idefics3 (SmolVLM's architecture: a small SigLIP-style
vision tower, a pixel-shuffle connector and a small Llama) in safetensors, with its processor (Idefics3's image
processor, a trained byte-level BPE tokenizer with the image tokens) and a chat template.

    <vllm venv>/bin/python portal/engines/tiny_vision.py OUT_DIR

Run with the vLLM virtualenv's Python (it has torch, transformers and tokenizers). The weights are random (seeded), so
the text is gibberish, but an image really goes through the vision tower: any picture is resized to 32x32, cut into 16
patches and shuffled into 4 image tokens. Idefics3, because vLLM's CPU build runs it without torchvision: LLaVA,
PaliGemma, Qwen2-VL and Gemma 3 import torchvision, which the engine's install removes (no build of it matches the CPU
torch).
"""
import sys
from pathlib import Path

import torch
from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil,
                          Idefics3Processor, Idefics3VisionConfig)

from tiny_llama import CHAT_TEMPLATE, byte_level_tokenizer, llama_config  # the script's own folder is on sys.path

IMAGE_SIZE, PATCH_SIZE, SCALE_FACTOR = 32, 8, 2
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR ** 2
IMAGE_MARKS = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>",
               *(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7))]
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Pilotfish runs models on the cluster.",
          "What is in this picture? A red square on a white background.", "Describe the image in one sentence.",
          "0 1 2 3 4 5 6 7 8 9 10 11 12", "What colour is the cat? The cat is black."] * 20


def main(out: Path) -> None:
    torch.manual_seed(0)
    fast = byte_level_tokenizer(CORPUS, IMAGE_MARKS)
    images = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": IMAGE_SIZE},
                                       max_image_size={"longest_edge": IMAGE_SIZE})
    processor = Idefics3Processor(image_processor=images, tokenizer=fast, image_seq_len=IMAGE_TOKENS,
                                  chat_template=CHAT_TEMPLATE)
    text = llama_config(fast)
    vision = Idefics3VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                                  image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    config = Idefics3Config(vision_config=vision.to_dict(), text_config=text.to_dict(), scale_factor=SCALE_FACTOR,
                            image_token_id=fast.convert_tokens_to_ids("<image>"), pad_token_id=fast.pad_token_id,
                            tie_word_embeddings=False)
    model = Idefics3ForConditionalGeneration(config).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
