"""Quotas (SPEC section 11) by user and by real Unix group, on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import select

from gpulocker import allocations, fairshare, queue, quotas, reservations, scheduler
from gpulocker.config import ConfigError, Settings, load_settings
from gpulocker.db import Database
from gpulocker.errors import Quota
from gpulocker.models import utcnow
from gpulocker.scheduling_models import QueuedRequest
from tests.conftest import needs_root
from tests.helpers import ALICE, BOB, RUN, TestUser

BASE = {"STATE_DIR": "/tmp/gpulocker-config-test", "GPULOCKER_ENV_FILE": "/dev/null"}
SMALL = f"glt{RUN}_small"
BIG = f"glt{RUN}_big"


@pytest.fixture(scope="module")
def groups(users: dict[str, TestUser]) -> Iterator[tuple[str, str]]:
    """Two real groups: ALICE in both, BOB in the small one."""
    for name in (SMALL, BIG):
        subprocess.run(["groupadd", name], check=True)
    subprocess.run(["usermod", "-aG", f"{SMALL},{BIG}", ALICE], check=True)
    subprocess.run(["usermod", "-aG", SMALL, BOB], check=True)
    yield SMALL, BIG
    for name in (SMALL, BIG):
        subprocess.run(["groupdel", name], check=False)


@needs_root
def test_the_most_generous_group_and_a_user_entry_win(
    db: Database, settings: Settings, groups: tuple[str, str]
) -> None:
    limited = settings.with_overrides(
        quotas={
            f"@{SMALL}": {"gpu_hours_per_week": 4, "max_gpus": 3},
            f"@{BIG}": {"gpu_hours_per_week": 10},
            BOB: {"max_gpus": 1},
        },
        max_gpus_per_user=2,
    )
    assert quotas.limits_for(limited, ALICE).to_dict() == {"gpu_hours_per_week": 10, "max_gpus": 3}
    assert quotas.limits_for(limited, BOB).to_dict() == {"gpu_hours_per_week": 4, "max_gpus": 1}
    allocations.request(db, limited, ALICE, "4090", 2, 4)  # 8 of 10 GPU-hours
    with pytest.raises(Quota, match=r"8\.0 of 10 GPU-hours") as info:
        allocations.request(db, limited, ALICE, "a100", 1, 3)
    assert info.value.code == "quota" and info.value.details["limits"]["gpu_hours_per_week"] == 10
    allocations.request(db, limited, BOB, "a100", 1, 1)
    with pytest.raises(Quota, match="at most 1 per user"):
        allocations.request(db, limited, BOB, "a100", 1, 1)
    # Booked hours count too.
    with pytest.raises(Quota):
        reservations.book(db, limited, ALICE, "a100", 1, utcnow() + timedelta(hours=2), 3)


def test_a_request_over_quota_waits_instead(db: Database, settings: Settings) -> None:
    limited = settings.with_overrides(quotas={ALICE: {"max_gpus": 1}})
    allocations.request(db, limited, ALICE, "4090", 1, 1)
    rows, waiting = scheduler.request_or_wait(db, limited, ALICE, "4090", 1, 1)
    assert rows == [] and waiting is not None
    scheduler.run_pass(db, limited)
    assert queue.get(db, limited, ALICE, waiting.id).state == "waiting"
    allocations.release_all(db, limited, ALICE)
    scheduler.run_pass(db, limited)
    with db.session() as s:
        assert s.scalars(select(QueuedRequest.state)).one() == "granted"
        summary = quotas.summary(s, limited, ALICE, utcnow())
        share = fairshare.usage(s, limited, utcnow())
    assert summary["gpus"] == 1 and summary["limits"] == {"gpu_hours_per_week": None, "max_gpus": 1}
    assert ALICE in share


def test_quotas_are_parsed_strictly(tmp_path: object) -> None:
    good = load_settings(
        {**BASE, "QUOTAS": '{"@students": {"gpu_hours_per_week": 100}, "bob": {"max_gpus": 2}}'}
    )
    assert good.quotas["bob"] == {"max_gpus": 2}
    for raw in (
        "[1]",
        '{"bob": {"max": 1}}',
        '{"bob": {"max_gpus": 1.5}}',
        '{"bob": {"max_gpus": -1}}',
        '{"b b": {}}',
        "{",
    ):
        with pytest.raises(ConfigError, match="QUOTAS"):
            load_settings({**BASE, "QUOTAS": raw})
    with pytest.raises(ConfigError, match="QUEUE_AGING_HOURS"):
        load_settings({**BASE, "QUEUE_AGING_HOURS": "0"})
