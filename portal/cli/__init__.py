"""The `pilotfish` command line: every command goes through the portal's REST API (portal.client), except
`start` (runs the portal) and `doctor` (checks the site setup without a portal)."""
from __future__ import annotations

from . import apply, batch, bench, catalog, cluster, demo, doctor, services, usage  # noqa: F401  (importing registers the commands)
from .command import main  # noqa: F401  (the console script: pilotfish = portal.cli:main)
