"""`pilotfish doctor`: checks the site setup (Slurm, cache_dir, tiers, runtimes) without a portal."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess

import click

from . import fail, main
from ..config import ConfigError, load_config


@main.command()
def doctor():
    """Check this site's setup without a portal: Slurm, cache_dir, resource_specs.yaml, runtimes.

    Reads the same settings as the portal (PILOTFISH_SITE_CONFIG, PILOTFISH_HOME). One line per check,
    `ok` or `FAIL`; exits 1 if any check fails.

    Example: PILOTFISH_SITE_CONFIG=/etc/pilotfish/site.yaml pilotfish doctor
    """
    results = list(_checks())
    for ok, message in results:
        click.echo(f"{'ok  ' if ok else 'FAIL'}  {message}")
    failed = sum(1 for ok, _ in results if not ok)
    if failed:
        fail(f"{failed} check(s) failed", 1)


def _checks():
    """(ok, message) for each check, in the order a site admin would fix them."""
    from ..catalog.images import find_image, pins_from_runtimes
    from ..catalog.kinds import KINDS as KIND_TABLE, runtime_for
    from ..catalog.models import scan_models
    from ..catalog.tiers import all_tiers, load_site_specs
    from ..errors import PortalError

    try:
        config = load_config()
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


# --- services ----------------------------------------------------------------------------------------------
