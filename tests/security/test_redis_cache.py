"""Redis is a cache that any local user can write to (SPEC §12): junk in it never stops
expiry, idle revocation or the status page, and the sign-in throttle does not live there."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta

import pytest
import time_machine
from redis import Redis

from gpulocker import allocations, auth, gpustatus, live, policies
from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.db import Database
from gpulocker.gpus.simulated import SimulatedBackend, write_load
from gpulocker.models import EXPIRED, Allocation, utcnow
from gpulocker.web import create_app
from tests.conftest import REDIS_URL, TEST_HOST
from tests.helpers import ALICE

JUNK = {
    "no-slash": "{}",
    f"{TEST_HOST}/not-a-number": "{}",
    f"{TEST_HOST}/1": "not json",
    f"{TEST_HOST}/2": json.dumps({"utilization": "a lot", "at": "now"}),
    f"{TEST_HOST}/3": "[" * 100_000 + "]" * 100_000,
    f"{TEST_HOST}/4": json.dumps({"processes": "everyone", "at": utcnow().isoformat()}),
    f"{TEST_HOST}/99999999999999999999": "{}",
}


@pytest.fixture
def redis_ctx(settings: Settings, db: Database, redis_client: Redis) -> Iterator[Context]:
    """A Context whose live samples go through the test's Redis."""
    context = Context(settings.with_overrides(redis_url=REDIS_URL))
    yield context
    context.close()


def _vandalise(client: Redis) -> None:
    """What a student with `redis-cli` does to the unauthenticated live hash."""
    client.hset(live.REDIS_KEY, mapping=JUNK)  # type: ignore[arg-type]


def test_it_expires_allocations_with_junk_in_the_live_hash(
    redis_ctx: Context, redis_client: Redis
) -> None:
    (row,) = allocations.request(redis_ctx.db, redis_ctx.settings, ALICE, "4090", 1, hours=1)
    backend = SimulatedBackend(redis_ctx.settings.gpu_config, redis_ctx.settings.device_path)
    write_load(redis_ctx.settings.device_path, 5, 33.0, 100.0, None)
    live.publish(redis_ctx, TEST_HOST, backend.sample())
    _vandalise(redis_client)
    with time_machine.travel(utcnow() + timedelta(hours=2), tick=False):
        outcome = policies.run(redis_ctx)
    assert row.id in outcome.expired
    with redis_ctx.db.session() as session:
        assert session.get(Allocation, row.id).state == EXPIRED  # type: ignore[union-attr]
    samples = live.read(redis_ctx)
    assert samples[(TEST_HOST, 5)]["utilization"] == 33.0  # the honest sample survives
    assert {key for key in samples if key[1] in (1, 2, 3, 4)} == set()  # the junk does not


def test_the_status_page_answers_with_junk_in_the_live_hash(
    redis_ctx: Context, redis_client: Redis
) -> None:
    _vandalise(redis_client)
    client = create_app(ctx=redis_ctx).test_client()
    answer = client.get("/api/gpu_status")
    assert answer.status_code == 200
    assert len(answer.get_json()["gpus"]) == 6
    assert len(gpustatus.snapshot(redis_ctx)["gpus"]) == 6


def test_it_keeps_enforcing_when_redis_is_gone(settings: Settings, db: Database) -> None:
    gone = Context(settings.with_overrides(redis_url="redis://127.0.0.1:1/0"))
    (row,) = allocations.request(gone.db, gone.settings, ALICE, "4090", 1, hours=1)
    backend = SimulatedBackend(settings.gpu_config, settings.device_path)
    live.publish(gone, TEST_HOST, backend.sample())  # logged, not raised
    with time_machine.travel(utcnow() + timedelta(hours=2), tick=False):
        assert row.id in policies.run(gone).expired
    gone.close()


def test_the_sign_in_throttle_cannot_be_reset_or_filled_through_redis(
    redis_ctx: Context, redis_client: Redis
) -> None:
    attempt = auth.Attempt(ALICE, "192.0.2.7")
    for _ in range(auth.USER_LIMIT):
        auth.record_failure(redis_ctx, attempt)
    redis_client.flushdb()  # the guesser wipes every counter they can reach
    with pytest.raises(auth.Throttled):
        auth.check_throttle(redis_ctx, attempt)
    victim = auth.Attempt("glt_victim", "198.51.100.1")
    for n in range(50):  # ... or stuffs a victim's counter to lock them out
        redis_client.zadd(
            "gpulocker:login_failures:user:glt_victim", {f"fake{n}": utcnow().timestamp()}
        )
    auth.check_throttle(redis_ctx, victim)  # not throttled
