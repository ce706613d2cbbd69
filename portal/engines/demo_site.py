"""A ready-to-use site on one machine: a cache_dir with the staged models, CPU tiers, and the installed engines.

Used by `pilotfish demo` and the end-to-end tests; an admin's real site config is written by hand (README).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterable, Optional

import yaml

from . import installer

CPU_TIER = {"name": "Small", "description": "Two CPU cores: small models on llama.cpp, Whisper, test models",
            "max_model_size_gb": 2, "gpu_count": 0, "cpu_cores": 2, "memory_gb": 6}


def slurm_default_partition(timeout: float = 10) -> Optional[str]:
    """The default partition of a Slurm that answers, or None when there is no usable Slurm here."""
    if shutil.which("sinfo") is None:
        return None
    try:
        out = subprocess.run(["sinfo", "--noheader", "--format=%P"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    for name in names:
        if name.endswith("*"):
            return name[:-1]
    return names[0] if names else None


def write_site(root: Path, engines: Iterable[str], scheduler: str, partition: Optional[str] = None,
               models_root: Optional[Path] = None) -> Path:
    """Write `root/site.yaml` and `root/cache/` (models linked from `models_root`, one CPU tier); returns the config.

    `engines` are installed engine names (see installer.ENGINE_INSTALLS); each gets its `runtimes` entry.
    """
    models_root = models_root or installer.models_dir()
    cache = root / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    link = cache / "models"
    if link.is_symlink() or link.exists():
        if link.resolve() != models_root.resolve():
            link.unlink()
    if not link.exists():
        os.symlink(models_root, link)
    specs = {"time": {"default": 60, "max": 480},
             "partitions": {partition or "cpu": {"default": True, "tiers": [dict(CPU_TIER)]}}}
    (cache / "resource_specs.yaml").write_text(yaml.safe_dump(specs, sort_keys=False))
    site = {"cache_dir": str(cache), "scheduler": scheduler,
            "runtimes": {name: installer.runtime_config(name) for name in engines}}
    path = root / "site.yaml"
    path.write_text(yaml.safe_dump(site, sort_keys=False))
    return path
