"""Where things go on the calendar page: the `calendar` operation's answer (per GPU, the
allocations to their end and the bookings) laid out as percentages of the window, with the
free gaps between them and the day (or hour) lines. Drawing only: what is booked and
what is free is the core's answer, never recomputed here."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

MIN_WIDTH = 0.4  # percent: an allocation ending now (in its grace) still shows
LABEL_WIDTH = 7.0  # percent: narrower segments carry their text in the tooltip only


@dataclass(frozen=True)
class Segment:
    """One bar on a GPU's lane."""

    kind: str  # allocation, reservation or free
    left: float  # percent of the window
    width: float
    start: datetime
    end: datetime
    user: str | None = None
    id: int | None = None
    mine: bool = False

    @property
    def labelled(self) -> bool:
        """Wide enough to carry its text."""
        return self.width >= LABEL_WIDTH

    @property
    def text(self) -> str:
        """What the bar says: who, or free."""
        if self.kind == "free":
            return "free"
        who = "you" if self.mine else (self.user or "someone")
        return f"{who} · booked #{self.id}" if self.kind == "reservation" and self.id else who

    @property
    def title(self) -> str:
        """The tooltip: what it is, from when until when (UTC)."""
        what = {"allocation": "in use by", "reservation": "booked for", "free": "free"}[self.kind]
        who = "" if self.kind == "free" else f" {'you' if self.mine else self.user or 'someone'}"
        return f"{what}{who}, {self.start:%a %d %b %H:%M} to {self.end:%a %d %b %H:%M} UTC"


@dataclass(frozen=True)
class Tick:
    """A line across the lanes, labelled."""

    left: float
    label: str
    major: bool  # a new day


@dataclass(frozen=True)
class Lane:
    """One GPU and its bars."""

    host: str
    gpu_id: int
    segments: list[Segment]


def parse_time(value: str) -> datetime:
    """A time of the answer (ISO 8601 with its zone)."""
    return datetime.fromisoformat(value)


def layout(answer: dict[str, Any]) -> tuple[list[Lane], list[Tick]]:
    """The lanes (one per GPU, busy bars and the free gaps between) and the ticks of the
    `calendar` operation's `answer`."""
    start, end = parse_time(answer["from"]), parse_time(answer["until"])
    span = (end - start).total_seconds()

    def pct(moment: datetime) -> float:
        return max(0.0, min(100.0, 100.0 * (moment - start).total_seconds() / span))

    lanes = []
    for gpu in answer["gpus"]:
        busy = []
        for item in gpu["items"]:
            a, b = max(parse_time(item["start"]), start), min(parse_time(item["end"]), end)
            if a >= end:
                continue
            left = pct(a)
            width = max(MIN_WIDTH, pct(max(a, b)) - left)
            busy.append(
                Segment(
                    item["kind"],
                    left,
                    width,
                    a,
                    max(a, b),
                    item.get("user"),
                    item.get("id"),
                    bool(item.get("mine")),
                )
            )
        lanes.append(Lane(gpu["host"], gpu["gpu_id"], _with_gaps(busy, start, end, pct)))
    return lanes, ticks(start, end, pct)


def _with_gaps(busy: list[Segment], start: datetime, end: datetime, pct: Any) -> list[Segment]:
    """`busy` in order with a free segment in every gap of at least a minute."""
    out: list[Segment] = []
    cursor = start
    for seg in sorted(busy, key=lambda s: s.start):
        if seg.start - cursor >= timedelta(minutes=1):
            out.append(
                Segment("free", pct(cursor), pct(seg.start) - pct(cursor), cursor, seg.start)
            )
        out.append(seg)
        cursor = max(cursor, seg.end)
    if end - cursor >= timedelta(minutes=1):
        out.append(Segment("free", pct(cursor), 100.0 - pct(cursor), cursor, end))
    return out


def ticks(start: datetime, end: datetime, pct: Any) -> list[Tick]:
    """A line at every midnight (UTC), and within up to four days every 6 hours (up to
    two days, every 3)."""
    span = end - start
    hours = 3 if span <= timedelta(days=2) else 6 if span <= timedelta(days=4) else 24
    step = timedelta(hours=hours)
    moment = start.replace(minute=0, second=0, microsecond=0)
    moment = moment.replace(hour=moment.hour - moment.hour % hours)
    out = []
    while moment < end:
        moment += step
        if moment >= end:
            break
        major = moment.hour == 0
        label = f"{moment:%a %d %b}" if major else f"{moment:%H:%M}"
        out.append(Tick(pct(moment), label, major))
    return out
