"""Gunicorn settings for `gunicorn -c gunicorn_config.py wsgi:application`.

Binds HOST:PORT, serves HTTPS when SSL_CERT and SSL_KEY are set, and uses the same
worker settings as `gpulocker web` (WEB_CONCURRENCY workers, threads, preloaded app).
A `--workers=N` on the command line still wins.
"""

from gpulocker.config import load_settings
from gpulocker.web.server import gunicorn_options

globals().update(gunicorn_options(load_settings()))
