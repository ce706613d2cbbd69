"""The Flask application of a portal worker, with its background reconciler (portal/asgi.py serves it)."""
import logging

from .app import create_app, start_reconciler

logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
app = create_app()
start_reconciler(app)
