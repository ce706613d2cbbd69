"""The WSGI entry point gunicorn loads in each worker: the app plus its background reconciler."""
import logging

from . import create_app, start_reconciler

logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
app = create_app()
start_reconciler(app)
