"""Running the product: `gpulocker serve` (web and agent, one command) and `gpulocker web`.

The web side always runs under gunicorn (threads in a few worker processes), never
Flask's development server. The app is built once in the master (`preload_app`) so the
schema is migrated once and the metrics counters are shared; each worker then opens its
own database connections (`post_fork`).

`serve` supervises two children: exactly one agent (an agent per web worker would fight
over the same device files) and one `gpulocker web`. A dead agent is restarted with
backoff; a dead web server stops everything with a failure status. The children are
told to die with their parent (PR_SET_PDEATHSIG), so a killed `serve` leaves nothing
behind.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from gpulocker.config import Settings
from gpulocker.web import unprivileged

log = logging.getLogger(__name__)

SERVE_WORKERS = 2
THREADS = 4
CHILD_STOP_SECONDS = 20.0
SUPERVISE_SECONDS = 0.5
MAX_AGENT_BACKOFF_SECONDS = 30.0
AGENT_STABLE_SECONDS = 60.0


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


def plain_http_refusal(settings: Settings) -> str | None:
    """The one line the web stops with when it would serve plain HTTP off loopback (SPEC
    section 14): passwords and session cookies would cross the network in the clear. None
    when TLS is configured, TRUSTED_PROXY is set, or HOST is a loopback address."""
    if (settings.ssl_cert and settings.ssl_key) or settings.trusted_proxy:
        return None
    host = settings.host.strip("[]")
    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass
    return (
        f"refusing plain HTTP on {settings.host}:{settings.port}: set SSL_CERT and SSL_KEY, "
        "or TRUSTED_PROXY=1 behind a TLS proxy, or HOST=127.0.0.1"
    )


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


def _start_child(command: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, preexec_fn=_die_with_parent)


def start_agent(simulate: str | None) -> subprocess.Popen[bytes]:
    """The one agent of `serve`, as `python -m gpulocker agent` in a child process."""
    command = [sys.executable, "-m", "gpulocker", "agent"]
    if simulate:
        command += ["--simulate", simulate]
    return _start_child(command)


def start_web(settings: Settings) -> subprocess.Popen[bytes]:
    """The web server of `serve`: `gpulocker web` with SERVE_WORKERS workers; as WEB_USER when
    `serve` runs as root and that user exists (SPEC section 14), never as root otherwise
    without saying so."""
    command = [sys.executable, "-m", "gpulocker", "web", "--host", settings.host]
    command += ["--port", str(settings.port), "--workers", str(SERVE_WORKERS), "--quiet"]
    if os.geteuid() != 0:
        return _start_child(command)
    account = unprivileged.web_account(settings.web_user)
    if account is None:
        log.warning(
            "WEB_USER %s does not exist: the web half runs as root (`gpulocker install` "
            "creates the user)",
            settings.web_user,
        )
        return _start_child(command)
    unprivileged.share_state(settings, account)
    log.info("the web half runs as %s", settings.web_user)
    return subprocess.Popen(
        command,
        preexec_fn=_die_with_parent,
        user=account.uid,
        group=account.gid,
        extra_groups=list(account.groups),
        umask=0o007,
    )


def stop_child(child: subprocess.Popen[bytes]) -> None:
    """SIGTERM a child and let it finish (the agent its tick, gunicorn its requests);
    SIGKILL if it hangs."""
    if child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(CHILD_STOP_SECONDS)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def run_web(settings: Settings, workers: int, load_app: Callable[[], Any]) -> None:
    """Serve the app under gunicorn until it is told to stop."""
    GunicornServer(load_app, gunicorn_options(settings, workers)).run()


def serve(settings: Settings, simulate: str | None) -> int:
    """`gpulocker serve`: migrate, then supervise one agent and one web server.

    The agent is restarted (with backoff) if it dies; if the web server dies, the agent is
    stopped and `serve` exits with a failure, so systemd (or the user) sees it. SIGTERM,
    SIGINT or SIGHUP stop both. Returns the exit status.
    """
    from gpulocker.context import open_context

    refusal = plain_http_refusal(settings)
    if refusal:
        print(refusal, file=sys.stderr, flush=True)
        return 2
    open_context(settings).close()  # migrate once, before either child starts
    print(banner(settings, with_agent=True), flush=True)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda _signum, _frame: stop.set())
    children = {"agent": start_agent(simulate), "web": start_web(settings)}
    try:
        return _supervise(stop, simulate, children)
    finally:
        stop_child(children["web"])
        stop_child(children["agent"])


def _supervise(
    stop: threading.Event, simulate: str | None, children: dict[str, subprocess.Popen[bytes]]
) -> int:
    """Wait until told to stop or the web server dies; restart a dead agent meanwhile."""
    backoff = 1.0
    agent_started = time.monotonic()
    restart_at: float | None = None
    while not stop.wait(SUPERVISE_SECONDS):
        web_server = children["web"]
        if web_server.poll() is not None:
            log.error("the web server exited with status %s; stopping", web_server.returncode)
            return 1
        now = time.monotonic()
        if restart_at is not None:
            if now >= restart_at:
                children["agent"] = start_agent(simulate)
                agent_started, restart_at = now, None
            continue
        if children["agent"].poll() is None:
            if now - agent_started > AGENT_STABLE_SECONDS:
                backoff = 1.0  # it ran a while: a later failure starts the backoff afresh
            continue
        log.error(
            "the agent exited with status %s; restarting it in %g s",
            children["agent"].returncode,
            backoff,
        )
        restart_at = now + backoff
        backoff = min(backoff * 2, MAX_AGENT_BACKOFF_SECONDS)
    return 0


def web(settings: Settings, workers: int | None = None, quiet: bool = False) -> None:
    """`gpulocker web`: the web side only (the agents run elsewhere, or `serve` runs one)."""
    from gpulocker.context import open_context
    from gpulocker.web import create_app

    refusal = plain_http_refusal(settings)
    if refusal:
        print(refusal, file=sys.stderr, flush=True)
        raise SystemExit(2)
    ctx = open_context(settings)
    if not quiet:
        print(banner(settings, with_agent=False), flush=True)
    try:
        run_web(settings, workers or default_workers(), lambda: create_app(ctx=ctx))
    finally:
        ctx.close()
