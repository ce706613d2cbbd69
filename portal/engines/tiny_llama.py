"""Write a tiny but real Llama model for vLLM: safetensors weights, a trained byte-level BPE tokenizer, a chat template.

    <vllm venv>/bin/python portal/engines/tiny_llama.py OUT_DIR

Run with the vLLM virtualenv's Python (it has torch, transformers and tokenizers). The weights are random (seeded),
so the text is gibberish, but every API vLLM offers works on it. Sizes vLLM's CPU kernels accept: head_dim 64. Its
tokenizer has Llama 3.1's tool-call token (<|python_tag|>), so it gets the Llama family's tool-call parser.
"""
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
TOOL_TOKENS = ["<|python_tag|>", "<|eom_id|>"]  # as Llama 3.1's tokenizer has them
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Pilotfish runs models on the cluster.",
          "Hello, how are you today? I am fine, thank you.", "Researchers launch services from a notebook.",
          "0 1 2 3 4 5 6 7 8 9 10 11 12", "What is the capital of France? Paris is the capital of France."] * 20


def byte_level_tokenizer(corpus, special_tokens, **named_tokens) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of 512 tokens trained on `corpus`, with <s>, </s>, <pad> and `special_tokens`, and the
    chat template (also used by engines/tiny_vision.py)."""
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<s>", "</s>", "<pad>", *special_tokens],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   **named_tokens)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def llama_config(fast: PreTrainedTokenizerFast) -> LlamaConfig:
    """The tiny Llama's sizes for this tokenizer (also the text model of engines/tiny_vision.py)."""
    return LlamaConfig(vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                       pad_token_id=fast.pad_token_id, tie_word_embeddings=False)


def main(out: Path) -> None:
    torch.manual_seed(0)
    fast = byte_level_tokenizer(CORPUS, TOOL_TOKENS, additional_special_tokens=TOOL_TOKENS)
    model = LlamaForCausalLM(llama_config(fast)).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
