"""The terminal commands of a GPU user and an admin: status, request, list, release,
extend, admin, login.

They reach GPULocker through gpulocker.cli.client (the agent's local socket, or HTTP with a
token) and only print: every rule lives in the core behind the socket or the API.
Human output is for people (a table, colour on a terminal); `--json` is for scripts.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from functools import wraps
from pathlib import Path
from typing import Any

import click

from gpulocker import cudaline
from gpulocker.cli.client import (
    Client,
    ClientError,
    connect,
    credentials_path,
    forget_credentials,
    login,
    normalize_server,
    save_credentials,
)
from gpulocker.config import ConfigError

STATES = ("active", "released", "expired", "revoked", "any")

STALE_SECONDS = 60.0  # live readings older than this get a warning above the table
Cell = tuple[str, dict[str, Any]]  # text and click.style options


# --- plumbing ------------------------------------------------------------------------------


def _fail(message: str, status: int = 1) -> None:
    click.echo(f"gpulocker: {message}", err=True)
    sys.exit(status)


def client_command(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add --server/--socket, open the client, and turn refusals into one line, exit 1."""

    @click.option(
        "--server",
        envvar="GPULOCKER_SERVER",
        default=None,
        help="GPULocker URL (after `gpulocker login`); default: this host's agent socket.",
    )
    @click.option(
        "--socket",
        "socket_path",
        envvar="GPULOCKER_SOCKET",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="The agent's socket (default: SOCKET_PATH).",
    )
    @wraps(func)
    def wrapper(server: str | None, socket_path: Path | None, **kwargs: Any) -> Any:
        try:
            client = connect(server, socket_path)
            return func(client, **kwargs)
        except ClientError as exc:
            _fail(exc.message)
        except ConfigError as exc:
            _fail(f"configuration error: {exc}", 2)

    return wrapper


def json_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """--json: print the answer as JSON, for scripts."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")(func)


def print_json(data: Any) -> None:
    """JSON on stdout, pretty and stable."""
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def _use_color() -> bool | None:
    """None lets click decide (colour on a terminal only); NO_COLOR turns it off."""
    return False if os.environ.get("NO_COLOR") else None


def echo(text: str = "", err: bool = False) -> None:
    """Print a line that may carry colour; ANSI codes are dropped when not on a terminal."""
    click.echo(text, err=err, color=_use_color())


def parse_ids(text: str | None) -> list[int] | None:
    """`0,1,3` -> [0, 1, 3]."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter("a comma-separated list of GPU ids, e.g. 0,1") from None


