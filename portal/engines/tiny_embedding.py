"""Write a tiny but real sentence-transformers embedding model for vLLM: a BERT encoder (safetensors), a trained
WordPiece tokenizer, and the sentence-transformers files (modules.json, mean pooling, normalisation).

    <vllm venv>/bin/python portal/engines/tiny_embedding.py OUT_DIR

Run with the vLLM virtualenv's Python (it has torch, transformers and tokenizers). The weights are random (seeded), so
the embeddings mean nothing, but they are real: the same text gives the same vector, different texts different ones,
and the vector has `hidden_size` (192: three heads of 64, the head size vLLM's CPU kernels take) dimensions.
"""
import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertModel, BertTokenizerFast

HIDDEN = 192
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Pilotfish runs models on the cluster.",
          "Hello, how are you today? I am fine, thank you.", "Researchers launch services from a notebook.",
          "0 1 2 3 4 5 6 7 8 9 10 11 12", "What is the capital of France? Paris is the capital of France.",
          "Embeddings place similar sentences near each other.", "A reranker orders documents for a query."] * 20
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MODULES = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
           {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
           {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
POOLING = {"word_embedding_dimension": HIDDEN, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
           "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
           "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": False, "include_prompt": True}


def main(out: Path) -> None:
    torch.manual_seed(0)
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=400, special_tokens=SPECIAL))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = BertTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                             cls_token="[CLS]", mask_token="[MASK]", model_max_length=128)
    config = BertConfig(vocab_size=len(fast), hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=HIDDEN // 64, max_position_embeddings=128, pad_token_id=fast.pad_token_id)
    model = BertModel(config, add_pooling_layer=False).to(torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)
    (out / "modules.json").write_text(json.dumps(MODULES, indent=2))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))
    (out / "config_sentence_transformers.json").write_text(json.dumps({"similarity_fn_name": "cosine", "prompts": {}}))
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps(POOLING, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
