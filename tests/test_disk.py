"""Disk usage (SPEC section 9): measured off the request path with progress, cached
DISK_CACHE_TIMEOUT_SECONDS, every user's for admins, largest first. Real homes of the
test users, real files."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import time_machine

from gpulocker import disk
from gpulocker.agent.loop import Agent
from gpulocker.background import Worker
from gpulocker.context import Context
from gpulocker.models import utcnow
from tests.helpers import ALICE, BOB, CAROL, TestUser

MIB = 1024 * 1024


def put(user: TestUser, name: str, mib: int) -> Path:
    """Write `mib` MiB of incompressible data in the user's home, under a test folder."""
    folder = Path(user.home) / "disk-test"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_bytes(os.urandom(mib * MIB))
    return path


@pytest.fixture
def homes(users: dict) -> Iterator[dict]:
    yield users
    for user in users.values():
        shutil.rmtree(Path(user.home) / "disk-test", ignore_errors=True)


def test_it_measures_off_the_request_and_caches(ctx: Context, homes: dict) -> None:
    alice = homes[ALICE]
    put(alice, "weights.bin", 3)
    first = disk.usage_for(ctx, ALICE)
    assert (first["status"], first["used_bytes"], first["home"]) == ("pending", None, alice.home)
    assert disk.scan_pending(ctx) == 1
    done = disk.usage_for(ctx, ALICE)
    assert done["status"] == "done" and not done["stale"]
    assert 3 * MIB <= done["used_bytes"] < 4 * MIB
    assert done["scanned_bytes"] == done["used_bytes"]
    assert done["fs_total_bytes"] >= done["fs_used_bytes"] > 0 and done["fs_free_bytes"] > 0

    put(alice, "more.bin", 2)
    assert disk.usage_for(ctx, ALICE)["used_bytes"] == done["used_bytes"]  # cached
    assert disk.scan_pending(ctx) == 0  # nothing asked for a new scan
    later = utcnow() + timedelta(seconds=ctx.settings.disk_cache_timeout_seconds + 1)
    with time_machine.travel(later):
        stale = disk.usage_for(ctx, ALICE)
        assert stale["status"] == "pending" and stale["used_bytes"] == done["used_bytes"]
        assert disk.scan_pending(ctx) == 1
        fresh = disk.usage_for(ctx, ALICE)
    assert fresh["used_bytes"] - done["used_bytes"] >= 2 * MIB


def test_a_request_during_a_scan_answers_at_once_with_progress(ctx: Context, homes: dict) -> None:
    disk.usage_for(ctx, ALICE)
    claimed = disk.claim_next(ctx.db)
    assert claimed is not None and claimed.user == ALICE
    assert disk.claim_next(ctx.db) is None  # a second scanner does not take it too
    during = disk.usage_for(ctx, ALICE)
    assert (during["status"], during["scanned_bytes"], during["used_bytes"]) == (
        "scanning",
        0,
        None,
    )
    disk.scan(ctx.db, ALICE, homes[ALICE].home)
    assert disk.usage_for(ctx, ALICE)["status"] == "done"


def test_it_reports_progress_while_measuring(homes: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    bob = homes[BOB]
    for n in range(5):
        folder = Path(bob.home) / "disk-test" / f"run{n}"
        folder.mkdir(parents=True)
        (folder / "data").write_bytes(os.urandom(MIB))
    monkeypatch.setattr(disk, "PROGRESS_SECONDS", 0.0)
    seen: list[int] = []
    total = disk.measure(bob.home, progress=seen.append)
    assert len(seen) >= 5 and seen == sorted(seen)
    assert seen[-1] == total and total >= 5 * MIB


def test_it_counts_hard_links_once_and_does_not_follow_symlinks(homes: dict) -> None:
    carol = homes[CAROL]
    before = disk.measure(carol.home)
    data = put(carol, "data.bin", 2)
    os.link(data, data.with_name("same-data.bin"))
    os.symlink("/usr", data.with_name("usr-link"))
    grown = disk.measure(carol.home) - before
    assert 2 * MIB <= grown < 2 * MIB + 64 * 1024


def test_admins_see_every_user_largest_first(ctx: Context, homes: dict) -> None:
    put(homes[ALICE], "big.bin", 4)
    put(homes[BOB], "small.bin", 1)
    unmeasured = disk.usage_all(ctx)
    assert {ALICE, BOB, CAROL} <= {u["user"] for u in unmeasured}
    assert all(u["status"] == "pending" for u in unmeasured)
    disk.scan_pending(ctx)
    users = [u["user"] for u in disk.usage_all(ctx)]
    sizes = [u["used_bytes"] for u in disk.usage_all(ctx)]
    assert sizes == sorted(sizes, reverse=True)
    assert users.index(ALICE) < users.index(BOB) < users.index(CAROL)


def test_the_agent_measures_in_the_background(ctx: Context, homes: dict) -> None:
    put(homes[ALICE], "x.bin", 1)
    disk.usage_for(ctx, ALICE)
    agent = Agent(ctx)
    assert agent.tick(force=True)["disk"] is True  # a thread was started; the tick went on
    assert disk_worker(agent).join(timeout=30)
    assert disk.usage_for(ctx, ALICE)["status"] == "done"
    assert agent.tick(force=True)["disk"] is False  # nothing left to measure
    agent.close()


def test_a_dead_scanner_is_taken_over(ctx: Context, homes: dict) -> None:
    disk.usage_for(ctx, ALICE)
    assert disk.claim_next(ctx.db) is not None  # this scanner "dies" here
    assert disk.claim_next(ctx.db) is None
    with time_machine.travel(utcnow() + timedelta(seconds=disk.STUCK_SECONDS + 1)):
        assert disk.scan_pending(ctx) == 1
    assert disk.usage_for(ctx, ALICE)["status"] == "done"


def test_an_unknown_user_gets_an_error_not_a_scan(ctx: Context) -> None:
    answer = disk.usage_for(ctx, "no-such-user-xyz")
    assert answer["status"] == "error" and "no such user" in answer["error"]
    assert disk.scan_pending(ctx) == 0


def disk_worker(agent: Agent) -> Worker:
    """The background worker of the agent's disk step."""
    step = agent.step("disk")
    assert isinstance(step, disk.DiskStep)
    return step.worker
