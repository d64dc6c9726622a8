"""The WSGI entry point for production: `gunicorn -c gunicorn_config.py wsgi:application`.

Reads the configuration from the environment and `.env` (SPEC section 3). The agent is
not started here: run `gpulocker agent` beside it (see deploy/).
"""

from gpulocker.config import load_settings
from gpulocker.context import configure_logging
from gpulocker.web import create_app

_settings = load_settings()
configure_logging(_settings)
application = create_app(_settings)
