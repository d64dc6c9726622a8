"""The live status of every GPU, as the agents last sampled it, for every reader.

The agent is the only process that talks to the GPUs; it publishes each sample here and
readers (web workers, the CLI) read from here, never from a GPU. With Redis the samples
live in one hash (and each publish is announced on a channel for live pages); without
Redis they live in the `live_status` table.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from redis.exceptions import RedisError
from sqlalchemy import Table, bindparam, delete, insert, select, update

from gpulocker.context import Context
from gpulocker.gpus import GpuSample
from gpulocker.models import LiveStatus, utcnow

REDIS_KEY = "gpulocker:live"
REDIS_CHANNEL = "gpulocker:live:updates"  # and the database number: see channel()

Key = tuple[str, int]
log = logging.getLogger(__name__)

# The fields of a sample a reader relies on, and the types each may have (None = unknown).
_NUMBERS = ("utilization", "memory_used_mib", "memory_total_mib", "temperature_c", "power_w")
_MAX_HOST = 255


def channel(redis: Any) -> str:
    """The channel of the database `redis` uses. Keys live in a Redis database but pub/sub
    channels are the server's: two installs (or test runs) on one Redis server, each on
    its own database, would wake each other's pages on one channel name."""
    return f"{REDIS_CHANNEL}:{redis.connection_pool.connection_kwargs.get('db', 0)}"


def publish(ctx: Context, host: str, samples: Sequence[GpuSample]) -> None:
    """Store the newest sample of each of `host`'s GPUs, replacing the previous one."""
    rows = {(host, s.index): s.to_dict() for s in samples}
    if ctx.redis is not None:
        mapping: dict[str | bytes, str | bytes | int | float] = {
            f"{h}/{g}": json.dumps(data) for (h, g), data in rows.items()
        }
        if mapping:
            try:
                pipe = ctx.redis.pipeline()
                pipe.hset(REDIS_KEY, mapping=mapping)
                pipe.publish(channel(ctx.redis), host)
                pipe.execute()
            except RedisError as exc:  # a cache that is down stops nothing
                log.warning("could not publish live samples to Redis: %s", exc)
        return
    now = utcnow()
    table = cast(Table, LiveStatus.__table__)
    params = [{"h": h, "g": g, "b_at": now, "b_data": data} for (h, g), data in rows.items()]
    # Core statements, not ORM objects: this runs every sample, idle or not (SPEC §10).
    with ctx.db.transaction() as session:
        stored = set(
            session.execute(select(LiveStatus.gpu_id).where(LiveStatus.host == host)).scalars()
        )
        if fresh := [p for p in params if p["g"] in stored]:
            session.execute(
                update(table)
                .where(table.c.host == bindparam("h"), table.c.gpu_id == bindparam("g"))
                .values(at=bindparam("b_at"), data=bindparam("b_data")),
                fresh,
            )
        if new := [p for p in params if p["g"] not in stored]:
            session.execute(
                insert(table),
                [{"host": p["h"], "gpu_id": p["g"], "at": now, "data": p["b_data"]} for p in new],
            )
        if gone := stored - {g for _h, g in rows}:
            session.execute(delete(table).where(table.c.host == host, table.c.gpu_id.in_(gone)))


def read(ctx: Context) -> dict[Key, dict[str, Any]]:
    """Every GPU's newest sample as a dict (GpuSample.to_dict()), keyed by (host, gpu_id)."""
    if ctx.redis is not None:
        try:
            raw = ctx.redis.hgetall(REDIS_KEY)
        except RedisError as exc:
            log.warning("could not read live samples from Redis: %s", exc)
            return {}
        return _parse_hash(raw)
    with ctx.db.session() as session:
        return {(r.host, r.gpu_id): r.data for r in session.scalars(select(LiveStatus))}


def _parse_hash(raw: dict[bytes, bytes]) -> dict[Key, dict[str, Any]]:
    """The well-formed samples of the Redis hash; anything else in it is skipped.

    Redis is a cache that any local user may be able to write to: one junk field must not
    stop expiry, idle revocation or the status page for everyone (SPEC §12). A skipped GPU
    simply has no sample, and a missing sample never counts as idle.
    """
    result: dict[Key, dict[str, Any]] = {}
    skipped = 0
    for field, value in raw.items():
        parsed = _parse_entry(field, value)
        if parsed is None:
            skipped += 1
            continue
        result[parsed[0]] = parsed[1]
    if skipped:
        log.warning("skipped %d malformed live sample(s) in Redis key %s", skipped, REDIS_KEY)
    return result


def _parse_entry(field: bytes, value: bytes) -> tuple[Key, dict[str, Any]] | None:
    """One hash entry as ((host, gpu_id), sample), or None when it is not one we wrote."""
    try:
        host, _, gpu_text = field.decode().rpartition("/")
        gpu_id = int(gpu_text)
        data = json.loads(value)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not host or len(host) > _MAX_HOST or not 0 <= gpu_id < 2**31 or not isinstance(data, dict):
        return None
    return ((host, gpu_id), data) if _well_formed(data) else None


def _well_formed(data: dict[str, Any]) -> bool:
    """True when every field a reader uses has the type the agent writes."""
    if not all(_number(data.get(name)) for name in _NUMBERS):
        return False
    if not isinstance(data.get("ok", True), bool) or not _text(data.get("error")):
        return False
    try:
        datetime.fromisoformat(data["at"])
    except (KeyError, TypeError, ValueError):
        return False
    processes = data.get("processes", [])
    return isinstance(processes, list) and all(_process(p) for p in processes)


def _number(value: Any) -> bool:
    """None, or a finite int/float (never a bool)."""
    if value is None:
        return True
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _text(value: Any) -> bool:
    """None, or a string of sane length."""
    return value is None or (isinstance(value, str) and len(value) <= 4096)


def _process(entry: Any) -> bool:
    """One process of a sample: an int pid, a user name, numbers where numbers go."""
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("pid"), int)
        and not isinstance(entry.get("pid"), bool)
        and isinstance(entry.get("user"), str)
        and (entry.get("uid") is None or isinstance(entry.get("uid"), int))
        and _number(entry.get("memory_mib"))
        and _text(entry.get("name"))
    )


class Updates:
    """Waits for the next publish, for live pages (server-sent events, long polls).

    With Redis it listens on the database's channel (no database reads at all); without Redis it
    looks at the newest `live_status` time a few times a second (one small query).
    """

    POLL_SECONDS = 0.25

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._pubsub: Any = None
        self._last: Any = None
        if ctx.redis is not None:
            self._pubsub = ctx.redis.pubsub(ignore_subscribe_messages=True)
            self._pubsub.subscribe(channel(ctx.redis))
        else:
            self._last = self._newest()

    def _newest(self) -> Any:
        from sqlalchemy import func

        with self.ctx.db.session() as session:
            return session.scalar(select(func.max(LiveStatus.at)))

    def wait(self, timeout: float) -> bool:
        """Block until an agent publishes or `timeout` seconds pass; True if one published."""
        import time

        deadline = time.monotonic() + timeout
        if self._pubsub is not None:
            while (left := deadline - time.monotonic()) > 0:
                if self._pubsub.get_message(timeout=left) is not None:
                    return True
            return False
        while True:
            newest = self._newest()
            if newest is not None and newest != self._last:
                self._last = newest
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(self.POLL_SECONDS, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        """Stop listening."""
        if self._pubsub is not None:
            self._pubsub.close()
