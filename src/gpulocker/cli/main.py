"""The `gpulocker` command. Each subcommand parses, calls the core, prints."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from gpulocker.cli.admin import admin
from gpulocker.cli.commands import register as register_client_commands
from gpulocker.cli.install import register as register_install_commands
from gpulocker.cli.scheduling import register as register_scheduling_commands
from gpulocker.config import ConfigError, Settings, load_settings, simulated_gpu_config
from gpulocker.errors import GPULockerError


def fail(message: str, status: int = 1) -> None:
    """Print one clear line to stderr and exit."""
    click.echo(f"gpulocker: {message}", err=True)
    sys.exit(status)


def settings_from_env(simulate: str | None = None) -> Settings:
    """Load the configuration; a bad value stops here with one line naming the key."""
    try:
        settings = load_settings()
        if simulate:
            settings = settings.with_overrides(
                gpu_backend="simulated", gpu_config=simulated_gpu_config(simulate)
            )
    except ConfigError as exc:
        fail(f"configuration error: {exc}", 2)
        raise  # unreachable; for type checkers
    return settings


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the core's refusals into one line and exit status 1."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except GPULockerError as exc:
            fail(exc.message)
        except ConfigError as exc:
            fail(f"configuration error: {exc}", 2)

    return wrapper


@click.group()
@click.version_option(package_name="gpulocker")
def main() -> None:
    """GPULocker: fair, enforced sharing of a server's GPUs."""


register_client_commands(main)  # status, request, list, release, extend, whoami, login
main.add_command(admin)
register_install_commands(main)  # install, uninstall
register_scheduling_commands(main)  # run, queue, book, bookings, cancel


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@handle_errors
def db_upgrade() -> None:
    """Apply the schema migrations (also done automatically at every start)."""
    from gpulocker.db import Database, current_revision

    settings = settings_from_env()
    database = Database(settings.database_url)
    database.upgrade()
    click.echo(f"database at revision {current_revision(database.engine)}")


@main.group()
def sim() -> None:
    """Simulated GPUs (demo, tests)."""


@sim.command("load")
@click.argument("gpu_id", type=click.IntRange(min=0))
@click.option("--util", type=click.FloatRange(0, 100), default=0.0, help="utilization %")
@click.option("--mem-mib", type=click.FloatRange(min=0), default=0.0, help="memory used, MiB")
@click.option("--error", default=None, help='make the GPU fail, e.g. "GPU is lost"')
@handle_errors
def sim_load(gpu_id: int, util: float, mem_mib: float, error: str | None) -> None:
    """Set the load a simulated GPU reports."""
    from gpulocker.gpus.simulated import write_load

    settings = settings_from_env().with_overrides(gpu_backend="simulated")
    device_dir: Path = settings.device_path
    path = write_load(device_dir, gpu_id, util, mem_mib, error)
    click.echo(f"wrote {path}")


@main.command("doctor")
@click.option("--simulate", default=None, help="check as for simulated GPUs, e.g. '{\"4090\": 2}'")
@click.option("--fix", is_flag=True, help="write /etc/modprobe.d/gpulocker.conf when needed")
@click.option("--yes", is_flag=True, help="with --fix: do not ask")
@click.option("--root", default="/", hidden=True, help="read the host files below this folder")
@handle_errors
def doctor_command(simulate: str | None, fix: bool, yes: bool, root: str) -> None:
    """Check this host (driver, device files, ACLs, PAM, database, Redis, agent, clock)."""
    from gpulocker.agent import doctor

    paths = doctor.HostPaths.under(Path(root))
    checks = doctor.run_checks(settings_from_env(simulate), paths)
    click.echo(doctor.render(checks))
    if doctor.needs_modprobe_fix(checks):
        target = paths.modprobe_dir / "gpulocker.conf"
        click.echo(f"\nthe driver must not reset the device files; {target} should say:\n")
        click.echo(doctor.modprobe_text())
        if fix and (yes or click.confirm(f"write {target}?", default=False)):
            written = doctor.write_modprobe(paths)
            click.echo(f"wrote {written}; run `update-initramfs -u` and reboot to apply it")
    sys.exit(doctor.exit_status(checks))


@main.command("agent")
@click.option("--simulate", default=None, help="simulated GPUs, e.g. '{\"4090\": 4}'")
@handle_errors
def agent_command(simulate: str | None) -> None:
    """The privileged agent: enforces GPU access, samples GPUs, runs the policies."""
    from gpulocker.agent.loop import serve_forever
    from gpulocker.context import configure_logging, open_context
    from gpulocker.gpus import BackendUnavailable

    settings = settings_from_env(simulate)
    configure_logging(settings)
    ctx = open_context(settings)
    try:
        serve_forever(ctx)
    except (BackendUnavailable, ValueError) as exc:
        fail(str(exc))
    finally:
        ctx.close()


@main.command("serve")
@click.option("--simulate", default=None, help="simulated GPUs, e.g. '{\"4090\": 4}'")
@click.option("--host", default=None, help="address to listen on (default HOST)")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="port (default PORT)")
@handle_errors
def serve_command(simulate: str | None, host: str | None, port: int | None) -> None:
    """Web server and agent in one command (SQLite, no other service needed)."""
    from gpulocker.context import configure_logging
    from gpulocker.web import server

    settings = _with_address(settings_from_env(simulate), host, port)
    configure_logging(settings)
    _check_backend(settings)
    sys.exit(server.serve(settings, simulate))


def _check_backend(settings: Settings) -> None:
    """Stop at once, with one line, when there are no GPUs to manage (no driver...), rather
    than starting a web server beside an agent that can never run."""
    from gpulocker.gpus import BackendUnavailable, make_backend

    try:
        make_backend(settings).close()
    except BackendUnavailable as exc:
        fail(str(exc))


@main.command("web")
@click.option("--host", default=None, help="address to listen on (default HOST)")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="port (default PORT)")
@click.option("--workers", type=click.IntRange(1, 64), default=None, help="worker processes")
@click.option("--quiet", is_flag=True, hidden=True, help="no banner (when run by serve)")
@handle_errors
def web_command(host: str | None, port: int | None, workers: int | None, quiet: bool) -> None:
    """The web server and API only, under gunicorn (agents run on the GPU hosts)."""
    from gpulocker.context import configure_logging
    from gpulocker.web import server

    settings = _with_address(settings_from_env(), host, port)
    configure_logging(settings)
    server.web(settings, workers, quiet)


def _with_address(settings: Settings, host: str | None, port: int | None) -> Settings:
    """--host/--port over HOST/PORT."""
    changes: dict[str, Any] = {}
    if host:
        changes["host"] = host
    if port:
        changes["port"] = port
    return settings.with_overrides(**changes) if changes else settings


if __name__ == "__main__":  # pragma: no cover
    main()
