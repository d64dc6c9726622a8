"""Running the product: `gpulocker serve` (web and agent, one command) and `gpulocker web`.

The web side always runs under gunicorn (threads in a few worker processes), never
Flask's development server. The app is built once in the master (`preload_app`) so the
schema is migrated once and the metrics counters are shared; each worker then opens its
own database connections (`post_fork`).

`serve` starts exactly one agent, as a child process of its own, before the web
workers: an agent per worker would fight over the same device files. The child is told
to die with its parent (PR_SET_PDEATHSIG), so a killed `serve` leaves no agent behind.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from gpulocker.config import Settings

log = logging.getLogger(__name__)

SERVE_WORKERS = 2
THREADS = 4
AGENT_STOP_SECONDS = 10.0


def default_workers() -> int:
    """`gpulocker web`: WEB_CONCURRENCY, else two per CPU plus one, at most 8."""
    raw = os.environ.get("WEB_CONCURRENCY", "")
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    return min(8, 2 * (os.cpu_count() or 1) + 1)


def gunicorn_options(settings: Settings, workers: int | None = None) -> dict[str, Any]:
    """The gunicorn settings for GPULocker (also read by the repo's gunicorn_config.py)."""
    options: dict[str, Any] = {
        "bind": f"{settings.host}:{settings.port}",
        "workers": workers or default_workers(),
        "worker_class": "gthread",
        "threads": THREADS,
        "preload_app": True,
        "timeout": 60,
        "graceful_timeout": 10,
        "keepalive": 5,
        "post_fork": post_fork,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": settings.log_level.lower(),
        "proc_name": "gpulocker-web",
        # gunicorn >= 24 opens a control socket at one fixed path per user; two servers
        # (serve beside a benchmark, tests) would fight over it, and we do not use it.
        "control_socket_disable": True,
    }
    if settings.ssl_cert and settings.ssl_key:
        options["certfile"] = settings.ssl_cert
        options["keyfile"] = settings.ssl_key
    return options


def post_fork(server: Any, worker: Any) -> None:
    """In each new worker: drop the master's database connections (never share a socket)."""
    app = worker.app.wsgi()
    ctx = app.extensions.get("gpulocker") if isinstance(app, Flask) else None
    if ctx is not None:
        ctx.db.engine.dispose(close=False)


class GunicornServer(BaseApplication):
    """Gunicorn serving a WSGI app built by `load_app` (called once, in the master)."""

    def __init__(self, load_app: Callable[[], Any], options: dict[str, Any]) -> None:
        self.load_app = load_app
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        """Apply our options to gunicorn's configuration."""
        for key, value in self.options.items():
            if value is not None and key in self.cfg.settings:
                self.cfg.set(key, value)

    def load(self) -> Any:
        """Build the app."""
        return self.load_app()


def url_of(settings: Settings) -> str:
    """The address to open in a browser."""
    scheme = "https" if settings.ssl_cert else "http"
    host = settings.host
    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn() or "localhost"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{settings.port}/"


def banner(settings: Settings, with_agent: bool) -> str:
    """What `serve`/`web` print at start: where to go and how to sign in."""
    lines = [
        f"GPULocker is starting at {url_of(settings)}",
        "Sign in with your Linux account on this machine (user name and password; "
        f"PAM service {settings.pam_service!r}).",
    ]
    if settings.privileged_users:
        lines.append("Admins: " + ", ".join(settings.privileged_users))
    if settings.gpu_backend == "simulated":
        lines.append(
            f"Simulated GPUs: {settings.gpu_config} (device files in {settings.device_path})"
        )
    lines.append(f"Database: {_hide_password(settings.database_url)}")
    if not with_agent:
        lines.append("No agent here: run `gpulocker agent` on each GPU host.")
    lines.append("Stop with Ctrl-C.")
    return "\n".join(lines)


def _hide_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # a URL we cannot parse is shown as its scheme only
        return url.split(":", 1)[0] + "://…"


def _die_with_parent() -> None:
    """In the agent child: get SIGTERM when the parent dies (Linux)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def start_agent(simulate: str | None) -> subprocess.Popen[bytes]:
    """The one agent of `serve`, as `python -m gpulocker agent` in a child process."""
    command = [sys.executable, "-m", "gpulocker", "agent"]
    if simulate:
        command += ["--simulate", simulate]
    return subprocess.Popen(command, preexec_fn=_die_with_parent)


def stop_agent(agent: subprocess.Popen[bytes]) -> None:
    """SIGTERM the agent and wait for it to finish its tick; SIGKILL if it hangs."""
    if agent.poll() is not None:
        return
    agent.terminate()
    try:
        agent.wait(AGENT_STOP_SECONDS)
    except subprocess.TimeoutExpired:
        agent.kill()
        agent.wait()


def run_web(settings: Settings, workers: int, load_app: Callable[[], Any]) -> None:
    """Serve the app under gunicorn until it is told to stop."""
    GunicornServer(load_app, gunicorn_options(settings, workers)).run()


def serve(settings: Settings, simulate: str | None) -> None:
    """`gpulocker serve`: migrate, start the agent, serve the web until stopped."""
    from gpulocker.context import open_context
    from gpulocker.web import create_app

    ctx = open_context(settings)  # migrate before the agent and the workers start
    print(banner(settings, with_agent=True), flush=True)
    agent = start_agent(simulate)
    try:
        run_web(settings, SERVE_WORKERS, lambda: create_app(ctx=ctx))
    finally:
        stop_agent(agent)
        ctx.close()


def web(settings: Settings, workers: int | None = None) -> None:
    """`gpulocker web`: the web side only (the agents run elsewhere)."""
    from gpulocker.context import open_context
    from gpulocker.web import create_app

    ctx = open_context(settings)
    print(banner(settings, with_agent=False), flush=True)
    try:
        run_web(settings, workers or default_workers(), lambda: create_app(ctx=ctx))
    finally:
        ctx.close()
