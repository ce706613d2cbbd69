"""`pilotfish doctor`: checks the site setup (Slurm, cache_dir, tiers, runtimes, the OOD app) without a portal."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import click

from .command import fail, main
from ..config import ConfigError, load_config


@main.command()
@click.option("--engines/--no-engines", default=True, show_default=True,
              help="Also start each engine the site config names, on this machine, with a small real model, and "
                   "ask it one question (vLLM takes a minute or two on a few cores).")
def doctor(engines: bool):
    """Check this site's setup without a portal: Slurm, cache_dir, resource_specs.yaml, runtimes, engines, the OOD app.

    Reads the same settings as the portal (PILOTFISH_SITE_CONFIG, PILOTFISH_HOME). One line per check,
    `ok` or `FAIL`; exits 1 if any check fails. The engine checks run the site's own command for each engine
    named under `runtimes` (native runtimes) as a job would, on a small real model staged under
    ~/.cache/pilotfish/models: run the doctor on a node like the compute nodes to check those.

    Example: PILOTFISH_SITE_CONFIG=/etc/pilotfish/site.yaml pilotfish doctor
    """
    failed = 0
    for ok, message in _checks(engines):
        click.echo(f"{'ok  ' if ok else 'FAIL'}  {message}")
        failed += not ok
    if failed:
        fail(f"{failed} check(s) failed", 1)


def _checks(engines: bool = False):
    """(ok, message) for each check, in the order a site admin would fix them."""
    from ..catalog.images import find_image, pins_from_runtimes
    from ..catalog.models import scan_models
    from ..catalog.tiers import all_tiers, load_site_specs
    from ..errors import PortalError
    from ..site import KINDS as KIND_TABLE, build_site, runtime_for

    try:
        config = load_config()
        build_site(config)  # what the portal checks at start: the same one line when it would not start
    except ConfigError as exc:
        yield False, f"site config: {exc}"
        return
    yield True, f"site config: {config.site_config_path or 'none (defaults)'}; PILOTFISH_HOME {config.home}"
    if config.scheduler == "slurm":
        for command in ("sbatch", "squeue", "scancel", "sacct", "scontrol"):
            path = shutil.which(command)
            yield bool(path), f"slurm: {command} " + (f"found at {path}" if path else "not found on PATH")
        if shutil.which("squeue"):
            try:
                result = subprocess.run(["squeue", "--noheader", "--me", "--format=%i"], capture_output=True,
                                        text=True, timeout=config.scheduler_timeout)
                answer = (result.stderr or result.stdout).strip().splitlines()
                yield result.returncode == 0, ("slurm: the controller answers squeue" if result.returncode == 0 else
                                               f"slurm: squeue failed: {answer[-1] if answer else result.returncode}")
            except subprocess.TimeoutExpired:
                yield False, f"slurm: squeue did not answer within {config.scheduler_timeout:g} s"
    else:
        yield True, f"scheduler: {config.scheduler} (no Slurm needed)"
    if config.cache_dir is None:
        yield True, "cache_dir: not set (models and images come from home_dir only)"
    elif not config.cache_dir.is_dir():
        yield False, f"cache_dir {config.cache_dir}: not a directory"
    else:
        models_dir = config.cache_dir / "models"
        if models_dir.is_dir():
            count = sum(1 for entry in models_dir.iterdir() if entry.name.startswith("models--"))
            yield True, f"cache_dir {config.cache_dir}: models/ holds {count} model repo(s)"
        else:
            yield False, f"cache_dir {config.cache_dir}: no models/ folder (expected the Hugging Face cache layout)"
        images_dir = config.cache_dir / "images"
        if images_dir.is_dir():
            count = sum(1 for entry in images_dir.iterdir() if entry.suffix == ".sif")
            yield True, f"cache_dir {config.cache_dir}: images/ holds {count} .sif image(s)"
        elif _uses_apptainer(config):
            yield False, f"cache_dir {config.cache_dir}: no images/ folder (the apptainer runtime takes its images there)"
        else:
            yield True, f"cache_dir {config.cache_dir}: no images/ folder (not needed: every runtime is native)"
        readable = os.access(config.cache_dir, os.R_OK | os.X_OK)
        yield readable, f"cache_dir {config.cache_dir}: " + ("readable" if readable else "not readable by this user")
    try:
        entries = scan_models(config.cache_dir, config.home_dir, metadata=False)
        yield True, f"models: {len(entries)} found in cache_dir and home_dir"
    except (OSError, PortalError) as exc:
        yield False, f"models: cannot scan: {exc}"
    try:
        specs = load_site_specs(config.cache_dir, config.resource_specs)
        where = specs.source or "none found: the built-in default tiers"
        yield True, f"resource specs ({where}): {len(all_tiers(specs))} tier(s), valid"
    except ConfigError as exc:
        yield False, f"resource specs: {exc}"
    for kind in KIND_TABLE.values():
        try:
            runtime = runtime_for(config, kind)
        except ConfigError as exc:
            yield False, f"runtime {kind.name}: {exc}"
            continue
        if runtime.runtime == "native":
            try:
                program = shlex.split(runtime.command)[0]
            except (ValueError, IndexError):
                yield False, f"runtime {kind.name}: command {runtime.command!r} cannot be parsed"
                continue
            found = (program if os.path.isfile(program) and os.access(program, os.X_OK) else None) if "/" in program \
                else shutil.which(program)
            setup = " (checked without its setup lines)" if runtime.setup else ""
            yield bool(found), (f"runtime {kind.name}: native, {program} " +
                                ("found" if found else "not found or not executable") + setup)
        else:
            apptainer = shutil.which("apptainer") or shutil.which("singularity")
            if not apptainer:
                yield False, f"runtime {kind.name}: apptainer (or singularity) not found on PATH"
                continue
            try:
                image = find_image(kind.name, cache_dir=config.cache_dir, home_dir=config.home_dir,
                                   image=runtime.image, pins=pins_from_runtimes(config.runtimes))
                yield True, f"runtime {kind.name}: apptainer {apptainer}, image {image.path}"
            except PortalError as exc:
                yield False, f"runtime {kind.name}: {exc.message}"
    if engines:
        yield from _engine_checks(config)
    yield from _ood_app_checks(config)


def _engine_checks(config):
    """Each engine the site config names (under `runtimes`, by engine or by kind), started with a small real model
    and asked one question, as the installer checks its own installs (portal.engines.check)."""
    from ..engines import installer
    from ..engines.check import EngineCheckFailed, check_engine
    from ..site import ENGINES, KINDS as KIND_TABLE, runtime_for

    named = []
    for key in config.runtimes:
        if key in ENGINES:
            named.append((key, KIND_TABLE[ENGINES[key].kinds[0]]))
        elif key in KIND_TABLE:
            named.append((KIND_TABLE[key].default_engine, KIND_TABLE[key]))
    for name, kind in named:
        engine = ENGINES[name]
        try:
            runtime = runtime_for(config, kind, engine)
        except ConfigError:
            continue  # reported by the runtime checks
        if runtime.runtime != "native":
            yield True, f"engine {name}: not started here (runtime {runtime.runtime}; run a service to check it)"
            continue
        try:
            model = installer.check_model(name, progress=lambda line: None) if name != "vllm" else \
                _vllm_check_model(runtime.command)
        except installer.InstallError as exc:
            yield False, f"engine {name}: no model to check it with: {exc}"
            continue
        if model is None:
            yield True, f"engine {name}: not started here (its command does not start with a Python that can write " \
                        f"the check model)"
            continue
        log = config.home / "doctor" / f"{name}.log"
        try:
            summary = check_engine(name, runtime.command, model, log, setup=runtime.setup, env=runtime.env)
        except EngineCheckFailed as exc:
            yield False, f"engine {name}: {str(exc).splitlines()[0]}"
            continue
        yield True, f"engine {name}: {summary}"


def _vllm_check_model(command: str):
    """The tiny Llama for a vLLM check, written by the Python of the site's vLLM command (it has torch and
    transformers); None when the command does not start with a Python."""
    from ..engines import installer
    from ..engines.check import CheckModel

    try:
        program = shlex.split(command)[0]
    except (ValueError, IndexError):
        return None
    if not Path(program).name.startswith("python"):
        return None
    path = installer.stage_tiny_llama(installer.models_dir(), Path(program))
    return CheckModel(installer.TINY_LLAMA_REPO_ID, path)


def _uses_apptainer(config) -> bool:
    from ..site import KINDS as KIND_TABLE, runtime_for

    for kind in KIND_TABLE.values():
        try:
            if runtime_for(config, kind).runtime == "apptainer":
                return True
        except ConfigError:
            pass  # reported by the runtime checks
    return False


def _ood_app_checks(config):
    """The Open OnDemand app at the repository root: its files, the Python its jobs run, and its form rendered
    as the dashboard renders it (when Ruby is here: on the Open OnDemand host), offering the portal's tiers."""
    import json

    from .. import ROOT
    from ..catalog.tiers import all_tiers, load_site_specs

    missing = [name for name in ("manifest.yml", "form.yml.erb", "submit.yml.erb", "view.html.erb",
                                 "template/before.sh.erb", "template/script.sh.erb", "template/after.sh.erb")
               if not (ROOT / name).is_file()]
    executable = os.access(ROOT / "template" / "script.sh.erb", os.X_OK)
    yield not missing and executable, (f"ood app {ROOT}: " + (f"missing {', '.join(missing)}" if missing else
                                       "template/script.sh.erb is not executable (chmod +x)" if not executable else
                                       "manifest, form, submit, view and job templates present"))
    python = Path(os.environ.get("PILOTFISH_VENV") or ROOT / ".venv") / "bin" / "python"
    found = os.access(python, os.X_OK)
    yield found, f"ood app: sessions run {python}" + ("" if found else
                                                      f": not found (python3 -m venv {python.parent.parent} && "
                                                      f"{python.parent}/pip install -e {ROOT})")
    ruby = shutil.which("ruby")
    if not ruby:
        yield True, "ood app: ruby not found, the form was not rendered here (run this check on the Open OnDemand host)"
        return
    render = ('require "erb"; require "json"; require "yaml"; path = ARGV[0]; begin; erb = ERB.new(File.read(path), '
              'trim_mode: "-"); erb.filename = path; print JSON.generate(YAML.safe_load(erb.result(nil))); '
              'rescue StandardError, ScriptError => e; warn e.message; exit 1; end')
    result = subprocess.run([ruby, "-e", render, str(ROOT / "form.yml.erb")], capture_output=True, text=True,
                            timeout=60)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        yield False, f"ood form: rendering failed: {lines[0] if lines else result.returncode}"
        return
    form = json.loads(result.stdout)
    offered = [value for _, value, *_ in form["attributes"]["tier"]["options"]]
    form_site = form["attributes"]["site_config"] or None
    portal_site = str(config.site_config_path) if config.site_config_path else None
    if form_site != portal_site:
        yield False, (f"ood form: reads the site config {form_site or '(none)'}, this check read "
                      f"{portal_site or '(none)'}: set PILOTFISH_SITE_CONFIG the same for both")
        return
    try:
        tiers = [tier.ref for tier in all_tiers(load_site_specs(config.cache_dir, config.resource_specs))]
    except ConfigError:
        tiers = None  # reported above
    agree = tiers is None or offered == tiers
    yield agree, (f"ood form: offers {len(offered)} tier(s), as the portal" if agree else
                  f"ood form: offers {', '.join(offered)} but the portal has {', '.join(tiers)}")


# --- services ----------------------------------------------------------------------------------------------
