"""The admin terminal commands: `gpulocker admin reset|release|lockouts|lift|maintenance|
notify|allocate`. Like every command they only ask (gpulocker.cli.client) and print; the
core refuses non-admins."""

from __future__ import annotations

import click

from gpulocker.cli.client import Client
from gpulocker.cli.commands import _release, _request, client_command, json_option, request_options
from gpulocker.cli.render import echo, local_time, print_json, render_table, time_left

# --- admin ---------------------------------------------------------------------------------


@click.group("admin")
def admin() -> None:
    """Admin actions (PRIVILEGED_USERS): reset, release any, lockouts, maintenance, notify."""


@admin.command("reset")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_option
@client_command
def admin_reset(client: Client, yes: bool, as_json: bool) -> None:
    """End every active allocation and restore the access baseline."""
    if not yes:
        click.confirm("End EVERY active allocation of every user?", abort=True, err=True)
    answer = client.call("allocations.reset")
    if as_json:
        print_json(answer)
    else:
        echo(f"reset: {answer['count']} allocation(s) ended")


@admin.command("release")
@click.argument("ids", nargs=-1, type=int)
@click.option("--user", default=None, help="Release every GPU this user holds.")
@json_option
@client_command
def admin_release(client: Client, ids: tuple[int, ...], user: str | None, as_json: bool) -> None:
    """Release any user's allocations, by ID or all of one --user."""
    _release(client, ids, False, user, as_json)


@admin.command("lockouts")
@json_option
@client_command
def admin_lockouts(client: Client, as_json: bool) -> None:
    """Every lockout in force."""
    answer = client.call("lockouts.all_active")
    if as_json:
        print_json(answer)
        return
    rows = answer["lockouts"]
    if not rows:
        echo("no lockouts")
        return
    cells = [
        [
            (str(r["user"]), {"fg": "cyan"}),
            (local_time(r["until"]), {}),
            (time_left(r["until"]), {}),
            (str(r.get("reason", "")), {}),
        ]
        for r in rows
    ]
    for line in render_table(["USER", "UNTIL", "LEFT", "REASON"], cells):
        echo(line)


@admin.command("lift")
@click.argument("user")
@json_option
@client_command
def admin_lift(client: Client, user: str, as_json: bool) -> None:
    """End a user's lockout now."""
    answer = client.call("lockouts.lift", user=user)
    if as_json:
        print_json(answer)
    else:
        echo(f"lockout of {user} lifted")


@admin.command("maintenance")
@click.argument("state", type=click.Choice(["on", "off"]))
@click.option("--message", default="", help="Why (shown to users).")
@json_option
@client_command
def admin_maintenance(client: Client, state: str, message: str, as_json: bool) -> None:
    """Switch maintenance mode: while on, only admins can allocate."""
    answer = client.call("maintenance.set_enabled", enabled=state == "on", message=message)
    if as_json:
        print_json(answer)
    else:
        echo(f"maintenance mode {state}")


@admin.command("notify")
@click.argument("user")
@click.argument("message")
@json_option
@client_command
def admin_notify(client: Client, user: str, message: str, as_json: bool) -> None:
    """Send a message to a user (inbox and their Telegram)."""
    answer = client.call("notify.admin_message", user=user, message=message)
    if as_json:
        print_json(answer)
    else:
        echo(f"message sent to {user}")


@admin.command("allocate")
@click.argument("user")
@request_options
@json_option
@client_command
def admin_allocate(
    client: Client,
    user: str,
    gpu_type: str,
    count: int | None,
    hours: float,
    gpu_ids: str | None,
    as_json: bool,
) -> None:
    """Allocate GPUs for a user."""
    _request(client, gpu_type, count, hours, gpu_ids, user, as_json)
