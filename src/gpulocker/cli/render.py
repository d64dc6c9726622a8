"""What the terminal commands print: tables (colour on a terminal), times, sizes, JSON.

Our own few lines rather than a table library: the tables are plain columns with
click.style colour, and the terminal client must start fast (see docs/architecture.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import click

from gpulocker import cudaline

STALE_SECONDS = 60.0  # live readings older than this get a warning above the table
Cell = tuple[str, dict[str, Any]]  # text and click.style options


def print_json(data: Any) -> None:
    """JSON on stdout, pretty and stable."""
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def _use_color() -> bool | None:
    """None lets click decide (colour on a terminal only); NO_COLOR turns it off."""
    return False if os.environ.get("NO_COLOR") else None


def echo(text: str = "", err: bool = False) -> None:
    """Print a line that may carry colour; ANSI codes are dropped when not on a terminal."""
    click.echo(text, err=err, color=_use_color())


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


def host_heading(host: str, health: dict[str, Any]) -> str:
    """One host's line above its GPUs: its name and its agent's health."""
    state = health.get("agent") or "unknown"
    age = health.get("age_seconds")
    seen = f", last heartbeat {age:.0f} s ago" if isinstance(age, int | float) else ""
    line = f"{host}: agent {state}{seen}"
    if state == "unreachable":
        line += " (its GPUs are not granted until it is back)"
        return click.style(line, fg="red", bold=True)
    return click.style(line, bold=True)
