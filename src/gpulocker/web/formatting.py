"""Template filters: times, sizes and percentages as people read them.

The live schedule (static/schedule.js) formats the same values the same way, so a card
looks identical before and after its first refresh.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from flask import Blueprint

from gpulocker.models import utcnow


def as_datetime(value: datetime | str | None) -> datetime | None:
    """A datetime from a datetime or an ISO string (the status snapshot carries strings)."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value)


def duration_text(seconds: float) -> str:
    """ "2 d 3 h", "3 h 05 min", "12 min", "45 s": two units at most."""
    seconds = int(max(0, seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min"
    return f"{secs} s"


def time_left(value: datetime | str | None) -> str:
    """How long until `value`: "3 h 05 min", or "ended" once past."""
    when = as_datetime(value)
    if when is None:
        return "—"
    left = (when - utcnow()).total_seconds()
    return duration_text(left) if left > 0 else "ended"


def utc(value: datetime | str | None) -> str:
    """ "2026-11-28 20:15 UTC", or a dash."""
    when = as_datetime(value)
    return "—" if when is None else f"{when:%Y-%m-%d %H:%M} UTC"


def window(start: datetime | str | None, end: datetime | str | None) -> str:
    """A booking's window, short: "Thu 03 Dec 09:00 → 17:00" (UTC), the end's day only if
    it differs."""
    a, b = as_datetime(start), as_datetime(end)
    if a is None or b is None:
        return "—"
    until = f"{b:%H:%M}" if a.date() == b.date() else f"{b:%a %d %b %H:%M}"
    return f"{a:%a %d %b %H:%M} → {until}"


def ago(value: datetime | str | None) -> str:
    """How long ago `value` was: "5 min ago"."""
    when = as_datetime(value)
    if when is None:
        return "never"
    return f"{duration_text((utcnow() - when).total_seconds())} ago"


def filesize(value: float | None) -> str:
    """Bytes in binary units with three significant digits: "1.50 GiB"."""
    if value is None:
        return "—"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.3g} {unit}"
        size /= 1024
    return f"{size:.3g} PiB"


def mib(value: float | None) -> str:
    """MiB as "512 MiB" or "10.0 GiB"."""
    return "—" if value is None else filesize(float(value) * 1024 * 1024)


def pct(value: float | None) -> str:
    """A percentage, or a dash when unknown."""
    return "—" if value is None else f"{float(value):.0f} %"


def clamp_pct(value: float | None) -> str:
    """A CSS width in percent, kept within 0-100."""
    return f"{min(100.0, max(0.0, float(value or 0))):.1f}"


def unit(value: float | None, suffix: str) -> str:
    """A rounded number with its unit ("64 °C"), or a dash when unknown."""
    return "—" if value is None else f"{float(value):.0f} {suffix}"


def memory_pct(gpu: Mapping[str, Any]) -> float:
    """Memory used as a percentage of the GPU's total."""
    total = gpu.get("memory_total_mib") or 0
    used = gpu.get("memory_used_mib") or 0
    return 100.0 * used / total if total else 0.0


def memory_text(gpu: Mapping[str, Any]) -> str:
    """ "10.0 GiB / 24.0 GiB"."""
    if gpu.get("memory_used_mib") is None:
        return f"— / {mib(gpu.get('memory_total_mib'))}"
    return f"{mib(gpu['memory_used_mib'])} / {mib(gpu.get('memory_total_mib'))}"


def hours(value: float) -> str:
    """A limit in hours, with days when that reads better: "168 h (7 days)"."""
    if value >= 48:
        return f"{value:g} h ({value / 24:g} days)"
    return f"{value:g} h"


FILTERS: dict[str, Callable[..., Any]] = {
    "as_datetime": as_datetime,
    "time_left": time_left,
    "ago": ago,
    "utc": utc,
    "window": window,
    "filesize": filesize,
    "mib": mib,
    "pct": pct,
    "clamp_pct": clamp_pct,
    "unit": unit,
    "memory_pct": memory_pct,
    "memory_text": memory_text,
    "hours": hours,
}


def register(bp: Blueprint) -> None:
    """Make the filters available to every template of the app."""
    for name, func in FILTERS.items():
        bp.add_app_template_filter(func, name)
