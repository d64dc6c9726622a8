"""`gpulocker install` and `gpulocker uninstall` (SPEC section 14)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click


def _echo(line: str) -> None:
    click.echo(line)


def _need_root(root: Path, dry_run: bool) -> None:
    if root == Path("/") and not dry_run and os.geteuid() != 0:
        click.echo("gpulocker install: run it as root (sudo), or try --dry-run", err=True)
        sys.exit(1)


@click.command("install")
@click.option("--dry-run", is_flag=True, help="print every file and command, write nothing")
@click.option(
    "--root",
    "root",
    type=click.Path(file_okay=False, path_type=Path),
    default="/",
    help="write into this staging tree instead of /",
)
@click.option("--yes", is_flag=True, help="write the NVIDIA module options without asking")
@click.option("--no-nvidia-options", is_flag=True, help="do not write the NVIDIA module options")
@click.option("--user", default="gpulocker", show_default=True, help="the web's system user")
@click.option(
    "--ssl-cert", default=None, help="an existing certificate (PEM) instead of a self-signed one"
)
@click.option("--ssl-key", default=None, help="its private key (PEM)")
@click.option("--hostname", default=None, help="name in the self-signed certificate")
@click.option("--executable", default=None, help="the gpulocker command the units run")
def install_command(
    dry_run: bool,
    root: Path,
    yes: bool,
    no_nvidia_options: bool,
    user: str,
    ssl_cert: str | None,
    ssl_key: str | None,
    hostname: str | None,
    executable: str | None,
) -> None:
    """Install GPULocker as sandboxed systemd services on this server."""
    from gpulocker.install import files, plan

    if (ssl_cert is None) != (ssl_key is None):
        click.echo("gpulocker install: give --ssl-cert and --ssl-key together", err=True)
        sys.exit(2)
    _need_root(root, dry_run)
    nvidia = not no_nvidia_options
    if nvidia and not (yes or dry_run):
        nvidia = click.confirm(
            f"Write {plan.NVIDIA_FILE} (device files 0660 root:root, so only GPULocker's ACLs "
            "open a GPU)?",
            default=True,
        )
    if not dry_run:
        root.mkdir(parents=True, exist_ok=True)
    opts = plan.InstallOptions(
        root=root,
        user=user,
        executable=executable,
        ssl_cert=ssl_cert,
        ssl_key=ssl_key,
        nvidia_options=nvidia,
        hostname=hostname,
    )
    failed = files.apply(plan.install_actions(opts), root, dry_run, _echo)
    click.echo(plan.next_steps(opts))
    sys.exit(1 if failed else 0)


@click.command("uninstall")
@click.option("--dry-run", is_flag=True, help="print every file and command, change nothing")
@click.option(
    "--root",
    "root",
    type=click.Path(file_okay=False, path_type=Path),
    default="/",
    help="act on this staging tree instead of /",
)
@click.option("--purge", is_flag=True, help="also remove the env file, certificate and data")
def uninstall_command(dry_run: bool, root: Path, purge: bool) -> None:
    """Remove the services and put the GPU device files back the way the driver makes them."""
    from gpulocker.install import devices, files, plan

    _need_root(root, dry_run)
    failed = files.apply(plan.uninstall_actions(root, purge), root, dry_run, _echo)
    for line in devices.restore(root, dry_run):
        click.echo(line)
    sys.exit(1 if failed else 0)


def register(group: click.Group) -> None:
    group.add_command(install_command)
    group.add_command(uninstall_command)
