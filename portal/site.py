"""The resolved site: what the site config's settings mean, built once when the portal starts (create_app, and
`pilotfish start` before it starts its workers), so a bad entry stops the portal with one line naming the setting
instead of failing a launch later.

- runtimes: how each engine's server starts for each kind it serves (native or Apptainer, command, setup lines,
  environment, the flags users may add, the image pin), from the `runtimes` entry named after the engine, else the
  one named after the kind, else the engine's own command run natively;
- engines: the engine of each model format (each engine's own formats, with the site's `engines` over them);
- exporters: the monitoring exporters every service job starts (`exporters`);
- tiers: where resource_specs.yaml is. The file itself is read at each use, because admins edit it while portals run:
  a broken one is an HTTP 503 naming the file, the place in it and the problem, and the portal keeps running;
- the scheduler, which also says how a job's resources are asked for (`arguments`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, FrozenSet, List, Optional, Tuple

from .catalog.images import pins_from_runtimes, sif_name
from .catalog.kinds import ENGINES, FORMAT_ENGINES, KINDS, ServiceKind
from .catalog.tiers import ResourceSpecs, load_site_specs
from .config import Config, ConfigError
from .engines.base import Engine
from .errors import ValidationError
from .scheduler import Resources, Scheduler, make_scheduler

__all__ = ["ENGINES", "KINDS", "Runtime", "Site", "SiteError", "build_site", "check_engine_args", "engine_for",
           "parse_exporters", "runtime_for"]

RUNTIMES = ("native", "apptainer")
RUNTIME_FIELDS = ("runtime", "command", "image", "setup", "env", "allowed_args", "health_path")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
EXPORTER_NAME = re.compile(r"^[a-z][a-z0-9_]{0,30}$")
METRICS_PATH = re.compile(r"^/[A-Za-z0-9_./-]{0,200}$")
EXPORTER_WHEN = ("always", "gpus")


class SiteError(ConfigError):
    """A site setting the portal cannot use; the message names the setting and the problem, on one line."""


# --- runtimes ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Runtime:
    """How an engine's server starts on this site: natively (a command) or in an Apptainer image."""
    kind: ServiceKind
    engine: Engine
    runtime: str
    command: str  # native: the program (admin's shell words); apptainer: the program inside the image
    health_path: str
    setup: str = ""  # admin's shell lines run first (module load, source a venv, ...)
    env: Dict[str, str] = field(default_factory=dict)
    allowed_flags: FrozenSet[str] = frozenset()
    image: Optional[str] = None  # apptainer: the pinned image reference (see catalog.images)
    config_key: str = ""  # the `runtimes` entry it came from (the engine's name or, as a fallback, the kind's)

    def check_args(self, args: List[str]) -> List[str]:
        """Refuse any flag outside the allow-list; values (words not starting with --) pass, quoted later."""
        for arg in args:
            if arg.startswith("-"):
                flag = arg.split("=", 1)[0]
                if flag not in self.allowed_flags:
                    raise ValidationError("engine_args", f"{flag} is not an allowed {self.engine.title} option; "
                                                         f"allowed: {', '.join(sorted(self.allowed_flags))}")
        return args


def check_engine_args(runtime: Runtime, args: List[str]) -> List[str]:
    """`runtime.check_args(args)`."""
    return runtime.check_args(args)


