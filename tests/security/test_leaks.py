"""Anonymous callers learn metrics, not who holds what until when, nor server internals."""

from __future__ import annotations

from gpulocker import allocations
from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.db import Database
from gpulocker.web import create_app
from tests.helpers import ALICE

SECRET = "s3cret-redis-pw"


def test_anonymous_status_says_taken_without_ids_or_end_times(ctx: Context) -> None:
    (row,) = allocations.request(ctx.db, ctx.settings, ALICE, "4090", 1, hours=3)
    gpus = create_app(ctx=ctx).test_client().get("/api/gpu_status").get_json()["gpus"]
    mine = next(g for g in gpus if g["gpu_id"] == row.gpu_id)
    assert mine["held"] is True
    assert (mine["holder"], mine["allocation_id"], mine["expires_at"]) == (None, None, None)


def test_anonymous_health_does_not_repeat_exception_texts(settings: Settings, db: Database) -> None:
    broken = Context(settings.with_overrides(redis_url=f"redis://:{SECRET}@127.0.0.1:1/0"))
    answer = create_app(ctx=broken).test_client().get("/healthz")
    body = answer.get_data(as_text=True)
    assert answer.get_json()["redis"]["ok"] is False
    assert SECRET not in body
    assert "127.0.0.1" not in body and "Connection refused" not in body
    broken.close()
