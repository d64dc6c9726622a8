"""Terminal commands of SPEC section 11: `run`, `queue`, `book`, `bookings`, `cancel`.

`gpulocker run [-t TYPE] [-n N] [--hours H] [--wait] -- CMD...` takes the GPUs (waiting in
line if asked, printing the position as it moves), runs CMD with CUDA_VISIBLE_DEVICES and
CUDA_DEVICE_ORDER=PCI_BUS_ID, forwards SIGINT, SIGTERM and SIGHUP to it, releases the GPUs
when it ends and exits with its status (128 + N when a signal N ended it). If the
allocation ends under CMD (expired, revoked), the agent stops CMD as usual and `run` says why.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading

import click

from gpulocker.cli.client import Client, ClientError
from gpulocker.cli.commands import client_command, json_option
from gpulocker.cli.render import Cell, echo, local_time, print_json, render_table
from gpulocker.cli.waiting import wait_in_line

# NVML indices, GPU-/MIG- UUIDs, separated by commas: nothing a shell would read as code.
CUDA_LINE = re.compile(r"^[A-Za-z0-9:/_-]+(,[A-Za-z0-9:/_-]+)*$")
WATCH_SECONDS = 5.0


def _fail(message: str, status: int = 1) -> None:
    click.echo(f"gpulocker: {message}", err=True)
    sys.exit(status)


def _only_type(client: Client) -> str:
    gpus = client.call("status").get("gpus", [])
    types = sorted({g["gpu_type"] for g in gpus})
    if len(types) != 1:
        _fail(f"say which GPU type with -t (this host has: {', '.join(types) or 'none'})", 2)
    return types[0]


def _watch(client: Client, ids: list[int], done: threading.Event, ended: list[str]) -> None:
    while not done.wait(WATCH_SECONDS):
        try:
            row = client.call("allocations.get", id=ids[0])["allocation"]
        except ClientError:
            continue
        if row["state"] != "active":
            ended.append(f"allocation {row['id']} {row['state']}: {row.get('release_reason')}")
            echo(f"gpulocker run: your {ended[0]}; the agent stops the command", err=True)
            return


@click.command("run", context_settings={"ignore_unknown_options": True})
@click.option("-t", "--type", "gpu_type", default=None, help="GPU type (if the host has several).")
@click.option("-n", "--count", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--hours", type=float, default=1.0, show_default=True, help="For how long.")
@click.option("--wait", is_flag=True, help="Wait in line when too few GPUs are free.")
@click.option("--wait-hours", type=float, default=None, help="Give up after this long.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@client_command
def run(
    client: Client,
    gpu_type: str | None,
    count: int,
    hours: float,
    wait: bool,
    wait_hours: float | None,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND on GPUs taken for it, and release them when it ends."""
    gpu_type = gpu_type or _only_type(client)
    if wait:
        answer = client.call(
            "requests.submit", gpu_type=gpu_type, count=count, hours=hours, wait_hours=wait_hours
        )
        if "request" in answer:
            request = wait_in_line(client, answer["request"])
            ids = list(request["allocation_ids"])
            cuda = str(request.get("cuda_visible_devices", ""))
        else:
            ids, cuda = [a["id"] for a in answer["allocations"]], answer["cuda_visible_devices"]
    else:
        answer = client.call(
            "allocations.request",
            gpu_type=gpu_type,
            count=count,
            hours=hours,
            gpu_ids=None,
            user=None,
        )
        ids, cuda = [a["id"] for a in answer["allocations"]], answer["cuda_visible_devices"]
    if not CUDA_LINE.match(cuda):
        _fail(f"the server sent an unusable CUDA_VISIBLE_DEVICES: {cuda!r}")
    echo(f"running on GPU(s) {cuda} (allocation(s) {', '.join(map(str, ids))})", err=True)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": cuda, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    status = 127
    done = threading.Event()
    ended: list[str] = []
    try:
        proc = subprocess.Popen(list(command), env=env)
    except OSError as exc:
        echo(f"gpulocker run: cannot start {command[0]}: {exc.strerror}", err=True)
    else:
        forward = {
            s: signal.signal(s, lambda n, _f: proc.send_signal(n))
            for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        }
        watcher = threading.Thread(target=_watch, args=(client, ids, done, ended), daemon=True)
        watcher.start()
        code = proc.wait()
        for sig, old in forward.items():
            signal.signal(sig, old)
        status = 128 - code if code < 0 else code
    done.set()
    for allocation_id in ids:
        with contextlib.suppress(ClientError):  # it had ended already (said above)
            client.call("allocations.release", id=allocation_id)
    echo(f"released allocation(s) {', '.join(map(str, ids))}", err=True)
    sys.exit(status)