def _runtime_entry(key, spec) -> dict:
    """One entry of `runtimes`, checked: SiteError naming `runtimes.<key>[.<field>]` for anything it cannot mean."""
    where = f"runtimes.{key}"
    if not isinstance(key, str) or (key not in ENGINES and key not in KINDS):
        raise SiteError(f"{where}: not an engine or a service kind (known: {', '.join([*ENGINES, *KINDS])})")
    if spec is None or spec == "":
        return {}
    if not isinstance(spec, dict):
        raise SiteError(f"{where}: expected a mapping with `runtime` and `command` or `image`")
    unknown = [str(name) for name in spec if name not in RUNTIME_FIELDS]
    if unknown:
        raise SiteError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))} "
                        f"(known: {', '.join(RUNTIME_FIELDS)})")
    runtime = spec.get("runtime", "native")
    if runtime not in RUNTIMES:
        raise SiteError(f"{where}.runtime: expected one of {', '.join(RUNTIMES)}, got {runtime!r}")
    command = spec.get("command")
    if command not in (None, "") and (not isinstance(command, str) or "\n" in command or not command.strip()):
        raise SiteError(f"{where}.command: expected one command line such as /opt/vllm/bin/python -m "
                        f"vllm.entrypoints.openai.api_server, got {command!r}")
    if not isinstance(spec.get("setup") or "", str):
        raise SiteError(f"{where}.setup: expected shell lines as text, got {spec['setup']!r}")
    env = spec.get("env") or {}
    if not isinstance(env, dict):
        raise SiteError(f"{where}.env: expected a mapping of variable to value")
    for name, value in env.items():
        if not isinstance(name, str) or not ENV_NAME.fullmatch(name):
            raise SiteError(f"{where}.env: {name!r} is not a variable name (letters, digits and _)")
        if isinstance(value, (dict, list)) or value is None:
            raise SiteError(f"{where}.env.{name}: expected a value such as 1 or /scratch, got {value!r}")
    extra = spec.get("allowed_args") or []
    if not isinstance(extra, list) or not all(isinstance(flag, str) and flag.startswith("--") for flag in extra):
        raise SiteError(f"{where}.allowed_args: expected a list of flags such as --max-model-len")
    health_path = spec.get("health_path")
    if health_path not in (None, "") and (not isinstance(health_path, str) or not METRICS_PATH.fullmatch(health_path)):
        raise SiteError(f"{where}.health_path: expected a path such as /health, got {health_path!r}")
    image = spec.get("image")
    if image not in (None, ""):
        try:
            sif_name(image)
        except ValidationError as exc:
            raise SiteError(f"{where}.image: {exc.problem}") from None
    return spec


def runtime_for(config: Config, kind: ServiceKind, engine: Optional[Engine] = None) -> Runtime:
    """The runtime of `engine` (default: the kind's) from the site config's `runtimes` section.

    The entry named after the engine wins; an entry named after the kind applies to every engine of that kind
    without its own entry; with neither, the engine's own command runs natively. A bad entry is a SiteError.
    """
    engine = engine or ENGINES[kind.default_engine]
    key = engine.name if engine.name in config.runtimes else kind.name
    spec = _runtime_entry(key, config.runtimes.get(key)) if key in config.runtimes else {}
    runtime = spec.get("runtime", "native")
    default_command = engine.native_command if runtime == "native" else engine.container_command
    return Runtime(
        kind=kind,
        engine=engine,
        runtime=runtime,
        command=engine.guarded_command(str(spec.get("command") or default_command)),  # the key guard in front
        health_path=str(spec.get("health_path") or engine.health_path),
        setup=str(spec.get("setup") or ""),
        env={str(name): str(value) for name, value in (spec.get("env") or {}).items()},
        allowed_flags=engine.allowed_flags | frozenset(spec.get("allowed_args") or []),
        image=spec.get("image"),
        config_key=key if key in config.runtimes else "",
    )


# --- engines per model format ------------------------------------------------------------------------------------

def check_formats(formats: Dict[str, str]) -> Dict[str, str]:
    """The site's `engines` (model format -> engine), each naming an engine there is."""
    for model_format, engine in formats.items():
        if engine not in ENGINES:
            raise SiteError(f"engines.{model_format}: unknown engine {engine!r} (known: {', '.join(ENGINES)})")
    return dict(formats)


def engine_for(formats: Dict[str, str], kind: ServiceKind, model_format: Optional[str]) -> Engine:
    """The engine that serves a `kind` model of `model_format`: the site's `formats` (its `engines`), else the engine
    whose format it is; one that does not serve `kind` gives way to the kind's default, unless the site chose it."""
    name = formats.get(model_format) or FORMAT_ENGINES.get(model_format or "")
    if name is None or kind.name not in ENGINES[name].kinds:
        if model_format in formats:  # the site asked for it: say so rather than silently picking another
            raise ValidationError("model", f"the site serves {model_format} models with {name}, which does not "
                                           f"serve {kind.name}")
        name = kind.default_engine
    return ENGINES[name]


# --- monitoring exporters ---------------------------------------------------------------------------------------