# --- formatting ----------------------------------------------------------------------------


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def duration(seconds: float) -> str:
    """3725 -> '1h02m'; 90000 -> '1d01h'; under a minute -> '<1m'."""
    minutes = int(seconds // 60)
    if minutes < 1:
        return "<1m"
    days, rest = divmod(minutes, 24 * 60)
    hours, mins = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{mins:02d}m"
    return f"{mins}m"


def time_left(expires_at: str | None, now: datetime | None = None) -> str:
    """How long until `expires_at`, or 'expired'."""
    end = _parse_time(expires_at)
    if end is None:
        return "-"
    seconds = (end - (now or datetime.now(UTC))).total_seconds()
    return duration(seconds) if seconds > 0 else "expired"


def local_time(value: str | None) -> str:
    """An ISO time in the terminal's local time zone, to the minute."""
    moment = _parse_time(value)
    return moment.astimezone().strftime("%Y-%m-%d %H:%M") if moment else "-"


def gib(mib: float | None) -> str:
    """MiB -> '10.0' (GiB)."""
    return "-" if mib is None else f"{mib / 1024:.1f}"


def _pad(text: str, width: int, right: bool = False) -> str:
    return text.rjust(width) if right else text.ljust(width)


def render_table(
    headers: list[str], rows: list[list[Cell]], right: Iterable[int] = ()
) -> list[str]:
    """Aligned columns; each cell is (text, click.style options). Styles go on after padding
    so colour codes never shift a column."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, (text, _) in enumerate(row):
            widths[i] = max(widths[i], len(text))
    align = set(right)
    lines = ["  ".join(_pad(h, widths[i], i in align) for i, h in enumerate(headers)).rstrip()]
    lines[0] = click.style(lines[0], bold=True)
    for row in rows:
        while row and not row[-1][0]:  # no trailing blanks (nor colour codes around them)
            row = row[:-1]
        cells = []
        for i, (text, style) in enumerate(row):
            padded = text if i == len(row) - 1 else _pad(text, widths[i], i in align)
            cells.append(click.style(padded, **style) if style and text else padded)
        lines.append("  ".join(cells))
    return lines


def _util_style(util: float | None) -> dict[str, Any]:
    if util is None:
        return {"dim": True}
    if util >= 80:
        return {"fg": "green", "bold": True}
    return {"fg": "green"} if util >= 20 else {"fg": "yellow"}


def status_rows(
    gpus: list[dict[str, Any]], me: str | None, now: datetime | None = None
) -> list[list[Cell]]:
    """The cells of `gpulocker status`, one row per GPU."""
    several_hosts = len({g.get("host") for g in gpus}) > 1
    rows: list[list[Cell]] = []
    for gpu in gpus:
        name = f"{gpu['host']}:{gpu['gpu_id']}" if several_hosts else str(gpu["gpu_id"])
        util = gpu.get("utilization")
        used, total = gpu.get("memory_used_mib"), gpu.get("memory_total_mib")
        temp = gpu.get("temperature_c")
        holder = gpu.get("holder")
        holder_cell: Cell
        if not gpu.get("healthy", True):
            holder_cell = (f"error: {gpu.get('error') or 'unhealthy'}", {"fg": "red", "bold": True})
        elif holder:
            holder_cell = (holder, {"fg": "cyan", "bold": holder == me})
        else:
            holder_cell = ("free", {"fg": "green"})
        rows.append(
            [
                (name, {"bold": True}),
                (str(gpu.get("gpu_type", "")), {"fg": "blue"}),
                ("-" if util is None else f"{util:.0f}%", _util_style(util)),
                (f"{gib(used)}/{gib(total)} GiB", {"fg": "yellow"} if used else {}),
                (
                    "-" if temp is None else f"{temp:.0f}C",
                    {"fg": "red"} if (temp or 0) >= 80 else {},
                ),
                holder_cell,
                (time_left(gpu.get("expires_at"), now) if holder else "", {}),
                (" ".join(_process(p) for p in gpu.get("processes") or []), _proc_style(gpu)),
            ]
        )
    return rows


def staleness_note(gpus: list[dict[str, Any]], now: datetime | None = None) -> str | None:
    """A warning when the live readings are missing or old: the agent may be down."""
    times = [t for t in (_parse_time(g.get("sampled_at")) for g in gpus) if t is not None]
    if not times:
        return "no live readings yet (is the agent running?)"
    age = ((now or datetime.now(UTC)) - max(times)).total_seconds()
    if age > STALE_SECONDS:
        return f"the live readings are {duration(age)} old (is the agent running?)"
    return None


def _process(proc: dict[str, Any]) -> str:
    mem = proc.get("memory_mib")
    return f"{proc.get('user')}:{proc.get('pid')}:{(mem or 0):.0f}M"


def _proc_style(gpu: dict[str, Any]) -> dict[str, Any]:
    """Red when someone other than the holder runs on the GPU (a likely violation)."""
    users = {p.get("user") for p in gpu.get("processes") or []}
    if users - {gpu.get("holder"), "root"}:
        return {"fg": "red"}
    return {"dim": True}


def allocation_rows(rows: list[dict[str, Any]], show_user: bool) -> list[list[Cell]]:
    """The cells of `gpulocker list`."""
    table: list[list[Cell]] = []
    for row in rows:
        active = row.get("state") == "active"
        cells: list[Cell] = [
            (str(row["id"]), {"bold": True}),
            (str(row["gpu_id"]), {}),
            (str(row.get("gpu_type", "")), {"fg": "blue"}),
            (str(row.get("host", "")), {}),
            (str(row.get("state", "")), {"fg": "green"} if active else {"dim": True}),
            (local_time(row.get("expires_at")), {}),
            (time_left(row.get("expires_at")) if active else row.get("release_reason") or "", {}),
        ]
        if show_user:
            cells.insert(1, (str(row.get("user", "")), {"fg": "cyan"}))
        table.append(cells)
    return table


def print_allocations(rows: list[dict[str, Any]], show_user: bool) -> None:
    """The allocations as a table, or a line saying there are none."""
    if not rows:
        echo("no allocations")
        return
    headers = ["ID", "GPU", "TYPE", "HOST", "STATE", "ENDS", "LEFT"]
    if show_user:
        headers.insert(1, "USER")
    for line in render_table(headers, allocation_rows(rows, show_user), right=[0]):
        echo(line)


def print_grant(answer: dict[str, Any]) -> None:
    """What was granted on stderr, the `export` line alone on stdout:
    `eval "$(gpulocker request ...)"` sets the variable in the calling shell."""
    rows = answer["allocations"]
    first = rows[0]
    echo(
        f"granted {len(rows)} {first['gpu_type']} GPU(s) on {first['host']} to {first['user']} "
        f"until {local_time(first['expires_at'])} ({time_left(first['expires_at'])} left):",
        err=True,
    )
    for row in rows:
        echo(f"  allocation {row['id']}: GPU {row['gpu_id']} ({row['device']})", err=True)
    if answer.get("access") != "applied":
        echo("  (the agent grants access on the device files within seconds)", err=True)
    try:
        line = cudaline.export_line(str(answer.get("cuda_visible_devices", "")))
    except cudaline.BadCudaLine as exc:  # never hand a shell what the server made up
        raise click.ClickException(f"the server's answer cannot be used: {exc}") from None
    click.echo(line)


# --- commands ------------------------------------------------------------------------------


@click.command("status")
@json_option
@client_command
def status(client: Client, as_json: bool) -> None:
    """Every GPU: type, utilization, memory, temperature, holder, time left, processes."""
    answer = client.call("status")
    if as_json:
        print_json(answer)
        return
    me = getpass.getuser()
    gpus = answer.get("gpus", [])
    if answer.get("maintenance"):
        echo(click.style("maintenance mode: new allocations are paused", fg="yellow", bold=True))
    if not gpus:
        echo("no GPUs are managed (is the agent running?)")
        return
    note = staleness_note(gpus)
    if note:
        echo(click.style(note, fg="yellow"), err=True)
    headers = [
        "GPU",
        "TYPE",
        "UTIL",
        "MEMORY",
        "TEMP",
        "HOLDER",
        "LEFT",
        "PROCESSES (user:pid:mem)",
    ]
    for line in render_table(headers, status_rows(gpus, me), right=[2, 3, 4]):
        echo(line)


def request_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options of a request, shared by `request` and `admin allocate`."""
    for option in reversed(
        [
            click.option("-t", "--type", "gpu_type", required=True, help="GPU type, e.g. 4090."),
            click.option(
                "-n",
                "--count",
                type=click.IntRange(min=1),
                default=None,
                help="How many GPUs (default 1).",
            ),
            click.option("--hours", type=float, required=True, help="For how long (e.g. 0.5, 24)."),
            click.option("--gpu-ids", default=None, help="Exactly these GPUs, e.g. 0,1."),
        ]
    ):
        command = option(command)
    return command


@click.command("request")
@request_options
@json_option
@client_command
def request(
    client: Client,
    gpu_type: str,
    count: int | None,
    hours: float,
    gpu_ids: str | None,
    as_json: bool,
) -> None:
    """Take N GPUs of a type for a time; prints `export ... CUDA_VISIBLE_DEVICES=<UUIDs>`.

    Use `eval "$(gpulocker request -t 4090 -n 1 --hours 4)"` to set it in your shell.
    """
    _request(client, gpu_type, count, hours, gpu_ids, None, as_json)


def _request(
    client: Client,
    gpu_type: str,
    count: int | None,
    hours: float,
    gpu_ids: str | None,
    user: str | None,
    as_json: bool,
) -> None:
    ids = parse_ids(gpu_ids)
    if count is None and ids is None:
        count = 1
    answer = client.call(
        "allocations.request", gpu_type=gpu_type, count=count, hours=hours, gpu_ids=ids, user=user
    )
    if as_json:
        print_json(answer)
    else:
        print_grant(answer)


@click.command("list")
@click.option("--all", "all_users", is_flag=True, help="Everyone's allocations (admins).")
@click.option("--state", type=click.Choice(STATES), default="active", show_default=True)
@json_option
@client_command
def list_(client: Client, all_users: bool, state: str, as_json: bool) -> None:
    """Your allocations (admins with --all: everyone's)."""
    answer = client.call("allocations.list_for", all=all_users, state=state)
    if as_json:
        print_json(answer)
    else:
        print_allocations(answer["allocations"], show_user=all_users)


@click.command("release")
@click.argument("ids", nargs=-1, type=int)
@click.option("--all", "release_all", is_flag=True, help="Release every GPU you hold.")
@json_option
@client_command
def release(client: Client, ids: tuple[int, ...], release_all: bool, as_json: bool) -> None:
    """Give GPUs back now: by allocation ID, or --all."""
    _release(client, ids, release_all, None, as_json)


def _release(
    client: Client, ids: tuple[int, ...], release_all: bool, user: str | None, as_json: bool
) -> None:
    if bool(ids) == bool(release_all or user):
        raise ClientError(
            "invalid", "give allocation IDs or --all (admins: --user), not both and not neither"
        )
    if not ids:
        answer = client.call("allocations.release_all", user=user)
        if as_json:
            print_json(answer)
        else:
            echo(f"released {answer['released']} allocation(s)")
        return
    released: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    for allocation_id in ids:
        try:
            released.append(client.call("allocations.release", id=allocation_id)["allocation"])
        except ClientError as exc:
            failures.append(
                {"id": allocation_id, "error": {"code": exc.code, "message": exc.message}}
            )
    if as_json:
        print_json({"released": released, "failed": failures})
    else:
        for row in released:
            echo(f"released allocation {row['id']} (GPU {row['gpu_id']} on {row['host']})")
        for failure in failures:
            echo(f"gpulocker: {failure['error']['message']}", err=True)
    if failures:
        sys.exit(1)


@click.command("extend")
@click.argument("allocation_id", metavar="ID", type=int)
@click.option("--hours", type=float, required=True, help="How many hours more.")
@json_option
@client_command
def extend(client: Client, allocation_id: int, hours: float, as_json: bool) -> None:
    """Keep an allocation longer."""
    row = client.call("allocations.extend", id=allocation_id, hours=hours)["allocation"]
    if as_json:
        print_json({"allocation": row})
    else:
        echo(
            f"allocation {row['id']} (GPU {row['gpu_id']}) now ends "
            f"{local_time(row['expires_at'])} ({time_left(row['expires_at'])} left)"
        )


@click.command("whoami")
@json_option
@client_command
def whoami(client: Client, as_json: bool) -> None:
    """Who GPULocker thinks you are, and through which way you reach it."""
    me = client.call("me")
    if as_json:
        print_json({**me, "via": client.where})
        return
    role = " (admin)" if me.get("is_admin") else ""
    echo(f"{me['username']}{role} via {client.where}")
    if me.get("locked_until"):
        echo(f"locked out until {local_time(me['locked_until'])}")


@click.command("login")
@click.option("--server", required=True, help="GPULocker URL, e.g. https://gpu1.lab:5151")
@click.option("--username", default=None, help="Your Linux user name on the server.")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin (for scripts).")
def login_command(server: str, username: str | None, password_stdin: bool) -> None:
    """Sign in to a GPULocker server; later commands go there over HTTP with a token."""
    server = normalize_server(server)
    username = username or click.prompt("Username", default=getpass.getuser())
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = click.prompt("Password", hide_input=True)
    try:
        creds = login(server, username, password)
    except ClientError as exc:
        _fail(exc.message)
        return
    path = save_credentials(creds)
    echo(f"signed in to {server} as {username}; token stored in {path}")


@click.command("logout")
def logout_command() -> None:
    """Forget the stored token; commands use the local socket again."""
    if forget_credentials():
        echo(f"removed {credentials_path()}")
    else:
        echo("not signed in")


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


COMMANDS: list[click.Command] = [
    status,
    request,
    list_,
    release,
    extend,
    whoami,
    login_command,
    logout_command,
    admin,
]


def register(group: click.Group) -> None:
    """Add the terminal commands to the `gpulocker` group."""
    for command in COMMANDS:
        group.add_command(command)
