"""Pilotfish: run AI model services on a Slurm cluster from Open OnDemand. The package root imports nothing, so
`portal.client` (for notebooks) needs only `requests`; the Flask application is built by `portal.app.create_app()`."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout: the Open OnDemand app's folder, templates, static
