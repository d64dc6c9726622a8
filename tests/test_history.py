"""History (what the agent records every GPU_ACTIVITY_CHECK_MINUTES; pruning after
GPU_UTILIZATION_HISTORY_DAYS is tests/test_retention.py), its downsampled series, and live
publication."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, insert, select

from gpulocker import allocations, history, live
from gpulocker.agent.loop import Agent
from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.db import Database
from gpulocker.gpus.simulated import SimulatedBackend, write_load
from gpulocker.models import Gpu, GpuSample, utcnow
from tests.conftest import REDIS_URL
from tests.helpers import ALICE, hold_open_as

HOST = "testhost"


def rows(db: Database) -> list[GpuSample]:
    with db.session() as s:
        return list(s.scalars(select(GpuSample).order_by(GpuSample.gpu_id, GpuSample.at)))


def test_it_records_each_gpu_with_its_holder_and_processes(
    ctx: Context, settings: Settings, users: dict
) -> None:
    (row,) = allocations.request(ctx.db, settings, ALICE, "4090", gpu_ids=[1], hours=1)
    agent = Agent(ctx)
    agent.tick(force=True)  # grants alice her GPU
    write_load(settings.device_path, 1, utilization=87.5, memory_mib=4096)
    proc = hold_open_as(users[ALICE], row.device)
    try:
        agent.samples = {s.index: s for s in agent.backend.sample()}
        assert history.history_step(agent) is True
    finally:
        proc.kill()
        proc.wait()
    recorded = {r.gpu_id: r for r in rows(ctx.db)}
    assert sorted(recorded) == [0, 1, 2, 3, 4, 5]
    one = recorded[1]
    assert (one.utilization, one.memory_used_mib, one.holder, one.processes) == (
        87.5,
        4096.0,
        ALICE,
        1,
    )
    assert (recorded[0].utilization, recorded[0].holder, recorded[0].processes) == (0.0, None, 0)


def test_a_lost_gpu_leaves_a_gap_and_the_others_keep_being_recorded(
    ctx: Context, settings: Settings
) -> None:
    agent = Agent(ctx)
    write_load(settings.device_path, 2, error="GPU is lost")
    write_load(settings.device_path, 3, utilization=40, memory_mib=100)
    agent.tick(force=True)
    assert sorted(r.gpu_id for r in rows(ctx.db)) == [0, 1, 3, 4, 5]
    with ctx.db.session() as s:
        lost = s.scalar(select(Gpu).where(Gpu.gpu_id == 2))
    assert lost is not None and not lost.healthy and lost.error == "GPU is lost"
    published = live.read(ctx)
    assert published[(HOST, 2)]["ok"] is False
    assert published[(HOST, 3)]["utilization"] == 40


def test_it_does_not_record_a_stale_reading(ctx: Context, settings: Settings) -> None:
    samples = SimulatedBackend(settings.gpu_config, settings.device_path).sample()
    later = utcnow() + history.max_sample_age(settings) + timedelta(seconds=1)
    assert history.record(ctx, HOST, samples, now=later) == 0
    assert history.record(ctx, HOST, samples) == 6


def test_installs_on_other_redis_databases_do_not_hear_each_other(
    redis_ctx: Context, settings: Settings
) -> None:
    # Pub/sub channels are the Redis server's, not a database's: a second install on
    # another database of the same server must not wake this one's live pages.
    from redis import Redis

    assert redis_ctx.redis is not None
    db = redis_ctx.redis.connection_pool.connection_kwargs["db"]
    other = Redis.from_url(REDIS_URL.rsplit("/", 1)[0] + f"/{(db % 15) + 1}")
    try:
        assert live.channel(other) != live.channel(redis_ctx.redis)
        updates = live.Updates(redis_ctx)
        try:
            other.publish(live.channel(other), "elsewhere")
            assert updates.wait(0.3) is False
            Agent(redis_ctx).tick(force=True)
            assert updates.wait(5) is True
        finally:
            updates.close()
    finally:
        other.close()


def fill(db: Database, gpu_id: int, start: datetime, count: int, every: timedelta, util) -> None:
    with db.transaction() as s:
        s.execute(
            insert(GpuSample),
            [
                {
                    "host": HOST,
                    "gpu_id": gpu_id,
                    "at": start + every * i,
                    "utilization": util(i),
                    "memory_used_mib": 10.0 * i,
                    "holder": None,
                    "processes": 0,
                }
                for i in range(count)
            ],
        )


def test_series_averages_into_time_buckets(db: Database) -> None:
    end = datetime(2031, 1, 1, 12, 0, tzinfo=UTC)
    start = end - timedelta(hours=2)
    # One sample a minute, half a minute into each minute, alternating 0 % and 100 %.
    fill(db, 0, start + timedelta(seconds=30), 120, timedelta(minutes=1), lambda i: 100.0 * (i % 2))
    fill(db, 1, start, 120, timedelta(minutes=1), lambda i: 99.0)  # another GPU: not mixed in
    with db.session() as s:
        points = history.series(s, HOST, 0, 2, max_points=60, end=end)
        raw = history.series(s, HOST, 0, 2, max_points=1000, end=end)
        last_hour = history.series(s, HOST, 0, 1, max_points=1000, end=end)
    assert len(points) == 60  # two-minute buckets
    assert {p["utilization"] for p in points} == {50.0}
    assert points[0]["memory_used_mib"] == 5.0  # mean of 0 and 10 MiB
    assert points[0]["at"] == (start + timedelta(seconds=90)).isoformat()  # newest in bucket
    assert len(raw) == 120 and [p["utilization"] for p in raw[:3]] == [0.0, 100.0, 0.0]
    assert len(last_hour) == 60


def test_series_never_returns_more_than_max_points(db: Database) -> None:
    end = datetime(2031, 1, 8, tzinfo=UTC)
    fill(
        db, 4, end - timedelta(days=7), 7 * 24 * 60, timedelta(minutes=1), lambda i: float(i % 100)
    )
    with db.session() as s:
        week = history.series(s, HOST, 4, 24 * 7, end=end)
        day = history.series(s, HOST, 4, 24, end=end)
        nothing = history.series(s, HOST, 5, 24 * 7, end=end)
    assert 990 <= len(week) <= 1000
    assert 990 <= len(day) <= 1000
    assert nothing == []
    times = [p["at"] for p in week]
    assert times == sorted(times)
    assert 40 < sum(p["utilization"] for p in week) / len(week) < 60


@pytest.fixture
def redis_ctx(settings: Settings, db: Database, redis_client: object) -> Iterator[Context]:
    context = Context(settings.with_overrides(redis_url=REDIS_URL))
    yield context
    context.close()


def test_live_samples_go_through_redis_with_an_announcement(
    redis_ctx: Context, settings: Settings
) -> None:
    assert redis_ctx.redis is not None
    pubsub = redis_ctx.redis.pubsub()
    pubsub.subscribe(live.channel(redis_ctx.redis))
    assert pubsub.get_message(timeout=2)["type"] == "subscribe"  # type: ignore[index]
    write_load(settings.device_path, 5, utilization=12, memory_mib=345)
    Agent(redis_ctx).tick(force=True)
    message = pubsub.get_message(timeout=2)
    assert message is not None and message["data"] == HOST.encode()
    sample = live.read(redis_ctx)[(HOST, 5)]
    assert (sample["utilization"], sample["memory_used_mib"]) == (12, 345)
    with redis_ctx.db.session() as s:  # with Redis the database is not written every sample
        from gpulocker.models import LiveStatus

        assert s.scalar(select(func.count()).select_from(LiveStatus)) == 0
    raw = redis_ctx.redis.hget(live.REDIS_KEY, f"{HOST}/5")
    assert raw is not None and json.loads(raw)["index"] == 5
    pubsub.close()


@pytest.mark.parametrize("with_redis", [False, True], ids=["database", "redis"])
def test_live_pages_can_wait_for_the_next_publish(
    request: pytest.FixtureRequest, settings: Settings, db: Database, with_redis: bool
) -> None:
    if with_redis:
        request.getfixturevalue("redis_client")
        settings = settings.with_overrides(redis_url=REDIS_URL)
    ctx = Context(settings)
    agent = Agent(ctx)
    agent.tick(force=True)
    updates = live.Updates(ctx)
    try:
        assert updates.wait(0.3) is False  # nothing new since it started listening
        agent.tick(force=True)
        assert updates.wait(5) is True
        assert updates.wait(0.3) is False
    finally:
        updates.close()
        agent.close()
        ctx.close()
