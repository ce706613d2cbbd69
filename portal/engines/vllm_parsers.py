"""vLLM's tool-call and reasoning parsers per model family: the ones a text-generation launch gets unless the user
names their own (`--tool-call-parser`, `--reasoning-parser`, or `--no-enable-auto-tool-choice` for none).

A family is the config's `model_type`, but a family spans generations that do not all call tools the same way (a
Llama 2 has no `<|python_tag|>`; vLLM refuses to start with `--tool-call-parser llama3_json` on its tokenizer). So a
parser is chosen only when the model's tokenizer holds the tokens it reads (its markers); the first rule of the family
whose markers are all there wins.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .base import Preset

Rule = Tuple[str, Tuple[str, ...]]  # (parser, the tokens the tokenizer must hold)

QWEN_TOOLS: List[Rule] = [("hermes", ("<tool_call>", "</tool_call>"))]
TOOL_PARSERS: Dict[str, List[Rule]] = {
    "llama": [("hermes", ("<tool_call>", "</tool_call>")), ("llama3_json", ("<|python_tag|>",))],
    "qwen2": QWEN_TOOLS, "qwen2_moe": QWEN_TOOLS, "qwen3": QWEN_TOOLS, "qwen3_moe": QWEN_TOOLS,
    "qwen3_next": QWEN_TOOLS,
    "mistral": [("mistral", ("[TOOL_CALLS]",))], "mixtral": [("mistral", ("[TOOL_CALLS]",))],
    "granite": [("granite", ("<|tool_call|>",))], "granitemoe": [("granite", ("<|tool_call|>",))],
    "deepseek_v3": [("deepseek_v3", ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"))],
    "glm4_moe": [("glm45", ("<tool_call>", "</tool_call>"))],
    "gpt_oss": [("openai", ("<|call|>", "<|channel|>"))],
    "internlm2": [("internlm", ("<|action_start|>", "<|action_end|>"))],
    "jamba": [("jamba", ("<tool_calls>", "</tool_calls>"))],
    "lfm2": [("lfm2", ("<|tool_call_start|>", "<|tool_call_end|>"))],
    "olmo3": [("olmo3", ("<function_calls>", "</function_calls>"))],
}
THINK = ("<think>", "</think>")
REASONING_PARSERS: Dict[str, List[Rule]] = {
    "qwen3": [("qwen3", THINK)], "qwen3_moe": [("qwen3", THINK)], "qwen3_next": [("qwen3", THINK)],
    "deepseek_v3": [("deepseek_v3", THINK)],  # thinks only when asked (chat_template_kwargs), like V3.1
    "glm4_moe": [("glm45", THINK)],
    "gpt_oss": [("openai_gptoss", ("<|channel|>",))],
}
TOOL_FLAGS = ("--no-enable-auto-tool-choice", "--tool-call-parser")  # the user's own choice, or none
REASONING_FLAGS = ("--reasoning-parser",)
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tekken.json", "special_tokens_map.json")
MAX_TOKENIZER_BYTES = 200 * 1024 * 1024


def _read_regular(path: Path) -> bytes:
    """A regular file's bytes (b"" when absent, not a regular file, or larger than any tokenizer)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return b""
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_TOKENIZER_BYTES:
            return b""
        return handle.read()


def tokenizer_text(model_dir: Optional[Path]) -> bytes:
    """The tokenizer files of a model folder, as bytes to search for tokens (a token is a JSON string there)."""
    if model_dir is None:
        return b""
    return b"\n".join(_read_regular(Path(model_dir) / name) for name in TOKENIZER_FILES)


def has_tokens(text: bytes, tokens: Tuple[str, ...]) -> bool:
    """Every token appears in the tokenizer files as a JSON string (written with or without \\u escapes)."""
    return all(json.dumps(token).encode() in text or json.dumps(token, ensure_ascii=False).encode() in text
               for token in tokens)


def _choose(rules: List[Rule], text: bytes) -> Optional[Rule]:
    return next((rule for rule in rules if has_tokens(text, rule[1])), None)


def parser_presets(model_dir: Optional[Path], meta: dict) -> List[Preset]:
    """The tool-call and reasoning parser presets of a model (none for a family without one, or a tokenizer that
    lacks the family's tokens)."""
    model_type = meta.get("model_type")
    if model_type not in TOOL_PARSERS and model_type not in REASONING_PARSERS:
        return []
    text = tokenizer_text(model_dir)
    presets = []
    tool = _choose(TOOL_PARSERS.get(model_type, []), text)
    if tool:
        presets.append(Preset("tool calls", ("--enable-auto-tool-choice", "--tool-call-parser", tool[0]),
                              f"model_type {model_type}, and its tokenizer has {' '.join(tool[1])}", TOOL_FLAGS))
    reasoning = _choose(REASONING_PARSERS.get(model_type, []), text)
    if reasoning:
        presets.append(Preset("reasoning", ("--reasoning-parser", reasoning[0]),
                              f"model_type {model_type}, and its tokenizer has {' '.join(reasoning[1])}",
                              REASONING_FLAGS))
    return presets
