"""What applies to a launch of a model as a kind: the kinds the model can be launched as, what it takes as input, the
engine serving it, the flags it gets from what it is (the engine's presets: a pooling runner, tool-call and reasoning
parsers, where image URLs may come from) and the engine flags that mean something to its kind and its inputs. One
place for the launch and its dry run (launching.plan_launch), the launch page, `GET /api/launch-options` and
`pilotfish models options`."""
from __future__ import annotations

from typing import List, Literal, Optional, Sequence

from pydantic import Field

from .catalog.adapters import Adapter, check_not_adapter
from .catalog.kinds import KINDS, ServiceKind, get_kind
from .catalog.models import REPO_ID, REVISION, ModelRevision, find_revision
from .engines.base import Preset
from .errors import ValidationError
from .site import Runtime, Site
from .validation import Query


class LaunchOptionsQuery(Query):
    """What GET /api/launch-options takes (the API describes it from here, as the launch's own LaunchBody)."""
    model: str = Field(pattern=REPO_ID.pattern, description="a Hugging Face repo id such as org/name")
    revision: Optional[str] = Field(None, pattern=REVISION.pattern, description="a branch, tag or commit")
    kind: Optional[Literal[tuple(KINDS)]] = Field(None, description=f"one of {', '.join(KINDS)} (default: the "
                                                                    "model's own kind)")


def kinds_of(model: ModelRevision) -> List[str]:
    """The kinds `model` can be launched as, its own first; every kind when nothing about it is known."""
    return model.kinds or list(KINDS)


def check_kind(model: ModelRevision, kind: ServiceKind) -> None:
    """Refuse a kind the model cannot be served as, and an adapter alone (ValidationError naming model, and the kinds it
    can, or the base to launch)."""
    check_not_adapter(model)
    if model.kinds and kind.name not in model.kinds:
        others = f" (or {', '.join(model.kinds[1:])})" if len(model.kinds) > 1 else ""
        raise ValidationError("model", f"{model.repo_id} is a {model.kind} model, not {kind.name} "
                                       f"({model.meta.get('kind_reason')}): launch it as {model.kind}{others}")


def check_flags_apply(runtime: Runtime, kind: ServiceKind, args: Sequence[str],
                      modalities: Sequence[str] = ()) -> None:
    """Refuse engine flags that mean nothing to this kind, or to a model taking `modalities` (ValidationError naming
    engine_args and where they apply)."""
    for arg in args:
        flag = arg.split("=", 1)[0]
        if not arg.startswith("-"):
            continue
        kinds = runtime.engine.flag_kinds.get(flag)
        if kinds and kind.name not in kinds:
            raise ValidationError("engine_args", f"{flag} applies to {' and '.join(kinds)} services, not "
                                                 f"{kind.name}")
        refusal = runtime.engine.modality_refusal(flag, modalities)
        if refusal:
            raise ValidationError("engine_args", refusal)


def model_presets(runtime: Runtime, kind: ServiceKind, model: ModelRevision,
                  media_domains: Sequence[str] = (), adapters: Sequence[Adapter] = ()) -> List[Preset]:
    """The flags a `kind` launch of `model` gets from what it is, unless the user gives their own (`media_domains`:
    the site's hosts image URLs may come from), and those serving its `adapters`."""
    return runtime.engine.presets(kind.name, model.path, model.meta, media_domains) + (
        [runtime.engine.adapter_preset(adapters)] if adapters else [])


def launch_options(site: Site, repo_id: str, revision: Optional[str] = None, kind: Optional[str] = None,
                   engine_args: Sequence[str] = (), adapters: Sequence[str] = ()) -> dict:
    """What a launch of `repo_id` as `kind` (default: the model's own kind) would get: its kinds, the engine, each
    preset (applied, or replaced by `engine_args`), the engine flags that apply to the kind, and whether it can serve
    adapters (`adapters`: the local adapters of the model, which the caller knows from the inventory)."""
    config = site.config
    model = find_revision(repo_id, revision, cache_dir=config.cache_dir, home_dir=config.home_dir)
    kinds = kinds_of(model)
    chosen = get_kind(kind or kinds[0])
    if chosen is None:
        raise ValidationError("kind", f"expected one of {', '.join(KINDS)}, got {kind!r}")
    check_kind(model, chosen)
    runtime = site.runtime(chosen, site.engine_for(chosen, model.meta.get("format")))
    serves_adapters = runtime.engine.serves_adapters and chosen.name == "text-generation"
    return {"model": model.repo_id, "revision": model.revision, "kind": chosen.name, "kinds": kinds,
            "adapters": sorted(adapters) if serves_adapters else [], "serves_adapters": serves_adapters,
            "model_kind": model.kind, "kind_reason": model.meta.get("kind_reason"),
            "engine": runtime.engine.name, "engine_title": runtime.engine.title,
            "modalities": model.meta.get("modalities") or [],
            "presets": [preset.to_dict(engine_args)
                        for preset in model_presets(runtime, chosen, model, config.media_domains)],
            "flags": runtime.engine.flags_for(chosen.name, runtime.allowed_flags, model.meta.get("modalities") or [])}