@click.command("queue")
@json_option
@client_command
def queue_command(client: Client, as_json: bool) -> None:
    """The line of waiting requests, in the order they will be served."""
    line = client.call("queue.view")["queue"]
    if as_json:
        print_json(line)
        return
    if not line:
        echo("nobody is waiting")
        return
    rows: list[list[Cell]] = [
        [
            (str(r["position"]), {"bold": True}),
            (r["gpu_type"], {"fg": "blue"}),
            (str(r["count"]), {}),
            (f"{r['hours']:g}", {}),
            (r["user"] or "(someone)", {"fg": "cyan", "bold": True} if r.get("mine") else {}),
            (str(r["id"]) if r["user"] else "", {}),
        ]
        for r in line
    ]
    headers = ["#", "TYPE", "GPUS", "HOURS", "USER", "REQUEST"]
    for text in render_table(headers, rows, right=[0, 2, 3]):
        echo(text)


@click.command("book")
@click.option("-t", "--type", "gpu_type", required=True, help="GPU type.")
@click.option("-n", "--count", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--start", required=True, help="When, ISO 8601 with a zone: 2026-12-24T09:00Z.")
@click.option("--hours", type=float, required=True, help="For how long.")
@click.option("--user", default=None, help="For another user (admins).")
@json_option
@client_command
def book(
    client: Client,
    gpu_type: str,
    count: int,
    start: str,
    hours: float,
    user: str | None,
    as_json: bool,
) -> None:
    """Book GPUs of a type for a future window."""
    row = client.call(
        "reservations.book", gpu_type=gpu_type, count=count, start=start, hours=hours, user=user
    )["reservation"]
    if as_json:
        print_json(row)
    else:
        echo(
            f"booked {row['count']} {row['gpu_type']} GPU(s) on {row['host']} from "
            f"{local_time(row['start'])} to {local_time(row['end'])} (booking {row['id']})"
        )


@click.command("bookings")
@click.option("--all", "all_users", is_flag=True, help="Everyone's bookings (admins).")
@json_option
@client_command
def bookings(client: Client, all_users: bool, as_json: bool) -> None:
    """Your bookings."""
    rows = client.call("reservations.list_for", all=all_users)["reservations"]
    if as_json:
        print_json(rows)
        return
    if not rows:
        echo("no bookings")
        return
    table: list[list[Cell]] = [
        [
            (str(r["id"]), {"bold": True}),
            (r["user"], {"fg": "cyan"}),
            (r["gpu_type"], {"fg": "blue"}),
            (str(r["count"]), {}),
            (local_time(r["start"]), {}),
            (f"{r['hours']:g}", {}),
            (r["state"], {"fg": "green"} if r["state"] == "booked" else {"dim": True}),
        ]
        for r in rows
    ]
    headers = ["ID", "USER", "TYPE", "GPUS", "START", "HOURS", "STATE"]
    for text in render_table(headers, table, right=[0, 3, 5]):
        echo(text)


@click.command("cancel")
@click.argument("item_id", metavar="ID", type=int)
@click.option("--booking", is_flag=True, help="ID is a booking, not a waiting request.")
@json_option
@client_command
def cancel(client: Client, item_id: int, booking: bool, as_json: bool) -> None:
    """Cancel a waiting request (or, with --booking, a booking)."""
    op = "reservations.cancel" if booking else "requests.cancel"
    answer = client.call(op, id=item_id)
    if as_json:
        print_json(answer)
    else:
        echo(f"{'booking' if booking else 'request'} {item_id} cancelled")


COMMANDS: list[click.Command] = [run, queue_command, book, bookings, cancel]


def register(group: click.Group) -> None:
    """Add the scheduling commands to the `gpulocker` group."""
    for command in COMMANDS:
        group.add_command(command)
