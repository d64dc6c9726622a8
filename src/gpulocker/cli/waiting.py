"""Waiting in line from the terminal (`request --wait`, `run --wait`): poll the waiting
request, print its position on stderr each time it moves, and hand back what was granted.
Ctrl-C cancels the request; if it was granted in that very moment, its GPUs go back too,
since the user asked for nothing more."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any

import click

from gpulocker.cli.client import Client, ClientError
from gpulocker.cli.render import echo

POLL_SECONDS = 1.0


def _fail(message: str, status: int = 1) -> None:
    click.echo(f"gpulocker: {message}", err=True)
    sys.exit(status)


def wait_in_line(
    client: Client, request: dict[str, Any], poll: float = POLL_SECONDS
) -> dict[str, Any]:
    """Poll `request` until it is granted and return it; exit 1 if it expired or was
    cancelled elsewhere, 130 after Ctrl-C (which cancels it)."""
    shown = None
    try:
        while request["state"] == "waiting":
            if request.get("position") != shown:
                shown = request.get("position")
                echo(f"waiting: request {request['id']}, position {shown} in the line", err=True)
            time.sleep(poll)
            request = client.call("requests.get", id=request["id"])["request"]
    except KeyboardInterrupt:
        _give_up(client, request["id"])
    if request["state"] != "granted":
        _fail(f"request {request['id']} {request['state']}: {request.get('reason') or ''}")
    return request


def _give_up(client: Client, request_id: int) -> None:
    """Cancel the request; one granted meanwhile is released instead. Exits 130."""
    try:
        client.call("requests.cancel", id=request_id)
    except ClientError:
        with contextlib.suppress(ClientError):
            row = client.call("requests.get", id=request_id)["request"]
            if row["state"] == "granted":
                for allocation_id in row["allocation_ids"]:
                    with contextlib.suppress(ClientError):
                        client.call("allocations.release", id=allocation_id)
                _fail(f"request {request_id} was granted as you stopped; released it again", 130)
    _fail(f"request {request_id} cancelled", 130)


def grant_of(client: Client, request: dict[str, Any]) -> dict[str, Any]:
    """A granted request as `request` answers a grant: its allocations and the CUDA line."""
    rows = [client.call("allocations.get", id=i)["allocation"] for i in request["allocation_ids"]]
    applied = bool(rows) and all(r.get("access_applied_at") for r in rows)
    return {
        "allocations": rows,
        "cuda_visible_devices": str(request.get("cuda_visible_devices", "")),
        "access": "applied" if applied else "pending",
        "request": request,
    }
