"""LoRA adapters: a snapshot in PEFT's layout (`adapter_config.json` naming its base model, and the adapter's weights)
is an adapter of that base, listed with it in the inventory; a launch of the base may serve adapters beside it, each
under its own name (its repo id), from its snapshot folder.

An adapter's base is what its `base_model_name_or_path` says: a repo id, or (as peft writes it when the base was loaded
from a folder) a path, whose `models--org--name` folder names the repo. A launch serves only adapters of the model it
launches; an adapter alone is not a model to launch.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import ValidationError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
CACHE_FOLDER = re.compile(r"(?:^|/)models--([A-Za-z0-9][A-Za-z0-9_.\-]*)--([A-Za-z0-9][A-Za-z0-9_.\-]*)(?:/|$)")
MAX_ADAPTERS = 16
GENERATING_TASKS = (None, "CAUSAL_LM")  # peft's task types of a language model's adapter


def base_repo_id(value) -> Optional[str]:
    """The repo id an adapter's `base_model_name_or_path` names: itself, or the repo of a cache folder it points in."""
    if not isinstance(value, str) or not value.strip():
        return None
    found = CACHE_FOLDER.search(value.replace("\\", "/"))
    if found:
        return f"{found[1]}/{found[2]}"
    return value.strip()


def describe_adapter(snapshot: Path) -> Optional[dict]:
    """What a PEFT adapter folder is ({"base", "peft_type", "rank", "alpha", "task_type", "target_modules"}), or None
    when `snapshot` holds no adapter_config.json with its weights beside it."""
    if not any((snapshot / name).is_file() for name in ADAPTER_WEIGHTS):
        return None
    try:
        config = json.loads((snapshot / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(config, dict):
        return None
    rank = config.get("r")
    targets = config.get("target_modules")
    return {"base": base_repo_id(config.get("base_model_name_or_path")),
            "peft_type": config.get("peft_type") if isinstance(config.get("peft_type"), str) else None,
            "rank": rank if isinstance(rank, int) and not isinstance(rank, bool) and rank > 0 else None,
            "alpha": config.get("lora_alpha") if isinstance(config.get("lora_alpha"), (int, float)) else None,
            "task_type": config.get("task_type") if isinstance(config.get("task_type"), str) else None,
            "target_modules": sorted(t for t in targets if isinstance(t, str)) if isinstance(targets, list) else []}


def recognise_adapter(adapter: dict) -> tuple:
    """(kind, the kinds it is launched as (none: only with its base), why) of an adapter."""
    kind = "text-generation" if adapter.get("task_type") in GENERATING_TASKS else None
    method = {"LORA": "LoRA"}.get(adapter.get("peft_type"), adapter.get("peft_type") or "PEFT")
    what = f"a {method} adapter of {adapter.get('base') or 'an unnamed base model'}"
    return kind, [], f"{what}: launch its base with it among the adapters"


def link_adapters(models: List[dict]) -> List[dict]:
    """The inventory's models (entries as the API lists them), each base with `adapters`: the repo ids of the local
    adapters naming it as their base; each adapter entry with `base`."""
    by_base: Dict[str, List[str]] = {}
    for entry in models:
        adapter = (entry.get("revisions") or [{}])[0].get("adapter")
        entry["base"] = adapter.get("base") if adapter else None
        if entry["base"]:
            by_base.setdefault(entry["base"], []).append(entry["repo_id"])
    for entry in models:
        entry["adapters"] = sorted(by_base.get(entry["repo_id"], []))
    return models


@dataclass(frozen=True)
class Adapter:
    """An adapter a launch serves: its name (the repo id, what requests name), snapshot and rank."""
    name: str
    revision: str
    path: Path
    rank: Optional[int]

    def to_dict(self) -> dict:
        return {"name": self.name, "revision": self.revision, "path": str(self.path), "rank": self.rank}


def check_not_adapter(model) -> None:
    """Refuse launching an adapter on its own (ValidationError naming model, and the base to launch instead)."""
    adapter = model.meta.get("adapter")
    if adapter:
        base = adapter.get("base") or "its base model"
        raise ValidationError("model", f"{model.repo_id} is a LoRA adapter of {base}, not a model to launch alone: "
                                       f"launch {base} with adapters [{model.repo_id}]")


def split_reference(reference: str) -> Tuple[str, Optional[str]]:
    """(repo id, revision or None) of an adapter as a launch names it: `org/name`, or `org/name@<revision>` (a
    commit, branch or tag: what an exported recipe pins)."""
    name, _, revision = reference.partition("@")
    return name, revision or None


def resolve_adapters(names: Sequence[str], model, kind: str, engine, find_revision) -> List[Adapter]:
    """The adapters `names` (`org/name`, or `org/name@<revision>`) as a launch of `model` (a ModelRevision) as `kind`
    on `engine` serves them; each refusal a ValidationError naming `adapters`. `find_revision(repo_id, revision)` finds
    a local snapshot (catalog/models.py's)."""
    if not names:
        return []
    if not engine.serves_adapters:
        raise ValidationError("adapters", f"{engine.title} serves no adapters: launch the model without them")
    if kind != "text-generation":
        raise ValidationError("adapters", f"adapters apply to text-generation services, not {kind}")
    found: List[Adapter] = []
    for reference in names:
        name, revision = split_reference(reference)
        if name == model.repo_id or name in (adapter.name for adapter in found):
            raise ValidationError("adapters", f"{name} is named twice: each served name must be one model's")
        try:
            snapshot = find_revision(name, revision)
        except ValidationError as exc:
            raise ValidationError("adapters", exc.problem) from None
        adapter = snapshot.meta.get("adapter")
        if not adapter:
            raise ValidationError("adapters", f"{name} is not a LoRA adapter (no {ADAPTER_CONFIG} with "
                                              f"{' or '.join(ADAPTER_WEIGHTS)} beside it)")
        if adapter.get("base") != model.repo_id:
            raise ValidationError("adapters", f"{name} is an adapter of {adapter.get('base') or 'an unnamed model'}, "
                                              f"not of {model.repo_id}: launch its base to serve it")
        found.append(Adapter(name, snapshot.revision, snapshot.path, adapter.get("rank")))
    return found
