"""The terminal commands of a GPU user: status, request, list, release, extend, whoami,
login (the admin ones are in cli/admin.py, the printing in cli/render.py).

They reach GPULocker through gpulocker.cli.client (the agent's local socket, or HTTP with a
token) and only print: every rule lives in the core behind the socket or the API.
Human output is for people (a table, colour on a terminal); `--json` is for scripts.
"""

from __future__ import annotations

import getpass
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from gpulocker.cli.client import (
    Client,
    ClientError,
    connect,
    credentials_path,
    forget_credentials,
    login,
    normalize_server,
    plain_http_refusal,
    save_credentials,
)
from gpulocker.cli.render import (
    echo,
    host_heading,
    local_time,
    print_allocations,
    print_grant,
    print_json,
    render_table,
    staleness_note,
    status_rows,
    time_left,
)
from gpulocker.cli.waiting import grant_of, wait_in_line
from gpulocker.config import ConfigError

STATES = ("active", "released", "expired", "revoked", "any")


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
        help="The agent's socket (default: /run/gpulocker/gpulocker.sock, then your own).",
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


def parse_ids(text: str | None) -> list[int] | None:
    """`0,1,3` -> [0, 1, 3]."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter("a comma-separated list of GPU ids, e.g. 0,1") from None


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
    hosts = {g.get("host") for g in gpus}
    if len(hosts) <= 1:
        for line in render_table(headers, status_rows(gpus, me), right=[2, 3, 4]):
            echo(line)
        return
    health = {h.get("host"): h for h in answer.get("hosts", []) if isinstance(h, dict)}
    for host in sorted(hosts, key=str):
        echo(host_heading(str(host), health.get(host, {})))
        rows = status_rows([g for g in gpus if g.get("host") == host], me)
        for line in render_table(headers, rows, right=[2, 3, 4]):
            echo("  " + line)


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
@click.option("--wait", is_flag=True, help="Wait in line when too few GPUs are free.")
@click.option("--wait-hours", type=float, default=None, help="With --wait: give up after this.")
@json_option
@client_command
def request(
    client: Client,
    gpu_type: str,
    count: int | None,
    hours: float,
    gpu_ids: str | None,
    wait: bool,
    wait_hours: float | None,
    as_json: bool,
) -> None:
    """Take N GPUs of a type for a time; prints `export ... CUDA_VISIBLE_DEVICES=<UUIDs>`.

    Use `eval "$(gpulocker request -t 4090 -n 1 --hours 4)"` to set it in your shell.
    With --wait it waits in line, showing its position on stderr; Ctrl-C cancels.
    """
    if wait_hours is not None and not wait:
        raise click.UsageError("--wait-hours goes with --wait")
    _request(client, gpu_type, count, hours, gpu_ids, None, as_json, wait, wait_hours)


def _request(
    client: Client,
    gpu_type: str,
    count: int | None,
    hours: float,
    gpu_ids: str | None,
    user: str | None,
    as_json: bool,
    wait: bool = False,
    wait_hours: float | None = None,
) -> None:
    ids = parse_ids(gpu_ids)
    if count is None and ids is None:
        count = 1
    args: dict[str, Any] = {"gpu_type": gpu_type, "count": count, "hours": hours}
    args.update(gpu_ids=ids, user=user)
    if wait:
        args.update(wait=True, wait_hours=wait_hours)
    answer = client.call("allocations.request", **args)
    if "request" in answer:  # waiting in line (HTTP 202)
        answer = grant_of(client, wait_in_line(client, answer["request"]))
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
@click.option("--insecure-http", is_flag=True, help="Allow http:// to a host off loopback.")
def login_command(
    server: str, username: str | None, password_stdin: bool, insecure_http: bool
) -> None:
    """Sign in to a GPULocker server (https:// unless told); later commands use a token."""
    server = normalize_server(server)
    refusal = None if insecure_http else plain_http_refusal(server)
    if refusal:
        _fail(refusal)
        return
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


COMMANDS: list[click.Command] = [
    status,
    request,
    list_,
    release,
    extend,
    whoami,
    login_command,
    logout_command,
]


def register(group: click.Group) -> None:
    """Add the terminal commands to the `gpulocker` group."""
    for command in COMMANDS:
        group.add_command(command)
