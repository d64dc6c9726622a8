"""The live status of every GPU, as the agents last sampled it, for every reader.

The agent is the only process that talks to the GPUs; it publishes each sample here and
readers (web workers, the CLI) read from here, never from a GPU. With Redis the samples
live in one hash (and each publish is announced on a channel for live pages); without
Redis they live in the `live_status` table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, select

from gpulocker.context import Context
from gpulocker.gpus import GpuSample
from gpulocker.models import LiveStatus, utcnow

REDIS_KEY = "gpulocker:live"
REDIS_CHANNEL = "gpulocker:live:updates"

Key = tuple[str, int]


def publish(ctx: Context, host: str, samples: Sequence[GpuSample]) -> None:
    """Store the newest sample of each of `host`'s GPUs, replacing the previous one."""
    rows = {(host, s.index): s.to_dict() for s in samples}
    if ctx.redis is not None:
        mapping: dict[str | bytes, str | bytes | int | float] = {
            f"{h}/{g}": json.dumps(data) for (h, g), data in rows.items()
        }
        if mapping:
            pipe = ctx.redis.pipeline()
            pipe.hset(REDIS_KEY, mapping=mapping)
            pipe.publish(REDIS_CHANNEL, host)
            pipe.execute()
        return
    now = utcnow()
    with ctx.db.transaction() as session:
        existing = {
            (r.host, r.gpu_id): r
            for r in session.scalars(select(LiveStatus).where(LiveStatus.host == host))
        }
        for (h, gpu_id), data in rows.items():
            row = existing.pop((h, gpu_id), None)
            if row is None:
                session.add(LiveStatus(host=h, gpu_id=gpu_id, at=now, data=data))
            else:
                row.at, row.data = now, data
        for gone in existing.values():
            session.execute(
                delete(LiveStatus).where(
                    LiveStatus.host == gone.host, LiveStatus.gpu_id == gone.gpu_id
                )
            )


def read(ctx: Context) -> dict[Key, dict[str, Any]]:
    """Every GPU's newest sample as a dict (GpuSample.to_dict()), keyed by (host, gpu_id)."""
    if ctx.redis is not None:
        raw = ctx.redis.hgetall(REDIS_KEY)
        result: dict[Key, dict[str, Any]] = {}
        for field, value in raw.items():
            host, _, gpu_id = field.decode().rpartition("/")
            result[(host, int(gpu_id))] = json.loads(value)
        return result
    with ctx.db.session() as session:
        return {(r.host, r.gpu_id): r.data for r in session.scalars(select(LiveStatus))}


class Updates:
    """Waits for the next publish, for live pages (server-sent events, long polls).

    With Redis it listens on REDIS_CHANNEL (no database reads at all); without Redis it
    looks at the newest `live_status` time a few times a second (one small query).
    """

    POLL_SECONDS = 0.25

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._pubsub: Any = None
        self._last: Any = None
        if ctx.redis is not None:
            self._pubsub = ctx.redis.pubsub(ignore_subscribe_messages=True)
            self._pubsub.subscribe(REDIS_CHANNEL)
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