def parse_exporters(value) -> Dict[str, dict]:
    """The `exporters` section of the site config: name -> {name, command, metrics_path, when}.

    `command` is the admin's shell words, run in the background by every service job (the port to listen on is
    in $PILOTFISH_EXPORTER_PORT); `when: gpus` starts it only in jobs that have GPUs (DCGM).
    """
    if value in (None, ""):
        return {}
    if not isinstance(value, dict):
        raise SiteError("exporters: expected a mapping of exporter name to {command: ...}")
    parsed = {}
    for name, spec in value.items():
        where = f"exporters.{name}"
        if not isinstance(name, str) or not EXPORTER_NAME.fullmatch(name):
            raise SiteError(f"exporters: names are lower-case letters, digits and _ (such as node or dcgm), "
                            f"got {name!r}")
        if not isinstance(spec, dict):
            raise SiteError(f"{where}: expected a mapping with `command`")
        unknown = set(spec) - {"command", "metrics_path", "when"}
        if unknown:
            raise SiteError(f"{where}: unknown setting(s) {', '.join(sorted(map(str, unknown)))}")
        command = spec.get("command")
        if not isinstance(command, str) or not command.strip() or "\n" in command:
            raise SiteError(f"{where}.command: expected one command line using $PILOTFISH_EXPORTER_PORT")
        path = spec.get("metrics_path", "/metrics")
        if not isinstance(path, str) or not METRICS_PATH.fullmatch(path):
            raise SiteError(f"{where}.metrics_path: expected a path such as /metrics, got {path!r}")
        when = spec.get("when", "always")
        if when not in EXPORTER_WHEN:
            raise SiteError(f"{where}.when: expected one of {', '.join(EXPORTER_WHEN)}, got {when!r}")
        parsed[name] = {"name": name, "command": command.strip(), "metrics_path": path, "when": when}
    return parsed


# --- the site ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Site:
    """Everything the site config means, resolved: what launches, the reconciler and the doctor read."""
    config: Config
    scheduler: Scheduler
    runtimes: Dict[Tuple[str, str], Runtime]  # (kind, engine) -> its runtime, for every engine of every kind
    formats: Dict[str, str]  # the site's own `engines`: model format -> engine name
    exporters: Dict[str, dict]
    image_pins: Dict[str, str]  # kind or engine -> image reference, from `runtimes` (see catalog.images)

    def engine_for(self, kind: ServiceKind, model_format: Optional[str]) -> Engine:
        """The engine of a `kind` model in `model_format` (ValidationError when the site's choice cannot serve it)."""
        return engine_for(self.formats, kind, model_format)

    def runtime(self, kind: ServiceKind, engine: Optional[Engine] = None) -> Runtime:
        """The runtime of `engine` (default: the kind's) for `kind`."""
        return self.runtimes[(kind.name, (engine or ENGINES[kind.default_engine]).name)]

    def exporters_for(self, gpus: int) -> List[dict]:
        """The exporters a job with `gpus` GPUs starts."""
        return [spec for spec in self.exporters.values() if spec["when"] == "always" or gpus > 0]

    def tiers(self) -> ResourceSpecs:
        """The resource tiers, read now (TierSpecError for a broken file): resource_specs, else
        cache_dir/resource_specs.yaml, else the built-in tiers."""
        return load_site_specs(self.config.cache_dir, self.config.resource_specs)

    def arguments(self, resources: Resources, job_dir: Optional[Path] = None, name: Optional[str] = None) -> List[str]:
        """How the scheduler is asked for `resources` (see Scheduler.arguments)."""
        return self.scheduler.arguments(resources, job_dir, name)


def build_site(config: Config, scheduler: Optional[Scheduler] = None) -> Site:
    """Resolve the site from its settings; the first setting it cannot use is a SiteError naming it."""
    formats = check_formats(config.engines or {})
    for key, spec in (config.runtimes or {}).items():
        _runtime_entry(key, spec)
    runtimes = {(kind.name, name): runtime_for(config, kind, ENGINES[name])
                for kind in KINDS.values() for name in kind.engines}
    exporters = parse_exporters(config.exporters)
    return Site(config=config, scheduler=scheduler or make_scheduler(config), runtimes=runtimes, formats=formats,
                exporters=exporters, image_pins=pins_from_runtimes(config.runtimes))
