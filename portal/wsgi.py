"""The WSGI entry point gunicorn loads in each worker: the app plus its background reconciler."""
from . import create_app, start_reconciler

app = create_app()
start_reconciler(app)
